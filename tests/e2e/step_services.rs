//! Custom step services as real processes next to `baton serve`: one written in Python from
//! `docs/step-services.md` alone (`tests/python/step_service.py`), and the Rust SDK's example
//! (`services/sdk/examples/payments.rs`) running `docs/examples/payments.yaml`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use baton_coordinator::service::Journaled;
use baton_core::dlq::DeadLetter;
use baton_core::event::{self, Ending, RunEvent};
use baton_core::{binding, streams};
use baton_tests::{BatonProcess, NatsServer, python_packages, workspace_root};
use cloudevents::AttributesReader;
use serde_json::{Value, json};

use crate::saga::{apply, ending, start_run};
use crate::wait_for_end;

/// A service process, killed on drop; its stderr goes to a log file.
struct Service {
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    fn start(mut command: Command, log: &Path) -> Service {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        Service {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the process exits by itself.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the service did not exit in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn python_service(url: &str, state: &Path, log: &Path, extra: &[&str]) -> Service {
    let mut command = Command::new("python3");
    command
        .arg(workspace_root().join("tests/python/step_service.py"))
        .arg(url)
        .arg("--state")
        .arg(state)
        .args(["--kind", "inventory", "--ack-wait", "3"])
        .args(extra)
        .env("PYTHONPATH", python_packages());
    Service::start(command, log)
}

/// The SDK's example `payments` service: `BATON_PAYMENTS_BIN`, else `payments-example` in the
/// profile directory of this test (`cargo test --workspace` builds it; alone:
/// `cargo build -p baton-sdk --bin payments-example`).
fn payments_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("BATON_PAYMENTS_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("payments-example");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p baton-sdk --bin payments-example`",
        bin.display()
    );
    bin
}

fn events_of<'a>(
    events: &'a [Journaled],
    pick: impl Fn(&'a RunEvent) -> bool + 'a,
) -> Vec<&'a RunEvent> {
    events
        .iter()
        .map(|e| &e.event)
        .filter(|e| pick(e))
        .collect()
}

const INVENTORY: &str = r#"
name: py-inventory
steps:
  - id: reserve
    uses: service/inventory
    with: { sku: a-1, qty: 2, delay_ms: 1500 }
    compensate:
      uses: service/inventory
      with: { reservation: "${{ .steps.reserve.outputs.reservation }}" }
  - id: ship
    uses: echo
    with: { fail: "the carrier refused the parcel" }
"#;

#[tokio::test]
async fn a_python_service_written_from_the_contract_reserves_once_through_a_crash_and_is_compensated()
 {
    let server = NatsServer::start();
    let url = server.url();
    let bus = crate::bus(&url).await;
    let version = apply(&bus, "py-inventory", INVENTORY).await;
    let baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let dir = tempfile::tempdir().unwrap();
    let (state, log) = (dir.path().join("effects.jsonl"), dir.path().join("py.log"));

    // The first instance dies right after reserving, before the outcome is stored.
    let mut python = python_service(&url, &state, &log, &["--crash-after-effect"]);
    let run = start_run(&bus, "py-inventory", version, json!({})).await;
    let status = python.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{}", python.log());
    // Another instance gets the request after the ack wait: the same attempt, the same key.
    let python = python_service(&url, &state, &log, &[]);
    let context = || format!("{}\n--- python:\n{}", baton.log(), python.log());
    let events = wait_for_end(&bus, &run, Duration::from_secs(60), context).await;
    assert_eq!(
        ending(&events),
        Some(Ending::Compensated),
        "{events:#?}\n{}",
        context()
    );

    // Reserved once and released once, by idempotency key, although executed twice.
    let lines: Vec<Value> = std::fs::read_to_string(&state)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (key, undo) = (
        format!("{run}/reserve"),
        format!("{run}/reserve/compensate"),
    );
    let effects: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["op"] != "call")
        .map(|l| (l["op"].as_str().unwrap(), l["key"].as_str().unwrap()))
        .collect();
    assert_eq!(
        effects,
        [("reserve", key.as_str()), ("release", undo.as_str())],
        "{lines:#?}"
    );
    let deliveries: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l["op"] == "call" && l["key"] == key.as_str())
        .map(|l| {
            (
                l["attempt"].as_u64().unwrap(),
                l["delivered"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(deliveries, [(1, 1), (1, 2)], "{lines:#?}");

    // What the Python service published, as the coordinator read it.
    let reserved = json!({"reservation": "res-1", "sku": "a-1", "qty": 2});
    let completed = events_of(
        &events,
        |e| matches!(e, RunEvent::StepCompleted(c) if c.step == "reserve"),
    );
    let [RunEvent::StepCompleted(done)] = completed[..] else {
        panic!("{events:#?}")
    };
    assert_eq!((done.attempt, &done.output), (1, &reserved));
    assert!(done.runner.starts_with("inventory-py-"), "{}", done.runner);
    let started: Vec<(u32, bool)> = events_of(
        &events,
        |e| matches!(e, RunEvent::StepStarted(s) if s.kind == "inventory"),
    )
    .into_iter()
    .map(|e| match e {
        RunEvent::StepStarted(s) => (s.delivered, s.compensation),
        _ => unreachable!(),
    })
    .collect();
    assert_eq!(started, [(1, false), (2, false), (1, true)], "{events:#?}");
    assert!(
        !events_of(
            &events,
            |e| matches!(e, RunEvent::StepHeartbeat(h) if h.step == "reserve")
        )
        .is_empty(),
        "heartbeats while the 1.5 s reservation runs: {events:#?}"
    );
    let undone = events_of(&events, |e| matches!(e, RunEvent::CompensationCompleted(_)));
    let [RunEvent::CompensationCompleted(undone)] = undone[..] else {
        panic!("{events:#?}")
    };
    assert_eq!(
        (undone.step.as_str(), &undone.output),
        ("reserve", &json!({"released": "res-1"}))
    );

    // One trace for the whole run: the service's events carry the request's.
    let trace_id = &events[0].trace.as_ref().unwrap().trace_id;
    for e in &events {
        assert_eq!(
            &e.trace.as_ref().expect("a trace").trace_id,
            trace_id,
            "{:?}",
            e.event
        );
    }
    // A request that is not one becomes a dead letter (and is not retried).
    let mut headers = async_nats::HeaderMap::new();
    for (n, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bad-1"),
        ("ce-source", "/test"),
        ("ce-type", "dev.baton.step.requested"),
    ] {
        headers.insert(n, v);
    }
    let bad = "baton.run.0.bad-run.step.inventory.requested";
    let stored = bus
        .js
        .publish_with_headers(bad, headers, r#"{"run_id": 7}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = bus.js.get_stream(streams::DLQ).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let letter = loop {
        if let Ok(m) = dlq
            .get_last_raw_message_by_subject("baton.dlq.inventory")
            .await
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter:\n{}",
            python.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let letter = binding::decode(Some(&letter.headers), &letter.payload).unwrap();
    assert_eq!(letter.id(), format!("BATON_RUNS.{}", stored.sequence));
    let letter: DeadLetter = serde_json::from_value(event::event_data(&letter).unwrap()).unwrap();
    assert_eq!(
        (letter.origin.as_str(), letter.subject.as_str()),
        ("inventory", bad)
    );
    assert!(letter.reason.contains("run_id"), "{}", letter.reason);
    assert_eq!(letter.payload(), br#"{"run_id": 7}"#);

    // And every event it published matches the catalogue (its source is `baton/inventory`).
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}

#[tokio::test]
async fn the_rust_sdk_payments_example_retries_a_transient_failure_and_refunds_when_a_card_is_declined()
 {
    let server = NatsServer::start();
    let url = server.url();
    let bus = crate::bus(&url).await;
    let source =
        std::fs::read_to_string(workspace_root().join("docs/examples/payments.yaml")).unwrap();
    let version = apply(&bus, "payments", &source).await;
    let baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(payments_binary());
    command
        .env("NATS_URL", &url)
        .env("BATON_INSTANCE", "payments-e2e")
        .env("BATON_LOG", "info,async_nats=warn");
    let payments = Service::start(command, &dir.path().join("payments.log"));
    let context = || format!("{}\n--- payments:\n{}", baton.log(), payments.log());

    // The deposit's first attempt fails with a retryable error; the retry charges.
    let input = json!({"order": "o-1", "balance": 250, "flaky": true});
    let run = start_run(&bus, "payments", version, input).await;
    let events = wait_for_end(&bus, &run, Duration::from_secs(60), context).await;
    let RunEvent::Ended(Ending::Succeeded, end) = &events.last().unwrap().event else {
        panic!("{events:#?}\n{}", context())
    };
    assert_eq!(
        end.output,
        json!({"order": "o-1", "charges": ["ch-1", "ch-2"]})
    );
    let deposit: Vec<(u32, bool)> = events_of(&events, |e| {
        matches!(e, RunEvent::StepCompleted(c) if c.step == "deposit")
            || matches!(e, RunEvent::StepFailed(f) if f.step == "deposit")
    })
    .into_iter()
    .map(|e| match e {
        RunEvent::StepCompleted(c) => (c.attempt, true),
        RunEvent::StepFailed(f) => {
            assert!(f.error.retryable, "{f:?}");
            assert_eq!(f.runner, "payments-e2e");
            (f.attempt, false)
        }
        _ => unreachable!(),
    })
    .collect();
    assert_eq!(deposit, [(1, false), (2, true)], "{events:#?}");

    // The balance is declined for good: not retried, and the deposit is refunded.
    let input = json!({"order": "o-2", "balance": 5000});
    let run = start_run(&bus, "payments", version, input).await;
    let events = wait_for_end(&bus, &run, Duration::from_secs(60), context).await;
    assert_eq!(
        ending(&events),
        Some(Ending::Compensated),
        "{events:#?}\n{}",
        context()
    );
    let failed = events_of(&events, |e| matches!(e, RunEvent::StepFailed(_)));
    let [RunEvent::StepFailed(declined)] = failed[..] else {
        panic!("{events:#?}")
    };
    assert_eq!(
        (
            declined.step.as_str(),
            declined.attempt,
            declined.error.retryable
        ),
        ("balance", 1, false)
    );
    assert_eq!(declined.error.code.as_deref(), Some("card-declined"));
    let balance_requests = events_of(
        &events,
        |e| matches!(e, RunEvent::StepRequested(r) if r.step == "balance"),
    );
    assert_eq!(
        balance_requests.len(),
        1,
        "a permanent error is not retried"
    );
    let undone = events_of(&events, |e| matches!(e, RunEvent::CompensationCompleted(_)));
    let [RunEvent::CompensationCompleted(refund)] = undone[..] else {
        panic!("{events:#?}")
    };
    assert_eq!(
        (refund.step.as_str(), &refund.output),
        ("deposit", &json!({"refunded": "ch-3", "amount": 100.0}))
    );

    let log = payments.log();
    assert_eq!(log.matches(" charged ").count(), 3, "{log}");
    assert_eq!(log.matches(" refunded ").count(), 1, "{log}");
    assert!(crate::catalogue::assert_catalogue(&bus).await > 0);
}
