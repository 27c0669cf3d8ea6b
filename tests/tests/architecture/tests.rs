//! The checker on small crates held in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::check_crate;
use super::cycles::{report, strongly_connected, Cycle};
use super::tree::Tree;

fn files(files: &[(&str, &str)]) -> HashMap<PathBuf, String> {
    files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
        .collect()
}

fn check(crate_files: &[(&str, &str)]) -> Vec<Cycle> {
    check_crate(&files(crate_files), Path::new("src/lib.rs")).unwrap_or_else(|e| panic!("{e}"))
}

/// Each cycle's modules.
fn modules(cycles: &[Cycle]) -> Vec<Vec<&str>> {
    cycles
        .iter()
        .map(|c| c.modules.iter().map(String::as_str).collect())
        .collect()
}

/// Each cycle's edges as `from -> to @ file:line`.
fn edges(cycles: &[Cycle]) -> Vec<String> {
    cycles
        .iter()
        .flat_map(|c| {
            c.edges
                .iter()
                .map(|(f, t, at)| format!("{f} -> {t} @ {at}"))
        })
        .collect()
}

#[test]
fn two_modules_naming_each_other_are_a_cycle_with_both_lines() {
    let found = check(&[
        ("src/lib.rs", "mod a;\nmod b;\n"),
        ("src/a.rs", "use crate::b::B;\npub struct A(B);\n"),
        ("src/b.rs", "pub struct B;\n\npub fn f(_: crate::a::A) {}\n"),
    ]);
    assert_eq!(modules(&found), [["a", "b"]]);
    assert_eq!(
        edges(&found),
        ["a -> b @ src/a.rs:1", "b -> a @ src/b.rs:3"]
    );
}

#[test]
fn a_longer_cycle_through_a_facade_is_one_component() {
    let found = check(&[
        ("src/lib.rs", "pub mod audit;\npub mod store;\n"),
        ("src/store/mod.rs", "mod sqlite;\npub use sqlite::Db;\n"),
        (
            "src/store/sqlite.rs",
            "pub struct Db;\nimpl Db { fn f(&self) { crate::audit::log(); } }\n",
        ),
        ("src/audit.rs", "use crate::store::Db;\npub fn log() {}\n"),
    ]);
    assert_eq!(modules(&found), [["audit", "store", "store::sqlite"]]);
    assert_eq!(
        edges(&found),
        [
            "audit -> store @ src/audit.rs:1",
            "store -> store::sqlite @ src/store/mod.rs:2",
            "store::sqlite -> audit @ src/store/sqlite.rs:2",
        ]
    );
}

#[test]
fn a_one_way_tree_passes() {
    // Siblings by their own paths, visibilities, `self::`, `Self::`, outside
    // crates and a parent that only declares its children: all one way.
    let found = check(&[
        (
            "src/lib.rs",
            "pub mod model;\npub mod store;\npub use store::Store;\n\
             pub(crate) fn f() -> std::io::Result<()> { Ok(()) }\n",
        ),
        ("src/model.rs", "pub struct Row;\nimpl Row { pub fn new() -> Self { Self::make() } fn make() -> Self { Row } }\n"),
        ("src/store/mod.rs", "mod error;\nmod sqlite;\npub struct Store;\n"),
        (
            "src/store/error.rs",
            "pub(super) enum StoreError { Io(std::io::Error) }\n\
             pub(in crate::store) fn g() { self::h() }\nfn h() {}\n",
        ),
        (
            "src/store/sqlite.rs",
            "use super::error::StoreError;\nuse crate::model::{self, Row};\n\
             pub(crate) fn open() -> Result<Row, StoreError> { let _ = model::Row::new(); todo!() }\n",
        ),
    ]);
    assert_eq!(modules(&found), Vec::<Vec<&str>>::new());
}

#[test]
fn a_facade_re_exporting_a_child_that_uses_super_is_a_cycle() {
    // The parent names the child (`pub use`); the child names the parent
    // (`super::Config` is defined there): the pattern the rule forbids.
    let found = check(&[
        ("src/lib.rs", "pub mod sinks;\n"),
        (
            "src/sinks/mod.rs",
            "mod http;\npub use http::HttpSink;\npub struct Config;\n",
        ),
        (
            "src/sinks/http.rs",
            "use super::Config;\npub struct HttpSink(Config);\n",
        ),
    ]);
    assert_eq!(modules(&found), [["sinks", "sinks::http"]]);
}

#[test]
fn a_child_using_a_sibling_by_its_own_path_does_not_name_the_parent() {
    let found = check(&[
        ("src/lib.rs", "pub mod sinks;\n"),
        (
            "src/sinks/mod.rs",
            "mod config;\nmod http;\npub use config::Config;\npub use http::HttpSink;\n",
        ),
        ("src/sinks/config.rs", "pub struct Config;\n"),
        (
            "src/sinks/http.rs",
            "use super::config::Config;\npub struct HttpSink(Config);\n",
        ),
    ]);
    assert_eq!(modules(&found), Vec::<Vec<&str>>::new());
}

#[test]
fn paths_inside_macro_invocations_are_counted() {
    let found = check(&[
        ("src/lib.rs", "mod a;\nmod b;\n"),
        (
            "src/a.rs",
            "pub fn f() -> String {\n    format!(\"{}\", crate::b::NAME)\n}\n",
        ),
        (
            "src/b.rs",
            "pub const NAME: &str = \"b\";\n\
             async fn g() {\n    tokio::select! {\n        _ = async {} => { let _ = crate :: a :: f(); }\n    }\n}\n",
        ),
    ]);
    assert_eq!(modules(&found), [["a", "b"]]);
    assert_eq!(
        edges(&found),
        ["a -> b @ src/a.rs:2", "b -> a @ src/b.rs:4"]
    );
}

#[test]
fn dollar_crate_in_a_macro_definition_is_counted() {
    let found = check(&[
        ("src/lib.rs", "mod a;\nmod b;\n"),
        (
            "src/a.rs",
            "macro_rules! m { () => { $crate::b::g() } }\npub fn f() {}\n",
        ),
        ("src/b.rs", "pub fn g() { super::a::f() }\n"),
    ]);
    assert_eq!(modules(&found), [["a", "b"]]);
}

#[test]
fn comments_doc_comments_and_strings_are_not_counted() {
    let found = check(&[
        ("src/lib.rs", "mod a;\nmod b;\n"),
        ("src/a.rs", "use crate::b::B;\npub struct A;\n"),
        (
            "src/b.rs",
            "//! Module doc naming crate::a::A.\n\
             // A comment: crate::a::A, super::a::A.\n\
             /* A block comment: crate::a::A */\n\
             /// See [`crate::a::A`].\n\
             pub struct B;\n\
             pub const S: &str = \"crate::a::A\";\n\
             pub fn f() { println!(\"crate::a::A {}\", S); }\n",
        ),
    ]);
    assert_eq!(modules(&found), Vec::<Vec<&str>>::new());
}

#[test]
fn relative_paths_renames_and_globs_are_followed() {
    // The root names `a` through a relative path; `a` names `b::inner`
    // through a renamed import; `b::inner` names the root through a glob of
    // `crate` and then a child module the glob brought in.
    let found = check(&[
        (
            "src/lib.rs",
            "mod a;\nmod b;\npub fn run() { a::start() }\n",
        ),
        (
            "src/a.rs",
            "use crate::b as other;\npub fn start() { other::inner::go() }\n",
        ),
        ("src/b.rs", "pub mod inner;\n"),
        (
            "src/b/inner.rs",
            "use crate::*;\npub fn go() { let _ = run; a::start() }\n",
        ),
    ]);
    assert_eq!(modules(&found), [["a", "b::inner", "crate"]]);
    assert_eq!(
        edges(&found),
        [
            "a -> b::inner @ src/a.rs:2",
            "b::inner -> a @ src/b/inner.rs:2",
            "b::inner -> crate @ src/b/inner.rs:1",
            "crate -> a @ src/lib.rs:3",
        ]
    );
}

#[test]
fn a_path_names_its_longest_module_prefix() {
    let found = check(&[
        ("src/lib.rs", "mod store;\nmod audit;\n"),
        ("src/store/mod.rs", "pub mod error;\n"),
        (
            "src/store/error.rs",
            "pub struct StoreError;\npub fn f() { crate::audit::g() }\n",
        ),
        (
            "src/audit.rs",
            "pub fn g() {}\npub fn h(_: crate::store::error::StoreError) {}\n",
        ),
    ]);
    // `audit` names `store::error`, not `store`: the cycle has no `store`.
    assert_eq!(modules(&found), [["audit", "store::error"]]);
}

#[test]
fn a_module_naming_itself_or_a_child_declaration_is_no_edge() {
    let found = check(&[
        ("src/lib.rs", "mod a;\n"),
        ("src/a.rs", "mod b;\nfn f() { self::f(); crate::a::f() }\n"),
        ("src/a/b.rs", "fn g() { super::super::a::b::g() }\n"),
    ]);
    assert_eq!(modules(&found), Vec::<Vec<&str>>::new());
}

#[test]
fn the_tree_follows_every_module_layout() {
    let tree = Tree::load(
        &files(&[
            (
                "src/lib.rs",
                "mod flat;\nmod nested;\nmod inline { mod deep; }\n\
                 #[path = \"elsewhere/odd_name.rs\"] mod moved;\n\
                 #[cfg(windows)] mod absent;\n",
            ),
            ("src/flat.rs", "mod kid;\n"),
            ("src/flat/kid.rs", ""),
            ("src/nested/mod.rs", "mod kid;\n"),
            ("src/nested/kid.rs", ""),
            ("src/inline/deep.rs", ""),
            ("src/elsewhere/odd_name.rs", "mod beside;\n"),
            ("src/elsewhere/beside.rs", ""),
        ]),
        Path::new("src/lib.rs"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut names: Vec<(String, String)> = (0..tree.modules.len())
        .map(|m| (tree.name(m), tree.modules[m].file.display().to_string()))
        .collect();
    names.sort();
    let expected = [
        ("crate", "src/lib.rs"),
        ("flat", "src/flat.rs"),
        ("flat::kid", "src/flat/kid.rs"),
        ("inline", "src/lib.rs"),
        ("inline::deep", "src/inline/deep.rs"),
        ("moved", "src/elsewhere/odd_name.rs"),
        ("moved::beside", "src/elsewhere/beside.rs"),
        ("nested", "src/nested/mod.rs"),
        ("nested::kid", "src/nested/kid.rs"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn inline_modules_are_modules_of_their_own() {
    // `mod tests { use super::*; }` names its parent; the parent does not
    // name it back, so there is no cycle; but an inline module that is named
    // back is one.
    let found = check(&[
        (
            "src/lib.rs",
            "pub fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n    fn t() { f() }\n}\n\
             mod facade {\n    pub use inner::X;\n    pub struct Y;\n    mod inner {\n        pub struct X(super::Y);\n    }\n}\n",
        ),
    ]);
    assert_eq!(modules(&found), [["facade", "facade::inner"]]);
    assert_eq!(
        edges(&found),
        [
            "facade -> facade::inner @ src/lib.rs:8",
            "facade::inner -> facade @ src/lib.rs:11",
        ]
    );
}

#[test]
fn a_missing_module_file_is_an_error() {
    let err = check_crate(
        &files(&[("src/lib.rs", "mod gone;\n")]),
        Path::new("src/lib.rs"),
    )
    .err()
    .unwrap_or_default();
    assert!(err.contains("gone"), "{err}");
}

#[test]
fn tarjan_finds_each_component() {
    // 0 -> 1 -> 2 -> 0, 2 -> 3, 3 -> 4 -> 3, 5 alone.
    let next = vec![vec![1], vec![2], vec![0, 3], vec![4], vec![3], vec![]];
    let mut found: Vec<Vec<usize>> = strongly_connected(&next)
        .into_iter()
        .map(|mut c| {
            c.sort();
            c
        })
        .collect();
    found.sort();
    assert_eq!(found, [vec![0, 1, 2], vec![3, 4], vec![5]]);
}

#[test]
fn the_report_gives_each_edge_a_place() {
    let found = check(&[
        ("src/lib.rs", "mod a;\nmod b;\n"),
        ("src/a.rs", "use crate::b::B;\npub struct A;\n"),
        ("src/b.rs", "pub struct B(crate::a::A);\n"),
    ]);
    let text = report("demo lib (src/lib.rs)", &found);
    assert_eq!(
        text,
        "demo lib (src/lib.rs): 1 module cycle(s)\n  cycle 1: a, b\n    a -> b  src/a.rs:1\n    b -> a  src/b.rs:1\n"
    );
}
