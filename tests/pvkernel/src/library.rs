//! The kernel's integration of `xenmsr`: `init` with the tracing hypercall page, and the
//! warn and log hooks (which the suites inspect).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use xenmsr::{Config, InitError, InitReport, Platform, UncheckedAccess, UncheckedPolicy};

/// How many times the warn hook ran.
static WARNINGS: AtomicU32 = AtomicU32::new(0);
/// The MSR (or counter) and the site of the last warning.
static LAST_WARN_MSR: AtomicU64 = AtomicU64::new(0);
static LAST_WARN_SITE: AtomicUsize = AtomicUsize::new(0);

fn warn(access: &UncheckedAccess) {
    WARNINGS.fetch_add(1, Ordering::Relaxed);
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

/// The vCPU id: this kernel runs on vCPU 0 only.
fn vcpu_id() -> u32 {
    0
}

/// The configuration the kernel initialises the library with.
pub fn config() -> Config {
    Config {
        platform: Platform::XenPv {
            hypercalls: crate::tracepage::page(),
            vcpu_id,
            cpuid: xenmsr::xen_cpuid,
            // One vCPU: the library's default storage (64 slots) is plenty.
            pmu_slots: &xenmsr::pmu::DEFAULT_SLOTS,
        },
        unchecked: UncheckedPolicy::WarnOnce,
        warn,
        log,
        // The PV kernel's image is one RWX segment, so patching writes the text directly.
        write_text: xenmsr::patch::write_text_directly,
    }
}

/// Initialises the library (patching every site for Xen PV and installing the policy).
pub fn init() -> Result<InitReport, InitError> {
    // SAFETY: called on the boot (only) vCPU, after the trap table is in place and before
    // any MSR access whose routing matters; the text is writable and no other CPU runs.
    unsafe { xenmsr::init(config()) }
}
