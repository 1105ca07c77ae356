//! Register contract of the mock page, checked from asm: load random values into every
//! general register and `xmm0-15`, call a page entry, and store every register after.
//! Everything Xen preserves (`rbx, rbp, rsp, r9, r12-r15, rcx, r11`, the vector state)
//! must survive; the five argument registers must come back poisoned; `rax` carries the
//! result; and the dispatcher must have seen the number and the arguments.
#![cfg(feature = "mock")]

use std::arch::global_asm;

use xenmsr_hypercall::mock::{self, MockCall, POISON};

/// Register image: general registers by index, then `xmm0-15`.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Regs {
    gpr: [u64; 16],
    xmm: [[u64; 2]; 16],
    /// `rsp` just before the `call` of the entry (written by the driver).
    rsp_before: u64,
    /// `rsp` just after it returned (written by the driver).
    rsp_after: u64,
}

const RAX: usize = 0;
const RBX: usize = 1;
const RCX: usize = 2;
const RDX: usize = 3;
const RSI: usize = 4;
const RDI: usize = 5;
const RBP: usize = 6;
const R8: usize = 7;
const R9: usize = 8;
const R10: usize = 9;
const R11: usize = 10;
const R12: usize = 11;
const R13: usize = 12;
const R14: usize = 13;
const R15: usize = 14;
const NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

// `xenmsr_hc_test_call_entry(entry, in, out, misalign)`, C ABI: saves the callee-saved
// registers, moves rsp down by `misalign` bytes, loads every general register except rsp
// and xmm0-15 from `in`, calls `entry`, stores every register to `out`, and returns.
global_asm!(
    ".pushsection .text.xenmsr_hc_test_call_entry,\"ax\",@progbits",
    ".globl xenmsr_hc_test_call_entry",
    ".hidden xenmsr_hc_test_call_entry",
    ".type xenmsr_hc_test_call_entry,@function",
    ".p2align 4",
    "xenmsr_hc_test_call_entry:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rax, rsp",
    "sub rsp, rcx",
    "push rax", // the rsp to go back to
    "push rdx", // out
    "push rdi", // entry
    "mov [rdx + 384], rsp",
    "movdqa xmm0, [rsi + 128]",
    "movdqa xmm1, [rsi + 144]",
    "movdqa xmm2, [rsi + 160]",
    "movdqa xmm3, [rsi + 176]",
    "movdqa xmm4, [rsi + 192]",
    "movdqa xmm5, [rsi + 208]",
    "movdqa xmm6, [rsi + 224]",
    "movdqa xmm7, [rsi + 240]",
    "movdqa xmm8, [rsi + 256]",
    "movdqa xmm9, [rsi + 272]",
    "movdqa xmm10, [rsi + 288]",
    "movdqa xmm11, [rsi + 304]",
    "movdqa xmm12, [rsi + 320]",
    "movdqa xmm13, [rsi + 336]",
    "movdqa xmm14, [rsi + 352]",
    "movdqa xmm15, [rsi + 368]",
    "mov rax, [rsi + 0]",
    "mov rbx, [rsi + 8]",
    "mov rcx, [rsi + 16]",
    "mov rdx, [rsi + 24]",
    "mov rdi, [rsi + 40]",
    "mov rbp, [rsi + 48]",
    "mov r8, [rsi + 56]",
    "mov r9, [rsi + 64]",
    "mov r10, [rsi + 72]",
    "mov r11, [rsi + 80]",
    "mov r12, [rsi + 88]",
    "mov r13, [rsi + 96]",
    "mov r14, [rsi + 104]",
    "mov r15, [rsi + 112]",
    "mov rsi, [rsi + 32]",
    "call qword ptr [rsp]",
    "push rsi",
    "mov rsi, [rsp + 16]",
    "mov [rsi + 0], rax",
    "mov [rsi + 8], rbx",
    "mov [rsi + 16], rcx",
    "mov [rsi + 24], rdx",
    "mov [rsi + 40], rdi",
    "mov [rsi + 48], rbp",
    "mov [rsi + 56], r8",
    "mov [rsi + 64], r9",
    "mov [rsi + 72], r10",
    "mov [rsi + 80], r11",
    "mov [rsi + 88], r12",
    "mov [rsi + 96], r13",
    "mov [rsi + 104], r14",
    "mov [rsi + 112], r15",
    "pop rax",
    "mov [rsi + 32], rax",
    "lea rax, [rsp]", // rsp as the entry returned it (rsi's copy was popped)
    "mov [rsi + 392], rax",
    "movdqa [rsi + 128], xmm0",
    "movdqa [rsi + 144], xmm1",
    "movdqa [rsi + 160], xmm2",
    "movdqa [rsi + 176], xmm3",
    "movdqa [rsi + 192], xmm4",
    "movdqa [rsi + 208], xmm5",
    "movdqa [rsi + 224], xmm6",
    "movdqa [rsi + 240], xmm7",
    "movdqa [rsi + 256], xmm8",
    "movdqa [rsi + 272], xmm9",
    "movdqa [rsi + 288], xmm10",
    "movdqa [rsi + 304], xmm11",
    "movdqa [rsi + 320], xmm12",
    "movdqa [rsi + 336], xmm13",
    "movdqa [rsi + 352], xmm14",
    "movdqa [rsi + 368], xmm15",
    "mov rsp, [rsp + 16]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size xenmsr_hc_test_call_entry, . - xenmsr_hc_test_call_entry",
    ".popsection",
);

unsafe extern "C" {
    /// See the `global_asm!` above; it also records `rsp` around the call in `out`.
    fn xenmsr_hc_test_call_entry(
        entry: *const u8,
        input: *const Regs,
        out: *mut Regs,
        misalign: u64,
    );
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn call_entry(nr: u32, input: &Regs, misalign: u64) -> Regs {
    let mut out = Regs::default();
    let entry = mock::page().entry(nr);
    // SAFETY: `entry` is an entry of the mock page, which honours the hypercall register
    // contract; the driver restores every callee-saved register and the stack itself.
    unsafe { xenmsr_hc_test_call_entry(entry, input, &mut out, misalign) };
    out
}

fn check(nr: u32, input: &Regs, out: &Regs, result: i64, what: &str) {
    let mut errors = Vec::new();
    for reg in [RBX, RCX, RBP, R9, R11, R12, R13, R14, R15] {
        if out.gpr[reg] != input.gpr[reg] {
            errors.push(format!(
                "{} not preserved: {:#x} -> {:#x}",
                NAMES[reg], input.gpr[reg], out.gpr[reg]
            ));
        }
    }
    // A debug Xen overwrites the argument registers the hypercall uses and leaves the
    // others; the mock does the same.
    let used = mock::args_used(nr);
    for (i, reg) in [RDI, RSI, RDX, R10, R8].into_iter().enumerate() {
        if i < used && out.gpr[reg] != POISON {
            errors.push(format!("{} not poisoned: {:#x}", NAMES[reg], out.gpr[reg]));
        }
        if i >= used && out.gpr[reg] != input.gpr[reg] {
            errors.push(format!(
                "{} (not an argument of hypercall {nr}) not preserved: {:#x} -> {:#x}",
                NAMES[reg], input.gpr[reg], out.gpr[reg]
            ));
        }
    }
    if out.rsp_after != out.rsp_before {
        errors.push(format!("rsp {:#x} -> {:#x}", out.rsp_before, out.rsp_after));
    }
    if out.gpr[RAX] != result as u64 {
        errors.push(format!("rax {:#x}, expected {result:#x}", out.gpr[RAX]));
    }
    for i in 0..16 {
        if out.xmm[i] != input.xmm[i] {
            errors.push(format!(
                "xmm{i} not preserved: {:x?} -> {:x?}",
                input.xmm[i], out.xmm[i]
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "{what}, nr {nr}:\n  {}",
        errors.join("\n  ")
    );
    // The recorded arguments: the ones the hypercall uses, the rest recorded as 0.
    let mut args = [
        input.gpr[RDI],
        input.gpr[RSI],
        input.gpr[RDX],
        input.gpr[R10],
        input.gpr[R8],
    ];
    for unused in args.iter_mut().skip(used) {
        *unused = 0;
    }
    mock::assert_calls(&[MockCall::new(nr, args)]);
}

fn random_regs(rng: &mut Rng) -> Regs {
    let mut regs = Regs::default();
    for r in &mut regs.gpr {
        *r = rng.next();
    }
    for x in &mut regs.xmm {
        *x = [rng.next(), rng.next()];
    }
    regs
}

#[test]
fn entry_preserves_what_xen_preserves_random_states() {
    let _m = mock::session();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..500 {
        let input = random_regs(&mut rng);
        let nr = (rng.next() % 128) as u32;
        let result = rng.next() as i64;
        mock::script(nr, result);
        let misalign = (i % 16) as u64;
        let out = call_entry(nr, &input, misalign);
        check(
            nr,
            &input,
            &out,
            result,
            &format!("iteration {i}, misalign {misalign}"),
        );
    }
}

#[test]
fn entry_restores_vector_state_the_dispatcher_clobbers() {
    let _m = mock::session();
    // The handler wipes every vector register, as any Rust or libc code may.
    mock::on(40, |_| {
        // SAFETY: zeroes registers that the C ABI lets a callee clobber; declared below.
        unsafe {
            std::arch::asm!(
                "xorps xmm0, xmm0", "xorps xmm1, xmm1", "xorps xmm2, xmm2", "xorps xmm3, xmm3",
                "xorps xmm4, xmm4", "xorps xmm5, xmm5", "xorps xmm6, xmm6", "xorps xmm7, xmm7",
                "xorps xmm8, xmm8", "xorps xmm9, xmm9", "xorps xmm10, xmm10",
                "xorps xmm11, xmm11", "xorps xmm12, xmm12", "xorps xmm13, xmm13",
                "xorps xmm14, xmm14", "xorps xmm15, xmm15",
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nomem, nostack, preserves_flags),
            );
        }
        -95
    });
    let mut rng = Rng(42);
    for _ in 0..20 {
        let input = random_regs(&mut rng);
        let out = call_entry(40, &input, 0);
        check(40, &input, &out, -95, "handler clobbering xmm");
    }
}

#[test]
fn entry_keeps_the_stack_pointer() {
    let _m = mock::session();
    let mut rng = Rng(7);
    for misalign in 0..16 {
        let input = random_regs(&mut rng);
        let out = call_entry(1, &input, misalign);
        assert_eq!(out.rsp_before, out.rsp_after, "misalign {misalign}");
        assert_eq!(
            out.rsp_before % 16,
            (16 - misalign) % 16,
            "driver misaligns as asked"
        );
        mock::take_calls();
    }
}
