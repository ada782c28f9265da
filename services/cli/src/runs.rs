//! Commands that talk to a running Baton: apply workflows, start, follow and show runs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_coordinator::saga::{Run, Status, StepStatus};
use baton_coordinator::service::{Journaled, read_journal};
use baton_core::event::{self, RunEvent, RunRequested, WorkflowRef};
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
    });
    let (headers, body) =
        binding::encode(&request.to_cloudevent("baton/cli", &baton_core::trace::Trace::new()));
    bus.js
        .publish_with_headers(request.subject(bus.partitions, ""), headers, body)
        .await?
        .await
        .context("the run request was not stored")?;
    Ok(run_id)
}

/// Prints a run's events as they are stored until it ends or `timeout` passes. Returns whether the
/// run succeeded.
pub async fn follow(bus: &Bus, run_id: &str, timeout: Duration) -> anyhow::Result<bool> {
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
        let Ok(event) = RunEvent::from_cloudevent(&ce) else {
            continue;
        };
        println!("  {}", describe(&event));
        match event {
            RunEvent::Succeeded(s) => {
                println!(
                    "Run {run_id} succeeded. Output:\n{}",
                    serde_json::to_string_pretty(&s.output)?
                );
                return Ok(true);
            }
            RunEvent::Failed(f) => {
                println!("Run {run_id} failed: {}", f.error);
                return Ok(false);
            }
            _ => {}
        }
    }
}

/// One line about one event.
fn describe(event: &RunEvent) -> String {
    match event {
        RunEvent::Requested(r) => {
            format!("run requested: {} v{}", r.workflow.name, r.workflow.version)
        }
        RunEvent::CancelRequested(c) => format!("cancel requested: {}", c.reason),
        RunEvent::StepRequested(r) => format!(
            "step {} requested (attempt {}, kind {})",
            r.step, r.attempt, r.kind
        ),
        RunEvent::StepCompleted(c) => {
            format!(
                "step {} completed in {} ms on {}: {}",
                c.step, c.duration_ms, c.runner, c.output
            )
        }
        RunEvent::StepFailed(f) => format!(
            "step {} failed (attempt {}): {}",
            f.step, f.attempt, f.error.message
        ),
        RunEvent::Succeeded(_) => "run succeeded".to_owned(),
        RunEvent::Failed(f) => format!("run failed: {}", f.error),
    }
}

/// Prints a run as its journal tells it.
pub async fn show(bus: &Bus, run_id: &str) -> anyhow::Result<()> {
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
    let workflows = baton_coordinator::workflows::Workflows::new(Registry::open(&bus.js).await?);
    let workflow = workflows
        .get(&request.workflow.name, request.workflow.version)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut run = Run::new(&request, &workflow, trace.unwrap_or_default());
    for e in &events {
        run.apply(&e.event);
    }
    println!("Run {run_id}");
    println!(
        "  workflow  {} v{}",
        run.workflow.name, run.workflow.version
    );
    println!("  status    {}", run.status.as_str());
    println!("  trace     {}", run.trace.trace_id);
    if let Some(trigger) = &run.trigger {
        println!(
            "  trigger   {} from {} (id {})",
            trigger.ty, trigger.source, trigger.id
        );
    }
    println!("  input     {}", run.input);
    println!("Steps");
    for step in &run.steps {
        let status = match &step.status {
            StepStatus::Pending => "pending".to_owned(),
            StepStatus::Requested { attempt } => format!("running (attempt {attempt})"),
            StepStatus::Completed { attempt } => format!("completed (attempt {attempt})"),
            StepStatus::Failed { attempt, error } => format!("failed (attempt {attempt}): {error}"),
            StepStatus::Skipped => "skipped".to_owned(),
        };
        println!("  {:<20} {status}", step.id);
    }
    match run.status {
        Status::Succeeded => println!("Output\n{}", serde_json::to_string_pretty(&run.output)?),
        Status::Failed => println!("Error\n  {}", run.error.as_deref().unwrap_or("")),
        Status::Running => {}
    }
    println!("Events");
    for e in &events {
        println!("  #{:<6} {}", e.seq, describe(&e.event));
    }
    Ok(())
}
