//! The library's half of a suspend and resume (`xl save`/`restore`, `xl migrate`), through
//! the mock hypercall page: `lifecycle::suspend` finishes every registered vPMU
//! (`XENPMU_finish`, as Linux's `xen_arch_suspend`), `lifecycle::resume` registers each
//! page again, at the frame it had after a cancelled suspend and at its new frame in a new
//! domain, takes the patch decisions again from the CPUID the domain has now and
//! re-patches every site through the kernel's stop-the-world when they changed (here: a
//! CPUID whose PMU leaves vanished), and refuses what is out of order.
//!
//! One test per binary: `init` state is per process.

use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use xenmsr::lifecycle::{self, LifecycleError, SuspendOutcome};
use xenmsr::pmu;
use xenmsr_hypercall::abi::XenPmuParams;
use xenmsr_hypercall::{mock, nr};

thread_local! {
    static MY_ID: Cell<u32> = const { Cell::new(0) };
}

fn thread_id() -> u32 {
    MY_ID.get()
}

/// When set, the domain's CPUID is all zeros: no vendor, no PMU (a host of another kind).
static CPUID_GONE: AtomicBool = AtomicBool::new(false);

fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    if CPUID_GONE.load(Ordering::Acquire) {
        [0; 4]
    } else {
        pmu::raw_cpuid(leaf, subleaf)
    }
}

#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; 4096]>);
// SAFETY: each page is only handed to the backend (and the mock "Xen").
unsafe impl Sync for Page {}
static PAGES: [Page; 2] = [const { Page(UnsafeCell::new([0; 4096])) }; 2];

fn page(id: u32) -> NonNull<u8> {
    NonNull::new(PAGES[id as usize].0.get().cast()).expect("static")
}

const INIT: u64 = nr::XENPMU_INIT as u64;
const FINISH: u64 = nr::XENPMU_FINISH as u64;

/// Records every `(op, mfn, vcpu)` of `xenpmu_op` this thread makes, answering 0.
fn record_pmu_ops() -> Arc<Mutex<Vec<(u64, u64, u32)>>> {
    mock::on(nr::VCPU_OP, |_| 1);
    let calls: Arc<Mutex<Vec<(u64, u64, u32)>>> = Arc::default();
    let seen = calls.clone();
    mock::on(nr::XENPMU_OP, move |args| {
        // SAFETY: the backend passes a `XenPmuParams` it owns for the call (or null).
        let params = unsafe { (args[1] as *const XenPmuParams).as_ref() };
        let (mfn, vcpu) = params.map_or((0, 0), |p| (p.val, p.vcpu));
        seen.lock().unwrap().push((args[0], mfn, vcpu));
        0
    });
    calls
}

fn take_ops(calls: &Mutex<Vec<(u64, u64, u32)>>) -> Vec<(u64, u64, u32)> {
    std::mem::take(&mut *calls.lock().unwrap())
        .into_iter()
        .filter(|&(op, ..)| op == INIT || op == FINISH)
        .collect()
}

/// Runs `f` on a thread that is vCPU 1, with its `xenpmu_op`s recorded; returns both.
fn on_vcpu_1<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> (R, Vec<(u64, u64, u32)>) {
    on_vcpu(1, f)
}

/// Runs `f` on a thread the vCPU-id hook names `id`, with its `xenpmu_op`s recorded.
fn on_vcpu<R: Send + 'static>(
    id: u32,
    f: impl FnOnce() -> R + Send + 'static,
) -> (R, Vec<(u64, u64, u32)>) {
    std::thread::spawn(move || {
        MY_ID.set(id);
        let calls = record_pmu_ops();
        let r = f();
        (r, take_ops(&calls))
    })
    .join()
    .expect("vCPU 1's thread")
}

/// A stop-the-world for a single-threaded process: runs the closure, counting calls.
fn counting_stop_the_world(count: &Cell<u32>) -> impl FnMut(&mut dyn FnMut()) + '_ {
    move |patch: &mut dyn FnMut()| {
        count.set(count.get() + 1);
        patch();
    }
}

#[test]
fn suspend_and_resume_keep_the_vpmu_and_recheck_cpuid() {
    xenmsr_host_tests::install_fault_handlers();
    let config = xenmsr_host_tests::mock_xen_pv_config()
        .with_vcpu_id(thread_id)
        .with_cpuid(cpuid);

    // Before init: nothing to suspend.
    assert_eq!(lifecycle::suspend(), Err(LifecycleError::NotInitialised));
    // SAFETY: the host test harness's contract for `init` (text patched through
    // mprotect, the mock hypercall page), once per process.
    unsafe { xenmsr::init(config) }.expect("init");
    let calls = record_pmu_ops();
    let vpmu = pmu::global().layout() != pmu::PmuLayout::None;
    assert!(
        vpmu,
        "this test needs a host CPU with a PMU layout (AMD or Intel with leaf 0xA)"
    );
    for id in 0..2 {
        // SAFETY: static pages only this test hands out; the frames are the mock's.
        unsafe { pmu::init(id, page(id), 0x1001 + 0x1001 * u64::from(id)) }.expect("pmu::init");
    }
    assert_eq!(take_ops(&calls), [(INIT, 0x1001, 0), (INIT, 0x2002, 1)]);

    // Out of order: a resume without a suspend; a suspend off the boot vCPU.
    let no_mfn = |_: NonNull<u8>| -> u64 { panic!("no frame is looked up") };
    let stops = Cell::new(0);
    // SAFETY: single-threaded "world": the closure runs the patch; nothing is patched here.
    let r = unsafe {
        lifecycle::resume(
            SuspendOutcome::NewDomain,
            &no_mfn,
            &mut counting_stop_the_world(&stops),
        )
    };
    assert_eq!(r.map(drop), Err(LifecycleError::NotSuspended));
    let off_boot = std::thread::spawn(|| {
        MY_ID.set(1);
        lifecycle::suspend()
    })
    .join()
    .unwrap();
    assert_eq!(off_boot, Err(LifecycleError::NotBootVcpu(Some(1))));

    // Each vCPU's own part: on the host SPEC_CTRL faults (ring 3), so nothing is saved.
    let mine = lifecycle::suspend_this_vcpu().expect("suspend_this_vcpu");
    assert_eq!((mine.id, mine.spec_ctrl), (0, None));

    // 1. A cancelled suspend: the same frames again.
    let s = lifecycle::suspend().expect("suspend");
    assert_eq!((s.vpmu_finished, s.vpmu_errors), (2, 0));
    assert_eq!(lifecycle::suspend(), Err(LifecycleError::AlreadySuspended));
    assert_eq!(take_ops(&calls), [(FINISH, 0, 0), (FINISH, 0, 1)]);
    assert!(!pmu::global().is_initialized(0) && pmu::global().is_parked(0));
    // SAFETY: as above.
    let r = unsafe {
        lifecycle::resume(
            SuspendOutcome::Cancelled,
            &no_mfn,
            &mut counting_stop_the_world(&stops),
        )
    }
    .expect("resume after a cancel");
    assert_eq!((r.vpmu_registered, r.vpmu_errors), (2, 0));
    assert!(!r.decisions_changed && r.repatched.is_none());
    assert_eq!(stops.get(), 0, "nothing to re-patch");
    assert_eq!(take_ops(&calls), [(INIT, 0x1001, 0), (INIT, 0x2002, 1)]);
    let back = lifecycle::resume_this_vcpu().expect("resume_this_vcpu");
    assert_eq!(
        (back.id, back.spec_ctrl, back.fsgsbase_restored),
        (0, None, false)
    );

    // 2. A new domain: every page at the frame the new p2m gives.
    lifecycle::suspend().expect("suspend");
    assert_eq!(take_ops(&calls), [(FINISH, 0, 0), (FINISH, 0, 1)]);
    let new_frames = |p: NonNull<u8>| -> u64 {
        if p == page(0) {
            0x5005
        } else if p == page(1) {
            0x6006
        } else {
            panic!("not a registered page: {p:?}")
        }
    };
    // SAFETY: as above; the "new frames" are the mock's.
    let r = unsafe {
        lifecycle::resume(
            SuspendOutcome::NewDomain,
            &new_frames,
            &mut counting_stop_the_world(&stops),
        )
    }
    .expect("resume in a new domain");
    assert_eq!(
        (r.outcome, r.vpmu_registered, r.vpmu_errors),
        (SuspendOutcome::NewDomain, 2, 0)
    );
    assert_eq!(take_ops(&calls), [(INIT, 0x5005, 0), (INIT, 0x6006, 1)]);
    assert_eq!(stops.get(), 0);

    // 2b. vCPU 1 offline across a restore: its page, parked by `offline_this_vcpu` at
    // its old frame, must come back at its new frame, not the old domain's.
    let (offline, ops) = on_vcpu_1(|| {
        // The boot vCPU registered 0; vCPU 1 registers, then goes offline.
        assert_eq!(xenmsr::smp::register_this_vcpu(), Ok(1));
        xenmsr::smp::offline_this_vcpu()
    });
    assert_eq!(offline.map(|o| o.vpmu_parked), Ok(true));
    assert_eq!(ops, [(FINISH, 0, 1)]);
    lifecycle::suspend().expect("suspend");
    assert_eq!(
        take_ops(&calls),
        [(FINISH, 0, 0)],
        "only vCPU 0 was registered"
    );
    let newer_frames = |p: NonNull<u8>| -> u64 {
        if p == page(0) {
            0x8008
        } else if p == page(1) {
            0x9009
        } else {
            panic!("not a registered page: {p:?}")
        }
    };
    // SAFETY: as above.
    let r = unsafe {
        lifecycle::resume(
            SuspendOutcome::NewDomain,
            &newer_frames,
            &mut counting_stop_the_world(&stops),
        )
    }
    .expect("resume with vCPU 1 offline");
    assert_eq!(
        (r.vpmu_registered, r.vpmu_reframed, r.vpmu_errors),
        (1, 1, 0),
        "vCPU 0 registered again, vCPU 1's parked page given its new frame"
    );
    assert_eq!(take_ops(&calls), [(INIT, 0x8008, 0)]);
    let online = on_vcpu_1(xenmsr::smp::online_this_vcpu);
    assert_eq!(online.0.map(|o| o.vpmu), Ok(Some(Ok(()))));
    assert_eq!(
        online.1,
        [(INIT, 0x9009, 1)],
        "vCPU 1's page registered at its frame in the new domain"
    );

    // 3. A new domain on a CPU without a PMU: the decisions change, every site is
    // re-patched for it in one stop-the-world, and no page is registered with a layout
    // the CPU does not have (they stay parked; Xen's trapped path answers).
    lifecycle::suspend().expect("suspend");
    take_ops(&calls);
    let before = lifecycle::current_decisions();
    // SAFETY: reading the APIC base has no side effects (on the host: a real #GP).
    let apic_before = unsafe { xenmsr::rdmsr_safe(0x1b) };
    CPUID_GONE.store(true, Ordering::Release);
    // SAFETY: as above.
    let r = unsafe {
        lifecycle::resume(
            SuspendOutcome::NewDomain,
            &new_frames,
            &mut counting_stop_the_world(&stops),
        )
    }
    .expect("resume on another CPU");
    assert!(r.decisions_changed);
    assert_eq!(r.decisions.pmu_layout, pmu::PmuLayout::None);
    assert_ne!(before.pmu_layout, pmu::PmuLayout::None);
    assert_eq!(stops.get(), 1, "one stop-the-world");
    let report = r.repatched.expect("re-patched");
    assert!(
        report.rewritten + report.unchanged > 0,
        "the image's sites were written: {report:?}"
    );
    assert_eq!(xenmsr::patch::routing().layout, Some(pmu::PmuLayout::None));
    assert_eq!((r.vpmu_registered, r.vpmu_errors), (0, 2));
    assert_eq!(take_ops(&calls), [], "no page registered again");
    assert!(pmu::global().is_parked(0) && pmu::global().is_parked(1));
    // The library still answers through the re-patched sites, as before.
    // SAFETY: as above.
    let apic_after = unsafe { xenmsr::rdmsr_safe(0x1b) };
    assert_eq!(
        apic_after, apic_before,
        "an APIC base read after the re-patch"
    );

    // A decision change whose stop-the-world never runs the patch: the resume says so,
    // and the sites and the routing stay as they were.
    lifecycle::suspend().expect("suspend");
    CPUID_GONE.store(false, Ordering::Release);
    let mut never_runs = |_: &mut dyn FnMut()| {};
    // SAFETY: nothing is patched (the hook does not run the closure).
    let r = unsafe { lifecycle::resume(SuspendOutcome::NewDomain, &new_frames, &mut never_runs) };
    assert_eq!(
        r.map(drop),
        Err(LifecycleError::Repatch(xenmsr::RepatchError::NotRun))
    );
    assert_eq!(xenmsr::patch::routing().layout, Some(pmu::PmuLayout::None));

    // A vCPU the library cannot name has no per-vCPU part.
    for id in [xenmsr::smp::UNKNOWN_VCPU, 64] {
        let (r, _) = on_vcpu(id, lifecycle::suspend_this_vcpu);
        let named = (id != xenmsr::smp::UNKNOWN_VCPU).then_some(id);
        assert_eq!(r, Err(LifecycleError::NoVcpuId(named)));
        let (r, _) = on_vcpu(id, lifecycle::resume_this_vcpu);
        assert_eq!(r, Err(LifecycleError::NoVcpuId(named)));
    }

    // The hypercall's return value.
    assert_eq!(
        SuspendOutcome::from_return(0),
        Ok(SuspendOutcome::NewDomain)
    );
    assert_eq!(
        SuspendOutcome::from_return(1),
        Ok(SuspendOutcome::Cancelled)
    );
    assert_eq!(
        SuspendOutcome::from_return(-22),
        Err(LifecycleError::UnexpectedReturn(-22))
    );
}
