//! The kernel's handle on the hypercall page Xen filled (defined by the hypercall crate as
//! `xenmsr_hypercall_page` and named by the HYPERCALL_PAGE ELF note in `boot.rs`).

pub use xenmsr_hypercall::HypercallPage;
pub use xenmsr_hypercall::abi::{SegmentBase, ShutdownReason, XenPmuOp, XenPmuParams};
pub use xenmsr_hypercall::nr;

/// The page Xen filled.
pub fn page() -> HypercallPage {
    HypercallPage::xen()
}
