//! Exception handling: the kernel's handler behind the library's PV trap entry, and the
//! dispatcher that asks the library's `fixup_exception` (and, for the boot-level trap
//! tests, the kernel's own exception table) to recover, or reports the fault and fails the
//! run.
//!
//! The entry itself (one stub per vector that pops Xen's `rcx`/`r11`, the common path that
//! saves a `TrapFrame`, and the return through the `iret` hypercall) is the runtime kit's
//! (`xenmsr_asm::pv`). This kernel registers its handler to see every trap first
//! (`library_fixup_first = false`), so that it counts each exception before recovering it.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use xenmsr_asm::pv::{self, Trap};

use crate::smp::{CacheAligned, MAX_VCPUS, PerVcpu, vcpu_index};

pub use xenmsr_asm::fixup::TrapFrame;
pub use xenmsr_asm::pv::{VECTOR_FAILSAFE, VECTOR_UPCALL, VECTORS};

/// Vector names, for reports (the kit's: `"#GP"`, or `"?"` for a vector without one).
pub const fn vector_name(vector: u8) -> &'static str {
    xenmsr::guarded::GuardedFault { vector }.mnemonic()
}

/// The entry points of the event callback and the failsafe callback.
pub fn callback_entries() -> (u64, u64) {
    pv::callback_entries()
}

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

/// This kernel's registration with the kit: its handler sees every trap, before any
/// fixup.
static TRAPS: pv::TrapRegistration = pv::TrapRegistration::new(pvk_trap_handler, false);

/// Registers this kernel's handler with the kit (every trap, before any fixup) and the
/// kit's trap table on this vCPU.
pub fn install() -> Result<(), xenmsr_hypercall::Errno> {
    // SAFETY: `pvk_trap_handler` returns only with the frame as it came (upcalls, the
    // failsafe suite's expected callbacks), as the library's `fixup_exception` left it,
    // or moved to one of this kernel's own exception-table landing points with the
    // registers that code expects (`fixup::fixup`); any other trap stops the kernel.
    unsafe { pv::set_trap_handler(&TRAPS) };
    pv::install_trap_table()
}

/// The kernel's side of every exception and upcall.
fn pvk_trap_handler(frame: &mut TrapFrame, trap: &Trap) {
    let vector = trap.vector;
    if vector == VECTOR_UPCALL {
        crate::events::upcall(frame);
        return;
    }
    if vector == VECTOR_FAILSAFE {
        if crate::suites::failsafe::on_failsafe(frame, trap) {
            return;
        }
        crate::println!(
            "PANIC: Xen's failsafe callback: it could not reload {:x?} at rip {:#x}",
            trap.failsafe_selectors(),
            frame.rip
        );
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
    let fixed = crate::fixup::fixup(frame, vector, trap.error_code);
    if !fixed {
        report_unhandled(frame, vector, trap.error_code, trap.cs);
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
