//! Constant-index FS and GS base sites patched to RDFSBASE/WRFSBASE and friends (the
//! native variant with `CpuFeatures::fsgsbase`, and the Xen PV variant's `ConstRoute`s),
//! executed in ring 3 on this host, whose Linux sets CR4.FSGSBASE for user space:
//!
//! - the instruction fills the site, padded with CS prefixes before it (one instruction);
//! - a GS write and read go straight to the GS base (no stub, no policy);
//! - a non-canonical WRFSBASE raises a real #GP at the site, and the site's own extable
//!   entry turns it into `Err(Fault { vector: 13 })` (the safe site) or a warning and
//!   nothing written (the unchecked one), exactly like any native fault. (QEMU's TCG does
//!   not raise this #GP; this is where it is proved.)

use std::sync::Mutex;

use xenmsr::patch::{CpuFeatures, Variant, wanted_bytes};
use xenmsr_asm::patch::{PatchOp, PatchSite, patch_sites};
use xenmsr_asm::{MsrError, site};
use xenmsr_host_tests::{fixups, install, take_warnings, write_text_mprotect};

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;

static TEXT: Mutex<()> = Mutex::new(());

fn host_has_fsgsbase() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "fsgsbase"))
}

const FSGSBASE: CpuFeatures = CpuFeatures {
    wrmsrns: false,
    msr_imm: false,
    fsgsbase: true,
};

#[inline(never)]
fn write_gs_safe(v: u64) -> Result<(), MsrError> {
    // SAFETY: the user GS base is unused by Rust and glibc on x86-64 Linux.
    unsafe { site::wrmsr_ns_const_safe::<MSR_GS_BASE>(v) }
}

#[inline(never)]
fn read_gs_safe() -> Result<u64, MsrError> {
    // SAFETY: reading a segment base has no side effect.
    unsafe { site::rdmsr_const_safe::<MSR_GS_BASE>() }
}

#[inline(never)]
fn read_fs_safe() -> Result<u64, MsrError> {
    // SAFETY: as above.
    unsafe { site::rdmsr_const_safe::<MSR_FS_BASE>() }
}

#[inline(never)]
fn write_fs_safe(v: u64) -> Result<(), MsrError> {
    // SAFETY: the tests write only a non-canonical value, which faults and writes nothing.
    unsafe { site::wrmsr_ns_const_safe::<MSR_FS_BASE>(v) }
}

#[inline(never)]
fn write_fs_unchecked(v: u64) {
    // SAFETY: as above.
    unsafe { site::wrmsr_ns_const::<MSR_FS_BASE>(v) }
}

/// The constant-index site of `op` inside `function`.
fn site_in(function: usize, op: PatchOp) -> PatchSite {
    patch_sites()
        .filter(|s| s.op == Some(op) && s.addr >= function && s.addr < function + 4096)
        .min_by_key(|s| s.addr)
        .unwrap_or_else(|| panic!("no {op:?} site in the function at {function:#x}"))
}

fn patch(site: PatchSite, variant: Variant) -> Vec<u8> {
    let bytes = wanted_bytes(&site, variant).expect("the site takes the variant");
    // SAFETY: a live patch site of this binary that no other thread runs (TEXT is held).
    unsafe { write_text_mprotect(site.addr, bytes.as_slice()) };
    bytes.as_slice().to_vec()
}

fn rdfsbase() -> u64 {
    let v: u64;
    // SAFETY: reads this thread's FS base.
    unsafe { core::arch::asm!("rdfsbase {}", out(reg) v, options(nomem, nostack)) };
    v
}

fn rdgsbase() -> u64 {
    let v: u64;
    // SAFETY: reads the user GS base.
    unsafe { core::arch::asm!("rdgsbase {}", out(reg) v, options(nomem, nostack)) };
    v
}

fn wrgsbase(v: u64) {
    // SAFETY: the user GS base is unused by Rust and glibc on x86-64 Linux.
    unsafe { core::arch::asm!("wrgsbase {}", in(reg) v, options(nomem, nostack)) };
}

#[test]
fn fsgsbase_sites_run_the_instructions_and_fault_like_native() {
    if !host_has_fsgsbase() {
        eprintln!("skipped: this host does not let user space use WRFSBASE");
        return;
    }
    let _text = TEXT.lock().unwrap_or_else(|e| e.into_inner());
    install();
    let variant = Variant::Native(FSGSBASE);
    let sites = [
        (
            site_in(write_gs_safe as *const () as usize, PatchOp::WriteImm),
            &[0xf3, 0x48, 0x0f, 0xae, 0xd8][..],
        ),
        (
            site_in(read_gs_safe as *const () as usize, PatchOp::ReadImm),
            &[0xf3, 0x48, 0x0f, 0xae, 0xc8],
        ),
        (
            site_in(read_fs_safe as *const () as usize, PatchOp::ReadImm),
            &[0xf3, 0x48, 0x0f, 0xae, 0xc0],
        ),
        (
            site_in(write_fs_safe as *const () as usize, PatchOp::WriteImm),
            &[0xf3, 0x48, 0x0f, 0xae, 0xd0],
        ),
        (
            site_in(write_fs_unchecked as *const () as usize, PatchOp::WriteImm),
            &[0xf3, 0x48, 0x0f, 0xae, 0xd0],
        ),
    ];
    for (site, insn) in sites {
        let bytes = patch(site, variant);
        assert_eq!(&bytes[..4], [0x2e; 4], "{site:?}: CS prefixes");
        assert_eq!(&bytes[4..], insn, "{site:?}: then the instruction");
    }

    // GS: written and read with the instructions, no fault.
    let saved = rdgsbase();
    let (ill0, segv0) = fixups();
    let value = 0x0000_7123_0000_5000;
    let w = write_gs_safe(value);
    let seen = rdgsbase();
    let r = read_gs_safe();
    wrgsbase(saved);
    assert_eq!((w, seen, r), (Ok(()), value, Ok(value)));
    assert_eq!(read_fs_safe(), Ok(rdfsbase()));
    assert_eq!(fixups(), (ill0, segv0), "no fault, no stub");

    // A non-canonical base: WRFSBASE raises #GP at the site, the site's entry answers.
    let fs = rdfsbase();
    let (ill0, segv0) = fixups();
    assert_eq!(
        write_fs_safe(0x8000_0000_0000_0000),
        Err(MsrError::Fault { vector: 13 })
    );
    assert_eq!(fixups(), (ill0, segv0 + 1), "one real #GP");
    let _ = take_warnings();
    write_fs_unchecked(0x8000_0000_0000_0000);
    let warnings = take_warnings();
    assert!(warnings.len() <= 1, "{warnings:?}");
    assert_eq!(fixups(), (ill0, segv0 + 2), "one more real #GP");
    assert_eq!(rdfsbase(), fs, "nothing written");

    // Back to the emitted code.
    for (site, _) in sites {
        patch(site, Variant::XenPv);
    }
}
