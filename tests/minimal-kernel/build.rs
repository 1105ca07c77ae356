//! Links the kernel with the library's complete PV linker script (found on the search path
//! `xenmsr-asm`'s build script sets), only for the bare-metal target.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-Txenmsr-pv.ld");
        // Xen loads the image at its link address and relocates nothing.
        println!("cargo:rustc-link-arg-bins=--no-pie");
        // The same for the in-guest test target (tests/guest.rs), a kernel too.
        println!("cargo:rustc-link-arg-tests=-Txenmsr-pv.ld");
        println!("cargo:rustc-link-arg-tests=--no-pie");
    }
}
