//! Unit tests of the table logic on synthetic, heap-allocated tables: encoding, sort,
//! search, and the fixup state machine (including rewinds over a fake stack).

use std::vec::Vec;

use crate::extable::{self, Data, ExtableEntry, Kind, flags, reg};
use crate::fixup::{MAX_REWINDS, TrapFrame, fixup_with_table};
use crate::{CALL_LEN, IMM_SITE_LEN, MsrError};
use xenmsr_hypercall::Errno;

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

/// A heap-allocated, unsorted table of `spec` entries `(insn, fixup, data)`, where the
/// addresses are offsets from the returned base (which lies 1 MiB past the table, so that
/// every target is within the ±2 GiB the entries can encode).
fn table(spec: &[(usize, usize, Data)]) -> (Vec<ExtableEntry>, usize) {
    let mut table: Vec<ExtableEntry> = spec
        .iter()
        .map(|&(_, _, d)| ExtableEntry::unplaced(d))
        .collect();
    let base = table.as_ptr() as usize + 0x10_0000;
    for (entry, &(insn, fixup, _)) in table.iter_mut().zip(spec) {
        entry
            .set_targets(base + insn, base + fixup)
            .expect("targets within ±2 GiB");
    }
    (table, base)
}

fn triples(table: &[ExtableEntry]) -> Vec<(usize, usize, u32)> {
    table
        .iter()
        .map(|e| (e.insn_addr(), e.fixup_addr(), e.data().bits()))
        .collect()
}

#[test]
fn data_word_layout() {
    let d = Data::new(Kind::ReadSafe, reg::RSI, flags::RAX_CONTRACT, -5);
    assert_eq!(d.bits(), 2 | 6 << 8 | 1 << 12 | 0xfffb << 16);
    assert_eq!(d.kind(), Some(Kind::ReadSafe));
    assert_eq!(d.reg(), 6);
    assert_eq!(d.flags(), flags::RAX_CONTRACT);
    assert_eq!(d.imm(), -5);
    let rewind = Data::rewind(1, true);
    assert_eq!(
        rewind.bits(),
        7 | 1 << 8 | flags::CARRIES_ERROR | 0xfffb << 16
    );
    assert_eq!(i32::from(rewind.imm()), -(CALL_LEN as i32));
    assert_eq!(Data::rewind(0, false).reg(), 0);
    assert!(!Data::rewind(0, false).has(flags::CARRIES_ERROR));
    assert_eq!(Data(0x55).kind(), None);
    assert_eq!(Data::site(Kind::Write, 0).reg(), 0);
    assert_eq!(Data::site(Kind::WriteSafe, 0).reg(), extable::ERROR_REG);
    for k in 0..=255u8 {
        if let Some(kind) = Kind::from_u8(k) {
            assert_eq!(kind as u8, k);
        }
    }
}

#[test]
fn sort_keeps_every_entrys_targets_and_search_finds_them() {
    for n in [0usize, 1, 2, 3, 7, 64, 1000] {
        let mut seed = n as u64 + 1;
        let mut spec: Vec<(usize, usize, Data)> = (0..n)
            .map(|i| {
                let insn = 16 * (lcg(&mut seed) as usize % (1 << 20)) + i % 16;
                let fixup = insn + 5 + i % 3;
                (
                    insn,
                    fixup,
                    Data::new(Kind::Read, (i % 16) as u8, 0, i as i16),
                )
            })
            .collect();
        spec.sort_by_key(|s| s.0);
        spec.dedup_by_key(|s| s.0);
        // Shuffle.
        for i in (1..spec.len()).rev() {
            let j = lcg(&mut seed) as usize % (i + 1);
            spec.swap(i, j);
        }
        let (mut t, base) = table(&spec);
        let mut before = triples(&t);
        extable::sort(&mut t);
        assert!(extable::is_sorted(&t), "n = {n}");
        let after = triples(&t);
        before.sort();
        assert_eq!(after, before, "every entry keeps its targets and data");
        for &(insn, fixup, data) in &spec {
            let e = extable::search(&t, base + insn).expect("present");
            assert_eq!((e.fixup_addr(), e.data()), (base + fixup, data));
            let next_present = spec.iter().any(|s| s.0 == insn + 1);
            assert_eq!(extable::search(&t, base + insn + 1).is_some(), next_present);
        }
        assert!(extable::search(&t, 0).is_none());
        assert!(extable::search(&t, usize::MAX).is_none());
        assert!(extable::search(&t, base.wrapping_sub(1)).is_none());
    }
}

#[test]
fn is_sorted_rejects_duplicates_and_disorder() {
    let d = Data::site(Kind::Read, 0);
    assert!(!extable::is_sorted(&table(&[(0, 0, d), (0, 0, d)]).0));
    assert!(!extable::is_sorted(&table(&[(8, 0, d), (0, 0, d)]).0));
    assert!(extable::is_sorted(&table(&[(0, 0, d), (1, 0, d)]).0));
}

/// A synthetic image: a site entry of `kind` at `site` (fixup `site + 5`), and a stub
/// whose native instruction (`native`) and `ud2` (`trap`) carry the two rewind entries.
struct Image {
    table: Vec<ExtableEntry>,
    site: usize,
    native: usize,
    trap: usize,
}

fn image(site_data: Data) -> Image {
    let (site, native, trap) = (0, 0x1000, 0x1020);
    let (mut t, base) = table(&[
        (trap, trap, Data::rewind(1, true)),
        (site, site + CALL_LEN, site_data),
        (native, native, Data::rewind(0, false)),
    ]);
    extable::sort(&mut t);
    Image {
        table: t,
        site: base + site,
        native: base + native,
        trap: base + trap,
    }
}

fn frame(rip: usize, rsp: *const u64) -> TrapFrame {
    TrapFrame {
        rax: 0x1111,
        rbx: 0x2222,
        rcx: 0xc000_0080,
        rdx: 0x4444,
        rsi: 0x5555,
        rdi: 0x6666,
        rip: rip as u64,
        rsp: rsp as u64,
        ..TrapFrame::default()
    }
}

#[test]
fn rewind_with_carried_error_reaches_the_callers_safe_entry() {
    let img = image(Data::site(Kind::ReadSafe, 0));
    let error = MsrError::Hypercall(Errno::EINVAL);
    let stack = [error.to_code(), (img.site + CALL_LEN) as u64, 0xdead];
    let mut f = frame(img.trap, stack.as_ptr());
    // SAFETY: `stack` holds what the trap's rewind entry describes.
    assert!(unsafe { fixup_with_table(&img.table, &mut f, 6) });
    assert_eq!(
        f.rip,
        (img.site + CALL_LEN) as u64,
        "resumes at the site's fixup"
    );
    assert_eq!(
        f.rsp,
        stack[2..].as_ptr() as u64,
        "error word and return address popped"
    );
    assert_eq!((f.rax, f.rdx, f.rsi), (0, 0, error.to_code()));
    assert_eq!((f.rbx, f.rcx, f.rdi), (0x2222, 0xc000_0080, 0x6666));
}

#[test]
fn rewind_of_a_native_fault_reports_the_vector() {
    let img = image(Data::site(Kind::WriteSafe, 0));
    let stack = [(img.site + CALL_LEN) as u64, 0];
    let mut f = frame(img.native, stack.as_ptr());
    // SAFETY: `stack` holds the return address the native entry describes.
    assert!(unsafe { fixup_with_table(&img.table, &mut f, 13) });
    assert_eq!(f.rsi, MsrError::Fault { vector: 13 }.to_code());
    assert_eq!(
        (f.rax, f.rdx),
        (0x1111, 0x4444),
        "a write has no outputs to zero"
    );
    assert_eq!(f.rsp, stack[1..].as_ptr() as u64);
}

#[test]
fn rewind_restoring_rax_puts_the_callers_rax_back() {
    // The write stub's WRFSBASE faulting with the value, the caller's rax and the return
    // address on the stack, and rax holding the value.
    let (site, insn) = (0, 0x1000);
    let (mut t, base) = table(&[
        (site, site + CALL_LEN, Data::site(Kind::WriteSafe, 0)),
        (insn, insn, Data::rewind_restoring_rax(2)),
    ]);
    extable::sort(&mut t);
    let (site, insn) = (base + site, base + insn);
    let callers_rax = 0x5555_0000_1234_5678;
    let stack = [
        0x7777_0000_1234_5678,
        callers_rax,
        (site + CALL_LEN) as u64,
        0,
    ];
    let mut f = frame(insn, stack.as_ptr());
    f.rax = 0x7777_0000_1234_5678;
    // SAFETY: `stack` holds the two words and the return address the entry describes.
    assert!(unsafe { fixup_with_table(&t, &mut f, 6) });
    assert_eq!(f.rax, callers_rax, "the caller's rax is back");
    assert_eq!(f.rsi, MsrError::Fault { vector: 6 }.to_code());
    assert_eq!(f.rip, (site + CALL_LEN) as u64);
    assert_eq!(
        f.rsp,
        stack[3..].as_ptr() as u64,
        "both words and the return popped"
    );
    let data = Data::rewind_restoring_rax(2);
    assert!(data.has(flags::RESTORES_RAX) && !data.has(flags::CARRIES_ERROR));
}

#[test]
fn rax_contract_zeroes_rax_and_the_folded_rdx() {
    // A constant-index read's value is `rax | rdx << 32` (folded after the site), and a
    // failing stub may leave anything in rdx: both are zeroed.
    let img = image(Data::site(Kind::ReadSafe, flags::RAX_CONTRACT));
    let stack = [(img.site + CALL_LEN) as u64];
    let mut f = frame(img.native, stack.as_ptr());
    // SAFETY: as above.
    assert!(unsafe { fixup_with_table(&img.table, &mut f, 13) });
    assert_eq!((f.rax, f.rdx), (0, 0));
}

#[test]
fn direct_fault_on_a_site_entry() {
    for (kind, zeroes) in [
        (Kind::ReadSafe, true),
        (Kind::RdpmcSafe, true),
        (Kind::WriteSafe, false),
        (Kind::Read, true),
        (Kind::Rdpmc, true),
        (Kind::Write, false),
    ] {
        let img = image(Data::site(kind, 0));
        let mut f = frame(img.site, core::ptr::null());
        // SAFETY: a site entry reads no stack.
        let fixed = unsafe { fixup_with_table(&img.table, &mut f, 13) };
        assert!(fixed, "{kind:?}");
        assert_eq!(f.rip, (img.site + CALL_LEN) as u64);
        assert_eq!(f.rax == 0 && f.rdx == 0, zeroes, "{kind:?}");
        let expect_rsi = if kind.is_safe() {
            MsrError::Fault { vector: 13 }.to_code()
        } else {
            0x5555
        };
        assert_eq!(f.rsi, expect_rsi, "{kind:?}");
    }
}

#[test]
fn declines_leave_the_frame_untouched() {
    let img = image(Data::site(Kind::ReadSafe, 0));
    let check = |rip: usize, stack: &[u64]| {
        let mut f = frame(rip, stack.as_ptr());
        let before = f;
        // SAFETY: `stack` is readable for every word a matching rewind entry reads.
        assert!(!unsafe { fixup_with_table(&img.table, &mut f, 6) });
        assert_eq!(f, before);
    };
    // Unknown rip.
    check(img.site + 1, &[0, 0]);
    // Rewind to an address with no entry (a stub called from outside a site).
    check(img.native, &[(img.site + 100) as u64, 0]);
    // A carried code that is not an error.
    check(img.trap, &[1, (img.site + CALL_LEN) as u64]);
    check(img.trap, &[0, (img.site + CALL_LEN) as u64]);
    // Empty table.
    let mut f = frame(img.site, core::ptr::null());
    // SAFETY: nothing matches, nothing is read.
    assert!(!unsafe { fixup_with_table(&[], &mut f, 13) });
}

#[test]
fn rsp_is_never_an_error_register() {
    let img = image(Data::new(Kind::ReadSafe, reg::RSP, 0, 0));
    let mut f = frame(img.site, core::ptr::null());
    // SAFETY: a site entry reads no stack.
    assert!(!unsafe { fixup_with_table(&img.table, &mut f, 13) });
}

#[test]
fn rewind_chains_are_bounded() {
    // Rewind entries at a[0..n]; each rewinds (skip 0) to the next; the last one's target
    // is a safe site entry. Chains of up to MAX_REWINDS succeed; longer ones are refused.
    for n in 1..=MAX_REWINDS + 2 {
        let hops: Vec<usize> = (0..n).map(|i| 0x100 * i).collect();
        let site_off = 0x100 * n;
        let mut spec: Vec<(usize, usize, Data)> = hops
            .iter()
            .map(|&a| (a, a, Data::rewind(0, false)))
            .collect();
        spec.push((site_off, site_off + CALL_LEN, Data::site(Kind::ReadSafe, 0)));
        let (mut t, base) = table(&spec);
        extable::sort(&mut t);
        let addrs: Vec<usize> = hops.iter().map(|h| base + h).collect();
        let site = base + site_off;
        // Each rewind pops one return address: the next hop's address + CALL_LEN.
        let stack: Vec<u64> = (1..=n)
            .map(|i| (base + 0x100 * i + CALL_LEN) as u64)
            .collect();
        let mut f = frame(addrs[0], stack.as_ptr());
        // SAFETY: `stack` holds one return address per rewind hop.
        let ok = unsafe { fixup_with_table(&t, &mut f, 13) };
        assert_eq!(ok, n <= MAX_REWINDS, "chain of {n}");
        if ok {
            assert_eq!(f.rip, (site + CALL_LEN) as u64);
        }
    }
}

#[test]
fn warned_flag_is_set_once() {
    let (t, _) = table(&[(0, 0, Data::site(Kind::Read, 0))]);
    assert!(t[0].mark_warned());
    assert!(!t[0].mark_warned());
    assert!(t[0].data().has(flags::WARNED));
    assert_eq!(t[0].data().kind(), Some(Kind::Read));
}

#[test]
fn rewind_finds_a_constant_index_site_through_its_prefixed_call() {
    // A 9-byte site: CS prefixes, then the call, which returns to the end of the site, so
    // `ret - CALL_LEN` is inside the instruction and the entry is IMM_SITE_LEN before `ret`.
    let (site, native, trap) = (0, 0x1000, 0x1020);
    let build = |fixup: usize| {
        let (mut t, base) = table(&[
            (trap, trap, Data::rewind(1, true)),
            (site, fixup, Data::site(Kind::ReadSafe, flags::RAX_CONTRACT)),
            (native, native, Data::rewind(0, false)),
        ]);
        extable::sort(&mut t);
        (t, base)
    };
    let (t, base) = build(site + IMM_SITE_LEN);
    let error = MsrError::Hypercall(Errno::EINVAL);
    let stack = [error.to_code(), (base + site + IMM_SITE_LEN) as u64];
    let mut f = frame(base + trap, stack.as_ptr());
    // SAFETY: `stack` holds what the trap's rewind entry describes.
    assert!(unsafe { fixup_with_table(&t, &mut f, 6) });
    assert_eq!(
        f.rip as usize,
        base + site + IMM_SITE_LEN,
        "resumes at the fixup"
    );
    assert_eq!(f.rsi, error.to_code());
    assert_eq!((f.rax, f.rdx), (0, 0));
    // An entry IMM_SITE_LEN before the return address whose fixup is elsewhere is not the
    // caller's: the fixup declines and leaves the frame alone.
    let (t, base) = build(site + CALL_LEN);
    let stack = [error.to_code(), (base + site + IMM_SITE_LEN) as u64];
    let mut f = frame(base + trap, stack.as_ptr());
    let before = f;
    // SAFETY: as above.
    assert!(!unsafe { fixup_with_table(&t, &mut f, 6) });
    assert_eq!(f, before);
}

// ---- Guarded entries (a kernel's own instructions, `guarded_asm!`) ----

/// Every vector the trap table covers, and the two pseudo-vectors of the PV kit.
const ALL_VECTORS: [u8; 22] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 32, 33,
];

#[test]
fn guarded_entry_reports_every_resumable_fault_in_its_register() {
    use crate::fixup::is_resumable_fault;
    use crate::guarded::{ENTRY_DATA, ERROR_REG, GuardedFault};
    let (insn, fixup) = (0x40, 0x43);
    let (mut t, base) = table(&[
        (0, CALL_LEN, Data::site(Kind::ReadSafe, 0)),
        (insn, fixup, Data(ENTRY_DATA)),
    ]);
    extable::sort(&mut t);
    for vector in ALL_VECTORS {
        let mut f = frame(base + insn, core::ptr::null());
        let before = f;
        // SAFETY: a guarded entry reads no stack.
        let fixed = unsafe { fixup_with_table(&t, &mut f, vector) };
        assert_eq!(fixed, is_resumable_fault(vector), "vector {vector}");
        if fixed {
            let mut expected = before;
            *expected.gpr_mut(ERROR_REG).expect("a register") =
                MsrError::Fault { vector }.to_code();
            expected.rip = (base + fixup) as u64;
            assert_eq!(f, expected, "only r11 and rip change (vector {vector})");
            assert_eq!(GuardedFault::result_of(f.r11), Err(GuardedFault { vector }));
        } else {
            assert_eq!(f, before, "vector {vector} is refused untouched");
        }
    }
    assert_eq!(GuardedFault::result_of(0), Ok(()));
}

#[test]
fn msr_entries_answer_only_gp_and_ud() {
    for kind in [Kind::ReadSafe, Kind::WriteSafe, Kind::Read, Kind::Write] {
        let img = image(Data::site(kind, 0));
        for vector in ALL_VECTORS {
            let mut f = frame(img.site, core::ptr::null());
            let before = f;
            // SAFETY: a site entry reads no stack.
            let fixed = unsafe { fixup_with_table(&img.table, &mut f, vector) };
            assert_eq!(
                fixed,
                vector == 13 || vector == 6,
                "{kind:?}, vector {vector}"
            );
            if !fixed {
                assert_eq!(f, before);
            }
        }
        // A #PF at a stub's native instruction is not a rewind either.
        let stack = [(img.site + CALL_LEN) as u64, 0];
        let mut f = frame(img.native, stack.as_ptr());
        // SAFETY: `stack` holds the return address the native entry describes.
        assert!(!unsafe { fixup_with_table(&img.table, &mut f, 14) });
    }
}

#[test]
fn a_rewind_never_lands_on_a_guarded_entry() {
    // A stub's rewind whose return address leads to a guarded entry (nothing emits that)
    // is refused rather than reported in the guarded register.
    let (guarded, native) = (0, 0x1000);
    let (mut t, base) = table(&[
        (
            guarded,
            guarded + CALL_LEN,
            Data(crate::guarded::ENTRY_DATA),
        ),
        (native, native, Data::rewind(0, false)),
    ]);
    extable::sort(&mut t);
    let stack = [(base + guarded + CALL_LEN) as u64, 0];
    let mut f = frame(base + native, stack.as_ptr());
    let before = f;
    // SAFETY: `stack` holds the return address the native entry describes.
    assert!(!unsafe { fixup_with_table(&t, &mut f, 13) });
    assert_eq!(f, before);
}

#[test]
fn guarded_data_word() {
    use crate::guarded::{ENTRY_DATA, ERROR_REG};
    let d = Data(ENTRY_DATA);
    assert_eq!(d.kind(), Some(Kind::Guarded));
    assert_eq!(d.reg(), ERROR_REG);
    assert_eq!(ERROR_REG, reg::R8 + 3, "r11");
    assert_eq!((d.flags(), d.imm()), (0, 0));
    assert_eq!(ENTRY_DATA, 8 | 11 << 8);
    assert!(!Kind::Guarded.is_safe() && !Kind::Guarded.is_msr_access());
    assert!(Kind::Rewind.is_msr_access() && Kind::ReadSafe.is_msr_access());
    // An entry naming rsp is refused.
    let (mut t, base) = table(&[(0, 3, Data::new(Kind::Guarded, reg::RSP, 0, 0))]);
    extable::sort(&mut t);
    let mut f = frame(base, core::ptr::null());
    // SAFETY: a guarded entry reads no stack.
    assert!(!unsafe { fixup_with_table(&t, &mut f, 13) });
}

#[test]
fn guarded_fault_display_and_conversion() {
    use crate::guarded::GuardedFault;
    let pf = GuardedFault { vector: 14 };
    assert_eq!(
        std::format!("{pf}"),
        "the instruction raised #PF (vector 14)"
    );
    assert_eq!(MsrError::from(pf), MsrError::Fault { vector: 14 });
    assert_eq!(GuardedFault { vector: 9 }.mnemonic(), "?");
}
