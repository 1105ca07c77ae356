//! The vCPU-id hook is checked, so that a wrong one fails loudly instead of silently
//! (issue 15's review: with `Config::xen_pv`'s old default hook `|| 0`, vCPU 1 read the
//! boot vCPU's APIC base and shared vPMU slot 0):
//!
//! - a kernel on stacks of its own that gives no hook: `init` fails with
//!   `InitError::BootVcpuId(UNKNOWN_VCPU)` (the default hook asks the kit's stacks, and a
//!   host thread's stack is none of them);
//! - a hook that names every vCPU 0 (the forgotten-hook case): the second vCPU's
//!   registration fails with `VcpuError::IdInUse(0)`;
//! - an id Xen does not have (`ENOENT`: at or above the vCPU count), or of a vCPU Xen
//!   says is down: refused, and the id stays free for the right vCPU.
//!
//! Host threads play the vCPUs, each with its id in a thread-local; the mock hypercall page
//! answers `VCPUOP_is_up` per thread. One test per binary: `init` state is per process.

use std::cell::Cell;

use xenmsr::smp::{self, UNKNOWN_VCPU, VcpuError};
use xenmsr::{Config, InitError};
use xenmsr_hypercall::mock;
use xenmsr_hypercall::{Errno, nr};

thread_local! {
    static MY_ID: Cell<u32> = const { Cell::new(0) };
}

fn thread_id() -> u32 {
    MY_ID.get()
}

/// Runs `f` on a new thread that the hook names `id`, with `VCPUOP_is_up` answering
/// `is_up` there.
fn on_vcpu<R: Send + 'static>(
    id: u32,
    is_up: Result<bool, Errno>,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    std::thread::spawn(move || {
        MY_ID.set(id);
        mock::on(nr::VCPU_OP, move |args| {
            assert_eq!(
                args[0],
                u64::from(nr::VCPUOP_IS_UP),
                "only VCPUOP_is_up is asked"
            );
            assert_eq!(args[1], u64::from(id), "Xen is asked about the hook's id");
            match is_up {
                Ok(up) => i64::from(up),
                Err(e) => -i64::from(e.0),
            }
        });
        f()
    })
    .join()
    .expect("vCPU thread")
}

#[test]
fn a_wrong_vcpu_id_hook_fails_loudly() {
    xenmsr_host_tests::install_fault_handlers();
    let no_hook = Config::xen_pv(mock::page())
        .with_cpuid(xenmsr::pmu::raw_cpuid)
        .with_write_text(xenmsr_host_tests::write_text_mprotect);
    // SAFETY: the host test harness's contract for `init` (text patched through
    // mprotect, the mock hypercall page); this call fails before changing anything.
    let first = unsafe { xenmsr::init(no_hook) };
    assert_eq!(first.err(), Some(InitError::BootVcpuId(UNKNOWN_VCPU)));
    assert!(!smp::is_registered(0), "a refused init registers nothing");

    // A hook that reads each thread's id. Before init nothing can register.
    assert_eq!(
        on_vcpu(1, Ok(true), smp::register_this_vcpu),
        Err(VcpuError::NotInitialised)
    );
    let config = xenmsr_host_tests::mock_xen_pv_config().with_vcpu_id(thread_id);
    // SAFETY: as above; this one succeeds, once per process.
    unsafe { xenmsr::init(config) }.expect("init with a working hook");
    assert!(smp::is_registered(0), "init registers the boot vCPU as 0");
    assert_eq!(smp::current_vcpu(), Some(0));

    // The forgotten hook: a second vCPU is also called 0.
    assert_eq!(
        on_vcpu(0, Ok(true), smp::register_this_vcpu),
        Err(VcpuError::IdInUse(0))
    );
    // An id at or above the domain's vCPU count: Xen answers ENOENT.
    assert_eq!(
        on_vcpu(4, Err(Errno::ENOENT), smp::register_this_vcpu),
        Err(VcpuError::NoSuchVcpu(4, Errno::ENOENT))
    );
    // An id of a vCPU Xen says is down: not the one running.
    assert_eq!(
        on_vcpu(2, Ok(false), smp::register_this_vcpu),
        Err(VcpuError::NotUp(2))
    );
    assert!(!smp::is_registered(2) && !smp::is_registered(4));
    // The right vCPUs register, once each.
    assert_eq!(on_vcpu(1, Ok(true), smp::register_this_vcpu), Ok(1));
    assert_eq!(on_vcpu(2, Ok(true), smp::register_this_vcpu), Ok(2));
    assert_eq!(
        on_vcpu(1, Ok(true), smp::register_this_vcpu),
        Err(VcpuError::IdInUse(1))
    );
    assert_eq!(on_vcpu(1, Ok(true), smp::current_vcpu), Some(1));
    // The errors say what is wrong.
    let text = VcpuError::IdInUse(0).to_string();
    assert!(text.contains("does not tell vCPUs apart"), "{text}");
    let text = InitError::BootVcpuId(UNKNOWN_VCPU).to_string();
    assert!(text.contains("Config::with_vcpu_id"), "{text}");
}
