//! The vPMU's cached path answers like the trapped path (issue 17), on the AMD
//! family-15h layout (`EPYC`, family 0x17, the one model whose vPMU Xen initialises under
//! TCG): six controls `CTL n` = `0xc0010200 + 2n`, six counters `CTR n` = `0xc0010201 + 2n`,
//! and the K7 MSRs `EVNTSEL n` = `0xc0010000 + n` and `PERFCTR n` = `0xc0010004 + n`
//! (n < 4), which both Xen and the library remap onto `CTL n` and `CTR n`.
//!
//! The *trapped* path is a bare `wrmsr`/`rdmsr` ([`raw`]) outside `on_pmi`: Xen's AMD vPMU
//! emulates it (`amd_vpmu_do_wrmsr`/`do_rdmsr`, Xen 4.17 to 4.22). The *cached* path is
//! `xenmsr::wrmsr_safe`/`rdmsr_safe` inside `xenmsr::pmu::on_pmi` with `PMU_CACHED` set in
//! the page: the library serves it from the shared page. QEMU TCG raises no PMI, so the
//! test sets `PMU_CACHED` itself around the cached accesses (as the PMU benchmark does)
//! and restores the flags before the flush that ends `on_pmi`.
//!
//! # What is compared, and against what
//!
//! Against **real Xen** (what the trapped path and the flush do on this Xen):
//! - the outcome of every write: accepted, or `#GP`. Xen refuses a control write whose
//!   bits under `CTRL_RSVD_MASK` (63..42, 39..36, 21, 19) differ from `ctrl_rsvd[n]`, the
//!   control's reserved bits as read at boot, and accepts every counter write; the cached
//!   write must give the same outcome for the same value. (The trapped outcome is also
//!   checked against that rule with `ctrl_rsvd[n] = 0`, what QEMU's controls read at boot,
//!   so a surprise in the reference itself is reported as such.)
//! - the outcome of every read (both paths must read without a fault);
//! - the flush after each batch of cases: Xen copies the page's context into its own,
//!   checks every control's reserved bits again (`amd_vpmu_load`) and refuses the whole
//!   context with `-EIO` (`PmuError::FlushRejected`) otherwise. Xen loads (and so checks)
//!   the page only while its vPMU is *running* (a counter enabled); each batch therefore
//!   enables one with a trapped write just before its flush.
//!   `xen_flush_checks_a_running_context` shows on this Xen that the check is live that
//!   way and only that way.
//! - the bank offsets Xen wrote into the page at `XENPMU_init`: after each batch the
//!   banks at those offsets (where Xen's flush reads) must hold the model's values, so
//!   the library wrote the slot Xen reads, not merely one it reads back itself.
//!
//! Against a **model of Xen's context**, for what TCG cannot show: QEMU's TCG keeps no
//! PMU MSR state (a trapped write followed by a trapped read reads 0 for every kind and
//! value, which every case checks), so Xen's `rdmsrl` of the "hardware" cannot show the
//! value a trapped write left. What Xen keeps is its context: `context_update` stores the
//! raw 64-bit value of an accepted write in `ctrls[n]` or `counters[n]` (K7 MSRs remapped
//! to `n`), and a refused write changes nothing. The model is that: 6 controls and 6
//! counters, starting at 0 (the page is zeroed before `XENPMU_init` and Xen's context
//! starts with `ctrls[n] = ctrl_rsvd[n] = 0`). After every cached write the cached read of
//! the MSR (and of its K7 or F15h alias) must give the model's value, and after every
//! batch all 20 MSRs, the RDPMC of each counter and the page's banks must. The flush with
//! a running vPMU makes Xen's context equal to the page, so every batch starts with the
//! two paths in the same state. (Not modelled, because a PMI-time view never sees it:
//! Xen's `context_save` at a deschedule overwrites its saved counters with the hardware's,
//! 0 under TCG.)
//!
//! Cases: at least [`CASES_PER_KIND`] per kind and vCPU, round robin over the four kinds
//! with a random counter index, from a seeded splitmix64 stream per vCPU; the values are
//! biased towards the reserved bits, the edges of the reserved fields and the counter
//! width (bits 47 and 48, sign extension from bit 47), see [`value`]. LVTPC is masked for
//! the whole run, so no PMI can come whatever the controls enable.
//!
//! On a model without an active vPMU the tests check that the page cannot be registered
//! (`PmuError::Disabled`) and say so on the console: there is no cached path to compare.

use core::cell::UnsafeCell;
use core::ptr::NonNull;

use xenmsr::MsrError;
use xenmsr::pmu::{self, AmdLayout, PmuError, PmuLayout};
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags};

use super::{model, raw};
use crate::smp::{MAX_VCPUS, current_vcpu, vcpu_index};
use crate::testing::{Failure, Test, TestResult};
use crate::{check, check_eq, events, fail, test};

/// The differential tests.
pub static TESTS: &[Test] = &[
    test!(xen_flush_checks_a_running_context),
    test!(cached_path_matches_trapped_path),
    test!(unserved_pmu_msrs_pass_through_in_a_pmi),
];

/// Random cases per MSR kind and vCPU.
const CASES_PER_KIND: usize = 10_000;
/// Cases between two flushes.
const BATCH: usize = 250;
/// The seed of vCPU 0's stream (vCPU `v` uses `SEED + v`, mixed by splitmix64).
const SEED: u64 = 0x1717_d1ff_c0de_0017;

const F15H_CTL0: u32 = 0xc001_0200;
const F15H_CTR0: u32 = 0xc001_0201;
const K7_EVNTSEL0: u32 = 0xc001_0000;
const K7_PERFCTR0: u32 = 0xc001_0004;
/// Counters (and controls) of the family-15h layout.
const COUNTERS: usize = 6;
/// Counters the K7 MSRs mirror.
const K7_COUNTERS: usize = 4;
/// Xen's `CTRL_RSVD_MASK` (`vpmu_amd.c`): bits 63..42, 39..36, 21 and 19.
const XEN_CTRL_RSVD_MASK: u64 = !((1 << 42) - 1) | (0xf << 36) | (1 << 21) | (1 << 19);
/// The event-select enable bit (Xen's `is_pmu_enabled`).
const EVNTSEL_EN: u64 = 1 << 22;
/// LVTPC masked (bit 16; Xen keeps only the mask bit and uses its own vector).
const LVTPC_MASKED: u32 = 0x0001_00fe;
/// Inside Linux's AMD PMU ranges but no slot of the family-15h layout: the library
/// passes them through even inside a PMI.
const UNSERVED: [u32; 3] = [0xc001_0008, 0xc001_0009, 0xc001_020c];

// ---------------------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------------------

/// One vCPU's shared PMU page, owned by Xen and the library while registered.
#[repr(C, align(4096))]
struct PmuPage(UnsafeCell<[u8; 4096]>);

// SAFETY: each vCPU uses only its own page (`PAGES[vcpu]`), one test at a time, and only
// through raw pointers and volatile scalar accesses (as Xen and the library do), never
// through references.
unsafe impl Sync for PmuPage {}

static PAGES: [PmuPage; MAX_VCPUS] = [const { PmuPage(UnsafeCell::new([0; 4096])) }; MAX_VCPUS];

/// This vCPU's page.
fn page() -> NonNull<u8> {
    NonNull::new(PAGES[vcpu_index()].0.get().cast::<u8>()).expect("static page")
}

/// The `u64` at byte offset `off` of this vCPU's page.
fn page_u64(off: usize) -> *mut u64 {
    assert!(
        off.is_multiple_of(8) && off + 8 <= 4096,
        "page offset {off:#x}"
    );
    page().as_ptr().wrapping_add(off).cast::<u64>()
}

fn read_page(off: usize) -> u64 {
    // SAFETY: `page_u64` checked that the 8 bytes lie inside this vCPU's static,
    // 4 KiB-aligned page and are 8-aligned; a volatile scalar read, like Xen's and the
    // library's own accesses.
    unsafe { page_u64(off).read_volatile() }
}

fn write_page(off: usize, value: u64) {
    // SAFETY: as in `read_page`. Xen and the library access the page with volatile
    // scalar accesses too, only this vCPU's code runs them, and none runs while this
    // write does (Xen writes the page inside this vCPU's hypercalls).
    unsafe { page_u64(off).write_volatile(value) }
}

/// Sets `PMU_CACHED` in this vCPU's page, as Xen does when it caches the context for a
/// PMI (TCG raises none); returns the flags found, for [`leave_cached`].
fn enter_cached() -> u64 {
    let old = read_page(PMU_FLAGS_OFFSET);
    write_page(PMU_FLAGS_OFFSET, old | PmuFlags::CACHED.bits());
    old
}

/// Puts back the flags [`enter_cached`] found.
fn leave_cached(old: u64) {
    write_page(PMU_FLAGS_OFFSET, old);
}

/// The page offsets of the banks Xen's flush reads.
#[derive(Clone, Copy, Debug)]
struct Banks {
    counters: usize,
    ctrls: usize,
}

impl Banks {
    /// From the bank offsets Xen wrote at `XENPMU_init` (`xen_pmu_amd_ctxt.counters`
    /// and `.ctrls`, relative to the context): Xen's `amd_vpmu_initialise` puts the
    /// counters right after the two offsets and the controls after the counters.
    fn from_page() -> Result<Banks, Failure> {
        let word = read_page(PMU_CTXT_OFFSET);
        let (counters, ctrls) = ((word & 0xffff_ffff) as usize, (word >> 32) as usize);
        check_eq!(
            (counters, ctrls),
            (8, 8 + 8 * COUNTERS),
            "bank offsets Xen wrote into the page"
        );
        Ok(Banks {
            counters: PMU_CTXT_OFFSET + counters,
            ctrls: PMU_CTXT_OFFSET + ctrls,
        })
    }

    fn ctrl(self, n: usize) -> usize {
        self.ctrls + 8 * n
    }

    fn counter(self, n: usize) -> usize {
        self.counters + 8 * n
    }
}

// ---------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------

/// Runs `body` with this vCPU's page registered and LVTPC masked, then leaves the vCPU's
/// vPMU as it found it: context zeroed (page, Xen's context, counters disabled), page
/// unregistered. Without an active vPMU, checks that registration is refused and says so.
///
/// A test's failure message lives in one buffer per vCPU until the next failure, so the
/// clean-up's own problems become a failure only when `body` passed.
fn with_vpmu(what: &str, body: impl FnOnce(u32, Banks) -> TestResult) -> TestResult {
    let vcpu = current_vcpu();
    let page = page();
    let mfn = crate::boot::mfn_of(page.as_ptr() as usize);
    // SAFETY: the page is 4 KiB, aligned, static, used by no one else, and `mfn` is its
    // frame; it is touched only through volatile scalar accesses until `finish` below
    // (after a failed `finish` it is never reused).
    let r = unsafe { pmu::init(vcpu, page, mfn) };
    match (r, model().vpmu_active) {
        (Ok(()), true) => {}
        (Err(e), false) => {
            check_eq!(e, PmuError::Disabled, "pmu::init without an active vPMU");
            crate::println!(
                "pmu-diff: v{vcpu} {what}: not applicable, no case run: the vPMU page cannot \
                 be registered ({e}: Xen's vPMU is off on cpu {}), so there is no cached path",
                model().cpu.unwrap_or("?")
            );
            return Ok(());
        }
        (Err(e), true) => fail!("pmu::init on a model with an active vPMU: {e:?}"),
        (Ok(()), false) => {
            let _ = pmu::finish(vcpu);
            fail!("pmu::init succeeded where the harness says the vPMU is off");
        }
    }
    let result = match pmu::global().layout() {
        PmuLayout::Amd(l) if l == AmdLayout::F15H => pmu::lvtpc_set(LVTPC_MASKED)
            .map_err(|e| Failure::new(format_args!("lvtpc_set: {e:?}")))
            .and_then(|()| Banks::from_page())
            .and_then(|banks| body(vcpu, banks)),
        other => Err(Failure::new(format_args!(
            "written for the AMD family-15h layout, the library has {other:?}"
        ))),
    };
    // Masked until the page is unregistered: if Xen still refused the context, the
    // library would fail the timer handler's counter read until then.
    let masked = events::mask();
    let reset = reset_context();
    let finished = pmu::finish(vcpu);
    drop(masked);
    result?;
    if let Err(problem) = reset {
        fail!("clean-up: {problem}");
    }
    check_eq!(finished, Ok(()), "pmu::finish");
    Ok(())
}

/// What went wrong while zeroing the context.
#[derive(Clone, Copy)]
enum ResetProblem {
    /// `pmu::recover` (repairing a refused context first).
    Recover(PmuError),
    /// The cached zeroing (`Ok(Err)`: a write; `Err`: `on_pmi` or its flush).
    Cached(Result<Result<(), MsrError>, PmuError>),
    /// A trapped zeroing write: its exception info.
    Trapped(u32, u64),
}

impl core::fmt::Display for ResetProblem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ResetProblem::Recover(e) => write!(f, "pmu::recover: {e:?}"),
            ResetProblem::Cached(r) => write!(f, "cached zeroing: {r:?}"),
            ResetProblem::Trapped(msr, info) => {
                write!(f, "trapped zeroing of {msr:#x}: exception {info:#x}")
            }
        }
    }
}

/// Zeroes every control and counter in the page (cached path, flushed) and in Xen's
/// context and the hardware (trapped path), which also stops Xen's vPMU running. Call
/// with upcalls masked.
fn reset_context() -> Result<(), ResetProblem> {
    // Xen refused the context (a test failed): repair it first (no-op otherwise).
    pmu::recover().map_err(ResetProblem::Recover)?;
    let zeroed = pmu::on_pmi(|_| {
        let old = enter_cached();
        let mut r = Ok(());
        for msr in f15h_msrs() {
            // SAFETY: inside on_pmi with PMU_CACHED: the write goes to the page only.
            r = r.and(unsafe { xenmsr::wrmsr_safe(msr, 0) });
        }
        leave_cached(old);
        r
    });
    if zeroed != Ok(Ok(())) {
        return Err(ResetProblem::Cached(zeroed));
    }
    for msr in f15h_msrs() {
        // SAFETY: zeroing a PMU MSR of this vCPU's virtual PMU (LVTPC is masked).
        unsafe { raw::wrmsr(msr, 0) }.map_err(|info| ResetProblem::Trapped(msr, info))?;
    }
    Ok(())
}

/// After a refused flush, with upcalls masked: repairs the context, or unregisters the
/// page if Xen refuses the repair too, so that the library does not go on failing this
/// vCPU's PMU accesses (the timer handler reads a counter) once upcalls are unmasked.
fn settle(vcpu: u32) -> Result<u32, PmuError> {
    let r = pmu::recover();
    if r.is_err() {
        let _ = pmu::finish(vcpu);
    }
    r
}

/// The 12 family-15h MSRs.
fn f15h_msrs() -> impl Iterator<Item = u32> {
    (0..2 * COUNTERS as u32).map(|i| F15H_CTL0 + i)
}

/// A trapped write of `EN` to `CTL0`: Xen's vPMU is *running* from then on, so the next
/// flush loads the page's context and checks it (a non-running vPMU loads nothing).
fn run_xen_vpmu() -> TestResult {
    // SAFETY: enabling counter 0 of this vCPU's virtual PMU; LVTPC is masked, so no PMI.
    let r = unsafe { raw::wrmsr(F15H_CTL0, EVNTSEL_EN) };
    check_eq!(r, Ok(()), "trapped write of EN to CTL0");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

/// A kind of PMU MSR the library serves from the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ctl,
    Ctr,
    K7Evntsel,
    K7Perfctr,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Ctl, Kind::Ctr, Kind::K7Evntsel, Kind::K7Perfctr];

    fn name(self) -> &'static str {
        match self {
            Kind::Ctl => "ctl",
            Kind::Ctr => "ctr",
            Kind::K7Evntsel => "k7evntsel",
            Kind::K7Perfctr => "k7perfctr",
        }
    }

    fn count(self) -> usize {
        match self {
            Kind::Ctl | Kind::Ctr => COUNTERS,
            Kind::K7Evntsel | Kind::K7Perfctr => K7_COUNTERS,
        }
    }

    fn is_ctrl(self) -> bool {
        matches!(self, Kind::Ctl | Kind::K7Evntsel)
    }

    fn msr(self, n: usize) -> u32 {
        let n = n as u32;
        match self {
            Kind::Ctl => F15H_CTL0 + 2 * n,
            Kind::Ctr => F15H_CTR0 + 2 * n,
            Kind::K7Evntsel => K7_EVNTSEL0 + n,
            Kind::K7Perfctr => K7_PERFCTR0 + n,
        }
    }

    /// The MSR naming the same slot through the other range, if any.
    fn alias(self, n: usize) -> Option<u32> {
        let other = match self {
            Kind::Ctl => Kind::K7Evntsel,
            Kind::Ctr => Kind::K7Perfctr,
            Kind::K7Evntsel => Kind::Ctl,
            Kind::K7Perfctr => Kind::Ctr,
        };
        (n < other.count()).then(|| other.msr(n))
    }
}

/// splitmix64: a seeded, deterministic stream.
#[derive(Clone, Copy, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough below a small `n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A bit of `XEN_CTRL_RSVD_MASK`, uniformly.
fn reserved_bit(rng: &mut Rng) -> u32 {
    match rng.below(28) as u32 {
        0 => 19,
        1 => 21,
        k @ 2..=5 => 36 + (k - 2),
        k => 42 + (k - 6),
    }
}

/// Bits at the edges of the reserved fields, and the enable bit.
const EDGE_BITS: [u32; 11] = [18, 19, 20, 21, 22, 35, 36, 39, 40, 41, 42];

/// A value biased towards what the checks look at: the reserved control bits, the edges
/// of the reserved fields, and the counters' width (47 bits plus sign, bit 48).
fn value(rng: &mut Rng) -> u64 {
    let r = rng.next();
    let valid = r & !XEN_CTRL_RSVD_MASK;
    match rng.below(10) {
        // Anything: a reserved bit is set in all but 1 in 2^28.
        0 => r,
        // No reserved bit: a control Xen accepts (enabled half the time).
        1 | 2 => valid,
        // Exactly one reserved bit on an acceptable control.
        3 | 4 => valid | 1 << reserved_bit(rng),
        // An acceptable control with a bit at a field's edge flipped.
        5 => valid ^ 1 << EDGE_BITS[rng.below(EDGE_BITS.len())],
        // A 47-bit value with bit 47 and/or bit 48 set or not.
        6 => (r & ((1 << 47) - 1)) | [0, 1 << 47, 1 << 48, 3 << 47][rng.below(4)],
        // Sign-extended from bit 47, as a counter's `-left` is.
        7 => ((r << 16) as i64 >> 16) as u64,
        // Edges: 0, all ones, one bit, a low mask, all but one bit.
        _ => {
            let k = rng.below(64) as u32;
            match rng.below(5) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << k,
                3 => (1 << k) - 1,
                _ => !(1 << k),
            }
        }
    }
}

/// One case: a write of `value` to `kind`'s MSR `n`, then a read back.
#[derive(Clone, Copy, Debug)]
struct Case {
    kind: Kind,
    n: usize,
    value: u64,
}

impl Case {
    /// Case number `index` of the stream.
    fn next(rng: &mut Rng, index: usize) -> Case {
        let kind = Kind::ALL[index % Kind::ALL.len()];
        let n = rng.below(kind.count());
        Case {
            kind,
            n,
            value: value(rng),
        }
    }

    fn msr(self) -> u32 {
        self.kind.msr(self.n)
    }

    /// Whether Xen accepts the write, by its rule with `ctrl_rsvd[n] = 0`.
    fn xen_rule_accepts(self) -> bool {
        !self.kind.is_ctrl() || self.value & XEN_CTRL_RSVD_MASK == 0
    }
}

/// The model of Xen's AMD context: what `context_update` leaves.
#[derive(Clone, Copy, Debug, Default)]
struct Context {
    ctrls: [u64; COUNTERS],
    counters: [u64; COUNTERS],
}

impl Context {
    fn slot(&mut self, kind: Kind, n: usize) -> &mut u64 {
        if kind.is_ctrl() {
            &mut self.ctrls[n]
        } else {
            &mut self.counters[n]
        }
    }
}

/// Per-kind tallies.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    cases: u32,
    refused: u32,
}

/// Whether a `raw` exception info is `#GP`.
fn is_gp(info: u64) -> bool {
    (info >> 16) & 0xff == 13
}

/// The trapped half of a case: Xen's verdict on the write, and the read back.
fn trapped(case: Case) -> Result<bool, Failure> {
    let msr = case.msr();
    // SAFETY: a PMU MSR of this vCPU's virtual PMU: Xen's vPMU applies the write to its
    // context (and to the hardware, where QEMU keeps nothing); LVTPC is masked, so an
    // enabled counter raises no PMI.
    let accepted = match unsafe { raw::wrmsr(msr, case.value) } {
        Ok(()) => true,
        Err(info) if is_gp(info) => false,
        Err(info) => fail!(
            "trapped wrmsr {msr:#x} <- {:#x}: exception {info:#x}",
            case.value
        ),
    };
    check!(
        accepted == case.xen_rule_accepts(),
        "trapped wrmsr {msr:#x} <- {:#x}: accepted {accepted}, but Xen's rule with \
         ctrl_rsvd = 0 says {}",
        case.value,
        case.xen_rule_accepts()
    );
    check_eq!(
        raw::rdmsr(msr),
        Ok(0),
        format_args!(
            "trapped read-back of {msr:#x} after writing {:#x} (QEMU TCG was found to keep nothing)",
            case.value
        )
    );
    Ok(accepted)
}

/// The cached half of a case, inside `on_pmi` with `PMU_CACHED`: the library's verdict
/// must be Xen's, and the page must then hold what Xen's context holds.
fn cached(case: Case, xen_accepted: bool, ctx: &mut Context) -> Result<bool, Failure> {
    let msr = case.msr();
    // SAFETY: inside on_pmi with PMU_CACHED set: the library writes the page only.
    let accepted = match unsafe { xenmsr::wrmsr_safe(msr, case.value) } {
        Ok(()) => true,
        Err(MsrError::Fault { vector: 13 }) => false,
        Err(e) => fail!("cached wrmsr {msr:#x} <- {:#x}: {e:?}", case.value),
    };
    check!(
        accepted == xen_accepted,
        "DIFFERENCE {} {} (msr {msr:#x}) <- {:#x}: trapped Xen {}, cached path {}",
        case.kind.name(),
        case.n,
        case.value,
        if xen_accepted { "accepts" } else { "#GP" },
        if accepted { "accepts" } else { "#GP" }
    );
    if accepted {
        *ctx.slot(case.kind, case.n) = case.value;
    }
    let expected = *ctx.slot(case.kind, case.n);
    for read in core::iter::once(msr).chain(case.kind.alias(case.n)) {
        // SAFETY: inside on_pmi with PMU_CACHED set: the read comes from the page.
        let got = unsafe { xenmsr::rdmsr_safe(read) };
        check_eq!(
            got,
            Ok(expected),
            format_args!(
                "cached read of {read:#x} after {} {} <- {:#x}",
                case.kind.name(),
                case.n,
                case.value
            )
        );
    }
    Ok(accepted)
}

/// After a batch: every MSR, every RDPMC and the page's banks hold the model's values.
fn check_context(ctx: &Context, banks: Banks) -> TestResult {
    for n in 0..COUNTERS {
        for (kind, want) in [(Kind::Ctl, ctx.ctrls[n]), (Kind::Ctr, ctx.counters[n])] {
            let msrs = core::iter::once(kind.msr(n)).chain(kind.alias(n));
            for msr in msrs {
                // SAFETY: inside on_pmi with PMU_CACHED set: the read comes from the page.
                let got = unsafe { xenmsr::rdmsr_safe(msr) };
                check_eq!(
                    got,
                    Ok(want),
                    format_args!("cached read of {msr:#x} after a batch")
                );
            }
        }
        check_eq!(
            read_page(banks.ctrl(n)),
            ctx.ctrls[n],
            format_args!("page ctrls[{n}], where Xen's flush reads it")
        );
        check_eq!(
            read_page(banks.counter(n)),
            ctx.counters[n],
            format_args!("page counters[{n}], where Xen's flush reads it")
        );
        // SAFETY: RDPMC emulation inside on_pmi reads the page.
        let pmc = unsafe { xenmsr::rdpmc_safe(n as u32) };
        check_eq!(pmc, Ok(ctx.counters[n]), format_args!("cached rdpmc({n})"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// The flush is a real check of the cached context, on this Xen, exactly while its vPMU
/// runs: a control with a reserved bit set passes the flush while no counter is enabled
/// (Xen's `vpmu_load` loads nothing then), is refused (`-EIO`, `PMU_CACHED` set again,
/// the library's accesses `PmuUnavailable`) once one is, and `recover` repairs it.
fn xen_flush_checks_a_running_context() -> TestResult {
    with_vpmu("xen_flush_checks_a_running_context", |vcpu, banks| {
        // Upcalls stay masked throughout: while Xen refuses the context the library
        // fails this vCPU's PMU accesses, and the timer handler reads a counter.
        let masked = events::mask();
        let r = flush_check(vcpu, banks);
        if r.is_err() {
            let _ = settle(vcpu);
        }
        drop(masked);
        r
    })
}

/// The body of [`xen_flush_checks_a_running_context`], with upcalls masked.
fn flush_check(vcpu: u32, banks: Banks) -> TestResult {
    {
        let bad = 1 << 19;
        let slot = banks.ctrl(COUNTERS - 1);
        let idle = pmu::on_pmi(|_| {
            let old = enter_cached();
            // What the library never writes: the page as a buggy handler could leave it.
            write_page(slot, bad);
            leave_cached(old);
        });
        check_eq!(
            idle,
            Ok(()),
            "flush of a context with a reserved bit set while no counter runs"
        );
        run_xen_vpmu()?;
        let running = pmu::on_pmi(|_| leave_cached(enter_cached()));
        check_eq!(
            running,
            Err(PmuError::FlushRejected),
            "flush of the same context while a counter runs"
        );
        let flags = PmuFlags::from_bits_retain(read_page(PMU_FLAGS_OFFSET));
        check!(
            flags.contains(PmuFlags::CACHED),
            "Xen left PMU_CACHED clear after refusing the context: {flags:?}"
        );
        // SAFETY: reading a PMU control has no side effect.
        let refused = unsafe { xenmsr::rdmsr_safe(F15H_CTL0) };
        check_eq!(
            refused,
            Err(MsrError::PmuUnavailable),
            "library read while Xen refuses the context"
        );
        check_eq!(pmu::recover(), Ok(1), "pmu::recover (one control repaired)");
        check_eq!(read_page(slot), 0, "the repaired control");
        let flags = PmuFlags::from_bits_retain(read_page(PMU_FLAGS_OFFSET));
        check!(
            !flags.contains(PmuFlags::CACHED),
            "PMU_CACHED still set after Xen accepted the repaired context: {flags:?}"
        );
        crate::println!(
            "pmu-diff: v{vcpu} flush check: CTL5 = {bad:#x} passes the flush while no counter \
             runs, is refused (FlushRejected) while CTL0.EN runs, recover() repairs 1 control"
        );
        Ok(())
    }
}

/// The differential test proper; see the module documentation.
fn cached_path_matches_trapped_path() -> TestResult {
    with_vpmu("cached_path_matches_trapped_path", |vcpu, banks| {
        let start = events::now_ns();
        // The page is zeroed before XENPMU_init and Xen writes only the bank offsets:
        // the model's starting point, like Xen's fresh context (ctrl_rsvd = 0 under TCG).
        let mut ctx = Context::default();
        for n in 0..COUNTERS {
            check_eq!(read_page(banks.ctrl(n)), 0, "fresh page ctrls[n]");
            check_eq!(read_page(banks.counter(n)), 0, "fresh page counters[n]");
        }
        let mut rng = Rng(SEED.wrapping_add(u64::from(vcpu)));
        let mut tally = [Tally::default(); 4];
        let total = CASES_PER_KIND * Kind::ALL.len();
        let mut batches = 0u32;
        let mut done = 0;
        while done < total {
            let len = BATCH.min(total - done);
            let replay = rng;
            let mut verdicts = [false; BATCH];
            for (i, verdict) in verdicts.iter_mut().enumerate().take(len) {
                *verdict = trapped(Case::next(&mut rng, done + i))?;
            }
            run_xen_vpmu()?;
            let masked = events::mask();
            let mut rng = replay;
            // The handler's verdict is kept here rather than returned: `on_pmi` drops the
            // handler's result when the flush fails, and a difference found by the
            // handler usually makes the flush fail too.
            let mut handled: TestResult = Ok(());
            let flushed = pmu::on_pmi(|_| {
                let old = enter_cached();
                for (i, &verdict) in verdicts.iter().enumerate().take(len) {
                    let case = Case::next(&mut rng, done + i);
                    match cached(case, verdict, &mut ctx) {
                        Ok(accepted) => {
                            let t = &mut tally[case.kind as usize];
                            t.cases += 1;
                            t.refused += u32::from(!accepted);
                        }
                        Err(e) => {
                            handled = Err(e);
                            break;
                        }
                    }
                }
                if handled.is_ok() {
                    handled = check_context(&ctx, banks);
                }
                leave_cached(old);
            });
            let settled = matches!(flushed, Err(PmuError::FlushRejected)).then(|| settle(vcpu));
            drop(masked);
            handled?;
            if let Err(e) = flushed {
                fail!(
                    "DIFFERENCE: Xen's flush refused the cached context after cases \
                     {done}..{} ({e}; recover: {settled:?})",
                    done + len
                );
            }
            batches += 1;
            done += len;
        }
        let ms = (events::now_ns() - start) / 1_000_000;
        let [ctl, ctr, k7e, k7p] = tally;
        crate::println!(
            "pmu-diff: v{vcpu} ctl={} ({} #GP) ctr={} ({} #GP) k7evntsel={} ({} #GP) \
             k7perfctr={} ({} #GP); trapped read-back 0 for all (TCG keeps no PMU MSR); \
             {batches} flushes accepted; seed {:#x}; {ms} ms guest time",
            ctl.cases,
            ctl.refused,
            ctr.cases,
            ctr.refused,
            k7e.cases,
            k7e.refused,
            k7p.cases,
            k7p.refused,
            SEED.wrapping_add(u64::from(vcpu)),
        );
        for (kind, t) in Kind::ALL.iter().zip(tally) {
            check!(
                t.cases as usize >= CASES_PER_KIND,
                "only {} {} cases",
                t.cases,
                kind.name()
            );
        }
        Ok(())
    })
}

/// MSRs inside the library's AMD PMU ranges without a slot in the page (one past the
/// K7 counters the family-15h layout mirrors, one past the last F15h counter) are passed
/// through inside a PMI too: the same outcome as the bare instruction.
fn unserved_pmu_msrs_pass_through_in_a_pmi() -> TestResult {
    with_vpmu("unserved_pmu_msrs_pass_through_in_a_pmi", |_, _| {
        let mut bare = [(Ok(0), Ok(())); UNSERVED.len()];
        for (msr, out) in UNSERVED.iter().zip(bare.iter_mut()) {
            let read = raw::rdmsr(*msr).map_err(is_gp);
            // SAFETY: no PMU slot, no MSR Xen lets a PV guest write: refused or harmless.
            let written = unsafe { raw::wrmsr(*msr, 0) };
            *out = (read, written.map_err(is_gp));
        }
        let masked = events::mask();
        let inside = pmu::on_pmi(|_| {
            let old = enter_cached();
            let mut lib = [(Ok(0), Ok(())); UNSERVED.len()];
            for (msr, out) in UNSERVED.iter().zip(lib.iter_mut()) {
                let gp = |e| e == MsrError::Fault { vector: 13 };
                // SAFETY: reading an MSR Xen refuses or emulates has no side effect.
                let read = unsafe { xenmsr::rdmsr_safe(*msr) };
                // SAFETY: as in the bare write above; inside on_pmi the library passes
                // these MSRs through.
                let written = unsafe { xenmsr::wrmsr_safe(*msr, 0) };
                *out = (read.map_err(gp), written.map_err(gp));
            }
            leave_cached(old);
            lib
        });
        drop(masked);
        match inside {
            Ok(lib) => check_eq!(lib, bare, "library inside on_pmi vs bare (Err(true) = #GP)"),
            Err(e) => fail!("on_pmi: {e:?}"),
        }
        Ok(())
    })
}
