//! The gateway end to end: real webhook payloads (tests/fixtures, byte for byte) with real header
//! sets, posted over HTTP to a `baton gateway` process, stored in a real nats-server, matched
//! against applied workflows, and run by a coordinator and runners.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use baton_core::event::{Ending, RunEvent};
use baton_core::{Bus, binding, event, streams};
use baton_tests::{BatonProcess, NatsServer, baton_command, free_port, workspace_root};
use cloudevents::{EventBuilder, EventBuilderV10};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::saga::ending;
use crate::{bus, wait_for_end};

const SECRET: &str = "a test secret";
const TOKEN: &str = "a-test-token";

fn fixture(path: &str) -> Vec<u8> {
    let file = workspace_root().join("tests/fixtures").join(path);
    std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

async fn json_of(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null)
}

/// A gateway with a GitHub secret and a token, and its base URL.
fn gateway(url: &str) -> (BatonProcess, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let process = BatonProcess::start_with_env(
        &["gateway", "--nats-url", url, "--http", &listen],
        &[
            ("BATON_GITHUB_SECRET", SECRET),
            ("BATON_GATEWAY_TOKEN", TOKEN),
            ("BATON_MAX_EVENT_BYTES", "65536"),
        ],
    );
    (process, format!("http://{listen}"))
}

/// Waits until the gateway answers.
async fn ready(http: &reqwest::Client, base: &str, gateway: &BatonProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not become ready:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn apply_example(url: &str, name: &str) {
    let file = workspace_root().join(format!("docs/examples/{name}.yaml"));
    let (ok, out, err) = baton_command(&["apply", file.to_str().unwrap(), "--nats-url", url], &[]);
    assert!(ok, "apply {name}: {out}{err}");
}

/// GitHub's headers for a delivery of `body`, signed with `secret`.
fn github_headers(
    event: &str,
    delivery: &str,
    body: &[u8],
    secret: &str,
) -> reqwest::header::HeaderMap {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut h = reqwest::header::HeaderMap::new();
    for (name, value) in [
        ("user-agent", "GitHub-Hookshot/044aadd".to_owned()),
        ("content-type", "application/json".to_owned()),
        ("x-github-event", event.to_owned()),
        ("x-github-delivery", delivery.to_owned()),
        ("x-github-hook-id", "292430182".to_owned()),
        (
            "x-github-hook-installation-target-id",
            "79929171".to_owned(),
        ),
        (
            "x-github-hook-installation-target-type",
            "repository".to_owned(),
        ),
        ("x-hub-signature-256", format!("sha256={signature}")),
    ] {
        h.insert(name, value.parse().unwrap());
    }
    h
}

/// The runs of `workflow` requested so far, by id.
async fn runs_of(bus: &Bus, workflow: &str) -> BTreeSet<String> {
    baton_coordinator::service::read_journal(&bus.js, "baton.run.*.*.run.requested".into())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|j| match j.event {
            RunEvent::Requested(r) if r.workflow.name == workflow => Some(r.run_id),
            _ => None,
        })
        .collect()
}

/// Waits until `workflow` has `n` runs, then a little longer to see that no more come.
async fn expect_runs(
    bus: &Bus,
    workflow: &str,
    n: usize,
    within: Duration,
    log: impl Fn() -> String,
) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    loop {
        let runs = runs_of(bus, workflow).await;
        assert!(
            runs.len() <= n,
            "{workflow}: {} runs, expected {n}: {runs:?}\n{}",
            runs.len(),
            log()
        );
        if runs.len() == n {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let again = runs_of(bus, workflow).await;
            assert_eq!(again, runs, "more runs of {workflow} came\n{}", log());
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "{workflow}: {} runs after {within:?}, expected {n}\n{}",
            runs.len(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_github_release_delivered_five_times_starts_the_release_workflow_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    apply_example(&url, "release");
    let (gw, base) = gateway(&url);
    let coordinator = BatonProcess::start(&["coordinator", "--nats-url", &url]);
    let runner = BatonProcess::start(&["runner", "--nats-url", &url]);
    let http = reqwest::Client::new();
    ready(&http, &base, &gw).await;

    let body = fixture("github/payloads/release__published.json");
    let delivery = "9a8c5f30-c8f0-11ef-8e4b-0a1b2c3d4e5f";
    let mut headers = github_headers("release", delivery, &body, SECRET);
    // A sender's trace: the run continues it.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    headers.insert("traceparent", traceparent.parse().unwrap());
    for attempt in 0..5 {
        let r = http
            .post(format!("{base}/webhooks/github"))
            .headers(headers.clone())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", gw.log());
        let answer = json_of(r).await;
        assert_eq!(answer["accepted"][0]["id"], delivery);
        assert_eq!(
            answer["accepted"][0]["type"],
            "com.github.release.published"
        );
        assert_eq!(answer["accepted"][0]["duplicate"], attempt > 0, "{answer}");
    }

    let payload: Value = serde_json::from_slice(&body).unwrap();
    let source = payload["repository"]["url"].as_str().unwrap();
    let run_id = event::triggered_run_id("release", source, delivery);
    let log = || {
        format!(
            "gateway:\n{}\ncoordinator:\n{}\nrunner:\n{}",
            gw.log(),
            coordinator.log(),
            runner.log()
        )
    };
    let journal = wait_for_end(&bus, &run_id, Duration::from_secs(60), log).await;
    assert_eq!(ending(&journal), Some(Ending::Succeeded), "{journal:#?}");
    // The run's input is the event, data byte for byte.
    let RunEvent::Requested(requested) = &journal[0].event else {
        panic!("the journal starts with run.requested")
    };
    for j in &journal {
        let trace = j.trace.as_ref().expect("every run event carries a trace");
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{j:?}");
    }
    let trigger = requested.trigger.as_ref().unwrap();
    assert_eq!(trigger.data, payload);
    assert_eq!(
        trigger.subject.as_deref(),
        Some(payload["release"]["id"].to_string().as_str())
    );
    let ended = journal.iter().find_map(|j| match &j.event {
        RunEvent::Ended(_, e) => Some(e.output.clone()),
        _ => None,
    });
    assert_eq!(ended.unwrap()["tag"], payload["release"]["tag_name"]);
    expect_runs(&bus, "release", 1, Duration::from_secs(5), log).await;
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_reason() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    let (gw, base) = gateway(&url);
    let http = reqwest::Client::new();
    ready(&http, &base, &gw).await;
    let post = |path: &str| http.post(format!("{base}{path}"));
    let error = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body = json_of(r).await;
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };

    // GitHub: a wrong signature, a wrong content type, a ping, an event without a mapping.
    let body = fixture("github/payloads/release__published.json");
    let forged = github_headers("release", "d-1", &body, "not the secret");
    let (status, message) = error(
        post("/webhooks/github")
            .headers(forged)
            .body(body.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, message.contains("does not match")),
        (401, true),
        "{message}"
    );
    let mut form = github_headers("release", "d-2", &body, SECRET);
    form.insert(
        "content-type",
        "application/x-www-form-urlencoded".parse().unwrap(),
    );
    let (status, message) = error(
        post("/webhooks/github")
            .headers(form)
            .body(body.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, message.contains("application/json")),
        (415, true),
        "{message}"
    );
    let ping = fixture("github/payloads/ping__payload.json");
    let r = post("/webhooks/github")
        .headers(github_headers("ping", "d-3", &ping, SECRET))
        .body(ping)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["pong"], true);
    let unknown = br#"{"zen": "x"}"#.to_vec();
    let r = post("/webhooks/github")
        .headers(github_headers("fancy_new_event", "d-4", &unknown, SECRET))
        .body(unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ignored = json_of(r).await["ignored"].as_str().unwrap().to_owned();
    assert!(ignored.contains("fancy_new_event"), "{ignored}");

    // CloudEvents: the token, a missing attribute, a foreign media type, too large.
    let event = json!({"specversion": "1.0", "id": "e-1", "source": "ci/test", "type": "com.example.built", "data": {"ok": true}});
    let structured = |body: &Value| {
        post("/events")
            .header("content-type", "application/cloudevents+json")
            .body(body.to_string())
    };
    let (status, message) = error(structured(&event).send().await.unwrap()).await;
    assert_eq!(
        (status, message.contains("bearer token is required")),
        (401, true),
        "{message}"
    );
    let (status, _) = error(
        structured(&event)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    let mut no_type = event.clone();
    no_type.as_object_mut().unwrap().remove("type");
    let (status, message) = error(
        structured(&no_type)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, message.as_str()),
        (400, "required attribute `type` is missing or empty")
    );
    let (status, message) = error(
        post("/events")
            .bearer_auth(TOKEN)
            .header("content-type", "text/plain")
            .body("hello")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 415, "{message}");
    let (status, message) = error(
        post("/events")
            .bearer_auth(TOKEN)
            .body("hello")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{message}");
    let big = json!({"specversion": "1.0", "id": "e-2", "source": "s", "type": "t", "data": "x".repeat(70_000)});
    let (status, message) = error(structured(&big).bearer_auth(TOKEN).send().await.unwrap()).await;
    assert_eq!(
        (status, message.contains("larger than 65536 bytes")),
        (413, true),
        "{message}"
    );
    let (status, message) = error(
        post("/webhooks/alertmanager")
            .bearer_auth(TOKEN)
            .body(r#"{"version": "3"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, message.contains("version \"4\"")),
        (400, true),
        "{message}"
    );

    // Accepted: structured, binary (with ?access_token=), batch. Stored before the answer.
    let r = structured(&event).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = post(&format!("/events?access_token={TOKEN}"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "e-3")
        .header("ce-source", "ci/test")
        .header("ce-type", "com.example.built")
        .header("ce-subject", "caf%C3%A9")
        .header("content-type", "application/json")
        .body(r#"{"ok": false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let batch = json!([
        {"specversion": "1.0", "id": "e-4", "source": "ci/test", "type": "com.example.built"},
        {"specversion": "1.0", "id": "e-1", "source": "ci/test", "type": "com.example.built", "data": {"ok": true}},
    ]);
    let r = post("/events")
        .bearer_auth(TOKEN)
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let answer = json_of(r).await;
    assert_eq!(answer["accepted"][0]["duplicate"], false);
    assert_eq!(
        answer["accepted"][1]["duplicate"], true,
        "e-1 was stored before"
    );
    let stored = bus
        .js
        .get_stream(streams::EVENTS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(stored, 3, "e-1, e-3 and e-4, each once");
    let e3 = bus
        .js
        .get_stream(streams::EVENTS)
        .await
        .unwrap()
        .get_raw_message(2)
        .await
        .unwrap();
    let e3 = binding::decode(Some(&e3.headers), &e3.payload).unwrap();
    assert_eq!(cloudevents::AttributesReader::subject(&e3), Some("café"));

    // The abuse-protection handshake, health.
    let r = http
        .request(reqwest::Method::OPTIONS, format!("{base}/events"))
        .header("webhook-request-origin", "eventemitter.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["webhook-allowed-origin"],
        "eventemitter.example.com"
    );
    assert_eq!(r.headers()["webhook-allowed-rate"], "*");
    assert!(r.headers()["allow"].to_str().unwrap().contains("POST"));
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// `baton gateway` and `baton serve` whose HTTP port is taken exit at once, non-zero, naming the
/// address (they used to run on without HTTP and say so only when stopped).
#[tokio::test]
async fn a_gateway_whose_port_is_taken_exits_at_once_naming_the_address() {
    let nats = NatsServer::start();
    let url = nats.url();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for command in ["gateway", "serve"] {
        let mut process = BatonProcess::start(&[command, "--nats-url", &url, "--http", &addr]);
        let started = Instant::now();
        let Some(status) = process.wait_timeout(Duration::from_secs(5)) else {
            panic!(
                "baton {command} still runs 5 s after starting on a taken port:\n{}",
                process.log()
            );
        };
        let log = process.log();
        assert!(!status.success(), "baton {command}: {status}\n{log}");
        assert!(
            log.contains(&format!("cannot listen on {addr}")) && log.contains("in use"),
            "baton {command} does not say which address is in use:\n{log}"
        );
        eprintln!("baton {command} exited after {:?}", started.elapsed());
    }
}

/// Derived from the firing fixture: its first alert alone, started at `starts` (a new firing).
fn one_alert(firing: &Value, starts: &str) -> String {
    let mut n = firing.clone();
    let alert = n["alerts"][0].clone();
    n["alerts"] = json!([alert]);
    n["alerts"][0]["startsAt"] = json!(starts);
    n.to_string()
}

#[tokio::test]
async fn an_alert_storm_of_500_firings_of_one_fingerprint_starts_one_remediation() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    apply_example(&url, "alert-remediation");
    let (gw, base) = gateway(&url);
    let http = reqwest::Client::new();
    ready(&http, &base, &gw).await;
    let firing: Value = serde_json::from_slice(&fixture(
        "alertmanager/webhooks/01-firing-initial.body.json",
    ))
    .unwrap();
    let started = Instant::now();
    for i in 0..500 {
        let body = one_alert(&firing, &format!("2026-11-24T15:26:{:02}.{i:06}Z", i % 60));
        let r = http
            .post(format!("{base}/webhooks/alertmanager"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .header("user-agent", "Alertmanager/0.25.0")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", gw.log());
    }
    let posting = started.elapsed();
    assert!(
        posting < Duration::from_secs(10),
        "posting took {posting:?}, longer than the debounce window: the test proves nothing"
    );
    let events = bus
        .js
        .get_stream(streams::EVENTS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(events, 500, "every firing is stored");
    // Only the debounce's schedule exists while the storm lasts.
    assert!(runs_of(&bus, "alert-remediation").await.is_empty());
    let runs = expect_runs(
        &bus,
        "alert-remediation",
        1,
        Duration::from_secs(40),
        || gw.log(),
    )
    .await;
    // The run carries the storm's last event.
    let run = runs.into_iter().next().unwrap();
    let journal = crate::journal(&bus, &run).await;
    let RunEvent::Requested(r) = &journal[0].event else {
        panic!("run.requested first")
    };
    assert_eq!(
        r.trigger.as_ref().unwrap().data["startsAt"],
        "2026-11-24T15:26:19.000499Z"
    );
}

#[tokio::test]
async fn dedup_and_rate_windows_and_nats_ingress() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deploys.yaml");
    std::fs::write(
        &file,
        r#"
name: deploys
on:
  - type: com.example.deploy.requested
    key: ${{ .data.service }}
    dedup: 1h
  - type: com.example.deploy.forced
    key: ${{ .data.service }}
    rate: { limit: 2, per: 1h }
steps:
  - id: deploy
    uses: echo
    with: { service: "${{ .event.data.service }}" }
"#,
    )
    .unwrap();
    let (ok, out, err) = baton_command(&["apply", file.to_str().unwrap(), "--nats-url", &url], &[]);
    assert!(ok, "{out}{err}");
    let gw = BatonProcess::start(&[
        "gateway",
        "--nats-url",
        &url,
        "--http",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    let send = |ty: &str, service: &str| {
        let (ok, out, err) = baton_command(
            &[
                "send",
                "--type",
                ty,
                "--source",
                "ci/deployer",
                "--data",
                &json!({"service": service}).to_string(),
                "--nats-url",
                &url,
            ],
            &[],
        );
        assert!(ok && out.starts_with("Stored event "), "{out}{err}");
    };
    for _ in 0..4 {
        send("com.example.deploy.requested", "checkout");
    }
    send("com.example.deploy.requested", "payments");
    for _ in 0..4 {
        send("com.example.deploy.forced", "checkout");
    }
    // Plain NATS ingress: a binary-mode CloudEvent published on baton.events.<anything>.
    let event = EventBuilderV10::new()
        .id("n-1")
        .source("ci/deployer")
        .ty("com.example.deploy.requested")
        .data("application/json", json!({"service": "search"}))
        .build()
        .unwrap();
    let (headers, body) = binding::encode(&event);
    bus.js
        .publish_with_headers("baton.events.nats", headers, body)
        .await
        .unwrap()
        .await
        .unwrap();
    // checkout once (dedup), payments, checkout forced twice (rate 2), search.
    let runs = expect_runs(&bus, "deploys", 5, Duration::from_secs(30), || gw.log()).await;
    assert_eq!(runs.len(), 5);
    // Every event is stored, run or not.
    let (ok, out, err) = baton_command(
        &[
            "events",
            "tail",
            "--all",
            "--count",
            "4",
            "--type",
            "*.forced",
            "--nats-url",
            &url,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" com.example.deploy.forced source=ci/deployer ")),
        "{out}"
    );
}

/// The headers Alertmanager sent with a fixture body (less those the client sets itself).
fn alertmanager_request(name: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let request: Value = serde_json::from_slice(&fixture(&format!(
        "alertmanager/webhooks/{name}.request.json"
    )))
    .unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    for pair in request["headers"].as_array().unwrap() {
        let (name, value) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        if !name.eq_ignore_ascii_case("host") && !name.eq_ignore_ascii_case("content-length") {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
    }
    headers.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    (
        headers,
        fixture(&format!("alertmanager/webhooks/{name}.body.json")),
    )
}

#[tokio::test]
async fn a_firing_alert_starts_the_remediation_and_its_resolution_ends_the_wait() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    apply_example(&url, "alert-remediation");
    // The example's runbook, as a real program on the runner's PATH.
    let bin = tempfile::tempdir().unwrap();
    let runbook = bin.path().join("runbook");
    std::fs::write(
        &runbook,
        "#!/bin/sh\necho \"{\\\"ran\\\": \\\"$2\\\", \\\"instance\\\": \\\"$INSTANCE\\\"}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &runbook,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin.path().display());
    let (gw, base) = gateway(&url);
    let coordinator = BatonProcess::start(&["coordinator", "--nats-url", &url]);
    let runner = BatonProcess::start_with_env(&["runner", "--nats-url", &url], &[("PATH", &path)]);
    let http = reqwest::Client::new();
    ready(&http, &base, &gw).await;
    let log = || {
        format!(
            "gateway:\n{}\ncoordinator:\n{}\nrunner:\n{}",
            gw.log(),
            coordinator.log(),
            runner.log()
        )
    };

    let (headers, body) = alertmanager_request("01-firing-initial");
    let r = http
        .post(format!("{base}/webhooks/alertmanager"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Two alerts, two fingerprints: two remediations, after the 10 s debounce.
    let runs = expect_runs(&bus, "alert-remediation", 2, Duration::from_secs(40), log).await;
    let waits = bus.js.get_key_value(streams::WAITS_BUCKET).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    for run in &runs {
        while !matches!(waits.get(format!("{run}.resolved")).await, Ok(Some(_))) {
            assert!(
                Instant::now() < deadline,
                "run {run} is not waiting for its resolution\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (headers, body) = alertmanager_request("03-resolved-all");
    let r = http
        .post(format!("{base}/webhooks/alertmanager"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for run in &runs {
        let journal = wait_for_end(&bus, run, Duration::from_secs(30), log).await;
        assert_eq!(ending(&journal), Some(Ending::Succeeded), "{journal:#?}");
        let output = journal
            .iter()
            .find_map(|j| match &j.event {
                RunEvent::Ended(_, e) => Some(e.output.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(output, json!({"resolved": true, "escalated": false}));
        let remediated = journal.iter().find_map(|j| match &j.event {
            RunEvent::StepCompleted(c) if c.step == "remediate" => Some(c.output.clone()),
            _ => None,
        });
        assert_eq!(
            remediated.unwrap()["json"]["ran"],
            "HighErrorRate",
            "{journal:#?}"
        );
    }
}

#[tokio::test]
async fn an_emit_step_publishes_an_event_that_starts_another_workflow_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = bus(&url).await;
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "deploy",
            r#"
name: deploy
inputs: { service: { type: string } }
steps:
  - id: announce
    uses: emit
    with:
      type: com.example.deploy.done
      source: ci/deploy
      subject: ${{ .inputs.service }}
      data: { service: "${{ .inputs.service }}", version: 7 }
"#,
        ),
        (
            "smoke-test",
            r#"
name: smoke-test
on:
  - type: com.example.deploy.done
    subject: checkout
steps:
  - id: check
    uses: echo
    with: { checked: "${{ .event.data.service }}@${{ .event.data.version }}" }
outputs: { checked: "${{ .steps.check.outputs.checked }}" }
"#,
        ),
    ] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).unwrap();
        let (ok, out, err) =
            baton_command(&["apply", file.to_str().unwrap(), "--nats-url", &url], &[]);
        assert!(ok, "{out}{err}");
    }
    let baton = BatonProcess::start(&[
        "serve",
        "--nats-url",
        &url,
        "--http",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    let version = baton_core::registry::Registry::open(&bus.js)
        .await
        .unwrap()
        .head("deploy")
        .await
        .unwrap()
        .unwrap()
        .version;
    let run = crate::saga::start_run(&bus, "deploy", version, json!({"service": "checkout"})).await;
    let journal = wait_for_end(&bus, &run, Duration::from_secs(30), || baton.log()).await;
    assert_eq!(ending(&journal), Some(Ending::Succeeded), "{journal:#?}");
    let emitted = journal
        .iter()
        .find_map(|j| match &j.event {
            RunEvent::StepCompleted(c) if c.step == "announce" => Some(c.output.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(emitted["id"], format!("{run}/announce"));
    let started = expect_runs(&bus, "smoke-test", 1, Duration::from_secs(20), || {
        baton.log()
    })
    .await;
    let smoke = started.into_iter().next().unwrap();
    assert_eq!(
        smoke,
        event::triggered_run_id("smoke-test", "ci/deploy", &format!("{run}/announce"))
    );
    let journal = wait_for_end(&bus, &smoke, Duration::from_secs(30), || baton.log()).await;
    let output = journal.iter().find_map(|j| match &j.event {
        RunEvent::Ended(_, e) => Some(e.output.clone()),
        _ => None,
    });
    assert_eq!(output.unwrap(), json!({"checked": "checkout@7"}));
}
