//! Raw-instruction accesses: never patched, never calling a stub.
//!
//! For the policy's "do the real access, then fix the value up" paths (for example the
//! APIC base on Xen PV, which passes through and then has bits adjusted). Each access is
//! the bare instruction with a `_SAFE` extable entry, so a fault (`#GP` from the CPU, or
//! from Xen's emulation) comes back as `Err(MsrError::Fault { .. })`.

use core::arch::asm;

use crate::MsrError;
use crate::error::result_of;
use crate::extable::{Data, Kind};

/// The text of one native site: `insn` at `2:`, fixup at `3:`. Operand: `data`.
macro_rules! native_template {
    ($insn:literal) => {
        concat!(
            "2:\n",
            $insn,
            "\n3:\n",
            ".pushsection xenmsr_extable,\"awR\",@progbits\n",
            ".balign 4\n",
            ".long 2b - .\n",
            ".long 3b - .\n",
            ".long {data}\n",
            ".popsection\n",
        )
    };
}

/// Executes a real RDMSR of `msr`; a fault gives `Err`.
///
/// # Safety
///
/// As for [`crate::site::rdmsr`]: reading `msr` must not break memory safety.
#[inline(always)]
pub unsafe fn rdmsr_safe(msr: u32) -> Result<u64, MsrError> {
    let (lo, hi): (u32, u32);
    let err: u64;
    // SAFETY: RDMSR writes only eax and edx; on a fault the extable entry (READ_SAFE, error
    // register rsi) zeroes them, puts the error code in rsi, and resumes at `3:`, which is
    // inside this block. No stack use, so `nostack` holds; flags are not touched.
    unsafe {
        asm!(
            native_template!("rdmsr"),
            data = const Data::site(Kind::ReadSafe, 0).bits(),
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            inout("rsi") 0u64 => err,
            options(att_syntax, nostack, preserves_flags),
        );
    }
    result_of(err, (hi as u64) << 32 | lo as u64)
}

/// Executes a real WRMSR of `value` to `msr`; a fault gives `Err`.
///
/// # Safety
///
/// As for [`crate::site::wrmsr`]: the write must not break memory safety.
#[inline(always)]
pub unsafe fn wrmsr_safe(msr: u32, value: u64) -> Result<(), MsrError> {
    let err: u64;
    // SAFETY: WRMSR writes no register; on a fault the WRITE_SAFE entry puts the error code
    // in rsi and resumes at `3:` inside this block. No stack use; flags untouched.
    unsafe {
        asm!(
            native_template!("wrmsr"),
            data = const Data::site(Kind::WriteSafe, 0).bits(),
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            inout("rsi") 0u64 => err,
            options(att_syntax, nostack, preserves_flags),
        );
    }
    result_of(err, 0).map(drop)
}

/// Executes a real RDPMC of `counter`; a fault gives `Err`.
///
/// # Safety
///
/// As for [`crate::site::rdpmc`].
#[inline(always)]
pub unsafe fn rdpmc_safe(counter: u32) -> Result<u64, MsrError> {
    let (lo, hi): (u32, u32);
    let err: u64;
    // SAFETY: RDPMC writes only eax and edx; on a fault the RDPMC_SAFE entry zeroes them,
    // puts the error code in rsi, and resumes at `3:` inside this block.
    unsafe {
        asm!(
            native_template!("rdpmc"),
            data = const Data::site(Kind::RdpmcSafe, 0).bits(),
            in("ecx") counter,
            out("eax") lo,
            out("edx") hi,
            inout("rsi") 0u64 => err,
            options(att_syntax, nostack, preserves_flags),
        );
    }
    result_of(err, (hi as u64) << 32 | lo as u64)
}
