//! Compiled workflow versions, loaded from the registry once and kept: versions are immutable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::Error;
use crate::registry::Registry;
use baton_workflow::Workflow;

/// (name, version) -> compiled workflow.
type Cache = HashMap<(String, u64), Arc<Workflow>>;

#[derive(Clone)]
pub struct Workflows {
    registry: Registry,
    cache: Arc<Mutex<Cache>>,
}

impl Workflows {
    pub fn new(registry: Registry) -> Workflows {
        Workflows {
            registry,
            cache: Arc::default(),
        }
    }

    /// The latest version of `name`, for a sub-run that does not pin one. A registry that cannot
    /// be read is a transient error; a missing or disabled workflow a permanent one.
    pub async fn head_version(&self, name: &str) -> Result<u64, Error> {
        match self.registry.head(name).await? {
            Some(head) if head.enabled => Ok(head.version),
            Some(_) => Err(Error::permanent(format!(
                "workflow {name} is disabled; enable it with `baton workflows enable {name}`"
            ))),
            None => Err(Error::permanent(format!(
                "workflow {name} is not in the registry; apply it with `baton apply`"
            ))),
        }
    }

    /// The compiled version, or an error that says why it cannot be had: transient when the
    /// registry cannot be read (retry), permanent when the version is missing or does not compile.
    pub async fn get(&self, name: &str, version: u64) -> Result<Arc<Workflow>, Error> {
        let key = (name.to_owned(), version);
        if let Some(wf) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(wf.clone());
        }
        let source = self
            .registry
            .source(name, version)
            .await
            .map_err(|e| {
                Error::from(e).context(format!("reading workflow {name} version {version}"))
            })?
            .ok_or_else(|| {
                Error::permanent(format!(
                    "workflow {name} version {version} is not in the registry; apply it with \
                     `baton apply`, then re-publish the dead letter"
                ))
            })?;
        let wf = Arc::new(baton_workflow::compile(&source).map_err(|p| {
            Error::permanent(format!(
                "workflow {name} version {version} does not compile: {p}"
            ))
        })?);
        self.cache
            .lock()
            .expect("cache lock")
            .insert(key, wf.clone());
        Ok(wf)
    }
}
