//! Puts the crate's linker-script fragments (`link/xenmsr-sections.ld`, and the complete
//! `link/xenmsr-pv.ld`) on the linker's search path of every binary that depends on this
//! crate, so a kernel's script can `INCLUDE xenmsr-sections.ld` (or the kernel can link
//! with `-Txenmsr-pv.ld`) without knowing where Cargo unpacked the crate.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link");
    println!("cargo:rustc-link-search=native={dir}/link");
}
