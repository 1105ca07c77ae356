//! The PMI flow and cached-context emulation: MSR accesses and RDPMC inside and outside a
//! PMI, on Intel and AMD layouts, with "Xen" scripted on the mock hypercall page.

mod pmu_common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use pmu_common::*;
use xenmsr::pmu::{AmdLayout, IntelLayout, PmuError, PmuLayout};
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PmuFlags, XenPmuFeature};
use xenmsr_hypercall::{Errno, mock, nr};

const FIXED: [u64; 3] = [0x1000, 0x1001, 0x1002];
const ARCH: [(u64, u64); 4] = [
    (0x2000, 0x43_003c),
    (0x2001, 0x43_00c0),
    (0x2002, 0x43_412e),
    (0x2003, 0x43_00c4),
];

/// Page offset of Intel `fixed_counters[i]` / `arch_counters[i]` as Xen lays them out.
fn fixed_at(i: usize) -> usize {
    PMU_CTXT_OFFSET + 64 + 8 * i
}
fn arch_at(i: usize) -> usize {
    PMU_CTXT_OFFSET + 64 + 8 * FIXED.len() + 16 * i
}

#[test]
fn intel_pmi_serves_msrs_from_the_cache_and_always_flushes() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let native = FakeNative::leak(vec![]);
    let v = vpmu(s.page(), SKYLAKE, native);
    xen_ok(a);
    registered(&v, 0, &page);

    // Before the PMI: PMU MSRs pass through, others are not ours.
    assert_eq!(v.read(0x38f), Some(Outcome::Native));
    assert_eq!(v.write(0x186, 1), Some(Outcome::Native));
    assert_eq!(v.read(0x10), None);

    // Xen injects a PMI: caches the context and the sample.
    xen_intel_pmi(a, &FIXED, &ARCH);
    page.w64(intel::GLOBAL_CTRL, 0x7_0000_000f);
    page.w64(intel::GLOBAL_STATUS, 0x3_0000_0005);
    page.w64(intel::FIXED_CTRL, 0x333);
    page.w64(intel::DS_AREA, 0xffff_8000_0000_1000);
    page.w64(intel::PEBS_ENABLE, 0);
    page.w64(16, 0xffff_ffff_8100_0000); // ip
    page.w64(24, 0xffff_c900_0000_0f00); // sp
    page.w64(32, 0x246); // flags
    page.w32(40, 0xe033); // cs | ss << 16
    page.w64(0, 7 | (2 << 32)); // vcpu_id 7, pcpu_id 2
    set_flags(
        a,
        PmuFlags::CACHED | PmuFlags::SAMPLE_PV | PmuFlags::SAMPLE_USER,
    );

    let out = v
        .on_pmi(|ctx| {
            assert!(ctx.cached());
            assert_eq!(ctx.regs.ip, 0xffff_ffff_8100_0000);
            assert_eq!(ctx.regs.sp, 0xffff_c900_0000_0f00);
            assert_eq!(ctx.regs.flags, 0x246);
            assert_eq!((ctx.regs.cs, ctx.regs.ss), (0xe033, 0));
            assert_eq!((ctx.sampled_vcpu, ctx.pcpu), (7, 2));
            assert_eq!(ctx.cpl(), 3, "PV sample in user mode");
            assert!(ctx.user_mode());

            // Reads from the cache.
            for (i, f) in FIXED.iter().enumerate() {
                assert_eq!(v.read(0x309 + i as u32), Some(Outcome::Done(*f)));
            }
            for (i, (counter, control)) in ARCH.iter().enumerate() {
                let i = i as u32;
                assert_eq!(v.read(0xc1 + i), Some(Outcome::Done(*counter)));
                // The full-width alias is no MSR Xen's PV trap path gives the vPMU: it
                // passes through (and #GPs there), inside a PMI as outside.
                assert_eq!(v.read(0x4c1 + i), Some(Outcome::Native), "alias");
                assert_eq!(v.read(0x186 + i), Some(Outcome::Done(*control)));
            }
            assert_eq!(v.read(0x38f), Some(Outcome::Done(0x7_0000_000f)));
            assert_eq!(v.read(0x38e), Some(Outcome::Done(0x3_0000_0005)));
            assert_eq!(v.read(0x38d), Some(Outcome::Done(0x333)));
            // DS_AREA and PEBS_ENABLE likewise (Xen's trap path #GPs them).
            assert_eq!(v.read(0x600), Some(Outcome::Native));
            assert_eq!(v.read(0x3f1), Some(Outcome::Native));
            // Beyond the counts: not PMU MSRs of this layout.
            assert_eq!(v.read(0x30c), None);
            assert_eq!(v.read(0xc5), None);
            assert_eq!(v.read(0x4c5), None);
            assert_eq!(v.read(0x18a), None);
            // DEBUGCTL is not served from the cache (Xen neither saves nor loads it).
            assert_eq!(v.read(0x1d9), None);

            // Writes into the cache.
            assert_eq!(v.write(0x30a, 0xaaaa), Some(Outcome::Done(0)));
            assert_eq!(v.write(0x4c3, 0xbbbb), Some(Outcome::Native), "alias write");
            assert_eq!(v.write(0xc3, 0xbbbb), Some(Outcome::Done(0)));
            assert_eq!(v.write(0xc2, 0xcccc), Some(Outcome::Done(0)));
            assert_eq!(v.write(0x189, 0x41_003c), Some(Outcome::Done(0)));
            assert_eq!(v.write(0x38f, 0x1), Some(Outcome::Done(0)));
            assert_eq!(v.write(0x38d, 0xb), Some(Outcome::Done(0)));
            assert_eq!(v.write(0x600, 0x5000), Some(Outcome::Native));
            // GLOBAL_OVF_CTRL: stored, and clears those bits of global_status.
            assert_eq!(v.write(0x390, 0x1_0000_0001), Some(Outcome::Done(0)));
            assert_eq!(v.read(0x38e), Some(Outcome::Done(0x2_0000_0004)));
            // Stored for Xen's flush, but read as 0, as Xen's trap path reads it.
            assert_eq!(v.read(0x390), Some(Outcome::Done(0)));
            "handled"
        })
        .unwrap();
    assert_eq!(out, "handled");
    assert_eq!(native.take(), Vec::<u32>::new(), "nothing read natively");

    // The writes landed in the right slots of the page Xen reads at flush.
    assert_eq!(page.r64(fixed_at(1)), 0xaaaa);
    assert_eq!(page.r64(arch_at(2)), 0xbbbb);
    assert_eq!(page.r64(arch_at(1)), 0xcccc);
    assert_eq!(page.r64(arch_at(3) + 8), 0x41_003c);
    assert_eq!(page.r64(intel::GLOBAL_CTRL), 1);
    assert_eq!(page.r64(intel::FIXED_CTRL), 0xb);
    assert_eq!(
        page.r64(intel::DS_AREA),
        0xffff_8000_0000_1000,
        "not written"
    );
    assert_eq!(page.r64(intel::GLOBAL_OVF_CTRL), 0x1_0000_0001);
    assert_eq!(page.r64(intel::GLOBAL_STATUS), 0x2_0000_0004);

    // Exactly one flush, with a NULL argument; PMU_CACHED is now clear.
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].nr, calls[0].args[0], calls[0].args[1]),
        (40, 7, 0)
    );
    assert!(!flags(a).contains(PmuFlags::CACHED));

    // After the PMI: pass-through again.
    assert_eq!(v.read(0x309), Some(Outcome::Native));
    assert_eq!(v.write(0x390, 1), Some(Outcome::Native));
}

#[test]
fn cpl_comes_from_the_flags_for_pv_samples_and_from_regs_otherwise() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    for (flags, cpl, want) in [
        (PmuFlags::SAMPLE_PV, 3u8, 0u8),
        (PmuFlags::SAMPLE_PV | PmuFlags::SAMPLE_USER, 0, 3),
        (PmuFlags::empty(), 2, 2),
        (PmuFlags::SAMPLE_USER, 1, 1),
    ] {
        xen_intel_pmi(a, &FIXED, &ARCH);
        set_flags(a, flags | PmuFlags::CACHED);
        page.w32(44, u32::from(cpl)); // regs.cpl at 16 + 28
        let got = v.on_pmi(|ctx| ctx.cpl()).unwrap();
        assert_eq!(got, want, "{flags:?} cpl {cpl}");
    }
    let _ = mock::take_calls();
}

#[test]
fn flush_runs_on_unwind_and_its_failure_is_reported() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);

    // A panicking handler still flushes and leaves "in PMI" cleared.
    xen_intel_pmi(a, &FIXED, &ARCH);
    let r = catch_unwind(AssertUnwindSafe(|| v.on_pmi(|_| panic!("handler bug"))));
    assert!(r.is_err());
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
    assert!(!v.is_cached(0));
    v.lvtpc_set(0x10).unwrap();
    assert_eq!(pmu_ops(), vec![nr::XENPMU_LVTPC_SET], "no longer in a PMI");

    // A failing flush (Xen refusing the context) is the PMI's error.
    xen_intel_pmi(a, &FIXED, &ARCH);
    mock::script_err(XENPMU_OP, Errno::EINVAL);
    assert_eq!(v.on_pmi(|_| 42), Err(PmuError::InvalidArgument));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
    // (The scripted failure left PMU_CACHED set; clear it to see the in-PMI mark alone.)
    set_flags(a, PmuFlags::empty());
    xen_ok(a);
    v.lvtpc_set(0x10).unwrap();
    assert_eq!(
        pmu_ops(),
        vec![nr::XENPMU_LVTPC_SET],
        "in-PMI mark cleared on error too"
    );

    // A PMI on a vCPU without a page is refused without a hypercall.
    set_vcpu(1);
    assert_eq!(v.on_pmi(|_| ()), Err(PmuError::NotInitialized));
    set_vcpu(0);
    assert!(mock::take_calls().is_empty());
}

/// The page is used only while both hold: the calling vCPU is inside `on_pmi` (the
/// library's own mark, which no flush can clear under an access) and Xen has cached the
/// context (`PMU_CACHED`).
#[test]
fn emulation_needs_both_the_handler_and_pmu_cached() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let native = FakeNative::leak(vec![]);
    let v = vpmu(s.page(), SKYLAKE, native);
    xen_ok(a);
    registered(&v, 0, &page);
    xen_intel_pmi(a, &FIXED, &ARCH);
    // PMU_CACHED set (a PMI pending), handler not running: an upcall could flush between
    // a check and the access, so the page is not used; the access passes through.
    let before = page.snapshot();
    assert_eq!(v.read(0x309), Some(Outcome::Native));
    assert_eq!(v.write(0xc1, 7), Some(Outcome::Native));
    assert_eq!(v.rdpmc(0), Outcome::Done(FakeNative::value(0xc1)));
    assert_eq!(native.take(), vec![0xc1], "RDPMC read the counter MSR");
    assert_eq!(page.snapshot(), before, "the page was not touched");
    // Both: the cache is authoritative.
    v.on_pmi(|ctx| {
        assert!(ctx.cached());
        assert_eq!(v.read(0x309), Some(Outcome::Done(FIXED[0])));
    })
    .unwrap();
    // Handler running, but Xen did not cache (spurious VIRQ): pass through.
    set_flags(a, PmuFlags::SAMPLE_PV);
    v.on_pmi(|ctx| {
        assert!(!ctx.cached());
        assert_eq!(v.read(0x309), Some(Outcome::Native));
    })
    .unwrap();
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH, nr::XENPMU_FLUSH]);
}

/// A nested `on_pmi` on the same vCPU (an upcall taken with upcalls unmasked, or a
/// handler calling it) is a typed error: no handler, no flush, and the outer handler
/// keeps serving from its page.
#[test]
fn a_nested_pmi_on_the_same_vcpu_is_refused_without_a_flush() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    xen_intel_pmi(a, &FIXED, &ARCH);
    let outer = v.on_pmi(|_| {
        let mut ran = false;
        assert_eq!(v.on_pmi(|_| ran = true), Err(PmuError::NestedPmi));
        assert!(!ran, "the nested handler did not run");
        assert!(mock::take_calls().is_empty(), "nothing flushed");
        assert!(flags(a).contains(PmuFlags::CACHED));
        assert_eq!(v.write(0xc1, 0x77), Some(Outcome::Done(0)));
        v.read(0xc1)
    });
    assert_eq!(outer, Ok(Some(Outcome::Done(0x77))));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH], "only the outer flush");
    // The mark is cleared afterwards: the next PMI runs.
    xen_intel_pmi(a, &FIXED, &ARCH);
    assert_eq!(v.on_pmi(|_| 1), Ok(1));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
    assert_eq!(
        MsrError::from(PmuError::NestedPmi),
        MsrError::PmuUnavailable
    );
}

#[test]
fn amd_f15h_layout_and_the_k7_remap() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(
        s.page(),
        PmuLayout::Amd(AmdLayout::F15H),
        FakeNative::leak(vec![]),
    );
    xen_ok(a);
    registered(&v, 0, &page);
    let counters: Vec<u64> = (0..6).map(|i| 0x100 + i).collect();
    let ctrls: Vec<u64> = (0..6).map(|i| 0x43_0000 + i).collect();
    xen_amd_pmi(a, &counters, &ctrls);
    v.on_pmi(|_| {
        for n in 0..6u32 {
            let i = n as usize;
            assert_eq!(v.read(0xc001_0200 + 2 * n), Some(Outcome::Done(ctrls[i])));
            assert_eq!(
                v.read(0xc001_0201 + 2 * n),
                Some(Outcome::Done(counters[i]))
            );
        }
        for n in 0..4u32 {
            let i = n as usize;
            // K7 EVNTSELn / PERFCTRn mirror F15H CTLn / CTRn (Linux would give CTL/CTR
            // n/2-ish slots here: PERFCTR1 -> CTL1).
            assert_eq!(
                v.read(0xc001_0000 + n),
                Some(Outcome::Done(ctrls[i])),
                "EVNTSEL{n}"
            );
            assert_eq!(
                v.read(0xc001_0004 + n),
                Some(Outcome::Done(counters[i])),
                "PERFCTR{n}"
            );
        }
        // Write through a K7 alias, read back through the F15H MSR.
        assert_eq!(v.write(0xc001_0005, 0xdead), Some(Outcome::Done(0)));
        assert_eq!(v.read(0xc001_0203), Some(Outcome::Done(0xdead)));
        assert_eq!(v.write(0xc001_0003, 0x42_0076), Some(Outcome::Done(0)));
        assert_eq!(v.read(0xc001_0206), Some(Outcome::Done(0x42_0076)));
        // In Linux's ranges without a slot: pass through even while cached.
        assert_eq!(v.read(0xc001_020c), Some(Outcome::Native));
        assert_eq!(v.read(0xc001_0008), Some(Outcome::Native));
        assert_eq!(v.read(0xc001_020d), None);
        // Intel MSRs are not PMU MSRs on AMD.
        assert_eq!(v.read(0x38f), None);
    })
    .unwrap();
    // Slot contents as Xen will read them back.
    assert_eq!(page.r64(PMU_CTXT_OFFSET + 8 + 8), 0xdead, "counters[1]");
    assert_eq!(
        page.r64(PMU_CTXT_OFFSET + 8 + 48 + 24),
        0x42_0076,
        "ctrls[3]"
    );
    assert_eq!(
        page.r64(PMU_CTXT_OFFSET + 8 + 48 + 8),
        ctrls[1],
        "CTL1 untouched"
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
}

#[test]
fn amd_k7_layout() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(
        s.page(),
        PmuLayout::Amd(AmdLayout::K7),
        FakeNative::leak(vec![]),
    );
    xen_ok(a);
    registered(&v, 2, &page);
    xen_amd_pmi(a, &[10, 11, 12, 13], &[20, 21, 22, 23]);
    // This thread runs as vCPU 2: every op acts on vCPU 2's page.
    set_vcpu(2);
    v.on_pmi(|ctx| {
        assert_eq!(ctx.vcpu, 2);
        for n in 0..4u32 {
            assert_eq!(
                v.read(0xc001_0000 + n),
                Some(Outcome::Done(20 + u64::from(n)))
            );
            assert_eq!(
                v.read(0xc001_0004 + n),
                Some(Outcome::Done(10 + u64::from(n)))
            );
        }
        assert_eq!(v.read(0xc001_0200), Some(Outcome::Native), "no K7 slot");
        assert_eq!(v.write(0xc001_0007, 99), Some(Outcome::Done(0)));
    })
    .unwrap();
    set_vcpu(0);
    assert_eq!(page.r64(PMU_CTXT_OFFSET + 8 + 24), 99);
    let _ = mock::take_calls();
}

#[test]
fn rdpmc_inside_and_outside_a_pmi_intel() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let native = FakeNative::leak(vec![0xc3]);
    let v = vpmu(s.page(), SKYLAKE, native);
    xen_ok(a);
    registered(&v, 0, &page);

    // Outside: RDMSR of the counter MSR.
    assert_eq!(v.rdpmc(0), Outcome::Done(FakeNative::value(0xc1)));
    assert_eq!(v.rdpmc(3), Outcome::Done(FakeNative::value(0xc4)));
    assert_eq!(v.rdpmc(1 << 30), Outcome::Done(FakeNative::value(0x309)));
    assert_eq!(
        v.rdpmc((1 << 30) | 2),
        Outcome::Done(FakeNative::value(0x30b))
    );
    // A faulting counter read is surfaced, not turned into 0.
    assert_eq!(v.rdpmc(2), Outcome::Failed(MsrError::Fault { vector: 13 }));
    assert_eq!(native.take(), vec![0xc1, 0xc4, 0x309, 0x30b, 0xc3]);
    // A vCPU without a page reads natively too.
    set_vcpu(9);
    assert_eq!(v.rdpmc(1), Outcome::Done(FakeNative::value(0xc2)));
    set_vcpu(0);
    let _ = native.take();

    // Bad indices: typed failure, and no MSR read at all.
    for bad in [
        4,
        5,
        0xff,
        1 << 29,
        (1 << 30) | 3,
        (1 << 30) | 0x1_0000,
        1 << 31,
        u32::MAX,
    ] {
        assert_eq!(
            v.rdpmc(bad),
            Outcome::Failed(MsrError::InvalidCounter),
            "{bad:#x}"
        );
    }
    assert!(native.take().is_empty());

    // Inside: from the cache.
    xen_intel_pmi(a, &FIXED, &ARCH);
    v.on_pmi(|_| {
        for (i, f) in FIXED.iter().enumerate() {
            assert_eq!(v.rdpmc((1 << 30) | i as u32), Outcome::Done(*f));
        }
        for (i, (c, _)) in ARCH.iter().enumerate() {
            assert_eq!(v.rdpmc(i as u32), Outcome::Done(*c));
        }
        assert_eq!(v.rdpmc(4), Outcome::Failed(MsrError::InvalidCounter));
        assert_eq!(
            v.rdpmc((1 << 30) | 3),
            Outcome::Failed(MsrError::InvalidCounter)
        );
    })
    .unwrap();
    assert!(native.take().is_empty(), "no native reads inside the PMI");
    let _ = mock::take_calls();
}

#[test]
fn rdpmc_inside_and_outside_a_pmi_amd() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let native = FakeNative::leak(vec![]);
    let v = vpmu(s.page(), PmuLayout::Amd(AmdLayout::F15H), native);
    xen_ok(a);
    registered(&v, 0, &page);
    for n in 0..6u32 {
        assert_eq!(
            v.rdpmc(n),
            Outcome::Done(FakeNative::value(0xc001_0201 + 2 * n))
        );
    }
    assert_eq!(v.rdpmc(6), Outcome::Failed(MsrError::InvalidCounter));
    assert_eq!(v.rdpmc(1 << 30), Outcome::Failed(MsrError::InvalidCounter));
    let counters: Vec<u64> = (0..6).map(|i| 0x7700 + i).collect();
    xen_amd_pmi(a, &counters, &[0; 6]);
    v.on_pmi(|_| {
        for n in 0..6u32 {
            assert_eq!(v.rdpmc(n), Outcome::Done(counters[n as usize]));
        }
    })
    .unwrap();

    let k7 = vpmu(s.page(), PmuLayout::Amd(AmdLayout::K7), native);
    assert_eq!(k7.rdpmc(3), Outcome::Done(FakeNative::value(0xc001_0007)));
    assert_eq!(k7.rdpmc(4), Outcome::Failed(MsrError::InvalidCounter));
    let _ = mock::take_calls();
}

#[test]
fn hostile_bank_offsets_fail_typed_and_never_touch_other_memory() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    let unavailable = Some(Outcome::Failed(MsrError::PmuUnavailable));
    let cases: [(u32, u32); 8] = [
        (4000, 88),         // fixed bank runs off the page end
        (64, 4000 - 16),    // arch bank runs off the page end
        (u32::MAX, 88),     // overflow
        (64, u32::MAX - 7), // overflow
        (60, 88),           // misaligned
        (32, 88),           // inside the context's fixed fields
        (64, 72),           // banks overlap
        (64, 64),           // banks coincide
    ];
    for (fixed_off, arch_off) in cases {
        xen_intel_pmi(a, &FIXED, &ARCH);
        page.w32(intel::FIXED_OFF, fixed_off);
        page.w32(intel::ARCH_OFF, arch_off);
        v.on_pmi(|_| {
            let before = page.snapshot();
            assert_eq!(v.read(0x309), unavailable, "{fixed_off} {arch_off}");
            assert_eq!(v.write(0xc1, 1), unavailable);
            assert_eq!(v.write(0x38f, 1), unavailable);
            assert_eq!(v.rdpmc(0), Outcome::Failed(MsrError::PmuUnavailable));
            assert_eq!(page.snapshot(), before, "nothing written");
        })
        .unwrap();
    }
    // The last valid placement, flush against the page end, works.
    xen_intel_pmi(a, &FIXED, &ARCH);
    page.w32(intel::FIXED_OFF, 4000 - 24);
    page.w32(intel::ARCH_OFF, 64);
    page.w64(4096 - 8, 0x5151);
    let last = v.on_pmi(|_| v.read(0x30b)).unwrap();
    assert_eq!(last, Some(Outcome::Done(0x5151)));

    // AMD: a bank past the end, overlap.
    let amd = vpmu(
        s.page(),
        PmuLayout::Amd(AmdLayout::F15H),
        FakeNative::leak(vec![]),
    );
    let page2 = GuardedPage::new();
    let a2 = page2.addr();
    xen_ok(a2);
    registered(&amd, 0, &page2);
    for (c, k) in [(8u32, 3960u32), (8, 16), (0, 56), (4000, 8)] {
        xen_amd_pmi(a2, &[1; 6], &[2; 6]);
        page2.w32(amd::COUNTERS_OFF, c);
        page2.w32(amd::CTRLS_OFF, k);
        amd.on_pmi(|_| {
            assert_eq!(amd.read(0xc001_0200), unavailable, "{c} {k}");
            assert_eq!(amd.rdpmc(0), Outcome::Failed(MsrError::PmuUnavailable));
        })
        .unwrap();
    }
    let _ = mock::take_calls();
}

#[test]
fn wide_cpuid_counts_cannot_reach_past_the_page() {
    // CPUID claims 255 general counters; the bank Xen could place cannot hold them all, so
    // every access fails typed rather than reading past the page.
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let layout = PmuLayout::Intel(IntelLayout {
        arch_counters: 255,
        fixed_counters: 31,
        version: 4,
        fixed_counter_width: 48,
        arch_counter_width: 48,
    });
    let v = vpmu(s.page(), layout, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    xen_intel_pmi(a, &[0; 31], &[]);
    v.on_pmi(|_| {
        // (Counter 254's MSR is beyond what Xen's trap path gives the vPMU; counter 7's
        // is served from a bank that cannot fit.)
        assert_eq!(
            v.read(0xc1 + 7),
            Some(Outcome::Failed(MsrError::PmuUnavailable))
        );
        assert_eq!(v.read(0xc1 + 254), Some(Outcome::Native));
        assert_eq!(v.rdpmc(254), Outcome::Failed(MsrError::PmuUnavailable));
    })
    .unwrap();
    let _ = mock::take_calls();
}

/// What the native `wrmsr` of a reserved value raises.
const GP: Option<Outcome> = Some(Outcome::Failed(MsrError::Fault { vector: 13 }));

/// Under Xen's `vpmu=ipc` (`XENPMU_FEATURE_IPC_ONLY`, learnt at `XENPMU_init`) a cached
/// `IA32_PERFEVTSELn` write of an event outside the filter is `#GP`, as the trapped one
/// is, though Xen's flush would take it; `vpmu=arch` lets four more events through.
#[test]
fn event_selects_follow_xens_event_filter() {
    for (features, allowed, withheld) in [
        (XenPmuFeature::IPC_ONLY, 0x43_013c, 0x43_412e),
        (XenPmuFeature::ARCH_ONLY, 0x43_412e, 0x43_00c6),
        (XenPmuFeature::INTEL_BTS, 0x43_00c6, 1 << 21),
    ] {
        let s = mock::session();
        let page = GuardedPage::new();
        let a = page.addr();
        let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
        xen_ok_with_features(a, features);
        registered(&v, 0, &page);
        assert_eq!(v.features(), Some(features));
        xen_intel_pmi(a, &FIXED, &ARCH);
        v.on_pmi(|_| {
            let before = page.snapshot();
            assert_eq!(v.write(0x187, withheld), GP, "{features:?} {withheld:#x}");
            assert_eq!(page.snapshot(), before, "nothing stored");
            assert_eq!(v.read(0x187), Some(Outcome::Done(ARCH[1].1)));
            assert_eq!(v.write(0x187, allowed), Some(Outcome::Done(0)));
            assert_eq!(v.read(0x187), Some(Outcome::Done(allowed)));
            // Only event selects are filtered.
            assert_eq!(v.write(0xc2, 5), Some(Outcome::Done(0)));
        })
        .unwrap();
        let _ = mock::take_calls();
    }
}

/// Inside a PMI, a write of a value Xen's flush would refuse (Xen 4.17's
/// `core2_vpmu_verify`) fails like the native write, and the page keeps the old value;
/// the values just inside each rule are stored.
#[test]
fn intel_writes_xen_would_refuse_at_flush_fail_with_gp() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    // Skylake: 4 general counters, 3 fixed of 48 bits, PMU version 4.
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    xen_intel_pmi(a, &FIXED, &ARCH);
    let refused: &[(u32, u64, &str)] = &[
        (
            0x38f,
            1 << 4,
            "GLOBAL_CTRL: general counter 4 does not exist",
        ),
        (
            0x38f,
            1 << 35,
            "GLOBAL_CTRL: fixed counter 3 does not exist",
        ),
        (0x390, 1 << 60, "GLOBAL_OVF_CTRL: reserved bit"),
        (0x38d, 0x4, "FIXED_CTR_CTRL: AnyThread of counter 0"),
        (0x38d, 0x400, "FIXED_CTR_CTRL: AnyThread of counter 2"),
        (0x38d, 0x1000, "FIXED_CTR_CTRL: a fourth counter's field"),
        (0x309, 1 << 48, "FIXED_CTR0: beyond the 48-bit width"),
        (0x186, 1 << 21, "PERFEVTSEL0: AnyThread"),
        (0x187, 1 << 19, "PERFEVTSEL1: pin control"),
        (0x188, 1 << 32, "PERFEVTSEL2: bits 63..32"),
        (0x38e, 0, "GLOBAL_STATUS is read-only"),
    ];
    // (MSR, value written, value read back): GLOBAL_OVF_CTRL reads as 0, and a legacy
    // counter write keeps the low 32 bits sign-extended to the 48-bit width.
    let accepted: &[(u32, u64, u64)] = &[
        (0x38f, 0x7_0000_000f, 0x7_0000_000f),
        (0x390, 0xe000_0007_0000_000f, 0),
        (0x38d, 0xbbb, 0xbbb),
        (0x309, (1 << 48) - 1, (1 << 48) - 1),
        (
            0x186,
            0xffff_ffff & !(1 << 21 | 1 << 19),
            0xffff_ffff & !(1 << 21 | 1 << 19),
        ),
        (0xc1, u64::MAX, (1 << 48) - 1),
        (0xc2, 0xdead_0000_7fff_ffff, 0x7fff_ffff),
        (0xc3, 0x8000_0000, 0xffff_8000_0000),
    ];
    // Never served from the page: Xen's trap path #GPs them, whatever the value.
    let passed_through: &[u32] = &[0x3f1, 0x600, 0x4c1, 0x4c2];
    v.on_pmi(|_| {
        for &(msr, value, why) in refused {
            let before = page.snapshot();
            assert_eq!(v.write(msr, value), GP, "{why}");
            assert_eq!(page.snapshot(), before, "{why}: nothing stored");
        }
        for &(msr, value, read_back) in accepted {
            assert_eq!(
                v.write(msr, value),
                Some(Outcome::Done(0)),
                "{msr:#x} {value:#x}"
            );
            assert_eq!(v.read(msr), Some(Outcome::Done(read_back)), "{msr:#x}");
        }
        for &msr in passed_through {
            let before = page.snapshot();
            for value in [0, 0x5000, u64::MAX] {
                assert_eq!(v.write(msr, value), Some(Outcome::Native), "{msr:#x}");
            }
            assert_eq!(v.read(msr), Some(Outcome::Native), "{msr:#x}");
            assert_eq!(page.snapshot(), before, "{msr:#x}: nothing stored");
        }
    })
    .unwrap();
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);

    // Bit 61 of GLOBAL_OVF_CTRL (uncore overflow) is Xen's to accept from PMU version 3 on.
    for (version, want) in [(2, GP), (3, Some(Outcome::Done(0)))] {
        let s = mock::session();
        let layout = PmuLayout::Intel(IntelLayout {
            version,
            ..match SKYLAKE {
                PmuLayout::Intel(l) => l,
                _ => unreachable!(),
            }
        });
        let v = vpmu(s.page(), layout, FakeNative::leak(vec![]));
        xen_ok(a);
        // (The slot storage is the new backend's own.)
        let page = GuardedPage::new();
        registered(&v, 0, &page);
        xen_intel_pmi(page.addr(), &FIXED, &ARCH);
        let got = v.on_pmi(|_| v.write(0x390, 1 << 61)).unwrap();
        assert_eq!(got, want, "PMU version {version}");
        let _ = mock::take_calls();
    }
}

/// AMD: Xen refuses a control whose reserved bits (63..42, 39..36, 21, 19) differ from
/// the hardware's; the cached control came from the hardware, so it is the reference.
#[test]
fn amd_control_writes_keep_the_reserved_bits_of_the_cached_control() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(
        s.page(),
        PmuLayout::Amd(AmdLayout::F15H),
        FakeNative::leak(vec![]),
    );
    xen_ok(a);
    registered(&v, 0, &page);
    let reserved_set = 1u64 << 42;
    xen_amd_pmi(a, &[0; 6], &[0, reserved_set, 0, 0, 0, 0]);
    v.on_pmi(|_| {
        // CTL0 caches 0 in its reserved bits: setting one is refused.
        for bit in [19, 21, 36, 39, 42, 63] {
            assert_eq!(v.write(0xc001_0200, 1 << bit), GP, "bit {bit}");
        }
        assert_eq!(v.write(0xc001_0200, 0x43_0076), Some(Outcome::Done(0)));
        // The K7 alias of CTL0 follows the same rule.
        assert_eq!(v.write(0xc001_0000, 1 << 21), GP);
        // CTL1 caches bit 42 set (as its hardware has it): a write must keep it.
        assert_eq!(v.write(0xc001_0202, 0x43_0076), GP);
        assert_eq!(
            v.write(0xc001_0202, reserved_set | 0x43_0076),
            Some(Outcome::Done(0))
        );
        // Counters have no reserved-bit rule.
        assert_eq!(v.write(0xc001_0201, u64::MAX), Some(Outcome::Done(0)));
    })
    .unwrap();
    assert_eq!(page.r64(PMU_CTXT_OFFSET + 8 + 48), 0x43_0076, "ctrls[0]");
    assert_eq!(
        page.r64(PMU_CTXT_OFFSET + 8 + 48 + 8),
        reserved_set | 0x43_0076,
        "ctrls[1]"
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
}

/// Xen refusing the context at the flush (`-EIO`, `PMU_CACHED` set again) is a typed
/// error; the vCPU's PMU accesses then fail instead of "succeeding" against a page Xen
/// never loads, and `recover` repairs the context and flushes it again.
#[test]
fn a_refused_flush_is_reported_stops_the_vcpu_and_recover_restarts_it() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let native = FakeNative::leak(vec![]);
    let v = vpmu(s.page(), SKYLAKE, native);
    let flushes = std::rc::Rc::new(std::cell::Cell::new(0));
    xen_refusing_pebs(a, flushes.clone());
    registered(&v, 0, &page);

    // A context Xen will refuse: PEBS enabled (in the page as Xen cached it, e.g. by a
    // writer that bypassed the library's checks).
    xen_intel_pmi(a, &FIXED, &ARCH);
    page.w64(intel::PEBS_ENABLE, 1);
    page.w64(intel::GLOBAL_CTRL, 0x7_0000_000f | (1 << 20));
    assert_eq!(v.on_pmi(|_| ()), Err(PmuError::FlushRejected));
    assert_eq!(flushes.get(), 1);
    assert!(
        flags(a).contains(PmuFlags::CACHED),
        "Xen set PMU_CACHED again"
    );
    let _ = mock::take_calls();

    // Stopped: every PMU access of this vCPU fails, nothing reads the hardware, nothing
    // touches the page, and no PMI handler runs.
    let before = page.snapshot();
    let unavailable = Some(Outcome::Failed(MsrError::PmuUnavailable));
    assert_eq!(v.read(0xc1), unavailable);
    assert_eq!(v.write(0x186, 0x43_003c), unavailable);
    assert_eq!(v.rdpmc(0), Outcome::Failed(MsrError::PmuUnavailable));
    let mut ran = false;
    assert_eq!(v.on_pmi(|_| ran = true), Err(PmuError::FlushRejected));
    assert!(!ran);
    assert_eq!(page.snapshot(), before);
    assert!(native.take().is_empty());
    assert!(mock::take_calls().is_empty(), "no hypercall while stopped");
    // Another vCPU is not affected.
    set_vcpu(1);
    assert_eq!(v.read(0xc1), Some(Outcome::Native));
    set_vcpu(0);

    // Recovery: the refused bits are cleared, everything else is kept, and the flush
    // is made again.
    assert_eq!(v.recover(), Ok(2), "pebs_enable and global_ctrl repaired");
    assert_eq!(flushes.get(), 2);
    assert_eq!(page.r64(intel::PEBS_ENABLE), 0);
    assert_eq!(page.r64(intel::GLOBAL_CTRL), 0x7_0000_000f);
    assert_eq!(page.r64(fixed_at(0)), FIXED[0], "valid values kept");
    assert!(!flags(a).contains(PmuFlags::CACHED), "Xen loaded it");
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
    // Running again: accesses pass through, the next PMI is served and flushed.
    assert_eq!(v.read(0xc1), Some(Outcome::Native));
    assert_eq!(v.recover(), Ok(0), "nothing to recover: no hypercall");
    assert!(mock::take_calls().is_empty());
    xen_intel_pmi(a, &FIXED, &ARCH);
    assert_eq!(
        v.on_pmi(|_| v.read(0xc1)),
        Ok(Some(Outcome::Done(ARCH[0].0)))
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
}

/// When Xen refuses even the repaired context, `recover` says so and the vCPU stays
/// stopped; `finish` and a new `init` (Xen's fresh context) restart it.
#[test]
fn a_context_refused_again_needs_finish_and_init() {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    xen_intel_pmi(a, &FIXED, &ARCH);
    // A Xen that refuses every flush (a check the library does not know).
    mock::script_err(XENPMU_OP, Errno::EIO);
    mock::script_err(XENPMU_OP, Errno::EIO);
    assert_eq!(v.on_pmi(|_| ()), Err(PmuError::FlushRejected));
    assert_eq!(v.recover(), Err(PmuError::FlushRejected));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH, nr::XENPMU_FLUSH]);
    assert_eq!(
        v.on_pmi(|_| ()),
        Err(PmuError::FlushRejected),
        "still stopped"
    );
    assert_eq!(
        MsrError::from(PmuError::FlushRejected),
        MsrError::PmuUnavailable
    );
    assert_eq!(v.finish_vcpu(0), Ok(()));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FINISH]);
    registered(&v, 0, &page);
    xen_intel_pmi(a, &FIXED, &ARCH);
    assert_eq!(v.on_pmi(|_| 5), Ok(5));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);

    // Other flush errors are not a refusal of the context: nothing is stopped.
    xen_intel_pmi(a, &FIXED, &ARCH);
    mock::script_err(XENPMU_OP, Errno::EINVAL);
    assert_eq!(v.on_pmi(|_| ()), Err(PmuError::InvalidArgument));
    assert_eq!(v.recover(), Ok(0));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
}
