//! Which PMU MSRs this CPU has, from CPUID.
//!
//! The layout must agree with the one Xen uses to fill the shared page: the cached
//! context holds exactly the banks Xen sized for this CPU, so a layout with *more*
//! counters than Xen's would index past Xen's data (the hostile-page checks
//! in the page module would then refuse the access), while one with fewer only leaves some
//! MSRs to the pass-through path.

/// `CPUID.0` vendor string "GenuineIntel" as `ebx, edx, ecx`.
const INTEL: [u32; 3] = vendor(*b"GenuineIntel");
/// "AuthenticAMD".
const AMD: [u32; 3] = vendor(*b"AuthenticAMD");
/// "HygonGenuine".
const HYGON: [u32; 3] = vendor(*b"HygonGenuine");
/// "CentaurHauls".
const CENTAUR: [u32; 3] = vendor(*b"CentaurHauls");
/// "  Shanghai  " (Zhaoxin).
const ZHAOXIN: [u32; 3] = vendor(*b"  Shanghai  ");

const fn vendor(s: [u8; 12]) -> [u32; 3] {
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// `MSR_K7_EVNTSEL0`: the first legacy AMD event-select MSR.
pub const MSR_K7_EVNTSEL0: u32 = 0xc001_0000;
/// `MSR_K7_PERFCTR0`: the first legacy AMD counter MSR.
pub const MSR_K7_PERFCTR0: u32 = 0xc001_0004;
/// `MSR_F15H_PERF_CTL0`: the first family-15h-style control MSR (interleaved, step 2).
pub const MSR_F15H_PERF_CTL: u32 = 0xc001_0200;
/// `MSR_F15H_PERF_CTR0`: the first family-15h-style counter MSR (interleaved, step 2).
pub const MSR_F15H_PERF_CTR: u32 = 0xc001_0201;
/// Number of counters in the family-15h-style layout.
pub const F15H_NUM_COUNTERS: u32 = 6;
/// Number of counters in the legacy K7 layout.
pub const K7_NUM_COUNTERS: u32 = 4;

/// The CPU vendor, as far as the vPMU cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "CentaurHauls" (Intel-compatible PMU).
    Centaur,
    /// "  Shanghai  " (Intel-compatible PMU).
    Zhaoxin,
    /// "AuthenticAMD".
    Amd,
    /// "HygonGenuine" (AMD-compatible PMU; family 0x18 has the family-15h layout).
    Hygon,
    /// Anything else: the vPMU knows no MSRs of it.
    Unknown,
}

impl CpuVendor {
    /// The vendor from `CPUID.0`'s `ebx, edx, ecx`.
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let [_, ebx, ecx, edx] = cpuid(0, 0);
        match [ebx, edx, ecx] {
            INTEL => CpuVendor::Intel,
            AMD => CpuVendor::Amd,
            HYGON => CpuVendor::Hygon,
            CENTAUR => CpuVendor::Centaur,
            ZHAOXIN => CpuVendor::Zhaoxin,
            _ => CpuVendor::Unknown,
        }
    }
}

/// The display family from `CPUID.1.EAX`: the base family, plus the extended family when
/// the base family is 0xf.
pub const fn display_family(leaf1_eax: u32) -> u32 {
    let base = (leaf1_eax >> 8) & 0xf;
    if base == 0xf {
        base + ((leaf1_eax >> 20) & 0xff)
    } else {
        base
    }
}

/// The Intel architectural PMU: how many general-purpose and fixed counters there are,
/// and what Xen's checks of a cached context need to know about them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IntelLayout {
    /// General-purpose ("architectural") counters: `CPUID.0xA.EAX[15:8]`.
    pub arch_counters: u8,
    /// Fixed-function counters: `CPUID.0xA.EDX[4:0]`.
    pub fixed_counters: u8,
    /// The architectural PMU version: `CPUID.0xA.EAX[7:0]` (from 3 on, Xen lets
    /// `IA32_PERF_GLOBAL_OVF_CTRL` clear bit 61).
    pub version: u8,
    /// The width in bits of the fixed-function counters: `CPUID.0xA.EDX[12:5]` (Xen
    /// refuses a cached fixed counter with a bit at or above it).
    pub fixed_counter_width: u8,
    /// The width in bits of the general-purpose counters: `CPUID.0xA.EAX[23:16]`. A
    /// legacy `IA32_PMCn` write keeps this many bits of the sign-extended low 32 (see
    /// [`effective_arch_counter_width`](Self::effective_arch_counter_width) for 0).
    pub arch_counter_width: u8,
}

impl IntelLayout {
    /// The width a cached legacy `IA32_PMCn` write is kept to: [`arch_counter_width`],
    /// at most 64, and 32 when CPUID reports 0.
    ///
    /// Xen passes the host's leaf 0xA through to a PV guest, so a zero width next to
    /// general counters only comes from a broken or hand-built CPUID: the hardware's real
    /// width is unknown. Taken literally it would make every cached counter write store 0.
    /// 32 keeps `EAX` itself (no sign bits above bit 31), which is right in both ways Xen
    /// loads the page back at the flush: through `IA32_PMCn` (no full-width writes) the
    /// hardware sign-extends it to exactly what the trapped write leaves, and through the
    /// full-width `IA32_A_PMCn` it is a value every Intel counter (at least 40 bits wide)
    /// accepts, where a guessed wider width could make Xen load bits the hardware refuses.
    ///
    /// [`arch_counter_width`]: Self::arch_counter_width
    pub const fn effective_arch_counter_width(&self) -> u32 {
        match self.arch_counter_width {
            0 => 32,
            width if width > 64 => 64,
            width => width as u32,
        }
    }
}

/// An AMD PMU layout: where the control and counter MSRs are and how they interleave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AmdLayout {
    /// The first control (event-select) MSR.
    pub ctrls_base: u32,
    /// The first counter MSR.
    pub counters_base: u32,
    /// The distance between consecutive controls (and consecutive counters).
    pub step: u32,
    /// The number of counters (and of controls).
    pub num_counters: u32,
    /// Whether the legacy K7 MSRs mirror the first four counters of this layout (true
    /// for the family-15h layout), so that they are remapped onto it.
    pub k7_mirrored: bool,
}

impl AmdLayout {
    /// The family-15h-style layout: `CTL n` at `0xc0010200 + 2n`, `CTR n` at
    /// `0xc0010201 + 2n`, six counters, K7 MSRs mirrored.
    pub const F15H: AmdLayout = AmdLayout {
        ctrls_base: MSR_F15H_PERF_CTL,
        counters_base: MSR_F15H_PERF_CTR,
        step: 2,
        num_counters: F15H_NUM_COUNTERS,
        k7_mirrored: true,
    };

    /// The legacy K7 layout: `EVNTSEL n` at `0xc0010000 + n`, `PERFCTR n` at
    /// `0xc0010004 + n`, four counters.
    pub const K7: AmdLayout = AmdLayout {
        ctrls_base: MSR_K7_EVNTSEL0,
        counters_base: MSR_K7_PERFCTR0,
        step: 1,
        num_counters: K7_NUM_COUNTERS,
        k7_mirrored: false,
    };
}

/// The PMU layout of the CPU: which MSR indices are PMU MSRs and which slot of the
/// shared page's cached context each maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PmuLayout {
    /// No PMU MSRs (unknown vendor).
    None,
    /// Intel, Centaur or Zhaoxin.
    Intel(IntelLayout),
    /// AMD or Hygon.
    Amd(AmdLayout),
}

impl PmuLayout {
    /// The layout from CPUID. `cpuid(leaf, subleaf)` returns `[eax, ebx, ecx, edx]`; it is
    /// injected so that tests can use synthetic values and so that a PV kernel can pass
    /// Xen's filtered view (the forced-emulation `cpuid`), which is the view Xen sizes
    /// the shared page by.
    ///
    /// - Intel, Centaur, Zhaoxin: general counters `CPUID.0xA.EAX[15:8]`, fixed counters
    ///   `CPUID.0xA.EDX[4:0]`, version `EAX[7:0]`, general-counter width `EAX[23:16]`,
    ///   fixed-counter width `EDX[12:5]` (all 0 when the maximum basic leaf is below 0xA).
    /// - AMD family 0x15 and family 0x17 or later: the family-15h layout.
    /// - Other AMD families (0x16 included, as Xen does): the K7 layout.
    /// - Hygon family 0x18: the family-15h layout (Xen sizes it like AMD family 0x15);
    ///   any other Hygon family: the K7 layout.
    /// - Unknown vendor: [`PmuLayout::None`].
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let max_leaf = cpuid(0, 0)[0];
        let family = || {
            if max_leaf >= 1 {
                display_family(cpuid(1, 0)[0])
            } else {
                0
            }
        };
        match CpuVendor::from_cpuid(&cpuid) {
            CpuVendor::Intel | CpuVendor::Centaur | CpuVendor::Zhaoxin => {
                let [eax, _, _, edx] = if max_leaf >= 0xa {
                    cpuid(0xa, 0)
                } else {
                    [0; 4]
                };
                PmuLayout::Intel(IntelLayout {
                    arch_counters: ((eax >> 8) & 0xff) as u8,
                    fixed_counters: (edx & 0x1f) as u8,
                    version: (eax & 0xff) as u8,
                    fixed_counter_width: ((edx >> 5) & 0xff) as u8,
                    arch_counter_width: ((eax >> 16) & 0xff) as u8,
                })
            }
            CpuVendor::Amd => PmuLayout::Amd(Self::amd_for_family(family())),
            CpuVendor::Hygon => PmuLayout::Amd(Self::hygon_for_family(family())),
            CpuVendor::Unknown => PmuLayout::None,
        }
    }

    /// The AMD layout of display family `family`: the family-15h layout for 0x15 and for
    /// 0x17 onwards, K7 otherwise.
    ///
    /// Family 0x16 stays on K7 because that is the layout Xen sizes the shared page by
    /// for it (four counters); claiming six would read past Xen's banks.
    pub const fn amd_for_family(family: u32) -> AmdLayout {
        if family == 0x15 || family >= 0x17 {
            AmdLayout::F15H
        } else {
            AmdLayout::K7
        }
    }

    /// The Hygon layout of display family `family`: the family-15h layout for 0x18 (Xen
    /// gives it six counters, with the K7 MSRs mirrored, exactly as for AMD family 0x15),
    /// K7 otherwise.
    ///
    /// Xen knows no other Hygon family (its vPMU is then off and no page is ever
    /// registered); K7 is the subset every AMD-compatible PMU has.
    pub const fn hygon_for_family(family: u32) -> AmdLayout {
        if family == 0x18 {
            AmdLayout::F15H
        } else {
            AmdLayout::K7
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic CPUID: vendor string, leaf-1 EAX, leaf-0xA EAX and EDX.
    fn fake(
        vendor: &[u8; 12],
        leaf1_eax: u32,
        a_eax: u32,
        a_edx: u32,
    ) -> impl Fn(u32, u32) -> [u32; 4] {
        let v = super::vendor(*vendor);
        move |leaf, _| match leaf {
            0 => [0xd, v[0], v[2], v[1]],
            1 => [leaf1_eax, 0, 0, 0],
            0xa => [a_eax, 0, 0, a_edx],
            _ => [0; 4],
        }
    }

    /// Leaf-1 EAX for display family `fam` (base 0xf + extended when `fam >= 0xf`).
    fn fam(fam: u32) -> u32 {
        if fam >= 0xf {
            (0xf << 8) | ((fam - 0xf) << 20)
        } else {
            fam << 8
        }
    }

    #[test]
    fn intel_counts_from_leaf_a() {
        let l = PmuLayout::from_cpuid(fake(
            b"GenuineIntel",
            fam(6),
            0x0804_0802 | (7 << 8),
            0x0000_0603,
        ));
        assert_eq!(
            l,
            PmuLayout::Intel(IntelLayout {
                arch_counters: 0x0f,
                fixed_counters: 3,
                version: 2,
                fixed_counter_width: 48,
                arch_counter_width: 4,
            })
        );
        let l = PmuLayout::from_cpuid(fake(b"CentaurHauls", fam(6), 4 << 8, 0xffff_ffe2));
        assert_eq!(
            l,
            PmuLayout::Intel(IntelLayout {
                arch_counters: 4,
                fixed_counters: 2,
                version: 0,
                fixed_counter_width: 0xff,
                arch_counter_width: 0,
            })
        );
        let l = PmuLayout::from_cpuid(fake(b"  Shanghai  ", fam(7), (2 << 8) | 5, 1));
        assert!(matches!(
            l,
            PmuLayout::Intel(IntelLayout {
                arch_counters: 2,
                fixed_counters: 1,
                version: 5,
                fixed_counter_width: 0,
                arch_counter_width: 0,
            })
        ));
    }

    #[test]
    fn intel_without_leaf_a_has_no_counters() {
        let v = super::vendor(*b"GenuineIntel");
        let l = PmuLayout::from_cpuid(move |leaf, _| match leaf {
            0 => [5, v[0], v[2], v[1]],
            0xa => [0xffff_ffff; 4],
            _ => [0; 4],
        });
        assert_eq!(
            l,
            PmuLayout::Intel(IntelLayout {
                arch_counters: 0,
                fixed_counters: 0,
                version: 0,
                fixed_counter_width: 0,
                arch_counter_width: 0,
            })
        );
    }

    #[test]
    fn an_unreported_general_counter_width_is_taken_as_32() {
        let with_width = |arch_counter_width| IntelLayout {
            arch_counters: 4,
            fixed_counters: 3,
            version: 2,
            fixed_counter_width: 48,
            arch_counter_width,
        };
        assert_eq!(with_width(0).effective_arch_counter_width(), 32);
        assert_eq!(with_width(1).effective_arch_counter_width(), 1);
        assert_eq!(with_width(40).effective_arch_counter_width(), 40);
        assert_eq!(with_width(48).effective_arch_counter_width(), 48);
        assert_eq!(with_width(64).effective_arch_counter_width(), 64);
        assert_eq!(with_width(65).effective_arch_counter_width(), 64);
        assert_eq!(with_width(255).effective_arch_counter_width(), 64);
    }

    #[test]
    fn amd_families() {
        for (f, want) in [
            (0x0f, AmdLayout::K7),
            (0x10, AmdLayout::K7),
            (0x12, AmdLayout::K7),
            (0x14, AmdLayout::K7),
            (0x15, AmdLayout::F15H),
            (0x16, AmdLayout::K7),
            (0x17, AmdLayout::F15H),
            (0x19, AmdLayout::F15H),
            (0x1a, AmdLayout::F15H),
        ] {
            assert_eq!(
                PmuLayout::from_cpuid(fake(b"AuthenticAMD", fam(f), 0, 0)),
                PmuLayout::Amd(want),
                "family {f:#x}"
            );
        }
        assert_eq!(display_family(fam(0x19)), 0x19);
        assert_eq!(
            display_family(fam(6) | (0xff << 20)),
            6,
            "extended family only with base 0xf"
        );
    }

    #[test]
    fn hygon_and_unknown() {
        // Family 0x18 is sized like AMD family 0x15: six counters, K7 MSRs mirrored.
        let dhyana = PmuLayout::from_cpuid(fake(b"HygonGenuine", fam(0x18), 0, 0));
        assert_eq!(dhyana, PmuLayout::Amd(AmdLayout::F15H));
        let PmuLayout::Amd(l) = dhyana else {
            unreachable!()
        };
        assert_eq!((l.num_counters, l.step, l.k7_mirrored), (6, 2, true));
        assert_eq!(
            PmuLayout::from_cpuid(fake(b"HygonGenuine", fam(0x19), 0, 0)),
            PmuLayout::Amd(AmdLayout::K7),
            "no other Hygon family has a Xen vPMU"
        );
        assert_eq!(
            PmuLayout::from_cpuid(fake(b"VIA VIA VIA ", fam(6), 0x800, 3)),
            PmuLayout::None
        );
        assert_eq!(PmuLayout::from_cpuid(|_, _| [0; 4]), PmuLayout::None);
    }
}
