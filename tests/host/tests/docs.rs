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
