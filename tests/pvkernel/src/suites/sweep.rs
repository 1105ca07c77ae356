//! `suite=sweep`: what the running Xen does with every MSR of a set of ranges, as bare
//! instructions on vCPU 0, printed one line per MSR that does not simply `#GP`. Not a test
//! of the library: `cargo xtask sweep` boots it under two hypervisors and prints where
//! they differ, which is how the release-dependent expectations of the `xen` suite were
//! found (and how a new release is checked for new ones).

use super::raw;

/// The ranges swept: the architectural and Intel MSRs, the AMD64 ones, AMD's family
/// ranges, and the hypervisor range.
pub const RANGES: &[(u32, u32)] = &[
    (0x0000_0000, 0x0000_0fff),
    (0xc000_0000, 0xc000_01ff),
    (0xc001_0000, 0xc001_02ff),
    (0xc001_1000, 0xc001_10ff),
    (0x4000_0000, 0x4000_01ff),
];

/// MSRs whose write-back is skipped: the TSC and its adjustment (a stale value would move
/// the guest's clock), and the segment bases (live state of the running kernel).
const NO_WRITE_BACK: &[u32] = &[0x10, 0x3b, 0xc000_0100, 0xc000_0101, 0xc000_0102];

/// Sweeps [`RANGES`]: reads each MSR and, where the read succeeds, writes the value read
/// back. Prints `msr-sweep <msr> read=<value>|gp(<exinfo>) write=ok|gp|skipped` for each
/// MSR whose read or write does not `#GP`, then `msr-sweep done <n>`.
pub fn run() {
    let mut shown = 0u32;
    let mut swept = 0u32;
    for &(first, last) in RANGES {
        for msr in first..=last {
            swept += 1;
            let read = raw::rdmsr(msr);
            let write = match read {
                Ok(_) if NO_WRITE_BACK.contains(&msr) => "skipped",
                // SAFETY: the value just read is written back; a PV kernel's write is
                // emulated or refused by Xen, and the MSRs whose old value could disturb
                // this kernel are skipped above.
                Ok(value) => match unsafe { raw::wrmsr(msr, value) } {
                    Ok(()) => "ok",
                    Err(_) => "gp",
                },
                Err(_) => "-",
            };
            match read {
                Ok(value) => {
                    shown += 1;
                    println!("msr-sweep {msr:#010x} read={value:#x} write={write}");
                }
                Err(info) if info != crate::fixup::exinfo(13, 0) => {
                    shown += 1;
                    println!("msr-sweep {msr:#010x} read=fault({info:#x}) write={write}");
                }
                Err(_) => {}
            }
        }
    }
    println!("msr-sweep done: {swept} MSRs swept, {shown} shown");
}
