//! Baton's core library: what two or more Baton services share.
//!
//! - [`event`]: the CloudEvent envelope Baton uses for every message, and the types of its own events;
//! - [`binding`]: the CloudEvents NATS protocol binding (binary out, binary or structured in);
//! - [`subjects`] and [`streams`]: the subject layout, partitions, and idempotent stream set-up;
//! - [`connect`]: connecting to NATS (services wait for it), refusing servers older than 2.12;
//! - [`provision`]: finding or installing a suitable `nats-server` binary;
//! - [`error`]: the error type with a kind (transient, permanent, invalid input) callers branch on;
//! - [`runs`]: the index of runs, which makes a run id execute at most once;
//! - [`shutdown`] and [`telemetry`]: one shutdown path and logging set-up for every service.

pub mod binding;
pub mod catalogue;
pub mod connect;
pub mod dlq;
pub mod error;
pub mod event;
pub mod metrics;
pub mod provision;
pub mod registry;
pub mod runs;
pub mod secrets;
pub mod shutdown;
pub mod spans;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod trace;
pub mod workflows;

pub use cloudevents::Event;
pub use connect::{Auth, Bus, connect, connect_as, connect_waiting};
pub use error::{Error, Kind};
