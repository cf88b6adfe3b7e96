//! Intake: a change becomes a run, or a `change.rejected` fact that says why.

use slipway_core::bus::{AppendError, Bus, Recorded};
use slipway_core::events::{ChangeInfo, ChangeRejected, EventData, RunCreated, SourceRef};
use slipway_core::spec::PipelineSpec;
use slipway_core::{Event, ids};
use tracing::{info, warn};

use crate::{SOURCE, State};

/// What a change turns into.
enum Verdict {
    Run(Box<Event>),
    Reject {
        id: Option<String>,
        source: Option<String>,
        reason: String,
    },
}

fn judge(rec: &Recorded) -> Verdict {
    let event = match &rec.event {
        Ok(e) => e,
        Err(e) => {
            return Verdict::Reject {
                id: None,
                source: None,
                reason: e.to_string(),
            };
        }
    };
    let reject = |reason: String| Verdict::Reject {
        id: Some(event.id.clone()),
        source: Some(event.source.clone()),
        reason,
    };
    let EventData::ChangeSubmitted(change) = &event.data else {
        return reject(format!(
            "{} is not a change (expected dev.slipway.change.submitted.v1)",
            event.type_name()
        ));
    };
    let spec = match PipelineSpec::parse(&change.spec) {
        Ok(s) => s,
        Err(e) => return reject(e.to_string()),
    };
    if let SourceRef::Directory { path } = &change.source
        && !std::path::Path::new(path).is_absolute()
    {
        return reject(format!(
            "source directory {path:?} must be an absolute path"
        ));
    }
    let run_id = ids::run_id(&event.source, &event.id);
    let created = RunCreated {
        run_id: run_id.clone(),
        pipeline: spec.pipeline.name.clone(),
        change: ChangeInfo {
            id: event.id.clone(),
            source: event.source.clone(),
            seq: rec.seq,
            time: event.time,
            author: change.author.clone(),
            title: change.title.clone(),
        },
        source: change.source.clone(),
        spec: serde_json::to_value(&spec).expect("spec serialises"),
        rerun_of: change.rerun_of.clone(),
    };
    let mut ev = Event::new(
        ids::derived(&[&run_id, "run.created"]),
        SOURCE,
        Some(run_id),
        slipway_core::bus::now(),
        EventData::RunCreated(created),
    );
    // The run joins the change's trace, if it came with one; otherwise it starts its own.
    let run = ev.subject.clone().unwrap_or_default();
    ev.traceparent = Some(slipway_core::trace::run_traceparent(
        event.traceparent.as_deref(),
        &run,
    ));
    ev.tracestate = event.tracestate.clone();
    Verdict::Run(Box::new(ev))
}

/// Answers one change: a new run, nothing (its run exists), or a rejection.
pub(crate) async fn answer_change(state: &mut State, bus: &Bus, rec: &Recorded) {
    match judge(rec) {
        Verdict::Run(event) => {
            let run_id = event.subject.clone().expect("run events have a subject");
            if state.runs.contains_key(&run_id) {
                info!(%run_id, seq = rec.seq, "Change already has its run (a repeat).");
                return;
            }
            // Expect no run yet: a second conductor racing us loses here.
            match bus
                .append(&event, &run_id, state.expected_seq(&run_id))
                .await
            {
                Ok(a) if !a.duplicate => {
                    info!(%run_id, seq = a.seq, "Change accepted: run created.");
                    state.fold_in(&run_id, &event, a.seq);
                    state.decide_run(bus, &run_id).await;
                }
                Ok(_) | Err(AppendError::Conflict { .. }) => {
                    info!(%run_id, "Run already created by another writer.");
                }
                Err(AppendError::Bus(e)) => {
                    // Kept unanswered: the next tick tries again.
                    warn!(%run_id, error = %e, "Cannot create the run; retrying.");
                    state.unanswered.insert(rec.seq, rec.clone());
                }
            }
        }
        Verdict::Reject { id, source, reason } => {
            warn!(seq = rec.seq, subject = %rec.subject, %reason, "Change rejected.");
            let data = ChangeRejected {
                change_seq: rec.seq,
                change_subject: rec.subject.clone(),
                change_id: id,
                change_source: source,
                reason,
            };
            let event = Event::new(
                ids::derived(&["change.rejected", &rec.seq.to_string()]),
                SOURCE,
                None,
                slipway_core::bus::now(),
                EventData::ChangeRejected(data),
            );
            if let Err(e) = bus.publish(&event).await {
                warn!(error = %e, "Cannot record the rejection; retrying.");
                state.unanswered.insert(rec.seq, rec.clone());
            }
        }
    }
}
