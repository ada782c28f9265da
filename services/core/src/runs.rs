//! The index of runs: the `baton-runs` KV bucket, one entry per run id, created once.
//!
//! The coordinator claims a run id when it first admits the run, before the run's first command,
//! with a create-only write. A `run.requested` for a run id that is already claimed by another
//! request (a webhook redelivered after the stream's duplicate window, a re-published dead letter,
//! an event sent twice) starts nothing: a run id executes at most once for as long as the entry is
//! kept, which is as long as the journal keeps the run (the bucket's `max_age` is the journal's).
//! Claiming costs one KV write per run and no journal read.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::streams::RUNS_BUCKET;

/// What the index holds about a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    pub workflow: String,
    pub version: u64,
    /// Stream sequence (in `BATON_RUNS`) of the `run.requested` that claimed the run.
    pub request: u64,
    /// The parent run, for a sub-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The run id was free: this request starts the run.
    New,
    /// This same request claimed it before (delivered again, say after a crash or while queued
    /// behind a concurrency key): go on with it.
    Again,
    /// Another request claimed it: this one is a duplicate and must change nothing.
    Taken(Entry),
}

#[derive(Clone)]
pub struct Index {
    kv: kv::Store,
}

impl Index {
    pub async fn open(js: &jetstream::Context) -> Result<Index, Error> {
        let kv = js.get_key_value(RUNS_BUCKET).await.map_err(|e| {
            Error::request(
                format_args!("cannot open the run index (KV bucket {RUNS_BUCKET})"),
                &e,
            )
        })?;
        Ok(Index { kv })
    }

    /// Claims `run_id` for the request described by `entry`.
    pub async fn claim(&self, run_id: &str, entry: &Entry) -> Result<Claim, Error> {
        let value = serde_json::to_vec(entry).expect("an index entry serializes");
        match self.kv.create(key(run_id), value.into()).await {
            Ok(_) => Ok(Claim::New),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match self.get(run_id).await? {
                    Some(existing) if existing.request == entry.request => Ok(Claim::Again),
                    Some(existing) => Ok(Claim::Taken(existing)),
                    // Purged between the two requests: claim again.
                    None => Box::pin(self.claim(run_id, entry)).await,
                }
            }
            Err(e) => Err(Error::request(
                format_args!("cannot claim run {run_id} in the run index"),
                &e,
            )),
        }
    }

    /// The entry of `run_id`, if the run exists.
    pub async fn get(&self, run_id: &str) -> Result<Option<Entry>, Error> {
        let value = self.kv.get(key(run_id)).await.map_err(|e| {
            Error::request(
                format_args!("cannot read run {run_id} from the run index"),
                &e,
            )
        })?;
        match value {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::permanent(format!(
                    "the run index entry of {run_id} does not decode: {e}"
                ))
            }),
        }
    }
}

/// The KV key of a run id: the id itself when it only has characters KV keys allow (every id Baton
/// makes), else a hash of it.
pub fn key(run_id: &str) -> String {
    let plain = !run_id.is_empty()
        && run_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        run_id.to_owned()
    } else {
        use sha2::{Digest, Sha256};
        let hash = Sha256::digest(run_id.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        format!("h_{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_and_distinct() {
        assert_eq!(key("01J0ABC-step_1-2"), "01J0ABC-step_1-2");
        let odd = key("run/with:odd*chars");
        assert!(odd.starts_with("h_") && odd.len() == 66, "{odd}");
        assert_ne!(key("a~b"), key("a+b"));
    }
}
