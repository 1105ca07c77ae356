//! `cargo xtask bench`, SMP part: boots the kernel with `suite=smpbench` as a 4-vCPU dom0 on
//! 2 physical CPUs for each CPU model and turns its `smpbench-ratio` lines into the
//! "Scaling across vCPUs" table of `docs/benchmarks.md`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::provision::Xen;
use crate::qemu::{self, Echo};
use crate::{XtaskResult, kernel, provisioner, pvkernel_run};

/// vCPUs and physical CPUs of the SMP benchmark runs (as in `cargo xtask test`).
const VCPUS: u32 = 4;
const PCPUS: u32 = 2;
const DEADLINE: Duration = Duration::from_secs(600);
const MODELS: [&str; 3] = ["qemu64", "Skylake-Client", "EPYC"];

/// One `smpbench-ratio` line.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRatio {
    /// The workload.
    pub workload: String,
    /// vCPUs running at once.
    pub vcpus: u32,
    /// Median over rounds of (median vCPU's cost per op with all running) / (alone).
    pub median: f64,
    /// The smallest round ratio.
    pub min: f64,
    /// The largest round ratio.
    pub max: f64,
    /// (the smallest "all" cost) / (the smallest "alone" cost).
    pub of_minimums: f64,
}

/// Parses `smpbench-ratio <w> vcpus=<n> median=<r> min=<r> max=<r> of_minimums=<r>`.
pub fn parse_ratio(line: &str) -> Option<ScalingRatio> {
    let rest = line.trim().strip_prefix("smpbench-ratio ")?;
    let mut words = rest.split_whitespace();
    let workload = words.next()?.to_string();
    let mut field = |key: &str| -> Option<String> {
        let w = words.next()?;
        w.strip_prefix(key)?.strip_prefix('=').map(str::to_string)
    };
    Some(ScalingRatio {
        workload,
        vcpus: field("vcpus")?.parse().ok()?,
        median: field("median")?.parse().ok()?,
        min: field("min")?.parse().ok()?,
        max: field("max")?.parse().ok()?,
        of_minimums: field("of_minimums")?.parse().ok()?,
    })
}

/// Runs the SMP benchmark on every model and returns its Markdown subsection.
pub fn run() -> XtaskResult<String> {
    let kernel = kernel::build()?;
    let prov = provisioner();
    let qemu_bin = prov.qemu()?;
    let xen = prov.xen_binary(Xen::V4_17)?;
    let mut md = String::new();
    writeln!(md, "### Scaling across vCPUs")?;
    writeln!(md)?;
    writeln!(
        md,
        "`suite=smpbench`: a {VCPUS}-vCPU dom0 on {PCPUS} physical CPUs (QEMU `-smp {PCPUS}`, \
         Xen `dom0_max_vcpus={VCPUS}`), upcalls off. Each workload runs 15 rounds; a round \
         runs it once on vCPU 0 alone (the others parked in `SCHEDOP_poll`) and once on \
         every vCPU at once. The cost per operation is each vCPU's own *running* time from \
         Xen's run-state accounting, so time spent waiting for a physical CPU is not \
         counted. The ratio is the median vCPU's cost with all running over the cost alone: \
         1.0 means no slowdown from running together (no cache line that several vCPUs \
         write on a success path). \"of minimums\" divides the two smallest costs (noise \
         on a shared host only adds time)."
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| model | workload | ratio (median of rounds) | min-max | of minimums |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for model in MODELS {
        let run = pvkernel_run(
            format!("smpbench/{model}"),
            Xen::V4_17,
            model,
            PCPUS,
            vec![format!("dom0_max_vcpus={VCPUS}")],
            &format!("suite=smpbench cpu={model} vpmu=0 vcpus={VCPUS}"),
            DEADLINE,
        );
        eprintln!("xtask: bench: {}: {VCPUS} vCPUs on {PCPUS} CPUs", run.name);
        let report = qemu::run_dom0(&prov, &qemu_bin, &xen, &kernel, &run, Echo::Tests)?;
        if !report.passed() {
            report.print_failure();
            return Err(format!("{} failed", run.name).into());
        }
        let ratios: Vec<ScalingRatio> = report
            .log
            .other
            .iter()
            .filter_map(|l| parse_ratio(l))
            .collect();
        if ratios.is_empty() {
            return Err(format!("{}: no smpbench-ratio lines", run.name).into());
        }
        for r in ratios {
            println!(
                "smpbench {model}: {} on {} vCPUs: ratio {:.3} (min {:.3}, max {:.3}), of minimums {:.3}",
                r.workload, r.vcpus, r.median, r.min, r.max, r.of_minimums
            );
            writeln!(
                md,
                "| {model} | {} | {:.2} | {:.2}-{:.2} | {:.2} |",
                r.workload, r.median, r.min, r.max, r.of_minimums
            )?;
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_line_parses() {
        let r = parse_ratio(
            "smpbench-ratio stress vcpus=4 median=1.020 min=0.900 max=1.300 of_minimums=0.990",
        )
        .unwrap();
        assert_eq!(r.workload, "stress");
        assert_eq!(r.vcpus, 4);
        assert_eq!(
            (r.median, r.min, r.max, r.of_minimums),
            (1.02, 0.9, 1.3, 0.99)
        );
        assert_eq!(parse_ratio("smpbench stress round=1"), None);
        assert_eq!(parse_ratio("smpbench-ratio stress vcpus=x"), None);
    }
}
