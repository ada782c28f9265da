//! Secrets: referenced by name in workflows (`${{ .secrets.api_token }}`), resolved only by the
//! runner that executes a step, never stored anywhere else.
//!
//! The coordinator evaluates a step's `with` with `.secrets.NAME` bound to a *reference*, the text
//! `<<secret:NAME>>`, so the `step.requested` event in the journal says which secret a step uses
//! and never what it is. The runner replaces each reference with the value from its [`Store`] just
//! before the handler runs, and replaces every resolved value in the step's outputs and error with
//! `***` before anything is published.
//!
//! Anyone who can send an event or start a run can put the text `<<secret:NAME>>` in its data, and
//! expressions can build that text from data (`+`, `@base64d`, `ascii_downcase`, ...). So a runner
//! never resolves a reference because of what the text says: the request lists each reference the
//! coordinator placed ([`Placed`]: which string, at which byte, which secret), and only those are
//! resolved. The coordinator knows which ones it placed because, while it evaluates, `.secrets.NAME`
//! is bound to a [`Binding`]'s marker that holds a tag derived from the whole expression context:
//! data in that context cannot contain the tag of a context that contains the data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use async_nats::jetstream::{self, kv};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

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

/// A reference to a secret that the coordinator placed in a step's input: the only kind a runner
/// resolves. Text that only looks like a reference (from an event, a run's inputs, a step's
/// outputs) is passed on as it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct Placed {
    /// The string that holds it, as a JSON pointer into the input (`/headers/Authorization`).
    pub path: String,
    /// The byte offset of `<<secret:NAME>>` in that string.
    pub at: usize,
    /// The secret.
    pub name: String,
}

/// What `.secrets` is bound to while the coordinator evaluates one `with`, and how the references
/// in the result are told from look-alikes.
///
/// `.secrets.NAME` is the marker `<<secret:NAME#TAG>>`, TAG being a hash of the expression
/// context. Data reaches an expression only through that context, so data holding a marker with
/// the right tag would need to contain a hash of itself: no sender can forge one. The tag depends
/// only on the context, so replaying a journal places the same references.
#[derive(Debug, Clone)]
pub struct Binding {
    names: BTreeSet<String>,
    /// `#TAG>>`: what follows the name in a genuine marker.
    tail: String,
}

impl Binding {
    /// The binding of `names` (a workflow's secrets) for an evaluation over `context`.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a String>, context: &Value) -> Binding {
        let digest = Sha256::digest(serde_json::to_vec(context).unwrap_or_default());
        let mut tail = String::from("#");
        for b in &digest[..16] {
            let _ = write!(tail, "{b:02x}");
        }
        tail.push_str(CLOSE);
        Binding {
            names: names.into_iter().cloned().collect(),
            tail,
        }
    }

    /// The value of `.secrets`: each name bound to its marker.
    pub fn secrets(&self) -> Value {
        let map: Map<String, Value> = self
            .names
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    Value::String(format!("{OPEN}{name}{}", self.tail)),
                )
            })
            .collect();
        Value::Object(map)
    }

    /// Turns each marker in `value` (an evaluated `with`) into the plain reference
    /// `<<secret:NAME>>` and lists where it put it. Every other text, references that came in as
    /// data included, stays as it is and is not listed.
    pub fn seal(&self, mut value: Value) -> (Value, Vec<Placed>) {
        let mut placed = Vec::new();
        self.seal_in(&mut value, &mut String::new(), &mut placed);
        (value, placed)
    }

    fn seal_in(&self, value: &mut Value, path: &mut String, placed: &mut Vec<Placed>) {
        let len = path.len();
        match value {
            Value::String(s) if s.contains(OPEN) => *s = self.seal_str(s, path, placed),
            Value::Array(items) => {
                for (i, v) in items.iter_mut().enumerate() {
                    let _ = write!(path, "/{i}");
                    self.seal_in(v, path, placed);
                    path.truncate(len);
                }
            }
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    path.push('/');
                    path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    self.seal_in(v, path, placed);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }

    fn seal_str(&self, s: &str, path: &str, placed: &mut Vec<Placed>) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find(OPEN) {
            out.push_str(&rest[..start]);
            let after = &rest[start + OPEN.len()..];
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..end];
            if self.names.contains(name) && after[end..].starts_with(&self.tail) {
                placed.push(Placed {
                    path: path.to_owned(),
                    at: out.len(),
                    name: name.to_owned(),
                });
                out.push_str(&reference(name));
                rest = &after[end + self.tail.len()..];
            } else {
                // Not ours: copied as text, and scanning goes on after its `<<secret:`.
                out.push_str(OPEN);
                rest = after;
            }
        }
        out.push_str(rest);
        out
    }
}

/// The names of the secrets `placed` refers to.
pub fn names(placed: &[Placed]) -> BTreeSet<String> {
    placed.iter().map(|p| p.name.clone()).collect()
}

/// A request lists a reference where its input does not hold one: the request was not written by
/// the coordinator's evaluation (or was altered), so nothing of it is resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the request lists a reference to secret {name} at byte {at} of {path:?} of its input, where \
     there is none; the step request was not written by the coordinator or was altered"
)]
pub struct Misplaced {
    pub name: String,
    pub path: String,
    pub at: usize,
}

/// Replaces the references listed in `placed`, and only those, with the secrets' values (from
/// `secrets`, which must hold every name in `placed`). Other text that looks like a reference is
/// left alone. Checks every listing before changing anything.
pub fn resolve(
    value: &mut Value,
    placed: &[Placed],
    secrets: &BTreeMap<String, String>,
) -> Result<(), Misplaced> {
    let misplaced = |p: &Placed| Misplaced {
        name: p.name.clone(),
        path: p.path.clone(),
        at: p.at,
    };
    let mut sorted: Vec<&Placed> = placed.iter().collect();
    sorted.sort();
    sorted.dedup();
    for (i, p) in sorted.iter().enumerate() {
        let reference = reference(&p.name);
        let holds = match value.pointer(&p.path) {
            Some(Value::String(s)) => s.get(p.at..).is_some_and(|r| r.starts_with(&reference)),
            _ => false,
        };
        // Two listings may not overlap (the second would land inside the first's value).
        let overlaps = sorted
            .get(i + 1)
            .is_some_and(|next| next.path == p.path && next.at < p.at + reference.len());
        if !holds || overlaps || !secrets.contains_key(&p.name) {
            return Err(misplaced(p));
        }
    }
    // Last first, so that earlier offsets in the same string stay right.
    for p in sorted.into_iter().rev() {
        if let Some(Value::String(s)) = value.pointer_mut(&p.path) {
            let end = p.at + reference(&p.name).len();
            s.replace_range(p.at..end, &secrets[&p.name]);
        }
    }
    Ok(())
}

fn rewrite(value: &mut Value, f: &impl Fn(&str) -> String) {
    match value {
        Value::String(s) => *s = f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| rewrite(v, f)),
        _ => {}
    }
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

    fn binding(context: &Value) -> Binding {
        let names = ["api_token".to_owned(), "deploy_key".to_owned()];
        Binding::new(&names, context)
    }

    #[test]
    fn placed_references_resolve_and_values_are_masked() {
        let context = json!({"inputs": {"x": 1}});
        let b = binding(&context);
        let s = b.secrets();
        let token = s["api_token"].as_str().unwrap();
        let key = s["deploy_key"].as_str().unwrap();
        let evaluated = json!({
            "headers": {"Authorization": format!("Bearer {token}"), "a/b~": key},
            "env": [format!("{key}{key} and {}", reference("api_token")), "plain"],
            "n": 3
        });
        let (mut input, placed) = b.seal(evaluated);
        // The journal sees plain references, and where each was placed.
        assert_eq!(
            input["headers"]["Authorization"],
            "Bearer <<secret:api_token>>"
        );
        assert_eq!(
            input["env"][0],
            "<<secret:deploy_key>><<secret:deploy_key>> and <<secret:api_token>>"
        );
        let at = |path: &str, at: usize, name: &str| Placed {
            path: path.into(),
            at,
            name: name.into(),
        };
        let mut sorted = placed.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                at("/env/0", 0, "deploy_key"),
                at("/env/0", 21, "deploy_key"),
                at("/headers/Authorization", 7, "api_token"),
                at("/headers/a~1b~0", 0, "deploy_key"),
            ]
        );
        assert_eq!(names(&placed).len(), 2);
        let secrets = BTreeMap::from([
            ("api_token".to_owned(), "t0k3n".to_owned()),
            ("deploy_key".to_owned(), "k3y".to_owned()),
        ]);
        resolve(&mut input, &placed, &secrets).unwrap();
        assert_eq!(input["headers"]["Authorization"], "Bearer t0k3n");
        assert_eq!(input["headers"]["a/b~"], "k3y");
        // The reference that came as data (the third) stays text.
        assert_eq!(input["env"][0], "k3yk3y and <<secret:api_token>>");
        let mut output = json!({"echo": "Bearer t0k3n and k3y", "list": ["k3y"], "n": 3});
        mask(&mut output, &secrets);
        assert_eq!(
            output,
            json!({"echo": "Bearer *** and ***", "list": ["***"], "n": 3})
        );
        assert_eq!(mask_text("exit 3: t0k3n", &secrets), "exit 3: ***");
    }

    #[test]
    fn references_in_data_are_never_placed() {
        // The data tries every form: a plain reference, a marker with a made-up tag, a marker of
        // another context's tag (as an earlier step could have seen one).
        let other = binding(&json!({"inputs": {"x": 2}})).secrets();
        let forged = json!({
            "plain": reference("api_token"),
            "tagged": "<<secret:api_token#00000000000000000000000000000000>>",
            "stolen": other["api_token"],
        });
        let context = json!({"event": {"data": forged}});
        let b = binding(&context);
        let (input, placed) = b.seal(json!({
            "body": forged,
            "joined": format!("<<secret:{}", "api_token>>"),
            "undeclared": format!("<<secret:db{}", &b.secrets()["api_token"].as_str().unwrap()[18..]),
        }));
        assert_eq!(placed, []);
        assert_eq!(input["body"], forged);
        // Same context, same tag: a replay places the same references.
        assert_eq!(b.secrets(), binding(&context).secrets());
        assert_ne!(b.secrets(), other);
        // A listing the input does not back is refused as a whole.
        let mut input = json!({"a": reference("api_token"), "b": "x"});
        let secrets = BTreeMap::from([("api_token".to_owned(), "t0k3n".to_owned())]);
        let bad = [
            Placed {
                path: "/a".into(),
                at: 0,
                name: "api_token".into(),
            },
            Placed {
                path: "/b".into(),
                at: 0,
                name: "api_token".into(),
            },
        ];
        let err = resolve(&mut input, &bad, &secrets).unwrap_err();
        assert_eq!(err.path, "/b");
        assert_eq!(input["a"], reference("api_token"));
    }
}
