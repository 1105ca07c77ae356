//! Which MSR indices are PMU MSRs, and which slot of the cached context each one is.
//!
//! The "is it a PMU MSR" answer equals Linux's `is_intel_pmu_msr` / `is_amd_pmu_msr` for
//! the same layout (see `docs/pmu.md`). The slot is decided here too, in O(1), so that the
//! emulation only has to fetch or store it.

use super::layout::{AmdLayout, IntelLayout, MSR_K7_EVNTSEL0, MSR_K7_PERFCTR0, PmuLayout};

/// `IA32_FIXED_CTR_CTRL`.
pub const MSR_CORE_PERF_FIXED_CTR_CTRL: u32 = 0x38d;
/// `IA32_PERF_GLOBAL_STATUS`.
pub const MSR_CORE_PERF_GLOBAL_STATUS: u32 = 0x38e;
/// `IA32_PERF_GLOBAL_CTRL`.
pub const MSR_CORE_PERF_GLOBAL_CTRL: u32 = 0x38f;
/// `IA32_PERF_GLOBAL_OVF_CTRL`.
pub const MSR_CORE_PERF_GLOBAL_OVF_CTRL: u32 = 0x390;
/// `IA32_DS_AREA`.
pub const MSR_IA32_DS_AREA: u32 = 0x600;
/// `IA32_PEBS_ENABLE`.
pub const MSR_IA32_PEBS_ENABLE: u32 = 0x3f1;
/// `IA32_DEBUGCTL`: deliberately *not* a PMU MSR here (see `docs/pmu.md`).
pub const MSR_IA32_DEBUGCTLMSR: u32 = 0x1d9;
/// `IA32_FIXED_CTR0`.
pub const MSR_CORE_PERF_FIXED_CTR0: u32 = 0x309;
/// `IA32_PERFEVTSEL0`.
pub const MSR_P6_EVNTSEL0: u32 = 0x186;
/// `IA32_PMC0` (legacy, 32-bit writes).
pub const MSR_IA32_PERFCTR0: u32 = 0xc1;
/// `IA32_A_PMC0`, the full-width alias of `IA32_PMC0`.
pub const MSR_IA32_PMC0: u32 = 0x4c1;
/// Clears the one bit in which the legacy and full-width counter MSRs differ.
pub const MSR_PMC_ALIAS_MASK: u32 = !(MSR_IA32_PERFCTR0 ^ MSR_IA32_PMC0);
/// RDPMC `ecx` bit selecting the fixed-function counters (Intel).
pub const INTEL_PMC_TYPE_FIXED: u32 = 1 << 30;

/// An Intel PMU MSR and its slot in the cached context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IntelMsr {
    /// `IA32_FIXED_CTR_CTRL` → `fixed_ctrl`.
    FixedCtrl,
    /// `IA32_DS_AREA` → `ds_area`.
    DsArea,
    /// `IA32_PEBS_ENABLE` → `pebs_enable`.
    PebsEnable,
    /// `IA32_PERF_GLOBAL_CTRL` → `global_ctrl`.
    GlobalCtrl,
    /// `IA32_PERF_GLOBAL_STATUS` → `global_status`.
    GlobalStatus,
    /// `IA32_PERF_GLOBAL_OVF_CTRL` → `global_ovf_ctrl` (a write also clears those bits
    /// of `global_status`).
    GlobalOvfCtrl,
    /// `IA32_FIXED_CTRn` → `fixed_counters[n]`.
    FixedCounter(u8),
    /// `IA32_PERFEVTSELn` → `arch_counters[n].control`.
    ArchCtrl(u8),
    /// `IA32_PMCn` (the legacy counter MSR) → `arch_counters[n].counter`.
    ArchCounter(u8),
    /// `IA32_A_PMCn`, the full-width alias of `IA32_PMCn`: the same counter, but Xen's PV
    /// trap path does not hand it to the vPMU (it `#GP`s), so the cached path passes it
    /// through to the same answer.
    ArchCounterFullWidth(u8),
}

impl IntelMsr {
    /// Whether Xen's trap-and-emulate path for a PV guest hands this MSR to its vPMU at
    /// all. It does so only for `IA32_PMC0..7`, `IA32_PERFEVTSEL0..7`,
    /// `IA32_FIXED_CTR0..2` and `IA32_FIXED_CTR_CTRL..IA32_PERF_GLOBAL_OVF_CTRL` (Xen 4.20
    /// to 4.22, `pv/emul-priv-op.c`; 4.17 stops at `IA32_PERFEVTSEL3`, see `docs/pmu.md`);
    /// every other MSR, including `IA32_A_PMCn`,
    /// `IA32_PEBS_ENABLE` and `IA32_DS_AREA`, is refused with `#GP` whatever the vPMU
    /// holds. The cached path serves only the routed ones, so an access answers the same
    /// inside a PMI and outside it.
    pub const fn routed_by_xen_pv(self) -> bool {
        match self {
            Self::FixedCtrl | Self::GlobalCtrl | Self::GlobalStatus | Self::GlobalOvfCtrl => true,
            Self::FixedCounter(i) => i < 3,
            Self::ArchCtrl(i) | Self::ArchCounter(i) => i < 8,
            Self::DsArea | Self::PebsEnable | Self::ArchCounterFullWidth(_) => false,
        }
    }
}

/// An AMD PMU MSR and its slot in the cached context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AmdMsr {
    /// Control `n` → `ctrls[n]`.
    Ctrl(u8),
    /// Counter `n` → `counters[n]`.
    Counter(u8),
    /// Inside Linux's AMD PMU ranges, but no slot of this layout: always passed through.
    /// (Linux's range checks include, for example, one MSR past the last F15H counter,
    /// and on the family-15h layout the K7 range extends past `PERFCTR3`.)
    NoSlot,
}

/// A PMU MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PmuMsr {
    /// Intel, Centaur or Zhaoxin.
    Intel(IntelMsr),
    /// AMD or Hygon.
    Amd(AmdMsr),
}

/// Classifies `msr` under `layout`: `None` if it is not a PMU MSR.
pub fn classify(layout: &PmuLayout, msr: u32) -> Option<PmuMsr> {
    match layout {
        PmuLayout::None => None,
        PmuLayout::Intel(l) => classify_intel(l, msr).map(PmuMsr::Intel),
        PmuLayout::Amd(l) => classify_amd(l, msr).map(PmuMsr::Amd),
    }
}

/// `index - base` when `base <= index < base + count`.
fn in_range(index: u32, base: u32, count: u32) -> Option<u8> {
    let n = index.checked_sub(base)?;
    if n < count {
        u8::try_from(n).ok()
    } else {
        None
    }
}

/// Intel classification, in Linux's order: the named MSRs, then the fixed counters, the
/// event selects and the (aliased) general counters.
pub fn classify_intel(l: &IntelLayout, msr: u32) -> Option<IntelMsr> {
    Some(match msr {
        MSR_CORE_PERF_FIXED_CTR_CTRL => IntelMsr::FixedCtrl,
        MSR_IA32_DS_AREA => IntelMsr::DsArea,
        MSR_IA32_PEBS_ENABLE => IntelMsr::PebsEnable,
        MSR_CORE_PERF_GLOBAL_CTRL => IntelMsr::GlobalCtrl,
        MSR_CORE_PERF_GLOBAL_STATUS => IntelMsr::GlobalStatus,
        MSR_CORE_PERF_GLOBAL_OVF_CTRL => IntelMsr::GlobalOvfCtrl,
        _ => {
            if let Some(i) = in_range(msr, MSR_CORE_PERF_FIXED_CTR0, l.fixed_counters.into()) {
                IntelMsr::FixedCounter(i)
            } else if let Some(i) = in_range(msr, MSR_P6_EVNTSEL0, l.arch_counters.into()) {
                IntelMsr::ArchCtrl(i)
            } else if let Some(i) = in_range(
                msr & MSR_PMC_ALIAS_MASK,
                MSR_IA32_PERFCTR0,
                l.arch_counters.into(),
            ) {
                if msr & !MSR_PMC_ALIAS_MASK == 0 {
                    IntelMsr::ArchCounter(i)
                } else {
                    IntelMsr::ArchCounterFullWidth(i)
                }
            } else {
                return None;
            }
        }
    })
}

/// Linux's AMD range test: `[F15H_CTL0, F15H_CTR0 + 2n)` or `[K7_EVNTSEL0, K7_PERFCTR0 + n)`,
/// on every AMD family.
fn is_amd_pmu_msr(l: &AmdLayout, msr: u32) -> bool {
    let n = l.num_counters;
    // Saturating: a hand-built layout with an absurd count must not overflow.
    let f15h_end = super::layout::MSR_F15H_PERF_CTR.saturating_add(n.saturating_mul(2));
    (super::layout::MSR_F15H_PERF_CTL..f15h_end).contains(&msr)
        || (MSR_K7_EVNTSEL0..MSR_K7_PERFCTR0.saturating_add(n)).contains(&msr)
}

/// The family-15h MSR that a K7 MSR mirrors: `EVNTSELn` → `CTLn` = `0xc0010200 + 2n`, and
/// `PERFCTRn` → `CTRn` = `0xc0010201 + 2n` (n < 4). Anything else is returned unchanged.
///
/// Linux adds `n` rather than `2n`, which maps `PERFCTR1` to `CTL1`; see `docs/pmu.md`.
pub const fn k7_to_f15h(msr: u32) -> u32 {
    use super::layout::{MSR_F15H_PERF_CTL, MSR_F15H_PERF_CTR};
    if msr >= MSR_K7_EVNTSEL0 && msr < MSR_K7_PERFCTR0 {
        MSR_F15H_PERF_CTL + 2 * (msr - MSR_K7_EVNTSEL0)
    } else if msr >= MSR_K7_PERFCTR0 && msr < MSR_K7_PERFCTR0 + 4 {
        MSR_F15H_PERF_CTR + 2 * (msr - MSR_K7_PERFCTR0)
    } else {
        msr
    }
}

/// `Some(i)` if `msr == base + i * step` with `i < count`.
fn strided(msr: u32, base: u32, step: u32, count: u32) -> Option<u8> {
    let d = msr.checked_sub(base)?;
    if step == 0 || !d.is_multiple_of(step) {
        return None;
    }
    in_range(d / step, 0, count)
}

/// AMD classification: Linux's ranges, then the slot (after the K7 → F15H remap on
/// layouts that mirror the K7 MSRs).
pub fn classify_amd(l: &AmdLayout, msr: u32) -> Option<AmdMsr> {
    if !is_amd_pmu_msr(l, msr) {
        return None;
    }
    let msr = if l.k7_mirrored { k7_to_f15h(msr) } else { msr };
    Some(
        if let Some(i) = strided(msr, l.ctrls_base, l.step, l.num_counters) {
            AmdMsr::Ctrl(i)
        } else if let Some(i) = strided(msr, l.counters_base, l.step, l.num_counters) {
            AmdMsr::Counter(i)
        } else {
            AmdMsr::NoSlot
        },
    )
}

/// What an RDPMC counter index names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PmcIndex {
    /// Intel fixed counter `n` (`ecx` = bit 30 | n).
    IntelFixed(u8),
    /// Intel general counter `n`.
    IntelArch(u8),
    /// AMD counter `n`.
    Amd(u8),
}

impl PmcIndex {
    /// The counter MSR that RDPMC of this index reads outside a PMI.
    pub fn msr(self, layout: &PmuLayout) -> Option<u32> {
        match (self, layout) {
            (PmcIndex::IntelFixed(n), PmuLayout::Intel(_)) => {
                Some(MSR_CORE_PERF_FIXED_CTR0 + u32::from(n))
            }
            (PmcIndex::IntelArch(n), PmuLayout::Intel(_)) => Some(MSR_IA32_PERFCTR0 + u32::from(n)),
            (PmcIndex::Amd(n), PmuLayout::Amd(l)) => u32::from(n)
                .checked_mul(l.step)
                .and_then(|offset| l.counters_base.checked_add(offset)),
            _ => None,
        }
    }
}

/// Decodes an RDPMC counter index, refusing any that names no counter of `layout`.
///
/// Intel: bit 30 selects the fixed counters; every other bit outside the index must be
/// clear (Linux ignores bits 16–29, which would silently alias other counters). AMD: the
/// index must be below the counter count.
pub fn decode_pmc(layout: &PmuLayout, counter: u32) -> Option<PmcIndex> {
    match layout {
        PmuLayout::None => None,
        PmuLayout::Intel(l) => {
            if counter & INTEL_PMC_TYPE_FIXED != 0 {
                in_range(counter & !INTEL_PMC_TYPE_FIXED, 0, l.fixed_counters.into())
                    .map(PmcIndex::IntelFixed)
            } else {
                in_range(counter, 0, l.arch_counters.into()).map(PmcIndex::IntelArch)
            }
        }
        PmuLayout::Amd(l) => in_range(counter, 0, l.num_counters).map(PmcIndex::Amd),
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::{AmdLayout, IntelLayout, PmuLayout};
    use super::*;

    const SKL: IntelLayout = IntelLayout {
        arch_counters: 4,
        fixed_counters: 3,
        version: 4,
        fixed_counter_width: 48,
        arch_counter_width: 48,
    };

    /// Linux's `is_intel_pmu_msr`, transcribed from the spec's table as a reference model.
    fn linux_is_intel(l: &IntelLayout, msr: u32) -> bool {
        let (arch, fixed) = (u32::from(l.arch_counters), u32::from(l.fixed_counters));
        matches!(msr, 0x38d | 0x600 | 0x3f1 | 0x38f | 0x38e | 0x390)
            || (0x309..0x309 + fixed).contains(&msr)
            || (0x186..0x186 + arch).contains(&msr)
            || (0xc1..0xc1 + arch).contains(&(msr & 0xffff_fbff))
    }

    /// Linux's `is_amd_pmu_msr`, from the spec.
    fn linux_is_amd(l: &AmdLayout, msr: u32) -> bool {
        let n = l.num_counters;
        (0xc001_0200..0xc001_0201 + 2 * n).contains(&msr)
            || (0xc001_0000..0xc001_0004 + n).contains(&msr)
    }

    #[test]
    fn intel_matches_linux_everywhere_interesting() {
        for arch in [0u8, 1, 4, 8, 255] {
            for fixed in [0u8, 3, 31] {
                let l = IntelLayout {
                    arch_counters: arch,
                    fixed_counters: fixed,
                    version: 4,
                    fixed_counter_width: 48,
                    arch_counter_width: 48,
                };
                for msr in (0..0x1000).chain(0xc000_0000..0xc000_0200) {
                    assert_eq!(
                        classify_intel(&l, msr).is_some(),
                        linux_is_intel(&l, msr),
                        "msr {msr:#x} arch {arch} fixed {fixed}"
                    );
                }
            }
        }
    }

    #[test]
    fn amd_matches_linux_everywhere_interesting() {
        for l in [AmdLayout::K7, AmdLayout::F15H] {
            for msr in (0xc000_ff00..0xc001_0400).chain(0..0x1000) {
                assert_eq!(
                    classify_amd(&l, msr).is_some(),
                    linux_is_amd(&l, msr),
                    "{msr:#x}"
                );
            }
        }
    }

    #[test]
    fn intel_slots() {
        let c = |m| classify_intel(&SKL, m);
        assert_eq!(c(0x38d), Some(IntelMsr::FixedCtrl));
        assert_eq!(c(0x600), Some(IntelMsr::DsArea));
        assert_eq!(c(0x3f1), Some(IntelMsr::PebsEnable));
        assert_eq!(c(0x38f), Some(IntelMsr::GlobalCtrl));
        assert_eq!(c(0x38e), Some(IntelMsr::GlobalStatus));
        assert_eq!(c(0x390), Some(IntelMsr::GlobalOvfCtrl));
        assert_eq!(c(0x309), Some(IntelMsr::FixedCounter(0)));
        assert_eq!(c(0x30b), Some(IntelMsr::FixedCounter(2)));
        assert_eq!(c(0x30c), None);
        assert_eq!(c(0x186), Some(IntelMsr::ArchCtrl(0)));
        assert_eq!(c(0x189), Some(IntelMsr::ArchCtrl(3)));
        assert_eq!(c(0x18a), None);
        assert_eq!(c(0xc1), Some(IntelMsr::ArchCounter(0)));
        assert_eq!(c(0xc4), Some(IntelMsr::ArchCounter(3)));
        assert_eq!(c(0xc5), None);
        assert_eq!(c(0x4c1), Some(IntelMsr::ArchCounterFullWidth(0)));
        assert_eq!(c(0x4c4), Some(IntelMsr::ArchCounterFullWidth(3)));
        assert_eq!(c(0x4c5), None);
        assert_eq!(c(MSR_IA32_DEBUGCTLMSR), None);
        assert_eq!(c(0x1b), None);
    }

    #[test]
    fn amd_slots_and_k7_remap() {
        let f = |m| classify_amd(&AmdLayout::F15H, m);
        for n in 0..6u8 {
            let n32 = u32::from(n);
            assert_eq!(f(0xc001_0200 + 2 * n32), Some(AmdMsr::Ctrl(n)));
            assert_eq!(f(0xc001_0201 + 2 * n32), Some(AmdMsr::Counter(n)));
        }
        for n in 0..4u8 {
            let n32 = u32::from(n);
            // The fix: K7 EVNTSELn / PERFCTRn alias F15H CTLn / CTRn (2n apart), not +n.
            assert_eq!(k7_to_f15h(0xc001_0000 + n32), 0xc001_0200 + 2 * n32);
            assert_eq!(k7_to_f15h(0xc001_0004 + n32), 0xc001_0201 + 2 * n32);
            assert_eq!(f(0xc001_0000 + n32), Some(AmdMsr::Ctrl(n)));
            assert_eq!(f(0xc001_0004 + n32), Some(AmdMsr::Counter(n)));
        }
        // In Linux's ranges but no slot.
        assert_eq!(f(0xc001_020c), Some(AmdMsr::NoSlot));
        assert_eq!(f(0xc001_0008), Some(AmdMsr::NoSlot));
        assert_eq!(f(0xc001_0009), Some(AmdMsr::NoSlot));
        assert_eq!(f(0xc001_000a), None);

        let k = |m| classify_amd(&AmdLayout::K7, m);
        for n in 0..4u8 {
            let n32 = u32::from(n);
            assert_eq!(k(0xc001_0000 + n32), Some(AmdMsr::Ctrl(n)));
            assert_eq!(k(0xc001_0004 + n32), Some(AmdMsr::Counter(n)));
        }
        // Both ranges are classified on every family; the F15H ones have no K7 slot.
        assert_eq!(k(0xc001_0200), Some(AmdMsr::NoSlot));
        assert_eq!(k(0xc001_0208), Some(AmdMsr::NoSlot));
        assert_eq!(k(0xc001_0209), None);
        assert_eq!(k(0xc001_0008), None);
    }

    #[test]
    fn pmc_decoding() {
        let intel = PmuLayout::Intel(SKL);
        assert_eq!(decode_pmc(&intel, 0), Some(PmcIndex::IntelArch(0)));
        assert_eq!(decode_pmc(&intel, 3), Some(PmcIndex::IntelArch(3)));
        assert_eq!(decode_pmc(&intel, 4), None);
        assert_eq!(decode_pmc(&intel, 1 << 30), Some(PmcIndex::IntelFixed(0)));
        assert_eq!(
            decode_pmc(&intel, (1 << 30) | 2),
            Some(PmcIndex::IntelFixed(2))
        );
        assert_eq!(decode_pmc(&intel, (1 << 30) | 3), None);
        assert_eq!(decode_pmc(&intel, (1 << 30) | (1 << 16)), None);
        assert_eq!(decode_pmc(&intel, 1 << 29), None);
        assert_eq!(decode_pmc(&intel, u32::MAX), None);
        assert_eq!(PmcIndex::IntelFixed(2).msr(&intel), Some(0x30b));
        assert_eq!(PmcIndex::IntelArch(3).msr(&intel), Some(0xc4));

        let f15 = PmuLayout::Amd(AmdLayout::F15H);
        assert_eq!(decode_pmc(&f15, 5), Some(PmcIndex::Amd(5)));
        assert_eq!(decode_pmc(&f15, 6), None);
        assert_eq!(decode_pmc(&f15, 1 << 30), None);
        assert_eq!(PmcIndex::Amd(5).msr(&f15), Some(0xc001_020b));
        let k7 = PmuLayout::Amd(AmdLayout::K7);
        assert_eq!(decode_pmc(&k7, 4), None);
        assert_eq!(PmcIndex::Amd(3).msr(&k7), Some(0xc001_0007));
        assert_eq!(decode_pmc(&PmuLayout::None, 0), None);
    }
}
