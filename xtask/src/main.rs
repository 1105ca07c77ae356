//! `cargo xtask`: the project's task runner (see <https://github.com/matklad/cargo-xtask/>).
//!
//! - `cargo xtask run`: build the PV test kernel, boot it as dom0 under Xen in QEMU, and
//!   show what the library does for a set of MSRs.
//! - `cargo xtask test`: every test: host tests, then the in-guest suites as dom0 on three
//!   CPU models, then the `xl create` domU path.
//! - `cargo xtask bench`: benchmarks (host instruction counts and in-guest ratios).

mod provision;

use std::path::PathBuf;
use std::process::Command;

/// The error type of every task: a message for the user.
pub type XtaskResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => cmd_run(&args[1..]),
        Some("test") => cmd_test(&args[1..]),
        Some("bench") => cmd_bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <run|test|bench> [options]");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e}");
        std::process::exit(1);
    }
}

fn cmd_run(_args: &[String]) -> XtaskResult<()> {
    Err("`run` is not wired up yet".into())
}

fn cmd_test(_args: &[String]) -> XtaskResult<()> {
    host_tests()
}

fn cmd_bench(_args: &[String]) -> XtaskResult<()> {
    Err("`bench` is not wired up yet".into())
}

/// Host tests: the whole workspace on the host (mock hypercall page, real fault paths).
fn host_tests() -> XtaskResult<()> {
    eprintln!("xtask: host tests");
    run_checked(cargo().args(["test", "--workspace", "--exclude", "xenmsr-pvkernel"]))
}

/// The workspace root.
pub fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The download and build cache, under `target/` so a clean clone rebuilds it and
/// repeated runs reuse it.
pub fn cache_dir() -> PathBuf {
    let dir = root_dir().join("target").join("xenmsr-cache");
    let _ = std::fs::create_dir_all(&dir);
    dir
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
pub fn run_checked(cmd: &mut Command) -> XtaskResult<()> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}").into())
    }
}
