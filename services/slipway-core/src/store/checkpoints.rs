//! Services' checkpoints in their JetStream KV bucket (`[nats.stream] checkpoints_bucket`,
//! default `slipway-checkpoints`), a key per service ([`slipway_domain::checkpoint`]).

use async_nats::jetstream::kv;
use slipway_domain::checkpoint::Checkpoint;

use crate::bus::{Bus, BusError};

/// The checkpoints' bucket.
#[derive(Clone)]
pub struct Checkpoints {
    kv: kv::Store,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("bucket", &self.kv.name)
            .finish()
    }
}

impl Checkpoints {
    /// The bucket, created on first use.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be found or created.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let kv = super::kv_bucket(
            bus,
            &bus.settings().stream.checkpoints_bucket,
            "Slipway: where each service's fold of the log stands",
        )
        .await?;
        Ok(Self { kv })
    }

    /// The service's checkpoint as stored, if any.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn get(&self, service: &str) -> Result<Option<bytes::Bytes>, BusError> {
        self.kv
            .get(service)
            .await
            .map_err(|e| BusError::nats("read checkpoint", e))
    }

    /// Stores the service's checkpoint.
    ///
    /// # Errors
    /// [`BusError`] when the server does not store it.
    pub async fn put(&self, service: &str, checkpoint: &Checkpoint) -> Result<(), BusError> {
        self.kv
            .put(service, checkpoint.to_bytes().into())
            .await
            .map_err(|e| BusError::nats("write checkpoint", e))?;
        Ok(())
    }

    /// Stores a checkpoint of another shape under `key` (the deploy index's,
    /// [`crate::store::baseline::CHECKPOINT`]).
    ///
    /// # Errors
    /// [`BusError`] when the server does not store it.
    pub async fn put_bytes(&self, key: &str, bytes: bytes::Bytes) -> Result<(), BusError> {
        self.kv
            .put(key, bytes)
            .await
            .map_err(|e| BusError::nats("write checkpoint", e))?;
        Ok(())
    }

    /// Removes the service's checkpoint (its next start folds the whole log).
    ///
    /// # Errors
    /// [`BusError`] when the server does not remove it.
    pub async fn delete(&self, service: &str) -> Result<(), BusError> {
        self.kv
            .delete(service)
            .await
            .map_err(|e| BusError::nats("delete checkpoint", e))
    }
}
