//! The source layout keeps its promises: no import cycle between top-level modules, and the
//! request-path modules never reach the listeners (`server`), the reloader (`reload`) or the
//! file watcher (`notify`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules each top-level module names through `crate::`, tests left out, and
/// whether it uses `notify`.
fn imports() -> BTreeMap<String, (BTreeSet<String>, bool)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let entry = graph.entry(top.clone()).or_default();
        entry.1 |= code.contains("notify::");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            // `crate::name` or `crate::{a, b::c}`.
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![rest
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")],
            };
            for name in names {
                if !name.is_empty() && name != top {
                    entry.0.insert(name.to_string());
                }
            }
        }
    }
    graph
}

#[test]
fn no_top_level_module_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(
        graph.len() > 15,
        "too few modules found: {:?}",
        graph.keys()
    );
    // Depth-first search for a back edge, reporting the cycle found.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, (BTreeSet<String>, bool)>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|n| *n == node) {
            panic!("import cycle: {} -> {node}", path[at..].join(" -> "));
        }
        if done.contains(node) {
            return;
        }
        path.push(node);
        for next in graph
            .get(node)
            .map(|(deps, _)| deps.iter())
            .into_iter()
            .flatten()
        {
            if graph.contains_key(next) {
                visit(next, graph, path, done);
            }
        }
        path.pop();
        done.insert(node);
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn request_path_modules_never_reach_the_listeners_the_reloader_or_the_watcher() {
    let graph = imports();
    let request_path = [
        "access_log",
        "auth",
        "authz",
        "ban",
        "conn",
        "error",
        "headers",
        "metrics",
        "netpolicy",
        "path",
        "proxy",
        "ratelimit",
        "redis",
        "streams",
        "tls",
    ];
    // Everything each reaches, directly or not.
    for module in request_path {
        let mut reached = BTreeSet::new();
        let mut todo = vec![module.to_string()];
        while let Some(m) = todo.pop() {
            let Some((deps, uses_notify)) = graph.get(&m) else {
                continue;
            };
            assert!(!uses_notify, "{module} reaches notify through {m}");
            for d in deps {
                if reached.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        for forbidden in ["server", "reload"] {
            assert!(
                !reached.contains(forbidden),
                "{module} reaches {forbidden}: {reached:?}"
            );
        }
    }
}
