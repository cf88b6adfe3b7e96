//! W3C trace context for runs: every event of a run carries the run's `traceparent` (the
//! CloudEvents distributed-tracing extension, `ce-traceparent` in binary mode), so a run is one
//! trace. A change that arrives with a trace context makes its run join that trace; otherwise the
//! run starts one, with ids derived from the run id (so every service agrees without asking).

use opentelemetry::trace::{SpanId, TraceId};
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
    let s = derive_run_span(run_id);
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

/// Where a run's spans hang: its trace, its run span (id derived from the run id, so every
/// service names the same parent without asking) and the caller's span when the change came
/// with one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunTrace {
    pub trace_id: TraceId,
    pub run_span: SpanId,
    /// The span of the change's sender, the run span's parent.
    pub caller: Option<SpanId>,
    /// The W3C sampled flag of the run's trace context.
    pub sampled: bool,
}

impl RunTrace {
    /// The run's spans, from its id and the `traceparent` its events carry.
    pub fn of(run_id: &str, traceparent: Option<&str>) -> Self {
        let own = for_run(run_id);
        let tp = run_traceparent(traceparent, run_id);
        let (trace, span) = parse(&tp)
            .or_else(|| parse(&own))
            .expect("derived is valid");
        let run_span = SpanId::from_bytes(derive_run_span(run_id));
        let caller = SpanId::from_hex(span).ok().filter(|s| *s != run_span);
        Self {
            trace_id: TraceId::from_hex(trace).expect("validated hex"),
            run_span,
            caller,
            sampled: !tp.trim().ends_with("-00"),
        }
    }

    /// The span of one attempt of a stage (`build`, `deploy:production`, ...).
    pub fn stage_span(&self, run_id: &str, stage: &str, attempt: u32) -> SpanId {
        SpanId::from_bytes(derive8(
            "slipway-stage",
            &[run_id, stage, &attempt.to_string()],
        ))
    }
}

fn derive_run_span(run_id: &str) -> [u8; 8] {
    let s = Sha256::digest(format!("slipway-span:{run_id}").as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&s[..8]);
    out
}

/// The span that published an event: derived from the event id, so a consumer links to it
/// from the event alone.
pub fn publish_span(event_id: &str) -> SpanId {
    SpanId::from_bytes(derive8("slipway-publish", &[event_id]))
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

    #[test]
    fn run_span_is_the_derived_parent_or_the_callers_child() {
        let own = RunTrace::of("r1", None);
        assert_eq!(own.caller, None, "a run without a caller is a root");
        assert_eq!(own.run_span.to_string(), parse(&for_run("r1")).unwrap().1);
        assert!(own.sampled);
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let joined = RunTrace::of("r1", Some(tp));
        assert_eq!(
            joined.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(joined.caller.unwrap().to_string(), "00f067aa0ba902b7");
        assert_eq!(joined.run_span, own.run_span);
        assert!(!joined.sampled);
        assert_ne!(
            own.stage_span("r1", "build", 1),
            own.stage_span("r1", "build", 2)
        );
        assert_ne!(publish_span("a"), publish_span("b"));
    }
}
