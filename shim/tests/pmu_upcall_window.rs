//! An upcall that flushes the vPMU page can arrive between any two instructions of a PMU
//! MSR access. This test delivers one at *every* instruction boundary of an access and
//! checks that no access reads or writes the page once the flush has handed it back to
//! Xen.
//!
//! How: one run of the access under the single-step trap (`EFLAGS.TF`) records the
//! address of every instruction it executes. Then, for each boundary `i`, the access runs
//! again at full speed with a breakpoint (`int3`) on instruction `i`; the SIGTRAP handler
//! steps over the earlier executions of that address and, at the right one, runs what the
//! kernel's `VIRQ_XENPMU` upcall runs, `on_pmi`, before instruction `i` executes. Its
//! flush ("Xen" on the mock page) takes the page back: it clears `PMU_CACHED`, stamps the
//! counter and control slots with [`XEN_OWNS`] and records the page. A later read of the
//! page would return the stamp; a later write would change the recorded bytes.
//!
//! Two cases, in one test (the breakpoints patch this binary's shared text, so nothing
//! else may run it meanwhile):
//! - outside the handler, with a PMI pending (`PMU_CACHED` set, upcall not yet taken):
//!   the access must not use the page at all (it passes through);
//! - inside the handler, with an upcall that should have been masked: the nested
//!   `on_pmi` is refused, nothing is flushed, and the access completes on the page.

mod pmu_common;

use std::cell::RefCell;
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};

use pmu_common::*;
use xenmsr::pmu::{PAGE_SIZE, PmuError, Vpmu};
use xenmsr_asm::Outcome;
use xenmsr_hypercall::abi::{PMU_CTXT_OFFSET, PmuFlags};
use xenmsr_hypercall::{mock, nr};

/// What "Xen" leaves in the counter and control slots once it owns the page again.
const XEN_OWNS: u64 = 0x0bad_0bad_0bad_0bad;
/// Page offsets of `arch_counters[0].counter` and `.control` as [`xen_intel_pmi`] lays
/// them out for three fixed counters.
const PMC0_AT: usize = PMU_CTXT_OFFSET + 64 + 3 * 8;
const EVNTSEL0_AT: usize = PMC0_AT + 8;
/// `IA32_PMC0` and `IA32_PERFEVTSEL0`.
const PMC0: u32 = 0xc1;
const EVNTSEL0: u32 = 0x186;
/// `EFLAGS.TF`.
const TF: i64 = 0x100;
/// The `int3` opcode.
const INT3: u8 = 0xcc;

// The trap handler's state. Plain atomics (no thread-locals, no locks): the handler runs
// between any two instructions of the library, so it must not share code or state with
// the access it interrupts. Only the test's one thread uses them.

/// What SIGTRAP means right now.
static MODE: AtomicU8 = AtomicU8::new(IDLE);
const IDLE: u8 = 0;
/// Single-stepping: record each instruction's address.
const RECORDING: u8 = 1;
/// An `int3` is planted at `BREAK_AT`.
const ARMED: u8 = 2;
/// Stepping over the instruction at `BREAK_AT`; plant the `int3` again after it.
const STEPPING_OVER: u8 = 3;

const MAX_STEPS: usize = 1 << 14;
/// Each recorded boundary's instruction address and stack pointer.
static TRACE: [(AtomicU64, AtomicU64); MAX_STEPS] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_STEPS];
static TRACED: AtomicUsize = AtomicUsize::new(0);
static BREAK_AT: AtomicUsize = AtomicUsize::new(0);
static BREAK_BYTE: AtomicU8 = AtomicU8::new(0);
/// The upcall runs at this execution of `BREAK_AT` (1 = the first).
static BREAK_ON_HIT: AtomicU64 = AtomicU64::new(0);
static HITS: AtomicU64 = AtomicU64::new(0);
/// The backend the upcall runs `on_pmi` on.
static BACKEND: AtomicPtr<Vpmu> = AtomicPtr::new(std::ptr::null_mut());
/// The upcall's `on_pmi` result: 0 none yet, 1 `Ok`, 2 `NestedPmi`, 3 anything else.
static UPCALL: AtomicU8 = AtomicU8::new(0);

unsafe extern "C" {
    /// Bounds of this executable's text (defined by the linker's default script).
    static __executable_start: u8;
    static etext: u8;
}

fn in_our_text(address: usize) -> bool {
    let start = (&raw const __executable_start) as usize;
    let end = (&raw const etext) as usize;
    (start..end).contains(&address)
}

fn store_code_byte(address: usize, byte: u8) {
    // SAFETY: `address` is in this executable's text, which `make_text_writable` mapped
    // read-write-execute; no other thread runs this code during the test.
    unsafe { (address as *mut u8).write_volatile(byte) }
}

fn run_upcall() {
    let backend = BACKEND.load(Relaxed);
    // SAFETY: `BACKEND` points to the test's `Vpmu` for as long as breakpoints are armed.
    let backend = unsafe { &*backend };
    // The upcall: what a kernel's VIRQ_XENPMU handler calls.
    let result = match backend.on_pmi(|_| ()) {
        Ok(()) => 1,
        Err(PmuError::NestedPmi) => 2,
        Err(_) => 3,
    };
    UPCALL.store(result, Relaxed);
}

/// The handler's own accesses to [`MODE`], [`BREAK_AT`] and [`BREAK_BYTE`] while an
/// `int3` may be planted: inline assembly only. Any function it called (even
/// `AtomicU8::load`, which the library calls too) could be the one carrying the `int3`,
/// and a breakpoint inside the SIGTRAP handler would kill the process.
macro_rules! raw_mode {
    () => {{
        let mode: u32;
        // SAFETY: reads the byte of the `MODE` static; no other access to it runs
        // concurrently (one thread, inside its own signal handler).
        unsafe {
            core::arch::asm!(
                "movzx {m:e}, byte ptr [rip + {mode}]",
                mode = sym MODE,
                m = out(reg) mode,
                options(nostack, readonly, preserves_flags)
            )
        };
        mode as u8
    }};
    ($value:expr) => {{
        let value: u8 = $value;
        // SAFETY: writes the byte of the `MODE` static, as above.
        unsafe {
            core::arch::asm!(
                "mov byte ptr [rip + {mode}], {v}",
                mode = sym MODE,
                v = in(reg_byte) value,
                options(nostack, preserves_flags)
            )
        };
    }};
}

/// Stores `byte` at `BREAK_AT` in inline assembly (see [`raw_mode!`]).
macro_rules! raw_store_break_byte {
    ($byte:expr) => {{
        let byte: u8 = $byte;
        // SAFETY: `BREAK_AT` holds an instruction address in this executable's text,
        // mapped read-write-execute by `make_text_writable`, which this thread alone runs
        // during the test.
        unsafe {
            core::arch::asm!(
                "mov {at}, qword ptr [rip + {break_at}]",
                "mov byte ptr [{at}], {b}",
                break_at = sym BREAK_AT,
                at = out(reg) _,
                b = in(reg_byte) byte,
                options(nostack, preserves_flags)
            )
        };
    }};
}

/// The original byte at `BREAK_AT`, read in inline assembly (see [`raw_mode!`]).
macro_rules! raw_break_byte {
    () => {{
        let byte: u32;
        // SAFETY: reads the `BREAK_BYTE` static, as in `raw_mode!`.
        unsafe {
            core::arch::asm!(
                "movzx {b:e}, byte ptr [rip + {break_byte}]",
                break_byte = sym BREAK_BYTE,
                b = out(reg) byte,
                options(nostack, readonly, preserves_flags)
            )
        };
        byte as u8
    }};
}

extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let uc = ctx as *mut libc::ucontext_t;
    match raw_mode!() {
        ARMED => {
            // The int3 ran: put the instruction back first (no call before this).
            raw_store_break_byte!(raw_break_byte!());
            // SAFETY: the kernel passes the interrupted context of this SA_SIGINFO
            // handler, which nothing else references while it runs.
            let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
            let at = BREAK_AT.load(Relaxed);
            let rip = gregs[libc::REG_RIP as usize] as usize;
            assert_eq!(rip - 1, at, "a breakpoint this test did not plant");
            gregs[libc::REG_RIP as usize] = at as i64;
            if HITS.fetch_add(1, Relaxed) + 1 == BREAK_ON_HIT.load(Relaxed) {
                // The boundary: the upcall arrives before this instruction.
                MODE.store(IDLE, Relaxed);
                run_upcall();
            } else {
                // An earlier execution: run it (one step), then plant the int3 again.
                MODE.store(STEPPING_OVER, Relaxed);
                gregs[libc::REG_EFL as usize] |= TF;
            }
        }
        STEPPING_OVER => {
            // SAFETY: as above.
            let gregs = unsafe { &mut (*uc).uc_mcontext.gregs };
            gregs[libc::REG_EFL as usize] &= !TF;
            raw_mode!(ARMED);
            // Last: from here on, any call could hit the int3.
            raw_store_break_byte!(INT3);
        }
        RECORDING => {
            // SAFETY: as above.
            let gregs = unsafe { &(*uc).uc_mcontext.gregs };
            let n = TRACED.fetch_add(1, Relaxed);
            if let Some((at, sp)) = TRACE.get(n) {
                at.store(gregs[libc::REG_RIP as usize] as u64, Relaxed);
                sp.store(gregs[libc::REG_RSP as usize] as u64, Relaxed);
            }
        }
        _ => {}
    }
}

fn install_trap_handler() {
    // SAFETY: all-zero is a valid `sigaction` (no handler, no flags), filled below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_trap as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa_mask` is a valid `sigset_t` owned by `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and `on_trap` has the SA_SIGINFO shape.
    let rc = unsafe { libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction(SIGTRAP)");
}

/// Maps this executable's text read-write-execute (`writable`) or back to read-execute.
fn make_text_writable(writable: bool) {
    let start = (&raw const __executable_start) as usize & !(PAGE_SIZE - 1);
    let end = ((&raw const etext) as usize).next_multiple_of(PAGE_SIZE);
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC
    } else {
        libc::PROT_READ | libc::PROT_EXEC
    };
    // SAFETY: whole pages of this executable's own text, which stay mapped; no Rust
    // reference covers them.
    let rc = unsafe { libc::mprotect(start as *mut libc::c_void, end - start, prot) };
    assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
}

/// Runs the access under the single-step trap and returns the address of every
/// instruction boundary from the first instruction of [`run`] to its return (the address
/// of the instruction about to run): the code the injection runs execute too.
#[inline(never)]
fn trace(v: &Vpmu, access: Access) -> Vec<usize> {
    TRACED.store(0, Relaxed);
    MODE.store(RECORDING, Relaxed);
    // SAFETY: sets EFLAGS.TF; the stack is balanced. Every instruction until TF is
    // cleared raises SIGTRAP, which `on_trap` records.
    unsafe { core::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq") };
    let _ = run(v, access);
    // SAFETY: clears EFLAGS.TF; the stack is balanced.
    unsafe { core::arch::asm!("pushfq", "and qword ptr [rsp], ~0x100", "popfq") };
    MODE.store(IDLE, Relaxed);
    let n = TRACED.load(Relaxed);
    assert!(
        n <= MAX_STEPS,
        "access longer than {MAX_STEPS} instructions"
    );
    let trace: Vec<(usize, usize)> = TRACE[..n]
        .iter()
        .map(|(at, sp)| (at.load(Relaxed) as usize, sp.load(Relaxed) as usize))
        .collect();
    // From `run`'s entry (its return address just pushed, at `sp`) until the stack is
    // above that again (it returned).
    let entry = run as fn(&Vpmu, Access) -> Outcome as usize;
    let first = trace
        .iter()
        .position(|&(at, _)| at == entry)
        .expect("the trace passes `run`'s entry");
    let entry_sp = trace[first].1;
    trace[first..]
        .iter()
        .take_while(|&&(_, sp)| sp <= entry_sp)
        .map(|&(at, _)| at)
        .collect()
}

/// Runs the access with the upcall delivered right before the `hit`-th execution of the
/// instruction at `at`; returns its outcome and the upcall's result code.
fn with_upcall_at(v: &Vpmu, at: usize, hit: u64, access: Access) -> (Outcome, u8) {
    BACKEND.store(std::ptr::from_ref(v).cast_mut(), Relaxed);
    UPCALL.store(0, Relaxed);
    HITS.store(0, Relaxed);
    BREAK_ON_HIT.store(hit, Relaxed);
    BREAK_AT.store(at, Relaxed);
    // SAFETY: `at` is an instruction address inside this executable's text (checked by
    // the caller), which is readable.
    BREAK_BYTE.store(unsafe { (at as *const u8).read_volatile() }, Relaxed);
    MODE.store(ARMED, Relaxed);
    store_code_byte(at, INT3);
    let outcome = run(v, access);
    if MODE.swap(IDLE, Relaxed) != IDLE {
        // Never reached: put the instruction back.
        store_code_byte(at, BREAK_BYTE.load(Relaxed));
    }
    BACKEND.store(std::ptr::null_mut(), Relaxed);
    (outcome, UPCALL.load(Relaxed))
}

/// Every boundary of a trace as (address, which execution of it), skipping addresses
/// outside this executable (shared libraries other threads may be running).
fn boundaries(trace: &[usize]) -> Vec<(usize, u64)> {
    let mut seen = std::collections::HashMap::new();
    trace
        .iter()
        .filter(|&&at| in_our_text(at))
        .map(|&at| {
            let hit = seen.entry(at).or_insert(0u64);
            *hit += 1;
            (at, *hit)
        })
        .collect()
}

thread_local! {
    /// The page as "Xen" left it at its flush.
    static AT_FLUSH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// "Xen" for this thread: FLUSH takes the page back (clears `PMU_CACHED`, stamps the
/// slots, records the page); the other ops succeed.
fn xen_takes_the_page_back_at_flush(addr: usize) {
    mock::on(XENPMU_OP, move |args| {
        if args[0] as u32 == nr::XENPMU_FLUSH {
            set_flags(addr, flags(addr) - PmuFlags::CACHED);
            w64(addr, PMC0_AT, XEN_OWNS);
            w64(addr, EVNTSEL0_AT, XEN_OWNS);
            let page: Vec<u8> = (0..PAGE_SIZE)
                .step_by(8)
                .flat_map(|off| r64(addr, off).to_le_bytes())
                .collect();
            AT_FLUSH.with(|p| *p.borrow_mut() = Some(page));
        }
        0
    });
}

/// The accesses under test.
#[derive(Clone, Copy, Debug)]
enum Access {
    Read,
    Write,
    Rdpmc,
}

#[inline(never)]
fn run(v: &Vpmu, access: Access) -> Outcome {
    match access {
        Access::Read => v.read(PMC0).expect("a PMU MSR"),
        Access::Write => v.write(EVNTSEL0, 0x43_003c).expect("a PMU MSR"),
        Access::Rdpmc => v.rdpmc(0),
    }
}

/// After an upcall flushed at some point of `access`: nothing was read from or written to
/// the page after the flush.
fn assert_untouched_after_the_flush(page: &GuardedPage, what: &str, outcome: Outcome) {
    let Some(at_flush) = AT_FLUSH.with(|p| p.borrow_mut().take()) else {
        return;
    };
    assert_ne!(
        outcome,
        Outcome::Done(XEN_OWNS),
        "{what}: read a slot of the page after Xen took it back"
    );
    assert!(
        page.snapshot() == at_flush,
        "{what}: wrote the page after Xen took it back"
    );
}

/// Names a boundary for failure messages (the offset in the executable, for `addr2line`).
fn describe(access: Access, i: usize, at: usize, hit: u64) -> String {
    let offset = at - (&raw const __executable_start) as usize;
    format!("{access:?}, upcall before instruction {i} (text offset {offset:#x}, execution {hit})")
}

/// A PMI pending: Xen has cached the context and its upcall is on the way.
fn pmi_pending(page: &GuardedPage) {
    xen_intel_pmi(page.addr(), &[1, 2, 3], &[(0x2000, 0x43_00c0); 4]);
}

/// Empties the fake native reader's log and makes room in it, so that recording a read
/// never allocates: the upcall allocates (the mock's call log), so the access it
/// interrupts must not be inside the allocator, and every run must take the same path.
fn room_for_native_reads(native: &FakeNative) {
    let mut reads = native.reads.lock().unwrap();
    reads.clear();
    reads.reserve(1 << 16);
}

fn outside_the_handler(v: &Vpmu, page: &GuardedPage, native: &FakeNative) {
    for access in [Access::Read, Access::Write, Access::Rdpmc] {
        room_for_native_reads(native);
        pmi_pending(page);
        let trace = trace(v, access);
        let points = boundaries(&trace);
        assert!(
            points.len() > 20,
            "{access:?}: only {} boundaries",
            points.len()
        );
        let mut upcalls = 0;
        for (i, &(at, hit)) in points.iter().enumerate() {
            pmi_pending(page);
            let what = describe(access, i, at, hit);
            let (outcome, upcall) = with_upcall_at(v, at, hit, access);
            assert_eq!(
                upcall, 1,
                "{what}: the upcall's PMI handler ran and flushed"
            );
            upcalls += 1;
            assert_untouched_after_the_flush(page, &what, outcome);
            // Outside the handler the page is never used: the access passes through.
            let expected = match access {
                Access::Rdpmc => Outcome::Done(FakeNative::value(PMC0)),
                Access::Read | Access::Write => Outcome::Native,
            };
            assert_eq!(outcome, expected, "{what}");
        }
        assert_eq!(upcalls, points.len());
        eprintln!("upcall window: {access:?} outside the handler: {upcalls} boundaries");
        let _ = mock::take_calls();
    }
}

fn inside_the_handler(v: &Vpmu, page: &GuardedPage) {
    for access in [Access::Read, Access::Write, Access::Rdpmc] {
        pmi_pending(page);
        let trace = v.on_pmi(|_| trace(v, access)).expect("PMI");
        let points = boundaries(&trace);
        assert!(
            points.len() > 20,
            "{access:?}: only {} boundaries",
            points.len()
        );
        let _ = mock::take_calls();
        let _ = AT_FLUSH.with(|p| p.borrow_mut().take());
        for (i, &(at, hit)) in points.iter().enumerate() {
            pmi_pending(page);
            let what = describe(access, i, at, hit);
            let (outcome, upcall) = v
                .on_pmi(|_| {
                    let (outcome, upcall) = with_upcall_at(v, at, hit, access);
                    assert!(
                        mock::take_calls().is_empty(),
                        "{what}: flushed inside the handler"
                    );
                    assert_untouched_after_the_flush(page, &what, outcome);
                    (outcome, upcall)
                })
                .expect("the outer PMI flushes");
            assert_eq!(
                upcall, 2,
                "{what}: the nested on_pmi is refused (NestedPmi)"
            );
            let expected = match access {
                Access::Read | Access::Rdpmc => Outcome::Done(0x2000),
                Access::Write => Outcome::Done(0),
            };
            assert_eq!(outcome, expected, "{what}");
            assert_eq!(pmu_ops(), vec![nr::XENPMU_FLUSH], "only the outer flush");
            let _ = AT_FLUSH.with(|p| p.borrow_mut().take());
        }
        eprintln!(
            "upcall window: {access:?} inside the handler: {} boundaries",
            points.len()
        );
    }
}

#[test]
fn an_upcall_at_any_instruction_boundary_never_splits_a_pmu_access() {
    install_trap_handler();
    let s = mock::session();
    let page = GuardedPage::new();
    let native = FakeNative::leak(vec![]);
    let v = vpmu(s.page(), SKYLAKE, native);
    xen_ok(page.addr());
    registered(&v, 0, &page);
    xen_takes_the_page_back_at_flush(page.addr());
    make_text_writable(true);
    outside_the_handler(&v, &page, native);
    inside_the_handler(&v, &page);
    make_text_writable(false);
}
