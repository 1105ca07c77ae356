//! Live re-patching: worker threads keep calling real patched sites while the main thread
//! re-patches the whole image again and again, alternating the native and the Xen PV
//! variant, through `xenmsr::repatch`. Its stop-the-world hook is the test's: it parks
//! every worker at a point outside all sites, runs the patch, releases them, and each
//! serialises before it resumes.
//!
//! The text writer is deliberately slow (a pause between the bytes of a site), as a
//! kernel's may be (remapping pages around the store): a worker that ran a site while it
//! was half written would crash (a torn `call` lands on no stub and no extable entry) or
//! get a wrong result. Every call's result is checked against what either variant gives.
//!
//! One test per binary: it re-patches every site of the image.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use xenmsr::patch::{CpuFeatures, Variant};
use xenmsr::routes::{MSR_FS_BASE, MSR_LSTAR};
use xenmsr::{Config, MsrError};
use xenmsr_host_tests::install_fault_handlers;
use xenmsr_hypercall::mock;
use xenmsr_hypercall::nr;

const WORKERS: usize = 3;
const ROUNDS: usize = 40;
const GP: MsrError = MsrError::Fault { vector: 13 };
/// An MSR with no route: natively and through the policy, its RDMSR faults in ring 3.
const UNROUTED: u32 = 0x10;
/// The pause between two byte stores of the text writer.
const BYTE_PAUSE: Duration = Duration::from_micros(50);

/// The world is stopping (or stopped): workers park.
static STOP: AtomicBool = AtomicBool::new(false);
/// Workers at their parking point.
static PARKED: AtomicUsize = AtomicUsize::new(0);
/// The patcher is done: workers finish.
static DONE: AtomicBool = AtomicBool::new(false);

/// A kernel text writer that takes its time: maps the page writable, stores the bytes
/// one by one with a pause in between, maps it back.
///
/// # Safety
///
/// As for `xenmsr_host_tests::write_text_mprotect`.
unsafe fn slow_write_text(address: usize, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        if i > 0 {
            let until = Instant::now() + BYTE_PAUSE;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        // SAFETY: one byte of the range the caller guarantees.
        unsafe { xenmsr_host_tests::write_text_mprotect(address + i, std::slice::from_ref(byte)) };
    }
}

fn config() -> Config {
    xenmsr_host_tests::mock_xen_pv_config().with_write_text(slow_write_text)
}

/// How long the patcher waits for the workers before it calls the test failed (a worker
/// that panicked never parks).
const PARK_DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `PARKED` is `count`.
fn wait_for_parked(count: usize) {
    let deadline = Instant::now() + PARK_DEADLINE;
    while PARKED.load(Ordering::SeqCst) != count {
        assert!(
            Instant::now() < deadline,
            "workers did not reach {count} parked"
        );
        std::thread::yield_now();
    }
}

/// The test's stop-the-world: stop, wait until every worker is parked, patch, release,
/// and wait until every worker has left the parking point (so that the next round counts
/// only workers parked again).
fn stop_the_world(patch: &mut dyn FnMut()) {
    STOP.store(true, Ordering::SeqCst);
    wait_for_parked(WORKERS);
    patch();
    STOP.store(false, Ordering::SeqCst);
    wait_for_parked(0);
}

/// A worker's parking point, between two site calls (outside every site).
fn park_if_asked() {
    if !STOP.load(Ordering::SeqCst) {
        return;
    }
    PARKED.fetch_add(1, Ordering::SeqCst);
    while STOP.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // Every vCPU serialises before it runs the rewritten code.
    xenmsr::patch::serialise();
    PARKED.fetch_sub(1, Ordering::SeqCst);
}

#[inline(never)]
fn const_fs_write(value: u64) -> Result<(), MsrError> {
    // SAFETY: Xen PV: the segment-base stub makes the (mock) hypercall; native: the
    // WRMSR faults in ring 3 and is fixed up.
    unsafe { xenmsr::wrmsr_ns_const_safe::<MSR_FS_BASE>(value) }
}

#[inline(never)]
fn lstar_write(value: u64) -> Result<(), MsrError> {
    // SAFETY: Xen PV: the policy ignores it; native: the WRMSR faults and is fixed up.
    unsafe { xenmsr::wrmsr_safe(MSR_LSTAR, value) }
}

#[inline(never)]
fn unrouted_reads() -> [Result<u64, MsrError>; 2] {
    // SAFETY: either way a real RDMSR runs (the stub's or the site's) and faults in
    // ring 3; the fixup reports it at the site.
    let variable = unsafe { xenmsr::rdmsr_safe(UNROUTED) };
    // SAFETY: as above, through the constant-index site.
    let constant = unsafe { xenmsr::rdmsr_const_safe::<UNROUTED>() };
    [variable, constant]
}

/// Calls the sites until the patcher is done; returns how many calls each variant
/// answered (Xen PV, native).
fn worker(id: u64) -> (u64, u64) {
    let _session = mock::session();
    let (mut xen, mut native) = (0, 0);
    let mut value = 0x0000_7f00_0000_0000 | (id << 32);
    while !DONE.load(Ordering::SeqCst) {
        park_if_asked();
        value += 0x1000;
        match const_fs_write(value) {
            Ok(()) => {
                // The segment-base stub passes the two arguments Xen reads.
                let calls = mock::take_calls();
                assert_eq!(calls.len(), 1, "worker {id}: {calls:?}");
                let call = calls[0];
                assert_eq!(
                    (call.nr, call.args[0], call.args[1]),
                    (nr::SET_SEGMENT_BASE, 0, value),
                    "worker {id}"
                );
                xen += 1;
            }
            Err(e) => {
                assert_eq!(e, GP, "worker {id}");
                mock::assert_calls(&[]);
                native += 1;
            }
        }
        park_if_asked();
        let r = lstar_write(value);
        assert!(r == Ok(()) || r == Err(GP), "worker {id}: {r:?}");
        park_if_asked();
        assert_eq!(unrouted_reads(), [Err(GP), Err(GP)], "worker {id}");
        mock::assert_calls(&[]);
    }
    (xen, native)
}

#[test]
fn sites_stay_correct_while_other_threads_repatch_them_live() {
    install_fault_handlers();
    // SAFETY: before any worker starts; the sites are this binary's; the writer maps
    // the text writable around each store.
    unsafe { xenmsr::init(config()) }.expect("init");
    let workers: Vec<_> = (0..WORKERS as u64)
        .map(|id| std::thread::spawn(move || worker(id)))
        .collect();
    let mut rewritten = 0;
    for round in 0..ROUNDS {
        let variant = if round % 2 == 0 {
            Variant::Native(CpuFeatures::default())
        } else {
            Variant::XenPv
        };
        // Let the workers run a while on this variant.
        std::thread::sleep(Duration::from_millis(2));
        // SAFETY: `stop_the_world` parks every worker outside the sites, runs the patch
        // once on this thread, and each worker serialises before it resumes; this
        // thread runs no site meanwhile.
        let report = unsafe { xenmsr::repatch(variant, &mut stop_the_world) }
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(report.rewritten > 0, "round {round}: {report:?}");
        rewritten += report.rewritten;
    }
    DONE.store(true, Ordering::SeqCst);
    // A hook that never runs the patch: an error, and nothing is written.
    let mut never = |_: &mut dyn FnMut()| {};
    // SAFETY: the hook never runs the patch, so nothing is written.
    let not_run = unsafe { xenmsr::repatch(Variant::Native(CpuFeatures::default()), &mut never) };
    assert_eq!(not_run, Err(xenmsr::RepatchError::NotRun));
    let (mut xen, mut native) = (0, 0);
    for w in workers {
        let (x, n) = w.join().expect("a worker failed");
        xen += x;
        native += n;
    }
    // Both variants were really in place while the workers ran.
    assert!(xen > 0 && native > 0, "xen {xen}, native {native}");
    eprintln!(
        "live repatch: {ROUNDS} rounds, {rewritten} site rewrites, {xen} calls on Xen PV \
         code, {native} on native code"
    );
}
