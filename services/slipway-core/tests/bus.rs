//! The log's NATS binding against a real nats-server: stream set-up, deduplicated and
//! optimistic appends, the binary content mode on the wire.

use std::time::Duration;

use async_nats::jetstream::stream;
use slipway_core::bus::{AppendError, Bus, BusError};
use slipway_core::testing::TestNats;
use slipway_domain::events::{EventData, StageStarted};
use slipway_domain::sim::Sim;
use slipway_domain::{Event, ids};

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

#[tokio::test]
async fn direct_reads_page_through_a_long_run_and_equal_a_consumer_read() {
    let nats = TestNats::start();
    let bus = Bus::connect(&nats.settings(), "test").await.unwrap();
    bus.ensure_stream().await.unwrap();
    // More than two pages of one run, another run interleaved, and a message that is not an
    // event on the long run's subjects.
    let (long, short) = (ids::random(), ids::random());
    let n = 2 * slipway_core::bus::DIRECT_BATCH + 300;
    for i in 0..n {
        bus.publish(&started(&long, &format!("l{i}")))
            .await
            .unwrap();
        if i % 500 == 0 {
            bus.publish(&started(&short, &format!("s{i}")))
                .await
                .unwrap();
        }
    }
    bus.jetstream()
        .publish(
            format!("slipway.run.{long}.build.started"),
            "not an event".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let summary = |log: &[slipway_core::bus::Recorded]| -> Vec<(u64, String, String)> {
        log.iter()
            .map(|r| {
                let what = match &r.event {
                    Ok(e) => e.id.clone(),
                    Err(e) => format!("error: {e}; raw {:?}", r.raw),
                };
                (r.seq, r.subject.clone(), what)
            })
            .collect()
    };
    let by_consumer = bus.run_log(&long).await.unwrap();
    assert_eq!(by_consumer.len(), n + 1);
    let direct = bus
        .read_direct(&slipway_domain::subjects::run(&long), 1)
        .await
        .unwrap();
    assert_eq!(summary(&direct), summary(&by_consumer));
    assert!(direct.last().unwrap().event.is_err());
    assert!(direct.last().unwrap().raw.is_some());

    // Through the last event: the direct read is enough; through a later sequence (a replica
    // that lags would answer short of it): read again through a consumer, same log.
    let last = by_consumer.last().unwrap().seq;
    let through = bus.run_log_through(&long, last).await.unwrap();
    assert_eq!(summary(&through), summary(&by_consumer));
    let beyond = bus.run_log_through(&long, last + 1000).await.unwrap();
    assert_eq!(summary(&beyond), summary(&by_consumer));

    // From a later sequence, and for a run that has no events.
    let from = by_consumer[1500].seq;
    let tail = bus
        .read_direct(&slipway_domain::subjects::run(&long), from)
        .await
        .unwrap();
    assert_eq!(summary(&tail), summary(&by_consumer[1500..]));
    let short_log = bus.run_log_through(&short, 0).await.unwrap();
    assert_eq!(short_log.len(), n.div_ceil(500));
    assert!(
        bus.read_direct(&slipway_domain::subjects::run(&ids::random()), 1)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn what_is_live_follows_deploys_appended_after_the_first_lookup() {
    use slipway_core::store::baseline::live_version;
    let nats = TestNats::start();
    let bus = Bus::connect(&nats.settings(), "test").await.unwrap();
    bus.ensure_stream().await.unwrap();
    let deploys = slipway_core::store::baseline::Deploys::new(&bus);
    assert_eq!(live_version(&deploys, "p", "prod").await.unwrap(), None);
    let (r1, r2) = (ids::random(), ids::random());
    bus.publish(&deploy_event("p", &r1, "prod", "v1", false))
        .await
        .unwrap();
    bus.publish(&deploy_event("q", &r1, "prod", "q1", false))
        .await
        .unwrap();
    let live = live_version(&deploys, "p", "prod").await.unwrap().unwrap();
    assert_eq!(
        (live.version.as_str(), live.run_id.as_str()),
        ("v1", r1.as_str())
    );
    // Appended after the first lookups: seen by the same connection's next lookup, and a
    // fresh connection (reading the whole log) agrees.
    bus.publish(&deploy_event("p", &r2, "prod", "v2", false))
        .await
        .unwrap();
    bus.publish(&deploy_event("p", &r2, "staging", "v2", false))
        .await
        .unwrap();
    let live = live_version(&deploys, "p", "prod").await.unwrap().unwrap();
    assert_eq!(
        (live.version.as_str(), live.run_id.as_str()),
        ("v2", r2.as_str())
    );
    let fresh = Bus::connect(&nats.settings(), "test").await.unwrap();
    let fresh = slipway_core::store::baseline::Deploys::new(&fresh);
    assert_eq!(live_version(&fresh, "p", "prod").await.unwrap(), Some(live));
    assert_eq!(
        live_version(&deploys, "q", "prod")
            .await
            .unwrap()
            .unwrap()
            .version,
        "q1"
    );
}

fn deploy_event(pipeline: &str, run: &str, env: &str, version: &str, rollback: bool) -> Event {
    use slipway_domain::events::{DeploySucceeded, ObjectRef};
    let d = DeploySucceeded {
        stage: format!("deploy:{env}"),
        attempt: 1,
        pipeline: pipeline.into(),
        environment: env.into(),
        version: version.into(),
        artifact: ObjectRef {
            bucket: "b".into(),
            name: version.into(),
            digest: format!("sha256:{version}").into(),
            size: 1,
        },
        previous_version: None,
        log: None,
        duration_ms: 1,
    };
    Event::new(
        ids::random(),
        "/slipway/deployer",
        Some(run.to_string()),
        slipway_core::bus::now(),
        if rollback {
            EventData::RollbackSucceeded(d)
        } else {
            EventData::DeploySucceeded(d)
        },
    )
}

#[tokio::test]
async fn a_process_starts_from_the_deploy_checkpoint_and_reads_only_the_deploys_after_it() {
    use slipway_core::store::baseline::{CHECKPOINT, Deploys, builder_of, live_version};
    use slipway_core::store::checkpoints::Checkpoints;
    let nats = TestNats::start();
    let bus = nats.bus().await;
    for i in 0..50 {
        bus.publish(&deploy_event(
            "p",
            &format!("r{i}"),
            "prod",
            &format!("v{i}"),
            false,
        ))
        .await
        .unwrap();
    }
    let first = Deploys::new(&bus);
    let through = first.checkpoint().await.unwrap();
    assert_eq!(first.deploys_read(), 50);
    // After the checkpoint: a deploy, and a rollback to the version before it.
    bus.publish(&deploy_event("p", "r50", "prod", "v50", false))
        .await
        .unwrap();
    bus.publish(&deploy_event("p", "r51", "prod", "v49", true))
        .await
        .unwrap();
    bus.publish(&deploy_event("p", "r50", "staging", "v50", false))
        .await
        .unwrap();

    // A process started now reads the checkpoint and the three deploys after it.
    let started = Deploys::new(&nats.bus().await);
    let live = live_version(&started, "p", "prod").await.unwrap().unwrap();
    assert_eq!(
        (live.version.as_str(), live.run_id.as_str()),
        ("v49", "r49"),
        "live after the rollback, built by the run that first deployed it"
    );
    assert_eq!(started.deploys_read(), 3, "only the tail after {through}");
    assert_eq!(
        builder_of(&started, "p", "prod", &"sha256:v50".into())
            .await
            .unwrap()
            .as_deref(),
        Some("r50")
    );

    // Retention keeps the runs that built what was deployed lately (the last BUILDERS
    // artifacts of each environment): every deploying run here, not the one that rolled back.
    let builders = started.builders().await.unwrap();
    assert_eq!(builders.len(), 51, "{builders:?}");
    assert!(
        builders.contains("r0") && builders.contains("r50"),
        "{builders:?}"
    );
    assert!(!builders.contains("r51"), "a rollback builds nothing");

    // A checkpoint that cannot be read, or is of another log, is not used: every deploy is
    // read again and the answer is the same.
    let checkpoints = Checkpoints::open(&bus).await.unwrap();
    for bad in [
        b"{not json".to_vec(),
        serde_json::to_vec(&serde_json::json!({
            "stream_created": "another", "through": 2, "here": []
        }))
        .unwrap(),
        serde_json::to_vec(&serde_json::json!({
            "stream_created": bus.stream_state().await.unwrap().0,
            "through": 1_000_000, "here": []
        }))
        .unwrap(),
    ] {
        checkpoints.put_bytes(CHECKPOINT, bad.into()).await.unwrap();
        let rebuilt = Deploys::new(&nats.bus().await);
        assert_eq!(
            live_version(&rebuilt, "p", "prod").await.unwrap(),
            Some(live.clone())
        );
        assert_eq!(rebuilt.deploys_read(), 53);
    }
}

#[tokio::test]
async fn a_confirmed_ack_settles_the_delivery() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures_util::StreamExt;

    let nats = TestNats::start();
    let bus = nats.bus().await;
    let sim = Sim::new(SPEC);
    bus.publish(&sim.log[0]).await.unwrap();
    bus.publish(&started(&sim.run_id, "s1")).await.unwrap();
    let stream = bus.jetstream().get_stream(bus.stream_name()).await.unwrap();
    let mut consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("acks".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    let msg = batch.next().await.unwrap().unwrap();
    let second = batch.next().await.unwrap().unwrap();
    assert_eq!(consumer.info().await.unwrap().num_ack_pending, 2);
    bus.ack_confirmed(&msg).await.unwrap();
    // Confirmed means already applied: one left pending, nothing to redeliver.
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (1, 0));
    // With nobody to confirm it (the consumer gone), the ack is an error, not a silent success.
    stream.delete_consumer("acks").await.unwrap();
    let err = bus.ack_confirmed(&second).await.unwrap_err();
    assert!(err.to_string().contains("ack"), "{err}");
}
