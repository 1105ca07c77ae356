//! FSGSBASE: reading and writing the FS and GS bases with `rdfsbase`/`wrfsbase` and
//! friends, with no hypercall and no trap, for a kernel that opts in
//! ([`crate::FsGsBase::Use`]).
//!
//! Enabling CR4.FSGSBASE also lets *user space* change its own FS and GS bases at any
//! time, so a kernel that opts in must save them on every task switch instead of trusting
//! the values it last wrote: the FS base (`Msr::FS_BASE.read()`, which is `rdfsbase` now)
//! and the user GS base, which Xen holds while the kernel runs (`Msr::KERNEL_GS_BASE
//! .read()`, a read Xen emulates). That is the kernel's decision, which is why it is off
//! by default.
//!
//! On Xen PV (Xen ≥ 4.15) a guest kernel enables it with an ordinary `mov` to CR4, which
//! traps and which Xen filters by the domain's CPUID policy: `init` does it on the boot
//! vCPU and reads CR4 back, and falls back to the hypercalls if Xen dropped the bit. Every
//! other vCPU needs it too before it runs a patched site: call [`enable_on_this_vcpu`] on
//! it first, or start it with [`secondary_cr4`] in its `VCPUOP_initialise` context's
//! `ctrlreg[4]` (Xen filters that the same way).
//!
//! A vCPU that runs a site without the bit does not lose the access: its FSGSBASE
//! instruction raises `#UD`, and the fixup (the kernel's `#UD` handler calls
//! [`crate::fixup_exception`]) completes it through the `set_segment_base` hypercall
//! (writes) or a trapped RDMSR (reads) with the register contract intact. It is slower,
//! so it is counted ([`fallbacks`]) and the first one is logged through the kernel's log
//! hook, naming the site: the kernel then knows a vCPU missed its CR4 step.
//!
//! The user GS base (`KERNEL_GS_BASE` seen from the kernel) stays a
//! `set_segment_base(SEGBASE_GS_USER)` hypercall: a PV kernel cannot `swapgs`, so no
//! instruction reaches it.

use core::sync::atomic::{AtomicBool, Ordering};

/// The CR4 bit.
pub const CR4_FSGSBASE: u64 = 1 << 16;

/// Whether `cpuid` (leaf 7, subleaf 0, EBX bit 0) reports FSGSBASE. In a PV guest pass
/// [`crate::xen_cpuid`], the domain's policy, which is what Xen filters CR4 with.
pub fn cpuid_has_fsgsbase(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> bool {
    cpuid(0, 0)[0] >= 7 && cpuid(7, 0)[1] & 1 != 0
}

/// Reads CR4.
///
/// # Safety
///
/// Only in ring 0, or in a Xen PV guest kernel (where Xen emulates the trapped read);
/// elsewhere it raises #GP.
pub unsafe fn read_cr4() -> u64 {
    let cr4: u64;
    // SAFETY: the caller's contract; the read changes nothing.
    unsafe {
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags))
    };
    cr4
}

/// Writes CR4.
///
/// # Safety
///
/// As for [`read_cr4`]; and the new value must keep the kernel running (the kernel's
/// other CR4 bits unchanged).
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("mov cr4, {}", in(reg) value, options(nomem, nostack, preserves_flags))
    };
}

/// Sets CR4.FSGSBASE on the calling (v)CPU and reads CR4 back: whether the bit is set now.
/// On Xen PV, `false` means Xen dropped it (the domain's CPUID policy lacks FSGSBASE).
///
/// # Safety
///
/// As for [`write_cr4`]; and the kernel must save the user FS and GS bases on task switch
/// from now on (user space can change them).
pub unsafe fn enable_on_this_vcpu() -> bool {
    // SAFETY: the caller's contract (ring 0 or a PV guest kernel).
    let cr4 = unsafe { read_cr4() };
    if cr4 & CR4_FSGSBASE == 0 {
        // SAFETY: as above; only the FSGSBASE bit is added to the current value.
        unsafe { write_cr4(cr4 | CR4_FSGSBASE) };
    }
    // SAFETY: as above.
    let after = unsafe { read_cr4() };
    after & CR4_FSGSBASE != 0
}

/// Set by `init` when it enabled FSGSBASE and patched the sites for it.
static ENABLED: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether `init` enabled FSGSBASE (the sites use the instructions).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The CR4 bits a secondary vCPU's `VCPUOP_initialise` context must carry in
/// `ctrlreg[4]` for this library's sites: [`CR4_FSGSBASE`] once `init` enabled it, else 0.
pub fn secondary_cr4() -> u64 {
    if enabled() { CR4_FSGSBASE } else { 0 }
}

/// How many FS/GS base accesses were completed without FSGSBASE because the vCPU that ran
/// them raised `#UD` (CR4.FSGSBASE off on it): 0 when every vCPU got the bit.
pub fn fallbacks() -> u64 {
    xenmsr_asm::fixup::fsgsbase_fallbacks()
}

/// The fixup's report of the first access completed without FSGSBASE, to the kernel's log.
pub(crate) fn report_fallback(fallback: &xenmsr_asm::fixup::FsGsBaseFallback) {
    crate::log(format_args!(
        "xenmsr: {:?} of MSR {:#x} at site {:#x} raised #UD: CR4.FSGSBASE is off on this vCPU \
         (call xenmsr::fsgsbase::enable_on_this_vcpu on every vCPU, or start it with \
         fsgsbase::secondary_cr4); completed through the hypercall instead, and so will be \
         every such access (counted by xenmsr::fsgsbase::fallbacks)",
        fallback.op, fallback.msr, fallback.site
    ));
}
