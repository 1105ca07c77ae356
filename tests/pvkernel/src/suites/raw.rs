//! Raw instructions, each covered by a kernel exception-table entry, so a test can see
//! what Xen does with the bare instruction (the oracle the library is compared against).
//!
//! Each helper returns `Err(exinfo)` (see [`crate::fixup::exinfo`]) if the instruction
//! faulted: the fixup resumes past the `mov {ok}, 1`, so `ok` stays 0.

use core::arch::asm;

use crate::kx_entry;

/// `rdmsr` of `msr`.
pub fn rdmsr(msr: u32) -> Result<u64, u64> {
    let (lo, hi, ok): (u32, u32, u64);
    // SAFETY: a faulting `rdmsr` is recovered by the kernel table (entry 2b -> 3b), which
    // sets rax and skips `mov ok, 1`; the instruction itself touches only eax/edx. The
    // PV kernel runs at CPL3, so Xen emulates or refuses the read; it cannot harm us.
    unsafe {
        asm!(
            "2: rdmsr",
            "mov {ok}, 1",
            "3:",
            kx_entry!(),
            ok = inout(reg) 0u64 => ok,
            in("ecx") msr,
            inout("eax") 0u32 => lo,
            out("edx") hi,
            options(nostack),
        );
    }
    if ok == 1 {
        Ok(u64::from(hi) << 32 | u64::from(lo))
    } else {
        Err(u64::from(lo))
    }
}

/// `wrmsr` of `value` to `msr`.
///
/// # Safety
///
/// Writing the MSR must not break the kernel (Xen only lets a PV kernel change harmless
/// state, but e.g. FS/GS bases are live).
pub unsafe fn wrmsr(msr: u32, value: u64) -> Result<(), u64> {
    let (ok, rax): (u64, u64);
    // SAFETY: as for `rdmsr`; the caller vouches for the write's effect.
    unsafe {
        asm!(
            "2: wrmsr",
            "mov {ok}, 1",
            "3:",
            kx_entry!(),
            ok = inout(reg) 0u64 => ok,
            in("ecx") msr,
            inout("rax") value & 0xffff_ffff => rax,
            in("edx") (value >> 32) as u32,
            options(nostack),
        );
    }
    if ok == 1 { Ok(()) } else { Err(rax) }
}

/// `rdpmc` of `counter`.
pub fn rdpmc(counter: u32) -> Result<u64, u64> {
    let (lo, hi, ok): (u32, u32, u64);
    // SAFETY: as for `rdmsr`.
    unsafe {
        asm!(
            "2: rdpmc",
            "mov {ok}, 1",
            "3:",
            kx_entry!(),
            ok = inout(reg) 0u64 => ok,
            in("ecx") counter,
            inout("eax") 0u32 => lo,
            out("edx") hi,
            options(nostack, nomem),
        );
    }
    if ok == 1 {
        Ok(u64::from(hi) << 32 | u64::from(lo))
    } else {
        Err(u64::from(lo))
    }
}

/// A 64-bit load from `addr`, which may be unmapped or non-canonical.
pub fn probe_read(addr: u64) -> Result<u64, u64> {
    let (value, ok, info): (u64, u64, u64);
    // SAFETY: a faulting load is recovered by the kernel table; a load from any mapped
    // address of this test kernel has no side effect.
    unsafe {
        asm!(
            "2: mov {val}, qword ptr [{addr}]",
            "mov {ok}, 1",
            "3:",
            kx_entry!(),
            addr = in(reg) addr,
            val = out(reg) value,
            ok = inout(reg) 0u64 => ok,
            inout("rax") 0u64 => info,
            options(nostack, readonly),
        );
    }
    if ok == 1 { Ok(value) } else { Err(info) }
}

/// `cpuid` leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// `rdfsbase` (`gs`: `rdgsbase`): `Err(exinfo)` if it faulted (#UD without CR4.FSGSBASE).
pub fn rdsegbase(gs: bool) -> Result<u64, u64> {
    let (value, ok, info): (u64, u64, u64);
    if gs {
        // SAFETY: a faulting instruction is recovered by the kernel table; the read has
        // no side effect.
        unsafe {
            asm!(
                "2: rdgsbase {val}",
                "mov {ok}, 1",
                "3:",
                kx_entry!(),
                val = out(reg) value,
                ok = inout(reg) 0u64 => ok,
                inout("rax") 0u64 => info,
                options(nostack, nomem),
            )
        };
    } else {
        // SAFETY: as above.
        unsafe {
            asm!(
                "2: rdfsbase {val}",
                "mov {ok}, 1",
                "3:",
                kx_entry!(),
                val = out(reg) value,
                ok = inout(reg) 0u64 => ok,
                inout("rax") 0u64 => info,
                options(nostack, nomem),
            )
        };
    }
    if ok == 1 { Ok(value) } else { Err(info) }
}

/// The 8 bytes at `%fs:0` (or `%gs:0`): a load through the segment base, as code that keeps
/// per-CPU data or thread-local storage behind it would make.
pub fn load_at_segment_base(gs: bool) -> u64 {
    let value: u64;
    if gs {
        // SAFETY: reads 8 bytes at GS base + 0, which the caller pointed at a word of its
        // own (a table made by `per_vcpu_words`).
        unsafe {
            asm!("mov {}, qword ptr gs:[0]", out(reg) value, options(nostack, readonly, preserves_flags))
        };
    } else {
        // SAFETY: as above, through FS.
        unsafe {
            asm!("mov {}, qword ptr fs:[0]", out(reg) value, options(nostack, readonly, preserves_flags))
        };
    }
    value
}

/// One word per vCPU and base (FS, GS) for the bases to point at: each word holds a value
/// only that vCPU expects (`tag` keeps the tables of different suites apart).
pub const fn per_vcpu_words(tag: u64) -> [[u64; 2]; crate::smp::MAX_VCPUS] {
    let mut t = [[0; 2]; crate::smp::MAX_VCPUS];
    let mut v = 0;
    while v < crate::smp::MAX_VCPUS {
        t[v] = [
            0xf5f5_0000_0000_0000 | tag | v as u64,
            0x6565_0000_0000_0000 | tag | v as u64,
        ];
        v += 1;
    }
    t
}
