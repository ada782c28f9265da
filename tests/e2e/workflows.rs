//! Workflow files and the registry as a user works with them: `baton validate`, `baton apply`,
//! `baton workflows ...`, and runs pinned to the version they started with.

use std::process::Command;

use baton_tests::{BatonProcess, NatsServer, baton_binary, baton_command, workspace_root};

/// Runs `baton` and returns (exit code, stdout, stderr).
fn baton(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(baton_binary()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_every_problem_with_its_position_and_documented_exit_codes() {
    let root = workspace_root();
    let examples: Vec<String> = [
        "release-pipeline",
        "alert-remediation",
        "order-saga",
        "release",
        "hello",
    ]
    .iter()
    .map(|n| {
        root.join(format!("docs/examples/{n}.yaml"))
            .display()
            .to_string()
    })
    .collect();
    let args: Vec<&str> = std::iter::once("validate")
        .chain(examples.iter().map(String::as_str))
        .collect();
    let (code, out, err) = baton(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(": ok (workflow").count(), 5, "{out}");

    let cycle = root.join("services/workflow/tests/invalid/07-cycle.yaml");
    let typo = root.join("services/workflow/tests/invalid/03-unknown-step-key.yaml");
    let (cycle, typo) = (cycle.to_str().unwrap(), typo.to_str().unwrap());
    let (code, out, _) = baton(&["validate", cycle, typo, &examples[4]]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "{cycle}:7:5: error: the steps depend on each other in a cycle: b -> c -> b\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{typo}:7:5: error: unknown key `nedds` in a step\n"
        )) && out.contains("    hint: did you mean `needs`?"),
        "{out}"
    );
    assert!(
        out.contains("hello.yaml: ok"),
        "valid files are still checked: {out}"
    );

    let (code, _, err) = baton(&["validate", "/nonexistent/workflow.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the file"), "{err}");
}

#[tokio::test]
async fn the_registry_keeps_immutable_versions_and_runs_keep_theirs() {
    let server = NatsServer::start();
    let url = server.url();
    let _baton = BatonProcess::start(&["serve", "--nats-url", &url, "--http", "127.0.0.1:0"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pinned.yaml");
    let write = |tag: &str, delay_ms: u32| {
        std::fs::write(
            &file,
            format!(
                "name: pinned\nsteps:\n  - id: slow\n    uses: echo\n    with: {{ tag: {tag}, delay_ms: {delay_ms} }}\noutputs:\n  tag: ${{{{ .steps.slow.outputs.tag }}}}\n"
            ),
        )
        .unwrap();
    };
    let path = file.to_str().unwrap().to_owned();
    let cli = move |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--nats-url", url.as_str()]);
        baton_command(&all, &[])
    };

    write("one", 3000);
    let (ok, out, err) = cli(&["apply", &path]);
    assert!(
        ok && out.contains("Workflow pinned stored as version 1"),
        "{out}{err}"
    );
    let (ok, out, _) = cli(&["apply", &path]);
    assert!(ok && out.contains("unchanged at version 1"), "{out}");

    // A run of version 1 is under way when version 2 is applied; it finishes as version 1.
    let run = tokio::task::spawn_blocking({
        let cli = cli.clone();
        let path = path.clone();
        move || cli(&["run", &path, "--timeout", "30"])
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    write("two", 0);
    let (ok, out, err) = cli(&["apply", &path]);
    assert!(ok && out.contains("stored as version 2"), "{out}{err}");
    let (ok, out, err) = run.await.unwrap();
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("of pinned v1") && out.contains("\"tag\": \"one\""),
        "{out}"
    );
    let (ok, out, _) = cli(&["run", &path]);
    assert!(
        ok && out.contains("of pinned v2") && out.contains("\"tag\": \"two\""),
        "{out}"
    );

    let (ok, out, _) = cli(&["workflows", "versions", "pinned"]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].trim_start().starts_with("1 ") && lines[2].ends_with("(latest)"),
        "{out}"
    );
    let (ok, out, _) = cli(&["workflows", "show", "pinned", "--version", "1"]);
    assert!(
        ok && out.contains("Workflow pinned v1") && out.contains("tag: one"),
        "{out}"
    );
    let (ok, out, _) = cli(&["workflows", "graph", "pinned"]);
    assert!(
        ok && out.starts_with("flowchart TD\n  s0[\"slow<br/>echo\"]"),
        "{out}"
    );
    let (ok, out, _) = cli(&["workflows", "graph", "pinned", "--format", "dot"]);
    assert!(ok && out.starts_with("digraph \"pinned\""), "{out}");

    let (ok, out, _) = cli(&["workflows", "disable", "pinned"]);
    assert!(ok, "{out}");
    let (_, out, _) = cli(&["workflows", "list"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("pinned") && l.contains("2  disabled")),
        "{out}"
    );
    let (ok, _, _) = cli(&["workflows", "enable", "pinned"]);
    assert!(ok);
    let (_, out, _) = cli(&["workflows", "list"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("pinned") && l.contains("enabled")),
        "{out}"
    );

    // Deleted: gone from the list, versions kept, and numbers never reused.
    let (ok, out, _) = cli(&["workflows", "delete", "pinned"]);
    assert!(ok && out.contains("its versions stay"), "{out}");
    let (_, out, _) = cli(&["workflows", "list"]);
    assert!(!out.contains("pinned"), "{out}");
    let (ok, out, _) = cli(&["workflows", "show", "pinned", "--version", "2"]);
    assert!(ok && out.contains("tag: two"), "{out}");
    write("three", 0);
    let (ok, out, _) = cli(&["apply", &path]);
    assert!(ok && out.contains("stored as version 3"), "{out}");
    let (ok, out, _) = cli(&["workflows", "delete", "pinned", "--purge"]);
    assert!(ok && out.contains("with all its versions"), "{out}");
    let (ok, _, err) = cli(&["workflows", "versions", "pinned"]);
    assert!(!ok && err.contains("no workflow named pinned"), "{err}");

    // An invalid file is refused before anything is stored, with its problems.
    std::fs::write(&file, "name: pinned\nsteps:\n  - id: a\n    uses: ech\n").unwrap();
    let (ok, _, err) = cli(&["apply", &path]);
    assert!(
        !ok && err.contains(":4:11: error: unknown step kind `ech`"),
        "{err}"
    );
}
