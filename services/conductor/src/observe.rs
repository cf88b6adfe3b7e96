//! What the conductor tells observability tools as runs move: the run's span when it ends, the
//! spans of stage attempts no worker ends (approvals, timeouts decided here), and the delivery
//! metrics (`cicd.pipeline.run.*`, stage durations, deploys and rollbacks by environment).
//!
//! Spans and counts are recorded only for transitions seen live (after the conductor caught up
//! with the log), so a restart does not repeat them; the active-run gauge is kept through the
//! replay too, so it is right from the start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use slipway_core::events::StageKind;
use slipway_core::fold::{Phase, StageStatus};
use slipway_core::{Event, Run, otel};

/// `cicd.pipeline.run.state` of a run that has not ended.
fn run_state(run: &Run) -> Option<&'static str> {
    match run.phase {
        _ if run.is_ended() => None,
        Phase::Queued => Some("pending"),
        _ => Some("executing"),
    }
}

/// A stage's attempt and status, before an event is folded.
pub type StageBefore = Option<(String, u32, StageStatus)>;

/// What is compared of a run before and after an event (a run's pipeline never changes, so
/// it is read from the run after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Brief {
    ended: bool,
    state: Option<&'static str>,
}

impl Brief {
    pub fn of(run: &Run) -> Self {
        Self {
            ended: run.is_ended(),
            state: run_state(run),
        }
    }
}

pub struct Observer {
    /// Active runs by (pipeline, state), read by the gauge's callback.
    active: Arc<Mutex<HashMap<(String, &'static str), i64>>>,
    run_duration: Histogram<f64>,
    run_errors: Counter<u64>,
    stage_duration: Histogram<f64>,
    deploys: Counter<u64>,
    rollbacks: Counter<u64>,
    _active_gauge: opentelemetry::metrics::ObservableUpDownCounter<i64>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

impl Default for Observer {
    fn default() -> Self {
        let meter = opentelemetry::global::meter("slipway");
        let active: Arc<Mutex<HashMap<(String, &'static str), i64>>> = Arc::default();
        let gauge_source = active.clone();
        let active_gauge = meter
            .i64_observable_up_down_counter("cicd.pipeline.run.active")
            .with_unit("{run}")
            .with_description("Pipeline runs not yet ended, by state.")
            .with_callback(move |o| {
                let map = gauge_source.lock().expect("not poisoned");
                for ((pipeline, state), n) in map.iter() {
                    o.observe(
                        *n,
                        &[
                            KeyValue::new("cicd.pipeline.name", pipeline.clone()),
                            KeyValue::new("cicd.pipeline.run.state", *state),
                        ],
                    );
                }
            })
            .build();
        Self {
            active,
            run_duration: meter
                .f64_histogram("cicd.pipeline.run.duration")
                .with_unit("s")
                .with_description("Duration of pipeline runs, from the change to the run's end.")
                .build(),
            run_errors: meter
                .u64_counter("cicd.pipeline.run.errors")
                .with_unit("{error}")
                .with_description("Pipeline runs that did not succeed, by error type.")
                .build(),
            stage_duration: meter
                .f64_histogram("slipway.stage.duration")
                .with_unit("s")
                .with_description("Duration of stage attempts, from request to result.")
                .build(),
            deploys: meter
                .u64_counter("slipway.deploys")
                .with_unit("{deploy}")
                .with_description("Deploy attempts ended, by environment and result.")
                .build(),
            rollbacks: meter
                .u64_counter("slipway.rollbacks")
                .with_unit("{rollback}")
                .with_description("Rollbacks ended, by environment and result.")
                .build(),
            _active_gauge: active_gauge,
        }
    }
}

/// The stage an event is about, as it stood before the event.
pub fn stage_before(run: Option<&Run>, event: &Event) -> StageBefore {
    let key = event
        .data
        .stage_fact()
        .map(|(s, _, _)| s.to_string())
        .or_else(|| event.data.approval_stage().map(|(s, _)| s))?;
    let s = run?.stage(&key)?;
    Some((key, s.attempt, s.status))
}

impl Observer {
    /// Accounts for `event` having moved a run from `before` to `after`; `live` once caught up.
    pub fn observe(
        &self,
        before: Option<Brief>,
        stage: StageBefore,
        after: &Run,
        event: &Event,
        own_source: &str,
        live: bool,
    ) {
        let was_ended = before.is_some_and(|b| b.ended);
        self.track_active(before.and_then(|b| b.state), after);
        if !live {
            return;
        }
        if !was_ended && after.is_ended() {
            self.run_ended(after);
        }
        let key = match &stage {
            Some((key, _, _)) => key.clone(),
            None => match event
                .data
                .stage_fact()
                .map(|(s, _, _)| s.to_string())
                .or_else(|| event.data.approval_stage().map(|(s, _)| s))
            {
                Some(k) => k,
                None => return,
            },
        };
        let Some(now) = after.stage(&key) else { return };
        let ended_now = now.status.is_terminal()
            && !matches!(&stage, Some((_, a, st)) if *a == now.attempt && st.is_terminal());
        if !ended_now {
            return;
        }
        // Workers emit the spans of the stages they end; approvals and the conductor's own
        // decisions (timeouts) have no worker to do it.
        if (now.kind() == Some(StageKind::Approval) || event.source == own_source)
            && let Some(span) = otel::stage_span(after, &key, now.attempt)
        {
            otel::emit(span);
        }
        let (result, _) = otel::task_result(now.status, now.reason.as_deref());
        if let (Some(start), Some(end)) = (now.requested_at, now.finished_at) {
            self.stage_duration.record(
                seconds(start, end),
                &[
                    KeyValue::new("cicd.pipeline.name", after.pipeline.clone()),
                    KeyValue::new("cicd.pipeline.task.name", key.clone()),
                    KeyValue::new("cicd.pipeline.task.run.result", result),
                ],
            );
        }
        let env_attrs = |env: &str| {
            [
                KeyValue::new("deployment.environment.name", env.to_string()),
                KeyValue::new("cicd.pipeline.task.run.result", result),
            ]
        };
        if let Some(env) = key.strip_prefix("deploy:") {
            self.deploys.add(1, &env_attrs(env));
        } else if let Some(env) = key.strip_prefix("rollback:") {
            self.rollbacks.add(1, &env_attrs(env));
        }
    }

    fn run_ended(&self, run: &Run) {
        if let Some(span) = otel::run_span(run) {
            otel::emit(span);
        }
        let (result, error) = otel::run_result(run.phase);
        let pipeline = KeyValue::new("cicd.pipeline.name", run.pipeline.clone());
        if let Some(end) = run.finished_at {
            self.run_duration.record(
                seconds(run.change.time.min(run.created_at), end),
                &[
                    pipeline.clone(),
                    KeyValue::new("cicd.pipeline.result", result),
                ],
            );
        }
        if let Some(e) = error {
            self.run_errors
                .add(1, &[pipeline, KeyValue::new("error.type", e)]);
        }
    }

    fn track_active(&self, was: Option<&'static str>, after: &Run) {
        let now = run_state(after);
        if was == now {
            return;
        }
        let mut map = self.active.lock().expect("not poisoned");
        // Kept at zero rather than removed: a pipeline with no active run reports 0, not
        // nothing (bounded by pipelines x states).
        if let Some(s) = was {
            *map.entry((after.pipeline.clone(), s)).or_default() -= 1;
        }
        if let Some(s) = now {
            *map.entry((after.pipeline.clone(), s)).or_default() += 1;
        }
    }
}

fn seconds(start: chrono::DateTime<chrono::Utc>, end: chrono::DateTime<chrono::Utc>) -> f64 {
    (end - start).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}
