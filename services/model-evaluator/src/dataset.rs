//! Benchmark datasets: JSONL, one item per line.
//!
//! ```json
//! {"id": "q1", "messages": [{"role": "user", "content": "Capital of France?"}],
//!  "expected": "Paris", "context": "France's capital is Paris.", "schema": {...}}
//! ```
//! `prompt` may stand for a single user message; `label` is a class label (accuracy);
//! `reference` is read like `context` (grounding for the hallucination measure).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One benchmark item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// A JSON Schema the output must meet (as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
}

impl Item {
    /// The chat messages sent to the model.
    pub fn chat(&self) -> Vec<Message> {
        match (&self.messages, &self.prompt) {
            (Some(m), _) => m.clone(),
            (None, Some(p)) => vec![Message {
                role: "user".into(),
                content: p.clone(),
            }],
            (None, None) => Vec::new(),
        }
    }

    /// The text the model was asked (for the hallucination measure: words of the question
    /// are not claims).
    pub fn input_text(&self) -> String {
        self.chat()
            .into_iter()
            .map(|m| m.content)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The grounding text: context and reference together.
    pub fn grounding(&self) -> Option<String> {
        match (&self.context, &self.reference) {
            (None, None) => None,
            (c, r) => Some(format!(
                "{}\n{}",
                c.as_deref().unwrap_or(""),
                r.as_deref().unwrap_or("")
            )),
        }
    }
}

/// A dataset that cannot be used, naming the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatasetError {
    #[error("{name}: line {line}: {message}")]
    Line {
        name: String,
        line: usize,
        message: String,
    },
    #[error("{name}: no items")]
    Empty { name: String },
}

/// Parses a JSONL dataset.
///
/// # Errors
/// [`DatasetError`] naming the first bad line.
pub fn parse(name: &str, text: &str) -> Result<Vec<Item>, DatasetError> {
    let mut items = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DatasetError::Line {
            name: name.into(),
            line: i + 1,
            message,
        };
        let item: Item = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if item.chat().is_empty() {
            return Err(bad("needs `messages` or `prompt`".into()));
        }
        if !ids.insert(item.id.clone()) {
            return Err(bad(format!("duplicate id {:?}", item.id)));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(DatasetError::Empty { name: name.into() });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_and_errors() {
        let text = "{\"id\":\"a\",\"prompt\":\"hi\",\"expected\":\"hello\"}\n\n{\"id\":\"b\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n";
        let items = parse("d", text).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].chat()[0].content, "hi");
        let err = parse(
            "d",
            "{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"a\",\"prompt\":\"y\"}",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("duplicate"),
            "{err}"
        );
        let err = parse("d", "{\"id\":\"a\"}").unwrap_err();
        assert!(err.to_string().contains("messages"), "{err}");
        assert!(
            parse("d", "not json")
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        assert!(matches!(parse("d", "\n"), Err(DatasetError::Empty { .. })));
    }
}
