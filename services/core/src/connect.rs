//! Connecting to NATS: the server must run JetStream and be at least version 2.12.

use std::time::Duration;

use async_nats::jetstream;

use crate::provision::{MIN_VERSION, Version};
use crate::streams::{self, Topology};

/// A connection to the bus, with the journal's partition count.
#[derive(Clone, Debug)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub partitions: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot connect to NATS at {url}: {source}. Is nats-server running there? `baton dev` starts one."
    )]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "the NATS server at {url} is version {found}; Baton needs {MIN_VERSION} or newer \
         (message scheduling, per-message TTL). Upgrade it, or run `baton dev` which installs a suitable one."
    )]
    TooOld { url: String, found: String },
    #[error("the NATS server at {url} does not have JetStream enabled; start it with `-js`")]
    NoJetStream { url: String },
    #[error(transparent)]
    Setup(#[from] streams::Error),
}

/// Connects to `url` (one URL, or several separated by commas for a cluster) as `name`, checks the server version, and ensures streams and buckets exist.
pub async fn connect(url: &str, name: &str, topology: &Topology) -> Result<Bus, Error> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .connect(url.split(',').map(str::trim).collect::<Vec<_>>().as_slice())
        .await
        .map_err(|source| Error::Connect {
            url: url.to_owned(),
            source,
        })?;
    let info = client.server_info();
    let found = Version::parse(&info.version);
    if found.is_none_or(|v| v < MIN_VERSION) {
        return Err(Error::TooOld {
            url: url.to_owned(),
            found: info.version,
        });
    }
    if !info.jetstream {
        return Err(Error::NoJetStream {
            url: url.to_owned(),
        });
    }
    let js = jetstream::new(client.clone());
    let partitions = streams::ensure(&js, topology).await?;
    Ok(Bus {
        client,
        js,
        partitions,
    })
}

impl Bus {
    /// Publishes run events (each with the trace it continues) from `source`, and waits until
    /// JetStream has stored every one. Callers ack their input only after this succeeds.
    pub async fn store<'a>(
        &self,
        source: &str,
        events: impl IntoIterator<Item = (&'a crate::event::RunEvent, &'a crate::trace::Trace)>,
    ) -> Result<(), crate::Error> {
        let mut acks = Vec::new();
        for (event, trace) in events {
            let (headers, body) = crate::binding::encode(&event.to_cloudevent(source, trace));
            let ack = self
                .js
                .publish_with_headers(event.subject(self.partitions), headers, body)
                .await
                .map_err(|e| crate::Error::publish(&e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| crate::Error::publish(&e))?;
        }
        Ok(())
    }
}
