//! The kit's console that every vCPU shares: [`println!`](crate::println) and
//! [`print!`](crate::print) write whole lines, one vCPU at a time.
//!
//! It wraps the domain's [`PvConsole`] (the hypervisor console for dom0, the console ring
//! for a domU) in a lock. While a vCPU holds the lock its upcalls are masked (when the
//! kit's [`events`](crate::events) are set up), so an upcall handler that prints cannot
//! wait for the lock its own vCPU holds. The one way back into the lock on the same vCPU
//! is a panic (or a fault) in the middle of a print: then the holder is this very vCPU,
//! which will never release it, and the writer takes it over (the interrupted line is cut
//! short; the panic message is what matters).
//!
//! Before [`init`], output goes to the hypervisor console (`console_io`), which Xen
//! accepts from dom0 (and drops for a domU).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use xenmsr_hypercall::HypercallPage;
use xenmsr_hypercall::abi::StartInfo;
use xenmsr_hypercall::pv::PvConsole;

/// The console, once [`init`] found it.
static CONSOLE: spin::Mutex<Option<PvConsole>> = spin::Mutex::new(None);
/// The vCPU holding [`CONSOLE`] plus one (0: free or unknown holder).
static HOLDER: AtomicU32 = AtomicU32::new(0);

/// Finds the domain's console from `start_info` (see [`PvConsole::from_start_info`]).
///
/// # Safety
///
/// As for [`PvConsole::from_start_info`]: `start_info` is this domain's, and for a domU
/// `virt_base` is the image's `VIRT_BASE` (0 for an image linked with `xenmsr-pv.ld`)
/// with the start-of-day mapping of the console page still in place.
pub unsafe fn init(start_info: &StartInfo, virt_base: u64) {
    let page = HypercallPage::xen();
    // SAFETY: forwarded to the caller.
    let console = unsafe { PvConsole::from_start_info(page, start_info, virt_base) };
    with_console(|slot| *slot = Some(console));
}

/// Writes `args` as one piece: no other vCPU's output comes in between.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    with_console(|slot| {
        let _ = match slot {
            Some(console) => console.write_fmt(args),
            None => PvConsole::Hypervisor(HypercallPage::xen()).write_fmt(args),
        };
    });
}

/// Waits (bounded) until the console's reader has taken everything written: call it
/// before shutting the domain down, so the last lines are not lost.
pub fn flush() {
    with_console(|slot| {
        if let Some(console) = slot {
            console.drain();
        }
    });
}

/// Runs `f` with the console locked and this vCPU's upcalls masked.
fn with_console<R>(f: impl FnOnce(&mut Option<PvConsole>) -> R) -> R {
    let _masked = crate::events::mask();
    let me = crate::smp::current_vcpu().map_or(0, |id| id.wrapping_add(1));
    let mut guard = loop {
        if let Some(guard) = CONSOLE.try_lock() {
            break guard;
        }
        if me != 0 && HOLDER.load(Ordering::Acquire) == me {
            // This vCPU holds the lock further up its own stack (a panic or a fault in a
            // print): that holder never runs again before we return, so take it over.
            // SAFETY: the only holder is this vCPU's interrupted print, which cannot run
            // until this one returns; nothing else touches the console meanwhile.
            unsafe { CONSOLE.force_unlock() };
            continue;
        }
        core::hint::spin_loop();
    };
    HOLDER.store(me, Ordering::Release);
    let result = f(&mut guard);
    HOLDER.store(0, Ordering::Release);
    result
}

/// Prints to the kit's shared console ([`console`](crate::console)); the text of one call
/// comes out whole.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::write_fmt(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the kit's shared console ([`console`](crate::console)); the line of
/// one call comes out whole, never mixed with another vCPU's.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::write_fmt(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::write_fmt(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
