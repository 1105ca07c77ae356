//! `cargo xtask sweep`: what two hypervisors do differently with MSRs. Boots the test
//! kernel with `suite=sweep` (one vCPU: every MSR of the sweep ranges read bare, and what
//! was read written back) under each `--xen` on each `--cpu`, and prints every MSR whose
//! read result, value or write-back differs. The `xen` suite's release-dependent tests
//! come from such sweeps (see docs/testing.md).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::provision::{self, Xen};
use crate::qemu::{self, Echo};
use crate::{XtaskResult, kernel, provisioner, pvkernel_run};

/// MSRs whose value changes from one read to the next (time-stamp counter, APERF/MPERF),
/// compared by whether they read, not by value.
const VOLATILE: &[u32] = &[0x10, 0xe7, 0xe8];

/// One MSR's line: what its read gave and what its write-back did.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    read: String,
    write: String,
}

/// `cargo xtask sweep [--cpu MODEL]... --xen A --xen B [--vpmu]`.
pub fn cmd_sweep(args: &[String]) -> XtaskResult<()> {
    let mut cpus = Vec::new();
    let mut xens = Vec::new();
    let mut vpmu = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cpu" => cpus.push(it.next().ok_or("--cpu needs a QEMU CPU model")?.clone()),
            "--xen" => xens
                .push(Xen::parse(it.next().ok_or_else(|| {
                    format!("--xen needs one of {}", provision::XEN_CHOICES)
                })?)?),
            "--vpmu" => vpmu = true,
            other => return Err(format!("sweep: unknown option {other}").into()),
        }
    }
    if xens.len() != 2 {
        return Err("sweep: name exactly two hypervisors (--xen A --xen B)".into());
    }
    if cpus.is_empty() {
        cpus = vec!["qemu64".into(), "Skylake-Client".into(), "EPYC".into()];
    }
    let kernel = kernel::build()?;
    let prov = provisioner();
    let qemu_bin = prov.qemu()?;
    let mut total_differences = 0;
    for cpu in &cpus {
        let mut seen: Vec<BTreeMap<u32, Seen>> = Vec::new();
        for &xen in &xens {
            let binary = prov.xen_binary(xen)?;
            let run = pvkernel_run(
                format!("sweep-xen{}-{cpu}", xen.label()),
                xen,
                cpu,
                1,
                if vpmu { vec!["vpmu=1".into()] } else { vec![] },
                &format!("suite=sweep cpu={cpu} vpmu={}", u8::from(vpmu)),
                Duration::from_secs(300),
            );
            let report = qemu::run_dom0(&prov, &qemu_bin, &binary, &kernel, &run, Echo::Tests)?;
            if !report.passed() {
                report.print_failure();
                return Err(format!("the sweep under Xen {} failed", xen.label()).into());
            }
            seen.push(parse(&report.log.other));
        }
        let (a, b) = (&seen[0], &seen[1]);
        let msrs: std::collections::BTreeSet<u32> = a.keys().chain(b.keys()).copied().collect();
        let gp = Seen {
            read: "gp".into(),
            write: "-".into(),
        };
        println!(
            "\n{cpu}: {} MSRs readable or writable under Xen {}, {} under Xen {}",
            a.len(),
            xens[0].label(),
            b.len(),
            xens[1].label()
        );
        let mut differences = 0;
        for msr in msrs {
            let (x, y) = (a.get(&msr).unwrap_or(&gp), b.get(&msr).unwrap_or(&gp));
            let same = if VOLATILE.contains(&msr) {
                x.read.starts_with("0x") == y.read.starts_with("0x") && x.write == y.write
            } else {
                x == y
            };
            if !same {
                differences += 1;
                println!(
                    "  {msr:#010x}: Xen {} read={} write={} | Xen {} read={} write={}",
                    xens[0].label(),
                    x.read,
                    x.write,
                    xens[1].label(),
                    y.read,
                    y.write
                );
            }
        }
        println!("{cpu}: {differences} MSRs differ");
        total_differences += differences;
    }
    println!("\nsweep: {total_differences} differences in all");
    Ok(())
}

/// The `msr-sweep <msr> read=<...> write=<...>` lines of a log.
fn parse(lines: &[String]) -> BTreeMap<u32, Seen> {
    let mut map = BTreeMap::new();
    for line in lines {
        let Some(rest) = line.trim().strip_prefix("msr-sweep 0x") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(msr), Some(read), Some(write)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let (Ok(msr), Some(read), Some(write)) = (
            u32::from_str_radix(msr, 16),
            read.strip_prefix("read="),
            write.strip_prefix("write="),
        ) else {
            continue;
        };
        map.insert(
            msr,
            Seen {
                read: read.to_string(),
                write: write.to_string(),
            },
        );
    }
    map
}
