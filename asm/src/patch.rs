//! Patch-site records: where every patchable site is, how long it is, and what it does.
//!
//! Each emitter in [`crate::site`] writes one [`PatchSiteRecord`] into the section
//! `xenmsr_patch_sites` (read-only, retained). The alternatives patcher walks
//! [`patch_sites`] and rewrites each region for the platform (on Xen PV it leaves the
//! `call <stub>`; natively it writes the instruction and pads). Until then every site
//! calls its stub, which falls back to the native instruction, so an unpatched image is
//! correct everywhere.

use crate::stubs::Stub;

/// Name of the patch-site section.
pub const SECTION: &str = "xenmsr_patch_sites";

/// What a patchable site does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PatchOp {
    /// RDMSR, `ecx` in, `edx:eax` out.
    Read = 1,
    /// WRMSR, `ecx` and `edx:eax` in.
    Write = 2,
    /// Non-serialising write (WRMSRNS natively; the same stub as WRMSR on Xen).
    WriteNs = 3,
    /// RDPMC, `ecx` in, `edx:eax` out.
    Rdpmc = 4,
    /// Constant-index RDMSR into `rax` (immediate form natively); `imm` is the MSR.
    ReadImm = 5,
    /// Constant-index WRMSRNS from `rax` (immediate form natively); `imm` is the MSR.
    WriteImm = 6,
}

impl PatchOp {
    /// Decodes an op byte.
    pub const fn from_u8(value: u8) -> Option<PatchOp> {
        Some(match value {
            1 => PatchOp::Read,
            2 => PatchOp::Write,
            3 => PatchOp::WriteNs,
            4 => PatchOp::Rdpmc,
            5 => PatchOp::ReadImm,
            6 => PatchOp::WriteImm,
            _ => return None,
        })
    }

    /// The stub an unpatched (or Xen PV) site of this op calls. `WriteImm` has no stub of
    /// its own yet: such sites load `edx:eax` and use the write stub.
    pub const fn stub(self) -> Stub {
        match self {
            PatchOp::Read => Stub::Rdmsr,
            PatchOp::Write | PatchOp::WriteNs | PatchOp::WriteImm => Stub::Wrmsr,
            PatchOp::Rdpmc => Stub::Rdpmc,
            PatchOp::ReadImm => Stub::RdmsrRax,
        }
    }
}

/// The name the shim's patcher uses for [`PatchOp`].
pub use PatchOp as SiteOp;

/// Record flag: the site is a `_safe` variant (its extable kind reports the error).
pub const FLAG_SAFE: u16 = 1 << 0;

/// One patch-site record as stored in the section (12 bytes).
#[repr(C)]
#[derive(Debug)]
pub struct PatchSiteRecord {
    /// Offset from this field to the first byte of the site.
    pub site: i32,
    /// Length of the patchable region in bytes.
    pub len: u8,
    /// A [`PatchOp`] as a byte.
    pub op: u8,
    /// [`FLAG_SAFE`] and future flags.
    pub flags: u16,
    /// The MSR index for constant-index ops, else 0.
    pub imm: u32,
}

const _: () = assert!(core::mem::size_of::<PatchSiteRecord>() == 12);
const _: () = assert!(core::mem::offset_of!(PatchSiteRecord, len) == 4);
const _: () = assert!(core::mem::offset_of!(PatchSiteRecord, op) == 5);
const _: () = assert!(core::mem::offset_of!(PatchSiteRecord, flags) == 6);
const _: () = assert!(core::mem::offset_of!(PatchSiteRecord, imm) == 8);

impl PatchSiteRecord {
    /// Absolute address of the site.
    pub fn site_addr(&self) -> usize {
        ((&raw const self.site) as usize).wrapping_add_signed(self.site as isize)
    }

    /// The decoded record.
    pub fn decode(&self) -> PatchSite {
        PatchSite {
            addr: self.site_addr(),
            len: self.len,
            op: PatchOp::from_u8(self.op),
            flags: self.flags,
            imm: self.imm,
        }
    }
}

/// A decoded patch-site record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchSite {
    /// Address of the first byte of the region.
    pub addr: usize,
    /// Length of the region.
    pub len: u8,
    /// The op (`None` for an unknown op byte, which only a corrupt image has).
    pub op: Option<PatchOp>,
    /// Record flags ([`FLAG_SAFE`]).
    pub flags: u16,
    /// The MSR index for constant-index ops.
    pub imm: u32,
}

unsafe extern "C" {
    static __start_xenmsr_patch_sites: [PatchSiteRecord; 0];
    static __stop_xenmsr_patch_sites: [PatchSiteRecord; 0];
}

/// The raw records of the running image.
pub fn records() -> &'static [PatchSiteRecord] {
    let start = (&raw const __start_xenmsr_patch_sites).cast::<PatchSiteRecord>();
    let stop = (&raw const __stop_xenmsr_patch_sites).cast::<PatchSiteRecord>();
    let len =
        (stop as usize).saturating_sub(start as usize) / core::mem::size_of::<PatchSiteRecord>();
    // SAFETY: the linker (or the kernel's linker script) places every input section named
    // `xenmsr_patch_sites`, each a whole number of 4-aligned 12-byte records, contiguously
    // between the two bound symbols. The section is read-only and nothing writes it.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// Every patch site of the running image, decoded.
pub fn patch_sites() -> impl Iterator<Item = PatchSite> {
    records().iter().map(PatchSiteRecord::decode)
}

// An empty contribution, so the section (and with it the linker's bound symbols) exists even
// in an image that has no patch site yet.
core::arch::global_asm!(
    ".pushsection xenmsr_patch_sites,\"aR\",@progbits",
    ".balign 4",
    ".popsection",
    options(att_syntax)
);
