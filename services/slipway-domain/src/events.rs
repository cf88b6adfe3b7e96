//! The event catalogue: every event of the pipeline, as typed data.
//!
//! Each event is a CloudEvent whose `type` is `dev.slipway.<noun>.<verb>.v<N>` and whose
//! `data` is one of the structs below (JSON Schemas in `schemas/events/`, generated from these
//! types). The log outlives every release, so (docs/events.md, "Evolving events"):
//!
//! - readers are tolerant: a field in an event's data that these types do not know is
//!   ignored (a newer producer added it);
//! - a change that is not additive makes a new version of the type, and the older version is
//!   turned into the current one at decode time by its upcaster in [`UPCASTERS`], the one
//!   place that knows old shapes: the fold only ever sees the current shape.
//!
//! Subjects follow the type: a run event `dev.slipway.build.succeeded.v1` for run `R` lives on
//! `slipway.run.R.build.succeeded`, so a service consumes only its requests with a subject
//! filter and one run can be replayed alone with `slipway.run.R.>`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::digest::Digest;
pub use crate::rollout::{RolloutAnalysis, RolloutControl, RolloutReport, Slot, WeightSet};
use crate::rollout::{RolloutSpec, TrafficSpec};
use crate::spec::{
    ApprovalPolicy, BuildSpec, CostSpec, DeployTarget, ModelEvaluationSpec, MonitorSpec,
    PerformanceSpec, TestSuiteSpec,
};

/// Where a change's source lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceRef {
    /// A local directory, copied into a fresh workspace.
    Directory { path: String },
    /// A git repository at a revision (commit, tag or branch).
    Git { url: String, revision: String },
}

/// `dev.slipway.change.submitted.v1` on `slipway.changes.<source>`: a change to deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChangeSubmitted {
    /// The pipeline spec, as TOML text (validated by the conductor).
    pub spec: String,
    pub source: SourceRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Set by `slipway rerun`: the run this change repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// The commit the change is, when a git host (or the submitter) said which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitRef>,
}

/// A commit on a git host: what the page links, and where a run's result is reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CommitRef {
    pub sha: String,
    /// `owner/name` (GitHub) or `group/project` (GitLab).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// `github` or `gitlab`, when it came from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The commit's web page, as the host gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl ChangeSubmitted {
    /// What makes a change deliverable, checked alike where it comes in (the gateway answers
    /// `400`) and where it becomes a run (the conductor records `change.rejected`): its spec,
    /// and a directory source given as an absolute path.
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn validate(&self) -> Result<crate::spec::PipelineSpec, String> {
        let spec = crate::spec::PipelineSpec::parse(&self.spec).map_err(|e| e.to_string())?;
        if let SourceRef::Directory { path } = &self.source
            && !std::path::Path::new(path).is_absolute()
        {
            return Err(format!(
                "data.source.path: {path:?} must be an absolute path"
            ));
        }
        Ok(spec)
    }
}

/// `dev.slipway.change.rejected.v1` on `slipway.intake.rejected`: a change that made no run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChangeRejected {
    /// Stream sequence of the rejected message (it stays in the log).
    pub change_seq: u64,
    pub change_subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_source: Option<String>,
    pub reason: String,
}

/// What a run remembers of the change that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChangeInfo {
    pub id: String,
    pub source: String,
    pub seq: u64,
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// For a change that came as a CDEvent: its subject (the merged change, or the artifact's
    /// purl), given to the build as `SLIPWAY_CHANGE_SUBJECT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitRef>,
}

/// `dev.slipway.run.created.v1`: the first event of a run, with its spec snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCreated {
    pub run_id: String,
    pub pipeline: String,
    pub change: ChangeInfo,
    pub source: SourceRef,
    /// The validated pipeline spec (`schemas/pipeline.schema.json`), frozen for this run.
    pub spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
}

/// `dev.slipway.run.{succeeded,failed,cancelled,rejected,rolled_back}.v1`: how a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunEnded {
    pub reason: String,
    /// The stage that decided the end, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Who ended it (`conductor`, or the user who cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// A stored object: a packed artifact or a log, in a JetStream Object Store bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ObjectRef {
    pub bucket: String,
    pub name: String,
    /// `sha256:<hex>` of the stored bytes.
    pub digest: Digest,
    pub size: u64,
}

/// `dev.slipway.<stage>.started.v1`, shared by every worker stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageStarted {
    /// Stage key, e.g. `build`, `test:unit`, `deploy:staging`.
    pub stage: String,
    pub attempt: u32,
    /// The worker instance that took the job.
    pub worker: String,
}

/// `dev.slipway.<stage>.failed.v1` for stages without a richer report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageFailed {
    pub stage: String,
    pub attempt: u32,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Last lines of the command's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ObjectRef>,
}

/// `dev.slipway.build.requested.v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildRequested {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub source: SourceRef,
    pub build: BuildSpec,
}

/// `dev.slipway.build.succeeded.v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BuildSucceeded {
    pub stage: String,
    pub attempt: u32,
    /// The packed artifact (`tar.gz`); its digest identifies what is tested and deployed.
    pub artifact: ObjectRef,
    /// Paths packed, relative to the workspace.
    pub files: Vec<String>,
    pub log: ObjectRef,
    pub duration_ms: u64,
}

/// `dev.slipway.test.requested.v1`: one suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestRequested {
    pub stage: String,
    pub attempt: u32,
    pub source: SourceRef,
    pub artifact: ObjectRef,
    pub suite: TestSuiteSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CaseStatus {
    Passed,
    Failed,
    Error,
    Skipped,
}

/// One test case from a JUnit report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestCase {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    pub status: CaseStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct TestSummary {
    pub tests: u32,
    pub passed: u32,
    pub failed: u32,
    pub errors: u32,
    pub skipped: u32,
}

/// `dev.slipway.test.{succeeded,failed}.v1`: a suite's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestReport {
    pub stage: String,
    pub attempt: u32,
    pub suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Present when the suite wrote a JUnit report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<TestSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<TestCase>,
    /// Why the suite failed; absent when it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ObjectRef>,
    pub duration_ms: u64,
}

/// `dev.slipway.deploy.requested.v1` (and `rollback.requested.v1`, with a reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployRequested {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub environment: String,
    /// What to deploy; for a rollback, the last good version's artifact.
    pub artifact: ObjectRef,
    pub version: String,
    pub target: DeployTarget,
    /// For a rollback: why (the incident).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// In an environment with a rollout: the slot deployed (`SLIPWAY_SLOT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Slot>,
}

/// `dev.slipway.deploy.started.v1` (and `rollback.started.v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployStarted {
    pub stage: String,
    pub attempt: u32,
    pub worker: String,
    pub environment: String,
    pub version: String,
    /// What was live before, so a rollback knows where to go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_artifact: Option<ObjectRef>,
}

/// `dev.slipway.deploy.succeeded.v1` (and `rollback.succeeded.v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeploySucceeded {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub environment: String,
    /// The version now live in the environment, and its artifact.
    pub version: String,
    pub artifact: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<ObjectRef>,
    pub duration_ms: u64,
}

/// Where a gate or the monitor looks: a deployed environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EnvironmentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `dev.slipway.evaluate.requested.v1`: model evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EvaluateRequested {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub source: SourceRef,
    pub artifact: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<EnvironmentRef>,
    pub spec: ModelEvaluationSpec,
}

/// `dev.slipway.perf.requested.v1`: performance regression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PerfRequested {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub source: SourceRef,
    pub artifact: ObjectRef,
    pub environment: EnvironmentRef,
    pub spec: PerformanceSpec,
}

/// `dev.slipway.cost.requested.v1`: cost estimate, after evaluation and performance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CostRequested {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub artifact: ObjectRef,
    pub spec: CostSpec,
    /// The reports the estimate uses (token counts, throughput).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<GateReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One checked bound: the verdict names metric, candidate, baseline, delta and significance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    pub metric: String,
    /// What was measured (e.g. the dataset name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub candidate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<[f64; 2]>,
    pub verdict: Verdict,
    pub note: String,
    /// The bounds the value was held to, and how close it came to the nearest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<Bounds>,
    /// The smallest regression, in the metric's unit, the check's paired test finds with 80%
    /// power at the gate's significance, for this dataset's size and observed discordance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detectable: Option<f64>,
}

/// A check's bounds as the spec set them, and the headroom left to the nearest one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct Bounds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Largest worsening against the baseline, in the metric's unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_regression: Option<f64>,
    /// Largest worsening against the baseline, in percent of the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_regression_pct: Option<f64>,
    /// The bound nearest to being broken: `min`, `max`, `max_regression` or
    /// `max_regression_pct` (absent when no bound applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nearest: Option<String>,
    /// Headroom to the nearest bound, in the metric's unit (percent for
    /// `max_regression_pct`); negative when the bound is broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// The same headroom as a share of the bound's own scale (the bound's value, or the
    /// baseline for a regression bound), so a thin margin reads as thin whatever the unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin_ratio: Option<f64>,
}

/// `dev.slipway.{evaluate,perf,cost}.{succeeded,failed}.v1`: a quality gate's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GateReport {
    pub stage: String,
    pub attempt: u32,
    pub verdict: Verdict,
    /// Measured figures by name, kept as the baseline for later runs.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    /// The run whose figures served as baseline, when one was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_run: Option<String>,
    /// Sample outputs for human review, or raw measurements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<ObjectRef>,
    /// Why the gate failed (absent when it passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub duration_ms: u64,
}

/// `dev.slipway.evaluate.calibrated.v1`: the noise of the model under evaluation, measured by
/// asking it every dataset `repeats` times (the spec's `repeats`). Published before the gate's
/// report; the report's paired tests compare each item's share of answers and size themselves
/// to this noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Calibration {
    pub stage: String,
    pub attempt: u32,
    /// How many times each item was asked.
    pub repeats: u32,
    pub datasets: Vec<DatasetNoise>,
}

/// One dataset's agreement across repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DatasetNoise {
    pub dataset: String,
    pub items: u64,
    /// Items whose verdict on some yes/no metric changed between repeats.
    pub unstable: u64,
    /// By yes/no metric (`exact_match`, `format_compliance`, ...).
    pub metrics: BTreeMap<String, MetricNoise>,
    /// The unstable items, in dataset order, at most [`UNSTABLE_ITEMS_LISTED`] of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unstable_items: Vec<ItemAgreement>,
    /// Unstable items beyond the list (every item's votes are in the gate's details).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unstable_not_listed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Unstable items an event lists, so the event stays small whatever the dataset's size.
pub const UNSTABLE_ITEMS_LISTED: usize = 200;

/// How one yes/no metric varied across repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MetricNoise {
    /// Items with a verdict on this metric.
    pub items: u64,
    /// Items whose verdict changed between repeats.
    pub unstable: u64,
    /// Mean share of an item's repeats that agree with its majority (1: no noise).
    pub agreement: f64,
    /// The share of items on which two single answers of the same model disagree (estimated
    /// without bias from the repeats): the discordance noise alone gives an unrepeated gate.
    pub flip_rate: f64,
    /// The same for two majority votes over `repeats` answers, plugged in from each item's
    /// share: how much a majority vote would steady the answers. Shown, not used by the tests
    /// (they compare shares; their noise is `flip_rate / repeats`).
    pub majority_flip_rate: f64,
}

/// An item whose verdict changed between repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ItemAgreement {
    pub id: String,
    /// The metrics whose verdict changed.
    pub metrics: Vec<String>,
    /// The lowest share of repeats agreeing with the majority, over those metrics.
    pub agreement: f64,
}

/// `dev.slipway.approval.requested.v1`: the run waits for a human (or the policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApprovalRequested {
    pub stage: String,
    pub attempt: u32,
    pub environment: String,
    pub artifact_digest: Digest,
    /// `sha256:` over the gate reports this approval is about.
    pub gates_digest: Digest,
    pub gates: Vec<GateSummary>,
    pub policy: ApprovalPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GateSummary {
    pub stage: String,
    pub verdict: Verdict,
}

/// `dev.slipway.approval.{approved,rejected}.v1`: one approver's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApprovalDecision {
    pub stage: String,
    pub attempt: u32,
    pub approver: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    pub artifact_digest: Digest,
    pub gates_digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub decided_at: DateTime<Utc>,
    /// Ed25519 signature of the gateway over the decision (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The identity provider (its issuer) that vouched for the approver and their groups, when
    /// they signed in through it; absent for the gateway's configured approvers. Its decisions
    /// are signed with the groups, which the deployer then takes as signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// `dev.slipway.monitor.requested.v1`: watch an environment after a deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorRequested {
    pub stage: String,
    pub attempt: u32,
    pub environment: EnvironmentRef,
    pub version: String,
    pub spec: MonitorSpec,
}

/// `dev.slipway.rollout.requested.v1`: roll the candidate out in an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutRequested {
    pub stage: String,
    pub attempt: u32,
    pub pipeline: String,
    pub environment: EnvironmentRef,
    /// The candidate's version.
    pub version: String,
    /// The version in service it is compared with; none for the environment's first deploy,
    /// which is promoted without a comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<String>,
    pub spec: RolloutSpec,
    pub traffic: TrafficSpec,
}

/// The monitor's verdict on a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MonitorVerdict {
    /// Every SLO held for the whole window.
    Verified,
    /// An SLO was breached: an incident is opened and production rolls back.
    Degraded,
}

/// `dev.slipway.monitor.{succeeded,failed}.v1`: the window's result, with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MonitorReport {
    pub stage: String,
    pub attempt: u32,
    pub environment: String,
    pub verdict: MonitorVerdict,
    /// The version watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Probes made in the window.
    #[serde(default)]
    pub probes: u32,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    /// The incident opened on a breach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub duration_ms: u64,
}

/// `dev.slipway.incident.opened.v1`: production degraded after a deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IncidentOpened {
    pub incident_id: String,
    pub environment: String,
    pub version: String,
    pub breaches: Vec<Check>,
    pub opened_at: DateTime<Utc>,
}

/// `dev.slipway.stage.timed_out.v1` is not an event: the conductor records a timeout as the
/// stage's `failed` fact, whose reason says so.
macro_rules! catalogue {
    ($( $(#[$doc:meta])* $variant:ident => $ty:literal, $data:ty, $producer:literal, [$($consumer:literal),*] ;)*) => {
        /// The data of every event Slipway knows, by CloudEvents `type`.
        #[derive(Debug, Clone, PartialEq)]
        pub enum EventData {
            $( $(#[$doc])* $variant($data), )*
        }

        /// One entry of the catalogue, for docs and schema generation.
        #[derive(Debug, Clone, Copy)]
        pub struct CatalogueEntry {
            pub type_name: &'static str,
            pub producer: &'static str,
            pub consumers: &'static [&'static str],
            pub data_type: &'static str,
            pub schema: fn() -> schemars::Schema,
        }

        /// Every event type, in pipeline order.
        pub const CATALOGUE: &[CatalogueEntry] = &[
            $( CatalogueEntry {
                type_name: $ty,
                producer: $producer,
                consumers: &[$($consumer),*],
                data_type: stringify!($data),
                schema: || schemars::schema_for!($data),
            }, )*
        ];

        impl EventData {
            /// The CloudEvents `type`.
            pub fn type_name(&self) -> &'static str {
                match self { $( Self::$variant(_) => $ty, )* }
            }

            /// The data as JSON.
            pub fn to_json(&self) -> serde_json::Value {
                let v = match self { $( Self::$variant(d) => serde_json::to_value(d), )* };
                v.expect("event data always serialises")
            }

            /// Typed data straight from JSON bytes, for decoding's fast path: `None` for
            /// anything [`EventData::from_json`] must explain instead.
            pub fn from_slice(type_name: &str, data: &[u8]) -> Option<Self> {
                // One UTF-8 check of the whole payload, not one per string in it.
                let data = std::str::from_utf8(data).ok()?;
                match type_name {
                    $( $ty => serde_json::from_str::<$data>(data).ok().map(Self::$variant), )*
                    _ => None,
                }
            }

            /// Typed data from a CloudEvents `type` and its JSON `data`; an older version of
            /// a type is upcast to the current one first.
            ///
            /// # Errors
            /// [`DataError::UnknownType`] for a type outside the catalogue, or
            /// [`DataError::Invalid`] naming the field that does not fit.
            pub fn from_json(type_name: &str, data: serde_json::Value) -> Result<Self, DataError> {
                let (type_name, data) = upcast(UPCASTERS, type_name, data)?;
                match type_name.as_str() {
                    $( $ty => parse(&type_name, data).map(Self::$variant), )*
                    other => Err(DataError::UnknownType(other.to_string())),
                }
            }
        }
    };
}

/// Turns one older version of an event type into the next: the data as stored, to the data
/// of the next version, or why it cannot be.
pub type Upcaster = fn(serde_json::Value) -> Result<serde_json::Value, String>;

/// Every older version of an event type Slipway ever wrote, with the next version and the
/// function between them; chained, so a `v1` becomes a `v3` through `v2`. Every type is at its
/// first version so far. A new version adds an entry here and never changes an older one.
pub const UPCASTERS: &[(&str, &str, Upcaster)] = &[];

/// The current type and data of an event stored as `type_name`.
///
/// # Errors
/// [`DataError::Invalid`] when an upcaster cannot read the older data.
pub fn upcast(
    upcasters: &[(&str, &str, Upcaster)],
    type_name: &str,
    mut data: serde_json::Value,
) -> Result<(String, serde_json::Value), DataError> {
    let mut ty = type_name.to_string();
    // Bounded: a table that loops is a mistake, not a reason to hang.
    for _ in 0..=upcasters.len() {
        let Some((_, next, up)) = upcasters.iter().find(|(from, _, _)| *from == ty) else {
            return Ok((ty, data));
        };
        data = up(data).map_err(|message| DataError::Invalid {
            type_name: ty.clone(),
            path: ".".into(),
            message: format!("cannot be read as {next}: {message}"),
        })?;
        ty = (*next).to_string();
    }
    Err(DataError::Invalid {
        type_name: type_name.to_string(),
        path: ".".into(),
        message: "its upcasters go round in a circle".into(),
    })
}

fn parse<T: serde::de::DeserializeOwned>(
    type_name: &str,
    data: serde_json::Value,
) -> Result<T, DataError> {
    serde_path_to_error::deserialize(data).map_err(|e: serde_path_to_error::Error<_>| {
        DataError::Invalid {
            type_name: type_name.to_string(),
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }
    })
}

/// Event data that does not fit the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("invalid data for {type_name}: {path}: {message}")]
    Invalid {
        type_name: String,
        path: String,
        message: String,
    },
}

catalogue! {
    ChangeSubmitted => "dev.slipway.change.submitted.v1", ChangeSubmitted, "slipway CLI, gateway, hooks", ["conductor"];
    ChangeRejected => "dev.slipway.change.rejected.v1", ChangeRejected, "conductor", ["slipway CLI", "gateway"];
    RunCreated => "dev.slipway.run.created.v1", RunCreated, "conductor", ["every service"];
    RunSucceeded => "dev.slipway.run.succeeded.v1", RunEnded, "conductor", ["slipway CLI", "gateway"];
    RunFailed => "dev.slipway.run.failed.v1", RunEnded, "conductor", ["slipway CLI", "gateway"];
    RunCancelled => "dev.slipway.run.cancelled.v1", RunEnded, "conductor, slipway CLI, gateway", ["every worker", "slipway CLI", "gateway"];
    RunRejected => "dev.slipway.run.rejected.v1", RunEnded, "conductor", ["slipway CLI", "gateway"];
    RunRolledBack => "dev.slipway.run.rolled_back.v1", RunEnded, "conductor", ["slipway CLI", "gateway"];
    BuildRequested => "dev.slipway.build.requested.v1", BuildRequested, "conductor", ["builder"];
    BuildStarted => "dev.slipway.build.started.v1", StageStarted, "builder", ["conductor"];
    BuildSucceeded => "dev.slipway.build.succeeded.v1", BuildSucceeded, "builder", ["conductor"];
    BuildFailed => "dev.slipway.build.failed.v1", StageFailed, "builder, conductor (timeout)", ["conductor"];
    TestRequested => "dev.slipway.test.requested.v1", TestRequested, "conductor", ["tester"];
    TestStarted => "dev.slipway.test.started.v1", StageStarted, "tester", ["conductor"];
    TestSucceeded => "dev.slipway.test.succeeded.v1", TestReport, "tester", ["conductor"];
    TestFailed => "dev.slipway.test.failed.v1", TestReport, "tester, conductor (timeout)", ["conductor"];
    DeployRequested => "dev.slipway.deploy.requested.v1", DeployRequested, "conductor", ["deployer"];
    DeployStarted => "dev.slipway.deploy.started.v1", DeployStarted, "deployer", ["conductor"];
    DeploySucceeded => "dev.slipway.deploy.succeeded.v1", DeploySucceeded, "deployer", ["conductor", "deployer", "model-evaluator", "perf-regression", "monitor"];
    DeployFailed => "dev.slipway.deploy.failed.v1", StageFailed, "deployer, conductor (timeout)", ["conductor"];
    EvaluateRequested => "dev.slipway.evaluate.requested.v1", EvaluateRequested, "conductor", ["model-evaluator"];
    EvaluateStarted => "dev.slipway.evaluate.started.v1", StageStarted, "model-evaluator", ["conductor"];
    EvaluateCalibrated => "dev.slipway.evaluate.calibrated.v1", Calibration, "model-evaluator", ["slipway CLI", "gateway"];
    EvaluateSucceeded => "dev.slipway.evaluate.succeeded.v1", GateReport, "model-evaluator", ["conductor", "cost-estimator", "gateway"];
    EvaluateFailed => "dev.slipway.evaluate.failed.v1", GateReport, "model-evaluator, conductor (timeout)", ["conductor", "gateway"];
    PerfRequested => "dev.slipway.perf.requested.v1", PerfRequested, "conductor", ["perf-regression"];
    PerfStarted => "dev.slipway.perf.started.v1", StageStarted, "perf-regression", ["conductor"];
    PerfSucceeded => "dev.slipway.perf.succeeded.v1", GateReport, "perf-regression", ["conductor", "cost-estimator", "gateway"];
    PerfFailed => "dev.slipway.perf.failed.v1", GateReport, "perf-regression, conductor (timeout)", ["conductor", "gateway"];
    CostRequested => "dev.slipway.cost.requested.v1", CostRequested, "conductor", ["cost-estimator"];
    CostStarted => "dev.slipway.cost.started.v1", StageStarted, "cost-estimator", ["conductor"];
    CostSucceeded => "dev.slipway.cost.succeeded.v1", GateReport, "cost-estimator", ["conductor", "gateway"];
    CostFailed => "dev.slipway.cost.failed.v1", GateReport, "cost-estimator, conductor (timeout)", ["conductor", "gateway"];
    ApprovalRequested => "dev.slipway.approval.requested.v1", ApprovalRequested, "conductor", ["gateway"];
    ApprovalApproved => "dev.slipway.approval.approved.v1", ApprovalDecision, "gateway", ["conductor", "deployer"];
    ApprovalRejected => "dev.slipway.approval.rejected.v1", ApprovalDecision, "gateway", ["conductor", "deployer"];
    /// The policy's automatic approval (`auto_approve = "when_clean"`): the deployer
    /// re-derives its condition, never trusts it; its own type keeps approvers' decisions the
    /// gateway's alone on the bus.
    ApprovalAutoApproved => "dev.slipway.approval.auto_approved.v1", ApprovalDecision, "conductor", ["conductor", "deployer"];
    MonitorRequested => "dev.slipway.monitor.requested.v1", MonitorRequested, "conductor", ["monitor"];
    MonitorStarted => "dev.slipway.monitor.started.v1", StageStarted, "monitor", ["conductor"];
    MonitorSucceeded => "dev.slipway.monitor.succeeded.v1", MonitorReport, "monitor", ["conductor"];
    MonitorFailed => "dev.slipway.monitor.failed.v1", MonitorReport, "monitor, conductor (timeout)", ["conductor"];
    IncidentOpened => "dev.slipway.incident.opened.v1", IncidentOpened, "monitor", ["slipway CLI", "gateway"];
    RollbackRequested => "dev.slipway.rollback.requested.v1", DeployRequested, "conductor", ["deployer"];
    RollbackStarted => "dev.slipway.rollback.started.v1", DeployStarted, "deployer", ["conductor"];
    RollbackSucceeded => "dev.slipway.rollback.succeeded.v1", DeploySucceeded, "deployer", ["conductor"];
    RollbackFailed => "dev.slipway.rollback.failed.v1", StageFailed, "deployer, conductor (timeout)", ["conductor"];
    RolloutRequested => "dev.slipway.rollout.requested.v1", RolloutRequested, "conductor", ["monitor (the judge)"];
    RolloutStarted => "dev.slipway.rollout.started.v1", StageStarted, "monitor (the judge)", ["conductor"];
    /// The candidate's share of traffic changed (a step, an abort, a promotion).
    RolloutWeightSet => "dev.slipway.rollout.weight_set.v1", WeightSet, "monitor (the judge), deployer (after a promotion)", ["gateway", "slipway CLI", "monitor (the judge)"];
    /// One look at both variants during a step, with its decision.
    RolloutAnalysed => "dev.slipway.rollout.analysed.v1", RolloutAnalysis, "monitor (the judge)", ["gateway", "slipway CLI", "monitor (the judge)"];
    /// A person paused, resumed, promoted or aborted the rollout (signed by the gateway).
    RolloutControlled => "dev.slipway.rollout.controlled.v1", RolloutControl, "gateway", ["monitor (the judge)", "gateway", "slipway CLI"];
    RolloutSucceeded => "dev.slipway.rollout.succeeded.v1", RolloutReport, "monitor (the judge)", ["conductor", "gateway"];
    RolloutFailed => "dev.slipway.rollout.failed.v1", RolloutReport, "monitor (the judge), conductor (timeout)", ["conductor", "gateway"];
    PromoteRequested => "dev.slipway.promote.requested.v1", DeployRequested, "conductor", ["deployer"];
    PromoteStarted => "dev.slipway.promote.started.v1", DeployStarted, "deployer", ["conductor"];
    PromoteSucceeded => "dev.slipway.promote.succeeded.v1", DeploySucceeded, "deployer", ["conductor"];
    PromoteFailed => "dev.slipway.promote.failed.v1", StageFailed, "deployer, conductor (timeout)", ["conductor"];
}

pub use crate::stage::StageKind;

/// What a stage event says, whatever its stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageVerb {
    Requested,
    Started,
    Succeeded,
    Failed,
}

impl StageVerb {
    pub fn is_terminal(self) -> bool {
        matches!(self, StageVerb::Succeeded | StageVerb::Failed)
    }
}

impl EventData {
    /// For an approver's decision: the approval stage and attempt it answers.
    pub fn approval_stage(&self) -> Option<(String, u32)> {
        match self {
            EventData::ApprovalApproved(d)
            | EventData::ApprovalRejected(d)
            | EventData::ApprovalAutoApproved(d) => Some((d.stage.clone(), d.attempt)),
            _ => None,
        }
    }

    /// Whether this is a decision that approves (an approver's or the policy's).
    pub fn approves(&self) -> bool {
        matches!(
            self,
            EventData::ApprovalApproved(_) | EventData::ApprovalAutoApproved(_)
        )
    }

    /// For stage events: `(stage key, attempt, verb)`.
    pub fn stage_fact(&self) -> Option<(&str, u32, StageVerb)> {
        use EventData as E;
        use StageVerb as V;
        let r = match self {
            E::BuildRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::TestRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::DeployRequested(d) | E::RollbackRequested(d) | E::PromoteRequested(d) => {
                (d.stage.as_str(), d.attempt, V::Requested)
            }
            E::RolloutRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::EvaluateRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::PerfRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::CostRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::ApprovalRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::MonitorRequested(d) => (d.stage.as_str(), d.attempt, V::Requested),
            E::BuildStarted(d)
            | E::TestStarted(d)
            | E::EvaluateStarted(d)
            | E::PerfStarted(d)
            | E::CostStarted(d)
            | E::MonitorStarted(d)
            | E::RolloutStarted(d) => (d.stage.as_str(), d.attempt, V::Started),
            E::DeployStarted(d) | E::RollbackStarted(d) | E::PromoteStarted(d) => {
                (d.stage.as_str(), d.attempt, V::Started)
            }
            E::BuildSucceeded(d) => (d.stage.as_str(), d.attempt, V::Succeeded),
            E::TestSucceeded(d) => (d.stage.as_str(), d.attempt, V::Succeeded),
            E::DeploySucceeded(d) | E::RollbackSucceeded(d) | E::PromoteSucceeded(d) => {
                (d.stage.as_str(), d.attempt, V::Succeeded)
            }
            E::RolloutSucceeded(d) => (d.stage.as_str(), d.attempt, V::Succeeded),
            E::RolloutFailed(d) => (d.stage.as_str(), d.attempt, V::Failed),
            E::EvaluateSucceeded(d) | E::PerfSucceeded(d) | E::CostSucceeded(d) => {
                (d.stage.as_str(), d.attempt, V::Succeeded)
            }
            E::MonitorSucceeded(d) => (d.stage.as_str(), d.attempt, V::Succeeded),
            E::BuildFailed(d) | E::DeployFailed(d) | E::RollbackFailed(d) | E::PromoteFailed(d) => {
                (d.stage.as_str(), d.attempt, V::Failed)
            }
            E::TestFailed(d) => (d.stage.as_str(), d.attempt, V::Failed),
            E::EvaluateFailed(d) | E::PerfFailed(d) | E::CostFailed(d) => {
                (d.stage.as_str(), d.attempt, V::Failed)
            }
            E::MonitorFailed(d) => (d.stage.as_str(), d.attempt, V::Failed),
            _ => return None,
        };
        Some(r)
    }

    /// The failed fact a stage gets when it cannot finish: a timeout, a poison request, a
    /// worker that gave up. Gates keep their report shape so their readers need no special case.
    pub fn stage_failure(kind: StageKind, stage: &str, attempt: u32, reason: String) -> Self {
        use crate::stage::StageKey;
        let key = StageKey::parse(stage).ok();
        let plain = StageFailed {
            stage: stage.to_string(),
            attempt,
            reason: reason.clone(),
            exit_code: None,
            log_tail: None,
            log: None,
        };
        let gate = || GateReport {
            stage: stage.to_string(),
            attempt,
            verdict: Verdict::Fail,
            metrics: BTreeMap::new(),
            checks: Vec::new(),
            baseline_run: None,
            details: None,
            reason: Some(reason.clone()),
            duration_ms: 0,
        };
        match kind {
            StageKind::Build => EventData::BuildFailed(plain),
            StageKind::Deploy => EventData::DeployFailed(plain),
            StageKind::Rollback => EventData::RollbackFailed(plain),
            StageKind::Promote => EventData::PromoteFailed(plain),
            StageKind::Rollout => EventData::RolloutFailed(RolloutReport {
                stage: stage.to_string(),
                attempt,
                environment: key
                    .as_ref()
                    .and_then(StageKey::environment)
                    .unwrap_or_default()
                    .to_string(),
                version: String::new(),
                steps_passed: 0,
                last: None,
                decided_by: "conductor".into(),
                reason: reason.clone(),
                duration_ms: 0,
            }),
            StageKind::Test => EventData::TestFailed(TestReport {
                stage: stage.to_string(),
                attempt,
                suite: key
                    .as_ref()
                    .and_then(StageKey::suite)
                    .unwrap_or(stage)
                    .to_string(),
                exit_code: None,
                summary: None,
                cases: Vec::new(),
                reason: Some(reason.clone()),
                log_tail: None,
                log: None,
                duration_ms: 0,
            }),
            StageKind::Evaluate => EventData::EvaluateFailed(gate()),
            StageKind::Perf => EventData::PerfFailed(gate()),
            StageKind::Cost => EventData::CostFailed(gate()),
            StageKind::Monitor => EventData::MonitorFailed(MonitorReport {
                stage: stage.to_string(),
                attempt,
                environment: key
                    .as_ref()
                    .and_then(StageKey::environment)
                    .unwrap_or_default()
                    .to_string(),
                verdict: MonitorVerdict::Degraded,
                version: None,
                probes: 0,
                metrics: BTreeMap::new(),
                checks: Vec::new(),
                incident_id: None,
                reason: Some(reason.clone()),
                duration_ms: 0,
            }),
            // An approval that never comes is a rejection by timeout.
            StageKind::Approval => EventData::ApprovalRejected(ApprovalDecision {
                stage: stage.to_string(),
                attempt,
                approver: "slipway".into(),
                groups: Vec::new(),
                artifact_digest: Digest::default(),
                gates_digest: Digest::default(),
                comment: Some(reason),
                decided_at: DateTime::<Utc>::UNIX_EPOCH,
                signature: None,
                issuer: None,
            }),
        }
    }
}

/// `(noun, verb)` of a type such as `dev.slipway.build.succeeded.v1`.
pub fn type_parts(type_name: &str) -> Option<(&str, &str)> {
    let rest = type_name.strip_prefix("dev.slipway.")?;
    let (rest, _version) = rest.rsplit_once('.')?;
    rest.split_once('.')
}

/// The stage kind of a stage event's type.
pub fn stage_kind_of(type_name: &str) -> Option<StageKind> {
    type_parts(type_name).and_then(|(noun, _)| StageKind::parse(noun))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_versioned_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for e in CATALOGUE {
            assert!(seen.insert(e.type_name), "duplicate {}", e.type_name);
            let (noun, verb) = type_parts(e.type_name).expect(e.type_name);
            assert!(!noun.is_empty() && !verb.is_empty());
            assert!(e.type_name.ends_with(".v1"));
        }
    }

    #[test]
    fn a_change_is_validated_once_for_every_door() {
        let change = |spec: &str, path: &str| ChangeSubmitted {
            spec: spec.into(),
            source: SourceRef::Directory { path: path.into() },
            author: None,
            title: None,
            rerun_of: None,
            commit: None,
        };
        let good = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"make\"]\n";
        assert_eq!(
            change(good, "/srv/p").validate().unwrap().pipeline.name,
            "p"
        );
        let e = change(good, "srv/p").validate().unwrap_err();
        assert_eq!(e, "data.source.path: \"srv/p\" must be an absolute path");
        let e = change("[pipeline]\nname = \"p\"\n", "/srv/p")
            .validate()
            .unwrap_err();
        assert!(e.contains("build"), "{e}");
    }

    #[test]
    fn unknown_type_and_bad_field_are_named() {
        let err = EventData::from_json("dev.slipway.nope.v1", serde_json::json!({})).unwrap_err();
        assert!(err.to_string().contains("dev.slipway.nope.v1"));
        let err = EventData::from_json(
            "dev.slipway.build.started.v1",
            serde_json::json!({"stage": "build", "attempt": "one", "worker": "w"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("attempt"), "{err}");
    }

    /// A build result as a newer release might write it: fields this one does not know, at the
    /// top and inside the artifact.
    fn from_a_newer_producer() -> (serde_json::Value, serde_json::Value) {
        let known = serde_json::json!({
            "stage": "build", "attempt": 1,
            "artifact": {"bucket": "b", "name": "sha256/x", "digest": "sha256:x", "size": 3},
            "files": ["dist/app"],
            "log": {"bucket": "l", "name": "run/build/1", "digest": "sha256:y", "size": 4},
            "duration_ms": 12,
        });
        let mut newer = known.clone();
        newer["sbom"] = serde_json::json!({"format": "spdx", "object": "sbom/x"});
        newer["artifact"]["signature"] = serde_json::json!("sig");
        (known, newer)
    }

    #[test]
    fn a_reader_ignores_fields_it_does_not_know() {
        let (known, newer) = from_a_newer_producer();
        let ty = "dev.slipway.build.succeeded.v1";
        let expected = EventData::from_json(ty, known).unwrap();
        // Both decoding paths: the typed fast path and the explaining one.
        let bytes = serde_json::to_vec(&newer).unwrap();
        assert_eq!(EventData::from_slice(ty, &bytes), Some(expected.clone()));
        assert_eq!(EventData::from_json(ty, newer).unwrap(), expected);
    }

    #[test]
    fn older_versions_are_upcast_to_the_current_one_in_one_place() {
        // A made-up history: `incident.opened` once called its id `id` (v0), then `incident`
        // (v0.5, as a numbered step), before today's v1.
        fn v0_to_half(mut d: serde_json::Value) -> Result<serde_json::Value, String> {
            let id = d.get("id").cloned().ok_or("no `id`")?;
            d["incident"] = id;
            Ok(d)
        }
        fn half_to_v1(mut d: serde_json::Value) -> Result<serde_json::Value, String> {
            let id = d.get("incident").cloned().ok_or("no `incident`")?;
            d["incident_id"] = id;
            Ok(d)
        }
        let table: &[(&str, &str, Upcaster)] = &[
            (
                "dev.slipway.incident.opened.v0",
                "dev.slipway.incident.opened.v0h",
                v0_to_half,
            ),
            (
                "dev.slipway.incident.opened.v0h",
                "dev.slipway.incident.opened.v1",
                half_to_v1,
            ),
        ];
        let (ty, data) = upcast(
            table,
            "dev.slipway.incident.opened.v0",
            serde_json::json!({"id": "inc-1", "environment": "production", "version": "1.0",
                "breaches": [], "opened_at": "2026-01-01T00:00:00Z"}),
        )
        .unwrap();
        assert_eq!(ty, "dev.slipway.incident.opened.v1");
        assert_eq!(data["incident_id"], "inc-1");
        // And the fold's decode reads what the chain made (the `id` left behind is ignored).
        let EventData::IncidentOpened(i) = EventData::from_json(&ty, data).unwrap() else {
            panic!("an incident")
        };
        assert_eq!(i.incident_id, "inc-1");
        // The current version passes through untouched; an older one that cannot be read says
        // which version it could not become.
        let same = serde_json::json!({"a": 1});
        assert_eq!(
            upcast(table, "dev.slipway.incident.opened.v1", same.clone()).unwrap(),
            ("dev.slipway.incident.opened.v1".to_string(), same)
        );
        let e = upcast(
            table,
            "dev.slipway.incident.opened.v0",
            serde_json::json!({}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot be read as dev.slipway.incident.opened.v0h: no `id`"),
            "{e}"
        );
        let circle: &[(&str, &str, Upcaster)] = &[("a.v1", "a.v2", Ok), ("a.v2", "a.v1", Ok)];
        assert!(upcast(circle, "a.v1", serde_json::json!({})).is_err());
    }
}
