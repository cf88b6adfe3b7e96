//! W3C trace context for runs: every event of a run carries the run's `traceparent` (the
//! CloudEvents distributed-tracing extension, `ce-traceparent` in binary mode), so a run is one
//! trace. A change that arrives with a trace context makes its run join that trace; otherwise the
//! run starts one, with ids derived from the run id (so every service agrees without asking).

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
    let s = Sha256::digest(format!("slipway-span:{run_id}").as_bytes());
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&t[..16]), hex(&s[..8]))
}

/// The run's trace context: the change's, when valid, else a new one.
pub fn run_traceparent(change_traceparent: Option<&str>, run_id: &str) -> String {
    match change_traceparent {
        Some(tp) if parse(tp).is_some() => tp.trim().to_string(),
        _ => for_run(run_id),
    }
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
    }
}
