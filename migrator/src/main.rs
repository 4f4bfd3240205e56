//! The `migrator` command line: a thin front end over the library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use migrator::{
    channel::{Credentials, message::ServiceAddress, token::Token},
    dataplane::{
        self, AttachMode, Dataplane, FlowTable,
        spec::{FlowSpec, ServiceSpec, parse_duration},
        status::Snapshot,
    },
    migrate, system,
};
use migrator_common::FlowPolicy;

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
    /// not OK: privileges, capabilities whose absence limits what can move
    /// (CAP_SYS_RESOURCE), kernel version, BTF, TC attach mode (TCX or the
    /// clsact fallback), bpffs (mounted if missing), the eBPF programs
    /// passing the verifier, how our own retransmits are counted (BTF
    /// tracepoint, or tracefs), CRIU (where it was found, its version,
    /// `criu check`), and the freeze window tcp_retries2 allows. Exits
    /// non-zero when a migration cannot work here.
    Doctor {
        /// CRIU binary to use instead of MIGRATOR_CRIU, the launcher from
        /// `cargo xtask setup` (/opt/migrator/bin/criu) or `criu` on PATH.
        #[arg(long, value_name = "PATH")]
        criu: Option<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Attach the data plane (ingress and egress) to an interface.
    ///
    /// The programs stay attached after this command exits (TCX links
    /// pinned under /sys/fs/bpf/migrator/netns-<inode>/); every migrator
    /// command in this network namespace shares their flow table.
    Attach {
        #[command(flatten)]
        iface: IfaceArg,
        /// tcx (kernel >= 6.6), clsact (any kernel), or auto.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        mode: AttachMode,
    },
    /// Detach the data plane from an interface; with no interface left,
    /// the pinned maps are removed too.
    Detach {
        #[command(flatten)]
        iface: IfaceArg,
    },
    /// Lock flows and service IPs: their packets are dropped both ways
    /// (or, with --hold, incoming ones are kept for later delivery).
    ///
    /// Attaches to the interface if needed and returns at once; the lock
    /// stays until `release` or until the deadline passes, after which the
    /// kernel lets traffic through again on its own (fail-open), even if
    /// no migrator process is left.
    Freeze {
        #[command(flatten)]
        iface: IfaceArg,
        #[command(flatten)]
        targets: Targets,
        /// Keep incoming packets of the locked flows for later delivery
        /// instead of only dropping them.
        #[arg(long)]
        hold: bool,
        /// Fail-open deadline: after this the lock lifts by itself.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        deadline: Duration,
    },
    /// Lift the lock from flows, service IPs, or everything. Flows go back
    /// to being observed (counters kept); service rules are removed.
    Release {
        #[command(flatten)]
        iface: IfaceArg,
        #[command(flatten)]
        targets: Targets,
        /// Release every flow and service rule.
        #[arg(long, conflicts_with_all = ["flows", "services"])]
        all: bool,
    },
    /// Move a running process, with its TCP connections, to the host where
    /// `migrator agent` runs.
    ///
    /// Phases, each timed and shown as it happens: discover the process
    /// tree's connections; preflight (CRIU here, the agent reachable and
    /// authenticated, PIDs and service addresses free there); freeze its
    /// flows and service addresses with the eBPF lock; CRIU dump; stream the
    /// images; give up the service addresses; then the agent adds them,
    /// restores, announces (GARP / unsolicited NA), confirms the neighbours
    /// answer there and releases the lock. Any failure after the freeze
    /// rolls back: the process runs here again with its connections.
    ///
    /// Exits 0 only when the process runs on the destination.
    Migrate {
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
        /// Print the report as JSON on stdout (progress stays on stderr).
        #[arg(long)]
        json: bool,
        /// State directory for the images: created mode 0700, or, if it
        /// exists, it must be owned by root and closed to group and others.
        /// Each migration gets a fresh directory in it, removed at the end
        /// unless `recover` may need it (the report then says where).
        #[arg(long, value_name = "DIR", default_value = "/var/lib/migrator/source")]
        work_dir: PathBuf,
        /// Keep the images even when the migration (or its rollback) worked.
        #[arg(long)]
        keep_images: bool,
        /// Keep the peers' packets during the freeze (instead of only
        /// dropping them) and deliver them to the restored sockets right
        /// after the release: the peers need not wait for their next
        /// backed-off retransmit. Worth it when the freeze window passes the
        /// peers' retransmit timeout (200 ms or more).
        #[arg(long)]
        hold: bool,
        /// CRIU binary (see `migrator doctor --help`).
        #[arg(long, value_name = "PATH")]
        criu: Option<PathBuf>,
    },
    /// Restore a process from the images a failed migration left behind,
    /// and lift the lock it left.
    ///
    /// For the case `migrate` reports "ROLLBACK FAILED", or when it was
    /// killed after the dump: run it on the source before the lock's
    /// deadline passes, and the peers will have seen only a slow network.
    /// Adds the given service addresses back if they are missing, restores
    /// with CRIU, releases every lock in this network namespace and
    /// detaches the data plane.
    Recover {
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
    },
    /// Receive migrations: run this on the destination host.
    ///
    /// Every byte with a source travels in TLS 1.3; a source proves the
    /// shared token (or a certificate from --ca) within --handshake-timeout
    /// or is dropped. Each connection is served on its own, up to
    /// --max-sessions at once, one restoring at a time. The restored
    /// process stays stopped until the source commits the hand-over, so at
    /// most one copy ever runs. Leaves no lock, address, pinned object or
    /// image behind after a migration, whatever its outcome. It is the
    /// parent (subreaper) of the processes it restores and reaps them when
    /// they move on. SIGTERM: no new sessions, running ones finish or
    /// undo, exit 0. Tells systemd when ready (Type=notify).
    Agent {
        /// Address and port to listen on (a management address).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        auth: AuthArgs,
        /// Interface that takes over the service addresses (default: the
        /// one holding the listen address).
        #[arg(long = "iface", value_name = "IF")]
        iface: Option<String>,
        /// State directory for incoming images (same rules as migrate's
        /// --work-dir); each session's are removed when it ends.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/migrator/agent")]
        work_dir: PathBuf,
        /// Service addresses a source may move here must lie in one of
        /// these networks (CIDR, repeatable); others are refused at
        /// preflight. Default: any.
        #[arg(long = "allow-ip", value_name = "CIDR")]
        allow_ips: Vec<ServiceAddress>,
        /// The longest lock deadline a source may ask for.
        #[arg(long, value_parser = parse_duration, default_value = "120s")]
        max_deadline: Duration,
        /// Authenticated sessions at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
        max_sessions: u16,
        /// Time a new connection has to finish TLS and the proofs.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        handshake_timeout: Duration,
        /// Longest silence from a source inside a session.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        idle_timeout: Duration,
        /// CRIU binary (see `migrator doctor --help`).
        #[arg(long, value_name = "PATH")]
        criu: Option<PathBuf>,
    },
    /// Live per-connection counters, for watching a move.
    ///
    /// Shows the connections the data plane tracks in this network
    /// namespace (a migration's, or those it is asked to follow), with the
    /// peer's retransmits (total, per second, time since the last), our own
    /// retransmits, packets dropped and held, bytes, and while frozen how
    /// long and when the peer's next retransmit is due. On a terminal: a
    /// live table (q quits); otherwise, or with --plain, one table per
    /// interval; --json prints JSON lines. --pid, --flow and --ip select;
    /// --pid and --flow connections are observed (attaching if needed) and
    /// the ones watch added are removed again when it exits.
    Watch {
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
        /// Serve Prometheus metrics on ADDR:PORT (path /metrics).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// No live table: with --metrics-addr and neither --plain nor
        /// --json, run headless.
        #[arg(long)]
        no_tui: bool,
    },
    /// Show tracked flows and service rules with their counters.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct IfaceArg {
    /// Network interface (in this network namespace).
    #[arg(long = "iface", value_name = "IF")]
    name: String,
}

/// How the two hosts prove who they are, inside TLS 1.3 (every byte
/// between them is encrypted either way): a shared token, or certificates.
#[derive(Args)]
struct AuthArgs {
    /// File with the token both hosts share: owned by root, mode 0600, at
    /// least 128 bits once decoded (hex, base64 or raw), e.g. `head -c 32
    /// /dev/urandom | base64`. It never crosses the wire: each side proves
    /// it with an HMAC bound to the TLS session.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "cert",
        conflicts_with = "cert"
    )]
    token_file: Option<PathBuf>,
    /// This host's certificate chain (PEM), for fleets with a PKI; needs
    /// --key and --ca.
    #[arg(long, value_name = "PEM", requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// The CA the other host's certificate must come from (PEM). The agent
    /// accepts only clients it issued; the source only an agent certificate
    /// it issued that names the host or address dialled.
    #[arg(long, value_name = "PEM", requires = "cert")]
    ca: Option<PathBuf>,
}

impl AuthArgs {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        match (&self.token_file, &self.cert, &self.key, &self.ca) {
            (Some(file), ..) => Ok(Credentials::Token(
                Token::from_file(file).map_err(anyhow::Error::msg)?,
            )),
            (None, Some(cert), Some(key), Some(ca)) => {
                Ok(Credentials::from_pem_files(cert, key, ca)?)
            }
            _ => bail!("give --token-file, or --cert with --key and --ca"),
        }
    }
}

#[derive(Args)]
struct Targets {
    /// A TCP connection: LOCAL_IP:PORT=REMOTE_IP:PORT, IPv6 as
    /// [2001:db8::2]:5000=[2001:db8::1]:7000. Repeatable.
    #[arg(long = "flow", value_name = "LOCAL=REMOTE")]
    flows: Vec<FlowSpec>,
    /// All TCP to/from a local IP, or only one port: IP, IP:PORT,
    /// [IPv6]:PORT. Catches new connections too. Repeatable.
    #[arg(long = "ip", value_name = "IP[:PORT]")]
    services: Vec<ServiceSpec>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIGRATOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Through `console`, so that a live view can keep log lines off
        // the screen it draws.
        .with_writer(migrator::console::writer)
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

/// Data plane commands change kernel state: refuse early and clearly
/// without the privileges, before anything is touched.
fn require_privileges() -> anyhow::Result<()> {
    let missing = system::missing_capabilities().context("reading this process's capabilities")?;
    if !missing.is_empty() {
        bail!(
            "this command needs root (missing {}); run it as root",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The CRIU to use, with the fix in the error.
fn locate_criu(flag: Option<&std::path::Path>) -> anyhow::Result<migrator::criu::CriuBinary> {
    migrator::criu::locate(flag).map_err(|e| anyhow::anyhow!("{e}; {}", e.fix()))
}

fn not_attached(iface: &str) -> anyhow::Error {
    anyhow::anyhow!("{iface} is not attached in this network namespace (see `migrator status`)")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = dataplane::default_pin_root();
    match cli.command {
        Command::Doctor { criu, json } => {
            let report = migrator::doctor::run(criu.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            return Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Attach { iface, mode } => {
            require_privileges()?;
            let mut dp = Dataplane::load_pinned(&root)?;
            let (how, new) = dp.attach(&iface.name, mode)?;
            if new {
                eprintln!("attached to {} ({how:?})", iface.name);
            } else {
                eprintln!("{} was already attached ({how:?})", iface.name);
            }
        }
        Command::Detach { iface } => {
            require_privileges()?;
            if dataplane::detach(&root, &iface.name)? {
                eprintln!("detached from {}", iface.name);
            } else {
                return Err(not_attached(&iface.name));
            }
        }
        Command::Freeze {
            iface,
            targets,
            hold,
            deadline,
        } => {
            require_privileges()?;
            if targets.flows.is_empty() && targets.services.is_empty() {
                bail!("nothing to freeze: give --flow LOCAL=REMOTE and/or --ip IP[:PORT]");
            }
            let mut dp = Dataplane::load_pinned(&root)?;
            let (_, new) = dp.attach(&iface.name, AttachMode::Auto)?;
            if new {
                eprintln!("attached to {}", iface.name);
            }
            // The maps just loaded are the pinned ones: no need to reopen them.
            let mut table = dp.take_table()?;
            let deadline_ns = system::boottime_ns() + deadline.as_nanos() as u64;
            let policy = if hold {
                FlowPolicy::hold(deadline_ns)
            } else {
                FlowPolicy::freeze(deadline_ns)
            };
            let keys: Vec<_> = targets.flows.iter().map(FlowSpec::key).collect();
            table.set_flows(&keys, policy)?;
            for service in &targets.services {
                table.set_service(service.key(), policy)?;
            }
            eprintln!(
                "{} {} flow(s) and {} service rule(s); fails open in {:.1}s unless released",
                if hold { "holding" } else { "froze" },
                keys.len(),
                targets.services.len(),
                deadline.as_secs_f64()
            );
        }
        Command::Release {
            iface,
            targets,
            all,
        } => {
            require_privileges()?;
            if dataplane::attached_interfaces(&root)
                .iter()
                .all(|name| *name != iface.name)
            {
                return Err(not_attached(&iface.name));
            }
            let mut table = FlowTable::open_pinned(&root)?;
            if all {
                let (flows, services) = table.release_all()?;
                eprintln!("released {flows} flow(s) and {services} service rule(s)");
            } else {
                if targets.flows.is_empty() && targets.services.is_empty() {
                    bail!("nothing to release: give --flow, --ip or --all");
                }
                let mut unknown = Vec::new();
                for flow in &targets.flows {
                    if !table.release_flow(&flow.key())? {
                        unknown.push(flow.to_string());
                    }
                }
                for service in &targets.services {
                    if !table.release_service(&service.key())? {
                        unknown.push(service.to_string());
                    }
                }
                let released = targets.flows.len() + targets.services.len() - unknown.len();
                eprintln!("released {released}");
                if !unknown.is_empty() {
                    bail!("not tracked, nothing done for: {}", unknown.join(", "));
                }
            }
        }
        Command::Migrate {
            pid,
            to,
            auth,
            server_name,
            ips,
            iface,
            deadline,
            report,
            json,
            work_dir,
            keep_images,
            hold,
            criu,
        } => {
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
                hold,
                quiet: false,
            }));
            eprint!("{}", result.render());
            let text = serde_json::to_string_pretty(&result)?;
            if let Some(path) = report {
                std::fs::write(&path, &text)
                    .with_context(|| format!("writing the report to {}", path.display()))?;
            }
            if json {
                println!("{text}");
            }
            return Ok(if result.outcome == migrator::report::Outcome::Migrated {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Recover {
            images,
            ips,
            iface,
            criu,
        } => {
            require_privileges()?;
            if !images.join("inventory.img").exists() {
                bail!(
                    "{} holds no CRIU images (no inventory.img); give the directory migrate named",
                    images.display()
                );
            }
            let criu = locate_criu(criu.as_deref())?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                if let Some(iface) = &iface {
                    let netlink = migrator::net::address::Netlink::connect()?;
                    let index = netlink.link_index(iface).await?;
                    for address in &ips {
                        if netlink.find(address.ip).await?.is_none() {
                            netlink
                                .add(iface, index, address.ip, address.prefix)
                                .await?;
                            eprintln!("added {address} to {iface}");
                        }
                    }
                }
                anyhow::Ok(())
            })?;
            let outcome = criu.restore(&images, |_| Ok(()))?;
            eprintln!(
                "restored from {}: pid {}",
                images.display(),
                outcome.pid.unwrap_or(0)
            );
            if let Ok(mut table) = FlowTable::open_pinned(&root) {
                let (flows, services) = table.release_all()?;
                eprintln!("released {flows} flow(s) and {services} service rule(s)");
                for iface in dataplane::attached_interfaces(&root) {
                    dataplane::detach(&root, &iface)?;
                    eprintln!("detached from {iface}");
                }
            }
        }
        Command::Agent {
            listen,
            auth,
            iface,
            work_dir,
            allow_ips,
            max_deadline,
            max_sessions,
            handshake_timeout,
            idle_timeout,
            criu,
        } => {
            require_privileges()?;
            let credentials = auth.credentials()?;
            let criu = locate_criu(criu.as_deref())?;
            let criu_version = criu
                .supported_version()
                .map_err(|e| anyhow::anyhow!("{e}; {}", e.fix()))?
                .to_string();
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let iface = match iface {
                    Some(iface) => iface,
                    None => {
                        let netlink = migrator::net::address::Netlink::connect()?;
                        let (_, name) = netlink.holder(listen.ip()).await?.ok_or_else(|| {
                            anyhow::anyhow!(
                                "{} is not assigned here; give --iface IF for the interface that takes over service addresses",
                                listen.ip()
                            )
                        })?;
                        name
                    }
                };
                migrator::agent::serve(
                    migrator::agent::AgentConfig {
                        listen,
                        iface,
                        state: migrator::images::StateDir::open(&work_dir)?,
                        criu,
                        criu_version,
                        limits: migrator::agent::AgentLimits {
                            max_sessions: usize::from(max_sessions),
                            handshake_timeout,
                            idle_timeout,
                            ..Default::default()
                        },
                        policy: migrator::agent::AgentPolicy {
                            allow: allow_ips,
                            max_deadline,
                        },
                    },
                    credentials,
                )
                .await
            })?;
        }
        Command::Watch {
            pid,
            targets,
            iface,
            interval,
            plain,
            json,
            once,
            metrics_addr,
            no_tui,
        } => {
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
            }))?;
        }
        Command::Status { json } => {
            require_privileges()?;
            let snapshot = match FlowTable::open_pinned(&root) {
                Ok(table) => Snapshot::read(&root, &table)?,
                Err(dataplane::DataplaneError::NotAttached { .. }) => Snapshot {
                    interfaces: Vec::new(),
                    flows: Vec::new(),
                    services: Vec::new(),
                },
                Err(err) => return Err(err.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", snapshot.render());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
