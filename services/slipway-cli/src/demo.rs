//! `slipway demo`: Slipway delivering three changes of a small model server, end to end, on
//! this machine.
//!
//! It starts its own nats-server and every service, then drives:
//! 1. version 1.0.0: build (rustc), unit and integration suites, staging, an approval through
//!    the gateway's HTTP API, production, verified by the monitor;
//! 2. version 1.1.0, healthy but less accurate and slower: the quality gates stop it before
//!    anyone is asked to approve, and nothing reaches production;
//! 3. version 2.0.0, whose deliberate defect (it starts answering errors after two seconds)
//!    only production monitoring sees: it passes the gates, is approved, reaches production,
//!    degrades, and is rolled back to 1.0.0, which serves again.
//!
//! It exits 0 only when all three runs end as described.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use slipway_core::exec::server::free_port;

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
    for env in ["staging", "production"] {
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
    let (v1, worse, v2) = (
        data.join("src-v1"),
        data.join("src-v1.1"),
        data.join("src-v2"),
    );
    for dir in [&v1, &worse, &v2] {
        copy_tree(&project, dir)?;
    }
    std::fs::write(worse.join("model.conf"), WORSE)?;
    std::fs::write(v2.join("model.conf"), DEFECT)?;

    let (staging, production, gateway_port) = (free_port(), free_port(), free_port());
    let template = std::fs::read_to_string(project.join("pipeline.toml.in"))?;
    let spec = template
        .replace("@RUSTC@", &real_rustc())
        .replace("@STAGING_PORT@", &staging.to_string())
        .replace("@PRODUCTION_PORT@", &production.to_string())
        .replace("@STATE_DIR@", &state_dir.display().to_string())
        .replace("@MONITOR_WINDOW_SECS@", &monitor_window.max(2).to_string());
    let spec_path = data.join("pipeline.toml");
    std::fs::write(&spec_path, spec)?;

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

    let stack = Stack::start(None, free_port(), &data, Some(&config_path), true).await?;
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
    outln!("  production   http://127.0.0.1:{production}");

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
        let first = deliver(
            &client,
            &gateway,
            &token,
            &spec_path,
            &v1,
            "model server 1.0.0",
        )
        .await?;
        let live_after_first = version_at(production).await;
        let blocked = deliver(
            &client,
            &gateway,
            &token,
            &spec_path,
            &worse,
            "model server 1.1.0 (healthy, but less accurate and slower)",
        )
        .await?;
        let second = deliver(
            &client,
            &gateway,
            &token,
            &spec_path,
            &v2,
            "model server 2.0.0 (more accurate, with a defect only production shows)",
        )
        .await?;
        let live_after_second = version_at(production).await;
        anyhow::Ok((first, live_after_first, blocked, second, live_after_second))
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
    stop_servers(&state_dir);
    stack.stop().await;
    let Some(outcome) = outcome else {
        eprintln!("Demo interrupted; everything it started is stopped.");
        return Ok(ExitCode::from(130));
    };
    let (first, live1, blocked, second, live2) = outcome?;

    // Stopped by a gate before anyone was asked to approve.
    let gate_failed = blocked["stages"].as_array().is_some_and(|st| {
        st.iter().any(|s| {
            matches!(s["name"].as_str(), Some("evaluate" | "perf")) && s["status"] == "failed"
        }) && st
            .iter()
            .any(|s| s["name"] == "approval:production" && s["requested_at"].is_null())
    });
    let ok_blocked = phase_of(&blocked) == slipway_domain::Phase::Failed && gate_failed;

    let ok1 =
        phase_of(&first) == slipway_domain::Phase::Succeeded && live1.as_deref() == Some("1.0.0");
    let ok2 =
        phase_of(&second) == slipway_domain::Phase::RolledBack && live2.as_deref() == Some("1.0.0");
    outln!("\nSummary");
    outln!(
        "  {} run {}: {} (production then served {})",
        if ok1 { "✓" } else { "✗" },
        first["run_id"].as_str().unwrap_or(""),
        first["phase"].as_str().unwrap_or(""),
        live1.as_deref().unwrap_or("nothing")
    );
    outln!(
        "  {} run {}: {} before approval, stopped by the gates",
        if ok_blocked { "✓" } else { "✗" },
        blocked["run_id"].as_str().unwrap_or(""),
        blocked["phase"].as_str().unwrap_or(""),
    );
    if let Some(r) = blocked["reason"].as_str() {
        outln!("    {r}");
    }
    outln!(
        "  {} run {}: {} (production then served {})",
        if ok2 { "✓" } else { "✗" },
        second["run_id"].as_str().unwrap_or(""),
        second["phase"].as_str().unwrap_or(""),
        live2.as_deref().unwrap_or("nothing")
    );
    if let Some(r) = second["reason"].as_str() {
        outln!("    {r}");
    }
    outln!(
        "  gateway was {gateway}; the event log is in {}",
        data.join("nats").display()
    );
    if ok1 && ok_blocked && ok2 {
        outln!(
            "Demo passed: 1.0.0 verified in production; 1.1.0 stopped by the quality gates; \
             2.0.0 passed them, degraded in production and was rolled back to 1.0.0."
        );
        Ok(ExitCode::SUCCESS)
    } else {
        outln!(
            "Demo FAILED: expected 1.0.0 succeeded, 1.1.0 failed at the gates, 2.0.0 rolled back \
             to 1.0.0."
        );
        Ok(ExitCode::from(1))
    }
}
