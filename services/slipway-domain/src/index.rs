//! The run index: each ended run's final state, derived from the log and kept beside it (the
//! JetStream KV bucket `slipway-runs`, key = run id), so that reading an old run needs neither
//! its events nor a process that holds every run.
//!
//! It is never a second truth. Each entry names the fold that made it ([`FOLD_VERSION`]) and the
//! stream sequence of the last event folded in; an entry of another fold version is not read
//! (the run is folded from the log again), and `slipway replay --verify` folds every run from
//! the log alone and reports each entry that is missing or differs from it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::run::Run;

/// The version of the fold whose results the index holds. Raise it when a release changes what
/// a log folds to (a new field in a run's state is such a change): entries of the old version
/// are then ignored, and rewritten from the log. (2: entries carry the run's production
/// deployment.)
pub const FOLD_VERSION: u32 = 2;

/// One run in the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The fold that made the entry.
    pub fold: u32,
    /// The stream sequence of the run's last event folded in.
    pub through: u64,
    /// The run's state, as `slipway status --json` shows it.
    pub run: Value,
    /// Its production deployment, for DORA (which then reads these, not whole runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<crate::dora::Deployed>,
}

impl IndexEntry {
    /// The entry of an ended run folded through stream sequence `through`.
    pub fn of(run: &Run, through: u64) -> Self {
        Self {
            fold: FOLD_VERSION,
            through,
            run: run.to_json(),
            deployed: crate::dora::deployed(run),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an index entry serialises")
    }

    /// Reads an entry; `Ok(None)` for one another fold version made.
    ///
    /// # Errors
    /// What is wrong with bytes that are no index entry.
    pub fn read(bytes: &[u8]) -> Result<Option<Self>, String> {
        let entry: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not an index entry: {e}"))?;
        Ok((entry.fold == FOLD_VERSION).then_some(entry))
    }
}

/// Only an entry's production deployment (DORA reads nothing else of a run): `Ok(None)` for an
/// entry of another fold version or a run that did not deploy to production.
///
/// # Errors
/// What is wrong with bytes that are no index entry.
pub fn read_deployed(bytes: &[u8]) -> Result<Option<crate::dora::Deployed>, String> {
    #[derive(Deserialize)]
    struct Light {
        fold: u32,
        #[serde(default)]
        deployed: Option<crate::dora::Deployed>,
    }
    let light: Light =
        serde_json::from_slice(bytes).map_err(|e| format!("not an index entry: {e}"))?;
    Ok(light.deployed.filter(|_| light.fold == FOLD_VERSION))
}

/// Two figures that differ in their last bits only. Releases before exact float parsing
/// (`serde_json`'s `float_roundtrip`) read a figure such as `0.9467962499999997` back as
/// `0.9467962499999996`, and what they wrote from it (index entries, recorded states) holds
/// that; a fold today gives the figure the event carries. Integers must be equal.
pub fn same_figure(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// Where `indexed` differs from `fresh` (a fold of the log), as JSON paths with both values,
/// at most `limit` of them; figures that differ in their last bits only ([`same_figure`]) do
/// not count.
pub fn differences(indexed: &Value, fresh: &Value, limit: usize) -> Vec<String> {
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>, limit: usize) {
        if out.len() >= limit || a == b || same_figure(a, b) {
            return;
        }
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let (va, vb) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    walk(&format!("{path}.{k}"), va, vb, out, limit);
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}[{i}]"), va, vb, out, limit);
                }
            }
            _ => out.push(format!("{path}: index has {a}, the log folds to {b}")),
        }
    }
    let mut out = Vec::new();
    walk("run", indexed, fresh, &mut out, limit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{MONITORED_PIPELINE as PIPE, Sim};

    #[test]
    fn an_entry_reads_back_names_its_fold_and_shows_where_it_differs() {
        let mut sim = Sim::new(PIPE);
        sim.run_to_end();
        let run = sim.run().clone();
        let entry = IndexEntry::of(&run, 42);
        assert_eq!(
            IndexEntry::read(&entry.to_bytes()).unwrap(),
            Some(entry.clone())
        );
        assert!(differences(&entry.run, &run.to_json(), 10).is_empty());
        // What DORA reads of it: the run's production deployment, the same as from the run.
        assert!(entry.deployed.is_some());
        assert_eq!(
            read_deployed(&entry.to_bytes()).unwrap(),
            crate::dora::deployed(&run)
        );

        // Another fold's entry is not read; bytes that are no entry say so.
        let mut older = entry.clone();
        older.fold = FOLD_VERSION + 1;
        assert_eq!(IndexEntry::read(&older.to_bytes()).unwrap(), None);
        assert!(
            IndexEntry::read(b"{}")
                .unwrap_err()
                .starts_with("not an index entry")
        );

        // A tampered entry: each difference named by its path, both values shown.
        let mut tampered = entry.run.clone();
        tampered["phase"] = "failed".into();
        tampered["stages"][0]["status"] = "failed".into();
        let found = differences(&tampered, &run.to_json(), 10);
        assert_eq!(
            found,
            [
                "run.phase: index has \"failed\", the log folds to \"succeeded\"",
                "run.stages[0].status: index has \"failed\", the log folds to \"succeeded\""
            ]
        );
        assert_eq!(differences(&tampered, &run.to_json(), 1).len(), 1);
    }
}
