//! The saga as the coordinator drives it: scripted runners answer the commands, timers fire when
//! the test says so, and the property tests shuffle, duplicate and replay the journal.

use super::*;
use baton_core::event::{CancelRequested, CompensationRetryRequested};
use proptest::prelude::*;
use std::collections::VecDeque;

fn clock() -> Clock {
    Clock {
        now: "2026-01-01T00:00:00Z".parse().unwrap(),
        random: 0.5,
    }
}

fn request(run_id: &str, wf: &Workflow, input: Value, parent: Option<Parent>) -> RunRequested {
    RunRequested {
        run_id: run_id.into(),
        workflow: WorkflowRef {
            name: wf.name.clone(),
            version: 1,
        },
        input,
        trigger: None,
        parent,
    }
}

/// A run of `yaml` driven through `handle`, checking after every event what must always hold.
struct Sim {
    wf: Workflow,
    run: Run,
    /// Every event handled, each followed by the commands it caused.
    journal: Vec<RunEvent>,
}

impl Sim {
    fn new(yaml: &str, input: Value) -> Sim {
        Sim::with_request(yaml, |wf| request("r", wf, input, None))
    }

    fn with_request(yaml: &str, req: impl FnOnce(&Workflow) -> RunRequested) -> Sim {
        let wf = baton_workflow::compile(yaml).unwrap_or_else(|e| panic!("{e}"));
        let req = req(&wf);
        let run = Run::new(&req, &wf, Trace::default());
        Sim {
            wf,
            run,
            journal: Vec::new(),
        }
    }

    /// The commands of `Requested`.
    fn start(&mut self) -> Vec<RunEvent> {
        let req = RunEvent::Requested(request(
            &self.run.id,
            &self.wf,
            self.run.input.clone(),
            self.run.parent.clone(),
        ));
        self.send(req)
    }

    fn send(&mut self, event: RunEvent) -> Vec<RunEvent> {
        let was = self.run.status;
        let commands = self.run.handle(&event, &self.wf, clock());
        check_commands(was, &event, &commands);
        assert_eq!(
            self.run.decide(&self.wf, clock()),
            [],
            "decide after handle must have nothing left to issue"
        );
        self.journal.push(event);
        self.journal.extend(commands.iter().cloned());
        commands
    }

    fn step(&self, id: &str) -> &StepState {
        self.run.steps.iter().find(|s| s.id == id).unwrap()
    }
}

/// What no batch of commands may ever do.
fn check_commands(was: Status, event: &RunEvent, commands: &[RunEvent]) {
    if was.is_terminal() && !matches!(event, RunEvent::CompensationRetryRequested(_)) {
        assert_eq!(
            commands,
            [],
            "an ended run issued commands after {}",
            show(event)
        );
    }
    let mut failing = was != Status::Running;
    for c in commands {
        match c {
            RunEvent::StepRequested(r) => {
                assert!(
                    !failing,
                    "step {} requested while the run is {was:?} or failing",
                    r.step
                )
            }
            RunEvent::Compensating(_) | RunEvent::Ended(..) => failing = true,
            _ => {}
        }
    }
}

/// One line per event, so that a test can state a sequence of commands at a glance.
fn show(e: &RunEvent) -> String {
    let exec = |step: &str, item: Option<u32>, attempt: u32| match item {
        Some(i) => format!("{step}[{i}]#{attempt}"),
        None => format!("{step}#{attempt}"),
    };
    let timer = |t: &Timer| {
        let n = match &t.purpose {
            TimerPurpose::Retry { attempt, .. }
            | TimerPurpose::Timeout { attempt, .. }
            | TimerPurpose::CompensationRetry { attempt, .. }
            | TimerPurpose::CompensationTimeout { attempt, .. } => format!("#{attempt}"),
            TimerPurpose::Sleep { .. } | TimerPurpose::RunTimeout => String::new(),
        };
        format!("{}{n} +{}s", t.name(), (t.due - clock().now).num_seconds())
    };
    match e {
        RunEvent::Requested(_) => "requested".into(),
        RunEvent::CancelRequested(_) => "cancel".into(),
        RunEvent::CompensationRetryRequested(_) => "retry compensation".into(),
        RunEvent::StepRequested(r) => format!("request {}", exec(&r.step, r.item, r.attempt)),
        RunEvent::StepStarted(_) | RunEvent::StepHeartbeat(_) => "activity".into(),
        RunEvent::StepCompleted(c) => format!("completed {}", exec(&c.step, c.item, c.attempt)),
        RunEvent::StepFailed(f) => format!("failed {}", exec(&f.step, f.item, f.attempt)),
        RunEvent::CompensationRequested(r) => {
            format!("compensate {}", exec(&r.step, None, r.attempt))
        }
        RunEvent::CompensationCompleted(c) => {
            format!("compensated {}", exec(&c.step, None, c.attempt))
        }
        RunEvent::CompensationFailed(f) => {
            format!("compensation failed {}", exec(&f.step, None, f.attempt))
        }
        RunEvent::TimerScheduled(t) => format!("timer {}", timer(t)),
        RunEvent::TimerFired(t) => format!("fired {}", timer(t)),
        RunEvent::Compensating(c) => format!("compensating [{}]", c.plan.join(", ")),
        RunEvent::Ended(ending, e) => format!("ended {} (round {})", ending.verb(), e.round),
    }
}

fn shown(events: &[RunEvent]) -> Vec<String> {
    events.iter().map(show).collect()
}

/// The one command in `commands` that `show` prints as `what`.
fn find<'a>(commands: &'a [RunEvent], what: &str) -> &'a RunEvent {
    let found: Vec<_> = commands.iter().filter(|c| show(c) == what).collect();
    assert_eq!(found.len(), 1, "{what} in {:?}", shown(commands));
    found[0]
}

/// The step (or compensation) request among `commands` that `show` prints as `what`.
fn req<'a>(commands: &'a [RunEvent], what: &str) -> &'a StepRequested {
    match find(commands, what) {
        RunEvent::StepRequested(r) | RunEvent::CompensationRequested(r) => r,
        other => panic!("not a request: {other:?}"),
    }
}

/// The runner's answer to a request: success with `output`.
fn ok(request: &RunEvent, output: Value) -> RunEvent {
    let (RunEvent::StepRequested(r) | RunEvent::CompensationRequested(r)) = request else {
        panic!("not a request: {request:?}")
    };
    let c = StepCompleted {
        run_id: r.run_id.clone(),
        step: r.step.clone(),
        item: r.item,
        kind: r.kind.clone(),
        attempt: r.attempt,
        output,
        runner: "test".into(),
        duration_ms: 1,
    };
    match request {
        RunEvent::StepRequested(_) => RunEvent::StepCompleted(c),
        _ => RunEvent::CompensationCompleted(c),
    }
}

/// The runner's answer to a request: failure, retryable or not.
fn err(request: &RunEvent, retryable: bool) -> RunEvent {
    let (RunEvent::StepRequested(r) | RunEvent::CompensationRequested(r)) = request else {
        panic!("not a request: {request:?}")
    };
    let f = StepFailed {
        run_id: r.run_id.clone(),
        step: r.step.clone(),
        item: r.item,
        kind: r.kind.clone(),
        attempt: r.attempt,
        error: StepError {
            message: format!("{} broke", r.step),
            retryable,
            code: None,
        },
        runner: "test".into(),
    };
    match request {
        RunEvent::StepRequested(_) => RunEvent::StepFailed(f),
        _ => RunEvent::CompensationFailed(f),
    }
}

/// The server firing a scheduled timer.
fn fire(scheduled: &RunEvent) -> RunEvent {
    let RunEvent::TimerScheduled(t) = scheduled else {
        panic!("not a timer: {scheduled:?}")
    };
    RunEvent::TimerFired(t.clone())
}

/// Echoes: completes a request with its input.
fn echo(request: &RunEvent) -> RunEvent {
    let (RunEvent::StepRequested(r) | RunEvent::CompensationRequested(r)) = request else {
        panic!("not a request: {request:?}")
    };
    ok(request, r.input.clone())
}

fn cancel(reason: &str) -> RunEvent {
    RunEvent::CancelRequested(CancelRequested {
        run_id: "r".into(),
        reason: reason.into(),
    })
}

/// A request to retry the compensation that failed in end `round` of the run.
fn retry_compensation(round: u32) -> RunEvent {
    RunEvent::CompensationRetryRequested(CompensationRetryRequested {
        run_id: "r".into(),
        round,
    })
}

/// A new run that folds `journal` in without deciding, as the coordinator does when it rebuilds.
fn replay(wf: &Workflow, req: &RunRequested, journal: &[RunEvent]) -> Run {
    let mut run = Run::new(req, wf, Trace::default());
    for e in journal {
        run.apply(e);
    }
    run
}

fn ended(run: &Run) -> Option<Ending> {
    match run.status {
        Status::Ended(e) => Some(e),
        _ => None,
    }
}

const DAG: &str = r#"
name: dag
inputs:
  n: { type: integer, default: 2 }
steps:
  - id: a
    uses: echo
    with: { v: "${{ .inputs.n }}" }
  - id: b
    uses: echo
    needs: [a]
    with: { v: "${{ .steps.a.outputs.v + 1 }}" }
  - id: e
    uses: echo
    needs: [a]
    with: { v: "${{ .steps.a.outputs.v * 3 }}" }
  - id: c
    uses: echo
    needs: [a]
    if: ${{ .inputs.n > 5 }}
    with: { v: 0 }
  - id: after-c
    uses: echo
    needs: [c]
  - id: d
    uses: echo
    needs: [b, c, e]
    if: ${{ .steps.c.status == "skipped" }}
    with:
      v: "${{ .steps.b.outputs.v * 10 + .steps.e.outputs.v }}"
      msg: "b gave ${{ .steps.b.outputs.v }} for run ${{ .run.id }}"
    outputs:
      doubled: ${{ .result.v * 2 }}
outputs:
  d: ${{ .steps.d.outputs.doubled }}
  c: ${{ .steps.c.status }}
"#;

#[test]
fn a_dag_fans_out_skips_and_fans_in() {
    let mut sim = Sim::new(DAG, json!({}));
    let cmds = sim.start();
    assert_eq!(shown(&cmds), ["request a#1"]);
    assert_eq!(
        req(&cmds, "request a#1").input,
        json!({"v": 2}),
        "the default input is filled in"
    );
    assert_eq!(req(&cmds, "request a#1").idempotency_key, "r/a");

    // Fan-out: b and e start together; c's `if` is false, and after-c (no `if`) follows it.
    let cmds = sim.send(echo(&cmds[0]));
    assert_eq!(shown(&cmds), ["request b#1", "request e#1"]);
    assert_eq!(req(&cmds, "request b#1").input, json!({"v": 3}));
    assert_eq!(req(&cmds, "request e#1").input, json!({"v": 6}));
    assert_eq!(sim.step("c").status, StepStatus::Skipped);
    assert_eq!(sim.step("after-c").status, StepStatus::Skipped);

    // Fan-in: d waits for both, whatever order they complete in.
    let (b, e) = (cmds[0].clone(), cmds[1].clone());
    assert_eq!(sim.send(echo(&e)), []);
    let cmds = sim.send(echo(&b));
    assert_eq!(shown(&cmds), ["request d#1"]);
    assert_eq!(
        req(&cmds, "request d#1").input,
        json!({"v": 36, "msg": "b gave 3 for run r"})
    );

    let cmds = sim.send(echo(&cmds[0]));
    assert_eq!(shown(&cmds), ["ended succeeded (round 1)"]);
    let RunEvent::Ended(_, end) = &cmds[0] else {
        unreachable!()
    };
    assert_eq!(end.output, json!({"d": 72, "c": "skipped"}));
    assert_eq!(end.error, None);
    assert_eq!(sim.run.output, end.output);
    assert_eq!(
        sim.step("d").output,
        json!({"doubled": 72}),
        "named outputs over `.result`"
    );
    assert_eq!(sim.run.status, Status::Ended(Ending::Succeeded));

    // A late duplicate changes nothing.
    assert_eq!(sim.send(echo(&b)), []);
}

#[test]
fn an_invalid_input_or_expression_fails_the_run_with_the_reason() {
    let mut sim = Sim::new(DAG, json!({"n": "three"}));
    let cmds = sim.start();
    assert_eq!(shown(&cmds), ["ended failed (round 1)"]);
    let error = sim.run.error.clone().unwrap();
    assert!(
        error.starts_with("invalid input: ") && error.contains("`n`"),
        "{error}"
    );

    let mut sim = Sim::new(
        "name: bad\nsteps:\n  - id: a\n    uses: echo\n    with: { v: \"${{ .inputs.x | error }}\" }\ninputs: { x: { default: boom } }\n",
        json!({}),
    );
    assert_eq!(shown(&sim.start()), ["ended failed (round 1)"]);
    assert_eq!(sim.run.failed_step.as_deref(), Some("a"));
    assert!(
        sim.run
            .error
            .as_deref()
            .unwrap()
            .starts_with("step a: `with`"),
        "{:?}",
        sim.run.error
    );
}

#[test]
fn a_step_input_too_large_to_store_fails_the_run_once_and_compensates() {
    // Two expressions of 560,000 bytes each (one alone may give at most 1 MiB): an input over the
    // limit of a step request, which no retry could ever store.
    let yaml = r#"
name: big
steps:
  - id: small
    uses: echo
    compensate: { uses: echo, with: { undo: true } }
  - id: huge
    uses: echo
    with:
      a: '${{ [range(0; 35000)] | map("0123456789abcdef") | join("") }}'
      b: '${{ [range(0; 35000)] | map("0123456789abcdef") | join("") }}'
"#;
    let mut sim = Sim::new(yaml, json!({}));
    let cmds = sim.start();
    assert_eq!(shown(&cmds), ["request small#1"]);
    let cmds = sim.send(ok(&cmds[0], json!({})));
    assert_eq!(shown(&cmds), ["compensating [small]", "compensate small#1"]);
    assert_eq!(sim.run.failed_step.as_deref(), Some("huge"));
    let reason = sim
        .run
        .error
        .clone()
        .or(sim.run.reason.clone())
        .unwrap_or_default();
    let RunEvent::Compensating(c) = &cmds[0] else {
        unreachable!()
    };
    assert!(
        c.reason
            .contains("step huge: its input is 1120015 bytes, more than the 983040"),
        "{} / {reason}",
        c.reason
    );
    let cmds = sim.send(ok(&cmds[1], json!({})));
    assert_eq!(shown(&cmds), ["ended compensated (round 1)"]);
    // Nothing is left to issue: no request is retried, however often the run is replayed.
    assert_eq!(sim.run.decide(&sim.wf, clock()), []);
}

const RETRY: &str = r#"
name: retry
steps:
  - id: flaky
    uses: http
    with: { url: "http://example.com" }
    retry: { attempts: 3, initial-delay: 2s, factor: 3, max-delay: 1m, jitter: 0.5 }
  - id: picky
    uses: http
    retry: { attempts: 3, initial-delay: 1s, on: [http-409] }
"#;

#[test]
fn a_failed_attempt_is_retried_after_its_backoff_with_the_same_key() {
    let mut sim = Sim::new(RETRY, json!({}));
    let first = sim.start();
    let key = req(&first, "request flaky#1").idempotency_key.clone();

    // Attempt 1 fails: a retry timer at now + 2s (jitter is ±50%, and the random number 0.5 is its middle).
    let cmds = sim.send(err(&first[0], true));
    assert_eq!(shown(&cmds), ["timer retry-flaky#2 +2s"]);
    assert_eq!(sim.step("flaky").exec.state, ExecState::Backoff);
    let cmds = sim.send(fire(&cmds[0]));
    assert_eq!(shown(&cmds), ["request flaky#2"]);
    let second = req(&cmds, "request flaky#2");
    assert_eq!(
        (&second.idempotency_key, &second.input),
        (&key, &req(&first, "request flaky#1").input)
    );

    // Attempt 2 fails: 2s * 3.
    let cmds = sim.send(err(&cmds[0], true));
    assert_eq!(shown(&cmds), ["timer retry-flaky#3 +6s"]);
    let timer = cmds[0].clone();
    let cmds = sim.send(fire(&timer));
    assert_eq!(req(&cmds, "request flaky#3").idempotency_key, key);
    assert_eq!(
        sim.send(fire(&timer)),
        [],
        "a timer fired twice requests once"
    );
    assert_eq!(
        sim.send(err(&first[0], true)),
        [],
        "an outcome of an old attempt is ignored"
    );

    // The budget is spent: the run fails, naming the step.
    let cmds = sim.send(err(&cmds[0], true));
    assert_eq!(shown(&cmds), ["ended failed (round 1)"]);
    assert_eq!(sim.run.failed_step.as_deref(), Some("flaky"));
    assert_eq!(
        sim.run.error.as_deref(),
        Some("step flaky failed after 3 attempt(s): flaky broke")
    );
    assert_eq!(sim.step("flaky").status, StepStatus::Failed);
}

#[test]
fn a_permanent_error_is_not_retried_unless_the_policy_names_its_code() {
    let mut sim = Sim::new(RETRY, json!({}));
    let cmds = sim.start();
    assert_eq!(
        shown(&sim.send(err(&cmds[0], false))),
        ["ended failed (round 1)"]
    );

    // `on: [http-409]` retries a permanent error with that code, and nothing else.
    let mut sim = Sim::new(RETRY, json!({}));
    let cmds = sim.start();
    let cmds = sim.send(echo(&cmds[0]));
    let mut conflict = err(&cmds[0], false);
    if let RunEvent::StepFailed(f) = &mut conflict {
        f.error.code = Some("http-409".into());
    }
    let cmds = sim.send(conflict);
    assert_eq!(shown(&cmds), ["timer retry-picky#2 +1s"]);
    let cmds = sim.send(fire(&cmds[0]));
    assert_eq!(
        shown(&sim.send(err(&cmds[0], true))),
        ["ended failed (round 1)"],
        "transient is not in `on`"
    );
}

const TIMEOUT: &str = r#"
name: timeout
steps:
  - id: slow
    uses: http
    timeout: 30s
    retry: { attempts: 2, initial-delay: 1s }
  - id: next
    uses: echo
"#;

#[test]
fn an_attempt_that_times_out_fails_and_is_retried_and_its_late_outcome_is_ignored() {
    let mut sim = Sim::new(TIMEOUT, json!({}));
    let cmds = sim.start();
    assert_eq!(
        shown(&cmds),
        ["request slow#1", "timer timeout-slow#1 +30s"]
    );
    assert_eq!(req(&cmds, "request slow#1").timeout_ms, Some(30_000));
    let attempt1 = cmds[0].clone();

    let cmds = sim.send(fire(&cmds[1]));
    assert_eq!(shown(&cmds), ["timer retry-slow#2 +1s"]);
    let error = sim.step("slow").exec.error.clone().unwrap();
    assert_eq!(
        (error.code.as_deref(), error.retryable),
        (Some("timeout"), true)
    );

    // The runner answers attempt 1 after all: too late.
    assert_eq!(sim.send(echo(&attempt1)), []);
    assert_eq!(sim.step("slow").exec.state, ExecState::Backoff);
    assert_eq!(sim.step("slow").status, StepStatus::Running);

    let cmds = sim.send(fire(&cmds[0]));
    assert_eq!(
        shown(&cmds),
        ["request slow#2", "timer timeout-slow#2 +30s"]
    );
    let stale = cmds[1].clone();
    let cmds = sim.send(ok(&cmds[0], json!({"status": 200})));
    assert_eq!(shown(&cmds), ["request next#1"]);
    // Its timeout fires anyway: the attempt has completed, so the timer is stale.
    assert_eq!(sim.send(fire(&stale)), []);
    assert_eq!(sim.step("slow").status, StepStatus::Completed);
    assert_eq!(sim.step("slow").output, json!({"status": 200}));
    assert_eq!(
        shown(&sim.send(echo(&cmds[0]))),
        ["ended succeeded (round 1)"]
    );
}

#[test]
fn timeouts_that_spend_the_budget_fail_the_run() {
    let mut sim = Sim::new(TIMEOUT, json!({}));
    let cmds = sim.start();
    let cmds = sim.send(fire(&cmds[1]));
    let cmds = sim.send(fire(&cmds[0]));
    let cmds = sim.send(fire(&cmds[1]));
    assert_eq!(shown(&cmds), ["ended failed (round 1)"]);
    assert!(
        sim.run.error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        sim.run.error
    );
}

const SAGA: &str = r#"
name: saga
timeout: 1h
steps:
  - id: one
    uses: service/inventory
    with: { action: reserve }
    compensate:
      uses: service/inventory
      with: { action: release, id: "${{ .steps.one.outputs.id }}" }
      retry: { attempts: 2, initial-delay: 1s }
  - id: two
    uses: service/payments
    with: { action: charge }
    compensate:
      uses: service/payments
      with: { action: refund, id: "${{ .steps.two.outputs.id }}" }
      retry: { attempts: 2, initial-delay: 5s }
      timeout: 1m
  - id: three
    uses: service/shipping
    retry: { attempts: 2, initial-delay: 1s }
    compensate:
      uses: service/shipping
      with: { action: cancel }
  - id: four
    uses: echo
    with: { last: true }
"#;

/// Runs SAGA until `three` failed for good; returns the commands of that failure.
fn saga_until_three_fails(sim: &mut Sim) -> Vec<RunEvent> {
    let cmds = sim.start();
    assert_eq!(shown(&cmds), ["timer run-timeout +3600s", "request one#1"]);
    let cmds = sim.send(ok(&cmds[1], json!({"id": "res-1"})));
    let cmds = sim.send(ok(&cmds[0], json!({"id": "ch-2"})));
    let cmds = sim.send(err(&cmds[0], true));
    let cmds = sim.send(fire(&cmds[0]));
    sim.send(err(&cmds[0], true))
}

#[test]
fn a_failed_run_undoes_its_completed_steps_in_reverse_order() {
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = saga_until_three_fails(&mut sim);
    assert_eq!(
        shown(&cmds),
        [
            "compensating [two, one]",
            "compensate two#1",
            "timer ctimeout-two#1 +60s"
        ]
    );
    assert_eq!(sim.run.status, Status::Compensating);
    let undo = req(&cmds, "compensate two#1");
    assert_eq!(
        undo.input,
        json!({"action": "refund", "id": "ch-2"}),
        "it reads the outputs it undoes"
    );
    assert_eq!(
        (undo.kind.as_str(), undo.idempotency_key.as_str()),
        ("payments", "r/two/compensate")
    );

    // One at a time: `one` waits for `two`. A cancel or the run's timeout changes nothing now.
    assert_eq!(sim.send(cancel("too late")), []);
    let cmds = sim.send(ok(&cmds[1], json!({})));
    assert_eq!(shown(&cmds), ["compensate one#1"]);
    assert_eq!(
        req(&cmds, "compensate one#1").input,
        json!({"action": "release", "id": "res-1"})
    );
    let run_timer = sim
        .journal
        .iter()
        .find(|e| show(e) == "timer run-timeout +3600s")
        .unwrap()
        .clone();
    assert_eq!(sim.send(fire(&run_timer)), []);

    let cmds = sim.send(ok(&cmds[0], json!({})));
    assert_eq!(shown(&cmds), ["ended compensated (round 1)"]);
    let RunEvent::Ended(_, end) = &cmds[0] else {
        unreachable!()
    };
    assert_eq!(end.step.as_deref(), Some("three"));
    assert_eq!(
        end.error.as_deref(),
        Some("step three failed after 2 attempt(s): three broke")
    );
    assert_eq!(sim.step("three").status, StepStatus::Failed);
    assert_eq!(sim.step("four").status, StepStatus::Pending);
    assert_eq!(sim.step("two").compensation.state, ExecState::Completed);
}

#[test]
fn a_compensation_that_keeps_failing_ends_the_run_and_can_be_retried_by_hand() {
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = saga_until_three_fails(&mut sim);
    let cmds = sim.send(err(&cmds[1], true));
    assert_eq!(shown(&cmds), ["timer cretry-two#2 +5s"]);
    let cmds = sim.send(fire(&cmds[0]));
    assert_eq!(
        shown(&cmds),
        ["compensate two#2", "timer ctimeout-two#2 +60s"]
    );
    // Attempt 2 times out: the budget of 2 is spent.
    let cmds = sim.send(fire(&cmds[1]));
    assert_eq!(shown(&cmds), ["ended compensation-failed (round 1)"]);
    let RunEvent::Ended(_, end) = &cmds[0] else {
        unreachable!()
    };
    assert_eq!(end.step.as_deref(), Some("two"));
    let error = end.error.clone().unwrap();
    assert!(
        error.starts_with("compensation of step two failed after 2 attempt(s)"),
        "{error}"
    );
    assert!(
        error.contains("(run failed because: step three failed"),
        "{error}"
    );

    // Retried by hand, in memory and (as the coordinator does for an ended run) from the journal.
    let req0 = request("r", &sim.wf, json!({}), None);
    let mut rebuilt = replay(&sim.wf, &req0, &sim.journal);
    assert_eq!(rebuilt.status, Status::Ended(Ending::CompensationFailed));
    let from_journal = rebuilt.handle(&retry_compensation(1), &sim.wf, clock());
    let cmds = sim.send(retry_compensation(1));
    assert_eq!(cmds, from_journal);
    assert_eq!(
        shown(&cmds),
        ["compensate two#3", "timer ctimeout-two#3 +60s"]
    );
    assert_eq!(
        req(&cmds, "compensate two#3").idempotency_key,
        "r/two/compensate"
    );
    assert_eq!(sim.run.status, Status::Compensating);
    assert_eq!(
        sim.send(retry_compensation(1)),
        [],
        "a second request while it runs changes nothing"
    );

    let cmds = sim.send(ok(&cmds[0], json!({})));
    assert_eq!(shown(&cmds), ["compensate one#1"]);
    let cmds = sim.send(ok(&cmds[0], json!({})));
    assert_eq!(shown(&cmds), ["ended compensated (round 2)"]);
    let RunEvent::Ended(_, end) = &cmds[0] else {
        unreachable!()
    };
    assert_eq!(
        end.error.as_deref(),
        Some("step three failed after 2 attempt(s): three broke")
    );
    assert_eq!(
        sim.send(retry_compensation(2)),
        [],
        "only a failed compensation is retried"
    );
}

#[test]
fn a_compensation_retried_by_hand_gets_a_new_budget() {
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = saga_until_three_fails(&mut sim);
    let cmds = sim.send(err(&cmds[1], false));
    assert_eq!(
        shown(&cmds),
        ["ended compensation-failed (round 1)"],
        "a permanent error is not retried"
    );
    let cmds = sim.send(retry_compensation(1));
    let cmds = sim.send(err(&cmds[0], true));
    assert_eq!(shown(&cmds), ["timer cretry-two#3 +5s"]);
    let cmds = sim.send(fire(&cmds[0]));
    let cmds = sim.send(err(&cmds[0], true));
    assert_eq!(shown(&cmds), ["ended compensation-failed (round 2)"]);
    assert_eq!(
        sim.send(retry_compensation(1)),
        [],
        "the request for round 1, delivered again, does not retry round 2"
    );
    let error = sim.run.error.clone().unwrap();
    assert!(
        error.starts_with("compensation of step two failed after 2 attempt(s)"),
        "{error}"
    );
    assert_eq!(error.matches("run failed because").count(), 1, "{error}");
}

#[test]
fn the_run_timeout_compensates_what_completed() {
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = sim.start();
    let timer = cmds[0].clone();
    let cmds = sim.send(ok(&cmds[1], json!({"id": "res-1"})));
    let two = cmds[0].clone();
    let cmds = sim.send(fire(&timer));
    // `two` is still running: it may complete, and is then undone first.
    assert_eq!(shown(&cmds), ["compensating [one]"]);
    let cmds = sim.send(ok(&two, json!({"id": "ch-2"})));
    assert_eq!(
        shown(&cmds),
        ["compensate two#1", "timer ctimeout-two#1 +60s"]
    );
    let cmds = sim.send(ok(&cmds[0], json!({})));
    let cmds = sim.send(ok(&cmds[0], json!({})));
    assert_eq!(shown(&cmds), ["ended compensated (round 1)"]);
    assert_eq!(sim.run.error.as_deref(), Some("the run timed out"));
    assert_eq!(sim.run.failed_step, None);
    assert_eq!(
        sim.step("three").status,
        StepStatus::Pending,
        "nothing starts once the run fails"
    );
}

#[test]
fn a_run_with_nothing_to_undo_ends_failed_or_cancelled() {
    // The run times out while its first step runs: nothing completed.
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = sim.start();
    let one = cmds[1].clone();
    let cmds = sim.send(fire(&cmds[0]));
    // `one` has a compensation and may still complete: wait for it.
    assert_eq!(shown(&cmds), ["compensating []"]);
    let cmds = sim.send(err(&one, true));
    assert_eq!(
        shown(&cmds),
        ["ended failed (round 1)"],
        "not retried, and nothing to undo"
    );
    assert_eq!(sim.run.error.as_deref(), Some("the run timed out"));
    assert_eq!(sim.step("one").status, StepStatus::Failed);

    // Cancelled while a step without compensation runs: ends at once.
    let mut sim = Sim::new(TIMEOUT, json!({}));
    let cmds = sim.start();
    let cmds2 = sim.send(cancel("by hand"));
    assert_eq!(shown(&cmds2), ["ended cancelled (round 1)"]);
    assert_eq!(sim.run.error.as_deref(), Some("cancelled: by hand"));
    assert_eq!(sim.send(echo(&cmds[0])), [], "no step after the end");
    assert_eq!(sim.send(fire(&cmds[1])), []);

    // Cancelled while a compensated step runs, which then completes: it is undone.
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = sim.start();
    assert_eq!(shown(&sim.send(cancel(""))), ["compensating []"]);
    let cmds = sim.send(ok(&cmds[1], json!({"id": "res-1"})));
    assert_eq!(shown(&cmds), ["compensate one#1"]);
    assert_eq!(
        shown(&sim.send(echo(&cmds[0]))),
        ["ended compensated (round 1)"]
    );
    assert_eq!(sim.run.error.as_deref(), Some("cancelled"));
}

#[test]
fn a_step_that_completes_after_the_run_failed_is_undone_first() {
    let yaml = r#"
name: race
steps:
  - id: a
    uses: echo
    compensate: { uses: echo }
  - id: b
    uses: echo
    needs: [a]
    compensate: { uses: echo }
  - id: c
    uses: echo
    needs: [a]
    compensate: { uses: echo }
  - id: d
    uses: echo
    needs: [a]
  - id: e
    uses: echo
    needs: [a]
    retry: { attempts: 3 }
"#;
    let mut sim = Sim::new(yaml, json!({}));
    let cmds = sim.start();
    let cmds = sim.send(echo(&cmds[0]));
    assert_eq!(
        shown(&cmds),
        ["request b#1", "request c#1", "request d#1", "request e#1"]
    );
    let (b, c, d, e) = (
        cmds[0].clone(),
        cmds[1].clone(),
        cmds[2].clone(),
        cmds[3].clone(),
    );
    let retry_e = sim.send(err(&e, true));
    assert_eq!(shown(&retry_e), ["timer retry-e#2 +1s"]);
    // b fails for good while c and d run, and e waits for its retry.
    assert_eq!(shown(&sim.send(err(&b, false))), ["compensating [a]"]);
    // e is not retried, d (nothing to undo) is not waited for, c is: a is undone only after it.
    assert_eq!(sim.send(fire(&retry_e[0])), []);
    assert_eq!(sim.step("e").status, StepStatus::Failed);
    let cmds = sim.send(echo(&c));
    assert_eq!(shown(&cmds), ["compensate c#1"]);
    assert_eq!(sim.run.plan, [2, 0]);
    let cmds = sim.send(echo(&cmds[0]));
    assert_eq!(shown(&cmds), ["compensate a#1"]);
    assert_eq!(sim.send(echo(&d)), [], "d completes, with nothing to undo");
    assert_eq!(sim.step("d").status, StepStatus::Completed);
    assert_eq!(
        shown(&sim.send(echo(&cmds[0]))),
        ["ended compensated (round 1)"]
    );
}

const FOR_EACH: &str = r#"
name: fanout
inputs:
  hosts: { type: array }
steps:
  - id: ping
    uses: http
    for-each: { items: "${{ .inputs.hosts }}", parallelism: 2 }
    with: { url: "http://${{ .item }}/health", index: "${{ .index }}" }
    retry: 2
  - id: named
    uses: echo
    for-each: { items: "${{ .steps.ping.outputs }}", parallelism: 3 }
    with: { code: "${{ .item.code }}" }
    outputs: { host: "${{ .item.host }}", code: "${{ .result.code }}", at: "${{ .index }}" }
outputs:
  ping: ${{ .steps.ping.outputs }}
  named: ${{ .steps.named.outputs }}
"#;

fn in_flight(run: &Run, step: &str) -> usize {
    let s = run.steps.iter().find(|s| s.id == step).unwrap();
    s.items.iter().filter(|e| e.is_in_flight()).count()
}

#[test]
fn for_each_runs_at_most_parallelism_items_and_collects_their_outputs_in_order() {
    let hosts = ["h0", "h1", "h2", "h3", "h4"];
    let mut sim = Sim::new(FOR_EACH, json!({ "hosts": hosts }));
    let cmds = sim.start();
    assert_eq!(shown(&cmds), ["request ping[0]#1", "request ping[1]#1"]);
    let first = req(&cmds, "request ping[1]#1");
    assert_eq!(first.input, json!({"url": "http://h1/health", "index": 1}));
    assert_eq!(
        (first.items, first.idempotency_key.as_str()),
        (Some(5), "r/ping/1")
    );

    // Answer the newest request first, fail some once: never more than 2 in flight.
    let mut pending: Vec<RunEvent> = cmds;
    let mut failed_once = std::collections::HashSet::new();
    while let Some(next) = pending.pop() {
        let RunEvent::StepRequested(r) = &next else {
            let more = sim.send(fire(&next));
            pending.extend(more);
            continue;
        };
        if r.step != "ping" {
            pending.push(next);
            break;
        }
        let item = r.item.unwrap();
        let answer = if item % 2 == 1 && failed_once.insert(item) {
            err(&next, true)
        } else {
            ok(
                &next,
                json!({"host": hosts[item as usize], "code": 200 + item}),
            )
        };
        let more = sim.send(answer);
        assert!(
            in_flight(&sim.run, "ping") <= 2,
            "{:?}",
            sim.step("ping").items
        );
        pending.extend(more);
    }
    assert_eq!(failed_once.len(), 2);
    let expected: Vec<Value> = (0..5)
        .map(|i| json!({"host": hosts[i], "code": 200 + i}))
        .collect();
    assert_eq!(sim.step("ping").output, Value::Array(expected));

    // The second for-each reads the first one's list; its named outputs see `.item` and `.index`.
    assert_eq!(
        shown(&pending),
        [
            "request named[0]#1",
            "request named[1]#1",
            "request named[2]#1"
        ]
    );
    let mut last = Vec::new();
    while let Some(next) = pending.pop() {
        assert!(in_flight(&sim.run, "named") <= 3);
        last = sim.send(echo(&next));
        pending.extend(
            last.iter()
                .filter(|c| matches!(c, RunEvent::StepRequested(_)))
                .cloned(),
        );
    }
    assert_eq!(shown(&last), ["ended succeeded (round 1)"]);
    let named: Vec<Value> = (0..5)
        .map(|i| json!({"host": hosts[i], "code": 200 + i, "at": i}))
        .collect();
    assert_eq!(sim.run.output["named"], Value::Array(named));
}

#[test]
fn for_each_over_an_empty_list_completes_at_once() {
    let mut sim = Sim::new(FOR_EACH, json!({ "hosts": [] }));
    assert_eq!(shown(&sim.start()), ["ended succeeded (round 1)"]);
    assert_eq!(sim.run.output, json!({"ping": [], "named": []}));
}

#[test]
fn an_item_that_fails_for_good_fails_the_step_and_starts_no_more_items() {
    let mut sim = Sim::new(FOR_EACH, json!({ "hosts": ["a", "b", "c"] }));
    let cmds = sim.start();
    // An outcome for an item the step does not have is ignored.
    let mut bogus = echo(&cmds[1]);
    if let RunEvent::StepCompleted(c) = &mut bogus {
        c.item = Some(u32::MAX);
    }
    assert_eq!(sim.send(bogus), []);
    assert!(sim.step("ping").items.len() <= 3);
    let cmds = sim.send(err(&cmds[1], false));
    assert_eq!(shown(&cmds), ["ended failed (round 1)"]);
    assert_eq!(
        sim.run.error.as_deref(),
        Some("step ping (item 1) failed after 1 attempt(s): ping broke")
    );
    assert!(
        !sim.journal.iter().any(|e| show(e) == "request ping[2]#1"),
        "item 2 never started"
    );
}

const SLEEP: &str = r#"
name: nap
steps:
  - id: nap
    uses: sleep
    with: { duration: 5m }
  - id: after
    uses: echo
"#;

#[test]
fn a_sleep_step_completes_when_its_timer_fires() {
    let mut sim = Sim::new(SLEEP, json!({}));
    let cmds = sim.start();
    assert_eq!(shown(&cmds), ["request nap#1", "timer sleep-nap +300s"]);
    assert_eq!(req(&cmds, "request nap#1").kind, "sleep");
    assert_eq!(sim.step("nap").status, StepStatus::Running);
    let timer = cmds[1].clone();
    assert_eq!(shown(&sim.send(fire(&timer))), ["request after#1"]);
    assert_eq!(sim.send(fire(&timer)), []);
    assert_eq!(sim.step("nap").status, StepStatus::Completed);

    // A crash after storing the request, before the timer: the rebuilt run schedules it.
    let req0 = request("r", &sim.wf, json!({}), None);
    let mut rebuilt = replay(&sim.wf, &req0, &sim.journal[..2]);
    assert_eq!(
        shown(&rebuilt.decide(&sim.wf, clock())),
        ["timer sleep-nap +300s"]
    );
}

const PARENT: &str = r#"
name: parent
inputs:
  who: { type: string }
steps:
  - id: call
    uses: workflow
    with: { name: child, version: 3, inputs: { text: "hi ${{ .inputs.who }}" } }
outputs:
  said: ${{ .steps.call.outputs.said }}
"#;

const CHILD: &str = r#"
name: child
inputs:
  text: { type: string }
steps:
  - id: say
    uses: echo
    with: { said: "${{ .inputs.text }}" }
outputs:
  said: ${{ .steps.say.outputs.said }}
"#;

#[test]
fn a_sub_workflow_step_completes_or_fails_with_its_child_run() {
    for child_succeeds in [true, false] {
        let mut parent = Sim::new(PARENT, json!({"who": "bob"}));
        let cmds = parent.start();
        assert_eq!(shown(&cmds), ["request call#1"]);
        let call = req(&cmds, "request call#1").clone();
        assert_eq!(call.kind, "workflow");
        assert_eq!(
            call.input,
            json!({"workflow": "child", "version": 3, "inputs": {"text": "hi bob"}})
        );

        // The I/O layer starts the child with the parent's step as its parent.
        let child_id = parent.run.child_run_id("call", call.attempt);
        assert_eq!(child_id, "r-call-1");
        let link = Parent {
            run_id: "r".into(),
            step: "call".into(),
            attempt: call.attempt,
        };
        let mut child = Sim::with_request(CHILD, |wf| {
            request(&child_id, wf, call.input["inputs"].clone(), Some(link))
        });
        let cmds = child.start();
        assert_eq!(req(&cmds, "request say#1").run_id, "r-call-1");
        let cmds = child.send(if child_succeeds {
            echo(&cmds[0])
        } else {
            err(&cmds[0], false)
        });
        let ending = if child_succeeds {
            "succeeded"
        } else {
            "failed"
        };
        // The parent's outcome goes out first: if only one is stored, the child ends again.
        assert_eq!(
            shown(&cmds),
            [
                format!(
                    "{} call#1",
                    if child_succeeds {
                        "completed"
                    } else {
                        "failed"
                    }
                ),
                format!("ended {ending} (round 1)")
            ]
        );
        match &cmds[0] {
            RunEvent::StepCompleted(c) => {
                assert_eq!((c.run_id.as_str(), c.kind.as_str()), ("r", "workflow"));
                assert_eq!(c.output, json!({"said": "hi bob"}));
            }
            RunEvent::StepFailed(f) => {
                assert_eq!(f.error.code.as_deref(), Some("run-failed"));
                assert!(!f.error.retryable);
                assert!(f.error.message.contains("say broke"), "{}", f.error.message);
            }
            other => panic!("{other:?}"),
        }
        let cmds = parent.send(cmds[0].clone());
        if child_succeeds {
            assert_eq!(shown(&cmds), ["ended succeeded (round 1)"]);
            assert_eq!(parent.run.output, json!({"said": "hi bob"}));
        } else {
            assert_eq!(shown(&cmds), ["ended failed (round 1)"]);
            assert_eq!(parent.run.failed_step.as_deref(), Some("call"));
        }
    }
}

#[test]
fn a_replayed_journal_decides_exactly_what_is_missing() {
    // The coordinator may crash after storing any prefix of a batch of commands.
    let mut sim = Sim::new(SAGA, json!({}));
    let cmds = saga_until_three_fails(&mut sim);
    let cmds = sim.send(ok(&cmds[1], json!({})));
    sim.send(ok(&cmds[0], json!({})));
    check_replays(
        &sim.wf,
        &request("r", &sim.wf, json!({}), None),
        &batches(&sim.journal),
    );
}

/// Splits a journal into each event the coordinator handled and the commands it caused.
fn batches(journal: &[RunEvent]) -> Vec<(RunEvent, Vec<RunEvent>)> {
    let mut out: Vec<(RunEvent, Vec<RunEvent>)> = Vec::new();
    for e in journal {
        let input = matches!(
            e,
            RunEvent::Requested(_)
                | RunEvent::CancelRequested(_)
                | RunEvent::CompensationRetryRequested(_)
                | RunEvent::StepCompleted(_)
                | RunEvent::StepFailed(_)
                | RunEvent::CompensationCompleted(_)
                | RunEvent::CompensationFailed(_)
                | RunEvent::TimerFired(_)
        );
        match out.last_mut() {
            Some((_, cmds)) if !input => cmds.push(e.clone()),
            _ => out.push((e.clone(), Vec::new())),
        }
    }
    out
}

/// The journal as a rebuild reads it: nats-server removes a timer's schedule when it fires or when
/// a later schedule of the same name replaces it.
fn purge_timers(journal: &[RunEvent]) -> Vec<RunEvent> {
    let name = |e: &RunEvent| match e {
        RunEvent::TimerScheduled(t) | RunEvent::TimerFired(t) => Some(t.name()),
        _ => None,
    };
    journal
        .iter()
        .enumerate()
        .filter(|(k, e)| {
            !matches!(e, RunEvent::TimerScheduled(_))
                || !journal[k + 1..].iter().any(|later| name(later) == name(e))
        })
        .map(|(_, e)| e.clone())
        .collect()
}

/// For every point where the coordinator could crash, a rebuild (apply only) then `decide` issues
/// exactly the commands not stored yet; after the end, nothing.
fn check_replays(wf: &Workflow, req: &RunRequested, batches: &[(RunEvent, Vec<RunEvent>)]) {
    let mut stored = Vec::new();
    for (input, commands) in batches {
        stored.push(input.clone());
        for cut in 0..=commands.len() {
            let prefix: Vec<RunEvent> = stored.iter().chain(&commands[..cut]).cloned().collect();
            for journal in [prefix.clone(), purge_timers(&prefix)] {
                let mut run = replay(wf, req, &journal);
                let missing = run.decide(wf, clock());
                assert_eq!(
                    shown(&missing),
                    shown(&commands[cut..]),
                    "after a crash following {} and {cut} of its commands",
                    show(input)
                );
                assert_eq!(missing, commands[cut..]);
            }
        }
        stored.extend(commands.iter().cloned());
    }
}

// ---- Property tests: a scripted runner, then the same journal delivered in other orders ----

/// Fan-out (b, c, d, nap after a), a for-each with parallelism, timeouts, retries, a sleep and
/// compensations. Only a, e and f fail for good, when nothing else runs: which order the other
/// events arrive in cannot change what the run decides, only the order of completion.
const PROP: &str = r#"
name: prop
steps:
  - id: a
    uses: echo
    with: { n: 1 }
    retry: { attempts: 2, initial-delay: 1s }
    timeout: 10s
    compensate: { uses: echo, with: { undo: a }, retry: 2, timeout: 10s }
  - id: b
    uses: echo
    needs: [a]
    with: { from: "${{ .steps.a.outputs.in.n }}" }
    retry: 3
    timeout: 10s
    compensate: { uses: echo, with: { undo: "${{ .steps.b.outputs.attempt }}" }, retry: 2, timeout: 10s }
  - id: c
    uses: echo
    needs: [a]
    retry: 3
    timeout: 10s
  - id: d
    uses: echo
    needs: [a]
    for-each: { items: [10, 20, 30, 40, 50], parallelism: 2 }
    with: { x: "${{ .item }}" }
    retry: { attempts: 3, initial-delay: 2s }
    timeout: 10s
    compensate: { uses: echo, with: { undo: d }, retry: 2, timeout: 5s }
  - id: nap
    uses: sleep
    needs: [a]
    with: { duration: 5s }
  - id: e
    uses: echo
    needs: [b, c, d, nap]
    retry: 2
    timeout: 10s
    compensate: { uses: echo, with: { undo: e }, retry: 2, timeout: 10s }
  - id: f
    uses: echo
    needs: [e]
    with: { sum: "${{ .steps.d.outputs | map(.in.x) | add }}" }
    retry: 2
    timeout: 10s
outputs:
  d: ${{ .steps.d.outputs | map(.attempt) }}
  f: ${{ .steps.f.outputs }}
"#;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Fail {
        retryable: bool,
    },
    /// No answer: the attempt's timeout fires.
    Lost,
}

/// The scripted runner: the outcome of each attempt is a function of the attempt, so that any
/// order of delivery meets the same answers. What may fail for good keeps the run free of races:
/// the branches (b, c, d) run alongside others, and which compensation fails first would depend on
/// the order of completion, except for a's, always the last.
fn outcome(script: &[u8], request: &RunEvent) -> Outcome {
    let (r, compensation) = match request {
        RunEvent::StepRequested(r) => (r, false),
        RunEvent::CompensationRequested(r) => (r, true),
        _ => unreachable!(),
    };
    let key = format!("{compensation}/{}/{:?}/{}", r.step, r.item, r.attempt);
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let code = script[(hash % script.len() as u64) as usize];
    let (may_fail, for_good) = match (compensation, r.step.as_str()) {
        (true, "a") => (r.attempt < 3, true),
        (true, _) => (r.attempt < 2, false),
        (false, "b" | "c" | "d") => (r.attempt < 3, false),
        (false, _) => (true, true),
    };
    match code % 6 {
        _ if !may_fail => Outcome::Ok,
        0..=2 => Outcome::Ok,
        3 => Outcome::Fail { retryable: true },
        4 => Outcome::Lost,
        _ => Outcome::Fail {
            retryable: !for_good,
        },
    }
}

/// What answers a command: a runner, or the server firing a timer.
fn answer(script: &[u8], command: &RunEvent) -> Option<RunEvent> {
    match command {
        RunEvent::StepRequested(r) if r.kind == "sleep" => None,
        RunEvent::StepRequested(r) | RunEvent::CompensationRequested(r) => {
            match outcome(script, command) {
                Outcome::Ok => Some(ok(command, json!({"in": r.input, "attempt": r.attempt}))),
                Outcome::Fail { retryable } => Some(err(command, retryable)),
                Outcome::Lost => None,
            }
        }
        RunEvent::TimerScheduled(_) => Some(fire(command)),
        _ => None,
    }
}

/// Drives a run with every event in the order it was caused (a FIFO), retrying a failed
/// compensation by hand once.
fn simulate(
    wf: &Workflow,
    req: &RunRequested,
    script: &[u8],
) -> (Run, Vec<(RunEvent, Vec<RunEvent>)>, Order) {
    let mut run = Run::new(req, wf, Trace::default());
    let mut order = Order::default();
    let mut inbox = VecDeque::from([RunEvent::Requested(req.clone())]);
    let mut batches = Vec::new();
    let mut retried = false;
    loop {
        let Some(event) = inbox.pop_front() else {
            if run.status == Status::Ended(Ending::CompensationFailed) && !retried {
                retried = true;
                inbox.push_back(retry_compensation(run.round()));
                continue;
            }
            break;
        };
        let before: Vec<StepStatus> = run.steps.iter().map(|s| s.status).collect();
        let was = run.status;
        let commands = run.handle(&event, wf, clock());
        check_commands(was, &event, &commands);
        assert!(in_flight(&run, "d") <= 2);
        order.track(&before, &run, &commands);
        inbox.extend(commands.iter().filter_map(|c| answer(script, c)));
        batches.push((event, commands));
    }
    (run, batches, order)
}

/// What must not depend on the order of delivery: status, steps (status, outputs, compensation),
/// outputs, error and round.
type Summary = (
    Status,
    Vec<(String, StepStatus, Value, ExecState)>,
    Value,
    Option<String>,
    u32,
);

fn summary(run: &Run) -> Summary {
    let steps = run.steps.iter().map(|s| {
        (
            s.id.clone(),
            s.status,
            s.output.clone(),
            s.compensation.state,
        )
    });
    (
        run.status,
        steps.collect(),
        run.output.clone(),
        run.error.clone(),
        run.round,
    )
}

/// The key that pairs an answer with what it answers.
fn asks(e: &RunEvent) -> Option<String> {
    match e {
        RunEvent::StepRequested(r) => Some(format!("step {}/{:?}/{}", r.step, r.item, r.attempt)),
        RunEvent::CompensationRequested(r) => Some(format!("comp {}/{}", r.step, r.attempt)),
        RunEvent::TimerScheduled(t) => Some(format!("timer {t:?}")),
        _ => None,
    }
}

fn answers(e: &RunEvent) -> Option<String> {
    match e {
        RunEvent::StepCompleted(c) => Some(format!("step {}/{:?}/{}", c.step, c.item, c.attempt)),
        RunEvent::StepFailed(f) => Some(format!("step {}/{:?}/{}", f.step, f.item, f.attempt)),
        RunEvent::CompensationCompleted(c) => Some(format!("comp {}/{}", c.step, c.attempt)),
        RunEvent::CompensationFailed(f) => Some(format!("comp {}/{}", f.step, f.attempt)),
        RunEvent::TimerFired(t) => Some(format!("timer {t:?}")),
        _ => None,
    }
}

/// A stale timeout fires after the outcome it lost to (in the other order the timeout wins: a
/// different, equally valid run).
fn beaten_by(e: &RunEvent) -> Option<String> {
    match e {
        RunEvent::TimerFired(Timer {
            purpose:
                TimerPurpose::Timeout {
                    step,
                    item,
                    attempt,
                },
            ..
        }) => Some(format!("step {step}/{item:?}/{attempt}")),
        RunEvent::TimerFired(Timer {
            purpose: TimerPurpose::CompensationTimeout { step, attempt },
            ..
        }) => Some(format!("comp {step}/{attempt}")),
        _ => None,
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Steps in the order they completed, and the compensations in the order they were requested.
#[derive(Default)]
struct Order {
    completed: Vec<String>,
    compensated: Vec<String>,
}

impl Order {
    fn track(&mut self, before: &[StepStatus], run: &Run, commands: &[RunEvent]) {
        for (s, was) in run.steps.iter().zip(before) {
            if s.status == StepStatus::Completed && *was != StepStatus::Completed {
                self.completed.push(s.id.clone());
            }
        }
        for c in commands {
            if let RunEvent::CompensationRequested(r) = c
                && !self.compensated.contains(&r.step)
            {
                self.compensated.push(r.step.clone());
            }
        }
    }

    /// Compensated: exactly the completed steps that have a `compensate`, last completed first.
    fn check(&self, wf: &Workflow, run: &Run) -> Result<(), TestCaseError> {
        let mut expected: Vec<String> = self
            .completed
            .iter()
            .filter(|id| {
                wf.steps
                    .iter()
                    .any(|s| &s.id == *id && s.compensate.is_some())
            })
            .cloned()
            .collect();
        expected.reverse();
        match run.status {
            Status::Ended(Ending::Succeeded) => prop_assert!(self.compensated.is_empty()),
            Status::Ended(Ending::Compensated) => prop_assert_eq!(&self.compensated, &expected),
            Status::Ended(Ending::CompensationFailed) => {
                prop_assert!(
                    expected.starts_with(&self.compensated),
                    "{:?} {:?}",
                    self.compensated,
                    expected
                )
            }
            Status::Ended(_) => prop_assert!(self.compensated.is_empty() && expected.is_empty()),
            other => prop_assert!(false, "the run did not end: {:?}", other),
        }
        Ok(())
    }
}

/// Delivers the journal's inputs to a fresh run, in a random order in which an answer comes after
/// what it answers, with duplicates and redeliveries (also of the run's own commands).
fn deliver_shuffled(
    wf: &Workflow,
    req: &RunRequested,
    batches: &[(RunEvent, Vec<RunEvent>)],
    rng: &mut Rng,
) -> Result<(Run, Order), TestCaseError> {
    let mut run = Run::new(req, wf, Trace::default());
    let mut order = Order::default();
    let mut asked = std::collections::HashSet::new();
    let mut answered = std::collections::HashSet::new();
    let mut pending: Vec<RunEvent> = batches.iter().map(|(input, _)| input.clone()).collect();
    let mut seen: Vec<RunEvent> = Vec::new();
    while !pending.is_empty() {
        let ready: Vec<usize> = (0..pending.len())
            .filter(|&k| {
                let e = &pending[k];
                match e {
                    RunEvent::Requested(_) => true,
                    RunEvent::CompensationRetryRequested(_) => {
                        run.status == Status::Ended(Ending::CompensationFailed)
                    }
                    _ => {
                        answers(e).is_some_and(|k| asked.contains(&k))
                            && beaten_by(e).is_none_or(|k| {
                                answered.contains(&k)
                                    || !pending.iter().any(|p| answers(p).as_ref() == Some(&k))
                            })
                    }
                }
            })
            .collect();
        let redeliver = !seen.is_empty() && rng.below(4) == 0;
        let event = if redeliver {
            seen[rng.below(seen.len())].clone()
        } else {
            prop_assert!(
                !ready.is_empty(),
                "stuck: nothing of {:?} can arrive",
                shown(&pending)
            );
            pending.remove(ready[rng.below(ready.len())])
        };
        let before: Vec<StepStatus> = run.steps.iter().map(|s| s.status).collect();
        let was = run.status;
        let commands = run.handle(&event, wf, clock());
        check_commands(was, &event, &commands);
        prop_assert!(in_flight(&run, "d") <= 2, "parallelism exceeded");
        prop_assert_eq!(run.decide(wf, clock()), vec![]);
        if redeliver {
            prop_assert_eq!(
                shown(&commands),
                Vec::<String>::new(),
                "redelivered {}",
                show(&event)
            );
        }
        if let Some(k) = answers(&event) {
            answered.insert(k);
        }
        asked.extend(commands.iter().filter_map(asks));
        order.track(&before, &run, &commands);
        seen.push(event);
        seen.extend(commands);
    }
    Ok((run, order))
}

fn prop_request(wf: &Workflow) -> RunRequested {
    request("p", wf, json!({}), None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The journal delivered again, shuffled and duplicated, leads to the same end; compensations
    /// undo exactly what completed, in reverse; nothing starts after the end; a rebuild from any
    /// prefix of the journal issues exactly what is missing.
    #[test]
    fn any_order_of_delivery_leads_to_the_same_run(
        script in prop::collection::vec(any::<u8>(), 1..48),
        seeds in prop::collection::vec(1u64.., 3),
    ) {
        let wf = baton_workflow::compile(PROP).unwrap();
        let req = prop_request(&wf);
        let (reference, batches, reference_order) = simulate(&wf, &req, &script);
        prop_assert!(reference.status.is_terminal(), "{:?}", reference.status);
        reference_order.check(&wf, &reference)?;

        for seed in seeds {
            let (run, order) = deliver_shuffled(&wf, &req, &batches, &mut Rng(seed))?;
            prop_assert_eq!(summary(&run), summary(&reference));
            order.check(&wf, &run)?;
        }

        check_replays(&wf, &req, &batches);
        let journal: Vec<RunEvent> = batches.iter().flat_map(|(i, c)| std::iter::once(i.clone()).chain(c.iter().cloned())).collect();
        for journal in [journal.clone(), purge_timers(&journal)] {
            let mut rebuilt = replay(&wf, &req, &journal);
            prop_assert_eq!(rebuilt.decide(&wf, clock()), vec![]);
            prop_assert_eq!(rebuilt.status, reference.status);
            prop_assert_eq!(ended(&rebuilt), ended(&reference));
        }
    }
}

// ---- Secrets: only the references the coordinator placed are ever resolved ----

/// Every way data reaches a `with` next to `.secrets`: inputs, the event, a step's outputs, items,
/// a compensation, a sub-workflow's inputs; and data built into a reference by an expression.
const FORGED: &str = r#"
name: forged
inputs:
  note: { type: string }
  head: { type: string }
  tail: { type: string }
  b64: { type: string }
  items: { type: array }
steps:
  - id: call
    uses: http
    with:
      url: https://example.com/hook
      headers: { Authorization: "Bearer ${{ .secrets.api_token }}" }
      body:
        note: "${{ .inputs.note }}"
        event: "${{ .event.data }}"
        joined: "${{ .inputs.head + .inputs.tail }}"
        decoded: "${{ .inputs.b64 | @base64d }}"
        mixed: "${{ .inputs.note }}|${{ .secrets.api_token }}|${{ .inputs.note }}"
    compensate:
      uses: http
      with:
        url: https://example.com/undo
        token: "${{ .secrets.db_password }}"
        echoed: "${{ .steps.call.outputs.body.mixed }}"
  - id: each
    uses: echo
    needs: [call]
    for-each: { items: "${{ .inputs.items }}" }
    with: { item: "${{ .item }}", key: "${{ .secrets.api_token }}" }
  - id: child
    uses: workflow
    needs: [call]
    with: { name: child, version: 1, inputs: { text: "${{ .inputs.note }}" } }
  - id: last
    uses: echo
    needs: [each, child]
"#;

/// A child that reads its own secret, next to what its parent passed.
const CHILD_WITH_SECRET: &str = r#"
name: child
inputs:
  text: { type: string }
steps:
  - id: say
    uses: echo
    with: { said: "${{ .inputs.text }}", own: "${{ .secrets.child_key }}" }
"#;

/// What a runner would hand the step: the listed references resolved, nothing else.
fn resolved(r: &StepRequested) -> Value {
    let values = [
        ("api_token", "T0KEN"),
        ("db_password", "DBPASS"),
        ("child_key", "CHILDKEY"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut input = r.input.clone();
    baton_core::secrets::resolve(&mut input, &r.secrets, &values).unwrap();
    input
}

#[test]
fn a_reference_that_arrives_as_data_is_never_resolved() {
    use base64::Engine as _;
    let forged = baton_core::secrets::reference("db_password");
    let input = json!({
        "note": forged,
        "head": "<<secret:db_",
        "tail": "password>>",
        "b64": base64::engine::general_purpose::STANDARD.encode(&forged),
        "items": [forged, "plain"],
    });
    let mut sim = Sim::with_request(FORGED, |wf| {
        let mut req = request("r", wf, input, None);
        req.trigger = Some(baton_core::event::Trigger {
            id: "e1".into(),
            source: "test".into(),
            ty: "com.example.note".into(),
            subject: None,
            time: None,
            data: json!({"note": forged}),
            extensions: Default::default(),
        });
        req
    });
    let req0 = request("r", &sim.wf, sim.run.input.clone(), None);
    let mut req0 = req0;
    req0.trigger = sim.run.trigger.clone();
    let first = sim.send(RunEvent::Requested(req0.clone()));
    let call = req(&first, "request call#1").clone();
    // The journal holds plain references; the request lists the two the coordinator placed.
    assert_eq!(
        call.input["headers"]["Authorization"],
        "Bearer <<secret:api_token>>"
    );
    let mixed = format!("{forged}|<<secret:api_token>>|{forged}");
    assert_eq!(call.input["body"]["mixed"], mixed);
    let placed: Vec<(&str, usize, &str)> = call
        .secrets
        .iter()
        .map(|p| (p.path.as_str(), p.at, p.name.as_str()))
        .collect();
    assert_eq!(
        placed,
        [
            ("/body/mixed", forged.len() + 1, "api_token"),
            ("/headers/Authorization", 7, "api_token"),
        ]
    );
    // The runner sends the token where the workflow put it, and every look-alike as text.
    let sent = resolved(&call);
    assert_eq!(sent["headers"]["Authorization"], "Bearer T0KEN");
    assert_eq!(
        sent["body"],
        json!({
            "note": forged,
            "event": {"note": forged},
            "joined": forged,
            "decoded": forged,
            "mixed": format!("{forged}|T0KEN|{forged}"),
        })
    );
    assert!(!sent.to_string().contains("DBPASS"), "{sent}");

    // Its outputs (a peer echoing what it got) are data too, for items and the compensation.
    let echoed = json!({"body": {"mixed": mixed}});
    let next = sim.send(ok(&first[0], echoed));
    for item in 0..2 {
        let r = req(&next, &format!("request each[{item}]#1"));
        assert_eq!(r.secrets.len(), 1, "{:?}", r.secrets);
        let sent = resolved(r);
        assert_eq!(sent["key"], "T0KEN");
        assert_eq!(sent["item"], input_item(item, &forged));
    }
    // The sub-workflow gets the text; its own `.secrets` are its own.
    let call_child = req(&next, "request child#1").clone();
    assert_eq!(call_child.secrets, []);
    assert_eq!(call_child.input["inputs"]["text"], forged);
    let mut child = Sim::with_request(CHILD_WITH_SECRET, |wf| {
        request("r-child-1", wf, call_child.input["inputs"].clone(), None)
    });
    let say = child.start();
    let said = resolved(req(&say, "request say#1"));
    assert_eq!(said, json!({"said": forged, "own": "CHILDKEY"}));

    // The run fails after `call` completed: its compensation places its own reference only.
    let mut pending: Vec<RunEvent> = next.clone();
    let each0 = pending.remove(0);
    let cmds = sim.send(err(&each0, false));
    let undo = cmds
        .iter()
        .find_map(|c| match c {
            RunEvent::CompensationRequested(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no compensation in {:?}", shown(&cmds)));
    assert_eq!(undo.secrets.len(), 1, "{:?}", undo.secrets);
    let sent = resolved(&undo);
    assert_eq!(sent["token"], "DBPASS");
    assert_eq!(
        sent["echoed"],
        format!("{forged}|<<secret:api_token>>|{forged}")
    );
    assert!(!sent["echoed"].to_string().contains("T0KEN"));

    // A rebuild places exactly the same references (the tag depends on the context only).
    let mut rebuilt = replay(&sim.wf, &req0, &sim.journal[..1]);
    assert_eq!(rebuilt.decide(&sim.wf, clock()), first);
}

fn input_item(item: usize, forged: &str) -> Value {
    [json!(forged), json!("plain")][item].clone()
}
