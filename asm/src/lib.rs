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
//! - [`fixup`]: [`fixup::fixup_exception`], which the kernel's `#GP`/`#UD` handlers call.
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
pub mod native;
pub mod patch;
pub mod pv;
pub mod site;
pub mod stubs;

pub use backend::{MsrBackend, Outcome};
pub use error::{MsrError, VECTOR_GP, VECTOR_UD};

/// The hypercall crate, for the kit's macros (`pv_entry!`).
#[doc(hidden)]
pub use xenmsr_hypercall as __hypercall;

/// Length in bytes of the `call rel32` (`e8 rel32`) every patchable site starts with.
///
/// This one constant feeds the site emitters (an assembly-time `.if`/`.error` check that
/// every emitted call has this length), the stubs (the signed immediate of their rewind
/// entries), and the fixup (which rewinds a return address by the immediate).
pub const CALL_LEN: usize = 5;

/// Length in bytes of a register-contract patchable site: the largest of its variants
/// (`call` 5, `rdmsr`/`wrmsr`/`rdpmc` 2, `wrmsrns` 3).
pub const SITE_LEN: usize = 5;

/// Length in bytes of a constant-index (immediate-form) patchable site: the largest of its
/// variants, the 9-byte immediate forms (`rdmsr $imm32, %rax`, `wrmsrns %rax, $imm32`);
/// the Xen variant is the `call` ([`CALL_LEN`] bytes) followed by a 4-byte NOP.
pub const IMM_SITE_LEN: usize = 9;

/// The NOP that pads a constant-index site's `call` to [`IMM_SITE_LEN`]
/// (`nopl 0x0(%rax)`).
pub const IMM_SITE_PAD: [u8; 4] = [0x0f, 0x1f, 0x40, 0x00];

const _: () = assert!(SITE_LEN >= CALL_LEN);
const _: () = assert!(IMM_SITE_LEN == CALL_LEN + IMM_SITE_PAD.len());
const _: () = assert!(CALL_LEN <= i16::MAX as usize);

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests;
