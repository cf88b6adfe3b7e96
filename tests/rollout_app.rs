//! The service a rollout test rolls out: simulated users whose requests follow the flagd flag
//! file's split between the `stable` and `candidate` slots (each slot's version is a file the
//! deploy command writes), an HTTP endpoint with Prometheus counters labelled by variant, and
//! the pipeline that deploys it. Used by `tests/rollout.rs` and the golden log recorder.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// How each quality of version behaves: error probability, probability of positive feedback.
fn behaviour(quality: &str) -> (f64, f64) {
    match quality {
        "bad" => (0.30, 0.40),
        "better" => (0.01, 0.70),
        _ => (0.01, 0.40),
    }
}

/// What a version answers to question `k`: the good ones the same, a `paraphrase` in other
/// words, a `bad` one something else.
fn answer(quality: &str, k: u64) -> String {
    match quality {
        "paraphrase" => format!("For question {k}, the answer is {}.", k * 7),
        "bad" => format!("Sorry, I cannot help with that ({k})."),
        _ => format!("The answer to question {k} is {}.", k * 7),
    }
}

/// Counters by variant, and the mirrored pairs of a shadow rollout.
#[derive(Default)]
struct Counters {
    requests: BTreeMap<&'static str, u64>,
    errors: BTreeMap<&'static str, u64>,
    feedback: BTreeMap<&'static str, u64>,
    liked: BTreeMap<&'static str, u64>,
    /// `(seq, stable's answer, candidate's answer)`.
    pairs: Vec<(u64, String, String)>,
}

/// An embedding by the hashing trick: each word adds one to one of 256 dimensions. Words in
/// common make two texts' vectors closer: a real, if lexical, similarity.
pub fn bag_of_words(text: &str) -> Vec<f64> {
    let mut v = vec![0.0; 256];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in word.to_lowercase().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        v[(h % 256) as usize] += 1.0;
    }
    v
}

/// The service under rollout: simulated users whose requests follow the flag file's split,
/// and an HTTP endpoint with `/metrics` and `/healthz`. Stops when dropped.
#[derive(Debug)]
pub struct App {
    pub url: String,
    stop: Arc<AtomicBool>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The candidate's share in basis points, from the flagd flag file (0 while there is none).
pub fn weight_of(flags: &Path) -> u64 {
    flag_of(flags).0
}

/// The candidate's share and whether the flag is a shadow's (its metadata's `mode`).
pub fn flag_of(flags: &Path) -> (u64, bool) {
    let Ok(text) = std::fs::read_to_string(flags) else {
        return (0, false);
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return (0, false);
    };
    let Some(flag) = v["flags"].as_object().and_then(|f| f.values().next()) else {
        return (0, false);
    };
    (
        flag["targeting"]["fractional"][1][1].as_u64().unwrap_or(0),
        flag["metadata"]["mode"] == "shadow",
    )
}

pub fn start_app(state: &Path, flags: &Path) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Mutex::new(Counters::default()));
    // Users: 20 requests every 20 ms, each to the candidate with the flag's probability.
    {
        let (counters, stop, state, flags) = (
            counters.clone(),
            stop.clone(),
            state.to_path_buf(),
            flags.to_path_buf(),
        );
        std::thread::spawn(move || {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut unit = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64
            };
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                let (w, shadow) = flag_of(&flags);
                let w = w as f64 / 10_000.0;
                let quality = |slot: &str| {
                    std::fs::read_to_string(state.join(slot))
                        .ok()
                        .and_then(|q| q.split_whitespace().next().map(str::to_string))
                };
                let (stable, candidate) = (quality("stable"), quality("candidate"));
                let mut c = counters.lock().unwrap();
                for _ in 0..20 {
                    if shadow {
                        // Every request is served by the stable version; a share is copied to
                        // the candidate, whose answer is kept beside the stable one's.
                        let (Some(sq), Some(cq)) = (stable.as_deref(), candidate.as_deref()) else {
                            continue;
                        };
                        *c.requests.entry("stable").or_default() += 1;
                        if unit() < w {
                            *c.requests.entry("candidate").or_default() += 1;
                            let k = (unit() * 50.0) as u64;
                            seq += 1;
                            c.pairs.push((seq, answer(sq, k), answer(cq, k)));
                        }
                        continue;
                    }
                    let to_candidate = unit() < w;
                    let (variant, q) = if to_candidate {
                        ("candidate", candidate.as_deref())
                    } else {
                        ("stable", stable.as_deref())
                    };
                    // A slot with nothing deployed serves nobody.
                    let Some(q) = q else { continue };
                    let (p_err, p_like) = behaviour(q);
                    *c.requests.entry(variant).or_default() += 1;
                    if unit() < p_err {
                        *c.errors.entry(variant).or_default() += 1;
                    } else {
                        *c.feedback.entry(variant).or_default() += 1;
                        if unit() < p_like {
                            *c.liked.entry(variant).or_default() += 1;
                        }
                    }
                }
                drop(c);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    {
        let stop = stop.clone();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).ok();
                let mut line = String::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the request head, and its body.
                let (mut h, mut length) = (String::new(), 0usize);
                while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    h.clear();
                }
                let mut request = vec![0; length];
                if std::io::Read::read_exact(&mut r, &mut request).is_err() {
                    continue;
                }
                let body = if line.starts_with("POST /v1/embeddings") {
                    // OpenAI's embeddings API, as much of it as a client reads.
                    let req: Value = serde_json::from_slice(&request).unwrap_or_default();
                    let data: Vec<Value> = req["input"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .map(|(i, t)| {
                            serde_json::json!({
                                "object": "embedding",
                                "index": i,
                                "embedding": bag_of_words(t.as_str().unwrap_or_default()),
                            })
                        })
                        .collect();
                    serde_json::json!({"object": "list", "data": data, "model": req["model"]})
                        .to_string()
                } else if let Some(rest) = line.strip_prefix("GET /shadow/pairs") {
                    let after: u64 = rest
                        .split_whitespace()
                        .next()
                        .and_then(|q| q.strip_prefix("?after="))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let c = counters.lock().unwrap();
                    let pairs: Vec<Value> = c
                        .pairs
                        .iter()
                        .filter(|p| p.0 > after)
                        .take(500)
                        .map(|p| serde_json::json!({"seq": p.0, "stable": p.1, "candidate": p.2}))
                        .collect();
                    let last = c.pairs.last().map_or(0, |p| p.0);
                    serde_json::json!({ "pairs": pairs, "last": last }).to_string()
                } else if line.starts_with("GET /metrics") {
                    let c = counters.lock().unwrap();
                    let mut out = String::new();
                    for (name, m) in [
                        ("app_requests_total", &c.requests),
                        ("app_errors_total", &c.errors),
                        ("app_feedback_total", &c.feedback),
                        ("app_feedback_positive_total", &c.liked),
                    ] {
                        out.push_str(&format!("# TYPE {name} counter\n"));
                        for (v, n) in m {
                            out.push_str(&format!("{name}{{variant=\"{v}\"}} {n}\n"));
                        }
                    }
                    out
                } else {
                    "ok\n".to_string()
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
    App { url, stop }
}

/// A pipeline whose production is rolled out with `rollout` (the `[environment.rollout]`
/// table's body, then any sub-tables), its build packing the project's `quality` file (a
/// version whose quality mentions `nopromote` fails its deploy to the stable slot).
pub fn pipeline(name: &str, url: &str, state: &Path, flags: &Path, rollout: &str) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"

[build]
command = ["sh", "-c", "mkdir -p dist && cp quality dist/quality"]
artifacts = ["dist"]
timeout_secs = 60

[[environment]]
name = "production"
url = "{url}"
[environment.deploy]
command = ["sh", "-c", "q=$(find \"$SLIPWAY_ARTIFACT_DIR\" -name quality | head -1); if [ \"$SLIPWAY_SLOT\" = stable ] && grep -q nopromote \"$q\"; then echo 'the stable slot refuses this version' >&2; exit 1; fi; mkdir -p \"$STATE\" && cp \"$q\" \"$STATE/$SLIPWAY_SLOT\""]
env = {{ STATE = "{state}" }}
[environment.traffic]
flag_file = "{flags}"
[environment.rollout]
{rollout}

[approval]
allowed_groups = ["release-managers"]
"#,
        state = state.display(),
        flags = flags.display(),
    )
}

/// The error-ratio analysis every test rollout has.
pub const ERRORS: &str = r#"
[[environment.rollout.analysis]]
name = "errors"
kind = "ratio"
numerator = "app_errors_total"
denominator = "app_requests_total"
tolerance = 0.02
"#;
