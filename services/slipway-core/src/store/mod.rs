//! What is composed around a [`crate::bus::Bus`], each shared by its clones: the object store of
//! artifacts, logs and gate details, the index of deploys the gates' baselines come from, and
//! the run index of ended runs and its DORA chunks.

pub mod baseline;
pub mod checkpoints;
pub mod dora;
pub mod objects;
pub mod runs;

use async_nats::jetstream::kv;

use crate::bus::{Bus, BusError};

/// A KV bucket of derived state (one value per key: history 1), created on first use with the
/// log's replica count.
async fn kv_bucket(bus: &Bus, name: &str, description: &str) -> Result<kv::Store, BusError> {
    let js = bus.jetstream();
    if let Ok(kv) = js.get_key_value(name).await {
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_string(),
        description: description.to_string(),
        history: 1,
        num_replicas: bus.settings().stream.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::nats("create KV bucket", format!("{name}: {e}")))
}
