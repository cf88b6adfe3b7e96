//! The runs in flight, as a worker follows them, against a real nats-server: what the view
//! vouches for equals a read of the log, and what it cannot vouch for it says so.

use std::time::Duration;

use slipway_core::bus::Bus;
use slipway_core::runtime::follow::RunsInFlight;
use slipway_core::store::baseline::{Deploys, live_version, live_version_as_of};
use slipway_core::testing::TestNats;
use slipway_domain::events::{EventData, StageKind};
use slipway_domain::sim::Sim;
use slipway_domain::spec::NOOP_PIPELINE;
use slipway_domain::{Event, Run};
use tokio_util::sync::CancellationToken;

async fn reached(view: &RunsInFlight, seq: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while view.through() < seq {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the view follows the log");
}

async fn connected(nats: &TestNats) -> Bus {
    let bus = Bus::connect(&nats.settings(), "test").await.unwrap();
    bus.ensure_stream().await.unwrap();
    bus
}

/// Appends the events in order; the stream sequence of the last.
async fn publish_all(bus: &Bus, events: &[Event]) -> u64 {
    let mut last = 0;
    for e in events {
        last = bus.publish(e).await.unwrap().seq;
    }
    last
}

fn replayed(bus_log: Vec<slipway_core::bus::Recorded>) -> Run {
    let events: Vec<Event> = bus_log.into_iter().filter_map(|r| r.event.ok()).collect();
    Run::replay(&events).unwrap()
}

#[tokio::test]
async fn the_view_holds_runs_created_after_it_started_as_the_log_does_and_lets_ended_ones_go() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let deploys = Deploys::new(&bus);
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();

    // A run created before the view: not vouched for, whatever the view later sees of it.
    let mut before = Sim::nth(NOOP_PIPELINE, 1);
    bus.publish(&before.log[0]).await.unwrap();
    let view = RunsInFlight::start(&deploys, stop.clone()).await.unwrap();

    let mut sim = Sim::nth(NOOP_PIPELINE, 2);
    sim.run_to_end();
    assert!(sim.run().is_ended());
    let run_id = sim.run_id.clone();
    // Everything but the end, one event at a time, the view equal to a read at each step.
    let end_at = sim
        .log
        .iter()
        .rposition(|e| !matches!(e.data, EventData::RunSucceeded(_)));
    let (upto, rest) = sim.log.split_at(end_at.unwrap() + 1);
    let mut last = 0;
    for e in upto {
        last = bus.publish(e).await.unwrap().seq;
        reached(&view, last).await;
        let (run, last_seq) = view
            .run_through(&run_id, last)
            .await
            .unwrap_or_else(|| panic!("vouched for at {last}: {view:?} {}", e.data.type_name()));
        assert_eq!(last_seq, last);
        assert_eq!(run, replayed(bus.run_log(&run_id).await.unwrap()));
    }
    assert!(!view.run_through(&run_id, last).await.unwrap().0.is_ended());
    assert_eq!(view.ended_through(&run_id, last).await, Some(false));
    // Jobs of the run stop on this when the view sees the run end.
    let (_, _, ended) = view.run_and_end_through(&run_id, last).await.unwrap();
    assert!(!ended.is_cancelled());

    // A message on the run's subjects that is not an event still moves its last sequence
    // (appends expect the log as last seen).
    let junk = bus
        .jetstream()
        .publish(
            format!("slipway.run.{run_id}.build.started"),
            "not an event".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let (_, last_seq) = view.run_through(&run_id, junk).await.unwrap();
    assert_eq!(last_seq, junk);

    // The earlier run moves on: still not vouched for (its start was never seen).
    before.run_to_end();
    let seq = bus.publish(&before.log[1]).await.unwrap().seq;
    assert!(view.run_through(&before.run_id, seq).await.is_none());

    // The view cannot vouch for what it has not reached: a sequence not yet in the log.
    assert!(view.run_through(&run_id, seq + 100).await.is_none());
    assert_eq!(view.ended_through(&run_id, seq + 100).await, None);

    // The end: the run is let go, and said to have ended.
    last = publish_all(&bus, rest).await;
    assert!(view.run_through(&run_id, last).await.is_none());
    assert_eq!(view.ended_through(&run_id, last).await, Some(true));
    assert!(view.is_empty(), "{view:?}");
    assert!(ended.is_cancelled(), "the view saw the end");
}

#[tokio::test]
async fn a_workers_view_holds_only_the_runs_that_can_ask_for_its_kinds_and_still_follows_deploys() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let deploys = Deploys::new(&bus);
    // Each view on its own connection, feeding its own index of deploys.
    let evaluator_bus = Bus::connect(&nats.settings(), "test").await.unwrap();
    let evaluator_deploys = Deploys::new(&evaluator_bus);
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let builder = RunsInFlight::start_for(&deploys, &[StageKind::Build], stop.clone())
        .await
        .unwrap();
    let evaluator =
        RunsInFlight::start_for(&evaluator_deploys, &[StageKind::Evaluate], stop.clone())
            .await
            .unwrap();

    // A no-op run has no evaluation: the evaluator's view does not hold it.
    let mut sim = Sim::nth(NOOP_PIPELINE, 1);
    sim.run_to_end();
    let run_id = sim.run_id.clone();
    let (upto, _) = sim.log.split_at(sim.log.len() - 1);
    let last = publish_all(&bus, upto).await;
    reached(&builder, last).await;
    reached(&evaluator, last).await;
    let (run, _) = builder.run_through(&run_id, last).await.unwrap();
    assert_eq!(run, replayed(bus.run_log(&run_id).await.unwrap()));
    assert!(evaluator.run_through(&run_id, last).await.is_none());
    assert!(evaluator.is_empty(), "{evaluator:?}");

    // Its deploys still reach the evaluator's index: no lookup reads (the view
    // started with the log empty, so nothing came before it).
    for env in ["staging", "production"] {
        let live = live_version_as_of(&evaluator_deploys, "noop", env, last)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(live.run_id, run_id, "{env}");
    }
    assert_eq!(evaluator_deploys.reads(), 0);
}

#[tokio::test]
async fn the_view_keeps_the_connections_index_of_deploys_current_without_reads() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let deploys = Deploys::new(&bus);
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();

    // A deploy before the view started: found by the first lookup's read.
    let mut first = Sim::nth(NOOP_PIPELINE, 1);
    first.run_to_end();
    for e in &first.log {
        bus.publish(e).await.unwrap();
    }
    let view = RunsInFlight::start(&deploys, stop.clone()).await.unwrap();
    let now = view.through();
    let live = live_version_as_of(&deploys, "noop", "production", now)
        .await
        .unwrap();
    assert_eq!(live.unwrap().run_id, first.run_id);
    assert_eq!(deploys.reads(), 1);

    // Deploys after it: the view takes them in as it follows the log; no lookup reads.
    let mut second = Sim::nth(NOOP_PIPELINE, 2);
    second.run_to_end();
    let last = publish_all(&bus, &second.log).await;
    reached(&view, last).await;
    for env in ["staging", "production"] {
        let live = live_version_as_of(&deploys, "noop", env, last)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(live.run_id, second.run_id, "{env}");
    }
    assert_eq!(deploys.reads(), 1);
    // As of now (no sequence), a lookup reads: a follower may lag.
    live_version(&deploys, "noop", "production").await.unwrap();
    assert_eq!(deploys.reads(), 2);
    // A fresh connection, reading the whole log, agrees.
    let fresh = Bus::connect(&nats.settings(), "test").await.unwrap();
    assert_eq!(
        live_version(&Deploys::new(&fresh), "noop", "production")
            .await
            .unwrap(),
        live_version(&deploys, "noop", "production").await.unwrap()
    );
    assert!(
        second
            .log
            .iter()
            .any(|e| matches!(e.data, EventData::DeploySucceeded(_)))
    );
}

#[tokio::test]
async fn a_lookup_past_where_the_view_stopped_reads_the_log() {
    let nats = TestNats::start();
    let bus = connected(&nats).await;
    let deploys = Deploys::new(&bus);
    let stop = CancellationToken::new();
    let view = RunsInFlight::start(&deploys, stop.clone()).await.unwrap();
    let mut first = Sim::nth(NOOP_PIPELINE, 1);
    first.run_to_end();
    let mut last = publish_all(&bus, &first.log).await;
    reached(&view, last).await;
    let live = live_version_as_of(&deploys, "noop", "production", last)
        .await
        .unwrap();
    assert_eq!(live.unwrap().run_id, first.run_id);
    let reads = deploys.reads();

    // The view stops (its worker drains); deploys go on.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = Sim::nth(NOOP_PIPELINE, 2);
    second.run_to_end();
    last = publish_all(&bus, &second.log).await;
    assert!(view.through() < last, "{view:?}");
    assert!(view.run_through(&second.run_id, last).await.is_none());
    let live = live_version_as_of(&deploys, "noop", "production", last)
        .await
        .unwrap();
    assert_eq!(live.unwrap().run_id, second.run_id, "read past the view");
    assert_eq!(deploys.reads(), reads + 1);
}

#[tokio::test]
async fn the_view_follows_on_across_a_server_restart_and_still_says_when_a_run_ends() {
    let mut nats = TestNats::start();
    let bus = connected(&nats).await;
    let deploys = Deploys::new(&bus);
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let view = RunsInFlight::start(&deploys, stop.clone()).await.unwrap();

    let mut sim = Sim::nth(NOOP_PIPELINE, 1);
    sim.run_to_end();
    let run_id = sim.run_id.clone();
    let (upto, rest) = sim.log.split_at(sim.log.len() / 2);
    let mut last = publish_all(&bus, upto).await;
    reached(&view, last).await;
    let (_, _, ended) = view.run_and_end_through(&run_id, last).await.unwrap();

    // The server restarts on the same store; the rest of the run is appended once it is back
    // (a repeated publish is a duplicate).
    nats.restart();
    for e in rest {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        last = loop {
            match bus.publish(e).await {
                Ok(a) => break a.seq,
                Err(err) => {
                    assert!(std::time::Instant::now() < deadline, "{err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
    }
    // It reopens as soon as its connection is made again, not after the ordered consumer's
    // missed heartbeats (15 s): jobs of a run learn of its end without that delay.
    tokio::time::timeout(Duration::from_secs(2), async {
        while view.through() < last {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the view resumes after the restart: {view:?}, log at {last}"));
    assert_eq!(view.ended_through(&run_id, last).await, Some(true));
    assert!(ended.is_cancelled(), "the end seen after the restart");
}
