//! The step runner: executes step requests of its kinds from the journal.
//!
//! Each kind has one durable pull consumer, `runner-<kind>`, shared by every runner instance that
//! serves the kind. A request is acked only after its outcome event is stored. While a step runs, the
//! runner sends progress acks so JetStream does not redeliver it; if the runner dies, JetStream
//! redelivers the request after `ack_wait` and another runner (or this one, restarted) executes the
//! same attempt again with the same idempotency key.

pub mod kinds;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use baton_core::event::{
    self, RunEvent, StepActivity, StepCompleted, StepError, StepFailed, StepRequested,
};
use baton_core::shutdown::{CancellationToken, until_ok};
use baton_core::spans::{self, Outcome};
use baton_core::telemetry;
use baton_core::trace::Trace;
use baton_core::{Bus, binding, dlq, secrets, subjects};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// What a handler knows about the attempt it executes.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub run_id: String,
    pub step: String,
    /// The item of a `for-each` step.
    pub item: Option<u32>,
    pub attempt: u32,
    /// `true` when this executes the step's compensation (the `compensate` of the workflow).
    pub compensation: bool,
    /// The same for every attempt and every redelivery of a step.
    pub idempotency_key: String,
    /// How many times JetStream has delivered this request (more than 1 after a runner died).
    pub delivered: i64,
    /// Cancelled when the runner shuts down or the step times out.
    pub cancel: CancellationToken,
}

/// A step kind's implementation: input (the step's evaluated `with`) to outputs.
pub type Handler =
    Arc<dyn Fn(Value, StepContext) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// Runner settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name of this instance, recorded in outcome events.
    pub instance: String,
    /// Steps executed at once by this instance, over all kinds.
    pub concurrency: usize,
    /// How long JetStream waits for an ack (or progress) before redelivering a request.
    pub ack_wait: Duration,
    /// After this many deliveries of one request the attempt fails instead of running again.
    pub max_deliveries: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            instance: format!("runner-{}", std::process::id()),
            concurrency: 64,
            ack_wait: Duration::from_secs(30),
            max_deliveries: 5,
        }
    }
}

const SOURCE: &str = "baton/runner";

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    #[error("`{0}` is not a valid step kind: use letters, digits, `-` and `_`")]
    BadKind(String),
}

/// The permanent error of an `emit` step whose input references secrets `names`.
fn emit_with_secrets(names: &std::collections::BTreeSet<String>) -> StepError {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    StepError {
        message: format!(
            "the event of an `emit` step cannot carry secrets, and its input references {}: an \
             event is stored in clear in BATON_EVENTS, so Baton does not resolve secrets in it. \
             Let the step that uses the secret read `.secrets.<name>` in its own `with`",
            names.join(", ")
        ),
        retryable: false,
        code: Some("bad-input".into()),
    }
}

fn jserr<E: std::fmt::Display>(e: E) -> Error {
    Error::JetStream(e.to_string())
}

pub struct Runner {
    bus: Bus,
    options: Options,
    handlers: HashMap<String, Handler>,
}

impl Runner {
    /// A runner for the given kinds and their handlers (see [`kinds::builtin`]).
    pub fn new(bus: Bus, options: Options, handlers: HashMap<String, Handler>) -> Runner {
        Runner {
            bus,
            options,
            handlers,
        }
    }

    /// Runs until `shutdown` is cancelled. Steps in progress at that moment are abandoned without an
    /// ack, so JetStream hands them to another runner.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let js = &self.bus.js;
        let Some(stream) = until_ok("get stream BATON_RUNS", &shutdown, || {
            js.get_stream(baton_core::streams::RUNS)
        })
        .await
        else {
            return Ok(());
        };
        let permits = Arc::new(Semaphore::new(self.options.concurrency));
        let mut tasks = Vec::new();
        for (kind, handler) in self.handlers {
            if !subjects::is_token(&kind) {
                return Err(Error::BadKind(kind));
            }
            let config = consumer::pull::Config {
                durable_name: Some(format!("runner-{kind}")),
                filter_subjects: subjects::step_requests(&kind),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.options.ack_wait,
                max_ack_pending: 10_000,
                ..Default::default()
            };
            let Some(consumer) = until_ok("create the runner's consumers", &shutdown, || {
                stream.create_consumer(config.clone())
            })
            .await
            else {
                return Ok(());
            };
            let consumer: consumer::PullConsumer = consumer;
            let worker = Worker {
                kind: kind.clone(),
                handler,
                bus: self.bus.clone(),
                options: self.options.clone(),
                permits: permits.clone(),
            };
            tasks.push(tokio::spawn(worker.run(consumer, shutdown.clone())));
        }
        tracing::info!(instance = %self.options.instance, "runner started");
        for t in futures::future::join_all(tasks).await {
            t.map_err(jserr)??;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Worker {
    kind: String,
    handler: Handler,
    bus: Bus,
    options: Options,
    permits: Arc<Semaphore>,
}

impl Worker {
    async fn run(
        self,
        consumer: consumer::PullConsumer,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        // Pull no more than can run at once: a request waiting in the client's buffer gets no
        // progress acks, and would be redelivered (and count as a lost delivery) if it waited long.
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.options.concurrency.max(1))
            .messages()
            .await
            .map_err(jserr)?;
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                p = self.permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            };
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => match next {
                    None => return Ok(()),
                    Some(Err(error)) => {
                        tracing::debug!(kind = %self.kind, %error, "pull error; retrying");
                        continue;
                    }
                    Some(Ok(m)) => m,
                },
            };
            let worker = self.clone();
            let cancel = shutdown.child_token();
            tokio::spawn(async move {
                worker.execute(message, cancel).await;
                drop(permit);
            });
        }
    }

    async fn execute(&self, message: jetstream::Message, cancel: CancellationToken) {
        let decoded = binding::decode(message.headers.as_ref(), &message.payload)
            .map_err(|e| e.to_string())
            .and_then(|ce| {
                // The spans of the attempts the step depended on, for its span to link to.
                let links = ce
                    .extension(spans::LINKS_EXTENSION)
                    .map(|v| spans::parse_links(&v.to_string()))
                    .unwrap_or_default();
                match RunEvent::from_message(&message.subject, &ce) {
                    Ok(RunEvent::StepRequested(r)) => Ok((r, false, event::trace(&ce), links)),
                    Ok(RunEvent::CompensationRequested(r)) => {
                        Ok((r, true, event::trace(&ce), links))
                    }
                    Ok(other) => Err(format!(
                        "expected a step or compensation request, got {}",
                        other.ty()
                    )),
                    Err(e) => Err(e.to_string()),
                }
            });
        let (request, compensation, trace, links) = match decoded {
            Ok(d) => d,
            Err(reason) => {
                dlq::reject(&self.bus.js, "runner", &message, &reason).await;
                return;
            }
        };
        // The request's context: the run's trace, the run span as parent (derived from the run
        // when the request has none, so that every runner agrees).
        let trace = trace.unwrap_or_else(|| {
            spans::run_context(&spans::fallback_trace(&request.run_id), &request.run_id)
        });
        // Log lines about the attempt carry its trace and span ids.
        let span = telemetry::ids_span(
            &trace.trace_id,
            &spans::request_span_id(&request, compensation),
        );
        let job = Job {
            request,
            compensation,
            trace,
            links,
        };
        self.execute_attempt(message, cancel, job)
            .instrument(span)
            .await
    }

    /// Executes an attempt and stores its outcome; then exports the attempt's span.
    async fn execute_attempt(
        &self,
        message: jetstream::Message,
        cancel: CancellationToken,
        job: Job,
    ) {
        let Job {
            request,
            compensation,
            trace,
            links,
        } = job;
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        if delivered > 1 {
            metrics::counter!(baton_core::metrics::REDELIVERIES, "consumer" => format!("runner-{}", request.kind)).increment(1);
        }
        let attempt = Attempt {
            request: &request,
            compensation,
            trace: &trace,
            delivered,
            runner: self,
        };
        let started = Instant::now();
        let began = chrono::Utc::now();
        let outcome = if delivered > self.options.max_deliveries {
            Err(StepError {
                message: format!(
                    "the request was delivered {delivered} times without an outcome; runners kept dying or failing"
                ),
                retryable: false,
                code: Some("runner-lost".into()),
            })
        } else {
            if delivered > 1 {
                tracing::info!(run = %request.run_id, step = %request.step, delivered, "redelivered request: executing the attempt again with the same idempotency key");
            }
            // A redelivery is announced at once (someone should know a runner was lost); a first
            // delivery only once it has run for ANNOUNCE_AFTER, so a quick step costs no write.
            if delivered > 1 {
                attempt.announce(false, started).await;
            }
            self.run_handler(&attempt, cancel.clone(), &message, started)
                .await
        };
        if cancel.is_cancelled() && outcome.is_err() {
            // Shutting down: leave the request un-acked for another runner.
            return;
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let ended = chrono::Utc::now();
        let mut event = attempt.outcome(outcome, elapsed_ms);
        // An outcome larger than the server takes could never be stored: fail the attempt instead
        // of retrying forever.
        let size = {
            let (headers, body) = binding::encode(&event.to_cloudevent(SOURCE, &trace));
            let header_bytes: usize = headers
                .iter()
                .map(|(name, values)| {
                    let name: &str = name.as_ref();
                    values
                        .iter()
                        .map(|v| name.len() + v.as_str().len() + 4)
                        .sum::<usize>()
                })
                .sum();
            body.len() + header_bytes
        };
        let limit = self.bus.client.server_info().max_payload;
        if size > limit {
            event = attempt.outcome(
                Err(StepError {
                    message: format!(
                        "the step's output is {size} bytes, more than the {limit} bytes a message may have (the server's max_payload): output a reference to large data, not the data"
                    ),
                    retryable: false,
                    code: Some("output-too-large".into()),
                }),
                elapsed_ms,
            );
        }
        // Keep trying to store the outcome (say, while a cluster elects a stream leader) and keep
        // the request ours meanwhile: handing it back would run the step again.
        let mut pause = Duration::from_millis(100);
        loop {
            match self.bus.store(SOURCE, [(&event, &trace)]).await {
                Ok(()) => {
                    // Acked only now: a runner that dies before this point gets the request again.
                    let _ = message.ack().await;
                    let outcome = match &event {
                        RunEvent::StepFailed(f) | RunEvent::CompensationFailed(f) => {
                            Outcome::Failed(f.error.clone())
                        }
                        _ => Outcome::Completed,
                    };
                    tracing::debug!(run = %request.run_id, step = %request.step, attempt = request.attempt, compensation, elapsed_ms, failed = matches!(outcome, Outcome::Failed(_)), "attempt done");
                    let result = if matches!(outcome, Outcome::Failed(_)) {
                        "failed"
                    } else {
                        "completed"
                    };
                    metrics::counter!(baton_core::metrics::STEPS, "kind" => request.kind.clone(), "outcome" => result, "compensation" => compensation.to_string()).increment(1);
                    metrics::histogram!(baton_core::metrics::STEP_DURATION, "kind" => request.kind.clone()).record(elapsed_ms as f64 / 1000.0);
                    telemetry::export([spans::attempt_span(&spans::Attempt {
                        request: &request,
                        compensation,
                        context: &trace,
                        links: &links,
                        runner: Some(&self.options.instance),
                        delivered: delivered as u32,
                        start: began,
                        end: ended,
                        outcome,
                    })]);
                    return;
                }
                Err(error) if cancel.is_cancelled() => {
                    tracing::warn!(run = %request.run_id, step = %request.step, %error, "shutting down before the outcome was stored; the request goes to another runner");
                    return;
                }
                Err(error) => {
                    tracing::warn!(run = %request.run_id, step = %request.step, %error, "cannot store the outcome yet; retrying");
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Runs the handler with the secrets its input references resolved, and every secret's value
    /// masked in what it returns: a secret's value is never published.
    async fn run_handler(
        &self,
        attempt: &Attempt<'_>,
        cancel: CancellationToken,
        message: &jetstream::Message,
        started: Instant,
    ) -> Result<Value, StepError> {
        let mut input = attempt.request.input.clone();
        let mut resolved = std::collections::BTreeMap::new();
        // Only the references the coordinator placed, never text that looks like one: that can
        // come from anyone who sends an event or starts a run.
        let placed = &attempt.request.secrets;
        let names = secrets::names(placed);
        if !names.is_empty() && attempt.request.kind == kinds::EMIT {
            // An event is stored in clear in BATON_EVENTS and read by every workflow it starts, so
            // a secret is never resolved into one. `baton apply` refuses an `emit` that reads
            // `.secrets`; this holds for requests written otherwise.
            return Err(emit_with_secrets(&names));
        }
        if !names.is_empty() {
            let store = secrets::Store::open(&self.bus.js).await;
            for name in names {
                let value = store.get(&name).await.map_err(|m| StepError {
                    message: m.message,
                    retryable: m.transient,
                    code: Some("secret-missing".into()),
                })?;
                resolved.insert(name, value);
            }
            secrets::resolve(&mut input, placed, &resolved).map_err(|e| StepError {
                message: e.to_string(),
                retryable: false,
                code: Some("bad-input".into()),
            })?;
        }
        match self.invoke(attempt, input, cancel, message, started).await {
            Ok(mut output) => {
                secrets::mask(&mut output, &resolved);
                Ok(output)
            }
            Err(mut error) => {
                error.message = secrets::mask_text(&error.message, &resolved);
                Err(error)
            }
        }
    }

    /// Runs the handler, with progress acks and heartbeats while it runs, and the step's timeout if
    /// it has one.
    async fn invoke(
        &self,
        attempt: &Attempt<'_>,
        input: Value,
        cancel: CancellationToken,
        message: &jetstream::Message,
        started: Instant,
    ) -> Result<Value, StepError> {
        let request = attempt.request;
        let ctx = StepContext {
            run_id: request.run_id.clone(),
            step: request.step.clone(),
            item: request.item,
            attempt: request.attempt,
            compensation: attempt.compensation,
            idempotency_key: request.idempotency_key.clone(),
            delivered: attempt.delivered,
            cancel: cancel.clone(),
        };
        let work = (self.handler)(input, ctx);
        let timeout = request
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(Duration::MAX);
        // The first progress ack is due a period from now. (Awaiting an interval's immediate first
        // tick instead costs a timer turn, about 1 ms, on every step.)
        let period = self.options.ack_wait / 3;
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tokio::pin!(work);
        let deadline = tokio::time::sleep(timeout.min(Duration::from_secs(365 * 24 * 3600)));
        tokio::pin!(deadline);
        let announce = tokio::time::sleep(ANNOUNCE_AFTER);
        tokio::pin!(announce);
        let mut announced = attempt.delivered > 1;
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = &mut announce, if !announced => {
                    announced = true;
                    attempt.announce(false, started).await;
                }
                _ = progress.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                    attempt.announce(true, started).await;
                }
                _ = &mut deadline => {
                    cancel.cancel();
                    return Err(StepError::timeout(timeout));
                }
                _ = cancel.cancelled() => {
                    return Err(StepError { message: "the runner is shutting down".into(), retryable: true, code: Some("shutdown".into()) });
                }
            }
        }
    }
}

/// A first delivery is announced (`step.started`) only when it runs this long: most steps end
/// sooner, and their outcome says all the announcement would.
pub const ANNOUNCE_AFTER: Duration = Duration::from_secs(1);

/// A request as received: what it asks for, its trace context, the spans it depended on.
struct Job {
    request: StepRequested,
    compensation: bool,
    trace: Trace,
    links: Vec<String>,
}

/// One delivery of a request being executed.
struct Attempt<'a> {
    request: &'a StepRequested,
    compensation: bool,
    trace: &'a Trace,
    delivered: i64,
    runner: &'a Worker,
}

impl Attempt<'_> {
    /// Publishes `step.started` (or a heartbeat). Informational, so a failure is only logged: the
    /// outcome event is what counts.
    async fn announce(&self, heartbeat: bool, started: Instant) {
        let r = self.request;
        let activity = StepActivity {
            run_id: r.run_id.clone(),
            step: r.step.clone(),
            item: r.item,
            kind: r.kind.clone(),
            attempt: r.attempt,
            compensation: self.compensation,
            runner: self.runner.options.instance.clone(),
            delivered: self.delivered as u32,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        let event = if heartbeat {
            RunEvent::StepHeartbeat(activity)
        } else {
            RunEvent::StepStarted(activity)
        };
        let (mut headers, body) = binding::encode(&event.to_cloudevent(SOURCE, self.trace));
        if heartbeat {
            // Heartbeats only matter while a step runs: the server deletes them after a day.
            headers.insert("Nats-TTL", "24h");
        }
        let js = &self.runner.bus.js;
        if let Err(error) = js
            .publish_with_headers(event.subject(self.runner.bus.partitions), headers, body)
            .await
        {
            tracing::debug!(run = %r.run_id, step = %r.step, %error, "cannot publish step activity");
        }
    }

    /// The outcome event of the attempt.
    fn outcome(&self, outcome: Result<Value, StepError>, duration_ms: u64) -> RunEvent {
        let r = self.request;
        let runner = self.runner.options.instance.clone();
        match outcome {
            Ok(output) => {
                let done = StepCompleted {
                    run_id: r.run_id.clone(),
                    step: r.step.clone(),
                    item: r.item,
                    kind: r.kind.clone(),
                    attempt: r.attempt,
                    output,
                    runner,
                    duration_ms,
                };
                if self.compensation {
                    RunEvent::CompensationCompleted(done)
                } else {
                    RunEvent::StepCompleted(done)
                }
            }
            Err(error) => {
                let failed = StepFailed {
                    run_id: r.run_id.clone(),
                    step: r.step.clone(),
                    item: r.item,
                    kind: r.kind.clone(),
                    attempt: r.attempt,
                    error,
                    runner,
                };
                if self.compensation {
                    RunEvent::CompensationFailed(failed)
                } else {
                    RunEvent::StepFailed(failed)
                }
            }
        }
    }
}
