//! The Xen x86-64 PV ABI as `xenmsr` needs it.
//!
//! - [`nr`]: hypercall numbers and the public constants (from `xen-sys` where it has them).
//! - [`Errno`]: Xen's error numbers as a newtype.
//! - [`abi`]: the ABI structs (PMU page, PMU params, trap table, console ring, start info ...),
//!   with compile-time layout checks.
//! - [`HypercallPage`]: the one way to make a hypercall, over a page of 32-byte entries.
//!   The real page is filled by Xen; the mock page (feature `mock`) is built at run time
//!   for host tests and goes through exactly the same calling code. The typed wrappers
//!   (`set_segment_base`, `xenpmu_op`, `console_write` ...) are methods on it.
#![cfg_attr(not(feature = "mock"), no_std)]
#![warn(missing_docs)]

pub mod abi;
mod calls;
mod calls_smp;
mod errno;
#[cfg(feature = "mock")]
pub mod mock;
pub mod nr;
mod page;
pub mod pv;

pub use errno::Errno;
pub use page::{ENTRIES, ENTRY_FIRST_BYTE, ENTRY_SIZE, HypercallPage};
