//! `xenmsr-runner [OPTIONS] KERNEL [KERNEL-ARGS...]`: boots a Xen PV kernel under Xen in
//! QEMU and exits with how it ended (see `--help`).

use xenmsr_runner::boot::boot_and_report;
use xenmsr_runner::cli::{self, Command, USAGE};
use xenmsr_runner::outcome::exit_status;
use xenmsr_runner::provision::Provisioner;

fn main() {
    // The variable's options come first, so the command line's own override them.
    let args: Vec<String> = cli::env_args()
        .into_iter()
        .chain(std::env::args().skip(1))
        .collect();
    let options = match cli::parse(&args) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            return;
        }
        Ok(Command::Version) => {
            println!("xenmsr-runner {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Ok(Command::Boot(options)) => options,
        Err(e) => {
            eprintln!("xenmsr-runner: {e}");
            std::process::exit(exit_status::SETUP_FAILED);
        }
    };
    if options.kernel.is_none() {
        eprintln!(
            "xenmsr-runner: no KERNEL given\n\
             usage: xenmsr-runner [OPTIONS] KERNEL [KERNEL-ARGS...] (--help lists the options)"
        );
        std::process::exit(exit_status::SETUP_FAILED);
    }
    let cache = match Provisioner::user_cache_dir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("xenmsr-runner: {e}");
            std::process::exit(exit_status::SETUP_FAILED);
        }
    };
    let xen_source = options
        .xen_src
        .clone()
        .or_else(|| std::env::var_os("XENMSR_XEN_SRC").map(Into::into));
    let prov = Provisioner::new(cache).with_xen_source(xen_source);
    std::process::exit(boot_and_report(&prov, &options));
}
