//! A thread parked *inside* a stub while its site is re-patched resumes correctly.
//!
//! A kernel's stop-the-world parks each other vCPU wherever its IPI or upcall lands,
//! which may be inside a stub a site called (an upcall arrives during the segment-base
//! hypercall, say): the stub is on that vCPU's stack, and its return address points into
//! the site. Here a worker thread makes a real FS_BASE write through a site of this binary
//! on the mock hypercall page, whose `set_segment_base` handler parks it (inside the
//! hypercall, with the site's stub on its stack). The main thread then rewrites the site
//! with another variant the production patcher can give it, releases the worker, and the
//! worker must return from the site normally, with the write made exactly once.
//!
//! Every pair is tried: each variant that calls a stub reaching the hypercall (the
//! segment-base stub, the generic write stub) as the one the worker parks in, and every
//! other variant of the site (every CPU feature set, every Xen PV routing) as the one it
//! returns into. Before every variant of a 9-byte site was one instruction, the return
//! address (site + 5) was in the middle of the native variants (`wrmsr; nop7`): the worker
//! died with SIGSEGV/SIGILL there.
//!
//! One test per binary: it runs `xenmsr::init` and rewrites this binary's text.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use xenmsr::MsrError;
use xenmsr::patch::{CpuFeatures, Variant, XenRouting, wanted_bytes_with};
use xenmsr::pmu::{PmuLayout, raw_cpuid};
use xenmsr::routes::MSR_FS_BASE;
use xenmsr_asm::patch::{PatchOp, PatchSite, patch_sites};
use xenmsr_host_tests::{install_fault_handlers, mock_xen_pv_config, write_text_mprotect};
use xenmsr_hypercall::{mock, nr};

/// The worker is inside the `set_segment_base` handler.
static PARKED: AtomicBool = AtomicBool::new(false);
/// The worker may leave the handler.
static RELEASE: AtomicBool = AtomicBool::new(false);

const DEADLINE: Duration = Duration::from_secs(20);

#[inline(never)]
fn const_fs_write(value: u64) -> Result<(), MsrError> {
    // SAFETY: on Xen PV variants the (mock) hypercall records the base and changes
    // nothing; the worker returns from the site before any other variant runs.
    unsafe { xenmsr::wrmsr_ns_const_safe::<MSR_FS_BASE>(value) }
}

#[inline(never)]
fn fs_write(value: u64) -> Result<(), MsrError> {
    // SAFETY: as above, through the run-time-index site and the write stub's hypercall.
    unsafe { xenmsr::wrmsr_safe(MSR_FS_BASE, value) }
}

/// The site of `op` inside `function`.
fn site_in(function: fn(u64) -> Result<(), MsrError>, op: PatchOp) -> PatchSite {
    let start = function as *const () as usize;
    patch_sites()
        .filter(|s| s.op == Some(op) && s.addr >= start && s.addr < start + 4096)
        .min_by_key(|s| s.addr)
        .unwrap_or_else(|| panic!("no {op:?} site in the function at {start:#x}"))
}

/// Every variant the patcher can give `site`: every feature set natively, every routing
/// on Xen PV.
fn variants(site: &PatchSite) -> BTreeSet<Vec<u8>> {
    let mut routings = Vec::new();
    for layout in [None, Some(PmuLayout::from_cpuid(raw_cpuid))] {
        for direct_segbase in [false, true] {
            for fsgsbase in [false, true] {
                routings.push(XenRouting {
                    direct_segbase,
                    layout,
                    fsgsbase,
                });
            }
        }
    }
    let mut all = BTreeSet::new();
    for bits in 0..8 {
        let features = CpuFeatures {
            wrmsrns: bits & 1 != 0,
            msr_imm: bits & 2 != 0,
            fsgsbase: bits & 4 != 0,
        };
        for routing in &routings {
            for variant in [Variant::Native(features), Variant::XenPv] {
                let bytes = wanted_bytes_with(site, variant, routing).expect("patchable");
                all.insert(bytes.as_slice().to_vec());
            }
        }
    }
    all
}

/// Whether `bytes` (a variant of `site`) calls a stub.
fn is_call(site: &PatchSite, bytes: &[u8]) -> bool {
    Decoder::with_ip(64, bytes, site.addr as u64, DecoderOptions::NONE)
        .decode()
        .flow_control()
        == FlowControl::Call
}

fn write_site(site: &PatchSite, bytes: &[u8]) {
    // SAFETY: a live patch site of this binary; the worker is either idle (outside every
    // site) or parked inside the hypercall handler, and returns to the end of the site
    // (a boundary of every variant) without running the site's instruction again.
    unsafe { write_text_mprotect(site.addr, bytes) };
    xenmsr::patch::serialise();
}

fn wait_until(flag: &AtomicBool, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::yield_now();
    }
}

type Job = (fn(u64) -> Result<(), MsrError>, u64);
type Outcome = (Result<(), MsrError>, Vec<mock::MockCall>);

/// Runs each job's site on this thread; the mock's `set_segment_base` parks it until
/// released.
fn worker(jobs: mpsc::Receiver<Job>, results: mpsc::Sender<Outcome>) {
    let _session = mock::session();
    mock::on(nr::SET_SEGMENT_BASE, |_| {
        PARKED.store(true, Ordering::SeqCst);
        while !RELEASE.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        0
    });
    for (function, value) in jobs {
        let result = function(value);
        results.send((result, mock::take_calls())).expect("main");
    }
}

#[test]
fn a_thread_parked_inside_a_stub_survives_its_site_being_repatched() {
    install_fault_handlers();
    // SAFETY: before the worker starts; the sites are this binary's; the writer maps the
    // text writable around each store.
    unsafe { xenmsr::init(mock_xen_pv_config()) }.expect("init");
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (result_tx, result_rx) = mpsc::channel::<Outcome>();
    let handle = std::thread::spawn(move || worker(job_rx, result_tx));

    let mut value = 0x0000_7f00_0000_0000;
    let mut tried = 0;
    for (function, op) in [
        (
            const_fs_write as fn(u64) -> Result<(), MsrError>,
            PatchOp::WriteImm,
        ),
        (fs_write, PatchOp::Write),
    ] {
        let site = site_in(function, op);
        let initial = {
            // SAFETY: the site lies in this binary's text, mapped readable.
            let code = unsafe {
                core::slice::from_raw_parts(site.addr as *const u8, usize::from(site.len))
            };
            code.to_vec()
        };
        let all = variants(&site);
        let parkers: Vec<_> = all.iter().filter(|b| is_call(&site, b)).collect();
        assert!(!parkers.is_empty(), "{site:?}: no call variant");
        for parker in &parkers {
            for target in all.iter().filter(|b| b != parker) {
                write_site(&site, parker);
                PARKED.store(false, Ordering::SeqCst);
                RELEASE.store(false, Ordering::SeqCst);
                value += 0x1000;
                job_tx.send((function, value)).expect("worker alive");
                wait_until(&PARKED, "the worker is parked inside the hypercall");
                // The worker is inside the hypercall, its stub on the stack: re-patch.
                write_site(&site, target);
                RELEASE.store(true, Ordering::SeqCst);
                let (result, calls) = result_rx.recv_timeout(DEADLINE).unwrap_or_else(|e| {
                    panic!("{site:?}: parked in {parker:02x?}, re-patched to {target:02x?}: {e}")
                });
                assert_eq!(
                    result,
                    Ok(()),
                    "{site:?}: parked in {parker:02x?}, re-patched to {target:02x?}"
                );
                assert_eq!(
                    calls,
                    [mock::MockCall::new(
                        nr::SET_SEGMENT_BASE,
                        [0, value, 0, 0, 0]
                    )],
                    "{site:?}: parked in {parker:02x?}, re-patched to {target:02x?}"
                );
                tried += 1;
            }
        }
        write_site(&site, &initial);
    }
    drop(job_tx);
    handle.join().expect("the worker failed");
    assert!(tried >= 8, "only {tried} re-patches tried");
    eprintln!("{tried} re-patches of a site with a thread parked inside its stub");
}
