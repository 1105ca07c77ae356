//! The bytes of every patch variant, decoded with a real disassembler.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use xenmsr::patch::{CpuFeatures, PatchError, Variant, site_bytes, site_len};
use xenmsr_asm::patch::SiteOp;

const SITE: usize = 0xffff_8000_0010_0000;
const STUB: usize = 0xffff_8000_0020_0040;
const MSR: u32 = 0xc000_0100;

const ALL_OPS: [SiteOp; 6] = [
    SiteOp::Read,
    SiteOp::Write,
    SiteOp::WriteNs,
    SiteOp::Rdpmc,
    SiteOp::ReadImm,
    SiteOp::WriteImm,
];

fn features(wrmsrns: bool, msr_imm: bool) -> CpuFeatures {
    CpuFeatures {
        wrmsrns,
        msr_imm,
        fsgsbase: false,
    }
}

fn all_variants() -> Vec<Variant> {
    let mut v = vec![Variant::XenPv];
    for wrmsrns in [false, true] {
        for msr_imm in [false, true] {
            v.push(Variant::Native(features(wrmsrns, msr_imm)));
        }
    }
    v
}

fn decode(bytes: &[u8]) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, SITE as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        assert!(!insn.is_invalid(), "invalid encoding in {bytes:02x?}");
        out.push(insn);
    }
    out
}

fn mnemonics(insns: &[Instruction]) -> Vec<Mnemonic> {
    insns.iter().map(Instruction::mnemonic).collect()
}

#[test]
fn every_variant_fills_its_site_exactly() {
    for op in ALL_OPS {
        for variant in all_variants() {
            let bytes = site_bytes(op, SITE, site_len(op), MSR, STUB, variant).unwrap();
            assert_eq!(bytes.as_slice().len(), site_len(op), "{op:?} {variant:?}");
            let is_imm_form = matches!(variant, Variant::Native(f) if f.msr_imm)
                && matches!(op, SiteOp::ReadImm | SiteOp::WriteImm);
            if is_imm_form {
                continue; // checked by `immediate_forms_encode_the_index`
            }
            let insns = decode(bytes.as_slice());
            let total: usize = insns.iter().map(Instruction::len).sum();
            assert_eq!(total, site_len(op), "{op:?} {variant:?}: {insns:?}");
        }
    }
}

#[test]
fn xen_variant_is_one_call_ending_at_the_site_end() {
    for op in ALL_OPS {
        let bytes = site_bytes(op, SITE, site_len(op), MSR, STUB, Variant::XenPv).unwrap();
        let insns = decode(bytes.as_slice());
        assert_eq!(
            mnemonics(&insns),
            vec![Mnemonic::Call],
            "{op:?}: one instruction"
        );
        assert_eq!(insns[0].len(), site_len(op), "{op:?}");
        assert_eq!(insns[0].ip(), SITE as u64);
        assert_eq!(insns[0].near_branch_target(), STUB as u64, "{op:?}");
        // The `call rel32` itself is CALL_LEN bytes; a 9-byte site's has CS prefixes.
        let prefixes = site_len(op) - xenmsr_asm::CALL_LEN;
        assert_eq!(
            &bytes.as_slice()[..prefixes],
            &vec![0x2e; prefixes][..],
            "{op:?}"
        );
        assert_eq!(bytes.as_slice()[prefixes], 0xe8, "{op:?}");
    }
}

#[test]
fn native_register_sites_are_the_instruction_with_cs_prefixes() {
    let plain = Variant::Native(features(false, false));
    let ns = Variant::Native(features(true, false));
    let cases = [
        (SiteOp::Read, plain, Mnemonic::Rdmsr, 3),
        (SiteOp::Write, plain, Mnemonic::Wrmsr, 3),
        (SiteOp::Write, ns, Mnemonic::Wrmsr, 3),
        (SiteOp::WriteNs, plain, Mnemonic::Wrmsr, 3),
        (SiteOp::WriteNs, ns, Mnemonic::Wrmsrns, 2),
        (SiteOp::Rdpmc, plain, Mnemonic::Rdpmc, 3),
    ];
    for (op, variant, mnemonic, prefixes) in cases {
        let bytes = site_bytes(op, SITE, site_len(op), MSR, STUB, variant).unwrap();
        let insns = decode(bytes.as_slice());
        assert_eq!(
            mnemonics(&insns),
            vec![mnemonic],
            "{op:?} {variant:?}: one instruction"
        );
        assert!(insns[0].has_segment_prefix() || prefixes == 0);
        assert_eq!(
            &bytes.as_slice()[..prefixes],
            &vec![0x2e; prefixes][..],
            "CS prefixes"
        );
    }
}

#[test]
fn constant_index_sites_without_msr_imm() {
    // One instruction each (the site's boundaries are its start and end, as the Xen
    // variant's), padded with CS prefixes; a read's value is folded after the site.
    let read = site_bytes(
        SiteOp::ReadImm,
        SITE,
        9,
        MSR,
        STUB,
        Variant::Native(features(false, false)),
    )
    .unwrap();
    assert_eq!(mnemonics(&decode(read.as_slice())), vec![Mnemonic::Rdmsr]);
    assert_eq!(&read.as_slice()[..7], &[0x2e; 7]);
    let write = |f| site_bytes(SiteOp::WriteImm, SITE, 9, MSR, STUB, Variant::Native(f)).unwrap();
    assert_eq!(
        mnemonics(&decode(write(features(false, false)).as_slice())),
        vec![Mnemonic::Wrmsr]
    );
    assert_eq!(
        mnemonics(&decode(write(features(true, false)).as_slice())),
        vec![Mnemonic::Wrmsrns]
    );
}

#[test]
fn immediate_forms_encode_the_index() {
    for msr in [0u32, 0x1b, 0xc000_0100, u32::MAX] {
        let imm = msr.to_le_bytes();
        let read = site_bytes(
            SiteOp::ReadImm,
            SITE,
            9,
            msr,
            STUB,
            Variant::Native(features(false, true)),
        )
        .unwrap();
        assert_eq!(
            read.as_slice()[..5],
            [0xc4, 0xe7, 0x7b, 0xf6, 0xc0],
            "RDMSR imm → rax"
        );
        assert_eq!(read.as_slice()[5..], imm, "index at site + 5");
        let write = site_bytes(
            SiteOp::WriteImm,
            SITE,
            9,
            msr,
            STUB,
            Variant::Native(features(true, true)),
        )
        .unwrap();
        assert_eq!(
            write.as_slice()[..5],
            [0xc4, 0xe7, 0x7a, 0xf6, 0xc0],
            "WRMSRNS imm ← rax"
        );
        assert_eq!(write.as_slice()[5..], imm);
    }
}

#[test]
fn bad_records_are_rejected() {
    for op in ALL_OPS {
        for len in [0, 2, 4, 6, 8, 10, 255] {
            if len == site_len(op) {
                continue;
            }
            assert_eq!(
                site_bytes(op, SITE, len, MSR, STUB, Variant::XenPv),
                Err(PatchError::BadLength { site: SITE, len }),
                "{op:?} len {len}"
            );
        }
    }
    let far_stub = SITE + (1 << 33);
    assert_eq!(
        site_bytes(SiteOp::Read, SITE, 5, MSR, far_stub, Variant::XenPv),
        Err(PatchError::OutOfReach { site: SITE })
    );
}

#[test]
fn cpuid_feature_bits() {
    let leaf = |eax7_1: u32, ecx7_1: u32, max_subleaf: u32| {
        move |leaf: u32, subleaf: u32| match (leaf, subleaf) {
            (0, _) => [0x20, 0, 0, 0],
            (7, 0) => [max_subleaf, 0, 0, 0],
            (7, 1) => [eax7_1, 0, ecx7_1, 0],
            _ => [0; 4],
        }
    };
    assert_eq!(
        CpuFeatures::from_cpuid(leaf(0, 0, 1)),
        features(false, false)
    );
    assert_eq!(
        CpuFeatures::from_cpuid(leaf(1 << 19, 0, 1)),
        features(true, false)
    );
    assert_eq!(
        CpuFeatures::from_cpuid(leaf(0, 1 << 5, 1)),
        features(false, true)
    );
    assert_eq!(
        CpuFeatures::from_cpuid(leaf(1 << 19, 1 << 5, 1)),
        features(true, true)
    );
    // Subleaf 1 not reported: no features even if the bits read as set.
    assert_eq!(
        CpuFeatures::from_cpuid(leaf(1 << 19, 1 << 5, 0)),
        features(false, false)
    );
    // Leaf 7 not reported.
    assert_eq!(
        CpuFeatures::from_cpuid(|_, _| [1, u32::MAX, u32::MAX, u32::MAX]),
        features(false, false)
    );
}

/// One corrupt record among good ones: nothing is written, and the error names it.
#[test]
fn a_corrupt_record_leaves_every_site_untouched() {
    use xenmsr::patch::patch_sites;
    use xenmsr_asm::patch::PatchSite;

    // Sites in a buffer of our own, so the check can read them.
    let buffer = [0x90u8; 64];
    let base = buffer.as_ptr() as usize;
    let good = PatchSite {
        addr: base,
        len: 5,
        op: Some(SiteOp::Read),
        flags: 0,
        imm: 0,
    };
    let bad_len = PatchSite {
        addr: base + 16,
        len: 7,
        ..good
    };
    let unknown_op = PatchSite {
        addr: base + 32,
        op: None,
        ..good
    };
    for bad in [bad_len, unknown_op] {
        let sites = [good, bad];
        let mut writes = 0;
        // SAFETY: every site lies in `buffer`, which nothing executes; the writer only
        // counts, so nothing is stored.
        let r = unsafe {
            // Native bytes do not depend on where the buffer lies (a `call` would need the
            // stub within rel32 reach), so only the bad record can fail.
            patch_sites(
                sites.iter().copied(),
                Variant::Native(CpuFeatures::default()),
                &mut |_, _| writes += 1,
            )
        };
        assert!(
            matches!(r, Err(PatchError::BadLength { site, .. }) if site == bad.addr),
            "{r:?}"
        );
        assert_eq!(writes, 0, "no site written when any record is bad");
    }
    assert!(buffer.iter().all(|&b| b == 0x90));
}
