//! `migrator agent`: the destination side.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use migrator::{channel::message::ServiceAddress, dataplane::spec::parse_duration};

use super::{AuthArgs, locate_criu, require_privileges};

#[derive(Args)]
pub struct AgentArgs {
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
    /// --work-dir); each session's are on a tmpfs of their own there,
    /// removed when it ends (and at start, if a killed agent left some).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/migrator/agent")]
    work_dir: PathBuf,
    /// Most memory one migration's images may take here (MiB); a larger
    /// process is refused at preflight. Default: half of this host's
    /// memory.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    max_image_memory: Option<u64>,
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
    /// Serve Prometheus metrics on ADDR:PORT (path /metrics):
    /// `migrator_migrations_total{outcome}` (migrated, undone, in-doubt,
    /// refused) and the `migrator_freeze_window_seconds` histogram.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Take addresses over by BGP too (`migrate --takeover bgp`): the
    /// control socket of the BIRD on this host that announces them. Each
    /// such migration checks at preflight that BIRD runs and all its BGP
    /// sessions are established.
    #[arg(long, value_name = "PATH", requires = "service_link")]
    bird_socket: Option<PathBuf>,
    /// With --bird-socket: the link the addresses go on, the one BIRD's
    /// `direct` protocol announces from (a dummy interface, say).
    #[arg(long, value_name = "IF", requires = "bird_socket")]
    service_link: Option<String>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let AgentArgs {
        listen,
        auth,
        iface,
        work_dir,
        max_image_memory,
        allow_ips,
        max_deadline,
        max_sessions,
        handshake_timeout,
        idle_timeout,
        criu,
        metrics_addr,
        bird_socket,
        service_link,
    } = args;
    require_privileges()?;
    let credentials = auth.credentials()?;
    let criu = locate_criu(criu.as_deref())?;
    let criu_version = criu
        .supported_version()
        .map_err(|e| anyhow::anyhow!("{e}; {}", e.fix()))?
        .to_string();
    let mut state = migrator::images::StateDir::open(&work_dir)?;
    if let Some(mib) = max_image_memory {
        state = state.with_memory_limit(mib << 20);
    }
    state.remove_stale(migrator::agent::SESSION_PREFIX);
    state.remove_stale(migrator::criu::kdat::KDAT_PREFIX);
    // The restore's CRIU (and a lazy restore's daemon) start while the
    // process is frozen: their kernel probes are done now.
    let kdat = match migrator::criu::kdat::KdatCache::prepare(&criu, &state) {
        Ok(kdat) => kdat,
        Err(why) => {
            tracing::warn!(
                "CRIU's kernel probes are not cached ({why}): each restore will probe the kernel inside the freeze window (about 25-30 ms)"
            );
            None
        }
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let iface = match iface {
            Some(iface) => iface,
            None => migrator::agent::interface_holding(listen.ip()).await?,
        };
        migrator::agent::serve(
            migrator::agent::AgentConfig {
                listen,
                iface,
                state,
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
                metrics_addr,
                bgp: bird_socket
                    .zip(service_link)
                    .map(|(bird_socket, link)| migrator::agent::BgpTakeover { bird_socket, link }),
                kdat,
            },
            credentials,
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}
