//! vPMU hypercall operations against the mock hypercall page: the exact hypercalls, their
//! arguments, and the mapping of every error Xen gives.

mod pmu_common;

use std::cell::Cell;
use std::ptr::NonNull;
use std::rc::Rc;

use pmu_common::*;
use xenmsr::pmu::{MAX_VCPUS, PmuError, PmuLayout, Vpmu};
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::abi::{LAPIC_LVTPC_OFFSET, PmuFlags, XenPmuFeature, XenPmuMode};
use xenmsr_hypercall::{Errno, mock, nr};

#[test]
fn init_makes_xenpmu_init_with_version_mfn_and_vcpu_on_a_zeroed_page() {
    let s = mock::session();
    let page = GuardedPage::new(); // filled with 0xa5
    let addr = page.addr();
    let seen = Rc::new(Cell::new(None));
    let seen2 = seen.clone();
    mock::on(XENPMU_OP, move |args| {
        assert_eq!(args[0], u64::from(nr::XENPMU_INIT));
        let p = params_of(args);
        // The page was zeroed before Xen got it.
        let zeroed = (0..4096).step_by(8).all(|o| r64(addr, o) == 0);
        seen2.set(Some((p, zeroed)));
        0
    });
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    // SAFETY: the guarded page outlives `v`'s use of it.
    unsafe { v.init_vcpu(5, page.ptr(), 0xabc_def0) }.unwrap();
    let (p, zeroed) = seen.get().expect("handler ran");
    assert_eq!(
        (p.version_maj, p.version_min, p.val, p.vcpu, p.pad),
        (0, 1, 0xabc_def0, 5, 0)
    );
    assert!(zeroed);
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].nr, 40, "__HYPERVISOR_xenpmu_op");
    assert_eq!(calls[0].args[0], 4, "XENPMU_init");
    assert!(v.is_initialized(5));
    assert!(!v.is_initialized(4));

    // A second init of the same vCPU is refused locally, with no hypercall, and the
    // registered page is left alone.
    page.w64(0, 77);
    // SAFETY: as above.
    let r = unsafe { v.init_vcpu(5, page.ptr(), 1) };
    assert_eq!(r, Err(PmuError::AlreadyInitialized));
    assert_eq!(page.r64(0), 77);
    assert!(mock::take_calls().is_empty());
}

#[test]
fn init_errors_map_to_typed_variants_and_forget_the_page() {
    let cases = [
        (Errno::EOPNOTSUPP, PmuError::Disabled),
        (Errno::ENOSYS, PmuError::Disabled),
        (Errno::EEXIST, PmuError::AlreadyInitialized),
        (Errno::ENOENT, PmuError::NotAvailable),
        (Errno::EINVAL, PmuError::InvalidArgument),
        (Errno::EPERM, PmuError::PermissionDenied),
        (Errno::ENOMEM, PmuError::Other(Errno::ENOMEM)),
        (Errno::ENOSPC, PmuError::Other(Errno::ENOSPC)),
        (Errno(4000), PmuError::Other(Errno(4000))),
    ];
    for (errno, want) in cases {
        let s = mock::session();
        let page = GuardedPage::new();
        let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
        mock::script_err(XENPMU_OP, errno);
        // SAFETY: the guarded page outlives `v`'s use of it.
        let r = unsafe { v.init_vcpu(0, page.ptr(), 1) };
        assert_eq!(r, Err(want), "{errno:?}");
        assert_eq!(pmu_ops(), vec![nr::XENPMU_INIT]);
        assert!(!v.is_initialized(0), "{errno:?}: page must be forgotten");
        assert_eq!(v.is_disabled(), want == PmuError::Disabled);
        // PMU MSRs pass through when there is no page, whatever the reason.
        page.w64(80, PmuFlags::CACHED.bits());
        assert_eq!(v.read(0, 0x38f), Some(Outcome::Native));
        assert_eq!(v.write(0, 0xc1, 5), Some(Outcome::Native));
    }
}

#[test]
fn disabled_vpmu_skips_later_inits_and_passes_through() {
    let s = mock::session();
    let (p0, p1) = (GuardedPage::new(), GuardedPage::new());
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    mock::script_err(XENPMU_OP, Errno::EOPNOTSUPP);
    // SAFETY: the guarded pages outlive `v`'s use of them.
    let r = unsafe { v.init_vcpu(0, p0.ptr(), 1) };
    assert_eq!(r, Err(PmuError::Disabled));
    // SAFETY: as above.
    let r = unsafe { v.init_vcpu(1, p1.ptr(), 2) };
    assert_eq!(r, Err(PmuError::Disabled));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_INIT], "no second hypercall");
    for vcpu in [0, 1] {
        assert_eq!(v.read(vcpu, 0x309), Some(Outcome::Native));
        assert_eq!(v.read(vcpu, 0x1b), None, "not a PMU MSR");
    }
    // With no page there is nothing to store the LVTPC in: the answer says why.
    assert_eq!(v.lvtpc_set(0, 0x10), Err(PmuError::Disabled));
    assert_eq!(pmu_ops(), Vec::<u32>::new(), "lvtpc_set made no hypercall");
    assert_eq!(MsrError::from(PmuError::Disabled), MsrError::PmuUnavailable);
}

#[test]
fn misaligned_page_and_bad_vcpu_make_no_hypercall() {
    let s = mock::session();
    let page = GuardedPage::new();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    let off = NonNull::new(page.ptr().as_ptr().wrapping_add(8)).unwrap();
    // SAFETY: rejected before any access.
    let r = unsafe { v.init_vcpu(0, off, 1) };
    assert_eq!(r, Err(PmuError::MisalignedPage));
    assert_eq!(page.r64(0), 0xa5a5_a5a5_a5a5_a5a5, "page untouched");
    // SAFETY: rejected before any access.
    let r = unsafe { v.init_vcpu(MAX_VCPUS as u32, page.ptr(), 1) };
    assert_eq!(r, Err(PmuError::VcpuOutOfRange(MAX_VCPUS as u32)));
    assert_eq!(
        v.finish_vcpu(u32::MAX),
        Err(PmuError::VcpuOutOfRange(u32::MAX))
    );
    assert_eq!(v.lvtpc_set(1000, 0), Err(PmuError::VcpuOutOfRange(1000)));
    assert_eq!(v.on_pmi(64, |_| ()), Err(PmuError::VcpuOutOfRange(64)));
    assert_eq!(v.read(64, 0x38f), Some(Outcome::Native));
    assert!(mock::take_calls().is_empty());
}

#[test]
fn unconfigured_backend_is_inert() {
    let _s = mock::session();
    let page = GuardedPage::new();
    let v = Vpmu::new();
    // SAFETY: rejected before any access.
    let r = unsafe { v.init_vcpu(0, page.ptr(), 1) };
    assert_eq!(r, Err(PmuError::NotConfigured));
    assert_eq!(v.mode_get(), Err(PmuError::NotConfigured));
    assert_eq!(v.read(0, 0x38f), None);
    assert_eq!(v.layout(), PmuLayout::None);
    assert_eq!(v.rdpmc(0, 0), Outcome::Failed(MsrError::InvalidCounter));
    assert!(mock::take_calls().is_empty());
}

#[test]
fn finish_passes_vcpu_and_version_and_forgets_the_page_even_on_error() {
    let s = mock::session();
    let page = GuardedPage::new();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    xen_ok(page.addr());
    registered(&v, 3, &page);

    let seen = Rc::new(Cell::new(None));
    let seen2 = seen.clone();
    mock::on(XENPMU_OP, move |args| {
        seen2.set(Some((args[0], params_of(args))));
        Errno::EIO.to_ret()
    });
    assert_eq!(v.finish_vcpu(3), Err(PmuError::Other(Errno::EIO)));
    let (op, p) = seen.get().unwrap();
    assert_eq!(op, u64::from(nr::XENPMU_FINISH));
    assert_eq!((p.version_maj, p.version_min, p.vcpu), (0, 1, 3));
    assert!(!v.is_initialized(3), "forgotten even though Xen failed");
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FINISH]);

    // Nothing registered: no hypercall.
    assert_eq!(v.finish_vcpu(3), Err(PmuError::NotInitialized));
    assert!(mock::take_calls().is_empty());

    // Register again and finish successfully.
    xen_ok(page.addr());
    registered(&v, 3, &page);
    assert_eq!(v.finish_vcpu(3), Ok(()));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FINISH]);
}

#[test]
fn mode_and_feature_get() {
    let s = mock::session();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    mock::on(XENPMU_OP, |args| {
        // Xen writes the answer into the caller's params.
        let p = args[1] as *mut xenmsr_hypercall::abi::XenPmuParams;
        // SAFETY: during the call `p` is the caller's live, exclusive params.
        let p = unsafe { &mut *p };
        assert_eq!((p.version_maj, p.version_min), (0, 1));
        match args[0] as u32 {
            nr::XENPMU_MODE_GET => {
                p.val = 1;
                p.version_maj = 0;
                p.version_min = 1;
                0
            }
            nr::XENPMU_FEATURE_GET => {
                p.val = 0b101;
                0
            }
            _ => -22,
        }
    });
    assert_eq!(v.mode_get(), Ok((XenPmuMode::SELF, 0, 1)));
    assert_eq!(
        v.feature_get(),
        Ok(XenPmuFeature::INTEL_BTS | XenPmuFeature::ARCH_ONLY)
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_MODE_GET, nr::XENPMU_FEATURE_GET]);

    for (errno, want) in [
        (Errno::EPERM, PmuError::PermissionDenied),
        (Errno::EOPNOTSUPP, PmuError::Disabled),
        (Errno::ENOSYS, PmuError::Disabled),
        (Errno::EINVAL, PmuError::InvalidArgument),
        (Errno::ENOENT, PmuError::NotAvailable),
        (Errno::EEXIST, PmuError::AlreadyInitialized),
        (Errno::EFAULT, PmuError::Other(Errno::EFAULT)),
    ] {
        mock::script_err(XENPMU_OP, errno);
        assert_eq!(v.mode_get(), Err(want));
        mock::script_err(XENPMU_OP, errno);
        assert_eq!(v.feature_get(), Err(want));
    }
    let _ = mock::take_calls();
}

#[test]
fn lvtpc_stores_the_value_and_calls_only_outside_a_pmi() {
    let s = mock::session();
    let page = GuardedPage::new();
    let addr = page.addr();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    assert_eq!(v.lvtpc_set(0, 0x400), Err(PmuError::NotInitialized));
    xen_ok(addr);
    registered(&v, 0, &page);

    // Outside a PMI: the VALUE goes into lapic_lvtpc, then LVTPC_SET with a NULL arg.
    let seen = Rc::new(Cell::new(0u32));
    let seen2 = seen.clone();
    mock::on(XENPMU_OP, move |args| {
        assert_eq!(args[0], u64::from(nr::XENPMU_LVTPC_SET));
        assert_eq!(args[1], 0, "NULL argument");
        seen2.set(r32(addr, LAPIC_LVTPC_OFFSET));
        0
    });
    v.lvtpc_set(0, 0x0001_00fe).unwrap();
    assert_eq!(
        seen.get(),
        0x0001_00fe,
        "Xen sees the value, not the APIC register number"
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_LVTPC_SET]);

    // Inside a PMI: stored, no hypercall (the flush applies it).
    xen_ok(addr);
    xen_intel_pmi(addr, &[0; 3], &[(0, 0); 4]);
    v.on_pmi(0, |_| {
        v.lvtpc_set(0, 0x0001_0020).unwrap();
        assert_eq!(r32(addr, LAPIC_LVTPC_OFFSET), 0x0001_0020);
    })
    .unwrap();
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);

    // PMU_CACHED set but the handler not running yet (PMI pending): no hypercall either.
    set_flags(addr, PmuFlags::CACHED);
    v.lvtpc_set(0, 0x20).unwrap();
    assert!(mock::take_calls().is_empty());

    // Errors map.
    set_flags(addr, PmuFlags::empty());
    mock::script_err(XENPMU_OP, Errno::EINVAL);
    assert_eq!(v.lvtpc_set(0, 0x20), Err(PmuError::InvalidArgument));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_LVTPC_SET]);
}
