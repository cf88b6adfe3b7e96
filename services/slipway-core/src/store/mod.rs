//! What is composed around a [`crate::bus::Bus`], each shared by its clones: the object store of
//! artifacts, logs and gate details, the index of deploys the gates' baselines come from, and
//! the run index of ended runs and its DORA chunks.

pub mod backup;
pub mod baseline;
pub mod checkpoints;
pub mod dora;
pub mod objects;
pub mod runs;

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;

use crate::bus::{Bus, BusError};

/// A KV bucket of derived state (one value per key: history 1), created on first use with the
/// log's replica count.
pub(crate) async fn kv_bucket(
    bus: &Bus,
    name: &str,
    description: &str,
) -> Result<kv::Store, BusError> {
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

/// Reads a bucket's stream in order from `deliver_policy` through an ordered consumer, handing
/// each message to `each` until it returns `false` or nothing is left (`operation` names the
/// read in errors).
async fn read_ordered(
    stream: &jetstream::stream::Stream,
    deliver_policy: jetstream::consumer::DeliverPolicy,
    operation: &'static str,
    mut each: impl FnMut(&jetstream::Message) -> bool,
) -> Result<(), BusError> {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::nats(operation, e))?;
    // The creation's answer says whether anything is there to read.
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BusError::nats(operation, e))?;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .map_err(|_| BusError::nats(operation, "no message within 10s"))?
    {
        let msg = msg.map_err(|e| BusError::nats(operation, e))?;
        let left = msg
            .info()
            .map_err(|e| BusError::nats(operation, e))?
            .pending;
        if !each(&msg) || left == 0 {
            break;
        }
    }
    Ok(())
}

/// An ordered read from `since` on, by the time messages were stored.
fn by_start_time(
    since: chrono::DateTime<chrono::Utc>,
    operation: &'static str,
) -> Result<jetstream::consumer::DeliverPolicy, BusError> {
    let start_time =
        async_nats::datetime::from_nanos(i128::from(since.timestamp_nanos_opt().unwrap_or(0)))
            .map_err(|e| BusError::nats(operation, e))?;
    Ok(jetstream::consumer::DeliverPolicy::ByStartTime { start_time })
}
