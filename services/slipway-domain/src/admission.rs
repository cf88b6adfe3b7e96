//! Whether a worker works on a request, as a pure function of the request's stage attempt and
//! the run as the log holds it: a redelivered request may already be done, its run may have
//! ended, or an earlier delivery may have started work that must not run twice.

use crate::run::{Phase, Run, StageStatus};

/// What a worker does with a delivered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The attempt is open: do the work.
    Work,
    /// An earlier delivery started this attempt and never reported, and the work is idempotent
    /// (a deploy that says so): do it again, under the same key.
    Resume,
    /// Nothing to do: the request is answered as done.
    Skip(Skip),
    /// The run does not exist: the request is refused for good.
    NoRun,
}

/// Why a request needs no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The run ended (its phase).
    RunEnded(Phase),
    /// The attempt already has its result, or a later attempt replaced it.
    Settled(StageStatus),
    /// The run has no such stage.
    NotInRun,
    /// An earlier delivery started an attempt that must run at most once (a deploy): it may
    /// have run, so it is left to the stage's timeout rather than repeated.
    StartedElsewhere,
}

/// Whether to work on `stage`'s attempt `attempt` of `run`. `exclusive`: the work runs at
/// most once per attempt; `may_resume`: whether such work is idempotent (asked only then).
pub fn admit(
    run: Option<&Run>,
    stage: &str,
    attempt: u32,
    exclusive: bool,
    may_resume: impl FnOnce(&Run) -> bool,
) -> Admission {
    let Some(run) = run else {
        return Admission::NoRun;
    };
    if run.is_ended() {
        return Admission::Skip(Skip::RunEnded(run.phase));
    }
    let Some(s) = run.stage(stage) else {
        return Admission::Skip(Skip::NotInRun);
    };
    if s.attempt != attempt || s.status.is_terminal() {
        return Admission::Skip(Skip::Settled(s.status));
    }
    match s.status {
        StageStatus::Running if exclusive && may_resume(run) => Admission::Resume,
        StageStatus::Running if exclusive => Admission::Skip(Skip::StartedElsewhere),
        _ => Admission::Work,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Answer, Sim};

    const PIPE: &str = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"make\"]\n[[test]]\nname = \"unit\"\ncommand = [\"t\"]\n";

    #[test]
    fn redeliveries_ended_runs_and_started_attempts_are_not_worked_twice() {
        let no = |_: &Run| false;
        assert_eq!(admit(None, "build", 1, false, no), Admission::NoRun);
        let mut sim = Sim::new(PIPE);
        sim.script.insert("test:unit".into(), Answer::Silent);
        sim.run_to_end();
        let run = sim.run().clone();
        assert_eq!(
            admit(Some(&run), "test:unit", 1, false, no),
            Admission::Work
        );
        assert_eq!(
            admit(Some(&run), "build", 1, false, no),
            Admission::Skip(Skip::Settled(StageStatus::Succeeded))
        );
        assert_eq!(
            admit(Some(&run), "test:unit", 2, false, no),
            Admission::Skip(Skip::Settled(StageStatus::Requested)),
            "another attempt than the log's"
        );
        assert_eq!(
            admit(Some(&run), "deploy:staging", 1, false, no),
            Admission::Skip(Skip::NotInRun)
        );
        // Started by an earlier delivery: repeated only when exclusive work is idempotent.
        let started =
            crate::facts::started_data("dev.slipway.test.requested.v1", "test:unit", 1, "t-1")
                .unwrap();
        sim.push(crate::facts::fact(
            crate::service::Service::Tester,
            &sim.run_id,
            started,
            sim.now,
        ));
        let run = sim.run().clone();
        assert_eq!(
            admit(Some(&run), "test:unit", 1, false, no),
            Admission::Work
        );
        assert_eq!(
            admit(Some(&run), "test:unit", 1, true, no),
            Admission::Skip(Skip::StartedElsewhere)
        );
        assert_eq!(
            admit(Some(&run), "test:unit", 1, true, |_| true),
            Admission::Resume
        );
        // Ended: nothing more.
        let end = crate::decide::Command::Finish {
            outcome: Phase::Cancelled,
            reason: "stop".into(),
            stage: None,
        };
        sim.push(end.to_event(&sim.run_id, "/slipway/cli", sim.now));
        assert_eq!(
            admit(Some(sim.run()), "test:unit", 1, false, no),
            Admission::Skip(Skip::RunEnded(Phase::Cancelled))
        );
    }
}
