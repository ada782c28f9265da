//! A step service for the tests: it answers `nats` step requests on `effects.<op>` and applies each
//! side effect once per idempotency key, as a well-behaved service does. It records every call, so
//! tests can tell a side effect applied twice (a new key for the same work) from a request that was
//! only repeated (the same key, after a crash).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    /// Every call, in arrival order: (op, idempotency key).
    calls: Vec<(String, String)>,
    /// Applied side effects by key, in order, with the reply they gave.
    applied: Vec<(String, String)>,
    replies: HashMap<String, Value>,
    /// Ops that reply with a service error.
    failing: HashSet<String>,
}

#[derive(Clone)]
pub struct Effects {
    state: Arc<Mutex<State>>,
}

impl Effects {
    /// Serves `effects.>` on the NATS server(s) at `url` until the test ends. Each request waits
    /// `delay_ms` (from its body) before it applies the effect, so tests can kill a runner mid-step.
    pub async fn start(url: &str) -> Effects {
        let urls: Vec<&str> = url.split(',').collect();
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(urls.as_slice())
            .await
            .expect("connect the effects service");
        let mut requests = client
            .queue_subscribe("effects.>", "effects".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let effects = Effects {
            state: Arc::default(),
        };
        let state = effects.state.clone();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let (client, state) = (client.clone(), state.clone());
                tokio::spawn(async move { handle(&client, &state, request).await });
            }
        });
        effects
    }

    /// Makes `op` fail (or succeed again).
    pub fn set_failing(&self, op: &str, failing: bool) {
        let mut s = self.state.lock().unwrap();
        if failing {
            s.failing.insert(op.to_owned());
        } else {
            s.failing.remove(op);
        }
    }

    /// Side effects applied: (op, key), in order.
    pub fn applied(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().applied.clone()
    }

    /// Every call, repeats included.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().calls.clone()
    }
}

async fn handle(client: &async_nats::Client, state: &Mutex<State>, request: async_nats::Message) {
    let Some(reply_to) = request.reply.clone() else {
        return;
    };
    let op = request.subject.trim_start_matches("effects.").to_owned();
    let header = |name: &str| {
        request
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let key = header("Baton-Idempotency-Key");
    let body: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
    let previous = {
        let mut s = state.lock().unwrap();
        s.calls.push((op.clone(), key.clone()));
        s.replies.get(&key).cloned()
    };
    if let Some(reply) = previous {
        // Asked again with the same key: the same answer, no second side effect.
        let _ = client.publish(reply_to, reply.to_string().into()).await;
        return;
    }
    if let Some(ms) = body.get("delay_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let reply = {
        let mut s = state.lock().unwrap();
        if s.failing.contains(&op) {
            None
        } else if let Some(reply) = s.replies.get(&key) {
            // A concurrent call with the same key applied it meanwhile.
            Some(reply.clone())
        } else {
            let reply = json!({"op": op, "key": key, "n": s.applied.len()});
            s.applied.push((op.clone(), key.clone()));
            s.replies.insert(key.clone(), reply.clone());
            Some(reply)
        }
    };
    match reply {
        Some(reply) => {
            let _ = client.publish(reply_to, reply.to_string().into()).await;
        }
        None => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Service-Error", format!("{op} is failing").as_str());
            headers.insert("Nats-Service-Error-Code", "503");
            let _ = client
                .publish_with_headers(reply_to, headers, "".into())
                .await;
        }
    }
}
