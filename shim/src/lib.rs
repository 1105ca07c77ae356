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
//!    with their bounds symbols (see the [integration guide]);
//! 4. for the PMU, per vCPU, [`pmu`]'s `init`, `on_pmi` and `finish` (`on_pmi` and
//!    `lvtpc_set` act on the calling vCPU, which the `vcpu_id` hook names);
//! 5. to re-patch the sites later, while other vCPUs run, [`repatch`] with the kernel's
//!    stop-the-world hook.
//!
//! [integration guide]: https://github.com/xenmsr/xenmsr/blob/main/docs/integrating.md
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

// The routing machinery: public so that the host tests and benchmarks can drive it
// directly, hidden from the front page because a kernel never needs it (the typed `Msr`,
// the access functions and `init` are the API; `docs/architecture.md` explains the
// routing).
#[cfg(target_os = "none")]
pub mod console;
#[doc(hidden)]
pub mod dispatch;
#[cfg(target_os = "none")]
pub mod events;
pub mod fsgsbase;
pub mod lifecycle;
mod msr;
pub mod patch;
pub mod pmu;
#[doc(hidden)]
pub mod policy;
#[doc(hidden)]
pub mod routes;
pub mod smp;
pub mod testing;
/// A minimal xenstore client (no alloc) for suspend acknowledgement and vCPU hotplug.
pub mod xenstore;

use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use spin::Once;

/// The Xen ABI crate (`xenmsr-hypercall`): hypercall numbers, `Errno`, the ABI structs and
/// the hypercall page, so that a kernel needs only this crate as a dependency.
pub use xenmsr_hypercall as hypercall;

/// The PV runtime kit: what a 64-bit PV kernel needs around the library, so that its first
/// hour goes into its own code. With [`xen_elf_notes!`] and [`pv_entry!`]:
///
/// - the trap entry for every exception vector, the event upcall and the failsafe
///   callback (`pv::install_trap_table`, `pv::install_callbacks`,
///   [`pv::set_trap_handler`]), which fixes up MSR faults through the library and returns
///   with the `iret` hypercall;
/// - [`pv::PvConsole`], a `core::fmt::Write` console for dom0 (`console_io`) and a domU
///   (the console ring);
/// - the linker-script fragment `xenmsr-sections.ld` and the complete script
///   `xenmsr-pv.ld`, on the linker's search path (`docs/integrating.md`).
pub mod pv {
    pub use xenmsr_asm::pv::*;
    pub use xenmsr_hypercall::pv::*;
}

pub use msr::Msr;
pub use xenmsr_asm::MsrError;
/// A backend's decision for one access (routing internals, for tests and benchmarks).
#[doc(hidden)]
pub use xenmsr_asm::Outcome;
pub use xenmsr_asm::cpuid::xen_cpuid;
pub use xenmsr_asm::extable::init as init_extable;
pub use xenmsr_asm::fixup::{TrapFrame, UncheckedAccess, fixup_exception};
/// A kernel's own instructions that may fault, with the fault as a `Result`:
/// [`guarded_asm!`] and ready-made helpers (`guarded::rdmsr`, `read_u64`, `rdfsbase`...).
pub use xenmsr_asm::guarded;
pub use xenmsr_asm::guarded_asm;
pub use xenmsr_asm::pv_entry;
pub use xenmsr_asm::site::{
    rdmsr, rdmsr_const, rdmsr_const_safe, rdmsr_safe, rdpmc, rdpmc_safe, wrmsr, wrmsr_ns,
    wrmsr_ns_const, wrmsr_ns_const_safe, wrmsr_ns_safe, wrmsr_safe,
};
use xenmsr_hypercall::HypercallPage;
pub use xenmsr_hypercall::xen_elf_notes;

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
        /// MSR is accessed, including in an upcall handler. The default is the kit's
        /// stacks ([`smp`]); whatever it is, [`init`] and [`smp::register_this_vcpu`]
        /// check that it gives each online vCPU its own id.
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
    /// The access reads 0 (a write is dropped) and the warn hook runs once per kind of
    /// failure: the instruction (RDMSR, WRMSR, RDPMC) and the error, wherever it happens
    /// (see `UncheckedAccess::warning_kind`).
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
    /// Called once per kind of failure (instruction and error) when an unchecked access fails (with
    /// [`UncheckedPolicy::WarnOnce`]).
    pub warn: fn(&UncheckedAccess),
    /// Where the library's own messages go.
    pub log: fn(fmt::Arguments<'_>),
    /// Stores patched code bytes: [`patch::write_text_directly`] for a kernel whose text
    /// is writable at boot; a kernel with read-only text passes a function that maps it
    /// writable around the store.
    pub write_text: unsafe fn(usize, &[u8]),
    /// Whether segment-base accesses use RDFSBASE/WRFSBASE and friends where the CPU
    /// has them ([`FsGsBase`]).
    pub fsgsbase: FsGsBase,
}

impl Config {
    /// The configuration of a Xen PV kernel, and the defaults: vCPU ids from the kit's
    /// stacks ([`smp`]: the boot stack of [`pv_entry!`] is vCPU 0, and
    /// `smp::start_vcpu`'s stacks name theirs; a kernel on stacks of its own gives
    /// [`with_vcpu_id`](Self::with_vcpu_id), or `init` fails with
    /// [`InitError::BootVcpuId`]), Xen's CPUID view ([`xen_cpuid`]), the default vPMU
    /// slots, warn-once with the warnings and the library's messages dropped, text
    /// written directly, FSGSBASE off. Adjust with the `with_*` methods.
    pub fn xen_pv(hypercalls: HypercallPage) -> Config {
        Config {
            platform: Platform::XenPv {
                hypercalls,
                vcpu_id: xenmsr_asm::vcpu::current_or_unknown,
                cpuid: xen_cpuid,
                pmu_slots: &pmu::DEFAULT_SLOTS,
            },
            unchecked: UncheckedPolicy::WarnOnce,
            warn: |_| {},
            log: |_| {},
            write_text: patch::write_text_directly,
            fsgsbase: FsGsBase::Off,
        }
    }

    /// The configuration of a native (bare-metal or HVM) kernel, with the defaults of
    /// [`xen_pv`](Self::xen_pv).
    pub fn native() -> Config {
        Config {
            platform: Platform::Native,
            unchecked: UncheckedPolicy::WarnOnce,
            warn: |_| {},
            log: |_| {},
            write_text: patch::write_text_directly,
            fsgsbase: FsGsBase::Off,
        }
    }

    /// Names the vCPU the code runs on (Xen PV; ignored natively), for a kernel that does
    /// not run on the kit's stacks. It must answer 0 on the boot vCPU and a different id
    /// on every other online vCPU: [`init`] and [`smp::register_this_vcpu`] check it.
    pub fn with_vcpu_id(mut self, vcpu_id: fn() -> u32) -> Config {
        if let Platform::XenPv { vcpu_id: v, .. } = &mut self.platform {
            *v = vcpu_id;
        }
        self
    }

    /// Where the library reads CPUID on Xen PV (the vPMU's layout, FSGSBASE): the default,
    /// [`xen_cpuid`], is the domain's view through Xen's forced-emulation prefix, which
    /// raises `#UD` anywhere but in a PV guest; a test harness passes its own. Ignored
    /// natively.
    pub fn with_cpuid(mut self, cpuid: fn(u32, u32) -> [u32; 4]) -> Config {
        if let Platform::XenPv { cpuid: c, .. } = &mut self.platform {
            *c = cpuid;
        }
        self
    }
    /// Gives the vPMU the kernel's own per-vCPU slots (Xen PV; ignored natively).
    pub fn with_pmu_slots(mut self, slots: &'static [pmu::VcpuSlot]) -> Config {
        if let Platform::XenPv { pmu_slots, .. } = &mut self.platform {
            *pmu_slots = slots;
        }
        self
    }

    /// Where unchecked-access warnings go.
    pub fn with_warn(mut self, warn: fn(&UncheckedAccess)) -> Config {
        self.warn = warn;
        self
    }

    /// Where the library's own messages go.
    pub fn with_log(mut self, log: fn(fmt::Arguments<'_>)) -> Config {
        self.log = log;
        self
    }

    /// How patched bytes are stored.
    pub fn with_write_text(mut self, write_text: unsafe fn(usize, &[u8])) -> Config {
        self.write_text = write_text;
        self
    }

    /// Opts in to (or out of) FSGSBASE ([`FsGsBase`]).
    pub fn with_fsgsbase(mut self, fsgsbase: FsGsBase) -> Config {
        self.fsgsbase = fsgsbase;
        self
    }
}

/// Whether FS and GS base accesses use RDFSBASE/WRFSBASE and RDGSBASE/WRGSBASE.
///
/// Enabling the instructions lets user space change its own FS and GS bases, so a kernel
/// that opts in must save them on every task switch: the choice is the kernel's, and it
/// is off by default. See [`fsgsbase`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsGsBase {
    /// FS/GS base writes are `set_segment_base` hypercalls on Xen PV (MSR writes
    /// natively), reads trapped (Xen PV) or native RDMSRs.
    #[default]
    Off,
    /// Use the instructions where the CPU (on Xen PV: the domain's CPUID policy) has them.
    /// On Xen PV `init` sets CR4.FSGSBASE on the calling vCPU; every other vCPU must get it
    /// before it runs a site ([`fsgsbase::enable_on_this_vcpu`], or
    /// [`fsgsbase::secondary_cr4`] in `VCPUOP_initialise`). Natively the kernel has set
    /// CR4.FSGSBASE on every CPU already. `KERNEL_GS_BASE` (the user GS base) stays a
    /// hypercall on Xen PV.
    Use,
}

/// What became of [`FsGsBase::Use`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsGsBaseStatus {
    /// The configuration said [`FsGsBase::Off`].
    NotRequested,
    /// CPUID (the domain's policy on Xen PV) has no FSGSBASE: the hypercalls stay.
    NotSupported,
    /// Xen dropped CR4.FSGSBASE when `init` set it: the hypercalls stay.
    DroppedByXen,
    /// The sites use the instructions.
    Enabled,
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
    /// The vCPU-id hook did not name the boot vCPU 0 (Xen boots a PV guest on vCPU 0); it
    /// answered this ([`smp::UNKNOWN_VCPU`] when the kernel runs on stacks of its own
    /// and gave no `Config::with_vcpu_id`). Nothing was changed.
    BootVcpuId(u32),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::AlreadyInitialised => write!(f, "xenmsr::init already ran"),
            InitError::Patch(error) => write!(f, "patching failed: {error:?}"),
            InitError::HooksTaken => {
                write!(f, "a stub backend or warn hook was registered before init")
            }
            InitError::BootVcpuId(smp::UNKNOWN_VCPU) => write!(
                f,
                "the boot vCPU's id is unknown: the kernel does not run on the kit's stacks and gave no Config::with_vcpu_id"
            ),
            InitError::BootVcpuId(id) => write!(
                f,
                "the vCPU-id hook names the boot vCPU {id}; Xen boots a PV guest on vCPU 0"
            ),
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
    /// Whether the sites use RDFSBASE/WRFSBASE and friends.
    pub fsgsbase: FsGsBaseStatus,
    /// Xen PV: how many MSRs the read stub sends to the policy (every other read passes
    /// through without entering Rust), or why its filter could not be built (then every
    /// read goes to the policy: correct, only slower). `Ok(0)` natively.
    pub read_filter: Result<usize, xenmsr_asm::fastpath::FilterError>,
}

struct Settings {
    /// The domain's view of CPUID on Xen PV (what `init` decided the sites from), for the
    /// check after a resume; `None` natively.
    cpuid: Option<fn(u32, u32) -> [u32; 4]>,
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
/// use xenmsr::{Config, FsGsBase, FsGsBaseStatus};
/// use xenmsr::hypercall::HypercallPage;
///
/// fn my_vcpu_id() -> u32 {
///     0 // a real kernel reads its per-CPU id
/// }
///
/// fn boot(hypercalls: HypercallPage) {
///     let config = Config::xen_pv(hypercalls)
///         .with_vcpu_id(my_vcpu_id)
///         .with_warn(|access| { let _ = access; /* the kernel's log */ })
///         .with_fsgsbase(FsGsBase::Use);
///     // SAFETY: on the boot vCPU at entry (Xen starts it with events masked), before
///     // other vCPUs run; the text is writable; the kernel saves the user FS/GS bases on
///     // task switch (it opted in to FSGSBASE).
///     let report = unsafe { xenmsr::init(config) }.expect("first init");
///     if report.fsgsbase != FsGsBaseStatus::Enabled {
///         // FS/GS base writes stay set_segment_base hypercalls.
///     }
/// }
/// ```
///
/// The [integration guide](https://github.com/xenmsr/xenmsr/blob/main/docs/integrating.md)
/// shows the whole integration.
///
/// # Safety
///
/// - The sites are rewritten in place while nothing else may execute them: call it on
///   the boot vCPU with its upcalls (event delivery) and interrupts masked, before any
///   other vCPU runs. A 64-bit PV kernel's entry point satisfies this: Xen starts the boot
///   vCPU with events masked and the others down. To re-patch later, while other vCPUs
///   run, use [`repatch`]. (Every variant of a site is one instruction as long as the
///   site, so a site is never left with a vCPU stopped inside an instruction of it; see
///   [`repatch`].)
/// - `config.write_text` must be able to store into the kernel's text.
/// - `config.platform` must describe the machine: [`Platform::XenPv`] only in a 64-bit
///   Xen PV guest.
/// - On Xen PV, the vCPU-id hook (the kit's stacks by default, or
///   `Config::with_vcpu_id`) must give every running vCPU its own id, the same on every
///   call on that vCPU: the vPMU's per-vCPU page and state are used by whichever vCPU the
///   id names. The library refuses what it can see ([`InitError::BootVcpuId`],
///   [`smp::register_this_vcpu`]'s errors), not a hook that changes its answer.
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
    let wants_fsgsbase = config.fsgsbase == FsGsBase::Use;
    let (variant, layout, cpu_fsgsbase) = match config.platform {
        Platform::XenPv { cpuid, .. } => (
            Variant::XenPv,
            // Sized by the domain's CPUID policy (Xen's view), not the host's.
            Some(pmu::PmuLayout::from_cpuid(cpuid)),
            fsgsbase::cpuid_has_fsgsbase(cpuid),
        ),
        Platform::Native => {
            let mut features = CpuFeatures::detect();
            // Natively the kernel has set CR4.FSGSBASE itself (`FsGsBase::Use`'s contract).
            features.fsgsbase = wants_fsgsbase && fsgsbase::cpuid_has_fsgsbase(pmu::raw_cpuid);
            (Variant::Native(features), None, features.fsgsbase)
        }
    };
    // On Xen PV the constant-index sites are routed at patch time: with FSGSBASE if Xen
    // keeps the CR4 bit (known only after setting it, below), else without. Both routings
    // are checked, so whichever applies cannot fail.
    let routing = |fsgsbase: bool| match variant {
        Variant::XenPv => patch::XenRouting {
            direct_segbase: true,
            layout,
            fsgsbase,
        },
        Variant::Native(_) => patch::XenRouting::stubs_only(),
    };
    patch::check_sites(sites.clone(), variant, &routing(false)).map_err(InitError::Patch)?;
    if wants_fsgsbase && cpu_fsgsbase {
        patch::check_sites(sites.clone(), variant, &routing(true)).map_err(InitError::Patch)?;
    }
    if let Platform::XenPv { vcpu_id, .. } = config.platform {
        smp::check_boot_vcpu(vcpu_id).map_err(InitError::BootVcpuId)?;
    }
    let needs_backend = matches!(config.platform, Platform::XenPv { .. });
    if xenmsr_asm::fixup::warn_hook_registered()
        || (needs_backend && xenmsr_asm::backend::backend().is_some())
    {
        return Err(InitError::HooksTaken);
    }

    // 2. Commit. Nothing below can fail: the records were checked with the same
    // variant and routings, and the hooks are free (this call owns INIT_STATE).
    SETTINGS.call_once(|| Settings {
        cpuid: match config.platform {
            Platform::XenPv { cpuid, .. } => Some(cpuid),
            Platform::Native => None,
        },
        unchecked: config.unchecked,
        warn: config.warn,
        log: config.log,
        write_text: config.write_text,
    });
    // Sort the extable now (idempotent), not lazily inside the first fault.
    init_extable();
    xenmsr_asm::fixup::set_warn_hook(dispatch_warning);
    // The kernel hears, once, of an FS/GS base access that had to be completed without
    // FSGSBASE (a vCPU without CR4.FSGSBASE); a kernel that set its own hook keeps it.
    let _ = xenmsr_asm::fixup::set_fsgsbase_fallback_hook(fsgsbase::report_fallback);
    let fsgsbase_status = if !wants_fsgsbase {
        FsGsBaseStatus::NotRequested
    } else if !cpu_fsgsbase {
        FsGsBaseStatus::NotSupported
    } else if matches!(variant, Variant::Native(_)) {
        FsGsBaseStatus::Enabled
    } else {
        // SAFETY: a Xen PV guest kernel (this function's contract) may write CR4, which Xen
        // emulates; only FSGSBASE is added, and the kernel opted in (it saves the user
        // bases on task switch: `FsGsBase::Use`'s contract).
        if unsafe { fsgsbase::enable_on_this_vcpu() } {
            FsGsBaseStatus::Enabled
        } else {
            FsGsBaseStatus::DroppedByXen
        }
    };
    let use_fsgsbase = fsgsbase_status == FsGsBaseStatus::Enabled;
    fsgsbase::set_enabled(use_fsgsbase);
    let routing = routing(use_fsgsbase);
    patch::set_routing(routing);
    let mut read_filter = Ok(0);
    if let Platform::XenPv {
        hypercalls,
        vcpu_id,
        pmu_slots,
        ..
    } = config.platform
    {
        let layout = layout.unwrap_or(pmu::PmuLayout::None);
        // Checked above; the hook answers the same on the same vCPU.
        let _ = smp::init_boot_vcpu(vcpu_id, hypercalls);
        // SAFETY: this is a 64-bit Xen PV guest and `hypercalls` its hypercall page
        // (`Platform::XenPv`, this function's contract), so the segment-base writes made
        // through the page are the ones their sites' callers mean.
        unsafe { xenmsr_asm::stubs::set_segbase_hypercall_page(hypercalls) };
        let vpmu = pmu::install(pmu::VpmuConfig {
            hypercalls,
            layout,
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
        // From here every read goes to the policy, until the filter names the few that
        // need it; the others then pass through the read stub without entering Rust.
        // SAFETY: the Xen PV policy answers every access as Xen PV carries it out (the
        // routing table, the vPMU: `docs/msr-semantics.md`), on this Xen PV guest.
        unsafe { xenmsr_asm::backend::set_backend(policy) };
        // SAFETY: on only if CR4.FSGSBASE stuck on this vCPU, and `FsGsBase::Use` (the
        // kernel's opt-in) requires it on every other vCPU before it runs a site; on one
        // that missed it, the `#UD` is completed by the fixup through the page stored
        // above.
        unsafe { xenmsr_asm::fastpath::set_fsgsbase_enabled(use_fsgsbase) };
        let keys = dispatch::read_filter_keys(&layout, use_fsgsbase);
        // Built in the library's storage next to the stub's pointer (this runs once:
        // INIT_STATE), and kept for the kernel's life.
        read_filter = match xenmsr_asm::fastpath::build_read_filter_once(keys.as_slice()) {
            Ok(filter) => {
                // SAFETY: the keys are the policy's own classification
                // (`read_filter_keys`): every MSR whose read the policy answers is a
                // `Policy` key, and FS_BASE/GS_BASE read by instruction only when FSGSBASE
                // is on, under the same conditions as the write switch above.
                unsafe { xenmsr_asm::fastpath::install_read_filter(filter) };
                Ok(keys.as_slice().len())
            }
            Err(error) => Err(error),
        };
    }
    let write_text = config.write_text;
    let mut write = |address: usize, bytes: &[u8]| {
        // SAFETY: `write_sites` only writes inside live patch sites, which nothing
        // executes meanwhile (this function's contract), through the kernel's writer.
        unsafe { write_text(address, bytes) }
    };
    // SAFETY: the sites are live patch sites (caller's contract), checked above with the
    // same variant and routing; no other vCPU runs and upcalls are masked (caller's
    // contract).
    let patched = unsafe { patch::write_sites(sites, variant, &routing, &mut write) }
        .map_err(InitError::Patch)?;
    patch::serialise();
    log(format_args!(
        "xenmsr: {variant:?}: {} call sites rewritten, {} already right; FSGSBASE {fsgsbase_status:?}; read filter {read_filter:?}",
        patched.rewritten, patched.unchanged
    ));
    Ok(InitReport {
        variant,
        patched,
        fsgsbase: fsgsbase_status,
        read_filter,
    })
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
/// 1. bring every other vCPU to a parking point (for example an IPI or event handler
///    that spins on a flag) with its upcalls and interrupts masked, so that nothing on it
///    runs a site while it is written;
/// 2. run the closure exactly once, on the calling vCPU, while they are parked;
/// 3. release them, and have each execute a serialising instruction (`cpuid`, e.g.
///    [`patch::serialise`], or an `iret`) before it runs kernel code again, so that no
///    vCPU executes bytes it fetched before the rewrite (Intel's rule for
///    cross-modifying code).
///
/// The parking point may be anywhere the IPI or upcall lands, including inside a stub or
/// the hypercall page that a site called, or between a site and the code around it:
/// every variant of a site is a single instruction as long as the site, so all variants
/// have the same instruction boundaries (the start and the end of the site) and the Xen
/// variant's `call` returns to the end. A vCPU parked with a stub on its stack returns to
/// the end of the site whatever variant is there now, and its stub completes the access
/// the old variant started; a vCPU interrupted before or after a site's instruction
/// resumes at a boundary of the new one (`docs/abi.md` §1; the host tests
/// `variant_boundaries.rs` and `parked_repatch.rs` check it). `repatch` therefore does
/// not need the other vCPUs to be outside every site and stub, only stopped.
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
/// /// masked; wherever it landed, even inside a stub).
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
///     // SAFETY: `stop_the_world` parks every other vCPU with upcalls masked, runs the
///     // closure once here, and each vCPU serialises before resuming; this vCPU has its
///     // upcalls masked.
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
///   execute a half-written site. (Where each vCPU is parked does not matter.)
/// - The calling vCPU must have its upcalls and interrupts masked for the whole call.
/// - `variant` must suit the machine (as for [`init`]'s platform).
pub unsafe fn repatch(
    variant: Variant,
    stop_the_world: &mut dyn FnMut(&mut dyn FnMut()),
) -> Result<PatchReport, RepatchError> {
    // SAFETY: forwarded to the caller; the routing is the one the sites have.
    unsafe { repatch_routed(variant, patch::routing(), &mut || {}, stop_the_world) }
}

/// [`repatch`] with `routing`, which becomes the library's routing; `commit` runs inside
/// the stop-the-world just before the sites are written (to switch what must change with
/// them, as the FSGSBASE fast paths do).
///
/// # Safety
///
/// As for [`repatch`]; `routing` must suit the machine as `init` would have decided it.
pub(crate) unsafe fn repatch_routed(
    variant: Variant,
    routing: patch::XenRouting,
    commit: &mut dyn FnMut(),
    stop_the_world: &mut dyn FnMut(&mut dyn FnMut()),
) -> Result<PatchReport, RepatchError> {
    if INIT_STATE.load(Ordering::Acquire) != INIT_DONE {
        return Err(RepatchError::NotInitialised);
    }
    let Some(settings) = SETTINGS.get() else {
        return Err(RepatchError::NotInitialised);
    };
    patch::check_sites(image_sites(), variant, &routing).map_err(RepatchError::Patch)?;
    let write_text = settings.write_text;
    let mut result = None;
    stop_the_world(&mut || {
        commit();
        patch::set_routing(routing);
        let mut write = |address: usize, bytes: &[u8]| {
            // SAFETY: `write_sites` only writes inside live patch sites, which no vCPU
            // executes while the world is stopped (this function's contract).
            unsafe { write_text(address, bytes) }
        };
        // SAFETY: this image's own sites, checked above with the same arguments; every
        // other vCPU is parked outside them and this one runs none of them meanwhile.
        result = Some(unsafe { patch::write_sites(image_sites(), variant, &routing, &mut write) });
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
