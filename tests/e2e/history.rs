//! Run history from the journal: `baton runs list`, `baton runs events`, and `baton runs why` for
//! each reason a run can be waiting.

use std::time::{Duration, Instant};

use baton_core::event::RunEvent;
use baton_core::streams;
use baton_tests::{BatonProcess, NatsServer, baton_command, free_port};
use serde_json::{Value, json};

use crate::saga::{apply, start_run};
use crate::{bus, journal, wait_for_end};

const WAITING: &str = r#"
name: why-demo
steps:
  - id: slow
    uses: echo
    with: { delay_ms: 120000 }
  - id: orphan
    uses: service/nobody
    needs: []
  - id: verified
    uses: wait
    needs: []
    with:
      event: com.example.verified
      key: ${{ .run.id }}
      event-key: ${{ .data.id }}
      timeout: 1h
  - id: sign-off
    uses: approval
    needs: []
    with: { message: "Ship it?", approvers: [alice] }
  - id: flaky
    uses: echo
    needs: []
    with: { fail: boom, retryable: true }
    retry: { attempts: 3, initial-delay: 1h }
"#;

const QUEUED: &str = r#"
name: one-at-a-time
concurrency: { key: "all", limit: 1, on-conflict: queue }
steps:
  - id: hold
    uses: echo
    with: { delay_ms: 120000 }
"#;

fn cli(url: &str, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["--nats-url", url]);
    let (ok, out, err) = baton_command(&all, &[]);
    assert!(ok, "baton {args:?}: {out}{err}");
    out
}

fn serve(url: &str) -> BatonProcess {
    BatonProcess::start(&[
        "serve",
        "--nats-url",
        url,
        "--http",
        &format!("127.0.0.1:{}", free_port()),
    ])
}

#[tokio::test]
async fn runs_why_names_every_reason_a_run_waits() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let version = apply(&bus, "why-demo", WAITING).await;
    let queued_version = apply(&bus, "one-at-a-time", QUEUED).await;
    let baton = serve(&url);
    let run = start_run(&bus, "why-demo", version, json!({})).await;

    // Until every step is where the test wants it.
    let waits = bus.js.get_key_value(streams::WAITS_BUCKET).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = journal(&bus, &run).await;
        let started = events
            .iter()
            .any(|e| matches!(&e.event, RunEvent::StepStarted(a) if a.step == "slow"));
        let backing_off = events
            .iter()
            .any(|e| matches!(&e.event, RunEvent::TimerScheduled(t) if t.name() == "retry-flaky"));
        let waiting = matches!(waits.get(format!("{run}.verified")).await, Ok(Some(_)))
            && matches!(waits.get(format!("{run}.sign-off")).await, Ok(Some(_)));
        if started && backing_off && waiting {
            break;
        }
        assert!(Instant::now() < deadline, "{events:#?}\n{}", baton.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let why = cli(&url, &["runs", "why", &run]);
    let expect = |needle: &str| assert!(why.contains(needle), "missing {needle:?} in:\n{why}");
    expect(&format!("Run {run} (why-demo v{version}) is running since"));
    expect("step slow (kind echo, attempt 1): running on runner-");
    expect("step orphan (kind nobody, attempt 1): requested");
    expect("no runner of kind nobody has ever subscribed");
    expect(&format!(
        "step verified (wait): an event of type com.example.verified whose key equals \"{run}\", since"
    ));
    expect("; it times out at");
    expect("step sign-off (approval): a decision by alice, since");
    expect(&format!("`baton approve {run} sign-off`"));
    expect("step flaky: attempt 1 failed (boom); attempt 2 at");
    expect("(backing off)");

    // A place in a concurrency queue.
    let first = start_run(&bus, "one-at-a-time", queued_version, json!({})).await;
    crate::wait_for(&bus, &first, Duration::from_secs(20), |events| {
        events
            .iter()
            .any(|e| matches!(&e.event, RunEvent::StepStarted(_)))
    })
    .await;
    let second = start_run(&bus, "one-at-a-time", queued_version, json!({})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let why = cli(&url, &["runs", "why", &second]);
    assert!(
        why.contains(&format!(
            "a place in the queue of its concurrency key (limit 1), held by run(s) {first}"
        )),
        "{why}"
    );

    // An ended run waits for nothing.
    cli(&url, &["runs", "cancel", &first]);
    wait_for_end(&bus, &first, Duration::from_secs(20), || baton.log()).await;
    let why = cli(&url, &["runs", "why", &first]);
    assert!(
        why.contains("has ended (cancelled): it waits for nothing"),
        "{why}"
    );
}

#[tokio::test]
async fn runs_list_filters_and_runs_events_prints_the_journal() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let ok = apply(
        &bus,
        "fine",
        "name: fine\nsteps:\n  - id: a\n    uses: echo\n",
    )
    .await;
    let bad = apply(
        &bus,
        "broken",
        "name: broken\nsteps:\n  - id: a\n    uses: echo\n    with: { fail: no }\n",
    )
    .await;
    let baton = serve(&url);
    let mut runs = Vec::new();
    for (name, version) in [("fine", ok), ("fine", ok), ("broken", bad)] {
        let run = start_run(&bus, name, version, json!({})).await;
        wait_for_end(&bus, &run, Duration::from_secs(20), || baton.log()).await;
        runs.push(run);
    }

    let all = cli(&url, &["runs", "list"]);
    assert_eq!(all.lines().count(), 4, "a header and three runs:\n{all}");
    let fine = cli(&url, &["runs", "list", "--workflow", "fine"]);
    assert!(
        fine.contains(&runs[0]) && fine.contains(&runs[1]) && !fine.contains(&runs[2]),
        "{fine}"
    );
    assert_eq!(fine.matches(" succeeded ").count(), 2, "{fine}");
    let failed = cli(
        &url,
        &["runs", "list", "--status", "failed", "--since", "1h"],
    );
    assert!(
        failed.contains(&runs[2]) && failed.lines().count() == 2,
        "{failed}"
    );
    let newest = cli(&url, &["runs", "list", "--limit", "1"]);
    assert!(
        newest.contains(&runs[2]) && newest.lines().count() == 2,
        "{newest}"
    );
    let (fails, _, err) = baton_command(
        &["runs", "list", "--status", "done", "--nats-url", &url],
        &[],
    );
    assert!(!fails && err.contains("is not a status"), "{err}");

    let printed = cli(&url, &["runs", "events", &runs[0]]);
    let events: Vec<Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), journal(&bus, &runs[0]).await.len());
    assert_eq!(events[0]["type"], "dev.baton.run.requested");
    assert_eq!(events[0]["specversion"], "1.0");
    assert_eq!(events.last().unwrap()["type"], "dev.baton.run.succeeded");
}
