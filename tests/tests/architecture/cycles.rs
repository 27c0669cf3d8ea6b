//! Module cycles: the strongly connected components of the "names" graph
//! (Tarjan's algorithm), each with one place for every edge inside it, so that
//! the report says which line to change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::names::Naming;
use super::tree::{ModId, Tree};

/// A set of modules that all reach each other, and the namings between them.
pub struct Cycle {
    /// The modules, by name.
    pub modules: Vec<String>,
    /// `(from, to, "file:line")`: each edge inside the cycle, at its first
    /// naming.
    pub edges: Vec<(String, String, String)>,
}

/// The crate's cycles, ordered by their first module's name.
pub fn cycles(tree: &Tree, namings: &[Naming]) -> Vec<Cycle> {
    // One edge per pair of modules, kept at its first naming.
    let mut edges: BTreeMap<(ModId, ModId), &Naming> = BTreeMap::new();
    for n in namings {
        edges.entry((n.from, n.to)).or_insert(n);
    }
    let mut next: Vec<Vec<ModId>> = vec![Vec::new(); tree.modules.len()];
    for &(from, to) in edges.keys() {
        next[from].push(to);
    }
    let mut found = Vec::new();
    for component in strongly_connected(&next) {
        if component.len() < 2 {
            continue;
        }
        let mut modules: Vec<String> = component.iter().map(|&m| tree.name(m)).collect();
        modules.sort();
        let mut inside: Vec<(String, String, String)> = edges
            .iter()
            .filter(|((f, t), _)| component.contains(f) && component.contains(t))
            .map(|(&(f, t), n)| {
                (
                    tree.name(f),
                    tree.name(t),
                    format!("{}:{}", n.file.display(), n.line),
                )
            })
            .collect();
        inside.sort();
        found.push(Cycle {
            modules,
            edges: inside,
        });
    }
    found.sort_by(|a, b| a.modules.cmp(&b.modules));
    found
}

/// Tarjan's strongly connected components of a graph given as successor
/// lists; iterative, so that a deep module tree cannot overflow the stack.
pub fn strongly_connected(next: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = next.len();
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut counter = 0;
    let mut out = Vec::new();
    for start in 0..n {
        if index[start] != UNSEEN {
            continue;
        }
        // Each frame: a node and how many of its successors were looked at.
        let mut frames = vec![(start, 0)];
        index[start] = counter;
        low[start] = counter;
        counter += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(&mut (v, ref mut i)) = frames.last_mut() {
            if let Some(&w) = next[v].get(*i) {
                *i += 1;
                if index[w] == UNSEEN {
                    index[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    frames.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            frames.pop();
            if let Some(&(parent, _)) = frames.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                out.push(component);
            }
        }
    }
    out
}

/// The report for one crate: nothing if it has no cycle.
pub fn report(crate_label: &str, cycles: &[Cycle]) -> String {
    let mut s = String::new();
    if cycles.is_empty() {
        return s;
    }
    let _ = writeln!(s, "{crate_label}: {} module cycle(s)", cycles.len());
    for (i, c) in cycles.iter().enumerate() {
        let _ = writeln!(s, "  cycle {}: {}", i + 1, c.modules.join(", "));
        let width = c
            .edges
            .iter()
            .map(|(f, t, _)| f.len() + t.len() + 4)
            .max()
            .unwrap_or(0);
        for (from, to, at) in &c.edges {
            let arrow = format!("{from} -> {to}");
            let _ = writeln!(s, "    {arrow:width$}  {at}");
        }
    }
    s
}
