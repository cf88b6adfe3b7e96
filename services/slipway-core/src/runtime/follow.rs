//! A worker's view of the runs in flight: the log followed from the worker's start by an
//! ordered consumer and folded in memory, so a job finds its run without a read of the log (a
//! round trip to the server per job, on the path from a request to its `started`).
//!
//! The view vouches only for runs whose `run.created` it folded: a run created before the
//! worker started is read from the log, as is any run when the view lags. Runs that end are
//! let go, so the view holds the runs in flight and no more than [`MAX_RUNS`] of them.
//!
//! A worker's view holds only the runs whose plan has a stage of the worker's kinds; a model
//! evaluator does not fold the runs of a pipeline without an evaluation. Messages of a run it
//! does not hold are not decoded (deploys apart, which the deploy index takes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bus::{Bus, BusError};
use crate::store::baseline::Deploys;
use slipway_domain::events::{EventData, StageKind};
use slipway_domain::fold::{Run, fold, fold_into};
use slipway_domain::subjects;

/// Runs followed at most; past it, new runs are read from the log per job (memory stays
/// bounded whatever is left waiting).
pub const MAX_RUNS: usize = 10_000;

/// How long a job waits for the view to reach its request before reading the log. The view
/// and the worker's consumer get the request at about the same time; a view further behind
/// than this is lagging, and a read is the quicker answer.
const WAIT: Duration = Duration::from_millis(50);

/// How often the follower checks whether its connection was made again. An ordered consumer
/// notices a lost server only after missed heartbeats (about 15 s); jobs running meanwhile
/// would learn of their run's end that late.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

/// The runs in flight, shared by a worker's jobs.
#[derive(Clone)]
pub struct RunsInFlight {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RunsInFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunsInFlight")
            .field("through", &self.through())
            .field("runs", &self.len())
            .finish()
    }
}

struct Inner {
    runs: Mutex<HashMap<String, Followed>>,
    /// Runs are held when their plan requests one of these kinds (`None`: every run).
    kinds: Option<Vec<StageKind>>,
    /// Every message on the runs' subjects up to this stream sequence is folded in.
    through: watch::Sender<u64>,
    /// The index of deploys the view feeds as it follows the log.
    deploys: Deploys,
}

struct Followed {
    run: Run,
    /// The stream sequence of the last message on the run's subjects (for appends that
    /// expect the log as last seen).
    last_seq: u64,
    /// Cancelled when the view sees the run end (jobs of the run stop their work on it).
    ended: CancellationToken,
}

impl RunsInFlight {
    /// Starts following every run from the log's end now, until `shutdown`.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn start(deploys: &Deploys, shutdown: CancellationToken) -> Result<Self, BusError> {
        Self::start_with(deploys, None, shutdown).await
    }

    /// As [`RunsInFlight::start`], holding only the runs that can request a stage of `kinds`
    /// (a worker's): others are read from the log if a job ever needs them.
    ///
    /// # Errors
    /// [`BusError`] when the stream cannot be read.
    pub async fn start_for(
        deploys: &Deploys,
        kinds: &[StageKind],
        shutdown: CancellationToken,
    ) -> Result<Self, BusError> {
        Self::start_with(deploys, Some(kinds.to_vec()), shutdown).await
    }

    async fn start_with(
        deploys: &Deploys,
        kinds: Option<Vec<StageKind>>,
        shutdown: CancellationToken,
    ) -> Result<Self, BusError> {
        let bus = deploys.bus();
        let through = bus.last_seq().await?;
        let view = Self {
            inner: Arc::new(Inner {
                runs: Mutex::new(HashMap::new()),
                kinds,
                through: watch::Sender::new(through),
                deploys: deploys.clone(),
            }),
        };
        // The view also keeps the index of deploys current (a deployer's lookup of what is
        // live then reads nothing).
        deploys.index().lock().follow_from(through);
        tokio::spawn(view.clone().follow(bus.clone(), shutdown));
        Ok(view)
    }

    /// The stream sequence the view has folded through.
    pub fn through(&self) -> u64 {
        *self.inner.through.borrow()
    }

    /// Runs followed now.
    pub fn len(&self) -> usize {
        self.inner.runs.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The run as of stream sequence `seq` at least (a message of the run the caller holds),
    /// with the sequence of the run's last message; `None` when the view cannot vouch for it:
    /// not followed (created before the view, ended, or past [`MAX_RUNS`]) or the view lags.
    pub async fn run_through(&self, run_id: &str, seq: u64) -> Option<(Run, u64)> {
        self.run_and_end_through(run_id, seq)
            .await
            .map(|(run, last_seq, _)| (run, last_seq))
    }

    /// As [`RunsInFlight::run_through`], with a token the view cancels when it sees the run
    /// end (any end after the run returned: the view folds the log in order).
    pub async fn run_and_end_through(
        &self,
        run_id: &str,
        seq: u64,
    ) -> Option<(Run, u64, CancellationToken)> {
        if !self.reached(seq).await {
            return None;
        }
        let runs = self.inner.runs.lock().expect("lock");
        runs.get(run_id)
            .map(|f| (f.run.clone(), f.last_seq, f.ended.clone()))
    }

    /// For a run [`RunsInFlight::run_through`] vouched for: whether it has ended by `seq`
    /// (runs that end are let go, so one no longer followed has ended); `None` when the view
    /// lags.
    pub async fn ended_through(&self, run_id: &str, seq: u64) -> Option<bool> {
        if !self.reached(seq).await {
            return None;
        }
        Some(!self.inner.runs.lock().expect("lock").contains_key(run_id))
    }

    async fn reached(&self, seq: u64) -> bool {
        let mut rx = self.inner.through.subscribe();
        matches!(
            tokio::time::timeout(WAIT, rx.wait_for(|t| *t >= seq)).await,
            Ok(Ok(_))
        )
    }

    async fn follow(self, bus: Bus, shutdown: CancellationToken) {
        let stats = bus.client().statistics();
        loop {
            let connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
            let from = self.through() + 1;
            let mut messages = match open(&bus, from).await {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "Cannot follow the log; jobs read it until it can.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut check = tokio::time::interval(RECONNECT_CHECK);
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = check.tick() => {
                        if stats.connects.load(std::sync::atomic::Ordering::Relaxed) != connects {
                            debug!("Connected again; reopening the log follower.");
                            break;
                        }
                        continue;
                    }
                    m = messages.next() => m,
                };
                match msg {
                    Some(Ok(m)) => {
                        let Ok(info) = m.info() else { continue };
                        let seq = info.stream_sequence;
                        if seq <= self.through() {
                            // The ordered consumer made itself again from the stream's start
                            // (it does when it lost the server before its first message):
                            // open a new one from where the view is instead.
                            debug!(seq, "Log follower went back; reopening it.");
                            break;
                        }
                        self.apply(seq, &m.message);
                    }
                    // The ordered consumer makes itself again after a gap or a lost server.
                    Some(Err(e)) => debug!(error = %e, "Log follower error; it resumes by itself."),
                    None => break,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Folds the message at stream sequence `seq` in.
    fn apply(&self, seq: u64, msg: &async_nats::Message) {
        let subject = msg.subject.as_str();
        if let Some((run_id, _, _)) = subjects::parse_run(subject) {
            // The index takes deploys by subject, as its reads of the log do.
            let deploy = [".deploy.succeeded", ".rollback.succeeded"]
                .iter()
                .any(|s| subject.ends_with(s));
            let created = subject.ends_with(".run.created");
            let held = self.inner.runs.lock().expect("lock").contains_key(run_id);
            // Decoding is most of the cost of a message: only what is taken is decoded.
            let event = (held || created || deploy)
                .then(|| crate::bus::decode(msg.headers.as_ref(), &msg.payload).ok())
                .flatten();
            self.inner
                .deploys
                .index()
                .lock()
                .followed(seq, event.as_ref().filter(|_| deploy));
            let mut runs = self.inner.runs.lock().expect("lock");
            if let Some(f) = runs.get_mut(run_id) {
                // A message that is not an event still counts for the run's last sequence.
                f.last_seq = seq;
                if let Some(e) = &event {
                    fold_into(&mut f.run, e);
                }
                if f.run.is_ended() {
                    f.ended.cancel();
                    runs.remove(run_id);
                }
            } else if let Some(e) = event.filter(|e| matches!(e.data, EventData::RunCreated(_)))
                && runs.len() < MAX_RUNS
                && let Some(run) = fold(None, &e)
                && self
                    .inner
                    .kinds
                    .as_ref()
                    .is_none_or(|k| slipway_domain::plan::requests_any(&run.spec, k))
            {
                runs.insert(
                    run_id.to_string(),
                    Followed {
                        run,
                        last_seq: seq,
                        ended: CancellationToken::new(),
                    },
                );
            }
        }
        self.inner.through.send_replace(seq);
    }
}

type Messages = jetstream::consumer::pull::Ordered;

async fn open(bus: &Bus, from: u64) -> Result<Messages, BusError> {
    let stream = bus
        .jetstream()
        .get_stream_no_info(bus.stream_name())
        .await
        .map_err(|e| BusError::Nats {
            operation: "get stream",
            message: e.to_string(),
        })?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::RUNS.to_string(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Nats {
            operation: "create log follower",
            message: e.to_string(),
        })?;
    consumer.messages().await.map_err(|e| BusError::Nats {
        operation: "follow log",
        message: e.to_string(),
    })
}
