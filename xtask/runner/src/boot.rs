//! Booting a kernel as the command line asks: provisioning, one line saying what is
//! booted, the console streamed, how it ended, and the exit status.

use std::path::Path;
use std::time::Instant;

use crate::RunnerResult;
use crate::cli::{BootOptions, DOMU_MEMORY_MIB};
use crate::outcome::{Outcome, exit_status};
use crate::provision::Provisioner;
use crate::qemu::{self, Dom0Run, Echo};
use crate::xl::{self, DomuOptions, TimedOut};

/// Boots the kernel `options` name, streams its console, prints how it ended and returns
/// the exit status ([`exit_status`]): the guest's outcome, or
/// [`exit_status::SETUP_FAILED`] if it could not be booted.
pub fn boot_and_report(prov: &Provisioner, options: &BootOptions) -> i32 {
    match boot(prov, options) {
        Ok(outcome) => outcome.exit_status(),
        Err(e) if e.is::<TimedOut>() => {
            prov.say(format_args!("{e}; exit status {}", exit_status::TIMED_OUT));
            exit_status::TIMED_OUT
        }
        Err(e) => {
            prov.say(format_args!("error: {e}"));
            exit_status::SETUP_FAILED
        }
    }
}

/// Boots the kernel `options` name (as dom0, or as an xl domU with `--domu`), streams
/// its console and prints how it ended. Errors are the runner's: no kernel, provisioning
/// failed, QEMU would not start.
pub fn boot(prov: &Provisioner, options: &BootOptions) -> RunnerResult<Outcome> {
    let kernel = options
        .kernel
        .as_deref()
        .ok_or("no KERNEL given (xenmsr-runner [OPTIONS] KERNEL [KERNEL-ARGS...])")?;
    check_kernel(kernel)?;
    let outcome = if options.domu {
        boot_domu(prov, kernel, options)?
    } else {
        boot_dom0(prov, kernel, options)?
    };
    Ok(outcome)
}

/// Refuses what cannot be a 64-bit x86 kernel, with a message better than Xen's.
fn check_kernel(kernel: &Path) -> RunnerResult<()> {
    let mut header = [0u8; 20];
    let read = std::fs::File::open(kernel).and_then(|mut file| {
        use std::io::Read;
        file.read_exact(&mut header)
    });
    if let Err(e) = read {
        return Err(format!("cannot read the kernel {}: {e}", kernel.display()).into());
    }
    const ELFCLASS64: u8 = 2;
    const EM_X86_64: u16 = 62;
    if &header[..4] != b"\x7fELF" {
        return Err(format!("{} is not an ELF file", kernel.display()).into());
    }
    if header[4] != ELFCLASS64 || u16::from_le_bytes([header[18], header[19]]) != EM_X86_64 {
        return Err(format!("{} is not a 64-bit x86 ELF", kernel.display()).into());
    }
    Ok(())
}

/// `"text"`, or `(empty)`.
fn quoted(text: &str) -> String {
    if text.is_empty() {
        "(empty)".to_string()
    } else {
        format!("{text:?}")
    }
}

fn boot_dom0(prov: &Provisioner, kernel: &Path, options: &BootOptions) -> RunnerResult<Outcome> {
    let qemu_binary = prov.qemu()?;
    let xen_binary = prov.xen_binary(options.xen)?;
    let name = kernel
        .file_name()
        .map_or("kernel".into(), |n| n.to_string_lossy().into_owned());
    let run = Dom0Run {
        name,
        cpu: options.cpu.clone(),
        smp: options.pcpus(),
        xen_args: options.dom0_xen_args(),
        kernel_args: options.kernel_cmdline(),
        deadline: options.deadline(),
        xen: options.xen,
        banner: None,
    };
    prov.say(format_args!(
        "booting {} as dom0 under Xen {} ({}); QEMU -cpu {} -smp {}; {} vCPU{}; Xen command \
         line: {}; kernel command line: {}",
        kernel.display(),
        options.xen.label(),
        options.xen.origin(),
        qemu::qemu_cpu(&run.cpu),
        run.smp,
        options.vcpus,
        if options.vcpus == 1 { "" } else { "s" },
        qemu::xen_cmdline(run.xen, &run.xen_args),
        quoted(&run.kernel_args),
    ));
    let echo = if options.verbose {
        Echo::Serial
    } else {
        Echo::Console
    };
    let report = qemu::run_dom0(prov, &qemu_binary, &xen_binary, kernel, &run, echo)?;
    let outcome = report.outcome.clone();
    prov.say(format_args!(
        "{outcome}, after {:.1} s; exit status {}; serial log {}",
        report.wall.as_secs_f64(),
        outcome.exit_status(),
        report.log_path.display()
    ));
    if !outcome.succeeded() {
        // A crash or a panic has been shown as it happened; an end nothing explained is
        // shown with what Xen and QEMU said last.
        if !options.verbose
            && matches!(
                outcome,
                Outcome::TimedOut { .. } | Outcome::QemuExited { .. }
            )
        {
            eprintln!("----- the last {} serial lines -----", report.tail.len());
            for line in &report.tail {
                eprintln!("{line}");
            }
            eprintln!("-----");
        }
        prov.say(format_args!("reproduce with: {}", report.command));
    }
    Ok(outcome)
}

fn boot_domu(prov: &Provisioner, kernel: &Path, options: &BootOptions) -> RunnerResult<Outcome> {
    let xl_options = DomuOptions {
        args: options.kernel_cmdline(),
        deadline: options.deadline(),
        memory_mib: options.memory_mib.unwrap_or(DOMU_MEMORY_MIB),
        vcpus: options.vcpus,
        verbose: options.verbose,
        echo_console: true,
        cpu: Some(options.cpu.clone()),
        xen_args: options.domu_xen_args(),
        lifecycle: None,
    };
    prov.say(format_args!(
        "booting {} as a PV domU (xl create; {} vCPU{}, {} MiB) under a Linux dom0 and Xen \
         4.17 ({}); QEMU -cpu {} -smp 2; Xen command line: {}; kernel command line: {}",
        kernel.display(),
        xl_options.vcpus,
        if xl_options.vcpus == 1 { "" } else { "s" },
        xl_options.memory_mib,
        options.xen.origin(),
        qemu::qemu_cpu(&options.cpu),
        xl::xen_cmdline(&xl_options.xen_args),
        quoted(&xl_options.args),
    ));
    let start = Instant::now();
    let run = xl::run_domu(prov, kernel, &xl_options)?;
    let outcome = run.outcome(xl_options.deadline);
    let console_log = prov.logs_dir().join("domU.console.log");
    let _ = std::fs::write(&console_log, &run.console_log);
    prov.say(format_args!(
        "{outcome}, after {:.1} s; exit status {}; console log {}",
        start.elapsed().as_secs_f64(),
        outcome.exit_status(),
        console_log.display()
    ));
    if !outcome.succeeded() && !run.xl_log.is_empty() {
        eprintln!("----- xl's log of the domain -----");
        eprintln!("{}", run.xl_log);
        eprintln!("-----");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_x86_64_elf_files_boot() {
        let dir = std::env::temp_dir().join(format!("xenmsr-runner-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let mut elf = *b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0";
        let good = write("good", &elf);
        elf[18] = 3; // EM_386
        let i386 = write("i386", &elf);
        let text = write("text", b"#!/bin/sh\necho not a kernel\n");
        let results = (
            check_kernel(&good),
            check_kernel(&i386),
            check_kernel(&text),
            check_kernel(&dir.join("missing")),
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(results.0.is_ok());
        assert!(results.1.unwrap_err().to_string().contains("64-bit x86"));
        assert!(results.2.unwrap_err().to_string().contains("not an ELF"));
        assert!(results.3.unwrap_err().to_string().contains("cannot read"));
    }
}
