//! The rollouts' judge: `rollout.requested` in; weights published step by step, each look at
//! both variants a `rollout.analysed` event; `rollout.succeeded` (promote) or `rollout.failed`
//! (aborted: the weight is back at 0 first) out.
//!
//! Everything the judge needs to go on is in the log: the step in progress and when it began
//! (its `rollout.weight_set`), the A/B test's p-value so far (the last look), and people's
//! controls. A judge restarted in the middle of a step (a crash, a redelivery) carries on with
//! that step, neither repeating nor skipping one; only the metrics window restarts at the first
//! scrape after the restart, since scrapes are not kept.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use slipway_core::bus::now;
use slipway_core::exec::ExecSettings;
use slipway_core::runtime::{Job, Transient};
use slipway_core::traffic::{Target, publish};
use slipway_domain::events::{EventData, RolloutRequested};
use slipway_domain::judge::{AbWinner, StepDecision};
use slipway_domain::rollout::{
    self, ControlAction, MetricKind, OnWin, Plan, RolloutAnalysis, RolloutControl, RolloutReport,
    RolloutSpec, RolloutView, ShadowFigures, ShadowSpec, StepAt, WeightCause, WeightSet, Window,
};
use slipway_domain::signing::PublicKey;
use slipway_domain::traffic::{CANDIDATE, STABLE, Weight};
use slipway_domain::{Event, Run};
use tracing::{info, warn};

use crate::prometheus::Scrape;

/// What the judge is given besides the job.
#[derive(Debug, Clone)]
pub struct Judge {
    pub exec: ExecSettings,
    /// The gateway's key: a person's control counts only with its valid signature.
    pub approval_key: Option<PublicKey>,
}

/// How a rollout ends.
#[derive(Debug, Clone)]
enum End {
    Promote { by: String, reason: String },
    Abort { by: String, reason: String },
}

/// The look of a decision for the candidate held for a person (A/B, `winner = "approve"`).
const AWAIT_APPROVAL: &str = "await_approval";

/// The rollout as the log has it now, with only the controls the gateway signed.
struct Log {
    view: Option<RolloutView>,
    controls: Vec<RolloutControl>,
    /// Why the stage attempt is over although the judge has not ended it (the run ended, or
    /// the conductor failed the stage at its timeout).
    stage_over: Option<String>,
}

/// What the log says was decided before a restart.
enum Resumed {
    /// The step passed: on to the next one.
    Next,
    End(End),
}

/// The decision already in the log for the step in progress, if any: the rollout's last
/// weight (promoted or aborted), or the step's last look.
fn decided_before(view: &RolloutView, plan: &[Plan], step: u32) -> Option<Resumed> {
    let by = "judge".to_string();
    match view.weights.last().map(|w| w.cause) {
        Some(WeightCause::Promote) => {
            return Some(Resumed::End(End::Promote {
                by,
                reason: "promoted before the judge restarted".into(),
            }));
        }
        Some(WeightCause::Abort) => {
            return Some(Resumed::End(End::Abort {
                by,
                reason: "aborted before the judge restarted".into(),
            }));
        }
        _ => {}
    }
    let look = view.looks.iter().rev().find(|l| l.step == step)?;
    match look.decision.as_str() {
        "abort" => Some(Resumed::End(End::Abort {
            by,
            reason: format!("step {} at {}%: {}", step + 1, look.weight, look.reason),
        })),
        "promote" if (step as usize) + 1 < plan.len() => Some(Resumed::Next),
        "promote" => Some(Resumed::End(End::Promote {
            by,
            reason: format!("every step passed ({})", look.reason),
        })),
        _ => None,
    }
}

impl Judge {
    /// Runs a rollout to its end.
    pub async fn roll_out(
        &self,
        job: &Job,
        req: &RolloutRequested,
    ) -> Result<EventData, Transient> {
        let started = Instant::now();
        let plan = req.spec.plan();
        let env = &req.environment.name;
        let report = |end: &End, steps_passed: u32, last: Option<RolloutAnalysis>| {
            let (by, reason) = match end {
                End::Promote { by, reason } | End::Abort { by, reason } => (by, reason),
            };
            RolloutReport {
                stage: req.stage.clone(),
                attempt: req.attempt,
                environment: env.clone(),
                version: req.version.clone(),
                steps_passed,
                last,
                decided_by: by.clone(),
                reason: reason.clone(),
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }
        };
        // The environment's first deploy has nothing in service to compare with: all traffic
        // goes to the candidate, and promotion puts it in the stable slot.
        if req.stable_version.is_none() {
            self.set_weight(
                job,
                req,
                plan.len() as u32,
                Weight::ALL,
                WeightCause::Promote,
            )
            .await?;
            let end = End::Promote {
                by: "judge".into(),
                reason: format!("the first deploy to {env}: nothing in service to compare with"),
            };
            return Ok(EventData::RolloutSucceeded(report(&end, 0, None)));
        }
        let metrics_url = metrics_url(req);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(req.spec.interval_secs.clamp(1, 10)))
            .build()
            .map_err(|e| Transient(e.to_string()))?;
        let interval = Duration::from_secs(req.spec.interval_secs);

        let log = self.read(job, req).await?;
        if let Some(end) = log.stage_over.clone() {
            return self.stage_over(job, req, &log, end).await;
        }
        // Resume where the log says, or begin the first step.
        let resumed = log.view.as_ref().and_then(|v| {
            v.step_started_at
                .filter(|_| v.weights.iter().any(|w| w.cause == WeightCause::Step))
                .map(|at| (v.step, at))
        });
        let (mut step, mut step_started) = match resumed {
            Some((s, at)) => {
                info!(environment = %env, step = s, "Resuming the rollout from the log.");
                (s, at)
            }
            None => (0, self.begin(job, req, &plan, 0).await?),
        };
        let view = log.view.clone().unwrap_or_default();
        let mut last = view.looks.iter().rev().find(|l| l.step == step).cloned();
        // What the log already decided is carried out, never judged again.
        let mut decided = resumed.and_then(|_| decided_before(&view, &plan, step));
        if decided.is_none() && resumed.is_some() {
            // The step's weight again, in case the restart came between publishing and
            // recording it (the record is a duplicate; the step keeps its start).
            self.set_weight(
                job,
                req,
                step,
                Weight::percent(plan[step as usize].weight).map_err(Transient)?,
                WeightCause::Step,
            )
            .await?;
        }
        if let Some(Resumed::Next) = decided {
            step += 1;
            step_started = self.begin(job, req, &plan, step).await?;
            decided = None;
        }
        let mut ab_p = view
            .looks
            .iter()
            .rev()
            .filter(|l| l.step == step)
            .find_map(|l| l.ab.as_ref().map(|a| a.p_value))
            .unwrap_or(1.0);
        // A shadow rollout's totals go on from the last look that had them.
        let shadow = view.looks.iter().rev().find_map(|l| l.shadow.clone());
        // A fresh shadow counts only what is mirrored from now on: the router may still hold
        // pairs of an earlier candidate.
        let mut shadow = match (shadow, &req.spec.shadow) {
            (Some(f), _) => f,
            (None, Some(sh)) => ShadowFigures {
                cursor: last_pair(&client, req, sh).await.unwrap_or(0),
                ..ShadowFigures::default()
            },
            (None, None) => ShadowFigures::default(),
        };
        let mut awaiting_approval = last.as_ref().is_some_and(|l| l.decision == AWAIT_APPROVAL);
        let mut before = scrape(&client, &metrics_url).await.ok();
        let end = loop {
            match decided.take() {
                Some(Resumed::End(end)) => break end,
                Some(Resumed::Next) | None => {}
            }
            tokio::select! {
                _ = job.cancel.cancelled() => {
                    // A run that ended takes the candidate's traffic with it; a shutdown leaves
                    // the rollout to the next delivery.
                    let log = self.read(job, req).await?;
                    if let Some(end) = log.stage_over.clone() {
                        return self.stage_over(job, req, &log, end).await;
                    }
                    return Err(Transient("the rollout was interrupted".into()));
                }
                _ = tokio::time::sleep(interval) => {}
            }
            let log = self.read(job, req).await?;
            if let Some(end) = log.stage_over.clone() {
                return self.stage_over(job, req, &log, end).await;
            }
            if let Some(c) = log
                .controls
                .iter()
                .find(|c| matches!(c.action, ControlAction::Promote | ControlAction::Abort))
            {
                let why = c
                    .comment
                    .clone()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default();
                break if c.action == ControlAction::Promote {
                    End::Promote {
                        by: c.by.clone(),
                        reason: format!("promoted by {}{why}", c.by),
                    }
                } else {
                    End::Abort {
                        by: c.by.clone(),
                        reason: format!("aborted by {}{why}", c.by),
                    }
                };
            }
            let paused = log
                .controls
                .iter()
                .rev()
                .find(|c| matches!(c.action, ControlAction::Pause | ControlAction::Resume))
                .is_some_and(|c| c.action == ControlAction::Pause);
            if paused {
                continue;
            }
            let Some(p) = plan.get(step as usize).copied() else {
                break End::Promote {
                    by: "judge".into(),
                    reason: "every step passed".into(),
                };
            };
            let at_now = now();
            // A paused step's clock stops: its time is what it was observed for.
            let held = rollout::paused_secs(&log.controls, step_started, at_now);
            let elapsed = u64::try_from((at_now - step_started).num_seconds() - held).unwrap_or(0);
            let at = StepAt {
                step,
                weight: p.weight,
                elapsed_secs: elapsed,
                duration_secs: p.duration_secs,
                max_hold_secs: req.spec.max_hold_secs(&p),
                ab_p,
            };
            let mut look = match (scrape(&client, &metrics_url).await, &before) {
                (Ok(now_scrape), Some(b)) => {
                    let (s, c) = windows(&req.spec, b, &now_scrape);
                    match &req.spec.shadow {
                        Some(sh) => match read_pairs(&client, req, sh, &mut shadow).await {
                            Ok(()) => rollout::look_shadow(&req.spec, at, &s, &c, &shadow, at_now),
                            Err(e) => unavailable(at, &e, at_now),
                        },
                        None => rollout::look(&req.spec, at, &s, &c, at_now),
                    }
                }
                (Ok(now_scrape), None) => {
                    before = Some(now_scrape);
                    continue;
                }
                (Err(e), _) => unavailable(at, &e, at_now),
            };
            look.analysis.stage = req.stage.clone();
            look.analysis.attempt = req.attempt;
            if awaiting_approval {
                // Decided for the candidate, waiting for a person: only a guardrail that fails
                // (or the other variant turning out better) still ends it.
                if let StepDecision::Abort(reason) = &look.decision {
                    let reason = reason.clone();
                    self.record(job, &look.analysis).await?;
                    last = Some(look.analysis);
                    break End::Abort {
                        by: "judge".into(),
                        reason: format!("while waiting for an approver: {reason}"),
                    };
                }
                continue;
            }
            ab_p = look.ab_p;
            if req
                .spec
                .ab
                .as_ref()
                .is_some_and(|ab| ab.winner == OnWin::Approve)
                && look.winner == Some(AbWinner::Candidate)
            {
                look.analysis.decision = AWAIT_APPROVAL.into();
                look.analysis.reason = format!(
                    "{}; an approver promotes it (slipway rollout promote) or aborts it",
                    look.analysis.reason
                );
                awaiting_approval = true;
            }
            self.record(job, &look.analysis).await?;
            let decision = look.decision.clone();
            last = Some(look.analysis);
            if awaiting_approval {
                continue;
            }
            match decision {
                StepDecision::Hold(_) => {}
                StepDecision::Abort(reason) => {
                    break End::Abort {
                        by: "judge".into(),
                        reason: format!("step {} at {}%: {reason}", step + 1, p.weight),
                    };
                }
                StepDecision::Promote if (step as usize) + 1 < plan.len() => {
                    step += 1;
                    step_started = self.begin(job, req, &plan, step).await?;
                    ab_p = 1.0;
                    before = scrape(&client, &metrics_url).await.ok();
                }
                StepDecision::Promote => {
                    let reason = last.as_ref().map(|l| l.reason.clone()).unwrap_or_default();
                    break End::Promote {
                        by: "judge".into(),
                        reason: format!("every step passed ({reason})"),
                    };
                }
            }
        };
        let n = plan.len() as u32;
        match &end {
            End::Promote { .. } => {
                self.set_weight(job, req, n, Weight::ALL, WeightCause::Promote)
                    .await?;
                info!(environment = %env, "Rollout promoted.");
                let passed = if matches!(&end, End::Promote { by, .. } if by == "judge") {
                    n
                } else {
                    step
                };
                Ok(EventData::RolloutSucceeded(report(&end, passed, last)))
            }
            End::Abort { reason, .. } => {
                // Traffic first: every moment counts for the users on a bad candidate.
                self.set_weight(job, req, step, Weight::NONE, WeightCause::Abort)
                    .await?;
                warn!(environment = %env, %reason, "Rollout aborted: all traffic back on the stable version.");
                Ok(EventData::RolloutFailed(report(&end, step, last)))
            }
        }
    }

    /// Reads the run's rollout from the log.
    async fn read(&self, job: &Job, req: &RolloutRequested) -> Result<Log, Transient> {
        let records = job
            .bus
            .run_log(&job.run_id)
            .await
            .map_err(Transient::from)?;
        let events: Vec<Event> = records.into_iter().filter_map(|r| r.event.ok()).collect();
        let run = Run::replay(&events);
        let stage_over = match &run {
            None => Some("the run is not in the log".to_string()),
            Some(r) if r.is_ended() => Some(format!(
                "the run ended {}: {}",
                r.phase.as_str(),
                r.reason.as_deref().unwrap_or_default()
            )),
            Some(r) => r
                .stage(&req.stage)
                .filter(|s| s.attempt != req.attempt || s.status.is_terminal())
                .map(|s| {
                    format!(
                        "the stage is {:?}: {}",
                        s.status,
                        s.reason.as_deref().unwrap_or_default()
                    )
                }),
        };
        let view = run
            .as_ref()
            .and_then(|r| {
                r.rollouts
                    .iter()
                    .find(|v| v.stage == req.stage && v.attempt == req.attempt)
            })
            .cloned();
        let controls = view
            .as_ref()
            .map(|v| {
                v.controls
                    .iter()
                    .filter(|c| match &self.approval_key {
                        Some(k) => match k.verify_control(&job.run_id, c) {
                            Ok(()) => true,
                            Err(e) => {
                                warn!(error = %e, "A rollout control is ignored.");
                                false
                            }
                        },
                        None => {
                            warn!("No [approvals] public_key: rollout controls cannot be verified and are ignored.");
                            false
                        }
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok(Log {
            view,
            controls,
            stage_over,
        })
    }

    /// The stage attempt ended without the judge (the run's end, the conductor's timeout): the
    /// candidate gets no more traffic. The fact returned is stale by then and changes nothing.
    async fn stage_over(
        &self,
        job: &Job,
        req: &RolloutRequested,
        log: &Log,
        why: String,
    ) -> Result<EventData, Transient> {
        let view = log.view.clone().unwrap_or_default();
        if view.weight > 0.0 {
            warn!(environment = %req.environment.name, %why, "The rollout ended without the judge: all traffic back on the stable version.");
            self.set_weight(job, req, view.step, Weight::NONE, WeightCause::Abort)
                .await?;
        }
        Ok(EventData::RolloutFailed(RolloutReport {
            stage: req.stage.clone(),
            attempt: req.attempt,
            environment: req.environment.name.clone(),
            version: req.version.clone(),
            steps_passed: view.step,
            last: view.looks.last().cloned(),
            decided_by: "conductor".into(),
            reason: why,
            duration_ms: 0,
        }))
    }

    /// Begins step `step`: its weight published and recorded; when it began.
    async fn begin(
        &self,
        job: &Job,
        req: &RolloutRequested,
        plan: &[Plan],
        step: u32,
    ) -> Result<DateTime<Utc>, Transient> {
        let p = plan[step as usize];
        let weight = Weight::percent(p.weight).map_err(Transient)?;
        info!(environment = %req.environment.name, step = step + 1, weight = p.weight, "Rollout step.");
        self.set_weight(job, req, step, weight, WeightCause::Step)
            .await
    }

    async fn set_weight(
        &self,
        job: &Job,
        req: &RolloutRequested,
        step: u32,
        weight: Weight,
        cause: WeightCause,
    ) -> Result<DateTime<Utc>, Transient> {
        let target = Target {
            traffic: &req.traffic,
            pipeline: &req.pipeline,
            environment: &req.environment.name,
            shadow: req.spec.strategy == rollout::Strategy::Shadow,
        };
        let published = publish(&job.bus, &self.exec, &target, weight)
            .await
            .map_err(Transient)?;
        let at = now();
        let w = WeightSet {
            stage: req.stage.clone(),
            attempt: req.attempt,
            environment: req.environment.name.clone(),
            step,
            weight: weight.as_percent(),
            cause,
            published,
            at,
        };
        let id = rollout::weight_event_id(&job.run_id, &w);
        self.append(job, id, EventData::RolloutWeightSet(w)).await?;
        Ok(at)
    }

    async fn record(&self, job: &Job, a: &RolloutAnalysis) -> Result<(), Transient> {
        let id = rollout::analysis_event_id(&job.run_id, a);
        self.append(job, id, EventData::RolloutAnalysed(a.clone()))
            .await
    }

    async fn append(&self, job: &Job, id: String, data: EventData) -> Result<(), Transient> {
        let mut e = Event::new(
            id,
            "/slipway/monitor",
            Some(job.run_id.clone()),
            now(),
            data,
        );
        e.traceparent = job.request.traceparent.clone();
        job.bus.publish(&e).await.map_err(Transient::from)?;
        Ok(())
    }
}

fn metrics_url(req: &RolloutRequested) -> String {
    on_environment(req, &req.spec.metrics)
}

/// A path on the environment's url, or a whole URL as it is.
fn on_environment(req: &RolloutRequested, m: &str) -> String {
    if m.starts_with("http://") || m.starts_with("https://") {
        return m.to_string();
    }
    let base = req.environment.url.as_deref().unwrap_or_default();
    format!("{}{m}", base.trim_end_matches('/'))
}

/// The router's last pair so far (its answers' `last`), where a fresh shadow starts reading.
async fn last_pair(
    client: &reqwest::Client,
    req: &RolloutRequested,
    sh: &ShadowSpec,
) -> Result<u64, String> {
    let url = format!("{}?after={}", on_environment(req, &sh.pairs), u64::MAX);
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
    Ok(v["last"].as_u64().unwrap_or(0))
}

/// Pairs read per look at most: a look must not take longer than its interval.
const PAIRS_PER_LOOK: usize = 2_000;

/// Reads the mirrored pairs after `figures.cursor` from the router, and adds each: whether
/// the answers agree and, with an embeddings endpoint, their cosine similarity.
async fn read_pairs(
    client: &reqwest::Client,
    req: &RolloutRequested,
    sh: &ShadowSpec,
    figures: &mut ShadowFigures,
) -> Result<(), String> {
    let base = on_environment(req, &sh.pairs);
    let mut read = 0;
    while read < PAIRS_PER_LOOK {
        let url = format!("{base}?after={}", figures.cursor);
        let resp = client
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url} answered {}", resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        let pairs: Vec<(u64, String, String)> = v["pairs"]
            .as_array()
            .ok_or_else(|| format!("{url}: no `pairs` in the answer"))?
            .iter()
            .filter_map(|p| {
                Some((
                    p["seq"].as_u64()?,
                    p["stable"].as_str()?.to_string(),
                    p["candidate"].as_str()?.to_string(),
                ))
            })
            .filter(|p| p.0 > figures.cursor)
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let similarities: Vec<Option<f64>> = match &sh.embeddings {
            Some(e) => {
                let inputs: Vec<String> = pairs
                    .iter()
                    .flat_map(|p| [p.1.clone(), p.2.clone()])
                    .collect();
                let vectors = slipway_core::embeddings::embed(client, e, &inputs).await?;
                vectors
                    .chunks(2)
                    .map(|v| slipway_domain::embeddings::cosine(&v[0], &v[1]))
                    .collect()
            }
            None => vec![None; pairs.len()],
        };
        read += pairs.len();
        for ((seq, stable, candidate), sim) in pairs.iter().zip(similarities) {
            figures.add(*seq, rollout::agree(stable, candidate), sim);
        }
    }
    Ok(())
}

async fn scrape(client: &reqwest::Client, url: &str) -> Result<Scrape, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(Scrape::parse(&text))
}

/// Each variant's counters and histograms between two scrapes.
fn windows(spec: &RolloutSpec, before: &Scrape, now: &Scrape) -> (Window, Window) {
    let mut counters = vec![spec.requests.clone()];
    let mut histograms = Vec::new();
    for m in &spec.analysis {
        match m.kind {
            MetricKind::Ratio => counters.extend(m.numerator.iter().chain(&m.denominator).cloned()),
            MetricKind::Latency => histograms.extend(m.histogram.iter().cloned()),
        }
    }
    let label = &spec.variant_label;
    let window = |variant: &str| {
        let mut w = Window::default();
        for c in &counters {
            let (b, a) = (
                before.sum_where(c, label, variant).unwrap_or(0.0),
                now.sum_where(c, label, variant).unwrap_or(0.0),
            );
            // A restarted service starts its counters again: what it counted since then.
            w.counters.insert(c.clone(), if a >= b { a - b } else { a });
        }
        for h in &histograms {
            let (b, a) = (
                before.buckets_where(h, label, variant),
                now.buckets_where(h, label, variant),
            );
            let reset = a.last().map_or(0.0, |x| x.1) < b.last().map_or(0.0, |x| x.1);
            let delta = a
                .iter()
                .map(|(le, n)| {
                    let old = if reset {
                        0.0
                    } else {
                        b.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1)
                    };
                    (*le, (n - old).max(0.0))
                })
                .collect();
            w.histograms.insert(h.clone(), delta);
        }
        w
    };
    (window(STABLE), window(CANDIDATE))
}

/// A look when the metrics cannot be read: nothing is judged; held past the step's limit, the
/// rollout aborts (a candidate nobody can see is not promoted).
fn unavailable(at: StepAt, error: &str, now: DateTime<Utc>) -> rollout::Look {
    let limit = at.duration_secs + at.max_hold_secs;
    let decision = if at.elapsed_secs >= limit {
        StepDecision::Abort(format!(
            "metrics unavailable for the step's {limit}s: {error}"
        ))
    } else {
        StepDecision::Hold(format!("metrics unavailable: {error}"))
    };
    let (name, reason) = match &decision {
        StepDecision::Abort(r) => ("abort", r.clone()),
        StepDecision::Hold(r) => ("hold", r.clone()),
        StepDecision::Promote => unreachable!("never promoted without metrics"),
    };
    rollout::Look {
        analysis: RolloutAnalysis {
            stage: String::new(),
            attempt: 0,
            step: at.step,
            weight: at.weight,
            elapsed_secs: at.elapsed_secs,
            requests: [0.0, 0.0],
            comparisons: Vec::new(),
            score: None,
            ab: None,
            shadow: None,
            decision: name.into(),
            reason,
            at: now,
        },
        decision,
        winner: None,
        ab_p: at.ab_p,
    }
}
