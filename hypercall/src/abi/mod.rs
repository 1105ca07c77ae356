//! The ABI structs of the Xen x86-64 PV interface that `xenmsr` uses.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields, derives `zerocopy`'s
//! `FromBytes, IntoBytes, KnownLayout, Immutable`, and has compile-time size and offset
//! assertions next to it. The test `layout_vs_xen_headers` checks the same sizes and
//! offsets against the installed Xen headers compiled with gcc.

pub mod console;
pub mod pmu;
pub mod vcpu;
pub mod xen;
pub mod xenstore;

pub use console::XenconsInterface;
pub use pmu::{
    LAPIC_LVTPC_OFFSET, PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags, XENPMU_CTXT_PAD_SZ,
    XENPMU_REGS_PAD_SZ, XenPmuAmdCtxt, XenPmuArch, XenPmuArchC, XenPmuArchL, XenPmuArchR,
    XenPmuCntrPair, XenPmuData, XenPmuFeature, XenPmuIntelCtxt, XenPmuMode, XenPmuOp, XenPmuParams,
    XenPmuRegs,
};
pub use vcpu::{
    ArchSharedInfo, ArchVcpuInfo, CALLBACKF_MASK_EVENTS, CallbackRegister, CallbackType,
    CpuUserRegs, EvtchnBindVirq, EvtchnUnmask, LEGACY_MAX_VCPUS, SchedPoll, SharedInfo,
    VcpuGuestContext, VcpuInfo, VcpuRunstateInfo, VcpuSetSingleshotTimer, VcpuTimeInfo,
};
pub use xen::{
    EvtchnSend, MulticallEntry, PhysdevSetIopl, SIF_INITDOMAIN, SIF_MOD_START_PFN, SIF_PRIVILEGED,
    SchedShutdown, SegmentBase, ShutdownReason, StartInfo, TrapInfo,
};
pub use xenstore::{XenstoreDomainInterface, XsdSockmsg};
