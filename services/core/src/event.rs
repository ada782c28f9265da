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

/// CloudEvent `type` of every Baton event: `dev.baton.<scope>.<verb>`.
pub mod types {
    pub const RUN_REQUESTED: &str = "dev.baton.run.requested";
    pub const RUN_SUCCEEDED: &str = "dev.baton.run.succeeded";
    pub const RUN_FAILED: &str = "dev.baton.run.failed";
    pub const RUN_CANCEL_REQUESTED: &str = "dev.baton.run.cancel-requested";
    pub const STEP_REQUESTED: &str = "dev.baton.step.requested";
    pub const STEP_STARTED: &str = "dev.baton.step.started";
    pub const STEP_COMPLETED: &str = "dev.baton.step.completed";
    pub const STEP_FAILED: &str = "dev.baton.step.failed";
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
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.run.requested`: start a run of a pinned workflow version.
pub struct RunRequested {
    pub run_id: String,
    pub workflow: WorkflowRef,
    #[serde(default)]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.step.requested`: execute one attempt of a step.
pub struct StepRequested {
    pub run_id: String,
    pub step: String,
    pub kind: String,
    pub attempt: u32,
    /// The step's `with`, every expression evaluated.
    #[serde(default)]
    pub input: Value,
    /// The same for every attempt of a step: handlers use it to avoid repeating a side effect.
    pub idempotency_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.step.completed`: an attempt succeeded with these outputs.
pub struct StepCompleted {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    #[serde(default)]
    pub output: Value,
    pub runner: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StepError {
    pub message: String,
    /// `false` for a permanent error: no further attempt is made.
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.step.failed`: an attempt failed.
pub struct StepFailed {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    pub error: StepError,
    pub runner: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.run.succeeded`: the run ended with these outputs.
pub struct RunSucceeded {
    pub run_id: String,
    #[serde(default)]
    pub output: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.run.failed`: the run ended in failure.
pub struct RunFailed {
    pub run_id: String,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// Data of `dev.baton.run.cancel-requested`: stop a run.
pub struct CancelRequested {
    pub run_id: String,
    #[serde(default)]
    pub reason: String,
}

/// One event of a run's journal.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    Requested(RunRequested),
    CancelRequested(CancelRequested),
    StepRequested(StepRequested),
    StepCompleted(StepCompleted),
    StepFailed(StepFailed),
    Succeeded(RunSucceeded),
    Failed(RunFailed),
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

impl RunEvent {
    pub fn run_id(&self) -> &str {
        match self {
            RunEvent::Requested(e) => &e.run_id,
            RunEvent::CancelRequested(e) => &e.run_id,
            RunEvent::StepRequested(e) => &e.run_id,
            RunEvent::StepCompleted(e) => &e.run_id,
            RunEvent::StepFailed(e) => &e.run_id,
            RunEvent::Succeeded(e) => &e.run_id,
            RunEvent::Failed(e) => &e.run_id,
        }
    }

    pub fn ty(&self) -> &'static str {
        match self {
            RunEvent::Requested(_) => types::RUN_REQUESTED,
            RunEvent::CancelRequested(_) => types::RUN_CANCEL_REQUESTED,
            RunEvent::StepRequested(_) => types::STEP_REQUESTED,
            RunEvent::StepCompleted(_) => types::STEP_COMPLETED,
            RunEvent::StepFailed(_) => types::STEP_FAILED,
            RunEvent::Succeeded(_) => types::RUN_SUCCEEDED,
            RunEvent::Failed(_) => types::RUN_FAILED,
        }
    }

    /// The deterministic CloudEvent id (and `Nats-Msg-Id`).
    pub fn id(&self) -> String {
        match self {
            RunEvent::Requested(e) => format!("{}.requested", e.run_id),
            RunEvent::CancelRequested(e) => format!("{}.cancel-requested", e.run_id),
            RunEvent::StepRequested(e) => {
                format!("{}.{}.{}.requested", e.run_id, e.step, e.attempt)
            }
            // Completed and failed share an id: only the first outcome of an attempt is stored.
            RunEvent::StepCompleted(e) => format!("{}.{}.{}.outcome", e.run_id, e.step, e.attempt),
            RunEvent::StepFailed(e) => format!("{}.{}.{}.outcome", e.run_id, e.step, e.attempt),
            RunEvent::Succeeded(e) => format!("{}.ended", e.run_id),
            RunEvent::Failed(e) => format!("{}.ended", e.run_id),
        }
    }

    /// The CloudEvent `subject` attribute: the run, or the run and step.
    fn ce_subject(&self) -> String {
        match self {
            RunEvent::StepRequested(e) => format!("{}/{}", e.run_id, e.step),
            RunEvent::StepCompleted(e) => format!("{}/{}", e.run_id, e.step),
            RunEvent::StepFailed(e) => format!("{}/{}", e.run_id, e.step),
            other => other.run_id().to_owned(),
        }
    }

    /// The NATS subject in the journal. `kind` is the step kind, needed for step events other
    /// than requests (whose kind is in their data).
    pub fn subject(&self, partitions: u32, kind: &str) -> String {
        let run = self.run_id();
        let p = subjects::partition(run, partitions);
        match self {
            RunEvent::Requested(_) => subjects::run_event(p, run, "requested"),
            RunEvent::CancelRequested(_) => subjects::run_event(p, run, "cancel-requested"),
            RunEvent::Succeeded(_) => subjects::run_event(p, run, "succeeded"),
            RunEvent::Failed(_) => subjects::run_event(p, run, "failed"),
            RunEvent::StepRequested(e) => subjects::step_event(p, run, &e.kind, "requested"),
            RunEvent::StepCompleted(_) => subjects::step_event(p, run, kind, "completed"),
            RunEvent::StepFailed(_) => subjects::step_event(p, run, kind, "failed"),
        }
    }

    fn data(&self) -> Value {
        let v = match self {
            RunEvent::Requested(e) => serde_json::to_value(e),
            RunEvent::CancelRequested(e) => serde_json::to_value(e),
            RunEvent::StepRequested(e) => serde_json::to_value(e),
            RunEvent::StepCompleted(e) => serde_json::to_value(e),
            RunEvent::StepFailed(e) => serde_json::to_value(e),
            RunEvent::Succeeded(e) => serde_json::to_value(e),
            RunEvent::Failed(e) => serde_json::to_value(e),
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
            .data("application/json", self.data());
        builder = builder.extension("traceparent", trace.traceparent());
        if let Some(state) = &trace.state {
            builder = builder.extension("tracestate", state.as_str());
        }
        // All required attributes are set above, so building cannot fail.
        builder
            .build()
            .expect("a Baton event has every required attribute")
    }

    /// Parses one of Baton's run events.
    pub fn from_cloudevent(event: &Event) -> Result<RunEvent, Error> {
        let err = |source| Error::Data {
            ty: event.ty().to_owned(),
            id: event.id().to_owned(),
            source,
        };
        let data = || event_data(event).map_err(err);
        Ok(match event.ty() {
            types::RUN_REQUESTED => {
                RunEvent::Requested(serde_json::from_value(data()?).map_err(err)?)
            }
            types::RUN_CANCEL_REQUESTED => {
                RunEvent::CancelRequested(serde_json::from_value(data()?).map_err(err)?)
            }
            types::STEP_REQUESTED => {
                RunEvent::StepRequested(serde_json::from_value(data()?).map_err(err)?)
            }
            types::STEP_COMPLETED => {
                RunEvent::StepCompleted(serde_json::from_value(data()?).map_err(err)?)
            }
            types::STEP_FAILED => {
                RunEvent::StepFailed(serde_json::from_value(data()?).map_err(err)?)
            }
            types::RUN_SUCCEEDED => {
                RunEvent::Succeeded(serde_json::from_value(data()?).map_err(err)?)
            }
            types::RUN_FAILED => RunEvent::Failed(serde_json::from_value(data()?).map_err(err)?),
            other => return Err(Error::UnknownType(other.to_owned())),
        })
    }
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

/// A new id for a run started by hand: a ULID, sortable by start time.
pub fn new_run_id() -> String {
    ulid::Ulid::generate().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_events_round_trip_through_cloudevents() {
        let event = RunEvent::StepCompleted(StepCompleted {
            run_id: "r1".into(),
            step: "build".into(),
            attempt: 2,
            output: serde_json::json!({"artifact": "a.tar"}),
            runner: "runner-1".into(),
            duration_ms: 5,
        });
        let trace = Trace::new();
        let ce = event.to_cloudevent("baton/runner", &trace);
        assert_eq!(super::trace(&ce), Some(trace));
        assert_eq!(ce.id(), "r1.build.2.outcome");
        assert_eq!(ce.subject(), Some("r1/build"));
        assert_eq!(RunEvent::from_cloudevent(&ce).unwrap(), event);
        let p = subjects::partition("r1", 16);
        assert_eq!(
            event.subject(16, "echo"),
            format!("baton.run.{p}.r1.step.echo.completed")
        );
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
            RunEvent::from_cloudevent(&ce),
            Err(Error::UnknownType(_))
        ));
        let ce = EventBuilderV10::new()
            .id("1")
            .source("/x")
            .ty(types::STEP_FAILED)
            .data("application/json", serde_json::json!({"run_id": 1}))
            .build()
            .unwrap();
        let err = RunEvent::from_cloudevent(&ce).unwrap_err().to_string();
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
