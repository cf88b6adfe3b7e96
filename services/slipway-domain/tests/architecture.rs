//! The domain stays pure, as its `Cargo.toml` promises: no crate it depends on (directly or
//! not, per `Cargo.lock`) does I/O of the kinds the I/O crate owns. (That its modules import no
//! circle is checked with the I/O crate's parts, in the workspace's `tests/architecture.rs`.)

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
