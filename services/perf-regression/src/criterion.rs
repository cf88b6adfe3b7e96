//! Criterion's machine-readable output (`cargo criterion --message-format=json`): one JSON
//! message per line; `benchmark-complete` messages carry the typical time per iteration.

use std::collections::BTreeMap;

/// Benchmark id to typical time in nanoseconds.
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "benchmark-complete" {
            continue;
        }
        let (Some(id), Some(est)) = (v["id"].as_str(), v["typical"]["estimate"].as_f64()) else {
            continue;
        };
        let factor = match v["typical"]["unit"].as_str().unwrap_or("ns") {
            "ps" => 1e-3,
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            _ => continue,
        };
        out.insert(id.to_string(), est * factor);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_benchmark_complete_messages() {
        let text = concat!(
            "{\"reason\":\"group-complete\",\"group_name\":\"g\"}\n",
            "{\"reason\":\"benchmark-complete\",\"id\":\"parse/small\",\"typical\":{\"estimate\":1.5,\"unit\":\"us\"}}\n",
            "noise\n",
            "{\"reason\":\"benchmark-complete\",\"id\":\"fold\",\"typical\":{\"estimate\":420.0,\"unit\":\"ns\"}}\n",
        );
        let m = super::parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m["parse/small"], 1500.0);
        assert_eq!(m["fold"], 420.0);
    }
}
