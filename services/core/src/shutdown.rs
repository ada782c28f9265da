//! One shutdown path: a [`CancellationToken`] cancelled on Ctrl-C or SIGTERM, passed to every service.

pub use tokio_util::sync::CancellationToken;

/// A token that is cancelled when the process receives Ctrl-C or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} },
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs `op` until it succeeds, backing off from 250 ms to 5 s, or until `shutdown` is cancelled
/// (`None`, also while an attempt is under way, so that a stop is prompt). For what a service does
/// when it starts (connecting, getting a stream, creating its consumers): while the server is not
/// up yet or a cluster elects a leader they fail, and the service waits instead of exiting.
pub async fn until_ok<T, E, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut op: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            outcome = op() => outcome,
        };
        match outcome {
            Ok(v) => return Some(v),
            Err(error) => {
                tracing::warn!(%error, "cannot {what} yet; retrying in {pause:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}
