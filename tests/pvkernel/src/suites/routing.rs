//! The library's routing on Xen PV, after `xenmsr::init`: what each MSR class does, which
//! hypercalls it makes (counted by the tracing page), and the warn-once rule.

use xenmsr::patch::Variant;
use xenmsr::{InitError, MsrError, rdmsr, rdmsr_safe, wrmsr_safe};
use xenmsr_hypercall::Errno;

use super::raw;
use crate::fixup::exinfo;
use crate::hv::nr;
use crate::testing::{Test, TestResult};
use crate::tracepage::{self, Snapshot};
use crate::{check, check_eq, fail, test, traps};

/// The routing tests (run after `xenmsr::init`).
pub static TESTS: &[Test] = &[
    test!(init_succeeds),
    test!(second_init_is_refused),
    test!(segment_base_writes_are_hypercalls),
    test!(segment_base_noncanonical_is_hypercall_error),
    test!(segment_base_reads_pass_through),
    test!(syscall_msr_writes_are_ignored),
    test!(apic_base_is_fixed_up),
    test!(efer_passes_through),
    test!(unknown_msr_faults_like_native),
    test!(unchecked_fault_warns_once_per_site),
];

const GP_FAULT: MsrError = MsrError::Fault { vector: 13 };
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_BOGUS: u32 = 0x1234_5678;
const SYSCALL_MSRS: [u32; 7] = [
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
];

fn init_succeeds() -> TestResult {
    let report = match crate::library::init() {
        Ok(report) => report,
        Err(e) => fail!("xenmsr::init: {e}"),
    };
    check_eq!(report.variant, Variant::XenPv, "patch variant");
    // On Xen PV every site keeps the `call` it was emitted with, and every record of the
    // image's patch-site section was visited.
    let sites = xenmsr_asm::patch::records().len();
    check!(
        sites > 0,
        "the image has no patch sites (linker script lost them?)"
    );
    check_eq!(report.patched.rewritten, 0, "sites rewritten");
    check_eq!(
        report.patched.unchanged,
        sites,
        "sites already right vs records"
    );
    Ok(())
}

fn second_init_is_refused() -> TestResult {
    check_eq!(
        crate::library::init(),
        Err(InitError::AlreadyInitialised),
        "second init"
    );
    Ok(())
}

/// Runs `f` and returns what it returned and the hypercalls it made.
fn traced<R>(f: impl FnOnce() -> R) -> (R, Snapshot, Snapshot) {
    let before = tracepage::snapshot();
    let r = f();
    (r, before, tracepage::snapshot())
}

fn segment_base_writes_are_hypercalls() -> TestResult {
    for (msr, value) in [
        (MSR_FS_BASE, 0x0000_7f00_0000_1000u64),
        (MSR_GS_BASE, 0x0000_0000_0020_0000),
        (MSR_KERNEL_GS_BASE, 0x0000_6000_0000_2000),
    ] {
        // SAFETY: the kernel keeps no state in FS or GS.
        let (r, before, after) = traced(|| unsafe { wrmsr_safe(msr, value) });
        check_eq!(r, Ok(()), "wrmsr_safe of a segment base");
        check_eq!(
            after.count_since(&before, nr::SET_SEGMENT_BASE),
            1u64,
            "set_segment_base calls"
        );
        check_eq!(after.total_since(&before), 1u64, "hypercalls made");
        check_eq!(
            raw::rdmsr(msr),
            Ok(value),
            "readback with the bare instruction"
        );
        // SAFETY: as above.
        let _ = unsafe { wrmsr_safe(msr, 0) };
    }
    Ok(())
}

fn segment_base_noncanonical_is_hypercall_error() -> TestResult {
    // SAFETY: Xen refuses the value.
    let (r, before, after) = traced(|| unsafe { wrmsr_safe(MSR_FS_BASE, 0x8000_0000_0000_0000) });
    check_eq!(
        r,
        Err(MsrError::Hypercall(Errno::EINVAL)),
        "non-canonical FS_BASE"
    );
    check_eq!(
        after.count_since(&before, nr::SET_SEGMENT_BASE),
        1u64,
        "set_segment_base calls"
    );
    Ok(())
}

fn segment_base_reads_pass_through() -> TestResult {
    let value = 0x0000_1111_2222_3000u64;
    // SAFETY: FS is unused by the kernel.
    let got = unsafe { wrmsr_safe(MSR_FS_BASE, value) };
    check_eq!(got, Ok(()), "wrmsr_safe FS_BASE");
    // SAFETY: reading FS_BASE has no side effect.
    let (r, before, after) = traced(|| unsafe { rdmsr_safe(MSR_FS_BASE) });
    check_eq!(r, Ok(value), "rdmsr_safe FS_BASE");
    check_eq!(
        after.total_since(&before),
        0u64,
        "hypercalls made by a read"
    );
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    Ok(())
}

fn syscall_msr_writes_are_ignored() -> TestResult {
    for msr in SYSCALL_MSRS {
        let gp = traps::count(13);
        // SAFETY: the library ignores the write; nothing changes.
        let (r, before, after) = traced(|| unsafe { wrmsr_safe(msr, 0x1234) });
        check_eq!(r, Ok(()), "wrmsr_safe of a syscall MSR");
        check_eq!(after.total_since(&before), 0u64, "hypercalls made");
        // No WRMSR reached Xen either (it would have raised #GP, fixed up or not).
        check_eq!(traps::count(13) - gp, 0, "#GP taken");
        // The bare instruction would have faulted: the library changed the outcome.
        // SAFETY: Xen refuses the write.
        let got = unsafe { raw::wrmsr(msr, 0x1234) };
        check_eq!(got, Err(exinfo(13, 0)), "bare wrmsr");
    }
    Ok(())
}

fn apic_base_is_fixed_up() -> TestResult {
    // SAFETY: reading the APIC base has no side effect.
    let r = unsafe { rdmsr_safe(MSR_APIC_BASE) };
    // Enabled at 0xfee00000, BSP (vCPU 0), no x2APIC.
    check_eq!(r, Ok(0xfee0_0900), "APIC_BASE");
    Ok(())
}

fn efer_passes_through() -> TestResult {
    // SAFETY: reading EFER has no side effect.
    let (r, before, after) = traced(|| unsafe { rdmsr_safe(MSR_EFER) });
    check_eq!(r, raw::rdmsr(MSR_EFER).map_err(|_| GP_FAULT), "EFER");
    check!(r.is_ok(), "rdmsr_safe(EFER) failed: {r:?}");
    check_eq!(after.total_since(&before), 0u64, "hypercalls made");
    Ok(())
}

fn unknown_msr_faults_like_native() -> TestResult {
    // SAFETY: Xen refuses both accesses.
    let (r, before, after) = traced(|| unsafe { rdmsr_safe(MSR_BOGUS) });
    check_eq!(r, Err(GP_FAULT), "rdmsr_safe of an unknown MSR");
    // SAFETY: as above.
    let got = unsafe { wrmsr_safe(MSR_BOGUS, 1) };
    check_eq!(got, Err(GP_FAULT), "wrmsr_safe of an unknown MSR");
    check_eq!(after.total_since(&before), 0u64, "hypercalls made");
    Ok(())
}

/// One unchecked read site, called repeatedly.
#[inline(never)]
fn unchecked_read_site_a(msr: u32) -> u64 {
    // SAFETY: the MSRs read here have no side effects.
    unsafe { rdmsr(msr) }
}

/// Another unchecked read site.
#[inline(never)]
fn unchecked_read_site_b(msr: u32) -> u64 {
    // SAFETY: as above.
    unsafe { rdmsr(msr) }
}

fn unchecked_fault_warns_once_per_site() -> TestResult {
    let (w0, _, _) = crate::library::warnings();
    check_eq!(
        unchecked_read_site_a(MSR_BOGUS),
        0u64,
        "first unchecked read"
    );
    let (w1, msr, site_a) = crate::library::warnings();
    check_eq!(w1 - w0, 1, "warnings after the first fault at site A");
    check_eq!(msr, MSR_BOGUS, "warned MSR");
    check_eq!(
        unchecked_read_site_a(MSR_BOGUS),
        0u64,
        "second unchecked read"
    );
    check_eq!(
        crate::library::warnings().0 - w0,
        1,
        "warnings after the second fault at site A"
    );
    check_eq!(
        unchecked_read_site_b(MSR_BOGUS),
        0u64,
        "unchecked read at site B"
    );
    let (w2, _, site_b) = crate::library::warnings();
    check_eq!(w2 - w0, 2, "warnings after a fault at site B");
    check!(
        site_a != site_b,
        "both warnings name the same site {site_a:#x}"
    );
    // A good read at a site that warned still works.
    check_eq!(
        unchecked_read_site_a(MSR_APIC_BASE),
        0xfee0_0900u64,
        "APIC_BASE at site A"
    );
    Ok(())
}
