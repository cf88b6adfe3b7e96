//! Semantic similarity of two texts: the cosine of their embeddings from an OpenAI-compatible
//! `/v1/embeddings` endpoint. Used by the model evaluation (answer against reference) and by
//! shadow rollouts (the candidate's answer against the stable one's).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An OpenAI-compatible embeddings endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EmbeddingsSpec {
    /// The API's base URL (`.../v1`); `/embeddings` is appended.
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key, if the endpoint needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

impl EmbeddingsSpec {
    /// The endpoint's URL.
    pub fn url(&self) -> String {
        format!("{}/embeddings", self.base_url.trim_end_matches('/'))
    }
}

/// The cosine of two vectors: 1 for the same direction; `None` when either is zero or their
/// lengths differ.
pub fn cosine(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let (mut dot, mut na, mut nb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    (na > 0.0 && nb > 0.0).then(|| (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0))
}

/// A mean and its normal-approximation confidence interval at `z` (1.96: 95%), from the count,
/// sum and sum of squares (what a look keeps so that the next one can go on from it).
pub fn mean_interval(n: f64, sum: f64, sum_sq: f64, z: f64) -> Option<(f64, [f64; 2])> {
    if n < 1.0 {
        return None;
    }
    let mean = sum / n;
    let var = if n > 1.0 {
        ((sum_sq - n * mean * mean) / (n - 1.0)).max(0.0)
    } else {
        0.0
    };
    let half = z * (var / n).sqrt();
    Some((mean, [mean - half, mean + half]))
}

/// The Wilson score interval of a proportion `hits / n` at `z`.
pub fn wilson(hits: f64, n: f64, z: f64) -> Option<[f64; 2]> {
    if n <= 0.0 {
        return None;
    }
    let p = hits / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some([(centre - half).max(0.0), (centre + half).min(1.0)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_intervals_against_reference_values() {
        assert_eq!(cosine(&[1.0, 0.0], &[1.0, 0.0]), Some(1.0));
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), Some(0.0));
        assert!((cosine(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap() - 0.974_631_846).abs() < 1e-9);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), None);
        // Wilson 95% of 8/10, computed by hand from the formula: [0.4902, 0.9433].
        let w = wilson(8.0, 10.0, 1.96).unwrap();
        assert!(
            (w[0] - 0.4902).abs() < 1e-4 && (w[1] - 0.9433).abs() < 1e-4,
            "{w:?}"
        );
        // Mean of 1, 2, 3: 2, sample variance 1, half width 1.96 * sqrt(1/3).
        let (m, iv) = mean_interval(3.0, 6.0, 14.0, 1.96).unwrap();
        assert!((m - 2.0).abs() < 1e-12);
        assert!((iv[1] - (2.0 + 1.96 * (1.0f64 / 3.0).sqrt())).abs() < 1e-12);
        assert_eq!(mean_interval(0.0, 0.0, 0.0, 1.96), None);
    }
}
