//! What Xen itself does with bare MSR/PMC instructions and the hypercalls the library
//! uses, per CPU model and Xen release (4.17, 4.20 or 4.22, named by `xen=` and checked
//! first):
//! the oracle the library's own suites are compared against. If one of these fails, the
//! environment changed (Xen version, QEMU model), not the library.

use super::{Vendor, XenRelease, model, raw};
use crate::fixup::exinfo;
use crate::hv::{self, SegmentBase, XenPmuOp, XenPmuParams};
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, fail, test};
use xenmsr_hypercall::Errno;

/// The Xen-behaviour tests.
pub static TESTS: &[Test] = &[
    test!(xen_version_matches_harness),
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
    test!(p6_evntsel4_7_by_release),
    test!(mmio_conf_base_by_release),
    test!(xenpmu_mode_get),
    test!(hypercall_argument_registers_by_build),
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

/// The harness names the Xen it booted (`xen=`); the running hypervisor must be that
/// release, or the release-dependent expectations below would be checked against the
/// wrong one.
fn xen_version_matches_harness() -> TestResult {
    let running = hv::page().xen_version();
    let Ok(running) = running else {
        fail!("xen_version(XENVER_version): {running:?}");
    };
    let m = model();
    let Some(release) = m.xen else {
        fail!(
            "running Xen {}.{}, but xen={:?} on the command line names no release the \
             suites know (4.17, 4.20, 4.22)",
            running.0,
            running.1,
            m.xen_arg
        );
    };
    let expected = release.version();
    check!(
        running == expected,
        "running Xen {}.{}, but xen={}.{} on the command line",
        running.0,
        running.1,
        expected.0,
        expected.1
    );
    Ok(())
}

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
        check_eq!(set_base(which, value), Ok(()), "set_segment_base");
        check_eq!(raw::rdmsr(msr), Ok(value), "segment base readback");
        let _ = set_base(which, 0);
    }
    check_eq!(
        set_base(SegmentBase::FS, 0x8000_0000_0000_0000),
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

/// The release the harness named; the tests that depend on it fail without one.
fn release() -> Result<XenRelease, crate::testing::Failure> {
    match model().xen {
        Some(release) => Ok(release),
        None => fail!("no known xen= on the command line: {:?}", model().xen_arg),
    }
}

/// Intel's `P6_EVNTSEL4`..`P6_EVNTSEL7` (0x186 + 4..7), where the two releases differ:
/// Xen 4.17 hands only `EVNTSEL0`-`3` to its vPMU and #GPs the rest, 4.20 and 4.22 hand
/// it `EVNTSEL0`-`7`, which with the vPMU off read as 0 and accept writes. The next MSR
/// (0x18e) #GPs in both. On AMD all of them are the other vendor's and #GP in both. The
/// library passes them through, so its safe accesses see exactly the same.
fn p6_evntsel4_7_by_release() -> TestResult {
    let release = release()?;
    let m = model();
    let raz_wi = match (m.vendor, release) {
        (Some(Vendor::Intel), XenRelease::V4_20 | XenRelease::V4_22) => true,
        (Some(Vendor::Intel), XenRelease::V4_17) | (Some(Vendor::Amd), _) => false,
        (None, _) => fail!("unknown vendor"),
    };
    for msr in MSR_P6_EVNTSEL0 + 4..=MSR_P6_EVNTSEL0 + 7 {
        let read = raw::rdmsr(msr);
        // SAFETY: 0 is the event select's reset value (counter disabled), and nothing in
        // this kernel counts; a refused write is recovered.
        let write = unsafe { raw::wrmsr(msr, 0) };
        if raz_wi {
            check_eq!(read, Ok(0), format_args!("rdmsr {msr:#x} ({release:?})"));
            check_eq!(
                write,
                Ok(()),
                format_args!("wrmsr {msr:#x}, 0 ({release:?})")
            );
        } else {
            check_eq!(read, Err(GP), format_args!("rdmsr {msr:#x} ({release:?})"));
            check_eq!(
                write,
                Err(GP),
                format_args!("wrmsr {msr:#x}, 0 ({release:?})")
            );
        }
        // SAFETY: as above.
        let lib_read = unsafe { xenmsr::rdmsr_safe(msr) };
        check_eq!(
            lib_read.map_err(drop),
            read.map_err(drop),
            format_args!("library vs bare read of {msr:#x}")
        );
        // SAFETY: as above.
        let lib_write = unsafe { xenmsr::wrmsr_safe(msr, 0) };
        check_eq!(
            lib_write.map_err(drop),
            write.map_err(drop),
            format_args!("library vs bare write of {msr:#x}")
        );
    }
    check_eq!(
        raw::rdmsr(MSR_P6_EVNTSEL0 + 8),
        Err(GP),
        "rdmsr 0x18e, past the event selects"
    );
    Ok(())
}

/// AMD's `MMIO_CONF_BASE` (0xc0010058).
const MSR_FAM10H_MMIO_CONF_BASE: u32 = 0xc001_0058;

/// The host CPU's family (CPUID leaf 1, with the extended family when the base is 0xf):
/// what Xen's per-family MSR rules look at.
fn host_family() -> u32 {
    let (eax, ..) = raw::cpuid(1);
    let base = (eax >> 8) & 0xf;
    if base == 0xf {
        base + ((eax >> 20) & 0xff)
    } else {
        base
    }
}

/// `MMIO_CONF_BASE`, where the two releases differ on AMD: Xen 4.17 serves reads only on
/// families 0x10-0x16 and #GPs them on the families of these models (qemu64 0xf, EPYC
/// 0x17); 4.20 and 4.22 serve them on every AMD family, with the host's value for dom0 (QEMU's TCG
/// has no such register and reads 0) and 0 for a domU. Writes #GP in both releases, and on
/// Intel everything #GPs in both. The library passes it through, like the bare access.
fn mmio_conf_base_by_release() -> TestResult {
    let release = release()?;
    let m = model();
    let family = host_family();
    let readable = match (m.vendor, release) {
        (Some(Vendor::Intel), _) => false,
        (Some(Vendor::Amd), XenRelease::V4_17) => {
            check!(
                !(0x10..=0x16).contains(&family),
                "AMD family {family:#x}: Xen 4.17 serves MMIO_CONF_BASE there; no expectation \
                 is encoded for it"
            );
            false
        }
        (Some(Vendor::Amd), XenRelease::V4_20 | XenRelease::V4_22) => true,
        (None, _) => fail!("unknown vendor"),
    };
    let read = raw::rdmsr(MSR_FAM10H_MMIO_CONF_BASE);
    if readable {
        check_eq!(
            read,
            Ok(0),
            format_args!("rdmsr MMIO_CONF_BASE ({release:?}, family {family:#x})")
        );
    } else {
        check_eq!(
            read,
            Err(GP),
            format_args!("rdmsr MMIO_CONF_BASE ({release:?}, family {family:#x})")
        );
    }
    // Write back what was read (0 if the read faulted): refused in every case.
    let value = read.unwrap_or(0);
    // SAFETY: Xen refuses the write (checked); were it accepted it would store the value
    // just read.
    let write = unsafe { raw::wrmsr(MSR_FAM10H_MMIO_CONF_BASE, value) };
    check_eq!(write, Err(GP), "wrmsr MMIO_CONF_BASE");
    // SAFETY: reading it has no side effect.
    let lib_read = unsafe { xenmsr::rdmsr_safe(MSR_FAM10H_MMIO_CONF_BASE) };
    check_eq!(
        lib_read.map_err(drop),
        read.map_err(drop),
        "library vs bare read of MMIO_CONF_BASE"
    );
    // SAFETY: as for the bare write.
    let lib_write = unsafe { xenmsr::wrmsr_safe(MSR_FAM10H_MMIO_CONF_BASE, value) };
    check_eq!(
        lib_write.map_err(drop),
        write.map_err(drop),
        "library vs bare write of MMIO_CONF_BASE"
    );
    Ok(())
}

/// `set_segment_base` through Xen's page. The test kernel addresses nothing through FS or
/// GS (no TLS; a vCPU's data is found from its stack pointer), so any base is harmless.
fn set_base(which: SegmentBase, base: u64) -> Result<(), Errno> {
    // SAFETY: see above.
    unsafe { hv::page().set_segment_base(which, base) }
}

/// What `0xdeadbeefdeadf00d`, a debug hypervisor's poison, looks like.
const DEBUG_POISON: u64 = 0xdead_beef_dead_f00d;

/// A debug hypervisor overwrites, on the return of each hypercall that is not continued,
/// the argument registers that hypercall takes; a release one leaves them. The harness
/// names the build (`xenbuild=`, checked by it against Xen's banner). This proves the
/// debug rows really run the library's stubs under the poisoning they are there for:
/// `xen_version` takes two arguments (`rdi`, `rsi`), so under a debug Xen both come back
/// poisoned and `rdx` (not an argument of it) intact; under a release Xen all three
/// are intact.
fn hypercall_argument_registers_by_build() -> TestResult {
    let Some(debug) = model().xen_debug else {
        fail!("no known xenbuild= on the command line: the harness names the build");
    };
    let entry = hv::page().entry(hv::nr::XEN_VERSION);
    let marker = 0x5a5a_0000_1234_5678u64;
    let (rax, rdi, rsi, rdx): (u64, u64, u64, u64);
    // SAFETY: the entry of Xen's hypercall page for `xen_version`; `XENVER_version` with a
    // NULL argument reads nothing and returns the version in rax. The page's stub saves
    // and restores rcx and r11 around its `syscall` and changes only rax, besides what Xen
    // itself writes back (the argument registers, in a debug build), which are all
    // declared outputs here. `call` pushes the return address, so no `nostack`.
    unsafe {
        core::arch::asm!(
            "call {entry}",
            entry = in(reg) entry,
            inlateout("rdi") u64::from(hv::nr::XENVER_VERSION) => rdi,
            inlateout("rsi") 0u64 => rsi,
            inlateout("rdx") marker => rdx,
            lateout("rax") rax,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    check!(
        rax >> 16 == 4,
        "xen_version(XENVER_version) returned {rax:#x}, not a 4.x version"
    );
    if debug {
        check_eq!(rdi, DEBUG_POISON, "rdi after the hypercall (debug Xen)");
        check_eq!(rsi, DEBUG_POISON, "rsi after the hypercall (debug Xen)");
    } else {
        check_eq!(
            rdi,
            u64::from(hv::nr::XENVER_VERSION),
            "rdi after the hypercall (release Xen)"
        );
        check_eq!(rsi, 0, "rsi after the hypercall (release Xen)");
    }
    check_eq!(
        rdx,
        marker,
        "rdx (no argument of xen_version) after the hypercall"
    );
    Ok(())
}
