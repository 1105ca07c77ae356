//! What the stubs ask: the backend that decides each access, and the C-ABI entry points
//! the stubs call.
//!
//! The stubs know nothing of policy. They call one of the `extern "C"` handlers below,
//! which forward to the backend registered with [`set_backend`] (the shim's policy in a
//! kernel; a test double in host tests). With no backend registered every access is
//! [`Outcome::Native`], so an unpatched site still works on any platform.

use spin::Once;

use crate::MsrError;

/// A backend's decision for one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: for a read or RDPMC, this is the value (edx:eax); for a write it is ignored.
    Done(u64),
    /// Not handled: the stub executes the real instruction, which Xen traps and emulates.
    Native,
    /// Failed: the stub takes the rewind path, and the caller's own fixup runs with this
    /// error, exactly as if the native instruction had faulted at the call site.
    Failed(MsrError),
}

/// Decides what happens to each MSR/PMC access that reaches a stub.
///
/// A backend performs the access it decides (a hypercall for a segment base, a raw read
/// of the APIC base, a vPMU page access), so calling one is as unsafe as the instruction
/// it stands for: the methods are `unsafe fn`, and the stubs' handlers are their callers.
pub trait MsrBackend: Sync {
    /// `rdmsr` of `msr`.
    ///
    /// # Safety
    ///
    /// The caller must be allowed to execute `rdmsr` of `msr` here: the same contract as
    /// the native instruction (some MSRs have side effects on read).
    unsafe fn read(&self, msr: u32) -> Outcome;
    /// `wrmsr` of `value` to `msr`.
    ///
    /// # Safety
    ///
    /// The same contract as the native `wrmsr`: writing `value` to `msr` must not break
    /// anything the running code relies on (for example the FS or GS base that per-CPU
    /// data or thread-local storage sits behind).
    unsafe fn write(&self, msr: u32, value: u64) -> Outcome;
    /// `rdpmc` of `counter`.
    ///
    /// # Safety
    ///
    /// The same contract as the native `rdpmc`.
    unsafe fn rdpmc(&self, counter: u32) -> Outcome;
}

static BACKEND: Once<&'static dyn MsrBackend> = Once::new();

/// Registers the backend the stubs consult. The first registration wins; later calls
/// return `false` and change nothing, so the routing of a running kernel cannot be
/// swapped underneath it. From then on the read stub asks the backend about every read,
/// until [`crate::fastpath::install_read_filter`] names the reads it needs.
///
/// # Safety
///
/// From now on every access that reaches a generic stub is what `backend` decides: its
/// [`Outcome::Done`] is the value a read site returns and the end of a write, its
/// [`Outcome::Failed`] the error the caller sees. The backend must therefore answer each
/// access as the platform would carry it out (a read with the MSR's value as the kernel
/// may rely on it, a write done or deliberately dropped as the platform drops it), as
/// `xenmsr`'s Xen PV policy does; a backend that, say, reported a segment-base write done
/// without making it would leave the kernel using the old base.
///
/// ```compile_fail,E0133
/// use xenmsr_asm::backend::{MsrBackend, set_backend};
/// fn install(backend: &'static dyn MsrBackend) {
///     set_backend(backend);
/// }
/// ```
///
/// ```
/// use xenmsr_asm::{MsrBackend, Outcome};
///
/// /// Executes every access natively, as the stubs do without a backend.
/// struct Native;
/// impl MsrBackend for Native {
///     unsafe fn read(&self, _: u32) -> Outcome { Outcome::Native }
///     unsafe fn write(&self, _: u32, _: u64) -> Outcome { Outcome::Native }
///     unsafe fn rdpmc(&self, _: u32) -> Outcome { Outcome::Native }
/// }
/// static NATIVE: Native = Native;
/// // SAFETY: every access is carried out by the native instruction, as without a backend.
/// assert!(unsafe { xenmsr_asm::backend::set_backend(&NATIVE) });
/// ```
pub unsafe fn set_backend(backend: &'static dyn MsrBackend) -> bool {
    let mut installed = false;
    BACKEND.call_once(|| {
        installed = true;
        backend
    });
    if installed {
        // The read stub's fast path must not pass a read through behind the backend's
        // back: every read is the backend's until a read filter narrows it down.
        crate::fastpath::divert_all_reads();
    }
    installed
}

/// The registered backend, if any.
pub fn backend() -> Option<&'static dyn MsrBackend> {
    BACKEND.get().copied()
}

/// The handler's answer as the stubs see it, returned in `rax:rdx` by the C ABI.
///
/// `status` 0 means done (`value` is the result), 1 means "do native", and any other
/// value is an encoded [`MsrError`] (see [`MsrError::to_code`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawOutcome {
    /// 0: done; 1: native; otherwise an error code.
    pub status: u64,
    /// The value, when `status` is 0.
    pub value: u64,
}

/// `RawOutcome::status` for a handled access.
pub const STATUS_DONE: u64 = 0;
/// `RawOutcome::status` for "execute the real instruction".
pub const STATUS_NATIVE: u64 = 1;

impl From<Outcome> for RawOutcome {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Done(value) => RawOutcome {
                status: STATUS_DONE,
                value,
            },
            Outcome::Native => RawOutcome {
                status: STATUS_NATIVE,
                value: 0,
            },
            Outcome::Failed(error) => RawOutcome {
                status: error.to_code(),
                value: 0,
            },
        }
    }
}

/// The read stub's C-ABI entry: asks the registered backend about `rdmsr` of `msr`
/// ([`Outcome::Native`] when none is registered).
///
/// Called by `xenmsr_stub_rdmsr` and `xenmsr_stub_rdmsr_rax` with a 16-byte-aligned stack.
/// Callable from Rust too (benchmarks compare against exactly that).
///
/// # Safety
///
/// As [`MsrBackend::read`]: the caller must be allowed to execute `rdmsr` of `msr`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenmsr_handle_read(msr: u32) -> RawOutcome {
    match backend() {
        // SAFETY: forwarded to the caller (the read stub, whose caller's site executes
        // the `rdmsr` this stands for).
        Some(backend) => unsafe { backend.read(msr) }.into(),
        None => Outcome::Native.into(),
    }
}

/// The write stub's C-ABI entry: asks the registered backend about `wrmsr` of
/// `hi:lo` to `msr` ([`Outcome::Native`] when none is registered).
///
/// The value arrives as two halves so the stub can pass `edx` through as the third
/// argument register unchanged (one instruction fewer on every write).
///
/// # Safety
///
/// As [`MsrBackend::write`]: the same contract as a native `wrmsr` of `hi:lo` to `msr`
/// (a segment-base write, for one, changes what `%fs:`/`%gs:` accesses reach).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenmsr_handle_write(msr: u32, lo: u32, hi: u32) -> RawOutcome {
    let value = (hi as u64) << 32 | lo as u64;
    match backend() {
        // SAFETY: forwarded to the caller (the write stub, whose caller's site is the
        // `wrmsr` this stands for).
        Some(backend) => unsafe { backend.write(msr, value) }.into(),
        None => Outcome::Native.into(),
    }
}

/// The RDPMC stub's C-ABI entry: asks the registered backend about `rdpmc` of `counter`
/// ([`Outcome::Native`] when none is registered).
///
/// # Safety
///
/// As [`MsrBackend::rdpmc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenmsr_handle_rdpmc(counter: u32) -> RawOutcome {
    match backend() {
        // SAFETY: forwarded to the caller (the RDPMC stub's caller's site).
        Some(backend) => unsafe { backend.rdpmc(counter) }.into(),
        None => Outcome::Native.into(),
    }
}
