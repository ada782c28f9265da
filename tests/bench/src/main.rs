//! `baton-bench`: Baton against the raw JetStream limit (and, with `--restate`, against Restate) in
//! the same run, on the same machine. See `docs/performance.md` for what each figure means.
//!
//! ```sh
//! cargo run --release -p baton-bench -- [--quick] [--out bench.json] [--restate]
//! ```

mod baton;
mod procs;
mod raw;
mod report;
mod stats;
mod waiting;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::procs::{Durability, NatsServer, Service};

#[derive(Parser)]
#[command(
    name = "baton-bench",
    about = "Baton against the raw JetStream hop and Restate, in one run"
)]
struct Args {
    /// Short windows and 10,000 waiting runs instead of 100,000: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// Also run `tests/bench/restate/run.sh` (installs Restate from npm) and show its figures.
    #[arg(long)]
    restate: bool,
    /// Waiting runs for the coordinator memory and resume figures (default 100,000; 10,000 with --quick).
    #[arg(long)]
    waiting: Option<u64>,
    /// Seconds each Baton workload is measured, after a warm-up of a fifth of it (default 20; 5
    /// with --quick).
    #[arg(long)]
    window: Option<u64>,
    /// Only the default durability mode (skip `sync_interval: always`).
    #[arg(long)]
    default_only: bool,
    /// Measure only this part: `modes` (raw baseline and workloads) or `waiting` (waiting runs
    /// and the coordinator's resume).
    #[arg(long, value_parser = ["modes", "waiting"])]
    only: Option<String>,
    /// Keep the services' logs (JSON lines) in this directory, one file per process and phase;
    /// by default they go to the temporary directory of each nats-server and are removed with it.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// The `baton` binary to run (default: target/release/baton, built first).
    #[arg(long)]
    baton_bin: Option<PathBuf>,
    /// Do not run `cargo build --release -p baton` first.
    #[arg(long)]
    no_build: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let baton_bin = procs::baton_binary(args.baton_bin.clone(), !args.no_build)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, baton_bin))
}

async fn run(args: Args, baton_bin: PathBuf) -> anyhow::Result<()> {
    let window = Duration::from_secs(args.window.unwrap_or(if args.quick { 5 } else { 20 }));
    let waiting_runs = args
        .waiting
        .unwrap_or(if args.quick { 10_000 } else { 100_000 });
    let mut report = report::Report::new(args.quick, &baton_bin);
    eprintln!(
        "baton-bench: {} cores, load {:?}, {}",
        report.machine.nproc, report.machine.load_before, report.machine.nats_server
    );
    let modes: &[Durability] = if args.default_only {
        &[Durability::Default]
    } else {
        &[Durability::Default, Durability::SyncAlways]
    };
    let only = args.only.as_deref();
    for &durability in modes.iter().filter(|_| only != Some("waiting")) {
        eprintln!("durability {}:", durability.label());
        report
            .modes
            .push(mode(durability, &baton_bin, window, args.logs.as_deref()).await?);
    }
    if only != Some("modes") {
        eprintln!("waiting runs:");
        report.waiting =
            Some(waiting::measure(&baton_bin, waiting_runs, args.logs.as_deref()).await?);
    }
    if args.restate {
        eprintln!("restate:");
        report.restate = Some(restate(args.quick));
    }
    report.machine.load_after = procs::load_average();
    report.evaluate();
    print!("{}", report.table());
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("figures written to {}", args.out.display());
    Ok(())
}

/// Everything measured against one nats-server: the raw baseline, then Baton.
async fn mode(
    durability: Durability,
    baton_bin: &std::path::Path,
    window: Duration,
    logs: Option<&std::path::Path>,
) -> anyhow::Result<report::Mode> {
    let server = NatsServer::start(durability)?;
    let load = procs::load_average();
    eprintln!("  raw hops ...");
    let client = async_nats::connect(&server.url).await?;
    let raw = raw::measure(&client, window.min(Duration::from_secs(10))).await?;
    // The server's peak RSS below is Baton's, not the raw phase's.
    procs::reset_peak(server.pid());

    let bus = baton::connect(&server.url).await?;
    let linear = baton::apply(&bus, baton::LINEAR).await?;
    let dag = baton::apply(&bus, baton::DAG).await?;
    let logs = procs::log_dir(logs, &server, durability.label())?;
    let mut coordinator = Service::start(
        baton_bin,
        "coordinator",
        &["coordinator"],
        &server.url,
        &logs,
    )?;
    let mut runner = Service::start(baton_bin, "runner", &["runner"], &server.url, &logs)?;
    coordinator
        .wait_for("coordinator started", Duration::from_secs(60))
        .await?;
    runner
        .wait_for("runner started", Duration::from_secs(60))
        .await?;
    let endings = baton::Endings::start(&bus.client).await?;
    let pids: baton::Pids = vec![
        ("coordinator".into(), coordinator.pid()),
        ("runner".into(), runner.pid()),
        ("nats-server".into(), server.pid()),
        ("bench".into(), std::process::id()),
    ];
    let warmup = window / 5;
    let mut workloads = Vec::new();
    for wf in [&linear, &dag] {
        for concurrency in [1, 64] {
            eprintln!("  {} at concurrency {concurrency} ...", wf.name);
            let mut w =
                baton::workload(&bus, &endings, wf, concurrency, warmup, window, &pids).await?;
            let hops = if concurrency == 1 {
                raw.hop_c1.hops_per_s
            } else {
                raw.hop_c64.hops_per_s
            };
            w.efficiency = stats::round(w.steps_per_s / hops.max(1.0), 3);
            eprintln!(
                "    {} runs/s, p50 {} ms, p99 {} ms, {} writes/step",
                w.runs_per_s, w.p50_ms, w.p99_ms, w.writes_per_step
            );
            workloads.push(w);
        }
    }
    let memory = vec![
        ("coordinator".into(), procs::memory(coordinator.pid())),
        ("runner".into(), procs::memory(runner.pid())),
        ("nats-server".into(), procs::memory(server.pid())),
        ("bench (client)".into(), procs::memory(std::process::id())),
    ];
    let warnings: Vec<String> = coordinator
        .lines()
        .into_iter()
        .chain(runner.lines())
        .map(|(_, l)| l)
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .collect();
    for w in &warnings {
        eprintln!("  service warning: {w}");
    }
    coordinator.kill();
    runner.kill();
    Ok(report::Mode {
        durability,
        load_before: load,
        raw,
        workloads,
        memory,
        service_warnings: warnings,
    })
}

/// Runs the Restate script and reads the JSON it prints last; a failure is recorded, not fatal.
fn restate(quick: bool) -> serde_json::Value {
    let script = baton_tests::workspace_root().join("tests/bench/restate/run.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("QUICK", if quick { "1" } else { "0" })
        .stderr(std::process::Stdio::inherit())
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| serde_json::json!({ "error": format!("no JSON in the output of {}", script.display()) }))
        }
        Ok(out) => serde_json::json!({
            "error": format!("{} failed ({}): {}", script.display(), out.status, String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default())
        }),
        Err(e) => serde_json::json!({ "error": format!("cannot run {}: {e}", script.display()) }),
    }
}
