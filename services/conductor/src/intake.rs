//! Intake: a change becomes a run, or a `change.rejected` fact that says why.

use slipway_core::bus::{AppendError, Bus, Recorded};
use slipway_core::config::CdeventsPipeline;
use slipway_domain::cdevents;
use slipway_domain::events::{ChangeInfo, ChangeRejected, ChangeSubmitted, EventData, RunCreated};
use slipway_domain::{Event, ids};
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

fn judge(rec: &Recorded, registry: &[CdeventsPipeline]) -> Verdict {
    let event = match &rec.event {
        Ok(e) => e,
        Err(e) => {
            // Not a Slipway event: a CDEvent (bare, or in a CloudEvent) may still be a change.
            if let Some(raw) = rec.raw.as_deref().filter(|r| looks_like_cdevent(r)) {
                return match from_cdevent(raw, registry) {
                    Ok((event, subject)) => judge_change(rec, &event, Some(subject)),
                    Err((id, source, reason)) => Verdict::Reject { id, source, reason },
                };
            }
            return Verdict::Reject {
                id: None,
                source: None,
                reason: e.to_string(),
            };
        }
    };
    judge_change(rec, event, None)
}

/// A JSON object with a CDEvents `context`, or a CloudEvent whose type is a CDEvents type.
fn looks_like_cdevent(raw: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return false;
    };
    v.get("context").is_some()
        || v.get("type")
            .and_then(serde_json::Value::as_str)
            .is_some_and(cdevents::is_cdevent_type)
}

type Refusal = (Option<String>, Option<String>, String);

/// The change a CDEvent stands for: the registered pipeline that delivers it, with its spec.
fn from_cdevent(raw: &[u8], registry: &[CdeventsPipeline]) -> Result<(Event, String), Refusal> {
    let inc = cdevents::parse_incoming(raw).map_err(|e| (None, None, format!("CDEvent: {e}")))?;
    let refuse = |reason: String| (Some(inc.id.clone()), Some(inc.source.clone()), reason);
    let Some(pipeline) = registry.iter().find(|p| p.matches(&inc)) else {
        let what = match &inc.repository {
            Some(r) => format!("repository {r:?}"),
            None => format!("artifact {:?}", inc.subject_id),
        };
        return Err(refuse(format!(
            "no pipeline is registered for {what} ({}); add one under [[conductor.cdevents]]",
            inc.ty
        )));
    };
    let spec = std::fs::read_to_string(&pipeline.spec).map_err(|e| {
        refuse(format!(
            "cannot read the registered spec {}: {e}",
            pipeline.spec.display()
        ))
    })?;
    let short = inc
        .ty
        .strip_prefix("dev.cdevents.")
        .unwrap_or(&inc.ty)
        .rsplitn(4, '.')
        .last()
        .unwrap_or_default()
        .to_string();
    let change = ChangeSubmitted {
        spec,
        source: pipeline.source.clone(),
        author: Some(
            inc.user
                .clone()
                .unwrap_or_else(|| format!("cdevents:{}", inc.source)),
        ),
        title: Some(format!("{short} {}", inc.subject_id)),
        rerun_of: None,
        commit: None,
    };
    let event = Event::new(
        inc.id.clone(),
        inc.source.clone(),
        None,
        inc.timestamp,
        EventData::ChangeSubmitted(change),
    );
    Ok((event, inc.subject_id))
}

fn judge_change(rec: &Recorded, event: &Event, subject: Option<String>) -> Verdict {
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
    let spec = match change.validate() {
        Ok(s) => s,
        Err(e) => return reject(e),
    };
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
            subject,
            commit: change.commit.clone(),
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
    ev.traceparent = Some(slipway_core::telemetry::trace::run_traceparent(
        event.traceparent.as_deref(),
        &run,
    ));
    ev.tracestate = event.tracestate.clone();
    Verdict::Run(Box::new(ev))
}

/// Answers one change: a new run, nothing (its run exists), or a rejection.
pub(crate) async fn answer_change(state: &mut State, bus: &Bus, rec: &Recorded) {
    match judge(rec, &state.cdevents) {
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
                    info!(%run_id, "The run already exists (another writer made it, or it ended earlier).");
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
