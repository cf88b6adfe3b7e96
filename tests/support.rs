//! End-to-end test support: a real nats-server and the real service binaries as processes,
//! each test with its own server, ports and temporary directories.
//!
//! The binaries come from the same target directory as the test (`cargo build --bins` first;
//! `deploy/test.sh` does it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use slipway_core::bus::Bus;
use slipway_core::testing::TestNats;

pub mod collector;
pub mod oidc_provider;
pub mod rollout_app;

/// Services a full stack runs.
pub const SERVICES: &[&str] = &slipway_domain::service::Service::BINARIES;

/// The worker services of issue 2's slice: no deploys, no gateway.
pub const BUILD_AND_TEST: &[&str] = &["slipway-conductor", "slipway-builder", "slipway-tester"];

/// Approvers of the test stacks: name, group, bearer token (`<name>-token`).
pub const APPROVERS: &[(&str, &str)] = &[
    ("bob", "release-managers"),
    ("dave", "release-managers"),
    ("carol", "interns"),
];

/// The directory holding the workspace's binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for s in SERVICES.iter().chain(&["slipway"]) {
        assert!(
            dir.join(s).is_file(),
            "{} missing: run `cargo build --workspace --bins` before the end-to-end tests",
            dir.join(s).display()
        );
    }
    dir
}

/// A running service process, killed on drop.
#[derive(Debug)]
pub struct ServiceProc {
    pub name: String,
    child: Option<Child>,
}

impl ServiceProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server and Slipway's services, for one test.
#[derive(Debug)]
pub struct Stack {
    pub nats: TestNats,
    pub services: Vec<ServiceProc>,
    pub dir: tempfile::TempDir,
    /// Where the approval gateway listens (when started).
    pub gateway_port: u16,
    bins: PathBuf,
    /// Extra environment of every service started (OTLP settings, say).
    env: Vec<(String, String)>,
}

impl Stack {
    /// Everything: nats-server, conductor, builder, tester.
    pub fn start() -> Self {
        Self::start_with(SERVICES)
    }

    /// nats-server and the named services only.
    pub fn start_with(services: &[&str]) -> Self {
        Self::start_with_env(services, &[])
    }

    /// nats-server and the named services, each with `env` added to its environment.
    pub fn start_with_env(services: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_config(services, env, "", "")
    }

    /// As [`Stack::start_with_env`], with `gateway` added to the configuration's `[gateway]`
    /// table and `extra` (more tables) appended.
    pub fn start_with_config(
        services: &[&str],
        env: &[(&str, &str)],
        gateway: &str,
        extra: &str,
    ) -> Self {
        let mut s = Self {
            // Every end-to-end test runs under the shipped least-privilege configuration.
            nats: TestNats::start_least_privilege(),
            services: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            gateway_port: slipway_core::exec::server::free_port(),
            bins: bin_dir(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // The gateway signs approvals; the deployer verifies them with the public half.
        let (seed, public) = slipway_domain::signing::SigningKey::generate();
        let mut config = format!(
            "[approvals]\npublic_key = \"{public}\"\n\n[gateway]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"http://127.0.0.1:{port}\"\nsigning_key = \"{seed}\"\ntrace_url_template = \"http://traces.example/trace/{{trace_id}}\"\n{gateway}\n",
            port = s.gateway_port
        );
        for (name, group) in APPROVERS {
            let hash = {
                use sha2::Digest;
                format!(
                    "{:x}",
                    sha2::Sha256::digest(format!("{name}-token").as_bytes())
                )
            };
            config.push_str(&format!(
                "\n[[gateway.approvers]]\nname = \"{name}\"\ngroups = [\"{group}\"]\ntoken_sha256 = \"{hash}\"\n"
            ));
        }
        config.push('\n');
        config.push_str(extra);
        std::fs::write(s.dir.path().join("slipway.toml"), config).expect("config");
        for name in services {
            s.spawn(name);
        }
        s
    }

    /// Starts one service (again), its log appended to `<dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str) {
        self.spawn_replica(name, name);
    }

    /// Starts the binary `binary` as the process called `name` (a second replica, say).
    pub fn spawn_replica(&mut self, binary: &str, name: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("service log");
        // Each service connects as its own user, its password read from a file, as `up` does.
        let user = slipway_core::config::credentials::nats_user_of(binary);
        let password_file = self
            .nats
            .password_file(user)
            .expect("a least-privilege user per service");
        let child = Command::new(self.bins.join(binary))
            .env("SLIPWAY_CONFIG", self.dir.path().join("slipway.toml"))
            .env("SLIPWAY__NATS__URL", self.nats.plain_url())
            .env("SLIPWAY__NATS__USER", user)
            .env("SLIPWAY__NATS__PASSWORD_FILE", password_file)
            .env("SLIPWAY__WORKER__ACK_WAIT_SECS", "3")
            .env("SLIPWAY__WORKER__DRAIN_SECS", "5")
            .env("SLIPWAY__CONDUCTOR__TICK_MILLIS", "100")
            .env(
                "SLIPWAY__EXEC__WORKSPACE_ROOT",
                self.dir.path().join("work"),
            )
            .env("RUST_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.services.retain(|s| s.name != name);
        self.services.push(ServiceProc {
            name: name.to_string(),
            child: Some(child),
        });
    }

    pub fn service(&mut self, name: &str) -> &mut ServiceProc {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} not started"))
    }

    /// A NATS client of the test itself (the `admin` user).
    pub async fn nats_client(&self) -> async_nats::Client {
        let (user, password) = self.nats.credentials("admin").expect("admin user");
        async_nats::ConnectOptions::with_user_and_password(user, password)
            .connect(self.nats.plain_url())
            .await
            .expect("the test connects to NATS")
    }

    /// `slipway submit` of the project in `dir` as `user` (the change's author); its run id.
    pub fn submit_as(&self, dir: &Path, user: &str) -> String {
        let out = Command::new(self.bins.join("slipway"))
            .args([
                "submit",
                dir.join("slipway.toml").to_str().unwrap(),
                "--json",
            ])
            .env("SLIPWAY_NATS_URL", self.nats.url_as("cli"))
            .env("USER", user)
            .env("RUST_LOG", "warn")
            .output()
            .expect("slipway runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v["run_id"].as_str().expect("a run id").to_string()
    }

    /// What the server refused any client (permission violations), from its log.
    pub fn refusals(&self) -> Vec<String> {
        std::fs::read_to_string(self.nats.process.store.join("nats-server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_string)
            .collect()
    }

    /// Every service log, for a failing test's message; and what the server refused.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let server = std::fs::read_to_string(self.nats.process.store.join("nats-server.log"))
            .unwrap_or_default();
        for l in server.lines().filter(|l| l.contains("Violation")).take(20) {
            out.push_str(&format!("nats-server: {l}\n"));
        }
        for s in &self.services {
            let p = self.dir.path().join(format!("{}.log", s.name));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} (last lines)\n", s.name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    /// Waits until the gateway answers its health check.
    pub fn wait_gateway(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.gateway_port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gateway did not listen\n{}", self.logs());
    }

    /// Runs `slipway <args>` against this stack's server.
    pub fn slipway(&self, args: &[&str]) -> Output {
        // People's commands connect as the least-privilege `cli` user.
        self.slipway_as("cli", args)
    }

    /// `slipway <args>` connected as NATS user `user` (`admin` for operators' commands).
    pub fn slipway_as(&self, user: &str, args: &[&str]) -> Output {
        Command::new(self.bins.join("slipway"))
            .args(args)
            .env("SLIPWAY_NATS_URL", self.nats.url_as(user))
            .env("SLIPWAY_GATEWAY_URL", self.gateway_url())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("slipway runs")
    }

    /// `slipway <args>` that must succeed; its stdout.
    pub fn slipway_ok(&self, args: &[&str]) -> String {
        let out = self.slipway(args);
        assert!(
            out.status.success(),
            "slipway {args:?} failed ({}):\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `slipway <args> --json` parsed.
    pub fn slipway_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.slipway_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// The run's status, or `None` while it does not exist.
    pub fn status(&self, run: &str) -> Option<Value> {
        let out = self.slipway(&["status", run, "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
    }

    /// Polls the run's status until `until` holds; panics with the logs after `timeout`.
    pub fn wait_for(&self, run: &str, timeout: Duration, until: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status(run) {
                if until(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        panic!(
            "run {run}: condition not met within {timeout:?}; last status: {}\n{}",
            last.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                .unwrap_or_else(|| "none".into()),
            self.logs()
        );
    }

    /// Waits until the run is in `phase`.
    pub fn wait_phase(&self, run: &str, phase: &str, timeout: Duration) -> Value {
        self.wait_for(run, timeout, |s| s["phase"] == phase)
    }

    /// `slipway replay RUN --json` must equal `slipway status RUN --json`.
    pub fn assert_replay_matches(&self, run: &str) {
        let status = self.slipway_json(&["status", run]);
        let replay = self.slipway_json(&["replay", run]);
        assert_eq!(
            status, replay,
            "replay differs from the live status of {run}"
        );
    }

    /// Every event stored so far meets the JSON Schema of its type (`schemas/events/`).
    pub async fn assert_log_meets_schemas(&self) {
        let bus = self.bus().await;
        let filters: Vec<String> = slipway_domain::subjects::STREAM_SUBJECTS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let log = bus.read(&filters, 1).await.expect("read log");
        let dir = slipway_core::testing::workspace_root().join("schemas/events");
        let mut checked = 0;
        for rec in log {
            // Malformed input stays in the log on purpose; only Slipway's events are checked.
            let Ok(event) = rec.event else { continue };
            let path = dir.join(format!("{}.json", event.type_name()));
            let schema: Value = serde_json::from_str(
                &std::fs::read_to_string(&path)
                    .unwrap_or_else(|_| panic!("{} missing", path.display())),
            )
            .expect("schema JSON");
            let validator = jsonschema::validator_for(&schema).expect("valid schema");
            let data = event.data.to_json();
            let errors: Vec<String> = validator
                .iter_errors(&data)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{} at seq {}: {errors:?}",
                event.type_name(),
                rec.seq
            );
            checked += 1;
        }
        assert!(checked > 0, "no events to check");
    }

    pub async fn bus(&self) -> Bus {
        self.nats.bus().await
    }
}

/// A project directory with a spec and files, for one test.
pub fn project(dir: &Path, name: &str, spec: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).expect("project dir");
    std::fs::write(root.join("slipway.toml"), spec).expect("spec");
    for (path, body) in files {
        let p = root.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("dirs");
        }
        std::fs::write(p, body).expect("file");
    }
    root
}

/// The example project shipped in `deploy/examples/hello`.
pub fn hello_example() -> PathBuf {
    slipway_core::testing::workspace_root().join("deploy/examples/hello")
}

/// The `.venv` Python when it can import `module` (one of the independent readers
/// `deploy/setup.sh --python-tools` installs); `None` (the caller skips) when it cannot,
/// outside CI. Under CI a missing reader fails the test.
pub fn venv_python_with(module: &str) -> Option<PathBuf> {
    let python = slipway_core::testing::workspace_root().join(".venv/bin/python");
    let ready = python.is_file()
        && Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        assert!(
            std::env::var_os("CI").is_none(),
            "{module} is missing: `bash deploy/setup.sh --python-tools` installs it"
        );
        eprintln!("skipping: no {module} (deploy/setup.sh --python-tools)");
        return None;
    }
    Some(python)
}

/// Prometheus text as `prometheus_client`'s parser reads it (strict about the exposition
/// format's grouping, where promtool is lenient): `[{name, type, samples: [{name, labels,
/// value}]}]`. `None` (the caller skips) when the parser is not installed, outside CI;
/// `deploy/setup.sh --python-tools` installs it.
pub fn parse_prometheus(text: &str) -> Option<Value> {
    let python = venv_python_with("prometheus_client")?;
    const READ: &str = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        print(json.dumps([{'name': f.name, 'type': f.type, 'samples': [\n\
            {'name': s.name, 'labels': s.labels, 'value': s.value} for s in f.samples]}\n\
            for f in parse(sys.stdin.read())]))";
    let mut child = Command::new(&python)
        .args(["-c", READ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes())
        .expect("the text reaches the parser");
    let out = child.wait_with_output().expect("the parser ends");
    assert!(
        out.status.success(),
        "prometheus_client refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("the parser's JSON"))
}
