//! `baton`: the command-line tool. Runs the dev stack and each service, and talks to a running Baton.

// These shadow the standard macros in every module below (declared after them), so no output of
// the CLI can panic on a closed pipe: see `out`.
macro_rules! println {
    () => { $crate::out::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write(format_args!("{}\n", format_args!($($arg)*))) };
}
macro_rules! print {
    ($($arg:tt)*) => { $crate::out::write(format_args!($($arg)*)) };
}

mod deadletters;
mod dev;
mod events;
mod out;
mod runs;
mod secrets;
mod server;
mod why;
mod workflows;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use baton_core::shutdown::CancellationToken;
use baton_core::streams::Topology;
use baton_core::telemetry::{self, LogFormat, Service};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "Event-driven workflows for DevOps on NATS JetStream"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "BATON_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct Nats {
    /// The NATS server (JetStream enabled, version 2.12 or newer).
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Stream replicas when Baton creates its streams: 1 on a single server, 3 on a cluster.
    #[arg(long, global = true, env = "BATON_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// A NATS credentials file (user JWT and nkey seed).
    #[arg(long = "nats-creds", global = true, env = "NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// A file holding the user's nkey seed.
    #[arg(long = "nats-nkey", global = true, env = "NATS_NKEY")]
    nats_nkey: Option<PathBuf>,
    /// NATS user (with `--nats-password`).
    #[arg(long = "nats-user", global = true, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(
        long = "nats-password",
        global = true,
        env = "NATS_PASSWORD",
        hide_env_values = true
    )]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(
        long = "nats-token",
        global = true,
        env = "NATS_TOKEN",
        hide_env_values = true
    )]
    nats_token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (turns TLS on).
    #[arg(long = "nats-ca", global = true, env = "NATS_CA")]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    #[arg(long = "nats-cert", global = true, env = "NATS_CERT")]
    nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) of `--nats-cert`.
    #[arg(long = "nats-key", global = true, env = "NATS_KEY")]
    nats_tls_key: Option<PathBuf>,
}

impl Nats {
    fn topology(&self) -> Topology {
        Topology {
            replicas: self.replicas,
            ..Topology::default()
        }
    }

    fn auth(&self) -> baton_core::Auth {
        baton_core::Auth {
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        }
    }

    /// For one-shot commands: fails at once, naming the server, when it cannot be reached.
    async fn connect(&self, name: &str) -> anyhow::Result<baton_core::Bus> {
        let auth = self.auth();
        Ok(baton_core::connect_as(&self.nats_url, name, &self.topology(), &auth).await?)
    }

    /// For services: waits for the server until it is up or `shutdown` (`None`).
    async fn connect_service(
        &self,
        name: &str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<baton_core::Bus>> {
        let (topology, auth) = (self.topology(), self.auth());
        Ok(baton_core::connect_waiting(&self.nats_url, name, &topology, &auth, shutdown).await?)
    }
}

/// A decision on an approval step.
#[derive(Args)]
struct Decision {
    id: String,
    step: String,
    /// Who decides: must be one of the step's approvers when it names any.
    #[arg(long, env = "USER")]
    by: String,
    #[arg(long, default_value = "")]
    comment: String,
    #[command(flatten)]
    nats: Nats,
}

/// Prometheus metrics.
#[derive(Args, Clone)]
struct MetricsArgs {
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. 0.0.0.0:9464.
    #[arg(long = "metrics", env = "BATON_METRICS")]
    addr: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Serves the metrics, with the lag of these consumers ((stream, durable)) refreshed every 5 s.
    fn serve(
        &self,
        bus: &baton_core::Bus,
        consumers: Vec<(String, String)>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let Some(addr) = self.addr else {
            return Ok(());
        };
        baton_core::metrics::serve(addr).map_err(anyhow::Error::msg)?;
        baton_core::metrics::watch_consumers(
            bus.js.clone(),
            consumers,
            Duration::from_secs(5),
            shutdown.clone(),
        );
        Ok(())
    }
}

/// The consumers of a coordinator, a runner of `kinds` and a gateway, for their lag metrics.
fn consumers_of(partitions: u32, kinds: &[String], gateway: bool) -> Vec<(String, String)> {
    use baton_core::streams::{EVENTS, RUNS};
    let mut all: Vec<(String, String)> = (0..partitions)
        .map(|p| (RUNS.to_owned(), format!("coordinator-{p}")))
        .collect();
    if partitions > 0 {
        all.push((EVENTS.to_owned(), "waits".to_owned()));
    }
    all.extend(
        kinds
            .iter()
            .map(|k| (RUNS.to_owned(), format!("runner-{k}"))),
    );
    if gateway {
        all.push((EVENTS.to_owned(), "triggers".to_owned()));
    }
    all
}

/// The gateway's HTTP server.
#[derive(Args, Clone)]
struct HttpArgs {
    /// Address of the HTTP server.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Bearer token required on /events and /webhooks/alertmanager (none: no token is asked).
    #[arg(long, env = "BATON_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Secret of the GitHub webhook; enables /webhooks/github.
    #[arg(long, env = "BATON_GITHUB_SECRET", hide_env_values = true)]
    github_secret: Option<String>,
    /// Origins that may pass the CloudEvents webhook handshake (repeat; none: any origin).
    #[arg(long = "allowed-origin")]
    allowed_origins: Vec<String>,
}

impl HttpArgs {
    fn options(self) -> baton_gateway::HttpOptions {
        baton_gateway::HttpOptions {
            listen: self.http,
            token: self.token,
            github_secret: self.github_secret,
            max_bytes: baton_core::binding::Limits::default().max_bytes,
            allowed_origins: self.allowed_origins,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start a local dev stack: nats-server (installed if needed), coordinator, runners and gateway
    /// in one process, with the bundled example workflows applied.
    Dev(dev::Options),
    /// Start a run of a workflow file, follow its steps, and print the result.
    Run {
        /// The workflow file (YAML or JSON). It is applied to the registry first.
        file: PathBuf,
        /// The run's input, a JSON object.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Give up waiting after this many seconds (the run goes on).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        nats: Nats,
    },
    /// Check workflow files and print every problem as file:line:column, with a hint. Exit code 0:
    /// all valid; 1: problems found; 2: a file could not be read. Needs no NATS server.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Workflows in the registry: list, show, versions, graph, enable, disable, delete.
    Workflows {
        #[command(subcommand)]
        command: workflows::Command,
    },
    /// Store workflow files in the registry as new versions (unchanged files make no version).
    Apply {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        nats: Nats,
    },
    /// Look at runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Approve an approval step that is waiting: the run goes on.
    Approve(Decision),
    /// Reject an approval step that is waiting: the step fails (error code `rejected`).
    Reject(Decision),
    /// Publish a CloudEvent, given by flags or a JSON file, and wait until it is stored.
    Send(events::Send),
    /// Events as they pass.
    Events {
        #[command(subcommand)]
        command: events::Command,
    },
    /// Run every service (coordinator, runner, gateway) in one process against a NATS server.
    Serve {
        #[command(flatten)]
        nats: Nats,
        #[command(flatten)]
        http: HttpArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
        /// Seconds without progress after which a step request goes to another runner.
        #[arg(long, default_value_t = 30)]
        runner_ack_wait: u64,
    },
    /// Secrets that steps reference (`.secrets.NAME`): set, list, delete. Values are never printed.
    Secrets {
        #[command(subcommand)]
        command: secrets::Command,
        #[command(flatten)]
        nats: Nats,
    },
    /// Inspect and re-publish dead letters: input Baton rejected, with the reason.
    Deadletters {
        #[command(subcommand)]
        command: deadletters::Command,
        #[command(flatten)]
        nats: Nats,
    },
    /// Run the saga coordinator.
    Coordinator {
        #[command(flatten)]
        nats: Nats,
        #[command(flatten)]
        metrics: MetricsArgs,
        /// Seconds after which the partitions of a dead coordinator move to another instance.
        #[arg(long, default_value_t = 5)]
        takeover_after: u64,
    },
    /// Run a step runner for the built-in step kinds.
    Runner {
        #[command(flatten)]
        nats: Nats,
        #[command(flatten)]
        metrics: MetricsArgs,
        /// Serve only these kinds (comma-separated, or repeat), e.g. `--kinds exec,http` for a
        /// runner on the machines that may run programs. Default: every built-in kind.
        #[arg(long, value_delimiter = ',', env = "BATON_RUNNER_KINDS")]
        kinds: Vec<String>,
        /// Steps executed at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds without progress after which a request goes to another runner.
        #[arg(long, default_value_t = 30)]
        ack_wait: u64,
    },
    /// Run the gateway: HTTP ingress and trigger matching.
    Gateway {
        #[command(flatten)]
        nats: Nats,
        #[command(flatten)]
        http: HttpArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Print the path of a nats-server that Baton can use, installing the pinned one if needed.
    NatsServer,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// List runs, oldest first: id, workflow, status, start, duration.
    List {
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs with this status: running, compensating, succeeded, failed, cancelled,
        /// compensated, compensation_failed.
        #[arg(long)]
        status: Option<String>,
        /// Only runs started this long ago or later, e.g. 30m, 1d.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Show at most this many, the newest.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        nats: Nats,
    },
    /// Explain what a run that has not ended waits for, and since when.
    Why {
        id: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Print a run's trace as an OTLP/JSON file (an `ExportTraceServiceRequest`, as Jaeger
    /// imports it), built from the journal with the ids of the live spans:
    /// `baton runs trace ID > run.json`.
    Trace {
        id: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Print a run's CloudEvents as stored, one JSON event per line.
    Events {
        id: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Print a run: its status, steps, output and events.
    Show {
        id: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Print a run's events as they happen until it ends. Exit code 0 if it succeeded.
    Follow {
        id: String,
        /// Give up waiting after this many seconds (the run goes on).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[command(flatten)]
        nats: Nats,
    },
    /// Cancel a run: no step starts any more, and completed steps are compensated.
    Cancel {
        id: String,
        /// Recorded in the run's events.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Retry the failed compensation of a run that ended compensation_failed.
    RetryCompensation {
        id: String,
        #[command(flatten)]
        nats: Nats,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = if cli.log_json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command, format)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, format: LogFormat) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        Command::Dev(options) => {
            // The demo's output is the run itself; keep the logs for problems.
            let _telemetry = telemetry::init_service(
                format,
                if options.demo {
                    "warn"
                } else {
                    "info,async_nats=warn"
                },
                &Service {
                    otlp_endpoint: options.otlp.clone(),
                    ..Service::new("baton", "baton")
                },
            );
            dev::run(options).await
        }
        Command::Run {
            file,
            input,
            timeout,
            nats,
        } => {
            telemetry::init(format, "warn");
            let input: serde_json::Value = serde_json::from_str(&input)
                .context("--input must be a JSON object, e.g. '{\"name\": \"x\"}'")?;
            let bus = nats.connect("baton-cli").await?;
            let (workflow, version) = runs::apply_file(&bus, &file).await?;
            let name = &workflow.name;
            workflow
                .resolve_input(&input)
                .map_err(|e| anyhow::anyhow!("invalid --input for {name}: {e}"))?;
            let run_id = runs::start(&bus, name, version, input).await?;
            println!("Started run {run_id} of {name} v{version}");
            let ending = runs::follow(&bus, &run_id, Duration::from_secs(timeout)).await?;
            Ok(exit_code(ending))
        }
        Command::Apply { files, nats } => {
            telemetry::init(format, "warn");
            workflows::apply(&files, &nats).await
        }
        Command::Validate { files } => Ok(workflows::validate(&files)),
        Command::Workflows { command } => {
            telemetry::init(format, "warn");
            workflows::run(command).await
        }
        Command::Runs { command } => {
            telemetry::init(format, "warn");
            match command {
                RunsCommand::List {
                    workflow,
                    status,
                    since,
                    limit,
                    nats,
                } => {
                    let bus = nats.connect("baton-cli").await?;
                    runs::list(&bus, workflow.as_deref(), status.as_deref(), since, limit).await?;
                }
                RunsCommand::Why { id, nats } => {
                    for line in why::why(&nats.connect("baton-cli").await?, &id).await? {
                        println!("{line}");
                    }
                }
                RunsCommand::Events { id, nats } => {
                    runs::events(&nats.connect("baton-cli").await?, &id).await?;
                }
                RunsCommand::Trace { id, nats } => {
                    runs::trace(&nats.connect("baton-cli").await?, &id).await?;
                }
                RunsCommand::Show { id, nats } => {
                    runs::show(&nats.connect("baton-cli").await?, &id).await?;
                }
                RunsCommand::Follow { id, timeout, nats } => {
                    let bus = nats.connect("baton-cli").await?;
                    let ending = runs::follow(&bus, &id, Duration::from_secs(timeout)).await?;
                    return Ok(exit_code(ending));
                }
                RunsCommand::Cancel { id, reason, nats } => {
                    runs::cancel(&nats.connect("baton-cli").await?, &id, reason).await?;
                    println!(
                        "Cancel of run {id} requested; follow it with `baton runs follow {id}`"
                    );
                }
                RunsCommand::RetryCompensation { id, nats } => {
                    runs::retry_compensation(&nats.connect("baton-cli").await?, &id).await?;
                    println!(
                        "Compensation retry of run {id} requested; follow it with `baton runs follow {id}`"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            nats,
            http,
            metrics,
            runner_ack_wait,
        } => {
            let _telemetry = telemetry::init_service(
                format,
                "info,async_nats=warn",
                &Service::new("baton", "baton"),
            );
            // Bound first: a port in use ends the command at once, before anything starts.
            let server = baton_gateway::http::Server::bind(http.options()).await?;
            let shutdown = baton_core::shutdown::on_signal();
            let Some(bus) = nats.connect_service("baton", &shutdown).await? else {
                return Ok(ExitCode::SUCCESS);
            };
            let kinds: Vec<String> = baton_runner::kinds::builtin(bus.client.clone())
                .into_keys()
                .collect();
            metrics.serve(&bus, consumers_of(bus.partitions, &kinds, true), &shutdown)?;
            run_services(
                bus,
                Some(server),
                Duration::from_secs(runner_ack_wait),
                shutdown,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator {
            nats,
            metrics,
            takeover_after,
        } => {
            let _telemetry = telemetry::init_service(
                format,
                "info,async_nats=warn",
                &Service::new("baton-coordinator", "coordinator"),
            );
            let shutdown = baton_core::shutdown::on_signal();
            let Some(bus) = nats.connect_service("baton-coordinator", &shutdown).await? else {
                return Ok(ExitCode::SUCCESS);
            };
            let options = baton_coordinator::Options {
                takeover_after: Duration::from_secs(takeover_after),
                ..Default::default()
            };
            metrics.serve(&bus, consumers_of(bus.partitions, &[], false), &shutdown)?;
            baton_coordinator::Coordinator::new(bus, options)
                .await?
                .run(shutdown)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runner {
            nats,
            metrics,
            kinds: only,
            concurrency,
            ack_wait,
        } => {
            let _telemetry = telemetry::init_service(
                format,
                "info,async_nats=warn",
                &Service::new("baton-runner", "runner"),
            );
            let shutdown = baton_core::shutdown::on_signal();
            let Some(bus) = nats.connect_service("baton-runner", &shutdown).await? else {
                return Ok(ExitCode::SUCCESS);
            };
            let options = baton_runner::Options {
                concurrency,
                ack_wait: Duration::from_secs(ack_wait),
                ..Default::default()
            };
            let mut kinds = baton_runner::kinds::builtin(bus.client.clone());
            if !only.is_empty() {
                let mut known: Vec<&String> = kinds.keys().collect();
                known.sort();
                if let Some(unknown) = only.iter().find(|k| !kinds.contains_key(k.as_str())) {
                    anyhow::bail!(
                        "--kinds: `{unknown}` is not a kind this runner has; it has {}",
                        known
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                kinds.retain(|kind, _| only.contains(kind));
            }
            let served: Vec<String> = kinds.keys().cloned().collect();
            metrics.serve(&bus, consumers_of(0, &served, false), &shutdown)?;
            baton_runner::Runner::new(bus, options, kinds)
                .run(shutdown)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway {
            nats,
            http,
            metrics,
        } => {
            let _telemetry = telemetry::init_service(
                format,
                "info,async_nats=warn",
                &Service::new("baton-gateway", "gateway"),
            );
            // Bound first: a port in use ends the command at once, before anything starts.
            let server = baton_gateway::http::Server::bind(http.options()).await?;
            let shutdown = baton_core::shutdown::on_signal();
            let Some(bus) = nats.connect_service("baton-gateway", &shutdown).await? else {
                return Ok(ExitCode::SUCCESS);
            };
            metrics.serve(&bus, consumers_of(0, &[], true), &shutdown)?;
            baton_gateway::run(bus, Some(server), shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve(d) => decide(format, d, true).await,
        Command::Reject(d) => decide(format, d, false).await,
        Command::Send(send) => {
            telemetry::init(format, "warn");
            events::send(send).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { command } => {
            telemetry::init(format, "warn");
            events::run(command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Secrets { command, nats } => {
            telemetry::init(format, "warn");
            secrets::run(&nats.connect("baton-cli").await?, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Deadletters { command, nats } => {
            telemetry::init(format, "warn");
            let bus = nats.connect("baton-cli").await?;
            deadletters::run(&bus, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::NatsServer => {
            telemetry::init(format, "warn");
            let server =
                baton_core::provision::find_or_install(&baton_core::provision::default_home())?;
            println!("{}", server.path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `baton approve` and `baton reject`.
async fn decide(
    format: LogFormat,
    Decision {
        id,
        step,
        by,
        comment,
        nats,
    }: Decision,
    approved: bool,
) -> anyhow::Result<std::process::ExitCode> {
    telemetry::init(format, "warn");
    let bus = nats.connect("baton-cli").await?;
    runs::decide(&bus, &id, &step, approved, by.clone(), comment).await?;
    let verb = if approved { "Approved" } else { "Rejected" };
    println!("{verb} step {step} of run {id} as {by}; follow it with `baton runs follow {id}`");
    Ok(std::process::ExitCode::SUCCESS)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    baton_workflow::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration: write e.g. 30s, 5m, 2h, 1d"))
}

/// 0 for a run that succeeded, 1 otherwise.
fn exit_code(ending: baton_core::event::Ending) -> std::process::ExitCode {
    if ending == baton_core::event::Ending::Succeeded {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Runs every Baton service in this process until `shutdown` is cancelled.
pub(crate) async fn run_services(
    bus: baton_core::Bus,
    http: Option<baton_gateway::http::Server>,
    runner_ack_wait: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coordinator = baton_coordinator::Coordinator::new(bus.clone(), Default::default()).await?;
    let runner = baton_runner::Runner::new(
        bus.clone(),
        baton_runner::Options {
            ack_wait: runner_ack_wait,
            ..Default::default()
        },
        baton_runner::kinds::builtin(bus.client.clone()),
    );
    // Any service failing stops the others: a half-running stack is worse than a clear error.
    let stop_all = |result: Result<(), String>| {
        if result.is_err() {
            shutdown.cancel();
        }
        result
    };
    let (c, r, g) = tokio::join!(
        async {
            stop_all(
                coordinator
                    .run(shutdown.clone())
                    .await
                    .map_err(|e| format!("coordinator: {e}")),
            )
        },
        async {
            stop_all(
                runner
                    .run(shutdown.clone())
                    .await
                    .map_err(|e| format!("runner: {e}")),
            )
        },
        async {
            stop_all(
                baton_gateway::run(bus.clone(), http, shutdown.clone())
                    .await
                    .map_err(|e| format!("gateway: {e}")),
            )
        },
    );
    c.and(r).and(g).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    /// clap checks the whole command tree (unique argument names across flattened groups and
    /// global flags) only in debug builds, when a command is parsed: check every one here.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
