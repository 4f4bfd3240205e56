//! `migrator doctor`.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

#[derive(Args)]
pub struct DoctorArgs {
    /// CRIU binary to use instead of MIGRATOR_CRIU, the launcher from
    /// `cargo xtask setup` (/opt/migrator/bin/criu) or `criu` on PATH.
    #[arg(long, value_name = "PATH")]
    criu: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Check BIRD too, as `--takeover bgp` needs it: its control socket
    /// answers and every BGP session is established.
    #[arg(long, value_name = "PATH")]
    bird_socket: Option<PathBuf>,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let DoctorArgs {
        criu,
        json,
        bird_socket,
    } = args;
    let report = migrator::doctor::run(criu.as_deref(), bird_socket.as_deref());
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
