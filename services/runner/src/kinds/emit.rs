//! `emit`: publishes a CloudEvent on `baton.events.emit`, where it is stored in `BATON_EVENTS` and
//! can start other workflows and end `wait` steps.
//!
//! `with` holds the event: `type` (required), `source` (default `baton/runner`), `subject`, `data`,
//! `datacontenttype`, `dataschema`, `extensions`. The event's id is the attempt's idempotency key,
//! so an attempt executed again after a crash publishes the same event, which JetStream drops as a
//! duplicate: it is published once.

use std::sync::Arc;

use baton_core::event::StepError;
use baton_core::{binding, subjects};
use cloudevents::AttributesReader;
use serde_json::{Value, json};

use super::http::{EVENT_KEYS, build_event};
use super::input_object;
use crate::{Handler, StepContext};

pub fn emit(client: async_nats::Client) -> Handler {
    let js = async_nats::jetstream::new(client);
    Arc::new(move |input: Value, ctx: StepContext| {
        let js = js.clone();
        Box::pin(async move {
            let object = input_object(&input, "emit", EVENT_KEYS)?;
            let event = build_event(object, "", &ctx)?;
            let (headers, body) = binding::encode(&event);
            let unavailable = |e: String| StepError {
                message: format!("the event could not be stored: {e}"),
                retryable: true,
                code: Some("unavailable".into()),
            };
            let ack = js
                .publish_with_headers(subjects::ingress("emit"), headers, body)
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            Ok(json!({
                "id": event.id(),
                "type": event.ty(),
                "source": event.source().to_string(),
                "subject": event.subject(),
                "duplicate": ack.duplicate,
            }))
        })
    })
}
