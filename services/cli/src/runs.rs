//! Commands that talk to a running Baton: apply workflows, start, follow and show runs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_coordinator::saga::{ExecState, Run, Status, StepStatus};
use baton_coordinator::service::{Journaled, read_journal};
use baton_core::event::{
    self, CancelRequested, CompensationRetryRequested, Ending, RunEvent, RunRequested, WorkflowRef,
};
use baton_core::registry::Registry;
use baton_core::{Bus, binding, subjects};
use futures::StreamExt;

/// Validates a workflow file and stores it in the registry. Returns it compiled, and its version.
pub async fn apply_file(bus: &Bus, file: &Path) -> anyhow::Result<(baton_workflow::Workflow, u64)> {
    let source =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let workflow = baton_workflow::compile(&source).map_err(|problems| {
        let lines: Vec<String> = problems
            .0
            .iter()
            .map(|p| format!("  {}: {p}", file.display()))
            .collect();
        anyhow::anyhow!(
            "{} is not a valid workflow:\n{}",
            file.display(),
            lines.join("\n")
        )
    })?;
    let registry = Registry::open(&bus.js).await?;
    let triggers = workflow.triggers.iter().map(|t| t.ty.clone()).collect();
    let (version, created) = registry.apply(&workflow.name, &source, triggers).await?;
    let what = if created { "stored as" } else { "unchanged at" };
    println!("Workflow {} {what} version {version}", workflow.name);
    Ok((workflow, version))
}

/// Stores one run event in the journal, waiting for JetStream's ack.
async fn publish(bus: &Bus, event: &RunEvent) -> anyhow::Result<()> {
    let trace = baton_core::trace::Trace::new();
    bus.store("baton/cli", [(event, &trace)])
        .await
        .map_err(|e| anyhow::anyhow!("the {} event was not stored: {e}", event.ty()))
}

/// Publishes `run.requested` for a new run and returns its id once the request is stored.
pub async fn start(
    bus: &Bus,
    name: &str,
    version: u64,
    input: serde_json::Value,
) -> anyhow::Result<String> {
    let run_id = event::new_run_id();
    let request = RunEvent::Requested(RunRequested {
        run_id: run_id.clone(),
        workflow: WorkflowRef {
            name: name.to_owned(),
            version,
        },
        input,
        trigger: None,
        parent: None,
    });
    publish(bus, &request).await?;
    Ok(run_id)
}

/// Loads a run from its journal, as the coordinator sees it, with its events.
async fn load(bus: &Bus, run_id: &str) -> anyhow::Result<(Run, Vec<Journaled>)> {
    let (run, _, events) = load_with_workflow(bus, run_id).await?;
    Ok((run, events))
}

/// A run rebuilt from its journal, with its workflow version and its events.
pub async fn load_with_workflow(
    bus: &Bus,
    run_id: &str,
) -> anyhow::Result<(
    Run,
    std::sync::Arc<baton_workflow::Workflow>,
    Vec<Journaled>,
)> {
    if !subjects::is_token(run_id) {
        bail!("{run_id:?} is not a run id: ids are letters, digits, `-` and `_`");
    }
    let p = subjects::partition(run_id, bus.partitions);
    let events = read_journal(&bus.js, subjects::run_all(p, run_id)).await?;
    let Some(Journaled {
        event: RunEvent::Requested(request),
        trace,
        ..
    }) = events.first().cloned()
    else {
        bail!("no run with id {run_id}; ids are printed by `baton run` and in the gateway's log");
    };
    let workflows = baton_core::workflows::Workflows::new(Registry::open(&bus.js).await?);
    let workflow = workflows
        .get(&request.workflow.name, request.workflow.version)
        .await
        .map_err(anyhow::Error::msg)?;
    let trace = trace.unwrap_or_else(|| baton_core::spans::fallback_trace(run_id));
    let mut run = Run::new(&request, &workflow, trace);
    for e in &events {
        run.apply(&e.event);
    }
    Ok((run, workflow, events))
}

/// Asks the coordinator to cancel a run: no step starts any more and completed steps are undone.
pub async fn cancel(bus: &Bus, run_id: &str, reason: String) -> anyhow::Result<()> {
    let (run, _) = load(bus, run_id).await?;
    if run.status.is_terminal() {
        bail!(
            "run {run_id} has already ended ({}); there is nothing to cancel",
            run.status.as_str()
        );
    }
    publish(
        bus,
        &RunEvent::CancelRequested(CancelRequested {
            run_id: run_id.to_owned(),
            reason,
        }),
    )
    .await
}

/// Asks the coordinator to retry the compensation that failed in a `compensation_failed` run.
pub async fn retry_compensation(bus: &Bus, run_id: &str) -> anyhow::Result<()> {
    let (run, _) = load(bus, run_id).await?;
    if run.status != Status::Ended(Ending::CompensationFailed) {
        bail!(
            "run {run_id} is {}; only a compensation_failed run can retry its compensation",
            run.status.as_str()
        );
    }
    let retry = CompensationRetryRequested {
        run_id: run_id.to_owned(),
        round: run.round(),
    };
    publish(bus, &RunEvent::CompensationRetryRequested(retry)).await
}

/// Prints a run's events as they are stored until it ends or `timeout` passes. Returns how it ended.
pub async fn follow(bus: &Bus, run_id: &str, timeout: Duration) -> anyhow::Result<Ending> {
    use async_nats::jetstream::consumer;
    let p = subjects::partition(run_id, bus.partitions);
    let stream = bus.js.get_stream(baton_core::streams::RUNS).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::run_all(p, run_id),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, messages.next()).await;
        let message = match next {
            Err(_) => bail!(
                "run {run_id} has not ended after {}s; it goes on: `baton runs show {run_id}`",
                timeout.as_secs()
            ),
            Ok(None) => bail!("the event stream ended"),
            Ok(Some(m)) => m?,
        };
        let Ok(ce) = binding::decode(message.headers.as_ref(), &message.payload) else {
            continue;
        };
        let Ok(event) = RunEvent::from_message(&message.subject, &ce) else {
            continue;
        };
        println!("  {}", describe(&event));
        if let RunEvent::Ended(ending, end) = event {
            match ending {
                Ending::Succeeded => println!(
                    "Run {run_id} succeeded. Output:\n{}",
                    serde_json::to_string_pretty(&end.output)?
                ),
                other => println!(
                    "Run {run_id} ended {}: {}",
                    Status::Ended(other).as_str(),
                    end.error.as_deref().unwrap_or("")
                ),
            }
            return Ok(ending);
        }
    }
}

/// One line about one event.
fn describe(event: &RunEvent) -> String {
    let item = |i: &Option<u32>| event::item_label(*i);
    match event {
        RunEvent::Requested(r) => {
            format!("run requested: {} v{}", r.workflow.name, r.workflow.version)
        }
        RunEvent::CancelRequested(c) => format!("cancel requested: {}", c.reason),
        RunEvent::CompensationRetryRequested(_) => "compensation retry requested".to_owned(),
        RunEvent::StepRequested(r) => format!(
            "step {}{} requested (attempt {}, kind {})",
            r.step,
            item(&r.item),
            r.attempt,
            r.kind
        ),
        RunEvent::StepStarted(a) | RunEvent::StepHeartbeat(a) => format!(
            "{} {}{} attempt {} {} on {} (delivery {}, {} ms)",
            if a.compensation {
                "compensation of"
            } else {
                "step"
            },
            a.step,
            item(&a.item),
            a.attempt,
            if matches!(event, RunEvent::StepStarted(_)) {
                "started"
            } else {
                "still running"
            },
            a.runner,
            a.delivered,
            a.elapsed_ms
        ),
        RunEvent::StepCompleted(c) => format!(
            "step {}{} completed in {} ms on {}: {}",
            c.step,
            item(&c.item),
            c.duration_ms,
            c.runner,
            c.output
        ),
        RunEvent::StepFailed(f) => format!(
            "step {}{} failed (attempt {}): {}",
            f.step,
            item(&f.item),
            f.attempt,
            f.error.message
        ),
        RunEvent::TimerScheduled(t) => format!("timer {} set for {}", t.name(), t.due),
        RunEvent::TimerFired(t) => format!("timer {} fired", t.name()),
        RunEvent::Compensating(c) => format!(
            "run failed ({}); undoing: {}",
            c.reason,
            if c.plan.is_empty() {
                "nothing yet".to_owned()
            } else {
                c.plan.join(", ")
            }
        ),
        RunEvent::CompensationRequested(r) => {
            format!(
                "compensation of {} requested (attempt {}, kind {})",
                r.step, r.attempt, r.kind
            )
        }
        RunEvent::CompensationCompleted(c) => {
            format!(
                "step {} undone in {} ms on {}",
                c.step, c.duration_ms, c.runner
            )
        }
        RunEvent::CompensationFailed(f) => format!(
            "compensation of {} failed (attempt {}): {}",
            f.step, f.attempt, f.error.message
        ),
        RunEvent::Ended(ending, e) => match &e.error {
            Some(error) => format!("run {}: {error}", Status::Ended(*ending).as_str()),
            None => format!("run {}", Status::Ended(*ending).as_str()),
        },
    }
}

/// Prints a run as its journal tells it.
pub async fn show(bus: &Bus, run_id: &str) -> anyhow::Result<()> {
    let (run, events) = load(bus, run_id).await?;
    let start = events
        .first()
        .map(|e| e.time)
        .unwrap_or_else(chrono::Utc::now);
    println!("Run {run_id}");
    println!(
        "  workflow  {} v{}",
        run.workflow.name, run.workflow.version
    );
    println!("  status    {}", run.status.as_str());
    println!(
        "  started   {}{}",
        start.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        match events.last() {
            Some(last) if run.status.is_terminal() =>
                format!(", ended {} later", offset(last.time - start)),
            _ => String::new(),
        }
    );
    println!("  trace     {}", run.trace.trace_id);
    if let Some(trigger) = &run.trigger {
        println!(
            "  trigger   {} from {} (id {})",
            trigger.ty, trigger.source, trigger.id
        );
    }
    if let Some(parent) = &run.parent {
        println!("  parent    run {} step {}", parent.run_id, parent.step);
    }
    println!("  input     {}", run.input);
    println!("Steps");
    for step in &run.steps {
        let attempts = if step.exec.attempt > 1 {
            format!(", {} attempts", step.exec.attempt)
        } else {
            String::new()
        };
        // A step that failed for good is marked failed by the coordinator's next decision, which a
        // journal replay does not make: its execution says so.
        let gave_up = std::iter::once(&step.exec).chain(&step.items).any(|e| {
            e.state == ExecState::FailedForGood
                || (e.state == ExecState::Failed && run.status != Status::Running)
        });
        let status = if gave_up {
            StepStatus::Failed
        } else {
            step.status
        };
        let mut line = match status {
            StepStatus::Pending => "pending".to_owned(),
            StepStatus::Running => format!("running{attempts}"),
            StepStatus::Completed => format!("completed{attempts}"),
            StepStatus::Failed => {
                let error = step.exec.error.as_ref().map_or("", |e| e.message.as_str());
                format!("failed{attempts}: {error}")
            }
            StepStatus::Skipped => "skipped".to_owned(),
        };
        match step.compensation.state {
            ExecState::Pending => {}
            ExecState::Completed => line.push_str("; undone"),
            ExecState::FailedForGood => line.push_str("; compensation FAILED"),
            _ => line.push_str("; undoing"),
        }
        println!("  {:<20} {line}", step.id);
        for attempt in timeline(&events, &step.id, start) {
            println!("      {attempt}");
        }
    }
    match run.status {
        Status::Ended(Ending::Succeeded) => {
            println!("Output\n{}", serde_json::to_string_pretty(&run.output)?)
        }
        Status::Running => {}
        _ => println!("Error\n  {}", run.error.as_deref().unwrap_or("")),
    }
    if run.status == Status::Ended(Ending::CompensationFailed) {
        println!("Retry the compensation with `baton runs retry-compensation {run_id}`.");
    }
    println!("Events");
    for e in &events {
        println!(
            "  #{:<6} {:>9} {}",
            e.seq,
            offset(e.time - start),
            describe(&e.event)
        );
    }
    Ok(())
}

/// `+1.234s` after the run's start.
fn offset(d: chrono::TimeDelta) -> String {
    format!("+{:.3}s", d.num_milliseconds() as f64 / 1000.0)
}

/// The timeline of a step: each attempt (and compensation attempt) with when it was requested,
/// how long it took, and how it ended.
fn timeline(events: &[Journaled], step: &str, start: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let (request, compensation) = match &e.event {
            RunEvent::StepRequested(r) if r.step == step => (r, false),
            RunEvent::CompensationRequested(r) if r.step == step => (r, true),
            _ => continue,
        };
        let what = format!(
            "{}{} {}",
            if compensation {
                "compensation"
            } else {
                "attempt"
            },
            event::item_label(request.item),
            request.attempt
        );
        let outcome = events[i + 1..]
            .iter()
            .find_map(|o| match (&o.event, compensation) {
                (RunEvent::StepCompleted(c), false)
                | (RunEvent::CompensationCompleted(c), true)
                    if c.step == step && c.item == request.item && c.attempt == request.attempt =>
                {
                    Some((o.time, format!("completed on {}", c.runner)))
                }
                (RunEvent::StepFailed(f), false) | (RunEvent::CompensationFailed(f), true)
                    if f.step == step && f.item == request.item && f.attempt == request.attempt =>
                {
                    let code = f
                        .error
                        .code
                        .as_deref()
                        .map(|c| format!(" [{c}]"))
                        .unwrap_or_default();
                    Some((o.time, format!("failed{code}: {}", f.error.message)))
                }
                _ => None,
            });
        lines.push(match outcome {
            Some((end, how)) => format!(
                "{what:<16} {:>9}  {:>7} ms  {how}",
                offset(e.time - start),
                (end - e.time).num_milliseconds()
            ),
            None => format!("{what:<16} {:>9}  running", offset(e.time - start)),
        });
    }
    lines
}

/// Decides an approval step that is waiting: publishes `dev.baton.approval.decided` on
/// `baton.events.cli` once the step is known to wait and `by` may decide it.
pub async fn decide(
    bus: &Bus,
    run_id: &str,
    step: &str,
    approved: bool,
    by: String,
    comment: String,
) -> anyhow::Result<()> {
    use baton_coordinator::waits::{self, WaitEntry};
    use cloudevents::{EventBuilder, EventBuilderV10};
    let (run, _) = load(bus, run_id).await?;
    if run.status.is_terminal() {
        bail!(
            "run {run_id} has already ended ({}); there is nothing to decide",
            run.status.as_str()
        );
    }
    let bucket = bus
        .js
        .get_key_value(baton_core::streams::WAITS_BUCKET)
        .await?;
    let entry: Option<WaitEntry> = bucket
        .get(waits::key(run_id, step, None))
        .await?
        .and_then(|v| serde_json::from_slice(&v).ok());
    let Some(entry) = entry.filter(|e| e.kind == "approval") else {
        bail!(
            "step {step} of run {run_id} is not waiting for an approval; `baton runs show {run_id}` shows where the run is"
        );
    };
    let workflows = baton_core::workflows::Workflows::new(Registry::open(&bus.js).await?);
    let workflow = workflows
        .get(&entry.workflow.name, entry.workflow.version)
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(baton_workflow::Action::Approval(approval)) = workflow
        .steps
        .iter()
        .find(|s| s.id == step)
        .map(|s| &s.action)
        && !approval.approvers.is_empty()
        && !approval.approvers.contains(&by)
    {
        bail!(
            "{by} may not decide step {step}: its approvers are {}. Pass --by with one of them",
            approval.approvers.join(", ")
        );
    }
    let decision = event::ApprovalDecided {
        run_id: run_id.to_owned(),
        step: step.to_owned(),
        approved,
        by,
        comment,
    };
    let ce = EventBuilderV10::new()
        .id(event::new_run_id())
        .source("baton/cli")
        .ty(event::types::APPROVAL_DECIDED)
        .subject(format!("{run_id}/{step}"))
        .time(chrono::Utc::now())
        .data("application/json", serde_json::to_value(&decision)?)
        .build()?;
    baton_gateway::ingress::store(&bus.js, "cli", &[ce])
        .await
        .map_err(|e| anyhow::anyhow!("the decision was not stored: {e}"))?;
    Ok(())
}

/// One run in `baton runs list`.
struct Row {
    workflow: String,
    version: u64,
    started: chrono::DateTime<chrono::Utc>,
    status: Status,
    ended: Option<chrono::DateTime<chrono::Utc>>,
}

/// Prints runs, oldest first: started within `since` (all when `None`), of `workflow`, with
/// `status`, at most the last `limit`.
pub async fn list(
    bus: &Bus,
    workflow: Option<&str>,
    status: Option<&str>,
    since: Option<Duration>,
    limit: usize,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{self, DeliverPolicy};
    if let Some(s) = status {
        let known = ["running", "compensating"]
            .into_iter()
            .chain(Ending::ALL.map(|e| Status::Ended(e).as_str()))
            .collect::<Vec<_>>();
        if !known.contains(&s) {
            bail!(
                "--status {s:?} is not a status: use one of {}",
                known.join(", ")
            );
        }
    }
    let mut filters = vec![
        format!("{}.*.*.run.requested", subjects::RUNS),
        format!("{}.*.*.run.compensating", subjects::RUNS),
    ];
    filters.extend(
        Ending::ALL
            .iter()
            .map(|e| format!("{}.*.*.run.{}", subjects::RUNS, e.verb())),
    );
    let deliver_policy = match since {
        Some(d) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::now_utc() - d,
        },
        None => DeliverPolicy::All,
    };
    let config = consumer::pull::OrderedConfig {
        filter_subjects: filters,
        deliver_policy,
        ..Default::default()
    };
    let messages = baton_core::streams::read(&bus.js, baton_core::streams::RUNS, config)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut rows: std::collections::HashMap<String, Row> = std::collections::HashMap::new();
    for message in messages {
        let info = message.info().map_err(anyhow::Error::msg)?;
        let time =
            chrono::DateTime::from_timestamp_nanos(info.published.unix_timestamp_nanos() as i64);
        let Ok(event) = binding::decode(message.headers.as_ref(), &message.payload)
            .map_err(|e| e.to_string())
            .and_then(|ce| {
                RunEvent::from_message(&message.subject, &ce).map_err(|e| e.to_string())
            })
        else {
            continue;
        };
        match event {
            RunEvent::Requested(r) => {
                rows.entry(r.run_id).or_insert(Row {
                    workflow: r.workflow.name,
                    version: r.workflow.version,
                    started: time,
                    status: Status::Running,
                    ended: None,
                });
            }
            RunEvent::Compensating(c) => {
                if let Some(row) = rows.get_mut(&c.run_id)
                    && row.ended.is_none()
                {
                    row.status = Status::Compensating;
                }
            }
            RunEvent::Ended(ending, e) => {
                if let Some(row) = rows.get_mut(&e.run_id) {
                    row.status = Status::Ended(ending);
                    row.ended = Some(time);
                }
            }
            _ => {}
        }
    }
    let mut rows: Vec<(String, Row)> = rows
        .into_iter()
        .filter(|(_, r)| workflow.is_none_or(|w| r.workflow == w))
        .filter(|(_, r)| status.is_none_or(|s| r.status.as_str() == s))
        .collect();
    rows.sort_by_key(|(id, r)| (r.started, id.clone()));
    let skip = rows.len().saturating_sub(limit);
    println!(
        "{:<28} {:<24} {:<20} {:<24} DURATION",
        "RUN", "WORKFLOW", "STATUS", "STARTED"
    );
    for (id, r) in rows.into_iter().skip(skip) {
        let duration = r.ended.unwrap_or_else(chrono::Utc::now) - r.started;
        let duration = format!("{:.1}s", duration.num_milliseconds() as f64 / 1000.0);
        println!(
            "{id:<28} {:<24} {:<20} {:<24} {duration}",
            format!("{} v{}", r.workflow, r.version),
            r.status.as_str(),
            r.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
    }
    Ok(())
}

/// Prints a run's trace as an OTLP/JSON `ExportTraceServiceRequest`: the spans the services export
/// live (same ids), rebuilt from the journal.
pub async fn trace(bus: &Bus, run_id: &str) -> anyhow::Result<()> {
    let (_, workflow, events) = load_with_workflow(bus, run_id).await?;
    let entries: Vec<_> = events.iter().map(Journaled::entry).collect();
    let spans = baton_core::spans::from_journal(&entries, &workflow);
    println!(
        "{}",
        serde_json::to_string(&baton_core::telemetry::otlp_json(&spans))?
    );
    Ok(())
}

/// Prints a run's CloudEvents exactly as stored, one JSON event (structured format) per line.
pub async fn events(bus: &Bus, run_id: &str) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer;
    if !subjects::is_token(run_id) {
        bail!("{run_id:?} is not a run id: ids are letters, digits, `-` and `_`");
    }
    let p = subjects::partition(run_id, bus.partitions);
    let config = consumer::pull::OrderedConfig {
        filter_subject: subjects::run_all(p, run_id),
        ..Default::default()
    };
    let messages = baton_core::streams::read(&bus.js, baton_core::streams::RUNS, config)
        .await
        .map_err(anyhow::Error::msg)?;
    if messages.is_empty() {
        bail!("no run with id {run_id}");
    }
    for message in messages {
        match binding::decode(message.headers.as_ref(), &message.payload) {
            Ok(ce) => println!("{}", String::from_utf8_lossy(&binding::json::encode(&ce))),
            Err(e) => eprintln!("(not a valid CloudEvent on {}: {e})", message.subject),
        }
    }
    Ok(())
}
