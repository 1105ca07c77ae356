//! `init` refuses, changing nothing, when the stub backend or the warn hook it would
//! register is already taken (the first registration wins, so `init` could not install
//! its own). One test per binary: the registrations are per process.

use xenmsr::InitError;
use xenmsr_asm::backend::{MsrBackend, Outcome, set_backend};
use xenmsr_hypercall::mock;

#[derive(Debug)]
struct Other;

impl MsrBackend for Other {
    unsafe fn read(&self, _: u32) -> Outcome {
        Outcome::Native
    }
    unsafe fn write(&self, _: u32, _: u64) -> Outcome {
        Outcome::Native
    }
    unsafe fn rdpmc(&self, _: u32) -> Outcome {
        Outcome::Native
    }
}

static OTHER: Other = Other;

#[test]
fn init_refuses_when_another_backend_was_registered_first() {
    let _session = mock::session();
    // SAFETY: `Other` executes every access natively, as the stubs do with no backend.
    let registered = unsafe { set_backend(&OTHER) };
    assert!(registered);
    let config = xenmsr_host_tests::mock_xen_pv_config();
    // SAFETY: refused before any site is written.
    let r = unsafe { xenmsr::init(config) };
    assert_eq!(r.map(drop), Err(InitError::HooksTaken));
    assert!(!xenmsr_asm::fixup::warn_hook_registered());
    assert!(!xenmsr_asm::stubs::segbase_stubs_ready());
    assert_eq!(xenmsr::pmu::global().layout(), xenmsr::pmu::PmuLayout::None);
}
