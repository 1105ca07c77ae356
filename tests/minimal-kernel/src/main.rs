//! A minimal 64-bit Xen PV kernel using xenmsr: boot, `init`, an FS_BASE write and
//! read-back, a safe read of an MSR Xen refuses, shutdown. (On the host: an empty program.)
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod kernel {
    use core::fmt::Write;

    use xenmsr::hypercall::HypercallPage;
    use xenmsr::hypercall::abi::{ShutdownReason, StartInfo};
    use xenmsr::pv::PvConsole;
    use xenmsr::{Config, Msr};

    xenmsr::xen_elf_notes!(guest_os: "xenmsr-minimal", guest_version: "0.1", dom0: true);
    xenmsr::pv_entry!(main);

    fn main(start_info: &'static StartInfo) -> ! {
        let xen = HypercallPage::xen();
        // SAFETY: Xen's start_info for this domain; the image runs at its link address.
        let mut out = unsafe { PvConsole::from_start_info(xen, start_info, 0) };
        // #GP and #UD first: the library's fixup turns MSR faults into errors.
        xenmsr::pv::install_trap_table().expect("set_trap_table");
        // SAFETY: once, on the only vCPU, with events masked as Xen starts us; the text
        // is writable; this is a Xen PV guest.
        let report = unsafe { xenmsr::init(Config::xen_pv(xen)) }.expect("xenmsr::init");
        let sites = report.patched;
        let total = sites.rewritten + sites.unchanged;
        let _ = writeln!(
            out,
            "minimal: init: {total} call sites, {} rewritten",
            sites.rewritten
        );

        let (mut fs_base, tls) = (Msr::FS_BASE, 0x0000_7000_0000_1000);
        // SAFETY: nothing in this kernel addresses memory through FS.
        let wrote = unsafe { fs_base.write_safe(tls) };
        // SAFETY: reading FS_BASE has no side effects.
        let read = unsafe { fs_base.read_safe() };
        let _ = writeln!(out, "minimal: FS_BASE write {wrote:?}, read back {read:x?}");

        // SAFETY: Xen refuses this read; nothing changes.
        let unknown = unsafe { Msr::new(0x1234_5678).read_safe() };
        let _ = writeln!(out, "minimal: MSR 0x12345678: {unknown:?}");

        let ok = wrote.is_ok() && read == Ok(tls) && unknown.is_err();
        let _ = writeln!(out, "minimal: {}", if ok { "PASS" } else { "FAIL" });
        shutdown(xen)
    }

    fn shutdown(xen: HypercallPage) -> ! {
        loop {
            let _ = xen.sched_shutdown(ShutdownReason::REBOOT);
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        let xen = HypercallPage::xen();
        let _ = writeln!(PvConsole::Hypervisor(xen), "minimal: panic: {info}");
        shutdown(xen)
    }
}
