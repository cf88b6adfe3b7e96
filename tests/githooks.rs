//! Git hosts across real processes: GitHub and GitLab webhook deliveries (signed as the hosts
//! sign them) start the pipeline their repository and branch map to; a wrong signature or token
//! is refused, a redelivery starts nothing, other branches and events are ignored with the
//! reason; each run's result goes back to the commit as a status in the host's own format, to a
//! local receiver that checks it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use serde_json::{Value, json};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(60);

type Statuses = Arc<Mutex<Vec<(String, HeaderMap, Value)>>>;

/// A commit-status API: keeps each POST's path, headers and JSON body.
async fn status_api() -> (String, Statuses) {
    let got: Statuses = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                g.lock().unwrap().push((uri.path().to_string(), headers, v));
                (axum::http::StatusCode::CREATED, "{}")
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn github_push(branch: &str, sha: &str) -> Value {
    json!({
        "ref": format!("refs/heads/{branch}"), "before": "0".repeat(40), "after": sha,
        "created": false, "deleted": false, "forced": false,
        "repository": {"id": 1, "name": "shop", "full_name": "acme/shop",
            "clone_url": "https://github.com/acme/shop.git", "html_url": "https://github.com/acme/shop"},
        "pusher": {"name": "alice", "email": "alice@example.com"},
        "head_commit": {"id": sha, "message": "Faster checkout\n\nWith details.",
            "url": format!("https://github.com/acme/shop/commit/{sha}"),
            "author": {"name": "Alice", "email": "alice@example.com", "username": "alice"}},
        "commits": []
    })
}

/// Waits for `n` statuses and returns them.
async fn statuses(got: &Statuses, n: usize) -> Vec<(String, HeaderMap, Value)> {
    let deadline = Instant::now() + LONG;
    loop {
        {
            let g = got.lock().unwrap();
            if g.len() >= n {
                return g.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "statuses: {:?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_from_git_hosts_start_their_pipelines_and_get_a_commit_status_back() {
    let (api, got) = status_api().await;
    let work = tempfile::tempdir().unwrap();
    let spec = "[pipeline]\nname = \"shop\"\n[build]\ncommand = [\"sh\", \"-c\", \"mkdir -p dist && echo ok > dist/a\"]\nartifacts = [\"dist\"]\n[[test]]\nname = \"unit\"\ncommand = [\"true\"]\n";
    let dir = project(work.path(), "shop", spec, &[]);
    let failing = project(
        work.path(),
        "tools",
        &spec
            .replace("shop", "tools")
            .replace("[\"true\"]", "[\"false\"]"),
        &[],
    );
    let hooks = format!(
        r#"
[[gateway.git_hooks]]
host = "github"
repository = "acme/shop"
branch = "main"
spec = "{spec}"
source = {{ kind = "directory", path = "{dir}" }}
secret = "gh-secret"
status_url = "{api}/repos/{{repository}}/statuses/{{sha}}"
status_token = "gh-status-token"

[[gateway.git_hooks]]
host = "gitlab"
repository = "acme/tools"
spec = "{failing_spec}"
source = {{ kind = "directory", path = "{failing}" }}
secret = "gl-token"
status_url = "{api}/api/v4/projects/{{project}}/statuses/{{sha}}"
status_token = "gl-status-token"
"#,
        spec = dir.join("slipway.toml").display(),
        dir = dir.display(),
        failing_spec = failing.join("slipway.toml").display(),
        failing = failing.display(),
    );
    let stack = Stack::start_with_config(
        &[
            "slipway-conductor",
            "slipway-builder",
            "slipway-tester",
            "slipway-approval",
        ],
        &[],
        "",
        &hooks,
    );
    stack.wait_gateway();
    let http = reqwest::Client::new();
    let gw = stack.gateway_url();
    let github = |body: &Value, event: &str, delivery: &str, signature: Option<String>| {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut req = http
            .post(format!("{gw}/v1/hooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("user-agent", "GitHub-Hookshot/abc");
        if let Some(s) = signature {
            req = req.header("x-hub-signature-256", s);
        }
        req.body(bytes)
    };
    let sha = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";
    let push = github_push("main", sha);
    let bytes = serde_json::to_vec(&push).unwrap();

    // Refused: no signature, a wrong secret, a body changed after signing.
    for (signature, says) in [
        (None, "missing X-Hub-Signature-256"),
        (Some(sign("wrong", &bytes)), "does not match"),
        (Some(sign("gh-secret", b"{}")), "does not match"),
    ] {
        let r = github(&push, "push", "d-1", signature)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }
    // A ping is answered.
    let ping = json!({"zen": "Keep it logically awesome.", "hook_id": 1});
    let r = github(
        &ping,
        "ping",
        "d-0",
        Some(sign("gh-secret", &serde_json::to_vec(&ping).unwrap())),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);

    // Signed: a run, whose id the answer gives.
    let r = github(&push, "push", "d-1", Some(sign("gh-secret", &bytes)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let answer: Value = r.json().await.unwrap();
    let run = answer["run_id"].as_str().unwrap().to_string();
    // The same delivery again (the host's redelivery): the same run, and no second one.
    let r = github(&push, "push", "d-1", Some(sign("gh-secret", &bytes)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["run_id"], run.as_str());
    // Another branch, and a tag: nothing, saying why.
    for (body, why) in [
        (
            github_push("feature/x", sha),
            "no pipeline follows acme/shop branch feature/x",
        ),
        (
            {
                let mut t = push.clone();
                t["ref"] = json!("refs/tags/v1");
                t
            },
            "is not a branch",
        ),
    ] {
        let b = serde_json::to_vec(&body).unwrap();
        let r = github(&body, "push", "d-2", Some(sign("gh-secret", &b)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        assert!(
            v["run_id"].is_null() && v["ignored"].as_str().unwrap().contains(why),
            "{v}"
        );
    }

    // The merged pull request of the same commit (GitHub sends both): the same change.
    let merged = json!({"action": "closed", "number": 7,
        "pull_request": {"merged": true, "merge_commit_sha": sha, "title": "Faster checkout",
            "base": {"ref": "main"}, "user": {"login": "alice"}},
        "repository": {"full_name": "acme/shop", "clone_url": "https://github.com/acme/shop.git",
            "html_url": "https://github.com/acme/shop"},
        "sender": {"login": "bob"}});
    let b = serde_json::to_vec(&merged).unwrap();
    let r = github(&merged, "pull_request", "d-3", Some(sign("gh-secret", &b)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["run_id"], run.as_str());
    // What only the hooks may say cannot come in through /v1/changes: a commit from a host
    // (whose status the gateway would report with the host's token), or a hook's source.
    for (source, commit, says) in [
        (
            "/cli",
            json!({"sha": sha, "repository": "acme/shop", "host": "github"}),
            "data.commit.host",
        ),
        (
            "/hooks/github/acme/shop",
            json!({"sha": sha}),
            "reserved for the git hosts",
        ),
        (
            "/cli",
            json!({"sha": sha, "url": "javascript:alert(1)"}),
            "data.commit.url",
        ),
    ] {
        let ce = json!({"specversion": "1.0", "id": format!("forged-{says}"), "source": source,
            "type": "dev.slipway.change.submitted.v1", "datacontenttype": "application/json",
            "data": {"spec": spec, "source": {"kind": "directory", "path": dir.display().to_string()},
                     "commit": commit}});
        let r = http
            .post(format!("{gw}/v1/changes"))
            .header("content-type", "application/cloudevents+json")
            .body(ce.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{says}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(says), "{body}");
    }

    let status = stack.wait_phase(&run, "succeeded", LONG);
    assert_eq!(status["change"]["commit"]["sha"], sha);
    assert_eq!(status["change"]["commit"]["repository"], "acme/shop");
    assert_eq!(status["change"]["author"], "alice");
    assert_eq!(status["change"]["title"], "Faster checkout");

    // GitLab: a push whose tests fail, with the token GitLab sends; a wrong token refused.
    let gl_sha = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";
    let gl = json!({
        "object_kind": "push", "event_name": "push", "ref": "refs/heads/main",
        "before": "0".repeat(40), "after": gl_sha, "checkout_sha": gl_sha,
        "user_name": "Bob", "user_username": "bob",
        "project": {"id": 15, "path_with_namespace": "acme/tools",
            "git_http_url": "https://gitlab.example/acme/tools.git", "web_url": "https://gitlab.example/acme/tools"},
        "commits": [{"id": gl_sha, "title": "Tighten the checks", "message": "Tighten the checks\n",
            "url": format!("https://gitlab.example/acme/tools/-/commit/{gl_sha}")}]
    });
    let gitlab = |token: &str| {
        http.post(format!("{gw}/v1/hooks/gitlab"))
            .header("content-type", "application/json")
            .header("x-gitlab-event", "Push Hook")
            .header("x-gitlab-token", token)
            .header(
                "x-gitlab-event-uuid",
                "f0e1d2c3-0000-4000-8000-000000000001",
            )
            .header("idempotency-key", "0a1b2c3d-0000-4000-8000-000000000001")
            .body(serde_json::to_vec(&gl).unwrap())
    };
    let r = gitlab("not-the-token").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = gitlab("gl-token").send().await.unwrap();
    assert_eq!(r.status(), 202);
    let gl_run = r.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    stack.wait_phase(&gl_run, "failed", LONG);

    // Four statuses: each run's start and end, in its host's format, with its token.
    let all = statuses(&got, 4).await;
    let of = |path: &str| -> Vec<(HeaderMap, Value)> {
        all.iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, h, v)| (h.clone(), v.clone()))
            .collect()
    };
    let gh = of(&format!("/repos/acme/shop/statuses/{sha}"));
    assert_eq!(gh.len(), 2, "{all:?}");
    for (h, v) in &gh {
        assert_eq!(h["authorization"], "Bearer gh-status-token");
        assert_eq!(h["accept"], "application/vnd.github+json");
        assert_eq!(v["context"], "slipway/shop");
        assert_eq!(v["target_url"], format!("{gw}/runs/{run}"));
        assert!(v["description"].as_str().unwrap().len() <= 140);
    }
    let states: Vec<&str> = gh
        .iter()
        .map(|(_, v)| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "success"]);
    let gl_statuses = of(&format!("/api/v4/projects/acme%2Ftools/statuses/{gl_sha}"));
    assert_eq!(gl_statuses.len(), 2, "{all:?}");
    for (h, v) in &gl_statuses {
        assert_eq!(h["private-token"], "gl-status-token");
        assert_eq!(v["name"], "slipway/tools");
        assert_eq!(v["ref"], "main");
    }
    let states: Vec<&str> = gl_statuses
        .iter()
        .map(|(_, v)| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "failed"]);
    // No second run was made by the redelivery.
    let runs: Value = http
        .get(format!("{gw}/v1/runs?pipeline=shop"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
}
