//! The dom0 of the `xl` path: Debian's Linux kernel plus an initramfs with the Xen
//! toolstack, built from Debian bookworm packages without debootstrap.
//!
//! The initramfs has two parts, concatenated (Linux unpacks every archive it finds):
//! - a large part, cached in the provisioner's `xl-dom0/` and rebuilt only when its
//!   inputs change (the `.deb` set or the generated `/init`): busybox, the Xen modules,
//!   `xl`, `xenstored`, `xenconsoled`, `xen-init-dom0` and the shared-library closure
//!   of those binaries, computed from their `DT_NEEDED` entries;
//! - a small per-run part: the domU kernel, its `xl` config and the run's settings.
//!
//! Both are plain `newc` cpio archives written here, so no `cpio` tool is needed. They
//! are not compressed: the large part is about 8 MB, and copying it costs less under
//! QEMU TCG than decompressing it would.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::RunnerResult;
use crate::process::{output_timeout, run_checked_timeout};
use crate::provision::Provisioner;

/// Bump when the layout of the cached initramfs changes in a way the key does not see.
const FORMAT_VERSION: u32 = 1;

/// The Xen toolstack package; its binaries live in [`XEN_BIN_DIR`].
const XEN_UTILS_PKG: &str = "xen-utils-4.17";
/// Where `xen-utils-4.17` installs its binaries.
const XEN_BIN_DIR: &str = "usr/lib/xen-4.17/bin";
/// The toolstack binaries the dom0 runs (`xenconsole` and `libxl-save-helper` are small
/// and make `xl console` and the libxl helpers work for interactive debugging).
const XEN_BINARIES: &[&str] = &[
    "xl",
    "xenstored",
    "xenconsoled",
    "xen-init-dom0",
    "xenconsole",
    "libxl-save-helper",
];
/// The Xen kernel modules a toolstack dom0 needs (dependencies are added from `.modinfo`).
const XEN_MODULES: &[&str] = &[
    "xen_evtchn",
    "xen_privcmd",
    "xenfs",
    "xen_gntdev",
    "xen_gntalloc",
];
/// Libraries loaded with `dlopen`, so not in any `DT_NEEDED`: glibc loads libgcc_s for
/// `pthread_cancel`, which xl's child handling uses (without it xl aborts).
const DLOPEN_LIBS: &[&str] = &["libgcc_s.so.1"];
/// Where shared libraries are looked up in the unpacked packages.
const LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
];
/// Where the initramfs puts the libraries.
const INITRAMFS_LIB_DIR: &str = "lib/x86_64-linux-gnu";

/// The prefix of every line the dom0 `/init` prints for the host to parse.
pub const MARK: &str = "XENMSR-XL:";
/// Prefix of each line of the domU console log, as printed by the dom0.
pub const DOMU_LINE: &str = "XENMSR-DOMU| ";
/// Prefix of each line of xl's own log of the guest (shutdown reason etc.).
pub const XL_LOG_LINE: &str = "XENMSR-XLLOG| ";
/// Prefix of diagnostic lines (dmesg, daemon logs) printed when a dom0 step fails.
pub const DIAG_LINE: &str = "XENMSR-DIAG| ";
/// What the host types on the dom0 console to make it stop waiting for the domU.
pub const STOP_LINE: &str = "xenmsr-stop-waiting";
/// The domU's name in `xl`; its console log is `guest-<name>.log`.
pub const GUEST_NAME: &str = "xenmsr-domu";

/// The timeout of each `dpkg-deb`/`tar` call.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything QEMU needs for the dom0 of the `xl` path, except the per-run part.
#[derive(Debug, Clone)]
pub struct Dom0Image {
    /// Debian's kernel, which boots as a PV dom0.
    pub vmlinuz: PathBuf,
    /// The large, cached initramfs part (an uncompressed newc cpio).
    pub base_cpio: PathBuf,
}

/// What goes into the small per-run part of the initramfs.
#[derive(Debug, Clone)]
pub struct GuestSpec<'a> {
    /// The domU kernel ELF.
    pub kernel: &'a Path,
    /// The domU command line (`extra=` in the xl config).
    pub args: &'a str,
    /// MiB of memory for the domU.
    pub memory_mib: u32,
    /// The domU's vCPUs (`vcpus=` in the xl config).
    pub vcpus: u32,
    /// How many times (at least 0.2 s apart) the dom0 polls `xl list` for the domU's
    /// end before it gives up on its own (the host normally stops it first).
    pub max_polls: u64,
    /// The lifecycle the dom0 drives the domU through, if any.
    pub lifecycle: Option<Lifecycle>,
}

/// What the dom0 does to the domU once it prints `lifecycle: ready`, in this order:
/// `cancelled` checkpoints (`xl save -c`: the guest's suspend is cancelled), `saves`
/// rounds of `xl save` + `xl restore`, `migrations` rounds of `xl migrate` to localhost,
/// `vcpu_sets` rounds of `xl vcpu-set` down to 1 vCPU and back to 2, each after a random
/// 0.5-2.5 s of the guest's stress; then `xl shutdown`. Each step waits for the guest's
/// line that says it resumed (or its vCPU went and came back) before the next. With
/// `cancelled > 0`, give `saves` or `migrations` too: xl's monitor exits at the
/// checkpoint's suspend, and only a restore or a migration starts another one (without
/// one, nothing destroys the domain at its power-off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    /// `xl save` + `xl restore` rounds.
    pub saves: u32,
    /// `xl save -c` rounds.
    pub cancelled: u32,
    /// `xl migrate` rounds.
    pub migrations: u32,
    /// `xl vcpu-set 1` / `xl vcpu-set 2` rounds.
    pub vcpu_sets: u32,
}

/// Builds (or finds in the cache) the dom0 kernel and the large initramfs part.
pub fn dom0_image(prov: &Provisioner) -> RunnerResult<Dom0Image> {
    let dir = prov.cache_dir().join("xl-dom0");
    std::fs::create_dir_all(&dir)?;
    let packages = resolve_packages(prov, &dir)?;
    let init = init_script();
    let mut key = Fnv::new();
    key.add(&FORMAT_VERSION.to_le_bytes());
    key.add(init.as_bytes());
    for name in XEN_BINARIES.iter().chain(XEN_MODULES).chain(DLOPEN_LIBS) {
        key.add(name.as_bytes());
    }
    for deb in packages.user.iter().chain([&packages.kernel]) {
        key.add(deb.file_name().unwrap_or_default().as_encoded_bytes());
        key.add(&[0]);
    }
    let key = key.finish();
    let image = Dom0Image {
        vmlinuz: dir.join(format!("vmlinuz-{key:016x}")),
        base_cpio: dir.join(format!("dom0-{key:016x}.cpio")),
    };
    if image.vmlinuz.exists() && image.base_cpio.exists() {
        return Ok(image);
    }
    let start = Instant::now();
    prov.say(format_args!("building the dom0 initramfs (xl path)"));
    build_image(&dir, &packages, &init, &image)?;
    // Drop the images of older keys.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let ours = path == image.vmlinuz || path == image.base_cpio;
        if !ours && (name.starts_with("vmlinuz-") || name.starts_with("dom0-")) {
            let _ = std::fs::remove_file(&path);
        }
    }
    prov.say(format_args!(
        "dom0 initramfs ready ({} KiB) in {:.1} s",
        std::fs::metadata(&image.base_cpio)?.len() / 1024,
        start.elapsed().as_secs_f64()
    ));
    Ok(image)
}

/// The small per-run initramfs part: `/guest/kernel`, `/guest/guest.cfg`, `/guest/settings`.
pub fn guest_cpio(spec: &GuestSpec<'_>) -> RunnerResult<Vec<u8>> {
    let kernel = std::fs::read(spec.kernel)
        .map_err(|e| format!("reading the domU kernel {}: {e}", spec.kernel.display()))?;
    if !kernel.starts_with(b"\x7fELF") {
        return Err(format!("{} is not an ELF file", spec.kernel.display()).into());
    }
    if spec
        .args
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "domU arguments may not contain '\"', '\\' or control characters: {:?}",
            spec.args
        )
        .into());
    }
    let cfg = format!(
        "# generated by xenmsr-runner (xl path)\n\
         name = \"{GUEST_NAME}\"\n\
         type = \"pv\"\n\
         vcpus = {vcpus}\n\
         memory = {mem}\n\
         kernel = \"/guest/kernel\"\n\
         extra = \"{args}\"\n\
         on_poweroff = \"destroy\"\n\
         on_reboot = \"destroy\"\n\
         on_watchdog = \"destroy\"\n\
         on_crash = \"preserve\"\n",
        mem = spec.memory_mib,
        vcpus = spec.vcpus,
        args = spec.args,
    );
    let mut settings = format!("MAX_POLLS={}\n", spec.max_polls.max(1));
    if let Some(l) = spec.lifecycle {
        settings.push_str(&format!(
            "LIFECYCLE=1\nLC_SAVES={}\nLC_CANCELLED={}\nLC_MIGRATIONS={}\nLC_VCPU_SETS={}\n",
            l.saves, l.cancelled, l.migrations, l.vcpu_sets
        ));
    }
    let mut cpio = Cpio::default();
    cpio.file("guest/kernel", 0o644, &kernel);
    cpio.file("guest/guest.cfg", 0o644, cfg.as_bytes());
    cpio.file("guest/settings", 0o644, settings.as_bytes());
    Ok(cpio.finish())
}

// ---------------------------------------------------------------------------------------
// Packages

/// The `.deb`s the dom0 is built from.
#[derive(Debug)]
struct Packages {
    /// `linux-image-6.1.0-NN-amd64`.
    kernel: PathBuf,
    /// busybox-static, xen-utils-4.17 and the library packages it needs, sorted.
    user: Vec<PathBuf>,
}

/// Finds the package set: the cached list if its `.deb`s are all still there, else
/// resolved (and downloaded) from Debian's registry.
fn resolve_packages(prov: &Provisioner, dir: &Path) -> RunnerResult<Packages> {
    let list = dir.join("packages.list");
    if let Ok(text) = std::fs::read_to_string(&list) {
        let mut paths: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
        if paths.len() > 2 && paths.iter().all(|p| p.exists()) {
            let kernel = paths.remove(0);
            return Ok(Packages {
                kernel,
                user: paths,
            });
        }
    }
    let start = Instant::now();
    // Debian's kernel: the current versioned package behind the `linux-image-amd64`
    // metapackage.
    let meta = prov.download_deb("linux-image-amd64")?;
    let kernel_pkg = deb_depends(&meta)?
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or("linux-image-amd64 does not depend on a linux-image-* package")?;
    let kernel = prov.download_debs(&[kernel_pkg])?.remove(0);

    // User space: busybox-static, xen-utils-4.17, and the closure of its Depends
    // restricted to shared-library packages (Debian names those lib*, plus zlib1g).
    // Which files of these are needed is decided later from DT_NEEDED.
    let mut wanted: BTreeSet<String> = ["busybox-static", XEN_UTILS_PKG]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut done: BTreeMap<String, PathBuf> = BTreeMap::new();
    while wanted.len() > done.len() {
        let batch: Vec<String> = wanted
            .iter()
            .filter(|p| !done.contains_key(*p))
            .cloned()
            .collect();
        for (name, deb) in batch.iter().zip(prov.download_debs(&batch)?) {
            if name != "busybox-static" {
                for dep in deb_depends(&deb)? {
                    if dep.starts_with("lib") || dep == "zlib1g" {
                        wanted.insert(dep);
                    }
                }
            }
            done.insert(name.clone(), deb);
        }
    }
    let user: Vec<PathBuf> = done.into_values().collect();
    let mut text = format!("{}\n", kernel.display());
    for p in &user {
        text.push_str(&format!("{}\n", p.display()));
    }
    std::fs::write(&list, text)?;
    prov.say(format_args!(
        "xl path: {} packages resolved in {:.1} s",
        user.len() + 1,
        start.elapsed().as_secs_f64()
    ));
    Ok(Packages { kernel, user })
}

/// The package names in a `.deb`'s `Pre-Depends` and `Depends` (first alternative of
/// each, without versions or architecture qualifiers).
fn deb_depends(deb: &Path) -> RunnerResult<Vec<String>> {
    let mut out = Vec::new();
    for field in ["Pre-Depends", "Depends"] {
        let text = output_timeout(
            Command::new("dpkg-deb").arg("--field").arg(deb).arg(field),
            TOOL_TIMEOUT,
        )?;
        for item in String::from_utf8_lossy(&text).split(',') {
            let first = item.split('|').next().unwrap_or_default();
            let name = first
                .split(['(', ' ', '\n'])
                .find(|s| !s.is_empty())
                .unwrap_or_default();
            let name = name.split(':').next().unwrap_or_default();
            if !name.is_empty() {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Building the image

fn build_image(dir: &Path, packages: &Packages, init: &str, image: &Dom0Image) -> RunnerResult<()> {
    let stage = dir.join(format!("stage-{}", std::process::id()));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let user_root = stage.join("user");
    let kernel_root = stage.join("kernel");
    std::fs::create_dir_all(&user_root)?;
    std::fs::create_dir_all(&kernel_root)?;
    for deb in &packages.user {
        run_checked_timeout(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&user_root),
            TOOL_TIMEOUT,
        )?;
    }

    let mut cpio = Cpio::default();
    for d in [
        "bin", "sbin", "dev", "proc", "sys", "run", "tmp", "var", "root", "etc",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    cpio.file("etc/group", 0o644, b"root:x:0:\n");
    cpio.file("etc/xen/xl.conf", 0o644, b"# defaults\n");

    // busybox: its applets are linked by /init (`busybox --install -s`).
    let busybox = std::fs::read(user_root.join("bin/busybox"))
        .map_err(|e| format!("busybox-static has no bin/busybox: {e}"))?;
    cpio.file("bin/busybox", 0o755, &busybox);

    // The toolstack binaries and their library closure.
    let mut needed: BTreeSet<String> = BTreeSet::new();
    let mut interp: Option<String> = None;
    for bin in XEN_BINARIES {
        let rel = format!("{XEN_BIN_DIR}/{bin}");
        let data = std::fs::read(user_root.join(&rel))
            .map_err(|e| format!("{XEN_UTILS_PKG} has no {rel}: {e}"))?;
        let elf = Elf::parse(&data).map_err(|e| format!("{rel}: {e}"))?;
        needed.extend(elf.needed()?);
        if let Some(i) = elf.interp() {
            interp = Some(i);
        }
        cpio.file(&rel, 0o755, &data);
        cpio.symlink(&format!("usr/sbin/{bin}"), &format!("/{rel}"));
    }
    let interp = interp.ok_or("the toolstack binaries have no ELF interpreter")?;
    needed.extend(DLOPEN_LIBS.iter().map(|s| s.to_string()));
    let mut queue: Vec<String> = needed.iter().cloned().collect();
    let mut libs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    while let Some(soname) = queue.pop() {
        if libs.contains_key(&soname) {
            continue;
        }
        let data = find_library(&user_root, &soname)?;
        let elf = Elf::parse(&data).map_err(|e| format!("{soname}: {e}"))?;
        for dep in elf.needed()? {
            if !libs.contains_key(&dep) {
                queue.push(dep);
            }
        }
        libs.insert(soname, data);
    }
    for (soname, data) in &libs {
        cpio.file(&format!("{INITRAMFS_LIB_DIR}/{soname}"), 0o755, data);
    }
    let interp_rel = interp.trim_start_matches('/');
    let interp_data = std::fs::read(resolve_in_root(&user_root, Path::new(interp_rel))?)?;
    cpio.file(interp_rel, 0o755, &interp_data);

    // The kernel and its Xen modules.
    let modules = extract_kernel(&packages.kernel, &kernel_root)?;
    let mut order = String::new();
    for (name, data) in &modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, data);
        order.push_str(&format!("{name}\n"));
    }
    cpio.file("lib/modules/order", 0o644, order.as_bytes());
    let vmlinuz = find_vmlinuz(&kernel_root)?;

    let data = cpio.finish();
    let tmp = image
        .base_cpio
        .with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, &image.base_cpio)?;
    let tmp = image
        .vmlinuz
        .with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(&vmlinuz, &tmp)?;
    std::fs::rename(&tmp, &image.vmlinuz)?;
    std::fs::remove_dir_all(&stage)?;
    Ok(())
}

/// The contents of the library `soname` found in the unpacked packages.
fn find_library(root: &Path, soname: &str) -> RunnerResult<Vec<u8>> {
    for dir in LIB_DIRS {
        let candidate = Path::new(dir).join(soname);
        if std::fs::symlink_metadata(root.join(&candidate)).is_ok() {
            let real = resolve_in_root(root, &candidate)?;
            return Ok(std::fs::read(real)?);
        }
    }
    Err(format!(
        "shared library {soname} is in none of the unpacked packages \
         (add the package that ships it to the xl path's closure)"
    )
    .into())
}

/// Follows symlinks of `rel` inside `root` (absolute targets are taken relative to it).
fn resolve_in_root(root: &Path, rel: &Path) -> RunnerResult<PathBuf> {
    let mut rel = rel.to_path_buf();
    for _ in 0..32 {
        let full = root.join(&rel);
        let meta =
            std::fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        if !meta.file_type().is_symlink() {
            return Ok(full);
        }
        let target = std::fs::read_link(&full)?;
        rel = if target.is_absolute() {
            target.strip_prefix("/")?.to_path_buf()
        } else {
            rel.parent().unwrap_or(Path::new("")).join(target)
        };
    }
    Err(format!("too many symlinks at {}", root.join(rel).display()).into())
}

/// Extracts `boot/vmlinuz-*` and the Xen modules with their dependencies from the
/// kernel package into `root`, and returns the modules in load order.
fn extract_kernel(deb: &Path, root: &Path) -> RunnerResult<Vec<(String, Vec<u8>)>> {
    // Module name (with '_') -> path in the package, from the package listing.
    let listing = output_timeout(
        Command::new("dpkg-deb").arg("--contents").arg(deb),
        TOOL_TIMEOUT,
    )?;
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    for line in String::from_utf8_lossy(&listing).lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        if let Some(file) = path.strip_suffix(".ko").and_then(|p| p.rsplit('/').next()) {
            paths.insert(file.replace('-', "_"), path.to_string());
        }
    }
    let mut patterns = vec!["./boot/vmlinuz-*".to_string()];
    let mut loaded: BTreeMap<String, (Vec<String>, Vec<u8>)> = BTreeMap::new();
    let mut pending: Vec<String> = XEN_MODULES.iter().map(|s| s.to_string()).collect();
    while !pending.is_empty() {
        for name in &pending {
            let path = paths
                .get(name)
                .ok_or_else(|| format!("module {name} is not in {}", deb.display()))?;
            patterns.push(path.clone());
        }
        extract_from_deb(deb, root, &patterns)?;
        patterns.clear();
        let mut next = Vec::new();
        for name in pending.drain(..) {
            let data = std::fs::read(root.join(&paths[&name]))?;
            let deps = Elf::parse(&data)
                .map_err(|e| format!("module {name}: {e}"))?
                .modinfo_depends()?;
            for dep in &deps {
                if !loaded.contains_key(dep) && !next.contains(dep) {
                    next.push(dep.clone());
                }
            }
            loaded.insert(name, (deps, data));
        }
        next.retain(|n| !loaded.contains_key(n));
        pending = next;
    }
    // Dependencies first, then the wanted order.
    let mut order: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        loaded: &BTreeMap<String, (Vec<String>, Vec<u8>)>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> RunnerResult<()> {
        if depth > 64 {
            return Err(format!("module dependency cycle at {name}").into());
        }
        if order.iter().any(|o| o == name) {
            return Ok(());
        }
        for dep in &loaded[name].0 {
            visit(dep, loaded, order, depth + 1)?;
        }
        order.push(name.to_string());
        Ok(())
    }
    for name in XEN_MODULES {
        visit(name, &loaded, &mut order, 0)?;
    }
    Ok(order
        .into_iter()
        .map(|n| {
            let data = loaded[&n].1.clone();
            (n, data)
        })
        .collect())
}

fn find_vmlinuz(root: &Path) -> RunnerResult<PathBuf> {
    std::fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .ok_or_else(|| "the kernel package has no boot/vmlinuz-*".into())
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x -C ROOT --wildcards PATTERNS...`, bounded.
fn extract_from_deb(deb: &Path, root: &Path, patterns: &[String]) -> RunnerResult<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("dpkg-deb: {e}"))?;
    let stdout = dpkg.stdout.take().ok_or("dpkg-deb: no stdout")?;
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(root)
        .arg("--wildcards")
        .args(patterns)
        .stdin(stdout)
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let start = Instant::now();
    let (mut dpkg_status, mut tar_status) = (None, None);
    while dpkg_status.is_none() || tar_status.is_none() {
        if dpkg_status.is_none() {
            dpkg_status = dpkg.try_wait()?;
        }
        if tar_status.is_none() {
            tar_status = tar.try_wait()?;
        }
        if start.elapsed() > TOOL_TIMEOUT {
            let _ = dpkg.kill();
            let _ = tar.kill();
            let _ = dpkg.wait();
            let _ = tar.wait();
            return Err(format!("extracting {} timed out", deb.display()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (dpkg_status, tar_status) = (
        dpkg_status.unwrap_or_default(),
        tar_status.unwrap_or_default(),
    );
    if !dpkg_status.success() || !tar_status.success() {
        return Err(format!(
            "extracting {patterns:?} from {} failed (dpkg-deb: {dpkg_status}, tar: {tar_status})",
            deb.display()
        )
        .into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The dom0 /init

/// The dom0's `/init` (busybox sh). It reads the per-run part from `/guest`.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
# dom0 /init of the xenmsr xl path, generated by xenmsr-runner (xtask/runner/src/initramfs.rs).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/sbin:/usr/lib/xen-4.17/bin
export LD_LIBRARY_PATH=/{INITRAMFS_LIB_DIR}
export HOME=/root

say() {{ echo "{MARK} $*"; }}
diag() {{ sed 's/^/{DIAG_LINE}/'; }}
fail() {{
    say "FAIL $*"
    dmesg | tail -n 40 | diag
    for f in /var/log/xen/*.log /var/log/xenstored*.log; do
        [ -f "$f" ] && {{ echo "== $f"; tail -n 40 "$f"; }} | diag
    done
    say "done"
    sync
    busybox poweroff -f
    sleep 30
}}
now() {{ cut -d. -f1 /proc/uptime; }}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var
mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen/console /var/lib/xen /var/lib/xenstored
ln -s /run /var/run
ln -s /run/lock /var/lock
say "dom0 up at $(now) s"

# /lib/modules/order lists the Xen modules, dependencies first
while read -r m; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done < /lib/modules/order
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
grep -q control_d /proc/xen/capabilities || fail "/proc/xen/capabilities has no control_d"

xenstored --pid-file=/run/xenstored.pid || fail "xenstored"
i=0
until [ -S /run/xenstored/socket ]; do
    i=$((i + 1)); [ $i -gt 200 ] && fail "xenstored socket did not appear"
    usleep 50000
done
xen-init-dom0 || fail "xen-init-dom0"
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid \
    || fail "xenconsoled"
say "toolstack up at $(now) s"

. /guest/settings
cp /guest/guest.cfg /run/xen/guest.cfg
log=/var/log/xen/console/guest-{GUEST_NAME}.log
# The domU's console log is streamed while it runs (complete lines only), so the host
# sees it live and keeps what was printed even if its own deadline strikes first.
shown=0
stream() {{
    [ -f "$log" ] || return 0
    n=$(wc -l < "$log")
    if [ "$n" -gt "$shown" ]; then
        sed -n "$((shown + 1)),${{n}}p" "$log" | sed 's/^/{DOMU_LINE}/'
        shown=$n
    fi
}}
# After `xl migrate` the new domain's console goes to a log named after its temporary
# name until xenconsoled reopens its logs (SIGHUP): streamed once, then removed.
incoming_log=/var/log/xen/console/guest-{GUEST_NAME}--incoming.log
stream_incoming() {{
    [ -f "$incoming_log" ] || return 0
    sed 's/^/{DOMU_LINE}/' "$incoming_log"
    rm -f "$incoming_log"
}}

# The lifecycle driver (LIFECYCLE=1 in /guest/settings): one step per poll, each xl
# command synchronous.
lc_phase=ready
lc_i=0
lc_saw() {{ cat "$log" /tmp/lc-incoming.log 2>/dev/null | grep -c "$1"; }}
lc_pause() {{ usleep $(( (RANDOM % 2000 + 500) * 1000 )); }}
lc_run() {{
    what=$1; shift
    say "lifecycle: $what at $(now) s"
    t0=$(now)
    "$@" > /tmp/lc.log 2>&1 || {{ diag < /tmp/lc.log; fail "$what"; }}
    say "lifecycle: $what done in $(( $(now) - t0 )) s"
}}
lifecycle_step() {{
    case $lc_phase in
    ready)
        [ "$(lc_saw 'lifecycle: ready')" -ge 1 ] || return 0
        lc_phase=cancel; lc_i=0 ;;
    # The cancelled saves come first: xl's monitor of a domain exits when the domain
    # suspends, also for `xl save -c`, which then leaves the domain running without one
    # (nobody would carry out its on_poweroff); each `xl restore` starts a new monitor.
    cancel)
        [ "$(lc_saw 'lifecycle: resumed (cancelled)')" -ge "$lc_i" ] || return 0
        if [ "$lc_i" -ge "$LC_CANCELLED" ]; then lc_phase=save; lc_i=0; return 0; fi
        lc_pause
        lc_i=$((lc_i + 1))
        lc_run "xl save -c #$lc_i" xl save -c {GUEST_NAME} /tmp/guest.chk
        rm -f /tmp/guest.chk ;;
    save)
        [ "$(lc_saw 'lifecycle: resumed (new domain)')" -ge "$lc_i" ] || return 0
        if [ "$lc_i" -ge "$LC_SAVES" ]; then lc_phase=migrate; lc_i=0; return 0; fi
        lc_pause
        lc_i=$((lc_i + 1))
        lc_run "xl save #$lc_i" xl save {GUEST_NAME} /tmp/guest.chk
        lc_run "xl restore #$lc_i" xl restore /tmp/guest.chk
        rm -f /tmp/guest.chk ;;
    migrate)
        [ "$(lc_saw 'lifecycle: resumed (new domain)')" -ge $((LC_SAVES + lc_i)) ] || return 0
        if [ "$lc_i" -ge "$LC_MIGRATIONS" ]; then lc_phase=vcpu_off; lc_i=0; return 0; fi
        lc_pause
        lc_i=$((lc_i + 1))
        stream
        lc_run "xl migrate #$lc_i" xl migrate -s '' {GUEST_NAME} 'xl migrate-receive'
        stream
        kill -HUP "$(cat /run/xenconsoled.pid)"
        usleep 300000
        [ -f "$incoming_log" ] && cat "$incoming_log" >> /tmp/lc-incoming.log
        stream_incoming ;;
    vcpu_off)
        [ "$(lc_saw 'lifecycle: vCPU 1 online')" -ge "$lc_i" ] || return 0
        if [ "$lc_i" -ge "$LC_VCPU_SETS" ]; then lc_phase=shutdown; return 0; fi
        lc_pause
        lc_i=$((lc_i + 1))
        lc_run "xl vcpu-set 1 #$lc_i" xl vcpu-set {GUEST_NAME} 1
        lc_phase=vcpu_on ;;
    vcpu_on)
        [ "$(lc_saw 'lifecycle: vCPU 1 offline')" -ge "$lc_i" ] || return 0
        lc_pause
        lc_run "xl vcpu-set 2 #$lc_i" xl vcpu-set {GUEST_NAME} 2
        lc_phase=vcpu_off ;;
    shutdown)
        lc_run "xl shutdown" xl shutdown {GUEST_NAME}
        lc_phase=ended; lc_i=0 ;;
    ended)
        lc_i=$((lc_i + 1))
        [ $((lc_i % 25)) = 0 ] && xl list 2>&1 | diag ;;
    esac
}}
say "===== domU console begin ====="
xl create /run/xen/guest.cfg > /tmp/xl-create.log 2>&1 || {{
    diag < /tmp/xl-create.log
    fail "xl create"
}}
say "domU created at $(now) s"

# Bounded twice: by the host, which types STOP_LINE on the console (dom0's stdin)
# when its deadline nears (the dom0's own clock is not trusted under TCG), and by
# MAX_POLLS as a safety net.
state=timeout
polls=0
while [ "$polls" -lt "$MAX_POLLS" ]; do
    polls=$((polls + 1))
    stream
    line=$(xl list {GUEST_NAME} 2>/dev/null | tail -n 1)
    if [ -z "$line" ]; then state=gone; break; fi
    flags=$(echo "$line" | awk '{{print $5}}')
    case "$flags" in
        *c*) state=crashed; break ;;
    esac
    if read -t 0.2 -r cmd; then
        case "$cmd" in *{STOP_LINE}*) state=stopped; break ;; esac
    fi
    [ "${{LIFECYCLE:-0}}" = 1 ] && lifecycle_step
done
say "domU ended at $(now) s"
# let xenconsoled write out what the ring still held, then the rest (with a last
# unterminated line)
usleep 500000
stream
[ -f "$log" ] && sed -n "$((shown + 1)),\$p" "$log" | sed 's/^/{DOMU_LINE}/'
say "===== domU console end ====="
say "guest-state $state"
if [ "$state" != gone ]; then
    xl dmesg 2>/dev/null | tail -n 30 | diag
    xl destroy {GUEST_NAME} > /dev/null 2>&1
fi
for f in /var/log/xen/xl-{GUEST_NAME}.log /var/log/xen/xl-{GUEST_NAME}--incoming.log; do
    [ -f "$f" ] && sed 's/^/{XL_LOG_LINE}/' "$f"
done
say "done"
sync
busybox poweroff -f
sleep 30
"#
    )
}

// ---------------------------------------------------------------------------------------
// newc cpio writer

/// An in-memory `newc` cpio archive (what Linux unpacks as an initramfs).
#[derive(Debug, Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so the archive is reproducible
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn parents(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn dir(&mut self, path: &str) {
        if self.dirs.contains(path) {
            return;
        }
        self.parents(path);
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, path: &str, perm: u32, body: &[u8]) {
        self.parents(path);
        self.entry(path, 0o100000 | perm, (0, 0), body);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, 0o120777, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, 0o020000 | perm, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

// ---------------------------------------------------------------------------------------
// Minimal ELF64 reader: DT_NEEDED, PT_INTERP, and `.modinfo` of kernel modules

struct Elf<'a> {
    data: &'a [u8],
    sections: Vec<Section>,
}

#[derive(Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
}

impl<'a> Elf<'a> {
    fn parse(data: &'a [u8]) -> RunnerResult<Self> {
        if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
            return Err("not a little-endian ELF64 file".into());
        }
        let shoff = u64_at(data, 0x28)? as usize;
        let shentsize = u16_at(data, 0x3a)? as usize;
        let shnum = u16_at(data, 0x3c)? as usize;
        let mut sections = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let at = shoff + i * shentsize;
            sections.push(Section {
                name: u32_at(data, at)?,
                kind: u32_at(data, at + 4)?,
                offset: u64_at(data, at + 0x18)? as usize,
                size: u64_at(data, at + 0x20)? as usize,
                link: u32_at(data, at + 0x28)?,
            });
        }
        Ok(Elf { data, sections })
    }

    fn bytes(&self, s: &Section) -> RunnerResult<&'a [u8]> {
        self.data
            .get(s.offset..s.offset + s.size)
            .ok_or_else(|| "section out of bounds".into())
    }

    fn section_by_name(&self, wanted: &str) -> RunnerResult<Option<Section>> {
        let shstrndx = u16_at(self.data, 0x3e)? as usize;
        let Some(strtab) = self.sections.get(shstrndx) else {
            return Ok(None);
        };
        let strtab = self.bytes(strtab)?;
        Ok(self
            .sections
            .iter()
            .find(|s| cstr(strtab, s.name as usize) == Some(wanted))
            .copied())
    }

    /// The `DT_NEEDED` sonames.
    fn needed(&self) -> RunnerResult<Vec<String>> {
        let mut out = Vec::new();
        for s in self.sections.iter().filter(|s| s.kind == 6) {
            let strtab = self
                .sections
                .get(s.link as usize)
                .ok_or("bad .dynamic link")?;
            let strtab = self.bytes(strtab)?;
            for entry in self.bytes(s)?.chunks_exact(16) {
                let tag = u64_at(entry, 0)?;
                if tag == 0 {
                    break;
                }
                if tag == 1 {
                    let name = cstr(strtab, u64_at(entry, 8)? as usize).ok_or("bad DT_NEEDED")?;
                    out.push(name.to_string());
                }
            }
        }
        Ok(out)
    }

    /// The `PT_INTERP` path.
    fn interp(&self) -> Option<String> {
        let phoff = u64_at(self.data, 0x20).ok()? as usize;
        let phentsize = u16_at(self.data, 0x36).ok()? as usize;
        let phnum = u16_at(self.data, 0x38).ok()? as usize;
        (0..phnum).find_map(|i| {
            let at = phoff + i * phentsize;
            if u32_at(self.data, at).ok()? != 3 {
                return None;
            }
            let off = u64_at(self.data, at + 8).ok()? as usize;
            cstr(self.data, off).map(str::to_string)
        })
    }

    /// The `depends=` of a kernel module, with names normalised to '_'.
    fn modinfo_depends(&self) -> RunnerResult<Vec<String>> {
        let s = self
            .section_by_name(".modinfo")?
            .ok_or("no .modinfo section")?;
        for item in self.bytes(&s)?.split(|b| *b == 0) {
            if let Some(list) = item.strip_prefix(b"depends=") {
                return Ok(String::from_utf8_lossy(list)
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.replace('-', "_"))
                    .collect());
            }
        }
        Ok(Vec::new())
    }
}

fn cstr(data: &[u8], at: usize) -> Option<&str> {
    let rest = data.get(at..)?;
    let end = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

fn u16_at(d: &[u8], at: usize) -> RunnerResult<u16> {
    Ok(u16::from_le_bytes(
        d.get(at..at + 2).ok_or("ELF truncated")?.try_into()?,
    ))
}

fn u32_at(d: &[u8], at: usize) -> RunnerResult<u32> {
    Ok(u32::from_le_bytes(
        d.get(at..at + 4).ok_or("ELF truncated")?.try_into()?,
    ))
}

fn u64_at(d: &[u8], at: usize) -> RunnerResult<u64> {
    Ok(u64::from_le_bytes(
        d.get(at..at + 8).ok_or("ELF truncated")?.try_into()?,
    ))
}

/// FNV-1a, 64-bit: a stable cache key (std's hasher is not stable across releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout() {
        let mut c = Cpio::default();
        c.file("a/b/c", 0o644, b"hello");
        let data = c.finish();
        assert_eq!(data.len() % 4, 0);
        assert!(data.starts_with(b"070701"));
        // a, a/b, a/b/c, trailer
        assert_eq!(data.windows(6).filter(|w| w == b"070701").count(), 4);
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn fnv_is_stable() {
        let mut h = Fnv::new();
        h.add(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }
}
