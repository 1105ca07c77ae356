//! `suite=smpbench`: does the library scale across vCPUs? The same work, per operation,
//! on vCPU 0 alone and on every vCPU at once.
//!
//! A library that writes a cache line another vCPU also writes on its success paths gets
//! slower per operation when the vCPUs run together (under QEMU's multi-threaded TCG,
//! guest memory is host memory, so shared lines bounce between the host cores that run the
//! vCPUs). The cost is each vCPU's own *running* time from Xen's run-state accounting
//! (`VCPUOP_get_runstate_info`), not wall time: with more vCPUs than physical CPUs a vCPU
//! also waits for a CPU, which says nothing about the library.
//!
//! Each workload runs [`ROUNDS`] rounds, each round once alone (the other vCPUs parked)
//! and once on every vCPU, side by side in one boot. Upcalls are off (the timer is not
//! started), so only the library's paths are measured. A round's "all" cost is the median
//! over the vCPUs. Two estimates are printed: the median over rounds of each round's ratio,
//! and the ratio of the two minimums over rounds (noise on a shared host only ever adds
//! time, so the minimums are the least disturbed).
//!
//! Output (parsed by `xtask/src/guestbench.rs`):
//!
//! ```text
//! smpbench <workload> round=<r> vcpus=<n> alone_ns_per_op=<x> all_ns_per_op=<a>,<b>,... ratio=<r>
//! smpbench-ratio <workload> vcpus=<n> median=<r> min=<r> max=<r> of_minimums=<r>
//! ```

use core::hint::black_box;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use xenmsr::{rdmsr_safe, wrmsr_safe};
use xenmsr_hypercall::abi::VcpuRunstateInfo;

use super::routing::{Rng, StressOp};
use super::{model, percpu, routing};
use crate::hv;
use crate::smp::{self, CacheAligned, MAX_VCPUS, PerVcpu, current_vcpu};
use crate::testing::{self, Failure, TestResult};

/// Rounds per workload.
pub const ROUNDS: usize = 15;

/// One workload: `ops` operations on the calling vCPU, drawn from `seed`. Each job runs
/// for tens of milliseconds, many of Xen's scheduling intervals: Xen accounts a vCPU's
/// running time at every switch, and the part since the last switch, which `NOW()` on a
/// different TCG CPU can under-count, stays small next to the whole.
struct Workload {
    name: &'static str,
    ops: u64,
    run: fn(u64, u64),
}

const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;

const WORKLOADS: [Workload; 3] = [
    // The 100,000-operation stress test's mix (reads, writes, RDPMC, faults, hypercalls).
    Workload {
        name: "stress",
        ops: 10_000,
        run: stress,
    },
    // A context switch's FS base write through a run-time-index site (one hypercall).
    Workload {
        name: "fs_base_write",
        ops: 100_000,
        run: fs_base_write,
    },
    // A pass-through read (the stub runs RDMSR, Xen emulates it).
    Workload {
        name: "passthrough_read",
        ops: 15_000,
        run: passthrough_read,
    },
];

fn stress(ops: u64, seed: u64) {
    let mut rng = Rng(seed | 1);
    for _ in 0..ops {
        black_box(StressOp::draw(&mut rng).perform());
    }
    // The mix writes FS and GS; leave them as the kernel expects.
    // SAFETY: the kernel keeps no state in FS or GS.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE + 1, 0) };
}

fn fs_base_write(ops: u64, seed: u64) {
    for i in 0..ops {
        let base = (seed ^ i) << 12 & 0x0000_7fff_ffff_f000;
        // SAFETY: the kernel keeps no state in FS.
        black_box(unsafe { wrmsr_safe(MSR_FS_BASE, black_box(base)) }).ok();
    }
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
}

fn passthrough_read(ops: u64, _seed: u64) {
    for _ in 0..ops {
        // SAFETY: reading EFER has no side effect.
        black_box(unsafe { rdmsr_safe(black_box(MSR_EFER)) }).ok();
    }
}

/// This vCPU's running time so far, in ns.
fn running_ns() -> u64 {
    hv::page()
        .vcpu_runstate_info(current_vcpu())
        .map_or(0, |r| r.time[VcpuRunstateInfo::RUNNING])
}

/// The workload the current `run_on_all` job runs.
static CURRENT: AtomicUsize = AtomicUsize::new(0);
/// The round the current job belongs to (part of each vCPU's seed).
static ROUND: AtomicUsize = AtomicUsize::new(0);
/// Each vCPU's running ns of its last job.
static NS: PerVcpu<AtomicU64> = [const { CacheAligned(AtomicU64::new(0)) }; MAX_VCPUS];

fn seed(vcpu: u32) -> u64 {
    0x5eed_5eed_0000_0000 ^ (ROUND.load(Ordering::Relaxed) as u64) << 8 ^ u64::from(vcpu) << 20
}

fn timed_job(vcpu: u32) {
    let w = &WORKLOADS[CURRENT.load(Ordering::Acquire)];
    let t0 = running_ns();
    (w.run)(w.ops, seed(vcpu));
    NS[vcpu as usize]
        .0
        .store(running_ns() - t0, Ordering::Release);
}

/// Boots the other vCPUs, initialises the library, and measures every workload.
pub fn run() {
    testing::run(percpu::BRING_UP);
    let n = smp::online();
    if n != model().vcpus || !percpu::events_ready() {
        return;
    }
    smp::stop_the_world(|| testing::run(routing::INIT_TESTS));
    crate::println!("smpbench-note vcpus={n} rounds={ROUNDS} unit=running_ns");
    for (i, w) in WORKLOADS.iter().enumerate() {
        CURRENT.store(i, Ordering::Release);
        // One unreported round of each first: QEMU translates the code, Xen faults its
        // paths in.
        ROUND.store(0, Ordering::Relaxed);
        smp::with_others_parked(|| timed_job(0));
        smp::run_on_all(timed_job);
        let result = measure(w, n);
        testing::record(w.name, result);
    }
}

fn measure(w: &Workload, n: u32) -> TestResult {
    let mut ratios = [0f64; ROUNDS];
    let (mut best_alone, mut best_all) = (f64::MAX, f64::MAX);
    for (round, ratio) in ratios.iter_mut().enumerate() {
        ROUND.store(round + 1, Ordering::Relaxed);
        smp::with_others_parked(|| timed_job(0));
        let alone = NS[0].0.load(Ordering::Acquire) as f64 / w.ops as f64;
        smp::run_on_all(timed_job);
        let mut all = [0f64; MAX_VCPUS];
        for (v, slot) in all.iter_mut().enumerate().take(n as usize) {
            *slot = NS[v].0.load(Ordering::Acquire) as f64 / w.ops as f64;
        }
        let all = &all[..n as usize];
        if alone <= 0.0 || all.iter().any(|&x| x <= 0.0) {
            return Err(Failure::new(format_args!(
                "{}: no running time measured (alone {alone}, all {all:?})",
                w.name
            )));
        }
        let mut sorted = [0f64; MAX_VCPUS];
        sorted[..all.len()].copy_from_slice(all);
        let sorted = &mut sorted[..all.len()];
        sorted.sort_unstable_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        *ratio = median / alone;
        best_alone = best_alone.min(alone);
        best_all = best_all.min(median);
        let mut list = crate::console::Line::new();
        for (v, x) in all.iter().enumerate() {
            let _ = core::fmt::Write::write_fmt(
                &mut list,
                format_args!("{}{x:.1}", if v == 0 { "" } else { "," }),
            );
        }
        crate::println!(
            "smpbench {} round={round} vcpus={n} alone_ns_per_op={alone:.1} all_ns_per_op={} ratio={ratio:.3}",
            w.name,
            list.as_str()
        );
    }
    ratios.sort_unstable_by(f64::total_cmp);
    crate::println!(
        "smpbench-ratio {} vcpus={n} median={:.3} min={:.3} max={:.3} of_minimums={:.3}",
        w.name,
        ratios[ROUNDS / 2],
        ratios[0],
        ratios[ROUNDS - 1],
        best_all / best_alone
    );
    Ok(())
}
