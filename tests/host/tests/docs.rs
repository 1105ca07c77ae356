//! The repository's documents that are generated from, or compiled against, the code.
//!
//! They live here, in a crate that is never published, because they read files outside
//! the library crates (`docs/`): a packaged `xenmsr` must not depend on them. The other
//! half, `docs/integrating.md`'s example, is a doctest of this crate (`src/lib.rs`).

use std::path::PathBuf;

/// `docs/msr-semantics.md` must hold exactly the table the code dispatches on.
/// `XENMSR_BLESS=1 cargo test -p xenmsr-host-tests --test docs` rewrites the doc's block
/// from the code.
#[test]
fn msr_semantics_matches_the_routing_table() {
    const BEGIN: &str = "<!-- routes:begin (generated from shim/src/routes.rs; XENMSR_BLESS=1 cargo test -p xenmsr-host-tests --test docs rewrites it) -->";
    const END: &str = "<!-- routes:end -->";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/msr-semantics.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rows = String::new();
    xenmsr::routes::write_markdown_rows(&mut rows).unwrap();
    let start = doc.find(BEGIN).expect("begin marker") + BEGIN.len();
    let end = doc.find(END).expect("end marker");
    if std::env::var_os("XENMSR_BLESS").is_some() {
        let blessed = format!("{}\n{}{}", &doc[..start], rows, &doc[end..]);
        std::fs::write(&path, blessed).unwrap();
        return;
    }
    assert_eq!(
        doc[start..end].trim(),
        rows.trim(),
        "docs/msr-semantics.md disagrees with ROUTES; fix the code or rerun with XENMSR_BLESS=1"
    );
}

/// `docs/integrating.md` walks through the minimal example kernel: the code it shows must
/// be the kernel CI boots (`tests/minimal-kernel`), byte for byte.
const GUIDE: &str = include_str!("../../../docs/integrating.md");
const MINIMAL_KERNEL: &str = include_str!("../../minimal-kernel/src/main.rs");
const MINIMAL_BUILD: &str = include_str!("../../minimal-kernel/build.rs");

/// The body of every fenced block of `lang` in `markdown`.
fn fenced_blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let open = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let end = body.find("\n```").expect("an open fence is closed");
        blocks.push(&body[..end]);
        rest = &body[end + 4..];
    }
    blocks
}

#[test]
fn the_guide_shows_the_minimal_kernel_verbatim() {
    let blocks = fenced_blocks(GUIDE, "rust,ignore");
    assert!(
        blocks.contains(&MINIMAL_KERNEL.trim_end()),
        "docs/integrating.md must contain tests/minimal-kernel/src/main.rs verbatim"
    );
    assert!(
        blocks.contains(&MINIMAL_BUILD.trim_end()),
        "docs/integrating.md must contain tests/minimal-kernel/build.rs verbatim"
    );
}

#[test]
fn the_guide_states_the_kernels_line_count() {
    let lines = MINIMAL_KERNEL.trim_end().lines().count();
    let claim = format!("`tests/minimal-kernel`: {lines} lines of Rust, no hand-written assembly");
    assert!(
        GUIDE.contains(&claim),
        "docs/integrating.md must say {claim:?}"
    );
    assert!(
        lines <= 80,
        "the minimal kernel has grown to {lines} lines (the promise is about 80)"
    );
}

#[test]
fn the_minimal_kernel_has_no_assembly() {
    for needle in ["asm!", "naked"] {
        assert!(
            !MINIMAL_KERNEL.contains(needle),
            "the minimal kernel must not contain {needle}"
        );
    }
}

#[test]
fn fenced_blocks_are_found() {
    let md = "a\n```rust,ignore\nfn x() {}\n```\nb\n```rust,ignore\ny\n```\n";
    assert_eq!(fenced_blocks(md, "rust,ignore"), ["fn x() {}", "y"]);
}

/// `docs/benchmarks.md` is generated on some machine but read on every other: it must name
/// paths relative to the repository, never the machine's own.
#[test]
fn benchmarks_name_no_machine_paths() {
    let doc = include_str!("../../../docs/benchmarks.md");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let mut forbidden = vec![root.display().to_string()];
    forbidden.extend(["/home/", "/root/", "/tmp/", "/usr/bin/", "/work/"].map(String::from));
    for needle in &forbidden {
        assert!(
            !doc.contains(needle.as_str()),
            "docs/benchmarks.md names the build machine's path {needle:?}"
        );
    }
}

/// The SMP example kernel: shown verbatim in the guide's §5, with its line count, and
/// free of assembly (the kit does the bring-up).
const SMP_KERNEL: &str = include_str!("../../smp-kernel/src/main.rs");

#[test]
fn the_guide_shows_the_smp_kernel_verbatim_and_its_size() {
    let blocks = fenced_blocks(GUIDE, "rust,ignore");
    assert!(
        blocks.contains(&SMP_KERNEL.trim_end()),
        "docs/integrating.md must contain tests/smp-kernel/src/main.rs verbatim"
    );
    let lines = SMP_KERNEL.trim_end().lines().count();
    let claim = format!("`tests/smp-kernel`: {lines} lines of Rust, no assembly");
    assert!(
        GUIDE.contains(&claim),
        "docs/integrating.md must say {claim:?}"
    );
    assert!(
        lines <= 150,
        "the SMP kernel has grown to {lines} lines (the promise is about 150)"
    );
    for word in ["asm!", "global_asm", "naked"] {
        assert!(
            !SMP_KERNEL.contains(word),
            "the SMP kernel must have no assembly ({word})"
        );
    }
}
