//! The spans of a run, as pure data: deterministic ids, and the spans built from what a process
//! knows (a runner, about the attempt it executed) or from the run's journal (the coordinator at the
//! end of a run, and `baton runs trace`). Export is elsewhere ([`crate::telemetry`]).
//!
//! A run is one trace: the trace of the event that caused it. Every id is a hash of what names the
//! thing, so processes agree on parents without talking to each other:
//!
//! - the run span: `H("run", run)`, child of the triggering event's span (the parent id of the
//!   run's `traceparent`), or a root span when Baton started the trace itself;
//! - an attempt of a step: `H("step", run, step, item, attempt)`, child of the run span;
//! - an attempt of a compensation: `H("compensation", run, step, attempt)`, child of the run span.
//!
//! `H` is the first 8 bytes of SHA-256 over `baton/<what>` and the parts, each followed by a NUL.
//! The coordinator publishes step and compensation requests with the `traceparent` (run trace, run
//! span), so the runner that executes an attempt has its parent in the request it received.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::event::{self, Ending, RunEvent, StepError, StepRequested, TimerPurpose};
use crate::trace::Trace;

/// The CloudEvents extension on `step.requested` that names the spans of the attempts the step
/// depended on (its `needs`): span ids in the run's trace, separated by commas.
pub const LINKS_EXTENSION: &str = "batonlinks";

/// At most this many links per span (OpenTelemetry's default limit).
pub const MAX_LINKS: usize = 128;

fn hash(what: &str, parts: &[&str], bytes: usize) -> String {
    let mut h = Sha256::new();
    h.update(b"baton/");
    h.update(what.as_bytes());
    h.update([0]);
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut id: Vec<u8> = digest[..bytes].to_vec();
    // An all-zero id is invalid; the chance is 2^-64, but an id must never be invalid.
    if id.iter().all(|&b| b == 0) {
        id[bytes - 1] = 1;
    }
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id of a run's span.
pub fn run_span_id(run_id: &str) -> String {
    hash("run", &[run_id], 8)
}

/// The id of the span of one attempt of a step (or of one item of a `for-each` step).
pub fn attempt_span_id(run_id: &str, step: &str, item: Option<u32>, attempt: u32) -> String {
    let item = item.map(|i| i.to_string()).unwrap_or_default();
    hash("step", &[run_id, step, &item, &attempt.to_string()], 8)
}

/// The id of the span of one attempt of a step's compensation.
pub fn compensation_span_id(run_id: &str, step: &str, attempt: u32) -> String {
    hash("compensation", &[run_id, step, &attempt.to_string()], 8)
}

/// The span id of the attempt a request asks for.
pub fn request_span_id(request: &StepRequested, compensation: bool) -> String {
    if compensation {
        compensation_span_id(&request.run_id, &request.step, request.attempt)
    } else {
        attempt_span_id(
            &request.run_id,
            &request.step,
            request.item,
            request.attempt,
        )
    }
}

/// The parent id of a trace Baton started itself: no span has it, and it marks the run span of
/// such a trace as a root span.
pub fn root_parent(trace_id: &str) -> String {
    hash("root", &[trace_id], 8)
}

/// Whether Baton started this trace (its run span is a root span).
pub fn is_root(trace: &Trace) -> bool {
    trace.parent_id == root_parent(&trace.trace_id)
}

/// The trace of a run whose request carries no valid trace context: derived from the run id, so
/// every process (and every rebuild) agrees on it.
pub fn fallback_trace(run_id: &str) -> Trace {
    let trace_id = hash("trace", &[run_id], 16);
    Trace {
        parent_id: root_parent(&trace_id),
        trace_id,
        flags: 1,
        state: None,
    }
}

/// The context the coordinator publishes a run's events with: the run's trace, the run span as
/// parent.
pub fn run_context(trace: &Trace, run_id: &str) -> Trace {
    Trace {
        parent_id: run_span_id(run_id),
        ..trace.clone()
    }
}

/// The context of what an attempt causes (a sub-run started by a `workflow` step): the attempt's
/// span as parent.
pub fn attempt_context(trace: &Trace, request: &StepRequested, compensation: bool) -> Trace {
    Trace {
        parent_id: request_span_id(request, compensation),
        ..trace.clone()
    }
}

/// Who exports a span.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// The coordinator: run spans and attempts of the kinds it executes (sleep, wait, approval,
    /// workflow).
    Coordinator,
    /// The runner (or step service) instance that executed the attempt.
    Runner(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal,
    /// Processing a message: a runner executing a request.
    Consumer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error(String),
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Bool(bool),
    Strs(Vec<String>),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Attr {
        Attr::Str(s.to_owned())
    }
}

impl From<String> for Attr {
    fn from(s: String) -> Attr {
        Attr::Str(s)
    }
}

impl From<u32> for Attr {
    fn from(n: u32) -> Attr {
        Attr::Int(n.into())
    }
}

impl From<u64> for Attr {
    fn from(n: u64) -> Attr {
        Attr::Int(n as i64)
    }
}

impl From<bool> for Attr {
    fn from(b: bool) -> Attr {
        Attr::Bool(b)
    }
}

pub type Attributes = Vec<(&'static str, Attr)>;

/// A timestamped event on a span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanEvent {
    pub name: String,
    pub time: DateTime<Utc>,
    pub attributes: Attributes,
}

/// One span, ready to export.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a root span.
    pub parent_id: Option<String>,
    pub trace_state: Option<String>,
    /// The trace's sampled flag: an unsampled trace is not exported.
    pub sampled: bool,
    pub name: String,
    pub kind: Kind,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub attributes: Attributes,
    pub events: Vec<SpanEvent>,
    /// Span ids, in the same trace, of the spans this one depended on.
    pub links: Vec<String>,
    pub status: Status,
    pub origin: Origin,
}

impl Span {
    pub fn attribute(&self, key: &str) -> Option<&Attr> {
        self.attributes
            .iter()
            .find_map(|(k, v)| (*k == key).then_some(v))
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    Failed(StepError),
    /// Not settled (yet): still running, or the run ended while it was.
    Unfinished,
}

/// What is known of one attempt of a step or of a compensation.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub request: &'a StepRequested,
    pub compensation: bool,
    /// The request's trace context: the run's trace, the run span as parent.
    pub context: &'a Trace,
    /// Span ids of the attempts the step depended on.
    pub links: &'a [String],
    /// The runner instance that executed it; `None`: the coordinator.
    pub runner: Option<&'a str>,
    /// Which delivery of the request this was (0: unknown, 1: the first).
    pub delivered: u32,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub outcome: Outcome,
}

/// The span of one attempt: `step <id>` or `compensate <id>`, child of the run span.
pub fn attempt_span(a: &Attempt<'_>) -> Span {
    let r = a.request;
    let name = if a.compensation {
        format!("compensate {}", r.step)
    } else {
        format!("step {}", r.step)
    };
    let request = if a.compensation {
        RunEvent::CompensationRequested(r.clone())
    } else {
        RunEvent::StepRequested(r.clone())
    };
    let mut attributes: Attributes = vec![
        ("baton.run.id", r.run_id.as_str().into()),
        ("baton.step", r.step.as_str().into()),
        ("baton.step.attempt", r.attempt.into()),
        ("baton.step.kind", r.kind.as_str().into()),
    ];
    if let Some(item) = r.item {
        attributes.push(("baton.step.item", item.into()));
    }
    if a.compensation {
        attributes.push(("baton.compensation", true.into()));
    }
    // Only a redelivery (a runner was lost) is worth saying.
    if a.delivered > 1 {
        attributes.push(("baton.step.delivery", a.delivered.into()));
    }
    attributes.extend([
        ("cloudevents.event_id", request.id().into()),
        ("cloudevents.event_type", request.ty().into()),
        (
            "cloudevents.event_subject",
            format!("{}/{}", r.run_id, r.step).into(),
        ),
    ]);
    let (outcome, status) = match &a.outcome {
        Outcome::Completed => ("completed", Status::Unset),
        Outcome::Failed(e) => {
            attributes.push((
                "error.type",
                e.code.clone().unwrap_or_else(|| "_OTHER".into()).into(),
            ));
            attributes.push(("baton.step.retryable", e.retryable.into()));
            ("failed", Status::Error(e.message.clone()))
        }
        Outcome::Unfinished => ("unfinished", Status::Unset),
    };
    attributes.push(("baton.outcome", outcome.into()));
    Span {
        trace_id: a.context.trace_id.clone(),
        span_id: request_span_id(r, a.compensation),
        parent_id: Some(a.context.parent_id.clone()),
        trace_state: a.context.state.clone(),
        sampled: a.context.flags & 1 == 1,
        name,
        kind: if a.runner.is_some() {
            Kind::Consumer
        } else {
            Kind::Internal
        },
        start: a.start,
        end: a.end.max(a.start),
        attributes,
        events: Vec::new(),
        links: a.links.iter().take(MAX_LINKS).cloned().collect(),
        status,
        origin: match a.runner {
            Some(runner) => Origin::Runner(runner.to_owned()),
            None => Origin::Coordinator,
        },
    }
}

/// Parses the [`LINKS_EXTENSION`] value.
pub fn parse_links(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
        .take(MAX_LINKS)
        .collect()
}

/// Whether the coordinator executes steps of this kind itself.
pub fn runs_in_coordinator(kind: &str) -> bool {
    baton_workflow::Builtin::from_name(kind).is_some_and(|b| b.runs_in_coordinator())
}

/// One event of a run's journal, with the time the journal stored it and its trace context.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub time: DateTime<Utc>,
    pub trace: Option<&'a Trace>,
    pub event: &'a RunEvent,
}

/// The attempt an event is about: compensation or not, step, item, attempt.
type Key = (bool, String, Option<u32>, u32);

#[derive(Default)]
struct Seen<'a> {
    requested: Option<(DateTime<Utc>, &'a StepRequested, Vec<String>)>,
    started: Option<(DateTime<Utc>, u32, &'a str)>,
    outcome: Option<(DateTime<Utc>, Outcome, &'a str)>,
    timed_out: Option<DateTime<Utc>>,
}

/// Every span of a run, from its journal (oldest event first): the run span first, then the
/// attempts in the order they were requested. `workflow` is the run's pinned version (for the links
/// of steps with `needs`). Empty when the journal does not start with the run's request.
pub fn from_journal(entries: &[Entry<'_>], workflow: &baton_workflow::Workflow) -> Vec<Span> {
    let Some((first, RunEvent::Requested(request))) = entries.first().map(|e| (e, e.event)) else {
        return Vec::new();
    };
    let run_id = request.run_id.as_str();
    let trace = first
        .trace
        .cloned()
        .unwrap_or_else(|| fallback_trace(run_id));
    let context = run_context(&trace, run_id);
    let mut attempts: BTreeMap<Key, Seen<'_>> = BTreeMap::new();
    let mut order: Vec<Key> = Vec::new();
    // The last attempt requested of each (step, item): what a step that needs it depended on.
    let mut last: BTreeMap<(String, Option<u32>), u32> = BTreeMap::new();
    let mut events = Vec::new();
    let mut retries: BTreeSet<Key> = BTreeSet::new();
    let mut end: Option<(DateTime<Utc>, Ending, &event::RunEnded)> = None;
    let mut last_time = first.time;
    let step_attrs = |step: &str, item: Option<u32>, attempt: u32| {
        let mut a: Attributes = vec![("baton.step", step.into())];
        if let Some(i) = item {
            a.push(("baton.step.item", i.into()));
        }
        a.push(("baton.step.attempt", attempt.into()));
        a
    };
    for entry in entries {
        let time = entry.time;
        last_time = last_time.max(time);
        let mut note = |name: &str, attributes: Attributes| {
            events.push(SpanEvent {
                name: name.to_owned(),
                time,
                attributes,
            })
        };
        match entry.event {
            RunEvent::StepRequested(r) | RunEvent::CompensationRequested(r) => {
                let compensation = matches!(entry.event, RunEvent::CompensationRequested(_));
                let key = (compensation, r.step.clone(), r.item, r.attempt);
                let links = if compensation {
                    Vec::new()
                } else {
                    needs_links(run_id, workflow, &r.step, |step| {
                        last.iter()
                            .filter(|((s, _), _)| s == step)
                            .map(|((_, item), attempt)| (*item, *attempt))
                            .collect()
                    })
                };
                if !compensation {
                    last.insert((r.step.clone(), r.item), r.attempt);
                }
                let seen = attempts.entry(key.clone()).or_default();
                if seen.requested.is_none() {
                    seen.requested = Some((time, r, links));
                    order.push(key);
                }
                let mut a = step_attrs(&r.step, r.item, r.attempt);
                a.push(("baton.step.kind", r.kind.as_str().into()));
                note(
                    if compensation {
                        "compensation.requested"
                    } else {
                        "step.requested"
                    },
                    a,
                );
            }
            RunEvent::StepStarted(s) => {
                let seen = attempts
                    .entry((s.compensation, s.step.clone(), s.item, s.attempt))
                    .or_default();
                if seen.outcome.is_none() {
                    seen.started = Some((time, s.delivered, s.runner.as_str()));
                }
            }
            RunEvent::StepCompleted(c) | RunEvent::CompensationCompleted(c) => {
                let compensation = matches!(entry.event, RunEvent::CompensationCompleted(_));
                let seen = attempts
                    .entry((compensation, c.step.clone(), c.item, c.attempt))
                    .or_default();
                if seen.outcome.is_none() {
                    seen.outcome = Some((time, Outcome::Completed, c.runner.as_str()));
                }
            }
            RunEvent::StepFailed(f) | RunEvent::CompensationFailed(f) => {
                let compensation = matches!(entry.event, RunEvent::CompensationFailed(_));
                let seen = attempts
                    .entry((compensation, f.step.clone(), f.item, f.attempt))
                    .or_default();
                if seen.outcome.is_none() {
                    seen.outcome =
                        Some((time, Outcome::Failed(f.error.clone()), f.runner.as_str()));
                    let mut a = step_attrs(&f.step, f.item, f.attempt);
                    a.push((
                        "error.type",
                        f.error
                            .code
                            .clone()
                            .unwrap_or_else(|| "_OTHER".into())
                            .into(),
                    ));
                    a.push(("error.message", f.error.message.as_str().into()));
                    note(
                        if compensation {
                            "compensation.failed"
                        } else {
                            "step.failed"
                        },
                        a,
                    );
                }
            }
            // A retry timer: while it is pending the journal holds its schedule (`.at`); once it
            // fired, only the copy the server wrote (`.fired`). Either says when the coordinator
            // decided to retry: at the failure it retries.
            RunEvent::TimerScheduled(t) | RunEvent::TimerFired(t)
                if matches!(
                    t.purpose,
                    TimerPurpose::Retry { .. } | TimerPurpose::CompensationRetry { .. }
                ) =>
            {
                let (compensation, step, item, attempt) = match &t.purpose {
                    TimerPurpose::Retry {
                        step,
                        item,
                        attempt,
                    } => (false, step, *item, *attempt),
                    TimerPurpose::CompensationRetry { step, attempt } => {
                        (true, step, None, *attempt)
                    }
                    _ => unreachable!("matched above"),
                };
                if retries.insert((compensation, step.clone(), item, attempt)) {
                    let failed = attempts
                        .get(&(compensation, step.clone(), item, attempt.saturating_sub(1)))
                        .and_then(|seen| seen.outcome.as_ref().map(|(t, ..)| *t));
                    let mut a = step_attrs(step, item, attempt);
                    a.push(("baton.retry.due", rfc3339(t.due).into()));
                    events.push(SpanEvent {
                        name: if compensation {
                            "compensation retry scheduled".into()
                        } else {
                            "retry scheduled".into()
                        },
                        time: failed.unwrap_or(time),
                        attributes: a,
                    });
                }
            }
            RunEvent::TimerScheduled(_) => {}
            RunEvent::TimerFired(t) => match &t.purpose {
                TimerPurpose::Timeout {
                    step,
                    item,
                    attempt,
                } => {
                    let key = (false, step.clone(), *item, *attempt);
                    let seen = attempts.entry(key).or_default();
                    // A timer that fires after its attempt settled is stale.
                    if seen.outcome.is_none() && seen.timed_out.is_none() {
                        seen.timed_out = Some(time);
                        note("timed out", step_attrs(step, *item, *attempt));
                    }
                }
                TimerPurpose::CompensationTimeout { step, attempt } => {
                    let key = (true, step.clone(), None, *attempt);
                    let seen = attempts.entry(key).or_default();
                    if seen.outcome.is_none() && seen.timed_out.is_none() {
                        seen.timed_out = Some(time);
                        note("compensation timed out", step_attrs(step, None, *attempt));
                    }
                }
                TimerPurpose::RunTimeout if end.is_none() => note("run timed out", Vec::new()),
                _ => {}
            },
            RunEvent::CancelRequested(c) => note(
                "cancel requested",
                vec![("baton.reason", c.reason.as_str().into())],
            ),
            RunEvent::Compensating(c) => {
                let mut a: Attributes = vec![("baton.reason", c.reason.as_str().into())];
                if let Some(step) = &c.step {
                    a.push(("baton.step", step.as_str().into()));
                }
                a.push(("baton.plan", Attr::Strs(c.plan.clone())));
                note("compensating", a);
            }
            RunEvent::CompensationRetryRequested(_) => {
                note("compensation retry requested", Vec::new())
            }
            RunEvent::Ended(ending, e) => {
                if end.is_none_or(|(_, _, prev)| e.round >= prev.round) {
                    end = Some((time, *ending, e));
                }
            }
            RunEvent::Requested(_) | RunEvent::StepHeartbeat(_) => {}
        }
    }

    events.sort_by_key(|e| e.time);

    // The run span.
    let mut attributes: Attributes = vec![
        ("baton.workflow", request.workflow.name.as_str().into()),
        ("baton.workflow.version", request.workflow.version.into()),
        ("baton.run.id", run_id.into()),
    ];
    if let Some(t) = &request.trigger {
        attributes.extend([
            ("cloudevents.event_id", t.id.as_str().into()),
            ("cloudevents.event_source", t.source.as_str().into()),
            ("cloudevents.event_type", t.ty.as_str().into()),
        ]);
        if let Some(subject) = &t.subject {
            attributes.push(("cloudevents.event_subject", subject.as_str().into()));
        }
    }
    if let Some(parent) = &request.parent {
        attributes.push(("baton.parent.run.id", parent.run_id.as_str().into()));
        attributes.push(("baton.parent.step", parent.step.as_str().into()));
    }
    let (outcome, status, run_end) = match end {
        Some((time, ending, e)) => {
            let outcome = crate::spans::outcome(ending);
            let status = match ending {
                Ending::Succeeded | Ending::Cancelled => Status::Unset,
                _ => {
                    attributes.push(("error.type", outcome.into()));
                    Status::Error(e.error.clone().unwrap_or_else(|| outcome.to_owned()))
                }
            };
            if let Some(step) = &e.step {
                attributes.push(("baton.failed_step", step.as_str().into()));
            }
            (outcome, status, time)
        }
        None => ("running", Status::Unset, last_time),
    };
    attributes.push(("baton.outcome", outcome.into()));
    let mut spans = vec![Span {
        trace_id: trace.trace_id.clone(),
        span_id: run_span_id(run_id),
        parent_id: (!is_root(&trace)).then(|| trace.parent_id.clone()),
        trace_state: trace.state.clone(),
        sampled: trace.flags & 1 == 1,
        name: format!("run {}", request.workflow.name),
        kind: Kind::Internal,
        start: first.time,
        end: run_end,
        attributes,
        events,
        links: Vec::new(),
        status,
        origin: Origin::Coordinator,
    }];

    // The attempts.
    for key in order {
        let seen = &attempts[&key];
        let Some((requested_at, request, links)) = &seen.requested else {
            continue;
        };
        let in_coordinator = runs_in_coordinator(&request.kind);
        let (start, runner, delivered) = match seen.started {
            Some((time, delivered, runner)) if !in_coordinator => (time, Some(runner), delivered),
            _ => (*requested_at, None, 0),
        };
        let (end_time, outcome, runner) = match &seen.outcome {
            Some((time, outcome, by)) => {
                let by = (!in_coordinator && *by != "coordinator").then_some(*by);
                (*time, outcome.clone(), by.or(runner))
            }
            None if in_coordinator => match seen.timed_out {
                Some(time) => {
                    let timeout = std::time::Duration::from_millis(request.timeout_ms.unwrap_or(0));
                    (time, Outcome::Failed(StepError::timeout(timeout)), None)
                }
                None => (
                    end.map_or(last_time, |(t, ..)| t),
                    Outcome::Unfinished,
                    None,
                ),
            },
            // A runner that has not reported: still running, or lost.
            None if runner.is_some() => (last_time, Outcome::Unfinished, runner),
            None => continue,
        };
        if !in_coordinator && runner.is_none() {
            continue;
        }
        spans.push(attempt_span(&Attempt {
            request,
            compensation: key.0,
            context: &context,
            links,
            runner,
            delivered,
            start,
            end: end_time,
            outcome,
        }));
    }
    spans
}

/// The span ids of the attempts a step depended on: the last attempt of every item of each of its
/// `needs`, in the order of `needs`. `attempts(step)` gives a step's (item, last attempt) pairs.
pub fn needs_links(
    run_id: &str,
    workflow: &baton_workflow::Workflow,
    step: &str,
    attempts: impl Fn(&str) -> Vec<(Option<u32>, u32)>,
) -> Vec<String> {
    let Some(spec) = workflow.steps.iter().find(|s| s.id == step) else {
        return Vec::new();
    };
    let mut links = Vec::new();
    for &need in &spec.needs {
        let Some(need) = workflow.steps.get(need) else {
            continue;
        };
        for (item, attempt) in attempts(&need.id) {
            if attempt > 0 {
                links.push(attempt_span_id(run_id, &need.id, item, attempt));
            }
        }
    }
    links.truncate(MAX_LINKS);
    links
}

/// `baton.outcome` of a run that ended.
pub fn outcome(ending: Ending) -> &'static str {
    match ending {
        Ending::Succeeded => "succeeded",
        Ending::Failed => "failed",
        Ending::Cancelled => "cancelled",
        Ending::Compensated => "compensated",
        Ending::CompensationFailed => "compensation_failed",
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests;
