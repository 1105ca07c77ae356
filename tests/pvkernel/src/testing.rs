//! A tiny in-guest test framework.
//!
//! Each test prints one line, `test <name> ... ok` or `test <name> ... FAILED` followed by
//! an indented reason line; the run ends with `N passed, N failed` and XTF's result line,
//! `Test result: SUCCESS` or `Test result: FAILURE`, which is what the harness matches.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use crate::smp::{CacheAligned, MAX_VCPUS, PerVcpu, vcpu_index};

/// A failure message, kept in a static buffer per vCPU: each vCPU runs one test at a
/// time, so the message of its failing test is the only one alive. (A `Failure` carrying
/// its text inline would make every `TestResult` hundreds of bytes.)
struct Message {
    buf: [u8; 240],
    len: usize,
    squash: bool,
}

static MESSAGE: PerVcpu<spin::Mutex<Message>> = [const {
    CacheAligned(spin::Mutex::new(Message {
        buf: [0; 240],
        len: 0,
        squash: false,
    }))
}; MAX_VCPUS];

/// This vCPU's message buffer.
fn message() -> &'static spin::Mutex<Message> {
    &MESSAGE[vcpu_index()].0
}

/// Why a test failed. The text lives in this vCPU's [`MESSAGE`] until its next failure.
#[derive(Debug)]
pub struct Failure(());

impl Failure {
    /// A failure with a formatted message (truncated to fit).
    pub fn new(args: fmt::Arguments<'_>) -> Self {
        let mut m = message().lock();
        m.len = 0;
        m.squash = false;
        let _ = m.write_fmt(args);
        Failure(())
    }

    /// Writes the message to `out`.
    pub fn write_message(&self, out: &mut impl Write) -> fmt::Result {
        let m = message().lock();
        out.write_str(core::str::from_utf8(&m.buf[..m.len]).unwrap_or("<invalid message>"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_message(f)
    }
}

impl Write for Message {
    /// Keeps the message on one line: a newline and the indentation after it (from
    /// `{:#?}` pretty-printing) are dropped, as is the trailing comma before a closing
    /// bracket, so `Ok(\n    0x1,\n)` reads `Ok(0x1)`.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            if ch == '\n' {
                self.squash = true;
                continue;
            }
            if self.squash {
                if ch == ' ' {
                    continue;
                }
                self.squash = false;
                if matches!(ch, ')' | ']' | '}') && self.len > 0 && self.buf[self.len - 1] == b',' {
                    self.len -= 1;
                }
            }
            let mut tmp = [0; 4];
            let bytes = ch.encode_utf8(&mut tmp).as_bytes();
            if self.len + bytes.len() > self.buf.len() {
                return Ok(());
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

/// The result of one test.
pub type TestResult = Result<(), Failure>;

/// Fails the test with a formatted message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { return Err($crate::testing::Failure::new(format_args!($($arg)*))) };
}

/// Fails the test unless the condition holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond { $crate::fail!($($arg)*); }
    };
}

/// Fails the test unless the two values are equal (printed in hex).
#[macro_export]
macro_rules! check_eq {
    ($left:expr, $right:expr, $what:expr) => {{
        let (l, r) = ($left, $right);
        if l != r {
            $crate::fail!("{}: got {:#x?}, expected {:#x?}", $what, l, r);
        }
    }};
}

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// The name of the test a vCPU runs now (pointer and length; null between tests), so that
/// an abort can name it.
struct Current {
    ptr: AtomicPtr<u8>,
    len: AtomicUsize,
}

static CURRENT: PerVcpu<Current> = [const {
    CacheAligned(Current {
        ptr: AtomicPtr::new(core::ptr::null_mut()),
        len: AtomicUsize::new(0),
    })
}; MAX_VCPUS];

fn set_current(name: Option<&'static str>) {
    let (ptr, len) = name.map_or((core::ptr::null_mut(), 0), |n| {
        (n.as_ptr().cast_mut(), n.len())
    });
    let current = &CURRENT[vcpu_index()].0;
    current.len.store(len, Ordering::Relaxed);
    current.ptr.store(ptr, Ordering::Release);
}

fn current() -> Option<&'static str> {
    let current = &CURRENT[vcpu_index()].0;
    let ptr = current.ptr.load(Ordering::Acquire);
    if ptr.is_null() {
        return None;
    }
    let len = current.len.load(Ordering::Relaxed);
    // SAFETY: `ptr`/`len` were stored together from a `&'static str` by `set_current` on
    // this vCPU, between its tests.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
    core::str::from_utf8(bytes).ok()
}

/// A test's name without the crate and `suites` prefix (`boot::console`).
pub const fn short_name(path: &'static str) -> &'static str {
    const PREFIX: &[u8] = b"xenmsr_pvkernel::suites::";
    let bytes = path.as_bytes();
    if bytes.len() <= PREFIX.len() {
        return path;
    }
    let mut i = 0;
    while i < PREFIX.len() {
        if bytes[i] != PREFIX[i] {
            return path;
        }
        i += 1;
    }
    let (_, rest) = bytes.split_at(PREFIX.len());
    match core::str::from_utf8(rest) {
        Ok(s) => s,
        Err(_) => path,
    }
}

/// One named test.
pub struct Test {
    /// `suite::name`.
    pub name: &'static str,
    /// The test body.
    pub run: fn() -> TestResult,
}

/// Runs tests in order on this vCPU, printing one line each, named `v<vcpu>/<test>`.
pub fn run(tests: &[Test]) {
    for test in tests {
        set_current(Some(test.name));
        let result = (test.run)();
        set_current(None);
        record(test.name, result);
    }
}

/// Records the outcome of a test run outside [`run`], printing its line (and, for a
/// failure, its reason, in the same console write so vCPUs cannot split them).
pub fn record(name: &str, result: TestResult) {
    let vcpu = crate::smp::current_vcpu();
    match result {
        Ok(()) => {
            PASSED.fetch_add(1, Ordering::Relaxed);
            crate::println!("test v{vcpu}/{name} ... ok");
        }
        Err(failure) => {
            FAILED.fetch_add(1, Ordering::Relaxed);
            crate::println!("test v{vcpu}/{name} ... FAILED\n    reason: {failure}");
        }
    }
}

/// Prints the summary and the result line, and ends the run with the verdict.
pub fn finish() -> ! {
    // Before the final SCHEDOP_shutdown, every vCPU's vPMU is finished (as Linux's
    // `xen_reboot` does), checked as a test of its own.
    record(
        "shutdown::every_vpmu_is_finished",
        crate::suites::hotplug::finish_every_vpmu(),
    );
    let passed = PASSED.load(Ordering::Relaxed);
    let failed = FAILED.load(Ordering::Relaxed);
    crate::println!("{passed} passed, {failed} failed");
    let success = failed == 0 && passed > 0;
    crate::println!(
        "Test result: {}",
        if success { "SUCCESS" } else { "FAILURE" }
    );
    crate::exit::exit(success)
}

/// Ends the run at once as a failure (an unhandled exception, a panic).
pub fn abort_run(why: &str) -> ! {
    let passed = PASSED.load(Ordering::Relaxed);
    let failed = FAILED.load(Ordering::Relaxed);
    if let Some(name) = current() {
        let vcpu = crate::smp::current_vcpu();
        crate::println!("test v{vcpu}/{name} ... FAILED\n    reason: {why}");
    }
    crate::println!("run aborted: {why}");
    crate::println!("{passed} passed, {} failed", failed + 1);
    crate::println!("Test result: FAILURE");
    crate::exit::exit(false)
}
