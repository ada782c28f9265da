//! The CloudEvents HTTP protocol binding: binary, structured and batch content modes.
//!
//! In binary mode `datacontenttype` travels as `Content-Type` and every other attribute as a
//! percent-encoded `ce-<name>` header. (cloudevents-sdk's axum extractor does not percent-decode
//! header values, so non-ASCII attributes would not survive it; this module shares its checks with
//! the NATS binding instead.)

use bytes::Bytes;
use cloudevents::{AttributesReader, Event};
use http::{HeaderMap, HeaderName, HeaderValue, header::CONTENT_TYPE};

use super::{
    Error, Limits, Value, attribute_string, build, ce_headers, data_bytes, percent_encode,
};

pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

/// Decodes an HTTP request or response into its events (one, or several for a batch).
pub fn decode(limits: &Limits, headers: &HeaderMap, body: &[u8]) -> Result<Vec<Event>, Error> {
    limits.check(
        body.len()
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>(),
    )?;
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or(""))
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == STRUCTURED {
        return Ok(vec![super::json::decode(body)?]);
    }
    if essence == BATCH {
        return super::json::decode_batch(body);
    }
    if essence.starts_with("application/cloudevents") {
        return Err(Error::MediaType(content_type.to_owned()));
    }
    let mut pairs = Vec::new();
    for (name, value) in headers {
        let value = value.to_str().map_err(|_| Error::Attribute {
            name: name.as_str().to_owned(),
            reason: "header value is not visible ASCII; percent-encode it".into(),
        })?;
        pairs.push((name.as_str(), value));
    }
    let mut attributes = ce_headers(pairs.into_iter())?;
    if !attributes.iter().any(|(n, _)| n == "specversion") {
        return Err(Error::NotCloudEvent(
            "no ce-specversion header (binary mode) and Content-Type is not application/cloudevents+json (structured mode)"
                .into(),
        ));
    }
    // In HTTP binary mode the data content type is the Content-Type header.
    attributes.retain(|(n, _)| n != "datacontenttype");
    if !content_type.is_empty() {
        attributes.push((
            "datacontenttype".into(),
            Value::String(content_type.to_owned()),
        ));
    }
    Ok(vec![build(
        attributes,
        (!body.is_empty()).then(|| body.to_vec()),
    )?])
}

/// Encodes an event in binary mode: headers and body.
pub fn encode_binary(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.iter() {
        if name == "datacontenttype" {
            continue;
        }
        let header = HeaderName::try_from(format!("ce-{name}"))
            .expect("attribute names are valid header names");
        let value = HeaderValue::try_from(percent_encode(&attribute_string(&value)))
            .expect("percent-encoded is ASCII");
        headers.insert(header, value);
    }
    if let Some(ct) = event
        .datacontenttype()
        .and_then(|ct| HeaderValue::try_from(ct).ok())
    {
        headers.insert(CONTENT_TYPE, ct);
    }
    (
        headers,
        data_bytes(event).map(Bytes::from).unwrap_or_default(),
    )
}

/// Encodes an event in structured mode.
pub fn encode_structured(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
    );
    (headers, Bytes::from(super::json::encode(event)))
}

/// Encodes events as a batch.
pub fn encode_batch(events: &[Event]) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents-batch+json; charset=utf-8"),
    );
    (headers, Bytes::from(super::json::encode_batch(events)))
}
