//! `slipway bench --org`: Slipway as a whole organisation uses it, measured in one run on its
//! own nats-server and services.
//!
//! - **Lead time**: `--pipelines` pipelines (200) submitted over a few seconds, each with stages
//!   whose commands only sleep for seeded, realistic durations (a build of 2-20 s, two test
//!   suites, a staging deploy, a model evaluation against a slow model and a load test in
//!   parallel, an automatic approval, a production deploy, a monitor window). Each run's time
//!   from change to `succeeded` over its own critical path (the sum of its planned durations
//!   along the plan), p50 / p99 / max, and the largest queue wait of any stage (requested to
//!   started). `--time-scale` shrinks every duration (CI runs it small).
//! - **History**: `--history` ended runs (1,000,000) written straight to the log and the run
//!   index, as a year of an organisation leaves them, with the checkpoints the services would
//!   have written; then every service is started on it: start to ready and to its first
//!   decision, resident memory, an old run's status (CLI path and gateway), a page of
//!   `GET /v1/runs`, DORA over a year; and the conductor started without a checkpoint (the
//!   whole log folded), beside it.
//!
//! The sleeps use no CPU, so every worker's concurrency is set high for the lead-time part
//! (the default for waiting stages): what is left over the critical path is Slipway's own
//! queueing and overhead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::{Value, json};
use slipway_core::bus::Bus;
use slipway_core::exec::server::free_ports;
use slipway_domain::events::{ChangeSubmitted, EventData, SourceRef};
use slipway_domain::{Event, ids};

use crate::bench::rss_mb;
use crate::out::outln;
use crate::up::{Access, Stack};

/// How big an organisation-scale run is.
#[derive(Debug, Clone)]
pub struct Options {
    pub pipelines: usize,
    pub history: usize,
    /// Every planned duration is multiplied by this.
    pub time_scale: f64,
    pub seed: u64,
    pub json: bool,
    pub data_dir: Option<PathBuf>,
}

/// A small deterministic generator (splitmix64): the same seed plans the same organisation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)` seconds.
    fn secs(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One pipeline's planned stage durations, in seconds (already scaled).
#[derive(Debug, Clone)]
struct Plan {
    build: f64,
    tests: [f64; 2],
    staging: f64,
    evaluation: f64,
    load_test: u64,
    production: f64,
    window: u64,
}

impl Plan {
    fn draw(rng: &mut Rng, scale: f64) -> Self {
        let mut s = |lo: f64, hi: f64| (rng.secs(lo, hi) * scale * 100.0).round() / 100.0;
        let build = s(2.0, 20.0);
        let tests = [s(1.0, 10.0), s(1.0, 10.0)];
        let staging = s(2.0, 10.0);
        let evaluation = s(2.0, 15.0);
        // Whole seconds: the load test's duration and the monitor window are so specified.
        let load_test = s(5.0, 30.0).round().max(1.0) as u64;
        let production = s(2.0, 10.0);
        let window = s(30.0, 120.0).round().max(1.0) as u64;
        Self {
            build,
            tests,
            staging,
            evaluation,
            load_test,
            production,
            window,
        }
    }

    /// The work planned along the plan: build, the longer suite, staging, the longer gate,
    /// production, the monitor window (the automatic approval takes no time).
    fn critical_path(&self) -> f64 {
        self.build
            + self.tests[0].max(self.tests[1])
            + self.staging
            + self.evaluation.max(self.load_test as f64)
            + self.production
            + self.window as f64
    }

    fn spec(&self, name: &str, url: &str) -> String {
        format!(
            r#"[pipeline]
name = "{name}"
[build]
command = ["sh", "-c", "sleep {build} && mkdir -p dist && echo ok > dist/a"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["sleep", "{t0}"]
[[test]]
name = "integration"
kind = "integration"
command = ["sleep", "{t1}"]
[[environment]]
name = "staging"
url = "{url}"
[environment.deploy]
command = ["sleep", "{staging}"]
[[environment]]
name = "production"
url = "{url}"
requires_approval = true
[environment.deploy]
command = ["sleep", "{production}"]
[gates]
environment = "staging"
[gates.model_evaluation]
endpoint = {{ kind = "command", command = ["sh", "-c", "sleep {evaluation}; while read -r l; do echo 4; done"] }}
[[gates.model_evaluation.dataset]]
name = "sums"
path = "eval/sums.jsonl"
[gates.model_evaluation.dataset.thresholds]
exact_match = {{ min = 0.5 }}
[gates.performance]
path = "/healthz"
method = "GET"
mode = "open"
rate_per_sec = 2
duration_secs = {load}
warmup_secs = 0
[gates.performance.tolerances]
error_rate = {{ max = 0.5 }}
[approval]
allowed_groups = ["release-managers"]
auto_approve = "when_clean"
[monitor]
environments = ["production"]
window_secs = {window}
probe_interval_ms = {probe}
health_path = "/healthz"
rollback = false
[monitor.slos]
availability = {{ min = 0.5 }}
"#,
            build = self.build,
            t0 = self.tests[0],
            t1 = self.tests[1],
            staging = self.staging,
            production = self.production,
            evaluation = self.evaluation,
            load = self.load_test,
            window = self.window,
            probe = (self.window * 1000 / 4).clamp(250, 15_000),
        )
    }
}

const DATASET: &str = "{\"id\":\"1\",\"prompt\":\"2+2\",\"expected\":\"4\"}\n{\"id\":\"2\",\"prompt\":\"1+3\",\"expected\":\"4\"}\n";

/// Where the servers keep their data unless `--data-dir` says otherwise (removed after).
pub fn default_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("slipway-bench-org-{}", std::process::id()))
}

/// `slipway bench --org`.
pub async fn bench(opts: Options) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(opts.pipelines > 0, "--pipelines must be at least 1");
    anyhow::ensure!(opts.history > 0, "--history must be at least 1");
    anyhow::ensure!(
        opts.time_scale > 0.0 && opts.time_scale.is_finite(),
        "--time-scale must be a positive number"
    );
    let data = opts.data_dir.clone().unwrap_or_else(default_data_dir);
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let [gateway_port, nats_port] = free_ports();
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    let config = data.join("slipway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\ncdevents = false\n\n\
             [worker]\nconcurrency = 512\n\n[conductor]\ntick_millis = 100\n"
        ),
    )?;
    let mut stack = Stack::start_env(
        None,
        nats_port,
        &data,
        Some(&config),
        std::env::var_os("SLIPWAY_BENCH_LOGS").is_none(),
        Vec::new(),
        Access::LeastPrivilege,
    )
    .await?;
    let measured = async {
        wait_ready(&gateway, Duration::from_secs(60)).await?;
        let bus = Bus::connect(&stack.settings("admin"), "slipway-bench-org").await?;
        bus.ensure_stream().await?;
        let lead = lead_time(&bus, &gateway, &data, &opts).await?;
        let history = history(&mut stack, &bus, &gateway, &data, &opts).await?;
        anyhow::Ok((lead, history))
    }
    .await;
    stack.stop().await;
    if opts.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&data);
    }
    let (lead, history) = measured?;
    let report = json!({
        "pipelines": opts.pipelines,
        "time_scale": opts.time_scale,
        "seed": opts.seed,
        "lead_time": lead,
        "history": history,
    });
    if opts.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_markdown(&report);
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_ready(gateway: &str, within: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Ok(r) = reqwest::get(format!("{gateway}/healthz")).await
            && r.status().is_success()
            && let Ok(v) = json_of(r).await
            && v["caught_up"] == true
        {
            return Ok(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the gateway at {gateway} was not ready within {within:?}")
}

/// A response's body as JSON (the CLI's HTTP client is built without reqwest's `json`).
async fn json_of(r: reqwest::Response) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&r.bytes().await?)?)
}

fn change_event(project: &Path, spec: String) -> Event {
    Event::new(
        ids::random(),
        "/slipway/bench-org",
        None,
        slipway_core::bus::now(),
        EventData::ChangeSubmitted(ChangeSubmitted {
            spec,
            source: SourceRef::Directory {
                path: project.display().to_string(),
            },
            author: Some("bench-org".into()),
            title: Some("org-scale bench".into()),
            rerun_of: None,
            commit: None,
        }),
    )
}

fn time_of(v: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A run's critical path (its JSON): each stage's own work (started to finished; an approval,
/// asked to decided), summed along the plan, the longer of the parallel stages at each step.
fn critical_path(v: &Value) -> f64 {
    let mut step: HashMap<&str, f64> = HashMap::new();
    for s in v["stages"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or_default();
        let from = time_of(&s["started_at"]).or_else(|| time_of(&s["requested_at"]));
        let (Some(from), Some(to)) = (from, time_of(&s["finished_at"])) else {
            continue;
        };
        let work = (to - from).num_milliseconds() as f64 / 1000.0;
        // Test suites run together, and so do the gates: one step each.
        let group = match name.split(':').next().unwrap_or_default() {
            "test" => "tests",
            // (the cost estimate follows them: a step of its own)
            "evaluate" | "perf" => "gates",
            _ => name,
        };
        let e = step.entry(group).or_default();
        *e = e.max(work);
    }
    step.values().sum()
}

/// Each stage of a run (its JSON): `[name, status, requested -> started s, started -> finished s]`.
fn timeline(v: &Value) -> Value {
    let base = time_of(&v["created_at"]);
    let at = |s: &Value, k: &str| {
        time_of(&s[k])
            .zip(base)
            .map(|(t, b)| (t - b).num_milliseconds() as f64 / 1000.0)
    };
    Value::Array(
        v["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                json!([
                    s["name"],
                    s["status"],
                    at(s, "requested_at"),
                    at(s, "started_at"),
                    at(s, "finished_at")
                ])
            })
            .collect(),
    )
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn summary(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    json!({
        "p50": quantile(&xs, 0.5),
        "p99": quantile(&xs, 0.99),
        "max": xs.last().copied().unwrap_or(0.0),
        "n": xs.len(),
    })
}

/// The pipelines' runs, submitted over a few seconds, each followed to its end.
async fn lead_time(bus: &Bus, gateway: &str, data: &Path, opts: &Options) -> anyhow::Result<Value> {
    let mut rng = Rng(opts.seed);
    let plans: Vec<Plan> = (0..opts.pipelines)
        .map(|_| Plan::draw(&mut rng, opts.time_scale))
        .collect();
    let spread = Duration::from_secs_f64((10.0 * opts.time_scale).max(0.5));
    let mut runs = Vec::new();
    let began = Instant::now();
    for (i, plan) in plans.iter().enumerate() {
        let project = data.join(format!("org-{i}"));
        std::fs::create_dir_all(project.join("eval"))?;
        std::fs::write(project.join("eval/sums.jsonl"), DATASET)?;
        let event = change_event(&project, plan.spec(&format!("org-{i}"), gateway));
        let run = ids::run_id(&event.source, &event.id);
        let at = spread.mul_f64(i as f64 / opts.pipelines as f64);
        tokio::time::sleep(at.saturating_sub(began.elapsed())).await;
        bus.publish(&event).await?;
        runs.push((run, plan.clone()));
    }
    let longest = plans.iter().map(Plan::critical_path).fold(0.0, f64::max);
    let deadline = Instant::now() + Duration::from_secs_f64(longest * 3.0 + 180.0);
    let http = reqwest::Client::new();
    let mut ended: HashMap<String, Value> = HashMap::new();
    while ended.len() < runs.len() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {} runs did not end in time",
            runs.len() - ended.len(),
            runs.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (run, _) in &runs {
            if ended.contains_key(run) {
                continue;
            }
            let Ok(resp) = http.get(format!("{gateway}/v1/runs/{run}")).send().await else {
                continue;
            };
            let Ok(v) = json_of(resp).await else {
                continue;
            };
            if v["finished_at"].is_string() {
                ended.insert(run.clone(), v);
            }
        }
    }
    let (mut ratios, mut overheads, mut waits) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: HashMap<String, usize> = HashMap::new();
    let mut worst: Option<(f64, Value)> = None;
    let mut actual = Vec::new();
    for (run, plan) in &runs {
        let v = &ended[run];
        let phase = v["phase"].as_str().unwrap_or("?").to_string();
        *phases.entry(phase.clone()).or_default() += 1;
        for s in v["stages"].as_array().into_iter().flatten() {
            if let (Some(r), Some(st)) = (time_of(&s["requested_at"]), time_of(&s["started_at"])) {
                waits.push((st - r).num_milliseconds() as f64 / 1000.0);
            }
        }
        if phase != "succeeded" {
            continue;
        }
        let (Some(created), Some(finished)) = (
            time_of(&v["change"]["time"]).or_else(|| time_of(&v["created_at"])),
            time_of(&v["finished_at"]),
        ) else {
            continue;
        };
        let lead = (finished - created).num_milliseconds() as f64 / 1000.0;
        let critical = critical_path(v);
        if worst.as_ref().is_none_or(|(r, _)| lead / critical > *r) {
            worst = Some((
                lead / critical,
                json!({"run": run, "lead_s": lead, "critical_path_s": critical,
                       "planned": format!("{plan:?}"), "stages": timeline(v)}),
            ));
        }
        ratios.push(lead / critical);
        overheads.push(lead - critical);
        actual.push(critical);
    }
    anyhow::ensure!(
        !ratios.is_empty(),
        "no run succeeded: {phases:?} (first: {})",
        ended
            .values()
            .next()
            .map(Value::to_string)
            .unwrap_or_default()
    );
    let planned: Vec<f64> = plans.iter().map(Plan::critical_path).collect();
    Ok(json!({
        "runs": runs.len(),
        "phases": phases,
        "planned_critical_path_s": summary(planned),
        "critical_path_s": summary(actual),
        "lead_over_critical_path": summary(ratios),
        "overhead_s": summary(overheads),
        "largest_queue_wait_s": waits.iter().copied().fold(0.0, f64::max),
        "queue_wait_s": summary(waits),
        "slowest_run": worst.map(|(_, w)| w),
    }))
}

/// Ended runs to copy: a few runs of a short pipeline that deploys to production, run for
/// real; their ids.
async fn templates(bus: &Bus, gateway: &str, data: &Path) -> anyhow::Result<Vec<String>> {
    let project = data.join("history");
    std::fs::create_dir_all(&project)?;
    let spec = slipway_domain::spec::NOOP_PIPELINE
        .replacen("name = \"noop\"", "name = \"history\"", 1)
        .replace(
            "allowed_groups = [\"release-managers\"]",
            "allowed_groups = [\"release-managers\"]\nauto_approve = \"when_clean\"",
        );
    let mut runs = Vec::new();
    for _ in 0..3 {
        let event = change_event(&project, spec.clone());
        let run = ids::run_id(&event.source, &event.id);
        bus.publish(&event).await?;
        wait_succeeded(gateway, &run, Duration::from_secs(120)).await?;
        runs.push(run);
    }
    Ok(runs)
}

async fn wait_succeeded(gateway: &str, run: &str, within: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Ok(r) = reqwest::get(format!("{gateway}/v1/runs/{run}")).await
            && let Ok(v) = json_of(r).await
        {
            match v["phase"].as_str() {
                Some("succeeded") => return Ok(()),
                Some(p @ ("failed" | "rejected" | "cancelled" | "rolled_back")) => {
                    bail!("run {run} ended {p}: {}", v["reason"])
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("run {run} did not succeed within {within:?}")
}

/// Writes `n` copies of the template runs (new run ids) to the log, and their entries to the
/// run index; the number of events written.
async fn seed(bus: &Bus, templates: &[String], n: usize) -> anyhow::Result<usize> {
    let js = bus.jetstream();
    // The index's bucket must exist before its entries are published to it directly.
    slipway_core::store::runs::RunIndex::open(bus).await?;
    let mut encoded = Vec::new();
    for run in templates {
        let log = bus.run_log(run).await?;
        let through = log.last().map_or(0, |r| r.seq);
        let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
        let folded = slipway_domain::Run::replay(&events).context("a template run folds")?;
        let entry = slipway_domain::index::IndexEntry::of(&folded, through).to_bytes();
        let messages: Vec<(String, async_nats::HeaderMap, String)> = events
            .iter()
            .map(|e| {
                let (h, p) = slipway_core::bus::binding::encode(e.to_cloudevent());
                (
                    e.nats_subject(),
                    h,
                    String::from_utf8_lossy(&p).into_owned(),
                )
            })
            .collect();
        encoded.push((run.clone(), messages, String::from_utf8(entry)?));
    }
    let kv_prefix = format!("$KV.{}.", bus.settings().stream.runs_bucket);
    let mut acks = std::collections::VecDeque::new();
    let mut events = 0;
    for c in 0..n {
        let (template, messages, entry) = &encoded[c % encoded.len()];
        let run = format!("h{c:09}");
        for (subject, headers, payload) in messages {
            let mut h = async_nats::HeaderMap::new();
            for (k, vs) in headers.iter() {
                for v in vs {
                    h.append(
                        k.clone(),
                        v.as_str().replace(template.as_str(), &run).as_str(),
                    );
                }
            }
            acks.push_back(
                js.publish_with_headers(
                    subject.replace(template.as_str(), &run),
                    h,
                    payload.replace(template.as_str(), &run).into(),
                )
                .await?,
            );
            events += 1;
            if acks.len() >= 512 {
                acks.pop_front().expect("non-empty").await?;
            }
        }
        acks.push_back(
            js.publish(
                format!("{kv_prefix}{run}"),
                entry.replace(template.as_str(), &run).into(),
            )
            .await?,
        );
        if acks.len() >= 512 {
            acks.pop_front().expect("non-empty").await?;
        }
        if c > 0 && c % 100_000 == 0 {
            eprintln!("  seeded {c} runs ({events} events)");
        }
    }
    for a in acks {
        a.await?;
    }
    Ok(events)
}

/// Acknowledges every request the seeded runs left on the workers' durable consumers: the
/// workers handled them as the runs went by, so a year leaves them acknowledged.
async fn acknowledge_seeded(bus: &Bus) -> anyhow::Result<u64> {
    let stream = bus.jetstream().get_stream(bus.stream_name()).await?;
    let names: Vec<String> = stream
        .consumers()
        .filter_map(|c| async move { c.ok().and_then(|i| i.config.durable_name) })
        .collect()
        .await;
    let mut acked = 0;
    for name in names {
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(&name)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_millis(500))
                .messages()
                .await?;
            let mut n = 0;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                n += 1;
            }
            acked += n;
            if n == 0 {
                break;
            }
        }
    }
    Ok(acked)
}

/// Writes the checkpoints the conductor and gateway would have written at the log's end with
/// nothing in flight, the deploy index's (by reading every deploy, as a service does when
/// there is none) and the DORA chunks: how long those take is reported.
async fn checkpoint_at_end(bus: &Bus) -> anyhow::Result<(Value, Value)> {
    let checkpoints = slipway_core::store::checkpoints::Checkpoints::open(bus).await?;
    let (stream_created, through) = bus.stream_state().await?;
    let c = slipway_domain::checkpoint::Checkpoint {
        fold: slipway_domain::index::FOLD_VERSION,
        stream_created,
        through,
        in_flight: Vec::new(),
        unanswered: Vec::new(),
    };
    for service in ["conductor", "gateway"] {
        checkpoints.put(service, &c).await?;
    }
    let deploys = slipway_core::store::baseline::Deploys::new(bus);
    let t = Instant::now();
    deploys.checkpoint().await?;
    let deploy_index = json!({
        "deploys_read": deploys.deploys_read(),
        "read_s": t.elapsed().as_secs_f64(),
    });
    // The DORA chunks the gateway makes as the index grows, made here at once.
    let t = Instant::now();
    let chunks = slipway_core::store::dora::DoraChunks::open(bus)
        .await?
        .compact(&slipway_core::store::runs::RunIndex::open(bus).await?)
        .await?;
    Ok((
        deploy_index,
        json!({ "chunks": chunks, "made_s": t.elapsed().as_secs_f64() }),
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts every service on the seeded log; until the gateway is ready, and until a new change's
/// run is created (the conductor's first decision) and has ended.
async fn start_all(
    stack: &mut Stack,
    bus: &Bus,
    gateway: &str,
    data: &Path,
) -> anyhow::Result<Value> {
    let names = stack.service_names();
    let t = Instant::now();
    for name in &names {
        stack.spawn_service(name)?;
    }
    let project = data.join("history");
    let spec = slipway_domain::spec::NOOP_PIPELINE
        .replacen("name = \"noop\"", "name = \"after\"", 1)
        .replace(
            "allowed_groups = [\"release-managers\"]",
            "allowed_groups = [\"release-managers\"]\nauto_approve = \"when_clean\"",
        );
    let event = change_event(&project, spec);
    let run = ids::run_id(&event.source, &event.id);
    let mut created = bus
        .client()
        .subscribe(format!("slipway.run.{run}.run.created"))
        .await?;
    bus.publish(&event).await?;
    let decision = async {
        let first = tokio::time::timeout(Duration::from_secs(600), created.next())
            .await
            .context("the conductor made no decision within 600 s")?;
        anyhow::ensure!(first.is_some(), "subscription ended");
        Ok(t.elapsed())
    };
    let ready = async {
        wait_ready(gateway, Duration::from_secs(600)).await?;
        anyhow::Ok(t.elapsed())
    };
    let (decided, gateway_ready) = tokio::join!(decision, ready);
    let (decided, gateway_ready) = (decided?, gateway_ready?);
    // How the first run after the start ended is a row of its own: a service whose start
    // depends on the history shows here.
    let first_outcome = match wait_succeeded(gateway, &run, Duration::from_secs(600)).await {
        Ok(()) => "succeeded".to_string(),
        Err(e) => e.to_string(),
    };
    let through = t.elapsed();
    let first_run = json_of(reqwest::get(format!("{gateway}/v1/runs/{run}")).await?).await?;
    let rss: serde_json::Map<String, Value> = stack
        .pids()
        .into_iter()
        .map(|(n, p)| (n.to_string(), json!(rss_mb(p))))
        .collect();
    Ok(json!({
        "conductor_first_decision_s": decided.as_secs_f64(),
        "gateway_ready_s": gateway_ready.as_secs_f64(),
        "first_run_ended_s": through.as_secs_f64(),
        "first_run_outcome": first_outcome,
        "first_run_stages": timeline(&first_run),
        "rss_mb": rss,
    }))
}

/// The history rows.
async fn history(
    stack: &mut Stack,
    bus: &Bus,
    gateway: &str,
    data: &Path,
    opts: &Options,
) -> anyhow::Result<Value> {
    let templates = templates(bus, gateway, data).await?;
    // The services stop while a year is written under them, as if they had folded it live.
    for name in stack.service_names() {
        stack.stop_service(name).await?;
    }
    let t = Instant::now();
    let events = seed(bus, &templates, opts.history).await?;
    let acked = acknowledge_seeded(bus).await?;
    let seeded_in = t.elapsed();
    let (deploy_index, dora_chunks) = checkpoint_at_end(bus).await?;
    eprintln!(
        "  {} runs ({events} events, {acked} requests acknowledged) seeded in {:.1} s",
        opts.history,
        seeded_in.as_secs_f64()
    );
    let started = start_all(stack, bus, gateway, data).await?;

    let http = reqwest::Client::new();
    let n = opts.history as u64;
    let mut rng = Rng(opts.seed ^ 0xA5A5);
    let (mut gw, mut cli_path) = (Vec::new(), Vec::new());
    // Each path asks for runs of its own (one path's read would warm the other's): the first
    // read of an old run since start, as a person looking up an old run makes it.
    for _ in 0..500 {
        let run = format!("h{:09}", rng.next() % n);
        let t = Instant::now();
        let r = http.get(format!("{gateway}/v1/runs/{run}")).send().await?;
        anyhow::ensure!(r.status().is_success(), "{run}: status {}", r.status());
        r.bytes().await?;
        gw.push(ms(t.elapsed()));
        // What `slipway status RUN` asks: the conductor, which answers ended runs from the index.
        let run = format!("h{:09}", rng.next() % n);
        let t = Instant::now();
        let reply = bus
            .client()
            .request(format!("slipway-api.runs.{run}"), "".into())
            .await?;
        let v: Value = serde_json::from_slice(&reply.payload)?;
        anyhow::ensure!(v["run_id"] == run.as_str(), "{run}: {v}");
        cli_path.push(ms(t.elapsed()));
    }
    let (status_gateway, status_cli) = (summary(gw), summary(cli_path));
    let (mut first, mut later) = (Vec::new(), Vec::new());
    let mut next: Option<String> = None;
    for _ in 0..50 {
        let t = Instant::now();
        let r = http
            .get(format!("{gateway}/v1/runs?limit=100"))
            .send()
            .await?;
        let runs = json_of(r).await?;
        let runs = runs.as_array().map_or(&[][..], Vec::as_slice);
        anyhow::ensure!(!runs.is_empty(), "an empty first page");
        first.push(ms(t.elapsed()));
        let url = match &next {
            Some(c) => format!("{gateway}/v1/runs?cursor={c}&limit=100"),
            None => format!("{gateway}/v1/runs?limit=100"),
        };
        let t = Instant::now();
        let r = http.get(url).send().await?;
        next = r
            .headers()
            .get("slipway-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        r.bytes().await?;
        later.push(ms(t.elapsed()));
    }
    let (first_page, later_pages) = (summary(first), summary(later));
    let mut dora = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let v = json_of(
            http.get(format!("{gateway}/v1/metrics/dora?since=365d"))
                .send()
                .await?,
        )
        .await?;
        anyhow::ensure!(v["overall"]["deployments"].as_u64().unwrap_or(0) > 0, "{v}");
        dora.push(ms(t.elapsed()));
    }
    let dora_gateway = summary(dora);
    let cli = std::env::current_exe()?;
    let mut dora = Vec::new();
    for _ in 0..3 {
        // As a person runs it: the `cli` user of the stack's server, its password from the
        // data directory.
        let mut cmd = tokio::process::Command::new(&cli);
        cmd.args(["dora", "--since", "365d", "--json"])
            .env("SLIPWAY_NATS_URL", &stack.url)
            .env("SLIPWAY_DATA_DIR", data)
            .stdout(std::process::Stdio::null());
        let t = Instant::now();
        let status = cmd.status().await?;
        anyhow::ensure!(status.success(), "slipway dora: {status}");
        dora.push(ms(t.elapsed()));
    }
    let dora_cli = summary(dora);

    // Without a checkpoint, the conductor folds the whole log (the fallback's cost).
    stack.stop_service("slipway-conductor").await?;
    let checkpoints = slipway_core::store::checkpoints::Checkpoints::open(bus).await?;
    checkpoints.delete("conductor").await?;
    let t = Instant::now();
    stack.spawn_service("slipway-conductor")?;
    let event = change_event(
        &data.join("history"),
        slipway_domain::spec::NOOP_PIPELINE.to_string(),
    );
    let run = ids::run_id(&event.source, &event.id);
    let mut created = bus
        .client()
        .subscribe(format!("slipway.run.{run}.run.created"))
        .await?;
    bus.publish(&event).await?;
    tokio::time::timeout(Duration::from_secs(3600), created.next())
        .await
        .context("no decision within an hour without a checkpoint")?;
    let whole_log = t.elapsed();
    let conductor_rss = stack
        .pids()
        .into_iter()
        .find(|(n, _)| *n == "slipway-conductor")
        .map_or(0.0, |(_, p)| rss_mb(p));
    Ok(json!({
        "runs": opts.history,
        "events": events,
        "seeded_s": seeded_in.as_secs_f64(),
        "from_checkpoint": started,
        "status_gateway_ms": status_gateway,
        "status_cli_path_ms": status_cli,
        "first_page_ms": first_page,
        "later_pages_ms": later_pages,
        "dora_365d_gateway_ms": dora_gateway,
        "dora_365d_cli_ms": dora_cli,
        "without_checkpoint": {
            "conductor_first_decision_s": whole_log.as_secs_f64(),
            "conductor_rss_mb": conductor_rss,
            "deploy_index": deploy_index,
            "dora_chunks": dora_chunks,
        },
    }))
}

fn print_markdown(r: &Value) {
    let l = &r["lead_time"];
    let h = &r["history"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let pct = |v: &Value, unit: &str| {
        format!(
            "{:.3}{unit} / {:.3}{unit} / {:.3}{unit}",
            f(&v["p50"]),
            f(&v["p99"]),
            f(&v["max"])
        )
    };
    outln!(
        "Organisation scale: {} pipelines, time scale {}, seed {}\n",
        r["pipelines"],
        r["time_scale"],
        r["seed"]
    );
    outln!("| measure | value |");
    outln!("|---|---|");
    outln!("| runs ended, by phase | {} |", l["phases"]);
    outln!(
        "| critical path, stages' own work, p50 / p99 / max | {} |",
        pct(&l["critical_path_s"], " s")
    );
    outln!(
        "| lead time / critical path p50 / p99 / max | {} |",
        pct(&l["lead_over_critical_path"], "x")
    );
    outln!(
        "| lead time - critical path p50 / p99 / max | {} |",
        pct(&l["overhead_s"], " s")
    );
    outln!(
        "| largest queue wait of any stage | {:.3} s |",
        f(&l["largest_queue_wait_s"])
    );
    let s = &h["from_checkpoint"];
    outln!(
        "| history: runs / events in the log | {} / {} |",
        h["runs"],
        h["events"]
    );
    outln!(
        "| start from checkpoint: conductor's first decision / gateway ready / first run ended | {:.3} s / {:.3} s / {:.3} s ({}) |",
        f(&s["conductor_first_decision_s"]),
        f(&s["gateway_ready_s"]),
        f(&s["first_run_ended_s"]),
        s["first_run_outcome"].as_str().unwrap_or_default()
    );
    let rss = s["rss_mb"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {:.0}", f(v)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    outln!("| resident memory after start (MB) | {rss} |");
    let p = |v: &Value| format!("{:.3} / {:.3} ms", f(&v["p50"]), f(&v["p99"]));
    outln!(
        "| old run's status, gateway p50 / p99 | {} |",
        p(&h["status_gateway_ms"])
    );
    outln!(
        "| old run's status, CLI path (conductor query) p50 / p99 | {} |",
        p(&h["status_cli_path_ms"])
    );
    outln!(
        "| GET /v1/runs first page of 100 p50 / p99 | {} |",
        p(&h["first_page_ms"])
    );
    outln!(
        "| GET /v1/runs following pages of 100 p50 / p99 | {} |",
        p(&h["later_pages_ms"])
    );
    outln!(
        "| DORA over 365 d, gateway p50 | {:.1} ms |",
        f(&h["dora_365d_gateway_ms"]["p50"])
    );
    outln!(
        "| DORA over 365 d, `slipway dora` p50 | {:.1} ms |",
        f(&h["dora_365d_cli_ms"]["p50"])
    );
    outln!(
        "| without a checkpoint: conductor's first decision / its memory | {:.3} s / {:.0} MB |",
        f(&h["without_checkpoint"]["conductor_first_decision_s"]),
        f(&h["without_checkpoint"]["conductor_rss_mb"])
    );
    let d = &h["without_checkpoint"]["deploy_index"];
    outln!(
        "| without a checkpoint: what is live where, from every deploy ({}) | {:.3} s |",
        d["deploys_read"],
        f(&d["read_s"])
    );
    let d = &h["without_checkpoint"]["dora_chunks"];
    outln!(
        "| DORA chunks made from the whole index ({} chunks) | {:.3} s |",
        d["chunks"],
        f(&d["made_s"])
    );
}
