//! The model under test: an OpenAI-compatible chat-completions endpoint, or a command speaking
//! JSON lines. Bounded concurrency, a per-request timeout and retries with backoff; a model that
//! cannot be reached fails fast with the reason.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::dataset::Item;

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub output: String,
    pub latency_ms: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
}

/// The model cannot be evaluated at all.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

#[derive(Debug, Clone)]
pub enum Model {
    Openai {
        client: reqwest::Client,
        url: String,
        model: String,
        api_key: Option<String>,
    },
    Command {
        argv: Vec<String>,
        env: std::collections::BTreeMap<String, String>,
    },
}

/// Attempts per request (the first plus retries).
const ATTEMPTS: u32 = 3;

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// The judge's instruction: one word back, so the verdict parses without guessing.
pub const JUDGE_SYSTEM: &str = "You judge whether an answer is supported by a context. \
Reply with one word, SUPPORTED or UNSUPPORTED: SUPPORTED if every claim in the answer is \
stated in the context, UNSUPPORTED otherwise.";

/// The judge's verdict on an answer: `Some(true)` when it says the answer is unsupported.
pub fn judge_verdict(reply: &str) -> Option<bool> {
    let r = reply.trim().to_ascii_uppercase();
    if r.starts_with("UNSUPPORTED") {
        Some(true)
    } else if r.starts_with("SUPPORTED") {
        Some(false)
    } else {
        None
    }
}

/// Asks the judge about one grounded answer.
///
/// # Errors
/// The request's failure, or a reply that is neither verdict.
pub async fn judge(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    api_key: Option<&str>,
    context: &str,
    question: &str,
    answer: &str,
) -> Result<bool, String> {
    let item = Item {
        id: "judge".into(),
        messages: Some(vec![
            crate::dataset::Message {
                role: "system".into(),
                content: JUDGE_SYSTEM.into(),
            },
            crate::dataset::Message {
                role: "user".into(),
                content: format!(
                    "Context:\n{context}\n\nQuestion:\n{question}\n\nAnswer:\n{answer}"
                ),
            },
        ]),
        prompt: None,
        expected: None,
        label: None,
        context: None,
        reference: None,
        schema: None,
    };
    let a = ask_openai(client, url, model, api_key, &item).await?;
    judge_verdict(&a.output).ok_or_else(|| {
        format!(
            "the judge answered {:?}, not SUPPORTED or UNSUPPORTED",
            a.output
        )
    })
}

async fn ask_openai(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    api_key: Option<&str>,
    item: &Item,
) -> Result<Answer, String> {
    let body = json!({"model": model, "messages": item.chat(), "temperature": 0});
    let mut delay = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let t0 = Instant::now();
        let mut req = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = api_key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
                if status.is_success() {
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| format!("{url} answered invalid JSON: {e}"))?;
                    let output = v["choices"][0]["message"]["content"]
                        .as_str()
                        .ok_or_else(|| {
                            format!("{url} answered without choices[0].message.content")
                        })?
                        .to_string();
                    let tokens_in = v["usage"]["prompt_tokens"]
                        .as_u64()
                        .unwrap_or_else(|| words(&item.input_text()));
                    let tokens_out = v["usage"]["completion_tokens"]
                        .as_u64()
                        .unwrap_or_else(|| words(&output));
                    return Ok(Answer {
                        output,
                        latency_ms,
                        tokens_in,
                        tokens_out,
                    });
                }
                last = format!(
                    "{url} answered {status}: {}",
                    text.chars().take(200).collect::<String>()
                );
                // Client errors will not improve with a retry.
                if status.is_client_error() && status.as_u16() != 429 {
                    return Err(last);
                }
            }
            Err(e) => last = format!("{url}: {e}"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    Err(last)
}

impl Model {
    /// Answers every item, in item order. Fails fast when the first item cannot be answered
    /// at all (an unreachable endpoint), and when most items fail.
    ///
    /// # Errors
    /// [`Unreachable`] with the reason.
    pub async fn answer_all(
        &self,
        items: &[Item],
        concurrency: usize,
        cwd: &Path,
        timeout: Duration,
    ) -> Result<Vec<Result<Answer, String>>, Unreachable> {
        match self {
            Model::Openai {
                client,
                url,
                model,
                api_key,
            } => {
                // One probe first: an unreachable model fails in seconds, not items × retries.
                let first = ask_openai(client, url, model, api_key.as_deref(), &items[0]).await;
                if let Err(e) = &first {
                    return Err(Unreachable(format!("model unreachable: {e}")));
                }
                let shared =
                    Arc::new((client.clone(), url.clone(), model.clone(), api_key.clone()));
                let rest: Vec<Result<Answer, String>> =
                    futures_util::stream::iter(items[1..].iter().cloned())
                        .map(|item| {
                            let s = shared.clone();
                            async move { ask_openai(&s.0, &s.1, &s.2, s.3.as_deref(), &item).await }
                        })
                        .buffered(concurrency.max(1))
                        .collect()
                        .await;
                let mut all = vec![first];
                all.extend(rest);
                let failed = all.iter().filter(|a| a.is_err()).count();
                if failed * 2 > all.len() {
                    let e = all
                        .iter()
                        .find_map(|a| a.as_ref().err())
                        .cloned()
                        .unwrap_or_default();
                    return Err(Unreachable(format!(
                        "model failing: {failed} of {} requests failed (first error: {e})",
                        all.len()
                    )));
                }
                Ok(all)
            }
            Model::Command { argv, env } => answer_by_command(argv, env, items, cwd, timeout).await,
        }
    }
}

/// The command gets every item as a JSON line on stdin and answers with one line per item:
/// `{"id": ..., "output": ...}` or plain text, in order.
async fn answer_by_command(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
    items: &[Item],
    cwd: &Path,
    timeout: Duration,
) -> Result<Vec<Result<Answer, String>>, Unreachable> {
    let program = &argv[0];
    let program_path = if program.contains('/') && !program.starts_with('/') {
        cwd.join(program)
    } else {
        std::path::PathBuf::from(program)
    };
    let mut child = tokio::process::Command::new(program_path)
        .args(&argv[1..])
        .current_dir(cwd)
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Unreachable(format!("model command {program:?} could not start: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let started = Instant::now();
    let input: String = items
        .iter()
        .map(|i| json!({"id": i.id, "messages": i.chat()}).to_string() + "\n")
        .collect();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
        let _ = stdin.shutdown().await;
    });
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut out = Vec::with_capacity(items.len());
    let read = async {
        while out.len() < items.len() {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    let output = match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.get("output").is_some() => {
                            v["output"].as_str().unwrap_or_default().to_string()
                        }
                        _ => line,
                    };
                    let item = &items[out.len()];
                    out.push(Ok(Answer {
                        tokens_in: words(&item.input_text()),
                        tokens_out: words(&output),
                        output,
                        latency_ms: 0.0,
                    }));
                }
                _ => break,
            }
        }
    };
    if tokio::time::timeout(timeout, read).await.is_err() {
        return Err(Unreachable(format!(
            "model command {program:?} did not answer within {}s",
            timeout.as_secs()
        )));
    }
    let _ = writer.await;
    let _ = child.kill().await;
    if out.len() < items.len() {
        return Err(Unreachable(format!(
            "model command {program:?} answered {} of {} items",
            out.len(),
            items.len()
        )));
    }
    // A batch command has one latency: spread it evenly.
    let per = started.elapsed().as_secs_f64() * 1000.0 / items.len() as f64;
    for a in out.iter_mut().flatten() {
        a.latency_ms = per;
    }
    Ok(out)
}
