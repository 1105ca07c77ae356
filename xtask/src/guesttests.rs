//! The minimal kernel's in-guest tests (`tests/minimal-kernel/tests/guest.rs`, a
//! `xenmsr::test_main!` kernel), built as `cargo test` builds them and booted as
//! `xenmsr-runner` boots a cargo test binary: the rows `minimal-kernel/cargo-test*`.
//!
//! One build (`cargo test --no-run --target x86_64-unknown-none --test guest`, the
//! executable's path taken from cargo's JSON messages), then one boot per row with the
//! row's kernel command line (what `cargo test -- WORDS` passes through the runner).
//! Each row requires the runner's exit status for the way the domain ended (0 for the
//! harness's poweroff, 1 for its crash), the test and summary lines it names, and a
//! summary that agrees with the test lines.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::qemu::{self, Dom0Run, Echo};
use crate::{SuiteResult, XtaskResult, cargo, kernel, provisioner, push_sharing_setup};

/// The package and its `harness = false` test target.
const PACKAGE: &str = "xenmsr-minimal-kernel";
const TEST_TARGET: &str = "guest";

/// One boot of the test binary.
struct Row {
    /// The row's name in the summary table.
    name: &'static str,
    /// The kernel's command line.
    args: &'static str,
    /// The runner's exit status the domain's end must map to.
    exit_status: i32,
    /// Lines that must appear, in this order (each a prefix of a line).
    lines: &'static [&'static str],
    /// What the summary must say beyond agreeing with the test lines.
    summary: fn(&Summary) -> Result<(), String>,
}

const ROWS: [Row; 4] = [
    Row {
        name: "minimal-kernel/cargo-test",
        args: "",
        exit_status: 0,
        lines: &[
            "running ",
            "test fs_base_round_trip ... ok",
            "test result: ok. ",
        ],
        summary: |s| {
            expect(
                s.failed == 0 && s.not_run == 0 && s.filtered_out == 0 && s.passed > 0,
                "every test passed",
            )
        },
    },
    // The failure path: one failing test among passing ones crashes the domain.
    Row {
        name: "minimal-kernel/cargo-test-failing",
        args: "msr_is_refused xenmsr_selftest_fail",
        exit_status: 1,
        lines: &[
            "running 2 tests",
            "test xenmsr_selftest_fail ... FAILED: ",
            "test unknown_msr_is_refused ... ok",
            "test result: FAILED. 1 passed; 1 failed; 0 not run; ",
        ],
        summary: |s| expect(s.passed == 1 && s.failed == 1, "1 passed, 1 failed"),
    },
    // A panicking test: its line, the tests after it not run, and a crash.
    Row {
        name: "minimal-kernel/cargo-test-panicking",
        args: "guarded xenmsr_selftest_panic",
        exit_status: 1,
        lines: &[
            "running ",
            "test xenmsr_selftest_panic ... FAILED: panicked at ",
            "test result: FAILED. 0 passed; 1 failed; ",
        ],
        summary: |s| expect(s.failed == 1 && s.not_run > 0, "1 failed, the rest not run"),
    },
    // A filter that selects nothing is a success, as with libtest (`cargo test -- NAME`
    // runs every test target, and most have no test NAME).
    Row {
        name: "minimal-kernel/cargo-test-filtered",
        args: "no_test_is_named_this",
        exit_status: 0,
        lines: &[
            "running 0 tests",
            "test result: ok. 0 passed; 0 failed; 0 not run; ",
        ],
        summary: |s| expect(s.filtered_out > 0, "every test filtered out"),
    },
];

fn expect(holds: bool, what: &str) -> Result<(), String> {
    if holds {
        Ok(())
    } else {
        Err(format!("the summary does not say: {what}"))
    }
}

/// Whether any of the rows is wanted (`--only`).
pub fn any_wanted(wanted: &dyn Fn(&str) -> bool) -> bool {
    ROWS.iter().any(|row| wanted(row.name))
}

/// Builds the test binary once and runs the wanted rows under Xen 4.17.
pub fn run(wanted: &dyn Fn(&str) -> bool, deadline: Duration) -> Vec<SuiteResult> {
    let start = Instant::now();
    let binary = build();
    let mut results = Vec::new();
    for row in ROWS.iter().filter(|row| wanted(row.name)) {
        let row_start = Instant::now();
        let outcome = match &binary {
            Ok(binary) => boot(row, binary, deadline),
            Err(e) => Err(format!("cargo test --no-run ... --test {TEST_TARGET}: {e}")),
        };
        // The first row carries the build.
        push_sharing_setup(&mut results, row.name, start, row_start, outcome);
    }
    results
}

/// `cargo test --no-run` of the test target for the bare-metal target; the executable's
/// path from cargo's `compiler-artifact` message for it.
fn build() -> XtaskResult<PathBuf> {
    kernel::rust_target()?;
    eprintln!(
        "xtask: building {PACKAGE}'s test target {TEST_TARGET} ({}, cargo test --no-run)",
        kernel::TARGET
    );
    let output = cargo()
        .args([
            "test",
            "--no-run",
            "--target",
            kernel::TARGET,
            "--package",
            PACKAGE,
            "--test",
            TEST_TARGET,
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !output.status.success() {
        return Err(format!("cargo failed: {}", output.status).into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(test_executable)
        .map(PathBuf::from)
        .ok_or_else(|| "cargo named no executable for the test target".into())
}

/// The executable of a `compiler-artifact` message for the test target, if `line` is one.
fn test_executable(line: &str) -> Option<String> {
    let is_it = line.contains(r#""reason":"compiler-artifact""#)
        && line.contains(r#""kind":["test"]"#)
        && line.contains(&format!(r#""name":"{TEST_TARGET}""#));
    if !is_it {
        return None;
    }
    json_string(line, "executable")
}

/// The string value of `"key":"..."` in one JSON object's text (cargo writes no spaces
/// there), unescaped.
fn json_string(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!(r#""{key}":""#))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = json[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => value.push(other), // \" \\ \/
            },
            c => value.push(c),
        }
    }
}

/// What the summary line says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    ok: bool,
    passed: u32,
    failed: u32,
    not_run: u32,
    filtered_out: u32,
}

impl Summary {
    /// `test result: ok. 3 passed; 0 failed; 0 not run; 1 filtered out`.
    fn parse(line: &str) -> Option<Summary> {
        let rest = line.strip_prefix("test result: ")?;
        let (verdict, counts) = rest.split_once(". ")?;
        let mut numbers = counts.split("; ").map(|part| {
            let (n, _) = part.split_once(' ')?;
            n.parse::<u32>().ok()
        });
        let mut next = || numbers.next().flatten();
        Some(Summary {
            ok: verdict == "ok",
            passed: next()?,
            failed: next()?,
            not_run: next()?,
            filtered_out: next()?,
        })
    }
}

/// Checks the guest's lines against the row: the lines in order, one summary that agrees
/// with the test lines and the `running N tests` line, and the row's own condition.
fn judge(row: &Row, lines: &[String]) -> Result<Summary, String> {
    let mut at = 0;
    for want in row.lines {
        match lines[at..].iter().position(|l| l.starts_with(want)) {
            Some(i) => at += i + 1,
            None => return Err(format!("no line {want:?} (in order)")),
        }
    }
    let summaries: Vec<Summary> = lines.iter().filter_map(|l| Summary::parse(l)).collect();
    let [summary] = <[Summary; 1]>::try_from(summaries)
        .map_err(|all| format!("{} summary lines, not one", all.len()))?;
    let count = |suffix: &str| {
        lines
            .iter()
            .filter(|l| l.starts_with("test ") && l.contains(suffix))
            .count() as u32
    };
    let (ok, failed) = (count(" ... ok"), count(" ... FAILED"));
    if (summary.passed, summary.failed) != (ok, failed) {
        return Err(format!(
            "the summary counts {} passed, {} failed, but the test lines {ok} and {failed}",
            summary.passed, summary.failed
        ));
    }
    let running = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("running ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .ok_or("no `running N tests` line")?;
    if running != summary.passed + summary.failed + summary.not_run {
        return Err(format!(
            "{running} tests were to run, the summary accounts for {}",
            summary.passed + summary.failed + summary.not_run
        ));
    }
    if summary.ok != (summary.failed == 0 && summary.not_run == 0) {
        return Err("the summary's verdict disagrees with its counts".into());
    }
    (row.summary)(&summary)?;
    Ok(summary)
}

/// Boots the binary with the row's command line as `xenmsr-runner` does (dom0, one vCPU,
/// qemu64, Xen 4.17) and judges the run.
fn boot(row: &Row, binary: &std::path::Path, deadline: Duration) -> Result<String, String> {
    let prov = provisioner();
    let xen = crate::provision::Xen::V4_17;
    let (qemu_binary, xen_binary) = prov
        .qemu()
        .and_then(|q| Ok((q, prov.xen_binary(xen)?)))
        .map_err(|e| e.to_string())?;
    let run = Dom0Run {
        name: row.name.to_string(),
        cpu: "qemu64".to_string(),
        smp: 1,
        xen_args: vec!["dom0_max_vcpus=1".to_string()],
        kernel_args: row.args.to_string(),
        deadline,
        xen,
        banner: None,
    };
    eprintln!(
        "xtask: {}: {} as dom0 under Xen {}, kernel command line {:?}",
        row.name,
        binary.display(),
        xen.label(),
        row.args
    );
    let report = qemu::run_dom0(
        &prov,
        &qemu_binary,
        &xen_binary,
        binary,
        &run,
        Echo::Console,
    )
    .map_err(|e| e.to_string())?;
    let serial = std::fs::read_to_string(&report.log_path)
        .map_err(|e| format!("{}: {e}", report.log_path.display()))?;
    // The guest's lines: everything Xen did not print itself.
    let lines: Vec<String> = serial
        .lines()
        .filter(|l| !l.contains("(XEN)"))
        .map(|l| l.trim().to_string())
        .collect();
    let status = report.outcome.exit_status();
    let verdict = judge(row, &lines).and_then(|summary| {
        if status == row.exit_status {
            Ok(summary)
        } else {
            Err(format!(
                "{}: runner exit status {status}, not {}",
                report.outcome, row.exit_status
            ))
        }
    });
    match verdict {
        Ok(summary) => Ok(format!(
            "{} passed, {} failed, {} not run, {} filtered out; {} (exit status {status})",
            summary.passed, summary.failed, summary.not_run, summary.filtered_out, report.outcome
        )),
        Err(why) => {
            for line in &report.tail {
                eprintln!("{line}");
            }
            Err(format!("{why}; serial log {}", report.log_path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_comes_from_the_test_targets_artifact() {
        let bin = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"xenmsr-minimal-kernel"},"executable":"/t/x"}"#;
        let test = r#"{"reason":"compiler-artifact","package_id":"p","target":{"kind":["test"],"crate_types":["bin"],"name":"guest","src_path":"/w/guest.rs"},"executable":"/t/x86_64-unknown-none/debug/deps/guest-0f\"q\\r\u0041","fresh":true}"#;
        let done = r#"{"reason":"build-finished","success":true}"#;
        assert_eq!(test_executable(bin), None);
        assert_eq!(test_executable(done), None);
        assert_eq!(
            test_executable(test).as_deref(),
            Some(r#"/t/x86_64-unknown-none/debug/deps/guest-0f"q\rA"#)
        );
    }

    #[test]
    fn summaries_parse_and_are_judged() {
        assert_eq!(
            Summary::parse("test result: FAILED. 1 passed; 2 failed; 3 not run; 4 filtered out"),
            Some(Summary {
                ok: false,
                passed: 1,
                failed: 2,
                not_run: 3,
                filtered_out: 4
            })
        );
        assert_eq!(Summary::parse("test result: ok. 1 passed; 2 failed"), None);
        let lines = |text: &str| text.lines().map(str::to_string).collect::<Vec<_>>();
        let good = lines(
            "running 2 tests (k)\ntest xenmsr_selftest_fail ... FAILED: a.rs:1:1: x\n\
             test unknown_msr_is_refused ... ok\n\
             test result: FAILED. 1 passed; 1 failed; 0 not run; 7 filtered out",
        );
        assert!(judge(&ROWS[1], &good).is_ok());
        // A lost test line, a wrong count, a missing summary: each is refused.
        assert!(
            judge(
                &ROWS[1],
                &good[..1]
                    .iter()
                    .chain(&good[2..])
                    .cloned()
                    .collect::<Vec<_>>()
            )
            .is_err()
        );
        let mut miscounted = good.clone();
        miscounted[3] = "test result: FAILED. 2 passed; 1 failed; 0 not run; 7 filtered out".into();
        assert!(judge(&ROWS[1], &miscounted).is_err());
        assert!(judge(&ROWS[1], &good[..3]).is_err());
        // The passing row refuses a run with a failure.
        assert!(judge(&ROWS[0], &good).is_err());
    }
}
