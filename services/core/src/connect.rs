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
        "cannot connect to NATS at {url}: {error}. Is nats-server running there? `baton dev` \
         starts one; NATS_URL (or `--nats-url`) names another server."
    )]
    Connect {
        url: String,
        /// In the message, not a `source`: a report of the chain would repeat it after the remedy.
        error: async_nats::ConnectError,
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

/// Connects to `url` (one URL, or several separated by commas for a cluster) as `name`, checks the
/// server version, and ensures streams and buckets exist. Fails at once when the server cannot be
/// reached: for one-shot commands. Services start with [`connect_waiting`].
pub async fn connect(url: &str, name: &str, topology: &Topology) -> Result<Bus, Error> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .connect(url.split(',').map(str::trim).collect::<Vec<_>>().as_slice())
        .await
        .map_err(|error| Error::Connect {
            url: url.to_owned(),
            error,
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

/// Connects like [`connect`], but a service started before its NATS server (or while a cluster
/// elects its leaders) waits for it: it retries with a backoff from 250 ms to 5 s, logging what it
/// waits for, until connected, or until `shutdown` is cancelled (`Ok(None)`). A server that is too
/// old or has no JetStream is an error at once, as waiting would not change it.
pub async fn connect_waiting(
    url: &str,
    name: &str,
    topology: &Topology,
    shutdown: &crate::shutdown::CancellationToken,
) -> Result<Option<Bus>, Error> {
    let what = format!("reach NATS at {url}");
    let connected = crate::shutdown::until_ok(&what, shutdown, || async {
        match connect(url, name, topology).await {
            Err(e @ (Error::Connect { .. } | Error::Setup(_))) => Err(e),
            // Connected, or refused for a reason that waiting does not change.
            done => Ok(done),
        }
    })
    .await;
    match connected {
        Some(Ok(bus)) => {
            tracing::info!(%url, "connected to NATS");
            Ok(Some(bus))
        }
        Some(Err(e)) => Err(e),
        None => Ok(None),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::CancellationToken;
    use std::time::Instant;

    /// A service waiting for a server that never comes still stops when told to.
    #[tokio::test]
    async fn waiting_for_nats_ends_on_shutdown() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("nats://127.0.0.1:{port}");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            stop.cancel();
        });
        let began = Instant::now();
        let bus = connect_waiting(&url, "test", &Topology::default(), &shutdown)
            .await
            .unwrap();
        assert!(bus.is_none());
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        // A one-shot connection fails at once, naming the server and what to do.
        let error = connect(&url, "test", &Topology::default())
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&url) && message.contains("baton dev"),
            "{message}"
        );
    }
}
