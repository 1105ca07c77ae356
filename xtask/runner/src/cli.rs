//! The command line: `xenmsr-runner [OPTIONS] KERNEL [KERNEL-ARGS...]`, the shape cargo
//! calls a target runner with (`runner-args... path/to/ELF args-after---`). `cargo xtask
//! run --kernel ELF` takes the same options.

use std::path::PathBuf;
use std::time::Duration;

use crate::RunnerResult;
use crate::provision::{XEN_CHOICES, Xen};

/// The variable whose words are read as options before the command line's own.
pub const ARGS_VARIABLE: &str = "XENMSR_RUNNER_ARGS";

/// The usage text of `--help`.
pub const USAGE: &str = "\
Boots a Xen x86-64 PV kernel (an ELF) under Xen in QEMU (TCG), as dom0 or as an xl domU,
streams its console, and exits with how it ended.

usage: xenmsr-runner [OPTIONS] KERNEL [KERNEL-ARGS...]

Every word after KERNEL goes to the kernel's command line (joined by spaces), even one
that starts with '-'; nothing else is added to it. As a cargo runner, in .cargo/config.toml:

    [target.x86_64-unknown-none]
    runner = [\"xenmsr-runner\", \"--vcpus\", \"4\"]

then `cargo run` boots the kernel, and `cargo test -- NAME` passes NAME to it.

options:
  --cpu MODEL       QEMU CPU model (default qemu64; EPYC runs as EPYC,-monitor)
  --vcpus N         the guest's vCPUs: Xen's dom0_max_vcpus=N, or the domU's vcpus=N
                    (default 1)
  --pcpus N         physical CPUs QEMU gives Xen, -smp (dom0 only; default: the vCPUs,
                    at most this machine's CPUs)
  --xen VERSION     4.17 (default), 4.20, 4.22 or 4.22-debug
  --xen-src PATH    the Xen 4.22.0 source tarball, or its directory, that 4.22 is built
                    from (default: $XENMSR_XEN_SRC)
  --vpmu            Xen's vpmu=1 (a vPMU for the guest; EPYC has one under TCG)
  --xen-arg ARG     one more word for Xen's command line (repeatable)
  --args \"ARGS\"     the kernel's command line, before any KERNEL-ARGS
  --kernel ELF      the kernel, as an option (then every free word is a KERNEL-ARG)
  --domu            boot it as a PV domU with `xl create` under a Linux dom0 (Xen 4.17)
                    instead of as dom0
  --memory MIB      the domU's memory (--domu only; default 64)
  --timeout SECS    deadline (default 120; 300 with --domu)
  -v, --verbose     echo the whole serial line: the firmware's, Xen's, the dom0's
  -h, --help        this text
  -V, --version     the version

exit status:
  0  the guest powered off, or asked for a reboot (an orderly end too), or wrote 0x10
     to isa-debug-exit
  1  the guest crashed (SHUTDOWN_crash, or Xen crashed it: an unhandled trap), printed
     a panic line, ended another way (watchdog, soft reset), wrote another value to
     isa-debug-exit, or Xen panicked
  2  usage error, or provisioning failed
  3  timeout: the guest was still running at the deadline

environment:
  XENMSR_RUNNER_ARGS  options read before the command line's (split at whitespace)
  XENMSR_CACHE        the download and build cache (default $XDG_CACHE_HOME/xenmsr, or
                      ~/.cache/xenmsr)
  XENMSR_XEN_SRC      the Xen 4.22.0 source tarball, or its directory
";

/// The default deadline of a dom0 run (the minimal kernel takes about 2 s).
pub const DOM0_TIMEOUT: Duration = Duration::from_secs(120);
/// The default deadline of a domU run (Linux dom0 + toolstack + domU: about 30 s).
pub const DOMU_TIMEOUT: Duration = Duration::from_secs(300);
/// The domU's default memory.
pub const DOMU_MEMORY_MIB: u32 = 64;

/// How to boot a kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootOptions {
    /// The kernel ELF (`None` if none was named: `cargo xtask run` boots its demo then).
    pub kernel: Option<PathBuf>,
    /// The kernel's command line: `--args`, then the words after KERNEL.
    pub kernel_args: Vec<String>,
    /// QEMU's CPU model.
    pub cpu: String,
    /// The guest's vCPUs.
    pub vcpus: u32,
    /// QEMU's `-smp` (dom0 only); `None`: the vCPUs, at most this machine's CPUs.
    pub pcpus: Option<u32>,
    /// The hypervisor.
    pub xen: Xen,
    /// Where the Xen 4.22.0 source is (`--xen-src`).
    pub xen_src: Option<PathBuf>,
    /// Xen's `vpmu=1`.
    pub vpmu: bool,
    /// More words for Xen's command line.
    pub xen_args: Vec<String>,
    /// Boot as an xl domU instead of as dom0.
    pub domu: bool,
    /// The domU's memory (`None`: [`DOMU_MEMORY_MIB`]).
    pub memory_mib: Option<u32>,
    /// The deadline (`None`: [`DOM0_TIMEOUT`] or [`DOMU_TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// Echo the whole serial line.
    pub verbose: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            kernel: None,
            kernel_args: Vec::new(),
            cpu: "qemu64".to_string(),
            vcpus: 1,
            pcpus: None,
            xen: Xen::V4_17,
            xen_src: None,
            vpmu: false,
            xen_args: Vec::new(),
            domu: false,
            memory_mib: None,
            timeout: None,
            verbose: false,
        }
    }
}

impl BootOptions {
    /// The kernel's command line, words joined by spaces.
    pub fn kernel_cmdline(&self) -> String {
        self.kernel_args.join(" ")
    }

    /// The run's deadline.
    pub fn deadline(&self) -> Duration {
        self.timeout.unwrap_or(if self.domu {
            DOMU_TIMEOUT
        } else {
            DOM0_TIMEOUT
        })
    }

    /// QEMU's `-smp` for a dom0 run: `--pcpus`, else the vCPUs but no more than this
    /// machine has (TCG runs each emulated CPU on a thread of its own).
    pub fn pcpus(&self) -> u32 {
        self.pcpus.unwrap_or_else(|| {
            let host = std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
            self.vcpus.min(host).max(1)
        })
    }

    /// Xen's extra command-line words of a dom0 run: `dom0_max_vcpus=N` (always, so that
    /// the dom0 has the vCPUs it was promised whatever QEMU's CPU count), `vpmu=1`, then
    /// `--xen-arg`s.
    pub fn dom0_xen_args(&self) -> Vec<String> {
        let mut args = vec![format!("dom0_max_vcpus={}", self.vcpus)];
        args.extend(self.domu_xen_args());
        args
    }

    /// Xen's extra command-line words of a domU run: `vpmu=1`, then `--xen-arg`s.
    pub fn domu_xen_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.vpmu {
            args.push("vpmu=1".to_string());
        }
        args.extend(self.xen_args.iter().cloned());
        args
    }
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// Boot a kernel.
    Boot(BootOptions),
}

/// Parses the arguments (without the program's name). Options come first; the first
/// free word is KERNEL (unless `--kernel` named it) and every word after it is the
/// kernel's. `--` ends the options. `--name=value` is `--name value`.
pub fn parse(args: &[String]) -> RunnerResult<Command> {
    let mut options = BootOptions::default();
    let mut args_option: Option<String> = None;
    let mut trailing: Vec<String> = Vec::new();
    let mut words = args.iter().cloned();
    while let Some(word) = words.next() {
        if word == "--" || !word.starts_with('-') || word == "-" {
            // The free words: KERNEL, unless `--kernel` named it, then its arguments.
            let mut rest: Vec<String> = if word == "--" {
                words.by_ref().collect()
            } else {
                std::iter::once(word).chain(words.by_ref()).collect()
            };
            if options.kernel.is_none() && !rest.is_empty() {
                options.kernel = Some(PathBuf::from(rest.remove(0)));
            }
            trailing = rest;
            break;
        }
        let (name, inline_value) = match word.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value)),
            _ => (word.clone(), None),
        };
        let mut value = |what: &str| -> RunnerResult<String> {
            match inline_value {
                Some(v) => Ok(v.to_string()),
                None => words
                    .next()
                    .ok_or_else(|| format!("{name} needs {what}").into()),
            }
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--cpu" => options.cpu = value("a QEMU CPU model")?,
            "--vcpus" => options.vcpus = positive(&name, &value("a count")?)?,
            "--pcpus" => options.pcpus = Some(positive(&name, &value("a count")?)?),
            "--xen" => options.xen = Xen::parse(&value(XEN_CHOICES)?)?,
            "--xen-src" => options.xen_src = Some(PathBuf::from(value("a path")?)),
            "--vpmu" => options.vpmu = true,
            "--xen-arg" => options.xen_args.push(value("a Xen command-line word")?),
            "--args" => args_option = Some(value("the kernel's command line")?),
            "--kernel" => options.kernel = Some(PathBuf::from(value("a kernel ELF")?)),
            "--domu" => options.domu = true,
            "--memory" => options.memory_mib = Some(positive(&name, &value("MiB")?)?),
            "--timeout" => {
                let secs = positive(&name, &value("seconds")?)?;
                options.timeout = Some(Duration::from_secs(secs.into()));
            }
            "-v" | "--verbose" => options.verbose = true,
            _ => {
                return Err(format!(
                    "unknown option {word} (xenmsr-runner --help lists the options)"
                )
                .into());
            }
        }
        if inline_value.is_some() && takes_no_value(&name) {
            return Err(format!("{name} takes no value: {word}").into());
        }
    }
    options.kernel_args = args_option
        .into_iter()
        .filter(|a| !a.is_empty())
        .chain(trailing)
        .collect();
    check(&options)?;
    Ok(Command::Boot(options))
}

/// Whether the option `name` is a flag (so `--name=value` is a mistake).
fn takes_no_value(name: &str) -> bool {
    matches!(name, "--vpmu" | "--domu" | "--verbose")
}

/// Options that cannot go together.
fn check(options: &BootOptions) -> RunnerResult<()> {
    if options.domu {
        if options.xen != Xen::V4_17 {
            return Err(format!(
                "--domu runs under Xen 4.17 only (its dom0 carries Debian 12's toolstack), \
                 not {}",
                options.xen.label()
            )
            .into());
        }
        if options.pcpus.is_some() {
            return Err("--pcpus is for dom0 runs (the xl path's machine has 2 CPUs)".into());
        }
    } else if options.memory_mib.is_some() {
        return Err(
            "--memory is the domU's (with --domu); a dom0 has the machine's memory (give \
             Xen dom0_mem=... with --xen-arg to limit it)"
                .into(),
        );
    }
    Ok(())
}

/// A count or size of at least 1.
fn positive(option: &str, text: &str) -> RunnerResult<u32> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{option}: not a positive number: {text}").into()),
    }
}

/// The words of `XENMSR_RUNNER_ARGS` (split at whitespace, no quoting), to go before the
/// command line's own.
pub fn env_args() -> Vec<String> {
    std::env::var(ARGS_VARIABLE)
        .map(|text| text.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(args: &[&str]) -> BootOptions {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        match parse(&args) {
            Ok(Command::Boot(options)) => options,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        match parse(&args) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("{args:?} parsed: {other:?}"),
        }
    }

    #[test]
    fn cargo_runner_shape() {
        // runner = ["xenmsr-runner", "--vcpus", "4"]; `cargo test -- some_name --exact`
        let o = boot(&["--vcpus", "4", "target/k", "some_name", "--exact"]);
        assert_eq!(o.kernel, Some(PathBuf::from("target/k")));
        assert_eq!(o.vcpus, 4);
        assert_eq!(o.kernel_cmdline(), "some_name --exact");
        assert_eq!(o.dom0_xen_args(), ["dom0_max_vcpus=4"]);
        assert_eq!(o.deadline(), DOM0_TIMEOUT);
    }

    #[test]
    fn nothing_is_added_to_the_kernel_command_line() {
        assert_eq!(boot(&["k"]).kernel_cmdline(), "");
        assert_eq!(boot(&["--xen", "4.22", "k"]).kernel_cmdline(), "");
    }

    #[test]
    fn every_option() {
        let o = boot(&[
            "--cpu",
            "EPYC",
            "--vcpus=2",
            "--pcpus",
            "1",
            "--xen",
            "4.22-debug",
            "--xen-src",
            "/src",
            "--vpmu",
            "--xen-arg",
            "loglvl=none",
            "--xen-arg=sched=credit2",
            "--args",
            "a=1 b",
            "--timeout",
            "30",
            "-v",
            "k",
            "c",
        ]);
        assert_eq!(o.cpu, "EPYC");
        assert_eq!((o.vcpus, o.pcpus()), (2, 1));
        assert_eq!(o.xen, Xen::V4_22Debug);
        assert_eq!(o.xen_src, Some(PathBuf::from("/src")));
        assert_eq!(
            o.dom0_xen_args(),
            ["dom0_max_vcpus=2", "vpmu=1", "loglvl=none", "sched=credit2"]
        );
        assert_eq!(o.kernel_cmdline(), "a=1 b c");
        assert_eq!(o.deadline(), Duration::from_secs(30));
        assert!(o.verbose && !o.domu);
    }

    #[test]
    fn domu_options() {
        let o = boot(&["--domu", "--memory", "128", "--vcpus", "2", "k"]);
        assert!(o.domu);
        assert_eq!(o.memory_mib, Some(128));
        assert_eq!(o.deadline(), DOMU_TIMEOUT);
        assert!(error(&["--domu", "--xen", "4.20", "k"]).contains("4.17"));
        assert!(error(&["--memory", "128", "k"]).contains("--domu"));
    }

    #[test]
    fn kernel_as_an_option_makes_every_free_word_an_argument() {
        let o = boot(&["--kernel", "k", "--vcpus", "2", "x", "y"]);
        assert_eq!(o.kernel, Some(PathBuf::from("k")));
        assert_eq!(o.kernel_args, ["x", "y"]);
        // `--` ends the options.
        let o = boot(&["--", "--k", "--vcpus"]);
        assert_eq!(o.kernel, Some(PathBuf::from("--k")));
        assert_eq!(o.kernel_args, ["--vcpus"]);
    }

    #[test]
    fn no_kernel_is_allowed_here_and_refused_by_the_binary() {
        assert_eq!(boot(&["--cpu", "EPYC"]).kernel, None);
    }

    #[test]
    fn usage_errors() {
        assert!(error(&["--xen-args", "x", "k"]).contains("unknown option --xen-args"));
        assert!(error(&["--vcpus", "0", "k"]).contains("positive"));
        assert!(error(&["--vcpus"]).contains("needs"));
        assert!(error(&["--xen", "5.0", "k"]).contains("4.22-debug"));
        assert!(error(&["--vpmu=1", "k"]).contains("takes no value"));
    }

    #[test]
    fn help_and_version() {
        let parse_one = |a: &str| parse(&[a.to_string()]).unwrap();
        assert_eq!(parse_one("--help"), Command::Help);
        assert_eq!(parse_one("-V"), Command::Version);
    }
}
