//! The model-evaluation gate across real processes, against the demo's model server (compiled
//! here with rustc): a first deployment judged on absolute thresholds alone, sample outputs for
//! reviewers, a worse model blocked, an unreachable model failing fast.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use slipway_e2e::{Stack, project};

const LONG: Duration = Duration::from_secs(90);

struct ModelServer {
    child: Child,
    port: u16,
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model_server_binary(dir: &Path) -> PathBuf {
    let src = slipway_core::testing::workspace_root().join("deploy/demo/model-server/src/main.rs");
    let out = dir.join("model-server");
    let st = Command::new("rustc")
        .args(["--edition", "2024", "-O", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("rustc runs");
    assert!(st.success());
    out
}

fn start_model(bin: &Path, dir: &Path, conf: &str) -> ModelServer {
    let port = slipway_core::exec::server::free_port();
    let conf_path = dir.join(format!("model-{port}.conf"));
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--config"])
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ok = Command::new(bin)
        .args([
            "--wait-healthy",
            &format!("http://127.0.0.1:{port}/healthz"),
            "--timeout",
            "10",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    ModelServer { child, port }
}

fn spec(port: u16) -> String {
    format!(
        r#"
[pipeline]
name = "gated-model"
[build]
command = ["true"]
[gates.model_evaluation]
endpoint = {{ kind = "openai", base_url = "http://127.0.0.1:{port}", model = "demo-model" }}
request_timeout_secs = 5
samples = 6
judge = {{ model = "judge" }}
[[gates.model_evaluation.dataset]]
name = "facts"
path = "qa.jsonl"
[gates.model_evaluation.dataset.thresholds]
exact_match = {{ min = 0.75 }}
hallucination_rate = {{ max = 0.1 }}
"#
    )
}

fn run_with(stack: &Stack, name: &str, port: u16) -> String {
    let dataset = std::fs::read_to_string(
        slipway_core::testing::workspace_root().join("deploy/demo/model-server/eval/qa.jsonl"),
    )
    .unwrap();
    let dir = project(
        stack.dir.path(),
        name,
        &spec(port),
        &[("qa.jsonl", &dataset)],
    );
    let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
    v["run_id"].as_str().unwrap().to_string()
}

fn gate<'a>(status: &'a Value, stage: &str) -> &'a Value {
    status["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} gate in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluation_gate_scores_blocks_and_fails_fast() {
    let stack = Stack::start();
    stack.wait_gateway();
    let bin = model_server_binary(stack.dir.path());

    // A model knowing 16 of 20 facts, first of its pipeline: passes on absolute thresholds.
    let good = start_model(&bin, stack.dir.path(), "version = 1.0.0\nskip = 4\n");
    let run = run_with(&stack, "good", good.port);
    let status = stack.wait_phase(&run, "succeeded", LONG);
    let g = gate(&status, "evaluate");
    assert_eq!(g["verdict"], "pass");
    assert_eq!(g["metrics"]["facts.exact_match"], 0.8);
    assert_eq!(g["metrics"]["facts.hallucination_rate"], 0.0);
    // The judge model (the same server, as a judge) ruled on the 16 grounded answers that were
    // not refusals.
    let details: Value = reqwest::get(format!(
        "{}/v1/runs/{run}/gates/evaluate",
        stack.gateway_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        g["metrics"]["facts.judged_items"], 16.0,
        "{}",
        details["datasets"]["facts"][0]
    );
    let notes: Vec<&str> = g["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["note"].as_str().unwrap())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("first deployment")),
        "{notes:?}"
    );
    // Reviewers get sample outputs: the worst items first, then a seeded random sample.
    let samples: Value = reqwest::get(format!(
        "{}/v1/runs/{run}/gates/evaluate",
        stack.gateway_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let s = samples["samples"].as_array().unwrap();
    assert_eq!(s.len(), 6);
    assert_eq!(s[0]["picked"], "worst");
    assert!(
        s[0]["verdict"].as_str().unwrap().contains("incorrect"),
        "{}",
        s[0]
    );
    assert_eq!(s[0]["got"], "I don't know.");
    assert!(s.iter().any(|x| x["picked"] == "random"));
    assert_eq!(samples["datasets"]["facts"].as_array().unwrap().len(), 20);
    let text = stack.slipway_ok(&["status", &run]);
    assert!(text.contains("gate evaluate: pass"), "{text}");

    // A model knowing 8 of 20: blocked, naming the metric and the bound.
    let worse = start_model(&bin, stack.dir.path(), "version = 1.1.0\nskip = 12\n");
    let run = run_with(&stack, "worse", worse.port);
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("evaluate failed: facts: exact_match 0.4000 < min 0.7500"),
        "{reason}"
    );

    // An unreachable model: a clear failure, long before the stage's timeout.
    let closed = slipway_core::exec::server::free_port();
    let run = run_with(&stack, "unreachable", closed);
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("model unreachable"), "{reason}");
    assert!(reason.contains(&format!("127.0.0.1:{closed}")), "{reason}");
    stack.assert_replay_matches(&run);
    stack.assert_log_meets_schemas().await;
    assert_eq!(
        stack.refusals(),
        Vec::<String>::new(),
        "within least privilege"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_similarity_to_the_reference_is_measured_through_an_embeddings_endpoint() {
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-model-evaluator",
    ]);
    let bin = model_server_binary(stack.dir.path());
    // An OpenAI-compatible /v1/embeddings (a bag-of-words embedding) beside the model.
    let embeddings = slipway_e2e::rollout_app::start_app(
        &stack.dir.path().join("slots"),
        &stack.dir.path().join("flags.json"),
    );
    let dataset = std::fs::read_to_string(
        slipway_core::testing::workspace_root().join("deploy/demo/model-server/eval/qa.jsonl"),
    )
    .unwrap();
    let run = |name: &str, port: u16, base_url: &str| {
        let spec = format!(
            r#"
[pipeline]
name = "{name}"
[build]
command = ["true"]
[gates.model_evaluation]
endpoint = {{ kind = "openai", base_url = "http://127.0.0.1:{port}", model = "demo-model" }}
request_timeout_secs = 5
embeddings = {{ base_url = "{base_url}", model = "bag-of-words" }}
[[gates.model_evaluation.dataset]]
name = "facts"
path = "qa.jsonl"
[gates.model_evaluation.dataset.thresholds]
semantic_similarity = {{ min = 0.9 }}
"#
        );
        let dir = project(stack.dir.path(), name, &spec, &[("qa.jsonl", &dataset)]);
        let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
        v["run_id"].as_str().unwrap().to_string()
    };
    let v1 = format!("{}/v1", embeddings.url);
    // Knowing every fact: each answer is its reference.
    let all = start_model(&bin, stack.dir.path(), "version = 1.0.0\n");
    let ok = stack.wait_phase(&run("knows", all.port, &v1), "succeeded", LONG);
    let g = gate(&ok, "evaluate");
    assert_eq!(g["metrics"]["facts.semantic_similarity"], 1.0, "{g}");
    // Knowing 8 of 20: "I don't know." shares nothing with a reference; below the bound.
    let few = start_model(&bin, stack.dir.path(), "version = 1.1.0\nskip = 12\n");
    let failed = stack.wait_phase(&run("forgets", few.port, &v1), "failed", LONG);
    let g = gate(&failed, "evaluate");
    let sim = g["metrics"]["facts.semantic_similarity"].as_f64().unwrap();
    assert!((0.3..0.5).contains(&sim), "{g}");
    let check = g["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metric"] == "semantic_similarity")
        .unwrap();
    assert_eq!(check["verdict"], "fail", "{check}");
    // An endpoint that is not there: the check fails and says why.
    let broken = stack.wait_phase(
        &run("no-embeddings", all.port, "http://127.0.0.1:9/v1"),
        "failed",
        LONG,
    );
    let g = gate(&broken, "evaluate");
    let notes = g["checks"].to_string();
    assert!(notes.contains("the embeddings endpoint failed"), "{notes}");
}

/// `n` sums "What is A + B?" from `from` on, as a dataset; the values each item adds up to.
fn sums(from: u64, n: u64) -> (String, Vec<(String, u64)>) {
    let mut text = String::new();
    let mut values = Vec::new();
    for i in from..from + n {
        let (a, b) = (i * 7 % 50 + 10, i * 3 % 41 + 3);
        let id = format!("sum-{i}");
        text.push_str(
            &serde_json::json!({"id": id, "prompt": format!("What is {a} + {b}?"), "expected": (a + b).to_string()})
                .to_string(),
        );
        text.push('\n');
        values.push((id, a + b));
    }
    (text, values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_model_is_calibrated_and_its_gate_keeps_its_aa_block_rate() {
    let stack = Stack::start_with(&[
        "slipway-conductor",
        "slipway-builder",
        "slipway-deployer",
        "slipway-model-evaluator",
    ]);
    let bin = model_server_binary(stack.dir.path());
    // Like a sampled LLM: a fifth of the questions (the sums that are multiples of 5) get a
    // wrong answer half the time, drawn anew on every request. The seed and one request at a
    // time make the draws the same on every run of this test.
    let noisy = start_model(
        &bin,
        stack.dir.path(),
        "version = 1.0.0\nsums = true\nnoise = 0.5\nunsure_every = 5\nseed = 20261204\n",
    );
    let (a, a_values) = sums(0, 100);
    let (b, b_values) = sums(100, 100);
    let spec = |port: u16| {
        format!(
            r#"
[pipeline]
name = "noisy"
[build]
command = ["true"]
[[environment]]
name = "production"
[environment.deploy]
command = ["true"]
[gates.model_evaluation]
endpoint = {{ kind = "openai", base_url = "http://127.0.0.1:{port}", model = "sums" }}
request_timeout_secs = 5
concurrency = 1
repeats = 5
[[gates.model_evaluation.dataset]]
name = "early"
path = "a.jsonl"
[gates.model_evaluation.dataset.thresholds]
exact_match = {{ min = 0.5, max_regression = 0.02 }}
f1 = {{ max_regression = 0.02 }}
[[gates.model_evaluation.dataset]]
name = "late"
path = "b.jsonl"
[gates.model_evaluation.dataset.thresholds]
exact_match = {{ min = 0.5, max_regression = 0.02 }}
f1 = {{ max_regression = 0.02 }}
"#
        )
    };
    let submit = |name: &str, port: u16| {
        let dir = project(
            stack.dir.path(),
            name,
            &spec(port),
            &[("a.jsonl", &a), ("b.jsonl", &b)],
        );
        let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
        v["run_id"].as_str().unwrap().to_string()
    };
    let unsure = |values: &[(String, u64)]| -> Vec<String> {
        values
            .iter()
            .filter(|(_, v)| v % 5 == 0)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let unsure_ids = [unsure(&a_values), unsure(&b_values)];

    // The first deployment: no baseline; the calibration already records the noise.
    let first = submit("first", noisy.port);
    let status = stack.wait_phase(&first, "succeeded", LONG);
    let cal = &status["calibrations"][0];
    assert_eq!(cal["repeats"], 5, "{status}");
    for ds in cal["datasets"].as_array().unwrap() {
        let unsure = match ds["dataset"].as_str().unwrap() {
            "early" => &unsure_ids[0],
            "late" => &unsure_ids[1],
            other => panic!("no dataset {other}"),
        };
        // Items are listed as unstable only where the model is unsure, and most of those are
        // caught by five answers (a coin comes up the same five times one time in sixteen).
        let listed: Vec<&str> = ds["unstable_items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        assert!(
            listed.iter().all(|id| unsure.iter().any(|u| u == id)),
            "{listed:?} against {unsure:?}"
        );
        assert!(listed.len() * 10 >= unsure.len() * 7, "{ds}");
        assert_eq!(ds["unstable"], listed.len());
        let em = &ds["metrics"]["exact_match"];
        let flip = em["flip_rate"].as_f64().unwrap();
        // Half-coins on a fifth of the items: two single answers disagree on about 10%.
        assert!((0.05..0.16).contains(&flip), "{em}");
        assert!(em["majority_flip_rate"].as_f64().unwrap() < flip, "{em}");
    }

    // The same model again, five times: four paired checks each time (two metrics, two
    // datasets), none blocks, and each reports its interval and what it can detect.
    for i in 0..5 {
        let run = submit(&format!("again-{i}"), noisy.port);
        let status = stack.wait_phase(&run, "succeeded", LONG);
        let g = gate(&status, "evaluate");
        let checks: Vec<&Value> = g["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["p_value"].is_number())
            .collect();
        assert_eq!(checks.len(), 4, "{g}");
        for c in checks {
            assert!(
                c["interval"].is_array() && c["detectable"].is_number(),
                "{c}"
            );
            assert_ne!(c["verdict"], "fail", "{c}");
            assert!(
                c["note"]
                    .as_str()
                    .unwrap()
                    .contains("Holm-adjusted over 4 tests"),
                "{c}"
            );
            if c["metric"] == "exact_match" {
                let note = c["note"].as_str().unwrap();
                assert!(note.contains("share of 5 answers"), "{note}");
                assert!(note.contains("measured noise"), "{note}");
                // 100 items with this noise cannot see 2 points, and the check says so.
                assert!(
                    note.contains("cannot detect a regression of 0.020"),
                    "{note}"
                );
            }
        }
        let text = stack.slipway_ok(&["status", &run]);
        assert!(text.contains("detects ≥"), "{text}");
        assert!(
            text.contains("calibration evaluate (attempt 1): 5 answers per item"),
            "{text}"
        );
    }

    // A model unsure of half the questions (not a fifth): blocked on what it lost.
    let worse = start_model(
        &bin,
        stack.dir.path(),
        "version = 1.1.0\nsums = true\nnoise = 0.5\nunsure_every = 2\nseed = 7\n",
    );
    let run = submit("worse", worse.port);
    let status = stack.wait_phase(&run, "failed", LONG);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("exact_match"), "{reason}");
    let g = gate(&status, "evaluate");
    let blocked: Vec<&Value> = g["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["metric"] == "exact_match" && c["verdict"] == "fail")
        .collect();
    assert!(!blocked.is_empty(), "{g}");
    for c in blocked {
        let note = c["note"].as_str().unwrap();
        assert!(
            note.contains("sign-flip p=") && note.contains("share of 5 answers"),
            "{note}"
        );
        assert!(c["interval"][1].as_f64().unwrap() < 0.0, "{c}");
    }
    stack.assert_replay_matches(&run);
    stack.assert_log_meets_schemas().await;
    assert_eq!(
        stack.refusals(),
        Vec::<String>::new(),
        "within least privilege"
    );
}
