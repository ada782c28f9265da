//! Secrets: referenced by name in workflows (`${{ .secrets.api_token }}`), resolved only by the
//! runner that executes a step, never stored anywhere else.
//!
//! The coordinator evaluates a step's `with` with `.secrets.NAME` bound to a *reference*, the text
//! `<<secret:NAME>>`, so the `step.requested` event in the journal says which secret a step uses
//! and never what it is. The runner replaces each reference with the value from its [`Store`] just
//! before the handler runs, and replaces every resolved value in the step's outputs and error with
//! `***` before anything is published.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use async_nats::jetstream::{self, kv};
use serde_json::Value;

use crate::streams::SECRETS_BUCKET;

const OPEN: &str = "<<secret:";
const CLOSE: &str = ">>";
/// What a secret's value is replaced with in outputs and errors.
pub const MASK: &str = "***";

/// The reference the coordinator writes for secret `name`.
pub fn reference(name: &str) -> String {
    format!("{OPEN}{name}{CLOSE}")
}

/// Whether `name` can name a secret: letters, digits and `_` (so jq reads `.secrets.NAME`).
pub fn is_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The names of the secrets referenced anywhere in `value`.
pub fn referenced(value: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    visit(value, &mut |s| {
        let mut rest = s;
        while let Some(start) = rest.find(OPEN) {
            let after = &rest[start + OPEN.len()..];
            let Some(end) = after.find(CLOSE) else { break };
            if is_name(&after[..end]) {
                names.insert(after[..end].to_owned());
            }
            rest = &after[end..];
        }
    });
    names
}

fn visit(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().for_each(|v| visit(v, f)),
        Value::Object(map) => map.values().for_each(|v| visit(v, f)),
        _ => {}
    }
}

fn rewrite(value: &mut Value, f: &impl Fn(&str) -> String) {
    match value {
        Value::String(s) => *s = f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| rewrite(v, f)),
        _ => {}
    }
}

/// Replaces every reference in `value` with the secret's value.
pub fn resolve(value: &mut Value, secrets: &BTreeMap<String, String>) {
    rewrite(value, &|s: &str| {
        secrets.iter().fold(s.to_owned(), |s, (name, secret)| {
            s.replace(&reference(name), secret)
        })
    });
}

/// Replaces every occurrence of a secret's value in `text` with [`MASK`].
pub fn mask_text(text: &str, secrets: &BTreeMap<String, String>) -> String {
    secrets
        .values()
        .filter(|v| !v.is_empty())
        .fold(text.to_owned(), |t, secret| {
            t.replace(secret.as_str(), MASK)
        })
}

/// Replaces every occurrence of a secret's value in `value` (its strings and keys' values) with
/// [`MASK`].
pub fn mask(value: &mut Value, secrets: &BTreeMap<String, String>) {
    rewrite(value, &|s: &str| mask_text(s, secrets));
}

/// Where a runner finds secrets, first match wins: the KV bucket `baton-secrets` (shared by a
/// cluster), a directory with one file per secret (mounted Kubernetes or Docker secrets), and
/// environment variables `BATON_SECRET_<NAME>` (development).
#[derive(Clone)]
pub struct Store {
    bucket: Option<kv::Store>,
    dir: Option<PathBuf>,
}

impl Store {
    /// The store of a runner: the bucket if it exists, and `BATON_SECRETS_DIR` if set.
    pub async fn open(js: &jetstream::Context) -> Store {
        Store {
            bucket: js.get_key_value(SECRETS_BUCKET).await.ok(),
            dir: std::env::var_os("BATON_SECRETS_DIR").map(PathBuf::from),
        }
    }

    /// The value of `name`. The error says where it was looked for, never any value.
    pub async fn get(&self, name: &str) -> Result<String, Missing> {
        if let Some(bucket) = &self.bucket {
            match bucket.get(name).await {
                Ok(Some(v)) => return Ok(String::from_utf8_lossy(&v).into_owned()),
                Ok(None) => {}
                Err(e) => {
                    return Err(Missing {
                        message: format!("the secrets bucket cannot be read: {e}"),
                        transient: true,
                    });
                }
            }
        }
        if let Some(dir) = &self.dir
            && let Ok(v) = std::fs::read_to_string(dir.join(name))
        {
            return Ok(v.trim_end_matches(['\n', '\r']).to_owned());
        }
        if let Ok(v) = std::env::var(format!("BATON_SECRET_{}", name.to_ascii_uppercase())) {
            return Ok(v);
        }
        Err(Missing {
            message: format!(
                "secret {name} is not set: set it with `baton secrets set {name}`, or give the runner BATON_SECRET_{} or a file {name} in BATON_SECRETS_DIR",
                name.to_ascii_uppercase()
            ),
            transient: false,
        })
    }
}

/// A secret that could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub message: String,
    /// The store could not be read (retry later), rather than the secret not being there.
    pub transient: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_resolve_and_values_are_masked() {
        let mut input = json!({
            "headers": {"Authorization": format!("Bearer {}", reference("api_token"))},
            "env": [reference("deploy_key"), "plain", reference("not a name")],
            "n": 3
        });
        let names: Vec<String> = referenced(&input).into_iter().collect();
        assert_eq!(names, ["api_token", "deploy_key"]);
        let secrets = BTreeMap::from([
            ("api_token".to_owned(), "t0k3n".to_owned()),
            ("deploy_key".to_owned(), "k3y".to_owned()),
        ]);
        resolve(&mut input, &secrets);
        assert_eq!(input["headers"]["Authorization"], "Bearer t0k3n");
        assert_eq!(input["env"][0], "k3y");
        let mut output = json!({"echo": "Bearer t0k3n and k3y", "list": ["k3y"], "n": 3});
        mask(&mut output, &secrets);
        assert_eq!(
            output,
            json!({"echo": "Bearer *** and ***", "list": ["***"], "n": 3})
        );
        assert_eq!(mask_text("exit 3: t0k3n", &secrets), "exit 3: ***");
    }
}
