//! `slipway bench` at a small size, as a smoke test: it starts its own servers, finishes, and
//! reports every row (no timing is asserted: these machines are shared).

use std::process::Command;

use serde_json::Value;

#[test]
fn the_benchmark_finishes_and_reports_every_row() {
    let out = Command::new(slipway_e2e::bin_dir().join("slipway"))
        .args([
            "bench",
            "--runs",
            "3",
            "--inflight",
            "5",
            "--raw",
            "100",
            "--stored",
            "1000",
            "--replay",
            "3000",
            "--gateway-requests",
            "200",
            "--concurrency",
            "4",
            "--scale-builds",
            "4",
            "--artifact-mib",
            "2",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in [
        "raw_publish_ms",
        "raw_hop_ms",
        "raw_publish_rate",
        "raw_read_rate",
        "stage_overhead_ms",
        "stage_overhead_split_ms",
        "stage_work_ms",
        "run_latency_ms",
        "throughput_runs_per_s",
        "gateway",
        "rss_mb",
        "cpu_ms_per_run",
        "otel_unreachable_run_latency_ms",
        "replay",
        "memory_per_100k_runs_mb",
        "scale_out",
        "artifact_mb_per_s",
    ] {
        assert!(v.get(row).is_some(), "row {row} missing: {v:#}");
    }
    assert!(v["raw_hop_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(v["run_latency_ms"]["events"].as_u64().unwrap() > 10);
    for kind in ["build", "test", "deploy", "approval"] {
        assert!(
            v["stage_work_ms"][kind]["p50"].as_f64().unwrap() > 0.0,
            "{kind}"
        );
    }
    assert!(v["gateway"]["rps"].as_f64().unwrap() > 0.0);
    for rate in ["stored", "read", "client_put", "raw"] {
        assert!(
            v["artifact_mb_per_s"][rate].as_f64().unwrap() > 0.0,
            "{rate}"
        );
    }
    // Two builder processes share one consumer: each took some of the builds.
    let shares = v["scale_out"]["builds_per_replica"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{shares:?}");
    assert!(
        shares.iter().all(|n| n.as_u64().unwrap() >= 1),
        "{shares:?}"
    );
    assert_eq!(
        shares.iter().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        4,
        "{shares:?}"
    );
    let rss = v["rss_mb"].as_object().unwrap();
    assert_eq!(rss.len(), 9, "every service's memory: {rss:?}");
    // CPU per run for nats-server, every service and the bench itself.
    let cpu = &v["cpu_ms_per_run"];
    assert_eq!(cpu["by_process"].as_object().unwrap().len(), 11, "{cpu:#}");
    assert!(cpu["used_ms"].as_f64().unwrap() > 0.0, "{cpu:#}");
}

#[test]
fn the_organisation_scale_benchmark_finishes_and_reports_every_row() {
    let out = Command::new(slipway_e2e::bin_dir().join("slipway"))
        .args([
            "bench",
            "--org",
            "--pipelines",
            "4",
            "--history",
            "600",
            "--time-scale",
            "0.05",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lead = &v["lead_time"];
    assert_eq!(lead["phases"]["succeeded"], 4, "{lead:#}");
    for row in ["lead_over_critical_path", "overhead_s", "critical_path_s"] {
        for q in ["p50", "p99", "max"] {
            assert!(lead[row][q].is_number(), "{row}.{q}: {lead:#}");
        }
    }
    // A run takes at least its own stages' work.
    assert!(
        lead["lead_over_critical_path"]["p50"].as_f64().unwrap() >= 1.0,
        "{lead:#}"
    );
    assert!(lead["largest_queue_wait_s"].is_number());
    let h = &v["history"];
    assert_eq!(h["runs"], 600);
    let started = &h["from_checkpoint"];
    for row in [
        "conductor_first_decision_s",
        "gateway_ready_s",
        "first_run_ended_s",
    ] {
        assert!(started[row].as_f64().unwrap() > 0.0, "{row}: {h:#}");
    }
    assert_eq!(started["rss_mb"].as_object().unwrap().len(), 9, "{h:#}");
    assert_eq!(started["first_run_outcome"], "succeeded", "{h:#}");
    for row in [
        "status_gateway_ms",
        "status_cli_path_ms",
        "first_page_ms",
        "later_pages_ms",
        "dora_365d_gateway_ms",
        "dora_365d_cli_ms",
    ] {
        assert!(h[row]["p99"].as_f64().unwrap() > 0.0, "{row}: {h:#}");
    }
    assert!(
        h["without_checkpoint"]["conductor_first_decision_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The deploy index's checkpoint is made by reading every seeded deploy.
    let index = &h["without_checkpoint"]["deploy_index"];
    assert!(index["deploys_read"].as_u64().unwrap() > 0, "{h:#}");
    assert!(index["read_s"].as_f64().unwrap() > 0.0, "{h:#}");
    // 600 runs make no full DORA chunk (the index is read as it is), yet the row is there.
    let chunks = &h["without_checkpoint"]["dora_chunks"];
    assert_eq!(chunks["chunks"], 0, "{h:#}");
    assert!(chunks["made_s"].as_f64().unwrap() > 0.0, "{h:#}");
}

#[test]
fn an_interrupted_benchmark_leaves_nothing_running() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(slipway_e2e::bin_dir().join("slipway"))
        .args(["bench", "--runs", "1000"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both stacks' servers are up once two "listening at" lines are out.
    let mut ports = Vec::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while ports.len() < 2 {
        let line = lines.next().expect("bench stopped early").unwrap();
        if let Some(url) = line.split("listening at nats://").nth(1) {
            let port: u16 = url.split([':', ' ']).nth(1).unwrap().parse().unwrap();
            ports.push(port);
        }
    }
    // Keep reading what it (and its services) print, so no writer blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    // Every service of both stacks is started before the first measurement; give them a moment.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let bench_dir = std::env::temp_dir().join(format!("slipway-bench-{}", child.id()));
    assert!(bench_dir.is_dir());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nats-server on {port} still running"
        );
    }
    // No service it started is left: none runs with a configuration inside its data directory.
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("environ")).ok())
        .map(|env| String::from_utf8_lossy(&env).into_owned())
        .filter(|env| env.contains(&bench_dir.display().to_string()))
        .collect();
    assert!(leftovers.is_empty(), "{} processes left", leftovers.len());
    assert!(!bench_dir.exists(), "its data directory is removed");
}

#[test]
fn an_empty_row_is_refused_naming_its_option() {
    for option in ["--scale-builds", "--runs", "--inflight"] {
        let out = Command::new(slipway_e2e::bin_dir().join("slipway"))
            .args(["bench", option, "0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{option} 0 accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{option} must be at least 1")),
            "{option}: {err}"
        );
        assert!(out.stdout.is_empty(), "{option}: nothing measured");
    }
}
