//! The demo's traffic router: the production entry point of the demo model server, splitting
//! requests between its two slots (`stable`, `candidate`) by the OpenFeature flagd flag file a
//! Slipway rollout writes. One Rust file with no crates, built with `rustc` like the model
//! server.
//!
//! `router --port P --flags FILE --stable URL --candidate URL`
//!
//! - Every request but the router's own is proxied to a slot. The flag's `fractional` weight
//!   is the candidate's share in basis points; each user (the `x-user` header) is bucketed by a
//!   hash of the flag key and the user, so one user stays on one variant while the weight holds.
//!   Without a flag file every request goes to the stable slot.
//! - With the flag's metadata `"mode": "shadow"` every request is answered by the stable slot;
//!   the requests the weight gives the candidate are also sent to it, and both answers are kept:
//!   `GET /shadow/pairs?after=N` → `{"pairs": [{"seq", "stable", "candidate"}], "last": N}`.
//! - `POST /feedback` with `{"user": "...", "positive": true|false}`: counted for the variant
//!   that user is on.
//! - `GET /metrics`: Prometheus text, every family labelled `variant="stable"|"candidate"`:
//!   `demo_router_requests_total`, `demo_router_errors_total`,
//!   `demo_router_request_duration_seconds` (histogram), `demo_feedback_total`,
//!   `demo_feedback_positive_total`; and `demo_shadow_pairs_total`.
//! - `GET /healthz`: the stable slot's health.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
/// Mirrored pairs kept (the oldest go first).
const MAX_PAIRS: usize = 20_000;
const VARIANTS: [&str; 2] = ["stable", "candidate"];

/// What the flag file says now.
#[derive(Debug, Clone, PartialEq)]
struct Flag {
    key: String,
    /// The candidate's share, in basis points.
    weight: u64,
    shadow: bool,
}

/// Reads a flagd flags file as Slipway writes it: the first flag's key, the candidate's
/// fractional weight and the metadata's mode. Anything else reads as all traffic to stable.
fn parse_flag(text: &str) -> Flag {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let key = compact
        .split_once("\"flags\":{\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(k, _)| k.to_string())
        .unwrap_or_default();
    let weight = compact
        .split_once("\"fractional\":")
        .and_then(|(_, rest)| rest.split_once("[\"candidate\","))
        .and_then(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .unwrap_or(0)
        .min(10_000);
    Flag {
        key,
        weight,
        shadow: compact.contains("\"mode\":\"shadow\""),
    }
}

/// FNV-1a: the bucket (0..10,000) of a user for a flag.
fn bucket(flag_key: &str, user: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in flag_key.bytes().chain([0u8]).chain(user.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % 10_000
}

#[derive(Default)]
struct Variant {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    feedback: AtomicU64,
    liked: AtomicU64,
}

struct Router {
    flags: String,
    slots: [String; 2],
    variants: [Variant; 2],
    pairs: Mutex<(u64, Vec<(u64, String, String)>)>,
    mirrored: AtomicU64,
}

struct Request {
    method: String,
    path: String,
    query: String,
    user: String,
    content_type: String,
    body: String,
}

struct Response {
    status: u16,
    content_type: String,
    body: String,
}

fn json(status: u16, body: String) -> Response {
    Response {
        status,
        content_type: "application/json".into(),
        body,
    }
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

/// The string value of the first `"key": "..."` in a JSON text.
fn string_field(body: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let start = body.find(&pat)? + pat.len();
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
                'r' => out.push('\r'),
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

/// One HTTP/1.1 exchange with a slot (`connection: close`): status, content type, body.
fn forward(base: &str, req: &Request) -> Result<(u16, String, String), String> {
    let rest = base.strip_prefix("http://").ok_or("only http:// slots")?;
    let host = rest.split('/').next().unwrap_or(rest);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let path = if req.query.is_empty() { req.path.clone() } else { format!("{}?{}", req.path, req.query) };
    write!(
        s,
        "{} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        req.method,
        if req.content_type.is_empty() { "application/json" } else { &req.content_type },
        req.body.len(),
        req.body
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status line")?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-type").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "application/json".into());
    Ok((status, content_type, body.to_string()))
}

impl Router {
    fn flag(&self) -> Flag {
        std::fs::read_to_string(&self.flags)
            .map(|t| parse_flag(&t))
            .unwrap_or(Flag { key: String::new(), weight: 0, shadow: false })
    }

    /// 0 (stable) or 1 (candidate) for a user under `flag`.
    fn variant_of(flag: &Flag, user: &str) -> usize {
        usize::from(bucket(&flag.key, user) < flag.weight)
    }

    fn observe(&self, v: usize, elapsed: Duration, error: bool) {
        let m = &self.variants[v];
        m.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        for (i, le) in BUCKETS.iter().enumerate() {
            if elapsed.as_secs_f64() <= *le {
                m.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        m.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A request to slot `v`, timed and counted.
    fn call(&self, v: usize, req: &Request) -> Response {
        let t0 = Instant::now();
        let r = forward(&self.slots[v], req);
        let error = r.as_ref().map_or(true, |(s, _, _)| *s >= 500);
        self.observe(v, t0.elapsed(), error);
        match r {
            Ok((status, content_type, body)) => Response { status, content_type, body },
            Err(e) => json(502, format!("{{\"error\":{{\"message\":\"the {} slot: {}\"}}}}", VARIANTS[v], json_escape(&e))),
        }
    }

    fn handle(&self, req: &Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/metrics") => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4".into(),
                body: self.render(),
            },
            ("GET", "/healthz") => {
                let r = forward(&self.slots[0], req);
                match r {
                    Ok((status, content_type, body)) => Response { status, content_type, body },
                    Err(e) => json(503, format!("{{\"status\":\"no stable slot: {}\"}}", json_escape(&e))),
                }
            }
            ("GET", "/shadow/pairs") => self.pairs(&req.query),
            ("POST", "/feedback") => {
                let flag = self.flag();
                let user = string_field(&req.body, "user").unwrap_or_else(|| req.user.clone());
                let compact: String = req.body.chars().filter(|c| !c.is_whitespace()).collect();
                let positive = compact.contains("\"positive\":true");
                let v = if flag.shadow { 0 } else { Self::variant_of(&flag, &user) };
                self.variants[v].feedback.fetch_add(1, Ordering::Relaxed);
                if positive {
                    self.variants[v].liked.fetch_add(1, Ordering::Relaxed);
                }
                json(200, format!("{{\"variant\":\"{}\"}}", VARIANTS[v]))
            }
            _ => {
                let flag = self.flag();
                let v = Self::variant_of(&flag, &req.user);
                if !flag.shadow {
                    return self.call(v, req);
                }
                let served = self.call(0, req);
                if v == 1 {
                    let mirrored = self.call(1, req);
                    let answer = |r: &Response| string_field(&r.body, "content").unwrap_or_else(|| format!("HTTP {}", r.status));
                    let mut p = self.pairs.lock().expect("pairs lock");
                    p.0 += 1;
                    let seq = p.0;
                    p.1.push((seq, answer(&served), answer(&mirrored)));
                    if p.1.len() > MAX_PAIRS {
                        p.1.remove(0);
                    }
                    self.mirrored.fetch_add(1, Ordering::Relaxed);
                }
                served
            }
        }
    }

    fn pairs(&self, query: &str) -> Response {
        let after: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("after="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let p = self.pairs.lock().expect("pairs lock");
        let items: Vec<String> = p
            .1
            .iter()
            .filter(|x| x.0 > after)
            .take(500)
            .map(|(seq, s, c)| {
                format!("{{\"seq\":{seq},\"stable\":\"{}\",\"candidate\":\"{}\"}}", json_escape(s), json_escape(c))
            })
            .collect();
        json(200, format!("{{\"pairs\":[{}],\"last\":{}}}", items.join(","), p.0))
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str, get: &dyn Fn(&Variant) -> u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (v, m) in VARIANTS.iter().zip(&self.variants) {
                out.push_str(&format!("{name}{{variant=\"{v}\"}} {}\n", get(m)));
            }
        };
        family(&mut out, "demo_router_requests_total", "counter", "Requests routed to a variant.", &|m| m.requests.load(Ordering::Relaxed));
        family(&mut out, "demo_router_errors_total", "counter", "Requests a variant answered with an error (or not at all).", &|m| m.errors.load(Ordering::Relaxed));
        family(&mut out, "demo_feedback_total", "counter", "Users' feedback on a variant's answers.", &|m| m.feedback.load(Ordering::Relaxed));
        family(&mut out, "demo_feedback_positive_total", "counter", "Positive feedback on a variant's answers.", &|m| m.liked.load(Ordering::Relaxed));
        out.push_str("# HELP demo_router_request_duration_seconds Latency of a variant's answers.\n# TYPE demo_router_request_duration_seconds histogram\n");
        for (v, m) in VARIANTS.iter().zip(&self.variants) {
            for (i, le) in BUCKETS.iter().enumerate() {
                out.push_str(&format!(
                    "demo_router_request_duration_seconds_bucket{{variant=\"{v}\",le=\"{le}\"}} {}\n",
                    m.buckets[i].load(Ordering::Relaxed)
                ));
            }
            let count = m.requests.load(Ordering::Relaxed);
            out.push_str(&format!("demo_router_request_duration_seconds_bucket{{variant=\"{v}\",le=\"+Inf\"}} {count}\n"));
            out.push_str(&format!(
                "demo_router_request_duration_seconds_sum{{variant=\"{v}\"}} {}\n",
                m.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            ));
            out.push_str(&format!("demo_router_request_duration_seconds_count{{variant=\"{v}\"}} {count}\n"));
        }
        out.push_str("# HELP demo_shadow_pairs_total Requests mirrored to the candidate.\n# TYPE demo_shadow_pairs_total counter\n");
        out.push_str(&format!("demo_shadow_pairs_total {}\n", self.mirrored.load(Ordering::Relaxed)));
        out
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (mut length, mut user, mut content_type) = (0usize, String::from("anonymous"), String::new());
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok()?;
            } else if k.eq_ignore_ascii_case("x-user") {
                user = v.to_string();
            } else if k.eq_ignore_ascii_case("content-type") {
                content_type = v.to_string();
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        user,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn write_response(stream: &mut TcpStream, r: &Response) {
    let head = format!(
        "HTTP/1.1 {} Status\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(r.body.as_bytes());
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// The self-tests (`--self-test`): the flag reading and the bucketing.
fn self_test() -> bool {
    let pretty = "{\n  \"flags\": {\n    \"demo-production\": {\n      \"state\": \"ENABLED\",\n      \"targeting\": {\n        \"fractional\": [\n          [\n            \"stable\",\n            9500\n          ],\n          [\n            \"candidate\",\n            500\n          ]\n        ]\n      },\n      \"metadata\": {\n        \"mode\": \"shadow\"\n      }\n    }\n  }\n}";
    let f = parse_flag(pretty);
    let mut ok = f == Flag { key: "demo-production".into(), weight: 500, shadow: true };
    ok &= parse_flag("not json") == Flag { key: String::new(), weight: 0, shadow: false };
    let on = (0..10_000).filter(|i| bucket("k", &format!("user-{i}")) < 2_000).count();
    ok &= (1_800..2_200).contains(&on);
    ok &= bucket("k", "u") == bucket("k", "u");
    ok &= string_field("{\"message\":{\"content\":\"a \\\"b\\\"\"}}", "content").as_deref() == Some("a \"b\"");
    println!("{}", if ok { "ok" } else { "FAILED" });
    ok
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--self-test") {
        std::process::exit(i32::from(!self_test()));
    }
    let (Some(flags), Some(stable), Some(candidate)) = (arg(&args, "--flags"), arg(&args, "--stable"), arg(&args, "--candidate")) else {
        eprintln!("usage: router --port P --flags FILE --stable URL --candidate URL");
        std::process::exit(2);
    };
    let port: u16 = arg(&args, "--port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| {
        eprintln!("router: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1)
    });
    eprintln!("router listening on 127.0.0.1:{port}: stable {stable}, candidate {candidate}, flags {flags}");
    let router = Arc::new(Router {
        flags,
        slots: [stable.trim_end_matches('/').to_string(), candidate.trim_end_matches('/').to_string()],
        variants: Default::default(),
        pairs: Mutex::new((0, Vec::new())),
        mirrored: AtomicU64::new(0),
    });
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let router = router.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let Some(req) = read_request(&mut stream) else { return };
            let resp = router.handle(&req);
            write_response(&mut stream, &resp);
        });
    }
}
