//! `xenmsr-bench`: the host benchmark binary that `cargo xtask bench` runs under
//! `valgrind --tool=callgrind`.
//!
//! ```text
//! xenmsr-bench list              one line per scenario: name, then a description
//! xenmsr-bench run NAME N        set the scenario up, then run its operation N times
//! xenmsr-bench sites             the patch-site records of this image: op, length, count
//! xenmsr-bench sizes             the symbols whose sizes give bytes per call site
//! xenmsr-bench scaling [MS]      2 threads against 1 through the stubs (thread CPU time;
//!                                see `scaling`), MS ms per thread per measurement
//! ```
//!
//! `run` does all its setup (mock page, policy, backend registration, synthetic tables)
//! and one checked warm-up call of the operation before it enters
//! [`xenmsr_bench_region`]; inside, the operation runs `N` times in a loop (in batches of [`BATCH`]). xtask passes
//! `--toggle-collect=xenmsr_bench_region` to callgrind, so only the region is counted,
//! and runs every scenario at several `N` to take the fixed cost of the region out of the
//! per-operation count (see `docs/benchmarks.md`).
//!
//! Every operation reads its inputs through [`black_box`] (the MSR index too, so that the
//! routing is never folded at compile time) and passes its result to [`black_box`].

mod scaling;
mod scenarios;
mod sizes;

use std::hint::black_box;
use std::process::ExitCode;

/// The measured region: callgrind collects exactly the instructions executed between
/// entering and leaving this function (`--toggle-collect=xenmsr_bench_region`).
#[unsafe(no_mangle)]
#[inline(never)]
pub fn xenmsr_bench_region(body: &mut dyn FnMut()) {
    body();
}

/// Operations per entry into the measured region. Between two batches, outside the
/// region, [`measure_with`] runs the scenario's `between` (the mock-page scenarios take the
/// recorded calls there, so the mock's call log never grows beyond one batch and its cost
/// per call stays the same at every `n`).
pub const BATCH: u64 = 1024;

/// Runs `op(i)` for `i` in `0..n` inside the measured region, in batches of [`BATCH`].
/// The loop is monomorphised for each operation, so the operation is inlined into it (as
/// it would be at a call site) and the loop adds the same few instructions to every
/// scenario, which the `loop` scenario measures on its own.
pub fn measure<F: FnMut(u64)>(n: u64, op: F) {
    measure_with(n, op, || {});
}

/// [`measure`], running `between` after every batch, outside the measured region.
pub fn measure_with<F: FnMut(u64)>(n: u64, mut op: F, mut between: impl FnMut()) {
    let mut start = 0;
    while start < n {
        let end = n.min(start + BATCH);
        let mut body = || run_loop(start, end, &mut op);
        xenmsr_bench_region(&mut body);
        between();
        start = end;
    }
}

#[inline(never)]
fn run_loop<F: FnMut(u64)>(start: u64, end: u64, op: &mut F) {
    for i in start..end {
        op(black_box(i));
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: xenmsr-bench list | run NAME N | sites | sizes | scaling [MS]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            for s in scenarios::ALL {
                println!("{}\t{}", s.name, s.about);
            }
            ExitCode::SUCCESS
        }
        ["run", name, n] => {
            let Ok(n) = n.parse::<u64>() else {
                return usage();
            };
            match scenarios::ALL.iter().find(|s| s.name == *name) {
                Some(s) => {
                    (s.run)(n);
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("xenmsr-bench: no scenario {name:?} (see `xenmsr-bench list`)");
                    ExitCode::from(2)
                }
            }
        }
        ["sites"] => {
            sizes::print_sites();
            ExitCode::SUCCESS
        }
        ["sizes"] => {
            sizes::print_symbols();
            ExitCode::SUCCESS
        }
        ["scaling"] => {
            scaling::run(scaling::DEFAULT_MILLIS);
            ExitCode::SUCCESS
        }
        ["scaling", n] => match n.parse::<u64>() {
            Ok(n) if n > 0 => {
                scaling::run(n);
                ExitCode::SUCCESS
            }
            _ => usage(),
        },
        _ => usage(),
    }
}
