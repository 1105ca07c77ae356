//! The library's half of vCPU hotplug, through the mock hypercall page: a vCPU going
//! offline (`smp::offline_this_vcpu`) finishes its vPMU registration (`XENPMU_finish` for
//! its id, as Linux does for a CPU going down), keeps its page parked and frees its id;
//! back online (`smp::online_this_vcpu`) it registers its id again (Xen asked with
//! `VCPUOP_is_up`) and the parked page again (`XENPMU_init` with the same frame and id).
//! A finish Xen refuses leaves the page unparked (Xen may still write it: it is never
//! handed to Xen again), and `pmu::park_all` (before a shutdown) finishes every
//! registered vCPU.
//!
//! Host threads play the vCPUs, each with its id in a thread-local; the mock answers
//! `xenpmu_op` and `vcpu_op` per thread and records them. One test per binary: `init`
//! state is per process.

use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use xenmsr::pmu::{self, PmuError};
use xenmsr::smp::{self, Offline, Online, VcpuError};
use xenmsr_hypercall::abi::XenPmuParams;
use xenmsr_hypercall::{Errno, mock, nr};

thread_local! {
    static MY_ID: Cell<u32> = const { Cell::new(0) };
}

fn thread_id() -> u32 {
    MY_ID.get()
}

#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; 4096]>);
// SAFETY: each page is only handed to the backend (and the mock "Xen"), by one thread.
unsafe impl Sync for Page {}
static PAGES: [Page; 4] = [const { Page(UnsafeCell::new([0; 4096])) }; 4];

fn page(id: u32) -> NonNull<u8> {
    NonNull::new(PAGES[id as usize].0.get().cast()).expect("static")
}

/// The `(op, mfn, vcpu)` of every `xenpmu_op` the thread made.
type PmuCalls = Arc<Mutex<Vec<(u64, u64, u32)>>>;

/// On a new thread named `id`: `VCPUOP_is_up` answers up, every `xenpmu_op` is recorded
/// and answered `finish_result` for a finish (0 otherwise).
fn on_vcpu<R: Send + 'static>(
    id: u32,
    finish_result: i64,
    f: impl FnOnce(&PmuCalls) -> R + Send + 'static,
) -> R {
    std::thread::spawn(move || {
        MY_ID.set(id);
        mock::on(nr::VCPU_OP, |_| 1);
        let calls: PmuCalls = Arc::default();
        let seen = calls.clone();
        mock::on(nr::XENPMU_OP, move |args| {
            // SAFETY: the backend passes a `XenPmuParams` it owns for the call (or null).
            let params = unsafe { (args[1] as *const XenPmuParams).as_ref() };
            let (mfn, vcpu) = params.map_or((0, 0), |p| (p.val, p.vcpu));
            seen.lock().unwrap().push((args[0], mfn, vcpu));
            if args[0] == u64::from(nr::XENPMU_FINISH) {
                finish_result
            } else {
                0
            }
        });
        f(&calls)
    })
    .join()
    .expect("vCPU thread")
}

const INIT: u64 = nr::XENPMU_INIT as u64;
const FINISH: u64 = nr::XENPMU_FINISH as u64;

#[test]
fn a_vcpu_goes_offline_and_comes_back_with_its_vpmu() {
    xenmsr_host_tests::install_fault_handlers();
    let config = xenmsr_host_tests::mock_xen_pv_config().with_vcpu_id(thread_id);
    // SAFETY: the host test harness's contract for `init` (text patched through
    // mprotect, the mock hypercall page), once per process.
    unsafe { xenmsr::init(config) }.expect("init");
    if pmu::global().layout() == pmu::PmuLayout::None {
        eprintln!("no PMU layout on this host CPU: the vPMU half is not exercised");
    }
    let vpmu = pmu::global().layout() != pmu::PmuLayout::None;

    // vCPU 1: registers, its vPMU page at frame 0x1001, offline, online.
    let (offline, online, calls) = on_vcpu(1, 0, move |calls| {
        assert_eq!(smp::register_this_vcpu(), Ok(1));
        // SAFETY: a static page only this thread hands out; 0x1001 is the mock's frame.
        let init = unsafe { pmu::init(1, page(1), 0x1001) };
        assert_eq!(init.is_ok(), vpmu, "pmu::init: {init:?}");
        let offline = smp::offline_this_vcpu();
        assert!(!smp::is_registered(1), "offline frees the id");
        assert_eq!(pmu::global().is_parked(1), vpmu);
        assert!(!pmu::global().is_initialized(1));
        // A second offline: the vCPU is not registered any more.
        assert_eq!(smp::offline_this_vcpu(), Err(VcpuError::NotRegistered(1)));
        let online = smp::online_this_vcpu();
        assert!(smp::is_registered(1));
        assert_eq!(pmu::global().is_initialized(1), vpmu);
        assert!(!pmu::global().is_parked(1));
        (offline, online, calls.lock().unwrap().clone())
    });
    assert_eq!(
        offline,
        Ok(Offline {
            id: 1,
            vpmu_parked: vpmu
        })
    );
    assert_eq!(
        online,
        Ok(Online {
            id: 1,
            fsgsbase_restored: false,
            vpmu: vpmu.then_some(Ok(())),
        })
    );
    if vpmu {
        let ops: Vec<(u64, u64, u32)> = calls
            .iter()
            .copied()
            .filter(|&(op, ..)| op == INIT || op == FINISH)
            .collect();
        assert_eq!(
            ops,
            [(INIT, 0x1001, 1), (FINISH, 0, 1), (INIT, 0x1001, 1)],
            "init, finish at offline, init again at the same frame at online"
        );
    }

    // vCPU 2: Xen refuses the finish: the page is not parked (nor reused), the vCPU still
    // goes offline, and comes back without a vPMU.
    if vpmu {
        let (offline, online) = on_vcpu(2, -i64::from(Errno::EINVAL.0), |_| {
            assert_eq!(smp::register_this_vcpu(), Ok(2));
            // SAFETY: as above.
            unsafe { pmu::init(2, page(2), 0x2002) }.expect("init");
            let offline = smp::offline_this_vcpu();
            assert!(!pmu::global().is_parked(2) && !pmu::global().is_initialized(2));
            (offline, smp::online_this_vcpu())
        });
        assert_eq!(
            offline,
            Ok(Offline {
                id: 2,
                vpmu_parked: false
            })
        );
        assert_eq!(online.map(|o| o.vpmu), Ok(None));
    }

    // Before shutdown: every registered vCPU's vPMU is finished (and parked).
    if vpmu {
        let parked = on_vcpu(3, 0, |calls| {
            assert_eq!(smp::register_this_vcpu(), Ok(3));
            // SAFETY: as above.
            unsafe { pmu::init(3, page(3), 0x3003) }.expect("init");
            let parked = pmu::park_all();
            let finished: Vec<u32> = calls
                .lock()
                .unwrap()
                .iter()
                .filter(|&&(op, ..)| op == FINISH)
                .map(|&(_, _, vcpu)| vcpu)
                .collect();
            (parked, finished)
        });
        assert_eq!(parked.0, Ok(2), "vCPUs 1 and 3 had pages");
        assert_eq!(parked.1, [1, 3]);
        assert!(!pmu::global().is_initialized(1) && !pmu::global().is_initialized(3));
        assert_eq!(pmu::unpark(3), Ok(()), "a parked page registers again");
        assert!(pmu::global().release_parked(1).is_some());
        assert_eq!(pmu::unpark(1), Err(PmuError::NotInitialized));
    }
}
