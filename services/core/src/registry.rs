//! The workflow registry in the `baton-workflows` KV bucket.
//!
//! `<name>.v<version>` holds one immutable version (its source text); `<name>.head` names the latest
//! version and its digest. Applying identical content creates no version. Runs name the version
//! they started with and are executed with it until they end.

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
    #[error("workflow {name} was changed concurrently; try again")]
    Conflict { name: String },
    #[error("stored head of workflow {name} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
}

/// Hex SHA-256 of a workflow's source text.
pub fn digest(source: &str) -> String {
    Sha256::digest(source.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The registry, a thin typed view of the KV bucket.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
}

impl Registry {
    pub async fn open(js: &jetstream::Context) -> Result<Registry, Error> {
        let kv = js
            .get_key_value(WORKFLOWS_BUCKET)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(Registry { kv })
    }

    /// Stores `source` as a new version of `name` unless the latest version has the same content.
    /// Returns the version and whether it is new.
    pub async fn apply(
        &self,
        name: &str,
        source: &str,
        triggers: Vec<String>,
    ) -> Result<(u64, bool), Error> {
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
        let version = head.as_ref().map_or(1, |h| h.version + 1);
        // The version key is written first: a head never names a version that does not exist.
        self.kv
            .put(format!("{name}.v{version}"), source.to_owned().into())
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
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
