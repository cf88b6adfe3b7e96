//! Test support (feature `test-support`): a real nats-server per test on a free loopback port
//! with a temporary store, removed on drop. Never a mock.

use std::path::PathBuf;

use crate::bus::{Bus, NatsSettings};
use crate::config::credentials::Credentials;
use crate::exec::server::{NatsProcess, find_nats_server};

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
    /// Every user's password, when the server runs the shipped least-privilege configuration.
    credentials: Option<Credentials>,
}

pub use crate::config::credentials::{NATS_USERS, nats_user_of};

impl TestNats {
    /// Starts a server with JetStream on a free loopback port and a fresh store.
    ///
    /// # Panics
    /// When the server cannot start.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let process = NatsProcess::spawn(&nats_binary(), 0, &dir.path().join("store"), &[], &[])
            .unwrap_or_else(|e| panic!("cannot start a test nats-server: {e}"));
        Self {
            process,
            _dir: dir,
            credentials: None,
        }
    }

    /// A server with the shipped `deploy/nats/least-privilege.conf`: a user per service, random
    /// passwords, as `slipway up` starts it. [`TestNats::url`] is then the `admin` user's.
    ///
    /// # Panics
    /// When the server cannot start.
    pub fn start_least_privilege() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let credentials =
            Credentials::load_or_create(&crate::config::credentials::directory(dir.path()))
                .expect("credentials");
        let conf = dir.path().join("nats-server.conf");
        Credentials::write_server_config(&conf).expect("server configuration");
        let process = NatsProcess::spawn(
            &nats_binary(),
            0,
            &dir.path().join("store"),
            &["-c".to_string(), conf.display().to_string()],
            &credentials.server_env(),
        )
        .unwrap_or_else(|e| panic!("cannot start a least-privilege nats-server: {e}"));
        Self {
            process,
            _dir: dir,
            credentials: Some(credentials),
        }
    }

    /// The server's URL without credentials.
    pub fn plain_url(&self) -> String {
        self.process.url()
    }

    /// `(user, password)` of a least-privilege user.
    pub fn credentials(&self, user: &str) -> Option<(String, String)> {
        let p = self.credentials.as_ref()?.password(user)?;
        Some((user.to_string(), p.to_string()))
    }

    /// `user`'s password file, on a least-privilege server.
    pub fn password_file(&self, user: &str) -> Option<PathBuf> {
        Some(self.credentials.as_ref()?.password_file(user))
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
