//! The `migrator` binary: logging, then the command line (`cli`).

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // RUST_LOG as everywhere in Rust (e.g. `RUST_LOG=debug`,
    // `RUST_LOG=migrator::channel=trace`); by default info, warnings only
    // with --quiet.
    let default = if cli.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_ansi(migrator::console::colour_allowed(&std::io::stderr()))
        // Through `console`, so that a live view can keep log lines off
        // the screen it draws.
        .with_writer(migrator::console::writer)
        .init();
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("migrator: {err:#}");
            ExitCode::FAILURE
        }
    }
}
