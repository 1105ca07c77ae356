//! The read stub's filter and the policy's classification must agree: a read the filter
//! passes through (executing `rdmsr` in the stub, never asking Rust) must be one the
//! policy would have answered `Native`, and every read the policy treats specially must be
//! a key. Checked over every layout the library builds, with and without FSGSBASE, for
//! every MSR in the architectural, PMU and AMD ranges, through the real filter the stub
//! reads.

use xenmsr::dispatch::{Class, read_filter_keys, reference_class};
use xenmsr::pmu::{AmdLayout, IntelLayout, PmuLayout};
use xenmsr::routes::{self, ReadRoute};
use xenmsr_asm::fastpath::{ReadFilter, ReadKind};

fn layouts() -> Vec<(&'static str, PmuLayout)> {
    let intel = |arch, fixed, version| {
        PmuLayout::Intel(IntelLayout {
            arch_counters: arch,
            fixed_counters: fixed,
            version,
            fixed_counter_width: 48,
            arch_counter_width: 48,
        })
    };
    vec![
        ("none", PmuLayout::None),
        ("intel 2+3 v2", intel(2, 3, 2)),
        ("intel 4+3 v4", intel(4, 3, 4)),
        ("intel 8+4 v5", intel(8, 4, 5)),
        ("intel 0+0", intel(0, 0, 1)),
        ("amd k7", PmuLayout::Amd(AmdLayout::K7)),
        ("amd f15h", PmuLayout::Amd(AmdLayout::F15H)),
        (
            "amd family 0x17",
            PmuLayout::Amd(PmuLayout::amd_for_family(0x17)),
        ),
        (
            "hygon family 0x16",
            PmuLayout::Amd(PmuLayout::hygon_for_family(0x16)),
        ),
    ]
}

/// What the read stub must do with `msr`: `None` to pass it through.
fn expected(layout: &PmuLayout, fsgsbase: bool, msr: u32) -> Option<ReadKind> {
    if fsgsbase && msr == routes::MSR_FS_BASE {
        return Some(ReadKind::RdFsBase);
    }
    if fsgsbase && msr == routes::MSR_GS_BASE {
        return Some(ReadKind::RdGsBase);
    }
    match reference_class(layout, msr) {
        Class::Native
        | Class::Route {
            read: ReadRoute::Native,
            ..
        } => None,
        Class::Route { .. } | Class::Pmu(_) => Some(ReadKind::Policy),
    }
}

fn swept() -> impl Iterator<Item = u32> {
    (0..0x2000u32)
        .chain(0xc000_0000..0xc000_0200)
        .chain(0xc001_0000..0xc001_0400)
        .chain(0x4000_0000..0x4000_0100)
        .chain([u32::MAX, 0x8000_0000, 0x1234_5678])
}

#[test]
fn the_filter_passes_through_exactly_the_reads_the_policy_would_pass_through() {
    for (name, layout) in layouts() {
        for fsgsbase in [false, true] {
            let keys = read_filter_keys(&layout, fsgsbase);
            let filter = ReadFilter::new(keys.as_slice())
                .unwrap_or_else(|e| panic!("{name}: the filter does not build: {e:?}"));
            let mut special = 0;
            for msr in swept() {
                let want = expected(&layout, fsgsbase, msr);
                special += usize::from(want.is_some());
                assert_eq!(
                    filter.lookup(msr),
                    want,
                    "{name}, fsgsbase {fsgsbase}: MSR {msr:#x}"
                );
            }
            assert_eq!(
                special,
                keys.as_slice().len(),
                "{name}: every key lies in the swept ranges"
            );
            // The user GS base never reads by instruction: a PV kernel cannot swapgs.
            assert_eq!(filter.lookup(routes::MSR_KERNEL_GS_BASE), None);
        }
    }
}
