//! Test support (feature `test-support`): a real nats-server per test on a free loopback port
//! with a temporary store, removed on drop. Never a mock.

use std::path::PathBuf;

use crate::bus::{Bus, NatsSettings};
use crate::server::{NatsProcess, find_nats_server};

/// The workspace root (where `.venv/` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// A usable nats-server binary, or a panic that says how to install one.
///
/// # Panics
/// When none is found.
pub fn nats_binary() -> PathBuf {
    find_nats_server(&[workspace_root()]).unwrap_or_else(|e| panic!("{e}"))
}

/// A nats-server for one test.
#[derive(Debug)]
pub struct TestNats {
    pub process: NatsProcess,
    _dir: tempfile::TempDir,
    /// Passwords by user, when the server runs `deploy/nats/least-privilege.conf`.
    passwords: Option<std::collections::BTreeMap<String, String>>,
}

/// The users of `deploy/nats/least-privilege.conf`.
pub const NATS_USERS: &[&str] = &[
    "admin",
    "conductor",
    "builder",
    "tester",
    "deployer",
    "monitor",
    "model-evaluator",
    "perf-regression",
    "cost-estimator",
    "gateway",
    "cli",
];

/// The least-privilege user a service binary connects as (`slipway-approval` is `gateway`).
pub fn nats_user_of(binary: &str) -> &str {
    match binary.strip_prefix("slipway-").unwrap_or(binary) {
        "approval" => "gateway",
        other => other,
    }
}

impl TestNats {
    /// Starts a server with JetStream on a free loopback port and a fresh store.
    ///
    /// # Panics
    /// When the server cannot start.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let process = NatsProcess::spawn(&nats_binary(), 0, &dir.path().join("store"), &[])
            .unwrap_or_else(|e| panic!("cannot start a test nats-server: {e}"));
        Self {
            process,
            _dir: dir,
            passwords: None,
        }
    }

    /// A server with `deploy/nats/least-privilege.conf`: a user per service, random passwords.
    /// [`TestNats::url`] is then the `admin` user's.
    ///
    /// # Panics
    /// When the server cannot start.
    pub fn start_least_privilege() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let passwords: std::collections::BTreeMap<String, String> = NATS_USERS
            .iter()
            // A letter first: the server's configuration reads a bare `12e4…` as a number.
            .map(|u| (u.to_string(), format!("pw-{}", crate::ids::random())))
            .collect();
        let env: Vec<(String, String)> = passwords
            .iter()
            .map(|(u, p)| {
                (
                    format!("SLIPWAY_NATS_PASS_{}", u.to_uppercase().replace('-', "_")),
                    p.clone(),
                )
            })
            .collect();
        let conf = workspace_root().join("deploy/nats/least-privilege.conf");
        let process = NatsProcess::spawn_with_env(
            &nats_binary(),
            &dir.path().join("store"),
            &["-c".to_string(), conf.display().to_string()],
            &env,
        )
        .unwrap_or_else(|e| panic!("cannot start a least-privilege nats-server: {e}"));
        Self {
            process,
            _dir: dir,
            passwords: Some(passwords),
        }
    }

    /// The server's URL without credentials.
    pub fn plain_url(&self) -> String {
        self.process.url()
    }

    /// `(user, password)` of a least-privilege user.
    pub fn credentials(&self, user: &str) -> Option<(String, String)> {
        let p = self.passwords.as_ref()?.get(user)?;
        Some((user.to_string(), p.clone()))
    }

    /// The URL as `user` (credentials in it), or the plain URL on an open server.
    pub fn url_as(&self, user: &str) -> String {
        match self.credentials(user) {
            Some((u, p)) => self
                .process
                .url()
                .replacen("nats://", &format!("nats://{u}:{p}@"), 1),
            None => self.process.url(),
        }
    }

    /// The URL tests use: the `admin` user's on a least-privilege server.
    pub fn url(&self) -> String {
        self.url_as("admin")
    }

    pub fn settings(&self) -> NatsSettings {
        NatsSettings {
            url: self.url(),
            ..Default::default()
        }
    }

    /// A connected bus with the stream created.
    ///
    /// # Panics
    /// When it cannot connect.
    pub async fn bus(&self) -> Bus {
        let bus = Bus::connect(&self.settings(), "test")
            .await
            .expect("connect");
        bus.ensure_stream().await.expect("stream");
        bus
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart(&mut self) {
        self.process.restart().unwrap_or_else(|e| panic!("{e}"));
    }
}
