//! The coordinator's I/O: one task per journal partition.
//!
//! Each partition has a durable consumer with the `pinned_client` priority policy, so exactly one
//! coordinator instance receives a partition's events at a time. When a message arrives with a pin
//! id the task has not seen, the task has just become the owner: it rebuilds every live run of the
//! partition from the journal before it handles the message. Every input event is acked only after
//! all the commands it caused are stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv};
use baton_core::dlq::DeadLetter;
use baton_core::event::{
    self, Ending, Parent, RunEvent, RunRequested, StepError, StepFailed, WorkflowRef,
};
use baton_core::runs::{self, Claim};
use baton_core::shutdown::{CancellationToken, until_ok};
use baton_core::trace::Trace;
use baton_core::{Bus, binding, dlq, spans, subjects, telemetry};
use baton_workflow::Workflow;
use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::concurrency::{Admission, Slots};
use crate::saga::{Clock, Run, Status, StepStatus};
use baton_core::workflows::Workflows;
use baton_workflow::OnConflict;
use baton_workflow::expr::to_val;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name of this instance, in logs and event sources.
    pub instance: String,
    /// How long a dead instance keeps its partitions before another takes them over.
    pub takeover_after: Duration,
    /// How long JetStream waits for an ack before redelivering an event.
    pub ack_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            instance: format!("coordinator-{}", std::process::id()),
            takeover_after: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
        }
    }
}

const GROUP: &str = "coordinators";
const SOURCE: &str = "baton/coordinator";

pub struct Coordinator {
    bus: Bus,
    options: Options,
    workflows: Workflows,
    slots: Slots,
    waits: kv::Store,
    index: runs::Index,
}

impl Coordinator {
    pub async fn new(bus: Bus, options: Options) -> Result<Coordinator, Error> {
        let registry = baton_core::registry::Registry::open(&bus.js).await?;
        let slots = Slots::open(&bus.js, bus.partitions).await?;
        let waits = bus
            .js
            .get_key_value(baton_core::streams::WAITS_BUCKET)
            .await
            .map_err(jserr)?;
        let index = runs::Index::open(&bus.js).await?;
        Ok(Coordinator {
            bus,
            options,
            workflows: Workflows::new(registry),
            slots,
            waits,
            index,
        })
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let js = &self.bus.js;
        let Some(stream) = until_ok("get stream BATON_RUNS", &shutdown, || {
            js.get_stream(baton_core::streams::RUNS)
        })
        .await
        else {
            return Ok(());
        };
        let mut tasks = Vec::new();
        for p in 0..self.bus.partitions {
            let config = consumer::pull::Config {
                durable_name: Some(format!("coordinator-{p}")),
                filter_subjects: subjects::coordinator_filters(p),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.options.ack_wait,
                max_ack_pending: 10_000,
                priority_policy: consumer::PriorityPolicy::PinnedClient,
                priority_groups: vec![GROUP.to_owned()],
                priority_timeout: self.options.takeover_after,
                ..Default::default()
            };
            let Some(consumer) = until_ok("create the coordinator's consumers", &shutdown, || {
                stream.create_consumer(config.clone())
            })
            .await
            else {
                return Ok(());
            };
            let consumer: consumer::PullConsumer = consumer;
            let partition = Partition {
                p,
                bus: self.bus.clone(),
                workflows: self.workflows.clone(),
                runs: HashMap::new(),
                slots: self.slots.clone(),
                pin: None,
                instance: self.options.instance.clone(),
                waits: self.waits.clone(),
                index: self.index.clone(),
                requests: HashMap::new(),
            };
            tasks.push(tokio::spawn(partition.run(
                consumer,
                self.options.takeover_after,
                shutdown.clone(),
            )));
        }
        let (bus, workflows, waits) =
            (self.bus.clone(), self.workflows.clone(), self.waits.clone());
        let (ack_wait, stop) = (self.options.ack_wait, shutdown.clone());
        tasks.push(tokio::spawn(async move {
            // A matcher that fails (say, while a cluster elects a leader) starts again: waits are
            // not worth stopping the coordinator for.
            while !stop.is_cancelled() {
                let matcher = crate::waits::Matcher::new(
                    bus.clone(),
                    workflows.clone(),
                    waits.clone(),
                    ack_wait,
                );
                match matcher.run(stop.clone()).await {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::warn!(%error, "the wait matcher stopped; starting it again");
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
            Ok(())
        }));
        tracing::info!(instance = %self.options.instance, partitions = self.bus.partitions, "coordinator started");
        for result in join_all(tasks).await {
            result.map_err(|e| Error::Task(e.to_string()))??;
        }
        Ok(())
    }
}

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    #[error(transparent)]
    Registry(#[from] baton_core::registry::Error),
    #[error(transparent)]
    Core(#[from] baton_core::Error),
    #[error("a partition task panicked: {0}")]
    Task(String),
}

fn jserr<E: std::fmt::Display>(e: E) -> Error {
    Error::JetStream(e.to_string())
}

struct Partition {
    p: u32,
    bus: Bus,
    workflows: Workflows,
    runs: HashMap<String, (Run, Arc<Workflow>)>,
    slots: Slots,
    /// The pin under which `runs` was rebuilt; `None` until this task owns the partition.
    pin: Option<String>,
    instance: String,
    /// The `baton-waits` bucket: where `wait` steps wait for their event.
    waits: kv::Store,
    /// The run index: a run id is claimed once, so a late duplicate request starts nothing.
    index: runs::Index,
    /// While folding: the stream sequence of each run's first request.
    requests: HashMap<String, u64>,
}

/// A run whose commands could not be stored: forget it, so it is rebuilt from the journal.
type Evict = String;

impl Partition {
    async fn run(
        mut self,
        consumer: consumer::PullConsumer,
        takeover_after: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let (evict_tx, mut evict_rx) = mpsc::unbounded_channel::<Evict>();
        let mut messages = consumer
            .stream()
            .group(GROUP)
            // Well below the pin timeout, or the pin is lost between pulls.
            .expires(takeover_after / 3)
            .heartbeat(takeover_after / 6)
            .max_messages_per_batch(256)
            .messages()
            .await
            .map_err(jserr)?;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(run_id) = evict_rx.recv() => { self.runs.remove(&run_id); continue }
                next = messages.next() => match next {
                    None => break,
                    Some(Err(error)) => {
                        tracing::debug!(partition = self.p, %error, "pull error; retrying");
                        continue;
                    }
                    Some(Ok(message)) => message,
                },
            };
            let pin = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_PIN_ID))
                .map(|v| v.as_str().to_owned());
            if pin.is_some() && pin != self.pin {
                tracing::info!(partition = self.p, instance = %self.instance, "took ownership; rebuilding from the journal");
                if let Err(error) = self.rebuild().await {
                    // For example while a cluster elects a new stream leader: try again shortly.
                    tracing::warn!(partition = self.p, %error, "cannot rebuild the partition; retrying");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    continue;
                }
                self.pin = pin;
                // Issue whatever every live run still needs (commands lost in a crash).
                let ids: Vec<String> = self.runs.keys().cloned().collect();
                for id in ids {
                    if !self.admitted(&id).await {
                        // Queued behind a concurrency key: its request comes back.
                        self.runs.remove(&id);
                        continue;
                    }
                    let (commands, counts) = {
                        let (run, wf) = self.runs.get_mut(&id).expect("present");
                        let unstarted = run.steps.iter().all(|s| s.exec.attempt == 0);
                        let commands = run.decide(wf, clock());
                        let counts = Counts::of(run, unstarted, &commands);
                        (commands, counts)
                    };
                    match self.publish_all(&id, &commands).await {
                        Ok(()) => counts.record(),
                        Err(error) => {
                            tracing::warn!(run = %id, %error, "cannot issue commands after rebuild; will retry on the next event");
                            self.runs.remove(&id);
                        }
                    }
                }
            }
            // Log lines about the event carry its run's trace and span ids.
            let span = tracing::error_span!(
                "run",
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty
            );
            self.handle(message, &evict_tx).instrument(span).await;
        }
        Ok(())
    }

    /// Replays the partition's journal into `runs`, keeping only runs that have not ended.
    async fn rebuild(&mut self) -> Result<(), Error> {
        self.runs.clear();
        self.requests.clear();
        let events = read_journal(&self.bus.js, subjects::partition_all(self.p)).await?;
        let count = events.len();
        for e in events {
            self.fold(e).await?;
        }
        self.runs.retain(|_, (run, _)| !run.status.is_terminal());
        // A run that has not started yet is started by this owner: it claims its id first, like a
        // request handled live, so that a later re-send of the request starts nothing.
        let unstarted: Vec<(String, runs::Entry)> = self
            .runs
            .iter()
            .filter(|(_, (run, _))| run.steps.iter().all(|s| s.exec.attempt == 0))
            .filter_map(|(id, (run, _))| {
                let seq = *self.requests.get(id)?;
                Some((
                    id.clone(),
                    index_entry(&run.workflow, run.parent.as_ref(), seq),
                ))
            })
            .collect();
        for (id, entry) in unstarted {
            if let Claim::Taken(first) = self.index.claim(&id, &entry).await? {
                tracing::info!(run = %id, first_request = first.request, "the run was started by another request; this one starts nothing");
                self.runs.remove(&id);
            }
        }
        self.requests.clear();
        tracing::info!(
            partition = self.p,
            events = count,
            live_runs = self.runs.len(),
            "rebuilt partition"
        );
        Ok(())
    }

    /// Folds a journal event into `runs` without deciding anything. A workflow the registry cannot
    /// serve right now fails the fold (it is retried); one that is gone for good leaves its run
    /// out, with a warning.
    async fn fold(
        &mut self,
        Journaled {
            event, trace, seq, ..
        }: Journaled,
    ) -> Result<(), Error> {
        if let RunEvent::Requested(r) = &event {
            if self.runs.contains_key(&r.run_id) {
                return Ok(());
            }
            match self
                .workflows
                .get(&r.workflow.name, r.workflow.version)
                .await
            {
                Ok(wf) => {
                    let trace = trace.unwrap_or_else(|| spans::fallback_trace(&r.run_id));
                    let run = Run::new(r, &wf, trace);
                    self.runs.insert(r.run_id.clone(), (run, wf));
                    self.requests.insert(r.run_id.clone(), seq);
                }
                Err(error) if error.is_transient() => return Err(error.into()),
                Err(error) => {
                    tracing::warn!(run = %r.run_id, %error, "cannot load the run's workflow")
                }
            }
        } else if let Some((run, _)) = self.runs.get_mut(event.run_id()) {
            run.apply(&event);
        }
        Ok(())
    }

    async fn handle(&mut self, message: jetstream::Message, evict: &mpsc::UnboundedSender<Evict>) {
        // A queued run's request comes back by design; any other redelivery means a lost ack.
        if message.info().is_ok_and(|i| i.delivered > 1)
            && !message.subject.ends_with(".run.requested")
        {
            metrics::counter!(baton_core::metrics::REDELIVERIES, "consumer" => format!("coordinator-{}", self.p)).increment(1);
        }
        let decoded = binding::decode(message.headers.as_ref(), &message.payload)
            .map_err(|e| e.to_string())
            .and_then(|ce| {
                let trace = event::trace(&ce);
                RunEvent::from_message(&message.subject, &ce)
                    .map(|e| (e, trace))
                    .map_err(|e| e.to_string())
            });
        let (event, trace) = match decoded {
            Ok(d) => d,
            Err(reason) => return self.reject(message, &reason).await,
        };
        let run_id = event.run_id().to_owned();
        if let Some(trace) = &trace {
            let current = tracing::Span::current();
            current.record("trace_id", trace.trace_id.as_str());
            current.record("span_id", spans::run_span_id(&run_id).as_str());
        }
        // A request for a run this owner holds: its own request delivered again, or a duplicate.
        if let RunEvent::Requested(r) = &event
            && self.runs.contains_key(&run_id)
            && self.claim(&message, r).await.is_none()
        {
            return;
        }
        // Cancels caused by a concurrency key, stored before the run's own commands.
        let mut before = Vec::new();
        if !self.runs.contains_key(&run_id) {
            match &event {
                RunEvent::Requested(r) => match self
                    .workflows
                    .get(&r.workflow.name, r.workflow.version)
                    .await
                {
                    Ok(wf) => {
                        let Some(claim) = self.claim(&message, r).await else {
                            return;
                        };
                        // This request claimed the run before (its ack was lost, or a crash came
                        // between): what the run did since is in the journal, however long ago.
                        let started = match claim {
                            Claim::Again => match self.load_started(&run_id).await {
                                Ok(started) => started,
                                Err(error) => {
                                    let error = baton_core::Error::transient(error.to_string());
                                    return retry_later(message, &run_id, &error).await;
                                }
                            },
                            _ => false,
                        };
                        if !started {
                            // The run continues the trace of its request; an invalid one starts a new trace.
                            let trace = trace.unwrap_or_else(|| spans::fallback_trace(&run_id));
                            let mut run = Run::new(r, &wf, trace);
                            match self.admit(&run, &wf).await {
                                Ok(Admit::Go) => {}
                                Ok(Admit::Later) => {
                                    // Queued: the request comes back until a slot is free.
                                    let _ = message.ack_with(AckKind::Nak(Some(QUEUE_POLL))).await;
                                    return;
                                }
                                Ok(Admit::Skip(cancel)) => {
                                    run.apply(&cancel);
                                    before.push(*cancel);
                                }
                                Ok(Admit::Preempt(cancels)) => before.extend(cancels),
                                Err(error) => {
                                    tracing::warn!(run = %run_id, %error, "cannot check the concurrency key; retrying");
                                    let _ = message
                                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                                        .await;
                                    return;
                                }
                            }
                            self.runs.insert(run_id.clone(), (run, wf));
                        }
                    }
                    Err(error) if error.is_transient() => {
                        return retry_later(message, &run_id, &error).await;
                    }
                    Err(error) => return self.reject(message, error.message()).await,
                },
                // Not in memory: ended (and forgotten) or evicted after a failed publish.
                _ => {
                    if let Err(error) = self.load_run(&run_id).await {
                        tracing::warn!(run = %run_id, %error, "cannot load run from the journal; retrying later");
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        return;
                    }
                }
            }
        }
        let Some((run, wf)) = self.runs.get_mut(&run_id) else {
            tracing::debug!(run = %run_id, "event for an unknown or ended run; ignoring");
            let _ = message.ack().await;
            return;
        };
        let mut commands = before;
        let unstarted = run.steps.iter().all(|s| s.exec.attempt == 0);
        commands.extend(run.handle(&event, wf, clock()));
        let counts = Counts::of(run, unstarted, &commands);
        let ended = run.status.is_terminal();
        let release = if ended {
            slot_of(run, wf).and_then(Result::ok)
        } else {
            None
        };
        // The run's first end exports its span (later ends of a reopened run would repeat it).
        let export = (telemetry::enabled()
            && commands
                .iter()
                .any(|c| matches!(c, RunEvent::Ended(_, e) if e.round == 1)))
        .then(|| (subjects::run_all(self.p, &run_id), Arc::clone(wf)));
        let context = spans::run_context(&run.trace, &run.id);
        let publishes = self.start_publishes(&commands, &context).await;
        let js = self.bus.js.clone();
        let slots = self.slots.clone();
        if ended {
            self.runs.remove(&run_id);
        }
        // Ack after every command is stored; meanwhile go on with the next event.
        let evict = evict.clone();
        tokio::spawn(async move {
            match await_all(publishes).await {
                Ok(()) => {
                    counts.record();
                    if let Some(slot) = release
                        && let Err(error) = slots.release(&slot, &run_id).await
                    {
                        // The next run that finds the key full drops ended runs from it.
                        tracing::warn!(run = %run_id, %error, "cannot release the concurrency slot");
                    }
                    if let Err(error) = message.ack().await {
                        tracing::debug!(%error, "ack failed; the event will be redelivered and is idempotent");
                    }
                    if let Some((filter, wf)) = export {
                        export_spans(&js, filter, &wf).await;
                    }
                }
                Err(error) if error.is_transient() => {
                    tracing::warn!(run = %run_id, %error, "cannot store commands; rebuilding the run");
                    metrics::counter!(baton_core::metrics::TRANSIENT_FAILURES, "service" => "coordinator")
                        .increment(1);
                    let _ = evict.send(run_id);
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                }
                // No retry can store them (say, a message over max_payload): the event that
                // caused them goes to the dead-letter stream once, with the reason, instead of
                // looping. The run is rebuilt from the journal for its next event.
                Err(error) => {
                    let _ = evict.send(run_id.clone());
                    let reason = format!("the commands of run {run_id} cannot be stored: {error}");
                    dlq::reject(&js, "coordinator", &message, &reason).await;
                }
            }
        });
    }

    /// Claims the run id of a new run's request in the run index. False when the message has been
    /// answered: a duplicate of a request that already started the run (acked, changing nothing),
    /// or an index that cannot be written now (retried later).
    async fn claim(&self, message: &jetstream::Message, r: &RunRequested) -> Option<Claim> {
        let Ok(info) = message.info() else {
            return Some(Claim::New);
        };
        let claim = self
            .index
            .claim(
                &r.run_id,
                &index_entry(&r.workflow, r.parent.as_ref(), info.stream_sequence),
            )
            .await;
        match claim {
            Ok(Claim::Taken(first)) => {
                tracing::info!(
                    run = %r.run_id,
                    request = info.stream_sequence,
                    first_request = first.request,
                    "the run already exists; a duplicate request starts nothing"
                );
                metrics::counter!(baton_core::metrics::DUPLICATE_REQUESTS).increment(1);
                let _ = message.ack().await;
                None
            }
            Ok(claim) => Some(claim),
            Err(error) => {
                retry_later(message.clone(), &r.run_id, &error).await;
                None
            }
        }
    }

    /// Loads a run from the journal and says whether it has started (or ended). One that has not
    /// (queued behind its concurrency key, or its owner died before its first command) is left
    /// out, to be admitted as new.
    async fn load_started(&mut self, run_id: &str) -> Result<bool, Error> {
        self.load_run(run_id).await?;
        let started = self.runs.get(run_id).is_some_and(|(run, _)| {
            run.status != Status::Running
                || run.steps.iter().any(|s| s.status != StepStatus::Pending)
        });
        if !started {
            self.runs.remove(run_id);
        }
        Ok(started)
    }

    /// Whether a run may go on after a rebuild: it has no concurrency key, has started, or holds its
    /// slot.
    async fn admitted(&self, run_id: &str) -> bool {
        let Some((run, wf)) = self.runs.get(run_id) else {
            return false;
        };
        let started = run.steps.iter().any(|s| s.status != StepStatus::Pending)
            || run.status != Status::Running;
        match slot_of(run, wf) {
            Some(Ok(slot)) if !started => self.slots.holds(&slot, run_id).await.unwrap_or(false),
            _ => true,
        }
    }

    /// Applies the workflow's concurrency key to a new run.
    async fn admit(&self, run: &Run, wf: &Workflow) -> Result<Admit, baton_core::Error> {
        let (Some(c), Some(slot)) = (&wf.concurrency, slot_of(run, wf)) else {
            return Ok(Admit::Go);
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(e) => {
                return Ok(Admit::Skip(Box::new(cancel(
                    &run.id,
                    format!("its concurrency key cannot be evaluated: {e}"),
                ))));
            }
        };
        let force = c.on_conflict == OnConflict::CancelPrevious;
        Ok(
            match self.slots.acquire(&slot, &run.id, c.limit, force).await? {
                Admission::Admitted => Admit::Go,
                Admission::Full(active) => match c.on_conflict {
                    OnConflict::Queue => Admit::Later,
                    OnConflict::Skip => Admit::Skip(Box::new(cancel(
                        &run.id,
                        format!(
                            "skipped: {} run(s) with the same concurrency key are active ({})",
                            active.len(),
                            active.join(", ")
                        ),
                    ))),
                    OnConflict::CancelPrevious => {
                        let oldest = active.len() + 1 - c.limit as usize;
                        Admit::Preempt(
                            active[..oldest.min(active.len())]
                                .iter()
                                .map(|id| {
                                    cancel(
                                        id,
                                        format!(
                                            "cancelled by run {} with the same concurrency key",
                                            run.id
                                        ),
                                    )
                                })
                                .collect(),
                        )
                    }
                },
            },
        )
    }

    /// Loads one run from the journal into `runs`, if it exists and has not ended.
    async fn load_run(&mut self, run_id: &str) -> Result<(), Error> {
        let events = read_journal(&self.bus.js, subjects::run_all(self.p, run_id)).await?;
        for e in events {
            self.fold(e).await?;
        }
        self.requests.clear();
        // An ended run stays loaded for this event (a compensation retry reopens it); `handle`
        // forgets it again once the event is handled.
        Ok(())
    }

    /// Publishes commands without waiting for their acks (the caller awaits them), with `trace` (the
    /// run's trace, its run span as parent). Timers go out as JetStream message schedules; a
    /// `workflow` step also starts its sub-run (a child of the step's span); a compensation that
    /// failed for good is also recorded as a dead letter.
    async fn start_publishes(&self, commands: &[RunEvent], trace: &Trace) -> Vec<PublishResult> {
        let mut acks = Vec::with_capacity(commands.len() + 1);
        for command in commands {
            acks.push(self.publish(command, trace).await);
            if let RunEvent::Ended(..) = command {
                self.forget_waits(command.run_id());
            }
            match command {
                RunEvent::StepRequested(r) if r.kind == "workflow" => {
                    match self.start_sub_run(r).await {
                        Ok(extra) => {
                            let context = spans::attempt_context(trace, r, false);
                            acks.push(self.publish(&extra, &context).await);
                        }
                        // The registry cannot say which version to run now: the event comes back.
                        Err(error) => acks.push(Err(error)),
                    }
                }
                RunEvent::StepRequested(r) if r.kind == "wait" || r.kind == "approval" => {
                    acks.push(Ok(Pending::Future(self.put_wait(r, trace))));
                }
                RunEvent::Ended(Ending::CompensationFailed, ended) => {
                    let letter = DeadLetter {
                        reason: ended.error.clone().unwrap_or_default(),
                        origin: "coordinator".into(),
                        subject: command.subject(self.bus.partitions),
                        headers: Default::default(),
                        payload_base64: base64_json(ended),
                    };
                    let id = format!("{}.round-{}", command.id(), ended.round);
                    let js = self.bus.js.clone();
                    acks.push(Ok(Pending::Future(Box::pin(async move {
                        dlq::publish(&js, &id, &letter).await
                    }))));
                }
                _ => {}
            }
        }
        acks
    }

    async fn publish(&self, command: &RunEvent, trace: &Trace) -> PublishResult {
        let mut ce = command.to_cloudevent(SOURCE, trace);
        if let RunEvent::StepRequested(r) = command {
            let links = self.links(r);
            if !links.is_empty() {
                ce.set_extension(spans::LINKS_EXTENSION, links.join(","));
            }
        }
        let (mut headers, body) = binding::encode(&ce);
        let subject = command.subject(self.bus.partitions);
        if let RunEvent::TimerScheduled(timer) = command {
            // nats-server holds the message and writes it to `.fired` at `due`.
            let fired = RunEvent::TimerFired(timer.clone()).subject(self.bus.partitions);
            headers.insert(
                "Nats-Schedule",
                format!(
                    "@at {}",
                    timer
                        .due
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                )
                .as_str(),
            );
            headers.insert("Nats-Schedule-Target", fired.as_str());
        }
        self.bus
            .js
            .publish_with_headers(subject, headers, body)
            .await
            .map(Pending::Ack)
            .map_err(|e| baton_core::Error::publish(&e))
    }

    /// The spans of the attempts a step depended on (the last attempt of each of its `needs`), for
    /// the span of its attempt to link to.
    fn links(&self, r: &baton_core::event::StepRequested) -> Vec<String> {
        let Some((run, wf)) = self.runs.get(&r.run_id) else {
            return Vec::new();
        };
        spans::needs_links(&r.run_id, wf, &r.step, |need| {
            let Some(s) = run.steps.iter().find(|s| s.id == need) else {
                return Vec::new();
            };
            match s.item_count {
                Some(_) => s
                    .items
                    .iter()
                    .enumerate()
                    .map(|(k, e)| (Some(k as u32), e.attempt))
                    .collect(),
                None => vec![(None, s.exec.attempt)],
            }
        })
    }

    /// Stores a `wait` step's entry, for the matcher.
    fn put_wait(
        &self,
        r: &baton_core::event::StepRequested,
        trace: &Trace,
    ) -> futures::future::BoxFuture<'static, Result<(), baton_core::Error>> {
        let workflow = match self.runs.get(&r.run_id) {
            Some((run, _)) => run.workflow.clone(),
            None => {
                return Box::pin(async {
                    Err(baton_core::Error::transient("the run is not loaded"))
                });
            }
        };
        let entry = crate::waits::WaitEntry::new(r, workflow, self.bus.partitions, trace);
        let waits = self.waits.clone();
        Box::pin(async move {
            let value = serde_json::to_vec(&entry).expect("a wait entry serializes");
            waits
                .put(entry.kv_key(), value.into())
                .await
                .map(|_| ())
                .map_err(|e| baton_core::Error::request("cannot store the wait entry", &e))
        })
    }

    /// Deletes the wait entries of an ended run. Best effort: a leftover entry only lets the
    /// matcher publish an outcome that the ended run ignores.
    fn forget_waits(&self, run_id: &str) {
        let Some((run, wf)) = self.runs.get(run_id) else {
            return;
        };
        let mut keys = Vec::new();
        for (spec, state) in wf.steps.iter().zip(&run.steps) {
            if !matches!(
                spec.action,
                baton_workflow::Action::Wait(_) | baton_workflow::Action::Approval(_)
            ) || state.status == StepStatus::Pending
            {
                continue;
            }
            match state.item_count {
                Some(n) => {
                    keys.extend((0..n as u32).map(|i| crate::waits::key(run_id, &spec.id, Some(i))))
                }
                None => keys.push(crate::waits::key(run_id, &spec.id, None)),
            }
        }
        let waits = self.waits.clone();
        tokio::spawn(async move {
            for k in keys {
                // Deleting writes a marker: only for entries that are there.
                if let Ok(Some(_)) = waits.get(&k).await {
                    let _ = waits.delete(&k).await;
                }
            }
        });
    }

    /// The `run.requested` of a `workflow` step's sub-run, or the step's failure when the workflow
    /// to call is not in the registry; an error when the registry cannot be read now.
    async fn start_sub_run(
        &self,
        step: &baton_core::event::StepRequested,
    ) -> Result<RunEvent, baton_core::Error> {
        let name = step.input["workflow"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let version = match step.input["version"].as_u64() {
            Some(v) => Ok(v),
            None => self.workflows.head_version(&name).await,
        };
        Ok(match version {
            Err(error) if error.is_transient() => return Err(error),
            Ok(version) => RunEvent::Requested(RunRequested {
                run_id: event::child_run_id(&step.run_id, &step.step, step.attempt),
                workflow: WorkflowRef { name, version },
                input: step.input["inputs"].clone(),
                trigger: None,
                parent: Some(Parent {
                    run_id: step.run_id.clone(),
                    step: step.step.clone(),
                    attempt: step.attempt,
                }),
            }),
            Err(reason) => RunEvent::StepFailed(StepFailed {
                run_id: step.run_id.clone(),
                step: step.step.clone(),
                item: None,
                kind: step.kind.clone(),
                attempt: step.attempt,
                error: StepError {
                    message: reason.to_string(),
                    retryable: false,
                    code: Some("workflow-not-found".into()),
                },
                runner: "coordinator".into(),
            }),
        })
    }

    async fn publish_all(
        &self,
        run_id: &str,
        commands: &[RunEvent],
    ) -> Result<(), baton_core::Error> {
        let context = match self.runs.get(run_id) {
            Some((r, _)) => spans::run_context(&r.trace, run_id),
            None => spans::run_context(&spans::fallback_trace(run_id), run_id),
        };
        await_all(self.start_publishes(commands, &context).await).await
    }

    async fn reject(&self, message: jetstream::Message, reason: &str) {
        dlq::reject(&self.bus.js, "coordinator", &message, reason).await;
    }
}

/// What a run's new commands count for in the metrics, recorded once they are stored.
struct Counts {
    workflow: String,
    /// Its first step is requested now.
    started: bool,
    /// It ends now (for the first time).
    ended: Option<Ending>,
}

impl Counts {
    fn of(run: &Run, unstarted: bool, commands: &[RunEvent]) -> Counts {
        Counts {
            workflow: run.workflow.name.clone(),
            started: unstarted
                && commands
                    .iter()
                    .any(|c| matches!(c, RunEvent::StepRequested(_))),
            ended: commands.iter().find_map(|c| match c {
                RunEvent::Ended(ending, e) if e.round == 1 => Some(*ending),
                _ => None,
            }),
        }
    }

    fn record(self) {
        use baton_core::metrics::{RUNS_ENDED, RUNS_STARTED};
        if self.started {
            metrics::counter!(RUNS_STARTED, "workflow" => self.workflow.clone()).increment(1);
        }
        if let Some(ending) = self.ended {
            let outcome = crate::saga::Status::Ended(ending).as_str();
            metrics::counter!(RUNS_ENDED, "workflow" => self.workflow, "outcome" => outcome)
                .increment(1);
        }
    }
}

/// What a concurrency key says about a new run.
enum Admit {
    Go,
    /// Queued: try again later.
    Later,
    /// The run ends at once, cancelled with this event.
    Skip(Box<RunEvent>),
    /// The run starts, and these older runs are cancelled.
    Preempt(Vec<RunEvent>),
}

/// What the run index records about the run that request `request` (a stream sequence) starts.
fn index_entry(workflow: &WorkflowRef, parent: Option<&Parent>, request: u64) -> runs::Entry {
    runs::Entry {
        workflow: workflow.name.clone(),
        version: workflow.version,
        request,
        parent: parent.map(|p| p.run_id.clone()),
    }
}

/// A transient failure: the event comes back after a pause, counted and logged, never dead-lettered.
async fn retry_later(message: jetstream::Message, run_id: &str, error: &baton_core::Error) {
    tracing::warn!(run = %run_id, %error, "transient failure; the event will be redelivered");
    metrics::counter!(baton_core::metrics::TRANSIENT_FAILURES, "service" => "coordinator")
        .increment(1);
    let _ = message
        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
        .await;
}

/// How often a queued run checks for a free slot.
const QUEUE_POLL: Duration = Duration::from_secs(2);

fn cancel(run_id: &str, reason: String) -> RunEvent {
    RunEvent::CancelRequested(event::CancelRequested {
        run_id: run_id.to_owned(),
        reason,
    })
}

/// The concurrency slot of a run, if its workflow has a concurrency key.
pub fn slot_of(run: &Run, wf: &Workflow) -> Option<Result<String, baton_core::Error>> {
    let c = wf.concurrency.as_ref()?;
    let key = c
        .key
        .eval(&to_val(&run.context()))
        .map_err(|e| baton_core::Error::invalid(e.to_string()));
    Some(key.map(|v| {
        let key = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        Slots::slot(&wf.name, &key)
    }))
}

/// A publish under way: a JetStream ack to wait for, or another write that waits for its own.
enum Pending {
    Ack(jetstream::context::PublishAckFuture),
    Future(futures::future::BoxFuture<'static, Result<(), baton_core::Error>>),
}

type PublishResult = Result<Pending, baton_core::Error>;

async fn await_all(publishes: Vec<PublishResult>) -> Result<(), baton_core::Error> {
    for publish in publishes {
        match publish? {
            Pending::Ack(ack) => ack
                .await
                .map(|_| ())
                .map_err(|e| baton_core::Error::publish(&e))?,
            Pending::Future(f) => f.await?,
        }
    }
    Ok(())
}

/// The inputs of a decision that are not in the journal: the time, and a random number for jitter.
fn clock() -> Clock {
    let random = (ulid::Ulid::generate().random() as u64 >> 11) as f64 / (1u64 << 53) as f64;
    Clock {
        now: chrono::Utc::now(),
        random,
    }
}

fn base64_json<T: serde::Serialize>(value: &T) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(value).unwrap_or_default())
}

/// Exports the spans the coordinator owns for an ended run (the run span, and the attempts of the
/// steps it executes itself), built from the run's journal. Best effort: a failure is logged.
async fn export_spans(js: &jetstream::Context, filter: String, workflow: &Workflow) {
    match read_journal(js, filter).await {
        Ok(journal) => {
            let entries: Vec<spans::Entry<'_>> = journal.iter().map(Journaled::entry).collect();
            telemetry::export(
                spans::from_journal(&entries, workflow)
                    .into_iter()
                    .filter(|s| s.origin == spans::Origin::Coordinator),
            );
        }
        Err(error) => tracing::warn!(%error, "cannot read the journal to export the run's span"),
    }
}

/// A run event read back from the journal.
#[derive(Debug, Clone)]
pub struct Journaled {
    pub seq: u64,
    /// When the journal stored it.
    pub time: chrono::DateTime<chrono::Utc>,
    /// The event's trace context, if valid.
    pub trace: Option<Trace>,
    pub event: RunEvent,
}

impl Journaled {
    /// The event as span building sees it.
    pub fn entry(&self) -> spans::Entry<'_> {
        spans::Entry {
            time: self.time,
            trace: self.trace.as_ref(),
            event: &self.event,
        }
    }
}

/// Reads every run event on `filter` from the journal, oldest first, with its stream sequence.
/// Events that are not valid run events are skipped (they were dead-lettered when first seen).
pub async fn read_journal(
    js: &jetstream::Context,
    filter: String,
) -> Result<Vec<Journaled>, Error> {
    let config = consumer::pull::OrderedConfig {
        filter_subject: filter,
        ..Default::default()
    };
    let messages = baton_core::streams::read(js, baton_core::streams::RUNS, config)
        .await
        .map_err(Error::JetStream)?;
    let mut out = Vec::new();
    for message in messages {
        let info = message.info().map_err(jserr)?;
        if let Ok(ce) = binding::decode(message.headers.as_ref(), &message.payload)
            && let Ok(event) = RunEvent::from_message(&message.subject, &ce)
        {
            out.push(Journaled {
                seq: info.stream_sequence,
                time: chrono::DateTime::from_timestamp_nanos(
                    info.published.unix_timestamp_nanos() as i64
                ),
                trace: event::trace(&ce),
                event,
            });
        }
    }
    Ok(out)
}
