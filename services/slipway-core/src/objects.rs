//! Artifacts and logs in JetStream Object Store buckets, addressed by sha256 digest.
//!
//! Events carry an [`ObjectRef`] (bucket, name, digest, size), never the bytes. Artifacts are
//! named `sha256/<hex>`, so the same bytes are stored once however often a build repeats.

use std::path::Path;

use async_nats::jetstream::object_store::{self, ObjectStore};
use tokio::io::AsyncWriteExt;

use crate::bus::{Bus, BusError};
use crate::events::ObjectRef;
use crate::workspace::sha256_file;

fn nats(operation: &'static str, e: impl std::fmt::Display) -> BusError {
    BusError::Nats {
        operation,
        message: e.to_string(),
    }
}

/// The bucket, created on first use.
///
/// # Errors
/// [`BusError`] when the bucket cannot be found or created.
pub async fn bucket(bus: &Bus, name: &str) -> Result<ObjectStore, BusError> {
    let js = bus.jetstream();
    if let Ok(b) = js.get_object_store(name).await {
        return Ok(b);
    }
    match js
        .create_object_store(object_store::Config {
            bucket: name.to_string(),
            num_replicas: bus.settings().stream.replicas,
            ..Default::default()
        })
        .await
    {
        Ok(b) => Ok(b),
        // Created concurrently by another service.
        Err(e) => js
            .get_object_store(name)
            .await
            .map_err(|_| nats("create object store", e)),
    }
}

/// Stores a file under `name` (or `sha256/<hex>` when `name` is `None`).
///
/// # Errors
/// [`BusError`] on I/O or NATS failure.
pub async fn put_file(
    bus: &Bus,
    bucket_name: &str,
    name: Option<&str>,
    path: &Path,
) -> Result<ObjectRef, BusError> {
    let (digest, size) = sha256_file(path).map_err(|e| nats("read file", e))?;
    let content_addressed = name.is_none();
    let name = match name {
        Some(n) => n.to_string(),
        None => format!("sha256/{}", digest.trim_start_matches("sha256:")),
    };
    let store = bucket(bus, bucket_name).await?;
    // A content-addressed name already present holds these very bytes (a repeated build).
    let present = content_addressed
        && matches!(store.info(&name).await, Ok(i) if i.size == size as usize && !i.deleted);
    if !present {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| nats("open file", e))?;
        store
            .put(name.as_str(), &mut file)
            .await
            .map_err(|e| nats("object put", e))?;
    }
    Ok(ObjectRef {
        bucket: bucket_name.to_string(),
        name,
        digest,
        size,
    })
}

/// Fetches an object into a file and checks its digest.
///
/// # Errors
/// [`BusError`] on NATS or I/O failure, or a digest mismatch.
pub async fn get_file(bus: &Bus, object: &ObjectRef, path: &Path) -> Result<(), BusError> {
    let store = bucket(bus, &object.bucket).await?;
    let mut obj = store
        .get(&object.name)
        .await
        .map_err(|e| nats("object get", e))?;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| nats("create file", e))?;
    tokio::io::copy(&mut obj, &mut file)
        .await
        .map_err(|e| nats("object read", e))?;
    file.flush().await.map_err(|e| nats("write file", e))?;
    let (digest, _) = sha256_file(path).map_err(|e| nats("read file", e))?;
    if digest != object.digest {
        return Err(nats(
            "object verify",
            format!(
                "{} has digest {digest}, the event says {}",
                object.name, object.digest
            ),
        ));
    }
    Ok(())
}

/// Names of the objects in a bucket (for tests and `slipway` tooling).
///
/// # Errors
/// [`BusError`] on NATS failure.
pub async fn list(bus: &Bus, bucket_name: &str) -> Result<Vec<String>, BusError> {
    use futures_util::StreamExt;
    let store = bucket(bus, bucket_name).await?;
    let mut list = store.list().await.map_err(|e| nats("object list", e))?;
    let mut out = Vec::new();
    while let Some(i) = list.next().await {
        let i = i.map_err(|e| nats("object list", e))?;
        if !i.deleted {
            out.push(i.name);
        }
    }
    Ok(out)
}
