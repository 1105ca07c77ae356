//! The scenarios: each sets itself up, checks one warm-up call of its operation, runs the
//! operation `n` times inside the measured region, and checks afterwards that every one of
//! the `n` calls took the intended path (for the mock-page scenarios: `n` recorded
//! hypercalls).
//!
//! One scenario runs per process, so each registers its own stub backend
//! ([`set_backend`]: first registration wins).

use std::alloc::{Layout, alloc_zeroed};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::OnceLock;

use xenmsr::pmu::{DEFAULT_SLOTS, IntelLayout, NativeMsr, PAGE_SIZE, PmuLayout, Vpmu, VpmuConfig};
use xenmsr::policy::XenPvPolicy;
use xenmsr::routes::{MSR_APIC_BASE, MSR_LSTAR, fix_apic_base};
use xenmsr::{rdmsr, rdmsr_safe, wrmsr, wrmsr_safe};
use xenmsr_asm::backend::{set_backend, xenmsr_handle_read, xenmsr_handle_write};
use xenmsr_asm::extable::{self, Data, ExtableEntry, Kind};
use xenmsr_asm::stubs::{set_segbase_hypercall_page, xenmsr_stub_segbase_fs};
use xenmsr_asm::{MsrBackend, MsrError, Outcome};
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags, SegmentBase};
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::{HypercallPage, nr};

use crate::{measure, measure_with};

/// `IA32_FS_BASE`.
pub const MSR_FS_BASE: u32 = 0xc000_0100;
/// `IA32_TIME_STAMP_COUNTER`: no row in the routing table, not a PMU MSR: pass-through.
pub const MSR_TSC: u32 = 0x10;
/// `IA32_PMC0`: a PMU MSR of the Intel layout used here.
pub const MSR_PMC0: u32 = 0xc1;
/// Any MSR index, for the trivial backend (which answers every index the same way).
pub const MSR_ANY: u32 = 0x8b;

/// What the fake native reader returns: an APIC base with x2APIC enabled and BSP set, so
/// that the policy's fix-up has bits to change.
pub const APIC_RAW: u64 = 0xfee0_0000 | 1 << 11 | 1 << 10 | 1 << 8;
/// The cached value of `IA32_PMC0` in the PMU page of the `pmu_cached` scenarios.
pub const PMC0_CACHED: u64 = 0x1234_5678_9abc;

/// One scenario.
#[derive(Debug)]
pub struct Scenario {
    /// The name `run` takes.
    pub name: &'static str,
    /// One line for the table.
    pub about: &'static str,
    /// Sets up and runs the operation `n` times in the measured region.
    pub run: fn(u64),
}

macro_rules! scenarios {
    ($($name:literal => $run:ident: $about:literal,)*) => {
        /// Every scenario.
        pub const ALL: &[Scenario] = &[$(Scenario { name: $name, about: $about, run: $run },)*];
    };
}

scenarios! {
    "loop" => run_loop_only: "the measuring loop alone (subtracted from every other count)",
    "hc/direct" => hc_direct: "direct `page.set_segment_base(FS, v)` on the mock page",
    "fs_write/stub" => fs_write_stub: "`wrmsr_safe(FS_BASE, v)`, run-time index: site -> write stub's segment-base path -> mock `set_segment_base` entry (no Rust)",
    "fs_write/stub_unchecked" => fs_write_stub_unchecked: "`wrmsr(FS_BASE, v)`: as above, unchecked site",
    "fs_write/const_stub" => fs_write_const_stub: "constant-index FS_BASE write site as patched on Xen PV: `call xenmsr_stub_segbase_fs` -> mock `set_segment_base` entry",
    "fs_write/stub_via_policy" => fs_write_stub_via_policy: "`wrmsr_safe(FS_BASE, v)` before `init` stored the page entry: site -> write stub -> XenPvPolicy -> mock hypercall",
    "fs_write/policy" => fs_write_policy: "`policy.decide_write(FS_BASE, v)` (one non-inlined call)",
    "fs_write/work" => fs_write_work: "the segment-base handler's work alone: the hypercall (one non-inlined call)",
    "fs_write/pvops" => fs_write_pvops: "C-ABI `OPS.write_msr(FS_BASE, v)` -> same policy",
    "apic_read/work" => apic_read_work: "the APIC-base handler's work alone: fake native read + `fix_apic_base` (one non-inlined call)",
    "apic_read/stub" => apic_read_stub: "`rdmsr_safe(APIC_BASE)`: site -> stub -> XenPvPolicy (fake native reader)",
    "apic_read/policy" => apic_read_policy: "`policy.decide_read(APIC_BASE)` (one non-inlined call)",
    "apic_read/pvops" => apic_read_pvops: "C-ABI `OPS.read_msr(APIC_BASE, &err)` -> same policy",
    "lstar_write/policy" => lstar_write_policy: "`policy.decide_write(LSTAR, v)`: ignored (one non-inlined call)",
    "lstar_write/work" => lstar_write_work: "a handler with no work answering `Done` (one non-inlined call)",
    "tsc_read/policy" => tsc_read_policy: "`policy.decide_read(0x10)`: pass-through, `Native` (one non-inlined call)",
    "tsc_read/work" => tsc_read_work: "a handler with no work answering `Native` (one non-inlined call)",
    "classify/fs_base" => classify_fs_base: "`policy.class(FS_BASE)`: the routing decision alone, a segment-base row (one non-inlined call)",
    "classify/lstar" => classify_lstar: "`policy.class(LSTAR)`: an ignored row (one non-inlined call)",
    "classify/apic_base" => classify_apic_base: "`policy.class(APIC_BASE)`: the APIC-base row (one non-inlined call)",
    "classify/pmc0" => classify_pmc0: "`policy.class(PMC0)` with the vPMU layout: a PMU MSR (one non-inlined call)",
    "classify/tsc" => classify_tsc: "`policy.class(0x10)`: pass-through (one non-inlined call)",
    "routes/lookup_hit" => lookup_hit: "`routes::lookup(LSTAR)` alone: a row (one non-inlined call)",
    "routes/lookup_miss" => lookup_miss: "`routes::lookup(0x10)` alone: no row (one non-inlined call)",
    "pmu_read/work" => pmu_read_work: "`vpmu.read(PMC0)` alone, context not cached: `Native` (one non-inlined call)",
    "pmu_read/policy" => pmu_read_policy: "`policy.decide_read(PMC0)` with the vPMU, not cached: `Native` (one non-inlined call)",
    "pmu_cached_read/work" => pmu_cached_read_work: "`vpmu.read(PMC0)` alone, inside a PMI, context cached: the value (one non-inlined call)",
    "pmu_cached_read/policy" => pmu_cached_read_policy: "`policy.decide_read(PMC0)` inside a PMI, context cached: the value (one non-inlined call)",
    "pmu_cached_read/stub" => pmu_cached_read_stub: "`rdmsr_safe(PMC0)` through the stub inside a PMI, context cached",
    "trivial_write/direct" => trivial_write_direct: "`backend.write(msr, v)` on a trivial `&dyn MsrBackend`",
    "trivial_write/handler" => trivial_write_handler: "`xenmsr_handle_write(msr, lo, hi)` (the stub's C-ABI handler) called from Rust",
    "trivial_write/stub" => trivial_write_stub: "`wrmsr_safe(msr, v)` -> stub -> trivial backend",
    "trivial_write/stub_unchecked" => trivial_write_stub_unchecked: "`wrmsr(msr, v)` -> stub -> trivial backend",
    "trivial_write/pvops" => trivial_write_pvops: "C-ABI `OPS.write_msr(msr, v)` -> trivial backend",
    "trivial_read/direct" => trivial_read_direct: "`backend.read(msr)` on a trivial `&dyn MsrBackend`",
    "trivial_read/handler" => trivial_read_handler: "`xenmsr_handle_read(msr)` called from Rust",
    "trivial_read/stub" => trivial_read_stub: "`rdmsr_safe(msr)` -> stub -> trivial backend",
    "trivial_read/stub_unchecked" => trivial_read_stub_unchecked: "`rdmsr(msr)` -> stub -> trivial backend",
    "trivial_read/pvops" => trivial_read_pvops: "C-ABI `OPS.read_msr(msr, &err)` -> trivial backend",
    "extable/10" => extable_10: "`extable::search` in a sorted table of 10 entries",
    "extable/1000" => extable_1000: "`extable::search` in a sorted table of 1,000 entries",
    "extable/100000" => extable_100000: "`extable::search` in a sorted table of 100,000 entries",
}

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A native reader that answers without an instruction: [`APIC_RAW`] for any MSR.
#[derive(Clone, Copy, Debug)]
pub struct FakeNative;

impl NativeMsr for FakeNative {
    unsafe fn read_safe(&self, _msr: u32) -> Result<u64, MsrError> {
        Ok(APIC_RAW)
    }
}

/// The policy every policy scenario uses.
pub type Policy = XenPvPolicy<FakeNative>;

fn vcpu0() -> u32 {
    0
}

static POLICY: OnceLock<&'static Policy> = OnceLock::new();

/// Builds the policy over the mock page (with `pmu`), registers it as the stubs' backend
/// and for the pvops table, gives the segment-base stub paths the mock page's entry as
/// `init` does, and clears the mock's record.
fn install_policy(pmu: Option<&'static Vpmu>) -> &'static Policy {
    let policy = install_policy_without_segbase_entry(pmu);
    // SAFETY: a benchmark process over the mock page: nothing relies on a segment-base
    // write reaching a base (the mock only records the calls).
    unsafe { set_segbase_hypercall_page(mock::page()) };
    policy
}

/// [`install_policy`] without the segment-base entry: every FS_BASE write through the
/// write stub then enters the Rust policy (the state before `init` finishes).
fn install_policy_without_segbase_entry(pmu: Option<&'static Vpmu>) -> &'static Policy {
    let index = Box::leak(Box::new(xenmsr::dispatch::ClassIndex::new()));
    let policy: &'static Policy = Box::leak(Box::new(XenPvPolicy::new(
        mock::page(),
        vcpu0,
        FakeNative,
        pmu,
        index,
    )));
    // SAFETY: a benchmark process over the mock page: the policy's answers are only
    // counted and timed, nothing relies on an MSR's value.
    let registered = unsafe { set_backend(policy) };
    assert!(registered, "a backend was already registered");
    assert!(POLICY.set(policy).is_ok(), "the policy was already set");
    mock::reset();
    policy
}

/// Fixed-function counters of the benchmarks' Intel layout.
pub const BENCH_FIXED_COUNTERS: u8 = 3;

/// The benchmarks' vPMU: an Intel layout (4 general, [`BENCH_FIXED_COUNTERS`] fixed
/// counters, version 4) over the mock hypercall page, the fake native reader, the
/// library's default slots and the kernel's `vcpu_id` hook; leaked for the process.
pub fn intel_vpmu_over_mock(vcpu_id: fn() -> u32) -> &'static Vpmu {
    let layout = PmuLayout::Intel(IntelLayout {
        arch_counters: 4,
        fixed_counters: BENCH_FIXED_COUNTERS,
        version: 4,
        fixed_counter_width: 48,
        arch_counter_width: 48,
    });
    Box::leak(Box::new(Vpmu::with(VpmuConfig {
        hypercalls: mock::page(),
        layout,
        native: &FakeNative,
        vcpu_id,
        slots: &DEFAULT_SLOTS,
    })))
}

/// A backend that answers every access at once.
#[derive(Debug)]
pub struct Trivial;

impl MsrBackend for Trivial {
    unsafe fn read(&self, msr: u32) -> Outcome {
        Outcome::Done(u64::from(msr))
    }
    unsafe fn write(&self, _msr: u32, _value: u64) -> Outcome {
        Outcome::Done(0)
    }
    unsafe fn rdpmc(&self, counter: u32) -> Outcome {
        Outcome::Done(u64::from(counter))
    }
}

static TRIVIAL: Trivial = Trivial;

fn install_trivial() -> &'static dyn MsrBackend {
    // SAFETY: a benchmark process: the trivial answers are only counted and timed,
    // nothing relies on an MSR's value.
    let registered = unsafe { set_backend(&TRIVIAL) };
    assert!(registered, "a backend was already registered");
    &TRIVIAL
}

/// An Intel-layout vPMU over the mock page with a registered page for vCPU 0; with
/// `cached`, the page holds a context as Xen writes it at a PMI (`PMU_CACHED` set, fixed
/// bank at 64, general bank after it, `IA32_PMC0` = [`PMC0_CACHED`]).
fn install_vpmu(cached: bool) -> &'static Vpmu {
    const FIXED: usize = BENCH_FIXED_COUNTERS as usize;
    let vpmu = intel_vpmu_over_mock(vcpu0);
    let page_layout = Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).expect("a valid layout");
    // SAFETY: a non-zero-sized layout; the allocation is leaked (it stays the vCPU's page
    // for the rest of the process).
    let page = unsafe { alloc_zeroed(page_layout) };
    let page = NonNull::new(page).expect("allocation failed");
    // SAFETY: `page` is a live, 4 KiB-aligned, zeroed allocation of PAGE_SIZE bytes owned
    // by nobody else; it is never freed, and this process only writes it below, before
    // any access reads it. The MFN is only recorded by the mock page.
    unsafe { vpmu.init_vcpu(0, page, 0x1234) }.expect("XENPMU_init on the mock page");
    if cached {
        let fixed_off = 64u32;
        let arch_off = fixed_off + 8 * FIXED as u32;
        write_page(page, PMU_CTXT_OFFSET, &fixed_off.to_ne_bytes());
        write_page(page, PMU_CTXT_OFFSET + 4, &arch_off.to_ne_bytes());
        write_page(
            page,
            PMU_CTXT_OFFSET + arch_off as usize,
            &PMC0_CACHED.to_ne_bytes(),
        );
        let flags = (PmuFlags::CACHED | PmuFlags::SAMPLE_PV).bits();
        write_page(page, PMU_FLAGS_OFFSET, &flags.to_ne_bytes());
    }
    mock::reset();
    vpmu
}

/// Copies `bytes` to offset `off` of the PMU page `page` (a live, leaked allocation of
/// [`PAGE_SIZE`] bytes that no reference points into).
fn write_page(page: NonNull<u8>, off: usize, bytes: &[u8]) {
    assert!(off + bytes.len() <= PAGE_SIZE, "in bounds of the page");
    let dst = page.as_ptr().wrapping_add(off);
    // SAFETY: the destination range is inside the page (checked above), which is live for
    // the rest of the process and not borrowed; the source is a distinct local buffer.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
}

fn fs_call(v: u64) -> MockCall {
    MockCall::new(
        nr::SET_SEGMENT_BASE,
        [u64::from(SegmentBase::FS.0), v, 0, 0, 0],
    )
}

/// Checks that the mock page recorded exactly `n` `set_segment_base(FS, _)` calls since
/// the last check, the first with `first`.
fn expect_fs_calls(n: u64, first: u64) {
    let calls = mock::take_calls();
    assert_eq!(calls.len() as u64, n, "hypercalls recorded");
    if let Some(call) = calls.first() {
        assert_eq!(*call, fs_call(first));
    }
    assert!(calls.iter().all(|c| c.nr == nr::SET_SEGMENT_BASE));
}

/// Measures `op`, which must make one `set_segment_base(FS, i)` hypercall per operation
/// `i`: the calls are taken from the mock between batches and all checked.
fn measure_fs_calls(n: u64, op: impl FnMut(u64)) {
    let mut next = 0u64;
    measure_with(n, op, || {
        for call in mock::take_calls() {
            assert_eq!(call, fs_call(next), "hypercall of operation {next}");
            next += 1;
        }
    });
    assert_eq!(next, n, "hypercalls recorded");
}

fn expect_no_calls() {
    assert!(mock::take_calls().is_empty(), "unexpected hypercalls");
}

/// Runs `body` inside a PMI handler on `vpmu`, as a kernel's `VIRQ_XENPMU` handler does
/// (the cached context is used only there), then checks and takes the flush that ends
/// it. The flush is outside every measured region.
fn inside_pmi(vpmu: &Vpmu, body: impl FnOnce()) {
    vpmu.on_pmi(|_| body()).expect("on_pmi on the mock page");
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1, "one flush: {calls:?}");
    assert_eq!(
        (calls[0].nr, calls[0].args[0]),
        (nr::XENPMU_OP, u64::from(nr::XENPMU_FLUSH))
    );
}

// ---------------------------------------------------------------------------------------
// The pvops-style C-ABI table
// ---------------------------------------------------------------------------------------

/// An MSR ops table as a paravirt-ops kernel has it: C-ABI function pointers, called
/// indirectly.
#[repr(C)]
#[derive(Debug)]
pub struct PvMsrOps {
    /// `u64 read_msr(u32 msr, int *err)`.
    pub read_msr: extern "C" fn(u32, &mut i32) -> u64,
    /// `int write_msr(u32 msr, u64 value)`.
    pub write_msr: extern "C" fn(u32, u64) -> i32,
}

const EIO: i32 = 5;

fn errno_of(error: MsrError) -> i32 {
    match error {
        MsrError::Hypercall(errno) => -errno.0.abs(),
        _ => -EIO,
    }
}

macro_rules! pv_ops {
    ($ops:ident, $read:ident, $write:ident, $backend:expr) => {
        extern "C" fn $read(msr: u32, err: &mut i32) -> u64 {
            let outcome = match $backend {
                // SAFETY: every backend of this binary answers over the mock page or
                // trivially: no real MSR or segment base is touched.
                Some(backend) => unsafe { MsrBackend::read(backend, msr) },
                None => Outcome::Failed(MsrError::PmuUnavailable),
            };
            match outcome {
                Outcome::Done(value) => {
                    *err = 0;
                    value
                }
                // SAFETY: a pvops implementation executes the instruction itself when the
                // policy passes an access through. No scenario of this binary routes a
                // pvops read to `Native` (each checks its warm-up result first).
                Outcome::Native => match unsafe { xenmsr_asm::native::rdmsr_safe(msr) } {
                    Ok(value) => {
                        *err = 0;
                        value
                    }
                    Err(error) => {
                        *err = errno_of(error);
                        0
                    }
                },
                Outcome::Failed(error) => {
                    *err = errno_of(error);
                    0
                }
            }
        }

        extern "C" fn $write(msr: u32, value: u64) -> i32 {
            let outcome = match $backend {
                // SAFETY: as for the read.
                Some(backend) => unsafe { MsrBackend::write(backend, msr, value) },
                None => Outcome::Failed(MsrError::PmuUnavailable),
            };
            match outcome {
                Outcome::Done(_) => 0,
                // SAFETY: as for the read; no scenario routes a pvops write to `Native`.
                Outcome::Native => match unsafe { xenmsr_asm::native::wrmsr_safe(msr, value) } {
                    Ok(()) => 0,
                    Err(error) => errno_of(error),
                },
                Outcome::Failed(error) => errno_of(error),
            }
        }

        /// The ops table over this backend.
        pub static $ops: PvMsrOps = PvMsrOps {
            read_msr: $read,
            write_msr: $write,
        };
    };
}

pv_ops!(
    PV_POLICY,
    pv_policy_read,
    pv_policy_write,
    POLICY.get().copied()
);
pv_ops!(
    PV_TRIVIAL,
    pv_trivial_read,
    pv_trivial_write,
    Some(&TRIVIAL)
);

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

fn run_loop_only(n: u64) {
    measure(n, |i| {
        black_box(i);
    });
}

fn hc_direct(n: u64) {
    let page: HypercallPage = mock::page();
    let op = |v: u64| {
        // SAFETY: the mock page only records the call.
        let r = unsafe { black_box(page).set_segment_base(black_box(SegmentBase::FS), v) };
        black_box(r).unwrap();
    };
    mock::reset();
    op(7);
    expect_fs_calls(1, 7);
    measure_fs_calls(n, op);
}

/// Runs a write scenario that must reach `set_segment_base(FS, v)` once per operation.
fn fs_scenario(n: u64, op: impl FnMut(u64) + Copy) {
    let mut warm = op;
    warm(7);
    expect_fs_calls(1, 7);
    measure_fs_calls(n, op);
}

fn fs_write_stub(n: u64) {
    install_policy(None);
    fs_scenario(n, |v| {
        // SAFETY: the stub's backend is the policy over the mock page: the "write" is a
        // recorded mock hypercall and changes no CPU state.
        let r = unsafe { wrmsr_safe(black_box(MSR_FS_BASE), v) };
        black_box(r).unwrap();
    });
}

fn fs_write_stub_unchecked(n: u64) {
    install_policy(None);
    fs_scenario(n, |v| {
        // SAFETY: as in `fs_write_stub`.
        unsafe { wrmsr(black_box(MSR_FS_BASE), v) };
    });
}

fn fs_write_const_stub(n: u64) {
    install_policy(None);
    fs_scenario(n, |v| {
        // SAFETY: what a patched constant-index FS_BASE site executes: the segment-base
        // stub takes the value in rax and preserves every register but the flags (see
        // `segbase.S`); the stack is 16-byte aligned (no `nostack`). Its page entry is the
        // mock's, so the write is a recorded mock hypercall. The mock answers 0, so the
        // stub's error exit (a ud2 that needs the site's extable entry) is not taken; were
        // it taken, the process would die with SIGILL and the run would fail loudly.
        unsafe {
            core::arch::asm!(
                "call {stub}",
                stub = sym xenmsr_stub_segbase_fs,
                in("rax") black_box(v),
            );
        }
    });
}

fn fs_write_stub_via_policy(n: u64) {
    install_policy_without_segbase_entry(None);
    fs_scenario(n, |v| {
        // SAFETY: as in `fs_write_stub`.
        let r = unsafe { wrmsr_safe(black_box(MSR_FS_BASE), v) };
        black_box(r).unwrap();
    });
}

fn fs_write_pvops(n: u64) {
    install_policy(None);
    fs_scenario(n, |v| {
        let ops = black_box(&PV_POLICY);
        let r = (ops.write_msr)(black_box(MSR_FS_BASE), v);
        assert_eq!(black_box(r), 0);
    });
}

fn apic_expected() -> u64 {
    fix_apic_base(APIC_RAW, 0)
}

/// Runs a read scenario whose every operation must give `expected` and make no hypercall.
fn read_scenario(n: u64, expected: u64, op: impl Fn(u64) -> u64 + Copy) {
    assert_eq!(op(0), expected, "warm-up result");
    expect_no_calls();
    measure(n, |i| {
        black_box(op(i));
    });
    expect_no_calls();
}

fn apic_read_stub(n: u64) {
    install_policy(None);
    read_scenario(n, apic_expected(), |_| {
        // SAFETY: the stub's backend is the policy with a fake native reader: no MSR is
        // read.
        unsafe { rdmsr_safe(black_box(MSR_APIC_BASE)) }.unwrap_or(0)
    });
}

fn apic_read_pvops(n: u64) {
    install_policy(None);
    read_scenario(n, apic_expected(), |_| {
        let ops = black_box(&PV_POLICY);
        let mut err = 0;
        let value = (ops.read_msr)(black_box(MSR_APIC_BASE), &mut err);
        if err == 0 { value } else { 0 }
    });
}

// The policy scenarios and the "work alone" scenarios call one non-inlined step through a
// `black_box`ed function pointer, so both sides of each comparison pay the same call and
// the same argument and result handling: the difference is the routing.

/// What the steps work with.
pub struct Ctx {
    policy: &'static Policy,
    page: HypercallPage,
    native: FakeNative,
    vcpu: fn() -> u32,
    vpmu: Option<&'static Vpmu>,
}

/// One measured step: `(context, msr, value) -> outcome`.
type Step = fn(&Ctx, u32, u64) -> Outcome;

#[inline(never)]
fn step_decide_read(c: &Ctx, msr: u32, _value: u64) -> Outcome {
    // SAFETY: the policy runs over the mock page and a fake native reader: no real MSR or
    // segment base is touched.
    unsafe { c.policy.decide_read(msr) }
}

#[inline(never)]
fn step_decide_write(c: &Ctx, msr: u32, value: u64) -> Outcome {
    // SAFETY: as in `step_decide_read`.
    unsafe { c.policy.decide_write(msr, value) }
}

/// The segment-base handler's work: the hypercall.
#[inline(never)]
fn step_work_fs(c: &Ctx, _msr: u32, value: u64) -> Outcome {
    // SAFETY: the mock page only records the call.
    match unsafe { c.page.set_segment_base(SegmentBase::FS, value) } {
        Ok(()) => Outcome::Done(0),
        Err(errno) => Outcome::Failed(MsrError::Hypercall(errno)),
    }
}

/// The APIC-base handler's work: the native read and the fix-up.
#[inline(never)]
fn step_work_apic(c: &Ctx, msr: u32, _value: u64) -> Outcome {
    // SAFETY: the fake native reader executes no instruction.
    match unsafe { NativeMsr::read_safe(&c.native, msr) } {
        Ok(raw) => Outcome::Done(fix_apic_base(raw, (c.vcpu)())),
        Err(error) => Outcome::Failed(error),
    }
}

/// The PMU handler's work: the vPMU access (classification, cached-context check, slot).
#[inline(never)]
fn step_work_pmu(c: &Ctx, msr: u32, _value: u64) -> Outcome {
    match c.vpmu {
        Some(vpmu) => vpmu.read(msr).unwrap_or(Outcome::Native),
        None => Outcome::Native,
    }
}

/// The work of a class that has none and answers "done".
#[inline(never)]
fn step_done(_c: &Ctx, _msr: u32, _value: u64) -> Outcome {
    Outcome::Done(0)
}

/// The work of a class that has none and answers "native".
#[inline(never)]
fn step_native(_c: &Ctx, _msr: u32, _value: u64) -> Outcome {
    Outcome::Native
}

/// The routing step alone: the table lookup.
#[inline(never)]
fn step_lookup(_c: &Ctx, msr: u32, _value: u64) -> Outcome {
    match xenmsr::routes::lookup(msr) {
        Some(route) => Outcome::Done(u64::from(route.msr)),
        None => Outcome::Native,
    }
}

/// What a step scenario needs.
struct StepSpec {
    step: Step,
    msr: u32,
    expected: Outcome,
    /// `None`: no vPMU; `Some(cached)`: a vPMU whose vCPU-0 page is (not) cached.
    vpmu: Option<bool>,
    /// Whether every operation makes one `set_segment_base(FS, v)` hypercall.
    fs_calls: bool,
}

fn step_scenario(n: u64, spec: StepSpec) {
    let vpmu = spec.vpmu.map(install_vpmu);
    let policy = install_policy(vpmu);
    let ctx = Ctx {
        policy,
        page: mock::page(),
        native: FakeNative,
        vcpu: vcpu0,
        vpmu,
    };
    let (step, msr) = (spec.step, spec.msr);
    let op = |v: u64| {
        let outcome = black_box(step)(black_box(&ctx), black_box(msr), v);
        black_box(outcome);
    };
    let run = || {
        assert_eq!(step(&ctx, msr, 7), spec.expected, "warm-up outcome");
        if spec.fs_calls {
            expect_fs_calls(1, 7);
            measure_fs_calls(n, op);
        } else {
            expect_no_calls();
            measure(n, op);
            expect_no_calls();
        }
    };
    match (vpmu, spec.vpmu) {
        (Some(vpmu), Some(true)) => inside_pmi(vpmu, run),
        _ => run(),
    }
}

fn spec(step: Step, msr: u32, expected: Outcome) -> StepSpec {
    StepSpec {
        step,
        msr,
        expected,
        vpmu: None,
        fs_calls: false,
    }
}

fn fs_write_policy(n: u64) {
    step_scenario(
        n,
        StepSpec {
            fs_calls: true,
            ..spec(step_decide_write, MSR_FS_BASE, Outcome::Done(0))
        },
    );
}

fn fs_write_work(n: u64) {
    step_scenario(
        n,
        StepSpec {
            fs_calls: true,
            ..spec(step_work_fs, MSR_FS_BASE, Outcome::Done(0))
        },
    );
}

fn apic_read_policy(n: u64) {
    let done = Outcome::Done(apic_expected());
    step_scenario(n, spec(step_decide_read, MSR_APIC_BASE, done));
}

fn apic_read_work(n: u64) {
    let done = Outcome::Done(apic_expected());
    step_scenario(n, spec(step_work_apic, MSR_APIC_BASE, done));
}

fn lstar_write_policy(n: u64) {
    step_scenario(n, spec(step_decide_write, MSR_LSTAR, Outcome::Done(0)));
}

fn lstar_write_work(n: u64) {
    step_scenario(n, spec(step_done, MSR_LSTAR, Outcome::Done(0)));
}

fn tsc_read_policy(n: u64) {
    step_scenario(n, spec(step_decide_read, MSR_TSC, Outcome::Native));
}

fn tsc_read_work(n: u64) {
    step_scenario(n, spec(step_native, MSR_TSC, Outcome::Native));
}

fn pmu_spec(step: Step, cached: bool) -> StepSpec {
    let expected = if cached {
        Outcome::Done(PMC0_CACHED)
    } else {
        Outcome::Native
    };
    StepSpec {
        vpmu: Some(cached),
        ..spec(step, MSR_PMC0, expected)
    }
}

fn pmu_read_work(n: u64) {
    step_scenario(n, pmu_spec(step_work_pmu, false));
}

fn pmu_read_policy(n: u64) {
    step_scenario(n, pmu_spec(step_decide_read, false));
}

fn pmu_cached_read_work(n: u64) {
    step_scenario(n, pmu_spec(step_work_pmu, true));
}

fn pmu_cached_read_policy(n: u64) {
    step_scenario(n, pmu_spec(step_decide_read, true));
}

/// The routing decision alone: the class, folded into an outcome the harness can check
/// (`Done(discriminant)`).
#[inline(never)]
fn step_classify(c: &Ctx, msr: u32, _value: u64) -> Outcome {
    Outcome::Done(match c.policy.class(msr) {
        xenmsr::dispatch::Class::Native => 0,
        xenmsr::dispatch::Class::Route { .. } => 1,
        xenmsr::dispatch::Class::Pmu(_) => 2,
    })
}

fn classify_fs_base(n: u64) {
    step_scenario(n, spec(step_classify, MSR_FS_BASE, Outcome::Done(1)));
}

fn classify_lstar(n: u64) {
    step_scenario(n, spec(step_classify, MSR_LSTAR, Outcome::Done(1)));
}

fn classify_apic_base(n: u64) {
    step_scenario(n, spec(step_classify, MSR_APIC_BASE, Outcome::Done(1)));
}

fn classify_pmc0(n: u64) {
    step_scenario(
        n,
        StepSpec {
            vpmu: Some(false),
            ..spec(step_classify, MSR_PMC0, Outcome::Done(2))
        },
    );
}

fn classify_tsc(n: u64) {
    step_scenario(n, spec(step_classify, MSR_TSC, Outcome::Done(0)));
}

fn lookup_hit(n: u64) {
    let hit = Outcome::Done(u64::from(MSR_LSTAR));
    step_scenario(n, spec(step_lookup, MSR_LSTAR, hit));
}

fn lookup_miss(n: u64) {
    step_scenario(n, spec(step_lookup, MSR_TSC, Outcome::Native));
}

fn pmu_cached_read_stub(n: u64) {
    let vpmu = install_vpmu(true);
    install_policy(Some(vpmu));
    inside_pmi(vpmu, || {
        read_scenario(n, PMC0_CACHED, |_| {
            // SAFETY: inside the PMI the backend serves PMC0 from the cached context in a
            // heap page: no MSR is read.
            unsafe { rdmsr_safe(black_box(MSR_PMC0)) }.unwrap_or(0)
        })
    });
}

fn trivial_write(n: u64, op: impl Fn(u64) -> bool + Copy) {
    install_trivial();
    assert!(op(1), "warm-up result");
    measure(n, |v| {
        black_box(op(v));
    });
}

fn trivial_write_direct(n: u64) {
    let backend = install_trivial();
    // SAFETY: the trivial backend writes nothing.
    let op =
        |v: u64| unsafe { black_box(backend).write(black_box(MSR_ANY), v) } == Outcome::Done(0);
    assert!(op(1), "warm-up result");
    measure(n, |v| {
        black_box(op(v));
    });
}

fn trivial_write_handler(n: u64) {
    trivial_write(n, |v| {
        // SAFETY: the registered backend is the trivial one, which writes nothing.
        let raw = unsafe { xenmsr_handle_write(black_box(MSR_ANY), v as u32, (v >> 32) as u32) };
        black_box(raw).status == xenmsr_asm::backend::STATUS_DONE
    });
}

fn trivial_write_stub(n: u64) {
    trivial_write(n, |v| {
        // SAFETY: the stub's backend is the trivial backend: nothing is written.
        unsafe { wrmsr_safe(black_box(MSR_ANY), v) }.is_ok()
    });
}

fn trivial_write_stub_unchecked(n: u64) {
    trivial_write(n, |v| {
        // SAFETY: as in `trivial_write_stub`.
        unsafe { wrmsr(black_box(MSR_ANY), v) };
        true
    });
}

fn trivial_write_pvops(n: u64) {
    trivial_write(n, |v| {
        let ops = black_box(&PV_TRIVIAL);
        (ops.write_msr)(black_box(MSR_ANY), v) == 0
    });
}

fn trivial_read(n: u64, op: impl Fn() -> u64 + Copy) {
    install_trivial();
    assert_eq!(op(), u64::from(MSR_ANY), "warm-up result");
    measure(n, |_| {
        black_box(op());
    });
}

fn trivial_read_direct(n: u64) {
    let backend = install_trivial();
    // SAFETY: the trivial backend reads nothing.
    let op = || match unsafe { black_box(backend).read(black_box(MSR_ANY)) } {
        Outcome::Done(value) => value,
        _ => 0,
    };
    assert_eq!(op(), u64::from(MSR_ANY), "warm-up result");
    measure(n, |_| {
        black_box(op());
    });
}

fn trivial_read_handler(n: u64) {
    trivial_read(n, || {
        // SAFETY: the registered backend is the trivial one, which reads nothing.
        let raw = black_box(unsafe { xenmsr_handle_read(black_box(MSR_ANY)) });
        if raw.status == xenmsr_asm::backend::STATUS_DONE {
            raw.value
        } else {
            0
        }
    });
}

fn trivial_read_stub(n: u64) {
    trivial_read(n, || {
        // SAFETY: the stub's backend is the trivial backend: no MSR is read.
        unsafe { rdmsr_safe(black_box(MSR_ANY)) }.unwrap_or(0)
    });
}

fn trivial_read_stub_unchecked(n: u64) {
    trivial_read(n, || {
        // SAFETY: as in `trivial_read_stub`.
        unsafe { rdmsr(black_box(MSR_ANY)) }
    });
}

fn trivial_read_pvops(n: u64) {
    trivial_read(n, || {
        let ops = black_box(&PV_TRIVIAL);
        let mut err = 0;
        let value = (ops.read_msr)(black_box(MSR_ANY), &mut err);
        if err == 0 { value } else { 0 }
    });
}

/// The number of lookup addresses each extable scenario cycles through (a power of two).
const PROBES: usize = 4096;

/// A sorted synthetic table of `len` entries, instructions 16 bytes apart, and
/// [`PROBES`] addresses of its entries in a pseudo-random order.
fn synthetic_extable(len: usize) -> (Vec<ExtableEntry>, Vec<usize>) {
    let mut table: Vec<ExtableEntry> = (0..len)
        .map(|_| ExtableEntry::unplaced(Data::site(Kind::ReadSafe, 0)))
        .collect();
    // Targets a little above the table: within the ±2 GiB the 32-bit offsets reach.
    let base = (table.as_ptr() as usize + 16 * len + (1 << 20)) & !0xf;
    for (k, entry) in table.iter_mut().enumerate() {
        let insn = base + 16 * k;
        entry.set_targets(insn, insn + 5).expect("targets in range");
    }
    assert!(extable::is_sorted(&table));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let probes = (0..PROBES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            base + 16 * (state % len as u64) as usize
        })
        .collect();
    (table, probes)
}

fn extable_scenario(n: u64, len: usize) {
    let (table, probes) = synthetic_extable(len);
    for &addr in &probes {
        let entry = extable::search(&table, addr).expect("every probe has an entry");
        assert_eq!(entry.insn_addr(), addr);
    }
    measure(n, |i| {
        let addr = probes[i as usize & (PROBES - 1)];
        black_box(extable::search(black_box(&table), addr).is_some());
    });
}

fn extable_10(n: u64) {
    extable_scenario(n, 10);
}

fn extable_1000(n: u64) {
    extable_scenario(n, 1_000);
}

fn extable_100000(n: u64) {
    extable_scenario(n, 100_000);
}
