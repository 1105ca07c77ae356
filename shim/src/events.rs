//! The kit's event upcalls: the shared info page, each vCPU's upcall mask (the PV
//! `cli`/`sti`), a per-vCPU timer, and a handler the kernel registers for what arrives.
//!
//! ```ignore
//! fn on_event(event: xenmsr::events::Event) { /* count ticks, ... */ }
//! // boot vCPU, once, events still masked as at entry:
//! unsafe { xenmsr::events::init(start_info) }?;
//! xenmsr::events::set_handler(on_event);
//! // on every vCPU (the boot one and each started one):
//! xenmsr::events::start_timer(1_000_000)?;   // VIRQ_TIMER every 1 ms
//! xenmsr::events::enable();                  // unmask upcalls on this vCPU
//! ```
//!
//! Once [`init`] ran, every upcall goes to the kit's dispatcher (the kernel's trap
//! handler no longer sees [`VECTOR_UPCALL`](xenmsr_asm::pv::VECTOR_UPCALL)): it takes the
//! vCPU's pending ports from the 2-level bitmaps, re-arms the vCPU's timer and calls the
//! handler once per event, with events masked. The vCPU id is the library's
//! ([`smp::current_vcpu`](crate::smp::current_vcpu)); the legacy `vcpu_info` slots in the
//! shared info page cover vCPUs 0 to 31 (`LEGACY_MAX_VCPUS`).

use core::mem::{offset_of, size_of};
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

use xenmsr_hypercall::abi::{LEGACY_MAX_VCPUS, SharedInfo, StartInfo, VcpuInfo, VcpuTimeInfo};
use xenmsr_hypercall::{Errno, HypercallPage, nr};

/// What a registered handler gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// This vCPU's timer ([`start_timer`]) fired; it is already re-armed.
    Timer,
    /// Another port bound to this vCPU is pending.
    Port(u32),
}

/// Why events could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventError {
    /// [`init`] has not run.
    NotInitialised,
    /// `update_va_mapping` of the shared info page failed.
    MapSharedInfo(Errno),
    /// The running vCPU has no id ([`crate::smp`]) or no legacy `vcpu_info` slot.
    NoVcpuSlot(Option<u32>),
    /// `EVTCHNOP_bind_virq` failed.
    BindVirq(Errno),
    /// The bound port does not fit the 2-level bitmaps.
    PortOutOfRange(u32),
    /// `EVTCHNOP_unmask` failed.
    Unmask(Errno),
    /// A timer hypercall failed.
    Timer(Errno),
}

impl core::fmt::Display for EventError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EventError::NotInitialised => write!(f, "xenmsr::events::init has not run"),
            EventError::MapSharedInfo(e) => write!(f, "mapping the shared info page: {e}"),
            EventError::NoVcpuSlot(Some(v)) => write!(f, "vCPU {v} has no vcpu_info slot"),
            EventError::NoVcpuSlot(None) => write!(f, "the running vCPU has no id"),
            EventError::BindVirq(e) => write!(f, "binding VIRQ_TIMER: {e}"),
            EventError::PortOutOfRange(p) => write!(f, "port {p} beyond the 2-level bitmaps"),
            EventError::Unmask(e) => write!(f, "unmasking the timer port: {e}"),
            EventError::Timer(e) => write!(f, "arming the timer: {e}"),
        }
    }
}

/// The page the shared info frame is mapped over (its own frame is given up).
#[repr(C, align(4096))]
struct SharedInfoPage(core::cell::UnsafeCell<[u8; 4096]>);

// SAFETY: once mapped over Xen's frame, the page is only accessed through raw pointers
// with volatile and locked accesses (never references), as memory Xen shares.
unsafe impl Sync for SharedInfoPage {}

static SHARED_INFO_PAGE: SharedInfoPage = SharedInfoPage(core::cell::UnsafeCell::new([0; 4096]));
static SHARED: AtomicPtr<SharedInfo> = AtomicPtr::new(ptr::null_mut());

/// The kernel's handler, as an address (0: none).
static HANDLER: AtomicUsize = AtomicUsize::new(0);
/// Each vCPU's timer port (`u32::MAX`: none).
static TIMER_PORT: [AtomicU32; LEGACY_MAX_VCPUS] =
    [const { AtomicU32::new(u32::MAX) }; LEGACY_MAX_VCPUS];
/// Each vCPU's timer period in ns (0: not re-armed).
static TIMER_PERIOD: [AtomicU64; LEGACY_MAX_VCPUS] =
    [const { AtomicU64::new(0) }; LEGACY_MAX_VCPUS];
/// Timer events delivered per vCPU.
static TICKS: [AtomicU64; LEGACY_MAX_VCPUS] = [const { AtomicU64::new(0) }; LEGACY_MAX_VCPUS];
/// Timer hypercalls that failed while re-arming.
static REARM_ERRORS: AtomicU64 = AtomicU64::new(0);

/// PTE bits of the shared info mapping: present, writable, user (a 64-bit PV kernel runs
/// in ring 3), accessed, dirty.
const PTE_FLAGS: u64 = 0x67;

/// Maps the shared info page and routes every upcall to the kit's dispatcher. Call once,
/// on the boot vCPU, with events masked (as the kit's entry leaves them), after
/// `xenmsr::init` (which names the vCPUs) and with the kit's callbacks registered
/// (`pv::install_callbacks`).
///
/// # Safety
///
/// `start_info` is this domain's (its `shared_info` is the machine address of the
/// shared info frame), and nothing else maps or uses the shared info page (the kit maps
/// it over a page of its own).
pub unsafe fn init(start_info: &StartInfo) -> Result<(), EventError> {
    if !SHARED.load(Ordering::Acquire).is_null() {
        return Ok(());
    }
    let va = SHARED_INFO_PAGE.0.get() as u64;
    // SAFETY: the page is this module's own, page aligned, and never referenced: from
    // now on it is the shared info page, accessed only through raw pointers.
    unsafe {
        page().update_va_mapping(
            va,
            (start_info.shared_info & !0xfff) | PTE_FLAGS,
            nr::UVMF_INVLPG,
        )
    }
    .map_err(EventError::MapSharedInfo)?;
    SHARED.store(va as *mut SharedInfo, Ordering::Release);
    // Every port starts masked, as Linux masks them all at boot: a port the toolstack
    // bound for the domain (a domU's console and xenstore ports) would otherwise raise
    // upcalls nobody asked for. `start_timer` unmasks the ports it binds.
    for word in 0..64 {
        let mask = bitmap_word(offset_of!(SharedInfo, evtchn_mask), word);
        // SAFETY: an aligned word of the mapped page; `lock or` sets bits atomically
        // against Xen's own locked updates.
        unsafe {
            core::arch::asm!("lock or qword ptr [{m}], {all}", m = in(reg) mask, all = in(reg) u64::MAX, options(nostack))
        };
    }
    // SAFETY: `dispatch` takes this vCPU's pending events with locked accesses, calls the
    // kernel's handler for each, and returns.
    unsafe { xenmsr_asm::pv::set_upcall_dispatcher(dispatch) };
    Ok(())
}

/// Registers the function that every event goes to (the last call wins). It runs with
/// events masked, on the vCPU the event was for.
pub fn set_handler(handler: fn(Event)) {
    HANDLER.store(handler as *const () as usize, Ordering::Release);
}

fn handler() -> Option<fn(Event)> {
    let h = HANDLER.load(Ordering::Acquire);
    // SAFETY: only `set_handler` stores a non-zero value, a `fn(Event)`; function
    // pointers round-trip through `usize`.
    (h != 0).then(|| unsafe { core::mem::transmute::<usize, fn(Event)>(h) })
}

fn page() -> HypercallPage {
    HypercallPage::xen()
}

/// This vCPU's id and `vcpu_info`, if events are set up and the vCPU has a slot.
fn this_vcpu() -> Result<(u32, *mut VcpuInfo), EventError> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        return Err(EventError::NotInitialised);
    }
    let id = crate::smp::current_vcpu();
    match id {
        Some(v) if (v as usize) < LEGACY_MAX_VCPUS => {
            let info = shared
                .cast::<u8>()
                .wrapping_add(
                    offset_of!(SharedInfo, vcpu_info) + v as usize * size_of::<VcpuInfo>(),
                )
                .cast::<VcpuInfo>();
            Ok((v, info))
        }
        other => Err(EventError::NoVcpuSlot(other)),
    }
}

fn field(info: *mut VcpuInfo, offset: usize) -> *mut u8 {
    info.cast::<u8>().wrapping_add(offset)
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

/// The upcall mask as it was before [`mask`], restored (and a pending upcall taken) when
/// dropped.
#[must_use = "upcalls stay masked only while the guard lives"]
#[derive(Debug)]
pub struct Masked {
    info: *mut VcpuInfo,
    was: u8,
}

/// Masks upcalls on this vCPU until the guard is dropped (nests). Before [`init`], or on a
/// vCPU without a slot, there is nothing to mask (no upcall can be delivered through the
/// kit) and the guard does nothing.
pub fn mask() -> Masked {
    match this_vcpu() {
        Ok((_, info)) => {
            let mask = field(info, offset_of!(VcpuInfo, evtchn_upcall_mask));
            // Only this vCPU writes its mask (Xen sets and restores it around an upcall it
            // delivers here, synchronously), so a read and a write suffice.
            let was = read_byte(mask);
            write_byte(mask, 1);
            core::sync::atomic::compiler_fence(Ordering::SeqCst);
            Masked { info, was }
        }
        Err(_) => Masked {
            info: ptr::null_mut(),
            was: 1,
        },
    }
}

impl Drop for Masked {
    fn drop(&mut self) {
        if self.was == 0 && !self.info.is_null() {
            unmask(self.info);
        }
    }
}

/// Clears the mask and, if an event arrived meanwhile, makes a hypercall so that Xen
/// delivers it on the way back (a PV `sti` has no other way to notice).
fn unmask(info: *mut VcpuInfo) {
    core::sync::atomic::compiler_fence(Ordering::SeqCst);
    write_byte(field(info, offset_of!(VcpuInfo, evtchn_upcall_mask)), 0);
    fence(Ordering::SeqCst);
    if read_byte(field(info, offset_of!(VcpuInfo, evtchn_upcall_pending))) != 0 {
        let _ = page().xen_version();
    }
}

/// Unmasks upcalls on this vCPU (the PV `sti`).
pub fn enable() -> Result<(), EventError> {
    let (_, info) = this_vcpu()?;
    unmask(info);
    Ok(())
}

/// Masks upcalls on this vCPU (the PV `cli`) until [`enable`].
pub fn disable() {
    if let Ok((_, info)) = this_vcpu() {
        write_byte(field(info, offset_of!(VcpuInfo, evtchn_upcall_mask)), 1);
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}

/// Binds this vCPU's `VIRQ_TIMER` and raises it every `period_ns` (a one-shot timer the
/// dispatcher re-arms; Xen's default 100 Hz periodic tick is stopped). Upcalls stay as
/// they are: [`enable`] them to receive it.
pub fn start_timer(period_ns: u64) -> Result<(), EventError> {
    let (id, _) = this_vcpu()?;
    let page = page();
    page.vcpu_stop_periodic_timer(id)
        .map_err(EventError::Timer)?;
    let mut port = TIMER_PORT[id as usize].load(Ordering::Acquire);
    if port == u32::MAX {
        port = page
            .evtchn_bind_virq(nr::VIRQ_TIMER, id)
            .map_err(EventError::BindVirq)?;
        if port >= 64 * 64 {
            return Err(EventError::PortOutOfRange(port));
        }
        TIMER_PORT[id as usize].store(port, Ordering::Release);
    }
    page.evtchn_unmask(port).map_err(EventError::Unmask)?;
    TIMER_PERIOD[id as usize].store(period_ns, Ordering::Release);
    page.vcpu_set_singleshot_timer(id, now_ns().wrapping_add(period_ns), 0)
        .map_err(EventError::Timer)
}

/// Stops re-arming this vCPU's timer (one already armed still fires once).
pub fn stop_timer() {
    if let Ok((id, _)) = this_vcpu() {
        TIMER_PERIOD[id as usize].store(0, Ordering::Release);
    }
}

/// Timer events delivered to vCPU `id` so far.
pub fn ticks(id: u32) -> u64 {
    TICKS
        .get(id as usize)
        .map_or(0, |t| t.load(Ordering::Relaxed))
}

/// Timer re-arms that Xen refused (each loses that vCPU's tick until the next arm).
pub fn rearm_errors() -> u64 {
    REARM_ERRORS.load(Ordering::Relaxed)
}

/// Xen's system time on this vCPU in ns (the pvclock formula under the record's version
/// seqlock); 0 before [`init`].
pub fn now_ns() -> u64 {
    let Ok((_, info)) = this_vcpu() else {
        return 0;
    };
    let time = field(info, offset_of!(VcpuInfo, time)).cast::<VcpuTimeInfo>();
    loop {
        // SAFETY: the `version` word of this vCPU's time record in the mapped page.
        let v0 = unsafe { ptr::read_volatile(time.cast::<u32>()) };
        fence(Ordering::Acquire);
        // SAFETY: this vCPU's time record, copied with a volatile read (no reference
        // into the page); a torn copy is caught by the version check.
        let record = unsafe { ptr::read_volatile(time) };
        fence(Ordering::Acquire);
        // SAFETY: as for `v0`.
        let v1 = unsafe { ptr::read_volatile(time.cast::<u32>()) };
        if v0 & 1 == 0 && v0 == v1 {
            // SAFETY: `rdtsc` is unprivileged and has no side effects.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            return record.system_time_at(tsc);
        }
    }
}

/// Atomically takes this vCPU's `evtchn_pending_sel` (Xen sets bits from any CPU).
fn take_pending_sel(info: *mut VcpuInfo) -> u64 {
    let p = field(info, offset_of!(VcpuInfo, evtchn_pending_sel)).cast::<u64>();
    let mut v = 0u64;
    // SAFETY: `p` is an aligned word of the mapped shared info page; `xchg` with memory
    // is locked, so it cannot lose a bit Xen sets meanwhile.
    unsafe {
        core::arch::asm!("xchg {v}, [{p}]", v = inout(reg) v, p = in(reg) p, options(nostack, preserves_flags))
    };
    v
}

/// Word `word` of `evtchn_pending` or `evtchn_mask`.
fn bitmap_word(offset: usize, word: usize) -> *mut u64 {
    SHARED
        .load(Ordering::Acquire)
        .cast::<u8>()
        .wrapping_add(offset + word * 8)
        .cast::<u64>()
}

/// Atomically clears bit `bit` of the pending word and says whether it was set.
fn test_and_clear(word: *mut u64, bit: u32) -> bool {
    let was: u8;
    // SAFETY: `lock btr` on an aligned word of the mapped page: atomic against Xen's own
    // locked updates; it clears one bit only.
    unsafe {
        core::arch::asm!(
            "lock btr qword ptr [{w}], {b}",
            "setc {was}",
            w = in(reg) word,
            b = in(reg) u64::from(bit),
            was = out(reg_byte) was,
            options(nostack),
        )
    };
    was != 0
}

/// Whether `port` is delivered to vCPU `id`: its own timer, or (on vCPU 0, where Xen
/// binds every port it allocates) any port that is no vCPU's timer.
fn bound_here(port: u32, id: u32) -> bool {
    let timer_of = TIMER_PORT
        .iter()
        .position(|p| p.load(Ordering::Relaxed) == port);
    match timer_of {
        Some(owner) => owner == id as usize,
        None => id == 0,
    }
}

/// The kit's upcall dispatcher: every pending, unmasked port of this vCPU, once.
fn dispatch() {
    let Ok((id, info)) = this_vcpu() else {
        return;
    };
    let handler = handler();
    loop {
        write_byte(field(info, offset_of!(VcpuInfo, evtchn_upcall_pending)), 0);
        let mut sel = take_pending_sel(info);
        if sel == 0 {
            break;
        }
        while sel != 0 {
            let word = sel.trailing_zeros() as usize;
            sel &= sel - 1;
            let pending = bitmap_word(offset_of!(SharedInfo, evtchn_pending), word);
            let masked = bitmap_word(offset_of!(SharedInfo, evtchn_mask), word);
            // SAFETY: an aligned word of the mapped page, read volatile.
            let pending_bits = unsafe { pending.read_volatile() };
            // SAFETY: as above.
            let mut ready = pending_bits & !unsafe { masked.read_volatile() };
            while ready != 0 {
                let bit = ready.trailing_zeros();
                ready &= ready - 1;
                let port = (word * 64) as u32 + bit;
                // A word holds the ports of every vCPU: leave another vCPU's own.
                if !bound_here(port, id) || !test_and_clear(pending, bit) {
                    continue;
                }
                let event = if port == TIMER_PORT[id as usize].load(Ordering::Relaxed) {
                    TICKS[id as usize].fetch_add(1, Ordering::Relaxed);
                    let period = TIMER_PERIOD[id as usize].load(Ordering::Relaxed);
                    if period != 0
                        && page()
                            .vcpu_set_singleshot_timer(id, now_ns().wrapping_add(period), 0)
                            .is_err()
                    {
                        REARM_ERRORS.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Timer
                } else {
                    Event::Port(port)
                };
                if let Some(h) = handler {
                    h(event);
                }
            }
        }
    }
}
