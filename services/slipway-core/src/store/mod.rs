//! What is composed around a [`crate::bus::Bus`], each shared by its clones: the object store of
//! artifacts, logs and gate details, the index of deploys the gates' baselines come from, and
//! the run index of ended runs.

pub mod baseline;
pub mod checkpoints;
pub mod objects;
pub mod runs;
