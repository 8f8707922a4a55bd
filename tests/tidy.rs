//! The house rules, checked (rust-analyzer's "tidy" test): each rule below is a fact
//! ARCHITECTURE.md states, and this test keeps it true.
//!
//! - No source file of the workspace's crates over [`MAX_FILE_LINES`] lines, no function over
//!   [`MAX_FN_LINES`] (from its `fn` line to its closing brace, tests included).
//! - No import circle between the modules of `src/`: neither between top-level modules
//!   (`admin`, `daemon`, `fence`, …) nor between files. An import is a `crate::…` or `super::…`
//!   path in code (not comments, not `#[cfg(test)]`), resolved to the longest module it names; a module's
//!   own `mod` declarations and re-exports of its children are the module tree, not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

/// The crates' source directories, from the workspace root.
const SOURCE_DIRS: [&str; 5] = ["src", "raft/src", "storage/src", "storage/model/src", "bench/src"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    for d in SOURCE_DIRS {
        rust_files(&root().join(d), &mut files);
    }
    assert!(files.len() > 50, "found only {} source files: is the layout still {SOURCE_DIRS:?}?", files.len());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.strip_prefix(root()).unwrap_or(&p).display().to_string(), text)
        })
        .collect()
}

/// The name of the function a line starts, if it starts one (`pub(crate) async fn x(`…).
fn fn_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    loop {
        let before = rest;
        for prefix in ["pub(crate) ", "pub(super) ", "pub ", "const ", "async ", "unsafe ", "extern \"C\" "] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
        }
        if rest == before {
            break;
        }
    }
    let name = rest.strip_prefix("fn ")?;
    let end = name.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(name.len());
    Some(&name[..end])
}

/// Every function of `text` with its first line (1-based) and length in lines. A declaration
/// without a body (a trait method) is no function here.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let indent = &line[..line.len() - line.trim_start().len()];
        let close = format!("{indent}}}");
        let mut end = None;
        for (j, l) in lines.iter().enumerate().skip(i) {
            if l.contains('{') && end.is_none() && j == i && l.trim_end().ends_with('}') {
                end = Some(j); // a one-line function
                break;
            }
            if *l == close {
                end = Some(j);
                break;
            }
            if l.trim_end().ends_with(';') && !lines[i..=j].iter().any(|l| l.contains('{')) {
                break; // a declaration
            }
        }
        if let Some(end) = end {
            out.push((name.to_string(), i + 1, end - i + 1));
        }
    }
    out
}

#[test]
fn no_file_and_no_function_is_too_long() {
    let mut too_long = Vec::new();
    for (path, text) in sources() {
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            too_long.push(format!("{path}: {n} lines (at most {MAX_FILE_LINES})"));
        }
        for (name, line, len) in functions(&text) {
            if len > MAX_FN_LINES {
                too_long.push(format!("{path}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES})"));
            }
        }
    }
    assert!(too_long.is_empty(), "split these:\n{}", too_long.join("\n"));
}

/// The module path of a file of `src/` ("" for lib.rs and main.rs).
fn module_of(path: &str) -> String {
    let rel = path.trim_start_matches("src/").trim_end_matches(".rs");
    let rel = rel.trim_end_matches("/mod");
    if rel == "lib" || rel == "main" {
        return String::new();
    }
    rel.replace('/', "::")
}

/// The code of a file: without its test code (from the first `#[cfg(test)]` on) and without
/// comments (a doc comment naming a module is no import).
fn code_of(text: &str) -> String {
    let text = text.find("#[cfg(test)]").map_or(text, |i| &text[..i]);
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

/// The module paths a file refers to through `crate::…` and `super::…`.
fn references(module: &str, text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        let mut path = String::new();
        let mut rest = s;
        loop {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            if !path.is_empty() {
                path.push_str("::");
            }
            path.push_str(&rest[..end]);
            match rest[end..].strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        path
    };
    let parent = |m: &str| m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_string());
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `herd_storage::crate::` does not occur; `$crate::` is a macro's
        }
        out.push(ident(&text[i + "crate::".len()..]));
    }
    // `super` is the parent module: of `x` (x.rs or x/mod.rs) the crate, of `x::y`, `x`.
    let base = parent(module);
    for (i, _) in text.match_indices("super::") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let tail = ident(&text[i + "super::".len()..]);
        out.push(if base.is_empty() { tail } else { format!("{base}::{tail}") });
    }
    out
}

/// The strongly connected components with more than one member (Tarjan).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'g> {
        g: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(t: &mut T<'g>, v: &'g str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t =
        T { g: graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// The import graph of `src/`: file modules → the file modules they refer to.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<(String, String)> = sources().into_iter().filter(|(p, _)| p.starts_with("src/")).collect();
    let modules: BTreeSet<String> = files.iter().map(|(p, _)| module_of(p)).collect();
    let resolve = |path: &str| -> Option<String> {
        let mut candidate = path.to_string();
        loop {
            if modules.contains(&candidate) {
                return Some(candidate);
            }
            candidate = candidate.rsplit_once("::")?.0.to_string();
        }
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &files {
        let module = module_of(path);
        if path.ends_with("/tests.rs") || path.ends_with("_test.rs") || module.is_empty() {
            continue;
        }
        let edges = graph.entry(module.clone()).or_default();
        for r in references(&module, &code_of(text)) {
            match resolve(&r) {
                // A module's reference to its own children is its tree, not an import.
                Some(m) if m != module && !m.starts_with(&format!("{module}::")) => {
                    edges.insert(m);
                }
                _ => {}
            }
        }
    }
    graph
}

#[test]
fn no_import_circle_between_modules_of_src() {
    let graph = import_graph();
    assert!(graph.len() > 20, "the import graph has only {} modules", graph.len());
    let files = circles(&graph);
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &graph {
        let head = |m: &str| m.split("::").next().unwrap_or(m).to_string();
        let edges = top.entry(head(from)).or_default();
        edges.extend(tos.iter().map(|t| head(t)).filter(|t| *t != head(from)));
    }
    let tops = circles(&top);
    assert!(
        files.is_empty() && tops.is_empty(),
        "import circles between files: {files:?}; between top-level modules: {tops:?}"
    );
}

/// The rules can fail: a circle and an over-long function are seen.
#[test]
fn the_checks_see_what_they_look_for() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into_iter()
    .collect();
    assert_eq!(circles(&g), vec![vec!["a".to_string(), "b".to_string()]]);
    let long = format!("pub async fn big() {{\n{}}}\nfn decl();\nfn one() {{}}\n", "    x();\n".repeat(120));
    let fns = functions(&long);
    assert_eq!(fns[0], ("big".to_string(), 1, 122));
    assert_eq!(fns[1], ("one".to_string(), 124, 1));
    assert_eq!(
        references("fence::selffence", "use crate::daemon::Daemon; use super::agent::X;"),
        ["daemon::Daemon".to_string(), "fence::agent::X".to_string()]
    );
}
