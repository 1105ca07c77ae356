//! Event upcalls: the shared info page, the per-vCPU upcall mask (the PV `cli`/`sti`), the
//! per-vCPU `VIRQ_TIMER` with a short one-shot timer kept armed, and the upcall handler.
//!
//! The handler does what a kernel's timer interrupt would do to MSRs (a context switch
//! writes FS and GS bases) through the library, in the middle of whatever the suites
//! were doing, and counts where it landed: how many upcalls interrupted a stub, a call
//! site, or the hypercall page. Its own trap and hypercall counts are taken back out of
//! the interrupted code's books before it returns, so that a test's "this access took one
//! #GP and one hypercall" still holds with upcalls on.

use core::mem::{offset_of, size_of};
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use xenmsr::{MsrError, rdmsr_safe, wrmsr_ns_const_safe, wrmsr_safe};
use xenmsr_hypercall::Errno;
use xenmsr_hypercall::abi::{
    CALLBACKF_MASK_EVENTS, CallbackType, SharedInfo, VcpuInfo, VcpuTimeInfo,
};

use crate::hv::{self, nr};
use crate::smp::{MAX_VCPUS, PerVcpu, current_vcpu};
use crate::traps::TrapFrame;

/// The page the shared info frame is mapped over (its own frame is given up).
#[repr(C, align(4096))]
struct SharedInfoPage([u8; 4096]);

static mut SHARED_INFO_PAGE: SharedInfoPage = SharedInfoPage([0; 4096]);
static SHARED: AtomicPtr<SharedInfo> = AtomicPtr::new(ptr::null_mut());

/// PTE bits of the shared info mapping: present, writable, user (a 64-bit PV kernel runs
/// in ring 3), accessed, dirty.
const PTE_FLAGS: u64 = 0x67;

/// Why events could not be set up.
#[derive(Debug)]
pub enum EventError {
    /// `update_va_mapping` of the shared info page.
    MapSharedInfo(Errno),
    /// `CALLBACKOP_register`.
    Callback(Errno),
    /// `VCPUOP_stop_periodic_timer`.
    StopPeriodic(Errno),
    /// `EVTCHNOP_bind_virq`.
    BindVirq(Errno),
    /// `EVTCHNOP_unmask`.
    Unmask(Errno),
    /// The port does not fit the 2-level bitmaps.
    PortOutOfRange(u32),
    /// The vCPU has no legacy `vcpu_info` slot.
    VcpuOutOfRange(u32),
}

impl core::fmt::Display for EventError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EventError::MapSharedInfo(e) => write!(f, "mapping the shared info page: {e}"),
            EventError::Callback(e) => write!(f, "registering a callback: {e}"),
            EventError::StopPeriodic(e) => write!(f, "stopping the periodic timer: {e}"),
            EventError::BindVirq(e) => write!(f, "binding VIRQ_TIMER: {e}"),
            EventError::Unmask(e) => write!(f, "unmasking the timer port: {e}"),
            EventError::PortOutOfRange(p) => write!(f, "port {p} beyond the 2-level bitmaps"),
            EventError::VcpuOutOfRange(v) => write!(f, "vCPU {v} has no vcpu_info slot"),
        }
    }
}

/// Maps Xen's shared info page (`start_info.shared_info`, a machine address) and registers
/// vCPU 0's callbacks. Call once on vCPU 0, with events masked (as at entry).
pub fn init_boot(shared_info_maddr: u64) -> Result<(), EventError> {
    let va = (&raw mut SHARED_INFO_PAGE) as u64;
    // SAFETY: the page is this module's own, page-aligned, 4 KiB-mapped .bss page that no
    // reference points into; from now on it is the shared info page, accessed only through
    // raw pointers with volatile and atomic accesses.
    unsafe {
        hv::page().update_va_mapping(
            va,
            (shared_info_maddr & !0xfff) | PTE_FLAGS,
            nr::UVMF_INVLPG,
        )
    }
    .map_err(EventError::MapSharedInfo)?;
    SHARED.store(va as *mut SharedInfo, Ordering::Release);
    let (event, failsafe) = crate::traps::callback_entries();
    // SAFETY: the entry is the kernel's upcall stub in `traps`, which pops rcx/r11, saves
    // every register and returns with the iret hypercall.
    unsafe { hv::page().callback_register(CallbackType::EVENT, event, 0) }
        .map_err(EventError::Callback)?;
    // SAFETY: the kit's failsafe stub, which turns Xen's failsafe frame into a trap
    // frame for the kernel's handler and returns with the iret hypercall; entered with
    // events masked, like the upcall.
    unsafe {
        hv::page().callback_register(CallbackType::FAILSAFE, failsafe, CALLBACKF_MASK_EVENTS)
    }
    .map_err(EventError::Callback)?;
    init_vcpu(0)
}

/// Before a suspend (vCPU 0, every vCPU's upcalls masked, the others parked where they
/// touch neither the shared info page nor a port): takes the shared info frame out of
/// the page tables by mapping this module's own frame back at its address (the save
/// refuses a page table entry naming a frame that is not the guest's, and the address
/// stays readable), and forgets the pointer: [`mask`] and [`masked`] then answer
/// "masked" without touching the page.
pub fn unmap_shared_info() -> Result<(), EventError> {
    let va = (&raw mut SHARED_INFO_PAGE) as u64;
    SHARED.store(ptr::null_mut(), Ordering::Release);
    let own_frame = crate::boot::mfn_of(va as usize);
    // SAFETY: maps the page's own frame back (what it was before `init_boot`); nothing
    // holds a reference into it, and the pointer to the shared info is gone.
    unsafe {
        hv::page().update_va_mapping(
            va,
            own_frame << 12 | PTE_FLAGS,
            nr::UVMF_INVLPG | nr::UVMF_ALL,
        )
    }
    .map_err(EventError::MapSharedInfo)
}

/// After a suspend: maps the shared info frame at `shared_info_maddr` (the same one
/// after a cancelled suspend, the new domain's after a restore) at the same address again.
pub fn remap_shared_info(shared_info_maddr: u64) -> Result<(), EventError> {
    let va = (&raw mut SHARED_INFO_PAGE) as u64;
    // SAFETY: as in `init_boot`.
    unsafe {
        hv::page().update_va_mapping(
            va,
            (shared_info_maddr & !0xfff) | PTE_FLAGS,
            nr::UVMF_INVLPG | nr::UVMF_ALL,
        )
    }
    .map_err(EventError::MapSharedInfo)?;
    SHARED.store(va as *mut SharedInfo, Ordering::Release);
    Ok(())
}

/// The x86 part of the mapped shared info page (the toolstack's p2m fields), or null
/// while it is unmapped.
pub fn arch_shared_info() -> *mut xenmsr_hypercall::abi::ArchSharedInfo {
    let shared = shared();
    if shared.is_null() {
        return ptr::null_mut();
    }
    shared
        .cast::<u8>()
        .wrapping_add(offset_of!(SharedInfo, arch))
        .cast()
}

fn shared() -> *mut SharedInfo {
    SHARED.load(Ordering::Acquire)
}

/// `vcpu`'s `vcpu_info` in the shared info page (an address; `vcpu` is below
/// `LEGACY_MAX_VCPUS`, checked by `init_vcpu`, and `MAX_VCPUS` is smaller).
fn vcpu_info(vcpu: u32) -> *mut VcpuInfo {
    shared()
        .cast::<u8>()
        .wrapping_add(offset_of!(SharedInfo, vcpu_info) + vcpu as usize * size_of::<VcpuInfo>())
        .cast()
}

/// A byte field of `vcpu`'s `vcpu_info`.
fn info_byte(vcpu: u32, offset: usize) -> *mut u8 {
    vcpu_info(vcpu).cast::<u8>().wrapping_add(offset)
}

fn read_byte(p: *mut u8) -> u8 {
    // SAFETY: `p` is a byte of the mapped shared info page; a volatile byte access is
    // single-copy atomic on x86, and no reference into the page is formed.
    unsafe { p.read_volatile() }
}

fn write_byte(p: *mut u8, value: u8) {
    // SAFETY: as for `read_byte`.
    unsafe { p.write_volatile(value) }
}

fn mask_byte(vcpu: u32) -> *mut u8 {
    info_byte(vcpu, offset_of!(VcpuInfo, evtchn_upcall_mask))
}

fn pending_byte(vcpu: u32) -> *mut u8 {
    info_byte(vcpu, offset_of!(VcpuInfo, evtchn_upcall_pending))
}

/// Atomically takes `vcpu`'s `evtchn_pending_sel` (Xen sets its bits from any CPU).
fn take_pending_sel(vcpu: u32) -> u64 {
    let p = info_byte(vcpu, offset_of!(VcpuInfo, evtchn_pending_sel)).cast::<u64>();
    let mut v = 0u64;
    // SAFETY: `p` is an aligned word of the mapped shared info page; `xchg` with memory is
    // locked, so it cannot lose a bit Xen sets at the same time.
    unsafe {
        core::arch::asm!("xchg {v}, [{p}]", v = inout(reg) v, p = in(reg) p, options(nostack, preserves_flags))
    };
    v
}

/// Atomically clears `port`'s bit in `evtchn_pending` and says whether it was set.
fn test_and_clear_pending(port: u32) -> bool {
    // Word `port / 64 < 64` (checked at bind time) of the mapped shared info page.
    let word = shared()
        .cast::<u8>()
        .wrapping_add(offset_of!(SharedInfo, evtchn_pending) + port as usize / 64 * 8)
        .cast::<u64>();
    let was: u8;
    // SAFETY: `lock btr` on an aligned word of the mapped page: atomic against Xen's own
    // locked updates; it only clears the one bit.
    unsafe {
        core::arch::asm!(
            "lock btr qword ptr [{w}], {b}",
            "setc {was}",
            w = in(reg) word,
            b = in(reg) u64::from(port % 64),
            was = out(reg_byte) was,
            options(nostack),
        )
    };
    was != 0
}

/// The upcall mask as it was before [`mask`], restored (and any pending upcall taken)
/// when dropped.
#[must_use]
pub struct Masked {
    vcpu: u32,
    was: u8,
}

/// Masks upcalls on this vCPU until the guard is dropped (nests).
pub fn mask() -> Masked {
    let vcpu = current_vcpu();
    if shared().is_null() {
        return Masked { vcpu, was: 1 };
    }
    // Only this vCPU writes its own mask (Xen sets and restores it synchronously, around
    // an upcall it delivers here), so a read and a write are enough.
    let was = read_byte(mask_byte(vcpu));
    write_byte(mask_byte(vcpu), 1);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    Masked { vcpu, was }
}

impl Drop for Masked {
    fn drop(&mut self) {
        if self.was == 0 {
            unmask(self.vcpu);
        }
    }
}

/// Clears this vCPU's mask and, if an event arrived meanwhile, makes a hypercall so that
/// Xen delivers it on the way back (a PV `sti` has no other way to notice it).
fn unmask(vcpu: u32) {
    if shared().is_null() {
        return;
    }
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    write_byte(mask_byte(vcpu), 0);
    core::sync::atomic::fence(Ordering::SeqCst);
    if read_byte(pending_byte(vcpu)) != 0 {
        let _ = hv::page().xen_version();
    }
}

/// Whether upcalls are masked on this vCPU.
pub fn masked() -> bool {
    shared().is_null() || read_byte(mask_byte(current_vcpu())) != 0
}

// ---------------------------------------------------------------------------------------
// The timer.
// ---------------------------------------------------------------------------------------

/// Each vCPU's `VIRQ_TIMER` port.
static TIMER_PORT: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_VCPUS];
/// The one-shot period while ticking, in ns (0: not ticking).
static TICK_NS: AtomicU64 = AtomicU64::new(0);

/// Registers this vCPU's timer: stops the periodic tick, binds `VIRQ_TIMER` to a port and
/// unmasks the port. Upcalls stay masked.
pub fn init_vcpu(vcpu: u32) -> Result<(), EventError> {
    if vcpu as usize >= MAX_VCPUS.min(xenmsr_hypercall::abi::LEGACY_MAX_VCPUS) {
        return Err(EventError::VcpuOutOfRange(vcpu));
    }
    let page = hv::page();
    page.vcpu_stop_periodic_timer(vcpu)
        .map_err(EventError::StopPeriodic)?;
    let port = page
        .evtchn_bind_virq(nr::VIRQ_TIMER, vcpu)
        .map_err(EventError::BindVirq)?;
    if port >= 64 * 64 {
        return Err(EventError::PortOutOfRange(port));
    }
    TIMER_PORT[vcpu as usize].store(port, Ordering::Release);
    page.evtchn_unmask(port).map_err(EventError::Unmask)
}

/// This vCPU's timer port, once `init_vcpu` bound it.
pub fn timer_port() -> Option<u32> {
    let vcpu = current_vcpu() as usize;
    TIMER_PORT
        .get(vcpu)
        .map(|p| p.load(Ordering::Acquire))
        .filter(|&p| p != u32::MAX)
}

/// Xen's system time on this vCPU, in ns (the pvclock formula under the version seqlock).
pub fn now_ns() -> u64 {
    let time = vcpu_info(current_vcpu())
        .cast::<u8>()
        .wrapping_add(offset_of!(VcpuInfo, time))
        .cast::<VcpuTimeInfo>();
    loop {
        // The record is read with volatile reads under Xen's version seqlock (odd while
        // updating, changed by an update): a torn copy is detected and retried.
        let v0 = read_version(time);
        core::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: this vCPU's time record in the mapped shared info page, copied with a
        // volatile read (no reference into the page).
        let t = unsafe { ptr::read_volatile(time) };
        core::sync::atomic::fence(Ordering::Acquire);
        let v1 = read_version(time);
        if v0 & 1 == 0 && v0 == v1 {
            // SAFETY: `rdtsc` is unprivileged and has no side effects.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            return t.system_time_at(tsc);
        }
    }
}

fn read_version(time: *const VcpuTimeInfo) -> u32 {
    // SAFETY: the `version` word of a time record in the mapped shared info page.
    unsafe { ptr::read_volatile(time.cast::<u32>()) }
}

fn arm(vcpu: u32, period: u64) {
    let deadline = now_ns().wrapping_add(period);
    if hv::page()
        .vcpu_set_singleshot_timer(vcpu, deadline, 0)
        .is_err()
    {
        TIMER_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Arms this vCPU's one-shot tick again if ticking (after the vCPU was down, when its
/// timer may not have fired).
pub fn rearm() {
    let period = TICK_NS.load(Ordering::Acquire);
    if period != 0 {
        arm(current_vcpu(), period);
    }
}

/// Starts the one-shot tick on this vCPU (re-armed by every timer upcall) and unmasks
/// upcalls.
pub fn start_ticking(period_ns: u64) {
    TICK_NS.store(period_ns, Ordering::Release);
    let vcpu = current_vcpu();
    arm(vcpu, period_ns);
    unmask(vcpu);
}

/// Stops re-arming (the last armed timer still fires once) and masks upcalls on this vCPU.
pub fn stop_ticking() {
    TICK_NS.store(0, Ordering::Release);
    let vcpu = current_vcpu();
    write_byte(mask_byte(vcpu), 1);
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Makes the upcall handler also access MSRs through the library (as a kernel's timer
/// interrupt would), from now on, on every vCPU.
pub fn set_handler_work(on: bool) {
    HANDLER_WORK.store(on, Ordering::Release);
}

static HANDLER_WORK: AtomicBool = AtomicBool::new(false);
static TIMER_ERRORS: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------------------
// The upcall handler.
// ---------------------------------------------------------------------------------------

/// Where each vCPU's upcalls landed, and what the handler saw.
#[derive(Default)]
pub struct UpcallStats {
    /// Upcalls taken.
    pub total: AtomicU64,
    /// Timer events handled.
    pub timer: AtomicU64,
    /// The interrupted `rip` lay inside a library stub.
    pub in_stub: AtomicU64,
    /// The interrupted `rip` lay inside a patch site.
    pub in_site: AtomicU64,
    /// The interrupted `rip` lay in a hypercall page (Xen delivers pending events on the
    /// way back from a hypercall, often one a stub made).
    pub in_hypercall_page: AtomicU64,
    /// Handler runs that made the library accesses.
    pub worked: AtomicU64,
    /// Library accesses in the handler that gave a wrong result.
    pub errors: AtomicU64,
    /// The first wrong result (a code; see `record_error`).
    pub first_error: AtomicU64,
}

static STATS: PerVcpu<UpcallStats> = [const {
    crate::smp::CacheAligned(UpcallStats {
        total: AtomicU64::new(0),
        timer: AtomicU64::new(0),
        in_stub: AtomicU64::new(0),
        in_site: AtomicU64::new(0),
        in_hypercall_page: AtomicU64::new(0),
        worked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: AtomicU64::new(0),
    })
}; MAX_VCPUS];

/// vCPU `vcpu`'s upcall statistics.
pub fn stats(vcpu: usize) -> &'static UpcallStats {
    &STATS[vcpu].0
}

/// How many times re-arming the timer failed (all vCPUs).
pub fn timer_errors() -> u64 {
    TIMER_ERRORS.load(Ordering::Relaxed)
}

unsafe extern "C" {
    static __pvk_stubs_start: [u8; 0];
    static __pvk_stubs_end: [u8; 0];
}

/// Whether `rip` is inside one of the library's stubs (the linker script gathers every
/// `.text.xenmsr_stub*` section between the two symbols).
pub fn in_stub(rip: u64) -> bool {
    let start = (&raw const __pvk_stubs_start) as u64;
    let end = (&raw const __pvk_stubs_end) as u64;
    (start..end).contains(&rip)
}

/// Whether `rip` is inside a patch site.
pub fn in_site(rip: u64) -> bool {
    xenmsr_asm::patch::patch_sites()
        .any(|s| (s.addr as u64..s.addr as u64 + u64::from(s.len)).contains(&rip))
}

fn in_hypercall_page(rip: u64) -> bool {
    let real = hv::page().as_ptr() as u64;
    let traced = crate::tracepage::page().as_ptr() as u64;
    (real..real + 4096).contains(&rip) || (traced..traced + 4096).contains(&rip)
}

/// Called by the trap entry for an event upcall (upcalls masked by Xen on delivery; the
/// `iret` restores the interrupted mask).
pub fn upcall(frame: &TrapFrame) {
    let vcpu = current_vcpu();
    let stats = stats(vcpu as usize);
    stats.total.fetch_add(1, Ordering::Relaxed);
    if in_stub(frame.rip) {
        stats.in_stub.fetch_add(1, Ordering::Relaxed);
    } else if in_site(frame.rip) {
        stats.in_site.fetch_add(1, Ordering::Relaxed);
    } else if in_hypercall_page(frame.rip) {
        stats.in_hypercall_page.fetch_add(1, Ordering::Relaxed);
    }
    // Everything the handler does below is kept out of the interrupted code's counts.
    let books = crate::accounting::save();

    write_byte(pending_byte(vcpu), 0);
    take_pending_sel(vcpu);
    let port = TIMER_PORT[vcpu as usize].load(Ordering::Acquire);
    let timer = port != u32::MAX && test_and_clear_pending(port);
    if timer {
        stats.timer.fetch_add(1, Ordering::Relaxed);
        // The hotplug churn's vCPUs wait for vCPU 0 to bring them up.
        if vcpu == 0 && crate::suites::hotplug::active() {
            crate::suites::hotplug::bring_up_waiting();
        }
        if HANDLER_WORK.load(Ordering::Acquire) {
            stats.worked.fetch_add(1, Ordering::Relaxed);
            if let Err(code) = kernel_like_work(vcpu)
                && stats.errors.fetch_add(1, Ordering::Relaxed) == 0
            {
                stats.first_error.store(code, Ordering::Relaxed);
            }
        }
        let period = TICK_NS.load(Ordering::Acquire);
        if period != 0 {
            arm(vcpu, period);
        }
    }
    crate::accounting::restore(books);
}

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_BOGUS: u32 = 0x1234_5678;
const MSR_F15H_PERF_CTR0: u32 = 0xc001_0201;

/// What a kernel's timer interrupt does to MSRs: a context switch's FS and GS base writes
/// (generic and constant-index sites), read back and restored; a safe read of an unknown
/// MSR; on a vPMU model, a PMU counter read. Any wrong result is an error code
/// `step << 56 | detail`.
fn kernel_like_work(vcpu: u32) -> Result<(), u64> {
    let pattern = 0x0000_5a00_0000_0000 | u64::from(vcpu) << 32 | 0x1000;
    for (step, msr) in [(1u64, MSR_FS_BASE), (2, MSR_GS_BASE)] {
        // SAFETY: the kernel keeps nothing behind FS or GS, and the interrupted code's
        // value is put back before the handler returns.
        let saved = unsafe { rdmsr_safe(msr) }.map_err(|_| step << 56 | 1)?;
        // SAFETY: as above.
        unsafe { wrmsr_safe(msr, pattern) }.map_err(|_| step << 56 | 2)?;
        // SAFETY: reading a segment base has no side effect.
        let read = unsafe { rdmsr_safe(msr) }.map_err(|_| step << 56 | 3)?;
        if read != pattern {
            return Err(step << 56 | 4);
        }
        // The context-switch path: a constant-index site (the segment-base stub).
        let restored = if msr == MSR_FS_BASE {
            // SAFETY: as above.
            unsafe { wrmsr_ns_const_safe::<MSR_FS_BASE>(saved) }
        } else {
            // SAFETY: as above.
            unsafe { wrmsr_ns_const_safe::<MSR_GS_BASE>(saved) }
        };
        restored.map_err(|_| step << 56 | 5)?;
        // SAFETY: as above.
        if unsafe { rdmsr_safe(msr) } != Ok(saved) {
            return Err(step << 56 | 6);
        }
    }
    // SAFETY: an unknown MSR: Xen refuses the read, nothing changes.
    match unsafe { rdmsr_safe(MSR_BOGUS) } {
        Err(MsrError::Fault { vector: 13 }) => {}
        _ => return Err(3 << 56),
    }
    if crate::suites::vpmu_active() {
        // SAFETY: reading a PMU counter has no side effect.
        if unsafe { rdmsr_safe(MSR_F15H_PERF_CTR0) }.is_err() {
            return Err(4 << 56);
        }
    }
    Ok(())
}
