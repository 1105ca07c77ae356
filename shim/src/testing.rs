//! An in-guest test harness: `cargo test` of a PV kernel, on stable Rust.
//!
//! A test target with `harness = false`, built for `x86_64-unknown-none` and run by a
//! cargo runner that boots it under Xen (`xenmsr-runner`), is a whole PV kernel.
//! [`test_main!`](crate::test_main) makes it one: the Xen ELF notes, the kit's entry, the
//! trap table, [`init`](crate::init), the console, the panic handler, and a `main` that
//! runs the listed tests, prints one line each and a summary, and shuts the domain down:
//! `SHUTDOWN_poweroff` when every test passed, `SHUTDOWN_crash` otherwise (the runner's
//! exit status follows: 0 or 1).
//!
//! ```ignore
//! // tests/guest.rs (Cargo.toml: [[test]] name = "guest", harness = false)
//! #![cfg_attr(target_os = "none", no_std, no_main)]
//!
//! #[cfg(not(target_os = "none"))]
//! fn main() {} // a host build of the workspace has nothing to run
//!
//! #[cfg(target_os = "none")]
//! mod guest {
//!     use xenmsr::Msr;
//!     use xenmsr::testing::{Failure, check, check_eq};
//!
//!     xenmsr::test_main! {
//!         name: "my-kernel",
//!         tests: [fs_base_round_trip, unknown_msr_is_refused],
//!     }
//!
//!     fn fs_base_round_trip() -> Result<(), Failure> {
//!         // SAFETY: nothing here addresses memory through FS.
//!         unsafe { Msr::FS_BASE.write_safe(0x7000_0000_1000) }?;
//!         // SAFETY: reading FS_BASE has no side effects.
//!         check_eq!(unsafe { Msr::FS_BASE.read_safe() }, Ok(0x7000_0000_1000));
//!         Ok(())
//!     }
//!
//!     fn unknown_msr_is_refused() {
//!         // SAFETY: Xen refuses the read; nothing changes.
//!         assert!(unsafe { Msr::new(0x1234_5678).read_safe() }.is_err());
//!     }
//! }
//! ```
//!
//! # Tests
//!
//! A test is a function `fn() -> Result<(), Failure>` or a plain `fn()` (anything that
//! implements [`TestResult`]). [`check!`](crate::testing::check) and
//! [`check_eq!`](crate::testing::check_eq) return a [`Failure`] with the file and line;
//! `?` turns an [`MsrError`], a [`GuardedFault`] or an [`Errno`] into one (at the `?`'s
//! line). A test may also panic (`assert!`, `unwrap`): there is no unwinding in
//! `no_std`, so the harness prints that test's line (`FAILED: panicked at ...`) and the
//! summary, counting the tests after it as not run, and crashes the domain.
//!
//! # Output
//!
//! ```text
//! running 3 tests (my-kernel)
//! test fs_base_round_trip ... ok
//! test unknown_msr_is_refused ... FAILED: tests/guest.rs:31:9: check failed: read.is_err()
//! test apic_base_bsp ... ok
//! test result: FAILED. 2 passed; 1 failed; 0 not run; 0 filtered out
//! ```
//!
//! # The command line
//!
//! The kernel's command line (`start_info.cmd_line`; `cargo test -- WORDS` gives it the
//! words through the runner) is read like libtest's arguments ([`Args`]):
//!
//! - bare words are filters: a test runs if its name contains one of them (all run
//!   without any); `--exact` makes them whole names; `--skip WORD` leaves out the tests
//!   whose names contain `WORD`;
//! - `--list` prints the names (`NAME: test`) and powers off;
//! - `key=value` words are parameters for the kernel, not filters, and other options
//!   (`--quiet`, ...) are ignored with a note.
//!
//! A filter that selects no test is a success (`0 passed; ... N filtered out`), as with
//! libtest: `cargo test -- NAME` runs every test target, and most have no test `NAME`.
//!
//! Two self-tests of the harness's failure paths run only when named exactly on the
//! command line, before the kernel's own tests: `xenmsr_selftest_fail` returns a
//! `Failure` and `xenmsr_selftest_panic` panics (so the tests the other filters selected
//! are then counted as not run). `cargo test -- xenmsr_selftest_fail` must therefore fail: it shows that a
//! failing test reaches `cargo test`'s exit status through the runner.

use core::fmt::{self, Write};
use core::panic::Location;

use xenmsr_hypercall::Errno;

use crate::MsrError;
use crate::guarded::GuardedFault;

/// How many bytes of a failure's message are kept (the rest is cut, marked `[...]`). It
/// keeps a [`Failure`] within 120 bytes, under Clippy's `result_large_err` threshold, so
/// that tests may return `Result<(), Failure>` in a crate that denies warnings.
pub const MESSAGE_CAPACITY: usize = 110;

/// Why a test failed: a message and the place in the test's source.
#[derive(Clone)]
pub struct Failure {
    location: &'static Location<'static>,
    len: u8,
    truncated: bool,
    message: [u8; MESSAGE_CAPACITY],
}

const _: () = assert!(core::mem::size_of::<Failure>() <= 120);
const _: () = assert!(MESSAGE_CAPACITY <= u8::MAX as usize);

impl Failure {
    /// A failure at the caller's location (for a macro's expansion: where the macro was
    /// invoked) with the message `args`, cut to [`MESSAGE_CAPACITY`] bytes at a character
    /// boundary. [`check!`](crate::testing::check) and its kin build these.
    #[track_caller]
    pub fn here(args: fmt::Arguments<'_>) -> Failure {
        Failure::at(Location::caller(), args)
    }

    /// A failure at `location` with the message `args`.
    pub fn at(location: &'static Location<'static>, args: fmt::Arguments<'_>) -> Failure {
        let mut failure = Failure {
            location,
            len: 0,
            truncated: false,
            message: [0; MESSAGE_CAPACITY],
        };
        // The writer never fails: it keeps what fits and notes the cut.
        let _ = failure.write_fmt(args);
        failure
    }

    /// Where the failure was reported.
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    /// The message (perhaps cut: see [`truncated`](Self::truncated)).
    pub fn message(&self) -> &str {
        // Only whole characters are ever copied in (`write_str` cuts at a boundary).
        core::str::from_utf8(&self.message[..usize::from(self.len)]).unwrap_or("")
    }

    /// Whether the message was longer than [`MESSAGE_CAPACITY`] bytes.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

impl Write for Failure {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let len = usize::from(self.len);
        let mut take = text.len().min(MESSAGE_CAPACITY - len);
        while !text.is_char_boundary(take) {
            take -= 1;
        }
        self.message[len..len + take].copy_from_slice(&text.as_bytes()[..take]);
        // At most MESSAGE_CAPACITY, which fits a u8 (checked above).
        self.len = (len + take) as u8;
        self.truncated |= take < text.len();
        Ok(())
    }
}

/// `file:line:column: message`, with `[...]` after a cut message.
impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message())?;
        if self.truncated {
            f.write_str(" [...]")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("location", &self.location)
            .field("message", &self.message())
            .field("truncated", &self.truncated)
            .finish()
    }
}

impl PartialEq for Failure {
    fn eq(&self, other: &Failure) -> bool {
        (self.location, self.message(), self.truncated)
            == (other.location, other.message(), other.truncated)
    }
}

impl Eq for Failure {}

impl From<MsrError> for Failure {
    /// The error of an MSR access, at the `?` that returned it.
    #[track_caller]
    fn from(error: MsrError) -> Failure {
        Failure::here(format_args!("{error} ({error:?})"))
    }
}

impl From<GuardedFault> for Failure {
    /// A guarded instruction's fault, at the `?` that returned it.
    #[track_caller]
    fn from(fault: GuardedFault) -> Failure {
        Failure::here(format_args!("{fault}"))
    }
}

impl From<Errno> for Failure {
    /// A hypercall's error, at the `?` that returned it.
    #[track_caller]
    fn from(errno: Errno) -> Failure {
        Failure::here(format_args!("hypercall failed: {errno}"))
    }
}

/// Returns `Err(Failure)` from the enclosing function unless `cond` holds; the message is
/// the condition's text, or the format string and arguments given after it.
///
/// ```
/// use xenmsr::testing::{Failure, check};
///
/// fn fits(len: usize) -> Result<(), Failure> {
///     check!(len <= 8);
///     check!(len % 2 == 0, "odd length {}", len);
///     Ok(())
/// }
/// assert!(fits(4).is_ok());
/// assert_eq!(fits(5).unwrap_err().message(), "odd length 5");
/// assert_eq!(fits(9).unwrap_err().message(), "check failed: len <= 8");
/// ```
#[macro_export]
macro_rules! __xenmsr_check {
    ($cond:expr $(,)?) => {
        if !$cond {
            return ::core::result::Result::Err($crate::testing::Failure::here(
                ::core::format_args!("check failed: {}", ::core::stringify!($cond)),
            ));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return ::core::result::Result::Err($crate::testing::Failure::here(
                ::core::format_args!($($arg)+),
            ));
        }
    };
}

/// Returns `Err(Failure)` from the enclosing function unless `left == right`; the message
/// shows both values (with `{:x?}`, so numbers are in hex; the location names the check)
/// and, if given, the format string and arguments after them.
///
/// ```
/// use xenmsr::testing::{Failure, check_eq};
///
/// fn low_byte(value: u32) -> Result<(), Failure> {
///     check_eq!(value & 0xff, 0x2a, "value {:#x}", value);
///     Ok(())
/// }
/// assert!(low_byte(0x12a).is_ok());
/// assert_eq!(
///     low_byte(0x12b).unwrap_err().message(),
///     "left 2b != right 2a: value 0x12b"
/// );
/// ```
#[macro_export]
macro_rules! __xenmsr_check_eq {
    ($left:expr, $right:expr $(,)?) => {
        match (&$left, &$right) {
            (left, right) => {
                if !(*left == *right) {
                    return ::core::result::Result::Err($crate::testing::Failure::here(
                        ::core::format_args!("left {:x?} != right {:x?}", left, right),
                    ));
                }
            }
        }
    };
    ($left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if !(*left == *right) {
                    return ::core::result::Result::Err($crate::testing::Failure::here(
                        ::core::format_args!(
                            "left {:x?} != right {:x?}: {}",
                            left,
                            right,
                            ::core::format_args!($($arg)+)
                        ),
                    ));
                }
            }
        }
    };
}

pub use crate::__xenmsr_check as check;
pub use crate::__xenmsr_check_eq as check_eq;

/// What a test function returns: `()` (a test that fails by panicking) or
/// `Result<(), Failure>`.
pub trait TestResult {
    /// The result as the harness reports it.
    fn into_result(self) -> Result<(), Failure>;
}

impl TestResult for () {
    fn into_result(self) -> Result<(), Failure> {
        Ok(())
    }
}

impl TestResult for Result<(), Failure> {
    fn into_result(self) -> Result<(), Failure> {
        self
    }
}

/// One test: its name (as written in [`test_main!`](crate::test_main)) and its function.
#[derive(Clone, Copy, Debug)]
pub struct Test {
    /// The name filters match against and the output shows.
    pub name: &'static str,
    /// Runs the test.
    pub run: fn() -> Result<(), Failure>,
}

/// The harness's own tests of its failure paths, run only when named exactly on the
/// command line (module docs).
pub const SELF_TESTS: [Test; 2] = [
    Test {
        name: "xenmsr_selftest_fail",
        run: || {
            Err(Failure::here(format_args!(
                "the harness's self-test of a failing test (asked for on the command line)"
            )))
        },
    },
    Test {
        name: "xenmsr_selftest_panic",
        run: || {
            panic!("the harness's self-test of a panicking test (asked for on the command line)")
        },
    },
];

/// The kernel's command line, read as the harness's arguments (module docs): parsed once,
/// without allocating; the words are the command line's own bytes.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    cmd_line: &'a [u8],
    list: bool,
    exact: bool,
}

/// One word of the command line and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Word<'a> {
    /// A filter.
    Filter(&'a [u8]),
    /// The word after `--skip` (or of `--skip=WORD`).
    Skip(&'a [u8]),
    /// `--list` or `--exact`.
    Flag(&'a [u8]),
    /// A `key=value` parameter for the kernel.
    Parameter(&'a [u8]),
    /// An option the harness does not know (ignored).
    UnknownOption(&'a [u8]),
}

impl<'a> Args<'a> {
    /// Reads a command line: `cmd_line` up to its first NUL (all of it if it has none),
    /// words separated by ASCII whitespace.
    pub fn parse(cmd_line: &'a [u8]) -> Args<'a> {
        let end = cmd_line
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(cmd_line.len());
        let mut args = Args {
            cmd_line: &cmd_line[..end],
            list: false,
            exact: false,
        };
        for word in args.words() {
            match word {
                Word::Flag(b"--list") => args.list = true,
                Word::Flag(b"--exact") => args.exact = true,
                _ => {}
            }
        }
        args
    }

    /// The command line of the domain `start_info` describes.
    pub fn from_start_info(start_info: &'a crate::hypercall::abi::StartInfo) -> Args<'a> {
        Args::parse(&start_info.cmd_line)
    }

    /// Every word, classified.
    pub fn words(&self) -> impl Iterator<Item = Word<'a>> + 'a {
        let mut raw = self
            .cmd_line
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty());
        core::iter::from_fn(move || {
            let word = raw.next()?;
            Some(match word {
                b"--list" | b"--exact" => Word::Flag(word),
                b"--skip" => Word::Skip(raw.next().unwrap_or(b"")),
                _ if word.starts_with(b"--skip=") => Word::Skip(&word[b"--skip=".len()..]),
                _ if word.starts_with(b"-") => Word::UnknownOption(word),
                _ if word.contains(&b'=') => Word::Parameter(word),
                _ => Word::Filter(word),
            })
        })
    }

    /// Whether `--list` was given.
    pub fn list(&self) -> bool {
        self.list
    }

    /// Whether `--exact` was given.
    pub fn exact(&self) -> bool {
        self.exact
    }

    fn filters(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.words().filter_map(|w| match w {
            Word::Filter(f) => Some(f),
            _ => None,
        })
    }

    fn matches(&self, name: &str, pattern: &[u8]) -> bool {
        if self.exact {
            name.as_bytes() == pattern
        } else {
            contains(name.as_bytes(), pattern)
        }
    }

    /// Whether the test `name` runs: not skipped, and named by a filter (or no filter
    /// given).
    pub fn selects(&self, name: &str) -> bool {
        let skipped = self.words().any(|w| match w {
            Word::Skip(pattern) => !pattern.is_empty() && self.matches(name, pattern),
            _ => false,
        });
        if skipped {
            return false;
        }
        let mut filters = self.filters().peekable();
        filters.peek().is_none() || filters.any(|f| self.matches(name, f))
    }

    /// Whether the harness's self-test `name` ([`SELF_TESTS`]) runs: only when a filter
    /// is its whole name.
    pub fn selects_self_test(&self, name: &str) -> bool {
        self.filters().any(|f| f == name.as_bytes())
    }
}

/// Whether `pattern` occurs in `text` (an empty pattern does).
fn contains(text: &[u8], pattern: &[u8]) -> bool {
    pattern.is_empty() || text.windows(pattern.len()).any(|w| w == pattern)
}

/// The counts the summary line reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tests that returned `Ok`.
    pub passed: usize,
    /// Tests that returned `Err` or panicked.
    pub failed: usize,
    /// Selected tests that did not run because one before them panicked.
    pub not_run: usize,
    /// Tests the command line did not select.
    pub filtered_out: usize,
}

impl Counts {
    /// Whether the run is a success: nothing failed and nothing was left unrun.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.not_run == 0
    }
}

/// The summary line, libtest's with a "not run" count:
/// `test result: ok. 3 passed; 0 failed; 0 not run; 1 filtered out`.
impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test result: {}. {} passed; {} failed; {} not run; {} filtered out",
            if self.ok() { "ok" } else { "FAILED" },
            self.passed,
            self.failed,
            self.not_run,
            self.filtered_out
        )
    }
}

/// One test's line: `test NAME ... ok` or `test NAME ... FAILED: file:line:column: message`.
#[derive(Clone, Copy, Debug)]
pub struct TestLine<'a> {
    /// The test's name.
    pub name: &'a str,
    /// How it ended.
    pub result: &'a Result<(), Failure>,
}

impl fmt::Display for TestLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.result {
            Ok(()) => write!(f, "test {} ... ok", self.name),
            Err(failure) => write!(f, "test {} ... FAILED: {failure}", self.name),
        }
    }
}

/// A suite's set-up: given Xen's `start_info`, it runs before the first test.
pub type SetupFn = fn(&'static crate::hypercall::abi::StartInfo) -> Result<(), Failure>;

/// What [`test_main!`](crate::test_main) passes to `run` (in the bare-metal build): the
/// kernel's name, its tests, its set-up and its library configuration.
#[derive(Clone, Copy, Debug)]
pub struct Suite {
    /// The kernel's name (its Xen `GUEST_OS` note too).
    pub name: &'static str,
    /// The tests, in the order they run.
    pub tests: &'static [Test],
    /// Runs after the library's `init` and before the first test (for example to set a
    /// trap handler or bring up more vCPUs); a `Failure` (or a panic) fails the run.
    pub setup: Option<SetupFn>,
    /// The configuration `init` gets, from the hypercall page.
    pub config: fn(crate::hypercall::HypercallPage) -> crate::Config,
}

/// The configuration [`test_main!`](crate::test_main) uses unless given one:
/// `Config::xen_pv` with the library's warnings and messages on the console.
pub fn default_config(hypercalls: crate::hypercall::HypercallPage) -> crate::Config {
    let config = crate::Config::xen_pv(hypercalls);
    #[cfg(target_os = "none")]
    let config = config
        .with_warn(|access| crate::println!("xenmsr: warning: {access:x?}"))
        .with_log(|args| crate::println!("{args}"));
    config
}

#[cfg(target_os = "none")]
pub use self::guest::{panicked, run};

/// The harness proper, in the guest.
#[cfg(target_os = "none")]
mod guest {
    use core::panic::PanicInfo;
    use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use xenmsr_hypercall::HypercallPage;
    use xenmsr_hypercall::abi::{ShutdownReason, StartInfo};

    use super::{Args, Counts, SELF_TESTS, Suite, Test, TestLine, Word};
    use crate::println;

    /// No test running (the value of [`CURRENT`] outside the tests).
    const NONE: usize = usize::MAX;

    /// The suite being run (for the panic handler).
    static SUITE: spin::Once<&'static Suite> = spin::Once::new();
    /// The index of the running test in the run order (the self-tests, then the suite's
    /// tests), or [`NONE`].
    static CURRENT: AtomicUsize = AtomicUsize::new(NONE);
    static PASSED: AtomicUsize = AtomicUsize::new(0);
    static FAILED: AtomicUsize = AtomicUsize::new(0);
    /// How many tests the command line selected.
    static SELECTED: AtomicUsize = AtomicUsize::new(0);
    static FILTERED_OUT: AtomicUsize = AtomicUsize::new(0);
    /// Set by the first panic: a panic inside the panic handler only shuts down.
    static PANICKING: AtomicBool = AtomicBool::new(false);

    /// Every test in run order: the self-tests first (so that a panicking one leaves the
    /// suite's selected tests not run, as the summary then says), then the suite's.
    fn all_tests(suite: &Suite) -> impl Iterator<Item = (&Test, bool)> {
        SELF_TESTS
            .iter()
            .map(|t| (t, true))
            .chain(suite.tests.iter().map(|t| (t, false)))
    }

    fn selected(args: &Args<'_>, test: &Test, self_test: bool) -> bool {
        if self_test {
            args.selects_self_test(test.name)
        } else {
            args.selects(test.name)
        }
    }

    /// Flushes the console and shuts the domain down: poweroff for a success, crash for a
    /// failure (the runner's exit status 0 or 1).
    fn finish(success: bool) -> ! {
        crate::console::flush();
        let reason = if success {
            ShutdownReason::POWEROFF
        } else {
            ShutdownReason::CRASH
        };
        let xen = HypercallPage::xen();
        loop {
            let _ = xen.sched_shutdown(reason);
        }
    }

    /// The harness's `main` (what [`test_main!`](crate::test_main)'s entry calls): sets
    /// up the console, the trap table and the library, runs the suite's set-up, then the
    /// tests the command line selects, prints the summary and shuts the domain down.
    pub fn run(start_info: &'static StartInfo, suite: &'static Suite) -> ! {
        SUITE.call_once(|| suite);
        // SAFETY: Xen's start_info for this domain; an image linked by `xenmsr-pv.ld`
        // runs at its physical address (VIRT_BASE 0), with the start-of-day mapping of
        // the console page still in place (the harness changes no mapping).
        unsafe { crate::console::init(start_info, 0) };
        // Every exception vector goes to the kit's entry first: the library's fixup
        // (MSR faults, guarded instructions) needs it before the first access.
        if let Err(errno) = crate::pv::install_trap_table() {
            println!("{}: set_trap_table failed: {errno}", suite.name);
            finish(false);
        }
        let config = (suite.config)(HypercallPage::xen());
        // SAFETY: called once, on the boot vCPU, with events masked as Xen started it;
        // `xenmsr-pv.ld` makes the text writable; this is a Xen PV guest (the image's ELF
        // notes make Xen load it as one).
        if let Err(error) = unsafe { crate::init(config) } {
            println!("{}: xenmsr::init failed: {error:?}", suite.name);
            finish(false);
        }
        if let Some(setup) = suite.setup
            && let Err(failure) = setup(start_info)
        {
            println!("{}: set-up FAILED: {failure}", suite.name);
            finish(false);
        }

        let args = Args::from_start_info(start_info);
        for word in args.words() {
            if let Word::UnknownOption(option) = word {
                println!(
                    "{}: ignoring unknown option {}",
                    suite.name,
                    core::str::from_utf8(option).unwrap_or("(not UTF-8)")
                );
            }
        }
        if args.list() {
            let listed = suite.tests.iter().filter(|t| args.selects(t.name));
            let mut count = 0;
            for test in listed {
                println!("{}: test", test.name);
                count += 1;
            }
            println!();
            println!("{count} tests, 0 benchmarks");
            finish(true);
        }

        let user_selected = suite.tests.iter().filter(|t| args.selects(t.name)).count();
        let count = all_tests(suite)
            .filter(|(t, s)| selected(&args, t, *s))
            .count();
        SELECTED.store(count, Ordering::Relaxed);
        FILTERED_OUT.store(suite.tests.len() - user_selected, Ordering::Relaxed);
        println!();
        println!(
            "running {count} test{} ({})",
            if count == 1 { "" } else { "s" },
            suite.name
        );
        for (index, (test, self_test)) in all_tests(suite).enumerate() {
            if !selected(&args, test, self_test) {
                continue;
            }
            CURRENT.store(index, Ordering::Relaxed);
            let result = (test.run)();
            CURRENT.store(NONE, Ordering::Relaxed);
            let counter = if result.is_ok() { &PASSED } else { &FAILED };
            counter.fetch_add(1, Ordering::Relaxed);
            println!(
                "{}",
                TestLine {
                    name: test.name,
                    result: &result
                }
            );
        }
        let counts = counts(0);
        println!();
        println!("{counts}");
        finish(counts.ok())
    }

    /// The counts so far, with `panicked` more tests failed (1 from the panic handler).
    fn counts(panicked: usize) -> Counts {
        let passed = PASSED.load(Ordering::Relaxed);
        let failed = FAILED.load(Ordering::Relaxed) + panicked;
        Counts {
            passed,
            failed,
            not_run: SELECTED
                .load(Ordering::Relaxed)
                .saturating_sub(passed + failed),
            filtered_out: FILTERED_OUT.load(Ordering::Relaxed),
        }
    }

    /// The panic handler of a [`test_main!`](crate::test_main) kernel: a panic inside a
    /// test fails that test (`test NAME ... FAILED: panicked at FILE:LINE:COL: MESSAGE`),
    /// the summary counts the tests after it as not run, and the domain crashes; a panic
    /// outside the tests (set-up, the harness) is reported as such and crashes too.
    pub fn panicked(info: &PanicInfo<'_>) -> ! {
        if PANICKING.swap(true, Ordering::Relaxed) {
            // A panic while reporting one: nothing more can be said safely.
            finish(false);
        }
        let name = SUITE.get().map_or("xenmsr test harness", |s| s.name);
        let location = info.location();
        let (file, line, column) =
            location.map_or(("?", 0, 0), |l| (l.file(), l.line(), l.column()));
        let current = CURRENT.load(Ordering::Relaxed);
        let test = SUITE
            .get()
            .and_then(|suite| all_tests(suite).nth(current))
            .filter(|_| current != NONE);
        match test {
            Some((test, _)) => {
                println!(
                    "test {} ... FAILED: panicked at {file}:{line}:{column}: {}",
                    test.name,
                    info.message()
                );
                println!();
                println!("{}", counts(1));
            }
            None => println!(
                "{name}: panicked outside the tests at {file}:{line}:{column}: {}",
                info.message()
            ),
        }
        finish(false)
    }
}

/// Makes a `harness = false` test target a PV kernel that runs the listed tests (the
/// [module documentation](crate::testing) has a whole example, the output and the
/// command line).
///
/// ```ignore
/// xenmsr::test_main! {
///     name: "my-kernel",                     // the GUEST_OS note and the output's name
///     setup: bring_up_vcpus,                 // optional: fn(&'static StartInfo) [-> Result<(), Failure>]
///     config: my_config,                     // optional: fn(HypercallPage) -> xenmsr::Config
///     tests: [fs_base_round_trip, unknown_msr_is_refused],
/// }
/// ```
///
/// The fields come in this order; `setup` and `config` may be left out (the default
/// configuration is [`testing::default_config`](crate::testing::default_config)). Each
/// test is a path to a `fn()` or `fn() -> Result<(), Failure>`; its name is the path as
/// written.
///
/// It expands to the Xen ELF notes ([`xen_elf_notes!`](crate::xen_elf_notes), `dom0:
/// true`: such an image boots as dom0 or as a domU), the kit's entry
/// ([`pv_entry!`](crate::pv_entry)) calling [`testing::run`](crate::testing), and the
/// `#[panic_handler]`, so the crate needs none of its own. It is for a kernel linked with
/// `xenmsr-pv.ld` (build script: `cargo:rustc-link-arg-tests=-Txenmsr-pv.ld` and
/// `cargo:rustc-link-arg-tests=--no-pie`) and built for `x86_64-unknown-none`: use it
/// only in that build (the example's `#[cfg(target_os = "none")]` module), since on the
/// host the standard library has the panic handler and the entry point.
#[macro_export]
macro_rules! test_main {
    (@setup) => {
        ::core::option::Option::None
    };
    (@setup $setup:path) => {
        ::core::option::Option::Some(|start_info| {
            $crate::testing::TestResult::into_result($setup(start_info))
        })
    };
    (@config) => {
        $crate::testing::default_config
    };
    (@config $config:path) => {
        $config
    };
    (
        name: $name:literal,
        $(setup: $setup:path,)?
        $(config: $config:path,)?
        tests: [$($test:path),* $(,)?] $(,)?
    ) => {
        $crate::xen_elf_notes!(guest_os: $name, guest_version: "test", dom0: true);
        $crate::pv_entry!(__xenmsr_test_main);

        static __XENMSR_TEST_SUITE: $crate::testing::Suite = $crate::testing::Suite {
            name: $name,
            tests: &[$(
                $crate::testing::Test {
                    name: ::core::stringify!($test),
                    run: || $crate::testing::TestResult::into_result($test()),
                },
            )*],
            setup: $crate::test_main!(@setup $($setup)?),
            config: $crate::test_main!(@config $($config)?),
        };

        fn __xenmsr_test_main(
            start_info: &'static $crate::hypercall::abi::StartInfo,
        ) -> ! {
            $crate::testing::run(start_info, &__XENMSR_TEST_SUITE)
        }

        #[panic_handler]
        fn __xenmsr_test_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::testing::panicked(info)
        }
    };
}

#[cfg(test)]
mod tests {
    use std::format;
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;

    fn words(line: &[u8]) -> Vec<Word<'_>> {
        Args::parse(line).words().collect()
    }

    #[test]
    fn the_command_line_ends_at_the_first_nul() {
        let mut cmd_line = [0u8; 1024];
        cmd_line[..13].copy_from_slice(b"fs_base apic\0");
        cmd_line[20..26].copy_from_slice(b"hidden");
        assert_eq!(
            words(&cmd_line),
            [Word::Filter(b"fs_base"), Word::Filter(b"apic")]
        );
        // Without a NUL, the whole array; all NULs, nothing.
        assert_eq!(
            words(b"a  b\t\nc"),
            [Word::Filter(b"a"), Word::Filter(b"b"), Word::Filter(b"c")]
        );
        assert_eq!(words(&[0u8; 1024]), []);
        assert_eq!(words(b""), []);
        assert_eq!(words(&[b' '; 1024]), []);
    }

    #[test]
    fn words_are_classified() {
        assert_eq!(
            words(b"--list fs --skip apic --skip=msr xen=4.17 --quiet --exact \xff\xfe"),
            [
                Word::Flag(b"--list"),
                Word::Filter(b"fs"),
                Word::Skip(b"apic"),
                Word::Skip(b"msr"),
                Word::Parameter(b"xen=4.17"),
                Word::UnknownOption(b"--quiet"),
                Word::Flag(b"--exact"),
                Word::Filter(b"\xff\xfe"),
            ]
        );
        // `--skip` at the end skips nothing.
        assert_eq!(words(b"--skip"), [Word::Skip(b"")]);
        let args = Args::parse(b"--list --exact");
        assert!(args.list() && args.exact());
        let args = Args::parse(b"list exact");
        assert!(!args.list() && !args.exact());
    }

    #[test]
    fn filters_select_like_libtest() {
        let names = [
            "fs_base_round_trip",
            "unknown_msr_is_refused",
            "apic_base_bsp",
            "guarded_rdfsbase",
        ];
        let chosen = |line: &[u8]| -> Vec<&str> {
            let args = Args::parse(line);
            names.iter().copied().filter(|n| args.selects(n)).collect()
        };
        assert_eq!(chosen(b""), names, "no filter: every test");
        assert_eq!(
            chosen(b"xen=4.17 xenbuild=release"),
            names,
            "parameters are no filters"
        );
        assert_eq!(
            chosen(b"base"),
            ["fs_base_round_trip", "apic_base_bsp", "guarded_rdfsbase"]
        );
        assert_eq!(chosen(b"_base_"), ["fs_base_round_trip", "apic_base_bsp"]);
        assert_eq!(
            chosen(b"apic msr"),
            ["unknown_msr_is_refused", "apic_base_bsp"],
            "any filter"
        );
        assert_eq!(chosen(b"nothing_has_this"), Vec::<&str>::new());
        assert_eq!(chosen(b"--exact base"), Vec::<&str>::new());
        assert_eq!(chosen(b"--exact apic_base_bsp"), ["apic_base_bsp"]);
        assert_eq!(chosen(b"--skip base"), ["unknown_msr_is_refused"]);
        assert_eq!(
            chosen(b"--skip _base_"),
            ["unknown_msr_is_refused", "guarded_rdfsbase"]
        );
        assert_eq!(chosen(b"_base --skip=apic"), ["fs_base_round_trip"]);
        assert_eq!(chosen(b"--skip"), names, "an empty skip skips nothing");
    }

    #[test]
    fn self_tests_run_only_when_named_exactly() {
        for (line, fail, panic) in [
            (&b""[..], false, false),
            (b"xenmsr_selftest", false, false),
            (b"selftest_fail", false, false),
            (b"xenmsr_selftest_fail", true, false),
            (b"fs xenmsr_selftest_panic", false, true),
        ] {
            let args = Args::parse(line);
            assert_eq!(args.selects_self_test(SELF_TESTS[0].name), fail, "{line:?}");
            assert_eq!(
                args.selects_self_test(SELF_TESTS[1].name),
                panic,
                "{line:?}"
            );
        }
        // A user's filter naming a self-test selects no test of the user's.
        assert!(!Args::parse(b"xenmsr_selftest_fail").selects("fs_base_round_trip"));
        assert!((SELF_TESTS[0].run)().is_err());
    }

    #[test]
    fn summary_and_test_lines() {
        let ok = Counts {
            passed: 3,
            failed: 0,
            not_run: 0,
            filtered_out: 1,
        };
        assert_eq!(
            ok.to_string(),
            "test result: ok. 3 passed; 0 failed; 0 not run; 1 filtered out"
        );
        let panicked = Counts {
            passed: 1,
            failed: 1,
            not_run: 2,
            filtered_out: 0,
        };
        assert!(!panicked.ok());
        assert_eq!(
            panicked.to_string(),
            "test result: FAILED. 1 passed; 1 failed; 2 not run; 0 filtered out"
        );
        assert!(Counts::default().ok(), "nothing selected is a success");
        assert_eq!(
            TestLine {
                name: "a",
                result: &Ok(())
            }
            .to_string(),
            "test a ... ok"
        );
        let failure = Failure::here(format_args!("got {}", 5));
        let at = failure.location();
        assert_eq!(
            TestLine {
                name: "b",
                result: &Err(failure)
            }
            .to_string(),
            format!(
                "test b ... FAILED: {}:{}:{}: got 5",
                at.file(),
                at.line(),
                at.column()
            )
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MESSAGE_CAPACITY); // two bytes each
        let failure = Failure::here(format_args!("x{long}"));
        assert!(failure.truncated());
        assert_eq!(failure.message().len(), MESSAGE_CAPACITY - 1);
        assert!(failure.to_string().ends_with("é [...]"));
        let short = Failure::here(format_args!("short"));
        assert!(!short.truncated());
        assert_eq!(short.to_string(), format!("{}: short", short.location()));
    }

    /// The line of the first check in `checks`.
    const FIRST_CHECK: u32 = line!() + 2;
    fn checks(value: u32) -> Result<(), Failure> {
        check!(value != 0);
        check!(value < 100, "too big: {}", value);
        check_eq!(value % 2, 0);
        check_eq!(value, 42, "the answer");
        Ok(())
    }

    #[test]
    fn check_macros_return_a_failure_with_the_line() {
        let line_of_first_check = FIRST_CHECK;
        assert_eq!(checks(42), Ok(()));
        let zero = checks(0).unwrap_err();
        let at = zero.location();
        assert_eq!((at.file(), at.line()), (file!(), line_of_first_check));
        assert_eq!(zero.message(), "check failed: value != 0");
        assert_eq!(checks(100).unwrap_err().message(), "too big: 100");
        assert_eq!(checks(3).unwrap_err().message(), "left 1 != right 0");
        let forty = checks(40).unwrap_err();
        assert_eq!(forty.message(), "left 28 != right 2a: the answer");
        assert_eq!(forty.location().line(), line_of_first_check + 3);
    }

    /// The line of the `?` in `question_mark`.
    const QUESTION_MARK: u32 = line!() + 2;
    fn question_mark(error: MsrError) -> Result<(), Failure> {
        Err(error)?;
        Ok(())
    }

    #[test]
    fn question_mark_reports_its_own_line() {
        let failure = question_mark(MsrError::Fault { vector: 13 }).unwrap_err();
        assert_eq!(failure.location().file(), file!());
        assert_eq!(
            failure.location().line(),
            QUESTION_MARK,
            "the line of the `?`"
        );
        assert_eq!(
            failure.message(),
            "the access raised exception vector 13 (Fault { vector: 13 })"
        );
        let guarded: Failure = GuardedFault { vector: 14 }.into();
        assert_eq!(guarded.message(), "the instruction raised #PF (vector 14)");
        let errno: Failure = Errno::EINVAL.into();
        assert!(errno.message().starts_with("hypercall failed: "));
        assert_eq!(
            format!("{}", Failure::here(format_args!("x")))
                .split(':')
                .next(),
            Some(file!())
        );
    }

    #[test]
    fn plain_and_result_tests_both_report() {
        assert_eq!(().into_result(), Ok(()));
        let failure = Failure::here(format_args!("no"));
        assert_eq!(Err::<(), _>(failure.clone()).into_result(), Err(failure));
    }
}
