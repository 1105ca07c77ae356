//! `cargo xtask bench`, host side: instruction counts under callgrind, and code sizes read
//! from the built benchmark binary.
//!
//! [`host_bench`] builds `xenmsr-bench` (release, default `target/`), runs every scenario
//! under `valgrind --tool=callgrind --toggle-collect=xenmsr_bench_region` at three
//! operation counts, derives instructions per operation, reads symbol sizes with
//! `nm -S`, writes `docs/benchmarks.md` and returns the host section as Markdown.
//!
//! # Deriving instructions per operation
//!
//! A scenario does all its setup outside the measured region, then runs its operation
//! `n` times inside it (in batches; the region is entered once per batch). Callgrind counts
//! only the region, so a run costs `C(n) = fixed + n * op`, where `fixed` holds the entries
//! into the region. With `n1 < n2 < n3` equally spaced, `op = (C(n3) - C(n1)) / (n3 - n1)`
//! removes `fixed`, and `C(n2) - C(n1) == C(n3) - C(n2)` checks that the cost really is
//! linear (the run fails otherwise). The `loop` scenario (an empty operation) gives the
//! loop's own instructions per iteration, which are subtracted from every other count.
//! Callgrind counts are deterministic, so one run per point is enough.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::output_timeout;
use crate::{XtaskResult, cargo, root_dir, run_checked};

/// The benchmark binary's package and binary name.
const PACKAGE: &str = "xenmsr-bench";
/// The function callgrind collects in.
const REGION: &str = "xenmsr_bench_region";
/// The operation counts each scenario runs at (equally spaced; multiples of the
/// binary's batch size, so every batch is full).
const COUNTS: [u64; 3] = [4096, 8192, 12288];
/// The deadline of one callgrind run.
const RUN_DEADLINE: Duration = Duration::from_secs(300);
/// The largest difference, in instructions per operation, between the two halves of the
/// three-point measurement that still counts as linear.
const LINEARITY_TOLERANCE: f64 = 0.05;
/// The heading of the in-guest section of `docs/benchmarks.md`, which another part of
/// `cargo xtask bench` fills; [`host_bench`] keeps whatever is under it.
const IN_GUEST_HEADING: &str = "## In-guest (TCG)";

/// One scenario's measurement.
#[derive(Clone, Debug)]
struct Measured {
    about: String,
    /// Instructions per operation, loop included.
    raw: f64,
    /// The largest deviation from linearity seen (instructions per operation).
    nonlinearity: f64,
}

/// Every scenario's instructions per operation, with the loop subtracted.
struct Counts {
    by_name: BTreeMap<String, Measured>,
    loop_per_op: f64,
}

impl Counts {
    fn get(&self, name: &str) -> XtaskResult<&Measured> {
        self.by_name
            .get(name)
            .ok_or_else(|| format!("the bench binary has no scenario {name:?}").into())
    }

    /// Instructions per operation of `name`, the measuring loop subtracted.
    fn net(&self, name: &str) -> XtaskResult<f64> {
        Ok(self.get(name)?.raw - self.loop_per_op)
    }
}

/// Builds and runs the host benchmarks, writes `docs/benchmarks.md`, and returns the host
/// section (Markdown).
pub fn host_bench() -> XtaskResult<String> {
    eprintln!("xtask: bench: building {PACKAGE} (release)");
    run_checked(cargo().args(["build", "--release", "-p", PACKAGE]))?;
    let bin = root_dir().join("target").join("release").join(PACKAGE);
    let work = root_dir().join("target").join("xenmsr-bench");
    std::fs::create_dir_all(&work)?;
    crate::provisioner().apt_install(&["valgrind"], Path::new("/usr/bin/valgrind"))?;
    let valgrind = tool_version(Command::new("valgrind").arg("--version"))
        .map_err(|e| format!("valgrind is needed for the host benchmarks: {e}"))?;

    let counts = measure_all(&bin, &work)?;
    let mut md = String::new();
    writeln!(md, "## Host (callgrind instruction counts)\n")?;
    write_environment(&mut md, &valgrind)?;
    write_method(&mut md, &counts)?;
    write_overhead_tables(&mut md, &counts)?;
    write_fast_paths(&mut md, &counts, &bin)?;
    write_dispatch_table(&mut md, &counts)?;
    write_extable_table(&mut md, &counts)?;
    write_code_size(&mut md, &bin)?;
    write_scaling_table(&mut md, &bin)?;
    write_doc(&md)?;
    Ok(md)
}

/// `cargo xtask bench --scaling`: builds the benchmark binary and measures only the
/// two-threads-against-one table (a few seconds), returned as Markdown; nothing is written.
pub fn scaling_bench() -> XtaskResult<String> {
    eprintln!("xtask: bench: building {PACKAGE} (release)");
    run_checked(cargo().args(["build", "--release", "-p", PACKAGE]))?;
    let bin = root_dir().join("target").join("release").join(PACKAGE);
    let mut md = String::new();
    write_scaling_table(&mut md, &bin)?;
    Ok(md)
}

// ---------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------

fn measure_all(bin: &Path, work: &Path) -> XtaskResult<Counts> {
    let list = String::from_utf8(output_timeout(
        Command::new(bin).arg("list"),
        Duration::from_secs(30),
    )?)?;
    let scenarios: Vec<(String, String)> = list
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(name, about)| (name.to_string(), about.to_string()))
        .collect();
    if scenarios.is_empty() {
        return Err(format!("{} list: no scenarios", bin.display()).into());
    }
    let mut by_name = BTreeMap::new();
    for (i, (name, about)) in scenarios.iter().enumerate() {
        eprintln!("xtask: bench: [{}/{}] {name}", i + 1, scenarios.len());
        let mut totals = [0u64; 3];
        for (total, n) in totals.iter_mut().zip(COUNTS) {
            *total = callgrind_total(bin, work, name, n)?;
        }
        let (raw, nonlinearity) = per_op(totals)?;
        if nonlinearity > LINEARITY_TOLERANCE {
            return Err(format!(
                "{name}: the instruction count is not linear in the operation count \
                 (totals {totals:?} at {COUNTS:?}): the scenario's per-operation cost varies"
            )
            .into());
        }
        by_name.insert(
            name.clone(),
            Measured {
                about: about.clone(),
                raw,
                nonlinearity,
            },
        );
    }
    let loop_per_op = by_name
        .get("loop")
        .ok_or("the bench binary has no `loop` scenario")?
        .raw;
    Ok(Counts {
        by_name,
        loop_per_op,
    })
}

/// Instructions per operation from the totals at [`COUNTS`], and the deviation from
/// linearity (instructions per operation).
fn per_op(totals: [u64; 3]) -> XtaskResult<(f64, f64)> {
    let [c1, c2, c3] = totals.map(|c| c as f64);
    let [n1, n2, n3] = COUNTS.map(|n| n as f64);
    if !(c1 <= c2 && c2 <= c3) {
        return Err(format!("callgrind totals {totals:?} do not grow with {COUNTS:?}").into());
    }
    let first = (c2 - c1) / (n2 - n1);
    let second = (c3 - c2) / (n3 - n2);
    Ok(((c3 - c1) / (n3 - n1), (first - second).abs()))
}

/// Runs `bin run name n` under callgrind, collecting only in [`REGION`], and returns the
/// instruction total.
fn callgrind_total(bin: &Path, work: &Path, name: &str, n: u64) -> XtaskResult<u64> {
    let stem = format!("{}.{n}", name.replace(['/', ' '], "_"));
    let out = work.join(format!("{stem}.callgrind"));
    let log = work.join(format!("{stem}.log"));
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--toggle-collect={REGION}"))
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(format!("--log-file={}", log.display()))
        .arg(bin)
        .args(["run", name, &n.to_string()]);
    if let Err(e) = output_timeout(&mut cmd, RUN_DEADLINE) {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(format!("{e}\n{log}").into());
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("summary:"))
        .or_else(|| text.lines().find_map(|line| line.strip_prefix("totals:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .ok_or_else(|| format!("{}: no `summary:` line", out.display()).into())
}

// ---------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------

fn tool_version(cmd: &mut Command) -> XtaskResult<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", out.status).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// The host CPU's model name, for the benchmark reports.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn write_environment(md: &mut String, valgrind: &str) -> XtaskResult<()> {
    let date = tool_version(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_else(|_| "unknown".to_string());
    let rustc = tool_version(Command::new("rustc").arg("-V")).unwrap_or_else(|e| e.to_string());
    let nm = tool_version(Command::new("nm").arg("--version")).unwrap_or_else(|e| e.to_string());
    let kernel =
        tool_version(Command::new("uname").args(["-srm"])).unwrap_or_else(|e| e.to_string());
    writeln!(md, "- Measured: {date}, with `cargo xtask bench`.")?;
    writeln!(md, "- Machine: {} ({kernel}).", cpu_model())?;
    writeln!(
        md,
        "- Tools: {valgrind} (`--tool=callgrind`), {rustc}, {nm}."
    )?;
    writeln!(
        md,
        "- Build: `cargo build --release -p {PACKAGE}` (workspace release profile).\n"
    )?;
    Ok(())
}

fn write_method(md: &mut String, counts: &Counts) -> XtaskResult<()> {
    let worst = counts
        .by_name
        .values()
        .map(|m| m.nonlinearity)
        .fold(0.0, f64::max);
    writeln!(
        md,
        "Each scenario runs its operation n times inside `{REGION}` (setup and a checked \
         warm-up call happen outside it); callgrind counts only that region \
         (`--toggle-collect={REGION}`). Every scenario runs at n = {}, {} and {}; \
         instructions per operation = (C(n3) − C(n1)) / (n3 − n1), which removes the \
         fixed cost of entering the region. The two halves agree to within {worst:.3} \
         instructions per operation for every scenario (the run fails above \
         {LINEARITY_TOLERANCE}). The measuring loop alone costs {:.2} instructions per \
         iteration (scenario `loop`); it is subtracted from every count below. Inputs, \
         including the MSR index, go through `black_box`, so no routing is folded at \
         compile time. The mock hypercall page's own cost (trampoline, XSAVE, call log) is \
         part of every mock-page count and cancels in the deltas.\n",
        COUNTS[0], COUNTS[1], COUNTS[2], counts.loop_per_op
    )?;
    Ok(())
}

/// A comparison against a baseline scenario.
struct Row {
    scenario: String,
    /// `Some(limit)`: the delta against the baseline must be at most `limit`.
    delta_target: Option<f64>,
}

fn table_header(md: &mut String) -> XtaskResult<()> {
    writeln!(
        md,
        "| scenario | what | instructions/op | Δ vs baseline | ratio | target | met? |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---|---|")?;
    Ok(())
}

fn comparison_table(
    md: &mut String,
    counts: &Counts,
    title: &str,
    baseline: &str,
    rows: &[Row],
) -> XtaskResult<()> {
    writeln!(md, "### {title}\n")?;
    table_header(md)?;
    let base = counts.net(baseline)?;
    writeln!(
        md,
        "| `{baseline}` | {} | {base:.1} | baseline | 1.00 | | |",
        counts.get(baseline)?.about
    )?;
    for row in rows {
        let net = counts.net(&row.scenario)?;
        let delta = net - base;
        let (target, met) = match row.delta_target {
            Some(limit) => (format!("Δ ≤ {limit:.0}"), verdict(delta <= limit)),
            None => (String::new(), String::new()),
        };
        writeln!(
            md,
            "| `{}` | {} | {net:.1} | {delta:+.1} | {:.2} | {target} | {met} |",
            row.scenario,
            counts.get(&row.scenario)?.about,
            net / base
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn verdict(met: bool) -> String {
    if met { "yes" } else { "**no**" }.to_string()
}

fn write_overhead_tables(md: &mut String, counts: &Counts) -> XtaskResult<()> {
    let row = |scenario: &str| Row {
        scenario: scenario.to_string(),
        delta_target: None,
    };
    comparison_table(
        md,
        counts,
        "Library overhead: FS_BASE write to the mock hypercall page",
        "hc/direct",
        &[
            row("fs_write/policy"),
            row("fs_write/stub_via_policy"),
            row("fs_write/stub"),
            row("fs_write/stub_unchecked"),
            row("fs_write/const_stub"),
            row("fs_write/pvops"),
        ],
    )?;
    comparison_table(
        md,
        counts,
        "Library overhead: APIC base read answered by the policy (fake native reader)",
        "apic_read/work",
        &[
            row("apic_read/policy"),
            row("apic_read/stub"),
            row("apic_read/pvops"),
        ],
    )?;
    comparison_table(
        md,
        counts,
        "PMU counter read from the cached context (vPMU)",
        "pmu_cached_read/work",
        &[row("pmu_cached_read/policy"), row("pmu_cached_read/stub")],
    )?;
    for (op, title) in [("write", "WRMSR"), ("read", "RDMSR")] {
        let name = |what: &str| format!("trivial_{op}/{what}");
        comparison_table(
            md,
            counts,
            &format!("The stub alone ({title}): trivial backend, direct call vs stub"),
            &name("direct"),
            &[
                row(&name("handler")),
                row(&name("stub")),
                row(&name("stub_unchecked")),
                row(&name("pvops")),
            ],
        )?;
        let stub_only = counts.net(&name("stub"))? - counts.net(&name("handler"))?;
        let saves = if op == "write" { 9 } else { 7 };
        writeln!(
            md,
            "The policy path's own instructions over a direct call of the same C-ABI \
             handler (`trivial_{op}/stub` − `trivial_{op}/handler`: the site's `call`, the \
             stub's saves and restores and its status check): **{stub_only:.1}** (target \
             ≤ 20: {}). This is the path of an access the Rust policy must answer; the \
             common accesses that need no Rust (pass-through reads, segment-base writes) \
             take the fast paths below.\n",
            verdict(stub_only <= 20.0)
        )?;
        if stub_only > 20.0 {
            writeln!(
                md,
                "Missed by {:.1}. The stub must preserve every register the native \
                 instruction leaves alone, and the C ABI lets the handler clobber {saves} of \
                 them: {} of the instructions are pushes and pops that no change in the \
                 stub can avoid while the handler is an `extern \"C\"` Rust function. \
                 (The dynamic stack alignment is already gone: the sites guarantee an \
                 aligned stack, and a host test checks every emitted site.) What would \
                 close it: a calling convention that makes the handler preserve the \
                 scratch registers (LLVM's `preserve_most`, not available in stable Rust), \
                 or declaring those registers clobbered at the sites, which gives up the \
                 native register contract the design is built on.\n",
                stub_only - 20.0,
                2 * saves
            )?;
        }
    }
    Ok(())
}

/// One fast path of a stub, walked statically (see [`crate::stubpaths`]).
struct FastPath {
    stub: &'static str,
    /// Code outside the stub's symbol that the path jumps into.
    also: &'static [&'static str],
    /// Conditional branches in the order the path meets them: taken or not.
    taken: &'static [bool],
    what: &'static str,
    /// The target for the stub's own instructions, where the issue sets one.
    target: Option<usize>,
}

const FAST_PATHS: &[FastPath] = &[
    FastPath {
        also: &[],
        stub: "xenmsr_stub_rdmsr",
        taken: &[false, false],
        what: "pass-through read (filter miss): the stub executes RDMSR itself, no Rust",
        target: Some(20),
    },
    FastPath {
        also: &[],
        stub: "xenmsr_stub_rdmsr",
        taken: &[false, true, false, false],
        what: "FS_BASE read with FSGSBASE on (filter hit, kind RDFSBASE), no Rust",
        target: Some(20),
    },
    FastPath {
        also: &[],
        stub: "xenmsr_stub_rdmsr",
        taken: &[false, true, true, false],
        what: "read the filter sends to the policy (APIC base, vPMU MSRs): stub around the handler call, answered",
        target: None,
    },
    FastPath {
        also: &[],
        stub: "xenmsr_stub_rdmsr",
        taken: &[true, false],
        what: "read while the filter diverts (a backend without a filter): stub around the handler call, answered",
        target: None,
    },
    FastPath {
        also: &[],
        stub: "xenmsr_stub_wrmsr",
        taken: &[false, false, false, false, false],
        what: "FS_BASE write with FSGSBASE on: canonical check and WRFSBASE, no Rust",
        target: Some(20),
    },
    FastPath {
        also: &[],
        stub: "xenmsr_stub_wrmsr",
        taken: &[false, false, true, false, false],
        what: "FS_BASE write, FSGSBASE off: the set_segment_base call through the page entry, no Rust (the page's own instructions not counted)",
        target: None,
    },
    FastPath {
        also: &[],
        stub: "xenmsr_stub_wrmsr",
        taken: &[true, false],
        what: "write the policy answers (any MSR outside 0xc0000100-102): stub around the handler call",
        target: None,
    },
    FastPath {
        also: &["xenmsr_stub_segbase_common"],
        stub: "xenmsr_stub_segbase_fs",
        taken: &[false],
        what: "constant-index FS_BASE write site on Xen PV, FSGSBASE off: the set_segment_base call (the page's own instructions not counted)",
        target: None,
    },
];

fn write_fast_paths(md: &mut String, counts: &Counts, bin: &Path) -> XtaskResult<()> {
    writeln!(md, "### The stubs' paths, counted in the binary\n")?;
    writeln!(
        md,
        "Some paths cannot run on the host (a pass-through read ends in a real `rdmsr`, the \
         FSGSBASE paths need CR4.FSGSBASE), so each path is counted in the built binary's \
         code: from the stub's symbol, following each conditional branch the way the path \
         takes it, stepping over calls, up to `ret` (`objdump -d`; the walk fails if the \
         code no longer has the branches the path expects). Own instructions = the site's \
         `call` + the stub's instructions on the path − the instruction the native site \
         would execute anyway (`rdmsr`, `wrfsbase`...). Callees (the Rust handler, the \
         hypercall page) are not counted; their cost is in the callgrind tables.\n"
    )?;
    writeln!(
        md,
        "| stub | path | instructions on the path | own instructions | target | met? |"
    )?;
    writeln!(md, "|---|---|---|---:|---|---|")?;
    let mut functions = BTreeMap::new();
    for path in FAST_PATHS {
        if !functions.contains_key(path.stub) {
            let mut code = crate::stubpaths::disassemble(bin, path.stub)?;
            for other in path.also {
                code.insns
                    .extend(crate::stubpaths::disassemble(bin, other)?.insns);
            }
            functions.insert(path.stub, code);
        }
        let walk = crate::stubpaths::walk(&functions[path.stub], path.taken)
            .map_err(|e| format!("{} ({}): {e}", path.stub, path.what))?;
        let (target, met) = match path.target {
            Some(t) => (format!("≤ {t}"), verdict(walk.own() <= t)),
            None => (String::new(), String::new()),
        };
        writeln!(
            md,
            "| `{}` | {} | {} | {} | {target} | {met} |",
            path.stub,
            path.what,
            walk.mnemonics.join(" "),
            walk.own()
        )?;
    }
    let generic = counts.net("fs_write/stub")? - counts.net("hc/direct")?;
    let constant = counts.net("fs_write/const_stub")? - counts.net("hc/direct")?;
    let via_policy = counts.net("fs_write/stub_via_policy")? - counts.net("hc/direct")?;
    writeln!(
        md,
        "\nMeasured against the mock page (callgrind, table above), over a direct \
         `HypercallPage::set_segment_base` from Rust: the run-time-index FS_BASE write costs \
         {generic:+.1} instructions through the write stub's segment-base path, the \
         constant-index site {constant:+.1}, and the same write through the Rust policy (the \
         path before `init` stores the page entry) {via_policy:+.1}.\n"
    )?;
    Ok(())
}

fn write_dispatch_table(md: &mut String, counts: &Counts) -> XtaskResult<()> {
    // (class, the routing decision alone, decide_* scenario, the class's own work)
    let classes: [(&str, &str, &str, &str); 5] = [
        (
            "segment base (FS_BASE write)",
            "classify/fs_base",
            "fs_write/policy",
            "fs_write/work",
        ),
        (
            "ignored (LSTAR write)",
            "classify/lstar",
            "lstar_write/policy",
            "lstar_write/work",
        ),
        (
            "APIC base read",
            "classify/apic_base",
            "apic_read/policy",
            "apic_read/work",
        ),
        (
            "PMU MSR read (vPMU, cached)",
            "classify/pmc0",
            "pmu_cached_read/policy",
            "pmu_cached_read/work",
        ),
        (
            "pass-through (0x10 read → Native)",
            "classify/tsc",
            "tsc_read/policy",
            "tsc_read/work",
        ),
    ];
    writeln!(md, "### Dispatch cost per MSR class\n")?;
    writeln!(
        md,
        "**Dispatch** is the routing decision: `policy.class(msr)`, one probe of the \
         policy's perfect-hash index of routes and PMU MSRs (one non-inlined call). The \
         last two columns show, for context, a whole `decide_*` call and the class's own \
         work measured alone; their difference also contains the hand-off to the class's \
         handler (argument shuffles, the vCPU-id call, building the outcome), which differs \
         by class and is not routing. (The vPMU's `read` used as work re-classifies the MSR, \
         which `decide_read` does not, so that difference can be negative.)\n"
    )?;
    writeln!(
        md,
        "| class | dispatch scenario | dispatch (instructions/op) | vs cheapest | `decide_*` | work alone |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|")?;
    let mut rows = Vec::new();
    for (class, classify, decide, work) in classes {
        rows.push((
            class,
            classify,
            counts.net(classify)?,
            counts.net(decide)?,
            counts.net(work)?,
        ));
    }
    let min = rows.iter().map(|r| r.2).fold(f64::INFINITY, f64::min);
    let max = rows.iter().map(|r| r.2).fold(f64::NEG_INFINITY, f64::max);
    for (class, classify, d, decide, work) in &rows {
        writeln!(
            md,
            "| {class} | `{classify}` | {d:.1} | {:+.1} | {decide:.1} | {work:.1} |",
            d - min
        )?;
    }
    let (hit, miss) = (
        counts.net("routes/lookup_hit")?,
        counts.net("routes/lookup_miss")?,
    );
    writeln!(
        md,
        "\nFor comparison, the compile-time route table alone (`routes::lookup`, used for the \
         docs and as the fallback for layouts too large to index): {hit:.1} instructions for \
         a row, {miss:.1} for a miss."
    )?;
    let spread = if min > 0.0 {
        max / min - 1.0
    } else {
        f64::INFINITY
    };
    writeln!(
        md,
        "\nSpread of the dispatch column: {min:.1} to {max:.1} instructions \
         ({:.0}%); target: within 10% of each other: {}.\n",
        spread * 100.0,
        verdict(spread <= 0.10)
    )?;
    Ok(())
}

fn write_extable_table(md: &mut String, counts: &Counts) -> XtaskResult<()> {
    writeln!(
        md,
        "### Extable lookup (`extable::search`, synthetic sorted tables)\n"
    )?;
    writeln!(
        md,
        "| scenario | entries | instructions/op | ratio vs 1,000 | target | met? |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---|---|")?;
    let base = counts.net("extable/1000")?;
    for (scenario, entries) in [
        ("extable/10", "10"),
        ("extable/1000", "1,000"),
        ("extable/100000", "100,000"),
    ] {
        let net = counts.net(scenario)?;
        let ratio = net / base;
        let (target, met) = if scenario == "extable/100000" {
            ("≤ 3× the 1,000 count".to_string(), verdict(ratio <= 3.0))
        } else {
            (String::new(), String::new())
        };
        writeln!(
            md,
            "| `{scenario}` | {entries} | {net:.1} | {ratio:.2} | {target} | {met} |"
        )?;
    }
    writeln!(md)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Code size
// ---------------------------------------------------------------------------------------

/// Symbol sizes of the binary (`nm -S --defined-only`), by name.
fn symbol_sizes(bin: &Path) -> XtaskResult<BTreeMap<String, u64>> {
    let out = output_timeout(
        Command::new("nm").args(["-S", "--defined-only"]).arg(bin),
        Duration::from_secs(60),
    )?;
    let mut sizes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [_, size, _, name] = fields.as_slice()
            && let Ok(size) = u64::from_str_radix(size, 16)
        {
            sizes.insert((*name).to_string(), size);
        }
    }
    Ok(sizes)
}

fn write_code_size(md: &mut String, bin: &Path) -> XtaskResult<()> {
    let sizes = symbol_sizes(bin)?;
    let size = |name: &str| -> XtaskResult<u64> {
        sizes
            .get(name)
            .copied()
            .ok_or_else(|| format!("{}: no sized symbol {name}", bin.display()).into())
    };
    writeln!(md, "### Code size (from the built `{PACKAGE}` binary)\n")?;
    writeln!(md, "Stubs and their C-ABI handlers (`nm -S`):\n")?;
    writeln!(md, "| symbol | bytes |")?;
    writeln!(md, "|---|---:|")?;
    let mut stubs: Vec<(&String, &u64)> = sizes
        .iter()
        .filter(|(name, _)| name.starts_with("xenmsr_stub_") || name.starts_with("xenmsr_handle_"))
        .collect();
    stubs.sort();
    if stubs.is_empty() {
        return Err(format!("{}: no xenmsr_stub_* symbols", bin.display()).into());
    }
    for (name, bytes) in stubs {
        writeln!(md, "| `{name}` | {bytes} |")?;
    }

    writeln!(
        md,
        "\nBytes per call site: each probe is a function with one access and a function \
         with two accesses to different MSRs; one site costs the difference (the site's \
         patchable region plus the register set-up around it, without the function's \
         prologue and epilogue).\n"
    )?;
    writeln!(
        md,
        "| variant | function with 1 access | with 2 | bytes per site |"
    )?;
    writeln!(md, "|---|---:|---:|---:|")?;
    let probes = String::from_utf8(output_timeout(
        Command::new(bin).arg("sizes"),
        Duration::from_secs(30),
    )?)?;
    for line in probes.lines() {
        let [variant, one, two] = line.split('\t').collect::<Vec<_>>()[..] else {
            return Err(format!("{PACKAGE} sizes: bad line {line:?}").into());
        };
        let (one, two) = (size(one)?, size(two)?);
        writeln!(
            md,
            "| {variant} | {one} | {two} | {} |",
            i128::from(two) - i128::from(one)
        )?;
    }

    writeln!(
        md,
        "\nPatch-site records in the image (`xenmsr_patch_sites`): the patchable region \
         of every site, by op.\n"
    )?;
    writeln!(md, "| op | region bytes | `_safe` | sites |")?;
    writeln!(md, "|---|---:|---|---:|")?;
    let sites = String::from_utf8(output_timeout(
        Command::new(bin).arg("sites"),
        Duration::from_secs(30),
    )?)?;
    for line in sites.lines() {
        let [op, len, flags, count] = line.split('\t').collect::<Vec<_>>()[..] else {
            return Err(format!("{PACKAGE} sites: bad line {line:?}").into());
        };
        let safe = if flags.parse::<u16>().unwrap_or(0) & 1 != 0 {
            "yes"
        } else {
            "no"
        };
        writeln!(md, "| {op} | {len} | {safe} | {count} |")?;
    }
    writeln!(md)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scaling: two threads against one
// ---------------------------------------------------------------------------------------

/// The deadline of the scaling run (it takes a few seconds).
const SCALING_DEADLINE: Duration = Duration::from_secs(300);
/// The largest two-threads-over-one ratio of a library path that counts as scaling.
const SCALING_TARGET: f64 = 1.25;
/// The smallest ratio of the shared-line control that shows the two threads overlapped.
const OVERLAP_EVIDENCE: f64 = 1.5;

/// Runs `xenmsr-bench scaling` (not under callgrind, which runs threads one at a time)
/// and writes its table.
fn write_scaling_table(md: &mut String, bin: &Path) -> XtaskResult<()> {
    eprintln!("xtask: bench: scaling (2 threads against 1)");
    let out = String::from_utf8(output_timeout(
        Command::new(bin).arg("scaling"),
        SCALING_DEADLINE,
    )?)?;
    let mut rows = Vec::new();
    for line in out.lines() {
        let [name, about, one, two, ratio] = line.split('\t').collect::<Vec<_>>()[..] else {
            return Err(format!("{PACKAGE} scaling: bad line {line:?}").into());
        };
        let ratio: f64 = ratio
            .parse()
            .map_err(|e| format!("{PACKAGE} scaling: bad ratio in {line:?}: {e}"))?;
        rows.push((name, about, one, two, ratio));
    }
    let overlap = rows
        .iter()
        .find(|r| r.0 == "control/shared_line")
        .map(|r| r.4)
        .ok_or("the scaling run has no control/shared_line row")?;
    writeln!(md, "### Scaling: 2 threads against 1 (thread CPU time)\n")?;
    writeln!(
        md,
        "Each operation runs through a real call site and stub to the production policy on \
         the mock hypercall page (per-thread scripts and log), first on one thread, then on \
         two at once, each thread playing its own vCPU (neighbouring vPMU slots, its own \
         page); 15 pairs, about 40 ms of CPU time per thread per run. Columns: the medians \
         of the nanoseconds per operation (each thread's `CLOCK_THREAD_CPUTIME_ID`) and the \
         median of the per-pair ratios. A ratio near 1 means no cache line is written by \
         both threads; the shared-line control shows what sharing one line costs, and that \
         the threads really ran at the same time. `control/private_work` touches no shared \
         memory: its ratio is what running two threads costs by itself on this machine.\n"
    )?;
    writeln!(
        md,
        "| operation | what | ns/op, 1 thread | ns/op, 2 threads | ratio | target |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---|")?;
    for (name, about, one, two, ratio) in &rows {
        let target = if name.starts_with("control/") {
            String::new()
        } else {
            format!(
                "≤ {SCALING_TARGET:.2}: {}",
                verdict(*ratio <= SCALING_TARGET)
            )
        };
        writeln!(
            md,
            "| `{name}` | {about} | {one} | {two} | {ratio:.2} | {target} |"
        )?;
    }
    if overlap < OVERLAP_EVIDENCE {
        writeln!(
            md,
            "\n**Inconclusive:** the shared-line control slowed down only {overlap:.2}× \
             (< {OVERLAP_EVIDENCE}), so the two threads hardly ran at the same time (a \
             busy machine); the ratios above say little."
        )?;
    }
    writeln!(md)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// docs/benchmarks.md
// ---------------------------------------------------------------------------------------

fn doc_path() -> PathBuf {
    root_dir().join("docs").join("benchmarks.md")
}

/// The placeholder of the in-guest section until that part has measured.
fn in_guest_placeholder() -> String {
    format!(
        "{IN_GUEST_HEADING}\n\nNot measured yet: the in-guest benchmarks (TSC cycles per \
         operation in the PV test kernel, booted under Xen in QEMU/TCG) will fill this \
         section.\n"
    )
}

/// Writes `docs/benchmarks.md` with `host` as the host section, keeping the in-guest
/// section of an existing file.
fn write_doc(host: &str) -> XtaskResult<()> {
    let path = doc_path();
    let in_guest = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(IN_GUEST_HEADING).map(|at| old[at..].to_string()))
        .unwrap_or_else(in_guest_placeholder);
    let mut doc = String::new();
    writeln!(doc, "# Benchmarks\n")?;
    writeln!(
        doc,
        "Generated by `cargo xtask bench`; do not edit the tables by hand. The host \
         section counts instructions under callgrind (repeatable on a noisy machine); the \
         in-guest section measures TSC cycles in the PV test kernel.\n"
    )?;
    doc.push_str(host);
    if !host.ends_with("\n\n") {
        doc.push('\n');
    }
    doc.push_str(&in_guest);
    let doc = crate::guestbench::repo_relative(&doc, &root_dir());
    std::fs::write(&path, doc).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("xtask: bench: wrote {}", path.display());
    Ok(())
}
