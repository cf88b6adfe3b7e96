//! A reader for the Prometheus text exposition format: enough to sum counters and histogram
//! buckets across label sets.

use std::collections::BTreeMap;

/// A sample's labels.
pub type Labels = BTreeMap<String, String>;

/// One scrape: metric sample name (e.g. `http_requests_total`, `latency_bucket`) to its
/// samples as (labels, value).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    /// Parses the text format; lines that do not parse are skipped (a monitor must not fail
    /// on one odd line of a service's metrics).
    pub fn parse(text: &str) -> Self {
        let mut samples: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((name, labels, value)) = parse_line(line) {
                samples.entry(name).or_default().push((labels, value));
            }
        }
        Self { samples }
    }

    /// The sum of a sample name over every label set, if present.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.samples
            .get(name)
            .map(|v| v.iter().map(|(_, x)| x).sum())
    }

    /// The sum of a sample name over the label sets where `label` is `value`.
    pub fn sum_where(&self, name: &str, label: &str, value: &str) -> Option<f64> {
        self.samples.get(name).map(|v| {
            v.iter()
                .filter(|(l, _)| l.get(label).is_some_and(|x| x == value))
                .map(|(_, x)| x)
                .sum()
        })
    }

    /// A histogram's cumulative buckets (`le` → count), summed over other labels.
    pub fn buckets(&self, histogram: &str) -> Vec<(f64, f64)> {
        self.buckets_of(histogram, None)
    }

    /// A histogram's cumulative buckets over the label sets where `label` is `value`.
    pub fn buckets_where(&self, histogram: &str, label: &str, value: &str) -> Vec<(f64, f64)> {
        self.buckets_of(histogram, Some((label, value)))
    }

    fn buckets_of(&self, histogram: &str, only: Option<(&str, &str)>) -> Vec<(f64, f64)> {
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (labels, value) in self
            .samples
            .get(&format!("{histogram}_bucket"))
            .into_iter()
            .flatten()
            .filter(|(l, _)| only.is_none_or(|(k, v)| l.get(k).is_some_and(|x| x == v)))
        {
            let Some(le) = labels.get("le") else { continue };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else if let Ok(x) = le.parse::<f64>() {
                x
            } else {
                continue;
            };
            let entry = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            entry.1 += value;
        }
        let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }
}

fn parse_line(line: &str) -> Option<(String, Labels, f64)> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => {
            let mut it = line.splitn(2, char::is_whitespace);
            let name = it.next()?;
            (name, it.next().unwrap_or("").trim_start())
        }
    };
    let mut labels = BTreeMap::new();
    let value_part = if let Some(body) = rest.strip_prefix('{') {
        let end = body.find('}')?;
        for pair in split_labels(&body[..end]) {
            let (k, v) = pair.split_once('=')?;
            let v = v
                .trim()
                .trim_matches('"')
                .replace("\\\"", "\"")
                .replace("\\\\", "\\");
            labels.insert(k.trim().to_string(), v);
        }
        &body[end + 1..]
    } else {
        rest
    };
    let value = value_part.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().ok()?,
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    Some((name.to_string(), labels, value))
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            '\\' if quoted => escaped = !escaped,
            '"' if !escaped => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => escaped = false,
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// The `q` quantile (0..1) of the observations between two scrapes of a histogram, in the
/// histogram's unit, as the upper bound of the bucket it falls in; `None` without observations.
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let old = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, (n - old).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP req Requests.
# TYPE req counter
req{route="/a",code="200"} 10
req{route="/b",code="500"} 5
errors_total 3
lat_bucket{le="0.1"} 4
lat_bucket{le="0.5"} 9
lat_bucket{le="+Inf"} 10
lat_count 10
odd line here
"#;

    #[test]
    fn sums_and_buckets() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.sum("req"), Some(15.0));
        assert_eq!(s.sum("errors_total"), Some(3.0));
        assert_eq!(s.sum("missing"), None);
        let b = s.buckets("lat");
        assert_eq!(b.len(), 3);
        assert_eq!(quantile_between(&[], &b, 0.5), Some(0.5));
        assert_eq!(quantile_between(&[], &b, 0.99), Some(f64::INFINITY));
        assert_eq!(quantile_between(&b, &b, 0.99), None);
    }

    #[test]
    fn labels_with_commas_and_quotes() {
        let s = Scrape::parse("m{a=\"x,y\",b=\"say \\\"hi\\\"\"} 2\n");
        assert_eq!(s.sum("m"), Some(2.0));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in ".{0,300}") {
            let s = Scrape::parse(&text);
            let _ = s.buckets("x");
        }
    }
}
