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
        Self { process, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.process.url()
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
