//! Interop with another CloudEvents implementation: the Python SDK (`cloudevents`) over `nats-py`.

use std::time::Duration;

use baton_core::event::{Ending, RunEvent, triggered_run_id};
use baton_core::registry::Registry;
use baton_core::{binding, subjects};
use baton_tests::{BatonProcess, NatsServer, python};
use cloudevents::{EventBuilder, EventBuilderV10};
use serde_json::json;

const WORKFLOW: &str = r#"
name: py-interop
on:
  - type: com.example.python.greeting
steps:
  - id: echo
    uses: echo
    with:
      greeting: ${{ .event.data.greeting }}
      n: ${{ .event.data.n }}
      subject: ${{ .event.subject }}
outputs:
  got: ${{ .steps.echo.outputs }}
"#;

#[tokio::test]
async fn events_published_by_the_python_sdk_start_runs_and_python_reads_batons_events() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = crate::bus(&url).await;
    let triggers = vec!["com.example.python.greeting".to_owned()];
    Registry::open(&bus.js)
        .await
        .unwrap()
        .apply("py-interop", WORKFLOW, triggers)
        .await
        .unwrap();
    let baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);

    // Python publishes one event in binary mode and one in structured mode; Baton consumes both.
    let publish = |mode: &'static str, id: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            python(
                "cloudevents_nats.py",
                &["publish", &url, "baton.events.nats", mode, id],
            )
        })
    };
    publish("binary", "py-1").await.unwrap();
    publish("structured", "py-2").await.unwrap();
    for id in ["py-1", "py-2"] {
        let run = triggered_run_id("py-interop", "/python/sdk", id);
        let events = crate::wait_for_end(&bus, &run, Duration::from_secs(30), || baton.log()).await;
        let RunEvent::Ended(Ending::Succeeded, done) = &events.last().unwrap().event else {
            panic!("{id}: {events:#?}")
        };
        assert_eq!(
            done.output,
            json!({"got": {"greeting": "héllo from python", "n": 3, "subject": "Grüße 😀"}}),
            "{id}"
        );
        let trace = events[0].trace.as_ref().unwrap();
        assert_eq!(
            trace.trace_id, "0af7651916cd43dd8448eb211c80319c",
            "{id}: the run continues Python's trace"
        );
    }

    // Python reads what Baton published: a run's end, and an event with non-ASCII attributes.
    let run = triggered_run_id("py-interop", "/python/sdk", "py-1");
    let p = subjects::partition(&run, bus.partitions);
    let filter = format!("baton.run.{p}.{run}.run.succeeded");
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            python(
                "cloudevents_nats.py",
                &["read", &url, "BATON_RUNS", &filter],
            )
        }
    })
    .await
    .unwrap();
    let read: serde_json::Value = serde_json::from_str(&out).unwrap();
    let attributes = &read[0]["attributes"];
    assert_eq!(attributes["type"], "dev.baton.run.succeeded", "{out}");
    assert_eq!(attributes["source"], "baton/coordinator");
    assert_eq!(attributes["id"], format!("{run}.ended.1"));
    assert_eq!(attributes["datacontenttype"], "application/json");
    assert!(
        attributes["traceparent"]
            .as_str()
            .unwrap()
            .contains("0af7651916cd43dd8448eb211c80319c"),
        "{out}"
    );
    assert_eq!(
        read[0]["data"]["output"]["got"]["greeting"],
        "héllo from python"
    );

    let event = EventBuilderV10::new()
        .id("rust-1")
        .source("/baton/tests")
        .ty("com.example.rust")
        .subject("Euro € 😀")
        .time("2018-04-05T03:56:24Z")
        .extension("comexampleext", "a \"quoted\" 100% value")
        .data(
            "text/plain; charset=utf-8",
            "Hello, 🌎!".as_bytes().to_vec(),
        )
        .build()
        .unwrap();
    let (headers, body) = binding::encode(&event);
    bus.js
        .publish_with_headers("baton.events.interop", headers, body)
        .await
        .unwrap()
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        python(
            "cloudevents_nats.py",
            &["read", &url, "BATON_EVENTS", "baton.events.interop"],
        )
    })
    .await
    .unwrap();
    let read: serde_json::Value = serde_json::from_str(&out).unwrap();
    let attributes = &read[0]["attributes"];
    assert_eq!(attributes["subject"], "Euro € 😀", "{out}");
    assert_eq!(attributes["comexampleext"], "a \"quoted\" 100% value");
    assert_eq!(attributes["datacontenttype"], "text/plain; charset=utf-8");
    assert_eq!(read[0]["data"], "Hello, 🌎!");
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}
