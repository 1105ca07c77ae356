//! The mock hypercall page for host tests.
//!
//! [`page`] returns a [`HypercallPage`] over a real executable page, built once per process,
//! whose 128 entries have the shape of Xen's and go through exactly the same
//! [`HypercallPage::call_raw`] as the real page. Instead of `syscall`, an entry calls a
//! trampoline that hands `(nr, args)` to a Rust dispatcher. The dispatcher records every
//! call and answers from per-thread scripts, so parallel tests do not see each other.
//!
//! # Entry layout (32 bytes each)
//!
//! ```text
//! 51                 push %rcx
//! 41 53              push %r11
//! b8 <nr:le32>       mov  $nr,%eax
//! 49 bb <imm64>      movabs $xenmsr_hc_mock_trampoline,%r11
//! 41 ff d3           call *%r11          ; Xen's entry has `syscall` here
//! 41 5b              pop  %r11
//! 59                 pop  %rcx
//! c3                 ret
//! cc ...             int3 padding
//! ```
//!
//! Like `syscall`, the transfer clobbers `r11` (and the trampoline clobbers `rcx` too), so
//! an entry that failed to save them would be caught by the register tests.
//!
//! # Trampoline register contract (`xenmsr_hc_mock_trampoline`)
//!
//! - In: `eax` = hypercall number; `rdi, rsi, rdx, r10, r8` = arguments 1-5; a return
//!   address on the stack (any alignment).
//! - Out: `rax` = the result. The argument registers the hypercall uses ([`args_used`])
//!   hold [`POISON`], as a debug Xen leaves them, so calling code that forgot a clobber
//!   breaks; the others keep their values; `rcx` and `r11` also hold [`POISON`] (the entry
//!   restores them, as Xen's does after `syscall`).
//! - Preserved: every other general register (`rbx, rbp, rsp, r9, r12-r15`), the x87,
//!   MMX, SSE and AVX state (saved with `xsave64` of every component enabled in XCR0, or
//!   `fxsave64` without XSAVE), and MXCSR. Flags are not preserved (no Rust `asm!` block
//!   that makes a call may assume they are).
//! - It aligns the stack to 64 bytes (the XSAVE area's alignment) before calling the
//!   dispatcher, which uses the C ABI.
//!
//! # Scripting
//!
//! For each call the dispatcher records a [`MockCall`], then answers, for the calling
//! thread: the next value queued with [`script`] for that number if there is one, else the
//! handler installed with [`on`], else 0. A handler runs during the call, so it may
//! dereference pointer arguments (check or fill a `XenPmuParams`, read a console buffer).
//! If a handler panics, the call returns [`HANDLER_PANICKED`] and the panic is resumed on
//! that thread by the next [`take_calls`], [`assert_calls`] or when the [`MockSession`]
//! drops.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::ptr::{self, NonNull};
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use crate::page::{ENTRIES, ENTRY_SIZE};
use crate::{Errno, HypercallPage, nr};

/// The value the trampoline leaves in the argument registers the hypercall uses (see
/// [`args_used`]) and in `rcx`/`r11`.
pub const POISON: u64 = 0xdead_beef_dead_f00d;

/// How many argument registers (of `rdi, rsi, rdx, r10, r8`, in that order) hypercall
/// `nr` takes on 64-bit PV. A debug build of Xen overwrites exactly these on return (a
/// release build leaves them), so the mock does too: code that relies on another argument
/// register surviving a hypercall is right, and code that relies on a used one is caught.
/// Unknown numbers count as using all five.
pub const fn args_used(nr: u32) -> usize {
    match nr {
        nr::IRET => 0,
        nr::SET_TRAP_TABLE => 1,
        nr::SET_GDT
        | nr::STACK_SWITCH
        | nr::MEMORY_OP
        | nr::MULTICALL
        | nr::XEN_VERSION
        | nr::VM_ASSIST
        | nr::SET_SEGMENT_BASE
        | nr::SCHED_OP
        | nr::CALLBACK_OP
        | nr::EVENT_CHANNEL_OP
        | nr::PHYSDEV_OP
        | nr::XENPMU_OP => 2,
        nr::SET_CALLBACKS | nr::UPDATE_VA_MAPPING | nr::CONSOLE_IO | nr::VCPU_OP => 3,
        nr::MMU_UPDATE | nr::MMUEXT_OP => 4,
        _ => 5,
    }
}

/// What a call returns when its handler panicked: `-4095`, the last value of the errno
/// range, which no real hypercall returns.
pub const HANDLER_PANICKED: i64 = -4095;

const PAGE_SIZE: usize = 4096;

/// Size of the save area for the extended state: 0 means "no XSAVE, use `fxsave64` with
/// 512 bytes". Set once, before the page is published, and read by the trampoline.
static XSAVE_AREA_SIZE: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    ".pushsection .text.xenmsr_hc_mock_trampoline,\"ax\",@progbits",
    ".globl xenmsr_hc_mock_trampoline",
    ".hidden xenmsr_hc_mock_trampoline",
    ".type xenmsr_hc_mock_trampoline,@function",
    ".p2align 4",
    "xenmsr_hc_mock_trampoline:",
    ".cfi_startproc",
    "push rbp",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbp, -16",
    "mov rbp, rsp",
    ".cfi_def_cfa_register rbp",
    // [rbp-8] r9 (preserved by Xen, not by the C ABI); [rbp-48..rbp-16] the arguments as
    // a [u64; 5]; [rbp-56] the number, later the result.
    "push r9",
    "push r8",
    "push r10",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rax",
    // Save the extended state below, 64-byte aligned.
    "mov rcx, qword ptr [rip + {area}]",
    "test rcx, rcx",
    "jz .Lxenmsr_hc_mock_fxsave",
    "sub rsp, rcx",
    "and rsp, -64",
    // XRSTOR requires the header's reserved bytes to be zero; XSAVE does not write them.
    "xor eax, eax",
    "mov qword ptr [rsp + 512], rax",
    "mov qword ptr [rsp + 520], rax",
    "mov qword ptr [rsp + 528], rax",
    "mov qword ptr [rsp + 536], rax",
    "mov qword ptr [rsp + 544], rax",
    "mov qword ptr [rsp + 552], rax",
    "mov qword ptr [rsp + 560], rax",
    "mov qword ptr [rsp + 568], rax",
    "mov eax, -1",
    "mov edx, -1",
    "xsave64 [rsp]",
    "jmp .Lxenmsr_hc_mock_saved",
    ".Lxenmsr_hc_mock_fxsave:",
    "sub rsp, 512",
    "and rsp, -64",
    "fxsave64 [rsp]",
    ".Lxenmsr_hc_mock_saved:",
    "mov edi, dword ptr [rbp - 56]",
    "lea rsi, [rbp - 48]",
    "call {dispatch}",
    "mov qword ptr [rbp - 56], rax",
    "cmp qword ptr [rip + {area}], 0",
    "je .Lxenmsr_hc_mock_fxrstor",
    "mov eax, -1",
    "mov edx, -1",
    "xrstor64 [rsp]",
    "jmp .Lxenmsr_hc_mock_restored",
    ".Lxenmsr_hc_mock_fxrstor:",
    "fxrstor64 [rsp]",
    ".Lxenmsr_hc_mock_restored:",
    "mov rax, qword ptr [rbp - 56]",
    "mov r9, qword ptr [rbp - 8]",
    // The argument registers as `dispatch` left them: poisoned if the hypercall uses them.
    "mov rdi, qword ptr [rbp - 48]",
    "mov rsi, qword ptr [rbp - 40]",
    "mov rdx, qword ptr [rbp - 32]",
    "mov r10, qword ptr [rbp - 24]",
    "mov r8, qword ptr [rbp - 16]",
    "movabs rcx, {poison}",
    "mov r11, rcx",
    "mov rsp, rbp",
    "pop rbp",
    ".cfi_def_cfa rsp, 8",
    "ret",
    ".cfi_endproc",
    ".size xenmsr_hc_mock_trampoline, . - xenmsr_hc_mock_trampoline",
    ".popsection",
    area = sym XSAVE_AREA_SIZE,
    dispatch = sym dispatch,
    poison = const POISON,
);

unsafe extern "C" {
    /// The trampoline above. Never called from Rust (its contract is not the C ABI); only
    /// its address is taken.
    fn xenmsr_hc_mock_trampoline();
}

/// One recorded hypercall: its number and its arguments as the entry saw them. Argument
/// registers the hypercall does not use ([`args_used`]) are recorded as 0: Xen never reads
/// them, so callers may leave anything there (the stubs do).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MockCall {
    /// The hypercall number (`rax`).
    pub nr: u32,
    /// `rdi, rsi, rdx, r10, r8`.
    pub args: [u64; 5],
}

impl MockCall {
    /// A call of hypercall `nr` with `args`.
    pub const fn new(nr: u32, args: [u64; 5]) -> Self {
        MockCall { nr, args }
    }
}

impl fmt::Debug for MockCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match nr::name(self.nr) {
            Some(name) => write!(f, "{name}[{}](", self.nr)?,
            None => write!(f, "hypercall[{}](", self.nr)?,
        }
        for (i, arg) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{arg:#x}")?;
        }
        f.write_str(")")
    }
}

type Handler = Box<dyn FnMut(&[u64; 5]) -> i64>;

#[derive(Default)]
struct State {
    calls: Vec<MockCall>,
    scripts: HashMap<u32, VecDeque<i64>>,
    handlers: HashMap<u32, Handler>,
    panic: Option<Box<dyn Any + Send>>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// The Rust side of the trampoline, called with the C ABI.
/// Answers one call. `args` are the trampoline's saved argument registers, reloaded from
/// there on return: the ones the hypercall uses are overwritten with [`POISON`].
extern "C" fn dispatch(nr: u32, saved: &mut [u64; 5]) -> i64 {
    let args = *saved;
    for reg in saved.iter_mut().take(args_used(nr)) {
        *reg = POISON;
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| answer(nr, args)));
    match outcome {
        Ok(ret) => ret,
        Err(payload) => {
            // If the thread's state is already gone there is nowhere to keep the panic;
            // its message has been printed by the panic hook and the call still fails.
            let _ = STATE.try_with(|s| {
                if let Ok(mut s) = s.try_borrow_mut() {
                    s.panic.get_or_insert(payload);
                }
            });
            HANDLER_PANICKED
        }
    }
}

fn answer(nr: u32, args: [u64; 5]) -> i64 {
    let mut used = args;
    for unused in used.iter_mut().skip(args_used(nr)) {
        *unused = 0;
    }
    let scripted = STATE.with_borrow_mut(|s| {
        s.calls.push(MockCall { nr, args: used });
        s.scripts.get_mut(&nr).and_then(VecDeque::pop_front)
    });
    if let Some(ret) = scripted {
        return ret;
    }
    // The handler runs without the state borrowed, so it may use this module's API (or
    // make nested calls); it is put back afterwards unless it installed a replacement.
    let Some(mut handler) = STATE.with_borrow_mut(|s| s.handlers.remove(&nr)) else {
        return 0;
    };
    let ret = catch_unwind(AssertUnwindSafe(|| handler(&args)));
    STATE.with_borrow_mut(|s| {
        s.handlers.entry(nr).or_insert(handler);
    });
    match ret {
        Ok(ret) => ret,
        Err(payload) => resume_unwind(payload),
    }
}

fn xsave_area_size() -> u64 {
    if !std::arch::is_x86_feature_detected!("xsave") {
        return 0;
    }
    // CPUID.(EAX=0DH,ECX=0):EBX is the XSAVE area size for the components enabled in
    // XCR0. At least the legacy area and header (576 bytes), which the trampoline zeroes.
    let leaf = core::arch::x86_64::__cpuid_count(0xd, 0);
    u64::from(leaf.ebx).max(576)
}

/// Writes Xen-shaped entries that call `trampoline` into `page`.
fn write_entries(page: &mut [u8; PAGE_SIZE], trampoline: u64) {
    page.fill(0xcc);
    for (nr, entry) in page.chunks_exact_mut(ENTRY_SIZE).enumerate() {
        let nr = u32::try_from(nr).expect("128 entries");
        let mut code = Vec::with_capacity(ENTRY_SIZE);
        code.extend_from_slice(&[0x51, 0x41, 0x53, 0xb8]);
        code.extend_from_slice(&nr.to_le_bytes());
        code.extend_from_slice(&[0x49, 0xbb]);
        code.extend_from_slice(&trampoline.to_le_bytes());
        code.extend_from_slice(&[0x41, 0xff, 0xd3, 0x41, 0x5b, 0x59, 0xc3]);
        assert!(code.len() <= ENTRY_SIZE);
        entry[..code.len()].copy_from_slice(&code);
    }
    debug_assert_eq!(page.len() / ENTRY_SIZE, ENTRIES);
}

fn build_page() -> usize {
    XSAVE_AREA_SIZE.store(xsave_area_size(), std::sync::atomic::Ordering::Relaxed);
    // SAFETY: an anonymous private mapping of one page at an address of the kernel's
    // choosing; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        base,
        libc::MAP_FAILED,
        "mock hypercall page: mmap failed: {}",
        std::io::Error::last_os_error()
    );
    {
        // SAFETY: `base` is a fresh, page-aligned, writable mapping of PAGE_SIZE bytes that
        // nothing else references yet.
        let page = unsafe { &mut *base.cast::<[u8; PAGE_SIZE]>() };
        write_entries(page, xenmsr_hc_mock_trampoline as *const () as u64);
    }
    // SAFETY: changes the protection of the mapping created above, which is no longer
    // borrowed.
    let rc = unsafe { libc::mprotect(base, PAGE_SIZE, libc::PROT_READ | libc::PROT_EXEC) };
    assert_eq!(
        rc,
        0,
        "mock hypercall page: mprotect failed: {}",
        std::io::Error::last_os_error()
    );
    base as usize
}

/// The process-wide mock hypercall page, built on first use (and never unmapped).
pub fn page() -> HypercallPage {
    static PAGE: OnceLock<usize> = OnceLock::new();
    let base = *PAGE.get_or_init(build_page);
    let base = NonNull::new(base as *mut u8).expect("mmap never returns NULL on success");
    // SAFETY: the mapping is readable and executable for the rest of the process, and
    // each entry honours Xen's register contract (see the module docs): `rax` in and
    // out, arguments in `rdi, rsi, rdx, r10, r8` (clobbered), everything else preserved.
    unsafe { HypercallPage::from_raw(base) }
}

fn resume_pending_panic() {
    if let Some(payload) = STATE.with_borrow_mut(|s| s.panic.take()) {
        resume_unwind(payload);
    }
}

/// Queues `ret` as the raw result (`rax`) of the next call of hypercall `nr` on this
/// thread. Queued results are used before any handler, in order.
pub fn script(nr: u32, ret: i64) {
    STATE.with_borrow_mut(|s| s.scripts.entry(nr).or_default().push_back(ret));
}

/// Queues `-errno` as the result of the next call of hypercall `nr` on this thread.
pub fn script_err(nr: u32, errno: Errno) {
    script(nr, errno.to_ret());
}

/// Installs `handler` for hypercall `nr` on this thread, replacing any previous one. It
/// runs during each call not answered by a queued result, gets the five arguments, and
/// returns the raw result.
pub fn on(nr: u32, handler: impl FnMut(&[u64; 5]) -> i64 + 'static) {
    STATE.with_borrow_mut(|s| {
        s.handlers.insert(nr, Box::new(handler));
    });
}

/// Takes the calls recorded on this thread since the last take or reset.
///
/// Resumes the panic of a handler that panicked, if any.
pub fn take_calls() -> Vec<MockCall> {
    resume_pending_panic();
    STATE.with_borrow_mut(|s| std::mem::take(&mut s.calls))
}

/// Forgets this thread's recorded calls, queued results, handlers, and any pending
/// handler panic.
pub fn reset() {
    let state = STATE.with_borrow_mut(std::mem::take);
    // Dropped here, outside the borrow: a handler's captures may run arbitrary code.
    drop(state);
}

/// Takes this thread's recorded calls and asserts they are exactly `expected`, in order;
/// on a mismatch it panics with a line-by-line diff.
#[track_caller]
pub fn assert_calls(expected: &[MockCall]) {
    let actual = take_calls();
    if actual == expected {
        return;
    }
    let mut msg = format!(
        "hypercall sequence mismatch: expected {} call(s), got {}\n",
        expected.len(),
        actual.len()
    );
    for i in 0..expected.len().max(actual.len()) {
        match (expected.get(i), actual.get(i)) {
            (Some(e), Some(a)) if e == a => msg += &format!("    #{i} {e:?}\n"),
            (e, a) => {
                if let Some(e) = e {
                    msg += &format!("  - #{i} {e:?}   (expected)\n");
                }
                if let Some(a) = a {
                    msg += &format!("  + #{i} {a:?}   (actual)\n");
                }
            }
        }
    }
    panic!("{msg}");
}

/// A test's use of the mock on one thread: [`session`] resets the thread's state, and the
/// drop checks that nothing was left behind.
///
/// On drop (unless the thread is already panicking) it panics if a handler panicked and
/// the panic was not yet resumed, or if results queued with [`script`] were not used.
#[derive(Debug)]
#[must_use = "the checks run when the session is dropped"]
pub struct MockSession {
    page: HypercallPage,
}

/// Starts a [`MockSession`] on this thread (resetting its mock state).
pub fn session() -> MockSession {
    reset();
    MockSession { page: page() }
}

impl MockSession {
    /// The mock page.
    pub fn page(&self) -> HypercallPage {
        self.page
    }
}

impl Drop for MockSession {
    fn drop(&mut self) {
        let state = STATE.with_borrow_mut(std::mem::take);
        if std::thread::panicking() {
            return;
        }
        if let Some(payload) = state.panic {
            resume_unwind(payload);
        }
        let mut unused: Vec<_> = state
            .scripts
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(nr, q)| format!("{}[{nr}]: {q:?}", nr::name(*nr).unwrap_or("hypercall")))
            .collect();
        unused.sort();
        assert!(
            unused.is_empty(),
            "scripted hypercall results never used: {}",
            unused.join(", ")
        );
    }
}
