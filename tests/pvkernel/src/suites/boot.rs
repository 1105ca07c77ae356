//! Boot-level tests: the boot protocol, the console, and the trap path (every exception
//! the kernel expects recovered through its own table, registers intact).

use core::arch::asm;

use super::raw;
use crate::fixup::exinfo;
use crate::testing::{Test, TestResult};
use crate::{check, check_eq, hv, kx_entry, test, traps};

/// The boot-level tests.
pub static TESTS: &[Test] = &[
    test!(hypercall_page_filled),
    test!(tracing_page_forwards),
    test!(start_info),
    test!(console),
    test!(ud2_is_recovered),
    test!(trap_preserves_registers),
    test!(divide_error_is_recovered),
    test!(int3_is_recovered),
    test!(page_fault_is_recovered),
    test!(non_canonical_load_is_gp),
    test!(rdmsr_unknown_is_gp),
];

fn hypercall_page_filled() -> TestResult {
    check!(
        hv::page().is_filled(),
        "the hypercall page still holds its ud2 poison"
    );
    Ok(())
}

fn tracing_page_forwards() -> TestResult {
    let before = crate::tracepage::snapshot();
    let page = crate::tracepage::page();
    // SCHEDOP_yield through the tracing page reaches Xen (Ok) and is counted once.
    check_eq!(
        page.sched_yield(),
        Ok(()),
        "sched_yield through the tracing page"
    );
    let after = crate::tracepage::snapshot();
    check_eq!(
        after.count_since(&before, hv::nr::SCHED_OP),
        1u64,
        "sched_op count"
    );
    check_eq!(after.total_since(&before), 1u64, "hypercalls counted");
    Ok(())
}

fn start_info() -> TestResult {
    let info = crate::boot_info();
    check!(
        info.magic().starts_with("xen-3.0-x86_64"),
        "start_info magic {:?}",
        info.magic()
    );
    check!(info.nr_pages() > 0, "start_info.nr_pages is 0");
    let model = super::model();
    check_eq!(
        info.is_dom0(),
        model.dom0,
        "SIF_INITDOMAIN vs the suite= the harness chose"
    );
    check!(
        info.arg("suite").is_some(),
        "no suite= on the command line {:?}",
        info.cmdline()
    );
    Ok(())
}

fn console() -> TestResult {
    if super::model().dom0 {
        let r = hv::page().console_write(b"");
        check!(r.is_ok(), "console_io(write) as dom0: {:?}", r);
    } else {
        // Debian's release Xen refuses console_io from a domU; the ring is the console.
        let r = hv::page().console_write(b"");
        check!(
            r == Err(xenmsr_hypercall::Errno::EPERM),
            "console_io(write) as domU: {:?}, expected EPERM",
            r
        );
    }
    Ok(())
}

fn ud2_is_recovered() -> TestResult {
    let before = traps::count(6);
    let info: u64;
    // SAFETY: the kernel table recovers the ud2 (2b -> 3b) and sets rax.
    unsafe {
        asm!("2: ud2", "3:", kx_entry!(), inout("rax") 0u64 => info, options(nostack, nomem));
    }
    check_eq!(info, exinfo(6, 0), "exception info");
    check_eq!(traps::count(6), before + 1, "#UD count");
    Ok(())
}

fn trap_preserves_registers() -> TestResult {
    const P: [u64; 11] = [
        0x1111_2222_3333_4444,
        0x5555_6666_7777_8888,
        0x9999_aaaa_bbbb_cccc,
        0xdddd_eeee_ffff_0001,
        0x0123_4567_89ab_cdef,
        0xfedc_ba98_7654_3210,
        0x0f0f_0f0f_f0f0_f0f0,
        0xa5a5_5a5a_a5a5_5a5a,
        0x8000_0000_0000_0001,
        0x7fff_ffff_ffff_fffe,
        0x0000_0000_dead_beef,
    ];
    const RBX: u64 = 0x1357_9bdf_2468_ace0;
    let mut out = [0u64; 11];
    let rbx_out: u64;
    // SAFETY: the kernel table recovers the ud2; rbx (which LLVM may not take as an
    // operand) is saved and restored around the block by hand, its value during the trap
    // copied to r15; the stack is left as found.
    unsafe {
        asm!(
            "push rbx",
            "mov rbx, 0x13579bdf2468ace0",
            "2: ud2",
            "3:",
            kx_entry!(),
            "mov r15, rbx",
            "pop rbx",
            out("r15") rbx_out,
            inout("rcx") P[0] => out[0],
            inout("rdx") P[1] => out[1],
            inout("rsi") P[2] => out[2],
            inout("rdi") P[3] => out[3],
            inout("r8") P[4] => out[4],
            inout("r9") P[5] => out[5],
            inout("r10") P[6] => out[6],
            inout("r11") P[7] => out[7],
            inout("r12") P[8] => out[8],
            inout("r13") P[9] => out[9],
            inout("r14") P[10] => out[10],
            inout("rax") 0u64 => _,
        );
    }
    const NAMES: [&str; 11] = [
        "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    ];
    for i in 0..P.len() {
        check_eq!(out[i], P[i], NAMES[i]);
    }
    check_eq!(rbx_out, RBX, "rbx");
    Ok(())
}

fn divide_error_is_recovered() -> TestResult {
    let info: u64;
    // SAFETY: the kernel table recovers the #DE; `div` touches only rax/rdx.
    unsafe {
        asm!(
            "2: div rcx",
            "3:",
            kx_entry!(),
            in("rcx") 0u64,
            inout("rax") 1u64 => info,
            inout("rdx") 0u64 => _,
            options(nostack, nomem),
        );
    }
    check_eq!(info, exinfo(0, 0), "exception info");
    Ok(())
}

fn int3_is_recovered() -> TestResult {
    let info: u64;
    // #BP is a trap: the reported rip is the instruction after int3, so the table entry
    // covers the nop that follows. Without the exception the nop runs and rax stays 0.
    // SAFETY: the kernel table recovers at 3b.
    unsafe {
        asm!(
            "int3",
            "2: nop",
            "3:",
            kx_entry!(),
            inout("rax") 0u64 => info,
            options(nostack, nomem),
        );
    }
    check_eq!(info, exinfo(3, 0), "exception info");
    Ok(())
}

fn page_fault_is_recovered() -> TestResult {
    // Canonical, in the guest-owned lower half, and far above anything Xen mapped for us.
    let r = raw::probe_read(0x0000_7fff_dead_0000);
    let Err(info) = r else {
        crate::fail!("load from an unmapped address succeeded: {:x?}", r);
    };
    check_eq!((info >> 16) & 0xff, 14, "vector");
    check_eq!(info & 1, 0, "#PF error code P bit");
    Ok(())
}

fn non_canonical_load_is_gp() -> TestResult {
    check_eq!(
        raw::probe_read(0x8000_0000_0000_0000),
        Err(exinfo(13, 0)),
        "non-canonical load"
    );
    Ok(())
}

fn rdmsr_unknown_is_gp() -> TestResult {
    // With a #GP handler registered Xen must deliver the fault, not fake a 0 read.
    check_eq!(
        raw::rdmsr(0x1234_5678),
        Err(exinfo(13, 0)),
        "rdmsr 0x12345678"
    );
    Ok(())
}
