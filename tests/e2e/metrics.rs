//! Prometheus metrics: a coordinator, a runner and a gateway each serve `/metrics`; after runs that
//! succeed and compensate, an accepted and a refused request and a dead letter, the counters say so.

use std::time::{Duration, Instant};

use baton_tests::{BatonProcess, NatsServer, free_port};
use serde_json::json;

use crate::bus;
use crate::saga::apply;

const WORKFLOW: &str = r#"
name: metered
on: [com.example.metered]
steps:
  - id: a
    uses: echo
    with: { n: 1 }
    compensate: { uses: echo, with: { undo: true } }
  - id: b
    uses: echo
    with: { fail: "${{ .event.data.fail }}" }
"#;

/// The value of the sample whose name and labels are all in `line`'s prefix.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn scrape(http: &reqwest::Client, port: u16) -> String {
    match http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Scrapes until `check` holds.
async fn until(
    http: &reqwest::Client,
    port: u16,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(http, port).await;
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: not found in\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn every_service_serves_its_metrics() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    apply(&bus, "metered", WORKFLOW).await;
    let (c, r, g, h) = (free_port(), free_port(), free_port(), free_port());
    let listen = format!("127.0.0.1:{h}");
    let _coordinator = BatonProcess::start(&[
        "coordinator",
        "--nats-url",
        &url,
        "--metrics",
        &format!("127.0.0.1:{c}"),
    ]);
    let _runner = BatonProcess::start(&[
        "runner",
        "--nats-url",
        &url,
        "--metrics",
        &format!("127.0.0.1:{r}"),
    ]);
    let gateway = BatonProcess::start(&[
        "gateway",
        "--nats-url",
        &url,
        "--http",
        &listen,
        "--metrics",
        &format!("127.0.0.1:{g}"),
    ]);
    let http = reqwest::Client::new();
    until(&http, g, "gateway metrics", |t| {
        t.contains("baton_consumer_pending")
    })
    .await;

    for (id, data) in [("m-1", json!({})), ("m-2", json!({"fail": "no"}))] {
        let event = json!({"specversion": "1.0", "id": id, "source": "test", "type": "com.example.metered", "data": data});
        let answer = http
            .post(format!("http://{listen}/events"))
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202, "{}", gateway.log());
    }
    let refused = http
        .post(format!("http://{listen}/events"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    // Not a CloudEvent on NATS: the trigger consumer dead-letters it.
    bus.js
        .publish("baton.events.nats", "not an event".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let coordinator = until(&http, c, "both runs ended", |t| {
        sample(
            t,
            "baton_runs_ended_total",
            &["workflow=\"metered\"", "outcome=\"succeeded\""],
        ) == Some(1.0)
            && sample(t, "baton_runs_ended_total", &["outcome=\"compensated\""]) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(
            &coordinator,
            "baton_runs_started_total",
            &["workflow=\"metered\""]
        ),
        Some(2.0)
    );
    assert!(
        coordinator
            .contains("baton_consumer_pending{stream=\"BATON_RUNS\",consumer=\"coordinator-0\"}"),
        "{coordinator}"
    );

    let runner = until(&http, r, "step counts", |t| {
        sample(
            t,
            "baton_steps_total",
            &["kind=\"echo\"", "outcome=\"failed\""],
        ) == Some(1.0)
    })
    .await;
    // a twice, b twice (once failed), a's compensation once.
    assert_eq!(
        sample(
            &runner,
            "baton_steps_total",
            &["outcome=\"completed\"", "compensation=\"false\""]
        ),
        Some(3.0),
        "{runner}"
    );
    assert_eq!(
        sample(&runner, "baton_steps_total", &["compensation=\"true\""]),
        Some(1.0),
        "{runner}"
    );
    assert_eq!(
        sample(
            &runner,
            "baton_step_duration_seconds_count",
            &["kind=\"echo\""]
        ),
        Some(5.0),
        "{runner}"
    );

    let gateway_text = until(&http, g, "the dead letter", |t| {
        sample(t, "baton_dead_letters_total", &["origin=\"ingress\""]) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(
            &gateway_text,
            "baton_events_accepted_total",
            &["origin=\"http\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &gateway_text,
            "baton_events_refused_total",
            &["status=\"415\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &gateway_text,
            "baton_runs_triggered_total",
            &["workflow=\"metered\""]
        ),
        Some(2.0)
    );
}
