//! Hostile input against the real gateway and services: every bad change is refused with a
//! reason naming what is wrong, or handled safely; nothing crashes; the gateway's answers
//! carry the security headers, refuse cross-site writes and oversized bodies, limit failed
//! authentications, and never echo a secret into its log.

use std::time::Duration;

use serde_json::{Value, json};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(60);

fn change(spec: &str, source: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": slipway_domain::ids::random(),
        "source": "hostile-test",
        "type": "dev.slipway.change.submitted.v1",
        "datacontenttype": "application/json",
        "data": {"spec": spec, "source": source, "author": "mallory"},
    })
}

const SPEC: &str = r#"
[pipeline]
name = "hostile"
[build]
command = ["sh", "-c", "mkdir -p dist && printf '%s' \"$SLIPWAY_PIPELINE\" > dist/name"]
artifacts = ["dist"]
"#;

async fn post(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, String) {
    let r = http
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_changes_are_refused_with_a_reason_and_nothing_crashes() {
    let stack = Stack::start_with(&["slipway-conductor", "slipway-builder", "slipway-approval"]);
    stack.wait_gateway();
    // No pooled connections: the server closes one after refusing an oversized body unread.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("{}/v1/changes", stack.gateway_url());
    let dir = project(stack.dir.path(), "hostile", SPEC, &[]);
    let ce = "application/cloudevents+json";
    let good_source = json!({"kind": "directory", "path": dir.display().to_string()});

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut missing_id = change(SPEC, good_source.clone());
    missing_id.as_object_mut().unwrap().remove("id");
    let mut future = change(SPEC, good_source.clone());
    future["type"] = json!("dev.slipway.change.submitted.v9");
    let mut wrong_type = change(SPEC, good_source.clone());
    wrong_type["data"]["spec"] = json!(42);
    let relative = change(SPEC, json!({"kind": "directory", "path": "../../etc"}));
    let bad_spec = change(
        "[pipeline]\nname = \"x\"\n[build]\ncommand = []\n",
        good_source.clone(),
    );
    let unknown_key = change(
        &format!("{SPEC}\n[build.extra]\nshell = \"rm -rf /\"\n"),
        good_source.clone(),
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad JSON",
            b"{\"specversion\": ".to_vec(),
            "not a CloudEvent",
        ),
        (
            "invalid UTF-8",
            vec![0xff, 0xfe, 0x7b, 0x7d],
            "not a CloudEvent",
        ),
        ("deep nesting", deep.into_bytes(), "not a CloudEvent"),
        ("missing id", missing_id.to_string().into_bytes(), "id"),
        (
            "unknown version",
            future.to_string().into_bytes(),
            "dev.slipway.change.submitted.v9",
        ),
        ("wrong type", wrong_type.to_string().into_bytes(), "spec"),
        (
            "relative source path",
            relative.to_string().into_bytes(),
            "absolute",
        ),
        (
            "empty command",
            bad_spec.to_string().into_bytes(),
            "command",
        ),
        (
            "unknown spec key",
            unknown_key.to_string().into_bytes(),
            "extra",
        ),
    ];
    for (what, body, names) in cases {
        let (status, text) = post(&http, &url, ce, body).await;
        assert_eq!(status, 400, "{what}: {status} {text}");
        assert!(
            text.contains(names),
            "{what}: the reason names {names:?}: {text}"
        );
    }
    // Oversized: over the gateway's body limit (1 MiB by default).
    let huge = change(
        &format!("{SPEC}#{}", "x".repeat(2 << 20)),
        good_source.clone(),
    );
    let (status, _) = post(&http, &url, ce, huge.to_string()).await;
    assert_eq!(status, 413, "oversized body");
    // Oversized headers: refused by the HTTP layer, the server lives on.
    let r = http
        .get(format!("{}/v1/runs", stack.gateway_url()))
        .header("x-filler", "y".repeat(40_000))
        .send()
        .await;
    assert_eq!(r.unwrap().status(), 431, "oversized headers");
    let r = http
        .get(format!("{}/healthz", stack.gateway_url()))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    // A git source pointing at a local file, and one that looks like an option: the run is
    // made and its build fails saying why; no checkout happens.
    for (what, source, names) in [
        (
            "file URL",
            json!({"kind": "git", "url": "file:///etc", "revision": "HEAD"}),
            "file",
        ),
        (
            "option URL",
            json!({"kind": "git", "url": "--upload-pack=touch /tmp/pwned", "revision": "HEAD"}),
            "option",
        ),
        (
            "option revision",
            json!({"kind": "git", "url": "https://example.invalid/r.git", "revision": "--output=/tmp/pwned"}),
            "revision",
        ),
    ] {
        let c = change(SPEC, source);
        let (status, text) = post(&http, &url, ce, c.to_string()).await;
        assert_eq!(status, 202, "{what}: {text}");
        let run = serde_json::from_str::<Value>(&text).unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        let s = stack.wait_phase(&run, "failed", LONG);
        let reason = s["reason"].as_str().unwrap();
        assert!(reason.contains(names), "{what}: {reason}");
    }
    assert!(!std::path::Path::new("/tmp/pwned").exists());

    // Shell metacharacters in values that reach a command (its environment, the pipeline
    // name in SLIPWAY_PIPELINE) stay data: commands are argv lists, never a shell line.
    let out = stack.dir.path().join("meta-out");
    let meta = format!(
        r#"
[pipeline]
name = "meta"
[build]
command = ["sh", "-c", "mkdir -p dist && printf '%s' \"$X\" > '{}' && echo ok > dist/a"]
artifacts = ["dist"]
env = {{ X = "$(touch /tmp/pwned-too); `id` && rm -rf / ; | cat /etc/passwd" }}
"#,
        out.display()
    );
    let c = change(&meta, good_source.clone());
    let (status, text) = post(&http, &url, ce, c.to_string()).await;
    assert_eq!(status, 202, "{text}");
    let run = serde_json::from_str::<Value>(&text).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    stack.wait_phase(&run, "succeeded", LONG);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "$(touch /tmp/pwned-too); `id` && rm -rf / ; | cat /etc/passwd"
    );
    assert!(!std::path::Path::new("/tmp/pwned-too").exists());

    // Still serving, and a good change still becomes a run that succeeds.
    let (status, text) = post(&http, &url, ce, change(SPEC, good_source).to_string()).await;
    assert_eq!(status, 202, "{text}");
    let run = serde_json::from_str::<Value>(&text).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    stack.wait_phase(&run, "succeeded", LONG);
    for s in ["slipway-conductor", "slipway-builder", "slipway-approval"] {
        assert!(stack.services.iter().any(|p| p.name == s), "{s} started");
    }
    let mut stack = stack;
    for s in ["slipway-conductor", "slipway-builder", "slipway-approval"] {
        assert!(stack.service(s).is_running(), "{s} is still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sends_security_headers_refuses_cross_site_writes_and_limits_failed_logins() {
    let stack = Stack::start_with(&["slipway-conductor", "slipway-approval"]);
    stack.wait_gateway();
    let http = reqwest::Client::new();
    let gw = stack.gateway_url();

    let page = http.get(format!("{gw}/")).send().await.unwrap();
    let h = page.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");

    // A write a browser makes for another site is refused before anything else.
    let approve = format!("{gw}/v1/runs/some-run/approvals");
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
        ("origin", "null"),
    ] {
        let r = http
            .post(&approve)
            .header(name, value)
            .header("authorization", "Bearer bob-token")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
        assert!(r.text().await.unwrap().contains("cross-site"));
    }
    // Same origin is fine (it gets as far as the run lookup).
    let r = http
        .post(&approve)
        .header("origin", &gw)
        .header("authorization", "Bearer bob-token")
        .header("content-type", "application/json")
        .body(json!({"decision": "approve", "artifact_digest": "sha256:00"}).to_string())
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 403);

    // Failed authentications: ten per minute per address, then 429 with Retry-After.
    let secret = "SECRET-not-a-token-0123456789";
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = http
            .post(&approve)
            .header("authorization", format!("Bearer {secret}"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some());
        }
    }
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    // Even a valid token waits out the window from that address.
    let r = http
        .post(&approve)
        .header("authorization", "Bearer bob-token")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // Only the routes that take a token are refused: health checks, scraping, the page, reads
    // and intake still answer that address.
    for path in [
        "/healthz",
        "/metrics",
        "/",
        "/openapi.json",
        "/v1/runs",
        "/v1/ui",
    ] {
        let r = http.get(format!("{gw}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} after failed logins");
    }
    let r = http
        .post(format!("{gw}/v1/changes"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "intake after failed logins");

    // Every error is the documented JSON, including the router's and the body limit's own.
    let too_big = "x".repeat(1024 * 1024 + 1024);
    for (method, path, body, status, says) in [
        (
            "GET",
            "/v1/nowhere",
            None,
            404,
            "no such route: GET /v1/nowhere",
        ),
        (
            "DELETE",
            "/v1/changes",
            None,
            405,
            "method DELETE is not allowed on /v1/changes",
        ),
        ("GET", "/v1/changes", None, 405, "allowed: POST"),
        (
            "POST",
            "/v1/changes",
            Some(too_big),
            413,
            "larger than the limit of 1048576 bytes",
        ),
    ] {
        let mut req = http.request(method.parse().unwrap(), format!("{gw}{path}"));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let v: Value = r.json().await.unwrap();
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{method} {path}: {v}");
    }
    // No token, and no signing key, ever reaches the log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = stack.logs();
    assert!(!logs.contains(secret), "a token reached the log");
    assert!(!logs.contains("bob-token"), "a token reached the log");
    let config = std::fs::read_to_string(stack.dir.path().join("slipway.toml")).unwrap();
    let seed = config
        .lines()
        .find_map(|l| l.strip_prefix("signing_key = \""))
        .unwrap()
        .trim_end_matches('"');
    assert!(!logs.contains(seed), "the signing key reached the log");
}

#[test]
fn the_gateway_serves_https_when_configured() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let stack = Stack::start_with_config(
        &["slipway-approval"],
        &[],
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            cert.display(),
            key.display()
        ),
        "",
    );
    stack.wait_gateway();
    let https = stack.gateway_url().replace("http://", "https://");
    let curl = |url: &str, extra: &[&str]| {
        std::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap()
    };
    let out = curl(
        &format!("{https}/healthz"),
        &["--cacert", cert.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("http/2 200") || text.starts_with("http/1.1 200"),
        "{text}"
    );
    assert!(text.contains("x-frame-options: deny"), "{text}");
    // Plain HTTP to the TLS port gets no answer, and the gateway keeps serving.
    let plain = curl(&format!("{}/healthz", stack.gateway_url()), &[]);
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("200"));
    let out = curl(
        &format!("{https}/healthz"),
        &["--cacert", cert.to_str().unwrap()],
    );
    assert!(out.status.success());
}

/// Schemathesis (`deploy/setup.sh --python-tools`) against the live gateway: generated and
/// boundary requests on every operation of `/openapi.json`, and sequences of them through its
/// links; no answer may be a server error or break the document (status, content type, schema,
/// headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_that_breaks_the_openapi_document() {
    let st = slipway_core::testing::workspace_root().join(".venv/bin/st");
    if !st.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is missing: `bash deploy/setup.sh --python-tools` installs it"
        );
        eprintln!("skipping: no schemathesis (deploy/setup.sh --python-tools)");
        return;
    }
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-tester",
        "slipway-approval",
    ]);
    stack.wait_gateway();
    // A real run, so the run operations reach a run that exists.
    let run = stack.submit_as(&slipway_e2e::hello_example(), "alice");
    stack.wait_phase(&run, "succeeded", LONG);
    let config = stack.dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "headers = {{ Authorization = \"Bearer bob-token\" }}\n[parameters]\nid = \"{run}\"\nstage = \"build\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(&st)
        .current_dir(stack.dir.path())
        .arg("--config-file")
        .arg(&config)
        .args([
            "run",
            &format!("{}/openapi.json", stack.gateway_url()),
            "--max-examples",
            "20",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found answers that break the document:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
}
