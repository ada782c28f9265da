//! Concurrency keys: at most `limit` active runs per (workflow, key), across every coordinator
//! instance and partition.
//!
//! The active runs of a key are one entry of the KV bucket `baton-concurrency`, changed only with
//! compare-and-set, so two coordinators cannot both take the last slot. A run takes a slot before its
//! first step and gives it back when it ends. A coordinator that dies between a run's end and the
//! release leaks nothing for long: a full entry is checked against the journal, and runs that have
//! ended are dropped from it.

use async_nats::jetstream::{self, kv};
use baton_core::{Error, streams, subjects};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Entry {
    /// Run ids, oldest first.
    active: Vec<String>,
}

/// What a run that asks for a slot gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Every slot is taken, by these runs (oldest first).
    Full(Vec<String>),
}

#[derive(Clone)]
pub struct Slots {
    kv: kv::Store,
    /// The journal, where a holder's end is looked up.
    runs: jetstream::stream::Stream,
    partitions: u32,
}

impl Slots {
    pub async fn open(js: &jetstream::Context, partitions: u32) -> Result<Slots, Error> {
        let kv = js
            .get_key_value(streams::CONCURRENCY_BUCKET)
            .await
            .map_err(|e| Error::request("cannot open the concurrency bucket", &e))?;
        let runs = js
            .get_stream(streams::RUNS)
            .await
            .map_err(|e| Error::request("cannot get stream BATON_RUNS", &e))?;
        Ok(Slots {
            kv,
            runs,
            partitions,
        })
    }

    /// The entry of a workflow's key value.
    pub fn slot(workflow: &str, key: &str) -> String {
        let hash = baton_core::event::triggered_run_id(workflow, "concurrency", key);
        format!("{workflow}.{hash}")
    }

    /// The runs holding a slot of `slot`, oldest first, as the bucket says (ended runs may linger
    /// until the next admission cleans them up).
    pub async fn holders(&self, slot: &str) -> Result<Vec<String>, Error> {
        let entry =
            self.kv.get(slot).await.map_err(|e| {
                Error::request(format_args!("cannot read concurrency key {slot}"), &e)
            })?;
        Ok(entry
            .and_then(|v| serde_json::from_slice::<Entry>(&v).ok())
            .map(|e| e.active)
            .unwrap_or_default())
    }

    /// Takes a slot for `run_id` if one is free (or `force`: `cancel-previous` takes one anyway).
    /// Taking it again is a no-op, so a redelivered request is admitted again.
    pub async fn acquire(
        &self,
        slot: &str,
        run_id: &str,
        limit: u32,
        force: bool,
    ) -> Result<Admission, Error> {
        loop {
            let (mut entry, revision) = self.read(slot).await?;
            if entry.active.iter().any(|r| r == run_id) {
                return Ok(Admission::Admitted);
            }
            if entry.active.len() >= limit as usize {
                let mut live = Vec::new();
                for run in entry.active {
                    if !self.has_ended(&run).await? {
                        live.push(run);
                    }
                }
                entry.active = live;
            }
            if entry.active.len() >= limit as usize && !force {
                return Ok(Admission::Full(entry.active));
            }
            let busy = entry.active.clone();
            entry.active.push(run_id.to_owned());
            if self.write(slot, &entry, revision).await? {
                return Ok(if force && busy.len() >= limit as usize {
                    Admission::Full(busy)
                } else {
                    Admission::Admitted
                });
            }
            // Another coordinator changed the entry meanwhile: read it again.
        }
    }

    /// Gives the slot of an ended run back.
    pub async fn release(&self, slot: &str, run_id: &str) -> Result<(), Error> {
        loop {
            let (mut entry, revision) = self.read(slot).await?;
            if !entry.active.iter().any(|r| r == run_id) {
                return Ok(());
            }
            entry.active.retain(|r| r != run_id);
            if self.write(slot, &entry, revision).await? {
                return Ok(());
            }
        }
    }

    /// Whether `run_id` holds a slot of `slot`.
    pub async fn holds(&self, slot: &str, run_id: &str) -> Result<bool, Error> {
        Ok(self.read(slot).await?.0.active.iter().any(|r| r == run_id))
    }

    async fn read(&self, slot: &str) -> Result<(Entry, u64), Error> {
        let entry =
            self.kv.entry(slot).await.map_err(|e| {
                Error::request(format_args!("cannot read concurrency key {slot}"), &e)
            })?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value).unwrap_or_default(),
                e.revision,
            )),
            Some(e) => Ok((Entry::default(), e.revision)),
            None => Ok((Entry::default(), 0)),
        }
    }

    /// Compare-and-set; `false` when the entry changed since `revision`.
    async fn write(&self, slot: &str, entry: &Entry, revision: u64) -> Result<bool, Error> {
        let bytes = serde_json::to_vec(entry).expect("an entry serializes");
        let what = || format!("cannot write concurrency key {slot}");
        if revision == 0 {
            match self.kv.create(slot, bytes.into()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(Error::request(what(), &e)),
            }
        } else {
            match self.kv.update(slot, bytes.into(), revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(Error::request(what(), &e)),
            }
        }
    }

    /// Whether the journal holds an end of the run: its last `run.*` event is an end.
    async fn has_ended(&self, run_id: &str) -> Result<bool, Error> {
        let p = subjects::partition(run_id, self.partitions);
        let last = self
            .runs
            .get_last_raw_message_by_subject(&format!("{}.{p}.{run_id}.run.*", subjects::RUNS))
            .await;
        match last {
            Ok(m) => Ok(baton_core::event::Ending::ALL
                .iter()
                .any(|e| m.subject.ends_with(&format!(".run.{}", e.verb())))),
            // No event at all: nothing holds the slot.
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(true)
            }
            // Unknown (say, during a leader election): the caller tries again rather than free
            // the slot of a run that may be alive.
            Err(e) => Err(Error::request(
                format_args!("cannot look up the end of run {run_id}"),
                &e,
            )),
        }
    }
}
