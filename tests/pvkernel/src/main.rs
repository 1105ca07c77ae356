//! The PV test kernel. Built for `x86_64-unknown-none`; on the host it is an empty program
//! so that workspace-wide commands still work.
//!
//! Booted by Xen (as dom0 directly under QEMU, or as a domU with `xl create`), it registers
//! a trap table, picks its console, runs the suite its command line names, prints one line
//! per test and `Test result: SUCCESS|FAILURE`, and shuts down carrying the verdict.
//!
//! Command line (the multiboot module string after the image name, or xl's `cmdline`):
//! `suite=<dom0|domu|demo|bench|smpbench|sweep> cpu=<qemu64|Skylake-Client|EPYC> vpmu=<0|1>
//! xen=<4.17|4.20|4.22>`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod accounting;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
#[macro_use]
mod console;
#[cfg(target_os = "none")]
mod demo;
#[cfg(target_os = "none")]
mod events;
#[cfg(target_os = "none")]
mod exit;
#[cfg(target_os = "none")]
mod fixup;
#[cfg(target_os = "none")]
mod hv;
#[cfg(target_os = "none")]
mod library;
#[cfg(target_os = "none")]
mod smp;
#[cfg(target_os = "none")]
mod suites;
#[cfg(target_os = "none")]
#[macro_use]
mod testing;
#[cfg(target_os = "none")]
mod tracepage;
#[cfg(target_os = "none")]
mod traps;

#[cfg(target_os = "none")]
pub use kernel::*;

#[cfg(target_os = "none")]
mod kernel {
    use spin::Once;

    use crate::boot::BootInfo;
    use crate::{console, suites, testing, traps};

    static BOOT: Once<BootInfo> = Once::new();

    /// The boot information (set before anything else runs).
    pub fn boot_info() -> &'static BootInfo {
        BOOT.get().expect("boot info is set at entry")
    }

    /// Whether this domain is dom0 (false until the boot info is read).
    pub fn is_dom0() -> bool {
        BOOT.get().is_some_and(BootInfo::is_dom0)
    }

    /// The Rust entry point, called by the kit's entry (`boot.rs`) on vCPU 0's stack with
    /// the copy of Xen's `start_info`.
    pub fn kernel_main(start_info: &'static xenmsr_hypercall::abi::StartInfo) -> ! {
        let info = BOOT.call_once(|| BootInfo::new(start_info));
        console::init(info);
        println!(
            "xenmsr-pvkernel: {} ({}), cmdline \"{}\"",
            if info.is_dom0() { "dom0" } else { "domU" },
            info.magic(),
            info.cmdline()
        );
        // The trap table goes in before any test: without a #GP handler Xen would fake
        // faulting RDMSRs as 0 and the MSR tests would prove nothing.
        if let Err(e) = traps::install() {
            println!("set_trap_table failed: {e}");
            testing::abort_run("no trap table");
        }
        // Sort the library's exception table now, not inside the first fault.
        xenmsr_asm::extable::init();
        match info
            .arg("suite")
            .unwrap_or(if info.is_dom0() { "dom0" } else { "domu" })
        {
            "demo" => crate::demo::run(),
            suite => suites::run(suite, info),
        }
        testing::finish()
    }

    #[panic_handler]
    fn panic(panic: &core::panic::PanicInfo<'_>) -> ! {
        console::force_unlock();
        println!("PANIC: {panic}");
        testing::abort_run("panic")
    }
}
