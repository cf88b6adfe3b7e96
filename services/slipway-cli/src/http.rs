//! Talking to the approval gateway: `slipway approve`, `slipway rollout`, and the demo's approvals.

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The gateway URL: `--gateway`, `SLIPWAY_GATEWAY_URL`, else the default listen address.
pub fn gateway_url(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("SLIPWAY_GATEWAY_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8080".into())
        .trim_end_matches('/')
        .to_string()
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

/// A run as the gateway serves it.
///
/// # Errors
/// When the gateway is unreachable or answers an error.
pub async fn get_run(gateway: &str, run: &str) -> anyhow::Result<Value> {
    let resp = client()?
        .get(format!("{gateway}/v1/runs/{run}"))
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    let status = resp.status();
    let body: Value = serde_json::from_str(&resp.text().await?).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("no detail")
        );
    }
    Ok(body)
}

/// POSTs `body` as JSON with the bearer token; the gateway's answer, or its status and error.
async fn post_json(gateway: &str, token: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let resp = client()?
        .post(format!("{gateway}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    let status = resp.status();
    let body: Value = serde_json::from_str(&resp.text().await?).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("no detail")
        );
    }
    Ok(body)
}

/// Controls a run's rollout (`pause`, `resume`, `promote`, `abort`); returns the recorded
/// control.
///
/// # Errors
/// The gateway's status and error message when it refuses.
pub async fn control_rollout(
    gateway: &str,
    token: &str,
    run: &str,
    action: &str,
    comment: Option<String>,
) -> anyhow::Result<Value> {
    let body = json!({ "action": action, "comment": comment });
    post_json(gateway, token, &format!("/v1/runs/{run}/rollout"), &body).await
}

/// Records a decision on the run's current artifact; returns the recorded decision.
///
/// # Errors
/// The gateway's status and error message when it refuses.
pub async fn decide(
    gateway: &str,
    token: &str,
    run: &str,
    approve: bool,
    comment: Option<String>,
    digest: Option<String>,
) -> anyhow::Result<Value> {
    let digest = match digest {
        Some(d) => d,
        None => get_run(gateway, run).await?["artifact"]["digest"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("run {run} has no artifact yet"))?,
    };
    let body = json!({
        "decision": if approve { "approve" } else { "reject" },
        "comment": comment,
        "artifact_digest": digest,
    });
    post_json(gateway, token, &format!("/v1/runs/{run}/approvals"), &body).await
}
