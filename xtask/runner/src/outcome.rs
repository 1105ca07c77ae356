//! How a guest's run ended, read from what Xen (dom0 runs) or `xl` (domU runs) said
//! about it, and the exit status that reports it.
//!
//! A dom0 is Xen's hardware domain: when it shuts down, Xen itself stops the machine and
//! says why on its console, one line per reason (`hwdom_shutdown` in Xen's
//! `xen/common/shutdown.c`; the same texts in 4.17, 4.20 and 4.22):
//!
//! | the dom0's `SCHEDOP_shutdown` reason | Xen's line (after `(XEN)` and a timestamp) | then |
//! |---|---|---|
//! | poweroff | `Hardware Dom0 halted: halting machine` | the CPUs halt, QEMU keeps running |
//! | reboot | `Hardware Dom0 shutdown: rebooting machine` | QEMU exits (`-no-reboot`) |
//! | crash | `Hardware Dom0 crashed: rebooting machine in 5 seconds.` | QEMU exits 5 s later |
//! | watchdog | `Hardware Dom0 shutdown: watchdog rebooting machine` | QEMU exits |
//! | soft reset | `Hardware domain 0 did unsupported soft reset, rebooting.` | QEMU exits |
//! | any other | `Hardware Dom0 shutdown (unknown reason N): rebooting machine in 5 seconds.` | QEMU exits 5 s later |
//!
//! When Xen crashes a domain itself (a fault it cannot deliver, such as one with no trap
//! handler registered) it first prints `Domain 0 (vcpu#0) crashed on cpu#0:` and the
//! registers, then the crash line above. A panic of Xen's own prints `Panic on CPU N:`.
//! Once one of these is seen the runner stops QEMU itself: after a poweroff it would never
//! exit.
//!
//! A domU's end is what `xl` logged for it: `Domain N has shut down, reason code R 0x..`
//! (R is the same `SHUTDOWN_*` number), or the crashed state the xl path's dom0 found it
//! in.

use std::fmt;
use std::time::Duration;

/// The exit statuses of `xenmsr-runner`.
pub mod exit_status {
    /// The guest ended well: it powered off, asked for a reboot, or wrote the success
    /// value to QEMU's `isa-debug-exit` port.
    pub const SUCCESS: i32 = 0;
    /// The guest failed: it crashed (its own `SHUTDOWN_crash`, or Xen crashed it), it
    /// printed a panic, Xen panicked, it ended another way (watchdog, soft reset,
    /// suspend), or it wrote a failure value to `isa-debug-exit`.
    pub const GUEST_FAILED: i32 = 1;
    /// The runner could not boot it: a usage error, or provisioning failed.
    pub const SETUP_FAILED: i32 = 2;
    /// The guest was still running at the deadline (`--timeout`).
    pub const TIMED_OUT: i32 = 3;
}

/// QEMU's exit status after a guest wrote 0x10 to its `isa-debug-exit` port (QEMU exits
/// with `value << 1 | 1`): the PV test kernel's success.
pub const DEBUG_EXIT_SUCCESS: i32 = 33;
/// The same for 0x11: the PV test kernel's failure.
pub const DEBUG_EXIT_FAILURE: i32 = 35;

/// Why a domain shut down: Xen's `SHUTDOWN_*` reason, as its console or `xl` gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// `SHUTDOWN_poweroff` (0).
    Poweroff,
    /// `SHUTDOWN_reboot` (1).
    Reboot,
    /// `SHUTDOWN_suspend` (2).
    Suspend,
    /// `SHUTDOWN_crash` (3): the guest's own, or Xen's when it crashed the domain.
    Crash,
    /// `SHUTDOWN_watchdog` (4).
    Watchdog,
    /// `SHUTDOWN_soft_reset` (5).
    SoftReset,
    /// Any other number.
    Unknown(u32),
}

impl ShutdownReason {
    /// The reason with Xen's number `code`.
    pub const fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Poweroff,
            1 => Self::Reboot,
            2 => Self::Suspend,
            3 => Self::Crash,
            4 => Self::Watchdog,
            5 => Self::SoftReset,
            other => Self::Unknown(other),
        }
    }

    /// Whether this is an orderly end: a poweroff, or a reboot request (a guest has
    /// nothing to reboot into under the runner, so a reboot is taken as "done, fine" too,
    /// as kernels that end with `SHUTDOWN_reboot` mean it).
    pub const fn is_orderly(self) -> bool {
        matches!(self, Self::Poweroff | Self::Reboot)
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Poweroff => write!(f, "poweroff"),
            Self::Reboot => write!(f, "reboot"),
            Self::Suspend => write!(f, "suspend"),
            Self::Crash => write!(f, "crash"),
            Self::Watchdog => write!(f, "watchdog"),
            Self::SoftReset => write!(f, "soft reset"),
            Self::Unknown(code) => write!(f, "unknown reason {code}"),
        }
    }
}

/// A line of Xen's console that tells how the run is ending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XenEvent {
    /// The hardware domain (dom0) shut down for this reason; Xen stops the machine.
    HardwareDomainShutdown(ShutdownReason),
    /// Xen crashed a domain itself (`Domain N (vcpu#M) crashed on cpu#K:`, or `Domain N
    /// reported crashed by domain M`); the shutdown line follows.
    DomainCrashed,
    /// Xen panicked (`Panic on CPU N:`).
    XenPanic,
}

/// What Xen's console line `line` says about the run's end, if anything. Only lines
/// Xen printed itself count (they carry `(XEN)`, maybe after firmware text on the same
/// serial line); the timestamp and the domain number are skipped.
pub fn parse_xen_line(line: &str) -> Option<XenEvent> {
    let (_, text) = line.split_once("(XEN)")?;
    let mut text = text.trim_start();
    // `console_timestamps=boot` (and the other styles) put `[...]` first.
    if text.starts_with('[')
        && let Some((_, rest)) = text.split_once(']')
    {
        text = rest.trim_start();
    }
    // The soft reset's line says `Hardware domain <N> did unsupported soft reset`.
    if let Some(rest) = text.strip_prefix("Hardware domain ") {
        return skip_number(rest)?
            .starts_with(" did unsupported soft reset")
            .then_some(XenEvent::HardwareDomainShutdown(ShutdownReason::SoftReset));
    }
    // `Hardware Dom<N> halted: ...`, `... shutdown: ...`, `... crashed: ...`,
    // `... shutdown (unknown reason R): ...`.
    if let Some(rest) = text.strip_prefix("Hardware Dom") {
        let rest = skip_number(rest)?;
        let reason = if rest.starts_with(" halted:") {
            ShutdownReason::Poweroff
        } else if rest.starts_with(" crashed:") {
            ShutdownReason::Crash
        } else if rest.starts_with(" shutdown: watchdog") {
            ShutdownReason::Watchdog
        } else if rest.starts_with(" shutdown: rebooting") {
            ShutdownReason::Reboot
        } else if let Some(code) = rest.strip_prefix(" shutdown (unknown reason ") {
            let digits: String = code.chars().take_while(char::is_ascii_digit).collect();
            ShutdownReason::Unknown(digits.parse().ok()?)
        } else {
            return None;
        };
        return Some(XenEvent::HardwareDomainShutdown(reason));
    }
    if let Some(rest) = text.strip_prefix("Domain ") {
        let rest = skip_number(rest)?;
        if (rest.starts_with(" (vcpu#") && rest.contains(") crashed on cpu#"))
            || rest.starts_with(" reported crashed by domain ")
        {
            return Some(XenEvent::DomainCrashed);
        }
        return None;
    }
    text.starts_with("Panic on CPU ")
        .then_some(XenEvent::XenPanic)
}

/// `rest` after a leading decimal number, or `None` if it does not start with one.
fn skip_number(rest: &str) -> Option<&str> {
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    (digits > 0).then(|| &rest[digits..])
}

/// Whether a line of the guest's own output reports a panic: Rust's panic message
/// (`panicked at ...`) or a kernel's panic handler's `panic: ...` / `PANIC: ...`.
/// Xen's lines never count.
pub fn is_guest_panic_line(line: &str) -> bool {
    if line.contains("(XEN)") {
        return false;
    }
    let lower = line.to_ascii_lowercase();
    lower.contains("panic: ") || lower.contains("panicked at ")
}

/// How a run ended, as the runner judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The domain shut down for `reason` (its own request, or Xen's crash of it).
    Shutdown {
        /// Xen's reason.
        reason: ShutdownReason,
        /// The line in which Xen said it crashed the domain itself, if it did.
        crashed_by_xen: Option<String>,
    },
    /// The guest wrote to QEMU's `isa-debug-exit` port, and QEMU exited with this status.
    DebugExit {
        /// QEMU's exit status ([`DEBUG_EXIT_SUCCESS`] is the success).
        qemu_status: i32,
    },
    /// The guest printed a panic line (whatever it did next).
    Panicked {
        /// The line.
        line: String,
    },
    /// Xen itself panicked.
    XenPanicked {
        /// Xen's panic line.
        line: String,
    },
    /// A domU went away without `xl` logging why.
    DomainGone,
    /// QEMU exited without any of the above (status, or `None` if a signal ended it).
    QemuExited {
        /// QEMU's exit status.
        status: Option<i32>,
    },
    /// The guest was still running at the deadline.
    TimedOut {
        /// The deadline.
        after: Duration,
    },
}

impl Outcome {
    /// The runner's exit status for this outcome (see [`exit_status`]).
    pub fn exit_status(&self) -> i32 {
        if self.succeeded() {
            exit_status::SUCCESS
        } else if matches!(self, Self::TimedOut { .. }) {
            exit_status::TIMED_OUT
        } else {
            exit_status::GUEST_FAILED
        }
    }

    /// Whether the guest ended well.
    pub fn succeeded(&self) -> bool {
        match self {
            Self::Shutdown {
                reason,
                crashed_by_xen,
            } => reason.is_orderly() && crashed_by_xen.is_none(),
            Self::DebugExit { qemu_status } => *qemu_status == DEBUG_EXIT_SUCCESS,
            _ => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shutdown {
                reason,
                crashed_by_xen: Some(line),
            } => write!(f, "Xen crashed the domain ({reason}; {line:?})"),
            Self::Shutdown {
                reason: ShutdownReason::Crash,
                crashed_by_xen: None,
            } => write!(f, "the domain crashed (SHUTDOWN_crash)"),
            Self::Shutdown { reason, .. } => write!(f, "the domain shut down ({reason})"),
            Self::DebugExit { qemu_status } => write!(
                f,
                "the guest wrote {:#x} to isa-debug-exit (QEMU exit {qemu_status}{})",
                qemu_status >> 1,
                if *qemu_status == DEBUG_EXIT_SUCCESS {
                    ": success"
                } else {
                    ": failure"
                }
            ),
            Self::Panicked { line } => write!(f, "the guest panicked ({line:?})"),
            Self::XenPanicked { line } => write!(f, "Xen panicked ({line:?})"),
            Self::DomainGone => write!(f, "the domain went away without xl logging why"),
            Self::QemuExited { status: Some(code) } => write!(
                f,
                "QEMU exited (status {code}) without Xen reporting how the domain ended"
            ),
            Self::QemuExited { status: None } => write!(f, "QEMU was killed by a signal"),
            Self::TimedOut { after } => write!(
                f,
                "the guest was still running after {} s (timeout)",
                after.as_secs()
            ),
        }
    }
}

/// What to do after a line: keep reading, or stop soon because the run is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Keep reading.
    Continue,
    /// The run is over: read what is still coming for `grace`, then stop QEMU (after a
    /// poweroff it would never exit by itself).
    StopAfter(Duration),
}

/// How long to keep reading after the domain's end (its last lines, Xen's last words).
pub const END_GRACE: Duration = Duration::from_millis(500);
/// How long to keep reading after Xen's panic line: its message follows.
pub const PANIC_GRACE: Duration = Duration::from_secs(1);

/// Follows a dom0 run's serial lines and judges how it ended.
#[derive(Clone, Debug, Default)]
pub struct Dom0Judge {
    shutdown: Option<ShutdownReason>,
    crashed_by_xen: Option<String>,
    xen_panic: Option<String>,
    guest_panic: Option<String>,
}

impl Dom0Judge {
    /// Takes one serial line (`guest` says whether it is the guest's own output, not
    /// Xen's or the firmware's); says whether the run is over.
    pub fn feed(&mut self, line: &str, guest: bool) -> Watch {
        if guest {
            if self.guest_panic.is_none() && is_guest_panic_line(line) {
                self.guest_panic = Some(line.trim().to_string());
            }
            return Watch::Continue;
        }
        match parse_xen_line(line) {
            Some(XenEvent::HardwareDomainShutdown(reason)) => {
                self.shutdown.get_or_insert(reason);
                Watch::StopAfter(END_GRACE)
            }
            Some(XenEvent::DomainCrashed) => {
                self.crashed_by_xen
                    .get_or_insert_with(|| xen_text(line).to_string());
                Watch::Continue
            }
            Some(XenEvent::XenPanic) => {
                self.xen_panic
                    .get_or_insert_with(|| xen_text(line).to_string());
                Watch::StopAfter(PANIC_GRACE)
            }
            None => Watch::Continue,
        }
    }

    /// Whether the guest's end (or Xen's) has been seen.
    pub fn ended(&self) -> bool {
        self.shutdown.is_some() || self.xen_panic.is_some()
    }

    /// The outcome, given how QEMU ended: its exit status (`None`: it was stopped, by the
    /// runner after the end or at the deadline) and whether the deadline `deadline` struck.
    pub fn finish(&self, qemu_status: Option<i32>, timed_out: bool, deadline: Duration) -> Outcome {
        if let Some(line) = &self.guest_panic {
            return Outcome::Panicked { line: line.clone() };
        }
        if let Some(line) = &self.xen_panic {
            return Outcome::XenPanicked { line: line.clone() };
        }
        if let Some(reason) = self.shutdown {
            return Outcome::Shutdown {
                reason,
                crashed_by_xen: self.crashed_by_xen.clone(),
            };
        }
        if self.crashed_by_xen.is_some() {
            // Cut short before Xen's shutdown line: the crash is what happened.
            return Outcome::Shutdown {
                reason: ShutdownReason::Crash,
                crashed_by_xen: self.crashed_by_xen.clone(),
            };
        }
        match qemu_status {
            _ if timed_out => Outcome::TimedOut { after: deadline },
            // isa-debug-exit makes QEMU exit with an odd status of 3 or more; QEMU's own
            // statuses are 0 (it ended normally, e.g. a reset under -no-reboot) and 1.
            Some(status) if status >= 3 && status % 2 == 1 => Outcome::DebugExit {
                qemu_status: status,
            },
            status => Outcome::QemuExited { status },
        }
    }
}

/// The text of a Xen console line after `(XEN)` and its timestamp.
fn xen_text(line: &str) -> &str {
    let text = line.split_once("(XEN)").map_or(line, |(_, t)| t).trim();
    match text.strip_prefix('[').and_then(|t| t.split_once(']')) {
        Some((_, rest)) => rest.trim(),
        None => text,
    }
}

/// The shutdown reason in a line of `xl`'s log of a domain: `Domain 1 has shut down,
/// reason code 0 0x0`.
pub fn parse_xl_shutdown_line(line: &str) -> Option<ShutdownReason> {
    let (_, rest) = line.split_once(" has shut down, reason code ")?;
    let code = rest.split_whitespace().next()?.parse().ok()?;
    Some(ShutdownReason::from_code(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(120);

    /// Xen's lines, as the hypervisors tried print them (4.17, 4.20, 4.22 and 4.22-debug
    /// print the same texts; `console_timestamps=boot` puts the time first).
    #[test]
    fn xen_shutdown_lines_are_recognised() {
        let cases = [
            (
                "(XEN) [    0.922036] Hardware Dom0 halted: halting machine",
                ShutdownReason::Poweroff,
            ),
            (
                "(XEN) [    0.922036] Hardware Dom0 shutdown: rebooting machine",
                ShutdownReason::Reboot,
            ),
            (
                "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.",
                ShutdownReason::Crash,
            ),
            (
                "(XEN) Hardware Dom0 shutdown: watchdog rebooting machine",
                ShutdownReason::Watchdog,
            ),
            (
                "(XEN) [   1.5] Hardware domain 0 did unsupported soft reset, rebooting.",
                ShutdownReason::SoftReset,
            ),
            (
                "(XEN) Hardware Dom0 shutdown (unknown reason 2): rebooting machine in 5 seconds.",
                ShutdownReason::Unknown(2),
            ),
            // A late hardware domain has another number.
            (
                "(XEN) Hardware Dom12 halted: halting machine",
                ShutdownReason::Poweroff,
            ),
        ];
        for (line, reason) in cases {
            assert_eq!(
                parse_xen_line(line),
                Some(XenEvent::HardwareDomainShutdown(reason)),
                "{line}"
            );
        }
    }

    #[test]
    fn xen_crash_and_panic_lines_are_recognised() {
        for line in [
            "(XEN) [    2.100000] Domain 0 (vcpu#1) crashed on cpu#0:",
            "(XEN) Domain 3 reported crashed by domain 0 on cpu#1:",
        ] {
            assert_eq!(
                parse_xen_line(line),
                Some(XenEvent::DomainCrashed),
                "{line}"
            );
        }
        assert_eq!(
            parse_xen_line("(XEN) [    3.000000] Panic on CPU 1:"),
            Some(XenEvent::XenPanic)
        );
    }

    #[test]
    fn other_lines_are_not_events() {
        for line in [
            "(XEN) [    0.849224] *** Serial input to DOM0 (type 'CTRL-a' three times to switch input)",
            "(XEN) Hardware Dom0 is ready",
            "(XEN) Domain 0 built",
            "(XEN) Domainx crashed on cpu#0:",
            // The guest cannot fake Xen's verdict by printing its text.
            "Hardware Dom0 halted: halting machine",
            "minimal: PASS",
        ] {
            assert_eq!(parse_xen_line(line), None, "{line}");
        }
    }

    #[test]
    fn firmware_text_before_xen_on_one_line_is_skipped() {
        assert_eq!(
            parse_xen_line("Booting from ROM..(XEN) Hardware Dom0 halted: halting machine"),
            Some(XenEvent::HardwareDomainShutdown(ShutdownReason::Poweroff))
        );
    }

    #[test]
    fn panic_lines_of_the_guest() {
        assert!(is_guest_panic_line(
            "minimal: panic: panicked at src/main.rs:3:5:"
        ));
        assert!(is_guest_panic_line(
            "PANIC: panicked at src/lib.rs:1:1: boom"
        ));
        assert!(is_guest_panic_line("panicked at kernel/src/main.rs:10:9:"));
        assert!(!is_guest_panic_line("test kit::panic_handler ... ok"));
        assert!(!is_guest_panic_line("(XEN) panic: not the guest's"));
    }

    fn judge(lines: &[(&str, bool)]) -> (Dom0Judge, Vec<Watch>) {
        let mut judge = Dom0Judge::default();
        let watches = lines.iter().map(|(l, g)| judge.feed(l, *g)).collect();
        (judge, watches)
    }

    #[test]
    fn a_poweroff_is_success_and_stops_the_run() {
        let (j, watches) = judge(&[
            ("(XEN) Freed 656kB init memory", false),
            ("minimal: PASS", true),
            (
                "(XEN) [    0.9] Hardware Dom0 halted: halting machine",
                false,
            ),
        ]);
        assert_eq!(watches[2], Watch::StopAfter(END_GRACE));
        assert!(j.ended());
        let outcome = j.finish(None, false, DEADLINE);
        assert_eq!(outcome.exit_status(), exit_status::SUCCESS, "{outcome}");
    }

    #[test]
    fn a_reboot_request_is_success() {
        let (j, _) = judge(&[("(XEN) Hardware Dom0 shutdown: rebooting machine", false)]);
        assert_eq!(j.finish(Some(0), false, DEADLINE).exit_status(), 0);
    }

    #[test]
    fn a_crash_is_failure() {
        let (j, _) = judge(&[(
            "(XEN) Hardware Dom0 crashed: rebooting machine in 5 seconds.",
            false,
        )]);
        assert_eq!(j.finish(None, false, DEADLINE).exit_status(), 1);
        // Xen crashing the domain (an unhandled trap) is a crash too, even when the run
        // was cut short before the shutdown line.
        let (j, _) = judge(&[("(XEN) Domain 0 (vcpu#0) crashed on cpu#0:", false)]);
        let outcome = j.finish(None, true, DEADLINE);
        assert_eq!(outcome.exit_status(), 1, "{outcome}");
    }

    #[test]
    fn a_guest_panic_fails_even_with_an_orderly_shutdown() {
        let (j, _) = judge(&[
            ("minimal: panic: panicked at src/main.rs:3:5:", true),
            ("(XEN) Hardware Dom0 shutdown: rebooting machine", false),
        ]);
        let outcome = j.finish(Some(0), false, DEADLINE);
        assert!(matches!(outcome, Outcome::Panicked { .. }), "{outcome}");
        assert_eq!(outcome.exit_status(), 1);
    }

    #[test]
    fn xen_panic_is_failure() {
        let (j, watches) = judge(&[("(XEN) Panic on CPU 0:", false)]);
        assert_eq!(watches[0], Watch::StopAfter(PANIC_GRACE));
        assert_eq!(j.finish(Some(0), false, DEADLINE).exit_status(), 1);
    }

    #[test]
    fn debug_exit_statuses() {
        let j = Dom0Judge::default();
        assert_eq!(j.finish(Some(33), false, DEADLINE).exit_status(), 0);
        assert_eq!(j.finish(Some(35), false, DEADLINE).exit_status(), 1);
        // QEMU's own exits with no word from Xen: failures.
        assert_eq!(j.finish(Some(0), false, DEADLINE).exit_status(), 1);
        assert_eq!(j.finish(Some(1), false, DEADLINE).exit_status(), 1);
    }

    #[test]
    fn a_timeout_has_its_own_status() {
        let outcome = Dom0Judge::default().finish(None, true, DEADLINE);
        assert_eq!(outcome, Outcome::TimedOut { after: DEADLINE });
        assert_eq!(outcome.exit_status(), exit_status::TIMED_OUT);
    }

    #[test]
    fn xl_shutdown_reasons() {
        assert_eq!(
            parse_xl_shutdown_line("Domain 1 has shut down, reason code 0 0x0"),
            Some(ShutdownReason::Poweroff)
        );
        assert_eq!(
            parse_xl_shutdown_line("Domain 7 has shut down, reason code 3 0x3"),
            Some(ShutdownReason::Crash)
        );
        assert_eq!(
            parse_xl_shutdown_line("Waiting for domain xenmsr-domu (domid 1) to die [pid 127]"),
            None
        );
    }
}
