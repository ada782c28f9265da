//! The gateway's HTTP server.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use baton_core::Bus;
use baton_core::shutdown::CancellationToken;

use crate::Error;

/// The gateway's routes.
pub fn router(bus: Bus) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(bus)
}

/// Ready when NATS is connected.
async fn ready(State(bus): State<Bus>) -> (StatusCode, &'static str) {
    match bus.client.connection_state() {
        async_nats::connection::State::Connected => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS"),
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(addr: SocketAddr, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    tracing::info!(%addr, "gateway listening");
    axum::serve(listener, router(bus))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(Error::Serve)
}
