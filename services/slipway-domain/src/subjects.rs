//! Subject layout of the event log.
//!
//! - `slipway.changes.<source>`: incoming changes, one token naming the producer;
//! - `slipway.intake.rejected`: changes that made no run, with the reason;
//! - `slipway.run.<run id>.<stage>.<verb>`: everything about one run.
//!
//! Core-NATS request subjects (`slipway-api.*`) are outside the stream on purpose: queries are
//! not facts.

/// Subjects the stream stores.
pub const STREAM_SUBJECTS: [&str; 3] = ["slipway.changes.>", "slipway.intake.>", "slipway.run.>"];

pub const CHANGES: &str = "slipway.changes.>";
/// Where the gateway stores CDEvents taken as changes (any `slipway.changes.*` subject works).
pub const CDEVENT_CHANGES: &str = "slipway.changes.cdevents";
/// Where the CDEvents of runs are published (core NATS): `cdevents.<subject>.<predicate>`.
pub const CDEVENTS: &str = "cdevents.>";
pub const REJECTED: &str = "slipway.intake.rejected";
pub const RUNS: &str = "slipway.run.>";

/// Subject for a change from `source`, reduced to one plain token.
pub fn change(source: &str) -> String {
    format!("slipway.changes.{}", token(source))
}

/// Every event of one run.
pub fn run(run_id: &str) -> String {
    format!("slipway.run.{run_id}.>")
}

/// The requests of one stage kind, for a worker's consumer filter.
pub fn requests(stage: &str) -> String {
    format!("slipway.run.*.{stage}.requested")
}

/// The run-created events of every run.
pub const RUN_CREATED: &str = "slipway.run.*.run.created";

/// Live queries answered by the conductor from its in-memory state (core NATS).
pub fn query_run(run_id: &str) -> String {
    format!("slipway-api.runs.{run_id}")
}

pub const QUERY_RUNS: &str = "slipway-api.runs.*";

/// `(run id, noun, verb)` of a run subject.
pub fn parse_run(subject: &str) -> Option<(&str, &str, &str)> {
    let rest = subject.strip_prefix("slipway.run.")?;
    let mut it = rest.splitn(3, '.');
    let run = it.next()?;
    let noun = it.next()?;
    let verb = it.next()?;
    Some((run, noun, verb))
}

/// A string reduced to one subject token: `[A-Za-z0-9_-]`, at most 64 characters.
pub fn token(s: &str) -> String {
    let t: String = s
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if t.is_empty() { "unknown".into() } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_plain() {
        assert_eq!(change("/slipway/cli"), "slipway.changes.slipway_cli");
        assert_eq!(token("a.b *>"), "a_b___");
        assert_eq!(token(""), "unknown");
        assert_eq!(
            parse_run("slipway.run.r1.build.succeeded"),
            Some(("r1", "build", "succeeded"))
        );
    }
}
