//! The gateway's routes with `Router::oneshot`, on a real nats-server: changes in, runs out,
//! approvals authenticated, policy-checked and serialised through the log.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use approval::auth::token_hash;
use approval::projection::{Notifier, Runs};
use approval::{AppState, app};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use slipway_core::bus::Bus;
use slipway_core::config::Approver;
use slipway_core::runtime::CancellationToken;
use slipway_core::testing::TestNats;
use slipway_domain::events::EventData;
use slipway_domain::sim::{Answer, Sim};
use tower::ServiceExt;

const SPEC: &str = r#"
[pipeline]
name = "gated"
[build]
command = ["make"]
[[environment]]
name = "production"
url = "http://127.0.0.1:9"
requires_approval = true
[environment.deploy]
command = ["./deploy"]
[approval]
allowed_groups = ["release-managers"]
"#;

struct Gw {
    _nats: TestNats,
    bus: Bus,
    /// The gateway's approval-signing public key.
    public: slipway_domain::signing::PublicKey,
    router: Router,
    stop: CancellationToken,
}

async fn gateway() -> Gw {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let approver = |name: &str, group: &str| Approver {
        name: name.into(),
        groups: vec![group.into()],
        token_sha256: token_hash(&format!("{name}-token")),
    };
    let runs = Arc::new(RwLock::new(Runs::default()));
    let stop = CancellationToken::new();
    let index = slipway_core::store::runs::RunIndex::open(&bus).await.ok();
    tokio::spawn(approval::projection::follow(
        bus.clone(),
        runs.clone(),
        index.clone(),
        Notifier {
            webhooks: vec![],
            attempts: 1,
            public_url: "http://gw".into(),
            cdevents: false,
            cdevents_webhooks: vec![],
            hooks: Default::default(),
        },
        stop.clone(),
    ));
    let (seed, public) = slipway_domain::signing::SigningKey::generate();
    let state = AppState {
        objects: slipway_core::store::objects::Objects::new(&bus),
        bus: bus.clone(),
        runs,
        index,
        dora: None,
        approvers: Arc::new(vec![
            approver("bob", "release-managers"),
            approver("dave", "release-managers"),
            approver("alice", "release-managers"),
            approver("carol", "interns"),
        ]),
        trace_url_template: Some("http://traces.example/trace/{trace_id}".into()),
        signing: Some(Arc::new(
            slipway_domain::signing::SigningKey::from_base64(&seed).unwrap(),
        )),
        auth_limiter: Arc::new(approval::harden::AuthLimiter::new(
            1000,
            Duration::from_secs(60),
        )),
        request_timeout: Duration::from_secs(30),
        hooks: Default::default(),
        commit_links: Default::default(),
        oidc: None,
        public_url: "http://gw".into(),
        running: Default::default(),
        required_services: Arc::new(vec!["conductor".into()]),
    };
    Gw {
        _nats: nats,
        public: slipway_domain::signing::PublicKey::from_base64(&public).unwrap(),
        bus,
        router: app(state, 1 << 20),
        stop,
    }
}

impl Gw {
    async fn call(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn approve(&self, run: &str, who: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = Request::post(format!("/v1/runs/{run}/approvals"))
            .header("content-type", "application/json");
        if let Some(w) = who {
            req = req.header("authorization", format!("Bearer {w}-token"));
        }
        self.call(req.body(Body::from(body.to_string())).unwrap())
            .await
    }

    /// A run of `SPEC` waiting for approval, written to the log; (run id, artifact digest).
    async fn waiting_run(&self, n: u64) -> (String, String) {
        let mut sim = Sim::nth(SPEC, n);
        sim.script
            .insert("approval:production".into(), Answer::Silent);
        sim.run_to_end();
        for e in &sim.log {
            self.bus.publish(e).await.unwrap();
        }
        let digest = sim.run().artifact.as_ref().unwrap().digest.clone();
        (sim.run_id.clone(), digest.to_string())
    }
}

fn decision(d: &str, digest: &str) -> Value {
    json!({"decision": d, "comment": "looks good", "artifact_digest": digest})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_authenticated_and_policy_checked() {
    let gw = gateway().await;
    let (run, digest) = gw.waiting_run(1).await;

    let (s, v) = gw.approve(&run, None, decision("approve", &digest)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    let (s, _) = gw
        .approve(&run, Some("mallory"), decision("approve", &digest))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = gw
        .approve(&run, Some("carol"), decision("approve", &digest))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["error"].as_str().unwrap().contains("allowed groups"),
        "{v}"
    );
    // The simulated change was authored by alice.
    let (s, v) = gw
        .approve(&run, Some("alice"), decision("approve", &digest))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["error"].as_str().unwrap().contains("self-approval"),
        "{v}"
    );

    let (s, v) = gw
        .approve(&run, Some("bob"), decision("approve", "sha256:0000"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not the run's current artifact"),
        "{v}"
    );

    let (s, v) = gw
        .approve(
            &run,
            Some("bob"),
            json!({"decision": "maybe", "artifact_digest": digest}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().starts_with("decision"), "{v}");

    let (s, v) = gw
        .approve(&run, Some("bob"), decision("approve", &digest))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["approver"], "bob");
    assert_eq!(v["stage"], "approval:production");
    // The recorded decision carries the gateway's signature over this run and artifact.
    let log = gw.bus.run_log(&run).await.unwrap();
    let recorded = log
        .iter()
        .find_map(|r| match &r.event.as_ref().unwrap().data {
            EventData::ApprovalApproved(d) => Some(d.clone()),
            _ => None,
        })
        .expect("the approval is in the log");
    assert_eq!(gw.public.verify(&run, true, &recorded), Ok(()));
    assert!(gw.public.verify("another-run", true, &recorded).is_err());

    // Decided: a second decision finds nothing to decide.
    let (s, v) = gw
        .approve(&run, Some("dave"), decision("reject", &digest))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not awaiting approval"),
        "{v}"
    );

    // A run that ended while its approval stage still shows requested (cancelled at its
    // approval timeout, say) cannot be approved.
    let (ended, ended_digest) = gw.waiting_run(7).await;
    let cancel = slipway_domain::Event::new(
        slipway_domain::ids::run_end(&ended),
        "/slipway/cli",
        Some(ended.clone()),
        slipway_core::bus::now(),
        slipway_domain::decide::run_ended(
            slipway_domain::Phase::Cancelled,
            slipway_domain::events::RunEnded {
                reason: "waited too long".into(),
                stage: None,
                by: None,
            },
        ),
    );
    gw.bus.publish(&cancel).await.unwrap();
    let (s, v) = gw
        .approve(&ended, Some("bob"), decision("approve", &ended_digest))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("ended cancelled"),
        "{v}"
    );

    let (s, _) = gw
        .approve("no-such-run", Some("bob"), decision("approve", &digest))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    gw.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_approve_and_reject_record_exactly_one_decision() {
    let gw = Arc::new(gateway().await);
    for n in 1..=5 {
        let (run, digest) = gw.waiting_run(n).await;
        let (a, b) = {
            let (g1, g2) = (gw.clone(), gw.clone());
            let (r1, r2, d1, d2) = (run.clone(), run.clone(), digest.clone(), digest.clone());
            tokio::join!(
                tokio::spawn(async move {
                    g1.approve(&r1, Some("bob"), decision("approve", &d1)).await
                }),
                tokio::spawn(async move {
                    g2.approve(&r2, Some("dave"), decision("reject", &d2)).await
                }),
            )
        };
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut codes = [a.0, b.0];
        codes.sort();
        assert_eq!(
            codes,
            [StatusCode::CREATED, StatusCode::CONFLICT],
            "{a:?} {b:?}"
        );
        let log = gw.bus.run_log(&run).await.unwrap();
        let decisions = log
            .iter()
            .filter(|r| {
                r.subject.contains(".approval.approved") || r.subject.contains(".approval.rejected")
            })
            .count();
        assert_eq!(decisions, 1, "run {n}");
    }
    gw.stop.cancel();
}

fn change_data(spec: &str) -> Value {
    json!({"spec": spec, "source": {"kind": "directory", "path": "/tmp"}, "author": "erin"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_come_in_over_the_cloudevents_http_binding() {
    let gw = gateway().await;
    // Binary mode.
    let req = Request::post("/v1/changes")
        .header("ce-specversion", "1.0")
        .header("ce-id", "c-1")
        .header("ce-source", "ci/acme")
        .header("ce-type", "dev.slipway.change.submitted.v1")
        .header("content-type", "application/json")
        .body(Body::from(change_data(SPEC).to_string()))
        .unwrap();
    let (s, v) = gw.call(req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["run_id"], slipway_domain::ids::run_id("ci/acme", "c-1"));
    // An HTTP caller's W3C trace context travels into the stored change.
    let traced = Request::post("/v1/changes")
        .header("ce-specversion", "1.0")
        .header("ce-id", "c-3")
        .header("ce-source", "ci/acme")
        .header("ce-type", "dev.slipway.change.submitted.v1")
        .header("content-type", "application/json")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Body::from(change_data(SPEC).to_string()))
        .unwrap();
    let (s, v) = gw.call(traced).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // Structured mode.
    let body = json!({
        "specversion": "1.0", "id": "c-2", "source": "ci/acme",
        "type": "dev.slipway.change.submitted.v1", "datacontenttype": "application/json",
        "data": change_data(SPEC),
    });
    let req = Request::post("/v1/changes")
        .header("content-type", "application/cloudevents+json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (s, v) = gw.call(req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // Both are in the log, in binary mode, on the changes subject.
    let stored = gw
        .bus
        .read(&["slipway.changes.>".to_string()], 1)
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    let traced = stored[1].event.as_ref().unwrap();
    assert_eq!(
        traced.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert!(stored.iter().all(|r| r.event.is_ok()));

    // (headers, body, what the error must name)
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, &'a str);
    let bad: &[Case] = &[
        (
            vec![("content-type", "application/json")],
            "{}".into(),
            "not a CloudEvent",
        ),
        (
            vec![("content-type", "application/cloudevents+json")],
            "{not json".into(),
            "not a CloudEvent",
        ),
        (
            vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "s"),
                ("ce-type", "dev.slipway.change.submitted.v1"),
                ("content-type", "application/json"),
            ],
            change_data("[pipeline]\nname = 'x'\n[build]\ncommand = 'make'\n").to_string(),
            "build.command",
        ),
        (
            vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "s"),
                ("ce-type", "com.example.other.v1"),
                ("content-type", "application/json"),
            ],
            "{}".into(),
            "unknown event type",
        ),
        (
            vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "s"),
                ("ce-type", "dev.slipway.change.submitted.v1"),
                ("content-type", "application/json"),
            ],
            json!({"spec": SPEC}).to_string(),
            "source",
        ),
    ];
    for (headers, body, expected) in bad {
        let mut req = Request::post("/v1/changes");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (s, v) = gw.call(req.body(Body::from(body.clone())).unwrap()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains(expected),
            "{expected}: {v}"
        );
    }
    gw.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_served_from_the_log() {
    let gw = gateway().await;
    let (run, _) = gw.waiting_run(1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = gw.get("/v1/runs?phase=awaiting_approval").await;
        assert_eq!(s, StatusCode::OK);
        if v.as_array().unwrap().len() == 1 {
            assert_eq!(v[0]["run_id"], run.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "run not listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, v) = gw.get(&format!("/v1/runs/{run}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["phase"], "awaiting_approval");
    let (s, v) = gw.get(&format!("/v1/runs/{run}/events")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["type"], "dev.slipway.run.created.v1");
    for uri in ["/v1/runs/nope", "/v1/runs/nope/events", "/v1/runs/a.b"] {
        let (s, v) = gw.get(uri).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}: {v}");
        assert!(v["error"].is_string());
    }
    let (s, v) = gw.get("/v1/runs?phase=sideways").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("sideways"));
    let (s, v) = gw.get("/v1/runs?color=red").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Prometheus text with the run's state.
    let (s, v) = gw.get("/metrics").await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap();
    assert!(
        text.contains("cicd_pipeline_run_active{cicd_pipeline_name=\"gated\",cicd_pipeline_run_state=\"executing\"} 1"),
        "{text}"
    );
    assert!(text.contains("slipway_stage_duration_seconds_count{cicd_pipeline_name=\"gated\",cicd_pipeline_task_name=\"build\",cicd_pipeline_task_run_result=\"success\"} 1"), "{text}");
    assert!(
        text.contains("# TYPE slipway_consumer_pending_messages gauge"),
        "{text}"
    );

    let (s, v) = gw.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["nats"], "connected");
    // No conductor has said it runs: the gateway serves, and names what is missing.
    assert_eq!(v["status"], "degraded", "{v}");
    assert_eq!(v["missing_services"], json!(["conductor"]), "{v}");
    let (s, v) = gw.get("/v1/services").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["missing"], json!(["conductor"]), "{v}");
    let (s, v) = gw.get("/v1/ui").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["trace_url_template"],
        "http://traces.example/trace/{trace_id}"
    );
    let (s, v) = gw.get("/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/changes",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/approvals",
    ] {
        assert!(
            v["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    // The console, on its three views.
    for path in ["/", "/runs/anything", "/audit"] {
        let (s, v) = gw.get(path).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            v.as_str().unwrap().contains("Waiting for approval"),
            "{path}"
        );
    }
    gw.stop.cancel();
}

/// A webhook receiver on loopback that refuses the first delivery, then records the rest.
async fn webhook_receiver() -> (String, tokio::sync::mpsc::Receiver<(u16, Value)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read headers and the body announced by content-length.
            let body = loop {
                let k = sock.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(body.to_string());
                    }
                }
            };
            let status = if n == 1 { 500 } else { 200 };
            let _ = sock
                .write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            if let Some(b) = body {
                let _ = tx
                    .send((status, serde_json::from_str(&b).unwrap_or(Value::Null)))
                    .await;
            }
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_starting_to_wait_notifies_the_webhooks_with_retries() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let (url, mut rx) = webhook_receiver().await;
    let runs = Arc::new(RwLock::new(Runs::default()));
    let stop = CancellationToken::new();
    let index = slipway_core::store::runs::RunIndex::open(&bus).await.ok();
    tokio::spawn(approval::projection::follow(
        bus.clone(),
        runs.clone(),
        index.clone(),
        Notifier {
            webhooks: vec![url],
            attempts: 3,
            public_url: "http://gw.example".into(),
            cdevents: false,
            cdevents_webhooks: vec![],
            hooks: Default::default(),
        },
        stop.clone(),
    ));
    // Once the gateway has caught up, a run starts waiting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runs.read().unwrap().caught_up {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sim = Sim::nth_at(SPEC, 1, slipway_core::bus::now());
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.run_to_end();
    for e in &sim.log {
        bus.publish(e).await.unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.0, 500, "the first delivery is refused");
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.0, 200, "and retried");
    let body = second.1;
    assert_eq!(body["event"], "approval.requested");
    assert_eq!(body["run_id"], sim.run_id.as_str());
    assert_eq!(body["environment"], "production");
    let page = format!("http://gw.example/runs/{}", sim.run_id);
    assert_eq!(body["url"], page.as_str());
    // The same as a Slack-compatible incoming-webhook message: text, and blocks whose button
    // opens the run's page.
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("awaits approval for production") && text.contains(&format!("<{page}|")),
        "{text}"
    );
    let blocks = body["blocks"].as_array().unwrap();
    assert!(blocks.iter().all(|b| {
        ["section", "actions", "context", "header"].contains(&b["type"].as_str().unwrap())
    }));
    assert_eq!(blocks[0]["text"]["type"], "mrkdwn");
    let button = blocks
        .iter()
        .find(|b| b["type"] == "actions")
        .map(|b| &b["elements"][0])
        .unwrap();
    assert_eq!(
        (&button["type"], &button["url"]),
        (&json!("button"), &json!(page))
    );
    assert!(
        blocks[1]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["text"].as_str().unwrap().contains("*Artifact*\n`sha256:")),
        "{blocks:?}"
    );
    assert!(
        body["artifact_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    stop.cancel();
}

/// `SPEC` with a staging environment and a cost gate.
const GATED: &str = r#"
[pipeline]
name = "gated-with-cost"
[build]
command = ["make"]
[[environment]]
name = "staging"
url = "http://127.0.0.1:9"
[environment.deploy]
command = ["./deploy"]
[[environment]]
name = "production"
url = "http://127.0.0.1:9"
requires_approval = true
[environment.deploy]
command = ["./deploy"]
[gates]
environment = "staging"
[gates.cost]
instance_type = "small"
projected_requests_per_month = 1000000
budget_per_month = 1.0
[approval]
allowed_groups = ["release-managers"]
"#;

/// The schema the document declares for one answer, as a validator whose references resolve
/// into the document's components.
fn declared(doc: &Value, path: &str, method: &str, status: u16) -> jsonschema::Validator {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not in the document");
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not declare"
    );
    let schema = &response["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status}: no JSON schema"
    );
    let root = json!({"components": doc["components"], "allOf": [schema]});
    jsonschema::validator_for(&root).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_match_the_openapi_document() {
    let gw = gateway().await;
    let (doc_status, doc) = gw.get("/openapi.json").await;
    assert_eq!(doc_status, 200);
    // Every route the gateway serves is declared.
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for route in [
        "/",
        "/healthz",
        "/metrics",
        "/openapi.json",
        "/v1/ui",
        "/v1/changes",
        "/v1/runs",
        "/v1/runs/{id}",
        "/v1/runs/{id}/events",
        "/v1/runs/{id}/gates/{stage}",
        "/v1/runs/{id}/approvals",
        "/v1/runs/{id}/rollout",
        "/v1/metrics/dora",
        "/v1/hooks/github",
        "/v1/hooks/gitlab",
        "/v1/session",
        "/auth/login",
        "/auth/callback",
        "/auth/logout",
    ] {
        assert!(paths.contains(&route), "{route} is not declared: {paths:?}");
    }
    // The runs, events and gate reports are described, not left as `object`.
    let run = &doc["components"]["schemas"]["Run"];
    for field in ["run_id", "phase", "stages", "gates", "approvals"] {
        assert!(run["properties"][field].is_object(), "Run.{field}: {run}");
    }
    assert!(doc["components"]["schemas"]["Check"]["properties"]["bounds"].is_object());

    // A run with gate reports, waiting for approval, then decided.
    let mut sim = Sim::nth(GATED, 7);
    sim.script
        .insert("approval:production".into(), Answer::Silent);
    sim.run_to_end();
    for e in &sim.log {
        gw.bus.publish(e).await.unwrap();
    }
    let (id, digest) = (
        sim.run_id.clone(),
        sim.run().artifact.as_ref().unwrap().digest.to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.get(&format!("/v1/runs/{id}")).await.0 != 200 {
        assert!(Instant::now() < deadline, "the run never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, _) = gw
        .approve(&id, Some("bob"), decision("approve", &digest))
        .await;
    assert_eq!(s, 201);
    let checks: Vec<(&str, &str, String)> = vec![
        ("get", "/v1/runs", "/v1/runs".into()),
        ("get", "/v1/runs", "/v1/runs?phase=sideways".into()),
        ("get", "/v1/runs/{id}", format!("/v1/runs/{id}")),
        ("get", "/v1/runs/{id}", "/v1/runs/no-such-run".into()),
        (
            "get",
            "/v1/runs/{id}/events",
            format!("/v1/runs/{id}/events"),
        ),
        (
            "get",
            "/v1/runs/{id}/gates/{stage}",
            format!("/v1/runs/{id}/gates/cost"),
        ),
        ("get", "/v1/metrics/dora", "/v1/metrics/dora".into()),
        (
            "get",
            "/v1/metrics/dora",
            "/v1/metrics/dora?since=forever".into(),
        ),
        (
            "get",
            "/v1/runs/{id}/context",
            format!("/v1/runs/{id}/context"),
        ),
        (
            "get",
            "/v1/runs/{id}/context",
            "/v1/runs/no-such-run/context".into(),
        ),
        (
            "get",
            "/v1/runs/{id}/logs/{stage}",
            format!("/v1/runs/{id}/logs/nowhere"),
        ),
        ("get", "/v1/audit", "/v1/audit?approver=bob".into()),
        ("get", "/v1/audit", "/v1/audit?cursor=not-a-cursor".into()),
        ("get", "/healthz", "/healthz".into()),
        ("get", "/v1/services", "/v1/services".into()),
        ("get", "/v1/ui", "/v1/ui".into()),
    ];
    let mut seen_events = false;
    for (method, template, uri) in checks {
        let (status, body) = gw.get(&uri).await;
        let v = declared(&doc, template, method, status.as_u16());
        let errors: Vec<String> = v
            .iter_errors(&body)
            .map(|e| format!("{e} at {}", e.instance_path))
            .take(5)
            .collect();
        assert!(
            errors.is_empty(),
            "GET {uri} ({status}) breaks the document: {errors:?}\n{body}"
        );
        if template.ends_with("/events") {
            seen_events = body.as_array().is_some_and(|a| a.len() > 5);
        }
    }
    assert!(seen_events, "the run's events were served");
    let (_, run) = gw.get(&format!("/v1/runs/{id}")).await;
    assert!(
        run["gates"][0]["checks"][0]["bounds"]["margin"].is_number(),
        "a gate report with a check and its bounds was validated: {run}"
    );
    // The console's context: the policy, bob's signed decision, the deadline.
    let (_, ctx) = gw.get(&format!("/v1/runs/{id}/context")).await;
    let approval = &ctx["approval"];
    assert_eq!(approval["policy"]["required_approvals"], 1, "{ctx}");
    assert_eq!(
        approval["policy"]["allowed_groups"],
        json!(["release-managers"])
    );
    assert_eq!(approval["decisions"][0]["approver"], "bob");
    assert_eq!(approval["decisions"][0]["signed"], true);
    assert_eq!(approval["decisions"][0]["verified"], true, "{ctx}");
    assert!(approval["timeout_at"].is_string());
    assert_eq!(ctx["staging"]["name"], "staging");
    let (_, audit) = gw.get("/v1/audit?approver=bob").await;
    assert!(
        audit["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["run_id"] == id.as_str() && d["decision"] == "approve"),
        "{audit}"
    );
    let (_, none) = gw.get("/v1/audit?approver=nobody").await;
    assert_eq!(none["decisions"], json!([]));
    // A body the document's schema refuses is refused by the validator too (the test can fail).
    let v = declared(&doc, "/v1/runs/{id}", "get", 200);
    assert!(!v.is_valid(&json!({"run_id": 7, "phase": "sideways"})));
    let (_, mut run) = gw.get(&format!("/v1/runs/{id}")).await;
    run["stages"][0]["status"] = json!("exploded");
    assert!(!v.is_valid(&run), "a stage status outside the enum");

    // Writes: an approval again (409), a bad body (400), a body too large (413), a cross-site
    // write (403), a missing token (401): each declared, each `{"error": ...}`.
    let post = |uri: &str, body: String, extra: Option<(&str, &str)>| {
        let mut r = Request::post(uri).header("content-type", "application/json");
        if let Some((k, v)) = extra {
            r = r.header(k, v);
        }
        r.body(Body::from(body)).unwrap()
    };
    let approvals = format!("/v1/runs/{id}/approvals");
    for (req, template) in [
        (
            post(
                &approvals,
                decision("approve", &digest).to_string(),
                Some(("authorization", "Bearer bob-token")),
            ),
            "/v1/runs/{id}/approvals",
        ),
        (
            post(
                &approvals,
                "{\"decision\":1}".into(),
                Some(("authorization", "Bearer bob-token")),
            ),
            "/v1/runs/{id}/approvals",
        ),
        (
            post(
                &approvals,
                "x".repeat(2 << 20),
                Some(("authorization", "Bearer bob-token")),
            ),
            "/v1/runs/{id}/approvals",
        ),
        (
            post(
                &approvals,
                "{}".into(),
                Some(("origin", "http://evil.example")),
            ),
            "/v1/runs/{id}/approvals",
        ),
        (
            post(&approvals, "{}".into(), None),
            "/v1/runs/{id}/approvals",
        ),
        (post("/v1/changes", "{}".into(), None), "/v1/changes"),
        (
            post(
                &format!("/v1/runs/{id}/rollout"),
                "{\"action\":\"pause\"}".into(),
                Some(("authorization", "Bearer bob-token")),
            ),
            "/v1/runs/{id}/rollout",
        ),
    ] {
        let (status, body) = gw.call(req).await;
        assert!(status.is_client_error(), "{template}: {status} {body}");
        let v = declared(&doc, template, "post", status.as_u16());
        assert!(v.is_valid(&body), "POST {template} ({status}): {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    gw.stop.cancel();
}
