//! More than one machine, for real: three network namespaces as three hosts on this machine,
//! joined by a bridge, a JetStream cluster with one node per host and the log at three
//! replicas, the services spread over them (the workers on every host, two conductors). With
//! runs in flight, one host's network is cut (its link goes down; its processes keep running):
//! every run finishes, each deploy takes effect once, replay equals status. Healed, its node
//! catches up and its services work again. Two processes on the other hosts list the cut node
//! first, so they are connected across the bridge when it goes silent. Needs root and `ip` (iproute2); stops by itself.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_core::bus::{Bus, NatsSettings};
use slipway_e2e::{bin_dir, project};

const LONG: Duration = Duration::from_secs(150);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three hosts: namespaces with a veth each into a bridge of the root namespace, which holds
/// the test's own address. Everything is removed when it drops, processes first.
struct Hosts {
    tag: String,
    subnet: String,
    children: Vec<Child>,
}

impl Hosts {
    fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.tag)
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{i}", self.subnet)
    }

    fn create() -> Self {
        let pid = std::process::id();
        let tag = format!("slw{}", pid % 100_000);
        let subnet = format!("10.{}.{}", 100 + (pid / 256) % 100, pid % 256);
        let hosts = Self {
            tag: tag.clone(),
            subnet: subnet.clone(),
            children: Vec::new(),
        };
        let bridge = format!("{tag}br");
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.254/24"),
            "dev",
            &bridge,
        ]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        for i in 1..=3 {
            let ns = hosts.ns(i);
            let outside = format!("{tag}v{i}");
            sh(&["ip", "netns", "add", &ns]);
            sh(&[
                "ip", "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            sh(&["ip", "link", "set", &outside, "master", &bridge]);
            sh(&["ip", "link", "set", &outside, "up"]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", hosts.ip(i)),
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
            ]);
        }
        hosts
    }

    /// Starts `program` on host `i`.
    fn spawn(
        &mut self,
        i: usize,
        program: &Path,
        args: &[&str],
        env: &[(&str, String)],
        log: &Path,
    ) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i)])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Host `i`'s link down (`false`) or up.
    fn link(&self, i: usize, up: bool) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(i),
            "ip",
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 1..=3 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{}v{i}", self.tag)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}br", self.tag)])
            .output();
    }
}

fn settings(url: &str) -> NatsSettings {
    let mut s = NatsSettings {
        url: url.to_string(),
        connect_timeout_secs: 30,
        ..Default::default()
    };
    s.stream.replicas = 3;
    s
}

fn slipway(url: &str, args: &[&str]) -> Value {
    let out = Command::new(bin_dir().join("slipway"))
        .args(args)
        .env("SLIPWAY_NATS_URL", url)
        .env("SLIPWAY__NATS__STREAM__REPLICAS", "3")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn wait_phase(url: &str, run: &str, phase: &str, logs: &Path) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let v = slipway(url, &["status", run, "--json"]);
        if v["phase"] == phase {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{run} never reached {phase}: {v}\n{}",
            tail_logs(logs)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tail_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            out.push_str(&format!("--- {}\n", e.path().display()));
            // A panic or an error that ended a process, wherever it is in the log.
            for l in text
                .lines()
                .filter(|l| l.contains("panicked at") || l.starts_with("Error:"))
            {
                out.push_str(l);
                out.push('\n');
            }
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_finish_when_a_hosts_network_is_cut_and_it_catches_up_when_healed() {
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    assert_eq!(uid.trim(), "0", "network namespaces need root, as CI has");
    let dir = tempfile::tempdir().unwrap();
    let mut hosts = Hosts::create();
    // One NATS node per host, routes to the others' addresses.
    for i in 1..=3 {
        let routes: Vec<String> = (1..=3)
            .map(|j| format!("nats-route://{}:6222", hosts.ip(j)))
            .collect();
        let conf = format!(
            "server_name: slipway-{i}\nlisten: {ip}:4222\njetstream {{ store_dir: \"{store}\" }}\ncluster {{\n  name: slipway\n  listen: {ip}:6222\n  routes: [{routes}]\n}}\n",
            ip = hosts.ip(i),
            store = dir.path().join(format!("store-{i}")).display(),
            routes = routes.join(", ")
        );
        let path = dir.path().join(format!("node-{i}.conf"));
        std::fs::write(&path, conf).unwrap();
        let nats = slipway_core::testing::nats_binary();
        hosts.spawn(
            i,
            &nats,
            &["-c", path.to_str().unwrap()],
            &[],
            &dir.path().join(format!("nats-{i}.log")),
        );
    }
    // Each host's processes list their own node first.
    let ips: Vec<String> = (1..=3).map(|i| hosts.ip(i)).collect();
    let url_from = |first: usize| {
        (0..3)
            .map(|k| format!("nats://{}:4222", ips[(first - 1 + k) % 3]))
            .collect::<Vec<_>>()
            .join(",")
    };
    let url = url_from(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let bus = loop {
        let last = match Bus::connect(&settings(&url), "partition-test").await {
            Ok(bus) => match bus.ensure_stream().await {
                Ok(_) => break bus,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "the cluster never formed: {last}\n{}",
            tail_logs(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let config = dir.path().join("slipway.toml");
    std::fs::write(&config, "").unwrap();
    let counts = dir.path().join("counts");
    std::fs::create_dir_all(&counts).unwrap();
    // The workers on every host, the conductor on two.
    let mut placement = Vec::new();
    for i in 1..=3 {
        for s in ["slipway-builder", "slipway-tester", "slipway-deployer"] {
            placement.push((i, s));
        }
    }
    placement.push((1, "slipway-conductor"));
    placement.push((2, "slipway-conductor"));
    for (i, s) in &placement {
        let short = s.trim_start_matches("slipway-");
        // Two processes on the hosts that stay list host 3's node first: connected across the
        // bridge when its link goes down, they must find the silence (unanswered pings) and move
        // to a node that answers.
        let first = match (*i, *s) {
            (2, "slipway-conductor") | (1, "slipway-tester") => 3,
            _ => *i,
        };
        let env = [
            ("SLIPWAY_CONFIG", config.display().to_string()),
            ("SLIPWAY__NATS__URL", url_from(first)),
            ("SLIPWAY__NATS__STREAM__REPLICAS", "3".to_string()),
            ("SLIPWAY__NATS__CONNECT_TIMEOUT_SECS", "60".to_string()),
            ("SLIPWAY__WORKER__ACK_WAIT_SECS", "5".to_string()),
            ("SLIPWAY__WORKER__ID", format!("{short}-h{i}")),
            ("SLIPWAY__CONDUCTOR__TICK_MILLIS", "100".to_string()),
            (
                "SLIPWAY__EXEC__WORKSPACE_ROOT",
                dir.path()
                    .join(format!("work-{short}-{i}"))
                    .display()
                    .to_string(),
            ),
            ("RUST_LOG", "info,async_nats=warn".to_string()),
            ("PATH", std::env::var("PATH").unwrap_or_default()),
        ];
        hosts.spawn(
            *i,
            &bin_dir().join(s),
            &[],
            &env,
            &dir.path().join(format!("{short}-{i}.log")),
        );
    }
    let spec = format!(
        r#"
[pipeline]
name = "spread"
[build]
command = ["sh", "-c", "sleep 0.5; mkdir -p dist && echo $SLIPWAY_RUN_ID > dist/v"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["sh", "-c", "sleep 0.5"]
[[environment]]
name = "staging"
[environment.deploy]
command = ["sh", "-c", "c={c}/$SLIPWAY_ENVIRONMENT; echo \"$SLIPWAY_RUN_ID\" >> $c.calls; grep -qx \"$SLIPWAY_DEPLOY_KEY\" $c.keys 2>/dev/null || {{ echo \"$SLIPWAY_DEPLOY_KEY\" >> $c.keys; echo \"$SLIPWAY_RUN_ID\" >> $c; }}"]
timeout_secs = 15
idempotent = true
"#,
        c = counts.display()
    );
    let project = project(dir.path(), "spread", &spec, &[]);
    let submit = || {
        // Asked again while the cluster elects (a change stored without an answer makes a run
        // this test does not follow; it ends like the others).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = slipway(
                &url,
                &[
                    "submit",
                    project.join("slipway.toml").to_str().unwrap(),
                    "--json",
                ],
            );
            if let Some(run) = v["run_id"].as_str() {
                break run.to_string();
            }
            assert!(Instant::now() < deadline, "{v}\n{}", tail_logs(dir.path()));
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let mut runs: Vec<String> = (0..8).map(|_| submit()).collect();
    // Runs in flight: host 3's link goes down. Its node and workers keep running, cut off; a
    // deploy it was making is made again elsewhere with the same deploy key (the command is
    // idempotent by it), so its effect is once.
    wait_phase(&url, &runs[0], "succeeded", dir.path());
    let cut_at = chrono::Utc::now();
    hosts.link(3, false);
    runs.extend((0..4).map(|_| submit()));
    for run in &runs {
        let status = wait_phase(&url, run, "succeeded", dir.path());
        // A read may meet the cluster mid-election: asked again until it answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        let replay = loop {
            let v = slipway(&url, &["replay", run, "--json"]);
            if !v.is_null() || Instant::now() > deadline {
                break v;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(replay["phase"], status["phase"], "{run}");
        assert_eq!(replay["stages"], status["stages"], "{run}");
    }
    // Each run's deploy took effect once.
    let deployed = std::fs::read_to_string(counts.join("staging")).unwrap();
    let lines: Vec<&str> = deployed.lines().collect();
    for run in &runs {
        assert_eq!(
            lines.iter().filter(|l| *l == run).count(),
            1,
            "{run} deployed {} times",
            lines.iter().filter(|l| *l == run).count()
        );
    }

    // The two processes that were connected to node 3 moved to a node that answers: their
    // heartbeats reach the cluster again (with async-nats's default 60 s pings this took three
    // minutes, and both conductors once sat on the silent node while every run waited).
    let moved: Vec<u32> = placement
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(**p, (2, "slipway-conductor") | (1, "slipway-tester")))
        .map(|(k, _)| hosts.children[3 + k].id())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = slipway(&url, &["services", "--json"]);
        let beating = |pid: u32| {
            v["replicas"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["pid"] == pid
                        && r["at"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .is_some_and(|t| t > cut_at + chrono::Duration::seconds(2))
                })
            })
        };
        if moved.iter().all(|p| beating(*p)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes {moved:?} never came back from the silent node: {v}\n{}",
            tail_logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Healed: node 3 catches up with the log.
    hosts.link(3, true);
    let mut stream = bus.jetstream().get_stream(bus.stream_name()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let info = stream.info().await.unwrap();
        let caught_up = info.cluster.as_ref().is_some_and(|c| {
            c.replicas.len() == 2
                && c.replicas
                    .iter()
                    .all(|r| r.current && r.lag.unwrap_or(0) == 0)
        });
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 did not catch up: {:?}",
            info.cluster
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Its services work again: with the builders of hosts 1 and 2 gone, host 3's builds.
    for (k, (i, s)) in placement.iter().enumerate() {
        if *s == "slipway-builder" && *i != 3 {
            let _ = hosts.children[3 + k].kill();
        }
    }
    let after = submit();
    let status = wait_phase(&url, &after, "succeeded", dir.path());
    let build = status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "build")
        .unwrap();
    assert_eq!(build["worker"], "builder-h3", "{build}");
}
