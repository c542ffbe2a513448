//! The import graph between the crate's top-level modules (`api`, `core`,
//! `store`, `host`, `cli`, ...), read from the sources: every `crate::X`
//! path in a file under `appliance/X...` is an edge. The graph must have no
//! cycle, and nothing below the composition root may reach up into the
//! HTTP server, the CLI or the daemon. `cargo test --test layering --
//! --nocapture` prints the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module names that follow `prefix` (`crate::`) in `line`.
fn targets<'a>(line: &'a str, prefix: &str) -> Vec<&'a str> {
    line.match_indices(prefix)
        .filter(|(at, _)| !line[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(at, _)| {
            let rest = &line[at + prefix.len()..];
            &rest[..rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut g = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&root).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
        let from = first.trim_end_matches(".rs").to_string();
        // main.rs is a separate crate that names the library `novacron`.
        let prefix = if from == "main" { "novacron::" } else { "crate::" };
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for to in targets(code, prefix) {
                // Constants of the crate root (VERSION...) are no module.
                if to != from && to.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    g.entry(from.clone()).or_default().insert(to.to_string());
                }
            }
        }
        g.entry(from).or_default();
    }
    g
}

/// One cycle of `g`, if it has any (depth-first search).
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(g: &Graph, n: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, m, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn scanner_sees_edges_and_cycles() {
    assert_eq!(targets("use crate::store::{a, b}; x(crate::util::f)", "crate::"), ["store", "util"]);
    assert!(targets("use mycrate::x;", "crate::").is_empty());
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn top_level_modules_form_no_cycle_and_never_import_upwards() {
    let g = graph();
    for (from, to) in &g {
        println!("{from} -> {}", to.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    for m in ["api", "core", "store", "hypervisor", "host", "cli", "daemon", "util", "tls"] {
        assert!(g.contains_key(m), "module {m} not found: {g:?}");
    }
    assert_eq!(find_cycle(&g), None, "import cycle between top-level modules");
    // The composition root (main, daemon) and the CLI sit on top; nothing
    // else may use them, and only they may use the HTTP server.
    for (from, to) in &g {
        for up in ["cli", "daemon", "api", "main"] {
            let allowed = match up {
                "api" => ["main", "daemon"].contains(&from.as_str()),
                "cli" => from == "main",
                "daemon" => ["main", "cli"].contains(&from.as_str()),
                _ => false,
            };
            assert!(allowed || !to.contains(up), "{from} imports {up}, which sits above it");
        }
    }
}

/// Certificate pinning lives in `appliance/tls.rs` only: the API server,
/// the CLI, the Redfish client and the peer link use it, and nothing else
/// builds a certificate verifier of its own (issue 9, item 7).
#[test]
fn certificate_pinning_lives_in_tls_rs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("appliance");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let own = [
        "ServerCertVerifier for",
        "ClientCertVerifier for",
        ".dangerous()",
        "with_custom_certificate_verifier",
    ];
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.ends_with("appliance/tls.rs")) {
        for (n, line) in std::fs::read_to_string(file).unwrap().lines().enumerate() {
            if own.iter().any(|w| line.contains(w)) {
                found.push(format!(
                    "{}:{}: {}",
                    file.strip_prefix(&root).unwrap().display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(found.is_empty(), "certificate verification outside tls.rs:\n{}", found.join("\n"));
    let uses = |f: &str| std::fs::read_to_string(root.join(f)).unwrap().contains("crate::tls::");
    for f in ["cli/client.rs", "ops/redfish.rs", "api/tls.rs"] {
        assert!(uses(f), "{f} does not use crate::tls");
    }
}
