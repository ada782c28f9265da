use chrono::TimeZone;
use serde_json::json;

use super::*;
use crate::event::{
    RunCompensating, RunEnded, RunRequested, StepActivity, StepCompleted, StepFailed, Timer,
    Trigger, WorkflowRef,
};

const WORKFLOW: &str = r#"
name: deploy
steps:
  - id: one
    uses: echo
    compensate: { uses: echo }
  - id: two
    uses: exec
    needs: []
    retry: { attempts: 2 }
    compensate: { uses: echo }
  - id: three
    uses: exec
    needs: [one, two]
"#;

const EVENT_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(1_767_225_600_000 + ms).unwrap()
}

fn request(step: &str, kind: &str, attempt: u32) -> StepRequested {
    StepRequested {
        run_id: "r1".into(),
        step: step.into(),
        item: None,
        items: None,
        kind: kind.into(),
        attempt,
        input: json!({}),
        idempotency_key: format!("r1/{step}"),
        secrets: Vec::new(),
        timeout_ms: None,
    }
}

fn started(step: &str, kind: &str, attempt: u32, compensation: bool, runner: &str) -> RunEvent {
    RunEvent::StepStarted(StepActivity {
        run_id: "r1".into(),
        step: step.into(),
        item: None,
        kind: kind.into(),
        attempt,
        compensation,
        runner: runner.into(),
        delivered: 1,
        elapsed_ms: 0,
    })
}

fn completed(step: &str, kind: &str, attempt: u32, runner: &str) -> StepCompleted {
    StepCompleted {
        run_id: "r1".into(),
        step: step.into(),
        item: None,
        kind: kind.into(),
        attempt,
        output: json!({}),
        runner: runner.into(),
        duration_ms: 1,
    }
}

fn failed(step: &str, attempt: u32, code: &str, retryable: bool) -> RunEvent {
    RunEvent::StepFailed(StepFailed {
        run_id: "r1".into(),
        step: step.into(),
        item: None,
        kind: "exec".into(),
        attempt,
        error: StepError {
            message: format!("{step} broke"),
            retryable,
            code: Some(code.into()),
        },
        runner: "runner-b".into(),
    })
}

/// A triggered run: one (runner a) and two (runner b, retried once) complete, three (needs both)
/// fails, two and one are compensated.
fn journal() -> (Trace, Vec<(DateTime<Utc>, RunEvent)>) {
    let event_trace = Trace::parse(&[EVENT_TRACE], &[]).unwrap();
    let requested = RunEvent::Requested(RunRequested {
        run_id: "r1".into(),
        workflow: WorkflowRef {
            name: "deploy".into(),
            version: 3,
        },
        input: json!({}),
        trigger: Some(Trigger {
            id: "e1".into(),
            source: "/ci".into(),
            ty: "com.example.push".into(),
            subject: None,
            time: None,
            data: json!({}),
            extensions: Default::default(),
        }),
        parent: None,
    });
    let events = vec![
        requested,
        RunEvent::StepRequested(request("one", "echo", 1)),
        RunEvent::StepRequested(request("two", "exec", 1)),
        started("one", "echo", 1, false, "runner-a"),
        started("two", "exec", 1, false, "runner-b"),
        RunEvent::StepCompleted(completed("one", "echo", 1, "runner-a")),
        failed("two", 1, "exit-3", true),
        // Once fired, the journal has only the server's copy of the retry timer.
        RunEvent::TimerFired(Timer {
            run_id: "r1".into(),
            purpose: TimerPurpose::Retry {
                step: "two".into(),
                item: None,
                attempt: 2,
            },
            due: at(1000),
        }),
        RunEvent::StepRequested(request("two", "exec", 2)),
        started("two", "exec", 2, false, "runner-b"),
        RunEvent::StepCompleted(completed("two", "exec", 2, "runner-b")),
        RunEvent::StepRequested(request("three", "exec", 1)),
        started("three", "exec", 1, false, "runner-b"),
        failed("three", 1, "exit-1", false),
        RunEvent::Compensating(RunCompensating {
            run_id: "r1".into(),
            reason: "step three failed".into(),
            step: Some("three".into()),
            plan: vec!["two".into(), "one".into()],
        }),
        RunEvent::CompensationRequested(request("two", "echo", 1)),
        started("two", "echo", 1, true, "runner-a"),
        RunEvent::CompensationCompleted(completed("two", "echo", 1, "runner-a")),
        RunEvent::CompensationRequested(request("one", "echo", 1)),
        started("one", "echo", 1, true, "runner-a"),
        RunEvent::CompensationCompleted(completed("one", "echo", 1, "runner-a")),
        RunEvent::Ended(
            Ending::Compensated,
            RunEnded {
                run_id: "r1".into(),
                output: serde_json::Value::Null,
                error: Some("step three failed".into()),
                step: Some("three".into()),
                round: 1,
            },
        ),
    ];
    let timed = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| (at(i as i64 * 100), e))
        .collect();
    (event_trace, timed)
}

fn build(trace: &Trace, events: &[(DateTime<Utc>, RunEvent)]) -> Vec<Span> {
    let wf = baton_workflow::compile(WORKFLOW).unwrap();
    let entries: Vec<Entry<'_>> = events
        .iter()
        .enumerate()
        .map(|(i, (time, event))| Entry {
            time: *time,
            // Only the request's context counts; later events carry the run span's.
            trace: (i == 0).then_some(trace),
            event,
        })
        .collect();
    from_journal(&entries, &wf)
}

#[test]
fn ids_are_deterministic_distinct_and_valid() {
    let ids = [
        run_span_id("r1"),
        run_span_id("r2"),
        attempt_span_id("r1", "a", None, 1),
        attempt_span_id("r1", "a", None, 2),
        attempt_span_id("r1", "a", Some(0), 1),
        attempt_span_id("r1", "b", None, 1),
        compensation_span_id("r1", "a", 1),
    ];
    for id in &ids {
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    assert_eq!(run_span_id("r1"), run_span_id("r1"));
    // Pinned: changing the derivation would break traces that span a Baton upgrade.
    assert_eq!(run_span_id("r1"), hash("run", &["r1"], 8));
    assert_eq!(fallback_trace("r1"), fallback_trace("r1"));
    assert_eq!(fallback_trace("r1").trace_id.len(), 32);
}

#[test]
fn traces_baton_starts_are_roots_and_incoming_ones_are_not() {
    assert!(is_root(&Trace::new()));
    assert!(is_root(&fallback_trace("r1")));
    let incoming = Trace::parse(&[EVENT_TRACE], &[]).unwrap();
    assert!(!is_root(&incoming));
    let cx = run_context(&incoming, "r1");
    assert_eq!(cx.trace_id, incoming.trace_id);
    assert_eq!(cx.parent_id, run_span_id("r1"));
    let r = request("two", "exec", 2);
    assert_eq!(
        attempt_context(&cx, &r, false).parent_id,
        attempt_span_id("r1", "two", None, 2)
    );
    assert_eq!(
        attempt_context(&cx, &r, true).parent_id,
        compensation_span_id("r1", "two", 2)
    );
}

#[test]
fn a_run_is_one_trace_continuing_its_event() {
    let (trace, events) = journal();
    let spans = build(&trace, &events);
    let run = &spans[0];
    assert_eq!(run.name, "run deploy");
    assert_eq!(run.span_id, run_span_id("r1"));
    assert_eq!(run.parent_id.as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(run.start, at(0));
    assert_eq!(run.end, at(2100));
    assert_eq!(run.status, Status::Error("step three failed".into()));
    assert_eq!(
        run.attribute("baton.outcome"),
        Some(&Attr::from("compensated"))
    );
    assert_eq!(run.attribute("baton.workflow.version"), Some(&Attr::Int(3)));
    assert_eq!(
        run.attribute("cloudevents.event_id"),
        Some(&Attr::from("e1"))
    );
    let names: Vec<&str> = run.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "step.requested",
            "step.requested",
            "step.failed",
            "retry scheduled",
            "step.requested",
            "step.requested",
            "step.failed",
            "compensating",
            "compensation.requested",
            "compensation.requested",
        ]
    );

    let retry = &run.events[3];
    assert_eq!(retry.time, at(600), "decided at the failure it retries");
    assert_eq!(
        retry.attributes,
        [
            ("baton.step", Attr::from("two")),
            ("baton.step.attempt", Attr::Int(2)),
            ("baton.retry.due", Attr::from("2026-01-01T00:00:01.000Z")),
        ]
    );

    let attempts: Vec<(&str, Option<&Attr>, &Origin)> = spans[1..]
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.attribute("baton.step.attempt"),
                &s.origin,
            )
        })
        .collect();
    let a = Origin::Runner("runner-a".into());
    let b = Origin::Runner("runner-b".into());
    assert_eq!(
        attempts,
        [
            ("step one", Some(&Attr::Int(1)), &a),
            ("step two", Some(&Attr::Int(1)), &b),
            ("step two", Some(&Attr::Int(2)), &b),
            ("step three", Some(&Attr::Int(1)), &b),
            ("compensate two", Some(&Attr::Int(1)), &a),
            ("compensate one", Some(&Attr::Int(1)), &a),
        ]
    );
    for s in &spans {
        assert_eq!(s.trace_id, trace.trace_id);
        assert!(s.sampled);
    }
    for s in &spans[1..] {
        assert_eq!(s.parent_id.as_deref(), Some(run.span_id.as_str()));
        assert_eq!(s.kind, Kind::Consumer);
    }
    assert_eq!(spans[2].span_id, attempt_span_id("r1", "two", None, 1));
    assert_eq!(spans[2].status, Status::Error("two broke".into()));
    assert_eq!(
        spans[2].attribute("error.type"),
        Some(&Attr::from("exit-3"))
    );
    assert_eq!(spans[5].span_id, compensation_span_id("r1", "two", 1));
    assert_eq!(
        spans[5].attribute("baton.compensation"),
        Some(&Attr::Bool(true))
    );
    // The fan-in step links to the attempts it depended on: one's first, two's second.
    assert_eq!(
        spans[4].links,
        [
            attempt_span_id("r1", "one", None, 1),
            attempt_span_id("r1", "two", None, 2)
        ]
    );
    assert!(spans[1].links.is_empty());
}

/// What a runner exports live is the span the journal gives for the same attempt.
#[test]
fn the_runners_span_is_the_journals() {
    let (trace, events) = journal();
    let spans = build(&trace, &events);
    let from_journal = &spans[4];
    let r = request("three", "exec", 1);
    let context = run_context(&trace, "r1");
    let links = [
        attempt_span_id("r1", "one", None, 1),
        attempt_span_id("r1", "two", None, 2),
    ];
    let error = StepError {
        message: "three broke".into(),
        retryable: false,
        code: Some("exit-1".into()),
    };
    let live = attempt_span(&Attempt {
        request: &r,
        compensation: false,
        context: &context,
        links: &links,
        runner: Some("runner-b"),
        delivered: 1,
        start: from_journal.start,
        end: from_journal.end,
        outcome: Outcome::Failed(error),
    });
    assert_eq!(&live, from_journal);
}

#[test]
fn coordinator_steps_and_unsampled_traces() {
    let wf = baton_workflow::compile(
        "name: nap\nsteps:\n  - id: nap\n    uses: sleep\n    with: { duration: 1h }\n  - id: wait\n    uses: wait\n    with: { event: com.example.x, key: k, event-key: \"${{ .subject }}\", timeout: 1s }\n",
    )
    .unwrap();
    let unsampled = Trace::parse(
        &["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"],
        &[],
    )
    .unwrap();
    let requested = RunEvent::Requested(RunRequested {
        run_id: "r1".into(),
        workflow: WorkflowRef {
            name: "nap".into(),
            version: 1,
        },
        input: json!({}),
        trigger: None,
        parent: None,
    });
    let nap = request("nap", "sleep", 1);
    let events = [
        requested,
        RunEvent::StepRequested(nap),
        RunEvent::StepCompleted(completed("nap", "sleep", 1, "coordinator")),
        RunEvent::StepRequested(request("wait", "wait", 1)),
        RunEvent::TimerFired(Timer {
            run_id: "r1".into(),
            purpose: TimerPurpose::Timeout {
                step: "wait".into(),
                item: None,
                attempt: 1,
            },
            due: at(300),
        }),
    ];
    let entries: Vec<Entry<'_>> = events
        .iter()
        .enumerate()
        .map(|(i, event)| Entry {
            time: at(i as i64 * 100),
            trace: (i == 0).then_some(&unsampled),
            event,
        })
        .collect();
    let spans = from_journal(&entries, &wf);
    assert_eq!(spans.len(), 3);
    assert!(spans.iter().all(|s| !s.sampled));
    assert_eq!(
        spans[0].attribute("baton.outcome"),
        Some(&Attr::from("running"))
    );
    assert_eq!(spans[1].origin, Origin::Coordinator);
    assert_eq!(spans[1].kind, Kind::Internal);
    assert_eq!((spans[1].start, spans[1].end), (at(100), at(200)));
    assert_eq!(
        spans[2].attribute("error.type"),
        Some(&Attr::from("timeout"))
    );
    assert_eq!(spans[0].events.last().unwrap().name, "timed out");
    // A journal that does not start with the request has no spans.
    assert!(from_journal(&entries[1..], &wf).is_empty());
}

#[test]
fn links_extension_round_trip() {
    let ids = [run_span_id("a"), run_span_id("b")];
    assert_eq!(parse_links(&ids.join(",")), ids);
    assert_eq!(
        parse_links("zz, 0123456789ABCDEF,short"),
        ["0123456789abcdef"]
    );
}
