//! The dev stack's own nats-server process.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

pub struct NatsProcess {
    child: Child,
    pub url: String,
}

impl NatsProcess {
    /// Starts nats-server with JetStream on 127.0.0.1:`port`, storing under `store_dir`, and waits
    /// until it accepts connections.
    pub async fn start(binary: &Path, store_dir: &Path, port: u16) -> anyhow::Result<NatsProcess> {
        std::fs::create_dir_all(store_dir)
            .with_context(|| format!("cannot create {}", store_dir.display()))?;
        let log = store_dir.join("nats-server.log");
        let mut child = Command::new(binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-n",
                "baton-dev",
                "-p",
                &port.to_string(),
                "-sd",
            ])
            .arg(store_dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Ctrl-C reaches only `baton`, which stops the services first.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        for _ in 0..200 {
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<_> = tail
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!(
                    "nats-server exited at start ({status}). Is port {port} already in use? Choose another with --port.\n{}",
                    tail.join("\n")
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(NatsProcess { child, url });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "nats-server did not accept connections on port {port} within 10 s; see {}",
            log.display()
        )
    }

    /// Stops the server gracefully (SIGTERM), killing it if it does not exit within 10 s.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}
