//! Argument handling of the `baton` binary, without a server. (Building this test also makes
//! `cargo test --workspace` build the `baton` binary that the end-to-end tests under `tests/` run.)

use std::process::Command;

fn baton(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .output()
        .expect("run baton");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn bad_arguments_get_clear_errors() {
    let (ok, out) = baton(&["run", "x.yaml", "--input", "{not json"]);
    assert!(!ok);
    assert!(out.contains("--input must be a JSON object"), "{out}");

    let (ok, out) = baton(&["frobnicate"]);
    assert!(!ok);
    assert!(
        out.contains("unrecognized subcommand 'frobnicate'"),
        "{out}"
    );

    let (ok, out) = baton(&["runs", "show", "x", "--nats-url", "nats://127.0.0.1:1"]);
    assert!(!ok);
    assert!(
        out.contains("cannot connect to NATS at nats://127.0.0.1:1") && out.contains("baton dev"),
        "{out}"
    );

    let (ok, out) = baton(&["--help"]);
    assert!(ok && out.contains("dev") && out.contains("runs"), "{out}");
}
