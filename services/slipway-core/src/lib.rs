//! Slipway's I/O: everything that touches NATS, processes, files or telemetry, around the pure
//! domain in `slipway-domain`. One folder per part:
//!
//! - [`bus`]: the connection to NATS and the log's stream (append, read), and its CloudEvents
//!   binding ([`bus::binding`]);
//! - [`store`]: what is composed around a bus: the object store ([`store::objects`]) and the
//!   deploys read from the log ([`store::baseline`]: what is live, a gate's baseline);
//! - [`runtime`]: the worker loop, and the runs in flight it follows ([`runtime::follow`]);
//! - [`exec`]: commands, the fresh workspaces they run in ([`exec::workspace`]), and a local
//!   nats-server ([`exec::server`]);
//! - [`telemetry`]: logs, OTLP spans and metrics ([`telemetry::otel`]), a run's trace ids
//!   ([`telemetry::trace`]);
//! - [`config`]: a service's configuration, and the NATS users `slipway up` makes
//!   ([`config::credentials`]);
//! - [`testing`]: a real nats-server per test (feature `test-support`).
//!
//! A service's own domain (how to build, how to parse a JUnit report) lives in its crate.

pub mod bus;
pub mod config;
pub mod embeddings;
pub mod exec;
pub mod health;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod traffic;

#[cfg(feature = "test-support")]
pub mod testing;
