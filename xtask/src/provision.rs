//! Automatic, cached provisioning: everything `run` and `test` need, installed or
//! downloaded once and kept under `target/xenmsr-cache/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use crate::{XtaskResult, cache_dir};

/// The Debian package that carries the hypervisor binary.
pub const XEN_HYPERVISOR_PKG: &str = "xen-hypervisor-4.17-amd64";

/// Runs `apt-get update` once per xtask process, before the first install or download.
fn apt_update_once() -> XtaskResult<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        run_checked_timeout(
            Command::new("apt-get").args(["update", "-qq"]),
            Duration::from_secs(600),
        )
        .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Into::into)
}

/// Installs Debian packages whose marker file (`probe`) is missing.
pub fn apt_install(packages: &[&str], probe: &Path) -> XtaskResult<()> {
    if probe.exists() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (apt-get)", packages.join(" "));
    apt_update_once()?;
    run_checked_timeout(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
        Duration::from_secs(1200),
    )
}

/// `qemu-system-x86_64`, installed from Debian if missing.
pub fn qemu() -> XtaskResult<PathBuf> {
    let path = PathBuf::from("/usr/bin/qemu-system-x86_64");
    apt_install(&["qemu-system-x86"], &path)?;
    Ok(path)
}

/// The `x86_64-unknown-none` rustup target, added if missing.
pub fn rust_target() -> XtaskResult<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "x86_64-unknown-none")
    {
        return Ok(());
    }
    eprintln!("xtask: adding rustup target x86_64-unknown-none");
    run_checked_timeout(
        Command::new("rustup").args(["target", "add", "x86_64-unknown-none"]),
        Duration::from_secs(600),
    )
}

/// Downloads (once) the `.deb` of a Debian package into the cache and returns its path.
pub fn download_deb(package: &str) -> XtaskResult<PathBuf> {
    let dir = cache_dir().join("debs");
    std::fs::create_dir_all(&dir)?;
    if let Some(found) = find_deb(&dir, package)? {
        return Ok(found);
    }
    eprintln!("xtask: downloading {package}.deb");
    apt_update_once()?;
    run_checked_timeout(
        Command::new("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(&dir),
        Duration::from_secs(600),
    )?;
    find_deb(&dir, package)?
        .ok_or_else(|| format!("apt-get download {package}: no .deb appeared").into())
}

fn find_deb(dir: &Path, package: &str) -> XtaskResult<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The Xen 4.17 hypervisor as QEMU can boot it: the multiboot1 ELF, gunzipped from
/// Debian's `xen-hypervisor-4.17-amd64` package (QEMU cannot load `xen.gz` itself).
pub fn xen_binary() -> XtaskResult<PathBuf> {
    let out = cache_dir().join("xen-4.17");
    if out.exists() {
        return Ok(out);
    }
    let deb = download_deb(XEN_HYPERVISOR_PKG)?;
    let unpack = cache_dir().join("xen-hypervisor-unpacked");
    let _ = std::fs::remove_dir_all(&unpack);
    run_checked_timeout(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack),
        Duration::from_secs(300),
    )?;
    let boot = unpack.join("boot");
    let gz = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("xen-4.17") && n.ends_with(".gz")
        })
        .ok_or("no boot/xen-4.17*.gz in the hypervisor package")?;
    let data = Command::new("gzip").arg("-dc").arg(&gz).output()?;
    if !data.status.success() {
        return Err(format!("gunzip {} failed", gz.display()).into());
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &data.stdout)?;
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Runs a command with inherited stdio, killing it if it runs longer than `timeout`.
pub fn run_checked_timeout(cmd: &mut Command, timeout: std::time::Duration) -> XtaskResult<()> {
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?} failed: {status}").into())
            };
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} timed out after {} s", timeout.as_secs()).into());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Downloads (once) the `.deb`s of several Debian packages into the cache with one
/// `apt-get download`, and returns their paths in the order given.
pub fn download_debs(packages: &[String]) -> XtaskResult<Vec<PathBuf>> {
    let dir = cache_dir().join("debs");
    std::fs::create_dir_all(&dir)?;
    let mut missing = Vec::new();
    for package in packages {
        if find_deb(&dir, package)?.is_none() {
            missing.push(package.as_str());
        }
    }
    if !missing.is_empty() {
        eprintln!("xtask: downloading {}", missing.join(" "));
        apt_update_once()?;
        run_checked_timeout(
            Command::new("apt-get")
                // The cache is root's; without this apt warns that its `_apt` user
                // cannot write there and downloads unsandboxed anyway.
                .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
                .args(&missing)
                .current_dir(&dir),
            std::time::Duration::from_secs(600),
        )?;
    }
    packages
        .iter()
        .map(|p| {
            find_deb(&dir, p)?
                .ok_or_else(|| format!("apt-get download {p}: no .deb appeared").into())
        })
        .collect()
}

/// What the host tests need beyond Rust: gcc and Debian's Xen headers (`libxen-dev`) for
/// the ABI layout cross-check.
pub fn host_test_tools() -> XtaskResult<()> {
    apt_install(&["gcc"], Path::new("/usr/bin/gcc"))?;
    apt_install(&["libxen-dev"], Path::new("/usr/include/xen/xen.h"))
}

/// `valgrind`, for the host benchmarks' instruction counts.
pub fn valgrind() -> XtaskResult<()> {
    apt_install(&["valgrind"], Path::new("/usr/bin/valgrind"))
}
