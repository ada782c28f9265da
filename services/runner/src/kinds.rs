//! Built-in step kinds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton_core::event::StepError;
use serde_json::Value;

use crate::{Handler, StepContext};

/// Every built-in kind, by name. `nats` sends its requests over `client`.
pub fn builtin(client: async_nats::Client) -> HashMap<String, Handler> {
    HashMap::from([
        ("echo".to_owned(), echo()),
        ("nats".to_owned(), nats(client)),
    ])
}

/// `echo`: its outputs are its input, so `with` (templated with jq) does the work. Meant for trying
/// workflows out: `delay_ms` waits that long first, and `fail: "message"` makes the step fail
/// (permanently, unless `retryable: true`; `code` names the error for retry policies).
pub fn echo() -> Handler {
    Arc::new(|input: Value, ctx| {
        Box::pin(async move {
            if let Some(ms) = input.get("delay_ms").and_then(Value::as_u64) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = ctx.cancel.cancelled() => {}
                }
            }
            if let Some(message) = input.get("fail").and_then(Value::as_str) {
                let retryable = input
                    .get("retryable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let code = input.get("code").and_then(Value::as_str).map(str::to_owned);
                return Err(StepError {
                    message: message.to_owned(),
                    retryable,
                    code,
                });
            }
            Ok(input)
        })
    })
}

/// `nats`: a request to a NATS service (for example one built with the NATS micro framework).
/// `with: {subject, body, timeout_ms}`. The request carries the attempt in headers, the
/// idempotency key included, so the service can avoid repeating a side effect when Baton asks again
/// after a crash. The reply's JSON (or text) is the step's output; a reply with the micro framework's
/// `Nats-Service-Error` header fails the attempt (permanently for codes 400 to 499).
pub fn nats(client: async_nats::Client) -> Handler {
    Arc::new(move |input: Value, ctx: StepContext| {
        let client = client.clone();
        Box::pin(async move {
            let permanent = |message: String| StepError {
                message,
                retryable: false,
                code: Some("bad-input".into()),
            };
            let subject = match input.get("subject").and_then(Value::as_str) {
                Some(s) if !s.is_empty() && !s.contains(['*', '>', ' ']) => s.to_owned(),
                _ => {
                    return Err(permanent(
                        "`with.subject` must be the service's subject, without wildcards, e.g. `payments.charge`".into(),
                    ));
                }
            };
            let body = match input.get("body") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::String(s)) => s.clone().into_bytes(),
                Some(other) => other.to_string().into_bytes(),
            };
            let timeout = input
                .get("timeout_ms")
                .and_then(Value::as_u64)
                .map_or(Duration::from_secs(30), Duration::from_millis);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Baton-Idempotency-Key", ctx.idempotency_key.as_str());
            headers.insert("Baton-Run-Id", ctx.run_id.as_str());
            headers.insert("Baton-Step", ctx.step.as_str());
            headers.insert("Baton-Attempt", ctx.attempt.to_string().as_str());
            if ctx.compensation {
                headers.insert("Baton-Compensation", "true");
            }
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(body.into())
                .timeout(Some(timeout));
            let reply = match client.send_request(subject.clone(), request).await {
                Ok(reply) => reply,
                Err(e) => {
                    use async_nats::RequestErrorKind as K;
                    let (code, retryable) = match e.kind() {
                        K::TimedOut => ("timeout", true),
                        K::NoResponders => ("no-responders", true),
                        K::InvalidSubject => ("bad-input", false),
                        K::MaxPayloadExceeded => ("too-large", false),
                        _ => ("nats", true),
                    };
                    return Err(StepError {
                        message: format!("request to {subject} failed: {e}"),
                        retryable,
                        code: Some(code.into()),
                    });
                }
            };
            let header = |name: &str| {
                reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            if let Some(message) = header("Nats-Service-Error") {
                let code = header("Nats-Service-Error-Code").unwrap_or_else(|| "500".into());
                let retryable = !code.starts_with('4');
                return Err(StepError {
                    message: format!("{subject} replied with error {code}: {message}"),
                    retryable,
                    code: Some(format!("nats-{code}")),
                });
            }
            Ok(serde_json::from_slice(&reply.payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.payload).into())))
        })
    })
}
