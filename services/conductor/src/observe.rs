//! What the conductor tells observability tools as runs move: the run's span when it ends, the
//! spans of the stage attempts it ends itself (timeouts, the policy's automatic approval) and of
//! those the run's end cuts off, and the delivery metrics (`cicd.pipeline.run.*`, stage
//! durations, deploys and rollbacks by environment), in [`outcome`]'s words.
//!
//! Spans and counts are recorded only for transitions seen live (after the conductor caught up
//! with the log), so a restart does not repeat them; the active-run gauge is kept through the
//! replay too, so it is right from the start.

use slipway_domain::stage::StageKind;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use slipway_core::telemetry::otel;
use slipway_domain::fold::{StageState, StageStatus};
use slipway_domain::{Event, Run, outcome};

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
            state: outcome::run_state(run),
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
                .with_description("Time pipeline runs spent in each state (pending, executing), from the run's creation to its end.")
                .build(),
            run_errors: meter
                .u64_counter("cicd.pipeline.run.errors")
                .with_unit("{error}")
                .with_description("Pipeline runs that ended in an error (a failure, an error or a timeout; not a cancellation), by error type.")
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
        // The process that appended the fact ending an attempt emits its span: workers theirs,
        // the gateway approvers' decisions, the conductor its own (timeouts, the policy's
        // automatic approval).
        if event.source == own_source
            && let Some(span) = otel::stage_span(after, &key, now.attempt, SystemTime::now())
        {
            otel::emit(span);
        }
        self.stage_ended(after, now);
    }

    /// The stage metrics of an attempt that ended.
    fn stage_ended(&self, run: &Run, stage: &StageState) {
        let Some(outcome) = outcome::task(run, stage) else {
            return;
        };
        let result = outcome.result;
        if let Some(secs) = outcome::stage_seconds(stage) {
            self.stage_duration.record(
                secs,
                &[
                    KeyValue::new("cicd.pipeline.name", run.pipeline.clone()),
                    KeyValue::new("cicd.pipeline.task.name", stage.name.clone()),
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
        if let Some(key) = stage.key()
            && let Some(env) = key.environment()
        {
            match key.kind() {
                StageKind::Deploy => self.deploys.add(1, &env_attrs(env)),
                StageKind::Rollback => self.rollbacks.add(1, &env_attrs(env)),
                _ => {}
            }
        }
    }

    fn run_ended(&self, run: &Run) {
        // The attempts the run's end cut off: no worker reports them any more (one that was
        // working stops and leaves its span to this), so their spans and metrics are here.
        for s in &run.stages {
            if s.status == StageStatus::Cancelled && s.requested_at.is_some() {
                if let Some(span) = otel::stage_span(run, &s.name, s.attempt, SystemTime::now()) {
                    otel::emit(span);
                }
                self.stage_ended(run, s);
            }
        }
        if let Some(span) = otel::run_span(run, SystemTime::now()) {
            otel::emit(span);
        }
        let Some(ended) = outcome::run(run) else {
            return;
        };
        let pipeline = KeyValue::new("cicd.pipeline.name", run.pipeline.clone());
        for d in outcome::run_durations(run) {
            let mut attrs = vec![
                pipeline.clone(),
                KeyValue::new("cicd.pipeline.run.state", d.state),
            ];
            if let Some(o) = d.outcome {
                attrs.push(KeyValue::new("cicd.pipeline.result", o.result));
                if let Some(e) = o.error_type {
                    attrs.push(KeyValue::new("error.type", e));
                }
            }
            self.run_duration.record(d.seconds, &attrs);
        }
        if let Some(e) = ended.error_type {
            self.run_errors
                .add(1, &[pipeline, KeyValue::new("error.type", e)]);
        }
    }

    fn track_active(&self, was: Option<&'static str>, after: &Run) {
        let now = outcome::run_state(after);
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
