//! Automatic, cached provisioning: QEMU, the Xen hypervisors and the `xl` path's dom0,
//! installed, downloaded or built once and kept in a cache directory.
//!
//! The cache is the caller's choice ([`Provisioner::new`]): `cargo xtask` keeps it under
//! the checkout's `target/xenmsr-cache/` (the repository's CI caches its downloads
//! there), the `xenmsr-runner` binary in a per-user directory
//! ([`Provisioner::user_cache_dir`]), so that every crate of a user shares one copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::RunnerResult;
use crate::process::run_checked_timeout;

/// The Debian package that carries the hypervisor binary.
pub const XEN_HYPERVISOR_PKG: &str = "xen-hypervisor-4.17-amd64";

/// Debian 13 ("trixie")'s hypervisor package, for Xen 4.20.
pub const XEN_420_HYPERVISOR_PKG: &str = "xen-hypervisor-4.20-amd64";

/// The Xen 4.22.0 hypervisor source tarball's file name (the hypervisor part of the
/// Xen Project's release, as the xenmsr project keeps it in `shared/xen/`).
pub const XEN_422_TARBALL: &str = "xen-4.22.0-hypervisor-src.tar.xz";
/// Its SHA-256: a different file is refused.
const XEN_422_SHA256: &str = "6173163ec16ea9223927a2f8e270c0d9170dd3c80b127eb876ab3d78bf9d7166";
/// The directory the tarball unpacks to.
const XEN_422_DIR: &str = "xen-4.22.0";

/// A Xen hypervisor a PV kernel boots under: a release, and how it was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xen {
    /// Xen 4.17, Debian 12's (the system's apt): the default, and the xl path's.
    V4_17,
    /// Xen 4.20, Debian 13's (fetched with a private apt configuration).
    V4_20,
    /// Xen 4.22.0, the newest release, built here from its source tarball with its
    /// defconfig (no Debian release packages it).
    V4_22,
    /// The same 4.22.0 source built with `CONFIG_DEBUG=y`: assertions on, and every
    /// hypercall's argument registers poisoned on return, as upstream's CI runs guests.
    V4_22Debug,
}

/// Every `--xen` value, for messages.
pub const XEN_CHOICES: &str = "4.17, 4.20, 4.22 or 4.22-debug";

impl Xen {
    /// The hypervisor `--xen` names (`4.17`, `4.20`, `4.22` or `4.22-debug`).
    pub fn parse(arg: &str) -> RunnerResult<Self> {
        match arg {
            "4.17" => Ok(Self::V4_17),
            "4.20" => Ok(Self::V4_20),
            "4.22" => Ok(Self::V4_22),
            "4.22-debug" => Ok(Self::V4_22Debug),
            other => Err(format!("--xen: unknown Xen {other} ({XEN_CHOICES})").into()),
        }
    }

    /// `major.minor` of the release (what `XENVER_version` answers).
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

    /// Where the binary comes from, for summaries.
    pub const fn origin(self) -> &'static str {
        match self {
            Self::V4_17 => "Debian 12 xen-hypervisor-4.17-amd64, release build",
            Self::V4_20 => "Debian 13 xen-hypervisor-4.20-amd64, release build",
            Self::V4_22 => "built from the 4.22.0 source, defconfig (release)",
            Self::V4_22Debug => "built from the 4.22.0 source, defconfig + CONFIG_DEBUG=y",
        }
    }
}

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

/// Finds, fetches or builds what a run needs, and caches it in one directory.
#[derive(Clone, Debug)]
pub struct Provisioner {
    /// Everything downloaded or built goes here.
    cache: PathBuf,
    /// The Xen 4.22.0 source tarball, or a directory holding it; `None` if the caller
    /// knows of none (then 4.22 cannot be built, and asking for it says how to fix that).
    xen_source: Option<PathBuf>,
    /// How the caller's messages start (`xtask`, `xenmsr-runner`).
    tool: &'static str,
}

impl Provisioner {
    /// A provisioner caching in `cache` (created on first use), knowing no Xen source,
    /// whose messages start with `xenmsr-runner:`.
    pub fn new(cache: impl Into<PathBuf>) -> Self {
        Self {
            cache: cache.into(),
            xen_source: None,
            tool: "xenmsr-runner",
        }
    }

    /// Where the Xen 4.22.0 source tarball is: the file itself, or a directory holding
    /// [`XEN_422_TARBALL`].
    pub fn with_xen_source(mut self, path: Option<PathBuf>) -> Self {
        self.xen_source = path;
        self
    }

    /// The name the messages start with.
    pub fn with_tool_name(mut self, tool: &'static str) -> Self {
        self.tool = tool;
        self
    }

    /// The per-user cache: `$XENMSR_CACHE` if set, else `$XDG_CACHE_HOME/xenmsr`, else
    /// `$HOME/.cache/xenmsr`.
    pub fn user_cache_dir() -> RunnerResult<PathBuf> {
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = non_empty("XENMSR_CACHE") {
            return Ok(PathBuf::from(dir));
        }
        if let Some(dir) = non_empty("XDG_CACHE_HOME") {
            return Ok(PathBuf::from(dir).join("xenmsr"));
        }
        match non_empty("HOME") {
            Some(home) => Ok(PathBuf::from(home).join(".cache").join("xenmsr")),
            None => Err("no cache directory: set XENMSR_CACHE (or XDG_CACHE_HOME or HOME)".into()),
        }
    }

    /// The cache directory (created if missing).
    pub fn cache_dir(&self) -> &Path {
        let _ = std::fs::create_dir_all(&self.cache);
        &self.cache
    }

    /// Where serial and console logs of runs are saved.
    pub fn logs_dir(&self) -> PathBuf {
        let dir = self.cache_dir().join("logs");
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    /// The name the messages start with.
    pub fn tool(&self) -> &'static str {
        self.tool
    }

    /// Prints one progress message on stderr, prefixed with the tool's name.
    pub fn say(&self, message: std::fmt::Arguments<'_>) {
        eprintln!("{}: {message}", self.tool);
    }

    /// Installs Debian packages whose marker file (`probe`) is missing. Only root can:
    /// anyone else is told what to install.
    pub fn apt_install(&self, packages: &[&str], probe: &Path) -> RunnerResult<()> {
        if probe.exists() {
            return Ok(());
        }
        if !running_as_root() {
            return Err(format!(
                "{} is missing: install {} (e.g. `sudo apt-get install {}`), or run as root \
                 to have it installed",
                probe.display(),
                packages.join(" "),
                packages.join(" ")
            )
            .into());
        }
        self.say(format_args!("installing {} (apt-get)", packages.join(" ")));
        apt_update_once()?;
        run_checked_timeout(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages),
            Duration::from_secs(1200),
        )
    }

    /// `qemu-system-x86_64`: the first on `PATH`, else Debian's, installed if missing.
    pub fn qemu(&self) -> RunnerResult<PathBuf> {
        if let Some(found) = find_on_path("qemu-system-x86_64") {
            return Ok(found);
        }
        let path = PathBuf::from("/usr/bin/qemu-system-x86_64");
        self.apt_install(&["qemu-system-x86"], &path)?;
        Ok(path)
    }

    /// The hypervisor binary QEMU boots, fetched or built, and cached, on first use.
    pub fn xen_binary(&self, xen: Xen) -> RunnerResult<PathBuf> {
        match xen {
            Xen::V4_17 => self.xen417_binary(),
            Xen::V4_20 => self.xen420_binary(),
            Xen::V4_22 => self.xen422_binary(XenBuild::Release),
            Xen::V4_22Debug => self.xen422_binary(XenBuild::Debug),
        }
    }

    /// Downloads (once) the `.deb` of a Debian package into the cache and returns its path.
    pub fn download_deb(&self, package: &str) -> RunnerResult<PathBuf> {
        let mut found = self.download_debs(&[package.to_string()])?;
        found
            .pop()
            .ok_or_else(|| format!("apt-get download {package}: no .deb appeared").into())
    }

    /// Downloads (once) the `.deb`s of several Debian packages into the cache with one
    /// `apt-get download`, and returns their paths in the order given.
    pub fn download_debs(&self, packages: &[String]) -> RunnerResult<Vec<PathBuf>> {
        let dir = self.cache_dir().join("debs");
        std::fs::create_dir_all(&dir)?;
        let mut missing = Vec::new();
        for package in packages {
            if find_deb(&dir, package)?.is_none() {
                missing.push(package.as_str());
            }
        }
        if !missing.is_empty() {
            self.say(format_args!("downloading {}", missing.join(" ")));
            apt_update_once()?;
            let mut cmd = Command::new("apt-get");
            cmd.args(["download", "-qq"]);
            if running_as_root() {
                // The cache is root's; without this apt warns that its `_apt` user
                // cannot write there and downloads unsandboxed anyway.
                cmd.args(["-o", "APT::Sandbox::User=root"]);
            }
            run_checked_timeout(
                cmd.args(&missing).current_dir(&dir),
                Duration::from_secs(600),
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

    /// The Xen 4.17 hypervisor as QEMU can boot it: the multiboot1 ELF, gunzipped from
    /// Debian's `xen-hypervisor-4.17-amd64` package (QEMU cannot load `xen.gz` itself).
    pub fn xen417_binary(&self) -> RunnerResult<PathBuf> {
        let out = self.cache_dir().join("xen-4.17");
        if out.exists() {
            return Ok(out);
        }
        let deb = self.download_deb(XEN_HYPERVISOR_PKG)?;
        self.unpack_hypervisor(&deb, "4.17", &out)?;
        Ok(out)
    }

    /// The Xen 4.20 hypervisor as QEMU can boot it, from Debian 13's
    /// `xen-hypervisor-4.20-amd64` package, which is fetched with a private apt
    /// configuration ([`Self::download_trixie_deb`]) and unpacked like 4.17's. Fails with
    /// what went wrong and where the apt state is if the package cannot be fetched.
    fn xen420_binary(&self) -> RunnerResult<PathBuf> {
        let out = self.cache_dir().join("xen-4.20");
        if out.exists() {
            return Ok(out);
        }
        let deb = self
            .download_trixie_deb(XEN_420_HYPERVISOR_PKG)
            .map_err(|e| {
                format!(
                    "cannot fetch Xen 4.20 ({XEN_420_HYPERVISOR_PKG} from Debian 13 \"trixie\" \
                 via deb.debian.org, private apt configuration in {}): {e}",
                    self.trixie_apt_dir().display()
                )
            })?;
        self.unpack_hypervisor(&deb, "4.20", &out)?;
        Ok(out)
    }

    /// Extracts `boot/xen-<version>*.gz` from a hypervisor package and writes it
    /// gunzipped to `out` (atomically, so an interrupted run leaves no half binary in the
    /// cache).
    fn unpack_hypervisor(&self, deb: &Path, version: &str, out: &Path) -> RunnerResult<()> {
        let unpack = self
            .cache_dir()
            .join(format!("xen-hypervisor-{version}-unpacked"));
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

    /// The Xen 4.22.0 source tarball: the one [`Self::with_xen_source`] named (a file, or
    /// a directory holding [`XEN_422_TARBALL`]).
    pub fn xen422_tarball(&self) -> RunnerResult<PathBuf> {
        let Some(given) = &self.xen_source else {
            return Err(format!(
                "Xen 4.22 is built from its source tarball ({XEN_422_TARBALL}, the Xen \
                 Project's RELEASE-4.22.0 hypervisor sources, sha256 {XEN_422_SHA256}), and \
                 none was given: set XENMSR_XEN_SRC (or pass --xen-src) to the tarball or to \
                 the directory holding it"
            )
            .into());
        };
        let path = if given.is_dir() {
            given.join(XEN_422_TARBALL)
        } else {
            given.clone()
        };
        if !path.is_file() {
            return Err(format!(
                "no Xen 4.22.0 source at {} (the tarball {XEN_422_TARBALL}; set \
                 XENMSR_XEN_SRC, or pass --xen-src, to its path or its directory)",
                path.display()
            )
            .into());
        }
        Ok(path)
    }

    /// The Xen 4.22.0 hypervisor as QEMU can boot it (`xen/xen`, the multiboot1 ELF),
    /// built once from the source tarball ([`Self::xen422_tarball`], checksum verified)
    /// with `defconfig`, plus `CONFIG_DEBUG=y` for [`XenBuild::Debug`], and cached as
    /// `xen-4.22` / `xen-4.22-debug`. Installs what the build needs (flex, bison, make;
    /// gcc and python3 are checked). About 2 minutes on 2 cores.
    pub fn xen422_binary(&self, build: XenBuild) -> RunnerResult<PathBuf> {
        let out = self.cache_dir().join(match build {
            XenBuild::Release => "xen-4.22",
            XenBuild::Debug => "xen-4.22-debug",
        });
        if out.exists() {
            return Ok(out);
        }
        let tarball = self.xen422_tarball()?;
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
            self.apt_install(&[package], Path::new(probe))?;
        }
        let work = self
            .cache_dir()
            .join(format!("xen-4.22-build-{}", build.name()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        self.say(format_args!(
            "building Xen 4.22.0 ({}) from {} in {} (about 2 minutes)",
            build.name(),
            tarball.display(),
            work.display()
        ));
        let start = Instant::now();
        run_checked_timeout(
            Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .current_dir(&work),
            Duration::from_secs(300),
        )?;
        let src = work.join(XEN_422_DIR);
        // The build's output (a thousand lines) goes to a log, shown in part if it fails.
        let log_path = self
            .cache_dir()
            .join(format!("xen-4.22-build-{}.log", build.name()));
        let log = std::fs::File::create(&log_path)?;
        let make = |args: &[&str]| -> RunnerResult<Command> {
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
        let run_make = |args: &[&str], timeout: u64| -> RunnerResult<()> {
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
        self.say(format_args!(
            "built Xen 4.22.0 ({}) in {:.0} s: {}",
            build.name(),
            start.elapsed().as_secs_f64(),
            out.display()
        ));
        // The object tree is 100+ MiB and only the binary is used.
        let _ = std::fs::remove_dir_all(&work);
        Ok(out)
    }

    /// Xen 4.22.0's public headers (`xen/include/public/` of the source), unpacked once as
    /// `<cache>/xen-4.22-include/xen/*.h`, the layout the xenmsr ABI cross-check's
    /// `XENMSR_XEN_INCLUDE` wants.
    pub fn xen422_public_headers(&self) -> RunnerResult<PathBuf> {
        let out = self.cache_dir().join("xen-4.22-include");
        if out.join("xen").join("xen.h").is_file() {
            return Ok(out);
        }
        let tarball = self.xen422_tarball()?;
        self.apt_install(&["xz-utils"], Path::new("/usr/bin/xz"))?;
        let tmp = self.cache_dir().join("xen-4.22-include.tmp");
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

    /// The private apt configuration's directory: sources list, lists, cache and state.
    fn trixie_apt_dir(&self) -> PathBuf {
        self.cache_dir().join("apt-trixie")
    }

    /// Downloads (once) the `.deb` of a Debian 13 package into the cache, with apt given
    /// its own sources list, lists, cache, state and preferences under
    /// [`Self::trixie_apt_dir`] through `-o Dir::...` options: the system's sources,
    /// package lists and dpkg state are neither read nor written (its `apt.conf.d`, e.g. a
    /// proxy, still applies).
    fn download_trixie_deb(&self, package: &str) -> RunnerResult<PathBuf> {
        let debs = self.cache_dir().join("debs");
        std::fs::create_dir_all(&debs)?;
        if let Some(found) = find_deb(&debs, package)? {
            return Ok(found);
        }
        // Trixie's indices are signed with keys bookworm's keyring carries.
        self.apt_install(
            &["debian-archive-keyring"],
            Path::new("/usr/share/keyrings/debian-archive-keyring.gpg"),
        )?;
        let apt = self.trixie_apt_dir();
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
        let mut options = vec![
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            format!("Dir::Etc::Preferences={}", d("preferences")),
            format!("Dir::Etc::PreferencesParts={}", d("preferences.d")),
            format!("Dir::State={}", apt.display()),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::State::Status={}", d("status")),
            format!("Dir::Cache={}", d("cache")),
            "Acquire::http::Timeout=60".to_string(),
            "Acquire::Retries=3".to_string(),
        ];
        if running_as_root() {
            // The directories are root's; apt's `_apt` user could not write them.
            options.push("APT::Sandbox::User=root".to_string());
        }
        let apt_get = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            for o in &options {
                cmd.arg("-o").arg(o);
            }
            cmd.args(args);
            cmd
        };
        self.say(format_args!(
            "downloading {package}.deb from Debian 13 (trixie) with a private apt \
             configuration in {}",
            apt.display()
        ));
        run_checked_timeout(&mut apt_get(&["update", "-qq"]), Duration::from_secs(300))?;
        run_checked_timeout(
            apt_get(&["download", "-qq", package]).current_dir(&debs),
            Duration::from_secs(600),
        )?;
        find_deb(&debs, package)?
            .ok_or_else(|| format!("apt-get download {package}: no .deb appeared").into())
    }
}

/// Debian 13's main suite and its security updates, only their package indices (no
/// translations or AppStream data). Bookworm's `debian-archive-keyring` holds trixie's
/// signing keys.
const TRIXIE_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg target=Packages] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg target=Packages] http://deb.debian.org/debian-security trixie-security main
";

/// Runs `apt-get update` once per process, before the first install or download. Only
/// root can; anyone else downloads with the package lists the system has.
fn apt_update_once() -> RunnerResult<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    if !running_as_root() {
        return Ok(());
    }
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

/// Whether this process runs as root (who may install packages). Asked of `id -u`, so
/// that the crate needs neither `libc` nor `unsafe`; if that fails, the answer is "no"
/// and an install is only suggested, never attempted.
fn running_as_root() -> bool {
    use std::sync::OnceLock;
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0")
    })
}

/// The first executable called `name` in `$PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn find_deb(dir: &Path, package: &str) -> RunnerResult<Option<PathBuf>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_names_round_trip() {
        for xen in [Xen::V4_17, Xen::V4_20, Xen::V4_22, Xen::V4_22Debug] {
            assert_eq!(Xen::parse(xen.label()).unwrap(), xen);
        }
        assert!(Xen::parse("4.18").is_err());
        assert!(Xen::V4_22Debug.debug() && !Xen::V4_22.debug());
        assert_eq!(Xen::V4_22Debug.version(), "4.22");
    }

    #[test]
    fn a_missing_xen_source_says_how_to_give_one() {
        let error = Provisioner::new("/nonexistent")
            .xen422_tarball()
            .unwrap_err()
            .to_string();
        assert!(error.contains("XENMSR_XEN_SRC"), "{error}");
        assert!(error.contains("--xen-src"), "{error}");
    }

    #[test]
    fn a_xen_source_directory_is_searched_for_the_tarball() {
        let dir = std::env::temp_dir().join(format!("xenmsr-runner-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(XEN_422_TARBALL), b"").unwrap();
        let found = Provisioner::new("/nonexistent")
            .with_xen_source(Some(dir.clone()))
            .xen422_tarball();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found.unwrap(), dir.join(XEN_422_TARBALL));
    }
}
