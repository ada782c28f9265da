//! Baton's workloads: closed-loop runs of a workflow at a given concurrency against the real
//! `baton coordinator` and `baton runner` processes, measured from the journal itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use baton_core::event::{RunEvent, RunRequested, WorkflowRef};
use baton_core::registry::Registry;
use baton_core::streams::Topology;
use baton_core::trace::Trace;
use baton_core::{Bus, binding};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::procs;
use crate::stats::{self, round};

pub const LINEAR: &str = include_str!("../workflows/linear.yaml");
pub const DAG: &str = include_str!("../workflows/dag.yaml");
pub const WAIT: &str = include_str!("../workflows/wait.yaml");
pub const PROBE: &str = include_str!("../workflows/probe.yaml");

const SOURCE: &str = "baton/bench";
/// The last token of the subject of each event that ends a run.
const ENDINGS: &[&str] = &[
    "succeeded",
    "failed",
    "cancelled",
    "compensated",
    "compensation-failed",
];

/// A workflow stored in the registry.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub name: String,
    pub version: u64,
    pub steps: u32,
}

/// Connects as a client (setting up Baton's streams on a fresh server).
pub async fn connect(url: &str) -> anyhow::Result<Bus> {
    Ok(baton_core::connect(url, "baton-bench", &Topology::default()).await?)
}

/// Compiles a workflow and stores it in the registry.
pub async fn apply(bus: &Bus, source: &str) -> anyhow::Result<Workflow> {
    let compiled = baton_workflow::compile(source)
        .map_err(|p| anyhow::anyhow!("a bench workflow does not compile: {p:?}"))?;
    let registry = Registry::open(&bus.js).await?;
    let (version, _) = registry.apply(&compiled.name, source, Vec::new()).await?;
    Ok(Workflow {
        name: compiled.name.clone(),
        version,
        steps: compiled.steps.len() as u32,
    })
}

/// Publishes a `run.requested` and returns the ack future, so callers choose how many to keep in
/// flight.
pub async fn request(
    bus: &Bus,
    wf: &Workflow,
    run_id: &str,
    input: serde_json::Value,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let event = RunEvent::Requested(RunRequested {
        run_id: run_id.to_owned(),
        workflow: WorkflowRef {
            name: wf.name.clone(),
            version: wf.version,
        },
        input,
        trigger: None,
        parent: None,
    });
    let (headers, body) = binding::encode(&event.to_cloudevent(SOURCE, &Trace::new()));
    Ok(bus
        .js
        .publish_with_headers(event.subject(bus.partitions), headers, body)
        .await?)
}

/// Tells waiting callers when their run ends, from a core NATS subscription to the journal's
/// run-level subjects (the end event is seen as it is stored).
#[derive(Clone)]
pub struct Endings {
    waiters: Arc<Mutex<HashMap<String, oneshot::Sender<Ending>>>>,
}

/// How a run ended (the last token of its end event's subject) and when the bench saw it.
pub type Ending = (String, Instant);

impl Endings {
    pub async fn start(client: &async_nats::Client) -> anyhow::Result<Endings> {
        let mut sub = client.subscribe("baton.run.*.*.run.>").await?;
        let endings = Endings {
            waiters: Arc::default(),
        };
        let waiters = endings.waiters.clone();
        tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                let now = Instant::now();
                let tokens: Vec<&str> = message.subject.split('.').collect();
                if tokens.len() != 6 || !ENDINGS.contains(&tokens[5]) {
                    continue;
                }
                let waiter = waiters.lock().expect("not poisoned").remove(tokens[3]);
                if let Some(tx) = waiter {
                    let _ = tx.send((tokens[5].to_owned(), now));
                }
            }
        });
        // Make sure the server has the subscription before anything is published.
        client.flush().await?;
        Ok(endings)
    }

    /// Call before requesting the run.
    pub fn expect(&self, run_id: &str) -> oneshot::Receiver<Ending> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("not poisoned")
            .insert(run_id.to_owned(), tx);
        rx
    }

    pub fn forget(&self, run_id: &str) {
        self.waiters.lock().expect("not poisoned").remove(run_id);
    }
}

/// The processes whose CPU time is counted.
pub type Pids = Vec<(String, u32)>;

/// One workload's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub workflow: String,
    pub steps: u32,
    pub concurrency: usize,
    /// Runs that ended within the measured window (after the warm-up).
    pub runs: u64,
    pub seconds: f64,
    pub runs_per_s: f64,
    /// Step transitions per second: runs/s times steps per run.
    pub steps_per_s: f64,
    /// End to end, `run.requested` stored to `run.succeeded` stored (the journal's timestamps),
    /// over the runs requested within the window.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// As the bench saw it: publishing `run.requested` until it received `run.succeeded` (the
    /// way Restate's figures are taken, from its HTTP client).
    pub client_p50_ms: f64,
    pub client_p99_ms: f64,
    /// Median time between consecutive events of a run in the journal, by pair of event types
    /// (`dev.baton.` left out), over the runs requested within the window: who reacts how fast.
    /// `run.requested -> step.requested` and `step.completed -> step.requested` are the
    /// coordinator's reaction, `step.requested -> step.completed` the runner's.
    pub gap_p50_ms: BTreeMap<String, f64>,
    /// Steps per second divided by raw hops per second at the same concurrency.
    pub efficiency: f64,
    /// Every run of the workload, warm-up included; all of them are counted below.
    pub total_runs: u64,
    pub failed_runs: u64,
    /// Messages stored in `BATON_RUNS` (its sequence numbers) per step.
    pub writes_per_step: f64,
    pub writes_per_run: f64,
    /// The same, per event type, per run.
    pub writes_per_run_by_type: BTreeMap<String, f64>,
    /// Messages stored in every other stream (KV buckets included) per run.
    pub other_writes_per_run: f64,
    /// CPU time per run of each process (user + system).
    pub cpu_ms_per_run: BTreeMap<String, f64>,
    /// CPU used by everything else on the machine while the workload ran, in % of all its cores:
    /// other people's work competing with the bench (0 on a quiet machine).
    pub other_cpu_pct: f64,
}

struct Record {
    id: String,
    requested: Instant,
    outcome: Option<Ending>,
}

/// Runs `wf` closed-loop with `concurrency` runs in flight for `warmup + window`, then waits until
/// every run has ended and reads the journal range it wrote.
pub async fn workload(
    bus: &Bus,
    endings: &Endings,
    wf: &Workflow,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    pids: &Pids,
) -> anyhow::Result<Workload> {
    let runs_before = last_sequence(&bus.js, baton_core::streams::RUNS).await?;
    let others_before = other_sequences(&bus.js).await?;
    let cpu_before: Vec<Duration> = pids.iter().map(|(_, p)| procs::cpu_time(*p)).collect();
    let (busy_before, began) = (procs::machine_busy(), Instant::now());
    let start = Instant::now() + warmup;
    let end = start + window;
    let workers = (0..concurrency).map(|_| {
        let (bus, endings, wf) = (bus.clone(), endings.clone(), wf.clone());
        tokio::spawn(async move {
            let mut records = Vec::new();
            while Instant::now() < end {
                let id = ulid::Ulid::generate().to_string();
                let ended = endings.expect(&id);
                let requested = Instant::now();
                request(&bus, &wf, &id, serde_json::json!({}))
                    .await?
                    .await
                    .context("run.requested was not stored")?;
                let outcome = match tokio::time::timeout(Duration::from_secs(60), ended).await {
                    Ok(Ok(outcome)) => Some(outcome),
                    _ => {
                        endings.forget(&id);
                        None
                    }
                };
                records.push(Record {
                    id,
                    requested,
                    outcome,
                });
            }
            Ok::<_, anyhow::Error>(records)
        })
    });
    let mut records = Vec::new();
    for worker in futures::future::join_all(workers).await {
        records.extend(worker??);
    }
    let cpu_after: Vec<Duration> = pids.iter().map(|(_, p)| procs::cpu_time(*p)).collect();
    let (busy, wall) = (procs::machine_busy() - busy_before, began.elapsed());
    let ours: Duration = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| *a - *b)
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let other_cpu_pct =
        (busy.saturating_sub(ours).as_secs_f64() / (wall.as_secs_f64() * cores) * 100.0).max(0.0);
    // Every run has ended (or timed out). A subscriber can see an end event before JetStream has
    // stored it (with `sync_interval: always` the fsync comes first): wait until the journal is
    // still for a moment, then what the runs stored is final.
    let mut runs_after = last_sequence(&bus.js, baton_core::streams::RUNS).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = last_sequence(&bus.js, baton_core::streams::RUNS).await?;
        if now == runs_after {
            break;
        }
        runs_after = now;
    }
    let others_after = other_sequences(&bus.js).await?;
    let journal = read_range(&bus.js, runs_before + 1, runs_after).await?;

    let total_runs = records.len() as u64;
    let succeeded = |r: &Record| matches!(&r.outcome, Some((verb, _)) if verb == "succeeded");
    let failed_runs = records.iter().filter(|r| !succeeded(r)).count() as u64;
    let runs = records
        .iter()
        .filter(|r| matches!(r.outcome, Some((_, at)) if at > start && at <= end))
        .count() as u64;
    let in_window: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| succeeded(r) && r.requested >= start && r.requested < end)
        .map(|r| r.id.as_str())
        .collect();
    let mut client: Vec<Duration> = records
        .iter()
        .filter(|r| in_window.contains(r.id.as_str()))
        .filter_map(|r| r.outcome.as_ref().map(|(_, at)| *at - r.requested))
        .collect();
    let mut latencies = Vec::new();
    let mut events: HashMap<&str, Vec<(i128, &str)>> = HashMap::new();
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for m in &journal {
        *by_type.entry(m.ty.clone()).or_default() += 1;
        if in_window.contains(m.run.as_str()) {
            let ty = m.ty.strip_prefix("dev.baton.").unwrap_or(&m.ty);
            events
                .entry(m.run.as_str())
                .or_default()
                .push((m.stored_ns, ty));
        }
    }
    let mut gaps: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for run in events.values() {
        // In journal order (sequence), which is also stored-time order.
        let from = run.iter().find(|(_, t)| *t == "run.requested");
        let to = run.iter().find(|(_, t)| *t == "run.succeeded");
        if let (Some((from, _)), Some((to, _))) = (from, to) {
            latencies.push(Duration::from_nanos((to - from).max(0) as u64));
        }
        for pair in run.windows(2) {
            let ((a, ta), (b, tb)) = (pair[0], pair[1]);
            gaps.entry(format!("{ta} -> {tb}"))
                .or_default()
                .push(Duration::from_nanos((b - a).max(0) as u64));
        }
    }
    let gap_p50_ms = gaps
        .into_iter()
        .map(|(k, mut v)| (k, round(stats::percentile_ms(&mut v, 0.5), 3)))
        .collect();
    let seconds = window.as_secs_f64();
    let runs_per_s = runs as f64 / seconds;
    let stored = runs_after - runs_before;
    let per_run = |n: u64| round(n as f64 / total_runs.max(1) as f64, 3);
    let other_writes: u64 = others_after
        .iter()
        .map(|(name, seq)| seq - others_before.get(name).copied().unwrap_or(0))
        .sum();
    let cpu_ms_per_run = pids
        .iter()
        .zip(cpu_before.iter().zip(&cpu_after))
        .map(|((name, _), (b, a))| {
            (
                name.clone(),
                round(
                    (*a - *b).as_secs_f64() * 1000.0 / total_runs.max(1) as f64,
                    3,
                ),
            )
        })
        .collect();
    Ok(Workload {
        workflow: wf.name.clone(),
        steps: wf.steps,
        concurrency,
        runs,
        seconds,
        runs_per_s: round(runs_per_s, 1),
        steps_per_s: round(runs_per_s * f64::from(wf.steps), 1),
        p50_ms: round(stats::percentile_ms(&mut latencies, 0.50), 3),
        p99_ms: round(stats::percentile_ms(&mut latencies, 0.99), 3),
        client_p50_ms: round(stats::percentile_ms(&mut client, 0.50), 3),
        client_p99_ms: round(stats::percentile_ms(&mut client, 0.99), 3),
        gap_p50_ms,
        efficiency: 0.0,
        total_runs,
        failed_runs,
        writes_per_step: round(
            stored as f64 / (total_runs.max(1) * u64::from(wf.steps)) as f64,
            3,
        ),
        writes_per_run: per_run(stored),
        writes_per_run_by_type: by_type.into_iter().map(|(k, v)| (k, per_run(v))).collect(),
        other_writes_per_run: per_run(other_writes),
        cpu_ms_per_run,
        other_cpu_pct: round(other_cpu_pct, 1),
    })
}

/// The last sequence number of a stream: how many messages it has ever stored.
pub async fn last_sequence(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js
        .get_stream(stream)
        .await?
        .get_info()
        .await?
        .state
        .last_sequence)
}

/// The last sequence of every stream but the journal and the bench's own.
async fn other_sequences(js: &jetstream::Context) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut names = js.stream_names();
    let mut out = BTreeMap::new();
    while let Some(name) = names.next().await {
        let name = name?;
        if name == baton_core::streams::RUNS || name.starts_with("BENCH") {
            continue;
        }
        out.insert(name.clone(), last_sequence(js, &name).await?);
    }
    Ok(out)
}

/// A journal message: its run, CloudEvent type and when the server stored it.
pub struct Stored {
    pub run: String,
    pub ty: String,
    pub stored_ns: i128,
}

/// Reads the journal's messages `first..=last` (headers only).
pub async fn read_range(
    js: &jetstream::Context,
    first: u64,
    last: u64,
) -> anyhow::Result<Vec<Stored>> {
    let mut out = Vec::new();
    if last < first {
        return Ok(out);
    }
    let stream = js.get_stream(baton_core::streams::RUNS).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "baton.run.>".into(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            headers_only: true,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = info.stream_sequence;
        if seq > last {
            break;
        }
        let ty = message
            .headers
            .as_ref()
            .and_then(|h| h.get("ce-type"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| "(no ce-type)".into());
        let run = message
            .subject
            .split('.')
            .nth(3)
            .unwrap_or_default()
            .to_owned();
        out.push(Stored {
            run,
            ty,
            stored_ns: info.published.unix_timestamp_nanos(),
        });
        if seq == last {
            break;
        }
    }
    if out.is_empty() {
        bail!("the journal range {first}..={last} could not be read");
    }
    Ok(out)
}
