//! W3C trace context for runs: every event of a run carries the run's `traceparent` (the
//! CloudEvents distributed-tracing extension, `ce-traceparent` in binary mode), so a run is one
//! trace. A change that arrives with a trace context makes its run join that trace; otherwise the
//! run starts one, with ids derived from the run id (so every service agrees without asking).
//! The ids here are bytes; the OpenTelemetry types are the I/O side's.

use sha2::{Digest, Sha256};

/// `(trace id, parent span id)` of a valid `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not
/// all zero).
pub fn parse(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = version == "00"
        && parts.next().is_none()
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    ok.then_some((trace, span))
}

/// The trace context a run starts when its change brought none.
pub fn for_run(run_id: &str) -> String {
    let t = Sha256::digest(format!("slipway-trace:{run_id}").as_bytes());
    let s = run_span(run_id);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&t[..16]), hex(&s))
}

/// The run's trace context: the change's, when valid, else a new one.
pub fn run_traceparent(change_traceparent: Option<&str>, run_id: &str) -> String {
    match change_traceparent {
        Some(tp) if parse(tp).is_some() => tp.trim().to_string(),
        _ => for_run(run_id),
    }
}

fn derive8(label: &str, parts: &[&str]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    for p in parts {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// The run span's id, derived from the run id, so every service names the same parent
/// without asking.
pub fn run_span(run_id: &str) -> [u8; 8] {
    let s = Sha256::digest(format!("slipway-span:{run_id}").as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&s[..8]);
    out
}

/// The span id of one attempt of a stage (`build`, `deploy:production`, ...).
pub fn stage_span(run_id: &str, stage: &str, attempt: u32) -> [u8; 8] {
    derive8("slipway-stage", &[run_id, stage, &attempt.to_string()])
}

/// The span id of the publishing of an event: derived from the event id, so a consumer links
/// to it from the event alone.
pub fn publish_span(event_id: &str) -> [u8; 8] {
    derive8("slipway-publish", &[event_id])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse(tp),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        );
        assert!(parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
        assert!(parse("garbage").is_none());
        let own = for_run("r1");
        assert!(parse(&own).is_some());
        assert_eq!(own, for_run("r1"));
        assert_ne!(own, for_run("r2"));
        assert_eq!(run_traceparent(Some(tp), "r1"), tp);
        assert_eq!(run_traceparent(Some("bad"), "r1"), own);
        assert_ne!(stage_span("r1", "build", 1), stage_span("r1", "build", 2));
        assert_ne!(publish_span("a"), publish_span("b"));
    }
}
