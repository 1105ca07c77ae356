//! The mock hypercall page for host tests.
