//! The PV boot protocol: the Xen ELF notes, the entry point and the boot stack, and the
//! copy of `start_info` the rest of the kernel reads.

use xenmsr_hypercall::abi::StartInfo;

// The Xen ELF notes and the entry point come from the library's PV runtime kit. The
// notes say the image supports dom0 (`SUPPORTED_FEATURES` with `XENFEAT_dom0`) without
// requiring it, so the same image boots as dom0 and as a domU.
xenmsr_hypercall::xen_elf_notes!(guest_os: "xenmsr-pvkernel", guest_version: "0.1", dom0: true);

// Xen enters at CPL3 with rsi = start_info; the kit's entry moves to vCPU 0's slot of the
// vCPU stacks (`smp`: the slot is how code knows its vCPU) and calls `kernel_main` with a
// copy of start_info.
xenmsr_asm::pv_entry!(
    crate::kernel_main,
    stack = "pvk_stacks",
    stack_size = crate::smp::STACK_SIZE
);

/// A copy of Xen's `start_info` page, with the command-line helpers the suites use.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The copy.
    pub start_info: StartInfo,
}

impl BootInfo {
    /// Wraps the copy of `start_info` the kit's entry made.
    pub fn new(start_info: &StartInfo) -> Self {
        BootInfo {
            start_info: *start_info,
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

/// Xen's read-only machine-to-physical table in every 64-bit PV guest.
const M2P: *const u64 = 0xffff_8000_0000_0000 as *const u64;

/// The machine frame of the page at kernel address `va` now: its PFN (VIRT_BASE is 0)
/// looked up in the p2m list Xen maps at `start_info.mfn_list` (which a restore rewrites
/// in place for the new domain).
pub fn mfn_of(va: usize) -> u64 {
    let p2m = crate::boot_info().start_info.mfn_list as *const u64;
    // SAFETY: the p2m list stays mapped for the domain's life with one entry per PFN, and
    // `va` is in the kernel image, so its PFN is in range.
    unsafe { p2m.wrapping_add(va >> 12).read_volatile() }
}

/// The PFN of machine frame `mfn` (Xen's M2P).
pub fn pfn_of(mfn: u64) -> u64 {
    // SAFETY: Xen maps the M2P read-only for every PV guest, one entry per machine frame;
    // the frames asked about are the domain's own.
    unsafe { M2P.wrapping_add(mfn as usize).read_volatile() }
}
