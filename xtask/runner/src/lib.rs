//! Boots a Xen x86-64 PV kernel under Xen in QEMU, from any crate.
//!
//! The `xenmsr-runner` binary is a cargo target runner: with
//!
//! ```toml
//! # .cargo/config.toml
//! [target.x86_64-unknown-none]
//! runner = ["xenmsr-runner", "--vcpus", "4"]
//! ```
//!
//! `cargo run` boots the kernel as dom0 under Xen 4.17 in QEMU (TCG), streams its console
//! and exits with how it ended: 0 for a poweroff (or a reboot request), 1 for a crash or
//! a panic, 3 for a timeout, 2 if it could not be booted ([`outcome::exit_status`]).
//! `xenmsr-runner --help` lists the options ([`cli::USAGE`]).
//!
//! Everything it needs (QEMU, the hypervisors, the `xl` path's Linux dom0) is installed
//! from Debian, downloaded or built on first use and cached per user
//! ([`provision::Provisioner::user_cache_dir`]). The library is also the xenmsr
//! project's own boot code: its `cargo xtask run` and `cargo xtask test` drive the same
//! modules.
//!
//! - [`cli`]: the command line; [`boot`]: boot one kernel as it asks.
//! - [`qemu`]: a dom0 run under Xen in QEMU; [`xl`] and [`initramfs`]: a domU run with
//!   `xl create` under a Linux dom0.
//! - [`outcome`]: how a run ended, from Xen's and `xl`'s words, and the exit status.
//! - [`provision`]: QEMU and the hypervisors, cached; [`guestlog`]: the xenmsr test
//!   kernels' test lines; [`process`]: external tools with a deadline.

pub mod boot;
pub mod cli;
pub mod guestlog;
pub mod initramfs;
pub mod outcome;
pub mod process;
pub mod provision;
pub mod qemu;
pub mod xl;

/// The error type of the runner's operations: a message for the user. A run whose
/// deadline passed before its end was known is an [`xl::TimedOut`].
pub type RunnerResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
