//! Exception handling: the trap table, the entry stubs, and the dispatcher that asks the
//! library's `fixup_exception` (and, for the boot-level trap tests, the kernel's own
//! exception table) to recover, or reports the fault and fails the run.
//!
//! Xen delivers an exception to a 64-bit PV kernel on a bounce frame that looks like a
//! hardware frame with `rcx` and `r11` pushed on top (Xen used them for `sysret`-style
//! delivery). Each stub pops them back, pushes a dummy error code where the CPU has none,
//! and pushes the vector; the common path then saves every register as a `TrapFrame`,
//! calls Rust on a 16-byte-aligned stack, writes `rip`/`rsp`/`rflags` back into the frame,
//! restores the registers and returns through the `iret` hypercall.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::hv::{self, TrapInfo};
use crate::smp::{CacheAligned, MAX_VCPUS, PerVcpu, vcpu_index};

pub use xenmsr_asm::fixup::TrapFrame;

// The entry asm below hard-codes this layout.
const _: () = assert!(size_of::<TrapFrame>() == 18 * 8);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rip) == 120);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rsp) == 128);
const _: () = assert!(core::mem::offset_of!(TrapFrame, rflags) == 136);

/// Vector names, for reports.
pub const fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        9 => "CSO",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        15 => "RSVD",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        _ => "?",
    }
}

/// Number of vectors with a handler: all architectural exceptions 0-19.
pub const VECTORS: usize = 20;

// Vectors 8, 10-14 and 17 push an error code; the others get a dummy 0.
macro_rules! trap_stubs {
    ($($vec:literal $name:ident $ec:ident;)*) => {
        global_asm!(
            $(
                concat!(
                    ".pushsection .text.pvk_traps, \"ax\", @progbits\n",
                    ".p2align 4\n",
                    ".globl ", stringify!($name), "\n",
                    stringify!($name), ":\n",
                    "    pop %rcx\n",
                    "    pop %r11\n",
                    trap_stubs!(@ec $ec),
                    "    push $", stringify!($vec), "\n",
                    "    jmp pvk_trap_common\n",
                    ".popsection\n",
                ),
            )*
            options(att_syntax)
        );
        unsafe extern "C" {
            $(fn $name();)*
        }
        /// The entry stub of each vector, indexed by vector.
        static STUBS: [unsafe extern "C" fn(); VECTORS] = [$($name,)*];
    };
    (@ec err) => { "" };
    (@ec none) => { "    push $0\n" };
}

trap_stubs! {
    0 pvk_trap_0 none;
    1 pvk_trap_1 none;
    2 pvk_trap_2 none;
    3 pvk_trap_3 none;
    4 pvk_trap_4 none;
    5 pvk_trap_5 none;
    6 pvk_trap_6 none;
    7 pvk_trap_7 none;
    8 pvk_trap_8 err;
    9 pvk_trap_9 none;
    10 pvk_trap_10 err;
    11 pvk_trap_11 err;
    12 pvk_trap_12 err;
    13 pvk_trap_13 err;
    14 pvk_trap_14 err;
    15 pvk_trap_15 none;
    16 pvk_trap_16 none;
    17 pvk_trap_17 err;
    18 pvk_trap_18 none;
    19 pvk_trap_19 none;
}

/// The pseudo-vector the event-upcall entry passes to the common path.
pub const VECTOR_UPCALL: u8 = 32;
/// The pseudo-vector of the failsafe callback.
pub const VECTOR_FAILSAFE: u8 = 33;

// The event upcall and the failsafe callback arrive on the same kind of bounce frame as an
// exception without an error code (rcx and r11 on top); they go through the common path
// with a pseudo-vector.
global_asm!(
    r#"
    .pushsection .text.pvk_traps, "ax", @progbits
    .p2align 4
    .globl pvk_upcall
pvk_upcall:
    pop %rcx
    pop %r11
    push $0
    push ${upcall}
    jmp pvk_trap_common
    .p2align 4
    .globl pvk_failsafe
pvk_failsafe:
    pop %rcx
    pop %r11
    push $0
    push ${failsafe}
    jmp pvk_trap_common
    .popsection
    "#,
    upcall = const VECTOR_UPCALL,
    failsafe = const VECTOR_FAILSAFE,
    options(att_syntax)
);

unsafe extern "C" {
    fn pvk_upcall();
    fn pvk_failsafe();
}

/// The entry points of the event callback and the failsafe callback.
pub fn callback_entries() -> (u64, u64) {
    (
        pvk_upcall as *const () as usize as u64,
        pvk_failsafe as *const () as usize as u64,
    )
}

// The common path. On entry the stack holds, from rsp upwards: vector, error code, rip,
// cs, rflags, rsp, ss. The TrapFrame (144 bytes) goes below that, so the hardware frame
// is at rsp+144 once it is built.
global_asm!(
    r#"
    .pushsection .text.pvk_traps, "ax", @progbits
    .p2align 4
pvk_trap_common:
    sub $144, %rsp
    mov %rax, 0(%rsp)
    mov %rbx, 8(%rsp)
    mov %rcx, 16(%rsp)
    mov %rdx, 24(%rsp)
    mov %rsi, 32(%rsp)
    mov %rdi, 40(%rsp)
    mov %rbp, 48(%rsp)
    mov %r8, 56(%rsp)
    mov %r9, 64(%rsp)
    mov %r10, 72(%rsp)
    mov %r11, 80(%rsp)
    mov %r12, 88(%rsp)
    mov %r13, 96(%rsp)
    mov %r14, 104(%rsp)
    mov %r15, 112(%rsp)
    mov 160(%rsp), %rax        /* rip */
    mov %rax, 120(%rsp)
    mov 184(%rsp), %rax        /* rsp */
    mov %rax, 128(%rsp)
    mov 176(%rsp), %rax        /* rflags */
    mov %rax, 136(%rsp)

    mov %rsp, %rdi             /* &mut TrapFrame */
    mov 144(%rsp), %rsi        /* vector */
    mov 152(%rsp), %rdx        /* error code */
    mov 168(%rsp), %rcx        /* cs */
    mov %rsp, %rbx             /* callee-saved: the frame */
    and $-16, %rsp
    cld
    call {handler}
    mov %rbx, %rsp

    mov 120(%rsp), %rax
    mov %rax, 160(%rsp)
    mov 128(%rsp), %rax
    mov %rax, 184(%rsp)
    mov 136(%rsp), %rax
    mov %rax, 176(%rsp)
    mov 0(%rsp), %rax
    mov 8(%rsp), %rbx
    mov 16(%rsp), %rcx
    mov 24(%rsp), %rdx
    mov 32(%rsp), %rsi
    mov 40(%rsp), %rdi
    mov 48(%rsp), %rbp
    mov 56(%rsp), %r8
    mov 64(%rsp), %r9
    mov 72(%rsp), %r10
    mov 80(%rsp), %r11
    mov 88(%rsp), %r12
    mov 96(%rsp), %r13
    mov 104(%rsp), %r14
    mov 112(%rsp), %r15
    add $160, %rsp             /* the TrapFrame, the vector and the error code */
    /* iret hypercall: flags 0 (not VGCF_in_syscall); the page entry pushes rcx, r11 and
       rax itself, completing struct iret_context above our rip/cs/rflags/rsp/ss. */
    push $0
    jmp xenmsr_hypercall_page + {iret} * 32
    .popsection
    "#,
    handler = sym pvk_trap_handler,
    iret = const hv::nr::IRET,
    options(att_syntax)
);

/// How many exceptions each vector has taken on each vCPU (recovered or not).
static COUNTS: PerVcpu<[AtomicU64; VECTORS]> =
    [const { CacheAligned([const { AtomicU64::new(0) }; VECTORS]) }; MAX_VCPUS];
/// Each vCPU's nesting depth of the exception dispatcher, to stop a fault in the fault
/// path from recursing. (An upcall is not counted: a #GP inside the upcall handler is a
/// first-level fault.)
static DEPTH: PerVcpu<AtomicU32> = [const { CacheAligned(AtomicU32::new(0)) }; MAX_VCPUS];

/// How many times `vector` has been taken so far on this vCPU.
pub fn count(vector: u8) -> u64 {
    COUNTS[vcpu_index()]
        .0
        .get(vector as usize)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// This vCPU's counts of every vector.
pub fn counts() -> [u64; VECTORS] {
    let row = &COUNTS[vcpu_index()].0;
    core::array::from_fn(|v| row[v].load(Ordering::Relaxed))
}

/// Puts this vCPU's counts back to `saved` (what [`counts`] returned).
pub fn set_counts(saved: &[u64; VECTORS]) {
    let row = &COUNTS[vcpu_index()].0;
    for (c, v) in row.iter().zip(saved) {
        c.store(*v, Ordering::Relaxed);
    }
}

/// The trap table every vCPU registers: a handler for every vector 0-19, then the
/// terminator.
pub fn trap_table() -> [TrapInfo; VECTORS + 1] {
    let mut table = [TrapInfo::TERMINATOR; VECTORS + 1];
    for (vector, stub) in STUBS.iter().enumerate() {
        // DPL 3 for #BP/#OF so `int3`/`into` may raise them; mask events on entry, like an
        // interrupt gate.
        let dpl = if vector == 3 || vector == 4 { 3 } else { 0 };
        table[vector] = TrapInfo::new(vector as u8, dpl, true, *stub as usize as u64);
    }
    table
}

/// Registers [`trap_table`] on this vCPU.
pub fn install() -> Result<(), xenmsr_hypercall::Errno> {
    let table = trap_table();
    // SAFETY: the last entry is the terminator, and every other address is a stub above,
    // which follows Xen's bounce-frame contract (pops rcx/r11, returns via iret) and is
    // part of the kernel image for its whole life.
    unsafe { hv::page().set_trap_table(&table) }
}

/// The Rust side of every exception and upcall.
extern "C" fn pvk_trap_handler(frame: &mut TrapFrame, vector: u64, error_code: u64, cs: u64) {
    let vector = vector as u8;
    if vector == VECTOR_UPCALL {
        crate::events::upcall(frame);
        return;
    }
    if vector == VECTOR_FAILSAFE {
        crate::println!("PANIC: Xen's failsafe callback (a bad segment on return?)");
        crate::exit::crash();
    }
    let vcpu = vcpu_index();
    if let Some(c) = COUNTS[vcpu].0.get(vector as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    if DEPTH[vcpu].0.fetch_add(1, Ordering::Relaxed) > 0 {
        // A fault while handling a fault: report as little as possible and stop.
        crate::println!(
            "PANIC: nested exception {} ({}) at rip {:#x}",
            vector,
            vector_name(vector),
            frame.rip
        );
        crate::exit::crash();
    }
    let fixed = crate::fixup::fixup(frame, vector, error_code);
    if !fixed {
        report_unhandled(frame, vector, error_code, cs);
        crate::testing::abort_run("unhandled exception");
    }
    DEPTH[vcpu].0.fetch_sub(1, Ordering::Relaxed);
}

fn report_unhandled(frame: &TrapFrame, vector: u8, error_code: u64, cs: u64) {
    crate::println!(
        "UNHANDLED EXCEPTION: vector {} ({}) error code {:#x} cs {:#x}",
        vector,
        vector_name(vector),
        error_code,
        cs
    );
    crate::println!(
        "  rip {:#018x}  rsp {:#018x}  rflags {:#018x}",
        frame.rip,
        frame.rsp,
        frame.rflags
    );
    crate::println!(
        "  rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx
    );
    crate::println!(
        "  rsi {:#018x}  rdi {:#018x}  rbp {:#018x}  r8  {:#018x}",
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.r8
    );
    crate::println!(
        "  r9  {:#018x}  r10 {:#018x}  r11 {:#018x}  r12 {:#018x}",
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12
    );
    crate::println!(
        "  r13 {:#018x}  r14 {:#018x}  r15 {:#018x}",
        frame.r13,
        frame.r14,
        frame.r15
    );
}
