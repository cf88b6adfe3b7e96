//! OpenTelemetry export over OTLP: one trace per run, and the delivery metrics.
//!
//! Configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
//! per-signal `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `grpc`), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_METRIC_EXPORT_INTERVAL`. With no endpoint, no exporter
//! runs and recording a span costs one atomic load.
//!
//! Spans are built as complete records ([`SpanRecord`]) and only then handed to the SDK's
//! tracer (explicit start and end times, ids given through [`DerivedIds`]), because a run and
//! its stage attempts outlive any one process: a stage is requested by the conductor, started
//! by one worker and may be finished by another after a crash. The process that appends the
//! fact ending a span emits it, once, with its start read from the log and ids derived from
//! the run ([`RunTrace`]), so every service names the same parents without asking and no span
//! is ever left open by a process that dies.
//!
//! Export never slows a run: records go into a bounded queue (`try_send`); when it is full, or
//! an export fails (collector down), the spans are dropped and counted ([`spans_dropped`]).

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{IdGenerator, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::telemetry::trace::RunTrace;
use slipway_domain::envelope::Event;
use slipway_domain::fold::Run;

/// Spans waiting for export; beyond this they are dropped (and counted), never waited for.
const QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
const BATCH_EVERY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static SINK: OnceLock<Sink> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);
static METRICS: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);

struct Sink {
    tracer: opentelemetry_sdk::trace::SdkTracer,
    // Keeps the provider (and so the tracer) alive for the process's life.
    _provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

thread_local! {
    static NEXT_SPAN: Cell<Option<SpanId>> = const { Cell::new(None) };
    static NEXT_TRACE: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Gives the tracer the ids [`emit`] derived (the SDK has no other way to take them); random
/// ids otherwise.
#[derive(Debug)]
pub struct DerivedIds(opentelemetry_sdk::trace::RandomIdGenerator);

impl IdGenerator for DerivedIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN
            .with(Cell::take)
            .unwrap_or_else(|| self.0.new_span_id())
    }
}

/// Hands ended spans to the export task through a bounded queue; never blocks.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Spans dropped so far by this process (queue full or export failed).
pub fn spans_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans exported so far by this process.
pub fn spans_exported() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}

/// Whether metrics are being exported over OTLP.
pub fn metrics_enabled() -> bool {
    METRICS.load(Ordering::Relaxed)
}

/// Whether spans are being exported (an endpoint is configured).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What [`install`] started; [`Otel::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Otel {
    stop: Option<CancellationToken>,
    exporter_task: Option<tokio::task::JoinHandle<()>>,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl Otel {
    /// Exports what is queued (bounded by the export timeout) and stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
        if let Some(task) = self.exporter_task.take() {
            let _ = tokio::time::timeout(EXPORT_TIMEOUT * 2, task).await;
        }
        if let Some(m) = self.meters.take() {
            // The SDK's shutdown blocks on the final export: keep it off the async threads.
            let _ = tokio::task::spawn_blocking(move || m.shutdown()).await;
        }
        let dropped = spans_dropped();
        if dropped > 0 {
            warn!(
                dropped,
                exported = spans_exported(),
                "Spans dropped during this process's life (collector unreachable or too slow)."
            );
        }
    }
}

/// The OTLP transport named by `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    HttpProtobuf,
    Grpc,
}

impl Protocol {
    /// Parses the variable's value (unset: `http/protobuf`, the specification's default).
    ///
    /// # Errors
    /// A message naming the value and the ones supported.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("") | Some("http/protobuf") => Ok(Self::HttpProtobuf),
            Some("grpc") => Ok(Self::Grpc),
            Some(other) => Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported; use \"http/protobuf\" or \"grpc\""
            )),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Starts the OTLP exporters when an endpoint is configured; call once, inside the runtime.
/// A bad setting is logged and leaves export off: telemetry never stops a service. Spans link
/// runs at `run_url_base` (the gateway's `public_url`, see [`run_url`]) when it is known.
pub fn install(service: &str, run_url_base: Option<&str>) -> Otel {
    if let Some(base) = run_url_base {
        set_run_url_base(base);
    }
    let protocol = match Protocol::parse(env("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref()) {
        Ok(p) => p,
        Err(e) => {
            warn!("{e}: no telemetry is exported.");
            return Otel::default();
        }
    };
    let resource = resource(service);
    let mut otel = Otel::default();
    let any = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if any || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() {
        match span_exporter(protocol) {
            Ok(mut exporter) => {
                exporter.set_resource(&resource);
                let (tx, rx) = mpsc::channel(QUEUE);
                let stop = CancellationToken::new();
                let task = tokio::spawn(export_loop(exporter, rx, stop.clone()));
                // The default configuration reads OTEL_TRACES_SAMPLER and its argument.
                let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_span_processor(QueueProcessor { tx })
                    .with_id_generator(DerivedIds(Default::default()))
                    .with_resource(resource.clone())
                    .build();
                let sink = Sink {
                    tracer: provider.tracer_with_scope(
                        InstrumentationScope::builder("slipway")
                            .with_version(env!("CARGO_PKG_VERSION"))
                            .build(),
                    ),
                    _provider: provider,
                };
                if SINK.set(sink).is_ok() {
                    ENABLED.store(true, Ordering::Relaxed);
                    // Every append to a run's subject becomes a publish span.
                    crate::bus::observe_appends(|subject, run_id, event, started, ended| {
                        emit(publish_span(subject, run_id, event, started, ended));
                    });
                    otel.stop = Some(stop);
                    otel.exporter_task = Some(task);
                    info!(?protocol, "Exporting spans over OTLP.");
                } else {
                    task.abort();
                }
            }
            Err(e) => {
                warn!(error = %e, "Cannot build the OTLP span exporter: no spans are exported.")
            }
        }
    }
    if any || env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some() {
        match metric_exporter(protocol) {
            Ok(exporter) => {
                let mut reader =
                    opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                        exporter,
                        opentelemetry_sdk::runtime::Tokio,
                    );
                if let Some(ms) = env("OTEL_METRIC_EXPORT_INTERVAL").and_then(|v| v.parse().ok()) {
                    reader = reader.with_interval(Duration::from_millis(ms));
                }
                let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                    .with_reader(reader.build())
                    .with_resource(resource)
                    .build();
                opentelemetry::global::set_meter_provider(provider.clone());
                METRICS.store(true, Ordering::Relaxed);
                otel.meters = Some(provider);
                info!(?protocol, "Exporting metrics over OTLP.");
            }
            Err(e) => {
                warn!(error = %e, "Cannot build the OTLP metric exporter: no metrics are exported.");
            }
        }
    }
    otel
}

/// `service.name` from `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` when set, else the
/// service's own name.
fn resource(service: &str) -> Resource {
    let builder = Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
    let builder = if named {
        builder
    } else {
        builder.with_service_name(service.to_string())
    };
    builder
        .with_attribute(KeyValue::new("service.instance.id", instance_id(service)))
        .build()
}

fn instance_id(service: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{service}-{}-{}", host.trim(), std::process::id())
}

fn span_exporter(protocol: Protocol) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    let b = opentelemetry_otlp::SpanExporter::builder();
    match protocol {
        Protocol::HttpProtobuf => b
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
        Protocol::Grpc => b.with_tonic().with_timeout(EXPORT_TIMEOUT).build(),
    }
    .map_err(|e| e.to_string())
}

fn metric_exporter(protocol: Protocol) -> Result<opentelemetry_otlp::MetricExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    let b = opentelemetry_otlp::MetricExporter::builder();
    match protocol {
        Protocol::HttpProtobuf => b
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build(),
        Protocol::Grpc => b.with_tonic().with_timeout(EXPORT_TIMEOUT).build(),
    }
    .map_err(|e| e.to_string())
}

/// Batches queued spans and exports them; a failed batch is dropped and counted, never retried
/// (the queue behind it keeps filling only up to its bound).
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(BATCH_EVERY);
    let mut failing = false;
    loop {
        let done = tokio::select! {
            _ = stop.cancelled() => true,
            s = rx.recv() => match s {
                Some(s) => {
                    batch.push(s);
                    if batch.len() < MAX_BATCH {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        if done {
            while let Ok(s) = rx.try_recv() {
                batch.push(s);
            }
        }
        while !batch.is_empty() {
            let take = batch.len().min(MAX_BATCH);
            let chunk: Vec<SpanData> = batch.drain(..take).collect();
            let n = chunk.len() as u64;
            match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(chunk)).await {
                Ok(Ok(())) => {
                    EXPORTED.fetch_add(n, Ordering::Relaxed);
                    if failing {
                        failing = false;
                        info!(dropped = spans_dropped(), "Span export works again.");
                    }
                }
                failed => {
                    DROPPED.fetch_add(n, Ordering::Relaxed);
                    if !failing {
                        failing = true;
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        warn!(%error, "Span export failed; spans are dropped (and counted) until it works.");
                    }
                }
            }
            if !done {
                break;
            }
        }
        if done {
            return;
        }
    }
}

/// One complete span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub name: String,
    pub kind: SpanKind,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    /// The parent was made by another process.
    pub parent_remote: bool,
    /// The trace context's sampled flag, for parent-based samplers.
    pub sampled: bool,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub links: Vec<SpanContext>,
    /// The span failed, with this description.
    pub error: Option<String>,
    /// What happened during it, at its time (a rollout's weights and looks).
    pub events: Vec<opentelemetry::trace::Event>,
}

/// Queues a span for export: a no-op without an endpoint, never waits.
pub fn emit(record: SpanRecord) {
    if !enabled() {
        return;
    }
    let Some(sink) = SINK.get() else { return };
    let flags = if record.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let parent_cx = match record.parent {
        Some(p) => Context::new().with_remote_span_context(SpanContext::new(
            record.trace_id,
            p,
            flags,
            record.parent_remote,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    let links = record
        .links
        .into_iter()
        .map(opentelemetry::trace::Link::with_context)
        .collect();
    let builder = SpanBuilder::from_name(record.name)
        .with_kind(record.kind)
        .with_start_time(record.start)
        .with_attributes(record.attributes)
        .with_links(links)
        .with_events(record.events);
    NEXT_SPAN.with(|c| c.set(Some(record.span_id)));
    NEXT_TRACE.with(|c| c.set(Some(record.trace_id)));
    let mut span = sink.tracer.build_with_context(builder, &parent_cx);
    NEXT_SPAN.with(|c| c.set(None));
    NEXT_TRACE.with(|c| c.set(None));
    span.set_status(match record.error {
        Some(description) => Status::error(description),
        None => Status::Ok,
    });
    span.end_with_timestamp(record.end.max(record.start));
}

fn time(t: DateTime<Utc>) -> SystemTime {
    SystemTime::from(t)
}

/// `cicd.pipeline.task.type` of a stage key: the convention's `build`, `test` and `deploy`,
/// else the stage kind itself.
pub fn task_type(stage: &str) -> &str {
    use slipway_domain::stage::{StageKey, StageKind};
    match StageKey::parse(stage).map(|k| k.kind()) {
        Ok(StageKind::Rollback | StageKind::Deploy) => "deploy",
        Ok(kind) => kind.as_str(),
        Err(_) => stage,
    }
}

fn base_attributes(run: &Run) -> Vec<KeyValue> {
    vec![
        KeyValue::new("cicd.pipeline.name", run.pipeline.clone()),
        KeyValue::new("cicd.pipeline.run.id", run.run_id.clone()),
    ]
}

static RUN_URL_BASE: OnceLock<String> = OnceLock::new();

/// Where people see a run (`<base>/v1/runs/<id>`, the gateway's `public_url`): the spans'
/// `cicd.pipeline.run.url.full` and `cicd.pipeline.task.run.url.full`. Set once at start-up;
/// without it spans name no URL rather than a guessed one.
pub fn set_run_url_base(base: &str) {
    let _ = RUN_URL_BASE.set(base.trim_end_matches('/').to_string());
}

/// The run's URL, when its base is known.
pub fn run_url(run_id: &str) -> Option<String> {
    RUN_URL_BASE
        .get()
        .map(|base| format!("{base}/v1/runs/{run_id}"))
}

/// The run's span (kind SERVER), once the run has ended: from the run's creation (when Slipway
/// received the change; an upstream event's own time is kept as `slipway.change.time`) to its
/// end, or to `now` when the span is emitted later, so that the publishing of the run's last
/// event falls inside it.
pub fn run_span(run: &Run, now: SystemTime) -> Option<SpanRecord> {
    let end = run.finished_at?;
    let outcome = slipway_domain::outcome::run(run)?;
    let t = RunTrace::of(&run.run_id, run.traceparent.as_deref());
    let mut attributes = base_attributes(run);
    attributes.push(KeyValue::new("cicd.pipeline.action.name", "RUN"));
    attributes.push(KeyValue::new("cicd.pipeline.result", outcome.result));
    attributes.push(KeyValue::new(
        "slipway.change.time",
        run.change
            .time
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    ));
    if let Some(url) = run_url(&run.run_id) {
        attributes.push(KeyValue::new("cicd.pipeline.run.url.full", url));
    }
    if let Some(e) = outcome.error_type {
        attributes.push(KeyValue::new("error.type", e));
    }
    Some(SpanRecord {
        name: format!("RUN {}", run.pipeline),
        kind: SpanKind::Server,
        trace_id: t.trace_id,
        span_id: t.run_span,
        parent: t.caller,
        parent_remote: true,
        sampled: t.sampled,
        start: time(run.created_at),
        end: time(end).max(now),
        attributes,
        links: vec![],
        events: vec![],
        error: outcome.error_type.map(|_| {
            run.reason
                .clone()
                .unwrap_or_else(|| run.phase.as_str().into())
        }),
    })
}

/// The span of a stage's current attempt (kind INTERNAL), once it has ended: from its request
/// to its terminal fact, or to `now` when the process that ended the attempt emits it later
/// (after storing the fact and acknowledging the request, which are the attempt's own work).
pub fn stage_span(run: &Run, stage: &str, attempt: u32, now: SystemTime) -> Option<SpanRecord> {
    let s = run.stage(stage)?;
    if s.attempt != attempt {
        return None;
    }
    let outcome = slipway_domain::outcome::task(run, s)?;
    let end = s.finished_at?;
    let start = s.requested_at.or(s.started_at).unwrap_or(end);
    let t = RunTrace::of(&run.run_id, run.traceparent.as_deref());
    let mut attributes = base_attributes(run);
    attributes.extend([
        KeyValue::new("cicd.pipeline.task.name", s.name.clone()),
        KeyValue::new(
            "cicd.pipeline.task.run.id",
            format!("{}/{}/{}", run.run_id, s.name, s.attempt),
        ),
        KeyValue::new("cicd.pipeline.task.run.result", outcome.result),
        KeyValue::new("cicd.pipeline.task.type", task_type(&s.name).to_string()),
        KeyValue::new("slipway.stage.attempt", i64::from(s.attempt)),
    ]);
    if let Some(url) = run_url(&run.run_id) {
        attributes.push(KeyValue::new("cicd.pipeline.task.run.url.full", url));
    }
    if let Some(w) = &s.worker {
        attributes.push(KeyValue::new("cicd.worker.id", w.clone()));
    }
    if let Some(key) = s.key()
        && matches!(
            key.kind(),
            slipway_domain::stage::StageKind::Deploy | slipway_domain::stage::StageKind::Rollback
        )
        && let Some(env) = key.environment()
    {
        attributes.push(KeyValue::new(
            "deployment.environment.name",
            env.to_string(),
        ));
    }
    if let Some(e) = outcome.error_type {
        attributes.push(KeyValue::new("error.type", e));
    }
    let events = rollout_events(run, &s.name, s.attempt);
    Some(SpanRecord {
        name: s.name.clone(),
        kind: SpanKind::Internal,
        trace_id: t.trace_id,
        span_id: t.stage_span(&run.run_id, &s.name, s.attempt),
        parent: Some(t.run_span),
        parent_remote: true,
        sampled: t.sampled,
        start: time(start),
        end: time(end).max(now),
        attributes,
        links: vec![],
        error: outcome
            .error_type
            .map(|_| s.reason.clone().unwrap_or_default()),
        events,
    })
}

/// A rollout stage's weight changes and looks, as events of its span at their times.
fn rollout_events(run: &Run, stage: &str, attempt: u32) -> Vec<opentelemetry::trace::Event> {
    use opentelemetry::trace::Event as SpanEvent;
    let Some(v) = run
        .rollouts
        .iter()
        .find(|v| v.stage == stage && v.attempt == attempt)
    else {
        return Vec::new();
    };
    let mut out: Vec<(SystemTime, SpanEvent)> = Vec::new();
    for w in &v.weights {
        let at = time(w.at);
        out.push((
            at,
            SpanEvent::new(
                "rollout.weight_set",
                at,
                vec![
                    KeyValue::new("slipway.rollout.step", i64::from(w.step) + 1),
                    KeyValue::new("slipway.rollout.weight", w.weight),
                    KeyValue::new(
                        "slipway.rollout.cause",
                        serde_json::to_value(w.cause)
                            .ok()
                            .and_then(|c| c.as_str().map(str::to_string))
                            .unwrap_or_default(),
                    ),
                ],
                0,
            ),
        ));
    }
    for l in &v.looks {
        let at = time(l.at);
        let mut attrs = vec![
            KeyValue::new("slipway.rollout.step", i64::from(l.step) + 1),
            KeyValue::new("slipway.rollout.weight", l.weight),
            KeyValue::new("slipway.rollout.requests.stable", l.requests[0]),
            KeyValue::new("slipway.rollout.requests.candidate", l.requests[1]),
            KeyValue::new("slipway.rollout.decision", l.decision.clone()),
            KeyValue::new("slipway.rollout.reason", l.reason.clone()),
        ];
        if let Some(score) = l.score {
            attrs.push(KeyValue::new("slipway.rollout.score", score));
        }
        for c in &l.comparisons {
            attrs.push(KeyValue::new(
                format!("slipway.rollout.metric.{}.stable", c.metric),
                c.stable,
            ));
            attrs.push(KeyValue::new(
                format!("slipway.rollout.metric.{}.candidate", c.metric),
                c.candidate,
            ));
            attrs.push(KeyValue::new(
                format!("slipway.rollout.metric.{}.verdict", c.metric),
                c.verdict.clone(),
            ));
        }
        if let Some(ab) = &l.ab {
            attrs.push(KeyValue::new("slipway.rollout.ab.effect", ab.effect));
            attrs.push(KeyValue::new("slipway.rollout.ab.p_value", ab.p_value));
        }
        if let Some(sh) = &l.shadow {
            attrs.push(KeyValue::new(
                "slipway.rollout.shadow.pairs",
                sh.pairs as i64,
            ));
            if let Some(a) = sh.agreement {
                attrs.push(KeyValue::new("slipway.rollout.shadow.agreement", a));
            }
            if let Some(x) = sh.similarity {
                attrs.push(KeyValue::new("slipway.rollout.shadow.similarity", x));
            }
        }
        out.push((at, SpanEvent::new("rollout.analysed", at, attrs, 0)));
    }
    out.sort_by_key(|(at, _)| *at);
    out.into_iter().map(|(_, e)| e).collect()
}

/// Emits the span of a stage attempt the caller's fact (at stream sequence `fact_seq`) ended,
/// reading the run from the log: nothing when the attempt had already ended before the fact
/// (a conductor's timeout, the run's end), whose span its ender emits.
pub async fn emit_stage_span(
    bus: &crate::bus::Bus,
    run_id: &str,
    stage: &str,
    attempt: u32,
    fact_seq: u64,
) {
    if !enabled() {
        return;
    }
    let Ok(log) = bus.run_log(run_id).await else {
        return;
    };
    let mut run = None;
    for r in &log {
        let Ok(e) = &r.event else { continue };
        if r.seq == fact_seq {
            let open = run.as_ref().is_some_and(|run: &Run| {
                !run.is_ended()
                    && run
                        .stage(stage)
                        .is_some_and(|s| s.attempt == attempt && !s.status.is_terminal())
            });
            if open
                && let Some(span) = slipway_domain::fold::fold(run, e)
                    .and_then(|run| stage_span(&run, stage, attempt, SystemTime::now()))
            {
                emit(span);
            }
            return;
        }
        run = slipway_domain::fold::fold(run, e);
    }
}

/// Where an event of a run belongs: its stage attempt's span for a stage fact, else the run's.
fn event_parent(run_id: &str, event: &Event) -> (RunTrace, SpanId) {
    let t = RunTrace::of(run_id, event.traceparent.as_deref());
    let stage = event
        .data
        .stage_fact()
        .map(|(s, a, _)| (s.to_string(), a))
        .or_else(|| event.data.approval_stage());
    let parent = match stage {
        Some((s, a)) => t.stage_span(run_id, &s, a),
        None => t.run_span,
    };
    (t, parent)
}

/// `slipway.run.<id>.build.started` as `slipway.run.{run}.build.started`: low cardinality.
fn subject_template(subject: &str, run_id: &str) -> String {
    subject.replacen(&format!(".{run_id}."), ".{run}.", 1)
}

fn message_attributes(
    operation: &str,
    subject: &str,
    run_id: &str,
    event: &Event,
) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("messaging.system", "nats"),
        KeyValue::new("messaging.operation.name", operation.to_string()),
        KeyValue::new(
            "messaging.operation.type",
            if operation == "publish" {
                "send"
            } else {
                "process"
            },
        ),
        KeyValue::new("messaging.destination.name", subject.to_string()),
        KeyValue::new(
            "messaging.destination.template",
            subject_template(subject, run_id),
        ),
        KeyValue::new("messaging.message.id", event.id.clone()),
        KeyValue::new("cloudevents.event_id", event.id.clone()),
        KeyValue::new("cloudevents.event_source", event.source.clone()),
        KeyValue::new("cloudevents.event_type", event.type_name().to_string()),
        KeyValue::new("cicd.pipeline.run.id", run_id.to_string()),
    ];
    if let Some(s) = &event.subject {
        a.push(KeyValue::new("cloudevents.event_subject", s.clone()));
    }
    a
}

/// The publish span (kind PRODUCER) of an event of a run that reached the log: its id derives
/// from the event id, so consumers link to it from the event alone.
pub fn publish_span(
    subject: &str,
    run_id: &str,
    event: &Event,
    start: SystemTime,
    end: SystemTime,
) -> SpanRecord {
    let (t, parent) = event_parent(run_id, event);
    SpanRecord {
        name: format!("publish {}", subject_template(subject, run_id)),
        kind: SpanKind::Producer,
        trace_id: t.trace_id,
        span_id: crate::telemetry::trace::publish_span(&event.id),
        parent: Some(parent),
        parent_remote: true,
        sampled: t.sampled,
        start,
        end,
        attributes: message_attributes("publish", subject, run_id, event),
        links: vec![],
        events: vec![],
        error: None,
    }
}

/// The process span (kind CONSUMER) of a worker handling a delivered request: a child of the
/// request's stage attempt, linked to the span that published the request.
pub fn process_span(
    subject: &str,
    run_id: &str,
    event: &Event,
    consumer: &str,
    start: SystemTime,
    end: SystemTime,
    error: Option<String>,
) -> SpanRecord {
    let (t, parent) = event_parent(run_id, event);
    let mut attributes = message_attributes("process", subject, run_id, event);
    attributes.push(KeyValue::new(
        "messaging.consumer.group.name",
        consumer.to_string(),
    ));
    if error.is_some() {
        attributes.push(KeyValue::new("error.type", "nak"));
    }
    SpanRecord {
        name: format!("process {}", subject_template(subject, run_id)),
        kind: SpanKind::Consumer,
        trace_id: t.trace_id,
        span_id: random_span_id(),
        parent: Some(parent),
        parent_remote: true,
        sampled: t.sampled,
        start,
        end,
        attributes,
        links: vec![SpanContext::new(
            t.trace_id,
            crate::telemetry::trace::publish_span(&event.id),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )],
        error,
        events: vec![],
    }
}

fn random_span_id() -> SpanId {
    let b = uuid::Uuid::new_v4().into_bytes();
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[..8]);
    SpanId::from_bytes(id)
}

/// Where the work of one stage attempt hangs its spans.
#[derive(Debug, Clone)]
pub struct StageScope {
    trace: RunTrace,
    stage_span: SpanId,
    base: Vec<KeyValue>,
}

impl StageScope {
    pub fn new(
        run_id: &str,
        pipeline: &str,
        traceparent: Option<&str>,
        stage: &str,
        attempt: u32,
    ) -> Self {
        let trace = RunTrace::of(run_id, traceparent);
        Self {
            stage_span: trace.stage_span(run_id, stage, attempt),
            trace,
            base: vec![
                KeyValue::new("cicd.pipeline.name", pipeline.to_string()),
                KeyValue::new("cicd.pipeline.run.id", run_id.to_string()),
                KeyValue::new("cicd.pipeline.task.name", stage.to_string()),
            ],
        }
    }

    /// Starts a span for a piece of the stage's work (`checkout`, `command`, `upload`, ...); it
    /// is emitted when dropped, or by [`WorkSpan::fail`].
    pub fn span(&self, name: &str) -> WorkSpan {
        WorkSpan {
            record: enabled().then(|| SpanRecord {
                name: name.to_string(),
                kind: SpanKind::Internal,
                trace_id: self.trace.trace_id,
                span_id: random_span_id(),
                parent: Some(self.stage_span),
                parent_remote: true,
                sampled: self.trace.sampled,
                start: SystemTime::now(),
                end: SystemTime::now(),
                attributes: self.base.clone(),
                links: vec![],
                events: vec![],
                error: None,
            }),
        }
    }
}

impl StageScope {
    /// Emits a finished piece of work whose times the caller measured.
    pub fn record(
        &self,
        name: &str,
        start: SystemTime,
        end: SystemTime,
        attributes: Vec<KeyValue>,
    ) {
        let mut span = self.span(name);
        if let Some(r) = &mut span.record {
            r.start = start;
            r.attributes.extend(attributes);
            r.end = end;
            let r = span.record.take().expect("just set");
            emit(r);
        }
    }
}

/// A span around a piece of work; emitted when dropped.
#[derive(Debug)]
pub struct WorkSpan {
    record: Option<SpanRecord>,
}

impl WorkSpan {
    pub fn attr(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(r) = &mut self.record {
            r.attributes.push(KeyValue::new(key, value));
        }
    }

    /// Ends the span as failed.
    pub fn fail(mut self, error_type: &'static str, description: impl Into<String>) {
        if let Some(r) = &mut self.record {
            r.attributes.push(KeyValue::new("error.type", error_type));
            r.error = Some(description.into());
        }
    }
}

impl Drop for WorkSpan {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.end = SystemTime::now();
            emit(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_from_env_value() {
        assert_eq!(Protocol::parse(None), Ok(Protocol::HttpProtobuf));
        assert_eq!(Protocol::parse(Some("grpc")), Ok(Protocol::Grpc));
        let e = Protocol::parse(Some("http/json")).unwrap_err();
        assert!(e.contains("http/json") && e.contains("grpc"), "{e}");
    }

    #[test]
    fn task_types_and_subject_templates_follow_the_conventions() {
        assert_eq!(task_type("deploy:production"), "deploy");
        assert_eq!(task_type("test:unit"), "test");
        assert_eq!(
            subject_template("slipway.run.r-1.build.started", "r-1"),
            "slipway.run.{run}.build.started"
        );
    }

    #[test]
    fn a_rollout_stages_span_carries_its_weights_and_looks_as_events() {
        use slipway_domain::events::EventData;
        use slipway_domain::rollout::{RolloutAnalysis, WeightCause, WeightSet};
        use slipway_domain::sim::{CANARY_PIPELINE, Sim, artifact};
        let mut sim = Sim::new(CANARY_PIPELINE);
        sim.live
            .insert("production".into(), ("svc-0".into(), artifact("old")));
        sim.run_to_end();
        let at = sim.now;
        let stage = "rollout:production".to_string();
        let judged = [
            EventData::RolloutWeightSet(WeightSet {
                stage: stage.clone(),
                attempt: 1,
                environment: "production".into(),
                step: 0,
                weight: 5.0,
                cause: WeightCause::Step,
                published: vec![],
                at,
            }),
            EventData::RolloutAnalysed(RolloutAnalysis {
                stage: stage.clone(),
                attempt: 1,
                step: 0,
                weight: 5.0,
                elapsed_secs: 30,
                requests: [950.0, 50.0],
                comparisons: vec![],
                score: Some(100.0),
                ab: None,
                shadow: None,
                decision: "promote".into(),
                reason: "score 100".into(),
                at,
            }),
        ];
        // The log as the judge writes it: its weight and look before the rollout's result.
        let mut run = None;
        for e in &sim.log {
            if matches!(e.data, EventData::RolloutSucceeded(_)) {
                for (i, data) in judged.iter().enumerate() {
                    let id = format!("judge-{i}");
                    let judge =
                        slipway_domain::Event::new(id, "/t", e.subject.clone(), at, data.clone());
                    run = slipway_domain::fold::fold(run, &judge);
                }
            }
            run = slipway_domain::fold::fold(run, e);
        }
        let run = run.unwrap();
        let span = stage_span(&run, &stage, 1, SystemTime::now()).unwrap();
        let names: Vec<&str> = span.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["rollout.weight_set", "rollout.analysed"]);
        let attr = |i: usize, key: &str| {
            span.events[i]
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attr(0, "slipway.rollout.weight").as_deref(), Some("5"));
        assert_eq!(
            attr(1, "slipway.rollout.decision").as_deref(),
            Some("promote")
        );
        // Other stages carry none.
        let build = stage_span(&run, "build", 1, SystemTime::now()).unwrap();
        assert!(build.events.is_empty());
    }
}
