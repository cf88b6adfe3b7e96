//! The `slipway` command as a user runs it: `up` (its own server, every service, Ctrl-C),
//! `demo`, `watch`; services refusing an old server; SIGTERM draining a real worker; two
//! builder replicas sharing one consumer.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_core::exec::server::{NatsProcess, free_port};
use slipway_domain::Event;
use slipway_domain::events::EventData;
use slipway_e2e::{Stack, bin_dir, hello_example, project};

const LONG: Duration = Duration::from_secs(60);

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

fn sigint(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `slipway up`, interrupted if a failed assertion ends the test first: it stops its server
/// and services itself, where a kill would leave them running.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Processes whose command line mentions `needle` (to check nothing is left behind).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(cmd);
        }
    }
    out
}

/// The environment of a process, as `NAME=value` lines.
fn environ(pid: &str) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|e| {
            String::from_utf8_lossy(&e)
                .split('\0')
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `(binary name, NATS user)` of each service process whose environment names `url`.
fn service_users(url: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let name = exe
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let env = environ(&pid);
        if !name.starts_with("slipway-") || !env.contains(&format!("SLIPWAY__NATS__URL={url}")) {
            continue;
        }
        let user = env
            .iter()
            .find_map(|e| e.strip_prefix("SLIPWAY__NATS__USER="))
            .unwrap_or("(none)")
            .to_string();
        out.push((name, user));
    }
    out.sort();
    out
}

fn connect(url: &str, user: Option<(&str, &str)>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some((u, p)) = user {
            opts = opts.user_and_password(u.into(), p.into());
        }
        let client = opts.connect(url).await.map_err(|e| e.to_string())?;
        // A request the server answers only to a user allowed the JetStream API.
        async_nats::jetstream::new(client)
            .query_account()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

#[test]
fn slipway_up_is_secure_by_default_runs_the_example_and_ctrl_c_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        format!("[gateway]\nlisten = \"127.0.0.1:{}\"\n", free_port()),
    )
    .unwrap();
    let mut up = Up(Command::new(bin_dir().join("slipway"))
        .args(["up", "--port", &port.to_string(), "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .env_remove("SLIPWAY_NATS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap());
    let spec = hello_example().join("slipway.toml");
    // `submit --wait` retries the connection while `up` starts its server, as the `cli` user
    // whose password `up` keeps in the data directory.
    let out = Command::new(bin_dir().join("slipway"))
        .args(["--nats-url", &url, "submit"])
        .arg(&spec)
        .arg("--source")
        .arg(hello_example())
        .args(["--wait", "--json", "--timeout", "60"])
        .env("SLIPWAY_DATA_DIR", &data)
        .output()
        .unwrap();
    let up_log = || std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up_log()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "succeeded");
    // The server's store is under the data directory.
    assert!(data.join("nats/jetstream").is_dir());

    // Secure by default: the passwords are the owner's alone; an anonymous client is refused,
    // the operator's `admin` gets in with the password `up` points at, and every service
    // connected as its own user (the run above went through every stage under their grants).
    use std::os::unix::fs::PermissionsExt as _;
    let creds = data.join("credentials");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&creds), 0o700);
    let admin_file = creds.join("nats-admin.password");
    assert_eq!(mode(&admin_file), 0o600);
    assert_eq!(mode(&creds.join("nats-cli.password")), 0o600);
    let refused = connect(&url, None).unwrap_err();
    assert!(
        refused.to_lowercase().contains("authorization"),
        "{refused}"
    );
    let admin = std::fs::read_to_string(&admin_file).unwrap();
    connect(&url, Some(("admin", admin.trim()))).unwrap();
    assert!(connect(&url, Some(("admin", "guess"))).is_err());
    let log = up_log();
    assert!(
        log.contains(&format!(
            "--user admin --password \"$(cat {})\"",
            admin_file.display()
        )),
        "{log}"
    );
    let users = service_users(&url);
    assert_eq!(users.len(), slipway_e2e::SERVICES.len(), "{users:?}");
    for (service, user) in &users {
        assert_eq!(
            user,
            slipway_core::config::credentials::nats_user_of(service),
            "{service}"
        );
    }
    // A command with no password for the server is refused, saying why.
    let empty = dir.path().join("elsewhere");
    let out = Command::new(bin_dir().join("slipway"))
        .args(["--nats-url", &url, "changes"])
        .env("SLIPWAY_DATA_DIR", &empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("authorization") && err.contains("nats-cli.password does not exist"),
        "{err}"
    );

    sigint(up.0.id());
    let status = wait_exit(&mut up.0, Duration::from_secs(60));
    assert!(status.success(), "{status}\n{}", up_log());
    let left = processes_mentioning(&data.display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nats-server still listening"
    );
}

#[test]
fn slipway_up_insecure_leaves_the_bus_open_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        format!("[gateway]\nlisten = \"127.0.0.1:{}\"\n", free_port()),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let mut up = Up(Command::new(bin_dir().join("slipway"))
        .args([
            "up",
            "--insecure",
            "--port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .env_remove("SLIPWAY_NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap());
    // Any local process gets in, as nobody in particular.
    let deadline = Instant::now() + LONG;
    while let Err(e) = connect(&url, None) {
        assert!(Instant::now() < deadline, "{e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = Command::new(bin_dir().join("slipway"))
        .args(["--nats-url", &url, "changes", "--json"])
        .env("SLIPWAY_DATA_DIR", dir.path().join("none"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.join("credentials").exists());
    let up_log = std::fs::read_to_string(dir.path().join("up.log")).unwrap();
    assert!(up_log.contains("--insecure"), "{up_log}");
    sigint(up.0.id());
    let status = wait_exit(&mut up.0, Duration::from_secs(60));
    assert!(status.success(), "{status}");
}

#[test]
fn slipway_demo_ships_blocks_catches_a_defect_at_its_canary_and_promotes_by_ab_and_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin_dir().join("slipway"))
        .arg("demo")
        .arg("--project")
        .arg(slipway_core::testing::workspace_root().join("deploy/demo/model-server"))
        .arg("--data-dir")
        .arg(dir.path().join("demo"))
        .env_remove("SLIPWAY_NATS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("approved through the HTTP API"), "{stdout}");
    assert!(
        stdout.contains("(pipeline demo-model): succeeded"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(pipeline demo-model): rolled_back"),
        "{stdout}"
    );
    // The worse model is stopped by the evaluation gate before approval, with a reason
    // naming the metric, the baseline, the delta and the significance.
    assert!(stdout.contains("(pipeline demo-model): failed"), "{stdout}");
    assert!(
        stdout.contains("evaluate failed: facts: exact_match"),
        "{stdout}"
    );
    assert!(
        stdout.contains("baseline 0.8000, delta -0.4000, McNemar p=0.0078"),
        "{stdout}"
    );
    // Each paired check gives the difference's interval and what its dataset can detect (20
    // items cannot see a 5-point regression), adjusted across the gate's tests.
    assert!(
        stdout.contains("95% interval of the difference ["),
        "{stdout}"
    );
    assert!(
        stdout.contains("this dataset cannot detect a regression of 0.050; it can detect"),
        "{stdout}"
    );
    assert!(stdout.contains("Holm-adjusted over 2 tests"), "{stdout}");
    // The first deployment is judged on absolute thresholds alone and says so; the improved
    // 2.0.0 passes its gates against the production baseline (exact match 0.80 -> 1.00).
    assert!(
        stdout.contains("no baseline in the log (first deployment)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("baseline 0.8000, delta +0.2000"),
        "{stdout}"
    );
    // The defective 2.0.0 is caught at its first canary step, by its errors and the users'
    // feedback; the better 2.1.0 wins an A/B experiment; 2.2.0 is shadowed and compared.
    assert!(
        stdout.contains("2.0.0 rolled_back by the canary at 5%"),
        "{stdout}"
    );
    assert!(stdout.contains("errors: candidate"), "{stdout}");
    assert!(
        stdout.contains("the A/B experiment found it better (the candidate is better on liked"),
        "{stdout}"
    );
    assert!(stdout.contains("2.2.0 succeeded: shadowed on"), "{stdout}");
    assert!(stdout.contains("similarity"), "{stdout}");
    assert!(stdout.contains("production served 2.2.0"), "{stdout}");
    assert!(stdout.contains("Demo passed"), "{stdout}");
    // Everything it started is gone: services, nats-server, the model servers, the router.
    let left = processes_mentioning(&dir.path().display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn slipway_watch_follows_a_run_to_its_end() {
    let stack = Stack::start();
    let spec = r#"
[pipeline]
name = "watched"
[build]
command = ["sh", "-c", "sleep 1; mkdir -p dist; echo x > dist/x"]
artifacts = ["dist"]
[[test]]
name = "unit"
command = ["true"]
"#;
    let dir = project(stack.dir.path(), "watched", spec, &[]);
    let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
    let run = v["run_id"].as_str().unwrap();
    let out = stack.slipway_ok(&["watch", run, "--timeout", "60"]);
    let lines: Vec<&str> = out.lines().collect();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{out}"))
    };
    assert!(pos("build") < pos("test:unit"));
    assert!(pos("is succeeded") > pos("test:unit"), "{out}");
    stack.assert_replay_matches(run);
}

fn old_server() -> Option<PathBuf> {
    let p = slipway_core::testing::workspace_root().join(".venv/nats-2.9/usr/sbin/nats-server");
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} missing: `bash deploy/setup.sh --old-server` unpacks Debian's nats-server 2.9 there",
        p.display()
    );
    eprintln!(
        "skipping: no nats-server 2.9 at {} (deploy/setup.sh --old-server)",
        p.display()
    );
    None
}

#[test]
fn services_and_the_cli_refuse_a_server_older_than_2_11() {
    let Some(binary) = old_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsProcess::spawn(&binary, 0, &dir.path().join("store"), &[], &[]).unwrap();
    for service in ["slipway-conductor", "slipway-builder", "slipway-tester"] {
        let out = Command::new(bin_dir().join(service))
            .env("SLIPWAY__NATS__URL", nats.url())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{service} started on 2.9");
        assert!(
            err.contains("nats-server 2.9.10 is too old"),
            "{service}: {err}"
        );
        assert!(err.contains("2.11.0 or newer"), "{service}: {err}");
    }
    let out = Command::new(bin_dir().join("slipway"))
        .args(["--nats-url", &nats.url(), "changes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("too old"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_worker_finish_its_job_before_it_exits() {
    let mut stack = Stack::start();
    let spec = r#"
[pipeline]
name = "drain"
[build]
command = ["sh", "-c", "sleep 2; mkdir -p dist; echo x > dist/x"]
artifacts = ["dist"]
"#;
    let dir = project(stack.dir.path(), "drain", spec, &[]);
    let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
    let run = v["run_id"].as_str().unwrap().to_string();
    stack.wait_for(&run, LONG, |s| s["stages"][0]["status"] == "running");
    let builder = stack.service("slipway-builder");
    let pid = builder.pid().unwrap();
    sigterm(pid);
    // Exits cleanly once the build is done (drain period 5 s in the test stack).
    let deadline = Instant::now() + Duration::from_secs(20);
    while builder.is_running() {
        assert!(
            Instant::now() < deadline,
            "builder did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = stack.wait_phase(&run, "succeeded", LONG);
    stack.assert_replay_matches(&run);
    let worker = status["stages"][0]["worker"].as_str().unwrap();
    assert!(
        worker.contains(&pid.to_string()),
        "built by {worker}, not the drained builder"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_builder_replicas_share_one_consumer() {
    let mut stack = Stack::start();
    // A second builder process: same durable consumer, so each request goes to one of them.
    stack.spawn_replica("slipway-builder", "slipway-builder-2");
    let spec = r#"
[pipeline]
name = "shared"
[build]
command = ["sh", "-c", "sleep 1; mkdir -p dist; echo x > dist/x"]
artifacts = ["dist"]
"#;
    let dir = project(stack.dir.path(), "shared", spec, &[]);
    let runs: Vec<String> = (0..6)
        .map(|_| {
            let v = stack.slipway_json(&["submit", dir.join("slipway.toml").to_str().unwrap()]);
            v["run_id"].as_str().unwrap().to_string()
        })
        .collect();
    let bus = stack.bus().await;
    let mut workers = std::collections::BTreeSet::new();
    for run in &runs {
        stack.wait_phase(run, "succeeded", LONG);
        let log = bus.run_log(run).await.unwrap();
        let started: Vec<String> = log
            .iter()
            .filter_map(|r| match &r.event {
                Ok(Event {
                    data: EventData::BuildStarted(s),
                    ..
                }) => Some(s.worker.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 1, "{run}: built {} times", started.len());
        workers.insert(started[0].clone());
        stack.assert_replay_matches(run);
    }
    assert_eq!(workers.len(), 2, "both replicas took work: {workers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slipway_watch_waits_for_a_run_that_is_about_to_exist() {
    let stack = Stack::start();
    let spec = "[pipeline]\nname = \"soon\"\n[build]\ncommand = [\"true\"]\n";
    let run = slipway_domain::ids::run_id("tests/watch", "change-1");
    // Watch first: the change has not even been sent.
    let watcher = Command::new(bin_dir().join("slipway"))
        .args(["watch", &run, "--timeout", "60"])
        .env("SLIPWAY_NATS_URL", stack.nats.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bus = stack.bus().await;
    let change = slipway_domain::Event::new(
        "change-1",
        "tests/watch",
        None,
        slipway_core::bus::now(),
        EventData::ChangeSubmitted(slipway_domain::events::ChangeSubmitted {
            spec: spec.into(),
            source: slipway_domain::events::SourceRef::Directory {
                path: stack.dir.path().display().to_string(),
            },
            author: None,
            title: None,
            rerun_of: None,
            commit: None,
        }),
    );
    bus.publish(&change).await.unwrap();
    let out = tokio::task::spawn_blocking(move || watcher.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is succeeded"), "{stdout}");
}

#[test]
fn a_command_whose_reader_went_away_exits_quietly() {
    let stack = Stack::start_with(&[]);
    let spec = hello_example().join("slipway.toml");
    stack.slipway_ok(&[
        "submit",
        spec.to_str().unwrap(),
        "--source",
        hello_example().to_str().unwrap(),
    ]);
    // `slipway changes | head -0`: the reader is gone before the first line is written.
    for args in [&["changes"][..], &["changes", "--json"]] {
        let mut child = Command::new(bin_dir().join("slipway"))
            .args(args)
            .env("SLIPWAY_NATS_URL", stack.nats.url_as("cli"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}: {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn the_demos_help_counts_its_five_changes() {
    let out = Command::new(bin_dir().join("slipway"))
        .args(["demo", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("Five changes of the demo model server"),
        "{help}"
    );
    assert!(!help.to_lowercase().contains("three changes"), "{help}");
}
