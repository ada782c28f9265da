//! The decision logic of a run: a projection of its events, with no I/O.
//!
//! [`Run::handle`] folds one event in and returns the commands (events to publish) that the new state
//! calls for. Decisions are level-triggered: they depend on the state only, never on which event just
//! arrived, and every command issued is folded back into the state at once. So a duplicate or
//! redelivered event changes nothing, and after a replay of the journal the next `handle` issues
//! exactly what is still missing.

use baton_core::event::{
    RunEvent, RunFailed, RunRequested, RunSucceeded, StepRequested, Trigger, WorkflowRef,
};
use baton_core::trace::Trace;
use baton_workflow::Workflow;
use baton_workflow::expr::to_val;
use serde::Serialize;
use serde_json::{Map, Value, json};

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum StepStatus {
    Pending,
    Requested { attempt: u32 },
    Completed { attempt: u32 },
    Failed { attempt: u32, error: String },
    Skipped,
}

impl StepStatus {
    /// Completed or skipped: dependents may go on.
    fn is_done(&self) -> bool {
        matches!(self, StepStatus::Completed { .. } | StepStatus::Skipped)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepState {
    pub id: String,
    #[serde(flatten)]
    pub status: StepStatus,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub output: Value,
    /// Position in the order of completion (1 = first completed), for compensation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_order: Option<u32>,
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
    pub status: Status,
    pub steps: Vec<StepState>,
    pub output: Value,
    pub error: Option<String>,
    /// Set by a cancel request or an invalid input; the run fails with it at the next decision.
    pub abort: Option<String>,
    completions: u32,
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
            status: Status::Running,
            steps: workflow
                .steps
                .iter()
                .map(|s| StepState {
                    id: s.id.clone(),
                    status: StepStatus::Pending,
                    output: Value::Null,
                    completed_order: None,
                })
                .collect(),
            output: Value::Null,
            error: None,
            abort,
            completions: 0,
        }
    }

    /// Folds `event` in, then returns the commands the new state calls for (already folded in).
    pub fn handle(&mut self, event: &RunEvent, workflow: &Workflow) -> Vec<RunEvent> {
        self.apply(event);
        self.decide(workflow)
    }

    /// Folds one event into the state. Events that do not fit the state (duplicates, outcomes of an
    /// attempt that is not the current one, anything after the end) change nothing.
    pub fn apply(&mut self, event: &RunEvent) {
        if self.status.is_terminal() {
            return;
        }
        match event {
            RunEvent::Requested(_) => {}
            RunEvent::CancelRequested(c) => {
                let reason = if c.reason.is_empty() {
                    "cancelled".to_owned()
                } else {
                    format!("cancelled: {}", c.reason)
                };
                self.abort.get_or_insert(reason);
            }
            RunEvent::StepRequested(r) => {
                if let Some(step) = self.step_mut(&r.step)
                    && step.status == StepStatus::Pending
                {
                    step.status = StepStatus::Requested { attempt: r.attempt };
                }
            }
            RunEvent::StepCompleted(c) => {
                let order = self.completions + 1;
                if let Some(step) = self.step_mut(&c.step)
                    && step.status == (StepStatus::Requested { attempt: c.attempt })
                {
                    step.status = StepStatus::Completed { attempt: c.attempt };
                    step.output = c.output.clone();
                    step.completed_order = Some(order);
                    self.completions = order;
                }
            }
            RunEvent::StepFailed(f) => {
                if let Some(step) = self.step_mut(&f.step)
                    && step.status == (StepStatus::Requested { attempt: f.attempt })
                {
                    step.status = StepStatus::Failed {
                        attempt: f.attempt,
                        error: f.error.message.clone(),
                    };
                }
            }
            RunEvent::Succeeded(s) => {
                self.status = Status::Succeeded;
                self.output = s.output.clone();
            }
            RunEvent::Failed(f) => {
                self.status = Status::Failed;
                self.error = Some(f.error.clone());
            }
        }
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut StepState> {
        self.steps.iter_mut().find(|s| s.id == id)
    }

    /// The commands the state calls for, each folded into the state as it is issued.
    pub fn decide(&mut self, workflow: &Workflow) -> Vec<RunEvent> {
        let mut commands = Vec::new();
        if self.status.is_terminal() {
            return commands;
        }
        if let Some(reason) = self.abort.clone() {
            return self.end(commands, self.failed(reason, None));
        }
        if let Some(step) = self
            .steps
            .iter()
            .find(|s| matches!(s.status, StepStatus::Failed { .. }))
        {
            let StepStatus::Failed { error, .. } = &step.status else {
                unreachable!()
            };
            let (error, id) = (format!("step {} failed: {error}", step.id), step.id.clone());
            return self.end(commands, self.failed(error, Some(id)));
        }
        // Skipping a step can make others ready, so repeat until nothing changes.
        loop {
            let mut changed = false;
            for (i, spec) in workflow.steps.iter().enumerate() {
                if self.steps[i].status != StepStatus::Pending
                    || !spec.needs.iter().all(|&n| self.steps[n].status.is_done())
                {
                    continue;
                }
                let context = to_val(&self.context());
                let skip = match &spec.condition {
                    Some(condition) => match condition.truthy(&context) {
                        Ok(run) => !run,
                        Err(e) => {
                            return self.end(
                                commands,
                                self.failed(
                                    format!("step {}: `if` {e}", spec.id),
                                    Some(spec.id.clone()),
                                ),
                            );
                        }
                    },
                    // Without an `if`, a step whose dependency was skipped is skipped too.
                    None => spec
                        .needs
                        .iter()
                        .any(|&n| self.steps[n].status == StepStatus::Skipped),
                };
                changed = true;
                if skip {
                    self.steps[i].status = StepStatus::Skipped;
                    continue;
                }
                let input = match spec.with.eval(&context) {
                    Ok(v) => v,
                    Err(e) => {
                        return self.end(
                            commands,
                            self.failed(
                                format!("step {}: `with` {e}", spec.id),
                                Some(spec.id.clone()),
                            ),
                        );
                    }
                };
                let request = RunEvent::StepRequested(StepRequested {
                    run_id: self.id.clone(),
                    step: spec.id.clone(),
                    kind: spec.kind.clone(),
                    attempt: 1,
                    input,
                    idempotency_key: format!("{}/{}", self.id, spec.id),
                    timeout_ms: None,
                });
                self.apply(&request);
                commands.push(request);
            }
            if !changed {
                break;
            }
        }
        if self.steps.iter().all(|s| s.status.is_done()) {
            let end = match workflow.outputs.eval(&to_val(&self.context())) {
                Ok(output) => RunEvent::Succeeded(RunSucceeded {
                    run_id: self.id.clone(),
                    output,
                }),
                Err(e) => self.failed(format!("run outputs: {e}"), None),
            };
            return self.end(commands, end);
        }
        commands
    }

    fn failed(&self, error: String, step: Option<String>) -> RunEvent {
        RunEvent::Failed(RunFailed {
            run_id: self.id.clone(),
            error,
            step,
        })
    }

    fn end(&mut self, mut commands: Vec<RunEvent>, end: RunEvent) -> Vec<RunEvent> {
        self.apply(&end);
        commands.push(end);
        commands
    }

    /// What expressions see: `.inputs`, `.event`, `.steps.<id>.outputs`, `.run`.
    pub fn context(&self) -> Value {
        let steps: Map<String, Value> = self
            .steps
            .iter()
            .map(|s| {
                let status = match s.status {
                    StepStatus::Pending => "pending",
                    StepStatus::Requested { .. } => "running",
                    StepStatus::Completed { .. } => "completed",
                    StepStatus::Failed { .. } => "failed",
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
        })
    }
}

#[cfg(test)]
mod tests;
