//! Ending the run with its verdict.
//!
//! As dom0, the verdict leaves QEMU as its exit status through the `isa-debug-exit` device
//! (port 0xf4: QEMU exits with `code << 1 | 1`, so 0x10 gives 33 and 0x11 gives 35); the
//! `SHUTDOWN_reboot` after it is the fallback that makes QEMU (`-no-reboot`) exit anyway.
//! As a domU, the domain powers off and the toolstack reads its console log.

use core::arch::asm;

use crate::hv::{self, ShutdownReason};

/// `isa-debug-exit` code for success (QEMU exit status 33).
pub const EXIT_SUCCESS: u8 = 0x10;
/// `isa-debug-exit` code for failure (QEMU exit status 35).
pub const EXIT_FAILURE: u8 = 0x11;
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Ends the run: prints nothing itself, drains the console, and shuts down.
pub fn exit(success: bool) -> ! {
    // Every vCPU's vPMU finished before the domain ends (`testing::finish` checked it
    // already on a complete run; this covers an aborted one).
    let _ = xenmsr::pmu::park_all();
    crate::console::drain();
    if crate::is_dom0() {
        // Xen's serial driver sends only a FIFO's worth synchronously and the rest from
        // its TX interrupt; give it a chance to run before QEMU goes away.
        for _ in 0..64 {
            let _ = hv::page().sched_yield();
        }
        // IOPL 1 lets the PV kernel (ring 1 in Xen's eyes for I/O) use `out`; Xen then
        // emulates the port write, and port 0xf4 is not one of those it denies dom0.
        if hv::page().physdev_set_iopl(1).is_ok() {
            let code = if success { EXIT_SUCCESS } else { EXIT_FAILURE };
            // SAFETY: with IOPL granted, `out` to 0xf4 either reaches QEMU's debug-exit
            // device (QEMU exits) or, without the device, is ignored. No memory is touched.
            unsafe {
                asm!("out dx, al", in("dx") DEBUG_EXIT_PORT, in("al") code, options(nomem, nostack, preserves_flags));
            }
        }
        let _ = hv::page().sched_shutdown(ShutdownReason::REBOOT);
    } else {
        let _ = hv::page().sched_shutdown(ShutdownReason::POWEROFF);
    }
    halt_forever()
}

/// Crashes the domain (a dom0 crash makes Xen reboot after 5 s, so QEMU exits).
pub fn crash() -> ! {
    let _ = xenmsr::pmu::park_all();
    crate::console::drain();
    let _ = hv::page().sched_shutdown(ShutdownReason::CRASH);
    halt_forever()
}

fn halt_forever() -> ! {
    loop {
        let _ = hv::page().sched_yield();
    }
}
