//! `xenmsr`: MSR accesses for a Xen x86-64 PV guest kernel, without paravirt ops.
//!
//! Every call site keeps the native instruction's register ABI (`ecx` = MSR,
//! `edx:eax` = value). [`init`] patches each site for the platform: the instruction
//! itself on bare metal or HVM, or a `call` to a stub on Xen PV. The stub asks this
//! crate's policy what to do and, on failure, rewinds to the call site and traps there,
//! so the site's own extable fixup runs exactly as for a faulting native instruction.
//!
//! What an integrating kernel does:
//! 1. at boot, [`init`] with its [`Platform`];
//! 2. in its `#GP` and `#UD` handlers, [`fixup_exception`];
//! 3. in its linker script, keep the `xenmsr_extable` and `xenmsr_patch_sites` sections
//!    with their bounds symbols (see `docs/integrating.md`);
//! 4. for the PMU, per vCPU, [`pmu`]'s `init`, `on_pmi` and `finish` (`on_pmi` and
//!    `lvtpc_set` act on the calling vCPU, which the `vcpu_id` hook names);
//! 5. to re-patch the sites later, while other vCPUs run, [`repatch`] with the kernel's
//!    stop-the-world hook.
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod dispatch;
pub mod patch;
pub mod pmu;
pub mod policy;
pub mod routes;

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use spin::Once;
pub use xenmsr_asm::cpuid::xen_cpuid;
pub use xenmsr_asm::extable::init as init_extable;
pub use xenmsr_asm::fixup::{TrapFrame, UncheckedAccess, fixup_exception};
pub use xenmsr_asm::site::{
    rdmsr, rdmsr_const, rdmsr_const_safe, rdmsr_safe, rdpmc, rdpmc_safe, wrmsr, wrmsr_ns,
    wrmsr_ns_const, wrmsr_ns_const_safe, wrmsr_ns_safe, wrmsr_safe,
};
pub use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::HypercallPage;

use crate::dispatch::ClassIndex;
use crate::patch::{CpuFeatures, PatchError, PatchReport, Variant};
use crate::pmu::RawMsr;
use crate::policy::XenPvPolicy;

/// The platform the kernel runs on, which decides how every call site is patched.
#[derive(Clone, Copy, Debug)]
pub enum Platform {
    /// A 64-bit Xen PV guest: sites call the stubs, and this crate's policy routes each
    /// access.
    XenPv {
        /// The hypercall page Xen filled.
        hypercalls: HypercallPage,
        /// The current vCPU's id (0 for the boot vCPU); used for the APIC base's `BSP`
        /// bit and for the per-vCPU vPMU state. It must be cheap and callable anywhere an
        /// MSR is accessed, including in an upcall handler.
        vcpu_id: fn() -> u32,
        /// CPUID as the domain's policy answers it, which sizes the vPMU: pass
        /// [`xen_cpuid`] (Xen's forced-emulation prefix) in a PV guest, where a plain
        /// `cpuid` shows the host's leaves.
        cpuid: fn(u32, u32) -> [u32; 4],
        /// The vPMU's per-vCPU state, one [`pmu::VcpuSlot`] per vCPU id: pass
        /// [`pmu::DEFAULT_SLOTS`] for up to [`pmu::DEFAULT_VCPUS`] vCPUs, or a static
        /// array of the kernel's own for more. A vCPU whose id has no slot has no vPMU
        /// (its PMU MSRs pass through).
        pmu_slots: &'static [pmu::VcpuSlot],
    },
    /// Bare metal or HVM: sites hold the instruction itself.
    Native,
}

/// What an unchecked (non-`_safe`) access does when it faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UncheckedPolicy {
    /// The access reads 0 (a write is dropped) and the warn hook runs once per call site.
    #[default]
    WarnOnce,
    /// The access reads 0 (a write is dropped) silently, like Linux's `xen_msr_safe=1`.
    Silent,
}

/// Configuration for [`init`].
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The platform.
    pub platform: Platform,
    /// What unchecked accesses do when they fault.
    pub unchecked: UncheckedPolicy,
    /// Called once per call site when an unchecked access faults (with
    /// [`UncheckedPolicy::WarnOnce`]).
    pub warn: fn(&UncheckedAccess),
    /// Where the library's own messages go.
    pub log: fn(fmt::Arguments<'_>),
    /// Stores patched code bytes: [`patch::write_text_directly`] for a kernel whose text
    /// is writable at boot; a kernel with read-only text passes a function that maps it
    /// writable around the store.
    pub write_text: unsafe fn(usize, &[u8]),
}

/// Why [`init`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// `init` already succeeded (or is running); the platform of a running kernel is
    /// fixed.
    AlreadyInitialised,
    /// A patch-site record is corrupt or unreachable; nothing was changed.
    Patch(PatchError),
    /// Another stub backend or warn hook was registered before `init`
    /// (`xenmsr_asm::backend::set_backend`, `xenmsr_asm::fixup::set_warn_hook`: the first
    /// registration wins); nothing was changed.
    HooksTaken,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::AlreadyInitialised => write!(f, "xenmsr::init already ran"),
            InitError::Patch(error) => write!(f, "patching failed: {error:?}"),
            InitError::HooksTaken => {
                write!(f, "a stub backend or warn hook was registered before init")
            }
        }
    }
}

/// What [`init`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitReport {
    /// The code every site got.
    pub variant: Variant,
    /// How many sites were rewritten and how many already held that code.
    pub patched: PatchReport,
}

struct Settings {
    unchecked: UncheckedPolicy,
    warn: fn(&UncheckedAccess),
    log: fn(fmt::Arguments<'_>),
    write_text: unsafe fn(usize, &[u8]),
}

/// [`init`] has not succeeded; a call may start.
const INIT_NONE: u8 = 0;
/// An [`init`] call is checking or committing.
const INIT_RUNNING: u8 = 1;
/// [`init`] succeeded.
const INIT_DONE: u8 = 2;
/// Where [`init`] stands. Every global it sets is set only after everything that can
/// fail was checked, so a failed call leaves this at [`INIT_NONE`] and a retry starts
/// from scratch.
static INIT_STATE: AtomicU8 = AtomicU8::new(INIT_NONE);
static SETTINGS: Once<Settings> = Once::new();
static XEN_POLICY: Once<XenPvPolicy<RawMsr>> = Once::new();
/// The storage the policy's class index is built in (about 5 KiB, so not on the stack).
static CLASS_INDEX: spin::Mutex<ClassIndex> = spin::Mutex::new(ClassIndex::new());

fn dispatch_warning(access: &UncheckedAccess) {
    if let Some(settings) = SETTINGS.get()
        && settings.unchecked == UncheckedPolicy::WarnOnce
    {
        (settings.warn)(access);
    }
}

/// Logs through the kernel's log hook (nothing before [`init`]).
pub(crate) fn log(args: fmt::Arguments<'_>) {
    if let Some(settings) = SETTINGS.get() {
        (settings.log)(args);
    }
}

/// Initialises the library for `config.platform` and patches every call site.
///
/// On Xen PV this installs the routing policy as the stubs' backend and the vPMU
/// backend (whose per-vCPU pages the kernel then registers with [`pmu::init`]); every
/// site keeps its `call` to the stub. Natively every site gets the instruction inline,
/// with WRMSRNS and the immediate forms where CPUID reports them.
///
/// Everything that can fail is checked first (every patch-site record, the hooks); only
/// then is anything stored or written. A failed call therefore changes nothing, and a
/// later call may succeed; after a success every later call is
/// [`InitError::AlreadyInitialised`]. After writing the sites the calling vCPU
/// serialises (`cpuid`).
///
/// # Examples
///
/// ```no_run
/// use xenmsr::{Config, Platform, UncheckedPolicy};
/// use xenmsr_hypercall::HypercallPage;
///
/// fn boot(hypercalls: HypercallPage) {
///     let config = Config {
///         platform: Platform::XenPv {
///             hypercalls,
///             vcpu_id: || 0,
///             cpuid: xenmsr::xen_cpuid,
///             pmu_slots: &xenmsr::pmu::DEFAULT_SLOTS,
///         },
///         unchecked: UncheckedPolicy::WarnOnce,
///         warn: |access| { let _ = access; /* the kernel's log */ },
///         log: |args| { let _ = args; },
///         write_text: xenmsr::patch::write_text_directly,
///     };
///     // SAFETY: on the boot vCPU at entry (Xen starts it with events masked), before
///     // other vCPUs run; the text is writable.
///     let report = unsafe { xenmsr::init(config) }.expect("first init");
///     let _ = report.patched.rewritten;
/// }
/// ```
///
/// `docs/integrating.md` shows the whole integration.
///
/// # Safety
///
/// - The sites are rewritten in place while nothing else may execute them: call it on
///   the boot vCPU with its upcalls (event delivery) and interrupts masked, before any
///   other vCPU runs. A 64-bit PV kernel's entry point satisfies this: Xen starts the boot
///   vCPU with events masked and the others down. To re-patch later, while other vCPUs
///   run, use [`repatch`].
/// - `config.write_text` must be able to store into the kernel's text.
/// - `config.platform` must describe the machine: [`Platform::XenPv`] only in a 64-bit
///   Xen PV guest.
pub unsafe fn init(config: Config) -> Result<InitReport, InitError> {
    // SAFETY: the caller's contract; the sites are this image's own records.
    unsafe { init_with_sites(config, image_sites()) }
}

/// [`init`] over the given patch sites instead of this image's records: the internal
/// entry point that lets tests inject corrupt records. Not part of the API.
///
/// # Safety
///
/// As for [`init`]; in addition every site must be a live patch site of this image
/// unless its record is rejected before any write (a corrupt record is what tests give).
#[doc(hidden)]
pub unsafe fn init_with_sites(
    config: Config,
    sites: impl Iterator<Item = xenmsr_asm::patch::PatchSite> + Clone,
) -> Result<InitReport, InitError> {
    if INIT_STATE
        .compare_exchange(
            INIT_NONE,
            INIT_RUNNING,
            Ordering::Acquire,
            Ordering::Acquire,
        )
        .is_err()
    {
        return Err(InitError::AlreadyInitialised);
    }
    // SAFETY: forwarded to the caller.
    let result = unsafe { init_claimed(config, sites) };
    let state = if result.is_ok() { INIT_DONE } else { INIT_NONE };
    INIT_STATE.store(state, Ordering::Release);
    result
}

/// [`init`] once this call owns [`INIT_STATE`].
///
/// # Safety
///
/// As for [`init_with_sites`].
unsafe fn init_claimed(
    config: Config,
    sites: impl Iterator<Item = xenmsr_asm::patch::PatchSite> + Clone,
) -> Result<InitReport, InitError> {
    // 1. Check everything that can fail; store nothing.
    let (variant, direct_segbase) = match config.platform {
        // Constant-index segment-base sites get the stubs that make the hypercall
        // directly; their hypercall page is set below, before any site is written.
        Platform::XenPv { .. } => (Variant::XenPv, true),
        Platform::Native => (Variant::Native(CpuFeatures::detect()), false),
    };
    patch::check_sites(sites.clone(), variant, direct_segbase).map_err(InitError::Patch)?;
    let needs_backend = matches!(config.platform, Platform::XenPv { .. });
    if xenmsr_asm::fixup::warn_hook_registered()
        || (needs_backend && xenmsr_asm::backend::backend().is_some())
    {
        return Err(InitError::HooksTaken);
    }

    // 2. Commit. Nothing below can fail: the records were checked with the same
    // variant, and the hooks are free (this call owns INIT_STATE).
    SETTINGS.call_once(|| Settings {
        unchecked: config.unchecked,
        warn: config.warn,
        log: config.log,
        write_text: config.write_text,
    });
    // Sort the extable now (idempotent), not lazily inside the first fault.
    init_extable();
    xenmsr_asm::fixup::set_warn_hook(dispatch_warning);
    if let Platform::XenPv {
        hypercalls,
        vcpu_id,
        cpuid,
        pmu_slots,
    } = config.platform
    {
        xenmsr_asm::stubs::set_segbase_hypercall_page(hypercalls);
        let vpmu = pmu::install(pmu::VpmuConfig {
            hypercalls,
            // Sized by the domain's CPUID policy (Xen's view), not the host's.
            layout: pmu::PmuLayout::from_cpuid(cpuid),
            native: &RawMsr,
            vcpu_id,
            slots: pmu_slots,
        });
        // The class index is built in its static storage, never on the stack. This runs
        // once (INIT_STATE), so the lock is free; it stays taken: the policy keeps the
        // index for the rest of the kernel's life.
        let index = spin::MutexGuard::leak(CLASS_INDEX.lock());
        let policy = XEN_POLICY
            .call_once(|| XenPvPolicy::new(hypercalls, vcpu_id, RawMsr, Some(vpmu), index));
        xenmsr_asm::backend::set_backend(policy);
    }
    let write_text = config.write_text;
    let mut write = |address: usize, bytes: &[u8]| {
        // SAFETY: `write_sites` only writes inside live patch sites, which nothing
        // executes meanwhile (this function's contract), through the kernel's writer.
        unsafe { write_text(address, bytes) }
    };
    // SAFETY: the sites are live patch sites (caller's contract), checked above with the
    // same variant; no other vCPU runs and upcalls are masked (caller's contract).
    let patched = unsafe { patch::write_sites(sites, variant, direct_segbase, &mut write) }
        .map_err(InitError::Patch)?;
    patch::serialise();
    log(format_args!(
        "xenmsr: {variant:?}: {} call sites rewritten, {} already right",
        patched.rewritten, patched.unchanged
    ));
    Ok(InitReport { variant, patched })
}

/// Why [`repatch`] changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepatchError {
    /// [`init`] has not succeeded (it provides the text writer).
    NotInitialised,
    /// A patch-site record cannot take the variant; no site was changed.
    Patch(PatchError),
    /// The kernel's stop-the-world hook returned without running the patching closure.
    NotRun,
}

impl fmt::Display for RepatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepatchError::NotInitialised => write!(f, "xenmsr::init has not succeeded"),
            RepatchError::Patch(error) => write!(f, "patching failed: {error:?}"),
            RepatchError::NotRun => write!(f, "the stop-the-world hook did not run the patch"),
        }
    }
}

/// Re-patches every call site for `variant` while other vCPUs may be running, through a
/// stop-the-world hook the kernel provides.
///
/// The records are checked first (a bad one changes nothing). Then `stop_the_world` is
/// called with a closure that rewrites the sites (through `Config::write_text`) and
/// serialises the calling vCPU. The hook must:
///
/// 1. bring every other vCPU to a parking point *outside* any MSR call site (for example
///    an IPI or event handler that spins on a flag), with its upcalls and interrupts
///    masked so that nothing on it can enter a site;
/// 2. run the closure exactly once, on the calling vCPU, while they are parked;
/// 3. release them, and have each execute a serialising instruction (`cpuid`, e.g.
///    [`patch::serialise`], or an `iret`) before it runs kernel code again, so that no
///    vCPU executes bytes it fetched before the rewrite (Intel's rule for
///    cross-modifying code).
///
/// On Xen PV, [`Variant::XenPv`] points the constant-index segment-base writes at their
/// direct stubs as [`init`] does. Returns what was rewritten.
///
/// # Examples
///
/// ```no_run
/// use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
///
/// static STOP: AtomicBool = AtomicBool::new(false);
/// static PARKED: AtomicUsize = AtomicUsize::new(0);
///
/// /// What every other vCPU runs when the kernel's "stop" IPI/event arrives (upcalls
/// /// masked, outside any MSR site).
/// fn park() {
///     PARKED.fetch_add(1, Ordering::AcqRel);
///     while STOP.load(Ordering::Acquire) {
///         core::hint::spin_loop();
///     }
///     xenmsr::patch::serialise();
///     PARKED.fetch_sub(1, Ordering::AcqRel);
/// }
///
/// fn stop_the_world(others: usize, send_stop_ipis: fn(), patch: &mut dyn FnMut()) {
///     STOP.store(true, Ordering::Release);
///     send_stop_ipis();
///     while PARKED.load(Ordering::Acquire) != others {
///         core::hint::spin_loop();
///     }
///     patch();
///     STOP.store(false, Ordering::Release);
/// }
///
/// fn switch_to_native(others: usize, send_stop_ipis: fn()) {
///     let features = xenmsr::patch::CpuFeatures::detect();
///     // SAFETY: `stop_the_world` parks every other vCPU outside the sites with upcalls
///     // masked, runs the closure once here, and each vCPU serialises before resuming;
///     // this vCPU has its upcalls masked.
///     let report = unsafe {
///         xenmsr::repatch(xenmsr::patch::Variant::Native(features), &mut |patch| {
///             stop_the_world(others, send_stop_ipis, patch)
///         })
///     };
///     let _ = report;
/// }
/// # let _ = park;
/// ```
///
/// # Safety
///
/// - `stop_the_world` must do what the list above says; otherwise another vCPU can
///   execute a half-written site.
/// - The calling vCPU must have its upcalls and interrupts masked for the whole call.
/// - `variant` must suit the machine (as for [`init`]'s platform).
pub unsafe fn repatch(
    variant: Variant,
    stop_the_world: &mut dyn FnMut(&mut dyn FnMut()),
) -> Result<PatchReport, RepatchError> {
    if INIT_STATE.load(Ordering::Acquire) != INIT_DONE {
        return Err(RepatchError::NotInitialised);
    }
    let Some(settings) = SETTINGS.get() else {
        return Err(RepatchError::NotInitialised);
    };
    let direct_segbase = xenmsr_asm::stubs::segbase_stubs_ready();
    patch::check_sites(image_sites(), variant, direct_segbase).map_err(RepatchError::Patch)?;
    let write_text = settings.write_text;
    let mut result = None;
    stop_the_world(&mut || {
        let mut write = |address: usize, bytes: &[u8]| {
            // SAFETY: `write_sites` only writes inside live patch sites, which no vCPU
            // executes while the world is stopped (this function's contract).
            unsafe { write_text(address, bytes) }
        };
        // SAFETY: this image's own sites, checked above with the same arguments; every
        // other vCPU is parked outside them and this one runs none of them meanwhile.
        result =
            Some(unsafe { patch::write_sites(image_sites(), variant, direct_segbase, &mut write) });
        patch::serialise();
    });
    match result {
        Some(report) => report.map_err(RepatchError::Patch),
        None => Err(RepatchError::NotRun),
    }
}

/// The patch sites of the running image.
fn image_sites() -> impl Iterator<Item = xenmsr_asm::patch::PatchSite> + Clone {
    xenmsr_asm::patch::records()
        .iter()
        .map(xenmsr_asm::patch::PatchSiteRecord::decode)
}

/// `docs/integrating.md`, compiled here so that its example builds in CI.
#[cfg(doctest)]
#[doc = include_str!("../../docs/integrating.md")]
pub struct IntegratingGuide;
