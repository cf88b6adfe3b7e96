//! Shipping behind an approval, across real processes: no production deploy without an
//! approval the policy accepts, whatever reaches the bus; the gateway's answers through
//! `slipway approve`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use slipway_domain::events::{ApprovalDecision, DeployRequested, EventData};
use slipway_domain::{Event, Run, ids};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(60);

fn spec(counts: &Path) -> String {
    let deploy = format!(
        r#"[environment.deploy]
command = ["sh", "-c", "echo \"$SLIPWAY_RUN_ID $SLIPWAY_VERSION previous=$SLIPWAY_PREVIOUS_VERSION\" >> \"$COUNTS/$SLIPWAY_ENVIRONMENT\""]
env = {{ COUNTS = "{}" }}
"#,
        counts.display()
    );
    format!(
        r#"
[pipeline]
name = "ship"
[build]
command = ["sh", "-c", "mkdir -p dist && echo $RANDOM > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
[[environment]]
name = "staging"
{deploy}
[[environment]]
name = "production"
requires_approval = true
{deploy}
[approval]
allowed_groups = ["release-managers"]
"#
    )
}

/// Lines the deploy command wrote for an environment (one per invocation).
fn deploys(counts: &Path, env: &str) -> Vec<String> {
    std::fs::read_to_string(counts.join(env))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn approve(stack: &Stack, run: &str, who: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["approve", run, "--token"];
    let token = format!("{who}-token");
    args.push(&token);
    args.extend_from_slice(extra);
    let out = stack.slipway(&args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_needs_an_accepted_approval_and_a_rejection_deploys_nothing() {
    let stack = Stack::start();
    stack.wait_gateway();
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let dir = project(stack.dir.path(), "ship", &spec(&counts), &[]);

    // A rejected run: staging only.
    let first = stack.submit_as(&dir, "erin");
    stack.wait_phase(&first, "awaiting_approval", LONG);
    let (ok, out) = approve(
        &stack,
        &first,
        "bob",
        &["--reject", "--comment", "not this week"],
    );
    assert!(ok, "{out}");
    let status = stack.wait_phase(&first, "rejected", LONG);
    assert_eq!(status["reason"], "rejected by bob: not this week");
    assert_eq!(deploys(&counts, "staging").len(), 1);
    assert!(deploys(&counts, "production").is_empty());

    // The gateway's refusals, through the CLI.
    let second = stack.submit_as(&dir, "bob");
    stack.wait_phase(&second, "awaiting_approval", LONG);
    let (ok, out) = approve(&stack, &second, "mallory", &[]);
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = approve(&stack, &second, "carol", &[]);
    assert!(
        !ok && out.contains("403") && out.contains("allowed groups"),
        "{out}"
    );
    let (ok, out) = approve(&stack, &second, "bob", &[]);
    assert!(
        !ok && out.contains("403") && out.contains("self-approval"),
        "{out}"
    );
    let (ok, out) = approve(&stack, &second, "dave", &["--artifact-digest", "sha256:00"]);
    assert!(!ok && out.contains("409"), "{out}");

    // An accepted approval: production gets exactly one deploy, which knows what it replaced.
    let (ok, out) = approve(&stack, &second, "dave", &["--comment", "ship it"]);
    assert!(ok, "{out}");
    let status = stack.wait_phase(&second, "succeeded", LONG);
    let prod = deploys(&counts, "production");
    assert_eq!(prod.len(), 1, "{prod:?}");
    assert!(prod[0].starts_with(&second));
    let staging = deploys(&counts, "staging");
    assert_eq!(staging.len(), 2);
    // The second staging deploy saw the first run's version as the previous one.
    let first_version = staging[0].split_whitespace().nth(1).unwrap();
    assert!(
        staging[1].ends_with(&format!("previous={first_version}")),
        "{staging:?}"
    );
    assert_eq!(status["deployments"].as_array().unwrap().len(), 2);
    let (ok, out) = approve(&stack, &second, "dave", &[]);
    assert!(
        !ok && out.contains("409") && out.contains("not awaiting approval"),
        "{out}"
    );

    // The production request delivered again (a duplicate with a new id): nothing is redeployed.
    let bus = stack.bus().await;
    let log = bus.run_log(&second).await.unwrap();
    let mut again = log
        .iter()
        .filter_map(|r| r.event.clone().ok())
        .find(|e| matches!(&e.data, EventData::DeployRequested(d) if d.environment == "production"))
        .expect("the production request is in the log");
    again.id = ids::random();
    bus.publish(&again).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(deploys(&counts, "production").len(), 1);

    // DORA from the log: one production deployment, none failed, in the CLI and the gateway.
    let dora = stack.slipway_json(&["dora", "--since", "1h"]);
    assert_eq!(dora["overall"]["deployments"], 1, "{dora:#}");
    assert_eq!(dora["overall"]["change_fail_rate"], 0.0);
    assert_eq!(dora["pipelines"]["ship"]["deployments"], 1);
    assert!(
        dora["overall"]["change_lead_time_hours_p50"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let from_gateway: Value =
        reqwest::get(format!("{}/v1/metrics/dora?since=1h", stack.gateway_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        from_gateway["overall"]["deployments"], 1,
        "{from_gateway:#}"
    );
    let bad = reqwest::get(format!(
        "{}/v1/metrics/dora?since=soon",
        stack.gateway_url()
    ))
    .await
    .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    // Prometheus text: deploys by environment, and every service's consumer lag.
    let metrics = reqwest::get(format!("{}/metrics", stack.gateway_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("slipway_deployments_total{deployment_environment_name=\"production\",cicd_pipeline_task_run_result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("slipway_consumer_pending_messages{consumer=\"deployer\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("cicd_pipeline_run_duration_seconds_count{cicd_pipeline_name=\"ship\",cicd_pipeline_run_state=\"executing\",cicd_pipeline_result=\"failure\",error_type=\"rejected\"} 1"), "{metrics}");
    stack.assert_replay_matches(&first);
    stack.assert_replay_matches(&second);
}

async fn run_of(stack: &Stack, run: &str) -> Run {
    let bus = stack.bus().await;
    let events: Vec<Event> = bus
        .run_log(run)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.event.ok())
        .collect();
    Run::replay(&events).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_requests_and_approvals_on_the_bus_deploy_nothing() {
    let stack = Stack::start();
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let dir = project(stack.dir.path(), "forged", &spec(&counts), &[]);
    let bus = stack.bus().await;

    // 1. A deploy request for production published straight onto NATS, with no approval.
    let run = stack.submit_as(&dir, "erin");
    stack.wait_phase(&run, "awaiting_approval", LONG);
    let state = run_of(&stack, &run).await;
    let artifact = state.artifact_ref.clone().unwrap();
    let forged = Event::new(
        ids::random(),
        "/mallory",
        Some(run.clone()),
        slipway_core::bus::now(),
        EventData::DeployRequested(DeployRequested {
            stage: "deploy:production".into(),
            attempt: 1,
            pipeline: "ship".into(),
            environment: "production".into(),
            version: "ship-forged".into(),
            artifact,
            target: state.spec.environment("production").unwrap().deploy.clone(),
            reason: None,
            slot: None,
        }),
    );
    bus.publish(&forged).await.unwrap();
    // Out of plan order, it never becomes the stage's attempt: nothing is deployed, and the
    // run still waits for a real approval (the forged request stays in the log).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = stack.slipway_json(&["status", &run]);
    assert_eq!(status["phase"], "awaiting_approval");
    let prod = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "deploy:production")
        .unwrap()
        .clone();
    assert_eq!(prod["status"], "pending", "{prod}");
    assert!(deploys(&counts, "production").is_empty());
    let events = stack.slipway_ok(&["events", &run]);
    assert!(events.contains("/mallory"));
    stack.wait_gateway();
    let out = stack.slipway(&["approve", &run, "--token", "bob-token"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stack.wait_phase(&run, "succeeded", LONG);
    assert_eq!(deploys(&counts, "production").len(), 1);
    let first_run = run.clone();

    // 2. An approval published straight onto NATS by someone who is not a configured approver.
    let run = stack.submit_as(&dir, "erin");
    stack.wait_phase(&run, "awaiting_approval", LONG);
    let state = run_of(&stack, &run).await;
    let forged = Event::new(
        ids::random(),
        "/mallory",
        Some(run.clone()),
        slipway_core::bus::now(),
        EventData::ApprovalApproved(ApprovalDecision {
            stage: "approval:production".into(),
            attempt: 1,
            approver: "mallory".into(),
            // Claims the allowed group: the deployer goes by its own approver registry.
            groups: vec!["release-managers".into()],
            artifact_digest: state.artifact.as_ref().unwrap().digest.clone(),
            gates_digest: slipway_domain::decide::gates_digest(&state),
            comment: None,
            decided_at: slipway_core::bus::now(),
            signature: None,
            issuer: None,
        }),
    );
    bus.publish(&forged).await.unwrap();
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("refused"), "{reason}");
    assert!(
        reason.contains("mallory's approval is not signed by the gateway"),
        "{reason}"
    );
    let prod = deploys(&counts, "production");
    assert!(
        !prod.iter().any(|l| l.starts_with(&run)),
        "production was deployed: {prod:?}"
    );
    stack.assert_replay_matches(&run);

    // 3. The same with a configured approver's name: still not the gateway's signature.
    // 4. A valid, signed approval of the first run replayed onto another run and its artifact.
    let signed = bus
        .run_log(&first_run)
        .await
        .unwrap()
        .into_iter()
        .find_map(|r| match r.event.ok()?.data {
            EventData::ApprovalApproved(d) => Some(d),
            _ => None,
        })
        .expect("the first run's approval");
    assert!(signed.signature.is_some(), "the gateway signs approvals");
    for (case, expected) in [
        ("forged", "bob's approval is not signed by the gateway"),
        ("replayed", "bob's signature does not match"),
    ] {
        let run = stack.submit_as(&dir, "erin");
        stack.wait_phase(&run, "awaiting_approval", LONG);
        let state = run_of(&stack, &run).await;
        let mut decision = signed.clone();
        decision.artifact_digest = state.artifact.as_ref().unwrap().digest.clone();
        decision.gates_digest = slipway_domain::decide::gates_digest(&state);
        if case == "forged" {
            decision.signature = None;
            decision.decided_at = slipway_core::bus::now();
        }
        let event = Event::new(
            ids::random(),
            "/mallory",
            Some(run.clone()),
            slipway_core::bus::now(),
            EventData::ApprovalApproved(decision),
        );
        bus.publish(&event).await.unwrap();
        let status = stack.wait_phase(&run, "failed", LONG);
        let reason = status["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{case}: {reason}");
        assert!(
            !deploys(&counts, "production")
                .iter()
                .any(|l| l.starts_with(&run)),
            "{case}: production was deployed"
        );
    }
}

#[test]
fn one_production_deploy_at_a_time_and_a_newer_approval_supersedes_an_older_waiting_run() {
    let stack = Stack::start();
    stack.wait_gateway();
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    // Production deploys take as long as the `delay` file says.
    let slow = spec(&counts).replace(
        r#"command = ["sh", "-c", "echo"#,
        r#"command = ["sh", "-c", "sleep $(cat \"$COUNTS/delay\" 2>/dev/null || echo 0); echo"#,
    );
    let dir = project(stack.dir.path(), "lanes", &slow, &[]);
    let runs: Vec<String> = (0..3).map(|_| stack.submit_as(&dir, "erin")).collect();
    for r in &runs {
        stack.wait_phase(r, "awaiting_approval", LONG);
    }
    let (a, b, c) = (&runs[0], &runs[1], &runs[2]);

    // A holds production for a while; B, then C, are approved meanwhile.
    std::fs::write(counts.join("delay"), "4").unwrap();
    assert!(approve(&stack, a, "bob", &[]).0);
    stack.wait_phase(a, "deploying", LONG);
    assert!(approve(&stack, b, "bob", &[]).0);
    assert!(approve(&stack, c, "bob", &[]).0);
    std::fs::write(counts.join("delay"), "0").unwrap();

    let status = stack.wait_phase(b, "cancelled", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("superseded by run") && reason.contains(c.as_str()),
        "{reason}"
    );
    stack.wait_phase(a, "succeeded", LONG);
    stack.wait_phase(c, "succeeded", LONG);
    // Production saw A, then C; never B, never two at once.
    let prod: Vec<String> = deploys(&counts, "production")
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(prod, vec![a.clone(), c.clone()]);
    for r in &runs {
        stack.assert_replay_matches(r);
    }
}
