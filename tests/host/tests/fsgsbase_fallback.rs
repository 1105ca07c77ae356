//! FSGSBASE on a vCPU without CR4.FSGSBASE: the access is completed, never lost.
//!
//! Xen keeps CR4 per vCPU, so on a vCPU the kernel did not enable FSGSBASE on, the
//! `wrgsbase`/`rdfsbase`... of a patched site (or of a stub's fast path) raise `#UD`. The
//! fixup must then complete the access on Xen PV: a write through the `set_segment_base`
//! hypercall (checked on the mock page's record), a read with a trapped RDMSR (Xen
//! emulates it: here this test's SIGSEGV handler does, with the thread's real bases), with
//! the site's register contract intact, counting it and reporting the first one once.
//!
//! This host's Linux keeps CR4.FSGSBASE on for user space, and user space cannot turn it
//! off, so the `#UD` is made real another way: the site's own FSGSBASE instruction is given
//! a LOCK prefix (in place of one of its CS padding prefixes), which makes the CPU raise
//! `#UD` at the site start with the registers the site set up; a stub's instruction is
//! replaced by a `ud2` of the same address. The fixup sees exactly what it sees on a vCPU
//! without the CR4 bit: vector 6 at that address.
//!
//! One test per binary: it runs `xenmsr::init` and rewrites this binary's text.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use xenmsr::patch::{Variant, XenRouting, wanted_bytes_with};
use xenmsr::routes::{MSR_FS_BASE, MSR_GS_BASE};
use xenmsr::{MsrError, UncheckedAccess};
use xenmsr_asm::extable::{self, Kind};
use xenmsr_asm::patch::{PatchOp, PatchSite, patch_sites};
use xenmsr_asm::stubs::{REWIND_NATIVE, REWIND_RESTORE_RAX};
use xenmsr_host_tests::{fixups, install_fault_handlers, mock_xen_pv_config, write_text_mprotect};
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::nr;

const LOCK: u8 = 0xf0;
const UD2_NOP3: [u8; 5] = [0x0f, 0x0b, 0x0f, 0x1f, 0x00];
const WRFSBASE_RAX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xd0];
const RDFSBASE_RAX: [u8; 5] = [0xf3, 0x48, 0x0f, 0xae, 0xc0];

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());
static WARNINGS: AtomicUsize = AtomicUsize::new(0);
/// RDMSRs of a segment base "Xen" (this test's SIGSEGV handler) emulated.
static EMULATED_RDMSRS: AtomicUsize = AtomicUsize::new(0);

fn log(args: std::fmt::Arguments<'_>) {
    LOG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(args.to_string());
}

fn warn(_: &UncheckedAccess) {
    WARNINGS.fetch_add(1, Ordering::SeqCst);
}

#[inline(never)]
fn write_gs_safe(v: u64) -> Result<(), MsrError> {
    // SAFETY: the write goes to the mock hypercall page, which only records it.
    unsafe { xenmsr::wrmsr_ns_const_safe::<MSR_GS_BASE>(v) }
}

#[inline(never)]
fn write_fs_unchecked(v: u64) {
    // SAFETY: as above.
    unsafe { xenmsr::wrmsr_ns_const::<MSR_FS_BASE>(v) }
}

#[inline(never)]
fn read_fs_safe() -> Result<u64, MsrError> {
    // SAFETY: reading a segment base has no side effect.
    unsafe { xenmsr::rdmsr_const_safe::<MSR_FS_BASE>() }
}

#[inline(never)]
fn read_gs_unchecked() -> u64 {
    // SAFETY: as above.
    unsafe { xenmsr::rdmsr_const::<MSR_GS_BASE>() }
}

#[inline(never)]
fn write_fs_runtime(v: u64) -> Result<(), MsrError> {
    // SAFETY: through the write stub's WRFSBASE path, which raises #UD here; the fallback
    // goes to the mock page.
    unsafe { xenmsr::wrmsr_safe(MSR_FS_BASE, v) }
}

#[inline(never)]
fn read_fs_runtime() -> Result<u64, MsrError> {
    // SAFETY: reading a segment base has no side effect.
    unsafe { xenmsr::rdmsr_safe(MSR_FS_BASE) }
}

fn site_in(function: usize, op: PatchOp) -> PatchSite {
    patch_sites()
        .filter(|s| s.op == Some(op) && s.addr >= function && s.addr < function + 4096)
        .min_by_key(|s| s.addr)
        .unwrap_or_else(|| panic!("no {op:?} site in the function at {function:#x}"))
}

fn code(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: inside this binary's text, mapped readable.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

/// Patches `site` with its FSGSBASE variant on Xen PV, made to raise #UD: LOCK in place of
/// the first padding prefix. Returns the bytes written.
fn patch_fsgsbase_ud(site: PatchSite) -> Vec<u8> {
    let routing = XenRouting {
        fsgsbase: true,
        ..xenmsr::patch::routing()
    };
    let wanted = wanted_bytes_with(&site, Variant::XenPv, &routing).expect("patchable");
    let mut bytes = wanted.as_slice().to_vec();
    assert_eq!(
        bytes[0], 0x2e,
        "{site:?}: a padded FSGSBASE instruction: {bytes:02x?}"
    );
    assert_eq!(&bytes[4..7], &[0xf3, 0x48, 0x0f], "{bytes:02x?}");
    bytes[0] = LOCK;
    // SAFETY: a live patch site of this binary that no other thread runs.
    unsafe { write_text_mprotect(site.addr, &bytes) };
    bytes
}

/// The stub instruction (`bytes`) that has a rewind entry with `data`.
fn stub_insn(data: u32, bytes: &[u8]) -> usize {
    let found: Vec<_> = extable::table()
        .iter()
        .filter(|e| e.data().kind() == Some(Kind::Rewind) && e.data().bits() == data)
        .map(|e| e.insn_addr())
        .filter(|&a| code(a, bytes.len()) == bytes)
        .collect();
    assert_eq!(found.len(), 1, "stub instruction {bytes:02x?}: {found:#x?}");
    found[0]
}

fn read_fs_base() -> u64 {
    let v: u64;
    // SAFETY: reads this thread's FS base.
    unsafe { core::arch::asm!("rdfsbase {}", out(reg) v, options(nomem, nostack)) };
    v
}

fn read_gs_base() -> u64 {
    let v: u64;
    // SAFETY: reads the user GS base.
    unsafe { core::arch::asm!("rdgsbase {}", out(reg) v, options(nomem, nostack)) };
    v
}

fn write_gs_base(v: u64) {
    // SAFETY: the user GS base is unused by Rust and glibc on x86-64 Linux.
    unsafe { core::arch::asm!("wrgsbase {}", in(reg) v, options(nomem, nostack)) };
}

/// The handler `install_fault_handlers` set for SIGSEGV (the production fixup).
static LIBRARY_SIGSEGV: AtomicUsize = AtomicUsize::new(0);

/// "Xen" for a PV kernel's RDMSR of FS_BASE or GS_BASE: the trap is emulated with the
/// current bases (as Xen's `read_msr` does for a 64-bit PV guest); anything else goes to
/// the library's handler.
extern "C" fn emulate_rdmsr(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `ucontext_t` to an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let g = &mut uc.uc_mcontext.gregs;
    let rip = g[libc::REG_RIP as usize] as usize;
    let msr = g[libc::REG_RCX as usize] as u32;
    // SAFETY: rip is the faulting instruction in this binary's text.
    let insn = unsafe { core::slice::from_raw_parts(rip as *const u8, 2) };
    if insn == [0x0f, 0x32] && (msr == MSR_FS_BASE || msr == MSR_GS_BASE) {
        let value = if msr == MSR_FS_BASE {
            read_fs_base()
        } else {
            read_gs_base()
        };
        g[libc::REG_RAX as usize] = (value & 0xffff_ffff) as libc::greg_t;
        g[libc::REG_RDX as usize] = (value >> 32) as libc::greg_t;
        g[libc::REG_RIP as usize] = (rip + 2) as libc::greg_t;
        EMULATED_RDMSRS.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let library: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
        // SAFETY: the address of the SA_SIGINFO handler sigaction reported.
        unsafe { core::mem::transmute(LIBRARY_SIGSEGV.load(Ordering::SeqCst)) };
    library(sig, info, ctx);
}

fn install_xen_rdmsr_emulation() {
    // SAFETY: plain data; filled in below.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: as above; sigaction fills it in.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = emulate_rdmsr as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa_mask` is a valid `sigset_t` we own.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is initialised and its handler has the SA_SIGINFO signature.
    let rc = unsafe { libc::sigaction(libc::SIGSEGV, &action, &mut old) };
    assert_eq!(rc, 0);
    assert_eq!(old.sa_flags & libc::SA_SIGINFO, libc::SA_SIGINFO);
    LIBRARY_SIGSEGV.store(old.sa_sigaction, Ordering::SeqCst);
}

fn set_segment_base(which: u64, value: u64) -> MockCall {
    MockCall::new(nr::SET_SEGMENT_BASE, [which, value, 0, 0, 0])
}

#[test]
fn fsgsbase_ud_falls_back_to_the_hypercall_and_the_trapped_rdmsr() {
    install_fault_handlers();
    install_xen_rdmsr_emulation();
    let _session = mock::session();
    // SAFETY: one thread; the sites are this binary's; the writer maps the text writable.
    unsafe { xenmsr::init(mock_xen_pv_config().with_log(log).with_warn(warn)) }.expect("init");
    assert_eq!(xenmsr::fsgsbase::fallbacks(), 0);
    mock::assert_calls(&[]);

    // Constant-index sites with the FSGSBASE instruction inline, raising #UD.
    let sites = [
        site_in(write_gs_safe as *const () as usize, PatchOp::WriteImm),
        site_in(write_fs_unchecked as *const () as usize, PatchOp::WriteImm),
        site_in(read_fs_safe as *const () as usize, PatchOp::ReadImm),
        site_in(read_gs_unchecked as *const () as usize, PatchOp::ReadImm),
    ];
    let before: Vec<_> = sites
        .iter()
        .map(|s| code(s.addr, usize::from(s.len)))
        .collect();
    for site in sites {
        patch_fsgsbase_ud(site);
    }
    let (ill0, _) = fixups();

    // Writes land through set_segment_base (GS: the kernel's, 2; FS: 0).
    let value = 0x0000_7123_4567_8000;
    assert_eq!(write_gs_safe(value), Ok(()));
    mock::assert_calls(&[set_segment_base(2, value)]);
    write_fs_unchecked(value + 0x1000);
    mock::assert_calls(&[set_segment_base(0, value + 0x1000)]);
    assert_eq!(
        WARNINGS.load(Ordering::SeqCst),
        0,
        "a completed write warns nothing"
    );

    // Reads return the real bases, through the trapped RDMSR Xen emulates.
    let saved_gs = read_gs_base();
    write_gs_base(0x0000_7abc_def0_1000);
    let gs = read_gs_unchecked();
    write_gs_base(saved_gs);
    assert_eq!(gs, 0x0000_7abc_def0_1000);
    assert_eq!(read_fs_safe(), Ok(read_fs_base()));
    assert_eq!(EMULATED_RDMSRS.load(Ordering::SeqCst), 2);
    assert_eq!(fixups().0, ill0 + 4, "four real #UDs");
    assert_eq!(xenmsr::fsgsbase::fallbacks(), 4);

    // The stubs' own FSGSBASE instructions (run-time-index sites), made to #UD.
    // SAFETY: the mock Xen PV platform `init` set up (segment-base page stored), whose
    // fault handler runs the fixup on this #UD: the write is completed by the hypercall.
    unsafe { xenmsr_asm::fastpath::set_fsgsbase_enabled(true) };
    let layout = xenmsr::pmu::PmuLayout::from_cpuid(xenmsr::pmu::raw_cpuid);
    let keys = xenmsr::dispatch::read_filter_keys(&layout, true);
    let filter = Box::leak(Box::new(
        xenmsr_asm::fastpath::ReadFilter::new(keys.as_slice()).expect("filter"),
    ));
    // SAFETY: the policy's own keys with FSGSBASE; the RDFSBASE #UD reaches the fixup
    // (this binary's SIGILL handler), which completes the read with a trapped RDMSR.
    unsafe { xenmsr_asm::fastpath::install_read_filter(filter) };
    let wrfsbase = stub_insn(REWIND_RESTORE_RAX.bits(), &WRFSBASE_RAX);
    let rdfsbase = stub_insn(REWIND_NATIVE.bits(), &RDFSBASE_RAX);
    for insn in [wrfsbase, rdfsbase] {
        // SAFETY: a stub instruction of this binary that no other thread runs.
        unsafe { write_text_mprotect(insn, &UD2_NOP3) };
    }
    assert_eq!(write_fs_runtime(value + 0x2000), Ok(()));
    mock::assert_calls(&[set_segment_base(0, value + 0x2000)]);
    assert_eq!(read_fs_runtime(), Ok(read_fs_base()));
    assert_eq!(EMULATED_RDMSRS.load(Ordering::SeqCst), 3);
    assert_eq!(xenmsr::fsgsbase::fallbacks(), 6);

    // Reported once, naming the first site.
    let log = LOG.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let reports: Vec<_> = log.iter().filter(|l| l.contains("raised #UD")).collect();
    assert_eq!(reports.len(), 1, "{log:#?}");
    assert!(
        reports[0].contains(&format!("{:#x}", sites[0].addr))
            && reports[0].contains("CR4.FSGSBASE"),
        "{reports:?}"
    );

    // Put the text back.
    let restore = [(wrfsbase, &WRFSBASE_RAX[..]), (rdfsbase, &RDFSBASE_RAX[..])]
        .into_iter()
        .chain(
            sites
                .iter()
                .map(|s| s.addr)
                .zip(before.iter().map(Vec::as_slice)),
        );
    for (addr, bytes) in restore {
        // SAFETY: as above.
        unsafe { write_text_mprotect(addr, bytes) };
    }
    // SAFETY: turning the switch off has no requirement.
    unsafe { xenmsr_asm::fastpath::set_fsgsbase_enabled(false) };
}
