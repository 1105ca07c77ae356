//! The library's routing on Xen PV, after `xenmsr::init`: what each MSR class does, which
//! hypercalls it makes (counted by the tracing page), and the warn-once-per-kind rule.

use core::arch::asm;
use core::hint::black_box;

use xenmsr::patch::{CpuFeatures, Variant};
use xenmsr::{InitError, MsrError, rdmsr, rdmsr_safe, wrmsr_safe};
use xenmsr_hypercall::Errno;

use super::raw;
use crate::fixup::exinfo;
use crate::hv::nr;
use crate::testing::{Test, TestResult};
use crate::tracepage::{self, Snapshot};
use crate::{check, check_eq, fail, test, traps};

/// `xenmsr::init`, on vCPU 0 with the other vCPUs stopped (it patches code).
pub static INIT_TESTS: &[Test] = &[test!(init_succeeds), test!(second_init_is_refused)];

/// The routing tests (after `xenmsr::init`), on every vCPU at once.
pub static TESTS: &[Test] = &[
    test!(segment_base_writes_are_hypercalls),
    test!(segment_base_noncanonical_is_hypercall_error),
    test!(segment_base_reads_pass_through),
    test!(syscall_msr_writes_are_ignored),
    test!(apic_base_is_fixed_up),
    test!(efer_passes_through),
    test!(unknown_msr_faults_like_native),
    test!(segment_bases_take_effect_in_the_segment_registers),
    test!(stress_random_operations),
];

/// Tests that must run alone (the other vCPUs parked): one rewrites a call site, the
/// other counts the warn hook's calls, which any vCPU's unchecked fault would bump.
pub static SERIAL_TESTS: &[Test] = &[
    test!(unchecked_fault_warns_once_per_kind),
    test!(native_and_xen_sites_side_by_side),
];

const GP_FAULT: MsrError = MsrError::Fault { vector: 13 };
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_BOGUS: u32 = 0x1234_5678;
const SYSCALL_MSRS: [u32; 7] = [
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
];

fn init_succeeds() -> TestResult {
    let report = match crate::library::init() {
        Ok(report) => report,
        Err(e) => fail!("xenmsr::init: {e}"),
    };
    check_eq!(report.variant, Variant::XenPv, "patch variant");
    // On Xen PV a constant-index site's route is decided at patch time (pass-through MSRs
    // inline, segment bases to their stubs or FSGSBASE instructions, ignored writes as
    // NOPs); every other site keeps the `call` it was emitted with. Every record of the
    // image's patch-site section was visited, and holds what its route says.
    let sites = xenmsr_asm::patch::records().len();
    check!(
        sites > 0,
        "the image has no patch sites (linker script lost them?)"
    );
    let routing = xenmsr::patch::routing();
    let mut routed = 0;
    for site in xenmsr_asm::patch::patch_sites() {
        let Some(op) = site.op else {
            fail!("a corrupt record at {:#x}", site.addr);
        };
        if routing.route(op, site.imm) != xenmsr::patch::ConstRoute::Stub(op.stub()) {
            routed += 1;
        }
        let Ok(wanted) = xenmsr::patch::wanted_bytes(&site, Variant::XenPv) else {
            fail!("no bytes for {site:?}");
        };
        // SAFETY: reading the site's own bytes in this image's text.
        let code =
            unsafe { core::slice::from_raw_parts(site.addr as *const u8, usize::from(site.len)) };
        check!(code == wanted.as_slice(), "{site:?} holds {code:02x?}");
    }
    check_eq!(
        report.patched.rewritten,
        routed,
        "sites rewritten (the routed constant-index ones)"
    );
    check_eq!(
        report.patched.unchanged,
        sites - routed,
        "sites already right vs records"
    );
    let fsgsbase_expected = match (crate::suites::fsgsbase_requested(), super::model().vendor) {
        (false, _) => xenmsr::FsGsBaseStatus::NotRequested,
        // qemu64 (AMD family 0xf) has no FSGSBASE: the fallback.
        (true, _) if super::model().cpu == Some("qemu64") => xenmsr::FsGsBaseStatus::NotSupported,
        (true, _) => xenmsr::FsGsBaseStatus::Enabled,
    };
    check_eq!(report.fsgsbase, fsgsbase_expected, "FSGSBASE");
    check!(
        report.read_filter.is_ok(),
        "read filter: {:?}",
        report.read_filter
    );
    crate::println!(
        "  init: {routed} constant-index sites routed; FSGSBASE {:?}; {:?} MSRs in the read filter",
        report.fsgsbase,
        report.read_filter
    );
    Ok(())
}

fn second_init_is_refused() -> TestResult {
    check_eq!(
        crate::library::init(),
        Err(InitError::AlreadyInitialised),
        "second init"
    );
    Ok(())
}

/// Whether the library writes `msr` with WRFSBASE/WRGSBASE (no hypercall): FS_BASE and
/// GS_BASE once `init` enabled FSGSBASE (`fsgsbase=1` on a model that has it).
fn by_instruction(msr: u32) -> bool {
    xenmsr::fsgsbase::enabled() && (msr == MSR_FS_BASE || msr == MSR_GS_BASE)
}

/// Runs `f` and returns what it returned and the hypercalls it made.
fn traced<R>(f: impl FnOnce() -> R) -> (R, Snapshot, Snapshot) {
    let before = tracepage::snapshot();
    let r = f();
    (r, before, tracepage::snapshot())
}

fn segment_base_writes_are_hypercalls() -> TestResult {
    for (msr, value) in [
        (MSR_FS_BASE, 0x0000_7f00_0000_1000u64),
        (MSR_GS_BASE, 0x0000_0000_0020_0000),
        (MSR_KERNEL_GS_BASE, 0x0000_6000_0000_2000),
    ] {
        // SAFETY: the kernel keeps no state in FS or GS.
        let (r, before, after) = traced(|| unsafe { wrmsr_safe(msr, value) });
        check_eq!(r, Ok(()), "wrmsr_safe of a segment base");
        // One hypercall, or none with FSGSBASE (KERNEL_GS_BASE is always one).
        let expected = u64::from(!by_instruction(msr));
        check_eq!(
            after.count_since(&before, nr::SET_SEGMENT_BASE),
            expected,
            "set_segment_base calls"
        );
        check_eq!(after.total_since(&before), expected, "hypercalls made");
        check_eq!(
            raw::rdmsr(msr),
            Ok(value),
            "readback with the bare instruction"
        );
        // SAFETY: as above.
        let _ = unsafe { wrmsr_safe(msr, 0) };
    }
    Ok(())
}

fn segment_base_noncanonical_is_hypercall_error() -> TestResult {
    let (gp, ud) = (traps::count(13), traps::count(6));
    // SAFETY: Xen (or the stub, with FSGSBASE) refuses the value.
    let (r, before, after) = traced(|| unsafe { wrmsr_safe(MSR_FS_BASE, 0x8000_0000_0000_0000) });
    // The failure really took the rewind path: the policy (or the stub's segment-base
    // path) failed, the stub set CF and trapped at its `ud2` (one #UD), the fixup rewound
    // to the call site and applied the site's write-safe entry. No #GP: no WRMSR or
    // WRFSBASE ever ran.
    check_eq!(
        traps::count(6) - ud,
        1,
        "#UD taken (the stub's rewind trap)"
    );
    check_eq!(traps::count(13) - gp, 0, "#GP taken");
    if by_instruction(MSR_FS_BASE) {
        // WRFSBASE would #GP: the stub refuses the value before it, with that error.
        check_eq!(r, Err(GP_FAULT), "non-canonical FS_BASE (FSGSBASE)");
        check_eq!(after.total_since(&before), 0u64, "hypercalls made");
    } else {
        check_eq!(
            r,
            Err(MsrError::Hypercall(Errno::EINVAL)),
            "non-canonical FS_BASE"
        );
        check_eq!(
            after.count_since(&before, nr::SET_SEGMENT_BASE),
            1u64,
            "set_segment_base calls"
        );
    }
    Ok(())
}

fn segment_base_reads_pass_through() -> TestResult {
    let value = 0x0000_1111_2222_3000u64;
    // SAFETY: FS is unused by the kernel.
    let got = unsafe { wrmsr_safe(MSR_FS_BASE, value) };
    check_eq!(got, Ok(()), "wrmsr_safe FS_BASE");
    // SAFETY: reading FS_BASE has no side effect.
    let (r, before, after) = traced(|| unsafe { rdmsr_safe(MSR_FS_BASE) });
    check_eq!(r, Ok(value), "rdmsr_safe FS_BASE");
    check_eq!(
        after.total_since(&before),
        0u64,
        "hypercalls made by a read"
    );
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    Ok(())
}

fn syscall_msr_writes_are_ignored() -> TestResult {
    for msr in SYSCALL_MSRS {
        let gp = traps::count(13);
        // SAFETY: the library ignores the write; nothing changes.
        let (r, before, after) = traced(|| unsafe { wrmsr_safe(msr, 0x1234) });
        check_eq!(r, Ok(()), "wrmsr_safe of a syscall MSR");
        check_eq!(after.total_since(&before), 0u64, "hypercalls made");
        // No WRMSR reached Xen either (it would have raised #GP, fixed up or not).
        check_eq!(traps::count(13) - gp, 0, "#GP taken");
        // The bare instruction would have faulted: the library changed the outcome.
        // SAFETY: Xen refuses the write.
        let got = unsafe { raw::wrmsr(msr, 0x1234) };
        check_eq!(got, Err(exinfo(13, 0)), "bare wrmsr");
    }
    Ok(())
}

fn apic_base_is_fixed_up() -> TestResult {
    // SAFETY: reading the APIC base has no side effect.
    let r = unsafe { rdmsr_safe(MSR_APIC_BASE) };
    // Enabled at 0xfee00000, no x2APIC, BSP only on vCPU 0.
    let bsp = if crate::smp::current_vcpu() == 0 {
        0x100
    } else {
        0
    };
    check_eq!(r, Ok(0xfee0_0800 | bsp), "APIC_BASE");
    Ok(())
}

fn efer_passes_through() -> TestResult {
    // SAFETY: reading EFER has no side effect.
    let (r, before, after) = traced(|| unsafe { rdmsr_safe(MSR_EFER) });
    check_eq!(r, raw::rdmsr(MSR_EFER).map_err(|_| GP_FAULT), "EFER");
    check!(r.is_ok(), "rdmsr_safe(EFER) failed: {r:?}");
    check_eq!(after.total_since(&before), 0u64, "hypercalls made");
    Ok(())
}

fn unknown_msr_faults_like_native() -> TestResult {
    // SAFETY: Xen refuses both accesses.
    let (r, before, after) = traced(|| unsafe { rdmsr_safe(MSR_BOGUS) });
    check_eq!(r, Err(GP_FAULT), "rdmsr_safe of an unknown MSR");
    // SAFETY: as above.
    let got = unsafe { wrmsr_safe(MSR_BOGUS, 1) };
    check_eq!(got, Err(GP_FAULT), "wrmsr_safe of an unknown MSR");
    check_eq!(after.total_since(&before), 0u64, "hypercalls made");
    Ok(())
}

/// One unchecked read site, called repeatedly.
#[inline(never)]
fn unchecked_read_site_a(msr: u32) -> u64 {
    // SAFETY: the MSRs read here have no side effects.
    unsafe { rdmsr(msr) }
}

/// Another unchecked read site.
#[inline(never)]
fn unchecked_read_site_b(msr: u32) -> u64 {
    // SAFETY: as above.
    unsafe { rdmsr(msr) }
}

const MSR_UNWARNED_A: u32 = 0xc002_0000;
const MSR_UNWARNED_B: u32 = 0xc002_0001;

/// One unchecked write site.
#[inline(never)]
fn unchecked_write_site(msr: u32, value: u64) {
    // SAFETY: the MSRs written here are unknown to Xen, which refuses the write.
    unsafe { xenmsr::wrmsr(msr, value) }
}

/// An unchecked failure warns once per kind (the instruction and the error), wherever it
/// happens: the same failing read again, at a second site (an unrolled loop's copies), or
/// of another MSR stays quiet; a failing write is another kind and warns. (Run right after
/// `init`, before any other unchecked access has failed.)
fn unchecked_fault_warns_once_per_kind() -> TestResult {
    let (w0, _, _) = crate::library::warnings();
    check_eq!(
        unchecked_read_site_a(MSR_UNWARNED_A),
        0u64,
        "first unchecked read"
    );
    let (w1, msr, site_a) = crate::library::warnings();
    check_eq!(w1 - w0, 1, "warnings after the first fault at site A");
    check_eq!(msr, MSR_UNWARNED_A, "warned MSR");
    check_eq!(
        unchecked_read_site_a(MSR_UNWARNED_A),
        0u64,
        "second unchecked read"
    );
    check_eq!(
        unchecked_read_site_b(MSR_UNWARNED_A),
        0u64,
        "the same read at site B"
    );
    check_eq!(
        unchecked_read_site_b(MSR_UNWARNED_B),
        0u64,
        "another MSR at site B"
    );
    check_eq!(
        crate::library::warnings().0 - w0,
        1,
        "warnings after more failing reads (one kind)"
    );
    unchecked_write_site(MSR_UNWARNED_B, 1);
    let (w2, msr, site_c) = crate::library::warnings();
    check_eq!(w2 - w0, 2, "warnings after a failing write (another kind)");
    check_eq!(msr, MSR_UNWARNED_B, "second warned MSR");
    check!(
        site_a != site_c,
        "both warnings name the same site {site_a:#x}"
    );
    // A good read at a site that warned still works.
    check_eq!(
        unchecked_read_site_a(MSR_APIC_BASE),
        0xfee0_0900u64,
        "APIC_BASE at site A"
    );
    Ok(())
}

/// Two words the segment-base test points FS and GS at.
static FS_TARGET: [u64; 2] = [0x1111_2222_3333_4444, 0];
static GS_TARGET: [u64; 2] = [0x5555_6666_7777_8888, 0];

fn read_fs0() -> u64 {
    let value: u64;
    // SAFETY: reads 8 bytes at FS base + 0, which the caller pointed at a static.
    unsafe {
        asm!("mov {}, qword ptr fs:[0]", out(reg) value, options(nostack, readonly, preserves_flags))
    };
    value
}

fn read_gs0() -> u64 {
    let value: u64;
    // SAFETY: reads 8 bytes at GS base + 0, which the caller pointed at a static.
    unsafe {
        asm!("mov {}, qword ptr gs:[0]", out(reg) value, options(nostack, readonly, preserves_flags))
    };
    value
}

/// The bases written through the library are the ones the CPU uses for `%fs:`/`%gs:`
/// accesses. (`KERNEL_GS_BASE` is the *user* GS base of a PV guest, live only in guest
/// user mode, which this kernel never enters: its read-back is checked above.)
fn segment_bases_take_effect_in_the_segment_registers() -> TestResult {
    let fs = FS_TARGET.as_ptr() as u64;
    let gs = GS_TARGET.as_ptr() as u64;
    // SAFETY: the kernel keeps no state in FS or GS; both point at statics until reset.
    let r = unsafe { wrmsr_safe(MSR_FS_BASE, fs) };
    check_eq!(r, Ok(()), "wrmsr_safe FS_BASE");
    // SAFETY: as above.
    let r = unsafe { wrmsr_safe(MSR_GS_BASE, gs) };
    check_eq!(r, Ok(()), "wrmsr_safe GS_BASE");
    check_eq!(read_fs0(), FS_TARGET[0], "%fs:0 after an FS_BASE write");
    check_eq!(read_gs0(), GS_TARGET[0], "%gs:0 after a GS_BASE write");
    // Point FS one word further: the effect follows every write.
    // SAFETY: as above.
    let r = unsafe { wrmsr_safe(MSR_FS_BASE, fs + 8) };
    check_eq!(r, Ok(()), "wrmsr_safe FS_BASE");
    check_eq!(
        read_fs0(),
        FS_TARGET[1],
        "%fs:0 after a second FS_BASE write"
    );
    reset_segment_bases();
    Ok(())
}

/// Points FS and GS back at 0.
fn reset_segment_bases() {
    // SAFETY: the kernel keeps no state in FS or GS.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    // SAFETY: as above.
    let _ = unsafe { wrmsr_safe(MSR_GS_BASE, 0) };
}

/// One write site that the test patches to the native instruction.
#[inline(never)]
fn side_native_site(msr: u32, value: u64) -> Result<(), MsrError> {
    // Distinct from `side_xen_site`, so the compiler cannot merge the two functions.
    black_box(0x6e61_7469_7665u64);
    // SAFETY: the callers write only FS_BASE (unused by the kernel) or an unknown MSR.
    unsafe { wrmsr_safe(msr, value) }
}

/// The same write, at a site left as Xen patched it (a call to the stub).
#[inline(never)]
fn side_xen_site(msr: u32, value: u64) -> Result<(), MsrError> {
    black_box(0x0078_656eu64);
    // SAFETY: as above.
    unsafe { wrmsr_safe(msr, value) }
}

/// The patch site inside `function` (the first record whose site lies in its first
/// 256 bytes).
fn site_in(function: usize) -> Option<xenmsr_asm::patch::PatchSite> {
    xenmsr_asm::patch::patch_sites().find(|s| (function..function + 256).contains(&s.addr))
}

/// Rewrites one site in place (the PV kernel's text is writable).
fn patch_one(site: &xenmsr_asm::patch::PatchSite, variant: Variant) -> TestResult {
    match xenmsr::patch::wanted_bytes(site, variant) {
        Ok(bytes) => {
            // SAFETY: `site` is a live patch site of this image, on the only vCPU, and
            // no other code is executing it.
            unsafe { xenmsr::patch::write_text_directly(site.addr, bytes.as_slice()) };
            Ok(())
        }
        Err(e) => fail!("patching {:#x}: {e:?}", site.addr),
    }
}

/// A native-patched site and a Xen-patched site of the same write, side by side: the
/// same results, but the native one reaches Xen as a trapped WRMSR (no hypercall), the
/// Xen one as a `set_segment_base` hypercall; a fault looks the same at both.
fn native_and_xen_sites_side_by_side() -> TestResult {
    let Some(native) = site_in(side_native_site as *const () as usize) else {
        fail!("no patch site in side_native_site");
    };
    let Some(xen) = site_in(side_xen_site as *const () as usize) else {
        fail!("no patch site in side_xen_site");
    };
    check!(native.addr != xen.addr, "the two probes share a site");
    // SAFETY: reading the site's own bytes.
    let emitted: [u8; 5] = unsafe { (native.addr as *const [u8; 5]).read() };
    patch_one(&native, Variant::Native(CpuFeatures::default()))?;
    let result = side_by_side();
    // Whatever happened, put the Xen variant back and check it is the emitted code.
    patch_one(&native, Variant::XenPv)?;
    // SAFETY: as above.
    let restored: [u8; 5] = unsafe { (native.addr as *const [u8; 5]).read() };
    check_eq!(restored, emitted, "site bytes after patching back");
    result
}

fn side_by_side() -> TestResult {
    let (a, b) = (0x0000_7000_0000_1000u64, 0x0000_7000_0000_2000u64);
    let gp = traps::count(13);
    let (r, before, after) = traced(|| side_native_site(MSR_FS_BASE, a));
    check_eq!(r, Ok(()), "native-patched FS_BASE write");
    check_eq!(
        after.total_since(&before),
        0u64,
        "hypercalls by the native site"
    );
    check_eq!(
        traps::count(13) - gp,
        0,
        "#GP at the native site (Xen emulated it)"
    );
    check_eq!(
        raw::rdmsr(MSR_FS_BASE),
        Ok(a),
        "FS_BASE after the native site"
    );
    let (r, before, after) = traced(|| side_xen_site(MSR_FS_BASE, b));
    check_eq!(r, Ok(()), "Xen-patched FS_BASE write");
    check_eq!(
        after.count_since(&before, nr::SET_SEGMENT_BASE),
        u64::from(!by_instruction(MSR_FS_BASE)),
        "set_segment_base by the Xen site (none with FSGSBASE)"
    );
    check_eq!(raw::rdmsr(MSR_FS_BASE), Ok(b), "FS_BASE after the Xen site");
    // A fault: one #GP at each, and the same error.
    let gp = traps::count(13);
    check_eq!(
        side_native_site(MSR_BOGUS, 1),
        Err(GP_FAULT),
        "native site, unknown MSR"
    );
    check_eq!(traps::count(13) - gp, 1, "#GP at the native site");
    let (gp, ud) = (traps::count(13), traps::count(6));
    check_eq!(
        side_xen_site(MSR_BOGUS, 1),
        Err(GP_FAULT),
        "Xen site, unknown MSR"
    );
    check_eq!(traps::count(13) - gp, 1, "#GP in the stub's native WRMSR");
    check_eq!(traps::count(6) - ud, 0, "#UD (no policy failure)");
    // SAFETY: the kernel keeps no state in FS.
    let _ = unsafe { wrmsr_safe(MSR_FS_BASE, 0) };
    Ok(())
}

/// xorshift64*: a small deterministic generator (the seed is printed, so a failure can be
/// replayed).
pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// MSRs the stress test draws from: every routing row, MSRs Xen emulates, PMU MSRs of
/// both vendors, and unknown ones. A random write to any of them is harmless to this
/// kernel: Xen refuses or drops it, or it lands in FS/GS, which the kernel does not use.
const STRESS_MSRS: [u32; 26] = [
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0x174,
    0x175,
    0x176,
    MSR_APIC_BASE,
    MSR_EFER,
    0x277, // PAT
    0x10,  // TSC
    0x1a0, // MISC_ENABLE
    0x8b,  // UCODE_REV
    0xce,  // PLATFORM_INFO
    0xc1,
    0x186,
    0x38f,
    0xc001_0000,
    0xc001_0004,
    0xc001_0200,
    0xc001_0201,
    MSR_BOGUS,
    0xc001_1234,
];

/// One random operation of the stress mix: a random index (from `STRESS_MSRS` or unknown),
/// value, counter and variant (safe and unchecked reads and writes, WRMSRNS, RDPMC, a
/// constant-index read).
#[derive(Clone, Copy, Debug)]
pub struct StressOp {
    msr: u32,
    value: u64,
    counter: u32,
    variant: u64,
}

impl StressOp {
    /// Draws the next operation.
    pub fn draw(rng: &mut Rng) -> StressOp {
        let msr = if rng.below(4) == 0 {
            0x1234_0000 + rng.below(0x1_0000) as u32 // unknown: Xen refuses both ways
        } else {
            STRESS_MSRS[rng.below(STRESS_MSRS.len() as u64) as usize]
        };
        let value = match rng.below(3) {
            0 => rng.next(),
            1 => rng.next() & 0x0000_7fff_ffff_f000, // canonical, page aligned
            _ => 0,
        };
        let counter = match rng.below(3) {
            0 => rng.below(8) as u32,
            1 => (1 << 30) | rng.below(4) as u32,
            _ => rng.next() as u32,
        };
        let variant = rng.below(8);
        StressOp {
            msr,
            value,
            counter,
            variant,
        }
    }

    /// Performs it through the library: the result of a safe variant, or the value an
    /// unchecked read or RDPMC gave (an unchecked write gives neither).
    pub fn perform(self) -> (Option<Result<u64, MsrError>>, Option<u64>) {
        let StressOp {
            msr,
            value,
            counter,
            variant,
        } = self;
        // Every MSR in the pool is harmless to write (see STRESS_MSRS), and RDPMC
        // emulation reads a counter MSR at most: that is the safety argument of each
        // access below.
        match variant {
            // SAFETY: see above.
            0 => (Some(unsafe { rdmsr_safe(msr) }), None),
            // SAFETY: see above.
            1 => (Some(unsafe { wrmsr_safe(msr, value) }.map(|()| 0)), None),
            // SAFETY: see above.
            2 => (
                Some(unsafe { xenmsr::wrmsr_ns_safe(msr, value) }.map(|()| 0)),
                None,
            ),
            // SAFETY: see above.
            3 => (Some(unsafe { xenmsr::rdpmc_safe(counter) }), None),
            // SAFETY: see above.
            4 => (None, Some(unsafe { rdmsr(msr) })),
            5 => {
                // SAFETY: see above.
                unsafe { xenmsr::wrmsr(msr, value) };
                (None, None)
            }
            // SAFETY: see above.
            6 => (None, Some(unsafe { xenmsr::rdpmc(counter) })),
            // SAFETY: see above.
            _ => (
                Some(unsafe { xenmsr::rdmsr_const_safe::<MSR_EFER>() }),
                None,
            ),
        }
    }
}

/// Tallies of the stress run.
#[derive(Default)]
struct Tally {
    ok: u64,
    gp_faults: u64,
    rewinds: u64,
    hypercall_errors: u64,
    invalid_counters: u64,
    unchecked_faults: u64,
    hypercalls: u64,
}

/// 100,000 random MSR operations (random index, value and variant) through the library:
/// no crash, and every exception accounted for: each operation's #GP/#UD count, hypercall
/// count and result must agree with each other.
fn stress_random_operations() -> TestResult {
    stress_ops("stress")
}

/// The stress itself; its report line starts with `what`.
pub(super) fn stress_ops(what: &str) -> TestResult {
    const OPS: u64 = 100_000;
    let vcpu = crate::smp::current_vcpu();
    let seed =
        0x5eed_0000_0000_0001 ^ crate::boot_info().start_info.nr_pages ^ u64::from(vcpu) << 40;
    crate::println!("  {what}: vCPU {vcpu}: seed {seed:#x}, {OPS} operations");
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    let (gp_start, ud_start) = (traps::count(13), traps::count(6));
    for i in 0..OPS {
        let op = StressOp::draw(&mut rng);
        let StressOp {
            msr,
            variant,
            value: _,
            counter: _,
        } = op;
        let (gp, ud) = (traps::count(13), traps::count(6));
        let before = tracepage::snapshot();
        let (safe, unchecked) = op.perform();
        if let Some(v) = unchecked
            && (traps::count(13) != gp || traps::count(6) != ud)
        {
            check_eq!(v, 0u64, "an unchecked read or RDPMC that faulted reads 0");
        }
        let after = tracepage::snapshot();
        let (dgp, dud) = (traps::count(13) - gp, traps::count(6) - ud);
        let hypercalls = after.total_since(&before);
        let segbase_write = matches!(variant, 1 | 2 | 5)
            && matches!(msr, MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE);
        // With FSGSBASE the FS and GS base writes are instructions, not hypercalls; a
        // non-canonical one is refused by the stub as the #GP WRFSBASE would raise.
        let refused_instruction = segbase_write && by_instruction(msr);
        let segbase_write = segbase_write && !by_instruction(msr);
        t.hypercalls += hypercalls;
        // Every Xen-routed operation makes exactly one hypercall; nothing else makes any.
        check_eq!(
            hypercalls,
            u64::from(segbase_write),
            "hypercalls of one operation"
        );
        match safe {
            Some(Ok(_)) => {
                check!(
                    dgp == 0 && dud == 0,
                    "op {i}: Ok after #GP {dgp} / #UD {dud}"
                );
                t.ok += 1;
            }
            Some(Err(MsrError::Fault { vector: 13 })) => {
                check!(
                    dgp == 1 || (refused_instruction && dgp == 0 && dud == 1),
                    "op {i}: Fault(13) after {dgp} #GP / {dud} #UD (msr {msr:#x})"
                );
                t.gp_faults += 1;
                t.rewinds += dud;
            }
            Some(Err(MsrError::Hypercall(_))) => {
                check!(
                    dud == 1 && dgp == 0 && segbase_write,
                    "op {i}: hypercall error after #GP {dgp} / #UD {dud}"
                );
                t.hypercall_errors += 1;
                t.rewinds += 1;
            }
            Some(Err(MsrError::InvalidCounter)) => {
                check!(
                    dud == 1 && dgp == 0 && variant == 3,
                    "op {i}: InvalidCounter"
                );
                t.invalid_counters += 1;
                t.rewinds += 1;
            }
            Some(Err(e)) => {
                fail!("op {i}: unexpected error {e:?} (msr {msr:#x}, variant {variant})")
            }
            None => {
                check!(
                    dgp <= 1 && dud <= 1,
                    "op {i}: #GP {dgp} / #UD {dud} for one access"
                );
                if dgp + dud > 0 {
                    t.unchecked_faults += 1;
                } else {
                    t.ok += 1;
                }
            }
        }
    }
    let (gp_total, ud_total) = (traps::count(13) - gp_start, traps::count(6) - ud_start);
    crate::println!(
        "  {what}: vCPU {vcpu}: {} ok, {} #GP faults, {} hypercall errors, {} invalid counters, {} unchecked faults; {} hypercalls; traps #GP {gp_total} #UD {ud_total}",
        t.ok,
        t.gp_faults,
        t.hypercall_errors,
        t.invalid_counters,
        t.unchecked_faults,
        t.hypercalls
    );
    check_eq!(
        t.ok + t.gp_faults + t.hypercall_errors + t.invalid_counters + t.unchecked_faults,
        OPS,
        "operations accounted for"
    );
    // Every #UD is a stub's rewind trap: one per policy failure (plus the unchecked ones).
    check!(
        ud_total >= t.rewinds,
        "#UD {ud_total} < rewinds {}",
        t.rewinds
    );
    reset_segment_bases();
    Ok(())
}
