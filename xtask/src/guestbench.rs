//! `cargo xtask bench`, in-guest side: TSC cycles per operation in the PV test kernel,
//! booted as dom0 under Xen in QEMU (TCG), turned into ratios.
//!
//! [`run`] builds the kernel, boots it with `suite=bench` on each CPU model of
//! [`MODELS`], parses the kernel's `bench` lines (one per path and batch; see
//! `tests/pvkernel/src/suites/bench.rs`), computes per-batch ratios between paths that
//! ran side by side in the same run, prints a table and returns the Markdown of the
//! `## In-guest (TCG)` section of `docs/benchmarks.md`, which [`write_section`] puts in.
//!
//! Every number comes from the runs of this invocation. A run whose kernel reports a
//! failure (an operation with the wrong result, or a hypercall, `#GP` or `#UD` count per
//! operation other than the path declares) fails the whole benchmark.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::provision::Xen;
use crate::qemu::{self, Echo, RunReport};
use crate::{XtaskResult, kernel, provisioner, pvkernel_run, root_dir};

/// The heading of the section this module owns; `bench::host_bench` keeps everything
/// from this heading to the end of the file, so the two must agree.
const HEADING: &str = "## In-guest (TCG)";
/// The deadline of one benchmark boot (a run takes 2-10 s on an idle machine).
const DEADLINE: Duration = Duration::from_secs(300);

/// One CPU model to measure on.
struct Model {
    cpu: &'static str,
    /// Xen's `vpmu=1` (only `EPYC` has a vPMU that initialises under TCG).
    vpmu: bool,
    /// Xen's `xpti=false`: a control run that shows what XPTI does to the hypercall.
    no_xpti: bool,
    /// `fsgsbase=1`: the library opted in to FSGSBASE (the FS base through
    /// WRFSBASE/RDFSBASE where the model has it).
    fsgsbase: bool,
}

/// The models, in table order.
const MODELS: [Model; 6] = [
    Model {
        cpu: "qemu64",
        vpmu: false,
        no_xpti: false,
        fsgsbase: false,
    },
    Model {
        cpu: "Skylake-Client",
        vpmu: false,
        no_xpti: false,
        fsgsbase: false,
    },
    Model {
        cpu: "EPYC",
        vpmu: true,
        no_xpti: false,
        fsgsbase: false,
    },
    // Control: Skylake-Client is the one model where Xen enables XPTI for dom0.
    Model {
        cpu: "Skylake-Client",
        vpmu: false,
        no_xpti: true,
        fsgsbase: false,
    },
    // The two models whose domain policy has FSGSBASE, with the library opted in.
    Model {
        cpu: "Skylake-Client",
        vpmu: false,
        no_xpti: false,
        fsgsbase: true,
    },
    Model {
        cpu: "EPYC",
        vpmu: true,
        no_xpti: false,
        fsgsbase: true,
    },
];

impl Model {
    fn label(&self) -> String {
        format!(
            "{}{}{}{}",
            self.cpu,
            if self.vpmu { " + vpmu=1" } else { "" },
            if self.no_xpti {
                " + xpti=false (control)"
            } else {
                ""
            },
            if self.fsgsbase { " + FSGSBASE" } else { "" }
        )
    }

    fn run_name(&self) -> String {
        format!(
            "bench/{}{}{}{}",
            self.cpu,
            if self.vpmu { "+vpmu" } else { "" },
            if self.no_xpti { "+noxpti" } else { "" },
            if self.fsgsbase { "+fsgsbase" } else { "" }
        )
    }

    fn xen_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.vpmu {
            args.push("vpmu=1".to_string());
        }
        if self.no_xpti {
            args.push("xpti=false".to_string());
        }
        args
    }

    fn kernel_args(&self) -> String {
        format!(
            "suite=bench cpu={} vpmu={} fsgsbase={}",
            self.cpu,
            u8::from(self.vpmu),
            u8::from(self.fsgsbase)
        )
    }
}

/// What each path measures (for the tables; the kernel defines the paths).
const PATHS: &[(&str, &str)] = &[
    (
        "loop/empty",
        "the measuring loop alone (indirect call of an empty operation)",
    ),
    (
        "fs/trapped_wrmsr",
        "raw `wrmsr` of FS_BASE (canonical), trapped and emulated by Xen",
    ),
    (
        "fs/shim",
        "`xenmsr::wrmsr_safe(FS_BASE, v)`: the write stub's segment-base path → `set_segment_base` (with FSGSBASE: `wrfsbase`), no Rust",
    ),
    (
        "fs/shim_unchecked",
        "`xenmsr::wrmsr(FS_BASE, v)` (unchecked site), same route",
    ),
    (
        "fs/bare_hypercall",
        "bare `set_segment_base(FS, v)` through the same (tracing) hypercall page",
    ),
    (
        "fs/shim_const",
        "`xenmsr::wrmsr_ns_const_safe::<FS_BASE>(v)`: the constant-index site, patched to the direct segment-base stub (with FSGSBASE: `wrfsbase` inline)",
    ),
    (
        "read/stub",
        "`xenmsr::rdmsr_safe(0x10)`: the read stub's filter says pass-through → the stub's `rdmsr`, trapped (no Rust)",
    ),
    (
        "fsread/trapped_rdmsr",
        "raw `rdmsr` of FS_BASE, trapped and emulated by Xen",
    ),
    (
        "fsread/shim",
        "`xenmsr::rdmsr_safe(FS_BASE)`: the read stub (with FSGSBASE its filter sends FS_BASE to `rdfsbase`; without, the trapped `rdmsr`)",
    ),
    (
        "fsread/shim_const",
        "`xenmsr::rdmsr_const_safe::<FS_BASE>()`: the constant-index site (`rdfsbase` inline with FSGSBASE; the native `rdmsr` inline, trapped, without)",
    ),
    (
        "read/trapped_rdmsr",
        "raw `rdmsr` of 0x10 (TSC), trapped and emulated by Xen",
    ),
    (
        "pmu/cached_stub",
        "`xenmsr::rdmsr_safe(counter 0)` with `PMU_CACHED` set by the guest: served from the shared page",
    ),
    (
        "pmu/trapped_rdmsr",
        "raw `rdmsr` of the same counter, trapped and emulated by Xen's vPMU",
    ),
    (
        "pmu/stub_uncached",
        "`xenmsr::rdmsr_safe(counter 0)`, `PMU_CACHED` clear: passes through to the trap",
    ),
    (
        "fail/rewind",
        "`xenmsr::wrmsr_safe(FS_BASE, non-canonical)`: hypercall `-EINVAL` → CF → `ud2` (#UD) → rewind → the site's fixup → `Err`",
    ),
    (
        "fail/native_gp",
        "`xenmsr_asm::native::wrmsr_safe(FS_BASE, non-canonical)`: raw `wrmsr` → #GP from Xen → trap handler → `fixup_exception` → `Err`",
    ),
    (
        "fail/stub_gp_rewind",
        "`xenmsr::rdmsr_safe(unknown MSR)`: the stub's own `rdmsr` #GPs and is rewound to the call site",
    ),
];

/// A target on a ratio's median.
#[derive(Clone, Copy, Debug)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtMost(limit) => value <= limit,
            Target::AtLeast(limit) => value >= limit,
        }
    }

    fn text(self) -> String {
        match self {
            Target::AtMost(limit) => format!("≤ {limit:.2}"),
            Target::AtLeast(limit) => format!("≥ {limit:.1}"),
        }
    }
}

/// Which runs a ratio is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applies {
    Always,
    /// Runs without FSGSBASE (not requested, or the model lacks it).
    WithoutFsgsbase,
    /// Runs with the library's FSGSBASE in use.
    WithFsgsbase,
}

/// One ratio between two paths of the same group.
struct RatioDef {
    num: &'static str,
    den: &'static str,
    what: &'static str,
    target: Option<Target>,
    applies: Applies,
    /// Both paths minus the measuring loop's own cost (`loop/empty`, same run): for
    /// paths of a few instructions, where the loop's indirect call would dominate.
    net_of_loop: bool,
}

/// The shim's FS_BASE write against the bare hypercall.
const SHIM_VS_BARE: usize = 0;
/// A trapping PMU read against the cached one.
const PMU_TRAP_VS_CACHED: usize = 5;
/// The bare hypercall against the trapped write (the reference's anchor).
const BARE_VS_TRAP: usize = 3;
/// A policy failure through the rewind path against a native fault fixed up.
const FAIL_REWIND_VS_NATIVE: usize = 7;

const RATIOS: [RatioDef; 14] = [
    RatioDef {
        num: "fs/shim",
        den: "fs/bare_hypercall",
        what: "generic FS_BASE write ÷ bare hypercall",
        target: Some(Target::AtMost(1.05)),
        applies: Applies::WithoutFsgsbase,
        net_of_loop: false,
    },
    RatioDef {
        num: "fs/shim_unchecked",
        den: "fs/bare_hypercall",
        what: "unchecked shim write ÷ bare hypercall",
        target: None,
        applies: Applies::WithoutFsgsbase,
        net_of_loop: false,
    },
    RatioDef {
        num: "fs/shim",
        den: "fs/trapped_wrmsr",
        what: "shim FS_BASE write ÷ trapped `wrmsr`",
        target: None,
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "fs/bare_hypercall",
        den: "fs/trapped_wrmsr",
        what: "bare hypercall ÷ trapped `wrmsr`",
        target: None,
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "read/stub",
        den: "read/trapped_rdmsr",
        what: "pass-through read via the stub ÷ raw trapped `rdmsr`",
        target: Some(Target::AtMost(1.02)),
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "pmu/trapped_rdmsr",
        den: "pmu/cached_stub",
        what: "trapping PMU read ÷ cached PMU read (how many times cheaper)",
        target: Some(Target::AtLeast(10.0)),
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "pmu/stub_uncached",
        den: "pmu/trapped_rdmsr",
        what: "uncached PMU read via the stub ÷ raw trapped `rdmsr`",
        target: None,
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "fail/rewind",
        den: "fail/native_gp",
        what: "policy failure via the rewind path ÷ native #GP fixed up",
        target: None,
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "fail/stub_gp_rewind",
        den: "fail/native_gp",
        what: "stub's native #GP rewound ÷ native #GP fixed up",
        target: None,
        applies: Applies::Always,
        net_of_loop: false,
    },
    RatioDef {
        num: "fs/shim_const",
        den: "fs/bare_hypercall",
        what: "constant-index FS_BASE write (patched to the direct segment-base stub) ÷ bare hypercall",
        target: Some(Target::AtMost(1.10)),
        applies: Applies::WithoutFsgsbase,
        net_of_loop: false,
    },
    RatioDef {
        num: "fs/shim_const",
        den: "fs/bare_hypercall",
        what: "FS_BASE write via FSGSBASE (`wrfsbase` inline at the constant-index site) ÷ bare hypercall, net of the measuring loop",
        target: Some(Target::AtMost(0.05)),
        applies: Applies::WithFsgsbase,
        net_of_loop: true,
    },
    RatioDef {
        num: "fsread/shim_const",
        den: "fsread/trapped_rdmsr",
        what: "FS_BASE read via `rdfsbase` (constant-index site) ÷ trapped `rdmsr`",
        target: Some(Target::AtMost(0.05)),
        applies: Applies::WithFsgsbase,
        net_of_loop: false,
    },
    RatioDef {
        num: "fsread/shim",
        den: "fsread/trapped_rdmsr",
        what: "FS_BASE read via the generic site (the read stub's filter → `rdfsbase`) ÷ trapped `rdmsr`",
        target: None,
        applies: Applies::WithFsgsbase,
        net_of_loop: false,
    },
    RatioDef {
        num: "fs/shim",
        den: "fs/bare_hypercall",
        what: "generic FS_BASE write via FSGSBASE (the write stub's `wrfsbase`) ÷ bare hypercall, net of the measuring loop",
        target: None,
        applies: Applies::WithFsgsbase,
        net_of_loop: true,
    },
];

/// The reference's anchors for bare hypercall ÷ trapped `wrmsr FS_BASE`
/// (`xen-pv-hypervisor.md` §4.2: ~690/~4,700 on qemu64, ~19,000-23,000/~37,000-39,000 on
/// Skylake-Client).
const ANCHORS: [(&str, f64); 2] = [("qemu64", 0.15), ("Skylake-Client", 0.55)];

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

/// One `bench <path> batch=...` line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BatchLine {
    batch: u64,
    ops: u64,
    cycles: u64,
    hypercalls: u64,
    set_segment_base: u64,
    gp: u64,
    ud: u64,
}

/// Everything one benchmark boot reported.
#[derive(Debug, Default)]
struct Parsed {
    /// Path name → its batches, paths in the order the kernel printed them.
    paths: Vec<(String, Vec<BatchLine>)>,
    /// `bench-note` lines.
    notes: Vec<String>,
}

impl Parsed {
    fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> XtaskResult<Parsed> {
        let mut p = Parsed::default();
        for line in lines {
            let line = line.trim();
            if let Some(note) = line.strip_prefix("bench-note ") {
                p.notes.push(note.to_string());
                continue;
            }
            let Some(rest) = line.strip_prefix("bench ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let name = words.next().ok_or("a bench line without a path")?;
            let fields: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
            let get = |key: &str| -> XtaskResult<u64> {
                let v = fields
                    .get(key)
                    .ok_or_else(|| format!("bench line without {key}=: {line}"))?;
                v.parse()
                    .map_err(|_| format!("bench line: {key}={v} is not a number: {line}").into())
            };
            let b = BatchLine {
                batch: get("batch")?,
                ops: get("ops")?,
                cycles: get("cycles")?,
                hypercalls: get("hypercalls")?,
                set_segment_base: get("set_segment_base")?,
                gp: get("gp")?,
                ud: get("ud")?,
            };
            if b.ops == 0 {
                return Err(format!("bench line with ops=0: {line}").into());
            }
            match p.paths.iter_mut().find(|(n, _)| n == name) {
                Some((_, batches)) => batches.push(b),
                None => p.paths.push((name.to_string(), vec![b])),
            }
        }
        Ok(p)
    }

    fn path(&self, name: &str) -> Option<&[BatchLine]> {
        self.paths
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }

    fn pmu_not_applicable(&self) -> Option<&str> {
        self.notes
            .iter()
            .find_map(|n| n.strip_prefix("pmu not-applicable: "))
    }
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// Median, quartiles and range of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    p25: f64,
    p75: f64,
    min: f64,
    max: f64,
}

/// The `q` quantile of sorted `v` by linear interpolation between closest ranks.
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(Spread {
        median: quantile(&v, 0.5),
        p25: quantile(&v, 0.25),
        p75: quantile(&v, 0.75),
        min: v[0],
        max: v[v.len() - 1],
    })
}

fn cycles_per_op(b: &BatchLine) -> f64 {
    b.cycles as f64 / b.ops as f64
}

/// One path's results.
#[derive(Debug)]
struct PathStats {
    name: String,
    cycles: Spread,
    hypercalls_per_op: f64,
    set_segment_base_per_op: f64,
    gp_per_op: f64,
    ud_per_op: f64,
}

fn path_stats(name: &str, batches: &[BatchLine]) -> XtaskResult<PathStats> {
    let per_op: Vec<f64> = batches.iter().map(cycles_per_op).collect();
    let ops: u64 = batches.iter().map(|b| b.ops).sum();
    let sum = |f: fn(&BatchLine) -> u64| batches.iter().map(f).sum::<u64>() as f64 / ops as f64;
    Ok(PathStats {
        name: name.to_string(),
        cycles: spread(&per_op).ok_or_else(|| format!("{name}: no batches"))?,
        hypercalls_per_op: sum(|b| b.hypercalls),
        set_segment_base_per_op: sum(|b| b.set_segment_base),
        gp_per_op: sum(|b| b.gp),
        ud_per_op: sum(|b| b.ud),
    })
}

/// Per-batch ratios of two paths (batches matched by index; both ran in each batch).
/// With `loop_cost`, each batch's cost of the measuring loop alone (`loop/empty`, same
/// batch index) is taken off both first.
fn ratio_spread(
    num: &[BatchLine],
    den: &[BatchLine],
    loop_cost: Option<&[BatchLine]>,
) -> XtaskResult<Spread> {
    let by_batch: BTreeMap<u64, &BatchLine> = den.iter().map(|b| (b.batch, b)).collect();
    let loops: BTreeMap<u64, &BatchLine> = loop_cost
        .unwrap_or_default()
        .iter()
        .map(|b| (b.batch, b))
        .collect();
    let mut ratios = Vec::with_capacity(num.len());
    for n in num {
        let d = by_batch
            .get(&n.batch)
            .ok_or_else(|| format!("batch {} of one path has no partner", n.batch))?;
        if d.cycles == 0 {
            return Err(format!("batch {} took 0 cycles", n.batch).into());
        }
        let l = match loop_cost {
            Some(_) => loops
                .get(&n.batch)
                .map(|l| cycles_per_op(l))
                .ok_or_else(|| format!("batch {} has no loop/empty partner", n.batch))?,
            None => 0.0,
        };
        let den = cycles_per_op(d) - l;
        if den <= 0.0 {
            return Err(format!(
                "batch {}: the denominator is within the loop's cost",
                n.batch
            )
            .into());
        }
        ratios.push((cycles_per_op(n) - l).max(0.0) / den);
    }
    if ratios.len() != den.len() {
        return Err("the two paths of a ratio ran different batches".into());
    }
    spread(&ratios).ok_or_else(|| "a ratio without batches".into())
}

/// The results of one model.
struct ModelResult {
    label: String,
    cpu: &'static str,
    command: String,
    kernel_args: String,
    wall: Duration,
    log_path: PathBuf,
    /// Whether Xen enabled XPTI for dom0 (from its boot log).
    xpti: Option<bool>,
    /// The control run with Xen's `xpti=false`.
    no_xpti: bool,
    tsc_mhz: Option<String>,
    xen_version: Option<String>,
    batches_per_path: usize,
    ops_per_batch: u64,
    paths: Vec<PathStats>,
    /// Indexed like [`RATIOS`]; `None` where the paths did not run.
    ratios: Vec<Option<Spread>>,
    /// Shim minus bare hypercall, cycles per operation, per batch.
    shim_delta: Option<Spread>,
    /// Per-batch `read/stub` − `read/trapped_rdmsr` cycles.
    read_delta: Option<Spread>,
    /// The library used FSGSBASE in this run.
    fsgsbase: bool,
    pmu_not_applicable: Option<String>,
    notes: Vec<String>,
}

impl ModelResult {
    fn path(&self, name: &str) -> Option<&PathStats> {
        self.paths.iter().find(|p| p.name == name)
    }

    fn xpti_text(&self) -> &'static str {
        match self.xpti {
            Some(true) => "XPTI on for dom0",
            Some(false) => "XPTI off for dom0",
            None => "XPTI unknown",
        }
    }

    /// Bare hypercall cycles and the shim's extra cycles (medians).
    fn shim_costs(&self) -> Option<(f64, f64)> {
        let bare = self.path("fs/bare_hypercall")?.cycles.median;
        Some((bare, self.shim_delta?.median))
    }
}

fn analyse(model: &Model, report: &RunReport) -> XtaskResult<ModelResult> {
    let parsed = Parsed::parse(report.log.other.iter().map(String::as_str))?;
    if parsed.paths.is_empty() {
        return Err(format!("{}: the kernel printed no bench lines", report.name).into());
    }
    let batches_per_path = parsed.paths[0].1.len();
    let ops_per_batch = parsed.paths[0].1[0].ops;
    for (name, batches) in &parsed.paths {
        if batches.len() != batches_per_path || batches.iter().any(|b| b.ops != ops_per_batch) {
            return Err(format!(
                "{}: path {name} has {} batches (expected {batches_per_path} of {ops_per_batch} ops)",
                report.name,
                batches.len()
            )
            .into());
        }
    }
    let paths = parsed
        .paths
        .iter()
        .map(|(name, batches)| path_stats(name, batches))
        .collect::<XtaskResult<Vec<_>>>()?;
    let fsgsbase = parsed.notes.iter().any(|n| n.contains("fsgsbase=1")) && model.cpu != "qemu64";
    let empty_loop = parsed.path("loop/empty");
    let ratios = RATIOS
        .iter()
        .map(|r| {
            let applies = match r.applies {
                Applies::Always => true,
                Applies::WithoutFsgsbase => !fsgsbase,
                Applies::WithFsgsbase => fsgsbase,
            };
            match (applies, parsed.path(r.num), parsed.path(r.den)) {
                (true, Some(n), Some(d)) => {
                    let loop_cost = if r.net_of_loop { empty_loop } else { None };
                    ratio_spread(n, d, loop_cost)
                        .map(Some)
                        .map_err(|e| format!("{}: {} / {}: {e}", report.name, r.num, r.den))
                }
                _ => Ok(None),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let delta = |num: &str, den: &str| match (parsed.path(num), parsed.path(den)) {
        (Some(s), Some(b)) => {
            let d: Vec<f64> = s
                .iter()
                .zip(b)
                .map(|(s, b)| cycles_per_op(s) - cycles_per_op(b))
                .collect();
            spread(&d)
        }
        _ => None,
    };
    let shim_delta = delta("fs/shim", "fs/bare_hypercall");
    let read_delta = delta("read/stub", "read/trapped_rdmsr");
    if model.vpmu && parsed.path("pmu/cached_stub").is_none() {
        return Err(format!("{}: vpmu=1 but the PMU paths did not run", report.name).into());
    }
    let serial = std::fs::read_to_string(&report.log_path).unwrap_or_default();
    Ok(ModelResult {
        label: model.label(),
        cpu: model.cpu,
        command: report.command.clone(),
        kernel_args: model.kernel_args(),
        wall: report.wall,
        log_path: report.log_path.clone(),
        xpti: find_after(&serial, "XPTI (64-bit PV only): Dom0 ").and_then(|s| {
            if s.starts_with("enabled") {
                Some(true)
            } else if s.starts_with("disabled") {
                Some(false)
            } else {
                None
            }
        }),
        no_xpti: model.no_xpti,
        tsc_mhz: find_after(&serial, "Detected ")
            .and_then(|s| s.split_whitespace().next().map(str::to_string)),
        xen_version: find_after(&serial, "Xen version ")
            .and_then(|s| s.split(" (").next().map(str::to_string)),
        batches_per_path,
        ops_per_batch,
        paths,
        ratios,
        shim_delta,
        read_delta,
        fsgsbase,
        pmu_not_applicable: parsed.pmu_not_applicable().map(str::to_string),
        notes: parsed.notes,
    })
}

/// The rest of the first line of `text` that contains `marker`, after it.
fn find_after(text: &str, marker: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.split_once(marker)
            .map(|(_, rest)| rest.trim().to_string())
    })
}

// ---------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------

/// Builds the kernel, boots it with `suite=bench` on every model, and returns the
/// in-guest section of `docs/benchmarks.md` (Markdown, starting with its heading).
pub fn run() -> XtaskResult<String> {
    let kernel = kernel::build()?;
    let prov = provisioner();
    let qemu_bin = prov.qemu()?;
    let xen = prov.xen_binary(Xen::V4_17)?;
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for model in &MODELS {
        let run = pvkernel_run(
            model.run_name(),
            Xen::V4_17,
            model.cpu,
            1,
            model.xen_args(),
            &model.kernel_args(),
            DEADLINE,
        );
        eprintln!(
            "xtask: bench: {}: Xen + kernel ({}) as dom0 under QEMU -cpu {} (deadline {} s)",
            run.name,
            run.kernel_args,
            run.cpu,
            DEADLINE.as_secs()
        );
        let report = qemu::run_dom0(&prov, &qemu_bin, &xen, &kernel, &run, Echo::Tests)?;
        if !report.passed() {
            report.print_failure();
            failed.push(run.name.clone());
            continue;
        }
        eprintln!(
            "xtask: bench: {} finished in {:.1} s",
            run.name,
            report.wall.as_secs_f64()
        );
        results.push(analyse(model, &report)?);
    }
    if !failed.is_empty() {
        return Err(format!(
            "in-guest benchmark run(s) failed: {} (docs/benchmarks.md not updated)",
            failed.join(", ")
        )
        .into());
    }
    print_table(&results);
    let qemu_version = tool_line(Command::new(&qemu_bin).arg("--version"));
    markdown(&results, &qemu_version, &kernel)
}

fn tool_line(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Ok(out) => format!("unknown ({:?} failed: {})", cmd, out.status),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Replaces the in-guest section of `docs/benchmarks.md` (from its heading to the end of
/// the file, which is how `bench::host_bench` keeps it) with `section`.
pub fn write_section(section: &str) -> XtaskResult<()> {
    let path = root_dir().join("docs").join("benchmarks.md");
    let old = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let head = match old.find(HEADING) {
        Some(at) => &old[..at],
        None => old.as_str(),
    };
    let mut doc = head.trim_end().to_string();
    doc.push_str("\n\n");
    doc.push_str(section.trim_end());
    doc.push('\n');
    let doc = repo_relative(&doc, &root_dir());
    std::fs::write(&path, doc).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!(
        "xtask: bench: wrote the in-guest section of {}",
        path.display()
    );
    Ok(())
}

/// `text` with the build machine's paths taken out, for a document in the repository:
/// paths under the workspace `root` become relative to it, and the tools the harness
/// runs from the system's `bin` directories are named without their directory.
pub fn repo_relative(text: &str, root: &std::path::Path) -> String {
    let mut root = root.display().to_string();
    if !root.ends_with('/') {
        root.push('/');
    }
    let mut out = text.replace(&root, "");
    for dir in ["/usr/local/bin/", "/usr/bin/", "/bin/"] {
        out = out
            .replace(&format!(" {dir}"), " ")
            .replace(&format!("`{dir}"), "`");
    }
    out
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

fn verdict(target: Target, value: f64) -> &'static str {
    if target.met(value) { "yes" } else { "**no**" }
}

fn print_table(results: &[ModelResult]) {
    println!();
    println!("In-guest benchmarks (TSC cycles per op under TCG; median over batches, min-max)");
    for r in results {
        println!();
        println!(
            "{} ({} batches x {} ops, {:.1} s, {})",
            r.label,
            r.batches_per_path,
            r.ops_per_batch,
            r.wall.as_secs_f64(),
            r.xpti_text()
        );
        println!(
            "  {:<22} {:>10} {:>21} {:>8} {:>6} {:>6}",
            "path", "cycles/op", "min-max", "hc/op", "#GP", "#UD"
        );
        for p in &r.paths {
            println!(
                "  {:<22} {:>10.1} {:>21} {:>8.3} {:>6.3} {:>6.3}",
                p.name,
                p.cycles.median,
                format!("{:.1}-{:.1}", p.cycles.min, p.cycles.max),
                p.hypercalls_per_op,
                p.gp_per_op,
                p.ud_per_op
            );
        }
        println!(
            "  {:<42} {:>8} {:>15} {:>9}",
            "ratio", "median", "min-max", "target"
        );
        for (def, s) in RATIOS.iter().zip(&r.ratios) {
            let Some(s) = s else { continue };
            let target = def.target.map_or(String::new(), |t| {
                format!(
                    "{} {}",
                    t.text(),
                    if t.met(s.median) { "met" } else { "MISSED" }
                )
            });
            println!(
                "  {:<42} {:>8.3} {:>15} {}",
                format!("{} / {}", def.num, def.den),
                s.median,
                format!("{:.3}-{:.3}", s.min, s.max),
                target
            );
        }
        if let Some(why) = &r.pmu_not_applicable {
            println!("  PMU benchmark not applicable: {why}");
        }
    }
    println!();
}

fn fmt_spread(s: &Spread, decimals: usize) -> String {
    format!(
        "{:.*} | {:.*}–{:.*} | {:.*}–{:.*}",
        decimals, s.median, decimals, s.p25, decimals, s.p75, decimals, s.min, decimals, s.max
    )
}

fn markdown(results: &[ModelResult], qemu_version: &str, kernel: &Path) -> XtaskResult<String> {
    let mut md = String::new();
    let date = tool_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let first = results.first().ok_or("no in-guest results")?;
    writeln!(md, "{HEADING}\n")?;
    writeln!(
        md,
        "**These numbers come from QEMU's TCG (software emulation), not hardware \
         virtualisation.** Every guest instruction, trap and hypercall is emulated, so \
         absolute cycle counts say little about real hardware. The result is the *ratio* \
         between paths that ran side by side in the same boot.\n"
    )?;
    writeln!(md, "- Measured: {date}, with `cargo xtask bench`.")?;
    writeln!(
        md,
        "- Setup: Xen {} (`{}`) under {qemu_version}, TCG, `-m 512`; the PV test kernel \
         (`{}`, release) booted as dom0 with `suite=bench cpu=<model> vpmu=<0|1>`; Xen \
         `vpmu=1` on EPYC only, `xpti=false` on the control run only. TSC: {} MHz as Xen detected it.",
        first.xen_version.as_deref().unwrap_or("?"),
        crate::cache_dir()
            .join("xen-4.17")
            .strip_prefix(root_dir())
            .map_or_else(|_| "xen-4.17".into(), |p| p.display().to_string()),
        kernel.strip_prefix(root_dir()).unwrap_or(kernel).display(),
        first.tsc_mhz.as_deref().unwrap_or("?"),
    )?;
    writeln!(
        md,
        "- Host: {} (2 cores shared with other work: a batch that the host preempted \
         shows up as an outlier in the min–max range; the median and quartiles are \
         robust to it).\n",
        crate::bench::cpu_model()
    )?;
    writeln!(
        md,
        "Method: the kernel (`tests/pvkernel/src/suites/bench.rs`) measures with \
         `lfence; rdtsc` around a batch of {} operations. Each group of compared paths \
         runs one unreported warm-up batch per path, then {} batches in which every path \
         of the group runs once, the starting path rotating per batch, so drift hits all \
         paths alike. A ratio is computed per batch (both paths ran in the same batch) and \
         reported as its median, quartiles (p25–p75) and min–max over the batches. Around \
         every batch, outside the timed region, the kernel reads the tracing hypercall \
         page's counters (every hypercall the library makes goes through it) and its \
         `#GP`/`#UD` counters: each path declares how many of each one operation takes, \
         and any other count, or an operation with the wrong result, fails the run. The \
         vPMU is registered with a real `XENPMU_init`; TCG cannot raise a PMI, so **the \
         cached state is simulated**: the guest sets `PMU_CACHED` in its own shared page \
         around the cached batches and restores the previous value after each (Xen only \
         reads `pmu_flags` at `XENPMU_flush`, which is never made while it is set); the \
         context in the page (bank offsets written by Xen at `XENPMU_init`, counters \
         zero) is what the cached read returns.\n",
        first.ops_per_batch, first.batches_per_path
    )?;

    write_targets(&mut md, results)?;

    for r in results {
        write_model(&mut md, r)?;
    }
    Ok(md)
}

/// The host section's instruction delta of the stub path over the direct hypercall
/// (`fs_write/stub` row of `docs/benchmarks.md`, written by `bench::host_bench` earlier
/// in the same `cargo xtask bench`), e.g. `+100.0`.
fn host_stub_delta() -> Option<String> {
    let doc = std::fs::read_to_string(root_dir().join("docs").join("benchmarks.md")).ok()?;
    let row = doc.lines().find(|l| l.starts_with("| `fs_write/stub` |"))?;
    let delta: f64 = row.split('|').nth(4)?.trim().parse().ok()?;
    Some(format!("{delta:.0}"))
}

fn write_targets(md: &mut String, results: &[ModelResult]) -> XtaskResult<()> {
    writeln!(md, "### Targets\n")?;
    write!(md, "| target |")?;
    for r in results {
        write!(md, " {} |", r.label)?;
    }
    writeln!(md)?;
    write!(md, "|---|")?;
    for _ in results {
        write!(md, "---|")?;
    }
    writeln!(md)?;
    for (i, def) in RATIOS.iter().enumerate() {
        let Some(target) = def.target else { continue };
        write!(
            md,
            "| `{}` ÷ `{}` {} (median) |",
            def.num,
            def.den,
            target.text()
        )?;
        for r in results {
            match &r.ratios[i] {
                Some(s) => write!(
                    md,
                    " {:.3} ({:.3}–{:.3}): {} |",
                    s.median,
                    s.min,
                    s.max,
                    verdict(target, s.median)
                )?,
                None => write!(md, " not applicable |")?,
            }
        }
        writeln!(md)?;
    }
    write!(
        md,
        "| exactly one hypercall per Xen-routed operation (`fs/shim*`, `fs/bare_hypercall`, \
         `fail/rewind`; with FSGSBASE none but the bare one) |"
    )?;
    for r in results {
        let routed: Vec<&PathStats> = r
            .paths
            .iter()
            .filter(|p| {
                p.name.starts_with("fs/shim")
                    || p.name == "fs/bare_hypercall"
                    || p.name == "fail/rewind"
            })
            .collect();
        let exact = routed.iter().all(|p| {
            let expected = if r.fsgsbase && p.name != "fs/bare_hypercall" {
                0.0
            } else {
                1.0
            };
            p.hypercalls_per_op == expected && p.set_segment_base_per_op == expected
        });
        write!(
            md,
            " {}: {} |",
            if exact { "yes" } else { "**no**" },
            routed
                .iter()
                .map(|p| format!("`{}` {:.3}", p.name, p.hypercalls_per_op))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    writeln!(md, "\n")?;

    // Where a target is missed: by how much, and why (from this run's numbers).
    for r in results {
        if let Some(text) = shim_why(r, results) {
            writeln!(md, "- {text}")?;
        }
    }
    if let Some(text) = read_why(results) {
        writeln!(md, "- {text}")?;
    }
    let constant: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let i = RATIOS.iter().position(|d| d.num == "fs/shim_const")?;
            let Some(Target::AtMost(limit)) = RATIOS[i].target else {
                return None;
            };
            let s = r.ratios[i]?;
            Some(if s.median <= limit {
                format!("{} {:.3} (met)", r.label, s.median)
            } else {
                format!(
                    "{} {:.3} (**missed** by {:.3})",
                    r.label,
                    s.median,
                    s.median - limit
                )
            })
        })
        .collect();
    if !constant.is_empty() {
        writeln!(
            md,
            "- **The constant-index path** (`fs/shim_const` ÷ `fs/bare_hypercall`: {}). A \
             constant-index site (`wrmsr_ns_const_safe::<FS_BASE>(v)`) knows its MSR when it \
             is patched, so on Xen PV `init` points it at a stub that makes the \
             `set_segment_base` hypercall itself: it saves `rax`, `rdi` and `rsi` (what the \
             hypercall entry clobbers), calls the hypercall page entry directly, and has the \
             same error path (CF, rewind, the caller's own entry), with no Rust: 14 \
             instructions of its own, the site's `call` included and the page's entry not \
             (the host section's static count). The generic `wrmsr_safe(msr, v)` (`fs/shim`) \
             takes the write stub's own segment-base path (a range check on `ecx`, the FSGSBASE \
             switch and the same call: 26 instructions of its own), also without Rust. With \
             FSGSBASE both become `wrfsbase` (inline at the constant-index site; 18 \
             instructions of the stub's own, canonical check included, at the generic one), \
             which is why those rows are a few hundredths of the bare hypercall. Under TCG on this 2-core host a median moves by about ±0.05 from run to \
             run (compare the min–max ranges in the targets table).",
            constant.join(", ")
        )?;
    }
    for r in results {
        match (&r.ratios[PMU_TRAP_VS_CACHED], &r.pmu_not_applicable) {
            (Some(s), _) => {
                let limit = match RATIOS[PMU_TRAP_VS_CACHED].target {
                    Some(Target::AtLeast(l)) => l,
                    _ => 10.0,
                };
                writeln!(
                    md,
                    "- {}: a cached PMU read is {:.1}× cheaper than a trapping one (target \
                     ≥ {limit:.0}×: {}), with `PMU_CACHED` simulated as described above.",
                    r.label,
                    s.median,
                    if s.median >= limit {
                        "met"
                    } else {
                        "**missed**"
                    }
                )?;
            }
            (None, Some(why)) if !r.no_xpti => {
                writeln!(md, "- {}: PMU benchmark not applicable: {why}.", r.label)?
            }
            (None, _) => {}
        }
    }
    let fail: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let s = r.ratios[FAIL_REWIND_VS_NATIVE]?;
            let rewind = r.path("fail/rewind")?.cycles.median;
            let native = r.path("fail/native_gp")?.cycles.median;
            Some(format!(
                "{} {:.3} ({rewind:.0} vs {native:.0} cycles)",
                r.label, s.median
            ))
        })
        .collect();
    if !fail.is_empty() {
        writeln!(
            md,
            "- A failure through the rewind path (policy failure: a `set_segment_base` \
             hypercall returning `-EINVAL`, then a `#UD` at the stub's `ud2`, rewound to the \
             call site) against a native fault fixed up (a raw `wrmsr` that Xen decodes and \
             refuses with a `#GP` bounced to the kernel's handler), rewind ÷ native: {}. The \
             rewind path enters Xen three times (the hypercall, the `#UD`, the `iret` \
             hypercall that ends the handler), the native fault twice (the `#GP`, which \
             includes Xen's decoding of the `wrmsr`, and the `iret`). That fits the numbers: \
             where each entry into Xen is dear (XPTI on) the rewind path costs more; where \
             Xen's instruction emulation dominates (XPTI off) it costs less. No target.",
            fail.join("; ")
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The pass-through read through the stub against the bare trapped `rdmsr`, on every
/// model, and where the target is missed, by how much and why.
fn read_why(results: &[ModelResult]) -> Option<String> {
    let i = RATIOS.iter().position(|d| d.num == "read/stub")?;
    let Some(Target::AtMost(limit)) = RATIOS[i].target else {
        return None;
    };
    let mut missed = false;
    let mut within_spread = true;
    let per_model: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let s = r.ratios[i]?;
            let extra = r.read_delta.map_or(f64::NAN, |d| d.median);
            missed |= s.median > limit;
            if s.median > limit {
                within_spread &= s.median - limit < s.p75 - s.p25;
            }
            Some(if s.median > limit {
                format!(
                    "{} {:.3} (**missed by {:.3}**; p25–p75 {:.3}–{:.3}; {extra:+.0} cycles per read)",
                    r.label,
                    s.median,
                    s.median - limit,
                    s.p25,
                    s.p75
                )
            } else {
                format!(
                    "{} {:.3} (met; {extra:+.0} cycles per read)",
                    r.label, s.median
                )
            })
        })
        .collect();
    if per_model.is_empty() {
        return None;
    }
    let mut text = format!(
        "**The pass-through read** (`read/stub` ÷ `read/trapped_rdmsr`, target ≤ {limit:.2}): {}. \
         The stub's path for it is 10 instructions of its own, with no Rust (the host \
         section's static count: the site's `call`, the read filter's hash and compare, \
         `ret`), against a trap that costs thousands of cycles under TCG.",
        per_model.join("; ")
    );
    if missed {
        text.push_str(if within_spread {
            " Where the median lands above the target it does so by less than the spread of \
             the middle half of its batches, so another run may land on either side."
        } else {
            " At least one model misses by more than the spread of the middle half of its \
             batches."
        });
        text.push_str(
            " The extra cycles are more than ten instructions cost even under TCG: the `ret` is an indirect branch, which TCG resolves with a \
             lookup instead of a chained jump, and the stub's code and the filter's data are \
             two pages the bare `rdmsr` does not touch, which the emulated TLB must refill \
             whenever Xen's entry has flushed it (every entry with XPTI, which is why the \
             XPTI model shows the largest difference in cycles). On hardware, ten \
             instructions are well under 1% of a trapped `rdmsr`. What would close it under \
             TCG: no call at all, which is what a constant-index site gets (`rdmsr_const`: \
             the instruction inline, `fsread/shim_const` above), or placing the filter on \
             the stub's own page.",
        );
    }
    Some(text)
}

/// Why the shim meets or misses its target on `r`, from the numbers of this run (the
/// XPTI control run, if present, separates XPTI from the CPU model).
fn shim_why(r: &ModelResult, results: &[ModelResult]) -> Option<String> {
    let s = r.ratios[SHIM_VS_BARE]?;
    let Some(Target::AtMost(limit)) = RATIOS[SHIM_VS_BARE].target else {
        return None;
    };
    let (bare, delta) = r.shim_costs()?;
    let host = host_stub_delta().map_or(String::new(), |d| {
        format!(
            " ({d} instructions more than the direct call in the host section's callgrind count)"
        )
    });
    // The same model with and without XPTI, if both ran.
    let on = results
        .iter()
        .find(|o| o.cpu == r.cpu && !o.no_xpti && o.xpti == Some(true));
    let off = results.iter().find(|o| o.cpu == r.cpu && o.no_xpti);
    let control = match (
        on.and_then(ModelResult::shim_costs),
        off.and_then(ModelResult::shim_costs),
    ) {
        (Some((b_on, d_on)), Some((b_off, d_off))) => format!(
            " The {} control run (Xen `xpti=false`, same build, same boot otherwise) separates \
             XPTI from the CPU model: the bare hypercall goes from {b_on:.0} cycles with XPTI \
             to {b_off:.0} without, and the shim's extra cost from {d_on:.0} to {d_off:.0} \
             cycles, so the ratio goes from {:.3} to {:.3}.",
            r.cpu,
            on.and_then(|o| o.ratios[SHIM_VS_BARE])
                .map_or(f64::NAN, |x| x.median),
            off.and_then(|o| o.ratios[SHIM_VS_BARE])
                .map_or(f64::NAN, |x| x.median),
        ),
        _ => String::new(),
    };
    // The comparison belongs to the XPTI-on run; the control run only points to it.
    let control = if r.no_xpti {
        format!(" This is the control for {} above.", r.cpu)
    } else {
        control
    };
    let fixed = format!(
        "The shim adds {delta:.0} cycles per write (median of the per-batch differences) to \
         a bare hypercall of {bare:.0} cycles. Those cycles are the site's `call` and the \
         write stub's segment-base path (a range check on `ecx`, three saves, the \
         `set_segment_base` call straight through the page entry; no Rust){host}: fixed \
         work, whatever the hypercall costs. A difference below zero, or smaller than the \
         spread of the batches, is noise: the bare path is a Rust call of the same entry \
         with its own argument set-up and error decoding, about as long as the stub's."
    );
    Some(if s.median > limit {
        let why = if r.xpti == Some(false) {
            format!(
                " With {} a `set_segment_base` round trip under TCG costs only {bare:.0} \
                 cycles (no page-table switch on entry to Xen), so the fixed work is a large \
                 share.",
                r.xpti_text()
            )
        } else {
            String::new()
        };
        format!(
            "**{}: shim ÷ bare hypercall = {:.3}, missing the ≤ {limit:.2} target by {:.3} \
             ({:.0}% over).** {fixed}{why} At this extra cost the target needs a hypercall of \
             at least {:.0} cycles; at this hypercall cost it allows at most {:.0} cycles of \
             extra work.{control}",
            r.label,
            s.median,
            s.median - limit,
            (s.median / limit - 1.0) * 100.0,
            delta / (limit - 1.0),
            bare * (limit - 1.0),
        )
    } else {
        let why = if r.xpti == Some(true) {
            " With XPTI on for dom0, every entry to Xen switches page tables and flushes the \
             TLB, which TCG emulates expensively: that makes the hypercall itself dear, so the \
             fixed work is a small share. It most likely also makes the shim's own work \
             dearer than on the models without XPTI: after each return from Xen, the pages \
             the stub and the policy touch must be refilled into the emulated TLB."
                .to_string()
        } else {
            String::new()
        };
        let margin = limit - s.median;
        let narrow = if margin < s.p75 - s.p25 {
            format!(
                ", but narrowly: the margin, {margin:.3}, is smaller than the spread of the \
                 middle half of the batches ({:.3}–{:.3}), so another run may land on \
                 either side",
                s.p25, s.p75
            )
        } else {
            String::new()
        };
        format!(
            "{}: shim ÷ bare hypercall = {:.3} (target ≤ {limit:.2} met{narrow}). \
             {fixed}{why}{control}",
            r.label, s.median
        )
    })
}

fn write_model(md: &mut String, r: &ModelResult) -> XtaskResult<()> {
    writeln!(md, "### {}\n", r.label)?;
    writeln!(
        md,
        "Kernel command line `{}`; {}; {} batches × {} operations per path; QEMU run \
         {:.1} s wall. Serial log: `{}`. Reproduce the boot with: `{}`.\n",
        r.kernel_args,
        r.xpti_text(),
        r.batches_per_path,
        r.ops_per_batch,
        r.wall.as_secs_f64(),
        r.log_path
            .strip_prefix(root_dir())
            .unwrap_or(&r.log_path)
            .display(),
        r.command
    )?;
    writeln!(
        md,
        "| path | what | cycles/op median | p25–p75 | min–max | hypercalls/op | #GP/op | #UD/op |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|")?;
    for p in &r.paths {
        let what = PATHS
            .iter()
            .find(|(n, _)| *n == p.name)
            .map_or("", |(_, w)| w);
        writeln!(
            md,
            "| `{}` | {what} | {} | {:.3} | {:.3} | {:.3} |",
            p.name,
            fmt_spread(&p.cycles, 1),
            p.hypercalls_per_op,
            p.gp_per_op,
            p.ud_per_op
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "| ratio (per batch) | what | median | p25–p75 | min–max | target | met? |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---|---|")?;
    for (def, s) in RATIOS.iter().zip(&r.ratios) {
        let Some(s) = s else { continue };
        let (target, met) = def
            .target
            .map_or((String::new(), ""), |t| (t.text(), verdict(t, s.median)));
        writeln!(
            md,
            "| `{}` ÷ `{}` | {} | {} | {target} | {met} |",
            def.num,
            def.den,
            def.what,
            fmt_spread(s, 3)
        )?;
    }
    writeln!(md)?;
    if let Some((_, anchor)) = ANCHORS.iter().find(|(cpu, _)| *cpu == r.cpu)
        && let Some(s) = &r.ratios[BARE_VS_TRAP]
    {
        writeln!(
            md,
            "Reference anchor (`xen-pv-hypervisor.md` §4.2, an earlier kernel on this kind of \
             machine): bare hypercall ÷ trapped `wrmsr FS_BASE` ≈ {anchor:.2}; measured \
             here: {:.3}.\n",
            s.median
        )?;
    }
    if let Some(why) = &r.pmu_not_applicable {
        writeln!(
            md,
            "PMU benchmark: **not applicable** on this model ({why}).\n"
        )?;
    }
    let other: Vec<&String> = r
        .notes
        .iter()
        .filter(|n| !n.starts_with("pmu not-applicable") && !n.starts_with("batches="))
        .collect();
    for n in other {
        writeln!(md, "Kernel note: `{n}`\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "bench-note batches=2 ops_per_batch=10 unit=tsc_cycles cpu=qemu64 vpmu=off\n\
        bench fs/shim batch=0 ops=10 cycles=1100 cycles_per_op=110.0 hypercalls=10 set_segment_base=10 gp=0 ud=0\n\
        bench fs/shim batch=1 ops=10 cycles=1300 cycles_per_op=130.0 hypercalls=10 set_segment_base=10 gp=0 ud=0\n\
        bench fs/bare_hypercall batch=0 ops=10 cycles=1000 cycles_per_op=100.0 hypercalls=10 set_segment_base=10 gp=0 ud=0\n\
        bench fs/bare_hypercall batch=1 ops=10 cycles=1000 cycles_per_op=100.0 hypercalls=10 set_segment_base=10 gp=0 ud=0\n\
        bench-summary fs/shim cycles_per_op median=130.0 min=110.0 max=130.0 hypercalls_per_op=1.000\n\
        bench-note pmu not-applicable: XENPMU_init failed (x)\n";

    #[test]
    fn parses_batches_and_notes() {
        let p = Parsed::parse(LOG.lines()).expect("parses");
        assert_eq!(p.paths.len(), 2);
        let shim = p.path("fs/shim").expect("shim");
        assert_eq!(shim.len(), 2);
        assert_eq!(shim[1].cycles, 1300);
        assert_eq!(p.pmu_not_applicable(), Some("XENPMU_init failed (x)"));
    }

    #[test]
    fn ratios_are_per_batch() {
        let p = Parsed::parse(LOG.lines()).expect("parses");
        let s = ratio_spread(
            p.path("fs/shim").expect("shim"),
            p.path("fs/bare_hypercall").expect("bare"),
            None,
        )
        .expect("ratio");
        assert!((s.min - 1.1).abs() < 1e-9);
        assert!((s.max - 1.3).abs() < 1e-9);
        assert!((s.median - 1.2).abs() < 1e-9);
    }

    #[test]
    fn net_of_loop_ratios_take_the_loop_off_both_sides() {
        let log = "bench fs/shim batch=0 ops=10 cycles=300 cycles_per_op=30.0 hypercalls=0 set_segment_base=0 gp=0 ud=0\n\
            bench fs/bare_hypercall batch=0 ops=10 cycles=2100 cycles_per_op=210.0 hypercalls=10 set_segment_base=10 gp=0 ud=0\n\
            bench loop/empty batch=0 ops=10 cycles=100 cycles_per_op=10.0 hypercalls=0 set_segment_base=0 gp=0 ud=0\n";
        let p = Parsed::parse(log.lines()).expect("parses");
        let s = ratio_spread(
            p.path("fs/shim").expect("shim"),
            p.path("fs/bare_hypercall").expect("bare"),
            p.path("loop/empty"),
        )
        .expect("ratio");
        // (30 - 10) / (210 - 10)
        assert!((s.median - 0.1).abs() < 1e-9, "{}", s.median);
        // A loop/empty run that lacks the batch is an error, not a silent 0.
        let missing = ratio_spread(
            p.path("fs/shim").expect("shim"),
            p.path("fs/bare_hypercall").expect("bare"),
            Some(&[]),
        );
        assert!(missing.is_err());
    }

    #[test]
    fn generated_docs_name_no_machine_paths() {
        let root = std::path::Path::new("/work/main");
        let text = "Reproduce: `/usr/bin/qemu-system-x86_64 -kernel /work/main/target/xen-4.17 \
                    -initrd '/work/main/target/k suite=bench'`; log `/work/main/target/l.log`.";
        let out = repo_relative(text, root);
        assert_eq!(
            out,
            "Reproduce: `qemu-system-x86_64 -kernel target/xen-4.17 -initrd 'target/k \
             suite=bench'`; log `target/l.log`."
        );
        assert!(!out.contains("/work/main") && !out.contains("/usr/bin"));
    }

    #[test]
    fn spread_of_odd_sample() {
        let s = spread(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("non-empty");
        assert_eq!(
            (s.median, s.min, s.max, s.p25, s.p75),
            (3.0, 1.0, 5.0, 2.0, 4.0)
        );
    }

    #[test]
    fn bad_line_is_an_error() {
        assert!(Parsed::parse(["bench x batch=0 ops=10"]).is_err());
    }
}
