//! The conductor: the only service with pipeline logic, and it holds none of its own state.
//!
//! It follows the whole log with an ordered consumer and folds every run in memory (on start
//! it replays the log first, deciding nothing until it has caught up). Each change becomes a
//! run (deterministic run id, validated spec snapshot in `run.created`) or a
//! `change.rejected` fact naming why. After each event, and on a timer for timeouts, it runs
//! the pure [`decide`](slipway_domain::decide) and appends the resulting decisions with run-wide
//! optimistic concurrency; a decision that loses waits for the newer events and is decided
//! again. Two conductors can run side by side: the log serialises them.
//!
//! It also answers live status queries (`slipway-api.runs.<id>`, core NATS) from its folded
//! state, which `slipway replay` checks against a fresh fold of the log.

mod intake;
mod observe;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use slipway_core::bus::{AppendError, Bus, BusError, Recorded};
use slipway_core::config::Config;
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

/// The conductor's state: every run, and the changes not yet answered.
#[derive(Debug, Default)]
struct State {
    runs: HashMap<String, Entry>,
    /// The runs not ended, by pipeline: what each decision looks at, however many runs
    /// have ended before.
    active: HashMap<String, BTreeSet<String>>,
    /// The last stream sequence stored on each run's subjects, whether or not it decoded:
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
}

/// Runs the conductor until `shutdown`.
///
/// # Errors
/// [`ConductorError`] when NATS cannot be reached or the stream does not fit.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ConductorError> {
    let bus = Bus::connect(&config.nats, "slipway-conductor").await?;
    let stream = bus.ensure_stream().await?;
    let target = bus.last_seq().await?;
    info!(replay_to = target, "Conductor starting: replaying the log.");

    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
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

    let index = match slipway_core::store::runs::RunIndex::open(&bus).await {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(error = %e, "Cannot open the run index: ended runs are not indexed.");
            None
        }
    };
    let mut state = State {
        caught_up: target == 0,
        cdevents: config.conductor.cdevents.clone(),
        index,
        ..Default::default()
    };
    if state.caught_up {
        info!("Log is empty: conductor ready.");
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            m = messages.next() => match m {
                Some(Ok(msg)) => {
                    let seq = match msg.info() {
                        Ok(i) => i.stream_sequence,
                        Err(_) => continue,
                    };
                    let rec = slipway_core::bus::recorded(seq, &msg.message);
                    state.on_message(&bus, rec).await;
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
        let seq = self.last_seqs.entry(run_id.to_string()).or_default();
        *seq = (*seq).max(rec.seq);
        let event = match rec.event {
            Ok(e) => e,
            Err(e) => {
                warn!(%subject, seq = rec.seq, error = %e, "Ignoring a malformed event in the log.");
                return;
            }
        };
        if let EventData::RunCreated(c) = &event.data {
            self.unanswered.remove(&c.change.seq);
        }
        self.fold_in(run_id, &event, rec.seq);
        if self.caught_up {
            self.decide_run(bus, run_id).await;
            // The run may have freed or taken an environment other runs of its pipeline wait for.
            self.decide_pipeline(bus, run_id).await;
        }
    }

    /// Writes the run's entry in the run index when it has just ended (at stream sequence
    /// `seq`), off the decision path: the index is derived, and a failed write only leaves an
    /// entry for `slipway replay --verify --repair` to make.
    fn index_if_ended(&self, run_id: &str, seq: u64) {
        let (Some(index), Some(entry)) = (&self.index, self.runs.get(run_id)) else {
            return;
        };
        if !entry.run.is_ended() {
            return;
        }
        let (index, run_id) = (index.clone(), run_id.to_string());
        let indexed = slipway_domain::index::IndexEntry::of(&entry.run, seq);
        tokio::spawn(async move {
            if let Err(e) = index.put(&run_id, &indexed).await {
                warn!(%run_id, error = %e, "Cannot write the run's index entry.");
            }
        });
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
        if self.caught_up && !was_ended {
            self.index_if_ended(run_id, seq);
        }
    }

    async fn catch_up(&mut self, bus: &Bus) {
        self.caught_up = true;
        let pending = std::mem::take(&mut self.unanswered);
        info!(
            runs = self.runs.len(),
            unanswered_changes = pending.len(),
            "Caught up with the log: conductor ready."
        );
        for rec in pending.values() {
            intake::answer_change(self, bus, rec).await;
        }
        self.decide_all(bus).await;
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
        let body = match self.runs.get(run_id) {
            Some(e) => e.run.to_json(),
            None if !self.caught_up => {
                serde_json::json!({"error": "conductor is still replaying the log"})
            }
            None => serde_json::json!({"error": format!("no run {run_id}")}),
        };
        let bytes = serde_json::to_vec(&body).expect("JSON serialises");
        if let Err(e) = bus.client().publish(reply, bytes.into()).await {
            debug!(error = %e, "Cannot answer a query.");
        }
    }
}
