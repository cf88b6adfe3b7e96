//! Keeping Slipway up on a host: `slipway up` restarts whatever exits, for ever, with a capped
//! backoff (a crash loop is reported, not a reason to stop), brings back its own nats-server on
//! its store, and says what it keeps running; every service answers liveness and readiness and
//! publishes a heartbeat (`slipway services`, `GET /v1/services`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_core::exec::server::free_ports;
use slipway_e2e::{Stack, bin_dir, project};

/// `slipway up`, interrupted (so it stops what it started) when the test ends.
struct Up {
    child: std::process::Child,
    log: PathBuf,
}

impl Up {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(40);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pid of the process running `binary` whose parent is `parent`.
fn child_running(parent: u32, binary: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the fields after the last ')'.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let ppid: Option<u32> = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        let state = after.split_whitespace().next().unwrap_or("");
        let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
        if ppid == Some(parent) && state != "Z" && exe.file_name().is_some_and(|n| n == binary) {
            return Some(pid);
        }
    }
    None
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A pipeline without tests: a build and a deploy into a directory.
fn no_tests_spec(out: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "untested"
[build]
command = ["sh", "-c", "mkdir -p dist && echo hi > dist/hi"]
artifacts = ["dist"]
[[environment]]
name = "production"
[environment.deploy]
command = ["sh", "-c", "cp -r \"$SLIPWAY_ARTIFACT_DIR/dist\" \"$OUT/$SLIPWAY_RUN_ID\""]
env = {{ OUT = "{}" }}
"#,
        out.display()
    )
}

fn slipway(url: &str, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("slipway"))
        .args(["--nats-url", url])
        .args(args)
        .env("SLIPWAY_DATA_DIR", data)
        .output()
        .unwrap()
}

fn submit_wait(url: &str, data: &Path, spec: &Path, up: &Up) -> Value {
    let out = slipway(
        url,
        data,
        &[
            "submit",
            spec.to_str().unwrap(),
            "--wait",
            "--json",
            "--timeout",
            "90",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn get(url: &str) -> Option<(u16, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.ok()?;
        let code = r.status().as_u16();
        let text = r.text().await.ok()?;
        Some((
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    })
}

fn get_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

#[test]
fn up_restarts_a_crash_looping_service_and_its_nats_server_and_never_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let [port, gateway_port] = free_ports::<2>();
    let url = format!("nats://127.0.0.1:{port}");
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        format!("[gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\n"),
    )
    .unwrap();
    let log = dir.path().join("up.log");
    let child = Command::new(bin_dir().join("slipway"))
        .args(["up", "--port", &port.to_string(), "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .env_remove("SLIPWAY_NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut up = Up { child, log };
    let up_pid = up.child.id();
    let out = dir.path().join("deployed");
    std::fs::create_dir_all(&out).unwrap();
    let untested = project(dir.path(), "untested", &no_tests_spec(&out), &[]);
    let hello = slipway_e2e::hello_example().join("slipway.toml");
    let first = submit_wait(&url, &data, &untested.join("slipway.toml"), &up);
    assert_eq!(first["phase"], "succeeded");

    // Every service says it is there, live and ready, with where its health is answered.
    let services = wait_for("every service's heartbeat", Duration::from_secs(30), || {
        let out = slipway(&url, &data, &["services", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let ready = v["replicas"]
            .as_array()?
            .iter()
            .filter(|r| r["ready"] == true && r["live"] == true)
            .count();
        (out.status.success() && ready >= slipway_e2e::SERVICES.len()).then_some(v)
    });
    for r in services["replicas"].as_array().unwrap() {
        let health = r["health_url"].as_str().unwrap();
        let (code, body) = get(&format!("{health}/readyz")).unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["service"], r["service"]);
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
    }

    // The tester killed ten times within a minute: each time `up` starts it again, later and
    // later (capped), says loudly that it crash-loops, and keeps the rest serving runs.
    let started = Instant::now();
    let mut killed = 0;
    let mut served = Vec::new();
    let mut last = None;
    while killed < 10 {
        let pid = wait_for("the tester to be back", Duration::from_secs(15), || {
            child_running(up_pid, "slipway-tester").filter(|p| Some(*p) != last)
        });
        sigkill(pid);
        last = Some(pid);
        killed += 1;
        if killed % 3 == 0 {
            let out = slipway(
                &url,
                &data,
                &[
                    "submit",
                    untested.join("slipway.toml").to_str().unwrap(),
                    "--json",
                ],
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            served.push(v["run_id"].as_str().unwrap().to_string());
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    for run in &served {
        wait_for(
            "a run submitted during the kills",
            Duration::from_secs(60),
            || {
                let out = slipway(&url, &data, &["status", run, "--json"]);
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                (v["phase"] == "succeeded").then_some(())
            },
        );
    }
    assert!(
        up.child.try_wait().unwrap().is_none(),
        "up exited:\n{}",
        up.log()
    );
    assert!(
        up.log().contains("slipway-tester is crash-looping"),
        "{}",
        up.log()
    );
    // The gateway names it, and counts its restarts.
    let health = wait_for(
        "the gateway to name the crash loop",
        Duration::from_secs(20),
        || {
            let (_, v) = get(&format!("{gateway}/healthz"))?;
            v["crash_looping"]
                .as_array()?
                .iter()
                .any(|n| n == "tester")
                .then_some(v)
        },
    );
    assert_eq!(health["status"], "degraded", "{health}");
    // `up` reports every few seconds: the tenth restart shows within one report.
    let metrics = wait_for(
        "ten restarts in the metrics",
        Duration::from_secs(20),
        || {
            let metrics = get_text(&format!("{gateway}/metrics"));
            let restarts: u64 = metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix("slipway_service_restarts_total{service=\"tester\"} ")
                })?
                .parse()
                .ok()?;
            (restarts >= 10).then_some(metrics)
        },
    );
    assert!(
        metrics.contains("slipway_service_last_exit_code{service=\"tester\"} 137"),
        "{metrics}"
    );
    // Left alone, the tester comes back and a run with tests passes.
    let hello_run = submit_wait(&url, &data, &hello, &up);
    assert_eq!(hello_run["phase"], "succeeded", "{hello_run}");

    // The nats-server `up` started, killed: `up` reaps it, starts it on its store, the services
    // reconnect and runs finish; the log it had is still there.
    let nats = child_running(up_pid, "nats-server").expect("up's nats-server");
    sigkill(nats);
    let back = wait_for("nats-server to be back", Duration::from_secs(20), || {
        child_running(up_pid, "nats-server").filter(|p| *p != nats)
    });
    assert_ne!(back, nats);
    let after = submit_wait(&url, &data, &untested.join("slipway.toml"), &up);
    assert_eq!(after["phase"], "succeeded");
    let status = slipway(
        &url,
        &data,
        &["status", first["run_id"].as_str().unwrap(), "--json"],
    );
    assert!(status.status.success(), "the first run is still in the log");
    assert!(
        up.log().contains("nats-server exited") && up.log().contains("nats-server is back"),
        "{}",
        up.log()
    );
    // No zombie left of the killed server.
    assert!(
        std::fs::read_to_string(format!("/proc/{nats}/stat")).is_err(),
        "the killed nats-server was not reaped"
    );
    let out = slipway(&url, &data, &["services"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("slipway up on"), "{text}");
    assert!(text.contains("nats-server"), "{text}");
}

#[test]
fn readiness_follows_the_connection_to_nats() {
    let [health_port] = free_ports::<1>();
    let mut stack = Stack::start_with_env(
        &["slipway-builder"],
        &[(
            "SLIPWAY__HEALTH__LISTEN",
            &format!("127.0.0.1:{health_port}"),
        )],
    );
    let readyz = format!("http://127.0.0.1:{health_port}/readyz");
    let livez = format!("http://127.0.0.1:{health_port}/livez");
    wait_for("the builder to be ready", Duration::from_secs(30), || {
        get(&readyz).filter(|(c, _)| *c == 200)
    });
    // Only the builder runs: missing services unless only it is required.
    let all = wait_for("the builder's heartbeat", Duration::from_secs(30), || {
        let out = stack.slipway(&["services", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (!v["replicas"].as_array()?.is_empty()).then_some((out, v))
    });
    assert_eq!(all.0.status.code(), Some(1));
    assert!(
        all.1["missing"]
            .as_array()
            .unwrap()
            .contains(&"conductor".into())
    );
    let only = stack.slipway(&["services", "--json", "--require", "builder"]);
    assert!(
        only.status.success(),
        "{}",
        String::from_utf8_lossy(&only.stderr)
    );
    let v: Value = serde_json::from_slice(&only.stdout).unwrap();
    assert_eq!(v["missing"], serde_json::json!([]));
    let wrong = stack.slipway(&["services", "--require", "bilder"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("no service \"bilder\""));
    // NATS goes away: not ready (saying why), still live.
    stack.nats.process.kill();
    let (_, body) = wait_for("readiness to turn false", Duration::from_secs(30), || {
        get(&readyz).filter(|(c, _)| *c == 503)
    });
    assert_eq!(body["not_ready"], "not connected to NATS", "{body}");
    assert_eq!(get(&livez).unwrap().0, 200);
    // It returns: ready again.
    stack.nats.process.restart().unwrap();
    wait_for("readiness to turn true", Duration::from_secs(30), || {
        get(&readyz).filter(|(c, _)| *c == 200)
    });
}
