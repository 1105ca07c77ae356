//! A domU's life after boot, driven from dom0: `xl save`/`xl restore`, `xl save -c`
//! (a cancelled suspend), `xl migrate` to localhost and `xl vcpu-set`, while every vCPU
//! runs a stress of MSR accesses through the library with timer upcalls on.
//!
//! The guest speaks just enough xenstore (the kit's `xenmsr::xenstore`) to hear the
//! toolstack: a watch on `control/shutdown` (`suspend`: acknowledge with `""` and
//! suspend; `poweroff`: end the run) and one on `cpu` (`cpu/1/availability`:
//! `offline`/`online`). Around the suspend hypercall it does what a PV kernel must
//! (publish its p2m for the save, turn the store and console frames in `start_info` into
//! PFNs, unmap the shared info frame, suspend on vCPU 0 with the `start_info` frame in
//! `rdx`) and what the library asks (`xenmsr::lifecycle`: each vCPU's part, vCPU 0's
//! part); after it, it re-establishes what Xen forgot in a new domain (shared info,
//! timers and their ports, the console and xenstore ports, the xenstore watches, the p2m
//! root) and checks, on every vCPU, that every segment base and MSR it wrote reads back
//! unchanged, that the stress lost no operation and counted none twice, and that the vPMU
//! works where the run has one.
//!
//! Its lines the harness counts: `lifecycle: ready`, `lifecycle: resumed (new domain) #N
//! after P ms` / `lifecycle: resumed (cancelled) #N after P ms`, `lifecycle: vCPU 1
//! offline #N` / `online #N`, and the report at the end.

use core::mem::offset_of;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use xenmsr::lifecycle::{self, SuspendOutcome};
use xenmsr::xenstore::{self, Client, XsError};
use xenmsr::{MsrError, pmu, rdmsr_safe, wrmsr_safe};
use xenmsr_hypercall::abi::{ArchSharedInfo, StartInfo};

use super::{model, routing};
use crate::boot::{mfn_of, pfn_of};
use crate::smp::{self, MAX_VCPUS, current_vcpu};
use crate::testing::{self, Test, TestResult};
use crate::{check, check_eq, events, fail, hv, test};

const MSR_APIC_BASE: u32 = 0x1b;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_BOGUS: u32 = 0x1234_5678;
const MSR_F15H_PERF_CTR0: u32 = 0xc001_0201;

/// The whole suite (vCPU 0; the others are in the team's worker loop).
pub fn run() {
    testing::run(super::percpu::BRING_UP);
    if smp::online() != model().vcpus || !super::percpu::events_ready() {
        return;
    }
    events::set_handler_work(true);
    smp::run_on_all(|_| events::start_ticking(model().tick_us * 1000));
    smp::stop_the_world(|| testing::run(routing::INIT_TESTS));
    smp::run_on_all(|_| testing::run(REGISTER));
    testing::run(SETUP);
    if !READY.load(Ordering::Acquire) {
        return;
    }
    smp::run_on_all(|_| testing::run(STRESS));
    smp::run_on_all(|_| events::stop_ticking());
    testing::run(REPORT);
}

static REGISTER: &[Test] = &[test!(each_vcpu_registers_with_the_library)];
static SETUP: &[Test] = &[test!(guest_is_ready_for_its_lifecycle)];

/// Every vCPU but 0 (which `init` registered) tells the library its id, as a kernel does
/// before a secondary's first MSR access.
fn each_vcpu_registers_with_the_library() -> TestResult {
    let me = current_vcpu();
    if me != 0 {
        check_eq!(
            xenmsr::smp::register_this_vcpu(),
            Ok(me),
            "register_this_vcpu"
        );
    }
    check!(xenmsr::smp::is_registered(me), "vCPU {me} is registered");
    Ok(())
}
static STRESS: &[Test] = &[test!(stress_through_saves_migrations_and_vcpu_set)];
static REPORT: &[Test] = &[test!(stress_totals_add_up)];

// ---------------------------------------------------------------------------------------
// Set-up: p2m, xenstore, vPMU pages.
// ---------------------------------------------------------------------------------------

static READY: AtomicBool = AtomicBool::new(false);

/// The xenstore connection (vCPU 0 only drives it; the lock is for the compiler).
static STORE: spin::Mutex<Option<Client<StoreTransport>>> = spin::Mutex::new(None);
/// The store's event channel (new after a restore).
static STORE_PORT: AtomicU32 = AtomicU32::new(0);

/// Kicks xenstored through the store port; waits by yielding, a bounded number of times.
struct StoreTransport {
    waits: core::cell::Cell<u32>,
}

impl xenstore::Transport for StoreTransport {
    fn begin(&self) {
        self.waits.set(0);
    }
    fn notify(&self) {
        let _ = hv::page().evtchn_send(STORE_PORT.load(Ordering::Acquire));
    }
    fn wait(&self) -> bool {
        let n = self.waits.get() + 1;
        self.waits.set(n);
        let _ = hv::page().sched_yield();
        // Under TCG xenstored may take seconds to answer; about 30 s of yields.
        n < 3_000_000
    }
}

/// The `start_info` page Xen gave at entry (the toolstack rewrites this one).
fn start_info_page() -> *mut StartInfo {
    xenmsr_asm::pv::start_info_page().map_or(ptr::null_mut(), NonNull::as_ptr)
}

fn read_start_info() -> StartInfo {
    // SAFETY: the page Xen passed at entry, mapped for the domain's life; read with one
    // volatile copy (the toolstack writes it only while the domain is suspended).
    unsafe { start_info_page().read_volatile() }
}

/// Publishes the linear p2m for the toolstack's save (`arch_shared_info`): the list at
/// `start_info.mfn_list`, mapped under this vCPU's page tables, one entry per page.
fn publish_p2m() -> TestResult {
    let arch = events::arch_shared_info();
    check!(!arch.is_null(), "the shared info page is not mapped");
    let info = crate::boot_info().start_info;
    check_eq!(info.mfn_list & 0xfff, 0, "the p2m list is page aligned");
    let cr3: u64;
    // SAFETY: a PV kernel may read cr3 (Xen emulates it: the top-level table's frame in
    // cr3 format, what `p2m_cr3` wants).
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let field = |offset: usize| arch.cast::<u8>().wrapping_add(offset).cast::<u64>();
    for (offset, value) in [
        (offset_of!(ArchSharedInfo, max_pfn), info.nr_pages),
        (offset_of!(ArchSharedInfo, p2m_vaddr), info.mfn_list),
        (offset_of!(ArchSharedInfo, p2m_generation), 0),
        (offset_of!(ArchSharedInfo, p2m_cr3), cr3),
    ] {
        // SAFETY: an aligned word of the x86 part of the mapped shared info page, written
        // volatile (no reference into the page); the toolstack reads it during a save.
        unsafe { field(offset).write_volatile(value) };
    }
    Ok(())
}

/// A `u64` field of the `start_info` page Xen gave at entry.
fn start_info_field(offset: usize) -> *mut u64 {
    start_info_page()
        .cast::<u8>()
        .wrapping_add(offset)
        .cast::<u64>()
}

/// Rewrites the `start_info` page's store and console frame fields with `f`.
fn rewrite_ring_frames(f: impl Fn(u64) -> u64) {
    for offset in [
        offset_of!(StartInfo, store_mfn),
        offset_of!(StartInfo, console_mfn),
    ] {
        let field = start_info_field(offset);
        // SAFETY: an aligned `u64` field of the start_info page, mapped for the domain's
        // life; nothing else writes it while the domain runs.
        let value = unsafe { field.read_volatile() };
        // SAFETY: as above.
        unsafe { field.write_volatile(f(value)) };
    }
}

/// Connects to xenstore at the store page of `info` and registers the watches.
fn connect_store(info: &StartInfo) -> Result<(), XsError> {
    STORE_PORT.store(info.store_evtchn, Ordering::Release);
    let va = pfn_of(info.store_mfn) << 12;
    let ring = NonNull::new(va as *mut u8).ok_or(XsError::Protocol("store page at 0"))?;
    // SAFETY: the builder maps the store page in the start-of-day mapping (VIRT_BASE 0)
    // for the domain's life; only this client writes it, behind `STORE`.
    let ring = unsafe { xenstore::Ring::new(ring) };
    let mut client = Client::new(
        ring,
        StoreTransport {
            waits: core::cell::Cell::new(0),
        },
    );
    client.watch("control/shutdown", "sd")?;
    client.watch("cpu", "cpu")?;
    *STORE.lock() = Some(client);
    Ok(())
}

#[repr(C, align(4096))]
struct PmuPage(core::cell::UnsafeCell<[u8; 4096]>);
// SAFETY: each page is only handed to the backend and Xen, by vCPU 0 for vCPU n.
unsafe impl Sync for PmuPage {}
static PMU_PAGES: [PmuPage; MAX_VCPUS] =
    [const { PmuPage(core::cell::UnsafeCell::new([0; 4096])) }; MAX_VCPUS];

fn guest_is_ready_for_its_lifecycle() -> TestResult {
    check!(!model().dom0, "the lifecycle suite runs as a domU only");
    check!(
        !start_info_page().is_null(),
        "the kit kept no start_info page"
    );
    publish_p2m()?;
    if let Err(e) = connect_store(&read_start_info()) {
        fail!("xenstore: {e}");
    }
    if model().vpmu_active {
        for v in 0..smp::online() {
            let page = NonNull::new(PMU_PAGES[v as usize].0.get().cast::<u8>()).expect("static");
            // SAFETY: vCPU v's own static page (4 KiB, aligned), its frame from the p2m;
            // it stays the backend's for the rest of the run.
            let r = unsafe { pmu::init(v, page, mfn_of(page.as_ptr() as usize)) };
            check_eq!(r, Ok(()), "pmu::init");
        }
    }
    READY.store(true, Ordering::Release);
    println!(
        "lifecycle: ready ({} vCPUs, vPMU {})",
        smp::online(),
        if model().vpmu_active { "on" } else { "off" }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The stress, and what each vCPU checks after each event.
// ---------------------------------------------------------------------------------------

/// Set by vCPU 0 when the toolstack asks for the power-off: every vCPU stops.
static STOP: AtomicBool = AtomicBool::new(false);
/// Operations per vCPU, and all of them (each counted once in both).
static OPS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static TOTAL_OPS: AtomicU64 = AtomicU64::new(0);
/// Wrong answers per vCPU (a value that did not read back, a fault where none belongs).
static WRONG: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
static FIRST_WRONG: spin::Mutex<Option<(u32, u64, &'static str, u64)>> = spin::Mutex::new(None);
/// The longest gap between two operations of a vCPU outside the events, in ns.
static LONGEST_GAP: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

/// Suspend requests vCPU 0 makes of the others (a generation) and how many are parked.
static SUSPEND_GEN: AtomicU64 = AtomicU64::new(0);
static SUSPEND_HOLD: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicU32 = AtomicU32::new(0);
static RESUMED: AtomicU32 = AtomicU32::new(0);
/// Failures the parked vCPUs found after a resume.
static RESUME_FAILURES: AtomicU64 = AtomicU64::new(0);

/// `xl vcpu-set`: vCPU 1 asked to go offline; whether it is down.
static OFFLINE_REQUEST: AtomicBool = AtomicBool::new(false);
static VCPU1_DOWN: AtomicBool = AtomicBool::new(false);
static VCPU1_CYCLES: AtomicU64 = AtomicU64::new(0);

/// Events counted by vCPU 0.
static NEW_DOMAINS: AtomicU64 = AtomicU64::new(0);
static CANCELLED: AtomicU64 = AtomicU64::new(0);
static LONGEST_PAUSE_NS: AtomicU64 = AtomicU64::new(0);

fn fs_pattern(vcpu: u32, n: u64) -> u64 {
    0x0000_1000_0000_0000 | u64::from(vcpu) << 40 | (n & 0xff_ffff_ffff) << 4
}

/// The values each vCPU writes once and checks after every event.
fn fixed_values(vcpu: u32) -> [(u32, u64); 2] {
    [
        (MSR_GS_BASE, 0x0000_2000_0000_0000 | u64::from(vcpu) << 32),
        (
            MSR_KERNEL_GS_BASE,
            0x0000_3000_0000_0000 | u64::from(vcpu) << 32,
        ),
    ]
}

/// TSC_AUX where the vCPU may write it (Xen keeps it across a save when nonzero).
static TSC_AUX_WRITTEN: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];
/// SPEC_CTRL where the vCPU may write it (bit 0, IBRS).
static SPEC_CTRL_WRITTEN: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];

fn tsc_aux_value(vcpu: u32) -> u64 {
    0x100 + u64::from(vcpu)
}

fn note_wrong(vcpu: u32, n: u64, what: &'static str, got: u64) {
    WRONG[vcpu as usize].fetch_add(1, Ordering::AcqRel);
    let mut first = FIRST_WRONG.lock();
    if first.is_none() {
        *first = Some((vcpu, n, what, got));
    }
}

/// Writes what this vCPU checks after each event.
fn write_fixed_values(vcpu: u32) -> TestResult {
    // SAFETY: nothing in this kernel addresses memory through FS.
    let fs = unsafe { wrmsr_safe(MSR_FS_BASE, fs_pattern(vcpu, 0)) };
    check_eq!(fs, Ok(()), "FS base write");
    for (msr, value) in fixed_values(vcpu) {
        // SAFETY: nothing in this kernel addresses memory through GS or the kernel GS base.
        let r = unsafe { wrmsr_safe(msr, value) };
        check_eq!(r, Ok(()), "write of MSR {msr:#x}");
    }
    // SAFETY: TSC_AUX only changes what RDTSCP/RDPID report; this kernel uses neither.
    let aux = unsafe { wrmsr_safe(MSR_TSC_AUX, tsc_aux_value(vcpu)) };
    TSC_AUX_WRITTEN[vcpu as usize].store(aux.is_ok(), Ordering::Release);
    // SAFETY: IBRS only restricts speculation.
    let spec = unsafe { wrmsr_safe(lifecycle::MSR_SPEC_CTRL, 1) };
    SPEC_CTRL_WRITTEN[vcpu as usize].store(spec.is_ok(), Ordering::Release);
    if vcpu == 0 {
        println!(
            "lifecycle: TSC_AUX {}, SPEC_CTRL {}",
            if aux.is_ok() { "writable" } else { "faults" },
            if spec.is_ok() { "writable" } else { "faults" }
        );
    }
    Ok(())
}

/// Checks, on this vCPU, every value it wrote that Xen keeps; a description of the first
/// difference otherwise.
fn check_fixed_values(vcpu: u32, n: u64) -> Result<(), (&'static str, u64)> {
    // SAFETY: reading MSRs has no side effects.
    let fs = unsafe { rdmsr_safe(MSR_FS_BASE) };
    if fs != Ok(fs_pattern(vcpu, n)) {
        return Err(("FS base", fs.unwrap_or(u64::MAX)));
    }
    for (msr, value) in fixed_values(vcpu) {
        // SAFETY: as above.
        let got = unsafe { rdmsr_safe(msr) };
        if got != Ok(value) {
            return Err((
                if msr == MSR_GS_BASE {
                    "GS base"
                } else {
                    "kernel GS base"
                },
                got.unwrap_or(u64::MAX),
            ));
        }
    }
    if TSC_AUX_WRITTEN[vcpu as usize].load(Ordering::Acquire) {
        // SAFETY: as above.
        let got = unsafe { rdmsr_safe(MSR_TSC_AUX) };
        if got != Ok(tsc_aux_value(vcpu)) {
            return Err(("TSC_AUX", got.unwrap_or(u64::MAX)));
        }
    }
    if SPEC_CTRL_WRITTEN[vcpu as usize].load(Ordering::Acquire) {
        // SAFETY: as above.
        let got = unsafe { rdmsr_safe(lifecycle::MSR_SPEC_CTRL) };
        if got != Ok(1) {
            return Err(("SPEC_CTRL", got.unwrap_or(u64::MAX)));
        }
    }
    // SAFETY: as above.
    let apic = unsafe { rdmsr_safe(MSR_APIC_BASE) };
    let bsp = if vcpu == 0 { 0x100 } else { 0 };
    if apic != Ok(0xfee0_0800 | bsp) {
        return Err(("APIC base", apic.unwrap_or(u64::MAX)));
    }
    if model().vpmu_active {
        if !pmu::global().is_initialized(vcpu) {
            return Err(("vPMU registration", 0));
        }
        // SAFETY: as above.
        if let Err(e) = unsafe { rdmsr_safe(MSR_F15H_PERF_CTR0) } {
            return Err(("PMU counter read", msr_error_code(e)));
        }
    }
    Ok(())
}

fn msr_error_code(e: MsrError) -> u64 {
    match e {
        MsrError::Fault { vector } => u64::from(vector),
        _ => u64::MAX - 1,
    }
}

/// One operation of the stress on `vcpu`: its `n`th FS base write, read back; every 8th
/// also the APIC base, every 16th an unknown MSR (which must fault like native).
fn operation(vcpu: u32, n: u64) {
    let value = fs_pattern(vcpu, n);
    // SAFETY: nothing in this kernel addresses memory through FS.
    match unsafe { wrmsr_safe(MSR_FS_BASE, value) } {
        Ok(()) => {}
        Err(e) => note_wrong(vcpu, n, "FS base write", msr_error_code(e)),
    }
    // SAFETY: reading the FS base has no side effects.
    match unsafe { rdmsr_safe(MSR_FS_BASE) } {
        Ok(v) if v == value => {}
        other => note_wrong(vcpu, n, "FS base read back", other.unwrap_or(u64::MAX)),
    }
    if n.is_multiple_of(8) {
        let bsp = if vcpu == 0 { 0x100 } else { 0 };
        // SAFETY: as above.
        match unsafe { rdmsr_safe(MSR_APIC_BASE) } {
            Ok(v) if v == 0xfee0_0800 | bsp => {}
            other => note_wrong(vcpu, n, "APIC base", other.unwrap_or(u64::MAX)),
        }
    }
    if n.is_multiple_of(16) {
        // SAFETY: as above.
        match unsafe { rdmsr_safe(MSR_BOGUS) } {
            Err(MsrError::Fault { vector: 13 }) => {}
            other => note_wrong(vcpu, n, "unknown MSR", other.map_or(u64::MAX - 2, |v| v)),
        }
    }
    OPS[vcpu as usize].fetch_add(1, Ordering::AcqRel);
    TOTAL_OPS.fetch_add(1, Ordering::AcqRel);
}

fn stress_through_saves_migrations_and_vcpu_set() -> TestResult {
    let me = current_vcpu();
    write_fixed_values(me)?;
    let mut n = 0u64;
    let mut seen_suspend = 0u64;
    let mut last = events::now_ns();
    while !STOP.load(Ordering::Acquire) {
        if me == 0 {
            if n.is_multiple_of(32) {
                let before = events::now_ns();
                if let Err(e) = serve_toolstack(n) {
                    // The others must not wait for a resume that will not come.
                    STOP.store(true, Ordering::Release);
                    SUSPEND_HOLD.store(false, Ordering::Release);
                    fail!("vCPU 0 after op {n}: {e}");
                }
                // An event's pause is measured by the event, not as a stress gap.
                if events::now_ns().wrapping_sub(before) > 1_000_000 {
                    last = events::now_ns();
                }
            }
        } else {
            let generation = SUSPEND_GEN.load(Ordering::Acquire);
            if generation != seen_suspend {
                seen_suspend = generation;
                park_for_suspend(me, n);
                last = events::now_ns();
            }
            if me == 1 && OFFLINE_REQUEST.load(Ordering::Acquire) {
                go_offline_and_back(me, n)?;
                last = events::now_ns();
            }
        }
        n += 1;
        operation(me, n);
        let now = events::now_ns();
        LONGEST_GAP[me as usize].fetch_max(now.wrapping_sub(last), Ordering::AcqRel);
        last = now;
    }
    // The last value written is still there.
    if let Err((what, got)) = check_fixed_values(me, n) {
        fail!("vCPU {me} at the end: {what} reads {got:#x}");
    }
    check_eq!(
        OPS[me as usize].load(Ordering::Acquire),
        n,
        "operations counted"
    );
    Ok(())
}

/// vCPU 1's side of `xl vcpu-set 1` and back: the library's offline/online pair around
/// `VCPUOP_down` on itself; vCPU 0 brings it up when the toolstack says `online`.
fn go_offline_and_back(me: u32, n: u64) -> TestResult {
    let offline = match xenmsr::smp::offline_this_vcpu() {
        Ok(o) => o,
        Err(e) => fail!("offline_this_vcpu: {e}"),
    };
    check_eq!(offline.vpmu_parked, model().vpmu_active, "vPMU parked");
    {
        let _masked = events::mask();
        VCPU1_DOWN.store(true, Ordering::Release);
        OFFLINE_REQUEST.store(false, Ordering::Release);
        // SAFETY: this vCPU holds nothing others wait for (no lock, upcalls masked, the
        // library told); vCPU 0 brings it up again and it resumes right here.
        let down = unsafe { hv::page().vcpu_down(me) };
        check_eq!(down, Ok(()), "VCPUOP_down on itself");
    }
    let online = match xenmsr::smp::online_this_vcpu() {
        Ok(o) => o,
        Err(e) => fail!("online_this_vcpu: {e}"),
    };
    check_eq!(
        online.vpmu.is_some(),
        model().vpmu_active,
        "vPMU registered again"
    );
    events::rearm();
    if let Err((what, got)) = check_fixed_values(me, n) {
        fail!("vCPU {me} back online: {what} reads {got:#x}");
    }
    let cycle = VCPU1_CYCLES.fetch_add(1, Ordering::AcqRel) + 1;
    VCPU1_DOWN.store(false, Ordering::Release);
    println!("lifecycle: vCPU {me} online #{cycle}, its values unchanged");
    Ok(())
}

/// A secondary's part of a suspend: its library part, parked (masked, touching neither
/// the shared info page nor a port) until vCPU 0 has resumed, then its resume part and
/// its checks.
fn park_for_suspend(me: u32, n: u64) {
    let masked = events::mask();
    let suspended = lifecycle::suspend_this_vcpu();
    PARKED.fetch_add(1, Ordering::AcqRel);
    while SUSPEND_HOLD.load(Ordering::Acquire) {
        let _ = hv::page().sched_yield();
    }
    let mut failed = suspended.is_err();
    match lifecycle::resume_this_vcpu() {
        Ok(r) => failed |= r.spec_ctrl.is_some_and(|(_, ok)| !ok),
        Err(_) => failed = true,
    }
    events::rearm();
    if let Err((what, got)) = check_fixed_values(me, n) {
        println!("lifecycle: vCPU {me} after a resume: {what} reads {got:#x}");
        failed = true;
    }
    if failed {
        RESUME_FAILURES.fetch_add(1, Ordering::AcqRel);
    }
    drop(masked);
    RESUMED.fetch_add(1, Ordering::AcqRel);
}

/// vCPU 0: reads what the toolstack said and acts on it.
fn serve_toolstack(n: u64) -> Result<(), &'static str> {
    let mut guard = STORE.lock();
    let Some(client) = guard.as_mut() else {
        return Err("no xenstore client");
    };
    let Some(event) = client.next_event() else {
        return Ok(());
    };
    let mut buf = [0u8; 64];
    match event.token() {
        "sd" => {
            let value = match client.read("control/shutdown", &mut buf) {
                Ok(len) => &buf[..len],
                Err(XsError::Xenstore(e)) if e.is_enoent() => return Ok(()),
                Err(_) => return Err("reading control/shutdown"),
            };
            match value {
                b"suspend" => {
                    client
                        .write("control/shutdown", b"")
                        .map_err(|_| "acknowledging the suspend")?;
                    drop(guard);
                    suspend_and_resume(n)
                }
                b"poweroff" | b"halt" | b"reboot" => {
                    client
                        .write("control/shutdown", b"")
                        .map_err(|_| "acknowledging the power-off")?;
                    println!(
                        "lifecycle: {} requested",
                        core::str::from_utf8(value).unwrap_or("?")
                    );
                    STOP.store(true, Ordering::Release);
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        "cpu" => {
            if smp::online() < 2 {
                return Ok(());
            }
            let value = match client.read("cpu/1/availability", &mut buf) {
                Ok(len) => &buf[..len],
                Err(_) => return Ok(()),
            };
            let down = VCPU1_DOWN.load(Ordering::Acquire);
            match value {
                b"offline" if !down && !OFFLINE_REQUEST.load(Ordering::Acquire) => {
                    OFFLINE_REQUEST.store(true, Ordering::Release);
                    let mut spins = 0u64;
                    while hv::page().vcpu_is_up(1) != Ok(false) {
                        let _ = hv::page().sched_yield();
                        spins += 1;
                        if spins > 10_000_000 {
                            return Err("vCPU 1 never went down");
                        }
                    }
                    println!(
                        "lifecycle: vCPU 1 offline #{}",
                        VCPU1_CYCLES.load(Ordering::Acquire) + 1
                    );
                    Ok(())
                }
                b"online" if down => {
                    // SAFETY: vCPU 1 stopped itself with `VCPUOP_down` in
                    // `go_offline_and_back`, holding nothing; it resumes there.
                    unsafe { hv::page().vcpu_up(1) }.map_err(|_| "VCPUOP_up(1)")?;
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// vCPU 0: the whole suspend, from parking the others to releasing them.
fn suspend_and_resume(n: u64) -> Result<(), &'static str> {
    let start = events::now_ns();
    let others = smp::online() - 1 - u32::from(VCPU1_DOWN.load(Ordering::Acquire));
    PARKED.store(0, Ordering::Release);
    RESUMED.store(0, Ordering::Release);
    SUSPEND_HOLD.store(true, Ordering::Release);
    SUSPEND_GEN.fetch_add(1, Ordering::AcqRel);
    while PARKED.load(Ordering::Acquire) != others {
        let _ = hv::page().sched_yield();
    }
    let masked = events::mask();
    lifecycle::suspend_this_vcpu().map_err(|_| "suspend_this_vcpu on vCPU 0")?;
    let suspended = lifecycle::suspend().map_err(|_| "lifecycle::suspend")?;
    if suspended.vpmu_errors != 0 {
        return Err("XENPMU_finish refused");
    }
    let si = start_info_page();
    // The toolstack reads the store and console frames as PFNs from the saved page.
    rewrite_ring_frames(pfn_of);
    events::unmap_shared_info().map_err(|_| "unmapping the shared info page")?;
    let start_info_mfn = mfn_of(si as usize);
    // SAFETY: a domU (checked at set-up), vCPU 0, every other vCPU parked with its
    // upcalls masked, this one masked, the pre-suspend steps above done.
    let rc = unsafe { hv::page().sched_suspend(start_info_mfn) };
    let outcome = match rc {
        Ok(rc) => SuspendOutcome::from_return(rc as i64).map_err(|_| "suspend returned >1")?,
        Err(_) => return Err("the suspend hypercall failed"),
    };
    let info = read_start_info();
    match outcome {
        SuspendOutcome::Cancelled => {
            // The same domain: the frames are what they were; turn the fields back.
            rewrite_ring_frames(|pfn| mfn_of((pfn << 12) as usize));
            events::remap_shared_info(info.shared_info).map_err(|_| "remapping shared info")?;
        }
        SuspendOutcome::NewDomain => {
            events::remap_shared_info(info.shared_info).map_err(|_| "mapping shared info")?;
            publish_p2m().map_err(|_| "publishing the p2m again")?;
            crate::console::set_port(info.console_evtchn);
            STORE_PORT.store(info.store_evtchn, Ordering::Release);
            // Every vCPU's timer port is gone: bind them again (vCPU 0 may for all).
            for v in 0..smp::online() {
                if v == 1 && VCPU1_DOWN.load(Ordering::Acquire) {
                    continue;
                }
                events::init_vcpu(v).map_err(|_| "binding a timer again")?;
            }
            let mut guard = STORE.lock();
            let client = guard.as_mut().ok_or("no xenstore client")?;
            client
                .reconnect()
                .map_err(|_| "xenstore: registering the watches again")?;
        }
    }
    // SAFETY: the page's frame now from the p2m the toolstack rewrote; the others are
    // parked and this vCPU is masked, so the closure may patch directly.
    let resumed = unsafe {
        lifecycle::resume(
            outcome,
            &|page: NonNull<u8>| mfn_of(page.as_ptr() as usize),
            &mut |patch: &mut dyn FnMut()| patch(),
        )
    }
    .map_err(|_| "lifecycle::resume")?;
    if resumed.vpmu_errors != 0 || resumed.vpmu_registered != suspended.vpmu_finished {
        return Err("vPMU pages not registered again");
    }
    let mine = lifecycle::resume_this_vcpu().map_err(|_| "resume_this_vcpu on vCPU 0")?;
    if mine.spec_ctrl.is_some_and(|(_, ok)| !ok) {
        return Err("SPEC_CTRL not written back on vCPU 0");
    }
    events::rearm();
    SUSPEND_HOLD.store(false, Ordering::Release);
    while RESUMED.load(Ordering::Acquire) != others {
        let _ = hv::page().sched_yield();
    }
    drop(masked);
    if let Err((what, got)) = check_fixed_values(0, n) {
        println!("lifecycle: vCPU 0 after a resume: {what} reads {got:#x}");
        return Err("vCPU 0's values changed");
    }
    if RESUME_FAILURES.load(Ordering::Acquire) != 0 {
        return Err("a secondary found its values changed (line above)");
    }
    let pause = events::now_ns().wrapping_sub(start);
    LONGEST_PAUSE_NS.fetch_max(pause, Ordering::AcqRel);
    let (what, count) = match outcome {
        SuspendOutcome::NewDomain => ("new domain", &NEW_DOMAINS),
        SuspendOutcome::Cancelled => ("cancelled", &CANCELLED),
    };
    let k = count.fetch_add(1, Ordering::AcqRel) + 1;
    println!(
        "lifecycle: resumed ({what}) #{k} after {} ms; vPMU {} registered again; CPUID decisions {}",
        pause / 1_000_000,
        resumed.vpmu_registered,
        if resumed.decisions_changed {
            "changed (re-patched)"
        } else {
            "unchanged"
        }
    );
    Ok(())
}

/// On every dom0 row, after the hotplug churn (every vCPU but 0 has a vPMU page on a vPMU
/// model): the library's suspend/resume pair against the real hypervisor, without the
/// suspend itself (a dom0 cannot suspend): with the others parked, `suspend` finishes
/// every registered vPMU, `resume` (a new domain whose frames are the p2m's) registers
/// each again, the CPUID decisions are unchanged, and every vCPU reads a PMU counter
/// again through its page.
pub static DOM0_TESTS: &[Test] = &[test!(library_pair_registers_every_vpmu_again)];

fn library_pair_registers_every_vpmu_again() -> TestResult {
    let registered = (0..MAX_VCPUS as u32)
        .filter(|&v| pmu::global().is_initialized(v))
        .count() as u32;
    let result = smp::stop_the_world(|| {
        let mine = lifecycle::suspend_this_vcpu();
        let suspended = lifecycle::suspend();
        let finished_all = (0..MAX_VCPUS as u32).all(|v| !pmu::global().is_initialized(v));
        // SAFETY: the frames are the p2m's; the world is stopped (this closure runs in
        // `stop_the_world`, upcalls masked), so the patch closure may run directly.
        let resumed = unsafe {
            lifecycle::resume(
                SuspendOutcome::NewDomain,
                &|page: NonNull<u8>| mfn_of(page.as_ptr() as usize),
                &mut |patch: &mut dyn FnMut()| patch(),
            )
        };
        (
            mine,
            suspended,
            finished_all,
            resumed,
            lifecycle::resume_this_vcpu(),
        )
    });
    let (mine, suspended, finished_all, resumed, back) = result;
    check!(mine.is_ok(), "suspend_this_vcpu: {mine:?}");
    let suspended = match suspended {
        Ok(s) => s,
        Err(e) => fail!("lifecycle::suspend: {e}"),
    };
    check_eq!(suspended.vpmu_finished, registered, "vPMU pages finished");
    check_eq!(suspended.vpmu_errors, 0, "XENPMU_finish refusals");
    check!(
        finished_all,
        "a vPMU page is still registered after suspend"
    );
    let resumed = match resumed {
        Ok(r) => r,
        Err(e) => fail!("lifecycle::resume: {e}"),
    };
    check_eq!(
        resumed.vpmu_registered,
        registered,
        "vPMU pages registered again"
    );
    check_eq!(resumed.vpmu_errors, 0, "XENPMU_init refusals");
    check!(
        !resumed.decisions_changed,
        "CPUID decisions changed: {resumed:?}"
    );
    check!(resumed.repatched.is_none(), "re-patched without a change");
    match back {
        Ok(b) => check!(
            b.spec_ctrl.is_none_or(|(_, ok)| ok),
            "SPEC_CTRL not written back: {b:?}"
        ),
        Err(e) => fail!("resume_this_vcpu: {e}"),
    }
    for v in 0..MAX_VCPUS as u32 {
        check_eq!(
            pmu::global().is_initialized(v),
            v != 0 && v < smp::online() && model().vpmu_active && registered > 0,
            "vCPU {v}'s vPMU registration after the resume"
        );
    }
    crate::println!(
        "  lifecycle pair: vPMU finished {} and registered again {}; SPEC_CTRL {}",
        suspended.vpmu_finished,
        resumed.vpmu_registered,
        match back {
            Ok(b) if b.spec_ctrl.is_some() => "saved and written back",
            _ => "not readable here",
        }
    );
    smp::run_on_all(|me| {
        if model().vpmu_active && me != 0 {
            // SAFETY: reading a PMU counter has no side effects.
            let counter = unsafe { rdmsr_safe(MSR_F15H_PERF_CTR0) };
            if counter.is_err() {
                crate::println!("  lifecycle pair: vCPU {me}: PMU counter read {counter:?}");
                RESUME_FAILURES.fetch_add(1, Ordering::AcqRel);
            }
        }
    });
    check_eq!(
        RESUME_FAILURES.load(Ordering::Acquire),
        0,
        "PMU counter reads after the resume"
    );
    Ok(())
}

fn stress_totals_add_up() -> TestResult {
    let per_vcpu: u64 = (0..smp::online())
        .map(|v| OPS[v as usize].load(Ordering::Acquire))
        .sum();
    let total = TOTAL_OPS.load(Ordering::Acquire);
    for v in 0..smp::online() {
        println!(
            "  lifecycle: vCPU {v}: {} operations, {} wrong, longest gap {} ms",
            OPS[v as usize].load(Ordering::Acquire),
            WRONG[v as usize].load(Ordering::Acquire),
            LONGEST_GAP[v as usize].load(Ordering::Acquire) / 1_000_000
        );
    }
    println!(
        "  lifecycle: {} restores/migrations into a new domain, {} cancelled, vCPU 1 down/up {}, longest pause {} ms, {total} operations",
        NEW_DOMAINS.load(Ordering::Acquire),
        CANCELLED.load(Ordering::Acquire),
        VCPU1_CYCLES.load(Ordering::Acquire),
        LONGEST_PAUSE_NS.load(Ordering::Acquire) / 1_000_000
    );
    check_eq!(per_vcpu, total, "operations per vCPU against the total");
    if let Some((v, n, what, got)) = *FIRST_WRONG.lock() {
        fail!("vCPU {v}, operation {n}: {what}: {got:#x}");
    }
    Ok(())
}
