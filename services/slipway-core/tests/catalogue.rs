//! The event catalogue's generated artefacts stay in step with the code:
//! `schemas/events/*.json`, `schemas/pipeline.schema.json` and `docs/events.md`.
//!
//! Run with `SLIPWAY_BLESS=1` to rewrite them after changing an event or the spec.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use slipway_domain::events::{
    CATALOGUE, ChangeRejected, ChangeSubmitted, Check, EventData, IncidentOpened, RunEnded,
    SourceRef, Verdict,
};
use slipway_domain::sim::{Answer, Sim};
use slipway_domain::spec::PipelineSpec;
use slipway_domain::{Event, Phase, decide::run_ended, ids};

fn root() -> PathBuf {
    slipway_core::testing::workspace_root()
}

const FULL: &str = include_str!("../../../schemas/examples/full-pipeline.toml");

fn bless() -> bool {
    std::env::var_os("SLIPWAY_BLESS").is_some()
}

/// Compares a generated file with the committed one, or rewrites it when blessing.
fn check_file(rel: &str, generated: &str) {
    let path = root().join(rel);
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{rel} missing: run the tests with SLIPWAY_BLESS=1"));
    assert!(
        committed == generated,
        "{rel} is out of date with the code: run the tests with SLIPWAY_BLESS=1"
    );
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap();
    s.push('\n');
    s
}

#[test]
fn event_schemas_are_generated_from_the_types() {
    for e in CATALOGUE {
        let schema = serde_json::to_value((e.schema)()).unwrap();
        check_file(
            &format!("schemas/events/{}.json", e.type_name),
            &pretty(&schema),
        );
    }
    let spec = serde_json::to_value(schemars::schema_for!(PipelineSpec)).unwrap();
    check_file("schemas/pipeline.schema.json", &pretty(&spec));
}

/// One example of every event type, from simulated runs through every path.
fn examples() -> BTreeMap<&'static str, Event> {
    let mut out: BTreeMap<&'static str, Event> = BTreeMap::new();
    let mut take = |log: &[Event]| {
        for e in log {
            out.entry(e.type_name()).or_insert_with(|| e.clone());
        }
    };
    let live = |sim: &mut Sim| {
        sim.live.insert(
            "production".into(),
            (
                "support-bot-3f2a9c1b7d20".into(),
                slipway_domain::sim::artifact("old"),
            ),
        );
    };
    let mut ok = Sim::new(FULL);
    live(&mut ok);
    ok.run_to_end();
    take(&ok.log);
    // The policy's automatic approval, when every gate passed cleanly.
    let mut auto =
        Sim::new(&FULL.replace("auto_approve = \"never\"", "auto_approve = \"when_clean\""));
    live(&mut auto);
    auto.script
        .insert("approval:production".into(), Answer::Silent);
    auto.run_to_end();
    take(&auto.log);
    let failures: &[(&str, &str)] = &[
        ("build", "build command failed with exit code 2"),
        (
            "test:unit",
            "suite unit: 1 of 40 cases failed: cart.applies_discount",
        ),
        ("deploy:staging", "deploy command failed with exit code 1"),
        ("evaluate", "faq: exact_match 0.62 < min 0.70"),
        ("perf", "p95_ms 912 > max 800"),
        ("cost", "4120.50/month > budget 4000.00"),
        ("approval:production", "not before the holiday freeze"),
        ("monitor:production", "error_rate 0.07 > max 0.01"),
    ];
    for (stage, reason) in failures {
        let mut sim = Sim::new(FULL);
        live(&mut sim);
        sim.script
            .insert(stage.to_string(), Answer::Fail(reason.to_string()));
        if *stage == "monitor:production" {
            sim.run_to_end();
            take(&sim.log);
            let mut sim = Sim::new(FULL);
            live(&mut sim);
            sim.script
                .insert(stage.to_string(), Answer::Fail(reason.to_string()));
            sim.script.insert(
                "rollback:production".into(),
                Answer::Fail("deploy command failed with exit code 3".into()),
            );
            sim.run_to_end();
            take(&sim.log);
        } else {
            sim.run_to_end();
            take(&sim.log);
        }
    }
    // Rollouts: promoted, aborted (the candidate slot rolled back), and a failed promotion.
    let canary = |script: &[(&str, &str)]| {
        let mut sim = Sim::new(slipway_domain::sim::CANARY_PIPELINE);
        sim.live.insert(
            "production".into(),
            (
                "svc-3f2a9c1b7d20".into(),
                slipway_domain::sim::artifact("old"),
            ),
        );
        for (stage, reason) in script {
            sim.script
                .insert(stage.to_string(), Answer::Fail(reason.to_string()));
        }
        sim.run_to_end();
        sim
    };
    take(&canary(&[]).log);
    take(
        &canary(&[(
            "rollout:production",
            "step 1 at 5%: score 0 is below the marginal score 75",
        )])
        .log,
    );
    take(
        &canary(&[(
            "promote:production",
            "deploy command failed with exit code 1",
        )])
        .log,
    );
    let t = Utc.with_ymd_and_hms(2026, 1, 1, 11, 59, 0).unwrap();
    let run_id = ok.run_id.clone();
    let rollout_stage = "rollout:production".to_string();
    let spec = PipelineSpec::parse(slipway_domain::sim::CANARY_PIPELINE).unwrap();
    let rollout_spec = spec.environment[0].rollout.clone().unwrap();
    let window = |requests: f64, errors: f64| slipway_domain::rollout::Window {
        counters: [
            ("http_requests_total".to_string(), requests),
            ("http_errors_total".to_string(), errors),
        ]
        .into(),
        histograms: BTreeMap::new(),
    };
    let mut look = slipway_domain::rollout::look(
        &rollout_spec,
        slipway_domain::rollout::StepAt {
            step: 0,
            weight: 5.0,
            elapsed_secs: 30,
            duration_secs: 60,
            max_hold_secs: 60,
            ab_p: 1.0,
        },
        &window(9_500.0, 95.0),
        &window(500.0, 61.0),
        t,
    )
    .analysis;
    look.stage = rollout_stage.clone();
    look.attempt = 1;
    let weight = slipway_domain::rollout::WeightSet {
        stage: rollout_stage.clone(),
        attempt: 1,
        environment: "production".into(),
        step: 0,
        weight: 5.0,
        cause: slipway_domain::rollout::WeightCause::Step,
        published: vec![
            "/srv/flags/flags.json".into(),
            "kv:slipway-flags/svc-production".into(),
        ],
        at: t,
    };
    take(&[
        Event::new(
            slipway_domain::rollout::weight_event_id(&run_id, &weight),
            "/slipway/monitor",
            Some(run_id.clone()),
            t,
            EventData::RolloutWeightSet(weight),
        ),
        Event::new(
            slipway_domain::rollout::analysis_event_id(&run_id, &look),
            "/slipway/monitor",
            Some(run_id.clone()),
            t,
            EventData::RolloutAnalysed(look),
        ),
        Event::new(
            ids::derived(&[&run_id, "rollout.controlled", "1"]),
            "/slipway/approval",
            Some(run_id.clone()),
            t,
            EventData::RolloutControlled(slipway_domain::rollout::RolloutControl {
                stage: rollout_stage,
                attempt: 1,
                action: slipway_domain::rollout::ControlAction::Pause,
                by: "bob".into(),
                groups: vec!["release-managers".into()],
                comment: Some("checking the dashboards".into()),
                at: t,
                signature: Some("base64-ed25519-signature".into()),
            }),
        ),
    ]);
    let mut extra = vec![
        Event::new(
            "change-1",
            "/sim",
            None,
            t,
            EventData::ChangeSubmitted(ChangeSubmitted {
                spec: "[pipeline]\nname = \"support-bot\"\n…".into(),
                source: SourceRef::Git {
                    url: "https://git.example.com/acme/support-bot.git".into(),
                    revision: "9f1c2e4".into(),
                },
                author: Some("alice".into()),
                title: Some("Retrieval: rerank top 20".into()),
                rerun_of: None,
                commit: None,
            }),
        ),
        Event::new(
            ids::derived(&["change.rejected", "17"]),
            "/slipway/conductor",
            None,
            t,
            EventData::ChangeRejected(ChangeRejected {
                change_seq: 17,
                change_subject: "slipway.changes.git-hook".into(),
                change_id: Some("commit-77".into()),
                change_source: Some("git-hook/acme".into()),
                reason: "invalid pipeline spec: build.command: invalid type: string \"make\", expected a sequence".into(),
            }),
        ),
        Event::new(
            ids::derived(&[&run_id, "evaluate.calibrated", "evaluate", "1"]),
            "/slipway/model-evaluator",
            Some(run_id.clone()),
            t,
            EventData::EvaluateCalibrated(slipway_domain::events::Calibration {
                stage: "evaluate".into(),
                attempt: 1,
                repeats: 5,
                datasets: vec![slipway_domain::events::DatasetNoise {
                    dataset: "faq".into(),
                    items: 200,
                    unstable: 1,
                    metrics: [(
                        "exact_match".to_string(),
                        slipway_domain::events::MetricNoise {
                            items: 200,
                            unstable: 1,
                            agreement: 0.997,
                            flip_rate: 0.003,
                            majority_flip_rate: 0.0012,
                        },
                    )]
                    .into(),
                    unstable_items: vec![slipway_domain::events::ItemAgreement {
                        id: "refund-policy-3".into(),
                        metrics: vec!["exact_match".into()],
                        agreement: 0.6,
                    }],
                    unstable_not_listed: 0,
                }],
            }),
        ),
        Event::new(
            ids::derived(&[&run_id, "incident", "inc-1"]),
            "/slipway/monitor",
            Some(run_id.clone()),
            t,
            EventData::IncidentOpened(IncidentOpened {
                incident_id: "inc-1".into(),
                environment: "production".into(),
                version: "support-bot-8c1d2e3f4a5b".into(),
                breaches: vec![Check {
                    metric: "error_rate".into(),
                    scope: Some("production".into()),
                    candidate: 0.07,
                    baseline: Some(0.004),
                    delta: Some(0.066),
                    p_value: None,
                    interval: None,
                    verdict: Verdict::Fail,
                    note: "error_rate 0.07 > max 0.01".into(),
                    bounds: None,
                    detectable: None,
                }],
                opened_at: t,
            }),
        ),
        Event::new(
            ids::run_end(&run_id),
            "/slipway/cli",
            Some(run_id.clone()),
            t,
            run_ended(
                Phase::Cancelled,
                RunEnded {
                    reason: "wrong branch".into(),
                    stage: None,
                    by: Some("alice".into()),
                },
            ),
        ),
    ];
    take(&extra);
    extra.clear();
    out
}

fn subject_pattern(e: &Event) -> String {
    let s = e.nats_subject();
    match &e.subject {
        Some(run) => s.replace(run, "<run_id>"),
        None => s,
    }
}

#[test]
fn every_event_type_has_a_valid_example_and_the_catalogue_doc_is_current() {
    let examples = examples();
    let mut doc = String::from(include_str!("catalogue_intro.md"));
    for entry in CATALOGUE {
        let e = examples
            .get(entry.type_name)
            .unwrap_or_else(|| panic!("no example of {}", entry.type_name));
        // The example's data meets its schema.
        let schema = serde_json::to_value((entry.schema)()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let data = e.data.to_json();
        let errors: Vec<String> = validator
            .iter_errors(&data)
            .map(|x| x.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", entry.type_name);

        doc.push_str(&format!(
            "\n### `{}`\n\n| | |\n|---|---|\n| subject | `{}` |\n| producer | {} |\n| consumers | {} |\n| data | `{}` ([schema](../schemas/events/{}.json)) |\n\n```json\n{}\n```\n",
            entry.type_name,
            subject_pattern(e),
            entry.producer,
            entry.consumers.join(", "),
            entry.data_type,
            entry.type_name,
            serde_json::to_string_pretty(&e.to_structured_json()).unwrap(),
        ));
    }
    check_file("docs/events.md", &doc);
}

#[test]
fn the_pipeline_schema_and_the_parser_agree() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/pipeline.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let as_json = |toml_text: &str| -> Value {
        let v: toml::Value = toml::from_str(toml_text).unwrap();
        serde_json::to_value(v).unwrap()
    };
    for good in [
        FULL.to_string(),
        std::fs::read_to_string(root().join("deploy/examples/hello/slipway.toml")).unwrap(),
    ] {
        assert!(PipelineSpec::parse(&good).is_ok());
        let errors: Vec<String> = validator
            .iter_errors(&as_json(&good))
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
    }
    // Shape errors: both the schema and the parser refuse them.
    let bad = [
        "[pipeline]\nname='x'\n[build]\ncommand='make'\n",
        "[pipeline]\nname='x'\n[build]\ncommand=['make']\nunknown=1\n",
        "[pipeline]\nname='x'\n",
        "[pipeline]\nname='x'\n[build]\ncommand=['make']\ntimeout_secs=-1\n",
        "[pipeline]\nname='x'\n[build]\ncommand=['make']\n[[test]]\ncommand=['t']\n",
        "[pipeline]\nname='x'\n[build]\ncommand=['make']\n[approval]\nauto_approve='sometimes'\n",
    ];
    for text in bad {
        assert!(
            PipelineSpec::parse(text).is_err(),
            "parser accepted {text:?}"
        );
        assert!(
            !validator.is_valid(&as_json(text)),
            "schema accepted {text:?}"
        );
    }
    let _ = json!({});
}

/// A small YAML emitter for the JSON values the AsyncAPI document is built from.
fn yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    let scalar = |v: &Value| -> String {
        match v {
            Value::String(s) => serde_json::to_string(s).unwrap(),
            other => other.to_string(),
        }
    };
    match v {
        Value::Object(m) if m.is_empty() => out.push_str(" {}\n"),
        Value::Array(a) if a.is_empty() => out.push_str(" []\n"),
        Value::Object(m) => {
            out.push('\n');
            for (k, v) in m {
                out.push_str(&format!("{pad}{}:", serde_json::to_string(k).unwrap()));
                yaml(v, indent + 2, out);
            }
        }
        Value::Array(a) => {
            out.push('\n');
            for v in a {
                out.push_str(&format!("{pad}-"));
                match v {
                    Value::Object(_) | Value::Array(_) => yaml(v, indent + 2, out),
                    s => out.push_str(&format!(" {}\n", scalar(s))),
                }
            }
        }
        s => out.push_str(&format!(" {}\n", scalar(s))),
    }
}

/// `schemas/asyncapi.yaml`: every channel (subject), message (CloudEvent type) and payload
/// (the JSON Schemas), generated from the catalogue.
fn asyncapi() -> String {
    let mut channels = serde_json::Map::new();
    let mut operations = serde_json::Map::new();
    let mut messages = serde_json::Map::new();
    for e in CATALOGUE {
        let (noun, verb) = slipway_domain::events::type_parts(e.type_name).unwrap();
        let (key, address, params) = match (noun, verb) {
            ("change", "submitted") => (
                "changes".to_string(),
                "slipway.changes.{source}".to_string(),
                json!({"source": {"description": "one token naming the producer"}}),
            ),
            ("change", "rejected") => (
                "intake_rejected".to_string(),
                "slipway.intake.rejected".to_string(),
                json!({}),
            ),
            _ => (
                format!("run_{noun}_{verb}"),
                format!("slipway.run.{{runId}}.{noun}.{verb}"),
                json!({"runId": {"description": "the run id (UUIDv5 of the change's source and id)"}}),
            ),
        };
        let msg = e.type_name.replace('.', "_");
        messages.insert(
            msg.clone(),
            json!({
                "name": e.type_name,
                "title": e.type_name,
                "summary": format!("{} (produced by {}; consumed by {})", e.data_type, e.producer, e.consumers.join(", ")),
                "contentType": "application/json",
                "headers": {
                    "type": "object",
                    "required": ["ce-specversion", "ce-id", "ce-source", "ce-type"],
                    "properties": {
                        "ce-specversion": {"type": "string", "const": "1.0"},
                        "ce-id": {"type": "string"},
                        "ce-source": {"type": "string"},
                        "ce-type": {"type": "string", "const": e.type_name},
                        "ce-time": {"type": "string", "format": "date-time"},
                        "ce-subject": {"type": "string"},
                        "ce-traceparent": {"type": "string"},
                        "content-type": {"type": "string", "const": "application/json"},
                        "Nats-Msg-Id": {"type": "string"}
                    }
                },
                "payload": {"$ref": format!("./events/{}.json", e.type_name)},
            }),
        );
        let mut ch = json!({
            "address": address,
            "messages": {msg.clone(): {"$ref": format!("#/components/messages/{msg}")}},
        });
        if params.as_object().is_some_and(|p| !p.is_empty()) {
            ch["parameters"] = params;
        }
        channels.insert(key.clone(), ch);
        operations.insert(
            format!("send_{key}"),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{key}")},
                "summary": format!("{} publishes {}", e.producer, e.type_name),
            }),
        );
    }
    // CDEvents: the ones runs emit (core NATS, `cdevents.<subject>.<predicate>`), and the ones
    // taken as changes on the changes channel.
    let mut files: Vec<_> = std::fs::read_dir(root().join("schemas/cdevents"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for path in files {
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ty = schema["properties"]["context"]["properties"]["type"]["const"]
            .as_str()
            .unwrap()
            .to_string();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let msg = ty.replace(['.', '-'], "_");
        let taken = slipway_domain::cdevents::ACCEPTED
            .iter()
            .any(|a| ty.starts_with(a));
        messages.insert(
            msg.clone(),
            json!({
                "name": ty,
                "title": ty,
                "summary": if taken {
                    "A CDEvent taken as a change, bare or as a CloudEvent in binary mode (the gateway stores one it took in HTTP structured mode so too); the conductor runs the pipeline registered for it"
                } else {
                    "A CDEvent a run emits (published by the gateway; CloudEvents binary mode)"
                },
                "contentType": "application/json",
                // Binary mode: a CloudEvent's attributes as headers, the CDEvent as the
                // payload; a change may also come bare, without them.
                "headers": {
                    "type": "object",
                    "required": if taken { json!([]) } else { json!(["ce-specversion", "ce-id", "ce-source", "ce-type"]) },
                    "properties": {
                        "ce-specversion": {"type": "string", "const": "1.0"},
                        "ce-id": {"type": "string"},
                        "ce-source": {"type": "string"},
                        "ce-type": {"type": "string", "const": ty},
                        "ce-time": {"type": "string", "format": "date-time"},
                        "ce-subject": {"type": "string"},
                        "content-type": {"type": "string", "const": "application/json"},
                        "Nats-Msg-Id": {"type": "string"}
                    }
                },
                "payload": {"$ref": format!("./cdevents/{file}")},
            }),
        );
        let msg_ref = json!({"$ref": format!("#/components/messages/{msg}")});
        if taken {
            channels["changes"]["messages"][&msg] = msg_ref;
            continue;
        }
        let (_, subject, predicate, _) = slipway_domain::cdevents::type_parts(&ty).unwrap();
        let key = format!("cdevents_{}_{predicate}", subject.replace('-', "_"));
        channels.insert(
            key.clone(),
            json!({
                "address": format!("cdevents.{subject}.{predicate}"),
                "messages": {msg: msg_ref},
            }),
        );
        operations.insert(
            format!("send_{key}"),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{key}")},
                "summary": format!("the gateway publishes {ty}"),
            }),
        );
    }
    let doc = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Slipway event log",
            "version": "1.0.0",
            "description": "Every event of the JetStream stream SLIPWAY: CloudEvents 1.0 in binary content mode on NATS (attributes as ce-* headers, data as the payload); and the CDEvents (v0.5) runs emit on cdevents.> (core NATS) or that are taken as changes. Generated from services/slipway-domain/src/events.rs and schemas/cdevents by the catalogue test; do not edit by hand."
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "slipway up's nats-server"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    });
    let mut out = String::from(
        "# Generated by `SLIPWAY_BLESS=1 cargo test -p slipway-core --test catalogue`.",
    );
    yaml(&doc, 0, &mut out);
    out
}

#[test]
fn the_asyncapi_document_describes_the_real_catalogue() {
    let text = asyncapi();
    check_file("schemas/asyncapi.yaml", &text);
    // Every type is a message, every message's payload schema exists, every channel names
    // the subject the event is really published on.
    for e in CATALOGUE {
        assert!(
            text.contains(&format!("\"name\": \"{}\"", e.type_name)),
            "{} missing",
            e.type_name
        );
        assert!(
            root()
                .join(format!("schemas/events/{}.json", e.type_name))
                .is_file()
        );
    }
    for ev in examples().values() {
        let subject = ev.nats_subject();
        let pattern = match &ev.subject {
            Some(run) if subject.starts_with("slipway.run.") => subject.replace(run, "{runId}"),
            _ if subject.starts_with("slipway.changes.") => "slipway.changes.{source}".to_string(),
            _ => subject,
        };
        assert!(
            text.contains(&format!("\"address\": \"{pattern}\"")),
            "no channel {pattern}"
        );
    }
}

#[test]
fn the_fast_decoder_and_the_full_one_agree_on_every_event_type() {
    use slipway_core::bus::binding;
    for (ty, ev) in examples() {
        for traced in [false, true] {
            let mut ev = ev.clone();
            if traced {
                ev.traceparent =
                    Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
                ev.tracestate = Some("vendor=1".into());
            }
            let (headers, payload) = binding::encode(ev.to_cloudevent());
            let full = Event::from_cloudevent(&binding::decode(Some(&headers), &payload).unwrap())
                .unwrap();
            let fast = binding::decode_fast(&headers, &payload)
                .unwrap_or_else(|| panic!("{ty}: the fast path declined Slipway's own form"));
            assert_eq!(fast, full, "{ty}");
            assert_eq!(fast, ev, "{ty}");
        }
    }
}

#[test]
fn the_fast_decoder_leaves_every_other_form_to_the_full_one() {
    use slipway_core::bus::binding;
    let ev = examples().remove("dev.slipway.build.started.v1").unwrap();
    let (headers, payload) = binding::encode(ev.to_cloudevent());
    let with = |name: &str, value: &str| {
        let mut h = headers.clone();
        h.insert(name, value);
        h
    };
    // An extension the envelope drops, another content type, another spec version, the same
    // attribute twice, a bad time, data that does not fit: all declined, and the full path
    // still decodes or explains each.
    for h in [
        with("ce-partitionkey", "p"),
        with("content-type", "application/json; charset=utf-8"),
        with("ce-specversion", "0.3"),
        with("CE-ID", "other"),
        with("ce-time", "yesterday"),
    ] {
        assert!(binding::decode_fast(&h, &payload).is_none(), "{h:?}");
    }
    assert!(binding::decode_fast(&headers, b"{\"stage\": 1}").is_none());
    assert!(binding::decode_fast(&headers, b"").is_none());
    let explained = slipway_core::bus::decode(Some(&headers), b"{\"stage\": 1}").unwrap_err();
    assert!(explained.to_string().contains("stage"), "{explained}");
    // The extension case decodes through the full path to the same event.
    assert_eq!(
        slipway_core::bus::decode(Some(&with("ce-partitionkey", "p")), &payload).unwrap(),
        ev
    );
}
