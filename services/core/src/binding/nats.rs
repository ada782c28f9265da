//! The CloudEvents NATS protocol binding.
//!
//! Output is binary content mode: the body is the event's data, and every attribute,
//! `datacontenttype` and extensions included, is a lower-case `ce-<name>` header, percent-encoded.
//! `Nats-Msg-Id` is the event id (percent-encoded if it holds a line break or a `%`), so JetStream
//! drops a republished event within its duplicate window.
//! Input is binary when a `ce-specversion` header is present (whatever `Content-Type` says; that is
//! what other SDKs write), structured (the JSON event format) otherwise.

use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::{AttributesReader, Event};

use super::{
    Error, Limits, Value, attribute_string, build, ce_headers, data_bytes, percent_encode,
};

/// Encodes `event` in binary content mode.
pub fn encode(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.iter() {
        headers.insert(
            format!("ce-{name}").as_str(),
            percent_encode(&attribute_string(&value)).as_str(),
        );
    }
    headers.insert("Nats-Msg-Id", message_id(event.id()).as_str());
    (
        headers,
        data_bytes(event).map(Bytes::from).unwrap_or_default(),
    )
}

/// The `Nats-Msg-Id` of an event id: the id itself, unless it holds a line break, which a NATS
/// header cannot carry (async-nats panics on one), or a `%`: then the id percent-encoded, so two
/// ids never share a message id.
fn message_id(id: &str) -> String {
    if id.contains(['\r', '\n', '%']) {
        percent_encode(id)
    } else {
        id.to_owned()
    }
}

/// Decodes a NATS message into a CloudEvent, with the default [`Limits`].
pub fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Event, Error> {
    decode_with(&Limits::default(), headers, payload)
}

/// Decodes a NATS message into a CloudEvent.
pub fn decode_with(
    limits: &Limits,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Event, Error> {
    let pairs: Vec<(&str, &str)> = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (AsRef::<str>::as_ref(name), v.as_str()))
        })
        .collect();
    let header_bytes: usize = pairs.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    limits.check(payload.len() + header_bytes)?;
    let attributes = ce_headers(pairs.iter().copied())?;
    if !attributes.iter().any(|(n, _)| n == "specversion") {
        return super::json::decode(payload).map_err(|e| match e {
            Error::NotCloudEvent(reason) => Error::NotCloudEvent(format!(
                "no ce-specversion header, and not a structured event: {reason}"
            )),
            other => other,
        });
    }
    let mut attributes = attributes;
    // sdk-go also takes a plain Content-Type header as the data content type.
    if !attributes.iter().any(|(n, _)| n == "datacontenttype")
        && let Some((_, ct)) = pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        attributes.push(("datacontenttype".into(), Value::String((*ct).to_owned())));
    }
    build(attributes, (!payload.is_empty()).then(|| payload.to_vec()))
}
