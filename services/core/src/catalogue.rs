//! The catalogue of every event type Baton emits or consumes: one naming scheme (`dev.baton.<noun>.<verb>`,
//! source `baton/<service>`), the subject each travels on, who writes and who reads it, and the JSON
//! Schema of its data. `schemas/events/<type>.json` is generated from these types (a test fails when
//! the files and the code differ), and the integration tests validate every event Baton publishes
//! against those files.

use schemars::{JsonSchema, Schema};

use crate::dlq::DeadLetter;
use crate::event::{self, types};

/// One event type.
#[derive(Debug, Clone)]
pub struct EventType {
    pub ty: &'static str,
    /// The subject pattern (`<p>` partition, `<run>` run id, `<kind>` step kind).
    pub subject: &'static str,
    pub producers: &'static str,
    pub consumers: &'static str,
    pub description: &'static str,
    schema: fn() -> Schema,
}

impl EventType {
    /// The JSON Schema of the event's data.
    pub fn schema(&self) -> Schema {
        (self.schema)()
    }

    /// The schema file name under `schemas/events/`.
    pub fn schema_file(&self) -> String {
        format!("{}.json", self.ty)
    }
}

fn schema<T: JsonSchema>() -> Schema {
    schemars::schema_for!(T)
}

/// Every event type, in the order of a run's life.
pub fn all() -> Vec<EventType> {
    let run = |ty, verb: &'static str, producers, consumers, description, schema| EventType {
        ty,
        subject: verb,
        producers,
        consumers,
        description,
        schema,
    };
    let mut types = vec![
        run(
            types::RUN_REQUESTED,
            "baton.run.<p>.<run>.run.requested",
            "baton CLI, gateway (triggers), coordinator (sub-workflows)",
            "coordinator",
            "Start a run of a pinned workflow version, with its input, the event that triggered it, and the parent step of a sub-workflow.",
            schema::<event::RunRequested> as fn() -> Schema,
        ),
        run(
            types::RUN_CANCEL_REQUESTED,
            "baton.run.<p>.<run>.run.cancel-requested",
            "baton CLI",
            "coordinator",
            "Stop a run: no step starts any more, completed steps are compensated.",
            schema::<event::CancelRequested>,
        ),
        run(
            types::RUN_COMPENSATION_RETRY_REQUESTED,
            "baton.run.<p>.<run>.run.compensation-retry-requested",
            "baton CLI",
            "coordinator",
            "Retry the compensation that failed in a run that ended compensation_failed.",
            schema::<event::CompensationRetryRequested>,
        ),
        run(
            types::STEP_REQUESTED,
            "baton.run.<p>.<run>.step.<kind>.requested",
            "coordinator",
            "runners and step services of <kind>",
            "Execute one attempt of a step (or one item of a for-each step) with its evaluated input and idempotency key.",
            schema::<event::StepRequested>,
        ),
        run(
            types::STEP_STARTED,
            "baton.run.<p>.<run>.step.<kind>.started",
            "runners",
            "anyone watching runs (baton runs follow)",
            "A runner began executing a delivery of an attempt (of a step or its compensation).",
            schema::<event::StepActivity>,
        ),
        run(
            types::STEP_HEARTBEAT,
            "baton.run.<p>.<run>.step.<kind>.heartbeat",
            "runners",
            "anyone watching runs",
            "An attempt is still executing. Stored with a per-message TTL (Nats-TTL) of one day, so long steps do not grow the journal forever.",
            schema::<event::StepActivity>,
        ),
        run(
            types::STEP_COMPLETED,
            "baton.run.<p>.<run>.step.<kind>.completed",
            "runners and step services; the coordinator for sleep and sub-workflow steps",
            "coordinator",
            "An attempt succeeded; its outputs feed the next steps.",
            schema::<event::StepCompleted>,
        ),
        run(
            types::STEP_FAILED,
            "baton.run.<p>.<run>.step.<kind>.failed",
            "runners and step services; the coordinator for sub-workflow steps",
            "coordinator",
            "An attempt failed, retryable or not, with an error code retry policies can name.",
            schema::<event::StepFailed>,
        ),
        run(
            types::TIMER_FIRED,
            "baton.run.<p>.<run>.timer.<name>.at (held by nats-server), .fired (written by it)",
            "coordinator (scheduled), nats-server (fired)",
            "coordinator",
            "A durable timer: a retry's backoff, a step, compensation or run timeout, a sleep.",
            schema::<event::Timer>,
        ),
        run(
            types::RUN_COMPENSATING,
            "baton.run.<p>.<run>.run.compensating",
            "coordinator",
            "anyone watching runs",
            "The run failed; the completed steps in `plan` are undone, in that order.",
            schema::<event::RunCompensating>,
        ),
        run(
            types::COMPENSATION_REQUESTED,
            "baton.run.<p>.<run>.step.<kind>.compensate",
            "coordinator",
            "runners and step services of <kind>",
            "Execute one attempt of a step's compensation.",
            schema::<event::StepRequested>,
        ),
        run(
            types::COMPENSATION_COMPLETED,
            "baton.run.<p>.<run>.step.<kind>.compensated",
            "runners and step services",
            "coordinator",
            "A compensation attempt succeeded: the step is undone.",
            schema::<event::StepCompleted>,
        ),
        run(
            types::COMPENSATION_FAILED,
            "baton.run.<p>.<run>.step.<kind>.compensation-failed",
            "runners and step services",
            "coordinator",
            "A compensation attempt failed.",
            schema::<event::StepFailed>,
        ),
    ];
    for ending in event::Ending::ALL {
        types.push(EventType {
            ty: ending.ty(),
            subject: match ending {
                event::Ending::Succeeded => "baton.run.<p>.<run>.run.succeeded",
                event::Ending::Failed => "baton.run.<p>.<run>.run.failed",
                event::Ending::Cancelled => "baton.run.<p>.<run>.run.cancelled",
                event::Ending::Compensated => "baton.run.<p>.<run>.run.compensated",
                event::Ending::CompensationFailed => "baton.run.<p>.<run>.run.compensation-failed",
            },
            producers: "coordinator",
            consumers: "baton CLI, the parent run of a sub-workflow, anyone watching runs",
            description: match ending {
                event::Ending::Succeeded => "The run ended successfully with its outputs.",
                event::Ending::Failed => "The run failed and had nothing to compensate.",
                event::Ending::Cancelled => "The run was cancelled and had nothing to compensate.",
                event::Ending::Compensated => "The run failed (or was cancelled) and every completed step with a compensation was undone.",
                event::Ending::CompensationFailed => "A compensation failed after its retries; a dead letter records it, `baton runs retry-compensation` retries it.",
            },
            schema: schema::<event::RunEnded>,
        });
    }
    types.push(EventType {
        ty: types::APPROVAL_DECIDED,
        subject: "baton.events.<origin>",
        producers: "baton approve, baton reject, any publisher (HTTP /events, NATS)",
        consumers: "coordinator (the waits matcher)",
        description: "A decision on an approval step: approved or rejected, by whom, with a comment. Subject `<run>/<step>`.",
        schema: schema::<event::ApprovalDecided>,
    });
    types.push(EventType {
        ty: crate::dlq::TYPE,
        subject: "baton.dlq.<origin>",
        producers: "any service that rejects input; the coordinator when a compensation fails for good",
        consumers: "baton deadletters",
        description: "A rejected message: the reason, and the original subject, headers and bytes.",
        schema: schema::<DeadLetter>,
    });
    types
}

/// The catalogue entry of a type.
pub fn find(ty: &str) -> Option<EventType> {
    all().into_iter().find(|t| t.ty == ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/events");

    /// The checked-in schemas are exactly the ones the code generates. Run with `BATON_BLESS=1` to
    /// rewrite them after changing an event type.
    #[test]
    fn schema_files_match_the_code() {
        let bless = std::env::var_os("BATON_BLESS").is_some();
        for t in all() {
            let path = format!("{DIR}/{}", t.schema_file());
            let generated = serde_json::to_string_pretty(&t.schema()).unwrap() + "\n";
            if bless {
                std::fs::create_dir_all(DIR).unwrap();
                std::fs::write(&path, &generated).unwrap();
            }
            let stored = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                stored, generated,
                "{path} differs from the code: run `BATON_BLESS=1 cargo test -p baton-core catalogue`"
            );
        }
        let files = std::fs::read_dir(DIR).unwrap().count();
        assert_eq!(
            files,
            all().len(),
            "every file in schemas/events belongs to a catalogued type"
        );
    }

    #[test]
    fn one_naming_scheme() {
        for t in all() {
            assert!(t.ty.starts_with("dev.baton."), "{}", t.ty);
            assert!(t.subject.starts_with("baton."), "{}", t.subject);
        }
    }
}

#[cfg(test)]
mod asyncapi {
    use super::*;

    /// Every catalogued type is a message of the AsyncAPI document, with its schema file, and every
    /// schema file the document names exists.
    #[test]
    fn asyncapi_lists_every_type() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas");
        let text = std::fs::read_to_string(format!("{root}/asyncapi.yaml")).unwrap();
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(doc["asyncapi"], "3.0.0");
        let messages = doc["components"]["messages"].as_object().unwrap();
        for t in all() {
            let m = messages
                .values()
                .find(|m| m["name"] == t.ty)
                .unwrap_or_else(|| panic!("{} is not in asyncapi.yaml", t.ty));
            assert_eq!(m["payload"]["$ref"], format!("events/{}", t.schema_file()));
        }
        for m in messages.values() {
            if let Some(file) = m["payload"]["$ref"].as_str() {
                assert!(
                    std::path::Path::new(&format!("{root}/{file}")).is_file(),
                    "{file}"
                );
            }
        }
    }
}
