//! `slipway soak`: many runs through no-op stages on a private nats-server and services, with
//! faults injected all along (SIGKILL of a random service, restarts of nats-server on its
//! store); then it counts. Lost runs and duplicated side effects must both be zero.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use slipway_core::bus::Bus;
use slipway_core::exec::server::free_port;
use slipway_domain::events::{ChangeSubmitted, EventData, SourceRef};
use slipway_domain::{Event, ids};

use crate::out::outln;
use crate::up::{SERVICES, Stack};

#[derive(Debug, Clone)]
pub struct Options {
    pub runs: usize,
    /// Runs submitted per second at most.
    pub rate: f64,
    /// Seconds between faults (0: none).
    pub fault_every: f64,
    /// Give up waiting for the runs' ends after this long once all are submitted.
    pub timeout_secs: u64,
    pub seed: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub json: bool,
}

/// Distinct pipelines: one pipeline's deploys go one at a time, by design.
const PIPELINES: usize = 8;

fn spec(i: usize, counts: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "soak-{i}"
[build]
command = ["sh", "-c", "mkdir -p dist && echo $SLIPWAY_RUN_ID > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
[[environment]]
name = "staging"
[environment.deploy]
command = ["sh", "-c", "echo \"$SLIPWAY_RUN_ID\" >> \"{c}/$SLIPWAY_ENVIRONMENT\""]
timeout_secs = 20
[[environment]]
name = "production"
[environment.deploy]
command = ["sh", "-c", "echo \"$SLIPWAY_RUN_ID\" >> \"{c}/$SLIPWAY_ENVIRONMENT\""]
timeout_secs = 20
"#,
        c = counts.display()
    )
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// `slipway soak`.
pub async fn soak(opts: Options) -> anyhow::Result<ExitCode> {
    let data = opts.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("slipway-soak-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&data);
    let counts = data.join("counts");
    let project = data.join("project");
    std::fs::create_dir_all(&counts)?;
    std::fs::create_dir_all(&project)?;
    std::fs::write(project.join("README"), "soak")?;
    let config = data.join("slipway.toml");
    std::fs::write(
        &config,
        "[worker]\nack_wait_secs = 5\n\n[conductor]\ntick_millis = 200\n",
    )?;
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("slipway soak: {} runs, seed {seed}", opts.runs);
    let mut rng = Lcg(seed);
    let mut stack = Stack::start(None, free_port(), &data, Some(&config), true).await?;
    stack.backoff_cap = Duration::from_millis(100);
    let bus = Bus::connect(&stack.settings("admin"), "slipway-soak").await?;
    bus.ensure_stream().await?;

    let started = Instant::now();
    let mut acknowledged: Vec<String> = Vec::new();
    let mut unacknowledged = 0usize;
    let mut faults: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_fault = Instant::now() + Duration::from_secs_f64(opts.fault_every.max(0.1));
    let gap = Duration::from_secs_f64(1.0 / opts.rate.max(0.1));
    let mut i = 0usize;
    let specs: Vec<String> = (0..PIPELINES).map(|p| spec(p, &counts)).collect();
    // Submit, injecting faults as we go; keep supervising (restarting what was killed).
    while i < opts.runs {
        let change = ChangeSubmitted {
            spec: specs[i % PIPELINES].clone(),
            source: SourceRef::Directory {
                path: project.display().to_string(),
            },
            author: Some("soak".into()),
            title: Some(format!("soak {i}")),
            rerun_of: None,
            commit: None,
        };
        let event = Event::new(
            ids::random(),
            "/slipway/soak",
            None,
            slipway_core::bus::now(),
            EventData::ChangeSubmitted(change),
        );
        match tokio::time::timeout(Duration::from_secs(5), bus.publish(&event)).await {
            Ok(Ok(_)) => acknowledged.push(ids::run_id(&event.source, &event.id)),
            // Not acknowledged: the change may or may not be stored; it is not counted.
            _ => unacknowledged += 1,
        }
        i += 1;
        if opts.fault_every > 0.0 && Instant::now() >= next_fault {
            inject(&mut stack, &mut rng, &mut faults)?;
            next_fault = Instant::now() + Duration::from_secs_f64(opts.fault_every);
        }
        stack.supervise_once();
        tokio::time::sleep(gap).await;
    }
    eprintln!(
        "submitted {} ({} acknowledged) in {:.0}s; waiting for their ends",
        opts.runs,
        acknowledged.len(),
        started.elapsed().as_secs_f64()
    );

    // Wait for every acknowledged run's end, faults continuing for the first half.
    let wait_until = Instant::now() + Duration::from_secs(opts.timeout_secs);
    let faults_until = Instant::now() + Duration::from_secs(opts.timeout_secs / 4);
    let mut ends: BTreeMap<String, String> = BTreeMap::new();
    loop {
        stack.supervise_once();
        if opts.fault_every > 0.0 && Instant::now() >= next_fault && Instant::now() < faults_until {
            inject(&mut stack, &mut rng, &mut faults)?;
            next_fault = Instant::now() + Duration::from_secs_f64(opts.fault_every);
        }
        if let Ok(read) = ended(&bus).await {
            ends = read;
        }
        let open = acknowledged
            .iter()
            .filter(|r| !ends.contains_key(*r))
            .count();
        if open == 0 || Instant::now() > wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Count.
    let created = created(&bus).await?;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for r in &acknowledged {
        *outcomes
            .entry(ends.get(r).cloned().unwrap_or_else(|| "not ended".into()))
            .or_default() += 1;
    }
    let lost = acknowledged
        .iter()
        .filter(|r| !created.contains(*r) || !ends.contains_key(*r))
        .count();
    let mut duplicate_deploys = 0usize;
    for env in ["staging", "production"] {
        let text = std::fs::read_to_string(counts.join(env)).unwrap_or_default();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for l in text.lines() {
            *per.entry(l.trim()).or_default() += 1;
        }
        duplicate_deploys += per.values().map(|n| n.saturating_sub(1)).sum::<usize>();
    }
    let artifacts = artifacts_per_run(&bus).await?;
    let duplicate_artifacts = artifacts
        .values()
        .map(|n| n.saturating_sub(1))
        .sum::<usize>();
    let events = bus.last_seq().await?;
    let elapsed = started.elapsed().as_secs_f64();
    stack.stop().await;

    let report = json!({
        "seed": seed,
        "runs_submitted": opts.runs,
        "runs_acknowledged": acknowledged.len(),
        "submissions_not_acknowledged": unacknowledged,
        "runs_created": created.len(),
        "outcomes": outcomes,
        "lost": lost,
        "duplicate_deploys": duplicate_deploys,
        "duplicate_artifacts": duplicate_artifacts,
        "events_in_log": events,
        "faults": faults,
        "seconds": elapsed,
    });
    if opts.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("| soak | |");
        outln!("|---|---|");
        outln!("| seed | {seed} |");
        outln!(
            "| runs submitted / acknowledged | {} / {} |",
            opts.runs,
            acknowledged.len()
        );
        outln!("| runs created | {} |", created.len());
        for (o, n) in &outcomes {
            outln!("| ended {o} | {n} |");
        }
        outln!("| lost (must be 0) | {lost} |");
        outln!("| duplicated deploys (must be 0) | {duplicate_deploys} |");
        outln!("| duplicated artifacts (must be 0) | {duplicate_artifacts} |");
        outln!("| events in the log | {events} |");
        outln!("| faults injected | {faults:?} |");
        outln!("| duration | {elapsed:.0} s |");
    }
    if opts.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&data);
    }
    Ok(
        if lost == 0 && duplicate_deploys == 0 && duplicate_artifacts == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// SIGKILL of a random service (restarted by the supervisor), or a restart of nats-server.
fn inject(
    stack: &mut Stack,
    rng: &mut Lcg,
    faults: &mut BTreeMap<String, u32>,
) -> anyhow::Result<()> {
    // The workers a no-op pipeline uses, the conductor, or the server.
    let targets = [
        "slipway-conductor",
        "slipway-builder",
        "slipway-tester",
        "slipway-deployer",
        "nats-server",
    ];
    let t = targets[rng.next(targets.len() as u64) as usize];
    if t == "nats-server" {
        stack.restart_nats().context("restarting nats-server")?;
    } else if let Some((_, pid)) = stack.pids().into_iter().find(|(n, _)| *n == t) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    *faults.entry(t.to_string()).or_default() += 1;
    debug_assert!(SERVICES.contains(&t) || t == "nats-server");
    Ok(())
}

/// Runs that ended, with how, from the log.
async fn ended(bus: &Bus) -> anyhow::Result<BTreeMap<String, String>> {
    let recs = bus.read(&["slipway.run.*.run.*".to_string()], 1).await?;
    let mut out = BTreeMap::new();
    for r in recs {
        if let Ok(e) = r.event
            && let Some(run) = e.subject.clone()
        {
            let outcome = match &e.data {
                EventData::RunSucceeded(_) => "succeeded".to_string(),
                EventData::RunFailed(x) => {
                    if x.reason.contains("timed out") && x.reason.contains("deploy:") {
                        "failed (an interrupted deploy timed out)".into()
                    } else {
                        format!("failed ({})", x.reason.chars().take(60).collect::<String>())
                    }
                }
                EventData::RunCancelled(_) => "cancelled".into(),
                EventData::RunRejected(_) => "rejected".into(),
                EventData::RunRolledBack(_) => "rolled back".into(),
                _ => continue,
            };
            out.insert(run, outcome);
        }
    }
    Ok(out)
}

async fn created(bus: &Bus) -> anyhow::Result<BTreeSet<String>> {
    let recs = bus
        .read(&[slipway_domain::subjects::RUN_CREATED.to_string()], 1)
        .await?;
    Ok(recs
        .into_iter()
        .filter_map(|r| r.event.ok()?.subject)
        .collect())
}

async fn artifacts_per_run(bus: &Bus) -> anyhow::Result<BTreeMap<String, usize>> {
    let recs = bus
        .read(&["slipway.run.*.build.succeeded".to_string()], 1)
        .await?;
    let mut digests: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in recs {
        if let Ok(e) = r.event
            && let (Some(run), EventData::BuildSucceeded(b)) = (e.subject.clone(), &e.data)
        {
            digests
                .entry(run)
                .or_default()
                .insert(b.artifact.digest.to_string());
        }
    }
    Ok(digests.into_iter().map(|(k, v)| (k, v.len())).collect())
}
