//! Xen's failsafe callback, for real, through the kit's entry (`xenmsr_asm::pv`).
//!
//! Xen reloads a PV vCPU's `ds`, `es`, `fs` and `gs` when it switches back to it
//! (`load_segments()` in Xen's `arch/x86/domain.c`); a selector that fails to load there
//! becomes the null selector, and Xen enters the failsafe callback with its eleven-word
//! frame (`rcx, r11, ds, es, fs, gs, rip, cs, rflags, rsp, ss`). Each vCPU makes that
//! happen to itself: it gives itself an LDT of four flat data descriptors (a page of its
//! own, mapped read-only so that Xen accepts it as a descriptor page), loads the four
//! registers with the four LDT selectors, takes the LDT away (`MMUEXT_SET_LDT` with no
//! entries: the registers keep their cached descriptors, so nothing faults yet) and yields
//! until a switch of vCPUs on its physical CPU makes Xen reload them and fail on all four.
//! Every vCPU runs this at once, and keeps yielding until all have had their callback, so
//! that there is always another vCPU to switch to (as a domU, the vCPUs also kick the
//! console's event channel, so that dom0's console daemon runs too).
//!
//! The handler checks nothing itself (beyond refusing to return into a frame whose `rip`
//! is not where this vCPU could have been): it records what the kit gave it, loads
//! `FLAT_KERNEL_SS` into `ds` and `es` and null into `fs` and `gs`, and returns. The test
//! then checks the record (the four selectors, `rip`/`rsp` against where the vCPU was,
//! `cs`, `ss`, `rflags`, the saved `rcx`/`r11` and the callee-saved registers, all four
//! registers null on entry) and that the vCPU resumed with the handler's selectors.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use xenmsr::{rdmsr_safe, wrmsr_safe};
use xenmsr_asm::pv::{DataSelectors, Trap};

use crate::smp::{self, CacheAligned, MAX_VCPUS, PerVcpu, current_vcpu, vcpu_index};
use crate::testing::{Test, TestResult};
use crate::traps::TrapFrame;
use crate::{check, check_eq, events, hv, test};

/// The failsafe test: every vCPU at once, once per boot (the loops wait for a count of
/// handled callbacks that is never reset).
pub static TESTS: &[Test] = &[test!(failsafe_callback_after_the_ldt_is_gone)];

const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;

/// `mmuext_op` command: set the calling vCPU's LDT (`arg1` its address, `arg2` its
/// number of entries; 0 entries: no LDT).
const MMUEXT_SET_LDT: u32 = 13;
/// `mmuext_op`'s `foreigndom` for the caller's own domain.
const DOMID_SELF: u64 = 0x7ff0;

/// `struct mmuext_op` (Xen's public `xen.h`): the command, then two argument words.
#[repr(C)]
struct MmuextOp {
    cmd: u32,
    pad: u32,
    arg1: u64,
    arg2: u64,
}

/// A flat 4 GiB read/write data segment, DPL 3, accessed (so the CPU never writes it).
const FLAT_DATA: u64 = 0x00cf_f300_0000_ffff;
/// Entries 0-3 of the LDT as `ds`, `es`, `fs`, `gs`: index `i`, TI (the LDT), RPL 3.
const LDT_SELECTORS: DataSelectors = DataSelectors {
    ds: 0x07,
    es: 0x0f,
    fs: 0x17,
    gs: 0x1f,
};
/// What the handler loads: the flat ring-3 data segment Xen's GDT provides (what Xen
/// gives a 64-bit PV kernel's `ss`) in `ds` and `es`, null in `fs` and `gs`. Xen loads
/// null into all four; `ds == es == FLAT_KERNEL_SS` afterwards is the handler's doing.
const HANDLER_LOADS: DataSelectors = DataSelectors {
    ds: hv::nr::FLAT_KERNEL_SS,
    es: hv::nr::FLAT_KERNEL_SS,
    fs: 0,
    gs: 0,
};

/// PTE flags of the LDT page while it is an LDT: present, user, accessed (read-only).
const PTE_READ_ONLY: u64 = 0x25;
/// PTE flags of a kernel data page: present, writable, user, accessed, dirty.
const PTE_WRITABLE: u64 = 0x67;

/// Values the provoking code keeps in the callee-saved registers `r12`-`r15`, and in `rcx`
/// and `r11`, which the handler must find in its frame.
const MAGIC: [u64; 4] = [
    0x1212_0000_f00d_0012,
    0x1313_0000_f00d_0013,
    0x1414_0000_f00d_0014,
    0x1515_0000_f00d_0015,
];
const MAGIC_RCX: u64 = 0xcccc_0000_f00d_00cc;
const MAGIC_R11: u64 = 0x1111_0000_f00d_0011;

/// Each vCPU's LDT page.
#[repr(C, align(4096))]
struct LdtPage(UnsafeCell<[u64; 512]>);

// SAFETY: each vCPU touches only its own page (indexed by its id), from its own test.
unsafe impl Sync for LdtPage {}

static LDT_PAGES: [LdtPage; MAX_VCPUS] = [const { LdtPage(UnsafeCell::new([0; 512])) }; MAX_VCPUS];

/// What the provoking code gets and records (offsets used by its assembly).
#[repr(C)]
struct Provoke {
    /// In: the four LDT selectors, packed (`DataSelectors::pack`).
    selectors: u64,
    /// In: the `MMUEXT_SET_LDT` operation that takes the LDT away.
    clear_ldt: *const MmuextOp,
    /// In: the console's event channel to kick every round (0: none).
    kick_port: u64,
    /// In: the most rounds of yielding.
    rounds: u64,
    /// Out: `rsp` in the yield loop.
    rsp: u64,
}

global_asm!(
    r#"
    .pushsection .text.pvk_failsafe, "ax", @progbits
    .globl pvk_failsafe_provoke
    .type pvk_failsafe_provoke, @function
    /* u64 pvk_failsafe_provoke(struct Provoke *rdi), C ABI, upcalls masked by the caller:
       loads ds, es, fs, gs with the four LDT selectors, takes the LDT away, then yields
       (kicking the console port first, if any) until every online vCPU's handler has run
       or the rounds run out; returns the rounds left. Keeps MAGIC in r12-r15 and rcx/r11
       from before the selector loads to the end (the hypercall page preserves rcx and
       r11), and the Provoke pointer in rbx, the round count in rbp. The stack is 16-byte
       aligned at each call (six pushes after the caller's call). */
pvk_failsafe_provoke:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rdi, %rbx
    mov {rounds}(%rbx), %rbp
    movabs ${m12}, %r12
    movabs ${m13}, %r13
    movabs ${m14}, %r14
    movabs ${m15}, %r15
    movabs ${mrcx}, %rcx
    movabs ${mr11}, %r11
    sub $8, %rsp                       /* 16-byte aligned from here on */
    mov %rsp, {out_rsp}(%rbx)
    mov {selectors}(%rbx), %rax
    mov %eax, %ds
    shr $16, %rax
    mov %eax, %es
    shr $16, %rax
    mov %eax, %fs
    shr $16, %rax
    mov %eax, %gs
    /* mmuext_op(&clear_ldt, 1, NULL, DOMID_SELF): the registers keep their cached
       descriptors, the selectors no longer load. */
    mov {clear}(%rbx), %rdi
    mov $1, %esi
    xor %edx, %edx
    mov ${domid_self}, %r10d
    call xenmsr_hypercall_page + {mmuext} * 32
1:
    mov {done}(%rip), %eax
    cmp {online}(%rip), %eax
    jae 2f
    test %rbp, %rbp
    jz 2f
    dec %rbp
    cmpq $0, {kick}(%rbx)
    je 3f
    /* event_channel_op(EVTCHNOP_send, &port): the port is the first word of `kick`. */
    mov ${send}, %edi
    lea {kick}(%rbx), %rsi
    call xenmsr_hypercall_page + {evtchn} * 32
3:
    mov ${yield_}, %edi
    xor %esi, %esi
    call xenmsr_hypercall_page + {sched} * 32
    jmp 1b
2:
    mov %rbp, %rax
    add $8, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret
    .globl pvk_failsafe_provoke_end
pvk_failsafe_provoke_end:
    .size pvk_failsafe_provoke, . - pvk_failsafe_provoke
    .popsection
    "#,
    rounds = const core::mem::offset_of!(Provoke, rounds),
    out_rsp = const core::mem::offset_of!(Provoke, rsp),
    selectors = const core::mem::offset_of!(Provoke, selectors),
    clear = const core::mem::offset_of!(Provoke, clear_ldt),
    kick = const core::mem::offset_of!(Provoke, kick_port),
    m12 = const MAGIC[0],
    m13 = const MAGIC[1],
    m14 = const MAGIC[2],
    m15 = const MAGIC[3],
    mrcx = const MAGIC_RCX,
    mr11 = const MAGIC_R11,
    domid_self = const DOMID_SELF,
    mmuext = const hv::nr::MMUEXT_OP,
    evtchn = const hv::nr::EVENT_CHANNEL_OP,
    send = const hv::nr::EVTCHNOP_SEND,
    sched = const hv::nr::SCHED_OP,
    yield_ = const hv::nr::SCHEDOP_YIELD,
    done = sym DONE,
    online = sym ONLINE_AT_START,
    options(att_syntax)
);

unsafe extern "C" {
    fn pvk_failsafe_provoke(p: *mut Provoke) -> u64;
    static pvk_failsafe_provoke_end: [u8; 0];
}

/// How many vCPUs' handlers have run (the provoking loops run until it reaches
/// [`ONLINE_AT_START`]).
static DONE: AtomicU32 = AtomicU32::new(0);
/// The number of vCPUs running the test.
static ONLINE_AT_START: AtomicU32 = AtomicU32::new(u32::MAX);

/// Whether each vCPU expects a failsafe callback now (1) or not (0).
static EXPECTING: PerVcpu<AtomicU32> = [const { CacheAligned(AtomicU32::new(0)) }; MAX_VCPUS];
/// How many failsafe callbacks each vCPU's handler has taken.
static TAKEN: PerVcpu<AtomicU32> = [const { CacheAligned(AtomicU32::new(0)) }; MAX_VCPUS];

/// What the handler was given.
#[derive(Clone, Copy)]
struct Record {
    frame: TrapFrame,
    trap: Trap,
    /// The four registers when the handler ran (before it loaded its own).
    on_entry: DataSelectors,
}

static RECORDS: PerVcpu<spin::Mutex<Option<Record>>> =
    [const { CacheAligned(spin::Mutex::new(None)) }; MAX_VCPUS];

/// Where the provoking code lies.
fn provoke_range() -> (u64, u64) {
    (
        pvk_failsafe_provoke as *const () as usize as u64,
        (&raw const pvk_failsafe_provoke_end) as usize as u64,
    )
}

/// Where the hypercall page lies.
fn page_range() -> (u64, u64) {
    let base = hv::page().as_ptr() as u64;
    (base, base + 4096)
}

fn within((lo, hi): (u64, u64), x: u64) -> bool {
    (lo..hi).contains(&x)
}

/// The kernel's handler for [`crate::traps::VECTOR_FAILSAFE`]: true if this vCPU was
/// expecting it (recorded, segments fixed), false if not (the caller stops the run).
pub fn on_failsafe(frame: &mut TrapFrame, trap: &Trap) -> bool {
    let v = vcpu_index();
    if EXPECTING[v].0.load(Ordering::Acquire) == 0 {
        return false;
    }
    let on_entry = DataSelectors::current();
    *RECORDS[v].0.lock() = Some(Record {
        frame: *frame,
        trap: *trap,
        on_entry,
    });
    if TAKEN[v].0.fetch_add(1, Ordering::AcqRel) == 0 {
        DONE.fetch_add(1, Ordering::AcqRel);
    }
    if !within(provoke_range(), frame.rip) && !within(page_range(), frame.rip) {
        // Returning there would go astray: report what the entry handed over and stop.
        crate::println!(
            "failsafe: vCPU {v}: the frame is wrong: rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} selectors {:x?} rcx {:#x} r11 {:#x}",
            frame.rip,
            trap.cs,
            frame.rflags,
            frame.rsp,
            trap.failsafe_selectors(),
            frame.rcx,
            frame.r11
        );
        crate::testing::abort_run(
            "the failsafe handler got a frame whose rip is not where the vCPU was",
        );
    }
    // SAFETY: FLAT_KERNEL_SS is Xen's flat ring-3 data segment (every PV kernel's ss), and
    // null always loads; the FS/GS bases the loads replace are restored by the test once
    // the vCPU resumes, and nothing runs on this vCPU before that (upcalls are masked).
    unsafe { HANDLER_LOADS.load() };
    true
}

/// The vCPU loads four LDT selectors, takes the LDT away and yields; Xen's failsafe
/// callback reaches the kit's handler with the right frame, the handler's selectors are
/// in place when the vCPU resumes, where it was.
fn failsafe_callback_after_the_ldt_is_gone() -> TestResult {
    let v = current_vcpu() as usize;
    // Every vCPU runs this at once: the count the loops wait for.
    ONLINE_AT_START.store(smp::online(), Ordering::Release);
    smp::barrier();

    let page = LDT_PAGES[v].0.get();
    let va = page as u64;
    // SAFETY: this vCPU's own page, not yet an LDT (writable, no reference into it).
    unsafe {
        for i in 0..4 {
            (*page)[i] = FLAT_DATA;
        }
    }
    let mfn = crate::boot::mfn_of(va as usize);
    // SAFETY: the page is this vCPU's, page-aligned and 4 KiB-mapped in .bss; it is
    // remapped to its own frame, read-only, and nothing writes it until it is writable
    // again below.
    let ro =
        unsafe { hv::page().update_va_mapping(va, mfn << 12 | PTE_READ_ONLY, hv::nr::UVMF_INVLPG) };
    check_eq!(ro, Ok(()), "update_va_mapping(LDT page, read-only)");

    let saved_selectors = DataSelectors::current();
    // SAFETY: reading a segment base has no side effect.
    let saved_fs = unsafe { rdmsr_safe(MSR_FS_BASE) };
    // SAFETY: as above.
    let saved_gs = unsafe { rdmsr_safe(MSR_GS_BASE) };

    let set_ldt = MmuextOp {
        cmd: MMUEXT_SET_LDT,
        pad: 0,
        arg1: va,
        arg2: 4,
    };
    let clear_ldt = MmuextOp {
        cmd: MMUEXT_SET_LDT,
        pad: 0,
        arg1: 0,
        arg2: 0,
    };
    let kick_port = if super::model().dom0 {
        0
    } else {
        u64::from(crate::boot_info().start_info.console_evtchn)
    };
    let mut p = Provoke {
        selectors: LDT_SELECTORS.pack(),
        clear_ldt: &raw const clear_ldt,
        kick_port,
        rounds: ROUNDS,
        rsp: 0,
    };
    let mask = events::mask();
    // SAFETY: Xen reads the one operation during the call; the LDT is this vCPU's
    // read-only page of valid descriptors.
    let set = unsafe { mmuext_op(&set_ldt) };
    let left = if set == Ok(()) {
        EXPECTING[v].0.store(1, Ordering::Release);
        // SAFETY: upcalls are masked; the code loads the LDT's own selectors, which
        // leaves the FS and GS bases at 0 (restored below), and keeps the rest of the C
        // ABI; nothing else on this vCPU uses ds/es/fs/gs or the bases meanwhile.
        let left = unsafe { pvk_failsafe_provoke(&raw mut p) };
        EXPECTING[v].0.store(0, Ordering::Release);
        left
    } else {
        0
    };
    let resumed_with = DataSelectors::current();
    // Put everything back: the selectors, the bases, the page.
    // SAFETY: the selectors this vCPU had (loadable then and now: no LDT selector).
    unsafe { saved_selectors.load() };
    if let (Ok(fs), Ok(gs)) = (saved_fs, saved_gs) {
        // SAFETY: the bases this vCPU had before the test.
        let _ = unsafe { wrmsr_safe(MSR_FS_BASE, fs) };
        // SAFETY: as above.
        let _ = unsafe { wrmsr_safe(MSR_GS_BASE, gs) };
    }
    // SAFETY: the LDT is gone (SET_LDT with no entries in the provoking code, or never
    // set); the page becomes writable kernel data again.
    let rw =
        unsafe { hv::page().update_va_mapping(va, mfn << 12 | PTE_WRITABLE, hv::nr::UVMF_INVLPG) };
    drop(mask);

    check_eq!(set, Ok(()), "mmuext_op(MMUEXT_SET_LDT, 4 entries)");
    check_eq!(rw, Ok(()), "update_va_mapping(LDT page, writable)");
    check_eq!(
        (saved_fs.is_ok(), saved_gs.is_ok()),
        (true, true),
        "FS/GS base reads"
    );
    let taken = TAKEN[v].0.load(Ordering::Acquire);
    check!(
        taken == 1,
        "vCPU {v}: {taken} failsafe callbacks in {} yields (expected 1)",
        ROUNDS - left
    );
    let r = RECORDS[v].0.lock().take();
    let Some(r) = r else {
        crate::fail!("vCPU {v}: no record of the callback");
    };
    crate::println!(
        "  failsafe: vCPU {v}: {} yields before the callback: rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} selectors {:x?}",
        ROUNDS - left,
        r.frame.rip,
        r.trap.cs,
        r.frame.rflags,
        r.frame.rsp,
        r.trap.failsafe_selectors()
    );
    check_frame(&r, p.rsp)?;
    check_eq!(
        resumed_with,
        HANDLER_LOADS,
        "selectors the vCPU resumed with"
    );
    Ok(())
}

/// At most this many yields until every vCPU has had its callback.
const ROUNDS: u64 = 200_000;

/// Checks the handler's record against where the provoking code was (`loop_rsp`: its
/// `rsp` between calls).
fn check_frame(r: &Record, loop_rsp: u64) -> TestResult {
    let f = &r.frame;
    check_eq!(r.trap.vector, crate::traps::VECTOR_FAILSAFE, "vector");
    check_eq!(
        r.trap.failsafe_selectors(),
        Some(LDT_SELECTORS),
        "the selectors Xen failed to load"
    );
    check_eq!(
        r.on_entry,
        DataSelectors::NULL,
        "the registers on entry (Xen loads null where it failed)"
    );
    check_eq!(
        (r.trap.cs & 0xffff) | 3,
        u64::from(hv::nr::FLAT_KERNEL_CS),
        "cs"
    );
    check_eq!(
        (r.trap.cs >> 32) & 0xff,
        1u64,
        "the saved event mask in cs (masked)"
    );
    check_eq!(f.rflags & (1 << 9), 0u64, "rflags.IF (events were masked)");
    check_eq!(
        [f.r12, f.r13, f.r14, f.r15],
        MAGIC,
        "r12-r15 (kept by the provoking code)"
    );
    let code = provoke_range();
    let page = page_range();
    if within(code, f.rip) {
        check_eq!(f.rsp, loop_rsp, "rsp (interrupted in the provoking code)");
        check_eq!(
            (f.rcx, f.r11),
            (MAGIC_RCX, MAGIC_R11),
            "rcx, r11 (Xen's saved words)"
        );
    } else if within(page, f.rip) {
        // Inside a hypercall page entry the provoking code called: its return address
        // and the entry's pushes of rcx and r11 are below the loop's rsp.
        check!(
            (loop_rsp - 24..=loop_rsp - 8).contains(&f.rsp),
            "rsp {:#x} in the hypercall page, the loop's {:#x}",
            f.rsp,
            loop_rsp
        );
        // After `syscall` (where Xen switched vCPUs) rcx holds the return point, which
        // is the frame's rip; before it, the entry has not touched rcx yet.
        check!(
            f.rcx == f.rip || f.rcx == MAGIC_RCX,
            "rcx {:#x} in the hypercall page at rip {:#x}",
            f.rcx,
            f.rip
        );
    } else {
        crate::fail!(
            "rip {:#x} is neither in the provoking code nor in the hypercall page",
            f.rip
        );
    }
    Ok(())
}

/// `mmuext_op(op, 1, NULL, DOMID_SELF)`.
///
/// # Safety
///
/// `op` must be an operation on this vCPU's own state that the kernel can afford (here:
/// setting its LDT to a read-only page of valid descriptors, or to none).
unsafe fn mmuext_op(op: &MmuextOp) -> Result<(), xenmsr_hypercall::Errno> {
    // SAFETY: Xen reads one `struct mmuext_op` during the call; what it does is the
    // caller's contract.
    unsafe {
        hv::page().call(
            hv::nr::MMUEXT_OP,
            [core::ptr::from_ref(op) as u64, 1, 0, DOMID_SELF, 0],
        )
    }
    .map(drop)
}
