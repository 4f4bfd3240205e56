//! The `migrator` command line: a thin front end over the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Move a running Linux process with live TCP connections to another host.
///
/// migrator freezes the process's connections with an eBPF network lock,
/// checkpoints it with CRIU, restores it on the destination, moves the
/// service IP and releases traffic only once the destination owns it. Peers
/// see a short, slow patch of network, never a reset.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can take part in a migration.
    ///
    /// One line per check with OK, WARN or FAIL, and the fix for anything
    /// not OK: privileges, kernel version, BTF, TC attach mode (TCX or the
    /// clsact fallback), bpffs (mounted if missing), the eBPF programs
    /// passing the verifier, CRIU (where it was found, its version, `criu
    /// check`), and the freeze window tcp_retries2 allows. Exits non-zero
    /// when a migration cannot work here.
    Doctor {
        /// CRIU binary to use instead of MIGRATOR_CRIU, the launcher from
        /// `cargo xtask setup` (/opt/migrator/bin/criu) or `criu` on PATH.
        #[arg(long, value_name = "PATH")]
        criu: Option<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIGRATOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("migrator: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor { criu, json } => {
            let report = migrator::doctor::run(criu.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
