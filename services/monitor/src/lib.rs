//! The monitor: `monitor.requested` in, `monitor.succeeded` (verified) or `monitor.failed`
//! (degraded, with an `incident.opened`) out.
//!
//! For the spec's window it probes the environment's health endpoint (status and latency)
//! and, when the spec names them, scrapes the service's Prometheus text endpoint for its error
//! ratio and latency histogram over the window. Every probe re-evaluates the SLOs on what it has
//! seen; a clear breach (from the third probe on) ends the window early, since production
//! should not wait out a window it is failing. The evidence goes into the fact.

pub mod judge;
pub mod prometheus;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_core::bus::{Bus, BusError};
use slipway_core::config::Config;
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_domain::events::{
    Check, EventData, IncidentOpened, MonitorReport, MonitorRequested, MonitorVerdict, Verdict,
};
use slipway_domain::spec::MonitorSpec;
use slipway_domain::{Event, ids, thresholds};
use tracing::{info, warn};

use crate::prometheus::{Scrape, quantile_between};

/// Probes before a breach may end the window early.
const MIN_PROBES: usize = 3;

/// Runs the monitor until `shutdown`.
///
/// # Errors
/// [`BusError`] when NATS cannot be reached or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BusError> {
    let approval_key = match &config.approvals.public_key {
        Some(k) => match slipway_domain::signing::PublicKey::from_base64(k) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "[approvals] public_key: rollout controls are ignored.");
                None
            }
        },
        None => None,
    };
    let bus = Bus::connect(&config.nats, "slipway-monitor").await?;
    let monitor = Monitor {
        judge: judge::Judge {
            exec: config.exec.clone(),
            approval_key,
        },
    };
    // Each monitored deploy or rollout holds a job for its whole window: the monitor's stages
    // wait, so by default hundreds run at once (runtime::default_concurrency).
    run_worker(
        bus,
        Arc::new(monitor),
        config.worker,
        &config.health,
        shutdown,
    )
    .await
}

/// The monitor worker, and the rollouts' judge.
#[derive(Debug)]
pub struct Monitor {
    pub judge: judge::Judge,
}

/// What the window has seen so far.
#[derive(Debug, Default)]
struct Evidence {
    /// (healthy, latency in ms) per probe.
    probes: Vec<(bool, f64)>,
    last_problem: Option<String>,
    before: Option<Scrape>,
    now: Option<Scrape>,
    scrape_error: Option<String>,
}

fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

impl Evidence {
    /// Measured values, and the SLO checks on them.
    /// `final_` marks the window's end, where an SLO still without data fails.
    fn evaluate(
        &self,
        spec: &MonitorSpec,
        scope: &str,
        final_: bool,
    ) -> (BTreeMap<String, f64>, Vec<Check>) {
        let mut metrics = BTreeMap::new();
        let n = self.probes.len();
        if n > 0 {
            let ok = self.probes.iter().filter(|(h, _)| *h).count();
            metrics.insert("availability".to_string(), ok as f64 / n as f64);
            let lat: Vec<f64> = self.probes.iter().map(|(_, l)| *l).collect();
            if let Some(p) = percentile(&lat, 0.95) {
                metrics.insert("probe_p95_ms".into(), p);
            }
            if let Some(p) = percentile(&lat, 0.99) {
                metrics.insert("probe_p99_ms".into(), p);
            }
        }
        if let (Some(before), Some(now)) = (&self.before, &self.now) {
            let names = &spec.metrics;
            if let (Some(req), Some(err)) = (&names.requests, &names.errors) {
                let dr = now.sum(req).unwrap_or(0.0) - before.sum(req).unwrap_or(0.0);
                let de = now.sum(err).unwrap_or(0.0) - before.sum(err).unwrap_or(0.0);
                if dr > 0.0 {
                    metrics.insert("error_rate".into(), (de / dr).clamp(0.0, 1.0));
                }
                metrics.insert("requests".into(), dr.max(0.0));
            }
            if let Some(h) = &names.latency_histogram {
                let (b, a) = (before.buckets(h), now.buckets(h));
                for (name, q) in [("p95_ms", 0.95), ("p99_ms", 0.99)] {
                    if let Some(v) = quantile_between(&b, &a, q) {
                        metrics.insert(name.into(), v * 1000.0);
                    }
                }
            }
        }
        let mut checks = Vec::new();
        for (metric, t) in &spec.slos {
            match metrics.get(metric) {
                Some(v) => checks.push(thresholds::check(metric, Some(scope), *v, None, t)),
                None => {
                    let from_metrics = !metric.starts_with("probe_") && metric != "availability";
                    let (verdict, note) = match (&self.scrape_error, from_metrics) {
                        (Some(e), true) => {
                            (Verdict::Fail, format!("{metric}: metrics unavailable: {e}"))
                        }
                        _ => (
                            Verdict::Pass,
                            format!("{metric}: no data in the window yet"),
                        ),
                    };
                    checks.push(Check {
                        metric: metric.clone(),
                        scope: Some(scope.to_string()),
                        candidate: f64::NAN,
                        baseline: None,
                        delta: None,
                        p_value: None,
                        interval: None,
                        verdict,
                        note,
                        bounds: None,
                        detectable: None,
                    });
                }
            }
        }
        // Health is always watched, SLOs or not: three failed probes in a row are a breach.
        let tail_failed = self.probes.iter().rev().take_while(|(h, _)| !*h).count();
        if !spec.slos.contains_key("availability")
            && (tail_failed >= MIN_PROBES || (final_ && n > 0 && tail_failed == n))
        {
            checks.push(Check {
                metric: "health".into(),
                scope: Some(scope.to_string()),
                candidate: tail_failed as f64,
                baseline: None,
                delta: None,
                p_value: None,
                interval: None,
                verdict: Verdict::Fail,
                note: format!("health: the last {tail_failed} probes failed"),
                bounds: None,
                detectable: None,
            });
        }
        // NaN does not survive JSON: an unmeasured metric is reported through its note only.
        for c in &mut checks {
            if c.candidate.is_nan() {
                c.candidate = 0.0;
            }
        }
        (metrics, checks)
    }
}

impl Worker for Monitor {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::Monitor
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        match &job.request.data {
            EventData::MonitorRequested(req) => watch(job, req).await,
            EventData::RolloutRequested(req) => self.judge.roll_out(job, req).await,
            _ => Err(Transient::not_a(
                &job.request,
                "a monitor or rollout request",
            )),
        }
    }
}

async fn scrape(client: &reqwest::Client, url: &str) -> Result<Scrape, String> {
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| e.to_string())?;
    Ok(Scrape::parse(&text))
}

async fn watch(job: &Job, req: &MonitorRequested) -> Result<EventData, Transient> {
    let started = Instant::now();
    let spec = &req.spec;
    let env = &req.environment.name;
    let report = |verdict, metrics, checks, probes, incident_id, reason| MonitorReport {
        stage: req.stage.clone(),
        attempt: req.attempt,
        environment: env.clone(),
        verdict,
        version: Some(req.version.clone()),
        probes,
        metrics,
        checks,
        incident_id,
        reason,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    let Some(base) = req
        .environment
        .url
        .as_deref()
        .map(|u| u.trim_end_matches('/').to_string())
    else {
        let r = report(
            MonitorVerdict::Degraded,
            BTreeMap::new(),
            Vec::new(),
            0,
            None,
            Some(format!("environment {env} has no url to probe")),
        );
        return Ok(EventData::MonitorFailed(r));
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(spec.probe_timeout_ms))
        .build()
        .map_err(|e| Transient(e.to_string()))?;
    let health = format!("{base}{}", spec.health_path);
    let metrics_url = spec.metrics_path.as_ref().map(|p| format!("{base}{p}"));
    let mut ev = Evidence::default();
    if let Some(url) = &metrics_url {
        match scrape(&client, url).await {
            Ok(s) => ev.before = Some(s),
            Err(e) => ev.scrape_error = Some(e),
        }
    }
    let window = Duration::from_secs(spec.window_secs);
    let interval = Duration::from_millis(spec.probe_interval_ms);
    info!(environment = %env, version = %req.version, window_secs = spec.window_secs, "Watching.");
    let mut early = false;
    loop {
        let t0 = Instant::now();
        let (healthy, problem) = match client.get(&health).send().await {
            Ok(r) if r.status().is_success() => (true, None),
            Ok(r) => (false, Some(format!("{health} answered {}", r.status()))),
            Err(e) => (false, Some(format!("{health}: {e}"))),
        };
        let latency = t0.elapsed().as_secs_f64() * 1000.0;
        ev.probes.push((healthy, latency));
        if problem.is_some() {
            ev.last_problem = problem;
        }
        if let Some(url) = &metrics_url {
            match scrape(&client, url).await {
                // The first successful scrape is the window's start: one failed scrape right
                // after a restart must not roll production back.
                Ok(s) if ev.before.is_none() => {
                    ev.before = Some(s);
                    ev.scrape_error = None;
                }
                Ok(s) => {
                    ev.now = Some(s);
                    ev.scrape_error = None;
                }
                Err(e) => ev.scrape_error = Some(e),
            }
        }
        let (_, checks) = ev.evaluate(spec, env, false);
        if ev.probes.len() >= MIN_PROBES && thresholds::overall(&checks) == Verdict::Fail {
            early = true;
            break;
        }
        if started.elapsed() + interval > window {
            break;
        }
        tokio::select! {
            _ = job.cancel.cancelled() => return Err(Transient("monitoring interrupted".into())),
            _ = tokio::time::sleep(interval.saturating_sub(t0.elapsed())) => {}
        }
    }
    let (metrics, checks) = ev.evaluate(spec, env, true);
    let probes = u32::try_from(ev.probes.len()).unwrap_or(u32::MAX);
    if thresholds::overall(&checks) != Verdict::Fail {
        info!(environment = %env, probes, "Deploy verified.");
        return Ok(EventData::MonitorSucceeded(report(
            MonitorVerdict::Verified,
            metrics,
            checks,
            probes,
            None,
            None,
        )));
    }
    let breaches: Vec<Check> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .cloned()
        .collect();
    let mut reason = breaches
        .iter()
        .map(|c| c.note.clone())
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(p) = &ev.last_problem {
        reason.push_str(&format!(" (last failed probe: {p})"));
    }
    if early {
        reason.push_str(&format!(" after {probes} probes"));
    }
    let incident_id = ids::derived(&[
        &job.run_id,
        "incident",
        &req.stage,
        &req.attempt.to_string(),
    ]);
    let incident = Event::new(
        incident_id.clone(),
        "/slipway/monitor",
        Some(job.run_id.clone()),
        slipway_core::bus::now(),
        EventData::IncidentOpened(IncidentOpened {
            incident_id: incident_id.clone(),
            environment: env.clone(),
            version: req.version.clone(),
            breaches,
            opened_at: slipway_core::bus::now(),
        }),
    );
    let mut incident = incident;
    incident.traceparent = job.request.traceparent.clone();
    job.bus.publish(&incident).await.map_err(Transient::from)?;
    warn!(environment = %env, %reason, "Deploy degraded: incident opened.");
    Ok(EventData::MonitorFailed(report(
        MonitorVerdict::Degraded,
        metrics,
        checks,
        probes,
        Some(incident_id),
        Some(reason),
    )))
}
