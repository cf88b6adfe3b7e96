//! Slipway's domain: what a run is and how it moves, as plain synchronous functions and types.
//!
//! - the event catalogue, its versions and the envelope: [`events`], [`envelope`], [`ids`],
//!   [`subjects`], [`facts`], [`trace`] (W3C trace context, as bytes);
//! - the pipeline spec and what it plans: [`spec`], [`plan`];
//! - the pure core: [`fold`] (a run's state from its events) and [`decide`] (what it needs
//!   next), with [`policy`] (approvals) and [`outcome`] (how runs and stages ended);
//! - what the gates and reports compute: [`thresholds`], [`stats`], [`dora`], [`signing`],
//!   [`cdevents`] (the CDEvents a run's events stand for); [`judge`] (a rollout's statistics
//!   and decisions on the figures of two variants), [`traffic`] (the flag definition a
//!   rollout's weight is published as);
//! - [`sim`]: whole runs simulated, for tests (feature `test-support`).
//!
//! No clock, no network, no files: time is a value, effects are data the I/O side executes.
//! Its `Cargo.toml` names no async runtime, NATS client, HTTP client or telemetry SDK, so the
//! compiler keeps it so (a test checks the dependency tree).

pub mod admission;
pub mod cdevents;
pub mod checkpoint;
pub mod decide;
pub mod digest;
pub mod dora;
pub mod embeddings;
pub mod envelope;
pub mod events;
pub mod facts;
pub mod fold;
pub mod ids;
pub mod index;
pub mod judge;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod power;
pub mod rollout;
pub mod run;
pub mod service;
pub mod signing;
pub mod spec;
pub mod spec_error;
pub mod stage;
pub mod stats;
pub mod subjects;
pub mod thresholds;
pub mod trace;
pub mod traffic;

pub use decide::{Command, decide};
pub use envelope::Event;
pub use events::EventData;
pub use fold::{fold, fold_into};
pub use run::{Phase, Run};

/// A pure simulation of a whole pipeline (deciding, and answering every request), for tests
/// of the domain logic here and in other crates.
#[cfg(any(test, feature = "test-support"))]
pub mod sim;
