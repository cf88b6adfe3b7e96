//! Prometheus text at `GET /metrics`: delivery metrics from the folded runs (names after the
//! OpenTelemetry CI/CD conventions, dots as underscores) and consumer lag per service from
//! JetStream.

use std::collections::BTreeMap;
use std::fmt::Write;

use futures_util::StreamExt;
use slipway_core::Run;
use slipway_core::fold::StageStatus;

/// Histogram bounds, in seconds.
const BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if v <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn secs(a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>) -> f64 {
    (b - a).num_milliseconds().max(0) as f64 / 1000.0
}

/// The delivery metrics of a set of runs.
pub fn render_runs<'a>(runs: impl IntoIterator<Item = &'a Run>) -> String {
    let mut run_durations: BTreeMap<(String, String), Histogram> = BTreeMap::new();
    let mut active: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut errors: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut stages: BTreeMap<(String, String, String), Histogram> = BTreeMap::new();
    let mut deploys: BTreeMap<String, u64> = BTreeMap::new();
    let mut rollbacks: BTreeMap<String, u64> = BTreeMap::new();
    for run in runs {
        let p = run.pipeline.clone();
        match run.finished_at {
            Some(end) => {
                run_durations
                    .entry((p.clone(), run.phase.as_str().to_string()))
                    .or_default()
                    .observe(secs(run.created_at, end));
            }
            None => {
                let state = if run.phase == slipway_core::Phase::Queued {
                    "pending"
                } else {
                    "executing"
                };
                *active.entry((p.clone(), state)).or_default() += 1;
            }
        }
        if let Some(failed) = run.stages.iter().find(|s| s.status == StageStatus::Failed) {
            let kind = failed
                .name
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            *errors.entry((p.clone(), kind)).or_default() += 1;
        }
        for s in &run.stages {
            let (Some(start), Some(end)) = (s.started_at.or(s.requested_at), s.finished_at) else {
                continue;
            };
            let kind = s.name.split(':').next().unwrap_or_default().to_string();
            let result = if s.status == StageStatus::Succeeded {
                "success"
            } else {
                "failure"
            };
            stages
                .entry((p.clone(), kind.clone(), result.to_string()))
                .or_default()
                .observe(secs(start, end));
            if s.status == StageStatus::Succeeded {
                let env = s
                    .name
                    .split_once(':')
                    .map(|(_, e)| e.to_string())
                    .unwrap_or_default();
                match kind.as_str() {
                    "deploy" => *deploys.entry(env).or_default() += 1,
                    "rollback" => *rollbacks.entry(env).or_default() += 1,
                    _ => {}
                }
            }
        }
    }
    let mut out = String::new();
    out.push_str("# HELP cicd_pipeline_run_duration_seconds Duration of ended pipeline runs.\n# TYPE cicd_pipeline_run_duration_seconds histogram\n");
    for ((p, result), h) in &run_durations {
        h.render(
            &mut out,
            "cicd_pipeline_run_duration_seconds",
            &format!(
                "cicd_pipeline_name=\"{}\",cicd_pipeline_result=\"{}\"",
                esc(p),
                esc(result)
            ),
        );
    }
    out.push_str("# HELP cicd_pipeline_run_active Runs not ended, by state.\n# TYPE cicd_pipeline_run_active gauge\n");
    for ((p, state), n) in &active {
        let _ = writeln!(
            out,
            "cicd_pipeline_run_active{{cicd_pipeline_name=\"{}\",cicd_pipeline_run_state=\"{state}\"}} {n}",
            esc(p)
        );
    }
    out.push_str("# HELP cicd_pipeline_run_errors_total Runs with a failed stage, by the stage's kind.\n# TYPE cicd_pipeline_run_errors_total counter\n");
    for ((p, kind), n) in &errors {
        let _ = writeln!(
            out,
            "cicd_pipeline_run_errors_total{{cicd_pipeline_name=\"{}\",error_type=\"{}\"}} {n}",
            esc(p),
            esc(kind)
        );
    }
    out.push_str("# HELP slipway_stage_duration_seconds Duration of stage attempts, from start (or request) to result.\n# TYPE slipway_stage_duration_seconds histogram\n");
    for ((p, kind, result), h) in &stages {
        h.render(&mut out, "slipway_stage_duration_seconds", &format!("cicd_pipeline_name=\"{}\",cicd_pipeline_task_name=\"{}\",cicd_pipeline_task_run_result=\"{result}\"", esc(p), esc(kind)));
    }
    out.push_str("# HELP slipway_deployments_total Successful deploys by environment.\n# TYPE slipway_deployments_total counter\n");
    for (env, n) in &deploys {
        let _ = writeln!(
            out,
            "slipway_deployments_total{{deployment_environment_name=\"{}\"}} {n}",
            esc(env)
        );
    }
    out.push_str("# HELP slipway_rollbacks_total Successful rollbacks by environment.\n# TYPE slipway_rollbacks_total counter\n");
    for (env, n) in &rollbacks {
        let _ = writeln!(
            out,
            "slipway_rollbacks_total{{deployment_environment_name=\"{}\"}} {n}",
            esc(env)
        );
    }
    out
}

/// One durable consumer's lag: `(name, not yet delivered, delivered and not acknowledged)`.
pub type Lag = (String, u64, u64);

/// The lag of every service's durable consumer.
pub async fn consumer_lag(bus: &slipway_core::bus::Bus) -> Vec<Lag> {
    let mut out = Vec::new();
    let Ok(stream) = bus.jetstream().get_stream_no_info(bus.stream_name()).await else {
        return out;
    };
    let mut consumers = stream.consumers();
    while let Some(Ok(info)) = consumers.next().await {
        // Only the services' durable consumers (readers are ephemeral and unnamed).
        if let Some(name) = info.config.durable_name.clone() {
            out.push((name, info.num_pending, info.num_ack_pending as u64));
        }
    }
    out
}

/// Consumer lag per service: messages not yet delivered and delivered but not acknowledged.
pub async fn render_lag(bus: &slipway_core::bus::Bus) -> String {
    let mut out = String::from(
        "# HELP slipway_consumer_pending_messages Requests waiting for each service's consumer.\n# TYPE slipway_consumer_pending_messages gauge\n# HELP slipway_consumer_ack_pending_messages Requests delivered and not yet acknowledged.\n# TYPE slipway_consumer_ack_pending_messages gauge\n",
    );
    for (name, pending, ack_pending) in consumer_lag(bus).await {
        let _ = writeln!(
            out,
            "slipway_consumer_pending_messages{{consumer=\"{}\"}} {pending}",
            esc(&name),
        );
        let _ = writeln!(
            out,
            "slipway_consumer_ack_pending_messages{{consumer=\"{}\"}} {ack_pending}",
            esc(&name),
        );
    }
    let _ = writeln!(
        out,
        "# HELP slipway_otel_spans_dropped_total Spans this gateway could not export.\n# TYPE slipway_otel_spans_dropped_total counter\nslipway_otel_spans_dropped_total {}",
        slipway_core::otel::spans_dropped()
    );
    out
}

/// Exports consumer lag over OTLP (`slipway.consumer.lag`), sampled every `every`; a no-op
/// unless OTLP metrics are on.
pub fn export_lag(
    bus: slipway_core::bus::Bus,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if !slipway_core::otel::metrics_enabled() {
        return;
    }
    let latest: std::sync::Arc<std::sync::Mutex<Vec<Lag>>> = Default::default();
    let read = latest.clone();
    let gauge = opentelemetry::global::meter("slipway")
        .u64_observable_gauge("slipway.consumer.lag")
        .with_unit("{message}")
        .with_description("Requests waiting for (pending) or held by (ack_pending) each service.")
        .with_callback(move |o| {
            for (name, pending, ack_pending) in read.lock().expect("not poisoned").iter() {
                for (state, n) in [("pending", *pending), ("ack_pending", *ack_pending)] {
                    o.observe(
                        n,
                        &[
                            opentelemetry::KeyValue::new(
                                "messaging.consumer.group.name",
                                name.clone(),
                            ),
                            opentelemetry::KeyValue::new("slipway.lag.state", state),
                        ],
                    );
                }
            }
        })
        .build();
    tokio::spawn(async move {
        let _gauge = gauge;
        loop {
            let lag = consumer_lag(&bus).await;
            *latest.lock().expect("not poisoned") = lag;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
