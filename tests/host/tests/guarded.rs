//! Guarded instructions (`guarded_asm!` and the `guarded` helpers) with real faults on the
//! host: ring 3 makes RDMSR raise `#GP` (SIGSEGV, trapno 13), `ud2` raises `#UD`
//! (SIGILL), a load from an unmapped page `#PF` (SIGSEGV, trapno 14), a non-canonical
//! load `#GP`, a division by zero `#DE` (SIGFPE). The signal harness hands the trapno to
//! the production `fixup_exception`, which must find the macro's entry and report the
//! vector as `Err`.

use iced_x86::{Decoder, DecoderOptions};
use xenmsr_asm::extable::{self, Kind};
use xenmsr_asm::guarded::{self, GuardedFault};
use xenmsr_host_tests::{fixups, install_fault_handlers, other_fixups};

const UD: GuardedFault = GuardedFault { vector: 6 };
const GP: GuardedFault = GuardedFault { vector: 13 };
const PF: GuardedFault = GuardedFault { vector: 14 };

/// Runs `f` and returns its result with the fixups it caused: (SIGILL, SIGSEGV, other).
fn counting<T>(f: impl FnOnce() -> T) -> (T, (u64, u64, u64)) {
    let ((ill0, segv0), other0) = (fixups(), other_fixups());
    let value = f();
    let ((ill1, segv1), other1) = (fixups(), other_fixups());
    (value, (ill1 - ill0, segv1 - segv0, other1 - other0))
}

#[test]
fn rdmsr_in_ring_3_is_a_gp() {
    install_fault_handlers();
    for msr in [0x10u32, 0xc000_0080, 0x1234_5678] {
        // SAFETY: in ring 3 the RDMSR faults before it reads anything.
        let (result, faults) = counting(|| unsafe { guarded::rdmsr(msr) });
        assert_eq!(result, Err(GP), "MSR {msr:#x}");
        assert_eq!(faults, (0, 1, 0));
    }
}

#[test]
fn wrmsr_in_ring_3_is_a_gp() {
    install_fault_handlers();
    // SAFETY: in ring 3 the WRMSR faults before it writes anything.
    let (result, faults) = counting(|| unsafe { guarded::wrmsr(0xc000_0100, 0x1000) });
    assert_eq!(result, Err(GP));
    assert_eq!(faults, (0, 1, 0));
}

#[test]
fn ud2_is_a_ud_and_every_other_register_survives() {
    install_fault_handlers();
    let inputs: [u64; 6] = [
        0x0123_4567_89ab_cdef,
        0x1111_2222_3333_4444,
        0x5555_6666_7777_8888,
        0x9999_aaaa_bbbb_cccc,
        0xdddd_eeee_ffff_0000,
        0x0f0f_0f0f_0f0f_0f0f,
    ];
    let mut outputs = [0u64; 6];
    let (result, faults) = counting(|| {
        // SAFETY: `ud2` only raises #UD; the registers are declared inout.
        unsafe {
            xenmsr_asm::guarded_asm!(
                "ud2",
                inout("rax") inputs[0] => outputs[0],
                inout("rcx") inputs[1] => outputs[1],
                inout("rdx") inputs[2] => outputs[2],
                inout("rsi") inputs[3] => outputs[3],
                inout("rdi") inputs[4] => outputs[4],
                inout("r10") inputs[5] => outputs[5],
                options(nostack)
            )
        }
    });
    assert_eq!(result, Err(UD));
    assert_eq!(faults, (1, 0, 0));
    assert_eq!(outputs, inputs, "the fixup changed a register besides r11");
}

#[test]
fn a_load_from_an_unmapped_page_is_a_pf() {
    install_fault_handlers();
    // Addresses nothing can map, whatever other test threads do meanwhile (a page
    // unmapped here could be mapped again by another thread's allocation before the
    // load): the last user page (0x7fff_ffff_f000, at and above Linux's TASK_SIZE) and
    // the first canonical kernel address; and a page mapped without access.
    let unmappable = [0x7fff_ffff_f000usize, 0xffff_8000_0000_0000];
    // SAFETY: a new anonymous mapping without access; unmapped after the test.
    let no_access = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(no_access, libc::MAP_FAILED);
    for addr in [unmappable[0], unmappable[1], no_access as usize + 8, 0] {
        // SAFETY: the page is not readable; the load faults before reading.
        let (result, faults) = counting(|| unsafe { guarded::read_u64(addr) });
        assert_eq!(result, Err(PF), "load from {addr:#x}");
        assert_eq!(faults, (0, 1, 0));
    }
    // SAFETY: the mapping made above, not used any more.
    assert_eq!(unsafe { libc::munmap(no_access, 4096) }, 0);
}

#[test]
fn a_non_canonical_load_is_a_gp() {
    install_fault_handlers();
    for addr in [0x8000_0000_0000_0000usize, 0x0000_8000_0000_0000] {
        // SAFETY: a non-canonical address faults before anything is read.
        let (result, faults) = counting(|| unsafe { guarded::read_u64(addr) });
        assert_eq!(result, Err(GP), "load from {addr:#x}");
        assert_eq!(faults, (0, 1, 0));
    }
}

#[test]
fn a_division_by_zero_is_a_de() {
    install_fault_handlers();
    let divisor = core::hint::black_box(0u64);
    let (mut quotient, mut remainder) = (0u64, 0u64);
    let (result, faults) = counting(|| {
        // SAFETY: `div` writes only rax and rdx (declared) and raises #DE for a zero
        // divisor.
        unsafe {
            xenmsr_asm::guarded_asm!(
                "div {}",
                in(reg) divisor,
                inout("rax") 100u64 => quotient,
                inout("rdx") 0u64 => remainder,
                options(nomem, nostack),
            )
        }
    });
    assert_eq!(result, Err(GuardedFault { vector: 0 }));
    assert_eq!(faults, (0, 0, 1), "one SIGFPE");
    assert_eq!((quotient, remainder), (100, 0), "inputs untouched");
}

#[test]
fn success_returns_the_value_and_takes_no_fault() {
    install_fault_handlers();
    let value = core::hint::black_box(0xfeed_face_cafe_beefu64);
    // SAFETY: a load from a live local.
    let (result, faults) = counting(|| unsafe { guarded::read_u64(&raw const value as usize) });
    assert_eq!(result, Ok(value));
    assert_eq!(faults, (0, 0, 0));
    // The macro with positional operands, AT&T syntax and no trailing comma.
    let doubled: u64;
    // SAFETY: a register-to-register `lea`.
    let result = unsafe {
        xenmsr_asm::guarded_asm!(
            "lea ({0}, {0}), {1}",
            in(reg) 21u64,
            out(reg) doubled,
            options(att_syntax, pure, nomem, nostack, preserves_flags)
        )
    };
    assert_eq!((result, doubled), (Ok(()), 42));
    let (mut quotient, mut remainder) = (0u64, 0u64);
    // SAFETY: a division that does not fault; `div` writes only rax and rdx (declared).
    let result = unsafe {
        xenmsr_asm::guarded_asm!(
            "div {}",
            in(reg) 7u64,
            inout("rax") 100u64 => quotient,
            inout("rdx") 0u64 => remainder,
        )
    };
    assert_eq!((result, quotient, remainder), (Ok(()), 14, 2));
}

#[test]
fn rdfsbase_follows_cr4_fsgsbase() {
    install_fault_handlers();
    // Linux sets CR4.FSGSBASE for user space (5.9 on) where the CPU has it, and says so
    // with HWCAP2_FSGSBASE; otherwise the instruction raises #UD.
    const HWCAP2_FSGSBASE: u64 = 1 << 1;
    // SAFETY: getauxval only reads the auxiliary vector.
    let enabled = unsafe { libc::getauxval(libc::AT_HWCAP2) } & HWCAP2_FSGSBASE != 0;
    let (fs, faults) = counting(guarded::rdfsbase);
    let (gs, _) = counting(guarded::rdgsbase);
    if enabled {
        let mut expected: u64 = 0;
        // SAFETY: ARCH_GET_FS writes the FS base into `expected`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                0x1003, /* ARCH_GET_FS */
                &raw mut expected,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(fs, Ok(expected), "the thread's FS base");
        assert!(gs.is_ok());
        assert_eq!(faults, (0, 0, 0));
    } else {
        assert_eq!((fs, gs), (Err(UD), Err(UD)));
        assert_eq!(faults, (1, 0, 0));
    }
}

/// Every guarded entry in this test binary covers exactly one instruction (decoded at
/// its `insn`, it ends at its fixup), and the table with them in it is sorted.
#[test]
fn every_guarded_entry_covers_exactly_one_instruction() {
    install_fault_handlers();
    let table = extable::table();
    assert!(extable::is_sorted(table));
    let guarded: Vec<_> = table
        .iter()
        .filter(|e| e.data().kind() == Some(Kind::Guarded))
        .collect();
    assert!(
        guarded.len() >= 8,
        "the helpers and this file's macros emit entries ({} found)",
        guarded.len()
    );
    for entry in guarded {
        assert_eq!(entry.data().bits(), guarded::ENTRY_DATA);
        let (insn, fixup) = (entry.insn_addr(), entry.fixup_addr());
        assert!(fixup > insn && fixup - insn <= 15, "{insn:#x}..{fixup:#x}");
        // SAFETY: the entry's instruction is in this binary's text, mapped readable.
        let bytes = unsafe { core::slice::from_raw_parts(insn as *const u8, fixup - insn) };
        let mut decoder = Decoder::with_ip(64, bytes, insn as u64, DecoderOptions::NONE);
        let instruction = decoder.decode();
        assert!(!instruction.is_invalid(), "{insn:#x}: {bytes:02x?}");
        assert_eq!(
            instruction.len(),
            fixup - insn,
            "{insn:#x}: one instruction, then the fixup"
        );
    }
}

#[test]
fn a_guarded_fault_converts_to_an_msr_error() {
    install_fault_handlers();
    // SAFETY: faults in ring 3.
    let error: xenmsr_asm::MsrError = unsafe { guarded::rdmsr(0x10) }.unwrap_err().into();
    assert_eq!(error, xenmsr_asm::MsrError::Fault { vector: 13 });
}
