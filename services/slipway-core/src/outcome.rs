//! How runs and stage attempts ended, in the words of the OpenTelemetry CI/CD conventions
//! (`cicd.pipeline.result`, `cicd.pipeline.task.run.result`, `error.type`,
//! `cicd.pipeline.run.state`): one mapping, so the gateway's `/metrics`, the OTLP metrics and
//! the spans say the same of the same run.
//!
//! `error.type` is set exactly when a run or an attempt did not succeed for a reason other than
//! a cancellation. Its values (docs/observability.md) are few and fixed: `timeout`,
//! `delivery_failed` (a request that could not be handled: malformed, or given up after its
//! last delivery), `rejected` (an approver said no), `rolled_back`, and `<kind>_failed` for a
//! stage that failed (`build_failed`, `test_failed`, `evaluate_failed`, `perf_failed`,
//! `cost_failed`, `deploy_failed`, `monitor_failed`, `rollback_failed`), or `_OTHER`.

use chrono::{DateTime, Utc};

use crate::events::StageKind;
use crate::fold::{Phase, Run, StageState, StageStatus};

/// A result and, when it was an error, its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `success`, `failure`, `error`, `timeout` or `cancellation`.
    pub result: &'static str,
    pub error_type: Option<&'static str>,
}

impl Outcome {
    const SUCCESS: Outcome = Outcome {
        result: "success",
        error_type: None,
    };
    const CANCELLATION: Outcome = Outcome {
        result: "cancellation",
        error_type: None,
    };

    fn failure(error_type: &'static str) -> Self {
        Outcome {
            result: "failure",
            error_type: Some(error_type),
        }
    }
}

fn failed_kind(kind: Option<StageKind>) -> &'static str {
    match kind {
        Some(StageKind::Build) => "build_failed",
        Some(StageKind::Test) => "test_failed",
        Some(StageKind::Deploy) => "deploy_failed",
        Some(StageKind::Evaluate) => "evaluate_failed",
        Some(StageKind::Perf) => "perf_failed",
        Some(StageKind::Cost) => "cost_failed",
        Some(StageKind::Approval) => "rejected",
        Some(StageKind::Monitor) => "monitor_failed",
        Some(StageKind::Rollback) => "rollback_failed",
        None => "_OTHER",
    }
}

/// How a stage attempt ended (`cicd.pipeline.task.run.result`); `None` while it runs.
pub fn task(stage: &StageState) -> Option<Outcome> {
    match stage.status {
        StageStatus::Pending | StageStatus::Requested | StageStatus::Running => None,
        StageStatus::Succeeded => Some(Outcome::SUCCESS),
        StageStatus::Cancelled => Some(Outcome::CANCELLATION),
        StageStatus::Failed => {
            let reason = stage.reason.as_deref().unwrap_or_default();
            Some(if reason.contains("timed out") {
                Outcome {
                    result: "timeout",
                    error_type: Some("timeout"),
                }
            } else if reason.starts_with("gave up") || reason.starts_with("malformed") {
                Outcome {
                    result: "error",
                    error_type: Some("delivery_failed"),
                }
            } else {
                Outcome::failure(failed_kind(stage.kind()))
            })
        }
    }
}

/// How a run ended (`cicd.pipeline.result`); `None` while it runs.
pub fn run(run: &Run) -> Option<Outcome> {
    let ending_stage = || {
        run.end_stage
            .as_deref()
            .and_then(|k| run.stage(k))
            .filter(|s| s.status == StageStatus::Failed)
            .or_else(|| run.stages.iter().find(|s| s.status == StageStatus::Failed))
    };
    Some(match run.phase {
        Phase::Succeeded => Outcome::SUCCESS,
        // No decision within the approval policy's time: the run timed out waiting.
        Phase::Cancelled
            if run
                .end_stage
                .as_deref()
                .is_some_and(|k| k.starts_with("approval:")) =>
        {
            Outcome {
                result: "timeout",
                error_type: Some("timeout"),
            }
        }
        Phase::Cancelled => Outcome::CANCELLATION,
        Phase::Rejected => Outcome::failure("rejected"),
        Phase::RolledBack => Outcome::failure("rolled_back"),
        Phase::Failed => ending_stage()
            .and_then(task)
            .unwrap_or(Outcome::failure("_OTHER")),
        _ => return None,
    })
}

/// `cicd.pipeline.run.state` of a run that has not ended: `pending` until a stage starts.
pub fn run_state(run: &Run) -> Option<&'static str> {
    match run.phase {
        _ if run.is_ended() => None,
        Phase::Queued => Some("pending"),
        _ => Some("executing"),
    }
}

/// One observation of `cicd.pipeline.run.duration`: the time a run spent in one state, with
/// the result when the run ended in that state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateDuration {
    pub state: &'static str,
    pub seconds: f64,
    pub outcome: Option<Outcome>,
}

/// The time an ended run spent `pending` (from Slipway's receipt of the change, when the run
/// was made, to the first stage's start) and `executing` (from there to the run's end), as the
/// conventions define the states. A run that ended before any stage started was only pending.
/// The change's own time (an upstream CDEvent's timestamp, say) is not the run's start.
pub fn run_durations(run: &Run) -> Vec<StateDuration> {
    let (Some(end), Some(outcome)) = (run.finished_at, self::run(run)) else {
        return Vec::new();
    };
    let start = run.created_at;
    let executing = run.stages.iter().filter_map(|s| s.started_at).min();
    match executing {
        Some(from) if from < end => vec![
            StateDuration {
                state: "pending",
                seconds: seconds(start, from),
                outcome: None,
            },
            StateDuration {
                state: "executing",
                seconds: seconds(from, end),
                outcome: Some(outcome),
            },
        ],
        _ => vec![StateDuration {
            state: "pending",
            seconds: seconds(start, end),
            outcome: Some(outcome),
        }],
    }
}

/// A stage attempt's duration, from its request to its result (`slipway.stage.duration`).
pub fn stage_seconds(stage: &StageState) -> Option<f64> {
    let end = stage.finished_at?;
    let start = stage.requested_at.or(stage.started_at)?;
    Some(seconds(start, end))
}

/// Seconds from `start` to `end`, never negative.
pub fn seconds(start: DateTime<Utc>, end: DateTime<Utc>) -> f64 {
    (end - start).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Answer, Sim};

    const PIPE: &str = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"make\"]\n[[test]]\nname = \"unit\"\ncommand = [\"make\", \"test\"]\n";

    fn ended(script: &[(&str, Answer)]) -> Run {
        let mut sim = Sim::new(PIPE);
        for (k, a) in script {
            sim.script.insert((*k).into(), a.clone());
        }
        sim.run_to_end();
        sim.run().clone()
    }

    #[test]
    fn runs_and_tasks_end_in_the_conventions_words() {
        let ok = ended(&[]);
        assert_eq!(run(&ok), Some(Outcome::SUCCESS));
        assert_eq!(task(ok.stage("build").unwrap()), Some(Outcome::SUCCESS));

        let bad = ended(&[("test:unit", Answer::Fail("2 cases failed".into()))]);
        assert_eq!(run(&bad), Some(Outcome::failure("test_failed")));

        let silent = ended(&[("test:unit", Answer::Silent)]);
        assert_eq!(run(&silent), None, "still running");
        assert_eq!(run_state(&silent), Some("executing"));
        assert_eq!(task(silent.stage("test:unit").unwrap()), None);
    }

    #[test]
    fn a_run_is_timed_from_its_creation_in_two_states() {
        let mut sim = Sim::new(PIPE);
        // An upstream change time years before the run is not the run's start.
        let mut created = sim.log[0].clone();
        if let crate::events::EventData::RunCreated(c) = &mut created.data {
            c.change.time = created.time - chrono::Duration::days(3 * 365);
        }
        sim.log.clear();
        sim.run = None;
        sim.push(created);
        // The scripted worker states a start when it fails (a success comes without one).
        sim.script
            .insert("test:unit".into(), Answer::Fail("1 case failed".into()));
        sim.run_to_end();
        let r = sim.run();
        let d = run_durations(r);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!((d[0].state, d[0].outcome), ("pending", None));
        assert_eq!(d[1].state, "executing");
        assert_eq!(d[1].outcome, Some(Outcome::failure("test_failed")));
        let total: f64 = d.iter().map(|x| x.seconds).sum();
        assert_eq!(total, seconds(r.created_at, r.finished_at.unwrap()));
        assert!(total < 3600.0, "{total}");
    }
}
