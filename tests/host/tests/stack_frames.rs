//! The library's stack budget: no function reachable from `xenmsr::init` in the release
//! build of the PV test kernel reserves more than [`BUDGET`] bytes of stack. A kernel may
//! call `init` on a small boot stack; the class index (about 5 KiB) used to be built, and
//! moved twice, on the stack (a 12 KiB frame).
//!
//! The test builds `xenmsr-pvkernel` for `x86_64-unknown-none` in release (as CI and
//! `cargo xtask` do; a no-op when it is up to date), disassembles it with `objdump`,
//! follows the direct calls and tail jumps from `xenmsr::init`, and adds up each reached
//! function's `sub $N,%rsp` (stack-probed frames are reserved in 4 KiB steps, so the sum
//! is the frame) and `sub $N,%r11` (the probe loop's target). Indirect calls (the
//! kernel's hooks) are not followed: they are the kernel's code.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::process::Command;

/// The most stack one function of the library may reserve (`docs/architecture.md`).
const BUDGET: u64 = 4096;
/// Where the disassembly starts.
const ROOT: &str = "xenmsr::init";

/// One function of the disassembly.
#[derive(Debug, Default)]
struct Function {
    name: String,
    /// Bytes reserved by `sub $N,%rsp` / `sub $N,%r11`.
    frame: u64,
    /// Start addresses of the functions it calls or tail-jumps to.
    callees: BTreeSet<u64>,
}

fn build_kernel(workspace: &Path) {
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "xenmsr-pvkernel",
            "--target",
            "x86_64-unknown-none",
            "--release",
        ])
        .current_dir(workspace)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building the PV kernel failed (is the x86_64-unknown-none target installed? \
         `rustup target add x86_64-unknown-none`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Parses `objdump -d -C --no-show-raw-insn` output.
fn functions(disassembly: &str) -> BTreeMap<u64, Function> {
    let mut functions = BTreeMap::new();
    let mut current: Option<u64> = None;
    for line in disassembly.lines() {
        // "0000000000118090 <xenmsr::init>:"
        if let Some((address, rest)) = line.split_once(" <")
            && let Some(name) = rest.strip_suffix(">:")
            && let Ok(address) = u64::from_str_radix(address, 16)
        {
            functions.insert(
                address,
                Function {
                    name: name.to_string(),
                    ..Function::default()
                },
            );
            current = Some(address);
            continue;
        }
        let Some(function) = current.and_then(|a| functions.get_mut(&a)) else {
            continue;
        };
        // "  1184ba:\tsub    $0x1000,%rsp" / "  1184c0:\tcall   10f840 <...>"
        let Some((_, instruction)) = line.split_once(":\t") else {
            continue;
        };
        let mut words = instruction.split_whitespace();
        match (words.next(), words.next()) {
            (Some("sub"), Some(operands)) => {
                if let Some((imm, reg)) = operands.split_once(',')
                    && (reg == "%rsp" || reg == "%r11")
                    && let Some(hex) = imm.strip_prefix("$0x")
                {
                    function.frame += u64::from_str_radix(hex, 16).expect("hex immediate");
                }
            }
            (Some("call" | "jmp"), Some(target)) => {
                if let Ok(target) = u64::from_str_radix(target, 16) {
                    function.callees.insert(target);
                }
            }
            _ => {}
        }
    }
    functions
}

#[test]
fn no_function_reachable_from_init_reserves_more_than_the_budget() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    build_kernel(&workspace);
    let kernel = workspace.join("target/x86_64-unknown-none/release/xenmsr-pvkernel");
    let out = Command::new("objdump")
        .args(["-d", "-C", "--no-show-raw-insn"])
        .arg(&kernel)
        .output()
        .expect("objdump (binutils) is needed");
    assert!(out.status.success(), "objdump failed");
    let functions = functions(&String::from_utf8_lossy(&out.stdout));

    let root = functions
        .iter()
        .find(|(_, f)| f.name == ROOT)
        .map(|(&address, _)| address)
        .unwrap_or_else(|| panic!("no `{ROOT}` in {}", kernel.display()));
    let mut reached = BTreeSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(address) = queue.pop_front() {
        // A jump inside a function targets no function start, so it adds nothing.
        for &callee in &functions[&address].callees {
            if functions.contains_key(&callee) && reached.insert(callee) {
                queue.push_back(callee);
            }
        }
    }
    let mut frames: Vec<(u64, &str)> = reached
        .iter()
        .map(|a| (functions[a].frame, functions[a].name.as_str()))
        .collect();
    frames.sort_unstable_by(|a, b| b.cmp(a));
    let over: Vec<_> = frames.iter().filter(|(frame, _)| *frame > BUDGET).collect();
    assert!(
        over.is_empty(),
        "functions reachable from {ROOT} reserving more than {BUDGET} bytes: {over:#?}"
    );
    assert!(
        reached.len() > 10,
        "the call graph was not followed: {frames:?}"
    );
    eprintln!(
        "{} functions reachable from {ROOT}; largest frames: {:?}",
        reached.len(),
        &frames[..frames.len().min(5)]
    );
}
