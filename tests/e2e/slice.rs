//! The thin slice: a CloudEvent on NATS starts a two-step workflow; A's completion triggers B; the
//! run ends `succeeded` with its outputs, also across kill -9 of the Baton process.

use std::time::Duration;

use baton_core::event::{Ending, RunEvent, triggered_run_id};
use baton_core::registry::Registry;
use baton_core::{Bus, binding, subjects};
use baton_tests::{BatonProcess, NatsServer};
use cloudevents::{EventBuilder, EventBuilderV10};

use crate::{bus, wait_for, wait_for_end};

const TWO_STEPS: &str = r#"
name: two-steps
on:
  - type: com.example.order.placed
steps:
  - id: a
    uses: echo
    with:
      order: ${{ .event.data.order }}
      delay_ms: ${{ .event.data.delay_ms }}
  - id: b
    uses: echo
    with:
      total: ${{ .steps.a.outputs.order.qty * 3 }}
outputs:
  total: ${{ .steps.b.outputs.total }}
"#;

async fn apply(bus: &Bus) {
    let triggers = vec!["com.example.order.placed".to_owned()];
    Registry::open(&bus.js)
        .await
        .unwrap()
        .apply("two-steps", TWO_STEPS, triggers)
        .await
        .unwrap();
}

/// Publishes an order event and returns the id of the run it starts.
async fn publish_order(bus: &Bus, id: &str, delay_ms: u64) -> String {
    let event = EventBuilderV10::new()
        .id(id)
        .source("/shop")
        .ty("com.example.order.placed")
        .data(
            "application/json",
            serde_json::json!({"order": {"qty": 7}, "delay_ms": delay_ms}),
        )
        .extension(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .build()
        .unwrap();
    let (headers, body) = binding::encode(&event);
    bus.js
        .publish_with_headers(subjects::ingress("nats"), headers, body)
        .await
        .unwrap()
        .await
        .unwrap();
    triggered_run_id("two-steps", "/shop", id)
}

fn serve(server: &NatsServer) -> BatonProcess {
    BatonProcess::start(&[
        "serve",
        "--nats-url",
        &server.url(),
        "--http",
        "127.0.0.1:0",
        "--runner-ack-wait",
        "2",
    ])
}

fn count(
    events: &[baton_coordinator::service::Journaled],
    pred: impl Fn(&RunEvent) -> bool,
) -> usize {
    events.iter().filter(|e| pred(&e.event)).count()
}

#[tokio::test]
async fn an_event_on_nats_starts_a_run_whose_steps_chain_to_success() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    apply(&bus).await;
    let baton = serve(&server);

    let run_id = publish_order(&bus, "order-1", 0).await;
    let events = wait_for_end(&bus, &run_id, Duration::from_secs(20), || baton.log()).await;

    // Two durable writes per step: a quick step is not announced (`step.started`).
    let kinds: Vec<_> = events.iter().map(|e| e.event.ty()).collect();
    assert_eq!(
        kinds,
        [
            "dev.baton.run.requested",
            "dev.baton.step.requested",
            "dev.baton.step.completed",
            "dev.baton.step.requested",
            "dev.baton.step.completed",
            "dev.baton.run.succeeded"
        ]
    );
    let RunEvent::Ended(Ending::Succeeded, done) = &events.last().unwrap().event else {
        unreachable!()
    };
    assert_eq!(
        done.output,
        serde_json::json!({"total": 21}),
        "B used A's output"
    );
    assert!(
        events.iter().all(|e| e
            .trace
            .as_ref()
            .is_some_and(|t| t.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736")),
        "every event continues the trigger's trace"
    );

    // The same event again (a redelivery) starts no second run.
    let again = publish_order(&bus, "order-1", 0).await;
    assert_eq!(again, run_id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = crate::journal(&bus, &run_id).await;
    assert_eq!(count(&events, |e| matches!(e, RunEvent::Requested(_))), 1);
    assert_eq!(
        count(&events, |e| matches!(
            e,
            RunEvent::Ended(Ending::Succeeded, _)
        )),
        1
    );
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}

#[tokio::test]
async fn a_run_survives_kill_9_of_baton_mid_step_and_records_each_completion_once() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    apply(&bus).await;
    let mut baton = serve(&server);

    // Step A takes 1.5 s: kill Baton while it runs.
    let run_id = publish_order(&bus, "order-2", 1500).await;
    wait_for(&bus, &run_id, Duration::from_secs(20), |events| {
        events
            .iter()
            .any(|e| matches!(&e.event, RunEvent::StepRequested(r) if r.step == "a"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    baton.kill();
    let before = crate::journal(&bus, &run_id).await;
    assert_eq!(
        count(&before, |e| matches!(e, RunEvent::StepCompleted(_))),
        0,
        "killed mid-step"
    );

    baton.restart();
    let events = wait_for_end(&bus, &run_id, Duration::from_secs(30), || baton.log()).await;
    assert!(
        matches!(
            events.last().unwrap().event,
            RunEvent::Ended(Ending::Succeeded, _)
        ),
        "{events:#?}"
    );
    for step in ["a", "b"] {
        let completions = count(
            &events,
            |e| matches!(e, RunEvent::StepCompleted(c) if c.step == step),
        );
        assert_eq!(
            completions, 1,
            "step {step} completion recorded once: {events:#?}"
        );
    }
    assert_eq!(
        count(&events, |e| matches!(
            e,
            RunEvent::Ended(Ending::Succeeded, _)
        )),
        1
    );
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}

#[tokio::test]
async fn a_run_survives_kill_9_between_steps_and_a_restart_of_the_server() {
    let mut server = NatsServer::start();
    let bus1 = bus(&server.url()).await;
    apply(&bus1).await;
    let mut baton = serve(&server);
    let run_id = publish_order(&bus1, "order-3", 800).await;
    wait_for(&bus1, &run_id, Duration::from_secs(20), |events| {
        events
            .iter()
            .any(|e| matches!(&e.event, RunEvent::StepRequested(r) if r.step == "a"))
    })
    .await;

    // Everything goes down while A runs: Baton, then the server; both come back.
    baton.kill();
    server.stop();
    server.restart();
    baton.restart();
    let bus2 = bus(&server.url()).await;
    let events = wait_for_end(&bus2, &run_id, Duration::from_secs(30), || baton.log()).await;
    assert!(
        matches!(
            events.last().unwrap().event,
            RunEvent::Ended(Ending::Succeeded, _)
        ),
        "{events:#?}"
    );
    assert_eq!(
        count(&events, |e| matches!(e, RunEvent::StepCompleted(_))),
        2
    );
    assert!(crate::catalogue::assert_catalogue(&bus2).await > 0);
}
