//! `cargo xtask setup`: install what is missing, say what it does, skip
//! what is there. A second run on a prepared machine takes seconds.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, criu_prefix};

/// Debian packages the build and the tests use (beyond LLVM, chosen below).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",       // ip, tc: namespaces, veth, addresses in tests and the lab
    "tmux",           // live-view tests run the TUI in a real terminal
    "nftables",       // baseline benchmark: CRIU's own nftables network lock
    "ethtool",        // tests turn offloads on and off on veth pairs
    "iputils-arping", // baseline benchmark: the gratuitous ARP a careful user sends
    "ndisc6", // baseline benchmark: ndisc6, the IPv6 neighbour solicitation a careful user sends
    "curl",   // tests scrape the watch command's metrics with a real HTTP client
    "nginx-light", // the real multi-process server the tests move (master + workers)
    "bird2",  // the routed lab: BGP between the hosts and a router (BIRD 2)
];

/// One setup step: installs what it finds missing, returns what it did.
type Step = fn(&mut Apt) -> Result<String>;

pub fn run() -> Result<()> {
    cmd::section("setup");
    let steps: [(&str, Step); 6] = [
        ("nightly toolchain + rust-src", nightly),
        ("Debian packages", debian_packages),
        ("LLVM matching the nightly", llvm),
        ("bpf-linker", bpf_linker),
        ("cargo-nextest", nextest),
        ("CRIU >= 4.2", criu),
    ];
    let mut apt = Apt { updated: false };
    for (index, (name, step)) in steps.iter().enumerate() {
        eprintln!("[{}/{}] {name}", index + 1, steps.len());
        let outcome = step(&mut apt).with_context(|| format!("setup step `{name}` failed"))?;
        eprintln!("      {outcome}");
    }
    Ok(())
}

/// Debian's package manager; `apt-get update` runs at most once, and only
/// when something must be installed (fresh machines have stale lists).
pub struct Apt {
    updated: bool,
}

impl Apt {
    fn installed(package: &str) -> bool {
        cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
            .is_ok_and(|status| status.trim() == "install ok installed")
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        Ok(())
    }

    /// Whether the package exists in the (updated) lists.
    fn available(&mut self, package: &str) -> Result<bool> {
        self.update()?;
        let policy = cmd::output(Command::new("apt-cache").args(["policy", package]))?;
        Ok(policy
            .lines()
            .any(|line| line.trim().starts_with("Candidate:") && !line.contains("(none)")))
    }

    fn install(&mut self, packages: &[&str]) -> Result<()> {
        self.update()?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }

    /// Install the missing ones; say which.
    fn ensure(&mut self, packages: &[&str]) -> Result<String> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|package| !Self::installed(package))
            .collect();
        if missing.is_empty() {
            return Ok(format!("already installed: {}", packages.join(" ")));
        }
        eprintln!("      installing {}", missing.join(" "));
        self.install(&missing)?;
        Ok(format!("installed {}", missing.join(" ")))
    }
}

fn nightly(_: &mut Apt) -> Result<String> {
    let mut did = Vec::new();
    if !cmd::succeeds(Command::new("rustc").arg("+nightly").arg("-V")) {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        did.push("installed nightly");
    }
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did.push("added rust-src");
    }
    let targets = cmd::output(Command::new("rustc").args(["+nightly", "--print", "target-list"]))?;
    if !targets.lines().any(|line| line == "bpfel-unknown-none") {
        bail!(
            "this nightly does not know the bpfel-unknown-none target; update it with `rustup update nightly`"
        );
    }
    let version = cmd::output(Command::new("rustc").args(["+nightly", "-V"]))?;
    Ok(if did.is_empty() {
        format!(
            "already there: {} with rust-src, bpfel-unknown-none known",
            version.trim()
        )
    } else {
        format!("{}: {}", did.join(", "), version.trim())
    })
}

fn debian_packages(apt: &mut Apt) -> Result<String> {
    apt.ensure(DEBIAN_PACKAGES)
}

/// The LLVM major version the nightly rustc was built with; bpf-linker must
/// link the same one or the bitcode it reads will not load.
fn nightly_llvm_major() -> Result<u32> {
    let info = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    info.lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next()?.parse().ok())
        .context("`rustc +nightly -vV` printed no `LLVM version:` line")
}

fn llvm(apt: &mut Apt) -> Result<String> {
    let major = nightly_llvm_major()?;
    let package = format!("llvm-{major}-dev");
    if Apt::installed(&package) {
        return Ok(format!(
            "already installed: {package} (nightly uses LLVM {major})"
        ));
    }
    if !apt.available(&package)? {
        bail!(
            "the nightly uses LLVM {major}, but no Debian package {package} exists in this machine's apt sources; \
             use a nightly whose LLVM major has a package (`apt-cache search llvm-.*-dev`) or add the LLVM apt repository"
        );
    }
    apt.install(&[&package])?;
    Ok(format!("installed {package}"))
}

fn cargo_bin(name: &str) -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    cargo_home.join("bin").join(name)
}

const BPF_LINKER_VERSION: &str = "0.13.0";

fn bpf_linker(_: &mut Apt) -> Result<String> {
    let major = nightly_llvm_major()?;
    let binary = cargo_bin("bpf-linker");
    let version = cmd::output(Command::new(&binary).arg("--version")).unwrap_or_default();
    let libraries = cmd::output(Command::new("ldd").arg(&binary)).unwrap_or_default();
    let links_llvm = libraries.contains(&format!("libLLVM.so.{major}"))
        || libraries.contains(&format!("libLLVM-{major}.so"));
    if version.trim() == format!("bpf-linker {BPF_LINKER_VERSION}") && links_llvm {
        return Ok(format!(
            "already installed: bpf-linker {BPF_LINKER_VERSION} linked against LLVM {major}"
        ));
    }
    eprintln!(
        "      building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (takes a few minutes)"
    );
    let llvm_prefix = format!("/usr/lib/llvm-{major}");
    let path = format!(
        "{llvm_prefix}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    cmd::run(
        Command::new("cargo")
            .args(["install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("PATH", path)
            .env("LLVM_PREFIX", &llvm_prefix),
    )?;
    Ok(format!(
        "installed bpf-linker {BPF_LINKER_VERSION} against LLVM {major}"
    ))
}

fn nextest(_: &mut Apt) -> Result<String> {
    if let Ok(version) = cmd::output(Command::new("cargo").args(["nextest", "--version"])) {
        let first = version.lines().next().unwrap_or_default().to_owned();
        return Ok(format!("already installed: {first}"));
    }
    eprintln!("      building cargo-nextest (takes a few minutes)");
    cmd::run(Command::new("cargo").args(["install", "--locked", "cargo-nextest"]))?;
    Ok("installed cargo-nextest".to_owned())
}

fn criu(_: &mut Apt) -> Result<String> {
    criu_prefix::ensure()
}
