//! The processes the bench starts: nats-server (in either durability mode) and `baton` services,
//! and what `/proc` says about their memory.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tempfile::TempDir;

/// How JetStream writes to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// nats-server's default: flushed to the OS at once, fsync'ed every 2 minutes.
    Default,
    /// `sync_interval: always`: fsync after every message.
    SyncAlways,
}

impl Durability {
    pub fn label(self) -> &'static str {
        match self {
            Durability::Default => "default",
            Durability::SyncAlways => "sync_interval: always",
        }
    }
}

/// One nats-server with JetStream on a free port and its own temporary store, killed on drop.
pub struct NatsServer {
    child: Child,
    pub url: String,
    dir: TempDir,
}

impl NatsServer {
    pub fn start(durability: Durability) -> anyhow::Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("baton-bench-nats-")
            .tempdir()
            .context("cannot create the server's temporary directory")?;
        let port = baton_tests::free_port();
        let store = dir.path().join("store");
        let sync = match durability {
            Durability::Default => "",
            Durability::SyncAlways => "  sync_interval: always\n",
        };
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: baton-bench\nmax_payload: 1MB\n\
             jetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
            store.display()
        );
        let config_path = dir.path().join("nats.conf");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let binary = baton_tests::nats_server_binary();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let server = NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not listen on {port} within 15 s:\n{}",
                    std::fs::read_to_string(server.dir.path().join("server.log"))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The version `nats-server --version` prints, e.g. `v2.15.1`.
pub fn nats_server_version() -> String {
    Command::new(baton_tests::nats_server_binary())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Where the services of one phase log: `<given>/<phase>/`, or the server's temporary directory.
pub fn log_dir(given: Option<&Path>, server: &NatsServer, phase: &str) -> anyhow::Result<PathBuf> {
    let Some(given) = given else {
        return Ok(server.dir().to_owned());
    };
    let dir = given.join(phase.replace([' ', ':'], ""));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// A line a service logged, with when the bench read it.
pub type Line = (Instant, String);

/// A `baton` service process (`baton coordinator`, `baton runner`), killed on drop. Its log (JSON
/// lines) goes to a file; lines that matter to the bench are also kept in memory with the time
/// they were read.
pub struct Service {
    child: Child,
    pub name: String,
    kept: Arc<Mutex<Vec<Line>>>,
}

impl Service {
    /// Starts `baton <args> --log-json` against `url`, logging to `<log_dir>/<name>.log`.
    pub fn start(
        baton: &Path,
        name: &str,
        args: &[&str],
        url: &str,
        log_dir: &Path,
    ) -> anyhow::Result<Service> {
        let log_path = log_dir.join(format!("{name}.log"));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(baton)
            .args(args)
            .arg("--log-json")
            .env("NATS_URL", url)
            .env("BATON_LOG", "info,async_nats=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", baton.display()))?;
        let kept = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let keep = kept.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let _ = writeln!(log, "{line}");
                if KEEP.iter().any(|k| line.contains(k)) {
                    keep.lock().expect("not poisoned").push((now, line));
                }
            }
        });
        Ok(Service {
            child,
            name: name.to_owned(),
            kept,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The kept log lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.kept.lock().expect("not poisoned").clone()
    }

    /// Waits until a kept line contains `text`.
    pub async fn wait_for(&mut self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lines().iter().any(|(_, l)| l.contains(text)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before logging {text:?}", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not log {text:?} within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Log lines the bench looks at; everything else only goes to the file.
const KEEP: &[&str] = &[
    "coordinator started",
    "runner started",
    "took ownership",
    "rebuilt partition",
    "WARN",
    "ERROR",
];

/// Memory of a process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident set.
    pub peak_kib: u64,
}

pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
    }
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS (`echo 5 > /proc/<pid>/clear_refs`),
/// so a later peak belongs to what ran since. Best effort: needs to own the process.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The release `baton` binary: `--baton-bin`, else `target/release/baton`, built first with
/// `cargo build --release -p baton` so that the one bench command is enough.
pub fn baton_binary(given: Option<PathBuf>, build: bool) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!("--baton-bin {} is not a file", path.display());
        }
        return Ok(path);
    }
    // The bench runs from <target>/<profile>/baton-bench.
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("the bench is not in a cargo target directory; pass --baton-bin")?;
    let bin = target.join("release").join("baton");
    if build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("building the release baton binary (cargo build --release -p baton) ...");
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "baton"])
            .current_dir(baton_tests::workspace_root())
            .env("CARGO_TARGET_DIR", target)
            .status()
            .context("cannot run cargo to build baton")?;
        if !status.success() {
            bail!("`cargo build --release -p baton` failed ({status})");
        }
    }
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p baton`, or drop --no-build",
            bin.display()
        );
    }
    Ok(bin)
}

/// `/proc/loadavg`: the 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it are space-separated.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux for every architecture the bench runs on.
    Duration::from_millis(ticks * 10)
}

/// CPU time the whole machine has been busy so far (every CPU; user, nice, system, irq, softirq,
/// steal), from the first line of `/proc/stat`.
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal: skip idle (3) and iowait (4).
        .filter(|(i, _)| *i < 8 && *i != 3 && *i != 4)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}
