//! Call-site emitters: the MSR accessors kernel code calls.
//!
//! Every call of one of these functions becomes, inline in the caller:
//!
//! - a patchable region starting at a local label, initially `call <stub>` (exactly
//!   [`CALL_LEN`] bytes, checked by the assembler). For the register-contract emitters
//!   (`rdmsr`, `wrmsr`, ...) the call is the whole region ([`SITE_LEN`] bytes: the largest
//!   native variant is 5 bytes). For the constant-index emitters (`rdmsr_const`,
//!   `wrmsr_ns_const`, ...) the region is [`IMM_SITE_LEN`] bytes, the length of the
//!   immediate forms, and the call is preceded by four CS prefixes ([`IMM_CALL_PREFIX`]),
//!   so that it is one instruction as long as the region; the assembler checks both
//!   lengths. Every variant of a site is one instruction of the region's length, so all of
//!   them share the instruction boundaries (start and end) a stopped vCPU can resume at;
//! - its own extable entry (a typed kind) covering the region's first byte, with the fixup
//!   at the end of the region; the `_safe` kinds name `rsi` as the error register;
//! - a patch-site record.
//!
//! The register contract at the site is the native instruction's (`ecx`, `edx:eax`; for
//! the constant-index sites see [`rdmsr_const`] and [`wrmsr_ns_const`]), so the stub, the
//! native instruction, and a native fault all look the same to the caller: a failure from
//! any of them ends at the site's own fixup. Sites never use `nostack` (they `call`), so
//! the compiler keeps `rsp` 16-byte aligned at the region, and they never use
//! `preserves_flags` (stubs clobber flags).
//!
//! Why these are `unsafe`: writing an MSR can change paging, segment bases, syscall entry
//! points, or anything else the CPU does, and reading some MSRs has side effects, so an
//! access can break memory safety in ways no type can express.

use core::arch::asm;

use crate::MsrError;
use crate::error::result_of;
use crate::extable::{Data, Kind, flags};
use crate::patch::{FLAG_SAFE, PatchOp};
use crate::stubs;
pub use crate::{CALL_LEN, IMM_CALL_PREFIX, IMM_SITE_LEN, SITE_LEN};

// A register-contract site is exactly its call: the region ends where the call ends, so
// the assembler's length check of the call is also the check of the region. (`.skip`
// padding would put the end label in another fragment, where the assembler can no longer
// evaluate the check; the constant-index sites therefore write their call's CS prefixes
// as explicit `.byte`s.)
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

macro_rules! read_site {
    ($(#[$doc:meta])* $name:ident($arg:ident), $stub:path, $op:expr, $kind:expr, warn) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name($arg: u32) -> u64 {
            let (lo, hi): (u32, u32);
            // SAFETY: the site calls the stub, which preserves every register except eax
            // and edx (declared as outputs) and flags, keeps rsp balanced, and on failure
            // ends at the site's own fixup label (`3:`) through the extable; the caller
            // vouches for the access.
            unsafe {
                asm!(
                    site_template!(),
                    stub = sym $stub,
                    call_len = const CALL_LEN,
                    site_len = const SITE_LEN,
                    data = const Data::site($kind, 0).bits(),
                    op = const $op as u8,
                    pflags = const pflags($kind),
                    imm = const 0,
                    in("ecx") $arg,
                    out("eax") lo,
                    out("edx") hi,
                    options(att_syntax),
                );
            }
            join(lo, hi)
        }
    };
    ($(#[$doc:meta])* $name:ident($arg:ident), $stub:path, $op:expr, $kind:expr, safe) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name($arg: u32) -> Result<u64, MsrError> {
            let (lo, hi): (u32, u32);
            let err: u64;
            // SAFETY: as for the unchecked read; in addition the fixup writes the error
            // code into rsi, which is declared as an in/out operand (0 in, error code out).
            unsafe {
                asm!(
                    site_template!(),
                    stub = sym $stub,
                    call_len = const CALL_LEN,
                    site_len = const SITE_LEN,
                    data = const Data::site($kind, 0).bits(),
                    op = const $op as u8,
                    pflags = const pflags($kind),
                    imm = const 0,
                    in("ecx") $arg,
                    out("eax") lo,
                    out("edx") hi,
                    inout("rsi") 0u64 => err,
                    options(att_syntax),
                );
            }
            result_of(err, join(lo, hi))
        }
    };
}

read_site!(
    /// Reads `msr` (RDMSR). A fault or a failure warns once per kind of failure (through the warn hook)
    /// and gives 0.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// // SAFETY: reading the TSC MSR has no side effects.
    /// let tsc = unsafe { xenmsr_asm::site::rdmsr(0x10) };
    /// ```
    ///
    /// # Safety
    ///
    /// Reading an MSR can have side effects on the CPU state; the caller must know that
    /// reading `msr` here cannot break memory safety.
    rdmsr(msr), stubs::xenmsr_stub_rdmsr, PatchOp::Read, Kind::Read, warn
);

read_site!(
    /// Reads `msr` (RDMSR), reporting a fault or failure as `Err`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use xenmsr_asm::MsrError;
    ///
    /// // SAFETY: reading an MSR that may not exist has no side effects.
    /// match unsafe { xenmsr_asm::site::rdmsr_safe(0x1234_5678) } {
    ///     Ok(value) => println!("{value:#x}"),
    ///     Err(MsrError::Fault { vector }) => println!("no such MSR (#{vector})"),
    ///     Err(other) => println!("failed: {other}"),
    /// }
    /// ```
    ///
    /// # Safety
    ///
    /// As for [`rdmsr`].
    rdmsr_safe(msr), stubs::xenmsr_stub_rdmsr, PatchOp::Read, Kind::ReadSafe, safe
);

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
    /// Writes `value` to `msr` (WRMSR). A fault or a failure warns once per kind of failure (through
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
    /// # Examples
    ///
    /// ```no_run
    /// use xenmsr_asm::MsrError;
    /// use xenmsr_hypercall::Errno;
    ///
    /// // SAFETY: this kernel keeps no state in FS.
    /// let r = unsafe { xenmsr_asm::site::wrmsr_safe(0xc000_0100, 0x8000_0000_0000_0000) };
    /// // On Xen PV a non-canonical base is refused by the set_segment_base hypercall.
    /// assert!(matches!(r, Err(MsrError::Hypercall(Errno::EINVAL)) | Err(MsrError::Fault { .. })));
    /// ```
    ///
    /// # Safety
    ///
    /// As for [`wrmsr`].
    wrmsr_safe, PatchOp::Write, safe
);

write_site!(
    /// Writes `value` to `msr` without serialising where the CPU allows (WRMSRNS when
    /// patched natively; on Xen PV the same stub as [`wrmsr`]). Warns once per kind of failure on
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

read_site!(
    /// Reads performance counter `counter` (RDPMC). A fault or failure warns once per kind of failure
    /// and gives 0.
    ///
    /// # Safety
    ///
    /// RDPMC has no side effects on memory, but on Xen PV the emulation may touch the vPMU
    /// state; the caller must own that state (e.g. run on the vCPU whose PMU it reads).
    rdpmc(counter), stubs::xenmsr_stub_rdpmc, PatchOp::Rdpmc, Kind::Rdpmc, warn
);

read_site!(
    /// Reads performance counter `counter` (RDPMC), reporting a fault or failure as `Err`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use xenmsr_asm::MsrError;
    ///
    /// // SAFETY: this code runs on the vCPU whose PMU it reads.
    /// let cycles = unsafe { xenmsr_asm::site::rdpmc_safe(0) };
    /// // A counter the CPU does not have is an error, never a read of another MSR.
    /// // SAFETY: as above.
    /// let bogus = unsafe { xenmsr_asm::site::rdpmc_safe(0x100) };
    /// assert!(matches!(bogus, Err(MsrError::InvalidCounter) | Err(MsrError::Fault { .. })));
    /// # let _ = cycles;
    /// ```
    ///
    /// # Safety
    ///
    /// As for [`rdpmc`].
    rdpmc_safe(counter), stubs::xenmsr_stub_rdpmc, PatchOp::Rdpmc, Kind::RdpmcSafe, safe
);

/// The text of one constant-index site: the four CS prefixes `pfx0..pfx3` as explicit
/// bytes at `2:`, `call {stub}` at `3:` (exactly `call_len` bytes), and the end of the
/// region at `4:` (exactly `site_len` bytes from `2:`): one instruction, whose return
/// address is the end of the region. Operands: as [`site_template`] plus `pfx0`..`pfx3`.
macro_rules! imm_site_template {
    () => {
        concat!(
            "2:\n",
            ".byte {pfx0}, {pfx1}, {pfx2}, {pfx3}\n",
            "3:\n",
            "call {stub}\n",
            "4:\n",
            ".if (4b - 3b) != {call_len}\n",
            ".error \"xenmsr: a site's call is not CALL_LEN bytes\"\n",
            ".endif\n",
            ".if (4b - 2b) != {site_len}\n",
            ".error \"xenmsr: a constant-index site is not IMM_SITE_LEN bytes\"\n",
            ".endif\n",
            ".pushsection xenmsr_extable,\"awR\",@progbits\n",
            ".balign 4\n",
            ".long 2b - .\n",
            ".long 4b - .\n",
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

/// The `asm!` of one constant-index site: [`imm_site_template`] with the operands every
/// such site shares (`ecx` = the constant index), then the site's own outputs.
macro_rules! imm_site_asm {
    ($msr:ident, $stub:path, $kind:expr, $flags:expr, $op:expr; $($outputs:tt)*) => {
        asm!(
            imm_site_template!(),
            stub = sym $stub,
            call_len = const CALL_LEN,
            site_len = const IMM_SITE_LEN,
            pfx0 = const IMM_CALL_PREFIX[0],
            pfx1 = const IMM_CALL_PREFIX[1],
            pfx2 = const IMM_CALL_PREFIX[2],
            pfx3 = const IMM_CALL_PREFIX[3],
            data = const Data::site($kind, $flags).bits(),
            op = const $op as u8,
            pflags = const pflags($kind),
            imm = const $msr,
            in("ecx") $msr,
            $($outputs)*
            options(att_syntax),
        )
    };
}

/// Reads the constant MSR `MSR` into a 64-bit value (RDMSR; the immediate form
/// `rdmsr $MSR, %rax` when patched natively on a CPU that has it). A fault or a failure
/// warns once per kind of failure (through the warn hook) and gives 0.
///
/// The site's contract: `ecx` = `MSR` (loaded by the compiler, so every variant and the
/// warn hook see the index) and `rdx` = 0 in; out, the value is `rax | rdx << 32`, which
/// the code after the site computes: the immediate form and `rdfsbase` leave the whole
/// value in `rax` and `rdx` at 0, the stub the whole value in `rax` and its high half in
/// `rdx`, and the legacy RDMSR `edx:eax`. (The fold cannot be part of the site: every
/// variant must be a single instruction, see [`IMM_SITE_LEN`].) The site is
/// [`IMM_SITE_LEN`] bytes: `cs cs cs cs call xenmsr_stub_rdmsr_rax` until patched; its
/// extable entry carries `RAX_CONTRACT` (a failure zeroes `rax` and `rdx`), and its
/// patch-site record has op `ReadImm` with `imm` = `MSR`.
///
/// # Safety
///
/// As for [`rdmsr`]: reading `MSR` here must not break memory safety.
#[inline(always)]
pub unsafe fn rdmsr_const<const MSR: u32>() -> u64 {
    let (value, high): (u64, u64);
    // SAFETY: the site calls the rax read stub, which preserves every register except rax
    // and rdx (declared as outputs) and flags, keeps rsp balanced, and on failure ends at
    // the site's own fixup label (`4:`) through the extable; every native variant the
    // patcher may write writes only rax and rdx and faults at the site start. The caller
    // vouches for the access.
    unsafe {
        imm_site_asm!(
            MSR, stubs::xenmsr_stub_rdmsr_rax, Kind::Read, flags::RAX_CONTRACT, PatchOp::ReadImm;
            out("rax") value,
            inout("rdx") 0u64 => high,
        );
    }
    value | high << 32
}

/// Reads the constant MSR `MSR`, reporting a fault or failure as `Err`. The site is that
/// of [`rdmsr_const`] with a checked extable entry (error register `rsi`).
///
/// # Examples
///
/// ```no_run
/// const MSR_EFER: u32 = 0xc000_0080;
/// // SAFETY: reading EFER has no side effects.
/// let efer = unsafe { xenmsr_asm::site::rdmsr_const_safe::<MSR_EFER>() }?;
/// assert!(efer & (1 << 10) != 0, "long mode active");
/// # Ok::<(), xenmsr_asm::MsrError>(())
/// ```
///
/// # Safety
///
/// As for [`rdmsr_const`].
#[inline(always)]
pub unsafe fn rdmsr_const_safe<const MSR: u32>() -> Result<u64, MsrError> {
    let (value, high): (u64, u64);
    let err: u64;
    // SAFETY: as in `rdmsr_const`; in addition the fixup writes the error code into rsi,
    // which is declared as an in/out operand (0 in, error code out).
    unsafe {
        imm_site_asm!(
            MSR, stubs::xenmsr_stub_rdmsr_rax, Kind::ReadSafe, flags::RAX_CONTRACT, PatchOp::ReadImm;
            out("rax") value,
            inout("rdx") 0u64 => high,
            inout("rsi") 0u64 => err,
        );
    }
    result_of(err, value | high << 32)
}

/// Writes `value` to the constant MSR `MSR` without serialising where the CPU allows
/// (the immediate form `wrmsrns %rax, $MSR`, else WRMSRNS, else WRMSR when patched
/// natively; on Xen PV the write stub). A fault or a failure warns once per kind of failure and is
/// otherwise ignored.
///
/// The site's contract: `ecx` = `MSR`, `rax` = the whole value and `edx` = its high half,
/// so every variant finds its operands (the legacy instructions and the stub take
/// `edx:eax`, the immediate form takes `rax`); nothing is written. The site is
/// [`IMM_SITE_LEN`] bytes: `cs cs cs cs call xenmsr_stub_wrmsr` until patched; its
/// patch-site record has op `WriteImm` with `imm` = `MSR`.
///
/// # Safety
///
/// As for [`wrmsr_ns`]: the write must not break memory safety, and the caller must not
/// rely on it serialising the instruction stream.
#[inline(always)]
pub unsafe fn wrmsr_ns_const<const MSR: u32>(value: u64) {
    // SAFETY: the site calls the write stub, which preserves every register and rsp (flags
    // are clobbered) and on failure ends at the site's own fixup label (`4:`) through the
    // extable; every native variant writes no register and faults at the site start. The
    // caller vouches for the access.
    unsafe {
        imm_site_asm!(
            MSR, stubs::xenmsr_stub_wrmsr, Kind::Write, 0, PatchOp::WriteImm;
            in("rax") value,
            in("edx") (value >> 32) as u32,
        );
    }
}

/// Non-serialising write of `value` to the constant MSR `MSR`, reporting a fault or
/// failure as `Err`. The site is that of [`wrmsr_ns_const`] with a checked extable entry
/// (error register `rsi`).
///
/// On Xen PV, once the shim's `init` has patched the image, a site of `FS_BASE`,
/// `GS_BASE` or `KERNEL_GS_BASE` calls a stub that makes the `set_segment_base` hypercall
/// directly: the fastest way to switch a thread's TLS base.
///
/// # Examples
///
/// ```no_run
/// const MSR_FS_BASE: u32 = 0xc000_0100;
/// let next_tls: u64 = 0x7f00_0000_1000;
/// // SAFETY: no code of the current thread uses FS-relative data during the switch.
/// unsafe { xenmsr_asm::site::wrmsr_ns_const_safe::<MSR_FS_BASE>(next_tls) }?;
/// # Ok::<(), xenmsr_asm::MsrError>(())
/// ```
///
/// # Safety
///
/// As for [`wrmsr_ns_const`].
#[inline(always)]
pub unsafe fn wrmsr_ns_const_safe<const MSR: u32>(value: u64) -> Result<(), MsrError> {
    let err: u64;
    // SAFETY: as in `wrmsr_ns_const`; the fixup writes the error code into rsi, declared
    // as an in/out operand.
    unsafe {
        imm_site_asm!(
            MSR, stubs::xenmsr_stub_wrmsr, Kind::WriteSafe, 0, PatchOp::WriteImm;
            in("rax") value,
            in("edx") (value >> 32) as u32,
            inout("rsi") 0u64 => err,
        );
    }
    result_of(err, 0).map(drop)
}
