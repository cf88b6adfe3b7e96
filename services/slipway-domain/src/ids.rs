//! Deterministic identifiers: the same input always yields the same id, so a repeated
//! decision or fact is a duplicate that JetStream drops (`Nats-Msg-Id`) and `fold` ignores.

use uuid::Uuid;

/// Namespace of every Slipway UUIDv5.
const NAMESPACE: Uuid = Uuid::from_u128(0x5f1b_0a7e_9c3d_4e21_8a6f_2d4c_7b1e_9f03);

/// The run id of a change: UUIDv5 of its CloudEvents source and id, so a redelivered change
/// never makes a second run.
pub fn run_id(change_source: &str, change_id: &str) -> String {
    derived(&["change", change_source, change_id])
}

/// A derived event id from its parts (e.g. run id, type, stage, attempt).
pub fn derived(parts: &[&str]) -> String {
    // Length-prefixed, so no two different part lists hash the same input.
    let mut input = Vec::new();
    for p in parts {
        input.extend_from_slice(p.len().to_string().as_bytes());
        input.push(b':');
        input.extend_from_slice(p.as_bytes());
    }
    Uuid::new_v5(&NAMESPACE, &input).to_string()
}

/// The one id every end of a run shares: two conflicting ends are duplicates of each other.
pub fn run_end(run_id: &str) -> String {
    derived(&[run_id, "run.ended"])
}

/// A fresh random id, for events that are not derived (a new change).
pub fn random() -> String {
    Uuid::new_v4().to_string()
}

/// Whether `s` can be a run id: it becomes a subject token, so it must be plain.
pub fn is_valid_run_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        assert_eq!(run_id("/cli", "1"), run_id("/cli", "1"));
        assert_ne!(run_id("/cli", "1"), run_id("/cli", "2"));
        assert_ne!(run_id("a", "b\0c"), run_id("a\0b", "c"));
        assert!(is_valid_run_id(&run_id("x", "y")));
        assert!(!is_valid_run_id("a.b"));
        assert!(!is_valid_run_id("*"));
    }
}
