//! CloudEvents protocol bindings: NATS ([`nats`]), HTTP ([`http`]) and the JSON event format
//! ([`json`]) they share for structured mode.
//!
//! Every decoder goes through the same checks, so an event is accepted or rejected the same way
//! whichever way it arrived: `specversion` 1.0 only; `id`, `source` and `type` present and not empty;
//! attribute names of lower-case letters and digits; extension values that are strings, booleans or
//! 32-bit integers; `time` in RFC 3339; `dataschema` an absolute URI; a size limit. Data is kept as
//! the exact bytes received (`Data::Binary`), so it round-trips byte for byte.

pub mod http;
pub mod json;
pub mod nats;

use chrono::{DateTime, SecondsFormat, Utc};
use cloudevents::event::{AttributeValue, ExtensionValue};
use cloudevents::{AttributesWriter, Data, Event, EventBuilder, EventBuilderV10};

pub use nats::{decode, encode};

/// Default largest event accepted: NATS's default maximum payload.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// Why input is not an acceptable CloudEvent. The message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a CloudEvent: {0}")]
    NotCloudEvent(String),
    #[error(
        "specversion {0:?} is not supported: Baton accepts CloudEvents 1.0 (send specversion \"1.0\")"
    )]
    SpecVersion(String),
    #[error("required attribute `{0}` is missing or empty")]
    Missing(&'static str),
    #[error("attribute `{name}` is invalid: {reason}")]
    Attribute { name: String, reason: String },
    #[error(
        "the event is {size} bytes; the limit is {limit} bytes (raise it with BATON_MAX_EVENT_BYTES, or send a smaller event)"
    )]
    TooLarge { size: usize, limit: usize },
    #[error(
        "media type {0:?} is not supported: send application/cloudevents+json, application/cloudevents-batch+json, or binary mode with ce-* headers"
    )]
    MediaType(String),
}

impl Error {
    fn attr(name: &str, reason: impl Into<String>) -> Error {
        Error::Attribute {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Limits applied by every decoder.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest event, headers and data included.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let max_bytes = std::env::var("BATON_MAX_EVENT_BYTES")
            .ok()
            .and_then(|v| v.parse().ok());
        Limits {
            max_bytes: max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
        }
    }
}

impl Limits {
    pub fn check(&self, size: usize) -> Result<(), Error> {
        if size > self.max_bytes {
            return Err(Error::TooLarge {
                size,
                limit: self.max_bytes,
            });
        }
        Ok(())
    }
}

/// An attribute value as received, before it becomes part of an [`Event`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    String(String),
    Bool(bool),
    Integer(i64),
}

const CONTEXT_ATTRIBUTES: [&str; 8] = [
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
];

/// Whether `name` is a valid attribute name: lower-case ASCII letters and digits.
pub fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Builds an event from received attributes (`specversion` included) and data, with every check.
pub(crate) fn build(
    attributes: Vec<(String, Value)>,
    data: Option<Vec<u8>>,
) -> Result<Event, Error> {
    let text = |name: &str, v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(Error::attr(name, "must be a string")),
    };
    // The CloudEvents type system: a String holds no control characters. Checked for the context
    // attributes, which end up in ids, subjects and logs; extension values stay as sent (the
    // conformance suite's own events carry a line break in one).
    for (name, value) in &attributes {
        if let Value::String(s) = value
            && is_context_attribute(name)
            && let Some(c) = s.chars().find(|c| c.is_control())
        {
            return Err(Error::attr(
                name,
                format!(
                    "contains the control character U+{:04X}; CloudEvents strings may not (remove it, or percent-encode it inside the value)",
                    c as u32
                ),
            ));
        }
    }
    let get = |name: &str| attributes.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    match get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(Value::String(v)) => return Err(Error::SpecVersion(v.clone())),
        Some(_) => return Err(Error::attr("specversion", "must be the string \"1.0\"")),
        None => return Err(Error::Missing("specversion")),
    }
    let required = |name: &'static str| match get(name) {
        Some(v) => text(name, v).and_then(|s| {
            if s.is_empty() {
                Err(Error::Missing(name))
            } else {
                Ok(s)
            }
        }),
        None => Err(Error::Missing(name)),
    };
    let mut event = EventBuilderV10::new()
        .id(required("id")?)
        .source(required("source")?)
        .ty(required("type")?)
        .build()
        .map_err(|e| Error::NotCloudEvent(e.to_string()))?;
    for (name, value) in &attributes {
        match name.as_str() {
            "specversion" | "id" | "source" | "type" => {}
            "datacontenttype" => {
                event.set_datacontenttype(Some(text(name, value)?));
            }
            "subject" => {
                event.set_subject(Some(text(name, value)?));
            }
            "dataschema" => {
                let s = text(name, value)?;
                let url = url::Url::parse(&s).map_err(|e| {
                    Error::attr(name, format!("{s:?} is not an absolute URI ({e})"))
                })?;
                event.set_dataschema(Some(url));
            }
            "time" => {
                let s = text(name, value)?;
                let t = DateTime::parse_from_rfc3339(&s).map_err(|e| {
                    Error::attr(name, format!("{s:?} is not an RFC 3339 timestamp ({e})"))
                })?;
                event.set_time(Some(t.with_timezone(&Utc)));
            }
            ext => {
                if !is_attribute_name(ext) {
                    return Err(Error::attr(
                        ext,
                        "attribute names may only contain lower-case letters a-z and digits 0-9",
                    ));
                }
                let value = match value {
                    Value::String(s) => ExtensionValue::String(s.clone()),
                    Value::Bool(b) => ExtensionValue::Boolean(*b),
                    Value::Integer(i) => {
                        if i32::try_from(*i).is_err() {
                            return Err(Error::attr(
                                ext,
                                format!(
                                    "{i} is outside the 32-bit signed integer range of CloudEvents"
                                ),
                            ));
                        }
                        ExtensionValue::Integer(*i)
                    }
                };
                event.set_extension(ext, value);
            }
        }
    }
    if let Some(data) = data {
        event.set_data_unchecked(Data::Binary(data));
    }
    Ok(event)
}

/// The canonical string form of an attribute, as both bindings write it in headers.
pub(crate) fn attribute_string(value: &AttributeValue) -> String {
    match value {
        AttributeValue::Time(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        other => other.to_string(),
    }
}

/// The data of an event as bytes (JSON data serialized compactly).
pub(crate) fn data_bytes(event: &Event) -> Option<Vec<u8>> {
    match event.data()? {
        Data::Binary(b) => Some(b.clone()),
        Data::String(s) => Some(s.clone().into_bytes()),
        Data::Json(v) => Some(serde_json::to_vec(v).unwrap_or_default()),
    }
}

/// Whether a media type is JSON (`application/json`, `text/json`, `*/*+json`), parameters ignored.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Received headers as (lower-case attribute name, decoded value) for every `ce-` header.
pub(crate) fn ce_headers<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<(String, Value)>, Error> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for (name, raw) in headers {
        let lower = name.to_ascii_lowercase();
        let Some(attr) = lower.strip_prefix("ce-") else {
            continue;
        };
        let value = percent_decode(raw).map_err(|reason| Error::Attribute {
            name: format!("ce-{attr}"),
            reason,
        })?;
        if out.iter().any(|(n, _)| n == attr) {
            return Err(Error::attr(attr, "appears in more than one header"));
        }
        out.push((attr.to_owned(), Value::String(value)));
    }
    Ok(out)
}

/// Whether a name is one of the CloudEvents context attributes (not an extension).
pub fn is_context_attribute(name: &str) -> bool {
    CONTEXT_ATTRIBUTES.contains(&name)
}

/// Percent-encodes a header value as the CloudEvents HTTP and NATS bindings require: space, `"`,
/// `%` and everything outside U+0021..=U+007E, as upper-case `%XY` of the UTF-8 bytes.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a header value: first an RFC 7230 quoted string, then one round of percent-decoding.
/// Rejects malformed escapes and invalid UTF-8 (overlong forms included).
pub fn percent_decode(value: &str) -> Result<String, String> {
    let unquoted;
    let value = if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
        let mut s = String::with_capacity(value.len());
        let mut chars = value[1..value.len() - 1].chars();
        while let Some(c) = chars.next() {
            s.push(if c == '\\' {
                chars.next().ok_or("quoted string ends with a backslash")?
            } else {
                c
            });
        }
        unquoted = s;
        unquoted.as_str()
    } else {
        value
    };
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or_else(|| format!("truncated percent-escape at byte {i}"))?;
            // Two hex digits: `from_str_radix` alone would also take a sign (`%+A`).
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(format!(
                    "bad percent-escape %{} at byte {i}",
                    String::from_utf8_lossy(hex)
                ));
            }
            let hex =
                std::str::from_utf8(hex).map_err(|_| format!("bad percent-escape at byte {i}"))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| format!("bad percent-escape %{hex} at byte {i}"))?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-decoded bytes are not valid UTF-8".to_owned())
}

#[cfg(test)]
mod tests;
