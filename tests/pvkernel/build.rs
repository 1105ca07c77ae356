//! Links the PV test kernel with its own linker script, only for the bare-metal target:
//! on the host the crate is an empty program and links normally.

fn main() {
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
        // x86_64-unknown-none links a static PIE by default; Xen loads the image at its
        // link address and performs no relocation.
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
