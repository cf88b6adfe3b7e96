//! The I/O crate is layered as its folders say: the bus knows nothing of what is composed
//! around it (stores, telemetry, the runtime), and no two parts import each other, directly or
//! round a circle (test code aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each part (a folder of `src/`) and the other parts its code names as `crate::<part>`.
fn parts() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let part = dir.file_name().unwrap().to_string_lossy().to_string();
        let uses = graph.entry(part.clone()).or_default();
        for file in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != part {
                        uses.insert(name);
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn the_bus_stands_alone_and_no_parts_import_each_other_round_a_circle() {
    let graph = parts();
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
}
