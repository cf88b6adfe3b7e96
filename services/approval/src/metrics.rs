//! Prometheus text at `GET /metrics`: delivery metrics from the folded runs (names after the
//! OpenTelemetry CI/CD conventions, dots as underscores) and consumer lag per service from
//! JetStream.

use slipway_domain::stage::StageKind;
use std::collections::BTreeMap;
use std::fmt::Write;

use futures_util::StreamExt;
use slipway_domain::{Run, outcome};

/// Histogram bounds, in seconds.
const BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

#[derive(Debug, Default, Clone)]
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

/// The labels of `cicd_pipeline_run_duration_seconds`: pipeline, state, result, error type.
type RunKey = (
    String,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

/// Appends `name="value"` pairs to a label set.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Delivery metrics, added up run by run: the gateway adds each run as it ends (it then leaves
/// the gateway's memory) and renders these with the runs in flight. Counts start with the
/// process, as Prometheus counters do (`rate` and `increase` read across restarts); DORA
/// (`/v1/metrics/dora`) is the view over history.
#[derive(Debug, Default, Clone)]
pub struct Delivery {
    run_durations: BTreeMap<RunKey, Histogram>,
    active: BTreeMap<(String, &'static str), u64>,
    errors: BTreeMap<(String, &'static str), u64>,
    stages: BTreeMap<(String, String, &'static str), Histogram>,
    deploys: BTreeMap<(String, &'static str), u64>,
    rollbacks: BTreeMap<(String, &'static str), u64>,
}

/// The delivery metrics of a set of runs: the same names, label values and durations as the
/// OTLP export ([`slipway_domain::outcome`] is the one mapping), dots as underscores.
pub fn render_runs<'a>(runs: impl IntoIterator<Item = &'a Run>) -> String {
    Delivery::default().render(runs)
}

impl Delivery {
    /// Adds what a run contributes (an ended run's for good).
    pub fn add(&mut self, run: &Run) {
        let p = run.pipeline.clone();
        if let Some(state) = outcome::run_state(run) {
            *self.active.entry((p.clone(), state)).or_default() += 1;
        }
        for d in outcome::run_durations(run) {
            let (result, error) = d
                .outcome
                .map_or((None, None), |o| (Some(o.result), o.error_type));
            self.run_durations
                .entry((p.clone(), d.state, result, error))
                .or_default()
                .observe(d.seconds);
        }
        if let Some(e) = outcome::run(run).and_then(|o| o.error_type) {
            *self.errors.entry((p.clone(), e)).or_default() += 1;
        }
        for s in &run.stages {
            let (Some(o), Some(secs)) = (outcome::task(run, s), outcome::stage_seconds(s)) else {
                continue;
            };
            self.stages
                .entry((p.clone(), s.name.clone(), o.result))
                .or_default()
                .observe(secs);
            let key = s.key();
            let counted = match key.as_ref().map(|k| (k.kind(), k.environment())) {
                Some((StageKind::Deploy, Some(env))) => Some((&mut self.deploys, env)),
                Some((StageKind::Rollback, Some(env))) => Some((&mut self.rollbacks, env)),
                _ => None,
            };
            if let Some((count, env)) = counted {
                *count.entry((env.to_string(), o.result)).or_default() += 1;
            }
        }
    }

    /// These metrics with `runs` (the runs in flight) added.
    pub fn render<'a>(&self, runs: impl IntoIterator<Item = &'a Run>) -> String {
        let mut all = self.clone();
        for run in runs {
            all.add(run);
        }
        all.text()
    }

    fn text(&self) -> String {
        let Self {
            run_durations,
            active,
            errors,
            stages,
            deploys,
            rollbacks,
        } = self;
        let mut out = String::new();
        out.push_str("# HELP cicd_pipeline_run_duration_seconds Time ended pipeline runs spent in each state (pending, executing), from the run's creation to its end.\n# TYPE cicd_pipeline_run_duration_seconds histogram\n");
        for ((p, state, result, error), h) in run_durations {
            let mut l = vec![
                ("cicd_pipeline_name", p.as_str()),
                ("cicd_pipeline_run_state", state),
            ];
            if let Some(r) = result {
                l.push(("cicd_pipeline_result", r));
            }
            if let Some(e) = error {
                l.push(("error_type", e));
            }
            h.render(&mut out, "cicd_pipeline_run_duration_seconds", &labels(&l));
        }
        out.push_str("# HELP cicd_pipeline_run_active Runs not ended, by state.\n# TYPE cicd_pipeline_run_active gauge\n");
        for ((p, state), n) in active {
            let l = labels(&[
                ("cicd_pipeline_name", p),
                ("cicd_pipeline_run_state", state),
            ]);
            let _ = writeln!(out, "cicd_pipeline_run_active{{{l}}} {n}");
        }
        out.push_str("# HELP cicd_pipeline_run_errors_total Runs that ended in an error (a failure, an error or a timeout; not a cancellation), by error type.\n# TYPE cicd_pipeline_run_errors_total counter\n");
        for ((p, e), n) in errors {
            let l = labels(&[("cicd_pipeline_name", p), ("error_type", e)]);
            let _ = writeln!(out, "cicd_pipeline_run_errors_total{{{l}}} {n}");
        }
        out.push_str("# HELP slipway_stage_duration_seconds Duration of stage attempts, from request to result.\n# TYPE slipway_stage_duration_seconds histogram\n");
        for ((p, task, result), h) in stages {
            let l = labels(&[
                ("cicd_pipeline_name", p),
                ("cicd_pipeline_task_name", task),
                ("cicd_pipeline_task_run_result", result),
            ]);
            h.render(&mut out, "slipway_stage_duration_seconds", &l);
        }
        for (name, help, counts) in [
            (
                "slipway_deployments_total",
                "Deploy attempts ended, by environment and result.",
                deploys,
            ),
            (
                "slipway_rollbacks_total",
                "Rollbacks ended, by environment and result.",
                rollbacks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((env, result), n) in counts {
                let l = labels(&[
                    ("deployment_environment_name", env),
                    ("cicd_pipeline_task_run_result", result),
                ]);
                let _ = writeln!(out, "{name}{{{l}}} {n}");
            }
        }

        out
    }
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

/// Whether the gateway is connected to NATS: what the NATS alert reads, since a scrape of the
/// servers says only whether one node answers.
pub fn render_connected(connected: bool) -> String {
    let name = "slipway_nats_connected";
    format!(
        "# HELP {name} Whether the gateway is connected to NATS.\n# TYPE {name} gauge\n{name} {}\n",
        u8::from(connected)
    )
}

/// Consumer lag per service: messages not yet delivered and delivered but not acknowledged.
/// Each family's samples follow its own HELP and TYPE lines (the exposition format's grouping).
pub async fn render_lag(bus: &slipway_core::bus::Bus) -> String {
    let lag = consumer_lag(bus).await;
    let mut out = String::new();
    for (name, help, pick) in [
        (
            "slipway_consumer_pending_messages",
            "Requests waiting for each service's consumer.",
            (|l: &Lag| l.1) as fn(&Lag) -> u64,
        ),
        (
            "slipway_consumer_ack_pending_messages",
            "Requests delivered and not yet acknowledged.",
            |l: &Lag| l.2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for l in &lag {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                labels(&[("consumer", &l.0)]),
                pick(l)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP slipway_otel_spans_dropped_total Spans this gateway could not export.\n# TYPE slipway_otel_spans_dropped_total counter\nslipway_otel_spans_dropped_total {}",
        slipway_core::telemetry::otel::spans_dropped()
    );
    out
}

/// Slack beyond a stage's timeout (and the conductor's grace) before a run counts as past its
/// deadline: the conductor decides timeouts at its ticks, well within this.
pub const OVERDUE_SLACK_SECS: i64 = 60;

/// Runs in flight with a stage past its deadline, by pipeline: a stage requested longer ago
/// than its timeout and grace that no fact ended. The conductor ends such a stage itself, so a
/// count that stays above zero means the conductor is not deciding.
pub fn render_overdue<'a>(
    runs: impl IntoIterator<Item = &'a Run>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut by_pipeline: BTreeMap<&str, u64> = BTreeMap::new();
    for run in runs {
        let e = by_pipeline.entry(run.pipeline.as_str()).or_default();
        // The conductor's own deadline (from a stage's start, a rollout's waits on people
        // excluded), so the metric says exactly that the conductor has not acted.
        let overdue = run.stages.iter().any(|st| {
            slipway_domain::decide::stage_deadline(run, st, now).is_some_and(|deadline| {
                deadline + chrono::Duration::seconds(OVERDUE_SLACK_SECS) < now
            })
        });
        *e += u64::from(overdue);
    }
    let mut out = String::from(
        "# HELP slipway_runs_past_deadline Runs in flight with a stage past its timeout that nothing ended.\n# TYPE slipway_runs_past_deadline gauge\n",
    );
    for (pipeline, n) in by_pipeline {
        let _ = writeln!(
            out,
            "slipway_runs_past_deadline{{{}}} {n}",
            labels(&[("cicd_pipeline_name", pipeline)])
        );
    }
    out
}

/// The service name of a process `slipway up` keeps: `slipway-tester` is `tester`.
fn service_of(process: &str) -> &str {
    process.strip_prefix("slipway-").unwrap_or(process)
}

/// An exit as a number: the exit code, or 128 + the signal (as a shell reports it).
pub fn exit_code(status: &str) -> Option<i64> {
    let number = |rest: &str| -> Option<i64> {
        rest.trim()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    if let Some(rest) = status.strip_prefix("exit status:") {
        number(rest)
    } else {
        status
            .strip_prefix("signal:")
            .and_then(number)
            .map(|s| 128 + s)
    }
}

/// The services' replicas from their heartbeats, and the restarts `slipway up` made.
pub fn render_services(running: &slipway_core::health::Running, required: &[String]) -> String {
    let mut out = String::new();
    let mut live: BTreeMap<&str, (u64, u64, u64)> =
        required.iter().map(|s| (s.as_str(), (0, 0, 0))).collect();
    for r in &running.replicas {
        let e = live.entry(r.service.as_str()).or_default();
        e.0 += u64::from(r.live);
        e.1 += u64::from(r.ready && r.live);
        // Replicas share their service's durable consumer: each reports the same backlog.
        e.2 = e.2.max(r.lag.unwrap_or(0));
    }
    for (name, help, pick) in [
        (
            "slipway_service_replicas",
            "Live replicas of each service, from their heartbeats.",
            (|e: &(u64, u64, u64)| e.0) as fn(&(u64, u64, u64)) -> u64,
        ),
        (
            "slipway_service_ready_replicas",
            "Replicas of each service that are live and ready.",
            |e| e.1,
        ),
        (
            "slipway_service_lag",
            "Requests the service's consumer (shared by its replicas) holds and has not finished.",
            |e| e.2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (service, e) in &live {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                labels(&[("service", service)]),
                pick(e)
            );
        }
    }
    let mut restarts: BTreeMap<&str, (u64, Option<i64>, bool)> = BTreeMap::new();
    for s in &running.supervisors {
        for p in &s.processes {
            let e = restarts.entry(service_of(&p.name)).or_default();
            e.0 += p.restarts;
            if let Some(code) = p.last_exit.as_deref().and_then(exit_code) {
                e.1 = Some(code);
            }
            e.2 |= p.crash_looping;
        }
    }
    let _ = writeln!(
        out,
        "# HELP slipway_service_restarts_total Restarts slipway up made of each process.\n# TYPE slipway_service_restarts_total counter"
    );
    for (service, e) in &restarts {
        let _ = writeln!(
            out,
            "slipway_service_restarts_total{{{}}} {}",
            labels(&[("service", service)]),
            e.0
        );
    }
    let _ = writeln!(
        out,
        "# HELP slipway_service_last_exit_code How each process last ended: its exit code, or 128 + the signal.\n# TYPE slipway_service_last_exit_code gauge"
    );
    for (service, e) in &restarts {
        if let Some(code) = e.1 {
            let _ = writeln!(
                out,
                "slipway_service_last_exit_code{{{}}} {code}",
                labels(&[("service", service)])
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP slipway_service_crash_looping 1 while slipway up reports the process exiting again and again.\n# TYPE slipway_service_crash_looping gauge"
    );
    for (service, e) in &restarts {
        let _ = writeln!(
            out,
            "slipway_service_crash_looping{{{}}} {}",
            labels(&[("service", service)]),
            u8::from(e.2)
        );
    }
    out
}

/// Exports consumer lag over OTLP (`slipway.consumer.lag`), sampled every `every`; a no-op
/// unless OTLP metrics are on.
pub fn export_lag(
    bus: slipway_core::bus::Bus,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if !slipway_core::telemetry::otel::metrics_enabled() {
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
