//! Xen ABI structs, each with compile-time size and offset checks.
