//! `migrator agent`: the destination, as a daemon. Each connection gets a
//! task of its own; an unauthenticated one has a few seconds to finish
//! the TLS handshake and the proofs (`--handshake-timeout`), and only so
//! many may wait at once, so idle or hostile clients cannot block a
//! migration. Authenticated sessions are limited too (`--max-sessions`),
//! and one restores at a time.
//!
//! A session (`session`) checks the request against the agent's policy
//! (`policy`), locks the flows before it owns the service address,
//! receives the images, and restores and takes the address over with the
//! process left stopped (`takeover`). It resumes the process and releases
//! the lock only once the source commits: the source has then given up
//! its claim, so at most one copy ever runs. Whatever fails, or if the
//! source goes silent until shortly before the lock's deadline, the agent
//! leaves nothing behind: the lock and any attachment it made, the
//! addresses it added, the copy it restored, the images.
//!
//! The agent is a child subreaper and reaps every child that exits, so a
//! restored process that later moves away is reaped at once. On SIGTERM it
//! stops listening, lets running sessions finish (or undo), and exits 0;
//! the processes it restored live on (see the systemd unit's KillMode).

mod policy;
mod session;
mod takeover;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::{info, warn};

pub use policy::AgentPolicy;
pub use session::handover_margin;

use crate::{
    channel::{Acceptor, Credentials, Message},
    criu::CriuBinary,
};

/// Each session's images directory is named `incoming-<random>`.
pub const SESSION_PREFIX: &str = "incoming";

pub struct AgentConfig {
    pub listen: SocketAddr,
    pub iface: String,
    /// Where each session's images go (a fresh directory each).
    pub state: crate::images::StateDir,
    pub criu: CriuBinary,
    pub criu_version: String,
    pub limits: AgentLimits,
    pub policy: AgentPolicy,
    /// Serve the agent's Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// Taking addresses over by BGP, if this host can (`--bird-socket`).
    pub bgp: Option<BgpTakeover>,
    /// CRIU's kernel probes, cached for the CRIU started inside the
    /// freeze window, where `/run` cannot hold CRIU's own cache.
    pub kdat: Option<crate::criu::kdat::KdatCache>,
}

/// Where a BGP takeover puts the addresses, and the BIRD that announces
/// them from there.
#[derive(Clone, Debug)]
pub struct BgpTakeover {
    /// BIRD's control socket (checked at each preflight: every BGP
    /// session established).
    pub bird_socket: std::path::PathBuf,
    /// The link BIRD's `direct` protocol exports addresses from.
    pub link: String,
}

/// How much of the agent a client may hold, and for how long.
#[derive(Clone, Debug)]
pub struct AgentLimits {
    /// Authenticated sessions at once (one of them restores at a time).
    pub max_sessions: usize,
    /// Connections still in the TLS handshake or the proofs at once; more
    /// are closed at once (like SSH's MaxStartups).
    pub max_handshakes: usize,
    /// Time a new connection has to finish the handshake and the proofs.
    pub handshake_timeout: Duration,
    /// Longest wait for the source's next message inside a session.
    pub idle_timeout: Duration,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_sessions: 4,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What every connection task shares.
struct Shared {
    config: AgentConfig,
    acceptor: Acceptor,
    handshakes: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    /// One CRIU restore (and takeover) at a time on this host.
    restoring: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
    migrations: crate::metrics::migrations::Migrations,
}

/// Serve migrations until SIGTERM or Ctrl-C. `credentials`: how the agent
/// and its sources prove who they are.
pub async fn serve(config: AgentConfig, credentials: Credentials) -> anyhow::Result<()> {
    become_subreaper();
    tokio::spawn(reap_children());
    let listener = TcpListener::bind(config.listen).await.map_err(|err| {
        anyhow::anyhow!(
            "listening on {}: {err} (is the address assigned here and the port free?)",
            config.listen
        )
    })?;
    let mut registry = prometheus_client::registry::Registry::default();
    let migrations = crate::metrics::migrations::Migrations::register(&mut registry);
    if let Some(addr) = config.metrics_addr {
        crate::metrics::spawn_server(addr, registry)
            .await
            .map_err(|err| anyhow::anyhow!("--metrics-addr {addr}: {err}"))?;
        info!("serving Prometheus metrics on http://{addr}/metrics");
    }
    let shared = Arc::new(Shared {
        migrations,
        acceptor: Acceptor::new(credentials)?,
        handshakes: Arc::new(Semaphore::new(config.limits.max_handshakes)),
        sessions: Arc::new(Semaphore::new(config.limits.max_sessions)),
        restoring: tokio::sync::Mutex::new(()),
        stopping: AtomicBool::new(false),
        config,
    });
    info!(
        listen = %shared.config.listen,
        iface = %shared.config.iface,
        "agent ready"
    );
    // Handle SIGTERM before saying we are ready: a service manager may
    // send it at once.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    crate::system::notify_service_manager("READY=1");
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, from) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        warn!("accepting a connection: {err}");
                        continue;
                    }
                };
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    warn!(%from, "closed at once: {} connections are already authenticating", shared.config.limits.max_handshakes);
                    continue;
                };
                tasks.spawn(connection(shared.clone(), tcp, from, permit));
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            // Forget finished tasks as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    drop(listener);
    crate::system::notify_service_manager("STOPPING=1");
    info!(
        running = tasks.len(),
        "stopping: no new sessions; running ones finish or undo"
    );
    while tasks.join_next().await.is_some() {}
    info!("agent stopped");
    Ok(())
}

/// One connection: handshake under its deadline, then a session if one
/// is free.
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    from: SocketAddr,
    handshake: OwnedSemaphorePermit,
) {
    let limits = &shared.config.limits;
    let accepted =
        tokio::time::timeout(limits.handshake_timeout, shared.acceptor.accept(tcp)).await;
    drop(handshake);
    let mut channel = match accepted {
        Err(_) => {
            info!(%from, "closed: no handshake within {:?}", limits.handshake_timeout);
            return;
        }
        Ok(Err(err)) => {
            warn!(%from, "handshake failed: {err}");
            return;
        }
        Ok(Ok(channel)) => channel,
    };
    channel.set_idle_timeout(limits.idle_timeout);
    let Ok(_session) = shared.sessions.clone().try_acquire_owned() else {
        let _ = channel
            .send(&Message::Refused {
                reason: format!(
                    "agent busy: {} sessions in progress; try again later",
                    limits.max_sessions
                ),
            })
            .await;
        warn!(%from, "refused: all {} sessions busy", limits.max_sessions);
        return;
    };
    let images = match shared.config.state.new_session(SESSION_PREFIX) {
        Ok(images) => images,
        Err(err) => {
            let reason = format!("no room for the images here: {err}");
            warn!(%from, "{reason}");
            let _ = channel.send(&Message::Refused { reason }).await;
            return;
        }
    };
    let (result, fate) = session::run(channel, &shared, &images).await;
    match result {
        Ok(Some(pid)) => info!(%from, pid, "migration in: process restored, traffic released"),
        Ok(None) => info!(%from, "session ended without a restore"),
        Err(err) => warn!(%from, "session failed: {err}"),
    }
    match fate {
        session::ImagesFate::Remove => images.remove(),
        session::ImagesFate::KeepForRecovery { command } => warn!(
            %from,
            "the source went silent after we were ready: it may have ended its copy, so the copy restored here was removed but its images are kept; if the process runs nowhere now, restore it here with `{command}` (and remove the directory once it runs somewhere)"
        ),
    }
}

/// The interface that takes over service addresses when none is named:
/// the one holding the address the agent listens on.
pub async fn interface_holding(ip: std::net::IpAddr) -> anyhow::Result<String> {
    let netlink = crate::net::address::Netlink::connect()?;
    let (_, name) = netlink.holder(ip).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "{ip} is not assigned here; give --iface IF for the interface that takes over service addresses"
        )
    })?;
    Ok(name)
}

fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a plain integer.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        warn!(
            "cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Reap children as they exit: restored processes that moved away, and
/// their orphans (we are a subreaper). Their exit statuses are not
/// needed; those of children spawned to be waited for are left to them.
async fn reap_children() {
    let Ok(mut signals) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
    else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = signals.recv() => {}
            _ = tick.tick() => {}
        }
        crate::system::reap_exited_children();
    }
}
