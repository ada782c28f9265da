//! The gateway's HTTP server in process, on a real socket, storing in a real nats-server: the
//! answers the docs promise (docs/triggers.md), that nothing is answered `2xx` that cannot be kept,
//! and that one client cannot hold up another.

use std::time::{Duration, Instant};

use baton_core::shutdown::CancellationToken;
use baton_core::streams::{self, Topology};
use baton_core::{Bus, binding};
use baton_gateway::HttpOptions;
use baton_gateway::http::{MAX_BATCH, Server};
use baton_tests::NatsServer;
use cloudevents::AttributesReader;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const TOKEN: &str = "a-test-token";
const SECRET: &str = "a test secret";
const MAX_BYTES: usize = 1024 * 1024;

struct Gateway {
    base: String,
    bus: Bus,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _nats: NatsServer,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Gateway {
    async fn start() -> Gateway {
        let nats = NatsServer::start();
        let bus = baton_core::connect(&nats.url(), "gateway-test", &Topology::default())
            .await
            .expect("connect");
        let server = Server::bind(HttpOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: Some(TOKEN.into()),
            github_secret: Some(SECRET.into()),
            max_bytes: MAX_BYTES,
            allowed_origins: Vec::new(),
        })
        .await
        .expect("bind");
        let base = format!("http://{}", server.local_addr());
        let shutdown = CancellationToken::new();
        tokio::spawn(server.serve(bus.clone(), shutdown.clone()));
        Gateway {
            base,
            bus,
            http: reqwest::Client::new(),
            shutdown,
            _nats: nats,
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }

    fn events(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        self.post("/events")
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
    }

    /// The messages of `BATON_EVENTS`, decoded as the trigger consumer decodes them.
    async fn stored(&self) -> Vec<Result<cloudevents::Event, binding::Error>> {
        let stream = self.bus.js.get_stream(streams::EVENTS).await.unwrap();
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(binding::decode(Some(&m.headers), &m.payload));
            }
        }
        out
    }
}

/// Status, `Retry-After` and the `error` of an answer.
async fn answer(r: reqwest::RequestBuilder) -> (u16, Option<String>, String) {
    let r = tokio::time::timeout(Duration::from_secs(30), r.send())
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
    let error = body["error"].as_str().unwrap_or_default().to_owned();
    (status, retry, error)
}

fn event(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "ci/test", "type": "com.example.built", "data": {"ok": true}})
}

fn batch(prefix: &str, n: usize) -> String {
    Value::Array((0..n).map(|i| event(&format!("{prefix}-{i}"))).collect()).to_string()
}

fn signed(
    r: reqwest::RequestBuilder,
    event: &str,
    delivery: &str,
    body: &[u8],
) -> reqwest::RequestBuilder {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    r.header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", format!("sha256={hex}"))
        .body(body.to_vec())
}

#[tokio::test]
async fn status_codes_follow_the_http_binding_and_the_bearer_scheme_is_case_insensitive() {
    let g = Gateway::start().await;
    // Structured mode, a body that is not JSON: malformed, 400 (was 415).
    let (status, _, error) = answer(g.events(binding::http::STRUCTURED, "not json")).await;
    assert_eq!(status, 400, "{error}");
    // A batch with one bad event: 400, saying which (was 415).
    let bad = json!([event("b-1"), {"specversion": "1.0", "id": "b-2", "source": "s"}]);
    let (status, _, error) = answer(g.events(binding::http::BATCH, bad.to_string())).await;
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("event 1 of the batch"), "{error}");
    assert!(error.contains("`type`"), "{error}");
    let (status, _, error) = answer(g.events(binding::http::BATCH, "{}")).await;
    assert_eq!(status, 400, "{error}");
    // A media type that is no CloudEvents format and not binary mode: 415.
    let (status, _, error) = answer(g.events("text/plain", "hello")).await;
    assert_eq!(status, 415, "{error}");
    assert!(g.stored().await.is_empty(), "nothing refused is stored");
    // The bearer scheme in any case (RFC 7235); other schemes and wrong tokens are refused.
    for (i, scheme) in ["bearer", "BEARER", "Bearer"].into_iter().enumerate() {
        let r = g
            .post("/events")
            .header("authorization", format!("{scheme} {TOKEN}"))
            .header("content-type", binding::http::STRUCTURED)
            .body(event(&format!("a-{i}")).to_string());
        let (status, _, error) = answer(r).await;
        assert_eq!(status, 202, "{scheme}: {error}");
    }
    for authorization in [
        format!("Basic {TOKEN}"),
        "bearer wrong".into(),
        "bearer".into(),
    ] {
        let r = g
            .post("/events")
            .header("authorization", authorization.as_str())
            .header("content-type", binding::http::STRUCTURED)
            .body(event("a-x").to_string());
        let (status, _, _) = answer(r).await;
        assert_eq!(status, 401, "{authorization}");
    }
}

#[tokio::test]
async fn what_cannot_be_kept_is_refused_with_the_field_and_what_is_accepted_decodes() {
    let g = Gateway::start().await;
    // An attribute over JetStream's 64 KiB of headers: it can never be stored, so 413 naming it,
    // not 503 with Retry-After (which had the sender retry forever).
    let mut huge = event("h-1");
    huge["note"] = json!("x".repeat(70_000));
    let (status, retry, error) =
        answer(g.events(binding::http::STRUCTURED, huge.to_string())).await;
    assert_eq!((status, retry), (413, None), "{error}");
    assert!(
        error.starts_with("attribute `note` is 70000 bytes"),
        "{error}"
    );
    // An event that fits, whose run request (which embeds it) would not: 413 with both sizes.
    let mut big = event("h-2");
    big["data"] = json!("x".repeat(MAX_BYTES - 400));
    let (status, retry, error) = answer(g.events(binding::http::STRUCTURED, big.to_string())).await;
    assert_eq!((status, retry), (413, None), "{error}");
    assert!(
        error.contains("the run request that would embed the event is"),
        "{error}"
    );
    assert!(error.contains(&format!("{MAX_BYTES} bytes")), "{error}");
    // A batch with one such event: nothing of it is stored.
    let mixed = Value::Array(vec![event("h-3"), huge]).to_string();
    let (status, _, error) = answer(g.events(binding::http::BATCH, mixed)).await;
    assert_eq!(status, 413, "{error}");
    assert!(error.starts_with("event 1 of the batch: "), "{error}");
    assert!(g.stored().await.is_empty(), "nothing refused is stored");

    // Signed webhooks with control characters: source and subject kept percent-encoded (the
    // stored event decodes), type and id refused.
    let fixture = |name: &str| -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/github/payloads")
            .join(name);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let mut release = fixture("release__published.json");
    release["repository"]["url"] = json!("https://api.github.com/repos/a\u{7f}b");
    let body = serde_json::to_vec(&release).unwrap();
    let (status, _, error) =
        answer(signed(g.post("/webhooks/github"), "release", "d-1", &body)).await;
    assert_eq!(status, 202, "{error}");
    let mut push = fixture("push__payload.json");
    push["ref"] = json!("refs/heads/a\u{1}b");
    let body = serde_json::to_vec(&push).unwrap();
    let (status, _, error) = answer(signed(g.post("/webhooks/github"), "push", "d-2", &body)).await;
    assert_eq!(status, 202, "{error}");
    let mut action = fixture("release__published.json");
    action["action"] = json!("published\n");
    let body = serde_json::to_vec(&action).unwrap();
    let (status, _, error) =
        answer(signed(g.post("/webhooks/github"), "release", "d-3", &body)).await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error.starts_with("`action` of the `release` delivery"),
        "{error}"
    );
    let alert = r#"{"version":"4","externalURL":"http://am\u0001:9093","alerts":[{"fingerprint":"ab","status":"firing","startsAt":"2026-01-01T00:00:00Z"}]}"#;
    let r = g
        .post("/webhooks/alertmanager")
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(alert);
    let (status, _, error) = answer(r).await;
    assert_eq!(status, 202, "{error}");

    let stored = g.stored().await;
    assert_eq!(stored.len(), 3);
    let stored: Vec<_> = stored
        .into_iter()
        .map(|e| e.expect("every stored event decodes"))
        .collect();
    assert_eq!(
        stored[0].source().as_str(),
        "https://api.github.com/repos/a%7Fb"
    );
    assert_eq!(stored[1].subject(), Some("refs/heads/a%01b"));
    assert_eq!(stored[2].source().as_str(), "http://am%01:9093");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_limit_is_refused_and_big_batches_do_not_hold_up_other_clients() {
    let g = Gateway::start().await;
    // Over the limit: refused at once, nothing stored. (6,000 events used to take every
    // publish-ack slot of the gateway and never be answered.)
    for n in [MAX_BATCH + 1, 6_000] {
        let (status, _, error) = answer(g.events(binding::http::BATCH, batch("over", n))).await;
        assert_eq!(status, 413, "{error}");
        assert!(
            error.contains(&format!("holds {n} events")) && error.contains("at most 1000"),
            "{error}"
        );
    }
    assert!(g.stored().await.is_empty());

    // Eight clients send the largest batch at once (more events than the JetStream context has
    // publish-ack slots), and another one a single event: every one is answered, the single
    // event without waiting for the batches.
    let started = Instant::now();
    let batches: Vec<_> = (0..8)
        .map(|c| {
            let r = g.events(binding::http::BATCH, batch(&format!("c{c}"), MAX_BATCH));
            tokio::spawn(answer(r))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let single = answer(g.events(binding::http::STRUCTURED, event("single").to_string()));
    let (status, _, error) = tokio::time::timeout(Duration::from_secs(10), single)
        .await
        .expect("a single event is answered while big batches are stored");
    assert_eq!(status, 202, "{error}");
    let single_took = started.elapsed();
    for b in batches {
        let (status, _, error) = b.await.unwrap();
        assert_eq!(status, 202, "{error}");
    }
    let all_took = started.elapsed();
    let stored = g.bus.js.get_stream(streams::EVENTS).await.unwrap();
    let stored = stored.get_info().await.unwrap().state.messages;
    assert_eq!(stored, 8 * MAX_BATCH as u64 + 1);
    eprintln!("single event answered after {single_took:?}, all batches after {all_took:?}");
}
