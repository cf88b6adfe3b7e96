//! The model evaluator: `evaluate.requested` in, a gate report out.
//!
//! It runs the model under test (by default the gated environment's OpenAI-compatible
//! endpoint) over the spec's JSONL datasets, scores every item ([`metrics`]), and checks each
//! dataset's thresholds: absolute bounds, and the largest allowed regression against the
//! baseline, the version live in production, whose per-item results it reads back from the log.
//! A regression beyond its bound fails only when a paired test says it is real (McNemar on
//! per-item correctness, a paired bootstrap interval for means); otherwise it is a warning, so
//! a human looks. Sample outputs (the worst items and a seeded random sample) are stored with
//! the run for review.

pub mod dataset;
pub mod metrics;
pub mod model;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slipway_core::bus::{Bus, BusError};
use slipway_core::config::Config;
use slipway_core::exec::ExecSettings;
use slipway_core::exec::workspace::Workspace;
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_core::store::{baseline, objects};
use slipway_domain::envelope::Event;
use slipway_domain::events::{
    Calibration, Check, DatasetNoise, EvaluateRequested, EventData, GateReport, ItemAgreement,
    MetricNoise, UNSTABLE_ITEMS_LISTED, Verdict,
};
use slipway_domain::ids;
use slipway_domain::power;
use slipway_domain::spec::{ModelEndpoint, Threshold, check_relative_path};
use slipway_domain::stats::{self, Rng};
use slipway_domain::thresholds;
use tracing::{info, warn};

use crate::dataset::Item;
use crate::metrics::ItemResult;
use crate::model::Model;

/// Runs the evaluator until `shutdown`.
///
/// # Errors
/// [`BusError`] when NATS cannot be reached or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BusError> {
    let bus = Bus::connect(&config.nats, "slipway-model-evaluator").await?;
    let worker = Arc::new(Evaluator {
        exec: config.exec.clone(),
        logs_bucket: config.nats.stream.logs_bucket.clone(),
    });
    run_worker(bus, worker, config.worker, &config.health, shutdown).await
}

#[derive(Debug)]
pub struct Evaluator {
    pub exec: ExecSettings,
    pub logs_bucket: String,
}

/// What the evaluator stores with the run: every item's result, and the samples for review.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Details {
    pub datasets: BTreeMap<String, Vec<ItemResult>>,
    pub samples: Vec<Sample>,
    /// `sha256:` of each dataset's file: a baseline is only comparable on the same items.
    #[serde(default)]
    pub dataset_digests: BTreeMap<String, String>,
    /// How hallucination was measured: `lexical` or `judge:<model>`.
    #[serde(default)]
    pub hallucination_measure: String,
}

/// One output shown to reviewers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub dataset: String,
    pub id: String,
    pub input: String,
    pub expected: Option<String>,
    pub got: String,
    pub verdict: String,
    /// Why it was picked: `worst` or `random`.
    pub picked: String,
}

impl Worker for Evaluator {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::ModelEvaluator
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        let EventData::EvaluateRequested(req) = &job.request.data else {
            return Err(Transient::not_a(&job.request, "an evaluation request"));
        };
        self.evaluate(job, req).await
    }
}

fn failed(req: &EvaluateRequested, reason: String, started: Instant) -> EventData {
    EventData::EvaluateFailed(GateReport {
        stage: req.stage.clone(),
        attempt: req.attempt,
        verdict: Verdict::Fail,
        metrics: BTreeMap::new(),
        checks: Vec::new(),
        baseline_run: None,
        details: None,
        reason: Some(reason),
        duration_ms: ms(started),
    })
}

/// One answer scored against its item.
fn item_result(item: &Item, answer: Result<model::Answer, String>) -> ItemResult {
    match answer {
        Ok(a) => ItemResult {
            latency_ms: a.latency_ms,
            tokens_in: a.tokens_in,
            tokens_out: a.tokens_out,
            ..metrics::score(item, &a.output)
        },
        // A request that failed answered nothing right: it counts against the model in every
        // metric the item carries.
        Err(e) => ItemResult {
            id: item.id.clone(),
            error: Some(e),
            exact: item.expected.as_ref().map(|_| false),
            label_ok: item.label.as_ref().map(|_| false),
            f1: item.expected.as_ref().map(|_| 0.0),
            format_ok: item.schema.as_ref().map(|_| false),
            ..Default::default()
        },
    }
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn verdict_word(r: &ItemResult) -> String {
    if let Some(e) = &r.error {
        return format!("error: {e}");
    }
    let mut parts = Vec::new();
    match r.correct() {
        Some(true) => parts.push("correct"),
        Some(false) => parts.push("incorrect"),
        None => {}
    }
    if r.hallucinated == Some(true) {
        parts.push("hallucinated");
    }
    if r.format_ok == Some(false) {
        parts.push("bad format");
    }
    if r.refusal {
        parts.push("refused");
    }
    if parts.is_empty() {
        "scored".into()
    } else {
        parts.join(", ")
    }
}

/// The worst items, then a seeded random sample of the rest, `n` in all.
pub fn pick_samples(
    details: &Details,
    items: &BTreeMap<String, Vec<Item>>,
    n: usize,
    seed: &str,
) -> Vec<Sample> {
    let mut all: Vec<(&String, &ItemResult)> = details
        .datasets
        .iter()
        .flat_map(|(d, rs)| rs.iter().map(move |r| (d, r)))
        .collect();
    let sample = |d: &String, r: &ItemResult, picked: &str| {
        let item = items.get(d).and_then(|is| is.iter().find(|i| i.id == r.id));
        Sample {
            dataset: d.clone(),
            id: r.id.clone(),
            input: item.map(Item::input_text).unwrap_or_default(),
            expected: item.and_then(|i| i.expected.clone().or_else(|| i.label.clone())),
            got: r.output.clone(),
            verdict: verdict_word(r),
            picked: picked.into(),
        }
    };
    all.sort_by(|a, b| b.1.badness().total_cmp(&a.1.badness()));
    let worst_n = (n / 2).min(all.len());
    let mut out: Vec<Sample> = all[..worst_n]
        .iter()
        .filter(|(_, r)| r.badness() > 0.0)
        .map(|(d, r)| sample(d, r, "worst"))
        .collect();
    let mut rest: Vec<&(&String, &ItemResult)> = all
        .iter()
        .filter(|(d, r)| !out.iter().any(|s| &s.dataset == *d && s.id == r.id))
        .collect();
    let mut rng = Rng::from_text(seed);
    while out.len() < n && !rest.is_empty() {
        let (d, r) = rest.swap_remove(rng.below(rest.len()));
        out.push(sample(d, r, "random"));
    }
    out
}

/// The noise the repeats measured, dataset by dataset; `None` when every item was asked once.
pub fn calibration(req: &EvaluateRequested, details: &Details) -> Option<Calibration> {
    if req.spec.repeats < 2 {
        return None;
    }
    // One budget of listed items for the whole event, so it stays small whatever the number
    // of datasets: the rest are counted, and every item's votes are in the details.
    let mut budget = UNSTABLE_ITEMS_LISTED;
    let datasets = details
        .datasets
        .iter()
        .map(|(name, results)| {
            let mut d = dataset_noise(name, results);
            let keep = d.unstable_items.len().min(budget);
            budget -= keep;
            d.unstable_not_listed += (d.unstable_items.len() - keep) as u64;
            d.unstable_items.truncate(keep);
            d
        })
        .collect();
    Some(Calibration {
        stage: req.stage.clone(),
        attempt: req.attempt,
        repeats: req.spec.repeats,
        datasets,
    })
}

/// One dataset's agreement across repeats: per yes/no metric, and the items that changed.
pub fn dataset_noise(name: &str, results: &[ItemResult]) -> DatasetNoise {
    let mut metrics = BTreeMap::new();
    for m in metrics::YES_NO_METRICS {
        let votes: Vec<&Vec<bool>> = results
            .iter()
            .filter_map(|r| r.votes.get(*m))
            .filter(|v| v.len() >= 2)
            .collect();
        if votes.is_empty() {
            continue;
        }
        let n = votes.len() as f64;
        let (mut unstable, mut agreement, mut flips, mut majority_flips) = (0, 0.0, 0.0, 0.0);
        for v in &votes {
            let k = v.len() as u32;
            let yes = v.iter().filter(|x| **x).count() as u32;
            if yes != 0 && yes != k {
                unstable += 1;
            }
            agreement += f64::from(yes.max(k - yes)) / f64::from(k);
            flips += power::flip_estimate(yes, k);
            majority_flips += power::majority_flip(f64::from(yes) / f64::from(k), k, k);
        }
        metrics.insert(
            (*m).to_string(),
            MetricNoise {
                items: votes.len() as u64,
                unstable,
                agreement: agreement / n,
                flip_rate: flips / n,
                majority_flip_rate: majority_flips / n,
            },
        );
    }
    let changed: Vec<ItemAgreement> = results
        .iter()
        .filter_map(|r| {
            let mut flipped = Vec::new();
            let mut lowest: f64 = 1.0;
            for (m, v) in &r.votes {
                let yes = v.iter().filter(|x| **x).count();
                if yes != 0 && yes != v.len() {
                    flipped.push(m.clone());
                    lowest = lowest.min(yes.max(v.len() - yes) as f64 / v.len() as f64);
                }
            }
            (!flipped.is_empty()).then(|| ItemAgreement {
                // An id is the dataset's: a long one is cut, so the event stays small.
                id: r.id.chars().take(ITEM_ID_CHARS).collect(),
                metrics: flipped,
                agreement: lowest,
            })
        })
        .collect();
    let unstable = changed.len() as u64;
    let listed: Vec<ItemAgreement> = changed.into_iter().take(UNSTABLE_ITEMS_LISTED).collect();
    DatasetNoise {
        dataset: name.to_string(),
        items: results.len() as u64,
        unstable,
        metrics,
        unstable_not_listed: unstable - listed.len() as u64,
        unstable_items: listed,
    }
}

/// The longest item id an event lists.
const ITEM_ID_CHARS: usize = 128;

/// Random negations of a sign-flip test: p-values to about 0.0003, plenty for Holm's
/// adjustment over a gate's checks.
pub const SIGN_FLIPS: u32 = 4000;

/// Fewer paired items than this give no bootstrap interval.
pub const MIN_BOOTSTRAP_PAIRS: usize = 10;

/// Checks one dataset metric: absolute bounds fail outright; a regression beyond its bound
/// fails only when the paired test finds it significant, and warns otherwise.
#[allow(clippy::too_many_arguments)]
pub fn check_metric(
    dataset: &str,
    metric: &str,
    value: Option<f64>,
    baseline_value: Option<f64>,
    t: &Threshold,
    candidate: &[ItemResult],
    baseline_items: Option<&Vec<ItemResult>>,
    alpha: f64,
    rng: &mut Rng,
) -> Check {
    let Some(value) = value else {
        return Check {
            metric: metric.into(),
            scope: Some(dataset.into()),
            candidate: 0.0,
            baseline: baseline_value,
            delta: None,
            p_value: None,
            interval: None,
            verdict: Verdict::Fail,
            note: match candidate.iter().find_map(|r| r.similarity_error.as_deref()) {
                Some(e) if metric == "semantic_similarity" => {
                    format!(
                        "{dataset}: {metric} cannot be measured: the embeddings endpoint failed: {e}"
                    )
                }
                _ => {
                    format!("{dataset}: {metric} cannot be measured: no item carries what it needs")
                }
            },
            bounds: Some(slipway_domain::events::Bounds {
                min: t.min,
                max: t.max,
                max_regression: t.max_regression,
                max_regression_pct: t.max_regression_pct,
                ..Default::default()
            }),
            detectable: None,
        };
    };
    let absolute = Threshold {
        max_regression: None,
        max_regression_pct: None,
        ..t.clone()
    };
    let abs = thresholds::check(metric, Some(dataset), value, None, &absolute);
    let mut full = thresholds::check(metric, Some(dataset), value, baseline_value, t);
    // The paired evidence, on the items both versions answered.
    let mut evidence = "no per-item baseline".to_string();
    if let (Some(base), Some(_)) = (baseline_items, baseline_value) {
        let by_id: BTreeMap<&str, &ItemResult> = base.iter().map(|r| (r.id.as_str(), r)).collect();
        let pairs: Vec<(&ItemResult, &ItemResult)> = candidate
            .iter()
            .filter_map(|c| by_id.get(c.id.as_str()).map(|b| (c, *b)))
            .collect();
        let level = format!("{:.0}%", (1.0 - alpha) * 100.0);
        // Paired on the first `k` answers of each version, `k` the fewer repeats of the two:
        // both sides then vary alike when nothing changed.
        let k_c = candidate.iter().map(ItemResult::repeats).max().unwrap_or(1);
        let k_b = base.iter().map(ItemResult::repeats).max().unwrap_or(1);
        let k = k_c.min(k_b);
        if matches!(metric, "f1" | "semantic_similarity") {
            let per_item = |r: &ItemResult| match metric {
                "f1" => r.f1_of(k),
                _ => r.similarity,
            };
            let (cv, bv): (Vec<f64>, Vec<f64>) = pairs
                .iter()
                .filter_map(|(c, b)| Some((per_item(c)?, per_item(b)?)))
                .unzip();
            // Too few pairs make a bootstrap interval meaningless: no evidence then.
            if cv.len() >= MIN_BOOTSTRAP_PAIRS {
                let d: Vec<f64> = cv.iter().zip(&bv).map(|(c, b)| c - b).collect();
                let p = stats::sign_flip(&d, SIGN_FLIPS, rng);
                full.interval = stats::paired_bootstrap_mean(&cv, &bv, 2000, 1.0 - alpha, rng);
                full.p_value = Some(p);
                full.detectable = Some(power::mean_mde(&d, alpha, 0.8));
                evidence = match full.interval {
                    Some([lo, hi]) => format!(
                        "paired bootstrap {level} interval of the difference [{lo:.4}, {hi:.4}], sign-flip p={p:.4}"
                    ),
                    None => format!("sign-flip p={p:.4}"),
                };
            } else {
                full.p_value = Some(1.0);
                evidence = format!("{} paired items: too few for a test", cv.len());
            }
        } else {
            // Yes/no per item: each item's share of its first `k` answers.
            let paired: Vec<(&ItemResult, f64, f64)> = pairs
                .iter()
                .filter_map(|(c, b)| Some((*c, c.share(metric, k)?, b.share(metric, k)?)))
                .collect();
            let shares: Vec<(f64, f64)> = paired.iter().map(|(_, c, b)| (*c, *b)).collect();
            let n = shares.len() as u64;
            // The noise the candidate's repeats measured on the paired items: the variance one
            // item's difference has when nothing changed, 2p(1 - p) / k.
            let measured: Vec<f64> = paired
                .iter()
                .filter_map(|(c, _, _)| c.votes.get(metric).filter(|v| v.len() >= 2))
                .map(|v| {
                    let yes = v.iter().filter(|x| **x).count() as u32;
                    power::flip_estimate(yes, v.len() as u32) / k as f64
                })
                .collect();
            let noise = stats::mean(&measured);
            let higher_better = thresholds::higher_is_better(metric);
            if n > 0 && k == 1 {
                // McNemar on the pairs where the versions disagree, `b` where the candidate is
                // worse.
                let (mut b, mut c) = (0, 0);
                for (x, y) in &shares {
                    if x != y {
                        if (x < y) == higher_better {
                            b += 1;
                        } else {
                            c += 1;
                        }
                    }
                }
                let p = stats::mcnemar(b, c).p_value;
                // How far the difference may be from what was seen, and what this dataset could
                // have seen at all: the interval of the paired difference (in the metric's
                // unit, candidate minus baseline) and the regression found with 80% power.
                let (_, [lo, hi]) = power::paired_difference_interval(b, c, n, alpha);
                let [lo, hi] = if higher_better { [-hi, -lo] } else { [lo, hi] };
                full.p_value = Some(p);
                full.interval = Some([lo, hi]);
                full.detectable = Some(power::mcnemar_mde_with_noise(
                    n,
                    (b + c) as f64 / n as f64,
                    noise.unwrap_or(0.0),
                    alpha,
                    0.8,
                ));
                evidence = format!(
                    "McNemar p={p:.4}, {level} interval of the difference [{lo:+.4}, {hi:+.4}]"
                );
            } else if n > 0 {
                // Each item's share of its `k` answers: a paired sign-flip test on the
                // differences of the shares, whose noise the repeats have divided by `k`.
                let d: Vec<f64> = shares.iter().map(|(c, b)| c - b).collect();
                let p = stats::sign_flip(&d, SIGN_FLIPS, rng);
                let mean = d.iter().sum::<f64>() / n as f64;
                let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
                let half = power::normal_quantile(1.0 - alpha / 2.0) * (var / n as f64).sqrt();
                let [lo, hi] = [mean - half, mean + half];
                full.p_value = Some(p);
                // One item gives no spread to speak of.
                full.interval = (n >= 2).then_some([lo, hi]);
                full.detectable = Some(power::mcnemar_mde_with_noise(
                    n,
                    d.iter().map(|x| x * x).sum::<f64>() / n as f64,
                    noise.unwrap_or(0.0),
                    alpha,
                    0.8,
                ));
                evidence = format!(
                    "sign-flip p={p:.4} on each item's share of {k} answers, {level} interval of the difference [{lo:+.4}, {hi:+.4}]"
                );
            }
            if n == 0 {
                // Nothing paired: no evidence either way, so a regression beyond the bound
                // warns (and the check stays in the family).
                full.p_value = Some(1.0);
                evidence = "0 paired items".into();
            }
            if let Some(noise) = noise {
                evidence.push_str(&format!(
                    "; measured noise: two single answers disagree on {:.1}% of items",
                    100.0 * noise * k as f64
                ));
            }
            // The bound in the metric's unit: the absolute one, or the relative one of the
            // baseline.
            let bound = t.max_regression.or(t
                .max_regression_pct
                .zip(baseline_value)
                .map(|(pct, base)| pct / 100.0 * base.abs()));
            if let (Some(bound), Some(mde)) = (bound, full.detectable)
                && bound < mde
            {
                let each = if k > 1 {
                    format!(", {k} answers each")
                } else {
                    String::new()
                };
                full.note.push_str(&format!(
                    " [this dataset cannot detect a regression of {bound:.3}; it can detect {mde:.3} ({n} items{each})]"
                ));
            }
        }
    }
    let significant = match (full.p_value, full.interval) {
        // Judged again across the gate's checks (`control_family_error`).
        (Some(p), _) => p < alpha,
        (None, Some([lo, hi])) => lo > 0.0 || hi < 0.0,
        // Without per-item evidence the bound decides alone.
        (None, None) => true,
    };
    let base_note = match (baseline_value, full.delta) {
        (Some(b), Some(d)) => format!("; baseline {b:.4}, delta {d:+.4}, {evidence}"),
        _ => "; no baseline: absolute thresholds only".into(),
    };
    if abs.verdict == Verdict::Fail || full.verdict == Verdict::Pass || abs.verdict == Verdict::Warn
    {
        // Absolute bounds decide, or nothing is wrong.
        full.verdict = if abs.verdict != Verdict::Pass {
            abs.verdict
        } else {
            full.verdict
        };
    } else if !significant {
        full.verdict = Verdict::Warn;
        full.note.push_str(" (but not statistically significant)");
    }
    full.note = format!("{dataset}: {}{base_note}", full.note);
    full
}

/// Holm's step-down across the gate's paired tests (every check with a paired p-value, over
/// metrics and datasets), so adding metrics does not raise the rate at which noise blocks: a
/// regression that failed on its own p-value but not on its adjusted one only warns. Absolute
/// bounds are not tests and are left as they are.
fn control_family_error(checks: &mut [Check], alpha: f64) {
    let tested: Vec<usize> = (0..checks.len())
        .filter(|&i| checks[i].p_value.is_some())
        .collect();
    if tested.len() < 2 {
        return;
    }
    let p: Vec<f64> = tested
        .iter()
        .map(|&i| checks[i].p_value.unwrap_or(1.0))
        .collect();
    let adjusted = power::holm(&p);
    let m = tested.len();
    for (&i, q) in tested.iter().zip(adjusted) {
        let c = &mut checks[i];
        let within_absolute = c.bounds.as_ref().is_none_or(|b| {
            b.min.is_none_or(|min| c.candidate >= min) && b.max.is_none_or(|max| c.candidate <= max)
        });
        c.note
            .push_str(&format!(" (Holm-adjusted over {m} tests: p={q:.4})"));
        if c.verdict == Verdict::Fail && within_absolute && q >= alpha {
            c.verdict = Verdict::Warn;
            c.note
                .push_str(" (not significant once adjusted for the gate's other tests)");
        }
    }
}

/// Why an evaluation stopped short: the gate fails with a reason, or the request is retried.
enum Stop {
    Fail(String),
    Retry(Transient),
}

impl From<Transient> for Stop {
    fn from(t: Transient) -> Self {
        Stop::Retry(t)
    }
}

impl From<BusError> for Stop {
    fn from(e: BusError) -> Self {
        Stop::Retry(e.into())
    }
}

/// Every dataset's items and per-item results, and the metrics they sum up to.
struct Scored {
    items: BTreeMap<String, Vec<Item>>,
    details: Details,
    metrics: BTreeMap<String, f64>,
    n_items: u64,
}

impl Evaluator {
    async fn evaluate(&self, job: &Job, req: &EvaluateRequested) -> Result<EventData, Transient> {
        let started = Instant::now();
        match self.evaluated(job, req, started).await {
            Ok(data) => Ok(data),
            Err(Stop::Fail(reason)) => Ok(failed(req, reason, started)),
            Err(Stop::Retry(t)) => Err(t),
        }
    }

    async fn evaluated(
        &self,
        job: &Job,
        req: &EvaluateRequested,
        started: Instant,
    ) -> Result<EventData, Stop> {
        let spec = &req.spec;
        let ws = Workspace::create(&self.exec, &format!("{}-evaluate", job.run_id))
            .map_err(|e| Transient(e.to_string()))?;
        let scope = job.scope();
        let checkout = scope.span("checkout");
        if let Err(e) = ws.checkout(&req.source, &self.exec, &job.cancel).await {
            checkout.fail("checkout_failed", e.to_string());
            return Err(Stop::Fail(format!("checkout failed: {e}")));
        }
        drop(checkout);
        let model = self.model(req, &ws)?;
        let Scored {
            items,
            mut details,
            metrics,
            n_items,
        } = self.score(job, req, &ws, &model).await?;

        // The baseline: the production version's own evaluation, with its per-item results.
        let base = baseline::gate_baseline(&job.deploys, &job.run, &req.stage).await?;
        let base_details: Option<Details> = baseline::details(
            &job.objects,
            base.as_ref().map(|(_, g)| g),
            &ws.out().join("baseline.json"),
        )
        .await;
        // The measured noise goes on the log before the report that relies on it.
        if let Some(c) = calibration(req, &details) {
            let mut event = Event::new(
                ids::derived(&[
                    &job.run_id,
                    "evaluate.calibrated",
                    &req.stage,
                    &req.attempt.to_string(),
                ]),
                slipway_core::runtime::Service::ModelEvaluator.source(),
                Some(job.run_id.clone()),
                slipway_core::bus::now(),
                EventData::EvaluateCalibrated(c),
            );
            event.traceparent = job.request.traceparent.clone();
            job.bus.publish(&event).await?;
        }
        let mut checks = Vec::new();
        if base.is_none() {
            checks.push(thresholds::no_baseline(None, "thresholds"));
        }
        details.hallucination_measure = match &spec.judge {
            Some(j) => format!("judge:{}", j.model),
            None => "lexical".into(),
        };
        if spec.judge.is_some() {
            checks.extend(judge_coverage(&details, &items));
        }
        let mut rng = Rng::from_text(&job.run_id);
        for ds in &spec.dataset {
            checks.extend(dataset_checks(
                ds,
                spec.significance,
                &metrics,
                &details,
                base.as_ref().map(|(_, g)| g),
                base_details.as_ref(),
                &mut rng,
            ));
        }
        details.samples = pick_samples(&details, &items, spec.samples as usize, &job.run_id);
        let path = ws.out().join("evaluation.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&details).expect("details serialise"),
        )
        .map_err(|e| Transient(e.to_string()))?;
        let name = job.object_name("json");
        let stored = objects::put_file(&job.objects, &self.logs_bucket, Some(&name), &path).await?;

        control_family_error(&mut checks, spec.significance);
        let (verdict, reason) = thresholds::verdict_and_reason(&checks);
        info!(
            ?verdict,
            datasets = spec.dataset.len(),
            items = n_items,
            "Evaluation done."
        );
        let report = GateReport {
            stage: req.stage.clone(),
            attempt: req.attempt,
            verdict,
            metrics,
            checks,
            baseline_run: base.map(|(r, _)| r),
            details: Some(stored),
            reason,
            duration_ms: ms(started),
        };
        Ok(if verdict == Verdict::Fail {
            EventData::EvaluateFailed(report)
        } else {
            EventData::EvaluateSucceeded(report)
        })
    }

    /// The model under test, as the spec names it.
    fn model(&self, req: &EvaluateRequested, ws: &Workspace) -> Result<Model, Stop> {
        let spec = &req.spec;
        Ok(match &spec.endpoint {
            ModelEndpoint::Openai {
                base_url,
                model,
                api_key_env,
            } => {
                let Some(base) = base_url
                    .clone()
                    .or_else(|| req.environment.as_ref().and_then(|e| e.url.clone()))
                else {
                    return Err(Stop::Fail(
                        "no model endpoint: neither base_url nor a gated environment url".into(),
                    ));
                };
                let api_key = match api_key_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        Stop::Fail(format!(
                            "the API key variable {var} is not set for the model-evaluator"
                        ))
                    })?),
                    None => None,
                };
                Model::Openai {
                    client: reqwest::Client::builder()
                        .timeout(Duration::from_secs(spec.request_timeout_secs))
                        .build()
                        .map_err(|e| Transient(e.to_string()))?,
                    url: format!("{}/v1/chat/completions", base.trim_end_matches('/')),
                    model: model.clone(),
                    api_key,
                }
            }
            ModelEndpoint::Command { command } => Model::Command {
                argv: command.clone(),
                env: self.exec.base_env(&ws.home()),
            },
        })
    }

    /// Asks the model every item of every dataset, and scores the answers.
    async fn score(
        &self,
        job: &Job,
        req: &EvaluateRequested,
        ws: &Workspace,
        model: &Model,
    ) -> Result<Scored, Stop> {
        let spec = &req.spec;
        let scope = job.scope();
        let mut scored = Scored {
            items: BTreeMap::new(),
            details: Details::default(),
            metrics: BTreeMap::new(),
            n_items: 0,
        };
        let (mut tin, mut tout) = (0u64, 0u64);
        for ds in &spec.dataset {
            let text = self
                .load(job, ws, &ds.path)
                .await
                .map_err(|e| Stop::Fail(format!("dataset {}: {e}", ds.name)))?;
            scored.details.dataset_digests.insert(
                ds.name.clone(),
                slipway_domain::digest::Digest::of(text.as_bytes()).to_string(),
            );
            let items = dataset::parse(&ds.name, &text).map_err(|e| Stop::Fail(e.to_string()))?;
            let mut batch = scope.span("model requests");
            batch.attr("slipway.dataset", ds.name.clone());
            batch.attr("slipway.dataset.items", items.len() as i64);
            batch.attr("slipway.dataset.repeats", i64::from(spec.repeats));
            // Each repeat asks every item once more: item by item, the answers of every
            // repeat, in the order asked.
            let mut asked: Vec<Vec<ItemResult>> = vec![Vec::new(); items.len()];
            let mut errors = 0;
            for _ in 0..spec.repeats {
                let answers = match model
                    .answer_all(
                        &items,
                        spec.concurrency as usize,
                        &ws.src(),
                        Duration::from_secs(spec.timeout_secs),
                    )
                    .await
                {
                    Ok(a) => a,
                    Err(e) => {
                        batch.fail("model_unavailable", e.to_string());
                        return Err(Stop::Fail(format!("dataset {}: {e}", ds.name)));
                    }
                };
                errors += answers.iter().filter(|a| a.is_err()).count();
                for ((item, a), out) in items.iter().zip(answers).zip(asked.iter_mut()) {
                    out.push(item_result(item, a));
                }
            }
            batch.attr("slipway.dataset.errors", errors as i64);
            drop(batch);
            let mut results: Vec<ItemResult> =
                asked.into_iter().filter_map(metrics::combine).collect();
            if let Some(j) = &spec.judge {
                let mut judging = scope.span("judge requests");
                judging.attr("slipway.dataset", ds.name.clone());
                self.judge_all(j, req, &items, &mut results).await;
                drop(judging);
            }
            if let Some(e) = &spec.embeddings {
                let mut span = scope.span("embeddings requests");
                span.attr("slipway.dataset", ds.name.clone());
                if let Err(err) = similarities(e, req, &items, &mut results).await {
                    warn!(dataset = %ds.name, error = %err, "No semantic similarity.");
                    for r in &mut results {
                        r.similarity_error = Some(err.clone());
                    }
                    span.fail("embeddings_failed", err);
                }
            }
            for r in &results {
                tin += r.tokens_in;
                tout += r.tokens_out;
                scored.n_items += 1;
            }
            for (k, v) in metrics::summarize(&results) {
                scored.metrics.insert(format!("{}.{k}", ds.name), v);
            }
            scored.details.datasets.insert(ds.name.clone(), results);
            scored.items.insert(ds.name.clone(), items);
        }
        if scored.n_items > 0 {
            let n = scored.n_items as f64;
            scored
                .metrics
                .insert("tokens_in_per_item".into(), tin as f64 / n);
            scored
                .metrics
                .insert("tokens_out_per_item".into(), tout as f64 / n);
        }
        Ok(scored)
    }

    /// Replaces the lexical hallucination measure with the judge's verdicts; an item the judge
    /// cannot answer keeps the lexical verdict (and says so in its error).
    async fn judge_all(
        &self,
        j: &slipway_domain::spec::JudgeSpec,
        req: &EvaluateRequested,
        items: &[Item],
        results: &mut [ItemResult],
    ) {
        let base = j
            .base_url
            .clone()
            .or_else(|| match &req.spec.endpoint {
                ModelEndpoint::Openai { base_url, .. } => base_url.clone(),
                ModelEndpoint::Command { .. } => None,
            })
            .or_else(|| req.environment.as_ref().and_then(|e| e.url.clone()));
        let Some(base) = base else { return };
        let url = format!("{}/v1/chat/completions", base.trim_end_matches('/'));
        let key = j.api_key_env.as_ref().and_then(|v| std::env::var(v).ok());
        let Ok(client) = reqwest::Client::builder()
            .timeout(Duration::from_secs(req.spec.request_timeout_secs))
            .build()
        else {
            return;
        };
        for (item, r) in items.iter().zip(results.iter_mut()) {
            let Some(grounding) = item.grounding() else {
                continue;
            };
            if r.error.is_some() || r.refusal {
                continue;
            }
            match model::judge(
                &client,
                &url,
                &j.model,
                key.as_deref(),
                &grounding,
                &item.input_text(),
                &r.output,
            )
            .await
            {
                Ok(v) => {
                    r.hallucinated = Some(v);
                    r.judged = true;
                    // The judge rules on the answer shown, once: the lexical verdicts of the
                    // repeats no longer say anything about it.
                    r.votes.remove("hallucination_rate");
                }
                Err(e) => r.judge_error = Some(e),
            }
        }
    }

    /// A dataset from the source tree, or `object://<bucket>/<name>` from the object store.
    async fn load(&self, job: &Job, ws: &Workspace, path: &str) -> Result<String, String> {
        if let Some(rest) = path.strip_prefix("object://") {
            let (bucket, name) = rest
                .split_once('/')
                .ok_or("object:// paths are object://<bucket>/<name>")?;
            let buf = objects::read(&job.objects, bucket, name)
                .await
                .map_err(|e| format!("object {rest}: {e}"))?;
            return String::from_utf8(buf).map_err(|_| "not UTF-8".to_string());
        }
        check_relative_path("path", path).map_err(|e| e.message)?;
        let full = ws.src().join(path);
        let canon = full
            .canonicalize()
            .map_err(|_| format!("{path} not found in the source"))?;
        if !canon.starts_with(ws.src().canonicalize().map_err(|e| e.to_string())?) {
            return Err(format!("{path} resolves outside the source"));
        }
        std::fs::read_to_string(&canon).map_err(|e| format!("{path}: {e}"))
    }
}

/// The cosine similarity of each answer with its item's reference (or expected answer), from
/// the embeddings endpoint; items without either, or whose request failed, have none.
async fn similarities(
    e: &slipway_domain::embeddings::EmbeddingsSpec,
    req: &EvaluateRequested,
    items: &[Item],
    results: &mut [ItemResult],
) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(req.spec.request_timeout_secs))
        .build()
        .map_err(|e| e.to_string())?;
    let wanted: Vec<(usize, String, String)> = items
        .iter()
        .zip(results.iter())
        .enumerate()
        .filter(|(_, (_, r))| r.error.is_none())
        .filter_map(|(i, (item, r))| {
            let reference = item.reference.clone().or_else(|| item.expected.clone())?;
            Some((i, r.output.clone(), reference))
        })
        .collect();
    let inputs: Vec<String> = wanted
        .iter()
        .flat_map(|(_, a, b)| [a.clone(), b.clone()])
        .collect();
    let vectors = slipway_core::embeddings::embed(&client, e, &inputs).await?;
    for ((i, _, _), v) in wanted.iter().zip(vectors.chunks(2)) {
        results[*i].similarity = slipway_domain::embeddings::cosine(&v[0], &v[1]);
    }
    Ok(())
}

/// A judge that did not answer most grounded items must not pass silently on the lexical
/// measure: a failed check saying so.
fn judge_coverage(details: &Details, items: &BTreeMap<String, Vec<Item>>) -> Option<Check> {
    let eligible: Vec<&ItemResult> = details
        .datasets
        .iter()
        .flat_map(|(d, rs)| {
            let items = &items[d];
            rs.iter().filter(move |r| {
                r.error.is_none()
                    && !r.refusal
                    && items
                        .iter()
                        .any(|i| i.id == r.id && i.grounding().is_some())
            })
        })
        .collect();
    let judged = eligible.iter().filter(|r| r.judged).count();
    if judged * 2 >= eligible.len() {
        return None;
    }
    let first = eligible
        .iter()
        .find_map(|r| r.judge_error.clone())
        .unwrap_or_default();
    Some(Check {
        metric: "judge".into(),
        scope: None,
        candidate: judged as f64,
        baseline: None,
        delta: None,
        p_value: None,
        interval: None,
        verdict: Verdict::Fail,
        note: format!(
            "the judge model answered {judged} of {} grounded items (first error: {first})",
            eligible.len()
        ),
        bounds: None,
        detectable: None,
    })
}

/// One dataset's checks: each threshold against the candidate and, when the baseline scored
/// the same dataset file (and the same hallucination measure), against the baseline.
fn dataset_checks(
    ds: &slipway_domain::spec::DatasetSpec,
    significance: f64,
    metrics: &BTreeMap<String, f64>,
    details: &Details,
    base: Option<&GateReport>,
    base_details: Option<&Details>,
    rng: &mut Rng,
) -> Vec<Check> {
    let comparable = base_details
        .is_none_or(|d| d.dataset_digests.get(&ds.name) == details.dataset_digests.get(&ds.name));
    let same_measure =
        base_details.is_none_or(|d| d.hallucination_measure == details.hallucination_measure);
    let mut checks = Vec::new();
    if base.is_some() && !comparable {
        checks.push(Check {
            metric: "baseline".into(),
            scope: Some(ds.name.clone()),
            candidate: 0.0,
            baseline: None,
            delta: None,
            p_value: None,
            interval: None,
            verdict: Verdict::Pass,
            note: format!(
                "{}: the baseline scored another version of this dataset: absolute thresholds only",
                ds.name
            ),
            bounds: None,
            detectable: None,
        });
    }
    for (metric, t) in &ds.thresholds {
        let key = format!("{}.{metric}", ds.name);
        let usable = comparable && (metric != "hallucination_rate" || same_measure);
        checks.push(check_metric(
            &ds.name,
            metric,
            metrics.get(&key).copied(),
            base.filter(|_| usable)
                .and_then(|g| g.metrics.get(&key).copied()),
            t,
            &details.datasets[&ds.name],
            base_details
                .filter(|_| usable)
                .and_then(|d| d.datasets.get(&ds.name)),
            significance,
            rng,
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_domain::spec::Severity;

    fn items(correct: &[bool]) -> Vec<ItemResult> {
        correct
            .iter()
            .enumerate()
            .map(|(i, c)| ItemResult {
                id: format!("i{i}"),
                exact: Some(*c),
                f1: Some(if *c { 1.0 } else { 0.0 }),
                ..Default::default()
            })
            .collect()
    }

    fn t(min: Option<f64>, reg: Option<f64>) -> Threshold {
        Threshold {
            min,
            max: None,
            max_regression: reg,
            max_regression_pct: None,
            severity: Severity::Fail,
        }
    }

    /// Items asked `k` times: item `i` answered right on the answers `right(i, repeat)` says.
    fn asked(n: usize, k: usize, right: impl Fn(usize, usize) -> bool) -> Vec<ItemResult> {
        (0..n)
            .map(|i| {
                metrics::combine(
                    (0..k)
                        .map(|r| ItemResult {
                            id: format!("i{i}"),
                            output: format!("answer {r}"),
                            exact: Some(right(i, r)),
                            latency_ms: 10.0 * (r + 1) as f64,
                            ..Default::default()
                        })
                        .collect(),
                )
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn repeats_combine_into_majorities_shares_and_the_measured_noise() {
        // Item 0 right 2 of 3 times, item 1 once, items 2.. always.
        let results = asked(10, 3, |i, r| match i {
            0 => r != 1,
            1 => r == 2,
            _ => true,
        });
        assert_eq!(results[0].exact, Some(true));
        assert_eq!(results[0].votes["exact_match"], [true, false, true]);
        assert_eq!(results[1].exact, Some(false));
        // The answer shown is the first; latency is the mean.
        assert_eq!(results[1].output, "answer 0");
        assert!((results[0].latency_ms - 20.0).abs() < 1e-9);
        // The metric is the mean share: (2/3 + 1/3 + 8) / 10.
        let m = metrics::summarize(&results);
        assert!((m["exact_match"] - 0.9).abs() < 1e-9, "{m:?}");
        let noise = dataset_noise("qa", &results);
        assert_eq!((noise.items, noise.unstable), (10, 2));
        assert_eq!(
            noise
                .unstable_items
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["i0", "i1"]
        );
        let em = &noise.metrics["exact_match"];
        // Agreement (2/3 + 2/3 + 8) / 10; each unstable item flips with 2·2·1 / 6.
        assert!((em.agreement - (8.0 + 4.0 / 3.0) / 10.0).abs() < 1e-9);
        assert!((em.flip_rate - 2.0 * (4.0 / 6.0) / 10.0).abs() < 1e-9);
        assert!(em.majority_flip_rate < em.flip_rate);
        assert_eq!(noise.unstable_not_listed, 0);
    }

    #[test]
    fn a_gate_with_repeats_tests_the_shares_and_sizes_itself_to_the_measured_noise() {
        let mut rng = Rng::new(3);
        let bound = t(None, Some(0.02));
        // The same noisy model twice (a third of the items a coin): no failure.
        let coin = |seed: u64| {
            let mut r = Rng::new(seed);
            let draws: Vec<bool> = (0..600).map(|_| r.unit() < 0.5).collect();
            move |i: usize, k: usize| !i.is_multiple_of(3) || draws[i * 3 % 600 + k]
        };
        let base = asked(200, 3, coin(11));
        let same = asked(200, 3, coin(12));
        let value = |r: &[ItemResult]| metrics::summarize(r)["exact_match"];
        let c = check_metric(
            "qa",
            "exact_match",
            Some(value(&same)),
            Some(value(&base)),
            &bound,
            &same,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_ne!(c.verdict, Verdict::Fail, "{}", c.note);
        assert!(c.note.contains("sign-flip p="), "{}", c.note);
        assert!(c.note.contains("share of 3 answers"), "{}", c.note);
        assert!(c.note.contains("measured noise"), "{}", c.note);
        // With a third of the items coins, 200 items cannot see 2 points, and say so.
        let mde = c.detectable.unwrap();
        assert!(mde > 0.05, "{mde}");
        assert!(
            c.note.contains("cannot detect a regression of 0.020"),
            "{}",
            c.note
        );
        // Losing 30 stable items is seen: fail.
        let worse = asked(200, 3, |i, k| {
            i % 3 != 0 && i >= 45 || coin(12)(i, k) && i % 3 == 0
        });
        let c = check_metric(
            "qa",
            "exact_match",
            Some(value(&worse)),
            Some(value(&base)),
            &bound,
            &worse,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail, "{}", c.note);
        let [lo, hi] = c.interval.unwrap();
        assert!(hi < 0.0 && lo > -0.3, "{lo} {hi}");
        // A baseline asked once pairs with the candidate's first answers: McNemar, and the
        // noise still measured from the candidate's repeats.
        let once = asked(200, 1, coin(11));
        let c = check_metric(
            "qa",
            "exact_match",
            Some(value(&same)),
            Some(value(&once)),
            &bound,
            &same,
            Some(&once),
            0.05,
            &mut rng,
        );
        assert!(c.note.contains("McNemar p="), "{}", c.note);
        assert!(c.note.contains("measured noise"), "{}", c.note);
        assert!(c.detectable.unwrap() > mde, "single answers see less");
    }

    #[test]
    fn verdicts_with_and_without_significance() {
        let mut rng = Rng::new(1);
        let base = items(&[true; 20]);
        // 8 of 20 newly wrong: McNemar exact p = 2 * 0.5^8 = 0.0078, significant: fail.
        let mut worse = vec![false; 8];
        worse.extend([true; 12]);
        let cand = items(&worse);
        let c = check_metric(
            "d",
            "exact_match",
            Some(0.6),
            Some(1.0),
            &t(None, Some(0.05)),
            &cand,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail, "{}", c.note);
        assert!(
            c.note
                .contains("baseline 1.0000, delta -0.4000, McNemar p=0.0078"),
            "{}",
            c.note
        );
        // 2 of 20 newly wrong: p = 0.5, beyond the bound but not significant: warn.
        let mut slightly = vec![false; 2];
        slightly.extend([true; 18]);
        let cand = items(&slightly);
        let c = check_metric(
            "d",
            "exact_match",
            Some(0.9),
            Some(1.0),
            &t(None, Some(0.05)),
            &cand,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Warn, "{}", c.note);
        assert!(
            c.note.contains("not statistically significant"),
            "{}",
            c.note
        );
        // An absolute bound fails whatever the evidence.
        let c = check_metric(
            "d",
            "exact_match",
            Some(0.9),
            Some(1.0),
            &t(Some(0.95), None),
            &cand,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail);
        // Better than the baseline: pass.
        let c = check_metric(
            "d",
            "exact_match",
            Some(1.0),
            Some(0.9),
            &t(None, Some(0.05)),
            &base,
            Some(&cand),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Pass, "{}", c.note);
        // No baseline: absolute only, and it says so.
        let c = check_metric(
            "d",
            "exact_match",
            Some(0.9),
            None,
            &t(Some(0.5), Some(0.05)),
            &cand,
            None,
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert!(c.note.contains("no baseline"), "{}", c.note);
        // Not measurable: fail, naming why.
        let c = check_metric(
            "d",
            "accuracy",
            None,
            None,
            &t(Some(0.5), None),
            &cand,
            None,
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.note.contains("cannot be measured"));
    }

    #[test]
    fn a_worse_rate_is_tested_in_its_own_direction() {
        let mut rng = Rng::new(2);
        let mk = |h: &[bool]| -> Vec<ItemResult> {
            h.iter()
                .enumerate()
                .map(|(i, x)| ItemResult {
                    id: format!("i{i}"),
                    hallucinated: Some(*x),
                    ..Default::default()
                })
                .collect()
        };
        let base = mk(&[false; 20]);
        let mut more = vec![true; 8];
        more.extend([false; 12]);
        let cand = mk(&more);
        let threshold = Threshold {
            max_regression: Some(0.05),
            ..Default::default()
        };
        let c = check_metric(
            "d",
            "hallucination_rate",
            Some(0.4),
            Some(0.0),
            &threshold,
            &cand,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail, "{}", c.note);
        assert!(c.p_value.unwrap() < 0.01);
    }

    #[test]
    fn a_similarity_regression_is_tested_on_the_paired_items() {
        let mut rng = Rng::new(3);
        let mk = |sims: &[f64]| -> Vec<ItemResult> {
            sims.iter()
                .enumerate()
                .map(|(i, x)| ItemResult {
                    id: format!("i{i}"),
                    similarity: Some(*x),
                    ..Default::default()
                })
                .collect()
        };
        let base = mk(&[0.95; 20]);
        let mut sims = vec![0.2; 8];
        sims.extend([0.95; 12]);
        let cand = mk(&sims);
        let threshold = Threshold {
            max_regression: Some(0.05),
            ..Default::default()
        };
        let c = check_metric(
            "d",
            "semantic_similarity",
            Some(0.65),
            Some(0.95),
            &threshold,
            &cand,
            Some(&base),
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail, "{}", c.note);
        let iv = c.interval.expect("a paired bootstrap interval");
        assert!(iv[1] < 0.0, "the whole interval is a loss: {iv:?}");
        assert!(c.note.contains("paired bootstrap"), "{}", c.note);
        // Without a similarity, the check names the endpoint's failure.
        let failed: Vec<ItemResult> = cand
            .iter()
            .map(|r| ItemResult {
                similarity: None,
                similarity_error: Some("http://e/v1/embeddings answered 500".into()),
                ..r.clone()
            })
            .collect();
        let c = check_metric(
            "d",
            "semantic_similarity",
            None,
            None,
            &threshold,
            &failed,
            None,
            0.05,
            &mut rng,
        );
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(
            c.note
                .contains("the embeddings endpoint failed: http://e/v1/embeddings answered 500"),
            "{}",
            c.note
        );
    }

    #[test]
    fn a_check_says_what_its_dataset_can_detect_and_holm_keeps_noise_from_blocking() {
        let mut rng = Rng::new(7);
        let base = items(&[true; 20]);
        // 2 of 20 newly wrong against a 0.05 bound: 20 items cannot see 5 points.
        let mut slightly = vec![false; 2];
        slightly.extend([true; 18]);
        let c = check_metric(
            "d",
            "exact_match",
            Some(0.9),
            Some(1.0),
            &t(None, Some(0.05)),
            &items(&slightly),
            Some(&base),
            0.05,
            &mut rng,
        );
        let mde = c.detectable.unwrap();
        assert!(mde > 0.05, "{mde}");
        assert!(
            c.note
                .contains("this dataset cannot detect a regression of 0.050; it can detect"),
            "{}",
            c.note
        );
        // The difference's interval, candidate minus baseline: around -0.1.
        let [lo, hi] = c.interval.unwrap();
        assert!(lo < -0.1 && hi > -0.1 && hi < 0.1, "[{lo}, {hi}]");

        // Three tests in a gate: a regression of p = 0.0386 fails alone but only warns once
        // adjusted (0.0386 × 3 > 0.05); 8 of 20 lost (p = 0.0078 × 3 = 0.023) still fails.
        let mut base40 = vec![true; 38];
        base40.extend([false; 2]);
        // Baseline right on the 10 the candidate lost, wrong on 2 the candidate got: b=10, c=2.
        let mut cand40 = vec![false; 10];
        cand40.extend([true; 28]);
        cand40.extend([true; 2]);
        let judge = |cand: &[bool], base: &[bool], rng: &mut Rng| {
            check_metric(
                "d",
                "exact_match",
                Some(0.7),
                Some(0.95),
                &t(None, Some(0.02)),
                &items(cand),
                Some(&items(base)),
                0.05,
                rng,
            )
        };
        let weak = judge(&cand40, &base40, &mut rng);
        assert_eq!(weak.verdict, Verdict::Fail, "alone: {}", weak.note);
        let mut strong_cand = vec![false; 8];
        strong_cand.extend([true; 12]);
        let strong = judge(&strong_cand, &[true; 20], &mut rng);
        let even = judge(&[true; 20], &[true; 20], &mut rng);
        let mut checks = vec![weak, strong, even];
        control_family_error(&mut checks, 0.05);
        assert_eq!(checks[0].verdict, Verdict::Warn, "{}", checks[0].note);
        assert!(
            checks[0].note.contains("not significant once adjusted"),
            "{}",
            checks[0].note
        );
        assert_eq!(checks[1].verdict, Verdict::Fail, "{}", checks[1].note);
        assert!(checks[1].note.contains("Holm-adjusted over 3 tests"));
    }
}
