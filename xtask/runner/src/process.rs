//! Running external tools with a time limit, so that a hung `apt-get`, `tar` or `make`
//! cannot hang a run.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::RunnerResult;

/// Runs a command with inherited stdio, killing it if it runs longer than `timeout`.
pub fn run_checked_timeout(cmd: &mut Command, timeout: Duration) -> RunnerResult<()> {
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?} failed: {status}").into())
            };
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} timed out after {} s", timeout.as_secs()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command, capturing stdout (stderr inherited), killing it after `timeout`.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> RunnerResult<Vec<u8>> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} timed out after {} s", timeout.as_secs()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader
        .join()
        .map_err(|_| format!("{cmd:?}: reader thread panicked"))??;
    if !status.success() {
        return Err(format!("{cmd:?} failed: {status}").into());
    }
    Ok(out)
}

/// A file removed when dropped (a run's staged kernel or initramfs).
#[derive(Debug)]
pub(crate) struct TempFile(pub(crate) PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
