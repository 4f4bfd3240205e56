//! CRIU: finding it, checking it can work on this kernel ([`swrk`] drives
//! it, [`stats`] reads its timings, [`precheck`] finds what it would refuse
//! about a process tree before anything is frozen).
//!
//! Lookup order: `--criu PATH`, then `MIGRATOR_CRIU`, then the launcher
//! `cargo xtask setup` installs, then `criu` on `PATH`. An explicit choice
//! (flag or variable) that does not exist is an error, never a silent
//! fallback to something else.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

pub mod kdat;
pub mod lazy;
pub mod page_source;
pub mod page_stream;
pub mod precheck;
pub mod stats;
pub mod swrk;

pub use migrator_common::paths::CRIU_LAUNCHER;

/// Environment variable naming the CRIU binary to use.
pub const CRIU_ENV: &str = "MIGRATOR_CRIU";

/// Oldest CRIU that dumps TCP sockets on current kernels (4.1 fails on
/// SO_PASSCRED, 3.x on the vDSO layout).
pub const MIN_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    patch: 0,
};

const FIX_SETUP: &str = "run `cargo xtask setup` (installs CRIU >= 4.2 privately), or point --criu / MIGRATOR_CRIU at a CRIU >= 4.2";

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("--criu {0}: the path does not exist")]
    FlagPathMissing(PathBuf),
    #[error("{CRIU_ENV}={0}: the path does not exist")]
    EnvPathMissing(PathBuf),
    #[error("CRIU not found (looked at --criu, {CRIU_ENV}, {CRIU_LAUNCHER} and PATH)")]
    NotFound,
    #[error("running {path} failed: {source}; check it is an executable CRIU")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} --version printed no `Version:` line (got {output:?}); is it CRIU?")]
    UnknownVersion { path: PathBuf, output: String },
    #[error("criu {found} at {path} is too old for this kernel: need >= {MIN_VERSION}")]
    TooOld { path: PathBuf, found: CriuVersion },
    #[error("`{path} check` failed: {output}")]
    CheckFailed { path: PathBuf, output: String },
}

impl CriuError {
    /// What the user can do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            Self::FlagPathMissing(_)
            | Self::EnvPathMissing(_)
            | Self::NotFound
            | Self::TooOld { .. } => FIX_SETUP,
            Self::Spawn { .. } | Self::UnknownVersion { .. } => {
                "point --criu / MIGRATOR_CRIU at a CRIU >= 4.2 binary, or run `cargo xtask setup`"
            }
            Self::CheckFailed { .. } => {
                "read CRIU's message above; `cargo xtask setup` installs a CRIU known to work on current kernels"
            }
        }
    }
}

/// Where a CRIU binary was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CriuSource {
    Flag,
    Env,
    ProjectLauncher,
    Path,
}

impl fmt::Display for CriuSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flag => "--criu",
            Self::Env => CRIU_ENV,
            Self::ProjectLauncher => "project launcher",
            Self::Path => "PATH",
        })
    }
}

#[derive(Clone, Debug)]
pub struct CriuBinary {
    pub path: PathBuf,
    pub source: CriuSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl CriuVersion {
    /// Parse `criu --version` output ("Version: 4.2" or "Version: 4.2.1").
    pub fn parse_version_output(output: &str) -> Option<Self> {
        let line = output
            .lines()
            .find_map(|line| line.trim().strip_prefix("Version:"))?;
        let mut parts = line.trim().split('.').map(|part| {
            part.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
        });
        let major = parts.next()?.ok()?;
        let minor = parts.next().and_then(Result::ok).unwrap_or(0);
        let patch = parts.next().and_then(Result::ok).unwrap_or(0);
        Some(Self {
            major,
            minor,
            patch,
        })
    }
}

/// Find the CRIU binary to use (see the module docs for the order).
pub fn locate(flag: Option<&Path>) -> Result<CriuBinary, CriuError> {
    if let Some(path) = flag {
        return existing(path, CriuSource::Flag)
            .ok_or_else(|| CriuError::FlagPathMissing(path.to_owned()));
    }
    if let Some(value) = std::env::var_os(CRIU_ENV).filter(|value| !value.is_empty()) {
        let path = PathBuf::from(value);
        return existing(&path, CriuSource::Env).ok_or(CriuError::EnvPathMissing(path));
    }
    if let Some(found) = existing(Path::new(CRIU_LAUNCHER), CriuSource::ProjectLauncher) {
        return Ok(found);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find_map(|dir| existing(&dir.join("criu"), CriuSource::Path))
        .ok_or(CriuError::NotFound)
}

fn existing(path: &Path, source: CriuSource) -> Option<CriuBinary> {
    let found = path.exists();
    tracing::debug!(
        "CRIU at {}? {} ({source:?})",
        path.display(),
        if found { "found" } else { "missing" }
    );
    found.then(|| CriuBinary {
        path: path.to_owned(),
        source,
    })
}

impl CriuBinary {
    /// The version `criu --version` reports.
    pub fn version(&self) -> Result<CriuVersion, CriuError> {
        let output = self.run(&["--version"])?;
        let text = String::from_utf8_lossy(&output.stdout);
        CriuVersion::parse_version_output(&text).ok_or_else(|| CriuError::UnknownVersion {
            path: self.path.clone(),
            output: text.trim().to_owned(),
        })
    }

    /// The version, refused if older than [`MIN_VERSION`].
    pub fn supported_version(&self) -> Result<CriuVersion, CriuError> {
        let found = self.version()?;
        if found < MIN_VERSION {
            return Err(CriuError::TooOld {
                path: self.path.clone(),
                found,
            });
        }
        Ok(found)
    }

    /// `criu check`: CRIU's own probe of the kernel features it needs.
    /// Returns its verdict line ("Looks good.").
    pub fn check(&self) -> Result<String, CriuError> {
        let output = self.run(&["check"])?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let text = text.trim().to_owned();
        if output.status.success() {
            Ok(text.lines().last().unwrap_or("ok").to_owned())
        } else {
            Err(CriuError::CheckFailed {
                path: self.path.clone(),
                output: text,
            })
        }
    }

    /// Whether this kernel tracks dirty memory (soft-dirty bits), which
    /// iterative pre-dumps need: CRIU's own feature check.
    pub fn dirty_tracking(&self) -> Result<bool, CriuError> {
        Ok(self
            .run(&["check", "--feature", "mem_dirty_track"])?
            .status
            .success())
    }

    fn run(&self, args: &[&str]) -> Result<std::process::Output, CriuError> {
        Command::new(&self.path)
            .args(args)
            .output()
            .map_err(|source| CriuError::Spawn {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = |s| CriuVersion::parse_version_output(s);
        assert_eq!(
            v("Version: 4.2\n"),
            Some(CriuVersion {
                major: 4,
                minor: 2,
                patch: 0
            })
        );
        assert_eq!(
            v("Version: 4.2.1\nGitID: v4.2.1\n"),
            Some(CriuVersion {
                major: 4,
                minor: 2,
                patch: 1
            })
        );
        assert_eq!(
            v("Version: 3.17.1"),
            Some(CriuVersion {
                major: 3,
                minor: 17,
                patch: 1
            })
        );
        assert_eq!(v("criu: unknown"), None);
    }

    #[test]
    fn minimum_version_ordering() {
        let v = |major, minor, patch| CriuVersion {
            major,
            minor,
            patch,
        };
        assert!(v(4, 1, 1) < MIN_VERSION);
        assert!(v(3, 17, 1) < MIN_VERSION);
        assert!(v(4, 2, 0) >= MIN_VERSION);
        assert!(v(4, 10, 0) >= MIN_VERSION);
        assert!(v(5, 0, 0) >= MIN_VERSION);
    }

    #[test]
    fn explicit_missing_path_is_an_error_not_a_fallback() {
        let err = locate(Some(Path::new("/nonexistent/criu"))).err();
        assert!(
            matches!(err, Some(CriuError::FlagPathMissing(ref p)) if p == Path::new("/nonexistent/criu")),
            "{err:?}"
        );
        let message = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("does not exist"), "{message}");
    }
}
