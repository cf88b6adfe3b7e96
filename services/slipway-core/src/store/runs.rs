//! The run index in its JetStream KV bucket (`[nats.stream] runs_bucket`, default
//! `slipway-runs`): an entry per ended run, by run id ([`slipway_domain::index`]).

use async_nats::jetstream::kv;
use futures_util::TryStreamExt;
use slipway_domain::index::IndexEntry;

use crate::bus::{Bus, BusError};

/// The index's bucket.
#[derive(Clone)]
pub struct RunIndex {
    kv: kv::Store,
}

impl std::fmt::Debug for RunIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunIndex")
            .field("bucket", &self.kv.name)
            .finish()
    }
}

impl RunIndex {
    /// The bucket, created on first use (one value per run: history 1).
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be found or created.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let kv = super::kv_bucket(
            bus,
            &bus.settings().stream.runs_bucket,
            "Slipway: each ended run's state, derived from the log",
        )
        .await?;
        Ok(Self { kv })
    }

    /// Writes a run's entry (a later write of the same run replaces it).
    ///
    /// # Errors
    /// [`BusError`] when the server does not store it.
    pub async fn put(&self, run_id: &str, entry: &IndexEntry) -> Result<(), BusError> {
        self.kv
            .put(run_id, entry.to_bytes().into())
            .await
            .map_err(|e| BusError::nats("write run index", e))?;
        Ok(())
    }

    /// A run's entry: `None` when there is none, or one another fold version made.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read, or the entry is no index entry.
    pub async fn get(&self, run_id: &str) -> Result<Option<IndexEntry>, BusError> {
        let Some(bytes) = self
            .kv
            .get(run_id)
            .await
            .map_err(|e| BusError::nats("read run index", e))?
        else {
            return Ok(None);
        };
        IndexEntry::read(&bytes)
            .map_err(|e| BusError::nats("read run index", format!("{run_id}: {e}")))
    }

    /// Every run id with an entry.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn run_ids(&self) -> Result<Vec<String>, BusError> {
        match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| BusError::nats("list run index", e)),
            Err(e) => Err(BusError::nats("list run index", e)),
        }
    }
}
