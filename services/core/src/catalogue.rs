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
    vec![
        EventType {
            ty: types::RUN_REQUESTED,
            subject: "baton.run.<p>.<run>.run.requested",
            producers: "baton CLI, gateway (triggers)",
            consumers: "coordinator",
            description: "Start a run of a pinned workflow version, with its input and the event that triggered it.",
            schema: schema::<event::RunRequested>,
        },
        EventType {
            ty: types::RUN_CANCEL_REQUESTED,
            subject: "baton.run.<p>.<run>.run.cancel-requested",
            producers: "baton CLI",
            consumers: "coordinator",
            description: "Stop a run; it ends failed with the reason.",
            schema: schema::<event::CancelRequested>,
        },
        EventType {
            ty: types::STEP_REQUESTED,
            subject: "baton.run.<p>.<run>.step.<kind>.requested",
            producers: "coordinator",
            consumers: "runners and step services of <kind>",
            description: "Execute one attempt of a step with its evaluated input and idempotency key.",
            schema: schema::<event::StepRequested>,
        },
        EventType {
            ty: types::STEP_COMPLETED,
            subject: "baton.run.<p>.<run>.step.<kind>.completed",
            producers: "runners and step services",
            consumers: "coordinator",
            description: "An attempt succeeded; its outputs feed the next steps.",
            schema: schema::<event::StepCompleted>,
        },
        EventType {
            ty: types::STEP_FAILED,
            subject: "baton.run.<p>.<run>.step.<kind>.failed",
            producers: "runners and step services",
            consumers: "coordinator",
            description: "An attempt failed, retryable or not.",
            schema: schema::<event::StepFailed>,
        },
        EventType {
            ty: types::RUN_SUCCEEDED,
            subject: "baton.run.<p>.<run>.run.succeeded",
            producers: "coordinator",
            consumers: "baton CLI, anyone watching runs",
            description: "The run ended successfully with its outputs.",
            schema: schema::<event::RunSucceeded>,
        },
        EventType {
            ty: types::RUN_FAILED,
            subject: "baton.run.<p>.<run>.run.failed",
            producers: "coordinator",
            consumers: "baton CLI, anyone watching runs",
            description: "The run ended in failure (a step failed, an expression failed, invalid input, cancelled).",
            schema: schema::<event::RunFailed>,
        },
        EventType {
            ty: crate::dlq::TYPE,
            subject: "baton.dlq.<origin>",
            producers: "any service that rejects input",
            consumers: "baton deadletters",
            description: "A rejected message: the reason, and the original subject, headers and bytes.",
            schema: schema::<DeadLetter>,
        },
    ]
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
