//! Slipway's I/O: everything that touches NATS, processes, files or telemetry, around the pure
//! domain in `slipway-domain`.
//!
//! - the CloudEvents NATS binding and the log: [`binding`], [`bus`], [`objects`], [`follow`],
//!   [`baseline`] (what is live, from the log);
//! - the service runtime: [`runtime`] (the worker loop), [`exec`] and [`workspace`] (commands
//!   in fresh workspaces), [`config`], [`credentials`], [`server`] (a local nats-server);
//! - telemetry: [`telemetry`] (logs), [`otel`] and [`trace`] (OTLP spans and metrics);
//! - test support behind the `test-support` feature.
//!
//! A service's own domain (how to build, how to parse a JUnit report) lives in its crate.

pub mod baseline;
pub mod binding;
pub mod bus;
pub mod config;
pub mod credentials;
pub mod exec;
pub mod follow;
pub mod objects;
pub mod otel;
pub mod runtime;
pub mod server;
pub mod telemetry;
pub mod trace;
pub mod workspace;

#[cfg(feature = "test-support")]
pub mod testing;
