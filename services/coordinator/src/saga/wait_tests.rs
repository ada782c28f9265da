//! `wait` steps in the pure core: the request, the timer that bounds the wait, and the outcomes.

use super::*;

fn clock() -> Clock {
    Clock {
        now: "2026-01-01T00:00:00Z".parse().unwrap(),
        random: 0.5,
    }
}

fn workflow(expect: &str, retry: u32) -> Workflow {
    let yaml = format!(
        r#"
name: waiter
inputs:
  id: {{ type: string }}
steps:
  - id: verified
    uses: wait
    timeout: 5s
    retry: {retry}
    with:
      event: com.example.deploy.verified
      key: ${{{{ .inputs.id }}}}
      event-key: ${{{{ .data.id }}}}
      timeout: 10m
      expect: {expect}
  - id: after
    uses: echo
    with: {{ status: "${{{{ .steps.verified.outputs.event.data.status }}}}" }}
"#
    );
    baton_workflow::compile(&yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn start(wf: &Workflow) -> (Run, Vec<RunEvent>) {
    let request = RunRequested {
        run_id: "r".into(),
        workflow: WorkflowRef {
            name: wf.name.clone(),
            version: 1,
        },
        input: json!({"id": "d-1"}),
        trigger: None,
        parent: None,
    };
    let mut run = Run::new(&request, wf, Trace::default());
    let commands = run.handle(&RunEvent::Requested(request), wf, clock());
    (run, commands)
}

fn requested(commands: &[RunEvent]) -> Vec<&StepRequested> {
    commands
        .iter()
        .filter_map(|c| match c {
            RunEvent::StepRequested(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn timers(commands: &[RunEvent]) -> Vec<&Timer> {
    commands
        .iter()
        .filter_map(|c| match c {
            RunEvent::TimerScheduled(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn completed(r: &StepRequested, output: Value) -> RunEvent {
    RunEvent::StepCompleted(StepCompleted {
        run_id: r.run_id.clone(),
        step: r.step.clone(),
        item: r.item,
        kind: r.kind.clone(),
        attempt: r.attempt,
        output,
        runner: "coordinator".into(),
        duration_ms: 0,
    })
}

#[test]
fn a_wait_requests_with_its_key_and_one_timer_of_its_own_timeout() {
    let wf = workflow("event", 1);
    let (_, commands) = start(&wf);
    let [r] = requested(&commands)[..] else {
        panic!("{commands:?}")
    };
    assert_eq!(
        (r.step.as_str(), r.kind.as_str(), r.attempt),
        ("verified", "wait", 1)
    );
    assert_eq!(
        r.input,
        json!({"event": "com.example.deploy.verified", "key": "d-1", "expect": "event"})
    );
    // The wait's 10m, not the step's 5s generic timeout.
    let [t] = timers(&commands)[..] else {
        panic!("{commands:?}")
    };
    assert_eq!(
        t.purpose,
        TimerPurpose::Timeout {
            step: "verified".into(),
            item: None,
            attempt: 1
        }
    );
    assert_eq!(t.due, clock().now + chrono::Duration::minutes(10));
}

#[test]
fn the_event_completes_the_wait_and_the_run_goes_on() {
    let wf = workflow("event", 1);
    let (mut run, commands) = start(&wf);
    let r = requested(&commands)[0].clone();
    let event =
        json!({"type": "com.example.deploy.verified", "data": {"id": "d-1", "status": "green"}});
    let commands = run.handle(&completed(&r, json!({ "event": event })), &wf, clock());
    let next = requested(&commands);
    assert_eq!(next.len(), 1, "{commands:?}");
    assert_eq!(next[0].step, "after");
    assert_eq!(next[0].input, json!({"status": "green"}));
}

#[test]
fn expect_event_fails_with_a_timeout_error_when_the_timer_fires() {
    let wf = workflow("event", 1);
    let (mut run, commands) = start(&wf);
    let timer = timers(&commands)[0].clone();
    let commands = run.handle(&RunEvent::TimerFired(timer), &wf, clock());
    assert_eq!(run.status, Status::Ended(Ending::Failed), "{commands:?}");
    let s = &run.steps[0];
    assert_eq!(s.status, StepStatus::Failed);
    assert_eq!(
        s.exec.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("timeout")
    );
    assert!(run.error.as_deref().unwrap().contains("timed out"));
}

#[test]
fn a_timed_out_wait_is_retried_per_its_policy() {
    let wf = workflow("event", 2);
    let (mut run, commands) = start(&wf);
    let timer = timers(&commands)[0].clone();
    let commands = run.handle(&RunEvent::TimerFired(timer), &wf, clock());
    // The retry timer, then attempt 2 with a new wait timer.
    let [retry] = timers(&commands)[..] else {
        panic!("{commands:?}")
    };
    let commands = run.handle(&RunEvent::TimerFired(retry.clone()), &wf, clock());
    let [r] = requested(&commands)[..] else {
        panic!("{commands:?}")
    };
    assert_eq!((r.step.as_str(), r.attempt), ("verified", 2));
    assert!(matches!(
        timers(&commands)[..],
        [Timer {
            purpose: TimerPurpose::Timeout { attempt: 2, .. },
            ..
        }]
    ));
}

#[test]
fn expect_timeout_completes_with_a_null_event_when_the_timer_fires() {
    let wf = workflow("timeout", 1);
    let (mut run, commands) = start(&wf);
    assert_eq!(requested(&commands)[0].input["expect"], "timeout");
    let timer = timers(&commands)[0].clone();
    let commands = run.handle(&RunEvent::TimerFired(timer.clone()), &wf, clock());
    assert_eq!(run.steps[0].status, StepStatus::Completed);
    assert_eq!(run.steps[0].output, json!({ "event": null }));
    let next = requested(&commands);
    assert_eq!(next.len(), 1, "{commands:?}");
    assert_eq!(next[0].step, "after");
    // A late event for the same attempt changes nothing.
    let late = RunEvent::StepFailed(StepFailed {
        run_id: "r".into(),
        step: "verified".into(),
        item: None,
        kind: "wait".into(),
        attempt: 1,
        error: StepError {
            message: "event received".into(),
            retryable: false,
            code: Some("event-received".into()),
        },
        runner: "coordinator".into(),
    });
    assert_eq!(run.handle(&late, &wf, clock()), []);
    assert_eq!(run.steps[0].status, StepStatus::Completed);
}

#[test]
fn expect_timeout_fails_when_the_event_comes_first() {
    let wf = workflow("timeout", 3);
    let (mut run, commands) = start(&wf);
    let r = requested(&commands)[0].clone();
    let timer = timers(&commands)[0].clone();
    let failed = RunEvent::StepFailed(StepFailed {
        run_id: r.run_id.clone(),
        step: r.step.clone(),
        item: None,
        kind: r.kind.clone(),
        attempt: r.attempt,
        error: StepError {
            message: "the event came".into(),
            retryable: false,
            code: Some("event-received".into()),
        },
        runner: "coordinator".into(),
    });
    run.handle(&failed, &wf, clock());
    // Not retryable: the run fails at once, and the timer firing later changes nothing.
    assert_eq!(run.status, Status::Ended(Ending::Failed));
    assert_eq!(run.handle(&RunEvent::TimerFired(timer), &wf, clock()), []);
    assert_eq!(run.status, Status::Ended(Ending::Failed));
}

#[test]
fn a_replay_of_the_journal_decides_the_same() {
    let wf = workflow("timeout", 1);
    let (mut run, commands) = start(&wf);
    let fired = RunEvent::TimerFired(timers(&commands)[0].clone());
    let after = run.handle(&fired, &wf, clock());
    // Rebuilt from the events only (no workflow in `apply`): nothing left to issue.
    let (mut replayed, _) = start(&wf);
    replayed.apply(&fired);
    for e in &after {
        replayed.apply(e);
    }
    assert_eq!(replayed.decide(&wf, clock()), []);
    assert_eq!(replayed.steps[0].output, json!({ "event": null }));
    assert_eq!(replayed.steps[1].status, StepStatus::Running);
}
