//! The gateway's HTTP server: CloudEvents (binary, structured, batch), GitHub and Alertmanager
//! webhooks, the CloudEvents webhook abuse-protection handshake, health and readiness.
//!
//! Every accepted request is answered only after JetStream stored its events: `202` then means the
//! events are durable. Before storing, every event passes the checks of [`admit`]: a request that
//! can never succeed (an event the bus would refuse, or whose run request would not fit) gets a
//! `4xx` naming the field and the reason. A failure that may pass (JetStream not answering) is a
//! `503` with `Retry-After`, so the sender retries and nothing it sent is lost (a retry of stored
//! events is dropped as a duplicate).
//!
//! One request cannot starve the others: a batch holds at most [`MAX_BATCH`] events, and requests
//! share the publish-ack slots chunk by chunk ([`ingress::store_sharing`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton_core::shutdown::CancellationToken;
use baton_core::trace::Trace;
use baton_core::{Bus, binding};
use cloudevents::Event;
use serde_json::json;
use subtle::ConstantTimeEq;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{Error, HttpOptions, Rejection, admit, alertmanager, github, ingress};

/// The most events one batch (`application/cloudevents-batch+json`) may hold.
pub const MAX_BATCH: usize = 1_000;

/// Publish-ack slots the requests of one gateway share: well under the JetStream context's 5,000,
/// which the trigger consumer uses too.
const SLOTS: usize = 4 * ingress::CHUNK;

struct Gateway {
    bus: Bus,
    options: HttpOptions,
    slots: Semaphore,
}

/// The gateway's routes.
pub fn router(bus: Bus, options: HttpOptions) -> Router {
    let state = Arc::new(Gateway {
        bus,
        options,
        slots: Semaphore::new(SLOTS),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/events", post(cloudevents).options(handshake))
        .route("/webhooks/github", post(github).options(handshake))
        .route(
            "/webhooks/alertmanager",
            post(alertmanager).options(handshake),
        )
        .with_state(state)
}

/// The HTTP server with its port bound, not serving yet.
pub struct Server {
    listener: TcpListener,
    options: HttpOptions,
}

impl Server {
    /// Binds `options.listen`. Done before anything else starts, so that a port in use is an
    /// error at once, not a gateway that runs without HTTP.
    pub async fn bind(options: HttpOptions) -> Result<Server, Error> {
        let addr = options.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| Error::Listen { addr, error })?;
        Ok(Server { listener, options })
    }

    /// The address bound (its port, when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.options.listen)
    }

    /// Serves until `shutdown` is cancelled; requests in flight are finished first.
    pub async fn serve(self, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
        tracing::info!(addr = %self.local_addr(), "gateway listening");
        axum::serve(self.listener, router(bus, self.options))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(Error::Serve)
    }
}

/// Ready when NATS is connected.
async fn ready(State(g): State<Arc<Gateway>>) -> (StatusCode, &'static str) {
    match g.bus.client.connection_state() {
        async_nats::connection::State::Connected => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS"),
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        metrics::counter!(baton_core::metrics::EVENTS_REFUSED, "status" => self.status.as_u16().to_string())
            .increment(1);
        let mut response =
            (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The body may not have been read: the connection cannot carry another request.
            StatusCode::PAYLOAD_TOO_LARGE => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// `POST /events`: CloudEvents in any HTTP content mode.
async fn cloudevents(
    State(g): State<Arc<Gateway>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    g.authorize(&uri, &headers)?;
    let body = g.read(&headers, body).await?;
    let limits = binding::Limits {
        max_bytes: g.options.max_bytes,
    };
    let events = binding::http::decode(&limits, &headers, &body).map_err(|e| {
        // The CloudEvents HTTP binding: 415 for a content type it does not support, 400 for a
        // malformed event in one it does (structured, batch, binary).
        let status = match &e {
            binding::Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            binding::Error::MediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            binding::Error::NotCloudEvent(_) if has_foreign_content_type(&headers) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Rejection::new(status, e.to_string())
    })?;
    if events.len() > MAX_BATCH {
        return Err(Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the batch holds {} events; the gateway takes at most {MAX_BATCH} per request: send it in several",
                events.len()
            ),
        ));
    }
    g.accept("http", events, &headers).await
}

/// A `Content-Type` that is not a CloudEvents format and has no `ce-*` headers with it: not binary
/// mode, not structured mode.
fn has_foreign_content_type(headers: &HeaderMap) -> bool {
    let cloudevents = content_type(headers).is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/cloudevents")
    });
    headers.contains_key(header::CONTENT_TYPE)
        && !cloudevents
        && !headers.contains_key("ce-specversion")
}

/// `POST /webhooks/github`.
async fn github(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    let Some(secret) = &g.options.github_secret else {
        return Err(Rejection::new(
            StatusCode::NOT_FOUND,
            "GitHub webhooks are not enabled: start the gateway with a secret (--github-secret or BATON_GITHUB_SECRET)",
        ));
    };
    let body = g.read(&headers, body).await?;
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    github::verify(secret.as_bytes(), &body, signature)?;
    if let Some(ct) = content_type(&headers)
        && !binding::is_json_media_type(&ct)
    {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {ct:?} is not supported: set the webhook's content type to application/json"
            ),
        ));
    }
    match github::delivery(&headers, &body)? {
        github::Delivery::Event(event) => g.accept("github", vec![*event], &headers).await,
        github::Delivery::Ping { zen } => Ok((
            StatusCode::OK,
            axum::Json(json!({ "pong": true, "zen": zen })),
        )
            .into_response()),
        github::Delivery::Ignored(reason) => {
            tracing::info!(%reason, "GitHub delivery ignored");
            Ok((
                StatusCode::ACCEPTED,
                axum::Json(json!({ "ignored": reason })),
            )
                .into_response())
        }
    }
}

/// `POST /webhooks/alertmanager`.
async fn alertmanager(
    State(g): State<Arc<Gateway>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    g.authorize(&uri, &headers)?;
    let body = g.read(&headers, body).await?;
    if let Some(ct) = content_type(&headers)
        && !binding::is_json_media_type(&ct)
    {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct:?} is not supported: Alertmanager sends application/json"),
        ));
    }
    let events = alertmanager::events(&body)?;
    g.accept("alertmanager", events, &headers).await
}

/// The CloudEvents webhook abuse-protection handshake (`OPTIONS` with `WebHook-Request-Origin`).
async fn handshake(State(g): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let allow = [(header::ALLOW, "POST, OPTIONS")];
    let Some(origin) = headers
        .get("webhook-request-origin")
        .and_then(|v| v.to_str().ok())
    else {
        return (StatusCode::OK, allow).into_response();
    };
    let allowed = &g.options.allowed_origins;
    if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        // Not consenting: no WebHook-Allowed-* headers.
        tracing::info!(%origin, "webhook handshake refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            allow,
            axum::Json(json!({ "error": format!("origin {origin} may not deliver here; add it with --allowed-origin") })),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ALLOW, "POST, OPTIONS".to_owned()),
            (
                header::HeaderName::from_static("webhook-allowed-origin"),
                origin.to_owned(),
            ),
            (
                header::HeaderName::from_static("webhook-allowed-rate"),
                "*".to_owned(),
            ),
        ],
    )
        .into_response()
}

/// The token of an `Authorization` value of the `Bearer` scheme, whose name is case-insensitive
/// (RFC 7235).
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

impl Gateway {
    /// The bearer token, from `Authorization: Bearer` or the `access_token` query parameter (the
    /// two ways the CloudEvents webhook spec allows). Compared in constant time.
    fn authorize(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), Rejection> {
        let Some(expected) = &self.options.token else {
            return Ok(());
        };
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .map(str::to_owned);
        let from_query = uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        });
        match from_header.or(from_query) {
            Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(Rejection::new(
                StatusCode::UNAUTHORIZED,
                "the bearer token is wrong",
            )),
            None => Err(Rejection::new(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required: send `Authorization: Bearer <token>` (or ?access_token=<token>)",
            )),
        }
    }

    /// Reads the body, refusing more than the configured limit.
    async fn read(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, Rejection> {
        let limit = self.options.max_bytes;
        let too_large = || {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than {limit} bytes (raise the limit with BATON_MAX_EVENT_BYTES, or send less)"
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        axum::body::to_bytes(body, limit).await.map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return too_large();
                }
                source = s.source();
            }
            Rejection::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })
    }

    /// Checks every event ([`admit::check`]), stores them and answers 202 with what was stored.
    /// One event that cannot be kept refuses the request: nothing of it is stored.
    async fn accept(
        &self,
        origin: &str,
        mut events: Vec<Event>,
        headers: &HeaderMap,
    ) -> Result<Response, Rejection> {
        // An event without trace context continues the request's (W3C `traceparent` header).
        let values = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        if let Some(trace) = Trace::parse(&values("traceparent"), &values("tracestate")) {
            for event in events
                .iter_mut()
                .filter(|e| e.extension("traceparent").is_none())
            {
                event.set_extension("traceparent", trace.traceparent());
                if let Some(state) = &trace.state {
                    event.set_extension("tracestate", state.clone());
                }
            }
        }
        let limits = admit::Limits {
            max_event_bytes: self.options.max_bytes,
            max_payload: self.bus.client.server_info().max_payload,
        };
        for (i, event) in events.iter().enumerate() {
            // Checking a large batch takes a while (building each run request): other requests
            // get their turn on this thread in between.
            if i % 64 == 63 {
                tokio::task::yield_now().await;
            }
            admit::check(event, &limits).map_err(|mut refused| {
                if events.len() > 1 {
                    refused.message = format!("event {i} of the batch: {}", refused.message);
                }
                refused
            })?;
        }
        let stored = ingress::store_sharing(&self.bus.js, origin, &events, &self.slots)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, origin, "cannot store events; the sender will retry");
                Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the events could not be stored ({e}); retry"),
                )
            })?;
        for s in &stored {
            tracing::info!(origin, id = %s.id, ty = %s.ty, duplicate = s.duplicate, "event accepted");
        }
        metrics::counter!(baton_core::metrics::EVENTS_ACCEPTED, "origin" => origin.to_owned())
            .increment(stored.len() as u64);
        Ok((
            StatusCode::ACCEPTED,
            axum::Json(json!({ "accepted": stored })),
        )
            .into_response())
    }
}
