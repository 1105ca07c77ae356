//! Shared helpers for the host integration tests.
//!
//! - [`install`]: once per process, registers the scripted test backend and warn hook,
//!   sorts the extable, and installs SIGILL/SIGSEGV handlers that run the production
//!   [`fixup_exception`] on the interrupted context. On the host, user space is ring 3, so
//!   a real RDMSR/WRMSR (and RDPMC unless CR4.PCE is set) raises `#GP`, which Linux
//!   delivers as SIGSEGV; a stub's `ud2` raises `#UD`, delivered as SIGILL. The vector
//!   given to the fixup is the `trapno` of the signal context (a page fault, 14, is a
//!   SIGSEGV too); SIGFPE and SIGBUS are handled as well, for guarded instructions. If
//!   the fixup declines, the handler restores the default action and returns, so the
//!   instruction faults again and the test process dies loudly.
//! - The backend's behaviour is per thread ([`set_script`]), so tests running in parallel
//!   threads do not see each other's scripts; it records every call ([`last_call`]).
//! - [`RegState`] and [`call_stub`]: call a stub exactly as a site does, with every GPR
//!   loaded from an array and saved again afterwards.

use std::cell::{Cell, RefCell};
use std::sync::Once;

use xenmsr_asm::backend::{MsrBackend, Outcome, set_backend};
use xenmsr_asm::extable::{self, Data, Kind, flags};
use xenmsr_asm::fixup::{TrapFrame, UncheckedAccess, fixup_exception, set_warn_hook};
use xenmsr_asm::stubs::Stub;
use xenmsr_asm::{VECTOR_GP, VECTOR_UD};

/// Which handler entry the backend saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `rdpmc`.
    Rdpmc,
}

/// One call of the test backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Which entry.
    pub op: Op,
    /// The MSR or counter.
    pub msr: u32,
    /// The value, for writes.
    pub value: u64,
    /// `rsp % 16` observed inside the handler at a point where the compiler keeps the
    /// stack call-aligned: 0 unless the stub called the handler misaligned.
    pub rsp_mod_16: u64,
}

/// Per-thread test state.
struct ThreadState {
    script: Cell<Outcome>,
    calls: Cell<u64>,
    last: Cell<Option<Call>>,
    fixups_sigill: Cell<u64>,
    fixups_sigsegv: Cell<u64>,
    fixups_other: Cell<u64>,
    warnings: RefCell<Vec<UncheckedAccess>>,
    probe: Cell<Option<fn()>>,
}

thread_local! {
    static STATE: ThreadState = const {
        ThreadState {
            script: Cell::new(Outcome::Native),
            calls: Cell::new(0),
            last: Cell::new(None),
            fixups_sigill: Cell::new(0),
            fixups_sigsegv: Cell::new(0),
            fixups_other: Cell::new(0),
            warnings: RefCell::new(Vec::new()),
            probe: Cell::new(None),
        }
    };
}

/// Sets a function the backend calls (on this thread) at every access it is asked about,
/// from inside the handler the stub called: the unwinding test takes a backtrace there.
pub fn set_probe(probe: Option<fn()>) {
    STATE.with(|s| s.probe.set(probe));
}

fn current_rsp() -> u64 {
    let rsp: u64;
    // SAFETY: reads rsp into a register; no memory or stack access. Without `nostack` the
    // compiler aligns rsp for a call here, which is what makes the reading meaningful.
    unsafe { core::arch::asm!("mov %rsp, {}", out(reg) rsp, options(att_syntax, nomem)) };
    rsp
}

/// Overwrites every register the C ABI lets a callee clobber, as a hostile (but
/// conforming) handler could; otherwise a stub that forgot to save one would go unnoticed
/// whenever the compiled handler happened not to touch it.
#[inline(never)]
fn poison_caller_saved() {
    // SAFETY: only writes registers declared as clobbered; no memory or stack access.
    unsafe {
        core::arch::asm!(
            "mov $0x5ca1ab1e0badf00d, %rax",
            "mov %rax, %rcx",
            "mov %rax, %rdx",
            "mov %rax, %rsi",
            "mov %rax, %rdi",
            "mov %rax, %r8",
            "mov %rax, %r9",
            "mov %rax, %r10",
            "mov %rax, %r11",
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            options(att_syntax, nomem, nostack),
        );
    }
}

fn note(op: Op, msr: u32, value: u64) -> Outcome {
    if let Some(probe) = STATE.with(|s| s.probe.get()) {
        probe();
    }
    poison_caller_saved();
    let call = Call {
        op,
        msr,
        value,
        rsp_mod_16: current_rsp() % 16,
    };
    STATE.with(|s| {
        s.calls.set(s.calls.get() + 1);
        s.last.set(Some(call));
        s.script.get()
    })
}

/// The process-wide backend: forwards to this thread's script.
#[derive(Debug)]
struct TestBackend;

impl MsrBackend for TestBackend {
    unsafe fn read(&self, msr: u32) -> Outcome {
        note(Op::Read, msr, 0)
    }
    unsafe fn write(&self, msr: u32, value: u64) -> Outcome {
        note(Op::Write, msr, value)
    }
    unsafe fn rdpmc(&self, counter: u32) -> Outcome {
        note(Op::Rdpmc, counter, 0)
    }
}

static BACKEND: TestBackend = TestBackend;

fn record_warning(access: &UncheckedAccess) {
    // Runs in the signal handler, but the signal is synchronous and raised at one of our
    // own sites, so this thread is not inside the allocator.
    STATE.with(|s| {
        if let Ok(mut warnings) = s.warnings.try_borrow_mut() {
            warnings.push(*access);
        }
    });
}

fn frame_from(gregs: &[libc::greg_t; 23]) -> TrapFrame {
    let g = |i: libc::c_int| gregs[i as usize] as u64;
    TrapFrame {
        rax: g(libc::REG_RAX),
        rbx: g(libc::REG_RBX),
        rcx: g(libc::REG_RCX),
        rdx: g(libc::REG_RDX),
        rsi: g(libc::REG_RSI),
        rdi: g(libc::REG_RDI),
        rbp: g(libc::REG_RBP),
        r8: g(libc::REG_R8),
        r9: g(libc::REG_R9),
        r10: g(libc::REG_R10),
        r11: g(libc::REG_R11),
        r12: g(libc::REG_R12),
        r13: g(libc::REG_R13),
        r14: g(libc::REG_R14),
        r15: g(libc::REG_R15),
        rip: g(libc::REG_RIP),
        rsp: g(libc::REG_RSP),
        rflags: g(libc::REG_EFL),
    }
}

fn frame_into(frame: &TrapFrame, gregs: &mut [libc::greg_t; 23]) {
    let mut s = |i: libc::c_int, v: u64| gregs[i as usize] = v as libc::greg_t;
    s(libc::REG_RAX, frame.rax);
    s(libc::REG_RBX, frame.rbx);
    s(libc::REG_RCX, frame.rcx);
    s(libc::REG_RDX, frame.rdx);
    s(libc::REG_RSI, frame.rsi);
    s(libc::REG_RDI, frame.rdi);
    s(libc::REG_RBP, frame.rbp);
    s(libc::REG_R8, frame.r8);
    s(libc::REG_R9, frame.r9);
    s(libc::REG_R10, frame.r10);
    s(libc::REG_R11, frame.r11);
    s(libc::REG_R12, frame.r12);
    s(libc::REG_R13, frame.r13);
    s(libc::REG_R14, frame.r14);
    s(libc::REG_R15, frame.r15);
    s(libc::REG_RIP, frame.rip);
    s(libc::REG_RSP, frame.rsp);
    s(libc::REG_EFL, frame.rflags);
}

/// The exception vector behind a synchronous signal: the `trapno` Linux saves in the
/// signal context (so a SIGSEGV tells `#GP`, 13, from `#PF`, 14), or, where that holds no
/// vector, the one the signal stands for (`#UD` for SIGILL, `#DE` for SIGFPE, `#GP`
/// otherwise).
fn vector_of(sig: libc::c_int, gregs: &[libc::greg_t; 23]) -> u8 {
    match u8::try_from(gregs[libc::REG_TRAPNO as usize]) {
        Ok(trapno) if trapno < 32 => trapno,
        _ if sig == libc::SIGILL => VECTOR_UD,
        _ if sig == libc::SIGFPE => 0,
        _ => VECTOR_GP,
    }
}

extern "C" fn on_fault(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `ucontext_t` as the third argument of an
    // SA_SIGINFO handler, and nothing else refers to it while the handler runs.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let vector = vector_of(sig, &uc.uc_mcontext.gregs);
    let mut frame = frame_from(&uc.uc_mcontext.gregs);
    // SAFETY: the frame is the interrupted context of the synchronous fault that raised
    // this signal, on this thread's stack, which stays mapped while we run on it.
    if unsafe { fixup_exception(&mut frame, vector) } {
        frame_into(&frame, &mut uc.uc_mcontext.gregs);
        STATE.with(|s| {
            let counter = match sig {
                libc::SIGILL => &s.fixups_sigill,
                libc::SIGSEGV => &s.fixups_sigsegv,
                _ => &s.fixups_other,
            };
            counter.set(counter.get() + 1);
        });
    } else {
        // Not ours: restore the default action; returning re-executes the faulting
        // instruction, which then kills the process with the original signal.
        // SAFETY: `signal` is async-signal-safe.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

fn install_handler(sig: libc::c_int) {
    // SAFETY: `sigaction` is plain data; all-zero is a valid value (no handler, no flags),
    // which we then fill in.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = on_fault as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa_mask` is a valid `sigset_t` we own.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised; `on_fault` has the SA_SIGINFO signature and
    // only does async-signal-safe work for our synchronous faults.
    let rc = unsafe { libc::sigaction(sig, &action, core::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction failed");
}

/// Sets up the process once: backend, warn hook, sorted extable, signal handlers.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the scripted backend stands in for the platform in this test process:
        // ring 3 executes no MSR access, so nothing here relies on an MSR's real value,
        // and each test checks the answers against the script it set.
        let registered = unsafe { set_backend(&BACKEND) };
        assert!(registered, "another backend was registered first");
        assert!(
            set_warn_hook(record_warning),
            "another warn hook was set first"
        );
        install_fault_handlers();
    });
}

/// Sorts the extable and installs the SIGILL/SIGSEGV handlers (once per process), without
/// registering the scripted backend or the warn hook: for tests that run the production
/// `xenmsr::init`, which registers its own. [`fixups`] counts this thread's fixups either
/// way.
pub fn install_fault_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extable::init();
        install_handler(libc::SIGILL);
        install_handler(libc::SIGSEGV);
        // Guarded instructions: a divide error (#DE) arrives as SIGFPE, an alignment
        // check (#AC) as SIGBUS.
        install_handler(libc::SIGFPE);
        install_handler(libc::SIGBUS);
    });
}

/// Sets what the backend answers on this thread.
pub fn set_script(outcome: Outcome) {
    STATE.with(|s| s.script.set(outcome));
}

/// The last backend call on this thread, and clears it.
pub fn last_call() -> Option<Call> {
    STATE.with(|s| s.last.take())
}

/// Number of backend calls on this thread so far.
pub fn calls() -> u64 {
    STATE.with(|s| s.calls.get())
}

/// Fixups performed on this thread so far: `(SIGILL, SIGSEGV)`.
pub fn fixups() -> (u64, u64) {
    STATE.with(|s| (s.fixups_sigill.get(), s.fixups_sigsegv.get()))
}

/// Fixups of signals other than SIGILL and SIGSEGV (SIGFPE, SIGBUS: guarded
/// instructions) performed on this thread so far.
pub fn other_fixups() -> u64 {
    STATE.with(|s| s.fixups_other.get())
}

/// Takes the warnings recorded on this thread.
pub fn take_warnings() -> Vec<UncheckedAccess> {
    STATE.with(|s| core::mem::take(&mut *s.warnings.borrow_mut()))
}

/// Register index in [`RegState`] arrays (hardware numbering; index 4, rsp, unused).
pub mod r {
    /// rax
    pub const RAX: usize = 0;
    /// rcx
    pub const RCX: usize = 1;
    /// rdx
    pub const RDX: usize = 2;
    /// rbx
    pub const RBX: usize = 3;
    /// rsp (not loaded)
    pub const RSP: usize = 4;
    /// rbp
    pub const RBP: usize = 5;
    /// rsi
    pub const RSI: usize = 6;
    /// rdi
    pub const RDI: usize = 7;
}

/// Register names, hardware order.
pub const REG_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// Registers before and after one stub call.
#[repr(C)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegState {
    /// Loaded into every GPR except rsp right before the `call`.
    pub input: [u64; 16],
    /// Every GPR except rsp right after the call (or after the fixup resumed).
    pub output: [u64; 16],
    /// rsp right before the call.
    pub rsp_before: u64,
    /// rsp right after the call.
    pub rsp_after: u64,
}

const _: () = assert!(core::mem::offset_of!(RegState, output) == 128);
const _: () = assert!(core::mem::offset_of!(RegState, rsp_before) == 256);
const _: () = assert!(core::mem::offset_of!(RegState, rsp_after) == 264);

/// The caller's extable kind the harness uses for each stub: the checked kind, error in
/// rsi (and `RAX_CONTRACT` for the rax stub), exactly as the `_safe` site emitters.
pub const fn caller_data(stub: Stub) -> Data {
    match stub {
        Stub::Rdmsr => Data::site(Kind::ReadSafe, 0),
        Stub::Wrmsr => Data::site(Kind::WriteSafe, 0),
        Stub::Rdpmc => Data::site(Kind::RdpmcSafe, 0),
        Stub::RdmsrRax => Data::site(Kind::ReadSafe, flags::RAX_CONTRACT),
        Stub::SegbaseFs | Stub::SegbaseGsKernel | Stub::SegbaseGsUser => {
            Data::site(Kind::WriteSafe, 0)
        }
    }
}

macro_rules! harness {
    ($name:ident, $stub:path, $data:expr) => {
        /// Calls the stub the way a site does, with `pad` bytes of extra stack (16: rsp is
        /// 16-aligned at the call, as at every site; 8: deliberately misaligned).
        ///
        /// # Safety
        ///
        /// The stub may execute a real MSR instruction; on the host that faults and needs
        /// [`install_fault_handlers`] to have run.
        unsafe fn $name(state: &mut RegState, misalign: bool) {
            let ptr: *mut RegState = state;
            if misalign {
                // SAFETY: see `call_stub`.
                unsafe { harness!(@asm ptr, $stub, $data, 24) };
            } else {
                // SAFETY: see `call_stub`.
                unsafe { harness!(@asm ptr, $stub, $data, 16) };
            }
        }
    };
    (@asm $ptr:ident, $stub:path, $data:expr, $pad:literal) => {
        core::arch::asm!(
            "push %rbx",
            "push %rbp",
            "push %rdi",
            concat!("sub $", $pad, " - 8, %rsp"),
            "mov %rsp, 256(%rdi)",
            "mov 0(%rdi), %rax",
            "mov 8(%rdi), %rcx",
            "mov 16(%rdi), %rdx",
            "mov 24(%rdi), %rbx",
            "mov 40(%rdi), %rbp",
            "mov 48(%rdi), %rsi",
            "mov 64(%rdi), %r8",
            "mov 72(%rdi), %r9",
            "mov 80(%rdi), %r10",
            "mov 88(%rdi), %r11",
            "mov 96(%rdi), %r12",
            "mov 104(%rdi), %r13",
            "mov 112(%rdi), %r14",
            "mov 120(%rdi), %r15",
            "mov 56(%rdi), %rdi",
            "2:",
            "call {stub}",
            "3:",
            "push %rdi",
            concat!("mov ", $pad, "(%rsp), %rdi"),
            "mov %rax, 128(%rdi)",
            "mov %rcx, 136(%rdi)",
            "mov %rdx, 144(%rdi)",
            "mov %rbx, 152(%rdi)",
            "mov %rbp, 168(%rdi)",
            "mov %rsi, 176(%rdi)",
            "mov %r8, 192(%rdi)",
            "mov %r9, 200(%rdi)",
            "mov %r10, 208(%rdi)",
            "mov %r11, 216(%rdi)",
            "mov %r12, 224(%rdi)",
            "mov %r13, 232(%rdi)",
            "mov %r14, 240(%rdi)",
            "mov %r15, 248(%rdi)",
            "pop %rax",
            "mov %rax, 184(%rdi)",
            "mov %rsp, 264(%rdi)",
            concat!("add $", $pad, " - 8, %rsp"),
            "pop %rdi",
            "pop %rbp",
            "pop %rbx",
            ".pushsection xenmsr_extable,\"awR\",@progbits",
            ".balign 4",
            ".long 2b - .",
            ".long 3b - .",
            ".long {data}",
            ".popsection",
            stub = sym $stub,
            data = const $data.bits(),
            inout("rdi") $ptr => _,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            options(att_syntax),
        )
    };
}

harness!(
    call_rdmsr,
    xenmsr_asm::stubs::xenmsr_stub_rdmsr,
    caller_data(Stub::Rdmsr)
);
harness!(
    call_wrmsr,
    xenmsr_asm::stubs::xenmsr_stub_wrmsr,
    caller_data(Stub::Wrmsr)
);
harness!(
    call_rdpmc,
    xenmsr_asm::stubs::xenmsr_stub_rdpmc,
    caller_data(Stub::Rdpmc)
);
harness!(
    call_rdmsr_rax,
    xenmsr_asm::stubs::xenmsr_stub_rdmsr_rax,
    caller_data(Stub::RdmsrRax)
);

harness!(
    call_segbase_fs,
    xenmsr_asm::stubs::xenmsr_stub_segbase_fs,
    caller_data(Stub::SegbaseFs)
);
harness!(
    call_segbase_gs_kernel,
    xenmsr_asm::stubs::xenmsr_stub_segbase_gs_kernel,
    caller_data(Stub::SegbaseGsKernel)
);
harness!(
    call_segbase_gs_user,
    xenmsr_asm::stubs::xenmsr_stub_segbase_gs_user,
    caller_data(Stub::SegbaseGsUser)
);

/// Calls `stub` with every GPR except rsp loaded from `state.input`, then saves every GPR
/// into `state.output` and rsp before/after. The call carries the caller entry
/// [`caller_data`]`(stub)`, so on a failure the fixup resumes right after the call with
/// the outputs zeroed and the error code in rsi. With `misalign`, rsp is 8 mod 16 at the
/// call: outside the stubs' contract for the ones that call the policy (a site's `asm!`
/// block guarantees an aligned stack); the segment-base stubs call no Rust and accept it.
pub fn call_stub(stub: Stub, state: &mut RegState, misalign: bool) {
    install();
    call_stub_with_current_backend(stub, state, misalign);
}

/// [`call_stub`] without [`install`]: the stub consults whatever backend the process
/// registered (the production policy, in tests that ran `xenmsr::init`). Installs only
/// the fault handlers.
pub fn call_stub_with_current_backend(stub: Stub, state: &mut RegState, misalign: bool) {
    install_fault_handlers();
    let call = match stub {
        Stub::Rdmsr => call_rdmsr,
        Stub::Wrmsr => call_wrmsr,
        Stub::Rdpmc => call_rdpmc,
        Stub::RdmsrRax => call_rdmsr_rax,
        Stub::SegbaseFs => call_segbase_fs,
        Stub::SegbaseGsKernel => call_segbase_gs_kernel,
        Stub::SegbaseGsUser => call_segbase_gs_user,
    };
    // SAFETY: the harness saves and restores rbx and rbp itself, declares every other GPR
    // as clobbered, keeps rsp balanced, and its call carries an extable entry whose fixup
    // is the label right after it, inside the same asm block. `install_fault_handlers` has
    // set up the fault handlers the stubs' native and failure paths need on the host.
    unsafe { call(state, misalign) }
}

/// Whether RDPMC of `counter` is allowed in ring 3 on this host (CR4.PCE set, counter
/// valid), probed with the raw-instruction site: `Ok` means the instruction ran.
pub fn native_rdpmc_probe(counter: u32) -> Result<u64, xenmsr_asm::MsrError> {
    install();
    // SAFETY: RDPMC reads a counter; at ring 3 it either runs or raises #GP, which the
    // installed handler turns into `Err`.
    unsafe { xenmsr_asm::native::rdpmc_safe(counter) }
}

/// Stores code bytes into this binary's (read-only) text, as a kernel with read-only text
/// would in its `Config::write_text`: maps the pages read-write-execute around the store
/// and back to read-execute after it.
///
/// # Safety
///
/// `address..address + bytes.len()` must be code of this binary that no thread is
/// executing, and the bytes must leave it valid code for whoever runs it next.
pub unsafe fn write_text_mprotect(address: usize, bytes: &[u8]) {
    const PAGE: usize = 4096;
    let start = address & !(PAGE - 1);
    let end = (address + bytes.len()).next_multiple_of(PAGE);
    let protect = |prot| {
        // SAFETY: changes the protection of whole pages of this binary's own text, which
        // stay mapped; no Rust reference covers them.
        let rc = unsafe { libc::mprotect(start as *mut libc::c_void, end - start, prot) };
        assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    };
    protect(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC);
    // SAFETY: the range was just made writable; the caller guarantees nobody runs it.
    unsafe { xenmsr::patch::write_text_directly(address, bytes) };
    protect(libc::PROT_READ | libc::PROT_EXEC);
}

/// `docs/integrating.md`, compiled as this crate's doctest so that its example builds in
/// CI (`cargo test --workspace`). It lives here, not in `xenmsr`, because the published
/// `xenmsr` package must not read files outside itself; this crate is never published and
/// already has the mock hypercall page the example uses.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/integrating.md")]
pub struct IntegratingGuide;

/// The Xen PV configuration the host tests start from: the mock hypercall page, the host's
/// own CPUID (the host is no PV guest: Xen's forced-emulation prefix would `#UD` here), and
/// text patched through [`write_text_mprotect`], since the host's text is read-only as a
/// careful kernel's would be. Tests add their own hooks with the `with_*` builders.
pub fn mock_xen_pv_config() -> xenmsr::Config {
    xenmsr::Config::xen_pv(xenmsr_hypercall::mock::page())
        // Host threads run on no kit stack: the boot "vCPU" is named 0 explicitly.
        .with_vcpu_id(|| 0)
        .with_cpuid(xenmsr::pmu::raw_cpuid)
        .with_write_text(write_text_mprotect)
}
