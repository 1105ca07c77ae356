//! Booting a PV kernel as dom0, directly under Xen in QEMU (TCG), with a deadline.
//!
//! Xen is QEMU's multiboot `-kernel`; the PV kernel is the first multiboot module, whose
//! string (`"path arg arg"`) Xen hands to dom0 as its command line minus the first word.
//! The kernel prints on the serial line (through `console_io`). How the run ended is
//! judged by [`crate::outcome::Dom0Judge`] from Xen's console: the hardware domain's
//! shutdown line, a crash, a panic; or from QEMU's exit status when the kernel wrote to
//! `isa-debug-exit` (the PV test kernel's 33 = success, 35 = failure).
//!
//! The xenmsr PV test kernel's suites are judged on top of that by their test lines
//! ([`RunReport::verdict`]): the status alone cannot tell a lost test from a pass, and the
//! log alone cannot tell a complete run from one cut short.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::RunnerResult;
use crate::guestlog::{GuestLog, LineKind, clean};
use crate::outcome::{DEBUG_EXIT_FAILURE, DEBUG_EXIT_SUCCESS, Dom0Judge, Outcome, Watch};
use crate::process::TempFile;
use crate::provision::{Provisioner, Xen};

/// How many serial lines to show when a run fails.
pub const TAIL_LINES: usize = 60;
/// Xen's line just before it unpauses dom0 (`*** Serial input to DOM0 (type ...)`): the
/// guest runs from here on, unless [`Dom0Run::banner`] names the guest's own first line.
const DOM0_STARTS: &str = "*** Serial input to DOM";

/// One dom0 boot of a PV kernel.
#[derive(Clone, Debug)]
pub struct Dom0Run {
    /// A short name for reports and the saved log's file name (`dom0/qemu64`).
    pub name: String,
    /// QEMU's `-cpu`.
    pub cpu: String,
    /// QEMU's `-smp`: the physical CPUs Xen gets.
    pub smp: u32,
    /// Extra Xen command-line options (e.g. `vpmu=1`).
    pub xen_args: Vec<String>,
    /// The kernel's whole command line: nothing is added to it.
    pub kernel_args: String,
    /// Hard deadline for the QEMU run.
    pub deadline: Duration,
    /// The Xen release booted (the caller passes its binary to [`run_dom0`]); the run
    /// checks the build against Xen's banner.
    pub xen: Xen,
    /// How the kernel's first line starts (the PV test kernel's `xenmsr-pvkernel:`), if
    /// it prints a known one: the demo's echo starts there, and Xen's complaints after it
    /// are the guest's. `None`: from Xen's hand-over to dom0.
    pub banner: Option<String>,
}

/// What to echo while the run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Test, summary and result lines (progress).
    Tests,
    /// Every line the kernel prints from its banner on (not Xen's, not the firmware's),
    /// without the run-name prefix: the demo's view.
    Guest,
    /// A kernel of the user's own (the runner): every line after Xen's first that is not
    /// Xen's, and Xen's own lines once the run is ending (a crash's register dump, the
    /// shutdown line, a panic).
    Console,
    /// Everything, Xen's lines too, each prefixed with the run's name.
    All,
    /// Everything, as it comes.
    Serial,
}

/// The outcome of one run.
#[derive(Debug)]
pub struct RunReport {
    /// [`Dom0Run::name`].
    pub name: String,
    /// Wall time of the QEMU run.
    pub wall: Duration,
    /// QEMU's exit status (`None` if it was killed: at the deadline, or after the
    /// domain's end because a halted machine never exits).
    pub exit_code: Option<i32>,
    /// How the guest ended.
    pub outcome: Outcome,
    /// The PV test kernel's verdict: `Ok` if it reported success in its test lines, its
    /// `isa-debug-exit` status and Xen's banner and log; otherwise why not.
    pub verdict: Result<(), String>,
    /// What the kernel reported.
    pub log: GuestLog,
    /// The last [`TAIL_LINES`] serial lines.
    pub tail: Vec<String>,
    /// Where the whole serial log was saved.
    pub log_path: PathBuf,
    /// The QEMU command, for reproducing the run by hand.
    pub command: String,
    /// Xen's boot banner (`Xen version 4.22.0 (...) debug=y ...`), if it printed one.
    pub xen_banner: Option<String>,
    /// Whether the banner names the build the run asked for (part of `verdict` too).
    pub xen_build: Result<(), String>,
    /// How many log messages Xen's rate limit suppressed (`printk: N messages
    /// suppressed.`): with a debug build, the per-access guest warnings not printed.
    pub xen_suppressed: u64,
    /// What Xen itself reported as wrong while it ran: `Xen WARN`, `Assertion`,
    /// `Xen BUG` and `FATAL` lines (with the next line, which names the place), each
    /// marked with whether it came after the kernel's banner (while the guest ran).
    pub xen_complaints: Vec<XenComplaint>,
}

/// One line in which Xen reported a problem of its own (see [`RunReport::xen_complaints`]).
#[derive(Clone, Debug)]
pub struct XenComplaint {
    /// The line, as logged.
    pub line: String,
    /// Whether the kernel had printed its banner before it: a complaint from before
    /// (Xen's own boot) is the hypervisor's; one after may have been caused by the guest.
    pub while_guest_ran: bool,
}

/// Whether a Xen log line reports a problem of Xen's own: a `WARN_ON` (`Xen WARN at`),
/// a failed `ASSERT` (debug builds: `Assertion '...' failed at`), a `BUG`, or a panic.
/// A failed boot-time self-test (`Selftest N failed: ...`) counts too.
fn is_xen_complaint(line: &str) -> bool {
    [
        "Xen WARN at",
        "Assertion '",
        "Xen BUG at",
        "FATAL TRAP",
        "Panic on CPU",
    ]
    .iter()
    .any(|marker| line.contains(marker))
        || (line.contains("Selftest") && line.contains("failed"))
}

/// Whether a line of QEMU's is its warning that TCG lacks a feature of the CPU model
/// (EPYC and Skylake-Client each give a dozen, on every run): noise to a user, kept in
/// the log.
fn is_qemu_cpu_model_warning(line: &str) -> bool {
    line.contains("warning: TCG doesn't support requested feature")
}

impl RunReport {
    /// What Xen says it is (`4.22.0 debug=y`), from its banner.
    pub fn xen_identity(&self) -> String {
        let Some(banner) = &self.xen_banner else {
            return "no banner".to_string();
        };
        let version = banner
            .split("Xen version ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?");
        let debug = banner
            .split_whitespace()
            .find(|w| w.starts_with("debug="))
            .unwrap_or("debug=?");
        format!("{version} {debug}")
    }

    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.verdict.is_ok()
    }

    /// Prints why the run failed: the serial tail and the failing tests.
    pub fn print_failure(&self) {
        let Err(why) = &self.verdict else { return };
        eprintln!(
            "----- {}: last {} serial lines -----",
            self.name,
            self.tail.len()
        );
        for line in &self.tail {
            eprintln!("{line}");
        }
        eprintln!("----- {}: FAILED: {why} -----", self.name);
        eprintln!("  whole serial log: {}", self.log_path.display());
        eprintln!("  reproduce with: {}", self.command);
        for t in self.log.failures() {
            eprintln!(
                "  failed: {}{}",
                t.name,
                t.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Kills and reaps QEMU when dropped, so that no error path (or panic) leaves it running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Guest-caused log messages of a debug hypervisor, rate-limited. A debug Xen logs each
/// refused MSR access of a guest (`gdprintk`, compiled only into debug builds) at the
/// guest warning level; the suites make tens of thousands of those, and printing them all
/// through the emulated UART made the EPYC row run past 300 s. `error/all` prints guest
/// errors always and every other guest message rate-limited (Xen's printk limit: a burst
/// of 10 per 5 s, then a "suppressed" count). Xen's own messages (`loglvl=all`) are not
/// limited, so its WARNs and assertions all show.
pub const DEBUG_GUEST_LOGLVL: &str = "guest_loglvl=error/all";

/// The Xen command line of a dom0 run: the logging the runs rely on, then `extra`.
pub fn xen_cmdline(xen: Xen, extra: &[String]) -> String {
    // No `noreboot`: a dom0 crash must reboot so that `-no-reboot` ends QEMU (in 5 s)
    // instead of halting until the deadline. No `sync_console` either: it would make each
    // run ~5 s slower; the test kernel instead yields to Xen before its `isa-debug-exit`
    // write so the serial buffer drains, and a lost line fails the run (the summary must
    // match the test lines), it cannot fake a pass.
    let guest_loglvl = if xen.debug() {
        DEBUG_GUEST_LOGLVL
    } else {
        // A release build compiles the per-access messages out: nothing to limit.
        "guest_loglvl=all"
    };
    let mut s = format!("loglvl=all {guest_loglvl} console=com1 console_timestamps=boot");
    for a in extra {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// QEMU's `-cpu` value for a model. `EPYC` loses MONITOR/MWAIT: Xen's idle loop on an AMD
/// model issues MWAIT with ECX = 1 (break on interrupt), which QEMU's TCG answers with #GP,
/// and Xen panics as soon as a second physical CPU goes idle. No MSR the suites check
/// depends on it.
pub fn qemu_cpu(model: &str) -> String {
    match model {
        "EPYC" => "EPYC,-monitor".to_string(),
        other => other.to_string(),
    }
}

/// The multiboot module string QEMU's `-initrd` takes for the kernel: its path, then its
/// command line. QEMU splits modules at `,` (a doubled `,,` is a literal comma) and uses
/// the text up to the first space as the file name, so the path must have no space.
fn module_string(kernel: &str, args: &str) -> String {
    let escaped = |text: &str| text.replace(',', ",,");
    if args.is_empty() {
        escaped(kernel)
    } else {
        format!("{} {}", escaped(kernel), escaped(args))
    }
}

/// Boots Xen with `kernel` as dom0 and follows the serial line until the domain's end,
/// QEMU's exit or the deadline. Logs go to the provisioner's `logs/`.
pub fn run_dom0(
    prov: &Provisioner,
    qemu: &Path,
    xen: &Path,
    kernel: &Path,
    run: &Dom0Run,
    echo: Echo,
) -> RunnerResult<RunReport> {
    // QEMU takes the module's file name up to the first space: a kernel whose path has
    // one boots from a copy.
    let staged;
    let kernel = if kernel.to_string_lossy().contains(' ') {
        let dir = prov.cache_dir().join("kernels");
        std::fs::create_dir_all(&dir)?;
        staged = TempFile(dir.join(format!("kernel-{}.elf", std::process::id())));
        std::fs::copy(kernel, &staged.0).map_err(|e| {
            format!(
                "copying {} to {}: {e}",
                kernel.display(),
                staged.0.display()
            )
        })?;
        staged.0.as_path()
    } else {
        kernel
    };
    let kernel_str = kernel.to_str().ok_or("the kernel's path is not UTF-8")?;
    let xen_str = xen.to_str().ok_or("the Xen binary's path is not UTF-8")?;
    if xen_str.contains([',', ' ']) {
        return Err(format!(
            "QEMU's -kernel cannot take a path with ',' or ' ': {xen_str} (set another cache \
             directory)"
        )
        .into());
    }
    let args: Vec<String> = [
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-m",
        "512",
        "-smp",
        &run.smp.to_string(),
        "-cpu",
        &qemu_cpu(&run.cpu),
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        xen_str,
        "-initrd",
        &module_string(kernel_str, &run.kernel_args),
        "-append",
        &xen_cmdline(run.xen, &run.xen_args),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let command = std::iter::once(qemu.display().to_string())
        .chain(args.iter().map(|a| {
            if a.contains([' ', '\'', '"']) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.clone()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .map_err(|e| format!("{}: {e}", qemu.display()))?,
    );
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().ok_or("no QEMU stdout")?;
    let stderr = child.0.stderr.take().ok_or("no QEMU stderr")?;
    let tx_err = tx.clone();
    let out_thread = std::thread::spawn(move || forward_lines(stdout, &tx, ""));
    let err_thread = std::thread::spawn(move || forward_lines(stderr, &tx_err, "qemu: "));

    let mut log = GuestLog::default();
    let mut judge = Dom0Judge::default();
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES + 1);
    let mut whole: Vec<String> = Vec::new();
    let deadline = start + run.deadline;
    // Set once the domain's end is seen: read until then, and stop QEMU.
    let mut stop_at: Option<Instant> = None;
    let mut stopped_after_end = false;
    let mut timed_out = false;
    // Xen's lines are echoed to a user (Echo::Console) from the first that tells how the
    // run ends: a crash's register dump follows its first line.
    let mut xen_ending = false;
    let mut guest_started = false;
    let mut seen_xen = false;
    let mut xen_banner = None;
    let mut xen_complaints = Vec::new();
    let mut xen_suppressed = 0u64;
    loop {
        let now = Instant::now();
        if stop_at.is_some_and(|at| now >= at) {
            stopped_after_end = true;
            break;
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        let until = stop_at.map_or(deadline, |at| at.min(deadline));
        match rx.recv_timeout(until - now) {
            Ok(line) => {
                let kind = log.feed(&line);
                match &run.banner {
                    Some(banner) => guest_started |= line.starts_with(banner.as_str()),
                    None => guest_started |= kind == LineKind::Xen && line.contains(DOM0_STARTS),
                }
                seen_xen |= kind == LineKind::Xen;
                // Xen's lines can follow the firmware's on one serial line ("Booting from
                // ROM..(XEN) ..."), so look for Xen's prefix anywhere in the line.
                let from_xen = kind == LineKind::Xen || line.contains("(XEN)");
                // The guest's own lines: after Xen's first, not Xen's, not QEMU's stderr.
                let from_guest = seen_xen && !from_xen && !line.starts_with("qemu: ");
                xen_ending |= from_xen && crate::outcome::parse_xen_line(&line).is_some();
                if let Watch::StopAfter(grace) = judge.feed(&line, from_guest) {
                    let at = Instant::now() + grace;
                    stop_at = Some(stop_at.map_or(at, |earlier| earlier.min(at)));
                }
                if from_xen {
                    if xen_banner.is_none() && line.contains("Xen version ") {
                        xen_banner = Some(line.clone());
                    }
                    if let Some(n) = line
                        .split("printk: ")
                        .nth(1)
                        .and_then(|rest| rest.strip_suffix(" messages suppressed."))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                    {
                        xen_suppressed += n;
                    }
                    if is_xen_complaint(&line) {
                        xen_complaints.push(XenComplaint {
                            line: line.clone(),
                            while_guest_ran: guest_started,
                        });
                    }
                }
                match echo {
                    Echo::All => println!("[{}] {line}", run.name),
                    Echo::Serial => println!("{line}"),
                    Echo::Guest if guest_started && !from_xen => println!("{line}"),
                    Echo::Console
                        if from_guest
                            || (line.starts_with("qemu: ")
                                && !is_qemu_cpu_model_warning(&line))
                            || (from_xen && xen_ending) =>
                    {
                        println!("{line}")
                    }
                    Echo::Tests
                        if matches!(
                            kind,
                            LineKind::Test
                                | LineKind::Reason
                                | LineKind::Summary
                                | LineKind::Result
                        ) =>
                    {
                        println!("[{}] {line}", run.name)
                    }
                    _ => {}
                }
                whole.push(line.clone());
                tail.push_back(line);
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
            }
            // The deadline, or the end's grace: the loop's head tells which.
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: QEMU has exited (or is about to).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }

    let exit_code = if timed_out {
        None
    } else if stopped_after_end {
        // A halted machine never exits; a crashed one would reboot after 5 s.
        child.0.try_wait()?.and_then(|status| status.code())
    } else {
        wait_until(&mut child.0, deadline)?
    };
    let wall = start.elapsed();
    drop(child); // kills QEMU if it is still running
    let _ = out_thread.join();
    let _ = err_thread.join();
    let outcome = judge.finish(exit_code, timed_out, run.deadline);

    // The hypervisor that ran must be the build the run asked for (Xen's banner says
    // `debug=y` or `debug=n`): a cached binary of the wrong build would otherwise pass
    // as the other.
    let wanted_build = if run.xen.debug() {
        "debug=y"
    } else {
        "debug=n"
    };
    let build_check = match &xen_banner {
        Some(banner) if banner.contains(wanted_build) => Ok(()),
        Some(banner) => Err(format!(
            "Xen {} was asked for ({wanted_build}), but its banner says: {banner}",
            run.xen.label()
        )),
        None => Err("Xen printed no version banner".to_string()),
    };
    // Xen's own WARN/ASSERT/BUG reports while the guest ran fail the run: they say that
    // something the guest did reached a path Xen considers broken. Those from Xen's boot,
    // before the guest's banner, are the hypervisor's and are only reported.
    let guest_time: Vec<&str> = xen_complaints
        .iter()
        .filter(|c| c.while_guest_ran)
        .map(|c| c.line.as_str())
        .collect();
    let complaints_check = if guest_time.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Xen complained {} times while the guest ran: {}",
            guest_time.len(),
            guest_time.join(" | ")
        ))
    };
    let verdict = match (exit_code, &outcome) {
        (_, Outcome::TimedOut { .. }) => Err(format!(
            "deadline of {} s exceeded; QEMU killed",
            run.deadline.as_secs()
        )),
        (None, outcome) => Err(match log.verdict() {
            Ok(()) => format!("the log says SUCCESS, but then {outcome}"),
            Err(why) => format!("{why} ({outcome})"),
        }),
        (Some(code), _) => match (log.verdict(), code) {
            (Ok(()), DEBUG_EXIT_SUCCESS) => Ok(()),
            (Ok(()), code) => Err(format!(
                "the log says SUCCESS but QEMU exited with {code}, not {DEBUG_EXIT_SUCCESS}"
            )),
            (Err(why), DEBUG_EXIT_FAILURE) => {
                Err(format!("{why} (QEMU exit {code}: kernel reported failure)"))
            }
            (Err(why), code) => Err(format!("{why} (QEMU exit {code})")),
        },
    }
    .and(build_check.clone())
    .and(complaints_check);
    let log_path = prov
        .logs_dir()
        .join(format!("{}.serial.log", run.name.replace(['/', '+'], "-")));
    let _ = std::fs::write(&log_path, whole.join("\n") + "\n");
    Ok(RunReport {
        name: run.name.clone(),
        wall,
        exit_code,
        outcome,
        verdict,
        log,
        tail: tail.into(),
        log_path,
        command,
        xen_banner,
        xen_build: build_check,
        xen_suppressed,
        xen_complaints,
    })
}

/// Sends each line of `pipe` (cleaned of escapes, lossily decoded) to `tx`.
fn forward_lines(pipe: impl Read, tx: &mpsc::Sender<String>, prefix: &str) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = clean(String::from_utf8_lossy(&buf).trim_end_matches('\n'));
                if tx.send(format!("{prefix}{line}")).is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits for the child to exit until `deadline`; `None` if it did not.
fn wait_until(child: &mut Child, deadline: Instant) -> RunnerResult<Option<i32>> {
    loop {
        if let Some(status) = child.try_wait()? {
            // A signal (no code) counts as "no verdict".
            return Ok(status.code());
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
