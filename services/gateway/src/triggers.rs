//! Trigger matching: every event in `BATON_EVENTS` is matched against the `on:` clauses of every
//! enabled workflow (type, source and subject patterns, jq filter), through an index by type, and
//! starts a run of each that matches, through the trigger's flow control.
//!
//! The run id is derived from (workflow, event source, event id), so a redelivered event requests
//! the same run again, which JetStream drops as a duplicate. The event is acked only after every
//! `run.requested` (or debounce schedule) it caused is stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, kv};
use baton_core::event::{self, RunEvent, RunRequested, Trigger as EventJson, WorkflowRef};
use baton_core::registry::Registry;
use baton_core::shutdown::{CancellationToken, until_ok};
use baton_core::workflows::Workflows;
use baton_core::{Bus, binding, dlq, streams};
use baton_workflow::{Flow, Trigger, Workflow};
use cloudevents::{AttributesReader, Event};
use futures::StreamExt;
use serde_json::Value;

use crate::flow::{self, Decision};

pub(crate) const SOURCE: &str = "baton/gateway";
/// A miss reloads the index at most this often, so a workflow applied a moment ago is found.
const RELOAD_ON_MISS: Duration = Duration::from_millis(200);
/// The index is reloaded at least this often.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    #[error(transparent)]
    Registry(#[from] baton_core::registry::Error),
}

fn jserr<E: std::fmt::Display>(e: E) -> Error {
    Error::JetStream(e.to_string())
}

/// One trigger of one workflow version.
#[derive(Debug, Clone)]
pub struct Entry {
    pub workflow: Arc<Workflow>,
    pub version: u64,
    /// Its position in `on:`.
    pub position: usize,
}

impl Entry {
    fn trigger(&self) -> &Trigger {
        &self.workflow.triggers[self.position]
    }
}

/// The triggers of the enabled workflows, by event type: an event is checked only against the
/// triggers of its own type, however many workflows there are.
#[derive(Debug, Default)]
pub struct Index {
    by_type: HashMap<String, Vec<Entry>>,
}

impl Index {
    pub fn add(&mut self, workflow: Arc<Workflow>, version: u64) {
        for (position, trigger) in workflow.triggers.iter().enumerate() {
            self.by_type
                .entry(trigger.ty.clone())
                .or_default()
                .push(Entry {
                    workflow: workflow.clone(),
                    version,
                    position,
                });
        }
    }

    /// Every trigger of the workflow `name`.
    fn entries_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.by_type
            .values()
            .flatten()
            .filter(move |e| e.workflow.name == name)
    }

    /// The triggers of `ty`.
    pub fn candidates(&self, ty: &str) -> &[Entry] {
        self.by_type.get(ty).map_or(&[], Vec::as_slice)
    }

    /// The triggers `event` (a CloudEvent as JSON) matches, with their flow-control key; or, for a
    /// trigger whose filter or key cannot be evaluated, the reason.
    pub fn matches<'a>(
        &'a self,
        ty: &str,
        event: &Value,
    ) -> Vec<(&'a Entry, Result<String, String>)> {
        let val = baton_workflow::expr::to_val(event);
        let mut out = Vec::new();
        for entry in self.candidates(ty) {
            let trigger = entry.trigger();
            let at = || {
                format!(
                    "workflow {} version {} on[{}]",
                    entry.workflow.name, entry.version, entry.position
                )
            };
            match trigger.matches(event) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    out.push((entry, Err(format!("{}: filter failed: {e}", at()))));
                    continue;
                }
            }
            let key = match &trigger.key {
                None => Ok(String::new()),
                Some(expr) => expr
                    .eval(&val)
                    .map(|v| match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .map_err(|e| format!("{}: key failed: {e}", at())),
            };
            out.push((entry, key));
        }
        out
    }
}

pub struct Triggers {
    bus: Bus,
    registry: Registry,
    workflows: Workflows,
    windows: kv::Store,
    index: Index,
    loaded: Option<Instant>,
}

impl Triggers {
    pub async fn new(bus: Bus) -> Result<Triggers, Error> {
        let registry = Registry::open(&bus.js).await?;
        let windows = bus
            .js
            .get_key_value(streams::FLOW_BUCKET)
            .await
            .map_err(jserr)?;
        Ok(Triggers {
            bus,
            workflows: Workflows::new(registry.clone()),
            registry,
            windows,
            index: Index::default(),
            loaded: None,
        })
    }

    /// Rebuilds the index from the registry. A version the registry cannot serve right now keeps
    /// the workflow's last good version in the index (an error if there is none, so the event is
    /// retried); a version that is gone or does not compile is left out, with a warning.
    async fn reload(&mut self) -> Result<(), baton_core::Error> {
        let mut index = Index::default();
        let heads = self.registry.heads().await?;
        for head in heads.into_iter().filter(|h| h.enabled) {
            match self.workflows.get(&head.name, head.version).await {
                Ok(wf) => index.add(wf, head.version),
                Err(error) if error.is_transient() => {
                    let last: Vec<Entry> = self.index.entries_of(&head.name).cloned().collect();
                    if last.is_empty() {
                        return Err(error);
                    }
                    tracing::warn!(workflow = %head.name, version = head.version, %error, "cannot load the latest version; its last good version keeps serving");
                    for entry in last {
                        index
                            .by_type
                            .entry(entry.trigger().ty.clone())
                            .or_default()
                            .push(entry);
                    }
                }
                Err(error) => {
                    tracing::warn!(workflow = %head.name, version = head.version, %error, "workflow skipped by trigger matching");
                }
            }
        }
        self.index = index;
        self.loaded = Some(Instant::now());
        Ok(())
    }

    fn stale(&self, max_age: Duration) -> bool {
        self.loaded.is_none_or(|at| at.elapsed() >= max_age)
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let js = &self.bus.js;
        let Some(stream) = until_ok("get stream BATON_EVENTS", &shutdown, || {
            js.get_stream(streams::EVENTS)
        })
        .await
        else {
            return Ok(());
        };
        let config = consumer::pull::Config {
            durable_name: Some("triggers".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        };
        let Some(consumer) = until_ok("create the triggers consumer", &shutdown, || {
            stream.create_consumer(config.clone())
        })
        .await
        else {
            return Ok(());
        };
        let consumer: consumer::PullConsumer = consumer;
        let mut messages = consumer.messages().await.map_err(jserr)?;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => match next {
                    None => return Ok(()),
                    Some(Err(error)) => {
                        tracing::debug!(%error, "pull error; retrying");
                        continue;
                    }
                    Some(Ok(m)) => m,
                },
            };
            self.handle(message).await;
        }
    }

    async fn handle(&mut self, message: jetstream::Message) {
        let event = match binding::decode(message.headers.as_ref(), &message.payload) {
            Ok(e) => e,
            Err(e) => {
                dlq::reject(&self.bus.js, "ingress", &message, &e.to_string()).await;
                return;
            }
        };
        let miss = self.index.candidates(event.ty()).is_empty();
        let reload = self.stale(RELOAD_EVERY) || (miss && self.stale(RELOAD_ON_MISS));
        if reload && let Err(error) = self.reload().await {
            metrics::counter!(baton_core::metrics::TRANSIENT_FAILURES, "service" => "triggers")
                .increment(1);
            if miss || self.loaded.is_none() {
                // Whether a new workflow matches is unknown: the event comes back.
                tracing::warn!(%error, "cannot load workflows; the event will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
            // The index that served a moment ago keeps serving; the next reload is due later.
            tracing::warn!(%error, "cannot reload workflows; matching with the last good index");
            self.loaded = Some(Instant::now());
        }
        match self.start_runs(&message, &event).await {
            Ok(()) => {
                let _ = message.ack().await;
            }
            Err(error) if error.is_transient() => {
                metrics::counter!(baton_core::metrics::TRANSIENT_FAILURES, "service" => "triggers")
                    .increment(1);
                tracing::warn!(%error, event = event.id(), "cannot start the runs of an event; it will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            // No retry can help (a run request too large to store): kept with the reason, once.
            Err(error) => {
                let reason = format!("the event's runs cannot be started: {error}");
                dlq::reject(&self.bus.js, "triggers", &message, &reason).await;
            }
        }
    }

    /// Starts the runs `event` triggers; `Err` when something could not be stored (the event is
    /// then redelivered, and what was stored is not repeated).
    async fn start_runs(
        &self,
        message: &jetstream::Message,
        event: &Event,
    ) -> Result<(), baton_core::Error> {
        let json = EventJson::from_event(event);
        let event_value = serde_json::to_value(&json).expect("an event serializes as JSON");
        // The run continues the event's trace.
        let trace = event::trace(event).unwrap_or_default();
        let mut requests = Vec::new();
        for (entry, key) in self.index.matches(event.ty(), &event_value) {
            let name = &entry.workflow.name;
            let key = match key {
                Ok(key) => key,
                Err(reason) => {
                    self.dead_letter(message, name, &reason).await?;
                    continue;
                }
            };
            let request = RunEvent::Requested(RunRequested {
                run_id: event::triggered_run_id(name, &json.source, &json.id),
                workflow: WorkflowRef {
                    name: name.clone(),
                    version: entry.version,
                },
                input: Value::Null,
                trigger: Some(json.clone()),
                parent: None,
            });
            let run = request.run_id().to_owned();
            let key_id = flow::key_id(name, entry.position, &key);
            match entry.trigger().flow {
                None => {}
                Some(Flow::Debounce(quiet)) => {
                    flow::debounce(&self.bus, &key_id, &request, &trace, quiet).await?;
                    tracing::info!(workflow = %name, %run, event = event.id(), %key, "event debounced: the run starts when the key has been quiet for {quiet:?}");
                    continue;
                }
                Some(Flow::Window { limit, per }) => {
                    match flow::admit(&self.windows, &key_id, &run, limit, per).await? {
                        Decision::Open(_) | Decision::Again => {}
                        Decision::Full { start_ms, runs } => {
                            tracing::info!(workflow = %name, event = event.id(), %key, runs, window_start_ms = start_ms, "event starts no run: its key had {runs} run(s) in the window (limit {limit} per {per:?})");
                            continue;
                        }
                    }
                }
            }
            tracing::info!(workflow = %name, version = entry.version, %run, event = event.id(), "event starts a run");
            requests.push(request);
        }
        // Collected first: a lazy iterator held across the await would make the future not `Send`.
        let stored: Vec<_> = requests.iter().map(|r| (r, &trace)).collect();
        self.bus.store(SOURCE, stored).await?;
        for r in &requests {
            if let RunEvent::Requested(r) = r {
                metrics::counter!(baton_core::metrics::RUNS_TRIGGERED, "workflow" => r.workflow.name.clone())
                    .increment(1);
            }
        }
        Ok(())
    }

    /// A trigger that cannot be evaluated for this event: the event goes to the dead-letter stream
    /// for this workflow (the other workflows still get it).
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        workflow: &str,
        reason: &str,
    ) -> Result<(), baton_core::Error> {
        let id = match message.info() {
            Ok(info) => format!("{}.{}.{workflow}", info.stream, info.stream_sequence),
            Err(_) => event::new_run_id(),
        };
        let letter = dlq::DeadLetter::new(
            "triggers",
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
            &format!(
                "{reason}. Fix the workflow's trigger, then re-publish this dead letter with `baton deadletters republish`"
            ),
        );
        dlq::publish(&self.bus.js, &id, &letter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workflow(name: &str, on: &str) -> Arc<Workflow> {
        Arc::new(
            baton_workflow::compile(&format!(
                "name: {name}\non:\n{on}steps:\n  - id: a\n    uses: echo\n"
            ))
            .unwrap(),
        )
    }

    #[test]
    fn events_are_checked_only_against_triggers_of_their_type() {
        let mut index = Index::default();
        for i in 0..500 {
            index.add(workflow(&format!("w{i}"), &format!("  - type: t{i}\n")), 1);
        }
        index.add(
            workflow(
                "alerts",
                "  - type: t7\n    source: \"am*\"\n    filter: ${{ .data.severity == \"critical\" }}\n    key: ${{ .subject }}\n",
            ),
            3,
        );
        assert_eq!(index.candidates("t7").len(), 2);
        assert!(index.candidates("unknown").is_empty());
        let event = json!({"id": "1", "source": "am", "type": "t7", "subject": "fp1", "data": {"severity": "critical"}});
        let found: Vec<_> = index
            .matches("t7", &event)
            .into_iter()
            .map(|(e, key)| (e.workflow.name.clone(), key.unwrap()))
            .collect();
        assert_eq!(
            found,
            [
                ("w7".to_owned(), String::new()),
                ("alerts".into(), "fp1".into())
            ]
        );
        let warning =
            json!({"id": "1", "source": "am", "type": "t7", "data": {"severity": "warning"}});
        assert_eq!(index.matches("t7", &warning).len(), 1);
        let elsewhere =
            json!({"id": "1", "source": "x", "type": "t7", "data": {"severity": "critical"}});
        assert_eq!(index.matches("t7", &elsewhere).len(), 1);
    }

    #[test]
    fn a_failing_key_is_reported_with_its_workflow() {
        let mut index = Index::default();
        index.add(
            workflow(
                "k",
                "  - type: t\n    key: ${{ .data.x | error(\"no key\") }}\n",
            ),
            2,
        );
        let found = index.matches(
            "t",
            &json!({"id": "1", "source": "s", "type": "t", "data": {"x": 1}}),
        );
        let reason = found[0].1.clone().unwrap_err();
        assert!(
            reason.contains("workflow k version 2 on[0]: key failed"),
            "{reason}"
        );
    }
}
