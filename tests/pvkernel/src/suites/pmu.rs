//! The library's vPMU backend and RDPMC emulation, per CPU model (run after
//! `xenmsr::init`). Under QEMU TCG only `EPYC` with Xen's `vpmu=1` has a working vPMU;
//! elsewhere Xen answers `-EOPNOTSUPP` and the backend must degrade to pass-through.

use core::cell::UnsafeCell;
use core::ptr::NonNull;

use xenmsr::pmu::{self, PmuError};
use xenmsr::{MsrError, rdmsr_safe, rdpmc_safe};
use xenmsr_hypercall::Errno;
use xenmsr_hypercall::abi::{XenPmuMode, XenPmuOp, XenPmuParams};

use super::{Vendor, model, raw};
use crate::boot::mfn_of;
use crate::hv::nr;
use crate::smp::{MAX_VCPUS, current_vcpu};
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, fail, test, tracepage, traps};

/// The vPMU tests.
pub static TESTS: &[Test] = &[
    test!(mode_get_matches_model),
    test!(pmu_msrs_match_bare_instruction),
    test!(rdpmc_is_emulated),
    test!(init_and_finish_own_vcpu),
    test!(xenpmu_ops_without_vpmu_are_eopnotsupp),
    test!(xen_checks_init_arguments),
];

const MSR_K7_EVNTSEL0: u32 = 0xc001_0000;
const MSR_K7_PERFCTR0: u32 = 0xc001_0004;
const MSR_F15H_PERF_CTL0: u32 = 0xc001_0200;
const MSR_P6_PERFCTR0: u32 = 0xc1;
const MSR_P6_EVNTSEL0: u32 = 0x186;

fn mode_get_matches_model() -> TestResult {
    let before = tracepage::snapshot();
    let r = pmu::global().mode_get();
    let after = tracepage::snapshot();
    check_eq!(
        after.count_since(&before, nr::XENPMU_OP),
        1u64,
        "xenpmu_op calls"
    );
    if model().vpmu_active {
        check_eq!(
            r,
            Ok((XenPmuMode::SELF, 0, 1)),
            "mode_get with an active vPMU"
        );
    } else {
        check_eq!(
            r,
            Err(PmuError::Disabled),
            "mode_get without an active vPMU"
        );
    }
    Ok(())
}

fn pmu_msrs_match_bare_instruction() -> TestResult {
    // Without a registered page nothing is cached: PMU MSRs of either vendor must behave
    // exactly as the bare instruction does (RAZ for the host vendor's, #GP for the other's).
    for msr in [
        MSR_K7_EVNTSEL0,
        MSR_K7_PERFCTR0,
        MSR_F15H_PERF_CTL0,
        MSR_P6_PERFCTR0,
        MSR_P6_EVNTSEL0,
    ] {
        // SAFETY: reading PMU MSRs has no side effect.
        let lib = unsafe { rdmsr_safe(msr) }.map_err(drop);
        let bare = raw::rdmsr(msr).map_err(drop);
        check_eq!(lib, bare, "library vs bare rdmsr of a PMU MSR");
    }
    Ok(())
}

fn rdpmc_is_emulated() -> TestResult {
    let gp = traps::count(13);
    // SAFETY: RDPMC emulation reads a counter MSR at most.
    let r = unsafe { rdpmc_safe(0) };
    match model().vendor {
        Some(Vendor::Amd) if model().vpmu_active => {
            check!(r.is_ok(), "rdpmc_safe(0) with an active vPMU: {r:?}");
        }
        // The counters never count under TCG and Xen reads them as 0.
        Some(Vendor::Amd) => check_eq!(r, Ok(0), "rdpmc_safe(0) on AMD"),
        // TCG's CPUID leaf 0xA is empty: the Intel layout has no counters at all.
        Some(Vendor::Intel) => {
            check_eq!(r, Err(MsrError::InvalidCounter), "rdpmc_safe(0) on Intel")
        }
        None => fail!("unknown vendor"),
    }
    // SAFETY: as above.
    let r = unsafe { rdpmc_safe(0x100) };
    check_eq!(
        r,
        Err(MsrError::InvalidCounter),
        "rdpmc_safe of a counter that does not exist"
    );
    // Emulated: the RDPMC instruction itself (always #GP for a PV guest) never ran.
    check_eq!(traps::count(13) - gp, 0, "#GP taken");
    Ok(())
}

/// A page for one vCPU's vPMU shared data, owned by Xen and the backend while registered.
#[repr(C, align(4096))]
struct PmuPage(UnsafeCell<[u8; 4096]>);

// SAFETY: each page is only handed to the backend and Xen, by the tests of its own vCPU
// (one test at a time there); the kernel never reads or writes it itself.
unsafe impl Sync for PmuPage {}

/// One page per vCPU: each vCPU registers its own with `XENPMU_init`, as Linux does when
/// a CPU comes up.
static PMU_PAGES: [PmuPage; MAX_VCPUS] = [const { PmuPage(UnsafeCell::new([0; 4096])) }; MAX_VCPUS];

/// This vCPU's page, and its id.
fn my_page() -> (NonNull<u8>, u32) {
    let vcpu = current_vcpu();
    let page = NonNull::new(PMU_PAGES[vcpu as usize].0.get().cast::<u8>()).expect("static page");
    (page, vcpu)
}

fn init_and_finish_own_vcpu() -> TestResult {
    let (page, vcpu) = my_page();
    let mfn = mfn_of(page.as_ptr() as usize);
    // SAFETY: the page is 4 KiB, aligned, used by nothing else, and `mfn` is its frame;
    // it stays allocated (static) and untouched until `finish` returns Ok below (or for
    // ever, if that fails).
    let r = unsafe { pmu::init(vcpu, page, mfn) };
    if !model().vpmu_active {
        check_eq!(
            r,
            Err(PmuError::Disabled),
            "pmu::init without an active vPMU"
        );
        check_eq!(
            pmu::finish(vcpu),
            Err(PmuError::NotInitialized),
            "pmu::finish"
        );
        return Ok(());
    }
    check_eq!(r, Ok(()), "pmu::init(this vCPU)");
    // SAFETY: as above; the second registration is refused before Xen is asked again or
    // by Xen (-EEXIST), and the page stays registered once.
    let again = unsafe { pmu::init(vcpu, page, mfn) };
    check_eq!(again, Err(PmuError::AlreadyInitialized), "second pmu::init");
    // Not inside a PMI: counters pass through, and RDPMC still works.
    // SAFETY: RDPMC emulation reads a counter MSR at most.
    let r = unsafe { rdpmc_safe(0) };
    check!(r.is_ok(), "rdpmc_safe(0) with a registered page: {r:?}");
    check_eq!(pmu::finish(vcpu), Ok(()), "pmu::finish(this vCPU)");
    check_eq!(
        pmu::finish(vcpu),
        Err(PmuError::NotInitialized),
        "second pmu::finish"
    );
    Ok(())
}

/// A machine frame no guest owns (far above the test machine's RAM).
const BAD_MFN: u64 = 0xd_eadb_eef0;

/// `xenpmu_op` straight to Xen (through the counting page), bypassing the library.
fn raw_xenpmu_op(op: XenPmuOp, params: Option<&mut XenPmuParams>) -> Result<u64, Errno> {
    // SAFETY: every caller passes either NULL (lvtpc_set, flush: the calling vCPU) or
    // params naming the calling vCPU and either a bad frame (which Xen refuses) or that
    // vCPU's own static page, whose registration the calling test ends with `finish`
    // before it returns.
    unsafe { tracepage::page().xenpmu_op(op, params) }
}

fn params(mfn: u64) -> XenPmuParams {
    XenPmuParams {
        version_maj: 0,
        version_min: 1,
        val: mfn,
        vcpu: current_vcpu(),
        pad: 0,
    }
}

/// Without an active vPMU, Xen refuses every `xenpmu_op` with -EOPNOTSUPP before looking
/// at its arguments, and the library degrades to pass-through (checked by the tests above).
fn xenpmu_ops_without_vpmu_are_eopnotsupp() -> TestResult {
    if model().vpmu_active {
        // Covered by `xen_checks_init_arguments` on this model.
        return Ok(());
    }
    for op in [
        XenPmuOp::MODE_GET,
        XenPmuOp::MODE_SET,
        XenPmuOp::FEATURE_GET,
        XenPmuOp::FEATURE_SET,
        XenPmuOp::INIT,
        XenPmuOp::FINISH,
    ] {
        let mut p = params(BAD_MFN);
        check_eq!(
            raw_xenpmu_op(op, Some(&mut p)),
            Err(Errno::EOPNOTSUPP),
            "xenpmu_op without vPMU"
        );
    }
    for op in [XenPmuOp::LVTPC_SET, XenPmuOp::FLUSH] {
        check_eq!(
            raw_xenpmu_op(op, None),
            Err(Errno::EOPNOTSUPP),
            "xenpmu_op without vPMU"
        );
    }
    check_eq!(
        pmu::global().feature_get().map(drop),
        Err(PmuError::Disabled),
        "feature_get without vPMU"
    );
    check_eq!(
        pmu::lvtpc_set(0x10),
        Err(PmuError::Disabled),
        "lvtpc_set without vPMU"
    );
    Ok(())
}

/// With an active vPMU (EPYC, `vpmu=1`): Xen's own argument checks, and every op the
/// library makes succeeding for real.
fn xen_checks_init_arguments() -> TestResult {
    if !model().vpmu_active {
        return Ok(());
    }
    let (page, vcpu) = my_page();
    let mfn = mfn_of(page.as_ptr() as usize);
    // A frame the domain does not own: Xen says -EINVAL, the library a typed error, and
    // the vCPU's slot stays free.
    // SAFETY: the page is this suite's static page; Xen refuses the bad frame, so nothing
    // is registered.
    let bad = unsafe { pmu::init(vcpu, page, BAD_MFN) };
    check_eq!(
        bad,
        Err(PmuError::InvalidArgument),
        "pmu::init with a bad MFN"
    );
    let mut p = params(BAD_MFN);
    check_eq!(
        raw_xenpmu_op(XenPmuOp::INIT, Some(&mut p)),
        Err(Errno::EINVAL),
        "XENPMU_init with a bad MFN"
    );
    // SAFETY: as in `init_and_finish_own_vcpu`: a static, aligned page and its own frame,
    // finished below.
    let good = unsafe { pmu::init(vcpu, page, mfn) };
    check_eq!(good, Ok(()), "pmu::init after the refusal");
    // Xen itself refuses a second registration of this vCPU (the library refuses it
    // before asking, see `init_and_finish_own_vcpu`).
    let mut p = params(mfn);
    check_eq!(
        raw_xenpmu_op(XenPmuOp::INIT, Some(&mut p)),
        Err(Errno::EEXIST),
        "second XENPMU_init"
    );
    check_eq!(
        pmu::global().mode_get().map(|(mode, _, _)| mode),
        Ok(XenPmuMode::SELF),
        "mode_get"
    );
    check!(pmu::global().feature_get().is_ok(), "feature_get");
    // The LVTPC value (not the register number, which Linux passes) reaches Xen.
    check_eq!(pmu::lvtpc_set(0x0001_00fe), Ok(()), "lvtpc_set");
    // A PMI handler run outside a real PMI (TCG cannot raise one) still ends with a flush
    // Xen accepts, on the calling vCPU (the context names it).
    let before = tracepage::snapshot();
    check_eq!(pmu::on_pmi(|ctx| ctx.vcpu), Ok(vcpu), "on_pmi (flush)");
    check_eq!(
        tracepage::snapshot().count_since(&before, nr::XENPMU_OP),
        1u64,
        "one flush hypercall"
    );
    check_eq!(pmu::finish(vcpu), Ok(()), "pmu::finish");
    Ok(())
}
