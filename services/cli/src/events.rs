//! `baton send` and `baton events tail`: external events in and out of `BATON_EVENTS`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::{self, DeliverPolicy};
use baton_core::{binding, streams};
use baton_workflow::Pattern;
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use futures::StreamExt;

use crate::Nats;

#[derive(clap::Args)]
pub struct Send {
    /// A CloudEvent in the JSON format (or a JSON array of them: a batch). Instead of the flags.
    #[arg(long, conflicts_with_all = ["ty", "source", "subject", "id", "data"])]
    file: Option<PathBuf>,
    /// The event type, e.g. com.example.order.placed.
    #[arg(long = "type", required_unless_present = "file")]
    ty: Option<String>,
    /// The event source (a URI reference).
    #[arg(long, default_value = "urn:baton:cli")]
    source: Option<String>,
    #[arg(long)]
    subject: Option<String>,
    /// The event id (default: a new ULID). The same id from the same source is stored once.
    #[arg(long)]
    id: Option<String>,
    /// The data: JSON, or @FILE to read it from a file.
    #[arg(long)]
    data: Option<String>,
    #[command(flatten)]
    nats: Nats,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print events as they are stored: time, type, source, subject and id.
    Tail {
        /// Only events whose type matches this glob (`*` any characters, `?` one).
        #[arg(long = "type")]
        ty: Option<String>,
        /// Start from the first stored event instead of the next one.
        #[arg(long)]
        all: bool,
        /// Print each event as JSON (attributes and data) instead of one line.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        nats: Nats,
    },
}

pub async fn send(send: Send) -> anyhow::Result<()> {
    let events = match &send.file {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let batch = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            let decoded = if batch {
                binding::json::decode_batch(&bytes)
            } else {
                binding::json::decode(&bytes).map(|e| vec![e])
            };
            decoded.with_context(|| format!("{} is not a valid CloudEvent", path.display()))?
        }
        None => vec![from_flags(&send)?],
    };
    if events.is_empty() {
        bail!("the batch is empty: nothing to send");
    }
    let bus = send.nats.connect("baton-cli").await?;
    let stored = baton_gateway::ingress::store(&bus.js, "cli", &events)
        .await
        .map_err(|e| anyhow::anyhow!("the event was not stored: {e}"))?;
    for s in stored {
        let note = if s.duplicate {
            " (a duplicate: it was stored before, nothing new happens)"
        } else {
            ""
        };
        println!("Stored event {} ({}){note}", s.id, s.ty);
    }
    Ok(())
}

/// An event from the flags, checked by the same rules as every event Baton receives.
fn from_flags(send: &Send) -> anyhow::Result<Event> {
    let ty = send.ty.clone().unwrap_or_default();
    let id = send
        .id
        .clone()
        .unwrap_or_else(baton_core::event::new_run_id);
    let mut builder = EventBuilderV10::new()
        .id(id)
        .ty(ty)
        .source(send.source.clone().unwrap_or_default())
        .time(chrono::Utc::now());
    if let Some(subject) = &send.subject {
        builder = builder.subject(subject.clone());
    }
    if let Some(data) = &send.data {
        let text = match data.strip_prefix('@') {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
            }
            None => data.clone(),
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .context("--data must be JSON (quote strings: --data '\"text\"'), or @FILE")?;
        builder = builder.data("application/json", value);
    }
    let event = builder
        .build()
        .map_err(|e| anyhow::anyhow!("not a valid CloudEvent: {e}"))?;
    // The NATS binding's checks, as for any event arriving on NATS.
    let (headers, body) = binding::encode(&event);
    Ok(binding::decode(Some(&headers), &body)?)
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    let Command::Tail {
        ty,
        all,
        json,
        count,
        nats,
    } = command;
    let pattern = ty.map(Pattern);
    let bus = nats.connect("baton-cli").await?;
    let stream = bus.js.get_stream(streams::EVENTS).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: if all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut shown = 0;
    let shutdown = baton_core::shutdown::on_signal();
    while count.is_none_or(|c| shown < c) {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = messages.next() => match next {
                Some(m) => m?,
                None => break,
            },
        };
        let event = match binding::decode(message.headers.as_ref(), &message.payload) {
            Ok(e) => e,
            Err(e) => {
                println!("(not a valid CloudEvent on {}: {e})", message.subject);
                continue;
            }
        };
        if pattern.as_ref().is_some_and(|p| !p.matches(event.ty())) {
            continue;
        }
        shown += 1;
        if json {
            println!(
                "{}",
                String::from_utf8_lossy(&binding::json::encode(&event))
            );
        } else {
            let time = event
                .time()
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| "-".into());
            println!(
                "{time} {} source={} subject={} id={}",
                event.ty(),
                event.source(),
                event.subject().unwrap_or("-"),
                event.id()
            );
        }
    }
    Ok(())
}
