//! Code size: functions whose symbol sizes give the bytes one call site costs, and the
//! patch-site records of the image.
//!
//! For each variant there are two functions, one with one access and one with two
//! accesses to different MSRs. `size(two) - size(one)` is what one more call site adds
//! inline in its caller (the patchable region plus the register marshalling around it),
//! with the function's own prologue and epilogue subtracted. xtask reads the sizes with
//! `nm -S` from the built binary; nothing here measures itself.

use std::collections::BTreeMap;
use std::hint::black_box;

use xenmsr::{rdmsr, rdmsr_safe, rdpmc, rdpmc_safe, wrmsr, wrmsr_ns, wrmsr_safe};
use xenmsr_asm::patch::patch_sites;

use crate::scenarios::PV_POLICY;

const MSR_A: u32 = 0xc000_0100;
const MSR_B: u32 = 0xc000_0101;

macro_rules! size_pair {
    ($variant:literal, $one:ident, $two:ident, |$msr:ident, $v:ident| $access:expr) => {
        /// One access (code-size probe; see the module docs).
        ///
        /// # Safety
        ///
        /// As for the access it performs: the MSR access must not break memory safety.
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub unsafe fn $one(v: u64) -> u64 {
            let access = |$msr: u32, $v: u64| -> u64 { $access };
            access(MSR_A, v)
        }

        /// Two accesses (code-size probe; see the module docs).
        ///
        /// # Safety
        ///
        /// As for [`$one`].
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub unsafe fn $two(v: u64) -> u64 {
            let access = |$msr: u32, $v: u64| -> u64 { $access };
            access(MSR_A, v).wrapping_add(access(MSR_B, v))
        }
    };
}

// SAFETY (for every probe below): each `unsafe` block performs the one access its probe
// is named after, under the probe's own `# Safety` contract, which the caller upholds.
size_pair!(
    "rdmsr",
    xenmsr_bench_size_rdmsr_1,
    xenmsr_bench_size_rdmsr_2,
    |msr, _v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { rdmsr(msr) }
    }
);
size_pair!(
    "rdmsr_safe",
    xenmsr_bench_size_rdmsr_safe_1,
    xenmsr_bench_size_rdmsr_safe_2,
    |msr, _v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { rdmsr_safe(msr) }.unwrap_or(0)
    }
);
size_pair!(
    "wrmsr",
    xenmsr_bench_size_wrmsr_1,
    xenmsr_bench_size_wrmsr_2,
    |msr, v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { wrmsr(msr, v) };
        0
    }
);
size_pair!(
    "wrmsr_safe",
    xenmsr_bench_size_wrmsr_safe_1,
    xenmsr_bench_size_wrmsr_safe_2,
    |msr, v| {
        // SAFETY: forwarded to the probe's caller.
        u64::from(unsafe { wrmsr_safe(msr, v) }.is_ok())
    }
);
size_pair!(
    "wrmsr_ns",
    xenmsr_bench_size_wrmsr_ns_1,
    xenmsr_bench_size_wrmsr_ns_2,
    |msr, v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { wrmsr_ns(msr, v) };
        0
    }
);
size_pair!(
    "rdpmc",
    xenmsr_bench_size_rdpmc_1,
    xenmsr_bench_size_rdpmc_2,
    |msr, _v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { rdpmc(msr & 3) }
    }
);
size_pair!(
    "rdpmc_safe",
    xenmsr_bench_size_rdpmc_safe_1,
    xenmsr_bench_size_rdpmc_safe_2,
    |msr, _v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { rdpmc_safe(msr & 3) }.unwrap_or(0)
    }
);
size_pair!(
    "native rdmsr_safe (raw instruction + extable entry)",
    xenmsr_bench_size_native_rdmsr_safe_1,
    xenmsr_bench_size_native_rdmsr_safe_2,
    |msr, _v| {
        // SAFETY: forwarded to the probe's caller.
        unsafe { xenmsr_asm::native::rdmsr_safe(msr) }.unwrap_or(0)
    }
);
size_pair!(
    "native wrmsr_safe (raw instruction + extable entry)",
    xenmsr_bench_size_native_wrmsr_safe_1,
    xenmsr_bench_size_native_wrmsr_safe_2,
    |msr, v| {
        // SAFETY: forwarded to the probe's caller.
        u64::from(unsafe { xenmsr_asm::native::wrmsr_safe(msr, v) }.is_ok())
    }
);
size_pair!(
    "pvops read (indirect C-ABI call)",
    xenmsr_bench_size_pvops_read_1,
    xenmsr_bench_size_pvops_read_2,
    |msr, _v| {
        let mut err = 0;
        let value = (black_box(&PV_POLICY).read_msr)(msr, &mut err);
        if err == 0 { value } else { 0 }
    }
);
size_pair!(
    "pvops write (indirect C-ABI call)",
    xenmsr_bench_size_pvops_write_1,
    xenmsr_bench_size_pvops_write_2,
    |msr, v| u64::from((black_box(&PV_POLICY).write_msr)(msr, v) == 0)
);

/// `(variant, one-access symbol, two-access symbol, address of the one, of the two)`.
type Probe = (&'static str, &'static str, &'static str, usize, usize);

macro_rules! probes {
    ($(($variant:literal, $one:ident, $two:ident)),* $(,)?) => {
        [$(($variant, stringify!($one), stringify!($two), $one as *const () as usize, $two as *const () as usize)),*]
    };
}

fn probes() -> [Probe; 11] {
    probes![
        (
            "rdmsr",
            xenmsr_bench_size_rdmsr_1,
            xenmsr_bench_size_rdmsr_2
        ),
        (
            "rdmsr_safe",
            xenmsr_bench_size_rdmsr_safe_1,
            xenmsr_bench_size_rdmsr_safe_2
        ),
        (
            "wrmsr",
            xenmsr_bench_size_wrmsr_1,
            xenmsr_bench_size_wrmsr_2
        ),
        (
            "wrmsr_safe",
            xenmsr_bench_size_wrmsr_safe_1,
            xenmsr_bench_size_wrmsr_safe_2
        ),
        (
            "wrmsr_ns",
            xenmsr_bench_size_wrmsr_ns_1,
            xenmsr_bench_size_wrmsr_ns_2
        ),
        (
            "rdpmc",
            xenmsr_bench_size_rdpmc_1,
            xenmsr_bench_size_rdpmc_2
        ),
        (
            "rdpmc_safe",
            xenmsr_bench_size_rdpmc_safe_1,
            xenmsr_bench_size_rdpmc_safe_2
        ),
        (
            "native::rdmsr_safe (raw instruction)",
            xenmsr_bench_size_native_rdmsr_safe_1,
            xenmsr_bench_size_native_rdmsr_safe_2
        ),
        (
            "native::wrmsr_safe (raw instruction)",
            xenmsr_bench_size_native_wrmsr_safe_1,
            xenmsr_bench_size_native_wrmsr_safe_2
        ),
        (
            "pvops read (indirect C-ABI call)",
            xenmsr_bench_size_pvops_read_1,
            xenmsr_bench_size_pvops_read_2
        ),
        (
            "pvops write (indirect C-ABI call)",
            xenmsr_bench_size_pvops_write_1,
            xenmsr_bench_size_pvops_write_2
        ),
    ]
}

/// Prints `variant<TAB>symbol of one access<TAB>symbol of two`, one line per variant.
/// (Taking the probes' addresses also keeps them in the image.)
pub fn print_symbols() {
    for (variant, one, two, one_addr, two_addr) in probes() {
        black_box((one_addr, two_addr));
        println!("{variant}\t{one}\t{two}");
    }
}

/// Prints the patch-site records of this image grouped by op, length and flags:
/// `op<TAB>len<TAB>flags<TAB>count`.
pub fn print_sites() {
    let mut groups: BTreeMap<(String, u8, u16), usize> = BTreeMap::new();
    for site in patch_sites() {
        let op = site
            .op
            .map_or_else(|| "unknown".to_string(), |op| format!("{op:?}"));
        *groups.entry((op, site.len, site.flags)).or_default() += 1;
    }
    for ((op, len, flags), count) in groups {
        println!("{op}\t{len}\t{flags}\t{count}");
    }
}
