//! A user's own crate, outside the workspace, done the way `docs/integrating.md` tells a
//! user to: the rows `user-crate/*`.
//!
//! `xenmsr-runner` is installed with `cargo install --path xtask/runner` (into a root under
//! `target/`, not the user's `~/.cargo`), a crate is made with `cargo new` in the system's
//! temporary directory (outside this checkout, so no workspace of ours is in sight), it
//! gets a path dependency on `shim/`, the guide's `.cargo/config.toml` (the target, the
//! static relocation model, the runner), the minimal kernel's `build.rs` and
//! `src/main.rs`, and its in-guest tests (`tests/guest.rs`, a `harness = false` target);
//! then plain `cargo run` and `cargo test` in it must exit as the guest ended:
//!
//! - `user-crate/cargo-run`: the kernel boots and powers off or reboots cleanly: exit 0;
//! - `user-crate/cargo-test`: every in-guest test passes: exit 0;
//! - `user-crate/cargo-test-failing`: `cargo test -- --exact xenmsr_selftest_fail` (the
//!   harness's built-in failing test): the domain crashes, the runner exits 1, and cargo
//!   reports the test target failed and exits with the runner's status, 1.
//!
//! The runner's provisioning cache is pointed at the checkout's (`XENMSR_CACHE`), so the
//! rows download nothing twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{
    SuiteResult, XtaskResult, cache_dir, cargo, push_sharing_setup, root_dir, run_checked,
};

/// The rows, in the order they run.
const ROWS: [&str; 3] = [
    "user-crate/cargo-run",
    "user-crate/cargo-test",
    "user-crate/cargo-test-failing",
];

/// Whether any row is wanted (`--only`).
pub fn any_wanted(wanted: &dyn Fn(&str) -> bool) -> bool {
    ROWS.iter().any(|row| wanted(row))
}

/// Sets up the crate once, then runs the wanted rows.
pub fn run(wanted: &dyn Fn(&str) -> bool, deadline: Duration) -> Vec<SuiteResult> {
    let start = Instant::now();
    let setup = set_up(deadline);
    let mut results = Vec::new();
    for &name in ROWS.iter().filter(|row| wanted(row)) {
        let row_start = Instant::now();
        let outcome = match &setup {
            Err(e) => Err(format!("setting up the user crate: {e}")),
            Ok(krate) => run_row(name, krate).map_err(|e| e.to_string()),
        };
        // The first row carries the install and the crate's set-up.
        push_sharing_setup(&mut results, name, start, row_start, outcome);
    }
    results
}

/// Where the user's crate is, and the runner it uses.
struct UserCrate {
    dir: PathBuf,
}

/// Installs the runner and writes the crate.
fn set_up(deadline: Duration) -> XtaskResult<UserCrate> {
    let root = root_dir();
    let runner_root = root.join("target").join("xenmsr-user-crate-runner");
    eprintln!(
        "xtask: user-crate: cargo install --path xtask/runner --root {}",
        runner_root.display()
    );
    run_checked(
        cargo()
            .args(["install", "--quiet", "--path", "xtask/runner", "--root"])
            .arg(&runner_root),
    )?;
    let runner = runner_root.join("bin").join("xenmsr-runner");

    // Outside the checkout, so that cargo finds no workspace of ours above it. The
    // directory is kept between runs (its target/ makes the next build quick), but every
    // file of the crate is written afresh.
    let dir = std::env::temp_dir()
        .join("xenmsr-user-crate")
        .join("mykernel");
    if !dir.join("Cargo.toml").exists() {
        std::fs::create_dir_all(dir.parent().expect("a parent"))?;
        eprintln!("xtask: user-crate: cargo new {}", dir.display());
        run_checked(
            cargo()
                .args([
                    "new", "--quiet", "--vcs", "none", "--bin", "--name", "mykernel",
                ])
                .arg(&dir),
        )?;
    }
    let shim = root.join("shim");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "mykernel"
version = "0.1.0"
edition = "2024"

[[bin]]
name = "mykernel"
test = false
bench = false

[[test]]
name = "guest"
harness = false

[dependencies]
xenmsr = {{ path = "{}" }}
"#,
            shim.display()
        ),
    )?;
    std::fs::create_dir_all(dir.join(".cargo"))?;
    std::fs::write(
        dir.join(".cargo").join("config.toml"),
        format!(
            r#"[build]
target = "x86_64-unknown-none"

[target.x86_64-unknown-none]
rustflags = ["-C", "relocation-model=static"]
runner = ["{}", "--timeout", "{}"]
"#,
            runner.display(),
            deadline.as_secs()
        ),
    )?;
    let minimal = root.join("tests").join("minimal-kernel");
    copy(&minimal.join("build.rs"), &dir.join("build.rs"))?;
    copy(
        &minimal.join("src").join("main.rs"),
        &dir.join("src").join("main.rs"),
    )?;
    std::fs::create_dir_all(dir.join("tests"))?;
    copy(
        &minimal.join("tests").join("guest.rs"),
        &dir.join("tests").join("guest.rs"),
    )?;
    Ok(UserCrate { dir })
}

fn copy(from: &Path, to: &Path) -> XtaskResult<()> {
    std::fs::copy(from, to).map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
    Ok(())
}

/// One row: the cargo command, its exit status and the lines it must print.
fn run_row(name: &str, krate: &UserCrate) -> XtaskResult<String> {
    let (args, want_status, want_lines): (&[&str], i32, &[&str]) = match name {
        "user-crate/cargo-run" => (&["run"], 0, &["minimal: PASS"]),
        "user-crate/cargo-test" => (
            &["test"],
            0,
            &["test fs_base_round_trip ... ok", "test result: ok. "],
        ),
        _ => (
            &["test", "--", "--exact", "xenmsr_selftest_fail"],
            1,
            &[
                "test xenmsr_selftest_fail ... FAILED",
                "test result: FAILED. 0 passed; 1 failed",
            ],
        ),
    };
    eprintln!(
        "xtask: {name}: cargo {} (in {})",
        args.join(" "),
        krate.dir.display()
    );
    let mut cmd = user_cargo(&krate.dir);
    let output = cmd.args(args).output().map_err(|e| format!("cargo: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("{stdout}\n{stderr}");
    let status = output.status.code().unwrap_or(-1);
    let missing: Vec<&str> = want_lines
        .iter()
        .copied()
        .filter(|want| !all.lines().any(|line| line.contains(want)))
        .collect();
    if status != want_status || !missing.is_empty() {
        for line in all
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            eprintln!("  | {line}");
        }
        return Err(format!(
            "cargo {}: exit status {status} (expected {want_status}); missing lines: {missing:?}",
            args.join(" ")
        )
        .into());
    }
    // The runner's own exit status for the guest's end is in cargo's message when the
    // test target fails ("process didn't exit successfully: ... (exit status: 1)").
    if want_status != 0 && !stderr.contains("exit status: 1") {
        return Err("cargo does not report the runner's exit status 1".into());
    }
    Ok(format!(
        "cargo {}: exit status {status} as expected",
        args.join(" ")
    ))
}

/// `cargo` in the user's crate: none of this process's cargo environment, the runner's
/// cache pointed at the checkout's.
fn user_cargo(dir: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(dir).env("XENMSR_CACHE", cache_dir());
    cmd
}
