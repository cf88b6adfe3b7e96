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
                s.service, "slipway-conductor",
                "approvals end in the conductor"
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
        assert!(s.start_ns <= s.end_ns && s.start_ns >= root.start_ns && s.end_ns <= root.end_ns);
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

    // Every span of the trace hangs on a span of the trace (or is the run span).
    let ids: BTreeSet<&str> = in_trace.iter().map(|s| s.span_id.as_str()).collect();
    for s in &in_trace {
        if s.span_id != root.span_id {
            assert!(
                ids.contains(s.parent.as_str()),
                "{} ({}) has a parent in the trace",
                s.name,
                s.service
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
    let b = slipway_core::ids::run_id("ci/otel", "otel-b");

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
    let dead = format!("http://127.0.0.1:{}", slipway_core::server::free_port());
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
