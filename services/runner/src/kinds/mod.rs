//! Built-in step kinds.
//!
//! - [`echo`]: outputs its input (for trying workflows out);
//! - [`nats`]: a request to a NATS service;
//! - [`http()`] and [`cloudevent`]: an HTTP request, or a CloudEvent pushed over HTTP (module [`mod@http`]);
//! - [`exec()`]: a program or shell script on the runner's machine (module [`mod@exec`]);
//! - [`emit()`]: a CloudEvent published on Baton's bus, where it can start other workflows.
//!
//! Every kind reads its input (the step's evaluated `with`) the same way: unknown keys and values of
//! the wrong type are permanent errors with the code `bad-input`, naming the field and saying what
//! to write, so a typo fails the step at once instead of doing something else than meant.

pub mod emit;
pub mod exec;
pub mod http;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton_core::event::StepError;
use serde_json::{Map, Value};

use crate::{Handler, StepContext};

pub use emit::emit;
pub use exec::exec;
pub use http::{cloudevent, http};

/// The kind of [`emit()`], whose input the runner never resolves secrets into.
pub const EMIT: &str = "emit";

/// Every built-in kind, by name. `nats` sends its requests over `client`; `http` and `cloudevent`
/// share one pool of HTTP connections.
pub fn builtin(client: async_nats::Client) -> HashMap<String, Handler> {
    let clients = Arc::new(http::Clients::default());
    HashMap::from([
        ("echo".to_owned(), echo()),
        (EMIT.to_owned(), emit(client.clone())),
        ("nats".to_owned(), nats(client)),
        ("http".to_owned(), http::handler(clients.clone(), false)),
        ("cloudevent".to_owned(), http::handler(clients, true)),
        ("exec".to_owned(), exec()),
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

/// A permanent error about the step's input: `with.<field>` and what to write instead.
pub(crate) fn bad_input(field: &str, problem: impl std::fmt::Display, fix: &str) -> StepError {
    StepError {
        message: format!("`with.{field}` {problem}: {fix}"),
        retryable: false,
        code: Some("bad-input".into()),
    }
}

/// The step's input as a mapping, with no keys but `known`.
pub(crate) fn input_object<'a>(
    input: &'a Value,
    kind: &str,
    known: &[&str],
) -> Result<&'a Map<String, Value>, StepError> {
    let Some(object) = input.as_object() else {
        return Err(StepError {
            message: format!(
                "the input (`with`) of a `{kind}` step must be a mapping, not {}",
                json_type(input)
            ),
            retryable: false,
            code: Some("bad-input".into()),
        });
    };
    if let Some(unknown) = object.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(StepError {
            message: format!(
                "`with.{unknown}` is not an input of `{kind}`: its inputs are {}",
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            retryable: false,
            code: Some("bad-input".into()),
        });
    }
    Ok(object)
}

/// A field that is absent or null counts as not given.
pub(crate) fn given<'a>(object: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    object.get(field).filter(|v| !v.is_null())
}

/// An optional string field.
pub(crate) fn string_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    fix: &str,
) -> Result<Option<&'a str>, StepError> {
    match given(object, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad_input(
            field,
            format!("must be a string, not {}", json_type(other)),
            fix,
        )),
    }
}

/// An optional duration field (`500ms`, `30s`, `5m`, `1h30m` ...), `default` when absent.
pub(crate) fn duration_field(
    object: &Map<String, Value>,
    field: &str,
    default: Duration,
) -> Result<Duration, StepError> {
    const FIX: &str = "write a duration such as `500ms`, `30s`, `5m`, `2h` or `1h30m`";
    match given(object, field) {
        None => Ok(default),
        Some(Value::String(s)) => match parse_duration(s) {
            Some(d) if !d.is_zero() => Ok(d),
            Some(_) => Err(bad_input(field, "is zero", FIX)),
            None => Err(bad_input(field, format!("is `{s}`, not a duration"), FIX)),
        },
        Some(other) => Err(bad_input(
            field,
            format!("must be a duration string, not {}", json_type(other)),
            FIX,
        )),
    }
}

/// A scalar as text (strings as they are, numbers and booleans written out), for header values,
/// query parameters, arguments and environment variables.
pub(crate) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `null`, `a boolean`, `a number` ... for messages.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Durations are written as in workflow files: `500ms`, `30s`, `5m`, `1h30m`.
pub(crate) use baton_workflow::parse_duration;

/// The last `max_lines` lines of `text`, at most `max_bytes` long (cut at a character boundary).
pub(crate) fn tail_lines(text: &str, max_lines: usize, max_bytes: usize) -> &str {
    let text = text.trim_end();
    let mut start = 0;
    for (seen, (i, _)) in text.rmatch_indices('\n').enumerate() {
        if seen + 1 == max_lines {
            start = i + 1;
            break;
        }
    }
    let mut tail = &text[start..];
    if tail.len() > max_bytes {
        let mut cut = tail.len() - max_bytes;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = &tail[cut..];
    }
    tail
}

/// A duration as workflow files write it: `500ms`, `30s`, `10m`, `2h`.
pub(crate) fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// The first `max_bytes` of `text`, cut at a character boundary.
pub(crate) fn head(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut cut = max_bytes;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("3x"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(show_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show_duration(Duration::from_secs(30)), "30s");
        assert_eq!(show_duration(Duration::from_secs(600)), "10m");
        assert_eq!(show_duration(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn tails_and_heads() {
        assert_eq!(tail_lines("a\nb\nc\n", 2, 100), "b\nc");
        assert_eq!(tail_lines("a\nb\nc", 5, 100), "a\nb\nc");
        assert_eq!(tail_lines("abcdef", 5, 3), "def");
        assert_eq!(tail_lines("aé", 5, 1), "");
        assert_eq!(head("héllo", 2), "h");
        assert_eq!(head("hello", 10), "hello");
    }

    #[test]
    fn unknown_inputs_are_named() {
        let input = serde_json::json!({"url": "x", "heders": {}});
        let err = input_object(&input, "http", &["url", "headers"]).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("bad-input"));
        assert!(err.message.contains("`with.heders`"), "{}", err.message);
        assert!(err.message.contains("`headers`"), "{}", err.message);
    }
}
