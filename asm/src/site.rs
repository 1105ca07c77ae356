//! Call-site emitters: the MSR accessors kernel code calls.
//!
//! Every call of one of these functions becomes, inline in the caller:
//!
//! - a patchable region of [`SITE_LEN`] bytes starting at a local label,
//!   initially `call <stub>` (exactly [`CALL_LEN`] bytes, checked by the
//!   assembler, which is also the whole region: the largest native variant is 5 bytes);
//! - its own extable entry (a typed kind) covering the region's first byte, with the fixup
//!   at the end of the region; the `_safe` kinds name `rsi` as the error register;
//! - a patch-site record.
//!
//! The register contract at the site is the native instruction's (`ecx`, `edx:eax`), so the
//! stub, the native instruction, and a native fault all look the same to the caller: a
//! failure from any of them ends at the site's own fixup. Sites never use `nostack` (they
//! `call`), so the compiler keeps `rsp` 16-byte aligned at the region, and they never use
//! `preserves_flags` (stubs clobber flags).
//!
//! Why these are `unsafe`: writing an MSR can change paging, segment bases, syscall entry
//! points, or anything else the CPU does, and reading some MSRs has side effects, so an
//! access can break memory safety in ways no type can express.

use core::arch::asm;

use crate::MsrError;
use crate::error::result_of;
use crate::extable::{Data, Kind};
use crate::patch::{FLAG_SAFE, PatchOp};
use crate::stubs;
pub use crate::{CALL_LEN, SITE_LEN};

// A register-contract site is exactly its call: the region ends where the call ends, so
// the assembler's length check of the call is also the check of the region. (`.skip`
// padding would put the end label in another fragment, where the assembler can no longer
// evaluate the check; larger sites will pad with a fixed-length `nop` instead.)
const _: () = assert!(SITE_LEN == CALL_LEN);

/// The text of one register-contract site. Operands: `stub` (sym), `call_len`, `site_len`,
/// `data` (extable data word), `op`, `pflags`, `imm` (patch-site record).
macro_rules! site_template {
    () => {
        concat!(
            "2:\n",
            "call {stub}\n",
            "3:\n",
            ".if (3b - 2b) != {call_len}\n",
            ".error \"xenmsr: a site's call is not CALL_LEN bytes\"\n",
            ".endif\n",
            ".pushsection xenmsr_extable,\"awR\",@progbits\n",
            ".balign 4\n",
            ".long 2b - .\n",
            ".long 3b - .\n",
            ".long {data}\n",
            ".popsection\n",
            ".pushsection xenmsr_patch_sites,\"aR\",@progbits\n",
            ".balign 4\n",
            ".long 2b - .\n",
            ".byte {site_len}, {op}\n",
            ".short {pflags}\n",
            ".long {imm}\n",
            ".popsection\n",
        )
    };
}

const fn pflags(kind: Kind) -> u16 {
    if kind.is_safe() { FLAG_SAFE } else { 0 }
}

fn join(lo: u32, hi: u32) -> u64 {
    (hi as u64) << 32 | lo as u64
}

/// Reads `msr` (RDMSR). A fault or a failure warns once per site (through the warn hook)
/// and gives 0.
///
/// # Safety
///
/// Reading an MSR can have side effects on the CPU state; the caller must know that
/// reading `msr` here cannot break memory safety.
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the site calls the read stub, which preserves every register except eax and
    // edx (declared as outputs) and flags, keeps rsp balanced, and on failure ends at the
    // site's own fixup label (`3:`) through the extable; the caller vouches for the access.
    unsafe {
        asm!(
            site_template!(),
            stub = sym stubs::xenmsr_stub_rdmsr,
            call_len = const CALL_LEN,
            site_len = const SITE_LEN,
            data = const Data::site(Kind::Read, 0).bits(),
            op = const PatchOp::Read as u8,
            pflags = const pflags(Kind::Read),
            imm = const 0,
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(att_syntax),
        );
    }
    join(lo, hi)
}

/// Reads `msr` (RDMSR), reporting a fault or failure as `Err`.
///
/// # Safety
///
/// As for [`rdmsr`].
#[inline(always)]
pub unsafe fn rdmsr_safe(msr: u32) -> Result<u64, MsrError> {
    let (lo, hi): (u32, u32);
    let err: u64;
    // SAFETY: as in `rdmsr`; in addition the fixup writes the error code into rsi, which is
    // declared as an in/out operand (0 in, error code out).
    unsafe {
        asm!(
            site_template!(),
            stub = sym stubs::xenmsr_stub_rdmsr,
            call_len = const CALL_LEN,
            site_len = const SITE_LEN,
            data = const Data::site(Kind::ReadSafe, 0).bits(),
            op = const PatchOp::Read as u8,
            pflags = const pflags(Kind::ReadSafe),
            imm = const 0,
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            inout("rsi") 0u64 => err,
            options(att_syntax),
        );
    }
    result_of(err, join(lo, hi))
}

macro_rules! write_site {
    ($(#[$doc:meta])* $name:ident, $op:expr, warn) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name(msr: u32, value: u64) {
            // SAFETY: the site calls the write stub, which preserves every register and rsp
            // (flags are clobbered) and on failure ends at the site's own fixup label
            // through the extable; the caller vouches for the access.
            unsafe {
                asm!(
                    site_template!(),
                    stub = sym stubs::xenmsr_stub_wrmsr,
                    call_len = const CALL_LEN,
                    site_len = const SITE_LEN,
                    data = const Data::site(Kind::Write, 0).bits(),
                    op = const $op as u8,
                    pflags = const pflags(Kind::Write),
                    imm = const 0,
                    in("ecx") msr,
                    in("eax") value as u32,
                    in("edx") (value >> 32) as u32,
                    options(att_syntax),
                );
            }
        }
    };
    ($(#[$doc:meta])* $name:ident, $op:expr, safe) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name(msr: u32, value: u64) -> Result<(), MsrError> {
            let err: u64;
            // SAFETY: as for the unchecked write; the fixup writes the error code into rsi,
            // declared as an in/out operand.
            unsafe {
                asm!(
                    site_template!(),
                    stub = sym stubs::xenmsr_stub_wrmsr,
                    call_len = const CALL_LEN,
                    site_len = const SITE_LEN,
                    data = const Data::site(Kind::WriteSafe, 0).bits(),
                    op = const $op as u8,
                    pflags = const pflags(Kind::WriteSafe),
                    imm = const 0,
                    in("ecx") msr,
                    in("eax") value as u32,
                    in("edx") (value >> 32) as u32,
                    inout("rsi") 0u64 => err,
                    options(att_syntax),
                );
            }
            result_of(err, 0).map(drop)
        }
    };
}

write_site!(
    /// Writes `value` to `msr` (WRMSR). A fault or a failure warns once per site (through
    /// the warn hook) and is otherwise ignored.
    ///
    /// # Safety
    ///
    /// Writing an MSR can change paging, segmentation, system-call entry and other CPU
    /// state; the caller must know that this write cannot break memory safety.
    wrmsr, PatchOp::Write, warn
);

write_site!(
    /// Writes `value` to `msr` (WRMSR), reporting a fault or failure as `Err`.
    ///
    /// # Safety
    ///
    /// As for [`wrmsr`].
    wrmsr_safe, PatchOp::Write, safe
);

write_site!(
    /// Writes `value` to `msr` without serialising where the CPU allows (WRMSRNS when
    /// patched natively; on Xen PV the same stub as [`wrmsr`]). Warns once per site on
    /// failure.
    ///
    /// # Safety
    ///
    /// As for [`wrmsr`]; in addition the caller must not rely on the write serialising
    /// the instruction stream.
    wrmsr_ns, PatchOp::WriteNs, warn
);

write_site!(
    /// Non-serialising write of `value` to `msr`, reporting a fault or failure as `Err`.
    ///
    /// # Safety
    ///
    /// As for [`wrmsr_ns`].
    wrmsr_ns_safe, PatchOp::WriteNs, safe
);

/// Reads performance counter `counter` (RDPMC). A fault or failure warns once per site
/// and gives 0.
///
/// # Safety
///
/// RDPMC has no side effects on memory, but on Xen PV the emulation may touch the vPMU
/// state; the caller must own that state (e.g. run on the vCPU whose PMU it reads).
#[inline(always)]
pub unsafe fn rdpmc(counter: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: as in `rdmsr`, with the RDPMC stub.
    unsafe {
        asm!(
            site_template!(),
            stub = sym stubs::xenmsr_stub_rdpmc,
            call_len = const CALL_LEN,
            site_len = const SITE_LEN,
            data = const Data::site(Kind::Rdpmc, 0).bits(),
            op = const PatchOp::Rdpmc as u8,
            pflags = const pflags(Kind::Rdpmc),
            imm = const 0,
            in("ecx") counter,
            out("eax") lo,
            out("edx") hi,
            options(att_syntax),
        );
    }
    join(lo, hi)
}

/// Reads performance counter `counter` (RDPMC), reporting a fault or failure as `Err`.
///
/// # Safety
///
/// As for [`rdpmc`].
#[inline(always)]
pub unsafe fn rdpmc_safe(counter: u32) -> Result<u64, MsrError> {
    let (lo, hi): (u32, u32);
    let err: u64;
    // SAFETY: as in `rdmsr_safe`, with the RDPMC stub.
    unsafe {
        asm!(
            site_template!(),
            stub = sym stubs::xenmsr_stub_rdpmc,
            call_len = const CALL_LEN,
            site_len = const SITE_LEN,
            data = const Data::site(Kind::RdpmcSafe, 0).bits(),
            op = const PatchOp::Rdpmc as u8,
            pflags = const pflags(Kind::RdpmcSafe),
            imm = const 0,
            in("ecx") counter,
            out("eax") lo,
            out("edx") hi,
            inout("rsi") 0u64 => err,
            options(att_syntax),
        );
    }
    result_of(err, join(lo, hi))
}
