//! The MSR routing table: what a Xen PV guest does with each MSR that needs special care.
//!
//! One table ([`ROUTES`]) is the single source of truth: the policy dispatches on it, and
//! the repository's `docs/msr-semantics.md` is checked against it by a test (in the
//! workspace's `tests/host/tests/docs.rs`). Lookup is O(1) and costs the same for every
//! MSR: a multiplicative hash picks one slot of a 64-entry index, and one comparison
//! confirms the row. The hash multiplier is searched at compile time so that no
//! two rows share a slot; a `const` assertion fails the build otherwise.
//!
//! PMU MSRs are not rows: which indices are PMU MSRs depends on the CPU vendor and the
//! counter counts, so the policy asks the vPMU classifier (after a table miss).

use xenmsr_hypercall::abi::SegmentBase;

/// What a read of the MSR does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadRoute {
    /// Execute `rdmsr`; Xen traps and emulates it.
    Native,
    /// Execute `rdmsr`, then clear `X2APIC_ENABLE` and set `BSP` only on vCPU 0.
    ApicBaseFixup,
}

/// What a write of the MSR does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRoute {
    /// Execute `wrmsr`; Xen traps and emulates it.
    Native,
    /// `HYPERVISOR_set_segment_base(which, value)` with the full 64-bit value; no `wrmsr`.
    SegmentBase(SegmentBase),
    /// Ignored with success: Xen owns the syscall entry points of a PV guest and would
    /// `#GP` the write.
    Ignore,
}

/// One row of the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The MSR index.
    pub msr: u32,
    /// Its architectural name.
    pub name: &'static str,
    /// What a read does.
    pub read: ReadRoute,
    /// What a write does.
    pub write: WriteRoute,
}

/// `IA32_APIC_BASE`.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// `IA32_SYSENTER_CS`.
pub const MSR_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_SYSENTER_EIP: u32 = 0x176;
/// `STAR`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SYSCALL_MASK` (`SFMASK`).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `FS_BASE`.
pub const MSR_FS_BASE: u32 = 0xc000_0100;
/// `GS_BASE` (the kernel's GS base while in the kernel).
pub const MSR_GS_BASE: u32 = 0xc000_0101;
/// `KERNEL_GS_BASE` (the base `swapgs` swaps in: the user GS base while in the kernel).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_APIC_BASE.BSP`.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// `IA32_APIC_BASE.EXTD` (x2APIC enable).
pub const APIC_BASE_X2APIC_ENABLE: u64 = 1 << 10;

/// Every MSR with special handling on Xen PV. Everything else is [`ReadRoute::Native`]
/// and [`WriteRoute::Native`], apart from the PMU MSRs, which go to the vPMU backend.
pub const ROUTES: &[Route] = &[
    Route {
        msr: MSR_APIC_BASE,
        name: "IA32_APIC_BASE",
        read: ReadRoute::ApicBaseFixup,
        write: WriteRoute::Native,
    },
    Route {
        msr: MSR_SYSENTER_CS,
        name: "IA32_SYSENTER_CS",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_SYSENTER_ESP,
        name: "IA32_SYSENTER_ESP",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_SYSENTER_EIP,
        name: "IA32_SYSENTER_EIP",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_STAR,
        name: "STAR",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_LSTAR,
        name: "LSTAR",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_CSTAR,
        name: "CSTAR",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_SYSCALL_MASK,
        name: "SYSCALL_MASK",
        read: ReadRoute::Native,
        write: WriteRoute::Ignore,
    },
    Route {
        msr: MSR_FS_BASE,
        name: "FS_BASE",
        read: ReadRoute::Native,
        write: WriteRoute::SegmentBase(SegmentBase::FS),
    },
    Route {
        msr: MSR_GS_BASE,
        name: "GS_BASE",
        read: ReadRoute::Native,
        write: WriteRoute::SegmentBase(SegmentBase::GS_KERNEL),
    },
    Route {
        msr: MSR_KERNEL_GS_BASE,
        name: "KERNEL_GS_BASE",
        read: ReadRoute::Native,
        write: WriteRoute::SegmentBase(SegmentBase::GS_USER),
    },
];

const INDEX_BITS: u32 = 6;
const INDEX_SLOTS: usize = 1 << INDEX_BITS;
const EMPTY: u8 = u8::MAX;

const fn slot(msr: u32, multiplier: u32) -> usize {
    (msr.wrapping_mul(multiplier) >> (32 - INDEX_BITS)) as usize
}

const fn build_index(multiplier: u32) -> Option<[u8; INDEX_SLOTS]> {
    let mut index = [EMPTY; INDEX_SLOTS];
    let mut row = 0;
    while row < ROUTES.len() {
        let s = slot(ROUTES[row].msr, multiplier);
        if index[s] != EMPTY {
            return None;
        }
        index[s] = row as u8;
        row += 1;
    }
    Some(index)
}

/// The first odd multiplier (from a golden-ratio start) that hashes every row to its own slot.
const MULTIPLIER: u32 = {
    let mut candidate: u32 = 0x9e37_79b1;
    let mut tries = 0;
    while build_index(candidate).is_none() {
        candidate = candidate.wrapping_add(2);
        tries += 1;
        assert!(
            tries < 1_000_000,
            "no collision-free multiplier for the route table"
        );
    }
    candidate
};

const INDEX: [u8; INDEX_SLOTS] = match build_index(MULTIPLIER) {
    Some(index) => index,
    None => panic!("route index has a collision"),
};

const _: () = assert!(ROUTES.len() < EMPTY as usize);

/// The row for `msr`, if it has special handling: one multiply, one load, one compare.
#[inline]
pub fn lookup(msr: u32) -> Option<&'static Route> {
    let row = INDEX[slot(msr, MULTIPLIER)];
    match ROUTES.get(row as usize) {
        Some(route) if route.msr == msr => Some(route),
        _ => None,
    }
}

/// The APIC base as a PV guest must see it: x2APIC hidden (a PV guest has no x2APIC),
/// and `BSP` set exactly on vCPU 0, which topology code uses to find the boot CPU.
pub const fn fix_apic_base(raw: u64, vcpu: u32) -> u64 {
    let value = raw & !APIC_BASE_X2APIC_ENABLE;
    if vcpu == 0 {
        value | APIC_BASE_BSP
    } else {
        value & !APIC_BASE_BSP
    }
}

impl ReadRoute {
    /// How `docs/msr-semantics.md` describes this route.
    pub const fn describe(self) -> &'static str {
        match self {
            ReadRoute::Native => "`rdmsr`, trapped and emulated by Xen",
            ReadRoute::ApicBaseFixup => {
                "`rdmsr`, then clear `X2APIC_ENABLE` (bit 10); set `BSP` (bit 8) on vCPU 0, clear it elsewhere"
            }
        }
    }
}

impl WriteRoute {
    /// How `docs/msr-semantics.md` describes this route.
    pub const fn describe(self) -> &'static str {
        match self {
            WriteRoute::Native => "`wrmsr`, trapped and emulated by Xen",
            WriteRoute::Ignore => "ignored, success; no hypercall, no `wrmsr`",
            WriteRoute::SegmentBase(which) => match which.0 {
                0 => "`set_segment_base(SEGBASE_FS = 0, value)`; no `wrmsr`",
                1 => "`set_segment_base(SEGBASE_GS_USER = 1, value)`; no `wrmsr`",
                2 => "`set_segment_base(SEGBASE_GS_KERNEL = 2, value)`; no `wrmsr`",
                _ => "`set_segment_base(?)`",
            },
        }
    }
}

/// Writes the routing table as the Markdown rows `docs/msr-semantics.md` holds between
/// its `routes:begin` and `routes:end` markers.
pub fn write_markdown_rows(out: &mut impl core::fmt::Write) -> core::fmt::Result {
    writeln!(out, "| MSR | name | read | write |")?;
    writeln!(out, "|---|---|---|---|")?;
    for route in ROUTES {
        writeln!(
            out,
            "| `{:#x}` | `{}` | {} | {} |",
            route.msr,
            route.name,
            route.read.describe(),
            route.write.describe()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_found_and_unique() {
        for (i, route) in ROUTES.iter().enumerate() {
            assert_eq!(lookup(route.msr), Some(route), "row {i} ({})", route.name);
            assert_eq!(
                ROUTES.iter().filter(|r| r.msr == route.msr).count(),
                1,
                "duplicate row for {:#x}",
                route.msr
            );
        }
    }

    #[test]
    fn other_msrs_miss() {
        for msr in (0..0x2000u32)
            .chain(0xc000_0000..0xc000_2000)
            .chain(0xc001_0000..0xc001_2000)
        {
            let expected = ROUTES.iter().find(|r| r.msr == msr);
            assert_eq!(lookup(msr), expected, "msr {msr:#x}");
        }
        for msr in [u32::MAX, 0x4000_0000, 0x8000_0000, 0x1234_5678] {
            assert_eq!(lookup(msr), None);
        }
    }

    #[test]
    fn apic_base_fixup() {
        let raw = 0xfee0_0000 | (1 << 11) | APIC_BASE_X2APIC_ENABLE | APIC_BASE_BSP;
        assert_eq!(
            fix_apic_base(raw, 0),
            0xfee0_0000 | (1 << 11) | APIC_BASE_BSP
        );
        assert_eq!(fix_apic_base(raw, 1), 0xfee0_0000 | (1 << 11));
        assert_eq!(fix_apic_base(0, 0), APIC_BASE_BSP);
        assert_eq!(fix_apic_base(0, 7), 0);
    }
}
