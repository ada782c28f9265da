//! The workflow registry in the `baton-workflows` KV bucket.
//!
//! `<name>.v<version>` holds one immutable version (its source text); `<name>.head` names the latest
//! version and its digest. Applying identical content creates no version. Runs name the version
//! they started with and are executed with it until they end.
//!
//! Disabling a workflow clears `enabled` in its head: events no longer start runs of it, runs in
//! flight go on. Deleting it removes the head (it is no longer listed or triggered) and keeps the
//! versions, which runs in flight still read; `purge` removes the versions too. A workflow applied
//! again after a delete continues the version numbers, so a version number never names two
//! different contents.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::streams::WORKFLOWS_BUCKET;

/// The latest version of a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub name: String,
    pub version: u64,
    pub digest: String,
    /// Trigger types of this version, so the trigger index needs no compilation.
    #[serde(default)]
    pub triggers: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workflow registry (KV bucket {WORKFLOWS_BUCKET}) is not reachable: {0}")]
    Unavailable(String),
    #[error(
        "workflow {name} is too large to store: {size} bytes, and the NATS server takes messages of \
         at most {limit} bytes (its `max_payload`). Make the file smaller: move long scripts into \
         files the steps run, or split the workflow into workflows started with `uses: workflow`; \
         or raise `max_payload` in the server's configuration"
    )]
    TooLarge {
        name: String,
        size: usize,
        limit: usize,
    },
    #[error("workflow {name} was changed concurrently; try again")]
    Conflict { name: String },
    #[error("stored head of workflow {name} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
}

impl From<Error> for crate::Error {
    /// An unreachable registry or a concurrent change may succeed later; a corrupt head will not.
    fn from(e: Error) -> crate::Error {
        match e {
            Error::Unavailable(_) | Error::Conflict { .. } => {
                crate::Error::transient(e.to_string())
            }
            Error::Corrupt { .. } | Error::TooLarge { .. } => {
                crate::Error::permanent(e.to_string())
            }
        }
    }
}

/// Whether a put failed because the value is over the server's `max_payload`.
fn too_large(e: &kv::PutError) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<jetstream::context::PublishError>())
        .is_some_and(|p| p.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded)
}

/// Hex SHA-256 of a workflow's source text.
pub fn digest(source: &str) -> String {
    Sha256::digest(source.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One stored version of a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: u64,
    /// Hex SHA-256 of its source.
    pub digest: String,
    /// When it was stored, in seconds since the Unix epoch.
    pub created_unix: i64,
}

/// The registry, a thin typed view of the KV bucket.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
    /// For the server's `max_payload`, which bounds a version's size.
    client: async_nats::Client,
}

impl Registry {
    pub async fn open(js: &jetstream::Context) -> Result<Registry, Error> {
        let kv = js
            .get_key_value(WORKFLOWS_BUCKET)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(Registry {
            kv,
            client: js.client(),
        })
    }

    /// Whether `source` fits in one message of the server, as a version must: checked before
    /// anything is written, so that an oversized file is named as such and stores nothing.
    pub fn check_size(&self, name: &str, source: &str) -> Result<(), Error> {
        let limit = self.client.server_info().max_payload;
        if source.len() > limit {
            return Err(Error::TooLarge {
                name: name.to_owned(),
                size: source.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Stores `source` as a new version of `name` unless the latest version has the same content.
    /// Returns the version and whether it is new.
    pub async fn apply(
        &self,
        name: &str,
        source: &str,
        triggers: Vec<String>,
    ) -> Result<(u64, bool), Error> {
        self.check_size(name, source)?;
        let digest = digest(source);
        let head_key = format!("{name}.head");
        let current = self
            .kv
            .entry(&head_key)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let (head, revision) = match current.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => {
                let head: Head =
                    serde_json::from_slice(&entry.value).map_err(|e| Error::Corrupt {
                        name: name.to_owned(),
                        reason: e.to_string(),
                    })?;
                (Some(head), entry.revision)
            }
            None => (None, 0),
        };
        if let Some(head) = &head
            && head.digest == digest
        {
            return Ok((head.version, false));
        }
        let version = match &head {
            Some(h) => h.version + 1,
            // After a delete, versions may remain: never reuse their numbers.
            None => self
                .versions(name)
                .await?
                .last()
                .map_or(1, |v| v.version + 1),
        };
        // The version key is written first: a head never names a version that does not exist.
        self.kv
            .put(format!("{name}.v{version}"), source.to_owned().into())
            .await
            .map_err(|e| {
                // The server's limit can have changed since the check (a reconnect elsewhere).
                if too_large(&e) {
                    Error::TooLarge {
                        name: name.to_owned(),
                        size: source.len(),
                        limit: self.client.server_info().max_payload,
                    }
                } else {
                    Error::Unavailable(e.to_string())
                }
            })?;
        let new_head = Head {
            name: name.to_owned(),
            version,
            digest,
            triggers,
            enabled: true,
        };
        let bytes = serde_json::to_vec(&new_head).expect("a head serializes");
        let written = if revision == 0 {
            self.kv
                .create(&head_key, bytes.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            self.kv
                .update(&head_key, bytes.into(), revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        written.map_err(|_| Error::Conflict {
            name: name.to_owned(),
        })?;
        Ok((version, true))
    }

    /// The source text of one version.
    pub async fn source(&self, name: &str, version: u64) -> Result<Option<String>, Error> {
        let value = self
            .kv
            .get(format!("{name}.v{version}"))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(value.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// The head of one workflow, with its KV revision (for compare-and-set updates).
    async fn head_entry(&self, name: &str) -> Result<Option<(Head, u64)>, Error> {
        let entry = self
            .kv
            .entry(format!("{name}.head"))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        match entry.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => {
                let head: Head =
                    serde_json::from_slice(&entry.value).map_err(|e| Error::Corrupt {
                        name: name.to_owned(),
                        reason: e.to_string(),
                    })?;
                Ok(Some((head, entry.revision)))
            }
            None => Ok(None),
        }
    }

    /// The head of one workflow, if it exists.
    pub async fn head(&self, name: &str) -> Result<Option<Head>, Error> {
        Ok(self.head_entry(name).await?.map(|(h, _)| h))
    }

    /// Every stored version of a workflow, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<Version>, Error> {
        let prefix = format!("{name}.v");
        let mut versions = Vec::new();
        for key in self.keys().await? {
            let Some(n) = key
                .strip_prefix(&prefix)
                .and_then(|v| v.parse::<u64>().ok())
            else {
                continue;
            };
            let entry = self
                .kv
                .entry(&key)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) {
                versions.push(Version {
                    version: n,
                    digest: digest(&String::from_utf8_lossy(&entry.value)),
                    created_unix: entry.created.unix_timestamp(),
                });
            }
        }
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    /// Enables or disables a workflow: whether events start runs of it. Returns false when the
    /// workflow does not exist.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, Error> {
        let Some((mut head, revision)) = self.head_entry(name).await? else {
            return Ok(false);
        };
        if head.enabled == enabled {
            return Ok(true);
        }
        head.enabled = enabled;
        let bytes = serde_json::to_vec(&head).expect("a head serializes");
        self.kv
            .update(format!("{name}.head"), bytes.into(), revision)
            .await
            .map_err(|_| Error::Conflict {
                name: name.to_owned(),
            })?;
        Ok(true)
    }

    /// Deletes a workflow's head: it is no longer listed, triggered or startable by name. Its
    /// versions stay for the runs that use them unless `purge`, which removes them too. Returns
    /// false when there was nothing to delete.
    pub async fn delete(&self, name: &str, purge: bool) -> Result<bool, Error> {
        let had_head = self.head_entry(name).await?.is_some();
        if had_head {
            self.kv
                .delete(format!("{name}.head"))
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?;
        }
        let mut purged = false;
        if purge {
            for v in self.versions(name).await? {
                self.kv
                    .purge(format!("{name}.v{}", v.version))
                    .await
                    .map_err(|e| Error::Unavailable(e.to_string()))?;
                purged = true;
            }
        }
        Ok(had_head || purged)
    }

    async fn keys(&self) -> Result<Vec<String>, Error> {
        use futures::TryStreamExt;
        match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| Error::Unavailable(e.to_string())),
            Err(e) => Err(Error::Unavailable(e.to_string())),
        }
    }

    /// The latest version of every workflow.
    pub async fn heads(&self) -> Result<Vec<Head>, Error> {
        use futures::TryStreamExt;
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?,
            Err(e) => return Err(Error::Unavailable(e.to_string())),
        };
        let mut heads = Vec::new();
        for key in keys.iter().filter(|k| k.ends_with(".head")) {
            if let Some(bytes) = self
                .kv
                .get(key)
                .await
                .map_err(|e| Error::Unavailable(e.to_string()))?
            {
                let head: Head = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                    name: key.clone(),
                    reason: e.to_string(),
                })?;
                heads.push(head);
            }
        }
        Ok(heads)
    }
}
