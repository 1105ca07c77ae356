//! Several vCPUs: which one is running, checked, and (in a PV kernel) starting one with
//! one call.
//!
//! # vCPU ids
//!
//! The library needs the running vCPU's id for the APIC base's BSP bit and the per-vCPU
//! vPMU state, and a PV guest cannot ask the CPU. The id comes from
//! `Config::with_vcpu_id`, or, by default, from the kit's stacks
//! ([`xenmsr_asm::vcpu`]): the boot vCPU runs on the stack [`pv_entry!`](crate::pv_entry)
//! registers as vCPU 0, and every vCPU `start_vcpu` starts runs on the [`VcpuStack`] it
//! was given, registered under its id before Xen starts it; upcalls and exceptions arrive
//! on the interrupted stack, so the stack under `rsp` names the vCPU everywhere.
//!
//! Whatever gives the id, the library checks it, because a wrong id fails silently
//! (vCPU 1 reading the boot vCPU's APIC base, two vCPUs sharing one vPMU slot):
//!
//! - [`init`](crate::init) requires the id 0 on the boot vCPU (Xen always boots a PV
//!   guest on vCPU 0) and fails with `InitError::BootVcpuId` otherwise (a kernel on its
//!   own stacks that did not give `Config::with_vcpu_id` gets
//!   [`xenmsr_asm::vcpu::UNKNOWN_VCPU`] there);
//! - every other vCPU registers once, before it touches an MSR ([`register_this_vcpu`]:
//!   `start_vcpu` does it for the vCPUs it starts): an id another online vCPU holds
//!   ([`VcpuError::IdInUse`]), an id at or above the domain's vCPU count
//!   ([`VcpuError::NoSuchVcpu`]) or of a vCPU Xen says is down ([`VcpuError::NotUp`]) is
//!   refused.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;
use xenmsr_hypercall::{Errno, HypercallPage};

pub use xenmsr_asm::vcpu::{MAX_VCPUS, StackError, UNKNOWN_VCPU, VcpuStack};

/// How many vCPU ids the online registry tracks (Xen's own limit for a PV guest is far
/// lower in practice; the registry is 512 bytes).
pub const REGISTRY_VCPUS: u32 = 4096;

/// One bit per vCPU id: registered and online.
static ONLINE: [AtomicU64; (REGISTRY_VCPUS / 64) as usize] =
    [const { AtomicU64::new(0) }; (REGISTRY_VCPUS / 64) as usize];

/// What names the running vCPU, and the hypercall page, once [`init`](crate::init) ran.
struct Identity {
    vcpu_id: fn() -> u32,
    hypercalls: HypercallPage,
}

static IDENTITY: Once<Identity> = Once::new();

/// Why a vCPU could not register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuError {
    /// [`init`](crate::init) has not run (on Xen PV): nothing says how to name vCPUs.
    NotInitialised,
    /// The vCPU-id hook could not name the running vCPU ([`UNKNOWN_VCPU`]: not on a kit
    /// stack, and no `Config::with_vcpu_id`).
    Unknown,
    /// The id is beyond [`REGISTRY_VCPUS`].
    OutOfRange(u32),
    /// Another online vCPU registered this id: the vCPU-id hook does not tell vCPUs
    /// apart (a hook that always answers 0, say).
    IdInUse(u32),
    /// Xen has no vCPU with this id (`VCPUOP_is_up` failed: `ENOENT` for an id at or
    /// above the domain's vCPU count).
    NoSuchVcpu(u32, Errno),
    /// Xen says the vCPU with this id is down, so it is not the one running.
    NotUp(u32),
    /// The vCPU is not registered (`offline_this_vcpu` of a vCPU that never registered or
    /// already went offline).
    NotRegistered(u32),
}

impl core::fmt::Display for VcpuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VcpuError::NotInitialised => write!(f, "xenmsr::init has not run"),
            VcpuError::Unknown => write!(
                f,
                "the vCPU id is unknown: not on a kit stack, and no Config::with_vcpu_id hook"
            ),
            VcpuError::OutOfRange(id) => {
                write!(f, "vCPU id {id} is beyond the library's {REGISTRY_VCPUS}")
            }
            VcpuError::IdInUse(id) => write!(
                f,
                "vCPU id {id} is already registered by another online vCPU: the vCPU-id hook does not tell vCPUs apart"
            ),
            VcpuError::NoSuchVcpu(id, e) => {
                write!(
                    f,
                    "Xen has no vCPU {id} (VCPUOP_is_up: {e}): the id is at or above the vCPU count"
                )
            }
            VcpuError::NotUp(id) => {
                write!(
                    f,
                    "Xen says vCPU {id} is down, so the running vCPU is not {id}"
                )
            }
            VcpuError::NotRegistered(id) => write!(f, "vCPU {id} is not registered"),
        }
    }
}

/// Records, at [`init`](crate::init), how vCPUs are named, and registers the boot vCPU
/// (which must be named 0).
pub(crate) fn init_boot_vcpu(vcpu_id: fn() -> u32, hypercalls: HypercallPage) -> Result<(), u32> {
    let id = vcpu_id();
    if id != 0 {
        return Err(id);
    }
    IDENTITY.call_once(|| Identity {
        vcpu_id,
        hypercalls,
    });
    ONLINE[0].fetch_or(1, Ordering::AcqRel);
    Ok(())
}

/// Checks an id the boot vCPU's [`init`](crate::init) would accept, without storing
/// anything (the check phase of `init`).
pub(crate) fn check_boot_vcpu(vcpu_id: fn() -> u32) -> Result<(), u32> {
    match vcpu_id() {
        0 => Ok(()),
        other => Err(other),
    }
}

/// The running vCPU's id as the library sees it (the `Config::with_vcpu_id` hook, or the
/// kit's stacks), once [`init`](crate::init) ran on Xen PV; before, or natively, the
/// kit's stacks' answer ([`xenmsr_asm::vcpu::current`]).
pub fn current_vcpu() -> Option<u32> {
    match IDENTITY.get() {
        Some(identity) => Some((identity.vcpu_id)()).filter(|&id| id != UNKNOWN_VCPU),
        None => xenmsr_asm::vcpu::current(),
    }
}

/// Whether vCPU `id` is registered (the boot vCPU from [`init`](crate::init) on).
pub fn is_registered(id: u32) -> bool {
    id < REGISTRY_VCPUS
        && ONLINE[(id / 64) as usize].load(Ordering::Acquire) & (1 << (id % 64)) != 0
}

/// Registers the calling vCPU under the id the library's vCPU-id hook gives it (see the
/// module docs for what is checked). Call it once on every vCPU but the boot one, before
/// the vCPU touches an MSR; `start_vcpu` (in a PV kernel) does it for the vCPUs it starts.
pub fn register_this_vcpu() -> Result<u32, VcpuError> {
    let identity = IDENTITY.get().ok_or(VcpuError::NotInitialised)?;
    let id = (identity.vcpu_id)();
    register_checked(id, |id| check_id_with_xen(identity.hypercalls, id))
}

/// What [`offline_this_vcpu`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offline {
    /// The vCPU's id.
    pub id: u32,
    /// Whether its vPMU page was registered, and is now parked for [`online_this_vcpu`].
    pub vpmu_parked: bool,
}

/// What [`online_this_vcpu`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Online {
    /// The vCPU's id.
    pub id: u32,
    /// Whether CR4.FSGSBASE had to be set again (it is set whenever `init` enabled
    /// FSGSBASE: the sites use the instructions).
    pub fsgsbase_restored: bool,
    /// The vPMU page registered again (`None`: nothing was parked).
    pub vpmu: Option<Result<(), crate::pmu::PmuError>>,
}

/// Takes the calling vCPU out of the library's books before it goes down (it then calls
/// `VCPUOP_down` on itself, or another vCPU takes it down): its vPMU registration is
/// finished (`XENPMU_finish`, as Linux does for a CPU going offline) and its page parked
/// for [`online_this_vcpu`], and its id is unregistered. Call it with nothing of the
/// library's in progress on this vCPU (its upcalls masked, as Linux's CPU hot-unplug
/// runs). Not for the boot vCPU, which the domain cannot take down.
pub fn offline_this_vcpu() -> Result<Offline, VcpuError> {
    let identity = IDENTITY.get().ok_or(VcpuError::NotInitialised)?;
    let id = (identity.vcpu_id)();
    if id == UNKNOWN_VCPU {
        return Err(VcpuError::Unknown);
    }
    if !is_registered(id) {
        return Err(VcpuError::NotRegistered(id));
    }
    let vpmu_parked = crate::pmu::park(id).is_ok();
    ONLINE[(id / 64) as usize].fetch_and(!(1u64 << (id % 64)), Ordering::AcqRel);
    Ok(Offline { id, vpmu_parked })
}

/// Puts the calling vCPU back in the library's books when it is up again (on its return
/// from `VCPUOP_down`): registers its id ([`register_this_vcpu`]'s checks), sets
/// CR4.FSGSBASE again if `init` enabled FSGSBASE and the bit is gone, and registers
/// again the vPMU page [`offline_this_vcpu`] parked. Call it before the vCPU touches an
/// MSR.
pub fn online_this_vcpu() -> Result<Online, VcpuError> {
    let id = register_this_vcpu()?;
    let fsgsbase_restored = restore_fsgsbase();
    let vpmu = crate::pmu::global()
        .is_parked(id)
        .then(|| crate::pmu::unpark(id));
    Ok(Online {
        id,
        fsgsbase_restored,
        vpmu,
    })
}

/// Sets CR4.FSGSBASE on this vCPU if the sites rely on it and it is clear; whether it
/// did.
pub(crate) fn restore_fsgsbase() -> bool {
    #[cfg(target_os = "none")]
    if crate::fsgsbase::enabled() {
        // SAFETY: `init` enabled FSGSBASE (the kernel opted in, `FsGsBase::Use`'s
        // contract), so setting the bit again on this vCPU only restores what the sites
        // rely on; CR4 reads and writes are emulated by Xen for a PV kernel.
        let cr4 = unsafe { crate::fsgsbase::read_cr4() };
        if cr4 & crate::fsgsbase::CR4_FSGSBASE == 0 {
            // SAFETY: as above.
            return unsafe { crate::fsgsbase::enable_on_this_vcpu() };
        }
    }
    false
}

/// The registration's bookkeeping, with Xen's view of `id` given by `xen_check`./// The registration's bookkeeping, with Xen's view of `id` given by `xen_check`.
fn register_checked(
    id: u32,
    xen_check: impl FnOnce(u32) -> Result<(), VcpuError>,
) -> Result<u32, VcpuError> {
    if id == UNKNOWN_VCPU {
        return Err(VcpuError::Unknown);
    }
    if id >= REGISTRY_VCPUS {
        return Err(VcpuError::OutOfRange(id));
    }
    // An id someone holds is the hook's fault whatever Xen says: answer that first.
    if is_registered(id) {
        return Err(VcpuError::IdInUse(id));
    }
    xen_check(id)?;
    let bit = 1u64 << (id % 64);
    if ONLINE[(id / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
        return Err(VcpuError::IdInUse(id));
    }
    Ok(id)
}

/// Asks Xen whether `id` names a vCPU that is up (`VCPUOP_is_up`).
#[doc(hidden)]
pub fn check_id_with_xen(hypercalls: HypercallPage, id: u32) -> Result<(), VcpuError> {
    match hypercalls.vcpu_is_up(id) {
        Ok(true) => Ok(()),
        Ok(false) => Err(VcpuError::NotUp(id)),
        Err(e) => Err(VcpuError::NoSuchVcpu(id, e)),
    }
}

#[cfg(target_os = "none")]
pub use start::{StartError, initial_context, start_vcpu};

/// Starting a secondary vCPU on the kit's trap entry.
#[cfg(target_os = "none")]
mod start {
    use core::arch::global_asm;
    use core::sync::atomic::{AtomicU8, Ordering};

    use xenmsr_hypercall::Errno;
    use xenmsr_hypercall::abi::VcpuGuestContext;
    use xenmsr_hypercall::nr;

    use super::{IDENTITY, MAX_VCPUS, StackError, VcpuError, VcpuStack};

    /// Why [`start_vcpu`] failed. On every error but [`StartError::Register`] and
    /// [`StartError::Timeout`] the vCPU never ran.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum StartError {
        /// [`init`](crate::init) has not run.
        NotInitialised,
        /// The stack or the id was refused ([`StackError`]).
        Stack(StackError),
        /// `VCPUOP_is_up` failed: Xen has no such vCPU (`ENOENT`: the id is at or above
        /// the domain's vCPU count; a dom0 gets `dom0_max_vcpus=` vCPUs).
        NoSuchVcpu(u32, Errno),
        /// The vCPU is already up.
        AlreadyUp(u32),
        /// `VCPUOP_initialise` failed.
        Initialise(u32, Errno),
        /// `VCPUOP_up` failed.
        Up(u32, Errno),
        /// The vCPU ran, but its registration failed (it then took itself down).
        Register(VcpuError),
        /// The vCPU did not report in time.
        Timeout(u32),
    }

    impl core::fmt::Display for StartError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                StartError::NotInitialised => write!(f, "xenmsr::init has not run"),
                StartError::Stack(e) => write!(f, "{e}"),
                StartError::NoSuchVcpu(v, e) => write!(
                    f,
                    "Xen has no vCPU {v} (VCPUOP_is_up: {e}; a dom0 needs dom0_max_vcpus=, a domU vcpus=)"
                ),
                StartError::AlreadyUp(v) => write!(f, "vCPU {v} is already up"),
                StartError::Initialise(v, e) => write!(f, "VCPUOP_initialise({v}): {e}"),
                StartError::Up(v, e) => write!(f, "VCPUOP_up({v}): {e}"),
                StartError::Register(e) => write!(f, "the new vCPU could not register: {e}"),
                StartError::Timeout(v) => write!(f, "vCPU {v} never reported"),
            }
        }
    }

    /// Per id: what the starting vCPU reported.
    const STARTING: u8 = 0;
    const READY: u8 = 1;
    const FAILED: u8 = 2;
    static REPORT: [AtomicU8; MAX_VCPUS] = [const { AtomicU8::new(STARTING) }; MAX_VCPUS];
    static FAILURE: [spin::Mutex<Option<VcpuError>>; MAX_VCPUS] =
        [const { spin::Mutex::new(None) }; MAX_VCPUS];

    // A secondary vCPU starts here with the context `start_vcpu` gives it: `rsp` = the top
    // of its stack (16-byte aligned), `rdi` = its id, `rsi` = the kernel's entry function,
    // events masked. The call leaves `rsp` at 8 mod 16 in `secondary_main`, as the ABI
    // wants at a function's first instruction.
    global_asm!(
        ".pushsection .text.xenmsr_secondary, \"ax\", @progbits",
        ".globl xenmsr_pv_secondary_start",
        ".type xenmsr_pv_secondary_start, @function",
        "xenmsr_pv_secondary_start:",
        "cld",
        "and $-16, %rsp",
        "xor %ebp, %ebp",
        "call {main}",
        "ud2",
        ".size xenmsr_pv_secondary_start, . - xenmsr_pv_secondary_start",
        ".popsection",
        main = sym secondary_main,
        options(att_syntax)
    );

    unsafe extern "C" {
        fn xenmsr_pv_secondary_start();
    }

    /// Starts vCPU `id` running `entry(id)` on `stack`, with the calling vCPU's page
    /// tables, the kit's trap table and callbacks (`pv::trap_table`,
    /// `pv::callback_entries`; the failsafe callback masks events), the flat kernel
    /// selectors, CR4.FSGSBASE if `init` enabled it, and events masked. The new vCPU
    /// registers itself ([`register_this_vcpu`](super::register_this_vcpu)) before
    /// `entry` runs; this returns once it has, so `entry` may touch MSRs at once.
    ///
    /// Each stack serves one vCPU for the kernel's life (a second use is
    /// [`StackError::StackTaken`]); `id` must be a vCPU of the domain that is down (a dom0
    /// gets `dom0_max_vcpus=` of them, a domU `vcpus=`).
    pub fn start_vcpu(
        id: u32,
        stack: &'static VcpuStack,
        entry: fn(u32) -> !,
    ) -> Result<(), StartError> {
        let identity = IDENTITY.get().ok_or(StartError::NotInitialised)?;
        let page = identity.hypercalls;
        match page.vcpu_is_up(id) {
            Ok(false) => {}
            Ok(true) => return Err(StartError::AlreadyUp(id)),
            Err(e) => return Err(StartError::NoSuchVcpu(id, e)),
        }
        // SAFETY: only vCPU `id` will run on `stack`: it is claimed here for good (a
        // second claim fails), and the context below starts vCPU `id` on it.
        unsafe { xenmsr_asm::vcpu::register(id, stack) }.map_err(StartError::Stack)?;
        let ctx = context(id, stack, entry);
        // SAFETY: the context starts `xenmsr_pv_secondary_start` (which never returns) on
        // a stack this vCPU alone owns (just claimed), with this kernel's page tables, the
        // kit's trap stubs and callbacks, which follow Xen's bounce-frame contract.
        unsafe { page.vcpu_initialise(id, &ctx) }.map_err(|e| StartError::Initialise(id, e))?;
        // SAFETY: just initialised with that context.
        unsafe { page.vcpu_up(id) }.map_err(|e| StartError::Up(id, e))?;
        let report = &REPORT[id as usize];
        for _ in 0..2_000_000u32 {
            match report.load(Ordering::Acquire) {
                READY => return Ok(()),
                FAILED => {
                    let failure = FAILURE[id as usize].lock().take();
                    return Err(StartError::Register(failure.unwrap_or(VcpuError::Unknown)));
                }
                _ => {
                    let _ = page.sched_yield();
                }
            }
        }
        Err(StartError::Timeout(id))
    }

    /// The initial context of vCPU `id` for `start_vcpu`: the kit's secondary entry, with
    /// the id and the kernel's entry function for it.
    fn context(id: u32, stack: &'static VcpuStack, entry: fn(u32) -> !) -> VcpuGuestContext {
        let mut ctx = initial_context(
            xenmsr_pv_secondary_start as *const () as usize as u64,
            stack.top() as u64,
        );
        ctx.user_regs.rdi = u64::from(id);
        ctx.user_regs.rsi = entry as *const () as usize as u64;
        ctx
    }

    /// The `VCPUOP_initialise` context [`start_vcpu`] gives a vCPU, for a kernel with a
    /// bring-up of its own: kernel mode at `rip` with `rsp` = `stack_top` (the kernel's
    /// entry aligns it, as the kit's does), the calling vCPU's page tables (`cr3`), the
    /// kit's trap table in the 256-entry shape Xen wants, the kit's event and failsafe
    /// callbacks (`VGCF_failsafe_disables_events`: the failsafe handler runs with events
    /// masked, as `pv::install_callbacks` arranges on the boot vCPU), the flat kernel
    /// selectors, CR4.FSGSBASE if `init` enabled it, and events masked. The kernel adds
    /// its own argument registers (`user_regs.rdi`, ...) before `vcpu_initialise`.
    pub fn initial_context(rip: u64, stack_top: u64) -> VcpuGuestContext {
        let mut ctx = VcpuGuestContext::zeroed();
        ctx.flags =
            VcpuGuestContext::VGCF_IN_KERNEL | VcpuGuestContext::VGCF_FAILSAFE_DISABLES_EVENTS;
        ctx.user_regs.rip = rip;
        ctx.user_regs.rsp = stack_top;
        ctx.user_regs.cs = nr::FLAT_KERNEL_CS;
        ctx.user_regs.ss = nr::FLAT_KERNEL_SS;
        // Only the always-set bit: IF clear, so events start masked.
        ctx.user_regs.rflags = 1 << 1;
        ctx.user_regs.saved_upcall_mask = 1;
        for trap in xenmsr_asm::pv::trap_table() {
            if trap.address != 0 {
                ctx.trap_ctxt[usize::from(trap.vector)] = trap;
            }
        }
        ctx.kernel_ss = u64::from(nr::FLAT_KERNEL_SS);
        ctx.kernel_sp = stack_top;
        ctx.ctrlreg[3] = read_cr3();
        // Xen filters ctrlreg[4] as it does a `mov` to CR4; a vCPU must have FSGSBASE
        // from its first instruction if `init` enabled it (the sites use it).
        ctx.ctrlreg[4] = crate::fsgsbase::secondary_cr4();
        let (event, failsafe) = xenmsr_asm::pv::callback_entries();
        ctx.event_callback_eip = event;
        ctx.failsafe_callback_eip = failsafe;
        ctx
    }

    /// The calling vCPU's top-level page table in `cr3` format.
    fn read_cr3() -> u64 {
        let cr3: u64;
        // SAFETY: `mov %cr3` traps to Xen, which emulates the read for a PV kernel (the
        // L4's machine frame in cr3 format); no memory is touched.
        unsafe {
            core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags))
        };
        cr3
    }

    /// A secondary vCPU's first Rust code: registers it, reports, runs the kernel's entry.
    extern "C" fn secondary_main(id: u64, entry: u64) -> ! {
        let id = id as u32;
        // SAFETY: `start_vcpu` put a `fn(u32) -> !` in rsi; function pointers round-trip
        // through integers of their size.
        let entry = unsafe { core::mem::transmute::<usize, fn(u32) -> !>(entry as usize) };
        let registered = if xenmsr_asm::vcpu::current() == Some(id) {
            super::register_this_vcpu()
        } else {
            Err(VcpuError::Unknown)
        };
        match registered {
            Ok(_) => {
                REPORT[id as usize].store(READY, Ordering::Release);
                entry(id)
            }
            Err(e) => {
                *FAILURE[id as usize].lock() = Some(e);
                REPORT[id as usize].store(FAILED, Ordering::Release);
                let page = xenmsr_hypercall::HypercallPage::xen();
                loop {
                    // SAFETY: taking the calling vCPU down; nothing of it is used again.
                    let _ = unsafe { page.vcpu_down(id) };
                    let _ = page.sched_yield();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The registry is global, so the cases run in order in one test (ids from 100 up, away
    // from the boot vCPU's 0).
    #[test]
    fn registration_refuses_unknown_duplicate_and_out_of_range_ids() {
        let up = |_| Ok(());
        assert_eq!(register_checked(UNKNOWN_VCPU, up), Err(VcpuError::Unknown));
        assert_eq!(
            register_checked(REGISTRY_VCPUS, up),
            Err(VcpuError::OutOfRange(REGISTRY_VCPUS))
        );
        assert_eq!(register_checked(100, up), Ok(100));
        assert!(is_registered(100));
        // A second vCPU the hook names 100 too: the forgotten-hook case.
        let mut asked_xen = false;
        let r = register_checked(100, |_| {
            asked_xen = true;
            Ok(())
        });
        assert_eq!(r, Err(VcpuError::IdInUse(100)));
        assert!(!asked_xen, "an id in use is refused before asking Xen");
        assert_eq!(
            register_checked(101, |id| Err(VcpuError::NoSuchVcpu(id, Errno::ENOENT))),
            Err(VcpuError::NoSuchVcpu(101, Errno::ENOENT))
        );
        assert!(!is_registered(101), "a refused id stays free");
        assert_eq!(
            register_checked(101, |id| Err(VcpuError::NotUp(id))),
            Err(VcpuError::NotUp(101))
        );
        assert_eq!(register_checked(101, up), Ok(101));
    }
}
