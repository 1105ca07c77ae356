//! The kernel's integration of `xenmsr`: `init` with the tracing hypercall page, and the
//! warn and log hooks (which the suites inspect).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use xenmsr::{Config, FsGsBase, InitError, InitReport, UncheckedAccess};

/// How many times the warn hook ran.
static WARNINGS: AtomicU32 = AtomicU32::new(0);
/// The MSR (or counter) and the site of the last warning.
static LAST_WARN_MSR: AtomicU64 = AtomicU64::new(0);
static LAST_WARN_SITE: AtomicUsize = AtomicUsize::new(0);

/// Warnings per kind of failure: `(kind, count)` (see `UncheckedAccess::warning_kind`), for
/// the check that no kind warns twice when every vCPU runs the same unchecked accesses.
static PER_KIND: spin::Mutex<[(u64, u32); 128]> = spin::Mutex::new([(0, 0); 128]);

fn warn(access: &UncheckedAccess) {
    WARNINGS.fetch_add(1, Ordering::Relaxed);
    {
        // The warn hook runs in the fixup path, with upcalls masked.
        let kind = access.warning_kind();
        let mut table = PER_KIND.lock();
        if let Some(slot) = table.iter_mut().find(|(k, _)| *k == kind || *k == 0) {
            *slot = (kind, slot.1 + 1);
        }
    }
    LAST_WARN_MSR.store(u64::from(access.msr_or_counter), Ordering::Relaxed);
    LAST_WARN_SITE.store(access.site, Ordering::Relaxed);
    println!(
        "xenmsr: warning: unchecked {:?} of {:#x} at site {:#x} failed: {}",
        access.op, access.msr_or_counter, access.site, access.error
    );
}

fn log(args: core::fmt::Arguments<'_>) {
    // The library prefixes its own messages.
    println!("{args}");
}

/// The number of warnings so far, and the MSR and site of the last one.
pub fn warnings() -> (u32, u32, usize) {
    (
        WARNINGS.load(Ordering::Relaxed),
        LAST_WARN_MSR.load(Ordering::Relaxed) as u32,
        LAST_WARN_SITE.load(Ordering::Relaxed),
    )
}

/// How many kinds of failure warned, the most warnings of one kind, and the total.
pub fn warnings_per_kind() -> (usize, u32, u32) {
    let table = PER_KIND.lock();
    let used = table.iter().filter(|(kind, _)| *kind != 0);
    let sites = used.clone().count();
    let max = used.clone().map(|(_, n)| *n).max().unwrap_or(0);
    (sites, max, used.map(|(_, n)| *n).sum())
}

/// The vCPU id: from the stack the code runs on (`smp::current_vcpu`).
fn vcpu_id() -> u32 {
    crate::smp::current_vcpu()
}

/// The configuration the kernel initialises the library with.
pub fn config() -> Config {
    // The defaults cover the rest: Xen's CPUID view, the library's vPMU storage (64
    // vCPUs, more than the kernel's `MAX_VCPUS`), warn once per kind, and writing the text
    // directly (the image is one RWX segment).
    Config::xen_pv(crate::tracepage::page())
        .with_vcpu_id(vcpu_id)
        .with_warn(warn)
        .with_log(log)
        // `fsgsbase=1` on the command line: the FSGSBASE runs.
        .with_fsgsbase(if crate::suites::fsgsbase_requested() {
            FsGsBase::Use
        } else {
            FsGsBase::Off
        })
}

/// Initialises the library (patching every site for Xen PV and installing the policy).
pub fn init() -> Result<InitReport, InitError> {
    // SAFETY: called on vCPU 0 with every other vCPU parked outside any call site and
    // upcalls masked on all of them (`smp::stop_the_world`), after the trap table is in
    // place; the text is writable.
    unsafe { xenmsr::init(config()) }
}
