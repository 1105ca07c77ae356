//! What the stubs decide without entering Rust: the read filter, and the segment-base
//! switches the write stub reads.
//!
//! # The read filter
//!
//! Most MSR reads on Xen PV are pass-through: the stub executes `rdmsr`, which Xen traps
//! and emulates. Only a few MSRs need the Rust policy (the APIC base, whose value is fixed
//! up; the vPMU's MSRs; and, with FSGSBASE, the FS and GS bases, read with
//! `rdfsbase`/`rdgsbase`). The read stub looks the MSR up in a perfect-hash set of exactly
//! those, [`ReadFilter`], in six instructions, and only a hit leaves the fast path:
//!
//! ```text
//! slot = (msr * mul) >> 24            (256 slots)
//! keys[slot] == msr ?  kinds[slot] : pass through
//! ```
//!
//! Every empty slot holds a key that does not hash to it, so it never matches. While
//! `divert` is set every read goes to the Rust policy: from [`crate::backend::set_backend`]
//! until a filter is installed (a backend is asked about every read unless a filter says
//! which it needs), while the filter is rebuilt, and if no multiplier separates the keys.
//! Before a backend is registered the filter is empty: every read passes through, which
//! is also what the stubs do with no backend.
//!
//! The policy (`xenmsr`'s `init`) installs the filter after its own class index, from the
//! same classification, so the two cannot disagree; the host tests compare them.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering};

/// Slots of the read filter (a power of two: the hash keeps the top 8 bits).
pub const READ_FILTER_SLOTS: usize = 256;
/// `32 - log2(READ_FILTER_SLOTS)`.
pub const READ_FILTER_SHIFT: u32 = 24;
/// The most keys [`install_read_filter`] accepts (a quarter of the slots, so that a
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

/// The read filter the read stub consults (see the module docs). `#[repr(C)]`: the stub
/// addresses its fields by the offsets below.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct ReadFilter {
    /// Non-zero: every read goes to the policy.
    divert: AtomicU8,
    _pad0: [u8; 3],
    /// The hash multiplier.
    mul: AtomicU32,
    _pad1: [u8; 56],
    /// One key per slot.
    keys: [AtomicU32; READ_FILTER_SLOTS],
    /// What a hit in each slot does ([`ReadKind`]).
    kinds: [AtomicU8; READ_FILTER_SLOTS],
}

/// Offset of `ReadFilter::divert` (for the stub).
pub const READ_FILTER_DIVERT: usize = core::mem::offset_of!(ReadFilter, divert);
/// Offset of `ReadFilter::mul`.
pub const READ_FILTER_MUL: usize = core::mem::offset_of!(ReadFilter, mul);
/// Offset of `ReadFilter::keys`.
pub const READ_FILTER_KEYS: usize = core::mem::offset_of!(ReadFilter, keys);
/// Offset of `ReadFilter::kinds`.
pub const READ_FILTER_KINDS: usize = core::mem::offset_of!(ReadFilter, kinds);

const _: () = {
    assert!(READ_FILTER_SLOTS == 1 << (32 - READ_FILTER_SHIFT));
    assert!(READ_FILTER_DIVERT == 0 && READ_FILTER_MUL == 4);
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

/// The empty filter: multiplier 1 (the slot is the MSR's top byte), every slot holding a
/// key of another slot.
const EMPTY_MUL: u32 = 1;

impl ReadFilter {
    const fn empty() -> ReadFilter {
        let keys = {
            let mut keys = [const { AtomicU32::new(0) }; READ_FILTER_SLOTS];
            let mut slot = 0;
            while slot < READ_FILTER_SLOTS {
                keys[slot] = AtomicU32::new(empty_key(slot, EMPTY_MUL));
                slot += 1;
            }
            keys
        };
        ReadFilter {
            divert: AtomicU8::new(0),
            _pad0: [0; 3],
            mul: AtomicU32::new(EMPTY_MUL),
            _pad1: [0; 56],
            keys,
            kinds: [const { AtomicU8::new(0) }; READ_FILTER_SLOTS],
        }
    }
}

/// The read filter of this image (read by `xenmsr_stub_rdmsr`).
#[unsafe(no_mangle)]
pub static xenmsr_read_filter: ReadFilter = ReadFilter::empty();

/// Why [`install_read_filter`] could not build a filter (every read then goes to the
/// policy, which is correct, only slower).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterError {
    /// More than [`READ_FILTER_MAX_KEYS`] keys.
    TooManyKeys(usize),
    /// A key appears twice.
    DuplicateKey(u32),
    /// No multiplier separated the keys within the search budget.
    NoMultiplier,
}

/// Looks `msr` up the way the read stub does: `None` for a pass-through read.
pub fn read_filter_lookup(msr: u32) -> Option<ReadKind> {
    let f = &xenmsr_read_filter;
    if f.divert.load(Ordering::Acquire) != 0 {
        return Some(ReadKind::Policy);
    }
    let slot = slot_of(msr, f.mul.load(Ordering::Relaxed));
    (f.keys[slot].load(Ordering::Relaxed) == msr)
        .then(|| ReadKind::from_u8(f.kinds[slot].load(Ordering::Relaxed)))
}

/// How many multipliers the search tries before it gives up.
const SEARCH_BUDGET: usize = 1 << 20;

/// Finds an odd multiplier that gives every key its own slot.
fn find_multiplier(keys: &[(u32, ReadKind)]) -> Option<u32> {
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
            return Some(mul);
        }
    }
    None
}

/// Serialises installers (the filter is one global; init and tests install it).
static INSTALLING: AtomicUsize = AtomicUsize::new(0);

/// Installs a filter holding exactly `keys` (MSR and what a read of it does). Reads of
/// any other MSR pass through the read stub without entering Rust.
///
/// The filter diverts every read to the policy while it is rebuilt, so a read racing with
/// the installation is still answered correctly. On error the filter stays diverted: every
/// read goes to the policy.
pub fn install_read_filter(keys: &[(u32, ReadKind)]) -> Result<(), FilterError> {
    while INSTALLING
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let result = install_locked(keys);
    INSTALLING.store(0, Ordering::Release);
    result
}

fn install_locked(keys: &[(u32, ReadKind)]) -> Result<(), FilterError> {
    let f = &xenmsr_read_filter;
    f.divert.store(1, Ordering::SeqCst);
    if keys.len() > READ_FILTER_MAX_KEYS {
        return Err(FilterError::TooManyKeys(keys.len()));
    }
    for (i, &(msr, _)) in keys.iter().enumerate() {
        if keys[..i].iter().any(|&(other, _)| other == msr) {
            return Err(FilterError::DuplicateKey(msr));
        }
    }
    let mul = find_multiplier(keys).ok_or(FilterError::NoMultiplier)?;
    for slot in 0..READ_FILTER_SLOTS {
        f.keys[slot].store(empty_key(slot, mul), Ordering::Relaxed);
        f.kinds[slot].store(ReadKind::Policy as u8, Ordering::Relaxed);
    }
    for &(msr, kind) in keys {
        let slot = slot_of(msr, mul);
        f.keys[slot].store(msr, Ordering::Relaxed);
        f.kinds[slot].store(kind as u8, Ordering::Relaxed);
    }
    f.mul.store(mul, Ordering::Relaxed);
    f.divert.store(0, Ordering::SeqCst);
    Ok(())
}

/// Sends every read to the policy (the backend the stubs consult) until a filter is
/// installed: what [`crate::backend::set_backend`] does, so that a backend is asked about
/// every read unless a filter says which reads it needs.
pub fn divert_all_reads() {
    xenmsr_read_filter.divert.store(1, Ordering::SeqCst);
}

/// Empties the filter: every read passes through (the state before `init`).
pub fn clear_read_filter() {
    install_read_filter(&[]).expect("the empty filter always installs");
}

// ---------------------------------------------------------------------------------------
// The segment-base switches of the write stub.
// ---------------------------------------------------------------------------------------

/// Non-zero once `init` has enabled FSGSBASE: the generic write stub then writes the FS
/// and kernel GS bases with `wrfsbase`/`wrgsbase` instead of the hypercall.
#[unsafe(no_mangle)]
pub static xenmsr_fsgsbase_enabled: AtomicU8 = AtomicU8::new(0);

/// Makes the write stub use (or stop using) `wrfsbase`/`wrgsbase` for FS_BASE and
/// GS_BASE. Only after CR4.FSGSBASE is set on every CPU that runs the stubs.
pub fn set_fsgsbase_enabled(on: bool) {
    xenmsr_fsgsbase_enabled.store(u8::from(on), Ordering::SeqCst);
}

/// Whether the write stub uses `wrfsbase`/`wrgsbase`.
pub fn fsgsbase_enabled() -> bool {
    xenmsr_fsgsbase_enabled.load(Ordering::Acquire) != 0
}
