//! A debugger or a panic inside the library's handler must be able to walk the stack out
//! of the stub to the kernel code that made the access: the `.S` stubs describe their
//! frames with CFI directives. This test takes a backtrace with the platform unwinder
//! (the one `std::backtrace` and gdb's `bt` rely on, driven by `.eh_frame`) from inside
//! the handler each generic stub calls, and from inside the hypercall a segment-base stub
//! makes, and requires the caller's own function in it. Without the stubs' CFI the
//! unwinder stops (or wanders off) at the stub's frame and the caller is missing.

use std::cell::RefCell;

use xenmsr_asm::{Outcome, site};
use xenmsr_host_tests::{install, set_probe, set_script};

thread_local! {
    static TRACE: RefCell<String> = const { RefCell::new(String::new()) };
}

fn capture() {
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    TRACE.with(|t| *t.borrow_mut() = trace);
}

fn take_trace() -> String {
    TRACE.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

#[inline(never)]
fn unwind_probe_caller_read() -> u64 {
    // SAFETY: the scripted backend answers; nothing reaches the hardware.
    unsafe { site::rdmsr(0x10) }
}

#[inline(never)]
fn unwind_probe_caller_write() {
    // SAFETY: as above.
    unsafe { site::wrmsr(0x10, 7) }
}

#[inline(never)]
fn unwind_probe_caller_rdpmc() -> u64 {
    // SAFETY: as above.
    unsafe { site::rdpmc(1) }
}

#[inline(never)]
fn unwind_probe_caller_read_imm() -> u64 {
    // SAFETY: as above.
    unsafe { site::rdmsr_const::<0x10>() }
}

fn assert_walks_to(caller: &str, trace: &str) {
    assert!(
        trace.contains("xenmsr_handle_"),
        "the backtrace was not taken inside the handler:\n{trace}"
    );
    let handler = trace.find("xenmsr_handle_").unwrap_or(0);
    let found = trace[handler..].find(caller);
    assert!(
        found.is_some(),
        "the unwinder did not get from the handler through the stub to `{caller}`:\n{trace}"
    );
}

#[test]
fn backtraces_walk_through_every_generic_stub() {
    install();
    set_probe(Some(capture));
    set_script(Outcome::Done(1));
    unwind_probe_caller_read();
    assert_walks_to("unwind_probe_caller_read", &take_trace());
    unwind_probe_caller_write();
    assert_walks_to("unwind_probe_caller_write", &take_trace());
    unwind_probe_caller_rdpmc();
    assert_walks_to("unwind_probe_caller_rdpmc", &take_trace());
    unwind_probe_caller_read_imm();
    assert_walks_to("unwind_probe_caller_read_imm", &take_trace());
    set_probe(None);
}
