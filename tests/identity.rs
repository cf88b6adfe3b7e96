//! Sign-in with an OpenID Connect provider, across real processes: the test starts its own
//! provider (`slipway_e2e::oidc_provider`: discovery, JWKS, code flow with PKCE, its own RSA
//! and P-256 keys). The gateway takes the provider's JWTs as bearer tokens and refuses each
//! defective one with the reason; the policy's groups are the provider's; a key rotation is
//! followed; the page's code flow ends in a session cookie whose writes need the CSRF token.

use std::time::Duration;

use serde_json::{Value, json};
use slipway_e2e::oidc_provider::{Defect, Provider};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(60);

const SPEC: &str = r#"
[pipeline]
name = "signed"
[build]
command = ["sh", "-c", "mkdir -p dist && echo v > dist/v"]
artifacts = ["dist"]
[[environment]]
name = "production"
requires_approval = true
[environment.deploy]
command = ["true"]
[approval]
allowed_groups = ["release-managers"]
"#;

fn stack(idp: &Provider, dir: &std::path::Path) -> Stack {
    let _ = dir;
    Stack::start_with_config(
        &["slipway-conductor", "slipway-builder", "slipway-approval"],
        &[],
        "",
        &format!(
            "[gateway.oidc]\nissuer = \"{}\"\nclient_id = \"slipway\"\nclient_secret = \"s3cret\"\naudiences = [\"slipway\", \"slipway-api\"]\njwks_min_refresh_secs = 0\n",
            idp.issuer
        ),
    )
}

/// A run waiting for approval, and its artifact digest.
fn waiting(stack: &Stack, dir: &std::path::Path) -> (String, String) {
    let run = stack.submit_as(dir, "alice");
    let s = stack.wait_phase(&run, "awaiting_approval", LONG);
    (run, s["artifact"]["digest"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_tokens_are_verified_and_refused_with_the_reason() {
    let idp = Provider::start(
        "slipway",
        "s3cret",
        &[("bob", &["release-managers"]), ("carol", &["interns"])],
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let dir = project(work.path(), "signed", SPEC, &[]);
    let stack = stack(&idp, work.path());
    stack.wait_gateway();
    let gw = stack.gateway_url();
    let http = reqwest::Client::new();
    let (run, digest) = waiting(&stack, &dir);
    let approve = |token: String| {
        http.post(format!("{gw}/v1/runs/{run}/approvals"))
            .header("authorization", format!("Bearer {token}"))
            .json(&json!({"decision": "approve", "artifact_digest": digest}))
            .send()
    };

    for (defect, alg, says) in [
        (Defect::WrongSignature, "RS256", "signature does not verify"),
        (Defect::WrongSignature, "ES256", "signature does not verify"),
        (Defect::WrongAudience, "RS256", "audience"),
        (Defect::Expired, "ES256", "expired"),
        (Defect::UnknownKid, "RS256", "not among the provider's keys"),
        (Defect::WrongIssuer, "RS256", "issuer"),
        (Defect::AlgNone, "RS256", "not accepted"),
    ] {
        let r = approve(idp.mint("bob", "slipway-api", alg, defect))
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{defect:?} {alg}");
        let body: Value = r.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{defect:?} {alg}: {error}");
    }
    // A valid token whose groups the policy does not allow: 403, naming the groups.
    let r = approve(idp.mint("carol", "slipway-api", "ES256", Defect::None))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("release-managers"),
        "{body}"
    );

    // The keys rotate: a token under a new key id makes the gateway read the JWKS again.
    let before = idp.jwks_fetches();
    idp.rotate();
    let token = idp.mint("bob", "slipway-api", "RS256", Defect::None);
    let r = approve(token).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert!(idp.jwks_fetches() > before, "the rotation was followed");
    let status = stack.wait_for(&run, LONG, |s| {
        !s["approvals"].as_array().unwrap().is_empty()
    });
    assert_eq!(status["approvals"][0]["approver"], "bob");
    assert_eq!(
        status["approvals"][0]["groups"],
        json!(["release-managers"])
    );

    // A policy that names no groups: signing in does not make someone an approver there
    // (no [gateway.oidc] approver_groups is set); a configured approver still decides.
    let open_dir = project(
        work.path(),
        "open",
        &SPEC
            .replace("name = \"signed\"", "name = \"open\"")
            .replace(
                "allowed_groups = [\"release-managers\"]",
                "required_approvals = 1",
            ),
        &[],
    );
    let (open_run, open_digest) = waiting(&stack, &open_dir);
    let decide_open = |auth: String| {
        http.post(format!("{gw}/v1/runs/{open_run}/approvals"))
            .header("authorization", auth)
            .json(&json!({"decision": "approve", "artifact_digest": open_digest}))
            .send()
    };
    let r = decide_open(format!(
        "Bearer {}",
        idp.mint("bob", "slipway-api", "ES256", Defect::None)
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("only configured approvers decide")
    );
    let r = decide_open("Bearer dave-token".into()).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // Failed logins never blind health, metrics or the page.
    for _ in 0..12 {
        let _ = approve(idp.mint("bob", "slipway-api", "RS256", Defect::Expired)).await;
    }
    assert_eq!(
        approve(idp.mint("bob", "slipway-api", "RS256", Defect::None))
            .await
            .unwrap()
            .status(),
        429
    );
    for path in ["/healthz", "/metrics", "/", "/v1/ui", "/openapi.json"] {
        assert_eq!(
            http.get(format!("{gw}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
}

fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_flow_signs_in_to_a_session_whose_writes_need_the_csrf_token() {
    let idp = Provider::start("slipway", "s3cret", &[("bob", &["release-managers"])]).await;
    let work = tempfile::tempdir().unwrap();
    let dir = project(work.path(), "signed", SPEC, &[]);
    let stack = stack(&idp, work.path());
    stack.wait_gateway();
    let gw = stack.gateway_url();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (run, digest) = waiting(&stack, &dir);

    // Not signed in yet: the page is told it may sign in.
    let who: Value = http
        .get(format!("{gw}/v1/session"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            who["signed_in"].as_bool(),
            who["sign_in_available"].as_bool()
        ),
        (Some(false), Some(true))
    );

    // 1. The gateway sends the browser to the provider with a PKCE challenge.
    let r = http
        .get(format!("{gw}/auth/login?next=/runs/{run}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let login = set_cookie(&r, "slipway_login").unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax"] {
        assert!(login.contains(attribute), "{login}");
    }
    let login = login.split(';').next().unwrap().to_string();
    let to_idp = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        to_idp.starts_with(&format!("{}/authorize?", idp.issuer)),
        "{to_idp}"
    );
    assert!(to_idp.contains("code_challenge_method=S256"), "{to_idp}");

    // 2. The provider signs bob in and sends the browser back with a code.
    let r = http
        .get(format!("{to_idp}&login_hint=bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let back = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        back.starts_with(&format!("{gw}/auth/callback?code=")),
        "{back}"
    );

    // A callback without the browser's sign-in cookie (another browser, a forged link) fails.
    let r = http.get(&back).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // 3. The callback with the cookie: a session, and back to where the sign-in began. (The
    // code above was not spent: the refusal came before the exchange.)
    let r = http
        .get(&back)
        .header("cookie", &login)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap_or_default());
    assert_eq!(r.headers()["location"], format!("/runs/{run}").as_str());
    let session = set_cookie(&r, "slipway_session").unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(session.contains(attribute), "{session}");
    }
    let session = session.split(';').next().unwrap().to_string();
    // The exchange carried the PKCE verifier.
    let sent = idp.token_requests();
    assert!(
        sent.last()
            .unwrap()
            .get("code_verifier")
            .is_some_and(|v| v.len() >= 43)
    );

    let who: Value = http
        .get(format!("{gw}/v1/session"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["name"], "bob");
    assert_eq!(who["groups"], json!(["release-managers"]));
    let csrf = who["csrf"].as_str().unwrap().to_string();

    // 4. A write with the session but not its CSRF token is refused; with it, recorded.
    let decide = |csrf: Option<&str>| {
        let mut r = http
            .post(format!("{gw}/v1/runs/{run}/approvals"))
            .header("cookie", &session)
            .json(&json!({"decision": "approve", "artifact_digest": digest}));
        if let Some(c) = csrf {
            r = r.header("x-csrf-token", c);
        }
        r.send()
    };
    let r = decide(None).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("X-CSRF-Token"));
    let r = decide(Some("not-the-token")).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = decide(Some(&csrf)).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let status = stack.wait_for(&run, LONG, |s| {
        !s["approvals"].as_array().unwrap().is_empty()
    });
    assert_eq!(status["approvals"][0]["approver"], "bob");

    // 5. A tampered session cookie is no session (the browser is told to forget it, and the
    // page to offer signing in); a write with it is refused; signing out clears it.
    let forged = format!("{}x", session);
    let r = http
        .get(format!("{gw}/v1/session"))
        .header("cookie", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        set_cookie(&r, "slipway_session")
            .unwrap()
            .contains("Max-Age=0")
    );
    let who: Value = r.json().await.unwrap();
    assert_eq!(
        (
            who["signed_in"].as_bool(),
            who["sign_in_available"].as_bool()
        ),
        (Some(false), Some(true))
    );
    let r = http
        .post(format!("{gw}/v1/runs/{run}/approvals"))
        .header("cookie", &forged)
        .header("x-csrf-token", &csrf)
        .json(&json!({"decision": "approve", "artifact_digest": digest}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{gw}/auth/logout"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        set_cookie(&r, "slipway_session")
            .unwrap()
            .contains("Max-Age=0")
    );
}
