//! Automatic, cached provisioning: everything `run` and `test` need, installed or
//! downloaded once and kept under `target/xenmsr-cache/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use crate::{XtaskResult, cache_dir};

/// The Debian package that carries the hypervisor binary.
pub const XEN_HYPERVISOR_PKG: &str = "xen-hypervisor-4.17-amd64";

/// Debian 13 ("trixie")'s hypervisor package, for the dom0 suites under Xen 4.20.
pub const XEN_420_HYPERVISOR_PKG: &str = "xen-hypervisor-4.20-amd64";

/// A Xen hypervisor the PV test kernel boots under as dom0: a release, and how it was
/// built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xen {
    /// Xen 4.17, Debian 12's (the system's apt): the default, and the xl path's.
    V4_17,
    /// Xen 4.20, Debian 13's (a private apt configuration, see [`xen420_binary`]).
    V4_20,
    /// Xen 4.22.0, the newest release, built here from `shared/xen/` with its defconfig
    /// (no Debian release packages it; see [`xen422_binary`]).
    V4_22,
    /// The same 4.22.0 source built with `CONFIG_DEBUG=y`: assertions on, and every
    /// hypercall's argument registers poisoned on return, as upstream's CI runs guests.
    V4_22Debug,
}

/// Every `--xen` value, for messages.
pub const XEN_CHOICES: &str = "4.17, 4.20, 4.22 or 4.22-debug";

impl Xen {
    /// The hypervisor `--xen` names (`4.17`, `4.20`, `4.22` or `4.22-debug`).
    pub fn parse(arg: &str) -> XtaskResult<Self> {
        match arg {
            "4.17" => Ok(Self::V4_17),
            "4.20" => Ok(Self::V4_20),
            "4.22" => Ok(Self::V4_22),
            "4.22-debug" => Ok(Self::V4_22Debug),
            other => Err(format!("--xen: unknown Xen {other} ({XEN_CHOICES})").into()),
        }
    }

    /// `major.minor` of the release: the kernel's `xen=` argument (the kernel checks it
    /// against `XENVER_version`).
    pub const fn version(self) -> &'static str {
        match self {
            Self::V4_17 => "4.17",
            Self::V4_20 => "4.20",
            Self::V4_22 | Self::V4_22Debug => "4.22",
        }
    }

    /// Whether this is a debug build (`CONFIG_DEBUG=y`). Xen's boot banner says which
    /// (`debug=y` / `debug=n`), and every run checks the banner against this.
    pub const fn debug(self) -> bool {
        matches!(self, Self::V4_22Debug)
    }

    /// The release and build, as suite names and summaries show them (`4.22-debug`).
    pub const fn label(self) -> &'static str {
        match self {
            Self::V4_17 => "4.17",
            Self::V4_20 => "4.20",
            Self::V4_22 => "4.22",
            Self::V4_22Debug => "4.22-debug",
        }
    }

    /// Where the binary comes from, for the summary: "Debian 12 package", ...
    pub const fn origin(self) -> &'static str {
        match self {
            Self::V4_17 => "Debian 12 xen-hypervisor-4.17-amd64, release build",
            Self::V4_20 => "Debian 13 xen-hypervisor-4.20-amd64, release build",
            Self::V4_22 => "built from shared/xen 4.22.0, defconfig (release)",
            Self::V4_22Debug => "built from shared/xen 4.22.0, defconfig + CONFIG_DEBUG=y",
        }
    }

    /// The hypervisor binary QEMU boots, fetched or built, and cached, on first use.
    pub fn binary(self) -> XtaskResult<PathBuf> {
        match self {
            Self::V4_17 => xen_binary(),
            Self::V4_20 => xen420_binary(),
            Self::V4_22 => xen422_binary(XenBuild::Release),
            Self::V4_22Debug => xen422_binary(XenBuild::Debug),
        }
    }
}

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
    unpack_hypervisor(&deb, "4.17", &out)?;
    Ok(out)
}

/// The Xen 4.20 hypervisor as QEMU can boot it, from Debian 13's
/// `xen-hypervisor-4.20-amd64` package, which is fetched with a private apt configuration
/// ([`download_trixie_deb`]) and unpacked like 4.17's. Fails with what went wrong and
/// where the apt state is if the package cannot be fetched.
pub fn xen420_binary() -> XtaskResult<PathBuf> {
    let out = cache_dir().join("xen-4.20");
    if out.exists() {
        return Ok(out);
    }
    let deb = download_trixie_deb(XEN_420_HYPERVISOR_PKG).map_err(|e| {
        format!(
            "cannot fetch Xen 4.20 ({XEN_420_HYPERVISOR_PKG} from Debian 13 \"trixie\" via \
             deb.debian.org, private apt configuration in {}): {e}",
            trixie_apt_dir().display()
        )
    })?;
    unpack_hypervisor(&deb, "4.20", &out)?;
    Ok(out)
}

/// Extracts `boot/xen-<version>*.gz` from a hypervisor package and writes it gunzipped to
/// `out` (atomically, so an interrupted run leaves no half binary in the cache).
fn unpack_hypervisor(deb: &Path, version: &str, out: &Path) -> XtaskResult<()> {
    let unpack = cache_dir().join(format!("xen-hypervisor-{version}-unpacked"));
    let _ = std::fs::remove_dir_all(&unpack);
    run_checked_timeout(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&unpack),
        Duration::from_secs(300),
    )?;
    let boot = unpack.join("boot");
    let prefix = format!("xen-{version}");
    let gz = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with(&prefix) && n.ends_with(".gz")
        })
        .ok_or_else(|| format!("no boot/{prefix}*.gz in {}", deb.display()))?;
    let data = Command::new("gzip").arg("-dc").arg(&gz).output()?;
    if !data.status.success() {
        return Err(format!("gunzip {} failed", gz.display()).into());
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &data.stdout)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// The Xen 4.22.0 hypervisor source as `shared/xen/` carries it (see its README).
const XEN_422_TARBALL: &str = "xen-4.22.0-hypervisor-src.tar.xz";
/// Its SHA-256, as `shared/xen/README.md` gives it: a different file is refused.
const XEN_422_SHA256: &str = "6173163ec16ea9223927a2f8e270c0d9170dd3c80b127eb876ab3d78bf9d7166";
/// The directory the tarball unpacks to.
const XEN_422_DIR: &str = "xen-4.22.0";

/// How a hypervisor built from source is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenBuild {
    /// `make -C xen defconfig`, unchanged.
    Release,
    /// The defconfig with `CONFIG_DEBUG=y` (then `olddefconfig`).
    Debug,
}

impl XenBuild {
    const fn name(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// Where the Xen 4.22.0 source tarball is: `$XENMSR_XEN_SRC` if set, else
/// `shared/xen/` beside the checkout (where the workplace and CI put it).
pub fn xen422_tarball() -> XtaskResult<PathBuf> {
    let path = match std::env::var_os("XENMSR_XEN_SRC") {
        Some(p) => PathBuf::from(p),
        None => crate::root_dir()
            .parent()
            .ok_or("the checkout has no parent directory")?
            .join("shared")
            .join("xen")
            .join(XEN_422_TARBALL),
    };
    if !path.is_file() {
        return Err(format!(
            "no Xen 4.22.0 source at {} (the project's shared/xen/{XEN_422_TARBALL}; set              XENMSR_XEN_SRC to its path if it lives elsewhere)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// The Xen 4.22.0 hypervisor as QEMU can boot it (`xen/xen`, the multiboot1 ELF), built
/// once from the source tarball ([`xen422_tarball`], checksum verified) with `defconfig`,
/// plus `CONFIG_DEBUG=y` for [`XenBuild::Debug`], and cached as `xen-4.22` /
/// `xen-4.22-debug`. Installs what the build needs (flex, bison, make; gcc and python3
/// are checked). About 2 minutes on 2 cores.
pub fn xen422_binary(build: XenBuild) -> XtaskResult<PathBuf> {
    let out = cache_dir().join(match build {
        XenBuild::Release => "xen-4.22",
        XenBuild::Debug => "xen-4.22-debug",
    });
    if out.exists() {
        return Ok(out);
    }
    let tarball = xen422_tarball()?;
    let sum = Command::new("sha256sum").arg(&tarball).output()?;
    let sum = String::from_utf8_lossy(&sum.stdout);
    if sum.split_whitespace().next() != Some(XEN_422_SHA256) {
        return Err(format!(
            "{}: sha256 {} is not the 4.22.0 source's {XEN_422_SHA256}",
            tarball.display(),
            sum.split_whitespace().next().unwrap_or("?")
        )
        .into());
    }
    for (package, probe) in [
        ("flex", "/usr/bin/flex"),
        ("bison", "/usr/bin/bison"),
        ("make", "/usr/bin/make"),
        ("gcc", "/usr/bin/gcc"),
        ("python3", "/usr/bin/python3"),
        ("xz-utils", "/usr/bin/xz"),
    ] {
        apt_install(&[package], Path::new(probe))?;
    }
    let work = cache_dir().join(format!("xen-4.22-build-{}", build.name()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!(
        "xtask: building Xen 4.22.0 ({}) from {} in {} (about 2 minutes)",
        build.name(),
        tarball.display(),
        work.display()
    );
    let start = std::time::Instant::now();
    run_checked_timeout(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .current_dir(&work),
        Duration::from_secs(300),
    )?;
    let src = work.join(XEN_422_DIR);
    // The build's output (a thousand lines) goes to a log, shown in part if it fails.
    let log_path = cache_dir().join(format!("xen-4.22-build-{}.log", build.name()));
    let log = std::fs::File::create(&log_path)?;
    let make = |args: &[&str]| -> XtaskResult<Command> {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg("xen")
            .args(args)
            .current_dir(&src)
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        // The build is configured by its own .config only: no make flags or jobserver
        // of an outer make, and no cross-compilation variables.
        for var in [
            "MAKEFLAGS",
            "MFLAGS",
            "MAKELEVEL",
            "XEN_TARGET_ARCH",
            "CROSS_COMPILE",
        ] {
            cmd.env_remove(var);
        }
        Ok(cmd)
    };
    let run_make = |args: &[&str], timeout: u64| -> XtaskResult<()> {
        run_checked_timeout(&mut make(args)?, Duration::from_secs(timeout)).map_err(|e| {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                eprintln!("  | {line}");
            }
            format!("{e} (whole log: {})", log_path.display()).into()
        })
    };
    run_make(&["defconfig"], 300)?;
    let config_path = src.join("xen").join(".config");
    if build == XenBuild::Debug {
        let config = std::fs::read_to_string(&config_path)?;
        let mut lines: Vec<String> = config
            .lines()
            .filter(|l| !l.starts_with("CONFIG_DEBUG=") && *l != "# CONFIG_DEBUG is not set")
            .map(str::to_string)
            .collect();
        lines.push("CONFIG_DEBUG=y".to_string());
        std::fs::write(&config_path, lines.join("\n") + "\n")?;
        run_make(&["olddefconfig"], 300)?;
    }
    // The configuration really is the one asked for.
    let config = std::fs::read_to_string(&config_path)?;
    let debug_on = config.lines().any(|l| l == "CONFIG_DEBUG=y");
    if debug_on != (build == XenBuild::Debug) {
        return Err(format!(
            "{}: CONFIG_DEBUG is {} after configuring a {} build",
            config_path.display(),
            if debug_on { "on" } else { "off" },
            build.name()
        )
        .into());
    }
    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    run_make(&[&format!("-j{jobs}")], 1800)?;
    let binary = src.join("xen").join("xen");
    let tmp = out.with_extension("tmp");
    std::fs::copy(&binary, &tmp)?;
    std::fs::rename(&tmp, &out)?;
    eprintln!(
        "xtask: built Xen 4.22.0 ({}) in {:.0} s: {}",
        build.name(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    // The object tree is 100+ MiB and only the binary is used.
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}

/// Xen 4.22.0's public headers (`xen/include/public/` of the source), unpacked once as
/// `target/xenmsr-cache/xen-4.22-include/xen/*.h`, the layout the ABI cross-check's
/// `XENMSR_XEN_INCLUDE` wants.
pub fn xen422_public_headers() -> XtaskResult<PathBuf> {
    let out = cache_dir().join("xen-4.22-include");
    if out.join("xen").join("xen.h").is_file() {
        return Ok(out);
    }
    let tarball = xen422_tarball()?;
    apt_install(&["xz-utils"], Path::new("/usr/bin/xz"))?;
    let tmp = cache_dir().join("xen-4.22-include.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    run_checked_timeout(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg(format!("{XEN_422_DIR}/xen/include/public"))
            .current_dir(&tmp),
        Duration::from_secs(300),
    )?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    std::fs::rename(
        tmp.join(XEN_422_DIR)
            .join("xen")
            .join("include")
            .join("public"),
        out.join("xen"),
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(out)
}

/// Debian 13's main suite and its security updates, only their package indices (no
/// translations or AppStream data). Bookworm's `debian-archive-keyring` holds trixie's
/// signing keys.
const TRIXIE_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg target=Packages] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg target=Packages] http://deb.debian.org/debian-security trixie-security main
";

/// The private apt configuration's directory: sources list, lists, cache and state.
fn trixie_apt_dir() -> PathBuf {
    cache_dir().join("apt-trixie")
}

/// Downloads (once) the `.deb` of a Debian 13 package into the cache, with apt given its
/// own sources list, lists, cache, state and preferences under [`trixie_apt_dir`] through
/// `-o Dir::...` options: the system's sources, package lists and dpkg state are neither
/// read nor written (its `apt.conf.d`, e.g. a proxy, still applies).
fn download_trixie_deb(package: &str) -> XtaskResult<PathBuf> {
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    if let Some(found) = find_deb(&debs, package)? {
        return Ok(found);
    }
    // Trixie's indices are signed with keys bookworm's keyring carries.
    apt_install(
        &["debian-archive-keyring"],
        Path::new("/usr/share/keyrings/debian-archive-keyring.gpg"),
    )?;
    let apt = trixie_apt_dir();
    for sub in [
        "lists/partial",
        "cache/archives/partial",
        "sources.list.d",
        "preferences.d",
    ] {
        std::fs::create_dir_all(apt.join(sub))?;
    }
    std::fs::write(apt.join("sources.list"), TRIXIE_SOURCES)?;
    std::fs::write(apt.join("status"), "")?;
    let d = |sub: &str| apt.join(sub).display().to_string();
    let options = [
        format!("Dir::Etc::SourceList={}", d("sources.list")),
        format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
        format!("Dir::Etc::Preferences={}", d("preferences")),
        format!("Dir::Etc::PreferencesParts={}", d("preferences.d")),
        format!("Dir::State={}", apt.display()),
        format!("Dir::State::Lists={}", d("lists")),
        format!("Dir::State::Status={}", d("status")),
        format!("Dir::Cache={}", d("cache")),
        // The directories are root's; apt's `_apt` user could not write them.
        "APT::Sandbox::User=root".to_string(),
        "Acquire::http::Timeout=60".to_string(),
        "Acquire::Retries=3".to_string(),
    ];
    let apt_get = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        for o in &options {
            cmd.arg("-o").arg(o);
        }
        cmd.args(args);
        cmd
    };
    eprintln!(
        "xtask: downloading {package}.deb from Debian 13 (trixie) with a private apt \
         configuration in {}",
        apt.display()
    );
    run_checked_timeout(&mut apt_get(&["update", "-qq"]), Duration::from_secs(300))?;
    run_checked_timeout(
        apt_get(&["download", "-qq", package]).current_dir(&debs),
        Duration::from_secs(600),
    )?;
    find_deb(&debs, package)?
        .ok_or_else(|| format!("apt-get download {package}: no .deb appeared").into())
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
