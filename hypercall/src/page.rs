//! The hypercall page abstraction and the one piece of code that calls into it.
//!
//! Xen's ABI for a 64-bit PV guest: the hypercall number goes in `rax`, the arguments in
//! `rdi, rsi, rdx, r10, r8`, and the result comes back in `rax`. Each entry of the page is
//! 32 bytes (`push %rcx; push %r11; mov $nr,%eax; syscall; pop %r11; pop %rcx; ret`), so
//! `rcx` and `r11` survive. Debug builds of Xen deliberately poison the argument
//! registers, so every argument register is declared clobbered.

use core::arch::asm;
use core::ptr::NonNull;

use crate::Errno;

/// Size of one hypercall page entry.
pub const ENTRY_SIZE: usize = 32;
/// Number of entries in a 4 KiB hypercall page.
pub const ENTRIES: usize = 4096 / ENTRY_SIZE;
/// The first byte of every entry Xen writes: `push %rcx`.
pub const ENTRY_FIRST_BYTE: u8 = 0x51;

/// A hypercall page: 128 entries of 32 bytes, entry `n` performing hypercall `n`.
///
/// # Invariants
///
/// `base` points to 4 KiB of readable, executable memory whose entry `n` honours Xen's
/// hypercall register contract for hypercall `n` (see the module docs), or faults on
/// entry (the poisoned, not yet filled real page), for as long as this value or any copy
/// of it exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallPage {
    base: NonNull<u8>,
}

// SAFETY: the page is immutable code once filled; calling into it from several CPUs or
// threads at once is what Xen's page is for, and the mock page dispatches per thread.
unsafe impl Send for HypercallPage {}
// SAFETY: as above; `HypercallPage` holds no interior mutability.
unsafe impl Sync for HypercallPage {}

impl HypercallPage {
    /// Wraps a page of hypercall entries.
    ///
    /// # Safety
    ///
    /// `base` must point to 4 KiB of readable, executable memory whose 32-byte entries
    /// honour Xen's hypercall register contract (number in `rax`; arguments in
    /// `rdi, rsi, rdx, r10, r8`, which may be clobbered; result in `rax`; every other
    /// register preserved), or fault at their first instruction, and it must stay so for
    /// as long as the returned value or a copy of it is used.
    pub const unsafe fn from_raw(base: NonNull<u8>) -> Self {
        HypercallPage { base }
    }

    /// The address of the page.
    pub fn as_ptr(self) -> *const u8 {
        self.base.as_ptr()
    }

    /// Whether the page holds hypercall entries: entry 0 starts with `push %rcx` (0x51),
    /// as Xen writes it (and the mock page copies), rather than the `ud2` poison of the
    /// unfilled real page.
    pub fn is_filled(self) -> bool {
        // SAFETY: the page is readable (type invariant); one byte at its start is read
        // and nothing writes the page while a `HypercallPage` exists.
        unsafe { self.base.as_ptr().read() == ENTRY_FIRST_BYTE }
    }

    /// The address of the entry for hypercall `nr`.
    pub fn entry(self, nr: u32) -> *const u8 {
        debug_assert!((nr as usize) < ENTRIES);
        self.base
            .as_ptr()
            .wrapping_add((nr as usize % ENTRIES) * ENTRY_SIZE)
    }

    /// Makes hypercall `nr` with up to five arguments and returns Xen's raw `rax`.
    ///
    /// This is the only place that enters a hypercall page; the typed wrappers all come
    /// through here, on the real page and on the mock alike.
    ///
    /// # Safety
    ///
    /// The hypercall and its arguments must be valid for the calling domain: pointer
    /// arguments must point to memory of the type and size the hypercall expects, which
    /// Xen may read or write for the duration of the call, and the hypercall's side
    /// effects (on page tables, trap handlers, the domain's life ...) must be ones the
    /// caller can uphold Rust's safety rules under.
    #[inline]
    pub unsafe fn call_raw(self, nr: u32, args: [u64; 5]) -> i64 {
        let entry = self.entry(nr);
        let ret: i64;
        // SAFETY: `entry` points into a page that honours Xen's register contract, or
        // faults at once if it is the unfilled real page (type invariant): the clobbered argument registers are declared as such, `rax` is the
        // number in and the result out, and every other register is preserved by the
        // entry. The asm pushes (a `call`), so `nostack` is not given; memory may be read
        // and written by the hypercall, so neither `nomem` nor `readonly` is given. The
        // caller upholds the hypercall's own contract.
        unsafe {
            asm!(
                "call {entry}",
                entry = in(reg) entry,
                inlateout("rax") nr as u64 => ret,
                inlateout("rdi") args[0] => _,
                inlateout("rsi") args[1] => _,
                inlateout("rdx") args[2] => _,
                inlateout("r10") args[3] => _,
                inlateout("r8") args[4] => _,
            );
        }
        ret
    }

    /// Like [`call_raw`](Self::call_raw), with Xen's result decoded into a `Result`.
    ///
    /// # Safety
    ///
    /// As for [`call_raw`](Self::call_raw).
    #[inline]
    pub unsafe fn call(self, nr: u32, args: [u64; 5]) -> Result<u64, Errno> {
        // SAFETY: forwarded to the caller.
        Errno::from_ret(unsafe { self.call_raw(nr, args) })
    }
}

// ---------------------------------------------------------------------------------------
// The real page (PV kernel builds only).
// ---------------------------------------------------------------------------------------

// The page Xen fills at domain build time, found through the kernel's
// `XEN_ELFNOTE_HYPERCALL_PAGE` note. Until (unless) Xen fills it, every two bytes are
// `ud2`, so a call into any entry raises #UD at once instead of running into whatever
// follows. `.fill` emits exactly 2048 two-byte `ud2`s; the kernel's linker script also
// asserts the section is one page. (An assembler `.if . - sym - 4096` check is not an
// absolute expression once the section has relaxable fragments, which release builds of
// this target hit.)
#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".pushsection .text.xenmsr_hypercall_page,\"ax\",@progbits",
    ".balign 4096",
    ".globl xenmsr_hypercall_page",
    ".type xenmsr_hypercall_page,@function",
    "xenmsr_hypercall_page:",
    ".fill 2048, 2, 0x0b0f",
    ".size xenmsr_hypercall_page, 4096",
    ".popsection",
);

#[cfg(target_os = "none")]
unsafe extern "C" {
    /// The hypercall page defined by the `global_asm!` above: 4 KiB, page aligned, in an
    /// executable section; only ever written by Xen before the kernel starts.
    safe static xenmsr_hypercall_page: [u8; 4096];
}

#[cfg(target_os = "none")]
impl HypercallPage {
    /// The kernel's own hypercall page, `xenmsr_hypercall_page`.
    ///
    /// Xen fills it at domain build time if the kernel's `XEN_ELFNOTE_HYPERCALL_PAGE` note
    /// gives its address; otherwise it stays poisoned with `ud2` and any call faults with
    /// #UD. Check [`is_filled`](Self::is_filled) before relying on it.
    pub fn xen() -> HypercallPage {
        // The page upholds the invariant: it is readable and executable, and each entry
        // either is Xen's (register contract honoured) or faults at once.
        HypercallPage {
            base: NonNull::from(&xenmsr_hypercall_page).cast(),
        }
    }
}
