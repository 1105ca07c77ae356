//! Core x86-64 PV structs: trap table, scheduler and event-channel arguments, multicall
//! entries, and `start_info`.

use core::fmt;
use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::nr;
pub use crate::nr::{SIF_INITDOMAIN, SIF_MOD_START_PFN, SIF_PRIVILEGED};

/// One entry of the virtual IDT passed to `set_trap_table` (`struct trap_info`, 16 bytes).
///
/// A table is terminated by an entry whose `address` is 0 ([`TrapInfo::TERMINATOR`]).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct TrapInfo {
    /// The exception vector.
    pub vector: u8,
    /// Bits 0-1: the DPL (the highest ring allowed to raise the vector with `int n`);
    /// bit 2 ([`TrapInfo::MASK_EVENTS`]): mask events on entry, like an interrupt gate.
    pub flags: u8,
    /// The code selector (Xen always delivers on `FLAT_KERNEL_CS` for 64-bit PV).
    pub cs: u16,
    /// Padding.
    pub pad: [u8; 4],
    /// The handler address; 0 terminates the table.
    pub address: u64,
}

impl TrapInfo {
    /// Mask of the DPL bits in `flags`.
    pub const DPL_MASK: u8 = 3;
    /// `flags` bit: mask events on entry.
    pub const MASK_EVENTS: u8 = 4;
    /// The table terminator (all zero).
    pub const TERMINATOR: TrapInfo = TrapInfo {
        vector: 0,
        flags: 0,
        cs: 0,
        pad: [0; 4],
        address: 0,
    };

    /// An entry for `vector` with handler `address`, DPL `dpl` (0..=3), delivered on the
    /// flat kernel code selector.
    pub const fn new(vector: u8, dpl: u8, mask_events: bool, address: u64) -> Self {
        TrapInfo {
            vector,
            flags: (dpl & Self::DPL_MASK) | if mask_events { Self::MASK_EVENTS } else { 0 },
            cs: nr::FLAT_KERNEL_CS,
            pad: [0; 4],
            address,
        }
    }
}

/// The argument of `SCHEDOP_shutdown` (`struct sched_shutdown`, 4 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct SchedShutdown {
    /// A [`ShutdownReason`] value.
    pub reason: u32,
}

/// A shutdown reason (`SHUTDOWN_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct ShutdownReason(pub u32);

impl ShutdownReason {
    /// Power off.
    pub const POWEROFF: Self = Self(nr::SHUTDOWN_POWEROFF);
    /// Reboot.
    pub const REBOOT: Self = Self(nr::SHUTDOWN_REBOOT);
    /// Suspend; the hypercall returns when the domain is resumed (or the suspend cancelled).
    pub const SUSPEND: Self = Self(nr::SHUTDOWN_SUSPEND);
    /// The domain crashed.
    pub const CRASH: Self = Self(nr::SHUTDOWN_CRASH);
    /// The domain's watchdog fired.
    pub const WATCHDOG: Self = Self(nr::SHUTDOWN_WATCHDOG);
    /// Soft reset.
    pub const SOFT_RESET: Self = Self(nr::SHUTDOWN_SOFT_RESET);

    /// The reason's name, if it is one Xen defines.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            nr::SHUTDOWN_POWEROFF => "POWEROFF",
            nr::SHUTDOWN_REBOOT => "REBOOT",
            nr::SHUTDOWN_SUSPEND => "SUSPEND",
            nr::SHUTDOWN_CRASH => "CRASH",
            nr::SHUTDOWN_WATCHDOG => "WATCHDOG",
            nr::SHUTDOWN_SOFT_RESET => "SOFT_RESET",
            _ => return None,
        })
    }
}

impl fmt::Debug for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "ShutdownReason::{name}"),
            None => write!(f, "ShutdownReason({})", self.0),
        }
    }
}

/// The `which` argument of `set_segment_base` (`SEGBASE_*`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct SegmentBase(pub u32);

impl SegmentBase {
    /// The FS base (`MSR_FS_BASE`).
    pub const FS: Self = Self(nr::SEGBASE_FS);
    /// The user GS base (`MSR_KERNEL_GS_BASE` while in the kernel).
    pub const GS_USER: Self = Self(nr::SEGBASE_GS_USER);
    /// The kernel GS base (`MSR_GS_BASE` while in the kernel).
    pub const GS_KERNEL: Self = Self(nr::SEGBASE_GS_KERNEL);
    /// Load the user GS selector from `base[15:0]`.
    pub const GS_USER_SEL: Self = Self(nr::SEGBASE_GS_USER_SEL);

    /// The selector's name, if it is one Xen defines.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            nr::SEGBASE_FS => "FS",
            nr::SEGBASE_GS_USER => "GS_USER",
            nr::SEGBASE_GS_KERNEL => "GS_KERNEL",
            nr::SEGBASE_GS_USER_SEL => "GS_USER_SEL",
            _ => return None,
        })
    }
}

impl fmt::Debug for SegmentBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "SegmentBase::{name}"),
            None => write!(f, "SegmentBase({})", self.0),
        }
    }
}

/// One hypercall of a `multicall` batch (`struct multicall_entry`, 64 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct MulticallEntry {
    /// The hypercall number.
    pub op: u64,
    /// Written by Xen: the hypercall's raw result (`-errno` on failure).
    pub result: u64,
    /// The arguments (only the first five are used on x86-64).
    pub args: [u64; 6],
}

/// The argument of `EVTCHNOP_send` (`struct evtchn_send`, 4 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct EvtchnSend {
    /// The local port to notify through.
    pub port: u32,
}

/// The argument of `PHYSDEVOP_set_iopl` (`struct physdev_set_iopl`, 4 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct PhysdevSetIopl {
    /// The I/O privilege level (0..=3).
    pub iopl: u32,
}

/// The start-of-day information page (`struct start_info`, 1168 bytes on x86-64).
///
/// Xen passes its virtual address in `rsi` at the kernel's entry point.
///
/// The C struct has a `console` union at offset 72: a domU sees
/// `{ u64 mfn; u32 evtchn; }` (the PV console ring and its event channel), which are the
/// fields [`console_mfn`](Self::console_mfn) and [`console_evtchn`](Self::console_evtchn)
/// here; dom0 sees `{ u32 info_off; u32 info_size; }` (where its `dom0_vga_console_info`
/// is, relative to this page), which are the low and high halves of `console_mfn` and are
/// read with [`dom0_console_info_off`](Self::dom0_console_info_off) and
/// [`dom0_console_info_size`](Self::dom0_console_info_size).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct StartInfo {
    /// `"xen-3.0-x86_64"` (dom0 with PAE_MODE `yes` has a trailing `p`), NUL-padded.
    pub magic: [u8; 32],
    /// Number of pages given to the domain.
    pub nr_pages: u64,
    /// Machine address of the shared info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Padding.
    pub pad0: u32,
    /// MFN of the xenstore ring.
    pub store_mfn: u64,
    /// Event channel of the xenstore ring.
    pub store_evtchn: u32,
    /// Padding.
    pub pad1: u32,
    /// domU: MFN of the console ring. dom0: `info_off` (low half) and `info_size` (high).
    pub console_mfn: u64,
    /// domU: event channel of the console ring.
    pub console_evtchn: u32,
    /// Padding.
    pub pad2: u32,
    /// Virtual address of the initial page-table root.
    pub pt_base: u64,
    /// Number of initial page-table frames.
    pub nr_pt_frames: u64,
    /// Virtual address of the p2m list (`mfn_list`).
    pub mfn_list: u64,
    /// Virtual address (or PFN with `SIF_MOD_START_PFN`) of the first module.
    pub mod_start: u64,
    /// Length of the first module in bytes.
    pub mod_len: u64,
    /// The kernel command line, NUL-terminated.
    pub cmd_line: [u8; 1024],
    /// PFN where the p2m list is mapped, if mapped by Xen there.
    pub first_p2m_pfn: u64,
    /// Number of p2m frames mapped at `first_p2m_pfn`.
    pub nr_p2m_frames: u64,
}

impl Default for StartInfo {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

/// The bytes of `buf` before its first NUL.
fn c_str(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == 0) {
        Some(end) => &buf[..end],
        None => buf,
    }
}

impl StartInfo {
    /// dom0 view of the console union: offset of `dom0_vga_console_info` from this page.
    pub const fn dom0_console_info_off(&self) -> u32 {
        self.console_mfn as u32
    }

    /// dom0 view of the console union: size of `dom0_vga_console_info`.
    pub const fn dom0_console_info_size(&self) -> u32 {
        (self.console_mfn >> 32) as u32
    }

    /// `magic` up to its first NUL.
    pub fn magic_bytes(&self) -> &[u8] {
        c_str(&self.magic)
    }

    /// `cmd_line` up to its first NUL.
    pub fn cmd_line_bytes(&self) -> &[u8] {
        c_str(&self.cmd_line)
    }

    /// Whether the domain is the initial domain (`SIF_INITDOMAIN`).
    pub const fn is_initdomain(&self) -> bool {
        self.flags & SIF_INITDOMAIN != 0
    }
}

impl fmt::Debug for StartInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Bytes<'a>(&'a [u8]);
        impl fmt::Debug for Bytes<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "\"{}\"", self.0.escape_ascii())
            }
        }
        f.debug_struct("StartInfo")
            .field("magic", &Bytes(self.magic_bytes()))
            .field("nr_pages", &self.nr_pages)
            .field("shared_info", &format_args!("{:#x}", self.shared_info))
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("store_mfn", &format_args!("{:#x}", self.store_mfn))
            .field("store_evtchn", &self.store_evtchn)
            .field("console_mfn", &format_args!("{:#x}", self.console_mfn))
            .field("console_evtchn", &self.console_evtchn)
            .field("pt_base", &format_args!("{:#x}", self.pt_base))
            .field("nr_pt_frames", &self.nr_pt_frames)
            .field("mfn_list", &format_args!("{:#x}", self.mfn_list))
            .field("mod_start", &format_args!("{:#x}", self.mod_start))
            .field("mod_len", &self.mod_len)
            .field("cmd_line", &Bytes(self.cmd_line_bytes()))
            .field("first_p2m_pfn", &format_args!("{:#x}", self.first_p2m_pfn))
            .field("nr_p2m_frames", &self.nr_p2m_frames)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Layout checks (the test `layout_vs_xen_headers` repeats them against gcc).
// ---------------------------------------------------------------------------------------

const _: () = {
    assert!(size_of::<TrapInfo>() == 16);
    assert!(offset_of!(TrapInfo, vector) == 0);
    assert!(offset_of!(TrapInfo, flags) == 1);
    assert!(offset_of!(TrapInfo, cs) == 2);
    assert!(offset_of!(TrapInfo, pad) == 4);
    assert!(offset_of!(TrapInfo, address) == 8);

    assert!(size_of::<SchedShutdown>() == 4);
    assert!(offset_of!(SchedShutdown, reason) == 0);

    assert!(size_of::<MulticallEntry>() == 64);
    assert!(offset_of!(MulticallEntry, op) == 0);
    assert!(offset_of!(MulticallEntry, result) == 8);
    assert!(offset_of!(MulticallEntry, args) == 16);

    assert!(size_of::<EvtchnSend>() == 4);
    assert!(offset_of!(EvtchnSend, port) == 0);

    assert!(size_of::<PhysdevSetIopl>() == 4);
    assert!(offset_of!(PhysdevSetIopl, iopl) == 0);

    assert!(size_of::<StartInfo>() == 1168);
    assert!(offset_of!(StartInfo, magic) == 0);
    assert!(offset_of!(StartInfo, nr_pages) == 32);
    assert!(offset_of!(StartInfo, shared_info) == 40);
    assert!(offset_of!(StartInfo, flags) == 48);
    assert!(offset_of!(StartInfo, pad0) == 52);
    assert!(offset_of!(StartInfo, store_mfn) == 56);
    assert!(offset_of!(StartInfo, store_evtchn) == 64);
    assert!(offset_of!(StartInfo, pad1) == 68);
    assert!(offset_of!(StartInfo, console_mfn) == 72);
    assert!(offset_of!(StartInfo, console_evtchn) == 80);
    assert!(offset_of!(StartInfo, pad2) == 84);
    assert!(offset_of!(StartInfo, pt_base) == 88);
    assert!(offset_of!(StartInfo, nr_pt_frames) == 96);
    assert!(offset_of!(StartInfo, mfn_list) == 104);
    assert!(offset_of!(StartInfo, mod_start) == 112);
    assert!(offset_of!(StartInfo, mod_len) == 120);
    assert!(offset_of!(StartInfo, cmd_line) == 128);
    assert!(offset_of!(StartInfo, first_p2m_pfn) == 1152);
    assert!(offset_of!(StartInfo, nr_p2m_frames) == 1160);
};
