//! Storing accepted events in `BATON_EVENTS`. A request is answered 2xx only after JetStream
//! acknowledged every event it carried.

use async_nats::jetstream;
use baton_core::{binding, subjects};
use cloudevents::{AttributesReader, Event};
use serde::Serialize;
use sha2::{Digest, Sha256};

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

/// Publishes `events` on `baton.events.<origin>` and waits for every acknowledgement.
pub async fn store(
    js: &jetstream::Context,
    origin: &str,
    events: &[Event],
) -> Result<Vec<Stored>, String> {
    let subject = subjects::ingress(origin);
    let mut acks = Vec::with_capacity(events.len());
    for event in events {
        let (mut headers, body) = binding::encode(event);
        headers.insert("Nats-Msg-Id", message_id(event).as_str());
        let ack = js
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    let mut stored = Vec::with_capacity(events.len());
    for (event, ack) in events.iter().zip(acks) {
        let ack = ack.await.map_err(|e| e.to_string())?;
        stored.push(Stored {
            id: event.id().to_owned(),
            ty: event.ty().to_owned(),
            duplicate: ack.duplicate,
        });
    }
    Ok(stored)
}
