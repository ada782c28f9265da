//! Concurrency keys across runs: `queue` waits for the active run to end, `skip` ends the new run at
//! once, `cancel-previous` cancels the active run.

use std::time::Duration;

use baton_core::event::{Ending, RunEvent};
use baton_tests::{BatonProcess, NatsServer};
use serde_json::json;

use crate::saga::{apply, ending, start_run};
use crate::{bus, wait_for_end};

fn workflow(name: &str, on_conflict: &str) -> String {
    format!(
        r#"
name: {name}
inputs:
  env: {{ type: string }}
concurrency:
  key: ${{{{ .inputs.env }}}}
  limit: 1
  on-conflict: {on_conflict}
steps:
  - id: deploy
    uses: echo
    with: {{ delay_ms: 1500, env: "${{{{ .inputs.env }}}}" }}
"#
    )
}

fn first_request(events: &[baton_coordinator::service::Journaled]) -> u64 {
    events
        .iter()
        .find(|e| matches!(e.event, RunEvent::StepRequested(_)))
        .map(|e| e.seq)
        .expect("a step was requested")
}

#[tokio::test]
async fn concurrency_keys_queue_skip_or_cancel_the_previous_run() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let queue = apply(&bus, "deploy-queue", &workflow("deploy-queue", "queue")).await;
    let skip = apply(&bus, "deploy-skip", &workflow("deploy-skip", "skip")).await;
    let cancel = apply(
        &bus,
        "deploy-cancel",
        &workflow("deploy-cancel", "cancel-previous"),
    )
    .await;
    let baton = BatonProcess::start(&[
        "serve",
        "--nats-url",
        &server.url(),
        "--http",
        "127.0.0.1:0",
    ]);
    let wait = |run: String| {
        let (bus, baton) = (&bus, &baton);
        async move { wait_for_end(bus, &run, Duration::from_secs(30), || baton.log()).await }
    };

    // queue: the second prod run starts after the first ended; staging is not held up.
    let first = start_run(&bus, "deploy-queue", queue, json!({"env": "prod"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = start_run(&bus, "deploy-queue", queue, json!({"env": "prod"})).await;
    let other = start_run(&bus, "deploy-queue", queue, json!({"env": "staging"})).await;
    let (first_events, second_events, other_events) =
        (wait(first).await, wait(second).await, wait(other).await);
    assert_eq!(ending(&first_events), Some(Ending::Succeeded));
    assert_eq!(ending(&second_events), Some(Ending::Succeeded));
    assert!(
        first_request(&second_events) > first_events.last().unwrap().seq,
        "the queued run started after the first ended"
    );
    assert!(
        first_request(&other_events) < first_events.last().unwrap().seq,
        "another key is not held up"
    );

    // skip: the second run ends at once, cancelled, saying why; the first goes on.
    let first = start_run(&bus, "deploy-skip", skip, json!({"env": "prod"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = start_run(&bus, "deploy-skip", skip, json!({"env": "prod"})).await;
    let second_events = wait(second).await;
    assert_eq!(
        ending(&second_events),
        Some(Ending::Cancelled),
        "{second_events:#?}"
    );
    let RunEvent::Ended(_, end) = &second_events.last().unwrap().event else {
        unreachable!()
    };
    assert!(
        end.error.as_deref().unwrap_or("").contains("skipped"),
        "{end:?}"
    );
    assert!(
        !second_events
            .iter()
            .any(|e| matches!(e.event, RunEvent::StepRequested(_)))
    );
    assert_eq!(ending(&wait(first).await), Some(Ending::Succeeded));

    // cancel-previous: the first run is cancelled, the second runs.
    let first = start_run(&bus, "deploy-cancel", cancel, json!({"env": "prod"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = start_run(&bus, "deploy-cancel", cancel, json!({"env": "prod"})).await;
    let first_events = wait(first).await;
    assert_eq!(
        ending(&first_events),
        Some(Ending::Cancelled),
        "{first_events:#?}"
    );
    assert_eq!(ending(&wait(second).await), Some(Ending::Succeeded));
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}
