//! `baton secrets`: the values of the secrets steps reference, in the KV bucket `baton-secrets`.
//! Values are read from stdin or a file, never from the command line (which shells keep in their
//! history), and are never printed.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use baton_core::{Bus, secrets, streams};
use futures::StreamExt;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Store a secret; its value is read from stdin (or --from-file).
    Set {
        name: String,
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// List the names of stored secrets (never their values).
    List,
    /// Delete a secret.
    Delete { name: String },
}

pub async fn run(bus: &Bus, command: Command) -> anyhow::Result<()> {
    let bucket = bus.js.get_key_value(streams::SECRETS_BUCKET).await?;
    match command {
        Command::Set { name, from_file } => {
            check(&name)?;
            let mut value = match from_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => {
                    let mut v = String::new();
                    std::io::stdin()
                        .read_to_string(&mut v)
                        .context("cannot read the value from stdin")?;
                    v
                }
            };
            // `echo value | baton secrets set` adds a newline that is not part of the secret.
            value.truncate(value.trim_end_matches(['\n', '\r']).len());
            if value.is_empty() {
                bail!(
                    "the value of {name} is empty: pipe it in, e.g. `printf %s \"$TOKEN\" | baton secrets set {name}`"
                );
            }
            bucket.put(&name, value.into_bytes().into()).await?;
            println!("Stored secret {name}");
        }
        Command::List => {
            let mut keys = bucket.keys().await?;
            let mut names = Vec::new();
            while let Some(k) = keys.next().await {
                names.push(k?);
            }
            names.sort();
            for n in names {
                println!("{n}");
            }
        }
        Command::Delete { name } => {
            check(&name)?;
            if bucket.get(&name).await?.is_none() {
                bail!("there is no secret {name}: `baton secrets list` shows the names");
            }
            bucket.purge(&name).await?;
            println!("Deleted secret {name}");
        }
    }
    Ok(())
}

fn check(name: &str) -> anyhow::Result<()> {
    if !secrets::is_name(name) {
        bail!(
            "{name:?} is not a secret name: use letters, digits and `_` (workflows read it as `.secrets.{name}`)"
        );
    }
    Ok(())
}
