//! Secrets: a workflow uses two secrets (one from the cluster's bucket, one from the runner's
//! environment) in an HTTP header and a process environment; the peer gets the real values, and
//! neither value is anywhere in the journal, the event and dead-letter streams, the outputs or the
//! logs of any process. An `emit` step never carries a secret into `BATON_EVENTS`: a workflow whose
//! `emit` reads `.secrets` is refused by `baton apply`, and a reference that reaches an `emit`
//! as data is sent on as text. A reference sent as data (an event's, a run's inputs), however it
//! reaches a step (a body, a URL, an expression that joins or decodes it), is never resolved.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::HeaderMap;
use axum::routing::get;
use baton_core::event::{Ending, RunEvent};
use baton_core::streams;
use baton_tests::{BatonProcess, NatsServer, baton_binary};
use cloudevents::{EventBuilder, EventBuilderV10};
use serde_json::json;

use crate::saga::{apply, ending, start_run};
use crate::{bus, wait_for_end};

const TOKEN: &str = "tok-5f1c9a7e-VERY-SECRET";
const KEY: &str = "key-0d4b2e88-ALSO-SECRET";

const WORKFLOW: &str = r#"
name: deploy-with-secrets
inputs: { url: { type: string }, note: { type: string } }
steps:
  - id: call
    uses: http
    with:
      url: ${{ .inputs.url }}
      headers: { Authorization: "Bearer ${{ .secrets.api_token }}" }
  - id: script
    uses: exec
    with:
      shell: 'echo "using $DEPLOY_KEY"; echo "token was $TOKEN" >&2; exit 3'
      env: { DEPLOY_KEY: "${{ .secrets.deploy_key }}", TOKEN: "${{ .secrets.api_token }}" }
    on-failure: continue
  - id: missing
    uses: echo
    with: { x: "${{ .secrets.not_set }}" }
    needs: []
    on-failure: continue
  - id: relay
    uses: emit
    with: { type: com.example.note, data: { note: "${{ .inputs.note }}" } }
    needs: []
    on-failure: continue
"#;

/// Refused when applied: the event would carry the token in clear.
const EMITS_A_SECRET: &str = r#"
name: emits-a-secret
steps:
  - id: announce
    uses: emit
    with: { type: com.example.deployed, data: { token: "${{ .secrets.api_token }}" } }
"#;

/// Every byte of every message of a stream.
async fn stream_bytes(bus: &baton_core::Bus, name: &str) -> Vec<u8> {
    let mut all = Vec::new();
    for m in crate::catalogue::messages(bus, name).await {
        all.extend_from_slice(m.subject.as_bytes());
        for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
            all.extend_from_slice(AsRef::<str>::as_ref(name).as_bytes());
            for v in values {
                all.extend_from_slice(v.as_str().as_bytes());
            }
        }
        all.extend_from_slice(&m.payload);
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn secret_values_reach_the_step_and_nowhere_else() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;

    // The peer: records the Authorization it got, and echoes it back in its body.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = Router::new().route(
        "/deploy",
        get({
            let seen = seen.clone();
            move |headers: HeaderMap| async move {
                let auth = headers["authorization"].to_str().unwrap().to_owned();
                seen.lock().unwrap().push(auth.clone());
                axum::Json(json!({"you_sent": auth}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = format!("http://{}/deploy", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // One secret in the bucket (as an operator stores it), one in the runner's environment.
    let mut set = std::process::Command::new(baton_binary())
        .args(["secrets", "set", "api_token", "--nats-url", &url])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(set.stdin.take().unwrap(), "{TOKEN}").unwrap();
    assert!(set.wait().unwrap().success());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("emits-a-secret.yaml");
    std::fs::write(&file, EMITS_A_SECRET).unwrap();
    let (ok, _, stderr) =
        baton_tests::baton_command(&["apply", file.to_str().unwrap(), "--nats-url", &url], &[]);
    assert!(!ok, "an emit reading a secret was applied: {stderr}");
    assert!(
        stderr.contains("emits-a-secret.yaml:6:")
            && stderr.contains("an `emit` step cannot read secrets"),
        "{stderr}"
    );
    let registry = baton_core::registry::Registry::open(&bus.js).await.unwrap();
    assert_eq!(registry.head("emits-a-secret").await.unwrap(), None);

    let version = apply(&bus, "deploy-with-secrets", WORKFLOW).await;
    // Spans go to a collector of the test's own, to be searched too.
    let (endpoint, spans) = crate::tracing::collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let coordinator = BatonProcess::start_with_env(&["coordinator", "--nats-url", &url], &otel);
    let mut runner_env = otel.to_vec();
    runner_env.push(("BATON_SECRET_DEPLOY_KEY", KEY));
    let runner = BatonProcess::start_with_env(&["runner", "--nats-url", &url], &runner_env);
    // Whoever sends the input (or an event) can write a reference; it stays text, in an `emit` too.
    let note = format!("token: {}", baton_core::secrets::reference("api_token"));
    let run = start_run(
        &bus,
        "deploy-with-secrets",
        version,
        json!({"url": peer, "note": note}),
    )
    .await;
    let log = || {
        format!(
            "coordinator:\n{}\nrunner:\n{}",
            coordinator.log(),
            runner.log()
        )
    };
    let journal = wait_for_end(&bus, &run, Duration::from_secs(30), log).await;
    assert_eq!(ending(&journal), Some(Ending::Succeeded), "{journal:#?}");

    // The peer got the real token.
    assert_eq!(*seen.lock().unwrap(), [format!("Bearer {TOKEN}")]);
    // The outputs and errors say `***` where a value was.
    let outcome = |step: &str| {
        journal.iter().find_map(|j| match &j.event {
            RunEvent::StepCompleted(c) if c.step == step => Some(Ok(c.output.clone())),
            RunEvent::StepFailed(f) if f.step == step => Some(Err(f.error.clone())),
            _ => None,
        })
    };
    let call = outcome("call").unwrap().unwrap();
    assert_eq!(call["body"]["you_sent"], "Bearer ***");
    let script = outcome("script").unwrap().unwrap_err();
    assert!(script.message.contains("token was ***"), "{script:?}");
    let missing = outcome("missing").unwrap().unwrap_err();
    assert_eq!(missing.code.as_deref(), Some("secret-missing"));
    assert!(
        missing.message.contains("secret not_set is not set"),
        "{missing:?}"
    );
    outcome("relay").unwrap().unwrap();
    let events = stream_bytes(&bus, streams::EVENTS).await;
    assert!(
        contains(&events, &note),
        "the emitted note is not in BATON_EVENTS"
    );
    // The request in the journal names the secret, not its value.
    let requested = journal
        .iter()
        .find_map(|j| match &j.event {
            RunEvent::StepRequested(r) if r.step == "call" => Some(r.input.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        requested["headers"]["Authorization"],
        "Bearer <<secret:api_token>>"
    );

    // Nowhere: the journal, the event and dead-letter streams, any process's log.
    for stream in [streams::RUNS, streams::EVENTS, streams::DLQ] {
        let bytes = stream_bytes(&bus, stream).await;
        for secret in [TOKEN, KEY] {
            assert!(!contains(&bytes, secret), "{secret} is in {stream}");
        }
    }
    for (name, text) in [("coordinator", coordinator.log()), ("runner", runner.log())] {
        for secret in [TOKEN, KEY] {
            assert!(!text.contains(secret), "{secret} is in the {name} log");
        }
    }
    // The run's spans: the run and its five attempts, none holding a value.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let received = spans.lock().unwrap().len();
        if received >= 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {received} spans arrived\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (resource, span) in spans.lock().unwrap().iter() {
        use prost::Message;
        let mut bytes = span.encode_to_vec();
        for kv in resource {
            bytes.extend(kv.encode_to_vec());
        }
        for secret in [TOKEN, KEY] {
            assert!(
                !contains(&bytes, secret),
                "{secret} is in span {}",
                span.name
            );
        }
    }
    let (ok, listed, _) = baton_tests::baton_command(&["secrets", "list", "--nats-url", &url], &[]);
    assert!(
        ok && listed.trim() == "api_token" && !listed.contains(TOKEN),
        "{listed}"
    );
}

const FORWARDER: &str = r#"
name: forwarder
on: [com.example.note]
steps:
  - id: forward
    uses: http
    with:
      method: POST
      url: ${{ .event.data.hook }}
      headers: { Authorization: "Bearer ${{ .secrets.api_token }}" }
      body: ${{ .event.data }}
  - id: show
    uses: echo
    with:
      note: ${{ .event.data.note }}
      joined: ${{ .event.data.head + .event.data.tail }}
"#;

/// Anyone who can send an event writes `<<secret:NAME>>` into its data, naming a secret the runner
/// holds but the workflow never reads, or joined from two fields. The workflow forwards the data in
/// a body and a URL and echoes it: each step gets the text, the peer gets the workflow's own token
/// where the workflow put it and nothing else, and neither value is anywhere.
#[tokio::test]
async fn a_reference_sent_as_data_is_never_resolved() {
    const DB_PASSWORD: &str = "db-7c1e55aa-NEVER-SENT";
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;

    // The peer records each request's Authorization, query and body.
    type Seen = (String, Option<String>, serde_json::Value);
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let app = Router::new().route(
        "/hook",
        axum::routing::post({
            let seen = seen.clone();
            move |headers: HeaderMap,
                  Query(query): Query<std::collections::HashMap<String, String>>,
                  axum::Json(body): axum::Json<serde_json::Value>| async move {
                let auth = headers["authorization"].to_str().unwrap().to_owned();
                seen.lock()
                    .unwrap()
                    .push((auth, query.get("k").cloned(), body));
                axum::Json(json!({"ok": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    apply(&bus, "forwarder", FORWARDER).await;
    let coordinator = BatonProcess::start(&["coordinator", "--nats-url", &url]);
    // The gateway takes events in from NATS and starts the runs they trigger.
    let gateway = BatonProcess::start(&["gateway", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    // The runner holds both secrets; the workflow reads only `api_token`.
    let runner = BatonProcess::start_with_env(
        &["runner", "--nats-url", &url],
        &[
            ("BATON_SECRET_API_TOKEN", TOKEN),
            ("BATON_SECRET_DB_PASSWORD", DB_PASSWORD),
        ],
    );

    let forged = baton_core::secrets::reference("db_password");
    let data = json!({
        "hook": format!("{peer}?k={forged}"),
        "note": forged,
        "head": "<<secret:api_",
        "tail": "token>>",
    });
    let event = EventBuilderV10::new()
        .id("note-1")
        .source("/anyone")
        .ty("com.example.note")
        .data("application/json", data.clone())
        .build()
        .unwrap();
    let (headers, body) = baton_core::binding::encode(&event);
    bus.js
        .publish_with_headers(baton_core::subjects::ingress("nats"), headers, body)
        .await
        .unwrap()
        .await
        .unwrap();
    let run = baton_core::event::triggered_run_id("forwarder", "/anyone", "note-1");
    let log = || {
        format!(
            "coordinator:\n{}\nrunner:\n{}\ngateway:\n{}",
            coordinator.log(),
            runner.log(),
            gateway.log()
        )
    };
    let journal = wait_for_end(&bus, &run, Duration::from_secs(30), log).await;
    assert_eq!(ending(&journal), Some(Ending::Succeeded), "{journal:#?}");

    // The peer got the token where the workflow put it, and the data as it was sent.
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            format!("Bearer {TOKEN}"),
            Some(forged.clone()),
            data.clone()
        )]
    );
    // The echo step saw the text, not a value (a value would come back as `***`).
    let show = journal
        .iter()
        .find_map(|j| match &j.event {
            RunEvent::StepCompleted(c) if c.step == "show" => Some(c.output.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        show,
        json!({"note": forged, "joined": baton_core::secrets::reference("api_token")})
    );
    // The requests list only the reference the workflow placed.
    for j in &journal {
        if let RunEvent::StepRequested(r) = &j.event {
            let names: Vec<&str> = r.secrets.iter().map(|p| p.name.as_str()).collect();
            let expected: &[&str] = if r.step == "forward" {
                &["api_token"]
            } else {
                &[]
            };
            assert_eq!(names, expected, "{r:?}");
        }
    }
    for stream in [streams::RUNS, streams::EVENTS, streams::DLQ] {
        let bytes = stream_bytes(&bus, stream).await;
        for secret in [TOKEN, DB_PASSWORD] {
            assert!(!contains(&bytes, secret), "{secret} is in {stream}");
        }
    }
    let logs = [
        ("coordinator", coordinator.log()),
        ("runner", runner.log()),
        ("gateway", gateway.log()),
    ];
    for (name, text) in logs {
        for secret in [TOKEN, DB_PASSWORD] {
            assert!(!text.contains(secret), "{secret} is in the {name} log");
        }
    }
}
