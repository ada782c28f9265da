//! Every CloudEvents conformance event crosses a real nats-server and a real HTTP server (binary and
//! structured mode) with every attribute and its data preserved byte for byte.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use baton_core::binding::{self, Limits, http as ce_http};
use baton_tests::{NatsServer, workspace_root};
use chrono::SecondsFormat;
use cloudevents::event::AttributeValue;
use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Conformance {
    context_attributes: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    data: Option<String>,
}

/// The conformance events of `conformance/yaml/v1*`, built with the SDK's public API.
fn conformance_events() -> Vec<Event> {
    let dir = workspace_root().join("tests/fixtures/cloudevents/conformance/yaml");
    let mut events = Vec::new();
    for file in ["v1.yaml", "v1.0/v1_minimum.yaml"] {
        let docs: Vec<Conformance> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        for doc in docs {
            let a = &doc.context_attributes;
            let s = |k: &str| {
                a.get(k).map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
            };
            let mut b = EventBuilderV10::new()
                .id(s("id").unwrap())
                .source(s("source").unwrap())
                .ty(s("type").unwrap());
            if let Some(t) = s("time") {
                b = b.time(t.as_str());
            }
            if let Some(subject) = s("subject") {
                b = b.subject(subject);
            }
            for (k, v) in a
                .get("Extensions")
                .and_then(|e| e.as_object())
                .into_iter()
                .flatten()
            {
                b = b.extension(k, v.as_str().unwrap());
            }
            if let Some(data) = doc.data {
                b = b.data(
                    s("datacontenttype").unwrap_or_else(|| "application/json".into()),
                    data.into_bytes(),
                );
            }
            events.push(b.build().unwrap());
        }
    }
    events
}

fn fingerprint(e: &Event) -> (BTreeMap<String, String>, Vec<u8>) {
    let attrs = e
        .iter()
        .map(|(n, v)| {
            let v = match v {
                AttributeValue::Time(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                other => other.to_string(),
            };
            (n.to_owned(), v)
        })
        .collect();
    let data = match e.data() {
        Some(Data::Binary(b)) => b.clone(),
        Some(Data::String(s)) => s.clone().into_bytes(),
        Some(Data::Json(v)) => serde_json::to_vec(v).unwrap(),
        None => Vec::new(),
    };
    (attrs, data)
}

#[tokio::test]
async fn conformance_events_cross_a_real_nats_server() {
    let server = NatsServer::start();
    let bus = crate::bus(&server.url()).await;
    let events = conformance_events();
    assert!(
        events.len() >= 8
            && events
                .iter()
                .any(|e| fingerprint(e).1.starts_with("Hello, 🌎".as_bytes()))
    );

    // Through the server, headers and payload as another client receives them.
    let mut sub = bus.client.subscribe("conformance.>").await.unwrap();
    for (i, e) in events.iter().enumerate() {
        let (headers, body) = binding::encode(e);
        bus.client
            .publish_with_headers(format!("conformance.{i}"), headers, body)
            .await
            .unwrap();
    }
    for (i, sent) in events.iter().enumerate() {
        let m = sub.next().await.unwrap();
        let got = binding::decode(m.headers.as_ref(), &m.payload).unwrap();
        assert_eq!(
            fingerprint(&got),
            fingerprint(sent),
            "conformance event {i} over NATS"
        );
    }

    // Into JetStream: `Nats-Msg-Id` is the event id, so the second event with the id
    // 4321-4321-4321 (the same event in another mode) is dropped as a duplicate.
    let mut duplicates = 0;
    for e in &events {
        let (headers, body) = binding::encode(e);
        let ack = bus
            .js
            .publish_with_headers("baton.events.conformance", headers, body)
            .await
            .unwrap()
            .await
            .unwrap();
        duplicates += usize::from(ack.duplicate);
    }
    let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id()).collect();
    assert_eq!(duplicates, events.len() - ids.len());
    assert!(duplicates >= 1);
}

/// Echoes the CloudEvent it receives, re-encoded in the mode named by the path.
async fn echo(
    axum::extract::Path(mode): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    match ce_http::decode(&Limits::default(), &headers, &body) {
        Ok(mut events) => {
            let event = events.remove(0);
            let (h, b) = if mode == "binary" {
                ce_http::encode_binary(&event)
            } else {
                ce_http::encode_structured(&event)
            };
            (StatusCode::OK, h, b)
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            HeaderMap::new(),
            Bytes::from(e.to_string()),
        ),
    }
}

/// One HTTP/1.1 exchange over a real socket: the request's headers and body, the response's.
async fn exchange(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (HeaderMap, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (n, v) in headers {
        request.extend_from_slice(n.as_str().as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(v.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    stream.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(response[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    let body = response[split + 4..].to_vec();
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    let mut out = HeaderMap::new();
    for line in lines {
        let (n, v) = line.split_once(": ").unwrap();
        out.append(
            axum::http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    (out, body)
}

#[tokio::test]
async fn conformance_events_cross_a_real_http_server_in_binary_and_structured_mode() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/echo/{mode}", axum::routing::post(echo));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let limits = Limits::default();
    for (i, sent) in conformance_events().iter().enumerate() {
        for (send, reply) in [
            ("binary", "structured"),
            ("structured", "binary"),
            ("binary", "binary"),
            ("structured", "structured"),
        ] {
            let (h, b) = if send == "binary" {
                ce_http::encode_binary(sent)
            } else {
                ce_http::encode_structured(sent)
            };
            let (rh, rb) = exchange(addr, &format!("/echo/{reply}"), &h, &b).await;
            let got = ce_http::decode(&limits, &rh, &rb).unwrap().remove(0);
            assert_eq!(
                fingerprint(&got),
                fingerprint(sent),
                "conformance event {i}: sent {send}, answered {reply}"
            );
        }
    }
}
