//! Building the PV test kernel.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::run_checked_timeout;
use crate::{XtaskResult, cargo, root_dir, run_checked};

/// The bare-metal target the kernel is built for.
pub const TARGET: &str = "x86_64-unknown-none";

/// Builds the PV test kernel (release) in the default target directory and returns the
/// path of the ELF image.
pub fn build() -> XtaskResult<PathBuf> {
    build_package(PVKERNEL)
}

/// The test kernel's package (and binary) name.
pub const PVKERNEL: &str = "xenmsr-pvkernel";
/// The minimal example kernel's package (and binary) name.
pub const MINIMAL: &str = "xenmsr-minimal-kernel";
/// The SMP example kernel's package (and binary) name.
pub const SMP: &str = "xenmsr-smp-kernel";

/// Builds the kernel package `package` (release, for [`TARGET`]) and returns its image.
pub fn build_package(package: &str) -> XtaskResult<PathBuf> {
    rust_target()?;
    eprintln!("xtask: building {package} ({TARGET}, release)");
    let start = Instant::now();
    run_checked(cargo().args([
        "build",
        "--package",
        package,
        "--target",
        TARGET,
        "--release",
    ]))?;
    let path = image_of(package);
    if !path.exists() {
        return Err(format!("the kernel build produced no {}", path.display()).into());
    }
    eprintln!(
        "xtask: kernel {} built in {:.1} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(path)
}

/// Where `package`'s image is after [`build_package`].
pub fn image_of(package: &str) -> PathBuf {
    root_dir()
        .join("target")
        .join(TARGET)
        .join("release")
        .join(package)
}

/// The `x86_64-unknown-none` rustup target, added if missing.
pub(crate) fn rust_target() -> XtaskResult<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: adding rustup target {TARGET}");
    run_checked_timeout(
        Command::new("rustup").args(["target", "add", TARGET]),
        Duration::from_secs(600),
    )
}
