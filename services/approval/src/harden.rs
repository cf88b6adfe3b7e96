//! What stands between the gateway and a hostile client: security headers on every answer (a
//! content security policy that allows the page's own script and style and nothing else),
//! cross-site writes refused, a time limit per request, and a limit on failed
//! authentications per client address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// `'sha256-…'` of each inline block of `tag` in the page, for the content security policy.
fn inline_hashes(page: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else { break };
        let digest = Sha256::digest(&body.as_bytes()[..end]);
        out.push(format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
        rest = &body[end..];
    }
    out
}

/// The policy: the page's own inline script and style (by hash), same-origin fetches,
/// nothing framed, no plugins, forms only to itself.
static CSP: LazyLock<String> = LazyLock::new(|| {
    let page = include_str!("page.html");
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        inline_hashes(page, "script").join(" "),
        inline_hashes(page, "style").join(" "),
    )
});

/// Adds the security headers to every response.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let csp = HeaderValue::from_str(&CSP).expect("the policy is a valid header");
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// Refuses writes a browser sends on behalf of another site (CSRF): a `Sec-Fetch-Site` other
/// than same-origin or none, or an `Origin` whose host is not this gateway's. Clients that
/// are not browsers send neither and are not affected; the page's own calls are same-origin
/// and carry the approver's token in a header no other site can set.
pub async fn same_origin_writes(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let h = req.headers();
        let site = h
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin_host = h
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .map(|o| o.split_once("://").map_or(o, |(_, rest)| rest));
        let cross_origin = match (origin_host, host) {
            (Some("null"), _) => true,
            (Some(o), Some(h)) => !o.eq_ignore_ascii_case(h),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !matches!(site, "same-origin" | "none") || cross_origin {
            return ApiError::Forbidden(
                "cross-site request refused: write from the gateway's own page or a non-browser client"
                    .into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Largest total of request header names and values accepted (hyper itself stops at 400 KiB).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses requests whose headers add up to more than [`MAX_HEADER_BYTES`] with `431`.
pub async fn header_limit(req: Request, next: Next) -> Response {
    let size: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if size > MAX_HEADER_BYTES {
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            axum::Json(crate::error::ErrorBody {
                error: format!(
                    "request headers total {size} bytes; the limit is {MAX_HEADER_BYTES}"
                ),
            }),
        )
            .into_response();
    }
    next.run(req).await
}

/// Ends a request that takes longer than the limit with `503`.
pub async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than {} s and was abandoned",
            limit.as_secs_f64()
        ))
        .into_response(),
    }
}

/// Gives every error the documented `{"error": ...}` body: what the router and the body limit
/// answer on their own (`404` for no route, `405`, `413`) is plain text or empty, and is
/// rewritten here to say what was wrong.
pub async fn json_errors(State(max_body): State<usize>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let known = match status {
        StatusCode::NOT_FOUND => Some(format!("no such route: {method} {path}")),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = resp
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(|v| format!("; allowed: {v}"))
                .unwrap_or_default();
            Some(format!("method {method} is not allowed on {path}{allowed}"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => Some(format!(
            "the request body is larger than the limit of {max_body} bytes"
        )),
        _ => None,
    };
    let (mut parts, body) = resp.into_parts();
    let error = match known {
        Some(e) => e,
        // Anything else keeps what it said, inside the JSON.
        None => {
            let said = axum::body::to_bytes(body, 64 * 1024)
                .await
                .unwrap_or_default();
            let reason = status.canonical_reason().unwrap_or("error");
            match String::from_utf8_lossy(&said).trim() {
                "" => format!("{} {reason}", status.as_u16()),
                text => format!("{} {reason}: {text}", status.as_u16()),
            }
        }
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&crate::error::ErrorBody { error }).expect("serialises");
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Failed authentications per client address, in a sliding window.
#[derive(Debug)]
pub struct AuthLimiter {
    /// Failures allowed per window before the address is refused until the window ends.
    pub max_failures: u32,
    pub window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            failures: Mutex::default(),
        }
    }

    /// Seconds until `ip` may try again, when it is refused now.
    fn refused(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut map = self.failures.lock().expect("not poisoned");
        // Forget old windows, so the map stays bounded by recent offenders.
        map.retain(|_, (_, since)| now.duration_since(*since) < self.window);
        map.get(&ip)
            .filter(|(n, _)| *n >= self.max_failures)
            .map(|(_, since)| (self.window - now.duration_since(*since)).as_secs().max(1))
    }

    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut map = self.failures.lock().expect("not poisoned");
        let e = map.entry(ip).or_insert((0, now));
        e.0 += 1;
    }
}

/// Refuses (`429`) an address after too many failed authentications; counts each `401`. Layered
/// on the routes that take a token only.
pub async fn limit_failed_auth(
    State(limiter): State<Arc<AuthLimiter>>,
    req: Request,
    next: Next,
) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    if let Some(retry) = limiter.refused(ip, Instant::now()) {
        let mut resp = (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(crate::error::ErrorBody {
                error: format!(
                    "too many failed authentications from this address; try again in {retry} s"
                ),
            }),
        )
            .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        return resp;
    }
    let resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        limiter.failed(ip, Instant::now());
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_pins_the_pages_inline_blocks() {
        let hashes = inline_hashes(
            "<script>a()</script><style>b{}</style><script>c</script>",
            "script",
        );
        assert_eq!(hashes.len(), 2);
        assert!(CSP.contains("script-src 'sha256-"));
        assert!(CSP.contains("frame-ancestors 'none'"));
    }

    #[test]
    fn failures_over_the_limit_are_refused_until_the_window_ends() {
        let l = AuthLimiter::new(3, Duration::from_secs(60));
        let ip = IpAddr::from([10, 0, 0, 1]);
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.refused(ip, t), None);
            l.failed(ip, t);
        }
        assert_eq!(l.refused(ip, t + Duration::from_secs(1)), Some(59));
        assert_eq!(l.refused(IpAddr::from([10, 0, 0, 2]), t), None);
        assert_eq!(l.refused(ip, t + Duration::from_secs(61)), None);
    }
}
