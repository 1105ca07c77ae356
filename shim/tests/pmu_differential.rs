//! The vPMU's cached path answers every Intel PMU MSR access as Xen's trapped path does.
//!
//! Inside `on_pmi` with `PMU_CACHED` set the backend serves PMU MSRs from the shared page
//! (the *cached* path); anywhere else they trap to Xen (the *trapped* path). TCG offers no
//! Intel PMU, so the trapped side here is a model of what Xen's PV trap-and-emulate path
//! and the hardware behind it do (written from Xen 4.20-4.22's `pv/emul-priv-op.c` and
//! `cpu/vpmu_intel.c`, and the Intel SDM; 4.17 routes only `PERFEVTSEL0-3`, see
//! docs/pmu.md), kept in [`TrappedXen`]:
//!
//! - Xen hands a PV guest's access to its vPMU only for `IA32_PMC0-7` (0xc1..0xc8),
//!   `IA32_PERFEVTSEL0-7` (0x186..0x18d), `IA32_FIXED_CTR0-2` (0x309..0x30b) and
//!   `IA32_FIXED_CTR_CTRL..IA32_PERF_GLOBAL_OVF_CTRL` (0x38d..0x390); every other MSR,
//!   `IA32_A_PMCn` (0x4c1+), `IA32_PEBS_ENABLE` and `IA32_DS_AREA` included, is `#GP`.
//! - In the vPMU: a counter or select beyond the CPUID count is refused; a fixed counter
//!   with a bit at or above the fixed width, an event select with bits 63..32, 21 or 19,
//!   and global or fixed controls with bits beyond their counters (or AnyThread) are
//!   refused; `GLOBAL_STATUS` is read-only; an accepted `GLOBAL_OVF_CTRL` write clears
//!   those status bits, and the MSR reads as 0.
//! - A legacy `IA32_PMCn` write goes to the hardware as it is, which keeps `EAX`
//!   sign-extended from bit 31, to the counter width (CPUID.0xA.EAX[23:16]).
//!
//! For several layouts and, per MSR kind, [`CASES_PER_KIND`] seeded random values (mixed
//! with values aimed at bit 31, the counter widths and the reserved bits), each write is
//! made on both paths in lock-step, and must give the same outcome; then the read of the
//! same MSR must too, and the page must hold the model's value. An access the backend
//! passes through (`Outcome::Native`, or `None`: not a PMU MSR of the layout) traps to Xen
//! for real, so it is the trapped answer by construction: the test checks that the backend
//! passes through exactly the accesses whose trapped answer does not depend on the vPMU
//! context (those Xen refuses whatever it holds).

mod pmu_common;

use pmu_common::*;
use xenmsr::pmu::{IntelLayout, PmuLayout};
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::abi::PMU_CTXT_OFFSET;
use xenmsr_hypercall::mock;

/// Random values per MSR kind and layout.
const CASES_PER_KIND: usize = 10_000;

/// A `#GP` from Xen (the trapped refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gp;

/// `n` low bits set.
fn low_bits(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// The trapped path: Xen's PV MSR emulation with its vPMU and the Intel hardware behind
/// it, for one vCPU whose context is the state below.
#[derive(Clone, Debug)]
struct TrappedXen {
    layout: IntelLayout,
    fixed: Vec<u64>,
    /// (counter, control) per general counter.
    arch: Vec<(u64, u64)>,
    global_ctrl: u64,
    global_status: u64,
    fixed_ctrl: u64,
}

impl TrappedXen {
    /// Whether Xen's PV path hands `msr` to its vPMU at all.
    fn routed(msr: u32) -> bool {
        matches!(msr, 0xc1..=0xc8 | 0x186..=0x18d | 0x309..=0x30b | 0x38d..=0x390)
    }

    fn general(&self) -> u32 {
        self.layout.arch_counters.into()
    }

    fn fixed_count(&self) -> u32 {
        self.layout.fixed_counters.into()
    }

    /// The fixed-counter enable bits (32..) and the general ones (0..).
    fn counter_bits(&self) -> u64 {
        (low_bits(self.fixed_count()) << 32) | low_bits(self.general())
    }

    fn write(&mut self, msr: u32, v: u64) -> Result<(), Gp> {
        if !Self::routed(msr) {
            return Err(Gp);
        }
        match msr {
            0xc1..=0xc8 => {
                let i = (msr - 0xc1) as usize;
                if i >= self.arch.len() {
                    return Err(Gp);
                }
                // The hardware's legacy write: EAX, sign-extended from bit 31, to the width.
                let eax = v & 0xffff_ffff;
                let extended = if eax >> 31 == 1 {
                    eax | 0xffff_ffff_0000_0000
                } else {
                    eax
                };
                self.arch[i].0 = extended & low_bits(self.layout.arch_counter_width.into());
            }
            0x186..=0x18d => {
                let i = (msr - 0x186) as usize;
                if i >= self.arch.len() || v >> 32 != 0 || v & (1 << 21 | 1 << 19) != 0 {
                    return Err(Gp);
                }
                self.arch[i].1 = v;
            }
            0x309..=0x30b => {
                let i = (msr - 0x309) as usize;
                if i >= self.fixed.len()
                    || v & !low_bits(self.layout.fixed_counter_width.into()) != 0
                {
                    return Err(Gp);
                }
                self.fixed[i] = v;
            }
            0x38d => {
                let fields = low_bits(4 * self.fixed_count());
                let any_thread = (0..self.fixed_count().min(16)).fold(0, |m, i| m | (4 << (4 * i)));
                if v & !(fields & !any_thread) != 0 {
                    return Err(Gp);
                }
                self.fixed_ctrl = v;
            }
            0x38e => return Err(Gp),
            0x38f => {
                if v & !self.counter_bits() != 0 {
                    return Err(Gp);
                }
                self.global_ctrl = v;
            }
            0x390 => {
                let uncore = if self.layout.version > 2 { 1 << 61 } else { 0 };
                if v & !(self.counter_bits() | (0b11 << 62) | uncore) != 0 {
                    return Err(Gp);
                }
                self.global_status &= !v;
            }
            _ => unreachable!("routed"),
        }
        Ok(())
    }

    fn read(&self, msr: u32) -> Result<u64, Gp> {
        if !Self::routed(msr) {
            return Err(Gp);
        }
        Ok(match msr {
            0xc1..=0xc8 => self.arch.get((msr - 0xc1) as usize).ok_or(Gp)?.0,
            0x186..=0x18d => self.arch.get((msr - 0x186) as usize).ok_or(Gp)?.1,
            0x309..=0x30b => *self.fixed.get((msr - 0x309) as usize).ok_or(Gp)?,
            0x38d => self.fixed_ctrl,
            0x38e => self.global_status,
            0x38f => self.global_ctrl,
            0x390 => 0,
            _ => unreachable!("routed"),
        })
    }

    /// Where the page keeps `msr`'s value (for the layout `xen_intel_pmi` writes).
    fn page_offset(&self, msr: u32) -> Option<usize> {
        let fixed_bank = PMU_CTXT_OFFSET + 64;
        let arch_bank = fixed_bank + 8 * self.fixed.len();
        Some(match msr {
            0xc1..=0xc8 if ((msr - 0xc1) as usize) < self.arch.len() => {
                arch_bank + 16 * (msr - 0xc1) as usize
            }
            0x186..=0x18d if ((msr - 0x186) as usize) < self.arch.len() => {
                arch_bank + 16 * (msr - 0x186) as usize + 8
            }
            0x309..=0x30b if ((msr - 0x309) as usize) < self.fixed.len() => {
                fixed_bank + 8 * (msr - 0x309) as usize
            }
            0x38d => intel::FIXED_CTRL,
            0x38e => intel::GLOBAL_STATUS,
            0x38f => intel::GLOBAL_CTRL,
            _ => return None,
        })
    }
}

/// One kind of MSR: a name and the MSRs it covers for a layout.
struct Kind {
    name: &'static str,
    msrs: fn(&IntelLayout) -> Vec<u32>,
}

/// Every Intel PMU MSR kind, each over the indices the layout has and (where the MSR
/// range goes on) one beyond.
const KINDS: &[Kind] = &[
    Kind {
        name: "IA32_PMCn",
        msrs: |l| {
            (0..u32::from(l.arch_counters).min(8) + 1)
                .map(|i| 0xc1 + i)
                .collect()
        },
    },
    Kind {
        name: "IA32_A_PMCn",
        msrs: |l| {
            (0..u32::from(l.arch_counters) + 1)
                .map(|i| 0x4c1 + i)
                .collect()
        },
    },
    Kind {
        name: "IA32_PERFEVTSELn",
        msrs: |l| {
            (0..u32::from(l.arch_counters).min(8) + 1)
                .map(|i| 0x186 + i)
                .collect()
        },
    },
    Kind {
        name: "IA32_FIXED_CTRn",
        msrs: |l| {
            (0..u32::from(l.fixed_counters) + 1)
                .map(|i| 0x309 + i)
                .collect()
        },
    },
    Kind {
        name: "IA32_FIXED_CTR_CTRL",
        msrs: |_| vec![0x38d],
    },
    Kind {
        name: "IA32_PERF_GLOBAL_STATUS",
        msrs: |_| vec![0x38e],
    },
    Kind {
        name: "IA32_PERF_GLOBAL_CTRL",
        msrs: |_| vec![0x38f],
    },
    Kind {
        name: "IA32_PERF_GLOBAL_OVF_CTRL",
        msrs: |_| vec![0x390],
    },
    Kind {
        name: "IA32_PEBS_ENABLE",
        msrs: |_| vec![0x3f1],
    },
    Kind {
        name: "IA32_DS_AREA",
        msrs: |_| vec![0x600],
    },
];

/// splitmix64: a small seeded generator, so a failure reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value aimed, half the time, at the bits the rules look at.
    fn value(&mut self, l: &IntelLayout) -> u64 {
        let r = self.next();
        let bit = |b: u64| 1u64 << (b % 64);
        match self.next() % 10 {
            0..=4 => r,
            // Small values, with or without bit 31 (legacy sign extension).
            5 => r & 0xffff_ffff,
            6 => (r & 0x7fff_ffff) | (self.next() & 1) << 31,
            // One bit around a counter width or a reserved field.
            7 => bit(u64::from(l.arch_counter_width) + (r % 3) - 1),
            8 => bit(u64::from(l.fixed_counter_width) + (r % 3) - 1),
            _ => bit(r % 64) | (self.next() & 0xff),
        }
    }
}

/// What the cached path answered, as the trapped one would put it. `None` when the
/// backend passed the access through (it then traps for real).
fn cached_write(outcome: Option<Outcome>) -> Option<Result<(), Gp>> {
    match outcome {
        None | Some(Outcome::Native) => None,
        Some(Outcome::Done(_)) => Some(Ok(())),
        Some(Outcome::Failed(MsrError::Fault { vector: 13 })) => Some(Err(Gp)),
        Some(other) => panic!("unexpected cached write outcome {other:?}"),
    }
}

fn cached_read(outcome: Option<Outcome>) -> Option<Result<u64, Gp>> {
    match outcome {
        None | Some(Outcome::Native) => None,
        Some(Outcome::Done(v)) => Some(Ok(v)),
        Some(Outcome::Failed(MsrError::Fault { vector: 13 })) => Some(Err(Gp)),
        Some(other) => panic!("unexpected cached read outcome {other:?}"),
    }
}

/// Runs every kind on `layout`; returns (kind, cases) counts and every difference found
/// (at most a few per kind, with the values).
fn differential(layout: IntelLayout, seed: u64) -> (Vec<(&'static str, usize)>, Vec<String>) {
    let s = mock::session();
    let page = GuardedPage::new();
    let a = page.addr();
    let v = vpmu(s.page(), PmuLayout::Intel(layout), FakeNative::leak(vec![]));
    xen_ok(a);
    registered(&v, 0, &page);
    let mut rng = Rng(seed);
    // What Xen saved into the page at the PMI is its context: start both from the same.
    let mut xen = TrappedXen {
        layout,
        fixed: (0..layout.fixed_counters)
            .map(|_| rng.next() & low_bits(layout.fixed_counter_width.into()))
            .collect(),
        arch: (0..layout.arch_counters)
            .map(|_| {
                (
                    rng.next() & low_bits(layout.arch_counter_width.into()),
                    rng.next() & 0xffff_ffff & !(1 << 21 | 1 << 19),
                )
            })
            .collect(),
        global_ctrl: 0,
        global_status: rng.next() & ((low_bits(layout.fixed_counters.into()) << 32) | 0xff),
        fixed_ctrl: 0,
    };
    xen_intel_pmi(a, &xen.fixed, &xen.arch);
    page.w64(intel::GLOBAL_STATUS, xen.global_status);
    page.w64(intel::GLOBAL_CTRL, 0);
    page.w64(intel::FIXED_CTRL, 0);
    page.w64(intel::DS_AREA, 0);
    page.w64(intel::PEBS_ENABLE, 0);

    let mut counts = Vec::new();
    let mut differences = Vec::new();
    v.on_pmi(|_| {
        for kind in KINDS {
            let msrs = (kind.msrs)(&layout);
            let mut found = 0;
            for case in 0..CASES_PER_KIND {
                let msr = msrs[case % msrs.len()];
                let value = rng.value(&layout);
                let mut report = |what: String| {
                    if found < 3 {
                        differences.push(format!(
                            "{} (layout {layout:?}) msr {msr:#x} value {value:#x}: {what}",
                            kind.name
                        ));
                    }
                    found += 1;
                };
                // The write, on both paths.
                let mut after = xen.clone();
                let trapped = after.write(msr, value);
                let cached = cached_write(v.write(msr, value));
                match cached {
                    // Passed through: right only where Xen's answer ignores the context.
                    None if TrappedXen::routed(msr) && trapped.is_ok() => report(format!(
                        "the cached path passed through a write Xen's vPMU accepts \
                         ({trapped:?})"
                    )),
                    None => {}
                    Some(c) if c != trapped => report(format!("trapped {trapped:?}, cached {c:?}")),
                    Some(_) => {}
                }
                if cached.is_some() {
                    xen = after;
                }
                // The read, on both paths.
                let trapped = xen.read(msr);
                match cached_read(v.read(msr)) {
                    None if TrappedXen::routed(msr) && trapped.is_ok() => report(format!(
                        "the cached path passed through a read Xen's vPMU serves ({trapped:?})"
                    )),
                    None => {}
                    Some(c) if c != trapped => {
                        report(format!("read: trapped {trapped:?}, cached {c:?}"))
                    }
                    Some(_) => {}
                }
                // And the page, where Xen's flush takes the context from.
                if let Some(off) = xen.page_offset(msr) {
                    let want = xen.read(msr).expect("a slot the model serves");
                    if page.r64(off) != want {
                        report(format!(
                            "page holds {:#x}, Xen's context {want:#x}",
                            page.r64(off)
                        ));
                    }
                }
            }
            counts.push((kind.name, CASES_PER_KIND));
            if found > 3 {
                differences.push(format!("{}: {found} differences in all", kind.name));
            }
        }
    })
    .expect("the flush succeeds");
    let _ = mock::take_calls();
    (counts, differences)
}

/// The layouts: Skylake's (4 general, 3 fixed, both 48 bits wide, PMU version 4), an
/// 8-general/4-fixed one (Ice Lake and later: FIXED_CTR3 exists but Xen's PV path stops at
/// FIXED_CTR2), narrower counters (40 and 32 bits) and PMU version 2 (no bit 61 in
/// GLOBAL_OVF_CTRL), and more general counters than Xen's PV path covers (10).
fn layouts() -> Vec<IntelLayout> {
    let l = |arch, fixed, version, fixed_width, arch_width| IntelLayout {
        arch_counters: arch,
        fixed_counters: fixed,
        version,
        fixed_counter_width: fixed_width,
        arch_counter_width: arch_width,
    };
    vec![
        l(4, 3, 4, 48, 48),
        l(8, 4, 5, 48, 48),
        l(4, 3, 2, 40, 40),
        l(2, 3, 3, 48, 32),
        l(10, 3, 4, 48, 48),
    ]
}

#[test]
fn the_cached_path_answers_every_intel_pmu_msr_as_the_trapped_path() {
    let mut all = Vec::new();
    let mut total = 0;
    for (n, layout) in layouts().into_iter().enumerate() {
        let (counts, differences) = differential(layout, 0x17d1_ff00 + n as u64);
        for (kind, cases) in &counts {
            total += cases;
            eprintln!("pmu-differential: {layout:?}: {kind}: {cases} cases");
        }
        all.extend(differences);
    }
    eprintln!(
        "pmu-differential: {total} cases over {} layouts, {} kinds",
        layouts().len(),
        KINDS.len()
    );
    assert!(
        all.is_empty(),
        "the cached path differs from the trapped path:\n  {}",
        all.join("\n  ")
    );
    assert_eq!(total, layouts().len() * KINDS.len() * CASES_PER_KIND);
}

/// The model itself, on the rules the differential relies on (so that a wrong model
/// cannot make both sides agree on a wrong answer).
#[test]
fn the_trapped_model_follows_xen_and_the_hardware() {
    let mut xen = TrappedXen {
        layout: IntelLayout {
            arch_counters: 4,
            fixed_counters: 3,
            version: 4,
            fixed_counter_width: 48,
            arch_counter_width: 48,
        },
        fixed: vec![0; 3],
        arch: vec![(0, 0); 4],
        global_ctrl: 0,
        global_status: 0x7_0000_000f,
        fixed_ctrl: 0,
    };
    // Legacy counter writes: sign extension from bit 31, to 48 bits; EDX ignored.
    xen.write(0xc1, 0x8000_0000).unwrap();
    assert_eq!(xen.read(0xc1), Ok(0xffff_8000_0000));
    xen.write(0xc1, 0xffff_ffff_7fff_ffff).unwrap();
    assert_eq!(xen.read(0xc1), Ok(0x7fff_ffff));
    // Not routed by Xen's PV path: #GP however written.
    for msr in [0x4c1, 0x3f1, 0x600, 0x30c, 0xc9, 0x18e] {
        assert_eq!(xen.write(msr, 0), Err(Gp), "{msr:#x}");
        assert_eq!(xen.read(msr), Err(Gp), "{msr:#x}");
    }
    // Beyond the CPUID count, inside the routed range: refused by the vPMU.
    assert_eq!(xen.write(0xc5, 0), Err(Gp));
    assert_eq!(xen.write(0x18a, 0), Err(Gp));
    assert_eq!(xen.write(0x186, 1 << 21), Err(Gp));
    assert_eq!(xen.write(0x309, 1 << 48), Err(Gp));
    assert_eq!(xen.write(0x38e, 0), Err(Gp));
    // GLOBAL_OVF_CTRL clears status bits and reads 0.
    xen.write(0x390, 0x1_0000_0001).unwrap();
    assert_eq!(xen.read(0x38e), Ok(0x6_0000_000e));
    assert_eq!(xen.read(0x390), Ok(0));
}
