//! Test harness: real `nats-server` processes and real `baton` processes.
//!
//! Every server gets free ports and its own temporary store directory, and is killed and removed
//! on drop, so tests run in parallel without seeing each other. A node can be stopped (SIGTERM),
//! killed (SIGKILL) and restarted on the same ports and store.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The workspace root (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A nats-server >= 2.12, found or installed once per test process by the same code as the CLI.
pub fn nats_server_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let home = std::env::var_os("BATON_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join(".baton"));
            match baton_core::provision::find_or_install(&home) {
                Ok(server) => server.path,
                Err(e) => panic!("no usable nats-server for the tests: {e}"),
            }
        })
        .clone()
}

/// The `baton` binary built with the tests: `BATON_BIN`, else next to the test executable's
/// `deps/` directory (`cargo test --workspace` and nextest build it).
pub fn baton_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("BATON_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("baton");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p baton` (the test script does)",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One nats-server process with JetStream.
pub struct NatsServer {
    pub name: String,
    pub port: u16,
    args: Vec<String>,
    store: TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// A single node on a free port.
    pub fn start() -> NatsServer {
        let mut server = NatsServer::new("single".into(), free_port(), Vec::new());
        server.spawn();
        server
    }

    /// A single node on a free port that reads `config` (nats-server configuration text) on top
    /// of the harness's flags; [`reload`](Self::reload) changes it while the server runs.
    pub fn with_config(config: &str) -> NatsServer {
        let mut server = NatsServer::new("single".into(), free_port(), Vec::new());
        let file = server.store.path().join("server.conf");
        std::fs::write(&file, server.config_text(config)).expect("write the server config");
        server
            .args
            .extend(["-c".into(), file.display().to_string()]);
        server.spawn();
        server
    }

    /// A reload refuses a config whose server name differs from the flags' (`-n`).
    fn config_text(&self, config: &str) -> String {
        format!("server_name: {}\n{config}", self.name)
    }

    /// Rewrites the configuration and has the running server reload it (SIGHUP); returns once
    /// the server logged the reload.
    pub fn reload(&mut self, config: &str) {
        let text = self.config_text(config);
        std::fs::write(self.store.path().join("server.conf"), text).expect("write the config");
        let reloads = |s: &NatsServer| s.log().matches("Reloaded server configuration").count();
        let before = reloads(self);
        let child = self.child.as_ref().expect("the server runs");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads(self) == before {
            assert!(Instant::now() < deadline, "no reload:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A single node on a free port that is not running yet: its [`url`](Self::url) is known, and
    /// [`restart`](Self::restart) starts it. For clients started before their server.
    pub fn not_started() -> NatsServer {
        NatsServer::new("single".into(), free_port(), Vec::new())
    }

    fn new(name: String, port: u16, extra: Vec<String>) -> NatsServer {
        let store = tempfile::Builder::new()
            .prefix("baton-nats-")
            .tempdir()
            .expect("temp dir");
        let mut args: Vec<String> = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-n",
            &name,
            "-sd",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(store.path().display().to_string());
        args.extend(extra);
        NatsServer {
            name,
            port,
            args,
            store,
            child: None,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::File::create(self.store.path().join("server.log")).expect("log file");
        let child = Command::new(nats_server_binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(15)),
            "{} did not listen on {}:\n{}",
            self.name,
            self.port,
            self.log()
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("server.log")).unwrap_or_default()
    }

    fn signal(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    /// Graceful stop (SIGTERM); the store is kept for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
    }

    /// `kill -9`; the store is kept for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
    }

    /// Starts the server again on the same ports and store.
    pub fn restart(&mut self) {
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-node JetStream cluster on loopback.
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = format!("baton-test-{}", client_ports[0]);
        let mut nodes: Vec<NatsServer> = (0..3)
            .map(|i| {
                let extra = vec![
                    "--cluster_name".into(),
                    cluster.clone(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ];
                NatsServer::new(format!("n{i}"), client_ports[i], extra)
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        Cluster { nodes }
    }

    /// Client URLs of every node, for clients that fail over.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers with a meta leader (the cluster has formed).
    pub async fn wait_ready(&self) {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(NatsServer::url)
            .collect();
        let client = async_nats::connect(urls.as_slice())
            .await
            .expect("connect to the cluster");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = client.request("$JS.API.INFO", "".into()).await;
            if let Ok(msg) = reply
                && !String::from_utf8_lossy(&msg.payload).contains("\"error\"")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not elect a JetStream leader:\n{}",
                self.nodes[0].log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every stream and consumer has a leader and all its replicas are current (caught
    /// up with their leader). Only then is the cluster healthy, so that losing one node is an outage
    /// the other two absorb: a replica still catching up when its leader dies may be unable to take
    /// over. Panics with what still lags after `timeout`.
    pub async fn wait_current(&self, js: &async_nats::jetstream::Context, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let lagging = match lagging(js).await {
                Ok(lagging) => lagging,
                Err(error) => vec![format!("cannot list the streams: {error}")],
            };
            if lagging.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster's replicas are not current after {timeout:?}: {lagging:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The streams and consumers that lack a leader or a current replica.
async fn lagging(
    js: &async_nats::jetstream::Context,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    use futures::TryStreamExt;
    let mut lagging = Vec::new();
    let streams: Vec<async_nats::jetstream::stream::Info> = js.streams().try_collect().await?;
    for stream in streams {
        let name = &stream.config.name;
        let replicas = stream.config.num_replicas;
        if let Some(why) = unhealthy(stream.cluster.as_ref(), replicas) {
            lagging.push(format!("stream {name}: {why}"));
        }
        let consumers: Vec<async_nats::jetstream::consumer::Info> =
            js.get_stream(name).await?.consumers().try_collect().await?;
        for consumer in consumers {
            // 0: as many as the stream.
            let wanted = match consumer.config.num_replicas {
                0 => replicas,
                n => n,
            };
            if let Some(why) = unhealthy(consumer.cluster.as_ref(), wanted) {
                lagging.push(format!("consumer {name} > {}: {why}", consumer.name));
            }
        }
    }
    Ok(lagging)
}

fn unhealthy(
    cluster: Option<&async_nats::jetstream::stream::ClusterInfo>,
    replicas: usize,
) -> Option<String> {
    let Some(cluster) = cluster else {
        return Some("no cluster information".into());
    };
    if cluster.leader.is_none() {
        return Some("no leader".into());
    }
    if cluster.replicas.len() + 1 < replicas {
        return Some(format!(
            "{} of {replicas} replicas",
            cluster.replicas.len() + 1
        ));
    }
    let behind: Vec<String> = cluster
        .replicas
        .iter()
        .filter(|r| !r.current || r.offline)
        .map(|r| format!("{} (lag {:?})", r.name, r.lag))
        .collect();
    (!behind.is_empty()).then(|| format!("not current: {}", behind.join(", ")))
}

/// A `baton` process, killed on drop.
pub struct BatonProcess {
    child: Option<Child>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    log: PathBuf,
    _dir: TempDir,
}

impl BatonProcess {
    /// Starts `baton <args>`; its stderr goes to a log file shown by [`log`](Self::log).
    pub fn start(args: &[&str]) -> BatonProcess {
        BatonProcess::start_with_env(args, &[])
    }

    /// Starts `baton <args>` with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> BatonProcess {
        let dir = tempfile::Builder::new()
            .prefix("baton-proc-")
            .tempdir()
            .expect("temp dir");
        let mut p = BatonProcess {
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log: dir.path().join("baton.log"),
            _dir: dir,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(baton_binary())
            .args(&self.args)
            .env("BATON_LOG", "info,async_nats=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start baton");
        self.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as a service manager stops it; returns its exit status, or `None` if it was still
    /// running after `timeout` (then it is killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Starts the same command again.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, once it exits within `timeout`; `None` while it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("wait for baton") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BatonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Python packages for the interop tests, installed once (pinned) under `.baton/python/`.
pub const PYTHON_PACKAGES: &[&str] = &["cloudevents==2.2.0", "nats-py==2.16.0"];

/// The directory holding [`PYTHON_PACKAGES`] (use it as `PYTHONPATH`), installed on first use with
/// pip into a staging directory that is then renamed, so parallel tests never see half an install.
pub fn python_packages() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root().join(".baton").join("python");
        let dir = root.join(PYTHON_PACKAGES.join("+"));
        if dir.is_dir() {
            return dir;
        }
        std::fs::create_dir_all(&root).expect("create .baton/python");
        let staging = root.join(format!(".staging-{}", std::process::id()));
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&staging)
            .args(PYTHON_PACKAGES)
            .output()
            .expect("run python3 -m pip");
        assert!(
            out.status.success(),
            "pip install {PYTHON_PACKAGES:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::rename(&staging, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        dir
    })
    .clone()
}

/// Runs a Python script of `tests/interop/` with the interop packages; returns its stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/interop").join(script))
        .args(args)
        .env("PYTHONPATH", python_packages())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `baton <args>` to completion and returns (success, stdout, stderr).
pub fn baton_command(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(baton_binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run baton");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
