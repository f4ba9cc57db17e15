//! The code structure stays true: this test reads the sources and fails on
//! any import that runs up a layer, on a library that a layer may not know,
//! on a task spawned below the engines, and on an import cycle among the
//! top-level modules of any crate of the workspace.
//!
//! The layers of `tally-proxy`, lowest first (ARCHITECTURE.md, "Code
//! invariants"): the leaves `error`, `config`, `telemetry`, `failpoint`,
//! `notify` (which know no other module and not each other), then
//! `domain`, `storage`, `app`, `engine`, `control`, `http`, `server`. A
//! module may use a module of a lower layer or its own; `lib.rs` and
//! `bin/` wire and are not checked.
//!
//! Only non-test code counts: `#[cfg(test)]` items are cut out before the
//! paths are read. Paths are found textually (`crate::a::…`,
//! `use crate::{a, b}`, `super::` chains that leave a top-level module), so
//! an inline path deep in a body counts as much as a `use` line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The proxy's layers, lowest first; modules of one entry are one layer.
const PROXY_LAYERS: &[&[&str]] = &[
    &["error", "config", "telemetry", "failpoint", "notify"],
    &["domain"],
    &["storage"],
    &["app"],
    &["engine"],
    &["control"],
    &["http"],
    &["server"],
];

/// External crates only some layers may name, and which.
const CONFINED: &[(&str, &[&str])] = &[
    // The HTTP framework: handlers, routers, connection handling.
    ("axum::", &["http"]),
    ("hyper::", &["http"]),
    ("hyper_util::", &["http"]),
    ("http_body_util::", &["http"]),
    // MySQL: storage, and the engines and control steps that run SQL over
    // storage's connections.
    ("mysql_async::", &["storage", "engine", "control"]),
];

/// Modules that may start tokio tasks (`tokio::spawn`, `spawn_blocking`):
/// nothing at or below `app` does, so state never outlives its owner.
const MAY_SPAWN: &[&str] = &["engine", "control", "http", "server"];

/// One source file: its path below `src/`, its module path and its text
/// with comments and `#[cfg(test)]` items removed.
struct Source {
    rel: String,
    module: Vec<String>,
    code: String,
}

/// A rule broken, readable in a test failure.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violation(String);

fn read_sources(src: &Path) -> Vec<Source> {
    let mut files = Vec::new();
    collect(src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path
                .strip_prefix(src)
                .ok()?
                .to_string_lossy()
                .replace('\\', "/");
            if rel == "lib.rs" || rel == "main.rs" || rel.starts_with("bin/") {
                return None;
            }
            let text = std::fs::read_to_string(&path).ok()?;
            Some(Source {
                module: module_path(&rel),
                code: strip_test_items(&strip_comments(&text)),
                rel,
            })
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `storage/wal/mod.rs` → `[storage, wal]`; `app.rs` → `[app]`.
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// Drops `//` comments (doc comments included), `/* */` blocks and the
/// contents of string literals (raw ones too): a path named in a message
/// is no import, and a `//` or a quote inside a string (a URL, a JSON
/// text) must not cut code.
fn strip_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(end) = raw_string_end(b, i) {
            out.extend_from_slice(b"\"\"");
            i = end;
            continue;
        }
        match b[i] {
            b'\'' if b.get(i + 1) == Some(&b'"') && b.get(i + 2) == Some(&b'\'') => {
                out.extend_from_slice(&b[i..i + 3]);
                i += 3;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                out.extend_from_slice(b"\"\"");
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the raw string literal (`r"…"`, `r#"…"#`, `br#"…"#`) starting at
/// `i` ends, if one starts there.
fn raw_string_end(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && is_ident(b[i - 1] as char) {
        return None;
    }
    let mut j = match (b.get(i), b.get(i + 1)) {
        (Some(b'r'), _) => i + 1,
        (Some(b'b'), Some(b'r')) => i + 2,
        _ => return None,
    };
    let hashes = b[j..].iter().take_while(|c| **c == b'#').count();
    j += hashes;
    if b.get(j) != Some(&b'"') {
        return None;
    }
    let mut k = j + 1;
    while k < b.len() {
        if b[k] == b'"'
            && b[k + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == b'#')
                .count()
                == hashes
        {
            return Some(k + 1 + hashes);
        }
        k += 1;
    }
    Some(b.len())
}

/// Removes every item marked `#[cfg(test)]`: up to its `;` when that comes
/// before any `{`, else through the matching `}`.
fn strip_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let brace = item.find('{');
        let semi = item.find(';');
        let end = match (brace, semi) {
            (_, Some(s)) if brace.is_none_or(|b| s < b) => s + 1,
            (Some(b), _) => matching_brace(item, b).map_or(item.len(), |e| e + 1),
            _ => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules `code` (of the module at `module`) names.
fn referenced_modules(module: &[String], code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut search = 0;
    while let Some(found) = code[search..].find("crate::") {
        let at = search + found;
        search = at + "crate::".len();
        // `tally_admin::…crate::` is not ours; `$crate::` only in macros.
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == '$' || c == ':')
        {
            continue;
        }
        let rest = &code[search..];
        if let Some(group) = rest.strip_prefix('{') {
            out.extend(group_heads(group));
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    // `super::` chains that climb out of the top-level module name a
    // sibling top-level module.
    let mut search = 0;
    while let Some(found) = code[search..].find("super::") {
        let at = search + found;
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == ':')
        {
            search = at + 1;
            continue;
        }
        let mut ups = 0;
        let mut rest = &code[at..];
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        search = code.len() - rest.len();
        if ups >= module.len() {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The first path segment of each item of a `use crate::{…}` group.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut at_item_start = true;
    let mut current = String::new();
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                at_item_start = true;
                current.clear();
                continue;
            }
            _ => {}
        }
        if at_item_start && depth == 0 {
            if is_ident(c) {
                current.push(c);
            } else if !current.is_empty() {
                heads.push(std::mem::take(&mut current));
                at_item_start = false;
            }
        }
    }
    if at_item_start && !current.is_empty() {
        heads.push(current);
    }
    heads
}

fn layer_of(layers: &[&[&str]], module: &str) -> Option<usize> {
    layers.iter().position(|l| l.contains(&module))
}

/// Every layer rule `sources` break.
fn layer_violations(layers: &[&[&str]], sources: &[Source]) -> Vec<Violation> {
    let mut out = Vec::new();
    for s in sources {
        let top = s.module[0].as_str();
        let Some(own) = layer_of(layers, top) else {
            out.push(Violation(format!(
                "{}: top-level module `{top}` has no layer (add it to PROXY_LAYERS and ARCHITECTURE.md)",
                s.rel
            )));
            continue;
        };
        for used in referenced_modules(&s.module, &s.code) {
            if used == top {
                continue;
            }
            match layer_of(layers, &used) {
                Some(l) if l < own => {}
                Some(_) => out.push(Violation(format!(
                    "{}: `{top}` uses `{used}`, which is not in a lower layer",
                    s.rel
                ))),
                None => out.push(Violation(format!(
                    "{}: uses `crate::{used}`, which is no layer",
                    s.rel
                ))),
            }
        }
        for (prefix, allowed) in CONFINED {
            if !allowed.contains(&top) && names_path(&s.code, prefix) {
                out.push(Violation(format!(
                    "{}: `{top}` names `{prefix}`, which only {allowed:?} may",
                    s.rel
                )));
            }
        }
        if !MAY_SPAWN.contains(&top)
            && ["tokio::spawn", "spawn_blocking", "task::spawn"]
                .iter()
                .any(|p| s.code.contains(p))
        {
            out.push(Violation(format!(
                "{}: `{top}` spawns a tokio task; only {MAY_SPAWN:?} may",
                s.rel
            )));
        }
    }
    out.sort();
    out
}

/// Whether `code` names the path `prefix` as a path of its own (not as
/// the tail of another path such as `x::axum::`).
fn names_path(code: &str, prefix: &str) -> bool {
    code.match_indices(prefix).any(|(at, _)| {
        !code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == ':')
    })
}

/// The top-level module graph of one crate (edges between different
/// modules only).
fn module_graph(sources: &[Source]) -> BTreeMap<String, BTreeSet<String>> {
    let tops: BTreeSet<String> = sources.iter().map(|s| s.module[0].clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sources {
        let top = &s.module[0];
        let edges = graph.entry(top.clone()).or_default();
        for used in referenced_modules(&s.module, &s.code) {
            if &used != top && tops.contains(&used) {
                edges.insert(used);
            }
        }
    }
    graph
}

/// The top-level modules that lie on an import cycle.
fn modules_on_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    graph.keys().filter(|m| reaches(m, m)).cloned().collect()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate sits in the workspace")
        .to_path_buf()
}

fn proxy_sources() -> Vec<Source> {
    let sources = read_sources(&workspace_root().join("proxy/src"));
    assert!(
        sources.len() > 30,
        "the proxy's sources were not found ({} files)",
        sources.len()
    );
    sources
}

#[test]
fn proxy_modules_only_use_lower_layers() {
    let violations = layer_violations(PROXY_LAYERS, &proxy_sources());
    assert!(
        violations.is_empty(),
        "layer rules broken:\n{violations:#?}"
    );
}

#[test]
fn no_crate_has_an_import_cycle_among_its_top_level_modules() {
    let root = workspace_root();
    let crates = [
        "proxy/src",
        "admin/src",
        "schema/src",
        "integration/src",
        "integration/harness/src",
    ];
    for dir in crates {
        let sources = read_sources(&root.join(dir));
        assert!(
            !sources.is_empty() || dir == "schema/src",
            "{dir}: no sources found"
        );
        let cyclic = modules_on_cycles(&module_graph(&sources));
        assert!(
            cyclic.is_empty(),
            "{dir}: modules on an import cycle: {cyclic:?}"
        );
    }
}

/// The checker itself: an upward import, a confined crate outside its
/// layers, a spawn in storage and a cycle are each reported, while test
/// code and comments are not read.
#[test]
fn the_checker_reports_what_it_must_and_ignores_tests_and_comments() {
    let src = |rel: &str, code: &str| Source {
        rel: rel.into(),
        module: module_path(rel),
        code: strip_test_items(&strip_comments(code)),
    };
    let upward = src(
        "storage/db.rs",
        "use crate::storage::buffer::Batch;\nfn f() { crate::http::api::router(); }\n",
    );
    let grouped = src(
        "domain/event.rs",
        "use crate::{error::ApiError, app::App};\n",
    );
    let escaping = src("engine/reads.rs", "use super::super::control::topology;\n");
    let confined = src(
        "app.rs",
        "fn f(c: mysql_async::Conn) { tokio::spawn(async {}); }\n",
    );
    let clean = src(
        "storage/buffer.rs",
        "// crate::http is only named in a comment\n\
         use crate::domain::tier::Tier;\n\
         const URL: &str = \"mysql://root@h//crate::http\";\n\
         const RAW: &str = r#\"{\"a\":\"//\"}\"#; const Q: char = '\"';\n\
         #[cfg(test)]\nmod tests { use crate::app::App; fn f() { tokio::spawn(async {}); } }\n",
    );
    let unknown = src("mystery.rs", "fn f() {}\n");
    let found = layer_violations(
        PROXY_LAYERS,
        &[upward, grouped, escaping, confined, clean, unknown],
    );
    let text = format!("{found:?}");
    assert!(
        text.contains("storage/db.rs: `storage` uses `http`"),
        "{text}"
    );
    assert!(
        text.contains("domain/event.rs: `domain` uses `app`"),
        "{text}"
    );
    assert!(
        !text.contains("domain/event.rs: `domain` uses `error`"),
        "{text}"
    );
    assert!(
        text.contains("engine/reads.rs: `engine` uses `control`"),
        "{text}"
    );
    assert!(
        text.contains("app.rs: `app` names `mysql_async::`"),
        "{text}"
    );
    assert!(text.contains("app.rs: `app` spawns a tokio task"), "{text}");
    assert!(
        text.contains("mystery.rs: top-level module `mystery` has no layer"),
        "{text}"
    );
    assert!(!text.contains("storage/buffer.rs"), "{text}");
    assert_eq!(found.len(), 6, "{text}");

    let a = src("a.rs", "use crate::b::X;\n");
    let b = src("b/mod.rs", "fn f() { crate::c::g(); }\n");
    let c = src("c.rs", "use crate::{a::Y, d};\n");
    let d = src("d.rs", "use crate::c;\n");
    let cyclic = modules_on_cycles(&module_graph(&[a, b, c, d]));
    let names: Vec<&str> = cyclic.iter().map(String::as_str).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    let e = src("e.rs", "use crate::f;\n");
    let f = src("f.rs", "fn f() {}\n");
    assert!(modules_on_cycles(&module_graph(&[e, f])).is_empty());
}
