//! The physical limit, measured as `../shared/design/PERF.md` defines it: one JetStream "hop" is a
//! durable pull consumer receiving a message, publishing the next message into a file-backed stream,
//! waiting for the publish ack, then acking the input. 512-byte messages, R1, default pull batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::stats;

const STREAM: &str = "BENCH_HOP";
const PAYLOAD: usize = 512;

/// The raw baseline of one server.
#[derive(Debug, Clone, Serialize)]
pub struct Raw {
    /// One publish, waiting for its ack, one at a time.
    pub publish_ack_p50_ms: f64,
    pub publish_ack_p99_ms: f64,
    pub hop_c1: Hops,
    pub hop_c64: Hops,
    /// 64 chains with a `Nats-Msg-Id` on every message (JetStream's duplicate check, as Baton uses).
    pub hop_c64_msg_id: Hops,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hops {
    pub chains: usize,
    pub hops: u64,
    pub seconds: f64,
    pub hops_per_s: f64,
    /// Time per hop on one chain (receive to the next receive); only measured with 1 chain.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

pub async fn measure(client: &async_nats::Client, window: Duration) -> anyhow::Result<Raw> {
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["hop.>".into()],
        storage: stream::StorageType::File,
        num_replicas: 1,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("cannot create the hop stream")?;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);

    // Publish and wait for the ack, one at a time.
    let mut latencies = Vec::new();
    let until = Instant::now() + window.min(Duration::from_secs(2));
    while Instant::now() < until {
        let t = Instant::now();
        js.publish("hop.pub", payload.clone()).await?.await?;
        latencies.push(t.elapsed());
    }
    let hop_c1 = hops(&js, "c1", 1, false, window, &payload).await?;
    let hop_c64 = hops(&js, "c64", 64, false, window, &payload).await?;
    let hop_c64_msg_id = hops(&js, "c64id", 64, true, window, &payload).await?;
    let _ = js.delete_stream(STREAM).await;
    Ok(Raw {
        publish_ack_p50_ms: stats::percentile_ms(&mut latencies, 0.50),
        publish_ack_p99_ms: stats::percentile_ms(&mut latencies, 0.99),
        hop_c1,
        hop_c64,
        hop_c64_msg_id,
    })
}

/// `chains` chains of hops for a warm-up of a fifth of `window` and then `window`; counts the hops
/// whose publish was acked within the window.
async fn hops(
    js: &jetstream::Context,
    tag: &str,
    chains: usize,
    msg_id: bool,
    window: Duration,
    payload: &Bytes,
) -> anyhow::Result<Hops> {
    let stream = js.get_stream(STREAM).await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("hop-{tag}")),
            filter_subject: format!("hop.{tag}.>"),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let start = Instant::now() + window / 5;
    let end = start + window;
    for chain in 0..chains {
        js.publish(format!("hop.{tag}.{chain}"), payload.clone())
            .await?
            .await?;
    }
    let counted = Arc::new(AtomicU64::new(0));
    let next_id = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let mut gaps = Vec::new();
    let mut last: Option<Instant> = None;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut ended_chains = 0;
    loop {
        tokio::select! {
            next = messages.next(), if in_flight.len() < chains => {
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(anyhow::anyhow!("hop pull failed: {e}")),
                    None => anyhow::bail!("the hop consumer ended"),
                };
                let now = Instant::now();
                if chains == 1
                    && now > start
                    && now < end
                    && let Some(l) = last
                {
                    gaps.push(now - l);
                }
                last = Some(now);
                let (js, payload, counted, next_id, stopped) = (
                    js.clone(),
                    payload.clone(),
                    counted.clone(),
                    next_id.clone(),
                    stopped.clone(),
                );
                in_flight.push(async move {
                    if Instant::now() >= end {
                        stopped.store(true, Ordering::Relaxed);
                        message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                        return Ok::<bool, anyhow::Error>(false);
                    }
                    let subject = message.subject.to_string();
                    let ack = if msg_id {
                        let mut headers = async_nats::HeaderMap::new();
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        headers.insert("Nats-Msg-Id", format!("{subject}.{id}").as_str());
                        js.publish_with_headers(subject, headers, payload).await?
                    } else {
                        js.publish(subject, payload).await?
                    };
                    ack.await?;
                    let now = Instant::now();
                    if now > start && now <= end {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok(true)
                });
            }
            Some(done) = in_flight.next() => {
                if !done? {
                    ended_chains += 1;
                    if ended_chains == chains {
                        break;
                    }
                }
            }
        }
    }
    let _ = stream.delete_consumer(&format!("hop-{tag}")).await;
    let hops = counted.load(Ordering::Relaxed);
    let seconds = window.as_secs_f64();
    let (p50_ms, p99_ms) = if chains == 1 {
        (
            Some(stats::percentile_ms(&mut gaps, 0.50)),
            Some(stats::percentile_ms(&mut gaps, 0.99)),
        )
    } else {
        (None, None)
    };
    Ok(Hops {
        chains,
        hops,
        seconds,
        hops_per_s: hops as f64 / seconds,
        p50_ms,
        p99_ms,
    })
}
