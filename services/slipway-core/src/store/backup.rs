//! Backup and restore of everything Slipway keeps in JetStream: the event stream, the object
//! stores (artifacts, logs, gate details) and the KV buckets (run index, checkpoints, DORA,
//! flags), through JetStream's own snapshot and restore API, which keeps every stream sequence,
//! every deleted message and the durable consumers as they were.
//!
//! A backup is a directory: one `<stream>.snapshot` per stream (the server's own snapshot, a
//! compressed tar of its store, byte for byte) and `manifest.json`, which names each file with
//! its size and sha256 and the stream's configuration and state at the snapshot. Streams are
//! taken one after the other, while runs go on, in an order that keeps the backup consistent:
//! the KV buckets first (derived state, so it is behind the log, never ahead of it), then the
//! event stream, then the object stores (an object is stored before the event that names it,
//! and objects are only added). The heartbeat bucket is not kept: it describes processes, not
//! history.
//!
//! A restore checks every file against the manifest before it writes anything, refuses a
//! server that already has one of the streams, and removes what it restored when a later
//! stream fails: nothing is left half-restored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bus::Bus;

/// The manifest's format.
pub const FORMAT: u32 = 1;

/// Chunks of a snapshot, each way.
const CHUNK: usize = 128 * 1024;

/// The longest wait for the next chunk of a snapshot, or for the server to take a restore.
const WAIT: Duration = Duration::from_secs(120);

/// A backup's table of contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The Slipway release that took it.
    pub slipway_version: String,
    /// In the order taken (and restored).
    pub streams: Vec<StreamBackup>,
}

/// One stream of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamBackup {
    pub name: String,
    /// The snapshot's file, beside the manifest.
    pub file: String,
    pub bytes: u64,
    /// `sha256:<hex>` of the file.
    pub sha256: String,
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The stream's configuration and state as the server gave them with the snapshot (what a
    /// restore sends back).
    pub config: Value,
    pub state: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Nats(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the backup in {dir} cannot be used: {why}")]
    Invalid { dir: PathBuf, why: String },
    #[error("{stream}: {message}")]
    Server { stream: String, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The streams a backup takes, in its order: KV buckets, the event stream, object stores,
/// anything else; the heartbeat bucket left out.
fn backup_order(mut names: Vec<String>, log: &str) -> Vec<String> {
    let skip = format!("KV_{}", crate::health::SERVICES_BUCKET);
    names.retain(|n| *n != skip);
    let rank = |n: &str| {
        if n.starts_with("KV_") {
            0
        } else if n == log {
            1
        } else if n.starts_with("OBJ_") {
            2
        } else {
            3
        }
    };
    names.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    names
}

async fn api(bus: &Bus, subject: String, body: Value) -> Result<Value, BackupError> {
    let reply = bus
        .client()
        .send_request(
            subject.clone(),
            async_nats::Request::new()
                .payload(body.to_string().into())
                .timeout(Some(WAIT)),
        )
        .await
        .map_err(|e| BackupError::Nats(format!("{subject}: {e}")))?;
    let v: Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| BackupError::Nats(format!("{subject} answered no JSON: {e}")))?;
    Ok(v)
}

fn server_error(stream: &str, v: &Value) -> Result<(), BackupError> {
    match v.get("error") {
        Some(e) => Err(BackupError::Server {
            stream: stream.to_string(),
            message: e["description"]
                .as_str()
                .map_or_else(|| e.to_string(), str::to_string),
        }),
        None => Ok(()),
    }
}

/// The names of every stream on the server.
async fn stream_names(bus: &Bus) -> Result<Vec<String>, BackupError> {
    let mut names = bus.jetstream().stream_names();
    let mut out = Vec::new();
    while let Some(n) = names.next().await {
        out.push(n.map_err(|e| BackupError::Nats(format!("list streams: {e}")))?);
    }
    Ok(out)
}

/// Takes a backup of every stream into `dir` (created; it must be empty).
///
/// # Errors
/// [`BackupError`] naming the stream or file at fault; what was written is left for a look.
pub async fn backup(bus: &Bus, dir: &Path) -> Result<Manifest, BackupError> {
    tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
    let mut entries = tokio::fs::read_dir(dir).await.map_err(io(dir))?;
    if entries.next_entry().await.map_err(io(dir))?.is_some() {
        return Err(BackupError::Invalid {
            dir: dir.to_path_buf(),
            why: "the directory is not empty: a backup goes into a new one".into(),
        });
    }
    let names = backup_order(stream_names(bus).await?, &bus.settings().stream.name);
    let mut streams = Vec::new();
    for name in names {
        streams.push(snapshot(bus, &name, dir).await?);
    }
    let manifest = Manifest {
        format: FORMAT,
        created_at: crate::bus::now(),
        slipway_version: env!("CARGO_PKG_VERSION").to_string(),
        streams,
    };
    let path = dir.join("manifest.json");
    let body = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    tokio::fs::write(&path, body).await.map_err(io(&path))?;
    Ok(manifest)
}

/// One stream's snapshot into `<dir>/<name>.snapshot`.
async fn snapshot(bus: &Bus, name: &str, dir: &Path) -> Result<StreamBackup, BackupError> {
    let client = bus.client();
    let inbox = client.new_inbox();
    let mut chunks = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| BackupError::Nats(format!("{name}: subscribe: {e}")))?;
    let answer = api(
        bus,
        format!("$JS.API.STREAM.SNAPSHOT.{name}"),
        json!({"deliver_subject": inbox, "no_consumers": false, "chunk_size": CHUNK, "jsck": false}),
    )
    .await?;
    server_error(name, &answer)?;
    let file = format!("{name}.snapshot");
    let path = dir.join(&file);
    let mut out = tokio::fs::File::create(&path).await.map_err(io(&path))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    loop {
        let msg = tokio::time::timeout(WAIT, chunks.next())
            .await
            .map_err(|_| BackupError::Server {
                stream: name.to_string(),
                message: format!("no snapshot chunk for {}s", WAIT.as_secs()),
            })?
            .ok_or_else(|| BackupError::Nats(format!("{name}: the subscription ended")))?;
        if let Some(status) = msg.status {
            // 204: the end of the snapshot; anything else: the server's error.
            if status.as_u16() == 204 {
                break;
            }
            return Err(BackupError::Server {
                stream: name.to_string(),
                message: format!(
                    "the snapshot stopped: {} {}",
                    status.as_u16(),
                    msg.description.unwrap_or_default()
                ),
            });
        }
        if msg.payload.is_empty() {
            break;
        }
        // Each chunk is acknowledged as it arrives, before the write: the server sends the next
        // ones as acks come back and gives up on a client whose acks stop for seconds. (The last
        // chunk may come without a reply subject.)
        if let Some(reply) = msg.reply.clone() {
            client
                .publish(reply, bytes::Bytes::new())
                .await
                .map_err(|e| BackupError::Nats(format!("{name}: ack: {e}")))?;
        }
        out.write_all(&msg.payload).await.map_err(io(&path))?;
        hasher.update(&msg.payload);
        bytes += msg.payload.len() as u64;
    }
    out.flush().await.map_err(io(&path))?;
    out.sync_all().await.map_err(io(&path))?;
    let state = answer["state"].clone();
    Ok(StreamBackup {
        name: name.to_string(),
        file,
        bytes,
        sha256: format!("sha256:{:x}", hasher.finalize()),
        messages: state["messages"].as_u64().unwrap_or(0),
        first_seq: state["first_seq"].as_u64().unwrap_or(0),
        last_seq: state["last_seq"].as_u64().unwrap_or(0),
        config: answer["config"].clone(),
        state,
    })
}

/// Reads a backup's manifest and checks every file it names against its size and checksum.
///
/// # Errors
/// [`BackupError::Invalid`] naming the first file that does not match, or a manifest that
/// cannot be read.
pub fn verify(dir: &Path) -> Result<Manifest, BackupError> {
    let invalid = |why: String| BackupError::Invalid {
        dir: dir.to_path_buf(),
        why,
    };
    let path = dir.join("manifest.json");
    let text = std::fs::read(&path).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    if manifest.format != FORMAT {
        return Err(invalid(format!(
            "manifest format {} (this release reads {FORMAT})",
            manifest.format
        )));
    }
    for s in &manifest.streams {
        if s.file.contains('/') || s.file.contains("..") {
            return Err(invalid(format!("{}: a file outside the backup", s.file)));
        }
        // Hashed as it is read: a snapshot of the object stores can be larger than memory.
        let mut hasher = Sha256::new();
        let bytes = std::fs::File::open(dir.join(&s.file))
            .and_then(|mut f| std::io::copy(&mut f, &mut hasher))
            .map_err(|e| invalid(format!("{}: {e}", s.file)))?;
        if bytes != s.bytes {
            return Err(invalid(format!(
                "{} has {bytes} bytes, the manifest says {}",
                s.file, s.bytes
            )));
        }
        let sum = format!("sha256:{:x}", hasher.finalize());
        if sum != s.sha256 {
            return Err(invalid(format!(
                "{}: checksum {sum} is not the manifest's {}",
                s.file, s.sha256
            )));
        }
    }
    Ok(manifest)
}

/// Restores a backup into a server that has none of its streams.
///
/// # Errors
/// [`BackupError`]: an invalid backup (nothing written), a stream that already exists (nothing
/// written), or a stream the server refused (the streams restored before it are removed).
pub async fn restore(bus: &Bus, dir: &Path) -> Result<Manifest, BackupError> {
    let manifest = verify(dir)?;
    let existing = stream_names(bus).await?;
    let clash: Vec<&str> = manifest
        .streams
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| existing.iter().any(|e| e == n))
        .collect();
    if !clash.is_empty() {
        return Err(BackupError::Invalid {
            dir: dir.to_path_buf(),
            why: format!(
                "the server already has {}: a backup is restored into a server without them",
                clash.join(", ")
            ),
        });
    }
    let mut restored: Vec<&str> = Vec::new();
    for s in &manifest.streams {
        if let Err(e) = restore_stream(bus, dir, s).await {
            for name in restored.iter().chain(std::iter::once(&s.name.as_str())) {
                let _ = bus.jetstream().delete_stream(name).await;
            }
            return Err(e);
        }
        restored.push(&s.name);
    }
    Ok(manifest)
}

async fn restore_stream(bus: &Bus, dir: &Path, s: &StreamBackup) -> Result<(), BackupError> {
    let answer = api(
        bus,
        format!("$JS.API.STREAM.RESTORE.{}", s.name),
        json!({"config": s.config, "state": s.state}),
    )
    .await?;
    server_error(&s.name, &answer)?;
    let deliver = answer["deliver_subject"]
        .as_str()
        .ok_or_else(|| BackupError::Server {
            stream: s.name.clone(),
            message: format!("no deliver_subject in {answer}"),
        })?
        .to_string();
    let path = dir.join(&s.file);
    let mut file = tokio::fs::File::open(&path).await.map_err(io(&path))?;
    let client = bus.client();
    loop {
        // A chunk at a time from the file: the snapshot is never held whole.
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            let n = (&mut file)
                .take((CHUNK - chunk.len()) as u64)
                .read_to_end(&mut chunk)
                .await
                .map_err(io(&path))?;
            if n == 0 {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        let reply = client
            .send_request(
                deliver.clone(),
                async_nats::Request::new()
                    .payload(bytes::Bytes::from(chunk))
                    .timeout(Some(WAIT)),
            )
            .await
            .map_err(|e| BackupError::Nats(format!("{}: restore chunk: {e}", s.name)))?;
        if !reply.payload.is_empty()
            && let Ok(v) = serde_json::from_slice::<Value>(&reply.payload)
        {
            server_error(&s.name, &v)?;
        }
    }
    // An empty message ends the restore; the answer is the restored stream, or why not.
    let end = client
        .send_request(
            deliver,
            async_nats::Request::new()
                .payload(bytes::Bytes::new())
                .timeout(Some(WAIT)),
        )
        .await
        .map_err(|e| BackupError::Nats(format!("{}: finish restore: {e}", s.name)))?;
    let v: Value = serde_json::from_slice(&end.payload).map_err(|e| BackupError::Server {
        stream: s.name.clone(),
        message: format!("the restore's answer is no JSON: {e}"),
    })?;
    server_error(&s.name, &v)?;
    // The server reads a stream's state, then copies its blocks while appends go on: a busy
    // stream's snapshot can hold messages past the state it reported, never fewer.
    let last = v["state"]["last_seq"].as_u64().unwrap_or(0);
    if last < s.last_seq {
        return Err(BackupError::Server {
            stream: s.name.clone(),
            message: format!(
                "restored to sequence {last}, the backup was taken at {}",
                s.last_seq
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_come_before_the_log_and_objects_after_it() {
        let order = backup_order(
            vec![
                "OBJ_slipway-logs".into(),
                "SLIPWAY".into(),
                "KV_slipway-services".into(),
                "KV_slipway-runs".into(),
                "OBJ_slipway-artifacts".into(),
                "KV_slipway-checkpoints".into(),
            ],
            "SLIPWAY",
        );
        assert_eq!(
            order,
            [
                "KV_slipway-checkpoints",
                "KV_slipway-runs",
                "SLIPWAY",
                "OBJ_slipway-artifacts",
                "OBJ_slipway-logs"
            ]
        );
    }
}
