//! The demo's model server: a tiny OpenAI-compatible chat endpoint, built by Slipway's own
//! pipeline from this file with nothing but `rustc` (no crates), so the demo builds it in
//! seconds.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/embeddings` (a bag-of-words embedding: each
//! word adds one to one of 256 dimensions, so texts sharing words are similar), `GET /healthz`,
//! `GET /metrics` (Prometheus text), `GET /version`. Its behaviour comes from a config file (`model.conf`, `key = value`):
//! - `version`;
//! - `skip = N`: the model does not know the last N facts of its knowledge base (a worse model);
//! - `slow_ms = N`: every answer takes N ms longer (a slower model);
//! - `sums = true`: it also answers "What is A + B?" for any whole numbers (a dataset as large
//!   as a test wants);
//! - `noise = P` with `unsure_every = M` (default 1): a noisy model, like a sampled LLM: on the
//!   questions it is unsure of (the facts whose position, or the sums whose value, is a multiple
//!   of M) each answer is wrong with probability P, drawn anew on every request (`seed = N`
//!   fixes the draws);
//! - `degrade_after_secs = N` with `degrade_only_in = <environment>`: the deliberate defect of
//!   the demo's last change, errors after N seconds of uptime in that environment only, which
//!   only production monitoring sees.
//!
//! Other modes: `--self-test --junit PATH` runs the unit tests and writes a JUnit report;
//! `--wait-healthy URL --timeout SECS` polls a health URL (the deploy script uses it);
//! `--get URL` prints a response body.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Latency histogram bucket bounds, in seconds.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

struct Config {
    version: String,
    degrade_after: Option<Duration>,
    degrade_only_in: Option<String>,
    skip: usize,
    slow: Duration,
    sums: bool,
    noise: f64,
    unsure_every: u64,
    seed: Option<u64>,
}

fn parse_config(text: &str) -> Config {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            map.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    }
    Config {
        version: map.get("version").cloned().unwrap_or_else(|| "0.0.0".into()),
        degrade_after: map
            .get("degrade_after_secs")
            .and_then(|v| v.parse::<f64>().ok())
            .map(Duration::from_secs_f64),
        degrade_only_in: map.get("degrade_only_in").cloned(),
        skip: map.get("skip").and_then(|v| v.parse().ok()).unwrap_or(0),
        slow: Duration::from_millis(map.get("slow_ms").and_then(|v| v.parse().ok()).unwrap_or(0)),
        sums: map.get("sums").is_some_and(|v| v == "true"),
        noise: map.get("noise").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        unsure_every: map.get("unsure_every").and_then(|v| v.parse().ok()).unwrap_or(1).max(1),
        seed: map.get("seed").and_then(|v| v.parse().ok()),
    }
}

/// The noise's draws: one xorshift state for every request thread.
static DRAWS: AtomicU64 = AtomicU64::new(0);

/// A draw in [0, 1).
fn draw() -> f64 {
    let mut x = DRAWS.load(Ordering::Relaxed);
    loop {
        let mut next = x;
        next ^= next << 13;
        next ^= next >> 7;
        next ^= next << 17;
        match DRAWS.compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return (next >> 11) as f64 / (1u64 << 53) as f64,
            Err(now) => x = now,
        }
    }
}

/// "What is A + B?" as (A, B).
fn sum_question(question: &str) -> Option<(u64, u64)> {
    let q = question.trim().trim_end_matches('?').to_lowercase();
    let rest = q.strip_prefix("what is ")?;
    let (a, b) = rest.split_once('+')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration, error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, version: &str) -> String {
        let mut out = String::new();
        out.push_str("# HELP demo_requests_total Requests served.\n# TYPE demo_requests_total counter\n");
        out.push_str(&format!(
            "demo_requests_total{{version=\"{version}\"}} {}\n",
            self.requests.load(Ordering::Relaxed)
        ));
        out.push_str("# HELP demo_request_errors_total Requests answered with an error.\n# TYPE demo_request_errors_total counter\n");
        out.push_str(&format!(
            "demo_request_errors_total{{version=\"{version}\"}} {}\n",
            self.errors.load(Ordering::Relaxed)
        ));
        out.push_str("# HELP demo_request_duration_seconds Request latency.\n# TYPE demo_request_duration_seconds histogram\n");
        for (i, le) in BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "demo_request_duration_seconds_bucket{{le=\"{le}\"}} {}\n",
                self.buckets[i].load(Ordering::Relaxed)
            ));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push_str(&format!("demo_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n"));
        out.push_str(&format!(
            "demo_request_duration_seconds_sum {}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        ));
        out.push_str(&format!("demo_request_duration_seconds_count {count}\n"));
        out
    }
}

struct Server {
    config: Config,
    environment: String,
    started: Instant,
    metrics: Metrics,
}

struct Request {
    method: String,
    path: String,
    body: String,
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The content of the last `"content": "..."` in a chat request: the user's latest message.
fn last_content(body: &str) -> Option<String> {
    let key = "\"content\"";
    let start = body.rfind(key)? + key.len();
    let rest = body[start..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The strings of a JSON request's `input` (one string, or an array of strings).
fn inputs(body: &str) -> Option<Vec<String>> {
    let start = body.find("\"input\"")? + "\"input\"".len();
    let rest = body[start..].trim_start().strip_prefix(':')?.trim_start();
    let (many, mut chars) = match rest.strip_prefix('[') {
        Some(r) => (true, r.chars()),
        None => (false, rest.chars()),
    };
    let mut out = Vec::new();
    loop {
        match chars.by_ref().find(|c| !c.is_whitespace() && *c != ',')? {
            ']' if many => return Some(out),
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            'u' => {
                                let hex: String = chars.by_ref().take(4).collect();
                                s.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                            }
                            other => s.push(other),
                        },
                        c => s.push(c),
                    }
                }
                out.push(s);
                if !many {
                    return Some(out);
                }
            }
            _ => return None,
        }
    }
}

/// The hashing trick over lower-cased words: 256 dimensions.
fn embedding(text: &str) -> Vec<f64> {
    let mut v = vec![0.0; 256];
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in word.to_lowercase().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        v[(h % 256) as usize] += 1.0;
    }
    v
}

/// The knowledge base: what the model can know (the demo's dataset asks about all of it).
const FACTS: &[(&str, &str)] = &[
    ("capital of france", "Paris"),
    ("capital of japan", "Tokyo"),
    ("capital of italy", "Rome"),
    ("capital of spain", "Madrid"),
    ("capital of germany", "Berlin"),
    ("capital of canada", "Ottawa"),
    ("capital of australia", "Canberra"),
    ("capital of egypt", "Cairo"),
    ("capital of kenya", "Nairobi"),
    ("capital of peru", "Lima"),
    ("largest planet", "Jupiter"),
    ("red planet", "Mars"),
    ("2 + 2", "4"),
    ("3 + 5", "8"),
    ("chemical symbol for gold", "Au"),
    ("chemical symbol for iron", "Fe"),
    ("boiling point of water", "100 degrees Celsius"),
    ("longest river", "The Nile"),
    ("author of hamlet", "William Shakespeare"),
    ("reset my password", "Open Settings, choose Security, then Reset password."),
];

/// The judge: `SUPPORTED` when every word of the answer (longer than three letters) appears in
/// the context of a "Context: / Question: / Answer:" prompt.
fn judge(prompt: &str) -> String {
    let lower = prompt.to_lowercase();
    let context = lower
        .split("question:")
        .next()
        .unwrap_or("")
        .trim_start_matches("context:");
    let answer = lower.rsplit("answer:").next().unwrap_or("");
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.len() > 3)
            .map(str::to_string)
            .collect()
    };
    let known = words(context);
    if words(answer).iter().all(|w| known.contains(w)) {
        "SUPPORTED".into()
    } else {
        "UNSUPPORTED".into()
    }
}

/// The "model": answers what it knows (all but the last `skip` facts) and says so otherwise.
fn answer(question: &str, skip: usize) -> String {
    let q = question.to_lowercase();
    for (k, v) in &FACTS[..FACTS.len().saturating_sub(skip)] {
        if q.contains(k) {
            return (*v).to_string();
        }
    }
    "I don't know.".to_string()
}

impl Server {
    /// The model's answer, with its noise.
    fn answer(&self, question: &str) -> String {
        let c = &self.config;
        let (right, position) = match sum_question(question).filter(|_| c.sums) {
            Some((a, b)) => ((a + b).to_string(), Some(a + b)),
            None => {
                let q = question.to_lowercase();
                let at = FACTS.iter().position(|(k, _)| q.contains(k));
                (answer(question, c.skip), at.map(|i| i as u64))
            }
        };
        let unsure = position.is_some_and(|p| p % c.unsure_every == 0);
        if unsure && c.noise > 0.0 && draw() < c.noise {
            return match sum_question(question).filter(|_| c.sums) {
                Some((a, b)) => (a + b + 1).to_string(),
                None => "I don't know.".to_string(),
            };
        }
        right
    }

    fn degraded(&self) -> bool {
        let here = self
            .config
            .degrade_only_in
            .as_ref()
            .is_none_or(|e| *e == self.environment);
        here && self
            .config
            .degrade_after
            .is_some_and(|d| self.started.elapsed() >= d)
    }

    fn handle(&self, req: &Request) -> Response {
        let json = |status: u16, body: String| Response { status, content_type: "application/json", body };
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/healthz") => {
                if self.degraded() {
                    json(503, format!("{{\"status\":\"degraded\",\"version\":\"{}\"}}", self.config.version))
                } else {
                    json(200, format!("{{\"status\":\"ok\",\"version\":\"{}\"}}", self.config.version))
                }
            }
            ("GET", "/version") => json(200, format!("{{\"version\":\"{}\"}}", self.config.version)),
            ("GET", "/metrics") => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: self.metrics.render(&self.config.version),
            },
            ("POST", "/v1/chat/completions") => {
                if self.degraded() {
                    return json(500, "{\"error\":{\"message\":\"model backend exhausted\",\"type\":\"server_error\"}}".into());
                }
                let Some(question) = last_content(&req.body) else {
                    return json(400, "{\"error\":{\"message\":\"messages[].content is required\",\"type\":\"invalid_request_error\"}}".into());
                };
                if !self.config.slow.is_zero() {
                    std::thread::sleep(self.config.slow);
                }
                // Asked to judge (LLM-as-judge), it checks the answer's words against the
                // context, so the demo's pipeline can use it as its judge model.
                let reply = if req.body.contains("SUPPORTED or UNSUPPORTED") {
                    judge(&question)
                } else {
                    self.answer(&question)
                };
                let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let prompt_tokens = question.split_whitespace().count();
                let completion_tokens = reply.split_whitespace().count();
                json(
                    200,
                    format!(
                        "{{\"id\":\"chatcmpl-{created}\",\"object\":\"chat.completion\",\"created\":{created},\"model\":\"slipway-demo-{}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{}\"}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{completion_tokens},\"total_tokens\":{}}}}}",
                        self.config.version,
                        json_escape(&reply),
                        prompt_tokens + completion_tokens
                    ),
                )
            }
            ("POST", "/v1/embeddings") => {
                let Some(texts) = inputs(&req.body) else {
                    return json(400, "{\"error\":{\"message\":\"input (a string or an array of strings) is required\",\"type\":\"invalid_request_error\"}}".into());
                };
                let data: Vec<String> = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let v: Vec<String> = embedding(t).iter().map(|x| format!("{x:.1}")).collect();
                        format!("{{\"object\":\"embedding\",\"index\":{i},\"embedding\":[{}]}}", v.join(","))
                    })
                    .collect();
                json(200, format!("{{\"object\":\"list\",\"model\":\"bag-of-words\",\"data\":[{}]}}", data.join(",")))
            }
            _ => json(404, "{\"error\":{\"message\":\"not found\"}}".into()),
        }
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.split('?').next()?.to_string();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    Some(Request { method, path, body: String::from_utf8_lossy(&body).into_owned() })
}

fn write_response(stream: &mut TcpStream, r: &Response) {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(r.body.as_bytes());
}

fn serve(port: u16, config: Config, environment: String) -> ! {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| {
        eprintln!("model-server: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1)
    });
    eprintln!("model-server {} listening on 127.0.0.1:{port}", config.version);
    let seed = config.seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    DRAWS.store(seed | 1, Ordering::Relaxed);
    let server = Arc::new(Server { config, environment, started: Instant::now(), metrics: Metrics::new() });
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let server = server.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let t0 = Instant::now();
            let Some(req) = read_request(&mut stream) else { return };
            let resp = server.handle(&req);
            write_response(&mut stream, &resp);
            if req.path != "/metrics" {
                server.metrics.observe(t0.elapsed(), resp.status >= 500);
            }
        });
    }
    std::process::exit(0)
}

/// A minimal HTTP GET: (status, body).
fn http_get(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status line")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// The unit tests, as (name, passed, message).
fn self_tests() -> Vec<(&'static str, bool, String)> {
    let mut out = Vec::new();
    let mut check = |name, ok: bool, msg: String| out.push((name, ok, msg));
    let c = parse_config("# demo\nversion = \"2.0.0\"\ndegrade_after_secs = 1.5\nskip = 3\nslow_ms = 7\n");
    check(
        "config_is_read",
        c.version == "2.0.0" && c.degrade_after == Some(Duration::from_millis(1500)) && c.skip == 3 && c.slow == Duration::from_millis(7),
        "a key was not parsed".into(),
    );
    let noisy = parse_config("sums = true\nnoise = 0.5\nunsure_every = 2\nseed = 7\n");
    let server = Server { config: noisy, environment: "x".into(), started: Instant::now(), metrics: Metrics::new() };
    DRAWS.store(7, Ordering::Relaxed);
    let sure = (0..50).all(|_| server.answer("What is 20 + 3?") == "23");
    let unsure: Vec<String> = (0..200).map(|_| server.answer("What is 20 + 2?")).collect();
    let wrong = unsure.iter().filter(|a| *a == "23").count();
    check(
        "noise_falls_on_the_unsure_questions_only",
        sure && unsure.iter().all(|a| a == "22" || a == "23") && (60..140).contains(&wrong),
        format!("sure {sure}, {wrong} of 200 unsure answers wrong"),
    );
    check("knows_capitals", answer("What is the capital of France?", 0) == "Paris", answer("What is the capital of France?", 0));
    check("admits_ignorance", answer("Who won in 1066?", 0) == "I don't know.", answer("Who won in 1066?", 0));
    check("skips_the_last_facts", answer("How do I reset my password?", 1) == "I don't know.", answer("How do I reset my password?", 1));
    let body = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"capital of \"Japan\"?"}]}"#;
    check("reads_the_last_message", last_content(body).as_deref() == Some("capital of \"Japan\"?"), format!("{:?}", last_content(body)));
    check("escapes_json", json_escape("a\"b\\c\n") == "a\\\"b\\\\c\\n", json_escape("a\"b\\c\n"));
    check(
        "judges_support",
        judge("Context:\nParis is the capital.\n\nQuestion:\nCapital?\n\nAnswer:\nParis") == "SUPPORTED"
            && judge("Context:\nParis is the capital.\n\nQuestion:\nCapital?\n\nAnswer:\nLyon, surely") == "UNSUPPORTED",
        "judge verdicts".into(),
    );
    check(
        "reads_embedding_inputs",
        inputs(r#"{"model":"m","input":["a \"b\"", "c"]}"#) == Some(vec!["a \"b\"".into(), "c".into()])
            && inputs(r#"{"input": "one"}"#) == Some(vec!["one".into()])
            && inputs(r#"{"input": 3}"#).is_none(),
        format!("{:?}", inputs(r#"{"model":"m","input":["a \"b\"", "c"]}"#)),
    );
    check(
        "embeds_words",
        embedding("Paris, paris") == {
            let mut v = embedding("paris");
            v.iter_mut().for_each(|x| *x *= 2.0);
            v
        } && embedding("").iter().all(|x| *x == 0.0),
        "bag of words".into(),
    );
    let m = Metrics::new();
    m.observe(Duration::from_millis(3), false);
    m.observe(Duration::from_millis(30), true);
    let text = m.render("1");
    check(
        "renders_prometheus_text",
        text.contains("demo_requests_total{version=\"1\"} 2")
            && text.contains("demo_request_errors_total{version=\"1\"} 1")
            && text.contains("demo_request_duration_seconds_bucket{le=\"+Inf\"} 2"),
        text.clone(),
    );
    out
}

fn junit(results: &[(&str, bool, String)]) -> String {
    let failures = results.iter().filter(|(_, ok, _)| !ok).count();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"model-server\" tests=\"{}\" failures=\"{failures}\">\n",
        results.len()
    );
    for (name, ok, msg) in results {
        if *ok {
            x.push_str(&format!("  <testcase classname=\"model_server\" name=\"{name}\"/>\n"));
        } else {
            let msg = msg.replace('&', "&amp;").replace('<', "&lt;").replace('"', "&quot;");
            x.push_str(&format!("  <testcase classname=\"model_server\" name=\"{name}\"><failure message=\"{msg}\"/></testcase>\n"));
        }
    }
    x.push_str("</testsuite>\n");
    x
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--self-test") {
        let results = self_tests();
        if let Some(path) = arg(&args, "--junit") {
            if let Some(dir) = std::path::Path::new(&path).parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(&path, junit(&results)).expect("write the JUnit report");
        }
        let failed = results.iter().filter(|(_, ok, _)| !ok).count();
        println!("{} passed, {failed} failed", results.len() - failed);
        std::process::exit(i32::from(failed > 0));
    }
    if let Some(url) = arg(&args, "--wait-healthy") {
        let secs: f64 = arg(&args, "--timeout").and_then(|t| t.parse().ok()).unwrap_or(10.0);
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(&url, Duration::from_secs(1)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("model-server: {url} not healthy within {secs}s");
        std::process::exit(1);
    }
    if let Some(url) = arg(&args, "--get") {
        match http_get(&url, Duration::from_secs(5)) {
            Ok((status, body)) => {
                println!("{body}");
                std::process::exit(i32::from(!(200..300).contains(&status)));
            }
            Err(e) => {
                eprintln!("model-server: {url}: {e}");
                std::process::exit(1);
            }
        }
    }
    let port: u16 = arg(&args, "--port").and_then(|p| p.parse().ok()).unwrap_or(8000);
    let conf_path = arg(&args, "--config").unwrap_or_else(|| "model.conf".into());
    let text = std::fs::read_to_string(&conf_path).unwrap_or_else(|e| {
        eprintln!("model-server: cannot read {conf_path}: {e}");
        std::process::exit(1)
    });
    let environment = arg(&args, "--environment").unwrap_or_default();
    serve(port, parse_config(&text), environment);
}
