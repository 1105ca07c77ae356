//! The linked image: the extable and patch-site sections survive linking (debug and
//! release), every patch site is one direct `call` to the right stub that ends at the end
//! of the region (a `call rel32` of exactly `CALL_LEN` bytes, after `IMM_CALL_PREFIX` in a
//! 9-byte constant-index site), and every site and stub instruction has its extable entry.

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
use xenmsr_asm::extable::{self, Kind, flags};
use xenmsr_asm::patch::{FLAG_SAFE, PatchOp, patch_sites};
use xenmsr_asm::stubs::{REWIND_ERROR, REWIND_NATIVE, REWIND_RESTORE_RAX, Stub};
use xenmsr_asm::{CALL_LEN, IMM_CALL_PREFIX, IMM_SITE_LEN, Outcome, SITE_LEN, site};
use xenmsr_host_tests::{install, set_script};

/// Instantiates every emitter at least once, so this binary has a site of each op and
/// kind. Never called with a backend that lets the access reach hardware unchecked.
#[inline(never)]
fn every_emitter(run: bool) -> u64 {
    if !run {
        return 0;
    }
    set_script(Outcome::Done(1));
    // SAFETY: the scripted backend answers; no real MSR is touched.
    let mut sum = unsafe { site::rdmsr(1) };
    // SAFETY: the scripted backend answers; no real MSR is touched.
    sum += unsafe { site::rdmsr_safe(2) }.unwrap_or(0);
    // SAFETY: the scripted backend answers; no real MSR is touched.
    unsafe { site::wrmsr(3, 3) };
    // SAFETY: the scripted backend answers; no real MSR is touched.
    unsafe { site::wrmsr_safe(4, 4) }.ok();
    // SAFETY: the scripted backend answers; no real MSR is touched.
    unsafe { site::wrmsr_ns(5, 5) };
    // SAFETY: the scripted backend answers; no real MSR is touched.
    unsafe { site::wrmsr_ns_safe(6, 6) }.ok();
    // SAFETY: the scripted backend answers; no real MSR is touched.
    sum += unsafe { site::rdpmc(7) };
    // SAFETY: the scripted backend answers; no real MSR is touched.
    sum += unsafe { site::rdpmc_safe(8) }.unwrap_or(0);
    // SAFETY: the scripted backend answers; no real MSR is touched.
    sum += unsafe { site::rdmsr_const::<9>() };
    // SAFETY: the scripted backend answers; no real MSR is touched.
    sum += unsafe { site::rdmsr_const_safe::<10>() }.unwrap_or(0);
    // SAFETY: the scripted backend answers; no real MSR is touched.
    unsafe { site::wrmsr_ns_const::<11>(11) };
    // SAFETY: the scripted backend answers; no real MSR is touched.
    unsafe { site::wrmsr_ns_const_safe::<12>(12) }.ok();
    sum
}

/// The region length every site of `op` has.
fn region_len(op: PatchOp) -> usize {
    match op {
        PatchOp::ReadImm | PatchOp::WriteImm => IMM_SITE_LEN,
        PatchOp::Read | PatchOp::Write | PatchOp::WriteNs | PatchOp::Rdpmc => SITE_LEN,
    }
}

fn code(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: `addr..addr + len` is a patch site (or stub) inside this executable's text
    // segment, which is mapped readable for the life of the process and not modified.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn expected_kinds(op: PatchOp, safe: bool) -> Kind {
    match (op, safe) {
        (PatchOp::Read | PatchOp::ReadImm, false) => Kind::Read,
        (PatchOp::Read | PatchOp::ReadImm, true) => Kind::ReadSafe,
        (PatchOp::Write | PatchOp::WriteNs | PatchOp::WriteImm, false) => Kind::Write,
        (PatchOp::Write | PatchOp::WriteNs | PatchOp::WriteImm, true) => Kind::WriteSafe,
        (PatchOp::Rdpmc, false) => Kind::Rdpmc,
        (PatchOp::Rdpmc, true) => Kind::RdpmcSafe,
    }
}

#[test]
fn every_patch_site_is_a_call_of_call_len_bytes_to_its_stub() {
    install();
    assert_eq!(every_emitter(true), 6);
    let sites: Vec<_> = patch_sites().collect();
    // Twelve emitters in `every_emitter`, plus those of the helpers crate (none) at least.
    assert!(sites.len() >= 12, "only {} patch sites found", sites.len());
    let mut ops_seen = std::collections::HashSet::new();
    for s in &sites {
        let op = s.op.unwrap_or_else(|| panic!("unknown op in {s:?}"));
        ops_seen.insert((op, s.flags & FLAG_SAFE != 0));
        assert_eq!(usize::from(s.len), region_len(op), "{s:?}");
        let bytes = code(s.addr, usize::from(s.len));
        let mut decoder = Decoder::with_ip(64, bytes, s.addr as u64, DecoderOptions::NONE);
        let insn = decoder.decode();
        assert_eq!(insn.mnemonic(), Mnemonic::Call, "{s:?}: {bytes:02x?}");
        assert_eq!(
            insn.op0_kind(),
            OpKind::NearBranch64,
            "{s:?}: not a direct call"
        );
        // One instruction filling the region: the `call rel32` (CALL_LEN bytes), after
        // the CS prefixes in a constant-index site.
        assert_eq!(insn.len(), usize::from(s.len), "{s:?}: {bytes:02x?}");
        let prefix = usize::from(s.len) - CALL_LEN;
        let expected_prefix: &[u8] = if prefix == 0 { &[] } else { &IMM_CALL_PREFIX };
        assert_eq!(&bytes[..prefix], expected_prefix, "{s:?}: {bytes:02x?}");
        assert_eq!(bytes[prefix], 0xe8, "{s:?}: {bytes:02x?}");
        assert_eq!(
            insn.near_branch_target() as usize,
            op.stub().addr(),
            "{s:?}: calls {:#x}, not {}",
            insn.near_branch_target(),
            op.stub().name()
        );
        assert_eq!(decoder.position(), bytes.len(), "{s:?}: {bytes:02x?}");
        if !matches!(op, PatchOp::ReadImm | PatchOp::WriteImm) {
            assert_eq!(s.imm, 0, "{s:?}: imm is only for the constant-index ops");
        }
        // The site's own entry: at the site, the right kind, fixup at the end of the region.
        let entry = extable::lookup(s.addr).unwrap_or_else(|| panic!("no extable entry for {s:?}"));
        let data = entry.data();
        assert_eq!(
            data.kind(),
            Some(expected_kinds(op, s.flags & FLAG_SAFE != 0)),
            "{s:?}"
        );
        assert_eq!(entry.fixup_addr(), s.addr + usize::from(s.len), "{s:?}");
        if data.kind().is_some_and(Kind::is_safe) {
            assert_eq!(data.reg(), extable::ERROR_REG, "{s:?}");
        }
        assert_eq!(
            data.has(flags::RAX_CONTRACT),
            op == PatchOp::ReadImm,
            "{s:?}"
        );
    }
    // The constant-index sites of `every_emitter` record their MSR.
    for (op, safe, msr) in [
        (PatchOp::ReadImm, false, 9),
        (PatchOp::ReadImm, true, 10),
        (PatchOp::WriteImm, false, 11),
        (PatchOp::WriteImm, true, 12),
    ] {
        assert!(
            sites
                .iter()
                .any(|s| s.op == Some(op) && (s.flags & FLAG_SAFE != 0) == safe && s.imm == msr),
            "no {op:?} safe={safe} site with imm {msr}"
        );
    }
    for op in [
        PatchOp::Read,
        PatchOp::Write,
        PatchOp::WriteNs,
        PatchOp::Rdpmc,
        PatchOp::ReadImm,
        PatchOp::WriteImm,
    ] {
        for safe in [false, true] {
            assert!(
                ops_seen.contains(&(op, safe)),
                "no site for {op:?} safe={safe}"
            );
        }
    }
}

/// The known sites of this binary (from its own asm, which records its label's address)
/// are found in the linked, sorted table.
#[test]
fn extable_section_survives_linking() {
    install();
    let table = extable::table();
    assert!(extable::is_sorted(table));
    // Four stubs with two rewind entries each, eight emitters, four harness calls, and the
    // native sites: well over 16 entries in any build.
    assert!(table.len() >= 16, "only {} entries", table.len());

    let (addr, end): (usize, usize);
    // SAFETY: computes two label addresses; executes nothing else. The entry it emits
    // describes the (never executed) `ud2` at the label.
    unsafe {
        core::arch::asm!(
            "lea 2f(%rip), {a}",
            "lea 3f(%rip), {e}",
            "jmp 3f",
            "2:",
            "ud2",
            "3:",
            ".pushsection xenmsr_extable,\"awR\",@progbits",
            ".balign 4",
            ".long 2b - .",
            ".long 3b - .",
            ".long {data}",
            ".popsection",
            a = out(reg) addr,
            e = out(reg) end,
            data = const xenmsr_asm::extable::Data::site(Kind::ReadSafe, 0).bits(),
            options(att_syntax, nostack),
        );
    }
    let entry = extable::lookup(addr).expect("the test's own entry is in the table");
    assert_eq!(entry.fixup_addr(), end);
    assert_eq!(entry.data().kind(), Some(Kind::ReadSafe));
    assert!(extable::lookup(addr + 1).is_none());
}

/// Every stub has its rewind entries, each on the instruction it is meant for and inside
/// the stub: one on its native instruction and one on its `ud2`; the read stub also one on
/// each of RDFSBASE and RDGSBASE (a #UD there is reported at the caller's site), and the
/// write stub one on each of WRFSBASE and WRGSBASE that also restores rax.
#[test]
fn every_stub_has_its_rewind_entries() {
    install();
    const RDFSBASE: &[u8] = &[0xf3, 0x48, 0x0f, 0xae, 0xc0];
    const RDGSBASE: &[u8] = &[0xf3, 0x48, 0x0f, 0xae, 0xc8];
    const WRFSBASE: &[u8] = &[0xf3, 0x48, 0x0f, 0xae, 0xd0];
    const WRGSBASE: &[u8] = &[0xf3, 0x48, 0x0f, 0xae, 0xd8];
    const UD2: &[u8] = &[0x0f, 0x0b];
    for stub in Stub::ALL {
        let start = stub.addr();
        // A stub ends before the next stub starts (or within 512 bytes of its start).
        let end = Stub::ALL
            .iter()
            .chain(Stub::SEGMENT_BASE.iter())
            .map(|s| s.addr())
            .filter(|&a| a > start)
            .min()
            .unwrap_or(usize::MAX)
            .min(start + 512);
        let mut found: Vec<(u32, Vec<u8>)> = extable::table()
            .iter()
            .filter(|e| (start..end).contains(&e.insn_addr()))
            .filter(|e| e.data().kind() == Some(Kind::Rewind))
            .map(|e| {
                assert_eq!(i32::from(e.data().imm()), -(CALL_LEN as i32));
                let len = if code(e.insn_addr(), 1)[0] == 0xf3 {
                    5
                } else {
                    2
                };
                (e.data().bits(), code(e.insn_addr(), len).to_vec())
            })
            .collect();
        let native = REWIND_NATIVE.bits();
        let mut expected: Vec<(u32, Vec<u8>)> = match stub {
            Stub::Rdmsr => vec![
                (native, vec![0x0f, 0x32]),
                (native, RDFSBASE.to_vec()),
                (native, RDGSBASE.to_vec()),
            ],
            Stub::RdmsrRax => vec![(native, vec![0x0f, 0x32])],
            Stub::Wrmsr => vec![
                (native, vec![0x0f, 0x30]),
                (REWIND_RESTORE_RAX.bits(), WRFSBASE.to_vec()),
                (REWIND_RESTORE_RAX.bits(), WRGSBASE.to_vec()),
            ],
            Stub::Rdpmc => vec![(native, vec![0x0f, 0x33])],
            Stub::SegbaseFs | Stub::SegbaseGsKernel | Stub::SegbaseGsUser => {
                unreachable!("not in Stub::ALL")
            }
        };
        expected.push((REWIND_ERROR.bits(), UD2.to_vec()));
        found.sort();
        expected.sort();
        assert_eq!(found, expected, "{}: rewind entries", stub.name());
    }
}

/// The segment-base stubs share one body: exactly one rewind entry, on its `ud2`, carrying
/// the error, with the same rewind immediate as every other stub.
#[test]
fn segment_base_stubs_have_one_error_rewind_entry() {
    install();
    // The shared body ends before the next generic stub starts (the linker may put one
    // right after it), or within 256 bytes.
    let start = Stub::SEGMENT_BASE.iter().map(|s| s.addr()).min().unwrap();
    let end = Stub::ALL
        .iter()
        .map(|s| s.addr())
        .filter(|&a| a > start)
        .min()
        .unwrap_or(usize::MAX)
        .min(start + 256);
    let entries: Vec<_> = extable::table()
        .iter()
        .filter(|e| e.data() == REWIND_ERROR)
        .filter(|e| (start..end).contains(&e.insn_addr()))
        .map(|e| e.insn_addr())
        .collect();
    let mut unique = entries.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 1, "{entries:x?}");
    assert_eq!(code(unique[0], 2), &[0x0f, 0x0b], "not ud2");
}

/// The policy stubs call Rust without aligning the stack themselves: they rely on every
/// site being emitted inside an `asm!` block without `nostack`, for which Rust guarantees
/// an rsp aligned for a call. No emitter may ever add `nostack`.
#[test]
fn sites_are_emitted_on_an_aligned_stack() {
    let source = include_str!("../../../asm/src/site.rs");
    let mut emitters = 0;
    for (i, line) in source.lines().enumerate() {
        if line.contains("options(") {
            emitters += 1;
            assert!(
                !line.contains("nostack"),
                "asm/src/site.rs:{}: an emitter with `nostack` would call a stub on an unaligned stack: {line}",
                i + 1
            );
        }
    }
    assert!(emitters > 0, "no emitter options found: did site.rs move?");
}
