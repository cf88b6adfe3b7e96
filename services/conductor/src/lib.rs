//! The conductor: the only service with pipeline logic, and it holds none of its own state.
//!
//! It follows the whole log with an ordered consumer and folds the runs in flight in memory (on
//! start it replays the log first, deciding nothing until it has caught up). Each change becomes a
//! run (deterministic run id, validated spec snapshot in `run.created`) or a
//! `change.rejected` fact naming why. After each event, and on a timer for timeouts, it runs
//! the pure [`decide`](slipway_domain::decide) and appends the resulting decisions with run-wide
//! optimistic concurrency; a decision that loses waits for the newer events and is decided
//! again. Two conductors can run side by side: the log serialises them.
//!
//! It also answers live status queries (`slipway-api.runs.<id>`, core NATS): a run in flight
//! from its folded state, an ended one from the run index ([`slipway_domain::index`]), which
//! `slipway replay --verify` checks against a fresh fold of the log. A run leaves the
//! conductor's memory when it ends, so what it holds grows with the runs in flight, not with
//! the log.

mod intake;
mod observe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use slipway_core::bus::{AppendError, Bus, BusError, Recorded};
use slipway_core::config::Config;
use slipway_core::store::checkpoints::Checkpoints;
use slipway_domain::checkpoint::Checkpoint;
use slipway_domain::decide::{Fleet, decide_in};
use slipway_domain::events::EventData;
use slipway_domain::{Event, Run, fold, subjects};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// CloudEvents `source` of the conductor's events.
pub const SOURCE: &str = slipway_domain::service::Service::Conductor.source();

#[derive(Debug, thiserror::Error)]
pub enum ConductorError {
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One run as the conductor holds it.
#[derive(Debug)]
struct Entry {
    run: Run,
    /// The last stream sequence of this run's events folded: the optimistic-concurrency check.
    last_seq: u64,
}

/// The conductor's state: the runs in flight, and the changes not yet answered. A run leaves
/// memory when it ends: the log holds it, and the run index its final state.
#[derive(Debug, Default)]
struct State {
    runs: HashMap<String, Entry>,
    /// Runs that ended since the last look, by pipeline: the other runs of the pipeline are
    /// decided again (an ended run may have freed an environment they wait for).
    freed: Vec<(String, String)>,
    /// The runs not ended, by pipeline: what each decision looks at, however many runs
    /// have ended before.
    active: HashMap<String, BTreeSet<String>>,
    /// The last stream sequence stored on each held run's subjects, whether or not it decoded:
    /// a stray or unreadable message must not leave the run's expectation behind forever.
    last_seqs: HashMap<String, u64>,
    /// Changes seen before catching up, by stream sequence, answered once caught up.
    unanswered: BTreeMap<u64, Recorded>,
    caught_up: bool,
    observer: observe::Observer,
    /// Pipelines CDEvents start (from the configuration).
    cdevents: Vec<slipway_core::config::CdeventsPipeline>,
    /// Where each run that ends goes (`None`: the bucket could not be opened; runs are still
    /// decided, and `slipway replay --verify --repair` fills the index from the log).
    index: Option<slipway_core::store::runs::RunIndex>,
    /// Where the conductor's checkpoint goes (`None`: it could not be opened; every start
    /// then folds the whole log).
    checkpoints: Option<Checkpoints>,
    /// The log's stream, as a checkpoint names it.
    stream_created: String,
    /// The stream sequence of the last message read from the log.
    consumed: u64,
    /// Messages read since the start (from the checkpoint's runs and the log).
    read: u64,
    /// The sequence the last checkpoint was written through, and when.
    checkpointed: (u64, Option<std::time::Instant>),
    /// Started from a checkpoint: every run that ends while catching up was in flight at the
    /// checkpoint (or began after it) and is indexed too; a start that folds the whole log
    /// leaves the index to `slipway replay --verify --repair`, not to a million writes.
    from_checkpoint: bool,
    /// Entries of runs that just ended, to write to the index.
    to_index: Vec<(String, slipway_domain::index::IndexEntry)>,
    /// Index writes in flight at most.
    index_slots: IndexSlots,
}

/// Index entries written at once, at most.
const INDEX_WRITES: usize = 64;

/// Slots for index writes in flight.
#[derive(Debug)]
struct IndexSlots(std::sync::Arc<tokio::sync::Semaphore>);

impl Default for IndexSlots {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::Semaphore::new(
            INDEX_WRITES,
        )))
    }
}

/// The conductor's key in the checkpoints bucket.
const CHECKPOINT: &str = "conductor";

/// How often, at most, the conductor writes its checkpoint (when it has read something new).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Runs the conductor until `shutdown`.
///
/// # Errors
/// [`ConductorError`] when NATS cannot be reached or the stream does not fit.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ConductorError> {
    let bus = Bus::connect(&config.nats, "slipway-conductor").await?;
    let health = slipway_core::health::Health::new(
        slipway_core::runtime::Service::Conductor,
        &slipway_core::health::Health::default_replica(slipway_core::runtime::Service::Conductor),
    );
    slipway_core::health::start(&bus, &health, &config.health, shutdown.clone()).await;
    let stream = bus.ensure_stream().await?;
    let (stream_created, target) = bus.stream_state().await?;
    let index = match slipway_core::store::runs::RunIndex::open(&bus).await {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(error = %e, "Cannot open the run index: ended runs are not indexed.");
            None
        }
    };
    let checkpoints = match Checkpoints::open(&bus).await {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "Cannot open the checkpoints: every start folds the whole log.");
            None
        }
    };
    let mut state = State {
        cdevents: config.conductor.cdevents.clone(),
        index,
        checkpoints,
        stream_created,
        ..Default::default()
    };
    // From the checkpoint, when there is one to use: the runs in flight then, and the log after.
    let start = state
        .restore(&bus, target)
        .await?
        .map_or(1, |through| through + 1);
    info!(
        from = start,
        replay_to = target,
        "Conductor starting: replaying the log."
    );

    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: if start <= 1 {
                jetstream::consumer::DeliverPolicy::All
            } else {
                jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                }
            },
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Nats {
            operation: "create conductor reader",
            message: e.to_string(),
        })?;
    let mut messages = consumer.messages().await.map_err(|e| BusError::Nats {
        operation: "read log",
        message: e.to_string(),
    })?;
    let mut queries = bus
        .client()
        .subscribe(subjects::QUERY_RUNS)
        .await
        .map_err(|e| BusError::Nats {
            operation: "subscribe queries",
            message: e.to_string(),
        })?;
    let mut tick =
        tokio::time::interval(Duration::from_millis(config.conductor.tick_millis.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    health.bound(None);
    if target < start {
        // Nothing to read (an empty log, or a checkpoint at its end).
        state.catch_up(&bus).await;
    }
    loop {
        // Every tick turns the loop: one that stops turning is wedged.
        health.turned();
        if state.caught_up {
            health.caught_up();
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => match m {
                Some(Ok(msg)) => {
                    let seq = match msg.info() {
                        Ok(i) => i.stream_sequence,
                        Err(_) => continue,
                    };
                    let rec = slipway_core::bus::recorded(seq, &msg.message);
                    state.consumed = seq;
                    state.read += 1;
                    state.on_message(&bus, rec).await;
                    state.decide_freed(&bus).await;
                    // Runs end by what is read and by the conductor's own appends.
                    state.write_index().await;
                    if !state.caught_up && seq >= target {
                        state.catch_up(&bus).await;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "Log reader error; it resumes by itself.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    warn!("Log reader ended.");
                    break;
                }
            },
            _ = tick.tick() => {
                if state.caught_up {
                    state.retry_unanswered(&bus).await;
                    state.decide_all(&bus).await;
                    state.decide_freed(&bus).await;
                    state.write_index().await;
                    state.checkpoint().await;
                }
            },
            // A closed subscription disables this branch instead of spinning on it.
            Some(q) = queries.next() => state.answer(&bus, q).await,
        }
    }
    info!("Conductor stopped.");
    Ok(())
}

impl State {
    async fn on_message(&mut self, bus: &Bus, rec: Recorded) {
        let subject = rec.subject.clone();
        if subject.starts_with("slipway.changes.") {
            if self.caught_up {
                intake::answer_change(self, bus, &rec).await;
            } else {
                self.unanswered.insert(rec.seq, rec);
            }
            return;
        }
        if subject == subjects::REJECTED {
            if let Ok(Event {
                data: EventData::ChangeRejected(r),
                ..
            }) = &rec.event
            {
                self.unanswered.remove(&r.change_seq);
            }
            return;
        }
        let Some((run_id, _, _)) = subjects::parse_run(&subject) else {
            return;
        };
        let held = self.runs.contains_key(run_id);
        if held {
            let seq = self.last_seqs.entry(run_id.to_string()).or_default();
            *seq = (*seq).max(rec.seq);
        }
        let event = match rec.event {
            Ok(e) => e,
            Err(e) => {
                warn!(%subject, seq = rec.seq, error = %e, "Ignoring a malformed event in the log.");
                return;
            }
        };
        if let EventData::RunCreated(c) = &event.data {
            self.unanswered.remove(&c.change.seq);
        } else if !held {
            // An ended run's late event (or one about no run): the log keeps it; nothing to
            // fold or decide.
            return;
        }
        self.fold_in(run_id, &event, rec.seq);
        if self.caught_up {
            self.decide_run(bus, run_id).await;
            // The run may have freed or taken an environment other runs of its pipeline wait for.
            self.decide_pipeline(bus, run_id).await;
        }
    }

    /// Queues the run's entry for the run index when it has just ended (at stream sequence
    /// `seq`); [`State::write_index`] writes it off the decision path: the index is derived,
    /// and a failed write only leaves an entry for `slipway replay --verify --repair` to make.
    fn index_if_ended(&mut self, run_id: &str, seq: u64) {
        let (Some(_), Some(entry)) = (&self.index, self.runs.get(run_id)) else {
            return;
        };
        if !entry.run.is_ended() {
            return;
        }
        let indexed = slipway_domain::index::IndexEntry::of(&entry.run, seq);
        self.to_index.push((run_id.to_string(), indexed));
    }

    /// Writes the queued index entries, at most [`INDEX_WRITES`] at a time: a start that
    /// reads many ended runs waits for slots rather than holding every entry in memory.
    async fn write_index(&mut self) {
        let Some(index) = &self.index else {
            self.to_index.clear();
            return;
        };
        for (run_id, indexed) in self.to_index.drain(..) {
            let Ok(slot) = self.index_slots.0.clone().acquire_owned().await else {
                return;
            };
            let index = index.clone();
            tokio::spawn(async move {
                // Once: an entry already there keeps its place in the index's order.
                if let Err(e) = index.put_once(&run_id, &indexed).await {
                    warn!(%run_id, error = %e, "Cannot write the run's index entry.");
                }
                drop(slot);
            });
        }
    }

    /// Decides the other active runs of `run_id`'s pipeline.
    async fn decide_pipeline(&mut self, bus: &Bus, run_id: &str) {
        let Some(pipeline) = self.runs.get(run_id).map(|e| e.run.pipeline.clone()) else {
            return;
        };
        let others: Vec<String> = self
            .active
            .get(&pipeline)
            .into_iter()
            .flatten()
            .filter(|id| id.as_str() != run_id)
            .cloned()
            .collect();
        for id in others {
            self.decide_run(bus, &id).await;
        }
    }

    /// The sequence a decision about `run_id` must expect.
    fn expected_seq(&self, run_id: &str) -> u64 {
        let folded = self.runs.get(run_id).map_or(0, |e| e.last_seq);
        folded.max(self.last_seqs.get(run_id).copied().unwrap_or(0))
    }

    /// Folds an event into its run; `seq` raises the run's last sequence.
    fn fold_in(&mut self, run_id: &str, event: &Event, seq: u64) {
        let last = self.last_seqs.entry(run_id.to_string()).or_default();
        *last = (*last).max(seq);
        let prior = self.runs.get(run_id).map(|e| &e.run);
        let was_ended = prior.is_some_and(Run::is_ended);
        let before = prior.map(observe::Brief::of);
        // Only live observation looks at stage transitions: nothing to compute during replay.
        let stage = if self.caught_up {
            observe::stage_before(prior, event)
        } else {
            None
        };
        match self.runs.get_mut(run_id) {
            Some(entry) => {
                slipway_domain::fold_into(&mut entry.run, event);
                entry.last_seq = entry.last_seq.max(seq);
            }
            None => {
                if let Some(run) = fold(None, event) {
                    self.runs
                        .insert(run_id.to_string(), Entry { run, last_seq: seq });
                } else if let Some(why) = slipway_domain::fold::unreadable(event) {
                    tracing::error!(%run_id, seq, %why, "A run's first event cannot be read; nothing is decided for the run.");
                }
            }
        }
        if let Some(after) = self.runs.get(run_id) {
            let run = &after.run;
            let active = self.active.get_mut(&run.pipeline);
            if run.is_ended() {
                if let Some(active) = active {
                    active.remove(run_id);
                }
            } else if !active.is_some_and(|a| a.contains(run_id)) {
                self.active
                    .entry(run.pipeline.clone())
                    .or_default()
                    .insert(run_id.to_string());
            }
            self.observer
                .observe(before, stage, run, event, SOURCE, self.caught_up);
        }
        if !was_ended
            && let Some(pipeline) = self
                .runs
                .get(run_id)
                .filter(|e| e.run.is_ended())
                .map(|e| e.run.pipeline.clone())
        {
            if self.caught_up || self.from_checkpoint {
                self.index_if_ended(run_id, seq);
            }
            if self.caught_up {
                self.freed.push((pipeline, run_id.to_string()));
            }
            // The run leaves memory. Without its last sequence, a change repeating its run's
            // creation expects an empty run and loses to the log.
            self.runs.remove(run_id);
            self.last_seqs.remove(run_id);
        }
    }

    /// Decides again the runs of each pipeline in which a run ended.
    async fn decide_freed(&mut self, bus: &Bus) {
        while let Some((pipeline, ended)) = self.freed.pop() {
            let others: Vec<String> = self
                .active
                .get(&pipeline)
                .into_iter()
                .flatten()
                .filter(|id| **id != ended)
                .cloned()
                .collect();
            for id in others {
                self.decide_run(bus, &id).await;
            }
        }
    }

    async fn catch_up(&mut self, bus: &Bus) {
        self.caught_up = true;
        let pending = std::mem::take(&mut self.unanswered);
        info!(
            runs = self.runs.len(),
            read = self.read,
            unanswered_changes = pending.len(),
            "Caught up with the log: conductor ready."
        );
        for rec in pending.values() {
            intake::answer_change(self, bus, rec).await;
        }
        self.decide_all(bus).await;
    }

    /// Folds in the checkpoint's runs in flight (each read again from its own subjects) and its
    /// unanswered changes; the sequence it was folded through, or `None` when there is no
    /// checkpoint to use (the whole log is read then).
    async fn restore(&mut self, bus: &Bus, last_seq: u64) -> Result<Option<u64>, BusError> {
        let Some(checkpoints) = self.checkpoints.clone() else {
            return Ok(None);
        };
        let bytes = match checkpoints.get(CHECKPOINT).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => {
                warn!(error = %e, "Cannot read the checkpoint: folding the whole log.");
                return Ok(None);
            }
        };
        let checkpoint = match Checkpoint::usable(&bytes, &self.stream_created, last_seq) {
            Ok(c) => c,
            Err(why) => {
                warn!(%why, "Checkpoint not used: folding the whole log.");
                return Ok(None);
            }
        };
        self.from_checkpoint = true;
        for run_id in &checkpoint.in_flight {
            for rec in bus.run_log(run_id).await? {
                self.read += 1;
                self.on_message(bus, rec).await;
            }
        }
        for seq in &checkpoint.unanswered {
            self.read += 1;
            let rec = bus.get(*seq).await?;
            self.on_message(bus, rec).await;
        }
        info!(
            through = checkpoint.through,
            runs = self.runs.len(),
            "Starting from the checkpoint."
        );
        self.consumed = checkpoint.through;
        self.checkpointed = (checkpoint.through, None);
        Ok(Some(checkpoint.through))
    }

    /// Writes where the fold stands, at most every [`CHECKPOINT_EVERY`] and only when
    /// something new was read. A failed write only means a longer start.
    async fn checkpoint(&mut self) {
        let Some(checkpoints) = &self.checkpoints else {
            return;
        };
        let (through, at) = self.checkpointed;
        if self.consumed == through || at.is_some_and(|t| t.elapsed() < CHECKPOINT_EVERY) {
            return;
        }
        let checkpoint = Checkpoint {
            fold: slipway_domain::index::FOLD_VERSION,
            stream_created: self.stream_created.clone(),
            through: self.consumed,
            in_flight: self.runs.keys().cloned().collect(),
            unanswered: self.unanswered.keys().copied().collect(),
        };
        match checkpoints.put(CHECKPOINT, &checkpoint).await {
            Ok(()) => self.checkpointed = (self.consumed, Some(std::time::Instant::now())),
            Err(e) => warn!(error = %e, "Cannot write the checkpoint."),
        }
    }

    /// Changes whose answer could not be appended (NATS trouble) are tried again.
    async fn retry_unanswered(&mut self, bus: &Bus) {
        let pending = std::mem::take(&mut self.unanswered);
        for rec in pending.values() {
            intake::answer_change(self, bus, rec).await;
        }
    }

    async fn decide_all(&mut self, bus: &Bus) {
        let active: Vec<String> = self.active.values().flatten().cloned().collect();
        for id in active {
            self.decide_run(bus, &id).await;
        }
    }

    /// Decides the run's next step and appends the decisions, folding each as it lands.
    async fn decide_run(&mut self, bus: &Bus, run_id: &str) {
        let Some(entry) = self.runs.get(run_id) else {
            return;
        };
        let now = slipway_core::bus::now();
        let pipeline = &entry.run.pipeline;
        let fleet = Fleet::of(
            self.active
                .get(pipeline)
                .into_iter()
                .flatten()
                .filter_map(|id| self.runs.get(id))
                .map(|e| &e.run),
        );
        let commands = decide_in(&entry.run, &fleet, now);
        for cmd in commands {
            let mut event = cmd.to_event(run_id, SOURCE, now);
            event.traceparent = self
                .runs
                .get(run_id)
                .and_then(|e| e.run.traceparent.clone());
            match bus.append(&event, run_id, self.expected_seq(run_id)).await {
                Ok(a) if a.duplicate => {
                    // Already in the log: our view is behind; the reader brings it.
                    debug!(run_id, "Decision already in the log.");
                    return;
                }
                Ok(a) => {
                    info!(run_id, event = event.type_name(), seq = a.seq, "Decided.");
                    self.fold_in(run_id, &event, a.seq);
                }
                Err(AppendError::Conflict { expected, .. }) => {
                    debug!(
                        run_id,
                        expected, "Run moved on; deciding again on the newer events."
                    );
                    return;
                }
                Err(AppendError::Bus(e)) => {
                    warn!(run_id, error = %e, "Cannot append a decision; retrying on the next tick.");
                    return;
                }
            }
        }
    }

    async fn answer(&self, bus: &Bus, q: async_nats::Message) {
        let Some(reply) = q.reply else { return };
        let run_id = q.subject.as_str().rsplit('.').next().unwrap_or_default();
        let indexed = match (&self.index, self.runs.contains_key(run_id)) {
            (Some(index), false) => index.get(run_id).await.ok().flatten(),
            _ => None,
        };
        let body = match (self.runs.get(run_id), indexed) {
            (Some(e), _) => e.run.to_json(),
            // An ended run, from the run index.
            (None, Some(entry)) => entry.run,
            (None, None) if !self.caught_up => {
                serde_json::json!({"error": "conductor is still replaying the log"})
            }
            (None, None) => serde_json::json!({"error": format!("no run {run_id}")}),
        };
        let bytes = serde_json::to_vec(&body).expect("JSON serialises");
        if let Err(e) = bus.client().publish(reply, bytes.into()).await {
            debug!(error = %e, "Cannot answer a query.");
        }
    }
}
