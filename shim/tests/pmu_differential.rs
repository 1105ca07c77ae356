//! The vPMU's cached path answers every Intel PMU MSR access as Xen's trapped path does.
//!
//! Inside `on_pmi` with `PMU_CACHED` set the backend serves PMU MSRs from the shared page
//! (the *cached* path); anywhere else they trap to Xen (the *trapped* path). TCG offers no
//! Intel PMU, so the trapped side here is a model, [`TrappedXen`], of what Xen's PV
//! trap-and-emulate path, its vPMU and the hardware behind it do. It is written from
//! these facts (Xen 4.22's `pv/emul-priv-op.c` `read_msr`/`write_msr` and
//! `cpu/vpmu_intel.c` `core2_vpmu_do_wrmsr`/`do_rdmsr`, unchanged in these respects since
//! 4.17 except that 4.17 routes only `PERFEVTSEL0-3`; and the Intel SDM):
//!
//! 1. Xen hands a PV guest's access to its vPMU only for `IA32_PMC0-7` (0xc1..0xc8),
//!    `IA32_PERFEVTSEL0-7` (0x186..0x18d), `IA32_FIXED_CTR0-2` (0x309..0x30b) and
//!    `IA32_FIXED_CTR_CTRL..IA32_PERF_GLOBAL_OVF_CTRL` (0x38d..0x390). Every other MSR,
//!    `IA32_A_PMCn` (0x4c1+), `IA32_PEBS_ENABLE`, `IA32_DS_AREA` and `FIXED_CTR3`+
//!    included, is `#GP` for reads and writes (the domain's `msr_relaxed` is off, the
//!    default).
//! 2. In the vPMU: an index beyond the CPUID count is not a vPMU MSR (a write is `#GP`, a
//!    read completes without a value); a fixed counter with a bit at or above the fixed
//!    width, an event select with bits 63..32, 21 or 19 or (under `IPC_ONLY`/`ARCH_ONLY`)
//!    an event the filter withholds, and global or fixed controls with bits beyond their
//!    counters (or AnyThread) are `#GP`; `GLOBAL_STATUS` is read-only; an accepted
//!    `GLOBAL_OVF_CTRL` write clears those status bits, and the MSR reads as 0.
//! 3. A legacy `IA32_PMCn` write goes to the hardware as it is, which keeps `EAX`
//!    sign-extended from bit 31, to the counter width (CPUID.0xA.EAX[23:16]); a read gives
//!    the counter.
//!
//! For several layouts and Xen feature sets ([`configurations`]) and, per MSR kind
//! ([`KINDS`]), [`CASES_PER_KIND`] seeded random values (mixed with values aimed at bit
//! 31, the counter widths, the reserved bits and the filtered events), each write is made
//! on both paths in lock-step and must give the same outcome; then the read of the same
//! MSR must too; then the whole context in the page must equal the model's (what Xen
//! loads at the flush; `global_ovf_ctrl`, which Xen only writes to the MSR, must be the
//! last accepted write). An access the backend passes through (`Outcome::Native`, or
//! `None`: not a PMU MSR of the layout) traps to Xen for real, so its answer is the
//! trapped one by construction: the test checks that the backend passes through exactly
//! the accesses whose trapped answer does not depend on the vPMU context.

mod pmu_common;

use std::collections::BTreeMap;

use pmu_common::*;
use xenmsr::pmu::{IntelLayout, PmuLayout};
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, XenPmuFeature};
use xenmsr_hypercall::mock;

/// Random values per MSR kind and configuration.
const CASES_PER_KIND: usize = 10_000;

/// A `#GP` (the trapped refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gp;

/// `n` low bits set.
fn low_bits(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// What the hardware keeps from a legacy `IA32_PMCn` write of `v` on a counter `width`
/// bits wide: `EAX`, sign-extended from bit 31.
fn hardware_legacy_write(v: u64, width: u32) -> u64 {
    let eax = v & 0xffff_ffff;
    let extended = if eax >> 31 == 1 {
        eax | 0xffff_ffff_0000_0000
    } else {
        eax
    };
    extended & low_bits(width)
}

/// The events `IPC_ONLY` lets through (`umask << 8 | event`).
const IPC_EVENTS: [u64; 3] = [0x003c, 0x013c, 0x00c0];
/// The events `ARCH_ONLY` lets through besides those.
const ARCH_EVENTS: [u64; 4] = [0x4f2e, 0x412e, 0x00c4, 0x00c5];

/// The PMU registers Xen keeps for the vCPU: in the hardware and Xen's context outside
/// a PMI, in the page while it is cached (and loaded from there at the flush).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Context {
    fixed: Vec<u64>,
    /// (counter, control) per general counter.
    arch: Vec<(u64, u64)>,
    global_ctrl: u64,
    global_status: u64,
    fixed_ctrl: u64,
    ds_area: u64,
    pebs_enable: u64,
    debugctl: u64,
}

/// Page offsets of the banks, as `xen_intel_pmi` lays them out.
fn fixed_bank() -> usize {
    PMU_CTXT_OFFSET + 64
}
fn arch_bank(layout: &IntelLayout) -> usize {
    fixed_bank() + 8 * usize::from(layout.fixed_counters)
}

impl Context {
    /// What the page holds now.
    fn from_page(page: &GuardedPage, layout: &IntelLayout) -> Self {
        let arch = arch_bank(layout);
        Context {
            fixed: (0..usize::from(layout.fixed_counters))
                .map(|i| page.r64(fixed_bank() + 8 * i))
                .collect(),
            arch: (0..usize::from(layout.arch_counters))
                .map(|i| (page.r64(arch + 16 * i), page.r64(arch + 16 * i + 8)))
                .collect(),
            global_ctrl: page.r64(intel::GLOBAL_CTRL),
            global_status: page.r64(intel::GLOBAL_STATUS),
            fixed_ctrl: page.r64(intel::FIXED_CTRL),
            ds_area: page.r64(intel::DS_AREA),
            pebs_enable: page.r64(intel::PEBS_ENABLE),
            debugctl: page.r64(intel::DEBUGCTL),
        }
    }

    /// Writes it into the page, as Xen does at a PMI.
    fn to_page(&self, page: &GuardedPage) {
        xen_intel_pmi(page.addr(), &self.fixed, &self.arch);
        page.w64(intel::GLOBAL_CTRL, self.global_ctrl);
        page.w64(intel::GLOBAL_OVF_CTRL, 0);
        page.w64(intel::GLOBAL_STATUS, self.global_status);
        page.w64(intel::FIXED_CTRL, self.fixed_ctrl);
        page.w64(intel::DS_AREA, self.ds_area);
        page.w64(intel::PEBS_ENABLE, self.pebs_enable);
        page.w64(intel::DEBUGCTL, self.debugctl);
    }

    /// The fields that differ from `other`: (class name, name, this value, other's).
    fn differences(&self, other: &Context) -> Vec<(&'static str, String, u64, u64)> {
        let mut found = Vec::new();
        for (i, (a, b)) in self.fixed.iter().zip(&other.fixed).enumerate() {
            if a != b {
                found.push(("fixed_counters[n]", format!("fixed_counters[{i}]"), *a, *b));
            }
        }
        for (i, (a, b)) in self.arch.iter().zip(&other.arch).enumerate() {
            if a.0 != b.0 {
                let name = format!("arch_counters[{i}].counter");
                found.push(("arch_counters[n].counter", name, a.0, b.0));
            }
            if a.1 != b.1 {
                let name = format!("arch_counters[{i}].control");
                found.push(("arch_counters[n].control", name, a.1, b.1));
            }
        }
        for (name, a, b) in [
            ("global_ctrl", self.global_ctrl, other.global_ctrl),
            ("global_status", self.global_status, other.global_status),
            ("fixed_ctrl", self.fixed_ctrl, other.fixed_ctrl),
            ("ds_area", self.ds_area, other.ds_area),
            ("pebs_enable", self.pebs_enable, other.pebs_enable),
            ("debugctl", self.debugctl, other.debugctl),
        ] {
            if a != b {
                found.push((name, name.to_string(), a, b));
            }
        }
        found
    }
}

/// The trapped path: Xen's PV MSR emulation with its vPMU and the Intel hardware behind
/// it, for one vCPU.
#[derive(Clone, Debug)]
struct TrappedXen {
    /// The CPU's leaf 0xA (Xen passes the host's through to a PV guest).
    layout: IntelLayout,
    /// Xen's vPMU features (`vpmu=bts,ipc,arch`).
    features: XenPmuFeature,
    ctx: Context,
}

impl TrappedXen {
    /// Fact 1: whether Xen's PV `read_msr`/`write_msr` hands `msr` to its vPMU at all.
    fn routed_to_vpmu(msr: u32) -> bool {
        matches!(msr, 0xc1..=0xc8 | 0x186..=0x18d | 0x309..=0x30b | 0x38d..=0x390)
    }

    fn general(&self) -> u32 {
        self.layout.arch_counters.into()
    }

    fn fixed_count(&self) -> u32 {
        self.layout.fixed_counters.into()
    }

    /// Fact 2: whether the vPMU knows `msr` as one of this CPU's registers (its
    /// `is_core2_vpmu_msr`).
    fn vpmu_knows(&self, msr: u32) -> bool {
        let pmc = msr & !0x400;
        matches!(msr, 0x38d..=0x390 | 0x3f1 | 0x600)
            || (0x309..0x309 + self.fixed_count()).contains(&msr)
            || (0x186..0x186 + self.general()).contains(&msr)
            || (0xc1..0xc1 + self.general()).contains(&pmc)
    }

    /// Whether the trapped answer for `msr` depends on the vPMU context: only then must
    /// the cached path serve it (anything else it may pass through to Xen).
    fn served_from_context(&self, msr: u32) -> bool {
        Self::routed_to_vpmu(msr) && self.vpmu_knows(msr)
    }

    /// The fixed-counter enable bits (32..) and the general ones (0..).
    fn counter_bits(&self) -> u64 {
        (low_bits(self.fixed_count()) << 32) | low_bits(self.general())
    }

    /// Whether the `IPC_ONLY`/`ARCH_ONLY` filter withholds the event of `evntsel`.
    fn event_filtered(&self, evntsel: u64) -> bool {
        let ipc = self.features.contains(XenPmuFeature::IPC_ONLY);
        let arch = self.features.contains(XenPmuFeature::ARCH_ONLY);
        let event = evntsel & 0xffff;
        (ipc || arch) && !IPC_EVENTS.contains(&event) && !(arch && ARCH_EVENTS.contains(&event))
    }

    /// `wrmsr` of `v` to `msr`.
    fn trapped_write(&mut self, msr: u32, v: u64) -> Result<(), Gp> {
        if !Self::routed_to_vpmu(msr) || !self.vpmu_knows(msr) {
            return Err(Gp);
        }
        match msr {
            0xc1..=0xc8 => {
                // Fact 3: straight to the hardware, which keeps EAX sign-extended.
                let width = self.layout.arch_counter_width.into();
                self.ctx.arch[(msr - 0xc1) as usize].0 = hardware_legacy_write(v, width);
            }
            0x186..=0x18d => {
                if v >> 32 != 0 || v & (1 << 21 | 1 << 19) != 0 || self.event_filtered(v) {
                    return Err(Gp);
                }
                self.ctx.arch[(msr - 0x186) as usize].1 = v;
            }
            0x309..=0x30b => {
                if v & !low_bits(self.layout.fixed_counter_width.into()) != 0 {
                    return Err(Gp);
                }
                self.ctx.fixed[(msr - 0x309) as usize] = v;
            }
            0x38d => {
                let fields = low_bits(4 * self.fixed_count());
                let any_thread = (0..self.fixed_count().min(16)).fold(0, |m, i| m | (4 << (4 * i)));
                if v & !(fields & !any_thread) != 0 {
                    return Err(Gp);
                }
                self.ctx.fixed_ctrl = v;
            }
            0x38e => return Err(Gp),
            0x38f => {
                if v & !self.counter_bits() != 0 {
                    return Err(Gp);
                }
                self.ctx.global_ctrl = v;
            }
            0x390 => {
                let uncore = if self.layout.version > 2 { 1 << 61 } else { 0 };
                if v & !(self.counter_bits() | (0b11 << 62) | uncore) != 0 {
                    return Err(Gp);
                }
                self.ctx.global_status &= !v;
            }
            _ => unreachable!("routed"),
        }
        Ok(())
    }

    /// `rdmsr` of `msr`: `Ok(None)` when Xen completes it without filling in a value (an
    /// index the vPMU does not know; the backend passes those through).
    fn trapped_read(&self, msr: u32) -> Result<Option<u64>, Gp> {
        if !Self::routed_to_vpmu(msr) {
            return Err(Gp);
        }
        if !self.vpmu_knows(msr) {
            return Ok(None);
        }
        Ok(Some(match msr {
            0xc1..=0xc8 => self.ctx.arch[(msr - 0xc1) as usize].0,
            0x186..=0x18d => self.ctx.arch[(msr - 0x186) as usize].1,
            0x309..=0x30b => self.ctx.fixed[(msr - 0x309) as usize],
            0x38d => self.ctx.fixed_ctrl,
            0x38e => self.ctx.global_status,
            0x38f => self.ctx.global_ctrl,
            0x390 => 0,
            _ => unreachable!("routed"),
        }))
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
        let events = [IPC_EVENTS.as_slice(), ARCH_EVENTS.as_slice()].concat();
        match self.next() % 20 {
            0..=9 => r,
            // Small values, with or without bit 31 (legacy sign extension).
            10 => r & 0xffff_ffff,
            11 => (r & 0x7fff_ffff) | (self.next() & 1) << 31,
            // One bit around a counter width or a reserved field.
            12 => bit(u64::from(l.arch_counter_width) + (r % 3) - 1),
            13 => bit(u64::from(l.fixed_counter_width) + (r % 3) - 1),
            14 => bit(r % 64) | (self.next() & 0xff),
            // An event select of an event the filters let through, with random control
            // bits (no reserved ones), or of any event with pin control or AnyThread.
            15 | 16 => {
                let event = events[(r % events.len() as u64) as usize];
                (self.next() & 0xffff_0000 & !(1 << 21 | 1 << 19)) | event
            }
            17 => (self.next() & 0x00ff_ffff) | (r & 1) << 19 | (r & 2) << 20,
            // The layout's fixed-counter control fields, now and then with an AnyThread
            // bit or the first bit past the fields.
            18 => {
                let fields = low_bits(4 * u32::from(l.fixed_counters));
                let extra = match self.next() % 4 {
                    0 => bit(4 * u64::from(l.fixed_counters)),
                    1 => 0x4 << (4 * (r % 4)),
                    _ => 0,
                };
                (r & fields & 0xbbbb_bbbb_bbbb_bbbb) | extra
            }
            // The layout's global enable / overflow bits, now and then with bits 61..63
            // or the first general or fixed bit past the counters.
            _ => {
                let general = u64::from(l.arch_counters);
                let fixed = u64::from(l.fixed_counters);
                let enables = (low_bits(fixed as u32) << 32) | low_bits(general as u32);
                let extra = match self.next() % 4 {
                    0 => bit(general),
                    1 => bit(32 + fixed),
                    2 => r & 0xe000_0000_0000_0000,
                    _ => 0,
                };
                (r & enables) | extra
            }
        }
    }
}

/// A backend answer in the trapped path's terms; `None` when it passed the access
/// through (it then traps for real).
fn cached_write(outcome: Option<Outcome>) -> Option<Result<(), String>> {
    match outcome {
        None | Some(Outcome::Native) => None,
        Some(Outcome::Done(_)) => Some(Ok(())),
        Some(Outcome::Failed(MsrError::Fault { vector: 13 })) => Some(Err("#GP".into())),
        Some(other) => Some(Err(format!("{other:?}"))),
    }
}

fn cached_read(outcome: Option<Outcome>) -> Option<Result<u64, String>> {
    match outcome {
        None | Some(Outcome::Native) => None,
        Some(Outcome::Done(v)) => Some(Ok(v)),
        Some(Outcome::Failed(MsrError::Fault { vector: 13 })) => Some(Err("#GP".into())),
        Some(other) => Some(Err(format!("{other:?}"))),
    }
}

/// One configuration: a CPU and Xen's features.
#[derive(Clone, Copy, Debug)]
struct Configuration {
    layout: IntelLayout,
    features: XenPmuFeature,
}

/// What one configuration's run found: cases per kind, how the trapped path answered
/// them, and per class of difference its count and first example.
#[derive(Debug, Default)]
struct Findings {
    cases: Vec<(&'static str, usize)>,
    answers: BTreeMap<&'static str, Answers>,
    differences: BTreeMap<String, (usize, String)>,
}

/// How the trapped path answered one kind's writes: accepted, refused by the vPMU (the
/// cached path must refuse them too), or refused whatever the context holds (the cached
/// path passes those through).
#[derive(Clone, Copy, Debug, Default)]
struct Answers {
    accepted: usize,
    refused_by_the_vpmu: usize,
    not_the_vpmus: usize,
}

impl Findings {
    fn note(&mut self, class: String, example: impl FnOnce() -> String) {
        self.differences
            .entry(class)
            .and_modify(|(n, _)| *n += 1)
            .or_insert_with(|| (1, example()));
    }
}

/// A random context as Xen saves it at a PMI, every register as the hardware may hold
/// it (the controls need not pass the event filter: it applies to writes only).
fn random_context(l: &IntelLayout, rng: &mut Rng) -> Context {
    let counter_bits = (low_bits(l.fixed_counters.into()) << 32) | low_bits(l.arch_counters.into());
    Context {
        fixed: (0..l.fixed_counters)
            .map(|_| rng.next() & low_bits(l.fixed_counter_width.into()))
            .collect(),
        arch: (0..l.arch_counters)
            .map(|_| {
                (
                    rng.next() & low_bits(l.arch_counter_width.into()),
                    rng.next() & 0xffff_ffff & !(1 << 21 | 1 << 19),
                )
            })
            .collect(),
        global_ctrl: rng.next() & counter_bits,
        global_status: rng.next() & counter_bits,
        fixed_ctrl: rng.next() & low_bits(4 * u32::from(l.fixed_counters)) & 0xbbbb_bbbb_bbbb_bbbb,
        ds_area: 0,
        pebs_enable: 0,
        debugctl: rng.next() & 0xffff,
    }
}

/// Runs every kind on `config`, on this thread's mock Xen.
fn differential(config: Configuration, seed: u64) -> Findings {
    let Configuration { layout, features } = config;
    let s = mock::session();
    let page = GuardedPage::new();
    let v = vpmu(s.page(), PmuLayout::Intel(layout), FakeNative::leak(vec![]));
    xen_ok_with_features(page.addr(), features);
    registered(&v, 0, &page);
    assert_eq!(v.features(), Some(features), "learnt at XENPMU_init");
    let mut rng = Rng(seed);
    // What Xen saved into the page at the PMI is its context: both start from it.
    let mut xen = TrappedXen {
        layout,
        features,
        ctx: random_context(&layout, &mut rng),
    };
    xen.ctx.to_page(&page);

    // The page's `global_ovf_ctrl`: not a register Xen reads back (the MSR reads as 0),
    // but what its flush writes to the MSR, so the last accepted write.
    let mut ovf_ctrl_for_the_flush = 0;
    let mut found = Findings::default();
    v.on_pmi(|_| {
        for kind in KINDS {
            let msrs = (kind.msrs)(&layout);
            for case in 0..CASES_PER_KIND {
                let msr = msrs[case % msrs.len()];
                let value = rng.value(&layout);
                // The write, on both paths.
                let mut after = xen.clone();
                let trapped = after.trapped_write(msr, value);
                let answers = found.answers.entry(kind.name).or_default();
                match trapped {
                    Ok(()) => answers.accepted += 1,
                    Err(Gp) if xen.served_from_context(msr) => answers.refused_by_the_vpmu += 1,
                    Err(Gp) => answers.not_the_vpmus += 1,
                }
                let mut diverged = false;
                let mut report = |what: &str, detail: String| {
                    diverged = true;
                    found.note(format!("{}: {what}", kind.name), || {
                        format!("{config:?}: msr {msr:#x} value {value:#x}: {detail}")
                    });
                };
                let trapped_name = if trapped.is_ok() { "accepted" } else { "#GP" };
                match cached_write(v.write(msr, value)) {
                    None if xen.served_from_context(msr) => report(
                        "a write Xen's vPMU serves from the context is passed through",
                        format!("trapped: {trapped_name}"),
                    ),
                    None => {}
                    Some(Ok(())) if trapped.is_ok() => {}
                    Some(Err(gp)) if trapped.is_err() && gp == "#GP" => {}
                    Some(cached) => {
                        let cached = cached.map_or_else(|e| e, |()| "accepted".into());
                        let event = match msr {
                            0x186..=0x18d => format!("event {:#06x}", value & 0xffff),
                            _ => String::new(),
                        };
                        report(
                            &format!("write {trapped_name} when trapped, {cached} when cached"),
                            event,
                        )
                    }
                }
                xen = after;
                if msr == 0x390 && trapped.is_ok() {
                    ovf_ctrl_for_the_flush = value;
                }
                // The read, on both paths.
                let trapped = xen.trapped_read(msr);
                match (cached_read(v.read(msr)), trapped) {
                    (None, _) if xen.served_from_context(msr) => report(
                        "a read Xen's vPMU serves from the context is passed through",
                        format!("trapped: {trapped:x?}"),
                    ),
                    (None, _) => {}
                    (Some(Ok(c)), Ok(Some(t))) if c == t => {}
                    (Some(Err(gp)), Err(Gp)) if gp == "#GP" => {}
                    (Some(Ok(c)), Ok(Some(t))) => report(
                        "the read gives another value",
                        format!("trapped {t:#x}, cached {c:#x}"),
                    ),
                    (Some(cached), trapped) => report(
                        &format!(
                            "read {} when trapped, {} when cached",
                            if trapped.is_ok() { "served" } else { "#GP" },
                            cached.map_or_else(|e| e, |_| "served".into()),
                        ),
                        format!("trapped {trapped:x?}"),
                    ),
                }
                // And the page, which Xen's flush loads.
                let in_page = Context::from_page(&page, &layout);
                for (class, field, in_page, xens) in in_page.differences(&xen.ctx) {
                    report(
                        &format!("the page's {class} is not Xen's"),
                        format!("page {field} {in_page:#x}, Xen's {xens:#x}"),
                    );
                }
                let ovf_ctrl = page.r64(intel::GLOBAL_OVF_CTRL);
                if ovf_ctrl != ovf_ctrl_for_the_flush {
                    report(
                        "the page's global_ovf_ctrl is not the last accepted write",
                        format!("page {ovf_ctrl:#x}, last accepted {ovf_ctrl_for_the_flush:#x}"),
                    );
                }
                if diverged {
                    // Start the next case from the same state on both sides.
                    xen.ctx.to_page(&page);
                    ovf_ctrl_for_the_flush = 0;
                }
            }
            found.cases.push((kind.name, CASES_PER_KIND));
        }
    })
    .expect("the flush succeeds");
    let _ = mock::take_calls();
    found
}

/// The layouts: Skylake's (4 general, 3 fixed, both 48 bits wide, PMU version 4), an
/// 8-general/4-fixed one (Ice Lake and later: FIXED_CTR3 exists but Xen's PV path stops at
/// FIXED_CTR2), 40-bit counters on PMU version 2 (no bit 61 in GLOBAL_OVF_CTRL), 32-bit
/// general counters on version 3, and more general counters than Xen's PV path covers
/// (10).
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

/// Xen's feature sets: none (the default), `vpmu=bts`, `vpmu=ipc`, `vpmu=arch`, and all
/// three.
fn feature_sets() -> Vec<XenPmuFeature> {
    vec![
        XenPmuFeature::empty(),
        XenPmuFeature::INTEL_BTS,
        XenPmuFeature::IPC_ONLY,
        XenPmuFeature::ARCH_ONLY,
        XenPmuFeature::all(),
    ]
}

/// Every layout with every feature set.
fn configurations() -> Vec<Configuration> {
    layouts()
        .into_iter()
        .flat_map(|layout| {
            feature_sets()
                .into_iter()
                .map(move |features| Configuration { layout, features })
        })
        .collect()
}

#[test]
fn the_cached_path_answers_every_intel_pmu_msr_as_the_trapped_path() {
    let configurations = configurations();
    // One thread per configuration: the mock Xen and the vCPU id are per thread.
    let findings: Vec<Findings> = std::thread::scope(|scope| {
        let runs: Vec<_> = configurations
            .iter()
            .enumerate()
            .map(|(n, &config)| scope.spawn(move || differential(config, 0x17d1_ff00 + n as u64)))
            .collect();
        runs.into_iter()
            .map(|run| run.join().expect("a configuration's run panicked"))
            .collect()
    });

    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut answers: BTreeMap<&str, Answers> = BTreeMap::new();
    let mut differences: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for found in &findings {
        for (kind, cases) in &found.cases {
            *per_kind.entry(kind).or_default() += cases;
        }
        for (kind, a) in &found.answers {
            let sum = answers.entry(kind).or_default();
            sum.accepted += a.accepted;
            sum.refused_by_the_vpmu += a.refused_by_the_vpmu;
            sum.not_the_vpmus += a.not_the_vpmus;
        }
        for (class, (count, example)) in &found.differences {
            differences
                .entry(class.clone())
                .and_modify(|(n, _)| *n += count)
                .or_insert((*count, example.clone()));
        }
    }
    let total: usize = per_kind.values().sum();
    for (kind, cases) in &per_kind {
        let a = answers[kind];
        eprintln!(
            "pmu-differential: {kind}: {cases} cases (trapped writes: {} accepted, {} refused \
             by the vPMU, {} refused outside it)",
            a.accepted, a.refused_by_the_vpmu, a.not_the_vpmus
        );
    }
    eprintln!(
        "pmu-differential: {total} cases: {} configurations ({} layouts x {} feature sets), \
         {} kinds, {CASES_PER_KIND} values each",
        configurations.len(),
        layouts().len(),
        feature_sets().len(),
        KINDS.len()
    );
    let report: Vec<String> = differences
        .iter()
        .map(|(class, (count, example))| format!("{class} ({count} cases), e.g. {example}"))
        .collect();
    assert!(
        report.is_empty(),
        "the cached path differs from the trapped path:\n  {}",
        report.join("\n  ")
    );
    assert_eq!(
        total,
        configurations.len() * KINDS.len() * CASES_PER_KIND,
        "every kind ran on every configuration"
    );
    for cases in per_kind.values() {
        assert_eq!(*cases, configurations.len() * CASES_PER_KIND);
    }
}

/// A CPUID that reports general counters but no width: the cached write keeps `EAX`
/// (taken as 32 bits wide), which Xen's flush loads through the legacy `IA32_PMCn` (a PV
/// guest sees no full-width writes) where the hardware sign-extends it: the counter ends
/// as a trapped write would leave it, whatever the hardware's real width.
#[test]
fn an_unreported_counter_width_keeps_eax_for_xens_legacy_reload() {
    let layout = IntelLayout {
        arch_counters: 2,
        fixed_counters: 3,
        version: 3,
        fixed_counter_width: 48,
        arch_counter_width: 0,
    };
    let s = mock::session();
    let page = GuardedPage::new();
    let v = vpmu(s.page(), PmuLayout::Intel(layout), FakeNative::leak(vec![]));
    xen_ok(page.addr());
    registered(&v, 0, &page);
    xen_intel_pmi(page.addr(), &[0; 3], &[(0, 0); 2]);
    let counter = arch_bank(&layout);
    let mut rng = Rng(0x5eed);
    v.on_pmi(|_| {
        for value in [
            0,
            1,
            0x7fff_ffff,
            0x8000_0000,
            u64::MAX,
            0x1234_5678_9abc_def0,
        ]
        .into_iter()
        .chain((0..1000).map(|_| rng.next()))
        {
            assert_eq!(v.write(0xc1, value), Some(Outcome::Done(0)), "{value:#x}");
            let kept = page.r64(counter);
            assert_eq!(kept, value & 0xffff_ffff, "{value:#x}: EAX, nothing above");
            assert_eq!(v.read(0xc1), Some(Outcome::Done(kept)));
            for hardware_width in [40, 48] {
                assert_eq!(
                    hardware_legacy_write(kept, hardware_width),
                    hardware_legacy_write(value, hardware_width),
                    "{value:#x} on a {hardware_width}-bit counter"
                );
            }
        }
    })
    .expect("the flush succeeds");
}

/// The model itself, on the rules the differential relies on (so that a wrong model
/// cannot make both sides agree on a wrong answer).
#[test]
fn the_trapped_model_follows_xen_and_the_hardware() {
    let skylake = IntelLayout {
        arch_counters: 4,
        fixed_counters: 3,
        version: 4,
        fixed_counter_width: 48,
        arch_counter_width: 48,
    };
    let mut xen = TrappedXen {
        layout: skylake,
        features: XenPmuFeature::empty(),
        ctx: Context {
            fixed: vec![0; 3],
            arch: vec![(0, 0); 4],
            global_ctrl: 0,
            global_status: 0x7_0000_000f,
            fixed_ctrl: 0,
            ds_area: 0,
            pebs_enable: 0,
            debugctl: 0,
        },
    };
    // Legacy counter writes: sign extension from bit 31, to 48 bits; EDX ignored.
    xen.trapped_write(0xc1, 0x8000_0000).unwrap();
    assert_eq!(xen.trapped_read(0xc1), Ok(Some(0xffff_8000_0000)));
    xen.trapped_write(0xc1, 0xffff_ffff_7fff_ffff).unwrap();
    assert_eq!(xen.trapped_read(0xc1), Ok(Some(0x7fff_ffff)));
    assert_eq!(
        hardware_legacy_write(0xb9fd_0c99_d6dc_a765, 48),
        0xffff_d6dc_a765
    );
    // Not routed by Xen's PV path: #GP however written, whatever the features.
    for features in [XenPmuFeature::empty(), XenPmuFeature::all()] {
        xen.features = features;
        for msr in [0x4c1, 0x3f1, 0x600, 0x30c, 0xc9, 0x18e] {
            assert_eq!(xen.trapped_write(msr, 0), Err(Gp), "{msr:#x}");
            assert_eq!(xen.trapped_read(msr), Err(Gp), "{msr:#x}");
            assert!(!xen.served_from_context(msr));
        }
    }
    xen.features = XenPmuFeature::empty();
    // Beyond the CPUID count, inside the routed range: not the vPMU's.
    assert_eq!(xen.trapped_write(0xc5, 0), Err(Gp));
    assert_eq!(xen.trapped_write(0x18a, 0), Err(Gp));
    assert_eq!(xen.trapped_read(0xc5), Ok(None));
    assert!(!xen.served_from_context(0xc5));
    assert_eq!(xen.trapped_write(0x186, 1 << 21), Err(Gp));
    assert_eq!(xen.trapped_write(0x309, 1 << 48), Err(Gp));
    assert_eq!(xen.trapped_write(0x38e, 0), Err(Gp));
    // GLOBAL_OVF_CTRL clears status bits and reads 0.
    xen.trapped_write(0x390, 0x1_0000_0001).unwrap();
    assert_eq!(xen.trapped_read(0x38e), Ok(Some(0x6_0000_000e)));
    assert_eq!(xen.trapped_read(0x390), Ok(Some(0)));
    // The event filters: only the event (umask << 8 | event) counts, and under a filter
    // even "no event" is refused.
    xen.features = XenPmuFeature::IPC_ONLY;
    assert_eq!(xen.trapped_write(0x186, 0x43_003c), Ok(()));
    assert_eq!(xen.trapped_write(0x186, 0x01_00c0), Ok(()));
    assert_eq!(xen.trapped_write(0x186, 0x43_412e), Err(Gp));
    assert_eq!(xen.trapped_write(0x186, 0), Err(Gp));
    xen.features = XenPmuFeature::ARCH_ONLY;
    assert_eq!(xen.trapped_write(0x186, 0x43_412e), Ok(()));
    assert_eq!(xen.trapped_write(0x186, 0x43_00c5), Ok(()));
    assert_eq!(xen.trapped_write(0x186, 0x43_00c6), Err(Gp));
    xen.features = XenPmuFeature::INTEL_BTS;
    assert_eq!(xen.trapped_write(0x186, 0x43_00c6), Ok(()));
    assert_eq!(xen.trapped_read(0x186), Ok(Some(0x43_00c6)));
}
