//! `cargo xtask xl`: the xl path alone, for the PV test kernel's suites (it judges the
//! run by the kernel's `Test result:` line; `cargo xtask run --domu --kernel ELF` boots
//! any kernel the runner's way).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::xl::{DomuOptions, run_domu};
use crate::{XtaskResult, provisioner, root_dir};

/// The default domU kernel of `cargo xtask xl`.
pub fn default_kernel() -> PathBuf {
    root_dir().join("target/x86_64-unknown-none/release/xenmsr-pvkernel")
}

/// `cargo xtask xl [KERNEL] [--args "..."] [--timeout SECS] [--verbose]`: runs one ELF
/// as a domU on the xl path, prints its console log and the timings, and fails unless it
/// printed `Test result: SUCCESS`. Without KERNEL it takes the release PV test kernel
/// (which must already be built).
pub fn cmd_xl(args: &[String]) -> XtaskResult<()> {
    let mut kernel: Option<PathBuf> = None;
    let mut opts = DomuOptions {
        args: String::new(),
        deadline: Duration::from_secs(180),
        memory_mib: 64,
        vcpus: 1,
        verbose: std::env::var_os("XENMSR_XL_VERBOSE").is_some(),
        echo_console: false,
        cpu: None,
        xen_args: Vec::new(),
        lifecycle: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--args" => opts.args = it.next().ok_or("--args needs a value")?.clone(),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs seconds")?;
                opts.deadline = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--timeout: not a number: {v}"))?,
                );
            }
            "--memory" => {
                let v = it.next().ok_or("--memory needs MiB")?;
                opts.memory_mib = v
                    .parse()
                    .map_err(|_| format!("--memory: not a number: {v}"))?;
            }
            "--vcpus" => {
                let v = it.next().ok_or("--vcpus needs a count")?;
                opts.vcpus = v
                    .parse()
                    .map_err(|_| format!("--vcpus: not a number: {v}"))?;
            }
            "-v" | "--verbose" => opts.verbose = true,
            other if other.starts_with('-') => {
                return Err(format!(
                    "xl: unknown option {other}; usage: cargo xtask xl [KERNEL] \
                     [--args ARGS] [--timeout SECS] [--memory MIB] [--vcpus N] [--verbose]"
                )
                .into());
            }
            path => kernel = Some(PathBuf::from(path)),
        }
    }
    let kernel = kernel.unwrap_or_else(default_kernel);
    if !kernel.exists() {
        return Err(format!(
            "no domU kernel at {} (build the PV test kernel first, or pass a path)",
            kernel.display()
        )
        .into());
    }
    let start = Instant::now();
    let run = run_domu(&provisioner(), &kernel, &opts)?;
    println!("----- domU console ({:?}) -----", run.guest_end);
    println!("{}", run.console_log);
    println!("----- end of domU console -----");
    if !run.xl_log.is_empty() && opts.verbose {
        println!("----- xl log -----\n{}", run.xl_log);
    }
    eprintln!(
        "xtask: xl: QEMU {:.1} s (domU started at {}), total {:.1} s, {} serial lines",
        run.wall.as_secs_f64(),
        run.domu_started
            .map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
        start.elapsed().as_secs_f64(),
        run.serial_log.lines().count()
    );
    if run.passed() {
        return Ok(());
    }
    match run.test_result() {
        Some(true) => Err(format!(
            "the domU reported SUCCESS but then did not shut down cleanly ({:?})",
            run.guest_end
        )
        .into()),
        Some(false) => Err("the domU reported Test result: FAILURE".into()),
        None => Err(format!(
            "the domU printed no `Test result:` line (it ended {:?})",
            run.guest_end
        )
        .into()),
    }
}
