//! Trigger matching: every event in `BATON_EVENTS` starts a run of each active workflow whose `on:`
//! names its type. The run id is derived from (workflow, event source, event id), so a redelivered
//! event republishes the same `run.requested`, which JetStream drops as a duplicate. The event is
//! acked only after every `run.requested` it caused is stored.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use baton_core::event::{self, RunEvent, RunRequested, Trigger, WorkflowRef};
use baton_core::registry::Registry;
use baton_core::shutdown::CancellationToken;
use baton_core::{Bus, binding, dlq, streams};
use cloudevents::AttributesReader;
use futures::StreamExt;

const SOURCE: &str = "baton/gateway";
/// A miss reloads the index at most this often, so a workflow applied a moment ago is found.
const RELOAD_ON_MISS: Duration = Duration::from_millis(200);
/// The index is reloaded at least this often.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    #[error(transparent)]
    Registry(#[from] baton_core::registry::Error),
}

fn jserr<E: std::fmt::Display>(e: E) -> Error {
    Error::JetStream(e.to_string())
}

pub struct Triggers {
    bus: Bus,
    registry: Registry,
    /// Event type -> workflows (name, latest version) it starts.
    index: HashMap<String, Vec<(String, u64)>>,
    loaded: Option<Instant>,
}

impl Triggers {
    pub async fn new(bus: Bus) -> Result<Triggers, Error> {
        let registry = Registry::open(&bus.js).await?;
        Ok(Triggers {
            bus,
            registry,
            index: HashMap::new(),
            loaded: None,
        })
    }

    async fn reload(&mut self) -> Result<(), Error> {
        let mut index: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for head in self
            .registry
            .heads()
            .await?
            .into_iter()
            .filter(|h| h.enabled)
        {
            for ty in &head.triggers {
                index
                    .entry(ty.clone())
                    .or_default()
                    .push((head.name.clone(), head.version));
            }
        }
        self.index = index;
        self.loaded = Some(Instant::now());
        Ok(())
    }

    fn stale(&self, max_age: Duration) -> bool {
        self.loaded.is_none_or(|at| at.elapsed() >= max_age)
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let stream = self
            .bus
            .js
            .get_stream(streams::EVENTS)
            .await
            .map_err(jserr)?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some("triggers".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(jserr)?;
        let mut messages = consumer.messages().await.map_err(jserr)?;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => match next {
                    None => return Ok(()),
                    Some(Err(error)) => {
                        tracing::debug!(%error, "pull error; retrying");
                        continue;
                    }
                    Some(Ok(m)) => m,
                },
            };
            self.handle(message).await;
        }
    }

    async fn handle(&mut self, message: jetstream::Message) {
        let event = match binding::decode(message.headers.as_ref(), &message.payload) {
            Ok(e) => e,
            Err(e) => {
                dlq::reject(&self.bus.js, "ingress", &message, &e.to_string()).await;
                return;
            }
        };
        let reload = self.stale(RELOAD_EVERY)
            || (!self.index.contains_key(event.ty()) && self.stale(RELOAD_ON_MISS));
        if reload && let Err(error) = self.reload().await {
            tracing::warn!(%error, "cannot load workflows; the event will be redelivered");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
        let Some(matches) = self.index.get(event.ty()) else {
            tracing::debug!(
                ty = event.ty(),
                id = event.id(),
                "no workflow is triggered by this event"
            );
            let _ = message.ack().await;
            return;
        };
        let trigger = Trigger {
            id: event.id().to_owned(),
            source: event.source().to_string(),
            ty: event.ty().to_owned(),
            subject: event.subject().map(str::to_owned),
            data: event::data_value(&event),
        };
        // The run continues the event's trace.
        let trace = event::trace(&event).unwrap_or_default();
        let mut requests = Vec::new();
        for (name, version) in matches {
            let request = RunEvent::Requested(RunRequested {
                run_id: event::triggered_run_id(name, &trigger.source, &trigger.id),
                workflow: WorkflowRef {
                    name: name.clone(),
                    version: *version,
                },
                input: serde_json::Value::Null,
                trigger: Some(trigger.clone()),
                parent: None,
            });
            tracing::info!(workflow = %name, version, run = request.run_id(), event = %trigger.id, "event starts a run");
            requests.push(request);
        }
        let stored = self
            .bus
            .store(
                SOURCE,
                requests.iter().map(|r| (r, &trace)).collect::<Vec<_>>(),
            )
            .await
            .is_ok();
        let _ = if stored {
            message.ack().await
        } else {
            message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await
        };
    }
}
