//! Every native variant of every op, executed in ring 3 at a real patch site of this
//! binary, rewritten by the shim's patcher.
//!
//! Each case owns one `#[inline(never)]` probe function holding exactly one emitter call.
//! The test finds that site's record, makes its page writable, patches it (through
//! `xenmsr::patch::patch_sites` with a one-site iterator) for the case's variant, runs the
//! probe, and checks that the production fixup handled the fault exactly as the site's
//! extable kind says:
//!
//! - `rdmsr`, `wrmsr` (and `rdpmc` unless this host sets CR4.PCE) raise `#GP` in ring 3
//!   (SIGSEGV, vector 13);
//! - `wrmsrns` and the immediate forms raise `#UD` (SIGILL, vector 6) on a CPU without
//!   them (CPUID.(7,1)), and `#GP` on one with them. Either way the fault is at the site
//!   start and the site's one extable entry covers it: this is the extable coverage of the
//!   immediate forms.
//!
//! A checked site gives `Err(Fault { vector })`; an unchecked one gives 0 (a write is
//! dropped) and warns once. Patching the same variant again rewrites nothing, and patching
//! back to the Xen variant restores the emitted bytes exactly (and the stub path works
//! again).

use std::collections::HashSet;
use std::sync::Mutex;

use xenmsr::patch::{CpuFeatures, PatchReport, Variant, patch_sites as patch, site_bytes};
use xenmsr_asm::fixup::AccessOp;
use xenmsr_asm::patch::{FLAG_SAFE, PatchOp, PatchSite, patch_sites};
use xenmsr_asm::{MsrError, Outcome, VECTOR_GP, VECTOR_UD, site};
use xenmsr_host_tests::{
    Op, fixups, install, last_call, native_rdpmc_probe, set_script, take_warnings,
};

/// The MSR every probe accesses (TSC: any index faults in ring 3).
const MSR: u32 = 0x10;
/// The value every write probe writes: distinct halves, so a lost half shows.
const VALUE: u64 = 0x1234_5678_9abc_def0;
/// The RDPMC counter the rdpmc probes read.
const COUNTER: u32 = 0;

/// A probe: runs its one site with `(MSR or counter, value)`. Unchecked reads return
/// `Ok(value read)`, unchecked writes `Ok(0)`.
type Probe = fn(u32, u64) -> Result<u64, MsrError>;

/// Makes each probe's code unique: identical probes would be merged into one function
/// (and so one site) by an optimised build.
#[inline(always)]
fn distinct(name: &'static str) {
    core::hint::black_box(name);
}

macro_rules! probe {
    ($name:ident, read) => {
        #[inline(never)]
        fn $name(msr: u32, _: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: in ring 3 the access faults (or reaches the scripted backend) and is
            // fixed up; it cannot change the host.
            Ok(unsafe { site::rdmsr(msr) })
        }
    };
    ($name:ident, read_safe) => {
        #[inline(never)]
        fn $name(msr: u32, _: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::rdmsr_safe(msr) }
        }
    };
    ($name:ident, write) => {
        #[inline(never)]
        fn $name(msr: u32, value: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::wrmsr(msr, value) };
            Ok(0)
        }
    };
    ($name:ident, write_safe) => {
        #[inline(never)]
        fn $name(msr: u32, value: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::wrmsr_safe(msr, value) }.map(|()| 0)
        }
    };
    ($name:ident, write_ns) => {
        #[inline(never)]
        fn $name(msr: u32, value: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::wrmsr_ns(msr, value) };
            Ok(0)
        }
    };
    ($name:ident, write_ns_safe) => {
        #[inline(never)]
        fn $name(msr: u32, value: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::wrmsr_ns_safe(msr, value) }.map(|()| 0)
        }
    };
    ($name:ident, rdpmc) => {
        #[inline(never)]
        fn $name(counter: u32, _: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above; RDPMC has no side effects.
            Ok(unsafe { site::rdpmc(counter) })
        }
    };
    ($name:ident, rdpmc_safe) => {
        #[inline(never)]
        fn $name(counter: u32, _: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::rdpmc_safe(counter) }
        }
    };
    ($name:ident, read_imm) => {
        #[inline(never)]
        fn $name(_: u32, _: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            Ok(unsafe { site::rdmsr_const::<MSR>() })
        }
    };
    ($name:ident, read_imm_safe) => {
        #[inline(never)]
        fn $name(_: u32, _: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::rdmsr_const_safe::<MSR>() }
        }
    };
    ($name:ident, write_imm) => {
        #[inline(never)]
        fn $name(_: u32, value: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::wrmsr_ns_const::<MSR>(value) };
            Ok(0)
        }
    };
    ($name:ident, write_imm_safe) => {
        #[inline(never)]
        fn $name(_: u32, value: u64) -> Result<u64, MsrError> {
            distinct(stringify!($name));
            // SAFETY: as above.
            unsafe { site::wrmsr_ns_const_safe::<MSR>(value) }.map(|()| 0)
        }
    };
}

// One probe per (op, checked?, variant), each a call site of its own. Warnings are once
// per kind of failure (op, error) for the whole process, so `check_case` runs the cases
// one at a time and predicts each warning from the kinds that have warned before.
probe!(read_plain, read);
probe!(read_plain_safe, read_safe);
probe!(write_plain, write);
probe!(write_plain_safe, write_safe);
probe!(write_ns_plain, write_ns);
probe!(write_ns_plain_safe, write_ns_safe);
probe!(write_ns_wrmsrns, write_ns);
probe!(write_ns_wrmsrns_safe, write_ns_safe);
probe!(rdpmc_plain, rdpmc);
probe!(rdpmc_plain_safe, rdpmc_safe);
probe!(read_imm_plain, read_imm);
probe!(read_imm_plain_safe, read_imm_safe);
probe!(read_imm_msr_imm, read_imm);
probe!(read_imm_msr_imm_safe, read_imm_safe);
probe!(write_imm_plain, write_imm);
probe!(write_imm_plain_safe, write_imm_safe);
probe!(write_imm_wrmsrns, write_imm);
probe!(write_imm_wrmsrns_safe, write_imm_safe);
probe!(write_imm_msr_imm, write_imm);
probe!(write_imm_msr_imm_safe, write_imm_safe);

/// Which instruction a native variant puts at the site start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Insn {
    Rdmsr,
    Wrmsr,
    Rdpmc,
    Wrmsrns,
    RdmsrImm,
    WrmsrnsImm,
}

impl Insn {
    /// The instruction's encoding after any legacy prefixes (facts §4.6 and §6 fact 22),
    /// written out here independently of the patcher's tables.
    fn encoding(self) -> &'static [u8] {
        match self {
            Insn::Rdmsr => &[0x0f, 0x32],
            Insn::Wrmsr => &[0x0f, 0x30],
            Insn::Rdpmc => &[0x0f, 0x33],
            Insn::Wrmsrns => &[0x0f, 0x01, 0xc6],
            Insn::RdmsrImm => &[0xc4, 0xe7, 0x7b, 0xf6, 0xc0],
            Insn::WrmsrnsImm => &[0xc4, 0xe7, 0x7a, 0xf6, 0xc0],
        }
    }
}

struct Case {
    name: &'static str,
    probe: Probe,
    op: PatchOp,
    safe: bool,
    features: CpuFeatures,
    insn: Insn,
}

const PLAIN: CpuFeatures = CpuFeatures {
    wrmsrns: false,
    msr_imm: false,
    fsgsbase: false,
};
const WRMSRNS: CpuFeatures = CpuFeatures {
    wrmsrns: true,
    msr_imm: false,
    fsgsbase: false,
};
const MSR_IMM: CpuFeatures = CpuFeatures {
    wrmsrns: true,
    msr_imm: true,
    fsgsbase: false,
};

macro_rules! cases {
    ($($probe:ident, $safe_probe:ident, $op:ident, $features:ident, $insn:ident;)*) => {
        [$(
            Case {
                name: stringify!($probe),
                probe: $probe,
                op: PatchOp::$op,
                safe: false,
                features: $features,
                insn: Insn::$insn,
            },
            Case {
                name: stringify!($safe_probe),
                probe: $safe_probe,
                op: PatchOp::$op,
                safe: true,
                features: $features,
                insn: Insn::$insn,
            },
        )*]
    };
}

fn all_cases() -> [Case; 20] {
    cases![
        read_plain, read_plain_safe, Read, PLAIN, Rdmsr;
        write_plain, write_plain_safe, Write, PLAIN, Wrmsr;
        write_ns_plain, write_ns_plain_safe, WriteNs, PLAIN, Wrmsr;
        write_ns_wrmsrns, write_ns_wrmsrns_safe, WriteNs, WRMSRNS, Wrmsrns;
        rdpmc_plain, rdpmc_plain_safe, Rdpmc, PLAIN, Rdpmc;
        read_imm_plain, read_imm_plain_safe, ReadImm, PLAIN, Rdmsr;
        read_imm_msr_imm, read_imm_msr_imm_safe, ReadImm, MSR_IMM, RdmsrImm;
        write_imm_plain, write_imm_plain_safe, WriteImm, PLAIN, Wrmsr;
        write_imm_wrmsrns, write_imm_wrmsrns_safe, WriteImm, WRMSRNS, Wrmsrns;
        write_imm_msr_imm, write_imm_msr_imm_safe, WriteImm, MSR_IMM, WrmsrnsImm;
    ]
}

/// What this CPU has, read with CPUID directly (not through the shim's detection).
fn host_features() -> CpuFeatures {
    use core::arch::x86_64::__cpuid_count;
    if __cpuid_count(0, 0).eax < 7 || __cpuid_count(7, 0).eax < 1 {
        return PLAIN;
    }
    let leaf = __cpuid_count(7, 1);
    CpuFeatures {
        wrmsrns: leaf.eax & (1 << 19) != 0,
        msr_imm: leaf.ecx & (1 << 5) != 0,
        fsgsbase: false,
    }
}

/// What executing `insn` in ring 3 does on this host: `Some(vector)` it faults, `None` it
/// runs (RDPMC with CR4.PCE).
fn expected_vector(insn: Insn) -> Option<u8> {
    let host = host_features();
    match insn {
        Insn::Rdmsr | Insn::Wrmsr => Some(VECTOR_GP),
        Insn::Rdpmc => native_rdpmc_probe(COUNTER).err().map(|e| match e {
            MsrError::Fault { vector } => vector,
            other => panic!("the raw RDPMC probe failed with {other:?}"),
        }),
        // Unsupported: #UD. Supported: privileged, so #GP in ring 3.
        Insn::Wrmsrns if host.wrmsrns => Some(VECTOR_GP),
        Insn::RdmsrImm | Insn::WrmsrnsImm if host.msr_imm => Some(VECTOR_GP),
        Insn::Wrmsrns | Insn::RdmsrImm | Insn::WrmsrnsImm => Some(VECTOR_UD),
    }
}

/// Serialises the tests of this binary: they change page protections of shared text
/// pages, and restore them, around each patch.
static TEXT: Mutex<()> = Mutex::new(());

/// Stores `bytes` at `address` in this binary's text.
fn write_text(address: usize, bytes: &[u8]) {
    // SAFETY: `address..+len` is a probe site of this binary that no thread is running
    // (the `TEXT` lock is held, and only this test's probes run these sites).
    unsafe { xenmsr_host_tests::write_text_mprotect(address, bytes) }
}

fn patch_one(site: PatchSite, variant: Variant) -> PatchReport {
    // SAFETY: `site` is a live patch site of this image, and no other thread runs it (the
    // `TEXT` lock is held by the caller).
    unsafe { patch(std::iter::once(site), variant, &mut write_text) }
        .unwrap_or_else(|e| panic!("patching {site:?} for {variant:?}: {e:?}"))
}

fn code(site: &PatchSite) -> Vec<u8> {
    // SAFETY: the site lies in this binary's text, mapped readable for the whole run.
    unsafe { core::slice::from_raw_parts(site.addr as *const u8, usize::from(site.len)) }.to_vec()
}

/// The record of the one site inside `probe`: the first site of `op` and safety at or
/// after the function's entry.
fn site_of(probe: Probe, op: PatchOp, safe: bool) -> PatchSite {
    let entry = probe as usize;
    let site = patch_sites()
        .filter(|s| s.op == Some(op) && (s.flags & FLAG_SAFE != 0) == safe && s.addr >= entry)
        .min_by_key(|s| s.addr)
        .unwrap_or_else(|| panic!("no {op:?} site after {entry:#x}"));
    assert!(
        site.addr - entry < 4096,
        "{site:?} is not plausibly inside the probe at {entry:#x}"
    );
    site
}

fn access_op(op: PatchOp) -> AccessOp {
    match op {
        PatchOp::Read | PatchOp::ReadImm => AccessOp::Read,
        PatchOp::Write | PatchOp::WriteNs | PatchOp::WriteImm => AccessOp::Write,
        PatchOp::Rdpmc => AccessOp::Rdpmc,
    }
}

fn is_write(op: PatchOp) -> bool {
    access_op(op) == AccessOp::Write
}

/// The kinds of failure that have warned in this process (mirroring the library's rule),
/// held while a case runs so that the cases run one at a time.
static WARNED_KINDS: std::sync::LazyLock<Mutex<HashSet<(AccessOp, MsrError)>>> =
    std::sync::LazyLock::new(|| Mutex::new(HashSet::new()));

/// Runs `probe` and returns its result with the (SIGILL, SIGSEGV) fixups it caused.
fn run(case: &Case, index: u32) -> (Result<u64, MsrError>, (u64, u64)) {
    let (ill0, segv0) = fixups();
    let result = (case.probe)(index, VALUE);
    let (ill1, segv1) = fixups();
    (result, (ill1 - ill0, segv1 - segv0))
}

fn check_case(case: &Case) {
    let site = site_of(case.probe, case.op, case.safe);
    let index = if case.op == PatchOp::Rdpmc {
        COUNTER
    } else {
        MSR
    };
    if matches!(case.op, PatchOp::ReadImm | PatchOp::WriteImm) {
        assert_eq!(site.imm, MSR, "{}: {site:?}", case.name);
    }
    let emitted = code(&site);
    let variant = Variant::Native(case.features);

    // The patcher's bytes: the instruction (after padding prefixes) at the site start.
    let wanted = site_bytes(
        case.op,
        site.addr,
        usize::from(site.len),
        site.imm,
        case.op.stub().addr(),
        variant,
    )
    .unwrap_or_else(|e| panic!("{}: {e:?}", case.name));
    let prefixes = wanted.as_slice().iter().take_while(|&&b| b == 0x2e).count();
    assert!(
        wanted.as_slice()[prefixes..].starts_with(case.insn.encoding()),
        "{}: {:02x?} does not start with {:?}",
        case.name,
        wanted.as_slice(),
        case.insn
    );
    if matches!(case.insn, Insn::RdmsrImm | Insn::WrmsrnsImm) {
        assert_eq!(
            wanted.as_slice()[5..],
            MSR.to_le_bytes(),
            "{}: the immediate is the MSR",
            case.name
        );
    }

    // Patch, and patch again: the second pass changes nothing.
    let report = patch_one(site, variant);
    assert_eq!(
        (report.rewritten, report.unchanged),
        (1, 0),
        "{}",
        case.name
    );
    assert_eq!(code(&site), wanted.as_slice(), "{}", case.name);
    let report = patch_one(site, variant);
    assert_eq!(
        (report.rewritten, report.unchanged),
        (0, 1),
        "{}",
        case.name
    );

    // Execute it twice in ring 3, alone: whether an unchecked failure warns depends on the
    // kinds of failure that warned before it in this process.
    let mut warned_kinds = WARNED_KINDS.lock().unwrap_or_else(|e| e.into_inner());
    let vector = expected_vector(case.insn);
    let _ = take_warnings();
    let calls_before = xenmsr_host_tests::calls();
    for round in 0..2 {
        let (result, faults) = run(case, index);
        let what = format!("{} (round {round}, {:?})", case.name, case.insn);
        match vector {
            Some(vector) => {
                let expected_faults = if vector == VECTOR_UD { (1, 0) } else { (0, 1) };
                assert_eq!(faults, expected_faults, "{what}: one fixup of the fault");
                if case.safe {
                    assert_eq!(result, Err(MsrError::Fault { vector }), "{what}");
                } else {
                    assert_eq!(result, Ok(0), "{what}: an unchecked access gives 0");
                }
            }
            None => {
                assert_eq!(faults, (0, 0), "{what}: RDPMC runs on this host");
                assert!(result.is_ok(), "{what}: {result:?}");
            }
        }
        let warnings = take_warnings();
        let new_kind = |vector: u8, kinds: &mut HashSet<(AccessOp, MsrError)>| {
            kinds.insert((access_op(case.op), MsrError::Fault { vector }))
        };
        match (vector, case.safe, round) {
            (Some(vector), false, 0) if new_kind(vector, &mut warned_kinds) => {
                assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
                let w = warnings[0];
                assert_eq!(w.site, site.addr, "{what}: the warning names the site");
                assert_eq!(w.op, access_op(case.op), "{what}");
                assert_eq!(w.msr_or_counter, index, "{what}");
                assert_eq!(w.error, MsrError::Fault { vector }, "{what}");
                let value = if is_write(case.op) { VALUE } else { 0 };
                assert_eq!(w.value, value, "{what}");
            }
            _ => assert!(warnings.is_empty(), "{what}: {warnings:?}"),
        }
    }
    assert_eq!(
        xenmsr_host_tests::calls(),
        calls_before,
        "{}: a native variant never reaches the backend",
        case.name
    );

    // Back to the Xen variant: exactly the emitted bytes, and the stub path works again.
    let report = patch_one(site, Variant::XenPv);
    assert_eq!(
        (report.rewritten, report.unchanged),
        (1, 0),
        "{}",
        case.name
    );
    assert_eq!(code(&site), emitted, "{}: Xen variant restored", case.name);
    let answer = 0xfeed_0000_0000_0042;
    set_script(Outcome::Done(answer));
    let (result, faults) = run(case, index);
    assert_eq!(faults, (0, 0), "{}", case.name);
    let call = last_call().unwrap_or_else(|| panic!("{}: the stub was not called", case.name));
    if is_write(case.op) {
        assert_eq!(result, Ok(0), "{}", case.name);
        assert_eq!(
            (call.op, call.msr, call.value),
            (Op::Write, index, VALUE),
            "{}",
            case.name
        );
    } else {
        assert_eq!(result, Ok(answer), "{}", case.name);
        let op = if case.op == PatchOp::Rdpmc {
            Op::Rdpmc
        } else {
            Op::Read
        };
        assert_eq!((call.op, call.msr), (op, index), "{}", case.name);
    }
}

fn check_op(op: PatchOp) {
    install();
    let _text = TEXT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cases: Vec<_> = all_cases().into_iter().filter(|c| c.op == op).collect();
    assert!(!cases.is_empty());
    for case in &cases {
        check_case(case);
    }
}

#[test]
fn every_probe_has_its_own_site() {
    install();
    let cases = all_cases();
    let mut addrs: Vec<_> = cases
        .iter()
        .map(|c| site_of(c.probe, c.op, c.safe).addr)
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), cases.len(), "two probes share a site");
    let host = host_features();
    eprintln!(
        "CPUID.(7,1): WRMSRNS {}, MSR_IMM {}",
        host.wrmsrns, host.msr_imm
    );
    assert_eq!(
        host,
        CpuFeatures::detect(),
        "the shim's detection agrees with CPUID"
    );
}

#[test]
fn read_variants() {
    check_op(PatchOp::Read);
}

#[test]
fn write_variants() {
    check_op(PatchOp::Write);
}

#[test]
fn write_ns_variants() {
    check_op(PatchOp::WriteNs);
}

#[test]
fn rdpmc_variants() {
    check_op(PatchOp::Rdpmc);
}

#[test]
fn read_imm_variants() {
    check_op(PatchOp::ReadImm);
}

#[test]
fn write_imm_variants() {
    check_op(PatchOp::WriteImm);
}
