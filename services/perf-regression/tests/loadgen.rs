//! The load generator against a loopback server with a known fixed latency.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use perf_regression::loadgen::{Load, Mode, run};

async fn server(latency: Duration) -> String {
    let app = Router::new().route(
        "/",
        get(move || async move {
            tokio::time::sleep(latency).await;
            "ok"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_measures_a_known_latency_and_rate() {
    let url = server(Duration::from_millis(20)).await;
    let load = Load {
        url,
        method: reqwest::Method::GET,
        body: None,
        mode: Mode::Open { rate_per_sec: 50.0 },
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
    };
    let m = run(&load, "t").await;
    assert_eq!(m.errors, 0);
    // 50 requests per second for 2 s: 100 measured requests, within a request or two of
    // scheduling slack.
    assert!((98..=101).contains(&m.ok), "ok = {}", m.ok);
    assert!(
        (m.throughput_rps() - 50.0).abs() <= 1.5,
        "{}",
        m.throughput_rps()
    );
    // The server answers after 20 ms; loopback and a busy machine add to that, never take
    // from it (the upper tolerance is wide: these machines are shared).
    let (p50, p99) = (m.percentile_ms(0.5), m.percentile_ms(0.99));
    assert!((20.0..60.0).contains(&p50), "p50 = {p50}");
    assert!((20.0..250.0).contains(&p99), "p99 = {p99}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_throughput_follows_concurrency_over_latency() {
    let url = server(Duration::from_millis(25)).await;
    let load = Load {
        url,
        method: reqwest::Method::GET,
        body: None,
        mode: Mode::Closed { concurrency: 4 },
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
    };
    let m = run(&load, "t").await;
    // Four clients each doing one 25 ms request at a time: at most 160 per second.
    let rps = m.throughput_rps();
    assert!((60.0..=162.0).contains(&rps), "throughput {rps}");
    assert!(m.percentile_ms(0.5) >= 25.0);
}

/// A server that answers one request at a time, each taking `latency`.
async fn serial_server(latency: Duration) -> String {
    let lock = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let app = Router::new().route(
        "/",
        get(move || {
            let lock = lock.clone();
            async move {
                let _one_at_a_time = lock.lock().await;
                tokio::time::sleep(latency).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_server_is_charged_for_the_queue_it_causes() {
    // 50 requests per second offered to a server that can do 20 (one at a time, 50 ms each):
    // a queue builds. Measured from when each request was due, latencies grow with the queue;
    // the achieved throughput is what the server did, not what was offered.
    let url = serial_server(Duration::from_millis(50)).await;
    let load = Load {
        url,
        method: reqwest::Method::GET,
        body: None,
        mode: Mode::Open { rate_per_sec: 50.0 },
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(1),
        timeout: Duration::from_secs(10),
    };
    let m = run(&load, "t").await;
    assert_eq!(m.errors, 0);
    // The last requests waited behind dozens of others: far longer than the 50 ms service.
    assert!(
        m.percentile_ms(0.99) >= 1000.0,
        "p99 {}",
        m.percentile_ms(0.99)
    );
    assert!(m.percentile_ms(0.01) >= 50.0);
    // At most 20 answered per second inside the window, though 50 were offered.
    assert!(
        m.throughput_rps() <= 21.0,
        "throughput {}",
        m.throughput_rps()
    );
    assert_eq!(m.samples.len() as u64, m.ok + m.errors);
}
