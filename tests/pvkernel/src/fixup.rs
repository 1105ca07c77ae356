//! Recovery from exceptions: first the library's `fixup_exception` (its extable: MSR
//! sites and stubs), then the kernel's own small table, used only by the boot-level
//! trap tests to prove the trap path before any library code is involved.
//!
//! A kernel-table entry is `{ fault, resume }` (two addresses, in section
//! `pvkernel_extable`). Its fixup resumes at `resume` with `rax` = the exception info
//! `1 << 31 | vector << 16 | error_code & 0xffff` (XTF's `exinfo_t` encoding), so a test
//! sees which exception it took.

use xenmsr_asm::{VECTOR_GP, VECTOR_UD};

use crate::traps::TrapFrame;

/// One entry of the kernel's own exception table.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Entry {
    /// Address of the instruction that may fault.
    pub fault: u64,
    /// Where to resume.
    pub resume: u64,
}

unsafe extern "C" {
    static __start_pvkernel_extable: [Entry; 0];
    static __stop_pvkernel_extable: [Entry; 0];
}

/// The kernel's exception table.
fn table() -> &'static [Entry] {
    let start = (&raw const __start_pvkernel_extable).cast::<Entry>();
    let stop = (&raw const __stop_pvkernel_extable).cast::<Entry>();
    let len = (stop as usize - start as usize) / size_of::<Entry>();
    // SAFETY: the linker script defines both symbols around the `pvkernel_extable`
    // input sections, which hold only 16-byte `Entry` records (emitted by `kx_entry!`),
    // 8-aligned, and nothing writes them.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// Exception info as the kernel table's fixup reports it in `rax`.
pub const fn exinfo(vector: u8, error_code: u64) -> u64 {
    (1 << 31) | ((vector as u64) << 16) | (error_code & 0xffff)
}

/// Tries to recover from an exception; `false` means nobody could.
pub fn fixup(frame: &mut TrapFrame, vector: u8, error_code: u64) -> bool {
    if library_fixup(frame, vector) {
        return true;
    }
    if let Some(entry) = table().iter().find(|e| e.fault == frame.rip) {
        frame.rip = entry.resume;
        frame.rax = exinfo(vector, error_code);
        return true;
    }
    false
}

/// The library's fixup, for the vectors an MSR access can raise (`#GP` from the
/// instruction or Xen's emulation, `#UD` from a stub's rewind trap).
fn library_fixup(frame: &mut TrapFrame, vector: u8) -> bool {
    if vector != VECTOR_GP && vector != VECTOR_UD {
        return false;
    }
    // SAFETY: `frame` is the interrupted context of this very exception, saved by the
    // trap entry with `rsp` being the interrupted stack pointer, and the entry writes any
    // change back before returning through `iret`.
    unsafe { xenmsr_asm::fixup::fixup_exception(frame, vector) }
}

/// Emits a kernel exception-table entry for the instruction at local label `2:` that
/// resumes at local label `3:`. Use inside `asm!`, after both labels.
#[macro_export]
macro_rules! kx_entry {
    () => {
        concat!(
            ".pushsection pvkernel_extable, \"a\", @progbits\n",
            ".p2align 3\n",
            ".quad 2b, 3b\n",
            ".popsection\n"
        )
    };
}
