//! Architecture invariant: no module of a workspace crate names (through
//! `crate::`, `super::`, `self::`, a child's name or `use`) a module that names
//! it back, directly or through others. Each folder is a room with a door; a
//! cycle means two rooms that cannot be understood, tested or moved apart.
//!
//! What `import-linter` checks for Python, read here from the sources with
//! `syn`: `cargo modules dependencies --acyclic` counts a type and its own
//! method as a cycle, so it cannot serve. Every member of the workspace but
//! this crate is checked, each library and binary root on its own; a new
//! crate is checked as soon as it is in `members`. There is no allowlist: a
//! cycle is fixed where the report points (see `architecture/names.rs` for
//! what counts as naming).

#[path = "architecture/mod.rs"]
mod checker;

use std::path::Path;

use checker::tree::Disk;
use checker::workspace::crate_roots;
use checker::{check_crate, cycles};

#[test]
fn no_module_names_a_module_that_names_it_back() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = here
        .parent()
        .expect("the tests crate is inside the workspace");
    let roots = crate_roots(workspace, here).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !roots.is_empty(),
        "no crate to check in {}",
        workspace.display()
    );
    let files = Disk {
        base: workspace.to_owned(),
    };
    let mut report = String::new();
    for root in &roots {
        let file = root.file.strip_prefix(workspace).unwrap_or(&root.file);
        let found = check_crate(&files, file).unwrap_or_else(|e| panic!("{e}"));
        let label = format!("{} ({})", root.label, file.display());
        report.push_str(&cycles::report(&label, &found));
    }
    assert!(
        report.is_empty(),
        "modules that name each other in a circle; for each edge, one place \
         where it is named (break each cycle: move what both need below both, \
         and import siblings by their own path, not the parent's re-export):\n\n{report}"
    );
}
