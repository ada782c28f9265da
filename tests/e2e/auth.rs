//! Connecting securely: user and password, token, nkey and TLS with a client certificate, each
//! against a real nats-server configured for it, with the errors a wrong credential, an unknown CA
//! or a denied permission give; and a whole run with every process on TLS and its own user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_core::event::{Ending, RunEvent};
use baton_core::streams::Topology;
use baton_tests::{BatonProcess, NatsServer, baton_command, workspace_root};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::wait_for_end;

/// A CA and a server certificate for 127.0.0.1 signed by it, and a client certificate, as PEM
/// files in `dir`: `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`, `client-key.pem`.
fn certificates(dir: &Path) {
    let ca = ca();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write("ca.pem", ca.pem());
    for (name, sans) in [
        (
            "server",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        ),
        ("client", vec!["baton-runner".to_owned()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        write(&format!("{name}.pem"), cert.pem());
        write(&format!("{name}-key.pem"), key.serialize_pem());
    }
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// `baton runs list` with `args`: (ok, stdout + stderr).
fn runs_list(url: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut all = vec!["runs", "list", "--nats-url", url];
    all.extend_from_slice(args);
    let (ok, out, err) = baton_command(&all, env);
    (ok, format!("{out}{err}"))
}

#[test]
fn passwords_tokens_and_nkeys_are_checked_with_clear_errors() {
    // User and password; one user may not publish external events.
    let server = NatsServer::with_config(
        r#"authorization { users = [
            { user: ops, password: s3cret },
            { user: viewer, password: v1ew, permissions: { publish: { deny: ["baton.events.>"] } } }
        ] }"#,
    );
    let url = server.url();
    let (ok, out) = runs_list(
        &url,
        &["--nats-user", "ops", "--nats-password", "s3cret"],
        &[],
    );
    assert!(ok, "{out}");
    let (ok, out) = runs_list(
        &url,
        &[],
        &[("NATS_USER", "ops"), ("NATS_PASSWORD", "nope")],
    );
    assert!(!ok);
    assert!(
        out.contains(&format!("NATS at {url} refused user ops"))
            && out.contains("NATS_USER and NATS_PASSWORD"),
        "{out}"
    );
    assert!(!out.contains("nope"), "the password is not shown: {out}");
    let (ok, out) = runs_list(&url, &["--nats-user", "ops"], &[]);
    assert!(!ok && out.contains("user ops has no password"), "{out}");

    // A denied publish says which subject and which user.
    let (ok, out, err) = baton_command(
        &[
            "send",
            "--type",
            "t",
            "--source",
            "s",
            "--nats-url",
            &url,
            "--nats-user",
            "viewer",
            "--nats-password",
            "v1ew",
        ],
        &[("BATON_LOG", "error")],
    );
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("NATS denied a permission")
            && err.contains("baton.events.cli")
            && err.contains("user viewer"),
        "{err}"
    );
    drop(server);

    // A token.
    let server = NatsServer::with_config(r#"authorization { token: "t0ken-for-baton" }"#);
    let (ok, out) = runs_list(&server.url(), &[], &[("NATS_TOKEN", "t0ken-for-baton")]);
    assert!(ok, "{out}");
    let (ok, out) = runs_list(&server.url(), &[], &[]);
    assert!(!ok && out.contains("refused no credentials"), "{out}");
    drop(server);

    // An nkey: the seed is in a file only the client has; the server knows the public key.
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let server = NatsServer::with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    let (ok, out) = runs_list(&server.url(), &["--nats-nkey", seed.to_str().unwrap()], &[]);
    assert!(ok, "{out}");
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let (ok, out) = runs_list(
        &server.url(),
        &["--nats-nkey", other.to_str().unwrap()],
        &[],
    );
    assert!(!ok && out.contains("refused the nkey seed in"), "{out}");
    let (ok, out) = runs_list(&server.url(), &["--nats-creds", "/nonexistent.creds"], &[]);
    assert!(
        !ok && out.contains("cannot read the credentials file /nonexistent.creds"),
        "{out}"
    );
}

fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// TLS with verified client certificates, and per-user passwords, for every process.
fn tls_config(dir: &Path) -> String {
    format!(
        r#"tls {{ cert_file: "{}", key_file: "{}", ca_file: "{}", verify: true }}
authorization {{ users = [
    {{ user: coordinator, password: c }}, {{ user: runner, password: r }}, {{ user: cli, password: o }}
] }}"#,
        path(dir, "server.pem"),
        path(dir, "server-key.pem"),
        path(dir, "ca.pem")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_works_over_tls_with_every_process_on_its_own_user() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let server = NatsServer::with_config(&tls_config(dir.path()));
    let url = format!("tls://127.0.0.1:{}", server.port);
    let tls: Vec<(String, String)> = [
        ("NATS_CA", "ca.pem"),
        ("NATS_CERT", "client.pem"),
        ("NATS_KEY", "client-key.pem"),
    ]
    .iter()
    .map(|(k, f)| (k.to_string(), path(dir.path(), f)))
    .collect();
    let env = |user: &'static str, password: &'static str| -> Vec<(String, String)> {
        let mut env = tls.clone();
        env.push(("NATS_USER".into(), user.into()));
        env.push(("NATS_PASSWORD".into(), password.into()));
        env
    };
    let coordinator_env = env("coordinator", "c");
    let runner_env = env("runner", "r");
    let cli_env = env("cli", "o");
    let coordinator = BatonProcess::start_with_env(
        &["coordinator", "--nats-url", &url],
        &borrowed(&coordinator_env),
    );
    let runner =
        BatonProcess::start_with_env(&["runner", "--nats-url", &url], &borrowed(&runner_env));

    let hello = workspace_root().join("docs/examples/hello.yaml");
    let (ok, out, err) = baton_command(
        &[
            "run",
            hello.to_str().unwrap(),
            "--input",
            r#"{"name":"TLS"}"#,
            "--nats-url",
            &url,
        ],
        &borrowed(&cli_env),
    );
    assert!(
        ok && out.contains("HELLO, TLS!"),
        "{out}{err}\ncoordinator:\n{}\nrunner:\n{}",
        coordinator.log(),
        runner.log()
    );
    let run_id = out
        .lines()
        .find_map(|l| l.strip_prefix("Started run "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the run id")
        .to_owned();
    let auth = baton_core::Auth {
        user: Some("cli".into()),
        password: Some("o".into()),
        tls_ca: Some(PathBuf::from(path(dir.path(), "ca.pem"))),
        tls_cert: Some(PathBuf::from(path(dir.path(), "client.pem"))),
        tls_key: Some(PathBuf::from(path(dir.path(), "client-key.pem"))),
        ..Default::default()
    };
    let bus = baton_core::connect_as(&url, "e2e", &Topology::default(), &auth)
        .await
        .expect("connect over TLS");
    let events = wait_for_end(&bus, &run_id, Duration::from_secs(10), String::new).await;
    assert!(matches!(
        events.last().map(|e| &e.event),
        Some(RunEvent::Ended(Ending::Succeeded, _))
    ));

    // Without the CA, or with another one, the client cannot trust the server: said so.
    let mut no_ca = borrowed(&cli_env);
    no_ca.retain(|(k, _)| *k != "NATS_CA");
    let (ok, out) = runs_list(&url, &[], &no_ca);
    assert!(
        !ok && out.contains(&format!("TLS with NATS at {url} failed")),
        "{out}"
    );
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("ca.pem"), ca().pem()).unwrap();
    let other_ca = path(other.path(), "ca.pem");
    let mut wrong_ca = no_ca.clone();
    wrong_ca.push(("NATS_CA", &other_ca));
    let (ok, out) = runs_list(&url, &[], &wrong_ca);
    assert!(
        !ok && out.contains("TLS with NATS at") && out.contains("NATS_CA"),
        "{out}"
    );
}
