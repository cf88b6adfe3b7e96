//! The OpenTelemetry ids of a run's trace, from the W3C trace context every event of the run
//! carries ([`slipway_domain::trace`] derives them as bytes).

use opentelemetry::trace::{SpanId, TraceId};
pub use slipway_domain::trace::{for_run, parse, run_traceparent};

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
        let run_span = SpanId::from_bytes(slipway_domain::trace::run_span(run_id));
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
        SpanId::from_bytes(slipway_domain::trace::stage_span(run_id, stage, attempt))
    }
}

/// The span that published an event: derived from the event id, so a consumer links to it
/// from the event alone.
pub fn publish_span(event_id: &str) -> SpanId {
    SpanId::from_bytes(slipway_domain::trace::publish_span(event_id))
}

#[cfg(test)]
mod tests {
    use super::*;

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
