//! The shared PMU page, accessed as hostile memory.
//!
//! Xen writes this page at every PMU interrupt, including the two bank offsets that say
//! where the counter arrays are. Nothing read from it is trusted: every offset is
//! checked against the page size, the counter counts and the fixed part of the context
//! before use, each value read once into a local so that a concurrent change cannot move
//! an access after its check, and each access is a `read_volatile`/`write_volatile` of
//! one naturally aligned scalar whose bounds are checked right before it. No Rust
//! reference into the page is ever formed.
//!
//! This is the only module of the vPMU backend with `unsafe` code.

use core::mem::{offset_of, size_of};
use core::ptr::NonNull;

use xenmsr_hypercall::abi::{
    LAPIC_LVTPC_OFFSET, PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags, XenPmuAmdCtxt, XenPmuArch,
    XenPmuArchR, XenPmuCntrPair, XenPmuData, XenPmuIntelCtxt, XenPmuRegs,
};

/// The size of the shared page.
pub const PAGE_SIZE: usize = 4096;

/// Page offset of the sampled registers (`pmu.r.regs`).
pub(crate) const REGS_OFFSET: usize =
    offset_of!(XenPmuData, pmu) + offset_of!(XenPmuArch, r) + offset_of!(XenPmuArchR, regs);

/// A scalar the page is read and written in.
pub(crate) trait Scalar: Copy + sealed::Sealed {}
impl Scalar for u8 {}
impl Scalar for u16 {}
impl Scalar for u32 {}
impl Scalar for u64 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// A registered shared PMU page.
///
/// # Invariant
///
/// `base` is 4096-byte aligned and valid for volatile reads and writes of [`PAGE_SIZE`]
/// bytes for as long as this value (or a copy) is used. Every bit pattern of the page is
/// acceptable: only integers are read from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SharedPage {
    base: NonNull<u8>,
}

impl SharedPage {
    /// Wraps a page.
    ///
    /// # Safety
    ///
    /// `base` must be 4096-byte aligned and valid for volatile reads and writes of
    /// [`PAGE_SIZE`] bytes for as long as the returned value or any copy of it is used.
    pub(crate) const unsafe fn new(base: NonNull<u8>) -> Self {
        SharedPage { base }
    }

    /// The address of a `T` at byte offset `off`, if it lies wholly inside the page and is
    /// naturally aligned.
    fn slot<T: Scalar>(self, off: usize) -> Option<*mut T> {
        let end = off.checked_add(size_of::<T>())?;
        if end > PAGE_SIZE || !off.is_multiple_of(size_of::<T>()) {
            return None;
        }
        // `off < PAGE_SIZE`, so this stays inside the page's allocation.
        Some(self.base.as_ptr().wrapping_add(off).cast::<T>())
    }

    /// Reads the `T` at byte offset `off`; `None` if it is not wholly inside the page or
    /// not naturally aligned.
    pub(crate) fn read<T: Scalar>(self, off: usize) -> Option<T> {
        let p = self.slot::<T>(off)?;
        // SAFETY: `slot` proved `off + size_of::<T>() <= PAGE_SIZE` and `off` a multiple of
        // `size_of::<T>()` (= its alignment for these integer types); the page is 4 KiB
        // aligned and valid for volatile reads (type invariant), and any bit pattern is a
        // valid integer.
        Some(unsafe { p.read_volatile() })
    }

    /// Writes the `T` at byte offset `off`; `None` (and nothing written) if it is not
    /// wholly inside the page or not naturally aligned.
    pub(crate) fn write<T: Scalar>(self, off: usize, value: T) -> Option<()> {
        let p = self.slot::<T>(off)?;
        // SAFETY: as in `read`: in bounds and aligned by `slot`, and the page is valid for
        // volatile writes (type invariant).
        unsafe { p.write_volatile(value) };
        Some(())
    }

    /// Zeroes the whole page (before it is registered with Xen).
    pub(crate) fn zero(self) {
        for off in (0..PAGE_SIZE).step_by(size_of::<u64>()) {
            // Every 8-aligned offset below PAGE_SIZE - 7 is in bounds.
            let _ = self.write::<u64>(off, 0);
        }
    }

    /// `pmu_flags`.
    pub(crate) fn flags(self) -> PmuFlags {
        PmuFlags::from_bits_retain(self.read::<u64>(PMU_FLAGS_OFFSET).unwrap_or(0))
    }

    /// Whether Xen has cached the PMU context in the page (`PMU_CACHED`).
    pub(crate) fn cached(self) -> bool {
        self.flags().contains(PmuFlags::CACHED)
    }

    /// Stores the guest's LVTPC value.
    pub(crate) fn set_lapic_lvtpc(self, value: u32) {
        let _ = self.write::<u32>(LAPIC_LVTPC_OFFSET, value);
    }

    /// The sampled registers.
    pub(crate) fn regs(self) -> XenPmuRegs {
        let at = |field: usize| REGS_OFFSET + field;
        XenPmuRegs {
            ip: self.read(at(offset_of!(XenPmuRegs, ip))).unwrap_or(0),
            sp: self.read(at(offset_of!(XenPmuRegs, sp))).unwrap_or(0),
            flags: self.read(at(offset_of!(XenPmuRegs, flags))).unwrap_or(0),
            cs: self.read(at(offset_of!(XenPmuRegs, cs))).unwrap_or(0),
            ss: self.read(at(offset_of!(XenPmuRegs, ss))).unwrap_or(0),
            cpl: self.read(at(offset_of!(XenPmuRegs, cpl))).unwrap_or(0),
            pad: [0; 3],
        }
    }

    /// `(vcpu_id, pcpu_id, domain_id)` of the sample.
    pub(crate) fn sample_ids(self) -> (u32, u32, u16) {
        (
            self.read(offset_of!(XenPmuData, vcpu_id)).unwrap_or(0),
            self.read(offset_of!(XenPmuData, pcpu_id)).unwrap_or(0),
            self.read(offset_of!(XenPmuData, domain_id)).unwrap_or(0),
        )
    }
}

/// Why a cached-context access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BadPage {
    /// A bank offset in the page puts (part of) a bank outside the page, inside the
    /// context's fixed part, misaligned, or overlapping the other bank.
    BankOffset,
    /// The slot index is beyond this layout's counter count.
    Index,
}

/// One validated counter bank: its page offset, element size and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bank {
    start: usize,
    elem: usize,
    len: usize,
}

impl Bank {
    /// Validates a bank at context-relative byte offset `rel` with `len` elements of
    /// `elem` bytes, where the context's fixed part is `fixed` bytes long.
    fn new(rel: u32, elem: usize, len: usize, fixed: usize) -> Result<Bank, BadPage> {
        let rel = usize::try_from(rel).map_err(|_| BadPage::BankOffset)?;
        let start = PMU_CTXT_OFFSET
            .checked_add(rel)
            .ok_or(BadPage::BankOffset)?;
        let bytes = elem.checked_mul(len).ok_or(BadPage::BankOffset)?;
        let end = start.checked_add(bytes).ok_or(BadPage::BankOffset)?;
        if rel < fixed || !rel.is_multiple_of(size_of::<u64>()) || end > PAGE_SIZE {
            return Err(BadPage::BankOffset);
        }
        Ok(Bank { start, elem, len })
    }

    fn end(self) -> usize {
        // Cannot overflow: checked in `new`.
        self.start + self.elem * self.len
    }

    /// Whether two banks share a byte (empty banks share none).
    fn overlaps(self, other: Bank) -> bool {
        self.len != 0 && other.len != 0 && self.start < other.end() && other.start < self.end()
    }

    /// The page offset of `field` in element `index`.
    fn at(self, index: usize, field: usize) -> Result<usize, BadPage> {
        if index >= self.len {
            return Err(BadPage::Index);
        }
        Ok(self.start + index * self.elem + field)
    }
}

/// The Intel cached context with both banks validated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntelCtxt {
    page: SharedPage,
    fixed: Bank,
    arch: Bank,
}

/// A fixed (non-bank) field of the Intel context, by its offset in the context.
pub(crate) mod intel_field {
    use super::{XenPmuIntelCtxt, offset_of};
    /// `global_ctrl`.
    pub const GLOBAL_CTRL: usize = offset_of!(XenPmuIntelCtxt, global_ctrl);
    /// `global_ovf_ctrl`.
    pub const GLOBAL_OVF_CTRL: usize = offset_of!(XenPmuIntelCtxt, global_ovf_ctrl);
    /// `global_status`.
    pub const GLOBAL_STATUS: usize = offset_of!(XenPmuIntelCtxt, global_status);
    /// `fixed_ctrl`.
    pub const FIXED_CTRL: usize = offset_of!(XenPmuIntelCtxt, fixed_ctrl);
    /// `ds_area`.
    pub const DS_AREA: usize = offset_of!(XenPmuIntelCtxt, ds_area);
    /// `pebs_enable`.
    pub const PEBS_ENABLE: usize = offset_of!(XenPmuIntelCtxt, pebs_enable);
}

impl IntelCtxt {
    /// Reads the bank offsets once and validates them for `fixed_len` fixed counters and
    /// `arch_len` counter pairs.
    pub(crate) fn load(
        page: SharedPage,
        fixed_len: usize,
        arch_len: usize,
    ) -> Result<Self, BadPage> {
        let off = |field: usize| -> Result<u32, BadPage> {
            page.read::<u32>(PMU_CTXT_OFFSET + field)
                .ok_or(BadPage::BankOffset)
        };
        let hdr = size_of::<XenPmuIntelCtxt>();
        let fixed = Bank::new(
            off(offset_of!(XenPmuIntelCtxt, fixed_counters))?,
            size_of::<u64>(),
            fixed_len,
            hdr,
        )?;
        let arch = Bank::new(
            off(offset_of!(XenPmuIntelCtxt, arch_counters))?,
            size_of::<XenPmuCntrPair>(),
            arch_len,
            hdr,
        )?;
        if fixed.overlaps(arch) {
            return Err(BadPage::BankOffset);
        }
        Ok(IntelCtxt { page, fixed, arch })
    }

    /// Page offset of a fixed field (see [`intel_field`]).
    fn field(field: usize) -> usize {
        PMU_CTXT_OFFSET + field
    }

    /// Reads a fixed field.
    pub(crate) fn read_field(self, field: usize) -> Result<u64, BadPage> {
        self.page
            .read(Self::field(field))
            .ok_or(BadPage::BankOffset)
    }

    /// Writes a fixed field.
    pub(crate) fn write_field(self, field: usize, value: u64) -> Result<(), BadPage> {
        self.page
            .write(Self::field(field), value)
            .ok_or(BadPage::BankOffset)
    }

    /// Page offset of `fixed_counters[i]`.
    pub(crate) fn fixed_counter(self, i: usize) -> Result<usize, BadPage> {
        self.fixed.at(i, 0)
    }

    /// Page offset of `arch_counters[i].counter`.
    pub(crate) fn arch_counter(self, i: usize) -> Result<usize, BadPage> {
        self.arch.at(i, offset_of!(XenPmuCntrPair, counter))
    }

    /// Page offset of `arch_counters[i].control`.
    pub(crate) fn arch_control(self, i: usize) -> Result<usize, BadPage> {
        self.arch.at(i, offset_of!(XenPmuCntrPair, control))
    }

    /// The page.
    pub(crate) fn page(self) -> SharedPage {
        self.page
    }
}

/// The AMD cached context with both banks validated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AmdCtxt {
    page: SharedPage,
    counters: Bank,
    ctrls: Bank,
}

impl AmdCtxt {
    /// Reads the bank offsets once and validates them for `len` counters and controls.
    pub(crate) fn load(page: SharedPage, len: usize) -> Result<Self, BadPage> {
        let off = |field: usize| -> Result<u32, BadPage> {
            page.read::<u32>(PMU_CTXT_OFFSET + field)
                .ok_or(BadPage::BankOffset)
        };
        let hdr = size_of::<XenPmuAmdCtxt>();
        let counters = Bank::new(off(offset_of!(XenPmuAmdCtxt, counters))?, 8, len, hdr)?;
        let ctrls = Bank::new(off(offset_of!(XenPmuAmdCtxt, ctrls))?, 8, len, hdr)?;
        if counters.overlaps(ctrls) {
            return Err(BadPage::BankOffset);
        }
        Ok(AmdCtxt {
            page,
            counters,
            ctrls,
        })
    }

    /// Page offset of `counters[i]`.
    pub(crate) fn counter(self, i: usize) -> Result<usize, BadPage> {
        self.counters.at(i, 0)
    }

    /// Page offset of `ctrls[i]`.
    pub(crate) fn ctrl(self, i: usize) -> Result<usize, BadPage> {
        self.ctrls.at(i, 0)
    }

    /// The page.
    pub(crate) fn page(self) -> SharedPage {
        self.page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Page([u8; PAGE_SIZE]);

    fn page(p: &mut Page) -> SharedPage {
        // SAFETY: `p` is a 4 KiB-aligned 4 KiB buffer that outlives every use below.
        unsafe { SharedPage::new(NonNull::from(&mut p.0).cast()) }
    }

    #[test]
    fn scalar_bounds_and_alignment() {
        let mut buf = Page([0; PAGE_SIZE]);
        let p = page(&mut buf);
        assert_eq!(p.write::<u64>(PAGE_SIZE - 8, 7), Some(()));
        assert_eq!(p.read::<u64>(PAGE_SIZE - 8), Some(7));
        assert_eq!(p.read::<u64>(PAGE_SIZE - 4), None);
        assert_eq!(p.read::<u64>(PAGE_SIZE), None);
        assert_eq!(p.read::<u64>(usize::MAX - 3), None);
        assert_eq!(p.read::<u64>(12), None, "misaligned");
        assert_eq!(p.write::<u32>(PAGE_SIZE, 1), None);
        assert_eq!(p.read::<u8>(PAGE_SIZE - 1), Some(0));
        assert_eq!(REGS_OFFSET, 16);
    }

    #[test]
    fn bank_validation() {
        // Xen's own Intel layout for 3 fixed, 8 arch counters.
        let ok = Bank::new(64, 8, 3, 64).unwrap();
        assert_eq!(ok.start, PMU_CTXT_OFFSET + 64);
        let arch = Bank::new(64 + 24, 16, 8, 64).unwrap();
        assert!(!ok.overlaps(arch));
        assert_eq!(arch.at(7, 8), Ok(PMU_CTXT_OFFSET + 88 + 7 * 16 + 8));
        assert_eq!(arch.at(8, 0), Err(BadPage::Index));
        // Inside the fixed part, misaligned, past the page, overflowing.
        assert_eq!(Bank::new(56, 8, 1, 64), Err(BadPage::BankOffset));
        assert_eq!(Bank::new(68, 8, 1, 64), Err(BadPage::BankOffset));
        assert_eq!(Bank::new(4000 - 8, 8, 2, 64), Err(BadPage::BankOffset));
        assert_eq!(
            Bank::new(4000 - 8, 8, 1, 64).map(|b| b.end()),
            Ok(PAGE_SIZE)
        );
        assert_eq!(Bank::new(u32::MAX, 8, 1, 64), Err(BadPage::BankOffset));
        assert_eq!(Bank::new(64, usize::MAX, 2, 64), Err(BadPage::BankOffset));
        // An empty bank may sit anywhere in the page and overlaps nothing.
        let empty = Bank::new(64, 8, 0, 64).unwrap();
        assert!(!empty.overlaps(ok));
        assert_eq!(empty.at(0, 0), Err(BadPage::Index));
    }
}
