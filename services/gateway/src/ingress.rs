//! Storing accepted events in `BATON_EVENTS`. A request is answered 2xx only after JetStream
//! acknowledged every event it carried.
//!
//! Events are published in chunks of at most [`CHUNK`], each chunk's acknowledgements awaited
//! before the next: the JetStream context has a fixed number of publish-ack slots (5,000 in
//! async-nats), held until an acknowledgement is awaited, so publishing a large batch before
//! awaiting anything would take them all and wait forever for one more.

use async_nats::{HeaderMap, jetstream};
use baton_core::{binding, subjects};
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Events of one request in flight (published, acknowledgement not yet awaited) at a time.
pub const CHUNK: usize = 250;

/// Why events were not stored: each is transient (the sender retries).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream did not take the event: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("the gateway is shutting down")]
    Closed(#[from] tokio::sync::AcquireError),
}

/// One stored event, as the sender is told about it.
#[derive(Debug, Serialize)]
pub struct Stored {
    pub id: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// The event was already in the stream (a redelivery): nothing new happens.
    pub duplicate: bool,
}

/// The `Nats-Msg-Id` of an external event. CloudEvents are unique by (`source`, `id`), so both
/// are in it: two senders that use the same ids do not drop each other's events.
pub fn message_id(event: &Event) -> String {
    let hash = Sha256::digest(format!("{}\0{}", event.source(), event.id()).as_bytes());
    hash.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The message an event is stored as: the NATS binding's headers and body, with its message id.
pub fn message(event: &Event) -> (HeaderMap, Bytes) {
    let (mut headers, body) = binding::encode(event);
    headers.insert("Nats-Msg-Id", message_id(event).as_str());
    (headers, body)
}

/// Publishes `events` on `baton.events.<origin>` and waits for every acknowledgement.
pub async fn store(
    js: &jetstream::Context,
    origin: &str,
    events: &[Event],
) -> Result<Vec<Stored>, Error> {
    store_sharing(js, origin, events, &Semaphore::new(CHUNK)).await
}

/// [`store`], taking a chunk's publish-ack slots from `slots` (all of a chunk at once, so two
/// requests never each hold part of what they need) and giving them back once the chunk is
/// stored. The semaphore is fair: requests take turns chunk by chunk, so a large batch does not
/// keep a single event waiting for more than the chunks queued before it.
pub async fn store_sharing(
    js: &jetstream::Context,
    origin: &str,
    events: &[Event],
    slots: &Semaphore,
) -> Result<Vec<Stored>, Error> {
    let subject = subjects::ingress(origin);
    let mut stored = Vec::with_capacity(events.len());
    for chunk in events.chunks(CHUNK) {
        let _slots = slots.acquire_many(chunk.len() as u32).await?;
        let mut acks = Vec::with_capacity(chunk.len());
        for event in chunk {
            let (headers, body) = message(event);
            acks.push(
                js.publish_with_headers(subject.clone(), headers, body)
                    .await?,
            );
        }
        for (event, ack) in chunk.iter().zip(acks) {
            let ack = ack.await?;
            stored.push(Stored {
                id: event.id().to_owned(),
                ty: event.ty().to_owned(),
                duplicate: ack.duplicate,
            });
        }
    }
    Ok(stored)
}
