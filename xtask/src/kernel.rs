//! Building the PV test kernel.

use std::path::PathBuf;
use std::time::Instant;

use crate::{XtaskResult, cargo, provision, root_dir, run_checked};

/// The bare-metal target the kernel is built for.
pub const TARGET: &str = "x86_64-unknown-none";

/// Builds the PV test kernel (release) in the default target directory and returns the
/// path of the ELF image.
pub fn build() -> XtaskResult<PathBuf> {
    provision::rust_target()?;
    eprintln!("xtask: building the PV test kernel ({TARGET}, release)");
    let start = Instant::now();
    run_checked(cargo().args([
        "build",
        "--package",
        "xenmsr-pvkernel",
        "--target",
        TARGET,
        "--release",
    ]))?;
    let path = image();
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

/// Where the kernel image is after [`build`].
pub fn image() -> PathBuf {
    root_dir()
        .join("target")
        .join(TARGET)
        .join("release")
        .join("xenmsr-pvkernel")
}
