//! The instruction-ABI layer of `xenmsr`.
#![no_std]
#![warn(missing_docs)]

pub mod backend;
mod error;

pub use backend::{MsrBackend, Outcome};
pub use error::{MsrError, VECTOR_GP, VECTOR_UD};
