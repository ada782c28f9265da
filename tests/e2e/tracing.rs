//! Every run is one trace: an event with a `traceparent` starts a run through the gateway; the
//! coordinator and two runner processes (one serving `echo`, one `exec`) export their spans over
//! OTLP/HTTP to a collector this test runs, decoding the real protobuf `ExportTraceServiceRequest`.
//! The run retries a step once, then fails at a fan-in step, and two completed steps are undone.
//! A second test exports over gRPC, and only when the services stop (SIGTERM flushes the batch).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use baton_core::event::{self, Ending};
use baton_core::registry::Registry;
use baton_core::spans;
use baton_tests::{BatonProcess, NatsServer, baton_command, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, status};
use prost::Message;

use crate::saga::{ending, start_run};
use crate::{bus, wait_for_end};

const WORKFLOW: &str = r#"
name: traced
on:
  - type: com.example.traced
steps:
  - id: one
    uses: echo
    with: { said: one }
    compensate:
      uses: echo
      with: { undo: one }
  - id: two
    uses: exec
    needs: []
    with: { shell: 'test "$BATON_ATTEMPT" != 1 || exit 3' }
    retry: { attempts: 2, backoff: constant, initial-delay: 200ms, on: [exit-3] }
    compensate:
      uses: exec
      with: { shell: "true" }
  - id: three
    uses: exec
    needs: [one, two]
    with: { shell: "echo no >&2; exit 1" }
"#;

const TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4736";
const EVENT_SPAN: &str = "00f067aa0ba902b7";

/// What the collector received: each span with its resource's attributes.
pub(crate) type Received = Arc<Mutex<Vec<(Vec<KeyValue>, Span)>>>;

async fn receive(
    State(store): State<Received>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    let Ok(request) = ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string()) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    if !protobuf {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new()).into_response();
    }
    let mut store = store.lock().unwrap();
    for rs in request.resource_spans {
        let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                store.push((resource.clone(), span));
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// An OTLP/HTTP endpoint on 127.0.0.1: its base URL and what it received.
pub(crate) async fn collector() -> (String, Received) {
    let store: Received = Default::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(receive))
        .with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), store)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

#[tokio::test]
async fn a_triggered_run_with_a_retry_and_compensations_is_one_trace_across_processes() {
    let (endpoint, received) = collector().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    let registry = Registry::open(&bus.js).await.unwrap();
    registry
        .apply("traced", WORKFLOW, vec!["com.example.traced".into()])
        .await
        .unwrap();

    let otel: &[(&str, &str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let listen = format!("127.0.0.1:{}", free_port());
    let gateway =
        BatonProcess::start_with_env(&["gateway", "--nats-url", &url, "--http", &listen], otel);
    let coordinator = BatonProcess::start_with_env(&["coordinator", "--nats-url", &url], otel);
    let echo_runner =
        BatonProcess::start_with_env(&["runner", "--nats-url", &url, "--kinds", "echo"], otel);
    let mut exec_env = otel.to_vec();
    exec_env.push(("BATON_LOG", "info,baton_runner=debug,async_nats=warn"));
    let exec_runner = BatonProcess::start_with_env(
        &[
            "runner",
            "--nats-url",
            &url,
            "--kinds",
            "exec",
            "--log-json",
        ],
        &exec_env,
    );
    let log = || {
        format!(
            "gateway:\n{}\ncoordinator:\n{}\necho runner:\n{}\nexec runner:\n{}",
            gateway.log(),
            coordinator.log(),
            echo_runner.log(),
            exec_runner.log()
        )
    };

    // The event, with its sender's trace context, through the gateway.
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let sent = http
            .post(format!("{base}/events"))
            .header("ce-specversion", "1.0")
            .header("ce-id", "order-17")
            .header("ce-source", "/tests/tracing")
            .header("ce-type", "com.example.traced")
            .header("ce-traceparent", format!("00-{TRACE}-{EVENT_SPAN}-01"))
            .header("content-type", "application/json")
            .body(r#"{"order": 17}"#)
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 => break r,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("the gateway did not accept the event: {other:?}\n{}", log()),
        }
    };
    drop(answer);
    let run_id = event::triggered_run_id("traced", "/tests/tracing", "order-17");
    let journal = wait_for_end(&bus, &run_id, Duration::from_secs(60), log).await;
    assert_eq!(ending(&journal), Some(Ending::Compensated), "{journal:#?}");

    // Spans arrive in batches: wait for the run's and its seven attempts'.
    let run_span = spans::run_span_id(&run_id);
    let expected: BTreeMap<String, &str> = [
        (spans::attempt_span_id(&run_id, "one", None, 1), "step one"),
        (spans::attempt_span_id(&run_id, "two", None, 1), "step two"),
        (spans::attempt_span_id(&run_id, "two", None, 2), "step two"),
        (
            spans::attempt_span_id(&run_id, "three", None, 1),
            "step three",
        ),
        (
            spans::compensation_span_id(&run_id, "two", 1),
            "compensate two",
        ),
        (
            spans::compensation_span_id(&run_id, "one", 1),
            "compensate one",
        ),
        (run_span.clone(), "run traced"),
    ]
    .into_iter()
    .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<(Vec<KeyValue>, Span)> = received.lock().unwrap().clone();
        let ids: BTreeSet<String> = got.iter().map(|(_, s)| hex(&s.span_id)).collect();
        if expected.keys().all(|id| ids.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans missing: {:?}; got {:#?}\n{}",
            expected
                .keys()
                .filter(|id| !ids.contains(*id))
                .collect::<Vec<_>>(),
            got.iter().map(|(_, s)| &s.name).collect::<Vec<_>>(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late batches would come within a few schedule delays: nothing else belongs to the test.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<(Vec<KeyValue>, Span)> = received.lock().unwrap().clone();

    // One trace throughout: the event's.
    for (_, s) in &got {
        assert_eq!(
            hex(&s.trace_id),
            TRACE,
            "span {} is in another trace",
            s.name
        );
    }
    let by_id: BTreeMap<String, &(Vec<KeyValue>, Span)> =
        got.iter().map(|e| (hex(&e.1.span_id), e)).collect();
    assert_eq!(
        by_id.len(),
        got.len(),
        "no span was exported twice: {:#?}",
        got.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(by_id.len(), expected.len(), "{:#?}", got);
    for (id, name) in &expected {
        assert_eq!(by_id[id].1.name, *name);
    }

    // The run span: child of the event's span, exported by the coordinator, failed.
    let (resource, run) = by_id[&run_span];
    assert_eq!(hex(&run.parent_span_id), EVENT_SPAN);
    assert_eq!(
        text(resource, "service.name").as_deref(),
        Some("baton-coordinator")
    );
    assert_eq!(
        text(&run.attributes, "baton.workflow").as_deref(),
        Some("traced")
    );
    assert_eq!(
        text(&run.attributes, "baton.run.id").as_deref(),
        Some(run_id.as_str())
    );
    assert_eq!(
        text(&run.attributes, "baton.outcome").as_deref(),
        Some("compensated")
    );
    assert_eq!(
        text(&run.attributes, "cloudevents.event_id").as_deref(),
        Some("order-17")
    );
    assert_eq!(
        run.status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Error as i32)
    );
    let events: Vec<&str> = run.events.iter().map(|e| e.name.as_str()).collect();
    for decision in [
        "step.requested",
        "retry scheduled",
        "compensating",
        "compensation.requested",
    ] {
        assert!(events.contains(&decision), "{decision} in {events:?}");
    }

    // Every attempt is a child of the run span, on the runner that executed it.
    let mut instances: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, (resource, s)) in &by_id {
        if *id == run_span {
            continue;
        }
        assert_eq!(hex(&s.parent_span_id), run_span, "parent of {}", s.name);
        assert_eq!(
            text(resource, "service.name").as_deref(),
            Some("baton-runner")
        );
        let instance = text(resource, "service.instance.id").expect("service.instance.id");
        let kind = text(&s.attributes, "baton.step.kind").unwrap();
        instances.entry(kind).or_default().insert(instance);
    }
    assert_eq!(instances.len(), 2, "{instances:?}");
    let (echo, exec) = (&instances["echo"], &instances["exec"]);
    assert_eq!((echo.len(), exec.len()), (1, 1), "{instances:?}");
    assert_ne!(echo, exec, "two runner processes");

    // Both attempts of the retried step; the first failed.
    let two_1 = &by_id[&spans::attempt_span_id(&run_id, "two", None, 1)].1;
    assert_eq!(int(&two_1.attributes, "baton.step.attempt"), Some(1));
    assert_eq!(
        text(&two_1.attributes, "error.type").as_deref(),
        Some("exit-3")
    );
    assert_eq!(
        two_1.status.as_ref().map(|s| s.code),
        Some(status::StatusCode::Error as i32)
    );
    let two_2 = &by_id[&spans::attempt_span_id(&run_id, "two", None, 2)].1;
    assert_eq!(int(&two_2.attributes, "baton.step.attempt"), Some(2));
    assert_eq!(
        text(&two_2.attributes, "baton.outcome").as_deref(),
        Some("completed")
    );
    // The fan-in step links to the attempts it depended on.
    let three = &by_id[&spans::attempt_span_id(&run_id, "three", None, 1)].1;
    let links: Vec<String> = three.links.iter().map(|l| hex(&l.span_id)).collect();
    assert_eq!(
        links,
        [
            spans::attempt_span_id(&run_id, "one", None, 1),
            spans::attempt_span_id(&run_id, "two", None, 2)
        ]
    );
    let compensation = &by_id[&spans::compensation_span_id(&run_id, "one", 1)].1;
    assert!(
        compensation
            .attributes
            .iter()
            .any(|kv| kv.key == "baton.compensation")
    );

    // JSON logs of the exec runner carry the trace and the attempt's span id.
    let line = exec_runner
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "attempt done" && l["fields"]["step"] == "three")
        .unwrap_or_else(|| panic!("no log line of step three:\n{}", exec_runner.log()));
    assert_eq!(line["trace_id"], TRACE, "{line}");
    assert_eq!(
        line["span_id"],
        spans::attempt_span_id(&run_id, "three", None, 1)
    );

    // `baton runs trace` rebuilds the same spans from the journal.
    let (ok, out, err) = baton_command(&["runs", "trace", &run_id, "--nats-url", &url], &[]);
    assert!(ok, "{out}{err}");
    let file: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut from_file: BTreeMap<String, (String, String)> = BTreeMap::new();
    for rs in file["resourceSpans"].as_array().unwrap() {
        for ss in rs["scopeSpans"].as_array().unwrap() {
            for s in ss["spans"].as_array().unwrap() {
                assert_eq!(s["traceId"], TRACE);
                from_file.insert(
                    s["spanId"].as_str().unwrap().to_owned(),
                    (
                        s["name"].as_str().unwrap().to_owned(),
                        s["parentSpanId"].as_str().unwrap().to_owned(),
                    ),
                );
            }
        }
    }
    let live: BTreeMap<String, (String, String)> = by_id
        .iter()
        .map(|(id, (_, s))| (id.clone(), (s.name.clone(), hex(&s.parent_span_id))))
        .collect();
    assert_eq!(from_file, live);
}

/// An OTLP/gRPC endpoint on 127.0.0.1 (HTTP/2 without TLS, unary `Export`): its URL and what it
/// received.
async fn grpc_collector() -> (String, Received) {
    async fn export(
        State(store): State<Received>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        // A gRPC message: a compression flag, a 4-byte length, the protobuf.
        let (flag, len) = (body[0], u32::from_be_bytes(body[1..5].try_into().unwrap()));
        assert_eq!(
            (flag, len as usize),
            (0, body.len() - 5),
            "one uncompressed message"
        );
        let request = ExportTraceServiceRequest::decode(&body[5..]).unwrap();
        let mut store = store.lock().unwrap();
        for rs in request.resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    store.push((resource.clone(), span));
                }
            }
        }
        let reply = ExportTraceServiceResponse::default().encode_to_vec();
        let mut framed = vec![0];
        framed.extend((reply.len() as u32).to_be_bytes());
        framed.extend(reply);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures::stream::iter([
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(axum::body::Bytes::from(
                framed,
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ]);
        axum::response::Response::builder()
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(axum::body::Body::new(http_body_util::StreamBody::new(
                frames,
            )))
            .unwrap()
    }
    let store: Received = Default::default();
    let app = axum::Router::new()
        .route(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            axum::routing::post(export),
        )
        .with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), store)
}

/// A `baton` service this test stops with SIGTERM, logging to a file.
struct Service {
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl Service {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Service {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new(baton_tests::baton_binary())
            .args(args)
            .env("BATON_LOG", "info,async_nats=warn")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Service { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGTERM, and the exit status once it has stopped.
    fn terminate(&mut self) -> std::process::ExitStatus {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_grpc_and_are_flushed_when_the_services_stop() {
    let (endpoint, received) = grpc_collector().await;
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    let registry = Registry::open(&bus.js).await.unwrap();
    let (version, _) = registry
        .apply(
            "hello-traced",
            "name: hello-traced\nsteps:\n  - id: greet\n    uses: echo\n    with: { hello: world }\n",
            vec![],
        )
        .await
        .unwrap();
    // A batch waits ten minutes: whatever arrives was flushed by the shutdown.
    let otel: &[(&str, &str)] = &[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_SERVICE_NAME", "my-baton"),
    ];
    let mut coordinator = Service::start(&["coordinator", "--nats-url", &url], otel);
    let mut runner = Service::start(&["runner", "--nats-url", &url, "--kinds", "echo"], otel);
    let run_id = start_run(&bus, "hello-traced", version, serde_json::json!({})).await;
    let log = || {
        format!(
            "coordinator:\n{}\nrunner:\n{}",
            coordinator.log(),
            runner.log()
        )
    };
    let journal = wait_for_end(&bus, &run_id, Duration::from_secs(30), log).await;
    assert_eq!(ending(&journal), Some(Ending::Succeeded));
    // The coordinator reads the journal to build the run span once the end is stored.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing before the flush"
    );

    let stopped = tokio::task::spawn_blocking(move || {
        let statuses = (coordinator.terminate(), runner.terminate());
        (statuses, coordinator.log(), runner.log())
    })
    .await
    .unwrap();
    let ((c, r), coordinator_log, runner_log) = stopped;
    assert!(
        c.success() && r.success(),
        "{coordinator_log}\n{runner_log}"
    );
    assert!(coordinator_log.contains("(grpc)"), "{coordinator_log}");

    let got = received.lock().unwrap().clone();
    let run_span = spans::run_span_id(&run_id);
    let attempt = spans::attempt_span_id(&run_id, "greet", None, 1);
    let find = |id: &str| {
        got.iter()
            .find(|(_, s)| hex(&s.span_id) == id)
            .unwrap_or_else(|| {
                panic!("span {id} missing: {got:#?}\n{coordinator_log}\n{runner_log}")
            })
    };
    let (run_resource, run) = find(&run_span);
    let (runner_resource, step) = find(&attempt);
    assert_eq!(got.len(), 2, "{got:#?}");
    // Started by hand: Baton began the trace, and the run span is its root.
    assert!(run.parent_span_id.is_empty(), "a root span");
    assert_eq!(step.trace_id, run.trace_id);
    assert_eq!(hex(&step.parent_span_id), run_span);
    assert_eq!(
        hex(&run.trace_id),
        journal[0].trace.as_ref().unwrap().trace_id
    );
    // OTEL_SERVICE_NAME names the service; the instance stays the process's.
    for resource in [run_resource, runner_resource] {
        assert_eq!(text(resource, "service.name").as_deref(), Some("my-baton"));
    }
    assert!(text(runner_resource, "service.instance.id").is_some_and(|i| i.starts_with("runner-")));
}
