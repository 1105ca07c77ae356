//! vCPU hotplug churn: while vCPU 0 runs the 100,000-operation stress, every other vCPU
//! goes down (`VCPUOP_down` on itself) and comes back up ([`CYCLES`] times), with timer
//! upcalls on. vCPU 0 brings them back (`VCPUOP_up` from its timer upcall handler, and
//! from its wait once its stress is done), as Linux's CPU that runs `cpu_up` does.
//!
//! Around each down/up the vCPU does what the library asks of a kernel: before,
//! `xenmsr::smp::offline_this_vcpu` (its vPMU registration finished and its page parked,
//! its id freed); after, `xenmsr::smp::online_this_vcpu` (its id registered again,
//! CR4.FSGSBASE if the sites use it, the vPMU page registered again). After each return
//! the vCPU checks, through the library: its segment bases (set before the churn) are
//! unchanged, its APIC base has no BSP bit, and on a vPMU model its page is registered
//! again and a PMU counter reads. Its report line: `hotplug: vCPU N: C down/up cycles`.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use xenmsr::pmu;
use xenmsr::smp::{offline_this_vcpu, online_this_vcpu};
use xenmsr::{rdmsr_safe, wrmsr_safe};

use super::model;
use crate::boot::mfn_of;
use crate::smp::{self, MAX_VCPUS, current_vcpu};
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, events, fail, hv, test};

/// Run on every vCPU at once.
pub static TESTS: &[Test] = &[test!(vcpus_go_down_and_up_while_vcpu0_stresses)];

/// Down/up cycles of each vCPU but 0.
pub const CYCLES: u64 = 200;

const MSR_APIC_BASE: u32 = 0x1b;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
/// A counter every vPMU model of the suites has (EPYC: family 0x17's core counter 0).
const MSR_F15H_PERF_CTR0: u32 = 0xc001_0201;

/// Set while the churn runs: vCPU 0's upcall handler then brings vCPUs up.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Each vCPU's request to be brought up again (set just before it goes down).
static WANT_UP: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
/// Each vCPU's completed cycles.
static DONE_CYCLES: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
/// vCPUs still churning.
static CHURNING: AtomicU32 = AtomicU32::new(0);

/// A vPMU page per vCPU for the churn (registered for the rest of the run: the
/// shutdown path finishes them all).
#[repr(C, align(4096))]
struct PmuPage(UnsafeCell<[u8; 4096]>);
// SAFETY: each page is only handed to the backend and Xen, by its own vCPU.
unsafe impl Sync for PmuPage {}
static PAGES: [PmuPage; MAX_VCPUS] = [const { PmuPage(UnsafeCell::new([0; 4096])) }; MAX_VCPUS];

/// Before the churn phase (vCPU 0, the others idle): every other vCPU will churn.
pub fn arm() {
    CHURNING.store(smp::online().saturating_sub(1), Ordering::Release);
    ACTIVE.store(true, Ordering::Release);
}

/// After it.
pub fn disarm() {
    ACTIVE.store(false, Ordering::Release);
    CHURNED.store(true, Ordering::Release);
}

/// Brings up every vCPU that went down asking for it (vCPU 0's upcall handler calls this
/// while the churn runs).
pub fn bring_up_waiting() {
    if !ACTIVE.load(Ordering::Acquire) {
        return;
    }
    let page = hv::page();
    for v in 1..smp::online() {
        if WANT_UP[v as usize].load(Ordering::Acquire) && page.vcpu_is_up(v) == Ok(false) {
            // SAFETY: vCPU `v` stopped itself with `VCPUOP_down` in the churn loop below,
            // holding nothing (upcalls masked, no lock, the library told); it resumes
            // there, on its own stack.
            let _ = unsafe { page.vcpu_up(v) };
        }
    }
}

/// Whether the churn has run (its vCPUs keep their vPMU pages registered to the end).
static CHURNED: AtomicBool = AtomicBool::new(false);

/// Before the final `SCHEDOP_shutdown`: `pmu::park_all` finishes every registered vPMU;
/// it must finish exactly the vCPUs that had a page (on a vPMU model after the churn:
/// every vCPU that churned) and leave none registered.
pub fn finish_every_vpmu() -> TestResult {
    let registered: u32 = (0..MAX_VCPUS as u32)
        .filter(|&v| pmu::global().is_initialized(v))
        .count() as u32;
    let finished = pmu::park_all();
    crate::println!("shutdown: vPMU finished on {registered} vCPUs ({finished:?})");
    check_eq!(finished, Ok(registered), "pmu::park_all");
    for v in 0..MAX_VCPUS as u32 {
        check!(
            !pmu::global().is_initialized(v),
            "vCPU {v}'s vPMU is still registered"
        );
    }
    if CHURNED.load(Ordering::Acquire) && model().vpmu_active {
        check_eq!(
            registered,
            smp::online() - 1,
            "vPMU pages registered at shutdown"
        );
    }
    Ok(())
}

/// Whether the churn phase is running (for the upcall handler).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

fn vcpus_go_down_and_up_while_vcpu0_stresses() -> TestResult {
    let me = current_vcpu();
    if me == 0 {
        let stress = super::routing::stress_ops("hotplug stress");
        // The others may still be churning: keep bringing them up.
        let mut spins = 0u64;
        while CHURNING.load(Ordering::Acquire) != 0 {
            bring_up_waiting();
            let _ = hv::page().sched_yield();
            spins += 1;
            check!(spins < 50_000_000, "the churning vCPUs never finished");
        }
        stress?;
        for v in 1..smp::online() {
            check_eq!(
                DONE_CYCLES[v as usize].load(Ordering::Acquire),
                CYCLES,
                "down/up cycles of a vCPU"
            );
        }
        return Ok(());
    }
    let result = churn(me);
    CHURNING.fetch_sub(1, Ordering::AcqRel);
    result
}

/// `CYCLES` down/up cycles of vCPU `me`, checked after each.
fn churn(me: u32) -> TestResult {
    let vpmu = model().vpmu_active;
    if vpmu {
        let page = NonNull::new(PAGES[me as usize].0.get().cast::<u8>()).expect("static");
        // SAFETY: this vCPU's own static page (4 KiB, aligned), `mfn_of` its frame; it stays
        // the backend's for the rest of the run.
        let r = unsafe { pmu::init(me, page, mfn_of(page.as_ptr() as usize)) };
        check_eq!(r, Ok(()), "pmu::init before the churn");
    }
    let (fs, gs) = (
        0x0000_5000_0000_0000 | u64::from(me) << 32,
        0x0000_5100_0000_0000 | u64::from(me) << 32,
    );
    // SAFETY: nothing in this kernel addresses memory through FS or GS here.
    let fs_written = unsafe { wrmsr_safe(MSR_FS_BASE, fs) };
    // SAFETY: as above.
    let gs_written = unsafe { wrmsr_safe(MSR_GS_BASE, gs) };
    check_eq!(
        (fs_written, gs_written),
        (Ok(()), Ok(())),
        "FS/GS base writes"
    );
    let page = hv::page();
    for cycle in 0..CYCLES {
        let offline = match offline_this_vcpu() {
            Ok(o) => o,
            Err(e) => fail!("cycle {cycle}: offline_this_vcpu: {e}"),
        };
        check_eq!(offline.id, me, "offline id");
        check_eq!(offline.vpmu_parked, vpmu, "vPMU parked at offline");
        {
            // As Linux's dying CPU: upcalls off while it goes down.
            let _masked = events::mask();
            WANT_UP[me as usize].store(true, Ordering::Release);
            // SAFETY: this vCPU holds nothing others wait for (no lock, upcalls masked, the
            // library told); vCPU 0 brings it up again and it resumes right here.
            let down = unsafe { page.vcpu_down(me) };
            WANT_UP[me as usize].store(false, Ordering::Release);
            check_eq!(down, Ok(()), "VCPUOP_down on itself");
        }
        let online = match online_this_vcpu() {
            Ok(o) => o,
            Err(e) => fail!("cycle {cycle}: online_this_vcpu: {e}"),
        };
        check_eq!(online.id, me, "online id");
        if vpmu {
            check_eq!(online.vpmu, Some(Ok(())), "vPMU page registered again");
            check!(
                pmu::global().is_initialized(me),
                "cycle {cycle}: no vPMU page after online"
            );
            // SAFETY: reading a PMU counter has no side effects.
            let counter = unsafe { rdmsr_safe(MSR_F15H_PERF_CTR0) };
            check!(
                counter.is_ok(),
                "cycle {cycle}: PMU counter read: {counter:?}"
            );
        } else {
            check_eq!(online.vpmu, None, "no vPMU to register again");
        }
        // The timer may have fired while the vCPU was down (its upcall then came on
        // return) or not: arm it again either way.
        events::rearm();
        // SAFETY: reading the segment bases and the APIC base has no side effects.
        let fs_now = unsafe { rdmsr_safe(MSR_FS_BASE) };
        // SAFETY: as above.
        let gs_now = unsafe { rdmsr_safe(MSR_GS_BASE) };
        check_eq!(
            (fs_now, gs_now),
            (Ok(fs), Ok(gs)),
            "segment bases after down/up"
        );
        // SAFETY: as above.
        let apic = unsafe { rdmsr_safe(MSR_APIC_BASE) };
        check_eq!(apic, Ok(0xfee0_0800), "APIC base after down/up");
        DONE_CYCLES[me as usize].fetch_add(1, Ordering::AcqRel);
    }
    crate::println!(
        "  hotplug: vCPU {me}: {} down/up cycles, vPMU {}",
        DONE_CYCLES[me as usize].load(Ordering::Acquire),
        if vpmu {
            "parked and registered again each time"
        } else {
            "off"
        }
    );
    // SAFETY: nothing addresses memory through FS or GS.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_GS_BASE, 0) };
    Ok(())
}
