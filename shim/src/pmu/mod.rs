//! The Xen vPMU backend: per-vCPU shared PMU pages, the PMI flow, and PMU MSR and RDPMC
//! emulation from the context Xen caches in the page.
//!
//! # Model
//!
//! Each vCPU registers one zeroed, page-aligned 4 KiB page with `XENPMU_init`
//! ([`Vpmu::init_vcpu`]). When a PMU counter overflows, Xen saves the vCPU's PMU registers
//! into the page, sets `PMU_CACHED` in `pmu_flags` and raises `VIRQ_XENPMU`. The guest's
//! handler ([`Vpmu::on_pmi`]) then reads and writes the PMU MSRs *in the page*; the
//! `XENPMU_flush` that always ends the handler makes Xen load the page back into the
//! hardware and clear `PMU_CACHED`.
//!
//! PMU MSR accesses ([`Vpmu::read`], [`Vpmu::write`]) and RDPMC ([`Vpmu::rdpmc`]) are
//! served from the page exactly while the calling vCPU is inside [`Vpmu::on_pmi`] *and*
//! its page has `PMU_CACHED` set. `PMU_CACHED` is the ABI's contract for when the cached
//! copy is authoritative; the in-PMI mark (the library's own, per vCPU) is what makes
//! the check and the access that follows it atomic: the only flush that can take the page
//! back from this vCPU is the one `on_pmi` makes at its end, and `on_pmi` runs with the
//! vCPU's upcalls masked, so nothing flushes between the check and the access. Outside
//! `on_pmi` a PMU MSR passes through ([`Outcome::Native`]: the stub executes the
//! instruction and Xen emulates it), and RDPMC, which always faults for a PV guest,
//! becomes an RDMSR of the counter MSR.
//!
//! # Concurrency
//!
//! The per-vCPU state ([`VcpuSlot`]) is two atomics (the page pointer and a state word:
//! "in PMI", "flush refused"), never a lock: the PMI handler interrupts arbitrary code on its vCPU, including
//! code in the middle of an MSR access, and a lock held there would deadlock. Each slot
//! has its own cache lines, and the kernel gives the slot storage, sized for its vCPU
//! count ([`VpmuConfig::slots`]; [`DEFAULT_SLOTS`] for up to [`DEFAULT_VCPUS`]). The
//! configuration (hypercall page, layout, native reader, vCPU-id hook, slots) is a
//! `spin::Once`.
//!
//! # Which vCPU
//!
//! `XENPMU_flush` and `XENPMU_lvtpc_set` act on the vCPU that makes the hypercall, and an
//! MSR access or RDPMC is always the calling vCPU's. So [`Vpmu::on_pmi`],
//! [`Vpmu::lvtpc_set`], [`Vpmu::read`], [`Vpmu::write`] and [`Vpmu::rdpmc`] name no vCPU:
//! they use the kernel's vCPU-id hook ([`VpmuConfig::vcpu_id`]). Only
//! [`Vpmu::init_vcpu`] and [`Vpmu::finish_vcpu`] take one: `XENPMU_init` and
//! `XENPMU_finish` carry `params.vcpu`, and Xen accepts any vCPU of the calling domain
//! there, so a kernel may register a page for a vCPU from another one (for example
//! before bringing it up).
//!
//! # Hostile page
//!
//! The page is written by Xen, bank offsets included. Every offset is validated against
//! the page size, the counter counts and the other bank before use, and every access is
//! a bounds-checked volatile access of one scalar through a raw pointer; an invalid page makes the access fail with
//! [`MsrError::PmuUnavailable`], never panic and never go out of bounds.

pub mod classify;
mod emulate;
pub mod layout;
mod page;
pub mod verify;

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, Ordering};

use spin::Once;
use xenmsr_asm::{MsrError, Outcome};
use xenmsr_hypercall::abi::{
    PmuFlags, XenPmuFeature, XenPmuMode, XenPmuOp, XenPmuParams, XenPmuRegs,
};
use xenmsr_hypercall::{Errno, HypercallPage};

pub use classify::{PmcIndex, PmuMsr, classify, decode_pmc};
pub use layout::{AmdLayout, CpuVendor, IntelLayout, PmuLayout};
pub use page::{BadPage, PAGE_SIZE};

use emulate::Access;
use page::SharedPage;

/// The number of vCPUs [`DEFAULT_SLOTS`] has room for.
pub const DEFAULT_VCPUS: usize = 64;

/// The alignment (and so the minimum size) of a [`VcpuSlot`]: two 64-byte cache lines.
///
/// One line would already keep two vCPUs' slots apart; the second keeps them out of each
/// other's adjacent-line prefetch pair (Intel's L2 spatial prefetcher fetches the 128-byte
/// aligned pair of a missed line), which otherwise makes neighbouring slots interfere
/// like a shared line. The cost is 128 bytes per vCPU.
pub const SLOT_ALIGN: usize = 128;

/// One vCPU's vPMU state, alone on its own [`SLOT_ALIGN`]-byte block, so that no vCPU's
/// PMU path writes a cache line another vCPU writes.
///
/// The kernel provides them ([`VpmuConfig::slots`]), one per vCPU id, for the backend's
/// whole life: a kernel with at most [`DEFAULT_VCPUS`] vCPUs passes [`DEFAULT_SLOTS`]; a
/// larger one declares its own, e.g.
/// `static SLOTS: [VcpuSlot; 512] = [const { VcpuSlot::new() }; 512];`.
#[repr(C, align(128))]
pub struct VcpuSlot {
    /// The registered page, or null.
    page: AtomicPtr<u8>,
    /// [`IN_PMI`] and [`FLUSH_REJECTED`]: one word, so an access tests both with one load.
    state: AtomicU8,
    /// The registered page's machine frame.
    mfn: AtomicU64,
    /// A page [`Vpmu::park_vcpu`] unregistered and keeps for [`Vpmu::unpark_vcpu`], or
    /// null.
    parked: AtomicPtr<u8>,
    /// The parked page's machine frame when it was parked.
    parked_mfn: AtomicU64,
}

/// [`VcpuSlot`] state: inside [`Vpmu::on_pmi`] (written only by the slot's vCPU, with its
/// upcalls masked).
const IN_PMI: u8 = 1 << 0;
/// [`VcpuSlot`] state: Xen refused this vCPU's cached context at its last flush
/// ([`PmuError::FlushRejected`]); cleared by a successful [`Vpmu::recover`] or by
/// [`Vpmu::finish_vcpu`].
const FLUSH_REJECTED: u8 = 1 << 1;

const _: () = assert!(core::mem::align_of::<VcpuSlot>() == SLOT_ALIGN);
const _: () = assert!(core::mem::size_of::<VcpuSlot>() == SLOT_ALIGN);

impl VcpuSlot {
    /// An empty slot (no page registered).
    pub const fn new() -> Self {
        VcpuSlot {
            page: AtomicPtr::new(core::ptr::null_mut()),
            state: AtomicU8::new(0),
            mfn: AtomicU64::new(0),
            parked: AtomicPtr::new(core::ptr::null_mut()),
            parked_mfn: AtomicU64::new(0),
        }
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    /// Marks the vCPU inside `on_pmi`; whether it already was.
    fn enter_pmi(&self) -> bool {
        self.state.fetch_or(IN_PMI, Ordering::Acquire) & IN_PMI != 0
    }

    fn leave_pmi(&self) {
        self.state.fetch_and(!IN_PMI, Ordering::Release);
    }

    fn set_flush_rejected(&self, rejected: bool) {
        if rejected {
            self.state.fetch_or(FLUSH_REJECTED, Ordering::Relaxed);
        } else if self.state() & FLUSH_REJECTED != 0 {
            self.state.fetch_and(!FLUSH_REJECTED, Ordering::Relaxed);
        }
    }

    fn page(&self) -> Option<SharedPage> {
        let p = NonNull::new(self.page.load(Ordering::Acquire))?;
        // SAFETY: only `init_vcpu` stores a non-null pointer here, and its caller
        // guaranteed the page 4 KiB aligned and valid for volatile access until
        // `finish_vcpu` for this vCPU has returned and no call that loaded it is running.
        Some(unsafe { SharedPage::new(p) })
    }
}

impl Default for VcpuSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for VcpuSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuSlot")
            .field("registered", &!self.page.load(Ordering::Relaxed).is_null())
            .field("in_pmi", &(self.state() & IN_PMI != 0))
            .field("flush_rejected", &(self.state() & FLUSH_REJECTED != 0))
            .finish()
    }
}

/// Slot storage for the backend of a kernel with at most [`DEFAULT_VCPUS`] vCPUs (8 KiB).
/// Give it to one backend only: two backends sharing slots would share their pages.
pub static DEFAULT_SLOTS: [VcpuSlot; DEFAULT_VCPUS] = [const { VcpuSlot::new() }; DEFAULT_VCPUS];

/// Reads an MSR with the real instruction (never through a patched site), turning a
/// fault into an error. RDPMC outside a PMI goes through this.
///
/// A kernel implements it over `xenmsr_asm::native::rdmsr_safe`; tests fake it.
pub trait NativeMsr: Sync {
    /// `rdmsr` of `msr`.
    ///
    /// # Safety
    ///
    /// The caller must be allowed to execute `rdmsr` of `msr` here (the native
    /// instruction's contract: some MSRs have side effects on read).
    unsafe fn read_safe(&self, msr: u32) -> Result<u64, MsrError>;
}

/// Why a vPMU operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PmuError {
    /// Xen's vPMU is off (`-EOPNOTSUPP`, or `-ENOSYS` from a Xen without `xenpmu_op`).
    /// PMU MSRs then simply pass through.
    Disabled,
    /// This vCPU already has a page (`-EEXIST` from Xen, or found locally before asking).
    AlreadyInitialized,
    /// The vPMU is not available to this vCPU (`-ENOENT`).
    NotAvailable,
    /// Xen rejected an argument (`-EINVAL`): a bad MFN or vCPU, a wrong interface version,
    /// or no page registered on Xen's side.
    InvalidArgument,
    /// The op needs a privileged domain (`-EPERM`).
    PermissionDenied,
    /// Any other error from Xen.
    Other(Errno),
    /// [`Vpmu::on_pmi`] was called on a vCPU that is already inside `on_pmi` (an upcall
    /// taken with upcalls unmasked, or a handler calling it again). Refused without
    /// running the handler or flushing: a nested flush would hand the page back to Xen
    /// under the outer handler.
    NestedPmi,
    /// Xen refused the vCPU's cached context at `XENPMU_flush` (`-EIO`: a value its checks
    /// reject, see [`verify`]). Xen then did not load it, set `PMU_CACHED` again and
    /// raises no further PMI, so the vCPU's vPMU is stopped. Until a successful
    /// [`Vpmu::recover`] (or `finish` and a new `init`), that vCPU's PMU MSR accesses
    /// and RDPMCs fail with [`MsrError::PmuUnavailable`] and [`Vpmu::on_pmi`] answers
    /// this error without running its handler.
    FlushRejected,
    /// The vCPU id has no slot in the backend's storage ([`VpmuConfig::slots`]).
    VcpuOutOfRange(u32),
    /// The page is not 4 KiB aligned (no hypercall made).
    MisalignedPage,
    /// No page is registered for this vCPU.
    NotInitialized,
    /// The [`Vpmu`] has no hypercall page yet ([`Vpmu::configure`] was not called).
    NotConfigured,
}

impl PmuError {
    /// Maps a `xenpmu_op` error.
    pub const fn from_errno(errno: Errno) -> Self {
        match errno {
            Errno::EOPNOTSUPP | Errno::ENOSYS => PmuError::Disabled,
            Errno::EEXIST => PmuError::AlreadyInitialized,
            Errno::ENOENT => PmuError::NotAvailable,
            Errno::EINVAL => PmuError::InvalidArgument,
            Errno::EPERM => PmuError::PermissionDenied,
            other => PmuError::Other(other),
        }
    }
}

impl fmt::Display for PmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PmuError::Disabled => write!(f, "vPMU disabled by the hypervisor"),
            PmuError::AlreadyInitialized => write!(f, "vPMU page already registered"),
            PmuError::NotAvailable => write!(f, "vPMU not available for this vCPU"),
            PmuError::InvalidArgument => write!(f, "vPMU hypercall: invalid argument"),
            PmuError::PermissionDenied => write!(f, "vPMU hypercall: not permitted"),
            PmuError::Other(errno) => write!(f, "vPMU hypercall failed: {errno}"),
            PmuError::NestedPmi => write!(f, "PMI handler entered again on the same vCPU"),
            PmuError::FlushRejected => write!(f, "Xen refused the cached PMU context"),
            PmuError::VcpuOutOfRange(v) => write!(f, "vCPU {v} has no vPMU slot"),
            PmuError::MisalignedPage => write!(f, "vPMU page is not 4 KiB aligned"),
            PmuError::NotInitialized => write!(f, "no vPMU page registered for this vCPU"),
            PmuError::NotConfigured => write!(f, "vPMU backend not configured"),
        }
    }
}

impl From<PmuError> for MsrError {
    fn from(e: PmuError) -> Self {
        match e {
            PmuError::Disabled => MsrError::PmuUnavailable,
            PmuError::Other(errno) => MsrError::Hypercall(errno),
            PmuError::AlreadyInitialized => MsrError::Hypercall(Errno::EEXIST),
            PmuError::NotAvailable => MsrError::Hypercall(Errno::ENOENT),
            PmuError::InvalidArgument => MsrError::Hypercall(Errno::EINVAL),
            PmuError::PermissionDenied => MsrError::Hypercall(Errno::EPERM),
            PmuError::NestedPmi
            | PmuError::FlushRejected
            | PmuError::VcpuOutOfRange(_)
            | PmuError::MisalignedPage
            | PmuError::NotInitialized
            | PmuError::NotConfigured => MsrError::PmuUnavailable,
        }
    }
}

/// What a PMI handler gets: the sample, read from the shared page when the PMI began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmiContext {
    /// The vCPU handling the PMI.
    pub vcpu: u32,
    /// The sampled registers as Xen stored them (a copy; use [`PmiContext::cpl`] rather
    /// than `regs.cpl`, which is meaningful only without `PMU_SAMPLE_PV`).
    pub regs: XenPmuRegs,
    /// `pmu_flags` when the PMI began.
    pub flags: PmuFlags,
    /// The sampled vCPU (`xen_pmu_data.vcpu_id`).
    pub sampled_vcpu: u32,
    /// The physical CPU (`pcpu_id`; the vCPU id for an unprivileged guest).
    pub pcpu: u32,
    /// The sampled domain (`domain_id`; `DOMID_SELF` for the guest itself).
    pub domain_id: u16,
}

impl PmiContext {
    /// The sample's privilege level: for a PV sample (`PMU_SAMPLE_PV`), 3 if
    /// `PMU_SAMPLE_USER` is set and 0 otherwise (a PV kernel runs in ring 3, so Xen's
    /// `cpl` would not tell kernel from user); for any other sample, `regs.cpl`.
    pub fn cpl(&self) -> u8 {
        if self.flags.contains(PmuFlags::SAMPLE_PV) {
            if self.flags.contains(PmuFlags::SAMPLE_USER) {
                3
            } else {
                0
            }
        } else {
            self.regs.cpl
        }
    }

    /// Whether the sample is from user mode ([`cpl`](Self::cpl) is not 0).
    pub fn user_mode(&self) -> bool {
        self.cpl() != 0
    }

    /// Whether Xen had cached the PMU context when the PMI began (it always has for a
    /// PMI it raised; without it the handler's MSR accesses pass through).
    pub fn cached(&self) -> bool {
        self.flags.contains(PmuFlags::CACHED)
    }
}

/// What a [`Vpmu`] is configured with.
#[derive(Clone, Copy)]
pub struct VpmuConfig {
    /// The hypercall page (`xenpmu_op`).
    pub hypercalls: HypercallPage,
    /// The PMU layout, from the domain's view of CPUID ([`PmuLayout::from_cpuid`]).
    pub layout: PmuLayout,
    /// Reads counter MSRs for RDPMC outside a PMI.
    pub native: &'static dyn NativeMsr,
    /// The id of the vCPU this runs on: the vCPU every PMI, LVTPC, MSR and RDPMC
    /// operation acts on, as Xen's own ops do.
    pub vcpu_id: fn() -> u32,
    /// One slot per vCPU id (`slots[id]`); an id beyond it has no vPMU
    /// ([`PmuError::VcpuOutOfRange`], and its PMU MSRs pass through).
    pub slots: &'static [VcpuSlot],
}

impl fmt::Debug for VpmuConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VpmuConfig")
            .field("hypercalls", &self.hypercalls)
            .field("layout", &self.layout)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// The vPMU backend: its configuration, including the kernel's per-vCPU slots.
///
/// Statics-friendly: `static VPMU: Vpmu = Vpmu::new();` then [`configure`](Self::configure)
/// at boot (or [`Vpmu::with`] when everything is known at compile time).
pub struct Vpmu {
    config: Once<VpmuConfig>,
    disabled: AtomicBool,
    /// Xen's vPMU features as last learnt ([`Vpmu::features`]): [`FEATURES_KNOWN`] plus
    /// the feature bits, or 0 while unknown.
    features: AtomicU64,
}

/// In [`Vpmu::features`]'s word: the features are known. A bit no `XENPMU_FEATURE_*`
/// uses, so one word holds both the answer and whether there is one.
const FEATURES_KNOWN: u64 = 1 << 63;

impl fmt::Debug for Vpmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vpmu")
            .field("layout", &self.layout())
            .field("disabled", &self.is_disabled())
            .field("features", &self.features())
            .finish_non_exhaustive()
    }
}

impl Default for Vpmu {
    fn default() -> Self {
        Self::new()
    }
}

/// `XENPMU_flush` for the calling vCPU, its `-EIO` (Xen's checks refused the cached
/// context) mapped to [`PmuError::FlushRejected`] and recorded in `slot`.
fn flush(hypercalls: HypercallPage, slot: &VcpuSlot) -> Result<(), PmuError> {
    match op(hypercalls, XenPmuOp::FLUSH, None) {
        Ok(_) => {
            slot.set_flush_rejected(false);
            Ok(())
        }
        Err(PmuError::Other(Errno::EIO)) => {
            slot.set_flush_rejected(true);
            Err(PmuError::FlushRejected)
        }
        Err(other) => Err(other),
    }
}

/// The hypercall result of `op`, mapped.
fn op(
    hypercalls: HypercallPage,
    op: XenPmuOp,
    params: Option<&mut XenPmuParams>,
) -> Result<u64, PmuError> {
    // SAFETY: the ops made through here are MODE_GET / FEATURE_GET (params only),
    // FINISH (unregisters a page), LVTPC_SET and FLUSH (act on the registered page,
    // which this module only accesses through raw volatile pointers, never references).
    // INIT is made only by `init_vcpu`, whose caller gave the page and its MFN under the
    // contract `xenpmu_op` states.
    unsafe { hypercalls.xenpmu_op(op, params) }.map_err(PmuError::from_errno)
}

/// `XENPMU_feature_get`: Xen's vPMU features.
fn features_of_xen(hypercalls: HypercallPage) -> Result<XenPmuFeature, PmuError> {
    let mut params = XenPmuParams::new(0, 0);
    op(hypercalls, XenPmuOp::FEATURE_GET, Some(&mut params))?;
    Ok(XenPmuFeature::from_bits_retain(params.val))
}

impl Vpmu {
    /// An unconfigured backend: no PMU MSRs, every op [`PmuError::NotConfigured`].
    pub const fn new() -> Self {
        Vpmu {
            config: Once::new(),
            disabled: AtomicBool::new(false),
            features: AtomicU64::new(0),
        }
    }

    /// A configured backend.
    pub const fn with(config: VpmuConfig) -> Self {
        Vpmu {
            config: Once::initialized(config),
            disabled: AtomicBool::new(false),
            features: AtomicU64::new(0),
        }
    }

    /// Configures the backend: the first call wins and returns `true`; later calls
    /// change nothing and return `false`.
    pub fn configure(&self, config: VpmuConfig) -> bool {
        let mut first = false;
        self.config.call_once(|| {
            first = true;
            config
        });
        first
    }

    fn config(&self) -> Result<&VpmuConfig, PmuError> {
        self.config.get().ok_or(PmuError::NotConfigured)
    }

    /// `vcpu`'s slot.
    fn slot(&self, vcpu: u32) -> Result<&VcpuSlot, PmuError> {
        let config = self.config()?;
        usize::try_from(vcpu)
            .ok()
            .and_then(|i| config.slots.get(i))
            .ok_or(PmuError::VcpuOutOfRange(vcpu))
    }

    /// The calling vCPU's id and slot.
    fn own_slot(&self) -> Result<(u32, &VcpuSlot), PmuError> {
        let vcpu = (self.config()?.vcpu_id)();
        Ok((vcpu, self.slot(vcpu)?))
    }

    /// Notes a `Disabled` answer so later registrations skip the hypercall.
    fn note<T>(&self, r: Result<T, PmuError>) -> Result<T, PmuError> {
        // Stored once: a repeated store would keep dirtying the line every vCPU reads.
        if r.as_ref().err() == Some(&PmuError::Disabled) && !self.is_disabled() {
            self.disabled.store(true, Ordering::Relaxed);
        }
        r
    }

    /// The layout ([`PmuLayout::None`] before configuration).
    pub fn layout(&self) -> PmuLayout {
        self.config.get().map_or(PmuLayout::None, |c| c.layout)
    }

    /// Whether Xen answered that its vPMU is disabled. Once it has, [`init_vcpu`]
    /// answers [`PmuError::Disabled`] without a hypercall (Xen's switch is global).
    ///
    /// [`init_vcpu`]: Self::init_vcpu
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    /// Whether `vcpu` has a registered page.
    pub fn is_initialized(&self, vcpu: u32) -> bool {
        self.slot(vcpu).is_ok_and(|s| s.page().is_some())
    }

    /// Whether `vcpu`'s page currently has `PMU_CACHED` set.
    pub fn is_cached(&self, vcpu: u32) -> bool {
        self.slot(vcpu)
            .ok()
            .and_then(VcpuSlot::page)
            .is_some_and(SharedPage::cached)
    }

    /// Registers `page` as `vcpu`'s shared PMU page: zeroes it, then `XENPMU_init` with
    /// version 0.1, `val = mfn` and `vcpu`.
    ///
    /// After a successful `XENPMU_init` it also asks Xen for its vPMU features
    /// (`XENPMU_feature_get`, see [`features`](Self::features)); that answer's failure
    /// (an unprivileged domain gets `-EPERM`) does not fail the registration.
    ///
    /// `vcpu` may be any vCPU of the domain, not only the calling one: Xen's
    /// `XENPMU_init` takes the vCPU from its parameters.
    ///
    /// Fails without a hypercall when the page is misaligned, the vCPU has no slot, the
    /// vCPU already has a page, the backend is unconfigured, or Xen already said its
    /// vPMU is disabled. On failure the page is not kept.
    ///
    /// # Safety
    ///
    /// - `page` must be valid for reads and writes of [`PAGE_SIZE`] bytes, and `mfn` must
    ///   be its machine frame number.
    /// - On success the page belongs to this backend and to Xen: it must stay allocated
    ///   and must not be accessed otherwise until [`finish_vcpu`](Self::finish_vcpu) for
    ///   `vcpu` has returned `Ok`, and no other call for `vcpu` started before that
    ///   returned is still running.
    pub unsafe fn init_vcpu(&self, vcpu: u32, page: NonNull<u8>, mfn: u64) -> Result<(), PmuError> {
        if page.as_ptr().align_offset(PAGE_SIZE) != 0 {
            return Err(PmuError::MisalignedPage);
        }
        let config = self.config()?;
        let slot = self.slot(vcpu)?;
        if self.is_disabled() {
            return Err(PmuError::Disabled);
        }
        if !slot.page.load(Ordering::Acquire).is_null() {
            return Err(PmuError::AlreadyInitialized);
        }
        // SAFETY: aligned (checked above) and valid for PAGE_SIZE bytes (caller).
        let shared = unsafe { SharedPage::new(page) };
        shared.zero();
        // Claim the slot; the zeroed page has no PMU_CACHED, so accesses racing with the
        // hypercall pass through.
        if slot
            .page
            .compare_exchange(
                core::ptr::null_mut(),
                page.as_ptr(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Err(PmuError::AlreadyInitialized);
        }
        slot.set_flush_rejected(false);
        slot.mfn.store(mfn, Ordering::Release);
        let mut params = XenPmuParams::new(mfn, vcpu);
        let r = self.note(op(config.hypercalls, XenPmuOp::INIT, Some(&mut params)));
        if r.is_err() {
            slot.page.store(core::ptr::null_mut(), Ordering::Release);
            return r.map(drop);
        }
        // Asked at every registration rather than once, so that features changed in
        // between (`XENPMU_feature_set`, which only a privileged domain may make) are
        // picked up. Unanswered (an unprivileged domain gets -EPERM), the features stay
        // as they were: unknown, or what `set_features` gave.
        if let Ok(features) = features_of_xen(config.hypercalls) {
            self.set_features(features);
        }
        Ok(())
    }

    /// Unregisters `vcpu`'s page: `XENPMU_finish` with `vcpu` and version 0.1. The page is
    /// forgotten even when Xen fails the call (as Linux does).
    ///
    /// Like [`init_vcpu`](Self::init_vcpu), `vcpu` may be any vCPU of the domain
    /// (`XENPMU_finish` takes it from its parameters).
    ///
    /// After `Ok` the caller may free the page. After an error from Xen the page may
    /// still be mapped by Xen, which could write it at a later PMI: the caller should
    /// leak it rather than reuse it. [`PmuError::NotInitialized`] (no page) makes no
    /// hypercall.
    pub fn finish_vcpu(&self, vcpu: u32) -> Result<(), PmuError> {
        let config = self.config()?;
        let slot = self.slot(vcpu)?;
        let old = slot.page.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if old.is_null() {
            return Err(PmuError::NotInitialized);
        }
        // Xen frees its context with the page: a refused one is gone too.
        slot.set_flush_rejected(false);
        let mut params = XenPmuParams::new(0, vcpu);
        self.note(op(config.hypercalls, XenPmuOp::FINISH, Some(&mut params)))
            .map(drop)
    }

    /// Unregisters `vcpu`'s page like [`finish_vcpu`](Self::finish_vcpu) and keeps it,
    /// with its frame, for [`unpark_vcpu`](Self::unpark_vcpu): what a vCPU going offline
    /// needs (Linux finishes the vPMU of a CPU going down, and registers it again when
    /// the CPU comes back), and what a suspend or a shutdown needs for every vCPU (Xen
    /// forgets every registration across a save/restore).
    ///
    /// The page stays the backend's, not the caller's to free or reuse, until
    /// `unpark_vcpu` registers it again or [`release_parked`](Self::release_parked) hands
    /// it back. If Xen fails the `XENPMU_finish`, it may still write the page: it is then
    /// forgotten (leaked), not parked, and the error returned. With no page registered:
    /// [`PmuError::NotInitialized`], no hypercall.
    pub fn park_vcpu(&self, vcpu: u32) -> Result<(), PmuError> {
        let slot = self.slot(vcpu)?;
        let page = slot.page.load(Ordering::Acquire);
        let mfn = slot.mfn.load(Ordering::Acquire);
        self.finish_vcpu(vcpu)?;
        slot.parked_mfn.store(mfn, Ordering::Release);
        slot.parked.store(page, Ordering::Release);
        Ok(())
    }

    /// Registers again the page [`park_vcpu`](Self::park_vcpu) kept for `vcpu`, at the
    /// frame it had (a vCPU back from `VCPUOP_down`: its memory did not move). After a
    /// restore the page's frame changed: use [`unpark_vcpu_at`](Self::unpark_vcpu_at).
    /// [`PmuError::NotInitialized`] when nothing is parked; on any other error the page
    /// stays parked.
    pub fn unpark_vcpu(&self, vcpu: u32) -> Result<(), PmuError> {
        let mfn = self.slot(vcpu)?.parked_mfn.load(Ordering::Acquire);
        // SAFETY: the frame is the one the page had when `init_vcpu` took it (whose
        // caller vouched for it), and a parked page stays the backend's: nothing else
        // uses it until it is registered again.
        unsafe { self.unpark_vcpu_at(vcpu, mfn) }
    }

    /// [`unpark_vcpu`](Self::unpark_vcpu) at machine frame `mfn`.
    ///
    /// # Safety
    ///
    /// `mfn` must be the parked page's machine frame now (Xen maps that frame and writes
    /// the vCPU's PMU state into it).
    pub unsafe fn unpark_vcpu_at(&self, vcpu: u32, mfn: u64) -> Result<(), PmuError> {
        let slot = self.slot(vcpu)?;
        let page = slot.parked.swap(core::ptr::null_mut(), Ordering::AcqRel);
        let Some(page) = NonNull::new(page) else {
            return Err(PmuError::NotInitialized);
        };
        // SAFETY: the page came to `init_vcpu` aligned and valid, and stayed the
        // backend's while parked; `mfn` is its frame (caller).
        let r = unsafe { self.init_vcpu(vcpu, page, mfn) };
        if r.is_err() {
            slot.parked.store(page.as_ptr(), Ordering::Release);
        }
        r
    }

    /// Records that the page parked for `vcpu` is now at machine frame `mfn` (after a
    /// restore, a page parked while its vCPU was offline has a new frame too: without
    /// this, bringing the vCPU back would register the old domain's frame). Returns
    /// whether a page was parked.
    ///
    /// # Safety
    ///
    /// `mfn` must be the parked page's machine frame now (the next [`unpark_vcpu`]
    /// has Xen map it and write the vCPU's PMU state there).
    ///
    /// [`unpark_vcpu`]: Self::unpark_vcpu
    ///
    /// Safe code cannot point a parked page at a frame of its choosing:
    ///
    /// ```compile_fail,E0133
    /// fn any_frame() {
    ///     let _ = xenmsr::pmu::global().set_parked_frame(1, 0x1234);
    /// }
    /// ```
    pub unsafe fn set_parked_frame(&self, vcpu: u32, mfn: u64) -> bool {
        let Ok(slot) = self.slot(vcpu) else {
            return false;
        };
        if slot.parked.load(Ordering::Acquire).is_null() {
            return false;
        }
        slot.parked_mfn.store(mfn, Ordering::Release);
        true
    }

    /// Whether `vcpu` has a parked page.
    pub fn is_parked(&self, vcpu: u32) -> bool {
        self.slot(vcpu)
            .is_ok_and(|s| !s.parked.load(Ordering::Acquire).is_null())
    }

    /// The page parked for `vcpu`, if any (it stays parked: to find its frame after a
    /// restore, for [`unpark_vcpu_at`](Self::unpark_vcpu_at)).
    pub fn parked_page(&self, vcpu: u32) -> Option<NonNull<u8>> {
        NonNull::new(self.slot(vcpu).ok()?.parked.load(Ordering::Acquire))
    }

    /// Hands back the page parked for `vcpu` (the caller may free it), if any.
    pub fn release_parked(&self, vcpu: u32) -> Option<NonNull<u8>> {
        let slot = self.slot(vcpu).ok()?;
        NonNull::new(slot.parked.swap(core::ptr::null_mut(), Ordering::AcqRel))
    }

    /// Parks every registered vCPU's page ([`park_vcpu`](Self::park_vcpu)), as a kernel
    /// does before its final `SCHEDOP_shutdown` (Linux's `xen_reboot` finishes every
    /// CPU's vPMU) or before a suspend. Returns how many were parked, or the first
    /// error (the other vCPUs are still tried).
    pub fn park_all(&self) -> Result<u32, PmuError> {
        let Ok(config) = self.config() else {
            return Ok(0);
        };
        let mut parked = 0;
        let mut first_error = None;
        for vcpu in 0..config.slots.len() as u32 {
            if !self.is_initialized(vcpu) {
                continue;
            }
            match self.park_vcpu(vcpu) {
                Ok(()) => parked += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(parked), Err)
    }

    /// `XENPMU_mode_get`: the mode and the interface version `(major, minor)` Xen reports.
    pub fn mode_get(&self) -> Result<(XenPmuMode, u32, u32), PmuError> {
        let config = self.config()?;
        let mut params = XenPmuParams::new(0, 0);
        self.note(op(config.hypercalls, XenPmuOp::MODE_GET, Some(&mut params)))?;
        Ok((
            XenPmuMode::from_bits_retain(params.val),
            params.version_maj,
            params.version_min,
        ))
    }

    /// `XENPMU_feature_get`: the vPMU features. A successful answer also becomes the
    /// backend's [`features`](Self::features), which its cached path applies.
    ///
    /// Xen lets only a privileged domain ask (an unprivileged one gets
    /// [`PmuError::PermissionDenied`]).
    pub fn feature_get(&self) -> Result<XenPmuFeature, PmuError> {
        let config = self.config()?;
        let features = self.note(features_of_xen(config.hypercalls))?;
        self.set_features(features);
        Ok(features)
    }

    /// The Xen vPMU features the cached path applies, or `None` while they are unknown
    /// (then it applies none, which is Xen's default).
    ///
    /// They matter for `IA32_PERFEVTSELn`: with `XENPMU_FEATURE_IPC_ONLY` or
    /// `XENPMU_FEATURE_ARCH_ONLY` (Xen's `vpmu=ipc` / `vpmu=arch`), Xen's trap path refuses
    /// a write of any event outside the filter, and a cached write must be refused alike
    /// ([`verify::event_allowed`]). They come from the last successful
    /// [`feature_get`](Self::feature_get), which [`init_vcpu`](Self::init_vcpu) makes
    /// after each registration, or from [`set_features`](Self::set_features).
    pub fn features(&self) -> Option<XenPmuFeature> {
        let word = self.features.load(Ordering::Relaxed);
        (word & FEATURES_KNOWN != 0)
            .then(|| XenPmuFeature::from_bits_retain(word & !FEATURES_KNOWN))
    }

    /// Tells the backend Xen's vPMU features, for a kernel that cannot ask Xen (an
    /// unprivileged domain's `XENPMU_feature_get` is `-EPERM`) but knows the host's
    /// `vpmu=` setting. A later successful [`feature_get`](Self::feature_get) (made by
    /// every [`init_vcpu`](Self::init_vcpu)) replaces it with Xen's own answer.
    pub fn set_features(&self, features: XenPmuFeature) {
        // Bit 63 is the "known" mark; no XENPMU_FEATURE_* uses it.
        let word = (features.bits() & !FEATURES_KNOWN) | FEATURES_KNOWN;
        self.features.store(word, Ordering::Relaxed);
    }

    /// The calling vCPU wrote `value` to its APIC LVTPC: stores the value in its page's
    /// `lapic_lvtpc` and, outside a PMI, makes `XENPMU_lvtpc_set` so that Xen applies it.
    /// Inside a PMI ([`on_pmi`](Self::on_pmi) running, or `PMU_CACHED` set) the flush
    /// that ends the PMI applies it, so no hypercall is made.
    ///
    /// Xen's `XENPMU_lvtpc_set` acts on the vCPU that calls it, so this takes no vCPU:
    /// it is the one [`VpmuConfig::vcpu_id`] names. After a [`PmuError::FlushRejected`]
    /// (Xen keeps `PMU_CACHED` set) the value is stored and applied by the flush that
    /// [`recover`](Self::recover) makes.
    pub fn lvtpc_set(&self, value: u32) -> Result<(), PmuError> {
        let config = self.config()?;
        let (_, slot) = self.own_slot()?;
        // With the vPMU known to be off there is never a page: say why.
        let missing = if self.is_disabled() {
            PmuError::Disabled
        } else {
            PmuError::NotInitialized
        };
        let page = slot.page().ok_or(missing)?;
        page.set_lapic_lvtpc(value);
        if slot.state() & IN_PMI != 0 || page.cached() {
            return Ok(());
        }
        self.note(op(config.hypercalls, XenPmuOp::LVTPC_SET, None))
            .map(drop)
    }

    /// Runs a PMI handler on the calling vCPU and then always makes `XENPMU_flush`.
    ///
    /// Reads the sample from the page, marks the vCPU "in PMI", runs `handler` (whose PMU
    /// MSR accesses and RDPMCs are served from the cached context while `PMU_CACHED` is
    /// set), flushes, and clears the mark.
    ///
    /// Xen's `XENPMU_flush` acts on the vCPU that calls it, so this takes no vCPU: it is
    /// the one [`VpmuConfig::vcpu_id`] names ([`PmiContext::vcpu`]).
    ///
    /// # Upcalls
    ///
    /// Call it from the kernel's `VIRQ_XENPMU` upcall handler, which runs with the
    /// vCPU's upcalls masked (`evtchn_upcall_mask`), and keep them masked until it
    /// returns. The flush hands the page back to Xen; an access served from the page
    /// must therefore never be split by a flush on the same vCPU. Inside `on_pmi` the
    /// masked upcalls guarantee that, and outside it no access touches the page. A
    /// nested call on the same vCPU (upcalls left unmasked, or a handler calling
    /// `on_pmi`) is refused with [`PmuError::NestedPmi`]: the handler does not run and
    /// nothing is flushed, so the outer handler keeps its page.
    ///
    /// The flush runs on every normal return and also when `handler` unwinds (host
    /// builds with `panic = "unwind"`). A `no_std` kernel normally builds with
    /// `panic = "abort"`, where a panicking handler never returns here; there is
    /// nothing left to flush for then.
    ///
    /// Returns the handler's result, or the flush's error (Linux likewise reports a
    /// failed flush as "not handled"); the handler's result is then dropped. When Xen
    /// refuses the context at the flush the error is [`PmuError::FlushRejected`], and the
    /// vCPU's vPMU stays stopped until [`recover`](Self::recover) succeeds.
    pub fn on_pmi<R>(&self, handler: impl FnOnce(&PmiContext) -> R) -> Result<R, PmuError> {
        let config = self.config()?;
        let (vcpu, slot) = self.own_slot()?;
        let page = slot.page().ok_or(PmuError::NotInitialized)?;
        if slot.state() & FLUSH_REJECTED != 0 {
            return Err(PmuError::FlushRejected);
        }
        let regs = page.regs();
        let (sampled_vcpu, pcpu, domain_id) = page.sample_ids();
        let ctx = PmiContext {
            vcpu,
            regs,
            flags: page.flags(),
            sampled_vcpu,
            pcpu,
            domain_id,
        };
        // Only this vCPU writes its mark, with its upcalls masked: a plain swap suffices.
        if slot.enter_pmi() {
            return Err(PmuError::NestedPmi);
        }
        let guard = PmiGuard {
            slot,
            hypercalls: config.hypercalls,
            armed: true,
        };
        let value = handler(&ctx);
        let flushed = guard.finish();
        self.note(flushed).map(|()| value)
    }

    /// Recovers the calling vCPU's vPMU after Xen refused its context
    /// ([`PmuError::FlushRejected`]): repairs the cached context in the page so that it
    /// passes Xen's checks ([`verify`]: refused bits cleared, `pebs_enable` and a refused
    /// `ds_area` zeroed, AMD reserved control bits cleared) and makes `XENPMU_flush`
    /// again. On success the vPMU runs again and the number of repaired registers is
    /// returned; `Ok(0)` without a hypercall when nothing was refused.
    ///
    /// If Xen refuses again (`FlushRejected`: a check the library does not know, such as
    /// an AMD CPU whose reserved control bits read non-zero), the remedy is
    /// [`finish_vcpu`](Self::finish_vcpu) and a new [`init_vcpu`](Self::init_vcpu),
    /// which give Xen a fresh context.
    ///
    /// Like [`on_pmi`](Self::on_pmi) it acts on the calling vCPU, with its upcalls masked
    /// (for example in the upcall handler, right after `on_pmi` reported the refusal).
    pub fn recover(&self) -> Result<u32, PmuError> {
        let config = self.config()?;
        let (_, slot) = self.own_slot()?;
        if slot.state() & FLUSH_REJECTED == 0 {
            return Ok(0);
        }
        let page = slot.page().ok_or(PmuError::NotInitialized)?;
        let repaired = emulate::sanitize(page, &config.layout);
        self.note(flush(config.hypercalls, slot)).map(|()| repaired)
    }

    /// `rdmsr` of `msr` on the calling vCPU: `None` if `msr` is not a PMU MSR of this
    /// layout; `Some(Native)` if it is but the vCPU is not inside [`on_pmi`](Self::on_pmi)
    /// with its context cached (pass through); otherwise the cached value, or
    /// `Failed(PmuUnavailable)` for a page that fails validation.
    pub fn read(&self, msr: u32) -> Option<Outcome> {
        self.access(msr, Access::Read)
    }

    /// `wrmsr` of `value` to `msr` on the calling vCPU: as [`read`](Self::read), storing
    /// into the cached context. A write of `IA32_PERF_GLOBAL_OVF_CTRL` also clears those
    /// bits of the cached `global_status`.
    pub fn write(&self, msr: u32, value: u64) -> Option<Outcome> {
        self.access(msr, Access::Write(value))
    }

    /// `rdmsr` on the calling vCPU of an MSR the caller already classified (with this
    /// backend's [`layout`](Self::layout)) as `class`: the policy's one-probe dispatch.
    pub fn read_classified(&self, class: PmuMsr) -> Outcome {
        self.access_classified(class, Access::Read)
    }

    /// `wrmsr` on the calling vCPU of an MSR the caller already classified as `class`.
    pub fn write_classified(&self, class: PmuMsr, value: u64) -> Outcome {
        self.access_classified(class, Access::Write(value))
    }

    fn access(&self, msr: u32, access: Access) -> Option<Outcome> {
        let layout = self.config.get()?.layout;
        let class = classify(&layout, msr)?;
        Some(self.access_classified(class, access))
    }

    fn access_classified(&self, class: PmuMsr, access: Access) -> Outcome {
        let Some(config) = self.config.get() else {
            return Outcome::Native;
        };
        match own_context(config) {
            Context::Cached(page) => {
                let features = self.features().unwrap_or(XenPmuFeature::empty());
                emulate::access(page, &config.layout, features, class, access)
            }
            Context::Hardware => Outcome::Native,
            Context::Rejected => Outcome::Failed(MsrError::PmuUnavailable),
        }
    }

    /// RDPMC of `counter` on the calling vCPU, with the configured native reader. See
    /// [`rdpmc_with`](Self::rdpmc_with).
    pub fn rdpmc(&self, counter: u32) -> Outcome {
        match self.config.get() {
            Some(config) => self.rdpmc_with(counter, config.native),
            None => Outcome::Failed(MsrError::InvalidCounter),
        }
    }

    /// RDPMC of `counter` on the calling vCPU.
    ///
    /// - A counter index that names no counter of the layout (Intel: bit 30 plus a fixed
    ///   index below the fixed count, or a general index below the general count, and no
    ///   other bits; AMD: below the counter count) is `Failed(InvalidCounter)`.
    /// - Inside [`on_pmi`](Self::on_pmi) with `PMU_CACHED` set: the cached counter (Intel
    ///   `fixed_counters[i]` or `arch_counters[i].counter`; AMD `counters[i]`).
    /// - While Xen refuses the vCPU's context ([`PmuError::FlushRejected`]):
    ///   `Failed(PmuUnavailable)`.
    /// - Otherwise: `native.read_safe` of the counter MSR (Intel `0x309 + i` or `0xc1 + i`;
    ///   AMD `counters_base + i * step`), its error surfaced as `Failed`.
    pub fn rdpmc_with(&self, counter: u32, native: &dyn NativeMsr) -> Outcome {
        let Some(config) = self.config.get() else {
            return Outcome::Failed(MsrError::InvalidCounter);
        };
        let layout = config.layout;
        let Some(pmc) = decode_pmc(&layout, counter) else {
            return Outcome::Failed(MsrError::InvalidCounter);
        };
        match own_context(config) {
            Context::Cached(page) => return emulate::rdpmc(page, &layout, pmc),
            Context::Rejected => return Outcome::Failed(MsrError::PmuUnavailable),
            Context::Hardware => {}
        }
        match pmc.msr(&layout) {
            // SAFETY: `msr` is one of the layout's counter MSRs (decoded above); reading a
            // performance counter has no side effect, which is what RDPMC itself does.
            Some(msr) => match unsafe { native.read_safe(msr) } {
                Ok(value) => Outcome::Done(value),
                Err(e) => Outcome::Failed(e),
            },
            None => Outcome::Failed(MsrError::InvalidCounter),
        }
    }
}

/// Where the calling vCPU's PMU state is for an access right now.
///
/// The page only while the vCPU is inside [`Vpmu::on_pmi`] (so no flush can come before
/// the access that follows, see there) and Xen has cached the context (`PMU_CACHED`);
/// nowhere while Xen refuses the context. One load of the slot's state decides.
fn own_context(config: &VpmuConfig) -> Context {
    let vcpu = (config.vcpu_id)();
    let Some(slot) = usize::try_from(vcpu).ok().and_then(|i| config.slots.get(i)) else {
        return Context::Hardware;
    };
    match slot.state() {
        0 => Context::Hardware,
        IN_PMI => match slot.page().filter(|p| p.cached()) {
            Some(page) => Context::Cached(page),
            None => Context::Hardware,
        },
        _ => Context::Rejected,
    }
}

/// Where a vCPU's PMU state is for an access.
enum Context {
    /// In the page: inside `on_pmi`, with `PMU_CACHED`.
    Cached(SharedPage),
    /// In the hardware (Xen's trap-and-emulate path): pass through.
    Hardware,
    /// Nowhere usable: Xen refused the context at the last flush.
    Rejected,
}

/// Ends a PMI: flushes and clears the "in PMI" mark, on the normal path via
/// [`finish`](Self::finish) and on unwinding via `Drop`.
struct PmiGuard<'a> {
    slot: &'a VcpuSlot,
    hypercalls: HypercallPage,
    armed: bool,
}

impl PmiGuard<'_> {
    fn flush(&mut self) -> Result<(), PmuError> {
        self.armed = false;
        let r = flush(self.hypercalls, self.slot);
        self.slot.leave_pmi();
        r
    }

    fn finish(mut self) -> Result<(), PmuError> {
        self.flush()
    }
}

impl Drop for PmiGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Unwinding out of the handler: the error has nowhere to go.
            let _ = self.flush();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The global instance a kernel uses.
// ---------------------------------------------------------------------------------------

static VPMU: Vpmu = Vpmu::new();

/// Reads MSRs with a raw, never-patched RDMSR (`xenmsr_asm::native::rdmsr_safe`): the
/// native reader `xenmsr::init` configures the global backend with.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawMsr;

impl NativeMsr for RawMsr {
    unsafe fn read_safe(&self, msr: u32) -> Result<u64, MsrError> {
        // SAFETY: the caller may read `msr` (this method's contract); a fault becomes an
        // error through the instruction's extable entry.
        unsafe { xenmsr_asm::native::rdmsr_safe(msr) }
    }
}

/// The CPUID of the CPU this runs on, as `[eax, ebx, ecx, edx]`.
pub fn raw_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Configures the global backend (first call wins) and returns it. `xenmsr::init` does
/// this on Xen PV, from its [`Platform::XenPv`](crate::Platform::XenPv) fields.
///
/// `config.layout` should come from Xen's view of CPUID (in a PV guest, the
/// forced-emulation form, [`xen_cpuid`](crate::xen_cpuid)), since Xen sizes the shared
/// page by that view. A layout claiming more counters than Xen's banks hold is caught by
/// the page validation (the accesses fail with `PmuUnavailable`), never read past.
pub fn install(config: VpmuConfig) -> &'static Vpmu {
    VPMU.configure(config);
    &VPMU
}

/// The global backend.
pub fn global() -> &'static Vpmu {
    &VPMU
}

/// [`Vpmu::init_vcpu`] on the global backend: registers `page` (machine frame `mfn`) as
/// `vcpu`'s shared PMU page with Xen (`XENPMU_init`, version 0.1). `vcpu` may be any
/// vCPU of the domain.
///
/// # Examples
///
/// ```no_run
/// use core::ptr::NonNull;
/// use xenmsr::pmu::{self, PmuError};
///
/// fn start_pmu(vcpu: u32, page: NonNull<u8>, mfn: u64) {
///     // SAFETY: `page` is a page-aligned 4 KiB page this kernel owns, `mfn` its frame,
///     // and it stays allocated until `pmu::finish(vcpu)` returns Ok.
///     match unsafe { pmu::init(vcpu, page, mfn) } {
///         Ok(()) => {}
///         // Xen's vPMU is off: PMU MSRs simply pass through.
///         Err(PmuError::Disabled) => {}
///         Err(e) => panic!("vPMU init: {e:?}"),
///     }
/// }
/// ```
///
/// # Safety
///
/// As for [`Vpmu::init_vcpu`].
pub unsafe fn init(vcpu: u32, page: NonNull<u8>, mfn: u64) -> Result<(), PmuError> {
    // SAFETY: forwarded to the caller.
    unsafe { VPMU.init_vcpu(vcpu, page, mfn) }
}

/// [`Vpmu::finish_vcpu`] on the global backend (`vcpu` may be any vCPU of the domain).
pub fn finish(vcpu: u32) -> Result<(), PmuError> {
    VPMU.finish_vcpu(vcpu)
}

/// [`Vpmu::park_vcpu`] on the global backend.
pub fn park(vcpu: u32) -> Result<(), PmuError> {
    VPMU.park_vcpu(vcpu)
}

/// [`Vpmu::unpark_vcpu`] on the global backend.
pub fn unpark(vcpu: u32) -> Result<(), PmuError> {
    VPMU.unpark_vcpu(vcpu)
}

/// [`Vpmu::park_all`] on the global backend: call it before the domain's final
/// `SCHEDOP_shutdown`.
pub fn park_all() -> Result<u32, PmuError> {
    VPMU.park_all()
}

/// [`Vpmu::on_pmi`] on the global backend, for the calling vCPU. Call it from the
/// `VIRQ_XENPMU` upcall handler with upcalls masked (see [`Vpmu::on_pmi`]).
///
/// # Examples
///
/// The `VIRQ_XENPMU` handler of a vCPU:
///
/// ```no_run
/// fn pmu_interrupt() {
///     let sampled = xenmsr::pmu::on_pmi(|ctx| {
///         // PMU MSR accesses in here read and write the context Xen cached in the page.
///         (ctx.regs.ip, ctx.user_mode())
///     });
///     // The context was flushed back to Xen whatever the handler did.
///     let _ = sampled;
/// }
/// ```
pub fn on_pmi<R>(handler: impl FnOnce(&PmiContext) -> R) -> Result<R, PmuError> {
    VPMU.on_pmi(handler)
}

/// [`Vpmu::recover`] on the global backend, for the calling vCPU.
pub fn recover() -> Result<u32, PmuError> {
    VPMU.recover()
}

/// [`Vpmu::lvtpc_set`] on the global backend, for the calling vCPU.
pub fn lvtpc_set(value: u32) -> Result<(), PmuError> {
    VPMU.lvtpc_set(value)
}
