//! The performance gate: `perf.requested` in, a gate report out.
//!
//! It drives the gated environment (staging) with the built-in load generator ([`loadgen`]),
//! reports p50 / p95 / p99 / max latency, throughput and error rate, and checks the spec's
//! tolerances: absolute bounds, and regressions against the baseline (the version live in
//! production, its figures and latency sample read back from the log). A percentile's
//! regression beyond its tolerance fails only when a bootstrap interval of the difference of
//! that percentile between the two latency samples lies above zero; otherwise it warns. An optional benchmark command (criterion's JSON messages)
//! is compared with the baseline's benchmark results the same way.

pub mod criterion;
pub mod loadgen;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slipway_core::bus::{Bus, BusError};
use slipway_core::config::Config;
use slipway_core::exec::workspace::Workspace;
use slipway_core::exec::{self, Cmd, ExecSettings};
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_core::store::{baseline, objects};
use slipway_domain::events::{Check, EventData, GateReport, PerfRequested, Verdict};
use slipway_domain::spec::{LoadMode, Threshold};
use slipway_domain::{stats, thresholds};
use tracing::info;

use crate::loadgen::{Load, Measured, Mode};
use opentelemetry::KeyValue;

/// Runs the performance gate until `shutdown`.
///
/// # Errors
/// [`BusError`] when NATS cannot be reached or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BusError> {
    let bus = Bus::connect(&config.nats, "slipway-perf-regression").await?;
    let worker = Arc::new(PerfGate {
        exec: config.exec.clone(),
        logs_bucket: config.nats.stream.logs_bucket.clone(),
    });
    run_worker(bus, worker, config.worker, &config.health, shutdown).await
}

#[derive(Debug)]
pub struct PerfGate {
    pub exec: ExecSettings,
    pub logs_bucket: String,
}

/// Stored with the run: the latency sample, for later runs' comparisons.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Details {
    pub latencies_ms: Vec<f64>,
    #[serde(default)]
    pub benchmarks_ns: BTreeMap<String, f64>,
}

impl Worker for PerfGate {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::PerfRegression
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        let EventData::PerfRequested(req) = &job.request.data else {
            return Err(Transient::not_a(&job.request, "a performance request"));
        };
        self.measure(job, req).await
    }
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The statistical evidence of a latency regression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Evidence {
    /// A bootstrap interval of candidate − baseline for a percentile: significant when it lies
    /// above 0 (the candidate slower).
    Interval([f64; 2], f64),
}

impl Evidence {
    fn significant(self) -> bool {
        match self {
            Evidence::Interval([lo, _], _) => lo > 0.0,
        }
    }

    fn describe(self) -> String {
        match self {
            Evidence::Interval([lo, hi], alpha) => format!(
                "bootstrap {:.0}% interval of the difference [{lo:.3}, {hi:.3}]",
                (1.0 - alpha) * 100.0
            ),
        }
    }
}

/// Checks one figure: absolute bounds decide outright; a regression beyond its tolerance
/// fails only when the evidence (if any) finds it significant, and warns otherwise.
pub fn check_figure(
    metric: &str,
    value: f64,
    baseline: Option<f64>,
    t: &Threshold,
    evidence: Option<Evidence>,
) -> Check {
    let absolute = Threshold {
        max_regression: None,
        max_regression_pct: None,
        ..t.clone()
    };
    let abs = thresholds::check(metric, None, value, None, &absolute);
    let mut c = thresholds::check(metric, None, value, baseline, t);
    if let Some(Evidence::Interval(iv, _)) = evidence {
        c.interval = Some(iv);
    }
    let described = match evidence {
        Some(e) => e.describe(),
        None => "the bound decides alone".into(),
    };
    match (baseline, c.delta) {
        (Some(b), Some(d)) => {
            c.note = format!("{}; baseline {b:.3}, delta {d:+.3}, {described}", c.note)
        }
        _ => c.note = format!("{}; no baseline: absolute tolerances only", c.note),
    }
    if abs.verdict != Verdict::Pass {
        c.verdict = abs.verdict;
    } else if c.verdict == Verdict::Fail && evidence.is_some_and(|e| !e.significant()) {
        c.verdict = Verdict::Warn;
        c.note
            .push_str(" (regression not statistically significant)");
    }
    c
}

impl PerfGate {
    async fn measure(&self, job: &Job, req: &PerfRequested) -> Result<EventData, Transient> {
        let started = Instant::now();
        let spec = &req.spec;
        let fail = |reason: String| {
            EventData::PerfFailed(GateReport {
                stage: req.stage.clone(),
                attempt: req.attempt,
                verdict: Verdict::Fail,
                metrics: BTreeMap::new(),
                checks: Vec::new(),
                baseline_run: None,
                details: None,
                reason: Some(reason),
                duration_ms: ms(started),
            })
        };
        let Some(base_url) = req.environment.url.as_deref() else {
            return Ok(fail(format!(
                "environment {} has no url to load",
                req.environment.name
            )));
        };
        let url = format!("{}{}", base_url.trim_end_matches('/'), spec.path);
        let Ok(method) = reqwest::Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
        else {
            return Ok(fail(format!(
                "method {:?} is not an HTTP method",
                spec.method
            )));
        };
        // A quick probe: an unreachable endpoint fails in seconds, not after the whole load.
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Transient(e.to_string()))?;
        let mut req_probe = probe.request(method.clone(), &url);
        if let Some(b) = &spec.body {
            req_probe = req_probe
                .header("content-type", "application/json")
                .body(b.clone());
        }
        if let Err(e) = req_probe.send().await {
            return Ok(fail(format!("endpoint unreachable: {url}: {e}")));
        }
        let load = Load {
            url: url.clone(),
            method,
            body: spec.body.clone(),
            mode: match spec.mode {
                LoadMode::Open => Mode::Open {
                    rate_per_sec: f64::from(spec.rate_per_sec),
                },
                LoadMode::Closed => Mode::Closed {
                    concurrency: spec.concurrency as usize,
                },
            },
            warmup: Duration::from_secs(spec.warmup_secs),
            duration: Duration::from_secs(spec.duration_secs),
            timeout: Duration::from_secs(10),
        };
        info!(%url, mode = ?spec.mode, duration_secs = spec.duration_secs, "Load test starting.");
        let scope = job.scope();
        let t0 = std::time::SystemTime::now();
        let m: Measured = tokio::select! {
            m = loadgen::run(&load, &job.run_id) => m,
            _ = job.cancel.cancelled() => return Err(Transient("load test interrupted".into())),
        };
        let t_end = std::time::SystemTime::now();
        let measure_from = (t0 + load.warmup).min(t_end);
        scope.record("load warmup", t0, measure_from, vec![]);
        scope.record(
            "load measure",
            measure_from,
            t_end,
            vec![
                KeyValue::new("url.full", url.clone()),
                KeyValue::new("slipway.load.requests", (m.ok + m.errors) as i64),
                KeyValue::new("slipway.load.errors", m.errors as i64),
            ],
        );
        let mut metrics = BTreeMap::new();
        metrics.insert("p50_ms".to_string(), m.percentile_ms(0.50));
        metrics.insert("p95_ms".to_string(), m.percentile_ms(0.95));
        metrics.insert("p99_ms".to_string(), m.percentile_ms(0.99));
        metrics.insert("max_ms".to_string(), m.histogram.max() as f64 / 1000.0);
        metrics.insert("throughput_rps".to_string(), m.throughput_rps());
        metrics.insert("error_rate".to_string(), m.error_rate());
        metrics.insert("requests".to_string(), (m.ok + m.errors) as f64);

        let ws = Workspace::create(&self.exec, &format!("{}-perf", job.run_id))
            .map_err(|e| Transient(e.to_string()))?;
        let mut details = Details {
            latencies_ms: m.samples.clone(),
            ..Default::default()
        };
        if let Some(bench) = &spec.benchmark {
            if let Err(e) = ws.checkout(&req.source, &self.exec, &job.cancel).await {
                return Ok(fail(format!("checkout for the benchmark failed: {e}")));
            }
            let log = ws.out().join("bench.log");
            let out = exec::run_in(
                &scope,
                Cmd {
                    argv: &bench.command,
                    cwd: &ws.src(),
                    env: self.exec.base_env(&ws.home()),
                    timeout: Duration::from_secs(spec.timeout_secs),
                    log: &log,
                },
                &job.cancel,
            )
            .await
            .map_err(|e| Transient(e.to_string()))?;
            if !out.exit.success() {
                return Ok(fail(format!(
                    "benchmark command failed with {}: {}",
                    out.exit,
                    exec::log_tail(&log, 10)
                )));
            }
            details.benchmarks_ns =
                criterion::parse(&std::fs::read_to_string(&log).unwrap_or_default());
            for (id, ns) in &details.benchmarks_ns {
                metrics.insert(format!("bench.{id}_ns"), *ns);
            }
        }

        // The baseline: the production version's own performance report and latency sample.
        let base = baseline::gate_baseline(&job.deploys, &job.run, &req.stage).await?;
        let base_details: Option<Details> = baseline::details(
            &job.objects,
            base.as_ref().map(|(_, g)| g),
            &ws.out().join("baseline.json"),
        )
        .await;
        // A latency percentile's regression is tested on that percentile: a bootstrap interval
        // of the difference between the two samples' quantiles (a shift of the bulk, which a
        // rank test sees, says little about the tail).
        let base_sample = base_details
            .as_ref()
            .map(|d| d.latencies_ms.clone())
            .filter(|v| !v.is_empty() && !m.samples.is_empty());
        let mut rng = stats::Rng::from_text(&job.run_id);
        let mut evidence_for = |metric: &str| -> Option<Evidence> {
            let q = match metric {
                "p50_ms" => 0.50,
                "p95_ms" => 0.95,
                "p99_ms" => 0.99,
                _ => return None,
            };
            let base = base_sample.as_ref()?;
            let iv = stats::bootstrap_quantile_diff(
                &m.samples,
                base,
                q,
                1000,
                1.0 - spec.significance,
                &mut rng,
            )?;
            Some(Evidence::Interval(iv, spec.significance))
        };
        let mut checks = Vec::new();
        if base.is_none() {
            checks.push(thresholds::no_baseline(None, "tolerances"));
        }
        for (metric, t) in &spec.tolerances {
            let value = metrics.get(metric).copied().unwrap_or(0.0);
            let base_value = base
                .as_ref()
                .and_then(|(_, g)| g.metrics.get(metric).copied());
            let evidence = evidence_for(metric);
            checks.push(check_figure(metric, value, base_value, t, evidence));
        }
        if let Some(bench) = &spec.benchmark {
            for (id, ns) in &details.benchmarks_ns {
                let key = format!("bench.{id}_ns");
                let t = Threshold {
                    max_regression_pct: Some(bench.max_regression_pct),
                    ..Default::default()
                };
                let base_value = base
                    .as_ref()
                    .and_then(|(_, g)| g.metrics.get(&key).copied());
                checks.push(check_figure(&key, *ns, base_value, &t, None));
            }
        }
        let path = ws.out().join("perf.json");
        std::fs::write(
            &path,
            serde_json::to_vec(&details).expect("details serialise"),
        )
        .map_err(|e| Transient(e.to_string()))?;
        let name = job.object_name("json");
        let stored = objects::put_file(&job.objects, &self.logs_bucket, Some(&name), &path).await?;
        let (verdict, reason) = thresholds::verdict_and_reason(&checks);
        info!(?verdict, requests = m.ok + m.errors, "Load test done.");
        let report = GateReport {
            stage: req.stage.clone(),
            attempt: req.attempt,
            verdict,
            metrics,
            checks,
            baseline_run: base.map(|(r, _)| r),
            details: Some(stored),
            reason,
            duration_ms: ms(started),
        };
        Ok(if verdict == Verdict::Fail {
            EventData::PerfFailed(report)
        } else {
            EventData::PerfSucceeded(report)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_verdicts() {
        let t = Threshold {
            max: Some(500.0),
            max_regression_pct: Some(50.0),
            ..Default::default()
        };
        // Twice as slow, and the interval says so: fail.
        let c = check_figure(
            "p95_ms",
            20.0,
            Some(10.0),
            &t,
            Some(Evidence::Interval([8.0, 12.0], 0.05)),
        );
        assert_eq!(c.verdict, Verdict::Fail, "{}", c.note);
        assert!(
            c.note.contains("baseline 10.000, delta +10.000"),
            "{}",
            c.note
        );
        // Beyond the tolerance but the interval includes 0: warn.
        let c = check_figure(
            "p95_ms",
            20.0,
            Some(10.0),
            &t,
            Some(Evidence::Interval([-1.0, 15.0], 0.05)),
        );
        assert_eq!(c.verdict, Verdict::Warn, "{}", c.note);
        // Over the absolute bound: fail whatever the evidence.
        let c = check_figure(
            "p95_ms",
            600.0,
            Some(590.0),
            &t,
            Some(Evidence::Interval([-5.0, 20.0], 0.05)),
        );
        assert_eq!(c.verdict, Verdict::Fail);
        // No baseline: the bound only.
        let c = check_figure("p95_ms", 20.0, None, &t, None);
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.note.contains("no baseline"), "{}", c.note);
    }
}
