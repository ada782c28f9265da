//! The `wait` step matcher: every coordinator instance runs one. They share the durable consumer
//! `waits` on `BATON_EVENTS`, so each external event is matched once. The waits themselves are in
//! the `baton-waits` KV bucket (put by the partition that requested the step), indexed here from a
//! watch. A matched wait's outcome goes to its run's journal with the deterministic outcome id, so
//! a redelivered event cannot settle an attempt twice; the event is acked only after the outcomes
//! are stored.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv};
use baton_core::event::{
    ApprovalDecided, RunEvent, StepCompleted, StepError, StepFailed, StepRequested, Trigger,
    WorkflowRef,
};
use baton_core::shutdown::CancellationToken;
use baton_core::trace::Trace;
use baton_core::{Bus, binding, streams};
use baton_workflow::expr::to_val;
use baton_workflow::{Action, Expect, Pattern, Wait};
use cloudevents::AttributesReader;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::service::Error;
use baton_core::workflows::Workflows;

const SOURCE: &str = "baton/coordinator";
const DURABLE: &str = "waits";

/// One waiting step, as stored in the bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitEntry {
    pub run_id: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    pub attempt: u32,
    /// `wait` or `approval`.
    #[serde(default = "wait_kind")]
    pub kind: String,
    pub workflow: WorkflowRef,
    /// The event type, so that other events never load the workflow.
    pub event: String,
    /// The value of the step's `key`, which the event's `event-key` must equal.
    pub key: Value,
    pub partition: u32,
    /// The run's trace context, which the outcome continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

fn wait_kind() -> String {
    "wait".into()
}

impl WaitEntry {
    pub fn new(r: &StepRequested, workflow: WorkflowRef, partitions: u32, trace: &Trace) -> Self {
        WaitEntry {
            run_id: r.run_id.clone(),
            step: r.step.clone(),
            item: r.item,
            attempt: r.attempt,
            kind: r.kind.clone(),
            workflow,
            event: r.input["event"].as_str().unwrap_or_default().to_owned(),
            key: r.input["key"].clone(),
            partition: baton_core::subjects::partition(&r.run_id, partitions),
            traceparent: Some(trace.traceparent()),
            tracestate: trace.state.clone(),
        }
    }

    pub fn kv_key(&self) -> String {
        key(&self.run_id, &self.step, self.item)
    }

    fn trace(&self) -> Trace {
        let state: Vec<&str> = self.tracestate.as_deref().into_iter().collect();
        self.traceparent
            .as_deref()
            .and_then(|p| Trace::parse(&[p], &state))
            .unwrap_or_default()
    }
}

/// The bucket key of a waiting step: `<run>.<step>` (`.<item>` for an item of a for-each step).
pub fn key(run_id: &str, step: &str, item: Option<u32>) -> String {
    match item {
        Some(n) => format!("{run_id}.{step}.{n}"),
        None => format!("{run_id}.{step}"),
    }
}

/// A wait in the index, with when it was stored: events stored before it do not match.
struct Waiting {
    entry: WaitEntry,
    since_ns: i128,
}

pub struct Matcher {
    bus: Bus,
    workflows: Workflows,
    waits: kv::Store,
    ack_wait: Duration,
    /// Bucket key -> wait.
    index: HashMap<String, Waiting>,
    /// The last bucket revision folded into `index`.
    revision: u64,
}

impl Matcher {
    pub fn new(bus: Bus, workflows: Workflows, waits: kv::Store, ack_wait: Duration) -> Matcher {
        Matcher {
            bus,
            workflows,
            waits,
            ack_wait,
            index: HashMap::new(),
            revision: 0,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let js = self.bus.js.clone();
        let jserr = |e: &dyn std::fmt::Display| Error::JetStream(e.to_string());
        let stream = js
            .get_stream(streams::EVENTS)
            .await
            .map_err(|e| jserr(&e))?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(DURABLE.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.ack_wait,
                // Events from before the first coordinator started cannot be awaited by anything.
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| jserr(&e))?;
        let mut bucket = js
            .get_stream(format!("KV_{}", streams::WAITS_BUCKET))
            .await
            .map_err(|e| jserr(&e))?;
        let mut watch = self.watch().await?;
        let mut messages = consumer.messages().await.map_err(|e| jserr(&e))?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => self.fold(entry),
                    Some(Err(error)) => tracing::debug!(%error, "waits watch error"),
                    None => watch = self.watch().await?,
                },
                next = messages.next() => match next {
                    None => return Ok(()),
                    Some(Err(error)) => tracing::debug!(%error, "pull error; retrying"),
                    Some(Ok(message)) => {
                        // The index must hold every wait stored before the event was.
                        if let Err(error) = self.catch_up(&mut bucket, &mut watch).await {
                            tracing::warn!(%error, "cannot read the waits; the event will be redelivered");
                            let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                            watch = self.watch().await?;
                            continue;
                        }
                        self.handle(message).await;
                    }
                },
            }
        }
    }

    /// A new watch of the whole bucket (its current values, then changes); `index` restarts.
    async fn watch(&mut self) -> Result<kv::Watch, Error> {
        self.index.clear();
        self.revision = 0;
        self.waits
            .watch_with_history(">")
            .await
            .map_err(|e| Error::JetStream(e.to_string()))
    }

    fn fold(&mut self, entry: kv::Entry) {
        self.revision = self.revision.max(entry.revision);
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<WaitEntry>(&entry.value) {
                Ok(wait) => {
                    let since_ns = entry.created.unix_timestamp_nanos();
                    self.index.insert(
                        entry.key,
                        Waiting {
                            entry: wait,
                            since_ns,
                        },
                    );
                }
                Err(error) => tracing::warn!(key = %entry.key, %error, "invalid wait entry"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.index.remove(&entry.key);
            }
        }
    }

    async fn catch_up(
        &mut self,
        bucket: &mut jetstream::stream::Stream,
        watch: &mut kv::Watch,
    ) -> Result<(), baton_core::Error> {
        use baton_core::Error as E;
        let last = bucket
            .info()
            .await
            .map_err(|e| E::request("cannot read the waits bucket", &e))?
            .state
            .last_sequence;
        while self.revision < last {
            match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
                Ok(Some(Ok(entry))) => self.fold(entry),
                Ok(Some(Err(e))) => return Err(E::request("the waits watch failed", &e)),
                Ok(None) => return Err(E::transient("the waits watch ended")),
                Err(_) => return Err(E::transient("the waits watch is behind")),
            }
        }
        Ok(())
    }

    async fn handle(&mut self, message: jetstream::Message) {
        // Invalid input was dead-lettered by whoever accepted it (the gateway's trigger consumer).
        let Ok(ce) = binding::decode(message.headers.as_ref(), &message.payload) else {
            let _ = message.ack().await;
            return;
        };
        let stored_ns = message
            .info()
            .map(|i| i.published.unix_timestamp_nanos())
            .unwrap_or(i128::MAX);
        let candidates: Vec<(String, WaitEntry)> = self
            .index
            .iter()
            .filter(|(_, w)| w.entry.event == ce.ty() && w.since_ns <= stored_ns)
            .map(|(k, w)| (k.clone(), w.entry.clone()))
            .collect();
        if candidates.is_empty() {
            let _ = message.ack().await;
            return;
        }
        let event_json = serde_json::to_value(Trigger::from_event(&ce)).unwrap_or_default();
        let mut outcomes = Vec::new();
        for (k, entry) in candidates {
            let wf = match self
                .workflows
                .get(&entry.workflow.name, entry.workflow.version)
                .await
            {
                Ok(wf) => wf,
                Err(error) if !error.is_transient() => {
                    tracing::warn!(run = %entry.run_id, %error, "the workflow of a wait is gone; the wait is not matched");
                    continue;
                }
                Err(error) => {
                    metrics::counter!(baton_core::metrics::TRANSIENT_FAILURES, "service" => "waits")
                        .increment(1);
                    tracing::warn!(run = %entry.run_id, %error, "cannot load the workflow of a wait; retrying");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return;
                }
            };
            let outcome = match wf
                .steps
                .iter()
                .find(|s| s.id == entry.step)
                .map(|s| &s.action)
            {
                Some(Action::Wait(wait)) if matches(wait, &entry.key, &event_json) => {
                    outcome(&entry, wait.expect, &event_json)
                }
                Some(Action::Approval(approval)) => {
                    match decision(&approval.approvers, &entry, &event_json) {
                        Ok(Some(o)) => o,
                        Ok(None) => continue,
                        Err(reason) => {
                            tracing::warn!(run = %entry.run_id, step = %entry.step, event = ce.id(), %reason, "approval decision ignored");
                            continue;
                        }
                    }
                }
                _ => continue,
            };
            tracing::info!(run = %entry.run_id, step = %entry.step, event = ce.id(), "event matches a wait");
            outcomes.push((k, outcome, entry));
        }
        let traces: Vec<_> = outcomes.iter().map(|(_, _, entry)| entry.trace()).collect();
        let events: Vec<_> = outcomes
            .iter()
            .zip(&traces)
            .map(|((_, o, _), t)| (o, t))
            .collect();
        match self.bus.store(SOURCE, events).await {
            Ok(()) => {}
            Err(error) if error.is_transient() => {
                metrics::counter!(baton_core::metrics::TRANSIENT_FAILURES, "service" => "waits")
                    .increment(1);
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
            // An outcome that can never be stored (say, an event too large to become a step's
            // output): kept with the reason instead of retried forever.
            Err(error) => {
                let reason = format!(
                    "the outcomes of the waits this event matches cannot be stored: {error}"
                );
                baton_core::dlq::reject(&self.bus.js, "waits", &message, &reason).await;
                return;
            }
        }
        for (k, _, _) in outcomes {
            // Best effort: a leftover entry only costs a duplicate outcome, which the journal drops.
            if let Err(error) = self.waits.delete(&k).await {
                tracing::debug!(key = %k, %error, "cannot delete a matched wait");
            }
            self.index.remove(&k);
        }
        let _ = message.ack().await;
    }
}

/// Whether `event` (a CloudEvent as JSON) is what `wait` waits for, with its `key` evaluated to
/// `key`. An `event-key` that cannot be evaluated over the event does not match.
pub fn matches(wait: &Wait, key: &Value, event: &Value) -> bool {
    let attr = |name: &str| event.get(name).and_then(Value::as_str);
    let fits = |pattern: &Option<Pattern>, name: &str| match pattern {
        None => true,
        Some(p) => attr(name).is_some_and(|v| p.matches(v)),
    };
    attr("type") == Some(wait.event.as_str())
        && fits(&wait.source, "source")
        && fits(&wait.subject, "subject")
        && wait.event_key.eval(&to_val(event)).is_ok_and(|v| &v == key)
}

/// What a `dev.baton.approval.decided` event does to a waiting approval: `Ok(None)` when it is about
/// another step, `Err` when it comes from someone who may not decide.
fn decision(
    approvers: &[String],
    entry: &WaitEntry,
    event: &Value,
) -> Result<Option<RunEvent>, baton_core::Error> {
    if event.get("subject") != Some(&entry.key) {
        return Ok(None);
    }
    let decided: ApprovalDecided = serde_json::from_value(event["data"].clone())
        .map_err(|e| baton_core::Error::invalid(format!("not a valid decision: {e}")))?;
    if !approvers.is_empty() && !approvers.contains(&decided.by) {
        return Err(baton_core::Error::invalid(format!(
            "{} may not decide this step; its approvers are {}",
            decided.by,
            approvers.join(", ")
        )));
    }
    let comment = if decided.comment.is_empty() {
        String::new()
    } else {
        format!(": {}", decided.comment)
    };
    Ok(Some(if decided.approved {
        RunEvent::StepCompleted(StepCompleted {
            run_id: entry.run_id.clone(),
            step: entry.step.clone(),
            item: entry.item,
            kind: entry.kind.clone(),
            attempt: entry.attempt,
            output: json!({ "approved": true, "by": decided.by, "comment": decided.comment }),
            runner: "coordinator".into(),
            duration_ms: 0,
        })
    } else {
        RunEvent::StepFailed(StepFailed {
            run_id: entry.run_id.clone(),
            step: entry.step.clone(),
            item: entry.item,
            kind: entry.kind.clone(),
            attempt: entry.attempt,
            error: StepError {
                message: format!("rejected by {}{comment}", decided.by),
                retryable: false,
                code: Some("rejected".into()),
            },
            runner: "coordinator".into(),
        })
    }))
}

/// What a matching event does to the waiting attempt.
fn outcome(entry: &WaitEntry, expect: Expect, event: &Value) -> RunEvent {
    match expect {
        Expect::Event => RunEvent::StepCompleted(StepCompleted {
            run_id: entry.run_id.clone(),
            step: entry.step.clone(),
            item: entry.item,
            kind: entry.kind.clone(),
            attempt: entry.attempt,
            output: json!({ "event": event }),
            runner: "coordinator".into(),
            duration_ms: 0,
        }),
        Expect::Timeout => RunEvent::StepFailed(StepFailed {
            run_id: entry.run_id.clone(),
            step: entry.step.clone(),
            item: entry.item,
            kind: entry.kind.clone(),
            attempt: entry.attempt,
            error: StepError {
                message: format!(
                    "event {} ({}) arrived before the timeout",
                    event["id"].as_str().unwrap_or_default(),
                    entry.event
                ),
                retryable: false,
                code: Some("event-received".into()),
            },
            runner: "coordinator".into(),
        }),
    }
}
