//! Flow control of triggers, per key: windows (`dedup`, `rate`) in the KV bucket `baton-flow`, and
//! debounce as a JetStream message schedule.
//!
//! A window is one KV entry per (workflow, trigger, key): when it opened and the runs it admitted.
//! It changes only by compare-and-set, so gateways running side by side admit exactly `limit` runs.
//! An event whose run is already in the window is admitted again: a redelivered event (the gateway
//! died after admitting it, before its `run.requested` was stored) still starts its run.
//!
//! Debounce needs no state of Baton's own: every event of a burst publishes the run's
//! `run.requested` as a schedule (`Nats-Schedule: @at now+quiet`) on the key's schedule subject.
//! The server keeps one schedule per subject, so each event replaces the previous one, and only the
//! last one fires, once the key has been quiet for `quiet`.

use std::time::Duration;

use async_nats::jetstream::kv;
use baton_core::event::RunEvent;
use baton_core::trace::Trace;
use baton_core::{Bus, binding, subjects};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A window of a key: opened at `start_ms`, holding the runs it admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start_ms: i64,
    pub runs: Vec<String>,
}

/// What a window does with a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admit it, storing this window first.
    Open(Window),
    /// It is in the window already (a redelivery): admit it, nothing to store.
    Again,
    /// The window is full: no run.
    Full { start_ms: i64, runs: usize },
}

/// The pure rule: a window that has expired is replaced by a new one that opens now.
pub fn decide(
    current: Option<&Window>,
    now_ms: i64,
    run: &str,
    limit: u32,
    per: Duration,
) -> Decision {
    let fresh = || {
        Decision::Open(Window {
            start_ms: now_ms,
            runs: vec![run.to_owned()],
        })
    };
    let Some(w) = current else {
        return fresh();
    };
    if now_ms >= w.start_ms.saturating_add(per.as_millis() as i64) {
        return fresh();
    }
    if w.runs.iter().any(|r| r == run) {
        return Decision::Again;
    }
    if w.runs.len() < limit as usize {
        let mut next = w.clone();
        next.runs.push(run.to_owned());
        return Decision::Open(next);
    }
    Decision::Full {
        start_ms: w.start_ms,
        runs: w.runs.len(),
    }
}

/// The key of a (workflow, trigger, key value): in KV keys and subjects.
pub fn key_id(workflow: &str, trigger: usize, key: &str) -> String {
    let hash = Sha256::digest(format!("{workflow}\0{trigger}\0{key}").as_bytes());
    hash.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Whether the window admits `run`; `Err` when the bucket cannot be read or written (the caller
/// retries the event later).
pub async fn admit(
    bucket: &kv::Store,
    key: &str,
    run: &str,
    limit: u32,
    per: Duration,
) -> Result<Decision, baton_core::Error> {
    // Compare-and-set loses only to another writer of the same key; a few tries settle it.
    for _ in 0..16 {
        let entry = bucket.entry(key).await.map_err(|e| {
            baton_core::Error::request(format_args!("cannot read flow-control key {key}"), &e)
        })?;
        let live = entry
            .as_ref()
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice::<Window>(&e.value).ok());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let decision = decide(live.as_ref(), now_ms, run, limit, per);
        let Decision::Open(window) = &decision else {
            return Ok(decision);
        };
        let value = serde_json::to_vec(window).expect("a window serializes");
        let written = match &entry {
            None => bucket.create(key, value.into()).await.map(|_| ()).ok(),
            Some(e) => bucket
                .update(key, value.into(), e.revision)
                .await
                .map(|_| ())
                .ok(),
        };
        if written.is_some() {
            return Ok(decision);
        }
    }
    Err(baton_core::Error::transient(format!(
        "flow-control key {key} is changing too fast"
    )))
}

/// Schedules `request` (a `run.requested`) to be stored once key `key_id` has been quiet for
/// `quiet`, replacing the schedule of the event before it. Returns when the schedule is stored.
pub async fn debounce(
    bus: &Bus,
    key_id: &str,
    request: &RunEvent,
    trace: &Trace,
    quiet: Duration,
) -> Result<(), baton_core::Error> {
    let (mut headers, body) =
        binding::encode(&request.to_cloudevent(crate::triggers::SOURCE, trace));
    let due = chrono::Utc::now() + quiet;
    headers.insert(
        "Nats-Schedule",
        format!(
            "@at {}",
            due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
        .as_str(),
    );
    headers.insert(
        "Nats-Schedule-Target",
        request.subject(bus.partitions).as_str(),
    );
    // A redelivered event does not push its own schedule further out.
    headers.insert("Nats-Msg-Id", format!("debounce.{}", request.id()).as_str());
    let subject = subjects::debounce(key_id);
    bus.js
        .publish_with_headers(subject, headers, body)
        .await
        .map_err(|e| baton_core::Error::publish(&e))?
        .await
        .map_err(|e| baton_core::Error::publish(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_window_admits_its_limit_then_nothing_until_it_expires() {
        let Decision::Open(w) = decide(None, 1_000, "r1", 2, HOUR) else {
            panic!("a new key opens a window")
        };
        assert_eq!(w.runs, ["r1"]);
        let Decision::Open(w) = decide(Some(&w), 2_000, "r2", 2, HOUR) else {
            panic!("room for a second run")
        };
        assert_eq!(
            decide(Some(&w), 3_000, "r3", 2, HOUR),
            Decision::Full {
                start_ms: 1_000,
                runs: 2
            }
        );
        // A redelivered event of an admitted run is admitted again.
        assert_eq!(decide(Some(&w), 3_000, "r1", 2, HOUR), Decision::Again);
        let later = 1_000 + HOUR.as_millis() as i64;
        let Decision::Open(next) = decide(Some(&w), later, "r3", 2, HOUR) else {
            panic!("an expired window is replaced")
        };
        assert_eq!(
            next,
            Window {
                start_ms: later,
                runs: vec!["r3".into()]
            }
        );
    }

    #[test]
    fn key_ids_separate_workflows_triggers_and_keys() {
        let a = key_id("alerts", 0, "cca51dbc6694a268");
        assert_eq!(a, key_id("alerts", 0, "cca51dbc6694a268"));
        assert_ne!(a, key_id("alerts", 1, "cca51dbc6694a268"));
        assert_ne!(a, key_id("alerts2", 0, "cca51dbc6694a268"));
        assert_ne!(a, key_id("alerts", 0, "1c5d859e845f39a3"));
        assert!(subjects::is_token(&a));
    }
}
