//! The approver page in a real browser: headless Chromium driven over WebDriver
//! (chromedriver). The page lists the waiting run with its stages and gate results; clicking
//! Approve deploys to production.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use slipway_domain::sim::{Answer, Sim};
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(60);

/// chromedriver and chromium from Debian's packages (`deploy/setup.sh --browser`).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let driver = PathBuf::from("/usr/bin/chromedriver");
    let chromium = PathBuf::from("/usr/bin/chromium");
    if driver.is_file() && chromium.is_file() {
        return Some((driver, chromium));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "chromium and chromedriver are missing: `bash deploy/setup.sh --browser` installs them"
    );
    eprintln!("skipping: no chromium/chromedriver (deploy/setup.sh --browser installs them)");
    None
}

/// A WebDriver session on a chromedriver child process.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start(driver: &Path, chromium: &Path) -> Self {
        let port = slipway_core::exec::server::free_port();
        // Its own process group, so a failing test takes chromium down with it (see Drop).
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        // The flags this machine needs: no sandbox as root, and no background network traffic.
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let mut b = Self {
            driver: child,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(caps)).await;
        b.session = v["sessionId"].as_str().expect("session id").to_string();
        b
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "POST" => self.http.post(url).json(&body.unwrap_or(json!({}))),
            "DELETE" => self.http.delete(url),
            _ => self.http.get(url),
        };
        let resp = req.send().await.expect("webdriver answers");
        let v: Value = resp.json().await.expect("webdriver JSON");
        v["value"].clone()
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({"url": url})))
            .await;
    }

    /// The element matching `css`, waiting for it to appear.
    async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            let v = self
                .session_call(
                    "POST",
                    "/element",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            if let Some(id) = v[ELEMENT].as_str() {
                return id.to_string();
            }
            assert!(Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.session_call("GET", &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the text of `css` contains `needle`.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            let t = self.text(css).await;
            if t.contains(needle) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {needle:?}; last: {t}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.session_call("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }

    /// Runs `script` (a function body) in the page; what it returns.
    async fn exec(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn window(&self, width: u32, height: u32) {
        self.session_call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    async fn screenshot(&self, path: &Path) {
        let v = self.session_call("GET", "/screenshot", None).await;
        if let Some(b64) = v.as_str() {
            let bytes = decode_base64(b64);
            let _ = std::fs::write(path, bytes);
        }
    }

    async fn quit(self) {
        self.session_call("DELETE", "", None).await;
    }
}

impl Drop for Browser {
    /// Kills chromedriver and the chromium it started, whether the test passed or panicked.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.wait();
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        buf = (buf << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

const SPEC: &str = r#"
[pipeline]
name = "page"
[build]
command = ["sh", "-c", "mkdir -p dist && echo page > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
[[environment]]
name = "production"
requires_approval = true
[environment.deploy]
command = ["sh", "-c", "echo \"$SLIPWAY_RUN_ID\" >> \"$COUNTS/production\""]
env = { COUNTS = "@COUNTS@" }
[approval]
allowed_groups = ["release-managers"]
"#;

/// A run with quality gates, waiting for approval: simulated (gate services are separate),
/// written to the real log the real gateway serves.
const GATED: &str = include_str!("../schemas/examples/full-pipeline.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approving_on_the_page_deploys_to_production() {
    let Some((driver, chromium)) = browser() else {
        return;
    };
    let mut stack = Stack::start();
    stack.wait_gateway();
    let b = Browser::start(&driver, &chromium).await;
    // With nothing waiting when the page loads, it says so (it once said "Loading…" forever).
    b.goto(&stack.gateway_url()).await;
    b.wait_text("#waiting", "No run is waiting for approval.")
        .await;
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let dir = project(
        stack.dir.path(),
        "page",
        &SPEC.replace("@COUNTS@", &counts.display().to_string()),
        &[],
    );
    let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
    let run = v["run_id"].as_str().unwrap().to_string();
    let status = stack.wait_phase(&run, "awaiting_approval", LONG);
    let digest = status["artifact"]["digest"].as_str().unwrap().to_string();

    let gated = simulated_gated_run(&mut stack, 1, &[("perf", Answer::Warn)]).await;

    b.goto(&stack.gateway_url()).await;
    b.type_into("#token", "bob-token").await;
    let card = format!("#run-{run}");
    let text = b.wait_text(&card, "approval:production").await;
    assert!(text.contains(&digest), "{text}");
    // The run's trace, linked to the configured trace UI.
    let trace = status["trace_id"].as_str().unwrap();
    assert!(text.contains(trace), "{text}");
    let link = b.find(&format!("{card} a.trace")).await;
    let href = b
        .session_call("GET", &format!("/element/{link}/attribute/href"), None)
        .await;
    assert_eq!(href, format!("http://traces.example/trace/{trace}"));
    assert!(text.contains("test:unit"), "{text}");
    // The gated run shows each gate's verdict.
    let gated_text = b.wait_text(&format!("#run-{gated}"), "perf").await;
    assert!(gated_text.contains("evaluate: pass"), "{gated_text}");
    assert!(gated_text.contains("perf: warn"), "{gated_text}");
    assert!(gated_text.contains("cost: pass"), "{gated_text}");
    if let Some(dir) = std::env::var_os("SLIPWAY_SCREENSHOT_DIR") {
        b.screenshot(&PathBuf::from(dir).join("approver-page.png"))
            .await;
    }

    b.type_into(&format!("{card} .comment"), "approved in the browser")
        .await;
    b.click(&format!("{card} button.approve")).await;
    b.wait_text(&format!("{card} .result"), "Recorded: approve by bob")
        .await;
    let status = stack.wait_phase(&run, "succeeded", LONG);
    assert_eq!(status["approvals"][0]["comment"], "approved in the browser");
    let prod = std::fs::read_to_string(counts.join("production")).unwrap();
    assert_eq!(prod.lines().collect::<Vec<_>>(), vec![run.as_str()]);
    // The page shows the production deploy happen: the run leaves the waiting list and the
    // recent runs say it succeeded.
    b.wait_text(&format!("#recent-{run} .phase"), "succeeded")
        .await;
    b.quit().await;
    stack.assert_replay_matches(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_charted_on_the_page_and_paused_and_aborted_from_it() {
    use slipway_e2e::rollout_app::{ERRORS, pipeline, start_app, weight_of};
    let Some((driver, chromium)) = browser() else {
        return;
    };
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-deployer",
        "slipway-monitor",
        "slipway-approval",
    ]);
    stack.wait_gateway();
    let dir = stack.dir.path().join("rollout");
    let (state, flags) = (dir.join("slots"), dir.join("flags.json"));
    std::fs::create_dir_all(&state).unwrap();
    let app = start_app(&state, &flags);
    let spec = pipeline(
        "charted",
        &app.url,
        &state,
        &flags,
        &format!(
            "strategy = \"canary\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 20\n\
             steps = [{{ weight = 10, duration_secs = 600 }}]\n{ERRORS}"
        ),
    );
    let project_dir = project(&dir, "project", &spec, &[]);
    let submit = |quality: &str| {
        std::fs::write(project_dir.join("quality"), quality).unwrap();
        let v = stack.slipway_json(&["submit", project_dir.join("slipway.toml").to_str().unwrap()]);
        v["run_id"].as_str().unwrap().to_string()
    };
    let first = submit("good 1");
    stack.wait_phase(&first, "succeeded", LONG);
    let run = submit("good 2");
    stack.wait_for(&run, LONG, |s| {
        s["rollouts"][0]["looks"]
            .as_array()
            .is_some_and(|l| l.len() >= 3)
    });

    let b = Browser::start(&driver, &chromium).await;
    b.goto(&stack.gateway_url()).await;
    b.type_into("#token", "bob-token").await;
    let card = format!("#rollout-{run}");
    let text = b.wait_text(&card, "candidate at 10").await;
    assert!(text.contains("errors"), "{text}");
    assert!(text.contains("proportions"), "{text}");
    // Both variants drawn over the looks, side by side.
    b.find(&format!("{card} svg polyline.series-stable")).await;
    b.find(&format!("{card} svg polyline.series-candidate"))
        .await;
    if let Some(dir) = std::env::var_os("SLIPWAY_SCREENSHOT_DIR") {
        b.screenshot(&PathBuf::from(dir).join("rollout.png")).await;
    }
    b.click(&format!("{card} button.pause")).await;
    b.wait_text(&format!("{card} .result"), "Recorded: pause by bob")
        .await;
    stack.wait_for(&run, LONG, |s| s["rollouts"][0]["paused"] == true);
    b.wait_text(&format!("{card} h3"), "paused").await;
    b.click(&format!("{card} button.abort")).await;
    let done = stack.wait_phase(&run, "rolled_back", LONG);
    assert!(
        done["reason"].as_str().unwrap().contains("aborted by bob"),
        "{done}"
    );
    b.wait_text("#rollouts", "No rollout in progress.").await;
    b.wait_text(&format!("#recent-{run} .phase"), "rolled_back")
        .await;
    assert_eq!(weight_of(&flags), 0);
    b.quit().await;
    stack.assert_replay_matches(&run);
}

/// Writes the `n`th simulated run of `GATED` (quality gates; `script` answers some stages),
/// waiting for approval, to the real log; its id.
async fn simulated_gated_run(stack: &mut Stack, n: u64, script: &[(&str, Answer)]) -> String {
    let mut gated = Sim::nth_at(GATED, n, slipway_core::bus::now());
    for (stage, answer) in script {
        gated.script.insert((*stage).into(), answer.clone());
    }
    gated
        .script
        .insert("approval:production".into(), Answer::Silent);
    gated.run_to_end();
    // The simulated run answers its own requests. Real workers would race those answers with
    // their own (a real gate failing first fails the run), so they are stopped while it is
    // written; started again, they find its attempts settled and skip them.
    const WORKERS: [&str; 6] = [
        "slipway-builder",
        "slipway-tester",
        "slipway-deployer",
        "slipway-model-evaluator",
        "slipway-perf-regression",
        "slipway-cost-estimator",
    ];
    for w in WORKERS {
        stack.service(w).kill();
    }
    let bus = stack.bus().await;
    for e in &gated.log {
        bus.publish(e).await.unwrap();
    }
    for w in WORKERS {
        stack.spawn(w);
    }
    gated.run_id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_decision_in_context_and_fits_a_phone() {
    let Some((driver, chromium)) = browser() else {
        return;
    };
    let mut stack = Stack::start();
    stack.wait_gateway();
    let gw = stack.gateway_url();
    let b = Browser::start(&driver, &chromium).await;
    // Nothing waiting: the page says so, never "Loading…" for good.
    b.goto(&gw).await;
    b.wait_text("#waiting", "No run is waiting for approval.")
        .await;

    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let spec = SPEC
        .replace("@COUNTS@", &counts.display().to_string())
        .replace(
            "mkdir -p dist",
            "echo building-the-console-page && mkdir -p dist",
        )
        .replace("[approval]\n", "[approval]\nrequired_approvals = 2\n");
    let dir = project(stack.dir.path(), "page", &spec, &[]);
    let run = stack.submit_as(&dir, "alice");
    let status = stack.wait_phase(&run, "awaiting_approval", LONG);
    let digest = status["artifact"]["digest"].as_str().unwrap().to_string();
    let gated = simulated_gated_run(&mut stack, 2, &[]).await;
    // Dave approves first, through the API.
    let r = reqwest::Client::new()
        .post(format!("{gw}/v1/runs/{run}/approvals"))
        .bearer_auth("dave-token")
        .json(&json!({"decision": "approve", "artifact_digest": digest, "comment": "fine by me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    b.goto(&gw).await;
    b.type_into("#token", "bob-token").await;
    let card = format!("#run-{run}");
    let gated_card = format!("#run-{gated}");
    // 1. A check shows its bound and how close it came: 1.0 against a 0.95 minimum is thin.
    let text = b.wait_text(&gated_card, "thin margin").await;
    assert!(text.contains("≥ 0.9500"), "{text}");
    b.find(&format!("{gated_card} tr.check.thin td.verdict.pass"))
        .await;
    // 2. The policy, the decisions so far, the countdown to the run's approval timeout.
    let text = b
        .wait_text(&card, "2 approvals from release-managers")
        .await;
    assert!(text.contains("not by the change's author"), "{text}");
    assert!(text.contains("1 more needed."), "{text}");
    let so_far = b
        .wait_text(&format!("{card} table.decisions"), "dave")
        .await;
    assert!(
        so_far.contains("approve") && so_far.contains("fine by me"),
        "{so_far}"
    );
    assert!(so_far.contains("signed ✓"), "{so_far}");
    let text = b
        .wait_text(
            &format!("{card} .countdown"),
            "The run is cancelled if undecided in 6d 23h",
        )
        .await;
    assert!(!text.is_empty());
    // 3. The change, and the tests.
    assert!(b.text(&format!("{card} .author")).await.contains("alice"));
    let text = b.text(&format!("{card} .suite")).await;
    assert!(text.contains("unit"), "{text}");
    // 4. The build's log, from the object store, in the page.
    b.click(&format!("{card} details.log[data-stage='build'] summary"))
        .await;
    b.wait_text(
        &format!("{card} details.log[data-stage='build'] pre.log"),
        "building-the-console-page",
    )
    .await;
    // 5. The stages over time.
    b.find(&format!("{card} svg.timeline rect.bar[data-stage='build']"))
        .await;

    // 6. A phone, 390 px wide: no horizontal scrolling, the decision buttons and the verdicts
    // in view.
    b.window(390, 844).await;
    b.goto(&gw).await;
    b.wait_text(&gated_card, "thin margin").await;
    let fit = b
        .exec(&format!(
            r##"const w = window.innerWidth;
            const right = s => {{ const e = document.querySelector(s); return e ? e.getBoundingClientRect().right : 1e9; }};
            const left = s => {{ const e = document.querySelector(s); return e ? e.getBoundingClientRect().left : -1; }};
            return {{w, scroll: document.documentElement.scrollWidth,
                     approve: right("#run-{run} button.approve"), approveLeft: left("#run-{run} button.approve"),
                     reject: right("#run-{run} button.reject"),
                     verdict: right("#run-{gated} td.verdict")}};"##
        ))
        .await;
    let w = fit["w"].as_f64().unwrap();
    assert!(w <= 420.0, "the window is a phone's: {fit}");
    assert!(
        fit["scroll"].as_f64().unwrap() <= w,
        "no horizontal scroll: {fit}"
    );
    for what in ["approve", "reject", "verdict"] {
        assert!(fit[what].as_f64().unwrap() <= w, "{what} is cut off: {fit}");
    }
    assert!(fit["approveLeft"].as_f64().unwrap() >= 0.0, "{fit}");
    if let Some(dir) = std::env::var_os("SLIPWAY_SCREENSHOT_DIR") {
        b.screenshot(&PathBuf::from(dir).join("console-phone.png"))
            .await;
    }
    b.window(1280, 900).await;
    b.goto(&gw).await;
    b.type_into("#token", "").await;

    // 7. A decision: its confirmation stays, with the run's page a link away.
    b.type_into(&format!("{card} .comment"), "looks right")
        .await;
    b.click(&format!("{card} button.approve")).await;
    b.wait_text(&format!("{card} .result"), "Recorded: approve by bob")
        .await;
    stack.wait_phase(&run, "succeeded", LONG);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = b.text(&format!("#decided-here {card} .result")).await;
    assert!(text.contains("Recorded: approve by bob"), "{text}");

    // 8. The run's page, valid after the run ended: the decision history.
    b.goto(&format!("{gw}/runs/{run}")).await;
    let text = b.wait_text("#run-page", "Decision history").await;
    assert!(text.contains("succeeded"), "{text}");
    let history = b.wait_text("#run-page table.history", "bob").await;
    assert!(
        history.contains("dave") && history.contains("signed ✓"),
        "{history}"
    );
    assert!(history.contains("looks right"), "{history}");

    // 9. The audit, filtered by approver.
    b.goto(&format!("{gw}/audit?approver=bob")).await;
    let text = b.wait_text("#audit", &run).await;
    assert!(
        text.contains("signed ✓") && text.contains("approve"),
        "{text}"
    );
    b.goto(&format!("{gw}/audit?approver=carol")).await;
    b.wait_text("#audit-note", "No decision matches.").await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_through_the_identity_provider_then_approving() {
    use slipway_e2e::oidc_provider::Provider;
    let Some((driver, chromium)) = browser() else {
        return;
    };
    // Erin is no configured approver: the provider alone vouches for her and her group, and
    // the deployer counts her approval on the gateway's signature of both.
    let idp = Provider::start(
        "slipway",
        "s3cret",
        &[("erin", &["release-managers"]), ("carol", &["interns"])],
    )
    .await;
    let stack = Stack::start_with_config(
        &[
            "slipway-conductor",
            "slipway-builder",
            "slipway-tester",
            "slipway-deployer",
            "slipway-approval",
        ],
        &[],
        "",
        &format!(
            "[gateway.oidc]\nissuer = \"{}\"\nclient_id = \"slipway\"\nclient_secret = \"s3cret\"\n",
            idp.issuer
        ),
    );
    stack.wait_gateway();
    let gw = stack.gateway_url();
    let counts = stack.dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let dir = project(
        stack.dir.path(),
        "page",
        &SPEC.replace("@COUNTS@", &counts.display().to_string()),
        &[],
    );
    let run = stack.submit_as(&dir, "alice");
    stack.wait_phase(&run, "awaiting_approval", LONG);

    let b = Browser::start(&driver, &chromium).await;
    b.goto(&format!("{gw}/runs/{run}")).await;
    b.wait_text(&format!("#run-{run}"), "approval:production")
        .await;
    // Signing in, at the provider, and back to the run's page.
    b.click("#signin").await;
    b.click("#login-erin").await;
    b.wait_text("#who", "Signed in as erin (release-managers)")
        .await;
    let url = b.session_call("GET", "/url", None).await;
    assert_eq!(url, format!("{gw}/runs/{run}"));
    // The session cookie is not readable by the page's script.
    let cookies = b.exec("return document.cookie;").await;
    assert!(
        !cookies
            .as_str()
            .unwrap_or_default()
            .contains("slipway_session"),
        "{cookies}"
    );
    b.click(&format!("#run-{run} button.approve")).await;
    b.wait_text(&format!("#run-{run} .result"), "Recorded: approve by erin")
        .await;
    let status = stack.wait_phase(&run, "succeeded", LONG);
    assert_eq!(status["approvals"][0]["approver"], "erin");
    let prod = std::fs::read_to_string(counts.join("production")).unwrap();
    assert_eq!(
        prod.lines().collect::<Vec<_>>(),
        vec![run.as_str()],
        "deployed once"
    );
    b.quit().await;
}
