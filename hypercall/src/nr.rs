//! Hypercall numbers and public constants.
