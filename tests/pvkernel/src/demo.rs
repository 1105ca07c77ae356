//! The demo (`cargo xtask run`): a table of what the library does for a set of MSR
//! accesses on Xen PV: the operation, the MSR, the route the library's table gives it,
//! the hypercalls it made (counted by the tracing page), and the result.
//!
//! Each row also states the outcome it should have (a value, or an error); a row that
//! does not is counted as a failure, so the demo doubles as a smoke test. To add a row,
//! add an entry to [`ROWS`].

use xenmsr::routes::{self, ReadRoute, WriteRoute};
use xenmsr::{MsrError, rdmsr_safe, rdpmc_safe, wrmsr_safe};

use crate::testing::{self, Failure};
use crate::tracepage;

/// One access of the demo.
#[derive(Clone, Copy)]
enum Op {
    Read(u32),
    Write(u32, u64),
    Rdpmc(u32),
}

/// What a row should give.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Success (any value).
    Ok,
    /// Success with this value.
    Value(u64),
    /// Failure (any error).
    Err,
    /// Whatever the CPU model gives (shown, not judged).
    Any,
}

struct Row {
    name: &'static str,
    op: Op,
    expect: Expect,
}

const fn row(name: &'static str, op: Op, expect: Expect) -> Row {
    Row { name, op, expect }
}

const ROWS: &[Row] = &[
    row("APIC_BASE", Op::Read(0x1b), Expect::Value(0xfee0_0900)),
    row("EFER", Op::Read(0xc000_0080), Expect::Ok),
    row("PAT", Op::Read(0x277), Expect::Value(0x0000_0501_0007_0406)),
    row("PAT", Op::Write(0x277, 0x0000_0501_0007_0406), Expect::Err),
    row(
        "FS_BASE",
        Op::Write(0xc000_0100, 0x0000_7f00_dead_b000),
        Expect::Ok,
    ),
    row(
        "FS_BASE",
        Op::Read(0xc000_0100),
        Expect::Value(0x0000_7f00_dead_b000),
    ),
    row(
        "FS_BASE",
        Op::Write(0xc000_0100, 0x8000_0000_0000_0000),
        Expect::Err,
    ),
    row(
        "GS_BASE",
        Op::Write(0xc000_0101, 0x0000_0000_0020_0000),
        Expect::Ok,
    ),
    row(
        "KERNEL_GS_BASE",
        Op::Write(0xc000_0102, 0x0000_6000_0000_0000),
        Expect::Ok,
    ),
    row(
        "KERNEL_GS_BASE",
        Op::Read(0xc000_0102),
        Expect::Value(0x0000_6000_0000_0000),
    ),
    row(
        "STAR",
        Op::Write(0xc000_0081, 0x0023_0010_0000_0000),
        Expect::Ok,
    ),
    row(
        "LSTAR",
        Op::Write(0xc000_0082, 0xffff_8000_0010_0000),
        Expect::Ok,
    ),
    row("SYSENTER_CS", Op::Write(0x174, 0x10), Expect::Ok),
    row("TSC", Op::Read(0x10), Expect::Ok),
    row("MISC_ENABLE", Op::Read(0x1a0), Expect::Ok),
    row("(unknown)", Op::Read(0x1234_5678), Expect::Err),
    row("(unknown)", Op::Write(0x1234_5678, 1), Expect::Err),
    // Emulated from the counter MSR on AMD (0: TCG's counters never count); Intel under
    // TCG has no counters (CPUID leaf 0xA is empty), so it is InvalidCounter there.
    row("PMC 0", Op::Rdpmc(0), Expect::Any),
];

/// The route the library's table gives an access, in a few words.
fn route(op: Op) -> &'static str {
    match op {
        Op::Read(msr) => match routes::lookup(msr).map(|r| r.read) {
            Some(ReadRoute::Native) | None => "native (Xen emulates)",
            Some(ReadRoute::ApicBaseFixup) => "native + fixup",
        },
        Op::Write(msr, _) => match routes::lookup(msr).map(|r| r.write) {
            Some(WriteRoute::Native) | None => "native (Xen emulates)",
            Some(WriteRoute::Ignore) => "ignored",
            Some(WriteRoute::SegmentBase(_)) => "set_segment_base",
        },
        Op::Rdpmc(_) => "emulated (vPMU)",
    }
}

/// Performs one row. The demo touches only MSRs whose reads have no side effect,
/// segment bases (unused by this kernel), and writes the library ignores or Xen refuses.
fn perform(op: Op) -> Result<Option<u64>, MsrError> {
    match op {
        // SAFETY: see above: reads without side effects.
        Op::Read(msr) => unsafe { rdmsr_safe(msr) }.map(Some),
        // SAFETY: see above: segment bases, or writes that are ignored or refused.
        Op::Write(msr, value) => unsafe { wrmsr_safe(msr, value) }.map(|()| None),
        // SAFETY: see above: RDPMC is emulated from a counter MSR at most.
        Op::Rdpmc(counter) => unsafe { rdpmc_safe(counter) }.map(Some),
    }
}

/// Runs the demo: initialises the library, performs every row, prints the table.
pub fn run() {
    if let Err(e) = crate::library::init() {
        testing::record(
            "demo::init",
            Err(Failure::new(format_args!("xenmsr::init: {e}"))),
        );
        return;
    }
    match crate::hv::page().xen_version() {
        Ok((major, minor)) => {
            println!("demo: what xenmsr does on Xen {major}.{minor} PV (dom0, vCPU 0)")
        }
        Err(e) => println!("demo: what xenmsr does on Xen PV (dom0, vCPU 0; xen_version: {e:?})"),
    }
    println!(
        "  {:<6} {:<12} {:<15} {:<22} {:<22} {}",
        "op", "msr", "name", "route", "hypercalls", "result"
    );
    let mut unexpected = 0usize;
    let mut first_unexpected: Option<(usize, &str, u32, Calls)> = None;
    for (i, row) in ROWS.iter().enumerate() {
        let before = tracepage::snapshot();
        let result = perform(row.op);
        let after = tracepage::snapshot();
        let (op, msr, value) = match row.op {
            Op::Read(msr) => ("read", msr, None),
            Op::Write(msr, v) => ("write", msr, Some(v)),
            Op::Rdpmc(c) => ("rdpmc", c, None),
        };
        let mut calls = Calls::new();
        for (nr, count) in after.since(&before) {
            calls.push(xenmsr_hypercall::nr::name(nr).unwrap_or("?"), count);
        }
        let mut shown = Calls::new();
        match (&result, value) {
            (Ok(Some(v)), _) => shown.push_fmt(format_args!("{v:#x}")),
            (Ok(None), Some(v)) => shown.push_fmt(format_args!("ok (wrote {v:#x})")),
            (Ok(None), None) => shown.push_fmt(format_args!("ok")),
            (Err(e), _) => shown.push_fmt(format_args!("Err({e:?})")),
        }
        let matches = match (row.expect, &result) {
            (Expect::Ok, Ok(_)) | (Expect::Err, Err(_)) | (Expect::Any, _) => true,
            (Expect::Value(v), Ok(Some(got))) => *got == v,
            _ => false,
        };
        println!(
            "  {:<6} {:#010x}   {:<15} {:<22} {:<22} {}{}",
            op,
            msr,
            row.name,
            route(row.op),
            calls.as_str(),
            shown.as_str(),
            if matches { "" } else { "   <-- unexpected" }
        );
        if !matches {
            unexpected += 1;
            first_unexpected.get_or_insert((i, op, msr, shown));
        }
    }
    // Leave the segment bases as the kernel found them.
    for msr in [0xc000_0100, 0xc000_0101, 0xc000_0102] {
        // SAFETY: FS/GS are unused by this kernel.
        let _ = unsafe { wrmsr_safe(msr, 0) };
    }
    let outcome = match first_unexpected {
        None => Ok(()),
        Some((i, op, msr, shown)) => Err(Failure::new(format_args!(
            "{unexpected} of {} rows unexpected; first: row {i} ({op} {msr:#x}): {}",
            ROWS.len(),
            shown.as_str()
        ))),
    };
    testing::record("demo::table", outcome);
}

/// A small fixed-capacity text buffer for table cells.
struct Calls {
    buf: [u8; 64],
    len: usize,
}

impl Calls {
    fn new() -> Self {
        Calls {
            buf: [0; 64],
            len: 0,
        }
    }

    fn push(&mut self, name: &str, count: u64) {
        if self.len > 0 {
            self.push_fmt(format_args!(", "));
        }
        if count == 1 {
            self.push_fmt(format_args!("{name}"));
        } else {
            self.push_fmt(format_args!("{name} x{count}"));
        }
    }

    fn push_fmt(&mut self, args: core::fmt::Arguments<'_>) {
        let _ = core::fmt::Write::write_fmt(self, args);
    }

    fn as_str(&self) -> &str {
        if self.len == 0 {
            return "-";
        }
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl core::fmt::Write for Calls {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
