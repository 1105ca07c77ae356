//! The in-guest suites, and what the harness says about the machine they run on.

pub mod bench;
pub mod boot;
pub mod failsafe;
pub mod fsgsbase;
pub mod hotplug;
pub mod lifecycle;
pub mod percpu;
pub mod pmu;
pub mod pmu_diff;
pub mod raw;
pub mod routing;
pub mod smpbench;
pub mod stubs;
pub mod sweep;
pub mod xen;

use spin::Once;

use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::BootInfo;
use crate::{events, smp, testing};

/// CPU vendor, as the tests care about it (Xen picks MSR semantics by host vendor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// AuthenticAMD (QEMU's `qemu64` is AMD family 0xf; `EPYC` family 0x17).
    Amd,
    /// GenuineIntel (`Skylake-Client`).
    Intel,
}

/// A Xen release whose behaviour the suites encode, named by the harness with `xen=`.
/// Where releases differ in something a test checks, the test matches on this; the `xen`
/// suite checks first that the running hypervisor is the release named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenRelease {
    /// Xen 4.17 (Debian 12's `xen-hypervisor-4.17-amd64`).
    V4_17,
    /// Xen 4.20 (Debian 13's `xen-hypervisor-4.20-amd64`).
    V4_20,
    /// Xen 4.22 (built from the 4.22.0 source, release or debug: the build changes no
    /// answer the suites check).
    V4_22,
}

impl XenRelease {
    /// The release a `xen=` value names, if the suites know it.
    pub fn parse(arg: &str) -> Option<Self> {
        match arg {
            "4.17" => Some(Self::V4_17),
            "4.20" => Some(Self::V4_20),
            "4.22" => Some(Self::V4_22),
            _ => None,
        }
    }

    /// `(major, minor)`, as `xen_version(XENVER_version)` reports it.
    pub const fn version(self) -> (u16, u16) {
        match self {
            Self::V4_17 => (4, 17),
            Self::V4_20 => (4, 20),
            Self::V4_22 => (4, 22),
        }
    }
}

/// What the harness told the kernel about the machine (`cpu=`, `vpmu=`, `xen=`), so that
/// tests encode per-model and per-release expectations instead of discovering them.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    /// The QEMU CPU model name, if given.
    pub cpu: Option<&'static str>,
    /// The vendor that model implies, if known.
    pub vendor: Option<Vendor>,
    /// Whether Xen was booted with `vpmu=1` *and* its vPMU can initialise on this model
    /// (only `EPYC` under TCG; see the reference notes §1.7).
    pub vpmu_active: bool,
    /// Whether the harness booted this kernel as dom0 (`suite=dom0`) rather than as a
    /// domU (`suite=domu`): checked against `start_info` by `boot::start_info`.
    pub dom0: bool,
    /// How many vCPUs the domain has (`vcpus=`, default 1): all of them run the suites.
    pub vcpus: u32,
    /// The one-shot timer period while the suites run, in µs (`tick_us=`, default 200;
    /// 0: no upcalls).
    pub tick_us: u64,
    /// `fsgsbase=1`: the library is initialised with `FsGsBase::Use`.
    pub fsgsbase: bool,
    /// The `xen=` argument as given, for messages.
    pub xen_arg: Option<&'static str>,
    /// The Xen release `xen=` names, if known: checked against the running hypervisor by
    /// `xen::xen_version_matches_harness`.
    pub xen: Option<XenRelease>,
    /// `xenbuild=debug|release`: whether the harness booted a debug hypervisor (a guest
    /// cannot ask Xen; the harness checks Xen's banner). `None` if not given.
    pub xen_debug: Option<bool>,
}

static MODEL: Once<Model> = Once::new();

/// The model of this run.
pub fn model() -> &'static Model {
    MODEL.get().expect("the model is set before the suites run")
}

fn parse_model(info: &'static BootInfo, dom0: bool) -> Model {
    let cpu = info.arg("cpu");
    let vendor = match cpu {
        Some("qemu64" | "EPYC" | "max") => Some(Vendor::Amd),
        Some("Skylake-Client") => Some(Vendor::Intel),
        _ => None,
    };
    let vpmu = info.arg("vpmu") == Some("1");
    let xen_arg = info.arg("xen");
    Model {
        cpu,
        vendor,
        vpmu_active: vpmu && cpu == Some("EPYC"),
        dom0,
        vcpus: info.arg("vcpus").and_then(|v| v.parse().ok()).unwrap_or(1),
        tick_us: info
            .arg("tick_us")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_TICK_US),
        fsgsbase: info.arg("fsgsbase") == Some("1"),
        xen_arg,
        xen: xen_arg.and_then(XenRelease::parse),
        xen_debug: match info.arg("xenbuild") {
            Some("debug") => Some(true),
            Some("release") => Some(false),
            _ => None,
        },
    }
}

/// The default one-shot timer period: short enough that upcalls land inside stubs
/// thousands of times per run under TCG, long enough that the suites still progress.
const DEFAULT_TICK_US: u64 = 200;

/// Whether the command line asks for FSGSBASE (`fsgsbase=1`).
pub fn fsgsbase_requested() -> bool {
    MODEL.get().is_some_and(|m| m.fsgsbase)
}

/// Whether this run's vPMU is active (false before the model is known).
pub fn vpmu_active() -> bool {
    MODEL.get().is_some_and(|m| m.vpmu_active)
}

/// Runs the suites for `suite` (`dom0` or `domu`), or the benchmarks (`bench`, as dom0).
pub fn run(suite: &str, info: &'static BootInfo) {
    let dom0 = match suite {
        "dom0" | "bench" | "smpbench" | "sweep" => true,
        "domu" | "lifecycle" => false,
        other => {
            testing::record(
                "suites::select",
                Err(testing::Failure::new(format_args!(
                    "unknown suite {other:?} (expected dom0, domu, lifecycle, bench, smpbench, sweep or demo)"
                ))),
            );
            return;
        }
    };
    let model = MODEL.call_once(|| parse_model(info, dom0));
    crate::println!(
        "suite {suite}: cpu {} vendor {:?} vpmu {} xen {}",
        model.cpu.unwrap_or("?"),
        model.vendor,
        if model.vpmu_active { "active" } else { "off" },
        model.xen_arg.unwrap_or("?")
    );
    if suite == "bench" {
        return bench::run();
    }
    if suite == "smpbench" {
        return smpbench::run();
    }
    if suite == "lifecycle" {
        return lifecycle::run();
    }
    if suite == "sweep" {
        sweep::run();
        testing::record("sweep::completed", Ok(()));
        return;
    }
    // vCPU 0 alone: the boot protocol and the trap path, before anything else.
    testing::run(boot::TESTS);
    // Events, then the other vCPUs.
    testing::run(percpu::BRING_UP);
    if smp::online() != model.vcpus || !events_ready() {
        return;
    }
    // From here on every vCPU runs, each taking timer upcalls whose handler accesses MSRs
    // through the library.
    let tick_ns = model.tick_us * 1000;
    TICK_NS.store(tick_ns, Ordering::Relaxed);
    events::set_handler_work(true);
    smp::run_on_all(start_ticking);
    // Before `xenmsr::init`: the trap path, Xen's behaviour (the oracle) and the
    // instruction layer, on every vCPU at once.
    smp::run_on_all(|_| {
        testing::run(boot::TESTS);
        testing::run(xen::TESTS);
        testing::run(stubs::TESTS);
    });
    // `xenmsr::init` patches code: every other vCPU parked, upcalls masked everywhere.
    smp::stop_the_world(|| testing::run(routing::INIT_TESTS));
    // From here on the library is initialised: sites are patched and routed. First the
    // tests that rewrite a site or count warnings globally (before any other unchecked
    // failure has warned): the others parked, vCPU 0 still taking upcalls.
    smp::with_others_parked(|| testing::run(routing::SERIAL_TESTS));
    smp::run_on_all(|_| testing::run(routing::TESTS));
    smp::run_on_all(|_| {
        testing::run(pmu::TESTS);
        testing::run(pmu_diff::TESTS);
        testing::run(percpu::TESTS);
        testing::run(failsafe::TESTS);
        if fsgsbase_requested() {
            testing::run(fsgsbase::TESTS);
        }
    });
    // vCPU hotplug: every vCPU but 0 goes down and up again and again while vCPU 0 runs
    // the stress, timers ticking.
    hotplug::arm();
    smp::run_on_all(|_| testing::run(hotplug::TESTS));
    hotplug::disarm();
    // The library's suspend/resume pair against the real hypervisor (no suspend: a dom0
    // cannot), with every churned vCPU's vPMU page registered.
    if model.dom0 {
        testing::run(lifecycle::DOM0_TESTS);
    }
    smp::run_on_all(|_| events::stop_ticking());
    testing::run(percpu::REPORT);
}

static TICK_NS: AtomicU64 = AtomicU64::new(0);

fn start_ticking(_vcpu: u32) {
    let tick = TICK_NS.load(Ordering::Relaxed);
    if tick != 0 {
        events::start_ticking(tick);
    }
}

fn events_ready() -> bool {
    percpu::events_ready()
}

/// Shorthand for a test entry, named `<suite module>::<function>`.
#[macro_export]
macro_rules! test {
    ($name:ident) => {
        $crate::testing::Test {
            name: $crate::testing::short_name(concat!(module_path!(), "::", stringify!($name))),
            run: $name,
        }
    };
}
