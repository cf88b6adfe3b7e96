//! Artifacts and logs in JetStream Object Store buckets, addressed by sha256 digest.
//!
//! Events carry an [`ObjectRef`] (bucket, name, digest, size), never the bytes. Artifacts are
//! named `sha256/<hex>`, so the same bytes are stored once however often a build repeats.
//!
//! Objects are read by batched direct gets of their chunks ([`DIRECT_PAGE_CHUNKS`] a request),
//! without a consumer. The client's own read creates an ordered consumer on the bucket's stream
//! per object, which the server keeps for 30 s after the read: with hundreds of runs in flight
//! (three reads each) those piled up to the server's consumer limit and failed deploys.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::object_store::{self, ObjectInfo, ObjectStore};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::warn;

use crate::bus::{Bus, BusError, DirectPages};
use crate::exec::workspace::sha256_file;
use slipway_domain::digest::Digest;
use slipway_domain::events::ObjectRef;

fn nats(operation: &'static str, e: impl std::fmt::Display) -> BusError {
    BusError::Nats {
        operation,
        message: e.to_string(),
    }
}

/// Chunks a direct read asks for at once (4 MiB at the default chunk size). An object of at
/// most this many chunks is checked against its digest before any of it is written.
pub const DIRECT_PAGE_CHUNKS: usize = 32;

/// The object store of one connection: the [`Bus`] with the bucket handles found so far, so
/// that each use is not a stream lookup on the server. Clones share the handles; make one per
/// connection and pass it on.
#[derive(Debug, Clone)]
pub struct Objects {
    bus: Bus,
    buckets: Arc<Buckets>,
}

impl Objects {
    pub fn new(bus: &Bus) -> Self {
        Self {
            bus: bus.clone(),
            buckets: Arc::default(),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }
}

/// Bucket handles by name. A handle names its stream only; one that failed is dropped and
/// looked up again.
#[derive(Default)]
struct Buckets(Mutex<HashMap<String, ObjectStore>>);

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        f.debug_tuple("Buckets").field(&names).finish()
    }
}

impl Buckets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ObjectStore>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// The bucket, created on first use.
///
/// # Errors
/// [`BusError`] when the bucket cannot be found or created.
pub async fn bucket(objects: &Objects, name: &str) -> Result<ObjectStore, BusError> {
    if let Some(b) = objects.buckets.lock().get(name) {
        return Ok(b.clone());
    }
    let b = find_or_create(&objects.bus, name).await?;
    objects.buckets.lock().insert(name.to_string(), b.clone());
    Ok(b)
}

async fn find_or_create(bus: &Bus, name: &str) -> Result<ObjectStore, BusError> {
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
    objects: &Objects,
    bucket_name: &str,
    name: Option<&str>,
    path: &Path,
) -> Result<ObjectRef, BusError> {
    let store = bucket(objects, bucket_name).await?;
    // A content-addressed name needs the digest before the put; any other name takes it from
    // the put's own pass over the file.
    let (name, expected, previous) = match name {
        Some(n) => (n.to_string(), None, Previous::LookUp(&store)),
        None => {
            let file = path.to_path_buf();
            let (digest, size) = tokio::task::spawn_blocking(move || sha256_file(&file))
                .await
                .map_err(|e| nats("read file", e))?
                .map_err(|e| nats("read file", e))?;
            let name = format!("sha256/{}", digest.hex());
            let object = ObjectRef {
                bucket: bucket_name.to_string(),
                name,
                digest,
                size,
            };
            // Already present, and recorded with this digest: these very bytes (a repeated
            // build). Any other version found is replaced, its chunks purged.
            let previous = match store.info(&object.name).await {
                Ok(i) if !i.deleted && i.digest.as_deref() == Some(&recorded(&object)?) => {
                    return Ok(object);
                }
                Ok(i) => Previous::Found(i.nuid),
                Err(_) => Previous::None,
            };
            (object.name.clone(), Some(object), previous)
        }
    };
    match put(
        &objects.bus,
        bucket_name,
        &name,
        path,
        expected.as_ref(),
        previous,
    )
    .await
    {
        Ok(stored) => Ok(stored),
        Err(e) => {
            objects.buckets.forget(bucket_name);
            Err(e)
        }
    }
}

/// A SHA-256 as the object store records it: `SHA-256=<base64url of the hash>`.
fn recorded_digest(hash: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(hash)
    )
}

/// An event's `sha256:<hex>` digest as the object store records it.
fn recorded(object: &ObjectRef) -> Result<String, BusError> {
    let bytes = object
        .digest
        .sha256_bytes()
        .ok_or_else(|| nats("object put", format!("{} is not a SHA-256", object.digest)))?;
    Ok(recorded_digest(&bytes))
}

/// Chunks of a put in flight at once: 4 MiB at the default chunk size.
const PUT_WINDOW: usize = 32;

/// The chunk size of the object store's own put (128 KiB).
const CHUNK_SIZE: usize = 128 * 1024;

/// The version of an object that a put replaces.
enum Previous<'a> {
    None,
    /// Its chunks' nuid.
    Found(String),
    /// Not looked up yet: looked up while the chunks go out.
    LookUp(&'a ObjectStore),
}

/// Stores `path` as `name` in `bucket`, in the object store's layout (NATS ADR-20): chunks on
/// `$O.<bucket>.C.<nuid>`; once all are stored, the info on `$O.<bucket>.M.<base64url name>`,
/// rolling up the version before; then that version's chunks purged.
///
/// The client's own put looks the name up first and waits for each chunk's ack before it sends
/// the next: 2 + chunks round trips. Here up to [`PUT_WINDOW`] chunks are in flight and the
/// look-up of a named object's version runs alongside them: two round trips for a small
/// object (three when it replaces one, with the purge).
async fn put(
    bus: &Bus,
    bucket: &str,
    name: &str,
    path: &Path,
    expected: Option<&ObjectRef>,
    previous: Previous<'_>,
) -> Result<ObjectRef, BusError> {
    use async_nats::jetstream::context::PublishAckFuture;
    use sha2::Digest as _;
    use std::collections::VecDeque;
    use tokio::io::AsyncReadExt;

    if name.is_empty() {
        return Err(nats("object put", "an object needs a name"));
    }
    // Any name goes on a subject as its base64url (ADR-20).
    let encoded = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE.encode(name)
    };
    let js = bus.jetstream();
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunk_subject = format!("$O.{bucket}.C.{nuid}");
    let send = async {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| nats("open file", e))?;
        let mut acks: VecDeque<PublishAckFuture> = VecDeque::new();
        let mut sha = sha2::Sha256::new();
        let (mut size, mut chunks) = (0usize, 0usize);
        loop {
            let mut buf = bytes::BytesMut::with_capacity(CHUNK_SIZE);
            let mut eof = false;
            while buf.len() < CHUNK_SIZE {
                if file
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| nats("read file", e))?
                    == 0
                {
                    eof = true;
                    break;
                }
            }
            if !buf.is_empty() {
                let payload = buf.freeze();
                sha.update(&payload);
                size += payload.len();
                chunks += 1;
                if acks.len() >= PUT_WINDOW
                    && let Some(ack) = acks.pop_front()
                {
                    ack.await.map_err(|e| nats("object put chunk", e))?;
                }
                acks.push_back(
                    js.publish(chunk_subject.clone(), payload)
                        .await
                        .map_err(|e| nats("object put chunk", e))?,
                );
            }
            if eof {
                break;
            }
        }
        for ack in acks {
            ack.await.map_err(|e| nats("object put chunk", e))?;
        }
        Ok::<_, BusError>((sha.finalize(), size, chunks))
    };
    let (sent, previous) = match previous {
        Previous::LookUp(store) => {
            let (sent, found) = tokio::join!(send, store.info(name));
            (sent, found.ok().map(|i| i.nuid))
        }
        Previous::Found(nuid) => (send.await, Some(nuid)),
        Previous::None => (send.await, None),
    };
    let (hash, size, chunks) = sent?;
    let digest = Digest::from_sha256(&hash);
    // The file hashed for its name has changed since: its chunks go, and no info names them.
    if let Some(expected) = expected
        && (expected.digest != digest || expected.size != size as u64)
    {
        if let Ok(stream) = js.get_stream_no_info(format!("OBJ_{bucket}")).await {
            let _ = stream.purge().filter(chunk_subject.as_str()).await;
        }
        return Err(nats(
            "object put",
            format!(
                "{name} changed while it was stored ({size} bytes now, {} when hashed)",
                expected.size
            ),
        ));
    }
    let ours = recorded_digest(&hash);
    // The fields the object store's clients read (ADR-20); `mtime` in RFC 3339.
    let info = serde_json::json!({
        "name": name,
        "bucket": bucket,
        "nuid": nuid,
        "size": size,
        "chunks": chunks,
        "mtime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "digest": ours,
        "options": { "max_chunk_size": CHUNK_SIZE },
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_ROLLUP, "sub");
    js.publish_with_headers(
        format!("$O.{bucket}.M.{encoded}"),
        headers,
        info.to_string().into(),
    )
    .await
    .map_err(|e| nats("object put info", e))?
    .await
    .map_err(|e| nats("object put info", e))?;
    // The replaced version's chunks, unless the look-up already saw this put's info.
    if let Some(old) = previous.filter(|p| *p != nuid && !p.is_empty()) {
        let stream = js
            .get_stream_no_info(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| nats("object put purge", e))?;
        stream
            .purge()
            .filter(format!("$O.{bucket}.C.{old}"))
            .await
            .map_err(|e| nats("object put purge", e))?;
    }
    Ok(ObjectRef {
        bucket: bucket.to_string(),
        name: name.to_string(),
        digest,
        size: size as u64,
    })
}

/// Fetches an object into a file and checks its digest.
///
/// # Errors
/// [`BusError`] on NATS or I/O failure, or a digest mismatch.
pub async fn get_file(objects: &Objects, object: &ObjectRef, path: &Path) -> Result<(), BusError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| nats("create file", e))?;
    let hash = read_into(objects, &object.bucket, &object.name, &mut file).await?;
    let digest = Digest::from_sha256(&hash);
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

/// A whole object in memory (gate details, datasets).
///
/// # Errors
/// [`BusError`] on NATS failure, or when there is no such object.
pub async fn read(objects: &Objects, bucket_name: &str, name: &str) -> Result<Vec<u8>, BusError> {
    let mut out = Vec::new();
    read_into(objects, bucket_name, name, &mut out).await?;
    Ok(out)
}

/// The SHA-256 of an object's bytes, taken as they are read.
type Hash = sha2::digest::Output<sha2::Sha256>;

/// Writes the object's bytes to `sink` (and flushes it); their SHA-256.
async fn read_into(
    objects: &Objects,
    bucket_name: &str,
    name: &str,
    sink: &mut (impl AsyncWrite + Unpin),
) -> Result<Hash, BusError> {
    let store = bucket(objects, bucket_name).await?;
    let info = match store.info(name).await {
        Ok(i) if !i.deleted => i,
        Ok(_) => return Err(nats("object get", format!("{name} was deleted"))),
        Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
            return Err(nats(
                "object get",
                format!("no object {name} in bucket {bucket_name}"),
            ));
        }
        Err(e) => {
            objects.buckets.forget(bucket_name);
            return Err(nats("object get", e));
        }
    };
    let linked = info.options.as_ref().is_some_and(|o| o.link.is_some());
    let read = if linked {
        read_streamed(&store, name, sink).await
    } else {
        match read_direct(&objects.bus, bucket_name, &info, sink).await {
            Ok(hash) => Ok(hash),
            // Nothing reached the sink yet (a chunk missing, an object replaced under the read,
            // a replica behind, a bucket without direct gets): the client's own read, afresh.
            Err(Direct::BeforeWriting(e)) => {
                warn!(error = %e, object = name, "Direct read failed; reading through a consumer.");
                read_streamed(&store, name, sink).await
            }
            Err(Direct::Written(e)) => Err(e),
        }
    };
    if read.is_err() {
        objects.buckets.forget(bucket_name);
    }
    let hash = read?;
    sink.flush().await.map_err(|e| nats("write file", e))?;
    Ok(hash)
}

/// How a direct read failed: before or after bytes reached the sink (after, a second read
/// would append to them).
enum Direct {
    BeforeWriting(BusError),
    Written(BusError),
}

/// The chunks by direct gets of the object's chunk subject (no consumer), a page of
/// [`DIRECT_PAGE_CHUNKS`] at a time (one chunk: a plain direct get, on the connection's shared
/// reply subscription), checked against the object's size and digest. An object of one page is
/// checked before any of it is written; a larger one is written page by page and checked at
/// the end.
async fn read_direct(
    bus: &Bus,
    bucket_name: &str,
    info: &ObjectInfo,
    sink: &mut (impl AsyncWrite + Unpin),
) -> Result<Hash, Direct> {
    use sha2::Digest as _;
    let mut written = false;
    let fail = |written: bool, e: String| {
        let e = nats("object read", e);
        if written {
            Direct::Written(e)
        } else {
            Direct::BeforeWriting(e)
        }
    };
    // The object store's layout (NATS ADR-20): stream OBJ_<bucket>, chunks on
    // $O.<bucket>.C.<nuid> in order.
    let stream_name = format!("OBJ_{bucket_name}");
    let subject = format!("$O.{bucket_name}.C.{}", info.nuid);
    let mut pages = None;
    let mut held = Vec::new();
    let mut sha = sha2::Sha256::new();
    let (mut size, mut chunks, mut next) = (0usize, 0usize, 1u64);
    while chunks < info.chunks {
        let want = DIRECT_PAGE_CHUNKS.min(info.chunks - chunks);
        let page: Vec<(u64, bytes::Bytes)> = if want == 1 && pages.is_none() {
            let stream = bus
                .jetstream()
                .get_stream_no_info(stream_name.as_str())
                .await
                .map_err(|e| fail(written, e.to_string()))?;
            let m = stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
                .map_err(|e| fail(written, e.to_string()))?;
            vec![(m.sequence, m.payload)]
        } else {
            let pages = match &mut pages {
                Some(p) => p,
                None => pages.insert(
                    DirectPages::open(bus.client(), &stream_name)
                        .await
                        .map_err(|e| fail(written, e.to_string()))?,
                ),
            };
            pages
                .next(&subject, next, want)
                .await
                .map_err(|e| fail(written, e.to_string()))?
                .messages
                .into_iter()
                .map(|(seq, _, m)| (seq, m.payload))
                .collect()
        };
        if page.is_empty() {
            return Err(fail(
                written,
                format!("{} has {chunks} of its {} chunks", info.name, info.chunks),
            ));
        }
        for (seq, chunk) in page {
            sha.update(&chunk);
            size += chunk.len();
            chunks += 1;
            next = seq + 1;
            held.push(chunk);
        }
        // More pages to come: what is held goes out now, unchecked until the end.
        if chunks < info.chunks {
            for chunk in held.drain(..) {
                sink.write_all(&chunk)
                    .await
                    .map_err(|e| Direct::Written(nats("write file", e)))?;
            }
            written = true;
        }
    }
    if size != info.size || chunks != info.chunks {
        return Err(fail(
            written,
            format!(
                "{} has {size} bytes in {chunks} chunks, its info says {} in {}",
                info.name, info.size, info.chunks
            ),
        ));
    }
    let hash = sha.finalize();
    if let Some(recorded) = &info.digest {
        let ours = recorded_digest(&hash);
        if *recorded != ours {
            return Err(fail(
                written,
                format!(
                    "{} has digest {ours} in its chunks, its info says {recorded}",
                    info.name
                ),
            ));
        }
    }
    for chunk in held {
        sink.write_all(&chunk)
            .await
            .map_err(|e| Direct::Written(nats("write file", e)))?;
    }
    Ok(hash)
}

/// Through the client's ordered consumer (which checks the recorded digest at the end).
async fn read_streamed(
    store: &ObjectStore,
    name: &str,
    sink: &mut (impl AsyncWrite + Unpin),
) -> Result<Hash, BusError> {
    use sha2::Digest as _;
    use tokio::io::AsyncReadExt;
    let mut obj = store.get(name).await.map_err(|e| nats("object get", e))?;
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = obj
            .read(&mut buf)
            .await
            .map_err(|e| nats("object read", e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        sink.write_all(&buf[..n])
            .await
            .map_err(|e| nats("write file", e))?;
    }
    Ok(sha.finalize())
}

/// Names of the objects in a bucket (for tests and `slipway` tooling).
///
/// # Errors
/// [`BusError`] on NATS failure.
pub async fn list(objects: &Objects, bucket_name: &str) -> Result<Vec<String>, BusError> {
    use futures_util::StreamExt;
    let store = bucket(objects, bucket_name).await?;
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
