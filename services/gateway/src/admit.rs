//! What the gateway accepts: only events it can keep. Every event is checked before the `2xx`
//! against what happens to it downstream, so that a sender told "stored" is never followed by a
//! dead letter or a message redelivered forever:
//!
//! - it decodes again as the trigger consumer decodes it (the CloudEvents NATS binding, with every
//!   attribute unchanged);
//! - its message fits JetStream: headers (its attributes) at most [`MAX_HEADER_BYTES`], headers and
//!   data at most the limit (`BATON_MAX_EVENT_BYTES` and the NATS server's `max_payload`, the
//!   smaller);
//! - the `run.requested` that embeds it (as `trigger`, see [`baton_core::event::RunRequested`])
//!   fits the same limit, with [`RESERVED`] bytes left for what the gateway does not know yet.
//!
//! A request that fails a check can never succeed: it is answered `400` or `413` with the field and
//! the reason, never `503` (which tells the sender to retry).

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use axum::http::StatusCode;
use baton_core::binding;
use baton_core::event::{self, RunEvent, RunRequested, Trigger, WorkflowRef};
use bytes::Bytes;
use cloudevents::Event;

use crate::{Rejection, ingress};

/// The largest header block JetStream stores: it keeps a message's header length in 16 bits.
pub const MAX_HEADER_BYTES: usize = 65_535;

/// Bytes of a `run.requested` kept free for what depends on the workflow the event will match,
/// unknown when the event is accepted: a workflow name longer than [`NAME_ALLOWANCE`] counted in
/// the estimate, and the three headers of a debounced start (`Nats-Schedule`,
/// `Nats-Schedule-Target`, its own `Nats-Msg-Id`: under 200 bytes).
pub const RESERVED: usize = 512;

/// The workflow name length the run request estimate is made with.
pub const NAME_ALLOWANCE: usize = 64;

/// The limits an event must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `BATON_MAX_EVENT_BYTES`: the largest message every Baton decoder accepts.
    pub max_event_bytes: usize,
    /// The NATS server's `max_payload`: the largest message it takes, headers included.
    pub max_payload: usize,
}

impl Limits {
    /// The largest message, headers included, that is both stored and decoded.
    pub fn max_message(&self) -> usize {
        self.max_event_bytes.min(self.max_payload)
    }

    fn describe(&self) -> String {
        format!(
            "{} bytes (the smaller of BATON_MAX_EVENT_BYTES, {}, and the NATS server's max_payload, {})",
            self.max_message(),
            self.max_event_bytes,
            self.max_payload
        )
    }
}

/// Checks that `event` can be stored and can start runs; `Err` says which field and why.
pub fn check(event: &Event, limits: &Limits) -> Result<(), Rejection> {
    let (headers, body) = ingress::message(event);
    round_trip(event, &headers, &body)?;
    fits(&headers, body.len(), limits, "the event", String::new)?;
    let (run_headers, run_body) = run_request(event);
    fits(
        &run_headers,
        run_body.len() + RESERVED,
        limits,
        "the run request that would embed the event",
        || {
            let overhead = (header_bytes(&run_headers) + run_body.len() + RESERVED)
                .saturating_sub(header_bytes(&headers) + body.len());
            format!(
                " (a run request holds the whole event as its `trigger`, plus about {overhead} bytes, {RESERVED} of them reserved for flow control)"
            )
        },
    )
}

/// `value` with its control characters percent-encoded (`%7F`, `%0A`: the bytes of their UTF-8
/// form), as a URI carries them; anything else unchanged. For a `source` or `subject` made of a
/// webhook's payload fields: CloudEvents strings may not hold control characters, and an event is
/// worth keeping for one stray byte in a URL or name.
pub fn escape_controls(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control() {
            let mut utf8 = [0; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The first control character of `value`, as `U+000A`.
pub fn control_character(value: &str) -> Option<String> {
    value
        .chars()
        .find(|c| c.is_control())
        .map(|c| format!("U+{:04X}", c as u32))
}

/// Decodes the stored form back with the binding's rules (no size limit: sizes are checked apart).
fn round_trip(event: &Event, headers: &HeaderMap, body: &Bytes) -> Result<(), Rejection> {
    let unlimited = binding::Limits {
        max_bytes: usize::MAX,
    };
    let back = binding::nats::decode_with(&unlimited, Some(headers), body).map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            format!("the event cannot be stored as a CloudEvent: {e}"),
        )
    })?;
    let attributes = |e: &Event| -> BTreeMap<String, String> {
        e.iter()
            .map(|(name, value)| (name.to_owned(), value.to_string()))
            .collect()
    };
    let (sent, stored) = (attributes(event), attributes(&back));
    match sent
        .keys()
        .chain(stored.keys())
        .find(|name| sent.get(*name) != stored.get(*name))
    {
        None => Ok(()),
        Some(name) => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            format!(
                "attribute `{name}` does not survive storing: the CloudEvents NATS binding reads it back differently"
            ),
        )),
    }
}

/// The wire size of a NATS header block: `NATS/1.0\r\n`, `<name>: <value>\r\n` each, `\r\n`.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    12 + headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| name.len() + v.as_str().len() + 4)
        })
        .sum::<usize>()
}

fn fits(
    headers: &HeaderMap,
    body: usize,
    limits: &Limits,
    what: &str,
    why: impl FnOnce() -> String,
) -> Result<(), Rejection> {
    let head = header_bytes(headers);
    if head > MAX_HEADER_BYTES {
        let (name, largest) = headers
            .iter()
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values.iter().map(move |v| (name, v.as_str().len()))
            })
            .max_by_key(|(_, len)| *len)
            .unwrap_or(("", 0));
        let attribute = name.strip_prefix("ce-").unwrap_or(name);
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "attribute `{attribute}` is {largest} bytes (percent-encoded): the attributes of {what} take {head} bytes of NATS headers, and JetStream stores at most {MAX_HEADER_BYTES}; shorten it, or send it in the data"
            ),
        ));
    }
    let size = head + body;
    if size > limits.max_message() {
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{what} is {size} bytes{}; the limit is {}: send less data (a link to it, say), or raise both limits",
                why(),
                limits.describe()
            ),
        ));
    }
    Ok(())
}

/// The `run.requested` the trigger consumer stores for `event` (as in `triggers`), with a workflow
/// name of [`NAME_ALLOWANCE`] characters and the largest version.
fn run_request(event: &Event) -> (HeaderMap, Bytes) {
    let trigger = Trigger::from_event(event);
    let name = "w".repeat(NAME_ALLOWANCE);
    let request = RunEvent::Requested(RunRequested {
        run_id: event::triggered_run_id(&name, &trigger.source, &trigger.id),
        workflow: WorkflowRef {
            name,
            version: u64::MAX,
        },
        input: serde_json::Value::Null,
        trigger: Some(trigger),
        parent: None,
    });
    let trace = event::trace(event).unwrap_or_default();
    binding::encode(&request.to_cloudevent(crate::triggers::SOURCE, &trace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    /// What a run request adds to the event it embeds.
    fn run_overhead(event: &Event) -> usize {
        let (headers, body) = ingress::message(event);
        let (run_headers, run_body) = run_request(event);
        (header_bytes(&run_headers) + run_body.len() + RESERVED)
            .saturating_sub(header_bytes(&headers) + body.len())
    }

    const LIMITS: Limits = Limits {
        max_event_bytes: 64 * 1024,
        max_payload: 1024 * 1024,
    };

    fn event(data: &str) -> Event {
        EventBuilderV10::new()
            .id("e-1")
            .source("ci/test")
            .ty("com.example.built")
            .data("application/json", data.as_bytes().to_vec())
            .build()
            .unwrap()
    }

    #[test]
    fn an_event_is_refused_when_its_run_request_would_not_fit() {
        check(&event(r#"{"ok": true}"#), &LIMITS).unwrap();
        // JSON data of n bytes is embedded re-serialized: about n bytes in the run request.
        let data = |n: usize| format!("\"{}\"", "x".repeat(n));
        let (headers, _) = ingress::message(&event(""));
        let room = LIMITS.max_message() - header_bytes(&headers);
        // The event alone fits; its run request does not.
        let refused = check(&event(&data(room - 100)), &LIMITS).unwrap_err();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            refused
                .message
                .contains("the run request that would embed the event is"),
            "{refused:?}"
        );
        assert!(refused.message.contains("65536 bytes"), "{refused:?}");
        // JSON data is embedded as the JSON it is: escapes keep their size.
        let escaped = format!("\"{}\"", "\\u0001".repeat((room - 1200) / 6));
        let grown = check(&event(&escaped), &LIMITS);
        assert!(grown.is_ok(), "{grown:?}");
        let binary = EventBuilderV10::new()
            .id("e-2")
            .source("s")
            .ty("t")
            .data("application/octet-stream", vec![1u8; room / 2])
            .build()
            .unwrap();
        // Data that is not JSON becomes a JSON string: a control byte takes 6 bytes there.
        let refused = check(&binary, &LIMITS).unwrap_err();
        assert!(refused.message.contains("run request"), "{refused:?}");
        // Below the margin, the run request fits what the consumers decode.
        let fits = event(&data(room - run_overhead(&event("\"\"")) - 64));
        check(&fits, &LIMITS).unwrap();
        let (h, b) = run_request(&fits);
        assert!(header_bytes(&h) + b.len() + RESERVED <= LIMITS.max_message());
    }

    #[test]
    fn control_characters_are_percent_encoded_as_in_a_uri() {
        assert_eq!(
            escape_controls("https://x/a\u{7f}b\n\u{85}%20 é"),
            "https://x/a%7Fb%0A%C2%85%20 é"
        );
        assert_eq!(control_character("a\tb"), Some("U+0009".into()));
        assert_eq!(control_character("café"), None);
    }

    #[test]
    fn an_attribute_over_64_kib_is_refused_by_name() {
        let mut big = event("{}");
        big.set_extension("huge", "x".repeat(70_000));
        let refused = check(
            &big,
            &Limits {
                max_event_bytes: 1 << 20,
                max_payload: 1 << 20,
            },
        )
        .unwrap_err();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            refused
                .message
                .starts_with("attribute `huge` is 70000 bytes"),
            "{refused:?}"
        );
    }

    #[test]
    fn an_attribute_the_binding_would_refuse_is_refused_before_storing() {
        let mut bad = event("{}");
        cloudevents::AttributesWriter::set_source(&mut bad, "https://api.github.com/repos/a\u{7f}");
        let refused = check(&bad, &LIMITS).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert!(
            refused.message.contains("attribute `source` is invalid"),
            "{refused:?}"
        );
    }
}
