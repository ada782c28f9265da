//! Built-in step kinds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use baton_core::event::StepError;
use serde_json::Value;

use crate::Handler;

/// Every built-in kind, by name.
pub fn builtin() -> HashMap<String, Handler> {
    HashMap::from([("echo".to_owned(), echo())])
}

/// `echo`: its outputs are its input, so `with` (templated with jq) does the work. Meant for trying
/// workflows out: `delay_ms` waits that long first, and `fail: "message"` makes the step fail
/// (permanently, unless `retryable: true`).
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
                return Err(StepError {
                    message: message.to_owned(),
                    retryable,
                });
            }
            Ok(input)
        })
    })
}
