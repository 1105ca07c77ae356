//! The minimal kernel's in-guest tests, run by `cargo test` through a runner that boots
//! the test binary under Xen (`xenmsr::test_main!`: one line per test, a summary,
//! poweroff when all pass, crash otherwise). The xtask row `minimal-kernel/cargo-test`
//! builds it with `cargo test --no-run --target x86_64-unknown-none` and boots it.
//! (On the host, where `cargo test --workspace` builds it too, there is nothing to run.)
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "xenmsr-minimal-kernel's guest tests run in a Xen PV guest (cargo xtask test --only minimal)"
    );
}

#[cfg(target_os = "none")]
mod guest {
    use xenmsr::guarded::{self, GuardedFault};
    use xenmsr::testing::{Failure, check, check_eq};
    use xenmsr::{Msr, MsrError};

    xenmsr::test_main! {
        name: "xenmsr-minimal-tests",
        tests: [
            fs_base_round_trip,
            unknown_msr_is_refused,
            apic_base_has_the_bsp_bit_on_vcpu_0,
            guarded_rdfsbase_without_cr4_fsgsbase_is_ud,
            guarded_rdmsr_of_an_unknown_msr_is_gp,
            guarded_load_from_an_unmapped_page_is_pf,
            guarded_non_canonical_load_is_gp,
            guarded_division_by_zero_is_de,
            a_vcpu_the_domain_lacks_does_not_start,
            events_before_their_init_are_refused,
        ],
    }

    /// `#UD`, `#GP`, `#PF`.
    const UD: GuardedFault = GuardedFault { vector: 6 };
    const GP: GuardedFault = GuardedFault { vector: 13 };
    const PF: GuardedFault = GuardedFault { vector: 14 };

    fn fs_base_round_trip() -> Result<(), Failure> {
        let (mut fs_base, tls) = (Msr::FS_BASE, 0x0000_7000_0000_1000);
        // SAFETY: nothing in this kernel addresses memory through FS.
        unsafe { fs_base.write_safe(tls) }?;
        // SAFETY: reading FS_BASE has no side effects.
        check_eq!(unsafe { fs_base.read_safe() }, Ok(tls));
        Ok(())
    }

    fn unknown_msr_is_refused() -> Result<(), Failure> {
        // SAFETY: Xen refuses this read; nothing changes.
        let read = unsafe { Msr::new(0x1234_5678).read_safe() };
        check_eq!(read, Err(MsrError::Fault { vector: 13 }));
        Ok(())
    }

    /// A test that fails by panicking, as libtest's do.
    fn apic_base_has_the_bsp_bit_on_vcpu_0() {
        const BSP: u64 = 1 << 8;
        // SAFETY: reading the APIC base has no side effects.
        let apic_base = unsafe { Msr::APIC_BASE.read_safe() }.expect("APIC_BASE read");
        assert_ne!(
            apic_base & BSP,
            0,
            "APIC base {apic_base:#x} without the BSP bit"
        );
    }

    fn guarded_rdfsbase_without_cr4_fsgsbase_is_ud() -> Result<(), Failure> {
        // `init` ran without `FsGsBase::Use`, so CR4.FSGSBASE is off on this vCPU.
        check_eq!(guarded::rdfsbase(), Err(UD));
        check_eq!(guarded::rdgsbase(), Err(UD));
        Ok(())
    }

    fn guarded_rdmsr_of_an_unknown_msr_is_gp() -> Result<(), Failure> {
        // SAFETY: Xen refuses the read (a #GP it injects); nothing changes.
        check_eq!(unsafe { guarded::rdmsr(0x1234_5678) }, Err(GP));
        // A raw read Xen emulates succeeds (the TSC: any value).
        // SAFETY: reading the TSC has no side effects.
        check!(unsafe { guarded::rdmsr(Msr::TSC.index()) }.is_ok());
        Ok(())
    }

    fn guarded_load_from_an_unmapped_page_is_pf() -> Result<(), Failure> {
        // 64 TiB: far above the domain's start-of-day mapping, in the guest's half.
        // SAFETY: nothing is mapped there; the load faults without side effects.
        check_eq!(unsafe { guarded::read_u64(0x0000_4000_0000_0000) }, Err(PF));
        let here = 0x5eed_u64;
        // SAFETY: a load from a live local.
        let loaded = unsafe { guarded::read_u64(&raw const here as usize) };
        check_eq!(loaded, Ok(0x5eed));
        Ok(())
    }

    fn guarded_non_canonical_load_is_gp() -> Result<(), Failure> {
        // SAFETY: a non-canonical address faults before anything is read.
        check_eq!(unsafe { guarded::read_u64(0x8000_0000_0000_0000) }, Err(GP));
        Ok(())
    }

    fn guarded_division_by_zero_is_de() -> Result<(), Failure> {
        let divisor = core::hint::black_box(0u64);
        let (quotient, remainder): (u64, u64);
        // SAFETY: `div` writes only rax and rdx (declared) and raises #DE for a zero
        // divisor.
        let result = unsafe {
            xenmsr::guarded_asm!(
                "div {}",
                in(reg) divisor,
                inout("rax") 100u64 => quotient,
                inout("rdx") 0u64 => remainder,
                options(nomem, nostack),
            )
        };
        check_eq!(result, Err(GuardedFault { vector: 0 }));
        let _ = (quotient, remainder);
        Ok(())
    }

    /// This kernel boots with one vCPU (`dom0_max_vcpus=1`, or a one-vCPU domU): the kit
    /// refuses to start vCPU 1 with Xen's answer, and does not claim the stack.
    fn a_vcpu_the_domain_lacks_does_not_start() -> Result<(), Failure> {
        use xenmsr::smp::{StartError, VcpuStack, start_vcpu};
        static STACK: VcpuStack = VcpuStack::new();
        fn never(_: u32) -> ! {
            panic!("vCPU 1 ran")
        }
        let started = start_vcpu(1, &STACK, never);
        check_eq!(
            started,
            Err(StartError::NoSuchVcpu(1, xenmsr::hypercall::Errno::ENOENT))
        );
        check!(!STACK.is_claimed(), "a refused start claimed the stack");
        Ok(())
    }

    /// The kit's events before `events::init` (this harness never maps the shared info
    /// page): every call is refused, none touches memory.
    fn events_before_their_init_are_refused() -> Result<(), Failure> {
        use xenmsr::events::{self, EventError};
        check_eq!(
            events::start_timer(1_000_000),
            Err(EventError::NotInitialised)
        );
        check_eq!(events::enable(), Err(EventError::NotInitialised));
        check_eq!(events::now_ns(), 0);
        drop(events::mask());
        Ok(())
    }
}
