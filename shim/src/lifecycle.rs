//! Suspend and resume (`xl save`/`xl restore`, `xl migrate`): what the library re-does
//! after Xen has moved the domain, and when the kernel calls it.
//!
//! A save or a migration suspends the domain (`SCHEDOP_shutdown(SHUTDOWN_suspend)` on
//! vCPU 0), and the domain wakes up either in a new domain (the hypercall returns 0) or,
//! when the toolstack gave up, in the same one (it returns 1: the suspend was cancelled).
//! A new domain keeps the vCPUs' registers, FS/GS bases, CR4 bits, trap table and
//! callbacks, and the MSRs Xen migrates (`SPEC_CTRL` among them), but Xen has forgotten
//! every vPMU registration, every page's machine frame has changed, and the CPUID
//! policy is the new host's. This module is the library's half of that, in the order a
//! kernel runs it (Linux: `xen_arch_suspend` and `xen_arch_resume`):
//!
//! 1. on every vCPU, before it parks for the suspend: [`suspend_this_vcpu`] (its
//!    `SPEC_CTRL` saved and zeroed, as Linux does);
//! 2. on vCPU 0, once the others are parked and its own upcalls masked: [`suspend`]
//!    (every registered vPMU finished with `XENPMU_finish`, its page kept);
//! 3. the kernel's own suspend: the suspend hypercall, with what the kernel owns around
//!    it (the shared-info mapping, the start-info fields, see `docs/integrating.md`);
//! 4. on vCPU 0, with the others still parked: [`resume`] with the hypercall's outcome
//!    ([`SuspendOutcome::from_return`]): the patch decisions checked against the CPUID
//!    of the domain it woke up in (re-patched through the kernel's stop-the-world if
//!    anything changed), every vPMU page registered again at its new frame;
//! 5. on every vCPU, once released: [`resume_this_vcpu`] (its `SPEC_CTRL` written back,
//!    CR4.FSGSBASE set again if the sites use it and the bit is gone).
//!
//! Nothing here touches event channels, timers, the shared-info page or xenstore: those
//! are the kernel's (the kit's `events` module has its own resume).

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use xenmsr_asm::vcpu::MAX_VCPUS;

use crate::patch::{PatchReport, Variant, XenRouting};
use crate::{RepatchError, fsgsbase, pmu};

/// `IA32_SPEC_CTRL`.
pub const MSR_SPEC_CTRL: u32 = 0x48;

/// Why a lifecycle step did nothing or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleError {
    /// `xenmsr::init` has not succeeded on Xen PV.
    NotInitialised,
    /// The step runs on the boot vCPU only (the suspend hypercall is made there); it ran
    /// on this vCPU.
    NotBootVcpu(Option<u32>),
    /// The calling vCPU has no id the library knows, or one beyond [`MAX_VCPUS`].
    NoVcpuId(Option<u32>),
    /// [`resume`] without a [`suspend`] before it (or twice).
    NotSuspended,
    /// [`suspend`] while a suspend is already in progress.
    AlreadySuspended,
    /// The suspend hypercall returned something other than 0 (new domain) or 1
    /// (cancelled): a negative errno, the suspend did not happen.
    UnexpectedReturn(i64),
    /// The patch decisions changed and the re-patch failed (the sites keep the code they
    /// had, which is right only for the old CPUID).
    Repatch(RepatchError),
}

impl fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LifecycleError::NotInitialised => write!(f, "xenmsr::init has not run on Xen PV"),
            LifecycleError::NotBootVcpu(id) => {
                write!(f, "this step runs on vCPU 0 only (called on {id:?})")
            }
            LifecycleError::NoVcpuId(id) => write!(f, "no usable vCPU id ({id:?})"),
            LifecycleError::NotSuspended => write!(f, "resume without a suspend"),
            LifecycleError::AlreadySuspended => write!(f, "a suspend is already in progress"),
            LifecycleError::UnexpectedReturn(rc) => {
                write!(f, "the suspend hypercall returned {rc} (not 0 or 1)")
            }
            LifecycleError::Repatch(e) => write!(f, "re-patching after the resume: {e}"),
        }
    }
}

/// How the suspend hypercall came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspendOutcome {
    /// It returned 0: the domain runs in a new domain (restored or migrated), every page at
    /// a new machine frame, the vPMU forgotten.
    NewDomain,
    /// It returned 1: the toolstack cancelled (a failed save or migration, `xl save -c`);
    /// the same domain runs on, only the guest's own undoing is needed.
    Cancelled,
}

impl SuspendOutcome {
    /// The outcome of the suspend hypercall's return value.
    pub fn from_return(rc: i64) -> Result<Self, LifecycleError> {
        match rc {
            0 => Ok(SuspendOutcome::NewDomain),
            1 => Ok(SuspendOutcome::Cancelled),
            other => Err(LifecycleError::UnexpectedReturn(other)),
        }
    }
}

/// What [`suspend_this_vcpu`] did on a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSuspended {
    /// The vCPU.
    pub id: u32,
    /// `SPEC_CTRL` as it was (now 0), or `None` where the vCPU cannot read it (the CPU
    /// policy does not expose it): nothing to restore.
    pub spec_ctrl: Option<u64>,
}

/// What [`resume_this_vcpu`] did on a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuResumed {
    /// The vCPU.
    pub id: u32,
    /// The `SPEC_CTRL` value written back, and whether Xen took it.
    pub spec_ctrl: Option<(u64, bool)>,
    /// Whether CR4.FSGSBASE had to be set again.
    pub fsgsbase_restored: bool,
}

/// What [`suspend`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspended {
    /// vPMU registrations finished (their pages kept for [`resume`]).
    pub vpmu_finished: u32,
    /// vPMU registrations Xen refused to finish (Xen may still write those pages: they
    /// are never registered again).
    pub vpmu_errors: u32,
}

/// What [`resume`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// How the suspend came back.
    pub outcome: SuspendOutcome,
    /// vPMU pages registered again.
    pub vpmu_registered: u32,
    /// vPMU pages Xen did not take again (they stay parked; their vCPUs' PMU MSRs go to
    /// Xen's trapped path, which is always correct, only slower).
    pub vpmu_errors: u32,
    /// Pages parked while their vCPUs were offline (not registered at the suspend) whose
    /// new frames were recorded for `smp::online_this_vcpu` (new domain only).
    pub vpmu_reframed: u32,
    /// The patch decisions in the new domain.
    pub decisions: Decisions,
    /// Whether they differ from the ones the sites had.
    pub decisions_changed: bool,
    /// What the re-patch rewrote, if the decisions changed in a way the sites depend on.
    pub repatched: Option<PatchReport>,
}

/// The decisions `init` took from CPUID that a resume checks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decisions {
    /// The sites use FSGSBASE instructions (CPUID has them and CR4.FSGSBASE stuck).
    pub fsgsbase: bool,
    /// The PMU layout the domain's CPUID describes.
    pub pmu_layout: pmu::PmuLayout,
}

/// No suspend in progress.
const PHASE_RUNNING: u8 = 0;
/// [`suspend`] ran; [`resume`] has not.
const PHASE_SUSPENDED: u8 = 1;

static PHASE: AtomicU8 = AtomicU8::new(PHASE_RUNNING);
/// One bit per vCPU whose vPMU [`suspend`] finished (and [`resume`] registers again).
static VPMU_SUSPENDED: AtomicU64 = AtomicU64::new(0);
/// Each vCPU's `SPEC_CTRL` saved by [`suspend_this_vcpu`], and whether one was.
static SPEC_CTRL: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static SPEC_CTRL_SAVED: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];

fn this_vcpu() -> Result<u32, LifecycleError> {
    match crate::smp::current_vcpu() {
        Some(id) if (id as usize) < MAX_VCPUS => Ok(id),
        other => Err(LifecycleError::NoVcpuId(other)),
    }
}

fn on_boot_vcpu() -> Result<(), LifecycleError> {
    match crate::smp::current_vcpu() {
        Some(0) => Ok(()),
        other => Err(LifecycleError::NotBootVcpu(other)),
    }
}

/// The calling vCPU's part of a suspend, before it parks: saves its `SPEC_CTRL` and
/// writes 0 (Linux's `xen_vcpu_notify_suspend`: the value is the vCPU's, and a 0 is
/// what any host accepts). Run it on every online vCPU, vCPU 0 included, with upcalls
/// masked. A vCPU whose `SPEC_CTRL` read faults has nothing saved.
pub fn suspend_this_vcpu() -> Result<VcpuSuspended, LifecycleError> {
    let id = this_vcpu()?;
    // SAFETY: reading SPEC_CTRL has no side effects; a fault comes back as Err.
    let spec_ctrl = unsafe { crate::rdmsr_safe(MSR_SPEC_CTRL) }.ok();
    if let Some(value) = spec_ctrl {
        SPEC_CTRL[id as usize].store(value, Ordering::Relaxed);
        if value != 0 {
            // SAFETY: turning speculation controls off for the suspend only weakens
            // mitigations until `resume_this_vcpu` writes the value back (Linux does the
            // same); it changes no memory.
            let _ = unsafe { crate::wrmsr_safe(MSR_SPEC_CTRL, 0) };
        }
    }
    SPEC_CTRL_SAVED[id as usize].store(spec_ctrl.is_some(), Ordering::Release);
    Ok(VcpuSuspended { id, spec_ctrl })
}

/// vCPU 0's part of a suspend, once every other vCPU ran [`suspend_this_vcpu`] and is
/// parked and vCPU 0's upcalls are masked, right before the kernel's own suspend steps:
/// finishes every registered vPMU (`XENPMU_finish`; Xen does not carry a vPMU across a
/// save, and a registration left in place makes the one after a cancelled suspend fail),
/// keeping each page for [`resume`].
pub fn suspend() -> Result<Suspended, LifecycleError> {
    if crate::INIT_STATE.load(Ordering::Acquire) != crate::INIT_DONE {
        return Err(LifecycleError::NotInitialised);
    }
    on_boot_vcpu()?;
    if PHASE
        .compare_exchange(
            PHASE_RUNNING,
            PHASE_SUSPENDED,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        return Err(LifecycleError::AlreadySuspended);
    }
    let vpmu = pmu::global();
    let (mut finished, mut errors, mut bits) = (0, 0, 0u64);
    for vcpu in 0..MAX_VCPUS as u32 {
        if !vpmu.is_initialized(vcpu) {
            continue;
        }
        match vpmu.park_vcpu(vcpu) {
            Ok(()) => {
                finished += 1;
                bits |= 1 << vcpu;
            }
            Err(_) => errors += 1,
        }
    }
    VPMU_SUSPENDED.store(bits, Ordering::Release);
    Ok(Suspended {
        vpmu_finished: finished,
        vpmu_errors: errors,
    })
}

/// The decisions the sites are patched with now.
pub fn current_decisions() -> Decisions {
    let routing = crate::patch::routing();
    Decisions {
        fsgsbase: fsgsbase::enabled(),
        pmu_layout: routing.layout.unwrap_or(pmu::global().layout()),
    }
}

/// The decisions `init` would take from `cpuid` for a kernel whose sites use FSGSBASE
/// when `fsgsbase_in_use` (a resume never turns FSGSBASE on: every vCPU would need
/// CR4.FSGSBASE first; it only turns it off when the CPU lost it).
pub fn decisions_from_cpuid(
    cpuid: impl Fn(u32, u32) -> [u32; 4] + Copy,
    fsgsbase_in_use: bool,
) -> Decisions {
    Decisions {
        fsgsbase: fsgsbase_in_use && fsgsbase::cpuid_has_fsgsbase(cpuid),
        pmu_layout: pmu::PmuLayout::from_cpuid(cpuid),
    }
}

/// vCPU 0's part of a resume, right after the suspend hypercall returned and the kernel
/// restored what it owns (the other vCPUs still parked, vCPU 0's upcalls masked):
///
/// - **CPUID.** The decisions `init` took from CPUID ([`Decisions`]) are taken again
///   from the domain's CPUID now. If they changed, every site is re-patched for the new
///   ones through `stop_the_world` (the [`repatch`](crate::repatch) protocol; the other
///   vCPUs are parked already, so the kernel's hook may simply run the closure): FS/GS
///   base sites leave FSGSBASE if the CPU lost it, constant-index PMU sites follow the
///   new layout. If the PMU layout changed, the vPMU pages are not registered again (the
///   backend's layout is the old CPU's; they stay parked): those vCPUs' PMU MSRs go to
///   Xen's trapped path, which answers for the new CPU.
/// - **vPMU.** Every page [`suspend`] finished is registered again: at the frame it had
///   after a cancelled suspend, at the frame `page_mfn` gives for it in a new domain
///   (the p2m the toolstack rewrote). A page parked earlier, while its vCPU went
///   offline, gets its new frame recorded too, for
///   [`online_this_vcpu`](crate::smp::online_this_vcpu) when the vCPU comes back.
///
/// Safe code cannot hand Xen frames of its choosing:
///
/// ```compile_fail,E0133
/// use xenmsr::lifecycle::{resume, SuspendOutcome};
/// fn any_frame() {
///     let _ = resume(SuspendOutcome::NewDomain, &|_| 0x1234, &mut |patch| patch());
/// }
/// ```
///
/// # Safety
///
/// - `page_mfn` must return the machine frame of the page at the address it is given, in
///   the domain as it is now (Xen maps that frame and writes the vCPU's PMU state there).
/// - `stop_the_world` must meet [`repatch`](crate::repatch)'s contract, and this vCPU's
///   upcalls must be masked.
pub unsafe fn resume(
    outcome: SuspendOutcome,
    page_mfn: &dyn Fn(NonNull<u8>) -> u64,
    stop_the_world: &mut dyn FnMut(&mut dyn FnMut()),
) -> Result<Resumed, LifecycleError> {
    on_boot_vcpu()?;
    if PHASE.load(Ordering::Acquire) != PHASE_SUSPENDED {
        return Err(LifecycleError::NotSuspended);
    }
    let Some(cpuid) = crate::SETTINGS.get().and_then(|s| s.cpuid) else {
        return Err(LifecycleError::NotInitialised);
    };
    let before = current_decisions();
    let now = decisions_from_cpuid(cpuid, before.fsgsbase);
    let decisions_changed = now != before;
    let mut repatched = None;
    let mut repatch_error = None;
    if decisions_changed {
        // The routing `init` would take on this CPU: the constant-index sites of MSRs that
        // are PMU MSRs only on the old CPU go back to the instruction (Xen answers them),
        // and the FS/GS base sites leave FSGSBASE if the CPU lost it.
        let routing = XenRouting {
            fsgsbase: now.fsgsbase,
            layout: Some(now.pmu_layout),
            ..crate::patch::routing()
        };
        let mut commit = || {
            fsgsbase::set_enabled(now.fsgsbase);
            // SAFETY: off: the fast paths stop using the instructions, which are correct
            // without them (their hypercall route is always right).
            unsafe { xenmsr_asm::fastpath::set_fsgsbase_enabled(now.fsgsbase) };
        };
        // SAFETY: the caller's stop-the-world and masked upcalls; the routing is the
        // one `init` would take on this CPU.
        match unsafe { crate::repatch_routed(Variant::XenPv, routing, &mut commit, stop_the_world) }
        {
            Ok(report) => repatched = Some(report),
            Err(e) => repatch_error = Some(e),
        }
    }
    let vpmu = pmu::global();
    let bits = VPMU_SUSPENDED.swap(0, Ordering::AcqRel);
    // Pages parked before the suspend (their vCPUs offline) moved too: record their new
    // frames, so that `online_this_vcpu` registers the page where it is now.
    let mut reframed = 0;
    if outcome == SuspendOutcome::NewDomain {
        for vcpu in (0..MAX_VCPUS as u32).filter(|v| bits & (1 << v) == 0) {
            if let Some(page) = vpmu.parked_page(vcpu) {
                // SAFETY: `page_mfn` gives the page's frame in this domain (caller).
                if unsafe { vpmu.set_parked_frame(vcpu, page_mfn(page)) } {
                    reframed += 1;
                }
            }
        }
    }
    let (mut registered, mut errors) = (0, 0);
    if now.pmu_layout == before.pmu_layout {
        for vcpu in (0..MAX_VCPUS as u32).filter(|v| bits & (1 << v) != 0) {
            let r = match outcome {
                SuspendOutcome::Cancelled => vpmu.unpark_vcpu(vcpu),
                SuspendOutcome::NewDomain => match vpmu.parked_page(vcpu) {
                    // SAFETY: `page_mfn` gives the page's frame in this domain (caller).
                    Some(page) => unsafe { vpmu.unpark_vcpu_at(vcpu, page_mfn(page)) },
                    None => Err(pmu::PmuError::NotInitialized),
                },
            };
            match r {
                Ok(()) => registered += 1,
                Err(_) => errors += 1,
            }
        }
    } else {
        errors = bits.count_ones();
    }
    PHASE.store(PHASE_RUNNING, Ordering::Release);
    if let Some(e) = repatch_error {
        return Err(LifecycleError::Repatch(e));
    }
    Ok(Resumed {
        outcome,
        vpmu_registered: registered,
        vpmu_errors: errors,
        vpmu_reframed: reframed,
        decisions: now,
        decisions_changed,
        repatched,
    })
}

/// The calling vCPU's part of a resume, once vCPU 0's [`resume`] ran and this vCPU is
/// released, before it runs an MSR access of its own: writes back the `SPEC_CTRL`
/// [`suspend_this_vcpu`] saved, and sets CR4.FSGSBASE again if the sites use it and the
/// bit is gone (Xen keeps it across a save on the same CPU; a CPU policy without it
/// drops it, and then [`resume`] has turned the sites off it). Upcalls masked.
pub fn resume_this_vcpu() -> Result<VcpuResumed, LifecycleError> {
    let id = this_vcpu()?;
    let spec_ctrl = if SPEC_CTRL_SAVED[id as usize].swap(false, Ordering::AcqRel) {
        let value = SPEC_CTRL[id as usize].load(Ordering::Relaxed);
        // SAFETY: the value this vCPU had before the suspend; it changes no memory.
        let ok = value == 0 || unsafe { crate::wrmsr_safe(MSR_SPEC_CTRL, value) }.is_ok();
        Some((value, ok))
    } else {
        None
    };
    Ok(VcpuResumed {
        id,
        spec_ctrl,
        fsgsbase_restored: crate::smp::restore_fsgsbase(),
    })
}
