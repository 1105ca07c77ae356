//! `cargo xtask`: the project's task runner (see <https://github.com/matklad/cargo-xtask/>).
//!
//! - `cargo xtask run`: build the PV test kernel, boot it as dom0 under Xen in QEMU, and
//!   show what the library does for a set of MSRs.
//! - `cargo xtask test`: every test: host tests, then the in-guest suites as dom0 on three
//!   CPU models under Xen 4.17, 4.20 and 4.22 (4 vCPUs each), again with FSGSBASE, and on
//!   two models under a debug build of 4.22; the minimal example kernel under 4.17 and
//!   4.22; then the `xl create` domU path (2 vCPUs).
//! - `cargo xtask bench`: benchmarks (host instruction counts, the host scaling table, and
//!   in-guest ratios including the 4-vCPU scaling run); `--scaling` runs only the host
//!   scaling table.
//! - `cargo xtask sweep --xen A --xen B`: what two hypervisors do differently with each MSR
//!   of the sweep ranges, per CPU model.
//!
//! Provisioning, QEMU and the xl path are the `xenmsr-runner` crate's (`xtask/runner`),
//! the code its binary boots users' kernels with; xtask adds the project's kernels, test
//! rows and verdicts, and caches under the checkout's `target/xenmsr-cache/`.

mod bench;
mod cargo_test_failures;
mod guestbench;
mod guesttests;
mod kernel;
mod lifecycle;
mod smpbench;
mod stubpaths;
mod sweep;
mod usercrate;
mod xlcmd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use xenmsr_runner::cli::{self, BootOptions};
pub(crate) use xenmsr_runner::{guestlog, process, provision, qemu, xl};

use provision::{Provisioner, XEN_422_TARBALL, Xen};
use qemu::{Dom0Run, Echo};

/// The error type of every task: a message for the user.
pub type XtaskResult<T> = xenmsr_runner::RunnerResult<T>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => cmd_run(&args[1..]),
        Some("test") => cmd_test(&args[1..]),
        Some("bench") => cmd_bench(&args[1..]),
        Some("xl") => xlcmd::cmd_xl(&args[1..]),
        Some("sweep") => sweep::cmd_sweep(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <run|test|bench|xl|sweep> [options]");
            eprintln!(
                "  run  [--cpu MODEL] [--xen 4.17|4.20|4.22|4.22-debug] [--timeout SECS] [-v]"
            );
            eprintln!(
                "  run  --kernel ELF [xenmsr-runner's options] [KERNEL-ARGS...] \
                 (xenmsr-runner --help, or cargo xtask run --help)"
            );
            eprintln!("  test [--no-host] [--no-xl] [--only NAME] [--timeout SECS] [-v]");
            eprintln!("  sweep --xen A --xen B [--cpu MODEL]... [--vpmu]");
            eprintln!(
                "  xl   [KERNEL] [--args ARGS] [--timeout SECS] [--memory MIB] [--vcpus N] [-v]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e}");
        std::process::exit(1);
    }
}

/// The default deadline of one dom0 QEMU run (a green run takes about 1-2 s).
const DOM0_DEADLINE: Duration = Duration::from_secs(120);
/// The deadline of the xl path (Linux dom0 + toolstack + domU: about 30 s when green).
const XL_DEADLINE: Duration = Duration::from_secs(300);

/// The PV test kernel's first line: the demo's echo starts there, and Xen's complaints
/// after it are the guest's.
pub const PVKERNEL_BANNER: &str = "xenmsr-pvkernel:";

/// The words that tell the PV test kernel which hypervisor it runs under (it checks the
/// release against `XENVER_version`; the harness checks the build from Xen's banner).
/// Passed explicitly: the runner adds nothing to a kernel's command line.
pub fn xen_identity_args(xen: Xen) -> String {
    format!(
        "xen={} xenbuild={}",
        xen.version(),
        if xen.debug() { "debug" } else { "release" }
    )
}

/// A dom0 run of the PV test kernel: its suite's arguments, then
/// [`xen_identity_args`].
pub fn pvkernel_run(
    name: String,
    xen: Xen,
    cpu: &str,
    smp: u32,
    xen_args: Vec<String>,
    suite_args: &str,
    deadline: Duration,
) -> Dom0Run {
    Dom0Run {
        name,
        cpu: cpu.to_string(),
        smp,
        xen_args,
        kernel_args: format!("{suite_args} {}", xen_identity_args(xen)),
        deadline,
        xen,
        banner: Some(PVKERNEL_BANNER.to_string()),
    }
}

/// The dom0's vCPUs in the test runs: every suite runs on all of them at once.
const DOM0_VCPUS: u32 = 4;
/// The physical CPUs QEMU gives Xen: fewer than the vCPUs, so that Xen also switches vCPUs
/// on one CPU (and must save and restore each one's state).
const DOM0_PCPUS: u32 = 2;

/// The dom0 suites: one per CPU model and Xen release and build, each telling the kernel
/// what to expect. Xen 4.17's are `dom0/<model>`, the others `dom0-xen<label>/<model>`
/// (`dom0-xen4.20/`, `dom0-xen4.22/`, `dom0-xen4.22-debug/`).
fn dom0_suites(deadline: Duration) -> Vec<Dom0Run> {
    let suite = |xen: Xen, cpu: &str, vpmu: bool, fsgsbase: bool| {
        let mut xen_args = vec![format!("dom0_max_vcpus={DOM0_VCPUS}")];
        if vpmu {
            xen_args.push("vpmu=1".to_string());
        }
        let prefix = match (xen, fsgsbase) {
            (Xen::V4_17, false) => "dom0".to_string(),
            (Xen::V4_17, true) => "dom0-fsgsbase".to_string(),
            (other, false) => format!("dom0-xen{}", other.label()),
            (other, true) => format!("dom0-xen{}-fsgsbase", other.label()),
        };
        pvkernel_run(
            format!("{prefix}/{cpu}{}", if vpmu { "+vpmu" } else { "" }),
            xen,
            cpu,
            DOM0_PCPUS,
            xen_args,
            &format!(
                "suite=dom0 cpu={cpu} vpmu={} vcpus={DOM0_VCPUS} fsgsbase={}",
                u8::from(vpmu),
                u8::from(fsgsbase)
            ),
            // A debug hypervisor is slower by design (assertions, and every refused MSR
            // access formats a rate-limited log message): its Skylake-Client row takes
            // about 50 s on a quiet 2-core machine, and hit 120 s on a loaded one.
            if xen.debug() { deadline * 2 } else { deadline },
        )
    };
    vec![
        // AMD family 0xf: K7 PMU MSRs are RAZ/WI, Intel's #GP; vPMU unsupported.
        suite(Xen::V4_17, "qemu64", false, false),
        // Intel: P6/arch-perfmon MSRs RAZ/WI, AMD's #GP.
        suite(Xen::V4_17, "Skylake-Client", false, false),
        // AMD family 0x17 with vpmu=1: the one model where XENPMU really initialises.
        suite(Xen::V4_17, "EPYC", true, false),
        // The same models under Debian 13's Xen 4.20; the suites encode where it differs
        // (Intel's P6_EVNTSEL4-7, AMD's MMIO_CONF_BASE: see the `xen` suite).
        suite(Xen::V4_20, "qemu64", false, false),
        suite(Xen::V4_20, "Skylake-Client", false, false),
        suite(Xen::V4_20, "EPYC", true, false),
        // The newest release, 4.22.0, built from source (no Debian release packages it);
        // it answers every MSR the suites check as 4.20 does.
        suite(Xen::V4_22, "qemu64", false, false),
        suite(Xen::V4_22, "Skylake-Client", false, false),
        suite(Xen::V4_22, "EPYC", true, false),
        // The same source as a debug build: assertions on, and on every hypercall return
        // the argument registers the hypercall used are poisoned, so any stub path that
        // relied on one of them being preserved fails here. One Intel and one AMD model
        // (EPYC with the vPMU, whose hypercalls only run there).
        suite(Xen::V4_22Debug, "Skylake-Client", false, false),
        suite(Xen::V4_22Debug, "EPYC", true, false),
        // Every suite again with the library opted in to FSGSBASE: Skylake-Client and
        // EPYC have it (the FS/GS bases go through RDFSBASE/WRFSBASE), qemu64 has not
        // (the tested fallback).
        suite(Xen::V4_17, "qemu64", false, true),
        suite(Xen::V4_17, "Skylake-Client", false, true),
        suite(Xen::V4_17, "EPYC", true, true),
    ]
}

/// The domU command line of the xl path (its QEMU runs the default `qemu64` model, and its
/// initramfs Xen 4.17 with Debian 12's toolstack).
const DOMU_ARGS: &str = "suite=domu cpu=qemu64 vpmu=0 vcpus=2 xen=4.17 xenbuild=release";
/// The domU's vCPUs (as `vcpus=` in `DOMU_ARGS`).
const DOMU_VCPUS: u32 = 2;

/// Options of `test`.
struct Options {
    host: bool,
    xl: bool,
    only: Option<String>,
    deadline: Duration,
    verbose: bool,
}

fn parse_test_options(args: &[String]) -> XtaskResult<Options> {
    let mut o = Options {
        host: true,
        xl: true,
        only: None,
        deadline: DOM0_DEADLINE,
        verbose: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--no-host" => o.host = false,
            "--no-xl" => o.xl = false,
            "--only" => o.only = Some(it.next().ok_or("--only needs a suite name")?.clone()),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs seconds")?;
                o.deadline = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--timeout: not a number: {v}"))?,
                );
            }
            "-v" | "--verbose" => o.verbose = true,
            "--xen" => {
                return Err(
                    "--xen is an option of run; test runs every release and build \
                            (--only xen4.22 selects the 4.22 suites, --only 4.22-debug the \
                            debug ones)"
                        .into(),
                );
            }
            other => return Err(format!("test: unknown option {other}").into()),
        }
    }
    Ok(o)
}

/// `cargo xtask run [OPTIONS] [--kernel ELF | ELF] [KERNEL-ARGS...]`: with a kernel, what
/// `xenmsr-runner` does with the same options (the same code: it boots the kernel,
/// streams its console, and exits with the guest's outcome), caching under the
/// checkout's `target/`. Without one, the demo.
fn cmd_run(args: &[String]) -> XtaskResult<()> {
    let options = match cli::parse(args)? {
        cli::Command::Help => {
            print!("{}", cli::USAGE);
            println!(
                "\ncargo xtask run takes the same options; without a kernel it boots the PV \
                 test kernel's demo (--cpu, --xen, --timeout and -v apply)."
            );
            return Ok(());
        }
        cli::Command::Version => {
            println!("xenmsr-runner {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        cli::Command::Boot(options) => options,
    };
    let mut prov = provisioner();
    if let Some(source) = &options.xen_src {
        prov = prov.with_xen_source(Some(source.clone()));
    }
    if options.kernel.is_some() {
        let status = xenmsr_runner::boot::boot_and_report(&prov, &options);
        if status != 0 {
            std::process::exit(status);
        }
        return Ok(());
    }
    run_demo(&prov, &options)
}

/// `cargo xtask run`: the demo. Boots the PV test kernel as dom0 with `suite=demo` under
/// Xen 4.17 (or `--xen 4.20|4.22|4.22-debug`) and shows the table of what the library did
/// for each MSR.
fn run_demo(prov: &Provisioner, options: &BootOptions) -> XtaskResult<()> {
    let defaults = BootOptions::default();
    if options.vcpus != defaults.vcpus
        || options.pcpus.is_some()
        || options.vpmu
        || !options.xen_args.is_empty()
        || !options.kernel_args.is_empty()
        || options.domu
    {
        return Err(
            "the demo takes --cpu, --xen, --timeout and -v; the other options are for \
                    a kernel of your own (--kernel ELF)"
                .into(),
        );
    }
    let release = options.xen;
    let kernel = kernel::build()?;
    let qemu = prov.qemu()?;
    let xen = prov.xen_binary(release)?;
    let run = pvkernel_run(
        "demo".to_string(),
        release,
        &options.cpu,
        1,
        vec![],
        &format!("suite=demo cpu={} vpmu=0", options.cpu),
        options.timeout.unwrap_or(DOM0_DEADLINE),
    );
    eprintln!(
        "xtask: booting Xen {} ({}) + the PV test kernel as dom0 (QEMU TCG, -cpu {})",
        release.label(),
        release.origin(),
        options.cpu
    );
    let echo = if options.verbose {
        Echo::All
    } else {
        Echo::Guest
    };
    let report = qemu::run_dom0(prov, &qemu, &xen, &kernel, &run, echo)?;
    eprintln!(
        "xtask: demo finished in {:.1} s (QEMU exit {})",
        report.wall.as_secs_f64(),
        report
            .exit_code
            .map_or("none: killed".to_string(), |c| c.to_string())
    );
    if report.passed() {
        Ok(())
    } else {
        report.print_failure();
        Err("the demo run failed".into())
    }
}

/// What a run's summary says of the hypervisor: the version and build from its banner,
/// and Xen's own complaints (WARN/ASSERT lines; those while the guest ran fail the run).
fn xen_note(release: Xen, report: &qemu::RunReport) -> String {
    let boot = report
        .xen_complaints
        .iter()
        .filter(|c| !c.while_guest_ran)
        .count();
    let during = report.xen_complaints.len() - boot;
    let mut note = format!("; Xen {} ({})", report.xen_identity(), release.origin());
    if report.xen_suppressed > 0 {
        note.push_str(&format!(
            "; {} Xen log messages rate-limited away",
            report.xen_suppressed
        ));
    }
    if boot + during > 0 {
        note.push_str(&format!(
            "; Xen WARN/ASSERT/self-test failures: {boot} during its boot, {during} while \
             the guest ran"
        ));
    }
    note
}

/// One line of the final summary.
pub(crate) struct SuiteResult {
    pub(crate) name: String,
    pub(crate) wall: Duration,
    pub(crate) outcome: Result<String, String>,
    /// The kernel's SMP report (vCPUs, stress totals, where upcalls landed).
    pub(crate) report: Vec<String>,
}

/// Adds the result of one of the rows in `results` that share a set-up (a build, an
/// install) begun at `setup_start`: the first row's wall time includes it.
fn push_sharing_setup(
    results: &mut Vec<SuiteResult>,
    name: &str,
    setup_start: Instant,
    row_start: Instant,
    outcome: Result<String, String>,
) {
    let wall = if results.is_empty() {
        setup_start.elapsed()
    } else {
        row_start.elapsed()
    };
    results.push(SuiteResult {
        name: name.to_string(),
        wall,
        outcome,
        report: Vec::new(),
    });
}

/// " on N vCPUs, upcalls inside stubs S, at call sites C" for a run's summary line.
fn upcall_note(log: &guestlog::GuestLog) -> String {
    let hotplug = log.hotplug_cycles();
    let hotplug = if hotplug.is_empty() {
        String::new()
    } else {
        let per_vcpu: Vec<String> = hotplug
            .iter()
            .map(|(vcpu, cycles)| format!("v{vcpu} {cycles}"))
            .collect();
        format!("; down/up cycles {}", per_vcpu.join(", "))
    };
    match log.upcall_summary() {
        Some((vcpus, stub, site)) => {
            format!(" on {vcpus} vCPUs; upcalls inside stubs {stub}, at call sites {site}{hotplug}")
        }
        None => hotplug,
    }
}

/// Prints a guest's test lines as libtest does, under the row's name.
pub(crate) fn print_guest_tests(row: &str, log: &guestlog::GuestLog) {
    for t in &log.tests {
        println!(
            "[{row}] test {} ... {}",
            t.name,
            if t.ok { "ok" } else { "FAILED" }
        );
    }
}

/// `cargo xtask test`: host tests, the dom0 suites on three CPU models under two Xen
/// releases, the xl path.
fn cmd_test(args: &[String]) -> XtaskResult<()> {
    let o = parse_test_options(args)?;
    let wanted = |name: &str| o.only.as_deref().is_none_or(|only| name.contains(only));
    let mut results: Vec<SuiteResult> = Vec::new();

    if o.host && wanted("host") {
        let start = Instant::now();
        // The summary names each failed test and the first line of its panic, so a log
        // cut short still says what failed.
        let outcome = host_tests()
            .map(|()| "ok".to_string())
            .map_err(|e| e.to_string());
        results.push(SuiteResult {
            name: "host".into(),
            wall: start.elapsed(),
            outcome,
            report: Vec::new(),
        });
    }

    let suites: Vec<Dom0Run> = dom0_suites(o.deadline)
        .into_iter()
        .filter(|s| wanted(&s.name))
        .collect();
    let run_xl = o.xl && wanted("domU/xl");
    let run_lifecycle = o.xl && wanted(lifecycle::ROW);
    if !suites.is_empty() || run_xl || run_lifecycle {
        let start = Instant::now();
        let kernel = kernel::build();
        let build_wall = start.elapsed();
        match kernel {
            Err(e) => {
                eprintln!("xtask: kernel build: {e}");
                results.push(SuiteResult {
                    name: "kernel build".into(),
                    wall: build_wall,
                    outcome: Err("cargo build -p xenmsr-pvkernel failed".into()),
                    report: Vec::new(),
                })
            }
            Ok(kernel) => {
                results.push(SuiteResult {
                    name: "kernel build".into(),
                    wall: build_wall,
                    outcome: Ok("ok".into()),
                    report: Vec::new(),
                });
                let echo = if o.verbose { Echo::All } else { Echo::Tests };
                dom0_tests(&kernel, &suites, echo, &mut results)?;
                if run_xl {
                    results.push(domu_test(&kernel));
                }
                if run_lifecycle {
                    results.push(lifecycle::test(&kernel));
                }
            }
        }
    }

    // The example kernels under the default release and under the newest.
    for example in [&MINIMAL_KERNEL, &SMP_KERNEL] {
        for xen in [Xen::V4_17, Xen::V4_22] {
            let name = example_kernel_name(example, xen);
            if wanted(&name) {
                results.push(example_kernel_test(example, name, xen, o.deadline));
            }
        }
    }
    // The SMP kernel as an xl domU too: the kit's console ring, events and vCPU start-up
    // in an unprivileged domain.
    if o.xl && wanted("smp-kernel/domU") {
        results.push(smp_kernel_domu_test());
    }
    // The minimal kernel's in-guest tests, as `cargo test` builds them and the runner
    // boots them (guesttests.rs).
    if guesttests::any_wanted(&wanted) {
        results.extend(guesttests::run(&wanted, o.deadline));
    }
    // A user's own crate outside the workspace: cargo run and cargo test through the
    // installed runner (usercrate.rs).
    if usercrate::any_wanted(&wanted) {
        results.extend(usercrate::run(&wanted, o.deadline));
    }

    print_summary(&results);
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.outcome.is_err())
        .map(|r| r.name.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} suites failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        )
        .into())
    }
}

fn dom0_tests(
    kernel: &Path,
    suites: &[Dom0Run],
    echo: Echo,
    results: &mut Vec<SuiteResult>,
) -> XtaskResult<()> {
    if suites.is_empty() {
        return Ok(());
    }
    let prov = provisioner();
    let qemu = prov.qemu()?;
    // Each release's binary once. One that cannot be provisioned fails its own suites,
    // loudly, and not the others.
    let mut binaries: Vec<(Xen, Result<PathBuf, String>)> = Vec::new();
    for suite in suites {
        if binaries.iter().all(|(xen, _)| *xen != suite.xen) {
            let binary = prov.xen_binary(suite.xen).map_err(|e| {
                eprintln!("xtask: error: Xen {}: {e}", suite.xen.label());
                format!(
                    "no Xen {} to boot: provisioning it failed (the error is above)",
                    suite.xen.label()
                )
            });
            binaries.push((suite.xen, binary));
        }
    }
    for suite in suites {
        let binary = binaries
            .iter()
            .find(|(xen, _)| *xen == suite.xen)
            .map(|(_, binary)| binary.clone())
            .expect("every suite's release was provisioned above");
        eprintln!(
            "xtask: {}: Xen {} + kernel as dom0 under QEMU -cpu {} (deadline {} s)",
            suite.name,
            suite.xen.label(),
            suite.cpu,
            suite.deadline.as_secs()
        );
        let start = Instant::now();
        let mut smp_report = Vec::new();
        let run = binary
            .map_err(Into::into)
            .and_then(|xen| qemu::run_dom0(&prov, &qemu, &xen, kernel, suite, echo));
        let outcome = match run {
            Ok(report) => {
                report.print_failure();
                let n = report.log.tests.len();
                let failed: Vec<&str> = report.log.failures().map(|t| t.name.as_str()).collect();
                smp_report = report.log.smp_report();
                for complaint in &report.xen_complaints {
                    smp_report.push(format!(
                        "Xen complained ({}): {}",
                        if complaint.while_guest_ran {
                            "while the guest ran"
                        } else {
                            "during its boot"
                        },
                        complaint.line
                    ));
                }
                let note = format!(
                    "{}{}",
                    upcall_note(&report.log),
                    xen_note(suite.xen, &report)
                );
                report
                    .verdict
                    .map(|()| format!("{n} tests ok{note}"))
                    .map_err(|why| {
                        if failed.is_empty() {
                            why
                        } else {
                            format!("{why}; failed: {}", failed.join(", "))
                        }
                    })
            }
            Err(e) => Err(e.to_string()),
        };
        results.push(SuiteResult {
            name: suite.name.clone(),
            wall: start.elapsed(),
            outcome,
            report: smp_report,
        });
    }
    Ok(())
}

/// An example kernel `docs/integrating.md` walks through, and what its boot must show.
struct ExampleKernel {
    /// The summary name's stem.
    stem: &'static str,
    /// The cargo package (and binary).
    package: &'static str,
    /// Its vCPUs (`dom0_max_vcpus=`), and the QEMU CPUs they share.
    vcpus: u32,
    pcpus: u32,
    /// Lines it must print (each a prefix of a whole line), in this order when
    /// `in_order`, else in any order (the SMP kernel's vCPUs report as they finish).
    expected: &'static [&'static str],
    in_order: bool,
}

impl ExampleKernel {
    /// The first expected line `lines` lacks (in order when `in_order`), if any.
    fn first_missing(&self, lines: &[&str]) -> Option<&'static str> {
        let mut at = 0;
        for &want in self.expected {
            let from = if self.in_order { at } else { 0 };
            match lines[from..].iter().position(|l| l.starts_with(want)) {
                Some(i) => at = from + i + 1,
                None => return Some(want),
            }
        }
        None
    }
}

/// `tests/minimal-kernel`: one vCPU.
const MINIMAL_KERNEL: ExampleKernel = ExampleKernel {
    stem: "minimal-kernel",
    package: kernel::MINIMAL,
    vcpus: 1,
    pcpus: 1,
    expected: &[
        "minimal: init: ",
        "minimal: FS_BASE write Ok(()), read back Ok(700000001000)",
        "minimal: MSR 0x12345678: Err(Fault { vector: 13 })",
        "minimal: PASS",
    ],
    in_order: true,
};

/// `tests/smp-kernel`: 4 vCPUs on 2 CPUs, each with its timer.
const SMP_KERNEL: ExampleKernel = ExampleKernel {
    stem: "smp-kernel",
    package: kernel::SMP,
    vcpus: 4,
    pcpus: 2,
    expected: &[
        "smp: vCPU 0: before Ok(()), after Ok(()) (",
        "smp: vCPU 1: before Ok(()), after Ok(()) (",
        "smp: vCPU 2: before Ok(()), after Ok(()) (",
        "smp: vCPU 3: before Ok(()), after Ok(()) (",
        "smp: 4/4 vCPUs passed: PASS",
    ],
    in_order: false,
};

/// The summary name of an example kernel's run under `xen`: the stem under the default
/// 4.17, `<stem>/xen<label>` under the others.
fn example_kernel_name(example: &ExampleKernel, xen: Xen) -> String {
    match xen {
        Xen::V4_17 => example.stem.to_string(),
        other => format!("{}/xen{}", example.stem, other.label()),
    }
}

/// Builds an example kernel and boots it as dom0 (qemu64) under `release`: it must print
/// its expected lines and end well (a poweroff, or a reboot request).
fn example_kernel_test(
    example: &ExampleKernel,
    name: String,
    release: Xen,
    deadline: Duration,
) -> SuiteResult {
    let start = Instant::now();
    let outcome = (|| -> XtaskResult<String> {
        let kernel = kernel::build_package(example.package)?;
        let prov = provisioner();
        let qemu_bin = prov.qemu()?;
        let xen = prov.xen_binary(release)?;
        // Booted as `xenmsr-runner` boots a user's kernel: an empty command line, the
        // vCPUs asked for, and the domain's end read from Xen's console.
        let run = Dom0Run {
            name: name.clone(),
            cpu: "qemu64".to_string(),
            smp: example.pcpus,
            xen_args: vec![format!("dom0_max_vcpus={}", example.vcpus)],
            kernel_args: String::new(),
            deadline,
            xen: release,
            banner: None,
        };
        eprintln!(
            "xtask: {name}: the example kernel {} as dom0 under Xen {} ({} vCPUs)",
            example.package,
            release.label(),
            example.vcpus
        );
        let report = qemu::run_dom0(&prov, &qemu_bin, &xen, &kernel, &run, Echo::Tests)?;
        // The example kernels print no test lines, so of the run's verdict only the
        // build check applies; it must end well (a poweroff, or a reboot request).
        report.xen_build.clone()?;
        if !report.outcome.succeeded() {
            for line in &report.tail {
                eprintln!("{line}");
            }
            return Err(format!(
                "{}; serial log {}",
                report.outcome,
                report.log_path.display()
            )
            .into());
        }
        let lines: Vec<&str> = report.log.other.iter().map(String::as_str).collect();
        if let Some(want) = example.first_missing(&lines) {
            for line in &report.tail {
                eprintln!("{line}");
            }
            return Err(format!("no line {want:?} in its output").into());
        }
        Ok(format!(
            "{} lines as expected, {}{}",
            example.expected.len(),
            report.outcome,
            xen_note(release, &report)
        ))
    })()
    .map_err(|e| e.to_string());
    SuiteResult {
        name,
        wall: start.elapsed(),
        outcome,
        report: Vec::new(),
    }
}

/// `tests/smp-kernel` as an `xl` domU with 4 vCPUs: every vCPU's line and a poweroff,
/// as in its dom0 rows.
fn smp_kernel_domu_test() -> SuiteResult {
    let name = "smp-kernel/domU".to_string();
    eprintln!("xtask: {name}: the SMP example kernel as a domU under a Linux dom0 (xl create)");
    let start = Instant::now();
    let outcome = (|| -> XtaskResult<String> {
        let kernel = kernel::build_package(SMP_KERNEL.package)?;
        let run = xl::run_domu_suite(&provisioner(), &kernel, "", SMP_KERNEL.vcpus, XL_DEADLINE)?;
        let ended = run.outcome(XL_DEADLINE);
        let lines: Vec<&str> = run.console_log.lines().map(str::trim).collect();
        if let Some(want) = SMP_KERNEL.first_missing(&lines) {
            return Err(format!("no line {want:?} in its console log ({ended})").into());
        }
        if !ended.succeeded() {
            return Err(format!("{ended}").into());
        }
        Ok(format!(
            "{} lines as expected on {} vCPUs, {ended}",
            SMP_KERNEL.expected.len(),
            SMP_KERNEL.vcpus
        ))
    })()
    .map_err(|e| e.to_string());
    SuiteResult {
        name,
        wall: start.elapsed(),
        outcome,
        report: Vec::new(),
    }
}

/// The xl path: the same kernel as a domU under a Linux dom0 (`xl create`); its console
/// log comes back from xenconsoled and is judged by the same rules as a dom0 run.
fn domu_test(kernel: &Path) -> SuiteResult {
    let name = "domU/xl".to_string();
    eprintln!("xtask: {name}: kernel as a domU under a Linux dom0 (xl create)");
    let start = Instant::now();
    let mut smp_report = Vec::new();
    let outcome =
        match xl::run_domu_suite(&provisioner(), kernel, DOMU_ARGS, DOMU_VCPUS, XL_DEADLINE) {
            Err(e) => Err(e.to_string()),
            Ok(run) => {
                let log = guestlog::GuestLog::parse(&run.console_log);
                let log_path = cache_dir().join("logs").join("domU-xl.console.log");
                if std::fs::create_dir_all(cache_dir().join("logs"))
                    .and_then(|()| std::fs::write(&log_path, &run.console_log))
                    .is_ok()
                {
                    eprintln!("xtask: {name}: console log in {}", log_path.display());
                }
                smp_report = log.smp_report();
                let note = upcall_note(&log);
                print_guest_tests(&name, &log);
                match log.verdict() {
                    Ok(()) => Ok(format!(
                        "{} tests ok{note} ({:?})",
                        log.tests.len(),
                        run.guest_end
                    )),
                    Err(why) => {
                        eprintln!("----- {name}: domU console log -----");
                        for line in run
                            .console_log
                            .lines()
                            .rev()
                            .take(qemu::TAIL_LINES)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                        {
                            eprintln!("{line}");
                        }
                        for t in log.failures() {
                            eprintln!(
                                "  failed: {} ({})",
                                t.name,
                                t.reason.as_deref().unwrap_or("")
                            );
                        }
                        let failed: Vec<&str> = log.failures().map(|t| t.name.as_str()).collect();
                        let names = if failed.is_empty() {
                            String::new()
                        } else {
                            format!("; failed: {}", failed.join(", "))
                        };
                        Err(format!("{why} (domU ended: {:?}){names}", run.guest_end))
                    }
                }
            }
        };
    SuiteResult {
        name,
        wall: start.elapsed(),
        outcome,
        report: smp_report,
    }
}

fn print_summary(results: &[SuiteResult]) {
    for r in results.iter().filter(|r| !r.report.is_empty()) {
        println!();
        println!("SMP report of {}:", r.name);
        for line in &r.report {
            println!("  {line}");
        }
    }
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(24);
    println!();
    println!("{:<width$} {:>9}  result", "suite", "wall");
    for r in results {
        let (mark, text) = match &r.outcome {
            Ok(t) => ("PASS", t.as_str()),
            Err(t) => ("FAIL", t.as_str()),
        };
        println!(
            "{:<width$} {:>7.1} s  {mark}: {text}",
            r.name,
            r.wall.as_secs_f64()
        );
    }
}

/// Benchmarks: host instruction counts under callgrind, then TSC-cycle ratios in the PV
/// test kernel under Xen/QEMU (TCG) on three CPU models plus an XPTI control run; both go to
/// `docs/benchmarks.md` and are printed. `--no-host` / `--no-guest` skip one part (the
/// other section of the file is kept as it is). `--scaling` measures only the host's
/// two-threads-against-one table and prints it, writing nothing.
fn cmd_bench(args: &[String]) -> XtaskResult<()> {
    let (mut host, mut guest) = (true, true);
    for arg in args {
        match arg.as_str() {
            "--no-host" => host = false,
            "--no-guest" => guest = false,
            "--scaling" => {
                println!("{}", bench::scaling_bench()?);
                return Ok(());
            }
            other => {
                return Err(format!(
                    "bench: unknown option {other} (--no-host, --no-guest, --scaling)"
                )
                .into());
            }
        }
    }
    if host {
        let host = bench::host_bench()?;
        println!("{host}");
    }
    if guest {
        let mut section = guestbench::run()?;
        let smp = smpbench::run()?;
        section.push('\n');
        section.push_str(&smp);
        guestbench::write_section(&section)?;
        println!("{section}");
    }
    Ok(())
}

/// Host tests: the whole workspace on the host (mock hypercall page, real fault paths);
/// then the ABI cross-check once more, against Xen 4.22.0's public headers (the workspace
/// run checks Debian's 4.17 ones).
fn host_tests() -> XtaskResult<()> {
    host_test_tools()?;
    eprintln!("xtask: host tests");
    run_cargo_test(cargo().args(["test", "--workspace", "--exclude", "xenmsr-pvkernel"]))?;
    let include = provisioner().xen422_public_headers()?;
    eprintln!(
        "xtask: the ABI layouts and constants against Xen 4.22.0's public headers ({})",
        include.display()
    );
    run_cargo_test(
        cargo()
            .args([
                "test",
                "-p",
                "xenmsr-hypercall",
                "--test",
                "layout_vs_xen_headers",
            ])
            .env("XENMSR_XEN_INCLUDE", &include),
    )
}

/// The workspace root.
pub fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The download and build cache, under `target/` so a clean clone rebuilds it and
/// repeated runs reuse it (the project's CI caches downloads there; the runner binary
/// caches per user instead).
pub fn cache_dir() -> PathBuf {
    let dir = root_dir().join("target").join("xenmsr-cache");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The provisioner of the checkout's tasks: the cache under `target/`, and Xen 4.22's
/// source from `$XENMSR_XEN_SRC`, else `shared/xen/` beside the checkout (where the
/// workplace and CI put it).
pub fn provisioner() -> Provisioner {
    let source = std::env::var_os("XENMSR_XEN_SRC")
        .map(PathBuf::from)
        .or_else(|| {
            root_dir()
                .parent()
                .map(|parent| parent.join("shared").join("xen").join(XEN_422_TARBALL))
        });
    Provisioner::new(cache_dir())
        .with_xen_source(source)
        .with_tool_name("xtask")
}

/// What the host tests need beyond Rust: gcc and Debian's Xen headers (`libxen-dev`) for
/// the ABI layout cross-check.
fn host_test_tools() -> XtaskResult<()> {
    let prov = provisioner();
    prov.apt_install(&["gcc"], Path::new("/usr/bin/gcc"))?;
    prov.apt_install(&["libxen-dev"], Path::new("/usr/include/xen/xen.h"))
}

/// An inner `cargo` with the variables of the outer invocation removed, so that the
/// inner build is configured only by its own arguments.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
        {
            cmd.env_remove(&*key);
        }
    }
    cmd.current_dir(root_dir());
    cmd
}

/// Runs a command with inherited stdio and fails with its status if it fails.
/// Runs `cargo test`, its output passed through as it comes; on failure the error names
/// every failed test with the first line of what it printed when it failed (its panic).
fn run_cargo_test(cmd: &mut Command) -> XtaskResult<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut failures = cargo_test_failures::Failures::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("{cmd:?}: reading its output: {e}"))?;
        println!("{line}");
        failures.see(&line);
    }
    let _ = std::io::stdout().flush();
    let status = child.wait().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}{}", failures.summary()).into())
    }
}

pub fn run_checked(cmd: &mut Command) -> XtaskResult<()> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}").into())
    }
}
