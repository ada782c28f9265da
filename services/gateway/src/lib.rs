//! The gateway: where external events enter Baton.
//!
//! - [`http`]: the HTTP server: CloudEvents, GitHub and Alertmanager webhooks, health;
//! - [`admit`]: the checks an event passes before it is accepted, so that what is accepted is kept;
//! - [`github`], [`alertmanager`]: the pure mappings of webhook deliveries to CloudEvents;
//! - [`ingress`]: storing accepted events in `BATON_EVENTS`;
//! - [`triggers`]: the consumer of `BATON_EVENTS` that starts a run of every workflow whose trigger
//!   matches an event, with the trigger's flow control ([`flow`]).

pub mod admit;
pub mod alertmanager;
pub mod flow;
pub mod github;
pub mod http;
pub mod ingress;
pub mod triggers;

use std::net::SocketAddr;

use baton_core::Bus;
use baton_core::shutdown::CancellationToken;

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub listen: SocketAddr,
    /// The bearer token required on `/events` and `/webhooks/alertmanager`; `None`: no token.
    pub token: Option<String>,
    /// The secret GitHub signs deliveries with; `None` disables `/webhooks/github`.
    pub github_secret: Option<String>,
    /// Largest request body accepted, and `BATON_MAX_EVENT_BYTES`: the largest message (an event,
    /// the run request that embeds it) every Baton decoder accepts ([`admit::Limits`]).
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
        "cannot listen on {addr}: {error}. Is another process using the port? Choose another with --http."
    )]
    Listen {
        addr: SocketAddr,
        // Not `source`: the message holds it already, and `{:#}` would print it twice.
        error: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Triggers(#[from] triggers::Error),
}

/// Runs the HTTP server (bound beforehand with [`http::Server::bind`], so that a port in use fails
/// before anything starts) and the trigger consumer until `shutdown` is cancelled. Either failing
/// stops the other and is returned at once: a gateway that cannot serve must not keep running.
pub async fn run(
    bus: Bus,
    http: Option<http::Server>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let triggers = triggers::Triggers::new(bus.clone()).await?;
    let stop = shutdown.child_token();
    let stop_on_error = |result: Result<(), Error>| {
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let server = async {
        match http {
            Some(server) => stop_on_error(server.serve(bus.clone(), stop.clone()).await),
            None => Ok(()),
        }
    };
    let triggered = async { stop_on_error(triggers.run(stop.clone()).await.map_err(Error::from)) };
    let (served, triggered) = tokio::join!(server, triggered);
    served?;
    triggered?;
    Ok(())
}
