//! Static instruction counts of the stubs' fast paths, read from the disassembly of the
//! built benchmark binary.
//!
//! The paths that never enter Rust cannot all run on the host: a pass-through read ends in
//! a real `rdmsr` (a #GP in ring 3), and the FSGSBASE paths need CR4.FSGSBASE. Their cost
//! is a straight line of instructions, so it is counted from the code itself: starting at
//! the stub's symbol, the walk follows each conditional branch the way the path takes it
//! (a list of taken / not taken decisions, which must all be used), follows `jmp`, steps
//! over a `call` (the callee is not the stub's), and stops at `ret`. The count includes the
//! site's own `call` and excludes the instruction the stub executes for its caller (the
//! `rdmsr`, `rdfsbase`, `wrfsbase`...), which the native site would execute too.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::XtaskResult;
use crate::process::output_timeout;

/// One decoded instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insn {
    pub mnemonic: String,
    pub operands: String,
}

/// The instructions of one function, by address.
#[derive(Clone, Debug, Default)]
pub struct Function {
    /// Where the walk starts: the first instruction of the parsed function (code merged
    /// in later from other symbols keeps it).
    pub entry: Option<u64>,
    pub insns: BTreeMap<u64, Insn>,
}

/// The walk of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The stub's instructions on the path, the caller's payload instruction included.
    pub mnemonics: Vec<String>,
    /// Instructions on the path that are the caller's own operation (not overhead).
    pub payload: usize,
}

impl Walk {
    /// The stub's own instructions on the path: the site's `call` plus everything the
    /// stub executes, minus the payload.
    pub fn own(&self) -> usize {
        1 + self.mnemonics.len() - self.payload
    }
}

/// The instructions a stub executes for its caller (what the native site would execute).
const PAYLOADS: [&str; 7] = [
    "rdmsr", "wrmsr", "rdpmc", "rdfsbase", "rdgsbase", "wrfsbase", "wrgsbase",
];

/// Parses `objdump -d --no-show-raw-insn` output of one function.
pub fn parse(disassembly: &str) -> Function {
    let mut function = Function::default();
    for line in disassembly.lines() {
        let Some((addr, rest)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let rest = rest.trim();
        function.entry.get_or_insert(addr);
        let (mnemonic, operands) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        function.insns.insert(
            addr,
            Insn {
                mnemonic: mnemonic.to_string(),
                operands: operands.trim().to_string(),
            },
        );
    }
    function
}

/// The address a direct branch goes to (`jne 33f0b <sym+0x4b>`).
fn branch_target(operands: &str) -> XtaskResult<u64> {
    let hex = operands.split_whitespace().next().unwrap_or("");
    u64::from_str_radix(hex, 16)
        .map_err(|_| format!("cannot read a branch target from {operands:?}").into())
}

/// Walks `function` from its first instruction, taking conditional branches as `taken`
/// says, until `ret`.
pub fn walk(function: &Function, taken: &[bool]) -> XtaskResult<Walk> {
    let mut at = function.entry.ok_or("the function has no instructions")?;
    let mut decisions = taken.iter();
    let mut mnemonics = Vec::new();
    let mut payload = 0;
    loop {
        if mnemonics.len() > 200 {
            return Err("the walk does not reach a ret within 200 instructions".into());
        }
        let insn = function
            .insns
            .get(&at)
            .ok_or_else(|| format!("the walk left the function at {at:#x}"))?;
        mnemonics.push(insn.mnemonic.clone());
        if PAYLOADS.contains(&insn.mnemonic.as_str()) {
            payload += 1;
        }
        let next = function
            .insns
            .range(at + 1..)
            .next()
            .map(|(a, _)| *a)
            .unwrap_or(u64::MAX);
        match insn.mnemonic.as_str() {
            "ret" => break,
            "ud2" => return Err(format!("the walk reached ud2 at {at:#x}").into()),
            "jmp" => at = branch_target(&insn.operands)?,
            m if m.starts_with('j') => {
                let take = decisions.next().ok_or_else(|| {
                    format!("the walk needs another branch decision at {at:#x} ({m})")
                })?;
                at = if *take {
                    branch_target(&insn.operands)?
                } else {
                    next
                };
            }
            _ => at = next,
        }
    }
    if decisions.next().is_some() {
        return Err("the walk left branch decisions unused".into());
    }
    Ok(Walk { mnemonics, payload })
}

/// The disassembly of `symbol` in `bin`.
pub fn disassemble(bin: &Path, symbol: &str) -> XtaskResult<Function> {
    let out = output_timeout(
        Command::new("objdump")
            .args(["-d", "--no-show-raw-insn"])
            .arg(format!("--disassemble={symbol}"))
            .arg(bin),
        Duration::from_secs(60),
    )?;
    let function = parse(&String::from_utf8_lossy(&out));
    if function.insns.is_empty() {
        return Err(format!("objdump found no instructions for {symbol}").into());
    }
    Ok(function)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STUB: &str = "\
0000000000033ec0 <xenmsr_stub_rdmsr>:
   33ec0:\tcmpb   $0x0,0x536b9(%rip)        # 87580 <xenmsr_read_filter>
   33ec7:\tjne    33ee4 <xenmsr_stub_rdmsr+0x24>
   33ec9:\tmov    %ecx,%eax
   33ecb:\tje     33ee4 <xenmsr_stub_rdmsr+0x24>
   33ecd:\trdmsr
   33ecf:\tret
   33ee4:\tpush   %rcx
   33ee5:\tcall   *0x10(%rip)
   33eeb:\tpop    %rcx
   33eec:\tjmp    33ecd <xenmsr_stub_rdmsr+0xd>
";

    #[test]
    fn straight_path_counts_the_call_and_not_the_payload() {
        let f = parse(STUB);
        let w = walk(&f, &[false, false]).expect("walks");
        assert_eq!(w.mnemonics, ["cmpb", "jne", "mov", "je", "rdmsr", "ret"]);
        assert_eq!(w.own(), 6);
    }

    #[test]
    fn taken_branches_and_jmp_are_followed_and_calls_stepped_over() {
        let f = parse(STUB);
        let w = walk(&f, &[true]).expect("walks");
        assert_eq!(
            w.mnemonics,
            ["cmpb", "jne", "push", "call", "pop", "jmp", "rdmsr", "ret"]
        );
        assert_eq!(w.own(), 8);
    }

    #[test]
    fn decisions_must_match_the_code() {
        let f = parse(STUB);
        assert!(walk(&f, &[false]).is_err(), "too few decisions");
        assert!(walk(&f, &[true, true]).is_err(), "too many decisions");
    }
}
