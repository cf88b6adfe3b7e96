//! The conductor against a real nats-server: two conductors deciding side by side, and a
//! conductor that was down answering what arrived meanwhile.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use slipway_core::bus::Bus;
use slipway_core::config::Config;
use slipway_core::runtime::{CancellationToken, fact};
use slipway_core::testing::TestNats;
use slipway_domain::events::{BuildSucceeded, ChangeSubmitted, EventData, SourceRef};
use slipway_domain::sim::artifact;
use slipway_domain::{Event, ids};

const SPEC: &str = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"true\"]\ntimeout_secs = 600\n";

fn config(nats: &TestNats) -> Config {
    Config {
        nats: nats.settings(),
        conductor: slipway_core::config::ConductorSettings {
            tick_millis: 50,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn spawn_conductor(nats: &TestNats) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let (s, c) = (shutdown.clone(), config(nats));
    (
        shutdown,
        tokio::spawn(async move { conductor::run(c, s).await.unwrap() }),
    )
}

async fn submit(bus: &Bus, id: &str) -> String {
    let e = Event::new(
        id,
        "/tests",
        None,
        slipway_core::bus::now(),
        EventData::ChangeSubmitted(ChangeSubmitted {
            spec: SPEC.into(),
            source: SourceRef::Directory {
                path: "/tmp".into(),
            },
            author: None,
            title: None,
            rerun_of: None,
            commit: None,
        }),
    );
    bus.publish(&e).await.unwrap();
    ids::run_id("/tests", id)
}

/// Plays the builder: answers every build request with a success, until all runs ended.
async fn answer_builds_until_done(bus: &Bus, runs: &[String]) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut types: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut done = 0;
        for run in runs {
            let log = bus.run_log(run).await.unwrap();
            let t: Vec<String> = log
                .iter()
                .filter_map(|r| r.event.as_ref().ok())
                .map(|e| e.type_name().to_string())
                .collect();
            if t.iter().any(|x| x == "dev.slipway.build.requested.v1")
                && !t.iter().any(|x| x == "dev.slipway.build.succeeded.v1")
            {
                let ok = EventData::BuildSucceeded(BuildSucceeded {
                    stage: "build".into(),
                    attempt: 1,
                    artifact: artifact(run),
                    files: vec![],
                    log: artifact("log"),
                    duration_ms: 1,
                });
                bus.publish(&fact(slipway_domain::service::Service::Builder, run, ok))
                    .await
                    .unwrap();
            }
            if t.iter().any(|x| x == "dev.slipway.run.succeeded.v1") {
                done += 1;
            }
            types.insert(run.clone(), t);
        }
        if done == runs.len() {
            return types;
        }
        assert!(Instant::now() < deadline, "runs did not finish: {types:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_conductors_side_by_side_decide_each_step_once() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let (s1, t1) = spawn_conductor(&nats);
    let (s2, t2) = spawn_conductor(&nats);
    let mut runs = Vec::new();
    for i in 0..15 {
        runs.push(submit(&bus, &format!("change-{i}")).await);
    }
    let types = answer_builds_until_done(&bus, &runs).await;
    for (run, t) in &types {
        let count = |name: &str| t.iter().filter(|x| x.as_str() == name).count();
        assert_eq!(count("dev.slipway.run.created.v1"), 1, "{run}: {t:?}");
        assert_eq!(count("dev.slipway.build.requested.v1"), 1, "{run}: {t:?}");
        assert_eq!(count("dev.slipway.run.succeeded.v1"), 1, "{run}: {t:?}");
    }
    s1.cancel();
    s2.cancel();
    t1.await.unwrap();
    t2.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_conductor_answers_what_arrived_while_it_was_down() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let (s, t) = spawn_conductor(&nats);
    let first = submit(&bus, "before").await;
    answer_builds_until_done(&bus, std::slice::from_ref(&first)).await;
    s.cancel();
    t.await.unwrap();

    // While it is down: a new change, and a repeat of the first.
    let second = submit(&bus, "while-down").await;
    let repeat = submit(&bus, "before").await;
    assert_eq!(repeat, first);

    let (s, t) = spawn_conductor(&nats);
    let types = answer_builds_until_done(&bus, &[first.clone(), second.clone()]).await;
    assert_eq!(
        types[&first]
            .iter()
            .filter(|x| x.as_str() == "dev.slipway.run.created.v1")
            .count(),
        1,
        "the repeat made no second run"
    );
    s.cancel();
    t.await.unwrap();
}
