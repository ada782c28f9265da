//! `baton runs why ID`: what a run that has not ended waits for, and since when, in plain words.
//!
//! Everything comes from the run's journal (requests, attempts, runner announcements, timers) plus
//! three live facts: the runner consumers of the step kinds it waits on, the `baton-waits` entry
//! of a waiting step, and the holders of its concurrency key.

use std::time::Duration;

use async_nats::jetstream::consumer::Info;
use baton_coordinator::concurrency::Slots;
use baton_coordinator::saga::{Exec, ExecState, Run, Status};
use baton_coordinator::service::{Journaled, slot_of};
use baton_core::event::{self, RunEvent, TimerPurpose};
use baton_core::{Bus, streams};
use baton_workflow::{Action, Workflow};
use chrono::{DateTime, Utc};

/// The explanation, one line per thing the run waits for.
pub async fn why(bus: &Bus, run_id: &str) -> anyhow::Result<Vec<String>> {
    let (run, workflow, events) = crate::runs::load_with_workflow(bus, run_id).await?;
    let facts = Journal(&events);
    let mut lines = Vec::new();
    let since = events.first().map(|e| e.time).unwrap_or_else(Utc::now);
    if let Status::Ended(_) = run.status {
        lines.push(format!(
            "Run {run_id} has ended ({}): it waits for nothing. `baton runs show {run_id}` tells how it went.",
            run.status.as_str()
        ));
        return Ok(lines);
    }
    lines.push(format!(
        "Run {run_id} ({} v{}) is {} since {}. It waits for:",
        run.workflow.name,
        run.workflow.version,
        run.status.as_str(),
        at(since)
    ));
    let mut reasons = Vec::new();
    let started = events
        .iter()
        .any(|e| matches!(e.event, RunEvent::StepRequested(_)));
    if !started {
        reasons.push(queued(bus, &run, &workflow).await?);
    }
    for (spec, state) in workflow.steps.iter().zip(&run.steps) {
        // The step's own executions (items of a for-each step), then its compensation.
        let mut execs: Vec<(Option<u32>, &Exec, bool)> = if state.items.is_empty() {
            vec![(None, &state.exec, false)]
        } else {
            state
                .items
                .iter()
                .enumerate()
                .map(|(i, e)| (Some(i as u32), e, false))
                .collect()
        };
        execs.push((None, &state.compensation, true));
        for (item, exec, compensating) in execs {
            let name = format!("{}{}", spec.id, event::item_label(item));
            let what = if compensating {
                format!("the compensation of step {name}")
            } else {
                format!("step {name}")
            };
            let reason = match exec.state {
                ExecState::Requested => {
                    let requested = facts.requested(&spec.id, item, exec.attempt, compensating);
                    let mut line = match (&spec.action, compensating) {
                        (Action::Run, _) | (_, true) => {
                            let kind = match (&spec.compensate, compensating) {
                                (Some(c), true) => c.kind.as_str(),
                                _ => spec.kind.as_str(),
                            };
                            runner(
                                bus,
                                &facts,
                                &what,
                                kind,
                                &spec.id,
                                item,
                                exec.attempt,
                                compensating,
                                requested,
                            )
                            .await
                        }
                        (Action::Sleep(_), _) => match facts.timer(
                            |p| matches!(p, TimerPurpose::Sleep { step } if *step == spec.id),
                        ) {
                            Some(due) => format!("{what} (sleep): sleeping until {}", at(due)),
                            None => format!("{what} (sleep): its timer is being set"),
                        },
                        (Action::Wait(wait), _) => {
                            let key = waiting_key(bus, run_id, &spec.id, item).await;
                            format!(
                                "{what} (wait): an event of type {} whose key equals {}, since {}",
                                wait.event,
                                key.unwrap_or_else(|| "(not registered yet)".into()),
                                at(requested.unwrap_or(since))
                            )
                        }
                        (Action::Approval(approval), _) => {
                            let who = if approval.approvers.is_empty() {
                                "anyone".to_owned()
                            } else {
                                approval.approvers.join(" or ")
                            };
                            format!(
                                "{what} (approval): a decision by {who}, since {}: `baton approve {run_id} {}` or `baton reject {run_id} {}`",
                                at(requested.unwrap_or(since)),
                                spec.id,
                                spec.id
                            )
                        }
                        (Action::Workflow(call), _) => {
                            let child = event::child_run_id(run_id, &spec.id, exec.attempt);
                            format!(
                                "{what} (workflow): the sub-run {child} of {} to end: `baton runs why {child}`",
                                call.workflow
                            )
                        }
                    };
                    let timeout = facts.timer(|p| match p {
                        TimerPurpose::Timeout {
                            step,
                            item: i,
                            attempt,
                        } => {
                            !compensating
                                && *step == spec.id
                                && *i == item
                                && *attempt == exec.attempt
                        }
                        TimerPurpose::CompensationTimeout { step, attempt } => {
                            compensating && *step == spec.id && *attempt == exec.attempt
                        }
                        _ => false,
                    });
                    if let Some(due) = timeout {
                        line.push_str(&format!("; it times out at {}", at(due)));
                    }
                    line
                }
                ExecState::Backoff => {
                    let due = facts.timer(|p| match p {
                        TimerPurpose::Retry { step, item: i, .. } => {
                            !compensating && *step == spec.id && *i == item
                        }
                        TimerPurpose::CompensationRetry { step, .. } => {
                            compensating && *step == spec.id
                        }
                        _ => false,
                    });
                    let error = exec.error.as_ref().map_or("", |e| e.message.as_str());
                    format!(
                        "{what}: attempt {} failed ({error}); attempt {} at {} (backing off)",
                        exec.attempt,
                        exec.attempt + 1,
                        due.map_or_else(|| "a time being set".to_owned(), at)
                    )
                }
                ExecState::Failed | ExecState::RetryDue => {
                    format!(
                        "{what}: the coordinator to request attempt {} (is a coordinator running?)",
                        exec.attempt + 1
                    )
                }
                _ => continue,
            };
            reasons.push(reason);
        }
    }
    if let Some(due) = facts.timer(|p| matches!(p, TimerPurpose::RunTimeout)) {
        reasons.push(format!("(the whole run times out at {})", at(due)));
    }
    if reasons.is_empty() {
        reasons.push(
            "the coordinator to decide its next step: is a coordinator running (`baton coordinator`)?"
                .into(),
        );
    }
    lines.extend(reasons.into_iter().map(|r| format!("  - {r}")));
    Ok(lines)
}

fn at(time: DateTime<Utc>) -> String {
    let ago = (Utc::now() - time).num_seconds();
    let when = time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if ago >= 0 {
        format!("{when} ({} ago)", human(Duration::from_secs(ago as u64)))
    } else {
        format!("{when} (in {})", human(Duration::from_secs((-ago) as u64)))
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Questions to the run's journal.
struct Journal<'a>(&'a [Journaled]);

impl Journal<'_> {
    /// When this attempt was requested.
    fn requested(
        &self,
        step: &str,
        item: Option<u32>,
        attempt: u32,
        compensation: bool,
    ) -> Option<DateTime<Utc>> {
        self.0.iter().rev().find_map(|j| match &j.event {
            RunEvent::StepRequested(r)
                if !compensation && r.step == step && r.item == item && r.attempt == attempt =>
            {
                Some(j.time)
            }
            RunEvent::CompensationRequested(r)
                if compensation && r.step == step && r.attempt == attempt =>
            {
                Some(j.time)
            }
            _ => None,
        })
    }

    /// The last announcement of a runner working on this attempt: (runner, started, last seen).
    fn activity(
        &self,
        step: &str,
        item: Option<u32>,
        attempt: u32,
        compensation: bool,
    ) -> Option<(String, DateTime<Utc>, DateTime<Utc>)> {
        let mut found: Option<(String, DateTime<Utc>, DateTime<Utc>)> = None;
        for j in self.0 {
            if let RunEvent::StepStarted(a) | RunEvent::StepHeartbeat(a) = &j.event
                && a.step == step
                && a.item == item
                && a.attempt == attempt
                && a.compensation == compensation
            {
                let begun = j.time - chrono::Duration::milliseconds(a.elapsed_ms as i64);
                found = Some(match found {
                    Some((runner, start, _)) if runner == a.runner => (runner, start, j.time),
                    _ => (a.runner.clone(), begun, j.time),
                });
            }
        }
        found
    }

    /// The due time of the last timer with this purpose that has not fired.
    fn timer(&self, purpose: impl Fn(&TimerPurpose) -> bool) -> Option<DateTime<Utc>> {
        let mut due = None;
        for j in self.0 {
            match &j.event {
                RunEvent::TimerScheduled(t) if purpose(&t.purpose) => due = Some(t.due),
                RunEvent::TimerFired(t) if purpose(&t.purpose) => due = None,
                _ => {}
            }
        }
        due
    }
}

/// A step waiting for a runner: running on one, queued for one, or no runner at all.
#[allow(clippy::too_many_arguments)]
async fn runner(
    bus: &Bus,
    journal: &Journal<'_>,
    what: &str,
    kind: &str,
    step: &str,
    item: Option<u32>,
    attempt: u32,
    compensation: bool,
    requested: Option<DateTime<Utc>>,
) -> String {
    if let Some((runner, begun, seen)) = journal.activity(step, item, attempt, compensation) {
        return format!(
            "{what} (kind {kind}, attempt {attempt}): running on {runner} since {}, last heard of {}",
            at(begun),
            at(seen)
        );
    }
    let requested = requested.map_or_else(|| "just now".to_owned(), at);
    let info: Option<Info> = match bus.js.get_stream(streams::RUNS).await {
        Ok(stream) => stream.consumer_info(format!("runner-{kind}")).await.ok(),
        Err(_) => None,
    };
    match info {
        None => format!(
            "{what} (kind {kind}, attempt {attempt}): requested {requested}, but no runner of kind {kind} has ever subscribed: start `baton runner` (built-in kinds) or a step service for `{kind}` (docs/step-services.md)"
        ),
        Some(info) if info.num_waiting == 0 && info.num_ack_pending == 0 => format!(
            "{what} (kind {kind}, attempt {attempt}): requested {requested}, but no runner of kind {kind} is subscribed now: start one (`baton runner`, or the step service for `{kind}`)"
        ),
        Some(info) => format!(
            "{what} (kind {kind}, attempt {attempt}): requested {requested}, queued for a runner of kind {kind} ({} request(s) not yet delivered, {} in progress)",
            info.num_pending, info.num_ack_pending
        ),
    }
}

/// The key a waiting step's entry holds, as JSON.
async fn waiting_key(bus: &Bus, run_id: &str, step: &str, item: Option<u32>) -> Option<String> {
    let bucket = bus.js.get_key_value(streams::WAITS_BUCKET).await.ok()?;
    let entry = bucket
        .get(baton_coordinator::waits::key(run_id, step, item))
        .await
        .ok()??;
    let entry: baton_coordinator::waits::WaitEntry = serde_json::from_slice(&entry).ok()?;
    Some(entry.key.to_string())
}

/// A run with no step requested yet: queued behind its concurrency key, or not yet handled.
async fn queued(bus: &Bus, run: &Run, workflow: &Workflow) -> anyhow::Result<String> {
    let not_handled = "the coordinator to start it: its request is stored but not handled yet (is a coordinator running? `baton coordinator`)".to_owned();
    let (Some(c), Some(Ok(slot))) = (&workflow.concurrency, slot_of(run, workflow)) else {
        return Ok(not_handled);
    };
    let slots = Slots::open(&bus.js, bus.partitions).await?;
    let holders = slots.holders(&slot).await?;
    if holders.contains(&run.id) || holders.len() < c.limit as usize {
        return Ok(not_handled);
    }
    Ok(format!(
        "a place in the queue of its concurrency key (limit {}), held by run(s) {}: it starts when one of them ends (`baton runs why {}`)",
        c.limit,
        holders.join(", "),
        holders[0]
    ))
}
