//! The PV runtime kit's hypercall-level parts: the Xen ELF notes a PV kernel image must
//! carry ([`xen_elf_notes!`](crate::xen_elf_notes)) and a console writer for dom0 and domU
//! ([`PvConsole`]).
//!
//! The assembly parts (the entry point and the trap entry) are in `xenmsr_asm::pv`; the
//! `xenmsr` crate re-exports both as `xenmsr::pv`.

use core::fmt;
use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use crate::abi::{StartInfo, XenconsInterface};
use crate::{Errno, HypercallPage};

/// One Xen ELF note as assembler text: `(type, directive, value)`. Each note is
/// `namesz` (4, "Xen\0"), `descsz`, the type, the name, then the descriptor, all 4-byte
/// aligned (`xen/include/public/elfnote.h`). Used by [`xen_elf_notes!`](crate::xen_elf_notes).
#[doc(hidden)]
#[macro_export]
macro_rules! __xen_elf_note {
    ($ty:expr, $directive:literal, $value:expr) => {
        concat!(
            ".p2align 2\n",
            ".long 4\n",
            ".long 3f - 2f\n",
            ".long ",
            $ty,
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

/// Emits the Xen ELF notes of a 64-bit PV kernel into section `.note.Xen` (which the
/// linker script must put in a `PT_NOTE` segment, as `xenmsr-pv.ld` does).
///
/// ```ignore
/// xenmsr::xen_elf_notes!(guest_os: "mykernel", guest_version: "0.1", dom0: true);
/// ```
///
/// The notes: `GUEST_OS`, `GUEST_VERSION`, `LOADER` = `generic`, `XEN_VERSION` =
/// `xen-3.0`, `HYPERCALL_PAGE` = the address of `xenmsr_hypercall_page` (so Xen fills the
/// library's page), `FEATURES` = `!writable_page_tables|pae_pgdir_above_4gb`, `PAE_MODE` =
/// `yes`, and `SUPPORTED_FEATURES`: with `dom0: true` it carries `XENFEAT_dom0` (bit 11),
/// without which Xen refuses to build the image as dom0; with `dom0: false` it is 0 and
/// the image boots only as a domU.
#[macro_export]
macro_rules! xen_elf_notes {
    (guest_os: $os:literal, guest_version: $ver:literal, dom0: true $(,)?) => {
        $crate::xen_elf_notes!(@emit $os, $ver, "0x800");
    };
    (guest_os: $os:literal, guest_version: $ver:literal, dom0: false $(,)?) => {
        $crate::xen_elf_notes!(@emit $os, $ver, "0");
    };
    (@emit $os:literal, $ver:literal, $features:literal) => {
        ::core::arch::global_asm!(
            ".pushsection .note.Xen, \"a\", @note",
            $crate::__xen_elf_note!("6", ".asciz", concat!("\"", $os, "\"")),
            $crate::__xen_elf_note!("7", ".asciz", concat!("\"", $ver, "\"")),
            $crate::__xen_elf_note!("8", ".asciz", "\"generic\""),
            $crate::__xen_elf_note!("5", ".asciz", "\"xen-3.0\""),
            $crate::__xen_elf_note!("2", ".quad", "xenmsr_hypercall_page"),
            $crate::__xen_elf_note!(
                "10",
                ".asciz",
                "\"!writable_page_tables|pae_pgdir_above_4gb\""
            ),
            $crate::__xen_elf_note!("9", ".asciz", "\"yes\""),
            $crate::__xen_elf_note!("17", ".long", $features),
            ".popsection",
            options(att_syntax)
        );
    };
}

/// The machine-to-physical table Xen maps read-only into every 64-bit PV guest.
const M2P: *const u64 = 0xffff_8000_0000_0000 as *const u64;

const OUT_OFF: usize = offset_of!(XenconsInterface, out);
const OUT_CONS_OFF: usize = offset_of!(XenconsInterface, out_cons);
const OUT_PROD_OFF: usize = offset_of!(XenconsInterface, out_prod);

/// Where a PV kernel's console output goes: the hypervisor console (`console_io`) for
/// dom0, the PV console ring for a domU (whose `console_io` Xen refuses).
///
/// It implements [`fmt::Write`]; a kernel with several vCPUs wraps it in its own lock
/// (the ring has one producer index).
#[derive(Debug)]
pub enum PvConsole {
    /// `console_io(CONSOLEIO_write)`. Safe to make from any hypercall page: it only asks
    /// Xen to print.
    Hypervisor(HypercallPage),
    /// The domU console ring: made by [`PvConsole::from_start_info`] or
    /// [`ConsoleRing::new`], both `unsafe`, since the writes go to the ring's address.
    Ring(ConsoleRing),
}

/// A domU console ring: where its page is, its event channel and the hypercalls that kick
/// it. The fields are private: writing to the console stores into the page, so only
/// [`ConsoleRing::new`] (whose caller vouches for the address) makes one.
///
/// Safe code cannot point a ring at memory of its choosing:
///
/// ```compile_fail,E0451
/// use xenmsr_hypercall::HypercallPage;
/// use xenmsr_hypercall::pv::ConsoleRing;
/// fn forge(page: HypercallPage) -> ConsoleRing {
///     ConsoleRing { hypercalls: page, ring: core::ptr::NonNull::dangling(), port: 1 }
/// }
/// ```
///
/// ```compile_fail,E0133
/// use xenmsr_hypercall::HypercallPage;
/// use xenmsr_hypercall::pv::ConsoleRing;
/// fn forge(page: HypercallPage) -> ConsoleRing {
///     ConsoleRing::new(page, core::ptr::NonNull::dangling(), 1)
/// }
/// ```
#[derive(Debug)]
pub struct ConsoleRing {
    /// Hypercalls (`evtchn_send`, `sched_yield`).
    hypercalls: HypercallPage,
    /// The ring's page (a `struct xencons_interface`).
    ring: NonNull<u8>,
    /// The console event channel.
    port: u32,
}

// SAFETY: a `ConsoleRing` only stores into the ring through `&mut self` and reads it with
// volatile loads, so moving it to another CPU, or sharing it for `drain` (reads only), is
// as sound as on the CPU that made it; the page stays mapped for the domain's life
// (`new`'s contract).
unsafe impl Send for ConsoleRing {}
// SAFETY: as above: through `&ConsoleRing` the ring is only read.
unsafe impl Sync for ConsoleRing {}

impl ConsoleRing {
    /// The console ring whose page (a `struct xencons_interface`) is mapped at `ring`,
    /// kicked through event channel `port`.
    ///
    /// # Safety
    ///
    /// `ring` must be this domain's console page, mapped readable and writable for as long
    /// as the returned value (or a [`PvConsole`] holding it) is used, and shared only with
    /// the console backend: nothing else may write its output half (`out`, `out_prod`) while
    /// this value writes to it (another `ConsoleRing` of the same page included: keep one
    /// and share it behind a lock). No Rust reference may point into the page.
    ///
    /// ```
    /// use core::ptr::NonNull;
    /// use xenmsr_hypercall::HypercallPage;
    /// use xenmsr_hypercall::pv::{ConsoleRing, PvConsole};
    ///
    /// fn domu_console(hypercalls: HypercallPage, page: NonNull<u8>, port: u32) -> PvConsole {
    ///     // SAFETY: `page` is this domain's console page, mapped for the domain's life,
    ///     // and this is the kernel's only writer of it.
    ///     PvConsole::Ring(unsafe { ConsoleRing::new(hypercalls, page, port) })
    /// }
    /// ```
    pub const unsafe fn new(hypercalls: HypercallPage, ring: NonNull<u8>, port: u32) -> Self {
        ConsoleRing {
            hypercalls,
            ring,
            port,
        }
    }

    /// The ring page's address.
    pub fn as_ptr(&self) -> *const u8 {
        self.ring.as_ptr()
    }

    /// The console event channel.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Kicks the backend through `port` from now on: after a restore or a migration the
    /// ring page keeps its place and contents but the domain's console event channel is
    /// a new one (`start_info.console.domU.evtchn` of the new domain).
    pub fn set_port(&mut self, port: u32) {
        self.port = port;
    }
}

impl PvConsole {
    /// The console of the domain `start_info` describes: the hypervisor console for dom0
    /// (`SIF_INITDOMAIN`), otherwise the ring at `start_info.console.domU.mfn`, found at
    /// `virt_base + pfn * 4096` (the page is in the domain's start-of-day mapping; `pfn`
    /// comes from Xen's machine-to-physical table).
    ///
    /// # Safety
    ///
    /// `start_info` must be this domain's, and for a domU `virt_base` must be the image's
    /// `VIRT_BASE` (0 for an image linked at its physical address, as `xenmsr-pv.ld`
    /// does), with the start-of-day mapping still in place: the console page is then
    /// mapped there for the domain's life. For a domU, as for [`ConsoleRing::new`]: no
    /// other writer of the ring (each call makes a new writer of the same ring; keep one).
    pub unsafe fn from_start_info(
        hypercalls: HypercallPage,
        start_info: &StartInfo,
        virt_base: u64,
    ) -> Self {
        if start_info.is_initdomain() {
            return PvConsole::Hypervisor(hypercalls);
        }
        let entry = M2P.wrapping_add(start_info.console_mfn as usize);
        // SAFETY: Xen maps the M2P table read-only for every PV guest, one entry per
        // machine frame; the console frame is the domain's own.
        let pfn = unsafe { entry.read_volatile() };
        let address = virt_base.wrapping_add(pfn << 12) as usize;
        let Some(ring) = NonNull::new(core::ptr::with_exposed_provenance_mut(address)) else {
            // Only a corrupt M2P entry gives page 0 (never mapped): print through Xen.
            return PvConsole::Hypervisor(hypercalls);
        };
        // SAFETY: the caller's contract: the start-of-day mapping puts the domain's console
        // page there for the domain's life, and this is the kernel's one writer of it.
        PvConsole::Ring(unsafe { ConsoleRing::new(hypercalls, ring, start_info.console_evtchn) })
    }

    /// Points a ring console at a new event channel ([`ConsoleRing::set_port`]); the
    /// hypervisor console has none.
    pub fn set_port(&mut self, port: u32) {
        if let PvConsole::Ring(ring) = self {
            ring.set_port(port);
        }
    }

    /// Writes `bytes`. On the ring, waits (yielding) while the ring is full, and gives up
    /// after a long time with nobody draining it (`Err(EAGAIN)`) rather than hang.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), Errno> {
        match self {
            PvConsole::Hypervisor(page) => page.console_write(bytes).map(drop),
            PvConsole::Ring(ring) => ring_write(ring.hypercalls, ring.ring, ring.port, bytes),
        }
    }

    /// Waits (yielding, bounded) until the backend has consumed everything written, so
    /// that output is not lost when the domain shuts down next.
    pub fn drain(&self) {
        if let PvConsole::Ring(ring) = self {
            for _ in 0..100_000 {
                if read_u32(ring.ring, OUT_CONS_OFF) == read_u32(ring.ring, OUT_PROD_OFF) {
                    return;
                }
                let _ = ring.hypercalls.sched_yield();
            }
        }
    }
}

impl fmt::Write for PvConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

fn read_u32(ring: NonNull<u8>, offset: usize) -> u32 {
    // SAFETY: `ring` is the console page (`ConsoleRing::new`'s contract) and `offset` one
    // of its aligned index fields; the backend writes it, so it is read volatile, never
    // through a reference.
    unsafe {
        ring.as_ptr()
            .wrapping_add(offset)
            .cast::<u32>()
            .read_volatile()
    }
}

fn ring_write(
    hypercalls: HypercallPage,
    ring: NonNull<u8>,
    port: u32,
    mut bytes: &[u8],
) -> Result<(), Errno> {
    let page = ring.as_ptr();
    let mut waits = 0u32;
    while !bytes.is_empty() {
        let cons = read_u32(ring, OUT_CONS_OFF);
        let mut prod = read_u32(ring, OUT_PROD_OFF);
        fence(Ordering::Acquire);
        while prod.wrapping_sub(cons) < XenconsInterface::OUT_SIZE && !bytes.is_empty() {
            let slot = page.wrapping_add(OUT_OFF + XenconsInterface::out_pos(prod));
            // SAFETY: a byte of the ring's `out` array (index masked by `out_pos`), which
            // the backend only reads between `out_cons` and `out_prod`.
            unsafe { slot.write_volatile(bytes[0]) };
            prod = prod.wrapping_add(1);
            bytes = &bytes[1..];
        }
        fence(Ordering::Release);
        // SAFETY: the producer index of the console page, written only by the guest.
        unsafe {
            page.wrapping_add(OUT_PROD_OFF)
                .cast::<u32>()
                .write_volatile(prod)
        };
        hypercalls.evtchn_send(port)?;
        if !bytes.is_empty() {
            let _ = hypercalls.sched_yield();
            waits += 1;
            if waits > 1_000_000 {
                return Err(Errno::EAGAIN);
            }
        }
    }
    Ok(())
}
