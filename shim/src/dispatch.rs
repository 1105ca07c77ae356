//! One probe per access: the class index the policy dispatches on.
//!
//! The fixed routes ([`ROUTES`]) and the PMU MSRs of the CPU's layout are put into one
//! perfect-hash index when the policy is built (in place, in storage the caller gives:
//! the index is about 5 KiB, too much for a small boot stack): a multiplicative hash picks one of 2,048
//! slots, the slot names an entry, and one comparison confirms it. Every MSR, of every
//! class (a route, a PMU MSR, or anything else), costs exactly that probe, so dispatch is
//! flat by construction. The multiplier is searched when the index is built; a layout
//! too large to index (more PMU MSRs than [`MAX_ENTRIES`], or no collision-free
//! multiplier found quickly) gets no index, and the policy falls back to the two-step
//! classification ([`reference_class`]), which gives the same answers.

use xenmsr_asm::fastpath::ReadKind;

use crate::pmu::{PmuLayout, PmuMsr, classify};
use crate::routes::{self, ROUTES, ReadRoute, WriteRoute};

/// What the policy does with an MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// No special handling: the stub executes the instruction.
    Native,
    /// A row of the routing table.
    Route {
        /// What a read does.
        read: ReadRoute,
        /// What a write does.
        write: WriteRoute,
    },
    /// A PMU MSR of the layout, for the vPMU backend.
    Pmu(PmuMsr),
}

/// The classification the index must reproduce: a route if the MSR has one, else a PMU
/// MSR of `layout`, else native.
pub fn reference_class(layout: &PmuLayout, msr: u32) -> Class {
    if let Some(route) = routes::lookup(msr) {
        return Class::Route {
            read: route.read,
            write: route.write,
        };
    }
    match classify(layout, msr) {
        Some(pmu) => Class::Pmu(pmu),
        None => Class::Native,
    }
}

const SLOT_BITS: u32 = 11;
const SLOTS: usize = 1 << SLOT_BITS;
/// The most entries (routes plus PMU MSRs) an index holds.
pub const MAX_ENTRIES: usize = 255;
const MAX_TRIES: u32 = 4096;

#[derive(Clone, Copy, Debug)]
struct Entry {
    msr: u32,
    class: Class,
}

/// Entry 0 is the sentinel every empty slot names. Its class is `Native`, which is also
/// the right answer for its MSR (0, `IA32_P5_MC_ADDR`), so a probe needs no emptiness test.
const SENTINEL: Entry = Entry {
    msr: 0,
    class: Class::Native,
};

/// The perfect-hash index of every MSR with non-native handling.
///
/// About 5 KiB. It is built in place ([`rebuild`](Self::rebuild)) in storage that starts
/// as [`ClassIndex::new`], e.g. a `static`, so that building it never puts a copy on the
/// stack (the library's stack budget per function is 4 KiB; see `docs/architecture.md`).
#[derive(Debug)]
pub struct ClassIndex {
    multiplier: u32,
    slots: [u8; SLOTS],
    entries: [Entry; MAX_ENTRIES + 1],
    len: usize,
}

#[inline]
const fn slot(msr: u32, multiplier: u32) -> usize {
    (msr.wrapping_mul(multiplier) >> (32 - SLOT_BITS)) as usize
}

/// Every PMU MSR of `layout` (those [`classify`] accepts), possibly with repeats.
fn pmu_msrs(layout: &PmuLayout, mut visit: impl FnMut(u32)) {
    use crate::pmu::classify as c;
    match layout {
        PmuLayout::None => {}
        PmuLayout::Intel(l) => {
            for msr in [
                c::MSR_CORE_PERF_FIXED_CTR_CTRL,
                c::MSR_IA32_DS_AREA,
                c::MSR_IA32_PEBS_ENABLE,
                c::MSR_CORE_PERF_GLOBAL_CTRL,
                c::MSR_CORE_PERF_GLOBAL_STATUS,
                c::MSR_CORE_PERF_GLOBAL_OVF_CTRL,
            ] {
                visit(msr);
            }
            for i in 0..u32::from(l.fixed_counters) {
                visit(c::MSR_CORE_PERF_FIXED_CTR0 + i);
            }
            for i in 0..u32::from(l.arch_counters) {
                visit(c::MSR_P6_EVNTSEL0 + i);
                visit(c::MSR_IA32_PERFCTR0 + i);
                visit(c::MSR_IA32_PMC0 + i);
            }
        }
        PmuLayout::Amd(l) => {
            let n = l.num_counters;
            let f15h = crate::pmu::layout::MSR_F15H_PERF_CTL
                ..crate::pmu::layout::MSR_F15H_PERF_CTR.saturating_add(n.saturating_mul(2));
            let k7 = crate::pmu::layout::MSR_K7_EVNTSEL0
                ..crate::pmu::layout::MSR_K7_PERFCTR0.saturating_add(n);
            // Bounded: a layout with absurd counts overflows the index and is refused
            // by `build` before these ranges are walked to the end.
            for msr in f15h.take(2 * MAX_ENTRIES).chain(k7.take(2 * MAX_ENTRIES)) {
                visit(msr);
            }
        }
    }
}

/// The read stub's filter keys (`xenmsr_asm::fastpath`): every MSR whose read the policy
/// must see (the routing rows whose read is not plain pass-through, such as the APIC
/// base's fix-up, and every PMU MSR of `layout`), plus, with `fsgsbase`, the FS and kernel
/// GS bases, read with RDFSBASE/RDGSBASE. Without repeats; at most
/// `READ_FILTER_MAX_KEYS + 1` (one more than the filter takes means "too many", which
/// makes the filter divert every read to the policy).
pub fn read_filter_keys(layout: &PmuLayout, fsgsbase: bool) -> FilterKeys {
    let mut keys = FilterKeys {
        keys: [(0, ReadKind::Policy); FILTER_KEYS_CAP],
        len: 0,
    };
    for route in crate::routes::ROUTES {
        if route.read != crate::routes::ReadRoute::Native {
            keys.push(route.msr, ReadKind::Policy);
        }
    }
    pmu_msrs(layout, |msr| {
        if matches!(reference_class(layout, msr), Class::Pmu(_)) {
            keys.push(msr, ReadKind::Policy);
        }
    });
    if fsgsbase {
        keys.push(crate::routes::MSR_FS_BASE, ReadKind::RdFsBase);
        keys.push(crate::routes::MSR_GS_BASE, ReadKind::RdGsBase);
    }
    keys
}

const FILTER_KEYS_CAP: usize = xenmsr_asm::fastpath::READ_FILTER_MAX_KEYS + 1;

/// The keys [`read_filter_keys`] found.
#[derive(Clone, Copy, Debug)]
pub struct FilterKeys {
    keys: [(u32, ReadKind); FILTER_KEYS_CAP],
    len: usize,
}

impl FilterKeys {
    fn push(&mut self, msr: u32, kind: ReadKind) {
        if self.keys[..self.len].iter().any(|&(k, _)| k == msr) || self.len == FILTER_KEYS_CAP {
            return;
        }
        self.keys[self.len] = (msr, kind);
        self.len += 1;
    }

    /// The keys.
    pub fn as_slice(&self) -> &[(u32, ReadKind)] {
        &self.keys[..self.len]
    }
}

/// The first multiplier tried.
const FIRST_MULTIPLIER: u32 = 0x9e37_79b1;

impl ClassIndex {
    /// An empty index (every MSR is `Native`): the starting value of the storage
    /// [`rebuild`](Self::rebuild) fills. `const`, so a `static` holding it costs no stack.
    pub const fn new() -> Self {
        ClassIndex {
            multiplier: FIRST_MULTIPLIER,
            slots: [0; SLOTS],
            entries: [SENTINEL; MAX_ENTRIES + 1],
            len: 0,
        }
    }

    /// Builds, in place, the index for the routes and `layout`'s PMU MSRs. `false` if
    /// they do not fit (the index is then left empty and the policy uses
    /// [`reference_class`]). Uses no stack beyond a few words: every table is written
    /// where it lives.
    pub fn rebuild(&mut self, layout: &PmuLayout) -> bool {
        self.slots.fill(0);
        self.entries.fill(SENTINEL);
        self.multiplier = FIRST_MULTIPLIER;
        self.len = 0;
        let entries = &mut self.entries;
        let mut len = 0;
        let mut overflow = false;
        let mut add = |msr: u32| {
            if entries[1..=len].iter().any(|e| e.msr == msr) {
                return;
            }
            let class = reference_class(layout, msr);
            if class == Class::Native {
                return;
            }
            if len == MAX_ENTRIES {
                overflow = true;
                return;
            }
            len += 1;
            entries[len] = Entry { msr, class };
        };
        for route in ROUTES {
            add(route.msr);
        }
        pmu_msrs(layout, &mut add);
        if !overflow {
            let mut multiplier = FIRST_MULTIPLIER;
            for _ in 0..MAX_TRIES {
                if Self::fill(&mut self.slots, &self.entries[..=len], multiplier) {
                    self.multiplier = multiplier;
                    self.len = len;
                    return true;
                }
                multiplier = multiplier.wrapping_add(0x2_0002);
            }
        }
        // Does not fit: an empty index, which answers `Native` for every MSR.
        self.slots.fill(0);
        self.entries.fill(SENTINEL);
        false
    }

    /// Puts every entry (after the sentinel) in its own slot; false on a collision.
    fn fill(slots: &mut [u8; SLOTS], entries: &[Entry], multiplier: u32) -> bool {
        slots.fill(0);
        for (i, entry) in entries.iter().enumerate().skip(1) {
            let s = slot(entry.msr, multiplier);
            if slots[s] != 0 {
                return false;
            }
            slots[s] = i as u8;
        }
        true
    }

    /// The class of `msr`: one multiply, two loads, one compare and a select, for every
    /// MSR. A mismatch selects the sentinel (entry 0), whose class is `Native`, so a hit
    /// and a miss run the same instructions (no branch on the outcome).
    #[inline]
    pub fn lookup(&self, msr: u32) -> Class {
        let candidate = usize::from(self.slots[slot(msr, self.multiplier)]);
        let index = if self.entries[candidate].msr == msr {
            candidate
        } else {
            0
        };
        self.entries[index].class
    }

    /// How many MSRs have non-native handling.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no MSR has non-native handling (only an index that is [`new`](Self::new)
    /// or did not fit; a built one always has the routes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for ClassIndex {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmu::{AmdLayout, IntelLayout};

    fn layouts() -> std::vec::Vec<PmuLayout> {
        let mut v = std::vec![PmuLayout::None];
        for (arch, fixed) in [(0, 0), (2, 3), (4, 3), (8, 4), (8, 7), (16, 5), (32, 8)] {
            v.push(PmuLayout::Intel(IntelLayout {
                arch_counters: arch,
                fixed_counters: fixed,
                version: 4,
                fixed_counter_width: 48,
                arch_counter_width: 48,
            }));
        }
        for cpuid in [
            amd_cpuid(0x15),
            amd_cpuid(0x17),
            amd_cpuid(0x10),
            amd_cpuid(0x16),
        ] {
            v.push(PmuLayout::from_cpuid(cpuid));
        }
        v
    }

    fn amd_cpuid(family: u32) -> impl Fn(u32, u32) -> [u32; 4] {
        move |leaf, _| match leaf {
            // "AuthenticAMD"
            0 => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            1 => {
                let (base, ext) = if family > 0xf {
                    (0xf, family - 0xf)
                } else {
                    (family, 0)
                };
                [(ext << 20) | (base << 8), 0, 0, 0]
            }
            _ => [0; 4],
        }
    }

    fn probe_msrs() -> impl Iterator<Item = u32> {
        (0..0x2000u32)
            .chain(0xc000_0000..0xc000_2000)
            .chain(0xc001_0000..0xc001_0400)
            .chain([0x4000_0000, 0x8000_0000, 0xffff_ffff, 0x1234_5678])
    }

    /// A built index on the heap (the tests' stand-in for a kernel's static storage).
    fn build(layout: &PmuLayout) -> Option<std::boxed::Box<ClassIndex>> {
        let mut index = std::boxed::Box::new(ClassIndex::new());
        index.rebuild(layout).then_some(index)
    }

    #[test]
    fn index_agrees_with_the_reference_classification_everywhere() {
        for layout in layouts() {
            let index = build(&layout).expect("typical layouts fit the index");
            for msr in probe_msrs() {
                assert_eq!(
                    index.lookup(msr),
                    reference_class(&layout, msr),
                    "{layout:?} msr {msr:#x}"
                );
            }
        }
    }

    #[test]
    fn amd_layouts_index_the_pmu_msrs() {
        let layout = PmuLayout::from_cpuid(amd_cpuid(0x17));
        assert!(matches!(layout, PmuLayout::Amd(_)), "{layout:?}");
        let index = build(&layout).unwrap();
        assert!(matches!(index.lookup(0xc001_0201), Class::Pmu(_)));
        assert!(matches!(index.lookup(0xc001_0004), Class::Pmu(_)));
        let expected = probe_msrs()
            .filter(|&msr| reference_class(&layout, msr) != Class::Native)
            .count();
        assert_eq!(index.len(), expected);
        // Linux's AMD ranges: [CTL0, CTR0 + 2n) and [K7 EVNTSEL0, K7 PERFCTR0 + n), n = 6.
        assert_eq!(expected, ROUTES.len() + 13 + 10);
    }

    #[test]
    fn oversized_layouts_are_refused_not_truncated() {
        let huge = PmuLayout::Intel(IntelLayout {
            arch_counters: 200,
            fixed_counters: 31,
            version: 4,
            fixed_counter_width: 48,
            arch_counter_width: 48,
        });
        assert!(build(&huge).is_none());
        let huge_amd = PmuLayout::Amd(AmdLayout {
            ctrls_base: 0xc001_0200,
            counters_base: 0xc001_0201,
            step: 2,
            num_counters: u32::MAX,
            k7_mirrored: true,
        });
        assert!(build(&huge_amd).is_none());
    }

    #[test]
    fn rebuilding_in_place_replaces_the_old_index() {
        let mut index = std::boxed::Box::new(ClassIndex::new());
        assert!(index.is_empty());
        assert_eq!(
            index.lookup(0xc000_0100),
            Class::Native,
            "empty: all native"
        );
        let amd = PmuLayout::from_cpuid(amd_cpuid(0x17));
        assert!(index.rebuild(&amd));
        assert!(matches!(index.lookup(0xc001_0201), Class::Pmu(_)));
        assert!(index.rebuild(&PmuLayout::None));
        assert_eq!(index.lookup(0xc001_0201), Class::Native, "no stale entry");
        assert!(matches!(index.lookup(0xc000_0100), Class::Route { .. }));
        let huge = PmuLayout::Intel(IntelLayout {
            arch_counters: 200,
            fixed_counters: 31,
            version: 4,
            fixed_counter_width: 48,
            arch_counter_width: 48,
        });
        assert!(!index.rebuild(&huge));
        assert!(index.is_empty());
        assert_eq!(index.lookup(0xc000_0100), Class::Native);
    }
}
