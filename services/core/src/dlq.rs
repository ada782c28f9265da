//! Dead letters: input that Baton rejected, kept in `BATON_DLQ` as `dev.baton.deadletter` events
//! whose data holds the reason, the original subject, headers and exact bytes (base64), so nothing
//! rejected is lost and it can be inspected and re-published (`baton deadletters`).

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudevents::{EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::trace::Trace;
use crate::{binding, subjects};

pub const TYPE: &str = "dev.baton.deadletter";

/// Data of `dev.baton.deadletter`: a message Baton rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    /// Why it was rejected: what is wrong, and where.
    pub reason: String,
    /// The service that rejected it (`coordinator`, `runner`, `ingress`, `gateway` ...).
    pub origin: String,
    /// The subject (or HTTP path) it arrived on.
    pub subject: String,
    /// Its headers, each with every value received.
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// Its exact bytes, base64-encoded.
    pub payload_base64: String,
}

impl DeadLetter {
    pub fn new(
        origin: &str,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        reason: &str,
    ) -> DeadLetter {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
            // Added by the server on delivery to a pinned consumer; not part of the message.
            if AsRef::<str>::as_ref(name).eq_ignore_ascii_case("Nats-Pin-Id") {
                continue;
            }
            let entry = map
                .entry(AsRef::<str>::as_ref(name).to_owned())
                .or_default();
            entry.extend(values.iter().map(|v| v.as_str().to_owned()));
        }
        DeadLetter {
            reason: reason.to_owned(),
            origin: origin.to_owned(),
            subject: subject.to_owned(),
            headers: map,
            payload_base64: BASE64.encode(payload),
        }
    }

    /// The trace of the original (its `ce-traceparent` and `ce-tracestate` headers) when it has a
    /// valid one, so the dead letter stays in the trace of what was rejected; else a new trace.
    pub fn trace(&self) -> Trace {
        let values = |name: &str| -> Vec<String> {
            let found = self
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name));
            found
                .map(|(_, v)| {
                    v.iter()
                        .filter_map(|v| binding::percent_decode(v).ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (parents, states) = (values("ce-traceparent"), values("ce-tracestate"));
        let parents: Vec<&str> = parents.iter().map(String::as_str).collect();
        let states: Vec<&str> = states.iter().map(String::as_str).collect();
        Trace::parse(&parents, &states).unwrap_or_default()
    }

    /// The original bytes.
    pub fn payload(&self) -> Vec<u8> {
        BASE64.decode(&self.payload_base64).unwrap_or_default()
    }

    /// The original headers, less `Nats-Msg-Id` (a re-published message must not be dropped as a
    /// duplicate of the one that was rejected).
    pub fn republish_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, values) in &self.headers {
            if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                continue;
            }
            for v in values {
                h.append(name.as_str(), v.as_str());
            }
        }
        h
    }
}

/// Stores a dead letter in `baton.dlq.<origin>` and waits until it is stored, so that the caller may
/// then ack (terminate) the original. `id` should identify the original (for example its stream and
/// sequence), so that a redelivered original does not make a second dead letter.
pub async fn publish(
    js: &jetstream::Context,
    id: &str,
    letter: &DeadLetter,
) -> Result<(), crate::Error> {
    tracing::warn!(origin = %letter.origin, subject = %letter.subject, reason = %letter.reason, "rejected a message to the dead-letter stream");
    metrics::counter!(crate::metrics::DEAD_LETTERS, "origin" => letter.origin.clone()).increment(1);
    let trace = letter.trace();
    let mut builder = EventBuilderV10::new()
        .id(id)
        .source(format!("baton/{}", letter.origin))
        .ty(TYPE)
        .subject(letter.subject.clone())
        .time(chrono::Utc::now())
        .data(
            "application/json",
            serde_json::to_value(letter).expect("a dead letter serializes"),
        )
        .extension("traceparent", trace.traceparent());
    if let Some(state) = &trace.state {
        builder = builder.extension("tracestate", state.as_str());
    }
    let event = builder
        .build()
        .map_err(|e| crate::Error::permanent(format!("cannot build the dead letter: {e}")))?;
    let (headers, body) = binding::encode(&event);
    js.publish_with_headers(
        format!("{}.{}", subjects::DLQ, letter.origin),
        headers,
        body,
    )
    .await
    .map_err(|e| crate::Error::publish(&e))?
    .await
    .map_err(|e| crate::Error::publish(&e))?;
    Ok(())
}

/// Rejects a JetStream message: stores a dead letter identified by the message's stream and
/// sequence, then terminates the message so it is never redelivered. If the dead letter cannot be
/// stored the message is left for redelivery instead, so nothing is lost.
pub async fn reject(
    js: &jetstream::Context,
    origin: &str,
    message: &jetstream::Message,
    reason: &str,
) {
    use async_nats::jetstream::AckKind;
    let id = match message.info() {
        Ok(info) => format!("{}.{}", info.stream, info.stream_sequence),
        Err(_) => crate::event::new_run_id(),
    };
    let letter = DeadLetter::new(
        origin,
        &message.subject,
        message.headers.as_ref(),
        &message.payload,
        reason,
    );
    match publish(js, &id, &letter).await {
        Ok(()) => {
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(error) => {
            tracing::error!(%error, "cannot store a dead letter; the message will be redelivered");
            let _ = message
                .ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(1))))
                .await;
        }
    }
}
