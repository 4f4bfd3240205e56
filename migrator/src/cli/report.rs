//! `migrator report`: one migration's report read back (and drawn), or
//! many summarised.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Args;
use migrator::report::{summary, timeline};

#[derive(Args)]
pub struct ReportArgs {
    /// Report files (from `migrate --report`) or directories of them. One
    /// file: its summary, and with --svg its timeline. Several, or a
    /// directory: counts by outcome and the freeze window and each phase
    /// as min / p50 / p95 / max (nearest rank).
    #[arg(required = true, value_name = "FILE|DIR")]
    paths: Vec<PathBuf>,
    /// Write a picture here: one migration's phases and connections on one
    /// time axis, or the distribution of the freeze window's parts.
    #[arg(long, value_name = "OUT.svg")]
    svg: Option<PathBuf>,
    /// Print JSON on stdout: the report itself, or the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ReportArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let ReportArgs { paths, svg, json } = args;
    let single = paths.len() == 1 && !paths[0].is_dir();
    let (text, value, picture) = if single {
        let report = summary::read(&paths[0]).map_err(anyhow::Error::msg)?;
        let picture = match &svg {
            Some(_) => Some(timeline::render_svg(&report)?),
            None => None,
        };
        (report.render(), serde_json::to_value(&report)?, picture)
    } else {
        let loaded = summary::load(&paths).map_err(anyhow::Error::msg)?;
        for file in loaded.skipped.iter().filter(|_| !quiet) {
            eprintln!("{} is not a migration report: left out", file.display());
        }
        let summary = summary::summarise(&loaded.reports);
        let picture = match &svg {
            Some(_) => Some(summary.render_svg()?),
            None => None,
        };
        (summary.render(), serde_json::to_value(&summary)?, picture)
    };
    if let (Some(out), Some(picture)) = (&svg, picture) {
        std::fs::write(out, picture).with_context(|| format!("writing {}", out.display()))?;
        if !quiet {
            eprintln!("wrote {}", out.display());
        }
    }
    // The answer itself, on stdout even with --quiet.
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}
