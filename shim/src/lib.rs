//! `xenmsr`: MSR accesses for a Xen x86-64 PV guest kernel, without paravirt ops.
#![no_std]
#![warn(missing_docs)]
