//! A service's checkpoint: where its fold of the log stands, so that it starts from there and
//! the log after it, not from the first event. Derived and disposable: a checkpoint that is
//! missing, of another fold, of another stream (the log was made again) or ahead of the log is
//! not used, and the service folds the whole log instead.

use serde::{Deserialize, Serialize};

use crate::index::FOLD_VERSION;

/// Where a service's fold of the log stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The fold that made it.
    pub fold: u32,
    /// When the log's stream was created (as the bus reports it): a checkpoint of another
    /// stream is not used.
    pub stream_created: String,
    /// Every message up to this stream sequence is folded in.
    pub through: u64,
    /// The runs in flight at `through` (each is read again from its own subjects on start).
    pub in_flight: Vec<String>,
    /// Stream sequences of changes not answered yet at `through`.
    pub unanswered: Vec<u64>,
}

impl Checkpoint {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a checkpoint serialises")
    }

    /// The checkpoint in `bytes`, if it can be used on the stream created at `stream_created`
    /// whose last sequence is `last_seq`.
    ///
    /// # Errors
    /// Why it cannot (the service then folds the whole log).
    pub fn usable(bytes: &[u8], stream_created: &str, last_seq: u64) -> Result<Self, String> {
        let c: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not a checkpoint: {e}"))?;
        if c.fold != FOLD_VERSION {
            return Err(format!(
                "made by fold version {}, this release folds with {FOLD_VERSION}",
                c.fold
            ));
        }
        if c.stream_created != stream_created {
            return Err(format!(
                "made on a stream created {}, the log's was created {stream_created}",
                c.stream_created
            ));
        }
        if c.through > last_seq {
            return Err(format!(
                "folded through sequence {}, past the log's last ({last_seq})",
                c.through
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_used_only_on_its_own_stream_fold_and_past() {
        let c = Checkpoint {
            fold: FOLD_VERSION,
            stream_created: "2026-12-04T08:00:00Z".into(),
            through: 10,
            in_flight: vec!["r1".into()],
            unanswered: vec![7],
        };
        let bytes = c.to_bytes();
        assert_eq!(
            Checkpoint::usable(&bytes, "2026-12-04T08:00:00Z", 12),
            Ok(c.clone())
        );
        assert_eq!(
            Checkpoint::usable(&bytes, "2026-12-04T08:00:00Z", 10),
            Ok(c.clone())
        );
        for (bytes, created, last, why) in [
            (
                bytes.clone(),
                "2026-12-05T00:00:00Z",
                12,
                "made on a stream created",
            ),
            (
                bytes.clone(),
                "2026-12-04T08:00:00Z",
                9,
                "past the log's last (9)",
            ),
            (
                b"garbage".to_vec(),
                "2026-12-04T08:00:00Z",
                12,
                "not a checkpoint",
            ),
            (
                Checkpoint {
                    fold: FOLD_VERSION + 1,
                    ..c.clone()
                }
                .to_bytes(),
                "2026-12-04T08:00:00Z",
                12,
                "made by fold version",
            ),
        ] {
            let err = Checkpoint::usable(&bytes, created, last).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
