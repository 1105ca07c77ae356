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
//! register and returns with `HYPERVISOR_iret`, which also restores the event mask the
//! interrupted code had.
//!
//! The assembly exists only where there is a Xen hypercall page (`target_os = "none"`);
//! [`Trap`], [`TrapHandler`] and the constants are everywhere.

use core::sync::atomic::{AtomicUsize, Ordering};

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
    /// The error code (0 for vectors without one).
    pub error_code: u64,
    /// The interrupted `cs`; bits 32-39 hold the event mask Xen saved (restored by the
    /// `iret`).
    pub cs: u64,
}

/// The kernel's handler for every trap: called with the interrupted registers, which it
/// may change (they are written back before the return). For `#GP` and `#UD` the library
/// has already tried its own fixup ([`crate::fixup::fixup_exception`]) when a handler is
/// called through [`dispatch_with_library_fixup`]; see [`set_trap_handler`].
pub type TrapHandler = fn(&mut TrapFrame, &Trap);

/// The registered handler (a `TrapHandler` as an address; 0: none).
static HANDLER: AtomicUsize = AtomicUsize::new(0);
/// Whether the library's fixup runs before the handler.
static LIBRARY_FIRST: AtomicUsize = AtomicUsize::new(1);

/// Registers the kernel's trap handler (the last call wins). With
/// `library_fixup_first`, a `#GP` or `#UD` that the library's extable covers is fixed up
/// before the handler sees anything (the handler then gets only the rest); without it
/// the handler gets every trap and calls [`crate::fixup::fixup_exception`] itself (for a
/// kernel that counts or logs every exception).
pub fn set_trap_handler(handler: TrapHandler, library_fixup_first: bool) {
    LIBRARY_FIRST.store(usize::from(library_fixup_first), Ordering::Relaxed);
    HANDLER.store(handler as usize, Ordering::Release);
}

fn handler() -> Option<TrapHandler> {
    let h = HANDLER.load(Ordering::Acquire);
    if h == 0 {
        return None;
    }
    // SAFETY: only `set_trap_handler` stores a non-zero value, and it stores a
    // `TrapHandler`; function pointers round-trip through `usize`.
    Some(unsafe { core::mem::transmute::<usize, TrapHandler>(h) })
}

/// What the common entry path calls: the library's fixup for `#GP`/`#UD` (unless the
/// handler asked to see everything), then the kernel's handler; without a handler, an
/// unfixed trap other than an upcall stops the domain.
pub fn dispatch_with_library_fixup(frame: &mut TrapFrame, trap: &Trap) {
    let library_first = LIBRARY_FIRST.load(Ordering::Relaxed) != 0;
    if library_first
        && (trap.vector == crate::VECTOR_GP || trap.vector == crate::VECTOR_UD)
        // SAFETY: `frame` is the interrupted context of this very exception, saved by the
        // entry with the interrupted `rsp`, and written back before the `iret`.
        && unsafe { crate::fixup::fixup_exception(frame, trap.vector) }
    {
        return;
    }
    match handler() {
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
    let _ = writeln!(
        out,
        "xenmsr: unhandled trap {} (error code {:#x}) at rip {:#x}, rsp {:#x}; no trap handler registered",
        trap.vector, trap.error_code, frame.rip, frame.rsp
    );
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

#[cfg(target_os = "none")]
mod entry {
    use core::arch::global_asm;

    use xenmsr_hypercall::Errno;
    use xenmsr_hypercall::abi::{CallbackType, TrapInfo};

    use super::{TrapFrame, VECTOR_FAILSAFE, VECTOR_UPCALL, VECTORS, xenmsr_pv_trap_dispatch};

    /// One entry stub per vector: pop Xen's rcx/r11, push a zero error code where the CPU
    /// pushes none, push the vector, go to the common path.
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
                        "    pop %rcx\n",
                        "    pop %r11\n",
                        stubs!(@ec $ec),
                        "    push $", stringify!($vec), "\n",
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
        (@ec err) => { "" };
        (@ec none) => { "    push $0\n" };
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
        33 xenmsr_pv_failsafe none;
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

    const _: () = assert!(VECTOR_UPCALL == 32 && VECTOR_FAILSAFE == 33);

    // The common path. On entry the stack holds, from rsp up: the vector, the error code,
    // then Xen's frame (rip, cs, rflags, rsp, ss). The TrapFrame goes below, so Xen's
    // frame starts SIZE + 16 bytes above the new rsp.
    global_asm!(
        r#"
        .pushsection .text.xenmsr_pv_traps, "ax", @progbits
        .p2align 4
        .globl xenmsr_pv_trap_common
    xenmsr_pv_trap_common:
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
        /* HYPERVISOR_iret with flags 0 (not VGCF_in_syscall): the page entry pushes rcx,
           r11 and rax itself, completing struct iret_context above rip/cs/rflags/rsp/ss. */
        push $0
        jmp xenmsr_hypercall_page + {iret} * 32
        .popsection
        "#,
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
    /// vCPU's `VCPUOP_initialise` context).
    pub fn callback_entries() -> (u64, u64) {
        (
            xenmsr_pv_upcall as *const () as usize as u64,
            xenmsr_pv_failsafe as *const () as usize as u64,
        )
    }

    /// Registers the kit's event-upcall and failsafe entries for the calling vCPU (the
    /// handler sees upcalls as [`VECTOR_UPCALL`], the failsafe as [`VECTOR_FAILSAFE`]).
    pub fn install_callbacks() -> Result<(), Errno> {
        let (event, failsafe) = callback_entries();
        let page = xenmsr_hypercall::HypercallPage::xen();
        // SAFETY: the upcall stub follows the event callback's bounce-frame contract (rcx,
        // r11 on top, no error code) and returns with the iret hypercall.
        unsafe { page.callback_register(CallbackType::EVENT, event, 0) }?;
        // SAFETY: as above, for the failsafe stub.
        unsafe { page.callback_register(CallbackType::FAILSAFE, failsafe, 0) }
    }
}

#[cfg(target_os = "none")]
pub use entry::{callback_entries, install_callbacks, install_trap_table, trap_table};

/// Defines the kernel's entry point, `xenmsr_pv_start` (name it in the linker script's
/// `ENTRY`, as `xenmsr-pv.ld` does), which switches to a stack of its own and calls
/// `main(start_info)` with Xen's `start_info` copied into a static.
///
/// ```ignore
/// xenmsr::pv_entry!(kernel_main);                    // a 64 KiB boot stack
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
        $crate::pv_entry!($main, stack_size = 0x10000);
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

/// Copies Xen's `start_info` into a static (once) and returns the copy; the entry point of
/// [`pv_entry!`](crate::pv_entry) calls it.
///
/// # Safety
///
/// `start_info` must be the pointer Xen passed at entry (a mapped `struct start_info`).
pub unsafe fn keep_start_info(
    start_info: *const xenmsr_hypercall::abi::StartInfo,
) -> &'static xenmsr_hypercall::abi::StartInfo {
    // SAFETY: the caller guarantees a mapped `start_info`; it is plain data Xen does not
    // change after entry, read unaligned-safe into the static.
    START_INFO.call_once(|| unsafe { start_info.read_unaligned() })
}

/// The `start_info` copy [`keep_start_info`] made, if the kit's entry ran.
pub fn start_info() -> Option<&'static xenmsr_hypercall::abi::StartInfo> {
    START_INFO.get()
}
