//! Scaling: the per-operation cost of the library's success paths with two threads (two
//! "vCPUs") running them at once, against one thread alone, side by side in one run.
//!
//! The rule under test: no success path writes a cache line that another vCPU also
//! writes. If one did, two threads would pay a cache-line transfer per operation and the
//! two-thread cost would rise above the one-thread cost; if none does, the ratio stays
//! near 1 (on an otherwise idle machine with two free cores).
//!
//! Every operation goes through a real call site and stub to the production policy
//! (`XenPvPolicy`) over the mock hypercall page, whose scripts and call log are per
//! thread. Each thread plays its own vCPU (its id comes from a thread-local, as a kernel's
//! comes from its per-CPU area), with its own vPMU page; the two vCPUs' slots are
//! neighbours in `DEFAULT_SLOTS`. Time is each thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), not callgrind (which runs threads one at a time and
//! cannot see cache-line contention) and not wall-clock time (which on a shared machine
//! mostly measures who else got the cores).
//!
//! Three controls calibrate the reading. `private_work` touches no shared memory: its
//! ratio is what running two threads costs by itself (two guest vCPUs may share a host
//! core). `own_line` and `shared_line` increment counters in separate and in one cache
//! line: the second shows what a shared written line costs, and that the two threads
//! really ran at the same time (if it does not slow down, they did not overlap and the
//! other ratios say nothing).
//!
//! Output (one line per operation, tab-separated): name, description, the medians of the
//! nanoseconds per operation with one thread and with two threads (per thread), and the
//! median of the per-pair ratios.

use std::alloc::{Layout, alloc_zeroed};
use std::cell::Cell;
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use xenmsr::dispatch::ClassIndex;
use xenmsr::pmu::{PAGE_SIZE, Vpmu};
use xenmsr::policy::XenPvPolicy;
use xenmsr::routes::{MSR_APIC_BASE, MSR_FS_BASE, MSR_LSTAR, fix_apic_base};
use xenmsr::{rdmsr_safe, wrmsr_safe};
use xenmsr_asm::backend::set_backend;
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags};
use xenmsr_hypercall::mock;

use crate::scenarios::{APIC_RAW, FakeNative, MSR_PMC0, PMC0_CACHED, intel_vpmu_over_mock};

/// CPU time each thread spends in one measurement, by default: long enough that the two
/// threads overlap even when the scheduler starts one of them a time slice late.
pub const DEFAULT_MILLIS: u64 = 40;
/// Measurement pairs (one thread, then two) per operation. Each pair's ratio is taken
/// from two runs next to each other in time, so a change in the machine's background load
/// affects both; the median of the pairs' ratios is reported.
const ROUNDS: usize = 15;
/// Operations between two takes of the mock's call log, which keep it small. The takes
/// are measured too: the same share of every run, with one thread or two.
const BATCH: u64 = 1024;

thread_local! {
    /// The vCPU this thread plays.
    static VCPU: Cell<u32> = const { Cell::new(0) };
}

fn current_vcpu() -> u32 {
    VCPU.with(Cell::get)
}

/// One measured operation.
struct Op {
    name: &'static str,
    about: &'static str,
    /// Runs the operation `n` times on the calling thread (its vCPU already set).
    run: fn(&Setup, u64),
}

const OPS: &[Op] = &[
    Op {
        name: "lstar_write",
        about: "`wrmsr_safe(LSTAR)`: site -> stub -> policy, ignored (no hypercall)",
        run: lstar_writes,
    },
    Op {
        name: "apic_read",
        about: "`rdmsr_safe(APIC_BASE)`: site -> stub -> policy -> fake native read + per-vCPU BSP fix-up",
        run: apic_reads,
    },
    Op {
        name: "pmu_cached_read",
        about: "`rdmsr_safe(PMC0)` inside `on_pmi`: site -> stub -> policy -> vPMU -> this vCPU's page",
        run: pmu_reads,
    },
    Op {
        name: "fs_write",
        about: "`wrmsr_safe(FS_BASE)`: site -> stub -> policy -> mock `set_segment_base`",
        run: fs_writes,
    },
    Op {
        name: "control/private_work",
        about: "control: each thread runs a non-inlined call doing arithmetic on its own stack, no shared memory",
        run: private_work,
    },
    Op {
        name: "control/own_line",
        about: "control: each thread increments a counter on its own 128-byte block",
        run: own_line_increments,
    },
    Op {
        name: "control/shared_line",
        about: "control: both threads increment counters in one cache line",
        run: shared_line_increments,
    },
];

/// The process-wide fixture: the policy is the stubs' backend, and each of the two
/// vCPUs has a registered page holding a cached context.
struct Setup {
    vpmu: &'static Vpmu,
}

fn setup() -> Setup {
    let vpmu = intel_vpmu_over_mock(current_vcpu);
    let index = Box::leak(Box::new(ClassIndex::new()));
    let policy = Box::leak(Box::new(XenPvPolicy::new(
        mock::page(),
        current_vcpu,
        FakeNative,
        Some(vpmu),
        index,
    )));
    // SAFETY: a benchmark process over the mock page: the policy's answers are only
    // counted and timed, nothing relies on an MSR's value.
    let registered = unsafe { set_backend(policy) };
    assert!(registered, "a backend was already registered");
    for vcpu in 0..2 {
        let page = cached_page();
        // SAFETY: a leaked, zeroed, 4 KiB-aligned page that only the backend and the
        // filling below touch; the MFN is only recorded by the mock.
        unsafe { vpmu.init_vcpu(vcpu, page, 0x1000 + u64::from(vcpu)) }.expect("XENPMU_init");
        fill_cached_context(page);
    }
    mock::reset();
    Setup { vpmu }
}

/// A leaked, zeroed, page-aligned page.
fn cached_page() -> NonNull<u8> {
    let layout = Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).expect("a valid layout");
    // SAFETY: a non-zero-sized layout; the page is never freed.
    NonNull::new(unsafe { alloc_zeroed(layout) }).expect("allocation failed")
}

/// Writes what Xen writes at a PMI: bank offsets (3 fixed counters, then the pairs),
/// `IA32_PMC0` = [`PMC0_CACHED`], `PMU_CACHED`.
fn fill_cached_context(page: NonNull<u8>) {
    let put = |off: usize, bytes: &[u8]| {
        assert!(off + bytes.len() <= PAGE_SIZE);
        let dst = page.as_ptr().wrapping_add(off);
        // SAFETY: `dst..dst + bytes.len()` is inside the live page (checked above), which
        // nothing references; the source is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    };
    let (fixed_off, arch_off) = (64u32, 64u32 + 3 * 8);
    put(PMU_CTXT_OFFSET, &fixed_off.to_ne_bytes());
    put(PMU_CTXT_OFFSET + 4, &arch_off.to_ne_bytes());
    put(
        PMU_CTXT_OFFSET + arch_off as usize,
        &PMC0_CACHED.to_ne_bytes(),
    );
    let flags = (PmuFlags::CACHED | PmuFlags::SAMPLE_PV).bits();
    put(PMU_FLAGS_OFFSET, &flags.to_ne_bytes());
}

fn lstar_writes(_: &Setup, n: u64) {
    for i in 0..n {
        // SAFETY: the policy ignores LSTAR writes on Xen PV; nothing is written.
        let r = unsafe { wrmsr_safe(black_box(MSR_LSTAR), black_box(i)) };
        assert!(r.is_ok());
    }
}

fn apic_reads(_: &Setup, n: u64) {
    let expected = fix_apic_base(APIC_RAW, current_vcpu());
    for _ in 0..n {
        // SAFETY: the policy answers from the fake native reader; no MSR is read.
        let r = unsafe { rdmsr_safe(black_box(MSR_APIC_BASE)) };
        assert_eq!(r, Ok(expected));
    }
}

fn pmu_reads(setup: &Setup, n: u64) {
    setup
        .vpmu
        .on_pmi(|_| {
            for _ in 0..n {
                // SAFETY: inside the PMI the vPMU serves PMC0 from this vCPU's page.
                let r = unsafe { rdmsr_safe(black_box(MSR_PMC0)) };
                assert_eq!(r, Ok(PMC0_CACHED));
            }
        })
        .expect("on_pmi on the mock page");
}

fn fs_writes(_: &Setup, n: u64) {
    let mut done = 0;
    while done < n {
        let batch = BATCH.min(n - done);
        for i in 0..batch {
            // SAFETY: the policy turns the write into a (mock) hypercall.
            let r = unsafe { wrmsr_safe(black_box(MSR_FS_BASE), black_box(0x1000 + i)) };
            assert!(r.is_ok());
        }
        assert_eq!(mock::take_calls().len() as u64, batch);
        done += batch;
    }
}

/// A call with a few stack saves and a short dependency chain: work of the stub's size
/// that touches no shared memory, to see what running two threads costs by itself (the
/// two threads may share a physical core on the host).
#[inline(never)]
fn private_step(x: u64) -> u64 {
    let mut v = black_box(x);
    for _ in 0..8 {
        v = v.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ black_box(v);
    }
    v
}

fn private_work(_: &Setup, n: u64) {
    let mut acc = 0;
    for i in 0..n {
        acc ^= private_step(i);
    }
    black_box(acc);
}

/// Counters for the control pair: 32 words = two 128-byte blocks.
static COUNTERS: [AtomicU64; 32] = [const { AtomicU64::new(0) }; 32];

fn own_line_increments(_: &Setup, n: u64) {
    let counter = &COUNTERS[16 * current_vcpu() as usize];
    for _ in 0..n {
        black_box(counter).fetch_add(1, Ordering::Relaxed);
    }
}

fn shared_line_increments(_: &Setup, n: u64) {
    let counter = &COUNTERS[current_vcpu() as usize];
    for _ in 0..n {
        black_box(counter).fetch_add(1, Ordering::Relaxed);
    }
}

/// The calling thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
}

/// Runs `op` on `threads` threads (vCPUs 0..threads) at once, `n` times each; returns
/// the mean per-thread CPU time per operation, in nanoseconds.
fn measure(setup: &'static Setup, op: &'static Op, threads: u32, n: u64) -> f64 {
    let start = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|vcpu| {
            let start = start.clone();
            std::thread::spawn(move || {
                VCPU.with(|v| v.set(vcpu));
                let _session = mock::session();
                (op.run)(setup, n.min(1000)); // warm-up: the page, the stubs, the mock
                start.wait();
                let t = thread_cpu_ns();
                (op.run)(setup, n);
                thread_cpu_ns() - t
            })
        })
        .collect();
    let total: f64 = handles
        .into_iter()
        .map(|h| h.join().expect("a measuring thread failed"))
        .sum();
    total / f64::from(threads) / n as f64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Measures every operation with one and with two threads, interleaved, each thread
/// running about `millis` ms of CPU time per measurement, and prints one line per
/// operation.
pub fn run(millis: u64) {
    let setup: &'static Setup = Box::leak(Box::new(setup()));
    for op in OPS {
        // Calibrate: how many operations take `millis` ms on one thread.
        let per_op = measure(setup, op, 1, 20_000);
        let n = ((millis as f64 * 1e6 / per_op) as u64).max(1000);
        let (mut one, mut two, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let alone = measure(setup, op, 1, n);
            let together = measure(setup, op, 2, n);
            one.push(alone);
            two.push(together);
            ratio.push(together / alone);
        }
        println!(
            "{}\t{}\t{:.1}\t{:.1}\t{:.2}",
            op.name,
            op.about,
            median(one),
            median(two),
            median(ratio)
        );
    }
}
