//! The runner's built-in kinds inside a workflow, against real peers: an HTTP server of the test's
//! own and real processes. A 5xx then success through the step's retry policy, a process killed by
//! its timeout, and a permanent HTTP error that compensates the completed steps (over HTTP too).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use baton_core::event::{Ending, RunEvent};
use baton_tests::{BatonProcess, NatsServer};
use serde_json::{Value, json};

use crate::saga::{apply, ending, start_run};
use crate::{bus, wait_for_end};

const WORKFLOW: &str = r#"
name: kinds-demo
inputs: { base: { type: string } }
steps:
  - id: prepare
    uses: exec
    with: { command: [echo, '{"prepared": true}'] }
    compensate:
      uses: http
      with: { method: POST, url: "${{ .inputs.base }}/undo", body: { step: prepare } }
  - id: flaky
    uses: http
    with: { url: "${{ .inputs.base }}/flaky" }
    retry: { attempts: 3, initial-delay: 100ms }
    compensate:
      uses: http
      with: { method: POST, url: "${{ .inputs.base }}/undo", body: { step: flaky } }
  - id: slow
    uses: exec
    with: { command: [sleep, "30"], timeout: 1s }
    retry: { attempts: 1 }
    on-failure: continue
  - id: reject
    uses: http
    with: { method: POST, url: "${{ .inputs.base }}/reject", body: { order: 7 } }
"#;

#[tokio::test]
async fn http_and_exec_steps_retry_time_out_and_compensate() {
    let flaky_calls = Arc::new(Mutex::new(0));
    let undone = Arc::new(Mutex::new(Vec::<Value>::new()));
    let app = Router::new()
        .route(
            "/flaky",
            get({
                let calls = flaky_calls.clone();
                move || async move {
                    let mut n = calls.lock().unwrap();
                    *n += 1;
                    if *n == 1 {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(json!({"busy": true})),
                        )
                    } else {
                        (StatusCode::OK, axum::Json(json!({"deployed": "v7"})))
                    }
                }
            }),
        )
        .route(
            "/reject",
            post(|| async {
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(json!({"error": "order 7 is invalid"})),
                )
            }),
        )
        .route(
            "/undo",
            post({
                let undone = undone.clone();
                move |axum::Json(body): axum::Json<Value>| async move {
                    undone.lock().unwrap().push(body);
                    axum::Json(json!({"undone": true}))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let server = NatsServer::start();
    let url = server.url();
    let bus = bus(&url).await;
    let version = apply(&bus, "kinds-demo", WORKFLOW).await;
    let coordinator = BatonProcess::start(&["coordinator", "--nats-url", &url]);
    let runner = BatonProcess::start(&["runner", "--nats-url", &url]);
    let run = start_run(&bus, "kinds-demo", version, json!({"base": base})).await;
    let log = || {
        format!(
            "coordinator:\n{}\nrunner:\n{}",
            coordinator.log(),
            runner.log()
        )
    };
    let journal = wait_for_end(&bus, &run, Duration::from_secs(60), log).await;
    assert_eq!(ending(&journal), Some(Ending::Compensated), "{journal:#?}");

    let outcomes = |step: &str| -> Vec<Result<Value, baton_core::event::StepError>> {
        journal
            .iter()
            .filter_map(|j| match &j.event {
                RunEvent::StepCompleted(c) if c.step == step => Some(Ok(c.output.clone())),
                RunEvent::StepFailed(f) if f.step == step => Some(Err(f.error.clone())),
                _ => None,
            })
            .collect()
    };
    // exec: JSON stdout is parsed.
    let prepare = outcomes("prepare");
    assert_eq!(
        prepare[0].as_ref().unwrap()["json"],
        json!({"prepared": true})
    );
    // http: 503 is retryable, the retry succeeds.
    let flaky = outcomes("flaky");
    assert_eq!(flaky.len(), 2, "{flaky:?}");
    let first = flaky[0].as_ref().unwrap_err();
    assert_eq!(
        (first.code.as_deref(), first.retryable),
        (Some("http-503"), true)
    );
    assert_eq!(
        flaky[1].as_ref().unwrap()["body"],
        json!({"deployed": "v7"})
    );
    // exec: the timeout kills the process; the step fails with `timeout` and the run goes on.
    let slow = outcomes("slow");
    assert_eq!(
        slow[0].as_ref().unwrap_err().code.as_deref(),
        Some("timeout")
    );
    // http: 422 is permanent, carries the body, and compensates the completed steps, last first.
    let reject = outcomes("reject");
    assert_eq!(reject.len(), 1, "a permanent error is not retried");
    let error = reject[0].as_ref().unwrap_err();
    assert_eq!(
        (error.code.as_deref(), error.retryable),
        (Some("http-422"), false)
    );
    assert!(error.message.contains("order 7 is invalid"), "{error:?}");
    assert_eq!(
        *undone.lock().unwrap(),
        [json!({"step": "flaky"}), json!({"step": "prepare"})]
    );
}
