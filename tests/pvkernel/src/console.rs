//! Console output: `console_io` as dom0, the PV console ring as a domU.
//!
//! Output is formatted into a line buffer and written a line at a time, so Xen's own
//! `(XEN)` lines cannot split a test line.

use core::fmt::{self, Write};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering, fence};

use xenmsr_hypercall::abi::XenconsInterface;

use crate::hv;

const MODE_NONE: u8 = 0;
const MODE_CONSOLE_IO: u8 = 1;
const MODE_RING: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
/// The console ring's virtual address (domU).
static RING: AtomicUsize = AtomicUsize::new(0);
/// The console ring's event channel (domU).
static EVTCHN: AtomicUsize = AtomicUsize::new(0);

/// Where the machine-to-physical table is mapped read-only for every 64-bit PV guest
/// (`RO_MPT_VIRT_START`).
const M2P: *const u64 = 0xffff_8000_0000_0000 as *const u64;

// The parts of `struct xencons_interface` the kernel writes, accessed through raw
// pointers only (xenconsoled changes `out_cons` concurrently).
const OUT_OFF: usize = offset_of!(XenconsInterface, out);
const OUT_SIZE: u32 = XenconsInterface::OUT_SIZE;
const OUT_CONS_OFF: usize = offset_of!(XenconsInterface, out_cons);
const OUT_PROD_OFF: usize = offset_of!(XenconsInterface, out_prod);

/// Chooses the console for this domain.
pub fn init(info: &crate::boot::BootInfo) {
    if info.is_dom0() {
        MODE.store(MODE_CONSOLE_IO, Ordering::Relaxed);
        return;
    }
    let entry = M2P.wrapping_add(info.start_info.console_mfn as usize);
    // SAFETY: the M2P is mapped read-only in every 64-bit PV guest and has an entry for
    // every MFN Xen gave this domain, which includes the console page.
    let pfn = unsafe { entry.read_volatile() };
    // VIRT_BASE is 0 and the domain builder maps PFN n at n * 4 KiB.
    RING.store((pfn as usize) << 12, Ordering::Relaxed);
    EVTCHN.store(info.start_info.console_evtchn as usize, Ordering::Relaxed);
    MODE.store(MODE_RING, Ordering::Relaxed);
}

/// Writes raw bytes to the console.
pub fn write_bytes(bytes: &[u8]) {
    match MODE.load(Ordering::Relaxed) {
        MODE_CONSOLE_IO => {
            let _ = hv::page().console_write(bytes);
        }
        MODE_RING => ring_write(bytes),
        _ => {}
    }
}

/// The console ring page, accessed only through volatile loads and stores of its fields
/// (xenconsoled changes `out_cons` concurrently), never through references.
#[derive(Clone, Copy)]
struct Ring(*mut u8);

impl Ring {
    fn get() -> Ring {
        Ring(RING.load(Ordering::Relaxed) as *mut u8)
    }

    fn out_cons(self) -> u32 {
        // SAFETY: `self.0` is the console page (set by `init` as a domU), mapped RW for
        // the domain's life; `out_cons` is an aligned u32 inside it.
        unsafe {
            self.0
                .wrapping_add(OUT_CONS_OFF)
                .cast::<u32>()
                .read_volatile()
        }
    }

    fn out_prod(self) -> u32 {
        // SAFETY: as in `out_cons`.
        unsafe {
            self.0
                .wrapping_add(OUT_PROD_OFF)
                .cast::<u32>()
                .read_volatile()
        }
    }

    fn set_out_prod(self, prod: u32) {
        // SAFETY: as in `out_cons`; only this domain writes `out_prod`.
        unsafe {
            self.0
                .wrapping_add(OUT_PROD_OFF)
                .cast::<u32>()
                .write_volatile(prod)
        }
    }

    fn put(self, index: u32, byte: u8) {
        let slot = self
            .0
            .wrapping_add(OUT_OFF + XenconsInterface::out_pos(index));
        // SAFETY: as in `out_cons`; the position is masked into the 2048-byte `out`
        // array, whose unpublished slots only this domain writes.
        unsafe { slot.write_volatile(byte) }
    }
}

fn ring_write(mut bytes: &[u8]) {
    let ring = Ring::get();
    let port = EVTCHN.load(Ordering::Relaxed) as u32;
    let mut spins = 0u32;
    while !bytes.is_empty() {
        let cons = ring.out_cons();
        let mut prod = ring.out_prod();
        fence(Ordering::Acquire);
        while prod.wrapping_sub(cons) < OUT_SIZE && !bytes.is_empty() {
            ring.put(prod, bytes[0]);
            prod = prod.wrapping_add(1);
            bytes = &bytes[1..];
        }
        // The data must be visible before the producer index that publishes it.
        fence(Ordering::Release);
        ring.set_out_prod(prod);
        let _ = hv::page().evtchn_send(port);
        if !bytes.is_empty() {
            let _ = hv::page().sched_yield();
            spins += 1;
            if spins > 1_000_000 {
                return; // Nobody is draining the ring; drop output rather than hang.
            }
        }
    }
}

/// Waits (yielding to Xen) until xenconsoled has consumed everything written, so that
/// nothing is lost when the domain shuts down. A no-op as dom0.
pub fn drain() {
    if MODE.load(Ordering::Relaxed) != MODE_RING {
        return;
    }
    let ring = Ring::get();
    for _ in 0..100_000 {
        if ring.out_cons() == ring.out_prod() {
            return;
        }
        let _ = hv::page().sched_yield();
    }
}

/// A line-buffered console writer.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    /// An empty writer.
    pub const fn new() -> Self {
        Console {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) {
        if self.len > 0 {
            write_bytes(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A short line built with `write!` before it is printed (so that a list can be formatted
/// into one `println!`).
pub struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }

    /// The text so far.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Line {
    /// Appends what fits; the rest is dropped.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                break;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Serialises printing between vCPUs, so that one `print` call's lines stay together
/// (a failing test's line and its reason) and the domU ring has one producer at a time.
static LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Prints formatted text (used by `print!`/`println!`): with this vCPU's upcalls masked
/// (an upcall must not find the lock held by the code it interrupted) and the console
/// lock held for the whole call.
pub fn print(args: fmt::Arguments<'_>) {
    let _masked = crate::events::mask();
    let _locked = LOCK.lock();
    let mut console = Console::new();
    let _ = console.write_fmt(args);
}

/// Releases the console lock whoever holds it: for the panic path, which may have
/// interrupted a `print` on its own vCPU and must still get its message out.
pub fn force_unlock() {
    if LOCK.is_locked() {
        // SAFETY: only called on the way to ending the run; the interrupted `print` never
        // resumes, and at worst two vCPUs' final lines interleave.
        unsafe { LOCK.force_unlock() };
    }
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
