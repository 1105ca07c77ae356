//! The XENPMU interface: hypercall parameters and the per-vCPU shared PMU page.
//!
//! # How C unions are modelled
//!
//! `struct xen_pmu_arch` has three unions. Each is a plain `#[repr(C)]` struct here, so that
//! every type stays `FromBytes + IntoBytes` without `unsafe`:
//!
//! - `r` (registers, padded to 64 bytes) has one meaningful member, so it is
//!   [`XenPmuArchR`]: the [`XenPmuRegs`] followed by the rest of the padding.
//! - `l` (`u32 lapic_lvtpc` / `u64 pad`) is [`XenPmuArchL`]: `lapic_lvtpc` then 4 bytes of
//!   padding, aligned to 8 like the C union.
//! - `c` (AMD context / Intel context / 128 bytes of padding) has two meaningful,
//!   overlapping members. It is [`XenPmuArchC`], the 128 raw bytes aligned to 8, with typed
//!   views [`intel`](XenPmuArchC::intel) and [`amd`](XenPmuArchC::amd) (and `_mut`
//!   variants) that reinterpret the leading bytes through `zerocopy`.
//!
//! The vendor contexts end in flexible arrays (the counter banks) that C does not count in
//! `sizeof`; Xen places the banks right after the fixed part, at the byte offsets stored in
//! the context (relative to the context itself), and they may extend past the 128-byte
//! union into the rest of the page. The Rust structs model only the fixed parts.

use bitflags::bitflags;
use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::nr;

/// The argument of `xenpmu_op` (`struct xen_pmu_params`, 24 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuParams {
    /// Interface major version, in and out; Xen requires [`nr::XENPMU_VER_MAJ`].
    pub version_maj: u32,
    /// Interface minor version, in and out.
    pub version_min: u32,
    /// The op's value: the mode or features (get/set), or the MFN of the shared page (init).
    pub val: u64,
    /// The vCPU the op is for (init, finish).
    pub vcpu: u32,
    /// Padding; zero.
    pub pad: u32,
}

impl XenPmuParams {
    /// Parameters with the current interface version (0.1), `val` and `vcpu`.
    pub const fn new(val: u64, vcpu: u32) -> Self {
        XenPmuParams {
            version_maj: nr::XENPMU_VER_MAJ,
            version_min: nr::XENPMU_VER_MIN,
            val,
            vcpu,
            pad: 0,
        }
    }
}

/// The interrupted context of a PMU sample (`struct xen_pmu_regs`, 32 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuRegs {
    /// Instruction pointer.
    pub ip: u64,
    /// Stack pointer.
    pub sp: u64,
    /// RFLAGS.
    pub flags: u64,
    /// Code selector.
    pub cs: u16,
    /// Stack selector.
    pub ss: u16,
    /// Privilege level of the sample.
    pub cpl: u8,
    /// Padding.
    pub pad: [u8; 3],
}

/// One architectural counter and its event select (`struct xen_pmu_cntr_pair`, 16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuCntrPair {
    /// The counter (`IA32_PMCi`).
    pub counter: u64,
    /// The event select (`IA32_PERFEVTSELi`).
    pub control: u64,
}

/// The fixed part of the Intel PMU context (`struct xen_pmu_intel_ctxt`, 64 bytes).
///
/// The counter banks follow at byte offsets `fixed_counters` (an array of `u64`) and
/// `arch_counters` (an array of [`XenPmuCntrPair`]), both relative to this struct.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuIntelCtxt {
    /// Byte offset of the fixed-counter bank from this struct (read-only for a PV guest).
    pub fixed_counters: u32,
    /// Byte offset of the architectural counter bank from this struct (read-only for PV).
    pub arch_counters: u32,
    /// `IA32_PERF_GLOBAL_CTRL`.
    pub global_ctrl: u64,
    /// `IA32_PERF_GLOBAL_OVF_CTRL`.
    pub global_ovf_ctrl: u64,
    /// `IA32_PERF_GLOBAL_STATUS`.
    pub global_status: u64,
    /// `IA32_FIXED_CTR_CTRL`.
    pub fixed_ctrl: u64,
    /// `IA32_DS_AREA`.
    pub ds_area: u64,
    /// `IA32_PEBS_ENABLE`.
    pub pebs_enable: u64,
    /// `IA32_DEBUGCTL`.
    pub debugctl: u64,
}

/// The fixed part of the AMD PMU context (`struct xen_pmu_amd_ctxt`, 8 bytes).
///
/// The banks follow at byte offsets `counters` and `ctrls` (arrays of `u64`), relative to
/// this struct.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuAmdCtxt {
    /// Byte offset of the counter bank from this struct (read-only for a PV guest).
    pub counters: u32,
    /// Byte offset of the control bank from this struct (read-only for a PV guest).
    pub ctrls: u32,
}

/// The `r` union of `struct xen_pmu_arch` (64 bytes): the registers, padded.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuArchR {
    /// The interrupted context (written by Xen, read-only for the guest).
    pub regs: XenPmuRegs,
    /// The rest of the union's 64 bytes.
    pub pad: [u8; 32],
}

/// The `l` union of `struct xen_pmu_arch` (8 bytes, 8-aligned like the C union).
#[repr(C, align(8))]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuArchL {
    /// The guest's APIC LVTPC value; Xen loads only its mask bit, on flush or lvtpc_set.
    pub lapic_lvtpc: u32,
    /// The rest of the union's 8 bytes.
    pub pad: u32,
}

/// The `c` union of `struct xen_pmu_arch` (128 bytes, 8-aligned): the vendor context.
///
/// Stored as raw bytes; [`intel`](Self::intel) and [`amd`](Self::amd) give the typed views
/// of the leading bytes (the two overlap, as in C).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct XenPmuArchC {
    /// The union's bytes.
    pub bytes: [u8; 128],
}

impl Default for XenPmuArchC {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

// The views below cannot fail: `bytes` is at offset 0 of an 8-aligned struct, so it is
// aligned for either context, and it is longer than both.
const _: () = assert!(align_of::<XenPmuArchC>() >= align_of::<XenPmuIntelCtxt>());
const _: () = assert!(size_of::<XenPmuArchC>() >= size_of::<XenPmuIntelCtxt>());
const _: () = assert!(size_of::<XenPmuArchC>() >= size_of::<XenPmuAmdCtxt>());

impl XenPmuArchC {
    /// The Intel view (`c.intel`).
    pub fn intel(&self) -> &XenPmuIntelCtxt {
        match XenPmuIntelCtxt::ref_from_prefix(&self.bytes) {
            Ok((ctxt, _)) => ctxt,
            Err(_) => unreachable!("aligned and large enough by the asserts above"),
        }
    }

    /// The Intel view (`c.intel`), mutable.
    pub fn intel_mut(&mut self) -> &mut XenPmuIntelCtxt {
        match XenPmuIntelCtxt::mut_from_prefix(&mut self.bytes) {
            Ok((ctxt, _)) => ctxt,
            Err(_) => unreachable!("aligned and large enough by the asserts above"),
        }
    }

    /// The AMD view (`c.amd`).
    pub fn amd(&self) -> &XenPmuAmdCtxt {
        match XenPmuAmdCtxt::ref_from_prefix(&self.bytes) {
            Ok((ctxt, _)) => ctxt,
            Err(_) => unreachable!("aligned and large enough by the asserts above"),
        }
    }

    /// The AMD view (`c.amd`), mutable.
    pub fn amd_mut(&mut self) -> &mut XenPmuAmdCtxt {
        match XenPmuAmdCtxt::mut_from_prefix(&mut self.bytes) {
            Ok((ctxt, _)) => ctxt,
            Err(_) => unreachable!("aligned and large enough by the asserts above"),
        }
    }
}

/// The architecture part of the shared PMU page (`struct xen_pmu_arch`, 208 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuArch {
    /// The interrupted context (`r`).
    pub r: XenPmuArchR,
    /// [`PmuFlags`] bits, owned by Xen (read with [`flags`](Self::flags)).
    pub pmu_flags: u64,
    /// The LVTPC (`l`).
    pub l: XenPmuArchL,
    /// The vendor context (`c`).
    pub c: XenPmuArchC,
}

impl XenPmuArch {
    /// `pmu_flags` as [`PmuFlags`], unknown bits kept.
    pub const fn flags(&self) -> PmuFlags {
        PmuFlags::from_bits_retain(self.pmu_flags)
    }
}

/// The per-vCPU shared PMU page, fixed part (`struct xen_pmu_data`, 224 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct XenPmuData {
    /// The interrupted vCPU.
    pub vcpu_id: u32,
    /// The physical CPU of the interrupt (the vCPU id for an unprivileged guest).
    pub pcpu_id: u32,
    /// The interrupted domain (`DOMID_SELF` for an unprivileged guest).
    pub domain_id: u16,
    /// Padding.
    pub pad: [u8; 6],
    /// The architecture part.
    pub pmu: XenPmuArch,
}

/// Page offset of `pmu.pmu_flags` in the shared PMU page.
pub const PMU_FLAGS_OFFSET: usize = 80;
/// Page offset of `pmu.l.lapic_lvtpc` in the shared PMU page.
pub const LAPIC_LVTPC_OFFSET: usize = 88;
/// Page offset of the vendor context `pmu.c` in the shared PMU page; the bank offsets in
/// the context are relative to this.
pub const PMU_CTXT_OFFSET: usize = 96;

/// Size of `r`'s padding in C (`XENPMU_REGS_PAD_SZ`).
pub const XENPMU_REGS_PAD_SZ: usize = 64;
/// Size of `c`'s padding in C (`XENPMU_CTXT_PAD_SZ`).
pub const XENPMU_CTXT_PAD_SZ: usize = 128;

/// A `xenpmu_op` operation (`XENPMU_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct XenPmuOp(pub u32);

impl XenPmuOp {
    /// Get the mode (and the interface version).
    pub const MODE_GET: Self = Self(nr::XENPMU_MODE_GET);
    /// Set the mode.
    pub const MODE_SET: Self = Self(nr::XENPMU_MODE_SET);
    /// Get the features.
    pub const FEATURE_GET: Self = Self(nr::XENPMU_FEATURE_GET);
    /// Set the features.
    pub const FEATURE_SET: Self = Self(nr::XENPMU_FEATURE_SET);
    /// Register the shared page of a vCPU.
    pub const INIT: Self = Self(nr::XENPMU_INIT);
    /// Unregister the shared page of a vCPU.
    pub const FINISH: Self = Self(nr::XENPMU_FINISH);
    /// Load the LVTPC from the shared page.
    pub const LVTPC_SET: Self = Self(nr::XENPMU_LVTPC_SET);
    /// Write back the cached context.
    pub const FLUSH: Self = Self(nr::XENPMU_FLUSH);

    /// The op's name, if it is one Xen defines.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            nr::XENPMU_MODE_GET => "MODE_GET",
            nr::XENPMU_MODE_SET => "MODE_SET",
            nr::XENPMU_FEATURE_GET => "FEATURE_GET",
            nr::XENPMU_FEATURE_SET => "FEATURE_SET",
            nr::XENPMU_INIT => "INIT",
            nr::XENPMU_FINISH => "FINISH",
            nr::XENPMU_LVTPC_SET => "LVTPC_SET",
            nr::XENPMU_FLUSH => "FLUSH",
            _ => return None,
        })
    }
}

impl core::fmt::Debug for XenPmuOp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.name() {
            Some(name) => write!(f, "XenPmuOp::{name}"),
            None => write!(f, "XenPmuOp({})", self.0),
        }
    }
}

bitflags! {
    /// The vPMU mode (`XENPMU_MODE_*`), as carried in [`XenPmuParams::val`].
    /// Off is the empty set, [`XenPmuMode::OFF`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct XenPmuMode: u64 {
        /// Each guest profiles itself.
        const SELF = 1 << 0;
        /// The hypervisor is profiled too (dom0).
        const HV = 1 << 1;
        /// Dom0 profiles the whole system.
        const ALL = 1 << 2;
    }

    /// vPMU features (`XENPMU_FEATURE_*`), as carried in [`XenPmuParams::val`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct XenPmuFeature: u64 {
        /// Intel branch trace store.
        const INTEL_BTS = 1 << 0;
        /// Only the counters needed for IPC.
        const IPC_ONLY = 1 << 1;
        /// Only the architectural counters.
        const ARCH_ONLY = 1 << 2;
    }

    /// `xen_pmu_arch.pmu_flags` (`PMU_*`), owned by Xen.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PmuFlags: u64 {
        /// The PMU registers are cached in the page (set by Xen for a PMI, cleared by
        /// flush); only then may the guest write the context.
        const CACHED = 1 << 0;
        /// The sample is from user mode.
        const SAMPLE_USER = 1 << 1;
        /// The sample is from real mode.
        const SAMPLE_REAL = 1 << 2;
        /// The sample is from a PV guest.
        const SAMPLE_PV = 1 << 3;
    }
}

impl XenPmuMode {
    /// vPMU off (`XENPMU_MODE_OFF`, no bits).
    pub const OFF: Self = Self::empty();
}

// ---------------------------------------------------------------------------------------
// Layout checks (the test `layout_vs_xen_headers` repeats them against gcc).
// ---------------------------------------------------------------------------------------

const _: () = {
    assert!(size_of::<XenPmuParams>() == 24);
    assert!(offset_of!(XenPmuParams, version_maj) == 0);
    assert!(offset_of!(XenPmuParams, version_min) == 4);
    assert!(offset_of!(XenPmuParams, val) == 8);
    assert!(offset_of!(XenPmuParams, vcpu) == 16);
    assert!(offset_of!(XenPmuParams, pad) == 20);

    assert!(size_of::<XenPmuRegs>() == 32);
    assert!(offset_of!(XenPmuRegs, ip) == 0);
    assert!(offset_of!(XenPmuRegs, sp) == 8);
    assert!(offset_of!(XenPmuRegs, flags) == 16);
    assert!(offset_of!(XenPmuRegs, cs) == 24);
    assert!(offset_of!(XenPmuRegs, ss) == 26);
    assert!(offset_of!(XenPmuRegs, cpl) == 28);
    assert!(offset_of!(XenPmuRegs, pad) == 29);

    assert!(size_of::<XenPmuCntrPair>() == 16);
    assert!(offset_of!(XenPmuCntrPair, counter) == 0);
    assert!(offset_of!(XenPmuCntrPair, control) == 8);

    assert!(size_of::<XenPmuIntelCtxt>() == 64);
    assert!(offset_of!(XenPmuIntelCtxt, fixed_counters) == 0);
    assert!(offset_of!(XenPmuIntelCtxt, arch_counters) == 4);
    assert!(offset_of!(XenPmuIntelCtxt, global_ctrl) == 8);
    assert!(offset_of!(XenPmuIntelCtxt, global_ovf_ctrl) == 16);
    assert!(offset_of!(XenPmuIntelCtxt, global_status) == 24);
    assert!(offset_of!(XenPmuIntelCtxt, fixed_ctrl) == 32);
    assert!(offset_of!(XenPmuIntelCtxt, ds_area) == 40);
    assert!(offset_of!(XenPmuIntelCtxt, pebs_enable) == 48);
    assert!(offset_of!(XenPmuIntelCtxt, debugctl) == 56);

    assert!(size_of::<XenPmuAmdCtxt>() == 8);
    assert!(offset_of!(XenPmuAmdCtxt, counters) == 0);
    assert!(offset_of!(XenPmuAmdCtxt, ctrls) == 4);

    assert!(size_of::<XenPmuArchR>() == XENPMU_REGS_PAD_SZ);
    assert!(offset_of!(XenPmuArchR, regs) == 0);
    assert!(offset_of!(XenPmuArchR, pad) == 32);
    assert!(size_of::<XenPmuArchL>() == 8);
    assert!(align_of::<XenPmuArchL>() == 8);
    assert!(offset_of!(XenPmuArchL, lapic_lvtpc) == 0);
    assert!(size_of::<XenPmuArchC>() == XENPMU_CTXT_PAD_SZ);
    assert!(align_of::<XenPmuArchC>() == 8);

    assert!(size_of::<XenPmuArch>() == 208);
    assert!(offset_of!(XenPmuArch, r) == 0);
    assert!(offset_of!(XenPmuArch, pmu_flags) == 64);
    assert!(offset_of!(XenPmuArch, l) == 72);
    assert!(offset_of!(XenPmuArch, c) == 80);

    assert!(size_of::<XenPmuData>() == 224);
    assert!(offset_of!(XenPmuData, vcpu_id) == 0);
    assert!(offset_of!(XenPmuData, pcpu_id) == 4);
    assert!(offset_of!(XenPmuData, domain_id) == 8);
    assert!(offset_of!(XenPmuData, pad) == 10);
    assert!(offset_of!(XenPmuData, pmu) == 16);
    assert!(size_of::<XenPmuData>() <= 4096);

    assert!(PMU_FLAGS_OFFSET == offset_of!(XenPmuData, pmu.pmu_flags));
    assert!(LAPIC_LVTPC_OFFSET == offset_of!(XenPmuData, pmu.l.lapic_lvtpc));
    assert!(PMU_CTXT_OFFSET == offset_of!(XenPmuData, pmu.c));
    // The Intel context's `global_ctrl` lands at page offset 104.
    assert!(PMU_CTXT_OFFSET + offset_of!(XenPmuIntelCtxt, global_ctrl) == 104);
};
