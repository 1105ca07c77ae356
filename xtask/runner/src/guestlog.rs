//! Parsing what the PV test kernel prints, wherever it came from (the serial line of a
//! dom0 run, or xenconsoled's log of a domU): one line per test, a summary, and XTF's
//! result line.
//!
//! ```text
//! test boot::ud2_is_recovered ... ok
//! test xen::rdpmc_is_gp ... FAILED
//!     reason: rdpmc 0: got Ok(0x0), expected Err(0x800d0000)
//! 20 passed, 1 failed
//! Test result: FAILURE
//! ```

/// One test line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestLine {
    /// The test's name.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// The reason line that followed a failure.
    pub reason: Option<String>,
}

/// What the kernel reported so far.
#[derive(Clone, Debug, Default)]
pub struct GuestLog {
    /// The test lines, in order.
    pub tests: Vec<TestLine>,
    /// `(passed, failed)` from the summary line.
    pub summary: Option<(u32, u32)>,
    /// The word after `Test result:` (`SUCCESS`, `FAILURE` ...).
    pub result: Option<String>,
    /// Lines of the kernel's that are neither tests nor the summary (banner, demo table,
    /// exception reports), for display.
    pub other: Vec<String>,
}

/// What one fed line was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// A `test ... ok|FAILED` line.
    Test,
    /// A reason line after a failure.
    Reason,
    /// The summary line.
    Summary,
    /// The result line.
    Result,
    /// A hypervisor line (`(XEN) ...`).
    Xen,
    /// Anything else.
    Other,
}

/// Removes ANSI escape sequences (SeaBIOS clears the screen) and carriage returns.
pub fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

impl GuestLog {
    /// Feeds one (cleaned) line.
    pub fn feed(&mut self, line: &str) -> LineKind {
        let t = line.trim();
        if t.starts_with("(XEN)") {
            return LineKind::Xen;
        }
        if let Some(rest) = t.strip_prefix("test ") {
            if let Some(name) = rest.strip_suffix(" ... ok") {
                self.tests.push(TestLine {
                    name: name.to_string(),
                    ok: true,
                    reason: None,
                });
                return LineKind::Test;
            }
            if let Some(name) = rest.strip_suffix(" ... FAILED") {
                self.tests.push(TestLine {
                    name: name.to_string(),
                    ok: false,
                    reason: None,
                });
                return LineKind::Test;
            }
        }
        if let Some(reason) = t.strip_prefix("reason: ")
            && let Some(last) = self
                .tests
                .last_mut()
                .filter(|l| !l.ok && l.reason.is_none())
        {
            last.reason = Some(reason.to_string());
            return LineKind::Reason;
        }
        if let Some(summary) = parse_summary(t) {
            self.summary = Some(summary);
            return LineKind::Summary;
        }
        if let Some(result) = t.split_once("Test result:").map(|(_, r)| r.trim()) {
            self.result = Some(result.to_string());
            return LineKind::Result;
        }
        if !t.is_empty() {
            self.other.push(t.to_string());
        }
        LineKind::Other
    }

    /// The kernel's SMP report lines: how many vCPUs came up, each vCPU's stress totals,
    /// where its upcalls landed, and the totals inside stubs and call sites.
    pub fn smp_report(&self) -> Vec<String> {
        self.other
            .iter()
            .filter(|l| {
                l.starts_with("smp: ")
                    || l.starts_with("upcalls: ")
                    || l.starts_with("hotplug: ")
                    || l.starts_with("shutdown: ")
                    || ((l.starts_with("stress: vCPU") || l.starts_with("hotplug stress: vCPU"))
                        && !l.contains("seed"))
            })
            .cloned()
            .collect()
    }

    /// `(vCPUs, upcalls inside a stub, upcalls at a call site)` from the SMP report.
    pub fn upcall_summary(&self) -> Option<(u32, u64, u64)> {
        let vcpus = self.other.iter().find_map(|l| {
            l.strip_prefix("smp: ")?
                .strip_suffix(" vCPUs up")?
                .parse()
                .ok()
        })?;
        let (stub, site) = self.other.iter().find_map(|l| {
            let rest = l.strip_prefix("upcalls: inside a stub ")?;
            let (stub, site) = rest.split_once(", at a call site ")?;
            Some((stub.parse().ok()?, site.parse().ok()?))
        })?;
        Some((vcpus, stub, site))
    }

    /// The down/up cycles of each vCPU the hotplug churn took down, in vCPU order, from
    /// its `hotplug: vCPU N: C down/up cycles` lines (empty when it did not run).
    pub fn hotplug_cycles(&self) -> Vec<(u32, u64)> {
        let mut cycles: Vec<(u32, u64)> = self
            .other
            .iter()
            .filter_map(|l| {
                let (vcpu, rest) = l.strip_prefix("hotplug: vCPU ")?.split_once(": ")?;
                let (count, _) = rest.split_once(" down/up cycles")?;
                Some((vcpu.parse().ok()?, count.parse().ok()?))
            })
            .collect();
        cycles.sort_unstable();
        cycles
    }

    /// Parses a whole log.
    pub fn parse(text: &str) -> GuestLog {
        let mut log = GuestLog::default();
        for line in text.lines() {
            log.feed(&clean(line));
        }
        log
    }

    /// The failed tests.
    pub fn failures(&self) -> impl Iterator<Item = &TestLine> {
        self.tests.iter().filter(|t| !t.ok)
    }

    /// Checks that the log is a complete, consistent, successful run: the result line says
    /// SUCCESS, the summary is there and counts no failure, and it agrees with the test
    /// lines. The error says what is wrong.
    pub fn verdict(&self) -> Result<(), String> {
        let ok = self.tests.iter().filter(|t| t.ok).count() as u32;
        let failed = self.tests.len() as u32 - ok;
        match self.result.as_deref() {
            None => return Err("no `Test result:` line".into()),
            Some("SUCCESS") => {}
            Some(other) => return Err(format!("Test result: {other}")),
        }
        let Some((passed, summary_failed)) = self.summary else {
            return Err("no summary line".into());
        };
        if summary_failed != 0 || failed != 0 {
            return Err(format!("{} test(s) failed", summary_failed.max(failed)));
        }
        if passed == 0 {
            return Err("no test ran".into());
        }
        if passed != ok {
            return Err(format!(
                "the summary counts {passed} passed but {ok} `ok` lines were seen"
            ));
        }
        Ok(())
    }
}

fn parse_summary(line: &str) -> Option<(u32, u32)> {
    let (p, rest) = line.split_once(" passed, ")?;
    let f = rest.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\x1b[2Jxenmsr-pvkernel: dom0\r\n\
        test a ... ok\n\
        (XEN) something\n\
        test b ... ok\n\
        2 passed, 0 failed\n\
        Test result: SUCCESS\n";

    #[test]
    fn good_run_passes() {
        let log = GuestLog::parse(GOOD);
        assert_eq!(log.tests.len(), 2);
        assert_eq!(log.summary, Some((2, 0)));
        assert_eq!(log.verdict(), Ok(()));
    }

    #[test]
    fn failure_is_named_with_reason() {
        let log = GuestLog::parse(
            "test a ... ok\ntest b ... FAILED\n    reason: got 1\n1 passed, 1 failed\nTest result: FAILURE\n",
        );
        let failed: Vec<_> = log.failures().collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].name, "b");
        assert_eq!(failed[0].reason.as_deref(), Some("got 1"));
        assert!(log.verdict().is_err());
    }

    #[test]
    fn missing_pieces_fail() {
        assert!(
            GuestLog::parse("test a ... ok\n1 passed, 0 failed\n")
                .verdict()
                .is_err()
        );
        assert!(
            GuestLog::parse("test a ... ok\nTest result: SUCCESS\n")
                .verdict()
                .is_err()
        );
        assert!(
            GuestLog::parse("0 passed, 0 failed\nTest result: SUCCESS\n")
                .verdict()
                .is_err()
        );
        // The summary must agree with the lines seen (a lost line is a failure).
        assert!(
            GuestLog::parse("test a ... ok\n2 passed, 0 failed\nTest result: SUCCESS\n")
                .verdict()
                .is_err()
        );
    }

    #[test]
    fn smp_report_is_collected() {
        let log = GuestLog::parse(
            "smp: 4 vCPUs up\n  stress: vCPU 1: seed 0x5, 10 operations\n  stress: vCPU 1: 7 ok, 3 #GP faults\n\
             upcalls: vCPU 1: 9 upcalls\nupcalls: inside a stub 5, at a call site 2\n",
        );
        assert_eq!(log.upcall_summary(), Some((4, 5, 2)));
        assert_eq!(
            log.smp_report(),
            [
                "smp: 4 vCPUs up",
                "stress: vCPU 1: 7 ok, 3 #GP faults",
                "upcalls: vCPU 1: 9 upcalls",
                "upcalls: inside a stub 5, at a call site 2"
            ]
        );
        assert_eq!(GuestLog::parse("test a ... ok\n").upcall_summary(), None);
    }

    #[test]
    fn hotplug_cycles_are_collected_per_vcpu() {
        let log = GuestLog::parse(
            "  hotplug stress: vCPU 0: seed 0x5, 10 operations\n  hotplug stress: vCPU 0: 7 ok\n\
             \x20 hotplug: vCPU 3: 200 down/up cycles, vPMU off\n  hotplug: vCPU 1: 199 down/up cycles, vPMU off\n",
        );
        assert_eq!(log.hotplug_cycles(), [(1, 199), (3, 200)]);
        assert_eq!(
            log.smp_report(),
            [
                "hotplug stress: vCPU 0: 7 ok",
                "hotplug: vCPU 3: 200 down/up cycles, vPMU off",
                "hotplug: vCPU 1: 199 down/up cycles, vPMU off"
            ]
        );
        assert!(
            GuestLog::parse("smp: 4 vCPUs up\n")
                .hotplug_cycles()
                .is_empty()
        );
    }

    #[test]
    fn clean_strips_escapes() {
        assert_eq!(clean("\x1b[?7l\x1b[2J(XEN) x\r"), "(XEN) x");
    }
}
