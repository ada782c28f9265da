//! Baton's own events: their types, their data, and how each maps to a CloudEvent and a subject.
//!
//! Every event of a run is one [`RunEvent`]. Ids are deterministic (run, step, attempt, verb), so a
//! process that repeats work after a crash republishes the same ids, which JetStream de-duplicates.

use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::subjects;
use crate::trace::Trace;

/// CloudEvent `type` of every Baton event: `dev.baton.<noun>.<verb>`.
pub mod types {
    pub const RUN_REQUESTED: &str = "dev.baton.run.requested";
    pub const RUN_CANCEL_REQUESTED: &str = "dev.baton.run.cancel-requested";
    pub const RUN_COMPENSATION_RETRY_REQUESTED: &str = "dev.baton.run.compensation-retry-requested";
    pub const RUN_COMPENSATING: &str = "dev.baton.run.compensating";
    pub const RUN_SUCCEEDED: &str = "dev.baton.run.succeeded";
    pub const RUN_FAILED: &str = "dev.baton.run.failed";
    pub const RUN_CANCELLED: &str = "dev.baton.run.cancelled";
    pub const RUN_COMPENSATED: &str = "dev.baton.run.compensated";
    pub const RUN_COMPENSATION_FAILED: &str = "dev.baton.run.compensation-failed";
    pub const STEP_REQUESTED: &str = "dev.baton.step.requested";
    pub const STEP_STARTED: &str = "dev.baton.step.started";
    pub const STEP_HEARTBEAT: &str = "dev.baton.step.heartbeat";
    pub const STEP_COMPLETED: &str = "dev.baton.step.completed";
    pub const STEP_FAILED: &str = "dev.baton.step.failed";
    pub const COMPENSATION_REQUESTED: &str = "dev.baton.compensation.requested";
    pub const COMPENSATION_COMPLETED: &str = "dev.baton.compensation.completed";
    pub const COMPENSATION_FAILED: &str = "dev.baton.compensation.failed";
    pub const TIMER_FIRED: &str = "dev.baton.timer.fired";
    pub const APPROVAL_DECIDED: &str = "dev.baton.approval.decided";
}

/// A workflow version, as pinned by a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowRef {
    pub name: String,
    pub version: u64,
}

/// The external event that started a run, as the run's input sees it (`.event` in expressions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Trigger {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default)]
    pub data: Value,
    /// Extension attributes (`traceparent`, `partitionkey`, ...) by name.
    #[serde(flatten)]
    pub extensions: std::collections::BTreeMap<String, Value>,
}

impl Trigger {
    /// The event as expressions see it: its attributes at the top, `data` parsed when it is JSON.
    pub fn from_event(event: &Event) -> Trigger {
        use cloudevents::event::ExtensionValue;
        Trigger {
            id: event.id().to_owned(),
            source: event.source().to_string(),
            ty: event.ty().to_owned(),
            subject: event.subject().map(str::to_owned),
            time: event
                .time()
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            data: data_value(event),
            extensions: event
                .iter_extensions()
                .map(|(name, value)| {
                    let value = match value {
                        ExtensionValue::String(s) => Value::String(s.clone()),
                        ExtensionValue::Boolean(b) => Value::Bool(*b),
                        ExtensionValue::Integer(i) => Value::from(*i),
                    };
                    (name.to_owned(), value)
                })
                .collect(),
        }
    }
}

/// A person's decision on an `approval` step (`baton approve` / `baton reject`, or any publisher on
/// `baton.events.<origin>`). Its CloudEvent subject is `<run>/<step>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApprovalDecided {
    pub run_id: String,
    pub step: String,
    /// `true` lets the run go on; `false` fails the step (error code `rejected`).
    pub approved: bool,
    /// Who decided: must be one of the step's `approvers` when it names any.
    pub by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

/// The step of another run that started this one (a sub-workflow), and waits for its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Parent {
    pub run_id: String,
    pub step: String,
    /// The attempt of the parent's step that started this run.
    pub attempt: u32,
}

/// Data of `dev.baton.run.requested`: start a run of a pinned workflow version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunRequested {
    pub run_id: String,
    pub workflow: WorkflowRef,
    #[serde(default)]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
}

/// Data of `dev.baton.step.requested` and `dev.baton.compensation.requested`: execute one attempt
/// of a step (or of its compensation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepRequested {
    pub run_id: String,
    pub step: String,
    /// The item of a `for-each` step (from 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// How many items the `for-each` step has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
    pub kind: String,
    pub attempt: u32,
    /// The step's `with`, every expression evaluated.
    #[serde(default)]
    pub input: Value,
    /// The references to secrets the coordinator placed in `input`: the only ones a runner
    /// resolves. A reference that arrived as data (an event's, an input's, a step's outputs) is
    /// not listed, and stays text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secrets::Placed>,
    /// The same for every attempt of a step (and item): handlers use it to avoid repeating a side
    /// effect. A compensation has its own, ending in `/compensate`.
    pub idempotency_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Data of `dev.baton.step.completed` and `dev.baton.compensation.completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCompleted {
    pub run_id: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub kind: String,
    pub attempt: u32,
    #[serde(default)]
    pub output: Value,
    /// The runner instance that executed it (or `coordinator`).
    pub runner: String,
    pub duration_ms: u64,
}

/// Data of `dev.baton.step.started` and `dev.baton.step.heartbeat`: a runner began (or is still
/// executing) an attempt of a step or of its compensation. Informational: the coordinator does not
/// read them; a runner that dies is detected by JetStream redelivering its request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepActivity {
    pub run_id: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub kind: String,
    pub attempt: u32,
    /// `true` for an attempt of the step's compensation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compensation: bool,
    pub runner: String,
    /// How many times JetStream delivered the request (more than 1: a runner died or gave it back).
    pub delivered: u32,
    /// Time since the runner began this delivery.
    pub elapsed_ms: u64,
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StepError {
    pub message: String,
    /// `false` for a permanent error, which the default retry policy does not retry.
    pub retryable: bool,
    /// A machine-readable code (`timeout`, `http-503`, `exit-2` ...) that retry policies can name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl StepError {
    /// The error an attempt gets when its timeout passes.
    pub fn timeout(after: std::time::Duration) -> StepError {
        StepError {
            message: format!("timed out after {after:?}"),
            retryable: true,
            code: Some("timeout".into()),
        }
    }
}

/// Data of `dev.baton.step.failed` and `dev.baton.compensation.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepFailed {
    pub run_id: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub kind: String,
    pub attempt: u32,
    pub error: StepError,
    pub runner: String,
}

/// What a timer is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "purpose", rename_all = "kebab-case")]
pub enum TimerPurpose {
    /// Request `attempt` of a step after its backoff.
    Retry {
        step: String,
        item: Option<u32>,
        attempt: u32,
    },
    /// `attempt` of a step times out.
    Timeout {
        step: String,
        item: Option<u32>,
        attempt: u32,
    },
    /// A `sleep` step is done.
    Sleep { step: String },
    /// The run times out.
    RunTimeout,
    /// Request `attempt` of a compensation after its backoff.
    CompensationRetry { step: String, attempt: u32 },
    /// `attempt` of a compensation times out.
    CompensationTimeout { step: String, attempt: u32 },
}

/// Data of `dev.baton.timer.fired`: published with `Nats-Schedule: @at <due>` on
/// `baton.run.<p>.<run>.timer.<name>.at`, and written by nats-server on `.fired` at that time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Timer {
    pub run_id: String,
    #[serde(flatten)]
    pub purpose: TimerPurpose,
    pub due: chrono::DateTime<chrono::Utc>,
}

impl Timer {
    /// The timer's subject token. A later timer with the same name replaces a pending one.
    pub fn name(&self) -> String {
        let item = |i: &Option<u32>| i.map(|i| format!("-i{i}")).unwrap_or_default();
        match &self.purpose {
            TimerPurpose::Retry { step, item: i, .. } => format!("retry-{step}{}", item(i)),
            TimerPurpose::Timeout { step, item: i, .. } => format!("timeout-{step}{}", item(i)),
            TimerPurpose::Sleep { step } => format!("sleep-{step}"),
            TimerPurpose::RunTimeout => "run-timeout".into(),
            TimerPurpose::CompensationRetry { step, .. } => format!("cretry-{step}"),
            TimerPurpose::CompensationTimeout { step, .. } => format!("ctimeout-{step}"),
        }
    }

    fn number(&self) -> u32 {
        match &self.purpose {
            TimerPurpose::Retry { attempt, .. }
            | TimerPurpose::Timeout { attempt, .. }
            | TimerPurpose::CompensationRetry { attempt, .. }
            | TimerPurpose::CompensationTimeout { attempt, .. } => *attempt,
            TimerPurpose::Sleep { .. } | TimerPurpose::RunTimeout => 0,
        }
    }
}

/// Data of `dev.baton.run.compensating`: the run failed; these completed steps are undone, in
/// this order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCompensating {
    pub run_id: String,
    /// Why the run failed.
    pub reason: String,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Steps to undo, last completed first.
    pub plan: Vec<String>,
}

/// Data of the events that end a run (`succeeded`, `failed`, `cancelled`, `compensated`,
/// `compensation-failed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunEnded {
    pub run_id: String,
    /// The run's outputs (succeeded runs).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub output: Value,
    /// Why it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Counts the ends of a run whose compensation was retried (from 1).
    #[serde(default = "one")]
    pub round: u32,
}

fn one() -> u32 {
    1
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    Succeeded,
    Failed,
    Cancelled,
    Compensated,
    CompensationFailed,
}

impl Ending {
    pub const ALL: [Ending; 5] = [
        Ending::Succeeded,
        Ending::Failed,
        Ending::Cancelled,
        Ending::Compensated,
        Ending::CompensationFailed,
    ];

    /// The verb in the event type and subject.
    pub fn verb(self) -> &'static str {
        match self {
            Ending::Succeeded => "succeeded",
            Ending::Failed => "failed",
            Ending::Cancelled => "cancelled",
            Ending::Compensated => "compensated",
            Ending::CompensationFailed => "compensation-failed",
        }
    }

    pub fn ty(self) -> &'static str {
        match self {
            Ending::Succeeded => types::RUN_SUCCEEDED,
            Ending::Failed => types::RUN_FAILED,
            Ending::Cancelled => types::RUN_CANCELLED,
            Ending::Compensated => types::RUN_COMPENSATED,
            Ending::CompensationFailed => types::RUN_COMPENSATION_FAILED,
        }
    }
}

/// Data of `dev.baton.run.cancel-requested`: stop a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelRequested {
    pub run_id: String,
    #[serde(default)]
    pub reason: String,
}

/// Data of `dev.baton.run.compensation-retry-requested`: retry the compensation that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompensationRetryRequested {
    pub run_id: String,
    /// The `compensation_failed` end this retries (its `round`), so a request delivered again
    /// after that retry has ended reopens nothing. 0: the current end (requests written before
    /// rounds were named).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One event of a run's journal.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    Requested(RunRequested),
    CancelRequested(CancelRequested),
    CompensationRetryRequested(CompensationRetryRequested),
    StepRequested(StepRequested),
    StepStarted(StepActivity),
    StepHeartbeat(StepActivity),
    StepCompleted(StepCompleted),
    StepFailed(StepFailed),
    CompensationRequested(StepRequested),
    CompensationCompleted(StepCompleted),
    CompensationFailed(StepFailed),
    /// A timer held by the server (read back from the journal before it fires).
    TimerScheduled(Timer),
    TimerFired(Timer),
    Compensating(RunCompensating),
    Ended(Ending, RunEnded),
}

/// Why a CloudEvent is not a valid Baton run event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("event type {0:?} is not a Baton run event")]
    UnknownType(String),
    #[error("data of {ty} event {id:?} is invalid: {source}")]
    Data {
        ty: String,
        id: String,
        source: serde_json::Error,
    },
}

/// Where an event goes: `run.<verb>`, `step.<kind>.<verb>` or `timer.<name>.<verb>`.
enum Place<'a> {
    Run(&'a str),
    Step(&'a str, &'a str),
    Timer(String, &'a str),
}

impl RunEvent {
    pub fn run_id(&self) -> &str {
        match self {
            RunEvent::Requested(e) => &e.run_id,
            RunEvent::CancelRequested(e) => &e.run_id,
            RunEvent::CompensationRetryRequested(e) => &e.run_id,
            RunEvent::StepRequested(e) | RunEvent::CompensationRequested(e) => &e.run_id,
            RunEvent::StepStarted(e) | RunEvent::StepHeartbeat(e) => &e.run_id,
            RunEvent::StepCompleted(e) | RunEvent::CompensationCompleted(e) => &e.run_id,
            RunEvent::StepFailed(e) | RunEvent::CompensationFailed(e) => &e.run_id,
            RunEvent::TimerScheduled(e) | RunEvent::TimerFired(e) => &e.run_id,
            RunEvent::Compensating(e) => &e.run_id,
            RunEvent::Ended(_, e) => &e.run_id,
        }
    }

    pub fn ty(&self) -> &'static str {
        match self {
            RunEvent::Requested(_) => types::RUN_REQUESTED,
            RunEvent::CancelRequested(_) => types::RUN_CANCEL_REQUESTED,
            RunEvent::CompensationRetryRequested(_) => types::RUN_COMPENSATION_RETRY_REQUESTED,
            RunEvent::StepRequested(_) => types::STEP_REQUESTED,
            RunEvent::StepStarted(_) => types::STEP_STARTED,
            RunEvent::StepHeartbeat(_) => types::STEP_HEARTBEAT,
            RunEvent::StepCompleted(_) => types::STEP_COMPLETED,
            RunEvent::StepFailed(_) => types::STEP_FAILED,
            RunEvent::CompensationRequested(_) => types::COMPENSATION_REQUESTED,
            RunEvent::CompensationCompleted(_) => types::COMPENSATION_COMPLETED,
            RunEvent::CompensationFailed(_) => types::COMPENSATION_FAILED,
            RunEvent::TimerScheduled(_) | RunEvent::TimerFired(_) => types::TIMER_FIRED,
            RunEvent::Compensating(_) => types::RUN_COMPENSATING,
            RunEvent::Ended(ending, _) => ending.ty(),
        }
    }

    fn place(&self) -> Place<'_> {
        match self {
            RunEvent::Requested(_) => Place::Run("requested"),
            RunEvent::CancelRequested(_) => Place::Run("cancel-requested"),
            RunEvent::CompensationRetryRequested(_) => Place::Run("compensation-retry-requested"),
            RunEvent::Compensating(_) => Place::Run("compensating"),
            RunEvent::Ended(ending, _) => Place::Run(ending.verb()),
            RunEvent::StepRequested(e) => Place::Step(&e.kind, "requested"),
            RunEvent::StepStarted(e) => Place::Step(&e.kind, "started"),
            RunEvent::StepHeartbeat(e) => Place::Step(&e.kind, "heartbeat"),
            RunEvent::StepCompleted(e) => Place::Step(&e.kind, "completed"),
            RunEvent::StepFailed(e) => Place::Step(&e.kind, "failed"),
            RunEvent::CompensationRequested(e) => Place::Step(&e.kind, "compensate"),
            RunEvent::CompensationCompleted(e) => Place::Step(&e.kind, "compensated"),
            RunEvent::CompensationFailed(e) => Place::Step(&e.kind, "compensation-failed"),
            RunEvent::TimerScheduled(t) => Place::Timer(t.name(), "at"),
            RunEvent::TimerFired(t) => Place::Timer(t.name(), "fired"),
        }
    }

    /// The deterministic CloudEvent id (and `Nats-Msg-Id`).
    pub fn id(&self) -> String {
        let item = |i: &Option<u32>| item_label(*i);
        match self {
            RunEvent::Requested(e) => format!("{}.requested", e.run_id),
            RunEvent::CancelRequested(e) => format!("{}.cancel-requested", e.run_id),
            // One request per failed end: asking twice is one retry.
            RunEvent::CompensationRetryRequested(e) if e.round > 0 => {
                format!("{}.compensation-retry.{}", e.run_id, e.round)
            }
            RunEvent::CompensationRetryRequested(e) => {
                format!("{}.compensation-retry.{}", e.run_id, new_run_id())
            }
            RunEvent::StepRequested(e) => format!(
                "{}.{}{}.{}.requested",
                e.run_id,
                e.step,
                item(&e.item),
                e.attempt
            ),
            RunEvent::StepStarted(e) | RunEvent::StepHeartbeat(e) => {
                let what = if matches!(self, RunEvent::StepStarted(_)) {
                    "started"
                } else {
                    "heartbeat"
                };
                let c = if e.compensation { "c" } else { "" };
                format!(
                    "{}.{}{}.{c}{}.{what}.{}.{}",
                    e.run_id,
                    e.step,
                    item(&e.item),
                    e.attempt,
                    e.delivered,
                    e.elapsed_ms
                )
            }
            // Completed and failed share an id: only the first outcome of an attempt is stored.
            RunEvent::StepCompleted(StepCompleted {
                run_id,
                step,
                item: i,
                attempt,
                ..
            })
            | RunEvent::StepFailed(StepFailed {
                run_id,
                step,
                item: i,
                attempt,
                ..
            }) => {
                format!("{run_id}.{step}{}.{attempt}.outcome", item(i))
            }
            RunEvent::CompensationRequested(e) => {
                format!("{}.{}.c{}.requested", e.run_id, e.step, e.attempt)
            }
            RunEvent::CompensationCompleted(StepCompleted {
                run_id,
                step,
                attempt,
                ..
            })
            | RunEvent::CompensationFailed(StepFailed {
                run_id,
                step,
                attempt,
                ..
            }) => {
                format!("{run_id}.{step}.c{attempt}.outcome")
            }
            RunEvent::TimerScheduled(t) | RunEvent::TimerFired(t) => {
                format!("{}.{}.{}", t.run_id, t.name(), t.number())
            }
            RunEvent::Compensating(e) => format!("{}.compensating", e.run_id),
            RunEvent::Ended(_, e) => format!("{}.ended.{}", e.run_id, e.round),
        }
    }

    /// The CloudEvent `subject` attribute: the run, or the run and step.
    fn ce_subject(&self) -> String {
        match self {
            RunEvent::StepRequested(e) | RunEvent::CompensationRequested(e) => {
                format!("{}/{}", e.run_id, e.step)
            }
            RunEvent::StepCompleted(e) | RunEvent::CompensationCompleted(e) => {
                format!("{}/{}", e.run_id, e.step)
            }
            RunEvent::StepFailed(e) | RunEvent::CompensationFailed(e) => {
                format!("{}/{}", e.run_id, e.step)
            }
            RunEvent::StepStarted(e) | RunEvent::StepHeartbeat(e) => {
                format!("{}/{}", e.run_id, e.step)
            }
            other => other.run_id().to_owned(),
        }
    }

    /// The NATS subject in the journal.
    pub fn subject(&self, partitions: u32) -> String {
        let run = self.run_id();
        let p = subjects::partition(run, partitions);
        match self.place() {
            Place::Run(verb) => subjects::run_event(p, run, verb),
            Place::Step(kind, verb) => subjects::step_event(p, run, kind, verb),
            Place::Timer(name, verb) => subjects::timer_event(p, run, &name, verb),
        }
    }

    fn data(&self) -> Value {
        let v = match self {
            RunEvent::Requested(e) => serde_json::to_value(e),
            RunEvent::CancelRequested(e) => serde_json::to_value(e),
            RunEvent::CompensationRetryRequested(e) => serde_json::to_value(e),
            RunEvent::StepRequested(e) | RunEvent::CompensationRequested(e) => {
                serde_json::to_value(e)
            }
            RunEvent::StepStarted(e) | RunEvent::StepHeartbeat(e) => serde_json::to_value(e),
            RunEvent::StepCompleted(e) | RunEvent::CompensationCompleted(e) => {
                serde_json::to_value(e)
            }
            RunEvent::StepFailed(e) | RunEvent::CompensationFailed(e) => serde_json::to_value(e),
            RunEvent::TimerScheduled(e) | RunEvent::TimerFired(e) => serde_json::to_value(e),
            RunEvent::Compensating(e) => serde_json::to_value(e),
            RunEvent::Ended(_, e) => serde_json::to_value(e),
        };
        // Serializing these plain structs cannot fail.
        v.unwrap_or_default()
    }

    /// This event as a CloudEvent from `source` (`baton/<service>`), carrying the run's trace
    /// context as the `traceparent` and `tracestate` extensions.
    pub fn to_cloudevent(&self, source: &str, trace: &Trace) -> Event {
        let mut builder = EventBuilderV10::new()
            .id(self.id())
            .source(source)
            .ty(self.ty())
            .subject(self.ce_subject())
            .time(chrono::Utc::now())
            .data("application/json", self.data())
            .extension("traceparent", trace.traceparent());
        if let Some(state) = &trace.state {
            builder = builder.extension("tracestate", state.as_str());
        }
        // All required attributes are set above, so building cannot fail.
        builder
            .build()
            .expect("a Baton event has every required attribute")
    }

    /// Parses one of Baton's run events from a message of the journal. The subject tells a timer
    /// still held by the server (`.at`) from one that fired.
    pub fn from_message(subject: &str, event: &Event) -> Result<RunEvent, Error> {
        let err = |source| Error::Data {
            ty: event.ty().to_owned(),
            id: event.id().to_owned(),
            source,
        };
        let data = || event_data(event).map_err(err);
        macro_rules! parse {
            () => {
                serde_json::from_value(data()?).map_err(err)?
            };
        }
        Ok(match event.ty() {
            types::RUN_REQUESTED => RunEvent::Requested(parse!()),
            types::RUN_CANCEL_REQUESTED => RunEvent::CancelRequested(parse!()),
            types::RUN_COMPENSATION_RETRY_REQUESTED => {
                RunEvent::CompensationRetryRequested(parse!())
            }
            types::RUN_COMPENSATING => RunEvent::Compensating(parse!()),
            types::STEP_REQUESTED => RunEvent::StepRequested(parse!()),
            types::STEP_STARTED => RunEvent::StepStarted(parse!()),
            types::STEP_HEARTBEAT => RunEvent::StepHeartbeat(parse!()),
            types::STEP_COMPLETED => RunEvent::StepCompleted(parse!()),
            types::STEP_FAILED => RunEvent::StepFailed(parse!()),
            types::COMPENSATION_REQUESTED => RunEvent::CompensationRequested(parse!()),
            types::COMPENSATION_COMPLETED => RunEvent::CompensationCompleted(parse!()),
            types::COMPENSATION_FAILED => RunEvent::CompensationFailed(parse!()),
            types::TIMER_FIRED if subject.ends_with(".at") => RunEvent::TimerScheduled(parse!()),
            types::TIMER_FIRED => RunEvent::TimerFired(parse!()),
            other => match Ending::ALL.into_iter().find(|e| e.ty() == other) {
                Some(ending) => RunEvent::Ended(ending, parse!()),
                None => return Err(Error::UnknownType(other.to_owned())),
            },
        })
    }
}

/// How ids and messages name the item of a `for-each` step: `[3]`, or nothing.
pub fn item_label(item: Option<u32>) -> String {
    item.map(|i| format!("[{i}]")).unwrap_or_default()
}

/// The data of a CloudEvent as JSON: parsed from bytes or text when it arrived in binary mode.
pub fn event_data(event: &Event) -> Result<Value, serde_json::Error> {
    match event.data() {
        None => Ok(Value::Null),
        Some(Data::Json(v)) => Ok(v.clone()),
        Some(Data::Binary(b)) => serde_json::from_slice(b),
        Some(Data::String(s)) => serde_json::from_str(s).or_else(|_| Ok(Value::String(s.clone()))),
    }
}

/// The data of any CloudEvent as a JSON value for expressions: parsed JSON when it is JSON, the text
/// otherwise (binary data that is not UTF-8 is shown lossily, never dropped).
pub fn data_value(event: &Event) -> Value {
    match event.data() {
        None => Value::Null,
        Some(Data::Json(v)) => v.clone(),
        Some(Data::String(s)) => {
            serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
        }
        Some(Data::Binary(b)) => serde_json::from_slice(b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned())),
    }
}

/// The trace context of an event (its `traceparent` and `tracestate` extensions), if it carries a
/// valid one. An invalid `traceparent` yields `None`: the caller starts a new trace instead.
pub fn trace(event: &Event) -> Option<Trace> {
    let parent = event.extension("traceparent").map(|v| v.to_string())?;
    let state = event.extension("tracestate").map(|v| v.to_string());
    Trace::parse(
        &[&parent],
        &state.as_deref().into_iter().collect::<Vec<_>>(),
    )
}

/// The id of the run that event (`source`, `id`) starts for `workflow`: the same every time, so a
/// redelivered event can never start a second run.
pub fn triggered_run_id(workflow: &str, source: &str, event_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(format!("{workflow}\0{source}\0{event_id}").as_bytes());
    hash.iter().take(13).map(|b| format!("{b:02x}")).collect()
}

/// The most a step's input may be, in bytes of JSON: NATS's default `max_payload` (1 MiB) less
/// room for the rest of the request and its headers. A larger input could never be stored, so the
/// coordinator fails the step with this limit in the reason instead of trying.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024 - 64 * 1024;

/// The size of `value` as compact JSON, without building the text.
pub fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The id of the sub-run that attempt `attempt` of a `workflow` step starts.
pub fn child_run_id(run_id: &str, step: &str, attempt: u32) -> String {
    format!("{run_id}-{step}-{attempt}")
}

/// A new id for a run started by hand: a ULID, sortable by start time.
pub fn new_run_id() -> String {
    ulid::Ulid::generate().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(event: RunEvent) -> RunEvent {
        let ce = event.to_cloudevent("baton/test", &Trace::new());
        RunEvent::from_message(&event.subject(16), &ce).unwrap()
    }

    #[test]
    fn run_events_round_trip_through_cloudevents() {
        let completed = RunEvent::StepCompleted(StepCompleted {
            run_id: "r1".into(),
            step: "build".into(),
            item: None,
            kind: "echo".into(),
            attempt: 2,
            output: serde_json::json!({"artifact": "a.tar"}),
            runner: "runner-1".into(),
            duration_ms: 5,
        });
        let ce = completed.to_cloudevent("baton/runner", &Trace::new());
        assert_eq!(ce.id(), "r1.build.2.outcome");
        assert_eq!(ce.subject(), Some("r1/build"));
        assert_eq!(round_trip(completed.clone()), completed);
        let p = subjects::partition("r1", 16);
        assert_eq!(
            completed.subject(16),
            format!("baton.run.{p}.r1.step.echo.completed")
        );

        let timer = Timer {
            run_id: "r1".into(),
            purpose: TimerPurpose::Retry {
                step: "build".into(),
                item: Some(3),
                attempt: 2,
            },
            due: "2026-01-01T00:00:00.250Z".parse().unwrap(),
        };
        let scheduled = RunEvent::TimerScheduled(timer.clone());
        assert_eq!(
            scheduled.subject(16),
            format!("baton.run.{p}.r1.timer.retry-build-i3.at")
        );
        assert_eq!(round_trip(scheduled.clone()), scheduled);
        let fired = RunEvent::TimerFired(timer);
        assert_eq!(
            round_trip(fired.clone()),
            fired,
            "the subject tells fired from scheduled"
        );
        assert_eq!(fired.id(), "r1.retry-build-i3.2");

        let ended = RunEvent::Ended(
            Ending::CompensationFailed,
            RunEnded {
                run_id: "r1".into(),
                output: Value::Null,
                error: Some("refund failed".into()),
                step: Some("charge".into()),
                round: 2,
            },
        );
        assert_eq!(
            ended.subject(16),
            format!("baton.run.{p}.r1.run.compensation-failed")
        );
        assert_eq!(ended.id(), "r1.ended.2");
        assert_eq!(round_trip(ended.clone()), ended);
    }

    #[test]
    fn foreign_types_and_bad_data_are_errors() {
        let ce = EventBuilderV10::new()
            .id("1")
            .source("/x")
            .ty("com.example")
            .build()
            .unwrap();
        assert!(matches!(
            RunEvent::from_message("s", &ce),
            Err(Error::UnknownType(_))
        ));
        let ce = EventBuilderV10::new()
            .id("1")
            .source("/x")
            .ty(types::STEP_FAILED)
            .data("application/json", serde_json::json!({"run_id": 1}))
            .build()
            .unwrap();
        let err = RunEvent::from_message("s", &ce).unwrap_err().to_string();
        assert!(err.contains("dev.baton.step.failed"), "{err}");
    }

    #[test]
    fn invalid_trace_context_is_not_propagated() {
        let with = |tp: &str| {
            EventBuilderV10::new()
                .id("1")
                .source("/x")
                .ty("t")
                .extension("traceparent", tp)
                .build()
                .unwrap()
        };
        assert_eq!(
            trace(&with(
                "00-00000000000000000000000000000000-1234567890123456-01"
            )),
            None
        );
        assert_eq!(trace(&with("not a traceparent")), None);
        let ok = trace(&with(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .unwrap();
        assert_eq!(ok.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
