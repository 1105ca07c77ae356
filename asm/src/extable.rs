//! The exception table: entry format, section access, sort-once and search.
//!
//! Every instruction that may fault on purpose (a site's `call`, a stub's native
//! instruction or its trapping `ud2`, a raw native access, a kernel's own instruction
//! guarded with [`guarded_asm!`](crate::guarded_asm)) has one [`ExtableEntry`] in the
//! section `xenmsr_extable`, written by `.pushsection` next to the instruction itself.
//!
//! Entries hold 32-bit offsets relative to the address of the field that holds them, so
//! the table needs no load-time relocation and an entry is 12 bytes. The section is
//! sorted in place once, at first use ([`init`], [`table`]), and then searched with a
//! binary search. Sorting and searching work on any `&mut [ExtableEntry]` /
//! `&[ExtableEntry]`, so they are unit-tested on synthetic, heap-allocated tables.
//!
//! The section is writable for two reasons: the sort rewrites it once, and the
//! [`flags::WARNED`] bit of an entry's data word is set at run time (atomically): the
//! fallback that keeps warnings to once per site should the fixup's set of warned kinds of
//! failure ever fill up.

use core::sync::atomic::{AtomicU32, Ordering};

use spin::Once;

/// Name of the extable section (a C identifier, so a host linker defines
/// `__start_xenmsr_extable` / `__stop_xenmsr_extable`; a kernel linker script defines the
/// same two symbols around `KEEP(*(xenmsr_extable))`).
pub const SECTION: &str = "xenmsr_extable";

/// The fixup kinds (bits 0–7 of the data word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Unchecked RDMSR: outputs zeroed, warn once per kind of failure, continue at the fixup.
    Read = 1,
    /// Checked RDMSR: outputs zeroed, error code into the entry's register, continue at
    /// the fixup.
    ReadSafe = 2,
    /// Unchecked WRMSR: warn once per kind of failure, continue at the fixup.
    Write = 3,
    /// Checked WRMSR: error code into the entry's register, continue at the fixup.
    WriteSafe = 4,
    /// Unchecked RDPMC: as [`Kind::Read`].
    Rdpmc = 5,
    /// Checked RDPMC: as [`Kind::ReadSafe`].
    RdpmcSafe = 6,
    /// A stub's rewind: pop the words above the return address, rewind the return address
    /// by the immediate (`-CALL_LEN`), and dispatch again on the caller's own entry there.
    Rewind = 7,
    /// A kernel's own guarded instruction ([`guarded_asm!`](crate::guarded_asm)): for any
    /// exception vector after which resuming is meaningful
    /// ([`is_resumable_fault`](crate::fixup::is_resumable_fault)), the code of
    /// `Fault { vector }` into the entry's register, nothing else changed, continue at the
    /// fixup.
    Guarded = 8,
}

impl Kind {
    /// Decodes a kind byte.
    pub const fn from_u8(value: u8) -> Option<Kind> {
        Some(match value {
            1 => Kind::Read,
            2 => Kind::ReadSafe,
            3 => Kind::Write,
            4 => Kind::WriteSafe,
            5 => Kind::Rdpmc,
            6 => Kind::RdpmcSafe,
            7 => Kind::Rewind,
            8 => Kind::Guarded,
            _ => return None,
        })
    }

    /// Whether this kind reports the error in a register (the `_safe` kinds).
    pub const fn is_safe(self) -> bool {
        matches!(self, Kind::ReadSafe | Kind::WriteSafe | Kind::RdpmcSafe)
    }

    /// Whether this kind covers one of the library's MSR accesses (every kind but
    /// [`Kind::Guarded`]): those are fixed up only for `#GP` and `#UD`, the vectors an
    /// MSR instruction, Xen's emulation of it, or a stub's trap can raise.
    pub const fn is_msr_access(self) -> bool {
        !matches!(self, Kind::Guarded)
    }
}

/// Flag bits (bits 12–15 of the data word).
pub mod flags {
    /// The site's value lives in `rax` (64-bit), not `edx:eax`: a failing read zeroes `rax`
    /// only, and a failing write reports `rax` as the value.
    pub const RAX_CONTRACT: u32 = 1 << 12;
    /// (Rewind entries) the word at `[rsp]`, the first of the skipped words, is an encoded
    /// [`MsrError`](crate::MsrError) code the stub pushed.
    pub const CARRIES_ERROR: u32 = 1 << 13;
    /// Set at run time on an unchecked entry once its warning has been reported.
    pub const WARNED: u32 = 1 << 14;
    /// (Rewind entries) the last of the skipped words, just above the return address,
    /// holds the caller's `rax`, which the rewind puts back (the stub had to use `rax`
    /// for the faulting instruction's operand).
    pub const RESTORES_RAX: u32 = 1 << 15;
    /// Every flag bit.
    pub const MASK: u32 = 0xf << 12;
}

/// x86 register numbers used in the `reg` field (the hardware encoding).
pub mod reg {
    /// `rax`
    pub const RAX: u8 = 0;
    /// `rcx`
    pub const RCX: u8 = 1;
    /// `rdx`
    pub const RDX: u8 = 2;
    /// `rbx`
    pub const RBX: u8 = 3;
    /// `rsp` (never valid as an error register)
    pub const RSP: u8 = 4;
    /// `rbp`
    pub const RBP: u8 = 5;
    /// `rsi`
    pub const RSI: u8 = 6;
    /// `rdi`
    pub const RDI: u8 = 7;
    /// `r8`; `r9`..`r15` are 9..15.
    pub const R8: u8 = 8;
}

/// The register every `_safe` site of this crate receives its error code in.
pub const ERROR_REG: u8 = reg::RSI;

/// A decoded data word: bits 0–7 kind, 8–11 register (or, for [`Kind::Rewind`], the number
/// of words above the return address), 12–15 flags, 16–31 a signed immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Data(pub u32);

impl Data {
    /// Encodes a data word. `reg` must be below 16 (checked at compile time when used in a
    /// `const`), `flags` must only contain bits of [`flags::MASK`].
    pub const fn new(kind: Kind, reg: u8, flags: u32, imm: i16) -> Data {
        assert!(reg < 16, "the reg field has 4 bits");
        assert!(flags & !flags::MASK == 0, "unknown flag bits");
        Data(kind as u32 | (reg as u32) << 8 | flags | ((imm as u16 as u32) << 16))
    }

    /// A site entry of `kind`: `reg` is the error register for safe kinds (ignored
    /// otherwise, and then 0).
    pub const fn site(kind: Kind, flags: u32) -> Data {
        let reg = if kind.is_safe() { ERROR_REG } else { 0 };
        Data::new(kind, reg, flags, 0)
    }

    /// A rewind entry: `skip` words sit above the return address (the first of them an
    /// error code when `carries_error`), and the return address is rewound by
    /// [`CALL_LEN`](crate::CALL_LEN).
    pub const fn rewind(skip: u8, carries_error: bool) -> Data {
        assert!(
            !carries_error || skip >= 1,
            "a carried error occupies one skipped word"
        );
        let flags = if carries_error {
            flags::CARRIES_ERROR
        } else {
            0
        };
        Data::new(Kind::Rewind, skip, flags, -(crate::CALL_LEN as i16))
    }

    /// A rewind entry whose `skip` words (at least one) end with the caller's saved
    /// `rax`, which the rewind restores; the error is the fault itself.
    pub const fn rewind_restoring_rax(skip: u8) -> Data {
        assert!(skip >= 1, "the saved rax occupies one skipped word");
        Data::new(
            Kind::Rewind,
            skip,
            flags::RESTORES_RAX,
            -(crate::CALL_LEN as i16),
        )
    }

    /// A guarded-instruction entry ([`Kind::Guarded`]) that reports the fault in `reg`,
    /// which must not be `rsp` (checked at compile time when used in a `const`).
    pub const fn guarded(reg: u8) -> Data {
        assert!(reg != reg::RSP, "rsp cannot receive an error code");
        Data::new(Kind::Guarded, reg, 0, 0)
    }

    /// The raw word, for `const` operands of `asm!`.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The kind, if the kind byte is known.
    pub const fn kind(self) -> Option<Kind> {
        Kind::from_u8(self.0 as u8)
    }

    /// The 4-bit register (or rewind skip count) field.
    pub const fn reg(self) -> u8 {
        ((self.0 >> 8) & 0xf) as u8
    }

    /// The flag bits (still in position 12–15; compare with [`flags`]).
    pub const fn flags(self) -> u32 {
        self.0 & flags::MASK
    }

    /// Whether `flag` (one of [`flags`]) is set.
    pub const fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }

    /// The signed immediate, sign-extended.
    pub const fn imm(self) -> i16 {
        (self.0 >> 16) as u16 as i16
    }
}

/// One exception-table entry (12 bytes).
///
/// `insn` and `fixup` are offsets from the address of the field itself to the faulting
/// instruction and to where execution continues. `data` is a [`Data`] word.
#[repr(C)]
#[derive(Debug)]
pub struct ExtableEntry {
    insn: i32,
    fixup: i32,
    data: AtomicU32,
}

const _: () = assert!(core::mem::size_of::<ExtableEntry>() == 12);
const _: () = assert!(core::mem::align_of::<ExtableEntry>() == 4);
const _: () = assert!(core::mem::offset_of!(ExtableEntry, insn) == 0);
const _: () = assert!(core::mem::offset_of!(ExtableEntry, fixup) == 4);
const _: () = assert!(core::mem::offset_of!(ExtableEntry, data) == 8);

const ENTRY_SIZE: isize = core::mem::size_of::<ExtableEntry>() as isize;

/// An offset that does not fit the 32-bit relative fields of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange;

fn rel_to(field: usize, target: usize) -> Result<i32, OutOfRange> {
    i32::try_from((target as isize).wrapping_sub(field as isize)).map_err(|_| OutOfRange)
}

impl ExtableEntry {
    /// An entry with both offsets zero (pointing at its own fields) and data `data`; give
    /// it real targets with [`set_targets`](Self::set_targets) once it sits at its final
    /// address. For building synthetic tables.
    pub const fn unplaced(data: Data) -> ExtableEntry {
        ExtableEntry {
            insn: 0,
            fixup: 0,
            data: AtomicU32::new(data.0),
        }
    }

    /// Points this entry, at its current address, at `insn` and `fixup`.
    pub fn set_targets(&mut self, insn: usize, fixup: usize) -> Result<(), OutOfRange> {
        let insn_rel = rel_to((&raw const self.insn) as usize, insn)?;
        let fixup_rel = rel_to((&raw const self.fixup) as usize, fixup)?;
        self.insn = insn_rel;
        self.fixup = fixup_rel;
        Ok(())
    }

    /// Address of the instruction this entry covers.
    pub fn insn_addr(&self) -> usize {
        ((&raw const self.insn) as usize).wrapping_add_signed(self.insn as isize)
    }

    /// Address where execution continues after the fixup.
    pub fn fixup_addr(&self) -> usize {
        ((&raw const self.fixup) as usize).wrapping_add_signed(self.fixup as isize)
    }

    /// The data word.
    pub fn data(&self) -> Data {
        Data(self.data.load(Ordering::Relaxed))
    }

    /// Sets [`flags::WARNED`]; returns `true` if this call is the one that set it.
    pub fn mark_warned(&self) -> bool {
        self.data.fetch_or(flags::WARNED, Ordering::Relaxed) & flags::WARNED == 0
    }

    /// Adjusts both offsets for a move of the entry by `moved` bytes.
    fn relocate(&mut self, moved: isize) {
        // Offsets are 32-bit by construction; entries move by at most the table size, so a
        // target that the linker could encode stays encodable unless it sits within a
        // table's length of the ±2 GiB limit. Wrapping keeps this total.
        self.insn = self.insn.wrapping_sub(moved as i32);
        self.fixup = self.fixup.wrapping_sub(moved as i32);
    }
}

/// Swaps entries `i` and `j` and re-bases their offsets so they keep their targets.
fn swap_entries(table: &mut [ExtableEntry], i: usize, j: usize) {
    if i == j {
        return;
    }
    table.swap(i, j);
    let moved = (j as isize - i as isize) * ENTRY_SIZE;
    // The entry now at `i` came from `j`: it moved by `-moved` bytes, and vice versa.
    table[i].relocate(-moved);
    table[j].relocate(moved);
}

fn sift_down(table: &mut [ExtableEntry], mut root: usize, end: usize) {
    loop {
        let mut child = 2 * root + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && table[child + 1].insn_addr() > table[child].insn_addr() {
            child += 1;
        }
        if table[root].insn_addr() >= table[child].insn_addr() {
            return;
        }
        swap_entries(table, root, child);
        root = child;
    }
}

/// Sorts `table` in place by instruction address (heapsort: no allocation, O(n log n)),
/// keeping every entry's targets: an entry that moves has its relative offsets adjusted by
/// the distance moved.
pub fn sort(table: &mut [ExtableEntry]) {
    let n = table.len();
    for root in (0..n / 2).rev() {
        sift_down(table, root, n);
    }
    for end in (1..n).rev() {
        swap_entries(table, 0, end);
        sift_down(table, 0, end);
    }
}

/// Whether `table` is sorted by instruction address (strictly: duplicates are a bug).
pub fn is_sorted(table: &[ExtableEntry]) -> bool {
    table
        .windows(2)
        .all(|pair| pair[0].insn_addr() < pair[1].insn_addr())
}

/// Finds the entry for the instruction at `addr` in a sorted `table`.
pub fn search(table: &[ExtableEntry], addr: usize) -> Option<&ExtableEntry> {
    table
        .binary_search_by_key(&addr, ExtableEntry::insn_addr)
        .ok()
        .map(|index| &table[index])
}

unsafe extern "C" {
    // Bounds of the section: provided by the linker for a section named like a C
    // identifier, or defined explicitly by a kernel linker script. The zero-length type
    // keeps Rust from assuming any size for them.
    static mut __start_xenmsr_extable: [ExtableEntry; 0];
    static mut __stop_xenmsr_extable: [ExtableEntry; 0];
}

static SORTED: Once<&'static [ExtableEntry]> = Once::new();

/// Sorts the section (the first call only) and returns it.
fn sorted_section() -> &'static [ExtableEntry] {
    SORTED.call_once(|| {
        let start = (&raw mut __start_xenmsr_extable).cast::<ExtableEntry>();
        let stop = (&raw mut __stop_xenmsr_extable).cast::<ExtableEntry>();
        let bytes = (stop as usize).saturating_sub(start as usize);
        debug_assert_eq!(bytes % core::mem::size_of::<ExtableEntry>(), 0);
        let len = bytes / core::mem::size_of::<ExtableEntry>();
        // SAFETY: the linker (or the kernel's linker script) places every `xenmsr_extable`
        // input section, each a whole number of 4-aligned 12-byte entries, contiguously
        // between the two bound symbols, in a writable, loaded section. Only this module
        // names the bounds, and it forms this unique reference once, inside `call_once`,
        // before any shared reference to the section exists.
        let table: &'static mut [ExtableEntry] =
            unsafe { core::slice::from_raw_parts_mut(start, len) };
        sort(table);
        table
    })
}

/// Sorts the section now. Call this once at boot, before the first MSR access can fault
/// (a kernel) or before installing the fault handlers (host tests). [`table`] does it on
/// first use otherwise, but a fault taken *during* that first sort would then spin.
pub fn init() {
    sorted_section();
}

/// The whole extable of the running image, sorted (sorting it on first use; after that,
/// lock-free).
pub fn table() -> &'static [ExtableEntry] {
    sorted_section()
}

/// Finds the entry for the instruction at `addr` in the running image.
pub fn lookup(addr: usize) -> Option<&'static ExtableEntry> {
    search(table(), addr)
}
