//! The decision logic of a run: a projection of its events, with no I/O.
//!
//! [`Run::apply`] folds one event in; [`Run::decide`] returns the commands (events to publish) that
//! the state calls for, folding each into the state as it is issued. Decisions are level-triggered:
//! they depend on the state only, never on which event just arrived. So a duplicate or redelivered
//! event changes nothing, and after a replay of the journal `decide` issues exactly what is still
//! missing. Time and randomness (retry jitter) are inputs, so decisions are reproducible.

use baton_core::event::{
    Ending, Parent, RunCompensating, RunEnded, RunEvent, RunRequested, StepCompleted, StepError,
    StepFailed, StepRequested, Timer, TimerPurpose, Trigger, WorkflowRef,
};
use baton_core::trace::Trace;
use baton_workflow::expr::to_val;
use baton_workflow::{Action, ErrorClass, Expect, OnFailure, Retry, Workflow};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    /// Failed (or cancelled); completed steps are being undone.
    Compensating,
    Ended(Ending),
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Ended(_))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Ended(Ending::Succeeded) => "succeeded",
            Status::Ended(Ending::Failed) => "failed",
            Status::Ended(Ending::Cancelled) => "cancelled",
            Status::Ended(Ending::Compensated) => "compensated",
            Status::Ended(Ending::CompensationFailed) => "compensation_failed",
        }
    }
}

/// One execution of a step's handler, with its attempts: a step, an item of a for-each step, or a
/// compensation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Exec {
    /// The last attempt requested (0: none yet).
    pub attempt: u32,
    pub state: ExecState,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub output: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// Attempts before this number do not count against the retry budget (a compensation retried
    /// by hand starts a new budget).
    #[serde(skip)]
    budget_from: u32,
    /// Whether the current attempt's timer (its timeout, or a sleep's end) is stored.
    #[serde(skip)]
    timer_scheduled: bool,
    /// A `wait` with `expect: timeout`: its timer completes the attempt instead of failing it.
    #[serde(skip)]
    completes_on_timeout: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecState {
    #[default]
    Pending,
    Requested,
    /// The last attempt failed; retry or give up is decided next.
    Failed,
    /// Waiting for the retry timer.
    Backoff,
    /// The retry timer fired: the next attempt is due.
    RetryDue,
    Completed,
    /// Failed after its retries.
    FailedForGood,
}

impl Exec {
    /// Whether it may still complete with no new request: attempted, not given up.
    fn is_alive(&self) -> bool {
        matches!(self.state, ExecState::Completed | ExecState::Requested)
    }

    fn is_in_flight(&self) -> bool {
        matches!(
            self.state,
            ExecState::Requested | ExecState::Failed | ExecState::Backoff | ExecState::RetryDue
        )
    }

    fn settle(&mut self, attempt: u32, output: Result<Value, StepError>) -> bool {
        if self.attempt != attempt || self.state != ExecState::Requested {
            return false;
        }
        match output {
            Ok(v) => {
                self.state = ExecState::Completed;
                self.output = v;
                self.error = None;
            }
            Err(e) => {
                self.state = ExecState::Failed;
                self.error = Some(e);
            }
        }
        true
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    #[default]
    Pending,
    Running,
    Completed,
    /// Failed after its retries (with `on-failure: continue`, dependents still run).
    Failed,
    Skipped,
}

impl StepStatus {
    fn is_done(self) -> bool {
        matches!(
            self,
            StepStatus::Completed | StepStatus::Skipped | StepStatus::Failed
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StepState {
    pub id: String,
    pub status: StepStatus,
    /// The step's execution (for a for-each step, the items are in `items`).
    pub exec: Exec,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Exec>,
    /// The number of items of a for-each step, once it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item_count: Option<usize>,
    /// The step's outputs, as later steps see them.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub output: Value,
    /// Position in the order of completion (1 = first completed): compensation runs in reverse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_order: Option<u32>,
    /// The step's compensation, once the run compensates it.
    pub compensation: Exec,
    /// Whether `output` is final: the step's `outputs` template has been applied to its result.
    #[serde(skip)]
    outputs_done: bool,
}

/// One run, as projected from its journal.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub workflow: WorkflowRef,
    /// The run's trace: the triggering event's, or a new one. Never regenerated mid-run.
    pub trace: Trace,
    pub input: Value,
    pub trigger: Option<Trigger>,
    pub parent: Option<Parent>,
    pub status: Status,
    pub steps: Vec<StepState>,
    pub output: Value,
    /// Why the run did not succeed.
    pub error: Option<String>,
    pub failed_step: Option<String>,
    /// Steps to undo, in order (indices into `steps`).
    pub plan: Vec<usize>,
    /// Set by a cancel request, a run timeout or an invalid input: the run fails at the next decision.
    abort: Option<String>,
    /// Why the run failed, from its `compensating` event: a retried compensation ends with it.
    reason: Option<String>,
    cancelled: bool,
    /// Counts the ends of the run (a retried compensation ends it again).
    round: u32,
    run_timer_scheduled: bool,
    completions: u32,
    /// `.secrets` in a step's `with`: each secret the workflow reads bound to its reference, which
    /// only a runner resolves.
    secrets: Map<String, Value>,
}

/// Inputs of a decision that are not in the journal.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: DateTime<Utc>,
    /// In [0, 1): varies retry delays by the policy's jitter.
    pub random: f64,
}

impl Run {
    /// A run as its `run.requested` event describes it. `workflow` must be the pinned version.
    pub fn new(request: &RunRequested, workflow: &Workflow, trace: Trace) -> Run {
        let (input, abort) = match workflow.resolve_input(&request.input) {
            Ok(input) => (input, None),
            Err(e) => (request.input.clone(), Some(format!("invalid input: {e}"))),
        };
        Run {
            id: request.run_id.clone(),
            workflow: request.workflow.clone(),
            trace,
            input,
            trigger: request.trigger.clone(),
            parent: request.parent.clone(),
            status: Status::Running,
            steps: workflow
                .steps
                .iter()
                .map(|s| StepState {
                    id: s.id.clone(),
                    ..Default::default()
                })
                .collect(),
            output: Value::Null,
            error: None,
            failed_step: None,
            plan: Vec::new(),
            abort,
            reason: None,
            cancelled: false,
            round: 1,
            run_timer_scheduled: false,
            completions: 0,
            secrets: workflow
                .secrets
                .iter()
                .map(|name| (name.clone(), json!(baton_core::secrets::reference(name))))
                .collect(),
        }
    }

    /// Folds `event` in, then returns the commands the new state calls for (already folded in).
    pub fn handle(&mut self, event: &RunEvent, workflow: &Workflow, clock: Clock) -> Vec<RunEvent> {
        self.apply(event);
        self.decide(workflow, clock)
    }

    /// Counts the run's ends: 1, then one more for each compensation retried by hand.
    pub fn round(&self) -> u32 {
        self.round
    }

    fn index(&self, step: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == step)
    }

    /// The execution an event is about: a step, or one of its items. `None` for an item the step
    /// does not have (a malformed event must not make it allocate).
    fn exec_mut(&mut self, step: &str, item: Option<u32>) -> Option<&mut Exec> {
        let i = self.index(step)?;
        let s = &mut self.steps[i];
        match item {
            None => Some(&mut s.exec),
            Some(n) => {
                let n = n as usize;
                if s.item_count.is_none_or(|count| n >= count) {
                    return None;
                }
                if s.items.len() <= n {
                    s.items.resize(n + 1, Exec::default());
                }
                Some(&mut s.items[n])
            }
        }
    }

    /// Folds one event into the state. Events that do not fit the state (duplicates, outcomes of an
    /// attempt that is not the current one, anything after the end) change nothing.
    pub fn apply(&mut self, event: &RunEvent) {
        // Only a compensation retry reopens an ended run.
        if self.status.is_terminal() && !matches!(event, RunEvent::CompensationRetryRequested(_)) {
            return;
        }
        match event {
            RunEvent::Requested(_) | RunEvent::StepStarted(_) | RunEvent::StepHeartbeat(_) => {}
            RunEvent::CancelRequested(c) => {
                if self.status == Status::Running && self.abort.is_none() {
                    self.cancelled = true;
                    let why = if c.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", c.reason)
                    };
                    self.abort = Some(format!("cancelled{why}"));
                }
            }
            RunEvent::CompensationRetryRequested(r) => {
                if self.status == Status::Ended(Ending::CompensationFailed)
                    && (r.round == 0 || r.round == self.round)
                {
                    self.status = Status::Compensating;
                    self.round += 1;
                    for s in &mut self.steps {
                        // After a replay the one that failed is `Failed`: giving up writes no event.
                        if matches!(
                            s.compensation.state,
                            ExecState::Failed | ExecState::FailedForGood
                        ) {
                            s.compensation.state = ExecState::RetryDue;
                            s.compensation.budget_from = s.compensation.attempt;
                        }
                    }
                }
            }
            RunEvent::StepRequested(r) => {
                if let Some(i) = self.index(&r.step) {
                    if self.steps[i].status == StepStatus::Pending {
                        self.steps[i].status = StepStatus::Running;
                    }
                    if let (Some(n), Some(_)) = (r.items, r.item) {
                        self.steps[i].item_count = Some(n as usize);
                    }
                    if let Some(exec) = self.exec_mut(&r.step, r.item)
                        && r.attempt > exec.attempt
                    {
                        exec.attempt = r.attempt;
                        exec.state = ExecState::Requested;
                        exec.timer_scheduled = false;
                        // From the request, so a replay decides the same without the workflow.
                        exec.completes_on_timeout =
                            r.kind == "wait" && r.input["expect"] == "timeout";
                    }
                }
            }
            RunEvent::StepCompleted(c) => {
                let settled = self
                    .exec_mut(&c.step, c.item)
                    .is_some_and(|e| e.settle(c.attempt, Ok(c.output.clone())));
                if settled {
                    self.step_progressed(&c.step);
                }
            }
            RunEvent::StepFailed(f) => {
                if let Some(e) = self.exec_mut(&f.step, f.item) {
                    e.settle(f.attempt, Err(f.error.clone()));
                }
            }
            RunEvent::CompensationRequested(r) => {
                if let Some(i) = self.index(&r.step) {
                    let c = &mut self.steps[i].compensation;
                    if r.attempt > c.attempt {
                        c.attempt = r.attempt;
                        c.state = ExecState::Requested;
                        c.timer_scheduled = false;
                    }
                }
            }
            RunEvent::CompensationCompleted(c) => {
                if let Some(i) = self.index(&c.step) {
                    self.steps[i]
                        .compensation
                        .settle(c.attempt, Ok(c.output.clone()));
                }
            }
            RunEvent::CompensationFailed(f) => {
                if let Some(i) = self.index(&f.step) {
                    self.steps[i]
                        .compensation
                        .settle(f.attempt, Err(f.error.clone()));
                }
            }
            RunEvent::TimerScheduled(t) => self.timer(t, false),
            RunEvent::TimerFired(t) => self.timer(t, true),
            RunEvent::Compensating(c) => {
                if self.status == Status::Running {
                    self.status = Status::Compensating;
                    self.error = Some(c.reason.clone());
                    self.reason = Some(c.reason.clone());
                    self.plan = c.plan.iter().filter_map(|s| self.index(s)).collect();
                    if c.step.is_some() {
                        self.failed_step = c.step.clone();
                    }
                }
            }
            // The end of an earlier round, redelivered after a compensation retry reopened the run.
            RunEvent::Ended(_, e) if e.round < self.round => {}
            RunEvent::Ended(ending, e) => {
                self.status = Status::Ended(*ending);
                self.output = e.output.clone();
                if e.error.is_some() {
                    self.error = e.error.clone();
                }
                self.failed_step = e.step.clone().or(self.failed_step.take());
                self.round = e.round;
            }
        }
    }

    fn timer(&mut self, t: &Timer, fired: bool) {
        match &t.purpose {
            TimerPurpose::RunTimeout => {
                self.run_timer_scheduled = true;
                if fired && self.status == Status::Running && self.abort.is_none() {
                    self.abort = Some("the run timed out".into());
                }
            }
            TimerPurpose::Retry {
                step,
                item,
                attempt,
            } => {
                if let Some(e) = self.exec_mut(step, *item)
                    && e.attempt + 1 == *attempt
                    && matches!(e.state, ExecState::Failed | ExecState::Backoff)
                {
                    e.state = if fired {
                        ExecState::RetryDue
                    } else {
                        ExecState::Backoff
                    };
                }
            }
            TimerPurpose::Timeout {
                step,
                item,
                attempt,
            } => {
                if let Some(e) = self.exec_mut(step, *item)
                    && e.attempt == *attempt
                {
                    e.timer_scheduled = true;
                    if fired && e.state == ExecState::Requested {
                        if e.completes_on_timeout {
                            e.settle(*attempt, Ok(json!({ "event": null })));
                            self.step_progressed(step);
                        } else {
                            e.settle(*attempt, Err(timeout_error()));
                        }
                    }
                }
            }
            TimerPurpose::Sleep { step } => {
                let Some(e) = self.exec_mut(step, None) else {
                    return;
                };
                e.timer_scheduled = true;
                if fired && e.settle(1, Ok(json!({}))) {
                    self.step_progressed(step);
                }
            }
            TimerPurpose::CompensationRetry { step, attempt } => {
                if let Some(i) = self.index(step) {
                    let c = &mut self.steps[i].compensation;
                    if c.attempt + 1 == *attempt
                        && matches!(c.state, ExecState::Failed | ExecState::Backoff)
                    {
                        c.state = if fired {
                            ExecState::RetryDue
                        } else {
                            ExecState::Backoff
                        };
                    }
                }
            }
            TimerPurpose::CompensationTimeout { step, attempt } => {
                if let Some(i) = self.index(step) {
                    let c = &mut self.steps[i].compensation;
                    if c.attempt == *attempt {
                        c.timer_scheduled = true;
                        if fired && c.state == ExecState::Requested {
                            c.settle(*attempt, Err(timeout_error()));
                        }
                    }
                }
            }
        }
    }

    /// A step's execution (or one of its items) completed: complete the step when all of it has.
    fn step_progressed(&mut self, step: &str) {
        let Some(i) = self.index(step) else { return };
        let s = &mut self.steps[i];
        if s.status == StepStatus::Completed {
            return;
        }
        let done = match s.item_count {
            Some(n) => {
                s.items.len() >= n && s.items[..n].iter().all(|e| e.state == ExecState::Completed)
            }
            None => s.exec.state == ExecState::Completed,
        };
        if !done {
            return;
        }
        s.status = StepStatus::Completed;
        s.output = match s.item_count {
            Some(n) => Value::Array(s.items[..n].iter().map(|e| e.output.clone()).collect()),
            None => s.exec.output.clone(),
        };
        self.completions += 1;
        s.completed_order = Some(self.completions);
        // A step that completes while the run compensates is undone first among what remains.
        if self.status == Status::Compensating && !self.plan.contains(&i) {
            let next = self
                .plan
                .iter()
                .position(|&p| self.steps[p].compensation.state != ExecState::Completed);
            self.plan.insert(next.unwrap_or(self.plan.len()), i);
        }
    }

    /// The commands the state calls for, each folded into the state as it is issued.
    pub fn decide(&mut self, workflow: &Workflow, clock: Clock) -> Vec<RunEvent> {
        let mut out = Vec::new();
        match self.status {
            Status::Ended(_) => {}
            Status::Running => self.decide_running(workflow, clock, &mut out),
            Status::Compensating => self.decide_compensating(workflow, clock, &mut out),
        }
        out
    }

    fn issue(&mut self, out: &mut Vec<RunEvent>, event: RunEvent) {
        self.apply(&event);
        out.push(event);
    }

    fn decide_running(&mut self, wf: &Workflow, clock: Clock, out: &mut Vec<RunEvent>) {
        if let Some(reason) = self.abort.clone() {
            return self.fail(wf, reason, None, clock, out);
        }
        if let Some(timeout) = wf.timeout
            && !self.run_timer_scheduled
        {
            let timer = self.timer_at(TimerPurpose::RunTimeout, clock.now + timeout);
            self.issue(out, RunEvent::TimerScheduled(timer));
        }
        loop {
            let before = out.len();
            let mut changed = false;
            for i in 0..wf.steps.len() {
                if let Err((reason, step)) = self.advance_step(wf, i, clock, out, &mut changed) {
                    return self.fail(wf, reason, Some(step), clock, out);
                }
            }
            // Starting or finishing a step can make others ready: repeat until nothing changes.
            if out.len() == before && !changed {
                break;
            }
        }
        if (0..self.steps.len()).all(|i| self.is_done(wf, i)) {
            let end = match wf.outputs.eval(&to_val(&self.context())) {
                Ok(output) => self.ended(Ending::Succeeded, output, None),
                Err(e) => return self.fail(wf, format!("run outputs: {e}"), None, clock, out),
            };
            self.end(end, out);
        }
    }

    /// Moves one step forward. `Err((reason, step))` fails the run.
    fn advance_step(
        &mut self,
        wf: &Workflow,
        i: usize,
        clock: Clock,
        out: &mut Vec<RunEvent>,
        changed: &mut bool,
    ) -> Result<(), (String, String)> {
        let spec = &wf.steps[i];
        let fail = |reason: String| (reason, spec.id.clone());
        match self.steps[i].status {
            StepStatus::Pending => {
                if !spec.needs.iter().all(|&n| self.is_done(wf, n)) {
                    return Ok(());
                }
                let context = to_val(&self.context());
                let skip = match &spec.condition {
                    Some(c) => !c
                        .truthy(&context)
                        .map_err(|e| fail(format!("step {}: `if` {e}", spec.id)))?,
                    // Without an `if`, a step whose dependency was skipped is skipped too.
                    None => spec
                        .needs
                        .iter()
                        .any(|&n| self.steps[n].status == StepStatus::Skipped),
                };
                *changed = true;
                if skip {
                    self.steps[i].status = StepStatus::Skipped;
                    return Ok(());
                }
                self.steps[i].status = StepStatus::Running;
                if let Some(for_each) = &spec.for_each {
                    let items = match for_each.items.eval(&context) {
                        Ok(Value::Array(items)) => items.len(),
                        Ok(other) => {
                            return Err(fail(format!(
                                "step {}: `for-each` must give a list, not {other}",
                                spec.id
                            )));
                        }
                        Err(e) => return Err(fail(format!("step {}: `for-each` {e}", spec.id))),
                    };
                    self.steps[i].item_count = Some(items);
                    if items == 0 {
                        self.step_progressed(&spec.id);
                    }
                }
                self.start_execs(wf, i, clock, out)
            }
            StepStatus::Running => {
                // Retry or give up on failed attempts.
                let count = self.steps[i].item_count;
                let execs: Vec<Option<u32>> = match count {
                    Some(n) => (0..n as u32).map(Some).collect(),
                    None => vec![None],
                };
                for item in execs {
                    let exec = self.exec_mut(&spec.id, item).expect("step exists").clone();
                    if exec.state == ExecState::Failed {
                        let error = exec.error.clone().unwrap_or_else(|| StepError {
                            message: "failed".into(),
                            retryable: false,
                            code: None,
                        });
                        if let Some(event) =
                            self.retry(&spec.retry, &exec, clock, |attempt, due, run_id| Timer {
                                run_id,
                                purpose: TimerPurpose::Retry {
                                    step: spec.id.clone(),
                                    item,
                                    attempt,
                                },
                                due,
                            })
                        {
                            self.issue(out, event);
                        } else {
                            let e = self.exec_mut(&spec.id, item).expect("step exists");
                            e.state = ExecState::FailedForGood;
                            *changed = true;
                            let what = match item {
                                Some(n) => format!("step {} (item {n})", spec.id),
                                None => format!("step {}", spec.id),
                            };
                            let reason = format!(
                                "{what} failed after {} attempt(s): {}",
                                exec.attempt, error.message
                            );
                            self.steps[i].status = StepStatus::Failed;
                            self.steps[i].output = json!({"error": error});
                            if spec.on_failure == OnFailure::Fail {
                                return Err(fail(reason));
                            }
                            return Ok(());
                        }
                    }
                }
                self.start_execs(wf, i, clock, out)
            }
            StepStatus::Completed if !self.steps[i].outputs_done => {
                // Named outputs are computed from the kind's result once the step completes; a
                // for-each step's from each item's, with `.item` and `.index`.
                if let Some(template) = &spec.outputs {
                    let eval = |context: Value| {
                        template
                            .eval(&to_val(&context))
                            .map_err(|e| fail(format!("step {}: `outputs` {e}", spec.id)))
                    };
                    let output = match self.steps[i].item_count {
                        Some(n) => {
                            let mut outputs = Vec::with_capacity(n);
                            for k in 0..n {
                                let mut context = self.item_context(spec, Some(k as u32))?;
                                context["result"] = self.steps[i].items[k].output.clone();
                                outputs.push(eval(context)?);
                            }
                            Value::Array(outputs)
                        }
                        None => {
                            let mut context = self.context();
                            context["result"] = self.steps[i].output.clone();
                            eval(context)?
                        }
                    };
                    self.steps[i].output = output;
                }
                self.steps[i].outputs_done = true;
                *changed = true;
                Ok(())
            }
            StepStatus::Completed | StepStatus::Failed | StepStatus::Skipped => Ok(()),
        }
    }

    /// Whether step `i` is done for the steps that need it.
    fn is_done(&self, wf: &Workflow, i: usize) -> bool {
        let s = &self.steps[i];
        s.status.is_done()
            && (s.status != StepStatus::Completed
                || s.outputs_done
                || wf.steps[i].outputs.is_none())
    }

    /// Requests every attempt that is due: the first, a retry whose backoff is over, further items
    /// of a for-each step up to its parallelism. Schedules each attempt's timer (its timeout, or a
    /// sleep's end), also one a crash left unscheduled.
    fn start_execs(
        &mut self,
        wf: &Workflow,
        i: usize,
        clock: Clock,
        out: &mut Vec<RunEvent>,
    ) -> Result<(), (String, String)> {
        let spec = &wf.steps[i];
        let fail = |reason: String| (reason, spec.id.clone());
        let state = |run: &Run, k: usize| {
            run.steps[i]
                .items
                .get(k)
                .map_or(ExecState::Pending, |e| e.state)
        };
        let items: Vec<Option<u32>> = match self.steps[i].item_count {
            Some(n) => {
                let running = (0..n)
                    .filter(|&k| self.steps[i].items.get(k).is_some_and(Exec::is_in_flight))
                    .count();
                let limit = spec
                    .for_each
                    .as_ref()
                    .map_or(1, |f| f.parallelism.max(1) as usize);
                let mut slots = limit.saturating_sub(running);
                // Missing timers first, so that a replay issues them in the order first issued.
                let mut starts: Vec<Option<u32>> = (0..n)
                    .filter(|&k| state(self, k) == ExecState::Requested)
                    .map(|k| Some(k as u32))
                    .collect();
                for k in 0..n {
                    match state(self, k) {
                        ExecState::RetryDue => starts.push(Some(k as u32)),
                        ExecState::Pending if slots > 0 => {
                            slots -= 1;
                            starts.push(Some(k as u32));
                        }
                        _ => {}
                    }
                }
                starts
            }
            None => vec![None],
        };
        for item in items {
            let exec = self.exec_mut(&spec.id, item).expect("step exists").clone();
            let attempt = match exec.state {
                ExecState::Pending | ExecState::RetryDue => exec.attempt + 1,
                ExecState::Requested if !exec.timer_scheduled => {
                    if let Some(timer) = self.attempt_timer(spec, item, exec.attempt, clock) {
                        self.issue(out, RunEvent::TimerScheduled(timer));
                    }
                    continue;
                }
                _ => continue,
            };
            let plain = self.item_context(spec, item)?;
            let context = to_val(&plain);
            // Only a runner's `with` reads `.secrets`: the references it places are listed.
            let mut placed = Vec::new();
            let input = match &spec.action {
                Action::Run => {
                    let (input, refs) = self
                        .eval_with(&spec.with, plain)
                        .map_err(|e| fail(format!("step {}: `with` {e}", spec.id)))?;
                    placed = refs;
                    input
                }
                Action::Sleep(d) => json!({"seconds": d.as_secs_f64()}),
                Action::Workflow(call) => {
                    let inputs = call
                        .inputs
                        .eval(&context)
                        .map_err(|e| fail(format!("step {}: `with` {e}", spec.id)))?;
                    json!({"workflow": call.workflow, "version": call.version, "inputs": inputs})
                }
                Action::Wait(wait) => {
                    let key = wait
                        .key
                        .eval(&context)
                        .map_err(|e| fail(format!("step {}: `key` {e}", spec.id)))?;
                    let expect = match wait.expect {
                        Expect::Event => "event",
                        Expect::Timeout => "timeout",
                    };
                    json!({"event": wait.event, "key": key, "expect": expect})
                }
                // Waits like `wait` for a decision event whose subject is the step itself.
                Action::Approval(approval) => {
                    let message = approval
                        .message
                        .eval(&context)
                        .map_err(|e| fail(format!("step {}: `message` {e}", spec.id)))?;
                    json!({
                        "message": message,
                        "approvers": approval.approvers,
                        "event": baton_core::event::types::APPROVAL_DECIDED,
                        "key": format!("{}/{}{}", self.id, spec.id, baton_core::event::item_label(item)),
                        "expect": "event",
                    })
                }
            };
            let size = baton_core::event::json_size(&input);
            if size > baton_core::event::MAX_INPUT_BYTES {
                return Err(fail(format!(
                    "step {}: its input is {size} bytes, more than the {} a step request may \
                     carry; pass a reference to large data (a URL, an object key), not the data",
                    spec.id,
                    baton_core::event::MAX_INPUT_BYTES
                )));
            }
            let key = match item {
                Some(n) => format!("{}/{}/{n}", self.id, spec.id),
                None => format!("{}/{}", self.id, spec.id),
            };
            let request = StepRequested {
                run_id: self.id.clone(),
                step: spec.id.clone(),
                item,
                items: item.and(self.steps[i].item_count).map(|n| n as u32),
                kind: spec.kind.clone(),
                attempt,
                input,
                idempotency_key: key,
                secrets: placed,
                timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            };
            self.issue(out, RunEvent::StepRequested(request));
            if let Some(timer) = self.attempt_timer(spec, item, attempt, clock) {
                self.issue(out, RunEvent::TimerScheduled(timer));
            }
        }
        Ok(())
    }

    /// Evaluates the `with` of a step or compensation that a runner executes, over `context`, with
    /// `.secrets` bound so that the references it places can be told from look-alikes in data:
    /// the input with plain references, and where they are (see [`baton_core::secrets::Binding`]).
    fn eval_with(
        &self,
        with: &baton_workflow::expr::Template,
        mut context: Value,
    ) -> Result<(Value, Vec<baton_core::secrets::Placed>), baton_workflow::expr::EvalError> {
        let binding = baton_core::secrets::Binding::new(self.secrets.keys(), &context);
        context["secrets"] = binding.secrets();
        let input = with.eval(&to_val(&context))?;
        Ok(binding.seal(input))
    }

    /// The context of a step's expressions: for an item of a for-each step, with `.item` and `.index`.
    fn item_context(
        &self,
        spec: &baton_workflow::Step,
        item: Option<u32>,
    ) -> Result<Value, (String, String)> {
        let mut context = self.context();
        if let (Some(n), Some(f)) = (item, &spec.for_each) {
            let list = f
                .items
                .eval(&to_val(&context))
                .map_err(|e| (format!("step {}: `for-each` {e}", spec.id), spec.id.clone()))?;
            context["item"] = list.get(n as usize).cloned().unwrap_or(Value::Null);
            context["index"] = json!(n);
        }
        Ok(context)
    }

    /// The timer that ends an attempt: its timeout, or the end of a sleep.
    fn attempt_timer(
        &self,
        spec: &baton_workflow::Step,
        item: Option<u32>,
        attempt: u32,
        clock: Clock,
    ) -> Option<Timer> {
        match spec.action {
            Action::Sleep(d) => Some(self.timer_at(
                TimerPurpose::Sleep {
                    step: spec.id.clone(),
                },
                clock.now + d,
            )),
            Action::Run => spec.timeout.map(|t| {
                self.timer_at(
                    TimerPurpose::Timeout {
                        step: spec.id.clone(),
                        item,
                        attempt,
                    },
                    clock.now + t,
                )
            }),
            // Its own timeout only: a wait's `timeout` is how long it waits.
            Action::Wait(ref wait) => Some(self.timer_at(
                TimerPurpose::Timeout {
                    step: spec.id.clone(),
                    item,
                    attempt,
                },
                clock.now + wait.timeout,
            )),
            Action::Approval(ref approval) => approval.timeout.map(|t| {
                self.timer_at(
                    TimerPurpose::Timeout {
                        step: spec.id.clone(),
                        item,
                        attempt,
                    },
                    clock.now + t,
                )
            }),
            Action::Workflow(_) => None,
        }
    }

    /// The retry timer (or an immediate request when the delay is zero) for a failed execution, or
    /// `None` when the policy gives up.
    fn retry(
        &self,
        policy: &Retry,
        exec: &Exec,
        clock: Clock,
        timer: impl FnOnce(u32, DateTime<Utc>, String) -> Timer,
    ) -> Option<RunEvent> {
        let error = exec.error.as_ref()?;
        let class = match error.code.as_deref() {
            Some("timeout") => ErrorClass::Timeout,
            code if error.retryable => ErrorClass::Transient { code },
            code => ErrorClass::Permanent { code },
        };
        let used = exec.attempt.saturating_sub(exec.budget_from);
        if used >= policy.attempts || !policy.retries(&class) {
            return None;
        }
        let delay = policy.delay(used, clock.random);
        Some(RunEvent::TimerScheduled(timer(
            exec.attempt + 1,
            clock.now + delay,
            self.id.clone(),
        )))
    }

    /// The run fails: undo what completed, or end at once when there is nothing to undo.
    fn fail(
        &mut self,
        wf: &Workflow,
        reason: String,
        step: Option<String>,
        clock: Clock,
        out: &mut Vec<RunEvent>,
    ) {
        self.failed_step = step.clone();
        let mut done: Vec<usize> = (0..self.steps.len())
            .filter(|&i| {
                self.steps[i].status == StepStatus::Completed && wf.steps[i].compensate.is_some()
            })
            .collect();
        done.sort_by_key(|&i| std::cmp::Reverse(self.steps[i].completed_order));
        if done.is_empty() && !self.awaits_completion(wf) {
            let end = self.ended(self.failed_ending(), Value::Null, Some(reason));
            return self.end(end, out);
        }
        let plan = done.iter().map(|&i| self.steps[i].id.clone()).collect();
        self.issue(
            out,
            RunEvent::Compensating(RunCompensating {
                run_id: self.id.clone(),
                reason,
                step,
                plan,
            }),
        );
        self.decide_compensating(wf, clock, out);
    }

    fn failed_ending(&self) -> Ending {
        if self.cancelled {
            Ending::Cancelled
        } else {
            Ending::Failed
        }
    }

    /// Whether step `i` may still complete: each of its executions completed or awaits an outcome.
    /// Nothing new is requested once the run fails, so no other running step ever completes.
    fn may_complete(&self, i: usize) -> bool {
        let s = &self.steps[i];
        s.status == StepStatus::Running
            && match s.item_count {
                Some(n) => (0..n).all(|k| s.items.get(k).is_some_and(Exec::is_alive)),
                None => s.exec.is_alive(),
            }
    }

    /// Whether a step with a compensation may still complete. It would then be undone first, so
    /// no compensation starts before it settles: the undoing stays in reverse order of completion.
    fn awaits_completion(&self, wf: &Workflow) -> bool {
        (0..self.steps.len()).any(|i| wf.steps[i].compensate.is_some() && self.may_complete(i))
    }

    fn decide_compensating(&mut self, wf: &Workflow, clock: Clock, out: &mut Vec<RunEvent>) {
        // A running step that can no longer complete (its attempt failed, items never started) has
        // failed; derived from the state like skipping, so the same after a replay.
        for i in 0..self.steps.len() {
            if self.steps[i].status == StepStatus::Running && !self.may_complete(i) {
                let s = &mut self.steps[i];
                let failed =
                    |e: &&Exec| matches!(e.state, ExecState::Failed | ExecState::FailedForGood);
                let error = std::iter::once(&s.exec)
                    .chain(&s.items)
                    .find(failed)
                    .and_then(|e| e.error.clone());
                s.status = StepStatus::Failed;
                s.output = json!({ "error": error });
            }
        }
        // Completions while compensating add steps to the plan; only those with a compensation count.
        self.plan.retain(|&i| wf.steps[i].compensate.is_some());
        if self.awaits_completion(wf) {
            return;
        }
        // Undo one step at a time, last completed first.
        for pos in 0..self.plan.len() {
            let i = self.plan[pos];
            let spec = &wf.steps[i];
            let Some(comp) = &spec.compensate else {
                continue;
            };
            let exec = self.steps[i].compensation.clone();
            match exec.state {
                ExecState::Completed => continue,
                ExecState::Pending | ExecState::RetryDue => {
                    let limit = baton_core::event::MAX_INPUT_BYTES;
                    let input = self
                        .eval_with(&comp.with, self.context())
                        .map_err(|e| e.to_string())
                        .and_then(|(v, placed)| match baton_core::event::json_size(&v) {
                            size if size > limit => Err(format!(
                                "is {size} bytes, more than the {limit} a request may carry; \
                                 pass a reference to large data, not the data"
                            )),
                            _ => Ok((v, placed)),
                        });
                    let (input, placed) = match input {
                        Ok(v) => v,
                        Err(e) => {
                            let failed = StepError {
                                message: format!("compensation `with` {e}"),
                                retryable: false,
                                code: None,
                            };
                            self.steps[i].compensation.state = ExecState::FailedForGood;
                            self.steps[i].compensation.error = Some(failed);
                            return self.compensation_failed(i, out);
                        }
                    };
                    let attempt = exec.attempt + 1;
                    self.issue(
                        out,
                        RunEvent::CompensationRequested(StepRequested {
                            run_id: self.id.clone(),
                            step: spec.id.clone(),
                            item: None,
                            items: None,
                            kind: comp.kind.clone(),
                            attempt,
                            input,
                            idempotency_key: format!("{}/{}/compensate", self.id, spec.id),
                            secrets: placed,
                            timeout_ms: comp.timeout.map(|t| t.as_millis() as u64),
                        }),
                    );
                    if let Some(t) = comp.timeout {
                        let timer = self.timer_at(
                            TimerPurpose::CompensationTimeout {
                                step: spec.id.clone(),
                                attempt,
                            },
                            clock.now + t,
                        );
                        self.issue(out, RunEvent::TimerScheduled(timer));
                    }
                    return;
                }
                ExecState::Requested => {
                    // A crash between the request and its timeout timer: schedule it now.
                    if let Some(t) = comp.timeout
                        && !exec.timer_scheduled
                    {
                        let purpose = TimerPurpose::CompensationTimeout {
                            step: spec.id.clone(),
                            attempt: exec.attempt,
                        };
                        let timer = self.timer_at(purpose, clock.now + t);
                        self.issue(out, RunEvent::TimerScheduled(timer));
                    }
                    return;
                }
                ExecState::Failed => {
                    let step = spec.id.clone();
                    match self.retry(&comp.retry, &exec, clock, |attempt, due, run_id| Timer {
                        run_id,
                        purpose: TimerPurpose::CompensationRetry { step, attempt },
                        due,
                    }) {
                        Some(timer) => self.issue(out, timer),
                        None => {
                            self.steps[i].compensation.state = ExecState::FailedForGood;
                            self.compensation_failed(i, out);
                        }
                    }
                    return;
                }
                ExecState::Backoff | ExecState::FailedForGood => return,
            }
        }
        // Everything in the plan is undone; with an empty plan, nothing completed after all.
        let reason = self.reason.clone();
        let ending = if self.plan.is_empty() {
            self.failed_ending()
        } else {
            Ending::Compensated
        };
        let end = self.ended(ending, Value::Null, reason);
        self.end(end, out);
    }

    fn compensation_failed(&mut self, i: usize, out: &mut Vec<RunEvent>) {
        let s = &self.steps[i];
        let why = s
            .compensation
            .error
            .as_ref()
            .map_or("failed", |e| e.message.as_str());
        let reason = format!(
            "compensation of step {} failed after {} attempt(s): {why} (run failed because: {})",
            s.id,
            s.compensation
                .attempt
                .saturating_sub(s.compensation.budget_from),
            self.reason.as_deref().unwrap_or("unknown")
        );
        let end = RunEnded {
            run_id: self.id.clone(),
            output: Value::Null,
            error: Some(reason),
            step: Some(s.id.clone()),
            round: self.round,
        };
        self.end(RunEvent::Ended(Ending::CompensationFailed, end), out);
    }

    fn ended(&self, ending: Ending, output: Value, error: Option<String>) -> RunEvent {
        RunEvent::Ended(
            ending,
            RunEnded {
                run_id: self.id.clone(),
                output,
                error,
                step: self.failed_step.clone(),
                round: self.round,
            },
        )
    }

    /// Records the end, after telling the parent step of a sub-workflow how it went: if a crash
    /// stores only the outcome, the rebuilt run ends again; the other way round the parent would
    /// never hear of it.
    fn end(&mut self, end: RunEvent, out: &mut Vec<RunEvent>) {
        if let (Some(parent), RunEvent::Ended(ending, e)) = (&self.parent, &end) {
            out.push(self.outcome_for_parent(parent, *ending, e));
        }
        self.issue(out, end);
    }

    fn outcome_for_parent(&self, parent: &Parent, ending: Ending, e: &RunEnded) -> RunEvent {
        match ending {
            Ending::Succeeded => RunEvent::StepCompleted(StepCompleted {
                run_id: parent.run_id.clone(),
                step: parent.step.clone(),
                item: None,
                kind: "workflow".into(),
                attempt: parent.attempt,
                output: e.output.clone(),
                runner: "coordinator".into(),
                duration_ms: 0,
            }),
            other => RunEvent::StepFailed(StepFailed {
                run_id: parent.run_id.clone(),
                step: parent.step.clone(),
                item: None,
                kind: "workflow".into(),
                attempt: parent.attempt,
                error: StepError {
                    message: format!(
                        "sub-run {} ended {}: {}",
                        self.id,
                        other.verb(),
                        e.error.as_deref().unwrap_or("")
                    ),
                    retryable: false,
                    code: Some(format!("run-{}", other.verb())),
                },
                runner: "coordinator".into(),
            }),
        }
    }

    fn timer_at(&self, purpose: TimerPurpose, due: DateTime<Utc>) -> Timer {
        Timer {
            run_id: self.id.clone(),
            purpose,
            due,
        }
    }

    /// The id of the sub-run a `workflow` step starts.
    pub fn child_run_id(&self, step: &str, attempt: u32) -> String {
        baton_core::event::child_run_id(&self.id, step, attempt)
    }

    /// What expressions see: `.inputs`, `.event`, `.steps.<id>.outputs` and `.status`, `.run`.
    pub fn context(&self) -> Value {
        let steps: Map<String, Value> = self
            .steps
            .iter()
            .map(|s| {
                let status = match s.status {
                    StepStatus::Pending => "pending",
                    StepStatus::Running => "running",
                    StepStatus::Completed => "completed",
                    StepStatus::Failed => "failed",
                    StepStatus::Skipped => "skipped",
                };
                (s.id.clone(), json!({"outputs": s.output, "status": status}))
            })
            .collect();
        json!({
            "inputs": self.input,
            "event": self.trigger,
            "steps": steps,
            "run": {"id": self.id, "workflow": self.workflow.name, "version": self.workflow.version},
            "secrets": self.secrets,
        })
    }
}

fn timeout_error() -> StepError {
    StepError {
        message: "the attempt timed out; give the step a longer `timeout` if it needs more time"
            .into(),
        retryable: true,
        code: Some("timeout".into()),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod wait_tests;
