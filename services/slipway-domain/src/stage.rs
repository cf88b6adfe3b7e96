//! A stage's key, parsed once: `build`, `test:<suite>`, `deploy:<env>`, `approval:<env>`,
//! `monitor:<env>`, `rollback:<env>`, `evaluate`, `perf`, `cost`. Events and the run's state
//! keep keys as the strings the log holds; code that needs their parts asks this type.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kinds of stage, as they appear in types and subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Build,
    Test,
    Deploy,
    Evaluate,
    Perf,
    Cost,
    Approval,
    Monitor,
    Rollback,
    /// Progressive delivery of the candidate slot (see [`crate::rollout`]).
    Rollout,
    /// The rolled-out change deployed to the stable slot.
    Promote,
}

impl StageKind {
    pub const ALL: [StageKind; 11] = [
        StageKind::Build,
        StageKind::Test,
        StageKind::Deploy,
        StageKind::Evaluate,
        StageKind::Perf,
        StageKind::Cost,
        StageKind::Approval,
        StageKind::Monitor,
        StageKind::Rollback,
        StageKind::Rollout,
        StageKind::Promote,
    ];

    /// The subject and type token.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Build => "build",
            StageKind::Test => "test",
            StageKind::Deploy => "deploy",
            StageKind::Evaluate => "evaluate",
            StageKind::Perf => "perf",
            StageKind::Cost => "cost",
            StageKind::Approval => "approval",
            StageKind::Monitor => "monitor",
            StageKind::Rollback => "rollback",
            StageKind::Rollout => "rollout",
            StageKind::Promote => "promote",
        }
    }

    pub fn parse(s: &str) -> Option<StageKind> {
        StageKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The stage key: the kind alone, or `kind:instance` (a suite, an environment).
    pub fn key(self, instance: Option<&str>) -> String {
        StageKey::new(self, instance).to_string()
    }
}

/// A parsed stage key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageKey {
    kind: StageKind,
    instance: Option<String>,
}

/// A key whose kind is not a stage kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a stage key (build, test:<suite>, deploy:<environment>, ...)")]
pub struct NotAStageKey(pub String);

impl StageKey {
    pub fn new(kind: StageKind, instance: Option<&str>) -> Self {
        Self {
            kind,
            instance: instance.map(str::to_string),
        }
    }

    /// # Errors
    /// [`NotAStageKey`] when the part before `:` is no stage kind.
    pub fn parse(key: &str) -> Result<Self, NotAStageKey> {
        let (kind, instance) = match key.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (key, None),
        };
        StageKind::parse(kind)
            .map(|kind| Self::new(kind, instance))
            .ok_or_else(|| NotAStageKey(key.to_string()))
    }

    pub fn kind(&self) -> StageKind {
        self.kind
    }

    /// The suite or environment after the `:`, if the key has one.
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// The environment of a stage that has one (deploy, approval, monitor, rollback).
    pub fn environment(&self) -> Option<&str> {
        match self.kind {
            StageKind::Deploy
            | StageKind::Approval
            | StageKind::Monitor
            | StageKind::Rollback
            | StageKind::Rollout
            | StageKind::Promote => self.instance(),
            _ => None,
        }
    }

    /// The suite of a test stage.
    pub fn suite(&self) -> Option<&str> {
        (self.kind == StageKind::Test)
            .then(|| self.instance())
            .flatten()
    }
}

impl fmt::Display for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.instance {
            Some(i) => write!(f, "{}:{i}", self.kind.as_str()),
            None => f.write_str(self.kind.as_str()),
        }
    }
}

impl std::str::FromStr for StageKey {
    type Err = NotAStageKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The environment of `key` when it is the key of a stage of `kind` (e.g. the environment of
/// a deploy stage); `None` for any other key.
pub fn environment_of(key: &str, kind: StageKind) -> Option<String> {
    let key = StageKey::parse(key).ok()?;
    (key.kind() == kind)
        .then(|| key.environment().map(str::to_string))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_into_their_parts_and_print_back_as_they_were() {
        for (key, kind, instance) in [
            ("build", StageKind::Build, None),
            ("test:unit", StageKind::Test, Some("unit")),
            ("deploy:staging", StageKind::Deploy, Some("staging")),
            (
                "approval:production",
                StageKind::Approval,
                Some("production"),
            ),
            ("monitor:eu:west", StageKind::Monitor, Some("eu:west")),
            (
                "rollback:production",
                StageKind::Rollback,
                Some("production"),
            ),
            ("evaluate", StageKind::Evaluate, None),
            ("rollout:production", StageKind::Rollout, Some("production")),
            ("promote:production", StageKind::Promote, Some("production")),
        ] {
            let k = StageKey::parse(key).unwrap();
            assert_eq!((k.kind(), k.instance()), (kind, instance), "{key}");
            assert_eq!(k.to_string(), key);
            assert_eq!(k, StageKey::new(kind, instance));
        }
        let test = StageKey::parse("test:unit").unwrap();
        assert_eq!((test.suite(), test.environment()), (Some("unit"), None));
        let deploy = StageKey::parse("deploy:staging").unwrap();
        assert_eq!(
            (deploy.suite(), deploy.environment()),
            (None, Some("staging"))
        );
        assert_eq!(
            environment_of("deploy:staging", StageKind::Deploy).as_deref(),
            Some("staging")
        );
        assert_eq!(environment_of("deploy:staging", StageKind::Rollback), None);
        assert_eq!(
            StageKey::parse("lint:x").unwrap_err().to_string(),
            "\"lint:x\" is not a stage key (build, test:<suite>, deploy:<environment>, ...)"
        );
    }
}
