//! Building the PV test kernel.

use std::path::PathBuf;
use std::time::Instant;

use crate::{XtaskResult, cargo, provision, root_dir, run_checked};

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

/// Builds the kernel package `package` (release, for [`TARGET`]) and returns its image.
pub fn build_package(package: &str) -> XtaskResult<PathBuf> {
    provision::rust_target()?;
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
