//! The PV runtime kit's assembly: the entry point a 64-bit PV kernel starts at
//! ([`pv_entry!`](crate::pv_entry)), and the trap entry for every exception vector, the
//! event upcall and the failsafe callback, which builds a [`TrapFrame`], lets the library
//! fix up MSR faults, calls the kernel's handler for the rest, and returns through the
//! `iret` hypercall.
//!
//! # Xen's bounce frame
//!
//! Xen delivers an exception (or an upcall) to a 64-bit PV kernel on the interrupted
//! stack, as a hardware-like frame (`rip`, `cs`, `rflags`, `rsp`, `ss`, an error code for
//! vectors 8, 10-14 and 17) with `rcx` and `r11` pushed on top. Each entry stub pops those
//! two back, pushes a zero error code where the vector has none and the vector number,
//! and jumps to the common path. The common path saves every register as a [`TrapFrame`]
//! (offsets: [`TrapFrame::OFFSET_RIP`] and its siblings), calls
//! `xenmsr_pv_trap_dispatch` on a 16-byte aligned stack, writes the frame's `rip`, `rsp`
//! and `rflags` back into the bounce frame (a fixup may change all three), restores every
//! register and returns with `HYPERVISOR_iret`. Xen sets the event (upcall) mask from the
//! `rflags.IF` that iret gets (`do_iret()` in Xen's `arch/x86/pv/iret.c`): the frame's
//! `rflags.IF` is the inverse of the mask Xen saved at delivery, so an unchanged frame
//! resumes with the mask the interrupted code had, and a handler that changes IF changes
//! it (see [`Trap::cs`]).
//!
//! # The failsafe frame
//!
//! Xen calls the failsafe callback when it cannot reload the interrupted context's data
//! segment registers on the way back to the guest (`load_segments()` in Xen's
//! `arch/x86/domain.c`, after a switch of vCPUs: a selector whose descriptor is no longer
//! valid, such as an LDT selector after the LDT went away). Xen has then already loaded
//! the null selector into each register that failed (the others hold their selectors),
//! and delivers a frame of eleven words, from the lowest address (the callback's `rsp`):
//!
//! ```text
//! rcx, r11, ds, es, fs, gs, rip, cs, rflags, rsp, ss
//! ```
//!
//! `rcx` and `r11` are the interrupted context's (Xen enters the callback with `sysret`,
//! which overwrites both); `ds`..`gs` are the four selectors Xen tried to load, zero
//! extended; `rip`..`ss` is the hardware-like return frame (`cs` carries the saved event
//! mask in bits 32-39, `rflags.IF` its inverse, as in every bounce frame; the iret
//! restores the mask from `rflags.IF`). There is no
//! error code. The frame ends 16-byte aligned.
//!
//! The kit's failsafe stub (`xenmsr_pv_failsafe`) turns it into the exception layout: it
//! folds the four selectors into one word (`ds | es << 16 | fs << 32 | gs << 48`, the
//! [`DataSelectors::pack`] layout) in the error-code slot, puts [`VECTOR_FAILSAFE`] in the
//! vector slot below it, reloads `rcx` and `r11` from Xen's words and jumps to the common
//! path with `rsp` at the vector (four words above where Xen left it). The handler thus
//! gets the interrupted registers in the [`TrapFrame`] (`rcx`/`r11` included), `cs` in
//! [`Trap::cs`], and the selectors from [`Trap::failsafe_selectors`]; the return is the
//! same `iret` hypercall with the frame's `rip`, `rsp` and `rflags`, to the interrupted
//! code. The `iret` does not touch `ds`, `es`, `fs` or `gs`: whatever the handler loaded
//! into them (for example the null selector, or a valid one with
//! [`DataSelectors::load`]) is what the interrupted code resumes with. A handler that
//! does nothing resumes it with Xen's nulls in place of the selectors that failed.
//!
//! Stub register contract: on entry every register but `rcx` and `r11` (which the stub
//! uses as scratch before reloading them from the frame) holds the interrupted value, and
//! events are masked when the callback was registered with `CALLBACKF_mask_events`
//! (`install_callbacks` does; a secondary vCPU started with `VCPUOP_initialise` needs
//! `VGCF_failsafe_disables_events` in its context's flags); the arithmetic flags are
//! clobbered (the interrupted ones are in the frame's `rflags`); nothing is written below
//! Xen's frame until the common path, which starts with every register as interrupted.
//!
//! The assembly exists only where there is a Xen hypercall page (`target_os = "none"`);
//! [`Trap`], [`TrapHandler`], [`DataSelectors`] and the constants are everywhere. The
//! host tests assemble the same stub and common-path text around a fake stack.

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::fixup::TrapFrame;

/// Exception vectors the trap table covers: 0-19 (every architectural exception up to
/// `#XM`).
pub const VECTORS: usize = 20;
/// The pseudo-vector the event-upcall entry reports.
pub const VECTOR_UPCALL: u8 = 32;
/// The pseudo-vector the failsafe-callback entry reports (Xen could not return to the
/// guest, e.g. a bad segment in `iret`).
pub const VECTOR_FAILSAFE: u8 = 33;

/// Whether vector `v` pushes an error code (8, 10-14, 17).
pub const fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17)
}

impl TrapFrame {
    /// Byte offset of `rax` (the first field) in the frame the entry builds.
    pub const OFFSET_RAX: usize = core::mem::offset_of!(TrapFrame, rax);
    /// Byte offset of `rip`.
    pub const OFFSET_RIP: usize = core::mem::offset_of!(TrapFrame, rip);
    /// Byte offset of `rsp`.
    pub const OFFSET_RSP: usize = core::mem::offset_of!(TrapFrame, rsp);
    /// Byte offset of `rflags`.
    pub const OFFSET_RFLAGS: usize = core::mem::offset_of!(TrapFrame, rflags);
    /// Size of the frame (a multiple of 16, so the bounce frame above it stays aligned).
    pub const SIZE: usize = core::mem::size_of::<TrapFrame>();
}

// The entry assembly writes the 15 general registers in this order at 8-byte steps from
// OFFSET_RAX, then rip, rsp and rflags: the layout must not change under it.
const _: () = {
    use core::mem::offset_of;
    assert!(TrapFrame::OFFSET_RAX == 0);
    assert!(offset_of!(TrapFrame, rbx) == 8);
    assert!(offset_of!(TrapFrame, rcx) == 16);
    assert!(offset_of!(TrapFrame, rdx) == 24);
    assert!(offset_of!(TrapFrame, rsi) == 32);
    assert!(offset_of!(TrapFrame, rdi) == 40);
    assert!(offset_of!(TrapFrame, rbp) == 48);
    assert!(offset_of!(TrapFrame, r8) == 56);
    assert!(offset_of!(TrapFrame, r15) == 112);
    assert!(TrapFrame::OFFSET_RIP == 120);
    assert!(TrapFrame::OFFSET_RSP == 128);
    assert!(TrapFrame::OFFSET_RFLAGS == 136);
    assert!(TrapFrame::SIZE == 144);
    assert!(TrapFrame::SIZE.is_multiple_of(16));
};

/// What the entry knows about the trap besides the registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trap {
    /// The vector (0-19), [`VECTOR_UPCALL`] or [`VECTOR_FAILSAFE`].
    pub vector: u8,
    /// The error code (0 for vectors without one). For [`VECTOR_FAILSAFE`] the four data
    /// selectors Xen failed to reload, packed as [`DataSelectors::pack`] does (read them
    /// with [`Trap::failsafe_selectors`]).
    pub error_code: u64,
    /// The interrupted `cs`: bits 0-15 the selector, with RPL 0 when the trap interrupted
    /// the kernel (Xen clears it to say so) and 3 when it interrupted user space. Bits
    /// 32-39 hold the event (upcall) mask Xen saved when it delivered the trap
    /// (`saved_upcall_mask`; both written by `create_bounce_frame` in Xen's
    /// `arch/x86/x86_64/entry.S`), and the frame's `rflags.IF` is its inverse.
    ///
    /// Bits 32-39 are for information only: `HYPERVISOR_iret` ignores them and sets the
    /// mask from the `rflags.IF` it gets (`do_iret()` in Xen's `arch/x86/pv/iret.c`), which
    /// the kit takes from [`TrapFrame::rflags`]. A handler that leaves `rflags` alone
    /// therefore resumes with the saved mask; one that sets or clears IF resumes with
    /// events unmasked or masked.
    pub cs: u64,
}

impl Trap {
    /// For a failsafe callback ([`VECTOR_FAILSAFE`]), the data selectors of the
    /// interrupted context that Xen tried to reload; at least one of them failed, and Xen
    /// loaded the null selector into the registers that did (compare with
    /// [`DataSelectors::current`] to see which). `None` for every other vector.
    pub const fn failsafe_selectors(&self) -> Option<DataSelectors> {
        if self.vector == VECTOR_FAILSAFE {
            Some(DataSelectors::unpack(self.error_code))
        } else {
            None
        }
    }
}

/// The four data-segment selectors, `ds`, `es`, `fs` and `gs`: what a failsafe callback
/// reports ([`Trap::failsafe_selectors`]) and what its handler may load before the
/// interrupted code resumes ([`DataSelectors::load`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataSelectors {
    /// `ds`.
    pub ds: u16,
    /// `es`.
    pub es: u16,
    /// `fs`.
    pub fs: u16,
    /// `gs`.
    pub gs: u16,
}

impl DataSelectors {
    /// The null selector in all four.
    pub const NULL: Self = Self {
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
    };

    /// The word the failsafe entry passes as [`Trap::error_code`]: `ds` in bits 0-15,
    /// `es` in 16-31, `fs` in 32-47, `gs` in 48-63 (the order of Xen's failsafe frame,
    /// from the lowest address).
    pub const fn pack(self) -> u64 {
        self.ds as u64 | (self.es as u64) << 16 | (self.fs as u64) << 32 | (self.gs as u64) << 48
    }

    /// The inverse of [`DataSelectors::pack`].
    pub const fn unpack(word: u64) -> Self {
        Self {
            ds: word as u16,
            es: (word >> 16) as u16,
            fs: (word >> 32) as u16,
            gs: (word >> 48) as u16,
        }
    }

    /// The selectors loaded in the four registers now.
    pub fn current() -> Self {
        let (ds, es, fs, gs): (u32, u32, u32, u32);
        // SAFETY: reading a segment register has no side effect and is allowed at any
        // privilege level.
        unsafe {
            core::arch::asm!(
                "mov %ds, {ds:e}",
                "mov %es, {es:e}",
                "mov %fs, {fs:e}",
                "mov %gs, {gs:e}",
                ds = out(reg) ds,
                es = out(reg) es,
                fs = out(reg) fs,
                gs = out(reg) gs,
                options(att_syntax, nomem, nostack, preserves_flags)
            );
        }
        Self {
            ds: ds as u16,
            es: es as u16,
            fs: fs as u16,
            gs: gs as u16,
        }
    }

    /// Loads the four selectors into `ds`, `es`, `fs` and `gs` (in that order).
    ///
    /// # Safety
    ///
    /// Each selector must be null or name a present data segment the current privilege
    /// level may load (otherwise the load faults, with `#GP` or `#NP`, on the first bad
    /// one). Loading `fs` or `gs` replaces the FS or GS base (with the descriptor's base;
    /// for a null selector with zero, except on AMD CPUs before Zen 2, which keep the old
    /// base), so nothing may rely on either base unless the caller restores it afterwards.
    pub unsafe fn load(self) {
        // SAFETY: the caller guarantees the selectors are loadable and that no one relies
        // on the FS/GS bases the loads replace.
        unsafe {
            core::arch::asm!(
                "mov {ds:e}, %ds",
                "mov {es:e}, %es",
                "mov {fs:e}, %fs",
                "mov {gs:e}, %gs",
                ds = in(reg) u32::from(self.ds),
                es = in(reg) u32::from(self.es),
                fs = in(reg) u32::from(self.fs),
                gs = in(reg) u32::from(self.gs),
                options(att_syntax, nostack, preserves_flags)
            );
        }
    }
}

/// The kernel's handler for every trap: called with the interrupted registers, which it
/// may change (they are written back before the return). Registered with
/// [`set_trap_handler`], whose registration also says whether the library's fixup
/// ([`crate::fixup::fixup_exception`]) has already had its turn.
pub type TrapHandler = fn(&mut TrapFrame, &Trap);

/// A kernel's trap handler and whether the library's fixup runs before it: what
/// [`set_trap_handler`] publishes. One `'static` value holds both, and the kit reads it
/// through one pointer, so a trap always sees a handler with its own ordering flag, never
/// the handler of one registration with the flag of another.
#[derive(Clone, Copy, Debug)]
pub struct TrapRegistration {
    handler: TrapHandler,
    library_fixup_first: bool,
}

impl TrapRegistration {
    /// `handler`, called for every trap the library's fixup did not handle
    /// (`library_fixup_first`: a `#GP` or `#UD` that the library's extable covers is fixed
    /// up before the handler sees anything), or for every trap (without it: the handler
    /// calls [`crate::fixup::fixup_exception`] itself, for a kernel that counts or logs
    /// every exception).
    pub const fn new(handler: TrapHandler, library_fixup_first: bool) -> Self {
        TrapRegistration {
            handler,
            library_fixup_first,
        }
    }

    /// The handler.
    pub const fn handler(&self) -> TrapHandler {
        self.handler
    }

    /// Whether the library's fixup runs before the handler.
    pub const fn library_fixup_first(&self) -> bool {
        self.library_fixup_first
    }
}

/// The registration the kit's dispatcher uses (null: no handler, library fixup first).
static REGISTRATION: AtomicPtr<TrapRegistration> = AtomicPtr::new(core::ptr::null_mut());

/// Registers the kernel's trap handler with the kit's trap entry (the last call wins),
/// both its handler and whether the library's fixup runs first ([`TrapRegistration`]),
/// as one value: a trap that races the registration sees either the previous registration
/// or this one, whole.
///
/// **Nested NMIs.** When Xen delivers an NMI to a PV vCPU it masks further NMIs and
/// remembers the mask it had (`process_nmi` in Xen's `arch/x86/x86_64/entry.S`), and
/// every `HYPERVISOR_iret` puts that earlier mask back (`async_exception_cleanup()`,
/// called by `do_iret()` in `arch/x86/pv/iret.c`): the hypercall cannot tell the iret
/// that ends the NMI handler from one that ends a trap taken inside it. So a trap the kit
/// returns from *inside* an NMI handler (a `#GP` the library fixes up, such as a
/// `rdmsr_safe` of an MSR Xen refuses, or a page fault the kernel resolves) reopens NMIs
/// before the handler ends, and another NMI may arrive on top of it, on the same stack (a
/// PV kernel has no IST). An NMI handler that can take a trap must tolerate that: keep a
/// per-vCPU latch, let a nested NMI that finds it set only record that it happened and
/// return, and have the outer handler repeat its work for the recorded NMI before it
/// returns (as Linux's NMI entry does on bare metal, where an `iret` from an exception
/// in the NMI handler reopens NMIs in the same way). The same holds for a virtual `#MC`.
///
/// # Safety
///
/// The kit writes the frame the handler leaves (every general register, `rip`, `rsp`
/// and `rflags`) back into the interrupted context and resumes it there with
/// `HYPERVISOR_iret`, whatever it holds. For every trap it returns from, the handler must
/// leave a frame the interrupted code can soundly continue from: the frame as it came,
/// the frame as [`crate::fixup::fixup_exception`] changed it, or a context the kernel
/// made to be resumed (its own exception-table landing point with the registers that
/// code expects, another task's saved context on that task's stack). Its `rflags.IF`
/// decides whether events are masked after the return ([`Trap::cs`]).
///
/// # Examples
///
/// ```
/// use xenmsr_asm::fixup::TrapFrame;
/// use xenmsr_asm::pv::{Trap, TrapRegistration, set_trap_handler};
///
/// fn on_trap(frame: &mut TrapFrame, trap: &Trap) {
///     // Only looks: the frame resumes as it came.
///     let _ = (frame.rip, trap.vector);
/// }
///
/// static TRAPS: TrapRegistration = TrapRegistration::new(on_trap, true);
/// // SAFETY: `on_trap` leaves every frame as it came.
/// unsafe { set_trap_handler(&TRAPS) };
/// ```
///
/// Safe code cannot register a handler, since the frame it leaves is where execution
/// resumes:
///
/// ```compile_fail,E0133
/// use xenmsr_asm::fixup::TrapFrame;
/// use xenmsr_asm::pv::{Trap, TrapRegistration, set_trap_handler};
///
/// fn redirect(frame: &mut TrapFrame, _: &Trap) {
///     frame.rip = 0xdead_beef;
/// }
/// static TRAPS: TrapRegistration = TrapRegistration::new(redirect, false);
/// set_trap_handler(&TRAPS);
/// ```
///
/// nor run the kit's dispatcher (and with it the library's fixup) on a frame of its own
/// making:
///
/// ```compile_fail,E0603
/// use xenmsr_asm::fixup::TrapFrame;
/// use xenmsr_asm::pv::Trap;
///
/// let mut frame = TrapFrame { rip: 0x1000, rsp: 0x2000, ..TrapFrame::default() };
/// let trap = Trap { vector: 13, error_code: 0, cs: 0xe030 };
/// xenmsr_asm::pv::dispatch_with_library_fixup(&mut frame, &trap);
/// ```
pub unsafe fn set_trap_handler(registration: &'static TrapRegistration) {
    REGISTRATION.store(
        core::ptr::from_ref(registration).cast_mut(),
        Ordering::Release,
    );
}

/// The registration [`set_trap_handler`] stored last, if any.
fn registration() -> Option<&'static TrapRegistration> {
    let registration = REGISTRATION.load(Ordering::Acquire);
    // SAFETY: only `set_trap_handler` stores here, a pointer from a
    // `&'static TrapRegistration` (which has no interior mutability); or it is null.
    unsafe { registration.cast_const().as_ref() }
}

/// The kit's event dispatcher (`xenmsr::events`), as an address (0: none): when set, it
/// takes every upcall, and the kernel's trap handler sees none.
static UPCALL_DISPATCHER: AtomicUsize = AtomicUsize::new(0);

/// Sends every event upcall to `dispatcher` instead of the kernel's trap handler (what
/// `xenmsr::events::init` does). Not part of the API.
///
/// # Safety
///
/// `dispatcher` runs at any instruction where events are unmasked, with events masked:
/// it must process the vCPU's pending events and return (it may not rely on anything
/// the interrupted code was in the middle of).
#[doc(hidden)]
pub unsafe fn set_upcall_dispatcher(dispatcher: fn()) {
    UPCALL_DISPATCHER.store(dispatcher as *const () as usize, Ordering::Release);
}

fn upcall_dispatcher() -> Option<fn()> {
    let d = UPCALL_DISPATCHER.load(Ordering::Acquire);
    // SAFETY: only `set_upcall_dispatcher` stores a non-zero value, a `fn()`; function
    // pointers round-trip through `usize`.
    (d != 0).then(|| unsafe { core::mem::transmute::<usize, fn()>(d) })
}

/// What the common entry path calls: the library's fixup for `#GP`/`#UD` at its MSR
/// sites and for every resumable fault ([`crate::fixup::is_resumable_fault`]) at a
/// guarded instruction (unless the handler asked to see everything), then the kernel's
/// handler; without a handler, an unfixed trap other than an upcall stops the domain.
///
/// Private: it runs the library's fixup, which trusts the frame to be a real exception's
/// (the kit's entry is the only caller).
#[cfg_attr(not(any(test, target_os = "none")), allow(dead_code))]
fn dispatch_with_library_fixup(frame: &mut TrapFrame, trap: &Trap) {
    // One load: the handler and its ordering flag come from the same registration.
    let registration = registration();
    let library_first = registration.is_none_or(TrapRegistration::library_fixup_first);
    // Every resumable fault: #GP/#UD for the library's MSR entries, any of them for the
    // kernel's guarded instructions (`guarded_asm!`); the fixup refuses the rest itself.
    if library_first
        && crate::fixup::is_resumable_fault(trap.vector)
        // SAFETY: `frame` is the interrupted context of this very exception, saved by the
        // entry with the interrupted `rsp`, and written back before the `iret`.
        && unsafe { crate::fixup::fixup_exception(frame, trap.vector) }
    {
        return;
    }
    if trap.vector == VECTOR_UPCALL
        && let Some(dispatch_events) = upcall_dispatcher()
    {
        dispatch_events();
        return;
    }
    match registration.map(TrapRegistration::handler) {
        Some(h) => h(frame, trap),
        None if trap.vector == VECTOR_UPCALL => {}
        None => unhandled(frame, trap),
    }
}

#[cfg(target_os = "none")]
fn unhandled(frame: &TrapFrame, trap: &Trap) -> ! {
    use core::fmt::Write;
    let page = xenmsr_hypercall::HypercallPage::xen();
    let mut out = xenmsr_hypercall::pv::PvConsole::Hypervisor(page);
    if let Some(sel) = trap.failsafe_selectors() {
        let _ = writeln!(
            out,
            "xenmsr: failsafe callback (Xen could not reload some of ds {:#x} es {:#x} fs {:#x} gs {:#x}) at rip {:#x}, rsp {:#x}; no trap handler registered",
            sel.ds, sel.es, sel.fs, sel.gs, frame.rip, frame.rsp
        );
    } else {
        let _ = writeln!(
            out,
            "xenmsr: unhandled trap {} (error code {:#x}) at rip {:#x}, rsp {:#x}; no trap handler registered",
            trap.vector, trap.error_code, frame.rip, frame.rsp
        );
    }
    loop {
        let _ = page.sched_shutdown(xenmsr_hypercall::abi::ShutdownReason::CRASH);
    }
}

#[cfg(not(target_os = "none"))]
fn unhandled(frame: &TrapFrame, trap: &Trap) -> ! {
    panic!(
        "unhandled trap {} (error code {:#x}) at rip {:#x}",
        trap.vector, trap.error_code, frame.rip
    )
}

/// The common path's Rust side.
#[cfg(target_os = "none")]
extern "C" fn xenmsr_pv_trap_dispatch(
    frame: &mut TrapFrame,
    vector: u64,
    error_code: u64,
    cs: u64,
) {
    let trap = Trap {
        vector: vector as u8,
        error_code,
        cs,
    };
    dispatch_with_library_fixup(frame, &trap);
}

// The entry's assembly text, as macros expanding to string literals, so that the kit's
// entry (`target_os = "none"`) and the host tests (`entry_tests`, around a fake stack)
// assemble the very same instructions.

/// One exception stub's body (everything but its label and the final `jmp` to the common
/// path): pop Xen's `rcx`/`r11`, push a zero error code where the CPU pushes none, push
/// the vector.
#[cfg_attr(not(any(test, target_os = "none")), allow(unused_macros))]
macro_rules! stub_text {
    ($vec:literal, err) => {
        concat!(
            "    pop %rcx\n",
            "    pop %r11\n",
            "    push $",
            stringify!($vec),
            "\n"
        )
    };
    ($vec:literal, none) => {
        concat!(
            "    pop %rcx\n",
            "    pop %r11\n",
            "    push $0\n",
            "    push $",
            stringify!($vec),
            "\n"
        )
    };
}

/// The failsafe stub's body (everything but its label and the final `jmp` to the common
/// path; the module docs give the frame and the register contract). Operand: `vector`
/// (`const`, [`VECTOR_FAILSAFE`]). On entry, from `rsp` up: rcx, r11, ds, es, fs, gs,
/// rip, cs, rflags, rsp, ss; on exit, from `rsp` up: the vector, the packed selectors
/// (in the error-code slot), rip, cs, rflags, rsp, ss, with `rcx` and `r11` reloaded
/// from Xen's words and every other register untouched.
#[cfg_attr(not(any(test, target_os = "none")), allow(unused_macros))]
macro_rules! failsafe_text {
    () => {
        r#"
        movzwl 40(%rsp), %ecx              /* gs */
        shl $16, %rcx
        movzwl 32(%rsp), %r11d             /* fs */
        or %r11, %rcx
        shl $16, %rcx
        movzwl 24(%rsp), %r11d             /* es */
        or %r11, %rcx
        shl $16, %rcx
        movzwl 16(%rsp), %r11d             /* ds */
        or %r11, %rcx                      /* ds | es << 16 | fs << 32 | gs << 48 */
        mov %rcx, 40(%rsp)                 /* the error-code slot, just below rip */
        movq ${vector}, 32(%rsp)           /* the vector slot below it */
        mov 0(%rsp), %rcx                  /* the interrupted rcx and r11 */
        mov 8(%rsp), %r11
        lea 32(%rsp), %rsp                 /* rsp at the vector; Xen's four words above */
"#
    };
}

/// The common path up to the `iret` hypercall (everything but its label and the final
/// `jmp` into the hypercall page). On entry, from `rsp` up: the vector, the error code,
/// then Xen's frame (rip, cs, rflags, rsp, ss), every register as interrupted. The
/// TrapFrame goes below, so Xen's frame starts SIZE + 16 bytes above the new rsp. It
/// calls `{dispatch}(&mut frame, vector, error code, cs)` with the stack 16-byte
/// aligned, writes rip, rsp and rflags back into Xen's frame, restores every register
/// from the TrapFrame and pushes the `iret` flags word (0: not `VGCF_in_syscall`); the
/// hypercall page's `iret` entry then pushes rcx, r11 and rax itself, completing
/// `struct iret_context` above rip/cs/rflags/rsp/ss. Operands: `size`, `rip`, `rsp`,
/// `rflags` (`const`: [`TrapFrame::SIZE`] and the offsets), `dispatch` (`sym`).
#[cfg_attr(not(any(test, target_os = "none")), allow(unused_macros))]
macro_rules! trap_common_text {
    () => {
        r#"
        sub ${size}, %rsp
        mov %rax, 0(%rsp)
        mov %rbx, 8(%rsp)
        mov %rcx, 16(%rsp)
        mov %rdx, 24(%rsp)
        mov %rsi, 32(%rsp)
        mov %rdi, 40(%rsp)
        mov %rbp, 48(%rsp)
        mov %r8, 56(%rsp)
        mov %r9, 64(%rsp)
        mov %r10, 72(%rsp)
        mov %r11, 80(%rsp)
        mov %r12, 88(%rsp)
        mov %r13, 96(%rsp)
        mov %r14, 104(%rsp)
        mov %r15, 112(%rsp)
        mov {size}+16(%rsp), %rax          /* Xen's rip */
        mov %rax, {rip}(%rsp)
        mov {size}+40(%rsp), %rax          /* Xen's rsp */
        mov %rax, {rsp}(%rsp)
        mov {size}+32(%rsp), %rax          /* Xen's rflags */
        mov %rax, {rflags}(%rsp)

        mov %rsp, %rdi                     /* &mut TrapFrame */
        mov {size}(%rsp), %rsi             /* vector */
        mov {size}+8(%rsp), %rdx           /* error code */
        mov {size}+24(%rsp), %rcx          /* cs */
        mov %rsp, %rbx                     /* callee-saved: the frame */
        and $-16, %rsp
        cld
        call {dispatch}
        mov %rbx, %rsp

        mov {rip}(%rsp), %rax
        mov %rax, {size}+16(%rsp)
        mov {rsp}(%rsp), %rax
        mov %rax, {size}+40(%rsp)
        mov {rflags}(%rsp), %rax
        mov %rax, {size}+32(%rsp)
        mov 0(%rsp), %rax
        mov 8(%rsp), %rbx
        mov 16(%rsp), %rcx
        mov 24(%rsp), %rdx
        mov 32(%rsp), %rsi
        mov 40(%rsp), %rdi
        mov 48(%rsp), %rbp
        mov 56(%rsp), %r8
        mov 64(%rsp), %r9
        mov 72(%rsp), %r10
        mov 80(%rsp), %r11
        mov 88(%rsp), %r12
        mov 96(%rsp), %r13
        mov 104(%rsp), %r14
        mov 112(%rsp), %r15
        add ${size}+16, %rsp               /* the TrapFrame, the vector, the error code */
        push $0                            /* iret flags: not VGCF_in_syscall */
"#
    };
}

#[cfg(target_os = "none")]
mod entry {
    use core::arch::global_asm;

    use xenmsr_hypercall::Errno;
    use xenmsr_hypercall::abi::{CALLBACKF_MASK_EVENTS, CallbackType, TrapInfo};

    use super::{TrapFrame, VECTOR_FAILSAFE, VECTOR_UPCALL, VECTORS, xenmsr_pv_trap_dispatch};

    /// One entry stub per vector (and the event upcall): [`stub_text!`], then the common
    /// path.
    macro_rules! stubs {
        ($($vec:literal $name:ident $ec:ident;)*) => {
            global_asm!(
                $(
                    concat!(
                        ".pushsection .text.xenmsr_pv_traps, \"ax\", @progbits\n",
                        ".p2align 4\n",
                        ".globl ", stringify!($name), "\n",
                        ".type ", stringify!($name), ",@function\n",
                        stringify!($name), ":\n",
                        stub_text!($vec, $ec),
                        "    jmp xenmsr_pv_trap_common\n",
                        ".popsection\n",
                    ),
                )*
                options(att_syntax)
            );
            unsafe extern "C" {
                $(fn $name();)*
            }
        };
    }

    stubs! {
        0 xenmsr_pv_trap_0 none;
        1 xenmsr_pv_trap_1 none;
        2 xenmsr_pv_trap_2 none;
        3 xenmsr_pv_trap_3 none;
        4 xenmsr_pv_trap_4 none;
        5 xenmsr_pv_trap_5 none;
        6 xenmsr_pv_trap_6 none;
        7 xenmsr_pv_trap_7 none;
        8 xenmsr_pv_trap_8 err;
        9 xenmsr_pv_trap_9 none;
        10 xenmsr_pv_trap_10 err;
        11 xenmsr_pv_trap_11 err;
        12 xenmsr_pv_trap_12 err;
        13 xenmsr_pv_trap_13 err;
        14 xenmsr_pv_trap_14 err;
        15 xenmsr_pv_trap_15 none;
        16 xenmsr_pv_trap_16 none;
        17 xenmsr_pv_trap_17 err;
        18 xenmsr_pv_trap_18 none;
        19 xenmsr_pv_trap_19 none;
        32 xenmsr_pv_upcall none;
    }

    // The failsafe callback: Xen's eleven-word frame (the module docs), folded into the
    // exception layout by `failsafe_text!`, then the common path.
    global_asm!(
        concat!(
            ".pushsection .text.xenmsr_pv_traps, \"ax\", @progbits\n",
            ".p2align 4\n",
            ".globl xenmsr_pv_failsafe\n",
            ".type xenmsr_pv_failsafe,@function\n",
            "xenmsr_pv_failsafe:\n",
            failsafe_text!(),
            "    jmp xenmsr_pv_trap_common\n",
            ".popsection\n",
        ),
        vector = const VECTOR_FAILSAFE,
        options(att_syntax)
    );
    unsafe extern "C" {
        fn xenmsr_pv_failsafe();
    }

    /// The entry stub of each exception vector.
    static STUBS: [unsafe extern "C" fn(); VECTORS] = [
        xenmsr_pv_trap_0,
        xenmsr_pv_trap_1,
        xenmsr_pv_trap_2,
        xenmsr_pv_trap_3,
        xenmsr_pv_trap_4,
        xenmsr_pv_trap_5,
        xenmsr_pv_trap_6,
        xenmsr_pv_trap_7,
        xenmsr_pv_trap_8,
        xenmsr_pv_trap_9,
        xenmsr_pv_trap_10,
        xenmsr_pv_trap_11,
        xenmsr_pv_trap_12,
        xenmsr_pv_trap_13,
        xenmsr_pv_trap_14,
        xenmsr_pv_trap_15,
        xenmsr_pv_trap_16,
        xenmsr_pv_trap_17,
        xenmsr_pv_trap_18,
        xenmsr_pv_trap_19,
    ];

    const _: () = assert!(VECTOR_UPCALL == 32);

    // The common path ([`trap_common_text!`]), then the `iret` hypercall.
    global_asm!(
        concat!(
            ".pushsection .text.xenmsr_pv_traps, \"ax\", @progbits\n",
            ".p2align 4\n",
            ".globl xenmsr_pv_trap_common\n",
            "xenmsr_pv_trap_common:\n",
            trap_common_text!(),
            "    jmp xenmsr_hypercall_page + {iret} * 32\n",
            ".popsection\n",
        ),
        size = const TrapFrame::SIZE,
        rip = const TrapFrame::OFFSET_RIP,
        rsp = const TrapFrame::OFFSET_RSP,
        rflags = const TrapFrame::OFFSET_RFLAGS,
        dispatch = sym xenmsr_pv_trap_dispatch,
        iret = const xenmsr_hypercall::nr::IRET,
        options(att_syntax)
    );

    /// The trap table the kit's entry stubs serve: a handler for every vector 0-19 (DPL 3
    /// for `#BP` and `#OF`, so `int3`/`into` work; events masked on entry, like an
    /// interrupt gate), then the terminator.
    pub fn trap_table() -> [TrapInfo; VECTORS + 1] {
        let mut table = [TrapInfo::TERMINATOR; VECTORS + 1];
        for (vector, stub) in STUBS.iter().enumerate() {
            let dpl = if vector == 3 || vector == 4 { 3 } else { 0 };
            table[vector] =
                TrapInfo::new(vector as u8, dpl, true, *stub as *const () as usize as u64);
        }
        table
    }

    /// Registers [`trap_table`] with Xen for the calling vCPU (each vCPU has its own; a
    /// secondary vCPU can also get it in its `VCPUOP_initialise` context).
    pub fn install_trap_table() -> Result<(), Errno> {
        let table = trap_table();
        // SAFETY: the table ends with the terminator; every other address is one of the
        // kit's stubs, which follow Xen's bounce-frame contract and return with the iret
        // hypercall, and are part of the image for its whole life.
        unsafe { xenmsr_hypercall::HypercallPage::xen().set_trap_table(&table) }
    }

    /// The entry points of the event callback and the failsafe callback (for a secondary
    /// vCPU's `VCPUOP_initialise` context; give that context
    /// `VcpuGuestContext::VGCF_FAILSAFE_DISABLES_EVENTS` in its flags too, so that the
    /// failsafe handler runs with events masked as [`install_callbacks`] arranges).
    pub fn callback_entries() -> (u64, u64) {
        (
            xenmsr_pv_upcall as *const () as usize as u64,
            xenmsr_pv_failsafe as *const () as usize as u64,
        )
    }

    /// Registers the kit's event-upcall and failsafe entries for the calling vCPU (the
    /// handler sees upcalls as [`VECTOR_UPCALL`], the failsafe as [`VECTOR_FAILSAFE`]),
    /// both entered with events masked (Xen always masks them for the event callback; the
    /// failsafe is registered with `CALLBACKF_mask_events`).
    pub fn install_callbacks() -> Result<(), Errno> {
        let (event, failsafe) = callback_entries();
        let page = xenmsr_hypercall::HypercallPage::xen();
        // SAFETY: the upcall stub follows the event callback's bounce-frame contract (rcx,
        // r11 on top, no error code) and returns with the iret hypercall.
        unsafe { page.callback_register(CallbackType::EVENT, event, 0) }?;
        // SAFETY: the failsafe stub follows the failsafe frame's contract (rcx, r11, ds,
        // es, fs, gs on top of the return frame: the module docs) and returns with the
        // iret hypercall.
        unsafe { page.callback_register(CallbackType::FAILSAFE, failsafe, CALLBACKF_MASK_EVENTS) }
    }
}

#[cfg(target_os = "none")]
pub use entry::{callback_entries, install_callbacks, install_trap_table, trap_table};

/// Defines the kernel's entry point, `xenmsr_pv_start` (name it in the linker script's
/// `ENTRY`, as `xenmsr-pv.ld` does), which switches to a stack of its own and calls
/// `main(start_info)` with Xen's `start_info` copied into a static.
///
/// ```ignore
/// xenmsr::pv_entry!(kernel_main);                    // the kit's 64 KiB vCPU 0 stack
/// xenmsr::pv_entry!(kernel_main, stack_size = 0x4000);
/// fn kernel_main(start_info: &'static xenmsr::hypercall::abi::StartInfo) -> ! { ... }
/// ```
///
/// Xen enters a PV kernel in its ring (3 for 64-bit PV) with `rsi` = the virtual address
/// of `start_info`, `rsp` on a small boot stack, events masked; the entry keeps events
/// masked.
#[macro_export]
macro_rules! pv_entry {
    ($main:path) => {
        // The boot vCPU's stack is a kit `VcpuStack`, registered as vCPU 0 before `main`
        // runs, so the kit (and the library's default vCPU-id hook) can tell vCPU 0 from
        // the secondaries `xenmsr::smp::start_vcpu` starts.
        #[unsafe(export_name = "xenmsr_pv_boot_stack")]
        static XENMSR_BOOT_STACK: $crate::vcpu::VcpuStack = $crate::vcpu::VcpuStack::new();
        #[unsafe(no_mangle)]
        unsafe extern "C" fn xenmsr_pv_rust_entry(
            start_info: *const $crate::__hypercall::abi::StartInfo,
        ) -> ! {
            // SAFETY: the boot vCPU (0) runs on this stack from the entry on, and nothing
            // else ever does (the static is the macro's own). Nothing else runs yet, so
            // the registration cannot fail.
            let _ = unsafe { $crate::vcpu::register(0, &XENMSR_BOOT_STACK) };
            // SAFETY: Xen passed `start_info` in rsi (moved to rdi by the entry): a mapped
            // `struct start_info` that nothing changes after entry.
            let info = unsafe { $crate::pv::keep_start_info(start_info) };
            $main(info)
        }
        $crate::pv_entry!(@asm "xenmsr_pv_boot_stack", $crate::vcpu::VcpuStack::SIZE);
    };
    ($main:path, stack_size = $size:expr) => {
        $crate::pv_entry!(@entry $main, "xenmsr_pv_stack", $size);
        ::core::arch::global_asm!(
            ".pushsection .bss.xenmsr_pv_stack, \"aw\", @nobits",
            ".p2align 12",
            "xenmsr_pv_stack:",
            ".skip {size}",
            ".popsection",
            size = const $size,
            options(att_syntax)
        );
    };
    // A kernel that lays out its stacks itself (one per vCPU, say): the boot vCPU's stack
    // is the `$size` bytes from the global symbol `$stack` on.
    ($main:path, stack = $stack:literal, stack_size = $size:expr) => {
        $crate::pv_entry!(@entry $main, $stack, $size);
    };
    (@entry $main:path, $stack:literal, $size:expr) => {
        #[unsafe(no_mangle)]
        unsafe extern "C" fn xenmsr_pv_rust_entry(
            start_info: *const $crate::__hypercall::abi::StartInfo,
        ) -> ! {
            // SAFETY: Xen passed `start_info` in rsi (moved to rdi by the entry): a mapped
            // `struct start_info` that nothing changes after entry.
            let info = unsafe { $crate::pv::keep_start_info(start_info) };
            $main(info)
        }
        $crate::pv_entry!(@asm $stack, $size);
    };
    // The entry proper: the stack is the `$size` bytes from the symbol `$stack` on.
    (@asm $stack:literal, $size:expr) => {
        ::core::arch::global_asm!(
            ".pushsection .text.xenmsr_pv_entry, \"ax\", @progbits",
            ".globl xenmsr_pv_start",
            ".type xenmsr_pv_start, @function",
            "xenmsr_pv_start:",
            "cld",
            "mov %rsi, %rdi",
            concat!("lea ", $stack, " + {size}(%rip), %rsp"),
            "and $-16, %rsp",
            "xor %ebp, %ebp",
            "call {entry}",
            "ud2",
            ".size xenmsr_pv_start, . - xenmsr_pv_start",
            ".popsection",
            size = const $size,
            entry = sym xenmsr_pv_rust_entry,
            options(att_syntax)
        );
    };
}

/// Where [`keep_start_info`] copies `start_info`.
static START_INFO: spin::Once<xenmsr_hypercall::abi::StartInfo> = spin::Once::new();
/// The `start_info` page Xen passed at entry, kept for a suspend (the toolstack rewrites
/// that page, not the copy, for the new domain).
static START_INFO_PAGE: core::sync::atomic::AtomicPtr<xenmsr_hypercall::abi::StartInfo> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Copies Xen's `start_info` into a static (once) and returns the copy; the entry point of
/// [`pv_entry!`](crate::pv_entry) calls it.
///
/// # Safety
///
/// `start_info` must be the pointer Xen passed at entry (a mapped `struct start_info`).
pub unsafe fn keep_start_info(
    start_info: *const xenmsr_hypercall::abi::StartInfo,
) -> &'static xenmsr_hypercall::abi::StartInfo {
    START_INFO_PAGE.store(start_info.cast_mut(), core::sync::atomic::Ordering::Release);
    // SAFETY: the caller guarantees a mapped `start_info`; it is plain data Xen does not
    // change while the domain runs, read unaligned-safe into the static.
    START_INFO.call_once(|| unsafe { start_info.read_unaligned() })
}

/// The `start_info` page itself (not the copy), where Xen put it at entry, if the kit's
/// entry ran. A suspend passes its machine frame to Xen, and after a restore or a
/// migration the new domain's shared-info address, event channels and ring frames are
/// there (the copy keeps the boot values).
pub fn start_info_page() -> Option<core::ptr::NonNull<xenmsr_hypercall::abi::StartInfo>> {
    core::ptr::NonNull::new(START_INFO_PAGE.load(core::sync::atomic::Ordering::Acquire))
}

/// The `start_info` copy [`keep_start_info`] made, if the kit's entry ran.
pub fn start_info() -> Option<&'static xenmsr_hypercall::abi::StartInfo> {
    START_INFO.get()
}

/// The handler registration with the kit's real dispatcher and the library's real fixup,
/// on the host: whatever registration a trap sees, it sees that registration's handler
/// with that registration's ordering flag, even while another thread re-registers.
#[cfg(all(test, not(target_os = "none")))]
mod registration_tests {
    use core::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Barrier;
    use std::vec::Vec;

    use super::{Trap, TrapFrame, TrapRegistration, dispatch_with_library_fixup, set_trap_handler};
    use crate::extable::{Data, Kind};

    /// The address of an instruction this image's extable covers with a read-safe entry,
    /// and its fixup. The instruction never runs: a `#GP` "raised" there is one the
    /// library's fixup handles.
    #[inline(never)]
    fn covered_instruction() -> (u64, u64) {
        let (insn, fixup): (u64, u64);
        // SAFETY: computes two addresses; the jump skips the covered `ud2`, and the entry
        // (insn, fixup, read-safe with the error in rsi) describes it truthfully.
        unsafe {
            core::arch::asm!(
                "lea 2f(%rip), {insn}",
                "lea 3f(%rip), {fixup}",
                "jmp 3f",
                "2: ud2",
                "3:",
                ".pushsection xenmsr_extable,\"awR\",@progbits",
                ".balign 4",
                ".long 2b - .",
                ".long 3b - .",
                ".long {data}",
                ".popsection",
                insn = out(reg) insn,
                fixup = out(reg) fixup,
                data = const Data::site(Kind::ReadSafe, 0).bits(),
                options(att_syntax, nomem, nostack)
            );
        }
        (insn, fixup)
    }

    /// Calls of [`after_library`]: it is registered with the library's fixup first, so it
    /// must never see the covered fault.
    static AFTER_LIBRARY_CALLS: AtomicU64 = AtomicU64::new(0);
    /// Calls of [`sees_all`], which sees every trap before the fixup.
    static SEES_ALL_CALLS: AtomicU64 = AtomicU64::new(0);

    fn after_library(_: &mut TrapFrame, _: &Trap) {
        AFTER_LIBRARY_CALLS.fetch_add(1, Ordering::Relaxed);
    }

    fn sees_all(_: &mut TrapFrame, _: &Trap) {
        SEES_ALL_CALLS.fetch_add(1, Ordering::Relaxed);
    }

    static AFTER_LIBRARY: TrapRegistration = TrapRegistration::new(after_library, true);
    static SEES_ALL: TrapRegistration = TrapRegistration::new(sees_all, false);

    /// A `#GP` at the covered instruction: whether the fixup handled it.
    fn dispatch_gp(insn: u64, fixup: u64) -> bool {
        let mut frame = TrapFrame {
            rip: insn,
            rsp: 0x7fff_0000,
            rsi: 0x5a5a,
            ..TrapFrame::default()
        };
        let trap = Trap {
            vector: crate::VECTOR_GP,
            error_code: 0,
            cs: 0xe030,
        };
        dispatch_with_library_fixup(&mut frame, &trap);
        match frame.rip {
            rip if rip == fixup => true,
            rip if rip == insn => false,
            rip => panic!("the frame resumes at {rip:#x}"),
        }
    }

    #[test]
    fn a_trap_sees_one_registration_whole() {
        const THREADS: usize = 2;
        const TRAPS: u64 = 200_000;
        let (insn, fixup) = covered_instruction();

        // SAFETY: both handlers leave every frame as it came; the frames are this test's
        // and never resumed.
        unsafe { set_trap_handler(&AFTER_LIBRARY) };
        assert!(
            dispatch_gp(insn, fixup),
            "library first: the fixup handles it"
        );
        assert_eq!(AFTER_LIBRARY_CALLS.load(Ordering::Relaxed), 0);
        // SAFETY: as above.
        unsafe { set_trap_handler(&SEES_ALL) };
        assert!(
            !dispatch_gp(insn, fixup),
            "handler first: it gets the fault as raised"
        );
        assert_eq!(SEES_ALL_CALLS.load(Ordering::Relaxed), 1);

        // Re-registrations racing traps on other threads.
        let start = Barrier::new(THREADS + 1);
        let unfixed = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..THREADS)
                .map(|_| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        (0..TRAPS).filter(|_| !dispatch_gp(insn, fixup)).count() as u64
                    })
                })
                .collect();
            start.wait();
            while !threads.iter().all(|t| t.is_finished()) {
                for registration in [&AFTER_LIBRARY, &SEES_ALL] {
                    // SAFETY: as above.
                    unsafe { set_trap_handler(registration) };
                }
            }
            threads
                .into_iter()
                .map(|t| t.join().expect("dispatching thread"))
                .sum::<u64>()
        });
        assert_eq!(
            AFTER_LIBRARY_CALLS.load(Ordering::Relaxed),
            0,
            "a handler registered after the library ran before it (another registration's flag)"
        );
        assert_eq!(
            SEES_ALL_CALLS.load(Ordering::Relaxed),
            1 + unfixed,
            "a fault left unfixed without the handler that asked for it"
        );
    }
}

/// The entry's frame handling, run on the host: the failsafe stub, two exception stubs
/// and the common path, assembled from the same text as the kit's entry, are entered on a
/// fake stack holding a Xen-shaped frame with every register set; the dispatcher is a
/// recorder, and the `iret` hypercall is replaced by a routine that captures the
/// registers and the stack the hypercall page's `iret` entry would get.
#[cfg(all(test, not(target_os = "none")))]
mod entry_tests {
    use core::arch::global_asm;
    use core::mem::offset_of;
    use core::sync::atomic::{AtomicPtr, Ordering};
    use std::sync::Mutex;
    use std::vec;
    use std::vec::Vec;

    use super::{DataSelectors, Trap, TrapFrame, VECTOR_FAILSAFE};

    /// What the recorder saw.
    #[derive(Clone, Copy, Debug)]
    struct Seen {
        frame: TrapFrame,
        trap: Trap,
        /// `rsp` inside the recorder, at a point where the compiler keeps it as aligned
        /// as at a call (so 16-byte aligned if the common path called with it aligned).
        rsp: u64,
    }

    /// One run: the harness assembly reads and writes it at the offsets below.
    #[repr(C)]
    struct Harness {
        /// The registers the stub starts with, in `TrapFrame` order (`rax`..`r15`).
        regs_in: [u64; 15],
        /// `rsp` when the stub starts: the lowest word of Xen's frame.
        entry_rsp: u64,
        /// The test's own `rsp`, kept across the run.
        host_rsp: u64,
        /// The registers at the `iret` entry, in `TrapFrame` order.
        regs_out: [u64; 15],
        /// `rsp` at the `iret` entry.
        iret_rsp: u64,
        /// What the recorder saw.
        seen: Option<Seen>,
        /// What the recorder changes in the frame (as a fixup or a handler would).
        edit: fn(&mut TrapFrame),
    }

    /// The run in progress (the assembly and the recorder find it here).
    static CURRENT: AtomicPtr<Harness> = AtomicPtr::new(core::ptr::null_mut());
    /// One run at a time (the test threads share `CURRENT`).
    static RUNS: Mutex<()> = Mutex::new(());

    /// The dispatcher the test copy of the common path calls.
    extern "C" fn record(frame: &mut TrapFrame, vector: u64, error_code: u64, cs: u64) {
        let rsp: u64;
        // SAFETY: reads rsp; without `nostack` the compiler keeps rsp call-aligned here.
        unsafe {
            core::arch::asm!("mov %rsp, {}", out(reg) rsp, options(att_syntax, nomem, preserves_flags));
        }
        let h = CURRENT.load(Ordering::Acquire);
        // SAFETY: `run` stores a pointer to its live, exclusively borrowed harness before
        // it enters the stub and clears it after the stub has returned; nothing else
        // accesses the harness meanwhile.
        let h = unsafe { &mut *h };
        h.seen = Some(Seen {
            frame: *frame,
            trap: Trap {
                vector: vector as u8,
                error_code,
                cs,
            },
            rsp,
        });
        (h.edit)(frame);
    }

    // The stubs under test, from the entry's own text, each followed by the common path's
    // text, which calls `record` and ends in `xenmsr_pv_test_iret` instead of the
    // hypercall page.
    global_asm!(
        concat!(
            ".pushsection .text.xenmsr_pv_test, \"ax\", @progbits\n",
            ".p2align 4\n",
            "xenmsr_pv_test_failsafe:\n",
            failsafe_text!(),
            "    jmp xenmsr_pv_test_common\n",
            ".p2align 4\n",
            "xenmsr_pv_test_gp:\n",
            stub_text!(13, err),
            "    jmp xenmsr_pv_test_common\n",
            ".p2align 4\n",
            "xenmsr_pv_test_ud:\n",
            stub_text!(6, none),
            "    jmp xenmsr_pv_test_common\n",
            ".p2align 4\n",
            "xenmsr_pv_test_common:\n",
            trap_common_text!(),
            "    jmp xenmsr_pv_test_iret\n",
            ".popsection\n",
        ),
        vector = const VECTOR_FAILSAFE,
        size = const TrapFrame::SIZE,
        rip = const TrapFrame::OFFSET_RIP,
        rsp = const TrapFrame::OFFSET_RSP,
        rflags = const TrapFrame::OFFSET_RFLAGS,
        dispatch = sym record,
        options(att_syntax)
    );

    // `xenmsr_pv_test_run(harness: *mut Harness, stub)`, C ABI: saves the callee-saved
    // registers and rsp in the harness, switches to `entry_rsp`, loads every register
    // from `regs_in` and jumps to `stub`. `xenmsr_pv_test_iret`, where the common path
    // would enter the `iret` hypercall: stores every register in `regs_out` and rsp in
    // `iret_rsp` (one word is pushed below rsp first, on the fake stack), then switches
    // back to the test's stack and returns from `xenmsr_pv_test_run`.
    global_asm!(
        r#"
        .pushsection .text.xenmsr_pv_test, "ax", @progbits
        .p2align 4
    xenmsr_pv_test_run:
        push %rbx
        push %rbp
        push %r12
        push %r13
        push %r14
        push %r15
        mov %rsp, {host_rsp}(%rdi)
        mov {entry_rsp}(%rdi), %rsp
        push %rsi                          /* the stub, for the ret below */
        mov {regs_in}+0(%rdi), %rax
        mov {regs_in}+8(%rdi), %rbx
        mov {regs_in}+16(%rdi), %rcx
        mov {regs_in}+24(%rdi), %rdx
        mov {regs_in}+32(%rdi), %rsi
        mov {regs_in}+48(%rdi), %rbp
        mov {regs_in}+56(%rdi), %r8
        mov {regs_in}+64(%rdi), %r9
        mov {regs_in}+72(%rdi), %r10
        mov {regs_in}+80(%rdi), %r11
        mov {regs_in}+88(%rdi), %r12
        mov {regs_in}+96(%rdi), %r13
        mov {regs_in}+104(%rdi), %r14
        mov {regs_in}+112(%rdi), %r15
        mov {regs_in}+40(%rdi), %rdi
        ret                                /* to the stub, with rsp = entry_rsp */

        .p2align 4
    xenmsr_pv_test_iret:
        push %rdi
        mov {current}(%rip), %rdi
        mov %rax, {regs_out}+0(%rdi)
        mov %rbx, {regs_out}+8(%rdi)
        mov %rcx, {regs_out}+16(%rdi)
        mov %rdx, {regs_out}+24(%rdi)
        mov %rsi, {regs_out}+32(%rdi)
        mov %rbp, {regs_out}+48(%rdi)
        mov %r8, {regs_out}+56(%rdi)
        mov %r9, {regs_out}+64(%rdi)
        mov %r10, {regs_out}+72(%rdi)
        mov %r11, {regs_out}+80(%rdi)
        mov %r12, {regs_out}+88(%rdi)
        mov %r13, {regs_out}+96(%rdi)
        mov %r14, {regs_out}+104(%rdi)
        mov %r15, {regs_out}+112(%rdi)
        pop %rax
        mov %rax, {regs_out}+40(%rdi)
        mov %rsp, {iret_rsp}(%rdi)
        mov {host_rsp}(%rdi), %rsp
        pop %r15
        pop %r14
        pop %r13
        pop %r12
        pop %rbp
        pop %rbx
        ret
        .popsection
        "#,
        regs_in = const offset_of!(Harness, regs_in),
        entry_rsp = const offset_of!(Harness, entry_rsp),
        host_rsp = const offset_of!(Harness, host_rsp),
        regs_out = const offset_of!(Harness, regs_out),
        iret_rsp = const offset_of!(Harness, iret_rsp),
        current = sym CURRENT,
        options(att_syntax)
    );

    unsafe extern "C" {
        fn xenmsr_pv_test_run(harness: *mut core::ffi::c_void, stub: usize);
        fn xenmsr_pv_test_failsafe();
        fn xenmsr_pv_test_gp();
        fn xenmsr_pv_test_ud();
    }

    /// The registers the stub starts with: a distinct pattern per register.
    fn regs_in() -> [u64; 15] {
        core::array::from_fn(|i| 0x1111_0000_0000_0000 * (i as u64 + 1) + 0xabc0 + i as u64)
    }

    /// Runs `stub` with Xen's frame `xen` (lowest word first) at `entry_rsp`, which is
    /// 16-byte aligned plus `misalign`; returns the harness and the fake stack, whose
    /// index `base` is `entry_rsp`.
    fn run(
        stub: unsafe extern "C" fn(),
        xen: &[u64],
        misalign: usize,
        edit: fn(&mut TrapFrame),
    ) -> (Harness, Vec<u64>, usize) {
        let _one = RUNS.lock().unwrap_or_else(|e| e.into_inner());
        // 64 KiB of stack for the common path and the recorder, then Xen's frame.
        let mut stack = vec![0u64; 8192 + 64];
        let top = stack.as_ptr() as usize + 8192 * 8;
        let aligned = top & !15;
        let entry = aligned - xen.len() * 8 + misalign;
        let base = (entry - stack.as_ptr() as usize) / 8;
        stack[base..base + xen.len()].copy_from_slice(xen);
        let mut h = Harness {
            regs_in: regs_in(),
            entry_rsp: stack.as_ptr() as u64 + base as u64 * 8,
            host_rsp: 0,
            regs_out: [0; 15],
            iret_rsp: 0,
            seen: None,
            edit,
        };
        CURRENT.store(&raw mut h, Ordering::Release);
        // SAFETY: `entry_rsp` is inside `stack` with 64 KiB free below it for the stub,
        // the common path and the recorder; the stub ends in `xenmsr_pv_test_iret`, which
        // restores this thread's stack and callee-saved registers and returns here.
        unsafe { xenmsr_pv_test_run((&raw mut h).cast(), stub as usize) };
        CURRENT.store(core::ptr::null_mut(), Ordering::Release);
        (h, stack, base)
    }

    /// The frame's fields in `TrapFrame` order (`rax`..`r15`).
    fn gprs(f: &TrapFrame) -> [u64; 15] {
        [
            f.rax, f.rbx, f.rcx, f.rdx, f.rsi, f.rdi, f.rbp, f.r8, f.r9, f.r10, f.r11, f.r12,
            f.r13, f.r14, f.r15,
        ]
    }

    /// What a handler might change: the return point, the stack, the flags, a register
    /// and the two Xen saves in its frame.
    fn edit(f: &mut TrapFrame) {
        // Wrapping: with a wrong frame these fields hold anything, and the recorder (an
        // `extern "C"` function) must not panic.
        f.rip = f.rip.wrapping_add(0x100);
        f.rsp = f.rsp.wrapping_sub(0x40);
        f.rflags ^= 0x1; // CF
        f.rax = 0x5a5a_5a5a;
        f.rcx = 0xc0c0_c0c0;
        f.r11 = 0x1111_1111;
    }

    const RIP: u64 = 0x0000_0000_0040_1234;
    const CS: u64 = 0x1_0000_e030; // FLAT_KERNEL_CS with RPL 0, event mask 1 in bits 32-39
    const RFLAGS: u64 = 0x0000_0000_0000_0246;
    const RSP: u64 = 0x0000_7fff_dead_bee0;
    const SS: u64 = 0xe02b;

    /// Checks a run of a stub whose Xen frame has `rcx`, `r11` at its bottom and the
    /// return frame at word `rip_word`: the recorder saw `vector`, `error_code`, the
    /// interrupted registers with Xen's `rcx`/`r11`, rip/rsp/rflags; and the `iret` got
    /// the edited registers and the flags word, then the edited return frame, just below
    /// where Xen's return frame was.
    fn check(
        run: &(Harness, Vec<u64>, usize),
        xen: &[u64],
        rip_word: usize,
        vector: u8,
        error_code: u64,
    ) {
        let (h, stack, base) = run;
        let seen = h.seen.expect("the recorder ran");
        assert_eq!(
            (
                seen.frame.rip,
                seen.trap.cs,
                seen.frame.rflags,
                seen.frame.rsp
            ),
            (RIP, CS, RFLAGS, RSP),
            "rip, cs, rflags, rsp"
        );
        let mut expected = regs_in();
        expected[2] = xen[0]; // rcx: Xen's word
        expected[10] = xen[1]; // r11: Xen's word
        assert_eq!(gprs(&seen.frame), expected, "the interrupted registers");
        assert_eq!(seen.trap.vector, vector, "vector");
        assert_eq!(seen.trap.error_code, error_code, "error code");
        assert_eq!(
            seen.rsp % 16,
            0,
            "the recorder was called with rsp misaligned"
        );
        let mut edited = seen.frame;
        edit(&mut edited);
        assert_eq!(
            h.regs_out,
            gprs(&edited),
            "the registers the iret entry gets"
        );
        let rip_slot = h.entry_rsp + rip_word as u64 * 8;
        assert_eq!(h.iret_rsp, rip_slot - 8, "rsp at the iret entry");
        let at = base + rip_word - 1;
        assert_eq!(
            stack[at..at + 6],
            [0, RIP + 0x100, CS, RFLAGS ^ 1, RSP - 0x40, SS],
            "the iret words: flags, rip, cs, rflags, rsp, ss"
        );
    }

    #[test]
    fn failsafe_frame_reaches_the_handler_and_the_iret() {
        let sel = DataSelectors {
            ds: 0x0007,
            es: 0x000f,
            fs: 0x0017,
            gs: 0x001f,
        };
        // Xen's failsafe frame, lowest word first (load_segments in arch/x86/domain.c).
        let xen = [
            0xcccc_0000_0000_0001, // rcx
            0x1111_0000_0000_0002, // r11
            u64::from(sel.ds),
            u64::from(sel.es),
            u64::from(sel.fs),
            u64::from(sel.gs),
            RIP,
            CS,
            RFLAGS,
            RSP,
            SS,
        ];
        for misalign in [0, 8] {
            let r = run(xenmsr_pv_test_failsafe, &xen, misalign, edit);
            check(&r, &xen, 6, VECTOR_FAILSAFE, sel.pack());
            let trap = r.0.seen.expect("the recorder ran").trap;
            assert_eq!(trap.failsafe_selectors(), Some(sel));
        }
    }

    #[test]
    fn failsafe_selectors_keep_only_sixteen_bits() {
        // Xen writes each selector as a whole word; only its low 16 bits are a selector.
        let xen = [
            1,
            2,
            0xffff_0000_0000_e02b,
            0x10,
            0x0,
            0xffff,
            RIP,
            CS,
            RFLAGS,
            RSP,
            SS,
        ];
        let r = run(xenmsr_pv_test_failsafe, &xen, 0, |_| {});
        let trap = r.0.seen.expect("the recorder ran").trap;
        assert_eq!(
            trap.failsafe_selectors(),
            Some(DataSelectors {
                ds: 0xe02b,
                es: 0x10,
                fs: 0,
                gs: 0xffff
            })
        );
    }

    #[test]
    fn exception_frames_with_and_without_an_error_code() {
        let gp = [0xcc, 0x11, 0x5a, RIP, CS, RFLAGS, RSP, SS];
        for misalign in [0, 8] {
            let r = run(xenmsr_pv_test_gp, &gp, misalign, edit);
            check(&r, &gp, 3, 13, 0x5a);
            assert_eq!(
                r.0.seen
                    .expect("the recorder ran")
                    .trap
                    .failsafe_selectors(),
                None
            );
        }
        let ud = [0xcc, 0x11, RIP, CS, RFLAGS, RSP, SS];
        for misalign in [0, 8] {
            check(&run(xenmsr_pv_test_ud, &ud, misalign, edit), &ud, 2, 6, 0);
        }
    }

    #[test]
    fn selectors_pack_in_frame_order() {
        let sel = DataSelectors {
            ds: 0x1234,
            es: 0x5678,
            fs: 0x9abc,
            gs: 0xdef0,
        };
        assert_eq!(sel.pack(), 0xdef0_9abc_5678_1234);
        assert_eq!(DataSelectors::unpack(sel.pack()), sel);
        assert_eq!(DataSelectors::NULL.pack(), 0);
        let other = Trap {
            vector: 13,
            error_code: sel.pack(),
            cs: CS,
        };
        assert_eq!(other.failsafe_selectors(), None);
    }

    #[test]
    fn current_reads_the_null_data_selectors_of_a_linux_process() {
        // A 64-bit Linux process runs with null ds and es.
        let now = DataSelectors::current();
        assert_eq!((now.ds, now.es), (0, 0));
    }
}
