//! Guarded instructions: a kernel's own instruction that may fault, with the fault
//! returned as a [`GuardedFault`] instead of taken as a crash.
//!
//! [`guarded_asm!`](crate::guarded_asm) emits one instruction of the kernel's choosing
//! with a [`Kind::Guarded`](crate::extable::Kind::Guarded) entry in the library's
//! exception table next to it, as the library's own sites have. When the instruction raises an exception, the kernel's
//! exception handler calls [`fixup_exception`](crate::fixup::fixup_exception) (the PV
//! kit's trap entry does that for every vector it may), which finds the entry by the
//! faulting `rip`, writes the code of `Fault { vector }` into the macro's error register
//! ([`ERROR_REG`], `r11`) and resumes right after the instruction. The macro turns that
//! register into `Result<(), GuardedFault>`.
//!
//! ```no_run
//! use xenmsr_asm::guarded::GuardedFault;
//!
//! let (lo, hi): (u32, u32);
//! // SAFETY: reading this MSR has no side effects; a #GP comes back as Err.
//! let read = unsafe {
//!     xenmsr_asm::guarded_asm!(
//!         "rdmsr",
//!         in("ecx") 0x1234_5678u32,
//!         out("eax") lo,
//!         out("edx") hi,
//!         options(nostack, preserves_flags),
//!     )
//! };
//! match read {
//!     Ok(()) => { let _value = u64::from(hi) << 32 | u64::from(lo); }
//!     Err(GuardedFault { vector }) => assert_eq!(vector, 13),
//! }
//! ```
//!
//! The ready-made helpers ([`rdmsr`], [`wrmsr`], [`rdfsbase`], [`rdgsbase`],
//! [`read_u64`]) are that macro around one instruction each.
//!
//! # Which exceptions
//!
//! Every *fault*, after which it makes sense to continue elsewhere:
//! [`is_resumable_fault`](crate::fixup::is_resumable_fault) lists them (`#DE`, `#UD`,
//! `#NM`, `#TS`, `#NP`, `#SS`, `#GP`, `#PF`, `#MF`, `#AC`, `#XM`, `#BR`). Not NMI, `#DB`,
//! `#BP`, `#OF`, `#DF` or `#MC`: the fixup refuses them, and the kernel's handler sees
//! them as if the instruction were not guarded. The kernel's handler has to offer the
//! fixup these vectors: the PV kit's trap entry does (before the kernel's handler, unless
//! that asked to see every trap first), and a kernel with entry code of its own calls
//! `fixup_exception` from each of those handlers. On the host (the tests), Linux delivers
//! them as signals: `#UD` as SIGILL, `#GP` and `#PF` as SIGSEGV, `#DE` as SIGFPE, with
//! the vector in the signal context's `trapno`.
//!
//! # The one-instruction rule
//!
//! The entry covers exactly one address, the instruction's own, and resumes at the end
//! of it. So the template must be a single instruction: a fault in a second one would
//! find no entry (and crash), and a fault in the first would skip the second. The macro
//! refuses, at compile time, a template with a newline or a `;` in it. A faulting
//! instruction leaves the machine as it was before it (the definition of a fault), so
//! after `Err` everything is as if it had not run. The exception: a `rep`-prefixed string
//! instruction that faults part-way has done the iterations before the fault, with
//! `rcx`, `rsi` and `rdi` advanced to match.
//!
//! After `Err`, the instruction's outputs hold unspecified values (whatever their
//! registers held when it faulted; for an `inout`, usually its input).

use crate::MsrError;
use crate::extable::{Data, reg};

/// The register a guarded instruction's error code arrives in: `r11` (hardware number
/// 11). The template's own operands cannot use it (the compiler refuses a second operand
/// on one explicit register). `r11` is rarely an instruction's fixed operand (only
/// `syscall`/`sysret`, which no kernel guards), unlike `rsi`, which the library's own
/// sites use but `rep movs` needs.
pub const ERROR_REG: u8 = reg::R8 + 3;

/// The data word of every guarded entry: [`Kind::Guarded`](crate::extable::Kind::Guarded),
/// error register [`ERROR_REG`].
pub const ENTRY_DATA: u32 = Data::guarded(ERROR_REG).bits();

/// The text of [`ENTRY_DATA`], for the macro's `.long` (a `const` operand would have to
/// be named, and a named operand may not follow the caller's explicit-register operands).
#[doc(hidden)]
#[macro_export]
macro_rules! __xenmsr_guarded_entry_data {
    () => {
        "2824"
    };
}

/// Parses a decimal literal at compile time (for the check of the macro's text).
const fn parse_decimal(text: &str) -> u32 {
    let bytes = text.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "not a decimal number");
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

// The macro's `.long` is the entry data the fixup decodes, and the register it names in
// `inout("r11")` is `ERROR_REG`.
const _: () = assert!(parse_decimal(crate::__xenmsr_guarded_entry_data!()) == ENTRY_DATA);
const _: () = assert!(ERROR_REG == 11);
const _: () = assert!(Data(ENTRY_DATA).reg() == ERROR_REG);
const _: () = assert!(matches!(
    Data(ENTRY_DATA).kind(),
    Some(crate::extable::Kind::Guarded)
));
const _: () = assert!(Data(ENTRY_DATA).flags() == 0 && Data(ENTRY_DATA).imm() == 0);

/// Fails the build when `template` is not one instruction as far as text can tell (a
/// newline or a `;` separates two). [`guarded_asm!`](crate::guarded_asm) calls it in a
/// `const`.
#[doc(hidden)]
pub const fn assert_one_instruction(template: &str) {
    let bytes = template.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i] != b'\n' && bytes[i] != b';',
            "guarded_asm!: the template must be one instruction (no newline, no ';')"
        );
        i += 1;
    }
}

/// An exception a guarded instruction raised, which the fixup turned into this error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardedFault {
    /// The exception vector (0 `#DE`, 6 `#UD`, 13 `#GP`, 14 `#PF`, ...).
    pub vector: u8,
}

impl GuardedFault {
    /// Decodes the error register after a guarded instruction: 0 means it completed; the
    /// fixup writes the code of `MsrError::Fault { vector }` (never 0).
    #[doc(hidden)]
    pub const fn result_of(code: u64) -> Result<(), GuardedFault> {
        match MsrError::from_code(code) {
            None if code == 0 => Ok(()),
            Some(MsrError::Fault { vector }) => Err(GuardedFault { vector }),
            // Nothing else writes the register: the macro owns it and the fixup writes
            // only fault codes. Report it as the one exception that can write anything.
            _ => Err(GuardedFault { vector: u8::MAX }),
        }
    }

    /// The mnemonic of the vector (`"#GP"`), or `"?"` for one without.
    pub const fn mnemonic(self) -> &'static str {
        match self.vector {
            0 => "#DE",
            1 => "#DB",
            2 => "NMI",
            3 => "#BP",
            4 => "#OF",
            5 => "#BR",
            6 => "#UD",
            7 => "#NM",
            8 => "#DF",
            10 => "#TS",
            11 => "#NP",
            12 => "#SS",
            13 => "#GP",
            14 => "#PF",
            16 => "#MF",
            17 => "#AC",
            18 => "#MC",
            19 => "#XM",
            _ => "?",
        }
    }
}

impl core::fmt::Display for GuardedFault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "the instruction raised {} (vector {})",
            self.mnemonic(),
            self.vector
        )
    }
}

impl From<GuardedFault> for MsrError {
    fn from(fault: GuardedFault) -> MsrError {
        MsrError::Fault {
            vector: fault.vector,
        }
    }
}

/// Executes one instruction of the caller's choosing with an exception-table entry, so
/// that a fault comes back as `Err(GuardedFault { vector })` instead of reaching the
/// kernel's exception handler as a crash. Evaluates to `Result<(), GuardedFault>`; the
/// instruction's outputs are in its operands as with [`core::arch::asm!`].
///
/// ```ignore
/// let (lo, hi): (u32, u32);
/// // SAFETY: <why running this instruction is sound>.
/// unsafe { xenmsr::guarded_asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) }?;
/// ```
///
/// The arguments are those of `asm!`: one template string (Intel syntax unless
/// `options(att_syntax)`), then operands and options. It must be used inside `unsafe`,
/// as `asm!` is; the caller vouches for the instruction as for any inline assembly.
///
/// What the macro owns:
/// - the register `r11` ([`guarded::ERROR_REG`](crate::guarded::ERROR_REG)), which
///   carries the error code (the compiler refuses an operand of the caller's on it);
/// - the local labels `7301:` and `7302:` around the instruction (numeric, so that the
///   compiler may duplicate the block; the template needs no labels of its own);
/// - the entry, in section `xenmsr_extable` (the kernel's linker script keeps it:
///   `xenmsr-pv.ld` and `xenmsr-sections.ld` do).
///
/// Rules (the [module documentation](crate::guarded) explains them): **one
/// instruction** (a template with a newline or `;` does not compile); the faults covered
/// are those of [`is_resumable_fault`](crate::fixup::is_resumable_fault), and only if
/// the kernel's handler for that vector calls
/// [`fixup_exception`](crate::fixup::fixup_exception) (the PV kit's does); after `Err`
/// the outputs are unspecified.
#[macro_export]
macro_rules! guarded_asm {
    ($insn:literal $(,)?) => {
        $crate::guarded_asm!(@emit $insn [])
    };
    ($insn:literal, $($rest:tt)+) => {
        $crate::guarded_asm!(@munch $insn [] $($rest)+)
    };
    // Copy the caller's operands token by token, so that they end in exactly one comma
    // whether or not the caller wrote a trailing one; the macro's operand follows.
    (@munch $insn:literal [$($acc:tt)*] ,) => {
        $crate::guarded_asm!(@emit $insn [$($acc)* ,])
    };
    (@munch $insn:literal [$($acc:tt)*] $next:tt $($rest:tt)*) => {
        $crate::guarded_asm!(@munch $insn [$($acc)* $next] $($rest)*)
    };
    (@munch $insn:literal [$($acc:tt)*]) => {
        $crate::guarded_asm!(@emit $insn [$($acc)* ,])
    };
    (@emit $insn:literal [$($operands:tt)*]) => {{
        const _: () = $crate::guarded::assert_one_instruction($insn);
        let guarded_error_code: u64;
        ::core::arch::asm!(
            "7301:",
            $insn,
            "7302:",
            ".pushsection xenmsr_extable, \"awR\", @progbits",
            ".balign 4",
            ".long 7301b - .",
            ".long 7302b - .",
            concat!(".long ", $crate::__xenmsr_guarded_entry_data!()),
            ".popsection",
            $($operands)*
            inout("r11") 0u64 => guarded_error_code,
        );
        $crate::guarded::GuardedFault::result_of(guarded_error_code)
    }};
}

/// Executes a raw RDMSR of `msr` (not routed by the library: on Xen PV it traps to Xen,
/// which emulates it or injects `#GP`); a fault gives `Err`, a `#GP` for an MSR that does
/// not exist or may not be read. The library's [`rdmsr_safe`](crate::site::rdmsr_safe)
/// is the routed access, with Xen's rules; this is the bare instruction.
///
/// # Safety
///
/// Reading `msr` must not break memory safety (a few MSRs have read side effects).
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> Result<u64, GuardedFault> {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR writes only eax and edx (declared); the caller vouches for the read;
    // no stack use and no flags changed.
    unsafe {
        crate::guarded_asm!(
            "rdmsr",
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags),
        )
    }?;
    Ok(u64::from(hi) << 32 | u64::from(lo))
}

/// Executes a raw WRMSR of `value` to `msr` (not routed by the library); a fault, such
/// as the `#GP` for a reserved bit or an MSR that may not be written, gives `Err`.
///
/// # Safety
///
/// The write must not break memory safety (for example moving `FS_BASE` under live
/// thread-local storage).
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) -> Result<(), GuardedFault> {
    // SAFETY: WRMSR writes no register; the caller vouches for the write. No stack use,
    // no flags changed.
    unsafe {
        crate::guarded_asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    }
}

/// Executes RDFSBASE: the FS base, or `Err(GuardedFault { vector: 6 })` (`#UD`) when
/// CR4.FSGSBASE is off on this CPU (on Xen PV: on this vCPU) or the CPU lacks the
/// instruction.
pub fn rdfsbase() -> Result<u64, GuardedFault> {
    let value: u64;
    // SAFETY: RDFSBASE reads the FS base into one register and has no other effect; it
    // either completes or raises #UD, which the entry turns into Err.
    unsafe {
        crate::guarded_asm!(
            "rdfsbase {}",
            out(reg) value,
            options(nomem, nostack, preserves_flags),
        )
    }?;
    Ok(value)
}

/// Executes RDGSBASE: the active GS base (a PV kernel's own: Xen swaps the user one
/// out while the kernel runs), or `Err(GuardedFault { vector: 6 })` as for [`rdfsbase`].
pub fn rdgsbase() -> Result<u64, GuardedFault> {
    let value: u64;
    // SAFETY: as for `rdfsbase`, with the GS base.
    unsafe {
        crate::guarded_asm!(
            "rdgsbase {}",
            out(reg) value,
            options(nomem, nostack, preserves_flags),
        )
    }?;
    Ok(value)
}

/// Loads the 8 bytes at `addr` with one `mov`; a page fault (`#PF`, 14: nothing mapped
/// there, or not readable), a non-canonical address (`#GP`, 13; `#SS`, 12 for one through
/// `rsp`, which this is not) comes back as `Err`. Misalignment is allowed, unless
/// alignment checking is on (`#AC`, 17).
///
/// # Safety
///
/// Reading `addr` must have no side effects that break memory safety (it must not be a
/// device register whose read changes state others rely on). The value is read as plain
/// bits, outside Rust's memory model (the read is inline assembly), so a concurrent
/// writer makes it torn or stale, not undefined.
#[inline(always)]
pub unsafe fn read_u64(addr: usize) -> Result<u64, GuardedFault> {
    let value: u64;
    // SAFETY: one load into one register; the caller vouches that reading `addr` has no
    // harmful side effect, and a fault comes back as Err. No stack use, flags untouched.
    unsafe {
        crate::guarded_asm!(
            "mov {}, qword ptr [{}]",
            out(reg) value,
            in(reg) addr,
            options(readonly, nostack, preserves_flags),
        )
    }?;
    Ok(value)
}
