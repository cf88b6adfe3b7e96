//! The tree shows the architecture, and these checks keep it so: the domain's modules, and the
//! I/O crate's parts (a folder each), never import each other round a circle, and the bus
//! imports no other part (caches and telemetry are composed around it). Test code aside: tests
//! may use the simulator, which uses everything. (That the domain depends on no runtime,
//! network or telemetry crate is checked in `services/slipway-domain/tests/architecture.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn services() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../services")
}

/// The names `text` refers to as `crate::<name>`, other than `own`, outside `#[cfg(test)]`.
fn uses(text: &str, own: &str, into: &mut BTreeSet<String>) {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let name: String = line[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != own {
                into.insert(name);
            }
        }
    }
}

/// The first import cycle found, as `a -> b -> a`.
fn cycle(graph: &Graph) -> Option<String> {
    fn visit(
        m: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if done.contains(m) {
            return None;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            return Some(format!("{} -> {m}", path[i..].join(" -> ")));
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_domain_modules_import_each_other_round_a_circle() {
    let mut graph = Graph::new();
    for entry in std::fs::read_dir(services().join("slipway-domain/src")).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        uses(&text, &module, graph.entry(module.clone()).or_default());
    }
    assert_eq!(cycle(&graph), None);
    assert!(graph["fold"].contains("plan") && !graph["plan"].contains("fold"));
}

#[test]
fn the_bus_stands_alone_and_no_io_parts_import_each_other_round_a_circle() {
    let mut graph = Graph::new();
    for entry in std::fs::read_dir(services().join("slipway-core/src")).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let part = dir.file_name().unwrap().to_string_lossy().to_string();
        let into = graph.entry(part.clone()).or_default();
        for file in std::fs::read_dir(&dir).unwrap() {
            uses(
                &std::fs::read_to_string(file.unwrap().path()).unwrap(),
                &part,
                into,
            );
        }
    }
    for part in [
        "bus",
        "store",
        "runtime",
        "exec",
        "telemetry",
        "config",
        "testing",
    ] {
        assert!(graph.contains_key(part), "{part} is a folder: {graph:?}");
    }
    assert!(
        graph["bus"].is_empty(),
        "the bus imports {:?}: caches and telemetry are composed around it",
        graph["bus"]
    );
    assert_eq!(cycle(&graph), None);
}

#[test]
fn a_circle_of_imports_is_found() {
    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    assert_eq!(cycle(&graph).as_deref(), Some("a -> b -> c -> a"));
    let mut set = BTreeSet::new();
    uses(
        "use crate::bus::Bus;\n// crate::x\n#[cfg(test)]\nuse crate::sim;",
        "own",
        &mut set,
    );
    assert_eq!(set.into_iter().collect::<Vec<_>>(), ["bus"]);
}
