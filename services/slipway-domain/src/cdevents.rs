//! CDEvents (specification v0.5, context `specversion` "0.5.0"): what Slipway says to other
//! delivery tools, and the CDEvents it takes as changes.
//!
//! Emitted, from the events of a run ([`for_event`]):
//!
//! | Slipway event | CDEvent |
//! |---|---|
//! | `run.created` | `dev.cdevents.pipelinerun.queued.0.3.0` |
//! | first `build.requested` | `dev.cdevents.pipelinerun.started.0.3.0` |
//! | `run.succeeded` / `failed` / `cancelled` / `rejected` / `rolled_back` | `dev.cdevents.pipelinerun.finished.0.3.0` |
//! | `build.succeeded` / `failed` | `dev.cdevents.build.finished.0.3.0` |
//! | `test.succeeded` / `failed` | `dev.cdevents.testsuiterun.finished.0.3.0`, and `dev.cdevents.testcaserun.finished.0.3.0` per reported case |
//! | `deploy.succeeded` | `dev.cdevents.service.deployed.0.3.0` |
//! | `rollback.succeeded` | `dev.cdevents.service.rolledback.0.3.0`, `dev.cdevents.incident.resolved.0.3.0` per incident |
//! | `incident.opened` | `dev.cdevents.incident.detected.0.3.0` |
//! | `promote.succeeded` (a rollout's change in the stable slot) | `dev.cdevents.service.upgraded.0.3.0` |
//! | `rollout.succeeded` / `failed` | `dev.cdeventsx.slipway-rollout.finished.0.1.0` (custom: the vocabulary has no rollout) |
//! | gates, approvals, monitoring (no CDEvents vocabulary) | `dev.cdeventsx.slipway-gate.finished.0.1.0`, `dev.cdeventsx.slipway-approval.decided.0.1.0`, `dev.cdeventsx.slipway-monitor.finished.0.1.0` (the spec's custom events) |
//!
//! Ids are derived from the Slipway event's id, so a repeat is recognisable downstream.
//! Taken as changes ([`parse_incoming`]): `dev.cdevents.change.merged.0.3.0`,
//! `dev.cdevents.artifact.packaged.0.3.0` and `dev.cdevents.artifact.published.0.3.0`, bare
//! or inside a CloudEvent.

use serde_json::{Map, Value, json};

use crate::envelope::Event;
use crate::events::{CaseStatus, EventData, ObjectRef, Verdict};
use crate::run::{Phase, Run};

/// The CDEvents context `specversion` emitted.
pub const SPEC_VERSION: &str = "0.5.0";

/// `context.source` of every CDEvent Slipway emits.
pub const SOURCE: &str = "/slipway";

/// Test cases reported per suite run, at most (a suite of thousands is summarised).
pub const MAX_CASES: usize = 200;

/// The NATS subject a CDEvent is published on: `cdevents.<subject>.<predicate>`.
pub fn subject_of(cdevent: &Value) -> String {
    let ty = cdevent["context"]["type"].as_str().unwrap_or_default();
    match type_parts(ty) {
        Some((_, subject, predicate, _)) => format!("cdevents.{subject}.{predicate}"),
        None => "cdevents.unknown".into(),
    }
}

/// `(namespace, subject, predicate, version)` of a CDEvents type.
pub fn type_parts(ty: &str) -> Option<(&str, &str, &str, &str)> {
    let rest = ty.strip_prefix("dev.")?;
    let mut it = rest.splitn(4, '.');
    let ns = it.next()?;
    let subject = it.next()?;
    let predicate = it.next()?;
    let version = it.next()?;
    (ns == "cdevents" || ns == "cdeventsx").then_some((ns, subject, predicate, version))
}

/// A Package URL for a Slipway artifact: `pkg:generic/<pipeline>@<version>?checksum=sha256:<hex>`.
pub fn purl(pipeline: &str, artifact: &ObjectRef) -> String {
    let version = crate::decide::version_of(pipeline, artifact);
    let name: String = pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32 & 0xff)
            }
        })
        .collect();
    format!("pkg:generic/{name}@{version}?checksum={}", artifact.digest)
}

struct Emit<'a> {
    event: &'a Event,
    run: &'a Run,
    run_url: Option<String>,
    out: Vec<Value>,
}

impl Emit<'_> {
    fn push(&mut self, ty: &str, key: &str, subject_id: String, content: Value) {
        let id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!("slipway-cdevent:{}:{ty}:{key}", self.event.id).as_bytes(),
        );
        let chain = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            format!("slipway-run:{}", self.run.run_id).as_bytes(),
        );
        self.out.push(json!({
            "context": {
                "specversion": SPEC_VERSION,
                "id": id.to_string(),
                "source": SOURCE,
                "type": ty,
                "timestamp": self.event.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "chainId": chain.to_string(),
            },
            "subject": {
                "id": subject_id,
                "source": SOURCE,
                "content": content,
            },
        }));
    }

    fn pipelinerun(&self, extra: Value) -> Value {
        let mut c = Map::new();
        c.insert("pipelineName".into(), json!(self.run.pipeline));
        if let Some(u) = &self.run_url {
            c.insert("uri".into(), json!(u));
        }
        if let Value::Object(m) = extra {
            c.extend(m);
        }
        Value::Object(c)
    }
}

/// The CDEvents a Slipway event of `run` stands for (`run` folded with it); `public_url` is
/// the gateway's, for links to the run.
pub fn for_event(event: &Event, run: &Run, public_url: Option<&str>) -> Vec<Value> {
    let mut e = Emit {
        event,
        run,
        run_url: public_url.map(|u| format!("{}/v1/runs/{}", u.trim_end_matches('/'), run.run_id)),
        out: Vec::new(),
    };
    let run_id = run.run_id.clone();
    let stage_id = |stage: &str, attempt: u32| format!("{run_id}/{stage}/{attempt}");
    match &event.data {
        EventData::RunCreated(_) => {
            let c = e.pipelinerun(json!({}));
            e.push(
                "dev.cdevents.pipelinerun.queued.0.3.0",
                "",
                run_id.clone(),
                c,
            );
        }
        // The run starts executing when its first stage is requested.
        EventData::BuildRequested(s) if s.attempt == crate::decide::FIRST_ATTEMPT => {
            let c = e.pipelinerun(json!({}));
            e.push(
                "dev.cdevents.pipelinerun.started.0.3.0",
                "",
                run_id.clone(),
                c,
            );
        }
        EventData::RunSucceeded(r)
        | EventData::RunFailed(r)
        | EventData::RunCancelled(r)
        | EventData::RunRejected(r)
        | EventData::RunRolledBack(r) => {
            let outcome = match run.phase {
                Phase::Succeeded => "success",
                Phase::Cancelled => "cancel",
                _ => "failure",
            };
            let mut extra = json!({ "outcome": outcome });
            if outcome != "success" {
                extra["errors"] = json!(r.reason);
            }
            let c = e.pipelinerun(extra);
            e.push(
                "dev.cdevents.pipelinerun.finished.0.3.0",
                "",
                run_id.clone(),
                c,
            );
        }
        EventData::BuildSucceeded(b) => {
            let c = json!({ "artifactId": purl(&run.pipeline, &b.artifact) });
            e.push(
                "dev.cdevents.build.finished.0.3.0",
                "",
                stage_id(&b.stage, b.attempt),
                c,
            );
        }
        EventData::BuildFailed(b) => {
            e.push(
                "dev.cdevents.build.finished.0.3.0",
                "",
                stage_id(&b.stage, b.attempt),
                json!({}),
            );
        }
        EventData::TestSucceeded(t) | EventData::TestFailed(t) => {
            let suite_run = stage_id(&t.stage, t.attempt);
            let environment = json!({ "id": "slipway-tester", "source": SOURCE });
            let passed = matches!(event.data, EventData::TestSucceeded(_));
            let mut c = json!({
                "environment": environment,
                "outcome": if passed { "success" } else { "failure" },
                "testSuite": { "id": t.suite, "name": t.suite },
            });
            if let Some(r) = &t.reason {
                c["reason"] = json!(r);
            }
            e.push(
                "dev.cdevents.testsuiterun.finished.0.3.0",
                "",
                suite_run.clone(),
                c,
            );
            for (i, case) in t.cases.iter().take(MAX_CASES).enumerate() {
                let outcome = match case.status {
                    CaseStatus::Passed => "success",
                    CaseStatus::Failed => "failure",
                    CaseStatus::Error => "error",
                    CaseStatus::Skipped => continue,
                };
                let case_id = match &case.class {
                    Some(class) => format!("{class}.{}", case.name),
                    None => case.name.clone(),
                };
                let mut c = json!({
                    "environment": environment,
                    "outcome": outcome,
                    "testCase": { "id": case_id, "name": case.name },
                    "testSuiteRun": { "id": suite_run, "source": SOURCE },
                });
                if let Some(m) = &case.message {
                    c["reason"] = json!(m);
                }
                e.push(
                    "dev.cdevents.testcaserun.finished.0.3.0",
                    &i.to_string(),
                    format!("{suite_run}/{i}"),
                    c,
                );
            }
        }
        EventData::DeploySucceeded(d) => {
            let c = json!({
                "artifactId": purl(&run.pipeline, &d.artifact),
                "environment": { "id": d.environment, "source": SOURCE },
            });
            e.push(
                "dev.cdevents.service.deployed.0.3.0",
                "",
                run.pipeline.clone(),
                c,
            );
        }
        EventData::PromoteSucceeded(d) => {
            let c = json!({
                "artifactId": purl(&run.pipeline, &d.artifact),
                "environment": { "id": d.environment, "source": SOURCE },
            });
            e.push(
                "dev.cdevents.service.upgraded.0.3.0",
                "",
                run.pipeline.clone(),
                c,
            );
        }
        EventData::RolloutSucceeded(r) | EventData::RolloutFailed(r) => {
            let strategy = run
                .spec
                .environment(&r.environment)
                .and_then(|env| env.rollout.as_ref())
                .map(|x| serde_json::to_value(x.strategy).unwrap_or_default());
            let mut c = json!({
                "pipelineRun": run_id,
                "environment": r.environment,
                "promoted": matches!(event.data, EventData::RolloutSucceeded(_)),
                "stepsPassed": r.steps_passed,
                "decidedBy": r.decided_by,
                "reason": r.reason,
            });
            if let Some(s) = strategy {
                c["strategy"] = s;
            }
            e.push(
                "dev.cdeventsx.slipway-rollout.finished.0.1.0",
                "",
                stage_id(&r.stage, r.attempt),
                c,
            );
        }
        EventData::RollbackSucceeded(d) => {
            let environment = json!({ "id": d.environment, "source": SOURCE });
            let artifact = purl(&run.pipeline, &d.artifact);
            e.push(
                "dev.cdevents.service.rolledback.0.3.0",
                "",
                run.pipeline.clone(),
                json!({ "artifactId": artifact, "environment": environment }),
            );
            for incident in &run.incidents {
                e.push(
                    "dev.cdevents.incident.resolved.0.3.0",
                    incident,
                    incident.clone(),
                    json!({
                        "description": format!("rolled back to {}", d.version),
                        "environment": environment,
                        "service": { "id": run.pipeline, "source": SOURCE },
                        "artifactId": artifact,
                    }),
                );
            }
        }
        EventData::IncidentOpened(i) => {
            let breaches: Vec<String> = i
                .breaches
                .iter()
                .map(|c| format!("{} = {}", c.metric, c.candidate))
                .collect();
            e.push(
                "dev.cdevents.incident.detected.0.3.0",
                "",
                i.incident_id.clone(),
                json!({
                    "description": format!("{} in {}: {}", i.version, i.environment, breaches.join("; ")),
                    "environment": { "id": i.environment, "source": SOURCE },
                    "service": { "id": run.pipeline, "source": SOURCE },
                }),
            );
        }
        EventData::EvaluateSucceeded(g)
        | EventData::EvaluateFailed(g)
        | EventData::PerfSucceeded(g)
        | EventData::PerfFailed(g)
        | EventData::CostSucceeded(g)
        | EventData::CostFailed(g) => {
            let mut c = json!({
                "pipelineRun": run_id,
                "gate": g.stage,
                "passed": g.verdict != Verdict::Fail,
                "metrics": g.metrics,
            });
            if let Some(r) = &g.reason {
                c["reason"] = json!(r);
            }
            e.push(
                "dev.cdeventsx.slipway-gate.finished.0.1.0",
                "",
                stage_id(&g.stage, g.attempt),
                c,
            );
        }
        EventData::ApprovalApproved(a)
        | EventData::ApprovalRejected(a)
        | EventData::ApprovalAutoApproved(a) => {
            let approved = event.data.approves();
            e.push(
                "dev.cdeventsx.slipway-approval.decided.0.1.0",
                "",
                stage_id(&a.stage, a.attempt),
                json!({
                    "pipelineRun": run_id,
                    "approver": a.approver,
                    "decision": if approved { "approved" } else { "rejected" },
                    "artifactDigest": a.artifact_digest,
                }),
            );
        }
        EventData::MonitorSucceeded(m) | EventData::MonitorFailed(m) => {
            let healthy = matches!(event.data, EventData::MonitorSucceeded(_));
            e.push(
                "dev.cdeventsx.slipway-monitor.finished.0.1.0",
                "",
                stage_id(&m.stage, m.attempt),
                json!({
                    "pipelineRun": run_id,
                    "environment": m.environment,
                    "healthy": healthy,
                    "metrics": m.metrics,
                }),
            );
        }
        _ => {}
    }
    e.out
}

/// A CDEvent taken as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub timestamp: chrono::DateTime<chrono::Utc>,
    /// The subject's id: the change (`change.merged`) or the artifact's purl.
    pub subject_id: String,
    /// `change.merged`: the repository's id (and source, when given).
    pub repository: Option<String>,
    pub repository_source: Option<String>,
    /// `artifact.published`: who published it.
    pub user: Option<String>,
}

/// CDEvents types taken as changes (minor and patch versions of these majors).
pub const ACCEPTED: &[&str] = &[
    "dev.cdevents.change.merged.0.3",
    "dev.cdevents.artifact.packaged.0.3",
    "dev.cdevents.artifact.published.0.3",
];

/// Whether a CloudEvents type is a CDEvent.
pub fn is_cdevent_type(ty: &str) -> bool {
    ty.starts_with("dev.cdevents.")
}

/// Reads a CDEvent (bare, or the `data` of a structured CloudEvent) taken as a change.
///
/// # Errors
/// What is missing or wrong, naming the field.
pub fn parse_incoming(bytes: &[u8]) -> Result<Incoming, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let v = if v.get("context").is_none() && v.get("specversion").is_some() {
        v.get("data")
            .cloned()
            .ok_or("a CloudEvent carrying a CDEvent needs it in `data`")?
    } else {
        v
    };
    let ctx = v.get("context").ok_or("no `context`: not a CDEvent")?;
    let text = |obj: &Value, field: &str, path: &str| -> Result<String, String> {
        match obj.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(format!("`{path}.{field}` must be a non-empty string")),
            None => Err(format!("`{path}.{field}` is missing")),
        }
    };
    let specversion = text(ctx, "specversion", "context")?;
    if !specversion.starts_with("0.5.") {
        return Err(format!(
            "CDEvents specversion {specversion:?} is not supported (Slipway reads 0.5.x)"
        ));
    }
    let ty = text(ctx, "type", "context")?;
    if !ACCEPTED.iter().any(|a| {
        ty.strip_prefix(a)
            .is_some_and(|rest| rest.starts_with('.') && rest[1..].parse::<u32>().is_ok())
    }) {
        return Err(format!(
            "CDEvents type {ty:?} is not taken as a change (accepted: change.merged, artifact.packaged, artifact.published, version 0.3.x)"
        ));
    }
    let timestamp = text(ctx, "timestamp", "context")?;
    let timestamp = chrono::DateTime::parse_from_rfc3339(&timestamp)
        .map_err(|e| format!("`context.timestamp` {timestamp:?} is not RFC 3339: {e}"))?
        .with_timezone(&chrono::Utc);
    let subject = v.get("subject").ok_or("`subject` is missing")?;
    let content = subject
        .get("content")
        .filter(|c| c.is_object())
        .ok_or("`subject.content` must be an object")?;
    let repository = content.get("repository");
    let (repo_id, repo_source) = match repository {
        Some(r) => (
            Some(text(r, "id", "subject.content.repository")?),
            r.get("source").and_then(Value::as_str).map(str::to_string),
        ),
        None => (None, None),
    };
    if ty.starts_with("dev.cdevents.change.merged.") && repo_id.is_none() {
        return Err(
            "`subject.content.repository` is needed to know which pipeline delivers the change"
                .into(),
        );
    }
    Ok(Incoming {
        id: text(ctx, "id", "context")?,
        source: text(ctx, "source", "context")?,
        ty,
        timestamp,
        subject_id: text(subject, "id", "subject")?,
        repository: repo_id,
        repository_source: repo_source,
        user: content
            .get("user")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_change_merged_and_names_what_is_wrong() {
        let ok = br#"{"context":{"specversion":"0.5.0","id":"271069a8","source":"/event/source/123","type":"dev.cdevents.change.merged.0.3.0","timestamp":"2023-03-20T14:27:05.315384Z"},"subject":{"id":"mySubject123","source":"/event/source/123","content":{"repository":{"id":"cdevents/service1","source":"my-git.example"}}}}"#;
        let i = parse_incoming(ok).unwrap();
        assert_eq!(i.repository.as_deref(), Some("cdevents/service1"));
        assert_eq!(i.subject_id, "mySubject123");
        let wrapped = json!({"specversion":"1.0","id":"x","source":"y","type":"dev.cdevents.change.merged.0.3.0",
            "data": serde_json::from_slice::<Value>(ok).unwrap()});
        assert_eq!(parse_incoming(wrapped.to_string().as_bytes()).unwrap(), i);
        let bad = String::from_utf8_lossy(ok).replace("change.merged", "change.created");
        assert!(
            parse_incoming(bad.as_bytes())
                .unwrap_err()
                .contains("not taken as a change")
        );
        let bad = String::from_utf8_lossy(ok).replace("\"0.5.0\"", "\"0.4.1\"");
        assert!(
            parse_incoming(bad.as_bytes())
                .unwrap_err()
                .contains("0.4.1")
        );
        let bad = String::from_utf8_lossy(ok).replace(",\"content\":{\"repository\":{\"id\":\"cdevents/service1\",\"source\":\"my-git.example\"}}", ",\"content\":{}");
        assert!(
            parse_incoming(bad.as_bytes())
                .unwrap_err()
                .contains("repository")
        );
        assert!(parse_incoming(b"{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn subjects_and_purls() {
        let v = json!({"context": {"type": "dev.cdevents.pipelinerun.finished.0.3.0"}});
        assert_eq!(subject_of(&v), "cdevents.pipelinerun.finished");
        let a = ObjectRef {
            bucket: "b".into(),
            name: "n".into(),
            digest: format!("sha256:{}", "ab".repeat(32)).into(),
            size: 1,
        };
        let p = purl("model server", &a);
        assert!(p.starts_with("pkg:generic/model%20server@"), "{p}");
        assert!(p.ends_with(&format!("?checksum=sha256:{}", "ab".repeat(32))));
    }
}
