//! Every extable kind and every stub path, through the production emitters and the
//! production `fixup_exception`, with real ring-3 faults (#GP → SIGSEGV) and real `ud2`
//! traps (#UD → SIGILL).

use xenmsr_asm::fixup::AccessOp;
use xenmsr_asm::patch::{PatchOp, patch_sites};
use xenmsr_asm::{MsrError, Outcome, native, site};
use xenmsr_host_tests::{Op, calls, fixups, install, last_call, set_script, take_warnings};
use xenmsr_hypercall::Errno;

const GP: MsrError = MsrError::Fault { vector: 13 };

/// The errors a handler can fail with, one of each class.
fn handler_errors() -> [MsrError; 5] {
    [
        MsrError::Hypercall(Errno::EINVAL),
        MsrError::Hypercall(Errno(-7)),
        MsrError::PmuUnavailable,
        MsrError::InvalidCounter,
        MsrError::Fault { vector: 6 },
    ]
}

/// Runs `f` and returns its result with the (SIGILL, SIGSEGV) fixups it caused.
fn counting<T>(f: impl FnOnce() -> T) -> (T, (u64, u64)) {
    let (ill0, segv0) = fixups();
    let value = f();
    let (ill1, segv1) = fixups();
    (value, (ill1 - ill0, segv1 - segv0))
}

#[test]
fn read_safe_success_returns_value_and_passes_msr() {
    install();
    for (msr, value) in [
        (0x10u32, 0u64),
        (0xc000_0080, 0xdead_beef_0123_4567),
        (u32::MAX, u64::MAX),
    ] {
        set_script(Outcome::Done(value));
        // SAFETY: the scripted backend handles the read; no real MSR is touched.
        let (result, faults) = counting(|| unsafe { site::rdmsr_safe(msr) });
        assert_eq!(result, Ok(value));
        assert_eq!(faults, (0, 0));
        let call = last_call().expect("the backend was called");
        assert_eq!((call.op, call.msr), (Op::Read, msr));
    }
}

#[test]
fn read_safe_handler_failure_rewinds_to_the_callers_entry_with_the_exact_error() {
    install();
    for error in handler_errors() {
        set_script(Outcome::Failed(error));
        // SAFETY: the backend fails the read; the stub traps and the fixup rewinds.
        let (result, faults) = counting(|| unsafe { site::rdmsr_safe(0x1b) });
        assert_eq!(result, Err(error));
        assert_eq!(faults, (1, 0), "one ud2 (SIGILL) fixup, no #GP");
    }
}

#[test]
fn read_safe_native_fault_inside_the_stub_is_gp_at_the_call_site() {
    install();
    set_script(Outcome::Native);
    let before = calls();
    // SAFETY: the backend says "native"; the stub's RDMSR raises #GP in ring 3.
    let (result, faults) = counting(|| unsafe { site::rdmsr_safe(0x10) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1), "one #GP (SIGSEGV) fixup");
    assert_eq!(calls(), before + 1);
}

#[test]
fn write_safe_success_passes_the_whole_value() {
    install();
    for (msr, value) in [
        (0xc000_0100u32, 0x0000_7fff_1234_5678u64),
        (0x174, u64::MAX),
        (1, 0),
    ] {
        set_script(Outcome::Done(0));
        // SAFETY: the scripted backend handles the write.
        let (result, faults) = counting(|| unsafe { site::wrmsr_safe(msr, value) });
        assert_eq!(result, Ok(()));
        assert_eq!(faults, (0, 0));
        let call = last_call().expect("the backend was called");
        assert_eq!((call.op, call.msr, call.value), (Op::Write, msr, value));
        // SAFETY: as above.
        let result = unsafe { site::wrmsr_ns_safe(msr, value) };
        assert_eq!(result, Ok(()));
        let call = last_call().expect("the backend was called");
        assert_eq!((call.op, call.msr, call.value), (Op::Write, msr, value));
    }
}

#[test]
fn write_safe_failures() {
    install();
    for error in handler_errors() {
        set_script(Outcome::Failed(error));
        // SAFETY: the backend fails the write; the stub traps, the fixup rewinds.
        let (result, faults) = counting(|| unsafe { site::wrmsr_safe(0xc000_0101, 42) });
        assert_eq!(result, Err(error));
        assert_eq!(faults, (1, 0));
        // SAFETY: as above.
        let result = unsafe { site::wrmsr_ns_safe(0xc000_0101, 42) };
        assert_eq!(result, Err(error));
    }
    set_script(Outcome::Native);
    // SAFETY: "native": the stub's WRMSR raises #GP in ring 3.
    let (result, faults) = counting(|| unsafe { site::wrmsr_safe(0x10, 1) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1));
    // SAFETY: as above.
    assert_eq!(unsafe { site::wrmsr_ns_safe(0x10, 1) }, Err(GP));
}

#[test]
fn rdpmc_safe_paths() {
    install();
    set_script(Outcome::Done(0x1234_5678_9abc));
    // SAFETY: the scripted backend handles the read.
    assert_eq!(unsafe { site::rdpmc_safe(1 << 30) }, Ok(0x1234_5678_9abc));
    let call = last_call().expect("the backend was called");
    assert_eq!((call.op, call.msr), (Op::Rdpmc, 1 << 30));
    for error in handler_errors() {
        set_script(Outcome::Failed(error));
        // SAFETY: the backend fails; the stub traps, the fixup rewinds.
        let (result, faults) = counting(|| unsafe { site::rdpmc_safe(0) });
        assert_eq!(result, Err(error));
        assert_eq!(faults, (1, 0));
    }
    // "Native": the stub executes RDPMC. Whether ring 3 may do that depends on CR4.PCE on
    // this host, so compare with the raw instruction at a never-patched site.
    let probe = xenmsr_host_tests::native_rdpmc_probe(0);
    set_script(Outcome::Native);
    // SAFETY: the stub's RDPMC either runs or raises #GP, which the fixup reports.
    let (result, faults) = counting(|| unsafe { site::rdpmc_safe(0) });
    match probe {
        Err(e) => {
            assert_eq!(e, GP);
            assert_eq!(result, Err(GP));
            assert_eq!(faults, (0, 1));
        }
        Ok(_) => {
            eprintln!("note: this host allows RDPMC in ring 3 (CR4.PCE set)");
            assert!(result.is_ok());
            assert_eq!(faults, (0, 0));
        }
    }
}

#[test]
fn native_sites_fault_with_gp() {
    install();
    let before = calls();
    // SAFETY: a real RDMSR in ring 3 raises #GP; the READ_SAFE entry turns it into Err.
    let (result, faults) = counting(|| unsafe { native::rdmsr_safe(0x1b) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1));
    // SAFETY: as above, WRITE_SAFE.
    let (result, faults) = counting(|| unsafe { native::wrmsr_safe(0x1b, 0xfee0_0900) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1));
    assert_eq!(calls(), before, "native sites never reach the backend");
}

/// One unchecked read site, executed as often as asked.
#[inline(never)]
fn unchecked_read_site(msr: u32) -> u64 {
    // SAFETY: the tests script the backend; a "native" read faults and is fixed up.
    unsafe { site::rdmsr(msr) }
}

/// A second site doing exactly what `unchecked_read_site` does.
#[inline(never)]
fn unchecked_read_site_copy(msr: u32) -> u64 {
    std::hint::black_box(1);
    // SAFETY: as above.
    unsafe { site::rdmsr(msr) }
}

#[inline(never)]
fn unchecked_write_site(msr: u32, value: u64) {
    // SAFETY: as above.
    unsafe { site::wrmsr(msr, value) }
}

#[inline(never)]
fn unchecked_write_ns_site(msr: u32, value: u64) {
    // SAFETY: as above.
    unsafe { site::wrmsr_ns(msr, value) }
}

#[inline(never)]
fn unchecked_rdpmc_site(counter: u32) -> u64 {
    // SAFETY: as above.
    unsafe { site::rdpmc(counter) }
}

fn site_of(op: PatchOp, addr: usize) -> bool {
    patch_sites().any(|s| s.addr == addr && s.op == Some(op))
}

#[test]
fn unchecked_variants_warn_once_per_kind_give_zero_and_continue() {
    install();
    let _ = take_warnings();

    // Success first: values flow.
    set_script(Outcome::Done(0x55aa));
    assert_eq!(unchecked_read_site(0x8b), 0x55aa);
    assert_eq!(unchecked_rdpmc_site(3), 0x55aa);

    // Failure from the handler: value 0, one warning for the first failure of its kind.
    // (Kinds are process-wide: each test of this file fails with errors of its own.)
    let error = MsrError::Hypercall(Errno::EMLINK);
    set_script(Outcome::Failed(error));
    let (values, faults) = counting(|| [unchecked_read_site(0x8b), unchecked_read_site(0x8b)]);
    assert_eq!(values, [0, 0]);
    assert_eq!(faults, (2, 0), "each failure trapped and was fixed up");
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "one warning per kind: {warnings:?}");
    let w = warnings[0];
    assert_eq!(
        (w.op, w.msr_or_counter, w.value, w.error),
        (AccessOp::Read, 0x8b, 0, error)
    );
    assert!(
        site_of(PatchOp::Read, w.site),
        "the warning names the call site"
    );

    // The same failure at another site (what an unrolled loop or an inlined helper makes
    // of one source line), and on another MSR: the same kind, no second warning.
    assert_eq!(unchecked_read_site_copy(0x8b), 0);
    assert_eq!(unchecked_read_site(0x8c), 0);
    assert!(take_warnings().is_empty(), "the same kind again");

    // Another error for a read is another kind: it warns.
    let other = MsrError::Hypercall(Errno::EDOM);
    set_script(Outcome::Failed(other));
    assert_eq!(unchecked_read_site(0x8b), 0);
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].error, other);

    // Writes: the warning carries the value; execution continues after the site. A write
    // failing as a read did is a new kind.
    set_script(Outcome::Failed(other));
    let (_, faults) = counting(|| {
        unchecked_write_site(0x8b, 0x1111_2222_3333_4444);
        unchecked_write_site(0x8b, 5);
    });
    assert_eq!(faults, (2, 0));
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1);
    let w = warnings[0];
    assert_eq!(
        (w.op, w.msr_or_counter, w.value, w.error),
        (AccessOp::Write, 0x8b, 0x1111_2222_3333_4444, other)
    );
    assert!(site_of(PatchOp::Write, w.site));

    set_script(Outcome::Failed(MsrError::PmuUnavailable));
    unchecked_write_ns_site(0x38f, 7);
    unchecked_write_ns_site(0x38f, 8);
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1);
    assert_eq!(
        (warnings[0].op, warnings[0].value, warnings[0].error),
        (AccessOp::Write, 7, MsrError::PmuUnavailable)
    );
    assert!(site_of(PatchOp::WriteNs, warnings[0].site));

    set_script(Outcome::Failed(MsrError::InvalidCounter));
    assert_eq!(unchecked_rdpmc_site(9), 0);
    assert_eq!(unchecked_rdpmc_site(9), 0);
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1);
    assert_eq!(
        (
            warnings[0].op,
            warnings[0].msr_or_counter,
            warnings[0].error
        ),
        (AccessOp::Rdpmc, 9, MsrError::InvalidCounter)
    );
    assert!(site_of(PatchOp::Rdpmc, warnings[0].site));
}

#[test]
fn two_kinds_warn_separately() {
    install();
    let _ = take_warnings();
    // Two distinct inlined sites (each `site::rdmsr` call expands its own region), failing
    // with two different errors: two kinds, two warnings.
    set_script(Outcome::Failed(MsrError::Hypercall(Errno::ENODEV)));
    // SAFETY: the backend fails both reads; the fixup gives 0.
    let a = unsafe { site::rdmsr(0x300) };
    set_script(Outcome::Failed(MsrError::Hypercall(Errno::EXDEV)));
    // SAFETY: as above.
    let b = unsafe { site::rdmsr(0x301) };
    assert_eq!((a, b), (0, 0));
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_ne!(warnings[0].site, warnings[1].site);
}

/// The constant index of the constant-index sites below.
const CONST_MSR: u32 = 0xc000_0103;

#[inline(never)]
fn unchecked_read_const_site() -> u64 {
    // SAFETY: the tests script the backend; a "native" read faults and is fixed up.
    unsafe { site::rdmsr_const::<CONST_MSR>() }
}

#[inline(never)]
fn unchecked_write_const_site(value: u64) {
    // SAFETY: as above.
    unsafe { site::wrmsr_ns_const::<CONST_MSR>(value) }
}

#[test]
fn constant_index_sites_through_the_stubs() {
    install();
    let _ = take_warnings();
    // Success: the whole 64-bit value comes back in rax; the MSR is the constant.
    for value in [0u64, 0xdead_beef_0123_4567, u64::MAX] {
        set_script(Outcome::Done(value));
        // SAFETY: the scripted backend handles the read.
        let (result, faults) = counting(|| unsafe { site::rdmsr_const_safe::<CONST_MSR>() });
        assert_eq!(result, Ok(value));
        assert_eq!(faults, (0, 0));
        let call = last_call().expect("the backend was called");
        assert_eq!((call.op, call.msr), (Op::Read, CONST_MSR));
        assert_eq!(unchecked_read_const_site(), value);

        set_script(Outcome::Done(0));
        // SAFETY: the scripted backend handles the write.
        let result = unsafe { site::wrmsr_ns_const_safe::<CONST_MSR>(value) };
        assert_eq!(result, Ok(()));
        let call = last_call().expect("the backend was called");
        assert_eq!(
            (call.op, call.msr, call.value),
            (Op::Write, CONST_MSR, value),
            "the stub gets edx:eax = the whole value"
        );
    }
    // Handler failure: the exact error, through the rewind to the site's own entry.
    for error in handler_errors() {
        set_script(Outcome::Failed(error));
        // SAFETY: the backend fails the read; the stub traps and the fixup rewinds.
        let (result, faults) = counting(|| unsafe { site::rdmsr_const_safe::<CONST_MSR>() });
        assert_eq!(result, Err(error));
        assert_eq!(faults, (1, 0));
        // SAFETY: as above, for the write.
        let (result, faults) =
            counting(|| unsafe { site::wrmsr_ns_const_safe::<CONST_MSR>(0x1_0000_0002) });
        assert_eq!(result, Err(error));
        assert_eq!(faults, (1, 0));
    }
    // Native: the stub's own instruction faults in ring 3, reported at the call site.
    set_script(Outcome::Native);
    // SAFETY: the stub's RDMSR raises #GP; the fixup rewinds and zeroes rax.
    let (result, faults) = counting(|| unsafe { site::rdmsr_const_safe::<CONST_MSR>() });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1));
    // SAFETY: the stub's WRMSR raises #GP.
    let (result, faults) = counting(|| unsafe { site::wrmsr_ns_const_safe::<CONST_MSR>(3) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1));

    // Unchecked: 0, one warning per kind, the value of a write is edx:eax = the value.
    let _ = take_warnings();
    let error = MsrError::Hypercall(Errno::EPERM);
    set_script(Outcome::Failed(error));
    assert_eq!(unchecked_read_const_site(), 0);
    assert_eq!(unchecked_read_const_site(), 0);
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0];
    assert_eq!(
        (w.op, w.msr_or_counter, w.value, w.error),
        (AccessOp::Read, CONST_MSR, 0, error)
    );
    assert!(site_of(PatchOp::ReadImm, w.site));

    set_script(Outcome::Native);
    let (_, faults) = counting(|| {
        unchecked_write_const_site(0x8765_4321_0fed_cba9);
        unchecked_write_const_site(1);
    });
    assert_eq!(faults, (0, 2));
    let warnings = take_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = warnings[0];
    assert_eq!(
        (w.op, w.msr_or_counter, w.value, w.error),
        (AccessOp::Write, CONST_MSR, 0x8765_4321_0fed_cba9, GP)
    );
    assert!(site_of(PatchOp::WriteImm, w.site));
}
