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
