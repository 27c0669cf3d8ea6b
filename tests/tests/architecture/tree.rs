//! A crate's module tree as rustc finds it from the files, so that every
//! module's own items can be read apart from its children's.
//!
//! Rules followed (the Rust reference, "Modules"): a crate root (`lib.rs`,
//! `main.rs`, `src/bin/x.rs`) and a `mod.rs` own their directory, so their
//! `mod foo;` is `foo.rs` or `foo/mod.rs` beside them; a `foo.rs` owns `foo/`,
//! so its children are `foo/bar.rs` or `foo/bar/mod.rs`. An inline
//! `mod x { ... }` adds `x/` to where its own `mod y;` lines look. A
//! `#[path = "..."]` file is relative to the declaring file's directory (inside
//! inline modules, to the directory those name) and owns its own directory,
//! like a `mod.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Index of a module in [`Tree::modules`].
pub type ModId = usize;

/// Where source files come from: the disk for the real crates, a map for the
/// checker's own tests.
pub trait Files {
    /// The file's text, or `None` if there is no such file.
    fn read(&self, path: &Path) -> Option<String>;
}

/// The file system, with paths relative to `base` (the workspace, so that
/// reports name `hub/src/store/mod.rs`).
pub struct Disk {
    /// The directory paths are relative to.
    pub base: PathBuf,
}

impl Files for Disk {
    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(self.base.join(path)).ok()
    }
}

/// Files held in memory, keyed by path.
impl Files for HashMap<PathBuf, String> {
    fn read(&self, path: &Path) -> Option<String> {
        self.get(path).cloned()
    }
}

/// One module: its own items (its inline children's items are moved to them).
pub struct Module {
    /// Names from the crate root; empty for the root itself.
    pub path: Vec<String>,
    /// The file its items are written in.
    pub file: PathBuf,
    /// Its items; every `mod` item among them is emptied of its content.
    pub items: Vec<syn::Item>,
    /// Its parent; `None` for the root.
    pub parent: Option<ModId>,
    /// Its declared child modules by name.
    pub children: BTreeMap<String, ModId>,
}

/// A crate's modules; the root is `modules[0]`.
pub struct Tree {
    /// Every module, parents before their children.
    pub modules: Vec<Module>,
}

impl Tree {
    /// The module's name as written in code (`crate` for the root).
    pub fn name(&self, id: ModId) -> String {
        let path = &self.modules[id].path;
        if path.is_empty() {
            "crate".to_owned()
        } else {
            path.join("::")
        }
    }

    /// Reads the crate whose root file is `root`.
    pub fn load(files: &dyn Files, root: &Path) -> Result<Tree, String> {
        let text = files
            .read(root)
            .ok_or_else(|| format!("{}: no such file", root.display()))?;
        let dir = parent_dir(root);
        let mut tree = Tree {
            modules: Vec::new(),
        };
        tree.add_file_module(files, None, Vec::new(), root, &text, dir)?;
        Ok(tree)
    }

    /// Parses `file` and adds it as a module whose `mod x;` lines look in
    /// `child_dir`.
    fn add_file_module(
        &mut self,
        files: &dyn Files,
        parent: Option<ModId>,
        path: Vec<String>,
        file: &Path,
        text: &str,
        child_dir: PathBuf,
    ) -> Result<ModId, String> {
        let parsed = syn::parse_file(text).map_err(|e| {
            let at = e.span().start();
            format!("{}:{}: {e}", file.display(), at.line)
        })?;
        let path_attr_dir = parent_dir(file);
        self.add_module(
            files,
            parent,
            path,
            file,
            parsed.items,
            &Dirs {
                child: child_dir,
                path_attr: path_attr_dir,
            },
        )
    }

    /// Adds a module with `items` and then its children, files or inline.
    fn add_module(
        &mut self,
        files: &dyn Files,
        parent: Option<ModId>,
        path: Vec<String>,
        file: &Path,
        mut items: Vec<syn::Item>,
        dirs: &Dirs,
    ) -> Result<ModId, String> {
        let id = self.modules.len();
        // Take each inline module's items out before storing ours, so that a
        // module's items are only its own.
        let mut children = Vec::new();
        for item in &mut items {
            if let syn::Item::Mod(m) = item {
                children.push((
                    m.ident.to_string(),
                    path_attr(&m.attrs),
                    has_cfg(&m.attrs),
                    m.content.take(),
                ));
            }
        }
        self.modules.push(Module {
            path: path.clone(),
            file: file.to_owned(),
            items,
            parent,
            children: BTreeMap::new(),
        });
        if let Some(p) = parent {
            let name = path.last().cloned().unwrap_or_default();
            self.modules[p].children.insert(name, id);
        }
        for (name, attr_path, cfg, content) in children {
            let mut child_path = path.clone();
            child_path.push(name.clone());
            match content {
                Some((_, inner)) => {
                    let dir = dirs.child.join(attr_path.as_deref().unwrap_or(&name));
                    let inner_dirs = Dirs {
                        child: dir.clone(),
                        path_attr: dir,
                    };
                    self.add_module(files, Some(id), child_path, file, inner, &inner_dirs)?;
                }
                None => {
                    let found = match &attr_path {
                        Some(p) => {
                            let f = dirs.path_attr.join(p);
                            files.read(&f).map(|t| (parent_dir(&f), f, t))
                        }
                        None => {
                            let flat = dirs.child.join(format!("{name}.rs"));
                            let nested = dirs.child.join(&name).join("mod.rs");
                            let own_dir = dirs.child.join(&name);
                            files
                                .read(&flat)
                                .map(|t| (own_dir.clone(), flat, t))
                                .or_else(|| files.read(&nested).map(|t| (own_dir, nested, t)))
                        }
                    };
                    match found {
                        Some((child_dir, f, text)) => {
                            self.add_file_module(
                                files,
                                Some(id),
                                child_path,
                                &f,
                                &text,
                                child_dir,
                            )?;
                        }
                        // A module compiled only on some targets may have no
                        // file here; any other missing file is an error.
                        None if cfg => {}
                        None => {
                            return Err(format!(
                                "{}: module `{}` has no file under {}",
                                file.display(),
                                child_path.join("::"),
                                dirs.child.display()
                            ))
                        }
                    }
                }
            }
        }
        Ok(id)
    }
}

/// Where a module's `mod x;` (`child`) and `#[path]` (`path_attr`) files are.
struct Dirs {
    child: PathBuf,
    path_attr: PathBuf,
}

fn parent_dir(file: &Path) -> PathBuf {
    file.parent().map(Path::to_owned).unwrap_or_default()
}

/// The value of a `#[path = "..."]` attribute.
fn path_attr(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

fn has_cfg(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| a.path().is_ident("cfg"))
}
