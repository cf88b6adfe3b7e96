//! The statistics the quality gates use to tell a real regression from noise.
//!
//! - [`mcnemar`]: paired per-item correctness (candidate vs baseline on the same items);
//!   exact binomial for fewer than 25 discordant pairs, chi-square with continuity correction
//!   otherwise.
//! - [`mann_whitney_u`]: two independent samples (latencies), normal approximation with tie and
//!   continuity corrections.
//! - [`paired_bootstrap_mean`], [`bootstrap_quantile_diff`]: percentile bootstrap intervals with
//!   a seeded generator, so a verdict is reproducible.
//!
//! Definitions and formulas are in `docs/gates.md`.

/// A small, seeded, reproducible generator (SplitMix64): verdicts must not depend on luck.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A seed from text (e.g. a run id), so the same run always draws the same samples.
    pub fn from_text(text: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The complementary error function (Numerical Recipes' `erfcc`, fractional error < 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Two-sided p-value of a standard normal statistic.
pub fn normal_two_sided_p(z: f64) -> f64 {
    erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0)
}

/// Upper-tail p-value of a chi-square statistic with one degree of freedom.
pub fn chi2_1_p(chi2: f64) -> f64 {
    if chi2 <= 0.0 {
        return 1.0;
    }
    erfc((chi2 / 2.0).sqrt()).min(1.0)
}

/// The result of a paired test on per-item correctness.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct McNemar {
    /// Items the baseline got right and the candidate wrong.
    pub b: u64,
    /// Items the candidate got right and the baseline wrong.
    pub c: u64,
    /// The chi-square statistic (with continuity correction), when that form was used.
    pub chi2: Option<f64>,
    pub p_value: f64,
}

/// McNemar's test on discordant pairs `b` (baseline right, candidate wrong) and `c` (candidate
/// right, baseline wrong).
pub fn mcnemar(b: u64, c: u64) -> McNemar {
    let n = b + c;
    if n == 0 {
        return McNemar {
            b,
            c,
            chi2: None,
            p_value: 1.0,
        };
    }
    if n < 25 {
        // Exact: two-sided binomial tail with p = 1/2.
        let k = b.min(c);
        let mut tail = 0.0;
        for i in 0..=k {
            tail += binomial(n, i) * 0.5f64.powi(n as i32);
        }
        return McNemar {
            b,
            c,
            chi2: None,
            p_value: (2.0 * tail).min(1.0),
        };
    }
    let diff = (b as f64 - c as f64).abs() - 1.0;
    let chi2 = diff.max(0.0).powi(2) / n as f64;
    McNemar {
        b,
        c,
        chi2: Some(chi2),
        p_value: chi2_1_p(chi2),
    }
}

fn binomial(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// The result of a Mann–Whitney U test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of the first sample (the number of pairs where it is larger, ties counting one half).
    pub u1: f64,
    pub u2: f64,
    pub z: f64,
    pub p_value: f64,
}

/// Mann–Whitney U test of two independent samples (two-sided, normal approximation with tie
/// and continuity corrections).
///
/// # Panics
/// When a sample is empty.
pub fn mann_whitney_u(x: &[f64], y: &[f64]) -> MannWhitney {
    assert!(!x.is_empty() && !y.is_empty(), "both samples need values");
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    let mut all: Vec<(f64, bool)> = x
        .iter()
        .map(|v| (*v, true))
        .chain(y.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = all.len();
    let mut r1 = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        // Midrank of ranks i+1 ..= j+1.
        let rank = (i + j + 2) as f64 / 2.0;
        for item in &all[i..=j] {
            if item.1 {
                r1 += rank;
            }
        }
        tie_term += t * t * t - t;
        i = j + 1;
    }
    let u1 = r1 - n1 * (n1 + 1.0) / 2.0;
    let u2 = n1 * n2 - u1;
    let mean = n1 * n2 / 2.0;
    let nn = n1 + n2;
    let var = n1 * n2 / 12.0 * ((nn + 1.0) - tie_term / (nn * (nn - 1.0)));
    let z = if var <= 0.0 {
        0.0
    } else {
        let d = (u1 - mean).abs() - 0.5;
        d.max(0.0) / var.sqrt() * (u1 - mean).signum()
    };
    MannWhitney {
        u1,
        u2,
        z,
        p_value: normal_two_sided_p(z),
    }
}

/// The `q` quantile (0..=1) of a sample, by linear interpolation between order statistics.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Two-sided p-value of the paired sign-flip (randomization) test that the differences `d` are
/// centred on zero: under that null each difference is as likely negated, so the size of their
/// sum is compared with that of `rounds` random negations (`(1 + as large) / (1 + rounds)`,
/// never 0). Exact for differences of two evaluations asked the same number of times.
pub fn sign_flip(d: &[f64], rounds: u32, rng: &mut Rng) -> f64 {
    // Zeros are the same negated: only the others move the sum.
    let moving: Vec<f64> = d.iter().copied().filter(|x| *x != 0.0).collect();
    if moving.is_empty() {
        return 1.0;
    }
    let observed = moving.iter().sum::<f64>().abs();
    let mut as_large = 0u32;
    for _ in 0..rounds {
        let mut sum = 0.0;
        let mut bits = 0u64;
        for (i, x) in moving.iter().enumerate() {
            if i % 64 == 0 {
                bits = rng.next_u64();
            }
            sum += if bits & 1 == 1 { *x } else { -*x };
            bits >>= 1;
        }
        // A hair of tolerance: sums of the same terms in another order may differ in the last bit.
        if sum.abs() >= observed - 1e-9 {
            as_large += 1;
        }
    }
    f64::from(as_large + 1) / f64::from(rounds + 1)
}

/// Percentile-bootstrap interval `(level)` of the mean of paired differences
/// `candidate[i] - baseline[i]`.
pub fn paired_bootstrap_mean(
    candidate: &[f64],
    baseline: &[f64],
    resamples: usize,
    level: f64,
    rng: &mut Rng,
) -> Option<[f64; 2]> {
    let d: Vec<f64> = candidate.iter().zip(baseline).map(|(c, b)| c - b).collect();
    if d.is_empty() {
        return None;
    }
    let mut means = Vec::with_capacity(resamples);
    for _ in 0..resamples.max(1) {
        let s: f64 = (0..d.len()).map(|_| d[rng.below(d.len())]).sum();
        means.push(s / d.len() as f64);
    }
    let alpha = (1.0 - level) / 2.0;
    Some([quantile(&means, alpha)?, quantile(&means, 1.0 - alpha)?])
}

/// Percentile-bootstrap interval of `quantile_q(candidate) - quantile_q(baseline)`, each sample
/// resampled on its own.
pub fn bootstrap_quantile_diff(
    candidate: &[f64],
    baseline: &[f64],
    q: f64,
    resamples: usize,
    level: f64,
    rng: &mut Rng,
) -> Option<[f64; 2]> {
    if candidate.is_empty() || baseline.is_empty() {
        return None;
    }
    let mut diffs = Vec::with_capacity(resamples);
    let mut buf_c = vec![0.0; candidate.len()];
    let mut buf_b = vec![0.0; baseline.len()];
    for _ in 0..resamples.max(1) {
        for v in buf_c.iter_mut() {
            *v = candidate[rng.below(candidate.len())];
        }
        for v in buf_b.iter_mut() {
            *v = baseline[rng.below(baseline.len())];
        }
        diffs.push(quantile(&buf_c, q)? - quantile(&buf_b, q)?);
    }
    let alpha = (1.0 - level) / 2.0;
    Some([quantile(&diffs, alpha)?, quantile(&diffs, 1.0 - alpha)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn the_sign_flip_test_matches_the_exact_sign_test() {
        let mut rng = Rng::new(7);
        // Ten equal losses: exactly 2 of the 1024 sign patterns are as extreme, p = 0.00195.
        let p = sign_flip(&[1.0; 10], 20_000, &mut rng);
        assert!((p - 2.0 / 1024.0).abs() < 0.001, "{p}");
        // Balanced differences are no evidence; neither is no difference.
        assert_eq!(sign_flip(&[0.5, -0.5, 1.0, -1.0], 1000, &mut rng), 1.0);
        assert_eq!(sign_flip(&[0.0; 5], 1000, &mut rng), 1.0);
        // Five losses of one answer in three among 200 items: the exact two-sided p is 1/16.
        let mut d = vec![0.0; 195];
        d.extend([-1.0 / 3.0; 5]);
        let p = sign_flip(&d, 20_000, &mut rng);
        assert!((p - 0.0625).abs() < 0.01, "{p}");
    }

    #[test]
    fn normal_and_chi_square_tails() {
        // Standard tables: P(|Z| > 1.96) = 0.0500, P(|Z| > 2.5758) = 0.0100.
        assert!(close(normal_two_sided_p(1.959_964), 0.05, 1e-5));
        assert!(close(normal_two_sided_p(2.575_829), 0.01, 1e-5));
        // chi-square(1) critical value 3.841459 at 0.05.
        assert!(close(chi2_1_p(3.841_459), 0.05, 1e-5));
        assert!(close(erfc(0.0), 1.0, 1e-7));
    }

    #[test]
    fn mcnemar_reference_values() {
        // Textbook example (Agresti, presidential approval ratings: b = 150, c = 86):
        // chi2 without correction 17.36; with continuity correction (|150-86|-1)^2/236 = 16.82,
        // p = 4.1e-5.
        let m = mcnemar(150, 86);
        assert!(close(m.chi2.unwrap(), 16.817, 1e-3), "{m:?}");
        assert!(close(m.p_value, 4.115e-5, 2e-6), "{m:?}");
        // Exact: b = 0, c = 8 gives 2 * 0.5^8 = 0.0078125.
        assert!(close(mcnemar(0, 8).p_value, 0.0078125, 1e-12));
        // b = 2, c = 10: 2 * sum_{i<=2} C(12, i) / 2^12 = 2 * 79 / 4096 = 0.03857.
        assert!(close(mcnemar(2, 10).p_value, 158.0 / 4096.0, 1e-12));
        assert_eq!(mcnemar(0, 0).p_value, 1.0);
        assert_eq!(mcnemar(5, 5).p_value, 1.0);
    }

    #[test]
    fn mann_whitney_reference_values() {
        // A classic worked example: x = {19, 22, 16, 29, 24}, y = {20, 11, 17, 12}:
        // U_x = 17, U_y = 3.
        let r = mann_whitney_u(&[19.0, 22.0, 16.0, 29.0, 24.0], &[20.0, 11.0, 17.0, 12.0]);
        assert_eq!((r.u1, r.u2), (17.0, 3.0));
        // Normal approximation with continuity correction: z = (17 - 10 - 0.5) / sqrt(20*10/12)
        // = 6.5 / 4.0825 = 1.592, p = 0.111.
        assert!(close(r.z, 1.5922, 1e-3), "{r:?}");
        assert!(close(r.p_value, 0.1113, 1e-3), "{r:?}");
        // Identical samples: no difference.
        let same = mann_whitney_u(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        assert_eq!(same.u1, 4.5);
        assert!(same.p_value > 0.99);
        // Completely separated large samples: tiny p.
        let a: Vec<f64> = (0..50).map(f64::from).collect();
        let b: Vec<f64> = (100..150).map(f64::from).collect();
        let r = mann_whitney_u(&a, &b);
        assert_eq!(r.u1, 0.0);
        assert!(r.p_value < 1e-15, "{r:?}");
    }

    #[test]
    fn bootstrap_known_answers() {
        let mut rng = Rng::new(7);
        // Every paired difference is exactly 0.25: the interval is that point.
        let c = [1.0, 0.75, 0.5, 1.25];
        let b = [0.75, 0.5, 0.25, 1.0];
        let iv = paired_bootstrap_mean(&c, &b, 1000, 0.95, &mut rng).unwrap();
        assert!(
            close(iv[0], 0.25, 1e-12) && close(iv[1], 0.25, 1e-12),
            "{iv:?}"
        );
        // Half the differences 0, half 1 (n = 400): the mean's interval is about
        // 0.5 +- 1.96 * sqrt(0.25 / 400) = [0.451, 0.549].
        let c: Vec<f64> = (0..400).map(|i| f64::from(i % 2)).collect();
        let b = vec![0.0; 400];
        let iv = paired_bootstrap_mean(&c, &b, 4000, 0.95, &mut rng).unwrap();
        assert!(
            close(iv[0], 0.451, 0.012) && close(iv[1], 0.549, 0.012),
            "{iv:?}"
        );
        // A constant shift of 10 between samples: the p95 difference is 10.
        let base: Vec<f64> = (0..200).map(f64::from).collect();
        let cand: Vec<f64> = base.iter().map(|v| v + 10.0).collect();
        let iv = bootstrap_quantile_diff(&cand, &base, 0.95, 2000, 0.95, &mut rng).unwrap();
        assert!(
            iv[0] > 0.0 && iv[0] <= 10.0 + 1e-9 && iv[1] >= 10.0 - 1e-9,
            "{iv:?}"
        );
    }

    #[test]
    fn quantiles_and_seeds() {
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.5));
        assert_eq!(quantile(&[5.0], 0.99), Some(5.0));
        assert_eq!(quantile(&[], 0.5), None);
        let (mut a, mut b) = (Rng::from_text("run-1"), Rng::from_text("run-1"));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(
            Rng::from_text("run-1").next_u64(),
            Rng::from_text("run-2").next_u64()
        );
    }
}
