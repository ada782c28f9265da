//! End-to-end tests against real nats-server and `baton` processes.

mod auth;
mod binding;
mod catalogue;
mod cli;
mod concurrency;
mod effects;
mod gateway;
mod guarantees;
mod harness;
mod history;
mod interop;
mod kinds;
mod metrics;
mod saga;
mod secrets;
mod slice;
mod step_services;
mod tracing;
mod waits;
mod workflows;

use std::time::{Duration, Instant};

use baton_coordinator::service::{Journaled, read_journal};
use baton_core::event::RunEvent;
use baton_core::streams::Topology;
use baton_core::{Bus, subjects};

/// Connects like a Baton service would (creating the streams).
pub async fn bus(url: &str) -> Bus {
    baton_core::connect(url, "e2e", &Topology::default())
        .await
        .expect("connect")
}

/// The run's journal.
pub async fn journal(bus: &Bus, run_id: &str) -> Vec<Journaled> {
    let p = subjects::partition(run_id, bus.partitions);
    read_journal(&bus.js, subjects::run_all(p, run_id))
        .await
        .expect("read journal")
}

/// Waits until the run has ended and returns its journal; panics with `context` after `timeout`.
pub async fn wait_for_end(
    bus: &Bus,
    run_id: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) -> Vec<Journaled> {
    let deadline = Instant::now() + timeout;
    let p = subjects::partition(run_id, bus.partitions);
    loop {
        // Reading can fail for a moment while a cluster elects a new leader.
        let events = read_journal(&bus.js, subjects::run_all(p, run_id))
            .await
            .unwrap_or_default();
        if events
            .iter()
            .any(|e| matches!(e.event, RunEvent::Ended(..)))
        {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} did not end in {timeout:?}; journal: {events:#?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `pred` holds for the run's journal.
pub async fn wait_for(
    bus: &Bus,
    run_id: &str,
    timeout: Duration,
    pred: impl Fn(&[Journaled]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let events = journal(bus, run_id).await;
        if pred(&events) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met in {timeout:?}; journal: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
