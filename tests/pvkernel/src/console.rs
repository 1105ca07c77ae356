//! Console output through the library's PV console writer (`xenmsr_hypercall::pv`):
//! `console_io` as dom0, the PV console ring as a domU.
//!
//! Output is formatted into a line buffer and written a line at a time, so Xen's own
//! `(XEN)` lines cannot split a test line; one `print` call holds the console for all its
//! lines, so vCPUs cannot interleave them.

use core::fmt::{self, Write};

use spin::{Mutex, Once};
use xenmsr_hypercall::pv::PvConsole;

use crate::hv;

/// The console, chosen once at boot.
static CONSOLE: Once<Mutex<PvConsole>> = Once::new();

/// Chooses the console for this domain.
pub fn init(info: &crate::boot::BootInfo) {
    CONSOLE.call_once(|| {
        // SAFETY: `start_info` is this domain's, the image is linked at its physical
        // address (VIRT_BASE 0) and never changes Xen's start-of-day mapping.
        Mutex::new(unsafe { PvConsole::from_start_info(hv::page(), &info.start_info, 0) })
    });
}

/// Kicks the console backend through `port` from now on (a restored or migrated domain's
/// new console event channel).
pub fn set_port(port: u32) {
    if let Some(console) = CONSOLE.get() {
        console.lock().set_port(port);
    }
}

/// Waits until a domU's console backend has read everything written (bounded).
pub fn drain() {
    if let Some(console) = CONSOLE.get() {
        console.lock().drain();
    }
}

/// A line buffer in front of the locked console.
struct Console<'a> {
    out: Option<&'a mut PvConsole>,
    buf: [u8; 256],
    len: usize,
}

impl Console<'_> {
    fn flush(&mut self) {
        if self.len > 0 {
            if let Some(out) = self.out.as_mut() {
                let _ = out.write_bytes(&self.buf[..self.len]);
            }
            self.len = 0;
        }
    }
}

impl Write for Console<'_> {
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

impl Drop for Console<'_> {
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

/// Prints formatted text (used by `print!`/`println!`): with this vCPU's upcalls masked
/// (an upcall must not find the console lock held by the code it interrupted) and the
/// console held for the whole call.
pub fn print(args: fmt::Arguments<'_>) {
    let _masked = crate::events::mask();
    let Some(console) = CONSOLE.get() else {
        return;
    };
    let mut locked = console.lock();
    let mut line = Console {
        out: Some(&mut locked),
        buf: [0; 256],
        len: 0,
    };
    let _ = line.write_fmt(args);
}

/// Releases the console lock whoever holds it: for the panic path, which may have
/// interrupted a `print` on its own vCPU and must still get its message out.
pub fn force_unlock() {
    if let Some(console) = CONSOLE.get()
        && console.is_locked()
    {
        // SAFETY: only called on the way to ending the run; the interrupted `print` never
        // resumes, and at worst two vCPUs' final lines interleave.
        unsafe { console.force_unlock() };
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
