//! `suite=bench`: in-guest benchmarks, in TSC cycles per operation (never part of
//! `cargo xtask test`; `cargo xtask bench` boots it and turns the lines into ratios).
//!
//! Paths that are compared run **side by side in one run**: each group of paths runs
//! [`BATCHES`] batches of [`OPS`] operations, and every batch runs each path of the group
//! once, starting with a different path each batch, so drift (Xen's timer, the host)
//! hits all of them alike. A warm-up batch of every path (QEMU translates the code, Xen
//! faults its paths in) comes first and is not reported. Under TCG the absolute numbers
//! mean little: the per-batch ratios are the result.
//!
//! Around every batch (outside the timed region) the tracing hypercall page's counters
//! and the kernel's exception counters are read: each path declares how many library
//! hypercalls, `#GP`s and `#UD`s one operation must take, and any other count, or an
//! operation that did not return what it should, fails the suite.
//!
//! Output, one line each (parsed by `xtask/src/guestbench.rs`):
//!
//! ```text
//! bench <path> batch=<i> ops=<n> cycles=<c> cycles_per_op=<x.y> hypercalls=<h> set_segment_base=<s> gp=<g> ud=<u>
//! bench-summary <path> cycles_per_op median=<x.y> min=<x.y> max=<x.y> hypercalls_per_op=<x.yyy>
//! bench-ratio <a>/<b> median=<r> min=<r> max=<r>
//! bench-note <text>
//! ```

use core::arch::asm;
use core::cell::UnsafeCell;
use core::hint::black_box;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use spin::Once;
use xenmsr::MsrError;
use xenmsr::pmu::{self, decode_pmc};
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags, SegmentBase};
use xenmsr_hypercall::{Errno, HypercallPage};

use super::{model, raw};
use crate::boot::mfn_of;
use crate::hv::nr;
use crate::testing::{self, Failure, TestResult};
use crate::{tracepage, traps};

/// Measured batches per path.
pub const BATCHES: usize = 31;
/// Operations per batch.
pub const OPS: u64 = 2000;
/// The most paths one group compares.
const MAX_PATHS: usize = 5;

const MSR_TSC: u32 = 0x10;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_BOGUS: u32 = 0x1234_5678;
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;
const VECTOR_GP: u8 = 13;
const VECTOR_UD: u8 = 6;

/// Runs every benchmark group (after initialising the library) and records one result
/// per group; the run's verdict is the usual `Test result:` line.
pub fn run() {
    crate::println!(
        "bench-note batches={BATCHES} ops_per_batch={OPS} unit=tsc_cycles cpu={} vpmu={} fsgsbase={}",
        model().cpu.unwrap_or("?"),
        if model().vpmu_active { "active" } else { "off" },
        u8::from(model().fsgsbase)
    );
    if let Err(e) = crate::library::init() {
        testing::record(
            "bench::init",
            Err(Failure::new(format_args!("xenmsr::init: {e}"))),
        );
        return;
    }
    BARE.call_once(tracepage::page);
    testing::record("bench::overhead", measure(&[LOOP], &[]));
    testing::record("bench::fs_base_write", fs_base_write());
    testing::record("bench::passthrough_read", measure(&READ, READ_RATIOS));
    testing::record("bench::fs_base_read", measure(&FS_READ, FS_READ_RATIOS));
    testing::record("bench::pmu_read", pmu_read());
    testing::record(
        "bench::failure_paths",
        measure(&fsgsbase_adjusted(FAIL), FAIL_RATIOS),
    );
}

// ---------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------

/// One measured path.
#[derive(Clone, Copy)]
struct Path {
    /// `group/path`.
    name: &'static str,
    /// One operation, given its index; returns whether it gave the expected result.
    op: fn(u64) -> bool,
    /// Library hypercalls (through the tracing page) one operation must make.
    hypercalls: u64,
    /// `#GP`s one operation must take.
    gp: u64,
    /// `#UD`s one operation must take.
    ud: u64,
    /// Runs before the batch, outside the timed region.
    enter: fn(),
    /// Runs after the batch, outside the timed region.
    leave: fn(),
}

fn nothing() {}

const fn path(name: &'static str, op: fn(u64) -> bool, hypercalls: u64) -> Path {
    Path {
        name,
        op,
        hypercalls,
        gp: 0,
        ud: 0,
        enter: nothing,
        leave: nothing,
    }
}

/// The page the library's hypercalls go through (the tracing page), for the bare call.
static BARE: Once<HypercallPage> = Once::new();

/// A valid, canonical FS base that changes with `i`.
fn fs_value(i: u64) -> u64 {
    0x0000_7f00_0000_0000 | ((i & 0xfff) << 12)
}

const LOOP: Path = path("loop/empty", |i| black_box(i) == i, 0);

const FS: [Path; 5] = [
    path(
        "fs/trapped_wrmsr",
        // SAFETY: the kernel keeps no state in FS; Xen emulates the write.
        |i| unsafe { raw::wrmsr(MSR_FS_BASE, fs_value(i)) }.is_ok(),
        0,
    ),
    path(
        "fs/shim",
        // SAFETY: as above; the library turns the write into set_segment_base.
        |i| unsafe { xenmsr::wrmsr_safe(MSR_FS_BASE, fs_value(i)) }.is_ok(),
        1,
    ),
    path(
        "fs/shim_const",
        // SAFETY: as above; on Xen PV this constant-index site was patched to the stub
        // that makes the set_segment_base hypercall directly.
        |i| unsafe { xenmsr::wrmsr_ns_const_safe::<MSR_FS_BASE>(fs_value(i)) }.is_ok(),
        1,
    ),
    path(
        "fs/shim_unchecked",
        |i| {
            // SAFETY: as above.
            unsafe { xenmsr::wrmsr(MSR_FS_BASE, fs_value(i)) };
            true
        },
        1,
    ),
    path(
        "fs/bare_hypercall",
        |i| {
            BARE.get().is_some_and(|page| {
                // SAFETY: the test kernel addresses nothing through FS (no TLS; a vCPU's
                // data is found from its stack pointer).
                unsafe { page.set_segment_base(SegmentBase::FS, fs_value(i)) }.is_ok()
            })
        },
        1,
    ),
];

const FS_RATIOS: &[(&str, &str)] = &[
    ("fs/shim", "fs/bare_hypercall"),
    ("fs/shim_unchecked", "fs/bare_hypercall"),
    ("fs/shim_const", "fs/bare_hypercall"),
    ("fs/shim", "fs/trapped_wrmsr"),
    ("fs/bare_hypercall", "fs/trapped_wrmsr"),
];

/// With FSGSBASE the library writes the FS base with WRFSBASE: no hypercall.
fn fsgsbase_adjusted<const N: usize>(mut paths: [Path; N]) -> [Path; N] {
    if xenmsr::fsgsbase::enabled() {
        for p in &mut paths {
            if matches!(
                p.name,
                "fs/shim" | "fs/shim_const" | "fs/shim_unchecked" | "fail/rewind"
            ) {
                p.hypercalls = 0;
            }
        }
    }
    paths
}

fn fs_base_write() -> TestResult {
    let r = measure(&fsgsbase_adjusted(FS), FS_RATIOS);
    // SAFETY: FS is unused by the kernel; back to its boot value.
    let _ = unsafe { raw::wrmsr(MSR_FS_BASE, 0) };
    r
}

const READ: [Path; 2] = [
    path(
        "read/stub",
        // SAFETY: reading the TSC MSR has no side effect; the policy passes it through
        // and the stub's RDMSR is emulated by Xen.
        |_| unsafe { xenmsr::rdmsr_safe(black_box(MSR_TSC)) }.is_ok(),
        0,
    ),
    path(
        "read/trapped_rdmsr",
        |_| raw::rdmsr(black_box(MSR_TSC)).is_ok(),
        0,
    ),
];

const READ_RATIOS: &[(&str, &str)] = &[("read/stub", "read/trapped_rdmsr")];

/// Reads of the FS base: trapped by Xen, or (with FSGSBASE) RDFSBASE at the
/// constant-index site and through the read stub's filter at the generic one.
const FS_READ: [Path; 3] = [
    path(
        "fsread/trapped_rdmsr",
        |_| raw::rdmsr(black_box(MSR_FS_BASE)).is_ok(),
        0,
    ),
    path(
        "fsread/shim",
        // SAFETY: reading FS_BASE has no side effect.
        |_| unsafe { xenmsr::rdmsr_safe(black_box(MSR_FS_BASE)) }.is_ok(),
        0,
    ),
    path(
        "fsread/shim_const",
        // SAFETY: as above.
        |_| unsafe { xenmsr::rdmsr_const_safe::<MSR_FS_BASE>() }.is_ok(),
        0,
    ),
];

const FS_READ_RATIOS: &[(&str, &str)] = &[
    ("fsread/shim_const", "fsread/trapped_rdmsr"),
    ("fsread/shim", "fsread/trapped_rdmsr"),
];

fn fail_rewind(_: u64) -> bool {
    // SAFETY: Xen (with FSGSBASE: the stub) refuses the value; nothing changes.
    let r = unsafe { xenmsr::wrmsr_safe(MSR_FS_BASE, black_box(NON_CANONICAL)) };
    if xenmsr::fsgsbase::enabled() {
        r == Err(MsrError::Fault { vector: VECTOR_GP })
    } else {
        r == Err(MsrError::Hypercall(Errno::EINVAL))
    }
}

fn fail_native_gp(_: u64) -> bool {
    // SAFETY: Xen's emulation of the write raises #GP; nothing changes.
    let r = unsafe { xenmsr_asm::native::wrmsr_safe(MSR_FS_BASE, black_box(NON_CANONICAL)) };
    r == Err(MsrError::Fault { vector: VECTOR_GP })
}

fn fail_stub_gp_rewind(_: u64) -> bool {
    // SAFETY: the read of an MSR Xen does not know faults; nothing changes.
    let r = unsafe { xenmsr::rdmsr_safe(black_box(MSR_BOGUS)) };
    r == Err(MsrError::Fault { vector: VECTOR_GP })
}

const FAIL: [Path; 3] = [
    // Policy failure: stub -> policy -> set_segment_base -EINVAL -> CF -> ud2 (#UD) ->
    // rewind to the call site -> the site's fixup -> Err.
    Path {
        ud: 1,
        ..path("fail/rewind", fail_rewind, 1)
    },
    // Native fault: the bare WRMSR -> Xen injects #GP -> fixup of the native site -> Err.
    Path {
        gp: 1,
        ..path("fail/native_gp", fail_native_gp, 0)
    },
    // The stub's own RDMSR faults (#GP) and is rewound to the call site.
    Path {
        gp: 1,
        ..path("fail/stub_gp_rewind", fail_stub_gp_rewind, 0)
    },
];

const FAIL_RATIOS: &[(&str, &str)] = &[
    ("fail/rewind", "fail/native_gp"),
    ("fail/stub_gp_rewind", "fail/native_gp"),
];

// ---------------------------------------------------------------------------------------
// PMU
// ---------------------------------------------------------------------------------------

/// The vCPU's shared PMU page (registered with `XENPMU_init` for the PMU group).
#[repr(C, align(4096))]
struct PmuPage(UnsafeCell<[u8; 4096]>);

// SAFETY: one vCPU; the page is touched only through raw pointers (by Xen, the library's
// vPMU backend, and `set_pmu_flags` below), never through references.
unsafe impl Sync for PmuPage {}

static PMU_PAGE: PmuPage = PmuPage(UnsafeCell::new([0; 4096]));

/// The PMU counter MSR the PMU paths read.
static PMU_MSR: AtomicU32 = AtomicU32::new(0);

fn pmu_page() -> NonNull<u8> {
    NonNull::new(PMU_PAGE.0.get().cast::<u8>()).expect("static page")
}

fn pmu_page_u64(offset: usize) -> *mut u64 {
    pmu_page().as_ptr().wrapping_add(offset).cast::<u64>()
}

/// Reads `pmu_flags` of the shared page.
fn pmu_flags() -> u64 {
    // SAFETY: the offset is inside the static, 4 KiB-aligned page and 8-aligned; a
    // volatile scalar read, as the backend's own.
    unsafe { pmu_page_u64(PMU_FLAGS_OFFSET).read_volatile() }
}

/// Writes `pmu_flags` of the shared page: this simulates what Xen does at a PMI (which
/// TCG cannot raise). The guest owns the page; Xen reads `pmu_flags` only in
/// `XENPMU_flush`, which the benchmark never makes while the flag is set.
fn set_pmu_flags(value: u64) {
    // SAFETY: as in `pmu_flags`; one vCPU, and no access of the backend is running.
    unsafe { pmu_page_u64(PMU_FLAGS_OFFSET).write_volatile(value) }
}

/// `pmu_flags` as found before the cached batches.
static PMU_FLAGS_SAVED: spin::Mutex<u64> = spin::Mutex::new(0);

fn enter_cached() {
    let old = pmu_flags();
    *PMU_FLAGS_SAVED.lock() = old;
    set_pmu_flags(old | PmuFlags::CACHED.bits());
}

fn leave_cached() {
    set_pmu_flags(*PMU_FLAGS_SAVED.lock());
}

fn pmu_msr() -> u32 {
    black_box(PMU_MSR.load(Ordering::Relaxed))
}

const PMU: [Path; 3] = [
    Path {
        enter: enter_cached,
        leave: leave_cached,
        ..path(
            "pmu/cached_stub",
            // SAFETY: inside `on_pmi` with PMU_CACHED set, the backend serves the read from
            // the page.
            |_| unsafe { xenmsr::rdmsr_safe(pmu_msr()) }.is_ok(),
            0,
        )
    },
    path("pmu/trapped_rdmsr", |_| raw::rdmsr(pmu_msr()).is_ok(), 0),
    path(
        "pmu/stub_uncached",
        // SAFETY: reading a PMU counter has no side effect; not cached, so the stub runs
        // the RDMSR and Xen's vPMU emulates it.
        |_| unsafe { xenmsr::rdmsr_safe(pmu_msr()) }.is_ok(),
        0,
    ),
];

const PMU_RATIOS: &[(&str, &str)] = &[
    ("pmu/trapped_rdmsr", "pmu/cached_stub"),
    ("pmu/stub_uncached", "pmu/trapped_rdmsr"),
];

fn pmu_read() -> TestResult {
    let page = pmu_page();
    // SAFETY: the page is 4 KiB, aligned, static and used by nothing else; `mfn` is its
    // frame. While registered, only the backend, Xen and `set_pmu_flags` (simulating Xen)
    // touch it; after a failed `finish` it is never reused.
    let r = unsafe { pmu::init(0, page, mfn_of(page.as_ptr() as usize)) };
    if let Err(e) = r {
        crate::println!(
            "bench-note pmu not-applicable: XENPMU_init failed ({e}); vPMU needs EPYC + vpmu=1 under TCG"
        );
        if model().vpmu_active {
            crate::fail!("pmu::init failed on a model with an active vPMU: {e:?}");
        }
        return Ok(());
    }
    let result = pmu_measure();
    let finished = pmu::finish(0);
    result?;
    crate::check!(finished.is_ok(), "pmu::finish: {finished:?}");
    Ok(())
}

fn pmu_measure() -> TestResult {
    let layout = pmu::global().layout();
    let Some(msr) = decode_pmc(&layout, 0).and_then(|pmc| pmc.msr(&layout)) else {
        crate::fail!("no counter 0 in the PMU layout {layout:?}");
    };
    PMU_MSR.store(msr, Ordering::Relaxed);
    // What Xen wrote into the page at XENPMU_init (the vendor context's bank offsets).
    let ctxt = pmu_page_u64(PMU_CTXT_OFFSET);
    // SAFETY: inside the static page, 8-aligned; a volatile scalar read.
    let offsets = unsafe { ctxt.read_volatile() };
    crate::println!(
        "bench-note pmu msr={msr:#x} ctxt_offsets={offsets:#x} flags={:#x}; PMU_CACHED is \
         set by the guest around the cached batches (TCG raises no PMI) and restored after",
        pmu_flags()
    );
    // The library serves PMU MSRs from the page only inside a PMI handler (`on_pmi`), so
    // every path runs in one; TCG raises no PMI, and Xen accepts the flush that ends it
    // (the pmu suite checks that).
    let inside = pmu::on_pmi(|_| -> TestResult {
        enter_cached();
        // SAFETY: as in the path.
        let cached = unsafe { xenmsr::rdmsr_safe(msr) };
        leave_cached();
        crate::check!(
            cached.is_ok(),
            "cached read of {msr:#x}: {cached:?} (page not usable as a cached context)"
        );
        crate::check!(
            !pmu::global().is_cached(0),
            "PMU_CACHED still set after the cached read"
        );
        let r = measure(&PMU, PMU_RATIOS);
        crate::check!(
            !pmu::global().is_cached(0),
            "PMU_CACHED not restored after the benchmark"
        );
        r
    });
    match inside {
        Ok(result) => result,
        Err(e) => crate::fail!("on_pmi around the PMU benchmark: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------

/// The TSC, not reordered with the instructions around it.
fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `lfence; rdtsc` reads the TSC into edx:eax and touches nothing else. No
    // `nomem`: the compiler must not move memory accesses across it.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// One batch of one path.
#[derive(Clone, Copy, Debug, Default)]
struct Batch {
    cycles: u64,
    hypercalls: u64,
    set_segment_base: u64,
    gp: u64,
    ud: u64,
    /// Operations that did not give the expected result.
    bad: u64,
}

fn run_batch(path: &Path, batch: u64) -> Batch {
    let op = path.op;
    (path.enter)();
    let (gp, ud) = (traps::count(VECTOR_GP), traps::count(VECTOR_UD));
    let before = tracepage::snapshot();
    let first = batch * OPS;
    let mut bad = 0;
    let start = rdtsc();
    for i in first..first + OPS {
        if !op(black_box(i)) {
            bad += 1;
        }
    }
    let end = rdtsc();
    let after = tracepage::snapshot();
    let b = Batch {
        cycles: end.wrapping_sub(start),
        hypercalls: after.total_since(&before),
        set_segment_base: after.count_since(&before, nr::SET_SEGMENT_BASE),
        gp: traps::count(VECTOR_GP) - gp,
        ud: traps::count(VECTOR_UD) - ud,
        bad,
    };
    (path.leave)();
    b
}

/// Checks one batch against what its path declares.
fn check_batch(path: &Path, b: &Batch) -> TestResult {
    crate::check!(
        b.bad == 0,
        "{}: {} of {OPS} operations gave the wrong result",
        path.name,
        b.bad
    );
    crate::check!(
        b.hypercalls == path.hypercalls * OPS,
        "{}: {} hypercalls for {OPS} operations, expected exactly {} per operation",
        path.name,
        b.hypercalls,
        path.hypercalls
    );
    crate::check!(
        b.set_segment_base == b.hypercalls,
        "{}: {} of {} hypercalls were not set_segment_base",
        path.name,
        b.hypercalls - b.set_segment_base,
        b.hypercalls
    );
    crate::check!(
        b.gp == path.gp * OPS && b.ud == path.ud * OPS,
        "{}: {} #GP and {} #UD for {OPS} operations, expected {} and {} per operation",
        path.name,
        b.gp,
        b.ud,
        path.gp,
        path.ud
    );
    Ok(())
}

/// Runs a group of paths side by side, prints every batch, a summary and the ratios,
/// and checks every batch.
fn measure(paths: &[Path], ratios: &[(&str, &str)]) -> TestResult {
    let n = paths.len();
    assert!(n <= MAX_PATHS);
    for p in paths {
        // Warm-up (batch index 0), not reported, but checked.
        check_batch(p, &run_batch(p, 0))?;
    }
    let mut results = [[Batch::default(); BATCHES]; MAX_PATHS];
    // Batch-major order (every path once per batch) over a path-major table.
    #[allow(clippy::needless_range_loop)]
    for b in 0..BATCHES {
        for k in 0..n {
            let j = (b + k) % n;
            results[j][b] = run_batch(&paths[j], b as u64 + 1);
        }
    }
    for (p, batches) in paths.iter().zip(&results) {
        for (i, b) in batches.iter().enumerate() {
            crate::println!(
                "bench {} batch={i} ops={OPS} cycles={} cycles_per_op={} hypercalls={} \
                 set_segment_base={} gp={} ud={}",
                p.name,
                b.cycles,
                Tenths(b.cycles * 10 / OPS),
                b.hypercalls,
                b.set_segment_base,
                b.gp,
                b.ud
            );
        }
    }
    for (p, batches) in paths.iter().zip(&results) {
        let (med, min, max) = spread(batches.map(|b| b.cycles * 10 / OPS));
        let hypercalls: u64 = batches.iter().map(|b| b.hypercalls).sum();
        crate::println!(
            "bench-summary {} cycles_per_op median={} min={} max={} hypercalls_per_op={}",
            p.name,
            Tenths(med),
            Tenths(min),
            Tenths(max),
            Thousandths(hypercalls * 1000 / (OPS * BATCHES as u64))
        );
    }
    let index = |name: &str| paths.iter().position(|p| p.name == name);
    for &(a, b) in ratios {
        let (Some(a), Some(b)) = (index(a), index(b)) else {
            crate::fail!("ratio {a}/{b}: no such path in the group");
        };
        let per_batch: [u64; BATCHES] =
            core::array::from_fn(|i| results[a][i].cycles * 1000 / results[b][i].cycles.max(1));
        let (med, min, max) = spread(per_batch);
        crate::println!(
            "bench-ratio {}/{} median={} min={} max={}",
            paths[a].name,
            paths[b].name,
            Thousandths(med),
            Thousandths(min),
            Thousandths(max)
        );
    }
    for (p, batches) in paths.iter().zip(&results) {
        for b in batches {
            check_batch(p, b)?;
        }
    }
    Ok(())
}

/// Median (upper median for an even count), minimum and maximum.
fn spread<const N: usize>(mut v: [u64; N]) -> (u64, u64, u64) {
    v.sort_unstable();
    (v[N / 2], v[0], v[N - 1])
}

/// A value in tenths, printed with one decimal.
struct Tenths(u64);

impl core::fmt::Display for Tenths {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.0 / 10, self.0 % 10)
    }
}

/// A value in thousandths, printed with three decimals.
struct Thousandths(u64);

impl core::fmt::Display for Thousandths {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}
