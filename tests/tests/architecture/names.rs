//! Which modules each module names, and where.
//!
//! A module names another when its code holds a path that reaches it:
//! `crate::a::b::C`, `super::x`, `self::x`, a relative path whose first name
//! is one of its child modules (2018 edition) or a module it imported with
//! `use`, in `use` trees (braces, `self`, globs, renames), anywhere in items,
//! types and expressions, and in the tokens given to a macro (`select!`,
//! `format!`), where `crate :: a :: B` sequences are picked out. A path names
//! the longest prefix of it that is a module: `crate::store::StoreError` names
//! `store`, `super::error::StoreError` (from inside `store`) names
//! `store::error`.
//!
//! What does not name: `mod child;` declarations, visibilities
//! (`pub(crate)`, `pub(super)`: they grant access, they use nothing), comments
//! and doc comments (the parser drops the former, the latter are string
//! literals), and a module naming itself.

use std::collections::HashMap;
use std::path::PathBuf;

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::visit::{self, Visit};

use super::tree::{ModId, Tree};

/// One place where a module names another.
#[derive(Clone, Debug)]
pub struct Naming {
    pub from: ModId,
    pub to: ModId,
    pub file: PathBuf,
    pub line: usize,
}

/// Every naming in the crate, in module order then source order.
pub fn namings(tree: &Tree) -> Vec<Naming> {
    let mut out = Vec::new();
    for id in 0..tree.modules.len() {
        let aliases = aliases(tree, id);
        let mut v = Namer {
            tree,
            current: id,
            aliases: &aliases,
            out: &mut out,
        };
        for item in &tree.modules[id].items {
            v.visit_item(item);
        }
    }
    out
}

/// A `use` tree flattened into one leaf: its full path and what it binds.
struct UseLeaf {
    /// The path's names; a glob's path ends before the `*`.
    segments: Vec<(String, Span)>,
    leading_colon: bool,
    binding: Binding,
}

enum Binding {
    /// `a::b` binds `b`, `a::b as c` binds `c`, `a::{self}` binds `a`.
    Name(String),
    /// `a::*`.
    Glob,
    /// `a::b as _`.
    Nothing,
}

fn use_leaves(
    tree: &syn::UseTree,
    prefix: &mut Vec<(String, Span)>,
    leading: bool,
    out: &mut Vec<UseLeaf>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push((p.ident.to_string(), p.ident.span()));
            use_leaves(&p.tree, prefix, leading, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let name = n.ident.to_string();
            let mut segments = prefix.clone();
            let binding = if name == "self" {
                // `a::{self}` is `a` itself; point its line at the `self`.
                if let Some(last) = segments.last_mut() {
                    last.1 = n.ident.span();
                }
                Binding::Name(prefix.last().map(|s| s.0.clone()).unwrap_or_default())
            } else {
                segments.push((name.clone(), n.ident.span()));
                Binding::Name(name)
            };
            out.push(UseLeaf {
                segments,
                leading_colon: leading,
                binding,
            });
        }
        syn::UseTree::Rename(r) => {
            let name = r.ident.to_string();
            let mut segments = prefix.clone();
            if name != "self" {
                segments.push((name, r.ident.span()));
            }
            let binding = if r.rename == "_" {
                Binding::Nothing
            } else {
                Binding::Name(r.rename.to_string())
            };
            out.push(UseLeaf {
                segments,
                leading_colon: leading,
                binding,
            });
        }
        syn::UseTree::Glob(g) => {
            let mut segments = prefix.clone();
            // Point the glob's line at the `*`.
            if let Some(last) = segments.last_mut() {
                last.1 = g.star_token.span;
            }
            out.push(UseLeaf {
                segments,
                leading_colon: leading,
                binding: Binding::Glob,
            });
        }
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, leading, out);
            }
        }
    }
}

/// Every `use` leaf written in module `id` (in any of its functions too, but
/// not in its child modules).
fn module_uses(tree: &Tree, id: ModId) -> Vec<UseLeaf> {
    struct Uses(Vec<UseLeaf>);
    impl<'ast> Visit<'ast> for Uses {
        fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
            use_leaves(
                &u.tree,
                &mut Vec::new(),
                u.leading_colon.is_some(),
                &mut self.0,
            );
        }
        fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {}
    }
    let mut uses = Uses(Vec::new());
    for item in &tree.modules[id].items {
        uses.visit_item(item);
    }
    uses.0
}

/// The local names in module `id` that `use` binds to modules of the crate:
/// `use crate::store;`, `use super::sinks as s;`, and the child modules of a
/// module imported with a glob (`use super::*;`).
fn aliases(tree: &Tree, id: ModId) -> HashMap<String, ModId> {
    let leaves = module_uses(tree, id);
    let mut named: HashMap<String, ModId> = HashMap::new();
    let mut globbed: HashMap<String, ModId> = HashMap::new();
    // An import may go through another (`use crate::a; use a::b;`): repeat
    // until nothing new is found.
    loop {
        let before = named.len() + globbed.len();
        let known = merged(&named, &globbed);
        for leaf in &leaves {
            let names: Vec<&str> = leaf.segments.iter().map(|s| s.0.as_str()).collect();
            let Some((module, whole)) = resolve(tree, id, &known, leaf.leading_colon, &names)
            else {
                continue;
            };
            if !whole {
                continue;
            }
            match &leaf.binding {
                Binding::Name(n) => {
                    named.insert(n.clone(), module);
                }
                Binding::Glob => {
                    for (n, &child) in &tree.modules[module].children {
                        globbed.entry(n.clone()).or_insert(child);
                    }
                }
                Binding::Nothing => {}
            }
        }
        if named.len() + globbed.len() == before {
            return merged(&named, &globbed);
        }
    }
}

/// Explicit imports shadow glob imports.
fn merged(
    named: &HashMap<String, ModId>,
    globbed: &HashMap<String, ModId>,
) -> HashMap<String, ModId> {
    let mut all = globbed.clone();
    all.extend(named.iter().map(|(k, v)| (k.clone(), *v)));
    all
}

/// The module a path names from module `from`, and whether the whole path is
/// that module (rather than an item in it). `None` for a path that leaves the
/// crate (`::x`, `std::x`) or starts with a name that is no module here
/// (`Self::`, a type, a local).
fn resolve(
    tree: &Tree,
    from: ModId,
    aliases: &HashMap<String, ModId>,
    leading_colon: bool,
    names: &[&str],
) -> Option<(ModId, bool)> {
    if leading_colon {
        return None;
    }
    let (first, mut rest) = names.split_first()?;
    let mut at = match *first {
        "crate" => 0,
        "self" => from,
        "super" => tree.modules[from].parent?,
        name => match tree.modules[from].children.get(name) {
            Some(&child) => child,
            None => *aliases.get(name)?,
        },
    };
    // `super::super::x`, `self::super::x`: each further `super` goes up once.
    if matches!(*first, "self" | "super") {
        while let Some((&"super", tail)) = rest.split_first() {
            at = tree.modules[at].parent?;
            rest = tail;
        }
    }
    for name in rest {
        match tree.modules[at].children.get(*name) {
            Some(&child) => at = child,
            None => return Some((at, false)),
        }
    }
    Some((at, true))
}

struct Namer<'a> {
    tree: &'a Tree,
    current: ModId,
    aliases: &'a HashMap<String, ModId>,
    out: &'a mut Vec<Naming>,
}

impl Namer<'_> {
    fn record(&mut self, leading_colon: bool, names: &[&str], span: Span) {
        if let Some((to, _)) = resolve(self.tree, self.current, self.aliases, leading_colon, names)
        {
            if to != self.current {
                self.out.push(Naming {
                    from: self.current,
                    to,
                    file: self.tree.modules[self.current].file.clone(),
                    line: span.start().line,
                });
            }
        }
    }

    /// Picks `a :: b :: c` sequences out of a macro's tokens.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            match &tokens[i] {
                TokenTree::Group(g) => {
                    self.scan_tokens(g.stream());
                    i += 1;
                }
                TokenTree::Ident(first) => {
                    let after_sep = i >= 2 && is_path_sep(&tokens[i - 2], &tokens[i - 1]);
                    let after_dot = i >= 1
                        && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == '.');
                    let mut names = vec![first.to_string()];
                    let mut j = i + 1;
                    while j + 2 < tokens.len() && is_path_sep(&tokens[j], &tokens[j + 1]) {
                        match &tokens[j + 2] {
                            TokenTree::Ident(next) => {
                                names.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    if !after_sep && !after_dot && names.len() >= 2 {
                        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                        self.record(false, &refs, first.span());
                    }
                    i = j.max(i + 1);
                }
                _ => i += 1,
            }
        }
    }
}

fn is_path_sep(a: &TokenTree, b: &TokenTree) -> bool {
    matches!((a, b), (TokenTree::Punct(x), TokenTree::Punct(y))
        if x.as_char() == ':' && y.as_char() == ':' && x.spacing() == proc_macro2::Spacing::Joint)
}

impl<'ast> Visit<'ast> for Namer<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut leaves = Vec::new();
        use_leaves(
            &u.tree,
            &mut Vec::new(),
            u.leading_colon.is_some(),
            &mut leaves,
        );
        for leaf in leaves {
            let names: Vec<&str> = leaf.segments.iter().map(|s| s.0.as_str()).collect();
            let span = leaf
                .segments
                .last()
                .map(|s| s.1)
                .unwrap_or_else(|| u.use_token.span);
            self.record(leaf.leading_colon, &names, span);
        }
        for attr in &u.attrs {
            self.visit_attribute(attr);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.segments.len() >= 2 {
            let names: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let span = p.segments[0].ident.span();
            self.record(p.leading_colon.is_some(), &refs, span);
        }
        visit::visit_path(self, p);
    }

    // A child module is a module of its own, visited on its own.
    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {}

    // `pub(crate)`, `pub(super)`, `pub(in crate::a)` grant access; they use
    // nothing from the module they name.
    fn visit_vis_restricted(&mut self, _: &'ast syn::VisRestricted) {}

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        visit::visit_macro(self, m);
        self.scan_tokens(m.tokens.clone());
    }

    fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
        // Doc comments are `#[doc = "..."]`: text, not code.
        if a.path().is_ident("doc") {
            return;
        }
        visit::visit_attribute(self, a);
        if let syn::Meta::List(list) = &a.meta {
            // serde's derive reads paths from strings
            // (`#[serde(default = "crate::x::f")]`).
            if list.path.is_ident("serde") {
                self.scan_string_paths(list.tokens.clone());
            }
            self.scan_tokens(list.tokens.clone());
        }
    }
}

impl Namer<'_> {
    fn scan_string_paths(&mut self, tokens: TokenStream) {
        for t in tokens {
            match t {
                TokenTree::Literal(lit) => {
                    if let Ok(s) = syn::parse_str::<syn::LitStr>(&lit.to_string()) {
                        if let Ok(path) = syn::parse_str::<syn::Path>(&s.value()) {
                            if path.segments.len() >= 2 {
                                let names: Vec<String> =
                                    path.segments.iter().map(|s| s.ident.to_string()).collect();
                                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                                self.record(path.leading_colon.is_some(), &refs, lit.span());
                            }
                        }
                    }
                }
                TokenTree::Group(g) => self.scan_string_paths(g.stream()),
                _ => {}
            }
        }
    }
}
