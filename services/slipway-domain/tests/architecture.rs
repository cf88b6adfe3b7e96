//! The domain stays pure and acyclic, as its `Cargo.toml` and module map promise: no crate it
//! depends on (directly or not, per `Cargo.lock`) does I/O of the kinds the I/O crate owns, and
//! no two of its modules import each other, directly or round a circle (test code aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_domain_depends_on_no_runtime_network_or_telemetry_crate() {
    let lock: toml::Table = std::fs::read_to_string(root().join("../../Cargo.lock"))
        .unwrap()
        .parse()
        .unwrap();
    // Each package's dependencies, by name ("name" or "name version" in the lock).
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in lock["package"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_string();
        let list: Vec<String> = p
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|d| {
                d.iter()
                    .map(|x| x.as_str().unwrap().split(' ').next().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        deps.entry(name).or_default().extend(list);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec!["slipway-domain".to_string()];
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            todo.extend(deps.get(&p).cloned().unwrap_or_default());
        }
    }
    assert!(seen.len() > 10, "the lock was read: {seen:?}");
    let forbidden: Vec<&String> = seen
        .iter()
        .filter(|c| {
            [
                "tokio",
                "async-nats",
                "reqwest",
                "hyper",
                "mio",
                "axum",
                "tonic",
            ]
            .contains(&c.as_str())
                || c.starts_with("opentelemetry")
                || c.starts_with("slipway-core")
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "slipway-domain depends on {forbidden:?}"
    );
}

#[test]
fn no_two_domain_modules_import_each_other_round_a_circle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("src")).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        // Test code may use the simulator, which uses everything.
        let code = text.split("#[cfg(test)]").next().unwrap();
        let mut uses = BTreeSet::new();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(i) = rest.find("crate::") {
                let after = &rest[i + 7..];
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
                rest = after;
            }
        }
        graph.insert(module, uses);
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("import cycle: {} -> {m}", path[i..].join(" -> "));
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
    assert!(graph["fold"].contains("plan") && !graph["plan"].contains("fold"));
}
