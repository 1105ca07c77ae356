//! The library's instruction layer in the guest, before `xenmsr::init`: with no backend
//! registered every access reaches a stub, which runs the real instruction (trapped and
//! emulated by Xen). Success must give Xen's value; a fault must come back through the
//! stub's rewind entry and the site's own entry, exactly as if the native instruction
//! had faulted at the call site; every register the contract preserves must survive both.

use core::arch::asm;

use xenmsr_asm::MsrError;
use xenmsr_asm::extable::{Data, Kind};
use xenmsr_asm::site;
use xenmsr_asm::stubs::{xenmsr_stub_rdmsr, xenmsr_stub_wrmsr};

use super::raw;
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, test, traps};

/// The instruction-layer tests (run before `xenmsr::init`).
pub static TESTS: &[Test] = &[
    test!(read_safe_gives_xen_value),
    test!(read_safe_fault_is_err),
    test!(read_unchecked_fault_reads_zero),
    test!(write_safe_native),
    test!(write_safe_fault_is_err),
    test!(write_unchecked_fault_is_dropped),
    test!(rdpmc_safe_is_err),
    test!(rdpmc_unchecked_reads_zero),
    test!(read_stub_preserves_registers),
    test!(write_stub_preserves_registers),
];

const GP_FAULT: MsrError = MsrError::Fault { vector: 13 };
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_PAT: u32 = 0x277;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_BOGUS: u32 = 0x1234_5678;

fn read_safe_gives_xen_value() -> TestResult {
    for msr in [MSR_APIC_BASE, MSR_EFER, MSR_PAT] {
        // SAFETY: reading these MSRs has no side effect.
        let got = unsafe { site::rdmsr_safe(msr) };
        let want = raw::rdmsr(msr).map_err(|_| GP_FAULT);
        check_eq!(got, want, "rdmsr_safe vs the bare instruction");
        check!(got.is_ok(), "rdmsr_safe({msr:#x}) failed: {got:?}");
    }
    Ok(())
}

fn read_safe_fault_is_err() -> TestResult {
    let (gp, ud) = (traps::count(13), traps::count(6));
    for msr in [MSR_BOGUS, MSR_STAR] {
        // SAFETY: the read faults in Xen; no state changes.
        let got = unsafe { site::rdmsr_safe(msr) };
        check_eq!(got, Err(GP_FAULT), "rdmsr_safe of a #GP MSR");
    }
    // The native RDMSR in the stub faulted (#GP) and was rewound to the call site: no
    // ud2 trap was needed on this path.
    check_eq!(traps::count(13) - gp, 2, "#GP taken");
    check_eq!(traps::count(6) - ud, 0, "#UD taken");
    Ok(())
}

fn read_unchecked_fault_reads_zero() -> TestResult {
    // SAFETY: as above.
    let v = unsafe { site::rdmsr(MSR_BOGUS) };
    check_eq!(v, 0u64, "rdmsr of a #GP MSR");
    Ok(())
}

fn write_safe_native() -> TestResult {
    let value = 0x0000_0012_3456_7000;
    // SAFETY: the kernel keeps no state in FS.
    let got = unsafe { site::wrmsr_safe(MSR_FS_BASE, value) };
    check_eq!(got, Ok(()), "wrmsr_safe FS_BASE");
    check_eq!(raw::rdmsr(MSR_FS_BASE), Ok(value), "FS_BASE readback");
    // SAFETY: as above.
    let _ = unsafe { site::wrmsr_safe(MSR_FS_BASE, 0) };
    Ok(())
}

fn write_safe_fault_is_err() -> TestResult {
    // SAFETY: Xen refuses both writes.
    let got = unsafe { site::wrmsr_safe(MSR_FS_BASE, 0x8000_0000_0000_0000) };
    check_eq!(got, Err(GP_FAULT), "wrmsr_safe FS_BASE non-canonical");
    let pat = raw::rdmsr(MSR_PAT).unwrap_or(0);
    // SAFETY: as above.
    let got = unsafe { site::wrmsr_safe(MSR_PAT, pat) };
    check_eq!(got, Err(GP_FAULT), "wrmsr_safe PAT");
    Ok(())
}

fn write_unchecked_fault_is_dropped() -> TestResult {
    let pat = raw::rdmsr(MSR_PAT).unwrap_or(0);
    // SAFETY: Xen refuses the write; the fixup drops it.
    unsafe { site::wrmsr(MSR_PAT, 0) };
    check_eq!(
        raw::rdmsr(MSR_PAT).unwrap_or(1),
        pat,
        "PAT after a refused write"
    );
    Ok(())
}

fn rdpmc_safe_is_err() -> TestResult {
    // SAFETY: RDPMC always #GPs for a PV guest; no state changes.
    let got = unsafe { site::rdpmc_safe(0) };
    check_eq!(got, Err(GP_FAULT), "rdpmc_safe(0)");
    Ok(())
}

fn rdpmc_unchecked_reads_zero() -> TestResult {
    // SAFETY: as above.
    check_eq!(unsafe { site::rdpmc(0) }, 0u64, "rdpmc(0)");
    Ok(())
}

/// Patterns for the registers a stub must preserve.
const P: [u64; 9] = [
    0x0101_0202_0303_0404, // rdi
    0x1111_2222_3333_4444, // r8
    0x5555_6666_7777_8888, // r9
    0x9999_aaaa_bbbb_cccc, // r10
    0xdddd_eeee_ffff_0001, // r11
    0x0123_4567_89ab_cdef, // r12
    0xfedc_ba98_7654_3210, // r13
    0x0f0f_0f0f_f0f0_f0f0, // r14
    0xa5a5_5a5a_a5a5_5a5a, // rcx high half (ecx is the MSR)
];
const NAMES: [&str; 8] = ["rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14"];

/// Calls the read stub exactly as a `rdmsr_safe` site does (a 5-byte `call` padded to the
/// site length, with a `ReadSafe` extable entry whose fixup is the end of the region),
/// with every other register holding a pattern. Returns the result, the registers after,
/// whether rbx/rbp survived, and rcx after.
fn read_via_stub(msr: u32) -> (Result<u64, MsrError>, [u64; 8], u64, u64) {
    let (lo, hi, err, bad_rbx_rbp, rcx): (u32, u32, u64, u64, u64);
    let mut regs = [0u64; 8];
    // SAFETY: the block calls the read stub with the site's exact shape: its own extable
    // entry covers the call, so a failure ends at `4:` with the error code in rsi (the
    // entry's register). rbx and rbp (not allowed as operands) are saved and restored by
    // hand around the call; the stack is balanced. The MSRs read have no side effects.
    unsafe {
        asm!(
            "push rbx",
            "push rbp",
            "mov rbx, 0x13579bdf2468ace0",
            "mov rbp, 0x0badcafe0badf00d",
            "2:",
            "call {stub}",
            "3:",
            ".skip {site_len} - (3b - 2b), 0x90",
            "4:",
            ".pushsection xenmsr_extable, \"awR\", @progbits",
            ".balign 4",
            ".long 2b - .",
            ".long 4b - .",
            ".long {data}",
            ".popsection",
            "push rax",
            "mov rax, 0x13579bdf2468ace0",
            "xor rax, rbx",
            "mov r15, 0x0badcafe0badf00d",
            "xor r15, rbp",
            "or r15, rax",
            "pop rax",
            "pop rbp",
            "pop rbx",
            stub = sym xenmsr_stub_rdmsr,
            site_len = const xenmsr_asm::SITE_LEN,
            data = const Data::site(Kind::ReadSafe, 0).bits(),
            inout("rcx") (P[8] & !0xffff_ffff) | u64::from(msr) => rcx,
            out("eax") lo,
            out("edx") hi,
            inout("rsi") 0u64 => err,
            inout("rdi") P[0] => regs[0],
            inout("r8") P[1] => regs[1],
            inout("r9") P[2] => regs[2],
            inout("r10") P[3] => regs[3],
            inout("r11") P[4] => regs[4],
            inout("r12") P[5] => regs[5],
            inout("r13") P[6] => regs[6],
            inout("r14") P[7] => regs[7],
            out("r15") bad_rbx_rbp,
        );
    }
    let result = if err == 0 {
        Ok(u64::from(hi) << 32 | u64::from(lo))
    } else {
        Err(MsrError::from_code(err).unwrap_or(MsrError::Fault { vector: 0xff }))
    };
    (result, regs, bad_rbx_rbp, rcx)
}

/// Calls the write stub exactly as a `wrmsr_safe` site does; returns the result, the
/// registers after (including rax and rdx, which a write preserves), whether rbx/rbp
/// survived, and rcx after.
fn write_via_stub(msr: u32, value: u64) -> (Result<(), MsrError>, [u64; 8], [u64; 2], u64, u64) {
    let (err, bad_rbx_rbp, rcx, rax, rdx): (u64, u64, u64, u64, u64);
    let mut regs = [0u64; 8];
    // SAFETY: as in `read_via_stub`, with the write stub and a `WriteSafe` entry; the
    // callers only write FS_BASE (unused by the kernel) or values Xen refuses.
    unsafe {
        asm!(
            "push rbx",
            "push rbp",
            "mov rbx, 0x13579bdf2468ace0",
            "mov rbp, 0x0badcafe0badf00d",
            "2:",
            "call {stub}",
            "3:",
            ".skip {site_len} - (3b - 2b), 0x90",
            "4:",
            ".pushsection xenmsr_extable, \"awR\", @progbits",
            ".balign 4",
            ".long 2b - .",
            ".long 4b - .",
            ".long {data}",
            ".popsection",
            "push rax",
            "mov rax, 0x13579bdf2468ace0",
            "xor rax, rbx",
            "mov r15, 0x0badcafe0badf00d",
            "xor r15, rbp",
            "or r15, rax",
            "pop rax",
            "pop rbp",
            "pop rbx",
            stub = sym xenmsr_stub_wrmsr,
            site_len = const xenmsr_asm::SITE_LEN,
            data = const Data::site(Kind::WriteSafe, 0).bits(),
            inout("rcx") (P[8] & !0xffff_ffff) | u64::from(msr) => rcx,
            inout("rax") value & 0xffff_ffff => rax,
            inout("rdx") value >> 32 => rdx,
            inout("rsi") 0u64 => err,
            inout("rdi") P[0] => regs[0],
            inout("r8") P[1] => regs[1],
            inout("r9") P[2] => regs[2],
            inout("r10") P[3] => regs[3],
            inout("r11") P[4] => regs[4],
            inout("r12") P[5] => regs[5],
            inout("r13") P[6] => regs[6],
            inout("r14") P[7] => regs[7],
            out("r15") bad_rbx_rbp,
        );
    }
    let result = if err == 0 {
        Ok(())
    } else {
        Err(MsrError::from_code(err).unwrap_or(MsrError::Fault { vector: 0xff }))
    };
    (result, regs, [rax, rdx], bad_rbx_rbp, rcx)
}

fn check_preserved(regs: &[u64; 8], bad_rbx_rbp: u64, rcx: u64, msr: u32) -> TestResult {
    for i in 0..regs.len() {
        check_eq!(regs[i], P[i], NAMES[i]);
    }
    check_eq!(bad_rbx_rbp, 0u64, "rbx/rbp changed (xor with the patterns)");
    check_eq!(
        rcx,
        (P[8] & !0xffff_ffff) | u64::from(msr),
        "rcx (all 64 bits)"
    );
    Ok(())
}

fn read_stub_preserves_registers() -> TestResult {
    // The pass-through path (Xen emulates the read) and the fault path (rewind).
    let (r, regs, bad, rcx) = read_via_stub(MSR_APIC_BASE);
    check_eq!(
        r,
        raw::rdmsr(MSR_APIC_BASE).map_err(|_| GP_FAULT),
        "stub read APIC_BASE"
    );
    check_preserved(&regs, bad, rcx, MSR_APIC_BASE)?;
    let (r, regs, bad, rcx) = read_via_stub(MSR_BOGUS);
    check_eq!(r, Err(GP_FAULT), "stub read of a #GP MSR");
    check_preserved(&regs, bad, rcx, MSR_BOGUS)
}

fn write_stub_preserves_registers() -> TestResult {
    let value = 0x0000_0abc_def0_1000u64;
    let (r, regs, ax_dx, bad, rcx) = write_via_stub(MSR_FS_BASE, value);
    check_eq!(r, Ok(()), "stub write FS_BASE");
    check_eq!(raw::rdmsr(MSR_FS_BASE), Ok(value), "FS_BASE readback");
    check_preserved(&regs, bad, rcx, MSR_FS_BASE)?;
    check_eq!(ax_dx, [value & 0xffff_ffff, value >> 32], "rax, rdx");
    let bad_value = 0x8000_0000_0000_0000u64;
    let (r, regs, ax_dx, bad, rcx) = write_via_stub(MSR_FS_BASE, bad_value);
    check_eq!(r, Err(GP_FAULT), "stub write of a non-canonical FS_BASE");
    check_preserved(&regs, bad, rcx, MSR_FS_BASE)?;
    check_eq!(
        ax_dx,
        [bad_value & 0xffff_ffff, bad_value >> 32],
        "rax, rdx"
    );
    // SAFETY: FS is unused by the kernel.
    let _ = unsafe { raw::wrmsr(MSR_FS_BASE, 0) };
    Ok(())
}
