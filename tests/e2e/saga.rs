//! The saga engine against real processes: compensation in reverse order, a compensation that fails
//! for good and is retried by hand, and runs that survive kill -9 of a coordinator or a runner, the
//! loss of one of two coordinators, and the loss of a node of a 3-node cluster. Side effects go
//! through a real NATS service (`effects`) that counts them by idempotency key.

use std::time::{Duration, Instant};

use baton_core::event::{self, Ending, RunEvent, RunRequested, WorkflowRef};
use baton_core::registry::Registry;
use baton_core::streams::Topology;
use baton_core::{Bus, streams};
use baton_tests::{BatonProcess, Cluster, NatsServer, baton_command};
use futures::future::join_all;

use crate::effects::Effects;
use crate::{bus, journal, wait_for_end};

/// one -> two -> three; three fails after its retries, and two's compensation retries three times.
const THREE_STEPS: &str = r#"
name: saga-three
steps:
  - id: one
    uses: nats
    with: { subject: effects.one, body: { run: "${{ .run.id }}" } }
    compensate:
      uses: nats
      with: { subject: effects.undo-one }
  - id: two
    uses: nats
    with: { subject: effects.two }
    compensate:
      uses: nats
      with: { subject: effects.undo-two }
      retry: { attempts: 3, backoff: constant, initial-delay: 200ms }
  - id: three
    uses: echo
    with: { fail: "the card was declined", retryable: true }
    retry: { attempts: 3, backoff: constant, initial-delay: 200ms }
    compensate:
      uses: nats
      with: { subject: effects.undo-three }
"#;

/// a -> b -> c, each a side effect that takes `delay` ms.
const CHAIN: &str = r#"
name: chain
inputs:
  delay: { type: integer, default: 300 }
steps:
  - id: a
    uses: nats
    with: { subject: effects.a, body: { delay_ms: "${{ .inputs.delay }}" } }
  - id: b
    uses: nats
    with: { subject: effects.b, body: { delay_ms: "${{ .inputs.delay }}" } }
  - id: c
    uses: nats
    with: { subject: effects.c, body: { delay_ms: "${{ .inputs.delay }}" } }
outputs:
  last: ${{ .steps.c.outputs.op }}
"#;

pub async fn apply(bus: &Bus, name: &str, source: &str) -> u64 {
    let registry = Registry::open(&bus.js).await.unwrap();
    registry.apply(name, source, vec![]).await.unwrap().0
}

/// Publishes `run.requested` and returns the run id once it is stored.
pub async fn start_run(bus: &Bus, name: &str, version: u64, input: serde_json::Value) -> String {
    let run_id = event::new_run_id();
    let request = RunEvent::Requested(RunRequested {
        run_id: run_id.clone(),
        workflow: WorkflowRef {
            name: name.into(),
            version,
        },
        input,
        trigger: None,
        parent: None,
    });
    let trace = baton_core::trace::Trace::new();
    bus.store("baton/test", [(&request, &trace)]).await.unwrap();
    run_id
}

pub fn ending(events: &[baton_coordinator::service::Journaled]) -> Option<Ending> {
    events.iter().rev().find_map(|e| match &e.event {
        RunEvent::Ended(ending, _) => Some(*ending),
        _ => None,
    })
}

fn coordinator(url: &str, extra: &[&str]) -> BatonProcess {
    let mut args = vec!["coordinator", "--nats-url", url, "--takeover-after", "2"];
    args.extend_from_slice(extra);
    BatonProcess::start(&args)
}

fn runner(url: &str, extra: &[&str]) -> BatonProcess {
    let mut args = vec!["runner", "--nats-url", url, "--ack-wait", "2"];
    args.extend_from_slice(extra);
    BatonProcess::start(&args)
}

/// Every side effect was applied exactly once per key, and every run's steps are all applied.
fn assert_each_effect_once(effects: &Effects, runs: &[String], steps: &[&str]) {
    let applied = effects.applied();
    let mut keys: Vec<&String> = applied.iter().map(|(_, k)| k).collect();
    keys.sort();
    let before = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), before, "a key was applied twice");
    for run in runs {
        for step in steps {
            let key = format!("{run}/{step}");
            assert_eq!(
                applied.iter().filter(|(_, k)| *k == key).count(),
                1,
                "side effect {key} happened once"
            );
        }
    }
    assert_eq!(
        applied.len(),
        runs.len() * steps.len(),
        "no other side effect"
    );
}

/// Waits until every run has ended and returns how each ended.
async fn wait_all(bus: &Bus, runs: &[String], timeout: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    for run in runs {
        let left = deadline.saturating_duration_since(Instant::now());
        let events = wait_for_end(bus, run, left, &log).await;
        assert_eq!(
            ending(&events),
            Some(Ending::Succeeded),
            "run {run}: {events:#?}"
        );
        for step in ["a", "b", "c"] {
            let outcomes = events
                .iter()
                .filter(|e| matches!(&e.event, RunEvent::StepCompleted(c) if c.step == step))
                .count();
            assert_eq!(outcomes, 1, "run {run}: step {step} completed once");
        }
    }
}

#[tokio::test]
async fn a_run_whose_third_step_fails_compensates_two_then_one_and_ends_compensated() {
    let server = NatsServer::start();
    let bus = bus(&server.url()).await;
    let effects = Effects::start(&server.url()).await;
    let version = apply(&bus, "saga-three", THREE_STEPS).await;
    let _baton = BatonProcess::start(&[
        "serve",
        "--nats-url",
        &server.url(),
        "--http",
        "127.0.0.1:0",
    ]);
    let run = start_run(&bus, "saga-three", version, serde_json::json!({})).await;
    let events = wait_for_end(&bus, &run, Duration::from_secs(30), || _baton.log()).await;
    assert_eq!(ending(&events), Some(Ending::Compensated), "{events:#?}");

    // Three was tried three times, with a durable backoff timer before each retry.
    let attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match &e.event {
            RunEvent::StepFailed(f) if f.step == "three" => Some(f.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let fired = events
        .iter()
        .filter(|e| matches!(&e.event, RunEvent::TimerFired(_)))
        .count();
    assert_eq!(fired, 2, "two retry timers fired");

    // The plan and the compensations: two, then one; three never completed, so it is not undone.
    let plan = events.iter().find_map(|e| match &e.event {
        RunEvent::Compensating(c) => Some(c.plan.clone()),
        _ => None,
    });
    assert_eq!(plan, Some(vec!["two".to_owned(), "one".to_owned()]));
    let undone: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event {
            RunEvent::CompensationCompleted(c) => Some(c.step.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(undone, ["two", "one"]);
    let applied: Vec<String> = effects.applied().into_iter().map(|(op, _)| op).collect();
    assert_eq!(applied, ["one", "two", "undo-two", "undo-one"]);
    // The compensation's key is its own, stable one.
    assert!(
        effects
            .applied()
            .iter()
            .any(|(_, k)| *k == format!("{run}/two/compensate"))
    );
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_ends_compensation_failed_with_a_dead_letter_and_can_be_retried()
 {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let effects = Effects::start(&url).await;
    effects.set_failing("undo-two", true);
    let version = apply(&bus, "saga-three", THREE_STEPS).await;
    let baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let run = start_run(&bus, "saga-three", version, serde_json::json!({})).await;
    let events = wait_for_end(&bus, &run, Duration::from_secs(30), || baton.log()).await;
    assert_eq!(
        ending(&events),
        Some(Ending::CompensationFailed),
        "{events:#?}"
    );
    let failures = events
        .iter()
        .filter(|e| matches!(&e.event, RunEvent::CompensationFailed(f) if f.step == "two"))
        .count();
    assert_eq!(failures, 3, "the compensation has its own retries");
    assert!(
        !effects.applied().iter().any(|(op, _)| op == "undo-one"),
        "one is not undone before two"
    );

    // The failure is a dead letter, which says which run and step and why.
    let dlq = bus.js.get_stream(streams::DLQ).await.unwrap();
    let letter = dlq
        .get_last_raw_message_by_subject("baton.dlq.coordinator")
        .await
        .expect("a dead letter from the coordinator");
    let text = String::from_utf8_lossy(&letter.payload).into_owned();
    assert!(
        text.contains("compensation of step two failed after 3 attempt(s)"),
        "{text}"
    );

    // `baton runs show` says so and tells how to retry; the retry, once the service is fixed,
    // undoes two and then one.
    let (ok, out, err) = baton_command(&["runs", "show", &run, "--nats-url", &url], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("status    compensation_failed"), "{out}");
    assert!(out.contains("baton runs retry-compensation"), "{out}");
    effects.set_failing("undo-two", false);
    let (ok, out, err) = baton_command(
        &["runs", "retry-compensation", &run, "--nats-url", &url],
        &[],
    );
    assert!(ok, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = journal(&bus, &run).await;
        if ending(&events) == Some(Ending::Compensated) {
            break events;
        }
        assert!(Instant::now() < deadline, "{events:#?}\n{}", baton.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let RunEvent::Ended(_, end) = &events.last().unwrap().event else {
        unreachable!()
    };
    assert_eq!(end.round, 2, "the second end of the run");
    let undone: Vec<String> = effects
        .applied()
        .into_iter()
        .map(|(op, _)| op)
        .filter(|op| op.starts_with("undo"))
        .collect();
    assert_eq!(undone, ["undo-two", "undo-one"]);

    // Retrying a run that did not fail its compensation is refused with the reason.
    let (ok, _, err) = baton_command(
        &["runs", "retry-compensation", &run, "--nats-url", &url],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("only a compensation_failed run"), "{err}");
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}

#[tokio::test]
async fn runs_survive_kill_9_of_the_coordinator_and_of_a_runner_with_each_side_effect_once() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let effects = Effects::start(&url).await;
    let version = apply(&bus, "chain", CHAIN).await;
    let mut coordinator = coordinator(&url, &[]);
    let mut runner = runner(&url, &[]);
    let runs: Vec<String> = join_all(
        (0..20).map(|_| start_run(&bus, "chain", version, serde_json::json!({"delay": 800}))),
    )
    .await;

    // Kill a runner while steps run, then the coordinator while others run; both come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_flight = effects.calls().len();
    runner.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    runner.restart();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    coordinator.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    coordinator.restart();

    let log = || format!("{}\n{}", coordinator.log(), runner.log());
    wait_all(&bus, &runs, Duration::from_secs(60), log).await;
    assert!(
        in_flight > 0 && in_flight < 60,
        "the runner died mid-run ({in_flight} calls)"
    );
    assert_each_effect_once(&effects, &runs, &["a", "b", "c"]);
    assert!(
        effects.calls().len() > effects.applied().len(),
        "requests in flight when the runner died were sent again, with the same key"
    );
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}

#[tokio::test]
async fn two_coordinators_share_runs_and_the_survivor_takes_over_when_one_dies_under_load() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let effects = Effects::start(&url).await;
    let version = apply(&bus, "chain", CHAIN).await;
    let _runner = runner(&url, &["--concurrency", "200"]);
    // The first instance owns every partition; the second waits.
    let mut first = coordinator(&url, &[]);
    let warmup = start_run(&bus, "chain", version, serde_json::json!({"delay": 0})).await;
    wait_for_end(&bus, &warmup, Duration::from_secs(20), || first.log()).await;
    let second = coordinator(&url, &[]);

    let mut runs: Vec<String> = join_all(
        (0..40).map(|_| start_run(&bus, "chain", version, serde_json::json!({"delay": 200}))),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.kill();
    // More load arrives while the partitions move.
    runs.extend(
        join_all(
            (0..20).map(|_| start_run(&bus, "chain", version, serde_json::json!({"delay": 200}))),
        )
        .await,
    );
    let started = Instant::now();
    wait_all(&bus, &runs, Duration::from_secs(60), || second.log()).await;
    assert!(
        second.log().contains("took ownership"),
        "the survivor took the partitions over:\n{}",
        second.log()
    );
    println!("all runs ended {:?} after the kill", started.elapsed());
    runs.push(warmup);
    assert_each_effect_once(&effects, &runs, &["a", "b", "c"]);
}

/// `CHAIN` for the node-loss test. Requests to a service are core NATS, at most once: one in flight
/// through the killed node, or its reply, is lost (the attempt times out), and one sent before the
/// service's subscription has moved to another node finds no responders. So each step retries such
/// errors, as a production workflow calling a NATS service would; the retry carries the same
/// idempotency key, and the effects service applies each key once.
const CHAIN_RETRIED: &str = r#"
name: chain-retried
inputs:
  delay: { type: integer, default: 300 }
steps:
  - id: a
    uses: nats
    with: { subject: effects.a, body: { delay_ms: "${{ .inputs.delay }}" }, timeout_ms: 5000 }
    retry: { attempts: 5, backoff: constant, initial-delay: 500ms }
  - id: b
    uses: nats
    with: { subject: effects.b, body: { delay_ms: "${{ .inputs.delay }}" }, timeout_ms: 5000 }
    retry: { attempts: 5, backoff: constant, initial-delay: 500ms }
  - id: c
    uses: nats
    with: { subject: effects.c, body: { delay_ms: "${{ .inputs.delay }}" }, timeout_ms: 5000 }
    retry: { attempts: 5, backoff: constant, initial-delay: 500ms }
outputs:
  last: ${{ .steps.c.outputs.op }}
"#;

/// Waits until every service of a `baton serve` process has set up its consumers. A service that
/// cannot (say, because a stream has no leader at that moment) stops the process, so an outage is
/// only modelled once start-up is over.
async fn wait_serving(bus: &Bus, baton: &BatonProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = baton.log();
        let triggers = match bus.js.get_stream(streams::EVENTS).await {
            Ok(events) => events.consumer_info("triggers").await.is_ok(),
            Err(_) => false,
        };
        if log.contains("coordinator started") && log.contains("runner started") && triggers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "baton did not finish starting:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster information of the journal stream, as its leader reports it now.
async fn journal_cluster(bus: &Bus) -> Option<async_nats::jetstream::stream::ClusterInfo> {
    let mut stream = bus.js.get_stream(streams::RUNS).await.ok()?;
    stream.info().await.ok()?.cluster.clone()
}

/// Waits until the journal has a leader other than `old`, and returns it.
async fn wait_new_leader(
    bus: &Bus,
    old: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        // Nothing answers while there is no leader: ask again every second.
        let cluster = tokio::time::timeout(Duration::from_secs(1), journal_cluster(bus)).await;
        if let Some(leader) = cluster.ok().flatten().and_then(|c| c.leader)
            && leader != old
        {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "{} elected no new leader in {timeout:?} after {old} was killed\n{}",
            streams::RUNS,
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_three_node_cluster_loses_a_node_under_load_and_no_run_is_lost() {
    let mut cluster = Cluster::start();
    cluster.wait_ready().await;
    let urls = cluster.urls();
    let topology = Topology {
        replicas: 3,
        ..Topology::default()
    };
    let bus = baton_core::connect(&urls, "e2e", &topology).await.unwrap();
    let info = bus
        .js
        .get_stream(streams::RUNS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the journal is replicated");
    let effects = Effects::start(&urls).await;
    let version = apply(&bus, "chain-retried", CHAIN_RETRIED).await;
    let baton = BatonProcess::start(&[
        "serve",
        "--nats-url",
        &urls,
        "--replicas",
        "3",
        "--http",
        "127.0.0.1:0",
        "--runner-ack-wait",
        "2",
    ]);
    // The outage hits a healthy installation: Baton has started, and every replica is current.
    wait_serving(&bus, &baton).await;
    let warmup = start_run(
        &bus,
        "chain-retried",
        version,
        serde_json::json!({"delay": 0}),
    )
    .await;
    wait_for_end(&bus, &warmup, Duration::from_secs(30), || baton.log()).await;
    cluster.wait_current(&bus.js, Duration::from_secs(30)).await;
    let mut runs: Vec<String> = join_all((0..30).map(|_| {
        start_run(
            &bus,
            "chain-retried",
            version,
            serde_json::json!({"delay": 300}),
        )
    }))
    .await;

    // Kill the node that leads the journal now, while the runs are under way.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (before, leader) = loop {
        if let Some(cluster) = journal_cluster(&bus).await
            && let Some(leader) = cluster.leader.clone()
        {
            break (cluster, leader);
        }
        assert!(Instant::now() < deadline, "the journal has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node = cluster
        .nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("the leader is a node of the cluster");
    cluster.nodes[node].kill();
    let killed = Instant::now();

    let log = || {
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.log()).collect();
        format!("{}\n{}", baton.log(), nodes.join("\n----\n"))
    };
    let new_leader = wait_new_leader(&bus, &leader, Duration::from_secs(30), log).await;
    println!(
        "{leader} killed; {new_leader} leads the journal after {:?}; replicas at the kill: {:?}",
        killed.elapsed(),
        before.replicas
    );
    wait_all(&bus, &runs, Duration::from_secs(60), log).await;
    println!(
        "all runs ended {:?} after the kill; {} requests for {} side effects",
        killed.elapsed(),
        effects.calls().len(),
        effects.applied().len()
    );
    runs.push(warmup);
    assert_each_effect_once(&effects, &runs, &["a", "b", "c"]);
}

#[tokio::test]
async fn a_timer_fires_while_every_baton_process_is_down() {
    const SLEEPY: &str = r#"
name: sleepy
steps:
  - id: nap
    uses: sleep
    with: { duration: 2s }
  - id: after
    uses: echo
    with: { woke: true }
outputs:
  woke: ${{ .steps.after.outputs.woke }}
"#;
    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let version = apply(&bus, "sleepy", SLEEPY).await;
    let mut baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let run = start_run(&bus, "sleepy", version, serde_json::json!({})).await;
    crate::wait_for(&bus, &run, Duration::from_secs(20), |events| {
        events
            .iter()
            .any(|e| matches!(e.event, RunEvent::TimerScheduled(_)))
    })
    .await;
    // Nothing of Baton runs when the timer is due; the server fires it, and Baton handles it later.
    baton.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = journal(&bus, &run).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e.event, RunEvent::TimerFired(_))),
        "the server fired the timer on its own: {events:#?}"
    );
    baton.restart();
    let events = wait_for_end(&bus, &run, Duration::from_secs(20), || baton.log()).await;
    assert_eq!(ending(&events), Some(Ending::Succeeded), "{events:#?}");
}
