//! Every variant of every patch site has the same instruction boundaries, so a live
//! re-patch never resumes a stopped vCPU inside an instruction.
//!
//! A vCPU can be stopped (parked by the kernel's stop-the-world, or interrupted by an
//! upcall that parks it) at any instruction boundary of the variant a site holds, after
//! Xen emulated a trapped instruction there (the next boundary), or inside a stub or the
//! hypercall page that the site's `call` entered (it resumes at the call's return
//! address). `xenmsr::repatch` may then write any other variant, so for every pair of
//! variants (A, B) of a site, every address a vCPU can be stopped at in A must be an
//! instruction boundary in B.
//!
//! The variants are computed by the production patcher (`wanted_bytes_with`) for every
//! site of this binary (an instance of every emitter for MSRs of every route), under every
//! CPU feature set and every Xen PV routing, plus the bytes the emitters wrote, and decoded
//! with iced-x86 (and, for the RDMSR/WRMSRNS immediate forms, which iced does not know,
//! their fixed 9-byte encoding).

use std::collections::BTreeSet;

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use xenmsr::patch::{CpuFeatures, Variant, XenRouting, wanted_bytes_with};
use xenmsr::pmu::{PmuLayout, raw_cpuid};
use xenmsr::routes::{
    MSR_APIC_BASE, MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR,
};
use xenmsr_asm::patch::{PatchOp, PatchSite, patch_sites};

const MSR_EFER: u32 = 0xc000_0080;
/// A PMU MSR of the Intel layout (IA32_PERFEVTSEL0) and of the AMD one (PERF_CTL0).
const MSR_PERFEVTSEL0: u32 = 0x186;
const MSR_AMD_PERF_CTL0: u32 = 0xc001_0000;
/// An MSR no route names.
const UNROUTED: u32 = 0x10;

macro_rules! const_sites {
    ($($msr:expr),*) => {{
        let mut sum = 0u64;
        $(
            // SAFETY: never run (see `every_site`).
            sum += unsafe { xenmsr::rdmsr_const::<{ $msr }>() };
            // SAFETY: never run.
            sum += unsafe { xenmsr::rdmsr_const_safe::<{ $msr }>() }.unwrap_or(0);
            // SAFETY: never run.
            unsafe { xenmsr::wrmsr_ns_const::<{ $msr }>(sum) };
            // SAFETY: never run.
            unsafe { xenmsr::wrmsr_ns_const_safe::<{ $msr }>(sum) }.ok();
        )*
        sum
    }};
}

/// Instantiates every emitter, the constant-index ones for an MSR of every route. Never
/// runs them (`run` is false); only their sites are inspected.
#[inline(never)]
fn every_site(run: bool) -> u64 {
    if !run {
        return 0;
    }
    // SAFETY: never run.
    let mut sum = unsafe { xenmsr::rdmsr(UNROUTED) };
    // SAFETY: never run.
    sum += unsafe { xenmsr::rdmsr_safe(UNROUTED) }.unwrap_or(0);
    // SAFETY: never run.
    unsafe { xenmsr::wrmsr(UNROUTED, sum) };
    // SAFETY: never run.
    unsafe { xenmsr::wrmsr_safe(UNROUTED, sum) }.ok();
    // SAFETY: never run.
    unsafe { xenmsr::wrmsr_ns(UNROUTED, sum) };
    // SAFETY: never run.
    unsafe { xenmsr::wrmsr_ns_safe(UNROUTED, sum) }.ok();
    // SAFETY: never run.
    sum += unsafe { xenmsr::rdpmc(0) };
    // SAFETY: never run.
    sum += unsafe { xenmsr::rdpmc_safe(0) }.unwrap_or(0);
    sum + const_sites!(
        MSR_FS_BASE,
        MSR_GS_BASE,
        MSR_KERNEL_GS_BASE,
        MSR_LSTAR,
        MSR_STAR,
        MSR_APIC_BASE,
        MSR_EFER,
        MSR_PERFEVTSEL0,
        MSR_AMD_PERF_CTL0,
        UNROUTED
    )
}

/// Every CPU feature set a native variant can be chosen for.
fn feature_sets() -> Vec<CpuFeatures> {
    let mut sets = Vec::new();
    for bits in 0..8 {
        sets.push(CpuFeatures {
            wrmsrns: bits & 1 != 0,
            msr_imm: bits & 2 != 0,
            fsgsbase: bits & 4 != 0,
        });
    }
    sets
}

/// Every routing a Xen PV variant can be chosen with: before and after `init`, with and
/// without the segment-base stubs, with and without FSGSBASE, for every PMU layout.
fn routings() -> Vec<XenRouting> {
    let amd = |leaf: u32, subleaf: u32| -> [u32; 4] {
        match leaf {
            // "AuthenticAMD", family 0x17.
            0 => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            1 => [0x0080_0f12, 0, 0, 0],
            0x8000_0000 => [0x8000_0022, 0, 0, 0],
            0x8000_0001 => [0, 0, 1 << 23, 0],
            _ => raw_cpuid(leaf, subleaf),
        }
    };
    let layouts = [
        None,
        Some(PmuLayout::None),
        Some(PmuLayout::from_cpuid(raw_cpuid)),
        Some(PmuLayout::from_cpuid(amd)),
    ];
    let mut routings = Vec::new();
    for layout in layouts {
        for direct_segbase in [false, true] {
            for fsgsbase in [false, true] {
                routings.push(XenRouting {
                    direct_segbase,
                    layout,
                    fsgsbase,
                });
            }
        }
    }
    routings
}

/// The immediate forms `rdmsr $imm32, %rax` (VEX.128.F2.M7.W0 F6 /0 id) and
/// `wrmsrns %rax, $imm32` (VEX.128.F3.M7.W0 F6 /0 id): 9 bytes each. iced-x86 does not
/// decode them.
const MSR_IMM_FORMS: [[u8; 5]; 2] = [
    [0xc4, 0xe7, 0x7b, 0xf6, 0xc0],
    [0xc4, 0xe7, 0x7a, 0xf6, 0xc0],
];

/// The decoded instructions of one variant.
struct Layout {
    /// Offsets of every instruction start, and of the end.
    boundaries: BTreeSet<usize>,
    /// Where a vCPU can be stopped: every boundary, and the return address of every call
    /// (a vCPU inside the callee resumes there).
    stops: BTreeSet<usize>,
}

fn decode(site: &PatchSite, bytes: &[u8]) -> Layout {
    let mut boundaries = BTreeSet::from([0]);
    let mut stops = BTreeSet::from([0]);
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let len = if MSR_IMM_FORMS.iter().any(|form| rest.starts_with(form)) {
            9
        } else {
            let ip = (site.addr + offset) as u64;
            let insn = Decoder::with_ip(64, rest, ip, DecoderOptions::NONE).decode();
            assert!(
                !insn.is_invalid(),
                "{site:?}: undecodable at +{offset}: {bytes:02x?}"
            );
            if insn.flow_control() == FlowControl::Call {
                // The callee returns right after the call.
                stops.insert(offset + insn.len());
            }
            insn.len()
        };
        offset += len;
        boundaries.insert(offset);
        stops.insert(offset);
    }
    assert_eq!(
        offset,
        bytes.len(),
        "{site:?}: the last instruction overruns the site: {bytes:02x?}"
    );
    Layout { boundaries, stops }
}

fn code(site: &PatchSite) -> Vec<u8> {
    // SAFETY: a patch site inside this executable's text, mapped readable and unmodified.
    unsafe { core::slice::from_raw_parts(site.addr as *const u8, usize::from(site.len)) }.to_vec()
}

#[test]
fn every_stop_point_of_every_variant_is_a_boundary_of_every_other() {
    assert_eq!(every_site(false), 0);
    let features = feature_sets();
    let routings = routings();
    let mut sites = 0;
    let mut pairs = 0;
    let mut kinds = BTreeSet::new();
    for site in patch_sites() {
        let op = site.op.expect("valid records");
        // The emitted bytes, then every variant the patcher can write.
        let mut variants: BTreeSet<Vec<u8>> = BTreeSet::from([code(&site)]);
        for &f in &features {
            for routing in &routings {
                for variant in [Variant::Native(f), Variant::XenPv] {
                    let bytes = wanted_bytes_with(&site, variant, routing)
                        .unwrap_or_else(|e| panic!("{site:?}: {e:?}"));
                    variants.insert(bytes.as_slice().to_vec());
                }
            }
        }
        let layouts: Vec<_> = variants
            .iter()
            .map(|bytes| (bytes, decode(&site, bytes)))
            .collect();
        for (a, layout_a) in &layouts {
            for (b, layout_b) in &layouts {
                let stranded: Vec<_> = layout_a
                    .stops
                    .difference(&layout_b.boundaries)
                    .copied()
                    .collect();
                assert!(
                    stranded.is_empty(),
                    "{op:?} site of MSR {:#x} at {:#x}: a vCPU stopped at +{stranded:?} in \
                     {a:02x?} resumes inside an instruction of {b:02x?}",
                    site.imm,
                    site.addr
                );
                pairs += 1;
            }
        }
        kinds.insert((op as u8, variants.len()));
        sites += 1;
    }
    // Every op is here, and the constant-index sites have their many variants.
    for op in [
        PatchOp::Read,
        PatchOp::Write,
        PatchOp::WriteNs,
        PatchOp::Rdpmc,
        PatchOp::ReadImm,
        PatchOp::WriteImm,
    ] {
        assert!(
            kinds.iter().any(|&(o, _)| o == op as u8),
            "no {op:?} site in this binary"
        );
    }
    let most = kinds.iter().map(|&(_, n)| n).max().unwrap_or(0);
    assert!(most >= 6, "only {most} variants of a site: {kinds:?}");
    eprintln!("{sites} sites, {pairs} variant pairs checked");
}
