//! The CloudEvents NATS protocol binding.
//!
//! Output is always binary content mode: the body is the event's data, and every attribute,
//! `datacontenttype` and extensions included, is a lowercase `ce-<name>` header whose value is
//! percent-encoded as the binding requires. Input is binary when a `ce-specversion` header is present,
//! structured (JSON event format) otherwise, whatever the `Content-Type` says: that is what other
//! SDKs emit (sdk-go reads binary mode iff `ce-specversion` is present).

use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::event::SpecVersion;
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Encoding, MessageAttributeValue, MessageDeserializer,
    StructuredDeserializer, StructuredSerializer,
};
use cloudevents::{AttributesReader, Data, Event};

/// Why a NATS message is not a valid CloudEvent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("header {header} is not valid: {reason}")]
    Header { header: String, reason: String },
    #[error(
        "the message is not a CloudEvent: no ce-specversion header and the body is not a JSON event ({0})"
    )]
    Structured(String),
    #[error("invalid CloudEvent: {0}")]
    Event(String),
}

impl From<cloudevents::message::Error> for Error {
    fn from(e: cloudevents::message::Error) -> Self {
        Error::Event(e.to_string())
    }
}

const PREFIX: &str = "ce-";
const SPECVERSION: &str = "ce-specversion";

/// Encodes `event` in binary content mode. `Nats-Msg-Id` is set to the event id, so that JetStream
/// drops a republished event within the stream's duplicate window.
pub fn encode(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.iter() {
        headers.insert(
            format!("{PREFIX}{name}").as_str(),
            percent_encode(&value.to_string()).as_str(),
        );
    }
    headers.insert("Nats-Msg-Id", event.id());
    let body = match event.data() {
        None => Bytes::new(),
        Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
        Some(Data::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
        Some(Data::Json(v)) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
    };
    (headers, body)
}

/// Decodes a NATS message (headers and payload) into a CloudEvent.
pub fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Event, Error> {
    let message = Message { headers, payload };
    match message.encoding() {
        Encoding::BINARY => MessageDeserializer::into_event(message).map_err(Error::from),
        _ => MessageDeserializer::into_event(message).map_err(|e| Error::Structured(e.to_string())),
    }
}

struct Message<'a> {
    headers: Option<&'a HeaderMap>,
    payload: &'a [u8],
}

impl Message<'_> {
    fn ce_headers(&self) -> impl Iterator<Item = (String, &async_nats::HeaderValue)> {
        self.headers
            .into_iter()
            .flat_map(|h| h.iter())
            .filter_map(|(name, values)| {
                let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
                lower
                    .starts_with(PREFIX)
                    .then(|| values.first().map(|v| (lower, v)))
                    .flatten()
            })
    }
}

impl BinaryDeserializer for Message<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
        self,
        mut visitor: V,
    ) -> cloudevents::message::Result<R> {
        let mut spec = None;
        let mut rest = Vec::new();
        for (name, value) in self.ce_headers() {
            let decoded = percent_decode(value.as_str()).map_err(|reason| {
                cloudevents::message::Error::Other {
                    source: format!("header {name}: {reason}").into(),
                }
            })?;
            if name == SPECVERSION {
                spec = Some(decoded);
            } else {
                rest.push((name[PREFIX.len()..].to_owned(), decoded));
            }
        }
        let spec = SpecVersion::try_from(spec.unwrap_or_default().as_str())?;
        let known = spec.attribute_names();
        visitor = visitor.set_spec_version(spec)?;
        for (name, value) in rest {
            let value = MessageAttributeValue::String(value);
            visitor = if known.contains(&name.as_str()) {
                visitor.set_attribute(&name, value)?
            } else {
                visitor.set_extension(&name, value)?
            };
        }
        if self.payload.is_empty() {
            visitor.end()
        } else {
            visitor.end_with_data(self.payload.to_vec())
        }
    }
}

impl StructuredDeserializer for Message<'_> {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(
        self,
        visitor: V,
    ) -> cloudevents::message::Result<R> {
        visitor.set_structured_event(self.payload.to_vec())
    }
}

impl MessageDeserializer for Message<'_> {
    fn encoding(&self) -> Encoding {
        if self.ce_headers().any(|(name, _)| name == SPECVERSION) {
            Encoding::BINARY
        } else {
            Encoding::STRUCTURED
        }
    }
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
                .ok_or_else(|| format!("truncated escape at byte {i}"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| format!("bad escape at byte {i}"))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| format!("bad escape %{hex} at byte {i}"))?,
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
mod tests {
    use super::*;
    use cloudevents::EventBuilder;

    #[test]
    fn percent_encoding_example_of_the_binding_round_trips() {
        assert_eq!(
            percent_encode("Euro € 😀"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80"
        );
        assert_eq!(
            percent_decode("Euro%20%E2%82%AC%20%F0%9F%98%80").unwrap(),
            "Euro € 😀"
        );
        assert_eq!(
            percent_decode("%e2%82%ac").unwrap(),
            "€",
            "lower-case hex must be accepted"
        );
        assert_eq!(
            percent_decode("%41bc").unwrap(),
            "Abc",
            "needless encoding must be accepted"
        );
        assert!(
            percent_decode("%C0%A0").is_err(),
            "overlong UTF-8 must be rejected"
        );
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%zz").is_err());
    }

    #[test]
    fn binary_round_trip_keeps_every_attribute_and_the_data_bytes() {
        let event = cloudevents::EventBuilderV10::new()
            .id("1234")
            .source("/mycontext/sub context")
            .ty("com.example.Ünïcode")
            .subject("a \"quoted\" 100% subject")
            .time("2018-04-05T03:56:24Z")
            .extension(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .data("application/json", serde_json::json!({"k": "välue"}))
            .build()
            .unwrap();
        let (headers, body) = encode(&event);
        assert_eq!(
            headers.get("ce-datacontenttype").unwrap().as_str(),
            "application/json"
        );
        assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "1234");
        let back = decode(Some(&headers), &body).unwrap();
        assert_eq!(back.id(), "1234");
        assert_eq!(back.ty(), "com.example.Ünïcode");
        assert_eq!(back.subject(), Some("a \"quoted\" 100% subject"));
        assert_eq!(back.source().as_str(), "/mycontext/sub context");
        assert_eq!(
            back.extension("traceparent").unwrap().to_string(),
            event.extension("traceparent").unwrap().to_string()
        );
        let Some(Data::Binary(bytes)) = back.data() else {
            panic!("binary data expected")
        };
        assert_eq!(bytes.as_slice(), r#"{"k":"välue"}"#.as_bytes());
    }

    #[test]
    fn structured_input_is_accepted_with_or_without_content_type() {
        let json = br#"{"specversion":"1.0","id":"x","source":"/s","type":"t","data":{"a":1}}"#;
        let event = decode(None, json).unwrap();
        assert_eq!(event.ty(), "t");
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/cloudevents+json");
        assert_eq!(decode(Some(&headers), json).unwrap().id(), "x");
    }

    #[test]
    fn bad_input_is_rejected_with_a_reason() {
        let mut headers = HeaderMap::new();
        headers.insert("ce-specversion", "1.0");
        headers.insert("ce-id", "%C0%A0");
        headers.insert("ce-source", "/s");
        headers.insert("ce-type", "t");
        let err = decode(Some(&headers), b"").unwrap_err().to_string();
        assert!(err.contains("ce-id"), "{err}");
        assert!(decode(None, b"not json").is_err());
        let mut headers = HeaderMap::new();
        headers.insert("ce-specversion", "0.1");
        assert!(decode(Some(&headers), b"").is_err());
    }
}
