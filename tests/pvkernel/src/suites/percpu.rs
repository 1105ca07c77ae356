//! SMP: bringing up events and the other vCPUs, what must differ per vCPU (the APIC
//! base's BSP bit, segment bases, including across vCPU switches), and the report of
//! where the timer upcalls landed.

use core::sync::atomic::{AtomicBool, Ordering};

use xenmsr::{rdmsr_safe, wrmsr_safe};

use super::{model, raw};
use crate::smp::{self, MAX_VCPUS, current_vcpu};
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, events, fail, hv, test};

/// Run on vCPU 0 alone: events, then the other vCPUs.
pub static BRING_UP: &[Test] = &[test!(events_come_up), test!(secondaries_come_up)];

/// Run on every vCPU at once (after `xenmsr::init`).
pub static TESTS: &[Test] = &[
    test!(each_vcpu_registers_its_own_id_once),
    test!(start_vcpu_refuses_what_cannot_start),
    test!(apic_base_bsp_bit_is_per_vcpu),
    test!(segment_bases_stay_on_their_vcpu),
    test!(segment_bases_survive_vcpu_switches),
];

/// Run on vCPU 0 after the upcalls have stopped.
pub static REPORT: &[Test] = &[
    test!(upcalls_interrupted_the_library),
    test!(unchecked_warnings_once_per_kind_across_vcpus),
];

const MSR_APIC_BASE: u32 = 0x1b;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;

static EVENTS_READY: AtomicBool = AtomicBool::new(false);

/// Whether `events_come_up` passed.
pub fn events_ready() -> bool {
    EVENTS_READY.load(Ordering::Acquire)
}

fn events_come_up() -> TestResult {
    let shared_info = crate::boot_info().start_info.shared_info;
    if let Err(e) = events::init_boot(shared_info) {
        fail!("events on vCPU 0: {e}");
    }
    check!(
        events::masked(),
        "upcalls are masked until the suites start the timer"
    );
    let t0 = events::now_ns();
    let _ = hv::page().sched_yield();
    let t1 = events::now_ns();
    check!(
        t0 > 0 && t1 >= t0,
        "Xen system time is not monotonic: {t0} then {t1}"
    );
    EVENTS_READY.store(true, Ordering::Release);
    Ok(())
}

fn secondaries_come_up() -> TestResult {
    let want = model().vcpus;
    match smp::start_secondaries(want) {
        Ok(n) => check_eq!(n, want, "vCPUs running"),
        Err(e) => fail!("bringing up {want} vCPUs: {e}"),
    }
    for v in 0..want {
        check_eq!(hv::page().vcpu_is_up(v), Ok(true), "VCPUOP_is_up");
    }
    crate::println!("smp: {want} vCPUs up");
    Ok(())
}

/// The library's vCPU-id check against real Xen: `init` registered vCPU 0; each other
/// vCPU registers under the id this kernel's hook gives it, once (a second registration
/// is the duplicate a hook that cannot tell vCPUs apart would make); Xen confirms every
/// running id and has no vCPU at the domain's vCPU count (`ENOENT`).
fn each_vcpu_registers_its_own_id_once() -> TestResult {
    use xenmsr::smp::{VcpuError, check_id_with_xen, is_registered, register_this_vcpu};
    let me = current_vcpu();
    check_eq!(
        xenmsr::smp::current_vcpu(),
        Some(me),
        "the library's vCPU id"
    );
    if me != 0 && !is_registered(me) {
        check_eq!(register_this_vcpu(), Ok(me), "first registration");
    }
    check!(is_registered(me), "vCPU {me} is not registered");
    check_eq!(
        register_this_vcpu(),
        Err(VcpuError::IdInUse(me)),
        "a second vCPU with the same id"
    );
    let page = hv::page();
    check_eq!(check_id_with_xen(page, me), Ok(()), "Xen on the running id");
    let count = model().vcpus;
    check_eq!(
        check_id_with_xen(page, count),
        Err(VcpuError::NoSuchVcpu(
            count,
            xenmsr_hypercall::Errno::ENOENT
        )),
        "Xen on the id at the vCPU count"
    );
    Ok(())
}

/// The kit's `start_vcpu` on requests Xen cannot honour: a vCPU that is already up, and
/// an id at the domain's vCPU count (`ENOENT`, what a dom0 without `dom0_max_vcpus=`
/// gets); neither claims the stack it was given, so the stack can still start a vCPU.
fn start_vcpu_refuses_what_cannot_start() -> TestResult {
    use xenmsr::smp::{StartError, VcpuStack, start_vcpu};
    static SPARE: VcpuStack = VcpuStack::new();
    fn never(_: u32) -> ! {
        crate::exit::crash()
    }
    if current_vcpu() != 0 {
        return Ok(());
    }
    let count = model().vcpus;
    if count > 1 {
        check_eq!(
            start_vcpu(1, &SPARE, never),
            Err(StartError::AlreadyUp(1)),
            "starting a running vCPU"
        );
    }
    check_eq!(
        start_vcpu(count, &SPARE, never),
        Err(StartError::NoSuchVcpu(
            count,
            xenmsr_hypercall::Errno::ENOENT
        )),
        "starting a vCPU beyond the count"
    );
    check!(!SPARE.is_claimed(), "a refused start claimed the stack");
    Ok(())
}

/// Xen sets the BSP bit of the APIC base on vCPU 0 only, and the library's fix-up does
/// the same through the vCPU id hook (Linux dom0 with 2 CPUs reads 0xfee00900 on CPU 0
/// and 0xfee00800 on CPU 1).
fn apic_base_bsp_bit_is_per_vcpu() -> TestResult {
    let want = if current_vcpu() == 0 {
        0xfee0_0900
    } else {
        0xfee0_0800
    };
    check_eq!(raw::rdmsr(MSR_APIC_BASE), Ok(want), "bare APIC_BASE");
    // SAFETY: reading the APIC base has no side effect.
    let library = unsafe { rdmsr_safe(MSR_APIC_BASE) };
    check_eq!(library, Ok(want), "library APIC_BASE");
    Ok(())
}

/// One word per vCPU that FS and GS point at, holding a value only that vCPU expects.
static TARGETS: [[u64; 2]; MAX_VCPUS] = raw::per_vcpu_words(0);

fn point_bases_at_target(v: usize) -> TestResult {
    let fs = TARGETS[v].as_ptr() as u64;
    let gs = fs + 8;
    // SAFETY: the kernel keeps no state in FS or GS; both point at this vCPU's targets
    // until the test resets them.
    let w = unsafe { wrmsr_safe(MSR_FS_BASE, fs) };
    check_eq!(w, Ok(()), "FS_BASE write");
    // SAFETY: as above.
    let w = unsafe { wrmsr_safe(MSR_GS_BASE, gs) };
    check_eq!(w, Ok(()), "GS_BASE write");
    Ok(())
}

fn check_bases_are_mine(v: usize, when: &str) -> TestResult {
    let fs = TARGETS[v].as_ptr() as u64;
    // SAFETY: reading a segment base has no side effect.
    let r = unsafe { rdmsr_safe(MSR_FS_BASE) };
    check_eq!(r, Ok(fs), "FS_BASE via the library");
    check_eq!(raw::rdmsr(MSR_GS_BASE), Ok(fs + 8), "GS_BASE via rdmsr");
    let (f, g) = (
        raw::load_at_segment_base(false),
        raw::load_at_segment_base(true),
    );
    check!(
        f == TARGETS[v][0] && g == TARGETS[v][1],
        "{when}: %fs:0 {f:#x} %gs:0 {g:#x}, expected this vCPU's {:#x} {:#x}",
        TARGETS[v][0],
        TARGETS[v][1]
    );
    Ok(())
}

fn reset_bases() {
    // SAFETY: the kernel keeps no state in FS or GS.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_GS_BASE, 0) };
}

/// Every vCPU points FS and GS at its own words at the same time; after all have done so
/// (a barrier), each still sees its own, never another vCPU's.
fn segment_bases_stay_on_their_vcpu() -> TestResult {
    let v = current_vcpu() as usize;
    let set = point_bases_at_target(v);
    smp::barrier();
    let r = set.and_then(|()| check_bases_are_mine(v, "after every vCPU set its bases"));
    smp::barrier();
    reset_bases();
    r
}

/// With more vCPUs than physical CPUs, Xen switches vCPUs on a CPU and must save and
/// restore each one's bases: 1,000 rounds of "set new bases, yield, check them", with the
/// run-state accounting showing the vCPU really waited for its CPU.
fn segment_bases_survive_vcpu_switches() -> TestResult {
    const ROUNDS: u64 = 1000;
    /// A vCPU alone on its physical CPU's run queue can finish its 1000 yields without Xen
    /// switching it out: it goes on, checking every 100 rounds, until it has been (or this
    /// bound passes).
    const MAX_ROUNDS: u64 = 200_000;
    let v = current_vcpu();
    // Every vCPU runs this test; start the yields together, so that all of them are
    // runnable at once and Xen really has to switch (a vCPU that got here while the others
    // were idle would yield to nobody).
    crate::smp::barrier();
    let runnable_time = || {
        hv::page()
            .vcpu_runstate_info(v)
            .map(|info| info.time[1])
            .map_err(|e| testing_failure(format_args!("VCPUOP_get_runstate_info: {e}")))
    };
    let before = runnable_time()?;
    // 4 vCPUs on 2 physical CPUs: the vCPU must have been runnable-but-not-running.
    let must_switch = smp::online() > 2;
    let mut result = Ok(());
    let (mut rounds, mut waited) = (0u64, 0u64);
    while rounds < ROUNDS || (must_switch && waited == 0 && rounds < MAX_ROUNDS) {
        let round = rounds;
        rounds += 1;
        let fs = 0x0000_4000_0000_0000 | u64::from(v) << 32 | (round & 0xf_ffff) << 12;
        let gs = !fs & 0x7fff_ffff_f000;
        // SAFETY: the kernel keeps no state in FS or GS.
        let wf = unsafe { wrmsr_safe(MSR_FS_BASE, fs) };
        // SAFETY: as above.
        let wg = unsafe { wrmsr_safe(MSR_GS_BASE, gs) };
        let w = (wf, wg);
        let _ = hv::page().sched_yield();
        // SAFETY: reading a segment base has no side effect.
        let rf = unsafe { rdmsr_safe(MSR_FS_BASE) };
        // SAFETY: as above.
        let rg = unsafe { rdmsr_safe(MSR_GS_BASE) };
        let r = (rf, rg);
        if w != (Ok(()), Ok(())) || r != (Ok(fs), Ok(gs)) {
            result = Err(testing_failure(format_args!(
                "round {round}: wrote {w:?}, read {r:?}, expected FS {fs:#x}"
            )));
            break;
        }
        if rounds % 100 == 0 {
            waited = runnable_time()? - before;
        }
    }
    reset_bases();
    result?;
    waited = runnable_time()? - before;
    if must_switch {
        check!(
            waited > 0,
            "vCPU {v} was never descheduled in {rounds} yields"
        );
    }
    crate::println!("  vCPU {v}: {rounds} yields, {waited} ns waiting for a CPU");
    Ok(())
}

fn testing_failure(args: core::fmt::Arguments<'_>) -> crate::testing::Failure {
    crate::testing::Failure::new(args)
}

/// Every vCPU took timer upcalls while the suites ran, its handler's library accesses
/// all gave the right results, and some upcalls landed inside a library stub or call site.
fn upcalls_interrupted_the_library() -> TestResult {
    let (mut stub, mut site) = (0, 0);
    for v in 0..smp::online() as usize {
        let s = events::stats(v);
        let l = |c: &core::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        crate::println!(
            "upcalls: vCPU {v}: {} upcalls, {} timer, {} in a stub, {} in a call site, {} in a hypercall page, {} handler runs, {} errors",
            l(&s.total),
            l(&s.timer),
            l(&s.in_stub),
            l(&s.in_site),
            l(&s.in_hypercall_page),
            l(&s.worked),
            l(&s.errors)
        );
        stub += l(&s.in_stub);
        site += l(&s.in_site);
        if model().tick_us != 0 {
            check!(
                l(&s.worked) > 0,
                "vCPU {v}: the handler never accessed MSRs"
            );
        }
        check!(
            l(&s.errors) == 0,
            "{} wrong results in vCPU {v}'s handler (first: {:#x})",
            l(&s.errors),
            l(&s.first_error)
        );
    }
    crate::println!("upcalls: inside a stub {stub}, at a call site {site}");
    check_eq!(events::timer_errors(), 0u64, "timer re-arm failures");
    if model().tick_us != 0 {
        check!(stub + site > 0, "no upcall interrupted a stub or call site");
    }
    Ok(())
}

/// While the vCPUs ran the suites concurrently (every vCPU's stress makes the same kinds of
/// unchecked failure), no kind of failure warned twice.
fn unchecked_warnings_once_per_kind_across_vcpus() -> TestResult {
    let (kinds, max, total) = crate::library::warnings_per_kind();
    crate::println!("warnings: {total} for {kinds} kinds of failure, at most {max} per kind");
    check!(max <= 1, "a kind of failure warned {max} times");
    check!(
        kinds > 0,
        "no unchecked access warned (the stress runs some)"
    );
    Ok(())
}
