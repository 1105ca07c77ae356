//! The PV test kernel. Built for `x86_64-unknown-none`; on the host it is an empty program
//! so that workspace-wide commands still work.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {}
