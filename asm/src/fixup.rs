//! Exception fixup: what the kernel's exception handlers call (`#GP` and `#UD` for the
//! library's MSR accesses; every resumable fault for the kernel's guarded instructions).
//!
//! [`fixup_exception`] looks the faulting `rip` up in the extable and applies the entry's
//! kind, with the semantics of Linux's MSR fixups:
//!
//! | kind | outputs | error | then |
//! |---|---|---|---|
//! | `ReadSafe`, `RdpmcSafe` | `edx:eax` = 0 (`rax` = 0 with `RAX_CONTRACT`) | code in the entry's register | `rip` = fixup |
//! | `WriteSafe` | none | code in the entry's register | `rip` = fixup |
//! | `Read`, `Rdpmc` | zeroed as above | warn hook, once per kind | `rip` = fixup |
//! | `Write` | none | warn hook, once per kind | `rip` = fixup |
//! | `Rewind` | see below | carried or `Fault` | dispatch again |
//! | `Guarded` | none | `Fault { vector }` code in the entry's register | `rip` = fixup |
//!
//! **Which vectors.** The MSR kinds (every kind but `Guarded`) are fixed up only for `#GP`
//! and `#UD`: an MSR instruction, Xen's emulation of one and a stub's trap raise nothing
//! else, so any other vector at such an address is not the library's to answer. A
//! `Guarded` entry (a kernel's own instruction, [`guarded_asm!`](crate::guarded_asm)) is
//! fixed up for every vector [`is_resumable_fault`] accepts: a fault, reported before the
//! instruction changed anything, at the instruction's own address. Interrupts (NMI, and
//! any event that merely arrives while `rip` is there), traps reported after an
//! instruction (`#DB`, `#BP`, `#OF`) and aborts (`#DF`, `#MC`) are refused, for every
//! kind.
//!
//! (`RAX_CONTRACT`: a failing constant-index read zeroes `rdx` too, because its site
//! computes the value as `rax | rdx << 32`.)
//!
//! A rewind entry (on a stub's native instruction or its trapping `ud2`) says how many words
//! sit above the stub's return address and whether the first is an error code. The fixup
//! takes the error (the carried code, or `Fault { vector }` for a fault of the stub's own
//! native instruction), sets `rip = return address + imm` (imm = `-CALL_LEN`: the caller's
//! `call`), pops the words and the return address, and dispatches again on the caller's own
//! entry at that `rip`, which must exist. A constant-index site's call is prefixed (one
//! `IMM_SITE_LEN`-byte instruction), so there `rip` lands inside the call: with no entry
//! at `rip`, the entry [`IMM_SITE_LEN`] bytes before the return address is the caller's if
//! its fixup is the return address. The caller cannot tell the result from the native
//! instruction faulting at its call site.
//!
//! **FSGSBASE without CR4.FSGSBASE (Xen PV).** Xen keeps CR4 per vCPU, so on a vCPU the
//! kernel did not enable it on, `rdfsbase`/`wrfsbase`/`rdgsbase`/`wrgsbase` raise `#UD`.
//! Once the segment-base hypercall page is stored (Xen PV, after `init`), a `#UD` raised by
//! the CPU (not an error a stub carries) that reaches the entry of a read or write site
//! whose MSR (`ecx`) is `FS_BASE` or `GS_BASE` is that case, whichever way it came (the
//! inline instruction of a constant-index site, or a stub's, through its rewind): the fixup
//! completes the access instead of failing it, with the write through
//! `set_segment_base(FS | GS_KERNEL, edx:eax)` and the read with a trapped RDMSR (which
//! Xen emulates), sets the outputs as the instruction would have and resumes after the
//! site. An error from that path is the access's error. The fallbacks are counted
//! ([`fsgsbase_fallbacks`]), and the first one is reported to the hook set with
//! [`set_fsgsbase_fallback_hook`], so the kernel learns that a vCPU missed its CR4 step.
//!
//! Rewinding through the stack (rather than carrying the target in a register, as an
//! "indirect" entry would) keeps every register of the caller intact: the write stub's
//! `rdx` is an input its caller expects preserved, so there is no free register to carry
//! the target in.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;
use xenmsr_hypercall::abi::SegmentBase;

use crate::extable::{self, Data, ExtableEntry, Kind, flags, reg};
use crate::{IMM_SITE_LEN, MsrError, VECTOR_GP, VECTOR_UD};

/// The interrupted context, as the kernel's exception entry saved it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
}

impl TrapFrame {
    /// The general-purpose register with hardware number `reg` (0 = `rax` ... 15 = `r15`;
    /// 4 = `rsp`).
    pub fn gpr_mut(&mut self, reg: u8) -> Option<&mut u64> {
        Some(match reg {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => &mut self.rsp,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }
}

/// Which instruction an unchecked access was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessOp {
    /// RDMSR.
    Read,
    /// WRMSR / WRMSRNS.
    Write,
    /// RDPMC.
    Rdpmc,
}

/// An unchecked access that failed, as reported to the warn hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UncheckedAccess {
    /// The instruction.
    pub op: AccessOp,
    /// The MSR index or counter (`ecx` at the site).
    pub msr_or_counter: u32,
    /// For writes, the value (`edx:eax`, or `rax` for `RAX_CONTRACT` sites); else 0.
    pub value: u64,
    /// Address of the site (the start of its patchable region).
    pub site: usize,
    /// Why it failed.
    pub error: MsrError,
}

impl UncheckedAccess {
    /// The kind of failure a warning is given once for: the instruction (RDMSR, WRMSR,
    /// RDPMC) and the error (its class, and the vector or errno). The MSR index and the
    /// call site are not part of it. Never 0.
    pub fn warning_kind(&self) -> u64 {
        let op = match self.op {
            AccessOp::Read => 1u64,
            AccessOp::Write => 2,
            AccessOp::Rdpmc => 3,
        };
        let code = self.error.to_code();
        // The class (low byte) and the payload (a vector or an errno, 32 bits).
        op | (code & 0xff) << 8 | (code >> 32) << 16 | 1 << 63
    }
}

static WARN_HOOK: Once<fn(&UncheckedAccess)> = Once::new();

/// The kinds of failure that have warned (see [`UncheckedAccess::warning_kind`]): an
/// open-addressing set of non-zero keys, filled with compare-and-swap (the fixup runs in
/// exception context on any CPU, so no lock).
static WARNED_KINDS: [AtomicU64; WARNED_KINDS_CAPACITY] =
    [const { AtomicU64::new(0) }; WARNED_KINDS_CAPACITY];

/// How many distinct kinds of failure are remembered: far more than there are (three
/// instructions times the errors they can fail with). Should it ever fill up, a new kind
/// warns once per call site instead (each extable entry's `WARNED` bit).
pub const WARNED_KINDS_CAPACITY: usize = 128;

/// Whether this is the first failure of its kind: inserts the kind and says whether it
/// was new. `None` when the set is full and the kind is not in it.
fn first_of_kind(kind: u64) -> Option<bool> {
    let start = (kind.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as usize;
    for i in 0..WARNED_KINDS_CAPACITY {
        let slot = &WARNED_KINDS[(start + i) % WARNED_KINDS_CAPACITY];
        match slot.compare_exchange(0, kind, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(true),
            Err(existing) if existing == kind => return Some(false),
            Err(_) => {}
        }
    }
    None
}

/// Whether a failing unchecked access should warn: once per kind of failure, as Linux
/// warns once for an unchecked RDMSR and once for an unchecked WRMSR, here also told apart
/// by the error (a `#GP` is not a failed hypercall). Where it happens does not matter: one
/// call site repeated by the compiler (an unrolled loop, an inlined helper) warns once,
/// and so does the same failure on every vCPU.
fn should_warn(access: &UncheckedAccess, entry: &ExtableEntry) -> bool {
    match first_of_kind(access.warning_kind()) {
        Some(first) => first,
        None => entry.mark_warned(),
    }
}

/// Sets the hook told about failing unchecked accesses (once per kind of failure: see
/// [`UncheckedAccess::warning_kind`]). The first call wins and later calls return `false`.
/// Until a hook is set, failures are silent and do not use up a warning. The hook runs
/// inside the exception handler: it must not fault on MSRs itself, block, or allocate
/// where the kernel cannot.
///
/// Safe, unlike a trap handler: the hook gets a copy of the report and nothing of the
/// interrupted context, so it cannot change where or how the faulting code resumes, and
/// the fixup holds no lock while it runs (a hook that faults or blocks hangs or stops the
/// kernel, which is no memory error).
pub fn set_warn_hook(hook: fn(&UncheckedAccess)) -> bool {
    let mut installed = false;
    WARN_HOOK.call_once(|| {
        installed = true;
        hook
    });
    installed
}

/// Whether a warn hook is registered (so [`set_warn_hook`] would change nothing).
pub fn warn_hook_registered() -> bool {
    WARN_HOOK.get().is_some()
}

/// Whether an exception with `vector` is a *fault* after which execution may continue
/// somewhere else: the CPU (or Xen, which injects it into a PV guest the same way)
/// reports it with `rip` at the instruction that raised it, before that instruction
/// changed any state. These are the vectors a [`Kind::Guarded`] entry answers: `#DE` (0),
/// `#BR` (5), `#UD` (6), `#NM` (7), `#TS` (10), `#NP` (11), `#SS` (12), `#GP` (13), `#PF`
/// (14), `#MF` (16), `#AC` (17) and `#XM` (19).
///
/// Not: NMI (2), an interrupt that can arrive with `rip` at any instruction, including one
/// that is guarded but has not run; `#DB` (1), `#BP` (3) and `#OF` (4), reported after an
/// instruction; `#DF` (8) and `#MC` (18), aborts whose `rip` may not even belong to the
/// interrupted code; the reserved 9 and 15. (A `#PF`'s faulting address, CR2, which a PV
/// guest finds in its `vcpu_info`'s `arch.cr2`, plays no part: the entry is found by `rip`.)
pub const fn is_resumable_fault(vector: u8) -> bool {
    matches!(vector, 0 | 5 | 6 | 7 | 10..=14 | 16 | 17 | 19)
}

/// How many rewinds one fixup follows before it gives up. A stub's rewind lands on its
/// caller's site entry, so one is normal; more means a stub called a stub, and a chain
/// this long is a bug.
pub const MAX_REWINDS: usize = 4;

/// Handles an exception taken at `frame.rip` if the extable covers it. Returns `true`
/// with `frame` updated (resume it), or `false` with `frame` untouched (not ours, or a
/// malformed entry or chain: the kernel should treat the exception as fatal).
///
/// The library's MSR entries are fixed up for `#GP` and `#UD` only; a kernel's guarded
/// instructions ([`guarded_asm!`](crate::guarded_asm)) for every vector
/// [`is_resumable_fault`] accepts. Any other vector gives `false`.
///
/// # Safety
///
/// `frame` must be the interrupted context of a real exception with vector `vector`
/// raised at `frame.rip`, and `frame.rsp` must be that context's stack pointer: for
/// rewind entries this reads the interrupted stack at `frame.rsp` (the words a stub left
/// above its return address).
///
/// # Examples
///
/// A kernel's exception handler, called by its entry code with the saved registers (the
/// fixup itself refuses the vectors it has no business with):
///
/// ```no_run
/// use xenmsr_asm::fixup::{TrapFrame, fixup_exception};
///
/// fn handle_exception(frame: &mut TrapFrame, vector: u8) {
///     // SAFETY: `frame` is the interrupted context of this exception; the entry code
///     // writes it back (including `rip` and `rsp`) before returning.
///     if unsafe { fixup_exception(frame, vector) } {
///         return; // resume at the fixed-up `frame.rip`
///     }
///     panic!("unhandled exception {vector} at {:#x}", frame.rip);
/// }
/// ```
pub unsafe fn fixup_exception(frame: &mut TrapFrame, vector: u8) -> bool {
    // SAFETY: forwarded from the caller; the table is the running image's.
    unsafe { fixup_with_table(extable::table(), frame, vector) }
}

/// [`fixup_exception`] against an explicit, sorted `table` (for tests on synthetic tables).
///
/// # Safety
///
/// As for [`fixup_exception`]; in addition every rewind entry of `table` that can match
/// `frame.rip` must describe the stack at `frame.rsp` truthfully.
pub unsafe fn fixup_with_table(table: &[ExtableEntry], frame: &mut TrapFrame, vector: u8) -> bool {
    if !is_resumable_fault(vector) {
        return false;
    }
    let mut work = *frame;
    let mut carried: Option<MsrError> = None;
    // The error is the exception itself (no stub carried an error code to the site).
    let mut raised = true;
    // The return address the last rewind popped.
    let mut returned_to: Option<usize> = None;
    for _ in 0..=MAX_REWINDS {
        let entry = match extable::search(table, work.rip as usize) {
            Some(entry) => entry,
            None => match returned_to.and_then(|ret| prefixed_call_site(table, ret)) {
                Some(entry) => {
                    work.rip = entry.insn_addr() as u64;
                    entry
                }
                None => return false,
            },
        };
        let data = entry.data();
        match data.kind() {
            // A kernel's own instruction: only where the exception was raised (no stub
            // rewinds onto one), and for any resumable fault.
            Some(Kind::Guarded) if returned_to.is_none() => {
                return apply_guarded(frame, entry, data, vector);
            }
            Some(kind) if kind.is_msr_access() && (vector == VECTOR_GP || vector == VECTOR_UD) => {}
            _ => return false,
        }
        let applied = match data.kind() {
            None | Some(Kind::Guarded) => return false,
            Some(Kind::Rewind) => {
                // SAFETY: the entry is a rewind entry at the faulting rip, so (caller's
                // contract) the stack at rsp holds what the entry describes.
                match unsafe { rewind(&mut work, data, vector) } {
                    Some((error, ret)) => {
                        carried = Some(error);
                        raised &= !data.has(flags::CARRIES_ERROR);
                        returned_to = Some(ret);
                        continue;
                    }
                    None => return false,
                }
            }
            Some(kind) => {
                let error = carried.unwrap_or(MsrError::Fault { vector });
                // A #UD the CPU raised at an FS/GS base access: complete it (Xen PV).
                let fallback = if vector == VECTOR_UD && raised {
                    fsgsbase_fallback(&mut work, entry, kind, data)
                } else {
                    None
                };
                match fallback {
                    Some(Ok(())) => {
                        work.rip = entry.fixup_addr() as u64;
                        true
                    }
                    Some(Err(error)) => apply(&mut work, entry, kind, data, error),
                    None => apply(&mut work, entry, kind, data, error),
                }
            }
        };
        if applied {
            *frame = work;
        }
        return applied;
    }
    false
}

/// The entry of the constant-index site whose call returned to `ret`. Its call is prefixed
/// (`IMM_CALL_PREFIX`, then `call`: one [`IMM_SITE_LEN`]-byte instruction ending at the end
/// of the site), so `ret - CALL_LEN` lies inside it; the site starts `IMM_SITE_LEN` bytes
/// before `ret`, and its entry's fixup (the end of the site) is `ret`.
fn prefixed_call_site(table: &[ExtableEntry], ret: usize) -> Option<&ExtableEntry> {
    let entry = extable::search(table, ret.checked_sub(IMM_SITE_LEN)?)?;
    let is_site =
        matches!(entry.data().kind(), Some(kind) if kind.is_msr_access() && kind != Kind::Rewind);
    (is_site && entry.fixup_addr() == ret).then_some(entry)
}

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;

/// An FS or GS base access that the fixup completed without FSGSBASE, because the
/// instruction raised `#UD`: CR4.FSGSBASE is off on the vCPU that ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsGsBaseFallback {
    /// A read (RDFSBASE/RDGSBASE) or a write (WRFSBASE/WRGSBASE).
    pub op: AccessOp,
    /// `FS_BASE` or `GS_BASE`.
    pub msr: u32,
    /// Address of the site (the start of its patchable region).
    pub site: usize,
}

static FSGSBASE_FALLBACKS: AtomicU64 = AtomicU64::new(0);
static FALLBACK_HOOK: Once<fn(&FsGsBaseFallback)> = Once::new();

/// Sets the hook told about the first FS/GS base access the fixup completed without
/// FSGSBASE (see the module docs). The first call wins and later calls return `false`.
/// The hook runs inside the exception handler, with the restrictions of the warn hook,
/// and is safe to set for the same reason: it gets a copy of the report, not the frame,
/// and is called after the access was completed.
pub fn set_fsgsbase_fallback_hook(hook: fn(&FsGsBaseFallback)) -> bool {
    let mut installed = false;
    FALLBACK_HOOK.call_once(|| {
        installed = true;
        hook
    });
    installed
}

/// How many FS/GS base accesses the fixup completed without FSGSBASE (a `#UD` at an
/// FSGSBASE instruction on a vCPU without CR4.FSGSBASE): 0 when every vCPU that ran a
/// patched site had the bit.
pub fn fsgsbase_fallbacks() -> u64 {
    FSGSBASE_FALLBACKS.load(Ordering::Relaxed)
}

/// Completes a read or write of `FS_BASE`/`GS_BASE` whose FSGSBASE instruction raised
/// `#UD` (the caller checked that the exception is a `#UD` raised by the CPU), on Xen PV:
/// `None` if this is not such an access (then the entry applies as usual), else the
/// result of the access through the segment-base hypercall or a trapped RDMSR, with the
/// outputs set on success.
fn fsgsbase_fallback(
    frame: &mut TrapFrame,
    entry: &ExtableEntry,
    kind: Kind,
    data: Data,
) -> Option<Result<(), MsrError>> {
    let msr = frame.rcx as u32;
    if msr != MSR_FS_BASE && msr != MSR_GS_BASE {
        return None;
    }
    let op = match kind {
        Kind::Read | Kind::ReadSafe => AccessOp::Read,
        Kind::Write | Kind::WriteSafe => AccessOp::Write,
        _ => return None,
    };
    // Only on Xen PV, where FS/GS base sites run nothing else that can raise #UD (the
    // routes never give them WRMSRNS or the immediate forms).
    let page = crate::stubs::segbase_hypercall_page()?;
    let result = match op {
        AccessOp::Write => {
            let value = if data.has(flags::RAX_CONTRACT) {
                frame.rax
            } else {
                (frame.rdx & 0xffff_ffff) << 32 | (frame.rax & 0xffff_ffff)
            };
            let which = if msr == MSR_FS_BASE {
                SegmentBase::FS
            } else {
                SegmentBase::GS_KERNEL
            };
            // SAFETY: the site's caller vouched for this write (the site's contract); the
            // hypercall performs exactly the write the faulting instruction would have.
            unsafe { page.set_segment_base(which, value) }.map_err(MsrError::Hypercall)
        }
        _ => {
            // SAFETY: as above, for the read; on Xen PV the RDMSR traps and Xen emulates
            // it, and a fault comes back as `Err` through its own entry.
            unsafe { crate::native::rdmsr_safe(msr) }.map(|value| {
                frame.rax = if data.has(flags::RAX_CONTRACT) {
                    value
                } else {
                    value & 0xffff_ffff
                };
                frame.rdx = value >> 32;
            })
        }
    };
    if FSGSBASE_FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0
        && let Some(hook) = FALLBACK_HOOK.get()
    {
        hook(&FsGsBaseFallback {
            op,
            msr,
            site: entry.insn_addr(),
        });
    }
    Some(result)
}

/// Applies a rewind entry to `frame`; returns the error it carries and the return address
/// it popped, or `None` if the entry or stack is malformed.
///
/// # Safety
///
/// `frame.rsp` must point at the stack the rewind entry describes: `skip` readable words
/// and then the stub's return address.
unsafe fn rewind(frame: &mut TrapFrame, data: Data, vector: u8) -> Option<(MsrError, usize)> {
    let skip = usize::from(data.reg());
    let sp = frame.rsp as usize;
    let ret_slot = sp.checked_add(8 * skip)?;
    let new_sp = ret_slot.checked_add(8)?;
    let error = if data.has(flags::CARRIES_ERROR) {
        if skip == 0 {
            return None;
        }
        // SAFETY: the caller guarantees the words above rsp are the stub's; the first is
        // the error code it pushed. `read_unaligned`: the kernel may have been interrupted
        // with any stack alignment.
        let code = unsafe { (sp as *const u64).read_unaligned() };
        MsrError::from_code(code)?
    } else {
        MsrError::Fault { vector }
    };
    if data.has(flags::RESTORES_RAX) {
        if skip == 0 {
            return None;
        }
        // SAFETY: as above: the last skipped word, right below the return address, is the
        // caller's rax the stub saved.
        frame.rax = unsafe { ((ret_slot - 8) as *const u64).read_unaligned() };
    }
    // SAFETY: as above: the return address sits right above the skipped words.
    let ret = unsafe { (ret_slot as *const u64).read_unaligned() };
    frame.rip = ret.wrapping_add_signed(i64::from(data.imm()));
    frame.rsp = new_sp as u64;
    Some((error, ret as usize))
}

/// Applies a [`Kind::Guarded`] entry: the code of `MsrError::Fault { vector }` (what
/// [`GuardedFault`](crate::guarded::GuardedFault) decodes) into the entry's register,
/// every other register as the fault left it, and `rip` at the fixup. Returns `false`
/// (with `frame` untouched) for an entry naming `rsp`.
fn apply_guarded(frame: &mut TrapFrame, entry: &ExtableEntry, data: Data, vector: u8) -> bool {
    let target = data.reg();
    if target == reg::RSP {
        return false;
    }
    let mut work = *frame;
    match work.gpr_mut(target) {
        Some(slot) => *slot = MsrError::Fault { vector }.to_code(),
        None => return false,
    }
    work.rip = entry.fixup_addr() as u64;
    *frame = work;
    true
}

/// Applies a site entry of `kind`. Returns `false` for a malformed entry.
fn apply(
    frame: &mut TrapFrame,
    entry: &ExtableEntry,
    kind: Kind,
    data: Data,
    error: MsrError,
) -> bool {
    let rax_contract = data.has(flags::RAX_CONTRACT);
    // With RAX_CONTRACT `rdx` is an input (0) the site folds into the value, and a stub
    // may leave anything there on failure, so both are zeroed in every case.
    let zero_outputs = |frame: &mut TrapFrame| {
        frame.rax = 0;
        frame.rdx = 0;
    };
    match kind {
        Kind::ReadSafe | Kind::RdpmcSafe | Kind::WriteSafe => {
            let target = data.reg();
            if target == reg::RSP {
                return false;
            }
            if kind != Kind::WriteSafe {
                zero_outputs(frame);
            }
            match frame.gpr_mut(target) {
                Some(slot) => *slot = error.to_code(),
                None => return false,
            }
        }
        Kind::Read | Kind::Rdpmc | Kind::Write => {
            let op = match kind {
                Kind::Read => AccessOp::Read,
                Kind::Rdpmc => AccessOp::Rdpmc,
                _ => AccessOp::Write,
            };
            let value = match (op, rax_contract) {
                (AccessOp::Write, true) => frame.rax,
                (AccessOp::Write, false) => {
                    (frame.rdx & 0xffff_ffff) << 32 | (frame.rax & 0xffff_ffff)
                }
                _ => 0,
            };
            let access = UncheckedAccess {
                op,
                msr_or_counter: frame.rcx as u32,
                value,
                site: entry.insn_addr(),
                error,
            };
            if op != AccessOp::Write {
                zero_outputs(frame);
            }
            if let Some(hook) = WARN_HOOK.get()
                && should_warn(&access, entry)
            {
                hook(&access);
            }
        }
        Kind::Rewind | Kind::Guarded => return false,
    }
    frame.rip = entry.fixup_addr() as u64;
    true
}
