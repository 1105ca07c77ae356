//! The `domU/lifecycle` row: the test kernel's `lifecycle` suite as an xl domU with 2
//! vCPUs, driven by the dom0 through `xl save`/`xl restore`,
//! a cancelled save (`xl save -c`), `xl migrate` to localhost and `xl vcpu-set`, then
//! `xl shutdown`; the row states what happened, from the guest's own lines.

use std::path::Path;
use std::time::{Duration, Instant};

use xenmsr_runner::guestlog::GuestLog;
use xenmsr_runner::initramfs::Lifecycle;
use xenmsr_runner::xl::{self, DomuOptions};

use crate::{SuiteResult, cache_dir, print_guest_tests, provisioner};

/// The row's name.
pub const ROW: &str = "domU/lifecycle";

/// What the dom0 does to the guest. No live migration: Debian's Xen 4.17 (and 4.20) is
/// built without `CONFIG_SHADOW_PAGING`, and a PV guest's live migration needs shadow
/// paging for its log-dirty rounds (`xl migrate` fails at once with "Failed to enable
/// logdirty: 95" – EOPNOTSUPP – before the guest is asked anything); the hypervisor we
/// build (4.22) has no matching toolstack here. `docs/lifecycle.md` says what that leaves
/// unproved.
pub const PLAN: Lifecycle = Lifecycle {
    saves: 5,
    cancelled: 1,
    migrations: 0,
    vcpu_sets: 3,
};

/// Under TCG a save or restore of the 64 MiB guest takes seconds, a live migration
/// (shadow paging for the log-dirty rounds) tens of seconds.
const DEADLINE: Duration = Duration::from_secs(1500);

/// qemu64, as the other xl rows: Linux 6.1 as dom0 does not boot on QEMU's EPYC model
/// under TCG, the one model whose vPMU Xen initialises, so the guest's vPMU is off here
/// (the vPMU half of suspend/resume is proved through the mock page on the host).
/// qemu64 with RDTSCP, so that the guest has TSC_AUX to write before a save and check
/// after it (Xen carries it only when nonzero). TCG has no SPEC_CTRL (QEMU: "TCG doesn't
/// support requested feature: spec-ctrl"): its save/restore is checked only on hardware
/// that has it.
const QEMU_CPU: &str = "qemu64,+rdtscp";

const ARGS: &str = "suite=lifecycle cpu=qemu64 vpmu=0 vcpus=2 xen=4.17 xenbuild=release";

/// The counts the guest's lines give.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// `lifecycle: resumed (new domain) #N after P ms`: (N, P) in order.
    pub new_domains: Vec<(u64, u64)>,
    /// `lifecycle: resumed (cancelled) #N after P ms`.
    pub cancelled: Vec<(u64, u64)>,
    /// `lifecycle: vCPU 1 online #N`.
    pub vcpu_cycles: u64,
    /// The guest's closing totals line, if it printed one.
    pub totals: Option<String>,
}

/// Reads the counts from the guest's console log.
pub fn counts(console: &str) -> Counts {
    let mut c = Counts::default();
    for line in console.lines() {
        let resumed = |kind: &str| -> Option<(u64, u64)> {
            let rest = line
                .split_once(&format!("lifecycle: resumed ({kind}) #"))?
                .1;
            let (n, rest) = rest.split_once(" after ")?;
            let ms = rest.split_whitespace().next()?;
            Some((n.parse().ok()?, ms.parse().ok()?))
        };
        if let Some(r) = resumed("new domain") {
            c.new_domains.push(r);
        } else if let Some(r) = resumed("cancelled") {
            c.cancelled.push(r);
        } else if line.contains("lifecycle: vCPU 1 online #") {
            c.vcpu_cycles += 1;
        } else if let Some((_, totals)) = line.split_once("lifecycle: ")
            && totals.contains("restores/migrations")
        {
            c.totals = Some(totals.trim().to_string());
        }
    }
    c
}

/// Runs the row.
pub fn test(kernel: &Path) -> SuiteResult {
    eprintln!("xtask: {ROW}: save/restore, migrate and vcpu-set of a 2-vCPU domU");
    let start = Instant::now();
    let opts = DomuOptions {
        args: ARGS.to_string(),
        deadline: DEADLINE,
        memory_mib: 64,
        vcpus: 2,
        verbose: std::env::var_os("XENMSR_XL_VERBOSE").is_some(),
        echo_console: false,
        cpu: Some(QEMU_CPU.to_string()),
        xen_args: Vec::new(),
        lifecycle: Some(PLAN),
    };
    let outcome = match xl::run_domu(&provisioner(), kernel, &opts) {
        Err(e) => Err(e.to_string()),
        Ok(run) => {
            let logs = cache_dir().join("logs");
            let _ = std::fs::create_dir_all(&logs);
            let _ = std::fs::write(logs.join("domU-lifecycle.console.log"), &run.console_log);
            let _ = std::fs::write(logs.join("domU-lifecycle.serial.log"), &run.serial_log);
            let log = GuestLog::parse(&run.console_log);
            print_guest_tests(ROW, &log);
            let c = counts(&run.console_log);
            let migrations = c.new_domains.len().saturating_sub(PLAN.saves as usize);
            let longest_migration_pause = c
                .new_domains
                .iter()
                .skip(PLAN.saves as usize)
                .map(|&(_, ms)| ms)
                .max()
                .unwrap_or(0);
            let longest_save_pause = c
                .new_domains
                .iter()
                .take(PLAN.saves as usize)
                .map(|&(_, ms)| ms)
                .max()
                .unwrap_or(0);
            let migrated = if PLAN.migrations == 0 {
                "no migration (Xen 4.17 built without shadow paging)".to_string()
            } else {
                format!("{migrations} migrations (longest pause {longest_migration_pause} ms)")
            };
            let summary = format!(
                "{} save/restore (longest pause {longest_save_pause} ms), {} cancelled, {migrated}, vCPU 1 down/up {}; guest: {}",
                c.new_domains.len().min(PLAN.saves as usize),
                c.cancelled.len(),
                c.vcpu_cycles,
                c.totals.as_deref().unwrap_or("no totals line")
            );
            let expected = c.new_domains.len() == (PLAN.saves + PLAN.migrations) as usize
                && c.cancelled.len() == PLAN.cancelled as usize
                && c.vcpu_cycles == u64::from(PLAN.vcpu_sets);
            match log.verdict() {
                Ok(()) if expected && run.passed() => Ok(format!(
                    "{summary} ({:?}, {})",
                    run.guest_end,
                    run.shutdown_reason()
                        .map_or("no shutdown reason".to_string(), |r| r.to_string())
                )),
                Ok(()) => Err(format!(
                    "{summary}: not what the plan {PLAN:?} asked (domU ended: {:?})",
                    run.guest_end
                )),
                Err(why) => {
                    for line in run
                        .console_log
                        .lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                    {
                        eprintln!("{line}");
                    }
                    let failed: Vec<String> = log
                        .failures()
                        .map(|t| format!("{} ({})", t.name, t.reason.as_deref().unwrap_or("")))
                        .collect();
                    Err(format!(
                        "{why}; {summary} (domU ended: {:?}); failed: {}",
                        run.guest_end,
                        failed.join(", ")
                    ))
                }
            }
        }
    };
    SuiteResult {
        name: ROW.to_string(),
        wall: start.elapsed(),
        outcome,
        report: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_from_the_guest_lines() {
        let log = "lifecycle: ready (2 vCPUs, vPMU on)\n\
            lifecycle: resumed (new domain) #1 after 5230 ms; vPMU 2 registered again\n\
            lifecycle: resumed (cancelled) #1 after 800 ms; vPMU 2 registered again\n\
            lifecycle: resumed (new domain) #2 after 30120 ms; vPMU 2\n\
            lifecycle: vCPU 1 offline #1\n\
            lifecycle: vCPU 1 online #1, its values unchanged\n\
              lifecycle: 2 restores/migrations into a new domain, 1 cancelled\n";
        let c = counts(log);
        assert_eq!(c.new_domains, [(1, 5230), (2, 30120)]);
        assert_eq!(c.cancelled, [(1, 800)]);
        assert_eq!(c.vcpu_cycles, 1);
        assert_eq!(
            c.totals.as_deref(),
            Some("2 restores/migrations into a new domain, 1 cancelled")
        );
    }
}
