//! An SMP Xen PV kernel on xenmsr's kit, with no assembly: it starts 4 vCPUs, runs a timer
//! on each, writes and reads back its own FS and GS bases and reads MSRs on each, checks
//! everything again after the timer has interrupted it, and powers off (or crashes the
//! domain if anything failed). (On the host: an empty program.)
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
mod kernel {
    use core::sync::atomic::{AtomicU32, Ordering};

    use xenmsr::events::{self, Event};
    use xenmsr::hypercall::HypercallPage;
    use xenmsr::hypercall::abi::{ShutdownReason, StartInfo};
    use xenmsr::smp::{self, VcpuStack};
    use xenmsr::{Config, Msr, println};

    /// vCPUs to run (the domain needs as many: `dom0_max_vcpus=4`).
    const VCPUS: u32 = 4;
    /// Timer ticks each vCPU waits for between its two checks (one every millisecond).
    const TICKS: u64 = 50;

    /// The secondaries' stacks (vCPU 0 runs on the one `pv_entry!` gives it).
    static STACKS: [VcpuStack; VCPUS as usize - 1] = [const { VcpuStack::new() }; 3];
    static PASSED: AtomicU32 = AtomicU32::new(0);
    static FINISHED: AtomicU32 = AtomicU32::new(0);

    xenmsr::xen_elf_notes!(guest_os: "xenmsr-smp", guest_version: "0.1", dom0: true);
    xenmsr::pv_entry!(main);

    fn main(start_info: &'static StartInfo) -> ! {
        // SAFETY: Xen's start_info for this domain; the image runs at its link address.
        unsafe { xenmsr::console::init(start_info, 0) };
        xenmsr::pv::install_trap_table().expect("set_trap_table");
        xenmsr::pv::install_callbacks().expect("callback_register");
        // SAFETY: once, on the boot vCPU, with events masked as Xen starts us; the text is
        // writable; this is a Xen PV guest.
        unsafe { xenmsr::init(Config::xen_pv(HypercallPage::xen())) }.expect("xenmsr::init");
        // SAFETY: this domain's start_info; nothing else maps the shared info page.
        unsafe { events::init(start_info) }.expect("events::init");
        events::set_handler(on_event);
        for (id, stack) in (1..VCPUS).zip(&STACKS) {
            if let Err(e) = smp::start_vcpu(id, stack, vcpu_main) {
                panic!("starting vCPU {id}: {e}");
            }
        }
        vcpu_main(0)
    }

    /// Every event: the kit counts timer ticks per vCPU; anything else is unexpected.
    fn on_event(event: Event) {
        if let Event::Port(port) = event {
            println!("smp: unexpected event on port {port}");
        }
    }

    /// What every vCPU runs, vCPU 0 last: check, tick, check again, report.
    fn vcpu_main(id: u32) -> ! {
        let xen = HypercallPage::xen();
        events::start_timer(1_000_000).expect("start_timer");
        events::enable().expect("events::enable");
        let (fs, gs) = (
            0x7000_0000_0000 + (u64::from(id) << 20),
            0x6000_0000_0000 + u64::from(id),
        );
        let before = write_bases(fs, gs).and_then(|()| check(id, fs, gs));
        while events::ticks(id) < TICKS {
            let _ = xen.sched_yield();
        }
        let after = check(id, fs, gs);
        println!(
            "smp: vCPU {id}: before {before:?}, after {after:?} ({} ticks)",
            events::ticks(id)
        );
        if before.is_ok() && after.is_ok() {
            PASSED.fetch_add(1, Ordering::AcqRel);
        }
        FINISHED.fetch_add(1, Ordering::AcqRel);
        if id != 0 {
            loop {
                let _ = xen.sched_yield();
            }
        }
        while FINISHED.load(Ordering::Acquire) < VCPUS {
            let _ = xen.sched_yield();
        }
        let passed = PASSED.load(Ordering::Acquire);
        println!(
            "smp: {passed}/{VCPUS} vCPUs passed: {}",
            if passed == VCPUS { "PASS" } else { "FAIL" }
        );
        shutdown(if passed == VCPUS {
            ShutdownReason::POWEROFF
        } else {
            ShutdownReason::CRASH
        })
    }

    fn write_bases(fs: u64, gs: u64) -> Result<(), &'static str> {
        let (mut fs_base, mut gs_base) = (Msr::FS_BASE, Msr::GS_BASE);
        // SAFETY: nothing in this kernel addresses memory through FS or GS.
        unsafe { fs_base.write_safe(fs) }.map_err(|_| "FS_BASE write failed")?;
        // SAFETY: as above.
        unsafe { gs_base.write_safe(gs) }.map_err(|_| "GS_BASE write failed")
    }

    /// This vCPU's own view: its id, its bases, its APIC base, and Xen refusing an MSR.
    fn check(id: u32, fs: u64, gs: u64) -> Result<(), &'static str> {
        if smp::current_vcpu() != Some(id) {
            return Err("wrong vCPU id");
        }
        // SAFETY: reading FS_BASE has no side effects.
        let fs_now = unsafe { Msr::FS_BASE.read_safe() };
        // SAFETY: nor has reading GS_BASE.
        if (fs_now, unsafe { Msr::GS_BASE.read_safe() }) != (Ok(fs), Ok(gs)) {
            return Err("a segment base changed");
        }
        // SAFETY: reading the APIC base has no side effects.
        let apic = unsafe { Msr::APIC_BASE.read_safe() }.map_err(|_| "APIC_BASE read failed")?;
        if (apic >> 8) & 1 != u64::from(id == 0) {
            return Err("the APIC base's BSP bit is wrong for this vCPU");
        }
        // SAFETY: Xen refuses this read; nothing changes.
        match unsafe { Msr::new(0x1234_5678).read_safe() } {
            Err(_) => Ok(()),
            Ok(_) => Err("an unknown MSR read succeeded"),
        }
    }

    fn shutdown(reason: ShutdownReason) -> ! {
        xenmsr::console::flush();
        loop {
            let _ = HypercallPage::xen().sched_shutdown(reason);
        }
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        println!("smp: panic: {info}");
        shutdown(ShutdownReason::CRASH)
    }
}
