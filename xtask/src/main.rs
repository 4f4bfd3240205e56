//! Project tasks: `cargo xtask setup | build | run | test | bench | dist`.
//!
//! Every task that needs prerequisites runs `setup` first, so the two
//! README commands work on a fresh machine.

mod cmd;
mod criu_prefix;
mod demo;
// The lab topology is shared with the integration tests, which build the
// same lab under their own prefixes.
#[path = "../../tests/src/lab.rs"]
mod lab;
// What the routed lab's tests use beyond `run --routed` goes unused here.
#[allow(dead_code)]
#[path = "../../tests/src/routed.rs"]
mod routed;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "migrator's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite that is missing (idempotent): nightly +
    /// rust-src, LLVM dev package and bpf-linker matching the nightly's
    /// LLVM, cargo-nextest, CRIU >= 4.2, and the Debian tools the tests use.
    Setup,
    /// Set up, then build the workspace (the eBPF object is built and
    /// embedded by migrator's build.rs).
    Build,
    /// Set up, build, and migrate a live workload in the lab: from `src`
    /// to `dst` and back, reports and the peer's byte-for-byte verdict
    /// printed, then the lab is removed.
    Run {
        /// Round trips to make.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Move Debian's nginx (a master and two workers) instead, while
        /// keep-alive clients ask every 10 ms and a new
        /// client arrives every 20 ms; the verdict counts failed and slow
        /// connects.
        #[arg(long)]
        server: bool,
        /// In the routed lab: the peer behind a router running BIRD, the
        /// addresses taken over by BGP (`--takeover bgp`).
        #[arg(long, conflicts_with = "server")]
        routed: bool,
    },
    /// The lab of network namespaces (`peer`, `src`, `dst` on a bridge):
    /// `up` builds it (replacing any old one), `down` removes it and
    /// everything in it, also after a crash.
    Lab {
        #[arg(value_enum)]
        action: LabAction,
        /// `up`: the routed lab instead (a router namespace running BIRD
        /// with BGP sessions to BIRD on `src` and `dst`, the peer behind
        /// the router).
        #[arg(long)]
        routed: bool,
    },
    /// Set up, build, check formatting and lints, and run every test,
    /// including the privileged ones (root, kernel, network namespaces).
    Test {
        /// Only tests whose name contains this (nextest filter).
        filter: Option<String>,
    },
    /// Set up, build migrator in release mode and write what a package
    /// ships to target/dist: the binary, shell completions (bash, zsh,
    /// fish) and one man page per command, all from the binary's own
    /// command line definitions.
    Dist,
    /// Set up, build in release mode and print benchmark figures (each
    /// next to a baseline measured in the same run). Not a test.
    Bench {
        #[arg(value_enum)]
        which: Bench,
        /// Rounds for `migrate` (each: two moves of ours, two baseline).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// For `migrate`: memory sizes (MiB) of the workload whose freeze
        /// windows are compared with CRIU by hand, e.g. 64,256,1024.
        #[arg(long, value_name = "MIB[,MIB...]", default_value = "256")]
        ballast_mb: String,
        /// For `migrate`: the takeover by BGP in the routed lab against
        /// the one on a shared link, alternating (instead of the
        /// comparison with CRIU by hand).
        #[arg(long)]
        routed: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LabAction {
    Up,
    Down,
}

/// Namespace prefix of the lab `cargo xtask lab` and `run` manage.
const LAB_PREFIX: &str = "mlab";

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// Classifier cost per packet, time to freeze 10,000 flows, and TCP
    /// throughput over veth with/without the programs.
    Dataplane,
    /// Our migration against CRIU's command line with its nftables lock and
    /// `ip addr`, alternating in the same lab: freeze window, stall seen by
    /// the peer, peer retransmits.
    Migrate,
    /// CPU that `migrator watch` takes for 1,000 tracked connections at
    /// 1 Hz, next to polling `migrator status --json` once a second.
    Watch,
    /// 256 MiB of image frames through the TLS channel and through plain
    /// TCP with the same framing, alternating: MiB/s and the time ratio.
    Channel,
    /// The fault matrix: each fault (agent killed, migrate killed, the
    /// channel cut, CRIU killed) at each point of a migration, with the
    /// live copies of the process sampled every 10 ms: outcome, copies,
    /// connections, whether it needs `recover`.
    Faults,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build(&root)
        }
        Task::Run {
            rounds,
            server,
            routed,
        } => {
            setup::run()?;
            build(&root)?;
            cmd::section("migrator doctor");
            cmd::run(cmd::new(root.join("target/debug/migrator")).arg("doctor"))?;
            if server {
                demo::run_server(&root, LAB_PREFIX, rounds)
            } else {
                demo::run(&root, LAB_PREFIX, rounds, routed)
            }
        }
        Task::Lab { action, routed } => {
            let lab = lab::Lab::new(LAB_PREFIX);
            match action {
                LabAction::Up if routed => {
                    lab.down().map_err(anyhow::Error::msg)?;
                    let routed = routed::RoutedLab::new(LAB_PREFIX);
                    routed.up().map_err(anyhow::Error::msg)?;
                    let (src, dst, peer) = (
                        routed::host_addresses(routed::SRC),
                        routed::host_addresses(routed::DST),
                        routed::host_addresses(routed::PEER),
                    );
                    eprintln!(
                        "routed lab up: {} (BIRD, AS 65000) routes between {} ({} / {}), {} ({} / {}) and {} ({} / {}); \
                         service IP {} / {} on src's {}, announced by its BIRD; birdc -s {}",
                        routed.netns(routed::ROUTER),
                        routed.netns(routed::SRC),
                        src.0,
                        src.1,
                        routed.netns(routed::DST),
                        dst.0,
                        dst.1,
                        routed.netns(routed::PEER),
                        peer.0,
                        peer.1,
                        routed::SERVICE_V4,
                        routed::SERVICE_V6,
                        routed::SERVICE_LINK,
                        routed.bird_socket(routed::ROUTER).display()
                    );
                    routed.leave_up();
                }
                LabAction::Up => {
                    lab.up().map_err(anyhow::Error::msg)?;
                    eprintln!(
                        "lab up: namespaces {} {} {} on a bridge in {}; service IP {} / {} on src",
                        lab.netns(lab::PEER),
                        lab.netns(lab::SRC),
                        lab.netns(lab::DST),
                        lab.netns("br"),
                        lab::SERVICE_V4,
                        lab::SERVICE_V6
                    );
                }
                LabAction::Down => {
                    lab.down().map_err(anyhow::Error::msg)?;
                    routed::RoutedLab::new(LAB_PREFIX)
                        .down()
                        .map_err(anyhow::Error::msg)?;
                    // What `cargo xtask run`'s agents left mounted there.
                    lab::clear_leftovers_under(&root.join("target/lab"));
                    eprintln!("lab down: namespaces, links, pins, mounts and processes removed");
                }
            }
            Ok(())
        }
        Task::Test { filter } => {
            setup::run()?;
            build(&root)?;
            test(&root, filter.as_deref())
        }
        Task::Dist => {
            setup::run()?;
            dist(&root)
        }
        Task::Bench {
            which,
            rounds,
            ballast_mb,
            routed,
        } => {
            setup::run()?;
            // The benches drive the `migrator` binary and the lab programs.
            cmd::run(cmd::cargo(&root).args([
                "build",
                "--release",
                "--package",
                "migrator",
                "--package",
                "migrator-tests",
                "--bins",
            ]))?;
            let bins: &[&str] = match which {
                Bench::Dataplane => &["bench-dataplane", "bench-throughput"],
                Bench::Migrate => &["bench-migrate"],
                Bench::Watch => &["bench-watch"],
                Bench::Channel => &["bench-channel"],
                Bench::Faults => &["bench-faults"],
            };
            for bin in bins {
                cmd::section(bin);
                let mut run = cmd::cargo(&root);
                run.args([
                    "run",
                    "--release",
                    "--package",
                    "migrator-tests",
                    "--bin",
                    bin,
                    "--",
                    &rounds.to_string(),
                ]);
                if matches!(which, Bench::Migrate) && routed {
                    run.arg("--routed");
                } else if matches!(which, Bench::Migrate) {
                    run.args(["--ballast-mb", &ballast_mb]);
                }
                cmd::run(&mut run)?;
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

fn dist(root: &std::path::Path) -> Result<()> {
    cmd::section("dist");
    cmd::run(cmd::cargo(root).args([
        "build",
        "--release",
        "--package",
        "migrator",
        "--bin",
        "migrator",
    ]))?;
    let dist = root.join("target/dist");
    let completions = dist.join("completions");
    std::fs::create_dir_all(&completions)?;
    let binary = root.join("target/release/migrator");
    std::fs::copy(&binary, dist.join("migrator"))?;
    for (shell, file) in [
        ("bash", "migrator.bash"),
        ("zsh", "_migrator"),
        ("fish", "migrator.fish"),
    ] {
        let out = cmd::new(&binary).args(["completions", shell]).output()?;
        anyhow::ensure!(out.status.success(), "migrator completions {shell} failed");
        std::fs::write(completions.join(file), out.stdout)?;
    }
    let man = dist.join("man");
    cmd::run(cmd::new(&binary).arg("man").arg("--dir").arg(&man))?;
    eprintln!(
        "wrote {}: the binary, completions/ (bash, zsh, fish), man/ ({} pages)",
        dist.display(),
        std::fs::read_dir(&man)?.count()
    );
    Ok(())
}

fn build(root: &std::path::Path) -> Result<()> {
    cmd::section("build");
    cmd::run(cmd::cargo(root).args(["build", "--all-targets"]))
}

fn test(root: &std::path::Path, filter: Option<&str>) -> Result<()> {
    cmd::section("format");
    cmd::run(cmd::cargo(root).args(["fmt", "--all", "--check"]))?;
    cmd::section("clippy (host crates)");
    cmd::run(cmd::cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    cmd::section("clippy (eBPF crate, bpfel-unknown-none)");
    cmd::run(cmd::cargo(root).args([
        "+nightly",
        "clippy",
        "--package",
        "migrator-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::section("tests");
    let mut nextest = cmd::cargo(root);
    // Privileged tests share the kernel's global state (bpffs, TC hooks on
    // interfaces they create); each uses its own names, so they may run
    // in parallel, but never more than the two cores hold comfortably.
    nextest.args(["nextest", "run", "--no-fail-fast", "--test-threads", "2"]);
    if let Some(filter) = filter {
        nextest.arg(filter);
    }
    cmd::run(&mut nextest)
}
