//! A client of an OpenAI-compatible `/v1/embeddings` endpoint, for semantic similarity.

use std::time::Duration;

use serde_json::{Value, json};
use slipway_domain::embeddings::EmbeddingsSpec;

/// Inputs per request: endpoints cap their batch size.
const BATCH: usize = 64;

/// The embedding of each input, in order.
///
/// # Errors
/// The endpoint's failure or an answer that does not fit, naming the URL.
pub async fn embed(
    client: &reqwest::Client,
    spec: &EmbeddingsSpec,
    inputs: &[String],
) -> Result<Vec<Vec<f64>>, String> {
    let url = spec.url();
    let key = spec
        .api_key_env
        .as_ref()
        .map(|k| std::env::var(k).map_err(|_| format!("{k} (the embeddings API key) is not set")))
        .transpose()?;
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(BATCH) {
        let body = json!({ "model": spec.model, "input": chunk });
        let mut delay = Duration::from_millis(200);
        let mut answer = Err(String::new());
        for _ in 0..3 {
            let mut req = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(k) = &key {
                req = req.header("authorization", format!("Bearer {k}"));
            }
            answer = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    r.bytes().await.map_err(|e| format!("{url}: {e}"))
                }
                Ok(r) => Err(format!("{url} answered {}", r.status())),
                Err(e) => Err(format!("{url}: {e}")),
            };
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let v: Value =
            serde_json::from_slice(&answer?).map_err(|e| format!("{url}: not JSON: {e}"))?;
        let mut data: Vec<(u64, Vec<f64>)> = v["data"]
            .as_array()
            .ok_or_else(|| format!("{url}: no `data` in the answer"))?
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let vector = d["embedding"]
                    .as_array()
                    .ok_or_else(|| format!("{url}: data[{i}] has no `embedding`"))?
                    .iter()
                    .map(|x| {
                        x.as_f64()
                            .ok_or_else(|| format!("{url}: data[{i}]: not numbers"))
                    })
                    .collect::<Result<Vec<f64>, String>>()?;
                Ok((d["index"].as_u64().unwrap_or(i as u64), vector))
            })
            .collect::<Result<_, String>>()?;
        if data.len() != chunk.len() {
            return Err(format!(
                "{url}: {} embeddings for {} inputs",
                data.len(),
                chunk.len()
            ));
        }
        data.sort_by_key(|d| d.0);
        out.extend(data.into_iter().map(|d| d.1));
    }
    Ok(out)
}
