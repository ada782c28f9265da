//! Dead letters: input that Baton rejected, kept with its original bytes, headers and the reason.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use crate::subjects;

/// Header carrying why a message was rejected.
pub const REASON: &str = "Baton-Dlq-Reason";
/// Header carrying the subject the message was first published on.
pub const ORIGINAL_SUBJECT: &str = "Baton-Dlq-Subject";

/// Publishes a rejected message to `baton.dlq.<origin>` and waits until it is stored, so that the
/// caller may then ack the original.
pub async fn publish(
    js: &jetstream::Context,
    origin: &str,
    original_subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    reason: &str,
) -> Result<(), String> {
    let mut h = HeaderMap::new();
    if let Some(original) = headers {
        for (name, values) in original.iter() {
            // The original id must not make JetStream drop the dead letter as a duplicate.
            if AsRef::<str>::as_ref(name).eq_ignore_ascii_case("Nats-Msg-Id") {
                continue;
            }
            for v in values {
                h.append(name.clone(), v.clone());
            }
        }
    }
    h.insert(REASON, crate::binding::percent_encode(reason).as_str());
    h.insert(ORIGINAL_SUBJECT, original_subject);
    tracing::warn!(%origin, subject = %original_subject, %reason, "rejected a message to the dead-letter stream");
    js.publish_with_headers(format!("{}.{origin}", subjects::DLQ), h, payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
