//! The metric functions, per item and per dataset. Definitions (and why) in `docs/gates.md`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// An answer counts as hallucinated when more than this share of its content words appear in
/// neither the item's context/reference nor its input.
pub const HALLUCINATION_THRESHOLD: f64 = 0.5;

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "of", "in", "on", "at", "to",
    "for", "and", "or", "but", "it", "its", "this", "that", "these", "those", "with", "as", "by",
    "from", "i", "you", "he", "she", "we", "they", "me", "my", "your", "our", "their", "there",
    "then", "than", "so", "if", "not", "no", "yes", "do", "does", "did", "can", "will", "would",
    "should", "could", "has", "have", "had", "what", "which", "who", "whom", "how", "why", "when",
    "where", "also", "just", "very",
];

const REFUSALS: &[&str] = &[
    "i don t know",
    "i do not know",
    "i cannot",
    "i can t",
    "unable to",
    "as an ai",
    "i m sorry",
    "i am sorry",
    "no answer",
];

/// Lower case, punctuation to spaces, articles removed, whitespace collapsed (SQuAD's
/// normalisation).
pub fn normalize(s: &str) -> String {
    let lowered: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn tokens(s: &str) -> Vec<String> {
    normalize(s)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

pub fn exact_match(output: &str, expected: &str) -> bool {
    normalize(output) == normalize(expected)
}

/// Token F1 between an answer and the expected answer (multiset overlap).
pub fn token_f1(output: &str, expected: &str) -> f64 {
    let (o, e) = (tokens(output), tokens(expected));
    if o.is_empty() && e.is_empty() {
        return 1.0;
    }
    if o.is_empty() || e.is_empty() {
        return 0.0;
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for t in &e {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &o {
        if let Some(c) = counts.get_mut(t.as_str())
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = f64::from(common) / o.len() as f64;
    let r = f64::from(common) / e.len() as f64;
    2.0 * p * r / (p + r)
}

pub fn is_refusal(output: &str) -> bool {
    let n = normalize(output);
    n.is_empty() || REFUSALS.iter().any(|r| n.contains(r))
}

/// The output parsed as JSON (a Markdown code fence around it is tolerated).
pub fn as_json(output: &str) -> Option<serde_json::Value> {
    let t = output.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .map_or(t, |rest| rest.trim_end().trim_end_matches("```"))
        .trim();
    serde_json::from_str(t).ok()
}

/// Whether the output is JSON meeting `schema`.
pub fn format_compliant(output: &str, schema: &serde_json::Value) -> bool {
    let Some(value) = as_json(output) else {
        return false;
    };
    match jsonschema::validator_for(schema) {
        Ok(v) => v.is_valid(&value),
        Err(_) => false,
    }
}

/// The share of the answer's content words found in neither the grounding nor the input.
pub fn unsupported_share(output: &str, grounding: &str, input: &str) -> f64 {
    let known: BTreeSet<String> = tokens(grounding).into_iter().chain(tokens(input)).collect();
    let content: Vec<String> = tokens(output)
        .into_iter()
        .filter(|t| !STOPWORDS.contains(&t.as_str()))
        .collect();
    if content.is_empty() {
        return 0.0;
    }
    let unsupported = content.iter().filter(|t| !known.contains(*t)).count();
    unsupported as f64 / content.len() as f64
}

/// A refusal is not a hallucination; an answer is one when most of its claims are ungrounded.
pub fn hallucinated(output: &str, grounding: &str, input: &str) -> bool {
    !is_refusal(output) && unsupported_share(output, grounding, input) > HALLUCINATION_THRESHOLD
}

/// What one item scored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hallucinated: Option<bool>,
    pub refusal: bool,
    /// The hallucination verdict came from the judge model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub judged: bool,
    /// The judge could not answer for this item (the lexical verdict stands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_error: Option<String>,
    /// Cosine similarity of the answer's and the reference's embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// Why the embeddings endpoint gave no similarity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity_error: Option<String>,
    /// An item asked more than once (the spec's `repeats`): each yes/no metric's verdict on
    /// every answer, in the order asked. The item's own verdicts are its first answer's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub votes: BTreeMap<String, Vec<bool>>,
    /// An item asked more than once: every answer's token F1, in the order asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub f1s: Vec<f64>,
}

/// The yes/no metrics, each with the item's verdict on it (`yes` is what the metric counts).
pub const YES_NO_METRICS: &[&str] = &[
    "exact_match",
    "accuracy",
    "format_compliance",
    "hallucination_rate",
    "refusal_rate",
    "error_rate",
];

impl ItemResult {
    /// The item's verdict on a yes/no metric, `None` when the item has none.
    pub fn verdict(&self, metric: &str) -> Option<bool> {
        match metric {
            "exact_match" => self.exact,
            "accuracy" => self.label_ok,
            "format_compliance" => self.format_ok,
            "hallucination_rate" => self.hallucinated,
            "refusal_rate" => Some(self.refusal),
            "error_rate" => Some(self.error.is_some()),
            _ => None,
        }
    }

    /// The verdicts of the first `k` answers (fewer when the item was asked fewer times).
    pub fn answers(&self, metric: &str, k: usize) -> Option<Vec<bool>> {
        match self.votes.get(metric) {
            Some(v) if !v.is_empty() => Some(v.iter().take(k.max(1)).copied().collect()),
            _ => self.verdict(metric).map(|v| vec![v]),
        }
    }

    /// The share of the first `k` answers counted by a yes/no metric.
    pub fn share(&self, metric: &str, k: usize) -> Option<f64> {
        let a = self.answers(metric, k)?;
        Some(a.iter().filter(|x| **x).count() as f64 / a.len() as f64)
    }

    /// The mean token F1 of the first `k` answers.
    pub fn f1_of(&self, k: usize) -> Option<f64> {
        if self.f1s.is_empty() {
            return self.f1;
        }
        let first: Vec<f64> = self.f1s.iter().take(k.max(1)).copied().collect();
        slipway_domain::stats::mean(&first)
    }

    /// How many times the item was asked.
    pub fn repeats(&self) -> usize {
        self.votes
            .values()
            .map(Vec::len)
            .chain(std::iter::once(self.f1s.len()))
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Per-item correctness for the paired test: exact match where there is an expected
    /// answer, else the label.
    pub fn correct(&self) -> Option<bool> {
        self.exact.or(self.label_ok)
    }

    /// How bad the item went, for choosing the worst samples (higher is worse).
    pub fn badness(&self) -> f64 {
        let mut b = 0.0;
        if self.error.is_some() {
            b += 4.0;
        }
        if self.correct() == Some(false) {
            b += 2.0;
        }
        if self.hallucinated == Some(true) {
            b += 2.0;
        }
        if self.format_ok == Some(false) {
            b += 1.0;
        }
        b + (1.0 - self.f1.unwrap_or(1.0))
    }
}

/// Scores an answer against an item.
pub fn score(item: &crate::dataset::Item, output: &str) -> ItemResult {
    ItemResult {
        id: item.id.clone(),
        output: output.to_string(),
        exact: item.expected.as_ref().map(|e| exact_match(output, e)),
        label_ok: item
            .label
            .as_ref()
            .map(|l| normalize(output) == normalize(l)),
        f1: item.expected.as_ref().map(|e| token_f1(output, e)),
        format_ok: item.schema.as_ref().map(|s| format_compliant(output, s)),
        hallucinated: item
            .grounding()
            .map(|g| hallucinated(output, &g, &item.input_text())),
        refusal: is_refusal(output),
        ..Default::default()
    }
}

fn mean_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    slipway_domain::stats::mean(&v)
}

/// One item asked several times, as one result: the first answer, as it was (its output,
/// verdicts and error: one answer, the same whatever the repeats, so what is measured on it
/// alone, the judge's verdict and the semantic similarity, compares with a baseline asked any
/// number of times), with every answer's verdict on each yes/no metric kept in `votes` (an
/// answer without a verdict, a failed request for the hallucination measure, adds none) and
/// every answer's token F1 in `f1s`; F1, latency and tokens are means. Without answers, `None`.
pub fn combine(answers: Vec<ItemResult>) -> Option<ItemResult> {
    let first = answers.first()?;
    if answers.len() == 1 {
        return answers.into_iter().next();
    }
    let mut votes = BTreeMap::new();
    for m in YES_NO_METRICS {
        let v: Vec<bool> = answers.iter().filter_map(|r| r.verdict(m)).collect();
        if !v.is_empty() {
            votes.insert((*m).to_string(), v);
        }
    }
    let f1s: Vec<f64> = answers.iter().filter_map(|r| r.f1).collect();
    let answered: Vec<f64> = answers
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.latency_ms)
        .collect();
    let mean_u64 = |f: fn(&ItemResult) -> u64| {
        (answers.iter().map(f).sum::<u64>() as f64 / answers.len() as f64).round() as u64
    };
    Some(ItemResult {
        latency_ms: slipway_domain::stats::mean(&answered).unwrap_or(0.0),
        tokens_in: mean_u64(|r| r.tokens_in),
        tokens_out: mean_u64(|r| r.tokens_out),
        f1: slipway_domain::stats::mean(&f1s),
        f1s: if f1s.len() > 1 { f1s } else { Vec::new() },
        votes,
        ..first.clone()
    })
}

/// A dataset's metrics (only those its items allow). A yes/no metric of items asked several
/// times is the mean of their answers' shares: what one answer scores on average, whatever the
/// repeats, so it compares with a baseline asked a different number of times.
pub fn summarize(results: &[ItemResult]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put(
        "exact_match",
        mean_of(
            results
                .iter()
                .filter_map(|r| r.share("exact_match", usize::MAX)),
        ),
    );
    put(
        "accuracy",
        mean_of(
            results
                .iter()
                .filter_map(|r| r.share("accuracy", usize::MAX)),
        ),
    );
    put("f1", mean_of(results.iter().filter_map(|r| r.f1)));
    put(
        "semantic_similarity",
        mean_of(results.iter().filter_map(|r| r.similarity)),
    );
    put(
        "format_compliance",
        mean_of(
            results
                .iter()
                .filter_map(|r| r.share("format_compliance", usize::MAX)),
        ),
    );
    put(
        "hallucination_rate",
        mean_of(
            results
                .iter()
                .filter_map(|r| r.share("hallucination_rate", usize::MAX)),
        ),
    );
    put(
        "refusal_rate",
        mean_of(
            results
                .iter()
                .filter_map(|r| r.share("refusal_rate", usize::MAX)),
        ),
    );
    put(
        "error_rate",
        mean_of(
            results
                .iter()
                .filter_map(|r| r.share("error_rate", usize::MAX)),
        ),
    );
    let lat: Vec<f64> = results
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.latency_ms)
        .collect();
    put(
        "latency_p95_ms",
        slipway_domain::stats::quantile(&lat, 0.95),
    );
    put(
        "tokens_in_per_item",
        mean_of(results.iter().map(|r| r.tokens_in as f64)),
    );
    put(
        "tokens_out_per_item",
        mean_of(results.iter().map(|r| r.tokens_out as f64)),
    );
    put(
        "tokens_per_item",
        mean_of(results.iter().map(|r| (r.tokens_in + r.tokens_out) as f64)),
    );
    // How many hallucination verdicts came from the judge model (absent without a judge).
    if results.iter().any(|r| r.judged) {
        put(
            "judged_items",
            Some(results.iter().filter(|r| r.judged).count() as f64),
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::parse;

    #[test]
    fn judge_replies() {
        use crate::model::judge_verdict;
        assert_eq!(judge_verdict(" UNSUPPORTED."), Some(true));
        assert_eq!(judge_verdict("supported"), Some(false));
        assert_eq!(judge_verdict("I think so"), None);
    }

    #[test]
    fn metrics_by_hand() {
        assert!(exact_match("The  Paris!", "paris"));
        assert!(!exact_match("Paris, France", "Paris"));
        // "paris france" vs "paris": p = 1/2, r = 1, F1 = 2/3.
        assert!((token_f1("Paris, France", "Paris") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(token_f1("Berlin", "Paris"), 0.0);
        // Multiset: "the cat cat" vs "cat": tokens cat,cat vs cat -> common 1, p = 1/2, r = 1.
        assert!((token_f1("the cat cat", "cat") - 2.0 / 3.0).abs() < 1e-12);
        assert!(is_refusal("I don't know."));
        assert!(is_refusal("   "));
        assert!(!is_refusal("Paris"));
        let schema = serde_json::json!({"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}});
        assert!(format_compliant("{\"city\": \"Paris\"}", &schema));
        assert!(format_compliant(
            "```json\n{\"city\": \"Paris\"}\n```",
            &schema
        ));
        assert!(!format_compliant("{\"town\": \"Paris\"}", &schema));
        assert!(!format_compliant("Paris", &schema));
        // Content words of "Paris is lovely in spring": paris, lovely, spring (3);
        // grounding has paris only -> 2/3 unsupported > 0.5.
        let share = unsupported_share(
            "Paris is lovely in spring",
            "The capital of France is Paris.",
            "Capital?",
        );
        assert!((share - 2.0 / 3.0).abs() < 1e-12, "{share}");
        assert!(hallucinated(
            "Paris is lovely in spring",
            "The capital of France is Paris.",
            "Capital?"
        ));
        assert!(!hallucinated(
            "Paris",
            "The capital of France is Paris.",
            "Capital?"
        ));
        assert!(!hallucinated("I don't know", "Paris.", "Capital?"));
    }

    #[test]
    fn dataset_summary_by_hand() {
        let items = parse(
            "d",
            concat!(
                "{\"id\":\"1\",\"prompt\":\"Capital of France?\",\"expected\":\"Paris\",\"context\":\"Paris is the capital of France.\"}\n",
                "{\"id\":\"2\",\"prompt\":\"Capital of Japan?\",\"expected\":\"Tokyo\",\"context\":\"Tokyo is the capital of Japan.\"}\n",
                "{\"id\":\"3\",\"prompt\":\"Sentiment of 'great'?\",\"label\":\"positive\"}\n",
                "{\"id\":\"4\",\"prompt\":\"Capital of Italy?\",\"expected\":\"Rome\"}\n",
            ),
        )
        .unwrap();
        let outputs = ["Paris", "Kyoto temples shine", "positive", "I don't know."];
        let results: Vec<ItemResult> = items
            .iter()
            .zip(outputs)
            .map(|(i, o)| {
                let mut r = score(i, o);
                r.tokens_in = 4;
                r.tokens_out = 2;
                r.latency_ms = 10.0;
                r
            })
            .collect();
        let m = summarize(&results);
        // Exact match on items 1, 2, 4: only 1 right -> 1/3.
        assert!((m["exact_match"] - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m["accuracy"], 1.0);
        // F1: 1, 0, 0 -> 1/3.
        assert!((m["f1"] - 1.0 / 3.0).abs() < 1e-12);
        // Grounded items 1, 2: item 2's answer is all unsupported -> 1/2.
        assert_eq!(m["hallucination_rate"], 0.5);
        // One refusal in four.
        assert_eq!(m["refusal_rate"], 0.25);
        assert_eq!(m["tokens_per_item"], 6.0);
        assert!(!m.contains_key("format_compliance"));
        assert_eq!(results[0].correct(), Some(true));
        assert_eq!(results[2].correct(), Some(true));
        assert_eq!(results[3].correct(), Some(false));
    }
}
