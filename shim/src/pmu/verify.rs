//! Xen's checks of a cached PMU context, applied when the guest writes it.
//!
//! At `XENPMU_flush` Xen copies the page's context into its own and verifies it before
//! loading it into the hardware (Xen 4.17: `core2_vpmu_verify` for Intel, the reserved-bit
//! test in `amd_vpmu_load` for AMD). A context that fails is not loaded: the flush returns
//! `-EIO` and Xen sets `PMU_CACHED` again, so the vPMU stops until a flush succeeds. This
//! module holds the same rules, written from those facts, so that a write that would make
//! the flush fail fails itself, like the native `wrmsr` of the same value (`#GP`), and so
//! that a rejected context can be repaired ([`Vpmu::recover`](super::Vpmu::recover)).
//!
//! Intel (counts and widths from the layout, i.e. CPUID leaf 0xA):
//! - `IA32_PERF_GLOBAL_OVF_CTRL`: only bits 63 and 62, the fixed-counter bits
//!   `32..32 + fixed`, the general-counter bits `0..general`, and bit 61 on PMU version 3
//!   or later;
//! - `IA32_PERF_GLOBAL_CTRL`: only the fixed-counter and general-counter enable bits;
//! - `IA32_PEBS_ENABLE`: only 0 (Xen offers no PEBS);
//! - `IA32_FIXED_CTR_CTRL`: only the low `4 * fixed` bits, and never an AnyThread bit (bit 2
//!   of each counter's nibble);
//! - `IA32_FIXED_CTRn`: no bit at or above the fixed counters' width;
//! - `IA32_PERFEVTSELn`: no bit of 63..32, 21 (AnyThread) or 19 (pin control);
//! - `IA32_DS_AREA`: below `1 << 47` or at or above `0xffff_8800_0000_0000` (Xen's check
//!   of a PV address: canonical and outside Xen's own range).
//!
//! Also refused, as by the hardware and by Xen's trap-and-emulate path (though not by the
//! flush): a write of the read-only `IA32_PERF_GLOBAL_STATUS`, and, when Xen's vPMU
//! features include `XENPMU_FEATURE_IPC_ONLY` or `XENPMU_FEATURE_ARCH_ONLY` (the
//! administrator's `vpmu=ipc` / `vpmu=arch`), an `IA32_PERFEVTSELn` write whose event
//! (`umask << 8 | event`, bits 15..0) the filter does not allow ([`event_allowed`]).
//! The flush never applies that filter, so without this check a PMI handler could
//! program an event the administrator withheld.
//!
//! AMD: in an event-select (control) MSR, bits 63..42, 39..36, 21 and 19 are reserved and
//! must keep the value the hardware has (Xen compares them with what it read from each
//! control at boot). The guest cannot read that boot value, but the control cached in the
//! page came from the hardware, so a write must leave those bits as the cached control has
//! them.

use xenmsr_hypercall::abi::XenPmuFeature;

use super::classify::IntelMsr;
use super::layout::IntelLayout;
use super::page::{AmdCtxt, IntelCtxt, intel_field};

/// `IA32_PERFEVTSELn` bits Xen refuses: 63..32, 21 (AnyThread) and 19 (pin control).
pub const INTEL_EVNTSEL_RESERVED: u64 = !0xffff_ffff | (1 << 21) | (1 << 19);
/// AMD event-select bits that must keep the hardware's value: 63..42, 39..36, 21, 19.
pub const AMD_CTRL_RESERVED: u64 = !((1 << 42) - 1) | (0xf << 36) | (1 << 21) | (1 << 19);
/// The lowest address above Xen's range in a 64-bit PV guest (the end of PML4 slots
/// 256..=271, Xen's `HYPERVISOR_VIRT_END`).
pub const XEN_VIRT_END: u64 = 0xffff_8800_0000_0000;
/// The first non-canonical address (`1 << 47`).
const LOWER_HALF_END: u64 = 1 << 47;
/// The AnyThread bit of one fixed counter's 4-bit field in `IA32_FIXED_CTR_CTRL`.
const FIXED_ANY_THREAD: u64 = 0x4;
/// The event an `IA32_PERFEVTSELn` value selects: `umask << 8 | event` (bits 15..0).
const EVNTSEL_EVENT: u64 = 0xffff;

/// The events `XENPMU_FEATURE_IPC_ONLY` allows (`umask << 8 | event`): unhalted core
/// cycles (0x003c), unhalted reference cycles (0x013c), instructions retired (0x00c0).
pub const IPC_ONLY_EVENTS: [u16; 3] = [0x003c, 0x013c, 0x00c0];
/// The events `XENPMU_FEATURE_ARCH_ONLY` allows besides [`IPC_ONLY_EVENTS`]: last-level
/// cache references (0x4f2e) and misses (0x412e), branch instructions retired (0x00c4),
/// branch mispredicts retired (0x00c5).
pub const ARCH_ONLY_EXTRA_EVENTS: [u16; 4] = [0x4f2e, 0x412e, 0x00c4, 0x00c5];

/// `n` low bits set (all 64 for `n >= 64`).
const fn low_bits(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1 << n) - 1 }
}

/// The enable (and overflow) bits of the layout's counters: fixed at 32.., general at 0...
/// (Bits past 63 do not exist, so the shift simply drops them.)
fn counter_bits(l: &IntelLayout) -> u64 {
    (low_bits(l.fixed_counters.into()) << 32) | low_bits(l.arch_counters.into())
}

/// The bits of `IA32_PERF_GLOBAL_CTRL` Xen accepts.
pub fn global_ctrl_valid(l: &IntelLayout) -> u64 {
    counter_bits(l)
}

/// The bits of `IA32_PERF_GLOBAL_OVF_CTRL` Xen accepts.
pub fn global_ovf_ctrl_valid(l: &IntelLayout) -> u64 {
    let uncore = if l.version > 2 { 1 << 61 } else { 0 };
    counter_bits(l) | (0b11 << 62) | uncore
}

/// The bits of `IA32_FIXED_CTR_CTRL` Xen accepts.
pub fn fixed_ctrl_valid(l: &IntelLayout) -> u64 {
    let fields = low_bits(4 * u32::from(l.fixed_counters));
    let any_thread = (0..l.fixed_counters.min(16))
        .map(|i| FIXED_ANY_THREAD << (4 * u32::from(i)))
        .fold(0, |bits, bit| bits | bit);
    fields & !any_thread
}

/// What a legacy `IA32_PMCn` write of `value` leaves in the counter: the hardware takes
/// `EAX` (bits 31..0) sign-extended from bit 31, kept to the counter width (`EDX` is
/// ignored). Xen's trap path writes the guest's value to the hardware as it is, so this is
/// what the trapped write leaves, and what the cached one must.
///
/// The width is [`IntelLayout::effective_arch_counter_width`] (32 when CPUID reports 0).
pub fn legacy_counter_value(l: &IntelLayout, value: u64) -> u64 {
    // Truncate to 32 bits, then sign-extend through i32 (the SDM's legacy write).
    let extended = i64::from(value as u32 as i32) as u64;
    extended & low_bits(l.effective_arch_counter_width())
}

/// Whether Xen's event filter lets a PV guest write `value` to an `IA32_PERFEVTSELn`.
///
/// With neither `XENPMU_FEATURE_IPC_ONLY` nor `XENPMU_FEATURE_ARCH_ONLY` every event is
/// allowed. With either, only the event (`umask << 8 | event`) matters: the
/// [`IPC_ONLY_EVENTS`], and with `ARCH_ONLY` also the [`ARCH_ONLY_EXTRA_EVENTS`]. Every
/// other event is refused whatever the enable bit says, so under a filter even a write
/// of 0 (event 0x0000) is `#GP`, exactly as on Xen's trap path.
pub fn event_allowed(features: XenPmuFeature, value: u64) -> bool {
    if !features.intersects(XenPmuFeature::IPC_ONLY | XenPmuFeature::ARCH_ONLY) {
        return true;
    }
    let event = (value & EVNTSEL_EVENT) as u16;
    IPC_ONLY_EVENTS.contains(&event)
        || (features.contains(XenPmuFeature::ARCH_ONLY) && ARCH_ONLY_EXTRA_EVENTS.contains(&event))
}

/// The bits of `IA32_FIXED_CTRn` Xen accepts.
pub fn fixed_counter_valid(l: &IntelLayout) -> u64 {
    low_bits(l.fixed_counter_width.into())
}

/// Whether Xen accepts `address` as a PV guest's `IA32_DS_AREA`.
pub fn ds_area_valid(address: u64) -> bool {
    !(LOWER_HALF_END..XEN_VIRT_END).contains(&address)
}

/// Whether Xen accepts the write of `value` to the Intel PMU MSR `msr` from a PV guest
/// whose vPMU has `features` (Xen's `XENPMU_feature_get`): the checks its flush makes of
/// the context, plus those only its trap path makes (the read-only
/// `IA32_PERF_GLOBAL_STATUS`, the [`event_allowed`] filter).
pub fn intel_write_ok(l: &IntelLayout, features: XenPmuFeature, msr: IntelMsr, value: u64) -> bool {
    match msr {
        IntelMsr::GlobalOvfCtrl => value & !global_ovf_ctrl_valid(l) == 0,
        IntelMsr::GlobalCtrl => value & !global_ctrl_valid(l) == 0,
        IntelMsr::GlobalStatus => false,
        IntelMsr::PebsEnable => value == 0,
        IntelMsr::FixedCtrl => value & !fixed_ctrl_valid(l) == 0,
        IntelMsr::FixedCounter(_) => value & !fixed_counter_valid(l) == 0,
        IntelMsr::ArchCtrl(_) => {
            value & INTEL_EVNTSEL_RESERVED == 0 && event_allowed(features, value)
        }
        IntelMsr::DsArea => ds_area_valid(value),
        // The hardware's legacy write: any value (it keeps the sign-extended low 32 bits).
        IntelMsr::ArchCounter(_) => true,
        // Never served from the page (see `IntelMsr::routed_by_xen_pv`).
        IntelMsr::ArchCounterFullWidth(_) => false,
    }
}

/// Whether writing `value` over the AMD control whose cached value is `cached` keeps the
/// reserved bits as the hardware has them.
pub fn amd_ctrl_write_ok(cached: u64, value: u64) -> bool {
    (value ^ cached) & AMD_CTRL_RESERVED == 0
}

/// Stores `repaired(old)` through `store` when it differs from `old`; 1 if it did.
fn repair(old: Option<u64>, repaired: impl FnOnce(u64) -> u64, store: impl FnOnce(u64)) -> u32 {
    let Some(old) = old else {
        return 0;
    };
    let new = repaired(old);
    if new == old {
        return 0;
    }
    store(new);
    1
}

/// Makes the Intel context in the page pass Xen's checks, changing as little as possible:
/// clears every refused bit, `pebs_enable` becomes 0, and a refused `ds_area` becomes 0.
/// The counter banks are repaired only where their offsets validate. Returns how many
/// registers changed.
pub(crate) fn sanitize_intel(ctxt: IntelCtxt, l: &IntelLayout) -> u32 {
    let mut changed = 0;
    for (field, valid) in [
        (intel_field::GLOBAL_CTRL, global_ctrl_valid(l)),
        (intel_field::GLOBAL_OVF_CTRL, global_ovf_ctrl_valid(l)),
        (intel_field::PEBS_ENABLE, 0),
        (intel_field::FIXED_CTRL, fixed_ctrl_valid(l)),
    ] {
        changed += repair(
            ctxt.read_field(field).ok(),
            |v| v & valid,
            |v| {
                let _ = ctxt.write_field(field, v);
            },
        );
    }
    changed += repair(
        ctxt.read_field(intel_field::DS_AREA).ok(),
        |v| if ds_area_valid(v) { v } else { 0 },
        |v| {
            let _ = ctxt.write_field(intel_field::DS_AREA, v);
        },
    );
    let page = ctxt.page();
    let banks = (0..usize::from(l.fixed_counters))
        .map(|i| (ctxt.fixed_counter(i), fixed_counter_valid(l)))
        .chain(
            (0..usize::from(l.arch_counters))
                .map(|i| (ctxt.arch_control(i), !INTEL_EVNTSEL_RESERVED)),
        );
    for (slot, valid) in banks {
        if let Ok(off) = slot {
            changed += repair(
                page.read::<u64>(off),
                |v| v & valid,
                |v| {
                    let _ = page.write::<u64>(off, v);
                },
            );
        }
    }
    changed
}

/// Makes the AMD context in the page pass Xen's checks as far as the guest can tell:
/// clears the reserved bits of every control (the value they have on every AMD CPU the
/// library knows; a CPU whose reserved bits read non-zero needs `XENPMU_finish` and a new
/// `XENPMU_init` instead). Returns how many registers changed.
pub(crate) fn sanitize_amd(ctxt: AmdCtxt, len: usize) -> u32 {
    let page = ctxt.page();
    let mut changed = 0;
    for i in 0..len {
        if let Ok(off) = ctxt.ctrl(i) {
            changed += repair(
                page.read::<u64>(off),
                |v| v & !AMD_CTRL_RESERVED,
                |v| {
                    let _ = page.write::<u64>(off, v);
                },
            );
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(arch: u8, fixed: u8, version: u8, width: u8) -> IntelLayout {
        IntelLayout {
            arch_counters: arch,
            fixed_counters: fixed,
            version,
            fixed_counter_width: width,
            arch_counter_width: 48,
        }
    }

    #[test]
    fn intel_masks_match_xens_for_a_skylake() {
        let l = layout(4, 3, 4, 48);
        assert_eq!(global_ctrl_valid(&l), 0x7_0000_000f);
        assert_eq!(global_ovf_ctrl_valid(&l), 0xe000_0007_0000_000f);
        assert_eq!(
            global_ovf_ctrl_valid(&layout(4, 3, 2, 48)),
            0xc000_0007_0000_000f
        );
        // Three 4-bit fields, AnyThread (bit 2 of each) refused.
        assert_eq!(fixed_ctrl_valid(&l), 0xbbb);
        assert_eq!(fixed_counter_valid(&l), 0xffff_ffff_ffff);
        assert_eq!(INTEL_EVNTSEL_RESERVED, 0xffff_ffff_0028_0000);
        assert_eq!(
            AMD_CTRL_RESERVED,
            0xffff_fc00_0000_0000 | 0xf0_0000_0000 | 0x28_0000
        );
    }

    #[test]
    fn extreme_counts_do_not_overflow() {
        let l = layout(255, 31, 5, 200);
        assert_eq!(global_ctrl_valid(&l), u64::MAX);
        assert_eq!(fixed_counter_valid(&l), u64::MAX);
        // 31 fields cover all 64 bits; AnyThread bits of the first 16 are refused.
        assert_eq!(fixed_ctrl_valid(&l), 0xbbbb_bbbb_bbbb_bbbb);
        let none = layout(0, 0, 0, 0);
        assert_eq!(global_ctrl_valid(&none), 0);
        assert_eq!(fixed_ctrl_valid(&none), 0);
        assert_eq!(fixed_counter_valid(&none), 0);
    }

    #[test]
    fn legacy_counter_writes_keep_eax_sign_extended_to_the_width() {
        let mut l = layout(4, 3, 4, 48);
        assert_eq!(legacy_counter_value(&l, 0x8000_0000), 0xffff_8000_0000);
        assert_eq!(legacy_counter_value(&l, 0xffff_ffff_7fff_ffff), 0x7fff_ffff);
        l.arch_counter_width = 40;
        assert_eq!(legacy_counter_value(&l, 0xffff_ffff), 0xff_ffff_ffff);
        l.arch_counter_width = 200;
        assert_eq!(legacy_counter_value(&l, 0x8000_0000), 0xffff_ffff_8000_0000);
        // No width reported: EAX itself, nothing above it.
        l.arch_counter_width = 0;
        assert_eq!(legacy_counter_value(&l, 0x1234_5678_8000_0001), 0x8000_0001);
    }

    #[test]
    fn the_event_filters_allow_only_their_events() {
        let ipc = XenPmuFeature::IPC_ONLY;
        let arch = XenPmuFeature::ARCH_ONLY;
        let enabled = 0x43_0000; // EN, INT, USR, OS
        for event in IPC_ONLY_EVENTS {
            let value = enabled | u64::from(event);
            assert!(event_allowed(ipc, value), "{event:#x}");
            assert!(event_allowed(arch, value), "{event:#x}");
            assert!(event_allowed(ipc | arch, value), "{event:#x}");
        }
        for event in ARCH_ONLY_EXTRA_EVENTS {
            let value = enabled | u64::from(event);
            assert!(!event_allowed(ipc, value), "{event:#x}");
            assert!(event_allowed(arch, value), "{event:#x}");
            assert!(event_allowed(ipc | arch, value), "{event:#x}");
        }
        // Only bits 15..0 name the event; "no event" is not in either list.
        for value in [
            0,
            enabled,
            enabled | 0x00c6,
            enabled | 0x023c,
            enabled | 0x3c00,
        ] {
            assert!(!event_allowed(ipc, value), "{value:#x}");
            assert!(!event_allowed(arch, value), "{value:#x}");
        }
        // Without a filter (BTS alone is not one) every event passes.
        for features in [XenPmuFeature::empty(), XenPmuFeature::INTEL_BTS] {
            assert!(event_allowed(features, 0));
            assert!(event_allowed(features, enabled | 0x00c6));
        }
    }

    #[test]
    fn intel_write_ok_applies_the_filter_to_event_selects_only() {
        let l = layout(4, 3, 4, 48);
        let ipc = XenPmuFeature::IPC_ONLY;
        let select = IntelMsr::ArchCtrl(0);
        assert!(intel_write_ok(
            &l,
            XenPmuFeature::empty(),
            select,
            0x43_00c6
        ));
        assert!(!intel_write_ok(&l, ipc, select, 0x43_00c6));
        assert!(intel_write_ok(&l, ipc, select, 0x43_00c0));
        // The reserved bits are refused whatever the filter.
        assert!(!intel_write_ok(&l, ipc, select, (1 << 21) | 0x00c0));
        // Other MSRs do not look at the event.
        assert!(intel_write_ok(&l, ipc, IntelMsr::GlobalCtrl, 0x7_0000_000f));
        assert!(intel_write_ok(&l, ipc, IntelMsr::ArchCounter(0), 0x1234));
        assert!(intel_write_ok(&l, ipc, IntelMsr::FixedCtrl, 0));
    }

    #[test]
    fn ds_area_is_a_pv_address() {
        for ok in [0, 0x7fff_ffff_f000, XEN_VIRT_END, !0xfff] {
            assert!(ds_area_valid(ok), "{ok:#x}");
        }
        for bad in [
            1 << 47,
            0x8000_0000_0000_0000,
            0xffff_8000_0000_0000,
            XEN_VIRT_END - 1,
        ] {
            assert!(!ds_area_valid(bad), "{bad:#x}");
        }
    }

    #[test]
    fn amd_reserved_bits_must_match_the_cached_control() {
        assert!(amd_ctrl_write_ok(0, 0x43_0076));
        assert!(!amd_ctrl_write_ok(0, 1 << 19));
        assert!(!amd_ctrl_write_ok(0, 1 << 42));
        assert!(amd_ctrl_write_ok(1 << 42, (1 << 42) | 0x43_0076));
        assert!(!amd_ctrl_write_ok(1 << 42, 0x43_0076));
        // Bits 41..40 (HG_ONLY) and 35..32 (event select high) are not reserved.
        assert!(amd_ctrl_write_ok(0, (0b11 << 40) | (0xf << 32)));
    }
}
