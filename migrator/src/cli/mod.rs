//! The `migrator` command line: one module per subcommand (or family of
//! them), each a thin front end over the library; this one holds what
//! they share and dispatches.

mod agent;
mod docs;
mod doctor;
mod lock;
mod migrate;
mod report;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use migrator::{
    channel::{Credentials, token::Token},
    dataplane::spec::{FlowSpec, ServiceSpec},
    system,
};

/// Move a running Linux process with live TCP connections to another host.
///
/// migrator freezes the process's connections with an eBPF network lock,
/// checkpoints it with CRIU, restores it on the destination, moves the
/// service IP and releases traffic only once the destination owns it. Peers
/// see a short, slow patch of network, never a reset.
///
/// Logging: RUST_LOG (e.g. `RUST_LOG=debug`), on stderr; colour only on a
/// terminal and never with NO_COLOR set.
#[derive(Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// Only warnings and errors on stderr: no progress lines, no summary
    /// (the report file and --json are unchanged).
    #[arg(long, short, global = true)]
    pub quiet: bool,
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
    Doctor(doctor::DoctorArgs),
    /// Attach the data plane (ingress and egress) to an interface.
    ///
    /// The programs stay attached after this command exits (TCX links
    /// pinned under /sys/fs/bpf/migrator/netns-<inode>/); every migrator
    /// command in this network namespace shares their flow table.
    Attach(lock::AttachArgs),
    /// Detach the data plane from an interface; with no interface left,
    /// the pinned maps are removed too.
    Detach(lock::DetachArgs),
    /// Lock flows and service IPs: their packets are dropped both ways
    /// (or, with --hold, incoming ones are kept for later delivery).
    ///
    /// Attaches to the interface if needed and returns at once; the lock
    /// stays until `release` or until the deadline passes, after which the
    /// kernel lets traffic through again on its own (fail-open), even if
    /// no migrator process is left.
    Freeze(lock::FreezeArgs),
    /// Lift the lock from flows, service IPs, or everything. Flows go back
    /// to being observed (counters kept); service rules are removed.
    Release(lock::ReleaseArgs),
    /// Move a running process, with its TCP connections, to the host where
    /// `migrator agent` runs.
    ///
    /// Phases, each timed and shown as it happens: discover the process
    /// tree's connections; preflight (CRIU here, the agent reachable and
    /// authenticated, PIDs and service addresses free there, room for the
    /// images in memory on both hosts); freeze its flows and service
    /// addresses with the eBPF lock; CRIU dump, the memory streaming to the
    /// agent as it is dumped while CRIU keeps the tree frozen here; the
    /// other images; give up the service addresses; then the agent adds
    /// them, restores (stopped), announces (GARP / unsolicited NA) and
    /// confirms the neighbours answer there; CRIU kills the tree here, and
    /// the agent resumes its copy and releases the lock. Any failure before
    /// that rolls back: CRIU resumes the tree here with its connections.
    ///
    /// Exit status, one per thing to do next (the report's `outcome`):
    ///
    /// 0  migrated: the process runs on the destination.
    ///
    /// 3  refused before the freeze: nothing changed; fix what the error
    /// says and run again.
    ///
    /// 4  rolled back: the process runs here again, connections alive.
    ///
    /// 5  failed: the process runs nowhere and the lock holds its peers
    /// until the deadline; run the `migrator recover` the error names
    /// (unless it says the process is lost: then start it again).
    ///
    /// 6  in doubt: it runs on the destination or nowhere; look there
    /// first (the error says how).
    ///
    /// 2  bad usage.
    Migrate(migrate::MigrateArgs),
    /// Restore a process from the images a failed migration left behind,
    /// and lift the lock it left.
    ///
    /// For the case `migrate` reports "ROLLBACK FAILED", or when it was
    /// killed: run it on the source before the lock's deadline passes, and
    /// the peers will have seen only a slow network. Adds the given service
    /// addresses back if they are missing, restores with CRIU if the
    /// process died here (a dump that never finished left it running:
    /// CRIU resumed it), releases every lock in this network namespace
    /// and detaches the data plane. Images whose pages streamed to the
    /// destination can only be restored there.
    Recover(migrate::RecoverArgs),
    /// Read migration reports: one (its summary; --svg draws its phases
    /// and connections on one time axis), or many side by side (counts
    /// by outcome, the freeze window and each phase as min / p50 / p95 /
    /// max, the slowest and what dominated it).
    Report(report::ReportArgs),
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
    Agent(agent::AgentArgs),
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
    Watch(watch::WatchArgs),
    /// Show tracked flows and service rules with their counters.
    Status(lock::StatusArgs),
    /// Print shell completions, e.g. `migrator completions bash >
    /// /etc/bash_completion.d/migrator`.
    Completions(docs::CompletionsArgs),
    /// Print the man page (or write one per command with --dir).
    Man(docs::ManArgs),
}

#[derive(Args)]
pub struct IfaceArg {
    /// Network interface (in this network namespace).
    #[arg(long = "iface", value_name = "IF")]
    pub name: String,
}

/// How the two hosts prove who they are, inside TLS 1.3 (every byte
/// between them is encrypted either way): a shared token, or certificates.
#[derive(Args)]
pub struct AuthArgs {
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
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
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
pub struct Targets {
    /// A TCP connection: LOCAL_IP:PORT=REMOTE_IP:PORT, IPv6 as
    /// [2001:db8::2]:5000=[2001:db8::1]:7000. Repeatable.
    #[arg(long = "flow", value_name = "LOCAL=REMOTE")]
    pub flows: Vec<FlowSpec>,
    /// All TCP to/from a local IP, or only one port: IP, IP:PORT,
    /// [IPv6]:PORT. Catches new connections too. Repeatable.
    #[arg(long = "ip", value_name = "IP[:PORT]")]
    pub services: Vec<ServiceSpec>,
}

/// What a command says it did: JSON on stdout with --json, else the text
/// on stderr (none with --quiet).
pub fn tell(json: bool, quiet: bool, value: &serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else if !quiet {
        eprintln!("{}", text());
    }
}

/// `--json`, for the commands that say what they did.
#[derive(Args)]
pub struct JsonArg {
    /// Print what was done as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Data plane commands change kernel state: refuse early and clearly
/// without the privileges, before anything is touched.
pub fn require_privileges() -> anyhow::Result<()> {
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
pub fn locate_criu(flag: Option<&std::path::Path>) -> anyhow::Result<migrator::criu::CriuBinary> {
    migrator::criu::locate(flag).map_err(|e| anyhow::anyhow!("{e}; {}", e.fix()))
}

pub fn not_attached(iface: &str) -> anyhow::Error {
    anyhow::anyhow!("{iface} is not attached in this network namespace (see `migrator status`)")
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Attach(args) => lock::run_attach(args, cli.quiet),
        Command::Detach(args) => lock::run_detach(args, cli.quiet),
        Command::Freeze(args) => lock::run_freeze(args, cli.quiet),
        Command::Release(args) => lock::run_release(args, cli.quiet),
        Command::Migrate(args) => migrate::run_migrate(args, cli.quiet),
        Command::Recover(args) => migrate::run_recover(args, cli.quiet),
        Command::Report(args) => report::run(args, cli.quiet),
        Command::Agent(args) => agent::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Status(args) => lock::run_status(args),
        Command::Completions(args) => docs::run_completions(args),
        Command::Man(args) => docs::run_man(args),
    }
}
