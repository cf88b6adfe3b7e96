//! The run index in its JetStream KV bucket (`[nats.stream] runs_bucket`, default
//! `slipway-runs`): an entry per ended run, by run id ([`slipway_domain::index`]).

use std::collections::HashMap;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use slipway_domain::dora::Deployed;
use slipway_domain::index::{self, IndexEntry};

use crate::bus::{Bus, BusError, DirectPages};

/// An ended run as the index holds it, at its place in the index.
#[derive(Debug, Clone)]
pub struct Indexed {
    /// The entry's revision: its sequence in the bucket's stream, so entries are in the order
    /// they were written (about the order runs ended).
    pub revision: u64,
    pub run_id: String,
    /// `None` for an entry another fold version made (the run is read from the log then).
    pub entry: Option<IndexEntry>,
}

/// An entry as stored ([`RunIndex::raw_from`]).
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub revision: u64,
    pub run_id: String,
    pub written: DateTime<Utc>,
    pub bytes: bytes::Bytes,
}

/// The index's bucket.
#[derive(Clone)]
pub struct RunIndex {
    kv: kv::Store,
    /// For batched direct reads of the bucket's stream.
    client: async_nats::Client,
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
        Ok(Self {
            kv,
            client: bus.client().clone(),
        })
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

    /// Writes a run's entry unless one of this fold version is there: an entry keeps its place
    /// (its revision) when the run is indexed again, as on a start that folds the whole log.
    /// `true` when it wrote.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read or written.
    pub async fn put_once(&self, run_id: &str, entry: &IndexEntry) -> Result<bool, BusError> {
        match self.kv.create(run_id, entry.to_bytes().into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                if self.get(run_id).await.ok().flatten().is_some() {
                    return Ok(false);
                }
                // Another fold's entry, or bytes that are none: replaced.
                self.put(run_id, entry).await.map(|()| true)
            }
            Err(e) => Err(BusError::nats("write run index", e)),
        }
    }

    /// The revision of a run's entry, if it has one.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn revision(&self, run_id: &str) -> Result<Option<u64>, BusError> {
        Ok(self
            .kv
            .entry(run_id)
            .await
            .map_err(|e| BusError::nats("read run index", e))?
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| e.revision))
    }

    /// The index's last revision (0 when it is empty).
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn last_revision(&self) -> Result<u64, BusError> {
        let mut stream = self.kv.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::nats("read run index", e))?;
        Ok(info.state.last_sequence)
    }

    /// Entries written before revision `below`, newest first, looking at no more than `scan`
    /// revisions: what one page of a listing reads. Revisions of entries replaced or deleted
    /// are gaps, and count toward `scan`.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn before(&self, below: u64, scan: u64) -> Result<Vec<Indexed>, BusError> {
        let from = below.saturating_sub(scan).max(1);
        if below <= from {
            return Ok(Vec::new());
        }
        let prefix = format!("$KV.{}.", self.kv.name);
        // Every message of the bucket's stream is one of its keys: read by sequence with the
        // full wildcard, which the server serves without matching a subject filter against
        // every key (with `$KV.<bucket>.>` a page's cost grew with the number of keys).
        let subject = ">";
        let mut pages = DirectPages::open(&self.client, &self.kv.stream_name).await?;
        let mut out = Vec::new();
        let mut seq = from;
        'pages: loop {
            let want = usize::try_from(below - seq)
                .unwrap_or(usize::MAX)
                .min(crate::bus::DIRECT_BATCH);
            let page = pages.next(subject, seq, want).await?;
            for (revision, subject, m) in &page.messages {
                if *revision >= below {
                    break 'pages;
                }
                let deleted = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() != "PUT");
                let Some(run_id) = subject.strip_prefix(&prefix) else {
                    continue;
                };
                if deleted {
                    continue;
                }
                out.push(Indexed {
                    revision: *revision,
                    run_id: run_id.to_string(),
                    entry: IndexEntry::read(&m.payload).ok().flatten(),
                });
            }
            match page.next_seq() {
                Some(next) if next < below => seq = next,
                _ => break,
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The production deployments of the runs indexed since `since` (a run is indexed when it
    /// ends, after its deploy): what DORA over a window reads. Read through an ordered
    /// consumer that starts at that time, so a window costs what is in it, not the index.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn deployed_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, Deployed)>, BusError> {
        let prefix = format!("$KV.{}.", self.kv.name);
        let mut by_run: HashMap<String, Deployed> = HashMap::new();
        let policy = super::by_start_time(since, "read run index")?;
        super::read_ordered(&self.kv.stream, policy, "read run index", |msg| {
            if let (Some(run_id), Ok(Some(d))) = (
                msg.subject.as_str().strip_prefix(&prefix),
                index::read_deployed(&msg.payload),
            ) {
                by_run.insert(run_id.to_string(), d);
            }
            true
        })
        .await?;
        Ok(by_run.into_iter().collect())
    }

    /// Up to `limit` entries as stored, from revision `start` on, in revision order: each
    /// with its revision, run id, when it was written and its bytes (what the DORA chunks
    /// are made of, [`crate::store::dora`]).
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read.
    pub async fn raw_from(&self, start: u64, limit: usize) -> Result<Vec<RawEntry>, BusError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let prefix = format!("$KV.{}.", self.kv.name);
        let policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        };
        let mut failed = None;
        super::read_ordered(&self.kv.stream, policy, "read run index", |msg| {
            let info = match msg.info() {
                Ok(i) => i,
                Err(e) => {
                    failed = Some(BusError::nats("read run index", e));
                    return false;
                }
            };
            // Deletions and purges leave markers without a payload.
            if let Some(run_id) = msg.subject.as_str().strip_prefix(&prefix)
                && !msg.payload.is_empty()
            {
                out.push(RawEntry {
                    revision: info.stream_sequence,
                    run_id: run_id.to_string(),
                    written: DateTime::from_timestamp_nanos(
                        i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                    ),
                    bytes: msg.payload.clone(),
                });
            }
            out.len() < limit
        })
        .await?;
        failed.map_or(Ok(out), Err)
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
