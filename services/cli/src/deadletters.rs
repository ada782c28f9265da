//! `baton deadletters`: list, show and re-publish what Baton rejected.

use anyhow::{Context, bail};
use async_nats::jetstream::consumer;
use baton_core::dlq::{self, DeadLetter};
use baton_core::{Bus, binding, event, streams};
use cloudevents::AttributesReader;
use futures::StreamExt;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List dead letters, oldest first: sequence, time, origin, subject and reason.
    List {
        /// Show at most this many, the newest.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one dead letter in full: reason, subject, headers and payload.
    Show { seq: u64 },
    /// Publish a dead letter's original bytes and headers again on its original subject.
    Republish {
        seq: u64,
        /// Remove the dead letter once the message is stored again.
        #[arg(long)]
        remove: bool,
    },
}

pub async fn run(bus: &Bus, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { limit } => list(bus, limit).await,
        Command::Show { seq } => {
            let (letter, time) = get(bus, seq).await?;
            println!("Dead letter #{seq} ({time})");
            println!("  origin   {}", letter.origin);
            println!("  subject  {}", letter.subject);
            println!("  reason   {}", letter.reason);
            println!("Headers");
            for (name, values) in &letter.headers {
                for v in values {
                    println!("  {name}: {v}");
                }
            }
            let payload = letter.payload();
            match std::str::from_utf8(&payload) {
                Ok(text) => println!("Payload ({} bytes)\n{text}", payload.len()),
                Err(_) => println!(
                    "Payload ({} bytes, not UTF-8; base64)\n{}",
                    payload.len(),
                    letter.payload_base64
                ),
            }
            Ok(())
        }
        Command::Republish { seq, remove } => {
            let (letter, _) = get(bus, seq).await?;
            let ack = bus
                .js
                .publish_with_headers(
                    letter.subject.clone(),
                    letter.republish_headers(),
                    letter.payload().into(),
                )
                .await?
                .await
                .with_context(|| format!("no stream stored the message on {}", letter.subject))?;
            println!(
                "Re-published dead letter #{seq} on {} (stream {} sequence {})",
                letter.subject, ack.stream, ack.sequence
            );
            if remove {
                bus.js
                    .get_stream(streams::DLQ)
                    .await?
                    .delete_message(seq)
                    .await?;
                println!("Removed dead letter #{seq}");
            }
            Ok(())
        }
    }
}

async fn get(bus: &Bus, seq: u64) -> anyhow::Result<(DeadLetter, String)> {
    let stream = bus.js.get_stream(streams::DLQ).await?;
    let message = stream
        .get_raw_message(seq)
        .await
        .with_context(|| format!("no dead letter #{seq}; `baton deadletters list` shows them"))?;
    let (letter, time) = parse(Some(&message.headers), &message.payload)?;
    Ok((letter, time))
}

fn parse(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> anyhow::Result<(DeadLetter, String)> {
    let ce = binding::decode(headers, payload)?;
    if ce.ty() != dlq::TYPE {
        bail!("not a dead letter: type {}", ce.ty());
    }
    let letter: DeadLetter = serde_json::from_value(event::event_data(&ce)?)?;
    let time = ce.time().map(|t| t.to_rfc3339()).unwrap_or_default();
    Ok((letter, time))
}

async fn list(bus: &Bus, limit: usize) -> anyhow::Result<()> {
    let mut stream = bus.js.get_stream(streams::DLQ).await?;
    let state = stream.info().await?.state.clone();
    if state.messages == 0 {
        println!("No dead letters.");
        return Ok(());
    }
    let start = state
        .last_sequence
        .saturating_sub(limit as u64 - 1)
        .max(state.first_sequence);
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    println!(
        "{:>6}  {:<25}  {:<12}  {:<40}  reason",
        "seq", "time", "origin", "subject"
    );
    while let Some(message) = messages.next().await {
        let message = message?;
        let info = message.info().map_err(|e| anyhow::anyhow!(e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        match parse(message.headers.as_ref(), &message.payload) {
            Ok((l, time)) => println!(
                "{seq:>6}  {time:<25}  {:<12}  {:<40}  {}",
                l.origin, l.subject, l.reason
            ),
            Err(e) => println!("{seq:>6}  (unreadable: {e})"),
        }
        if pending == 0 {
            break;
        }
    }
    Ok(())
}
