//! Prometheus Alertmanager webhooks (payload version 4): one CloudEvent per alert.
//!
//! - `type`: `io.prometheus.alertmanager.alert.firing` or `.resolved`, from the alert's own status
//!   (a group that is `firing` can hold resolved alerts);
//! - `subject`: the alert's fingerprint, the key of everything that follows (waits, flow control);
//! - `source`: the Alertmanager's `externalURL` (control characters percent-encoded, as in a URI);
//! - `id`: a hash of fingerprint, status and start (and end, once resolved), so a notification that
//!   Alertmanager repeats is the same event, and a new firing of the alert is a new one;
//! - `data`: the alert (`status`, `labels`, `annotations`, `startsAt`, `endsAt`, `generatorURL`,
//!   `fingerprint`, and any field a newer Alertmanager adds) plus `group`: the notification's
//!   receiver, status, group key, group, common labels and annotations, external URL.

use chrono::{DateTime, Utc};
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use http::StatusCode;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::Rejection;
use crate::admit::escape_controls;

pub const FIRING: &str = "io.prometheus.alertmanager.alert.firing";
pub const RESOLVED: &str = "io.prometheus.alertmanager.alert.resolved";

/// The CloudEvents of one notification.
pub fn events(body: &[u8]) -> Result<Vec<Event>, Rejection> {
    let bad = |message: String| Rejection::new(StatusCode::BAD_REQUEST, message);
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let Value::Object(notification) = payload else {
        return Err(bad("the body is not a JSON object".into()));
    };
    match notification.get("version").and_then(Value::as_str) {
        Some("4") => {}
        other => {
            return Err(bad(format!(
                "payload version {} is not supported: Baton reads Alertmanager's webhook payload version \"4\"",
                other.map_or("(none)".into(), |v| format!("{v:?}"))
            )));
        }
    }
    let Some(Value::Array(alerts)) = notification.get("alerts") else {
        return Err(bad("`alerts` is missing or not a list".into()));
    };
    let source = notification
        .get("externalURL")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map_or_else(|| "alertmanager".to_owned(), escape_controls);
    let group: Map<String, Value> = [
        "receiver",
        "status",
        "groupKey",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "truncatedAlerts",
    ]
    .into_iter()
    .filter_map(|k| notification.get(k).map(|v| (k.to_owned(), v.clone())))
    .collect();

    let mut events = Vec::with_capacity(alerts.len());
    for (i, alert) in alerts.iter().enumerate() {
        let Value::Object(alert) = alert else {
            return Err(bad(format!("alerts[{i}] is not an object")));
        };
        let text = |key: &str| {
            alert
                .get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(format!("alerts[{i}].{key} is missing or not a string")))
        };
        let fingerprint = text("fingerprint")?;
        if fingerprint.chars().any(char::is_control) {
            return Err(bad(format!(
                "alerts[{i}].fingerprint contains a control character; Alertmanager fingerprints are hex digits"
            )));
        }
        let status = text("status")?;
        let ty = match status {
            "firing" => FIRING,
            "resolved" => RESOLVED,
            other => {
                return Err(bad(format!(
                    "alerts[{i}].status is {other:?}; Alertmanager sends \"firing\" or \"resolved\""
                )));
            }
        };
        let starts = text("startsAt")?;
        // `endsAt` of a firing alert is 0001-01-01T00:00:00Z: it is not part of its identity.
        let ends = alert.get("endsAt").and_then(Value::as_str).unwrap_or("");
        let id = id(
            fingerprint,
            status,
            starts,
            if ty == RESOLVED { ends } else { "" },
        );
        let time = if ty == RESOLVED { ends } else { starts };
        let mut data = alert.clone();
        data.insert("group".into(), Value::Object(group.clone()));
        let mut builder = EventBuilderV10::new()
            .id(id)
            .ty(ty)
            .source(source.as_str())
            .subject(fingerprint)
            .data("application/json", json!(data));
        if let Ok(time) = DateTime::parse_from_rfc3339(time) {
            builder = builder.time(time.with_timezone(&Utc));
        }
        events.push(
            builder
                .build()
                .map_err(|e| bad(format!("alerts[{i}] does not make a CloudEvent: {e}")))?,
        );
    }
    Ok(events)
}

fn id(fingerprint: &str, status: &str, starts: &str, ends: &str) -> String {
    let hash = Sha256::digest(format!("{fingerprint}\0{status}\0{starts}\0{ends}").as_bytes());
    let hex: String = hash.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{fingerprint}-{status}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::AttributesReader;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/alertmanager/webhooks")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_firing_group_is_one_event_per_alert() {
        let events = events(&fixture("01-firing-initial.body.json")).unwrap();
        assert_eq!(events.len(), 2);
        let subjects: Vec<_> = events.iter().map(|e| e.subject().unwrap()).collect();
        assert_eq!(subjects, ["cca51dbc6694a268", "1c5d859e845f39a3"]);
        let first = &events[0];
        assert_eq!(first.ty(), FIRING);
        assert_eq!(
            first.source().as_str(),
            "http://alertmanager.example.internal:9093"
        );
        let data = baton_core::event::data_value(first);
        assert_eq!(data["labels"]["instance"], "checkout-0:8080");
        assert_eq!(data["group"]["groupLabels"]["alertname"], "HighErrorRate");
        assert_eq!(data["group"]["receiver"], "orchestrator-webhook");
        // The same notification again is the same events.
        let again = super::events(&fixture("01-firing-initial.body.json")).unwrap();
        assert_eq!(first.id(), again[0].id());
        assert_ne!(events[0].id(), events[1].id());
    }

    #[test]
    fn resolved_alerts_are_a_distinct_type_with_a_distinct_id() {
        let firing = events(&fixture("01-firing-initial.body.json")).unwrap();
        let resolved = events(&fixture("03-resolved-all.body.json")).unwrap();
        assert!(resolved.iter().all(|e| e.ty() == RESOLVED));
        assert_eq!(resolved[0].subject(), firing[0].subject());
        assert_ne!(resolved[0].id(), firing[0].id());
    }

    #[test]
    fn bad_notifications_say_what_is_wrong() {
        let message = |body: &str| events(body.as_bytes()).unwrap_err().message;
        assert!(message("[]").contains("not a JSON object"));
        assert!(message(r#"{"version": "3", "alerts": []}"#).contains("version \"4\""));
        assert!(message(r#"{"version": "4"}"#).contains("`alerts`"));
        assert!(
            message(r#"{"version": "4", "alerts": [{"status": "firing", "startsAt": "x"}]}"#)
                .contains("alerts[0].fingerprint")
        );
        assert!(message(r#"{"version": "4", "alerts": [{"status": "pending", "fingerprint": "f", "startsAt": "x"}]}"#)
            .contains("\"pending\""));
        assert!(
            events(br#"{"version": "4", "alerts": []}"#)
                .unwrap()
                .is_empty()
        );
    }

    /// An `externalURL` with a control character is kept, percent-encoded as a URI carries it:
    /// stored as it was, the trigger consumer could not decode it.
    #[test]
    fn a_control_character_in_the_external_url_is_percent_encoded() {
        let body = br#"{"version":"4","externalURL":"http://am\u007f:9093","alerts":[{"fingerprint":"ab","status":"firing","startsAt":"2026-01-01T00:00:00Z"}]}"#;
        let events = events(body).unwrap();
        assert_eq!(events[0].source().as_str(), "http://am%7F:9093");
        let limits = crate::admit::Limits {
            max_event_bytes: 1 << 20,
            max_payload: 1 << 20,
        };
        crate::admit::check(&events[0], &limits).unwrap();
    }

    /// Found by fuzzing: a fingerprint with a line break made an event id that panicked
    /// `binding::encode` (a NATS header cannot hold one) when the gateway stored the event.
    #[test]
    fn a_fingerprint_with_a_line_break_is_refused() {
        let body = br#"{"version":"4","alerts":[{"fingerprint":"a\nb","status":"firing","startsAt":"x"}]}"#;
        let refused = events(body).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert!(
            refused
                .message
                .contains("alerts[0].fingerprint contains a control character")
        );
    }
}
