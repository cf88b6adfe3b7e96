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
use crate::run::{Phase, Run, StageState, StageStatus};

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
        Some(StageKind::Rollout) => "rollout_aborted",
        Some(StageKind::Promote) => "promote_failed",
        None => "_OTHER",
    }
}

/// Whether an attempt that the run's end cut off had outlived its timeout by then: an approval
/// with no decision within the policy's time, which the conductor answers by ending the run.
fn outlived(run: &Run, stage: &StageState) -> bool {
    let (Some(from), Some(end)) = (stage.started_at.or(stage.requested_at), stage.finished_at)
    else {
        return false;
    };
    crate::decide::stage_timeout(&run.spec, &stage.name).is_some_and(|limit| end >= from + limit)
}

/// Whether a failure's reason says the stage ran out of time: the conductor's `timed out: ...`,
/// a worker's `timed out after ...` or `<kind> timed out after ...`. Only the reason's first
/// clause is read: a log tail or a comment after it says nothing about the failure's class.
fn timed_out(reason: &str) -> bool {
    let head = reason.split(['\n', ';', ':']).next().unwrap_or_default();
    head.starts_with("timed out") || head.contains(" timed out after ")
}

/// How a stage attempt of `run` ended (`cicd.pipeline.task.run.result`); `None` while it runs.
pub fn task(run: &Run, stage: &StageState) -> Option<Outcome> {
    const TIMEOUT: Outcome = Outcome {
        result: "timeout",
        error_type: Some("timeout"),
    };
    match stage.status {
        StageStatus::Pending | StageStatus::Requested | StageStatus::Running => None,
        StageStatus::Succeeded => Some(Outcome::SUCCESS),
        StageStatus::Cancelled if outlived(run, stage) => Some(TIMEOUT),
        StageStatus::Cancelled => Some(Outcome::CANCELLATION),
        StageStatus::Failed => {
            let reason = stage.reason.as_deref().unwrap_or_default();
            let kind = stage.kind();
            Some(
                if reason.starts_with("gave up") || reason.starts_with("malformed") {
                    Outcome {
                        result: "error",
                        error_type: Some("delivery_failed"),
                    }
                } else if kind == Some(StageKind::Approval) {
                    // An approver's comment is free text: never read for a class.
                    Outcome::failure("rejected")
                } else if timed_out(reason) {
                    TIMEOUT
                } else {
                    Outcome::failure(failed_kind(kind))
                },
            )
        }
    }
}

/// How a run ended (`cicd.pipeline.result`); `None` while it runs.
pub fn run(run: &Run) -> Option<Outcome> {
    let end_stage = run.end_stage.as_deref().and_then(|k| run.stage(k));
    Some(match run.phase {
        Phase::Succeeded => Outcome::SUCCESS,
        // No decision within the approval policy's time (not a newer run superseding it, which
        // names the approval stage too).
        Phase::Cancelled => match end_stage.and_then(|s| task(run, s)) {
            Some(o) if o.result == "timeout" => o,
            _ => Outcome::CANCELLATION,
        },
        Phase::Rejected => Outcome::failure("rejected"),
        Phase::RolledBack => Outcome::failure("rolled_back"),
        Phase::Failed => end_stage
            .filter(|s| s.status == StageStatus::Failed)
            .or_else(|| run.stages.iter().find(|s| s.status == StageStatus::Failed))
            .and_then(|s| task(run, s))
            .unwrap_or(Outcome::failure("_OTHER")),
        _ => return None,
    })
}

/// When a run started executing: its first stage's start, or end for a stage that ended
/// without one (waiting for a worker is pending).
fn executing_since(run: &Run) -> Option<DateTime<Utc>> {
    run.stages
        .iter()
        .filter_map(|s| s.started_at.or(s.finished_at))
        .min()
}

/// `cicd.pipeline.run.state` of a run that has not ended: `pending` until a stage starts.
pub fn run_state(run: &Run) -> Option<&'static str> {
    match executing_since(run) {
        _ if run.is_ended() => None,
        None => Some("pending"),
        Some(_) => Some("executing"),
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
    match executing_since(run) {
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
        assert_eq!(
            task(&ok, ok.stage("build").unwrap()),
            Some(Outcome::SUCCESS)
        );

        let bad = ended(&[("test:unit", Answer::Fail("2 cases failed".into()))]);
        assert_eq!(run(&bad), Some(Outcome::failure("test_failed")));

        // Requested and waiting for a worker is pending; a stage's start makes it executing.
        let mut sim = Sim::new(PIPE);
        sim.script.insert("build".into(), Answer::Silent);
        sim.run_to_end();
        assert_eq!(run(sim.run()), None, "still running");
        assert_eq!(run_state(sim.run()), Some("pending"));
        let started =
            crate::facts::started_data("dev.slipway.build.requested.v1", "build", 1, "b-1")
                .unwrap();
        sim.push(crate::facts::fact(
            crate::service::Service::Builder,
            &sim.run_id,
            started,
            sim.now,
        ));
        assert_eq!(run_state(sim.run()), Some("executing"));
        assert_eq!(task(sim.run(), sim.run().stage("build").unwrap()), None);
    }

    #[test]
    fn failures_are_classed_by_what_failed_not_by_free_text() {
        let failed = |key: &str, reason: &str| {
            let r = ended(&[(key, Answer::Fail(reason.into()))]);
            (run(&r), task(&r, r.stage(key).unwrap()))
        };
        let (r, t) = failed("build", "build timed out after 60s\nlast lines: compiling");
        assert_eq!(
            t,
            Some(Outcome {
                result: "timeout",
                error_type: Some("timeout")
            })
        );
        assert_eq!(r, t, "the run ends as the stage that ended it");
        let (_, t) = failed(
            "test:unit",
            "timed out: no worker answered within 30s of the request",
        );
        assert_eq!(t.unwrap().result, "timeout");
        // A give-up whose text mentions a timeout is still a delivery error.
        let (_, t) = failed(
            "test:unit",
            "gave up: the request was delivered 5 times without a result (the tester crashed or timed out each time)",
        );
        assert_eq!(
            t,
            Some(Outcome {
                result: "error",
                error_type: Some("delivery_failed")
            })
        );
        let (_, t) = failed(
            "test:unit",
            "malformed request at stream sequence 7: not JSON",
        );
        assert_eq!(t.unwrap().error_type, Some("delivery_failed"));
        // Test output naming a timeout does not make the failure one.
        let (_, t) = failed(
            "test:unit",
            "2 of 3 cases failed: cart.pays (timed out after 5s)",
        );
        assert_eq!(t, Some(Outcome::failure("test_failed")));
    }

    const APPROVED: &str = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"make\"]\n[[environment]]\nname = \"production\"\nrequires_approval = true\n[environment.deploy]\ncommand = [\"./deploy\"]\n[approval]\ntimeout_secs = 600\n";

    #[test]
    fn an_approval_that_never_comes_is_a_timeout_and_a_superseded_run_a_cancellation() {
        let mut sim = Sim::new(APPROVED);
        sim.script
            .insert("approval:production".into(), Answer::Silent);
        sim.run_to_end();
        sim.now += chrono::Duration::seconds(601);
        sim.run_to_end();
        let r = sim.run();
        assert_eq!(r.phase, Phase::Cancelled);
        let timeout = Outcome {
            result: "timeout",
            error_type: Some("timeout"),
        };
        assert_eq!(run(r), Some(timeout));
        let approval = r.stage("approval:production").unwrap();
        assert_eq!(
            task(r, approval),
            Some(timeout),
            "the stage says what the run says"
        );
        assert!(
            approval
                .reason
                .as_deref()
                .unwrap()
                .contains("while this stage awaited a decision"),
            "{approval:?}"
        );

        // The same stage named by a newer run superseding this one, before its time is up.
        let mut sim = Sim::new(APPROVED);
        sim.script
            .insert("approval:production".into(), Answer::Silent);
        sim.run_to_end();
        sim.now += chrono::Duration::seconds(5);
        let superseded = crate::decide::Command::Finish {
            outcome: Phase::Cancelled,
            reason: "superseded by run r-2".into(),
            stage: Some("approval:production".into()),
        };
        let e = superseded.to_event(&sim.run_id, "/slipway/conductor", sim.now);
        sim.push(e);
        let r = sim.run();
        assert_eq!(run(r), Some(Outcome::CANCELLATION));
        assert_eq!(
            task(r, r.stage("approval:production").unwrap()),
            Some(Outcome::CANCELLATION)
        );
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
