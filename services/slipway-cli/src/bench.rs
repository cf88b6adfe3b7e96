//! `slipway bench`: Slipway's own overhead as ratios to the raw JetStream floor, measured in one
//! run against its own nats-server and services (these machines are shared and noisy, so only
//! ratios measured together mean much).
//!
//! Rows: the raw floor with plain async-nats (acked publish, publish -> pull receipt, pipelined
//! publishes, ordered reads with and without decoding); no-op runs through every stage (per-stage
//! overhead from a stage's result to the next stage's start, end-to-end latency with the
//! approval granted by the API as soon as it is asked for); throughput with many runs in
//! flight; the gateway under load; resident memory per service; an artifact stored and read
//! back against its chunks published plainly; and the same no-op runs with OTLP export pointed
//! at a collector that is down.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use slipway_core::bus::Bus;
use slipway_core::bus::NatsSettings;
use slipway_core::exec::server::{free_port, free_ports};
use slipway_domain::events::{ChangeSubmitted, EventData, SourceRef};
use slipway_domain::{Event, ids};

use crate::out::outln;
use crate::up::{Access, Stack};

/// How big a bench run is.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sequential no-op runs for the latency rows.
    pub runs: usize,
    /// Runs submitted at once for the throughput row.
    pub inflight: usize,
    /// Messages per raw-floor row.
    pub raw: usize,
    /// Stored events for the read-rate rows.
    pub stored: usize,
    /// Stored events folded for the replay row (copies of the bench's own runs).
    pub replay: usize,
    /// Gateway requests for its row, and the load's concurrency.
    pub gateway_requests: usize,
    pub concurrency: usize,
    /// CPU-bound builds for the scale-out row.
    pub scale_builds: usize,
    /// MiB of the artifact stored and read back for the artifact row.
    pub artifact_mib: usize,
    pub json: bool,
    pub data_dir: Option<PathBuf>,
}

const TOKEN: &str = "bench-approver-token";

/// p50 and p99 in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Pct {
    p50: f64,
    p99: f64,
}

fn pct(samples: &mut [Duration]) -> Pct {
    if samples.is_empty() {
        return Pct::default();
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    Pct {
        p50: at(0.50),
        p99: at(0.99),
    }
}

struct Table {
    rows: Vec<(String, String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Table {
    fn row(&mut self, key: &str, what: &str, value: String, ratio: Option<String>, j: Value) {
        self.rows
            .push((what.to_string(), value, ratio.unwrap_or_default()));
        self.json.insert(key.to_string(), j);
    }
}

/// The no-op pipeline; `name` apart, every run is the same.
fn spec_named(name: &str) -> String {
    spec().replacen("name = \"noop\"", &format!("name = \"{name}\""), 1)
}

fn spec() -> &'static str {
    slipway_domain::spec::NOOP_PIPELINE
}

/// Where the servers keep their data unless `--data-dir` says otherwise (removed after).
pub fn default_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("slipway-bench-{}", std::process::id()))
}

/// `slipway bench`.
pub async fn bench(opts: Options) -> anyhow::Result<ExitCode> {
    // A row of nothing has no rate and no ratio: refuse it before starting anything.
    for (option, n) in [
        ("--runs", opts.runs),
        ("--inflight", opts.inflight),
        ("--raw", opts.raw),
        ("--stored", opts.stored),
        ("--replay", opts.replay),
        ("--gateway-requests", opts.gateway_requests),
        ("--concurrency", opts.concurrency),
        ("--scale-builds", opts.scale_builds),
        ("--artifact-mib", opts.artifact_mib),
    ] {
        anyhow::ensure!(
            n > 0,
            "{option} must be at least 1 (every row measures something)"
        );
    }
    let data = opts.data_dir.clone().unwrap_or_else(default_data_dir);
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    let project = data.join("project");
    std::fs::create_dir_all(&project)?;
    std::fs::write(project.join("slipway.toml"), spec())?;
    let mut table = Table {
        rows: Vec::new(),
        json: serde_json::Map::new(),
    };
    let machine = machine();
    eprintln!("slipway bench on {machine}");

    // Plain Slipway, and beside it the same with OTLP export to a collector that is down.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let otel_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), dead),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
            "http/protobuf".to_string(),
        ),
    ];
    let plain_target = Target::start(&data.join("plain"), Vec::new()).await?;
    let traced_target = match Target::start(&data.join("otel"), otel_env).await {
        Ok(t) => t,
        Err(e) => {
            plain_target.stack.stop().await;
            return Err(e);
        }
    };
    let measured = Measured::take(&opts, &plain_target, &traced_target, &project).await;
    plain_target.stack.stop().await;
    traced_target.stack.stop().await;
    let (plain, traced_run) = measured?;
    let scale = scale_out(&data, &project, opts.scale_builds).await?;

    let raw = plain.raw.as_ref().expect("measured with the floor");
    let hop = raw.hop.p50;
    let f = |x: f64| format!("{x:.3} ms");
    let ratio = |x: f64, floor: f64| {
        if floor > 0.0 {
            let r = x / floor;
            if r < 0.1 {
                format!("{r:.5}x")
            } else {
                format!("{r:.3}x")
            }
        } else {
            "n/a".into()
        }
    };
    table.row(
        "raw_publish_ms",
        "raw: acked publish latency p50 / p99",
        format!("{} / {}", f(raw.publish.p50), f(raw.publish.p99)),
        None,
        json!({"p50": raw.publish.p50, "p99": raw.publish.p99}),
    );
    table.row(
        "raw_hop_ms",
        "raw: publish -> pull-consumer receipt p50 / p99 (the raw hop)",
        format!("{} / {}", f(raw.hop.p50), f(raw.hop.p99)),
        None,
        json!({"p50": raw.hop.p50, "p99": raw.hop.p99}),
    );
    table.row(
        "raw_publish_rate",
        "raw: pipelined acked publishes per second",
        format!("{:.0}/s", raw.pipelined_rate),
        None,
        json!(raw.pipelined_rate),
    );
    table.row(
        "raw_read_rate",
        "raw: ordered-consumer reads per second (no decoding / decoded events)",
        format!("{:.0}/s / {:.0}/s", raw.read_rate, raw.read_decode_rate),
        None,
        json!({"raw": raw.read_rate, "decoded": raw.read_decode_rate}),
    );
    table.row(
        "stage_overhead_ms",
        "per-stage overhead (stage result -> next stage started) p50 / p99",
        format!("{} / {}", f(plain.stage.p50), f(plain.stage.p99)),
        Some(format!(
            "{} of the raw hop (p50)",
            ratio(plain.stage.p50, hop)
        )),
        json!({"p50": plain.stage.p50, "p99": plain.stage.p99, "ratio_p50": plain.stage.p50 / hop}),
    );
    table.row(
        "stage_overhead_split_ms",
        "per-stage overhead in two parts p50: result -> next request (conductor) / request -> started (worker)",
        format!(
            "{} / {}",
            f(plain.stage_conductor.p50),
            f(plain.stage_worker.p50)
        ),
        Some(format!(
            "{} / {} of the raw hop",
            ratio(plain.stage_conductor.p50, hop),
            ratio(plain.stage_worker.p50, hop)
        )),
        json!({"conductor_p50": plain.stage_conductor.p50, "conductor_p99": plain.stage_conductor.p99, "worker_p50": plain.stage_worker.p50, "worker_p99": plain.stage_worker.p99}),
    );
    let work_text: Vec<String> = plain
        .work
        .iter()
        .map(|(k, p)| format!("{k} {}", f(p.p50)))
        .collect();
    let mut work_json = serde_json::Map::new();
    for (k, p) in &plain.work {
        work_json.insert(k.clone(), json!({"p50": p.p50, "p99": p.p99}));
    }
    table.row(
        "stage_work_ms",
        "each stage's own time in a no-op run p50 (started -> result; approval: asked -> decided)",
        work_text.join(", "),
        None,
        Value::Object(work_json),
    );
    let bound = raw.hop.p50 * plain.hops as f64;
    table.row(
        "run_latency_ms",
        &format!(
            "no-op run end to end ({} events, approval by API) p50 / p99",
            plain.hops
        ),
        format!("{} / {}", f(plain.run.p50), f(plain.run.p99)),
        Some(format!("{} of hops x raw hop (p50)", ratio(plain.run.p50, bound))),
        json!({"p50": plain.run.p50, "p99": plain.run.p99, "events": plain.hops, "ratio_p50": plain.run.p50 / bound}),
    );
    let raw_bound = raw.pipelined_rate / plain.hops.max(1) as f64;
    table.row(
        "throughput_runs_per_s",
        &format!("throughput: no-op runs per second, {} in flight", opts.inflight),
        format!("{:.1}/s", plain.throughput),
        Some(format!(
            "{} of the raw bound ({raw_bound:.1}/s = publishes/s / events per run)",
            ratio(plain.throughput, raw_bound)
        )),
        json!({"runs_per_s": plain.throughput, "raw_bound": raw_bound, "ratio": plain.throughput / raw_bound}),
    );
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let available = cores as f64 * 1000.0 / plain.throughput;
    let used: f64 = plain.cpu.iter().map(|(_, own, ch)| own + ch).sum();
    let cpu_text: Vec<String> = plain
        .cpu
        .iter()
        .map(|(n, own, ch)| {
            let n = n.trim_start_matches("slipway-");
            if *ch > 0.0 {
                format!("{n} {own:.2} + {ch:.2}")
            } else {
                format!("{n} {own:.2}")
            }
        })
        .collect();
    let mut cpu = serde_json::Map::new();
    for (name, own, children) in &plain.cpu {
        cpu.insert(
            name.to_string(),
            json!({"own_ms": own, "commands_ms": children}),
        );
    }
    table.row(
        "cpu_ms_per_run",
        "CPU ms per run under the throughput load, by process (own + the commands it ran)",
        cpu_text.join(", "),
        Some(format!(
            "{used:.1} ms used of {available:.1} ms available ({cores} CPUs x wall time / runs)"
        )),
        json!({"by_process": Value::Object(cpu), "used_ms": used, "available_ms": available, "cpus": cores}),
    );
    table.row(
        "gateway",
        &format!(
            "gateway: GET /v1/runs/{{id}} at concurrency {}",
            opts.concurrency
        ),
        format!(
            "{:.0} req/s, p99 {}",
            plain.gateway_rps,
            f(plain.gateway.p99)
        ),
        None,
        json!({"rps": plain.gateway_rps, "p50": plain.gateway.p50, "p99": plain.gateway.p99}),
    );
    let rep = plain.replay.as_ref().expect("measured with the replay");
    table.row(
        "replay",
        &format!(
            "replay: {} stored events ({} runs) decoded and folded at start-up",
            rep.events, rep.runs
        ),
        format!(
            "{:.0} events/s (plain reads of the same: {:.0}/s)",
            rep.fold_rate, rep.read_rate
        ),
        Some(format!(
            "{} of the raw read rate",
            ratio(rep.fold_rate, rep.read_rate)
        )),
        json!({"events": rep.events, "runs": rep.runs, "fold_rate": rep.fold_rate, "read_rate": rep.read_rate, "ratio": rep.fold_rate / rep.read_rate}),
    );
    table.row(
        "memory_per_100k_runs_mb",
        "memory held by folded runs, per 100,000 runs",
        format!("{:.0} MB", rep.mb_per_100k_runs),
        None,
        json!(rep.mb_per_100k_runs),
    );
    let art = &plain.artifacts;
    table.row(
        "artifact_mb_per_s",
        &format!(
            "an artifact of {} MiB stored / read back (MB/s)",
            art.mib
        ),
        format!(
            "{:.0} / {:.0} MB/s (the client's own put: {:.0} MB/s)",
            art.stored, art.read, art.client_put
        ),
        Some(format!(
            "{} of the raw chunk publishes ({:.0} MB/s); the client's own put {}",
            ratio(art.stored, art.raw),
            art.raw,
            ratio(art.client_put, art.raw)
        )),
        json!({"mib": art.mib, "stored": art.stored, "read": art.read, "client_put": art.client_put, "raw": art.raw, "ratio": art.stored / art.raw}),
    );
    let mut rss = serde_json::Map::new();
    for (name, idle, loaded) in &plain.rss {
        rss.insert(
            name.to_string(),
            json!({"idle_mb": idle, "loaded_mb": loaded}),
        );
    }
    let rss_text: Vec<String> = plain
        .rss
        .iter()
        .map(|(n, i, l)| format!("{} {i:.1}/{l:.1}", n.trim_start_matches("slipway-")))
        .collect();
    table.row(
        "rss_mb",
        "resident MB per service, idle / after load",
        rss_text.join(", "),
        None,
        Value::Object(rss),
    );
    table.row(
        "otel_unreachable_run_latency_ms",
        "no-op run with OTLP export to a collector that is down, p50 / p99",
        format!("{} / {}", f(traced_run.p50), f(traced_run.p99)),
        Some(format!(
            "{} of the same without export (p50; runs alternated)",
            ratio(traced_run.p50, plain.run.p50)
        )),
        json!({"p50": traced_run.p50, "p99": traced_run.p99, "ratio_p50": traced_run.p50 / plain.run.p50}),
    );

    table.row(
        "scale_out",
        &format!(
            "scale-out: {} CPU-bound builds per second, one builder process / two (one job each at a time)",
            opts.scale_builds
        ),
        format!(
            "{:.2}/s / {:.2}/s (builds per replica: {:?})",
            scale.one, scale.two, scale.shares
        ),
        Some(format!("{} with the second replica", ratio(scale.two, scale.one))),
        json!({"one": scale.one, "two": scale.two, "ratio": scale.two / scale.one, "builds_per_replica": scale.shares}),
    );

    if opts.json {
        let mut j = table.json;
        j.insert("machine".into(), json!(machine));
        j.insert(
            "options".into(),
            json!({"runs": opts.runs, "inflight": opts.inflight, "raw": opts.raw, "stored": opts.stored, "replay": opts.replay,
                   "gateway_requests": opts.gateway_requests, "concurrency": opts.concurrency, "scale_builds": opts.scale_builds,
                   "artifact_mib": opts.artifact_mib}),
        );
        outln!("{}", serde_json::to_string_pretty(&Value::Object(j))?);
    } else {
        outln!("| measure | value | ratio |");
        outln!("|---|---|---|");
        for (what, value, ratio) in &table.rows {
            outln!("| {what} | {value} | {ratio} |");
        }
    }
    if opts.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&data);
    }
    Ok(ExitCode::SUCCESS)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cpus} CPUs ({model}), {mem:.0} GiB")
}

struct RawFloor {
    publish: Pct,
    hop: Pct,
    pipelined_rate: f64,
    read_rate: f64,
    read_decode_rate: f64,
}

/// Folding the log at start-up, as the conductor does.
struct Replay {
    events: usize,
    runs: usize,
    /// Events per second read without decoding, and decoded and folded into runs.
    read_rate: f64,
    fold_rate: f64,
    /// Resident memory the folded runs hold, per 100,000 runs.
    mb_per_100k_runs: f64,
}

struct Measured {
    raw: Option<RawFloor>,
    replay: Option<Replay>,
    stage: Pct,
    /// The stage overhead's two parts: result -> the conductor's request, request -> started.
    stage_conductor: Pct,
    stage_worker: Pct,
    /// Each stage kind's own time (`started` to its result; an approval: asked to decided).
    work: Vec<(String, Pct)>,
    run: Pct,
    /// Events in a no-op run: its sequential hops.
    hops: usize,
    throughput: f64,
    gateway: Pct,
    gateway_rps: f64,
    rss: Vec<(&'static str, f64, f64)>,
    /// CPU ms per run under the throughput load: (process, its own, the commands it ran).
    cpu: Vec<(&'static str, f64, f64)>,
    artifacts: Artifacts,
}

/// One stack under measurement: its services, gateway and a client.
struct Target {
    stack: Stack,
    gateway: String,
    bus: Bus,
}

impl Target {
    async fn start(data: &Path, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        let [gateway_port, nats_port] = free_ports();
        let (seed, public) = slipway_domain::signing::SigningKey::generate();
        let config = data.join("slipway.toml");
        std::fs::create_dir_all(data)?;
        std::fs::write(
            &config,
            format!(
                "[approvals]\npublic_key = \"{public}\"\n\n\
                 [gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\ncdevents = false\nsigning_key = \"{seed}\"\n\n\
                 [[gateway.approvers]]\nname = \"bench\"\ngroups = [\"release-managers\"]\n\
                 token_sha256 = \"{:x}\"\n\n[worker]\nack_wait_secs = 10\nconcurrency = 16\n\n[conductor]\ntick_millis = 100\n",
                Sha256::digest(TOKEN.as_bytes())
            ),
        )?;
        let stack = Stack::start_env(
            None,
            nats_port,
            data,
            Some(&config),
            true,
            env,
            Access::LeastPrivilege,
        )
        .await?;
        let gateway = format!("http://127.0.0.1:{gateway_port}");
        let ready = async {
            wait_healthy(&gateway).await?;
            let bus = Bus::connect(&stack.settings("admin"), "slipway-bench").await?;
            bus.ensure_stream().await?;
            anyhow::Ok(bus)
        }
        .await;
        match ready {
            Ok(bus) => Ok(Self {
                stack,
                gateway,
                bus,
            }),
            Err(e) => {
                stack.stop().await;
                Err(e)
            }
        }
    }

    /// `(name, pid)` of nats-server, every service and this process (the load's client).
    fn processes(&self) -> Vec<(&'static str, u32)> {
        let mut all: Vec<_> = self.stack.nats_pid().into_iter().collect();
        all.extend(self.stack.pids());
        all.push(("bench", std::process::id()));
        all
    }

    fn cpu(&self) -> Vec<(&'static str, (f64, f64))> {
        self.processes()
            .into_iter()
            .map(|(n, p)| (n, cpu_ms(p)))
            .collect()
    }

    fn rss(&self) -> Vec<(&'static str, f64)> {
        self.stack
            .pids()
            .into_iter()
            .map(|(n, p)| (n, rss_mb(p)))
            .collect()
    }
}

impl Measured {
    /// Everything, on `plain`; the no-op run latency also on `traced` (OTLP to a dead
    /// collector), the runs alternating between the two so that drift hits both alike.
    async fn take(
        opts: &Options,
        plain: &Target,
        traced: &Target,
        project: &Path,
    ) -> anyhow::Result<(Self, Pct)> {
        let raw = raw_floor(&plain.stack.settings("admin"), opts.raw, opts.stored).await?;
        // One run on each first, untimed: every consumer and connection warm.
        one_run(&plain.bus, &plain.gateway, project).await?;
        one_run(&traced.bus, &traced.gateway, project).await?;
        let mut latencies = Vec::new();
        let mut traced_latencies = Vec::new();
        let mut overheads = Vec::new();
        let mut conductor_parts = Vec::new();
        let mut worker_parts = Vec::new();
        let mut work: Vec<(String, Vec<Duration>)> = Vec::new();
        let mut hops = 0;
        for _ in 0..opts.runs {
            let (run, took) = one_run(&plain.bus, &plain.gateway, project).await?;
            latencies.push(took);
            let log = plain.bus.run_log(&run).await?;
            hops = log.len();
            let events: Vec<Event> = log.into_iter().filter_map(|r| r.event.ok()).collect();
            for (whole, conductor, worker) in stage_overheads(&events) {
                overheads.push(whole);
                conductor_parts.push(conductor);
                worker_parts.push(worker);
            }
            for (kind, took) in stage_work(&events) {
                match work.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, samples)) => samples.push(took),
                    None => work.push((kind, vec![took])),
                }
            }
            let (_, took) = one_run(&traced.bus, &traced.gateway, project).await?;
            traced_latencies.push(took);
        }
        let idle = plain.rss();
        let cpu_before = plain.cpu();
        let throughput = throughput(&plain.bus, &plain.gateway, project, opts.inflight).await?;
        let cpu = plain
            .cpu()
            .into_iter()
            .map(|(n, (own, children))| {
                let (own0, children0) = cpu_before
                    .iter()
                    .find(|(b, _)| *b == n)
                    .map_or((0.0, 0.0), |x| x.1);
                let per_run = opts.inflight as f64;
                (n, (own - own0) / per_run, (children - children0) / per_run)
            })
            .collect();
        let sample = latest_run(&plain.bus).await?;
        let (gateway, gateway_rps) = gateway_load(
            &plain.gateway,
            &sample,
            opts.gateway_requests,
            opts.concurrency,
        )
        .await?;
        let loaded = plain.rss();
        let replay = replay(&plain.bus, opts.replay).await?;
        let artifacts = artifacts(&plain.bus, project, opts.artifact_mib).await?;
        let rss = idle
            .iter()
            .map(|(n, i)| {
                let l = loaded.iter().find(|(ln, _)| ln == n).map_or(0.0, |x| x.1);
                (*n, *i, l)
            })
            .collect();
        Ok((
            Measured {
                raw: Some(raw),
                replay: Some(replay),
                stage: pct(&mut overheads),
                stage_conductor: pct(&mut conductor_parts),
                stage_worker: pct(&mut worker_parts),
                work: work
                    .into_iter()
                    .map(|(k, mut samples)| (k, pct(&mut samples)))
                    .collect(),
                run: pct(&mut latencies),
                hops,
                throughput,
                gateway,
                gateway_rps,
                rss,
                cpu,
                artifacts,
            },
            pct(&mut traced_latencies),
        ))
    }
}

/// Copies of the bench's own runs (every event of them, under `replay.<copy>.` subjects, so
/// each copy is another set of runs) stored until `target` events, then read back plainly and
/// read, decoded and folded into runs the way the conductor replays its log at start-up.
async fn replay(bus: &Bus, target: usize) -> anyhow::Result<Replay> {
    use std::collections::HashMap;
    let log = bus.read(&["slipway.run.>".to_string()], 1).await?;
    let encoded: Vec<(String, async_nats::HeaderMap, bytes::Bytes)> = log
        .into_iter()
        .filter_map(|r| {
            let e = r.event.ok()?;
            let (h, p) = slipway_core::bus::binding::encode(e.to_cloudevent());
            Some((r.subject, h, p))
        })
        .collect();
    anyhow::ensure!(!encoded.is_empty(), "no events to replay");
    let js = bus.jetstream();
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "REPLAY".into(),
            subjects: vec!["replay.>".into()],
            ..Default::default()
        })
        .await?;
    let copies = target.div_ceil(encoded.len()).max(1);
    let mut acks = std::collections::VecDeque::new();
    for c in 0..copies {
        for (subject, h, p) in &encoded {
            acks.push_back(
                js.publish_with_headers(format!("replay.{c}.{subject}"), h.clone(), p.clone())
                    .await?,
            );
            if acks.len() >= 256 {
                acks.pop_front().expect("non-empty").await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    let events = copies * encoded.len();
    let reader = || async {
        let c = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await?;
        anyhow::Ok(c.messages().await?)
    };
    // Plain reads (the floor for this row) and folds alternate, three rounds of each, and
    // the medians are compared: drift on a shared machine then hits both alike. The memory
    // folded runs hold is taken in the first round, before any allocator has memory to reuse.
    let (mut read_rates, mut fold_rates) = (Vec::new(), Vec::new());
    let (mut held, mut n) = (0.0, 1);
    for round in 0..3 {
        let mut msgs = reader().await?;
        let t = Instant::now();
        for _ in 0..events {
            msgs.next()
                .await
                .context("reader ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        read_rates.push(events as f64 / t.elapsed().as_secs_f64());
        drop(msgs);
        // Decoded and folded, one run per (copy, run id), as the conductor holds them.
        let before = rss_mb(std::process::id());
        let mut runs: HashMap<u32, HashMap<String, slipway_domain::Run>> = HashMap::new();
        let mut msgs = reader().await?;
        let t = Instant::now();
        for _ in 0..events {
            let m = msgs
                .next()
                .await
                .context("reader ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let Ok(e) = slipway_core::bus::decode(m.headers.as_ref(), &m.payload) else {
                continue;
            };
            let copy: u32 = m
                .subject
                .split('.')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let Some(run) = e.subject.as_deref() else {
                continue;
            };
            let copy = runs.entry(copy).or_default();
            match copy.get_mut(run) {
                Some(r) => slipway_domain::fold_into(r, &e),
                None => {
                    if let Some(r) = slipway_domain::fold(None, &e) {
                        copy.insert(run.to_string(), r);
                    }
                }
            }
        }
        fold_rates.push(events as f64 / t.elapsed().as_secs_f64());
        if round == 0 {
            held = (rss_mb(std::process::id()) - before).max(0.0);
            n = runs.values().map(HashMap::len).sum::<usize>().max(1);
        }
        drop(runs);
        drop(msgs);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (read_rate, fold_rate) = (median(&mut read_rates), median(&mut fold_rates));
    js.delete_stream("REPLAY").await?;
    Ok(Replay {
        events,
        runs: n,
        read_rate,
        fold_rate,
        mb_per_100k_runs: held / n as f64 * 100_000.0,
    })
}

/// CPU time (user + system) of a process and of the children it has waited for, in ms.
fn cpu_ms(pid: u32) -> (f64, f64) {
    // USER_HZ is 100 in Linux's user-space ABI: a tick of /proc/<pid>/stat is 10 ms.
    const MS_PER_TICK: f64 = 10.0;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // After the command name's closing parenthesis, fields count from the 3rd (state), so
    // utime, stime, cutime and cstime (the 14th to 17th) are the 11th to 14th (0-based).
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let at = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    (
        (at(11) + at(12)) * MS_PER_TICK,
        (at(13) + at(14)) * MS_PER_TICK,
    )
}

/// A process's resident memory (VmRSS) in MB.
pub(crate) fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn wait_healthy(gateway: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if reqwest::get(format!("{gateway}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateway at {gateway} did not come up")
}

fn change(project: &Path) -> ChangeSubmitted {
    change_of(project, spec().to_string())
}

fn change_of(project: &Path, spec: String) -> ChangeSubmitted {
    ChangeSubmitted {
        spec,
        source: SourceRef::Directory {
            path: project.display().to_string(),
        },
        author: Some("bench-author".into()),
        title: Some("bench".into()),
        rerun_of: None,
        commit: None,
    }
}

/// Approves `run` through the gateway as soon as it asks, and waits for its end.
async fn drive(gateway: &str, run: &str, mut sub: async_nats::Subscriber) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .with_context(|| format!("run {run} did not end within 120 s"))?
            .context("subscription ended")?;
        let Ok(e) = slipway_core::bus::decode(m.headers.as_ref(), &m.payload) else {
            continue;
        };
        match &e.data {
            EventData::ApprovalRequested(r) => {
                // Seen on core NATS as it is published, the request can reach us before the
                // stream has stored it, and the gateway decides on the stored log: a 409
                // then means "not yet", so ask again (bounded).
                let mut tries = 0;
                loop {
                    let resp = http
                        .post(format!("{gateway}/v1/runs/{run}/approvals"))
                        .header("authorization", format!("Bearer {TOKEN}"))
                        .header("content-type", "application/json")
                        .body(
                            json!({"decision": "approve", "artifact_digest": r.artifact_digest})
                                .to_string(),
                        )
                        .send()
                        .await?;
                    if resp.status().is_success() {
                        break;
                    }
                    tries += 1;
                    if resp.status() != reqwest::StatusCode::CONFLICT || tries >= 200 {
                        bail!("approval refused: {}", resp.text().await?);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            EventData::RunSucceeded(_) => return Ok(()),
            EventData::RunFailed(r)
            | EventData::RunCancelled(r)
            | EventData::RunRejected(r)
            | EventData::RunRolledBack(r) => {
                bail!("run {run} ended as {}: {}", e.type_name(), r.reason)
            }
            _ => {}
        }
    }
}

/// One no-op run from change to success; its id and how long it took.
async fn one_run(bus: &Bus, gateway: &str, project: &Path) -> anyhow::Result<(String, Duration)> {
    let id = ids::random();
    let event = Event::new(
        id.clone(),
        "/slipway/bench",
        None,
        slipway_core::bus::now(),
        EventData::ChangeSubmitted(change(project)),
    );
    let run = ids::run_id(&event.source, &event.id);
    let sub = bus
        .client()
        .subscribe(format!("slipway.run.{run}.>"))
        .await?;
    let t0 = Instant::now();
    bus.publish(&event).await?;
    drive(gateway, &run, sub).await?;
    Ok((run, t0.elapsed()))
}

/// From each stage's result (or an approver's decision) to the next worker stage's start,
/// split at the conductor's request between them: (whole, result -> request, request ->
/// started).
fn stage_overheads(events: &[Event]) -> Vec<(Duration, Duration, Duration)> {
    use slipway_domain::events::StageVerb;
    let span = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (b - a).to_std().unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut last_result: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut requested: Option<chrono::DateTime<chrono::Utc>> = None;
    for e in events {
        if let Some((_, _, verb)) = e.data.stage_fact() {
            match verb {
                StageVerb::Started => {
                    if let (Some(t), Some(r)) = (last_result.take(), requested.take()) {
                        out.push((span(t, e.time), span(t, r), span(r, e.time)));
                    }
                }
                StageVerb::Requested => {
                    if last_result.is_some() {
                        requested = Some(e.time);
                    }
                }
                _ => last_result = Some(e.time),
            }
        } else if e.data.approval_stage().is_some() {
            last_result = Some(e.time);
        }
    }
    out
}

/// Each stage's own time in a run, by kind in the order first seen: `started` to its result;
/// an approval, from being asked for to the decision.
fn stage_work(events: &[Event]) -> Vec<(String, Duration)> {
    use slipway_domain::events::StageVerb;
    let kind = |stage: &str| {
        slipway_domain::stage::StageKey::parse(stage)
            .map_or_else(|_| stage.to_string(), |k| k.kind().as_str().to_string())
    };
    let mut began = std::collections::HashMap::new();
    let mut out = Vec::new();
    for e in events {
        if let Some((stage, _, verb)) = e.data.stage_fact() {
            match verb {
                StageVerb::Started => {
                    began.insert(stage.to_string(), e.time);
                }
                StageVerb::Requested if stage.starts_with("approval") => {
                    began.insert(stage.to_string(), e.time);
                }
                StageVerb::Succeeded | StageVerb::Failed => {
                    if let Some(t) = began.remove(stage) {
                        out.push((kind(stage), (e.time - t).to_std().unwrap_or_default()));
                    }
                }
                StageVerb::Requested => {}
            }
        } else if let Some((stage, _)) = e.data.approval_stage()
            && let Some(t) = began.remove(&stage)
        {
            out.push((kind(&stage), (e.time - t).to_std().unwrap_or_default()));
        }
    }
    out
}

/// Runs per second with `inflight` no-op runs submitted at once, each approved when it asks.
/// Each is of its own pipeline: one pipeline's deploys are serialised (and a newer approved
/// run supersedes older waiting ones) by design, which would measure the lanes, not Slipway.
async fn throughput(
    bus: &Bus,
    gateway: &str,
    project: &Path,
    inflight: usize,
) -> anyhow::Result<f64> {
    runs_per_second(bus, gateway, project, inflight, |i| {
        spec_named(&format!("noop-{i}"))
    })
    .await
}

/// Runs per second with `n` runs submitted at once, run `i` of the pipeline `spec(i)`.
async fn runs_per_second(
    bus: &Bus,
    gateway: &str,
    project: &Path,
    inflight: usize,
    spec: impl Fn(usize) -> String,
) -> anyhow::Result<f64> {
    let mut runs = Vec::new();
    for _ in 0..inflight {
        let id = ids::random();
        let run = ids::run_id("/slipway/bench", &id);
        let sub = bus
            .client()
            .subscribe(format!("slipway.run.{run}.>"))
            .await?;
        runs.push((id, run, sub));
    }
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (id, run, sub)) in runs.into_iter().enumerate() {
        let event = Event::new(
            id,
            "/slipway/bench",
            None,
            slipway_core::bus::now(),
            EventData::ChangeSubmitted(change_of(project, spec(i))),
        );
        bus.publish(&event).await?;
        let gateway = gateway.to_string();
        tasks.spawn(async move { drive(&gateway, &run, sub).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(inflight as f64 / t0.elapsed().as_secs_f64())
}

/// The scale-out row's result.
struct ScaleOut {
    one: f64,
    two: f64,
    /// Builds each of the two replicas took.
    shares: Vec<usize>,
}

/// A build that keeps one core busy for about half a second.
fn cpu_spec(name: &str) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
[build]
command = ["sh", "-c", "i=0; while [ $i -lt 500000 ]; do i=$((i+1)); done; mkdir -p dist && echo ok > dist/a"]
artifacts = ["dist"]
"#
    )
}

/// `builds` CPU-bound builds (each of its own pipeline) through one builder process, then
/// through two, each process taking one job at a time, on a fresh stack each time: builds
/// per second with one and with two, and how the two shared the builds (by `started` facts).
async fn scale_out(data: &Path, project: &Path, builds: usize) -> anyhow::Result<ScaleOut> {
    let mut rates = Vec::new();
    let mut shares = Vec::new();
    for replicas in [1, 2] {
        let env = vec![("SLIPWAY__WORKER__CONCURRENCY".to_string(), "1".to_string())];
        let mut t = Target::start(&data.join(format!("scale-{replicas}")), env).await?;
        let measured = async {
            if replicas == 2 {
                t.stack.add_replica("slipway-builder")?;
            }
            // Every replica is pulling before the clock starts.
            let consumer = t
                .bus
                .jetstream()
                .get_stream(t.bus.stream_name())
                .await?
                .get_consumer::<jetstream::consumer::pull::Config>("builder")
                .await;
            let mut consumer = consumer.map_err(|e| anyhow::anyhow!("builder consumer: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while consumer.info().await?.num_waiting < replicas {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{replicas} builders never pulled"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let rate = runs_per_second(&t.bus, &t.gateway, project, builds, |i| {
                cpu_spec(&format!("cpu-{i}"))
            })
            .await?;
            let started = t
                .bus
                .read(&["slipway.run.*.build.started".to_string()], 1)
                .await?;
            let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
            for r in started {
                if let Ok(Event {
                    data: EventData::BuildStarted(s),
                    ..
                }) = r.event
                {
                    *by_worker.entry(s.worker).or_default() += 1;
                }
            }
            anyhow::Ok((rate, by_worker.into_values().collect::<Vec<_>>()))
        }
        .await;
        t.stack.stop().await;
        let (rate, by_worker) = measured?;
        rates.push(rate);
        shares = by_worker;
    }
    Ok(ScaleOut {
        one: rates[0],
        two: rates[1],
        shares,
    })
}

async fn latest_run(bus: &Bus) -> anyhow::Result<String> {
    let created = bus
        .read(&[slipway_domain::subjects::RUN_CREATED.to_string()], 1)
        .await?;
    created
        .last()
        .and_then(|r| r.event.as_ref().ok())
        .and_then(|e| e.subject.clone())
        .context("no run to ask the gateway about")
}

/// `GET /v1/runs/{id}` at a fixed concurrency: latency percentiles and requests per second.
async fn gateway_load(
    gateway: &str,
    run: &str,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<(Pct, f64)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let url = format!("{gateway}/v1/runs/{run}");
    let per = requests.div_ceil(concurrency.max(1));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (http, url) = (http.clone(), url.clone());
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let r = http.get(&url).send().await?;
                let ok = r.status().is_success();
                let _ = r.bytes().await?;
                if !ok {
                    bail!("the gateway answered an error");
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let rps = all.len() as f64 / t0.elapsed().as_secs_f64();
    Ok((pct(&mut all), rps))
}

/// One artifact stored and read back, in MB/s.
struct Artifacts {
    mib: usize,
    /// `objects::put_file` (content-addressed, as the builder stores an artifact).
    stored: f64,
    /// `objects::get_file`, as a test or deploy fetches it.
    read: f64,
    /// The object store client's own put of the same bytes.
    client_put: f64,
    /// The floor: the same chunks published to the bucket's stream, 256 acks in flight.
    raw: f64,
}

/// Stores an artifact of `mib` MiB of bytes new to the bucket (a content-addressed put of
/// bytes already present stores nothing), reads it back, stores it with the client's own put,
/// and publishes its chunks plainly; then removes what it stored.
async fn artifacts(bus: &Bus, dir: &Path, mib: usize) -> anyhow::Result<Artifacts> {
    use slipway_core::store::objects;
    let bucket = NatsSettings::default().stream.artifacts_bucket;
    let len = mib * 1024 * 1024;
    // xorshift64, seeded from the clock: incompressible and different in every bench run.
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let data: Vec<u8> = (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let path = dir.join("bench-artifact");
    std::fs::write(&path, &data)?;
    let mb = len as f64 / 1e6;
    let rate = |t: Instant| mb / t.elapsed().as_secs_f64();

    let objects = objects::Objects::new(bus);
    let t = Instant::now();
    let stored = objects::put_file(&objects, &bucket, None, &path).await?;
    let stored_rate = rate(t);
    let out = dir.join("bench-artifact-read");
    let t = Instant::now();
    objects::get_file(&objects, &stored, &out).await?;
    let read = rate(t);

    let store = objects::bucket(&objects, &bucket).await?;
    let client_name = "bench/client-put";
    let mut file = tokio::fs::File::open(&path).await?;
    let t = Instant::now();
    store.put(client_name, &mut file).await?;
    let client_put = rate(t);

    let js = bus.jetstream();
    let subject = format!("$O.{bucket}.C.bench-raw");
    let t = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for chunk in data.chunks(128 * 1024) {
        acks.push_back(
            js.publish(subject.clone(), bytes::Bytes::copy_from_slice(chunk))
                .await?,
        );
        if acks.len() >= 256 {
            acks.pop_front().expect("non-empty").await?;
        }
    }
    for a in acks {
        a.await?;
    }
    let raw = rate(t);

    store.delete(&stored.name).await?;
    store.delete(client_name).await?;
    js.get_stream(format!("OBJ_{bucket}"))
        .await?
        .purge()
        .filter(subject)
        .await?;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&out);
    Ok(Artifacts {
        mib,
        stored: stored_rate,
        read,
        client_put,
        raw,
    })
}

/// The floor: plain async-nats on the same server, with messages the size of Slipway's events.
async fn raw_floor(nats: &NatsSettings, n: usize, stored: usize) -> anyhow::Result<RawFloor> {
    let client = Bus::connect(nats, "slipway-bench-raw")
        .await?
        .client()
        .clone();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            ..Default::default()
        })
        .await?;
    let sample = sample_event();
    let (headers, payload) = slipway_core::bus::binding::encode(sample.to_cloudevent());

    // Acked publish latency.
    let mut publish = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        js.publish_with_headers("bench.pub", headers.clone(), payload.clone())
            .await?
            .await?;
        publish.push(t.elapsed());
    }

    // Publish -> pull-consumer receipt: the hop every stage transition is made of.
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("hop".into()),
            filter_subject: "bench.hop".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1)
        .messages()
        .await?;
    let mut hop = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        js.publish_with_headers("bench.hop", headers.clone(), payload.clone())
            .await?
            .await?;
        let m = messages
            .next()
            .await
            .context("consumer ended")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        hop.push(t.elapsed());
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }

    // Pipelined acked publishes: a window of acks in flight.
    let count = n.max(stored);
    let t = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for _ in 0..count {
        acks.push_back(
            js.publish_with_headers("bench.stored", headers.clone(), payload.clone())
                .await?,
        );
        if acks.len() >= 256 {
            acks.pop_front().expect("non-empty").await?;
        }
    }
    for a in acks {
        a.await?;
    }
    let pipelined_rate = count as f64 / t.elapsed().as_secs_f64();

    // Ordered reads of the stored events, raw and decoded.
    let read = |decode: bool| {
        let stream = stream.clone();
        async move {
            let c = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: "bench.stored".into(),
                    ..Default::default()
                })
                .await?;
            let mut msgs = c.messages().await?;
            let t = Instant::now();
            let mut got = 0usize;
            while got < count {
                let m = msgs
                    .next()
                    .await
                    .context("reader ended")?
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if decode {
                    slipway_core::bus::decode(m.headers.as_ref(), &m.payload)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                got += 1;
            }
            anyhow::Ok(count as f64 / t.elapsed().as_secs_f64())
        }
    };
    let read_rate = read(false).await?;
    let read_decode_rate = read(true).await?;
    js.delete_stream("BENCH").await?;
    Ok(RawFloor {
        publish: pct(&mut publish),
        hop: pct(&mut hop),
        pipelined_rate,
        read_rate,
        read_decode_rate,
    })
}

/// A typical event: a build's result.
fn sample_event() -> Event {
    let artifact = slipway_domain::events::ObjectRef {
        bucket: "slipway-artifacts".into(),
        name: "a".repeat(64),
        digest: format!("sha256:{}", "0".repeat(64)).into(),
        size: 1234,
    };
    Event::new(
        ids::random(),
        "/slipway/builder",
        Some(ids::random()),
        slipway_core::bus::now(),
        EventData::BuildSucceeded(slipway_domain::events::BuildSucceeded {
            stage: "build".into(),
            attempt: 1,
            artifact: artifact.clone(),
            files: vec!["dist/a".into()],
            log: artifact,
            duration_ms: 12,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_samples() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        s.reverse();
        let p = pct(&mut s);
        assert!((p.p50 - 51.0).abs() < 1.01, "{}", p.p50);
        assert!((p.p99 - 99.0).abs() < 1.01, "{}", p.p99);
        assert_eq!(pct(&mut []).p50, 0.0);
    }

    #[test]
    fn cpu_time_of_a_process_and_of_the_commands_it_waited_for() {
        let me = std::process::id();
        let (own0, children0) = cpu_ms(me);
        // Busy for at least 60 ms of CPU (six ticks), then a child busy and waited for.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let (own1, children1) = cpu_ms(me);
        assert!(own1 > own0, "{own0} -> {own1}");
        assert!(children1 > children0, "{children0} -> {children1}");
        assert_eq!(cpu_ms(u32::MAX), (0.0, 0.0), "no such process");
    }

    #[test]
    fn stage_work_by_kind() {
        let mut sim = slipway_domain::sim::Sim::new(slipway_domain::spec::NOOP_PIPELINE);
        sim.run_to_end();
        let kinds: Vec<String> = stage_work(&sim.log).into_iter().map(|(k, _)| k).collect();
        // The simulation publishes `started` for deploys only (the workers do for every
        // stage, which the smoke test sees): staging, the approval, production.
        assert_eq!(kinds, ["deploy", "approval", "deploy"]);
    }

    #[test]
    fn stage_overheads_split_at_the_request() {
        let mut sim = slipway_domain::sim::Sim::new(slipway_domain::spec::NOOP_PIPELINE);
        sim.run_to_end();
        assert!(sim.run().is_ended());
        let split = stage_overheads(&sim.log);
        // The simulation's workers report `started` for some stages only; each of those
        // after the first follows a result (or a decision) and a request.
        assert!(!split.is_empty());
        for (whole, conductor, worker) in split {
            assert_eq!(whole, conductor + worker);
            // The simulation answers a request one second after it is made.
            assert_eq!(worker, Duration::from_secs(1));
        }
    }
}
