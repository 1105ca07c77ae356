//! FSGSBASE (`fsgsbase=1`): the library initialised with `FsGsBase::Use`. On Skylake-Client
//! and EPYC the domain's CPUID policy has FSGSBASE and the FS and kernel GS bases go
//! through RDFSBASE/WRFSBASE and friends; on qemu64 it has not, and everything stays the
//! hypercall and trapped-read paths (the fallback, tested here, not skipped).

use xenmsr::{
    MsrError, rdmsr_const_safe, rdmsr_safe, wrmsr, wrmsr_ns_const, wrmsr_ns_const_safe, wrmsr_safe,
};

use super::{model, raw};
use crate::fixup::exinfo;
use crate::hv::{self, nr};
use crate::smp::{MAX_VCPUS, current_vcpu};
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, test, tracepage, traps};

/// Run on every vCPU at once, after `xenmsr::init`, when `fsgsbase=1`.
pub static TESTS: &[Test] = &[
    test!(status_matches_the_model),
    test!(fs_and_gs_bases_through_every_path),
    test!(kernel_gs_base_stays_a_hypercall),
    test!(bases_survive_vcpu_switches),
    test!(a_vcpu_without_cr4_fsgsbase_loses_no_access),
];

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Whether this model's domain policy has FSGSBASE (qemu64: no).
fn expected() -> bool {
    model().cpu != Some("qemu64")
}

fn status_matches_the_model() -> TestResult {
    check_eq!(xenmsr::fsgsbase::enabled(), expected(), "FSGSBASE enabled");
    if expected() {
        check_eq!(
            xenmsr::fsgsbase::secondary_cr4(),
            xenmsr::fsgsbase::CR4_FSGSBASE,
            "ctrlreg[4] for vCPUs started later"
        );
        check!(
            raw::rdsegbase(false).is_ok(),
            "RDFSBASE faults on this vCPU"
        );
    } else {
        // Xen's CPUID policy for this model has no FSGSBASE: the instruction is #UD.
        check_eq!(
            raw::rdsegbase(false),
            Err(exinfo(6, 0)),
            "RDFSBASE without FSGSBASE"
        );
        check_eq!(xenmsr::fsgsbase::secondary_cr4(), 0, "ctrlreg[4]");
    }
    Ok(())
}

/// One word per vCPU and base, which `%fs:0`/`%gs:0` load after a write (values apart
/// from the per-vCPU suite's).
static TARGETS: [[u64; 2]; MAX_VCPUS] = raw::per_vcpu_words(0x1111_0000);

/// Writes `value` to `msr` (FS or GS base) through write path `path`: 0 generic safe,
/// 1 generic unchecked, 2 constant-index safe, 3 constant-index unchecked.
fn write_via(path: u32, msr: u32, value: u64) -> Result<(), MsrError> {
    match (path, msr) {
        (0, _) => {
            // SAFETY: the kernel keeps no state in FS or GS; the tests
            // point them at `TARGETS` and reset them.
            unsafe { wrmsr_safe(msr, value) }
        }
        (1, _) => {
            // SAFETY: as above.
            unsafe { wrmsr(msr, value) };
            Ok(())
        }
        // SAFETY: as above.
        (2, MSR_FS_BASE) => unsafe { wrmsr_ns_const_safe::<MSR_FS_BASE>(value) },
        // SAFETY: as above.
        (2, _) => unsafe { wrmsr_ns_const_safe::<MSR_GS_BASE>(value) },
        (_, MSR_FS_BASE) => {
            // SAFETY: as above.
            unsafe { wrmsr_ns_const::<MSR_FS_BASE>(value) };
            Ok(())
        }
        _ => {
            // SAFETY: as above.
            unsafe { wrmsr_ns_const::<MSR_GS_BASE>(value) };
            Ok(())
        }
    }
}

/// Every way to write FS_BASE and GS_BASE (generic and constant-index sites, safe and
/// unchecked), each checked through every way to read them back: the library's generic
/// and constant-index reads, a trapped RDMSR, RDFSBASE/RDGSBASE (with FSGSBASE), and a
/// `%fs:`/`%gs:` load; with FSGSBASE no hypercall, without it one.
fn fs_and_gs_bases_through_every_path() -> TestResult {
    let v = current_vcpu() as usize;
    for path in 0..4 {
        for (i, msr) in [MSR_FS_BASE, MSR_GS_BASE].into_iter().enumerate() {
            let gs = i == 1;
            let target = &TARGETS[v][i] as *const u64 as u64;
            let before = tracepage::snapshot();
            let (gp, ud) = (traps::count(13), traps::count(6));
            let w = write_via(path, msr, target);
            let after = tracepage::snapshot();
            check_eq!(w, Ok(()), "write");
            check_eq!(
                after.count_since(&before, nr::SET_SEGMENT_BASE),
                u64::from(!expected()),
                "set_segment_base calls (path {path}, msr {msr:#x})"
            );
            check_eq!(
                (traps::count(13) - gp, traps::count(6) - ud),
                (0, 0),
                "traps"
            );
            // SAFETY: reading a segment base has no side effect.
            let generic = unsafe { rdmsr_safe(msr) };
            check_eq!(generic, Ok(target), "library read (generic site)");
            let constant = if gs {
                // SAFETY: as above.
                unsafe { rdmsr_const_safe::<MSR_GS_BASE>() }
            } else {
                // SAFETY: as above.
                unsafe { rdmsr_const_safe::<MSR_FS_BASE>() }
            };
            check_eq!(constant, Ok(target), "library read (constant-index site)");
            check_eq!(raw::rdmsr(msr), Ok(target), "trapped RDMSR");
            if expected() {
                check_eq!(raw::rdsegbase(gs), Ok(target), "RDFSBASE/RDGSBASE");
            }
            check_eq!(
                raw::load_at_segment_base(gs),
                TARGETS[v][i],
                "segment-relative load"
            );
        }
    }
    // The bases read with the instructions cost no trap: a constant-index read with
    // FSGSBASE takes neither #GP nor a hypercall (a trapped RDMSR would be a #GP to Xen,
    // invisible here, so the hypercall count is what can be checked).
    let before = tracepage::snapshot();
    // SAFETY: as above.
    let r = unsafe { rdmsr_const_safe::<MSR_FS_BASE>() };
    check!(r.is_ok(), "{r:?}");
    check_eq!(
        tracepage::snapshot().total_since(&before),
        0u64,
        "hypercalls of a read"
    );
    reset();
    Ok(())
}

fn reset() {
    // SAFETY: the kernel keeps no state in FS or GS.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_GS_BASE, 0) };
}

/// The user GS base (`KERNEL_GS_BASE` seen from the kernel) has no instruction a PV
/// kernel can use (no `swapgs`): it stays one `set_segment_base(SEGBASE_GS_USER)`.
fn kernel_gs_base_stays_a_hypercall() -> TestResult {
    let value = 0x0000_6000_1234_0000 | (current_vcpu() as u64) << 12;
    for constant in [false, true] {
        let before = tracepage::snapshot();
        let w = if constant {
            // SAFETY: the kernel never enters user mode, so the user GS base is unused.
            unsafe { wrmsr_ns_const_safe::<MSR_KERNEL_GS_BASE>(value) }
        } else {
            // SAFETY: as above.
            unsafe { wrmsr_safe(MSR_KERNEL_GS_BASE, value) }
        };
        check_eq!(w, Ok(()), "KERNEL_GS_BASE write");
        check_eq!(
            tracepage::snapshot().count_since(&before, nr::SET_SEGMENT_BASE),
            1u64,
            "set_segment_base calls"
        );
        check_eq!(raw::rdmsr(MSR_KERNEL_GS_BASE), Ok(value), "trapped RDMSR");
    }
    Ok(())
}

/// Four vCPUs on two physical CPUs: Xen switches them and must save and restore each
/// one's FS and GS bases, which (with FSGSBASE) it never saw written. 1,000 rounds of
/// "write both with the constant-index sites, yield, check both".
fn bases_survive_vcpu_switches() -> TestResult {
    const ROUNDS: u64 = 1000;
    /// With FSGSBASE a round is quick: a vCPU alone on its physical CPU's run queue can
    /// finish its 1000 yields without Xen ever switching it out (a CI run saw it), so it
    /// goes on, checking every 100 rounds, until it has been (or this bound passes).
    const MAX_ROUNDS: u64 = 200_000;
    let v = current_vcpu();
    // Every vCPU runs this test; start the yields together, so that all of them are
    // runnable at once and Xen really has to switch (a vCPU that got here while the others
    // were idle would yield to nobody).
    crate::smp::barrier();
    let runnable_time = || match hv::page().vcpu_runstate_info(v) {
        Ok(info) => Ok(info.time[1]),
        Err(e) => Err(crate::testing::Failure::new(format_args!(
            "VCPUOP_get_runstate_info: {e}"
        ))),
    };
    let before = runnable_time()?;
    let must_switch = crate::smp::online() > 2;
    let mut result = Ok(());
    let mut waited = 0;
    let mut rounds = 0;
    while rounds < ROUNDS || (must_switch && waited == 0 && rounds < MAX_ROUNDS) {
        let round = rounds;
        rounds += 1;
        let fs = 0x0000_4000_0000_0000 | u64::from(v) << 32 | (round & 0xfff_ffff) << 4;
        let gs = 0x0000_3000_0000_0000 | u64::from(v) << 32 | (round & 0xfff_ffff) << 4;
        // SAFETY: the kernel keeps no state in FS or GS.
        let wf = unsafe { wrmsr_ns_const_safe::<MSR_FS_BASE>(fs) };
        // SAFETY: as above.
        let wg = unsafe { wrmsr_ns_const_safe::<MSR_GS_BASE>(gs) };
        let w = (wf, wg);
        let _ = hv::page().sched_yield();
        let r = if expected() {
            (raw::rdsegbase(false), raw::rdsegbase(true))
        } else {
            (raw::rdmsr(MSR_FS_BASE), raw::rdmsr(MSR_GS_BASE))
        };
        if w != (Ok(()), Ok(())) || r != (Ok(fs), Ok(gs)) {
            result = Err(crate::testing::Failure::new(format_args!(
                "round {round}: wrote {w:?}, read {r:?}, expected {fs:#x} {gs:#x}"
            )));
            break;
        }
        if rounds % 100 == 0 {
            waited = runnable_time()? - before;
        }
    }
    reset();
    result?;
    waited = runnable_time()? - before;
    if must_switch {
        check!(
            waited > 0,
            "vCPU {v} was never descheduled in {rounds} yields"
        );
    }
    Ok(())
}

/// A vCPU that missed its CR4 step (Xen keeps CR4 per vCPU): with CR4.FSGSBASE cleared on
/// this vCPU, the inline and the stubs' RDFSBASE/WRGSBASE... raise `#UD`, and the library
/// completes each access anyway (`set_segment_base` for a write, a trapped RDMSR for a
/// read), on every write path, read back through every read path; then the bit is set
/// again. Only on the models whose policy has FSGSBASE (elsewhere nothing raises `#UD`).
fn a_vcpu_without_cr4_fsgsbase_loses_no_access() -> TestResult {
    if !expected() {
        return Ok(());
    }
    let v = current_vcpu() as usize;
    // SAFETY: a PV guest kernel may write CR4 (Xen emulates it); only FSGSBASE is
    // cleared, which nothing but the library's sites and this test use, and set back
    // below.
    let cr4 = unsafe { xenmsr::fsgsbase::read_cr4() };
    // SAFETY: as above.
    unsafe { xenmsr::fsgsbase::write_cr4(cr4 & !xenmsr::fsgsbase::CR4_FSGSBASE) };
    let mut result = Ok(());
    let fallbacks = xenmsr::fsgsbase::fallbacks();
    let ud = traps::count(6);
    'paths: for path in 0..4 {
        for (i, msr) in [MSR_FS_BASE, MSR_GS_BASE].into_iter().enumerate() {
            let gs = i == 1;
            let target = &TARGETS[v][i] as *const u64 as u64;
            let before = tracepage::snapshot();
            let w = write_via(path, msr, target);
            let calls = tracepage::snapshot().count_since(&before, nr::SET_SEGMENT_BASE);
            // SAFETY: reading a segment base has no side effect.
            let generic = unsafe { rdmsr_safe(msr) };
            let constant = if gs {
                // SAFETY: as above.
                unsafe { rdmsr_const_safe::<MSR_GS_BASE>() }
            } else {
                // SAFETY: as above.
                unsafe { rdmsr_const_safe::<MSR_FS_BASE>() }
            };
            let seen = (
                w,
                calls,
                generic,
                constant,
                raw::rdmsr(msr),
                raw::load_at_segment_base(gs),
            );
            let wanted = (Ok(()), 1, Ok(target), Ok(target), Ok(target), TARGETS[v][i]);
            if seen != wanted {
                result = Err(crate::testing::Failure::new(format_args!(
                    "path {path}, msr {msr:#x}: (write, set_segment_base calls, generic \
                     read, constant read, trapped RDMSR, load) = {seen:?}, expected {wanted:?}"
                )));
                break 'paths;
            }
        }
    }
    let uds = traps::count(6) - ud;
    let completed = xenmsr::fsgsbase::fallbacks() - fallbacks;
    // SAFETY: as above: the bit is set back.
    let again = unsafe { xenmsr::fsgsbase::enable_on_this_vcpu() };
    reset();
    result?;
    check!(again, "CR4.FSGSBASE set again");
    // 4 write paths x 2 bases, and each read back through the two library reads: every one
    // an FSGSBASE instruction (inline or in a stub) that raised #UD and was completed.
    check!(uds >= 24, "{uds} #UDs");
    check!(
        completed >= 24,
        "{completed} accesses completed without FSGSBASE"
    );
    Ok(())
}
