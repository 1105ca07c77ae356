//! What Xen 4.17 itself does with bare MSR/PMC instructions and the hypercalls the library
//! uses, per CPU model: the oracle the library's own suites are compared against. If one
//! of these fails, the environment changed (Xen version, QEMU model), not the library.

use super::{Vendor, model, raw};
use crate::fixup::exinfo;
use crate::hv::{self, SegmentBase, XenPmuOp, XenPmuParams};
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, fail, test};
use xenmsr_hypercall::Errno;

/// The Xen-behaviour tests.
pub static TESTS: &[Test] = &[
    test!(cpu_vendor_matches_model),
    test!(apic_base_reads_bsp),
    test!(efer_reads_long_mode),
    test!(pat_reads_xen_value),
    test!(fs_base_wrmsr_roundtrip),
    test!(fs_base_noncanonical_write_is_gp),
    test!(set_segment_base_reads_back),
    test!(pat_write_is_gp),
    test!(rdpmc_is_gp),
    test!(vendor_pmu_msrs),
    test!(hardware_domain_only_msr),
    test!(xenpmu_mode_get),
];

const GP: u64 = exinfo(13, 0);

const MSR_APIC_BASE: u32 = 0x1b;
const MSR_PAT: u32 = 0x277;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_SHADOW_GS_BASE: u32 = 0xc000_0102;
const MSR_P6_PERFCTR0: u32 = 0xc1;
const MSR_P6_EVNTSEL0: u32 = 0x186;
const MSR_K7_EVNTSEL0: u32 = 0xc001_0000;
const MSR_K7_PERFCTR0: u32 = 0xc001_0004;

fn cpu_vendor_matches_model() -> TestResult {
    let (_, b, c, d) = raw::cpuid(0);
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&b.to_le_bytes());
    id[4..8].copy_from_slice(&d.to_le_bytes());
    id[8..].copy_from_slice(&c.to_le_bytes());
    let found = match &id {
        b"AuthenticAMD" => Vendor::Amd,
        b"GenuineIntel" => Vendor::Intel,
        other => fail!("unexpected CPUID vendor {:?}", core::str::from_utf8(other)),
    };
    match model().vendor {
        Some(expected) => check_eq!(found, expected, "CPUID vendor vs cpu= model"),
        None => fail!("no known cpu= on the command line; CPUID says {:?}", found),
    }
    Ok(())
}

fn apic_base_reads_bsp() -> TestResult {
    // APIC enabled at 0xfee00000; Xen sets the BSP bit on vCPU 0 only.
    let bsp = if crate::smp::current_vcpu() == 0 {
        0x100
    } else {
        0
    };
    check_eq!(
        raw::rdmsr(MSR_APIC_BASE),
        Ok(0xfee0_0800 | bsp),
        "APIC_BASE"
    );
    Ok(())
}

fn efer_reads_long_mode() -> TestResult {
    let efer = match raw::rdmsr(MSR_EFER) {
        Ok(v) => v,
        Err(e) => fail!("rdmsr EFER faulted: {e:#x}"),
    };
    check_eq!(efer & 0x500, 0x500, "EFER.LME|LMA");
    Ok(())
}

fn pat_reads_xen_value() -> TestResult {
    check_eq!(raw::rdmsr(MSR_PAT), Ok(0x0000_0501_0007_0406), "PAT");
    Ok(())
}

fn fs_base_wrmsr_roundtrip() -> TestResult {
    let value = 0x0000_1234_5678_9000;
    // SAFETY: the kernel keeps no state in FS (no TLS on x86_64-unknown-none).
    let w = unsafe { raw::wrmsr(MSR_FS_BASE, value) };
    check_eq!(w, Ok(()), "wrmsr FS_BASE");
    check_eq!(raw::rdmsr(MSR_FS_BASE), Ok(value), "FS_BASE readback");
    // SAFETY: as above.
    let _ = unsafe { raw::wrmsr(MSR_FS_BASE, 0) };
    Ok(())
}

fn fs_base_noncanonical_write_is_gp() -> TestResult {
    // SAFETY: the write is refused; FS is unused anyway.
    let w = unsafe { raw::wrmsr(MSR_FS_BASE, 0x8000_0000_0000_0000) };
    check_eq!(w, Err(GP), "wrmsr FS_BASE non-canonical");
    Ok(())
}

fn set_segment_base_reads_back() -> TestResult {
    let cases = [
        (SegmentBase::FS, MSR_FS_BASE, 0x0000_0000_0bad_f000u64),
        (
            SegmentBase::GS_USER,
            MSR_SHADOW_GS_BASE,
            0x0000_7000_0000_1000,
        ),
        (SegmentBase::GS_KERNEL, MSR_GS_BASE, 0x0000_0000_0010_0000),
    ];
    for (which, msr, value) in cases {
        check_eq!(
            hv::page().set_segment_base(which, value),
            Ok(()),
            "set_segment_base"
        );
        check_eq!(raw::rdmsr(msr), Ok(value), "segment base readback");
        let _ = hv::page().set_segment_base(which, 0);
    }
    check_eq!(
        hv::page().set_segment_base(SegmentBase::FS, 0x8000_0000_0000_0000),
        Err(Errno::EINVAL),
        "set_segment_base non-canonical"
    );
    Ok(())
}

fn pat_write_is_gp() -> TestResult {
    // Xen refuses PAT writes from a PV guest even of the same value.
    // SAFETY: the write is refused.
    let w = unsafe { raw::wrmsr(MSR_PAT, 0x0000_0501_0007_0406) };
    check_eq!(w, Err(GP), "wrmsr PAT");
    Ok(())
}

fn rdpmc_is_gp() -> TestResult {
    // RDPMC is not in Xen's emulation list: always #GP for a PV guest.
    check_eq!(raw::rdpmc(0), Err(GP), "rdpmc 0");
    check_eq!(raw::rdpmc(0x4000_0000), Err(GP), "rdpmc fixed 0");
    Ok(())
}

fn vendor_pmu_msrs() -> TestResult {
    let m = model();
    let (own, other) = match m.vendor {
        Some(Vendor::Amd) => (
            [MSR_K7_EVNTSEL0, MSR_K7_PERFCTR0],
            [MSR_P6_PERFCTR0, MSR_P6_EVNTSEL0],
        ),
        Some(Vendor::Intel) => (
            [MSR_P6_PERFCTR0, MSR_P6_EVNTSEL0],
            [MSR_K7_EVNTSEL0, MSR_K7_PERFCTR0],
        ),
        None => fail!("unknown vendor"),
    };
    for msr in own {
        match raw::rdmsr(msr) {
            // With the vPMU off (or without a context) the host vendor's PMU MSRs are RAZ.
            Ok(v) => check!(
                m.vpmu_active || v == 0,
                "rdmsr {msr:#x} = {v:#x}, expected 0"
            ),
            Err(e) => fail!("rdmsr {msr:#x} of the host vendor's PMU faulted: {e:#x}"),
        }
    }
    for msr in other {
        check_eq!(
            raw::rdmsr(msr),
            Err(GP),
            "rdmsr of the other vendor's PMU MSR"
        );
    }
    Ok(())
}

fn xenpmu_mode_get() -> TestResult {
    let mut params = XenPmuParams::new(0, 0);
    // SAFETY: MODE_GET only reads and writes `params`.
    let r = unsafe { hv::page().xenpmu_op(XenPmuOp::MODE_GET, Some(&mut params)) };
    if model().vpmu_active {
        check_eq!(r, Ok(0), "XENPMU_mode_get with vpmu=1 on EPYC");
        check_eq!(params.val, 1, "vPMU mode (XENPMU_MODE_SELF)");
    } else {
        check_eq!(
            r,
            Err(Errno::EOPNOTSUPP),
            "XENPMU_mode_get without an active vPMU"
        );
    }
    Ok(())
}

/// AMD's `K8_SYSCFG` (0xc0010010).
const MSR_K8_SYSCFG: u32 = 0xc001_0010;

/// Xen treats the hardware domain specially for some MSRs: `K8_SYSCFG` on an AMD model
/// reads (the real value) only for dom0, and #GPs for a domU; on an Intel model it #GPs for
/// both. The library passes the MSR through, so its safe read sees exactly the same.
fn hardware_domain_only_msr() -> TestResult {
    let m = model();
    let bare = raw::rdmsr(MSR_K8_SYSCFG);
    let readable = m.dom0 && m.vendor == Some(Vendor::Amd);
    if readable {
        check!(bare.is_ok(), "dom0 rdmsr K8_SYSCFG on AMD: {bare:?}");
    } else {
        check_eq!(bare, Err(GP), "rdmsr K8_SYSCFG (domU, or not AMD)");
    }
    // SAFETY: reading SYSCFG has no side effect.
    let lib = unsafe { xenmsr::rdmsr_safe(MSR_K8_SYSCFG) };
    check_eq!(
        lib.map_err(drop),
        bare.map_err(drop),
        "library vs bare read of K8_SYSCFG"
    );
    Ok(())
}
