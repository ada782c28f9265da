//! Logging and trace export shared by every Baton process.
//!
//! Logs: text or JSON lines on stderr; a JSON line written inside a run or a step attempt carries
//! its `trace_id` and `span_id` at the top level (from a tracing span with those fields, see
//! [`ids_span`]).
//!
//! Traces: the spans of [`crate::spans`] go to an OTLP endpoint over HTTP/protobuf or gRPC,
//! configured only by the standard `OTEL_*` environment variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `..._HEADERS`, `..._TIMEOUT`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_TRACES_EXPORTER=none`,
//! `OTEL_SDK_DISABLED`), or an explicit endpoint (`baton dev --otlp`). Off when no endpoint is set.
//! Spans are batched on a background thread and flushed when the [`Guard`] is dropped.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    Event as OtelEvent, Link, SpanContext, SpanId, SpanKind, Status as OtelStatus, TraceFlags,
    TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::spans::{self, Attr, Origin, Span};

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What this process is, in the resource of the spans it exports.
#[derive(Debug, Clone)]
pub struct Service {
    /// `service.name`, unless `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`)
    /// says otherwise.
    pub name: String,
    /// `service.instance.id`: the name the process gives itself in events (`runner-<pid>`).
    pub instance: String,
    /// An OTLP endpoint given on the command line, used like `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
}

impl Service {
    /// A service named `name`, instance `<instance prefix>-<pid>`.
    pub fn new(name: &str, instance_prefix: &str) -> Service {
        Service {
            name: name.to_owned(),
            instance: format!("{instance_prefix}-{}", std::process::id()),
            otlp_endpoint: None,
        }
    }
}

impl Default for Service {
    /// Named after the executable (a step service built with the SDK, say).
    fn default() -> Self {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "baton".to_owned());
        Service::new(&exe, &exe)
    }
}

/// Flushes the spans not exported yet when dropped. Keep it until the process stops.
#[derive(Debug)]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        flush();
    }
}

struct Exporter {
    processor: BatchSpanProcessor,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Installs the global subscriber (logs only: a command-line tool exports no spans). The filter
/// comes from `BATON_LOG` (same syntax as `RUST_LOG`), defaulting to `default_filter`. Logs go to
/// stderr so that command output on stdout stays clean.
pub fn init(format: LogFormat, default_filter: &str) -> Guard {
    init_logs(format, default_filter);
    Guard(())
}

/// [`init`] for a service: also exports its spans as `service`, if the environment (or
/// `service.otlp_endpoint`) names an OTLP endpoint. Keep the guard until the service has stopped.
pub fn init_service(format: LogFormat, default_filter: &str, service: &Service) -> Guard {
    init_logs(format, default_filter);
    if EXPORTER.get().is_none() {
        match build_exporter(service) {
            Ok(Some((exporter, endpoint))) => {
                if EXPORTER.set(exporter).is_ok() {
                    tracing::info!(%endpoint, service = %service.name, instance = %service.instance, "exporting traces over OTLP");
                }
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "cannot export traces; going on without"),
        }
    }
    Guard(())
}

fn init_logs(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    // A second call (tests) keeps the first subscriber.
    match format {
        LogFormat::Text => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .try_init();
        }
        LogFormat::Json => {
            let _ = json_logs(filter, std::io::stderr).try_init();
        }
    }
}

/// The JSON log subscriber: tracing-subscriber's JSON lines, plus `trace_id` and `span_id`.
fn json_logs<W>(filter: EnvFilter, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .map_event_format(WithTraceIds)
        .finish()
        .with(TraceIdsLayer)
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Exports spans (those of sampled traces), if export is on. Never blocks: spans queue for the
/// background exporter, and are dropped when its queue is full.
pub fn export(spans: impl IntoIterator<Item = Span>) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    for span in spans {
        if span.sampled
            && let Some(data) = span_data(&span)
        {
            exporter.processor.on_end(data);
        }
    }
}

/// Exports what is queued, waiting at most a few seconds (a collector that is down must not hold
/// up a shutdown).
pub fn flush() {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let wait = || {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(exporter.processor.force_flush());
        });
        match finished.recv_timeout(Duration::from_secs(5)) {
            Ok(Err(error)) => tracing::warn!(%error, "cannot export the last spans"),
            Err(_) => tracing::warn!("the last spans were not exported within 5 s"),
            Ok(Ok(())) => {}
        }
    };
    // A gRPC export needs the runtime's other threads while this one waits.
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// The OTLP protocol the environment asks for: `grpc` or `http/protobuf` (the default).
fn grpc_wanted() -> bool {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .is_some_and(|p| p.trim() == "grpc")
}

/// The exporter the environment (or an explicit endpoint) asks for, with a description of where it
/// sends; `None` when export is off.
fn build_exporter(service: &Service) -> Result<Option<(Exporter, String)>, String> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if let Some(exporters) = var("OTEL_TRACES_EXPORTER") {
        let names: Vec<&str> = exporters.split(',').map(str::trim).collect();
        if names.contains(&"none") {
            return Ok(None);
        }
        if !names.contains(&"otlp") {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={exporters}: Baton exports traces over OTLP only (use `otlp` or `none`)"
            ));
        }
    }
    let from_env =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let grpc = grpc_wanted();
    let protocol = if grpc { "grpc" } else { "http/protobuf" };
    let (exporter, endpoint) = match (&service.otlp_endpoint, from_env) {
        (Some(base), _) => {
            let base = base.trim_end_matches('/');
            if grpc {
                let exporter = SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(base)
                    .build();
                (exporter, base.to_owned())
            } else {
                let url = if base.ends_with("/v1/traces") {
                    base.to_owned()
                } else {
                    format!("{base}/v1/traces")
                };
                let exporter = SpanExporter::builder()
                    .with_http()
                    .with_endpoint(url.clone())
                    .build();
                (exporter, url)
            }
        }
        (None, Some(endpoint)) => (SpanExporter::builder().build(), endpoint),
        (None, None) => return Ok(None),
    };
    let exporter = exporter.map_err(|e| e.to_string())?;
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(&resource(service));
    Ok(Some((
        Exporter { processor },
        format!("{endpoint} ({protocol})"),
    )))
}

/// The resource of this process's spans: ours, then `OTEL_RESOURCE_ATTRIBUTES`, then
/// `OTEL_SERVICE_NAME` (the environment wins).
fn resource(service: &Service) -> Resource {
    let mut builder = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", service.name.clone()),
            KeyValue::new("service.instance.id", service.instance.clone()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.namespace", "baton"),
        ])
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME")
        && !name.trim().is_empty()
    {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("baton")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

fn value(attr: &Attr) -> Value {
    match attr {
        Attr::Str(s) => Value::from(s.clone()),
        Attr::Int(i) => Value::I64(*i),
        Attr::Bool(b) => Value::Bool(*b),
        Attr::Strs(list) => Value::Array(Array::String(
            list.iter().cloned().map(StringValue::from).collect(),
        )),
    }
}

fn key_values(attrs: &spans::Attributes) -> Vec<KeyValue> {
    attrs
        .iter()
        .map(|(k, v)| KeyValue::new(*k, value(v)))
        .collect()
}

/// The SDK's form of a span; `None` if its ids are not valid hex.
pub fn span_data(span: &Span) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&span.trace_id).ok()?;
    let span_id = SpanId::from_hex(&span.span_id).ok()?;
    let parent = match &span.parent_id {
        Some(p) => SpanId::from_hex(p).ok()?,
        None => SpanId::INVALID,
    };
    let flags = if span.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = span
        .trace_state
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let links = span
        .links
        .iter()
        .filter_map(|id| SpanId::from_hex(id).ok())
        .map(|id| {
            Link::with_context(SpanContext::new(
                trace_id,
                id,
                flags,
                true,
                TraceState::default(),
            ))
        })
        .collect();
    let mut events = SpanEvents::default();
    events.events = span
        .events
        .iter()
        .map(|e| OtelEvent::new(e.name.clone(), e.time.into(), key_values(&e.attributes), 0))
        .collect();
    let mut span_links = SpanLinks::default();
    span_links.links = links;
    Some(SpanData {
        span_context: SpanContext::new(trace_id, span_id, flags, false, state),
        parent_span_id: parent,
        // The parent is another process's (the event's sender, or the coordinator's run span).
        parent_span_is_remote: span.parent_id.is_some(),
        span_kind: match span.kind {
            spans::Kind::Internal => SpanKind::Internal,
            spans::Kind::Consumer => SpanKind::Consumer,
        },
        name: span.name.clone().into(),
        start_time: span.start.into(),
        end_time: span.end.into(),
        attributes: key_values(&span.attributes),
        dropped_attributes_count: 0,
        events,
        links: span_links,
        status: match &span.status {
            spans::Status::Unset => OtelStatus::Unset,
            spans::Status::Error(message) => OtelStatus::error(message.clone()),
        },
        instrumentation_scope: scope(),
    })
}

/// The resource a span from the journal is given in a trace file: the coordinator, or the runner
/// instance that executed it.
fn origin_resource(origin: &Origin) -> Resource {
    let (name, instance) = match origin {
        Origin::Coordinator => ("baton-coordinator", None),
        Origin::Runner(instance) => ("baton-runner", Some(instance.clone())),
    };
    let mut attrs = vec![
        KeyValue::new("service.name", name),
        KeyValue::new("service.namespace", "baton"),
    ];
    if let Some(instance) = instance {
        attrs.push(KeyValue::new("service.instance.id", instance));
    }
    Resource::builder_empty().with_attributes(attrs).build()
}

/// Spans as an OTLP `ExportTraceServiceRequest` in the OTLP/JSON encoding (hex ids), grouped by
/// who exports them: a file Jaeger (and any OTLP/JSON reader) imports.
pub fn otlp_json(spans: &[Span]) -> serde_json::Value {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    let mut by_origin: std::collections::BTreeMap<&Origin, Vec<SpanData>> = Default::default();
    for span in spans {
        if let Some(data) = span_data(span) {
            by_origin.entry(&span.origin).or_default().push(data);
        }
    }
    let mut request = ExportTraceServiceRequest::default();
    for (origin, datas) in by_origin {
        let resource = ResourceAttributesWithSchema::from(&origin_resource(origin));
        request
            .resource_spans
            .extend(group_spans_by_resource_and_scope(datas, &resource));
    }
    serde_json::to_value(&request).unwrap_or_default()
}

/// A tracing span whose log lines carry this trace and span id (at the top of JSON lines). At
/// `ERROR` level, so that it is enabled whenever any log line is. A span with the fields declared
/// `Empty` and recorded later works too.
pub fn ids_span(trace_id: &str, span_id: &str) -> tracing::Span {
    tracing::error_span!("trace", trace_id, span_id)
}

/// The trace and span id a tracing span carries.
#[derive(Debug, Clone, Default)]
struct Ids {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for Ids {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value.to_owned()),
            "span_id" => self.span_id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "trace_id" | "span_id") {
            self.record_str(field, format!("{value:?}").trim_matches('"'));
        }
    }
}

/// Keeps the `trace_id` and `span_id` fields of every span, for [`WithTraceIds`].
struct TraceIdsLayer;

impl<S> Layer<S> for TraceIdsLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut ids = Ids::default();
        attrs.record(&mut ids);
        if (ids.trace_id.is_some() || ids.span_id.is_some())
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            match extensions.get_mut::<Ids>() {
                Some(ids) => values.record(ids),
                None => {
                    let mut ids = Ids::default();
                    values.record(&mut ids);
                    if ids.trace_id.is_some() || ids.span_id.is_some() {
                        extensions.insert(ids);
                    }
                }
            }
        }
    }
}

/// The JSON format, plus `trace_id` and `span_id` at the top of each line written inside a span
/// that has them (the innermost one).
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                let extensions = span.extensions();
                let ids = extensions.get::<Ids>()?;
                Some((ids.trace_id.clone()?, ids.span_id.clone()?))
            })
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let trimmed = line.trim_end();
        match trimmed.strip_suffix('}') {
            // Hex ids need no escaping.
            Some(body) if is_hex(&trace_id) && is_hex(&span_id) => {
                let tail = &line[trimmed.len()..];
                std::fmt::Write::write_fmt(
                    &mut writer,
                    format_args!(
                        "{body},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}{tail}"
                    ),
                )
            }
            _ => writer.write_str(&line),
        }
    }
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_convert_to_otlp_json_with_hex_ids() {
        let trace = crate::trace::Trace::parse(
            &["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
            &["vendor=x"],
        )
        .unwrap();
        let start: chrono::DateTime<chrono::Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let request = crate::event::StepRequested {
            run_id: "r1".into(),
            step: "build".into(),
            item: None,
            items: None,
            kind: "exec".into(),
            attempt: 2,
            input: serde_json::Value::Null,
            idempotency_key: "r1/build".into(),
            secrets: Vec::new(),
            timeout_ms: None,
        };
        let context = spans::run_context(&trace, "r1");
        let links = [spans::attempt_span_id("r1", "a", None, 1)];
        let span = spans::attempt_span(&spans::Attempt {
            request: &request,
            compensation: false,
            context: &context,
            links: &links,
            runner: Some("runner-7"),
            delivered: 1,
            start,
            end: start + chrono::Duration::milliseconds(1500),
            outcome: spans::Outcome::Failed(crate::event::StepError {
                message: "exit 3".into(),
                retryable: false,
                code: Some("exit-3".into()),
            }),
        });
        let json = otlp_json(&[span]);
        let rs = &json["resourceSpans"][0];
        let resource = rs["resource"]["attributes"].to_string();
        assert!(resource.contains("runner-7"), "{resource}");
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["spanId"], spans::attempt_span_id("r1", "build", None, 2));
        assert_eq!(s["parentSpanId"], spans::run_span_id("r1"));
        assert_eq!(s["name"], "step build");
        assert_eq!(s["kind"], 5, "consumer");
        assert_eq!(s["traceState"], "vendor=x");
        assert_eq!(s["startTimeUnixNano"], "1767225600000000000");
        assert_eq!(s["endTimeUnixNano"], "1767225601500000000");
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["status"]["message"], "exit 3");
        assert_eq!(s["links"][0]["spanId"], links[0]);
        assert!(s["attributes"].to_string().contains("baton.step.attempt"));
    }

    #[test]
    fn json_log_lines_carry_the_trace_and_span_id() {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = json_logs(EnvFilter::new("info"), move || buffer.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = ids_span("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
            let _in = span.enter();
            tracing::info!(step = "build", "inside");
            let later = tracing::error_span!(
                "run",
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty
            );
            later.record("trace_id", "11111111111111111111111111111111");
            later.record("span_id", "2222222222222222");
            let _in = later.enter();
            tracing::warn!("nested");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[1]["span_id"], "00f067aa0ba902b7");
        assert_eq!(lines[1]["fields"]["message"], "inside");
        assert_eq!(lines[2]["trace_id"], "11111111111111111111111111111111");
        assert_eq!(lines[2]["span_id"], "2222222222222222");
    }
}
