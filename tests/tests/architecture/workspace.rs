//! The crates to check: every workspace member but this one, read from the
//! workspace `Cargo.toml`, so a crate added to `members` is checked without
//! touching this test.

use std::path::{Path, PathBuf};

/// One crate root of a workspace member: its library or one of its binaries.
pub struct CrateRoot {
    /// `package lib`, `package bin name`.
    pub label: String,
    /// The root file (`src/lib.rs`, `src/main.rs`, `src/bin/x.rs`).
    pub file: PathBuf,
}

/// Every crate root of every member of the workspace at `workspace`, except
/// the member at `skip`.
pub fn crate_roots(workspace: &Path, skip: &Path) -> Result<Vec<CrateRoot>, String> {
    let manifest = read_toml(&workspace.join("Cargo.toml"))?;
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .ok_or("the workspace Cargo.toml has no [workspace] members")?;
    let mut dirs = Vec::new();
    for m in members {
        let m = m.as_str().ok_or("a workspace member is not a string")?;
        dirs.extend(expand_member(workspace, m)?);
    }
    let skip = skip
        .canonicalize()
        .map_err(|e| format!("{}: {e}", skip.display()))?;
    let mut roots = Vec::new();
    for dir in dirs {
        if dir.canonicalize().ok().as_deref() == Some(skip.as_path()) {
            continue;
        }
        roots.extend(member_roots(&dir)?);
    }
    Ok(roots)
}

/// A member entry: a directory, or `dir/*` for every package under `dir`.
fn expand_member(workspace: &Path, member: &str) -> Result<Vec<PathBuf>, String> {
    let Some(parent) = member.strip_suffix("/*") else {
        return Ok(vec![workspace.join(member)]);
    };
    let parent = workspace.join(parent);
    let entries = std::fs::read_dir(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// A package's library and binaries, as Cargo finds them: `[lib] path` or
/// `src/lib.rs`; `[[bin]] path`s, `src/main.rs`, `src/bin/*.rs` and
/// `src/bin/*/main.rs`.
fn member_roots(dir: &Path) -> Result<Vec<CrateRoot>, String> {
    let manifest = read_toml(&dir.join("Cargo.toml"))?;
    let package = manifest
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| format!("{}: no [package] name", dir.display()))?
        .to_owned();
    let mut roots: Vec<CrateRoot> = Vec::new();
    let lib = manifest
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str())
        .map(|p| dir.join(p))
        .unwrap_or_else(|| dir.join("src/lib.rs"));
    if lib.is_file() {
        roots.push(CrateRoot {
            label: format!("{package} lib"),
            file: lib,
        });
    }
    let mut bins: Vec<(String, PathBuf)> = Vec::new();
    for bin in manifest
        .get("bin")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let name = bin.get("name").and_then(|n| n.as_str()).unwrap_or(&package);
        let path = match bin.get("path").and_then(|p| p.as_str()) {
            Some(p) => dir.join(p),
            None if name == package => dir.join("src/main.rs"),
            None => dir.join("src/bin").join(format!("{name}.rs")),
        };
        bins.push((name.to_owned(), path));
    }
    let auto = manifest
        .get("package")
        .and_then(|p| p.get("autobins"))
        .and_then(|a| a.as_bool())
        .unwrap_or(true);
    if auto {
        bins.push((package.clone(), dir.join("src/main.rs")));
        if let Ok(entries) = std::fs::read_dir(dir.join("src/bin")) {
            let mut found: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            found.sort();
            for p in found {
                let stem = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_owned();
                if p.extension().is_some_and(|e| e == "rs") {
                    bins.push((stem, p));
                } else if p.join("main.rs").is_file() {
                    bins.push((stem, p.join("main.rs")));
                }
            }
        }
    }
    for (name, path) in bins {
        if path.is_file() && !roots.iter().any(|r| r.file == path) {
            roots.push(CrateRoot {
                label: format!("{package} bin {name}"),
                file: path,
            });
        }
    }
    Ok(roots)
}

fn read_toml(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| format!("{}: {e}", path.display()))
}
