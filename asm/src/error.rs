//! The typed MSR error and its register encoding.
//!
//! An error travels from the Rust handler, through the stub and the extable fixup, to the
//! caller's safe call site as a single non-zero 64-bit code. Code 0 means "no error" and
//! code 1 is reserved for the handler's "do native" answer, so every error code has a
//! class of 2 or more in its low byte.

use xenmsr_hypercall::Errno;

/// Why an MSR or PMC access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MsrError {
    /// The instruction raised an exception (`#GP` from the CPU, or from Xen's emulation),
    /// and the extable fixup turned it into this error.
    Fault {
        /// The exception vector (13 for `#GP`, 6 for `#UD`).
        vector: u8,
    },
    /// A hypercall made on the access's behalf failed with this error.
    Hypercall(Errno),
    /// The access needs Xen's vPMU and the hypervisor has it disabled.
    PmuUnavailable,
    /// An RDPMC counter index that names no counter of this CPU's layout.
    InvalidCounter,
}

const CLASS_FAULT: u64 = 2;
/// The class byte of [`MsrError::Hypercall`] codes (the segment-base stubs encode it).
pub(crate) const CLASS_HYPERCALL: u64 = 3;
const CLASS_PMU_UNAVAILABLE: u64 = 4;
const CLASS_INVALID_COUNTER: u64 = 5;

/// `#GP`, the vector a faulting RDMSR/WRMSR/RDPMC raises.
pub const VECTOR_GP: u8 = 13;
/// `#UD`.
pub const VECTOR_UD: u8 = 6;

impl MsrError {
    /// Encodes the error as a non-zero code (low byte: class ≥ 2; bits 32..64: payload).
    pub const fn to_code(self) -> u64 {
        match self {
            MsrError::Fault { vector } => CLASS_FAULT | ((vector as u64) << 32),
            MsrError::Hypercall(errno) => CLASS_HYPERCALL | ((errno.0 as u32 as u64) << 32),
            MsrError::PmuUnavailable => CLASS_PMU_UNAVAILABLE,
            MsrError::InvalidCounter => CLASS_INVALID_COUNTER,
        }
    }

    /// Decodes a code made by [`to_code`](Self::to_code). Unknown or reserved codes (0, 1,
    /// unknown classes) give `None`.
    pub const fn from_code(code: u64) -> Option<MsrError> {
        let payload = (code >> 32) as u32;
        match code & 0xff {
            CLASS_FAULT => Some(MsrError::Fault {
                vector: payload as u8,
            }),
            CLASS_HYPERCALL => Some(MsrError::Hypercall(Errno(payload as i32))),
            CLASS_PMU_UNAVAILABLE => Some(MsrError::PmuUnavailable),
            CLASS_INVALID_COUNTER => Some(MsrError::InvalidCounter),
            _ => None,
        }
    }
}

impl core::fmt::Display for MsrError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MsrError::Fault { vector } => write!(f, "the access raised exception vector {vector}"),
            MsrError::Hypercall(errno) => write!(f, "hypercall failed: {errno}"),
            MsrError::PmuUnavailable => write!(f, "the vPMU is disabled by the hypervisor"),
            MsrError::InvalidCounter => write!(f, "no such performance counter"),
        }
    }
}

/// Turns a site's error register (0 = no error) and value into a `Result`.
pub(crate) fn result_of(err: u64, value: u64) -> Result<u64, MsrError> {
    if err == 0 {
        Ok(value)
    } else {
        // The fixup only ever writes codes made by `MsrError::to_code`.
        debug_assert!(
            MsrError::from_code(err).is_some(),
            "bad error code {err:#x}"
        );
        Err(MsrError::from_code(err).unwrap_or(MsrError::Fault { vector: VECTOR_GP }))
    }
}
