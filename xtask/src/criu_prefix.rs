//! CRIU >= 4.2 for this kernel. The system's `criu` is used when it is new
//! enough and `criu check` passes. Otherwise Debian unstable's `criu` and
//! its whole library closure (it needs a newer glibc than Debian 12 has)
//! are unpacked into a private prefix and run through a launcher that uses
//! the prefix's own dynamic loader. The system's apt sources, package
//! database and libraries are never touched: apt runs with a private
//! sources list, state and cache.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use migrator_common::paths::{CRIU_LAUNCHER, CRIU_PREFIX};

use crate::cmd;

/// Private apt state for the unstable suite.
const APT_STATE: &str = "/opt/migrator/apt-sid";
const MIN_VERSION: (u32, u32) = (4, 2);
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub fn ensure() -> Result<String> {
    if let Some(system) = find_on_path("criu") {
        match usable(&system) {
            Ok(version) => {
                return Ok(format!(
                    "using the system's criu {version} at {}",
                    system.display()
                ));
            }
            Err(why) => eprintln!(
                "      system criu at {} not usable: {why}",
                system.display()
            ),
        }
    }
    let launcher = Path::new(CRIU_LAUNCHER);
    if launcher.exists() {
        match usable(launcher) {
            Ok(version) => {
                return Ok(format!(
                    "already installed: criu {version} at {CRIU_LAUNCHER}"
                ));
            }
            Err(why) => eprintln!("      {CRIU_LAUNCHER} not usable ({why}); reinstalling"),
        }
    }
    install()?;
    let version = usable(launcher).context("the freshly installed CRIU does not work")?;
    Ok(format!(
        "installed criu {version} into {CRIU_PREFIX}, launcher {CRIU_LAUNCHER}"
    ))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file() && path != Path::new(CRIU_LAUNCHER))
}

/// Version >= 4.2 and `criu check` passes; returns the version string.
fn usable(criu: &Path) -> Result<String> {
    let out = cmd::output(Command::new(criu).arg("--version"))?;
    let version = out
        .lines()
        .find_map(|line| line.trim().strip_prefix("Version:"))
        .map(str::trim)
        .context("no `Version:` line in `criu --version`")?
        .to_owned();
    let mut parts = version
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_VERSION {
        bail!("version {version} is older than 4.2");
    }
    let check = Command::new(criu)
        .arg("check")
        .output()
        .context("running `criu check`")?;
    if !check.status.success() {
        bail!(
            "`criu check` failed: {}{}",
            String::from_utf8_lossy(&check.stdout).trim(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    Ok(version)
}

/// The Debian archive this machine already uses, and the keyring it trusts.
fn debian_mirror() -> Result<(String, String)> {
    let mut candidates = Vec::new();
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "sources") {
                candidates.extend(deb822_archives(
                    &fs::read_to_string(&path).unwrap_or_default(),
                ));
            }
        }
    }
    candidates.extend(one_line_archives(
        &fs::read_to_string("/etc/apt/sources.list").unwrap_or_default(),
    ));
    candidates.into_iter().next().context(
        "no Debian archive found in /etc/apt/sources.list{,.d}: add the Debian archive for this release, \
         or install CRIU >= 4.2 yourself and put it on PATH",
    )
}

/// Archives (URI, keyring) of deb822 stanzas that carry a plain release
/// suite (not -security / -updates) with `main`.
fn deb822_archives(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza.lines().find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_owned())
                })
            };
            let types = field("Types")?;
            let suites = field("Suites")?;
            let components = field("Components")?;
            let plain_suite = suites.split_whitespace().any(|suite| !suite.contains('-'));
            if !types.split_whitespace().any(|t| t == "deb")
                || !plain_suite
                || !components.split_whitespace().any(|c| c == "main")
            {
                return None;
            }
            let uri = field("URIs")?.split_whitespace().next()?.to_owned();
            let keyring = field("Signed-By").unwrap_or_else(|| DEFAULT_KEYRING.to_owned());
            Some((uri, keyring))
        })
        .collect()
}

fn one_line_archives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("deb ")?;
            // Drop an [option=value ...] block.
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?;
            let suite = words.next()?;
            let main = words.any(|component| component == "main");
            (!suite.contains('-') && main).then(|| (uri.to_owned(), DEFAULT_KEYRING.to_owned()))
        })
        .collect()
}

fn multiarch() -> Result<(&'static str, &'static str)> {
    let arch = cmd::output(Command::new("dpkg").arg("--print-architecture"))?;
    Ok(match arch.trim() {
        "amd64" => ("x86_64-linux-gnu", "ld-linux-x86-64.so.2"),
        "arm64" => ("aarch64-linux-gnu", "ld-linux-aarch64.so.1"),
        other => bail!(
            "no private CRIU install for architecture {other}: install CRIU >= 4.2 yourself and put it on PATH"
        ),
    })
}

fn install() -> Result<()> {
    let (triplet, loader) = multiarch()?;
    let (mirror, keyring) = debian_mirror()?;
    eprintln!(
        "      installing Debian unstable's criu into {CRIU_PREFIX} (archive {mirror}, private apt state in {APT_STATE})"
    );
    let state = Path::new(APT_STATE);
    let debs = state.join("debs");
    for dir in [
        state.join("sources.list.d"),
        state.join("lists/partial"),
        state.join("cache/archives/partial"),
        debs.clone(),
    ] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(
        state.join("sources.list.d/sid.sources"),
        format!(
            "Types: deb\nURIs: {mirror}\nSuites: sid\nComponents: main\nSigned-By: {keyring}\n"
        ),
    )?;
    let options = [
        "-o".to_owned(),
        "Dir::Etc::SourceList=/dev/null".to_owned(),
        "-o".to_owned(),
        format!("Dir::Etc::SourceParts={APT_STATE}/sources.list.d"),
        "-o".to_owned(),
        format!("Dir::State::Lists={APT_STATE}/lists"),
        "-o".to_owned(),
        format!("Dir::Cache={APT_STATE}/cache"),
        "-o".to_owned(),
        "Dir::State::status=/dev/null".to_owned(),
        "-o".to_owned(),
        "APT::Sandbox::User=root".to_owned(),
    ];
    cmd::run(
        Command::new("apt-get")
            .args(&options)
            .args(["update", "-q"]),
    )?;
    let closure = cmd::output(Command::new("apt-cache").args(&options).args([
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        "criu",
    ]))?;
    let mut packages: Vec<&str> = closure
        .lines()
        .filter(|line| !line.starts_with(char::is_whitespace) && !line.starts_with('<'))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    packages.sort_unstable();
    packages.dedup();
    eprintln!(
        "      downloading {} packages: {}",
        packages.len(),
        packages.join(" ")
    );
    for old in fs::read_dir(&debs)?.flatten() {
        fs::remove_file(old.path())?;
    }
    cmd::run(
        Command::new("apt-get")
            .args(&options)
            .args(["download", "-q"])
            .args(&packages)
            .current_dir(&debs),
    )?;

    // Unpack into a fresh directory, then swap it in: a failed run never
    // leaves a half-populated prefix behind the launcher.
    let prefix = Path::new(CRIU_PREFIX);
    let staging = prefix.with_extension("new");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    for deb in fs::read_dir(&debs)?.flatten() {
        cmd::output(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&staging),
        )?;
    }
    if prefix.exists() {
        fs::remove_dir_all(prefix)?;
    }
    fs::rename(&staging, prefix)?;

    let launcher = Path::new(CRIU_LAUNCHER);
    if let Some(dir) = launcher.parent() {
        fs::create_dir_all(dir)?;
    }
    let libs = format!("{CRIU_PREFIX}/usr/lib/{triplet}:{CRIU_PREFIX}/lib/{triplet}");
    fs::write(
        launcher,
        format!(
            "#!/bin/sh\n\
             # Written by `cargo xtask setup`: Debian unstable's CRIU with its own\n\
             # libraries and loader from {CRIU_PREFIX}; the system is untouched.\n\
             exec {CRIU_PREFIX}/usr/lib/{triplet}/{loader} --library-path {libs} {CRIU_PREFIX}/usr/sbin/criu \"$@\"\n"
        ),
    )?;
    fs::set_permissions(launcher, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_release_archive_in_deb822() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            deb822_archives(text),
            vec![(
                "http://mirror.example/debian".to_owned(),
                "/k.gpg".to_owned()
            )]
        );
    }

    #[test]
    fn finds_the_release_archive_in_one_line_format() {
        let text = "deb http://security.example/debian-security bookworm-security main\n\
                    deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            one_line_archives(text),
            vec![(
                "http://mirror.example/debian".to_owned(),
                DEFAULT_KEYRING.to_owned()
            )]
        );
    }
}
