//! Guarantees that must hold beyond JetStream's duplicate windows and through transient failures:
//! a run id executes at most once however late a request or an event is re-sent, and a registry
//! that cannot be read delays a run instead of dead-lettering it.

use std::time::{Duration, Instant};

use baton_core::event::{Ending, RunEvent};
use baton_core::streams;
use baton_core::{Bus, subjects};
use baton_tests::{BatonProcess, NatsServer, free_port};
use serde_json::json;

use crate::effects::Effects;
use crate::saga::{apply, start_run};
use crate::{bus, journal, wait_for_end};

const TOKEN: &str = "a-test-token";

/// Two side effects at the effects service; also started by `com.example.once` events.
const ONCE: &str = r#"
name: once
on:
  - type: com.example.once
steps:
  - id: a
    uses: nats
    with: { subject: effects.a }
  - id: b
    uses: nats
    with: { subject: effects.b }
"#;

/// Coordinator, runners and gateway in one process, with its HTTP base URL.
fn serve(url: &str) -> (BatonProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let process = BatonProcess::start_with_env(
        &["serve", "--nats-url", url, "--http", &listen],
        &[("BATON_GATEWAY_TOKEN", TOKEN)],
    );
    (process, format!("http://{listen}"))
}

/// Makes `stream` forget message ids after one second, and waits until it has: what a re-send
/// days later looks like, without waiting days.
async fn expire_duplicate_window(bus: &Bus, stream: &str) {
    let mut config = bus
        .js
        .get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.duplicate_window = Duration::from_secs(1);
    bus.js.update_stream(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// Waits until every consumer of `stream` has been delivered and has acked everything, so that
/// what a message caused (or did not cause) is visible.
async fn wait_idle(bus: &Bus, stream: &str, consumers: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = bus.js.get_stream(stream).await.unwrap();
    'poll: loop {
        assert!(Instant::now() < deadline, "{consumers:?} did not go idle");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for name in consumers {
            let Ok(mut consumer) = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
                .await
            else {
                continue 'poll;
            };
            let info = consumer.info().await.unwrap();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                continue 'poll;
            }
        }
        return;
    }
}

fn count(events: &[baton_coordinator::service::Journaled], what: fn(&RunEvent) -> bool) -> usize {
    events.iter().filter(|e| what(&e.event)).count()
}

async fn dead_letters(bus: &Bus) -> u64 {
    let mut dlq = bus.js.get_stream(streams::DLQ).await.unwrap();
    dlq.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_or_event_re_sent_after_the_duplicate_windows_starts_nothing() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let effects = Effects::start(&server.url()).await;
    let version = apply(&bus, "once", ONCE).await;
    let (baton, base) = serve(&server.url());

    // A run requested by hand, then its request re-sent long after (a re-published dead letter,
    // a client that retried): the first executes, the second changes nothing.
    let run = start_run(&bus, "once", version, json!({})).await;
    wait_for_end(&bus, &run, Duration::from_secs(30), || baton.log()).await;
    expire_duplicate_window(&bus, streams::RUNS).await;
    let p = subjects::partition(&run, bus.partitions);
    let runs = bus.js.get_stream(streams::RUNS).await.unwrap();
    let original = runs
        .get_last_raw_message_by_subject(&format!("{}.{p}.{run}.run.requested", subjects::RUNS))
        .await
        .unwrap();
    bus.js
        .publish_with_headers(
            original.subject.to_string(),
            original.headers.clone(),
            original.payload.clone(),
        )
        .await
        .unwrap()
        .await
        .expect("stored again: the duplicate window is over");
    wait_idle(&bus, streams::RUNS, &[format!("coordinator-{p}")]).await;
    let events = journal(&bus, &run).await;
    assert_eq!(
        count(&events, |e| matches!(e, RunEvent::Requested(_))),
        2,
        "both requests are in the journal"
    );
    assert_eq!(
        count(&events, |e| matches!(e, RunEvent::Ended(..))),
        1,
        "{events:#?}\n{}",
        baton.log()
    );
    assert_eq!(
        effects.calls().len(),
        2,
        "each step executed once: {:?}",
        effects.calls()
    );

    // An event delivered over HTTP, then again after BATON_EVENTS forgot its id (GitHub's
    // "Redeliver", an Alertmanager resend): one run.
    let http = reqwest::Client::new();
    let event = json!({
        "specversion": "1.0", "id": "delivery-1", "source": "test/guarantees",
        "type": "com.example.once", "data": {}
    });
    let post = || {
        http.post(format!("{base}/events"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while post().await.map(|r| r.status().as_u16()).ok() != Some(202) {
        assert!(
            Instant::now() < deadline,
            "the gateway did not accept the event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let triggered = baton_core::event::triggered_run_id("once", "test/guarantees", "delivery-1");
    wait_for_end(&bus, &triggered, Duration::from_secs(30), || baton.log()).await;
    expire_duplicate_window(&bus, streams::EVENTS).await;
    expire_duplicate_window(&bus, streams::RUNS).await;
    assert_eq!(post().await.unwrap().status(), 202);
    wait_idle(&bus, streams::EVENTS, &["triggers".into()]).await;
    let p = subjects::partition(&triggered, bus.partitions);
    wait_idle(&bus, streams::RUNS, &[format!("coordinator-{p}")]).await;
    let events = journal(&bus, &triggered).await;
    assert_eq!(
        count(&events, |e| matches!(e, RunEvent::Requested(_))),
        2,
        "the trigger requested the same run id again"
    );
    assert_eq!(
        count(&events, |e| matches!(
            e,
            RunEvent::Ended(Ending::Succeeded, _)
        )),
        1,
        "{events:#?}"
    );
    assert_eq!(effects.calls().len(), 4, "{:?}", effects.calls());

    // The original requests delivered again long after their runs ended (an ack lost while a
    // node stalled): the coordinators' consumers are recreated, so every message of the journal
    // comes again with its own sequence.
    let mut baton = baton;
    baton.kill();
    let stream = bus.js.get_stream(streams::RUNS).await.unwrap();
    let coordinators: Vec<String> = (0..bus.partitions)
        .map(|p| format!("coordinator-{p}"))
        .collect();
    for name in &coordinators {
        stream.delete_consumer(name).await.unwrap();
    }
    baton.restart();
    wait_idle(&bus, streams::RUNS, &coordinators).await;
    for id in [&run, &triggered] {
        let events = journal(&bus, id).await;
        assert_eq!(
            count(&events, |e| matches!(e, RunEvent::Ended(..))),
            1,
            "{events:#?}\n{}",
            baton.log()
        );
    }
    assert_eq!(effects.calls().len(), 4, "{:?}", effects.calls());
    assert_eq!(dead_letters(&bus).await, 0);
}

/// Every client connects as `baton`; with `deny_registry`, its reads of the workflow registry are
/// refused, so they time out as they do while a cluster elects the registry's leader.
fn config(deny_registry: bool) -> String {
    let deny = if deny_registry {
        r#"permissions: { publish: { deny: ["$JS.API.DIRECT.GET.KV_baton-workflows.>", "$JS.API.STREAM.MSG.GET.KV_baton-workflows"] } }"#
    } else {
        ""
    };
    format!(
        "authorization {{ users = [ {{ user: baton, password: baton, {deny} }} ] }}\nno_auth_user: baton\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_cannot_be_read_delays_runs_and_dead_letters_nothing() {
    let mut server = NatsServer::with_config(&config(false));
    let bus = bus(&server.url()).await;
    let effects = Effects::start(&server.url()).await;
    let (baton, _) = serve(&server.url());
    // Registry reads fail before the coordinator ever read the workflow (no cached copy).
    let version = apply(&bus, "once", ONCE).await;
    server.reload(&config(true));
    let run = start_run(&bus, "once", version, json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // The coordinator retries (a redelivered request, or a partition rebuild if it takes the
    // partition now), and says why.
    while !baton
        .log()
        .contains("workflow registry (KV bucket baton-workflows) is not reachable")
    {
        assert!(
            Instant::now() < deadline,
            "no retry logged:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead_letters(&bus).await, 0, "{}", baton.log());
    assert!(effects.calls().is_empty());

    // The registry answers again: the same run goes on, once.
    server.reload(&config(false));
    let events = wait_for_end(&bus, &run, Duration::from_secs(60), || baton.log()).await;
    assert!(
        matches!(
            events.last().map(|e| &e.event),
            Some(RunEvent::Ended(Ending::Succeeded, _))
        ),
        "{events:#?}"
    );
    assert_eq!(effects.calls().len(), 2);
    assert_eq!(dead_letters(&bus).await, 0);
}
