//! `migrator watch`: the live view.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use migrator::dataplane::spec::parse_duration;

use super::{Targets, require_privileges};

#[derive(Args)]
pub struct WatchArgs {
    /// Follow every TCP connection of this process tree (new ones too).
    #[arg(long)]
    pid: Option<i32>,
    #[command(flatten)]
    targets: Targets,
    /// Interface to observe --pid / --flow connections on (default: the
    /// one holding each connection's local address).
    #[arg(long = "iface", value_name = "IF")]
    iface: Option<String>,
    /// Refresh interval.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    interval: Duration,
    /// One table per interval, no escape codes (the default when stdout
    /// is not a terminal).
    #[arg(long, conflicts_with = "json")]
    plain: bool,
    /// JSON lines, one object per connection per interval (schema in
    /// the README).
    #[arg(long)]
    json: bool,
    /// Print one snapshot and exit.
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics on ADDR:PORT (path /metrics, OpenMetrics
    /// text): per connection, labelled `local` and `remote`.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// With --metrics-addr: one series per metric summed over the
    /// connections, instead of one per connection (for hosts with many).
    #[arg(long, requires = "metrics_addr")]
    no_connection_labels: bool,
    /// No live table: with --metrics-addr and neither --plain nor
    /// --json, run headless.
    #[arg(long)]
    no_tui: bool,
}

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let WatchArgs {
        pid,
        targets,
        iface,
        interval,
        plain,
        json,
        once,
        metrics_addr,
        no_connection_labels,
        no_tui,
    } = args;
    require_privileges()?;
    use std::io::IsTerminal as _;
    let output = if json {
        migrator::watch::Output::Json
    } else if plain || (!no_tui && !std::io::stdout().is_terminal()) || once {
        migrator::watch::Output::Plain
    } else if no_tui {
        migrator::watch::Output::None
    } else {
        migrator::watch::Output::Tui
    };
    let selection = migrator::watch::Selection {
        flows: targets.flows,
        addresses: targets
            .services
            .iter()
            .map(|service| (service.ip, service.port))
            .collect(),
        only_listed: false,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(migrator::watch::run(migrator::watch::WatchOptions {
        selection,
        pid,
        iface,
        interval,
        output,
        once,
        metrics_addr,
        connection_labels: !no_connection_labels,
    }))?;
    Ok(ExitCode::SUCCESS)
}
