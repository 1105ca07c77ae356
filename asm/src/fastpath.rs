//! What the stubs decide without entering Rust: the read filter, and the segment-base
//! switches the write stub reads.
//!
//! # The read filter
//!
//! Most MSR reads on Xen PV are pass-through: the stub executes `rdmsr`, which Xen traps
//! and emulates. Only a few MSRs need the Rust policy (the APIC base, whose value is fixed
//! up; the vPMU's MSRs; and, with FSGSBASE, the FS and GS bases, read with
//! `rdfsbase`/`rdgsbase`). The read stub looks the MSR up in a perfect-hash set of exactly
//! those, a [`ReadFilter`], in seven instructions, and only a hit leaves the fast path:
//!
//! ```text
//! filter = xenmsr_read_filter               (one load; null: every read to the policy)
//! slot = (msr * filter.mul) >> 24           (256 slots)
//! filter.keys[slot] == msr ?  filter.kinds[slot] : pass through
//! ```
//!
//! Every empty slot holds a key that does not hash to it, so it never matches.
//!
//! **One whole filter per read.** A [`ReadFilter`] is immutable once built
//! ([`ReadFilter::new`]), and [`install_read_filter`] publishes a `&'static` one with a
//! single pointer store. The stub loads that pointer once and takes the multiplier, the
//! key and the kind from the table it points to, so a read racing a re-install answers
//! entirely from the old filter or entirely from the new one: never a key of one with the
//! kind (or the multiplier) of the other. Nothing is rewritten in place, so a filter a
//! reader may still be looking at stays intact for the kernel's life. (The host test
//! `fastpath_stubs.rs`, `a_reinstall_racing_reads_answers_from_one_whole_filter`, hammers
//! the real stub from several threads while filters are swapped.)
//!
//! While the pointer is null every read goes to the Rust policy: from
//! [`crate::backend::set_backend`] until a filter is installed (a backend is asked about
//! every read unless a filter says which it needs), and for good if no multiplier
//! separates the keys. Before a backend is registered the pointer names the empty filter:
//! every read passes through, which is also what the stubs do with no backend.
//!
//! The policy (`xenmsr`'s `init`) installs the filter after its own class index, from the
//! same classification, so the two cannot disagree; the host tests compare them.

use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

/// Slots of the read filter (a power of two: the hash keeps the top 8 bits).
pub const READ_FILTER_SLOTS: usize = 256;
/// `32 - log2(READ_FILTER_SLOTS)`.
pub const READ_FILTER_SHIFT: u32 = 24;
/// The most keys [`ReadFilter::new`] accepts (a quarter of the slots, so that a
/// multiplier that separates them is quick to find).
pub const READ_FILTER_MAX_KEYS: usize = 64;

/// What a read that hits the filter does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReadKind {
    /// Ask the Rust policy (`xenmsr_handle_read`).
    Policy = 0,
    /// `rdfsbase` (FSGSBASE enabled: the FS base without a trap).
    RdFsBase = 1,
    /// `rdgsbase` (the kernel's GS base).
    RdGsBase = 2,
}

impl ReadKind {
    fn from_u8(v: u8) -> ReadKind {
        match v {
            1 => ReadKind::RdFsBase,
            2 => ReadKind::RdGsBase,
            _ => ReadKind::Policy,
        }
    }
}

/// One read filter (see the module docs): a multiplier and 256 slots of a key and what a
/// hit does. Immutable once built; the read stub reads it through the pointer
/// [`install_read_filter`] publishes. `#[repr(C)]`: the stub addresses its fields by the
/// offsets below.
#[repr(C, align(64))]
pub struct ReadFilter {
    /// The hash multiplier (odd).
    mul: u32,
    /// The keys start a cache line of their own.
    _pad: [u8; 60],
    /// One key per slot.
    keys: [u32; READ_FILTER_SLOTS],
    /// What a hit in each slot does ([`ReadKind`] as `u8`).
    kinds: [u8; READ_FILTER_SLOTS],
}

/// Offset of the multiplier in a [`ReadFilter`] (for the stub).
pub const READ_FILTER_MUL: usize = core::mem::offset_of!(ReadFilter, mul);
/// Offset of the keys.
pub const READ_FILTER_KEYS: usize = core::mem::offset_of!(ReadFilter, keys);
/// Offset of the kinds.
pub const READ_FILTER_KINDS: usize = core::mem::offset_of!(ReadFilter, kinds);

const _: () = {
    assert!(READ_FILTER_SLOTS == 1 << (32 - READ_FILTER_SHIFT));
    assert!(READ_FILTER_MUL == 0);
    assert!(READ_FILTER_KEYS == 64);
    assert!(READ_FILTER_KINDS == READ_FILTER_KEYS + 4 * READ_FILTER_SLOTS);
};

/// The slot `msr` hashes to with multiplier `mul`.
pub const fn slot_of(msr: u32, mul: u32) -> usize {
    (msr.wrapping_mul(mul) >> READ_FILTER_SHIFT) as usize
}

/// A key for empty slot `slot` that does not hash to it with `mul` (so it never matches):
/// 0 (which hashes to slot 0) for every other slot; for slot 0, the first power of two
/// that leaves it (for an odd `mul`, `1 << 31` always does).
const fn empty_key(slot: usize, mul: u32) -> u32 {
    if slot != 0 {
        return 0;
    }
    let mut shift = 0;
    while shift < 31 && slot_of(1 << shift, mul) == 0 {
        shift += 1;
    }
    1 << shift
}

/// The empty filter's multiplier (the slot is the MSR's top byte).
const EMPTY_MUL: u32 = 1;

/// Why [`ReadFilter::new`] could not build a filter (every read then goes to the policy,
/// which is correct, only slower).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterError {
    /// More than [`READ_FILTER_MAX_KEYS`] keys.
    TooManyKeys(usize),
    /// A key appears twice.
    DuplicateKey(u32),
    /// No multiplier separated the keys within the search budget.
    NoMultiplier,
}

impl ReadFilter {
    /// The filter without keys: every read passes through.
    pub const EMPTY: ReadFilter = ReadFilter::with_multiplier(EMPTY_MUL);

    /// A filter with multiplier `mul` and every slot empty.
    const fn with_multiplier(mul: u32) -> ReadFilter {
        let mut keys = [0u32; READ_FILTER_SLOTS];
        keys[0] = empty_key(0, mul);
        ReadFilter {
            mul,
            _pad: [0; 60],
            keys,
            kinds: [ReadKind::Policy as u8; READ_FILTER_SLOTS],
        }
    }

    /// The filter holding exactly `keys` (an MSR and what a read of it does): reads of any
    /// other MSR pass through the read stub without entering Rust once it is installed
    /// ([`install_read_filter`]).
    pub fn new(keys: &[(u32, ReadKind)]) -> Result<ReadFilter, FilterError> {
        if keys.len() > READ_FILTER_MAX_KEYS {
            return Err(FilterError::TooManyKeys(keys.len()));
        }
        for (i, &(msr, _)) in keys.iter().enumerate() {
            if keys[..i].iter().any(|&(other, _)| other == msr) {
                return Err(FilterError::DuplicateKey(msr));
            }
        }
        let mut filter = ReadFilter::with_multiplier(find_multiplier(keys)?);
        for &(msr, kind) in keys {
            let slot = slot_of(msr, filter.mul);
            filter.keys[slot] = msr;
            filter.kinds[slot] = kind as u8;
        }
        Ok(filter)
    }

    /// Looks `msr` up the way the read stub does in this filter: `None` for a
    /// pass-through read.
    pub fn lookup(&self, msr: u32) -> Option<ReadKind> {
        let slot = slot_of(msr, self.mul);
        (self.keys[slot] == msr).then(|| ReadKind::from_u8(self.kinds[slot]))
    }

    /// The hash multiplier.
    pub fn multiplier(&self) -> u32 {
        self.mul
    }

    /// The keys and their kinds, in slot order.
    pub fn keys(&self) -> impl Iterator<Item = (u32, ReadKind)> + '_ {
        (0..READ_FILTER_SLOTS)
            .filter(|&slot| slot_of(self.keys[slot], self.mul) == slot)
            .map(|slot| (self.keys[slot], ReadKind::from_u8(self.kinds[slot])))
    }
}

impl fmt::Debug for ReadFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Keys<'a>(&'a ReadFilter);
        impl fmt::Debug for Keys<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.keys().map(|(msr, kind)| (Hex(msr), kind)))
                    .finish()
            }
        }
        struct Hex(u32);
        impl fmt::Debug for Hex {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
        f.debug_struct("ReadFilter")
            .field("mul", &Hex(self.mul))
            .field("keys", &Keys(self))
            .finish()
    }
}

/// How many multipliers the search tries before it gives up.
const SEARCH_BUDGET: usize = 1 << 20;

/// Finds an odd multiplier that gives every key its own slot.
fn find_multiplier(keys: &[(u32, ReadKind)]) -> Result<u32, FilterError> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..SEARCH_BUDGET {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let mul = (state >> 32) as u32 | 1;
        let mut used = [0u64; READ_FILTER_SLOTS / 64];
        let separated = keys.iter().all(|&(msr, _)| {
            let slot = slot_of(msr, mul);
            let (word, bit) = (slot / 64, 1u64 << (slot % 64));
            let free = used[word] & bit == 0;
            used[word] |= bit;
            free
        });
        if separated {
            return Ok(mul);
        }
    }
    Err(FilterError::NoMultiplier)
}

/// What the read stub reads, on one page: the pointer it loads, the empty filter, and the
/// image's own filter ([`build_read_filter_once`]). A pass-through read therefore touches
/// one data page, as it did when the filter was a single static (the emulated TLB of
/// QEMU's TCG, flushed at every Xen entry with XPTI, refills each page a read touches).
#[repr(C, align(4096))]
pub(crate) struct ReadFilterPage {
    /// The filter the read stub consults (`xenmsr_stub_rdmsr` loads it once per read, at
    /// offset 0; null: every read goes to the policy). Only [`install_read_filter`] and
    /// [`divert_all_reads`] store here, each a whole `&'static` filter or null.
    current: AtomicPtr<ReadFilter>,
    /// The filter before any backend: every read passes through.
    empty: ReadFilter,
    /// The image's filter, built once.
    image: spin::Once<Result<ReadFilter, FilterError>>,
}

const _: () = assert!(core::mem::size_of::<ReadFilterPage>() == 4096);
const _: () = assert!(core::mem::offset_of!(ReadFilterPage, current) == 0);

/// The read stub's data (its symbol is what the stub addresses).
#[unsafe(no_mangle)]
pub(crate) static xenmsr_read_filter: ReadFilterPage = ReadFilterPage {
    current: AtomicPtr::new((&raw const xenmsr_read_filter.empty).cast_mut()),
    empty: ReadFilter::EMPTY,
    image: spin::Once::new(),
};

/// Builds the filter of `keys` ([`ReadFilter::new`]) in the library's own storage, next to
/// the pointer the read stub loads, so that a read touches one data page (see
/// [`install_read_filter`]). Only the first call builds: every later one returns the
/// first call's result, whatever its keys (`xenmsr::init` calls it once).
pub fn build_read_filter_once(
    keys: &[(u32, ReadKind)],
) -> Result<&'static ReadFilter, FilterError> {
    xenmsr_read_filter
        .image
        .call_once(|| ReadFilter::new(keys))
        .as_ref()
        .map_err(|error| *error)
}

/// The filter the read stub uses now, or `None` while every read goes to the policy.
pub fn installed_read_filter() -> Option<&'static ReadFilter> {
    let filter = xenmsr_read_filter.current.load(Ordering::Acquire);
    // SAFETY: only the functions of this module store here, and they store null or a
    // pointer from a `&'static ReadFilter` (a filter is never written after it is built).
    unsafe { filter.cast_const().as_ref() }
}

/// Looks `msr` up the way the read stub does, in the installed filter: `None` for a
/// pass-through read, `Some(ReadKind::Policy)` for every read while the policy takes them
/// all.
pub fn read_filter_lookup(msr: u32) -> Option<ReadKind> {
    match installed_read_filter() {
        Some(filter) => filter.lookup(msr),
        None => Some(ReadKind::Policy),
    }
}

/// Makes the read stub use `filter` from now on: reads of its keys do what their kinds
/// say, every other read passes through as the native RDMSR without asking the backend.
/// The filter is published whole with one store, so a read racing the installation uses
/// either the previous filter or this one, entirely (see the module docs). Any `'static`
/// filter works; one from [`build_read_filter_once`] shares its page with the pointer
/// the stub loads, so a read touches one data page instead of two.
///
/// # Safety
///
/// This decides, for every run-time-index read site of the kernel, whether the backend
/// answers it. The caller must make sure each read still gets the value the kernel relies
/// on:
///
/// - every MSR whose read the registered backend must answer (the Xen PV policy: the APIC
///   base, the vPMU's MSRs) is a key of kind [`ReadKind::Policy`];
/// - only `FS_BASE` (0xc0000100) has kind [`ReadKind::RdFsBase`] and only `GS_BASE`
///   (0xc0000101) [`ReadKind::RdGsBase`] (the stub returns the current FS or GS base
///   for such a key, whatever MSR it is), and only while reading the base with the
///   instruction is right: CR4.FSGSBASE is set on every CPU that runs the read stub, or,
///   on Xen PV, a `#UD` there reaches [`crate::fixup::fixup_exception`], which completes
///   the read with a trapped RDMSR.
///
/// # Examples
///
/// ```
/// use xenmsr_asm::fastpath::{
///     ReadKind, build_read_filter_once, install_read_filter, read_filter_lookup,
/// };
///
/// let filter = build_read_filter_once(&[(0x1b, ReadKind::Policy)]).unwrap();
/// // SAFETY: no backend is registered in this example, so no read needs one; the APIC
/// // base (0x1b) is sent to the policy anyway.
/// unsafe { install_read_filter(filter) };
/// assert_eq!(read_filter_lookup(0x1b), Some(ReadKind::Policy));
/// assert_eq!(read_filter_lookup(0x10), None);
/// ```
///
/// Safe code cannot re-route the reads:
///
/// ```compile_fail,E0133
/// use xenmsr_asm::fastpath::{ReadFilter, install_read_filter};
/// static FILTER: ReadFilter = ReadFilter::EMPTY;
/// install_read_filter(&FILTER);
/// ```
pub unsafe fn install_read_filter(filter: &'static ReadFilter) {
    xenmsr_read_filter
        .current
        .store(core::ptr::from_ref(filter).cast_mut(), Ordering::Release);
}

/// Sends every read to the policy (the backend the stubs consult) until a filter is
/// installed: what [`crate::backend::set_backend`] does, so that a backend is asked about
/// every read unless a filter says which reads it needs. Safe: it is always correct, only
/// slower (the registered backend answers every access, which its registration vouched
/// for, and with no backend the policy path executes the RDMSR itself).
pub fn divert_all_reads() {
    xenmsr_read_filter
        .current
        .store(core::ptr::null_mut(), Ordering::Release);
}

/// Installs the empty filter: every read passes through as the native RDMSR (the state
/// before a backend is registered).
///
/// # Safety
///
/// No read may need the registered backend from now on (none is registered, or it answers
/// every read with the native instruction): as [`install_read_filter`] with no keys.
///
/// ```compile_fail,E0133
/// xenmsr_asm::fastpath::clear_read_filter();
/// ```
///
/// ```
/// // SAFETY: no backend is registered in this example.
/// unsafe { xenmsr_asm::fastpath::clear_read_filter() };
/// assert_eq!(xenmsr_asm::fastpath::read_filter_lookup(0x1b), None);
/// ```
pub unsafe fn clear_read_filter() {
    // SAFETY: forwarded to the caller; the empty filter is part of a static.
    unsafe { install_read_filter(&xenmsr_read_filter.empty) };
}

// ---------------------------------------------------------------------------------------
// The segment-base switches of the write stub.
// ---------------------------------------------------------------------------------------

/// Non-zero once `init` has enabled FSGSBASE: the generic write stub then writes the FS
/// and kernel GS bases with `wrfsbase`/`wrgsbase` instead of the hypercall. Private: only
/// [`set_fsgsbase_enabled`] stores here.
#[unsafe(no_mangle)]
pub(crate) static xenmsr_fsgsbase_enabled: AtomicU8 = AtomicU8::new(0);

/// Makes the write stub use (`on`) or stop using `wrfsbase`/`wrgsbase` for FS_BASE and
/// GS_BASE, instead of the `set_segment_base` hypercall (or, before the segment-base
/// hypercall page is stored, the backend).
///
/// # Safety
///
/// With `on`, every run-time-index write of `FS_BASE` or `GS_BASE` becomes the
/// instruction, so the instruction must reach the base the write means: CR4.FSGSBASE is
/// set on every CPU that runs the write stub, or, on Xen PV once the segment-base page is
/// stored ([`crate::stubs::set_segbase_hypercall_page`]), a `#UD` there reaches
/// [`crate::fixup::fixup_exception`], which completes the write through the hypercall.
/// (Elsewhere a `#UD` would fail the write, which an unchecked caller does not see.)
/// Turning it off has no requirement.
///
/// ```compile_fail,E0133
/// xenmsr_asm::fastpath::set_fsgsbase_enabled(true);
/// ```
///
/// ```
/// // SAFETY: turning the switch off has no requirement.
/// unsafe { xenmsr_asm::fastpath::set_fsgsbase_enabled(false) };
/// assert!(!xenmsr_asm::fastpath::fsgsbase_enabled());
/// ```
///
/// The switch itself is not reachable from safe code either:
///
/// ```compile_fail,E0603
/// use core::sync::atomic::Ordering;
/// xenmsr_asm::fastpath::xenmsr_fsgsbase_enabled.store(1, Ordering::SeqCst);
/// ```
pub unsafe fn set_fsgsbase_enabled(on: bool) {
    xenmsr_fsgsbase_enabled.store(u8::from(on), Ordering::SeqCst);
}

/// Whether the write stub uses `wrfsbase`/`wrgsbase`.
pub fn fsgsbase_enabled() -> bool {
    xenmsr_fsgsbase_enabled.load(Ordering::Acquire) != 0
}
