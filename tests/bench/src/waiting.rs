//! The coordinator with many runs in flight, each waiting on an event, and how long a coordinator
//! restarted after `kill -9` takes to resume them.
//!
//! Resumed means: every partition of the journal has been rebuilt by the new coordinator and is
//! handling new events. It is measured with one probe run per partition (workflow `bench-probe`,
//! a `wait` for a `dev.baton.bench.probe` event keyed by the run). Right after the kill, the new
//! coordinator is started and one probe event per probe run is published; the resume time runs
//! from the kill until the last probe run's `run.succeeded` is seen. A partition handles its probe
//! only after it took ownership (the dead instance's pin expires after `takeover_after`, 5 s) and
//! replayed its journal, so the figure includes both; the coordinator's log gives each part.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_core::Bus;
use futures::StreamExt;
use serde::Serialize;

use crate::baton::{self, Endings, Workflow};
use crate::procs::{self, Durability, Memory, NatsServer, Service};
use crate::stats::round;

#[derive(Debug, Clone, Serialize)]
pub struct Waiting {
    /// Waiting runs of `bench-wait`, plus one probe run per partition.
    pub runs: u64,
    pub probes: u64,
    /// From the first `run.requested` published until every run waits (its wait is registered).
    pub start_seconds: f64,
    pub coordinator_idle: Memory,
    pub coordinator_waiting: Memory,
    /// (RSS with every run waiting - RSS idle) / runs.
    pub bytes_per_waiting_run: f64,
    pub nats_server: Memory,
    /// What the waiting runs stored: the journal's messages and the waits bucket's entries.
    pub journal_messages: u64,
    pub journal_bytes: u64,
    pub wait_entries: u64,
    pub resume: Resume,
    /// The restarted coordinator once it has resumed every partition.
    pub coordinator_resumed: Memory,
    /// One `dev.baton.bench.release` event published until the run it releases has succeeded, with
    /// every other run still waiting for an event of the same type.
    pub release_one_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Resume {
    /// `kill -9` of the coordinator until every probe run has succeeded.
    pub seconds: f64,
    /// `kill -9` until the new coordinator first took ownership of a partition.
    pub first_ownership_s: f64,
    /// `kill -9` until the last partition was rebuilt.
    pub last_rebuilt_s: f64,
    pub partitions_rebuilt: u64,
    /// Journal events replayed and live runs rebuilt, summed over the partitions.
    pub events_replayed: u64,
    pub live_runs_rebuilt: u64,
}

pub async fn measure(
    baton_bin: &std::path::Path,
    runs: u64,
    logs: Option<&std::path::Path>,
) -> anyhow::Result<Waiting> {
    let server = NatsServer::start(Durability::Default)?;
    let bus = baton::connect(&server.url).await?;
    let wait = baton::apply(&bus, baton::WAIT).await?;
    let probe = baton::apply(&bus, baton::PROBE).await?;
    let endings = Endings::start(&bus.client).await?;
    let logs = procs::log_dir(logs, &server, "waiting")?;

    let mut coordinator = Service::start(
        baton_bin,
        "coordinator",
        &["coordinator"],
        &server.url,
        &logs,
    )?;
    coordinator
        .wait_for("coordinator started", Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator_idle = procs::memory(coordinator.pid());

    // One probe run per partition.
    let mut probes = Vec::new();
    for p in 0..bus.partitions {
        let id = (0..)
            .map(|j| format!("probe-{j}"))
            .find(|id| {
                baton_core::subjects::partition(id, bus.partitions) == p
                    && !probes.iter().any(|(other, _)| other == id)
            })
            .expect("some id lands in every partition");
        probes.push((id, p));
    }
    let total = runs + probes.len() as u64;

    eprintln!("  starting {runs} waiting runs ...");
    let t = Instant::now();
    publish_requests(&bus, &wait, runs).await?;
    for (id, _) in &probes {
        baton::request(&bus, &probe, id, serde_json::json!({ "k": id }))
            .await?
            .await?;
    }
    let waits_stream = format!("KV_{}", baton_core::streams::WAITS_BUCKET);
    let deadline = Instant::now() + Duration::from_secs(30 + runs / 200);
    loop {
        let entries = bus
            .js
            .get_stream(&waits_stream)
            .await?
            .get_info()
            .await?
            .state
            .messages;
        if entries >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {entries} of {total} runs wait after {:?}",
                t.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_seconds = t.elapsed().as_secs_f64();
    eprintln!("  {total} runs wait after {start_seconds:.1} s");
    // Let the last acks and the allocator settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let coordinator_waiting = procs::memory(coordinator.pid());
    let nats_server = procs::memory(server.pid());
    let journal = bus
        .js
        .get_stream(baton_core::streams::RUNS)
        .await?
        .get_info()
        .await?
        .state;
    let wait_entries = bus
        .js
        .get_stream(&waits_stream)
        .await?
        .get_info()
        .await?
        .state
        .messages;

    // kill -9, start a new coordinator at once, and probe every partition.
    let probe_endings: Vec<_> = probes.iter().map(|(id, _)| endings.expect(id)).collect();
    coordinator.kill();
    let killed = Instant::now();
    let restarted = Service::start(
        baton_bin,
        "coordinator-restarted",
        &["coordinator"],
        &server.url,
        &logs,
    )?;
    for (id, _) in &probes {
        publish_event(&bus, "dev.baton.bench.probe", id).await?;
    }
    let mut last = killed;
    for (ended, (id, _)) in probe_endings.into_iter().zip(&probes) {
        let (verb, at) = tokio::time::timeout(Duration::from_secs(300), ended)
            .await
            .with_context(|| format!("probe run {id} did not end within 300 s of the restart"))?
            .context("probe lost")?;
        if verb != "succeeded" {
            bail!("probe run {id} ended {verb}");
        }
        last = last.max(at);
    }
    let mut resume = Resume {
        seconds: round((last - killed).as_secs_f64(), 3),
        first_ownership_s: 0.0,
        last_rebuilt_s: 0.0,
        partitions_rebuilt: 0,
        events_replayed: 0,
        live_runs_rebuilt: 0,
    };
    let mut first_ownership = None::<Instant>;
    for (at, line) in restarted.lines() {
        if line.contains("took ownership") {
            first_ownership = Some(first_ownership.map_or(at, |f| f.min(at)));
        }
        if line.contains("rebuilt partition") {
            resume.partitions_rebuilt += 1;
            resume.last_rebuilt_s = resume
                .last_rebuilt_s
                .max(round((at - killed).as_secs_f64(), 3));
            let fields = serde_json::from_str::<serde_json::Value>(&line).unwrap_or_default();
            let number = |name: &str| fields["fields"][name].as_u64().unwrap_or(0);
            resume.events_replayed += number("events");
            resume.live_runs_rebuilt += number("live_runs");
        }
    }
    resume.first_ownership_s = first_ownership
        .map(|f| round((f - killed).as_secs_f64(), 3))
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator_resumed = procs::memory(restarted.pid());

    // One event for one of the waiting runs, every other run waiting for the same type.
    let released = "w0";
    let ended = endings.expect(released);
    let t = Instant::now();
    publish_event(&bus, "dev.baton.bench.release", released).await?;
    let (verb, at) = tokio::time::timeout(Duration::from_secs(120), ended)
        .await
        .context("the released run did not end within 120 s")?
        .context("release lost")?;
    if verb != "succeeded" {
        bail!("the released run ended {verb}");
    }
    let release_one_ms = round((at - t).as_secs_f64() * 1000.0, 1);
    drop(restarted);
    drop(server);
    Ok(Waiting {
        runs,
        probes: probes.len() as u64,
        start_seconds: round(start_seconds, 2),
        coordinator_idle,
        coordinator_waiting,
        bytes_per_waiting_run: round(
            (coordinator_waiting
                .rss_kib
                .saturating_sub(coordinator_idle.rss_kib)
                * 1024) as f64
                / total as f64,
            0,
        ),
        nats_server,
        journal_messages: journal.messages,
        journal_bytes: journal.bytes,
        wait_entries,
        resume,
        coordinator_resumed,
        release_one_ms,
    })
}

/// `run.requested` for `runs` runs of the wait workflow (ids and keys `w<i>`), straight to
/// JetStream with up to 1024 acks pending.
async fn publish_requests(bus: &Bus, wf: &Workflow, runs: u64) -> anyhow::Result<()> {
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..runs {
        let id = format!("w{i}");
        let ack = baton::request(bus, wf, &id, serde_json::json!({ "k": id })).await?;
        pending.push(std::future::IntoFuture::into_future(ack));
        if pending.len() >= 1024
            && let Some(done) = pending.next().await
        {
            done?;
        }
    }
    while let Some(done) = pending.next().await {
        done?;
    }
    Ok(())
}

/// An external event (structured CloudEvent) whose data's `k` is `key`, on `baton.events.bench`.
async fn publish_event(bus: &Bus, ty: &str, key: &str) -> anyhow::Result<()> {
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": format!("{ty}-{key}"),
        "source": "bench",
        "type": ty,
        "datacontenttype": "application/json",
        "data": { "k": key },
    });
    bus.js
        .publish("baton.events.bench", serde_json::to_vec(&event)?.into())
        .await?
        .await?;
    Ok(())
}
