//! The PV boot protocol: the Xen ELF notes, the entry point and the boot stack, and the
//! copy of `start_info` the rest of the kernel reads.

use core::arch::global_asm;

use xenmsr_hypercall::abi::StartInfo;

// The Xen ELF notes (xen/include/public/elfnote.h). Each note: namesz 4 ("Xen\0"), descsz,
// type, name, then the descriptor, all 4-byte aligned. No SUPPORTED_FEATURES note (it
// would have to carry XENFEAT_dom0 for the dom0 build) and no `!dom0` in FEATURES (the
// domU builder would refuse it): the same image boots as dom0 and as a domU.
/// One Xen ELF note as assembler text: `xen_note!(type, directive, value)`.
macro_rules! xen_note {
    ($ty:literal, $directive:literal, $value:literal) => {
        concat!(
            ".p2align 2\n",
            ".long 4\n",
            ".long 3f - 2f\n",
            ".long ",
            stringify!($ty),
            "\n",
            ".asciz \"Xen\"\n",
            ".p2align 2\n",
            "2: ",
            $directive,
            " ",
            $value,
            "\n",
            "3: .p2align 2\n",
        )
    };
}

global_asm!(
    ".pushsection .note.Xen, \"a\", @note",
    xen_note!(6, ".asciz", "\"xenmsr-pvkernel\""), // GUEST_OS
    xen_note!(7, ".asciz", "\"0.1\""),             // GUEST_VERSION
    xen_note!(8, ".asciz", "\"generic\""),         // LOADER
    xen_note!(5, ".asciz", "\"xen-3.0\""),         // XEN_VERSION
    xen_note!(2, ".quad", "xenmsr_hypercall_page"), // HYPERCALL_PAGE
    xen_note!(
        10,
        ".asciz",
        "\"!writable_page_tables|pae_pgdir_above_4gb\""
    ), // FEATURES
    xen_note!(9, ".asciz", "\"yes\""),             // PAE_MODE
    ".popsection",
    options(att_syntax)
);

// The entry point. Xen enters at CPL3 (ring 3 is the PV kernel's ring) with rsi = the
// virtual address of start_info, rsp = the top of a one-page boot stack, events masked.
// We move to vCPU 0's slot of the vCPU stacks (`smp`: the slot is how code knows its
// vCPU), 16-byte aligned at the call as the SysV ABI requires, and call Rust with
// start_info as the first argument.
global_asm!(
    r#"
    .pushsection .text.entry, "ax", @progbits
    .globl xenmsr_pvkernel_start
    .type xenmsr_pvkernel_start, @function
xenmsr_pvkernel_start:
    cld
    mov %rsi, %rdi
    lea pvk_stacks + {stack_size}(%rip), %rsp
    and $-16, %rsp
    xor %ebp, %ebp
    call {main}
    ud2
    .size xenmsr_pvkernel_start, . - xenmsr_pvkernel_start
    .popsection
    "#,
    main = sym crate::kernel_main,
    stack_size = const crate::smp::STACK_SIZE,
    options(att_syntax)
);

/// A copy of Xen's `start_info` page, with the command-line helpers the suites use.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The copy.
    pub start_info: StartInfo,
}

impl BootInfo {
    /// Copies `start_info` out of the page Xen passed in `rsi`.
    ///
    /// # Safety
    ///
    /// `start_info` must be the pointer Xen passed at entry (a mapped
    /// `struct start_info`).
    pub unsafe fn read(start_info: *const StartInfo) -> Self {
        BootInfo {
            // SAFETY: the caller guarantees a mapped `start_info`; it is plain data that
            // Xen does not change after entry, and an unaligned read needs no alignment.
            start_info: unsafe { start_info.read_unaligned() },
        }
    }

    /// Whether this domain is dom0.
    pub fn is_dom0(&self) -> bool {
        self.start_info.is_initdomain()
    }

    /// The number of pages Xen gave the domain.
    pub fn nr_pages(&self) -> u64 {
        self.start_info.nr_pages
    }

    /// The command line as text (invalid UTF-8 gives "").
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(self.start_info.cmd_line_bytes()).unwrap_or("")
    }

    /// The magic string (`xen-3.0-x86_64`, plus `p` for a dom0 with PAE_MODE).
    pub fn magic(&self) -> &str {
        core::str::from_utf8(self.start_info.magic_bytes()).unwrap_or("?")
    }

    /// The value of `key=value` on the command line, if present.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.cmdline().split_ascii_whitespace().find_map(|word| {
            let (k, v) = word.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}
