//! The pipeline spec: what a run does, stage by stage.
//!
//! A spec is a TOML file (JSON Schema: `schemas/pipeline.schema.json`, generated from these
//! types). It is parsed strictly: an unknown field or a wrong type is an error that names the
//! field path, and [`PipelineSpec::parse`] then checks what a type cannot say (unique names,
//! artifact paths that stay inside the workspace, references between sections).
//!
//! The conductor snapshots the validated spec into the run's first event, so a run never
//! changes its plan when the file changes later.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default stage timeout when a spec does not set one: ten minutes.
const DEFAULT_TIMEOUT_SECS: u64 = 600;

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A whole pipeline: build, test suites, environments, quality gates, approval, monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PipelineSpec {
    pub pipeline: PipelineMeta,
    pub build: BuildSpec,
    /// Test suites, run in parallel after the build.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<TestSuiteSpec>,
    /// Deploy targets in promotion order (e.g. staging, then production).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment: Vec<EnvironmentSpec>,
    #[serde(default, skip_serializing_if = "GatesSpec::is_empty")]
    pub gates: GatesSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PipelineMeta {
    /// Pipeline name: `[A-Za-z0-9_-]`, 1 to 64 characters.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A command as an argument vector: never a shell string built from event data.
pub type Argv = Vec<String>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BuildSpec {
    /// Program and arguments, run in the workspace (a fresh copy of the source).
    pub command: Argv,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Files or directories, relative to the workspace, packed into the artifact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Extra environment for the command (the rest of the environment is cleared).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum SuiteKind {
    #[default]
    Unit,
    Integration,
    EndToEnd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TestSuiteSpec {
    /// Suite name, unique in the spec: `[A-Za-z0-9_-]`.
    pub name: String,
    #[serde(default)]
    pub kind: SuiteKind,
    pub command: Argv,
    /// JUnit XML report the command writes, relative to the workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub junit: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EnvironmentSpec {
    /// Environment name, unique in the spec: `[A-Za-z0-9_-]`.
    pub name: String,
    /// Base URL of the deployed service, probed by the gates and the monitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Deploying here needs an approval under the `[approval]` policy (and passed gates).
    #[serde(default, skip_serializing_if = "is_false")]
    pub requires_approval: bool,
    pub deploy: DeployTarget,
    /// Roll changes out progressively: the candidate beside the version in service, judged
    /// on live traffic (see `docs/pipeline-spec.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::RolloutSpec>,
    /// Where a rollout's traffic weights are published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<crate::rollout::TrafficSpec>,
}

/// The deploy command receives `SLIPWAY_ENVIRONMENT`, `SLIPWAY_RUN_ID`, `SLIPWAY_VERSION`,
/// `SLIPWAY_ARTIFACT_DIR`, `SLIPWAY_ARTIFACT_DIGEST`, `SLIPWAY_PREVIOUS_VERSION` and
/// `SLIPWAY_DEPLOY_KEY` (the same for every try of one stage attempt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DeployTarget {
    pub command: Argv,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The command is idempotent by `SLIPWAY_DEPLOY_KEY`: a deploy whose worker died after
    /// starting it is run again with the same key (and the command makes that a no-op if it
    /// had already happened). Otherwise such a deploy is never repeated and times out.
    #[serde(default, skip_serializing_if = "is_false")]
    pub idempotent: bool,
}

/// Limits on one metric. Every bound set must hold; `max_regression*` compare with the
/// baseline (the version live in production).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[schemars(deny_unknown_fields)]
pub struct Threshold {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Largest allowed change for the worse, in the metric's own unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_regression: Option<f64>,
    /// Largest allowed change for the worse, in percent of the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_regression_pct: Option<f64>,
    /// `fail` blocks the run; `warn` passes with a warning (a human must approve).
    #[serde(default)]
    pub severity: Severity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Fail,
    Warn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[schemars(deny_unknown_fields)]
pub struct GatesSpec {
    /// Environment the gates measure, after its deploy. Default: the first environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Run model evaluation and performance in parallel (cost always runs after both).
    #[serde(default = "default_true")]
    pub parallel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_evaluation: Option<ModelEvaluationSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<PerformanceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostSpec>,
}

fn default_true() -> bool {
    true
}

impl GatesSpec {
    fn is_empty(&self) -> bool {
        self.model_evaluation.is_none() && self.performance.is_none() && self.cost.is_none()
    }
}

/// The model under test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[schemars(deny_unknown_fields)]
pub enum ModelEndpoint {
    /// An OpenAI-compatible chat-completions API. `base_url` defaults to the gated
    /// environment's URL.
    Openai {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_url: Option<String>,
        model: String,
        /// Name of the environment variable holding the API key (never the key itself).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_key_env: Option<String>,
    },
    /// A command reading items as JSON lines on stdin and writing answers on stdout.
    Command { command: Argv },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ModelEvaluationSpec {
    pub endpoint: ModelEndpoint,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Number of sample outputs kept for human review (worst items plus a seeded sample).
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// Significance level of the paired tests against the baseline.
    #[serde(default = "default_alpha")]
    pub significance: f64,
    /// How many times each item is asked (at most [`MAX_REPEATS`]). Above 1 the evaluation is
    /// also a calibration: the agreement of each item's answers is recorded
    /// (`evaluate.calibrated`), items that change between repeats are reported as unstable, the
    /// paired tests compare each item's share of its answers, and the minimum detectable effect the
    /// measured noise.
    #[serde(default = "default_repeats", skip_serializing_if = "is_one")]
    pub repeats: u32,
    /// Judge hallucination with a model (LLM-as-judge) instead of the lexical measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeSpec>,
    /// An OpenAI-compatible embeddings endpoint: `semantic_similarity` is the mean cosine
    /// similarity of each answer with its item's reference (or expected answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<crate::embeddings::EmbeddingsSpec>,
    pub dataset: Vec<DatasetSpec>,
}

/// A judge model, through the same OpenAI-compatible API: asked whether each grounded answer
/// is supported by its context, it answers `SUPPORTED` or `UNSUPPORTED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct JudgeSpec {
    /// Default: the model under test's base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

fn default_concurrency() -> u32 {
    4
}
fn default_request_timeout() -> u64 {
    30
}
fn default_samples() -> u32 {
    20
}
fn default_alpha() -> f64 {
    0.05
}
fn default_repeats() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The most repeats an evaluation may ask: beyond it, a larger dataset buys more power for the
/// same requests.
pub const MAX_REPEATS: u32 = 20;

/// Metrics a dataset gate may bound.
pub const MODEL_METRICS: &[&str] = &[
    "exact_match",
    "accuracy",
    "f1",
    "format_compliance",
    "hallucination_rate",
    "refusal_rate",
    "error_rate",
    "latency_p95_ms",
    "tokens_per_item",
    "semantic_similarity",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct DatasetSpec {
    pub name: String,
    /// JSONL file, relative to the change's source tree.
    pub path: String,
    /// Metric name (see `MODEL_METRICS`) to its limits.
    #[serde(default)]
    pub thresholds: BTreeMap<String, Threshold>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// Requests at a fixed rate, whatever the latency (with coordinated-omission correction).
    #[default]
    Open,
    /// A fixed number of concurrent clients.
    Closed,
}

/// Metrics a performance gate may bound.
pub const PERF_METRICS: &[&str] = &[
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "throughput_rps",
    "error_rate",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PerformanceSpec {
    /// Path appended to the environment's URL.
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default)]
    pub mode: LoadMode,
    #[serde(default = "default_rate")]
    pub rate_per_sec: u32,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    #[serde(default = "default_duration")]
    pub duration_secs: u64,
    #[serde(default = "default_warmup")]
    pub warmup_secs: u64,
    #[serde(default = "default_alpha")]
    pub significance: f64,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Metric name (see `PERF_METRICS`) to its limits.
    #[serde(default)]
    pub tolerances: BTreeMap<String, Threshold>,
    /// Optional benchmark command (e.g. criterion) compared with the baseline's results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub benchmark: Option<BenchmarkSpec>,
}

fn default_path() -> String {
    "/".into()
}
fn default_method() -> String {
    "GET".into()
}
fn default_rate() -> u32 {
    50
}
fn default_duration() -> u64 {
    30
}
fn default_warmup() -> u64 {
    5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BenchmarkFormat {
    Criterion,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct BenchmarkSpec {
    pub command: Argv,
    pub format: BenchmarkFormat,
    #[serde(default = "default_regression_pct")]
    pub max_regression_pct: f64,
}

fn default_regression_pct() -> f64 {
    10.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct CostSpec {
    /// Key of the pricing table (config) for token prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Key of the pricing table for instance prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default = "default_instances")]
    pub instances: u32,
    pub projected_requests_per_month: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_per_month: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_increase_pct: Option<f64>,
    #[serde(default = "default_short_timeout")]
    pub timeout_secs: u64,
}

fn default_instances() -> u32 {
    1
}
fn default_short_timeout() -> u64 {
    120
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum AutoApprove {
    /// Always wait for humans.
    #[default]
    Never,
    /// Approve automatically when every gate passed without a warning.
    WhenClean,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ApprovalPolicy {
    #[serde(default = "default_one")]
    pub required_approvals: u32,
    /// Approver groups allowed to decide; empty means any configured approver.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_self_approval: bool,
    /// An approval older than this no longer counts.
    #[serde(default = "default_expiry")]
    pub expires_after_secs: u64,
    /// A run waiting longer than this for approval ends `cancelled`.
    #[serde(default = "default_approval_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub auto_approve: AutoApprove,
}

fn default_one() -> u32 {
    1
}
fn default_expiry() -> u64 {
    24 * 3600
}
fn default_approval_timeout() -> u64 {
    7 * 24 * 3600
}

/// Metrics an SLO may bound: from the health probes (`availability`, `probe_p95_ms`,
/// `probe_p99_ms`) or from the service's Prometheus endpoint (`error_rate`, `p95_ms`, `p99_ms`).
pub const SLO_METRICS: &[&str] = &[
    "availability",
    "probe_p95_ms",
    "probe_p99_ms",
    "error_rate",
    "p95_ms",
    "p99_ms",
];

/// Names of the deployed service's own metrics in its Prometheus text endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[schemars(deny_unknown_fields)]
pub struct PrometheusNames {
    /// Counter of requests served (for `error_rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<String>,
    /// Counter of requests that failed (for `error_rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<String>,
    /// Histogram of request latency in seconds (for `p95_ms`, `p99_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_histogram: Option<String>,
}

impl PrometheusNames {
    fn is_empty(&self) -> bool {
        self.requests.is_none() && self.errors.is_none() && self.latency_histogram.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct MonitorSpec {
    /// Environments watched after their deploy. Default: the last environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    #[serde(default = "default_window")]
    pub window_secs: u64,
    #[serde(default = "default_probe_interval")]
    pub probe_interval_ms: u64,
    /// A probe slower than this counts as failed.
    #[serde(default = "default_probe_timeout")]
    pub probe_timeout_ms: u64,
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Prometheus text endpoint of the deployed service, scraped at the window's start and end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_path: Option<String>,
    #[serde(default, skip_serializing_if = "PrometheusNames::is_empty")]
    pub metrics: PrometheusNames,
    /// Roll back to the last good version on an SLO breach.
    #[serde(default = "default_true")]
    pub rollback: bool,
    /// Metric name (see `SLO_METRICS`) to its limits.
    #[serde(default)]
    pub slos: BTreeMap<String, Threshold>,
}

fn default_window() -> u64 {
    300
}
fn default_probe_interval() -> u64 {
    10_000
}
fn default_probe_timeout() -> u64 {
    2_000
}
fn default_health_path() -> String {
    "/healthz".into()
}

pub use crate::spec_error::SpecError;

impl PipelineSpec {
    /// Parses and validates a TOML spec a person wrote.
    ///
    /// # Errors
    /// A [`SpecError`] naming the first field that is unknown, mistyped, missing or invalid.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let value: toml::Value = toml::from_str(text).map_err(|e| {
            SpecError::new("(document)", format!("not valid TOML: {}", e.message()))
        })?;
        // The types read tolerantly (a snapshot from an older release may name fields this one
        // dropped); what a person writes is strict: a field no type takes is an error.
        let mut unknown: Option<(String, String)> = None;
        let mut note = |path: serde_ignored::Path<'_>| {
            if unknown.is_none()
                && let serde_ignored::Path::Map { parent, key } = path
            {
                unknown = Some((field_path(parent), key));
            }
        };
        let spec: PipelineSpec =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut note))
                .map_err(|e: serde_path_to_error::Error<_>| {
                    error_at(&e.path().to_string(), e.inner().to_string())
                })?;
        if let Some((parent, field)) = unknown {
            let parent = if parent.is_empty() {
                "(document)".to_string()
            } else {
                parent
            };
            return Err(SpecError::new(parent, format!("unknown field `{field}`")));
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Reads a spec snapshot as a run's first event stored it, as it was accepted: today's
    /// validation is never applied again (a later release may check more, or drop a field),
    /// and fields this release does not know are ignored.
    ///
    /// # Errors
    /// A [`SpecError`] naming the field when the snapshot does not fit the types at all.
    pub fn from_snapshot(value: &serde_json::Value) -> Result<Self, SpecError> {
        // Every run's snapshot is read this way when its log is folded: the path to a bad
        // field is only tracked once there is one to report.
        match PipelineSpec::deserialize(value) {
            Ok(spec) => Ok(spec),
            Err(_) => serde_path_to_error::deserialize(value).map_err(
                |e: serde_path_to_error::Error<_>| {
                    error_at(&e.path().to_string(), e.inner().to_string())
                },
            ),
        }
    }

    /// Checks what the types cannot.
    ///
    /// # Errors
    /// A [`SpecError`] naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("pipeline.name", &self.pipeline.name)?;
        check_argv("build.command", &self.build.command)?;
        check_timeout("build.timeout_secs", self.build.timeout_secs)?;
        check_env("build.env", &self.build.env)?;
        for (i, a) in self.build.artifacts.iter().enumerate() {
            check_relative_path(&format!("build.artifacts[{i}]"), a)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, t) in self.test.iter().enumerate() {
            let p = format!("test[{i}]");
            check_name(&format!("{p}.name"), &t.name)?;
            if !names.insert(t.name.as_str()) {
                return Err(SpecError::new(
                    format!("{p}.name"),
                    format!("duplicate suite name {:?}", t.name),
                ));
            }
            check_argv(&format!("{p}.command"), &t.command)?;
            check_timeout(&format!("{p}.timeout_secs"), t.timeout_secs)?;
            check_env(&format!("{p}.env"), &t.env)?;
            if let Some(j) = &t.junit {
                check_relative_path(&format!("{p}.junit"), j)?;
            }
        }
        let mut envs = std::collections::BTreeSet::new();
        for (i, e) in self.environment.iter().enumerate() {
            let p = format!("environment[{i}]");
            check_name(&format!("{p}.name"), &e.name)?;
            if !envs.insert(e.name.as_str()) {
                return Err(SpecError::new(
                    format!("{p}.name"),
                    format!("duplicate environment name {:?}", e.name),
                ));
            }
            check_argv(&format!("{p}.deploy.command"), &e.deploy.command)?;
            check_timeout(&format!("{p}.deploy.timeout_secs"), e.deploy.timeout_secs)?;
            check_env(&format!("{p}.deploy.env"), &e.deploy.env)?;
            if let Some(url) = &e.url {
                check_url(&format!("{p}.url"), url)?;
            }
            if e.requires_approval && self.approval.is_none() {
                return Err(SpecError::new(
                    format!("{p}.requires_approval"),
                    "needs an [approval] policy",
                ));
            }
            if let Some(r) = &e.rollout {
                r.validate(&format!("{p}.rollout"))?;
                let Some(t) = &e.traffic else {
                    return Err(SpecError::new(
                        format!("{p}.traffic"),
                        "a rollout needs [environment.traffic]: where its weights are published",
                    ));
                };
                crate::rollout::validate_traffic(&format!("{p}.traffic"), t)?;
                if e.url.is_none() && r.metrics.starts_with('/') {
                    return Err(SpecError::new(
                        format!("{p}.url"),
                        "a rollout reads its metrics on the environment's url: give one, or a whole URL in rollout.metrics",
                    ));
                }
                if let Some(c) = t.command.as_ref() {
                    check_argv(&format!("{p}.traffic.command"), c)?;
                }
            } else if e.traffic.is_some() {
                return Err(SpecError::new(
                    format!("{p}.traffic"),
                    "only for an environment with a [environment.rollout]",
                ));
            }
        }
        self.validate_gates()?;
        if let Some(a) = &self.approval {
            if a.required_approvals == 0 {
                return Err(SpecError::new(
                    "approval.required_approvals",
                    "must be at least 1",
                ));
            }
            check_timeout("approval.timeout_secs", a.timeout_secs)?;
            check_timeout("approval.expires_after_secs", a.expires_after_secs)?;
        }
        if let Some(m) = &self.monitor {
            if self.environment.is_empty() {
                return Err(SpecError::new(
                    "monitor",
                    "needs at least one [[environment]]",
                ));
            }
            for (i, e) in m.environments.iter().enumerate() {
                if !envs.contains(e.as_str()) {
                    return Err(SpecError::new(
                        format!("monitor.environments[{i}]"),
                        format!("no environment named {e:?}"),
                    ));
                }
            }
            check_timeout("monitor.window_secs", m.window_secs)?;
            if m.probe_interval_ms < 50 || m.probe_interval_ms > m.window_secs * 1000 {
                return Err(SpecError::new(
                    "monitor.probe_interval_ms",
                    "must be at least 50 and at most the window",
                ));
            }
            if m.probe_timeout_ms == 0 {
                return Err(SpecError::new(
                    "monitor.probe_timeout_ms",
                    "must be at least 1",
                ));
            }
            check_metrics("monitor.slos", &m.slos, SLO_METRICS)?;
            for (slo, needs) in [
                (
                    "error_rate",
                    [m.metrics.requests.as_ref(), m.metrics.errors.as_ref()],
                ),
                (
                    "p95_ms",
                    [
                        m.metrics.latency_histogram.as_ref(),
                        m.metrics.latency_histogram.as_ref(),
                    ],
                ),
                (
                    "p99_ms",
                    [
                        m.metrics.latency_histogram.as_ref(),
                        m.metrics.latency_histogram.as_ref(),
                    ],
                ),
            ] {
                if m.slos.contains_key(slo)
                    && (m.metrics_path.is_none() || needs.iter().any(Option::is_none))
                {
                    return Err(SpecError::new(
                        format!("monitor.slos.{slo}"),
                        "needs monitor.metrics_path and the metric names in [monitor.metrics]",
                    ));
                }
            }
            for (i, e) in self.environment.iter().enumerate() {
                if self.monitors(&e.name) && e.url.is_none() {
                    return Err(SpecError::new(
                        format!("environment[{i}].url"),
                        "a monitored environment needs a url",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_gates(&self) -> Result<(), SpecError> {
        let g = &self.gates;
        if let Some(env) = &g.environment
            && !self.environment.iter().any(|e| &e.name == env)
        {
            return Err(SpecError::new(
                "gates.environment",
                format!("no environment named {env:?}"),
            ));
        }
        if let Some(gated) = self.gates_environment_index()
            && let Some(first_approval) = self.environment.iter().position(|e| e.requires_approval)
            && gated >= first_approval
        {
            return Err(SpecError::new(
                "gates.environment",
                "gates must measure an environment deployed before the first one that requires approval",
            ));
        }
        if let Some(m) = &g.model_evaluation {
            if m.dataset.is_empty() {
                return Err(SpecError::new(
                    "gates.model_evaluation.dataset",
                    "needs at least one dataset",
                ));
            }
            if m.concurrency == 0 {
                return Err(SpecError::new(
                    "gates.model_evaluation.concurrency",
                    "must be at least 1",
                ));
            }
            check_timeout("gates.model_evaluation.timeout_secs", m.timeout_secs)?;
            check_alpha("gates.model_evaluation.significance", m.significance)?;
            if !(1..=MAX_REPEATS).contains(&m.repeats) {
                return Err(SpecError::new(
                    "gates.model_evaluation.repeats",
                    format!("must be between 1 and {MAX_REPEATS}"),
                ));
            }
            if let ModelEndpoint::Command { command } = &m.endpoint {
                check_argv("gates.model_evaluation.endpoint.command", command)?;
            }
            if let ModelEndpoint::Openai { base_url: None, .. } = &m.endpoint
                && self.gates_environment_url().is_none()
            {
                return Err(SpecError::new(
                    "gates.model_evaluation.endpoint.base_url",
                    "needed when the gated environment has no url",
                ));
            }
            let mut names = std::collections::BTreeSet::new();
            for (i, d) in m.dataset.iter().enumerate() {
                let p = format!("gates.model_evaluation.dataset[{i}]");
                check_name(&format!("{p}.name"), &d.name)?;
                if !names.insert(d.name.as_str()) {
                    return Err(SpecError::new(
                        format!("{p}.name"),
                        format!("duplicate dataset name {:?}", d.name),
                    ));
                }
                check_relative_path(&format!("{p}.path"), &d.path)?;
                check_metrics(&format!("{p}.thresholds"), &d.thresholds, MODEL_METRICS)?;
                if d.thresholds.contains_key("semantic_similarity") && m.embeddings.is_none() {
                    return Err(SpecError::new(
                        format!("{p}.thresholds.semantic_similarity"),
                        "needs gates.model_evaluation.embeddings (base_url, model)",
                    ));
                }
            }
        }
        if let Some(p) = &g.performance {
            if self.gates_environment_url().is_none() {
                return Err(SpecError::new(
                    "gates.performance",
                    "needs a gated environment with a url",
                ));
            }
            if p.rate_per_sec == 0 || p.concurrency == 0 {
                return Err(SpecError::new(
                    "gates.performance.rate_per_sec",
                    "rate_per_sec and concurrency must be at least 1",
                ));
            }
            check_timeout("gates.performance.duration_secs", p.duration_secs)?;
            check_timeout("gates.performance.timeout_secs", p.timeout_secs)?;
            check_alpha("gates.performance.significance", p.significance)?;
            check_metrics("gates.performance.tolerances", &p.tolerances, PERF_METRICS)?;
            if let Some(b) = &p.benchmark {
                check_argv("gates.performance.benchmark.command", &b.command)?;
            }
        }
        if let Some(c) = &g.cost {
            check_timeout("gates.cost.timeout_secs", c.timeout_secs)?;
            if c.model.is_some() && g.model_evaluation.is_none() {
                return Err(SpecError::new(
                    "gates.cost.model",
                    "pricing a model needs [gates.model_evaluation] (its token counts)",
                ));
            }
            if c.model.is_none() && c.instance_type.is_none() {
                return Err(SpecError::new(
                    "gates.cost",
                    "needs a model or an instance_type to price",
                ));
            }
        }
        Ok(())
    }

    /// Index of the environment the gates measure, if gates and environments exist.
    pub fn gates_environment_index(&self) -> Option<usize> {
        if self.gates.is_empty() || self.environment.is_empty() {
            return None;
        }
        match &self.gates.environment {
            Some(name) => self.environment.iter().position(|e| &e.name == name),
            None => Some(0),
        }
    }

    fn gates_environment_url(&self) -> Option<&str> {
        self.gates_environment_index()
            .and_then(|i| self.environment[i].url.as_deref())
    }

    /// Whether the post-deploy monitor watches this environment.
    pub fn monitors(&self, environment: &str) -> bool {
        match &self.monitor {
            None => false,
            Some(m) if m.environments.is_empty() => self
                .environment
                .last()
                .is_some_and(|e| e.name == environment),
            Some(m) => m.environments.iter().any(|e| e == environment),
        }
    }

    pub fn has_gates(&self) -> bool {
        !self.gates.is_empty()
    }

    pub fn environment(&self, name: &str) -> Option<&EnvironmentSpec> {
        self.environment.iter().find(|e| e.name == name)
    }
}

/// An error at a serde path; a missing field is named in the path itself.
/// A path as the other errors name them (`test[1].command`).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

fn error_at(path: &str, message: String) -> SpecError {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
        .map(str::to_string);
    let base = if path == "." { "" } else { path };
    let path = match (missing, base) {
        (Some(f), "") => f,
        (Some(f), b) => format!("{b}.{f}"),
        (None, "") => "(document)".to_string(),
        (None, b) => b.to_string(),
    };
    SpecError::new(path, message)
}

/// Names become NATS subject tokens and file names: keep them plain.
fn check_name(path: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            path,
            format!("{name:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'"),
        ))
    }
}

fn check_argv(path: &str, argv: &[String]) -> Result<(), SpecError> {
    match argv.first() {
        None => Err(SpecError::new(path, "must name a program")),
        Some(p) if p.is_empty() => Err(SpecError::new(format!("{path}[0]"), "empty program")),
        Some(_) => {
            if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
                return Err(SpecError::new(
                    format!("{path}[{i}]"),
                    "contains a NUL byte",
                ));
            }
            Ok(())
        }
    }
}

fn check_timeout(path: &str, secs: u64) -> Result<(), SpecError> {
    // A year is far beyond any stage; larger values are typos that would overflow deadlines.
    if secs == 0 || secs > 366 * 24 * 3600 {
        Err(SpecError::new(
            path,
            "must be between 1 and 31622400 seconds",
        ))
    } else {
        Ok(())
    }
}

fn check_alpha(path: &str, alpha: f64) -> Result<(), SpecError> {
    if alpha > 0.0 && alpha < 1.0 {
        Ok(())
    } else {
        Err(SpecError::new(path, "must be strictly between 0 and 1"))
    }
}

fn check_env(path: &str, env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for (k, v) in env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(SpecError::new(
                format!("{path}.{k}"),
                "variable names are A-Z, a-z, 0-9 and '_', not starting with a digit",
            ));
        }
        if k.starts_with("SLIPWAY_") {
            return Err(SpecError::new(
                format!("{path}.{k}"),
                "SLIPWAY_* variables are set by Slipway",
            ));
        }
        if v.contains('\0') {
            return Err(SpecError::new(format!("{path}.{k}"), "contains a NUL byte"));
        }
    }
    Ok(())
}

fn check_url(path: &str, url: &str) -> Result<(), SpecError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(SpecError::new(
            path,
            format!("{url:?} is not an http(s) URL"),
        ))
    }
}

fn check_metrics(
    path: &str,
    map: &BTreeMap<String, Threshold>,
    known: &[&str],
) -> Result<(), SpecError> {
    for (k, t) in map {
        if !known.contains(&k.as_str()) {
            return Err(SpecError::new(
                format!("{path}.{k}"),
                format!("unknown metric; known: {}", known.join(", ")),
            ));
        }
        if t.min.is_none()
            && t.max.is_none()
            && t.max_regression.is_none()
            && t.max_regression_pct.is_none()
        {
            return Err(SpecError::new(format!("{path}.{k}"), "sets no bound"));
        }
    }
    Ok(())
}

/// A path that stays inside the workspace: relative, no `..`, no NUL.
///
/// # Errors
/// A [`SpecError`] at `path` saying why.
pub fn check_relative_path(path: &str, p: &str) -> Result<(), SpecError> {
    use std::path::Component;
    if p.is_empty() || p.contains('\0') {
        return Err(SpecError::new(path, "must be a non-empty path"));
    }
    let pb = std::path::Path::new(p);
    for c in pb.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(SpecError::new(
                    path,
                    format!("{p:?} must not contain '..' (it would leave the workspace)"),
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(SpecError::new(
                    path,
                    format!("{p:?} must be relative to the workspace"),
                ));
            }
        }
    }
    Ok(())
}

/// A pipeline whose stages do nothing: build, one suite, staging, approval, production (the
/// benchmark's runs, and the decoding and folding example's).
pub const NOOP_PIPELINE: &str = r#"
[pipeline]
name = "noop"
[build]
command = ["sh", "-c", "mkdir -p dist && echo ok > dist/a"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
[[environment]]
name = "staging"
[environment.deploy]
command = ["true"]
[[environment]]
name = "production"
requires_approval = true
[environment.deploy]
command = ["true"]
[approval]
allowed_groups = ["release-managers"]
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[pipeline]
name = "hello"
[build]
command = ["sh", "-c", "true"]
"#;

    #[test]
    fn minimal_spec_parses_with_defaults() {
        let s = PipelineSpec::parse(MINIMAL).unwrap();
        assert_eq!(s.build.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert!(s.test.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                "[pipeline]\nname='x'\n[build]\ncommand=['a']\nbogus=1\n",
                "build",
            ),
            (
                "[pipeline]\nname='x'\n[build]\ncommand='make'\n",
                "build.command",
            ),
            (
                "[pipeline]\nname='x'\n[build]\ncommand=['a']\ntimeout_secs='1'\n",
                "build.timeout_secs",
            ),
            (
                "[pipeline]\nname='x'\n[build]\ncommand=['a']\n[[test]]\nname='u'\ncommand=['t']\n[[test]]\nname='v'\ncommand=[]\n",
                "test[1].command",
            ),
            (
                "[pipeline]\nname='a b'\n[build]\ncommand=['a']\n",
                "pipeline.name",
            ),
            (
                "[pipeline]\nname='x'\n[build]\ncommand=['a']\nartifacts=['../etc']\n",
                "build.artifacts[0]",
            ),
            ("[pipeline]\nname='x'\n", "build"),
            ("not toml = = =", "(document)"),
            (
                "[pipeline]\nname='x'\n[build]\ncommand=['a']\n[gates.model_evaluation]\nendpoint={kind='command',command=['m']}\nrepeats=21\n[[gates.model_evaluation.dataset]]\nname='d'\npath='d.jsonl'\n",
                "gates.model_evaluation.repeats",
            ),
            (
                "[pipeline]\nname='x'\n[build]\ncommand=['a']\n[gates.model_evaluation]\nendpoint={kind='command',command=['m']}\nrepeats=0\n[[gates.model_evaluation.dataset]]\nname='d'\npath='d.jsonl'\n",
                "gates.model_evaluation.repeats",
            ),
        ];
        for (text, path) in cases {
            let err = PipelineSpec::parse(text).unwrap_err();
            assert!(
                err.path.starts_with(path),
                "expected path {path}, got {err} for {text:?}"
            );
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let err = PipelineSpec::parse("[pipeline]\nname='x'\n[build]\ncommand=['a']\nbogus=1\n")
            .unwrap_err();
        assert!(err.message.contains("bogus"), "{err}");
        assert_eq!(err.path, "build");
        let err = PipelineSpec::parse(
            "[pipeline]\nname='x'\n[build]\ncommand=['a']\n[[test]]\nname='u'\ncommand=['t']\n[[test]]\nname='v'\ncommand=['t']\nsuite_typo=1\n",
        )
        .unwrap_err();
        assert_eq!(err.message, "unknown field `suite_typo`");
        assert_eq!(err.path, "test[1]");
        let err = PipelineSpec::parse("pipline = 1\n[build]\ncommand=['a']\n").unwrap_err();
        assert!(
            err.message.contains("pipline") || err.path == "pipeline",
            "{err}"
        );
    }

    #[test]
    fn a_snapshot_is_read_as_it_was_accepted() {
        // A field a later release dropped, and a value today's validation refuses (a command
        // must not be empty): the snapshot still reads.
        let v = serde_json::json!({
            "pipeline": {"name": "old pipeline!", "retired_field": true},
            "build": {"command": [], "artifacts": [], "cache": "gone"},
        });
        let spec = PipelineSpec::from_snapshot(&v).unwrap();
        assert_eq!(spec.pipeline.name, "old pipeline!");
        assert!(spec.validate().is_err(), "today's rules refuse it");
        let e = PipelineSpec::from_snapshot(&serde_json::json!({"pipeline": 3})).unwrap_err();
        assert_eq!(e.path, "pipeline", "{e}");
    }

    #[test]
    fn relative_paths() {
        assert!(check_relative_path("p", "dist/app").is_ok());
        assert!(check_relative_path("p", "./dist").is_ok());
        assert!(check_relative_path("p", "/etc/passwd").is_err());
        assert!(check_relative_path("p", "a/../../b").is_err());
        assert!(check_relative_path("p", "").is_err());
    }
}
