//! CPUID as a Xen PV guest must ask it.
//!
//! A PV guest's plain `cpuid` is not intercepted (unless CPUID faulting is on), so it sees
//! the host's leaves, not the domain's policy. Xen's *forced emulation prefix*, `ud2`
//! followed by the bytes `"xen"`, makes Xen emulate the `cpuid` that follows with the
//! domain's policy (Linux's `xen_cpuid` uses it). That is the view the vPMU must size
//! itself by: Xen, for example, reports an empty leaf 0xA to a PV guest whose vPMU is off.

use core::arch::asm;

/// `cpuid(leaf, subleaf)` through Xen's forced-emulation prefix: `[eax, ebx, ecx, edx]`
/// of the domain's CPUID policy.
///
/// Only meaningful in a Xen PV guest (Xen handles the prefix for every PV domain):
/// anywhere else the prefix's `ud2` raises `#UD`, which the kernel's `#UD` handler sees
/// like any other undefined instruction.
pub fn xen_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: in a PV guest Xen recognises `ud2; .ascii "xen"; cpuid` and emulates the
    // `cpuid`; elsewhere the `ud2` traps, which is a fault, not undefined behaviour. `rbx`
    // is reserved by LLVM, so it is saved in a scratch register around the instruction.
    // No memory is touched and the stack is not used.
    unsafe {
        asm!(
            "mov {saved_rbx:r}, rbx",
            ".byte 0x0f, 0x0b, 0x78, 0x65, 0x6e",
            "cpuid",
            "xchg {saved_rbx:r}, rbx",
            saved_rbx = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, nomem, preserves_flags),
        );
    }
    [eax, ebx, ecx, edx]
}
