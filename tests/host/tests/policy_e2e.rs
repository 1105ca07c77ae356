//! The production policy end to end: `xenmsr::init` for Xen PV over the mock hypercall
//! page, then the public emitters, the real stubs, the real policy, real ring-3 faults and
//! the production fixup.
//!
//! This binary never registers the scripted test backend: the backend is the policy that
//! `init` installs, and the warn hook is `init`'s (forwarding to [`record_warning`]). Only
//! the SIGILL/SIGSEGV handlers come from the helpers crate. Hypercalls go to the mock
//! page, whose scripts and records are per thread, so the tests run in parallel.

use std::cell::RefCell;
use std::sync::OnceLock;

use xenmsr::patch::ConstRoute;
use xenmsr::patch::Variant;
use xenmsr::routes::{
    MSR_APIC_BASE, MSR_CSTAR, MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR,
    MSR_SYSCALL_MASK, MSR_SYSENTER_CS, MSR_SYSENTER_EIP, MSR_SYSENTER_ESP,
};
use xenmsr::{Config, InitError, InitReport, MsrError, UncheckedAccess};
use xenmsr_asm::fixup::AccessOp;
use xenmsr_asm::patch::{PatchOp, patch_sites};
use xenmsr_asm::stubs::Stub;
use xenmsr_host_tests::{
    RegState, call_stub_with_current_backend, fixups, install_fault_handlers, r,
};
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::{Errno, nr};

const GP: MsrError = MsrError::Fault { vector: 13 };

thread_local! {
    static WARNINGS: RefCell<Vec<UncheckedAccess>> = const { RefCell::new(Vec::new()) };
}

/// The kernel's warn hook: runs in the signal handler on the faulting thread.
fn record_warning(access: &UncheckedAccess) {
    WARNINGS.with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            w.push(*access);
        }
    });
}

fn take_warnings() -> Vec<UncheckedAccess> {
    WARNINGS.with(|w| std::mem::take(&mut *w.borrow_mut()))
}

fn log(args: std::fmt::Arguments<'_>) {
    eprintln!("{args}");
}

fn vcpu_id() -> u32 {
    0
}

fn config() -> Config {
    xenmsr_host_tests::mock_xen_pv_config()
        .with_vcpu_id(vcpu_id)
        .with_warn(record_warning)
        .with_log(log)
}

/// Runs `xenmsr::init` once per process and returns its report.
fn init() -> InitReport {
    static REPORT: OnceLock<InitReport> = OnceLock::new();
    *REPORT.get_or_init(|| {
        install_fault_handlers();
        // SAFETY: once per process (OnceLock), before any test touches an MSR site; only
        // the constant-index segment-base sites are rewritten (to their direct stubs),
        // through `write_text_mprotect`.
        unsafe { xenmsr::init(config()) }.expect("xenmsr::init")
    })
}

/// Runs `f` and returns its result with the (SIGILL, SIGSEGV) fixups it caused.
fn counting<T>(f: impl FnOnce() -> T) -> (T, (u64, u64)) {
    let (ill0, segv0) = fixups();
    let value = f();
    let (ill1, segv1) = fixups();
    (value, (ill1 - ill0, segv1 - segv0))
}

fn set_segment_base(which: u64, value: u64) -> MockCall {
    MockCall::new(nr::SET_SEGMENT_BASE, [which, value, 0, 0, 0])
}

#[test]
fn init_routes_the_constant_index_sites_and_refuses_a_second_init() {
    let report = init();
    let sites = patch_sites().count();
    assert!(sites > 0, "this binary has sites");
    // On Xen PV a constant-index site's route is decided at patch time: a segment-base
    // write calls the stub that makes the hypercall directly, a pass-through MSR gets the
    // native instruction, an ignored write NOPs, and only what the policy must see keeps
    // its call. Every other site keeps its emitted `call`.
    let routing = xenmsr::patch::routing();
    assert!(routing.layout.is_some() && routing.direct_segbase && !routing.fsgsbase);
    let routed: Vec<_> = patch_sites()
        .filter(|s| {
            let op = s.op.expect("valid records");
            routing.route(op, s.imm) != ConstRoute::Stub(op.stub())
        })
        .collect();
    let segment_base_writes: Vec<_> = patch_sites()
        .filter(|s| {
            s.op == Some(PatchOp::WriteImm)
                && [MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE].contains(&s.imm)
        })
        .collect();
    assert!(
        !segment_base_writes.is_empty(),
        "this binary has such a site"
    );
    assert!(routed.len() >= segment_base_writes.len());
    assert_eq!(report.variant, Variant::XenPv);
    assert_eq!(report.patched.rewritten, routed.len(), "{report:?}");
    assert_eq!(report.patched.unchanged, sites - routed.len(), "{report:?}");
    for site in &routed {
        let wanted = xenmsr::patch::wanted_bytes(site, Variant::XenPv).unwrap();
        // SAFETY: the site lies in this binary's text, mapped readable.
        let code =
            unsafe { core::slice::from_raw_parts(site.addr as *const u8, usize::from(site.len)) };
        assert_eq!(code, wanted.as_slice(), "{site:?}");
        if site.op == Some(PatchOp::ReadImm) && site.imm == 0xc000_0080 {
            // EFER passes through: `rdmsr` inline (CS-padded; the value is folded after
            // the site).
            assert_eq!(
                &code[7..],
                &[0x0f, 0x32],
                "EFER read is the native instruction"
            );
        }
    }
    for site in &segment_base_writes {
        let stub = match site.imm {
            MSR_FS_BASE => Stub::SegbaseFs,
            MSR_GS_BASE => Stub::SegbaseGsKernel,
            _ => Stub::SegbaseGsUser,
        };
        // SAFETY: the site lies in this binary's text, mapped readable.
        let code = unsafe { core::slice::from_raw_parts(site.addr as *const u8, 9) };
        let rel = i32::from_le_bytes(code[5..9].try_into().unwrap());
        assert_eq!(
            code[..5],
            [0x2e, 0x2e, 0x2e, 0x2e, 0xe8],
            "a CS-prefixed call"
        );
        assert_eq!(
            site.addr.wrapping_add(9).wrapping_add_signed(rel as isize),
            stub.addr()
        );
    }
    // SAFETY: `init` refuses before touching anything when it already ran.
    let again = unsafe { xenmsr::init(config()) };
    assert_eq!(again.map(drop), Err(InitError::AlreadyInitialised));
}

#[test]
fn segment_base_writes_are_one_hypercall_each_and_never_a_wrmsr() {
    init();
    let session = mock::session();
    let _ = session.page();
    let value = 0x0000_7fff_dead_b000;
    for (msr, which) in [(MSR_FS_BASE, 0), (MSR_GS_BASE, 2), (MSR_KERNEL_GS_BASE, 1)] {
        // SAFETY: the policy turns the write into a (mock) hypercall; no MSR is written.
        let (result, faults) = counting(|| unsafe { xenmsr::wrmsr_safe(msr, value) });
        assert_eq!(result, Ok(()), "{msr:#x}");
        assert_eq!(faults, (0, 0), "{msr:#x}: no wrmsr ran (it would #GP here)");
        mock::assert_calls(&[set_segment_base(which, value)]);

        // The other write emitters take the same route, with the whole 64-bit value.
        let other = value ^ 0xffff_0000_0000_0fff;
        // SAFETY: as above.
        let (result, faults) = counting(|| unsafe { xenmsr::wrmsr_ns_safe(msr, other) });
        assert_eq!((result, faults), (Ok(()), (0, 0)), "{msr:#x}");
        // SAFETY: as above.
        let ((), faults) = counting(|| unsafe { xenmsr::wrmsr(msr, value) });
        assert_eq!(faults, (0, 0), "{msr:#x}");
        mock::assert_calls(&[
            set_segment_base(which, other),
            set_segment_base(which, value),
        ]);
    }
    // The constant-index write site (rax and edx:eax both carry the value) as well.
    let value = 0x0000_7ffe_0123_4567;
    // SAFETY: as above.
    let (result, faults) =
        counting(|| unsafe { xenmsr_asm::site::wrmsr_ns_const_safe::<MSR_GS_BASE>(value) });
    assert_eq!((result, faults), (Ok(()), (0, 0)));
    // Through the segment-base stub, which passes only the two arguments Xen reads
    // (`rdx`, `r10`, `r8` are whatever the caller had).
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].nr, calls[0].args[0], calls[0].args[1]),
        (nr::SET_SEGMENT_BASE, 2, value)
    );
    assert!(take_warnings().is_empty());
}

/// One unchecked FS-base write site, executed as often as asked.
#[inline(never)]
fn unchecked_fs_write(value: u64) {
    // SAFETY: the policy turns the write into a (mock) hypercall.
    unsafe { xenmsr::wrmsr(MSR_FS_BASE, value) }
}

#[test]
fn a_failing_hypercall_reaches_the_caller_through_the_rewind() {
    init();
    let _session = mock::session();
    let _ = take_warnings();
    mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
    let bad = 0x8000_0000_0000_0000;
    // SAFETY: the (mock) hypercall fails; the stub traps, the fixup rewinds to the site.
    let (result, faults) = counting(|| unsafe { xenmsr::wrmsr_safe(MSR_FS_BASE, bad) });
    assert_eq!(result, Err(MsrError::Hypercall(Errno::EINVAL)));
    assert_eq!(faults, (1, 0), "one ud2 (SIGILL) fixup, no #GP");
    mock::assert_calls(&[set_segment_base(0, bad)]);

    // Unchecked: the warn hook once for the kind of failure, execution continues.
    mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
    mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
    let (_, faults) = counting(|| {
        unchecked_fs_write(bad);
        unchecked_fs_write(bad + 1);
    });
    assert_eq!(faults, (2, 0));
    mock::assert_calls(&[set_segment_base(0, bad), set_segment_base(0, bad + 1)]);
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0];
    assert_eq!(
        (w.op, w.msr_or_counter, w.value, w.error),
        (
            AccessOp::Write,
            MSR_FS_BASE,
            bad,
            MsrError::Hypercall(Errno::EINVAL)
        )
    );
    // The site keeps working once the hypercall succeeds.
    unchecked_fs_write(0x1000);
    mock::assert_calls(&[set_segment_base(0, 0x1000)]);
    assert!(take_warnings().is_empty());
}

#[test]
fn syscall_msr_writes_are_ignored() {
    init();
    let _session = mock::session();
    for msr in [
        MSR_STAR,
        MSR_LSTAR,
        MSR_CSTAR,
        MSR_SYSCALL_MASK,
        MSR_SYSENTER_CS,
        MSR_SYSENTER_ESP,
        MSR_SYSENTER_EIP,
    ] {
        // SAFETY: the policy ignores the write; nothing runs.
        let (result, faults) =
            counting(|| unsafe { xenmsr::wrmsr_safe(msr, 0xffff_ffff_8000_0000) });
        assert_eq!((result, faults), (Ok(()), (0, 0)), "{msr:#x}");
        // SAFETY: as above.
        let ((), faults) = counting(|| unsafe { xenmsr::wrmsr(msr, 1) });
        assert_eq!(faults, (0, 0), "{msr:#x}");
        mock::assert_calls(&[]);
    }
    assert!(take_warnings().is_empty());
}

/// An MSR with no route and no PMU meaning: the policy says "native".
const UNROUTED: u32 = 0x10;

#[inline(never)]
fn unchecked_unrouted_read() -> u64 {
    // SAFETY: the stub's RDMSR faults in ring 3 and is fixed up.
    unsafe { xenmsr::rdmsr(UNROUTED) }
}

#[test]
fn an_unrouted_read_runs_the_stubs_rdmsr_which_faults() {
    init();
    let _session = mock::session();
    let _ = take_warnings();
    // SAFETY: "native": the stub's RDMSR raises #GP, reported at the call site.
    let (result, faults) = counting(|| unsafe { xenmsr::rdmsr_safe(UNROUTED) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1), "one #GP from the stub's rdmsr");
    // SAFETY: as above, through the constant-index site and the rax stub.
    let (result, faults) = counting(|| unsafe { xenmsr_asm::site::rdmsr_const_safe::<UNROUTED>() });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1));

    let (values, faults) = counting(|| [unchecked_unrouted_read(), unchecked_unrouted_read()]);
    assert_eq!(values, [0, 0]);
    assert_eq!(faults, (0, 2));
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        (
            warnings[0].op,
            warnings[0].msr_or_counter,
            warnings[0].error
        ),
        (AccessOp::Read, UNROUTED, GP)
    );
    mock::assert_calls(&[]);
}

#[test]
fn apic_base_read_faults_in_the_policys_native_read() {
    init();
    let _session = mock::session();
    // SAFETY: the policy's own raw RDMSR raises #GP (fixed up by its native site's entry),
    // the policy fails the access, and the stub's ud2 carries the error to the call site.
    let (result, faults) = counting(|| unsafe { xenmsr::rdmsr_safe(MSR_APIC_BASE) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (1, 1), "the policy's #GP, then the stub's ud2");
    mock::assert_calls(&[]);
}

/// A register state with every GPR distinct (and the upper halves of the inputs junk).
fn state(rcx: u64, rax: u64, rdx: u64) -> RegState {
    let mut state = RegState::default();
    for (i, reg) in state.input.iter_mut().enumerate() {
        *reg = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 0x11) ^ 0x8000_0000_0000_0000;
    }
    state.input[r::RCX] = rcx;
    state.input[r::RAX] = rax;
    state.input[r::RDX] = rdx;
    state.input[r::RSI] = 0;
    state
}

/// Every GPR but rsp (and the ones in `except`) came back as it went in.
fn assert_preserved(state: &RegState, except: &[usize], what: &str) {
    for (i, name) in xenmsr_host_tests::REG_NAMES.iter().enumerate() {
        if i == r::RSP || except.contains(&i) {
            continue;
        }
        assert_eq!(
            state.output[i], state.input[i],
            "{what}: {name} changed ({:#x} -> {:#x})",
            state.input[i], state.output[i]
        );
    }
    assert_eq!(state.rsp_after, state.rsp_before, "{what}: rsp");
}

#[test]
fn registers_survive_the_policy_on_success_and_failure() {
    init();
    let _session = mock::session();
    // rcx's upper half is junk: the MSR is ecx. The value is edx:eax.
    let rcx = 0xabcd_ef01_0000_0000 | u64::from(MSR_FS_BASE);
    let (lo, hi) = (0x1234_5000u32, 0x0000_7ffeu32);
    let value = u64::from(hi) << 32 | u64::from(lo);

    // Sites call the stubs on a 16-byte aligned stack (see regs_proptest.rs).
    {
        let misalign = false;
        // Success: the hypercall is made; every register is the caller's.
        let mut s = state(
            rcx,
            0x5555_0000_0000_0000 | u64::from(lo),
            0x6666_0000_0000_0000 | u64::from(hi),
        );
        call_stub_with_current_backend(Stub::Wrmsr, &mut s, misalign);
        assert_preserved(&s, &[], "write success");
        assert_eq!(s.output[r::RSI], 0);
        mock::assert_calls(&[set_segment_base(0, value)]);

        // Failure: the same, except the error register.
        mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
        let mut s = state(rcx, u64::from(lo), u64::from(hi));
        call_stub_with_current_backend(Stub::Wrmsr, &mut s, misalign);
        assert_preserved(&s, &[r::RSI], "write failure");
        assert_eq!(
            s.output[r::RSI],
            MsrError::Hypercall(Errno::EINVAL).to_code()
        );
        mock::assert_calls(&[set_segment_base(0, value)]);

        // A native read that faults: outputs zeroed, error in rsi, the rest intact.
        let mut s = state(u64::from(UNROUTED), 7, 8);
        call_stub_with_current_backend(Stub::Rdmsr, &mut s, misalign);
        assert_preserved(&s, &[r::RAX, r::RDX, r::RSI], "read fault");
        assert_eq!((s.output[r::RAX], s.output[r::RDX]), (0, 0));
        assert_eq!(s.output[r::RSI], GP.to_code());
    }
}

/// A constant-index FS_BASE write site, unchecked.
#[inline(never)]
fn unchecked_const_fs_write(value: u64) {
    // SAFETY: the write becomes a (mock) hypercall.
    unsafe { xenmsr_asm::site::wrmsr_ns_const::<MSR_FS_BASE>(value) }
}

/// A constant-index site patched to the segment-base stub: one hypercall, and a failure
/// taken through the same rewind path to the caller's own entry as every other stub.
#[test]
fn constant_segment_base_site_calls_the_hypercall_directly() {
    init();
    let _session = mock::session();
    let _ = take_warnings();
    let good = 0x0000_7fff_0000_1000;
    // SAFETY: the write becomes a (mock) hypercall.
    let (result, faults) =
        counting(|| unsafe { xenmsr_asm::site::wrmsr_ns_const_safe::<MSR_FS_BASE>(good) });
    assert_eq!((result, faults), (Ok(()), (0, 0)));
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].nr, calls[0].args[0], calls[0].args[1]),
        (nr::SET_SEGMENT_BASE, 0, good)
    );

    mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
    let bad = 0x8000_0000_0000_0000;
    // SAFETY: as above; the (mock) hypercall fails.
    let (result, faults) =
        counting(|| unsafe { xenmsr_asm::site::wrmsr_ns_const_safe::<MSR_KERNEL_GS_BASE>(bad) });
    assert_eq!(result, Err(MsrError::Hypercall(Errno::EINVAL)));
    assert_eq!(faults, (1, 0), "one #UD: the stub's rewind trap");
    let calls = mock::take_calls();
    assert_eq!((calls[0].args[0], calls[0].args[1]), (1, bad));

    // Unchecked: the failure is dropped, and warned once for its kind. (Kinds are
    // process-wide: the other tests here fail writes with EINVAL, so this one uses E2BIG.)
    for _ in 0..2 {
        mock::script_err(nr::SET_SEGMENT_BASE, Errno::E2BIG);
        let ((), faults) = counting(|| unchecked_const_fs_write(bad));
        assert_eq!(faults, (1, 0));
    }
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        (
            warnings[0].op,
            warnings[0].msr_or_counter,
            warnings[0].value,
            warnings[0].error
        ),
        (
            AccessOp::Write,
            MSR_FS_BASE,
            bad,
            MsrError::Hypercall(Errno::E2BIG)
        )
    );
}
