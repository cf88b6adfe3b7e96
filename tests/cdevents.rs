//! CDEvents across real processes: a hand-written `change.merged` (the specification's example
//! shape) posted to the gateway and an `artifact.published` put straight on NATS start runs of
//! the pipelines registered for them; an unregistered repository is refused with the reason;
//! every CDEvent the run emits, on `cdevents.>` and to a webhook sink, meets the shipped schemas.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use axum::http::HeaderMap as HttpHeaders;
use futures_util::StreamExt;
use serde_json::{Value, json};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(60);

/// The specification's example of a `change.merged`, by hand.
const CHANGE_MERGED: &str = r#"{
  "context": {
    "specversion": "0.5.0",
    "id": "271069a8-fc18-44f1-b38f-9d70a1695819",
    "source": "/event/source/123",
    "type": "dev.cdevents.change.merged.0.3.0",
    "timestamp": "2023-03-20T14:27:05.315384Z"
  },
  "subject": {
    "id": "mySubject123",
    "source": "/event/source/123",
    "content": {
      "repository": {
        "id": "cdevents/service1",
        "source": "my-git.example"
      }
    }
  }
}"#;

fn schemas() -> BTreeMap<String, jsonschema::Validator> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/cdevents");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ty = schema["properties"]["context"]["properties"]["type"]["const"]
            .as_str()
            .unwrap()
            .to_string();
        let v = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        out.insert(ty, v);
    }
    out
}

type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// A webhook sink: keeps each POST's `ce-type` header and JSON body.
async fn sink() -> (String, Received) {
    let got: Received = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/sink",
        axum::routing::post(move |headers: HttpHeaders, body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let ty = headers
                    .get("ce-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                g.lock().unwrap().push((ty, v));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/sink"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdevents_start_registered_pipelines_and_every_emitted_cdevent_meets_the_schemas() {
    let (sink_url, sunk) = sink().await;
    let work = tempfile::tempdir().unwrap();
    let seen = work.path().join("subjects");
    let spec = format!(
        r#"
[pipeline]
name = "service1"
[build]
command = ["sh", "-c", "echo \"$SLIPWAY_CHANGE_SUBJECT\" >> {seen} && mkdir -p dist && echo ok > dist/a"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
"#,
        seen = seen.display()
    );
    let dir = project(work.path(), "service1", &spec, &[]);
    let registry = format!(
        r#"
[[conductor.cdevents]]
repository = "cdevents/service1"
spec = "{spec}"
source = {{ kind = "directory", path = "{dir}" }}

[[conductor.cdevents]]
artifact_prefix = "pkg:generic/trained-model@"
spec = "{spec}"
source = {{ kind = "directory", path = "{dir}" }}
"#,
        spec = dir.join("slipway.toml").display(),
        dir = dir.display()
    );
    let stack = Stack::start_with_config(
        &[
            "slipway-conductor",
            "slipway-builder",
            "slipway-tester",
            "slipway-approval",
        ],
        &[],
        &format!("cdevents_webhooks = [\"{sink_url}\"]"),
        &registry,
    );
    stack.wait_gateway();
    let client = stack.nats_client().await;
    let mut emitted = client.subscribe("cdevents.>").await.unwrap();
    let http = reqwest::Client::new();

    // 1. The hand-written change.merged, posted to the gateway as plain JSON.
    let resp = http
        .post(format!("{}/v1/changes", stack.gateway_url()))
        .header("content-type", "application/json")
        .body(CHANGE_MERGED)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    let body: Value = resp.json().await.unwrap();
    let merged_run =
        slipway_domain::ids::run_id("/event/source/123", "271069a8-fc18-44f1-b38f-9d70a1695819");
    assert_eq!(body["run_id"], merged_run.as_str());

    // 2. An artifact.published put straight on NATS, as a CloudEvent in binary mode.
    let purl = "pkg:generic/trained-model@1.4.0?checksum=sha256:abc";
    let published = json!({
        "context": {
            "specversion": "0.5.0",
            "id": "published-1",
            "source": "/trainer",
            "type": "dev.cdevents.artifact.published.0.3.0",
            "timestamp": "2026-11-26T10:00:00Z",
        },
        "subject": { "id": purl, "source": "/trainer", "content": { "user": "trainer-bot" } },
    });
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", "published-1");
    h.insert("ce-source", "/trainer");
    h.insert("ce-type", "dev.cdevents.artifact.published.0.3.0");
    h.insert("content-type", "application/json");
    let js = async_nats::jetstream::new(client.clone());
    js.publish_with_headers(
        "slipway.changes.trainer",
        h,
        serde_json::to_vec(&published).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let published_run = slipway_domain::ids::run_id("/trainer", "published-1");

    // 3. A change.merged for a repository no pipeline is registered for: refused, saying so.
    let unknown = CHANGE_MERGED
        .replace("cdevents/service1", "cdevents/unknown")
        .replace("271069a8", "371069a8");
    let resp = http
        .post(format!("{}/v1/changes", stack.gateway_url()))
        .header("content-type", "application/json")
        .body(unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // A malformed CDEvent is refused at the door, naming the field.
    let resp = http
        .post(format!("{}/v1/changes", stack.gateway_url()))
        .header("content-type", "application/json")
        .body(CHANGE_MERGED.replace("\"timestamp\"", "\"when\""))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("context.timestamp"));

    for run in [&merged_run, &published_run] {
        stack.wait_phase(run, "succeeded", LONG);
    }
    let subjects = std::fs::read_to_string(&seen).unwrap();
    assert!(subjects.contains("mySubject123"), "{subjects}");
    assert!(subjects.contains(purl), "{subjects}");
    let status = stack.status(&merged_run).unwrap();
    assert_eq!(status["change"]["author"], "cdevents:/event/source/123");
    let status = stack.status(&published_run).unwrap();
    assert_eq!(status["change"]["author"], "trainer-bot");

    let bus = stack.bus().await;
    let until = Instant::now() + LONG;
    let reason = loop {
        let rejected = bus
            .read(&[slipway_domain::subjects::REJECTED.to_string()], 1)
            .await
            .unwrap();
        if let Some(r) = rejected.iter().find_map(|r| match &r.event {
            Ok(e) => match &e.data {
                slipway_domain::events::EventData::ChangeRejected(c) => Some(c.reason.clone()),
                _ => None,
            },
            Err(_) => None,
        }) {
            break r;
        }
        assert!(
            Instant::now() < until,
            "the unregistered change was not refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        reason.contains("no pipeline is registered for repository \"cdevents/unknown\""),
        "{reason}"
    );

    // What the runs said, on cdevents.> and to the sink.
    let schemas = schemas();
    let mut by_run: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let done = [&merged_run, &published_run].iter().all(|r| {
            by_run
                .get(r.as_str())
                .is_some_and(|t| t.contains("dev.cdevents.pipelinerun.finished.0.3.0"))
        });
        if done {
            break;
        }
        let m = tokio::time::timeout(
            until.saturating_duration_since(Instant::now()),
            emitted.next(),
        )
        .await
        .expect("CDEvents on cdevents.>")
        .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let ty = v["context"]["type"].as_str().unwrap().to_string();
        let errors: Vec<String> = schemas
            .get(&ty)
            .unwrap_or_else(|| panic!("no schema for {ty}"))
            .iter_errors(&v)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{ty}: {errors:?}");
        let headers = m.headers.as_ref().expect("binary mode");
        assert_eq!(
            headers.get("ce-type").map(|h| h.as_str()),
            Some(ty.as_str())
        );
        assert_eq!(m.subject.as_str(), slipway_domain::cdevents::subject_of(&v));
        // The run a CDEvent is about: pipelinerun subjects are runs, stage subjects start with one.
        let run = v["subject"]["id"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        by_run.entry(run).or_default().insert(ty);
    }
    for run in [&merged_run, &published_run] {
        let types = &by_run[run.as_str()];
        for t in [
            "dev.cdevents.pipelinerun.queued.0.3.0",
            "dev.cdevents.pipelinerun.started.0.3.0",
            "dev.cdevents.build.finished.0.3.0",
            "dev.cdevents.testsuiterun.finished.0.3.0",
            "dev.cdevents.pipelinerun.finished.0.3.0",
        ] {
            assert!(types.contains(t), "{run}: {t} in {types:?}");
        }
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let got = sunk.lock().unwrap().clone();
        let finished = got.iter().filter(|(t, v)| {
            t == "dev.cdevents.pipelinerun.finished.0.3.0" && schemas[t.as_str()].is_valid(v)
        });
        if finished.count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the webhook sink got {} CDEvents",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn a_rollouts_cdevents_meet_the_schemas() {
    use slipway_domain::sim::{Answer, CANARY_PIPELINE, Sim, artifact};
    let schemas = schemas();
    let mut types = BTreeSet::new();
    for abort in [false, true] {
        let mut sim = Sim::new(CANARY_PIPELINE);
        sim.live.insert(
            "production".into(),
            ("svc-000000000000".into(), artifact("old")),
        );
        if abort {
            sim.script.insert(
                "rollout:production".into(),
                Answer::Fail("step 1 at 5%: score 0 is below the marginal score 75".into()),
            );
        }
        sim.run_to_end();
        let mut run = None;
        for e in &sim.log {
            run = slipway_domain::fold::fold(run, e);
            let r = run.as_ref().unwrap();
            for v in slipway_domain::cdevents::for_event(e, r, Some("http://gw.example")) {
                let ty = v["context"]["type"].as_str().unwrap().to_string();
                let errors: Vec<String> = schemas
                    .get(&ty)
                    .unwrap_or_else(|| panic!("no schema for {ty}"))
                    .iter_errors(&v)
                    .map(|e| e.to_string())
                    .collect();
                assert!(errors.is_empty(), "{ty}: {errors:?}\n{v}");
                if ty.contains("rollout") {
                    assert_eq!(v["subject"]["content"]["promoted"], !abort, "{v}");
                    assert_eq!(v["subject"]["content"]["strategy"], "canary", "{v}");
                }
                types.insert(ty);
            }
        }
    }
    for t in [
        "dev.cdevents.service.deployed.0.3.0",
        "dev.cdevents.service.upgraded.0.3.0",
        "dev.cdevents.service.rolledback.0.3.0",
        "dev.cdeventsx.slipway-rollout.finished.0.1.0",
    ] {
        assert!(types.contains(t), "{t} in {types:?}");
    }
}
