//! Checking a measured value against a [`Threshold`]: the verdict names the metric, the
//! candidate, the baseline, the delta and the bound that failed. Shared by the gates and the
//! monitor.

use crate::events::{Bounds, Check, Verdict};
use crate::spec::{Severity, Threshold};

/// Metrics where more is better; for every other metric less is better.
pub fn higher_is_better(metric: &str) -> bool {
    matches!(
        metric,
        "availability"
            | "exact_match"
            | "accuracy"
            | "f1"
            | "format_compliance"
            | "throughput_rps"
            | "semantic_similarity"
    )
}

/// Checks `value` (and its baseline, when known) against a threshold.
pub fn check(
    metric: &str,
    scope: Option<&str>,
    value: f64,
    baseline: Option<f64>,
    t: &Threshold,
) -> Check {
    let mut broken = Vec::new();
    if let Some(min) = t.min
        && value < min
    {
        broken.push(format!("{metric} {value:.4} < min {min:.4}"));
    }
    if let Some(max) = t.max
        && value > max
    {
        broken.push(format!("{metric} {value:.4} > max {max:.4}"));
    }
    let delta = baseline.map(|b| value - b);
    // How much worse than the baseline, in the metric's unit (positive = worse).
    let worse = delta.map(|d| if higher_is_better(metric) { -d } else { d });
    if let (Some(limit), Some(w)) = (t.max_regression, worse)
        && w > limit
    {
        broken.push(format!("{metric} regressed by {w:.4} > {limit:.4}"));
    }
    if let (Some(limit), Some(w), Some(b)) = (t.max_regression_pct, worse, baseline) {
        if b != 0.0 {
            let pct = 100.0 * w / b.abs();
            if pct > limit {
                broken.push(format!("{metric} regressed by {pct:.1}% > {limit:.1}%"));
            }
        } else if w > 0.0 {
            // From zero any worsening is an unbounded relative regression.
            broken.push(format!(
                "{metric} regressed from 0 to {value:.4} (unbounded %)"
            ));
        }
    }
    let verdict = if broken.is_empty() {
        Verdict::Pass
    } else if t.severity == Severity::Warn {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    let note = if broken.is_empty() {
        format!("{metric} {value:.4} within bounds")
    } else {
        broken.join("; ")
    };
    Check {
        metric: metric.to_string(),
        scope: scope.map(str::to_string),
        candidate: value,
        baseline,
        delta,
        p_value: None,
        interval: None,
        verdict,
        note,
        bounds: Some(bounds(value, baseline, worse, t)),
        detectable: None,
    }
}

/// The threshold's bounds and the headroom to the nearest: for each bound that applies, how
/// far the value is from breaking it (positive inside, negative beyond), and its share of the
/// bound's scale; the nearest is the one with the least share.
fn bounds(value: f64, baseline: Option<f64>, worse: Option<f64>, t: &Threshold) -> Bounds {
    let scale = |x: f64| if x.abs() > f64::EPSILON { x.abs() } else { 1.0 };
    let mut room: Vec<(&str, f64, f64)> = Vec::new();
    if let Some(min) = t.min {
        room.push(("min", value - min, (value - min) / scale(min)));
    }
    if let Some(max) = t.max {
        room.push(("max", max - value, (max - value) / scale(max)));
    }
    if let (Some(limit), Some(w), Some(b)) = (t.max_regression, worse, baseline) {
        room.push(("max_regression", limit - w, (limit - w) / scale(b)));
    }
    if let (Some(limit), Some(w), Some(b)) = (t.max_regression_pct, worse, baseline)
        && b != 0.0
    {
        let pct = 100.0 * w / b.abs();
        room.push(("max_regression_pct", limit - pct, (limit - pct) / 100.0));
    }
    let nearest = room
        .iter()
        .filter(|r| r.2.is_finite())
        .min_by(|a, b| a.2.total_cmp(&b.2));
    Bounds {
        min: t.min,
        max: t.max,
        max_regression: t.max_regression,
        max_regression_pct: t.max_regression_pct,
        nearest: nearest.map(|r| r.0.to_string()),
        margin: nearest.map(|r| r.1),
        margin_ratio: nearest.map(|r| r.2),
    }
}

/// The check a gate reports when the log holds no baseline: the bounds decide alone, and the
/// report says why.
pub fn no_baseline(scope: Option<&str>, bounds: &str) -> Check {
    Check {
        metric: "baseline".into(),
        scope: scope.map(str::to_string),
        candidate: 0.0,
        baseline: None,
        delta: None,
        p_value: None,
        interval: None,
        verdict: Verdict::Pass,
        note: format!(
            "no baseline in the log (first deployment): judged on absolute {bounds} alone"
        ),
        bounds: None,
        detectable: None,
    }
}

/// The worst verdict of a set of checks (`Pass` for none).
pub fn overall(checks: &[Check]) -> Verdict {
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if checks.iter().any(|c| c.verdict == Verdict::Warn) {
        Verdict::Warn
    } else {
        Verdict::Pass
    }
}

/// The gate's verdict, and when it fails, why: every failed check's note.
pub fn verdict_and_reason(checks: &[Check]) -> (Verdict, Option<String>) {
    let verdict = overall(checks);
    let reason = (verdict == Verdict::Fail).then(|| {
        checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.note.clone())
            .collect::<Vec<_>>()
            .join("; ")
    });
    (verdict, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(
        min: Option<f64>,
        max: Option<f64>,
        reg: Option<f64>,
        pct: Option<f64>,
        severity: Severity,
    ) -> Threshold {
        Threshold {
            min,
            max,
            max_regression: reg,
            max_regression_pct: pct,
            severity,
        }
    }

    #[test]
    fn bounds_and_regressions() {
        let c = check(
            "error_rate",
            None,
            0.05,
            None,
            &t(None, Some(0.01), None, None, Severity::Fail),
        );
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.note.contains("> max"), "{}", c.note);
        let c = check(
            "availability",
            None,
            0.999,
            None,
            &t(Some(0.99), None, None, None, Severity::Fail),
        );
        assert_eq!(c.verdict, Verdict::Pass);
        // Accuracy fell by 0.05 against a limit of 0.02: a regression, here only a warning.
        let c = check(
            "accuracy",
            None,
            0.80,
            Some(0.85),
            &t(None, None, Some(0.02), None, Severity::Warn),
        );
        assert_eq!(c.verdict, Verdict::Warn);
        // Latency 10% higher than the baseline with 5% allowed.
        let c = check(
            "p95_ms",
            None,
            110.0,
            Some(100.0),
            &t(None, None, None, Some(5.0), Severity::Fail),
        );
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.note.contains("10.0%"), "{}", c.note);
        // From a zero baseline, any worsening breaks a percentage bound.
        let c = check(
            "error_rate",
            None,
            0.2,
            Some(0.0),
            &t(None, None, None, Some(10.0), Severity::Fail),
        );
        assert_eq!(c.verdict, Verdict::Fail, "{}", c.note);
        // Latency that improved is no regression.
        let c = check(
            "p95_ms",
            None,
            90.0,
            Some(100.0),
            &t(None, None, None, Some(5.0), Severity::Fail),
        );
        assert_eq!(c.verdict, Verdict::Pass);
        assert_eq!(overall(&[]), Verdict::Pass);
        assert_eq!(verdict_and_reason(&[]), (Verdict::Pass, None));
        // A failed gate says why: each failed check's note, a warning's not.
        let warned = Check {
            verdict: Verdict::Warn,
            note: "close".into(),
            ..c.clone()
        };
        let failed = |note: &str| Check {
            verdict: Verdict::Fail,
            note: note.into(),
            ..c.clone()
        };
        assert_eq!(
            verdict_and_reason(&[failed("a"), warned.clone(), failed("b")]),
            (Verdict::Fail, Some("a; b".into()))
        );
        assert_eq!(verdict_and_reason(&[warned]), (Verdict::Warn, None));
    }

    #[test]
    fn a_check_names_its_bounds_and_the_headroom_to_the_nearest() {
        // 0.80 against a 0.75 minimum passes with 0.05 to spare, 6.7% of the bound.
        let c = check(
            "accuracy",
            None,
            0.80,
            None,
            &t(Some(0.75), None, None, None, Severity::Fail),
        );
        assert_eq!(c.verdict, Verdict::Pass);
        let b = c.bounds.unwrap();
        assert_eq!((b.min, b.nearest.as_deref()), (Some(0.75), Some("min")));
        assert!((b.margin.unwrap() - 0.05).abs() < 1e-9);
        assert!((b.margin_ratio.unwrap() - 0.05 / 0.75).abs() < 1e-9);
        // A regression bound nearer than the minimum is the nearest; broken is negative.
        let c = check(
            "accuracy",
            None,
            0.80,
            Some(0.84),
            &t(Some(0.5), None, Some(0.03), None, Severity::Fail),
        );
        let b = c.bounds.unwrap();
        assert_eq!(b.nearest.as_deref(), Some("max_regression"));
        assert!((b.margin.unwrap() + 0.01).abs() < 1e-9, "{b:?}");
        assert_eq!(c.verdict, Verdict::Fail);
        // Latency: less is better, the max is the bound.
        let c = check(
            "p95_ms",
            None,
            90.0,
            None,
            &t(None, Some(100.0), None, None, Severity::Fail),
        );
        let b = c.bounds.unwrap();
        assert_eq!(b.nearest.as_deref(), Some("max"));
        assert!((b.margin.unwrap() - 10.0).abs() < 1e-9);
    }
}
