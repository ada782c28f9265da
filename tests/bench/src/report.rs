//! The figures: JSON (serde) and the printed table, and the targets checked against them.

use std::fmt::Write;

use serde::Serialize;

use crate::baton::Workload;
use crate::procs::{self, Durability, Memory};
use crate::raw::Raw;
use crate::waiting::Waiting;

#[derive(Debug, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: Machine,
    /// The commit measured (`+dirty` when the working tree had changes).
    pub commit: String,
    pub baton_bin: String,
    pub modes: Vec<Mode>,
    pub waiting: Option<Waiting>,
    /// What `tests/bench/restate/run.sh` printed, or why it could not run.
    pub restate: Option<serde_json::Value>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_kib: u64,
    pub kernel: String,
    pub nats_server: String,
    /// 1, 5 and 15 minute load averages before and after the bench.
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
}

/// Everything measured against one nats-server.
#[derive(Debug, Serialize)]
pub struct Mode {
    pub durability: Durability,
    pub load_before: [f64; 3],
    pub raw: Raw,
    pub workloads: Vec<Workload>,
    /// Each process at the end of the workloads.
    pub memory: Vec<(String, Memory)>,
    pub service_warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

impl Report {
    pub fn new(quick: bool, baton_bin: &std::path::Path) -> Report {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .current_dir(baton_tests::workspace_root())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Report {
            quick,
            machine: Machine {
                nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
                cpu_model: cpuinfo
                    .lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                    .unwrap_or_default(),
                memory_kib: meminfo
                    .lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                nats_server: procs::nats_server_version(),
                load_before: procs::load_average(),
                load_after: [0.0; 3],
            },
            commit: format!(
                "{}{}",
                git(&["rev-parse", "--short", "HEAD"]),
                if dirty { "+dirty" } else { "" }
            ),
            baton_bin: baton_bin.display().to_string(),
            modes: Vec::new(),
            waiting: None,
            restate: None,
            targets: Vec::new(),
        }
    }

    fn workload(&self, durability: Durability, wf: &str, c: usize) -> Option<&Workload> {
        self.modes
            .iter()
            .find(|m| m.durability == durability)?
            .workloads
            .iter()
            .find(|w| w.workflow == wf && w.concurrency == c)
    }

    /// Checks the targets (3-step linear workflow, default durability).
    pub fn evaluate(&mut self) {
        let mut targets = Vec::new();
        let mut add = |target: &str, goal: &str, measured: String, met: bool| {
            targets.push(Target {
                target: target.into(),
                goal: goal.into(),
                measured,
                met,
            })
        };
        if let Some(w) = self.workload(Durability::Default, "bench-linear", 1) {
            add(
                "p50 end to end, concurrency 1",
                "<= 3 ms",
                format!("{} ms", w.p50_ms),
                w.p50_ms <= 3.0,
            );
        }
        if let Some(w) = self.workload(Durability::Default, "bench-linear", 64) {
            add(
                "runs/s, concurrency 64",
                ">= 2000",
                format!("{}", w.runs_per_s),
                w.runs_per_s >= 2000.0,
            );
            add(
                "efficiency (steps/s / raw hops/s), concurrency 64",
                ">= 0.5",
                format!("{}", w.efficiency),
                w.efficiency >= 0.5,
            );
            add(
                "durable writes per step",
                "<= 2",
                format!("{}", w.writes_per_step),
                w.writes_per_step <= 2.0,
            );
        }
        if let Some(w) = &self.waiting {
            add(
                "coordinator memory per waiting run",
                "<= 2048 bytes",
                format!("{} bytes ({} runs)", w.bytes_per_waiting_run, w.runs),
                w.bytes_per_waiting_run <= 2048.0,
            );
            add(
                "waiting runs resumed after kill -9",
                "100,000 within 10 s",
                format!("{} runs in {} s", w.runs, w.resume.seconds),
                w.resume.seconds <= 10.0 && w.runs >= 100_000,
            );
        }
        self.targets = targets;
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "\nBaton benchmark{} at {}: {} cores, {}, {:.1} GiB, Linux {}, nats-server {}",
            if self.quick { " (--quick)" } else { "" },
            self.commit,
            m.nproc,
            m.cpu_model,
            m.memory_kib as f64 / 1024.0 / 1024.0,
            m.kernel,
            m.nats_server
        );
        let _ = writeln!(
            out,
            "load average (1/5/15 min) before {:?}, after {:?}\n",
            m.load_before, m.load_after
        );
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        let mut row = |label: &str, f: &dyn Fn(&Mode) -> String| {
            rows.push((label.to_owned(), self.modes.iter().map(f).collect()));
        };
        row("load before (1 min)", &|m| {
            format!("{:.2}", m.load_before[0])
        });
        row("raw publish+ack p50 / p99 ms", &|m| {
            format!(
                "{:.3} / {:.3}",
                m.raw.publish_ack_p50_ms, m.raw.publish_ack_p99_ms
            )
        });
        row("raw hop, 1 chain: hops/s", &|m| {
            format!("{:.0}", m.raw.hop_c1.hops_per_s)
        });
        row("raw hop, 1 chain: p50 / p99 ms", &|m| {
            format!(
                "{:.3} / {:.3}",
                m.raw.hop_c1.p50_ms.unwrap_or(0.0),
                m.raw.hop_c1.p99_ms.unwrap_or(0.0)
            )
        });
        row("raw hop, 64 chains: hops/s", &|m| {
            format!("{:.0}", m.raw.hop_c64.hops_per_s)
        });
        row("raw hop, 64 chains, Msg-Id: hops/s", &|m| {
            format!("{:.0}", m.raw.hop_c64_msg_id.hops_per_s)
        });
        for wf in ["bench-linear", "bench-dag"] {
            for c in [1, 64] {
                let name = format!("{} c{c}", short(wf));
                let pick = |m: &Mode| {
                    m.workloads
                        .iter()
                        .find(|w| w.workflow == wf && w.concurrency == c)
                        .cloned()
                };
                row(&format!("{name}: other CPU on the machine %"), &|m| {
                    pick(m).map_or("-".into(), |w| format!("{:.1}", w.other_cpu_pct))
                });
                row(&format!("{name}: runs/s"), &|m| {
                    pick(m).map_or("-".into(), |w| format!("{:.1}", w.runs_per_s))
                });
                row(&format!("{name}: p50 / p99 ms"), &|m| {
                    pick(m).map_or("-".into(), |w| format!("{:.2} / {:.2}", w.p50_ms, w.p99_ms))
                });
                row(&format!("{name}: client p50 / p99 ms"), &|m| {
                    pick(m).map_or("-".into(), |w| {
                        format!("{:.2} / {:.2}", w.client_p50_ms, w.client_p99_ms)
                    })
                });
                row(&format!("{name}: steps/s, efficiency"), &|m| {
                    pick(m).map_or("-".into(), |w| {
                        format!("{:.0}, {:.3}", w.steps_per_s, w.efficiency)
                    })
                });
                row(&format!("{name}: writes/step"), &|m| {
                    pick(m).map_or("-".into(), |w| {
                        let failed = if w.failed_runs > 0 {
                            format!(" ({} runs failed)", w.failed_runs)
                        } else {
                            String::new()
                        };
                        format!("{:.3}{failed}", w.writes_per_step)
                    })
                });
            }
        }
        let labels: Vec<String> = self
            .modes
            .iter()
            .map(|m| m.durability.label().to_owned())
            .collect();
        table(&mut out, "", &labels, &rows);

        // Writes by type, default durability.
        if let Some(mode) = self.modes.first() {
            let c64: Vec<&Workload> = mode
                .workloads
                .iter()
                .filter(|w| w.concurrency == 64)
                .collect();
            let mut types: Vec<&String> = c64
                .iter()
                .flat_map(|w| w.writes_per_run_by_type.keys())
                .collect();
            types.sort();
            types.dedup();
            let mut rows: Vec<(String, Vec<String>)> = types
                .iter()
                .map(|t| {
                    (
                        (*t).clone(),
                        c64.iter()
                            .map(|w| {
                                format!(
                                    "{:.3}",
                                    w.writes_per_run_by_type.get(*t).copied().unwrap_or(0.0)
                                )
                            })
                            .collect(),
                    )
                })
                .collect();
            rows.push((
                "BATON_RUNS messages per run".into(),
                c64.iter()
                    .map(|w| format!("{:.3}", w.writes_per_run))
                    .collect(),
            ));
            rows.push((
                "  per step".into(),
                c64.iter()
                    .map(|w| format!("{:.3}", w.writes_per_step))
                    .collect(),
            ));
            rows.push((
                "other streams (KV) per run".into(),
                c64.iter()
                    .map(|w| format!("{:.3}", w.other_writes_per_run))
                    .collect(),
            ));
            let labels: Vec<String> = c64
                .iter()
                .map(|w| format!("{} ({} steps)", short(&w.workflow), w.steps))
                .collect();
            let _ = writeln!(
                out,
                "\ndurable writes per run by event type ({} durability, concurrency 64):",
                mode.durability.label()
            );
            table(&mut out, "event type", &labels, &rows);

            let _ = writeln!(
                out,
                "\nCPU ms per run, by process ({} durability):",
                mode.durability.label()
            );
            let labels: Vec<String> = mode
                .workloads
                .iter()
                .map(|w| format!("{} c{}", short(&w.workflow), w.concurrency))
                .collect();
            let procs: Vec<String> = mode
                .workloads
                .first()
                .map(|w| w.cpu_ms_per_run.keys().cloned().collect())
                .unwrap_or_default();
            let rows: Vec<(String, Vec<String>)> = procs
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        mode.workloads
                            .iter()
                            .map(|w| {
                                format!("{:.3}", w.cpu_ms_per_run.get(p).copied().unwrap_or(0.0))
                            })
                            .collect(),
                    )
                })
                .collect();
            table(&mut out, "process", &labels, &rows);
        }

        // Who reacts how fast, default durability.
        if let Some(mode) = self.modes.first() {
            let _ = writeln!(
                out,
                "\nmedian ms between consecutive events of a run ({} durability):",
                mode.durability.label()
            );
            let labels: Vec<String> = mode
                .workloads
                .iter()
                .map(|w| format!("{} c{}", short(&w.workflow), w.concurrency))
                .collect();
            let mut pairs: Vec<&String> = mode
                .workloads
                .iter()
                .flat_map(|w| w.gap_p50_ms.keys())
                .collect();
            pairs.sort();
            pairs.dedup();
            let rows: Vec<(String, Vec<String>)> = pairs
                .iter()
                .map(|p| {
                    (
                        (*p).clone(),
                        mode.workloads
                            .iter()
                            .map(|w| {
                                w.gap_p50_ms
                                    .get(*p)
                                    .map_or("-".into(), |v| format!("{v:.3}"))
                            })
                            .collect(),
                    )
                })
                .collect();
            table(&mut out, "from -> to", &labels, &rows);
        }

        let _ = writeln!(
            out,
            "\npeak RSS (VmHWM) / RSS now, MiB, after the workloads:"
        );
        let names: Vec<String> = self
            .modes
            .first()
            .map(|m| m.memory.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let rows: Vec<(String, Vec<String>)> = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    self.modes
                        .iter()
                        .map(|m| {
                            m.memory.iter().find(|(name, _)| name == n).map_or(
                                "-".into(),
                                |(_, mem)| {
                                    format!("{:.1} / {:.1}", mib(mem.peak_kib), mib(mem.rss_kib))
                                },
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        table(&mut out, "process", &labels, &rows);

        if let Some(w) = &self.waiting {
            let _ = writeln!(
                out,
                "\n{} runs waiting on an event (+{} probes), default durability:",
                w.runs, w.probes
            );
            let rows = vec![
                (
                    "all waiting after (s)".to_owned(),
                    vec![format!("{}", w.start_seconds)],
                ),
                (
                    "coordinator RSS idle -> waiting (MiB)".into(),
                    vec![format!(
                        "{:.1} -> {:.1} (peak {:.1})",
                        mib(w.coordinator_idle.rss_kib),
                        mib(w.coordinator_waiting.rss_kib),
                        mib(w.coordinator_waiting.peak_kib)
                    )],
                ),
                (
                    "coordinator bytes per waiting run".into(),
                    vec![format!("{}", w.bytes_per_waiting_run)],
                ),
                (
                    "nats-server RSS / peak (MiB)".into(),
                    vec![format!(
                        "{:.1} / {:.1}",
                        mib(w.nats_server.rss_kib),
                        mib(w.nats_server.peak_kib)
                    )],
                ),
                (
                    "journal messages, bytes; wait entries".into(),
                    vec![format!(
                        "{}, {:.1} MiB; {}",
                        w.journal_messages,
                        w.journal_bytes as f64 / 1048576.0,
                        w.wait_entries
                    )],
                ),
                (
                    "resumed after kill -9 (s)".into(),
                    vec![format!("{}", w.resume.seconds)],
                ),
                (
                    "  first ownership / last partition rebuilt (s)".into(),
                    vec![format!(
                        "{} / {}",
                        w.resume.first_ownership_s, w.resume.last_rebuilt_s
                    )],
                ),
                (
                    "  partitions, events replayed, live runs".into(),
                    vec![format!(
                        "{}, {}, {}",
                        w.resume.partitions_rebuilt,
                        w.resume.events_replayed,
                        w.resume.live_runs_rebuilt
                    )],
                ),
                (
                    "restarted coordinator RSS / peak (MiB)".into(),
                    vec![format!(
                        "{:.1} / {:.1}",
                        mib(w.coordinator_resumed.rss_kib),
                        mib(w.coordinator_resumed.peak_kib)
                    )],
                ),
                (
                    "one event releasing one run (ms)".into(),
                    vec![format!("{}", w.release_one_ms)],
                ),
            ];
            table(&mut out, "", &["".into()], &rows);
        }

        if let Some(r) = &self.restate {
            let _ = writeln!(out, "\nRestate vs Baton, 3-step workflow of no-op steps:");
            if let Some(error) = r.get("error") {
                let _ = writeln!(out, "  Restate did not run: {error}");
            } else {
                let baton = |c: usize| self.workload(Durability::Default, "bench-linear", c);
                let baton_sync =
                    |c: usize| self.workload(Durability::SyncAlways, "bench-linear", c);
                let f =
                    |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
                let rows = vec![
                    (
                        "runs/s, concurrency 64".to_owned(),
                        vec![
                            f(&r["runs_per_s_c64"]),
                            baton(64).map_or("-".into(), |w| format!("{:.1}", w.runs_per_s)),
                            baton_sync(64).map_or("-".into(), |w| format!("{:.1}", w.runs_per_s)),
                        ],
                    ),
                    (
                        "client p50 / p99 ms, concurrency 1".into(),
                        vec![
                            format!("{} / {}", f(&r["p50_ms_c1"]), f(&r["p99_ms_c1"])),
                            baton(1).map_or("-".into(), |w| {
                                format!("{:.2} / {:.2}", w.client_p50_ms, w.client_p99_ms)
                            }),
                            baton_sync(1).map_or("-".into(), |w| {
                                format!("{:.2} / {:.2}", w.client_p50_ms, w.client_p99_ms)
                            }),
                        ],
                    ),
                    (
                        "client p50 ms, concurrency 64".into(),
                        vec![
                            f(&r["p50_ms_c64"]),
                            baton(64).map_or("-".into(), |w| format!("{:.2}", w.client_p50_ms)),
                            baton_sync(64)
                                .map_or("-".into(), |w| format!("{:.2}", w.client_p50_ms)),
                        ],
                    ),
                ];
                let restate = format!("Restate {}", r["version"].as_str().unwrap_or_default());
                table(
                    &mut out,
                    "",
                    &[
                        restate,
                        "Baton, default".into(),
                        "Baton, sync always".into(),
                    ],
                    &rows,
                );
            }
        }

        let _ = writeln!(
            out,
            "\ntargets (3-step linear workflow, default durability):"
        );
        let rows: Vec<(String, Vec<String>)> = self
            .targets
            .iter()
            .map(|t| {
                (
                    t.target.clone(),
                    vec![
                        t.goal.clone(),
                        t.measured.clone(),
                        if t.met { "met" } else { "MISSED" }.into(),
                    ],
                )
            })
            .collect();
        table(
            &mut out,
            "target",
            &["goal".into(), "measured".into(), "".into()],
            &rows,
        );
        out
    }
}

fn short(workflow: &str) -> &str {
    match workflow {
        "bench-linear" => "linear3",
        "bench-dag" => "dag10",
        other => other,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Appends a table with a first column of labels.
fn table(out: &mut String, corner: &str, headers: &[String], rows: &[(String, Vec<String>)]) {
    let first = rows
        .iter()
        .map(|(l, _)| l.len())
        .chain([corner.len()])
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .filter_map(|(_, cells)| cells.get(i).map(String::len))
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |out: &mut String, label: &str, cells: &[String]| {
        let _ = write!(out, "  {label:<first$}");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {cell:>w$}");
        }
        out.push('\n');
    };
    line(out, corner, headers);
    for (label, cells) in rows {
        line(out, label, cells);
    }
}
