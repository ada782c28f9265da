//! The gateway: where external events enter Baton.
//!
//! - [`http`]: the HTTP server: CloudEvents, GitHub and Alertmanager webhooks, health;
//! - [`github`], [`alertmanager`]: the pure mappings of webhook deliveries to CloudEvents;
//! - [`ingress`]: storing accepted events in `BATON_EVENTS`;
//! - [`triggers`]: the consumer of `BATON_EVENTS` that starts a run of every workflow whose trigger
//!   matches an event, with the trigger's flow control ([`flow`]).

pub mod alertmanager;
pub mod flow;
pub mod github;
pub mod http;
pub mod ingress;
pub mod triggers;

use std::net::SocketAddr;

use baton_core::Bus;
use baton_core::shutdown::CancellationToken;

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The HTTP server; `None` runs only the trigger consumer.
    pub http: Option<HttpOptions>,
}

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub listen: SocketAddr,
    /// The bearer token required on `/events` and `/webhooks/alertmanager`; `None`: no token.
    pub token: Option<String>,
    /// The secret GitHub signs deliveries with; `None` disables `/webhooks/github`.
    pub github_secret: Option<String>,
    /// Largest request body accepted.
    pub max_bytes: usize,
    /// Origins that pass the webhook handshake; empty: any.
    pub allowed_origins: Vec<String>,
}

/// A request the gateway refuses: the status and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: ::http::StatusCode,
    pub message: String,
}

impl Rejection {
    pub fn new(status: ::http::StatusCode, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot listen on {addr}: {source}. Is another process using the port? Choose another with --http."
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Triggers(#[from] triggers::Error),
}

/// Runs the HTTP server and the trigger consumer until `shutdown` is cancelled.
pub async fn run(bus: Bus, options: Options, shutdown: CancellationToken) -> Result<(), Error> {
    let triggers = triggers::Triggers::new(bus.clone()).await?;
    let server = async {
        match options.http {
            Some(http) => http::serve(http.listen, bus.clone(), http, shutdown.clone()).await,
            None => Ok(()),
        }
    };
    let (served, triggered) = tokio::join!(server, triggers.run(shutdown.clone()));
    served?;
    triggered?;
    Ok(())
}
