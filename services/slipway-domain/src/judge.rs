//! The rollout judge's statistics and decisions: pure functions of the figures two variants
//! (the version in service, `stable`, and the `candidate`) showed over the same window, so
//! every decision can be made again from the figures the log records.
//!
//! - Ratio metrics (errors / requests, positive feedback / feedback) are compared as two
//!   proportions: the candidate fails when it is worse by more than the tolerance with
//!   confidence `1 - alpha` (a one-sided z-test of the difference against the tolerance).
//! - Latency is compared on the services' Prometheus histograms: a Mann-Whitney test on the
//!   bucket counts (each bucket a group of ties) says whether the candidate is slower at all,
//!   and the quantile read from the buckets says by how much; it fails when both hold.
//! - A canary step is scored like Kayenta: the share of metrics that pass; enough requests per
//!   variant before anything is judged; promote, hold or abort.
//! - An A/B experiment uses a mixture sequential probability ratio test (mSPRT, Johari et al.,
//!   "Always valid inference", 2017) on the difference of two proportions: its p-value stays
//!   valid however often it is looked at, so the experiment stops as soon as it is decided.

use serde::{Deserialize, Serialize};

use crate::stats::{erfc, normal_two_sided_p};

/// Events over a total, as two Prometheus counters give them (`hits` of `total`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Count {
    pub hits: f64,
    pub total: f64,
}

impl Count {
    pub fn new(hits: f64, total: f64) -> Self {
        Self { hits, total }
    }

    /// The ratio, when there is a total.
    pub fn ratio(self) -> Option<f64> {
        (self.total > 0.0).then(|| self.hits / self.total)
    }
}

/// Which way a metric gets worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Worse {
    /// Errors, latency: more is worse.
    Higher,
    /// Positive feedback, success: less is worse.
    Lower,
}

/// Upper-tail probability of a standard normal statistic.
fn normal_upper_p(z: f64) -> f64 {
    (0.5 * erfc(z / std::f64::consts::SQRT_2)).clamp(0.0, 1.0)
}

/// A comparison of two proportions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportions {
    pub stable: f64,
    pub candidate: f64,
    /// How much worse the candidate is (positive: worse), in the ratio's own units.
    pub worse_by: f64,
    pub z: f64,
    /// One-sided p-value that the candidate is worse by more than the tolerance.
    pub p_value: f64,
}

/// Whether the candidate's proportion is worse than the stable's by more than `tolerance` (in
/// the ratio's units: 0.01 is one point): a one-sided z-test of the difference against the
/// tolerance, with the unpooled standard error. `None` without requests on both sides.
pub fn proportions(
    stable: Count,
    candidate: Count,
    worse: Worse,
    tolerance: f64,
) -> Option<Proportions> {
    let (ps, pc) = (stable.ratio()?, candidate.ratio()?);
    let worse_by = match worse {
        Worse::Higher => pc - ps,
        Worse::Lower => ps - pc,
    };
    let var = ps * (1.0 - ps) / stable.total + pc * (1.0 - pc) / candidate.total;
    // Both at 0 or 1: no spread to test against; worse by more than the tolerance is then
    // certain or impossible.
    let (z, p_value) = if var <= 0.0 {
        let beyond = worse_by > tolerance;
        (
            if beyond { f64::INFINITY } else { 0.0 },
            if beyond { 0.0 } else { 1.0 },
        )
    } else {
        let z = (worse_by - tolerance) / var.sqrt();
        (z, normal_upper_p(z))
    };
    Some(Proportions {
        stable: ps,
        candidate: pc,
        worse_by,
        z,
        p_value,
    })
}

/// The pooled two-proportion z statistic of the candidate against the stable (positive: the
/// candidate's proportion is higher) and its two-sided p-value: the textbook test, for
/// reports.
pub fn pooled_z(stable: Count, candidate: Count) -> Option<(f64, f64)> {
    let (ps, pc) = (stable.ratio()?, candidate.ratio()?);
    let p = (stable.hits + candidate.hits) / (stable.total + candidate.total);
    let se = (p * (1.0 - p) * (1.0 / stable.total + 1.0 / candidate.total)).sqrt();
    (se > 0.0).then(|| {
        let z = (pc - ps) / se;
        (z, normal_two_sided_p(z))
    })
}

/// A Prometheus histogram: cumulative counts by upper bound (`le`), ascending, the last
/// bound `+Inf`.
pub type Buckets = [(f64, f64)];

/// The counts in each bucket (not cumulative), clamped at 0 (a counter reset between scrapes
/// can make a difference negative).
fn per_bucket(buckets: &Buckets) -> Vec<f64> {
    let mut last = 0.0;
    buckets
        .iter()
        .map(|(_, c)| {
            let n = (c - last).max(0.0);
            last = last.max(*c);
            n
        })
        .collect()
}

/// The `q` quantile (0..=1) of a histogram, interpolated within its bucket as Prometheus'
/// `histogram_quantile` does (the first bucket from 0; a quantile in `+Inf` is the highest
/// finite bound).
pub fn histogram_quantile(buckets: &Buckets, q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let share = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// A latency comparison on two histograms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// The compared quantile of each.
    pub stable: f64,
    pub candidate: f64,
    /// The candidate's quantile over the stable's, minus one (0.2: 20% slower).
    pub increase: f64,
    /// Mann-Whitney on the bucket counts: z (positive: the candidate is slower) and the
    /// one-sided p-value that it is slower.
    pub z: f64,
    pub p_value: f64,
}

/// Mann-Whitney U on two histograms with the same bounds (each bucket a group of ties, ranked
/// at its midrank): z of the candidate (positive: its values are larger) with the tie
/// correction. `None` when either is empty or the bounds differ.
pub fn mann_whitney_histograms(stable: &Buckets, candidate: &Buckets) -> Option<f64> {
    if stable.len() != candidate.len() || stable.iter().zip(candidate).any(|(a, b)| a.0 != b.0) {
        return None;
    }
    let (s, c) = (per_bucket(stable), per_bucket(candidate));
    let (n1, n2) = (c.iter().sum::<f64>(), s.iter().sum::<f64>());
    if n1 <= 0.0 || n2 <= 0.0 {
        return None;
    }
    let (mut below, mut rank_sum, mut ties) = (0.0, 0.0, 0.0);
    for (cs, ss) in c.iter().zip(&s) {
        let t = cs + ss;
        let midrank = below + (t + 1.0) / 2.0;
        rank_sum += cs * midrank;
        ties += t * t * t - t;
        below += t;
    }
    let u = rank_sum - n1 * (n1 + 1.0) / 2.0;
    let n = n1 + n2;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return Some(0.0);
    }
    let d = u - n1 * n2 / 2.0;
    // Continuity correction toward 0.
    Some((d.abs() - 0.5).max(0.0).copysign(d) / var.sqrt())
}

/// Whether the candidate is slower: the `q` quantiles of both histograms and a Mann-Whitney
/// test of a shift. `None` when either histogram is empty or their bounds differ.
pub fn latency(stable: &Buckets, candidate: &Buckets, q: f64) -> Option<Latency> {
    let z = mann_whitney_histograms(stable, candidate)?;
    let (s, c) = (
        histogram_quantile(stable, q)?,
        histogram_quantile(candidate, q)?,
    );
    let increase = if s > 0.0 {
        c / s - 1.0
    } else if c > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    Some(Latency {
        stable: s,
        candidate: c,
        increase,
        z,
        p_value: normal_upper_p(z),
    })
}

/// What one metric of a step says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// Worse beyond its tolerance, and significantly so.
    Fail,
    /// Not enough to judge (no requests, no histogram).
    NoData,
}

/// The verdict of a comparison: it fails when the candidate is worse by more than the
/// tolerance (`beyond`) with confidence `1 - alpha`.
pub fn verdict(beyond: bool, p_value: f64, alpha: f64) -> Verdict {
    if beyond && p_value < alpha {
        Verdict::Fail
    } else {
        Verdict::Pass
    }
}

/// What a canary step decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", content = "reason", rename_all = "snake_case")]
pub enum StepDecision {
    /// On to the next weight (or to 100%).
    Promote,
    /// Keep the weight and observe on.
    Hold(String),
    /// Weight back to 0, the candidate rolled back.
    Abort(String),
}

/// How a step is scored (Kayenta's "pass" and "marginal" scores, out of 100).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scoring {
    pub pass: f64,
    pub marginal: f64,
}

impl Default for Scoring {
    fn default() -> Self {
        Self {
            pass: 95.0,
            marginal: 75.0,
        }
    }
}

/// The score of a step: the share of judged metrics that pass, out of 100 (`None` when none
/// could be judged).
pub fn score(verdicts: &[Verdict]) -> Option<f64> {
    let judged: Vec<&Verdict> = verdicts.iter().filter(|v| **v != Verdict::NoData).collect();
    (!judged.is_empty()).then(|| {
        100.0 * judged.iter().filter(|v| ***v == Verdict::Pass).count() as f64 / judged.len() as f64
    })
}

/// A step's decision from its metrics' verdicts.
///
/// - Fewer than `min_requests` on either variant, or a metric without data: hold (nothing is
///   judged on too little).
/// - A score below `marginal`: abort at once, whether or not the step's time is up (a bad
///   candidate is taken out as soon as it is seen).
/// - Once the step's time is up (`elapsed`): promote at `pass` or above; between `marginal`
///   and `pass`, hold (observe on; the caller aborts when a step has held too long).
pub fn decide_step(
    verdicts: &[Verdict],
    requests: (f64, f64),
    min_requests: f64,
    elapsed: bool,
    scoring: Scoring,
) -> StepDecision {
    let (stable, candidate) = requests;
    if stable < min_requests || candidate < min_requests {
        return StepDecision::Hold(format!(
            "{} requests to the stable and {} to the candidate; {} each are needed before a step is judged",
            stable, candidate, min_requests
        ));
    }
    if verdicts.contains(&Verdict::NoData) {
        return StepDecision::Hold("a metric has no data for both variants yet".into());
    }
    let Some(s) = score(verdicts) else {
        return StepDecision::Hold("no metric to judge".into());
    };
    if s < scoring.marginal {
        return StepDecision::Abort(format!(
            "score {s:.0} is below the marginal score {:.0}",
            scoring.marginal
        ));
    }
    if !elapsed {
        return StepDecision::Hold("the step is still observed".into());
    }
    if s >= scoring.pass {
        StepDecision::Promote
    } else {
        StepDecision::Hold(format!(
            "score {s:.0} is between the marginal {:.0} and the pass {:.0} scores",
            scoring.marginal, scoring.pass
        ))
    }
}

/// One look at an A/B experiment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AbLook {
    /// The candidate's proportion minus the stable's.
    pub effect: f64,
    /// The always-valid confidence interval of `effect` at level `1 - alpha`.
    pub interval: [f64; 2],
    /// The always-valid p-value (the smallest of this look's and every earlier one's).
    pub p_value: f64,
    pub decided: Option<AbWinner>,
}

/// Which variant an A/B experiment found better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbWinner {
    Stable,
    Candidate,
}

/// The mixing scale of the mSPRT for a minimum detectable effect: the normal mixture over
/// effects is centred on those the experiment is meant to see.
pub fn mixing_tau(minimum_detectable_effect: f64) -> f64 {
    minimum_detectable_effect.abs().max(1e-9)
}

/// A look at an A/B experiment on a proportion where `better` says which way is better:
/// the mSPRT with a normal mixture `N(0, tau^2)` over the difference of the proportions
/// (normal approximation, variance estimated from the data); `previous_p` is the always-valid
/// p-value of the looks before (1 at the first). Decided when the p-value is at most
/// `alpha`: the better variant wins. `None` without data on both sides.
pub fn ab_look(
    stable: Count,
    candidate: Count,
    better: Worse,
    tau: f64,
    alpha: f64,
    previous_p: f64,
) -> Option<AbLook> {
    let (ps, pc) = (stable.ratio()?, candidate.ratio()?);
    let effect = pc - ps;
    let var = ps * (1.0 - ps) / stable.total + pc * (1.0 - pc) / candidate.total;
    if var <= 0.0 {
        return Some(AbLook {
            effect,
            interval: [effect, effect],
            p_value: previous_p.min(1.0),
            decided: None,
        });
    }
    let t2 = tau * tau;
    // The mixture likelihood ratio against no difference, in logs (it overflows otherwise).
    let log_lambda =
        0.5 * (var / (var + t2)).ln() + t2 * effect * effect / (2.0 * var * (var + t2));
    let p_value = previous_p.min((-log_lambda).exp()).min(1.0);
    let half =
        (var * (var + t2) / t2 * (2.0 * (1.0 / alpha).ln() + ((var + t2) / var).ln())).sqrt();
    let decided = (p_value <= alpha).then(|| {
        // `better` names the direction in which a higher proportion is worse or better.
        let candidate_higher = effect > 0.0;
        match (better, candidate_higher) {
            (Worse::Lower, true) | (Worse::Higher, false) => AbWinner::Candidate,
            _ => AbWinner::Stable,
        }
    });
    Some(AbLook {
        effect,
        interval: [effect - half, effect + half],
        p_value,
        decided,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Rng, mann_whitney_u};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    // Reference values below were computed independently with Python's standard library
    // (`math.erfc`, `math.log`), from the textbook formulas.

    #[test]
    fn proportions_match_reference_values() {
        // Pooled z of 50/1000 against 80/1000: z = 2.721095, one-sided p = 0.0032533.
        let (z, p) = pooled_z(Count::new(50.0, 1000.0), Count::new(80.0, 1000.0)).unwrap();
        assert!(close(z, 2.721_095, 1e-5), "{z}");
        assert!(close(p / 2.0, 0.003_253_3, 1e-6), "{p}");
        // 30/2000 against 36/2000: z = 0.744718, one-sided p = 0.228221.
        let (z, p) = pooled_z(Count::new(30.0, 2000.0), Count::new(36.0, 2000.0)).unwrap();
        assert!(close(z, 0.744_718, 1e-5), "{z}");
        assert!(close(p / 2.0, 0.228_221, 1e-5), "{p}");
    }

    #[test]
    fn a_candidate_fails_only_when_worse_beyond_its_tolerance_with_confidence() {
        let stable = Count::new(50.0, 10_000.0); // 0.5% errors
        // 3% errors: worse by 2.5 points, far beyond a 1-point tolerance.
        let bad = proportions(stable, Count::new(300.0, 10_000.0), Worse::Higher, 0.01).unwrap();
        assert!(close(bad.worse_by, 0.025, 1e-12));
        assert_eq!(
            verdict(bad.worse_by > 0.01, bad.p_value, 0.05),
            Verdict::Fail
        );
        // 0.8% errors: worse, but within the tolerance.
        let ok = proportions(stable, Count::new(80.0, 10_000.0), Worse::Higher, 0.01).unwrap();
        assert_eq!(verdict(ok.worse_by > 0.01, ok.p_value, 0.05), Verdict::Pass);
        // 2% errors on 50 requests: beyond the tolerance but not significantly so.
        let thin = proportions(stable, Count::new(1.0, 50.0), Worse::Higher, 0.01).unwrap();
        assert!(thin.worse_by > 0.01);
        assert_eq!(verdict(true, thin.p_value, 0.05), Verdict::Pass);
        // Feedback: fewer positive answers is worse.
        let liked = proportions(
            Count::new(800.0, 1000.0),
            Count::new(600.0, 1000.0),
            Worse::Lower,
            0.05,
        )
        .unwrap();
        assert!(close(liked.worse_by, 0.2, 1e-12));
        assert!(liked.p_value < 1e-6);
        assert!(proportions(stable, Count::new(0.0, 0.0), Worse::Higher, 0.0).is_none());
    }

    /// Cumulative buckets from per-bucket counts.
    fn hist(bounds: &[f64], counts: &[f64]) -> Vec<(f64, f64)> {
        let mut total = 0.0;
        bounds
            .iter()
            .zip(counts)
            .map(|(b, c)| {
                total += c;
                (*b, total)
            })
            .collect()
    }

    #[test]
    fn mann_whitney_on_buckets_equals_the_test_on_the_values_they_hold() {
        let bounds = [0.05, 0.1, 0.25, 0.5, f64::INFINITY];
        let (s, c) = ([10.0, 20.0, 15.0, 4.0, 1.0], [4.0, 12.0, 20.0, 10.0, 4.0]);
        // The same data as values, one per request, at each bucket's bound (ties within).
        let values = |counts: &[f64]| -> Vec<f64> {
            counts
                .iter()
                .zip(bounds)
                .flat_map(|(n, b)| std::iter::repeat_n(b.min(1.0), *n as usize))
                .collect()
        };
        let z = mann_whitney_histograms(&hist(&bounds, &s), &hist(&bounds, &c)).unwrap();
        let reference = mann_whitney_u(&values(&c), &values(&s));
        assert!(close(z, reference.z, 1e-9), "{z} vs {}", reference.z);
        assert!(z > 2.0, "the candidate is slower: {z}");
        // Different bounds cannot be compared.
        assert!(
            mann_whitney_histograms(&hist(&bounds, &s), &hist(&[0.1, 1.0], &[1.0, 1.0])).is_none()
        );
    }

    #[test]
    fn quantiles_are_read_from_buckets_as_prometheus_does() {
        let h = hist(&[0.1, 0.2, 0.4, f64::INFINITY], &[50.0, 30.0, 20.0, 0.0]);
        // The median is the 50th of 100: the end of the first bucket.
        assert!(close(histogram_quantile(&h, 0.5).unwrap(), 0.1, 1e-12));
        // 0.9: 10 of the 20 in (0.2, 0.4]: halfway.
        assert!(close(histogram_quantile(&h, 0.9).unwrap(), 0.3, 1e-12));
        let slow = hist(&[0.1, 0.2, 0.4, f64::INFINITY], &[0.0, 0.0, 10.0, 10.0]);
        assert!(close(histogram_quantile(&slow, 0.99).unwrap(), 0.4, 1e-12));
        assert_eq!(histogram_quantile(&hist(&[1.0], &[0.0]), 0.5), None);
        let l = latency(&h, &slow, 0.5).unwrap();
        assert!(l.increase > 2.0 && l.p_value < 1e-6, "{l:?}");
    }

    #[test]
    fn a_step_promotes_holds_or_aborts() {
        let s = Scoring::default();
        let (pass, fail) = (Verdict::Pass, Verdict::Fail);
        let enough = (500.0, 500.0);
        assert_eq!(
            decide_step(&[pass, pass], enough, 100.0, true, s),
            StepDecision::Promote
        );
        // Too few requests: nothing is judged, even a failing metric.
        assert!(matches!(
            decide_step(&[fail], (500.0, 20.0), 100.0, true, s),
            StepDecision::Hold(r) if r.contains("20 to the candidate")
        ));
        // A failing metric of two (score 50): abort before the step's time is up.
        assert!(matches!(
            decide_step(&[pass, fail], enough, 100.0, false, s),
            StepDecision::Abort(r) if r.contains("score 50")
        ));
        // Passing but still observed: hold.
        assert!(matches!(
            decide_step(&[pass, pass], enough, 100.0, false, s),
            StepDecision::Hold(_)
        ));
        // Four of five (80): marginal, hold once the time is up.
        let marginal = [pass, pass, pass, pass, fail];
        assert!(matches!(
            decide_step(&marginal, enough, 100.0, true, s),
            StepDecision::Hold(r) if r.contains("score 80")
        ));
        assert!(matches!(
            decide_step(&[pass, Verdict::NoData], enough, 100.0, true, s),
            StepDecision::Hold(_)
        ));
    }

    #[test]
    fn the_sequential_test_matches_reference_values() {
        // 100/1000 against 140/1000, tau 0.03: Lambda = 9.488568, p = 0.105390; the 95%
        // always-valid interval (-0.004577, 0.084577).
        let look = ab_look(
            Count::new(100.0, 1000.0),
            Count::new(140.0, 1000.0),
            Worse::Lower,
            0.03,
            0.05,
            1.0,
        )
        .unwrap();
        assert!(close(look.p_value, 0.105_390, 1e-6), "{look:?}");
        assert!(close(look.interval[0], -0.004_577, 1e-6), "{look:?}");
        assert!(close(look.interval[1], 0.084_577, 1e-6), "{look:?}");
        assert_eq!(look.decided, None);
        // The p-value never rises again: an earlier look's smaller one stands.
        let later = ab_look(
            Count::new(100.0, 1000.0),
            Count::new(100.0, 1000.0),
            Worse::Lower,
            0.03,
            0.05,
            0.07,
        )
        .unwrap();
        assert!(close(later.p_value, 0.07, 1e-12));
    }

    /// Bernoulli successes of `n` draws at `p`.
    fn draws(rng: &mut Rng, n: usize, p: f64) -> f64 {
        (0..n).filter(|_| rng.unit() < p).count() as f64
    }

    /// Runs an experiment looking every `every` requests per arm up to `max`; the winner if
    /// decided, with how many requests per arm it took.
    fn experiment(
        seed: u64,
        ps: f64,
        pc: f64,
        every: usize,
        max: usize,
    ) -> Option<(AbWinner, usize)> {
        let mut rng = Rng::new(seed);
        let (mut s, mut c, mut p) = (Count::new(0.0, 0.0), Count::new(0.0, 0.0), 1.0);
        let mut n = 0;
        while n < max {
            s.hits += draws(&mut rng, every, ps);
            c.hits += draws(&mut rng, every, pc);
            n += every;
            s.total = n as f64;
            c.total = n as f64;
            let look = ab_look(s, c, Worse::Lower, mixing_tau(0.02), 0.05, p).unwrap();
            p = look.p_value;
            if let Some(w) = look.decided {
                return Some((w, n));
            }
        }
        None
    }

    #[test]
    fn watched_after_every_batch_the_sequential_test_keeps_its_error_rate_and_finds_real_effects() {
        // A/A: the same 10% on both arms, looked at after every 200 requests per arm up to
        // 10,000 (50 looks): a fixed-horizon test looked at that often would be wrong far
        // more often than alpha; this one stays within it.
        let runs = 400;
        let wrong = (0..runs)
            .filter(|seed| experiment(*seed, 0.10, 0.10, 200, 10_000).is_some())
            .count();
        let rate = wrong as f64 / runs as f64;
        assert!(rate <= 0.05, "A/A decided in {wrong} of {runs}");
        // The same streams judged by the fixed-horizon z-test at every look.
        let naive = (0..runs)
            .filter(|seed| {
                let mut rng = Rng::new(*seed);
                let (mut s, mut c) = (Count::new(0.0, 0.0), Count::new(0.0, 0.0));
                (1..=50).any(|look| {
                    s.hits += draws(&mut rng, 200, 0.10);
                    c.hits += draws(&mut rng, 200, 0.10);
                    (s.total, c.total) = (f64::from(look * 200), f64::from(look * 200));
                    pooled_z(s, c).is_some_and(|(_, p)| p < 0.05)
                })
            })
            .count();
        assert!(
            naive as f64 / runs as f64 > 3.0 * 0.05,
            "peeking at a fixed-horizon test: {naive} of {runs}"
        );
        // A real effect (10% -> 13%) is found, for the candidate, most of the time.
        let found: Vec<_> = (0..100)
            .filter_map(|seed| experiment(1000 + seed, 0.10, 0.13, 200, 10_000))
            .collect();
        assert!(found.len() >= 90, "found {} of 100", found.len());
        assert!(found.iter().all(|(w, _)| *w == AbWinner::Candidate));
        let mut took: Vec<usize> = found.iter().map(|(_, n)| *n).collect();
        took.sort_unstable();
        assert!(took[took.len() / 2] < 10_000, "it stops early: {took:?}");
    }
}
