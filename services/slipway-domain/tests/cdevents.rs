//! Every CDEvent Slipway emits validates against the CDEvents v0.5 schemas shipped under
//! `schemas/cdevents/`, and reads back as the CDEvents SDK's own types (generated from the
//! specification's schemas): a second, independent reading.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use slipway_domain::cdevents::{self, for_event, parse_incoming};
use slipway_domain::events::{CaseStatus, Check, EventData, IncidentOpened, TestCase};
use slipway_domain::sim::{Answer, Sim, artifact};
use slipway_domain::{Event, fold};

const FULL: &str = include_str!("../../../schemas/examples/full-pipeline.toml");

/// The shipped schemas, by the CDEvents type each one fixes.
fn schemas() -> BTreeMap<String, jsonschema::Validator> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/cdevents");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ty = schema["properties"]["context"]["properties"]["type"]["const"]
            .as_str()
            .unwrap_or_else(|| panic!("{} fixes no type", path.display()))
            .to_string();
        let v = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.insert(ty, v);
    }
    out
}

/// The CDEvents of a log, each event folded into its run first (as the gateway does).
fn cdevents_of(log: &[Event]) -> Vec<Value> {
    let mut run = None;
    let mut out = Vec::new();
    for e in log {
        run = fold(run, e);
        out.extend(for_event(
            e,
            run.as_ref().unwrap(),
            Some("https://slipway.example"),
        ));
    }
    out
}

fn check_all(events: &[Value]) -> BTreeSet<String> {
    let schemas = schemas();
    let mut types = BTreeSet::new();
    for e in events {
        let ty = e["context"]["type"].as_str().unwrap().to_string();
        let v = schemas
            .get(&ty)
            .unwrap_or_else(|| panic!("no shipped schema for {ty}"));
        let errors: Vec<String> = v.iter_errors(e).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{ty} violates its schema: {errors:?}\n{e:#}"
        );
        // The SDK's types deny unknown fields and check the content of every standard type.
        let read: Result<cdevents_sdk::CDEvent, _> = serde_json::from_value(e.clone());
        assert!(
            read.is_ok(),
            "{ty}: the CDEvents SDK cannot read it: {read:?}\n{e:#}"
        );
        assert_eq!(e["context"]["specversion"], cdevents::SPEC_VERSION);
        types.insert(ty);
    }
    // Ids are unique: one CDEvent per fact.
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|e| e["context"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len());
    types
}

#[test]
fn a_delivered_run_speaks_cdevents_that_meet_the_schemas() {
    let mut sim = Sim::new(FULL);
    sim.run_to_end();
    let events = cdevents_of(&sim.log);
    let types = check_all(&events);
    for t in [
        "dev.cdevents.pipelinerun.queued.0.3.0",
        "dev.cdevents.pipelinerun.started.0.3.0",
        "dev.cdevents.pipelinerun.finished.0.3.0",
        "dev.cdevents.build.finished.0.3.0",
        "dev.cdevents.testsuiterun.finished.0.3.0",
        "dev.cdevents.service.deployed.0.3.0",
        "dev.cdeventsx.slipway-gate.finished.0.1.0",
        "dev.cdeventsx.slipway-approval.decided.0.1.0",
        "dev.cdeventsx.slipway-monitor.finished.0.1.0",
    ] {
        assert!(types.contains(t), "{t} emitted: {types:?}");
    }
    let finished = events
        .iter()
        .find(|e| e["context"]["type"] == "dev.cdevents.pipelinerun.finished.0.3.0")
        .unwrap();
    assert_eq!(finished["subject"]["content"]["outcome"], "success");
    assert_eq!(finished["subject"]["id"], sim.run_id.as_str());
    assert_eq!(
        finished["subject"]["content"]["uri"],
        format!("https://slipway.example/v1/runs/{}", sim.run_id)
    );
    // Deterministic: the same log says the same CDEvents.
    assert_eq!(cdevents_of(&sim.log), events);
}

#[test]
fn a_rolled_back_run_reports_the_incident_the_rollback_and_each_test_case() {
    let mut sim = Sim::new(FULL);
    sim.live.insert(
        "production".into(),
        ("support-bot-000000000000".into(), artifact("old")),
    );
    sim.script.insert(
        "monitor:production".into(),
        Answer::Fail("error rate 7% > 1%".into()),
    );
    sim.run_to_end();
    let mut log = sim.log.clone();
    // The monitor's incident, and a suite report with cases, as the services write them.
    let incident = Event::new(
        "incident-1",
        "/slipway/monitor",
        Some(sim.run_id.clone()),
        sim.now,
        EventData::IncidentOpened(IncidentOpened {
            incident_id: "inc-1".into(),
            environment: "production".into(),
            version: "support-bot-1".into(),
            breaches: vec![
                serde_json::from_value::<Check>(json!({
                    "metric": "error_rate", "candidate": 0.07, "verdict": "fail",
                    "note": "error rate 7% > 1%"
                }))
                .unwrap(),
            ],
            opened_at: sim.now,
        }),
    );
    let at = log
        .iter()
        .position(|e| matches!(e.data, EventData::RollbackRequested(_)))
        .unwrap();
    log.insert(at, incident);
    let test_at = log
        .iter()
        .position(|e| matches!(e.data, EventData::TestSucceeded(_)))
        .unwrap();
    if let EventData::TestSucceeded(t) = &mut log[test_at].data {
        for (i, status) in [CaseStatus::Passed, CaseStatus::Failed, CaseStatus::Skipped]
            .into_iter()
            .enumerate()
        {
            t.cases.push(TestCase {
                name: format!("case_{i}"),
                class: Some("suite.Module".into()),
                status,
                duration_ms: Some(3),
                message: (status == CaseStatus::Failed).then(|| "assert 1 == 2".into()),
            });
        }
    }
    let events = cdevents_of(&log);
    let types = check_all(&events);
    for t in [
        "dev.cdevents.incident.detected.0.3.0",
        "dev.cdevents.service.rolledback.0.3.0",
        "dev.cdevents.incident.resolved.0.3.0",
        "dev.cdevents.testcaserun.finished.0.3.0",
    ] {
        assert!(types.contains(t), "{t} emitted: {types:?}");
    }
    let cases: Vec<&Value> = events
        .iter()
        .filter(|e| e["context"]["type"] == "dev.cdevents.testcaserun.finished.0.3.0")
        .collect();
    assert_eq!(
        cases.len(),
        2,
        "passed and failed cases; skipped ones are not finished runs"
    );
    assert_eq!(cases[1]["subject"]["content"]["outcome"], "failure");
    assert_eq!(
        cases[1]["subject"]["content"]["testCase"]["id"],
        "suite.Module.case_1"
    );
    let finished = events
        .iter()
        .find(|e| e["context"]["type"] == "dev.cdevents.pipelinerun.finished.0.3.0")
        .unwrap();
    assert_eq!(finished["subject"]["content"]["outcome"], "failure");
    assert!(finished["subject"]["content"]["errors"].as_str().is_some());
}

/// The specification's own example shape of a `change.merged`, written by hand.
const CHANGE_MERGED: &str = r#"{
  "context": {
    "specversion": "0.5.0",
    "id": "271069a8-fc18-44f1-b38f-9d70a1695819",
    "source": "/event/source/123",
    "type": "dev.cdevents.change.merged.0.3.0",
    "timestamp": "2023-03-20T14:27:05.315384Z"
  },
  "subject": {
    "id": "mySubject123",
    "source": "/event/source/123",
    "content": {
      "repository": {
        "id": "cdevents/service1",
        "source": "my-git.example"
      }
    }
  }
}"#;

#[test]
fn an_independent_change_merged_meets_the_schema_and_is_taken() {
    let v: Value = serde_json::from_str(CHANGE_MERGED).unwrap();
    let schemas = schemas();
    assert!(schemas["dev.cdevents.change.merged.0.3.0"].is_valid(&v));
    assert!(serde_json::from_value::<cdevents_sdk::CDEvent>(v).is_ok());
    let i = parse_incoming(CHANGE_MERGED.as_bytes()).unwrap();
    assert_eq!(i.repository.as_deref(), Some("cdevents/service1"));
    // A schema that accepted anything would not catch this.
    let mut bad: Value = serde_json::from_str(CHANGE_MERGED).unwrap();
    bad["subject"]["content"]["repository"]["colour"] = json!("red");
    assert!(!schemas["dev.cdevents.change.merged.0.3.0"].is_valid(&bad));
}
