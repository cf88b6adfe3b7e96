//! `fold`: a run's state from its events, a pure function.
//!
//! Replaying a run is `events.iter().fold(None, fold)`. The fold is idempotent over
//! redelivery: an event id it has seen is ignored, the first terminal fact of a stage attempt
//! wins, facts for an attempt other than the requested one are stale, and once the run has
//! ended nothing changes it. So any order-preserving delivery with duplicates folds to the
//! same state as the log itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use chrono::{DateTime, Utc};

use crate::envelope::Event;
use crate::events::{ApprovalDecision, EventData, RunEnded, StageKind, StageVerb, stage_kind_of};
pub use crate::run::{
    Approval, ArtifactView, Deployment, POLICY_APPROVER, Phase, Run, StageState, StageStatus,
};
use crate::spec::PipelineSpec;
use crate::stage::StageKey;

impl Run {
    /// Folds a run from its events in log order.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a Event>) -> Option<Run> {
        events.into_iter().fold(None, fold)
    }

    fn stage_mut(&mut self, key: &str) -> &mut StageState {
        if let Some(i) = self.stages.iter().position(|s| s.name == key) {
            &mut self.stages[i]
        } else {
            // Stages outside the plan (a rollback) are appended as they appear.
            self.stages.push(StageState::pending(key.to_string()));
            self.stages.last_mut().expect("just pushed")
        }
    }

    fn recompute_phase(&mut self) {
        if self.phase.is_final() {
            return;
        }
        // Only the few active stages need their kind parsed from the key.
        let (mut approval, mut deploying, mut rolling, mut monitoring) =
            (false, false, false, false);
        for s in &self.stages {
            if matches!(s.status, StageStatus::Requested | StageStatus::Running) {
                match s.kind() {
                    Some(StageKind::Approval) => approval = true,
                    Some(StageKind::Deploy | StageKind::Rollback | StageKind::Promote) => {
                        deploying = true;
                    }
                    Some(StageKind::Rollout) => rolling = true,
                    Some(StageKind::Monitor) => monitoring = true,
                    _ => {}
                }
            }
        }
        self.phase = if approval {
            Phase::AwaitingApproval
        } else if deploying {
            Phase::Deploying
        } else if rolling {
            Phase::RollingOut
        } else if monitoring {
            Phase::Monitoring
        } else if self.stages.iter().all(|s| s.status == StageStatus::Pending) {
            Phase::Queued
        } else {
            Phase::Running
        };
    }
}

/// Folds one event into a run's state.
pub fn fold(state: Option<Run>, event: &Event) -> Option<Run> {
    let mut run = match (state, &event.data) {
        (None, EventData::RunCreated(created)) => {
            // Read as it was accepted, never validated again. One that does not read at all
            // makes no run; the readers that know where it is in the log say so
            // ([`unreadable`]).
            let (spec, steps) = spec_of(&created.spec)?;
            let stages = steps
                .iter()
                .flatten()
                .cloned()
                .map(StageState::pending)
                .collect();
            let mut seen = BTreeSet::new();
            seen.insert(event.id.clone());
            return Some(Run {
                run_id: created.run_id.clone(),
                pipeline: created.pipeline.clone(),
                phase: Phase::Queued,
                reason: None,
                change: created.change.clone(),
                source: created.source.clone(),
                rerun_of: created.rerun_of.clone(),
                created_at: event.time,
                finished_at: None,
                end_stage: None,
                stages,
                artifact: None,
                tests: Vec::new(),
                gates: Vec::new(),
                approvals: Vec::new(),
                deployments: Vec::new(),
                incidents: Vec::new(),
                rollouts: Vec::new(),
                calibrations: Vec::new(),
                events: 1,
                trace_id: event
                    .traceparent
                    .as_deref()
                    .and_then(crate::trace::parse)
                    .map(|(t, _)| t.to_string()),
                traceparent: event.traceparent.clone(),
                spec,
                artifact_ref: None,
                seen,
                approvals_by_stage: BTreeMap::new(),
                started_previous: BTreeMap::new(),
                steps,
            });
        }
        (None, _) => return None,
        (Some(run), _) => run,
    };
    fold_into(&mut run, event);
    Some(run)
}

/// A run's spec and plan from its snapshot, shared with every run held in this process whose
/// snapshot is byte for byte the same: runs of one pipeline mostly carry the same spec, and a
/// process holding many runs (the conductor, the gateway) would otherwise parse, plan and keep
/// one copy per run. Entries go when the last run holding them does.
type SharedSpec = (Arc<PipelineSpec>, Arc<Vec<Vec<String>>>);

fn spec_of(snapshot: &serde_json::Value) -> Option<SharedSpec> {
    type Shared = (Weak<PipelineSpec>, Weak<Vec<Vec<String>>>);
    static SPECS: LazyLock<Mutex<HashMap<[u8; 32], Shared>>> = LazyLock::new(Default::default);
    use sha2::Digest;
    let key: [u8; 32] = sha2::Sha256::digest(serde_json::to_vec(snapshot).ok()?).into();
    let mut specs = SPECS.lock().expect("spec cache lock");
    if let Some((spec, steps)) = specs.get(&key)
        && let (Some(spec), Some(steps)) = (spec.upgrade(), steps.upgrade())
    {
        return Some((spec, steps));
    }
    let spec = Arc::new(PipelineSpec::from_snapshot(snapshot).ok()?);
    let steps = Arc::new(crate::plan::step_keys(&spec));
    // Dropped entries are swept as the cache doubles, so it stays within twice the live ones.
    if specs.len() >= 64 && specs.len().is_power_of_two() {
        specs.retain(|_, (s, _)| s.strong_count() > 0);
    }
    specs.insert(key, (Arc::downgrade(&spec), Arc::downgrade(&steps)));
    Some((spec, steps))
}

/// Why `event` makes no run although it creates one: its spec snapshot does not read at all
/// (damaged, or not written by a conductor). `None` for every other event. The fold leaves such
/// a run out; each reader that knows the event's place in the log reports it with this reason,
/// so a run never disappears in silence.
pub fn unreadable(event: &Event) -> Option<String> {
    let EventData::RunCreated(created) = &event.data else {
        return None;
    };
    PipelineSpec::from_snapshot(&created.spec)
        .err()
        .map(|e| format!("its spec snapshot cannot be read: {e}"))
}

/// Folds one event into a run held in place (what [`fold`] does for an existing run).
pub fn fold_into(run: &mut Run, event: &Event) {
    if run.is_ended() || !run.seen.insert(event.id.clone()) {
        return;
    }
    run.events += 1;
    apply(run, event);
    run.recompute_phase();
    if run.is_ended() {
        // Nothing changes an ended run and nothing is decided about it, so what only guarded
        // against repeats or served decisions goes (most runs held are ended ones).
        run.seen = BTreeSet::new();
        run.approvals_by_stage = BTreeMap::new();
        run.started_previous = BTreeMap::new();
    }
}

fn apply(run: &mut Run, event: &Event) {
    let time = event.time;
    let ended = |run: &mut Run, phase: Phase, d: &RunEnded| {
        run.phase = phase;
        run.reason = Some(d.reason.clone());
        run.end_stage = d.stage.clone();
        run.finished_at = Some(time);
        end_open_stages(run, time);
    };
    match &event.data {
        EventData::RunSucceeded(d) => ended(run, Phase::Succeeded, d),
        EventData::RunFailed(d) => ended(run, Phase::Failed, d),
        EventData::RunCancelled(d) => ended(run, Phase::Cancelled, d),
        EventData::RunRejected(d) => ended(run, Phase::Rejected, d),
        EventData::RunRolledBack(d) => ended(run, Phase::RolledBack, d),
        EventData::ApprovalApproved(d)
        | EventData::ApprovalRejected(d)
        | EventData::ApprovalAutoApproved(d) => {
            apply_approval(run, event, d);
        }
        EventData::IncidentOpened(d) => run.incidents.push(d.incident_id.clone()),
        // One per evaluation attempt: a worker that evaluated again after a crash keeps the
        // first measurement, like the log keeps the first of two facts with one id.
        EventData::EvaluateCalibrated(d)
            if StageKey::parse(&d.stage).is_ok_and(|k| k.kind() == StageKind::Evaluate)
                && !run
                    .calibrations
                    .iter()
                    .any(|c| c.stage == d.stage && c.attempt == d.attempt) =>
        {
            run.calibrations.push(d.clone());
        }
        EventData::RolloutWeightSet(d) if is_rollout(&d.stage) => {
            if let Some(v) = crate::rollout::view_mut(&mut run.rollouts, &d.stage, d.attempt) {
                v.weight_set(d);
            }
        }
        EventData::RolloutAnalysed(d) if is_rollout(&d.stage) => {
            if let Some(v) = crate::rollout::view_mut(&mut run.rollouts, &d.stage, d.attempt) {
                let mut look = d.clone();
                look.at = time;
                v.looks.push(look);
            }
        }
        EventData::RolloutControlled(d) if is_rollout(&d.stage) => {
            if let Some(v) = crate::rollout::view_mut(&mut run.rollouts, &d.stage, d.attempt) {
                v.control(d);
            }
        }
        data => {
            if let Some((key, attempt, verb)) = data.stage_fact() {
                apply_stage_fact(run, event, key, attempt, verb);
            }
        }
    }
}

/// Whether `stage` is one of the run's rollout stages: rollout events about anything else
/// are not the judge's and change nothing.
fn is_rollout(stage: &str) -> bool {
    StageKey::parse(stage).is_ok_and(|k| k.kind() == StageKind::Rollout)
}

/// At the run's end, every stage that has not ended reads as `cancelled`, saying why: nothing
/// can end it any more (the fold ignores whatever comes after the run's end).
fn end_open_stages(run: &mut Run, time: DateTime<Utc>) {
    let ended = match run.phase {
        Phase::Succeeded => "succeeded",
        Phase::Failed => "failed",
        Phase::Rejected => "was rejected",
        Phase::RolledBack => "was rolled back",
        _ => "was cancelled",
    };
    let why = run.reason.as_deref().unwrap_or_default();
    for stage in &mut run.stages {
        let cut = match stage.status {
            StageStatus::Pending => "before this stage was requested",
            // An approval is never started: requested, it awaits people.
            StageStatus::Requested if stage.kind() == Some(StageKind::Approval) => {
                "while this stage awaited a decision"
            }
            StageStatus::Requested => "before this stage started",
            StageStatus::Running => "while this stage ran",
            StageStatus::Succeeded | StageStatus::Failed | StageStatus::Cancelled => continue,
        };
        stage.status = StageStatus::Cancelled;
        stage.finished_at = Some(time);
        stage.reason = Some(if why.is_empty() {
            format!("the run {ended} {cut}")
        } else {
            format!("the run {ended} {cut} ({why})")
        });
    }
}

fn apply_stage_fact(run: &mut Run, event: &Event, key: &str, attempt: u32, verb: StageVerb) {
    // The stage key must agree with the event type, or the event is not what it claims.
    if stage_kind_of(event.type_name()) != StageKey::parse(key).ok().map(|k| k.kind()) {
        return;
    }
    // Only planned stages, and rollbacks (which are never planned), have state.
    if run.stage(key).is_none() && !key.starts_with("rollback:") {
        return;
    }
    // A request before its turn is not the conductor's: it never becomes an attempt.
    if verb == StageVerb::Requested && !crate::plan::in_order(run, key) {
        return;
    }
    let time = event.time;
    if let (StageVerb::Started, EventData::DeployStarted(d) | EventData::RollbackStarted(d)) =
        (verb, &event.data)
        && let Some(prev) = &d.previous_artifact
    {
        run.started_previous.insert(key.to_string(), prev.clone());
    }
    let stage = run.stage_mut(key);
    match verb {
        StageVerb::Requested => {
            if attempt <= stage.attempt {
                return;
            }
            *stage = StageState::pending(key.to_string());
            stage.status = StageStatus::Requested;
            stage.attempt = attempt;
            stage.requested_at = Some(time);
        }
        StageVerb::Started => {
            if attempt != stage.attempt || stage.status != StageStatus::Requested {
                return;
            }
            stage.status = StageStatus::Running;
            stage.started_at = Some(time);
            if let EventData::DeployStarted(d)
            | EventData::RollbackStarted(d)
            | EventData::PromoteStarted(d) = &event.data
            {
                stage.worker = Some(d.worker.clone());
            } else if let Some(w) = started_worker(&event.data) {
                stage.worker = Some(w);
            }
        }
        StageVerb::Succeeded | StageVerb::Failed => {
            if attempt != stage.attempt || stage.status.is_terminal() || stage.attempt == 0 {
                return;
            }
            stage.finished_at = Some(time);
            if verb == StageVerb::Succeeded {
                stage.status = StageStatus::Succeeded;
            } else {
                stage.status = StageStatus::Failed;
                stage.reason = Some(failure_reason(&event.data));
            }
            record_outcome(run, event);
        }
    }
}

fn started_worker(data: &EventData) -> Option<String> {
    match data {
        EventData::BuildStarted(d)
        | EventData::TestStarted(d)
        | EventData::EvaluateStarted(d)
        | EventData::PerfStarted(d)
        | EventData::CostStarted(d)
        | EventData::MonitorStarted(d)
        | EventData::RolloutStarted(d) => Some(d.worker.clone()),
        _ => None,
    }
}

fn failure_reason(data: &EventData) -> String {
    let r = match data {
        EventData::BuildFailed(d)
        | EventData::DeployFailed(d)
        | EventData::RollbackFailed(d)
        | EventData::PromoteFailed(d) => Some(d.reason.clone()),
        EventData::RolloutFailed(d) => Some(d.reason.clone()),
        EventData::TestFailed(d) => d.reason.clone(),
        EventData::EvaluateFailed(d) | EventData::PerfFailed(d) | EventData::CostFailed(d) => {
            d.reason.clone()
        }
        EventData::MonitorFailed(d) => d.reason.clone(),
        _ => None,
    };
    r.unwrap_or_else(|| "failed without a reason".into())
}

/// Keeps what later stages and the status need from a terminal fact.
fn record_outcome(run: &mut Run, event: &Event) {
    let time = event.time;
    match &event.data {
        EventData::BuildSucceeded(d) => {
            run.artifact = Some(ArtifactView {
                digest: d.artifact.digest.clone(),
                size: d.artifact.size,
                bucket: d.artifact.bucket.clone(),
                object: d.artifact.name.clone(),
            });
            run.artifact_ref = Some(d.artifact.clone());
        }
        EventData::TestSucceeded(d) | EventData::TestFailed(d) => run.tests.push(d.clone()),
        EventData::EvaluateSucceeded(d)
        | EventData::EvaluateFailed(d)
        | EventData::PerfSucceeded(d)
        | EventData::PerfFailed(d)
        | EventData::CostSucceeded(d)
        | EventData::CostFailed(d) => run.gates.push(d.clone()),
        EventData::DeploySucceeded(d) => run.deployments.push(Deployment {
            environment: d.environment.clone(),
            version: d.version.clone(),
            previous_version: d.previous_version.clone(),
            previous_artifact: None,
            deployed_at: Some(time),
            rolled_back: false,
        }),
        EventData::RollbackSucceeded(d) => {
            if let Some(dep) = run
                .deployments
                .iter_mut()
                .rev()
                .find(|x| x.environment == d.environment)
            {
                dep.rolled_back = true;
            }
        }
        _ => {}
    }
    // The previous artifact is only known from the deploy's start: attach it now.
    if let EventData::DeploySucceeded(d) = &event.data {
        let prev = run.started_previous.get(&d.stage).cloned();
        if let Some(dep) = run.deployments.last_mut() {
            dep.previous_artifact = prev;
        }
    }
}

fn apply_approval(run: &mut Run, event: &Event, d: &ApprovalDecision) {
    let approved = event.data.approves();
    let Some(stage) = run.stage(&d.stage) else {
        return;
    };
    if stage.status != StageStatus::Requested || stage.attempt != d.attempt {
        return;
    }
    // Only decisions about this run's artifact count; the deployer re-checks the policy.
    let current = run.artifact.as_ref().map(|a| a.digest.as_str());
    if current != Some(d.artifact_digest.as_str()) {
        return;
    }
    let environment = StageKey::parse(&d.stage)
        .ok()
        .and_then(|k| k.environment().map(str::to_string))
        .unwrap_or_default();
    run.approvals.push(Approval {
        approver: d.approver.clone(),
        groups: d.groups.clone(),
        decision: if approved { "approve" } else { "reject" },
        environment,
        artifact_digest: d.artifact_digest.clone(),
        comment: d.comment.clone(),
        decided_at: d.decided_at,
        record: d.clone(),
    });
    let required = run
        .spec
        .approval
        .as_ref()
        .map_or(1, |p| p.required_approvals) as usize;
    let key = d.stage.clone();
    let time = event.time;
    if approved {
        let list = run.approvals_by_stage.entry(key.clone()).or_default();
        if !list.iter().any(|a| a.approver == d.approver) {
            list.push(d.clone());
        }
        if list.len() >= required || d.approver == POLICY_APPROVER {
            let stage = run.stage_mut(&key);
            stage.status = StageStatus::Succeeded;
            stage.finished_at = Some(time);
        }
    } else {
        let reason = match &d.comment {
            Some(c) => format!("rejected by {}: {c}", d.approver),
            None => format!("rejected by {}", d.approver),
        };
        let stage = run.stage_mut(&key);
        stage.status = StageStatus::Failed;
        stage.finished_at = Some(time);
        stage.reason = Some(reason);
    }
}

#[cfg(test)]
#[path = "fold_props.rs"]
mod props;
