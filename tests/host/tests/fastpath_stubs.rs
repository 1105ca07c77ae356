//! The stubs' fast paths, which decide without Rust: the read stub's filter (pass-through
//! reads execute RDMSR at once; FS/GS reads use RDFSBASE/RDGSBASE), and the write stub's
//! segment-base paths (the hypercall page called directly, or WRFSBASE/WRGSBASE). Real
//! ring-3 instructions: RDMSR faults (#GP, fixed up), and this host's Linux lets user space
//! use RDFSBASE and friends (CR4.FSGSBASE), which the tests check first.
//!
//! The filter and the switches are process-wide, so the tests here take one lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use xenmsr_asm::fastpath::{
    FilterError, ReadFilter, ReadKind, divert_all_reads, install_read_filter, read_filter_lookup,
    set_fsgsbase_enabled, slot_of,
};
use xenmsr_asm::stubs::{Stub, set_segbase_hypercall_page};
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_host_tests::{
    RegState, call_stub_with_current_backend, calls, fixups, install, r, set_script,
};
use xenmsr_hypercall::{Errno, mock, nr};

static LOCK: Mutex<()> = Mutex::new(());

const MSR_APIC_BASE: u32 = 0x1b;
const MSR_TSC: u32 = 0x10;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const GP: MsrError = MsrError::Fault { vector: 13 };

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this host lets user space run RDFSBASE and friends.
fn host_has_fsgsbase() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "fsgsbase"))
}

fn rdgsbase() -> u64 {
    let v: u64;
    // SAFETY: reads the user GS base (unused by Rust and glibc on x86-64 Linux).
    unsafe { core::arch::asm!("rdgsbase {}", out(reg) v, options(nomem, nostack)) };
    v
}

fn wrgsbase(v: u64) {
    // SAFETY: the user GS base is unused by Rust and glibc on x86-64 Linux.
    unsafe { core::arch::asm!("wrgsbase {}", in(reg) v, options(nomem, nostack)) };
}

fn rdfsbase() -> u64 {
    let v: u64;
    // SAFETY: reads this thread's FS base.
    unsafe { core::arch::asm!("rdfsbase {}", out(reg) v, options(nomem, nostack)) };
    v
}

/// Builds the filter of `keys` (kept for the process's life, as an installed filter must
/// be) and makes the read stub use it.
fn publish(keys: &[(u32, ReadKind)]) -> &'static ReadFilter {
    for &(msr, kind) in keys {
        let by_instruction = match kind {
            ReadKind::Policy => continue,
            ReadKind::RdFsBase => msr == MSR_FS_BASE,
            ReadKind::RdGsBase => msr == MSR_GS_BASE,
        };
        assert!(
            by_instruction && host_has_fsgsbase(),
            "{msr:#x}: {kind:?} outside install_read_filter's contract"
        );
    }
    let filter: &'static ReadFilter = Box::leak(Box::new(ReadFilter::new(keys).unwrap()));
    // SAFETY: the scripted test backend needs no read (nothing in this process relies on
    // an MSR's real value: ring 3 cannot read one), and the loop above checked that only
    // FS_BASE/GS_BASE read by instruction, on a host whose Linux sets CR4.FSGSBASE.
    unsafe { install_read_filter(filter) };
    filter
}

/// A state with recognisable values in every GPR and `msr` in rcx, `value` in edx:eax.
fn state(msr: u32, value: u64) -> RegState {
    let mut input = [0u64; 16];
    for (i, reg) in input.iter_mut().enumerate() {
        *reg = (0x0100_0000_0000_0000 * (i as u64 + 1)) | 0x77;
    }
    input[r::RCX] = 0xabcd_0000_0000_0000 | u64::from(msr);
    input[r::RAX] = 0x5a5a_0000_0000_0000 | (value & 0xffff_ffff);
    input[r::RDX] = 0xa5a5_0000_0000_0000 | (value >> 32);
    input[r::RSP] = 0;
    RegState {
        input,
        ..RegState::default()
    }
}

/// Every register but `changed` (and rsp) came back as it went in.
fn assert_preserved(s: &RegState, changed: &[usize], what: &str) {
    assert_eq!(s.rsp_after, s.rsp_before, "{what}: rsp");
    for reg in 0..16 {
        if reg == r::RSP || changed.contains(&reg) {
            continue;
        }
        assert_eq!(
            s.output[reg], s.input[reg],
            "{what}: register {reg} changed"
        );
    }
}

#[test]
fn filter_passes_reads_through_without_the_policy() {
    let _l = lock();
    install();
    set_script(Outcome::Done(0xfee0_0900));
    publish(&[(MSR_APIC_BASE, ReadKind::Policy)]);

    // A filtered MSR goes to the policy.
    let before = calls();
    let mut s = state(MSR_APIC_BASE, 0);
    call_stub_with_current_backend(Stub::Rdmsr, &mut s, false);
    assert_eq!(calls() - before, 1, "the policy answered APIC_BASE");
    assert_eq!((s.output[r::RAX], s.output[r::RDX]), (0xfee0_0900, 0));
    assert_preserved(&s, &[r::RAX, r::RDX], "policy read");

    // Any other MSR: RDMSR at once, which #GPs in ring 3 and reaches the caller's entry
    // as the native instruction's fault; the policy is not asked.
    for msr in [MSR_TSC, 0, 0x1234_5678, u32::MAX, MSR_APIC_BASE + 1] {
        let before = calls();
        let (_, segv0) = fixups();
        let mut s = state(msr, 0);
        call_stub_with_current_backend(Stub::Rdmsr, &mut s, false);
        assert_eq!(calls(), before, "{msr:#x}: the policy was asked");
        assert_eq!(fixups().1 - segv0, 1, "{msr:#x}: one #GP");
        assert_eq!(s.output[r::RSI], GP.to_code(), "{msr:#x}");
        assert_eq!((s.output[r::RAX], s.output[r::RDX]), (0, 0));
        assert_preserved(&s, &[r::RAX, r::RDX, r::RSI], "pass-through read");
        assert_eq!(read_filter_lookup(msr), None);
    }
    assert_eq!(read_filter_lookup(MSR_APIC_BASE), Some(ReadKind::Policy));
}

#[test]
fn filter_lookup_is_exact_for_random_key_sets() {
    let _l = lock();
    install();
    let mut runner = TestRunner::new(Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                proptest::collection::hash_set(any::<u32>(), 0..64),
                proptest::collection::vec(any::<u32>(), 64),
            ),
            |(keys, probes)| {
                let keys: Vec<(u32, ReadKind)> =
                    keys.into_iter().map(|k| (k, ReadKind::Policy)).collect();
                let filter = ReadFilter::new(&keys).unwrap();
                for &(k, _) in &keys {
                    prop_assert_eq!(filter.lookup(k), Some(ReadKind::Policy));
                }
                for p in probes {
                    let expected = keys
                        .iter()
                        .any(|&(k, _)| k == p)
                        .then_some(ReadKind::Policy);
                    prop_assert_eq!(filter.lookup(p), expected);
                }
                let mut listed: Vec<u32> = filter.keys().map(|(k, _)| k).collect();
                let mut wanted: Vec<u32> = keys.iter().map(|&(k, _)| k).collect();
                listed.sort_unstable();
                wanted.sort_unstable();
                prop_assert_eq!(listed, wanted);
                Ok(())
            },
        )
        .unwrap();
}

/// A filter that cannot be built is an error (`init` then leaves every read diverted to
/// the policy, as `set_backend` left it), and a diverted read stub asks the policy about
/// every read.
#[test]
fn a_filter_that_cannot_be_built_is_refused_and_a_diverted_stub_asks_the_policy() {
    let _l = lock();
    install();
    set_script(Outcome::Done(5));
    let too_many: Vec<(u32, ReadKind)> = (0..65).map(|k| (k, ReadKind::Policy)).collect();
    assert_eq!(
        ReadFilter::new(&too_many).map(drop),
        Err(FilterError::TooManyKeys(65))
    );
    assert_eq!(
        ReadFilter::new(&[(7, ReadKind::Policy), (7, ReadKind::RdFsBase)]).map(drop),
        Err(FilterError::DuplicateKey(7))
    );
    divert_all_reads();
    assert_eq!(read_filter_lookup(MSR_TSC), Some(ReadKind::Policy));
    let before = calls();
    let mut s = state(MSR_TSC, 0);
    call_stub_with_current_backend(Stub::Rdmsr, &mut s, false);
    assert_eq!(calls() - before, 1, "the policy answered");
    assert_eq!(s.output[r::RAX], 5);
}

/// Filters published while other threads read through the real stub: every read answers
/// from one whole filter. Both filters hold the same keys (plus one of their own, chosen
/// to collide under the first filter's multiplier, so the second needs another and the
/// shared keys sit in other slots), so a read that took the
/// multiplier of one filter and the keys of the other would miss a shared key and execute
/// RDMSR (a `#GP` here) instead of asking the policy. With FSGSBASE on the host, FS_BASE
/// is a shared key read with RDFSBASE in both, so a kind taken from the wrong slot would
/// send it to the policy.
#[test]
fn a_reinstall_racing_reads_answers_from_one_whole_filter() {
    const READERS: usize = 2;
    const READS: usize = 50_000;
    const ANSWER: u64 = 0x0123_4567_89ab_cdef;
    let _l = lock();
    install();
    let fsgsbase = host_has_fsgsbase();
    let mut shared: Vec<(u32, ReadKind)> = (0..40u32)
        .map(|i| (0x0000_0200 + 0x1001 * i, ReadKind::Policy))
        .collect();
    if fsgsbase {
        shared.push((MSR_FS_BASE, ReadKind::RdFsBase));
    }
    let with = |extra: u32| {
        let mut keys = shared.clone();
        keys.push((extra, ReadKind::Policy));
        keys
    };
    let a = publish(&with(0x4000_0000));
    let taken = slot_of(shared[0].0, a.multiplier());
    let colliding = (0x4000_0001..)
        .find(|&msr| slot_of(msr, a.multiplier()) == taken)
        .expect("a colliding key");
    let b = publish(&with(colliding));
    assert_ne!(a.multiplier(), b.multiplier(), "the two filters hash alike");
    let moved = shared
        .iter()
        .filter(|&&(msr, _)| slot_of(msr, a.multiplier()) != slot_of(msr, b.multiplier()))
        .count();
    assert!(moved > shared.len() / 2, "only {moved} shared keys moved");

    let stop = AtomicBool::new(false);
    let start = Barrier::new(READERS + 1);
    let swaps = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..READERS)
            .map(|t| {
                let (shared, start) = (&shared, &start);
                scope.spawn(move || {
                    set_script(Outcome::Done(ANSWER));
                    start.wait();
                    let fs_base = rdfsbase_if(fsgsbase);
                    for i in 0..READS {
                        let (msr, kind) = shared[(i * 7 + t) % shared.len()];
                        let (segv0, calls0) = (fixups().1, calls());
                        let mut s = state(msr, 0);
                        call_stub_with_current_backend(Stub::Rdmsr, &mut s, false);
                        let value = s.output[r::RDX] << 32 | s.output[r::RAX];
                        assert_eq!(fixups().1, segv0, "{msr:#x}: read as a miss (RDMSR ran)");
                        match kind {
                            ReadKind::Policy => {
                                assert_eq!(calls() - calls0, 1, "{msr:#x}: not the policy's");
                                assert_eq!(value, ANSWER, "{msr:#x}");
                            }
                            _ => {
                                assert_eq!(calls(), calls0, "{msr:#x}: sent to the policy");
                                assert_eq!(value, fs_base, "{msr:#x}: not RDFSBASE's");
                            }
                        }
                    }
                })
            })
            .collect();
        start.wait();
        let mut swaps = 0u64;
        while !readers.iter().all(|r| r.is_finished()) && !stop.load(Ordering::Relaxed) {
            for filter in [a, b] {
                // SAFETY: as in `publish`: both filters were built and checked there.
                unsafe { install_read_filter(filter) };
            }
            swaps += 2;
        }
        for reader in readers {
            if reader.join().is_err() {
                stop.store(true, Ordering::Relaxed);
                panic!("a reader saw a mixed filter");
            }
        }
        swaps
    });
    assert!(swaps > 1000, "only {swaps} re-installs raced the reads");
}

/// This thread's FS base (0 when the host has no FSGSBASE: then no key reads it).
fn rdfsbase_if(fsgsbase: bool) -> u64 {
    if fsgsbase { rdfsbase() } else { 0 }
}

#[test]
fn filter_reads_segment_bases_with_rdfsbase_and_rdgsbase() {
    if !host_has_fsgsbase() {
        eprintln!("skipped: this host does not let user space use RDFSBASE");
        return;
    }
    let _l = lock();
    install();
    publish(&[
        (MSR_FS_BASE, ReadKind::RdFsBase),
        (MSR_GS_BASE, ReadKind::RdGsBase),
    ]);
    let saved_gs = rdgsbase();
    let gs = 0x0000_7123_4567_8000;
    wrgsbase(gs);
    let before = calls();
    let mut s = state(MSR_GS_BASE, 0);
    call_stub_with_current_backend(Stub::Rdmsr, &mut s, false);
    let mut f = state(MSR_FS_BASE, 0);
    call_stub_with_current_backend(Stub::Rdmsr, &mut f, false);
    wrgsbase(saved_gs);
    assert_eq!(calls(), before, "no policy");
    assert_eq!(
        (s.output[r::RAX], s.output[r::RDX]),
        (gs & 0xffff_ffff, gs >> 32)
    );
    assert_preserved(&s, &[r::RAX, r::RDX], "rdgsbase read");
    let fs = rdfsbase();
    assert_eq!(
        (f.output[r::RAX], f.output[r::RDX]),
        (fs & 0xffff_ffff, fs >> 32)
    );
    assert_preserved(&f, &[r::RAX, r::RDX], "rdfsbase read");
}

/// The write stub's segment-base path: one hypercall straight through the page, the
/// `which` the MSR names, every register the caller's, a failure as the exact error.
#[test]
fn segment_base_writes_call_the_hypercall_page_directly() {
    let _l = lock();
    install();
    let m = mock::session();
    // SAFETY: a test over the mock page: nothing here relies on a segment-base write
    // reaching a base (the mock records the calls).
    unsafe { set_segbase_hypercall_page(m.page()) };
    // SAFETY: turning the switch off has no requirement.
    unsafe { set_fsgsbase_enabled(false) };
    set_script(Outcome::Native);
    let value = 0x0000_7ffe_1234_5000;
    for (msr, which) in [(MSR_FS_BASE, 0), (MSR_GS_BASE, 2), (MSR_KERNEL_GS_BASE, 1)] {
        let before = calls();
        let mut s = state(msr, value);
        call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
        assert_eq!(calls(), before, "{msr:#x}: no policy");
        mock::assert_calls(&[mock::MockCall::new(
            nr::SET_SEGMENT_BASE,
            [which, value, 0, 0, 0],
        )]);
        assert_preserved(&s, &[], "segment-base write");

        mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
        let (ill0, _) = fixups();
        let mut s = state(msr, value);
        call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
        assert_eq!(fixups().0 - ill0, 1, "one ud2: the stub's rewind trap");
        assert_eq!(
            s.output[r::RSI],
            MsrError::Hypercall(Errno::EINVAL).to_code()
        );
        assert_preserved(&s, &[r::RSI], "failed segment-base write");
        mock::take_calls();
    }
    // Random registers on the success path: only the hypercall happens.
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(any::<[u64; 16]>(), 0..3u32), |(regs, which)| {
            let mut input = regs;
            input[r::RSP] = 0;
            input[r::RCX] = (input[r::RCX] & !0xffff_ffff) | u64::from(MSR_FS_BASE + which);
            let mut s = RegState {
                input,
                ..RegState::default()
            };
            call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
            prop_assert_eq!(s.rsp_after, s.rsp_before);
            for reg in 0..16 {
                if reg != r::RSP {
                    prop_assert_eq!(s.output[reg], s.input[reg]);
                }
            }
            let calls = mock::take_calls();
            prop_assert_eq!(calls.len(), 1);
            let value = (input[r::RDX] & 0xffff_ffff) << 32 | input[r::RAX] & 0xffff_ffff;
            prop_assert_eq!(calls[0].args[1], value);
            Ok(())
        })
        .unwrap();
    drop(m);
}

/// With FSGSBASE the write stub writes the FS and kernel GS bases with WRFSBASE/WRGSBASE
/// (no hypercall), refuses a non-canonical base as the #GP it would be (without taking
/// one), and still makes the hypercall for KERNEL_GS_BASE.
#[test]
fn fsgsbase_writes_use_the_instructions() {
    if !host_has_fsgsbase() {
        eprintln!("skipped: this host does not let user space use WRFSBASE");
        return;
    }
    let _l = lock();
    install();
    let m = mock::session();
    // SAFETY: as above.
    unsafe { set_segbase_hypercall_page(m.page()) };
    // SAFETY: this host's Linux sets CR4.FSGSBASE on every CPU (checked above), so the
    // instructions reach the bases the writes mean.
    unsafe { set_fsgsbase_enabled(true) };
    let saved_gs = rdgsbase();

    let gs = 0x0000_7001_2345_6000;
    let mut s = state(MSR_GS_BASE, gs);
    call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
    let seen = rdgsbase();
    wrgsbase(saved_gs);
    assert_eq!(seen, gs, "WRGSBASE took the value");
    assert!(mock::take_calls().is_empty(), "no hypercall");
    assert_preserved(&s, &[], "wrgsbase write");

    // FS: write the current base back (this thread's TLS lives there).
    let fs = rdfsbase();
    let mut s = state(MSR_FS_BASE, fs);
    call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
    assert_eq!(rdfsbase(), fs);
    assert!(mock::take_calls().is_empty(), "no hypercall");
    assert_preserved(&s, &[], "wrfsbase write");

    // Non-canonical: refused as Fault 13 through the stub's ud2, no #GP taken, nothing
    // written.
    for msr in [MSR_FS_BASE, MSR_GS_BASE] {
        let (ill0, segv0) = fixups();
        let mut s = state(msr, 0x8000_0000_0000_0000);
        call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
        assert_eq!(fixups(), (ill0 + 1, segv0), "{msr:#x}: one ud2, no #GP");
        assert_eq!(s.output[r::RSI], GP.to_code(), "{msr:#x}");
        assert_preserved(&s, &[r::RSI], "refused non-canonical write");
    }
    assert_eq!(rdfsbase(), fs);
    assert_eq!(rdgsbase(), saved_gs);

    // KERNEL_GS_BASE: always the hypercall.
    let mut s = state(MSR_KERNEL_GS_BASE, gs);
    call_stub_with_current_backend(Stub::Wrmsr, &mut s, false);
    mock::assert_calls(&[mock::MockCall::new(nr::SET_SEGMENT_BASE, [1, gs, 0, 0, 0])]);
    assert_preserved(&s, &[], "KERNEL_GS_BASE write");
    // SAFETY: turning the switch off has no requirement.
    unsafe { set_fsgsbase_enabled(false) };
    drop(m);
}
