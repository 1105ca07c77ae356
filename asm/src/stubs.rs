//! The MSR stubs: `global_asm!` functions with the native instruction's register contract.
//!
//! Each stub lives in its own `.S` file next to this module, with its register contract
//! written above the code. Summary (flags are clobbered by every stub; every GPR not listed
//! as an output, and `rsp`, is preserved):
//!
//! | stub | in | out |
//! |---|---|---|
//! | [`xenmsr_stub_rdmsr`] | `ecx` = MSR | `edx:eax`, upper halves of `rax`/`rdx` zero |
//! | [`xenmsr_stub_wrmsr`] | `ecx` = MSR, `edx:eax` = value | none |
//! | [`xenmsr_stub_rdpmc`] | `ecx` = counter | `edx:eax`, upper halves zero |
//! | [`xenmsr_stub_rdmsr_rax`] | `ecx` = MSR | `rax` = value, `rdx` = high half |
//!
//! A stub saves the caller-saved registers it must and calls the C-ABI handler in
//! [`crate::backend`]. It does not align the stack itself: it relies on the site's `call`
//! being made with `rsp` 16-byte aligned (every `asm!` block without `nostack` guarantees
//! it, and `tests/host/tests/sites.rs` checks every emitted site), so `rsp` is 8 mod 16 at
//! its first instruction and an odd number of pushes (7 in the read and RDPMC stubs, 9 in
//! the write stub) aligns it for the handler's `call`, with no `and $-16, %rsp`. Entered
//! from a misaligned stack, a stub would call the handler misaligned too. (The
//! segment-base stubs and the write stub's segment-base path call no Rust, only the
//! hypercall page, and do not care.) On "done" it loads the outputs and returns; on "native"
//! it restores everything and executes the real instruction, whose extable entry is a
//! rewind entry (a fault there is reported at the caller's call site); on failure it
//! restores everything, leaves the error code on the stack and traps at a `ud2` whose
//! rewind entry carries the error to the caller's own entry.
//!
//! The stubs are declared here as zero-sized `static`s, not functions: they do not follow
//! any Rust ABI, so Rust must never call them. Only the emitters in [`crate::site`] (and
//! tests that copy a site's exact shape) reference them, through `sym` operands.

use core::arch::global_asm;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use xenmsr_hypercall::HypercallPage;
use xenmsr_hypercall::abi::SegmentBase;

use crate::backend::{STATUS_NATIVE, xenmsr_handle_rdpmc, xenmsr_handle_read, xenmsr_handle_write};
use crate::extable::Data;

/// Data word of the rewind entry on a stub's native instruction: nothing above the
/// return address, the error is the fault itself.
pub const REWIND_NATIVE: Data = Data::rewind(0, false);
/// Data word of the rewind entry on a stub's `ud2`: one word (the error code) above the
/// return address.
pub const REWIND_ERROR: Data = Data::rewind(1, true);

const NEG_NATIVE: i64 = -(STATUS_NATIVE as i64);

/// Data word of the rewind entry on the write stub's WRFSBASE/WRGSBASE: one word above
/// the return address (the caller's rax, which the rewind restores); the error is the
/// fault itself.
pub const REWIND_RESTORE_RAX: Data = Data::rewind_restoring_rax(1);

/// `MsrError::Fault { vector: 13 }` as a code: what the write stub reports for a
/// non-canonical FS or GS base it refuses before WRFSBASE would #GP.
const FAULT_GP_CODE: u64 = crate::MsrError::Fault {
    vector: crate::VECTOR_GP,
}
.to_code();

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

// The read stub: the read filter's fast path, then the policy.
global_asm!(
    include_str!("stubs/rdmsr.S"),
    handler = sym xenmsr_handle_read,
    filter = sym crate::fastpath::xenmsr_read_filter,
    mul = const crate::fastpath::READ_FILTER_MUL,
    keys = const crate::fastpath::READ_FILTER_KEYS,
    kinds = const crate::fastpath::READ_FILTER_KINDS,
    shift = const crate::fastpath::READ_FILTER_SHIFT,
    neg_native = const NEG_NATIVE,
    rewind_native = const REWIND_NATIVE.bits(),
    rewind_error = const REWIND_ERROR.bits(),
    options(att_syntax)
);

// The write stub: the segment-base fast paths, then the policy.
global_asm!(
    include_str!("stubs/wrmsr.S"),
    handler = sym xenmsr_handle_write,
    segbase_entry = sym xenmsr_segbase_entry,
    fsgsbase = sym crate::fastpath::xenmsr_fsgsbase_enabled,
    fs_base = const MSR_FS_BASE,
    gs_base = const MSR_GS_BASE,
    kernel_gs_base = const MSR_KERNEL_GS_BASE,
    fault_gp = const FAULT_GP_CODE,
    class_hypercall = const crate::error::CLASS_HYPERCALL,
    neg_native = const NEG_NATIVE,
    rewind_native = const REWIND_NATIVE.bits(),
    rewind_error = const REWIND_ERROR.bits(),
    rewind_restore_rax = const REWIND_RESTORE_RAX.bits(),
    options(att_syntax)
);

/// Assembles a stub that always asks the policy (a `.S` file next to this module) with
/// its C-ABI handler, the "native" status, and its two rewind entries.
macro_rules! policy_stub {
    ($file:literal, $handler:path) => {
        global_asm!(
            include_str!($file),
            handler = sym $handler,
            neg_native = const NEG_NATIVE,
            rewind_native = const REWIND_NATIVE.bits(),
            rewind_error = const REWIND_ERROR.bits(),
            options(att_syntax)
        );
    };
}

policy_stub!("stubs/rdmsr_rax.S", xenmsr_handle_read);
policy_stub!("stubs/rdpmc.S", xenmsr_handle_rdpmc);

global_asm!(
    include_str!("stubs/segbase.S"),
    segbase_fs = const SegmentBase::FS.0,
    segbase_gs_kernel = const SegmentBase::GS_KERNEL.0,
    segbase_gs_user = const SegmentBase::GS_USER.0,
    segbase_entry = sym xenmsr_segbase_entry,
    class_hypercall = const crate::error::CLASS_HYPERCALL,
    rewind_error = const REWIND_ERROR.bits(),
    options(att_syntax)
);

/// The entry of the hypercall page for `set_segment_base`, which the segment-base stubs
/// call. 0 until [`set_segbase_hypercall_page`] stores it; [`segbase_stubs_ready`] tells
/// the patcher whether sites may be pointed at those stubs.
#[unsafe(no_mangle)]
static xenmsr_segbase_entry: AtomicUsize = AtomicUsize::new(0);

/// Makes the segment-base stubs call `set_segment_base` through `page`. Until this has
/// run, the patcher keeps constant-index segment-base sites on the generic write stub.
///
/// # Safety
///
/// From now on every `FS_BASE`, `GS_BASE` and `KERNEL_GS_BASE` write through a site (the
/// write stub's segment-base path, the segment-base stubs) is this page's
/// `set_segment_base` call instead of the backend or the WRMSR, and the fixup completes
/// FSGSBASE accesses that raise `#UD` through it, taking the kernel for a Xen PV guest.
/// So the kernel must be a 64-bit Xen PV guest and `page` its hypercall page (Xen's), so
/// that the call writes the base the site's caller means; or, in a test over the mock page
/// (`xenmsr_hypercall::mock`), nothing may rely on those writes reaching a base.
///
/// ```compile_fail,E0133
/// fn install(page: xenmsr_hypercall::HypercallPage) {
///     xenmsr_asm::stubs::set_segbase_hypercall_page(page);
/// }
/// ```
///
/// ```
/// /// `page` is a Xen PV kernel's own hypercall page (`HypercallPage::xen()`).
/// fn install(page: xenmsr_hypercall::HypercallPage) {
///     // SAFETY: the kernel's own page, as this function's caller vouches.
///     unsafe { xenmsr_asm::stubs::set_segbase_hypercall_page(page) };
/// }
/// ```
pub unsafe fn set_segbase_hypercall_page(page: HypercallPage) {
    SEGBASE_PAGE.store(page.as_ptr().cast_mut(), Ordering::Release);
    xenmsr_segbase_entry.store(
        page.entry(xenmsr_hypercall::nr::SET_SEGMENT_BASE) as usize,
        Ordering::Release,
    );
}

/// The page [`set_segbase_hypercall_page`] stored (null until then), for the fixup's
/// FSGSBASE fallback.
static SEGBASE_PAGE: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());

/// The hypercall page the segment-base stubs call, once stored: on Xen PV after `init`.
pub(crate) fn segbase_hypercall_page() -> Option<HypercallPage> {
    let base = NonNull::new(SEGBASE_PAGE.load(Ordering::Acquire))?;
    // SAFETY: only `set_segbase_hypercall_page` stores here, the base of a `HypercallPage`,
    // whose entries the segment-base stubs call for the rest of the kernel's life: its
    // invariant (entries honouring Xen's contract) holds for as long as that page is used.
    Some(unsafe { HypercallPage::from_raw(base) })
}

/// Whether the segment-base stubs have a hypercall page to call.
pub fn segbase_stubs_ready() -> bool {
    xenmsr_segbase_entry.load(Ordering::Acquire) != 0
}

/// The code of one stub. Zero-sized and opaque: only its address means anything.
#[repr(C)]
#[derive(Debug)]
pub struct StubCode([u8; 0]);

// The stubs never follow a Rust ABI; declaring them as data keeps Rust from calling them.
unsafe extern "C" {
    /// RDMSR stub: in `ecx`; out `edx:eax`. See `stubs/rdmsr.S`.
    pub safe static xenmsr_stub_rdmsr: StubCode;
    /// WRMSR/WRMSRNS stub: in `ecx`, `edx:eax`. See `stubs/wrmsr.S`.
    pub safe static xenmsr_stub_wrmsr: StubCode;
    /// RDPMC stub: in `ecx`; out `edx:eax`. See `stubs/rdpmc.S`.
    pub safe static xenmsr_stub_rdpmc: StubCode;
    /// RDMSR stub for constant-index sites: in `ecx`; out `rax` (and `rdx` = high half).
    /// See `stubs/rdmsr_rax.S`.
    pub safe static xenmsr_stub_rdmsr_rax: StubCode;
    /// `set_segment_base(SEGBASE_FS, rax)` for constant-index FS_BASE write sites. See
    /// `stubs/segbase.S`.
    pub safe static xenmsr_stub_segbase_fs: StubCode;
    /// `set_segment_base(SEGBASE_GS_KERNEL, rax)` for constant-index GS_BASE write sites.
    pub safe static xenmsr_stub_segbase_gs_kernel: StubCode;
    /// `set_segment_base(SEGBASE_GS_USER, rax)` for constant-index KERNEL_GS_BASE write
    /// sites.
    pub safe static xenmsr_stub_segbase_gs_user: StubCode;
}

/// Which stub.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stub {
    /// [`xenmsr_stub_rdmsr`]
    Rdmsr,
    /// [`xenmsr_stub_wrmsr`]
    Wrmsr,
    /// [`xenmsr_stub_rdpmc`]
    Rdpmc,
    /// [`xenmsr_stub_rdmsr_rax`]
    RdmsrRax,
    /// [`xenmsr_stub_segbase_fs`]
    SegbaseFs,
    /// [`xenmsr_stub_segbase_gs_kernel`]
    SegbaseGsKernel,
    /// [`xenmsr_stub_segbase_gs_user`]
    SegbaseGsUser,
}

impl Stub {
    /// Every stub that asks the backend (the generic stubs of each op).
    pub const ALL: [Stub; 4] = [Stub::Rdmsr, Stub::Wrmsr, Stub::Rdpmc, Stub::RdmsrRax];

    /// The segment-base stubs: the Xen PV variant of constant-index writes of the FS,
    /// GS and KERNEL_GS bases. They make the hypercall themselves and consult no backend,
    /// so they have no native instruction and only an error-carrying rewind entry.
    pub const SEGMENT_BASE: [Stub; 3] =
        [Stub::SegbaseFs, Stub::SegbaseGsKernel, Stub::SegbaseGsUser];

    /// The segment-base stub for `which`, if there is one (not for `GS_USER_SEL`).
    pub const fn segbase(which: SegmentBase) -> Option<Stub> {
        match which {
            SegmentBase::FS => Some(Stub::SegbaseFs),
            SegmentBase::GS_KERNEL => Some(Stub::SegbaseGsKernel),
            SegmentBase::GS_USER => Some(Stub::SegbaseGsUser),
            _ => None,
        }
    }

    /// The stub's entry address.
    pub fn addr(self) -> usize {
        let code: *const StubCode = match self {
            Stub::Rdmsr => &raw const xenmsr_stub_rdmsr,
            Stub::Wrmsr => &raw const xenmsr_stub_wrmsr,
            Stub::Rdpmc => &raw const xenmsr_stub_rdpmc,
            Stub::RdmsrRax => &raw const xenmsr_stub_rdmsr_rax,
            Stub::SegbaseFs => &raw const xenmsr_stub_segbase_fs,
            Stub::SegbaseGsKernel => &raw const xenmsr_stub_segbase_gs_kernel,
            Stub::SegbaseGsUser => &raw const xenmsr_stub_segbase_gs_user,
        };
        code as usize
    }

    /// The stub's symbol name.
    pub const fn name(self) -> &'static str {
        match self {
            Stub::Rdmsr => "xenmsr_stub_rdmsr",
            Stub::Wrmsr => "xenmsr_stub_wrmsr",
            Stub::Rdpmc => "xenmsr_stub_rdpmc",
            Stub::RdmsrRax => "xenmsr_stub_rdmsr_rax",
            Stub::SegbaseFs => "xenmsr_stub_segbase_fs",
            Stub::SegbaseGsKernel => "xenmsr_stub_segbase_gs_kernel",
            Stub::SegbaseGsUser => "xenmsr_stub_segbase_gs_user",
        }
    }
}
