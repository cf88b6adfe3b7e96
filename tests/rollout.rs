//! Progressive delivery end to end: real services, a real nats-server, a deploy command that
//! puts each version in its slot, and a service (in this test process) whose traffic follows
//! the flagd flag file the judge writes, its Prometheus counters labelled by variant.
//!
//! - a canary of a defective version is aborted at its first step: the weight is back at 0, the
//!   candidate slot rolled back, the run `rolled_back`;
//! - a canary of a good version goes through every step and is promoted, with the judge killed
//!   in the middle of a step (it resumes from the log, no step repeated or skipped);
//! - an A/B experiment decides for the better variant and promotes it;
//! - a person pauses and aborts a rollout through `slipway rollout` and the gateway.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use slipway_e2e::rollout_app::{App, ERRORS, pipeline, start_app, weight_of};
use slipway_e2e::{Stack, project};

const SERVICES: &[&str] = &[
    "slipway-conductor",
    "slipway-builder",
    "slipway-deployer",
    "slipway-monitor",
    "slipway-approval",
];

const LONG: Duration = Duration::from_secs(120);

struct Env {
    dir: PathBuf,
    state: PathBuf,
    flags: PathBuf,
    app: App,
}

fn env(stack: &Stack, name: &str) -> Env {
    let dir = stack.dir.path().join(name);
    let state = dir.join("slots");
    let flags = dir.join("flags/flags.json");
    std::fs::create_dir_all(&state).unwrap();
    let app = start_app(&state, &flags);
    Env {
        dir,
        state,
        flags,
        app,
    }
}

/// Submits the project with `quality` in its source; the run id.
fn submit(stack: &Stack, project_dir: &Path, quality: &str) -> String {
    std::fs::write(project_dir.join("quality"), quality).unwrap();
    let v = stack.slipway_json(&["submit", project_dir.join("slipway.toml").to_str().unwrap()]);
    v["run_id"].as_str().expect("run id").to_string()
}

fn stage<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no stage {name} in {status}"))
}

fn rollout(status: &Value) -> &Value {
    &status["rollouts"][0]
}

/// `(step, weight, cause)` of each weight change.
fn weights(status: &Value) -> Vec<(u64, f64, String)> {
    rollout(status)["weights"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["step"].as_u64().unwrap(),
                w["weight"].as_f64().unwrap(),
                w["cause"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn slot(e: &Env, slot: &str) -> String {
    std::fs::read_to_string(e.state.join(slot)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_is_aborted_at_its_first_step_and_a_good_one_promoted_through_a_judge_restart()
{
    let mut stack = Stack::start_with(SERVICES);
    stack.wait_gateway();
    let e = env(&stack, "canary");
    let spec = pipeline(
        "canary",
        &e.app.url,
        &e.state,
        &e.flags,
        &format!(
            "strategy = \"canary\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 40\n\
             steps = [{{ weight = 5, duration_secs = 2 }}, {{ weight = 25, duration_secs = 4 }}, {{ weight = 50, duration_secs = 2 }}]\n{ERRORS}"
        ),
    );
    let dir = project(&e.dir, "project", &spec, &[]);

    // The first deploy has nothing in service to compare with: promoted at once.
    let first = submit(&stack, &dir, "good 1");
    let done = stack.wait_phase(&first, "succeeded", LONG);
    assert_eq!(
        weights(&done),
        [(3, 100.0, "promote".into()), (3, 0.0, "promoted".into())],
        "{done}"
    );
    assert!(slot(&e, "stable").starts_with("good 1"));
    assert_eq!(weight_of(&e.flags), 0);

    // A defective version: 30% errors against 1%, seen at the 5% step and aborted there.
    let bad = submit(&stack, &dir, "bad 2");
    let rb = stack.wait_phase(&bad, "rolled_back", LONG);
    let ws = weights(&rb);
    assert_eq!(ws.first(), Some(&(0, 5.0, "step".to_string())), "{rb}");
    assert_eq!(ws.last(), Some(&(0, 0.0, "abort".to_string())), "{rb}");
    assert!(
        ws.iter().all(|(_, w, _)| *w <= 5.0),
        "the other 95% never saw it: {ws:?}"
    );
    let looks = rollout(&rb)["looks"].as_array().unwrap();
    let last = looks.last().unwrap();
    assert_eq!(last["decision"], "abort", "{last}");
    assert_eq!(last["comparisons"][0]["verdict"], "fail", "{last}");
    assert!(
        rb["reason"].as_str().unwrap().contains("rolled back to"),
        "{rb}"
    );
    assert_eq!(stage(&rb, "rollout:production")["status"], "failed");
    assert_eq!(stage(&rb, "rollback:production")["status"], "succeeded");
    assert_eq!(stage(&rb, "promote:production")["status"], "cancelled");
    assert_eq!(weight_of(&e.flags), 0);
    assert!(
        slot(&e, "candidate").starts_with("good 1"),
        "the candidate slot is rolled back to the version in service"
    );
    assert!(slot(&e, "stable").starts_with("good 1"));

    // A good version through every step, with the judge killed in the middle of the second.
    let good = submit(&stack, &dir, "good 3");
    stack.wait_for(&good, LONG, |s| {
        weights(s)
            .iter()
            .any(|(step, _, c)| *step == 1 && c == "step")
    });
    stack.service("slipway-monitor").kill();
    std::thread::sleep(Duration::from_millis(500));
    stack.spawn("slipway-monitor");
    let ok = stack.wait_phase(&good, "succeeded", LONG);
    let steps: Vec<(u64, f64, String)> = weights(&ok);
    assert_eq!(
        steps,
        [
            (0, 5.0, "step".into()),
            (1, 25.0, "step".into()),
            (2, 50.0, "step".into()),
            (3, 100.0, "promote".into()),
            (3, 0.0, "promoted".into()),
        ],
        "each step once, in order, through the restart"
    );
    let looks = rollout(&ok)["looks"].as_array().unwrap();
    // Looked at in step order: the restarted judge went on with the second step (a repeated
    // first step would have looked at it again after the second's looks).
    let order: Vec<u64> = looks.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    // The second step's clock ran on through the restart (it began when its weight was set).
    let second: Vec<u64> = looks
        .iter()
        .filter(|l| l["step"] == 1)
        .map(|l| l["elapsed_secs"].as_u64().unwrap())
        .collect();
    assert!(second.windows(2).all(|w| w[0] <= w[1]), "{second:?}");
    assert!(
        stack.logs().contains("Resuming the rollout from the log"),
        "the judge was restarted mid-rollout"
    );
    for step in 0..3 {
        assert!(
            looks
                .iter()
                .any(|l| l["step"] == step && l["decision"] == "promote"),
            "step {step} was judged and passed: {looks:?}"
        );
    }
    assert_eq!(stage(&ok, "promote:production")["status"], "succeeded");
    assert!(slot(&e, "stable").starts_with("good 3"));
    assert_eq!(weight_of(&e.flags), 0, "traffic is back on the stable slot");
    for run in [&first, &bad, &good] {
        stack.assert_replay_matches(run);
    }
    stack.assert_log_meets_schemas().await;
    assert!(stack.refusals().is_empty(), "{:?}", stack.refusals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ab_experiment_promotes_the_better_variant_and_people_and_cancellations_stop_rollouts() {
    let stack = Stack::start_with(SERVICES);
    stack.wait_gateway();
    let e = env(&stack, "ab");
    let spec = pipeline(
        "ab",
        &e.app.url,
        &e.state,
        &e.flags,
        &format!(
            "strategy = \"ab\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 200\n{ERRORS}\n\
             [[environment.rollout.analysis]]\nname = \"liked\"\nkind = \"ratio\"\nnumerator = \"app_feedback_positive_total\"\n\
             denominator = \"app_feedback_total\"\nhigher_is_better = true\n\
             [environment.rollout.ab]\nmetric = \"liked\"\nmin_effect = 0.1\nweight = 50\nmax_duration_secs = 60\n"
        ),
    );
    let dir = project(&e.dir, "project", &spec, &[]);
    let first = submit(&stack, &dir, "good 1");
    stack.wait_phase(&first, "succeeded", LONG);
    // 70% liked against 40%: the experiment finds the candidate better and promotes it.
    let better = submit(&stack, &dir, "better 2");
    let won = stack.wait_phase(&better, "succeeded", LONG);
    let last = rollout(&won)["looks"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["decision"], "promote", "{last}");
    assert_eq!(last["ab"]["winner"], "candidate", "{last}");
    let effect = last["ab"]["effect"].as_f64().unwrap();
    let iv = &last["ab"]["interval"];
    assert!(
        effect > 0.2 && iv[0].as_f64().unwrap() > 0.0 && iv[1].as_f64().unwrap() > effect,
        "{last}"
    );
    assert!(last["ab"]["p_value"].as_f64().unwrap() <= 0.05);
    assert!(slot(&e, "stable").starts_with("better 2"));

    // A canary of another pipeline, held by a person, then aborted.
    let c = env(&stack, "held");
    let spec = pipeline(
        "held",
        &c.app.url,
        &c.state,
        &c.flags,
        &format!(
            "strategy = \"canary\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 40\n\
             steps = [{{ weight = 10, duration_secs = 600 }}]\n{ERRORS}"
        ),
    );
    let dir = project(&c.dir, "project", &spec, &[]);
    let base = submit(&stack, &dir, "good 1");
    stack.wait_phase(&base, "succeeded", LONG);
    let held = submit(&stack, &dir, "good 2");
    stack.wait_phase(&held, "rolling_out", LONG);
    // An intern may not; a release manager may.
    let denied = stack.slipway(&["rollout", &held, "pause", "--token", "carol-token"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let bad_action = stack.slipway(&["rollout", &held, "explode", "--token", "bob-token"]);
    assert!(
        String::from_utf8_lossy(&bad_action.stderr).contains("not one of pause"),
        "{}",
        String::from_utf8_lossy(&bad_action.stderr)
    );
    stack.slipway_ok(&[
        "rollout",
        &held,
        "pause",
        "--token",
        "bob-token",
        "--comment",
        "checking dashboards",
    ]);
    let paused = stack.wait_for(&held, LONG, |s| rollout(s)["paused"] == true);
    assert_eq!(rollout(&paused)["controls"][0]["by"], "bob");
    // Paused, the judge looks no more (it looks every second otherwise).
    std::thread::sleep(Duration::from_millis(1500));
    let looks = |s: &Value| rollout(s)["looks"].as_array().map_or(0, Vec::len);
    let before = looks(&stack.status(&held).unwrap());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        looks(&stack.status(&held).unwrap()),
        before,
        "no look while paused"
    );
    let shown = stack.slipway_ok(&["rollout", &held]);
    assert!(
        shown.contains("(paused)") && shown.contains("pause by bob"),
        "{shown}"
    );
    stack.slipway_ok(&["rollout", &held, "abort", "--token", "bob-token"]);
    let aborted = stack.wait_phase(&held, "rolled_back", LONG);
    assert!(
        aborted["reason"]
            .as_str()
            .unwrap()
            .contains("aborted by bob"),
        "{aborted}"
    );
    assert_eq!(weight_of(&c.flags), 0);
    // Nothing is left to control.
    let after = stack.slipway(&["rollout", &held, "resume", "--token", "bob-token"]);
    assert!(String::from_utf8_lossy(&after.stderr).contains("no rollout in progress"));
    // A run cancelled mid-rollout takes the candidate's traffic with it.
    let cancelled = submit(&stack, &dir, "good 3");
    stack.wait_for(&cancelled, LONG, |s| {
        s["phase"] == "rolling_out" && rollout(s)["weight"] == 10.0
    });
    assert_eq!(weight_of(&c.flags), 1000);
    stack.slipway_ok(&["cancel", &cancelled, "--reason", "wrong model"]);
    stack.wait_phase(&cancelled, "cancelled", LONG);
    let deadline = std::time::Instant::now() + LONG;
    while weight_of(&c.flags) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the weight stayed up after the run ended\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for run in [&first, &better, &held, &cancelled] {
        stack.assert_replay_matches(run);
    }
    stack.assert_log_meets_schemas().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_compares_mirrored_answers_by_agreement_and_similarity() {
    let stack = Stack::start_with(SERVICES);
    stack.wait_gateway();
    let e = env(&stack, "shadow");
    let spec = pipeline(
        "shadow",
        &e.app.url,
        &e.state,
        &e.flags,
        &format!(
            "strategy = \"shadow\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 40\n{ERRORS}\n\
             [environment.rollout.shadow]\nshare = 20\nduration_secs = 3\nmin_pairs = 100\nmin_agreement = 0.8\nmin_similarity = 0.9\n\
             embeddings = {{ base_url = \"{}/v1\", model = \"bag-of-words\" }}\n",
            e.app.url
        ),
    );
    let dir = project(&e.dir, "project", &spec, &[]);
    let first = submit(&stack, &dir, "good 1");
    stack.wait_phase(&first, "succeeded", LONG);

    // The same answers in the candidate: mirrored, compared, promoted. Nobody was served by it.
    let same = submit(&stack, &dir, "good 2");
    let s = stack.wait_for(&same, LONG, |s| {
        s["phase"] == "rolling_out" && rollout(s)["weight"] == 20.0
    });
    assert_eq!(weights(&s)[0], (0, 20.0, "step".into()));
    let flag: Value = serde_json::from_str(&std::fs::read_to_string(&e.flags).unwrap()).unwrap();
    assert_eq!(
        flag["flags"]["shadow-production"]["metadata"]["mode"],
        "shadow"
    );
    let ok = stack.wait_phase(&same, "succeeded", LONG);
    let last = rollout(&ok)["looks"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["decision"], "promote", "{last}");
    let f = &last["shadow"];
    assert!(f["pairs"].as_u64().unwrap() >= 100, "{f}");
    assert_eq!(f["agreement"], 1.0, "{f}");
    assert!(
        (f["similarity"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{f}"
    );
    assert!(slot(&e, "stable").starts_with("good 2"));

    // Other words for the same answers: similar, but they do not agree: aborted.
    let reworded = submit(&stack, &dir, "paraphrase 3");
    let rb = stack.wait_phase(&reworded, "rolled_back", LONG);
    let last = rollout(&rb)["looks"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["decision"], "abort", "{last}");
    assert_eq!(last["shadow"]["agreement"], 0.0, "{last}");
    let similarity = last["shadow"]["similarity"].as_f64().unwrap();
    assert!(similarity > 0.5 && similarity < 0.9, "{last}");
    assert!(
        rb["reason"].as_str().unwrap().contains("agreement 0.000"),
        "{rb}"
    );
    assert_eq!(weight_of(&e.flags), 0);
    assert!(slot(&e, "candidate").starts_with("good 2"), "rolled back");
    for run in [&first, &same, &reworded] {
        stack.assert_replay_matches(run);
    }
    stack.assert_log_meets_schemas().await;
}

/// Builds one of the demo's dependency-free programs with rustc.
fn build_demo_program(src: &str, out: &Path) {
    let src = slipway_core::testing::workspace_root().join(src);
    let st = std::process::Command::new("rustc")
        .args(["--edition", "2024", "-O", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .expect("rustc runs");
    assert!(st.success(), "{} builds", src.display());
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_router_splits_by_the_flag_keeps_users_on_their_variant_and_mirrors_a_shadow() {
    use slipway_domain::traffic::{Weight, flagd_definition_for};
    let dir = tempfile::tempdir().unwrap();
    let (router, model) = (dir.path().join("router"), dir.path().join("model-server"));
    build_demo_program("deploy/demo/router/src/main.rs", &router);
    build_demo_program("deploy/demo/model-server/src/main.rs", &model);
    let st = std::process::Command::new(&router)
        .arg("--self-test")
        .status()
        .unwrap();
    assert!(st.success(), "the router's self-test");
    let free = slipway_core::exec::server::free_port;
    let serve = |version: &str, skip: u32| {
        let port = free();
        let conf = dir.path().join(format!("{version}.conf"));
        std::fs::write(&conf, format!("version = {version}\nskip = {skip}\n")).unwrap();
        let child = std::process::Command::new(&model)
            .args(["--port", &port.to_string(), "--config"])
            .arg(&conf)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ok = std::process::Command::new(&model)
            .args([
                "--wait-healthy",
                &format!("http://127.0.0.1:{port}/healthz"),
                "--timeout",
                "10",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        (Child(child), port)
    };
    let (_stable, stable_port) = serve("1.0.0", 4);
    let (_candidate, candidate_port) = serve("2.0.0", 0);
    let flags = dir.path().join("flags.json");
    let port = free();
    let _router = Child(
        std::process::Command::new(&router)
            .args(["--port", &port.to_string(), "--flags"])
            .arg(&flags)
            .args([
                "--stable",
                &format!("http://127.0.0.1:{stable_port}"),
                "--candidate",
                &format!("http://127.0.0.1:{candidate_port}"),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the router listens");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Which version answered a user.
    let ask = |user: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/chat/completions"))
                .header("x-user", user)
                .header("content-type", "application/json")
                .body(r#"{"model":"m","messages":[{"role":"user","content":"What is the capital of Peru?"}]}"#)
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            v["model"].as_str().unwrap().to_string()
        }
    };
    let write_flag = |percent: f64, shadow: bool| {
        // As the judge writes it.
        let def =
            flagd_definition_for("demo-production", Weight::percent(percent).unwrap(), shadow);
        std::fs::write(&flags, serde_json::to_vec_pretty(&def).unwrap()).unwrap();
    };
    let metric = |text: &str, name: &str, variant: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{variant=\"{variant}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };

    // No flag yet: everyone on the stable slot.
    for i in 0..50 {
        assert_eq!(ask(format!("early-{i}")).await, "slipway-demo-1.0.0");
    }
    // 30% to the candidate: about 30% of 1,000 users, each staying where they were put.
    write_flag(30.0, false);
    let mut on_candidate = Vec::new();
    for i in 0..1000 {
        if ask(format!("user-{i}")).await == "slipway-demo-2.0.0" {
            on_candidate.push(i);
        }
    }
    let share = on_candidate.len() as f64 / 1000.0;
    assert!((0.25..0.35).contains(&share), "{share}");
    for i in on_candidate.iter().take(20) {
        assert_eq!(
            ask(format!("user-{i}")).await,
            "slipway-demo-2.0.0",
            "user-{i} stays"
        );
    }
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "demo_router_requests_total", "candidate"),
        (on_candidate.len() + 20) as f64,
        "{text}"
    );
    // Feedback counts for the variant the user is on.
    let user = format!("user-{}", on_candidate[0]);
    let fb = http
        .post(format!("{url}/feedback"))
        .body(format!(r#"{{"user":"{user}","positive":true}}"#))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(fb.contains("candidate"), "{fb}");
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "demo_feedback_positive_total", "candidate"),
        1.0
    );

    // A shadow of 50%: every answer the stable's, half the requests copied to the candidate
    // with both answers kept.
    write_flag(50.0, true);
    for i in 0..200 {
        assert_eq!(ask(format!("shadow-{i}")).await, "slipway-demo-1.0.0");
    }
    let pairs: Value = serde_json::from_str(
        &http
            .get(format!("{url}/shadow/pairs?after=0"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let n = pairs["pairs"].as_array().unwrap().len();
    assert!((70..130).contains(&n), "{n} of 200 mirrored");
    assert_eq!(pairs["last"], n as u64);
    // Peru is the 10th fact: both versions know it.
    assert_eq!(pairs["pairs"][0]["stable"], "Lima");
    assert_eq!(pairs["pairs"][0]["candidate"], "Lima");
    let after: Value = serde_json::from_str(
        &http
            .get(format!("{url}/shadow/pairs?after={n}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(after["pairs"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_also_go_to_the_nats_kv_bucket_and_a_routers_own_command() {
    let stack = Stack::start_with(SERVICES);
    stack.wait_gateway();
    let e = env(&stack, "targets");
    let calls = e.dir.join("weights.log");
    let spec = pipeline(
        "targets",
        &e.app.url,
        &e.state,
        &e.flags,
        &format!(
            "strategy = \"canary\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 40\n\
             steps = [{{ weight = 10, duration_secs = 2 }}, {{ weight = 40, duration_secs = 2 }}]\n{ERRORS}"
        ),
    )
    .replace(
        &format!("flag_file = \"{}\"\n", e.flags.display()),
        &format!(
            "flag_file = \"{}\"\nkv = true\nflag_key = \"targets-prod\"\n\
             command = [\"sh\", \"-c\", \"echo \\\"$SLIPWAY_FLAG_KEY $SLIPWAY_ENVIRONMENT $SLIPWAY_WEIGHT\\\" >> {}\"]\n",
            e.flags.display(),
            calls.display()
        ),
    );
    let dir = project(&e.dir, "project", &spec, &[]);
    let first = submit(&stack, &dir, "good 1");
    stack.wait_phase(&first, "succeeded", LONG);
    let second = submit(&stack, &dir, "good 2");
    let done = stack.wait_phase(&second, "succeeded", LONG);
    // Every change went to all three targets, in order, and says so in its event.
    let published = &rollout(&done)["weights"][0]["published"];
    assert_eq!(published[0], e.flags.display().to_string(), "{published}");
    assert_eq!(published[1], "kv:slipway-flags/targets-prod", "{published}");
    assert_eq!(published[2], "command:sh", "{published}");
    let lines: Vec<String> = std::fs::read_to_string(&calls)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            "targets-prod production 100",
            "targets-prod production 0",
            "targets-prod production 10",
            "targets-prod production 40",
            "targets-prod production 100",
            "targets-prod production 0",
        ],
        "the first deploy's promotion, then the canary's steps and promotion"
    );
    // The KV bucket holds the flag as the file does: back at 0 after the promotion.
    let js = async_nats::jetstream::new(stack.nats_client().await);
    let kv = js.get_key_value("slipway-flags").await.unwrap();
    let entry = kv.get("targets-prod").await.unwrap().expect("the flag");
    let flag: Value = serde_json::from_slice(&entry).unwrap();
    assert_eq!(
        flag["flags"]["targets-prod"]["targeting"]["fractional"][1],
        serde_json::json!(["candidate", 0])
    );
    assert_eq!(
        flag,
        serde_json::from_str::<Value>(&std::fs::read_to_string(&e.flags).unwrap()).unwrap()
    );
    assert!(stack.refusals().is_empty(), "{:?}", stack.refusals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ab_winner_can_wait_for_an_approver_to_promote_it() {
    let stack = Stack::start_with(SERVICES);
    stack.wait_gateway();
    let e = env(&stack, "approve");
    let spec = pipeline(
        "approve",
        &e.app.url,
        &e.state,
        &e.flags,
        &format!(
            "strategy = \"ab\"\nrequests = \"app_requests_total\"\ninterval_secs = 1\nmin_requests = 200\n{ERRORS}\n\
             [[environment.rollout.analysis]]\nname = \"liked\"\nkind = \"ratio\"\nnumerator = \"app_feedback_positive_total\"\n\
             denominator = \"app_feedback_total\"\nhigher_is_better = true\n\
             [environment.rollout.ab]\nmetric = \"liked\"\nmin_effect = 0.1\nweight = 50\nmax_duration_secs = 60\nwinner = \"approve\"\n"
        ),
    );
    let dir = project(&e.dir, "project", &spec, &[]);
    let first = submit(&stack, &dir, "good 1");
    stack.wait_phase(&first, "succeeded", LONG);
    let better = submit(&stack, &dir, "better 2");
    // Decided for the candidate, the rollout holds at its split for a person.
    let waiting = stack.wait_for(&better, LONG, |s| {
        rollout(s)["looks"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["decision"] == "await_approval"))
    });
    assert_eq!(waiting["phase"], "rolling_out");
    let look = rollout(&waiting)["looks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["decision"] == "await_approval")
        .unwrap()
        .clone();
    assert_eq!(look["ab"]["winner"], "candidate", "{look}");
    std::thread::sleep(Duration::from_secs(3));
    let still = stack.status(&better).unwrap();
    assert_eq!(still["phase"], "rolling_out", "it waits: {still}");
    assert_eq!(weight_of(&e.flags), 5000);
    stack.slipway_ok(&[
        "rollout",
        &better,
        "promote",
        "--token",
        "bob-token",
        "--comment",
        "the result holds",
    ]);
    let done = stack.wait_phase(&better, "succeeded", LONG);
    assert!(slot(&e, "stable").starts_with("better 2"));
    let ended = &done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "rollout:production")
        .unwrap()["status"];
    assert_eq!(ended, "succeeded");
    assert_eq!(weight_of(&e.flags), 0);
    stack.assert_replay_matches(&better);
}
