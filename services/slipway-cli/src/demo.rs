//! `slipway demo`: Slipway delivering five changes of a small model server, end to end, on
//! this machine, production behind a router that splits live traffic by a flagd flag, with
//! simulated users (and their feedback) on it the whole time.
//!
//! It starts its own nats-server, every service and the router, then drives:
//! 1. version 1.0.0: build (rustc), unit and integration suites, staging, an approval through
//!    the gateway's HTTP API, production (its first deploy: promoted at once), verified by the
//!    monitor;
//! 2. version 1.1.0, healthy but less accurate and slower: the quality gates stop it before
//!    anyone is asked to approve, and nothing reaches production;
//! 3. version 2.0.0, whose deliberate defect (it starts answering errors after two seconds)
//!    only production shows: it passes the gates, is approved, and is caught by the canary at
//!    its first step (5% of the users; the others never see it), aborted and rolled back;
//! 4. version 2.1.0, knowing more than 1.0.0: an A/B experiment on the users' feedback finds it
//!    better and promotes it;
//! 5. version 2.2.0, knowing a little less: shadowed (copies of half the requests, answers never
//!    served), its answers compared with 2.1.0's by agreement and embedding similarity, within
//!    the bounds, promoted.
//!
//! It exits 0 only when all five runs end as described.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use slipway_core::exec::server::free_ports;

use crate::client::{Client, change_from, phase_of};
use crate::http;
use crate::out::outln;
use crate::show;
use crate::up::Stack;

const APPROVER: &str = "demo-approver";
/// Healthy but worse: forgets half of what 1.0.0 knew, and answers 40 ms slower.
const WORSE: &str = "version = 1.1.0\nskip = 12\nslow_ms = 40\n";
/// Better than 1.0.0 (knows every fact), with a defect only production shows: errors after
/// two seconds of uptime there.
const DEFECT: &str =
    "version = 2.0.0\nskip = 0\ndegrade_after_secs = 2\ndegrade_only_in = production\n";
/// Knows every fact, without the defect: better than 1.0.0 for the users.
const BETTER: &str = "version = 2.1.0\nskip = 0\n";
/// Forgets the last two facts: 18 of 20 answers agree with 2.1.0's.
const SHADOWED: &str = "version = 2.2.0\nskip = 2\n";

/// The rollouts of production, one per kind of change (the spec travels with each change).
const CANARY: &str = r#"strategy = "canary"
requests = "demo_router_requests_total"
interval_secs = 1
min_requests = 20
steps = [{ weight = 5, duration_secs = 8 }, { weight = 50, duration_secs = 4 }]
[[environment.rollout.analysis]]
name = "errors"
kind = "ratio"
numerator = "demo_router_errors_total"
denominator = "demo_router_requests_total"
tolerance = 0.02
[[environment.rollout.analysis]]
name = "latency_p95"
kind = "latency"
histogram = "demo_router_request_duration_seconds"
quantile = 0.95
max_increase_pct = 200
[[environment.rollout.analysis]]
name = "liked"
kind = "ratio"
numerator = "demo_feedback_positive_total"
denominator = "demo_feedback_total"
higher_is_better = true
tolerance = 0.1"#;

const AB: &str = r#"strategy = "ab"
requests = "demo_router_requests_total"
interval_secs = 1
min_requests = 30
[[environment.rollout.analysis]]
name = "errors"
kind = "ratio"
numerator = "demo_router_errors_total"
denominator = "demo_router_requests_total"
tolerance = 0.02
[[environment.rollout.analysis]]
name = "liked"
kind = "ratio"
numerator = "demo_feedback_positive_total"
denominator = "demo_feedback_total"
higher_is_better = true
[environment.rollout.ab]
metric = "liked"
min_effect = 0.1
weight = 50
max_duration_secs = 60"#;

const SHADOW: &str = r#"strategy = "shadow"
requests = "demo_router_requests_total"
interval_secs = 1
min_requests = 10
[[environment.rollout.analysis]]
name = "errors"
kind = "ratio"
numerator = "demo_router_errors_total"
denominator = "demo_router_requests_total"
tolerance = 0.02
[environment.rollout.shadow]
share = 50
duration_secs = 4
min_pairs = 40
min_agreement = 0.8
min_similarity = 0.8
embeddings = { base_url = "http://127.0.0.1:@STAGING_PORT@/v1", model = "bag-of-words" }"#;

fn locate_project(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return std::fs::canonicalize(&p)
            .with_context(|| format!("{} does not exist", p.display()));
    }
    let rel = Path::new("deploy/demo/model-server");
    let mut candidates = vec![std::env::current_dir()?.join(rel)];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().map(|a| a.join(rel)));
    }
    candidates
        .into_iter()
        .find(|c| c.join("pipeline.toml.in").is_file())
        .context("deploy/demo/model-server not found: run from the repository or pass --project")
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// The compiler itself, not a rustup proxy: the build runs with a cleared environment.
fn real_rustc() -> String {
    std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin/rustc"))
        .filter(|p| p.is_file())
        .map_or_else(|| "rustc".to_string(), |p| p.display().to_string())
}

async fn version_at(port: u16) -> Option<String> {
    let body = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/version"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["version"].as_str().map(str::to_string)
}

/// One change through the pipeline, approved through the HTTP API when it waits.
async fn deliver(
    client: &Client,
    gateway: &str,
    token: &str,
    spec: &Path,
    source: &Path,
    title: &str,
) -> anyhow::Result<Value> {
    let change = change_from(
        spec,
        Some(source.display().to_string()),
        None,
        Some(title.into()),
    )?;
    let (run, seq) = client.send_change(change).await?;
    outln!("\n▶ {title}: run {run}");
    let state = client
        .wait_until(&run, seq, Duration::from_secs(600), |s| {
            s["phase"] == "awaiting_approval"
        })
        .await?;
    if phase_of(&state).is_final() {
        show::print_status(&state);
        return Ok(state);
    }
    outln!("  built, tested and deployed to staging; waiting for approval");
    let recorded = http::decide(
        gateway,
        token,
        &run,
        true,
        Some(format!("demo: {title}")),
        None,
    )
    .await?;
    outln!(
        "  ✓ approved through the HTTP API: POST {gateway}/v1/runs/{run}/approvals as {} (artifact {})",
        recorded["approver"].as_str().unwrap_or(APPROVER),
        recorded["artifact_digest"].as_str().unwrap_or("")
    );
    let state = client
        .wait_until(&run, seq, Duration::from_secs(600), |s| {
            phase_of(s).is_final()
        })
        .await?;
    show::print_status(&state);
    Ok(state)
}

fn stop_servers(state_dir: &Path) {
    for env in [
        "staging",
        "production-stable",
        "production-candidate",
        "router",
    ] {
        if let Ok(pid) = std::fs::read_to_string(state_dir.join(env).join("pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// The router in front of production's two slots, built from the demo's source with `rustc`.
fn start_router(
    project: &Path,
    data: &Path,
    port: u16,
    flags: &Path,
    slots: (u16, u16),
) -> anyhow::Result<()> {
    let src = project.join("../router/src/main.rs");
    let dir = data.join("deployments/router");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("router");
    let built = std::process::Command::new(real_rustc())
        .args(["--edition", "2024", "-O", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .with_context(|| format!("cannot run rustc on {}", src.display()))?;
    if !built.success() {
        bail!("the router ({}) did not build", src.display());
    }
    let log = std::fs::File::create(dir.join("router.log"))?;
    let child = std::process::Command::new(&bin)
        .args(["--port", &port.to_string(), "--flags"])
        .arg(flags)
        .args([
            "--stable",
            &format!("http://127.0.0.1:{}", slots.0),
            "--candidate",
            &format!("http://127.0.0.1:{}", slots.1),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    std::fs::write(dir.join("pid"), child.id().to_string())?;
    Ok(())
}

/// The questions of the demo's dataset, as its users ask them.
fn questions(project: &Path) -> Vec<String> {
    std::fs::read_to_string(project.join("eval/qa.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["messages"]
                .as_array()?
                .iter()
                .rev()
                .find(|m| m["role"] == "user")?["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// Simulated users on production until `stop`: 50 requests a second from 500 users, each
/// answer followed by the user's feedback (positive unless the model did not know or failed).
async fn users(
    router: String,
    questions: Vec<String>,
    stop: slipway_core::runtime::CancellationToken,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut n: u64 = 0;
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let user = format!("user-{}", n.wrapping_mul(7919) % 500);
        let question = questions[(n as usize) % questions.len().max(1)].clone();
        let (client, router) = (client.clone(), router.clone());
        tokio::spawn(async move {
            let body = serde_json::json!({
                "model": "demo-model",
                "messages": [{"role": "user", "content": question}],
            });
            let answer = client
                .post(format!("{router}/v1/chat/completions"))
                .header("x-user", &user)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            let positive = match answer {
                Ok(r) if r.status().is_success() => r
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .and_then(|v| {
                        v["choices"][0]["message"]["content"]
                            .as_str()
                            .map(|c| c != "I don't know.")
                    })
                    .unwrap_or(false),
                _ => false,
            };
            let _ = client
                .post(format!("{router}/feedback"))
                .header("content-type", "application/json")
                .body(serde_json::json!({"user": user, "positive": positive}).to_string())
                .send()
                .await;
        });
    }
}

/// The production rollout of a run, once it ended: (its strategy's looks, the highest weight
/// the candidate was given, its last look).
fn rollout_of(state: &Value) -> (usize, f64, Value) {
    let r = &state["rollouts"][0];
    let looks = r["looks"].as_array().map_or(0, Vec::len);
    let max = r["weights"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["cause"] == "step")
        .filter_map(|w| w["weight"].as_f64())
        .fold(0.0, f64::max);
    let last = r["looks"]
        .as_array()
        .and_then(|l| l.last().cloned())
        .unwrap_or(Value::Null);
    (looks, max, last)
}

/// `slipway demo`.
pub async fn demo(
    project: Option<PathBuf>,
    data_dir: PathBuf,
    monitor_window: u64,
) -> anyhow::Result<ExitCode> {
    let project = locate_project(project)?;
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir)?;
    let data = std::fs::canonicalize(&data_dir)?;
    let state_dir = data.join("deployments");
    let sources: Vec<PathBuf> = ["src-v1", "src-v1.1", "src-v2", "src-v2.1", "src-v2.2"]
        .iter()
        .map(|d| data.join(d))
        .collect();
    for dir in &sources {
        copy_tree(&project, dir)?;
    }
    for (dir, conf) in sources[1..].iter().zip([WORSE, DEFECT, BETTER, SHADOWED]) {
        std::fs::write(dir.join("model.conf"), conf)?;
    }

    // One set, so no two of the demo's servers are handed the same port.
    let [
        staging,
        production,
        gateway_port,
        stable_port,
        candidate_port,
        nats_port,
    ] = free_ports();
    let flag_file = data.join("flags/flags.json");
    let template = std::fs::read_to_string(project.join("pipeline.toml.in"))?;
    let spec_with = |rollout: &str| -> anyhow::Result<PathBuf> {
        let spec = template
            .replace("@ROLLOUT@", rollout)
            .replace("@RUSTC@", &real_rustc())
            .replace("@STAGING_PORT@", &staging.to_string())
            .replace("@PRODUCTION_PORT@", &production.to_string())
            .replace("@STABLE_PORT@", &stable_port.to_string())
            .replace("@CANDIDATE_PORT@", &candidate_port.to_string())
            .replace("@FLAG_FILE@", &flag_file.display().to_string())
            .replace("@STATE_DIR@", &state_dir.display().to_string())
            .replace("@MONITOR_WINDOW_SECS@", &monitor_window.max(2).to_string());
        let name = rollout
            .lines()
            .next()
            .and_then(|l| l.split('"').nth(1))
            .unwrap_or("rollout");
        let path = data.join(format!("pipeline-{name}.toml"));
        std::fs::write(&path, spec)?;
        Ok(path)
    };
    let (canary, ab, shadow) = (spec_with(CANARY)?, spec_with(AB)?, spec_with(SHADOW)?);

    let token = slipway_domain::ids::random();
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    let (seed, public) = slipway_domain::signing::SigningKey::generate();
    let config = format!(
        "[approvals]\npublic_key = \"{public}\"\n\n\
         [gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\npublic_url = \"{gateway}\"\nsigning_key = \"{seed}\"\n\n\
         [[gateway.approvers]]\nname = \"{APPROVER}\"\ngroups = [\"release-managers\"]\n\
         token_sha256 = \"{:x}\"\n\n\
         [pricing.models.demo-model]\ninput_per_1k = 0.01\noutput_per_1k = 0.03\n\n\
         [pricing.instances.demo-small]\nper_hour = 0.05\n",
        Sha256::digest(token.as_bytes())
    );
    let config_path = data.join("slipway.toml");
    std::fs::write(&config_path, config)?;

    let stack = Stack::start(None, nats_port, &data, Some(&config_path), true).await?;
    let router = format!("http://127.0.0.1:{production}");
    if let Err(e) = start_router(
        &project,
        &data,
        production,
        &flag_file,
        (stable_port, candidate_port),
    ) {
        stack.stop().await;
        return Err(e);
    }
    outln!("Slipway demo");
    outln!("  NATS         {}", stack.url);
    if let Some(c) = &stack.credentials {
        outln!(
            "  NATS users   least-privilege; passwords in {} (admin for operators)",
            c.dir().display()
        );
    }
    outln!("  gateway      {gateway}  (approver page; approver token {token})");
    outln!("  staging      http://127.0.0.1:{staging}");
    outln!(
        "  production   {router}  (router: stable slot :{stable_port}, candidate slot :{candidate_port}, flag {})",
        flag_file.display()
    );
    let stop_users = slipway_core::runtime::CancellationToken::new();
    tokio::spawn(users(
        router.clone(),
        questions(&project),
        stop_users.clone(),
    ));
    outln!("  users        50 requests a second from 500 simulated users, with their feedback");

    let flow = async {
        let client = Client::connect(&stack.settings("cli")).await?;
        // The gateway listens once it has connected.
        let mut ready = false;
        for _ in 0..100 {
            if reqwest::get(format!("{gateway}/healthz"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ready {
            bail!("the gateway did not come up at {gateway}");
        }
        let changes = [
            (&canary, &sources[0], "model server 1.0.0"),
            (
                &canary,
                &sources[1],
                "model server 1.1.0 (healthy, but less accurate and slower)",
            ),
            (
                &canary,
                &sources[2],
                "model server 2.0.0 (more accurate, with a defect only production shows), as a canary",
            ),
            (
                &ab,
                &sources[3],
                "model server 2.1.0 (more accurate), as an A/B experiment on the users' feedback",
            ),
            (
                &shadow,
                &sources[4],
                "model server 2.2.0 (knows a little less), shadowed",
            ),
        ];
        let mut out = Vec::new();
        for (spec, source, title) in changes {
            let state = deliver(&client, &gateway, &token, spec, source, title).await?;
            out.push((state, version_at(production).await));
        }
        anyhow::Ok(out)
    };
    // Ctrl-C stops everything the demo started (services and model servers live in their
    // own process groups and would otherwise outlive it).
    let interrupted = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let outcome = tokio::select! {
        o = flow => Some(o),
        _ = interrupted => None,
    };
    stop_users.cancel();
    stop_servers(&state_dir);
    stack.stop().await;
    let Some(outcome) = outcome else {
        eprintln!("Demo interrupted; everything it started is stopped.");
        return Ok(ExitCode::from(130));
    };
    let runs = outcome?;
    let [
        (first, live1),
        (blocked, _),
        (defective, live3),
        (better, live4),
        (shadowed, live5),
    ] = <[(Value, Option<String>); 5]>::try_from(runs).map_err(|_| anyhow::anyhow!("five runs"))?;
    let phase = |s: &Value| phase_of(s);
    use slipway_domain::Phase;

    // Stopped by a gate before anyone was asked to approve.
    let gate_failed = blocked["stages"].as_array().is_some_and(|st| {
        st.iter().any(|s| {
            matches!(s["name"].as_str(), Some("evaluate" | "perf")) && s["status"] == "failed"
        }) && st
            .iter()
            .any(|s| s["name"] == "approval:production" && s["requested_at"].is_null())
    });
    let (_, max3, last3) = rollout_of(&defective);
    let (_, _, last4) = rollout_of(&better);
    let (_, _, last5) = rollout_of(&shadowed);
    let checks = [
        (
            phase(&first) == Phase::Succeeded && live1.as_deref() == Some("1.0.0"),
            format!(
                "1.0.0 {}; production served {}",
                first["phase"].as_str().unwrap_or(""),
                live1.as_deref().unwrap_or("nothing")
            ),
        ),
        (
            phase(&blocked) == Phase::Failed && gate_failed,
            format!(
                "1.1.0 {} before approval, stopped by the gates: {}",
                blocked["phase"].as_str().unwrap_or(""),
                blocked["reason"].as_str().unwrap_or("")
            ),
        ),
        (
            phase(&defective) == Phase::RolledBack
                && max3 <= 5.0
                && last3["decision"] == "abort"
                && live3.as_deref() == Some("1.0.0"),
            format!(
                "2.0.0 {} by the canary at {max3}% (the other users never saw it): {}; production served {}",
                defective["phase"].as_str().unwrap_or(""),
                last3["reason"].as_str().unwrap_or(""),
                live3.as_deref().unwrap_or("nothing")
            ),
        ),
        (
            phase(&better) == Phase::Succeeded
                && last4["ab"]["winner"] == "candidate"
                && live4.as_deref() == Some("2.1.0"),
            format!(
                "2.1.0 {}: the A/B experiment found it better ({}); production served {}",
                better["phase"].as_str().unwrap_or(""),
                last4["reason"].as_str().unwrap_or(""),
                live4.as_deref().unwrap_or("nothing")
            ),
        ),
        (
            phase(&shadowed) == Phase::Succeeded
                && last5["shadow"]["pairs"].as_u64().is_some_and(|n| n >= 40)
                && live5.as_deref() == Some("2.2.0"),
            format!(
                "2.2.0 {}: shadowed on {} mirrored requests, agreement {:.2}, similarity {:.2}; production served {}",
                shadowed["phase"].as_str().unwrap_or(""),
                last5["shadow"]["pairs"],
                last5["shadow"]["agreement"].as_f64().unwrap_or(0.0),
                last5["shadow"]["similarity"].as_f64().unwrap_or(0.0),
                live5.as_deref().unwrap_or("nothing")
            ),
        ),
    ];
    outln!("\nSummary");
    for ((ok, what), state) in checks
        .iter()
        .zip([&first, &blocked, &defective, &better, &shadowed])
    {
        outln!(
            "  {} run {}: {what}",
            if *ok { "✓" } else { "✗" },
            state["run_id"].as_str().unwrap_or("")
        );
    }
    outln!(
        "  gateway was {gateway}; the event log is in {}",
        data.join("nats").display()
    );
    if checks.iter().all(|(ok, _)| *ok) {
        outln!(
            "Demo passed: 1.0.0 verified in production; 1.1.0 stopped by the quality gates; \
             2.0.0 caught by the canary at its first step and rolled back; 2.1.0 won an A/B \
             experiment and was promoted; 2.2.0 was shadowed within its bounds and promoted."
        );
        Ok(ExitCode::SUCCESS)
    } else {
        outln!(
            "Demo FAILED: expected 1.0.0 succeeded, 1.1.0 failed at the gates, 2.0.0 rolled back \
             by its canary, 2.1.0 promoted by an A/B experiment, 2.2.0 promoted after a shadow."
        );
        Ok(ExitCode::from(1))
    }
}
