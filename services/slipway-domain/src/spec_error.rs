//! The error of a spec that cannot be used, in a module of its own so that the spec's parts
//! (the rollout's tables) can name it without importing the spec.

/// A spec that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pipeline spec: {path}: {message}")]
pub struct SpecError {
    /// Dotted path of the offending field, e.g. `test[1].command`.
    pub path: String,
    pub message: String,
}

impl SpecError {
    /// An error at `path`.
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(path, message)
    }

    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}
