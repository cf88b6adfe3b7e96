//! Whole runs across real processes: nats-server, conductor, builder, tester and the `slipway`
//! CLI, each test with its own server and directories.

use std::time::Duration;

use async_nats::HeaderMap;
use serde_json::{Value, json};
use slipway_domain::Event;
use slipway_domain::events::EventData;
use slipway_e2e::{Stack, hello_example, project};

const LONG: Duration = Duration::from_secs(60);

const CALLER_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn stage<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no stage {name} in {status}"))
}

fn submit(stack: &Stack, spec_dir: &std::path::Path) -> String {
    let spec = spec_dir.join("slipway.toml");
    let v = stack.slipway_json(&["submit", spec.to_str().unwrap()]);
    v["run_id"].as_str().expect("run id").to_string()
}

/// A spec whose build and one suite are shell commands.
fn spec(name: &str, build: &str, test: &str, extra: &str) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"

[build]
command = ["sh", "-c", {build:?}]
artifacts = ["dist"]
timeout_secs = 60

[[test]]
name = "unit"
command = ["sh", "-c", {test:?}]
junit = "report.xml"
timeout_secs = 60
{extra}
"#
    )
}

const PASSING_JUNIT: &str = r#"cat > report.xml <<'X'
<testsuite name="unit"><testcase classname="a" name="one"/><testcase classname="a" name="two"/></testsuite>
X"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_from_slipway_submit_succeeds_and_replays() {
    let stack = Stack::start();
    let spec = hello_example().join("slipway.toml");
    let out = stack.slipway_ok(&[
        "submit",
        spec.to_str().unwrap(),
        "--source",
        hello_example().to_str().unwrap(),
        "--wait",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["phase"], "succeeded", "{out}\n{}", stack.logs());
    let run = v["run_id"].as_str().unwrap();
    let status = stack.slipway_json(&["status", run]);
    for name in ["build", "test:unit", "test:smoke"] {
        let s = stage(&status, name);
        assert_eq!(s["status"], "succeeded");
        assert!(s["started_at"].is_string() && s["finished_at"].is_string());
    }
    assert!(
        status["artifact"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(status["artifact"]["size"].as_u64().unwrap() > 0);
    // The unit suite's JUnit cases are part of the run.
    let unit = status["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["suite"] == "unit")
        .unwrap();
    assert_eq!(unit["summary"]["passed"], 2);
    stack.assert_replay_matches(run);

    // `slipway events` prints the log as structured-mode CloudEvents, first the run's creation.
    let events = stack.slipway_ok(&["events", run]);
    let first: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(first["type"], "dev.slipway.run.created.v1");
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["subject"], run);
    let last: Value = serde_json::from_str(events.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "dev.slipway.run.succeeded.v1");
    stack.assert_log_meets_schemas().await;
}

/// Publishes a change by hand, the way any producer without Slipway's code would.
async fn publish_raw(
    client: &async_nats::Client,
    subject: &str,
    headers: Option<HeaderMap>,
    body: Vec<u8>,
) {
    let js = async_nats::jetstream::new(client.clone());
    let ack = match headers {
        Some(h) => {
            js.publish_with_headers(subject.to_string(), h, body.into())
                .await
        }
        None => js.publish(subject.to_string(), body.into()).await,
    };
    ack.expect("publish").await.expect("acked");
}

fn change_data(spec: &str, dir: &std::path::Path) -> Value {
    json!({
        "spec": spec,
        "source": {"kind": "directory", "path": dir.display().to_string()},
        "author": "raw-producer",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_cloudevents_in_both_modes_become_runs_and_repeats_make_one_run() {
    let stack = Stack::start();
    let spec_text = spec(
        "raw",
        "mkdir -p dist && echo hi > dist/a",
        PASSING_JUNIT,
        "",
    );
    let dir = project(stack.dir.path(), "raw", &spec_text, &[]);
    // The stream exists once any service or client has started; make sure before raw publishes.
    stack.bus().await;
    let client = stack.nats_client().await;

    // Binary content mode: attributes as ce-* headers.
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", "commit-abc123");
    h.insert("ce-source", "git-hook/acme");
    h.insert("ce-type", "dev.slipway.change.submitted.v1");
    h.insert("ce-time", "2026-11-26T10:00:00Z");
    // The producer's trace: the run joins it.
    h.insert("ce-traceparent", CALLER_TRACE);
    h.insert("content-type", "application/json");
    let body = serde_json::to_vec(&change_data(&spec_text, &dir)).unwrap();
    publish_raw(
        &client,
        "slipway.changes.git-hook",
        Some(h.clone()),
        body.clone(),
    )
    .await;
    // The same change again (a redelivery upstream): same id and source.
    publish_raw(&client, "slipway.changes.git-hook", Some(h), body).await;

    // Structured content mode: the whole event as JSON.
    let structured = json!({
        "specversion": "1.0",
        "id": "model-run-7",
        "source": "trainer",
        "type": "dev.slipway.change.submitted.v1",
        "time": "2026-11-26T10:00:01Z",
        "datacontenttype": "application/json",
        "data": change_data(&spec_text, &dir),
    });
    let mut sh = HeaderMap::new();
    sh.insert("content-type", "application/cloudevents+json");
    publish_raw(
        &client,
        "slipway.changes.trainer",
        Some(sh),
        serde_json::to_vec(&structured).unwrap(),
    )
    .await;

    let binary_run = slipway_domain::ids::run_id("git-hook/acme", "commit-abc123");
    let structured_run = slipway_domain::ids::run_id("trainer", "model-run-7");
    for run in [&binary_run, &structured_run] {
        stack.wait_phase(run, "succeeded", LONG);
        stack.assert_replay_matches(run);
    }
    // One trace per run, on every event of it: the caller's when the change brought one,
    // else the run's own.
    let bus = stack.bus().await;
    for (run, expected) in [
        (&binary_run, Some("4bf92f3577b34da6a3ce929d0e0e4736")),
        (&structured_run, None),
    ] {
        let status = stack.slipway_json(&["status", run]);
        let trace = status["trace_id"].as_str().expect("a trace id").to_string();
        if let Some(t) = expected {
            assert_eq!(trace, t);
        }
        let log = bus.run_log(run).await.unwrap();
        assert!(log.len() > 5);
        for r in &log {
            let e = r.event.as_ref().unwrap();
            let tp = e
                .traceparent
                .as_deref()
                .unwrap_or_else(|| panic!("{} has no traceparent", e.type_name()));
            assert_eq!(
                slipway_core::telemetry::trace::parse(tp).unwrap().0,
                trace,
                "{}",
                e.type_name()
            );
        }
    }

    // One run for the repeated change: exactly one run.created in the log for it.
    let bus = stack.bus().await;
    let created = bus
        .read(&[slipway_domain::subjects::RUN_CREATED.to_string()], 1)
        .await
        .unwrap();
    assert_eq!(created.len(), 2, "two distinct changes, two runs");
    let changes = stack.slipway_json(&["changes"]);
    let rows = changes.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let repeats = rows
        .iter()
        .filter(|r| r["outcome"]["duplicate"] == true)
        .count();
    assert_eq!(repeats, 1, "{changes:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_build_reports_exit_code_and_log_tail() {
    let stack = Stack::start();
    let s = spec(
        "broken",
        "echo compiling; echo 'error: missing semicolon at main.c:3' >&2; exit 7",
        "true",
        "",
    );
    let dir = project(stack.dir.path(), "broken", &s, &[]);
    let run = submit(&stack, &dir);
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("exit code 7"), "{reason}");
    assert!(reason.contains("missing semicolon at main.c:3"), "{reason}");
    assert_eq!(stage(&status, "build")["status"], "failed");
    // Never requested, and ended with the run.
    let unit = stage(&status, "test:unit");
    assert_eq!(unit["status"], "cancelled");
    assert!(unit["requested_at"].is_null());
    assert!(
        unit["reason"]
            .as_str()
            .unwrap()
            .starts_with("the run failed before this stage was requested"),
        "{unit}"
    );
    stack.assert_replay_matches(&run);
    stack.assert_log_meets_schemas().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_suite_names_the_failing_cases() {
    let stack = Stack::start();
    let junit = r#"cat > report.xml <<'X'
<testsuite name="unit">
  <testcase classname="cart" name="adds_items"/>
  <testcase classname="cart" name="applies_discount"><failure message="expected 90, got 100"/></testcase>
  <testcase classname="cart" name="checks_out"><error message="connection refused"/></testcase>
</testsuite>
X
exit 1"#;
    let s = spec("suite", "mkdir -p dist && echo x > dist/x", junit, "");
    let dir = project(stack.dir.path(), "suite", &s, &[]);
    let run = submit(&stack, &dir);
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("cart.applies_discount (expected 90, got 100)"),
        "{reason}"
    );
    assert!(
        reason.contains("cart.checks_out (connection refused)"),
        "{reason}"
    );
    assert!(reason.contains("2 of 3 cases failed"), "{reason}");
    let unit = &status["tests"][0];
    assert_eq!(unit["summary"]["failed"], 1);
    assert_eq!(unit["summary"]["errors"], 1);
    assert_eq!(unit["exit_code"], 1);
    stack.assert_replay_matches(&run);
    stack.assert_log_meets_schemas().await;
}

#[test]
fn passing_run_moves_on_to_the_next_stage_of_its_spec() {
    // Build and tests pass; the spec's next stage is a staging deploy, which the run requests
    // (no deployer here, so it stays requested).
    let stack = Stack::start_with(slipway_e2e::BUILD_AND_TEST);
    let extra = r#"
[[environment]]
name = "staging"
[environment.deploy]
command = ["./deploy.sh"]
timeout_secs = 600
"#;
    let s = spec(
        "next",
        "mkdir -p dist && echo x > dist/x",
        PASSING_JUNIT,
        extra,
    );
    let dir = project(stack.dir.path(), "next", &s, &[]);
    let run = submit(&stack, &dir);
    let status = stack.wait_for(&run, LONG, |s| {
        s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "deploy:staging" && x["status"] == "requested")
    });
    assert_eq!(status["phase"], "deploying");
    assert_eq!(stage(&status, "test:unit")["status"], "succeeded");
    stack.assert_replay_matches(&run);
    stack.slipway_ok(&["cancel", &run, "--reason", "test over"]);
    let status = stack.wait_phase(&run, "cancelled", LONG);
    assert_eq!(status["reason"], "test over");
    // The deploy requested and never started reads as ended, saying why.
    let deploy = stage(&status, "deploy:staging");
    assert_eq!(deploy["status"], "cancelled", "{deploy}");
    assert!(
        deploy["reason"]
            .as_str()
            .unwrap()
            .contains("before this stage started (test over)"),
        "{deploy}"
    );
    stack.assert_replay_matches(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_changes_are_rejected_with_a_reason_and_services_keep_running() {
    let stack = Stack::start();
    // The stream exists once any service or client has started; make sure before raw publishes.
    stack.bus().await;
    let client = stack.nats_client().await;
    // Not JSON at all.
    publish_raw(
        &client,
        "slipway.changes.junk",
        None,
        b"\x00\xffnot json".to_vec(),
    )
    .await;
    // JSON, but not a CloudEvent.
    publish_raw(
        &client,
        "slipway.changes.junk",
        None,
        br#"{"hello": "world"}"#.to_vec(),
    )
    .await;
    // A CloudEvent whose spec breaks the schema (a string where a command array belongs).
    let bad_spec = "[pipeline]\nname = \"bad\"\n[build]\ncommand = \"make all\"\n";
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", "bad-spec-1");
    h.insert("ce-source", "tests");
    h.insert("ce-type", "dev.slipway.change.submitted.v1");
    h.insert("ce-time", "2026-11-26T10:00:00Z");
    h.insert("content-type", "application/json");
    let body = serde_json::to_vec(&json!({
        "spec": bad_spec,
        "source": {"kind": "directory", "path": "/tmp"},
    }))
    .unwrap();
    publish_raw(&client, "slipway.changes.tests", Some(h), body).await;

    // Each is answered with a rejection that names what is wrong.
    let deadline = std::time::Instant::now() + LONG;
    let rows = loop {
        let changes = stack.slipway_json(&["changes"]);
        let rows = changes.as_array().unwrap().clone();
        if rows
            .iter()
            .filter(|r| r["outcome"]["rejected"].is_string())
            .count()
            == 3
        {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rejections missing: {rows:#?}\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let reasons: Vec<&str> = rows
        .iter()
        .map(|r| r["outcome"]["rejected"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not a CloudEvent")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("build.command")),
        "{reasons:?}"
    );
    // The human listing shows them too.
    let text = stack.slipway_ok(&["changes"]);
    assert!(
        text.contains("rejected: invalid pipeline spec: build.command"),
        "{text}"
    );
    // The offending messages stay in the log.
    let bus = stack.bus().await;
    let stored = bus
        .read(&["slipway.changes.>".to_string()], 1)
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);

    // The services are still there: a good change still becomes a successful run.
    for s in stack_services(&stack) {
        assert!(s, "a service died on bad input\n{}", stack.logs());
    }
    let s = spec(
        "after",
        "mkdir -p dist && echo x > dist/x",
        PASSING_JUNIT,
        "",
    );
    let dir = project(stack.dir.path(), "after", &s, &[]);
    let run = submit(&stack, &dir);
    stack.wait_phase(&run, "succeeded", LONG);
    stack.assert_replay_matches(&run);
    stack.assert_log_meets_schemas().await;
}

fn stack_services(stack: &Stack) -> Vec<bool> {
    // Signal 0 probes that each process is alive without touching it.
    stack
        .services
        .iter()
        .map(|s| {
            s.pid().is_some_and(|p| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), None).is_ok()
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_killed_mid_build_is_redelivered_and_makes_one_artifact() {
    let mut stack = Stack::start();
    let s = spec(
        "crash",
        "touch started; sleep 2; mkdir -p dist && echo stable > dist/out",
        PASSING_JUNIT,
        "",
    );
    let dir = project(stack.dir.path(), "crash", &s, &[]);
    let run = submit(&stack, &dir);
    stack.wait_for(&run, LONG, |s| stage(s, "build")["status"] == "running");
    stack.service("slipway-builder").kill();
    stack.spawn("slipway-builder");
    stack.wait_phase(&run, "succeeded", LONG);

    let bus = stack.bus().await;
    let log = bus.run_log(&run).await.unwrap();
    let types: Vec<&str> = log
        .iter()
        .map(|r| r.event.as_ref().unwrap().type_name())
        .collect();
    let count = |t: &str| types.iter().filter(|x| **x == t).count();
    assert_eq!(count("dev.slipway.build.succeeded.v1"), 1, "{types:?}");
    assert_eq!(
        count("dev.slipway.build.started.v1"),
        1,
        "a repeated start is a duplicate"
    );
    let artifacts = slipway_core::store::objects::list(
        &slipway_core::store::objects::Objects::new(&bus),
        "slipway-artifacts",
    )
    .await
    .unwrap();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    stack.assert_replay_matches(&run);
}

#[test]
fn a_stage_whose_worker_never_answers_fails_at_its_timeout() {
    // No tester: the suite's request is never answered.
    let stack = Stack::start_with(&["slipway-conductor", "slipway-builder"]);
    let s = spec("lonely", "mkdir -p dist && echo x > dist/x", "true", "")
        .replace("timeout_secs = 60\n{extra}", "")
        .replacen(
            "junit = \"report.xml\"\ntimeout_secs = 60",
            "timeout_secs = 1",
            1,
        );
    let dir = project(stack.dir.path(), "lonely", &s, &[]);
    let run = submit(&stack, &dir);
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = stage(&status, "test:unit")["reason"].as_str().unwrap();
    assert!(reason.contains("timed out"), "{reason}");
    assert!(reason.contains("no worker answered"), "{reason}");
    assert!(reason.contains("tester"), "{reason}");
    stack.assert_replay_matches(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_stops_and_stays_cancelled() {
    let stack = Stack::start();
    let s = spec(
        "cancel",
        "sleep 30; mkdir -p dist && echo x > dist/x",
        PASSING_JUNIT,
        "",
    );
    let dir = project(stack.dir.path(), "cancel", &s, &[]);
    let run = submit(&stack, &dir);
    stack.wait_for(&run, LONG, |s| stage(s, "build")["status"] == "running");
    let started = std::time::Instant::now();
    stack.slipway_ok(&["cancel", &run, "--reason", "wrong branch"]);
    let status = stack.wait_phase(&run, "cancelled", LONG);
    assert_eq!(status["reason"], "wrong branch");

    // The build stops (the builder answers the cancelled request well before its 30 s sleep).
    let bus = stack.bus().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = bus.run_log(&run).await.unwrap();
        let failed = log.iter().find_map(|r| match &r.event {
            Ok(Event {
                data: EventData::BuildFailed(f),
                ..
            }) => Some(f.reason.clone()),
            _ => None,
        });
        if let Some(reason) = failed {
            assert!(reason.contains("cancelled"), "{reason}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build was not stopped\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(25));

    // And it stays cancelled: nothing more is requested, a second cancel is refused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = stack.slipway_json(&["status", &run]);
    assert_eq!(status["phase"], "cancelled");
    // The build the cancel cut off, and the suite never requested, ended with the run.
    let build = stage(&status, "build");
    assert_eq!(build["status"], "cancelled");
    assert!(
        build["reason"]
            .as_str()
            .unwrap()
            .contains("the run was cancelled while this stage ran (wrong branch)"),
        "{build}"
    );
    assert_eq!(stage(&status, "test:unit")["status"], "cancelled");
    assert!(stage(&status, "test:unit")["requested_at"].is_null());
    let again = stack.slipway(&["cancel", &run]);
    assert_eq!(again.status.code(), Some(1));
    stack.assert_replay_matches(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_on_the_same_store_loses_no_event() {
    let mut stack = Stack::start();
    let s = spec(
        "durable",
        "sleep 2; mkdir -p dist && echo x > dist/x",
        PASSING_JUNIT,
        "",
    );
    let dir = project(stack.dir.path(), "durable", &s, &[]);
    let first = submit(&stack, &dir);
    // Restart the server while the build is in flight.
    stack.wait_for(&first, LONG, |s| stage(s, "build")["status"] == "running");
    let before = stack.slipway_ok(&["events", &first]);
    stack.nats.restart();
    let status = stack.wait_phase(&first, "succeeded", LONG);
    let after = stack.slipway_ok(&["events", &first]);
    assert!(
        after.starts_with(&before),
        "events acknowledged before the restart changed:\nbefore:\n{before}\nafter:\n{after}"
    );
    assert_eq!(
        status["events"].as_u64().unwrap() as usize,
        after.lines().count()
    );
    // The services reconnected by themselves and the next change runs through.
    let second = submit(&stack, &dir);
    stack.wait_phase(&second, "succeeded", LONG);
    stack.assert_replay_matches(&first);
    stack.assert_replay_matches(&second);
}

#[test]
fn rerun_makes_a_new_run_of_the_same_change() {
    let stack = Stack::start();
    let s = spec(
        "again",
        "mkdir -p dist && echo x > dist/x",
        PASSING_JUNIT,
        "",
    );
    let dir = project(stack.dir.path(), "again", &s, &[]);
    let run = submit(&stack, &dir);
    stack.wait_phase(&run, "succeeded", LONG);
    let v = stack.slipway_json(&["rerun", &run]);
    let second = v["run_id"].as_str().unwrap().to_string();
    assert_ne!(second, run);
    let status = stack.wait_phase(&second, "succeeded", LONG);
    assert_eq!(status["rerun_of"], run.as_str());
    stack.assert_replay_matches(&second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_first_event_cannot_be_read_is_reported_with_its_place_not_dropped() {
    let stack = Stack::start_with(&["slipway-conductor"]);
    let bus = stack.bus().await;
    // A good run beside it, created from a change as usual.
    let dir = project(
        stack.dir.path(),
        "fine",
        &spec("fine", "true", "true", ""),
        &[],
    );
    let fine = submit(&stack, &dir);
    stack.wait_for(&fine, LONG, |s| s["phase"] == "running");
    // A first event whose spec snapshot is not a spec (damaged, or not a conductor's).
    let run = "6a1f2c9e-5c1d-5f0e-9d7a-0b1c2d3e4f50";
    let created = Event::new(
        "broken-created",
        "/slipway/conductor",
        Some(run.to_string()),
        slipway_core::bus::now(),
        EventData::RunCreated(slipway_domain::events::RunCreated {
            run_id: run.into(),
            pipeline: "broken".into(),
            change: slipway_domain::events::ChangeInfo {
                id: "c".into(),
                source: "s".into(),
                seq: 1,
                time: slipway_core::bus::now(),
                author: None,
                title: None,
                subject: None,
                commit: None,
            },
            source: slipway_domain::events::SourceRef::Directory { path: "/x".into() },
            spec: json!({"pipeline": {"name": "broken"}, "build": "make"}),
            rerun_of: None,
        }),
    );
    let seq = bus.publish(&created).await.unwrap().seq;

    let out = stack.slipway(&["replay", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("run {run} (stream sequence {seq})"))
            && err.contains("spec snapshot cannot be read"),
        "{err}"
    );
    let others: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        others
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["run_id"] == fine.as_str()),
        "the other runs are still replayed: {others}"
    );
    let out = stack.slipway(&["replay", run]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("stream sequence {seq}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the conductor's log says it too.
    let deadline = std::time::Instant::now() + LONG;
    while !stack.logs().contains("A run's first event cannot be read") {
        assert!(std::time::Instant::now() < deadline, "{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = stack.logs();
    assert!(
        logs.contains(&format!("seq={seq}")) && logs.contains(run),
        "{logs}"
    );
}

/// Publishes `event` as a newer release would write it: its data with `extra` fields this
/// release's types do not have (binary mode, its id as the message id).
async fn publish_from_a_newer_release(client: &async_nats::Client, event: &Event, extra: Value) {
    let (headers, payload) = slipway_core::bus::binding::encode(event.to_cloudevent());
    let mut data: Value = serde_json::from_slice(&payload).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        data[k] = v.clone();
    }
    let mut headers = headers;
    headers.insert("Nats-Msg-Id", event.id.as_str());
    publish_raw(
        client,
        &event.nats_subject(),
        Some(headers),
        serde_json::to_vec(&data).unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_mixes_releases_on_one_stream_and_every_run_finishes() {
    // Today's conductor, builder and deployer share the stream with producers of a newer
    // release, which write fields today's types do not know (an additive change): a run today's
    // services started finishes on the newer release's tester, and a change from a newer
    // release's CLI runs on today's services. Nothing fails to decode.
    let stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-deployer"]);
    let client = stack.nats_client().await;
    let staging =
        "[[environment]]\nname = \"staging\"\n[environment.deploy]\ncommand = [\"true\"]\n";
    let dir = project(
        stack.dir.path(),
        "mixed",
        &spec("mixed", "mkdir -p dist && echo x > dist/x", "true", staging),
        &[],
    );
    let started_today = submit(&stack, &dir);
    stack.wait_for(&started_today, LONG, |s| {
        stage(s, "test:unit")["status"] == "requested"
    });
    let newer = json!({"coverage": {"lines": 0.91}, "runner": {"image": "ci:2027"}});
    for data in [
        EventData::TestStarted(slipway_domain::events::StageStarted {
            stage: "test:unit".into(),
            attempt: 1,
            worker: "tester-next".into(),
        }),
        EventData::TestSucceeded(slipway_domain::events::TestReport {
            stage: "test:unit".into(),
            attempt: 1,
            suite: "unit".into(),
            exit_code: Some(0),
            summary: None,
            cases: Vec::new(),
            reason: None,
            log_tail: None,
            log: None,
            duration_ms: 5,
        }),
    ] {
        let fact = slipway_core::runtime::fact(
            slipway_domain::service::Service::Tester,
            &started_today,
            data,
        );
        publish_from_a_newer_release(&client, &fact, newer.clone()).await;
    }
    let status = stack.wait_phase(&started_today, "succeeded", LONG);
    assert_eq!(stage(&status, "test:unit")["worker"], "tester-next");

    // A change as a newer CLI writes it, with a field today's intake does not know.
    let no_tests = dir.parent().unwrap().join("mixed-2");
    std::fs::create_dir_all(&no_tests).unwrap();
    let spec_text = format!(
        "[pipeline]\nname = \"mixed\"\n[build]\ncommand = [\"sh\", \"-c\", \"mkdir -p dist && echo y > dist/y\"]\nartifacts = [\"dist\"]\n{staging}"
    );
    let change = Event::new(
        "newer-cli-1",
        "/slipway/cli-next",
        None,
        slipway_core::bus::now(),
        EventData::ChangeSubmitted(slipway_domain::events::ChangeSubmitted {
            spec: spec_text,
            source: slipway_domain::events::SourceRef::Directory {
                path: no_tests.display().to_string(),
            },
            author: Some("erin".into()),
            title: Some("from a newer CLI".into()),
            rerun_of: None,
            commit: None,
        }),
    );
    publish_from_a_newer_release(&client, &change, json!({"labels": {"team": "ml"}})).await;
    let started_newer = slipway_domain::ids::run_id("/slipway/cli-next", "newer-cli-1");
    stack.wait_phase(&started_newer, "succeeded", LONG);

    for run in [&started_today, &started_newer] {
        stack.assert_replay_matches(run);
    }
    let logs = stack.logs();
    for refusal in [
        "Malformed",
        "not a CloudEvent",
        "invalid data",
        "Change rejected",
    ] {
        assert!(!logs.contains(refusal), "{refusal}: {logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_that_wait_do_not_queue_behind_each_other() {
    // Two pipelines whose staging deploys each wait for the other's to have begun: they
    // finish only if the deployer runs both at once (a deploy waits on something outside, so
    // it never holds the one slot another pipeline needs). Bounded: a deploy that waits in vain
    // gives up after 60 s and its run fails.
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-tester",
        "slipway-deployer",
    ]);
    let meet = stack.dir.path().join("meet");
    std::fs::create_dir_all(&meet).unwrap();
    let deploy = |me: &str, other: &str| {
        let (me, other) = (meet.join(me), meet.join(other));
        format!(
            "[[environment]]\nname = \"staging\"\n[environment.deploy]\ncommand = [\"sh\", \"-c\", {:?}]\ntimeout_secs = 90\n",
            format!(
                "touch {me}; i=0; while [ ! -e {other} ]; do sleep 0.1; i=$((i+1)); [ $i -gt 600 ] && exit 1; done; true",
                me = me.display(),
                other = other.display()
            )
        )
    };
    let runs: Vec<String> = [("left", "a", "b"), ("right", "b", "a")]
        .into_iter()
        .map(|(name, me, other)| {
            let dir = project(
                stack.dir.path(),
                name,
                &spec(
                    name,
                    "mkdir -p dist && echo x > dist/x",
                    PASSING_JUNIT,
                    &deploy(me, other),
                ),
                &[],
            );
            submit(&stack, &dir)
        })
        .collect();
    for run in &runs {
        let status = stack.wait_phase(run, "succeeded", Duration::from_secs(120));
        assert_eq!(
            stage(&status, "deploy:staging")["status"],
            "succeeded",
            "{status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_run_is_indexed_and_verify_names_an_entry_that_differs_from_the_log() {
    let stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-tester"]);
    let dir = project(
        stack.dir.path(),
        "indexed",
        &spec(
            "indexed",
            "mkdir -p dist && echo x > dist/x",
            PASSING_JUNIT,
            "",
        ),
        &[],
    );
    let run = submit(&stack, &dir);
    let status = stack.wait_phase(&run, "succeeded", LONG);

    // The conductor writes the ended run's entry, off its decision path.
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let deadline = std::time::Instant::now() + LONG;
    let (kv, entry) = loop {
        if let Ok(kv) = js.get_key_value("slipway-runs").await
            && let Ok(Some(bytes)) = kv.get(&run).await
        {
            break (kv, serde_json::from_slice::<Value>(&bytes).unwrap());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no index entry: {}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(entry["fold"], slipway_domain::index::FOLD_VERSION);
    assert_eq!(entry["run"], status, "the entry is the run's status");
    let verified = stack.slipway_json(&["replay", "--verify"]);
    assert_eq!(
        (&verified["checked"], &verified["matching"]),
        (&json!(1), &json!(1)),
        "{verified}"
    );

    // An entry that differs from the log is named, path and values, and the command fails.
    let mut forged = entry.clone();
    forged["run"]["phase"] = "failed".into();
    kv.put(&run, serde_json::to_vec(&forged).unwrap().into())
        .await
        .unwrap();
    let out = stack.slipway(&["replay", "--verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{run}: run.phase: index has \"failed\", the log folds to \"succeeded\""
        )),
        "{stdout}"
    );
    // People's `cli` user may read the index, not write it; an operator repairs it from the log.
    assert!(
        !stack
            .slipway(&["replay", "--verify", "--repair"])
            .status
            .success()
    );
    let repaired = stack.slipway_as("admin", &["replay", "--verify", "--repair", "--json"]);
    assert!(repaired.status.success(), "{repaired:?}");
    let again = stack.slipway_json(&["replay", "--verify"]);
    assert_eq!(again["matching"], 1, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_runs_leave_the_conductors_memory_and_are_answered_from_the_index() {
    let mut stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-tester"]);
    let dir = project(
        stack.dir.path(),
        "evicted",
        &spec(
            "evicted",
            "mkdir -p dist && echo x > dist/x",
            PASSING_JUNIT,
            "",
        ),
        &[],
    );
    let ended: Vec<String> = (0..2)
        .map(|_| {
            let run = submit(&stack, &dir);
            stack.wait_phase(&run, "succeeded", LONG);
            run
        })
        .collect();
    let client = stack.nats_client().await;
    let js = async_nats::jetstream::new(client.clone());
    // Both are indexed (written off the conductor's decision path: wait for it).
    let deadline = std::time::Instant::now() + LONG;
    for run in &ended {
        loop {
            if let Ok(kv) = js.get_key_value("slipway-runs").await
                && let Ok(Some(_)) = kv.get(run).await
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{run} not indexed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Restarted, the conductor replays the log and holds none of the ended runs.
    let ready = restart_conductor(&mut stack);
    assert!(ready.contains("runs=0"), "{ready}");

    // Their status comes from the index, through the conductor, and equals the log's fold.
    for run in &ended {
        let reply = client
            .request(format!("slipway-api.runs.{run}"), "".into())
            .await
            .unwrap();
        let answered: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(answered["run_id"], run.as_str(), "{answered}");
        assert_eq!(answered, stack.slipway_json(&["replay", run]));
        stack.assert_replay_matches(run);
    }
    // And the next change still runs.
    let next = submit(&stack, &dir);
    stack.wait_phase(&next, "succeeded", LONG);
}

/// The `conductor ready` lines of the conductor's log so far.
fn conductor_ready_lines(stack: &Stack) -> Vec<String> {
    std::fs::read_to_string(stack.dir.path().join("slipway-conductor.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("conductor ready"))
        .map(str::to_string)
        .collect()
}

/// Restarts the conductor and waits for it to be ready; its `conductor ready` line.
fn restart_conductor(stack: &mut Stack) -> String {
    let before = conductor_ready_lines(stack).len();
    stack.service("slipway-conductor").kill();
    stack.spawn("slipway-conductor");
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let lines = conductor_ready_lines(stack);
        if lines.len() > before {
            return lines.last().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "{}", stack.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The log's last stream sequence now.
async fn last_logged(stack: &Stack) -> u64 {
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let mut stream = js.get_stream("SLIPWAY").await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// Waits until `service`'s checkpoint is written through stream sequence `logged`; the
/// checkpoints' bucket and the checkpoint.
async fn checkpoint_through(
    stack: &Stack,
    service: &str,
    logged: u64,
) -> (async_nats::jetstream::kv::Store, Value) {
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if let Ok(kv) = js.get_key_value("slipway-checkpoints").await
            && let Ok(Some(bytes)) = kv.get(service).await
        {
            let c: Value = serde_json::from_slice(&bytes).unwrap();
            if c["through"].as_u64().unwrap() >= logged {
                return (kv, c);
            }
        }
        assert!(std::time::Instant::now() < deadline, "{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The number after `field=` in a log line.
fn log_number(line: &str, field: &str) -> u64 {
    let at = line
        .find(&format!("{field}="))
        .unwrap_or_else(|| panic!("{field} in {line}"));
    line[at + field.len() + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conductor_starts_from_its_checkpoint_and_from_the_whole_log_when_it_cannot() {
    let mut stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-tester"]);
    let dir = project(
        stack.dir.path(),
        "checkpointed",
        &spec(
            "checkpointed",
            "mkdir -p dist && echo x > dist/x",
            PASSING_JUNIT,
            "",
        ),
        &[],
    );
    for _ in 0..2 {
        let run = submit(&stack, &dir);
        stack.wait_phase(&run, "succeeded", LONG);
    }
    let logged = last_logged(&stack).await;
    assert!(logged >= 10, "{logged}");
    // The conductor checkpoints what it has read (every few seconds): wait for the runs' ends.
    let (kv, c) = checkpoint_through(&stack, "conductor", logged).await;
    assert_eq!(c["in_flight"], json!([]), "{c}");

    // Restarted, it reads only what came after its checkpoint.
    let ready = restart_conductor(&mut stack);
    assert!(
        log_number(&ready, "read") < logged / 2,
        "{ready} ({logged} in the log)"
    );

    // A checkpoint it cannot use: the whole log, and it still decides.
    kv.put("conductor", "{not a checkpoint".into())
        .await
        .unwrap();
    let ready = restart_conductor(&mut stack);
    assert!(
        log_number(&ready, "read") >= logged,
        "{ready} ({logged} in the log)"
    );
    assert!(
        stack.logs().contains("Checkpoint not used"),
        "{}",
        stack.logs()
    );
    let run = submit(&stack, &dir);
    stack.wait_phase(&run, "succeeded", LONG);
}

/// Every page of `GET /v1/runs?{query}` from the first, following each page's `Link`;
/// `between(n)` runs before page `n` (from 1) is read.
async fn list_pages(stack: &Stack, query: &str, mut between: impl FnMut(usize)) -> Vec<Vec<Value>> {
    let http = reqwest::Client::new();
    let mut url = format!("{}/v1/runs?{query}", stack.gateway_url());
    let mut pages = Vec::new();
    loop {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{url}");
        let next = resp
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_string());
        pages.push(resp.json::<Vec<Value>>().await.unwrap());
        let Some(link) = next else { return pages };
        let path = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(p, _)| p.to_string())
            .unwrap();
        assert!(link.ends_with("rel=\"next\""), "{link}");
        url = format!("{}{path}", stack.gateway_url());
        between(pages.len());
        assert!(pages.len() < 100, "{pages:?}");
    }
}

fn ids_of(pages: &[Vec<Value>]) -> Vec<String> {
    pages
        .iter()
        .flatten()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the run index holds `run`.
async fn wait_indexed(stack: &Stack, run: &str) {
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if let Ok(kv) = js.get_key_value("slipway-runs").await
            && let Ok(Some(_)) = kv.get(run).await
        {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{run} not indexed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_pages_runs_without_skipping_or_repeating_and_starts_from_its_checkpoint() {
    let mut stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-tester",
        "slipway-approval",
    ]);
    stack.wait_gateway();
    let quick = |name: &str| {
        project(
            stack.dir.path(),
            name,
            &spec(name, "mkdir -p dist && echo x > dist/x", PASSING_JUNIT, ""),
            &[],
        )
    };
    let (alpha, beta) = (quick("alpha"), quick("beta"));
    let ended: Vec<String> = [&alpha, &alpha, &beta, &alpha]
        .iter()
        .map(|dir| submit(&stack, dir))
        .collect();
    for run in &ended {
        stack.wait_phase(run, "succeeded", LONG);
        wait_indexed(&stack, run).await;
    }
    // Two more, in flight or just ended while the listing is read.
    let mut before: Vec<String> = ended.clone();
    before.extend((0..2).map(|_| submit(&stack, &alpha)));

    // Pages of two while runs start (and end): each run there when the listing began is listed
    // once; runs started after its first page wait for the next listing.
    let mut added = Vec::new();
    let pages = list_pages(&stack, "limit=2", |n| {
        if n <= 2 {
            added.push(submit(&stack, &alpha));
            std::thread::sleep(Duration::from_millis(1500));
        }
    })
    .await;
    let listed = ids_of(&pages);
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), listed.len(), "a run repeated: {listed:?}");
    for run in &before {
        assert!(listed.contains(run), "{run} skipped: {listed:?}");
    }
    for run in &added {
        assert!(
            !listed.contains(run),
            "{run} started after the first page: {listed:?}"
        );
    }
    assert!(pages.iter().all(|p| p.len() <= 2), "{pages:?}");

    // Once all have ended: every run, once, newest ended first, and filters.
    let all: Vec<String> = before.iter().chain(&added).cloned().collect();
    for run in &all {
        stack.wait_phase(run, "succeeded", LONG);
        wait_indexed(&stack, run).await;
    }
    let listed = ids_of(&list_pages(&stack, "limit=3", |_| {}).await);
    assert_eq!(listed.len(), all.len(), "{listed:?}");
    for run in &all {
        assert!(listed.contains(run), "{run} not listed: {listed:?}");
    }
    let betas = ids_of(&list_pages(&stack, "pipeline=beta&phase=succeeded", |_| {}).await);
    assert_eq!(betas, [ended[2].clone()]);
    let alphas = ids_of(&list_pages(&stack, "pipeline=alpha&limit=2", |_| {}).await);
    assert_eq!(alphas.len(), all.len() - 1, "{alphas:?}");
    let none = ids_of(&list_pages(&stack, "since=2999-01-01T00:00:00Z", |_| {}).await);
    assert!(none.is_empty(), "{none:?}");
    let recent = ids_of(&list_pages(&stack, "since=1h&phase=failed", |_| {}).await);
    assert!(recent.is_empty(), "{recent:?}");
    let http = reqwest::Client::new();
    for (query, says) in [
        ("cursor=not-a-cursor", "cursor"),
        ("since=yesterday", "since"),
        ("phase=done", "phase"),
    ] {
        let resp = http
            .get(format!("{}/v1/runs?{query}", stack.gateway_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{query}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }

    // An ended run is read from the index, and equals its fold of the log.
    let resp = http
        .get(format!("{}/v1/runs/{}", stack.gateway_url(), ended[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["slipway-read-from"], "index");
    let old: Value = resp.json().await.unwrap();
    assert_eq!(old, stack.slipway_json(&["replay", &ended[0]]));

    // The gateway checkpoints what it has read; restarted, it starts there, holding no ended
    // run, and lists the same runs.
    let logged = last_logged(&stack).await;
    let (_, c) = checkpoint_through(&stack, "gateway", logged).await;
    // Every run had ended and was indexed before: the gateway let each go before it wrote.
    assert_eq!(c["in_flight"], json!([]), "{c}");
    stack.service("slipway-approval").kill();
    stack.spawn("slipway-approval");
    stack.wait_gateway();
    let log = stack.dir.path().join("slipway-approval.log");
    let deadline = std::time::Instant::now() + LONG;
    let caught_up = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some((_, after)) = text.split_once("Gateway starting from its checkpoint")
            && let Some(line) = after
                .lines()
                .find(|l| l.contains("Gateway caught up with the log"))
        {
            break line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(caught_up.contains("runs=0"), "{caught_up}");
    let again = ids_of(&list_pages(&stack, "limit=100", |_| {}).await);
    assert_eq!(again, listed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_old_runs_events_the_index_keeps_them_and_an_unverified_run_stays() {
    let stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-tester"]);
    let dir = project(
        stack.dir.path(),
        "pruned",
        &spec(
            "pruned",
            "mkdir -p dist && echo x > dist/x",
            PASSING_JUNIT,
            "",
        ),
        &[],
    );
    let (old, forged) = (submit(&stack, &dir), submit(&stack, &dir));
    let mut states = Vec::new();
    for run in [&old, &forged] {
        stack.wait_phase(run, "succeeded", LONG);
        wait_indexed(&stack, run).await;
        states.push(stack.slipway_json(&["replay", run]));
    }
    // One entry no longer matches its events: that run is not pruned.
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let kv = js.get_key_value("slipway-runs").await.unwrap();
    let mut entry: Value =
        serde_json::from_slice(&kv.get(&forged).await.unwrap().unwrap()).unwrap();
    entry["run"]["reason"] = "forged".into();
    kv.put(&forged, serde_json::to_vec(&entry).unwrap().into())
        .await
        .unwrap();
    // Both ended more than a second ago by now; nothing is pruned by default or by `cli`.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let refused = stack.slipway(&["prune", "--older-than", "1s"]);
    assert!(!refused.status.success(), "{refused:?}");
    let zero = stack.slipway_as("admin", &["prune", "--older-than", "0d"]);
    assert!(!zero.status.success());
    let dry = stack.slipway_as(
        "admin",
        &["prune", "--older-than", "1s", "--dry-run", "--json"],
    );
    let dry: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["pruned_runs"], 1, "{dry}");
    assert!(!stack.bus().await.run_log(&old).await.unwrap().is_empty());

    let out = stack.slipway_as("admin", &["prune", "--older-than", "1s", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pruned_runs"], 1, "{report}");
    assert!(report["pruned_events"].as_u64().unwrap() > 5, "{report}");
    assert_eq!(report["kept"][0]["run_id"], forged.as_str(), "{report}");
    // The old run's events are gone but its audit trail (approvals, deploys, rollbacks: none in
    // this pipeline); its state stays, from the index.
    assert!(stack.bus().await.run_log(&old).await.unwrap().is_empty());
    assert!(!stack.bus().await.run_log(&forged).await.unwrap().is_empty());
    assert_eq!(stack.slipway_json(&["replay", &old]), states[0]);
    assert_eq!(stack.slipway_json(&["status", &old]), states[0]);
    // Verifying the index checks the runs whose events remain (and names the forged entry).
    let verify = stack.slipway(&["replay", "--verify", "--json"]);
    assert_eq!(verify.status.code(), Some(1));
    let verified: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(verified["checked"], 1, "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_monitor_window_does_not_delay_another_pipelines_monitor() {
    // One pipeline's staging is watched for two minutes; another's, submitted once the first
    // is being watched, is watched for a second and succeeds while the first is still watched
    // (a monitor window waits; it never holds the slot another pipeline needs).
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-tester",
        "slipway-deployer",
        "slipway-monitor",
        "slipway-approval",
    ]);
    stack.wait_gateway();
    let watched = |name: &str, window: u64| {
        let env = format!(
            "[[environment]]\nname = \"staging\"\nurl = \"{}\"\n[environment.deploy]\ncommand = [\"true\"]\n\
             [monitor]\nenvironments = [\"staging\"]\nwindow_secs = {window}\nprobe_interval_ms = 250\n\
             health_path = \"/healthz\"\nrollback = false\n[monitor.slos]\navailability = {{ min = 0.5 }}\n",
            stack.gateway_url()
        );
        project(
            stack.dir.path(),
            name,
            &spec(
                name,
                "mkdir -p dist && echo x > dist/x",
                PASSING_JUNIT,
                &env,
            ),
            &[],
        )
    };
    let long = submit(&stack, &watched("long", 120));
    stack.wait_for(&long, LONG, |s| {
        stage(s, "monitor:staging")["status"] == "running"
    });
    let short = submit(&stack, &watched("short", 1));
    let done = stack.wait_phase(&short, "succeeded", Duration::from_secs(60));
    assert_eq!(stage(&done, "monitor:staging")["status"], "succeeded");
    let still = stack.status(&long).unwrap();
    assert_eq!(still["phase"], "monitoring", "{still}");
    assert_eq!(stage(&still, "monitor:staging")["status"], "running");
}
