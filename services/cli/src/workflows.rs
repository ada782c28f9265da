//! `baton validate`, `baton apply` and `baton workflows ...`: workflow files and the registry.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use baton_core::registry::Registry;
use baton_workflow::{Problems, Workflow, graph};

use crate::Nats;

/// Exit code of `baton validate` when every file is valid.
pub const VALID: u8 = 0;
/// Exit code of `baton validate` when a file has problems.
pub const INVALID: u8 = 1;
/// Exit code of `baton validate` when a file cannot be read.
pub const UNREADABLE: u8 = 2;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List the workflows in the registry.
    List {
        #[command(flatten)]
        nats: Nats,
    },
    /// Print one version of a workflow (the latest by default): its summary and source.
    Show {
        name: String,
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        nats: Nats,
    },
    /// List the stored versions of a workflow.
    Versions {
        name: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Print a workflow's step graph as Mermaid or Graphviz DOT. NAME is a workflow in the
    /// registry, or a workflow file (then no NATS server is needed).
    Graph {
        name: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long, value_enum, default_value = "mermaid")]
        format: GraphFormat,
        #[command(flatten)]
        nats: Nats,
    },
    /// Stop events from starting runs of a workflow; runs in flight go on.
    Disable {
        name: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Let events start runs of a workflow again.
    Enable {
        name: String,
        #[command(flatten)]
        nats: Nats,
    },
    /// Remove a workflow from the registry. Its versions stay for the runs in flight that use
    /// them, unless --purge.
    Delete {
        name: String,
        /// Remove every stored version too (runs in flight that use one will fail).
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        nats: Nats,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
}

/// One file's problems, as a compiler prints them: `file:line:column: error: message`, the path
/// in the file, and a hint.
pub fn report(file: &Path, problems: &Problems) -> String {
    let mut out = String::new();
    for p in &problems.0 {
        out.push_str(&format!(
            "{}:{}:{}: error: {}\n",
            file.display(),
            p.line,
            p.column,
            p.message
        ));
        if !p.at.is_empty() {
            out.push_str(&format!("    at: {}\n", p.at));
        }
        if let Some(hint) = &p.hint {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    out
}

/// `baton validate FILE...`: checks every file, prints every problem, exits 0 (all valid), 1
/// (problems found) or 2 (a file could not be read).
pub fn validate(files: &[PathBuf]) -> ExitCode {
    let (mut invalid, mut unreadable) = (0, 0);
    for file in files {
        let source = match std::fs::read_to_string(file) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{}: error: cannot read the file: {e}", file.display());
                unreadable += 1;
                continue;
            }
        };
        match baton_workflow::compile(&source) {
            Ok(wf) => println!(
                "{}: ok (workflow {}, {} step{})",
                file.display(),
                wf.name,
                wf.steps.len(),
                if wf.steps.len() == 1 { "" } else { "s" }
            ),
            Err(problems) => {
                invalid += 1;
                print!("{}", report(file, &problems));
                let n = problems.0.len();
                println!(
                    "{}: {n} problem{}",
                    file.display(),
                    if n == 1 { "" } else { "s" }
                );
            }
        }
    }
    if unreadable > 0 {
        ExitCode::from(UNREADABLE)
    } else if invalid > 0 {
        ExitCode::from(INVALID)
    } else {
        ExitCode::from(VALID)
    }
}

/// Reads and compiles a workflow file; the error lists every problem.
fn load(file: &Path) -> anyhow::Result<(Workflow, String)> {
    let source =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let workflow = baton_workflow::compile(&source).map_err(|problems| {
        anyhow::anyhow!(
            "{} is not a valid workflow (`baton validate` checks files without storing them):\n{}",
            file.display(),
            report(file, &problems).trim_end()
        )
    })?;
    Ok((workflow, source))
}

/// `baton apply FILE...`: validates every file first, then stores each as a new version when its
/// content changed.
pub async fn apply(files: &[PathBuf], nats: &Nats) -> anyhow::Result<ExitCode> {
    // Nothing is stored unless every file is valid.
    let loaded: Vec<_> = files
        .iter()
        .map(|f| load(f))
        .collect::<anyhow::Result<_>>()?;
    let bus = nats.connect("baton-cli").await?;
    let registry = Registry::open(&bus.js).await?;
    for ((workflow, source), file) in loaded.iter().zip(files) {
        registry
            .check_size(&workflow.name, source)
            .with_context(|| format!("{}: no file was applied", file.display()))?;
    }
    for (workflow, source) in loaded {
        let triggers = workflow.triggers.iter().map(|t| t.ty.clone()).collect();
        let (version, created) = registry.apply(&workflow.name, &source, triggers).await?;
        if created {
            println!("Workflow {} stored as version {version}", workflow.name);
        } else {
            println!("Workflow {} unchanged at version {version}", workflow.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List { nats } => {
            let registry = registry(&nats).await?;
            let mut heads = registry.heads().await?;
            heads.sort_by(|a, b| a.name.cmp(&b.name));
            if heads.is_empty() {
                println!("No workflows. `baton apply FILE` stores one.");
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<28} {:>7}  {:<8} TRIGGERS", "NAME", "VERSION", "STATE");
            for h in heads {
                println!(
                    "{:<28} {:>7}  {:<8} {}",
                    h.name,
                    h.version,
                    if h.enabled { "enabled" } else { "disabled" },
                    h.triggers.join(", ")
                );
            }
        }
        Command::Show {
            name,
            version,
            nats,
        } => {
            let registry = registry(&nats).await?;
            let (version, source, head) = fetch(&registry, &name, version).await?;
            let wf = baton_workflow::compile(&source).map_err(|p| {
                anyhow::anyhow!("stored version {version} of {name} does not compile: {p}")
            })?;
            println!("Workflow {name} v{version}");
            if let Some(head) = head {
                println!(
                    "  latest    v{} ({})",
                    head.version,
                    if head.enabled { "enabled" } else { "disabled" }
                );
            }
            if !wf.description.is_empty() {
                println!("  about     {}", wf.description);
            }
            for t in &wf.triggers {
                println!("  on        {}", t.ty);
            }
            for i in &wf.inputs {
                let default = i
                    .default
                    .as_ref()
                    .map(|d| format!(" = {d}"))
                    .unwrap_or_default();
                println!("  input     {}: {}{default}", i.name, i.ty);
            }
            println!("  steps     {}", wf.steps.len());
            println!("  digest    {}", baton_core::registry::digest(&source));
            println!("Source");
            print!("{source}");
            if !source.ends_with('\n') {
                println!();
            }
        }
        Command::Versions { name, nats } => {
            let registry = registry(&nats).await?;
            let versions = registry.versions(&name).await?;
            if versions.is_empty() {
                bail!(
                    "no workflow named {name} in the registry; `baton workflows list` shows them"
                );
            }
            let latest = registry.head(&name).await?.map(|h| h.version);
            println!("{:>7}  {:<20}  DIGEST", "VERSION", "STORED (UTC)");
            for v in versions {
                let mark = if Some(v.version) == latest {
                    "  (latest)"
                } else {
                    ""
                };
                println!(
                    "{:>7}  {:<20}  {}{mark}",
                    v.version,
                    utc(v.created_unix),
                    &v.digest[..12]
                );
            }
        }
        Command::Graph {
            name,
            version,
            format,
            nats,
        } => {
            let path = Path::new(&name);
            let wf = if path.is_file() {
                load(path)?.0
            } else {
                let registry = registry(&nats).await?;
                let (version, source, _) = fetch(&registry, &name, version).await?;
                baton_workflow::compile(&source).map_err(|p| {
                    anyhow::anyhow!("stored version {version} of {name} does not compile: {p}")
                })?
            };
            match format {
                GraphFormat::Mermaid => print!("{}", graph::mermaid(&wf)),
                GraphFormat::Dot => print!("{}", graph::dot(&wf)),
            }
        }
        Command::Disable { name, nats } => return set_enabled(&name, false, &nats).await,
        Command::Enable { name, nats } => return set_enabled(&name, true, &nats).await,
        Command::Delete { name, purge, nats } => {
            let registry = registry(&nats).await?;
            if !registry.delete(&name, purge).await? {
                bail!(
                    "no workflow named {name} in the registry; `baton workflows list` shows them"
                );
            }
            if purge {
                println!("Workflow {name} deleted with all its versions");
            } else {
                println!(
                    "Workflow {name} deleted; its versions stay for the runs that use them (--purge removes them)"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `baton workflows enable|disable NAME`.
pub async fn set_enabled(name: &str, enabled: bool, nats: &Nats) -> anyhow::Result<ExitCode> {
    let registry = registry(nats).await?;
    if !registry.set_enabled(name, enabled).await? {
        bail!("no workflow named {name} in the registry; `baton workflows list` shows them");
    }
    if enabled {
        println!("Workflow {name} enabled: events start runs of it");
    } else {
        println!(
            "Workflow {name} disabled: events no longer start runs of it; runs in flight go on"
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn registry(nats: &Nats) -> anyhow::Result<Registry> {
    let bus = nats.connect("baton-cli").await?;
    Ok(Registry::open(&bus.js).await?)
}

/// The source of a version (the latest by default), and the head.
async fn fetch(
    registry: &Registry,
    name: &str,
    version: Option<u64>,
) -> anyhow::Result<(u64, String, Option<baton_core::registry::Head>)> {
    let head = registry.head(name).await?;
    let version = match (version, &head) {
        (Some(v), _) => v,
        (None, Some(h)) => h.version,
        (None, None) => {
            bail!("no workflow named {name} in the registry; `baton workflows list` shows them")
        }
    };
    let source = registry.source(name, version).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "workflow {name} has no version {version}; `baton workflows versions {name}` lists them"
        )
    })?;
    Ok((version, source, head))
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS`.
fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_825_600), "2000-02-29 12:00:00");
    }
}
