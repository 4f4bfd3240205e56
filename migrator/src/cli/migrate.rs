//! `migrator migrate` and `migrator recover`: the source side.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use migrator::{
    channel::message::{ServiceAddress, Takeover},
    dataplane::spec::parse_duration,
    migrate,
};

use super::{AuthArgs, JsonArg, locate_criu, require_privileges, tell};

#[derive(Args)]
pub struct MigrateArgs {
    /// Root of the process tree to move.
    #[arg(long)]
    pid: i32,
    /// The agent: ADDR:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    to: std::net::SocketAddr,
    #[command(flatten)]
    auth: AuthArgs,
    /// With --cert: the name the agent's certificate must carry
    /// (default: the address of --to).
    #[arg(long, value_name = "NAME", requires = "cert")]
    server_name: Option<String>,
    /// A service address that moves with the process: IP or IP/PREFIX
    /// (default /32, /128). Every connection must use one. Repeatable.
    #[arg(long = "ip", value_name = "CIDR", required = true)]
    ips: Vec<ServiceAddress>,
    /// Interface of the service addresses (found if not given).
    #[arg(long = "iface", value_name = "IF")]
    iface: Option<String>,
    /// Fail-open deadline of the locks, on both hosts.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    deadline: Duration,
    /// Write the report (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Add this move to a metrics file in the format of node_exporter's
    /// textfile collector (e.g. /var/lib/node_exporter/migrator.prom):
    /// `migrator_source_migrations_total{outcome}` and the
    /// `migrator_source_freeze_window_seconds` histogram, accumulated over
    /// every run that names the file.
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// State directory for the images: created mode 0700, or, if it
    /// exists, it must be owned by root and closed to group and others.
    /// Each migration gets a fresh directory in it, a tmpfs of its own,
    /// removed at the end unless `recover` may need it (the report then
    /// says where).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/migrator/source")]
    work_dir: PathBuf,
    /// Keep the images even when the migration (or its rollback) worked.
    #[arg(long)]
    keep_images: bool,
    /// The default: keep the peers' packets during the freeze and
    /// deliver them to the restored sockets right after the release, so
    /// the peers need not wait for their next (backed-off) retransmit.
    /// Accepted for scripts written when it was not the default.
    #[arg(long, overrides_with = "no_hold")]
    hold: bool,
    /// Only drop the peers' packets during the freeze (the peers resend
    /// them on their own retransmit timers after the release).
    #[arg(long, overrides_with = "hold")]
    no_hold: bool,
    /// Dump the whole process here first, then send the images (CRIU
    /// kills the tree at the end of the dump; a rollback restores it from
    /// those images), instead of streaming the memory to the destination
    /// while it is dumped. On hosts that share their CPUs with the
    /// destination (a lab VM) it can be the faster of the two; see the
    /// README's benchmark.
    #[arg(long)]
    dump_then_send: bool,
    /// Restore lazily at the destination: its CRIU restores the process
    /// without copying its memory, and releases it at once; a `criu
    /// lazy-pages` daemon there then fills the memory from the images
    /// already on that host (on demand when a page is touched, the rest in
    /// the background). Shortens the freeze window by the time the restore
    /// spends copying memory (most of it for large processes). The risk:
    /// if that daemon dies before it filled everything, the process (by
    /// then the only copy) cannot be completed and is killed, lost, and
    /// the report says so (outcome failed). The report's memory-fill phase
    /// says how long the fill took after the release.
    #[arg(long)]
    lazy_restore: bool,
    /// Post-copy: dump the process here (into memory, as CRIU by hand
    /// does), send everything but its lazy pages, restore lazily there and
    /// release; the destination's daemon then fetches the pages it needs
    /// from this host, through the same channel (on demand when a page is
    /// touched, the rest in the background), while `migrate` waits. The
    /// shortest freeze window for a large process: no memory crosses
    /// inside it. The risk is --lazy-restore's and more: until the report
    /// says the memory is filled, the process needs this host as well;
    /// if either host or the channel fails meanwhile, the restored copy is
    /// killed rather than run with pages missing, and the images stay
    /// here for `migrator recover` (outcome in-doubt).
    #[arg(long, conflicts_with_all = ["lazy_restore", "dump_then_send"])]
    post_copy: bool,
    /// How the destination takes the service addresses over: `l2` (the
    /// peers share the link: the address moves to the destination's
    /// interface and is announced by gratuitous ARP / unsolicited
    /// neighbour advertisements), or `bgp` (a routed network: BIRD on each
    /// host announces, as host routes, the addresses on the link its
    /// `direct` protocol watches; the agent needs --bird-socket and
    /// --service-link). Either way the destination releases only once
    /// every peer's echo answers reach it.
    #[arg(long, value_enum, default_value_t = Takeover::L2)]
    takeover: Takeover,
    /// With --takeover bgp: the control socket of this host's BIRD,
    /// whose BGP sessions must be established (checked at preflight).
    #[arg(long, value_name = "PATH", default_value = "/run/bird/bird.ctl")]
    bird_socket: PathBuf,
    /// CRIU binary (see `migrator doctor --help`).
    #[arg(long, value_name = "PATH")]
    criu: Option<PathBuf>,
}

/// Bad input, missing privileges, an unreadable token: refused before
/// anything started, like a preflight refusal.
pub fn run_migrate(args: MigrateArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    match migrate_and_report(args, quiet) {
        Ok(code) => Ok(code),
        Err(err) => {
            eprintln!("migrator: {err:#}");
            Ok(ExitCode::from(
                migrator::report::Outcome::Refused.exit_code(),
            ))
        }
    }
}

fn migrate_and_report(args: MigrateArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let MigrateArgs {
        pid,
        to,
        auth,
        server_name,
        ips,
        iface,
        deadline,
        report,
        metrics_file,
        json,
        work_dir,
        keep_images,
        hold: _,
        no_hold,
        dump_then_send,
        lazy_restore,
        post_copy,
        takeover,
        bird_socket,
        criu,
    } = args;
    require_privileges()?;
    let credentials = auth.credentials()?;
    let criu = locate_criu(criu.as_deref())?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(migrate::migrate(migrate::MigrateOptions {
        pid,
        to,
        credentials,
        server_name,
        service_addresses: ips,
        iface,
        deadline,
        criu,
        state: migrator::images::StateDir::open(&work_dir)?,
        keep_images,
        hold: !no_hold,
        page_stream: !dump_then_send && !post_copy,
        lazy_restore: lazy_restore || post_copy,
        post_copy,
        quiet,
        takeover,
        bird_socket,
    }));
    if !quiet {
        eprint!("{}", result.render());
    } else if let Some(error) = &result.error {
        eprintln!("migrator: {}: {error}", result.verdict());
    }
    let text = serde_json::to_string_pretty(&result)?;
    // From here the exit status is the migration's: a file that cannot be
    // written is said loudly, but must not make a move look refused.
    if let Some(path) = report
        && let Err(err) = std::fs::write(&path, &text)
    {
        eprintln!(
            "migrator: could not write the report to {}: {err}",
            path.display()
        );
    }
    if json {
        println!("{text}");
    }
    if let Some(path) = metrics_file {
        let outcome = serde_json::to_value(&result.outcome)?;
        let window = result
            .freeze_window_ms
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3));
        if let Err(err) = migrator::metrics::migrations::Migrations::add_to_file(
            &path,
            outcome.as_str().unwrap_or("unknown"),
            window,
        ) {
            eprintln!(
                "migrator: could not add this move to the metrics in {}: {err}",
                path.display()
            );
        }
    }
    Ok(ExitCode::from(result.outcome.exit_code()))
}

#[derive(Args)]
pub struct RecoverArgs {
    /// The images directory (named in migrate's report and error).
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Service address to put back (IP or IP/PREFIX). Repeatable.
    #[arg(long = "ip", value_name = "CIDR", requires = "iface")]
    ips: Vec<ServiceAddress>,
    /// Interface for the service addresses.
    #[arg(long = "iface", value_name = "IF")]
    iface: Option<String>,
    /// CRIU binary (see `migrator doctor --help`).
    #[arg(long, value_name = "PATH")]
    criu: Option<PathBuf>,
    #[command(flatten)]
    json: JsonArg,
}

pub fn run_recover(args: RecoverArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let RecoverArgs {
        images,
        ips,
        iface,
        criu,
        json,
    } = args;
    require_privileges()?;
    let criu = locate_criu(criu.as_deref())?;
    let runtime = tokio::runtime::Runtime::new()?;
    let recovered = runtime.block_on(migrate::recover::recover(
        &images,
        &ips,
        iface.as_deref(),
        &criu,
    ))?;
    let done = serde_json::json!({
        "images": images,
        "addresses_added": recovered.addresses_added,
        "restored_pid": recovered.pid,
        "flows_released": recovered.flows_released,
        "service_rules_released": recovered.services_released,
        "detached": recovered.detached,
    });
    tell(json.json, quiet, &done, || {
        let mut lines: Vec<String> = recovered
            .addresses_added
            .iter()
            .map(|address| format!("added {address}"))
            .collect();
        lines.push(match recovered.pid {
            Some(pid) => format!("restored from {}: pid {pid}", images.display()),
            None => format!(
                "the dump in {} never finished, so CRIU resumed the process where it ran: nothing to restore",
                images.display()
            ),
        });
        lines.push(format!(
            "released {} flow(s) and {} service rule(s)",
            recovered.flows_released, recovered.services_released
        ));
        lines.extend(
            recovered
                .detached
                .iter()
                .map(|iface| format!("detached from {iface}")),
        );
        lines.join("\n")
    });
    Ok(ExitCode::SUCCESS)
}
