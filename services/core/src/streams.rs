//! Idempotent set-up of Baton's streams and KV buckets. Every service calls [`ensure`] on start, so
//! a fresh server needs no manual step, and an existing layout is never changed behind a user's back.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::subjects;

pub const RUNS: &str = "BATON_RUNS";
pub const EVENTS: &str = "BATON_EVENTS";
pub const DLQ: &str = "BATON_DLQ";
pub const WORKFLOWS_BUCKET: &str = "baton-workflows";
/// The `wait` steps waiting for an event: `<run>.<step>` -> what the event must match.
pub const WAITS_BUCKET: &str = "baton-waits";
/// The active runs of each concurrency key: `<workflow>.<key hash>` -> run ids.
pub const CONCURRENCY_BUCKET: &str = "baton-concurrency";
/// Secrets for steps, by name (`baton secrets set`). Restrict `$KV.baton-secrets.>` to runners.
pub const SECRETS_BUCKET: &str = "baton-secrets";
/// The windows of trigger flow control (`dedup`, `rate`): `<key id>` -> start and admitted runs.
pub const FLOW_BUCKET: &str = "baton-flow";
/// The index of runs: `<run id>` -> workflow, version and the request that claimed it
/// ([`crate::runs`]). Kept as long as the journal.
pub const RUNS_BUCKET: &str = "baton-runs";

/// Stream metadata key that fixes the partition count of the journal for its whole life.
const PARTITIONS_KEY: &str = "baton.partitions";

/// The shape of a Baton installation.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Partitions of the journal: the unit of coordinator ownership. Fixed when the stream is created.
    pub partitions: u32,
    /// Stream replicas: 1 on a single server, 3 on a cluster.
    pub replicas: usize,
    /// How long the journal keeps run events.
    pub journal_max_age: Duration,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            partitions: 16,
            replicas: 1,
            journal_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up {what}: {source}")]
pub struct Error {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn err(what: &str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Error + '_ {
    move |source| Error {
        what: what.to_owned(),
        source,
    }
}

/// Creates the streams and buckets that do not exist yet. Returns the journal's partition count,
/// which is the one stored in the stream when it already existed.
pub async fn ensure(js: &jetstream::Context, topology: &Topology) -> Result<u32, Error> {
    let runs = js
        .get_or_create_stream(stream::Config {
            name: RUNS.into(),
            subjects: vec![format!("{}.>", subjects::RUNS)],
            storage: stream::StorageType::File,
            num_replicas: topology.replicas,
            max_age: topology.journal_max_age,
            duplicate_window: Duration::from_secs(120),
            allow_message_schedules: true,
            allow_message_ttl: true,
            metadata: [(PARTITIONS_KEY.to_owned(), topology.partitions.to_string())].into(),
            ..Default::default()
        })
        .await
        .map_err(|e| err(RUNS)(e.into()))?;
    let partitions = runs
        .cached_info()
        .config
        .metadata
        .get(PARTITIONS_KEY)
        .and_then(|p| p.parse().ok())
        .unwrap_or(topology.partitions);

    for (name, subject, max_age, window) in [
        (EVENTS, subjects::EVENTS, 7 * 24 * 3600, 600),
        (DLQ, subjects::DLQ, 30 * 24 * 3600, 120),
    ] {
        js.get_or_create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{subject}.>")],
            storage: stream::StorageType::File,
            num_replicas: topology.replicas,
            max_age: Duration::from_secs(max_age),
            duplicate_window: Duration::from_secs(window),
            ..Default::default()
        })
        .await
        .map_err(|e| err(name)(e.into()))?;
    }

    // The longest trigger window (`Flow::MAX`): an entry untouched that long has expired anyway.
    let week = Duration::from_secs(7 * 24 * 3600);
    for (bucket, description, max_age) in [
        (
            WORKFLOWS_BUCKET,
            "Baton workflow registry: immutable versions and heads",
            Duration::ZERO,
        ),
        (
            WAITS_BUCKET,
            "Baton waits: the wait steps that are waiting for an event",
            Duration::ZERO,
        ),
        (
            CONCURRENCY_BUCKET,
            "Baton concurrency keys: the active runs of each key",
            Duration::ZERO,
        ),
        (
            SECRETS_BUCKET,
            "Baton secrets: values of the secrets steps reference, read by runners",
            Duration::ZERO,
        ),
        (
            FLOW_BUCKET,
            "Baton trigger flow control: the window of each key",
            week,
        ),
        (
            RUNS_BUCKET,
            "Baton run index: every run id, claimed once by the request that started it",
            topology.journal_max_age,
        ),
    ] {
        if js.get_key_value(bucket).await.is_err() {
            js.create_key_value(kv::Config {
                bucket: bucket.into(),
                description: description.into(),
                storage: stream::StorageType::File,
                num_replicas: topology.replicas,
                history: 1,
                max_age,
                ..Default::default()
            })
            .await
            .map_err(|e| err(bucket)(e.into()))?;
        }
    }
    Ok(partitions)
}

/// Every message of `stream` that an ordered consumer with `config` delivers, up to the last one
/// stored when it was created: a snapshot, oldest first (the journal of a run, the runs of a period).
pub async fn read(
    js: &jetstream::Context,
    stream: &str,
    config: jetstream::consumer::pull::OrderedConfig,
) -> Result<Vec<jetstream::Message>, String> {
    use futures::StreamExt;
    let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let mut consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if consumer
        .info()
        .await
        .map_err(|e| e.to_string())?
        .num_pending
        == 0
    {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let pending = message.info().map_err(|e| e.to_string())?.pending;
        out.push(message);
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}
