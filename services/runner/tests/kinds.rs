//! The `http`, `cloudevent` and `exec` kinds against real peers: an HTTP server (and a TLS one) on
//! 127.0.0.1 started by each test, and real processes.
//!
//! Time bounds are generous (a slow 2-core machine): each one only has to tell "stopped early"
//! from "waited for the 30 s the peer would have taken".

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use baton_core::event::StepError;
use baton_core::shutdown::CancellationToken;
use baton_runner::StepContext;
use baton_runner::kinds;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ctx(step: &str) -> StepContext {
    StepContext {
        run_id: "01JRUNTEST".into(),
        step: step.into(),
        item: None,
        attempt: 2,
        compensation: false,
        idempotency_key: format!("01JRUNTEST/{step}"),
        delivered: 1,
        cancel: CancellationToken::new(),
    }
}

async fn call(
    handler: &baton_runner::Handler,
    input: Value,
    ctx: StepContext,
) -> Result<Value, StepError> {
    tokio::time::timeout(Duration::from_secs(120), handler(input, ctx))
        .await
        .expect("the handler returned within 2 minutes")
}

fn code(e: &StepError) -> &str {
    e.code.as_deref().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// An HTTP peer

#[derive(Default)]
struct Peer {
    flaky_calls: AtomicUsize,
}

async fn serve() -> SocketAddr {
    let app = Router::new()
        .route("/flaky", get(flaky))
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "no build with that id, sorry") }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route("/text", get(|| async { "plain words" }))
        .route(
            "/json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"image": "registry.example.com/app:1.2.3", "n": 3}"#,
                )
            }),
        )
        .route(
            "/big",
            get(|| async { "x".repeat(kinds::http::MAX_BODY + 100_000) }),
        )
        .route("/echo", any(echo))
        .with_state(Arc::new(Peer::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// 503 the first time, 200 after.
async fn flaky(State(peer): State<Arc<Peer>>) -> axum::response::Response {
    if peer.flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "overloaded, try later",
        )
            .into_response()
    } else {
        axum::Json(json!({"ok": true})).into_response()
    }
}

/// What the request was: method, path, query, headers (lower-case names) and body as text.
async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> axum::Json<Value> {
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), json!(v.to_str().unwrap_or("?"))))
        .collect();
    axum::Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
}

// ---------------------------------------------------------------------------------------------
// http

#[tokio::test]
async fn http_503_is_retryable_then_200_succeeds() {
    let addr = serve().await;
    let http = kinds::http();
    let input = json!({"url": format!("http://{addr}/flaky")});
    let err = call(&http, input.clone(), ctx("build")).await.unwrap_err();
    assert_eq!(code(&err), "http-503");
    assert!(err.retryable);
    assert!(
        err.message.contains(&format!("GET http://{addr}/flaky"))
            && err.message.contains("503")
            && err.message.contains("Retry-After: 1")
            && err.message.contains("overloaded, try later"),
        "{}",
        err.message
    );
    let out = call(&http, input, ctx("build")).await.unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], json!({"ok": true}));
    assert_eq!(out["truncated"], false);
    assert_eq!(out["headers"]["content-type"], "application/json");
}

#[tokio::test]
async fn http_404_is_permanent_and_the_message_hides_query_and_credentials() {
    let addr = serve().await;
    let out = call(
        &kinds::http(),
        json!({"url": format!("http://deployer:s3cr3t@{addr}/missing?token=t0ken")}),
        ctx("build"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&out), "http-404");
    assert!(!out.retryable);
    assert!(
        out.message
            .starts_with(&format!("GET http://{addr}/missing answered 404 Not Found")),
        "{}",
        out.message
    );
    assert!(
        out.message.contains("no build with that id"),
        "{}",
        out.message
    );
    assert!(
        !out.message.contains("s3cr3t") && !out.message.contains("t0ken"),
        "{}",
        out.message
    );
}

#[tokio::test]
async fn http_expect_accepts_listed_statuses_only() {
    let addr = serve().await;
    let http = kinds::http();
    let out = call(
        &http,
        json!({"url": format!("http://{addr}/missing"), "expect": [404]}),
        ctx("probe"),
    )
    .await
    .unwrap();
    assert_eq!(out["status"], 404);
    assert_eq!(out["body"], "no build with that id, sorry");
    let err = call(
        &http,
        json!({"url": format!("http://{addr}/text"), "expect": [201, 202]}),
        ctx("probe"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "http-200");
    assert!(!err.retryable);
    assert!(
        err.message.contains("expected 201 or 202"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn http_timeout_is_retryable_and_does_not_wait_for_the_peer() {
    let addr = serve().await;
    let started = Instant::now();
    let err = call(
        &kinds::http(),
        json!({"url": format!("http://{addr}/slow"), "timeout": "500ms"}),
        ctx("build"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "timeout", "{}", err.message);
    assert!(err.retryable);
    assert!(
        err.message.contains("timed out after 500ms"),
        "{}",
        err.message
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn http_cancel_abandons_the_request() {
    let addr = serve().await;
    let c = ctx("build");
    let cancel = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let started = Instant::now();
    let err = call(
        &kinds::http(),
        json!({"url": format!("http://{addr}/slow")}),
        c,
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "cancelled", "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn http_connection_refused_is_retryable() {
    // A port that was just free: nothing listens on it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = call(
        &kinds::http(),
        json!({"url": format!("http://{addr}/x")}),
        ctx("build"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "connect", "{}", err.message);
    assert!(err.retryable);
    assert!(
        err.message
            .starts_with(&format!("GET http://{addr}/x: cannot connect")),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn http_sends_baton_headers_query_and_json_body() {
    let addr = serve().await;
    let mut c = ctx("refund");
    c.compensation = true;
    c.idempotency_key = "01JRUNTEST/refund/compensate".into();
    let out = call(
        &kinds::http(),
        json!({
            "method": "post",
            "url": format!("http://{addr}/echo?fixed=1"),
            "query": {"tag": "v1.2 rc", "n": [1, 2]},
            "headers": {"X-Request-Source": "baton", "X-Count": 3},
            "body": {"charge": "ch_1", "amount": 250},
        }),
        c,
    )
    .await
    .unwrap();
    assert_eq!(out["status"], 200);
    let seen = &out["body"];
    assert_eq!(seen["method"], "POST");
    // Parameters come in key order (mappings are sorted).
    assert_eq!(seen["query"], "fixed=1&n=1&n=2&tag=v1.2+rc");
    let h = &seen["headers"];
    assert_eq!(h["baton-idempotency-key"], "01JRUNTEST/refund/compensate");
    assert_eq!(h["baton-run-id"], "01JRUNTEST");
    assert_eq!(h["baton-step"], "refund");
    assert_eq!(h["baton-attempt"], "2");
    assert_eq!(h["baton-compensation"], "true");
    assert_eq!(h["x-request-source"], "baton");
    assert_eq!(h["x-count"], "3");
    assert_eq!(h["content-type"], "application/json");
    let body: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"charge": "ch_1", "amount": 250}));
}

#[tokio::test]
async fn http_text_body_and_no_compensation_header() {
    let addr = serve().await;
    let out = call(
        &kinds::http(),
        json!({"method": "PUT", "url": format!("http://{addr}/echo"), "body": "hello"}),
        ctx("build"),
    )
    .await
    .unwrap();
    let seen = &out["body"];
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["body"], "hello");
    assert_eq!(seen["headers"]["content-type"], "text/plain; charset=utf-8");
    assert!(seen["headers"].get("baton-compensation").is_none());
}

#[tokio::test]
async fn http_json_and_text_responses() {
    let addr = serve().await;
    let http = kinds::http();
    let out = call(
        &http,
        json!({"url": format!("http://{addr}/json")}),
        ctx("build"),
    )
    .await
    .unwrap();
    assert_eq!(out["body"]["image"], "registry.example.com/app:1.2.3");
    assert_eq!(out["body"]["n"], 3);
    let out = call(
        &http,
        json!({"url": format!("http://{addr}/text")}),
        ctx("build"),
    )
    .await
    .unwrap();
    assert_eq!(out["body"], "plain words");
    assert!(
        out["headers"]["content-type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain")
    );
}

#[tokio::test]
async fn http_large_bodies_are_cut() {
    let addr = serve().await;
    let out = call(
        &kinds::http(),
        json!({"url": format!("http://{addr}/big")}),
        ctx("build"),
    )
    .await
    .unwrap();
    assert_eq!(out["truncated"], true);
    assert_eq!(out["body"].as_str().unwrap().len(), kinds::http::MAX_BODY);
}

#[tokio::test]
async fn http_bad_input_is_permanent() {
    for (input, field) in [
        (json!({"method": "GET"}), "`with.url`"),
        (
            json!({"url": "http://127.0.0.1:1/", "timeout": "fast"}),
            "`with.timeout`",
        ),
        (
            json!({"url": "http://127.0.0.1:1/", "method": "GET /"}),
            "`with.method`",
        ),
        (
            json!({"url": "http://127.0.0.1:1/", "tls": {"ca_file": "/nonexistent/ca.pem"}}),
            "`with.tls.ca_file`",
        ),
    ] {
        let err = call(&kinds::http(), input, ctx("build")).await.unwrap_err();
        assert_eq!(code(&err), "bad-input", "{}", err.message);
        assert!(!err.retryable);
        assert!(err.message.contains(field), "{}", err.message);
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

const CA: &[u8] = include_bytes!("fixtures/tls/ca.pem");
const SERVER_CERT: &[u8] = include_bytes!("fixtures/tls/server.pem");
const SERVER_KEY: &[u8] = include_bytes!("fixtures/tls/server.key");

/// An HTTPS peer whose certificate (for 127.0.0.1) is signed by the test CA: answers every request
/// with 200 `secure`.
async fn serve_tls() -> SocketAddr {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(SERVER_CERT)
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(SERVER_KEY).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecure")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_checks_certificates_unless_told_otherwise() {
    let addr = serve_tls().await;
    let url = format!("https://{addr}/");
    let http = kinds::http();

    // The test CA is not trusted by default.
    let err = call(&http, json!({"url": url}), ctx("tls"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "connect", "{}", err.message);
    assert!(err.retryable);
    assert!(
        err.message.to_lowercase().contains("certificate"),
        "{}",
        err.message
    );

    // Trusted through `ca_file`.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, CA).unwrap();
    let out = call(
        &http,
        json!({"url": url, "tls": {"ca_file": ca_file.to_str().unwrap()}}),
        ctx("tls"),
    )
    .await
    .unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], "secure");

    // Not checked at all.
    let out = call(
        &http,
        json!({"url": url, "tls": {"insecure_skip_verify": true}}),
        ctx("tls"),
    )
    .await
    .unwrap();
    assert_eq!(out["body"], "secure");

    // A CA file that holds no certificate.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = call(
        &http,
        json!({"url": url, "tls": {"ca_file": junk.to_str().unwrap()}}),
        ctx("tls"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "bad-input", "{}", err.message);
    assert!(
        err.message.contains("`with.tls.ca_file`"),
        "{}",
        err.message
    );
}

// ---------------------------------------------------------------------------------------------
// cloudevent

#[tokio::test]
async fn cloudevent_is_pushed_in_binary_mode() {
    let addr = serve().await;
    let out = call(
        &kinds::cloudevent(),
        json!({
            "url": format!("http://{addr}/echo"),
            "headers": {"Authorization": "Bearer abc"},
            "event": {
                "type": "com.example.release.promoted",
                "source": "/ci/releases",
                "subject": "app/v1.2.3",
                "data": {"tag": "v1.2.3", "note": "ünïcode"},
                "extensions": {"team": "platform", "priority": 2},
            },
        }),
        ctx("announce"),
    )
    .await
    .unwrap();
    assert_eq!(out["status"], 200);
    let seen = &out["body"];
    assert_eq!(seen["method"], "POST");
    let h = &seen["headers"];
    assert_eq!(h["ce-specversion"], "1.0");
    assert_eq!(h["ce-id"], "01JRUNTEST/announce");
    assert_eq!(h["ce-type"], "com.example.release.promoted");
    assert_eq!(h["ce-source"], "/ci/releases");
    assert_eq!(h["ce-subject"], "app/v1.2.3");
    assert_eq!(h["ce-team"], "platform");
    assert_eq!(h["ce-priority"], "2");
    assert!(
        h["ce-time"].as_str().is_some_and(|t| t.contains('T')),
        "{h}"
    );
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["authorization"], "Bearer abc");
    assert_eq!(h["baton-idempotency-key"], "01JRUNTEST/announce");
    assert_eq!(h["baton-attempt"], "2");
    let body: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"tag": "v1.2.3", "note": "ünïcode"}));
}

#[tokio::test]
async fn cloudevent_shorthand_and_its_defaults() {
    // As in docs/examples/release-pipeline.yaml: `type` and `data` directly in `with`.
    let addr = serve().await;
    let push = kinds::cloudevent();
    let out = call(
        &push,
        json!({
            "url": format!("http://{addr}/echo"),
            "type": "com.example.note",
            "data": "just text",
        }),
        ctx("note"),
    )
    .await
    .unwrap();
    let h = &out["body"]["headers"];
    assert_eq!(h["ce-type"], "com.example.note");
    assert_eq!(h["ce-source"], kinds::http::DEFAULT_SOURCE);
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(out["body"]["body"], "just text");

    for (input, field) in [
        (json!({"url": format!("http://{addr}/echo")}), "`with.type`"),
        (
            json!({"url": format!("http://{addr}/echo"), "event": {"data": 1}}),
            "`with.event.type`",
        ),
        (
            json!({"url": format!("http://{addr}/echo"), "event": {"type": "t", "id": "x"}}),
            "`with.event.id`",
        ),
        (
            json!({"url": format!("http://{addr}/echo"), "event": {"type": "t"}, "type": "u"}),
            "`with.event`",
        ),
        (
            json!({"url": format!("http://{addr}/echo"), "event": {"type": "t", "extensions": {"Bad-Name": "x"}}}),
            "`with.event.extensions.Bad-Name`",
        ),
    ] {
        let err = call(&push, input, ctx("note")).await.unwrap_err();
        assert_eq!(code(&err), "bad-input", "{}", err.message);
        assert!(err.message.contains(field), "{}", err.message);
    }
}

#[tokio::test]
async fn cloudevent_failures_are_classified_like_http() {
    let addr = serve().await;
    let err = call(
        &kinds::cloudevent(),
        json!({"url": format!("http://{addr}/missing"), "event": {"type": "t"}}),
        ctx("note"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "http-405", "{}", err.message);
    assert!(!err.retryable);
    assert!(
        err.message
            .starts_with(&format!("POST http://{addr}/missing answered 405")),
        "{}",
        err.message
    );
}

// ---------------------------------------------------------------------------------------------
// exec

/// Whether a process runs (a zombie does not: where PID 1 does not reap orphans, they linger).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
    }
}

/// Waits up to 10 s for the pid in `file` to stop running; its last state.
async fn stops_running(file: &std::path::Path) -> bool {
    let pid: u32 = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{} was not written: {e}", file.display()))
        .trim()
        .parse()
        .unwrap();
    for _ in 0..100 {
        if !running(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn exec_success_with_json_stdout() {
    let out = call(
        &kinds::exec(),
        json!({"command": ["echo", r#"{"version": "1.2.3", "ok": true}"#]}),
        ctx("version"),
    )
    .await
    .unwrap();
    assert_eq!(out["exit_code"], 0);
    assert_eq!(out["stdout"], "{\"version\": \"1.2.3\", \"ok\": true}\n");
    assert_eq!(out["json"], json!({"version": "1.2.3", "ok": true}));
    assert_eq!(out["stderr"], "");
    assert_eq!(out["stdout_truncated"], false);
    assert_eq!(out["stderr_truncated"], false);
    assert!(out["duration_ms"].is_u64());

    let out = call(
        &kinds::exec(),
        json!({"command": ["echo", "not json"]}),
        ctx("version"),
    )
    .await
    .unwrap();
    assert!(out.get("json").is_none(), "{out}");
}

#[tokio::test]
async fn exec_nonzero_exit_carries_the_stderr_tail() {
    let exec = kinds::exec();
    let err = call(
        &exec,
        json!({"shell": "echo progress; for i in $(seq 1 50); do echo problem$i >&2; done; exit 3"}),
        ctx("deploy"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "exit-3");
    assert!(!err.retryable);
    assert!(
        err.message.starts_with("/bin/sh exited with status 3: "),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("problem31\nproblem32") && err.message.ends_with("problem50"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("problem30"), "{}", err.message);

    let err = call(&exec, json!({"command": ["false"]}), ctx("deploy"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "exit-1");
    assert_eq!(err.message, "false exited with status 1 (no output)");
}

#[tokio::test]
async fn exec_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = call(
        &kinds::exec(),
        json!({
            // The shell starts a grandchild in the background, then waits on a child.
            "shell": "sleep 30 & echo $! > grandchild.pid; echo $$ > shell.pid; echo started >&2; sleep 30",
            "dir": dir.path().to_str().unwrap(),
            "timeout": "1s",
        }),
        ctx("hang"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "timeout", "{}", err.message);
    assert!(err.retryable);
    assert!(
        err.message.contains("timed out after 1s") && err.message.contains("started"),
        "{}",
        err.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "took {:?}",
        started.elapsed()
    );
    assert!(stops_running(&dir.path().join("shell.pid")).await);
    assert!(
        stops_running(&dir.path().join("grandchild.pid")).await,
        "the background sleep outlived the step"
    );
}

#[tokio::test]
async fn exec_dropped_by_the_runner_still_kills_the_group() {
    // The runner drops a handler's future when the step's own timeout passes or it shuts down.
    let dir = tempfile::tempdir().unwrap();
    let exec = kinds::exec();
    let work = exec(
        json!({
            "shell": "sleep 30 & echo $! > grandchild.pid; sleep 30",
            "dir": dir.path().to_str().unwrap(),
        }),
        ctx("dropped"),
    );
    let pid_file = dir.path().join("grandchild.pid");
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        let mut work = work;
        loop {
            tokio::select! {
                _ = &mut work => panic!("the command ended by itself"),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0) {
                        return; // dropped here
                    }
                }
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "the command did not start");
    assert!(
        stops_running(&pid_file).await,
        "the process group outlived the dropped step"
    );
}

#[tokio::test]
async fn exec_cancel_stops_the_command() {
    let c = ctx("cancelled");
    let cancel = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let started = Instant::now();
    let err = call(&kinds::exec(), json!({"command": ["sleep", 30]}), c)
        .await
        .unwrap_err();
    assert_eq!(code(&err), "cancelled", "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(25));
}

#[tokio::test]
async fn exec_background_leftovers_are_stopped_when_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = call(
        &kinds::exec(),
        json!({
            // The background sleep holds stdout open: the step must not wait for it.
            "shell": "sleep 30 & echo $! > leftover.pid; echo done",
            "dir": dir.path().to_str().unwrap(),
        }),
        ctx("leftover"),
    )
    .await
    .unwrap();
    assert_eq!(out["stdout"], "done\n");
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(stops_running(&dir.path().join("leftover.pid")).await);
}

#[tokio::test]
async fn exec_keeps_the_tail_of_large_output_without_deadlock() {
    // 1 MiB on each stream (far more than a pipe holds), written interleaved.
    let out = call(
        &kinds::exec(),
        json!({
            "shell": "i=0; while [ $i -lt 16 ]; do head -c 65536 /dev/zero | tr '\\0' o; head -c 65536 /dev/zero | tr '\\0' e >&2; i=$((i+1)); done; echo END; echo ERR-END >&2",
            "max_output": 1000,
        }),
        ctx("noisy"),
    )
    .await
    .unwrap();
    let stdout = out["stdout"].as_str().unwrap();
    let stderr = out["stderr"].as_str().unwrap();
    assert_eq!(stdout.len(), 1000);
    assert!(stdout.ends_with("oooEND\n"), "{}", &stdout[990..]);
    assert_eq!(stderr.len(), 1000);
    assert!(stderr.ends_with("eeeERR-END\n"));
    assert_eq!(out["stdout_truncated"], true);
    assert_eq!(out["stderr_truncated"], true);
    assert!(out.get("json").is_none());
}

#[tokio::test]
async fn exec_not_found_is_permanent() {
    let exec = kinds::exec();
    let err = call(
        &exec,
        json!({"command": ["baton-no-such-program", "x"]}),
        ctx("missing"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "not-found", "{}", err.message);
    assert!(!err.retryable);
    assert!(
        err.message
            .contains("`baton-no-such-program` was not found")
            && err.message.contains("PATH"),
        "{}",
        err.message
    );

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap(); // not executable
    let err = call(
        &exec,
        json!({"command": [script.to_str().unwrap()]}),
        ctx("missing"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "not-found", "{}", err.message);
    assert!(err.message.contains("not executable"), "{}", err.message);

    let err = call(
        &exec,
        json!({"command": ["ls"], "dir": "/nonexistent/baton"}),
        ctx("missing"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "bad-input", "{}", err.message);
    assert!(err.message.contains("`with.dir`"), "{}", err.message);
}

#[tokio::test]
async fn exec_environment_is_clean() {
    // Variables of this process (cargo sets CARGO_* for tests) must not reach the command.
    let runner_vars: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| !["PATH", "HOME", "LANG"].contains(&k.as_str()))
        .collect();
    assert!(
        runner_vars.iter().any(|k| k.starts_with("CARGO")),
        "the test needs a variable of its own to check: {runner_vars:?}"
    );
    let out = call(
        &kinds::exec(),
        json!({"command": ["env"], "env": {"GREETING": "hello world", "N": 3}}),
        ctx("env"),
    )
    .await
    .unwrap();
    let stdout = out["stdout"].as_str().unwrap();
    let mut seen: Vec<(&str, &str)> = stdout.lines().map(|l| l.split_once('=').unwrap()).collect();
    seen.sort();
    let names: Vec<&str> = seen.iter().map(|(k, _)| *k).collect();
    for name in &names {
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "GREETING",
                "N",
                "BATON_RUN_ID",
                "BATON_STEP",
                "BATON_ATTEMPT",
                "BATON_IDEMPOTENCY_KEY"
            ]
            .contains(name),
            "{name} leaked into the command's environment: {stdout}"
        );
    }
    for var in &runner_vars {
        assert!(!names.contains(&var.as_str()), "{var} leaked: {stdout}");
    }
    let get = |k: &str| seen.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!(get("GREETING"), Some("hello world"));
    assert_eq!(get("N"), Some("3"));
    assert_eq!(get("BATON_RUN_ID"), Some("01JRUNTEST"));
    assert_eq!(get("BATON_STEP"), Some("env"));
    assert_eq!(get("BATON_ATTEMPT"), Some("2"));
    assert_eq!(get("BATON_IDEMPOTENCY_KEY"), Some("01JRUNTEST/env"));
    assert!(get("PATH").is_some());
}

#[tokio::test]
async fn exec_stdin_and_working_directory() {
    let exec = kinds::exec();
    let out = call(
        &exec,
        json!({"command": ["cat"], "stdin": "line one\nline two\n"}),
        ctx("cat"),
    )
    .await
    .unwrap();
    assert_eq!(out["stdout"], "line one\nline two\n");

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let out = call(
        &exec,
        json!({"shell": "pwd", "dir": dir.to_str().unwrap()}),
        ctx("pwd"),
    )
    .await
    .unwrap();
    assert_eq!(out["stdout"], format!("{}\n", dir.display()));

    // Without `stdin`, the command reads nothing (it does not hang on the runner's input).
    let out = call(&exec, json!({"command": ["cat"]}), ctx("cat"))
        .await
        .unwrap();
    assert_eq!(out["stdout"], "");
}

#[tokio::test]
async fn exec_killed_by_a_signal() {
    let err = call(
        &kinds::exec(),
        json!({"shell": "kill -KILL $$"}),
        ctx("signal"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), "signal-9", "{}", err.message);
    assert!(err.message.contains("SIGKILL"), "{}", err.message);
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn builtin_registers_every_runner_kind() {
    // A client that has not connected (nothing listens there): `builtin` only keeps it.
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("127.0.0.1:1")
        .await
        .unwrap();
    let mut kinds: Vec<String> = kinds::builtin(client).into_keys().collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["cloudevent", "echo", "emit", "exec", "http", "nats"]
    );
}
