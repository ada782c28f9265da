//! What the fuzz targets share: how an input is split into headers and a body, and what the
//! gateway does with an event it accepted (encode it for JetStream, and read it back the way the
//! trigger consumer does).
//!
//! Input layout: the first byte modulo 16 is the number of header lines that follow; each line ends
//! at `\n` and is `name: value` (split at the first `:`, spaces after it dropped). The rest is the
//! body. Lines that are not valid header names or values for the target's header map are skipped.

use std::collections::BTreeMap;

use baton_core::binding::{self, Limits};
use cloudevents::Event;

/// Header lines (name and value bytes, unchecked) and the body.
pub fn split(data: &[u8]) -> (Vec<(&[u8], &[u8])>, &[u8]) {
    let Some((&count, mut rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let mut headers = Vec::new();
    for _ in 0..count % 16 {
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = after;
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let value = &line[colon + 1..];
            let start = value.iter().position(|&b| b != b' ').unwrap_or(value.len());
            headers.push((&line[..colon], &value[start..]));
        }
    }
    (headers, rest)
}

/// The headers as an `http::HeaderMap`; invalid lines skipped.
pub fn http_headers(lines: &[(&[u8], &[u8])]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in lines {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// The headers as an `async_nats::HeaderMap`; invalid lines skipped.
pub fn nats_headers(lines: &[(&[u8], &[u8])]) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in lines {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            name.parse::<async_nats::header::HeaderName>(),
            value.parse::<async_nats::HeaderValue>(),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Every attribute as text: what a round trip must keep.
fn attributes(event: &Event) -> BTreeMap<String, String> {
    event
        .iter()
        .map(|(name, value)| (name.to_owned(), value.to_string()))
        .collect()
}

/// What the gateway does with an accepted event: checks it (`admit::check`: an event a parser
/// yields must pass, far below the limits), encodes it for JetStream (`ingress::store`), and the
/// trigger consumer decodes it back. All must work, and keep every attribute.
pub fn store(event: &Event) {
    let limits = baton_gateway::admit::Limits {
        max_event_bytes: 1 << 20,
        max_payload: 1 << 20,
    };
    if let Err(refused) = baton_gateway::admit::check(event, &limits) {
        panic!("a parsed event is refused when it is stored: {}", refused.message);
    }
    let (headers, body) = baton_gateway::ingress::message(event);
    let unlimited = Limits {
        max_bytes: usize::MAX,
    };
    let back = binding::nats::decode_with(&unlimited, Some(&headers), &body)
        .unwrap_or_else(|e| panic!("an accepted event does not decode after encoding: {e}"));
    assert_eq!(attributes(&back), attributes(event), "NATS round trip");
    // The HTTP encodings (`baton events tail`, sinks) must not panic either.
    let _ = binding::http::encode_binary(event);
    let _ = binding::http::encode_structured(event);
    let _ = binding::http::encode_batch(std::slice::from_ref(event));
}

/// Asserts a rejection explains itself.
pub fn explained(message: &str) {
    assert!(!message.is_empty(), "an error without a message");
}
