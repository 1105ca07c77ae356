//! The `xl create` path: a PV kernel as a domU under a Linux dom0, all under Xen 4.17
//! in QEMU TCG.
//!
//! Xen boots Debian's Linux as dom0 with the initramfs of [`crate::initramfs`]. Its
//! `/init` starts the toolstack, runs the kernel with `xl create`, waits for it to end,
//! and prints xenconsoled's log of the domU's console ring to dom0's console (hvc0, which
//! Xen writes to the serial port QEMU gives us on stdout), then xl's log of the domain
//! (its shutdown reason). This module drives QEMU with a hard deadline and parses that
//! output.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::RunnerResult;
use crate::initramfs::{self, DIAG_LINE, DOMU_LINE, GuestSpec, MARK, STOP_LINE, XL_LOG_LINE};
use crate::outcome::{Outcome, ShutdownReason, is_guest_panic_line, parse_xl_shutdown_line};
use crate::process::TempFile;
use crate::provision::Provisioner;

/// Xen's command line for the xl path, before the caller's additions.
const XEN_CMDLINE: &str = "console=com1 dom0_mem=768M,max:768M";

/// Xen's whole command line on the xl path, with `extra` words after the path's own.
pub fn xen_cmdline(extra: &[String]) -> String {
    std::iter::once(XEN_CMDLINE.to_string())
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The error of a run whose deadline passed before the guest's end was known.
#[derive(Debug)]
pub struct TimedOut(pub String);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}
/// dom0 Linux's command line (after the image name Xen drops).
const DOM0_CMDLINE: &str = "console=hvc0 quiet";
/// How many serial lines to show when something fails.
const TAIL_LINES: usize = 60;

/// How the domU ended, as the dom0 saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    /// The domain went away (poweroff, reboot or watchdog; all are `destroy`; xl's log
    /// says which: [`DomuRun::shutdown_reason`]).
    Gone,
    /// The domain crashed (kept by `on_crash = "preserve"`, then destroyed).
    Crashed,
    /// The domain was still running when the wait ran out (the host asked the dom0 to
    /// stop waiting shortly before its deadline).
    TimedOut,
}

/// The outcome of one boot of the xl path.
#[derive(Debug, Clone)]
pub struct DomuRun {
    /// The domU's console output (xenconsoled's log of its console ring), one `\n` per line.
    pub console_log: String,
    /// How the domU ended.
    pub guest_end: GuestEnd,
    /// `xl`'s own log of the domain (e.g. "shut down, reason code 0").
    pub xl_log: String,
    /// The whole serial output of the QEMU run (Xen, dom0 and the markers).
    pub serial_log: String,
    /// Wall time of the QEMU run.
    pub wall: Duration,
    /// Wall time from QEMU's start to `xl create` having returned.
    pub domu_started: Option<Duration>,
}

impl DomuRun {
    /// The domU printed `Test result: SUCCESS` last and then shut down (not crashed,
    /// not hung).
    pub fn passed(&self) -> bool {
        self.test_result() == Some(true) && self.guest_end == GuestEnd::Gone
    }

    /// The shutdown reason xl logged for the domain, if it logged one: the last one
    /// that ended it (a save or a migration makes the monitor log a suspend, code 2,
    /// before the domain runs on in a new domain).
    pub fn shutdown_reason(&self) -> Option<ShutdownReason> {
        self.xl_log
            .lines()
            .rev()
            .filter_map(parse_xl_shutdown_line)
            .find(|reason| *reason != ShutdownReason::Suspend)
    }

    /// How the domU ended, as the runner judges it (`deadline` is the run's, for a
    /// timeout): a panic line in its console, else the crashed state the dom0 found, else
    /// xl's shutdown reason.
    pub fn outcome(&self, deadline: Duration) -> Outcome {
        if let Some(line) = self.console_log.lines().find(|l| is_guest_panic_line(l)) {
            return Outcome::Panicked {
                line: line.trim().to_string(),
            };
        }
        match (self.guest_end, self.shutdown_reason()) {
            (GuestEnd::TimedOut, _) => Outcome::TimedOut { after: deadline },
            (GuestEnd::Crashed, _) => Outcome::Shutdown {
                reason: ShutdownReason::Crash,
                crashed_by_xen: None,
            },
            (GuestEnd::Gone, Some(reason)) => Outcome::Shutdown {
                reason,
                crashed_by_xen: None,
            },
            // Gone, but xl logged no reason: nothing says it ended well.
            (GuestEnd::Gone, None) => Outcome::DomainGone,
        }
    }

    /// The verdict the test kernel printed last: `Some(true)` for `Test result: SUCCESS`,
    /// `Some(false)` for any other `Test result:` line, `None` if it printed none.
    pub fn test_result(&self) -> Option<bool> {
        self.console_log
            .lines()
            .rev()
            .find_map(|l| l.split_once("Test result:"))
            .map(|(_, verdict)| verdict.trim() == "SUCCESS")
    }
}

/// Options of one xl-path run beyond the kernel.
#[derive(Debug, Clone)]
pub struct DomuOptions {
    /// The domU command line (`extra=` in its xl config), whole: nothing is added.
    pub args: String,
    /// Hard deadline for the QEMU run (provisioning is not counted).
    pub deadline: Duration,
    /// MiB of memory for the domU.
    pub memory_mib: u32,
    /// The domU's vCPUs.
    pub vcpus: u32,
    /// Echo every serial line (otherwise only the dom0's progress lines).
    pub verbose: bool,
    /// Echo the domU's console lines as they arrive.
    pub echo_console: bool,
    /// QEMU's `-cpu` model (`None`: QEMU's default, qemu64).
    pub cpu: Option<String>,
    /// Words added to Xen's command line (`vpmu=1`, ...).
    pub xen_args: Vec<String>,
    /// Drive the domU through its life (`xl save`/`restore`, a cancelled save,
    /// `xl migrate` to localhost, `xl vcpu-set`) once it prints `lifecycle: ready`, then
    /// `xl shutdown` it; `None`: only wait for it to end.
    pub lifecycle: Option<initramfs::Lifecycle>,
}

/// Boots `kernel` as a PV domU with command line `args` under a Linux dom0 (`xl create`)
/// and returns its console log. Provisions (and caches) everything first; `deadline`
/// bounds the QEMU run only. Errors are infrastructure failures (dom0 or toolstack
/// broken, deadline exceeded: [`TimedOut`]); the test verdict is in
/// [`DomuRun::test_result`].
pub fn run_domu_suite(
    prov: &Provisioner,
    kernel: &Path,
    args: &str,
    vcpus: u32,
    deadline: Duration,
) -> RunnerResult<DomuRun> {
    run_domu(
        prov,
        kernel,
        &DomuOptions {
            args: args.to_string(),
            deadline,
            memory_mib: 64,
            vcpus,
            verbose: std::env::var_os("XENMSR_XL_VERBOSE").is_some(),
            echo_console: false,
            cpu: None,
            xen_args: Vec::new(),
            lifecycle: None,
        },
    )
}

/// [`run_domu_suite`] with all the options.
pub fn run_domu(prov: &Provisioner, kernel: &Path, opts: &DomuOptions) -> RunnerResult<DomuRun> {
    let qemu = prov.qemu()?;
    let xen = prov.xen417_binary()?;
    let image = initramfs::dom0_image(prov)?;

    let secs = opts.deadline.as_secs();
    let guest = initramfs::guest_cpio(&GuestSpec {
        kernel,
        args: &opts.args,
        memory_mib: opts.memory_mib,
        vcpus: opts.vcpus,
        // A safety net only: `drive_qemu` stops the wait before the deadline.
        max_polls: secs.saturating_mul(25),
        lifecycle: opts.lifecycle,
    })?;
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let initrd = TempFile(prov.cache_dir().join("xl-dom0").join(format!(
        "run-{}-{}.cpio",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )));
    let mut data = std::fs::read(&image.base_cpio)?;
    data.extend_from_slice(&guest);
    std::fs::write(&initrd.0, data)?;

    for p in [&xen, &image.vmlinuz, &initrd.0] {
        if p.to_string_lossy().contains([',', ' ']) {
            return Err(format!(
                "QEMU's -initrd cannot take a path with ',' or ' ': {}",
                p.display()
            )
            .into());
        }
    }
    let mut cmd = Command::new(&qemu);
    cmd.args(["-nographic", "-no-reboot", "-smp", "2", "-m", "1536"])
        .args(["-monitor", "none", "-serial", "stdio"]);
    if let Some(cpu) = &opts.cpu {
        cmd.arg("-cpu").arg(crate::qemu::qemu_cpu(cpu));
    }
    cmd.arg("-kernel")
        .arg(&xen)
        .arg("-append")
        .arg(xen_cmdline(&opts.xen_args))
        .arg("-initrd")
        .arg(format!(
            "{} {DOM0_CMDLINE},{}",
            image.vmlinuz.display(),
            initrd.0.display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    prov.say(format_args!(
        "xl path: booting Xen + Linux dom0, domU {} (deadline {} s)",
        kernel.display(),
        secs
    ));
    // A failure has printed its serial tail; the caller says what failed.
    drive_qemu(prov, &mut cmd, opts)
}

/// Runs QEMU, reads its output line by line until the dom0 says it is done (or the
/// deadline passes), and parses the markers.
fn drive_qemu(prov: &Provisioner, cmd: &mut Command, opts: &DomuOptions) -> RunnerResult<DomuRun> {
    let start = Instant::now();
    let mut guard = QemuGuard(Some(
        cmd.spawn().map_err(|e| format!("starting {cmd:?}: {e}"))?,
    ));
    let child = guard.0.as_mut().ok_or("QEMU guard is empty")?;
    let (tx, rx) = mpsc::channel::<String>();
    // Serial input goes to dom0's console, where `/init` reads the stop request.
    let mut stdin = child.stdin.take();
    let stop_at = opts.deadline.saturating_sub(stop_margin(opts.deadline));
    let stdout = child.stdout.take().ok_or("QEMU: no stdout")?;
    let stderr = child.stderr.take().ok_or("QEMU: no stderr")?;
    spawn_line_reader(stdout, tx.clone(), "");
    spawn_line_reader(stderr, tx, "qemu: ");

    let mut serial: Vec<String> = Vec::new();
    let mut parser = Parser::default();
    let mut done_at: Option<Instant> = None;
    let mut stdin_keep = None;
    let mut timed_out = false;
    let outcome: Result<(), String> = loop {
        let now = Instant::now();
        let elapsed = now - start;
        if elapsed >= opts.deadline {
            timed_out = true;
            break Err(format!(
                "deadline of {} s passed (QEMU killed)",
                opts.deadline.as_secs()
            ));
        }
        if elapsed >= stop_at
            && parser.domu_started.is_some()
            && !parser.console_complete
            && let Some(mut input) = stdin.take()
        {
            prov.say(format_args!(
                "[{:5.1} s] the domU is still running; asking the dom0 to stop waiting and \
                 report",
                elapsed.as_secs_f64()
            ));
            let _ = writeln!(input, "{STOP_LINE}");
            let _ = input.flush();
            // Dropping `input` would close QEMU's stdin; keep it open.
            stdin_keep = Some(input);
        }
        // Once the dom0 is done, QEMU exits by itself after `poweroff -f`; do not wait
        // long for that.
        let mut wait = opts.deadline - elapsed;
        if elapsed < stop_at {
            wait = wait.min(stop_at - elapsed);
        }
        if let Some(at) = done_at {
            let grace = Duration::from_secs(3).saturating_sub(now - at);
            if grace.is_zero() {
                break Ok(());
            }
            wait = wait.min(grace);
        }
        match rx.recv_timeout(wait) {
            Ok(line) => {
                if opts.verbose {
                    eprintln!("  | {line}");
                } else if opts.echo_console
                    && let Some((_, console)) = line.split_once(DOMU_LINE)
                {
                    println!("{console}");
                }
                if let Some(progress) = parser.feed(&line) {
                    if !opts.verbose {
                        prov.say(format_args!("[{:5.1} s] {progress}", elapsed.as_secs_f64()));
                    }
                    if progress.starts_with("domU created") {
                        parser.domu_started = Some(elapsed);
                    }
                    if progress == "done" {
                        done_at = Some(Instant::now());
                    }
                }
                serial.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: QEMU has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
        }
    };
    guard.stop();
    drop(stdin_keep);
    let wall = start.elapsed();
    let serial_log = serial.join("\n");
    let log_path = prov.cache_dir().join("xl-last-serial.log");
    let _ = std::fs::write(&log_path, &serial_log);

    let failure = match (&outcome, &parser) {
        (Err(e), _) => Some(e.clone()),
        (Ok(()), p) if p.failure.is_some() => p.failure.clone(),
        (Ok(()), p) if !p.console_complete => Some(
            "QEMU exited before the dom0 printed the domU console log (see the serial tail)"
                .to_string(),
        ),
        _ => None,
    };
    if let Some(failure) = failure {
        prov.say(format_args!(
            "xl path: last {TAIL_LINES} serial lines (whole log: {}):",
            log_path.display()
        ));
        for line in serial.iter().skip(serial.len().saturating_sub(TAIL_LINES)) {
            eprintln!("  | {line}");
        }
        if !parser.console.is_empty() {
            prov.say(format_args!("xl path: the domU console up to the failure:"));
            for line in &parser.console {
                eprintln!("  domU| {line}");
            }
        }
        let message = format!("xl path: {failure} after {:.1} s", wall.as_secs_f64());
        return Err(if timed_out {
            Box::new(TimedOut(message))
        } else {
            message.into()
        });
    }
    prov.say(format_args!(
        "xl path: QEMU run took {:.1} s (domU started at {})",
        wall.as_secs_f64(),
        parser
            .domu_started
            .map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64()))
    ));
    Ok(DomuRun {
        console_log: parser.console.join("\n"),
        guest_end: parser.guest_end.unwrap_or(GuestEnd::TimedOut),
        xl_log: parser.xl_log.join("\n"),
        serial_log,
        wall,
        domu_started: parser.domu_started,
    })
}

/// How long before the deadline the host asks the dom0 to stop waiting for the domU,
/// so that it still reports how the domU ended (xl dmesg, xl's log).
fn stop_margin(deadline: Duration) -> Duration {
    (deadline / 4).clamp(Duration::from_secs(5), Duration::from_secs(20))
}

/// Parses the dom0's serial output.
#[derive(Debug, Default)]
struct Parser {
    in_console: bool,
    console_complete: bool,
    console: Vec<String>,
    xl_log: Vec<String>,
    guest_end: Option<GuestEnd>,
    failure: Option<String>,
    domu_started: Option<Duration>,
}

impl Parser {
    /// Takes one serial line; returns the dom0 progress message it carries, if any.
    fn feed(&mut self, line: &str) -> Option<String> {
        if let Some((_, rest)) = line.split_once(DOMU_LINE) {
            if self.in_console {
                self.console.push(rest.to_string());
            }
            return None;
        }
        if let Some((_, rest)) = line.split_once(XL_LOG_LINE) {
            self.xl_log.push(rest.to_string());
            return None;
        }
        if line.contains(DIAG_LINE) {
            return None;
        }
        let (_, msg) = line.split_once(MARK)?;
        let msg = msg.trim();
        if msg.contains("domU console begin") {
            self.in_console = true;
        } else if msg.contains("domU console end") {
            self.in_console = false;
            self.console_complete = true;
        } else if let Some(state) = msg.strip_prefix("guest-state ") {
            self.guest_end = Some(match state {
                "gone" => GuestEnd::Gone,
                "crashed" => GuestEnd::Crashed,
                // "stopped" (by the host) and "timeout" (the dom0's own bound)
                _ => GuestEnd::TimedOut,
            });
        } else if let Some(what) = msg.strip_prefix("FAIL ") {
            self.failure = Some(format!("dom0 step failed: {what}"));
        }
        Some(msg.to_string())
    }
}

/// Reads lines (lossily decoded, without `\r`) from `src` into `tx` until EOF.
fn spawn_line_reader(
    src: impl Read + Send + 'static,
    tx: mpsc::Sender<String>,
    prefix: &'static str,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Kills QEMU when dropped (deadline, error, panic).
struct QemuGuard(Option<Child>);

impl QemuGuard {
    fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let mut p = Parser::default();
        for line in [
            "(XEN) something",
            "XENMSR-XL: dom0 up at 5 s",
            "XENMSR-XL: guest-state gone",
            "XENMSR-XL: ===== domU console begin =====",
            "XENMSR-DOMU| hello",
            "(XEN) interleaved",
            "XENMSR-DOMU| Test result: SUCCESS",
            "XENMSR-XL: ===== domU console end =====",
            "XENMSR-XLLOG| Domain 1 has shut down, reason code 0 0x0",
        ] {
            p.feed(line);
        }
        assert!(p.console_complete);
        assert_eq!(p.console, ["hello", "Test result: SUCCESS"]);
        assert_eq!(p.guest_end, Some(GuestEnd::Gone));
        assert_eq!(p.xl_log.len(), 1);
        let run = DomuRun {
            console_log: p.console.join("\n"),
            guest_end: GuestEnd::Gone,
            xl_log: String::new(),
            serial_log: String::new(),
            wall: Duration::ZERO,
            domu_started: None,
        };
        assert_eq!(run.test_result(), Some(true));
    }

    fn run_with(guest_end: GuestEnd, console: &str, xl_log: &str) -> DomuRun {
        DomuRun {
            console_log: console.to_string(),
            guest_end,
            xl_log: xl_log.to_string(),
            serial_log: String::new(),
            wall: Duration::ZERO,
            domu_started: None,
        }
    }

    /// A saved and restored domain's xl logs: each monitor logs the suspend (code 2) it
    /// exits on; the reason that ended the domain is the last other one.
    #[test]
    fn suspends_are_not_the_end() {
        let xl_log = "Waiting for domain xenmsr-domu (domid 1) to die [pid 127]\n\
             Domain 1 has shut down, reason code 2 0x2\n\
             Domain has suspended.\n\
             Waiting for domain xenmsr-domu (domid 2) to die [pid 140]\n\
             Domain 2 has shut down, reason code 0 0x0\n\
             Action for shutdown reason code 0 is destroy";
        let run = run_with(GuestEnd::Gone, "Test result: SUCCESS", xl_log);
        assert_eq!(run.shutdown_reason(), Some(ShutdownReason::Poweroff));
        let only_suspended = run_with(
            GuestEnd::Gone,
            "",
            "Domain 1 has shut down, reason code 2 0x2\nDomain has suspended.",
        );
        assert_eq!(only_suspended.shutdown_reason(), None);
    }

    #[test]
    fn outcome_from_xl() {
        let deadline = Duration::from_secs(300);
        let log = |code: u32| {
            format!(
                "Waiting for domain xenmsr-domu (domid 1) to die [pid 127]\n\
                 Domain 1 has shut down, reason code {code} 0x{code:x}\n\
                 Action for shutdown reason code {code} is destroy"
            )
        };
        let status = |run: DomuRun| run.outcome(deadline).exit_status();
        assert_eq!(status(run_with(GuestEnd::Gone, "hello", &log(0))), 0);
        assert_eq!(status(run_with(GuestEnd::Gone, "hello", &log(1))), 0);
        assert_eq!(status(run_with(GuestEnd::Gone, "hello", &log(4))), 1);
        assert_eq!(status(run_with(GuestEnd::Crashed, "hello", &log(3))), 1);
        assert_eq!(status(run_with(GuestEnd::Gone, "hello", "")), 1);
        assert_eq!(status(run_with(GuestEnd::TimedOut, "hello", "")), 3);
        assert_eq!(
            status(run_with(
                GuestEnd::Gone,
                "k: panic: panicked at x.rs:1:1:",
                &log(0)
            )),
            1
        );
    }
}
