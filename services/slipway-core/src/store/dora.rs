//! DORA chunks in their JetStream KV bucket (`[nats.stream] dora_bucket`, default
//! `slipway-dora`): the production deployments of the run index compacted, range by range of its
//! revisions ([`slipway_domain::dora::Chunk`]), so that DORA over a year reads a few hundred
//! small values and the index's recent tail, not a year of whole entries.
//!
//! Derived from the index, never a second truth: a chunk covers revisions `from..=through`
//! and holds every deployment written there; the index after the last chunk is read as it is.
//! Chunks are written with a create keyed by their first revision, so two writers never both
//! cover a range. Dropping the bucket ([`DoraChunks::clear`]) only makes DORA read the index
//! until the gateway has made them again.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use slipway_domain::dora::{self, Chunk, Deployed, Report};
use slipway_domain::index;

use crate::bus::{Bus, BusError};
use crate::store::runs::RunIndex;

/// Index entries per chunk (so at most as many deployments): a chunk stays below a
/// message's largest size (1 MB by default) and a year of 10,000 runs a day is a few hundred
/// chunks.
pub const CHUNK_ROWS: usize = 10_000;

/// A range of fewer entries than [`CHUNK_ROWS`] is written as a chunk once its first entry
/// is this old, so the tail DORA reads whole is at most a day (or a chunk) long.
pub const PARTIAL_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Index entries read per pass (entries are a few kilobytes: a pass holds a few megabytes).
const READ_BATCH: usize = 2_000;

/// The chunks' bucket.
#[derive(Clone)]
pub struct DoraChunks {
    kv: kv::Store,
}

impl std::fmt::Debug for DoraChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoraChunks")
            .field("bucket", &self.kv.name)
            .finish()
    }
}

fn key(from: u64) -> String {
    format!("chunk.{from:020}")
}

impl DoraChunks {
    /// The bucket, created on first use.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be found or created.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let kv = super::kv_bucket(
            bus,
            &bus.settings().stream.dora_bucket,
            "Slipway: production deployments of the run index, compacted for DORA",
        )
        .await?;
        Ok(Self { kv })
    }

    /// The last chunk written, if any.
    async fn last(&self) -> Result<Option<Chunk>, BusError> {
        let mut stream = self.kv.stream.clone();
        let state = stream
            .info()
            .await
            .map_err(|e| BusError::nats("read DORA chunks", e))?
            .state
            .clone();
        let mut seq = state.last_sequence;
        // The last message may be a deletion's marker: step back to a chunk.
        while seq >= state.first_sequence.max(1) {
            match stream.get_raw_message(seq).await {
                Ok(m) if !m.payload.is_empty() => {
                    let chunk = serde_json::from_slice(&m.payload).map_err(|e| {
                        BusError::nats("read DORA chunks", format!("chunk at {seq}: {e}"))
                    })?;
                    return Ok(Some(chunk));
                }
                _ => seq -= 1,
            }
        }
        Ok(None)
    }

    /// The chunks written since `since` (a chunk written before holds only runs indexed, so
    /// deployed, before it) and the index revision the last chunk of all reaches (0: none).
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be read or a chunk decoded.
    pub async fn since(&self, since: DateTime<Utc>) -> Result<(Vec<bytes::Bytes>, u64), BusError> {
        let through = self.last().await?.map_or(0, |c| c.through);
        let mut chunks = Vec::new();
        let policy = super::by_start_time(since, "read DORA chunks")?;
        super::read_ordered(&self.kv.stream, policy, "read DORA chunks", |msg| {
            // Chunks past the last one read above were written meanwhile: the tail after
            // `through` holds their deployments.
            let key = msg.subject.rsplit('.').next().unwrap_or_default();
            if !msg.payload.is_empty() && key.parse::<u64>().is_ok_and(|from| from <= through) {
                chunks.push(msg.payload.clone());
            }
            true
        })
        .await?;
        Ok((chunks, through))
    }

    /// Writes the chunks the index has grown by since the last one: full ones of
    /// [`CHUNK_ROWS`] entries, and a shorter last one once its first entry is older than
    /// [`PARTIAL_AFTER`]. Returns the chunks written; another writer that got there
    /// first stops it without harm.
    ///
    /// # Errors
    /// [`BusError`] when the index or the bucket cannot be read or written.
    pub async fn compact(&self, runs: &RunIndex) -> Result<usize, BusError> {
        self.compact_with(runs, CHUNK_ROWS, PARTIAL_AFTER).await
    }

    /// [`DoraChunks::compact`] with chunks of `rows` entries and a short last one written once
    /// `partial_after` old.
    ///
    /// # Errors
    /// [`BusError`] when the index or the bucket cannot be read or written.
    pub async fn compact_with(
        &self,
        runs: &RunIndex,
        rows: usize,
        partial_after: Duration,
    ) -> Result<usize, BusError> {
        let rows = rows.max(1);
        let mut chunk = Chunk::starting(self.last().await?.map_or(0, |c| c.through) + 1);
        // The first entry of the range and how many it has (runs that did not deploy too).
        let (mut first_written, mut covered): (Option<DateTime<Utc>>, usize) = (None, 0);
        let mut written = 0;
        loop {
            let entries = runs.raw_from(chunk.through + 1, READ_BATCH).await?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                if let Ok(Some(d)) = index::read_deployed(&e.bytes) {
                    chunk.push(&e.run_id, &d);
                }
                first_written.get_or_insert(e.written);
                covered += 1;
                chunk.through = e.revision;
                if covered >= rows {
                    if !self.create(&chunk).await? {
                        return Ok(written);
                    }
                    written += 1;
                    chunk = Chunk::starting(e.revision + 1);
                    (first_written, covered) = (None, 0);
                }
            }
        }
        let old = first_written.is_some_and(|at| {
            Utc::now() - at >= chrono::Duration::from_std(partial_after).unwrap_or_default()
        });
        if old && self.create(&chunk).await? {
            written += 1;
        }
        Ok(written)
    }

    /// Writes `chunk` unless a chunk starting at the same revision exists (`false` then).
    async fn create(&self, chunk: &Chunk) -> Result<bool, BusError> {
        let bytes = serde_json::to_vec(chunk).expect("a chunk serialises");
        match self.kv.create(key(chunk.from), bytes.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(BusError::nats("write DORA chunk", e)),
        }
    }

    /// Drops every chunk (after the index was repaired: a chunk may hold what the repair
    /// replaced). DORA reads the index until they are made again.
    ///
    /// # Errors
    /// [`BusError`] when the bucket cannot be purged.
    pub async fn clear(&self) -> Result<(), BusError> {
        self.kv
            .stream
            .purge()
            .await
            .map_err(|e| BusError::nats("clear DORA chunks", e))?;
        Ok(())
    }
}

/// DORA for deployments in `[since, until]`: the chunks (when `chunks` has any) and the
/// index after them, or the index alone; `recent` are deployments of runs the caller holds
/// (in flight, or ended and maybe not indexed yet), which count once and as it holds them.
///
/// # Errors
/// [`BusError`] when the index or the chunks cannot be read, or a chunk decoded.
pub async fn report(
    runs: &RunIndex,
    chunks: Option<&DoraChunks>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    mut recent: HashMap<String, Deployed>,
) -> Result<Report, BusError> {
    let (chunks, through) = match chunks {
        Some(c) => c.since(since).await?,
        None => (Vec::new(), 0),
    };
    if through == 0 {
        for (run, d) in runs.deployed_since(since).await? {
            recent.entry(run).or_insert(d);
        }
        return Ok(dora::report_of(recent.into_values(), since, until));
    }
    let mut start = through + 1;
    loop {
        let entries = runs.raw_from(start, READ_BATCH).await?;
        let Some(last) = entries.last() else { break };
        start = last.revision + 1;
        for e in entries {
            if let Ok(Some(d)) = index::read_deployed(&e.bytes) {
                recent.entry(e.run_id).or_insert(d);
            }
        }
    }
    dora::report_from(&chunks, &recent, since, until)
        .map_err(|e| BusError::nats("read DORA chunks", e))
}
