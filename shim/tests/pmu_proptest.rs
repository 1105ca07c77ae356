//! Property test: random shared-page contents (bank offsets, flags, counters) and random
//! MSR / counter indices, fed to the cached-context emulation on a page that sits between
//! `PROT_NONE` guard pages. Any access outside the page kills the test with SIGSEGV; any
//! panic fails it. Each case is also checked against an independent model of where the
//! access must land and of which bytes it may change.
//!
//! The ops run inside `on_pmi` or outside it; the page is used only inside, with
//! `PMU_CACHED`.
//!
//! Cases: `XENMSR_PROPTEST_CASES` (default 10,000).

mod pmu_common;

use pmu_common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use xenmsr::pmu::classify::{AmdMsr, IntelMsr, PmcIndex, PmuMsr};
use xenmsr::pmu::{
    AmdLayout, DEFAULT_VCPUS, IntelLayout, PAGE_SIZE, PmuLayout, VcpuSlot, Vpmu, classify,
    decode_pmc,
};
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags, XenPmuFeature};
use xenmsr_hypercall::mock;

fn cases() -> u32 {
    std::env::var("XENMSR_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read(u32),
    Write(u32, u64),
    Rdpmc(u32),
}

#[derive(Clone, Debug)]
struct Case {
    layout: PmuLayout,
    seed: u64,
    off_a: u32,
    off_b: u32,
    flags: u64,
    vcpu: u32,
    /// Whether the ops run inside `on_pmi` (only vCPU 0 has a page to run one on).
    in_handler: bool,
    /// What Xen's `XENPMU_feature_get` answers.
    features: XenPmuFeature,
    ops: Vec<Op>,
}

fn layout() -> impl Strategy<Value = PmuLayout> {
    prop_oneof![
        (0u8..=8, 0u8..=4, 2u8..=5, prop_oneof![Just(48u8), 0u8..=70]).prop_map(
            |(a, f, version, width)| PmuLayout::Intel(IntelLayout {
                arch_counters: a,
                fixed_counters: f,
                version,
                fixed_counter_width: width,
                arch_counter_width: width,
            })
        ),
        (any::<u8>(), 0u8..32, any::<u8>(), any::<u8>()).prop_map(|(a, f, version, width)| {
            PmuLayout::Intel(IntelLayout {
                arch_counters: a,
                fixed_counters: f,
                version,
                fixed_counter_width: width,
                arch_counter_width: width.wrapping_mul(3),
            })
        }),
        Just(PmuLayout::Amd(AmdLayout::K7)),
        Just(PmuLayout::Amd(AmdLayout::F15H)),
        Just(PmuLayout::None),
    ]
}

/// Bank offsets: Xen-like, near the edges, or anything.
fn offset() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(8u32),
        Just(64),
        (0u32..64).prop_map(|k| 8 * k),
        0u32..4200,
        3900u32..4100,
        any::<u32>(),
        (u32::MAX - 64)..=u32::MAX,
    ]
}

fn msr() -> impl Strategy<Value = u32> {
    prop_oneof![
        0xc0u32..0xd0,
        0x180u32..0x290,
        0x186u32..0x18e,
        0x300u32..0x330,
        prop::sample::select(vec![0x38d, 0x38e, 0x38f, 0x390, 0x3f1, 0x600, 0x1d9]),
        0x4c0u32..0x5c2,
        0xc000_ffffu32..0xc001_0010,
        0xc001_01ffu32..0xc001_0210,
        any::<u32>(),
    ]
}

fn counter() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..10,
        (0u32..40).prop_map(|i| (1 << 30) | i),
        any::<u32>(),
        prop::sample::select(vec![1 << 29, 1 << 31, (1 << 30) | 0x1_0000, 0xffff]),
    ]
}

/// A written value: any, small (mostly accepted), one bit (each of Xen's rules), or an
/// event select of an event Xen's `IPC_ONLY`/`ARCH_ONLY` filters let through.
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..=0xffff,
        (0u32..64).prop_map(|bit| 1u64 << bit),
        Just(0xffff_8800_0000_0000u64),
        (
            prop::sample::select(vec![
                0x003cu64, 0x013c, 0x00c0, 0x4f2e, 0x412e, 0x00c4, 0x00c5
            ]),
            0u64..0x1_0000,
        )
            .prop_map(|(event, flags)| (flags << 16) | event),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        msr().prop_map(Op::Read),
        (msr(), value()).prop_map(|(m, v)| Op::Write(m, v)),
        counter().prop_map(Op::Rdpmc),
    ]
}

/// The bits `0..n` (any `n`).
fn bits_below(n: u32) -> u64 {
    (0..n.min(64)).fold(0, |bits, b| bits | (1 << b))
}

/// Whether Xen's PV trap path filters out the event select `value` under `features`:
/// with `IPC_ONLY` or `ARCH_ONLY` only the listed `umask << 8 | event` codes pass.
fn model_event_filtered(features: XenPmuFeature, value: u64) -> bool {
    let ipc_only = features.contains(XenPmuFeature::IPC_ONLY);
    let arch_only = features.contains(XenPmuFeature::ARCH_ONLY);
    let ipc_event = matches!(value & 0xffff, 0x003c | 0x013c | 0x00c0);
    let arch_event = matches!(value & 0xffff, 0x4f2e | 0x412e | 0x00c4 | 0x00c5);
    (ipc_only || arch_only) && !ipc_event && !(arch_only && arch_event)
}

/// Whether Xen would refuse `value` written to `class` (whose slot held `cached`): the
/// model of Xen 4.17's flush checks (`core2_vpmu_verify`, the AMD reserved-bit test),
/// written out bit by bit, plus its trap path's own: the read-only global status and
/// the `IPC_ONLY`/`ARCH_ONLY` event filter.
fn model_refuses(
    layout: &PmuLayout,
    features: XenPmuFeature,
    class: PmuMsr,
    value: u64,
    cached: u64,
) -> bool {
    let counters = |l: &IntelLayout| {
        let fixed = (0..u32::from(l.fixed_counters))
            .filter(|i| 32 + i < 64)
            .fold(0u64, |bits, i| bits | (1 << (32 + i)));
        fixed | bits_below(l.arch_counters.into())
    };
    match (layout, class) {
        (PmuLayout::Intel(l), PmuMsr::Intel(m)) => match m {
            IntelMsr::GlobalOvfCtrl => {
                let uncore = if l.version >= 3 { 1 << 61 } else { 0 };
                value & !(counters(l) | (1 << 63) | (1 << 62) | uncore) != 0
            }
            IntelMsr::GlobalCtrl => value & !counters(l) != 0,
            IntelMsr::GlobalStatus => true,
            IntelMsr::PebsEnable => value != 0,
            IntelMsr::FixedCtrl => (0..64u32).any(|b| {
                let field_bit_of_a_counter = b < 4 * u32::from(l.fixed_counters);
                value & (1 << b) != 0 && (!field_bit_of_a_counter || b % 4 == 2)
            }),
            IntelMsr::FixedCounter(_) => value & !bits_below(l.fixed_counter_width.into()) != 0,
            IntelMsr::ArchCtrl(_) => {
                (value >> 32) != 0
                    || value & (1 << 21 | 1 << 19) != 0
                    || model_event_filtered(features, value)
            }
            IntelMsr::DsArea => (1 << 47..0xffff_8800_0000_0000).contains(&value),
            IntelMsr::ArchCounter(_) => false,
            IntelMsr::ArchCounterFullWidth(_) => unreachable!("passed through"),
        },
        (PmuLayout::Amd(_), PmuMsr::Amd(AmdMsr::Ctrl(_))) => {
            let reserved = !bits_below(42) | (0xf << 36) | (1 << 21) | (1 << 19);
            (value ^ cached) & reserved != 0
        }
        _ => false,
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        layout(),
        any::<u64>(),
        offset(),
        offset(),
        prop_oneof![Just(PmuFlags::CACHED.bits()), any::<u64>()],
        prop_oneof![4 => Just(0u32), 1 => 0u32..70],
        prop_oneof![3 => Just(true), 1 => Just(false)],
        prop_oneof![2 => Just(0u64), 1 => 0u64..8],
        prop::collection::vec(op(), 1..8),
    )
        .prop_map(
            |(layout, seed, off_a, off_b, flags, vcpu, in_handler, features, ops)| Case {
                layout,
                seed,
                off_a,
                off_b,
                flags,
                vcpu,
                in_handler: in_handler && vcpu == 0,
                features: XenPmuFeature::from_bits_retain(features),
                ops,
            },
        )
}

/// Random page bytes from a seed (xorshift), then the case's offsets and flags.
fn fill(page: &GuardedPage, c: &Case) {
    let mut bytes = vec![0u8; PAGE_SIZE];
    let mut x = c.seed | 1;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    bytes[PMU_CTXT_OFFSET..PMU_CTXT_OFFSET + 4].copy_from_slice(&c.off_a.to_le_bytes());
    bytes[PMU_CTXT_OFFSET + 4..PMU_CTXT_OFFSET + 8].copy_from_slice(&c.off_b.to_le_bytes());
    bytes[PMU_FLAGS_OFFSET..PMU_FLAGS_OFFSET + 8].copy_from_slice(&c.flags.to_le_bytes());
    page.load(&bytes);
}

/// The model's bank: `[start, start + elem * len)` in the page, or `None` if invalid.
fn bank(rel: u32, elem: u64, len: u64, fixed: u64) -> Option<(u64, u64)> {
    let start = PMU_CTXT_OFFSET as u64 + u64::from(rel);
    let end = start + elem * len;
    (u64::from(rel) >= fixed && rel.is_multiple_of(8) && end <= PAGE_SIZE as u64)
        .then_some((start, end))
}

fn disjoint(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 == a.1 || b.0 == b.1 || a.1 <= b.0 || b.1 <= a.0
}

/// Whether an MSR access to `m` may be served from the page: Xen's PV trap path hands
/// only `IA32_PMC0-7`, `PERFEVTSEL0-7`, `FIXED_CTR0-2` and `FIXED_CTR_CTRL..GLOBAL_OVF_CTRL`
/// to its vPMU, so the other Intel PMU MSRs pass through (and #GP there) even in a PMI.
fn model_routed(m: PmuMsr) -> bool {
    match m {
        PmuMsr::Intel(IntelMsr::FixedCounter(i)) => i < 3,
        PmuMsr::Intel(IntelMsr::ArchCounter(i) | IntelMsr::ArchCtrl(i)) => i < 8,
        PmuMsr::Intel(
            IntelMsr::DsArea | IntelMsr::PebsEnable | IntelMsr::ArchCounterFullWidth(_),
        ) => false,
        _ => true,
    }
}

/// Where the model says an access to `m` lands: `Ok(Some(page offset))`, `Ok(None)` for
/// "pass through", or `Err(())` for "invalid page".
fn model_slot(layout: &PmuLayout, c: &Case, m: PmuMsr) -> Result<Option<u64>, ()> {
    match (layout, m) {
        (PmuLayout::Intel(l), PmuMsr::Intel(m)) => {
            let (nf, na) = (u64::from(l.fixed_counters), u64::from(l.arch_counters));
            let f = bank(c.off_a, 8, nf, 64).ok_or(())?;
            let a = bank(c.off_b, 16, na, 64).ok_or(())?;
            if !disjoint(f, a) {
                return Err(());
            }
            let ctx = PMU_CTXT_OFFSET as u64;
            Ok(Some(match m {
                IntelMsr::GlobalCtrl => ctx + 8,
                IntelMsr::GlobalOvfCtrl => ctx + 16,
                IntelMsr::GlobalStatus => ctx + 24,
                IntelMsr::FixedCtrl => ctx + 32,
                IntelMsr::DsArea => ctx + 40,
                IntelMsr::PebsEnable => ctx + 48,
                IntelMsr::FixedCounter(i) => f.0 + 8 * u64::from(i),
                IntelMsr::ArchCounter(i) => a.0 + 16 * u64::from(i),
                IntelMsr::ArchCtrl(i) => a.0 + 16 * u64::from(i) + 8,
                IntelMsr::ArchCounterFullWidth(i) => a.0 + 16 * u64::from(i),
            }))
        }
        (PmuLayout::Amd(l), PmuMsr::Amd(m)) => {
            let n = u64::from(l.num_counters);
            let cn = bank(c.off_a, 8, n, 8).ok_or(())?;
            let ct = bank(c.off_b, 8, n, 8).ok_or(())?;
            if !disjoint(cn, ct) {
                return Err(());
            }
            Ok(match m {
                AmdMsr::Counter(i) => Some(cn.0 + 8 * u64::from(i)),
                AmdMsr::Ctrl(i) => Some(ct.0 + 8 * u64::from(i)),
                AmdMsr::NoSlot => None,
            })
        }
        _ => panic!("classification from another layout"),
    }
}

fn u64_at(bytes: &[u8], off: u64) -> u64 {
    let off = off as usize;
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

/// The byte ranges that differ between two snapshots.
fn changed(before: &[u8], after: &[u8]) -> Vec<usize> {
    (0..PAGE_SIZE).filter(|&i| before[i] != after[i]).collect()
}

fn check(
    page: &GuardedPage,
    c: &Case,
    native: &'static FakeNative,
    slots: &'static [VcpuSlot],
) -> Result<(), TestCaseError> {
    let s = mock::session();
    let v = vpmu_with_slots(s.page(), c.layout, native, slots);
    xen_ok_with_features(page.addr(), c.features);
    // A failed case (while shrinking) returned before freeing the shared slot.
    if v.is_initialized(0) {
        set_vcpu(0);
        let _ = v.finish_vcpu(0);
        let _ = mock::take_calls();
    }
    registered(&v, 0, page);
    fill(page, c);
    // The case's vCPU makes the accesses; only vCPU 0 has the page.
    set_vcpu(c.vcpu);
    let ops = || run_ops(page, c, native, &v);
    let result = if c.in_handler {
        v.on_pmi(|_| ops()).expect("the flush succeeds")
    } else {
        ops()
    };
    // Free the slot for the next case (the storage is shared).
    set_vcpu(0);
    v.finish_vcpu(0).expect("finish");
    drop(v);
    let _ = mock::take_calls();
    drop(s);
    result
}

/// The case's ops, each checked against the model.
fn run_ops(
    page: &GuardedPage,
    c: &Case,
    native: &'static FakeNative,
    v: &Vpmu,
) -> Result<(), TestCaseError> {
    // The page is used only inside `on_pmi` and only while Xen has cached the context.
    let cached = c.in_handler && PmuFlags::from_bits_retain(c.flags).contains(PmuFlags::CACHED);

    for &op in &c.ops {
        let before = page.snapshot();
        let _ = native.take();
        match op {
            Op::Read(msr) | Op::Write(msr, _) => {
                let got = match op {
                    Op::Read(_) => v.read(msr),
                    Op::Write(_, value) => v.write(msr, value),
                    Op::Rdpmc(_) => unreachable!(),
                };
                let after = page.snapshot();
                let diff = changed(&before, &after);
                let Some(class) = classify(&c.layout, msr) else {
                    prop_assert_eq!(got, None);
                    prop_assert!(diff.is_empty());
                    continue;
                };
                if !cached || !model_routed(class) {
                    prop_assert_eq!(got, Some(Outcome::Native));
                    prop_assert!(diff.is_empty());
                    continue;
                }
                match model_slot(&c.layout, c, class) {
                    Err(()) => {
                        prop_assert_eq!(got, Some(Outcome::Failed(MsrError::PmuUnavailable)));
                        prop_assert!(diff.is_empty(), "failed access wrote {:?}", diff);
                    }
                    Ok(None) => {
                        prop_assert_eq!(got, Some(Outcome::Native));
                        prop_assert!(diff.is_empty());
                    }
                    Ok(Some(slot)) => match op {
                        Op::Read(_) => {
                            // Xen's trap path reads GLOBAL_OVF_CTRL as 0.
                            let want = if class == PmuMsr::Intel(IntelMsr::GlobalOvfCtrl) {
                                0
                            } else {
                                u64_at(&before, slot)
                            };
                            prop_assert_eq!(got, Some(Outcome::Done(want)));
                            prop_assert!(diff.is_empty());
                        }
                        Op::Write(_, value)
                            if model_refuses(
                                &c.layout,
                                c.features,
                                class,
                                value,
                                u64_at(&before, slot),
                            ) =>
                        {
                            // Like the native wrmsr of a refused value: #GP, nothing stored.
                            prop_assert_eq!(
                                got,
                                Some(Outcome::Failed(MsrError::Fault { vector: 13 }))
                            );
                            prop_assert!(diff.is_empty(), "refused write stored {:?}", diff);
                        }
                        Op::Write(_, value) => {
                            prop_assert_eq!(got, Some(Outcome::Done(0)));
                            // A legacy counter write keeps the low 32 bits sign-extended
                            // to the counter width, as the hardware does.
                            let stored = match (c.layout, class) {
                                (PmuLayout::Intel(l), PmuMsr::Intel(IntelMsr::ArchCounter(_))) => {
                                    let low = value & 0xffff_ffff;
                                    let high = if low & (1 << 31) != 0 {
                                        !0xffff_ffff
                                    } else {
                                        0
                                    };
                                    // CPUID reporting no width: taken as 32.
                                    let width = match l.arch_counter_width {
                                        0 => 32,
                                        width => width.into(),
                                    };
                                    (high | low) & bits_below(width)
                                }
                                _ => value,
                            };
                            prop_assert_eq!(u64_at(&after, slot), stored);
                            let status = PMU_CTXT_OFFSET as u64 + 24;
                            let ovf = class == PmuMsr::Intel(IntelMsr::GlobalOvfCtrl);
                            if ovf {
                                prop_assert_eq!(
                                    u64_at(&after, status),
                                    u64_at(&before, status) & !value
                                );
                            }
                            for i in diff {
                                let i = i as u64;
                                let in_slot = (slot..slot + 8).contains(&i);
                                let in_status = ovf && (status..status + 8).contains(&i);
                                prop_assert!(in_slot || in_status, "stray write at {}", i);
                            }
                        }
                        Op::Rdpmc(_) => unreachable!(),
                    },
                }
            }
            Op::Rdpmc(counter) => {
                let got = v.rdpmc(counter);
                prop_assert!(changed(&before, &page.snapshot()).is_empty());
                let reads = native.take();
                let Some(pmc) = decode_pmc(&c.layout, counter) else {
                    prop_assert_eq!(got, Outcome::Failed(MsrError::InvalidCounter));
                    prop_assert!(reads.is_empty(), "bad index read an MSR: {:?}", reads);
                    continue;
                };
                let msr = pmc.msr(&c.layout).expect("decoded for this layout");
                // Independent check of the counter MSR.
                match (c.layout, pmc) {
                    (PmuLayout::Intel(l), PmcIndex::IntelFixed(i)) => {
                        prop_assert!(i < l.fixed_counters);
                        prop_assert_eq!(counter, (1 << 30) | u32::from(i));
                        prop_assert_eq!(msr, 0x309 + u32::from(i));
                    }
                    (PmuLayout::Intel(l), PmcIndex::IntelArch(i)) => {
                        prop_assert!(i < l.arch_counters);
                        prop_assert_eq!(counter, u32::from(i));
                        prop_assert_eq!(msr, 0xc1 + u32::from(i));
                    }
                    (PmuLayout::Amd(l), PmcIndex::Amd(i)) => {
                        prop_assert_eq!(counter, u32::from(i));
                        prop_assert!(u32::from(i) < l.num_counters);
                        prop_assert_eq!(msr, l.counters_base + l.step * u32::from(i));
                    }
                    _ => prop_assert!(false, "decoded for the wrong vendor"),
                }
                if !cached {
                    prop_assert_eq!(got, Outcome::Done(FakeNative::value(msr)));
                    prop_assert_eq!(reads, vec![msr]);
                    continue;
                }
                prop_assert!(reads.is_empty());
                let class = classify(&c.layout, msr).expect("counter MSRs are PMU MSRs");
                match model_slot(&c.layout, c, class) {
                    Err(()) => prop_assert_eq!(got, Outcome::Failed(MsrError::PmuUnavailable)),
                    Ok(Some(slot)) => prop_assert_eq!(got, Outcome::Done(u64_at(&before, slot))),
                    Ok(None) => prop_assert!(false, "counter without a slot"),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn random_pages_and_indices_stay_in_bounds_and_match_the_model() {
    let page = GuardedPage::new();
    let native = FakeNative::leak(vec![]);
    let slots = leak_slots(DEFAULT_VCPUS);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let n = runner.config().cases;
    runner
        .run(&case(), |c| check(&page, &c, native, slots))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("pmu property test: {n} cases passed");
}
