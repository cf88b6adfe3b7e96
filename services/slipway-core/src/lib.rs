//! Slipway's shared library.
//!
//! - the event catalogue and envelope: [`events`], [`envelope`], [`ids`], [`subjects`];
//! - the CloudEvents NATS binding and the log: [`binding`], [`bus`], [`objects`];
//! - the pipeline spec and the pure logic: [`spec`], [`plan`], [`fold`], [`decide`];
//! - the service runtime: [`runtime`], [`config`], [`telemetry`], [`exec`], [`workspace`],
//!   [`server`]; test support behind the `test-support` feature.
//!
//! A service's own domain (how to build, how to parse a JUnit report) lives in its crate.

pub mod baseline;
pub mod binding;
pub mod bus;
pub mod cdevents;
pub mod config;
pub mod credentials;
pub mod decide;
pub mod dora;
pub mod envelope;
pub mod events;
pub mod exec;
pub mod fold;
pub mod follow;
pub mod ids;
pub mod objects;
pub mod otel;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod runtime;
pub mod server;
pub mod signing;
pub mod spec;
pub mod stats;
pub mod subjects;
pub mod telemetry;
pub mod thresholds;
pub mod trace;
pub mod workspace;

#[cfg(feature = "test-support")]
pub mod testing;

pub use decide::{Command, decide};
pub use envelope::Event;
pub use events::EventData;
pub use fold::{Phase, Run, fold, fold_into};

/// A pure simulation of a whole pipeline (deciding, and answering every request), for tests
/// of the domain logic here and in other crates.
#[cfg(any(test, feature = "test-support"))]
pub mod sim;
