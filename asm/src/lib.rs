//! The instruction-ABI layer of `xenmsr`.
//!
//! - [`stubs`]: the `global_asm!` stubs that take the native register contract of
//!   RDMSR/WRMSR/RDPMC (`ecx`, `edx:eax`), call the Rust handlers in [`backend`], and fall
//!   back to the real instruction.
//! - [`site`]: the call-site emitters (`rdmsr`, `rdmsr_safe`, `wrmsr`, ...). Each site is a
//!   patchable region that starts as `call <stub>`, with its own extable entry and a
//!   patch-site record ([`patch`]).
//! - [`native`]: raw-instruction sites that are never patched.
//! - [`extable`]: the exception-table entry format, its section, sort-once and search.
//! - [`fixup`]: [`fixup::fixup_exception`], which the kernel's exception handlers call.
//! - [`guarded`]: [`guarded_asm!`], a kernel's own instruction whose fault comes back as
//!   `Err(GuardedFault)`, through the same table and fixup.
//!
//! `docs/abi.md` describes the register contracts, the entry and record formats, and the
//! rewind rule.
#![no_std]
#![warn(missing_docs)]

pub mod backend;
pub mod cpuid;
pub(crate) mod error;
pub mod extable;
pub mod fastpath;
pub mod fixup;
pub mod guarded;
pub mod native;
pub mod patch;
pub mod pv;
pub mod site;
pub mod stubs;
pub mod vcpu;

pub use backend::{MsrBackend, Outcome};
pub use error::{MsrError, VECTOR_GP, VECTOR_UD};

/// The hypercall crate, for the kit's macros (`pv_entry!`).
#[doc(hidden)]
pub use xenmsr_hypercall as __hypercall;

/// Length in bytes of the `call rel32` (`e8 rel32`) of every site's Xen variant. The call
/// ends where the site ends (a register-contract site is the call; a constant-index site
/// is [`IMM_CALL_PREFIX`] and the call), so its return address is the end of the site.
///
/// This one constant feeds the site emitters (an assembly-time `.if`/`.error` check that
/// every emitted call has this length), the stubs (the signed immediate of their rewind
/// entries), and the fixup (which rewinds a return address by the immediate).
pub const CALL_LEN: usize = 5;

/// Length in bytes of a register-contract patchable site: the largest of its variants
/// (`call` 5, `rdmsr`/`wrmsr`/`rdpmc` 2, `wrmsrns` 3).
pub const SITE_LEN: usize = 5;

/// Length in bytes of a constant-index (immediate-form) patchable site: the length of
/// the 9-byte immediate forms (`rdmsr $imm32, %rax`, `wrmsrns %rax, $imm32`).
///
/// Every variant of such a site is **one instruction** of exactly this length (shorter
/// instructions are padded with redundant CS prefixes), so every variant has the same
/// instruction boundaries, the site start and end: a vCPU stopped anywhere (an upcall
/// between two instructions, inside a stub the site called, after Xen emulated a trapped
/// instruction) resumes at a boundary of whatever variant a live re-patch wrote meanwhile.
/// The Xen variant is [`IMM_CALL_PREFIX`] and then the `call` ([`CALL_LEN`] bytes), whose
/// return address is the end of the site.
pub const IMM_SITE_LEN: usize = 9;

/// The redundant CS prefixes before a constant-index site's `call`, which make the call
/// one [`IMM_SITE_LEN`]-byte instruction (segment prefixes are ignored on a near call in
/// 64-bit mode; assemblers pad branches the same way for Intel's JCC erratum).
pub const IMM_CALL_PREFIX: [u8; 4] = [0x2e; 4];

const _: () = assert!(SITE_LEN >= CALL_LEN);
const _: () = assert!(IMM_SITE_LEN == IMM_CALL_PREFIX.len() + CALL_LEN);
const _: () = assert!(CALL_LEN <= i16::MAX as usize);

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests;
