//! Alternatives patching: rewriting every recorded call site for the platform.
//!
//! Each site is a fixed-size region recorded in the `xenmsr_patch_sites` section. The
//! region is sized for its largest variant, and every variant puts its faulting
//! instruction at the region's first byte, so the site's one extable entry serves every
//! variant:
//!
//! | op | Xen PV | native | native + WRMSRNS | native + MSR_IMM |
//! |---|---|---|---|---|
//! | read (5) | `call stub` | `cs cs cs rdmsr` | — | — |
//! | write (5) | `call stub` | `cs cs cs wrmsr` | — | — |
//! | write-ns (5) | `call stub` | `cs cs cs wrmsr` | `cs cs wrmsrns` | — |
//! | rdpmc (5) | `call stub` | `cs cs cs rdpmc` | — | — |
//! | read-imm (9) | `call stub; nop4` | `rdmsr; shl $32,%rdx; or %rdx,%rax` | — | `rdmsr $imm,%rax` |
//! | write-imm (9) | `call stub; nop4` | `wrmsr; nop7` | `wrmsrns; nop6` | `wrmsrns %rax,$imm` |
//!
//! On Xen PV a constant-index write of `FS_BASE`, `GS_BASE` or `KERNEL_GS_BASE` calls a
//! segment-base stub that makes the `set_segment_base` hypercall itself ([`xen_stub`]).
//!
//! Redundant CS prefixes pad the short instructions instead of a trailing NOP (Intel's
//! JCC-erratum guidance prefers CS); the 9-byte sites use NOPs, because seven prefixes
//! would exceed what decoders handle without penalty. The `call` is always the first five
//! bytes, so its return address minus [`CALL_LEN`](xenmsr_asm::CALL_LEN) is the
//! site start: the stubs' rewind rule.

use xenmsr_asm::patch::{PatchSite, SiteOp};
use xenmsr_asm::stubs::Stub;

use crate::routes::{self, Route, WriteRoute};

/// CPU features that select native variants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// `WRMSRNS`: CPUID.(EAX=7,ECX=1):EAX\[19\].
    pub wrmsrns: bool,
    /// The immediate forms of RDMSR and WRMSRNS: CPUID.(EAX=7,ECX=1):ECX\[5\].
    pub msr_imm: bool,
}

impl CpuFeatures {
    /// Reads the features from a CPUID function (`cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]`).
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let max_leaf = cpuid(0, 0)[0];
        if max_leaf < 7 {
            return CpuFeatures::default();
        }
        let max_subleaf = cpuid(7, 0)[0];
        if max_subleaf < 1 {
            return CpuFeatures::default();
        }
        let [eax, _, ecx, _] = cpuid(7, 1);
        CpuFeatures {
            wrmsrns: eax & (1 << 19) != 0,
            msr_imm: ecx & (1 << 5) != 0,
        }
    }

    /// Reads the features of the CPU this runs on.
    pub fn detect() -> Self {
        Self::from_cpuid(|leaf, subleaf| {
            // `cpuid` is unprivileged and has no side effects that matter here.
            let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
            [r.eax, r.ebx, r.ecx, r.edx]
        })
    }
}

/// Which code a site gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `call` the stub (Xen PV).
    XenPv,
    /// The instruction inline, using the features given.
    Native(CpuFeatures),
}

/// Why a site could not be patched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// The record's length is not the length of its op's sites (a corrupt record, or a
    /// site emitted by another version of the emitters).
    BadLength {
        /// The site address.
        site: usize,
        /// The recorded length.
        len: usize,
    },
    /// The stub is out of `rel32` reach of the site.
    OutOfReach {
        /// The site address.
        site: usize,
    },
}

/// The largest site (a constant-index site).
pub const MAX_SITE_LEN: usize = xenmsr_asm::IMM_SITE_LEN;

/// The bytes of one variant of a site: the first `len` bytes of `bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteBytes {
    bytes: [u8; MAX_SITE_LEN],
    len: usize,
}

impl SiteBytes {
    fn new(parts: &[&[u8]]) -> Self {
        let mut bytes = [0u8; MAX_SITE_LEN];
        let mut len = 0;
        for part in parts {
            bytes[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        SiteBytes { bytes, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

const CS: u8 = 0x2e;
const RDMSR: [u8; 2] = [0x0f, 0x32];
const WRMSR: [u8; 2] = [0x0f, 0x30];
const RDPMC: [u8; 2] = [0x0f, 0x33];
const WRMSRNS: [u8; 3] = [0x0f, 0x01, 0xc6];
/// `shl $32, %rdx; or %rdx, %rax`: folds `edx:eax` into `rax`.
const FOLD_EDX_EAX: [u8; 7] = [0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0];
/// The 4-byte NOP after the `call` in a 9-byte site: the emitters' own padding, so the
/// Xen variant restores exactly the emitted bytes.
const NOP4: [u8; 4] = xenmsr_asm::IMM_SITE_PAD;
const NOP6: [u8; 6] = [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00];
const NOP7: [u8; 7] = [0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00];
/// VEX prefix and ModRM of `rdmsr $imm32, %rax` (VEX.128.F2.M7.W0 F6 /0).
const RDMSR_IMM: [u8; 5] = [0xc4, 0xe7, 0x7b, 0xf6, 0xc0];
/// VEX prefix and ModRM of `wrmsrns %rax, $imm32` (VEX.128.F3.M7.W0 F6 /0).
const WRMSRNS_IMM: [u8; 5] = [0xc4, 0xe7, 0x7a, 0xf6, 0xc0];

/// The length of every site of `op`.
pub const fn site_len(op: SiteOp) -> usize {
    match op {
        SiteOp::Read | SiteOp::Write | SiteOp::WriteNs | SiteOp::Rdpmc => xenmsr_asm::SITE_LEN,
        SiteOp::ReadImm | SiteOp::WriteImm => xenmsr_asm::IMM_SITE_LEN,
    }
}

/// The bytes of `variant` for a site of `op` at `site` (length `len`, constant index
/// `imm` for the immediate forms), whose stub is at `stub`.
pub fn site_bytes(
    op: SiteOp,
    site: usize,
    len: usize,
    imm: u32,
    stub: usize,
    variant: Variant,
) -> Result<SiteBytes, PatchError> {
    if len != site_len(op) {
        return Err(PatchError::BadLength { site, len });
    }
    let bytes = match variant {
        Variant::XenPv => {
            let rel = (stub as i64).wrapping_sub(site as i64 + 5);
            let rel = i32::try_from(rel).map_err(|_| PatchError::OutOfReach { site })?;
            let call = [
                0xe8,
                rel as u8,
                (rel >> 8) as u8,
                (rel >> 16) as u8,
                (rel >> 24) as u8,
            ];
            if len == xenmsr_asm::IMM_SITE_LEN {
                SiteBytes::new(&[&call, &NOP4])
            } else {
                SiteBytes::new(&[&call])
            }
        }
        Variant::Native(features) => {
            let imm = imm.to_le_bytes();
            match op {
                SiteOp::Read => SiteBytes::new(&[&[CS, CS, CS], &RDMSR]),
                SiteOp::Write => SiteBytes::new(&[&[CS, CS, CS], &WRMSR]),
                SiteOp::WriteNs if features.wrmsrns => SiteBytes::new(&[&[CS, CS], &WRMSRNS]),
                SiteOp::WriteNs => SiteBytes::new(&[&[CS, CS, CS], &WRMSR]),
                SiteOp::Rdpmc => SiteBytes::new(&[&[CS, CS, CS], &RDPMC]),
                SiteOp::ReadImm if features.msr_imm => SiteBytes::new(&[&RDMSR_IMM, &imm]),
                SiteOp::ReadImm => SiteBytes::new(&[&RDMSR, &FOLD_EDX_EAX]),
                SiteOp::WriteImm if features.msr_imm => SiteBytes::new(&[&WRMSRNS_IMM, &imm]),
                SiteOp::WriteImm if features.wrmsrns => SiteBytes::new(&[&WRMSRNS, &NOP6]),
                SiteOp::WriteImm => SiteBytes::new(&[&WRMSR, &NOP7]),
            }
        }
    };
    debug_assert_eq!(bytes.len, len);
    Ok(bytes)
}

/// What [`patch_sites`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchReport {
    /// Sites whose bytes were rewritten.
    pub rewritten: usize,
    /// Sites that already held the wanted bytes (patching is idempotent).
    pub unchanged: usize,
}

/// The stub a site of `op` calls on Xen PV. A constant-index write whose MSR the routing
/// table sends to `set_segment_base` gets the segment-base stub that makes that hypercall
/// directly (the index is a constant, so the route is known now); every other site gets
/// its op's generic stub, which asks the policy at run time. Until `init` has given the
/// segment-base stubs their hypercall page, those sites stay on the generic stub too.
pub fn xen_stub(op: SiteOp, imm: u32) -> Stub {
    xen_stub_with(op, imm, xenmsr_asm::stubs::segbase_stubs_ready())
}

/// [`xen_stub`], with `direct_segbase` saying whether the segment-base stubs may be used
/// (rather than asking whether their hypercall page is set already).
fn xen_stub_with(op: SiteOp, imm: u32, direct_segbase: bool) -> Stub {
    if op == SiteOp::WriteImm
        && direct_segbase
        && let Some(Route {
            write: WriteRoute::SegmentBase(which),
            ..
        }) = routes::lookup(imm)
        && let Some(stub) = Stub::segbase(*which)
    {
        return stub;
    }
    op.stub()
}

/// The bytes `variant` wants at `site`.
pub fn wanted_bytes(site: &PatchSite, variant: Variant) -> Result<SiteBytes, PatchError> {
    wanted_bytes_with(site, variant, xenmsr_asm::stubs::segbase_stubs_ready())
}

/// [`wanted_bytes`] with the segment-base choice of [`xen_stub_with`].
fn wanted_bytes_with(
    site: &PatchSite,
    variant: Variant,
    direct_segbase: bool,
) -> Result<SiteBytes, PatchError> {
    let op = site.op.ok_or(PatchError::BadLength {
        site: site.addr,
        len: usize::from(site.len),
    })?;
    site_bytes(
        op,
        site.addr,
        usize::from(site.len),
        site.imm,
        xen_stub_with(op, site.imm, direct_segbase).addr(),
        variant,
    )
}

/// Rewrites every site in `sites` for `variant`, through `write(address, bytes)`, which
/// must store `bytes` at `address` (making the text writable if the kernel maps it
/// read-only). A site that already holds the wanted bytes is not written, so patching
/// twice changes nothing. Every record is checked before any site is written: one bad
/// record leaves the image untouched.
///
/// This is the boot-time patcher: nothing else may run the sites meanwhile. To re-patch
/// while other vCPUs run, use [`crate::repatch`].
///
/// # Safety
///
/// Every site must be a live patch site of this image (as [`xenmsr_asm::patch::patch_sites`]
/// gives them), and no CPU may be executing any of them while they are rewritten (early
/// boot, one CPU, upcalls and interrupts masked). `write` must store exactly the given
/// bytes. The caller serialises (e.g. `cpuid`) before running a rewritten site.
pub unsafe fn patch_sites(
    sites: impl Iterator<Item = PatchSite> + Clone,
    variant: Variant,
    write: &mut dyn FnMut(usize, &[u8]),
) -> Result<PatchReport, PatchError> {
    let direct_segbase = xenmsr_asm::stubs::segbase_stubs_ready();
    check_sites(sites.clone(), variant, direct_segbase)?;
    // SAFETY: forwarded to the caller; every record was just checked.
    unsafe { write_sites(sites, variant, direct_segbase, write) }
}

/// Checks that every site can take `variant` (with the segment-base choice
/// `direct_segbase`): the error of the first one that cannot.
pub(crate) fn check_sites(
    sites: impl Iterator<Item = PatchSite>,
    variant: Variant,
    direct_segbase: bool,
) -> Result<(), PatchError> {
    for site in sites {
        wanted_bytes_with(&site, variant, direct_segbase)?;
    }
    Ok(())
}

/// Writes `variant` into every site that does not hold it yet. Call [`check_sites`]
/// first with the same arguments: then this cannot fail, and no site is written unless
/// all of them can be.
///
/// # Safety
///
/// As for [`patch_sites`].
pub(crate) unsafe fn write_sites(
    sites: impl Iterator<Item = PatchSite>,
    variant: Variant,
    direct_segbase: bool,
    write: &mut dyn FnMut(usize, &[u8]),
) -> Result<PatchReport, PatchError> {
    let mut report = PatchReport::default();
    for site in sites {
        let wanted = wanted_bytes_with(&site, variant, direct_segbase)?;
        // SAFETY: `site.addr..site.addr + site.len` is a live patch site of this image
        // (caller's contract), so it is mapped and readable.
        let current =
            unsafe { core::slice::from_raw_parts(site.addr as *const u8, usize::from(site.len)) };
        if current == wanted.as_slice() {
            report.unchanged += 1;
        } else {
            write(site.addr, wanted.as_slice());
            report.rewritten += 1;
        }
    }
    Ok(report)
}

/// Makes the calling CPU serialise instruction fetch (`cpuid`), so that it runs the
/// bytes just written rather than anything it fetched before: Intel's rule for
/// cross-modifying code. In a PV guest `cpuid` may trap to Xen, whose return to the guest
/// serialises too.
pub fn serialise() {
    // `cpuid` has no side effect beyond its outputs, which are dropped.
    let _ = core::arch::x86_64::__cpuid(0);
}

/// Writes code bytes with plain volatile stores: for kernels whose text is writable at
/// boot (a PV kernel's is, unless it has remapped it).
///
/// # Safety
///
/// `address..address + bytes.len()` must be writable memory that no CPU is executing.
pub unsafe fn write_text_directly(address: usize, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        // SAFETY: in bounds of the writable range the caller guarantees.
        unsafe { core::ptr::write_volatile((address + i) as *mut u8, *byte) };
    }
}
