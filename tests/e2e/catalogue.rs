//! The event catalogue cannot drift from the code: every event Baton stored during a test must be
//! of a catalogued type and its data must validate against `schemas/events/<type>.json`. And bad
//! input becomes dead letters that `baton deadletters` lists, shows and re-publishes.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use baton_core::{Bus, binding, catalogue, event, streams};
use baton_tests::{BatonProcess, NatsServer, baton_command, workspace_root};
use cloudevents::AttributesReader;

/// Reads every message of `stream`.
pub async fn messages(bus: &Bus, stream: &str) -> Vec<async_nats::jetstream::Message> {
    streams::read(&bus.js, stream, consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
}

/// Validates every event Baton published (source `baton/...`, in the journal and the dead letters)
/// against the catalogue's schema files. Returns how many events were checked.
pub async fn assert_catalogue(bus: &Bus) -> usize {
    let mut checked = 0;
    for stream in [streams::RUNS, streams::DLQ] {
        for m in messages(bus, stream).await {
            // Only what Baton published is judged; tests also inject bad input on purpose.
            let Ok(ce) = binding::decode(m.headers.as_ref(), &m.payload) else {
                continue;
            };
            if !ce.source().starts_with("baton/") {
                continue;
            }
            let entry = catalogue::find(ce.ty()).unwrap_or_else(|| {
                panic!(
                    "type {} (on {}) is not in the catalogue",
                    ce.ty(),
                    m.subject
                )
            });
            let file = workspace_root()
                .join("schemas/events")
                .join(entry.schema_file());
            let schema: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let validator = jsonschema::validator_for(&schema).unwrap();
            let data = event::event_data(&ce).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&data)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{} {} does not match {}: {errors:?}\n{data:#}",
                ce.ty(),
                ce.id(),
                file.display()
            );
            assert!(
                ce.extension("traceparent").is_some(),
                "{} {} has no traceparent",
                ce.ty(),
                ce.id()
            );
            checked += 1;
        }
    }
    checked
}

async fn wait_for_dead_letters(bus: &Bus, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let count = bus
            .js
            .get_stream(streams::DLQ)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{count} dead letters, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn bad_input_becomes_dead_letters_that_can_be_listed_shown_and_republished() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = crate::bus(&url).await;
    let _baton = BatonProcess::start_with_env(
        &["serve", "--nats-url", &url, "--http", "127.0.0.1:0"],
        &[("BATON_MAX_EVENT_BYTES", "2048")],
    );
    let publish = |subject: &str, headers: async_nats::HeaderMap, body: Vec<u8>| {
        let js = bus.js.clone();
        let subject = subject.to_owned();
        async move {
            js.publish_with_headers(subject, headers, body.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    // 1. Not a CloudEvent at all, on the ingress.
    publish(
        "baton.events.nats",
        Default::default(),
        b"hello \xff".to_vec(),
    )
    .await;
    // 2. A CloudEvent 0.3.
    let v03 = br#"{"specversion":"0.3","id":"old-1","source":"/legacy","type":"com.example"}"#;
    publish("baton.events.nats", Default::default(), v03.to_vec()).await;
    // 3. Too large for the configured limit.
    let big = format!(
        r#"{{"specversion":"1.0","id":"big-1","source":"/s","type":"t","data":"{}"}}"#,
        "x".repeat(4000)
    );
    publish("baton.events.nats", Default::default(), big.into_bytes()).await;
    // 4. A Baton run event whose data does not match its type, on the journal.
    let mut headers = async_nats::HeaderMap::new();
    for (n, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bad-run"),
        ("ce-source", "/x"),
        ("ce-type", "dev.baton.run.requested"),
    ] {
        headers.insert(n, v);
    }
    publish(
        "baton.run.0.bad-run.run.requested",
        headers,
        br#"{"run_id": 7}"#.to_vec(),
    )
    .await;
    wait_for_dead_letters(&bus, 4).await;

    let nats = ["--nats-url", url.as_str()];
    let (ok, out, err) = baton_command(&[&["deadletters", "list"][..], &nats].concat(), &[]);
    assert!(ok, "{err}");
    for expected in [
        "ingress",
        "coordinator",
        "not a CloudEvent",
        "specversion \"0.3\" is not supported",
        "the limit is 2048 bytes",
        "dev.baton.run.requested",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from:\n{out}");
    }
    // Services reject concurrently, so find each dead letter by its reason.
    let seq_of = |needle: &str| -> String {
        let line = out
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not listed:\n{out}"));
        line.split_whitespace().next().unwrap().to_owned()
    };
    let (old, garbage) = (seq_of("specversion \"0.3\""), seq_of("not a CloudEvent"));
    let (ok, shown, err) =
        baton_command(&[&["deadletters", "show", &old][..], &nats].concat(), &[]);
    assert!(ok, "{err}");
    assert!(
        shown.contains("subject  baton.events.nats") && shown.contains(r#""specversion":"0.3""#),
        "{shown}"
    );
    let (ok, shown, err) = baton_command(
        &[&["deadletters", "show", &garbage][..], &nats].concat(),
        &[],
    );
    assert!(
        ok && shown.contains("not UTF-8; base64") && shown.contains("aGVsbG8g/w=="),
        "{shown}{err}"
    );

    // Re-publishing puts the exact bytes back on the original subject; still bad, so a new dead letter.
    let (ok, out, err) = baton_command(
        &[&["deadletters", "republish", &old, "--remove"][..], &nats].concat(),
        &[],
    );
    let expected = format!("Re-published dead letter #{old} on baton.events.nats");
    assert!(
        ok && out.contains(&expected) && out.contains("Removed"),
        "{out}{err}"
    );
    wait_for_dead_letters(&bus, 4).await;
    let dlq = messages(&bus, streams::DLQ).await;
    assert_eq!(dlq.len(), 4, "one removed, one new");
    let newest = dlq.last().unwrap();
    let ce = binding::decode(newest.headers.as_ref(), &newest.payload).unwrap();
    let letter: baton_core::dlq::DeadLetter =
        serde_json::from_value(event::event_data(&ce).unwrap()).unwrap();
    assert_eq!(
        letter.payload(),
        v03.to_vec(),
        "the re-published bytes are exact"
    );
    let (ok, _, err) = baton_command(&[&["deadletters", "show", "999"][..], &nats].concat(), &[]);
    assert!(!ok && err.contains("no dead letter #999"), "{err}");

    assert!(assert_catalogue(&bus).await >= 4);
}
