//! The log's NATS binding against a real nats-server: stream set-up, deduplicated and
//! optimistic appends, the binary content mode on the wire.

use std::time::Duration;

use async_nats::jetstream::stream;
use slipway_core::bus::{AppendError, Bus, BusError};
use slipway_core::events::{EventData, StageStarted};
use slipway_core::sim::Sim;
use slipway_core::testing::TestNats;
use slipway_core::{Event, ids};

const SPEC: &str = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"true\"]\n";

fn started(run: &str, id: &str) -> Event {
    Event::new(
        id,
        "/slipway/builder",
        Some(run.to_string()),
        slipway_core::bus::now(),
        EventData::BuildStarted(StageStarted {
            stage: "build".into(),
            attempt: 1,
            worker: "w".into(),
        }),
    )
}

#[tokio::test]
async fn stream_creation_is_idempotent_and_an_incompatible_stream_is_named() {
    let nats = TestNats::start();
    let bus = Bus::connect(&nats.settings(), "test").await.unwrap();
    bus.ensure_stream().await.unwrap();
    bus.ensure_stream().await.unwrap();

    // Another application's stream under the same name, in memory: refused, naming why.
    let mut settings = nats.settings();
    settings.stream.name = "OTHER".into();
    let other = Bus::connect(&settings, "test").await.unwrap();
    other
        .jetstream()
        .create_stream(stream::Config {
            name: "OTHER".into(),
            subjects: vec!["elsewhere.>".into()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = other.ensure_stream().await.unwrap_err();
    let BusError::IncompatibleStream { differences, .. } = &err else {
        panic!("{err}")
    };
    assert!(differences.contains("storage is Memory"), "{err}");
    assert!(differences.contains("subjects"), "{err}");

    // A different duplicate window is a tunable: updated in place.
    let mut settings = nats.settings();
    settings.stream.duplicate_window_secs = 300;
    let tuned = Bus::connect(&settings, "test").await.unwrap();
    let mut s = tuned.ensure_stream().await.unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
}

#[tokio::test]
async fn repeated_ids_are_duplicates_and_stale_decisions_conflict() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let sim = Sim::new(SPEC);
    let run = sim.run_id.clone();
    let created = sim.log[0].clone();

    // The run does not exist yet: expected sequence 0.
    let first = bus.append(&created, &run, 0).await.unwrap();
    assert!(!first.duplicate);
    // The same event again is a duplicate: success, same sequence, nothing stored.
    let again = bus.publish(&created).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, first.seq);

    // A fact moves the run on; a decision made before it loses.
    let fact = bus.publish(&started(&run, "f1")).await.unwrap();
    let stale = Event {
        id: ids::derived(&[&run, "decision"]),
        ..started(&run, "x")
    };
    let err = bus.append(&stale, &run, first.seq).await.unwrap_err();
    assert!(matches!(err, AppendError::Conflict { .. }), "{err}");
    // Re-folded, the same decision lands.
    bus.append(&stale, &run, fact.seq).await.unwrap();

    // Another run's events do not disturb this run's expectation.
    let other = Sim::new(&SPEC.replace("\"p\"", "\"q\""));
    let other_created = Event {
        subject: Some("another-run".into()),
        ..other.log[0].clone()
    };
    bus.append(&other_created, "another-run", 0).await.unwrap();
    let log = bus.run_log(&run).await.unwrap();
    assert_eq!(log.len(), 3);
    let last = log.last().unwrap().seq;
    bus.append(&started(&run, "f2"), &run, last).await.unwrap();
}

#[tokio::test]
async fn events_travel_in_binary_mode_and_read_back_equal() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let mut event = started("r1", "e1");
    event.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let mut sub = bus.client().subscribe("slipway.run.r1.>").await.unwrap();
    bus.publish(&event).await.unwrap();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::StreamExt::next(&mut sub),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(msg.subject.as_str(), "slipway.run.r1.build.started");
    let h = msg.headers.as_ref().unwrap();
    assert_eq!(
        h.get("ce-type").unwrap().as_str(),
        "dev.slipway.build.started.v1"
    );
    assert_eq!(h.get("ce-id").unwrap().as_str(), "e1");
    assert_eq!(h.get("ce-subject").unwrap().as_str(), "r1");
    assert!(h.get("ce-traceparent").is_some());
    assert_eq!(h.get("content-type").unwrap().as_str(), "application/json");
    assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "e1");
    let body: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(body["stage"], "build");
    let back = bus.run_log("r1").await.unwrap();
    assert_eq!(back[0].event.as_ref().unwrap(), &event);
}
