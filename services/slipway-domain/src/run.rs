//! A run's state, as [`crate::fold`] builds it from the run's events: its phase, its stages,
//! what it built, tested, deployed and was decided about. `slipway status`, `replay` and the
//! gateway show it; [`crate::decide`] and [`crate::plan`] read it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;

use crate::events::{
    ApprovalDecision, ChangeInfo, GateReport, ObjectRef, SourceRef, StageKind, TestReport,
};
use crate::spec::PipelineSpec;

/// The approver the policy's automatic approval names.
pub const POLICY_APPROVER: &str = "slipway:policy";

/// Where a run is. `slipway status` prints it; the set is part of the CLI contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Running,
    AwaitingApproval,
    Deploying,
    /// A rollout is moving traffic to the candidate.
    RollingOut,
    Monitoring,
    Succeeded,
    Failed,
    Rejected,
    RolledBack,
    Cancelled,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Succeeded
                | Phase::Failed
                | Phase::Rejected
                | Phase::RolledBack
                | Phase::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Running => "running",
            Phase::AwaitingApproval => "awaiting_approval",
            Phase::Deploying => "deploying",
            Phase::RollingOut => "rolling_out",
            Phase::Monitoring => "monitoring",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Rejected => "rejected",
            Phase::RolledBack => "rolled_back",
            Phase::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Planned, not requested yet.
    Pending,
    /// Requested, no worker has started it.
    Requested,
    Running,
    Succeeded,
    Failed,
    /// Not ended when the run did: cut off while requested or running, or never requested.
    /// Set by the fold at the run's end, so replay and live agree; the reason says why.
    Cancelled,
}

impl StageStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StageStatus::Succeeded | StageStatus::Failed | StageStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct StageState {
    /// Stage key: `build`, `test:<suite>`, `deploy:<environment>`, ...
    pub name: String,
    pub status: StageStatus,
    pub attempt: u32,
    pub requested_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub worker: Option<String>,
}

impl StageState {
    pub(crate) fn pending(name: String) -> Self {
        Self {
            name,
            status: StageStatus::Pending,
            attempt: 0,
            requested_at: None,
            started_at: None,
            finished_at: None,
            reason: None,
            worker: None,
        }
    }

    pub fn kind(&self) -> Option<StageKind> {
        self.key().map(|k| k.kind())
    }

    /// The stage's key, parsed.
    pub fn key(&self) -> Option<crate::stage::StageKey> {
        crate::stage::StageKey::parse(&self.name).ok()
    }
}

/// The built artifact, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct ArtifactView {
    pub digest: crate::digest::Digest,
    pub size: u64,
    pub bucket: String,
    pub object: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Deployment {
    pub environment: String,
    pub version: String,
    pub previous_version: Option<String>,
    /// The artifact live before, so a rollback can redeploy it.
    #[serde(skip)]
    pub previous_artifact: Option<ObjectRef>,
    pub deployed_at: Option<DateTime<Utc>>,
    pub rolled_back: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Approval {
    pub approver: String,
    /// The approver's groups when deciding, as the gateway recorded them.
    pub groups: Vec<String>,
    pub decision: &'static str,
    pub environment: String,
    pub artifact_digest: crate::digest::Digest,
    pub comment: Option<String>,
    pub decided_at: DateTime<Utc>,
    /// The decision as recorded, with the gateway's signature, for the deployer to verify.
    #[serde(skip)]
    pub record: ApprovalDecision,
}

/// One run, folded from its events.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Run {
    pub run_id: String,
    pub pipeline: String,
    pub phase: Phase,
    /// Why the run ended, once it has.
    pub reason: Option<String>,
    pub change: ChangeInfo,
    pub source: SourceRef,
    pub rerun_of: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The stage that decided the run's end, when one did (a timeout's, a failure's).
    #[serde(skip)]
    pub end_stage: Option<String>,
    pub stages: Vec<StageState>,
    pub artifact: Option<ArtifactView>,
    pub tests: Vec<TestReport>,
    pub gates: Vec<GateReport>,
    pub approvals: Vec<Approval>,
    pub deployments: Vec<Deployment>,
    pub incidents: Vec<String>,
    /// Progressive deliveries, one per rollout environment reached.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<crate::rollout::RolloutView>,
    /// The measured noise of each evaluation that asked its datasets more than once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calibrations: Vec<crate::events::Calibration>,
    /// Number of events folded (duplicates excluded).
    pub events: u64,
    /// The run's trace (W3C trace id), from its first event.
    pub trace_id: Option<String>,
    /// The run's `traceparent`, carried by every event about it.
    #[serde(skip)]
    pub traceparent: Option<String>,
    /// Shared by the runs held in this process whose snapshots are the same (see [`crate::fold`]).
    #[serde(skip)]
    pub spec: Arc<PipelineSpec>,
    #[serde(skip)]
    pub artifact_ref: Option<ObjectRef>,
    #[serde(skip)]
    pub(crate) seen: BTreeSet<String>,
    #[serde(skip)]
    pub(crate) approvals_by_stage: BTreeMap<String, Vec<ApprovalDecision>>,
    /// The artifact live before each deploy stage started, by stage key.
    #[serde(skip)]
    pub(crate) started_previous: BTreeMap<String, ObjectRef>,
    /// The spec's plan (see [`crate::plan::step_keys`]), made once: every request is checked
    /// against it.
    #[serde(skip)]
    pub(crate) steps: Arc<Vec<Vec<String>>>,
}

impl Run {
    /// The plan's steps, as stage keys.
    pub fn step_keys(&self) -> &[Vec<String>] {
        &self.steps
    }

    pub fn stage(&self, key: &str) -> Option<&StageState> {
        self.stages.iter().find(|s| s.name == key)
    }

    pub fn is_ended(&self) -> bool {
        self.phase.is_final()
    }

    /// The latest report of a gate stage.
    pub fn gate(&self, key: &str) -> Option<&GateReport> {
        self.gates.iter().rev().find(|g| g.stage == key)
    }

    pub fn deployment(&self, environment: &str) -> Option<&Deployment> {
        self.deployments
            .iter()
            .rev()
            .find(|d| d.environment == environment)
    }

    /// Approvals that count for a stage: distinct approvers, this artifact, no rejection.
    pub fn approvals_for(&self, stage: &str) -> &[ApprovalDecision] {
        self.approvals_by_stage
            .get(stage)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The status JSON (`slipway status --json`, `slipway replay --json`, the gateway).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("run state serialises")
    }
}
