//! A three-node JetStream cluster on loopback, from the shipped `deploy/nats/cluster/` files:
//! the log at three replicas, the services spread over the nodes, the stream's leader stopped
//! mid-run and later its successor; every run completes and nothing acknowledged is lost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_core::bus::{Bus, NatsSettings};
use slipway_core::exec::server::{NatsProcess, free_port};
use slipway_core::testing::nats_binary;
use slipway_e2e::{bin_dir, project};

const SERVICES: &[&str] = &[
    "slipway-conductor",
    "slipway-builder",
    "slipway-tester",
    "slipway-deployer",
];

struct Node {
    name: String,
    process: NatsProcess,
}

/// The three shipped node files, moved to free ports and `dir`.
fn start_cluster(dir: &Path) -> Vec<Node> {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let route: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let shipped = slipway_core::testing::workspace_root().join("deploy/nats/cluster");
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut conf =
            std::fs::read_to_string(shipped.join(format!("node-{}.conf", i + 1))).unwrap();
        for j in 0..3 {
            conf = conf
                .replace(
                    &format!("127.0.0.1:622{}", j + 2),
                    &format!("127.0.0.1:{}", route[j]),
                )
                .replace(
                    &format!("127.0.0.1:422{}", j + 2),
                    &format!("127.0.0.1:{}", client[j]),
                );
        }
        // The store comes from the command line (a temporary directory).
        conf = conf.replace(
            &format!("store_dir: \"/var/lib/slipway/nats-{}\"", i + 1),
            "",
        );
        let path = dir.join(format!("node-{}.conf", i + 1));
        std::fs::write(&path, conf).unwrap();
        let process = NatsProcess::spawn(
            &nats_binary(),
            client[i],
            &dir.join(format!("store-{}", i + 1)),
            &["-c".to_string(), path.display().to_string()],
            &[],
        )
        .unwrap_or_else(|e| panic!("node {}: {e}", i + 1));
        nodes.push(Node {
            name: format!("slipway-{}", i + 1),
            process,
        });
    }
    nodes
}

fn urls(nodes: &[Node], first: usize) -> String {
    (0..nodes.len())
        .map(|k| {
            format!(
                "nats://127.0.0.1:{}",
                nodes[(first + k) % nodes.len()].process.port
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn settings(nodes: &[Node]) -> NatsSettings {
    let mut s = NatsSettings {
        url: urls(nodes, 0),
        ..Default::default()
    };
    s.stream.replicas = 3;
    s
}

/// Waits until the cluster has a JetStream meta leader and the log exists at three replicas.
async fn wait_for_stream(nodes: &[Node]) -> Bus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match Bus::connect(&settings(nodes), "cluster-test").await {
            Ok(bus) => match bus.ensure_stream().await {
                Ok(_) => return bus,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "the cluster never formed: {last}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The node that leads the log's stream now.
async fn leader(bus: &Bus) -> Option<String> {
    let mut s = bus.jetstream().get_stream(bus.stream_name()).await.ok()?;
    s.info().await.ok()?.cluster.as_ref()?.leader.clone()
}

/// The services, stopped when the test ends, failing or not: a failed assertion once left
/// them running after the test, their servers gone.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(binary: &str, url: &str, config: &Path, work: &Path, log_dir: &Path) -> Child {
    let log = std::fs::File::create(log_dir.join(format!("{binary}.log"))).unwrap();
    Command::new(bin_dir().join(binary))
        .env("SLIPWAY_CONFIG", config)
        .env("SLIPWAY__NATS__URL", url)
        .env("SLIPWAY__NATS__STREAM__REPLICAS", "3")
        .env("SLIPWAY__NATS__CONNECT_TIMEOUT_SECS", "60")
        .env("SLIPWAY__WORKER__ACK_WAIT_SECS", "3")
        .env("SLIPWAY__CONDUCTOR__TICK_MILLIS", "100")
        .env("SLIPWAY__EXEC__WORKSPACE_ROOT", work)
        .env("RUST_LOG", "info,async_nats=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn slipway(url: &str, args: &[&str]) -> Value {
    let out = Command::new(bin_dir().join("slipway"))
        .args(args)
        .env("SLIPWAY_NATS_URL", url)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for s in SERVICES {
        let text = std::fs::read_to_string(dir.join(format!("{s}.log"))).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out.push_str(&format!("--- {s}\n"));
        for l in tail.into_iter().rev() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_complete_while_the_streams_leader_and_then_its_successor_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path());
    let bus = wait_for_stream(&nodes).await;
    // A client with default settings (one replica) does not shrink the log's replication.
    let plain = Bus::connect(
        &NatsSettings {
            url: urls(&nodes, 0),
            ..Default::default()
        },
        "cluster-test-plain",
    )
    .await
    .unwrap();
    plain.ensure_stream().await.unwrap();
    let mut stream = bus.jetstream().get_stream(bus.stream_name()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);
    let config: PathBuf = dir.path().join("slipway.toml");
    std::fs::write(&config, "").unwrap();
    let counts = dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    let spec = format!(
        r#"
[pipeline]
name = "cluster"
[build]
command = ["sh", "-c", "sleep 0.3; mkdir -p dist && echo $SLIPWAY_RUN_ID > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["sh", "-c", "sleep 0.3"]
[[environment]]
name = "staging"
[environment.deploy]
command = ["sh", "-c", "echo \"$SLIPWAY_RUN_ID\" >> {}/staging"]
"#,
        counts.display()
    );
    let project = project(dir.path(), "cluster", &spec, &[]);
    // Each service on its own node first (the others for failover).
    let children = Children(
        SERVICES
            .iter()
            .enumerate()
            .map(|(i, s)| {
                spawn(
                    s,
                    &urls(&nodes, i),
                    &config,
                    &dir.path().join("work"),
                    dir.path(),
                )
            })
            .collect(),
    );

    let url = urls(&nodes, 0);
    let mut runs = Vec::new();
    for _ in 0..6 {
        let v = slipway(
            &url,
            &[
                "submit",
                project.join("slipway.toml").to_str().unwrap(),
                "--json",
            ],
        );
        runs.push(v["run_id"].as_str().expect("submitted").to_string());
    }
    // Stop the log's leader mid-run; once a successor leads, bring the node back; later stop
    // the successor too (one node down at a time: three replicas keep a quorum of two).
    let mut stopped = Vec::new();
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let lead = leader(&bus).await.expect("the stream has a leader");
        let i = nodes.iter().position(|n| n.name == lead).unwrap();
        nodes[i].process.kill();
        stopped.push(lead.clone());
        // An election takes a few seconds, more on a loaded machine (one CI run saw over 30 s);
        // the bound is for a hang.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = leader(&bus).await;
            if let Some(l) = &seen
                && *l != lead
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no new leader after {lead} stopped (the stream reports {seen:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        nodes[i].process.restart().unwrap();
    }
    assert_ne!(
        stopped[0], stopped[1],
        "the successor was stopped too: {stopped:?}"
    );

    for run in &runs {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = slipway(&url, &["status", run, "--json"]);
            match s["phase"].as_str() {
                Some("succeeded") => break,
                Some("failed" | "cancelled") => {
                    panic!(
                        "run {run} ended {}: {}\n{}",
                        s["phase"],
                        s["reason"],
                        logs(dir.path())
                    )
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "run {run} did not finish: {s}\n{}",
                logs(dir.path())
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // Nothing lost or doubled: one deploy per run; the replay of the log is the live state.
    let staging = std::fs::read_to_string(counts.join("staging")).unwrap();
    for run in &runs {
        assert_eq!(
            staging.lines().filter(|l| l.trim() == run).count(),
            1,
            "{run}"
        );
        // A node just restarted may serve a read before its replica has caught up: the log
        // converges, so compare until it has (bounded).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let live = slipway(&url, &["status", run, "--json"]);
            let replayed = slipway(&url, &["replay", run, "--json"]);
            if live["events"] == replayed["events"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{run}: live {} events, replayed {}",
                live["events"],
                replayed["events"]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let info = bus
        .jetstream()
        .get_stream(bus.stream_name())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    drop(children);
}
