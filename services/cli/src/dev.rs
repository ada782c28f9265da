//! `baton dev`: the whole stack on one machine, in one process, plus its own nats-server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baton_core::streams::Topology;

use crate::server::NatsProcess;
use crate::{run_services, runs};

/// The example workflows applied by `baton dev`.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "docs/examples/release.yaml",
        include_str!("../../../docs/examples/release.yaml"),
    ),
    (
        "docs/examples/hello.yaml",
        include_str!("../../../docs/examples/hello.yaml"),
    ),
];

/// The GitHub webhook secret of the dev stack, unless BATON_GITHUB_SECRET is set.
const DEV_GITHUB_SECRET: &str = "baton-dev";

/// The demo's sample event: a real GitHub "release published" delivery body.
const SAMPLE_RELEASE: &str =
    include_str!("../../../tests/fixtures/github/payloads/release__published.json");

#[derive(clap::Args)]
pub struct Options {
    /// Where the dev stack keeps its JetStream data (default: `.baton/dev` in the project).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Port of the dev nats-server.
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// Address of the gateway's HTTP server.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Export traces to this OTLP endpoint (e.g. http://localhost:4318 for Jaeger; with
    /// OTEL_EXPORTER_OTLP_PROTOCOL=grpc, http://localhost:4317). The OTEL_* variables work too.
    #[arg(long, value_name = "ENDPOINT")]
    pub otlp: Option<String>,
    /// Feed the bundled sample event (a GitHub release) to the stack, show the run it starts, and
    /// exit when the run ends.
    #[arg(long)]
    pub demo: bool,
}

pub async fn run(options: Options) -> anyhow::Result<ExitCode> {
    // The gateway's port is bound before anything starts: in use, the command ends at once.
    let github_secret =
        std::env::var("BATON_GITHUB_SECRET").unwrap_or_else(|_| DEV_GITHUB_SECRET.to_owned());
    let gateway = baton_gateway::http::Server::bind(baton_gateway::HttpOptions {
        listen: options.http,
        token: None,
        github_secret: Some(github_secret.clone()),
        max_bytes: baton_core::binding::Limits::default().max_bytes,
        allowed_origins: Vec::new(),
    })
    .await?;
    let home = baton_core::provision::default_home();
    let server = tokio::task::spawn_blocking({
        let home = home.clone();
        move || baton_core::provision::find_or_install(&home)
    })
    .await??;
    let data_dir = options.data_dir.unwrap_or_else(|| home.join("dev"));
    let nats = NatsProcess::start(&server.path, &data_dir.join("jetstream"), options.port).await?;
    let result = serve(
        &nats.url,
        &server,
        &data_dir,
        gateway,
        &github_secret,
        options.demo,
    )
    .await;
    nats.stop().await;
    result
}

async fn serve(
    url: &str,
    server: &baton_core::provision::Server,
    data_dir: &std::path::Path,
    gateway: baton_gateway::http::Server,
    github_secret: &str,
    demo: bool,
) -> anyhow::Result<ExitCode> {
    let http = gateway.local_addr();
    let bus = baton_core::connect(url, "baton-dev", &Topology::default()).await?;
    println!("Baton dev stack");
    println!(
        "  nats-server {} at {url} ({})",
        server.version,
        server.path.display()
    );
    println!("  JetStream data in {}", data_dir.display());
    let mut kinds: Vec<String> = baton_runner::kinds::builtin(bus.client.clone())
        .into_keys()
        .collect();
    kinds.sort();
    println!(
        "  coordinator ({} partitions) and runner (kinds: {}) in this process",
        bus.partitions,
        kinds.join(", ")
    );
    let registry = baton_core::registry::Registry::open(&bus.js).await?;
    for (path, source) in EXAMPLES {
        let wf = baton_workflow::compile(source).map_err(|p| anyhow::anyhow!("{path}: {p}"))?;
        let triggers: Vec<String> = wf.triggers.iter().map(|t| t.ty.clone()).collect();
        let (version, _) = registry.apply(&wf.name, source, triggers.clone()).await?;
        let on = if triggers.is_empty() {
            String::new()
        } else {
            format!(", started by {}", triggers.join(", "))
        };
        println!("  workflow {} v{version} from {path}{on}", wf.name);
    }

    let shutdown = baton_core::shutdown::on_signal();
    // The dev stack accepts webhooks without a token; GitHub deliveries are signed with this secret.
    println!(
        "  gateway on http://{http}: /events (CloudEvents), /webhooks/github (secret {github_secret:?}), /webhooks/alertmanager, /healthz, /readyz"
    );
    let services = tokio::spawn(run_services(
        bus.clone(),
        Some(gateway),
        Duration::from_secs(30),
        shutdown.clone(),
    ));
    let code = if demo {
        let result = run_demo(&bus, http, github_secret).await;
        shutdown.cancel();
        result?
    } else {
        println!(
            "Try: NATS_URL={url} baton run docs/examples/hello.yaml --input '{{\"name\": \"you\"}}'"
        );
        println!("Ctrl-C stops the stack.");
        shutdown.cancelled().await;
        ExitCode::SUCCESS
    };
    // Give the services a bounded time to finish what they hold; un-acked work is redelivered anyway.
    match tokio::time::timeout(Duration::from_secs(10), services).await {
        Ok(joined) => joined.context("services panicked")??,
        Err(_) => tracing::warn!("services did not stop within 10 s"),
    }
    println!("Baton dev stack stopped.");
    Ok(code)
}

/// Delivers the sample GitHub release to the gateway's webhook endpoint, signed as GitHub signs
/// it, and follows the run it starts.
async fn run_demo(
    bus: &baton_core::Bus,
    http: SocketAddr,
    secret: &str,
) -> anyhow::Result<ExitCode> {
    use hmac::{Hmac, Mac};
    let payload: serde_json::Value = serde_json::from_str(SAMPLE_RELEASE)?;
    let source = payload["repository"]["url"]
        .as_str()
        .unwrap_or("https://github.com")
        .to_owned();
    // Each demo is a new delivery, so it starts a new run.
    let delivery = baton_core::event::new_run_id();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(SAMPLE_RELEASE.as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let client = reqwest::Client::new();
    let url = format!("http://{http}/webhooks/github");
    // The server may still be binding its port.
    let mut tries = 0;
    let answer = loop {
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .header("user-agent", "GitHub-Hookshot/baton-demo")
            .header("x-github-event", "release")
            .header("x-github-delivery", &delivery)
            .header("x-hub-signature-256", format!("sha256={signature}"))
            .body(SAMPLE_RELEASE)
            .send()
            .await;
        match sent {
            Ok(r) => break r,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context(format!("cannot reach the gateway at {url}")),
        }
    };
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("the gateway refused the sample delivery: {status} {body}");
    }
    println!(
        "\nDelivered a GitHub `release` webhook (published, {source}, delivery {delivery}) to {url}: {status} {body}"
    );
    let run_id = baton_core::event::triggered_run_id("release", &source, &delivery);
    println!("It starts run {run_id} of workflow release:");
    let ending = runs::follow(bus, &run_id, Duration::from_secs(60)).await?;
    println!(
        "\nThe stack stops now and keeps its data. To look again: `baton dev` in one terminal, then"
    );
    println!("`baton runs show {run_id}` in another.");
    Ok(if ending == baton_core::event::Ending::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
