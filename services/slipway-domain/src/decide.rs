//! `decide`: what a run needs next, a pure function of its state and the time.
//!
//! Decisions come back as [`Command`] values; the conductor turns each into an event and
//! appends it with run-wide optimistic concurrency. Replaying the log never repeats an effect:
//! the commands a decision yields are already in the log, so `decide` on the replayed state
//! asks for nothing new.

use crate::digest::Digest;
use chrono::{DateTime, Duration, Utc};

use crate::envelope::Event;
use crate::events::{
    ApprovalDecision, ApprovalRequested, BuildRequested, CostRequested, DeployRequested,
    EnvironmentRef, EvaluateRequested, EventData, GateSummary, MonitorRequested, ObjectRef,
    PerfRequested, RolloutRequested, RunEnded, Slot, StageKind, TestRequested, Verdict,
};
use crate::ids;
use crate::plan::{Step, approval_key, plan};
use crate::run::{Phase, Run, StageState, StageStatus};
use crate::spec::{AutoApprove, PipelineSpec};
use crate::stage::{StageKey, environment_of};

/// Stage attempts start at 1; a retry policy would raise it.
pub const FIRST_ATTEMPT: u32 = 1;

/// The approver name of an approval the policy granted without a human.
pub use crate::run::POLICY_APPROVER;

/// A decision about one run.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Ask for a stage: a `<stage>.requested` event.
    Request(EventData),
    /// A stage outlived its timeout: its `failed` fact, written by the conductor.
    FailStage(EventData),
    /// The approval policy approves by itself (every gate passed cleanly).
    AutoApprove(EventData),
    /// End the run.
    Finish {
        outcome: Phase,
        reason: String,
        stage: Option<String>,
    },
}

impl Command {
    /// The event recording this decision, with a deterministic id so a repeat is a duplicate.
    pub fn to_event(&self, run_id: &str, source: &str, now: DateTime<Utc>) -> Event {
        let (id, data) = match self {
            Command::Request(d) | Command::FailStage(d) | Command::AutoApprove(d) => {
                let (stage, attempt) = d.stage_fact().map_or(("", 0), |(s, a, _)| (s, a));
                let stage = match d {
                    EventData::ApprovalAutoApproved(a) => a.stage.as_str(),
                    _ => stage,
                };
                (
                    ids::derived(&[run_id, d.type_name(), stage, &attempt.to_string()]),
                    d.clone(),
                )
            }
            Command::Finish {
                outcome,
                reason,
                stage,
            } => {
                let ended = RunEnded {
                    reason: reason.clone(),
                    stage: stage.clone(),
                    by: Some("conductor".into()),
                };
                (ids::run_end(run_id), run_ended(*outcome, ended))
            }
        };
        Event::new(id, source, Some(run_id.to_string()), now, data)
    }
}

/// The event data that ends a run with `outcome`.
///
/// # Panics
/// When `outcome` is not a final phase.
pub fn run_ended(outcome: Phase, ended: RunEnded) -> EventData {
    match outcome {
        Phase::Succeeded => EventData::RunSucceeded(ended),
        Phase::Failed => EventData::RunFailed(ended),
        Phase::Cancelled => EventData::RunCancelled(ended),
        Phase::Rejected => EventData::RunRejected(ended),
        Phase::RolledBack => EventData::RunRolledBack(ended),
        other => panic!("{other:?} is not a final phase"),
    }
}

/// What the run needs now, as if it were the only run of its pipeline.
pub fn decide(run: &Run, now: DateTime<Utc>) -> Vec<Command> {
    decide_in(run, &Fleet::default(), now)
}

/// What the run needs now, given what the other runs of its pipeline do with its
/// environments (see [`Fleet`]).
pub fn decide_in(run: &Run, fleet: &Fleet, now: DateTime<Utc>) -> Vec<Command> {
    if run.is_ended() {
        return Vec::new();
    }
    let timeouts = timeouts(run, now);
    if !timeouts.is_empty() {
        return timeouts;
    }
    if let Some(cmds) = fleet.superseded(run) {
        return cmds;
    }
    for step in plan(&run.spec) {
        let next = match step {
            Step::Stages(keys) => stages_step(run, fleet, &keys),
            Step::Approval { environment } => approval_step(run, &environment),
        };
        match next {
            Next::Continue => {}
            Next::Wait => return Vec::new(),
            Next::Do(cmds) => return cmds,
        }
    }
    let n = run.stages.len();
    vec![Command::Finish {
        outcome: Phase::Succeeded,
        reason: format!("all {n} stages succeeded"),
        stage: None,
    }]
}

enum Next {
    Continue,
    Wait,
    Do(Vec<Command>),
}

fn stage_of<'a>(run: &'a Run, key: &str) -> Option<&'a StageState> {
    run.stage(key)
}

fn stages_step(run: &Run, fleet: &Fleet, keys: &[String]) -> Next {
    let states: Vec<Option<&StageState>> = keys.iter().map(|k| stage_of(run, k)).collect();
    if let Some(failed) = states
        .iter()
        .flatten()
        .find(|s| s.status == StageStatus::Failed)
    {
        return Next::Do(on_failure(run, failed));
    }
    let mut requests = Vec::new();
    for (key, state) in keys.iter().zip(&states) {
        let pending = state.is_none_or(|s| s.status == StageStatus::Pending);
        if pending
            && let Some(env) = environment_of(key, StageKind::Deploy)
            && !fleet.may_deploy(run, &env)
        {
            return Next::Wait;
        }
        if pending && let Some(data) = request_for(run, key) {
            requests.push(Command::Request(data));
        }
    }
    if !requests.is_empty() {
        return Next::Do(requests);
    }
    if states
        .iter()
        .all(|s| s.is_some_and(|s| s.status == StageStatus::Succeeded))
    {
        Next::Continue
    } else {
        Next::Wait
    }
}

fn finish(outcome: Phase, reason: String, stage: &str) -> Vec<Command> {
    vec![Command::Finish {
        outcome,
        reason,
        stage: Some(stage.to_string()),
    }]
}

fn on_failure(run: &Run, failed: &StageState) -> Vec<Command> {
    let reason = failed
        .reason
        .clone()
        .unwrap_or_else(|| "no reason given".into());
    let key = failed.name.as_str();
    let kind = failed.kind();
    if !matches!(kind, Some(StageKind::Monitor | StageKind::Rollout)) {
        return finish(Phase::Failed, format!("{key} failed: {reason}"), key);
    }
    // The monitor saw production degrade, or a rollout was aborted: roll back to the last good
    // version, if any (an aborted rollout always rolls its candidate slot back).
    let parsed = StageKey::parse(key).ok();
    let environment = parsed
        .as_ref()
        .and_then(StageKey::environment)
        .unwrap_or_default();
    let rollout = kind == Some(StageKind::Rollout);
    let rollback_wanted = rollout || run.spec.monitor.as_ref().is_some_and(|m| m.rollback);
    let slot = run
        .spec
        .environment(environment)
        .and_then(|e| e.rollout.as_ref())
        .map(|_| {
            if rollout {
                Slot::Candidate
            } else {
                Slot::Stable
            }
        });
    let previous = run
        .deployment(environment)
        .and_then(|d| Some((d.previous_version.clone()?, d.previous_artifact.clone()?)));
    let (true, Some((version, artifact))) = (rollback_wanted, previous) else {
        let why = if rollback_wanted {
            "no earlier version to roll back to"
        } else {
            "rollback is disabled"
        };
        return finish(Phase::Failed, format!("{key} failed: {reason}; {why}"), key);
    };
    let rb_key = StageKind::Rollback.key(Some(environment));
    match run.stage(&rb_key).map(|s| s.status) {
        None | Some(StageStatus::Pending) => {
            let Some(env) = run.spec.environment(environment) else {
                return finish(Phase::Failed, format!("{key} failed: {reason}"), key);
            };
            vec![Command::Request(EventData::RollbackRequested(
                DeployRequested {
                    stage: rb_key,
                    attempt: FIRST_ATTEMPT,
                    pipeline: run.pipeline.clone(),
                    environment: environment.to_string(),
                    artifact,
                    version,
                    target: env.deploy.clone(),
                    reason: Some(format!("{key} failed: {reason}")),
                    slot,
                },
            ))]
        }
        Some(StageStatus::Succeeded) => finish(
            Phase::RolledBack,
            format!("{key} failed: {reason}; rolled back to {version}"),
            key,
        ),
        Some(StageStatus::Failed) => {
            let rb_reason = run
                .stage(&rb_key)
                .and_then(|s| s.reason.clone())
                .unwrap_or_default();
            finish(
                Phase::Failed,
                format!("{key} failed: {reason}; rollback failed: {rb_reason}"),
                &rb_key,
            )
        }
        Some(_) => Vec::new(),
    }
}

fn approval_step(run: &Run, environment: &str) -> Next {
    let key = approval_key(environment);
    let Some(policy) = run.spec.approval.as_ref() else {
        return Next::Continue;
    };
    match run.stage(&key).map(|s| s.status) {
        None | Some(StageStatus::Pending) => match request_for(run, &key) {
            Some(data) => Next::Do(vec![Command::Request(data)]),
            None => Next::Wait,
        },
        Some(StageStatus::Requested | StageStatus::Running) => {
            let clean = run.gates.iter().all(|g| g.verdict == Verdict::Pass);
            let digest = run.artifact.as_ref().map(|a| a.digest.clone());
            match (policy.auto_approve, digest) {
                (AutoApprove::WhenClean, Some(artifact_digest)) if clean => {
                    let attempt = run.stage(&key).map_or(FIRST_ATTEMPT, |s| s.attempt);
                    Next::Do(vec![Command::AutoApprove(EventData::ApprovalAutoApproved(
                        ApprovalDecision {
                            stage: key,
                            attempt,
                            approver: POLICY_APPROVER.into(),
                            groups: Vec::new(),
                            artifact_digest,
                            gates_digest: gates_digest(run),
                            comment: Some("every gate passed cleanly".into()),
                            decided_at: run
                                .stage(&approval_key(environment))
                                .and_then(|s| s.requested_at)
                                .unwrap_or(run.created_at),
                            signature: None,
                            issuer: None,
                        },
                    ))])
                }
                _ => Next::Wait,
            }
        }
        Some(StageStatus::Succeeded) => Next::Continue,
        // Only an ended run has cancelled stages, and nothing is decided for it.
        Some(StageStatus::Cancelled) => Next::Wait,
        Some(StageStatus::Failed) => {
            let reason = run
                .stage(&key)
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "rejected".into());
            Next::Do(finish(Phase::Rejected, reason, &key))
        }
    }
}

/// The `requested` event for a stage, built from the spec snapshot and the facts so far.
fn request_for(run: &Run, key: &str) -> Option<EventData> {
    let spec = &run.spec;
    let parsed = StageKey::parse(key).ok()?;
    let (kind, instance) = (parsed.kind(), parsed.instance());
    let stage = key.to_string();
    let attempt = FIRST_ATTEMPT;
    let pipeline = run.pipeline.clone();
    let artifact = || run.artifact_ref.clone();
    let data = match kind {
        StageKind::Build => EventData::BuildRequested(BuildRequested {
            stage,
            attempt,
            pipeline,
            source: run.source.clone(),
            build: spec.build.clone(),
        }),
        StageKind::Test => {
            let suite = spec
                .test
                .iter()
                .find(|t| Some(t.name.as_str()) == instance)?;
            EventData::TestRequested(TestRequested {
                stage,
                attempt,
                source: run.source.clone(),
                artifact: artifact()?,
                suite: suite.clone(),
            })
        }
        StageKind::Deploy | StageKind::Promote => {
            let env = spec.environment(instance?)?;
            let artifact = artifact()?;
            // With a rollout, the change goes to the candidate slot first and to the stable
            // slot once promoted.
            let slot = env.rollout.as_ref().map(|_| {
                if kind == StageKind::Promote {
                    Slot::Stable
                } else {
                    Slot::Candidate
                }
            });
            let d = DeployRequested {
                stage,
                attempt,
                version: version_of(&run.pipeline, &artifact),
                pipeline,
                environment: env.name.clone(),
                artifact,
                target: env.deploy.clone(),
                reason: None,
                slot,
            };
            if kind == StageKind::Promote {
                EventData::PromoteRequested(d)
            } else {
                EventData::DeployRequested(d)
            }
        }
        StageKind::Rollout => {
            let env = spec.environment(instance?)?;
            EventData::RolloutRequested(RolloutRequested {
                stage,
                attempt,
                environment: EnvironmentRef {
                    name: env.name.clone(),
                    url: env.url.clone(),
                },
                version: version_of(&run.pipeline, &artifact()?),
                stable_version: run
                    .deployment(&env.name)
                    .and_then(|d| d.previous_version.clone()),
                pipeline,
                spec: env.rollout.clone()?,
                traffic: env.traffic.clone()?,
            })
        }
        StageKind::Evaluate => EventData::EvaluateRequested(EvaluateRequested {
            stage,
            attempt,
            pipeline,
            source: run.source.clone(),
            artifact: artifact()?,
            environment: gated_environment(spec),
            spec: spec.gates.model_evaluation.clone()?,
        }),
        StageKind::Perf => EventData::PerfRequested(PerfRequested {
            stage,
            attempt,
            pipeline,
            source: run.source.clone(),
            artifact: artifact()?,
            environment: gated_environment(spec)?,
            spec: spec.gates.performance.clone()?,
        }),
        StageKind::Cost => EventData::CostRequested(CostRequested {
            stage,
            attempt,
            pipeline,
            artifact: artifact()?,
            spec: spec.gates.cost.clone()?,
            inputs: ["evaluate", "perf"]
                .iter()
                .filter_map(|k| run.gate(k).cloned())
                .collect(),
        }),
        StageKind::Approval => EventData::ApprovalRequested(ApprovalRequested {
            stage,
            attempt,
            environment: instance?.to_string(),
            artifact_digest: run.artifact.as_ref()?.digest.clone(),
            gates_digest: gates_digest(run),
            gates: run
                .gates
                .iter()
                .map(|g| GateSummary {
                    stage: g.stage.clone(),
                    verdict: g.verdict,
                })
                .collect(),
            policy: spec.approval.clone()?,
        }),
        StageKind::Monitor => {
            let env = spec.environment(instance?)?;
            EventData::MonitorRequested(MonitorRequested {
                stage,
                attempt,
                environment: EnvironmentRef {
                    name: env.name.clone(),
                    url: env.url.clone(),
                },
                version: version_of(&run.pipeline, &artifact()?),
                spec: spec.monitor.clone()?,
            })
        }
        // Rollbacks are requested by the monitor's failure path, never from the plan.
        StageKind::Rollback => return None,
    };
    Some(data)
}

fn gated_environment(spec: &PipelineSpec) -> Option<EnvironmentRef> {
    let i = spec.gates_environment_index()?;
    let e = &spec.environment[i];
    Some(EnvironmentRef {
        name: e.name.clone(),
        url: e.url.clone(),
    })
}

/// The version name a deploy gets: pipeline and the artifact digest's first 12 hex digits.
pub fn version_of(pipeline: &str, artifact: &ObjectRef) -> String {
    format!("{pipeline}-{}", artifact.digest.short(12))
}

/// `sha256:` over the gate reports in log order: what an approval is about.
pub fn gates_digest(run: &Run) -> Digest {
    Digest::of(&serde_json::to_vec(&run.gates).expect("reports serialise"))
}

/// How long after its request a stage may go without a terminal fact.
pub fn stage_timeout(spec: &PipelineSpec, key: &str) -> Option<Duration> {
    let parsed = StageKey::parse(key).ok()?;
    let (kind, instance) = (parsed.kind(), parsed.instance());
    let secs = match kind {
        StageKind::Build => spec.build.timeout_secs,
        StageKind::Test => {
            spec.test
                .iter()
                .find(|t| Some(t.name.as_str()) == instance)?
                .timeout_secs
        }
        StageKind::Deploy | StageKind::Rollback | StageKind::Promote => {
            spec.environment(instance?)?.deploy.timeout_secs
        }
        StageKind::Rollout => {
            spec.environment(instance?)?
                .rollout
                .as_ref()?
                .longest_secs()
                + 60
        }
        StageKind::Evaluate => spec.gates.model_evaluation.as_ref()?.timeout_secs,
        StageKind::Perf => {
            let p = spec.gates.performance.as_ref()?;
            p.timeout_secs.max(p.duration_secs + p.warmup_secs + 30)
        }
        StageKind::Cost => spec.gates.cost.as_ref()?.timeout_secs,
        StageKind::Approval => return Some(secs(spec.approval.as_ref()?.timeout_secs)),
        StageKind::Monitor => {
            let m = spec.monitor.as_ref()?;
            m.window_secs + 2 * m.probe_interval_ms.div_ceil(1000) + 60
        }
    };
    // The worker enforces the timeout itself and reports a clearer failure; the conductor
    // only steps in when no worker answers, after a grace period.
    let grace = (5 + secs / 4).min(300);
    Some(self::secs(secs + grace))
}

fn secs(s: u64) -> Duration {
    Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
}

/// How long a rollout stage waited on people, which its timeout does not count: paused, or an
/// A/B winner held for an approver (as long as the approval policy lets a decision wait).
fn rollout_waits(run: &Run, key: &str, from: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    let Some(view) = run.rollouts.iter().find(|v| v.stage == key) else {
        return Duration::zero();
    };
    let paused = crate::rollout::paused_secs(&view.controls, from, now);
    let approval = if view.looks.iter().any(|l| l.decision == "await_approval") {
        run.spec
            .approval
            .as_ref()
            .map_or(7 * 24 * 3600, |a| a.timeout_secs)
    } else {
        0
    };
    secs(u64::try_from(paused).unwrap_or(0) + approval)
}

/// When a stage in flight times out, as the conductor judges it: `None` for a stage that is
/// not in flight or has no timeout. (The gateway's overdue metric asks the same.)
pub fn stage_deadline(run: &Run, s: &StageState, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if !matches!(s.status, StageStatus::Requested | StageStatus::Running) {
        return None;
    }
    let limit = stage_timeout(&run.spec, &s.name)?;
    // A started stage is timed from its start: waiting in a busy worker's queue is not the
    // stage's own time. A rollout's time waiting on people does not count either.
    let from = s.started_at.or(s.requested_at)?;
    Some(from + limit + rollout_waits(run, &s.name, from, now))
}

fn timeouts(run: &Run, now: DateTime<Utc>) -> Vec<Command> {
    let mut out = Vec::new();
    for s in &run.stages {
        let Some(deadline) = stage_deadline(run, s, now) else {
            continue;
        };
        if now < deadline {
            continue;
        }
        let from = s
            .started_at
            .or(s.requested_at)
            .expect("a deadline has a start");
        let kind = s.kind().expect("planned stages have kinds");
        let waited = (deadline - from).num_seconds();
        if kind == StageKind::Approval {
            return vec![Command::Finish {
                outcome: Phase::Cancelled,
                reason: format!("no approval decision within the policy's timeout of {waited}s"),
                stage: Some(s.name.clone()),
            }];
        }
        let reason = match (&s.worker, s.started_at) {
            (Some(w), Some(at)) => format!(
                "timed out: started by {w} at {} but no result within {waited}s",
                at.to_rfc3339()
            ),
            _ => format!(
                "timed out: no worker answered within {waited}s of the request (is the {} service running?)",
                crate::service::Service::works(kind)
            ),
        };
        out.push(Command::FailStage(EventData::stage_failure(
            kind, &s.name, s.attempt, reason,
        )));
    }
    out
}

/// Where a run stands with respect to the environments its pipeline shares with other runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    run_id: String,
    pipeline: String,
    /// Creation order: time, then the change's stream sequence.
    order: (DateTime<Utc>, u64),
    /// The environment the run holds: deploying, monitoring or rolling it back.
    holds: Option<String>,
    /// The environment the run waits for (its next step is that environment's approval or
    /// deploy), and whether it is approved for it.
    waits: Option<(String, bool)>,
}

impl Position {
    fn of(run: &Run) -> Self {
        let status = |key: String| run.stage(&key).map(|s| s.status);
        let active = |key: String| {
            matches!(
                status(key),
                Some(StageStatus::Requested | StageStatus::Running)
            )
        };
        let mut holds = None;
        for env in &run.spec.environment {
            let e = env.name.as_str();
            let deployed_pending_monitor = status(StageKind::Deploy.key(Some(e)))
                == Some(StageStatus::Succeeded)
                && run.spec.monitors(e)
                && !status(StageKind::Monitor.key(Some(e))).is_some_and(StageStatus::is_terminal);
            let monitor_failed_rollback_due = status(StageKind::Monitor.key(Some(e)))
                == Some(StageStatus::Failed)
                && !status(StageKind::Rollback.key(Some(e))).is_some_and(StageStatus::is_terminal);
            // Gates measure the environment after its deploy: it is held until they are done.
            let gated_here = run
                .spec
                .gates_environment_index()
                .map(|i| run.spec.environment[i].name.as_str())
                == Some(e)
                && status(StageKind::Deploy.key(Some(e))) == Some(StageStatus::Succeeded)
                && ["evaluate", "perf", "cost"].iter().any(|g| {
                    planned_has(run, g)
                        && !status((*g).to_string()).is_some_and(StageStatus::is_terminal)
                });
            // A rollout holds its environment from the candidate's deploy to its promotion
            // (or its rollback).
            let rolling_out = env.rollout.is_some()
                && status(StageKind::Deploy.key(Some(e))) == Some(StageStatus::Succeeded)
                && !status(StageKind::Promote.key(Some(e))).is_some_and(StageStatus::is_terminal)
                && !status(StageKind::Rollback.key(Some(e))).is_some_and(StageStatus::is_terminal);
            if active(StageKind::Deploy.key(Some(e)))
                || active(StageKind::Rollback.key(Some(e)))
                || rolling_out
                || deployed_pending_monitor
                || monitor_failed_rollback_due
                || gated_here
            {
                holds = Some(e.to_string());
            }
        }
        Self {
            run_id: run.run_id.clone(),
            pipeline: run.pipeline.clone(),
            order: (run.created_at, run.change.seq),
            holds,
            waits: next_environment(run),
        }
    }
}

fn planned_has(run: &Run, key: &str) -> bool {
    run.stages.iter().any(|s| s.name == key)
}

/// The environment whose approval or deploy is the run's next step, if any.
fn next_environment(run: &Run) -> Option<(String, bool)> {
    let done = |key: &str| {
        run.stage(key)
            .is_some_and(|s| s.status == StageStatus::Succeeded)
    };
    for step in plan(&run.spec) {
        match step {
            Step::Approval { environment } => {
                if !done(&approval_key(&environment)) {
                    return Some((environment, false));
                }
            }
            Step::Stages(keys) => {
                if let [key] = keys.as_slice()
                    && let Some(env) = environment_of(key, StageKind::Deploy)
                    && run
                        .stage(key)
                        .is_none_or(|s| s.status == StageStatus::Pending)
                {
                    let needs = run
                        .spec
                        .environment(&env)
                        .is_some_and(|e| e.requires_approval);
                    let approved = !needs || done(&approval_key(&env));
                    return Some((env, approved));
                }
                if !keys.iter().all(|k| done(k)) {
                    return None;
                }
            }
        }
    }
    None
}

/// The other active runs of a pipeline, as far as its environments are concerned: the input
/// of the cross-run rules. Deploys to one environment of one pipeline happen one at a time
/// and in creation order; a newer approved run supersedes older runs still waiting for the
/// same environment (they end `cancelled`, saying why).
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    positions: Vec<Position>,
}

impl Fleet {
    /// The fleet of the given runs; ended runs are left out, and each run only ever meets the
    /// runs of its own pipeline.
    pub fn of<'a>(runs: impl IntoIterator<Item = &'a Run>) -> Self {
        Self {
            positions: runs
                .into_iter()
                .filter(|r| !r.is_ended())
                .map(Position::of)
                .collect(),
        }
    }

    fn others<'a>(&'a self, run: &'a Run) -> impl Iterator<Item = &'a Position> + 'a {
        self.positions
            .iter()
            .filter(move |p| p.run_id != run.run_id && p.pipeline == run.pipeline)
    }

    /// Whether `run` may request its deploy to `env` now.
    fn may_deploy(&self, run: &Run, env: &str) -> bool {
        let me = (run.created_at, run.change.seq);
        let needs_approval = run
            .spec
            .environment(env)
            .is_some_and(|e| e.requires_approval);
        for p in self.others(run) {
            if p.holds.as_deref() == Some(env) {
                return false;
            }
            // In order, unless approval decides (an approved newer run supersedes instead).
            if !needs_approval && p.order < me && p.waits.as_ref().is_some_and(|(e, _)| e == env) {
                return false;
            }
        }
        true
    }

    /// The end of `run` when a newer approved run of its pipeline supersedes it.
    fn superseded(&self, run: &Run) -> Option<Vec<Command>> {
        let (env, _) = next_environment(run)?;
        if !run
            .spec
            .environment(&env)
            .is_some_and(|e| e.requires_approval)
        {
            return None;
        }
        let me = (run.created_at, run.change.seq);
        let newer = self.others(run).find(|p| {
            p.order > me
                && (p.holds.as_deref() == Some(env.as_str())
                    || p.waits.as_ref() == Some(&(env.clone(), true)))
        })?;
        Some(vec![Command::Finish {
            outcome: Phase::Cancelled,
            reason: format!(
                "superseded by run {}, a newer approved change for {env}",
                newer.run_id
            ),
            stage: Some(approval_key(&env)),
        }])
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
