use super::*;
use baton_core::event::{CancelRequested, StepCompleted, StepError, StepFailed};
use baton_core::trace::Trace;
use proptest::prelude::*;

const DIAMOND: &str = r#"
name: diamond
inputs:
  n: { type: number, default: 1 }
steps:
  - id: a
    uses: echo
    with: { v: "${{ .inputs.n }}" }
  - id: b
    uses: echo
    needs: [a]
    with: { v: "${{ .steps.a.outputs.v + 1 }}" }
  - id: c
    uses: echo
    needs: [a]
    if: ${{ .inputs.n > 5 }}
  - id: d
    uses: echo
    needs: [b, c]
    if: ${{ true }}
    with: { v: "${{ .steps.b.outputs.v * 10 }}" }
outputs:
  d: ${{ .steps.d.outputs.v }}
"#;

fn setup() -> (Workflow, Run) {
    let wf = baton_workflow::compile(DIAMOND).unwrap();
    let req = RunRequested {
        run_id: "r1".into(),
        workflow: WorkflowRef {
            name: "diamond".into(),
            version: 1,
        },
        input: Value::Null,
        trigger: None,
    };
    let run = Run::new(&req, &wf, Trace::new());
    (wf, run)
}

fn completed(step: &str, output: Value) -> RunEvent {
    RunEvent::StepCompleted(StepCompleted {
        run_id: "r1".into(),
        step: step.into(),
        attempt: 1,
        output,
        runner: "t".into(),
        duration_ms: 1,
    })
}

/// Acts as a perfect runner: completes every requested step with its input as output.
fn drive(wf: &Workflow, run: &mut Run, first: RunEvent) -> Vec<RunEvent> {
    let mut journal = vec![first.clone()];
    let mut queue = run.handle(&first, wf);
    while let Some(cmd) = queue.pop() {
        journal.push(cmd.clone());
        if let RunEvent::StepRequested(r) = cmd {
            let done = completed(&r.step, r.input);
            journal.push(done.clone());
            queue.extend(run.handle(&done, wf));
        }
    }
    journal
}

#[test]
fn runs_a_dag_with_skips_and_templated_inputs() {
    let (wf, mut run) = setup();
    let req = RunEvent::Requested(RunRequested {
        run_id: "r1".into(),
        workflow: run.workflow.clone(),
        input: run.input.clone(),
        trigger: None,
    });
    let journal = drive(&wf, &mut run, req);
    assert_eq!(run.status, Status::Succeeded);
    assert_eq!(run.output, json!({"d": 20}));
    assert_eq!(
        run.steps[2].status,
        StepStatus::Skipped,
        "c's `if` is false"
    );
    assert_eq!(
        run.steps[3].status,
        StepStatus::Completed { attempt: 1 },
        "d has its own `if`"
    );
    let requested: Vec<_> = journal
        .iter()
        .filter_map(|e| match e {
            RunEvent::StepRequested(r) => Some(r.step.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(requested, ["a", "b", "d"]);
}

#[test]
fn a_failed_step_fails_the_run_and_nothing_starts_after() {
    let (wf, mut run) = setup();
    let cmds = run.decide(&wf);
    assert_eq!(cmds.len(), 1);
    let failed = RunEvent::StepFailed(StepFailed {
        run_id: "r1".into(),
        step: "a".into(),
        attempt: 1,
        error: StepError {
            message: "boom".into(),
            retryable: false,
        },
        runner: "t".into(),
    });
    let cmds = run.handle(&failed, &wf);
    assert!(
        matches!(&cmds[..], [RunEvent::Failed(f)] if f.error == "step a failed: boom" && f.step.as_deref() == Some("a"))
    );
    assert!(
        run.handle(&completed("a", json!({"v": 1})), &wf).is_empty(),
        "no step after the end"
    );
    assert_eq!(run.status, Status::Failed);
}

#[test]
fn cancel_ends_a_running_run() {
    let (wf, mut run) = setup();
    run.decide(&wf);
    let cmds = run.handle(
        &RunEvent::CancelRequested(CancelRequested {
            run_id: "r1".into(),
            reason: "by hand".into(),
        }),
        &wf,
    );
    assert!(matches!(&cmds[..], [RunEvent::Failed(f)] if f.error == "cancelled: by hand"));
}

proptest! {
    /// Replaying a journal with duplicates, in any order of delivery of the events a coordinator
    /// receives, gives the same final state, and no command is issued twice.
    #[test]
    fn duplicates_and_reordering_do_not_change_the_outcome(seed in any::<u64>(), dups in 0usize..6) {
        let (wf, mut reference) = setup();
        let req = RunEvent::Requested(RunRequested {
            run_id: "r1".into(), workflow: reference.workflow.clone(), input: reference.input.clone(), trigger: None,
        });
        let journal = drive(&wf, &mut reference, req.clone());

        // A fresh coordinator receives the runners' outcomes again, some several times, shuffled.
        let mut inbox: Vec<RunEvent> = journal.iter().filter(|e| matches!(e, RunEvent::StepCompleted(_))).cloned().collect();
        let mut rng = seed;
        for i in 0..dups {
            let pick = inbox[i % inbox.len()].clone();
            inbox.push(pick);
        }
        for i in (1..inbox.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            inbox.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let (_, mut run) = setup();
        let mut issued = run.handle(&req, &wf);
        // Deliver until quiescent: an outcome arriving before its request is ignored and delivered again later.
        for _ in 0..10 {
            for e in &inbox {
                issued.extend(run.handle(e, &wf));
            }
        }
        prop_assert_eq!(run.status, Status::Succeeded);
        prop_assert_eq!(&run.output, &reference.output);
        let ids: Vec<_> = issued.iter().map(RunEvent::id).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(ids.len(), unique.len(), "a command was issued twice: {:?}", ids);
    }
}

#[test]
fn an_invalid_input_fails_the_run_with_the_reason() {
    let wf = baton_workflow::compile(DIAMOND).unwrap();
    let req = RunRequested {
        run_id: "r1".into(),
        workflow: WorkflowRef {
            name: "diamond".into(),
            version: 1,
        },
        input: json!({"n": "three"}),
        trigger: None,
    };
    let mut run = Run::new(&req, &wf, Trace::new());
    let cmds = run.decide(&wf);
    assert!(
        matches!(&cmds[..], [RunEvent::Failed(f)] if f.error == "invalid input: input `n` must be a number, got \"three\""),
        "{cmds:?}"
    );
}
