//! Every row of the routing table, driven through the policy against the mock hypercall
//! page: the exact hypercall and arguments, or none, and the outcome the stub acts on.

use std::cell::Cell;

use xenmsr::pmu::NativeMsr;
use xenmsr::policy::XenPvPolicy;
use xenmsr::routes::{self, ROUTES, ReadRoute, WriteRoute};
use xenmsr::{MsrError, Outcome};
use xenmsr_hypercall::abi::SegmentBase;
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::{Errno, nr};

thread_local! {
    static VCPU: Cell<u32> = const { Cell::new(0) };
    static NATIVE: Cell<Result<u64, MsrError>> = const { Cell::new(Ok(0)) };
    static NATIVE_READS: Cell<u32> = const { Cell::new(0) };
}

fn current_vcpu() -> u32 {
    VCPU.with(Cell::get)
}

/// A native reader whose answer each test sets, and which counts its reads.
struct ScriptedNative;

impl NativeMsr for ScriptedNative {
    unsafe fn read_safe(&self, _msr: u32) -> Result<u64, MsrError> {
        NATIVE_READS.with(|n| n.set(n.get() + 1));
        NATIVE.with(Cell::get)
    }
}

/// The policy's decisions in these tests, which run it over the mock page and a scripted
/// native reader: nothing touches a real MSR or segment base.
trait OverMocks {
    fn mock_read(&self, msr: u32) -> Outcome;
    fn mock_write(&self, msr: u32, value: u64) -> Outcome;
    fn mock_rdpmc(&self, counter: u32) -> Outcome;
}

impl<N: NativeMsr> OverMocks for XenPvPolicy<N> {
    fn mock_read(&self, msr: u32) -> Outcome {
        // SAFETY: see the trait.
        unsafe { self.decide_read(msr) }
    }
    fn mock_write(&self, msr: u32, value: u64) -> Outcome {
        // SAFETY: see the trait.
        unsafe { self.decide_write(msr, value) }
    }
    fn mock_rdpmc(&self, counter: u32) -> Outcome {
        // SAFETY: see the trait.
        unsafe { self.decide_rdpmc(counter) }
    }
}

/// Storage for a policy's class index (a kernel uses a `static`).
fn index_storage() -> &'static mut xenmsr::dispatch::ClassIndex {
    Box::leak(Box::new(xenmsr::dispatch::ClassIndex::new()))
}

fn policy() -> XenPvPolicy<ScriptedNative> {
    XenPvPolicy::new(
        mock::page(),
        current_vcpu,
        ScriptedNative,
        None,
        index_storage(),
    )
}

fn segbase_call(which: SegmentBase, base: u64) -> MockCall {
    MockCall {
        nr: nr::SET_SEGMENT_BASE,
        args: [u64::from(which.0), base, 0, 0, 0],
    }
}

#[test]
fn segment_base_writes_make_one_hypercall_with_the_full_value() {
    let _session = mock::session();
    let policy = policy();
    let cases = [
        (routes::MSR_FS_BASE, SegmentBase::FS, 0),
        (routes::MSR_GS_BASE, SegmentBase::GS_KERNEL, 2),
        (routes::MSR_KERNEL_GS_BASE, SegmentBase::GS_USER, 1),
    ];
    for (msr, which, which_number) in cases {
        assert_eq!(which.0, which_number);
        for base in [
            0u64,
            0x1234_5678,
            0x0000_7fff_ffff_f000,
            0xffff_8000_dead_b000,
        ] {
            assert_eq!(policy.mock_write(msr, base), Outcome::Done(0), "{msr:#x}");
            mock::assert_calls(&[segbase_call(which, base)]);
        }
    }
}

#[test]
fn segment_base_hypercall_errors_are_typed() {
    let _session = mock::session();
    let policy = policy();
    for errno in [Errno::EINVAL, Errno::ENOSYS, Errno::EPERM, Errno::EFAULT] {
        mock::script_err(nr::SET_SEGMENT_BASE, errno);
        let non_canonical = 0x8000_0000_0000_0000;
        assert_eq!(
            policy.mock_write(routes::MSR_FS_BASE, non_canonical),
            Outcome::Failed(MsrError::Hypercall(errno))
        );
        mock::assert_calls(&[segbase_call(SegmentBase::FS, non_canonical)]);
    }
}

#[test]
fn segment_base_reads_pass_through() {
    let _session = mock::session();
    let policy = policy();
    for msr in [
        routes::MSR_FS_BASE,
        routes::MSR_GS_BASE,
        routes::MSR_KERNEL_GS_BASE,
    ] {
        assert_eq!(policy.mock_read(msr), Outcome::Native);
    }
    mock::assert_calls(&[]);
}

#[test]
fn syscall_msr_writes_are_ignored_without_a_hypercall() {
    let _session = mock::session();
    let policy = policy();
    let ignored = [
        routes::MSR_STAR,
        routes::MSR_LSTAR,
        routes::MSR_CSTAR,
        routes::MSR_SYSCALL_MASK,
        routes::MSR_SYSENTER_CS,
        routes::MSR_SYSENTER_ESP,
        routes::MSR_SYSENTER_EIP,
    ];
    for msr in ignored {
        assert_eq!(
            policy.mock_write(msr, u64::MAX),
            Outcome::Done(0),
            "{msr:#x}"
        );
        assert_eq!(policy.mock_read(msr), Outcome::Native, "{msr:#x}");
    }
    mock::assert_calls(&[]);
}

#[test]
fn apic_base_read_hides_x2apic_and_sets_bsp_only_on_vcpu0() {
    let _session = mock::session();
    let policy = policy();
    let raw = 0xfee0_0000 | (1 << 11) | (1 << 10) | (1 << 8);
    NATIVE.with(|n| n.set(Ok(raw)));
    for vcpu in [0u32, 1, 5] {
        VCPU.with(|v| v.set(vcpu));
        let expected = if vcpu == 0 {
            0xfee0_0000 | (1 << 11) | (1 << 8)
        } else {
            0xfee0_0000 | (1 << 11)
        };
        assert_eq!(
            policy.mock_read(routes::MSR_APIC_BASE),
            Outcome::Done(expected)
        );
    }
    // Xen's own value for a non-boot vCPU has no BSP bit; the boot vCPU still gets it.
    NATIVE.with(|n| n.set(Ok(0xfee0_0800)));
    VCPU.with(|v| v.set(0));
    assert_eq!(
        policy.mock_read(routes::MSR_APIC_BASE),
        Outcome::Done(0xfee0_0900)
    );
    VCPU.with(|v| v.set(0));
    mock::assert_calls(&[]);
}

#[test]
fn apic_base_read_fault_is_an_error_not_a_fabricated_value() {
    let _session = mock::session();
    let policy = policy();
    NATIVE.with(|n| n.set(Err(MsrError::Fault { vector: 13 })));
    VCPU.with(|v| v.set(0));
    assert_eq!(
        policy.mock_read(routes::MSR_APIC_BASE),
        Outcome::Failed(MsrError::Fault { vector: 13 })
    );
    NATIVE.with(|n| n.set(Ok(0)));
}

#[test]
fn apic_base_write_passes_through() {
    let _session = mock::session();
    assert_eq!(
        policy().mock_write(routes::MSR_APIC_BASE, 0xfee0_0900),
        Outcome::Native
    );
    mock::assert_calls(&[]);
}

#[test]
fn everything_else_is_native_without_a_hypercall() {
    let _session = mock::session();
    let policy = policy();
    NATIVE_READS.with(|n| n.set(0));
    for msr in [
        0x10,
        0x8b,
        0x1a0,
        0x277,
        0xc000_0080,
        0x1234_5678,
        0xc001_1234,
        0x4000_0000,
    ] {
        assert_eq!(policy.mock_read(msr), Outcome::Native, "{msr:#x}");
        assert_eq!(policy.mock_write(msr, 7), Outcome::Native, "{msr:#x}");
    }
    // Without a vPMU backend, PMU MSRs and RDPMC pass through too.
    for msr in [0xc1, 0x186, 0x38f, 0xc001_0000, 0xc001_0201] {
        assert_eq!(policy.mock_read(msr), Outcome::Native, "{msr:#x}");
    }
    assert_eq!(policy.mock_rdpmc(0), Outcome::Native);
    assert_eq!(
        NATIVE_READS.with(Cell::get),
        0,
        "the policy itself read no MSR"
    );
    mock::assert_calls(&[]);
}

/// Every row of the table has its expected behaviour: a generic check that cannot miss a
/// row added later without a matching test above.
#[test]
fn every_row_behaves_as_its_route_says() {
    let _session = mock::session();
    let policy = policy();
    NATIVE.with(|n| n.set(Ok(0xfee0_0900)));
    VCPU.with(|v| v.set(0));
    for route in ROUTES {
        match route.read {
            ReadRoute::Native => assert_eq!(policy.mock_read(route.msr), Outcome::Native),
            ReadRoute::ApicBaseFixup => assert_eq!(
                policy.mock_read(route.msr),
                Outcome::Done(routes::fix_apic_base(0xfee0_0900, 0))
            ),
        }
        mock::assert_calls(&[]);
        let value = 0x0000_1234_5678_9000;
        match route.write {
            WriteRoute::Native => {
                assert_eq!(policy.mock_write(route.msr, value), Outcome::Native);
                mock::assert_calls(&[]);
            }
            WriteRoute::Ignore => {
                assert_eq!(policy.mock_write(route.msr, value), Outcome::Done(0));
                mock::assert_calls(&[]);
            }
            WriteRoute::SegmentBase(which) => {
                assert_eq!(policy.mock_write(route.msr, value), Outcome::Done(0));
                mock::assert_calls(&[segbase_call(which, value)]);
            }
        }
    }
}

/// A PMU layout too large for the one-probe index: the policy falls back to the two-step
/// classification and gives the same answers.
#[test]
fn oversized_pmu_layout_falls_back_to_the_same_classification() {
    use xenmsr::dispatch::{Class, reference_class};
    use xenmsr::pmu::{IntelLayout, PmuLayout, VcpuSlot, Vpmu, VpmuConfig};

    let _session = mock::session();
    let layout = PmuLayout::Intel(IntelLayout {
        arch_counters: 200,
        fixed_counters: 31,
        version: 4,
        fixed_counter_width: 48,
        arch_counter_width: 48,
    });
    static SLOTS: [VcpuSlot; 4] = [const { VcpuSlot::new() }; 4];
    let vpmu: &'static Vpmu = Box::leak(Box::new(Vpmu::with(VpmuConfig {
        hypercalls: mock::page(),
        layout,
        native: &ScriptedNative,
        vcpu_id: current_vcpu,
        slots: &SLOTS,
    })));
    let policy = XenPvPolicy::new(
        mock::page(),
        current_vcpu,
        ScriptedNative,
        Some(vpmu),
        index_storage(),
    );
    assert!(
        format!("{policy:?}").contains("indexed: None"),
        "the layout should not fit the index: {policy:?}"
    );
    for msr in (0..0x800u32).chain(0xc000_0080..0xc000_0110) {
        assert_eq!(policy.class(msr), reference_class(&layout, msr), "{msr:#x}");
    }
    // The 200th general counter is a PMU MSR of this layout, and passes through (no page).
    assert!(matches!(policy.class(0xc1 + 199), Class::Pmu(_)));
    assert_eq!(policy.mock_read(0xc1 + 199), Outcome::Native);
    // The routes still work.
    assert_eq!(policy.mock_write(routes::MSR_LSTAR, 1), Outcome::Done(0));
    mock::assert_calls(&[]);
}
