//! What failed in a `cargo test` run, read from libtest's output, so that a summary cut
//! from a long log still names the failed tests and why.

/// The failed tests seen so far, each with the first line it printed when it failed.
#[derive(Default, Debug)]
pub struct Failures {
    /// (test name, first message line) in the order libtest reported them.
    failed: Vec<(String, Option<String>)>,
    /// The test whose captured output is being read (`---- NAME stdout ----`).
    reading: Option<String>,
}

impl Failures {
    /// Reads one line of libtest's standard output.
    pub fn see(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            if !self.failed.iter().any(|(known, _)| known == name) {
                self.failed.push((name.to_string(), None));
            }
            return;
        }
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            self.reading = Some(name.to_string());
            return;
        }
        let Some(name) = self.reading.clone() else {
            return;
        };
        if line == "failures:" || line.starts_with("test result:") {
            self.reading = None;
            return;
        }
        let message = line.trim();
        // libtest's panic line: "thread 'NAME' panicked at FILE:LINE:COL:", its message on
        // the lines after it; take the location and the first message line.
        if message.is_empty() || message.starts_with("note: run with `RUST_BACKTRACE") {
            return;
        }
        if let Some(entry) = self.failed.iter_mut().find(|(known, _)| *known == name) {
            match &mut entry.1 {
                None => entry.1 = Some(message.to_string()),
                Some(first) if first.ends_with(':') && first.contains("panicked at") => {
                    first.push(' ');
                    first.push_str(message);
                }
                Some(_) => {}
            }
        }
    }

    /// "; failed: a (why), b (why)" or "" when no test was seen failing (a build error).
    pub fn summary(&self) -> String {
        if self.failed.is_empty() {
            return String::new();
        }
        let each: Vec<String> = self
            .failed
            .iter()
            .map(|(name, why)| match why {
                Some(why) => format!("{name} ({why})"),
                None => name.clone(),
            })
            .collect();
        format!("; failed: {}", each.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::Failures;

    #[test]
    fn names_each_failed_test_with_its_panic() {
        let mut f = Failures::default();
        for line in [
            "running 3 tests",
            "test good ... ok",
            "test bad_one ... FAILED",
            "test bad_two ... FAILED",
            "",
            "failures:",
            "",
            "---- bad_one stdout ----",
            "",
            "thread 'bad_one' panicked at tests/host/tests/x.rs:10:5:",
            "assertion `left == right` failed",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
            "",
            "---- bad_two stdout ----",
            "some output of the test",
            "",
            "failures:",
            "    bad_one",
            "    bad_two",
            "",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored",
        ] {
            f.see(line);
        }
        assert_eq!(
            f.summary(),
            "; failed: bad_one (thread 'bad_one' panicked at tests/host/tests/x.rs:10:5: \
             assertion `left == right` failed), bad_two (some output of the test)"
        );
    }

    #[test]
    fn a_run_without_failed_tests_adds_nothing() {
        let mut f = Failures::default();
        f.see("test good ... ok");
        f.see("test result: ok. 1 passed; 0 failed");
        assert_eq!(f.summary(), "");
    }
}
