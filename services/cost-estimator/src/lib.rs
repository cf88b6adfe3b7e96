//! The cost gate: `cost.requested` in, a gate report out.
//!
//! From the evaluator's measured token counts and the performance gate's throughput, and the
//! price list in the configuration, it estimates the cost per 1,000 requests and per month at
//! the spec's projected traffic, and checks the budget and the increase over the baseline (the
//! production version's own estimate). Every figure in the report names the inputs it came from.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use slipway_core::bus::{Bus, BusError};
use slipway_core::config::{Config, Pricing};
use slipway_core::runtime::{CancellationToken, Job, Transient, Worker, run_worker};
use slipway_core::store::baseline;
use slipway_domain::events::{Check, CostRequested, EventData, GateReport, Verdict};
use slipway_domain::spec::{CostSpec, Threshold};
use slipway_domain::thresholds;

/// Hours in an average month (365.25 × 24 / 12).
pub const HOURS_PER_MONTH: f64 = 730.5;

/// Runs the cost gate until `shutdown`.
///
/// # Errors
/// [`BusError`] when NATS cannot be reached or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BusError> {
    let bus = Bus::connect(&config.nats, "slipway-cost-estimator").await?;
    let worker = Arc::new(CostGate {
        pricing: config.pricing.clone(),
    });
    run_worker(bus, worker, config.worker, &config.health, shutdown).await
}

#[derive(Debug)]
pub struct CostGate {
    pub pricing: Pricing,
}

/// The measured inputs of an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Inputs {
    pub tokens_in_per_request: f64,
    pub tokens_out_per_request: f64,
    /// Requests per second one instance sustained in the load test.
    pub throughput_rps: Option<f64>,
}

/// An estimate and every figure it came from.
pub fn estimate(
    spec: &CostSpec,
    pricing: &Pricing,
    inputs: Inputs,
) -> Result<BTreeMap<String, f64>, String> {
    let mut m = BTreeMap::new();
    let requests = spec.projected_requests_per_month as f64;
    m.insert("projected_requests_per_month".into(), requests);
    let mut per_request = 0.0;
    if let Some(model) = &spec.model {
        let price = pricing
            .models
            .get(model)
            .ok_or_else(|| format!("no price for model {model:?} in the pricing table"))?;
        let token_cost = inputs.tokens_in_per_request / 1000.0 * price.input_per_1k
            + inputs.tokens_out_per_request / 1000.0 * price.output_per_1k;
        m.insert("tokens_in_per_request".into(), inputs.tokens_in_per_request);
        m.insert(
            "tokens_out_per_request".into(),
            inputs.tokens_out_per_request,
        );
        m.insert("price_input_per_1k_tokens".into(), price.input_per_1k);
        m.insert("price_output_per_1k_tokens".into(), price.output_per_1k);
        m.insert("token_cost_per_request".into(), token_cost);
        per_request += token_cost;
    }
    let mut infra_month = 0.0;
    if let Some(kind) = &spec.instance_type {
        let price = pricing
            .instances
            .get(kind)
            .ok_or_else(|| format!("no price for instance type {kind:?} in the pricing table"))?;
        let projected_rps = requests / (HOURS_PER_MONTH * 3600.0);
        let needed = match inputs.throughput_rps {
            Some(t) if t > 0.0 => (projected_rps / t).ceil().max(f64::from(spec.instances)),
            _ => f64::from(spec.instances),
        };
        infra_month = needed * price.per_hour * HOURS_PER_MONTH;
        m.insert("projected_rps".into(), projected_rps);
        if let Some(t) = inputs.throughput_rps {
            m.insert("throughput_rps_per_instance".into(), t);
        }
        m.insert("instances_needed".into(), needed);
        m.insert("price_instance_per_hour".into(), price.per_hour);
        m.insert("infrastructure_per_month".into(), infra_month);
    }
    let per_month = per_request * requests + infra_month;
    m.insert("cost_per_month".into(), per_month);
    let per_1k = if requests > 0.0 {
        per_month / requests * 1000.0
    } else {
        0.0
    };
    m.insert("cost_per_1k_requests".into(), per_1k);
    Ok(m)
}

/// Budget and increase checks, each note naming the figures it used.
pub fn checks(spec: &CostSpec, m: &BTreeMap<String, f64>, baseline: Option<f64>) -> Vec<Check> {
    let per_month = m.get("cost_per_month").copied().unwrap_or(0.0);
    let inputs = format!(
        "from {:.0} requests/month, {:.1} in + {:.1} out tokens/request, {:.0} instance(s)",
        m.get("projected_requests_per_month")
            .copied()
            .unwrap_or(0.0),
        m.get("tokens_in_per_request").copied().unwrap_or(0.0),
        m.get("tokens_out_per_request").copied().unwrap_or(0.0),
        m.get("instances_needed").copied().unwrap_or(0.0),
    );
    let mut out = Vec::new();
    let t = Threshold {
        max: spec.budget_per_month,
        max_regression_pct: spec.max_increase_pct,
        ..Default::default()
    };
    if t.max.is_some() || t.max_regression_pct.is_some() {
        let mut c = thresholds::check("cost_per_month", None, per_month, baseline, &t);
        c.note = match baseline {
            Some(b) => format!("{} ({inputs}; baseline {b:.2}/month)", c.note),
            None => format!("{} ({inputs}; no baseline: budget only)", c.note),
        };
        out.push(c);
    }
    out
}

impl Worker for CostGate {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::CostEstimator
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        let EventData::CostRequested(req) = &job.request.data else {
            return Err(Transient::not_a(&job.request, "a cost request"));
        };
        self.estimate(job, req).await
    }
}

impl CostGate {
    async fn estimate(&self, job: &Job, req: &CostRequested) -> Result<EventData, Transient> {
        let started = Instant::now();
        let report = |verdict, metrics, checks, baseline_run, reason| GateReport {
            stage: req.stage.clone(),
            attempt: req.attempt,
            verdict,
            metrics,
            checks,
            baseline_run,
            details: None,
            reason,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        let find = |stage: &str, key: &str| {
            req.inputs
                .iter()
                .find(|g| g.stage == stage)
                .and_then(|g| g.metrics.get(key).copied())
        };
        let inputs = Inputs {
            tokens_in_per_request: find("evaluate", "tokens_in_per_item").unwrap_or(0.0),
            tokens_out_per_request: find("evaluate", "tokens_out_per_item").unwrap_or(0.0),
            throughput_rps: find("perf", "throughput_rps"),
        };
        // A priced model without measured tokens would look free: refuse to guess.
        if req.spec.model.is_some() && find("evaluate", "tokens_in_per_item").is_none() {
            let r = report(
                Verdict::Fail,
                BTreeMap::new(),
                Vec::new(),
                None,
                Some("no token counts from the evaluation gate to price the model with".into()),
            );
            return Ok(EventData::CostFailed(r));
        }
        let metrics = match estimate(&req.spec, &self.pricing, inputs) {
            Ok(m) => m,
            Err(e) => {
                let r = report(Verdict::Fail, BTreeMap::new(), Vec::new(), None, Some(e));
                return Ok(EventData::CostFailed(r));
            }
        };
        let base = baseline::gate_baseline(&job.deploys, &job.run, &req.stage).await?;
        let base_value = base
            .as_ref()
            .and_then(|(_, g)| g.metrics.get("cost_per_month").copied());
        let checks = checks(&req.spec, &metrics, base_value);
        let (verdict, reason) = thresholds::verdict_and_reason(&checks);
        let r = report(verdict, metrics, checks, base.map(|(r, _)| r), reason);
        Ok(if verdict == Verdict::Fail {
            EventData::CostFailed(r)
        } else {
            EventData::CostSucceeded(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_core::config::{InstancePrice, ModelPrice};

    fn spec() -> CostSpec {
        CostSpec {
            model: Some("m".into()),
            instance_type: Some("small".into()),
            instances: 1,
            projected_requests_per_month: 2_630_000,
            budget_per_month: Some(1000.0),
            max_increase_pct: Some(10.0),
            timeout_secs: 60,
        }
    }

    fn pricing() -> Pricing {
        Pricing {
            models: [(
                "m".to_string(),
                ModelPrice {
                    input_per_1k: 0.5,
                    output_per_1k: 1.5,
                },
            )]
            .into(),
            instances: [("small".to_string(), InstancePrice { per_hour: 0.1 })].into(),
        }
    }

    #[test]
    fn estimate_by_hand() {
        // 100 in + 50 out tokens: 0.1 * 0.5 + 0.05 * 1.5 = 0.125 per request.
        // 2,630,000 requests/month = 1.0000 rps; at 0.4 rps per instance: 3 instances.
        let m = estimate(
            &spec(),
            &pricing(),
            Inputs {
                tokens_in_per_request: 100.0,
                tokens_out_per_request: 50.0,
                throughput_rps: Some(0.4),
            },
        )
        .unwrap();
        assert!((m["token_cost_per_request"] - 0.125).abs() < 1e-12);
        assert!((m["projected_rps"] - 2_630_000.0 / (730.5 * 3600.0)).abs() < 1e-12);
        assert_eq!(m["instances_needed"], 3.0);
        let infra = 3.0 * 0.1 * 730.5;
        assert!((m["infrastructure_per_month"] - infra).abs() < 1e-9);
        let month = 0.125 * 2_630_000.0 + infra;
        assert!((m["cost_per_month"] - month).abs() < 1e-6);
        assert!((m["cost_per_1k_requests"] - month / 2630.0).abs() < 1e-9);
        // Far over a budget of 1000/month: fails, naming its inputs.
        let c = checks(&spec(), &m, None);
        assert_eq!(c[0].verdict, Verdict::Fail);
        assert!(
            c[0].note.contains("> max") && c[0].note.contains("2630000 requests/month"),
            "{}",
            c[0].note
        );
    }

    #[test]
    fn increase_over_the_baseline() {
        let mut s = spec();
        s.budget_per_month = None;
        let m = BTreeMap::from([("cost_per_month".to_string(), 115.0)]);
        assert_eq!(checks(&s, &m, Some(100.0))[0].verdict, Verdict::Fail);
        assert_eq!(checks(&s, &m, Some(110.0))[0].verdict, Verdict::Pass);
        let err = estimate(
            &CostSpec {
                model: Some("other".into()),
                ..spec()
            },
            &pricing(),
            Inputs::default(),
        )
        .unwrap_err();
        assert!(err.contains("other"), "{err}");
    }
}
