//! Connecting to NATS: the server must run JetStream and be at least version 2.12. The client
//! authenticates with a credentials file, an nkey seed, a user and password or a token, and secures
//! the connection with TLS ([`Auth`]).

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, jetstream};

use crate::provision::{MIN_VERSION, Version};
use crate::streams::{self, Topology};

/// A connection to the bus, with the journal's partition count.
#[derive(Clone, Debug)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub partitions: u32,
}

/// How a client proves who it is to NATS and secures the connection. Each field has a `NATS_*`
/// environment variable ([`Auth::from_env`]), which the CLI's flags also read.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// A credentials file (user JWT and nkey seed), as `nsc` or `baton` generate: `NATS_CREDS`.
    pub creds: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`): `NATS_NKEY`.
    pub nkey: Option<PathBuf>,
    /// `NATS_USER` and `NATS_PASSWORD`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `NATS_TOKEN`.
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate: `NATS_CA`. Implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients: `NATS_CERT`, `NATS_KEY`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Auth {
    /// Reads the `NATS_*` variables (empty ones count as unset).
    pub fn from_env() -> Auth {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Auth {
            creds: var("NATS_CREDS").map(PathBuf::from),
            nkey: var("NATS_NKEY").map(PathBuf::from),
            user: var("NATS_USER"),
            password: var("NATS_PASSWORD"),
            token: var("NATS_TOKEN"),
            tls_ca: var("NATS_CA").map(PathBuf::from),
            tls_cert: var("NATS_CERT").map(PathBuf::from),
            tls_key: var("NATS_KEY").map(PathBuf::from),
        }
    }

    /// Who the client says it is, for messages (never a secret).
    pub fn identity(&self) -> String {
        if let Some(creds) = &self.creds {
            format!("the credentials file {}", creds.display())
        } else if let Some(nkey) = &self.nkey {
            format!("the nkey seed in {}", nkey.display())
        } else if let Some(user) = &self.user {
            format!("user {user}")
        } else if self.token.is_some() {
            "a token".into()
        } else {
            "no credentials (the server's default user)".into()
        }
    }

    fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions, Error> {
        let read = |what: &str, path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|e| Error::Credentials {
                reason: format!("cannot read {what} {}: {e}", path.display()),
            })
        };
        if let Some(path) = &self.creds {
            options = options
                .credentials(&read("the credentials file", path)?)
                .map_err(|e| Error::Credentials {
                    reason: format!(
                        "the credentials file {} is not valid ({e}): it must hold a user JWT \
                         and an nkey seed, as `nsc generate creds` writes them",
                        path.display()
                    ),
                })?;
        }
        if let Some(path) = &self.nkey {
            let seed = read("the nkey seed file", path)?;
            let seed = seed.trim();
            if !seed.starts_with("SU") {
                return Err(Error::Credentials {
                    reason: format!(
                        "{} does not hold a user nkey seed (it starts with `SU`)",
                        path.display()
                    ),
                });
            }
            options = options.nkey(seed.to_owned());
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                options = options.user_and_password(user.clone(), password.clone())
            }
            (Some(user), None) => {
                return Err(Error::Credentials {
                    reason: format!(
                        "user {user} has no password: set NATS_PASSWORD or --nats-password"
                    ),
                });
            }
            (None, Some(_)) => {
                return Err(Error::Credentials {
                    reason: "a password without a user: set NATS_USER or --nats-user".into(),
                });
            }
            (None, None) => {}
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            read("the CA file", ca)?;
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                read("the client certificate", cert)?;
                read("the client key", key)?;
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => {
                return Err(Error::Credentials {
                    reason: "a client certificate needs both NATS_CERT and NATS_KEY".into(),
                });
            }
        }
        Ok(options)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{reason}")]
    Credentials { reason: String },
    #[error(
        "NATS at {url} refused {identity}: {error}. Check the credentials (NATS_CREDS, NATS_NKEY, \
         NATS_USER and NATS_PASSWORD, or NATS_TOKEN) against the server's authorization settings."
    )]
    Refused {
        url: String,
        identity: String,
        error: async_nats::ConnectError,
    },
    #[error(
        "TLS with NATS at {url} failed: {error}. Check that the CA (NATS_CA) signed the server's \
         certificate and that its name matches the URL's host, and the client certificate \
         (NATS_CERT, NATS_KEY) if the server verifies clients."
    )]
    Tls {
        url: String,
        error: async_nats::ConnectError,
    },
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
    connect_as(url, name, topology, &Auth::from_env()).await
}

/// [`connect`] with explicit credentials.
pub async fn connect_as(
    url: &str,
    name: &str,
    topology: &Topology,
    auth: &Auth,
) -> Result<Bus, Error> {
    let identity = auth.identity();
    let options = auth.apply(
        ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(move |event| {
                let identity = identity.clone();
                async move { log_event(&identity, event) }
            }),
    )?;
    let client = options
        .connect(url.split(',').map(str::trim).collect::<Vec<_>>().as_slice())
        .await
        .map_err(|error| {
            let url = url.to_owned();
            match error.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    Error::Refused {
                        url,
                        identity: auth.identity(),
                        error,
                    }
                }
                ConnectErrorKind::Tls => Error::Tls { url, error },
                // rustls reports an untrusted server certificate as an I/O error.
                ConnectErrorKind::Io if error.to_string().contains("certificate") => {
                    Error::Tls { url, error }
                }
                _ => Error::Connect { url, error },
            }
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
    auth: &Auth,
    shutdown: &crate::shutdown::CancellationToken,
) -> Result<Option<Bus>, Error> {
    let what = format!("reach NATS at {url}");
    let connected = crate::shutdown::until_ok(&what, shutdown, || async {
        match connect_as(url, name, topology, auth).await {
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

/// Logs what the server tells the client after connecting. A denied permission is an operator's
/// mistake worth an error line: which subject, which user, what to do.
fn log_event(identity: &str, event: async_nats::Event) {
    use async_nats::{Event, ServerError};
    match event {
        Event::ServerError(ServerError::Other(e)) if e.contains("Permissions Violation") => {
            tracing::error!(
                user = %identity,
                error = %e,
                "NATS denied a permission to this process; grant the subject to its user in the \
                 server's authorization settings (deploy/nats/ has the permissions of each role)"
            );
        }
        Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
        Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        Event::Connected => tracing::info!("connected to NATS"),
        other => tracing::debug!(event = %other, "NATS client event"),
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
        let bus = connect_waiting(
            &url,
            "test",
            &Topology::default(),
            &Auth::default(),
            &shutdown,
        )
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
