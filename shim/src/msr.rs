//! A typed MSR index with read and write methods, shaped like the `x86_64` crate's
//! `registers::model_specific::Msr` (`Msr::new(index)`, `read(&self)`,
//! `write(&mut self, value)`), so that code written against that crate ports by changing a
//! path, and the library's MSRs have names.
//!
//! Every method is `#[inline]` and expands to one call site of the library (an inline
//! `rdmsr`/`wrmsr` natively, a call to the stub on Xen PV) at the caller, with the
//! semantics of the free function it names: [`read`](Msr::read) and
//! [`write`](Msr::write) are the unchecked accesses (a fault reads 0 or drops the write,
//! and warns), [`read_safe`](Msr::read_safe) and [`write_safe`](Msr::write_safe) return
//! the fault or the failed hypercall as [`MsrError`].

use crate::MsrError;
use crate::routes;

/// A model-specific register, by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Msr(u32);

impl Msr {
    /// `IA32_TIME_STAMP_COUNTER`.
    pub const TSC: Msr = Msr(0x10);
    /// `IA32_APIC_BASE`: on Xen PV the library clears the x2APIC bit and sets the BSP bit
    /// on vCPU 0 only.
    pub const APIC_BASE: Msr = Msr(routes::MSR_APIC_BASE);
    /// `IA32_SYSENTER_CS`: writes are ignored on Xen PV.
    pub const SYSENTER_CS: Msr = Msr(routes::MSR_SYSENTER_CS);
    /// `IA32_SYSENTER_ESP`: writes are ignored on Xen PV.
    pub const SYSENTER_ESP: Msr = Msr(routes::MSR_SYSENTER_ESP);
    /// `IA32_SYSENTER_EIP`: writes are ignored on Xen PV.
    pub const SYSENTER_EIP: Msr = Msr(routes::MSR_SYSENTER_EIP);
    /// `IA32_MISC_ENABLE`.
    pub const MISC_ENABLE: Msr = Msr(0x1a0);
    /// `IA32_PAT`.
    pub const PAT: Msr = Msr(0x277);
    /// `IA32_PMC0`, the first general-purpose counter (Intel; a vPMU MSR on Xen PV).
    pub const IA32_PMC0: Msr = Msr(0xc1);
    /// `IA32_PERFEVTSEL0` (Intel; a vPMU MSR on Xen PV).
    pub const IA32_PERFEVTSEL0: Msr = Msr(0x186);
    /// `IA32_FIXED_CTR0` (Intel; a vPMU MSR on Xen PV).
    pub const IA32_FIXED_CTR0: Msr = Msr(0x309);
    /// `IA32_FIXED_CTR_CTRL` (Intel; a vPMU MSR on Xen PV).
    pub const IA32_FIXED_CTR_CTRL: Msr = Msr(0x38d);
    /// `IA32_PERF_GLOBAL_STATUS` (Intel; a vPMU MSR on Xen PV).
    pub const IA32_PERF_GLOBAL_STATUS: Msr = Msr(0x38e);
    /// `IA32_PERF_GLOBAL_CTRL` (Intel; a vPMU MSR on Xen PV).
    pub const IA32_PERF_GLOBAL_CTRL: Msr = Msr(0x38f);
    /// `IA32_PERF_GLOBAL_OVF_CTRL` (Intel; a vPMU MSR on Xen PV).
    pub const IA32_PERF_GLOBAL_OVF_CTRL: Msr = Msr(0x390);
    /// `IA32_EFER`.
    pub const EFER: Msr = Msr(0xc000_0080);
    /// `IA32_STAR`: writes are ignored on Xen PV.
    pub const STAR: Msr = Msr(routes::MSR_STAR);
    /// `IA32_LSTAR`: writes are ignored on Xen PV.
    pub const LSTAR: Msr = Msr(routes::MSR_LSTAR);
    /// `IA32_CSTAR`: writes are ignored on Xen PV.
    pub const CSTAR: Msr = Msr(routes::MSR_CSTAR);
    /// `IA32_FMASK` (`SYSCALL_MASK`): writes are ignored on Xen PV.
    pub const SFMASK: Msr = Msr(routes::MSR_SYSCALL_MASK);
    /// `IA32_FS_BASE`: a write is `set_segment_base(SEGBASE_FS)` on Xen PV.
    pub const FS_BASE: Msr = Msr(routes::MSR_FS_BASE);
    /// `IA32_GS_BASE`: a write is `set_segment_base(SEGBASE_GS_KERNEL)` on Xen PV.
    pub const GS_BASE: Msr = Msr(routes::MSR_GS_BASE);
    /// `IA32_KERNEL_GS_BASE` (the user GS base while in the kernel): a write is
    /// `set_segment_base(SEGBASE_GS_USER)` on Xen PV.
    pub const KERNEL_GS_BASE: Msr = Msr(routes::MSR_KERNEL_GS_BASE);
    /// `IA32_TSC_AUX`.
    pub const TSC_AUX: Msr = Msr(0xc000_0103);
    /// AMD `PERF_CTL0` (legacy K7 event select; a vPMU MSR on Xen PV).
    pub const K7_EVNTSEL0: Msr = Msr(0xc001_0000);
    /// AMD `PERF_CTR0` (legacy K7 counter; a vPMU MSR on Xen PV).
    pub const K7_PERFCTR0: Msr = Msr(0xc001_0004);
    /// AMD family 15h+ `PERF_CTL0` (a vPMU MSR on Xen PV).
    pub const F15H_PERF_CTL0: Msr = Msr(0xc001_0200);
    /// AMD family 15h+ `PERF_CTR0` (a vPMU MSR on Xen PV).
    pub const F15H_PERF_CTR0: Msr = Msr(0xc001_0201);

    /// The MSR with index `index`.
    pub const fn new(index: u32) -> Msr {
        Msr(index)
    }

    /// Its index (what goes in `ecx`).
    pub const fn index(self) -> u32 {
        self.0
    }

    /// Reads the MSR. A fault (or a failure on Xen PV) reads 0 and calls the warn hook
    /// (see [`crate::UncheckedPolicy`]); use [`read_safe`](Self::read_safe) to see it.
    ///
    /// # Safety
    ///
    /// Reading this MSR must not break memory safety (a few MSRs have read side effects).
    #[inline]
    pub unsafe fn read(&self) -> u64 {
        // SAFETY: forwarded to the caller.
        unsafe { crate::rdmsr(self.0) }
    }

    /// Writes `value` to the MSR. A fault (or a failure on Xen PV) drops the write and
    /// calls the warn hook; use [`write_safe`](Self::write_safe) to see it.
    ///
    /// # Safety
    ///
    /// The write must not break memory safety: e.g. moving `FS_BASE` or `GS_BASE` under
    /// live thread-local or per-CPU data.
    #[inline]
    pub unsafe fn write(&mut self, value: u64) {
        // SAFETY: forwarded to the caller.
        unsafe { crate::wrmsr(self.0, value) }
    }

    /// Reads the MSR; a fault, or a failure on Xen PV, is `Err`.
    ///
    /// # Safety
    ///
    /// As for [`read`](Self::read).
    #[inline]
    pub unsafe fn read_safe(&self) -> Result<u64, MsrError> {
        // SAFETY: forwarded to the caller.
        unsafe { crate::rdmsr_safe(self.0) }
    }

    /// Writes `value` to the MSR; a fault, or a failed hypercall on Xen PV (e.g.
    /// `Hypercall(EINVAL)` for a non-canonical segment base), is `Err` and nothing was
    /// written.
    ///
    /// # Safety
    ///
    /// As for [`write`](Self::write).
    #[inline]
    pub unsafe fn write_safe(&mut self, value: u64) -> Result<(), MsrError> {
        // SAFETY: forwarded to the caller.
        unsafe { crate::wrmsr_safe(self.0, value) }
    }
}

impl From<u32> for Msr {
    fn from(index: u32) -> Self {
        Msr(index)
    }
}

impl From<Msr> for u32 {
    fn from(msr: Msr) -> Self {
        msr.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_name_the_routed_msrs() {
        for (msr, index) in [
            (Msr::APIC_BASE, 0x1b),
            (Msr::FS_BASE, 0xc000_0100),
            (Msr::GS_BASE, 0xc000_0101),
            (Msr::KERNEL_GS_BASE, 0xc000_0102),
            (Msr::STAR, 0xc000_0081),
            (Msr::SFMASK, 0xc000_0084),
            (Msr::SYSENTER_EIP, 0x176),
        ] {
            assert_eq!(msr.index(), index);
            assert!(routes::lookup(index).is_some(), "{msr:?} has a routing row");
        }
        assert_eq!(Msr::new(0x10), Msr::TSC);
        assert_eq!(u32::from(Msr::from(0x277)), Msr::PAT.index());
    }
}
