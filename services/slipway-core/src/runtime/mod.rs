//! The service runtime: shutdown signals and the worker loop every stage service shares.
//!
//! A worker consumes `<stage>.requested` through a durable pull consumer named after its
//! service (replicas share it). For each request it checks the log first (a run that ended, or
//! a stage attempt that already has its terminal fact, is acknowledged and skipped), publishes
//! `started`, sends progress acks while the work runs, publishes the terminal fact, and only
//! then acknowledges. Infrastructure errors are nak'ed with a growing delay; after
//! `max_deliver` the request ends as a `failed` fact with the reason, so a run never hangs on
//! a poison message.

pub mod follow;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::bus::{Bus, BusError};
use slipway_domain::admission::{Admission, admit};
use slipway_domain::envelope::Event;
use slipway_domain::events::{EventData, StageKind, StageVerb};
use slipway_domain::fold::Run;
pub use slipway_domain::service::Service;
use slipway_domain::subjects;

/// Cancelled on the first SIGINT or SIGTERM; a second signal exits at once.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("Shutting down: finishing work in flight (signal again to exit at once).");
        t.cancel();
        wait_for_signal().await;
        warn!("Second signal: exiting now.");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// How a worker takes its requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Redelivery after this long without an ack or progress (progress is sent every third).
    pub ack_wait_secs: u64,
    /// Deliveries before a request is given up as a `failed` fact.
    pub max_deliver: i64,
    /// Jobs one process works at once; unset, [`default_concurrency`] of the service.
    pub concurrency: Option<usize>,
    /// On shutdown, wait this long for jobs in flight before abandoning them to a replica.
    pub drain_secs: u64,
    /// Worker id in `started` facts; default `<service>-<host>-<pid>`.
    pub id: Option<String>,
    /// Follow the runs in flight ([`crate::runtime::follow`]) so a job needs no read of the log; off,
    /// every job reads its run's log (no fan-out of every event to every worker process).
    pub follow_runs: bool,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            ack_wait_secs: 30,
            max_deliver: 5,
            concurrency: None,
            drain_secs: 30,
            id: None,
            follow_runs: true,
        }
    }
}

/// A request being worked.
#[derive(Debug)]
pub struct Job {
    pub run_id: String,
    pub stage: String,
    pub attempt: u32,
    pub request: Event,
    /// The request's stream sequence: the run is as of this at least.
    pub seq: u64,
    /// The run folded from the log just before the work started.
    pub run: Run,
    /// How many times the request has been delivered (1 the first time).
    pub delivered: i64,
    pub worker_id: String,
    /// Cancelled when the run is cancelled or the drain period ends: stop the work.
    pub cancel: CancellationToken,
    pub bus: Bus,
    /// The worker's object store and deploy index, shared by its jobs.
    pub objects: crate::store::objects::Objects,
    pub deploys: crate::store::baseline::Deploys,
}

impl Job {
    /// The name under which the job stores an object of its attempt (its log, its details):
    /// `runs/<run>/<stage>-<attempt>.<extension>`, the stage's `:` as `-`.
    pub fn object_name(&self, extension: &str) -> String {
        format!(
            "runs/{}/{}-{}.{extension}",
            self.run_id,
            self.stage.replace(':', "-"),
            self.attempt
        )
    }

    /// Where the job's work hangs its spans (children of the stage attempt's span).
    pub fn scope(&self) -> crate::telemetry::otel::StageScope {
        crate::telemetry::otel::StageScope::new(
            &self.run_id,
            &self.run.pipeline,
            self.request.traceparent.as_deref(),
            &self.stage,
            self.attempt,
        )
    }
}

/// An infrastructure failure during a job: the request is retried later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

impl Transient {
    /// A request the worker was not made for (its consumer's filter and its `kinds` disagree).
    pub fn not_a(request: &Event, what: &str) -> Self {
        Transient(format!("{} is not {what}", request.type_name()))
    }
}

impl From<BusError> for Transient {
    fn from(e: BusError) -> Self {
        Transient(e.to_string())
    }
}

/// A stage service.
pub trait Worker: Send + Sync + 'static {
    /// The service; its name is also the durable consumer's.
    fn service(&self) -> Service;

    /// The stages it works: its service's, unless it says otherwise.
    fn kinds(&self) -> &'static [StageKind] {
        self.service().kinds()
    }

    /// Whether a job may run at most once per stage attempt (a deploy). Its `started` fact is
    /// then appended with run-wide optimistic concurrency, so of two deliveries one starts; a
    /// delivery that finds the attempt already started leaves it to the stage timeout.
    fn exclusive(&self) -> bool {
        false
    }

    /// For an exclusive worker: whether an attempt an earlier delivery started (and never
    /// reported) may be run again, because the work is idempotent (a deploy command that
    /// declares it, by its deploy key).
    fn may_resume(&self, _run: &Run, _request: &Event) -> bool {
        false
    }

    /// The `started` fact (the deployer adds what was live before).
    fn started(&self, job: &Job) -> impl Future<Output = Result<EventData, Transient>> + Send {
        let data = started_data(
            job.request.type_name(),
            &job.stage,
            job.attempt,
            &job.worker_id,
        );
        async move { data.ok_or_else(|| Transient("no started fact for this stage".into())) }
    }

    /// Does the work: returns the terminal fact (`succeeded`, or `failed` with a reason for a
    /// domain failure), or [`Transient`] to retry.
    fn handle(&self, job: &Job) -> impl Future<Output = Result<EventData, Transient>> + Send;
}

pub use slipway_domain::facts::started_data;

/// The event a worker publishes about a job, in the request's trace.
pub fn fact_in(
    service: Service,
    run_id: &str,
    data: EventData,
    traceparent: Option<&str>,
) -> Event {
    let mut e = fact(service, run_id, data);
    e.traceparent = traceparent.map(str::to_string);
    e
}

/// The event a worker publishes about a job now: deterministic id, so a repeat is a duplicate.
pub fn fact(service: Service, run_id: &str, data: EventData) -> Event {
    slipway_domain::facts::fact(service, run_id, data, crate::bus::now())
}

/// Jobs at once of a service whose stages wait: enough that runs waiting on deploys, monitor
/// windows, remote models or load tests do not queue behind each other. A waiting job holds a
/// task, a subscription or a slot in the runs in flight, some kilobytes; the per-environment
/// deploy lanes of the conductor still order deploys where the spec says so.
pub const WAITING_JOBS: usize = 256;

/// Jobs at once by default: [`WAITING_JOBS`] for a service whose stages wait, the machine's
/// cores for one whose stages compute (builds, test suites).
pub fn default_concurrency(service: Service) -> usize {
    if service.waits() {
        WAITING_JOBS
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

/// Runs a worker until `shutdown`, then drains.
///
/// # Errors
/// [`BusError`] when the stream or consumer cannot be set up.
pub async fn run_worker<W: Worker>(
    bus: Bus,
    worker: Arc<W>,
    settings: WorkerSettings,
    health_settings: &crate::health::HealthSettings,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let service = worker.service().name();
    let stream = bus.ensure_stream().await?;
    let filters: Vec<String> = worker
        .kinds()
        .iter()
        .map(|k| subjects::requests(k.as_str()))
        .collect();
    let ack_wait = Duration::from_secs(settings.ack_wait_secs.max(1));
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(service.to_string()),
            description: Some(format!("{service}: stage requests")),
            filter_subjects: filters.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: settings.max_deliver,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Nats {
            operation: "create consumer",
            message: e.to_string(),
        })?;
    let worker_id = settings.id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{service}-{}-{}", host.trim(), std::process::id())
    });
    let health = crate::health::Health::new(worker.service(), &worker_id);
    crate::health::start(&bus, &health, health_settings, shutdown.clone()).await;
    let concurrency = settings
        .concurrency
        .unwrap_or_else(|| default_concurrency(worker.service()))
        .max(1);
    info!(service, worker = %worker_id, ?filters, concurrency, "Worker ready.");

    let tracker = TaskTracker::new();
    let jobs_cancel = CancellationToken::new();
    // Stopped when the loop ends for any reason, so the tracker can drain.
    let helpers = shutdown.child_token();
    let advisories =
        spawn_max_deliveries_listener(&bus, worker.service(), &tracker, helpers.clone()).await?;
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| BusError::Nats {
            operation: "consume",
            message: e.to_string(),
        })?;
    // The view outlives the drain: jobs still running learn of their run's end from it.
    let view_stop = CancellationToken::new();
    let _view_stop = view_stop.clone().drop_guard();
    let objects = crate::store::objects::Objects::new(&bus);
    let deploys = crate::store::baseline::Deploys::new(&bus);
    health.bound(Some(service));
    let runs = if settings.follow_runs {
        Some(
            crate::runtime::follow::RunsInFlight::start_for(&deploys, worker.kinds(), view_stop)
                .await?,
        )
    } else {
        None
    };
    health.caught_up();
    // The loop turns at least every heartbeat, waiting or not: a loop that does not is wedged.
    let turn = crate::health::HEARTBEAT_EVERY;
    'work: loop {
        health.turned();
        let permit = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'work,
                p = permits.clone().acquire_owned() => break p.expect("semaphore never closes"),
                () = tokio::time::sleep(turn) => health.turned(),
            }
        };
        let msg = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'work,
                m = messages.next() => break m,
                () = tokio::time::sleep(turn) => health.turned(),
            }
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(service, error = %e, "Consumer error; continuing.");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            None => break,
        };
        let ctx = Ctx {
            bus: bus.clone(),
            objects: objects.clone(),
            deploys: deploys.clone(),
            worker: worker.clone(),
            settings: settings.clone(),
            worker_id: worker_id.clone(),
            jobs_cancel: jobs_cancel.clone(),
            runs: runs.clone(),
        };
        tracker.spawn(async move {
            ctx.process(msg).await;
            drop(permit);
        });
    }
    helpers.cancel();
    tracker.close();
    let drain = Duration::from_secs(settings.drain_secs);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        warn!(
            service,
            "Drain period over: abandoning jobs in flight to another replica."
        );
        jobs_cancel.cancel();
        tracker.wait().await;
    }
    // Workspaces of the last jobs are removed before the process ends.
    crate::exec::workspace::removals_done().await;
    advisories.abort();
    info!(service, "Worker stopped.");
    Ok(())
}

/// The run a request is for, as looked up before the work.
struct Looked {
    run: Option<Run>,
    /// The stream sequence of the run's last message seen.
    last_seq: u64,
    /// Whether it came from the runs in flight (else from a read of the log).
    from_view: bool,
    ends: RunEnd,
}

/// How a job learns that its run ended while it works.
enum RunEnd {
    /// From the runs in flight, which hold the run: no subscription per job.
    Followed(CancellationToken),
    /// From the run's `run.*` subject.
    Subject(async_nats::Subscriber),
    /// Not watched (the subscription failed; the stage timeout still ends the work).
    Unwatched,
}

impl RunEnd {
    async fn subscribe(bus: &Bus, run_id: &str) -> Self {
        match bus
            .client()
            .subscribe(format!("slipway.run.{run_id}.run.*"))
            .await
        {
            Ok(sub) => RunEnd::Subject(sub),
            Err(e) => {
                warn!(error = %e, "Cannot watch the run's end.");
                RunEnd::Unwatched
            }
        }
    }

    /// Resolves when the run ends; never, when that cannot be seen.
    async fn wait(self) {
        match self {
            RunEnd::Followed(ended) => ended.cancelled().await,
            RunEnd::Subject(mut sub) => loop {
                match sub.next().await {
                    Some(m) if !m.subject.as_str().ends_with(".run.created") => return,
                    Some(_) => {}
                    None => std::future::pending().await,
                }
            },
            RunEnd::Unwatched => std::future::pending().await,
        }
    }
}

struct Ctx<W> {
    bus: Bus,
    objects: crate::store::objects::Objects,
    deploys: crate::store::baseline::Deploys,
    worker: Arc<W>,
    settings: WorkerSettings,
    worker_id: String,
    jobs_cancel: CancellationToken,
    runs: Option<crate::runtime::follow::RunsInFlight>,
}

impl<W: Worker> Ctx<W> {
    async fn process(&self, msg: jetstream::Message) {
        let service = self.worker.service().name();
        let (delivered, seq) = match msg.info() {
            Ok(i) => (i.delivered, i.stream_sequence),
            Err(_) => (1, 0),
        };
        let subject = msg.subject.to_string();
        let Some((run_id, noun, _)) = subjects::parse_run(&subject) else {
            warn!(service, %subject, "Request on an unexpected subject; terminating it.");
            answer(&self.bus, &msg, delivered, Reply::Refuse).await;
            return;
        };
        let run_id = run_id.to_string();
        let kind = StageKind::parse(noun);
        let request = match crate::bus::decode(msg.headers.as_ref(), &msg.payload) {
            Ok(e) => e,
            Err(e) => {
                // A poison request: answer it with a failed fact so the run does not hang.
                warn!(service, %run_id, seq, error = %e, "Malformed request.");
                if let Some(kind) = kind {
                    let data = EventData::stage_failure(
                        kind,
                        kind.as_str(),
                        slipway_domain::decide::FIRST_ATTEMPT,
                        format!("malformed request at stream sequence {seq}: {e}"),
                    );
                    if let Some(stored) = self.publish_then_ack(&msg, &run_id, data).await {
                        stored.span_from_log(&self.bus, &run_id);
                    }
                } else {
                    answer(&self.bus, &msg, delivered, Reply::Refuse).await;
                }
                return;
            }
        };
        let Some((stage, attempt, _)) = request.data.stage_fact() else {
            warn!(service, %run_id, "Request event is not a stage request; terminating it.");
            answer(&self.bus, &msg, delivered, Reply::Refuse).await;
            return;
        };
        let (stage, attempt) = (stage.to_string(), attempt);
        let span = info_span!("job", service, run_id = %run_id, stage = %stage, attempt, delivered);
        let received = std::time::SystemTime::now();
        let traced = crate::telemetry::otel::enabled().then(|| request.clone());
        let ended = self
            .work(msg, run_id.clone(), stage, attempt, request, delivered)
            .instrument(span)
            .await;
        // The handling ends when its fact is stored, and so does the attempt's span, which
        // comes last: the handling and the fact's publishing lie within it.
        let end = ended
            .as_ref()
            .map_or_else(std::time::SystemTime::now, |e| e.stored);
        if let Some(request) = traced {
            crate::telemetry::otel::emit(crate::telemetry::otel::process_span(
                &subject, &run_id, &request, service, received, end, None,
            ));
        }
        if let Some(e) = ended
            && let Some(span) =
                crate::telemetry::otel::stage_span(&e.run, &e.stage, e.attempt, e.stored)
        {
            crate::telemetry::otel::emit(span);
        }
    }

    /// One delivery of a request: look the run up, ask whether to work, state `started`, do
    /// the work while its run is watched, and store its fact. Every reply to the server goes
    /// through [`answer`].
    async fn work(
        &self,
        msg: jetstream::Message,
        run_id: String,
        stage: String,
        attempt: u32,
        request: Event,
        delivered: i64,
    ) -> Option<Ended> {
        // The log read must reach at least the request itself.
        let seq = msg.info().map_or(0, |i| i.stream_sequence);
        let Some(mut looked) = self.look_up(&run_id, seq).await else {
            answer(&self.bus, &msg, delivered, Reply::Retry).await;
            return None;
        };
        let exclusive = self.worker.exclusive();
        let resumed = match admit(looked.run.as_ref(), &stage, attempt, exclusive, |run| {
            self.worker.may_resume(run, &request)
        }) {
            Admission::Work => false,
            Admission::Resume => {
                // Idempotent work whose first try never reported: run it again, same key.
                warn!(
                    "Stage started by an earlier delivery that never reported; the work is idempotent, so it runs again."
                );
                true
            }
            Admission::Skip(why) => {
                info!(?why, "Nothing to do for the request; skipping it.");
                answer(&self.bus, &msg, delivered, Reply::Done).await;
                return None;
            }
            Admission::NoRun => {
                warn!("Request for a run that does not exist; terminating it.");
                answer(&self.bus, &msg, delivered, Reply::Refuse).await;
                return None;
            }
        };
        let job = Job {
            run_id,
            stage,
            attempt,
            request,
            seq,
            run: looked.run.take().expect("admitted requests have a run"),
            delivered,
            worker_id: self.worker_id.clone(),
            cancel: self.jobs_cancel.child_token(),
            bus: self.bus.clone(),
            objects: self.objects.clone(),
            deploys: self.deploys.clone(),
        };
        let (started, started_seq) = self
            .start(&msg, &job, resumed, exclusive, looked.last_seq)
            .await?;
        info!("Stage started.");
        // The run as of the start, for the stage's span at its end (no second read of the log).
        let traced = crate::telemetry::otel::enabled()
            .then(|| slipway_domain::fold::fold(Some(job.run.clone()), &started))
            .flatten();
        let last_seq = looked.last_seq;
        let (result, run_ended) = self.watched(&msg, &job, looked, started_seq).await;
        let traced = traced.map(|run| (run, last_seq));
        self.finish(&msg, &job, result, run_ended, traced).await
    }

    /// The run as the log holds it through the request's sequence `seq`, and how its end will
    /// be seen; `None` when the log cannot be read.
    async fn look_up(&self, run_id: &str, seq: u64) -> Option<Looked> {
        // Check the log before any side effect: a redelivered request may already be done.
        // The runs in flight hold it as far as the request at least, and say when it ends.
        if let Some(runs) = &self.runs
            && let Some((run, last_seq, ended)) = runs.run_and_end_through(run_id, seq).await
        {
            return Some(Looked {
                run: Some(run),
                last_seq,
                from_view: true,
                ends: RunEnd::Followed(ended),
            });
        }
        // Otherwise watch the run's end before reading the log, so an end landing in between
        // is seen: the subscription is in place before the server answers the read.
        let ends = RunEnd::subscribe(&self.bus, run_id).await;
        match self.bus.run_log_through(run_id, seq).await {
            Ok(log) => {
                let last_seq = log.last().map_or(0, |r| r.seq);
                let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
                Some(Looked {
                    run: Run::replay(&events),
                    last_seq,
                    from_view: false,
                    ends,
                })
            }
            Err(e) => {
                warn!(error = %e, "Cannot read the run's log; retrying later.");
                None
            }
        }
    }

    /// States that the job started: its `started` fact, and where this delivery appended it
    /// (none when resumed: the fact is already in the log). `None` when the delivery does not
    /// start (it has been answered).
    async fn start(
        &self,
        msg: &jetstream::Message,
        job: &Job,
        resumed: bool,
        exclusive: bool,
        last_seq: u64,
    ) -> Option<(Event, Option<u64>)> {
        let data = match self.worker.started(job).await {
            Ok(d) => d,
            Err(e) => {
                self.retry_or_give_up(msg, job, e).await;
                return None;
            }
        };
        let started = fact_in(
            self.worker.service(),
            &job.run_id,
            data,
            job.request.traceparent.as_deref(),
        );
        let appended = if resumed {
            return Some((started, None));
        } else if exclusive {
            // Exactly one delivery starts: the append expects the log as just read.
            self.bus.append(&started, &job.run_id, last_seq).await
        } else {
            self.bus.publish(&started).await.map_err(Into::into)
        };
        let reply = match appended {
            Ok(a) if !(exclusive && a.duplicate) => return Some((started, Some(a.seq))),
            Ok(_) | Err(crate::bus::AppendError::Conflict { .. }) => {
                // Another delivery started it, or the run moved on: look again later.
                info!("Start not won; the request is looked at again.");
                Reply::Later(START_LOST)
            }
            Err(crate::bus::AppendError::Bus(e)) => {
                warn!(error = %e, "Cannot publish the started fact; retrying later.");
                Reply::Retry
            }
        };
        answer(&self.bus, msg, job.delivered, reply).await;
        None
    }

    /// Does the job's work while progress acks keep the request ours and the run's end (seen
    /// as it happens) stops it; the result, and whether the run ended meanwhile.
    async fn watched(
        &self,
        msg: &jetstream::Message,
        job: &Job,
        looked: Looked,
        started_seq: Option<u64>,
    ) -> (Result<EventData, Transient>, bool) {
        let guard = CancellationToken::new();
        // Stops the helpers below even if the handler panics (the request is then redelivered).
        let _helpers = guard.clone().drop_guard();
        let progress = {
            // Well inside ack_wait, whatever it is.
            let every =
                Duration::from_millis((self.settings.ack_wait_secs.max(1) * 1000 / 3).max(100));
            let (bus, msg, delivered) = (self.bus.clone(), msg.clone(), job.delivered);
            let guard = guard.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = guard.cancelled() => return,
                        _ = tokio::time::sleep(every) => {
                            answer(&bus, &msg, delivered, Reply::Progress).await;
                        }
                    }
                }
            })
        };
        let run_ended = CancellationToken::new();
        let watcher = {
            let (job_cancel, run_ended, guard) =
                (job.cancel.clone(), run_ended.clone(), guard.clone());
            let ends = looked.ends;
            tokio::spawn(async move {
                tokio::select! {
                    _ = guard.cancelled() => {}
                    // Any end of the run (cancelled, failed elsewhere, ...) stops the work.
                    () = ends.wait() => {
                        run_ended.cancel();
                        job_cancel.cancel();
                    }
                }
            })
        };
        // An end published just before the subscription took may not have been stored when
        // the log was read: it is stored before our `started`, so look between the two.
        if self
            .ended_since(&job.run, looked.from_view, looked.last_seq, started_seq)
            .await
        {
            run_ended.cancel();
            job.cancel.cancel();
        }
        let result = self.worker.handle(job).await;
        guard.cancel();
        progress.abort();
        watcher.abort();
        (result, run_ended.is_cancelled())
    }

    /// Stores the job's fact and answers the request; the attempt as it ended, for its span
    /// (`traced`: the run as of the start and the sequence it was read to, when spans are
    /// exported).
    async fn finish(
        &self,
        msg: &jetstream::Message,
        job: &Job,
        result: Result<EventData, Transient>,
        run_ended: bool,
        traced: Option<(Run, u64)>,
    ) -> Option<Ended> {
        if run_ended {
            info!("Run ended while the stage ran; work stopped.");
            let data = EventData::stage_failure(
                kind_of(job),
                &job.stage,
                job.attempt,
                "the run ended (cancelled or failed elsewhere) while the stage ran".into(),
            );
            // The run's end ended the attempt: the conductor, which folds that end, emits its
            // span.
            self.publish_then_ack(msg, &job.run_id, data).await;
            return None;
        }
        let verb = result
            .as_ref()
            .ok()
            .and_then(|d| d.stage_fact().map(|(_, _, v)| v));
        if self.jobs_cancel.is_cancelled() && verb != Some(StageVerb::Succeeded) {
            // Shutting down cut the work short: leave the request to a replica or our restart.
            answer(&self.bus, msg, job.delivered, Reply::Release).await;
            return None;
        }
        let data = match result {
            Ok(data) => data,
            Err(e) => {
                self.retry_or_give_up(msg, job, e).await;
                return None;
            }
        };
        info!(outcome = ?verb.unwrap_or(StageVerb::Failed), "Stage finished.");
        let stored = self.publish_then_ack(msg, &job.run_id, data).await?;
        // The attempt's span, when spans are exported: ours to emit unless the run ended before
        // our fact was stored (the fold then ignores the fact, and the conductor emits the
        // attempt as cut off).
        let (run, last_seq) = traced?;
        if self.ended_before(&job.run, last_seq, stored.seq).await {
            return None;
        }
        Some(Ended {
            run: slipway_domain::fold::fold(Some(run), &stored.event)?,
            stage: job.stage.clone(),
            attempt: job.attempt,
            stored: stored.at,
        })
    }

    /// Whether the run ended after `last_seq`, as far as `started_seq` (our `started`) at
    /// least: from the runs in flight when they held the run, else read (a resumed attempt,
    /// with no `started` of ours, reads the whole log again).
    async fn ended_since(
        &self,
        run: &Run,
        from_view: bool,
        last_seq: u64,
        started_seq: Option<u64>,
    ) -> bool {
        if let (true, Some(s), Some(runs)) = (from_view, started_seq, &self.runs)
            && let Some(ended) = runs.ended_through(&run.run_id, s).await
        {
            return ended;
        }
        let tail = match started_seq {
            Some(s) => self.bus.run_log_between(&run.run_id, last_seq + 1, s).await,
            None => {
                self.bus
                    .read(&[subjects::run(&run.run_id)], last_seq + 1)
                    .await
            }
        };
        let tail = match tail {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "Cannot read the run's log again; working on.");
                return false;
            }
        };
        let mut now = run.clone();
        for r in &tail {
            if let Ok(e) = &r.event {
                slipway_domain::fold::fold_into(&mut now, e);
            }
        }
        now.is_ended()
    }

    /// Whether the run ended between `last_seq` and our fact at `fact_seq`, in log order: the
    /// fold then ignored the fact. Read from the log (the view says whether a run has ended by
    /// now, not whether before a sequence).
    async fn ended_before(&self, run: &Run, last_seq: u64, fact_seq: u64) -> bool {
        let tail = match self
            .bus
            .run_log_between(&run.run_id, last_seq + 1, fact_seq)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "Cannot read the run's log for the stage's span.");
                return false;
            }
        };
        let mut then = run.clone();
        for r in tail.iter().take_while(|r| r.seq < fact_seq) {
            if let Ok(e) = &r.event {
                slipway_domain::fold::fold_into(&mut then, e);
            }
        }
        then.is_ended()
    }

    async fn retry_or_give_up(&self, msg: &jetstream::Message, job: &Job, e: Transient) {
        if job.delivered >= self.settings.max_deliver {
            error!(error = %e, "Giving up after the last delivery.");
            let data = EventData::stage_failure(
                kind_of(job),
                &job.stage,
                job.attempt,
                format!("gave up after {} deliveries: {e}", job.delivered),
            );
            if let Some(stored) = self.publish_then_ack(msg, &job.run_id, data).await {
                stored.span_from_log(&self.bus, &job.run_id);
            }
        } else {
            warn!(error = %e, "Transient failure; the request will be retried.");
            answer(&self.bus, msg, job.delivered, Reply::Retry).await;
        }
    }

    /// Publishes the job's fact, then acknowledges the request; the fact when this stored it
    /// (not a repeat), for the attempt's span.
    async fn publish_then_ack(
        &self,
        msg: &jetstream::Message,
        run_id: &str,
        data: EventData,
    ) -> Option<Stored> {
        // In the request's trace (a malformed request has none to give).
        let trace = crate::bus::decode(msg.headers.as_ref(), &msg.payload)
            .ok()
            .and_then(|e| e.traceparent);
        let event = fact_in(self.worker.service(), run_id, data, trace.as_deref());
        let mut delay = Duration::from_millis(200);
        for _ in 0..8 {
            match self.bus.publish(&event).await {
                Ok(a) => {
                    let at = std::time::SystemTime::now();
                    answer(&self.bus, msg, 0, Reply::Done).await;
                    return (!a.duplicate).then_some(Stored {
                        seq: a.seq,
                        at,
                        event,
                    });
                }
                Err(e) => {
                    warn!(error = %e, "Cannot publish the fact; retrying.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Not acknowledged: the request comes back and the work is checked against the log.
        answer(&self.bus, msg, 0, Reply::Later(UNPUBLISHED)).await;
        None
    }
}

/// How long a delivery whose start another delivery won waits before it is looked at again.
const START_LOST: Duration = Duration::from_millis(500);
/// How long a request whose fact could not be stored waits before it comes back.
const UNPUBLISHED: Duration = Duration::from_secs(5);

/// What a worker answers the server about a delivered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// Done with it (its fact is stored, or there is nothing to do): acknowledged, and the
    /// server's confirmation awaited, so a redelivery only follows a lost ack.
    Done,
    /// A transient failure: delivered again after a backoff that grows with the deliveries.
    Retry,
    /// Delivered again after this long.
    Later(Duration),
    /// Given back now, for a replica or this worker's restart (shutting down).
    Release,
    /// Still being worked on: the server's ack wait starts again.
    Progress,
    /// Never deliverable (not a request, or for a run that does not exist): terminated.
    Refuse,
}

impl Reply {
    /// The acknowledgement this reply sends, for a request delivered `delivered` times.
    fn ack(self, delivered: i64) -> AckKind {
        match self {
            Reply::Done => AckKind::Ack,
            Reply::Retry => {
                let secs = 1u64 << delivered.clamp(0, 6);
                AckKind::Nak(Some(Duration::from_secs(secs.min(60))))
            }
            Reply::Later(after) => AckKind::Nak(Some(after)),
            Reply::Release => AckKind::Nak(None),
            Reply::Progress => AckKind::Progress,
            Reply::Refuse => AckKind::Term,
        }
    }
}

/// The one place a worker's reply becomes an acknowledgement. A failed ack is only logged: the
/// request then comes back, and its redelivery is checked against the log.
async fn answer(bus: &Bus, msg: &jetstream::Message, delivered: i64, reply: Reply) {
    let sent = match reply {
        Reply::Done => bus.ack_confirmed(msg).await.map_err(|e| e.to_string()),
        other => msg
            .ack_with(other.ack(delivered))
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(error) = sent {
        warn!(%error, ?reply, "The reply to the request did not reach the server.");
    }
}

/// A fact a job stored.
struct Stored {
    seq: u64,
    /// When the server confirmed it.
    at: std::time::SystemTime,
    event: Event,
}

impl Stored {
    /// Emits the span of the attempt this fact ended, reading the run from the log (no run at
    /// hand: a malformed request, a job given up), off the job's path.
    fn span_from_log(self, bus: &Bus, run_id: &str) {
        let Some((stage, attempt, verb)) = self.event.data.stage_fact() else {
            return;
        };
        if !crate::telemetry::otel::enabled() || !verb.is_terminal() {
            return;
        }
        let (bus, run_id, stage) = (bus.clone(), run_id.to_string(), stage.to_string());
        tokio::spawn(async move {
            crate::telemetry::otel::emit_stage_span(&bus, &run_id, &stage, attempt, self.seq).await;
        });
    }
}

/// A stage attempt a job ended, for its span once the job's handling is over.
struct Ended {
    /// The run with the job's fact folded in.
    run: Run,
    stage: String,
    attempt: u32,
    /// When the fact was stored: the attempt's end.
    stored: std::time::SystemTime,
}

fn kind_of(job: &Job) -> StageKind {
    slipway_domain::events::stage_kind_of(job.request.type_name()).unwrap_or(StageKind::Build)
}

/// After `max_deliver`, the server announces the request it stopped delivering; answer it with
/// a `failed` fact (a worker that crashed on every delivery never could).
async fn spawn_max_deliveries_listener(
    bus: &Bus,
    worker: Service,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<tokio::task::AbortHandle, BusError> {
    let service = worker.name();
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{service}",
        bus.stream_name()
    );
    let mut sub = bus
        .client()
        .subscribe(subject)
        .await
        .map_err(|e| BusError::Nats {
            operation: "subscribe advisories",
            message: e.to_string(),
        })?;
    let bus = bus.clone();
    let handle = tracker.spawn(async move {
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = sub.next() => m,
            };
            let Some(m) = m else { return };
            #[derive(Deserialize)]
            struct Advisory {
                stream_seq: u64,
                deliveries: u64,
            }
            let Ok(adv) = serde_json::from_slice::<Advisory>(&m.payload) else {
                continue;
            };
            let Ok(rec) = bus.get(adv.stream_seq).await else {
                continue;
            };
            let Some((run_id, noun, _)) = subjects::parse_run(&rec.subject) else {
                continue;
            };
            let Some(kind) = StageKind::parse(noun) else {
                continue;
            };
            let (stage, attempt) = match &rec.event {
                Ok(e) => match e.data.stage_fact() {
                    Some((s, a, _)) => (s.to_string(), a),
                    None => continue,
                },
                Err(_) => (
                    kind.as_str().to_string(),
                    slipway_domain::decide::FIRST_ATTEMPT,
                ),
            };
            let reason = format!(
                "gave up: the request was delivered {} times without a result \
                 (the {service} crashed or timed out each time)",
                adv.deliveries
            );
            let data = EventData::stage_failure(kind, &stage, attempt, reason);
            let trace = rec
                .event
                .as_ref()
                .ok()
                .and_then(|e| e.traceparent.as_deref());
            match bus.publish(&fact_in(worker, run_id, data, trace)).await {
                Ok(a) => {
                    warn!(service, run_id, %stage, "Request given up after max deliveries.");
                    if !a.duplicate {
                        crate::telemetry::otel::emit_stage_span(
                            &bus, run_id, &stage, attempt, a.seq,
                        )
                        .await;
                    }
                }
                Err(e) => debug!(error = %e, "Cannot publish the give-up fact."),
            }
        }
    });
    Ok(handle.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reply_maps_to_one_acknowledgement() {
        let ack = |r: Reply, d| format!("{:?}", r.ack(d));
        assert_eq!(ack(Reply::Done, 1), "Ack");
        assert_eq!(ack(Reply::Refuse, 1), "Term");
        assert_eq!(ack(Reply::Progress, 3), "Progress");
        assert_eq!(ack(Reply::Release, 2), "Nak(None)");
        assert_eq!(ack(Reply::Later(START_LOST), 9), "Nak(Some(500ms))");
        // A transient failure backs off with the deliveries, up to a minute.
        assert_eq!(ack(Reply::Retry, 1), "Nak(Some(2s))");
        assert_eq!(ack(Reply::Retry, 3), "Nak(Some(8s))");
        assert_eq!(ack(Reply::Retry, 40), "Nak(Some(60s))");
    }
}
