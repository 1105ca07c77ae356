//! Alternatives patching: rewriting every recorded call site for the platform.
//!
//! Each site is a fixed-size region recorded in the `xenmsr_patch_sites` section. The
//! region is sized for its largest variant, and every variant is **one instruction** as
//! long as the region (shorter ones padded with redundant CS prefixes), so:
//!
//! - every variant faults at the region's first byte, and the site's one extable entry
//!   serves every variant;
//! - every variant has the same instruction boundaries, the start and the end of the
//!   region, and the `call` of the Xen variant returns to the end. A vCPU stopped anywhere
//!   a live re-patch ([`crate::repatch`]) can find it (interrupted before or after a
//!   site's instruction, after Xen emulated a trapped one, or anywhere inside a stub or the
//!   hypercall page a site called) therefore resumes at a boundary of whatever variant is
//!   there afterwards, never inside an instruction.
//!
//! | op | Xen PV | native | native + WRMSRNS | native + MSR_IMM |
//! |---|---|---|---|---|
//! | read (5) | `call stub` | `cs×3 rdmsr` | — | — |
//! | write (5) | `call stub` | `cs×3 wrmsr` | — | — |
//! | write-ns (5) | `call stub` | `cs×3 wrmsr` | `cs×2 wrmsrns` | — |
//! | rdpmc (5) | `call stub` | `cs×3 rdpmc` | — | — |
//! | read-imm (9) | `cs×4 call stub` | `cs×7 rdmsr` | — | `rdmsr $imm,%rax` |
//! | write-imm (9) | `cs×4 call stub` | `cs×7 wrmsr` | `cs×6 wrmsrns` | `wrmsrns %rax,$imm` |
//!
//! plus, for constant-index sites, `cs×4 rdfsbase %rax` and friends (FSGSBASE) and a
//! 9-byte NOP (a write Xen ignores). A read-imm site folds `rax | rdx << 32` after the
//! region (its `rdx` is 0 on entry), which makes the legacy `rdmsr` a complete variant.
//!
//! A constant-index site's MSR is known when it is patched, so on Xen PV its route is
//! decided then ([`XenRouting`], [`ConstRoute`]): a pass-through MSR gets the native
//! instruction inline (Xen traps and emulates it, exactly as the stub's own instruction
//! would be), an ignored write gets a 9-byte NOP, an FS/GS base gets `rdfsbase`/`wrfsbase`
//! and friends with FSGSBASE, or the segment-base stub that makes the `set_segment_base`
//! hypercall itself without, and only the MSRs the policy must see at run time (the APIC
//! base, the vPMU's) keep the call to the stub. With [`CpuFeatures::fsgsbase`], native
//! images get the same inline FS/GS base instructions.
//!
//! Redundant CS prefixes pad the short instructions (Intel's JCC-erratum guidance prefers
//! CS; up to seven of them cost a few decode cycles on some cores, next to an MSR access
//! of a hundred or more). The `call` always ends at the end of the site, so its return
//! address minus [`CALL_LEN`](xenmsr_asm::CALL_LEN) is the site start (5-byte sites) or
//! inside the prefixed call (9-byte sites, whose entry the fixup finds
//! [`IMM_SITE_LEN`](xenmsr_asm::IMM_SITE_LEN) bytes before the return address): the
//! stubs' rewind rule.

use xenmsr_asm::patch::{PatchSite, SiteOp};
use xenmsr_asm::stubs::Stub;

use xenmsr_hypercall::abi::SegmentBase;

use crate::dispatch::{Class, reference_class};
use crate::pmu::PmuLayout;
use crate::routes::{self, ReadRoute, WriteRoute};

/// CPU features that select native variants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// `WRMSRNS`: CPUID.(EAX=7,ECX=1):EAX\[19\].
    pub wrmsrns: bool,
    /// The immediate forms of RDMSR and WRMSRNS: CPUID.(EAX=7,ECX=1):ECX\[5\].
    pub msr_imm: bool,
    /// `RDFSBASE`/`WRFSBASE` and friends, usable: the CPU has them
    /// (CPUID.(EAX=7,ECX=0):EBX\[0\]) *and* the kernel has set CR4.FSGSBASE (which CPUID
    /// cannot tell, so [`from_cpuid`](Self::from_cpuid) leaves it false and `init` sets it
    /// for a kernel that opted in with [`crate::FsGsBase::Use`]).
    pub fsgsbase: bool,
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
            fsgsbase: false,
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
/// `rdfsbase %rax`, `rdgsbase %rax`, `wrfsbase %rax`, `wrgsbase %rax`.
const RDFSBASE_RAX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xc0];
const RDGSBASE_RAX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xc8];
const WRFSBASE_RAX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xd0];
const WRGSBASE_RAX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xd8];
/// `nopw 0x0(%rax,%rax,1)` with a 32-bit displacement: a 9-byte NOP.
const NOP9: [u8; 9] = [0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00];
/// VEX prefix and ModRM of `rdmsr $imm32, %rax` (VEX.128.F2.M7.W0 F6 /0).
const RDMSR_IMM: [u8; 5] = [0xc4, 0xe7, 0x7b, 0xf6, 0xc0];
/// VEX prefix and ModRM of `wrmsrns %rax, $imm32` (VEX.128.F3.M7.W0 F6 /0).
const WRMSRNS_IMM: [u8; 5] = [0xc4, 0xe7, 0x7a, 0xf6, 0xc0];

/// `insn` as one instruction of `len` bytes: redundant CS prefixes, then `insn` (whose
/// own prefixes, such as FSGSBASE's mandatory `f3` and REX, stay right before its opcode).
fn padded(insn: &[u8], len: usize) -> SiteBytes {
    const PREFIXES: [u8; MAX_SITE_LEN] = [CS; MAX_SITE_LEN];
    SiteBytes::new(&[&PREFIXES[..len - insn.len()], insn])
}

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
            // The call ends at the end of the site (after the CS prefixes of a 9-byte one).
            let rel = (stub as i64).wrapping_sub(site as i64 + len as i64);
            let rel = i32::try_from(rel).map_err(|_| PatchError::OutOfReach { site })?;
            let call = [
                0xe8,
                rel as u8,
                (rel >> 8) as u8,
                (rel >> 16) as u8,
                (rel >> 24) as u8,
            ];
            padded(&call, len)
        }
        Variant::Native(features) => {
            let imm_msr = imm;
            let imm = imm.to_le_bytes();
            match op {
                SiteOp::Read => padded(&RDMSR, len),
                SiteOp::Write => padded(&WRMSR, len),
                SiteOp::WriteNs if features.wrmsrns => padded(&WRMSRNS, len),
                SiteOp::WriteNs => padded(&WRMSR, len),
                SiteOp::Rdpmc => padded(&RDPMC, len),
                SiteOp::ReadImm if features.fsgsbase && imm_msr == routes::MSR_FS_BASE => {
                    padded(&RDFSBASE_RAX, len)
                }
                SiteOp::ReadImm if features.fsgsbase && imm_msr == routes::MSR_GS_BASE => {
                    padded(&RDGSBASE_RAX, len)
                }
                SiteOp::WriteImm if features.fsgsbase && imm_msr == routes::MSR_FS_BASE => {
                    padded(&WRFSBASE_RAX, len)
                }
                SiteOp::WriteImm if features.fsgsbase && imm_msr == routes::MSR_GS_BASE => {
                    padded(&WRGSBASE_RAX, len)
                }
                SiteOp::ReadImm if features.msr_imm => SiteBytes::new(&[&RDMSR_IMM, &imm]),
                SiteOp::ReadImm => padded(&RDMSR, len),
                SiteOp::WriteImm if features.msr_imm => SiteBytes::new(&[&WRMSRNS_IMM, &imm]),
                SiteOp::WriteImm if features.wrmsrns => padded(&WRMSRNS, len),
                SiteOp::WriteImm => padded(&WRMSR, len),
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

/// What the Xen PV variant puts at a site (decided at patch time for constant-index
/// sites, whose MSR is known then; every other site keeps its op's stub).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstRoute {
    /// `call` this stub.
    Stub(Stub),
    /// The native instruction inline: a pass-through MSR, which Xen traps and emulates
    /// exactly as it would the stub's own instruction.
    Native,
    /// A 9-byte NOP: a write the policy ignores (the syscall MSRs).
    Ignore,
    /// `rdfsbase %rax` (FSGSBASE enabled).
    RdFsBase,
    /// `rdgsbase %rax`.
    RdGsBase,
    /// `wrfsbase %rax`.
    WrFsBase,
    /// `wrgsbase %rax` (the kernel's GS base; the user GS base stays a hypercall).
    WrGsBase,
}

/// What decides the Xen PV variant of constant-index sites: set by `init`, which knows the
/// vPMU layout and whether FSGSBASE is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XenRouting {
    /// The segment-base stubs have their hypercall page.
    pub direct_segbase: bool,
    /// The layout whose PMU MSRs need the policy; `None`: route nothing at patch time
    /// (every constant-index site but the segment-base writes keeps its stub).
    pub layout: Option<PmuLayout>,
    /// FSGSBASE is enabled on every vCPU that will run these sites.
    pub fsgsbase: bool,
}

impl XenRouting {
    /// Before `init`: the stubs everywhere (with the direct segment-base stubs once their
    /// hypercall page is set).
    pub fn stubs_only() -> XenRouting {
        XenRouting {
            direct_segbase: xenmsr_asm::stubs::segbase_stubs_ready(),
            layout: None,
            fsgsbase: false,
        }
    }

    /// The route of a site of `op` with constant index `imm`.
    pub fn route(&self, op: SiteOp, imm: u32) -> ConstRoute {
        let generic = ConstRoute::Stub(op.stub());
        if !matches!(op, SiteOp::ReadImm | SiteOp::WriteImm) {
            return generic;
        }
        let class = match &self.layout {
            Some(layout) => reference_class(layout, imm),
            None => match routes::lookup(imm) {
                Some(route) => Class::Route {
                    read: route.read,
                    write: route.write,
                },
                None => return generic,
            },
        };
        match (op, class) {
            (
                SiteOp::ReadImm,
                Class::Route {
                    read: ReadRoute::Native,
                    ..
                },
            )
            | (SiteOp::ReadImm, Class::Native) => match imm {
                routes::MSR_FS_BASE if self.fsgsbase => ConstRoute::RdFsBase,
                routes::MSR_GS_BASE if self.fsgsbase => ConstRoute::RdGsBase,
                _ if self.layout.is_some() => ConstRoute::Native,
                _ => generic,
            },
            (
                SiteOp::WriteImm,
                Class::Route {
                    write: WriteRoute::SegmentBase(which),
                    ..
                },
            ) => match which {
                SegmentBase::FS if self.fsgsbase => ConstRoute::WrFsBase,
                SegmentBase::GS_KERNEL if self.fsgsbase => ConstRoute::WrGsBase,
                _ => match Stub::segbase(which) {
                    Some(stub) if self.direct_segbase => ConstRoute::Stub(stub),
                    _ => generic,
                },
            },
            (
                SiteOp::WriteImm,
                Class::Route {
                    write: WriteRoute::Ignore,
                    ..
                },
            ) if self.layout.is_some() => ConstRoute::Ignore,
            (
                SiteOp::WriteImm,
                Class::Route {
                    write: WriteRoute::Native,
                    ..
                },
            )
            | (SiteOp::WriteImm, Class::Native)
                if self.layout.is_some() =>
            {
                ConstRoute::Native
            }
            _ => generic,
        }
    }
}

/// The routing `init` decided (or [`XenRouting::stubs_only`] before it), changed only by
/// a resume that found the machine's CPUID changed (`lifecycle::resume`), which re-patches
/// every site with the new one in the same stop-the-world.
static ROUTING: spin::Mutex<Option<XenRouting>> = spin::Mutex::new(None);

/// Records the routing the sites are patched with (`init`, and a resume that re-patches).
pub(crate) fn set_routing(routing: XenRouting) {
    *ROUTING.lock() = Some(routing);
}

/// The routing sites are patched with: `init`'s, or the stubs before it.
pub fn routing() -> XenRouting {
    ROUTING.lock().unwrap_or_else(XenRouting::stubs_only)
}

/// The stub a site of `op` (constant index `imm`) calls on Xen PV, if its route is a
/// stub: see [`XenRouting::route`].
pub fn xen_stub(op: SiteOp, imm: u32) -> Option<Stub> {
    match routing().route(op, imm) {
        ConstRoute::Stub(stub) => Some(stub),
        _ => None,
    }
}

/// The bytes `variant` wants at `site` (with this kernel's [`routing`]).
pub fn wanted_bytes(site: &PatchSite, variant: Variant) -> Result<SiteBytes, PatchError> {
    wanted_bytes_with(site, variant, &routing())
}

/// [`wanted_bytes`] with the given routing.
pub fn wanted_bytes_with(
    site: &PatchSite,
    variant: Variant,
    routing: &XenRouting,
) -> Result<SiteBytes, PatchError> {
    let op = site.op.ok_or(PatchError::BadLength {
        site: site.addr,
        len: usize::from(site.len),
    })?;
    let (addr, len, imm) = (site.addr, usize::from(site.len), site.imm);
    if len != site_len(op) {
        return Err(PatchError::BadLength { site: addr, len });
    }
    let inline = |code: &[u8]| padded(code, len);
    match variant {
        Variant::Native(_) => site_bytes(op, addr, len, imm, op.stub().addr(), variant),
        Variant::XenPv => match routing.route(op, imm) {
            ConstRoute::Stub(stub) => site_bytes(op, addr, len, imm, stub.addr(), variant),
            ConstRoute::Native => site_bytes(
                op,
                addr,
                len,
                imm,
                op.stub().addr(),
                Variant::Native(CpuFeatures::default()),
            ),
            ConstRoute::Ignore => Ok(inline(&NOP9)),
            ConstRoute::RdFsBase => Ok(inline(&RDFSBASE_RAX)),
            ConstRoute::RdGsBase => Ok(inline(&RDGSBASE_RAX)),
            ConstRoute::WrFsBase => Ok(inline(&WRFSBASE_RAX)),
            ConstRoute::WrGsBase => Ok(inline(&WRGSBASE_RAX)),
        },
    }
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
    let routing = routing();
    check_sites(sites.clone(), variant, &routing)?;
    // SAFETY: forwarded to the caller; every record was just checked.
    unsafe { write_sites(sites, variant, &routing, write) }
}

/// Checks that every site can take `variant` (with `routing`): the error of the first one
/// that cannot.
pub(crate) fn check_sites(
    sites: impl Iterator<Item = PatchSite>,
    variant: Variant,
    routing: &XenRouting,
) -> Result<(), PatchError> {
    for site in sites {
        wanted_bytes_with(&site, variant, routing)?;
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
    routing: &XenRouting,
    write: &mut dyn FnMut(usize, &[u8]),
) -> Result<PatchReport, PatchError> {
    let mut report = PatchReport::default();
    for site in sites {
        let wanted = wanted_bytes_with(&site, variant, routing)?;
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
