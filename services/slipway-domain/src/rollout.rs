//! Progressive delivery: an environment's `[environment.rollout]` (canary steps or an A/B
//! experiment), how its traffic is moved (`[environment.traffic]`), the events of a rollout,
//! and what a run's log says about one (folded into [`RolloutView`]).
//!
//! A rollout environment has two slots. Its `deploy` stage puts the change in the `candidate`
//! slot beside the version in service (`stable`); the `rollout` stage (the judge, in the
//! monitor service) moves traffic to the candidate step by step and compares the two on the
//! same traffic over the same window; a successful rollout is followed by `promote`, which
//! deploys the change to the stable slot and sends all traffic back to it. An aborted one
//! sends all traffic to the stable slot at once and rolls the candidate slot back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::embeddings::{EmbeddingsSpec, mean_interval, wilson};
use crate::judge::{self, AbLook, AbWinner, Count, Scoring, StepDecision, Worse};
use crate::spec_error::SpecError;

/// A slot of a rollout environment, given to the deploy command as `SLIPWAY_SLOT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// The version in service.
    Stable,
    /// The version being rolled out.
    Candidate,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Stable => crate::traffic::STABLE,
            Slot::Candidate => crate::traffic::CANDIDATE,
        }
    }
}

/// Where a rollout's traffic weights are published. Every weight change goes to each target
/// given, and is an event in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[schemars(deny_unknown_fields)]
pub struct TrafficSpec {
    /// The flag's key. Default: `<pipeline>-<environment>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag_key: Option<String>,
    /// An absolute path: the flagd flag file (JSON), replaced atomically on each change, for
    /// flagd's file sync or an in-process flagd provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag_file: Option<String>,
    /// Also publish the flag definition to the NATS KV bucket `slipway-flags` under the flag's
    /// key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv: bool,
    /// A command for routers with an API of their own, run with `SLIPWAY_WEIGHT` (the
    /// candidate's percentage), `SLIPWAY_FLAG_KEY`, `SLIPWAY_ENVIRONMENT` and `SLIPWAY_PIPELINE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default = "default_traffic_timeout")]
    pub timeout_secs: u64,
}

fn default_traffic_timeout() -> u64 {
    30
}

impl TrafficSpec {
    /// The flag key for a pipeline's environment.
    pub fn flag_key_for(&self, pipeline: &str, environment: &str) -> String {
        self.flag_key
            .clone()
            .unwrap_or_else(|| format!("{pipeline}-{environment}"))
    }

    fn is_empty(&self) -> bool {
        self.flag_file.is_none() && !self.kv && self.command.is_none()
    }
}

/// How a rollout is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Steps of growing weight, each judged against the stable version.
    Canary,
    /// One split held until a sequential test decides which variant is better.
    Ab,
    /// Copies of a share of live requests sent to the candidate, whose answers are compared
    /// with the stable's and never served.
    Shadow,
}

/// One canary step: the candidate's share of traffic and how long it is observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct StepSpec {
    /// Percent of requests sent to the candidate (0 < weight ≤ 100).
    pub weight: f64,
    /// How long the step is observed before it may be promoted.
    pub duration_secs: u64,
}

/// What a compared metric is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// A ratio of two counters (`numerator` / `denominator`), compared as proportions.
    Ratio,
    /// A quantile of a latency histogram, compared with Mann-Whitney on its buckets.
    Latency,
}

/// One metric compared between the candidate and the stable version, from the service's
/// Prometheus counters and histograms labelled by variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct AnalysisMetric {
    /// A name for reports: `[A-Za-z0-9_-]`.
    pub name: String,
    pub kind: MetricKind,
    /// Ratio: the counter of the events counted (errors, positive feedback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerator: Option<String>,
    /// Ratio: the counter of all events (requests, feedback given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denominator: Option<String>,
    /// Ratio: a higher ratio is better (feedback) rather than worse (errors).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub higher_is_better: bool,
    /// Ratio: how much worse the candidate may be, in the ratio's units (0.01 is one point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// Latency: the histogram's name (without `_bucket`), in seconds or any unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
    /// Latency: the quantile compared (0.95 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantile: Option<f64>,
    /// Latency: how much slower the candidate's quantile may be, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_increase_pct: Option<f64>,
}

impl AnalysisMetric {
    fn worse(&self) -> Worse {
        if self.higher_is_better {
            Worse::Lower
        } else {
            Worse::Higher
        }
    }
}

/// What happens to an A/B experiment's winning candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnWin {
    /// Promote it at once.
    #[default]
    Promote,
    /// Hold the experiment with its result until an approver promotes (or aborts) it.
    Approve,
}

/// An A/B experiment: which variant is better on one ratio metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct AbSpec {
    /// The `analysis` metric decided on (a ratio).
    pub metric: String,
    /// The smallest difference of the ratio worth detecting (0.02 is two points): it sizes
    /// the sequential test's mixture.
    pub min_effect: f64,
    /// The error rate the test keeps under continuous monitoring.
    #[serde(default = "default_significance")]
    pub significance: f64,
    /// Percent of requests sent to the candidate during the experiment.
    #[serde(default = "default_ab_weight")]
    pub weight: f64,
    /// Undecided by then, the version in service is kept.
    pub max_duration_secs: u64,
    #[serde(default)]
    pub winner: OnWin,
}

fn default_significance() -> f64 {
    0.05
}
fn default_ab_weight() -> f64 {
    50.0
}

/// A shadow rollout: the router mirrors `share` percent of requests to the candidate and
/// keeps both answers of each mirrored request, which the judge reads from `pairs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ShadowSpec {
    /// Percent of requests mirrored (0 < share ≤ 100).
    pub share: f64,
    /// How long the candidate is shadowed before it may be promoted.
    pub duration_secs: u64,
    /// Where the router serves the mirrored pairs: a path on the environment's url or a whole
    /// URL (`GET <pairs>?after=<seq>` → `{"pairs": [{"seq", "stable", "candidate"}], "last":
    /// <the last seq it holds>}`; a fresh shadow starts after `last`).
    #[serde(default = "default_pairs")]
    pub pairs: String,
    /// Pairs needed before anything is judged.
    #[serde(default = "default_min_pairs")]
    pub min_pairs: u64,
    /// The smallest share of pairs whose answers are the same (trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agreement: Option<f64>,
    /// The smallest mean cosine similarity of the two answers' embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_similarity: Option<f64>,
    /// The embeddings endpoint, for `min_similarity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<EmbeddingsSpec>,
}

fn default_pairs() -> String {
    "/shadow/pairs".into()
}
fn default_min_pairs() -> u64 {
    50
}

/// `[environment.rollout]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RolloutSpec {
    pub strategy: Strategy,
    /// The Prometheus text endpoint, a path on the environment's url or a whole URL.
    #[serde(default = "default_metrics_path")]
    pub metrics: String,
    /// The label telling the variants' samples apart (values `stable` and `candidate`).
    #[serde(default = "default_variant_label")]
    pub variant_label: String,
    /// Seconds between looks at the metrics.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Requests each variant must have served in a step before it is judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// The counter of requests, for `min_requests` (by variant).
    pub requests: String,
    /// A canary comparison fails at this significance.
    #[serde(default = "default_significance")]
    pub significance: f64,
    /// Kayenta-style step scores out of 100: promote at `pass_score`, abort below
    /// `marginal_score`.
    #[serde(default = "default_pass")]
    pub pass_score: f64,
    #[serde(default = "default_marginal")]
    pub marginal_score: f64,
    /// A step held this long past its duration without a decision aborts. Default: its
    /// duration again (at least a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hold_secs: Option<u64>,
    /// Canary: the steps, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepSpec>,
    /// The metrics compared (canary: every one; A/B: guardrails beside the decided metric).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<AnalysisMetric>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab: Option<AbSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
}

fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_variant_label() -> String {
    "variant".into()
}
fn default_interval() -> u64 {
    10
}
fn default_min_requests() -> u64 {
    100
}
fn default_pass() -> f64 {
    95.0
}
fn default_marginal() -> f64 {
    75.0
}

/// What the judge does at each step: the weight and how long it is observed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub weight: f64,
    pub duration_secs: u64,
}

impl RolloutSpec {
    /// The steps the rollout goes through: the canary's, or the A/B experiment's one split.
    pub fn plan(&self) -> Vec<Plan> {
        match (self.strategy, &self.ab) {
            (Strategy::Ab, Some(ab)) => vec![Plan {
                weight: ab.weight,
                duration_secs: ab.max_duration_secs,
            }],
            (Strategy::Shadow, _) => self
                .shadow
                .iter()
                .map(|sh| Plan {
                    weight: sh.share,
                    duration_secs: sh.duration_secs,
                })
                .collect(),
            _ => self
                .steps
                .iter()
                .map(|s| Plan {
                    weight: s.weight,
                    duration_secs: s.duration_secs,
                })
                .collect(),
        }
    }

    /// How long past its duration a step may hold.
    pub fn max_hold_secs(&self, step: &Plan) -> u64 {
        self.max_hold_secs
            .unwrap_or_else(|| step.duration_secs.max(60))
    }

    /// The longest a rollout can take, for the stage's timeout.
    pub fn longest_secs(&self) -> u64 {
        self.plan()
            .iter()
            .map(|p| p.duration_secs + self.max_hold_secs(p) + 2 * self.interval_secs)
            .sum()
    }

    fn scoring(&self) -> Scoring {
        Scoring {
            pass: self.pass_score,
            marginal: self.marginal_score,
        }
    }

    /// Checks what the types cannot; `p` is the spec path of this table.
    ///
    /// # Errors
    /// A [`SpecError`] naming the field.
    pub fn validate(&self, p: &str) -> Result<(), SpecError> {
        let err = |field: &str, msg: String| Err(SpecError::at(format!("{p}.{field}"), msg));
        if self.interval_secs == 0 {
            return err("interval_secs", "must be at least 1".into());
        }
        if !(self.significance > 0.0 && self.significance < 0.5) {
            return err("significance", "must be between 0 and 0.5".into());
        }
        if !(0.0..=100.0).contains(&self.marginal_score)
            || !(self.marginal_score..=100.0).contains(&self.pass_score)
        {
            return err(
                "pass_score",
                "scores are 0 to 100, marginal_score at most pass_score".into(),
            );
        }
        if self.variant_label.is_empty() || self.requests.is_empty() {
            return err("requests", "needs the request counter's name".into());
        }
        if !self.metrics.starts_with('/')
            && !self.metrics.starts_with("http://")
            && !self.metrics.starts_with("https://")
        {
            return err(
                "metrics",
                format!("{:?} is neither a path nor an http(s) URL", self.metrics),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.analysis.iter().enumerate() {
            let mp = format!("analysis[{i}]");
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return err(&format!("{mp}.name"), "use [A-Za-z0-9_-]".into());
            }
            if !names.insert(m.name.as_str()) {
                return err(&format!("{mp}.name"), format!("duplicate {:?}", m.name));
            }
            match m.kind {
                MetricKind::Ratio => {
                    if m.numerator.is_none() || m.denominator.is_none() {
                        return err(
                            &mp,
                            "a ratio needs `numerator` and `denominator` counters".into(),
                        );
                    }
                    if m.tolerance.is_some_and(|t| !(0.0..1.0).contains(&t)) {
                        return err(&format!("{mp}.tolerance"), "must be from 0 to 1".into());
                    }
                }
                MetricKind::Latency => {
                    if m.histogram.is_none() {
                        return err(&mp, "a latency metric needs `histogram`".into());
                    }
                    if m.quantile.is_some_and(|q| !(q > 0.0 && q < 1.0)) {
                        return err(&format!("{mp}.quantile"), "must be between 0 and 1".into());
                    }
                    if m.max_increase_pct.is_some_and(|x| x < 0.0) {
                        return err(
                            &format!("{mp}.max_increase_pct"),
                            "must be 0 or more".into(),
                        );
                    }
                }
            }
        }
        match self.strategy {
            Strategy::Canary => {
                if self.steps.is_empty() {
                    return err("steps", "a canary needs at least one step".into());
                }
                if self.analysis.is_empty() {
                    return err("analysis", "a canary needs at least one metric".into());
                }
                let mut last = 0.0;
                for (i, s) in self.steps.iter().enumerate() {
                    if !(s.weight > last && s.weight <= 100.0) {
                        return err(
                            &format!("steps[{i}].weight"),
                            "weights grow from step to step, above 0 and at most 100".into(),
                        );
                    }
                    if s.duration_secs == 0 {
                        return err(
                            &format!("steps[{i}].duration_secs"),
                            "must be at least 1".into(),
                        );
                    }
                    last = s.weight;
                }
                if self.ab.is_some() {
                    return err("ab", "only for strategy = \"ab\"".into());
                }
                if self.shadow.is_some() {
                    return err("shadow", "only for strategy = \"shadow\"".into());
                }
            }
            Strategy::Shadow => {
                let Some(sh) = &self.shadow else {
                    return err(
                        "shadow",
                        "strategy = \"shadow\" needs [environment.rollout.shadow]".into(),
                    );
                };
                if !self.steps.is_empty() || self.ab.is_some() {
                    return err("shadow", "a shadow rollout has no steps and no ab".into());
                }
                if !(sh.share > 0.0 && sh.share <= 100.0) {
                    return err("shadow.share", "must be above 0 and at most 100".into());
                }
                if sh.duration_secs == 0 {
                    return err("shadow.duration_secs", "must be at least 1".into());
                }
                if sh.min_agreement.is_none() && sh.min_similarity.is_none() {
                    return err(
                        "shadow",
                        "needs a bound: min_agreement and/or min_similarity".into(),
                    );
                }
                for (field, v) in [
                    ("min_agreement", sh.min_agreement),
                    ("min_similarity", sh.min_similarity),
                ] {
                    if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                        return err(&format!("shadow.{field}"), "must be from 0 to 1".into());
                    }
                }
                if sh.min_similarity.is_some() && sh.embeddings.is_none() {
                    return err(
                        "shadow.embeddings",
                        "min_similarity needs an embeddings endpoint (base_url, model)".into(),
                    );
                }
                if !sh.pairs.starts_with('/')
                    && !sh.pairs.starts_with("http://")
                    && !sh.pairs.starts_with("https://")
                {
                    return err(
                        "shadow.pairs",
                        format!("{:?} is neither a path nor an http(s) URL", sh.pairs),
                    );
                }
            }
            Strategy::Ab => {
                if self.shadow.is_some() {
                    return err("shadow", "only for strategy = \"shadow\"".into());
                }
                let Some(ab) = &self.ab else {
                    return err(
                        "ab",
                        "strategy = \"ab\" needs [environment.rollout.ab]".into(),
                    );
                };
                if !self.steps.is_empty() {
                    return err("steps", "only for strategy = \"canary\"".into());
                }
                match self.analysis.iter().find(|m| m.name == ab.metric) {
                    Some(m) if m.kind == MetricKind::Ratio => {}
                    Some(_) => return err("ab.metric", "must name a ratio metric".into()),
                    None => {
                        return err(
                            "ab.metric",
                            format!("no metric named {:?} in analysis", ab.metric),
                        );
                    }
                }
                if !(ab.min_effect > 0.0 && ab.min_effect < 1.0) {
                    return err("ab.min_effect", "must be between 0 and 1".into());
                }
                if !(ab.significance > 0.0 && ab.significance < 0.5) {
                    return err("ab.significance", "must be between 0 and 0.5".into());
                }
                if !(ab.weight > 0.0 && ab.weight < 100.0) {
                    return err("ab.weight", "must be above 0 and below 100".into());
                }
                if ab.max_duration_secs == 0 {
                    return err("ab.max_duration_secs", "must be at least 1".into());
                }
            }
        }
        Ok(())
    }
}

/// Validates an environment's traffic table.
///
/// # Errors
/// A [`SpecError`] naming the field.
pub fn validate_traffic(p: &str, t: &TrafficSpec) -> Result<(), SpecError> {
    if t.is_empty() {
        return Err(SpecError::at(
            p,
            "a rollout needs somewhere to publish its weights: flag_file, kv or command",
        ));
    }
    if let Some(f) = &t.flag_file
        && !f.starts_with('/')
    {
        return Err(SpecError::at(
            format!("{p}.flag_file"),
            "must be an absolute path",
        ));
    }
    if let Some(k) = &t.flag_key
        && (k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        return Err(SpecError::at(
            format!("{p}.flag_key"),
            "use [A-Za-z0-9_-] (it is also a KV key)",
        ));
    }
    if let Some(c) = &t.command
        && c.first().is_none_or(String::is_empty)
    {
        return Err(SpecError::at(
            format!("{p}.command"),
            "needs a program to run",
        ));
    }
    Ok(())
}

// ---- events ---------------------------------------------------------------------------

/// Who moved the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightCause {
    /// A step began.
    Step,
    /// The rollout was aborted (by the judge or a person): all traffic to the stable slot.
    Abort,
    /// The rollout's last step passed, or a person promoted it.
    Promote,
    /// The change is in the stable slot now: traffic back to it.
    Promoted,
}

/// `dev.slipway.rollout.weight_set.v1`: the candidate's share of traffic changed, and where
/// it was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WeightSet {
    /// The rollout stage (`rollout:<environment>`).
    pub stage: String,
    pub attempt: u32,
    pub environment: String,
    /// The step (0-based) this weight begins; the step count for a promotion.
    pub step: u32,
    /// The candidate's percentage.
    pub weight: f64,
    pub cause: WeightCause,
    /// Where it was published: the flag file, `kv:<bucket>/<key>`, `command`.
    pub published: Vec<String>,
    pub at: DateTime<Utc>,
}

/// A metric of both variants over one window, and what it says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Comparison {
    pub metric: String,
    pub stable: f64,
    pub candidate: f64,
    /// How much worse the candidate is (ratio: points; latency: the quantile's relative
    /// increase); negative is better.
    pub worse_by: f64,
    /// The tolerance allowed.
    pub tolerance: f64,
    /// The test used: `proportions` or `mann_whitney`.
    pub test: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// `pass`, `fail` or `no_data`.
    pub verdict: String,
    /// Events behind each side (requests, feedback given, latency samples).
    pub samples: [f64; 2],
}

/// The A/B experiment's figures at one look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AbFigures {
    pub metric: String,
    /// The candidate's ratio minus the stable's.
    pub effect: f64,
    /// Always-valid confidence interval of the effect.
    pub interval: [f64; 2],
    /// Always-valid p-value (mSPRT).
    pub p_value: f64,
    /// `stable` or `candidate`, once decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<String>,
}

/// A shadow rollout's figures since it began: the running totals (a restarted judge goes on
/// from them and from `cursor`) and what they say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ShadowFigures {
    /// Mirrored requests compared.
    pub pairs: u64,
    /// Pairs whose answers are the same.
    pub agreed: u64,
    /// Pairs whose similarity was measured, the sum and the sum of squares of their cosines.
    #[serde(default)]
    pub measured: u64,
    #[serde(default)]
    pub similarity_sum: f64,
    #[serde(default)]
    pub similarity_sum_sq: f64,
    /// The last pair read (the router's sequence).
    pub cursor: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// 95% Wilson interval of the agreement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement_interval: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// 95% interval of the mean similarity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity_interval: Option<[f64; 2]>,
}

impl ShadowFigures {
    /// Adds one pair: whether its answers agree, and their cosine if measured.
    pub fn add(&mut self, seq: u64, agreed: bool, similarity: Option<f64>) {
        self.pairs += 1;
        self.agreed += u64::from(agreed);
        if let Some(c) = similarity {
            self.measured += 1;
            self.similarity_sum += c;
            self.similarity_sum_sq += c * c;
        }
        self.cursor = self.cursor.max(seq);
        self.summarise();
    }

    fn summarise(&mut self) {
        let n = self.pairs as f64;
        self.agreement = (self.pairs > 0).then(|| self.agreed as f64 / n);
        self.agreement_interval = wilson(self.agreed as f64, n, 1.96);
        let m = mean_interval(
            self.measured as f64,
            self.similarity_sum,
            self.similarity_sum_sq,
            1.96,
        );
        self.similarity = m.map(|x| x.0);
        self.similarity_interval = m.map(|x| x.1);
    }
}

/// Whether two answers are the same: equal once trimmed (whitespace at either end is not a
/// difference in what was answered).
pub fn agree(stable: &str, candidate: &str) -> bool {
    stable.trim() == candidate.trim()
}

/// `dev.slipway.rollout.analysed.v1`: one look at both variants during a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutAnalysis {
    pub stage: String,
    pub attempt: u32,
    pub step: u32,
    pub weight: f64,
    /// Seconds since the step began.
    pub elapsed_secs: u64,
    /// Requests to the stable version and to the candidate since the step's window began.
    pub requests: [f64; 2],
    pub comparisons: Vec<Comparison>,
    /// The step's score out of 100, when anything could be judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab: Option<AbFigures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowFigures>,
    /// `promote`, `hold` or `abort`.
    pub decision: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// `dev.slipway.rollout.{succeeded,failed}.v1`: how the rollout ended, with its evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutReport {
    pub stage: String,
    pub attempt: u32,
    pub environment: String,
    pub version: String,
    /// Steps passed.
    pub steps_passed: u32,
    /// The last look, the evidence of the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<RolloutAnalysis>,
    /// Who decided: `judge` or the person who promoted or aborted.
    pub decided_by: String,
    pub reason: String,
    pub duration_ms: u64,
}

/// What a person may do with a rollout in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Hold the current weight; nothing is judged until resumed.
    Pause,
    Resume,
    /// Skip the remaining steps: all traffic to the candidate, then promote.
    Promote,
    /// All traffic to the stable version, and roll the candidate back.
    Abort,
}

impl ControlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlAction::Pause => "pause",
            ControlAction::Resume => "resume",
            ControlAction::Promote => "promote",
            ControlAction::Abort => "abort",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pause, Self::Resume, Self::Promote, Self::Abort]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// `dev.slipway.rollout.controlled.v1`: a person's control of a rollout, through the
/// gateway, signed by it like an approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RolloutControl {
    pub stage: String,
    pub attempt: u32,
    pub action: ControlAction,
    pub by: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub at: DateTime<Utc>,
    /// The gateway's Ed25519 signature (see [`crate::signing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl RolloutControl {
    /// The bytes signed: run, stage, attempt, action, person and time.
    pub fn message(&self, run_id: &str) -> Vec<u8> {
        format!(
            "slipway rollout control v1\n{run_id}\n{}\n{}\n{}\n{}\n{}",
            self.stage,
            self.attempt,
            self.action.as_str(),
            self.by,
            self.at.to_rfc3339()
        )
        .into_bytes()
    }
}

/// The id of a weight change: one per step begun, abort or promotion of a stage attempt, so
/// a judge that repeats one after a restart publishes a duplicate.
pub fn weight_event_id(run_id: &str, w: &WeightSet) -> String {
    let cause = serde_json::to_value(w.cause).unwrap_or_default();
    crate::ids::derived(&[
        run_id,
        "rollout.weight_set",
        &w.stage,
        &w.attempt.to_string(),
        &w.step.to_string(),
        cause.as_str().unwrap_or_default(),
    ])
}

/// The id of a look: one per second of a step.
pub fn analysis_event_id(run_id: &str, a: &RolloutAnalysis) -> String {
    crate::ids::derived(&[
        run_id,
        "rollout.analysed",
        &a.stage,
        &a.attempt.to_string(),
        &a.step.to_string(),
        &a.elapsed_secs.to_string(),
    ])
}

// ---- what the log says -----------------------------------------------------------------

/// A rollout as the run's log tells it: the current weight and step, the looks, the controls.
#[derive(Debug, Clone, PartialEq, Serialize, Default, JsonSchema)]
pub struct RolloutView {
    pub stage: String,
    pub environment: String,
    pub attempt: u32,
    /// The candidate's current share, in percent.
    pub weight: f64,
    /// The step in progress (0-based) and when it began.
    pub step: u32,
    pub step_started_at: Option<DateTime<Utc>>,
    pub weights: Vec<WeightSet>,
    pub looks: Vec<RolloutAnalysis>,
    pub controls: Vec<RolloutControl>,
    pub paused: bool,
}

impl RolloutView {
    fn new(stage: &str, environment: &str, attempt: u32) -> Self {
        Self {
            stage: stage.to_string(),
            environment: environment.to_string(),
            attempt,
            ..Self::default()
        }
    }

    /// Folds a weight change.
    pub fn weight_set(&mut self, w: &WeightSet) {
        self.weight = w.weight;
        if w.cause == WeightCause::Step {
            self.step = w.step;
            self.step_started_at = Some(w.at);
        }
        self.weights.push(w.clone());
    }

    /// Folds a control whose signature the caller checked (or does not need to).
    pub fn control(&mut self, c: &RolloutControl) {
        match c.action {
            ControlAction::Pause => self.paused = true,
            ControlAction::Resume => self.paused = false,
            ControlAction::Promote | ControlAction::Abort => {}
        }
        self.controls.push(c.clone());
    }

    /// The person's decision to end the rollout, if one was made.
    pub fn decided(&self) -> Option<&RolloutControl> {
        self.controls
            .iter()
            .find(|c| matches!(c.action, ControlAction::Promote | ControlAction::Abort))
    }
}

/// Seconds of `[from, now]` during which the rollout was paused, by the controls given in log
/// order (a pause without a resume lasts until `now`).
pub fn paused_secs<'a>(
    controls: impl IntoIterator<Item = &'a RolloutControl>,
    from: DateTime<Utc>,
    now: DateTime<Utc>,
) -> i64 {
    let (mut total, mut since) = (0, None::<DateTime<Utc>>);
    for c in controls {
        match c.action {
            ControlAction::Pause if since.is_none() => since = Some(c.at.max(from)),
            ControlAction::Resume => {
                if let Some(s) = since.take() {
                    total += (c.at.max(from) - s).num_seconds().max(0);
                }
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        total += (now - s).num_seconds().max(0);
    }
    total
}

/// The view of a rollout stage's attempt, begun afresh by a newer attempt; `None` for an event
/// of an older attempt than the one in view (it changes nothing).
pub fn view_mut<'a>(
    views: &'a mut Vec<RolloutView>,
    stage: &str,
    attempt: u32,
) -> Option<&'a mut RolloutView> {
    let environment = crate::stage::StageKey::parse(stage)
        .ok()
        .and_then(|k| k.environment().map(str::to_string))
        .unwrap_or_default();
    if let Some(i) = views.iter().position(|v| v.stage == stage) {
        if views[i].attempt > attempt {
            return None;
        }
        if views[i].attempt < attempt {
            views[i] = RolloutView::new(stage, &environment, attempt);
        }
        return Some(&mut views[i]);
    }
    views.push(RolloutView::new(stage, &environment, attempt));
    views.last_mut()
}

// ---- judging one look ------------------------------------------------------------------

/// One variant's counters and histograms over a window (the difference of two scrapes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub counters: BTreeMap<String, f64>,
    /// Histogram name to cumulative buckets `(le, count)`, ascending.
    pub histograms: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Window {
    fn counter(&self, name: &str) -> Option<f64> {
        self.counters.get(name).copied()
    }
}

/// What one look decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Look {
    pub analysis: RolloutAnalysis,
    pub decision: StepDecision,
    /// For an A/B experiment: the winner, once decided.
    pub winner: Option<AbWinner>,
    /// The always-valid p-value after this look (fed to the next look).
    pub ab_p: f64,
}

fn count(w: &Window, numerator: &str, denominator: &str) -> Count {
    Count::new(
        w.counter(numerator).unwrap_or(0.0),
        w.counter(denominator).unwrap_or(0.0),
    )
}

/// Compares one metric of the two windows.
pub fn compare(m: &AnalysisMetric, stable: &Window, candidate: &Window, alpha: f64) -> Comparison {
    let no_data = |samples: [f64; 2], test: &str, tolerance: f64| Comparison {
        metric: m.name.clone(),
        stable: 0.0,
        candidate: 0.0,
        worse_by: 0.0,
        tolerance,
        test: test.into(),
        p_value: None,
        verdict: "no_data".into(),
        samples,
    };
    match m.kind {
        MetricKind::Ratio => {
            let (num, den) = (
                m.numerator.as_deref().unwrap_or_default(),
                m.denominator.as_deref().unwrap_or_default(),
            );
            let (s, c) = (count(stable, num, den), count(candidate, num, den));
            let tolerance = m.tolerance.unwrap_or(0.0);
            let Some(p) = judge::proportions(s, c, m.worse(), tolerance) else {
                return no_data([s.total, c.total], "proportions", tolerance);
            };
            let v = judge::verdict(p.worse_by > tolerance, p.p_value, alpha);
            Comparison {
                metric: m.name.clone(),
                stable: p.stable,
                candidate: p.candidate,
                worse_by: p.worse_by,
                tolerance,
                test: "proportions".into(),
                p_value: Some(p.p_value),
                verdict: verdict_name(v).into(),
                samples: [s.total, c.total],
            }
        }
        MetricKind::Latency => {
            let h = m.histogram.as_deref().unwrap_or_default();
            let q = m.quantile.unwrap_or(0.95);
            let tolerance = m.max_increase_pct.unwrap_or(0.0) / 100.0;
            let (sb, cb) = (
                stable.histograms.get(h).cloned().unwrap_or_default(),
                candidate.histograms.get(h).cloned().unwrap_or_default(),
            );
            let total = |b: &[(f64, f64)]| b.last().map_or(0.0, |x| x.1);
            let samples = [total(&sb), total(&cb)];
            let Some(l) = judge::latency(&sb, &cb, q) else {
                return no_data(samples, "mann_whitney", tolerance);
            };
            let v = judge::verdict(l.increase > tolerance, l.p_value, alpha);
            Comparison {
                metric: m.name.clone(),
                stable: l.stable,
                candidate: l.candidate,
                worse_by: if l.increase.is_finite() {
                    l.increase
                } else {
                    f64::MAX
                },
                tolerance,
                test: "mann_whitney".into(),
                p_value: Some(l.p_value),
                verdict: verdict_name(v).into(),
                samples,
            }
        }
    }
}

fn verdict_name(v: judge::Verdict) -> &'static str {
    match v {
        judge::Verdict::Pass => "pass",
        judge::Verdict::Fail => "fail",
        judge::Verdict::NoData => "no_data",
    }
}

fn verdict_of(c: &Comparison) -> judge::Verdict {
    match c.verdict.as_str() {
        "pass" => judge::Verdict::Pass,
        "fail" => judge::Verdict::Fail,
        _ => judge::Verdict::NoData,
    }
}

/// Where a step stands when it is looked at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepAt {
    pub step: u32,
    pub weight: f64,
    pub elapsed_secs: u64,
    pub duration_secs: u64,
    pub max_hold_secs: u64,
    /// The A/B test's always-valid p-value before this look (1 at the first).
    pub ab_p: f64,
}

/// One look at a step: every metric compared, then the step's decision (canary: its score;
/// A/B: the sequential test, with the other metrics as guardrails).
pub fn look(
    spec: &RolloutSpec,
    at: StepAt,
    stable: &Window,
    candidate: &Window,
    now: DateTime<Utc>,
) -> Look {
    let requests = [
        stable.counter(&spec.requests).unwrap_or(0.0),
        candidate.counter(&spec.requests).unwrap_or(0.0),
    ];
    let comparisons: Vec<Comparison> = spec
        .analysis
        .iter()
        .map(|m| compare(m, stable, candidate, spec.significance))
        .collect();
    let verdicts: Vec<judge::Verdict> = comparisons.iter().map(verdict_of).collect();
    let score = judge::score(&verdicts);
    let elapsed = at.elapsed_secs >= at.duration_secs;
    let mut ab_p = at.ab_p;
    let mut winner = None;
    let mut ab_figures = None;
    let decision = match (spec.strategy, &spec.ab) {
        (Strategy::Ab, Some(ab)) => {
            let m = spec
                .analysis
                .iter()
                .find(|m| m.name == ab.metric)
                .expect("validated: the A/B metric is in analysis");
            let (num, den) = (
                m.numerator.as_deref().unwrap_or_default(),
                m.denominator.as_deref().unwrap_or_default(),
            );
            let guard: Vec<judge::Verdict> = comparisons
                .iter()
                .filter(|c| c.metric != ab.metric)
                .map(verdict_of)
                .collect();
            let enough =
                requests[0] >= spec.min_requests as f64 && requests[1] >= spec.min_requests as f64;
            let l = if enough {
                judge::ab_look(
                    count(stable, num, den),
                    count(candidate, num, den),
                    m.worse(),
                    judge::mixing_tau(ab.min_effect),
                    ab.significance,
                    at.ab_p,
                )
            } else {
                None
            };
            if let Some(AbLook {
                effect,
                interval,
                p_value,
                decided,
            }) = l
            {
                ab_p = p_value;
                winner = decided;
                ab_figures = Some(AbFigures {
                    metric: ab.metric.clone(),
                    effect,
                    interval,
                    p_value,
                    winner: decided.map(|w| {
                        match w {
                            AbWinner::Stable => "stable",
                            AbWinner::Candidate => "candidate",
                        }
                        .to_string()
                    }),
                });
            }
            if enough && guard.contains(&judge::Verdict::Fail) {
                StepDecision::Abort("a guardrail metric failed".into())
            } else {
                match (winner, elapsed) {
                    (Some(AbWinner::Candidate), _) => StepDecision::Promote,
                    (Some(AbWinner::Stable), _) => {
                        StepDecision::Abort("the version in service is better".into())
                    }
                    (None, true) => StepDecision::Abort(format!(
                        "no difference found within {}s: the version in service is kept",
                        at.duration_secs
                    )),
                    (None, false) if !enough => StepDecision::Hold(format!(
                        "{} requests to the stable and {} to the candidate; {} each are needed",
                        requests[0], requests[1], spec.min_requests
                    )),
                    (None, false) => StepDecision::Hold("no decision yet".into()),
                }
            }
        }
        _ => {
            let d = judge::decide_step(
                &verdicts,
                (requests[0], requests[1]),
                spec.min_requests as f64,
                elapsed,
                spec.scoring(),
            );
            match d {
                StepDecision::Hold(why)
                    if at.elapsed_secs >= at.duration_secs + at.max_hold_secs =>
                {
                    StepDecision::Abort(format!(
                        "held {}s past the step's {}s without a decision: {why}",
                        at.elapsed_secs - at.duration_secs,
                        at.duration_secs
                    ))
                }
                d => d,
            }
        }
    };
    let (name, reason) = match &decision {
        StepDecision::Promote => ("promote", promote_reason(spec, score, &ab_figures)),
        StepDecision::Hold(r) => ("hold", r.clone()),
        StepDecision::Abort(r) => ("abort", abort_reason(r, &comparisons)),
    };
    Look {
        analysis: RolloutAnalysis {
            stage: String::new(),
            attempt: 0,
            step: at.step,
            weight: at.weight,
            elapsed_secs: at.elapsed_secs,
            requests,
            comparisons,
            score,
            ab: ab_figures,
            shadow: None,
            decision: name.into(),
            reason,
            at: now,
        },
        decision,
        winner,
        ab_p,
    }
}

/// One look at a shadow rollout: its guardrail metrics compared, then its bounds on the
/// figures so far. Below `min_pairs` it holds; a bound whose whole interval is below it aborts
/// at once; once the time is up it promotes when every figure meets its bound.
pub fn look_shadow(
    spec: &RolloutSpec,
    at: StepAt,
    stable: &Window,
    candidate: &Window,
    figures: &ShadowFigures,
    now: DateTime<Utc>,
) -> Look {
    let sh = spec
        .shadow
        .as_ref()
        .expect("validated: a shadow rollout has [shadow]");
    let requests = [
        stable.counter(&spec.requests).unwrap_or(0.0),
        candidate.counter(&spec.requests).unwrap_or(0.0),
    ];
    let comparisons: Vec<Comparison> = spec
        .analysis
        .iter()
        .map(|m| compare(m, stable, candidate, spec.significance))
        .collect();
    let elapsed = at.elapsed_secs >= at.duration_secs;
    let bounds = [
        (
            "agreement",
            sh.min_agreement,
            figures.agreement,
            figures.agreement_interval,
        ),
        (
            "similarity",
            sh.min_similarity,
            figures.similarity,
            figures.similarity_interval,
        ),
    ];
    let mut below_for_sure = Vec::new();
    let mut below = Vec::new();
    for (name, bound, value, interval) in bounds {
        let Some(bound) = bound else { continue };
        match (value, interval) {
            (Some(v), Some(iv)) => {
                if iv[1] < bound {
                    below_for_sure.push(format!(
                        "{name} {v:.3} [{:.3}, {:.3}] is below {bound}",
                        iv[0], iv[1]
                    ));
                } else if v < bound {
                    below.push(format!("{name} {v:.3} is below {bound}"));
                }
            }
            _ => below.push(format!("{name}: not measured yet")),
        }
    }
    let decision = if comparisons.iter().any(|c| c.verdict == "fail")
        && requests[1] >= spec.min_requests as f64
    {
        StepDecision::Abort("a guardrail metric failed".into())
    } else if figures.pairs < sh.min_pairs {
        let why = format!(
            "{} mirrored pairs; {} are needed before the candidate is judged",
            figures.pairs, sh.min_pairs
        );
        if at.elapsed_secs >= at.duration_secs + at.max_hold_secs {
            StepDecision::Abort(format!("held past the shadow's time: {why}"))
        } else {
            StepDecision::Hold(why)
        }
    } else if !below_for_sure.is_empty() {
        StepDecision::Abort(below_for_sure.join("; "))
    } else if !elapsed {
        StepDecision::Hold("the candidate is still shadowed".into())
    } else if below.is_empty() {
        StepDecision::Promote
    } else {
        StepDecision::Abort(below.join("; "))
    };
    let (name, reason) = match &decision {
        StepDecision::Promote => (
            "promote",
            format!(
                "{} mirrored pairs: agreement {}, similarity {}",
                figures.pairs,
                figures.agreement.map_or("-".into(), |a| format!("{a:.3}")),
                figures.similarity.map_or("-".into(), |a| format!("{a:.3}"))
            ),
        ),
        StepDecision::Hold(r) => ("hold", r.clone()),
        StepDecision::Abort(r) => ("abort", abort_reason(r, &comparisons)),
    };
    let verdicts: Vec<judge::Verdict> = comparisons.iter().map(verdict_of).collect();
    Look {
        analysis: RolloutAnalysis {
            stage: String::new(),
            attempt: 0,
            step: at.step,
            weight: at.weight,
            elapsed_secs: at.elapsed_secs,
            requests,
            score: judge::score(&verdicts),
            comparisons,
            ab: None,
            shadow: Some(figures.clone()),
            decision: name.into(),
            reason,
            at: now,
        },
        decision,
        winner: None,
        ab_p: at.ab_p,
    }
}

fn promote_reason(spec: &RolloutSpec, score: Option<f64>, ab: &Option<AbFigures>) -> String {
    match ab {
        Some(f) => format!(
            "the candidate is better on {}: {:+.4} [{:+.4}, {:+.4}], p = {:.4}",
            f.metric, f.effect, f.interval[0], f.interval[1], f.p_value
        ),
        None => format!(
            "score {:.0} (pass {:.0})",
            score.unwrap_or(100.0),
            spec.pass_score
        ),
    }
}

fn abort_reason(why: &str, comparisons: &[Comparison]) -> String {
    let failed: Vec<String> = comparisons
        .iter()
        .filter(|c| c.verdict == "fail")
        .map(|c| {
            format!(
                "{}: candidate {:.4} vs stable {:.4} (worse by {:.4}, tolerance {:.4}, p = {:.4})",
                c.metric,
                c.candidate,
                c.stable,
                c.worse_by,
                c.tolerance,
                c.p_value.unwrap_or(1.0)
            )
        })
        .collect();
    if failed.is_empty() {
        why.to_string()
    } else {
        format!("{why}; {}", failed.join("; "))
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
