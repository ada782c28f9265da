//! The saga coordinator: tracks every run from its journal, drives the DAG, ends runs.
//!
//! [`saga`] is the pure decision logic; [`service`] is the I/O around it: one task per journal
//! partition, owned through a pinned JetStream consumer, rebuilt from the journal on takeover.

pub mod concurrency;
pub mod saga;
pub mod service;
pub mod waits;

pub use service::{Coordinator, Options};
