//! The log outlives every release. `tests/golden/` holds logs recorded from released builds,
//! each with the state its runs fold to (`<name>.jsonl` and `<name>.state.json`); every build
//! replays them through today's decoding and fold and must reproduce those states exactly. A
//! new event version adds a golden log of its own; an old one is never rewritten.
//!
//! The logs are recorded by the ignored tests below (`record_*`), run by hand against the
//! release that writes them: real services on a real nats-server, every kind of ending and
//! every event type between them (tests/golden/README.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use slipway_domain::{Event, Run};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(120);

fn golden_dir() -> PathBuf {
    slipway_core::testing::workspace_root().join("tests/golden")
}

/// One stored message as a golden log keeps it: its place, subject, headers and payload as
/// they were on the stream.
fn decode_line(line: &str) -> (u64, String, Result<Event, String>) {
    let v: Value = serde_json::from_str(line).expect("a golden line is JSON");
    let mut headers = async_nats::HeaderMap::new();
    for (k, val) in v["headers"].as_object().expect("headers") {
        headers.insert(k.as_str(), val.as_str().expect("a header value"));
    }
    let payload = v["payload"].as_str().expect("payload");
    let event =
        slipway_core::bus::decode(Some(&headers), payload.as_bytes()).map_err(|e| e.to_string());
    (
        v["seq"].as_u64().expect("seq"),
        v["subject"].as_str().expect("subject").to_string(),
        event,
    )
}

/// Every run of a log folded as `slipway replay --json` folds them, in order of creation;
/// and the event types met.
fn replay(text: &str) -> (Vec<Value>, BTreeSet<String>) {
    let mut runs: BTreeMap<String, Option<Run>> = BTreeMap::new();
    let mut order = Vec::new();
    let mut types = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (seq, subject, event) = decode_line(line);
        let Some((run_id, _, _)) = slipway_domain::subjects::parse_run(&subject) else {
            if let Ok(e) = &event {
                types.insert(e.type_name().to_string());
            }
            continue;
        };
        let event = event.unwrap_or_else(|e| panic!("seq {seq} ({subject}) does not decode: {e}"));
        types.insert(event.type_name().to_string());
        let slot = runs.entry(run_id.to_string()).or_insert_with(|| {
            order.push(run_id.to_string());
            None
        });
        assert!(
            slot.is_some() || slipway_domain::fold::unreadable(&event).is_none(),
            "run {run_id} (seq {seq}) cannot be read"
        );
        *slot = slipway_domain::fold(slot.take(), &event);
    }
    let states = order
        .iter()
        .filter_map(|id| runs[id].as_ref().map(Run::to_json))
        .collect();
    (states, types)
}

/// The same state: equal JSON, but for figures that differ in their last bits
/// ([`slipway_domain::index::same_figure`]: what releases before exact float parsing read).
fn same_state(now: &Value, then: &Value) -> bool {
    match (now, then) {
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_state(v, w)))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(v, w)| same_state(v, w))
        }
        _ => now == then || slipway_domain::index::same_figure(now, then),
    }
}

#[test]
fn same_state_forgives_the_last_bits_of_a_figure_and_nothing_else() {
    assert!(same_state(
        &json!({"x": 0.9467962499999997}),
        &json!({"x": 0.9467962499999996})
    ));
    assert!(same_state(
        &json!([0.00010549999999999999]),
        &json!([0.0001055])
    ));
    assert!(!same_state(
        &json!({"x": 0.94679624}),
        &json!({"x": 0.94679625})
    ));
    assert!(!same_state(&json!({"x": 1}), &json!({"x": 2})));
    assert!(!same_state(
        &json!({"x": 1.0}),
        &json!({"x": 1.0, "y": null})
    ));
    assert!(!same_state(&json!("a"), &json!("b")));
}

#[test]
fn every_golden_log_folds_to_the_state_it_was_recorded_with() {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    logs.sort();
    assert!(!logs.is_empty(), "no golden log");
    let mut types = BTreeSet::new();
    for log in &logs {
        let text = std::fs::read_to_string(log).expect("golden log");
        let (states, met) = replay(&text);
        types.extend(met);
        let state_file = log.with_extension("state.json");
        let recorded: Value =
            serde_json::from_str(&std::fs::read_to_string(&state_file).expect("its state"))
                .expect("state JSON");
        let recorded = recorded.as_array().expect("a list of runs");
        assert_eq!(states.len(), recorded.len(), "{}: runs", log.display());
        for (now, then) in states.iter().zip(recorded) {
            assert!(
                same_state(now, then),
                "{}: run {} folds differently today: {:?}",
                log.display(),
                then["run_id"],
                slipway_domain::index::differences(then, now, 10)
            );
        }
    }
    // Between them, the golden logs hold every type of the catalogue: each is read by today's
    // release as a recorded one.
    let missing: Vec<&str> = slipway_domain::events::CATALOGUE
        .iter()
        .map(|e| e.type_name)
        .filter(|t| !types.contains(*t))
        .collect();
    assert!(missing.is_empty(), "no golden log holds {missing:?}");
}

#[test]
fn a_golden_log_with_a_field_no_release_wrote_still_folds_to_its_state() {
    // What a newer producer would write: the same log with a field added to every event's
    // data, and one to a nested object. Today's readers fold it to the same state.
    let log = golden_dir().join("2026-12-04-edges.jsonl");
    let text = std::fs::read_to_string(&log).expect("golden log");
    let widened: String = text
        .lines()
        .map(|line| {
            let mut v: Value = serde_json::from_str(line).unwrap();
            let payload = v["payload"].as_str().unwrap().to_string();
            if let Ok(Value::Object(mut data)) = serde_json::from_str::<Value>(&payload)
                && v["headers"].get("ce-type").is_some()
            {
                data.insert("added_later".into(), json!({"by": "a newer release"}));
                if let Some(Value::Object(artifact)) = data.get_mut("artifact") {
                    artifact.insert("signature".into(), json!("sig"));
                }
                v["payload"] = Value::String(Value::Object(data).to_string());
            }
            v.to_string() + "\n"
        })
        .collect();
    assert_ne!(widened, text);
    assert_eq!(replay(&widened).0, replay(&text).0);
}

/// The stream as a golden log: every message in order, as stored.
async fn export(stack: &Stack) -> String {
    let client = stack.nats_client().await;
    export_from(client).await
}

async fn export_from(client: async_nats::Client) -> String {
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("SLIPWAY").await.expect("the log");
    let info = stream.info().await.expect("stream info");
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = String::new();
    for seq in first..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let mut headers = BTreeMap::new();
        for (name, values) in m.headers.iter() {
            let name: &str = name.as_ref();
            if let Some(v) = values.last() {
                headers.insert(name.to_string(), v.as_str().to_string());
            }
        }
        let line = json!({
            "seq": m.sequence,
            "subject": m.subject.as_str(),
            "headers": headers,
            "payload": String::from_utf8(m.payload.to_vec()).expect("payloads are text"),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// Writes a golden log and its state, never over an existing one.
fn keep(name: &str, log: &str) -> Vec<Value> {
    let dir = golden_dir();
    let (path, state_path) = (
        dir.join(format!("{name}.jsonl")),
        dir.join(format!("{name}.state.json")),
    );
    assert!(
        !path.exists() && !state_path.exists(),
        "{} exists: a golden log is never rewritten; record a new one",
        path.display()
    );
    let (states, types) = replay(log);
    std::fs::write(&path, log).unwrap();
    std::fs::write(
        &state_path,
        serde_json::to_string_pretty(&states).unwrap() + "\n",
    )
    .unwrap();
    eprintln!(
        "recorded {} runs, {} types, into {}",
        states.len(),
        types.len(),
        path.display()
    );
    states
}

/// A small HTTP service whose health can be turned off: production for the monitor.
async fn health_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let healthy = std::sync::Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    let app = axum::Router::new().route(
        "/healthz",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                if h.load(Ordering::Relaxed) {
                    (axum::http::StatusCode::OK, "ok")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), healthy)
}

/// Records `tests/golden/<SLIPWAY_GOLDEN_NAME, default today>-edges`: the endings the demo does
/// not show, from real services. `cargo test -p slipway-e2e --test golden -- --ignored edges`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "records a golden log; run by hand for a release"]
async fn record_the_edges_golden_log() {
    let name = std::env::var("SLIPWAY_GOLDEN_NAME").unwrap_or_else(|_| chrono_today()) + "-edges";
    let (production, healthy) = health_server().await;
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("refuse-rollbacks");
    let merged = project(
        work.path(),
        "merged",
        "[pipeline]\nname = \"merged\"\n[build]\ncommand = [\"true\"]\n",
        &[],
    );
    let registry = format!(
        "[pricing.instances.small]\nper_hour = 0.5\n\n[[conductor.cdevents]]\nrepository = \"golden/service\"\nspec = \"{}\"\nsource = {{ kind = \"directory\", path = \"{}\" }}\n",
        merged.join("slipway.toml").display(),
        merged.display()
    );
    let stack = Stack::start_with_config(slipway_e2e::SERVICES, &[], "", &registry);
    stack.wait_gateway();
    let dir = stack.dir.path().to_path_buf();
    let spec = |name: &str, body: &str| {
        project(
            &dir,
            name,
            &format!("[pipeline]\nname = \"{name}\"\n{body}"),
            &[],
        )
    };
    let build_ok = "[build]\ncommand = [\"sh\", \"-c\", \"mkdir -p dist && echo $SLIPWAY_RUN_ID > dist/v\"]\nartifacts = [\"dist\"]\n";
    let test_ok = "[[test]]\nname = \"unit\"\ncommand = [\"true\"]\n";
    let staging =
        "[[environment]]\nname = \"staging\"\n[environment.deploy]\ncommand = [\"true\"]\n";
    let approved = format!(
        "{build_ok}{test_ok}{staging}[[environment]]\nname = \"production\"\nrequires_approval = true\n[environment.deploy]\ncommand = [\"true\"]\n[approval]\nallowed_groups = [\"release-managers\"]\n"
    );

    // Approved by a person (a signed decision), and rejected by one.
    let shipped = stack.submit_as(&spec("approved", &approved), "erin");
    let rejected = stack.submit_as(&spec("rejected", &approved), "erin");
    for (run, decision) in [
        (&shipped, vec![]),
        (&rejected, vec!["--reject", "--comment", "not this week"]),
    ] {
        stack.wait_phase(run, "awaiting_approval", LONG);
        let mut args = vec!["approve", run.as_str(), "--token", "bob-token"];
        args.extend(decision);
        stack.slipway_ok(&args);
    }
    stack.wait_phase(&shipped, "succeeded", LONG);
    stack.wait_phase(&rejected, "rejected", LONG);

    // The policy's own approval.
    let auto = stack.submit_as(
        &spec("auto", &format!("{build_ok}{test_ok}[[environment]]\nname = \"production\"\nrequires_approval = true\n[environment.deploy]\ncommand = [\"true\"]\n[approval]\nauto_approve = \"when_clean\"\n")),
        "erin",
    );
    stack.wait_phase(&auto, "succeeded", LONG);

    // Failures of each worker stage, and a cancellation mid-build.
    let failed_build = stack.submit_as(
        &spec(
            "failed-build",
            "[build]\ncommand = [\"sh\", \"-c\", \"echo no >&2; exit 3\"]\n",
        ),
        "erin",
    );
    let failed_test = stack.submit_as(
        &spec(
            "failed-test",
            &format!("{build_ok}[[test]]\nname = \"unit\"\ncommand = [\"false\"]\n"),
        ),
        "erin",
    );
    let failed_deploy = stack.submit_as(
        &spec("failed-deploy", &format!("{build_ok}[[environment]]\nname = \"staging\"\n[environment.deploy]\ncommand = [\"sh\", \"-c\", \"exit 4\"]\n")),
        "erin",
    );
    let cancelled = stack.submit_as(
        &spec("cancelled", "[build]\ncommand = [\"sleep\", \"30\"]\n"),
        "erin",
    );
    stack.wait_for(&cancelled, LONG, |s| s["stages"][0]["status"] == "running");
    stack.slipway_ok(&["cancel", &cancelled, "--reason", "wrong branch"]);
    for run in [&failed_build, &failed_test, &failed_deploy] {
        stack.wait_phase(run, "failed", LONG);
    }
    stack.wait_phase(&cancelled, "cancelled", LONG);

    // Monitored production: verified; then degraded with a rollback that fails; then degraded
    // and rolled back.
    let monitored = format!(
        "{build_ok}[[environment]]\nname = \"production\"\nurl = \"{production}\"\n[environment.deploy]\ncommand = [\"sh\", \"-c\", \"[ ! -e {m} ] || [ \\\"$SLIPWAY_RUN_ID\\\" != \\\"$(cat {m})\\\" ]\"]\n[monitor]\nwindow_secs = 2\nprobe_interval_ms = 300\n[monitor.slos]\navailability = {{ min = 0.9 }}\n",
        m = marker.display()
    );
    let verified = stack.submit_as(&spec("monitored", &monitored), "erin");
    stack.wait_phase(&verified, "succeeded", LONG);
    for refuse in [true, false] {
        let dir = project(
            &dir,
            &format!("monitored-{refuse}"),
            &format!("[pipeline]\nname = \"monitored\"\n{monitored}"),
            &[],
        );
        let run = stack.submit_as(&dir, "erin");
        stack.wait_for(&run, LONG, |s| {
            s["stages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|st| st["name"] == "monitor:production" && st["status"] == "running")
        });
        if refuse {
            std::fs::write(&marker, &run).unwrap();
        }
        healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        let s = stack.wait_for(&run, LONG, |s| {
            s["phase"] == "failed" || s["phase"] == "rolled_back"
        });
        assert_eq!(
            s["phase"],
            if refuse { "failed" } else { "rolled_back" },
            "{s}"
        );
        healthy.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    // Gates on staging: a load test that passes and a cost over its budget; then a load test
    // against a staging that answers errors.
    let gates = format!(
        "{build_ok}[[environment]]\nname = \"staging\"\nurl = \"{production}\"\n[environment.deploy]\ncommand = [\"true\"]\n[gates]\nenvironment = \"staging\"\n[gates.performance]\npath = \"/healthz\"\nrate_per_sec = 5\nduration_secs = 1\nwarmup_secs = 0\n[gates.performance.tolerances]\nerror_rate = {{ max = 0.5 }}\n[gates.cost]\ninstance_type = \"small\"\nprojected_requests_per_month = 1000000\nbudget_per_month = 1.0\n"
    );
    let over_budget = stack.submit_as(&spec("gated", &gates), "erin");
    let s = stack.wait_phase(&over_budget, "failed", LONG);
    assert!(
        s["reason"].as_str().unwrap().starts_with("cost failed"),
        "{s}"
    );
    healthy.store(false, std::sync::atomic::Ordering::Relaxed);
    let dir2 = project(
        &dir,
        "gated-2",
        &format!("[pipeline]\nname = \"gated\"\n{gates}"),
        &[],
    );
    let erroring = stack.submit_as(&dir2, "erin");
    let s = stack.wait_phase(&erroring, "failed", LONG);
    assert!(
        s["reason"].as_str().unwrap().starts_with("perf failed"),
        "{s}"
    );
    healthy.store(true, std::sync::atomic::Ordering::Relaxed);

    // A change the conductor refuses, and one that came as a CDEvent.
    let bus = stack.bus().await;
    let bad = Event::new(
        "golden-bad-change",
        "golden/hook",
        None,
        slipway_core::bus::now(),
        slipway_domain::EventData::ChangeSubmitted(slipway_domain::events::ChangeSubmitted {
            spec: "[pipeline]\nname = \"no build\"\n".into(),
            source: slipway_domain::events::SourceRef::Directory {
                path: "/srv/x".into(),
            },
            author: Some("erin".into()),
            title: None,
            rerun_of: None,
            commit: None,
        }),
    );
    bus.publish(&bad).await.unwrap();
    let cdevent = json!({
        "context": {"specversion": "0.5.0", "id": "golden-merged-1", "source": "/golden/git",
            "type": "dev.cdevents.change.merged.0.3.0", "timestamp": "2026-12-04T06:00:00Z"},
        "subject": {"id": "pr-7", "source": "/golden/git",
            "content": {"repository": {"id": "golden/service", "source": "/golden/git"}}},
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/changes", stack.gateway_url()))
        .header("content-type", "application/json")
        .body(cdevent.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let merged_run = slipway_domain::ids::run_id("/golden/git", "golden-merged-1");
    stack.wait_phase(&merged_run, "succeeded", LONG);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let log = export(&stack).await;
    let states = keep(&name, &log);
    // What the log folds to is what the live conductor said.
    for s in &states {
        let run = s["run_id"].as_str().unwrap();
        assert_eq!(s, &stack.slipway_json(&["status", run]), "run {run}");
    }
}

/// Records `tests/golden/<name>-demo`: the demo's five runs (gates, signed approvals, a canary
/// aborted and rolled back, an A/B experiment, a shadow, monitoring). `cargo test -p slipway-e2e --test golden -- --ignored demo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "records a golden log; run by hand for a release"]
async fn record_the_demo_golden_log() {
    let name = std::env::var("SLIPWAY_GOLDEN_NAME").unwrap_or_else(|_| chrono_today()) + "-demo";
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("demo");
    let out = std::process::Command::new(slipway_e2e::bin_dir().join("slipway"))
        .arg("demo")
        .arg("--project")
        .arg(slipway_core::testing::workspace_root().join("deploy/demo/model-server"))
        .arg("--data-dir")
        .arg(&data)
        .env_remove("SLIPWAY_NATS_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The demo's server is stopped; its store is read again with its own users.
    let creds = slipway_core::config::credentials::Credentials::load_or_create(
        &slipway_core::config::credentials::directory(&data),
    )
    .unwrap();
    let conf = work.path().join("nats.conf");
    slipway_core::config::credentials::Credentials::write_server_config(&conf).unwrap();
    let server = slipway_core::exec::server::NatsProcess::spawn(
        &slipway_core::testing::nats_binary(),
        0,
        &data.join("nats"),
        &["-c".to_string(), conf.display().to_string()],
        &creds.server_env(),
    )
    .unwrap();
    let client = async_nats::ConnectOptions::with_user_and_password(
        "admin".into(),
        creds.password("admin").unwrap().into(),
    )
    .connect(server.url())
    .await
    .unwrap();
    let log = export_from(client).await;
    let states = keep(&name, &log);
    let phases: Vec<&str> = states
        .iter()
        .map(|s| s["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "succeeded",
            "failed",
            "rolled_back",
            "succeeded",
            "succeeded"
        ]
    );
}

/// Records `tests/golden/<name>-rollouts`: progressive delivery from real services (a first
/// deploy promoted at once, a canary aborted at its first step and rolled back, a canary
/// promoted through every step, a failed promotion, a rollout paused and aborted by a person).
/// `cargo test -p slipway-e2e --test golden -- --ignored rollouts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "records a golden log; run by hand for a release"]
async fn record_the_rollouts_golden_log() {
    use slipway_e2e::rollout_app::{ERRORS, pipeline, start_app};
    let name =
        std::env::var("SLIPWAY_GOLDEN_NAME").unwrap_or_else(|_| chrono_today()) + "-rollouts";
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-deployer",
        "slipway-monitor",
        "slipway-approval",
    ]);
    stack.wait_gateway();
    let dir = stack.dir.path().join("rollouts");
    let (state, flags) = (dir.join("slots"), dir.join("flags/flags.json"));
    std::fs::create_dir_all(&state).unwrap();
    let app = start_app(&state, &flags);
    let spec = pipeline(
        "canary",
        &app.url,
        &state,
        &flags,
        &format!(
            "strategy = \"canary\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 40\n\
             steps = [{{ weight = 5, duration_secs = 2 }}, {{ weight = 50, duration_secs = 3 }}]\n{ERRORS}"
        ),
    );
    let project = slipway_e2e::project(&dir, "project", &spec, &[]);
    let submit = |quality: &str| {
        std::fs::write(project.join("quality"), quality).unwrap();
        let v = stack.slipway_json(&["submit", project.join("slipway.toml").to_str().unwrap()]);
        v["run_id"].as_str().unwrap().to_string()
    };
    let long = Duration::from_secs(120);
    let mut runs = Vec::new();
    for (quality, phase) in [
        ("good 1", "succeeded"),
        ("bad 2", "rolled_back"),
        ("good 3", "succeeded"),
        ("good 4 nopromote", "failed"),
    ] {
        let run = submit(quality);
        stack.wait_phase(&run, phase, long);
        runs.push(run);
    }
    let held = submit("good 5");
    stack.wait_phase(&held, "rolling_out", long);
    stack.slipway_ok(&["rollout", &held, "pause", "--token", "bob-token"]);
    stack.wait_for(&held, long, |s| s["rollouts"][0]["paused"] == true);
    stack.slipway_ok(&["rollout", &held, "abort", "--token", "bob-token"]);
    stack.wait_phase(&held, "rolled_back", long);
    runs.push(held);
    let log = export(&stack).await;
    let states = keep(&name, &log);
    for run in &runs {
        let s = states.iter().find(|s| s["run_id"] == run.as_str()).unwrap();
        assert_eq!(s, &stack.slipway_json(&["status", run]), "run {run}");
    }
}

fn chrono_today() -> String {
    slipway_core::bus::now().format("%Y-%m-%d").to_string()
}

/// Records `tests/golden/<name>-calibration`: model evaluations that ask every item several
/// times (`repeats`): the measured noise (`evaluate.calibrated`), a first deployment judged on
/// absolute bounds, then the same model against it, tested on each item's share of answers.
/// `cargo test -p slipway-e2e --test golden -- --ignored calibration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "records a golden log; run by hand for a release"]
async fn record_the_calibration_golden_log() {
    let name =
        std::env::var("SLIPWAY_GOLDEN_NAME").unwrap_or_else(|_| chrono_today()) + "-calibration";
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-deployer",
        "slipway-model-evaluator",
    ]);
    let bin = stack.dir.path().join("model-server");
    let built = std::process::Command::new("rustc")
        .args(["--edition", "2024", "-O", "-o"])
        .arg(&bin)
        .arg(slipway_core::testing::workspace_root().join("deploy/demo/model-server/src/main.rs"))
        .status()
        .unwrap();
    assert!(built.success());
    let port = slipway_core::exec::server::free_port();
    let conf = stack.dir.path().join("model.conf");
    std::fs::write(
        &conf,
        "version = 1.0.0\nsums = true\nnoise = 0.5\nunsure_every = 4\nseed = 11\n",
    )
    .unwrap();
    let mut server = std::process::Command::new(&bin)
        .args(["--port", &port.to_string(), "--config"])
        .arg(&conf)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = std::process::Command::new(&bin)
        .args([
            "--wait-healthy",
            &format!("http://127.0.0.1:{port}/healthz"),
            "--timeout",
            "10",
        ])
        .status()
        .unwrap();
    assert!(up.success());
    let dataset: String = (0..40)
        .map(|i| {
            json!({"id": format!("sum-{i}"), "prompt": format!("What is {} + {}?", i + 10, 2 * i + 1), "expected": (3 * i + 11).to_string()})
                .to_string()
                + "\n"
        })
        .collect();
    let spec = format!(
        r#"
[pipeline]
name = "calibrated"
[build]
command = ["true"]
[[environment]]
name = "production"
[environment.deploy]
command = ["true"]
[gates.model_evaluation]
endpoint = {{ kind = "openai", base_url = "http://127.0.0.1:{port}", model = "sums" }}
concurrency = 1
repeats = 3
[[gates.model_evaluation.dataset]]
name = "sums"
path = "sums.jsonl"
[gates.model_evaluation.dataset.thresholds]
exact_match = {{ min = 0.5, max_regression = 0.05 }}
f1 = {{ max_regression = 0.05 }}
"#
    );
    let dir = project(
        stack.dir.path(),
        "calibrated",
        &spec,
        &[("sums.jsonl", &dataset)],
    );
    let mut runs = Vec::new();
    for _ in 0..2 {
        let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
        let run = v["run_id"].as_str().unwrap().to_string();
        let status = stack.wait_phase(&run, "succeeded", LONG);
        assert_eq!(status["calibrations"][0]["repeats"], 3, "{status}");
        runs.push(run);
    }
    let _ = server.kill();
    let _ = server.wait();
    let log = export(&stack).await;
    let states = keep(&name, &log);
    for run in &runs {
        let s = states.iter().find(|s| s["run_id"] == run.as_str()).unwrap();
        assert_eq!(s, &stack.slipway_json(&["status", run]), "run {run}");
    }
}
