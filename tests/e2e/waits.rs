//! `wait` steps against real processes: a correlated CloudEvent published on `baton.events.>`
//! completes the wait (another key does not), and the timeout fails it or, with `expect: timeout`,
//! completes it.

use std::time::{Duration, Instant};

use baton_coordinator::service::Journaled;
use baton_core::event::{Ending, RunEvent};
use baton_core::{Bus, binding, streams};
use baton_tests::{BatonProcess, NatsServer};
use cloudevents::{EventBuilder, EventBuilderV10};
use serde_json::{Value, json};

use crate::saga::{apply, ending, start_run};
use crate::{bus, journal, wait_for_end};

const TYPE: &str = "com.example.deploy.verified";

fn workflow(name: &str, expect: &str, timeout: &str) -> String {
    format!(
        r#"
name: {name}
inputs:
  id: {{ type: string }}
steps:
  - id: verified
    uses: wait
    with:
      event: {TYPE}
      source: "ci/*"
      key: ${{{{ .inputs.id }}}}
      event-key: ${{{{ .data.id }}}}
      timeout: {timeout}
      expect: {expect}
  - id: report
    uses: echo
    with: {{ status: "${{{{ .steps.verified.outputs.event.data.status }}}}" }}
outputs:
  status: ${{{{ .steps.report.outputs.status }}}}
"#
    )
}

fn serve(url: &str) -> BatonProcess {
    BatonProcess::start(&["serve", "--nats-url", url, "--http", "127.0.0.1:0"])
}

/// Publishes a binary-mode CloudEvent on `baton.events.test` and waits for it to be stored.
async fn publish(bus: &Bus, id: &str, data: Value) {
    let event = EventBuilderV10::new()
        .id(id)
        .source("ci/verifier")
        .ty(TYPE)
        .data("application/json", data)
        .build()
        .unwrap();
    let (headers, body) = binding::encode(&event);
    bus.js
        .publish_with_headers("baton.events.test", headers, body)
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Waits until the run's wait step is stored in the bucket: only later events can match it.
async fn wait_until_waiting(bus: &Bus, run_id: &str, log: impl Fn() -> String) {
    let waits = bus.js.get_key_value(streams::WAITS_BUCKET).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(waits.get(format!("{run_id}.verified")).await, Ok(Some(_))) {
        assert!(
            Instant::now() < deadline,
            "the wait was not stored\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn outcome(events: &[Journaled], step: &str) -> Option<RunEvent> {
    events.iter().find_map(|e| match &e.event {
        RunEvent::StepCompleted(c) if c.step == step => Some(e.event.clone()),
        RunEvent::StepFailed(f) if f.step == step => Some(e.event.clone()),
        _ => None,
    })
}

fn ended(events: &[Journaled]) -> (Option<Ending>, Value, String) {
    events
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            RunEvent::Ended(ending, end) => Some((
                Some(*ending),
                end.output.clone(),
                end.error.clone().unwrap_or_default(),
            )),
            _ => None,
        })
        .unwrap_or((None, Value::Null, String::new()))
}

#[tokio::test]
async fn a_correlated_event_completes_the_wait() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let version = apply(
        &bus,
        "verify-deploy",
        &workflow("verify-deploy", "event", "30s"),
    )
    .await;
    let baton = serve(&server.url());
    let run = start_run(&bus, "verify-deploy", version, json!({"id": "d-1"})).await;
    wait_until_waiting(&bus, &run, || baton.log()).await;

    // Another deployment's event does not complete this wait.
    publish(&bus, "e-other", json!({"id": "d-2", "status": "red"})).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        outcome(&journal(&bus, &run).await, "verified").is_none(),
        "an event with another key completed the wait\n{}",
        baton.log()
    );

    publish(&bus, "e-mine", json!({"id": "d-1", "status": "green"})).await;
    let events = wait_for_end(&bus, &run, Duration::from_secs(20), || baton.log()).await;
    let (end, output, error) = ended(&events);
    assert_eq!(end, Some(Ending::Succeeded), "{error}\n{}", baton.log());
    assert_eq!(output, json!({"status": "green"}));
    let Some(RunEvent::StepCompleted(c)) = outcome(&events, "verified") else {
        panic!("the wait did not complete: {events:#?}")
    };
    assert_eq!(c.output["event"]["id"], "e-mine");
    assert_eq!(c.output["event"]["type"], TYPE);
    assert_eq!(
        c.output["event"]["data"],
        json!({"id": "d-1", "status": "green"})
    );
    // Matched once: the entry is gone.
    let waits = bus.js.get_key_value(streams::WAITS_BUCKET).await.unwrap();
    assert!(matches!(
        waits.get(format!("{run}.verified")).await,
        Ok(None)
    ));
}

#[tokio::test]
async fn the_timeout_fails_or_completes_the_wait() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let quiet = apply(&bus, "stay-quiet", &workflow("stay-quiet", "timeout", "1s")).await;
    let strict = apply(&bus, "must-hear", &workflow("must-hear", "event", "1s")).await;
    let canary = apply(&bus, "canary", &workflow("canary", "timeout", "30s")).await;
    let baton = serve(&server.url());
    let wait = |run: String| {
        let (bus, baton) = (&bus, &baton);
        async move { wait_for_end(bus, &run, Duration::from_secs(20), || baton.log()).await }
    };

    let quiet_run = start_run(&bus, "stay-quiet", quiet, json!({"id": "q"})).await;
    let strict_run = start_run(&bus, "must-hear", strict, json!({"id": "s"})).await;
    let canary_run = start_run(&bus, "canary", canary, json!({"id": "c"})).await;

    // expect: timeout, and nothing came: completed with a null event.
    let events = wait(quiet_run).await;
    let (end, output, error) = ended(&events);
    assert_eq!(end, Some(Ending::Succeeded), "{error}\n{}", baton.log());
    assert_eq!(output, json!({ "status": null }));
    // The timer itself completed it: no outcome event.
    assert!(outcome(&events, "verified").is_none(), "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, RunEvent::TimerFired(t) if t.name() == "timeout-verified"))
    );

    // expect: event, and nothing came: the run fails with a timeout.
    let events = wait(strict_run).await;
    let (end, _, error) = ended(&events);
    assert_eq!(end, Some(Ending::Failed), "{}", baton.log());
    assert!(error.contains("timed out"), "{error}");

    // expect: timeout, and the event came: the step fails with `event-received`.
    wait_until_waiting(&bus, &canary_run, || baton.log()).await;
    publish(&bus, "e-alert", json!({"id": "c", "status": "alert"})).await;
    let events = wait(canary_run).await;
    assert_eq!(ending(&events), Some(Ending::Failed), "{}", baton.log());
    let Some(RunEvent::StepFailed(f)) = outcome(&events, "verified") else {
        panic!("{events:#?}")
    };
    assert_eq!(f.error.code.as_deref(), Some("event-received"));
    assert!(!f.error.retryable);
}

const PROMOTE: &str = r#"
name: promote
inputs:
  image: { type: string }
steps:
  - id: sign-off
    uses: approval
    with:
      message: "Promote ${{ .inputs.image }}?"
      approvers: [alice, bob]
      timeout: 1h
  - id: promote
    uses: echo
    with: { image: "${{ .inputs.image }}", by: "${{ .steps[\"sign-off\"].outputs.by }}" }
outputs:
  by: ${{ .steps.promote.outputs.by }}
"#;

/// Waits until an approval step is waiting (its entry is in the bucket).
async fn wait_until_approval(bus: &Bus, run_id: &str, log: impl Fn() -> String) {
    let waits = bus.js.get_key_value(streams::WAITS_BUCKET).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(waits.get(format!("{run_id}.sign-off")).await, Ok(Some(_))) {
        assert!(
            Instant::now() < deadline,
            "the approval is not waiting\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn approval_steps_wait_for_an_approver_by_cli_or_event() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let version = apply(&bus, "promote", PROMOTE).await;
    let baton = serve(&url);

    // Approved with `baton approve`, by an approver only.
    let run = start_run(&bus, "promote", version, json!({"image": "web:1.4"})).await;
    wait_until_approval(&bus, &run, || baton.log()).await;
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--nats-url", &url]);
        baton_tests::baton_command(&all, &[])
    };
    let (ok, _, err) = cli(&["approve", &run, "sign-off", "--by", "mallory"]);
    assert!(
        !ok && err.contains("mallory may not decide step sign-off: its approvers are alice, bob"),
        "{err}"
    );
    let (ok, _, err) = cli(&["approve", &run, "nope", "--by", "alice"]);
    assert!(!ok && err.contains("not waiting for an approval"), "{err}");
    let (ok, out, err) = cli(&[
        "approve",
        &run,
        "sign-off",
        "--by",
        "alice",
        "--comment",
        "lgtm",
    ]);
    assert!(ok, "{out}{err}");
    let events = wait_for_end(&bus, &run, Duration::from_secs(20), || baton.log()).await;
    let (end, output, error) = ended(&events);
    assert_eq!(end, Some(Ending::Succeeded), "{error}\n{}", baton.log());
    assert_eq!(output, json!({"by": "alice"}));
    let Some(RunEvent::StepCompleted(c)) = outcome(&events, "sign-off") else {
        panic!("{events:#?}")
    };
    assert_eq!(
        c.output,
        json!({"approved": true, "by": "alice", "comment": "lgtm"})
    );
    assert_eq!(c.kind, "approval");

    // Rejected by an event from elsewhere (a chat bot, say); one from a non-approver is ignored.
    let run = start_run(&bus, "promote", version, json!({"image": "web:1.5"})).await;
    wait_until_approval(&bus, &run, || baton.log()).await;
    for (id, by) in [("d-1", "mallory"), ("d-2", "bob")] {
        let decision = EventBuilderV10::new()
            .id(id)
            .source("chatops/bot")
            .ty("dev.baton.approval.decided")
            .subject(format!("{run}/sign-off"))
            .data(
                "application/json",
                json!({"run_id": run, "step": "sign-off", "approved": false, "by": by, "comment": "not on a Friday"}),
            )
            .build()
            .unwrap();
        let (headers, body) = binding::encode(&decision);
        bus.js
            .publish_with_headers("baton.events.chatops", headers, body)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let events = wait_for_end(&bus, &run, Duration::from_secs(20), || baton.log()).await;
    let (end, _, error) = ended(&events);
    assert_eq!(end, Some(Ending::Failed), "{}", baton.log());
    assert!(
        error.contains("rejected by bob: not on a Friday"),
        "{error}"
    );
    let Some(RunEvent::StepFailed(f)) = outcome(&events, "sign-off") else {
        panic!("{events:#?}")
    };
    assert_eq!(f.error.code.as_deref(), Some("rejected"));
}
