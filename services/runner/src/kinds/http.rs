//! `http`: an HTTP request; `cloudevent`: a CloudEvent pushed to an HTTP endpoint in binary content
//! mode (`ce-*` headers), the way Knative services and OpenFaaS functions are invoked.
//!
//! Both send the attempt's `Baton-Idempotency-Key`, `Baton-Run-Id`, `Baton-Step` and
//! `Baton-Attempt` headers (and `Baton-Compensation: true` for a compensation), so a receiver can
//! recognise a request Baton sends again after a crash or a retry. A pushed CloudEvent's `id` is the
//! idempotency key for the same reason.
//!
//! Failures: connection errors and timeouts are retryable (`connect`, `timeout`); a response with a
//! status that is not accepted fails with the code `http-<status>`, retryable for 5xx, 408 and 429,
//! permanent otherwise; input that cannot make a request is `bad-input`.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::event::StepError;
use bytes::Bytes;
use cloudevents::{AttributesWriter, EventBuilder, EventBuilderV10};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Certificate, Client, Method, Url};
use serde_json::{Map, Value, json};

use super::{
    bad_input, duration_field, given, head, input_object, json_type, scalar_text, show_duration,
    string_field,
};
use crate::{Handler, StepContext};

/// Response bodies are cut after this many bytes (outputs then say `truncated: true`).
pub const MAX_BODY: usize = 1024 * 1024;
/// How much of a failed response's body its error message quotes.
const ERROR_BODY: usize = 500;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The `source` of a pushed CloudEvent that does not name one.
pub const DEFAULT_SOURCE: &str = "baton/runner";

const HTTP_KEYS: &[&str] = &[
    "method", "url", "headers", "query", "body", "timeout", "expect", "tls",
];
/// `type`, `source`, `subject` and `data` are a shorthand for `event: {...}`.
const CLOUDEVENT_KEYS: &[&str] = &[
    "url", "event", "headers", "query", "timeout", "expect", "tls", "type", "source", "subject",
    "data",
];
pub(crate) const EVENT_KEYS: &[&str] = &[
    "type",
    "source",
    "subject",
    "data",
    "datacontenttype",
    "dataschema",
    "extensions",
];
const TLS_KEYS: &[&str] = &["insecure_skip_verify", "ca_file"];

/// HTTP clients (each with its connection pool), one per TLS configuration, shared by every step.
#[derive(Default)]
pub struct Clients {
    pool: Mutex<HashMap<TlsKey, Client>>,
}

/// What makes two clients different: certificate checks off, and extra CA certificates (the
/// contents of `ca_file`, so a changed file gets a new client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TlsKey {
    insecure: bool,
    ca: Option<Vec<u8>>,
}

impl Clients {
    fn get(&self, key: &TlsKey) -> Result<Client, StepError> {
        if let Some(client) = self.lock().get(key) {
            return Ok(client.clone());
        }
        let mut builder = Client::builder()
            .user_agent(concat!("baton-runner/", env!("CARGO_PKG_VERSION")))
            .tcp_keepalive(Duration::from_secs(60))
            .tls_danger_accept_invalid_certs(key.insecure);
        if let Some(pem) = &key.ca {
            let certs = Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    bad_input(
                        "tls.ca_file",
                        "holds no PEM certificate",
                        "give a file of `-----BEGIN CERTIFICATE-----` blocks (the CA that signed the server's certificate)",
                    )
                })?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| StepError {
            message: format!("cannot set up the HTTP client: {}", chain(&e)),
            retryable: key.ca.is_none(),
            code: Some(
                if key.ca.is_some() {
                    "bad-input"
                } else {
                    "client"
                }
                .into(),
            ),
        })?;
        let mut pool = self.lock();
        if pool.len() >= 32 {
            // Many CA files over time: start again rather than grow without bound.
            pool.clear();
        }
        Ok(pool.entry(key.clone()).or_insert(client).clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TlsKey, Client>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `http`, with its own connection pool (see [`builtin`](super::builtin) for one shared with
/// `cloudevent`).
pub fn http() -> Handler {
    handler(Arc::new(Clients::default()), false)
}

/// `cloudevent`, with its own connection pool.
pub fn cloudevent() -> Handler {
    handler(Arc::new(Clients::default()), true)
}

/// The `http` kind, or with `cloudevent` the `cloudevent` kind, sending over `clients`.
pub fn handler(clients: Arc<Clients>, cloudevent: bool) -> Handler {
    Arc::new(move |input: Value, ctx: StepContext| {
        let clients = clients.clone();
        Box::pin(async move {
            let request = if cloudevent {
                Request::cloudevent(&input, &ctx)?
            } else {
                Request::http(&input)?
            };
            request.send(&clients, &ctx).await
        })
    })
}

/// A request, checked and ready to send.
#[derive(Debug)]
struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
    timeout: Duration,
    /// Accepted statuses; `None`: any 2xx.
    expect: Option<Vec<u16>>,
    insecure: bool,
    ca_file: Option<String>,
}

impl Request {
    fn http(input: &Value) -> Result<Request, StepError> {
        let object = input_object(input, "http", HTTP_KEYS)?;
        let mut request = Request::common(object)?;
        if let Some(method) = string_field(object, "method", METHOD_FIX)? {
            request.method = parse_method(method)?;
        }
        match given(object, "body") {
            None => {}
            Some(Value::String(text)) => {
                request.default_content_type("text/plain; charset=utf-8");
                request.body = Some(Bytes::from(text.clone()));
            }
            Some(json) => {
                request.default_content_type("application/json");
                request.body = Some(Bytes::from(json.to_string()));
            }
        }
        Ok(request)
    }

    fn cloudevent(input: &Value, ctx: &StepContext) -> Result<Request, StepError> {
        let object = input_object(input, "cloudevent", CLOUDEVENT_KEYS)?;
        let mut request = Request::common(object)?;
        request.method = Method::POST;
        let shorthand: Map<String, Value> = ["type", "source", "subject", "data"]
            .into_iter()
            .filter_map(|k| object.get(k).map(|v| (k.to_owned(), v.clone())))
            .collect();
        let (event, at) = match object.get("event") {
            Some(_) if !shorthand.is_empty() => {
                return Err(bad_input(
                    "event",
                    "is given together with `type`, `source`, `subject` or `data` at the top of `with`",
                    "put the event's attributes and data either under `event:` or directly in `with`, not both",
                ));
            }
            Some(Value::Object(event)) => (event.clone(), "event."),
            Some(other) => {
                return Err(bad_input(
                    "event",
                    format!("must be a mapping, not {}", json_type(other)),
                    "write `event: {type: com.example.thing.happened, data: {...}}`",
                ));
            }
            None => (shorthand, ""),
        };
        let event = build_event(&event, at, ctx)?;
        let (headers, body) = baton_core::binding::http::encode_binary(&event);
        // The event's own headers win over any `ce-*` or `Content-Type` given in `headers`.
        for (name, value) in &headers {
            request.headers.insert(name.clone(), value.clone());
        }
        request.body = (!body.is_empty()).then_some(body);
        Ok(request)
    }

    /// `url`, `query`, `headers`, `timeout`, `expect` and `tls`.
    fn common(object: &Map<String, Value>) -> Result<Request, StepError> {
        let (insecure, ca_file) = parse_tls(object)?;
        Ok(Request {
            method: Method::GET,
            url: parse_url(object)?,
            headers: parse_headers(object)?,
            body: None,
            timeout: duration_field(object, "timeout", DEFAULT_TIMEOUT)?,
            expect: parse_expect(object)?,
            insecure,
            ca_file,
        })
    }

    fn default_content_type(&mut self, content_type: &'static str) {
        if !self.headers.contains_key(CONTENT_TYPE) {
            self.headers
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
    }

    async fn send(mut self, clients: &Clients, ctx: &StepContext) -> Result<Value, StepError> {
        let ca = match &self.ca_file {
            None => None,
            Some(path) => Some(tokio::fs::read(path).await.map_err(|e| {
                bad_input(
                    "tls.ca_file",
                    format!("`{path}` cannot be read ({e})"),
                    "give the path, on the runner's machine, of a PEM file of the CA certificates to trust",
                )
            })?),
        };
        let client = clients.get(&TlsKey {
            insecure: self.insecure,
            ca,
        })?;
        for (name, value) in baton_headers(ctx) {
            if let Ok(value) = HeaderValue::from_str(&value) {
                self.headers.insert(name, value);
            }
        }
        let shown = format!("{} {}", self.method, display_url(&self.url));
        let mut builder = client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers);
        if let Some(body) = self.body {
            builder = builder.body(body);
        }
        let exchange = async {
            let mut response = builder.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let (body, truncated) = read_body(&mut response, MAX_BODY).await?;
            Ok::<_, reqwest::Error>((status, headers, body, truncated))
        };
        tracing::debug!(run = %ctx.run_id, step = %ctx.step, attempt = ctx.attempt, request = %shown, "http request");
        let (status, headers, body, truncated) = tokio::select! {
            result = tokio::time::timeout(self.timeout, exchange) => match result {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => return Err(transport_error(&shown, e)),
                Err(_) => return Err(StepError {
                    message: format!("{shown} timed out after {}", show_duration(self.timeout)),
                    retryable: true,
                    code: Some("timeout".into()),
                }),
            },
            _ = ctx.cancel.cancelled() => return Err(StepError {
                message: format!("{shown} was abandoned: the step was cancelled"),
                retryable: true,
                code: Some("cancelled".into()),
            }),
        };
        let code = status.as_u16();
        let accepted = match &self.expect {
            Some(list) => list.contains(&code),
            None => status.is_success(),
        };
        if !accepted {
            let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY + 4)]);
            let quoted = head(text.trim(), ERROR_BODY);
            let mut message = format!("{shown} answered {status}");
            if let Some(after) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) {
                message.push_str(&format!(" (Retry-After: {after})"));
            }
            if let Some(expect) = &self.expect {
                let list: Vec<String> = expect.iter().map(u16::to_string).collect();
                message.push_str(&format!(", expected {}", list.join(" or ")));
            }
            if !quoted.is_empty() {
                message.push_str(": ");
                message.push_str(quoted);
                if body.len() > quoted.len() {
                    message.push_str(" ...");
                }
            }
            return Err(StepError {
                message,
                retryable: status.is_server_error() || code == 429 || code == 408,
                code: Some(format!("http-{code}")),
            });
        }
        let mut out_headers = Map::new();
        for (name, value) in &headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match out_headers.get_mut(name.as_str()) {
                Some(Value::String(seen)) => {
                    seen.push_str(", ");
                    seen.push_str(&value);
                }
                _ => {
                    out_headers.insert(name.as_str().to_owned(), Value::String(value));
                }
            }
        }
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(baton_core::binding::is_json_media_type);
        let body = if body.is_empty() {
            Value::Null
        } else if is_json && !truncated {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        } else {
            Value::String(String::from_utf8_lossy(&body).into_owned())
        };
        Ok(json!({
            "status": code,
            "headers": out_headers,
            "body": body,
            "truncated": truncated,
        }))
    }
}

const METHOD_FIX: &str = "write GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS";

fn parse_method(method: &str) -> Result<Method, StepError> {
    let upper = method.trim().to_ascii_uppercase();
    if upper.is_empty() {
        return Err(bad_input("method", "is empty", METHOD_FIX));
    }
    Method::from_bytes(upper.as_bytes()).map_err(|_| {
        bad_input(
            "method",
            format!("`{method}` is not an HTTP method"),
            METHOD_FIX,
        )
    })
}

/// `url` with `query` appended.
fn parse_url(object: &Map<String, Value>) -> Result<Url, StepError> {
    const FIX: &str =
        "write an absolute http or https URL, such as `https://ci.example.com/api/v1/builds`";
    let Some(text) = string_field(object, "url", FIX)? else {
        return Err(bad_input("url", "is missing", FIX));
    };
    // Do not repeat a URL that may hold credentials.
    let shown = if text.contains('@') {
        "the URL".to_owned()
    } else {
        format!("`{text}`")
    };
    let mut url = Url::parse(text.trim())
        .map_err(|e| bad_input("url", format!("{shown} is not a valid URL ({e})"), FIX))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad_input(
            "url",
            format!("{shown} has the scheme `{}`", url.scheme()),
            FIX,
        ));
    }
    match given(object, "query") {
        None => {}
        Some(Value::Object(query)) => {
            let mut pairs = Vec::new();
            for (name, value) in query {
                let values: Vec<&Value> = match value {
                    Value::Array(list) => list.iter().collect(),
                    Value::Null => Vec::new(),
                    other => vec![other],
                };
                for v in values {
                    let text = scalar_text(v).ok_or_else(|| {
                        bad_input(
                            &format!("query.{name}"),
                            format!("is {}", json_type(v)),
                            "give a string, number or boolean, or a list of them for a repeated parameter",
                        )
                    })?;
                    pairs.push((name.clone(), text));
                }
            }
            if !pairs.is_empty() {
                url.query_pairs_mut().extend_pairs(pairs);
            }
        }
        Some(other) => {
            return Err(bad_input(
                "query",
                format!("must be a mapping, not {}", json_type(other)),
                "write `query: {name: value}`; the values are URL-encoded for you",
            ));
        }
    }
    Ok(url)
}

fn parse_headers(object: &Map<String, Value>) -> Result<HeaderMap, StepError> {
    let mut headers = HeaderMap::new();
    match given(object, "headers") {
        None => {}
        Some(Value::Object(given)) => {
            for (name, value) in given {
                let field = format!("headers.{name}");
                let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    bad_input(
                        &field,
                        "is not a valid header name",
                        "header names are letters, digits and `-` (such as `Authorization` or `X-Request-Id`)",
                    )
                })?;
                if value.is_null() {
                    continue;
                }
                let text = scalar_text(value).ok_or_else(|| {
                    bad_input(
                        &field,
                        format!("is {}", json_type(value)),
                        "give the header's value as a string (use `tojson` for a JSON value)",
                    )
                })?;
                let value = HeaderValue::from_str(&text).map_err(|_| {
                    bad_input(
                        &field,
                        "is not a valid header value",
                        "header values are one line of visible characters: remove line breaks and control characters (percent-encode other text)",
                    )
                })?;
                headers.append(header, value);
            }
        }
        Some(other) => {
            return Err(bad_input(
                "headers",
                format!("must be a mapping, not {}", json_type(other)),
                "write `headers: {Authorization: \"Bearer ...\"}`",
            ));
        }
    }
    Ok(headers)
}

fn parse_expect(object: &Map<String, Value>) -> Result<Option<Vec<u16>>, StepError> {
    const FIX: &str = "write a list of HTTP status codes, such as `expect: [200, 201, 409]`";
    let list = match given(object, "expect") {
        None => return Ok(None),
        Some(Value::Array(list)) => list.as_slice(),
        Some(single @ Value::Number(_)) => std::slice::from_ref(single),
        Some(other) => {
            return Err(bad_input(
                "expect",
                format!("must be a list of status codes, not {}", json_type(other)),
                FIX,
            ));
        }
    };
    if list.is_empty() {
        return Err(bad_input("expect", "is an empty list", FIX));
    }
    list.iter()
        .map(|v| {
            v.as_u64()
                .filter(|c| (100..=599).contains(c))
                .map(|c| c as u16)
                .ok_or_else(|| bad_input("expect", format!("holds `{v}`"), FIX))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

fn parse_tls(object: &Map<String, Value>) -> Result<(bool, Option<String>), StepError> {
    let Some(tls) = given(object, "tls") else {
        return Ok((false, None));
    };
    let Value::Object(tls) = tls else {
        return Err(bad_input(
            "tls",
            format!("must be a mapping, not {}", json_type(tls)),
            "write `tls: {ca_file: /etc/ssl/my-ca.pem}` or `tls: {insecure_skip_verify: true}`",
        ));
    };
    if let Some(unknown) = tls.keys().find(|k| !TLS_KEYS.contains(&k.as_str())) {
        return Err(bad_input(
            &format!("tls.{unknown}"),
            "is not a TLS setting",
            "the settings are `insecure_skip_verify` and `ca_file`",
        ));
    }
    let insecure = match given(tls, "insecure_skip_verify") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad_input(
                "tls.insecure_skip_verify",
                format!("must be true or false, not {}", json_type(other)),
                "write `insecure_skip_verify: true` to accept any certificate (for tests only)",
            ));
        }
    };
    let ca_file = match given(tls, "ca_file") {
        None => None,
        Some(Value::String(path)) if !path.is_empty() => Some(path.clone()),
        Some(other) => {
            return Err(bad_input(
                "tls.ca_file",
                format!("must be a file path, not {}", json_type(other)),
                "give the path of a PEM file of CA certificates, such as `/etc/ssl/my-ca.pem`",
            ));
        }
    };
    Ok((insecure, ca_file))
}

/// The CloudEvent of a `cloudevent` step: `at` is where its keys are in `with` (`event.` or ``).
pub(crate) fn build_event(
    event: &Map<String, Value>,
    at: &str,
    ctx: &StepContext,
) -> Result<cloudevents::Event, StepError> {
    let field = |k: &str| format!("{at}{k}");
    if at == "event."
        && let Some(unknown) = event.keys().find(|k| !EVENT_KEYS.contains(&k.as_str()))
    {
        return Err(bad_input(
            &field(unknown),
            "is not a CloudEvent attribute Baton sets",
            "the keys of `event` are type, source, subject, data, datacontenttype, dataschema and extensions",
        ));
    }
    let text = |k: &str, fix: &str| -> Result<Option<String>, StepError> {
        match given(event, k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(bad_input(&field(k), "is empty", fix)),
            Some(other) => Err(bad_input(
                &field(k),
                format!("must be a string, not {}", json_type(other)),
                fix,
            )),
        }
    };
    let ty = text(
        "type",
        "give the event type, such as `com.example.release.promoted`",
    )?
    .ok_or_else(|| {
        bad_input(
            &field("type"),
            "is missing",
            "give the event type, such as `com.example.release.promoted`",
        )
    })?;
    let source = text(
        "source",
        "give a URI reference naming the producer, such as `/ci/releases`",
    )?
    .unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
    let mut builder = EventBuilderV10::new()
        .id(ctx.idempotency_key.clone())
        .ty(ty)
        .source(source)
        .time(chrono::Utc::now());
    if let Some(subject) = text("subject", "give the subject as a string")? {
        builder = builder.subject(subject);
    }
    let content_type = text(
        "datacontenttype",
        "give a media type such as `application/json`",
    )?;
    match given(event, "data") {
        None => {
            if content_type.is_some() {
                return Err(bad_input(
                    &field("datacontenttype"),
                    "is given without `data`",
                    "add `data`, or leave `datacontenttype` out",
                ));
            }
        }
        Some(Value::String(s)) => {
            let ct = content_type.unwrap_or_else(|| "text/plain; charset=utf-8".into());
            builder = builder.data(ct, s.clone());
        }
        Some(value) => {
            let ct = content_type.unwrap_or_else(|| "application/json".into());
            if !baton_core::binding::is_json_media_type(&ct) {
                return Err(bad_input(
                    &field("data"),
                    format!("is {} but `datacontenttype` is `{ct}`", json_type(value)),
                    "give data in that format as a string, or a JSON `datacontenttype`",
                ));
            }
            builder = builder.data(ct, value.clone());
        }
    }
    if let Some(extensions) = given(event, "extensions") {
        let Value::Object(extensions) = extensions else {
            return Err(bad_input(
                &field("extensions"),
                format!("must be a mapping, not {}", json_type(extensions)),
                "write `extensions: {name: value}`",
            ));
        };
        for (name, value) in extensions {
            let f = field(&format!("extensions.{name}"));
            if !baton_core::binding::is_attribute_name(name)
                || baton_core::binding::is_context_attribute(name)
            {
                return Err(bad_input(
                    &f,
                    "is not a valid extension name",
                    "extension names are lower-case letters a-z and digits, and not a CloudEvents attribute such as `id` or `time`",
                ));
            }
            builder = match value {
                Value::String(s) => builder.extension(name, s.clone()),
                Value::Bool(b) => builder.extension(name, *b),
                Value::Number(n) if n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()) => {
                    builder.extension(name, n.as_i64().unwrap_or_default())
                }
                other => {
                    return Err(bad_input(
                        &f,
                        format!("is {}", json_type(other)),
                        "extension values are strings, booleans or 32-bit integers",
                    ));
                }
            };
        }
    }
    let mut event = builder.build().map_err(|e| {
        bad_input(
            at.trim_end_matches('.'),
            format!("is not a valid CloudEvent ({e})"),
            "give at least `type`",
        )
    })?;
    if let Some(schema) = text("dataschema", "give an absolute URI")? {
        let url = Url::parse(&schema).map_err(|e| {
            bad_input(
                &field("dataschema"),
                format!("`{schema}` is not an absolute URI ({e})"),
                "give an absolute URI, such as `https://example.com/schemas/release.json`",
            )
        })?;
        event.set_dataschema(Some(url));
    }
    Ok(event)
}

/// The headers that tell a receiver which attempt of which step sent a request.
pub(crate) fn baton_headers(ctx: &StepContext) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("baton-idempotency-key", ctx.idempotency_key.clone()),
        ("baton-run-id", ctx.run_id.clone()),
        ("baton-step", ctx.step.clone()),
        ("baton-attempt", ctx.attempt.to_string()),
    ];
    if ctx.compensation {
        headers.push(("baton-compensation", "true".into()));
    }
    headers
}

/// Reads at most `max` bytes of the body; `true` when there was more.
async fn read_body(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = max - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
}

/// The URL without credentials, query or fragment: safe for messages and logs.
fn display_url(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

fn transport_error(shown: &str, e: reqwest::Error) -> StepError {
    let e = e.without_url();
    let (what, retryable, code) = if e.is_timeout() {
        ("timed out", true, "timeout")
    } else if e.is_connect() {
        ("cannot connect", true, "connect")
    } else if e.is_redirect() {
        ("redirect failed", false, "redirect")
    } else if e.is_builder() {
        ("cannot be sent", false, "bad-input")
    } else {
        ("failed", true, "connect")
    };
    StepError {
        message: format!("{shown}: {what}: {}", chain(&e)),
        retryable,
        code: Some(code.into()),
    }
}

/// An error and its causes, each said once.
fn chain(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_messages_hide_credentials_and_query() {
        let url = Url::parse("https://user:secret@example.com:8443/a/b?token=x#frag").unwrap();
        assert_eq!(display_url(&url), "https://example.com:8443/a/b");
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!({}), "`with.url` is missing"),
            (json!({"url": "ftp://x/y"}), "`with.url`"),
            (json!({"url": "not a url"}), "`with.url`"),
            (
                json!({"url": "http://x", "method": "GE T"}),
                "`with.method`",
            ),
            (
                json!({"url": "http://x", "headers": {"bad name": "v"}}),
                "`with.headers.bad name`",
            ),
            (
                json!({"url": "http://x", "headers": {"X-A": "a\nb"}}),
                "`with.headers.X-A`",
            ),
            (
                json!({"url": "http://x", "timeout": "3x"}),
                "`with.timeout`",
            ),
            (json!({"url": "http://x", "timeout": 30}), "`with.timeout`"),
            (
                json!({"url": "http://x", "expect": [200, 99]}),
                "`with.expect`",
            ),
            (
                json!({"url": "http://x", "tls": {"insecure": true}}),
                "`with.tls.insecure`",
            ),
            (
                json!({"url": "http://x", "tls": {"ca_file": 3}}),
                "`with.tls.ca_file`",
            ),
            (
                json!({"url": "http://x", "query": {"a": {}}}),
                "`with.query.a`",
            ),
        ];
        for (input, expected) in cases {
            let err = Request::http(&input).unwrap_err();
            assert_eq!(err.code.as_deref(), Some("bad-input"), "{input}");
            assert!(!err.retryable);
            assert!(
                err.message.contains(expected),
                "{input}: {} does not name {expected}",
                err.message
            );
        }
    }

    #[test]
    fn query_is_appended_and_encoded() {
        let r = Request::http(&json!({
            "url": "http://x/p?a=1",
            "query": {"b": "two words", "c": [1, true]},
        }))
        .unwrap();
        assert_eq!(r.url.as_str(), "http://x/p?a=1&b=two+words&c=1&c=true");
    }

    #[test]
    fn user_content_type_is_kept() {
        let r = Request::http(&json!({
            "url": "http://x", "method": "post",
            "headers": {"Content-Type": "application/merge-patch+json"},
            "body": {"a": 1},
        }))
        .unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.headers[CONTENT_TYPE], "application/merge-patch+json");
        assert_eq!(r.body.as_deref(), Some(&b"{\"a\":1}"[..]));
    }
}
