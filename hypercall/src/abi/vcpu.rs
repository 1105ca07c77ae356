//! vCPUs and events: the initial context of a secondary vCPU, the shared info page with its
//! per-vCPU `vcpu_info` (event-upcall mask and pending flags, time info) and the 2-level
//! event-channel bitmaps, and the arguments of the vCPU, event-channel and callback ops.
//!
//! [`SharedInfo`] and [`VcpuInfo`] describe memory Xen writes at any time. They exist for
//! their layout (offsets, sizes, the checks against Xen's headers): a kernel maps the page
//! and accesses single fields through raw pointers with volatile or atomic accesses,
//! never through a Rust reference to the whole struct.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::abi::TrapInfo;

/// `XEN_LEGACY_MAX_VCPUS`: the number of `vcpu_info` slots in the shared info page. A
/// vCPU with a higher id needs `VCPUOP_register_vcpu_info`.
pub const LEGACY_MAX_VCPUS: usize = 32;

/// The general registers of a vCPU context (`struct cpu_user_regs`, x86-64, 200 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[allow(missing_docs)] // the registers are their names
pub struct CpuUserRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// Xen-private.
    pub error_code: u32,
    /// Xen-private.
    pub entry_vector: u32,
    pub rip: u64,
    pub cs: u16,
    pub pad0: u16,
    /// The event-upcall mask to restore (`rflags.IF == !saved_upcall_mask`).
    pub saved_upcall_mask: u8,
    pub pad1: [u8; 3],
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u16,
    pub pad2: [u16; 3],
    pub es: u16,
    pub pad3: [u16; 3],
    pub ds: u16,
    pub pad4: [u16; 3],
    pub fs: u16,
    pub pad5: [u16; 3],
    pub gs: u16,
    pub pad6: [u16; 3],
}

/// The context `VCPUOP_initialise` starts a vCPU with (`struct vcpu_guest_context`,
/// x86-64, 5168 bytes).
///
/// Build it with [`VcpuGuestContext::zeroed`] and fill in what the vCPU needs: for a
/// 64-bit PV kernel at least `flags` ([`Self::VGCF_IN_KERNEL`]), `user_regs` (`rip`,
/// `rsp`, `cs`, `ss`), `trap_ctxt`, `kernel_ss`/`kernel_sp`, `ctrlreg[3]` (the top-level
/// page table in `cr3` format) and `event_callback_eip`/`failsafe_callback_eip`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VcpuGuestContext {
    /// The FXSAVE image (used only with [`Self::VGCF_I387_VALID`]).
    pub fpu_ctxt: [u8; 512],
    /// `VGCF_*` flags.
    pub flags: u64,
    /// The registers the vCPU starts with.
    pub user_regs: CpuUserRegs,
    /// The virtual IDT (entries with address 0 are unused).
    pub trap_ctxt: [TrapInfo; 256],
    /// LDT linear base.
    pub ldt_base: u64,
    /// LDT entries.
    pub ldt_ents: u64,
    /// GDT machine frames.
    pub gdt_frames: [u64; 16],
    /// GDT entries (0: only Xen's reserved flat selectors).
    pub gdt_ents: u64,
    /// Kernel stack segment for ring transitions.
    pub kernel_ss: u64,
    /// Kernel stack pointer for ring transitions.
    pub kernel_sp: u64,
    /// CR0-CR7 (`ctrlreg[3]`: the kernel's L4 in `cr3` format; `ctrlreg[1]`: the user
    /// L4; `ctrlreg[4]`: filtered by Xen).
    pub ctrlreg: [u64; 8],
    /// DR0-DR7.
    pub debugreg: [u64; 8],
    /// Where Xen delivers event upcalls.
    pub event_callback_eip: u64,
    /// Where Xen goes when it cannot return to the guest (a bad segment on `iret`).
    pub failsafe_callback_eip: u64,
    /// The 64-bit `syscall` entry (0: none).
    pub syscall_callback_eip: u64,
    /// `VMASST_TYPE_*` bitmap.
    pub vm_assist: u64,
    /// FS base.
    pub fs_base: u64,
    /// Kernel GS base.
    pub gs_base_kernel: u64,
    /// User GS base.
    pub gs_base_user: u64,
}

impl VcpuGuestContext {
    /// `VGCF_I387_VALID`: `fpu_ctxt` holds a valid FXSAVE image.
    pub const VGCF_I387_VALID: u64 = 1 << 0;
    /// `VGCF_in_kernel`: the vCPU starts in kernel mode (required for 64-bit PV).
    pub const VGCF_IN_KERNEL: u64 = 1 << 2;
    /// `VGCF_failsafe_disables_events`.
    pub const VGCF_FAILSAFE_DISABLES_EVENTS: u64 = 1 << 3;
    /// `VGCF_syscall_disables_events`.
    pub const VGCF_SYSCALL_DISABLES_EVENTS: u64 = 1 << 4;

    /// An all-zero context.
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
}

/// Xen's time base for one vCPU (`struct vcpu_time_info`, 32 bytes): system time in ns
/// is `system_time + ((tsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul >> 32`
/// (a right shift for a negative `tsc_shift`), read under the `version` seqlock (odd
/// while Xen updates it).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VcpuTimeInfo {
    /// Odd while Xen updates the record.
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// TSC at the last update.
    pub tsc_timestamp: u64,
    /// System time (ns since boot) at the last update.
    pub system_time: u64,
    /// TSC to ns multiplier (a 32.32 fixed-point fraction).
    pub tsc_to_system_mul: u32,
    /// Shift of the TSC delta before the multiplication.
    pub tsc_shift: i8,
    /// `XEN_PVCLOCK_*` flags.
    pub flags: u8,
    /// Padding.
    pub pad1: [u8; 2],
}

impl VcpuTimeInfo {
    /// Converts a TSC reading to system time (ns) with this record.
    pub fn system_time_at(&self, tsc: u64) -> u64 {
        let delta = tsc.wrapping_sub(self.tsc_timestamp);
        let shifted = if self.tsc_shift >= 0 {
            delta << self.tsc_shift
        } else {
            delta >> -self.tsc_shift
        };
        let scaled = ((u128::from(shifted) * u128::from(self.tsc_to_system_mul)) >> 32) as u64;
        self.system_time.wrapping_add(scaled)
    }
}

/// The arch part of a `vcpu_info` (`struct arch_vcpu_info`, x86, 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct ArchVcpuInfo {
    /// The faulting address of the last page fault.
    pub cr2: u64,
    /// Padding.
    pub pad: u64,
}

/// One vCPU's slot of the shared info page (`struct vcpu_info`, 64 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VcpuInfo {
    /// Set by Xen when an event is pending for this vCPU; the guest clears it.
    pub evtchn_upcall_pending: u8,
    /// Non-zero: no upcalls (the PV `cli`).
    pub evtchn_upcall_mask: u8,
    /// Padding.
    pub pad0: [u8; 6],
    /// Which words of `evtchn_pending` have bits for this vCPU.
    pub evtchn_pending_sel: u64,
    /// `cr2`.
    pub arch: ArchVcpuInfo,
    /// The time base.
    pub time: VcpuTimeInfo,
}

/// The x86 part of the shared info page (`struct arch_shared_info`, x86-64, 48 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[allow(missing_docs)] // p2m bookkeeping for the toolstack, named as in Xen
pub struct ArchSharedInfo {
    pub max_pfn: u64,
    pub pfn_to_mfn_frame_list_list: u64,
    pub nmi_reason: u64,
    pub p2m_cr3: u64,
    pub p2m_vaddr: u64,
    pub p2m_generation: u64,
}

/// The shared info page (`struct shared_info`, x86-64, 3136 bytes of a 4 KiB page).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SharedInfo {
    /// The `vcpu_info` of vCPUs 0..[`LEGACY_MAX_VCPUS`].
    pub vcpu_info: [VcpuInfo; LEGACY_MAX_VCPUS],
    /// 2-level event channels: one pending bit per port.
    pub evtchn_pending: [u64; 64],
    /// 2-level event channels: one mask bit per port.
    pub evtchn_mask: [u64; 64],
    /// Wallclock version (seqlock).
    pub wc_version: u32,
    /// Wallclock seconds (low half).
    pub wc_sec: u32,
    /// Wallclock nanoseconds.
    pub wc_nsec: u32,
    /// Wallclock seconds (high half).
    pub wc_sec_hi: u32,
    /// The x86 part.
    pub arch: ArchSharedInfo,
}

/// The argument of `EVTCHNOP_bind_virq` (`struct evtchn_bind_virq`, 12 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct EvtchnBindVirq {
    /// The VIRQ (`VIRQ_*`).
    pub virq: u32,
    /// The vCPU it is delivered to.
    pub vcpu: u32,
    /// Out: the port.
    pub port: u32,
}

/// The argument of `EVTCHNOP_unmask` (`struct evtchn_unmask`, 4 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct EvtchnUnmask {
    /// The port.
    pub port: u32,
}

/// The argument of `VCPUOP_set_singleshot_timer` (`struct vcpu_set_singleshot_timer`,
/// 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VcpuSetSingleshotTimer {
    /// The absolute system time (ns) at which `VIRQ_TIMER` fires.
    pub timeout_abs_ns: u64,
    /// `VCPU_SSHOTTMR_*`.
    pub flags: u32,
    /// Padding.
    pub pad: u32,
}

impl VcpuSetSingleshotTimer {
    /// `VCPU_SSHOTTMR_future`: fail with `-ETIME` if the timeout has passed (without it
    /// a past timeout fires at once).
    pub const FUTURE: u32 = 1 << 0;
}

/// The result of `VCPUOP_get_runstate_info` (`struct vcpu_runstate_info`, 48 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct VcpuRunstateInfo {
    /// The current `RUNSTATE_*`.
    pub state: i32,
    /// Padding.
    pub pad: u32,
    /// System time (ns) when `state` was entered.
    pub state_entry_time: u64,
    /// Time (ns) spent in each `RUNSTATE_*`: running, runnable, blocked, offline.
    pub time: [u64; 4],
}

impl VcpuRunstateInfo {
    /// `RUNSTATE_running`.
    pub const RUNNING: usize = 0;
    /// `RUNSTATE_runnable`: ready but not running (another vCPU has the CPU).
    pub const RUNNABLE: usize = 1;
    /// `RUNSTATE_blocked`.
    pub const BLOCKED: usize = 2;
    /// `RUNSTATE_offline`.
    pub const OFFLINE: usize = 3;
}

/// The argument of `SCHEDOP_poll` (`struct sched_poll`, 24 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct SchedPoll {
    /// Address of an array of `nr_ports` ports.
    pub ports: u64,
    /// How many ports.
    pub nr_ports: u32,
    /// Padding.
    pub pad: u32,
    /// Absolute system time (ns) to give up at; 0: none.
    pub timeout: u64,
}

/// The argument of `CALLBACKOP_register` (`struct callback_register`, 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct CallbackRegister {
    /// `CALLBACKTYPE_*`.
    pub kind: u16,
    /// `CALLBACKF_*`.
    pub flags: u16,
    /// Padding.
    pub pad: u32,
    /// The entry point.
    pub address: u64,
}

/// Which callback `CALLBACKOP_register` sets (`CALLBACKTYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct CallbackType(pub u16);

impl CallbackType {
    /// Event upcalls.
    pub const EVENT: Self = Self(0);
    /// The failsafe callback (Xen cannot return to the guest).
    pub const FAILSAFE: Self = Self(1);
    /// The 64-bit `syscall` entry.
    pub const SYSCALL: Self = Self(2);
    /// The NMI callback.
    pub const NMI: Self = Self(4);
}

/// `CALLBACKF_mask_events`: mask event upcalls when entering the callback.
pub const CALLBACKF_MASK_EVENTS: u16 = 1 << 0;

const _: () = {
    assert!(size_of::<CpuUserRegs>() == 200);
    assert!(offset_of!(CpuUserRegs, rax) == 80);
    assert!(offset_of!(CpuUserRegs, rdi) == 112);
    assert!(offset_of!(CpuUserRegs, rip) == 128);
    assert!(offset_of!(CpuUserRegs, cs) == 136);
    assert!(offset_of!(CpuUserRegs, saved_upcall_mask) == 140);
    assert!(offset_of!(CpuUserRegs, rflags) == 144);
    assert!(offset_of!(CpuUserRegs, rsp) == 152);
    assert!(offset_of!(CpuUserRegs, ss) == 160);
    assert!(offset_of!(CpuUserRegs, gs) == 192);

    assert!(size_of::<VcpuGuestContext>() == 5168);
    assert!(offset_of!(VcpuGuestContext, flags) == 512);
    assert!(offset_of!(VcpuGuestContext, user_regs) == 520);
    assert!(offset_of!(VcpuGuestContext, trap_ctxt) == 720);
    assert!(offset_of!(VcpuGuestContext, ldt_base) == 4816);
    assert!(offset_of!(VcpuGuestContext, gdt_frames) == 4832);
    assert!(offset_of!(VcpuGuestContext, gdt_ents) == 4960);
    assert!(offset_of!(VcpuGuestContext, kernel_ss) == 4968);
    assert!(offset_of!(VcpuGuestContext, kernel_sp) == 4976);
    assert!(offset_of!(VcpuGuestContext, ctrlreg) == 4984);
    assert!(offset_of!(VcpuGuestContext, debugreg) == 5048);
    assert!(offset_of!(VcpuGuestContext, event_callback_eip) == 5112);
    assert!(offset_of!(VcpuGuestContext, failsafe_callback_eip) == 5120);
    assert!(offset_of!(VcpuGuestContext, syscall_callback_eip) == 5128);
    assert!(offset_of!(VcpuGuestContext, vm_assist) == 5136);
    assert!(offset_of!(VcpuGuestContext, fs_base) == 5144);
    assert!(offset_of!(VcpuGuestContext, gs_base_kernel) == 5152);
    assert!(offset_of!(VcpuGuestContext, gs_base_user) == 5160);

    assert!(size_of::<VcpuTimeInfo>() == 32);
    assert!(offset_of!(VcpuTimeInfo, tsc_timestamp) == 8);
    assert!(offset_of!(VcpuTimeInfo, system_time) == 16);
    assert!(offset_of!(VcpuTimeInfo, tsc_to_system_mul) == 24);
    assert!(offset_of!(VcpuTimeInfo, tsc_shift) == 28);
    assert!(offset_of!(VcpuTimeInfo, flags) == 29);

    assert!(size_of::<VcpuInfo>() == 64);
    assert!(offset_of!(VcpuInfo, evtchn_upcall_pending) == 0);
    assert!(offset_of!(VcpuInfo, evtchn_upcall_mask) == 1);
    assert!(offset_of!(VcpuInfo, evtchn_pending_sel) == 8);
    assert!(offset_of!(VcpuInfo, arch) == 16);
    assert!(offset_of!(VcpuInfo, time) == 32);

    assert!(size_of::<SharedInfo>() == 3136);
    assert!(offset_of!(SharedInfo, evtchn_pending) == 2048);
    assert!(offset_of!(SharedInfo, evtchn_mask) == 2560);
    assert!(offset_of!(SharedInfo, wc_version) == 3072);
    assert!(offset_of!(SharedInfo, arch) == 3088);

    assert!(size_of::<EvtchnBindVirq>() == 12);
    assert!(offset_of!(EvtchnBindVirq, port) == 8);
    assert!(size_of::<EvtchnUnmask>() == 4);
    assert!(size_of::<VcpuSetSingleshotTimer>() == 16);
    assert!(offset_of!(VcpuSetSingleshotTimer, flags) == 8);
    assert!(size_of::<VcpuRunstateInfo>() == 48);
    assert!(offset_of!(VcpuRunstateInfo, state_entry_time) == 8);
    assert!(offset_of!(VcpuRunstateInfo, time) == 16);
    assert!(size_of::<SchedPoll>() == 24);
    assert!(offset_of!(SchedPoll, nr_ports) == 8);
    assert!(offset_of!(SchedPoll, timeout) == 16);
    assert!(size_of::<CallbackRegister>() == 16);
    assert!(offset_of!(CallbackRegister, flags) == 2);
    assert!(offset_of!(CallbackRegister, address) == 8);
};
