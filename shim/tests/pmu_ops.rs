//! vPMU hypercall operations against the mock hypercall page: the exact hypercalls, their
//! arguments, and the mapping of every error Xen gives.

mod pmu_common;

use std::cell::Cell;
use std::ptr::NonNull;
use std::rc::Rc;

use pmu_common::*;
use xenmsr::pmu::{DEFAULT_VCPUS, PmuError, PmuLayout, Vpmu};
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
    mock::on(XENPMU_OP, move |args| match args[0] as u32 {
        nr::XENPMU_INIT => {
            let p = params_of(args);
            // The page was zeroed before Xen got it.
            let zeroed = (0..4096).step_by(8).all(|o| r64(addr, o) == 0);
            seen2.set(Some((p, zeroed)));
            0
        }
        nr::XENPMU_FEATURE_GET => {
            answer_val(args, XenPmuFeature::IPC_ONLY.bits());
            0
        }
        op => panic!("unexpected xenpmu op {op}"),
    });
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    assert_eq!(v.features(), None, "unknown before Xen was asked");
    // SAFETY: the guarded page outlives `v`'s use of it.
    unsafe { v.init_vcpu(5, page.ptr(), 0xabc_def0) }.unwrap();
    let (p, zeroed) = seen.get().expect("handler ran");
    assert_eq!(
        (p.version_maj, p.version_min, p.val, p.vcpu, p.pad),
        (0, 1, 0xabc_def0, 5, 0)
    );
    assert!(zeroed);
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].nr, 40, "__HYPERVISOR_xenpmu_op");
    assert_eq!(calls[0].args[0], 4, "XENPMU_init");
    // Then Xen's features, which the cached path applies.
    assert_eq!(calls[1].nr, 40, "__HYPERVISOR_xenpmu_op");
    assert_eq!(calls[1].args[0], 2, "XENPMU_feature_get");
    assert_eq!(v.features(), Some(XenPmuFeature::IPC_ONLY));
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
fn the_features_come_from_xen_or_the_kernel() {
    let s = mock::session();
    let page = GuardedPage::new();
    let v = vpmu(s.page(), SKYLAKE, FakeNative::leak(vec![]));
    // An unprivileged domain may not ask: the registration still succeeds, and the
    // features stay unknown (none applied, Xen's default).
    mock::script(XENPMU_OP, 0);
    mock::script_err(XENPMU_OP, Errno::EPERM);
    // SAFETY: the guarded page outlives `v`'s use of it.
    unsafe { v.init_vcpu(0, page.ptr(), 1) }.expect("init");
    assert_eq!(pmu_ops(), vec![nr::XENPMU_INIT, nr::XENPMU_FEATURE_GET]);
    assert_eq!(v.features(), None);
    assert!(!v.is_disabled());
    // The kernel knows better (the host's `vpmu=arch`).
    v.set_features(XenPmuFeature::ARCH_ONLY);
    assert_eq!(v.features(), Some(XenPmuFeature::ARCH_ONLY));
    // A failed query leaves what is known alone; a successful one replaces it.
    mock::script_err(XENPMU_OP, Errno::EPERM);
    assert_eq!(v.feature_get(), Err(PmuError::PermissionDenied));
    assert_eq!(v.features(), Some(XenPmuFeature::ARCH_ONLY));
    mock::on(XENPMU_OP, |args| {
        assert_eq!(args[0] as u32, nr::XENPMU_FEATURE_GET);
        answer_val(args, 0);
        0
    });
    assert_eq!(v.feature_get(), Ok(XenPmuFeature::empty()));
    assert_eq!(v.features(), Some(XenPmuFeature::empty()));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FEATURE_GET; 2]);
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
        assert_eq!(v.read(0x38f), Some(Outcome::Native));
        assert_eq!(v.write(0xc1, 5), Some(Outcome::Native));
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
        set_vcpu(vcpu);
        assert_eq!(v.read(0x309), Some(Outcome::Native));
        assert_eq!(v.read(0x1b), None, "not a PMU MSR");
    }
    set_vcpu(0);
    // With no page there is nothing to store the LVTPC in: the answer says why.
    assert_eq!(v.lvtpc_set(0x10), Err(PmuError::Disabled));
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
    let r = unsafe { v.init_vcpu(DEFAULT_VCPUS as u32, page.ptr(), 1) };
    assert_eq!(r, Err(PmuError::VcpuOutOfRange(DEFAULT_VCPUS as u32)));
    assert_eq!(
        v.finish_vcpu(u32::MAX),
        Err(PmuError::VcpuOutOfRange(u32::MAX))
    );
    // The calling vCPU has no slot: the per-vCPU ops say so, MSRs pass through.
    set_vcpu(1000);
    assert_eq!(v.lvtpc_set(0), Err(PmuError::VcpuOutOfRange(1000)));
    set_vcpu(64);
    assert_eq!(v.on_pmi(|_| ()), Err(PmuError::VcpuOutOfRange(64)));
    assert_eq!(v.read(0x38f), Some(Outcome::Native));
    set_vcpu(0);
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
    assert_eq!(v.read(0x38f), None);
    assert_eq!(v.layout(), PmuLayout::None);
    assert_eq!(v.rdpmc(0), Outcome::Failed(MsrError::InvalidCounter));
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
    assert_eq!(v.lvtpc_set(0x400), Err(PmuError::NotInitialized));
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
    v.lvtpc_set(0x0001_00fe).unwrap();
    assert_eq!(
        seen.get(),
        0x0001_00fe,
        "Xen sees the value, not the APIC register number"
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_LVTPC_SET]);

    // Inside a PMI: stored, no hypercall (the flush applies it).
    xen_ok(addr);
    xen_intel_pmi(addr, &[0; 3], &[(0, 0); 4]);
    v.on_pmi(|_| {
        v.lvtpc_set(0x0001_0020).unwrap();
        assert_eq!(r32(addr, LAPIC_LVTPC_OFFSET), 0x0001_0020);
    })
    .unwrap();
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);

    // PMU_CACHED set but the handler not running yet (PMI pending): no hypercall either.
    set_flags(addr, PmuFlags::CACHED);
    v.lvtpc_set(0x20).unwrap();
    assert!(mock::take_calls().is_empty());

    // Errors map.
    set_flags(addr, PmuFlags::empty());
    mock::script_err(XENPMU_OP, Errno::EINVAL);
    assert_eq!(v.lvtpc_set(0x20), Err(PmuError::InvalidArgument));
    assert_eq!(pmu_ops(), vec![nr::XENPMU_LVTPC_SET]);
}

#[test]
fn each_vcpu_slot_has_its_own_cache_lines() {
    use xenmsr::pmu::{DEFAULT_SLOTS, SLOT_ALIGN, VcpuSlot};
    assert_eq!(
        SLOT_ALIGN, 128,
        "two 64-byte lines: the adjacent-line prefetch pair"
    );
    assert_eq!(std::mem::align_of::<VcpuSlot>(), SLOT_ALIGN);
    assert_eq!(std::mem::size_of::<VcpuSlot>(), SLOT_ALIGN);
    for slots in [&DEFAULT_SLOTS[..], leak_slots(3)] {
        for pair in slots.windows(2) {
            let (a, b) = (&pair[0] as *const VcpuSlot, &pair[1] as *const VcpuSlot);
            assert_eq!(a as usize % SLOT_ALIGN, 0, "slot starts a 128-byte block");
            assert_eq!(
                b as usize - a as usize,
                SLOT_ALIGN,
                "no two slots share a block"
            );
        }
    }
    assert_eq!(DEFAULT_SLOTS.len(), DEFAULT_VCPUS);
}

/// The kernel gives the slot storage, so vCPU ids are not capped at 64; and the
/// per-vCPU ops (`lvtpc_set`, `on_pmi`, MSR accesses) act on the calling vCPU, which the
/// `vcpu_id` hook names, never on a vCPU the caller picks.
#[test]
fn a_vcpu_beyond_the_default_count_works_with_kernel_storage_and_ops_act_on_the_caller() {
    let s = mock::session();
    let (page_1, page_200) = (GuardedPage::new(), GuardedPage::new());
    let slots = leak_slots(256);
    let v = vpmu_with_slots(s.page(), SKYLAKE, FakeNative::leak(vec![]), slots);
    xen_ok(page_200.addr());
    // Registration names the vCPU (Xen accepts any vCPU of the domain), here from vCPU 0.
    set_vcpu(0);
    registered(&v, 200, &page_200);
    registered(&v, 1, &page_1);
    assert!(v.is_initialized(200) && v.is_initialized(1));
    let (lvtpc_1, lvtpc_200) = (r32(page_1.addr(), LAPIC_LVTPC_OFFSET), 0x0001_00fe);

    // vCPU 200's LVTPC write lands in vCPU 200's page only.
    set_vcpu(200);
    v.lvtpc_set(lvtpc_200).unwrap();
    assert_eq!(r32(page_200.addr(), LAPIC_LVTPC_OFFSET), lvtpc_200);
    assert_eq!(r32(page_1.addr(), LAPIC_LVTPC_OFFSET), lvtpc_1);
    assert_eq!(pmu_ops(), vec![nr::XENPMU_LVTPC_SET]);

    // A PMI on vCPU 200: its sample, its cached context, its flush.
    xen_intel_pmi(page_200.addr(), &[0x200; 3], &[(0x2000, 0); 4]);
    page_200.w64(16, 0xffff_ffff_8200_0000);
    let (vcpu, ip, pmc0) = v
        .on_pmi(|ctx| (ctx.vcpu, ctx.regs.ip, v.read(0xc1)))
        .unwrap();
    assert_eq!(
        (vcpu, ip, pmc0),
        (200, 0xffff_ffff_8200_0000, Some(Outcome::Done(0x2000)))
    );
    assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH]);
    assert!(!v.is_cached(200));

    // Beyond the kernel's storage: no slot.
    set_vcpu(256);
    assert_eq!(v.on_pmi(|_| ()), Err(PmuError::VcpuOutOfRange(256)));
    set_vcpu(0);
    assert!(mock::take_calls().is_empty());
}
