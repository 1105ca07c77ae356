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
//!    `lvtpc_set` act on the calling vCPU, which the `vcpu_id` hook names).
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
    /// `init` already ran; the platform of a running kernel is fixed.
    AlreadyInitialised,
    /// A patch-site record is corrupt or unreachable; no site was changed.
    Patch(PatchError),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::AlreadyInitialised => write!(f, "xenmsr::init already ran"),
            InitError::Patch(error) => write!(f, "patching failed: {error:?}"),
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
}

static SETTINGS: Once<Settings> = Once::new();
static XEN_POLICY: Once<XenPvPolicy<RawMsr>> = Once::new();

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
///     // SAFETY: once, on the boot vCPU, before other vCPUs run; the text is writable.
///     let report = unsafe { xenmsr::init(config) }.expect("first init");
///     let _ = report.patched.rewritten;
/// }
/// ```
///
/// `docs/integrating.md` shows the whole integration.
///
/// # Safety
///
/// Must be called once, early, on the boot CPU, before any other CPU runs, and with
/// `config.write_text` able to store into the kernel's text. `config.platform` must
/// describe the machine: [`Platform::XenPv`] only in a 64-bit Xen PV guest.
pub unsafe fn init(config: Config) -> Result<InitReport, InitError> {
    let mut first = false;
    SETTINGS.call_once(|| {
        first = true;
        Settings {
            unchecked: config.unchecked,
            warn: config.warn,
            log: config.log,
        }
    });
    if !first {
        return Err(InitError::AlreadyInitialised);
    }
    // Sort the extable now (idempotent), not lazily inside the first fault.
    init_extable();
    xenmsr_asm::fixup::set_warn_hook(dispatch_warning);
    let variant = match config.platform {
        Platform::XenPv { hypercalls, .. } => {
            // Before patching: constant-index segment-base sites may then be pointed at
            // the stubs that make the hypercall directly.
            xenmsr_asm::stubs::set_segbase_hypercall_page(hypercalls);
            Variant::XenPv
        }
        Platform::Native => Variant::Native(CpuFeatures::detect()),
    };
    let write_text = config.write_text;
    let mut write = |address: usize, bytes: &[u8]| {
        // SAFETY: `patch_sites` only writes inside live patch sites, on the boot CPU
        // before other CPUs run (this function's contract), through the kernel's writer.
        unsafe { write_text(address, bytes) }
    };
    // SAFETY: the sites come from this image's patch-site section; the caller guarantees
    // that no other CPU runs yet.
    let patched = unsafe { patch::patch_sites(image_sites(), variant, &mut write) }
        .map_err(InitError::Patch)?;
    match config.platform {
        Platform::XenPv {
            hypercalls,
            vcpu_id,
            cpuid,
            pmu_slots,
        } => {
            let vpmu = pmu::install(pmu::VpmuConfig {
                hypercalls,
                // Sized by the domain's CPUID policy (Xen's view), not the host's.
                layout: pmu::PmuLayout::from_cpuid(cpuid),
                native: &RawMsr,
                vcpu_id,
                slots: pmu_slots,
            });
            let policy =
                XEN_POLICY.call_once(|| XenPvPolicy::new(hypercalls, vcpu_id, RawMsr, Some(vpmu)));
            xenmsr_asm::backend::set_backend(policy);
        }
        Platform::Native => {}
    }
    log(format_args!(
        "xenmsr: {variant:?}: {} call sites rewritten, {} already right",
        patched.rewritten, patched.unchanged
    ));
    Ok(InitReport { variant, patched })
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
