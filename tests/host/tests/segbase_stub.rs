//! The segment-base stubs (the Xen PV variant of constant-index FS/GS/KERNEL_GS base
//! writes) against the mock hypercall page: exactly one `set_segment_base` with the right
//! `which` and the full value, every register preserved, and a hypercall error reported
//! through the rewind path to the caller's write-safe entry.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use xenmsr_asm::MsrError;
use xenmsr_asm::stubs::{self, Stub};
use xenmsr_host_tests::{
    REG_NAMES, RegState, call_stub_with_current_backend, fixups, install_fault_handlers, r,
};
use xenmsr_hypercall::{Errno, mock, nr};

fn cases() -> u32 {
    std::env::var("XENMSR_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn which(stub: Stub) -> u64 {
    match stub {
        Stub::SegbaseFs => 0,
        Stub::SegbaseGsKernel => 2,
        Stub::SegbaseGsUser => 1,
        other => panic!("{other:?} is no segment-base stub"),
    }
}

const ERRNOS: [Errno; 6] = [
    Errno::EINVAL,
    Errno::ENOSYS,
    Errno::EPERM,
    Errno::EFAULT,
    Errno::EBUSY,
    Errno(4095),
];

fn setup() {
    install_fault_handlers();
    // SAFETY: a test over the mock page: nothing here relies on a segment-base write
    // reaching a base (the mock only records the call).
    unsafe { stubs::set_segbase_hypercall_page(mock::page()) };
    assert!(stubs::segbase_stubs_ready());
}

fn check(
    stub: Stub,
    input: [u64; 16],
    error: Option<Errno>,
    misalign: bool,
) -> Result<(), TestCaseError> {
    mock::reset();
    if let Some(errno) = error {
        mock::script_err(nr::SET_SEGMENT_BASE, errno);
    }
    let mut state = RegState {
        input,
        ..RegState::default()
    };
    let (ill0, segv0) = fixups();
    call_stub_with_current_backend(stub, &mut state, misalign);
    let (ill1, segv1) = fixups();
    let calls = mock::take_calls();
    prop_assert_eq!(calls.len(), 1, "hypercalls: {:?}", calls);
    prop_assert_eq!(calls[0].nr, nr::SET_SEGMENT_BASE);
    prop_assert_eq!(calls[0].args[0], which(stub), "which");
    prop_assert_eq!(
        calls[0].args[1],
        input[r::RAX],
        "the full 64-bit base from rax"
    );
    prop_assert_eq!(state.rsp_after, state.rsp_before, "rsp changed");
    match error {
        None => prop_assert_eq!((ill1 - ill0, segv1 - segv0), (0, 0)),
        Some(errno) => {
            // One #UD (the stub's rewind trap), fixed up by the caller's write-safe entry
            // with the exact error in rsi.
            prop_assert_eq!((ill1 - ill0, segv1 - segv0), (1, 0));
            prop_assert_eq!(
                state.output[r::RSI],
                MsrError::Hypercall(errno).to_code(),
                "error register"
            );
        }
    }
    for reg in 0..16 {
        if reg == r::RSP || (reg == r::RSI && error.is_some()) {
            continue;
        }
        prop_assert_eq!(state.output[reg], input[reg], "{} changed", REG_NAMES[reg]);
    }
    Ok(())
}

fn run(stub: Stub, fail: bool) {
    setup();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (any::<[u64; 16]>(), 0..ERRNOS.len(), any::<bool>());
    runner
        .run(&strategy, |(regs, e, misalign)| {
            check(stub, regs, fail.then_some(ERRNOS[e]), misalign)
        })
        .unwrap();
    eprintln!("{stub:?} fail={fail}: {} cases passed", cases());
}

#[test]
fn fs_success() {
    run(Stub::SegbaseFs, false);
}

#[test]
fn fs_hypercall_error() {
    run(Stub::SegbaseFs, true);
}

#[test]
fn gs_kernel_success() {
    run(Stub::SegbaseGsKernel, false);
}

#[test]
fn gs_kernel_hypercall_error() {
    run(Stub::SegbaseGsKernel, true);
}

#[test]
fn gs_user_success() {
    run(Stub::SegbaseGsUser, false);
}

#[test]
fn gs_user_hypercall_error() {
    run(Stub::SegbaseGsUser, true);
}
