//! What is composed around a [`crate::bus::Bus`], each shared by its clones: the object store of
//! artifacts, logs and gate details, and the index of deploys the gates' baselines come from.

pub mod baseline;
pub mod objects;
