//! The worker runtime against a real nats-server, with small in-process workers: poison
//! requests, transient failures up to `max_deliver`, crashes, progress acks, graceful drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use slipway_core::bus::Bus;
use slipway_core::runtime::{
    CancellationToken, Job, Transient, Worker, WorkerSettings, run_worker,
};
use slipway_core::testing::TestNats;
use slipway_domain::events::{BuildSucceeded, EventData, StageKind};
use slipway_domain::sim::{Sim, artifact};

const SPEC: &str = "[pipeline]\nname = \"p\"\n[build]\ncommand = [\"true\"]\ntimeout_secs = 60\n";

/// What the test worker does with each request.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Succeed,
    /// Sleep this long, then succeed.
    Slow(Duration),
    /// As `Slow`, stopping early when the job is cancelled (as commands are).
    Cancellable(Duration),
    AlwaysTransient,
    Panic,
}

#[derive(Debug)]
struct TestWorker {
    behaviour: Behaviour,
    calls: AtomicU32,
}

impl Worker for TestWorker {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::Builder
    }

    fn kinds(&self) -> &'static [StageKind] {
        &[StageKind::Build]
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let ok = EventData::BuildSucceeded(BuildSucceeded {
            stage: job.stage.clone(),
            attempt: job.attempt,
            artifact: artifact("a"),
            files: vec![],
            log: artifact("log"),
            duration_ms: 1,
        });
        match self.behaviour {
            Behaviour::Succeed => Ok(ok),
            Behaviour::Slow(d) => {
                tokio::time::sleep(d).await;
                Ok(ok)
            }
            Behaviour::Cancellable(d) => {
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = job.cancel.cancelled() => {}
                }
                Ok(ok)
            }
            Behaviour::AlwaysTransient => Err(Transient("object store unavailable".into())),
            Behaviour::Panic => panic!("worker crashed"),
        }
    }
}

/// A run with its build requested, written to the log as the conductor would.
async fn requested_run(bus: &Bus) -> String {
    let mut sim = Sim::new(SPEC);
    sim.decide();
    for e in &sim.log {
        bus.publish(e).await.unwrap();
    }
    sim.run_id
}

/// Waits for an event of `type_name` in the run's log.
async fn wait_for(bus: &Bus, run: &str, type_name: &str, timeout: Duration) -> EventData {
    let deadline = Instant::now() + timeout;
    loop {
        let log = bus.run_log(run).await.unwrap();
        if let Some(e) = log
            .into_iter()
            .filter_map(|r| r.event.ok())
            .find(|e| e.type_name() == type_name)
        {
            return e.data;
        }
        assert!(
            Instant::now() < deadline,
            "no {type_name} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start(
    nats: &TestNats,
    behaviour: Behaviour,
    settings: WorkerSettings,
) -> (
    Arc<TestWorker>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let worker = Arc::new(TestWorker {
        behaviour,
        calls: AtomicU32::new(0),
    });
    let shutdown = CancellationToken::new();
    let (w, s, nats_settings) = (worker.clone(), shutdown.clone(), nats.settings());
    let task = tokio::spawn(async move {
        let bus = Bus::connect(&nats_settings, "worker").await.unwrap();
        run_worker(bus, w, settings, &Default::default(), s)
            .await
            .unwrap();
    });
    (worker, shutdown, task)
}

fn fast() -> WorkerSettings {
    WorkerSettings {
        ack_wait_secs: 2,
        max_deliver: 3,
        drain_secs: 10,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_request_becomes_a_failed_fact() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let (_w, shutdown, task) = start(&nats, Behaviour::Succeed, fast());
    let js = bus.jetstream();
    js.publish(
        "slipway.run.r-poison.build.requested",
        "{not a cloudevent".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let EventData::BuildFailed(f) = wait_for(
        &bus,
        "r-poison",
        "dev.slipway.build.failed.v1",
        Duration::from_secs(20),
    )
    .await
    else {
        unreachable!()
    };
    assert!(f.reason.contains("malformed request"), "{}", f.reason);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_end_as_a_failed_fact_after_max_deliver() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let run = requested_run(&bus).await;
    let (worker, shutdown, task) = start(&nats, Behaviour::AlwaysTransient, fast());
    // Naks back off 2 s, then 4 s: three deliveries in about 6 s.
    let EventData::BuildFailed(f) = wait_for(
        &bus,
        &run,
        "dev.slipway.build.failed.v1",
        Duration::from_secs(40),
    )
    .await
    else {
        unreachable!()
    };
    assert!(
        f.reason.contains("gave up after 3 deliveries"),
        "{}",
        f.reason
    );
    assert!(
        f.reason.contains("object store unavailable"),
        "{}",
        f.reason
    );
    assert_eq!(worker.calls.load(Ordering::SeqCst), 3);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_crashes_on_every_delivery_is_given_up_by_the_advisory() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let run = requested_run(&bus).await;
    let settings = WorkerSettings {
        max_deliver: 2,
        ..fast()
    };
    let (worker, shutdown, task) = start(&nats, Behaviour::Panic, settings);
    let EventData::BuildFailed(f) = wait_for(
        &bus,
        &run,
        "dev.slipway.build.failed.v1",
        Duration::from_secs(40),
    )
    .await
    else {
        unreachable!()
    };
    assert!(
        f.reason.contains("delivered 2 times without a result"),
        "{}",
        f.reason
    );
    assert_eq!(worker.calls.load(Ordering::SeqCst), 2);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_acks_keep_long_work_from_being_redelivered() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let run = requested_run(&bus).await;
    // Three times the ack wait.
    let (worker, shutdown, task) = start(&nats, Behaviour::Slow(Duration::from_secs(6)), fast());
    wait_for(
        &bus,
        &run,
        "dev.slipway.build.succeeded.v1",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        worker.calls.load(Ordering::SeqCst),
        1,
        "redelivered while working"
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_work_in_flight() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let run = requested_run(&bus).await;
    let (worker, shutdown, task) = start(&nats, Behaviour::Slow(Duration::from_secs(2)), fast());
    wait_for(
        &bus,
        &run,
        "dev.slipway.build.started.v1",
        Duration::from_secs(20),
    )
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("drained within the drain period")
        .unwrap();
    // The job in flight finished and its fact is in the log.
    wait_for(
        &bus,
        &run,
        "dev.slipway.build.succeeded.v1",
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(worker.calls.load(Ordering::SeqCst), 1);
}

/// Waits until the worker's consumer is made, and its view's when `follow_runs`.
async fn worker_ready(bus: &Bus, follow_runs: bool) {
    let consumers = if follow_runs { 2 } else { 1 };
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = bus.ensure_stream().await.unwrap();
        while stream.info().await.unwrap().state.consumer_count < consumers {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("worker ready");
}

/// Waits for the run's build to succeed, then delivers its request again (an upstream repeat
/// with a new message id).
async fn built_then_requested_again(bus: &Bus, run: &str) {
    wait_for(
        bus,
        run,
        "dev.slipway.build.succeeded.v1",
        Duration::from_secs(20),
    )
    .await;
    let log = bus.run_log(run).await.unwrap();
    let request = log
        .iter()
        .find(|r| r.subject.ends_with("build.requested"))
        .unwrap();
    let mut again = request.event.clone().unwrap();
    again.id = "a-repeat".into();
    bus.publish(&again).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_request_is_not_worked_again() {
    let nats = TestNats::start();
    let bus = nats.bus().await;
    let run = requested_run(&bus).await;
    let (worker, shutdown, task) = start(&nats, Behaviour::Succeed, fast());
    built_then_requested_again(&bus, &run).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(worker.calls.load(Ordering::SeqCst), 1);
    shutdown.cancel();
    task.await.unwrap();
}

/// An exclusive worker (a deploy's kind of work), idempotent or not.
#[derive(Debug)]
struct ExclusiveWorker {
    idempotent: bool,
    calls: AtomicU32,
}

impl Worker for ExclusiveWorker {
    fn service(&self) -> slipway_core::runtime::Service {
        slipway_core::runtime::Service::Builder
    }

    fn kinds(&self) -> &'static [StageKind] {
        &[StageKind::Build]
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn may_resume(&self, _run: &slipway_domain::Run, _request: &slipway_domain::Event) -> bool {
        self.idempotent
    }

    async fn handle(&self, job: &Job) -> Result<EventData, Transient> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(EventData::BuildSucceeded(BuildSucceeded {
            stage: job.stage.clone(),
            attempt: job.attempt,
            artifact: artifact("a"),
            files: vec![],
            log: artifact("log"),
            duration_ms: 1,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_attempt_started_by_a_dead_delivery_is_repeated_only_when_idempotent() {
    for idempotent in [false, true] {
        let nats = TestNats::start();
        let bus = nats.bus().await;
        let run = requested_run(&bus).await;
        // An earlier delivery started the attempt and died before reporting.
        let started = slipway_core::runtime::started_data(
            "dev.slipway.build.requested.v1",
            "build",
            1,
            "builder-gone",
        )
        .unwrap();
        bus.publish(&slipway_core::runtime::fact(
            slipway_domain::service::Service::Builder,
            &run,
            started,
        ))
        .await
        .unwrap();
        let worker = Arc::new(ExclusiveWorker {
            idempotent,
            calls: AtomicU32::new(0),
        });
        let shutdown = CancellationToken::new();
        let (w, s, settings) = (worker.clone(), shutdown.clone(), nats.settings());
        let task = tokio::spawn(async move {
            let bus = Bus::connect(&settings, "worker").await.unwrap();
            run_worker(bus, w, fast(), &Default::default(), s)
                .await
                .unwrap();
        });
        if idempotent {
            wait_for(
                &bus,
                &run,
                "dev.slipway.build.succeeded.v1",
                Duration::from_secs(10),
            )
            .await;
            assert_eq!(worker.calls.load(Ordering::SeqCst), 1, "run again, once");
        } else {
            // Never repeated: no result, the work not called (the stage timeout decides).
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(worker.calls.load(Ordering::SeqCst), 0);
            let log = bus.run_log(&run).await.unwrap();
            assert!(
                !log.iter()
                    .filter_map(|r| r.event.as_ref().ok())
                    .any(|e| e.type_name() == "dev.slipway.build.succeeded.v1")
            );
        }
        shutdown.cancel();
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_created_after_the_worker_started_are_worked_once_with_or_without_its_view() {
    for follow_runs in [true, false] {
        let nats = TestNats::start();
        let bus = nats.bus().await;
        let settings = WorkerSettings {
            follow_runs,
            ..fast()
        };
        let (worker, shutdown, task) = start(&nats, Behaviour::Succeed, settings);
        // The worker is up (its consumer made, and its view's when on) before the run exists:
        // with the view on, the job takes the run from it.
        worker_ready(&bus, follow_runs).await;
        let run = requested_run(&bus).await;
        // The attempt is settled, so the request again is not worked.
        built_then_requested_again(&bus, &run).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            worker.calls.load(Ordering::SeqCst),
            1,
            "follow_runs {follow_runs}"
        );
        let started = bus
            .run_log(&run)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.subject.ends_with("build.started"))
            .count();
        assert_eq!(started, 1, "follow_runs {follow_runs}");
        shutdown.cancel();
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_while_its_job_drains_stops_the_job_with_or_without_its_view() {
    for follow_runs in [true, false] {
        let nats = TestNats::start();
        let bus = nats.bus().await;
        let settings = WorkerSettings {
            follow_runs,
            ..fast()
        };
        let (_, shutdown, task) = start(
            &nats,
            Behaviour::Cancellable(Duration::from_secs(60)),
            settings,
        );
        worker_ready(&bus, follow_runs).await;
        let run = requested_run(&bus).await;
        wait_for(
            &bus,
            &run,
            "dev.slipway.build.started.v1",
            Duration::from_secs(20),
        )
        .await;
        // The worker is told to stop and drains its job; then the run is cancelled.
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cancel = slipway_domain::Event::new(
            "cancel-1",
            "/slipway/cli",
            Some(run.clone()),
            slipway_core::bus::now(),
            EventData::RunCancelled(slipway_domain::events::RunEnded {
                reason: "wrong branch".into(),
                stage: None,
                by: Some("test".into()),
            }),
        );
        bus.publish(&cancel).await.unwrap();
        // Seen during the drain (10 s): the job stops and says why.
        let failed = wait_for(
            &bus,
            &run,
            "dev.slipway.build.failed.v1",
            Duration::from_secs(8),
        )
        .await;
        let EventData::BuildFailed(f) = failed else {
            unreachable!()
        };
        assert!(
            f.reason.contains("the run ended"),
            "follow_runs {follow_runs}: {}",
            f.reason
        );
        task.await.unwrap();
    }
}
