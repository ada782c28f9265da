//! A service built with the SDK against a real nats-server, driven by step and compensation
//! requests published the way the coordinator publishes them: what it stores, with which ids and
//! trace, and a request taken over by another instance after the first one stopped mid-step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::event::{RunEvent, StepRequested};
use baton_core::shutdown::CancellationToken;
use baton_core::streams::Topology;
use baton_core::trace::Trace;
use baton_core::{Bus, binding, event};
use baton_sdk::{Service, StepError};
use baton_tests::NatsServer;
use cloudevents::AttributesReader;
use futures::StreamExt;
use serde_json::{Value, json};

const KIND: &str = "inventory-sdk";

async fn bus(url: &str) -> Bus {
    baton_core::connect(url, "sdk-test", &Topology::default())
        .await
        .unwrap()
}

fn request(run: &str, step: &str, attempt: u32, input: Value, compensation: bool) -> RunEvent {
    let key = if compensation {
        format!("{run}/{step}/compensate")
    } else {
        format!("{run}/{step}")
    };
    let r = StepRequested {
        run_id: run.into(),
        step: step.into(),
        item: None,
        items: None,
        kind: KIND.into(),
        attempt,
        input,
        idempotency_key: key,
        secrets: Vec::new(),
        timeout_ms: None,
    };
    if compensation {
        RunEvent::CompensationRequested(r)
    } else {
        RunEvent::StepRequested(r)
    }
}

/// Calls seen by the service: (key, attempt, delivered, compensation).
type Calls = Arc<Mutex<Vec<(String, u32, i64, bool)>>>;

fn service(instance: &str, calls: Calls, hang: bool) -> Service {
    let undo = calls.clone();
    Service::new(KIND)
        .instance(instance)
        .ack_wait(Duration::from_secs(2))
        .handler(move |input, ctx| {
            let calls = calls.clone();
            async move {
                calls.lock().unwrap().push((
                    ctx.idempotency_key().into(),
                    ctx.attempt(),
                    ctx.delivered(),
                    false,
                ));
                if hang {
                    ctx.cancelled().await;
                    return Err(StepError::retryable("stopped"));
                }
                if input["sku"] == "gone" {
                    return Err(StepError::permanent("no such sku").with_code("unknown-sku"));
                }
                Ok(json!({"reserved": input["sku"], "run": ctx.run_id(), "step": ctx.step()}))
            }
        })
        .compensate(move |input, ctx| {
            let calls = undo.clone();
            async move {
                calls.lock().unwrap().push((
                    ctx.idempotency_key().into(),
                    ctx.attempt(),
                    ctx.delivered(),
                    ctx.is_compensation(),
                ));
                Ok(json!({"released": input["sku"]}))
            }
        })
}

/// Waits for the events of `run` on `verb` subjects (`completed`, `compensated` ...), as published.
async fn next_event(
    sub: &mut async_nats::Subscriber,
    verb: &str,
) -> (async_nats::Message, baton_core::Event) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no {verb} event"))
            .unwrap();
        if m.subject.ends_with(&format!(".{verb}")) {
            let ce = binding::decode(m.headers.as_ref(), &m.payload).unwrap();
            return (m, ce);
        }
    }
}

#[tokio::test]
async fn outcomes_are_stored_with_the_requests_trace_and_deterministic_ids() {
    use baton_core::event::types;

    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let calls = Calls::default();
    let shutdown = CancellationToken::new();
    let svc =
        tokio::spawn(service("inv-1", calls.clone(), false).run(bus.clone(), shutdown.clone()));
    let run = event::new_run_id();
    let mut sub = bus
        .client
        .subscribe(format!("baton.run.*.{run}.>"))
        .await
        .unwrap();
    let trace = Trace::parse(
        &["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        &["vendor=abc"],
    )
    .unwrap();

    // A quick attempt is not announced (`step.started` comes only after 1 s): its outcome is next.
    let reserve = request(&run, "reserve", 1, json!({"sku": "a-1"}), false);
    bus.store("baton/test", [(&reserve, &trace)]).await.unwrap();
    let (m, done) = next_event(&mut sub, "completed").await;
    let id = format!("{run}.reserve.1.outcome");
    assert_eq!(done.id(), id);
    assert_eq!(done.ty(), types::STEP_COMPLETED);
    assert_eq!(done.subject(), Some(format!("{run}/reserve").as_str()));
    let headers = m.headers.as_ref().unwrap();
    assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), id);
    assert_eq!(
        headers.get("ce-traceparent").unwrap().as_str(),
        trace.traceparent(),
        "the outcome carries the request's trace"
    );
    assert_eq!(headers.get("ce-tracestate").unwrap().as_str(), "vendor=abc");
    let data = event::event_data(&done).unwrap();
    assert_eq!(
        data["output"],
        json!({"reserved": "a-1", "run": run, "step": "reserve"})
    );
    assert_eq!(
        (data["kind"].clone(), data["runner"].clone()),
        (json!(KIND), json!("inv-1"))
    );

    let gone = request(&run, "other", 1, json!({"sku": "gone"}), false);
    bus.store("baton/test", [(&gone, &trace)]).await.unwrap();
    let (_, failed) = next_event(&mut sub, "failed").await;
    assert_eq!(failed.id(), format!("{run}.other.1.outcome"));
    let data = event::event_data(&failed).unwrap();
    assert_eq!(
        data["error"],
        json!({"message": "no such sku", "retryable": false, "code": "unknown-sku"})
    );

    let release = request(&run, "reserve", 1, json!({"sku": "a-1"}), true);
    bus.store("baton/test", [(&release, &trace)]).await.unwrap();
    let (m, undone) = next_event(&mut sub, "compensated").await;
    assert_eq!(undone.ty(), types::COMPENSATION_COMPLETED);
    assert_eq!(undone.id(), format!("{run}.reserve.c1.outcome"));
    assert!(
        m.subject
            .ends_with(&format!(".{run}.step.{KIND}.compensated"))
    );
    assert_eq!(
        event::event_data(&undone).unwrap()["output"],
        json!({"released": "a-1"})
    );

    let seen: Vec<(String, bool)> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| (c.0.clone(), c.3))
        .collect();
    assert_eq!(
        seen,
        [
            (format!("{run}/reserve"), false),
            (format!("{run}/other"), false),
            (format!("{run}/reserve/compensate"), true)
        ]
    );
    shutdown.cancel();
    svc.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_request_left_by_a_stopped_instance_is_executed_again_by_another_with_the_same_key() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let calls = Calls::default();
    let first_stop = CancellationToken::new();
    let first =
        tokio::spawn(service("inv-1", calls.clone(), true).run(bus.clone(), first_stop.clone()));
    let run = event::new_run_id();
    let mut sub = bus
        .client
        .subscribe(format!("baton.run.*.{run}.>"))
        .await
        .unwrap();
    let reserve = request(&run, "reserve", 1, json!({"sku": "b-2"}), false);
    bus.store("baton/test", [(&reserve, &Trace::new())])
        .await
        .unwrap();
    next_event(&mut sub, "started").await;
    while calls.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Stops mid-step (SIGTERM): the handler is cancelled, nothing is stored, nothing acked.
    first_stop.cancel();
    first.await.unwrap().unwrap();

    let stop = CancellationToken::new();
    let second =
        tokio::spawn(service("inv-2", calls.clone(), false).run(bus.clone(), stop.clone()));
    let (_, done) = next_event(&mut sub, "completed").await;
    let data = event::event_data(&done).unwrap();
    assert_eq!(data["runner"], "inv-2");
    assert_eq!(done.id().to_string(), format!("{run}.reserve.1.outcome"));
    let calls: HashMap<i64, (String, u32)> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|(key, attempt, delivered, _)| (*delivered, (key.clone(), *attempt)))
        .collect();
    let key = format!("{run}/reserve");
    assert_eq!(
        calls,
        HashMap::from([(1, (key.clone(), 1)), (2, (key, 1))]),
        "the same attempt, the same key, delivered again"
    );
    stop.cancel();
    second.await.unwrap().unwrap();
}
