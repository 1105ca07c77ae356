//! Register preservation as a property: for every stub and every path through the policy
//! (success, native-instruction fault, handler failure), random values in every GPR except
//! rsp, a call exactly as a site makes it (16-byte aligned), and a check of every register
//! afterwards. (The filter and segment-base fast paths: `fastpath_stubs.rs`.)
//!
//! Cases per stub and path: `XENMSR_PROPTEST_CASES` (default 10000).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use xenmsr_asm::stubs::Stub;
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_host_tests::{
    Op, REG_NAMES, RegState, call_stub, fixups, install, last_call, native_rdpmc_probe, r,
    set_script,
};
use xenmsr_hypercall::Errno;

fn cases() -> u32 {
    std::env::var("XENMSR_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Success,
    NativeFault,
    Failure,
}

fn error_strategy() -> impl Strategy<Value = MsrError> {
    prop_oneof![
        any::<i32>().prop_map(|e| MsrError::Hypercall(Errno(e))),
        Just(MsrError::PmuUnavailable),
        Just(MsrError::InvalidCounter),
        any::<u8>().prop_map(|vector| MsrError::Fault { vector }),
    ]
}

/// Registers the stub may change on this path (beyond rsi, checked separately).
fn outputs(stub: Stub, path: Path) -> &'static [usize] {
    match (stub, path) {
        (Stub::Wrmsr, _) => &[],
        _ => &[r::RAX, r::RDX],
    }
}

fn check(
    stub: Stub,
    path: Path,
    regs: [u64; 16],
    value: u64,
    error: MsrError,
    misalign: bool,
) -> Result<(), TestCaseError> {
    let mut input = regs;
    input[r::RSP] = 0;
    let rdpmc_runs = stub == Stub::Rdpmc && native_rdpmc_probe(0).is_ok();
    set_script(match path {
        Path::Success => Outcome::Done(value),
        Path::NativeFault => Outcome::Native,
        Path::Failure => Outcome::Failed(error),
    });
    let mut state = RegState {
        input,
        ..RegState::default()
    };
    let (ill0, segv0) = fixups();
    call_stub(stub, &mut state, misalign);
    let (ill1, segv1) = fixups();
    let out = state.output;

    prop_assert_eq!(state.rsp_after, state.rsp_before, "rsp changed");

    // The handler saw the site's inputs, on an aligned stack.
    let call = last_call().ok_or_else(|| TestCaseError::fail("handler not called"))?;
    let (op, seen_value) = match stub {
        Stub::Rdmsr | Stub::RdmsrRax => (Op::Read, 0),
        Stub::Rdpmc => (Op::Rdpmc, 0),
        Stub::Wrmsr => (
            Op::Write,
            (input[r::RDX] & 0xffff_ffff) << 32 | input[r::RAX] & 0xffff_ffff,
        ),
        Stub::SegbaseFs | Stub::SegbaseGsKernel | Stub::SegbaseGsUser => {
            unreachable!("the segment-base stubs ask no backend: see segbase_stub.rs")
        }
    };
    prop_assert_eq!(call.op, op);
    prop_assert_eq!(call.msr, input[r::RCX] as u32);
    prop_assert_eq!(call.value, seen_value);
    prop_assert_eq!(call.rsp_mod_16, 0, "handler ran on a misaligned stack");

    // Which fault, if any, was fixed up.
    let expected_faults = match path {
        Path::Success => (0, 0),
        Path::NativeFault if rdpmc_runs => (0, 0),
        Path::NativeFault => (0, 1),
        Path::Failure => (1, 0),
    };
    prop_assert_eq!((ill1 - ill0, segv1 - segv0), expected_faults);

    // Outputs.
    let faulted = expected_faults != (0, 0);
    let expected_error = match path {
        Path::Failure => error.to_code(),
        _ => MsrError::Fault { vector: 13 }.to_code(),
    };
    if faulted {
        prop_assert_eq!(out[r::RSI], expected_error, "error register");
        match stub {
            // WRITE_SAFE: no outputs; rax and rdx are checked as preserved below.
            Stub::Wrmsr => {}
            // RAX_CONTRACT: the fixup zeroes rax; rdx is a clobbered output of the stub.
            Stub::RdmsrRax => prop_assert_eq!(out[r::RAX], 0),
            _ => {
                prop_assert_eq!(out[r::RAX], 0);
                prop_assert_eq!(out[r::RDX], 0);
            }
        }
    } else if path == Path::Success {
        match stub {
            Stub::Rdmsr | Stub::Rdpmc => {
                prop_assert_eq!(out[r::RAX], value & 0xffff_ffff);
                prop_assert_eq!(out[r::RDX], value >> 32);
            }
            Stub::RdmsrRax => {
                prop_assert_eq!(out[r::RAX], value);
                prop_assert_eq!(out[r::RDX], value >> 32);
            }
            Stub::Wrmsr | Stub::SegbaseFs | Stub::SegbaseGsKernel | Stub::SegbaseGsUser => {}
        }
    }

    // Everything else is exactly as loaded.
    let outs = outputs(stub, path);
    for reg in 0..16 {
        if reg == r::RSP || outs.contains(&reg) || (reg == r::RSI && faulted) {
            continue;
        }
        if rdpmc_runs && path == Path::NativeFault && (reg == r::RAX || reg == r::RDX) {
            continue;
        }
        prop_assert_eq!(out[reg], input[reg], "{} changed", REG_NAMES[reg]);
    }
    Ok(())
}

fn run(stub: Stub, path: Path) {
    install();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    // Always an aligned call: every site is inside an `asm!` block without `nostack`,
    // which guarantees a 16-byte aligned rsp at the `call`, and the policy stubs rely on
    // it (`sites_are_emitted_on_an_aligned_stack` in sites.rs checks the emitters).
    let strategy = (any::<[u64; 16]>(), any::<u64>(), error_strategy());
    runner
        .run(&strategy, |(regs, value, error)| {
            check(stub, path, regs, value, error, false)
        })
        .unwrap();
    eprintln!("{stub:?} {path:?}: {} cases passed", cases());
}

#[test]
fn rdmsr_success() {
    run(Stub::Rdmsr, Path::Success);
}
#[test]
fn rdmsr_native_fault() {
    run(Stub::Rdmsr, Path::NativeFault);
}
#[test]
fn rdmsr_failure() {
    run(Stub::Rdmsr, Path::Failure);
}
#[test]
fn wrmsr_success() {
    run(Stub::Wrmsr, Path::Success);
}
#[test]
fn wrmsr_native_fault() {
    run(Stub::Wrmsr, Path::NativeFault);
}
#[test]
fn wrmsr_failure() {
    run(Stub::Wrmsr, Path::Failure);
}
#[test]
fn rdpmc_success() {
    run(Stub::Rdpmc, Path::Success);
}
#[test]
fn rdpmc_native_fault() {
    run(Stub::Rdpmc, Path::NativeFault);
}
#[test]
fn rdpmc_failure() {
    run(Stub::Rdpmc, Path::Failure);
}
#[test]
fn rdmsr_rax_success() {
    run(Stub::RdmsrRax, Path::Success);
}
#[test]
fn rdmsr_rax_native_fault() {
    run(Stub::RdmsrRax, Path::NativeFault);
}
#[test]
fn rdmsr_rax_failure() {
    run(Stub::RdmsrRax, Path::Failure);
}

/// The harness itself must notice a clobbered register, or the properties above prove
/// nothing: a stub-shaped call that does clobber (the native fixup's error register) is
/// caught by the same comparison.
#[test]
fn harness_detects_a_changed_register() {
    install();
    set_script(Outcome::Native);
    let mut state = RegState {
        input: [0x1111; 16],
        ..RegState::default()
    };
    call_stub(Stub::Rdmsr, &mut state, false);
    assert_ne!(
        state.output[r::RSI],
        state.input[r::RSI],
        "the fixup wrote rsi"
    );
    assert_eq!(state.output[r::RBX], 0x1111);
    assert_eq!(state.output[8], 0x1111);
}
