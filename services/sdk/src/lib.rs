//! Write Baton step services in Rust.
//!
//! A step service executes the steps of one kind: workflows name it `uses: service/<kind>`. You write
//! an async handler from the step's input (its evaluated `with`) to its output; the SDK runs it on
//! Baton's own step runner ([`baton_runner::Runner`]), which does everything the wire contract asks
//! (`docs/step-services.md`): the shared durable consumer `runner-<kind>`, `step.started`, progress
//! acks and heartbeats while the handler runs, the step's timeout, storing the outcome with its
//! deterministic id *before* acking the request, the request's trace context, and failing an
//! attempt whose runners keep dying.
//!
//! ```no_run
//! use baton_sdk::{Service, StepError};
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), baton_sdk::Error> {
//!     Service::new("payments") // workflows say `uses: service/payments`
//!         .handler(|input, ctx| async move {
//!             let amount = input["amount"].as_f64().unwrap_or(0.0);
//!             if amount > 1000.0 {
//!                 return Err(StepError::permanent("card declined").with_code("card-declined"));
//!             }
//!             // The key is the same for every attempt and redelivery of this step: charge once per key.
//!             Ok(json!({ "charge_id": format!("ch-{}", ctx.idempotency_key()) }))
//!         })
//!         .compensate(|input, _ctx| async move { Ok(json!({ "refunded": input["charge_id"] })) })
//!         .run_from_env() // NATS_URL, BATON_CONCURRENCY ...; Ctrl-C or SIGTERM stops it
//!         .await
//! }
//! ```
//!
//! A handler is called again with the same [`Context::idempotency_key`] when Baton retries the step
//! or when a service instance died before the outcome was stored: do the side effect once per key.
//! Return [`StepError::retryable`] for errors worth retrying (the workflow's `retry` policy decides
//! how often) and [`StepError::permanent`] for those that are not; a code
//! ([`StepError::with_code`]) lets a retry policy name the error (`on: [card-declined]`).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_core::shutdown::CancellationToken;
use baton_core::streams::Topology;
use baton_core::telemetry::{self, LogFormat};
use baton_runner::StepContext;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

pub use baton_core::Bus;

/// The code of the error a compensation request gets from a service without a compensation handler.
pub const NO_COMPENSATION: &str = "no-compensation";

type Handler =
    Arc<dyn Fn(Value, Context) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// Why an attempt failed, as the handler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    message: String,
    retryable: bool,
    code: Option<String>,
}

impl StepError {
    /// A transient error: the workflow's `retry` policy retries it (by default it retries transient
    /// errors and timeouts).
    pub fn retryable(message: impl fmt::Display) -> StepError {
        StepError {
            message: message.to_string(),
            retryable: true,
            code: None,
        }
    }

    /// An error that retrying will not fix: the step fails for good unless its retry policy names
    /// the error's code (`retry: {on: [card-declined]}`) or `any`.
    pub fn permanent(message: impl fmt::Display) -> StepError {
        StepError {
            message: message.to_string(),
            retryable: false,
            code: None,
        }
    }

    /// A machine-readable code (`card-declined`, `http-503` ...) that retry policies can name.
    pub fn with_code(mut self, code: impl Into<String>) -> StepError {
        self.code = Some(code.into());
        self
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(code) = &self.code {
            write!(f, " ({code})")?;
        }
        Ok(())
    }
}

impl std::error::Error for StepError {}

impl From<StepError> for baton_core::event::StepError {
    fn from(e: StepError) -> Self {
        baton_core::event::StepError {
            message: e.message,
            retryable: e.retryable,
            code: e.code,
        }
    }
}

impl From<baton_core::event::StepError> for StepError {
    fn from(e: baton_core::event::StepError) -> Self {
        StepError {
            message: e.message,
            retryable: e.retryable,
            code: e.code,
        }
    }
}

/// What a handler knows about the attempt it executes.
#[derive(Debug, Clone)]
pub struct Context {
    inner: StepContext,
}

impl Context {
    /// The run the step belongs to.
    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// The step's id in the workflow.
    pub fn step(&self) -> &str {
        &self.inner.step
    }

    /// The item of a `for-each` step (from 0).
    pub fn item(&self) -> Option<u32> {
        self.inner.item
    }

    /// The attempt (from 1): a retry is a new attempt, a redelivery is the same attempt again.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Whether this executes the step's compensation (the workflow's `compensate`).
    pub fn is_compensation(&self) -> bool {
        self.inner.compensation
    }

    /// The same for every attempt and every redelivery of the step: `<run>/<step>`,
    /// `<run>/<step>/<item>` for an item of a `for-each` step, `<run>/<step>/compensate` for a
    /// compensation. Do a side effect once per key.
    pub fn idempotency_key(&self) -> &str {
        &self.inner.idempotency_key
    }

    /// How many times this request was delivered: more than 1 when an instance died (or stopped)
    /// while executing it, and this is the same attempt again.
    pub fn delivered(&self) -> i64 {
        self.inner.delivered
    }

    /// Completes when the handler should stop: the step timed out or the service is shutting down.
    /// The outcome of a handler that stops then is not stored when the service shuts down: the
    /// request goes to another instance.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + '_ {
        self.inner.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// A context for calling a handler in tests: attempt 1 of `step` in `run`, delivered once.
    pub fn for_test(run_id: &str, step: &str) -> Context {
        Context {
            inner: StepContext {
                run_id: run_id.to_owned(),
                step: step.to_owned(),
                item: None,
                attempt: 1,
                compensation: false,
                idempotency_key: format!("{run_id}/{step}"),
                delivered: 1,
                cancel: CancellationToken::new(),
            },
        }
    }

    /// The same context for another attempt (tests).
    pub fn with_attempt(mut self, attempt: u32) -> Context {
        self.inner.attempt = attempt;
        self
    }

    /// The same context as a redelivery (tests).
    pub fn with_delivered(mut self, delivered: i64) -> Context {
        self.inner.delivered = delivered;
        self
    }

    /// The context of the step's compensation (tests): its own key, ending in `/compensate`.
    pub fn into_compensation(mut self) -> Context {
        if !self.inner.compensation {
            self.inner.compensation = true;
            self.inner.idempotency_key.push_str("/compensate");
        }
        self
    }
}

impl From<StepContext> for Context {
    fn from(inner: StepContext) -> Self {
        Context { inner }
    }
}

/// Why a service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the `{0}` service has no handler: call `.handler(...)` before running it")]
    NoHandler(String),
    #[error(
        "`{0}` is not a valid step service name: use letters, digits, `-` and `_` (workflows write `uses: service/<name>`)"
    )]
    BadKind(String),
    #[error(
        "`{0}` is the name of a built-in step kind, whose requests Baton's runners take; give your service another name"
    )]
    BuiltinKind(String),
    #[error("{name}={value:?} is invalid: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Connect(#[from] baton_core::connect::Error),
    #[error(transparent)]
    Runner(#[from] baton_runner::Error),
}

/// A step service: the handler of one step kind, and optionally its compensation.
pub struct Service {
    kind: String,
    handler: Option<Handler>,
    compensate: Option<Handler>,
    options: baton_runner::Options,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("kind", &self.kind)
            .field("handler", &self.handler.is_some())
            .field("compensate", &self.compensate.is_some())
            .field("options", &self.options)
            .finish()
    }
}

fn boxed<F, Fut>(f: F) -> Handler
where
    F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    Arc::new(move |input, ctx| f(input, ctx).boxed())
}

impl Service {
    /// A service for the step kind `kind`: workflows use it as `uses: service/<kind>`.
    pub fn new(kind: impl Into<String>) -> Service {
        let kind = kind.into();
        let options = baton_runner::Options {
            instance: format!("{kind}-{}", std::process::id()),
            ..Default::default()
        };
        Service {
            kind,
            handler: None,
            compensate: None,
            options,
        }
    }

    /// The step kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Executes the steps: input (the step's evaluated `with`) to output (`.steps.<id>.outputs`).
    pub fn handler<F, Fut>(mut self, f: F) -> Service
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        self.handler = Some(boxed(f));
        self
    }

    /// Executes compensations: a workflow step's `compensate: {uses: service/<kind>, with: ...}`
    /// (its input is that `with`). Without one, a compensation request fails permanently with the
    /// code [`NO_COMPENSATION`], so the run ends `compensation_failed` instead of running the
    /// step's handler to undo something.
    pub fn compensate<F, Fut>(mut self, f: F) -> Service
    where
        F: Fn(Value, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        self.compensate = Some(boxed(f));
        self
    }

    /// Steps executed at once by this instance (default 64; `BATON_CONCURRENCY`).
    pub fn concurrency(mut self, n: usize) -> Service {
        self.options.concurrency = n.max(1);
        self
    }

    /// How long without progress before a request goes to another instance (default 30 s;
    /// `BATON_ACK_WAIT` in seconds). While a handler runs, progress is reported every third of it.
    pub fn ack_wait(mut self, wait: Duration) -> Service {
        self.options.ack_wait = wait;
        self
    }

    /// The instance name recorded in the events (`runner`); default `<kind>-<pid>`
    /// (`BATON_INSTANCE`).
    pub fn instance(mut self, name: impl Into<String>) -> Service {
        self.options.instance = name.into();
        self
    }

    /// Calls the handler for `ctx`: the compensation handler for a compensation. This is what the
    /// runner calls; tests can call it directly.
    pub fn execute(
        &self,
        input: Value,
        ctx: Context,
    ) -> BoxFuture<'static, Result<Value, StepError>> {
        dispatch(
            &self.kind,
            self.handler.as_ref(),
            self.compensate.as_ref(),
            input,
            ctx,
        )
    }

    fn check(&self) -> Result<(), Error> {
        if !baton_core::subjects::is_token(&self.kind) {
            return Err(Error::BadKind(self.kind.clone()));
        }
        if baton_workflow::Builtin::from_name(&self.kind).is_some() {
            return Err(Error::BuiltinKind(self.kind.clone()));
        }
        if self.handler.is_none() {
            return Err(Error::NoHandler(self.kind.clone()));
        }
        Ok(())
    }

    /// Serves the kind's step and compensation requests over `bus` until `shutdown` is cancelled.
    /// Steps still running then are stopped ([`Context::cancelled`]) and left un-acked, so
    /// JetStream hands them to another instance after the ack wait.
    pub async fn run(self, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
        self.check()?;
        let kind = self.kind.clone();
        let (handler, compensate) = (self.handler, self.compensate);
        let runner_handler: baton_runner::Handler = Arc::new(move |input, ctx: StepContext| {
            dispatch(
                &kind,
                handler.as_ref(),
                compensate.as_ref(),
                input,
                ctx.into(),
            )
            .map(|r| r.map_err(Into::into))
            .boxed()
        });
        tracing::info!(kind = %self.kind, instance = %self.options.instance, "step service starting");
        let handlers = HashMap::from([(self.kind, runner_handler)]);
        baton_runner::Runner::new(bus, self.options, handlers)
            .run(shutdown)
            .await?;
        Ok(())
    }

    /// Sets up logging, connects (waiting for NATS while it is not up) and runs until Ctrl-C or
    /// SIGTERM. The environment:
    ///
    /// | variable | default | meaning |
    /// |---|---|---|
    /// | `NATS_URL` | `nats://127.0.0.1:4222` | the NATS server (several, comma-separated, for a cluster) |
    /// | `BATON_CONCURRENCY` | 64 (or [`concurrency`](Self::concurrency)) | steps executed at once |
    /// | `BATON_ACK_WAIT` | 30 (or [`ack_wait`](Self::ack_wait)) | seconds without progress before a request goes to another instance |
    /// | `BATON_INSTANCE` | `<kind>-<pid>` | the instance name in the events |
    /// | `BATON_REPLICAS` | 1 | stream replicas, if this service is the first to create Baton's streams |
    /// | `BATON_LOG` | `info,async_nats=warn` | log filter (`RUST_LOG` syntax), to stderr |
    /// | `BATON_LOG_JSON` | | `true` or `1`: log JSON lines |
    ///
    /// The environment wins over the builder's values.
    pub async fn run_from_env(mut self) -> Result<(), Error> {
        let json = matches!(std::env::var("BATON_LOG_JSON").as_deref(), Ok("1" | "true"));
        let format = if json {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
        telemetry::init(format, "info,async_nats=warn");
        self.check()?;
        if let Some(n) = env_number("BATON_CONCURRENCY")? {
            self = self.concurrency(n as usize);
        }
        if let Some(secs) = env_number("BATON_ACK_WAIT")? {
            self = self.ack_wait(Duration::from_secs(secs.max(1)));
        }
        if let Ok(name) = std::env::var("BATON_INSTANCE")
            && !name.is_empty()
        {
            self = self.instance(name);
        }
        let replicas = env_number("BATON_REPLICAS")?.unwrap_or(1) as usize;
        let url = std::env::var("NATS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        let topology = Topology {
            replicas,
            ..Topology::default()
        };
        let shutdown = baton_core::shutdown::on_signal();
        let name = format!("baton-service-{}", self.kind);
        // Started before NATS (or with it, in a compose file): wait for it like Baton's services.
        let Some(bus) = baton_core::connect_waiting(
            &url,
            &name,
            &topology,
            &baton_core::Auth::from_env(),
            &shutdown,
        )
        .await?
        else {
            return Ok(());
        };
        self.run(bus, shutdown).await
    }
}

fn env_number(name: &'static str) -> Result<Option<u64>, Error> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().map(Some).map_err(|_| Error::Env {
            name,
            value: v,
            reason: "expected a whole number".into(),
        }),
        _ => Ok(None),
    }
}

fn dispatch(
    kind: &str,
    handler: Option<&Handler>,
    compensate: Option<&Handler>,
    input: Value,
    ctx: Context,
) -> BoxFuture<'static, Result<Value, StepError>> {
    let chosen = if ctx.is_compensation() {
        compensate
    } else {
        handler
    };
    match chosen {
        Some(h) => h(input, ctx),
        None => {
            let (what, code) = if ctx.is_compensation() {
                (
                    "a compensation handler (`.compensate(...)`)",
                    NO_COMPENSATION,
                )
            } else {
                ("a handler (`.handler(...)`)", "no-handler")
            };
            let error = StepError::permanent(format!(
                "the `{kind}` step service has no {what}, so it cannot execute step {} of run {}",
                ctx.step(),
                ctx.run_id()
            ))
            .with_code(code);
            futures::future::ready(Err(error)).boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Service {
        Service::new("inventory")
            .handler(|input, ctx| async move {
                Ok(json!({"input": input, "key": ctx.idempotency_key(), "attempt": ctx.attempt()}))
            })
            .compensate(|_, ctx| async move { Ok(json!({"undone": ctx.idempotency_key()})) })
    }

    #[tokio::test]
    async fn requests_go_to_the_handler_and_compensations_to_the_compensation_handler() {
        let s = service();
        let ctx = Context::for_test("r1", "reserve").with_attempt(2);
        let out = s.execute(json!({"sku": "a"}), ctx.clone()).await.unwrap();
        assert_eq!(
            out,
            json!({"input": {"sku": "a"}, "key": "r1/reserve", "attempt": 2})
        );
        let out = s.execute(json!({}), ctx.into_compensation()).await.unwrap();
        assert_eq!(out, json!({"undone": "r1/reserve/compensate"}));
    }

    #[tokio::test]
    async fn a_compensation_without_its_handler_fails_permanently() {
        let s = Service::new("inventory").handler(|_, _| async { Ok(Value::Null) });
        let ctx = Context::for_test("r1", "reserve").into_compensation();
        let err = s.execute(json!({}), ctx).await.unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.code(), Some(NO_COMPENSATION));
        assert!(err.message().contains("`inventory`"), "{err}");
    }

    #[test]
    fn errors_convert_to_the_wire_form() {
        let e: baton_core::event::StepError = StepError::permanent("declined")
            .with_code("card-declined")
            .into();
        assert_eq!(
            e,
            baton_core::event::StepError {
                message: "declined".into(),
                retryable: false,
                code: Some("card-declined".into())
            }
        );
        let e = StepError::retryable(std::io::Error::other("reset"));
        assert!(e.is_retryable() && e.code().is_none());
        assert_eq!(e.to_string(), "reset");
        assert_eq!(
            StepError::permanent("x").with_code("y").to_string(),
            "x (y)"
        );
    }

    #[test]
    fn kinds_are_checked_before_connecting() {
        let ok = |s: Service| s.check().map_err(|e| e.to_string());
        assert!(ok(service()).is_ok());
        let err = ok(Service::new("echo").handler(|_, _| async { Ok(Value::Null) })).unwrap_err();
        assert!(err.contains("built-in"), "{err}");
        let err = ok(Service::new("a.b").handler(|_, _| async { Ok(Value::Null) })).unwrap_err();
        assert!(err.contains("not a valid step service name"), "{err}");
        let err = ok(Service::new("x")).unwrap_err();
        assert!(err.contains("no handler"), "{err}");
    }
}
