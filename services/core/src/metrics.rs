//! Prometheus metrics: every service can serve `/metrics` (`--metrics ADDR`). The names are here,
//! in one place; the services count with the `metrics` macros, which cost nothing when no exporter
//! is installed.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::shutdown::CancellationToken;

/// Runs started (their first step requested or the run admitted), by `workflow`.
pub const RUNS_STARTED: &str = "baton_runs_started_total";
/// Runs ended, by `workflow` and `outcome` (`succeeded`, `failed`, `cancelled`, `compensated`,
/// `compensation_failed`).
pub const RUNS_ENDED: &str = "baton_runs_ended_total";
/// Step attempts executed by a runner, by `kind` and `outcome` (`completed`, `failed`), and
/// whether it was a `compensation`.
pub const STEPS: &str = "baton_steps_total";
/// Seconds a step attempt took on its runner, by `kind`.
pub const STEP_DURATION: &str = "baton_step_duration_seconds";
/// Requests delivered again (a runner or coordinator died, or a request waited too long), by
/// `consumer`.
pub const REDELIVERIES: &str = "baton_redeliveries_total";
/// Dead letters stored, by `origin`.
pub const DEAD_LETTERS: &str = "baton_dead_letters_total";
/// Run requests for a run that already exists, which started nothing.
pub const DUPLICATE_REQUESTS: &str = "baton_duplicate_requests_total";
/// Failures that are retried (a timeout, a leader election, a registry that cannot be read), by
/// `service`.
pub const TRANSIENT_FAILURES: &str = "baton_transient_failures_total";
/// Events accepted by the gateway, by `origin` (`http`, `github`, `alertmanager`).
pub const EVENTS_ACCEPTED: &str = "baton_events_accepted_total";
/// Requests the gateway refused, by `status`.
pub const EVENTS_REFUSED: &str = "baton_events_refused_total";
/// Runs requested by trigger matching, by `workflow`.
pub const RUNS_TRIGGERED: &str = "baton_runs_triggered_total";
/// Messages not yet delivered to a consumer (its lag), by `stream` and `consumer`.
pub const CONSUMER_PENDING: &str = "baton_consumer_pending";
/// Messages delivered to a consumer and not yet acknowledged, by `stream` and `consumer`.
pub const CONSUMER_ACK_PENDING: &str = "baton_consumer_ack_pending";

/// Serves `/metrics` on `addr` (any path answers) for the rest of the process's life.
pub fn serve(addr: SocketAddr) -> Result<(), crate::Error> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(STEP_DURATION.into()),
            &[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0,
            ],
        )
        .map_err(|e| crate::Error::invalid(e.to_string()))?
        .install()
        .map_err(|e| crate::Error::permanent(format!("cannot serve metrics on {addr}: {e}")))?;
    describe();
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(RUNS_STARTED, "Runs started, by workflow.");
    describe_counter!(RUNS_ENDED, "Runs ended, by workflow and outcome.");
    describe_counter!(
        DUPLICATE_REQUESTS,
        "Run requests for a run that already exists; they started nothing."
    );
    describe_counter!(
        TRANSIENT_FAILURES,
        "Failures retried with backoff (timeouts, leader elections), by service."
    );
    describe_counter!(
        STEPS,
        "Step attempts executed, by kind, outcome and compensation."
    );
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "Duration of step attempts, by kind."
    );
    describe_counter!(REDELIVERIES, "Messages delivered again, by consumer.");
    describe_counter!(DEAD_LETTERS, "Dead letters stored, by origin.");
    describe_counter!(
        EVENTS_ACCEPTED,
        "Events accepted by the gateway, by origin."
    );
    describe_counter!(
        EVENTS_REFUSED,
        "Requests refused by the gateway, by status."
    );
    describe_counter!(
        RUNS_TRIGGERED,
        "Runs requested by trigger matching, by workflow."
    );
    describe_gauge!(
        CONSUMER_PENDING,
        "Messages not yet delivered to a consumer (lag)."
    );
    describe_gauge!(
        CONSUMER_ACK_PENDING,
        "Messages delivered and not yet acknowledged."
    );
}

/// Publishes the lag of `consumers` ((stream, durable name)) every `every` until `shutdown`.
pub fn watch_consumers(
    js: jetstream::Context,
    consumers: Vec<(String, String)>,
    every: Duration,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            for (stream, name) in &consumers {
                let Ok(s) = js.get_stream(stream).await else {
                    continue;
                };
                if let Ok(info) = s.consumer_info(name).await {
                    let labels = [("stream", stream.clone()), ("consumer", name.clone())];
                    metrics::gauge!(CONSUMER_PENDING, &labels).set(info.num_pending as f64);
                    metrics::gauge!(CONSUMER_ACK_PENDING, &labels).set(info.num_ack_pending as f64);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
