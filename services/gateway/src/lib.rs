//! The gateway: where external events enter Baton.
//!
//! - [`http`]: the HTTP server (health and readiness today; CloudEvents and webhook endpoints next);
//! - [`triggers`]: the consumer of `BATON_EVENTS` that starts a run of every workflow whose trigger
//!   matches an event.

pub mod http;
pub mod triggers;

use std::net::SocketAddr;

use baton_core::Bus;
use baton_core::shutdown::CancellationToken;

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the HTTP server listens; `None` runs only the trigger consumer.
    pub listen: Option<SocketAddr>,
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
        match options.listen {
            Some(addr) => http::serve(addr, bus.clone(), shutdown.clone()).await,
            None => Ok(()),
        }
    };
    let (served, triggered) = tokio::join!(server, triggers.run(shutdown.clone()));
    served?;
    triggered?;
    Ok(())
}
