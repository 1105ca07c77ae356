//! `init` checks everything that can fail before it changes anything. A call that fails
//! (here: a corrupt patch-site record among the image's, given through the internal entry
//! point that takes the sites) leaves no global state behind, so a retry succeeds.
//!
//! One test per binary: `init` state is per process.

use std::sync::atomic::{AtomicUsize, Ordering};

use xenmsr::patch::{PatchError, Variant};
use xenmsr::pmu::PmuLayout;
use xenmsr::routes::{MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE};
use xenmsr::{Config, InitError, UncheckedAccess};
use xenmsr_asm::patch::{PatchOp, PatchSite, patch_sites};
use xenmsr_host_tests::install_fault_handlers;
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::nr;

static LOGGED: AtomicUsize = AtomicUsize::new(0);
static WARNED: AtomicUsize = AtomicUsize::new(0);

fn log(_: std::fmt::Arguments<'_>) {
    LOGGED.fetch_add(1, Ordering::Relaxed);
}

fn warn(_: &UncheckedAccess) {
    WARNED.fetch_add(1, Ordering::Relaxed);
}

fn config() -> Config {
    xenmsr_host_tests::mock_xen_pv_config()
        .with_warn(warn)
        .with_log(log)
}

/// A constant-index FS-base write: a site `init` points at the segment-base stub.
#[inline(never)]
fn const_fs_write(value: u64) -> Result<(), xenmsr::MsrError> {
    // SAFETY: after `init` the site calls the segment-base stub, which makes the (mock)
    // hypercall; no MSR is written.
    unsafe { xenmsr::wrmsr_ns_const_safe::<MSR_FS_BASE>(value) }
}

/// The code bytes of every site of this image.
fn site_bytes() -> Vec<Vec<u8>> {
    patch_sites()
        .map(|site| {
            // SAFETY: a live patch site of this binary, in mapped, readable text.
            unsafe { std::slice::from_raw_parts(site.addr as *const u8, site.len.into()) }.to_vec()
        })
        .collect()
}

#[test]
fn a_failed_init_changes_nothing_and_a_retry_succeeds() {
    install_fault_handlers();
    let _session = mock::session();
    let segment_base_sites = patch_sites()
        .filter(|s| {
            s.op == Some(PatchOp::WriteImm)
                && [MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE].contains(&s.imm)
        })
        .count();
    assert!(
        segment_base_sites > 0,
        "this binary has constant segment-base writes"
    );

    // The image's records, and after them one whose length no op has.
    let nowhere = [0x90u8; 16];
    let corrupt = PatchSite {
        addr: nowhere.as_ptr() as usize,
        len: 7,
        op: Some(PatchOp::Read),
        flags: 0,
        imm: 0,
    };
    let mut sites: Vec<PatchSite> = patch_sites().collect();
    sites.push(corrupt);
    let code_before = site_bytes();

    // SAFETY: the corrupt record is refused before anything is written; the others are
    // this binary's sites, which no other thread runs (one test in this binary).
    let failed = unsafe { xenmsr::init_with_sites(config(), sites.iter().copied()) };
    assert_eq!(
        failed,
        Err(InitError::Patch(PatchError::BadLength {
            site: corrupt.addr,
            len: 7
        }))
    );
    // Nothing was set up: no backend, no warn hook, no segment-base stubs, no vPMU
    // configuration, no log line, and every site's code as it was.
    assert!(
        xenmsr_asm::backend::backend().is_none(),
        "backend installed"
    );
    assert!(
        !xenmsr_asm::fixup::warn_hook_registered(),
        "warn hook installed"
    );
    assert!(
        !xenmsr_asm::stubs::segbase_stubs_ready(),
        "segment-base stubs armed"
    );
    assert_eq!(xenmsr::pmu::global().layout(), PmuLayout::None);
    assert_eq!(LOGGED.load(Ordering::Relaxed), 0);
    assert_eq!(site_bytes(), code_before, "a site was rewritten");
    assert_eq!(nowhere, [0x90; 16]);

    // The retry with the image's own records succeeds and sets everything up.
    // SAFETY: once more, as above; nothing else runs the sites.
    let report = unsafe { xenmsr::init(config()) }.expect("the retry succeeds");
    assert_eq!(report.variant, Variant::XenPv);
    assert_eq!(report.patched.rewritten, segment_base_sites);
    assert!(xenmsr_asm::backend::backend().is_some());
    assert!(xenmsr_asm::fixup::warn_hook_registered());
    assert!(xenmsr_asm::stubs::segbase_stubs_ready());
    assert_eq!(LOGGED.load(Ordering::Relaxed), 1, "init's one log line");
    // The policy it installed routes: an FS-base write is one hypercall, through the
    // policy and through the rewritten constant-index site.
    // SAFETY: the policy turns the write into a (mock) hypercall.
    assert_eq!(unsafe { xenmsr::wrmsr_safe(MSR_FS_BASE, 0x1000) }, Ok(()));
    mock::assert_calls(&[MockCall::new(nr::SET_SEGMENT_BASE, [0, 0x1000, 0, 0, 0])]);
    assert_eq!(const_fs_write(0x2000), Ok(()));
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].nr, calls[0].args[1]),
        (nr::SET_SEGMENT_BASE, 0x2000)
    );

    // SAFETY: refused before anything is touched.
    let again = unsafe { xenmsr::init(config()) };
    assert_eq!(again, Err(InitError::AlreadyInitialised));
}
