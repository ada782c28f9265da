//! The JSON event format (structured mode, and batches).
//!
//! Data keeps its exact bytes both ways: JSON data is embedded as the raw JSON text it arrived as;
//! other text as a JSON string; anything that cannot be carried as is (JSON with surrounding white
//! space, bytes that are not UTF-8) as `data_base64`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cloudevents::event::AttributeValue;
use cloudevents::{AttributesReader, Event};
use serde_json::Value as Json;
use serde_json::value::RawValue;

use super::{Error, Value, attribute_string, build, data_bytes, is_json_media_type};

/// Parses one event in the JSON format.
pub fn decode(body: &[u8]) -> Result<Event, Error> {
    // Raw member text, so that `data` keeps its exact bytes.
    let members: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(body)
            .map_err(|e| Error::NotCloudEvent(format!("the body is not a JSON object ({e})")))?;
    from_members(members.into_iter().collect())
}

/// Parses a batch (`application/cloudevents-batch+json`): a JSON array of events.
pub fn decode_batch(body: &[u8]) -> Result<Vec<Event>, Error> {
    let items: Vec<Box<RawValue>> = serde_json::from_slice(body).map_err(|e| {
        Error::NotCloudEvent(format!("a batch must be a JSON array of events ({e})"))
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            decode(raw.get().as_bytes())
                .map_err(|e| Error::NotCloudEvent(format!("event {i} of the batch: {e}")))
        })
        .collect()
}

fn from_members(members: Vec<(String, Box<RawValue>)>) -> Result<Event, Error> {
    let mut attributes = Vec::new();
    let (mut data, mut data_base64) = (None, None);
    for (name, raw) in members {
        let value: Json =
            serde_json::from_str(raw.get()).map_err(|e| Error::NotCloudEvent(e.to_string()))?;
        match name.as_str() {
            "data" => data = (!value.is_null()).then_some((raw, value)),
            "data_base64" => data_base64 = (!value.is_null()).then_some(value),
            _ => match value {
                // A null attribute is an absent one.
                Json::Null => {}
                Json::String(s) => attributes.push((name, Value::String(s))),
                Json::Bool(b) => attributes.push((name, Value::Bool(b))),
                Json::Number(n) => match n.as_i64() {
                    Some(i) => attributes.push((name, Value::Integer(i))),
                    None => {
                        return Err(Error::Attribute {
                            name,
                            reason: format!(
                                "{n} is not an integer: CloudEvents integers have no fraction"
                            ),
                        });
                    }
                },
                Json::Array(_) | Json::Object(_) => {
                    return Err(Error::Attribute {
                        name,
                        reason: "must be a string, a boolean or an integer".into(),
                    });
                }
            },
        }
    }
    let content_type = attributes
        .iter()
        .find(|(n, _)| n == "datacontenttype")
        .and_then(|(_, v)| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        });
    let bytes = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(Error::attr(
                "data",
                "`data` and `data_base64` cannot both be present",
            ));
        }
        (None, Some(Json::String(b64))) => Some(
            BASE64
                .decode(b64)
                .map_err(|e| Error::attr("data_base64", format!("not valid base64 ({e})")))?,
        ),
        (None, Some(_)) => return Err(Error::attr("data_base64", "must be a base64 string")),
        // Text data of a non-JSON type is the string itself; JSON data is its raw JSON text.
        (Some((_, Json::String(s))), None)
            if !content_type.as_deref().is_none_or(is_json_media_type) =>
        {
            Some(s.into_bytes())
        }
        (Some((raw, _)), None) => Some(raw.get().as_bytes().to_vec()),
        (None, None) => None,
    };
    build(attributes, bytes)
}

/// Encodes one event in the JSON format.
pub fn encode(event: &Event) -> Vec<u8> {
    let mut object = ObjectWriter::default();
    for (name, value) in event.iter() {
        let json = match value {
            AttributeValue::Boolean(b) => Json::Bool(*b),
            AttributeValue::Integer(i) => Json::from(*i),
            other => Json::String(attribute_string(&other)),
        };
        object.field(name, &json.to_string());
    }
    if let Some(bytes) = data_bytes(event) {
        let json_type = event.datacontenttype().is_none_or(is_json_media_type);
        let text = std::str::from_utf8(&bytes).ok();
        // JSON data goes in as its exact text when that text is a JSON value with nothing around it.
        let raw_json = text.filter(|t| {
            json_type && t.trim() == *t && serde_json::from_str::<&RawValue>(t).is_ok()
        });
        match (raw_json, text) {
            (Some(raw), _) => object.field("data", raw),
            (None, Some(t)) if !json_type => {
                object.field("data", &Json::String(t.to_owned()).to_string())
            }
            _ => object.field(
                "data_base64",
                &Json::String(BASE64.encode(&bytes)).to_string(),
            ),
        }
    }
    object.finish()
}

/// Encodes a batch.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(encode(event));
    }
    out.push(b']');
    out
}

/// Writes a JSON object member by member, values given as JSON text.
#[derive(Default)]
struct ObjectWriter {
    out: Vec<u8>,
}

impl ObjectWriter {
    fn field(&mut self, name: &str, json: &str) {
        self.out.push(if self.out.is_empty() { b'{' } else { b',' });
        self.out
            .extend(Json::String(name.to_owned()).to_string().into_bytes());
        self.out.push(b':');
        self.out.extend(json.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        if self.out.is_empty() {
            self.out.push(b'{');
        }
        self.out.push(b'}');
        self.out
    }
}
