//! The module-cycle checker: the module tree from the files (`tree`), what
//! each module names (`names`), and the cycles among them (`cycles`), for the
//! crates of the workspace (`workspace`).

pub mod cycles;
pub mod names;
pub mod tree;
pub mod workspace;

#[cfg(test)]
mod tests;

use std::path::Path;

use cycles::Cycle;
use tree::{Files, Tree};

/// The module cycles of the crate whose root file is `root`.
pub fn check_crate(files: &dyn Files, root: &Path) -> Result<Vec<Cycle>, String> {
    let tree = Tree::load(files, root)?;
    let namings = names::namings(&tree);
    Ok(cycles::cycles(&tree, &namings))
}
