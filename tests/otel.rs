//! One trace per run, exported over OTLP by every service process, decoded by a real OTLP
//! receiver (protobuf over HTTP, and gRPC); a collector that is unreachable fails nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use slipway_e2e::collector::{Collector, Span};
use slipway_e2e::{BUILD_AND_TEST, SERVICES, Stack, project};

const LONG: Duration = Duration::from_secs(90);
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

const SERVER: i32 = 2;
const INTERNAL: i32 = 1;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

fn ship_spec(counts: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "ship"
[build]
command = ["sh", "-c", "mkdir -p dist && echo $SLIPWAY_RUN_ID > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
[[environment]]
name = "staging"
[environment.deploy]
command = ["sh", "-c", "echo $SLIPWAY_RUN_ID >> {c}/$SLIPWAY_ENVIRONMENT"]
[[environment]]
name = "production"
requires_approval = true
[environment.deploy]
command = ["sh", "-c", "echo $SLIPWAY_RUN_ID >> {c}/$SLIPWAY_ENVIRONMENT"]
[approval]
allowed_groups = ["release-managers"]
"#,
        c = counts.display()
    )
}

fn of_run<'a>(spans: &'a [Span], run: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.attr("cicd.pipeline.run.id") == Some(run))
        .collect()
}

fn run_span<'a>(spans: &'a [Span], run: &str) -> Option<&'a Span> {
    of_run(spans, run).into_iter().find(|s| s.kind == SERVER)
}

/// Stage-attempt spans: the ones carrying a task run id.
fn stage_spans<'a>(spans: &'a [Span], run: &str) -> Vec<&'a Span> {
    of_run(spans, run)
        .into_iter()
        .filter(|s| s.kind == INTERNAL && s.attr("cicd.pipeline.task.run.id").is_some())
        .collect()
}

/// `(stage, attempt)` of every stage the run's status says ran.
fn stages_of(stack: &Stack, run: &str) -> Vec<(String, u32)> {
    let status = stack.status(run).expect("status");
    status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded" || s["status"] == "failed")
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["attempt"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

/// The checks every exported run must pass: one trace, one run span, one span per stage
/// attempt under it, work and messaging spans under the stage attempts.
fn check_run_trace(spans: &[Span], run: &str, stages: &[(String, u32)], trace: &str) {
    let mine = of_run(spans, run);
    let traces: BTreeSet<&str> = mine.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces, BTreeSet::from([trace]), "one trace for run {run}");
    // Work spans carry the run id too; every span of the trace is accounted for.
    let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();

    let roots: Vec<&&Span> = mine.iter().filter(|s| s.kind == SERVER).collect();
    assert_eq!(roots.len(), 1, "one run span: {roots:#?}");
    let root = roots[0];
    assert_eq!(root.name, "RUN ship");
    assert_eq!(root.attr("cicd.pipeline.name"), Some("ship"));
    assert_eq!(root.attr("cicd.pipeline.result"), Some("success"));
    assert_eq!(root.attr("cicd.pipeline.action.name"), Some("RUN"));
    assert_eq!(root.service, "slipway-conductor");
    assert!(root.end_ns > root.start_ns);

    let stage_spans = stage_spans(spans, run);
    assert_eq!(
        stage_spans.len(),
        stages.len(),
        "one span per stage attempt: {:?} vs {stages:?}",
        stage_spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let mut stage_ids = BTreeMap::new();
    for (stage, attempt) in stages {
        let found: Vec<&&Span> = stage_spans
            .iter()
            .filter(|s| {
                s.attr("cicd.pipeline.task.name") == Some(stage.as_str())
                    && s.attr("slipway.stage.attempt") == Some(attempt.to_string().as_str())
            })
            .collect();
        assert_eq!(found.len(), 1, "stage {stage} attempt {attempt}");
        let s = found[0];
        assert_eq!(&s.name, stage);
        assert_eq!(s.parent, root.span_id, "{stage} is a child of the run span");
        assert_eq!(s.attr("cicd.pipeline.task.run.result"), Some("success"));
        assert_eq!(
            s.attr("cicd.pipeline.task.run.id"),
            Some(format!("{run}/{stage}/{attempt}").as_str())
        );
        let kind = stage.split(':').next().unwrap();
        let expected_type = if kind == "rollback" { "deploy" } else { kind };
        assert_eq!(s.attr("cicd.pipeline.task.type"), Some(expected_type));
        if kind == "approval" {
            assert_eq!(
                s.service, "slipway-approval",
                "an approver's decision ends the approval in the gateway"
            );
        } else {
            assert!(
                s.attr("cicd.worker.id").is_some_and(|w| !w.is_empty()),
                "{stage} names its worker"
            );
            assert_ne!(
                s.service, "slipway-conductor",
                "{stage} is emitted by its worker"
            );
        }
        if let Some(env) = stage.strip_prefix("deploy:") {
            assert_eq!(s.attr("deployment.environment.name"), Some(env));
        }
        assert!(s.start_ns <= s.end_ns && s.start_ns >= root.start_ns);
        stage_ids.insert(stage.clone(), s.span_id.clone());
    }

    // The work inside stages hangs under its stage attempt.
    let children = |stage: &str| -> BTreeSet<String> {
        in_trace
            .iter()
            .filter(|s| Some(&s.parent) == stage_ids.get(stage) && s.kind == INTERNAL)
            .map(|s| s.name.clone())
            .collect()
    };
    let build = children("build");
    for name in ["checkout", "command", "package", "upload"] {
        assert!(build.contains(name), "build has a {name} span: {build:?}");
    }
    assert!(children("test:unit").contains("command"));
    assert!(children("deploy:production").contains("command"));

    // Messaging: publish spans under the stage (or the run), process spans linked to them.
    let publishes: Vec<&&Span> = mine.iter().filter(|s| s.kind == PRODUCER).collect();
    let publish_ids: BTreeSet<&str> = publishes.iter().map(|s| s.span_id.as_str()).collect();
    let mut parents: BTreeSet<&str> = stage_ids.values().map(String::as_str).collect();
    parents.insert(root.span_id.as_str());
    for p in &publishes {
        for key in [
            "cloudevents.event_id",
            "cloudevents.event_source",
            "cloudevents.event_type",
            "cloudevents.event_subject",
            "messaging.destination.name",
        ] {
            assert!(p.attr(key).is_some(), "{} lacks {key}", p.name);
        }
        assert_eq!(p.attr("messaging.system"), Some("nats"));
        assert!(
            parents.contains(p.parent.as_str()),
            "{} hangs under the run or a stage",
            p.name
        );
    }
    let published: BTreeSet<&str> = publishes
        .iter()
        .filter_map(|p| p.attr("cloudevents.event_type"))
        .collect();
    for t in [
        "dev.slipway.run.created.v1",
        "dev.slipway.build.requested.v1",
        "dev.slipway.build.succeeded.v1",
        "dev.slipway.approval.approved.v1",
        "dev.slipway.deploy.succeeded.v1",
        "dev.slipway.run.succeeded.v1",
    ] {
        assert!(
            published.contains(t),
            "a publish span for {t}: {published:?}"
        );
    }
    let processes: Vec<&&Span> = mine.iter().filter(|s| s.kind == CONSUMER).collect();
    assert!(
        processes.len() >= stages.len() - 1,
        "a process span per worker request"
    );
    for p in &processes {
        assert_eq!(p.links.len(), 1, "{} links to its producer", p.name);
        assert!(
            publish_ids.contains(p.links[0].as_str()),
            "{} links to a publish span that exists",
            p.name
        );
        assert!(parents.contains(p.parent.as_str()));
        assert!(p.attr("messaging.consumer.group.name").is_some());
    }

    // Every span of the trace hangs on a span of the trace (or is the run span), and lies
    // within it: no child starts before its parent or ends after it. A parent emitted by the
    // same process contains its children exactly (every overrun that came from how spans were
    // made was of that kind); one emitted by another process may end a little before its
    // child, by the two processes' scheduling (a worker learns its last fact is stored at
    // about the moment the conductor ends the run).
    const ACROSS_PROCESSES_NS: u64 = 100_000_000;
    let by_id: BTreeMap<&str, &Span> = in_trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    for s in &in_trace {
        if s.span_id != root.span_id {
            let parent = by_id
                .get(s.parent.as_str())
                .unwrap_or_else(|| panic!("{} ({}) has a parent in the trace", s.name, s.service));
            let slack = if s.resource.get("service.instance.id")
                == parent.resource.get("service.instance.id")
            {
                0
            } else {
                ACROSS_PROCESSES_NS
            };
            assert!(
                s.start_ns >= parent.start_ns && s.end_ns <= parent.end_ns + slack,
                "{} ({}) {}..{} lies within its parent {} ({}) {}..{}",
                s.name,
                s.service,
                s.start_ns,
                s.end_ns,
                parent.name,
                parent.service,
                parent.start_ns,
                parent.end_ns
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_one_trace_across_the_service_processes_over_otlp_http() {
    let collector = Collector::http().await;
    let stack = Stack::start_with_env(
        SERVICES,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=ci"),
        ],
    );
    stack.wait_gateway();
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let spec = ship_spec(&counts);
    let dir = project(stack.dir.path(), "ship", &spec, &[]);

    // A: from the CLI, no trace context: the run starts its own trace.
    let a = stack.submit_as(&dir, "erin");
    // B: through the gateway with the caller's trace context: the run continues it.
    let change = json!({
        "specversion": "1.0",
        "id": "otel-b",
        "source": "ci/otel",
        "type": "dev.slipway.change.submitted.v1",
        "datacontenttype": "application/json",
        "data": {
            "spec": spec,
            "source": {"kind": "directory", "path": dir.display().to_string()},
            "author": "erin",
        },
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/changes", stack.gateway_url()))
        .header("content-type", "application/cloudevents+json")
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .body(change.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let b = slipway_domain::ids::run_id("ci/otel", "otel-b");

    for run in [&a, &b] {
        stack.wait_phase(run, "awaiting_approval", LONG);
        let out = stack.slipway(&["approve", run, "--token", "bob-token"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for run in [&a, &b] {
        stack.wait_phase(run, "succeeded", LONG);
    }
    let expected: Vec<(String, Vec<(String, u32)>)> = [&a, &b]
        .iter()
        .map(|r| (r.to_string(), stages_of(&stack, r)))
        .collect();
    collector
        .wait("every run and stage span", LONG, |spans| {
            expected.iter().all(|(run, stages)| {
                run_span(spans, run).is_some() && stage_spans(spans, run).len() >= stages.len()
            })
        })
        .await;
    // Workers export within a second of their last span; let the stragglers land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spans = collector.spans();

    let a_trace = stack.status(&a).unwrap()["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    check_run_trace(&spans, &a, &expected[0].1, &a_trace);
    assert_eq!(
        run_span(&spans, &a).unwrap().parent,
        "",
        "A's run span is a root"
    );
    check_run_trace(&spans, &b, &expected[1].1, CALLER_TRACE);
    assert_eq!(
        run_span(&spans, &b).unwrap().parent,
        CALLER_SPAN,
        "B's run span continues the caller's span"
    );
    assert_ne!(a_trace, CALLER_TRACE);

    // Exported by the separate processes, each under its own name, with the configured
    // resource attributes.
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for s in [
        "slipway-conductor",
        "slipway-builder",
        "slipway-tester",
        "slipway-deployer",
        "slipway-approval",
    ] {
        assert!(services.contains(s), "{s} exported spans: {services:?}");
    }
    assert!(spans.iter().all(|s| {
        s.resource
            .get("deployment.environment.name")
            .map(String::as_str)
            == Some("ci")
    }));

    // Metrics over OTLP: the delivery metrics from the conductor, consumer lag from the gateway.
    let until = std::time::Instant::now() + LONG;
    loop {
        let m = collector.metrics();
        let conductor = m.get("slipway-conductor").cloned().unwrap_or_default();
        let gateway = m.get("slipway-approval").cloned().unwrap_or_default();
        let want = [
            "cicd.pipeline.run.duration",
            "cicd.pipeline.run.active",
            "slipway.stage.duration",
            "slipway.deploys",
        ];
        if want.iter().all(|n| conductor.contains(*n)) && gateway.contains("slipway.consumer.lag") {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "metrics missing: conductor {conductor:?}, gateway {gateway:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        collector
            .metric_attrs("slipway.deploys")
            .contains("deployment.environment.name")
    );
    assert!(
        collector
            .metric_attrs("cicd.pipeline.run.duration")
            .contains("cicd.pipeline.result")
    );
    // Every service did its work within its least-privilege grants.
    assert_eq!(stack.refusals(), Vec::<String>::new());
}

fn build_test_spec() -> &'static str {
    r#"
[pipeline]
name = "grpc"
[build]
command = ["sh", "-c", "mkdir -p dist && echo ok > dist/a"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
"#
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_carries_the_trace_and_an_unreachable_collector_fails_nothing() {
    // Over gRPC.
    let collector = Collector::grpc().await;
    let stack = Stack::start_with_env(
        BUILD_AND_TEST,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    let dir = project(stack.dir.path(), "grpc", build_test_spec(), &[]);
    let run = stack.submit_as(&dir, "erin");
    stack.wait_phase(&run, "succeeded", LONG);
    collector
        .wait("the run's spans over gRPC", LONG, |spans| {
            run_span(spans, &run).is_some() && stage_spans(spans, &run).len() >= 2
        })
        .await;
    let spans = collector.spans();
    let root = run_span(&spans, &run).unwrap();
    assert_eq!(root.name, "RUN grpc");
    let stages = stage_spans(&spans, &run);
    let names: BTreeSet<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["build", "test:unit"]));
    assert!(
        stages
            .iter()
            .all(|s| s.parent == root.span_id && s.trace_id == root.trace_id)
    );
    drop(stack);

    // Unreachable: nothing listens on the endpoint. The run completes all the same, and the
    // services say the spans were dropped.
    let dead = format!(
        "http://127.0.0.1:{}",
        slipway_core::exec::server::free_port()
    );
    let stack = Stack::start_with_env(
        BUILD_AND_TEST,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &dead),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ],
    );
    let dir = project(stack.dir.path(), "grpc", build_test_spec(), &[]);
    let run = stack.submit_as(&dir, "erin");
    stack.wait_phase(&run, "succeeded", LONG);
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !stack.logs().contains("Span export failed") {
        assert!(
            std::time::Instant::now() < until,
            "no service reported the failed export:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `change.merged` as the CDEvents specification's example has it (a timestamp of 2023), in a
/// structured-mode CloudEvent.
fn merged_in_a_cloudevent() -> serde_json::Value {
    let cdevent = json!({
        "context": {
            "specversion": "0.5.0",
            "id": "edge-merged-1",
            "source": "/event/source/123",
            "type": "dev.cdevents.change.merged.0.3.0",
            "timestamp": "2023-03-20T14:27:05.315384Z",
        },
        "subject": {
            "id": "mySubject123",
            "source": "/event/source/123",
            "content": {"repository": {"id": "cdevents/edges", "source": "my-git.example"}},
        },
    });
    json!({
        "specversion": "1.0",
        "id": "edge-merged-1",
        "source": "/event/source/123",
        "type": "dev.cdevents.change.merged.0.3.0",
        "time": "2023-03-20T14:27:05.315384Z",
        "datacontenttype": "application/json",
        "data": cdevent,
    })
}

/// `(pipeline, state, result, error type)` of a run-duration series, by one exporter's names.
type RunSeries = (String, String, String, String);

fn series(labels: &BTreeMap<String, String>, keys: [&str; 4]) -> RunSeries {
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    (get(keys[0]), get(keys[1]), get(keys[2]), get(keys[3]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_reads_the_same_in_status_spans_otlp_and_metrics() {
    let collector = Collector::http().await;
    let work = tempfile::tempdir().unwrap();
    let merged = project(
        work.path(),
        "merged",
        "[pipeline]\nname = \"merged\"\n[build]\ncommand = [\"true\"]\n[[test]]\nname = \"unit\"\ncommand = [\"true\"]\n",
        &[],
    );
    let registry = format!(
        "[[conductor.cdevents]]\nrepository = \"cdevents/edges\"\nspec = \"{}\"\nsource = {{ kind = \"directory\", path = \"{}\" }}\n",
        merged.join("slipway.toml").display(),
        merged.display()
    );
    let stack = Stack::start_with_config(
        &[
            "slipway-conductor",
            "slipway-builder",
            "slipway-tester",
            "slipway-approval",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            // One tester job at a time: the cancelled run's second suite is still waiting
            // for the tester (requested, never started) when the run ends.
            ("SLIPWAY__WORKER__CONCURRENCY", "1"),
        ],
        "",
        &registry,
    );
    stack.wait_gateway();
    let gw = stack.gateway_url();
    let http = reqwest::Client::new();

    // 1. A CDEvent whose upstream time is years old, in a structured-mode CloudEvent.
    let resp = http
        .post(format!("{gw}/v1/changes"))
        .header("content-type", "application/cloudevents+json")
        .body(merged_in_a_cloudevent().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let merged_run = slipway_domain::ids::run_id("/event/source/123", "edge-merged-1");
    // 2. A run whose test fails.
    let failing = project(
        work.path(),
        "failing",
        "[pipeline]\nname = \"failing\"\n[build]\ncommand = [\"true\"]\n[[test]]\nname = \"unit\"\ncommand = [\"false\"]\n",
        &[],
    );
    let failed_run = stack.submit_as(&failing, "erin");
    // 3. A run cancelled while one suite runs and the other waits for the tester.
    let cut = project(
        work.path(),
        "cut",
        "[pipeline]\nname = \"cut\"\n[build]\ncommand = [\"true\"]\n[[test]]\nname = \"long\"\ncommand = [\"sleep\", \"30\"]\n[[test]]\nname = \"short\"\ncommand = [\"true\"]\n[[environment]]\nname = \"staging\"\n[environment.deploy]\ncommand = [\"true\"]\n",
        &[],
    );
    let cut_run = stack.submit_as(&cut, "erin");
    stack.wait_for(&cut_run, LONG, |s| {
        s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|st| st["name"] == "test:long" && st["status"] == "running")
    });
    stack.slipway_ok(&["cancel", &cut_run, "--reason", "wrong branch"]);
    stack.wait_phase(&merged_run, "succeeded", LONG);
    stack.wait_phase(&failed_run, "failed", LONG);
    stack.wait_phase(&cut_run, "cancelled", LONG);

    // The cancelled run's stages all ended, alike in status, replay and the gateway.
    let from_gateway: serde_json::Value = http
        .get(format!("{gw}/v1/runs/{cut_run}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for state in [
        stack.slipway_json(&["status", &cut_run]),
        stack.slipway_json(&["replay", &cut_run]),
        from_gateway,
    ] {
        let stages = state["stages"].as_array().unwrap();
        let status = |name: &str| {
            stages
                .iter()
                .find(|s| s["name"] == name)
                .unwrap_or_else(|| panic!("{name} in {state}"))
        };
        assert_eq!(status("build")["status"], "succeeded");
        for name in ["test:long", "test:short", "deploy:staging"] {
            let s = status(name);
            assert_eq!(s["status"], "cancelled", "{name}: {s}");
            assert!(s["finished_at"].is_string(), "{name}: {s}");
            let reason = s["reason"].as_str().unwrap();
            assert!(
                reason.contains("the run was cancelled") && reason.contains("wrong branch"),
                "{name}: {reason}"
            );
        }
        let long = status("test:long")["reason"].as_str().unwrap();
        assert!(long.contains("while this stage ran"), "{long}");
    }
    stack.assert_replay_matches(&cut_run);

    // The CDEvent is kept with its envelope, as a CloudEvent in binary mode, and listed.
    let bus = stack.bus().await;
    let stored = bus
        .read(&["slipway.changes.cdevents".to_string()], 1)
        .await
        .unwrap();
    let raw = stored[0]
        .raw
        .as_ref()
        .expect("a CDEvent, not a Slipway event");
    let cdevent: serde_json::Value = serde_json::from_slice(raw).unwrap();
    assert_eq!(cdevent, merged_in_a_cloudevent()["data"]);
    let msg = stack
        .nats_client()
        .await
        .request(
            "$JS.API.DIRECT.GET.SLIPWAY",
            json!({"seq": stored[0].seq}).to_string().into(),
        )
        .await
        .unwrap();
    let headers = msg.headers.expect("headers");
    assert_eq!(
        headers.get("ce-type").map(|h| h.as_str()),
        Some("dev.cdevents.change.merged.0.3.0")
    );
    assert_eq!(
        headers.get("ce-id").map(|h| h.as_str()),
        Some("edge-merged-1")
    );
    assert_eq!(
        headers.get("ce-specversion").map(|h| h.as_str()),
        Some("1.0")
    );
    let changes = stack.slipway_json(&["changes"]);
    let row = changes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["subject"] == "slipway.changes.cdevents")
        .unwrap();
    assert_eq!(row["id"], "edge-merged-1");
    assert_eq!(row["source"], "/event/source/123");
    assert!(
        row["time"]
            .as_str()
            .unwrap()
            .starts_with("2023-03-20T14:27:05"),
        "{row}"
    );
    assert_eq!(row["outcome"]["run_id"], merged_run.as_str());

    // Spans: the CDEvent's run starts when Slipway took the change, the upstream time kept
    // beside; the attempts the cancel cut off end as cancellations, each span once.
    collector
        .wait("the three runs' spans", LONG, |spans| {
            [&merged_run, &failed_run, &cut_run]
                .iter()
                .all(|r| run_span(spans, r).is_some())
                && stage_spans(spans, &cut_run).len() >= 3
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans = collector.spans();
    let root = run_span(&spans, &merged_run).unwrap();
    let secs = (root.end_ns - root.start_ns) as f64 / 1e9;
    assert!(secs < 60.0, "the run span lasts {secs} s");
    assert_eq!(
        root.attr("slipway.change.time"),
        Some("2023-03-20T14:27:05.315384Z")
    );
    assert_eq!(
        root.attr("cicd.pipeline.run.url.full"),
        Some(format!("{gw}/v1/runs/{merged_run}").as_str())
    );
    let cut_root = run_span(&spans, &cut_run).unwrap();
    assert_eq!(cut_root.attr("cicd.pipeline.result"), Some("cancellation"));
    assert_eq!(cut_root.attr("error.type"), None);
    let cut_spans = stage_spans(&spans, &cut_run);
    for name in ["test:long", "test:short"] {
        let mine: Vec<_> = cut_spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(mine.len(), 1, "{name}: {mine:#?}");
        assert_eq!(
            mine[0].attr("cicd.pipeline.task.run.result"),
            Some("cancellation")
        );
        assert_eq!(mine[0].service, "slipway-conductor");
        assert!(mine[0].end_ns <= cut_root.end_ns);
        assert_eq!(
            mine[0].attr("cicd.pipeline.task.run.url.full"),
            Some(format!("{gw}/v1/runs/{cut_run}").as_str())
        );
    }
    let failed_root = run_span(&spans, &failed_run).unwrap();
    assert_eq!(failed_root.attr("cicd.pipeline.result"), Some("failure"));
    assert_eq!(failed_root.attr("error.type"), Some("test_failed"));

    // Metrics: OTLP and /metrics give the same series with the same counts, in the
    // conventions' words, and the CDEvent's run lasted seconds, not years.
    let until = std::time::Instant::now() + LONG;
    let otlp = loop {
        let points = collector.metric_points("cicd.pipeline.run.duration");
        let runs: f64 = points
            .iter()
            .filter(|(a, _, _)| a.contains_key("cicd.pipeline.result"))
            .map(|(_, n, _)| n)
            .sum();
        if runs >= 3.0 {
            break points;
        }
        assert!(
            std::time::Instant::now() < until,
            "OTLP run durations: {points:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let text = http
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let otlp_runs: BTreeMap<RunSeries, f64> = otlp
        .iter()
        .map(|(a, n, _)| {
            let key = series(
                a,
                [
                    "cicd.pipeline.name",
                    "cicd.pipeline.run.state",
                    "cicd.pipeline.result",
                    "error.type",
                ],
            );
            (key, *n)
        })
        .collect();
    for (pipeline, state, _, _) in otlp_runs.keys() {
        assert!(!pipeline.is_empty() && !state.is_empty(), "{otlp_runs:?}");
    }
    let merged_secs: f64 = otlp
        .iter()
        .filter(|(a, _, _)| a.get("cicd.pipeline.name").map(String::as_str) == Some("merged"))
        .map(|(_, _, sum)| sum)
        .sum();
    assert!(
        merged_secs > 0.0 && merged_secs < 60.0,
        "{merged_secs} s over OTLP"
    );
    // Compared as any reader sees the samples; the strict parser checks the grouping below.
    let plain = plain_samples(&text);
    let samples = |sample: &str| -> Vec<(BTreeMap<String, String>, f64)> {
        plain
            .iter()
            .filter(|(n, _, _)| n == sample)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    };
    let prom_runs: BTreeMap<RunSeries, f64> = samples("cicd_pipeline_run_duration_seconds_count")
        .into_iter()
        .map(|(l, n)| {
            (
                series(
                    &l,
                    [
                        "cicd_pipeline_name",
                        "cicd_pipeline_run_state",
                        "cicd_pipeline_result",
                        "error_type",
                    ],
                ),
                n,
            )
        })
        .collect();
    assert_eq!(prom_runs, otlp_runs, "{text}");
    let results: BTreeSet<(&str, &str)> = prom_runs
        .keys()
        .filter(|k| !k.2.is_empty())
        .map(|k| (k.0.as_str(), k.2.as_str()))
        .collect();
    assert_eq!(
        results,
        BTreeSet::from([
            ("cut", "cancellation"),
            ("failing", "failure"),
            ("merged", "success")
        ])
    );
    let prom_merged: f64 = samples("cicd_pipeline_run_duration_seconds_sum")
        .iter()
        .filter(|(l, _)| l.get("cicd_pipeline_name").map(String::as_str) == Some("merged"))
        .map(|(_, v)| v)
        .sum();
    assert!(prom_merged < 60.0, "{prom_merged} s in /metrics");
    // Errors: the failed run only (a cancellation is not an error), by the same type.
    let otlp_errors: BTreeSet<(String, String)> = collector
        .metric_points("cicd.pipeline.run.errors")
        .iter()
        .map(|(a, _, _)| (a["cicd.pipeline.name"].clone(), a["error.type"].clone()))
        .collect();
    let prom_errors: BTreeSet<(String, String)> = samples("cicd_pipeline_run_errors_total")
        .iter()
        .map(|(l, _)| (l["cicd_pipeline_name"].clone(), l["error_type"].clone()))
        .collect();
    assert_eq!(otlp_errors, prom_errors, "{text}");
    assert_eq!(
        prom_errors,
        BTreeSet::from([("failing".to_string(), "test_failed".to_string())])
    );
    // Stage attempts: the same task names and results on both.
    let otlp_stages: BTreeSet<(String, String, String)> = collector
        .metric_points("slipway.stage.duration")
        .iter()
        .map(|(a, _, _)| {
            (
                a["cicd.pipeline.name"].clone(),
                a["cicd.pipeline.task.name"].clone(),
                a["cicd.pipeline.task.run.result"].clone(),
            )
        })
        .collect();
    let prom_stages: BTreeSet<(String, String, String)> =
        samples("slipway_stage_duration_seconds_count")
            .iter()
            .map(|(l, _)| {
                (
                    l["cicd_pipeline_name"].clone(),
                    l["cicd_pipeline_task_name"].clone(),
                    l["cicd_pipeline_task_run_result"].clone(),
                )
            })
            .collect();
    assert_eq!(otlp_stages, prom_stages, "{text}");
    assert!(prom_stages.contains(&("cut".into(), "test:long".into(), "cancellation".into())));
    // The exposition format's grouping, read by a strict parser: every sample under its own
    // family's declaration, nothing untyped.
    if let Some(families) = slipway_e2e::parse_prometheus(&text) {
        let families = families.as_array().unwrap();
        for f in families {
            assert_ne!(f["type"], "unknown", "{}: {text}", f["name"]);
        }
        let strict: usize = families
            .iter()
            .map(|f| f["samples"].as_array().unwrap().len())
            .sum();
        assert_eq!(strict, plain.len(), "{text}");
    }
    // Consumer lag: each family's samples under its own declaration.
    assert!(
        !samples("slipway_consumer_pending_messages").is_empty(),
        "{text}"
    );
    assert!(
        !samples("slipway_consumer_ack_pending_messages").is_empty(),
        "{text}"
    );
}

/// `(sample name, labels, value)` of each sample line of Prometheus text, read plainly.
fn plain_samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap();
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().unwrap())
        })
        .collect()
}
