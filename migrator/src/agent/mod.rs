//! `migrator agent`: the destination. It accepts one migration at a time
//! from a source that proves the shared token, checks it can take the
//! process (preflight), locks the flows on its interface before it owns the
//! service address, receives the images, and then: adds the address,
//! restores with CRIU, announces the address, confirms the neighbours
//! answer here, and only then releases the lock.
//!
//! Whatever fails, the agent leaves nothing behind: the lock and any
//! attachment it made, the addresses it added, a process it restored, the
//! images. The source then rolls back.
//!
//! The agent is a child subreaper and reaps every child that exits, so a
//! restored process that later moves away is reaped at once.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};
use tracing::{info, warn};

use crate::{
    channel::{
        Acceptor, ChannelError, Credentials, Message, TlsChannel,
        message::{PreflightReply, PreflightRequest, RestoreReply, ServiceAddress},
    },
    criu::{CriuBinary, stats::read_restore_stats, swrk::Swrk},
    dataplane::{lock::MigrationLock, spec::FlowSpec},
    net::{address::Netlink, announce::Link},
    report::{self, ConnectionCounters, PhaseClock},
};

/// Bounds on what a source may send.
const MAX_FILES: u64 = 100_000;
const MAX_TOTAL_BYTES: u64 = 64 << 30;
/// Held packets a source may hand over (the source's ring holds 16 MiB).
const MAX_HELD: u64 = 16_384;
/// How long a neighbour gets to answer a probe from the new owner.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Announcements per address.
const ANNOUNCEMENTS: usize = 3;

pub struct AgentConfig {
    pub listen: SocketAddr,
    pub iface: String,
    pub work_dir: PathBuf,
    pub criu: CriuBinary,
    pub criu_version: String,
}

/// Serve migrations until the process is stopped.
/// `credentials`: how the agent and its sources prove who they are.
pub async fn serve(config: AgentConfig, credentials: Credentials) -> anyhow::Result<()> {
    become_subreaper();
    tokio::spawn(reap_children());
    std::fs::create_dir_all(&config.work_dir)?;
    let listener = TcpListener::bind(config.listen).await.map_err(|err| {
        anyhow::anyhow!(
            "listening on {}: {err} (is the address assigned here and the port free?)",
            config.listen
        )
    })?;
    info!(listen = %config.listen, iface = %config.iface, "agent ready");
    let acceptor = Acceptor::new(credentials)?;
    let mut serial = 0u64;
    loop {
        let (stream, from) = listener.accept().await?;
        serial += 1;
        let images = config.work_dir.join(format!("incoming-{serial}"));
        match handle(stream, &acceptor, &config, &images).await {
            Ok(Some(pid)) => info!(%from, pid, "migration in: process restored, traffic released"),
            Ok(None) => info!(%from, "session ended without a restore"),
            Err(err) => warn!(%from, "session failed: {err}"),
        }
        let _ = std::fs::remove_dir_all(&images);
    }
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
/// their orphans (we are a subreaper). Exit statuses are not needed.
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
        // SAFETY: waitpid with WNOHANG and no status pointer.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    }
}

/// What one session changed, undone by [`Session::undo`] unless the
/// migration completed.
struct Session {
    lock: Option<MigrationLock>,
    /// CRIU started ahead, waiting for the restore request.
    swrk: Option<Swrk>,
    added: Vec<IpAddr>,
    restored_pid: Option<i32>,
}

impl Session {
    /// Undo everything; `Err` when the copy restored here could not be
    /// shown gone (the source must hear that).
    async fn undo(&mut self, netlink: &Netlink) -> Result<(), String> {
        self.swrk = None;
        let mut gone = Ok(());
        if let Some(pid) = self.restored_pid.take() {
            // The source restores its own copy from the same images: this
            // one must not run, and must be gone (reaped: we are its
            // subreaper) before the source hears, so that two copies never
            // run and the source finds the PIDs free when it shares them.
            // Its traffic never left (still locked).
            let pids = crate::system::kill_tree(pid);
            gone = tokio::task::spawn_blocking(move || {
                crate::system::wait_for_free_pids(&pids, crate::system::PID_WAIT_LIMIT)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|waited| {
                waited.map(|_| ()).map_err(|taken| {
                    format!(
                        "the copy restored here was killed but {} still taken",
                        crate::system::describe_pids(&taken)
                    )
                })
            });
        }
        for ip in self.added.drain(..) {
            let _ = netlink.remove(ip).await;
        }
        if let Some(lock) = self.lock.take() {
            lock.close();
        }
        gone
    }
}

async fn handle(
    stream: TcpStream,
    acceptor: &Acceptor,
    config: &AgentConfig,
    images: &Path,
) -> Result<Option<i32>, ChannelError> {
    let mut channel = match acceptor.accept(stream).await {
        Ok(channel) => channel,
        Err(ChannelError::Closed) => {
            return Err(ChannelError::Auth(
                "the source hung up during authentication (its token differs from ours?)".into(),
            ));
        }
        Err(other) => return Err(other),
    };
    let request = match channel.receive().await? {
        Message::Preflight(request) => request,
        other => {
            return Err(ChannelError::Unexpected {
                expected: "preflight",
                got: other.name(),
            });
        }
    };
    let netlink = Netlink::connect().map_err(|err| ChannelError::Refused(err.to_string()))?;
    let mut session = Session {
        lock: None,
        swrk: None,
        added: Vec::new(),
        restored_pid: None,
    };
    let result = run_session(
        &mut channel,
        config,
        images,
        &request,
        &netlink,
        &mut session,
    )
    .await;
    match result {
        Ok(pid) => {
            // Done: the lock was released; take our entries away.
            session.restored_pid = None;
            session.added.clear();
            if let Some(lock) = session.lock.take() {
                lock.close();
            }
            Ok(Some(pid))
        }
        Err(err) => {
            if let Err(problem) = session.undo(&netlink).await {
                warn!("undoing the session: {problem}");
            }
            Err(err)
        }
    }
}

fn refuse(reason: String) -> Message {
    Message::Refused { reason }
}

async fn run_session(
    channel: &mut TlsChannel,
    config: &AgentConfig,
    images: &Path,
    request: &PreflightRequest,
    netlink: &Netlink,
    session: &mut Session,
) -> Result<i32, ChannelError> {
    let flows = match preflight(config, request, netlink).await {
        Ok(flows) => flows,
        Err(reason) => {
            channel.send(&refuse(reason.clone())).await?;
            return Err(ChannelError::Refused(reason));
        }
    };
    // Lock before we own the address: from the moment it is added until
    // the restored sockets are ready, our stack must not answer the peers.
    let services = ServiceAddress::lock_rules(&request.service_addresses);
    let lock = MigrationLock::observe(&config.iface, &flows)
        .and_then(|mut lock| {
            lock.freeze(
                &services,
                Duration::from_millis(request.deadline_ms),
                request.hold,
            )
            .map(|()| lock)
        })
        .map_err(|err| err.to_string());
    match lock {
        Ok(lock) => session.lock = Some(lock),
        Err(reason) => {
            let reason = format!("locking the flows on {}: {reason}", config.iface);
            channel.send(&refuse(reason.clone())).await?;
            return Err(ChannelError::Refused(reason));
        }
    }
    // Start CRIU now, so its start-up is not part of the freeze window.
    let started = std::fs::create_dir_all(images)
        .map_err(|e| format!("creating {}: {e}", images.display()))
        .and_then(|()| config.criu.swrk(images).map_err(|e| e.to_string()));
    match started {
        Ok(swrk) => session.swrk = Some(swrk),
        Err(reason) => {
            channel.send(&refuse(reason.clone())).await?;
            return Err(ChannelError::Refused(reason));
        }
    }
    channel
        .send(&Message::PreflightOk(PreflightReply {
            criu_version: config.criu_version.clone(),
            iface: config.iface.clone(),
        }))
        .await?;

    receive_images(channel, images).await?;
    let mut held = Vec::new();
    loop {
        match channel.receive().await? {
            Message::Held { count } if count <= MAX_HELD => {
                for _ in 0..count {
                    held.push(channel.receive_data().await?);
                }
            }
            Message::Restore => break,
            other => {
                return Err(ChannelError::Unexpected {
                    expected: "held packets or restore",
                    got: other.name(),
                });
            }
        }
    }
    match restore(config, images, request, netlink, session, held).await {
        Ok(reply) => {
            let pid = reply.pid;
            channel.send(&Message::Restored(Box::new(reply))).await?;
            Ok(pid)
        }
        Err((phase, reason)) => {
            // Undone before answering: the source puts the address back and
            // restores its own copy as soon as it hears (handle's undo after
            // this finds nothing left).
            let reason = match session.undo(netlink).await {
                Ok(()) => reason,
                Err(problem) => format!("{reason}; {problem}"),
            };
            let _ = channel
                .send(&Message::Failed {
                    phase: phase.to_owned(),
                    reason: reason.clone(),
                })
                .await;
            Err(ChannelError::Refused(format!("{phase}: {reason}")))
        }
    }
}

/// Checks before the source freezes anything. Returns the flows to lock.
async fn preflight(
    config: &AgentConfig,
    request: &PreflightRequest,
    netlink: &Netlink,
) -> Result<Vec<FlowSpec>, String> {
    let flows: Vec<FlowSpec> = request
        .flows
        .iter()
        .map(|flow| flow.parse().map_err(|err| format!("{err}")))
        .collect::<Result<_, _>>()?;
    netlink
        .link_index(&config.iface)
        .await
        .map_err(|err| err.to_string())?;
    for address in &request.service_addresses {
        if let Some((_, iface)) = netlink
            .holder(address.ip)
            .await
            .map_err(|e| e.to_string())?
        {
            return Err(format!(
                "service address {} is already assigned on the destination ({iface}); remove it there or pick another destination",
                address.ip
            ));
        }
    }
    // The tree's PIDs must be free here; on one machine in one PID
    // namespace they are the tree's own until the dump (then we wait).
    if !request.shares_pids_with(&crate::system::pid_namespace_identity())
        && let Some(pid) = crate::system::taken_pids(request.pids_needed()).first()
    {
        return Err(format!(
            "{} is taken on the destination; CRIU restores a process with its PIDs, so they must be free (or run the workload in its own PID namespace)",
            crate::system::describe_pid(*pid)
        ));
    }
    Ok(flows)
}

/// A file name the source may write: one plain component, no dot files.
fn safe_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(components.next(), Some(Component::Normal(_)))
        && components.next().is_none()
        && !name.starts_with('.')
        && name.len() <= 255
}

async fn receive_images(channel: &mut TlsChannel, images: &Path) -> Result<(), ChannelError> {
    tokio::fs::create_dir_all(images).await?;
    let (mut files, mut total) = (0u64, 0u64);
    let mut names = BTreeSet::new();
    loop {
        match channel.receive().await? {
            Message::File { name, size } => {
                files += 1;
                total = total.saturating_add(size);
                if !safe_name(&name) || !names.insert(name.clone()) {
                    let reason =
                        format!("image name `{name}` refused (not a plain, new file name)");
                    channel.send(&refuse(reason.clone())).await?;
                    return Err(ChannelError::Refused(reason));
                }
                if files > MAX_FILES || total > MAX_TOTAL_BYTES {
                    let reason = format!(
                        "image stream over the limits ({MAX_FILES} files, {} GiB)",
                        MAX_TOTAL_BYTES >> 30
                    );
                    channel.send(&refuse(reason.clone())).await?;
                    return Err(ChannelError::Refused(reason));
                }
                let mut file = tokio::fs::File::create(images.join(&name)).await?;
                let mut left = size;
                while left > 0 {
                    let chunk = channel.receive_data().await?;
                    if chunk.len() as u64 > left {
                        return Err(ChannelError::Frame(format!(
                            "{name}: more bytes than announced"
                        )));
                    }
                    left -= chunk.len() as u64;
                    file.write_all(&chunk).await?;
                }
                file.flush().await?;
            }
            Message::FilesDone {
                files: sent_files,
                bytes,
            } => {
                if sent_files != files || bytes != total {
                    let reason = format!(
                        "image stream incomplete: got {files} files / {total} bytes, source sent {sent_files} / {bytes}"
                    );
                    channel.send(&refuse(reason.clone())).await?;
                    return Err(ChannelError::Refused(reason));
                }
                channel.send(&Message::FilesOk).await?;
                return Ok(());
            }
            other => {
                return Err(ChannelError::Unexpected {
                    expected: "file or files-done",
                    got: other.name(),
                });
            }
        }
    }
}

type PhaseError = (&'static str, String);

async fn restore(
    config: &AgentConfig,
    images: &Path,
    request: &PreflightRequest,
    netlink: &Netlink,
    session: &mut Session,
    source_held: Vec<bytes::Bytes>,
) -> Result<RestoreReply, PhaseError> {
    // Times from the restore request on; the source places them on its
    // own timeline.
    let mut clock = PhaseClock::new("destination", true);

    let phase = clock.begin(report::IP_TAKEOVER);
    let index = netlink
        .link_index(&config.iface)
        .await
        .map_err(|e| (report::IP_TAKEOVER, e.to_string()))?;
    for address in &request.service_addresses {
        netlink
            .add(&config.iface, index, address.ip, address.prefix)
            .await
            .map_err(|e| (report::IP_TAKEOVER, e.to_string()))?;
        session.added.push(address.ip);
    }
    clock.end(phase, true);

    // Same machine, same PID namespace: the dumped tree's PIDs are free
    // once its parent reaped it. Wait for that, bounded: a PID that stays
    // taken fails the restore (and the source rolls back).
    if request.shares_pids_with(&crate::system::pid_namespace_identity())
        && !request.pids_needed().is_empty()
    {
        let phase = clock.begin(report::PID_WAIT);
        let pids = request.pids_needed().to_vec();
        let waited = tokio::task::spawn_blocking(move || {
            crate::system::wait_for_free_pids(&pids, crate::system::PID_WAIT_LIMIT)
        })
        .await
        .map_err(|e| (report::PID_WAIT, e.to_string()))?;
        clock.end(phase, waited.is_ok());
        if let Err(taken) = waited {
            return Err((
                report::PID_WAIT,
                format!(
                    "{} still taken after {:?}",
                    crate::system::describe_pids(&taken),
                    crate::system::PID_WAIT_LIMIT
                ),
            ));
        }
    }

    let phase = clock.begin(report::RESTORE);
    let swrk = match session.swrk.take() {
        Some(swrk) => swrk,
        None => config
            .criu
            .swrk(images)
            .map_err(|e| (report::RESTORE, e.to_string()))?,
    };
    let outcome = tokio::task::spawn_blocking(move || swrk.restore(|_| Ok(())))
        .await
        .map_err(|e| (report::RESTORE, e.to_string()))?
        .map_err(|e| (report::RESTORE, e.to_string()))?;
    let pid = outcome
        .pid
        .ok_or((report::RESTORE, "CRIU reported no PID".to_owned()))?;
    session.restored_pid = Some(pid);
    // Every migrated connection must be back, established, in the
    // restored tree: CRIU succeeding is not proof enough to release.
    let expected: BTreeSet<String> = request.flows.iter().cloned().collect();
    let restored: BTreeSet<String> = crate::net::discover::discover(pid)
        .map(|network| {
            network
                .connections
                .iter()
                .map(FlowSpec::to_string)
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<&String> = expected.difference(&restored).collect();
    if !missing.is_empty() {
        clock.end(phase, false);
        return Err((
            report::RESTORE,
            format!(
                "restored process {pid} lacks established connections: {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    clock.end(phase, true);

    // Announce, then probe the peers from the service address: a reply
    // proves the peer's neighbour entry now points here.
    let phase = clock.begin(report::ANNOUNCE);
    let iface = config.iface.clone();
    let addresses: Vec<IpAddr> = request.service_addresses.iter().map(|a| a.ip).collect();
    let neighbours = on_link_neighbours(netlink, index, request).await;
    let link = tokio::task::spawn_blocking(move || -> Result<Link, String> {
        let mut link = Link::open(&iface).map_err(|e| e.to_string())?;
        for _ in 0..ANNOUNCEMENTS {
            for ip in &addresses {
                link.announce(*ip).map_err(|e| e.to_string())?;
            }
        }
        Ok(link)
    })
    .await
    .map_err(|e| (report::ANNOUNCE, e.to_string()))?
    .map_err(|e| (report::ANNOUNCE, e))?;
    clock.end(phase, true);

    let phase = clock.begin(report::CONFIRM);
    let (confirmed, unconfirmed) = tokio::task::spawn_blocking(move || {
        let mut link = link;
        let answered = link
            .probe_all(&neighbours, CONFIRM_TIMEOUT)
            .unwrap_or_else(|_| vec![false; neighbours.len()]);
        let (mut confirmed, mut unconfirmed) = (Vec::new(), Vec::new());
        for ((_, neighbour), answered) in neighbours.iter().zip(answered) {
            if answered {
                confirmed.push(neighbour.to_string());
            } else {
                unconfirmed.push(neighbour.to_string());
            }
        }
        (confirmed, unconfirmed)
    })
    .await
    .map_err(|e| (report::CONFIRM, e.to_string()))?;
    let confirm_ok = unconfirmed.is_empty();
    clock.end(phase, confirm_ok);
    if !confirm_ok {
        return Err((
            report::CONFIRM,
            format!(
                "neighbours {} did not answer the new owner of the service address within {:?}",
                unconfirmed.join(", "),
                CONFIRM_TIMEOUT
            ),
        ));
    }

    let phase = clock.begin(report::RELEASE);
    let lock = session
        .lock
        .as_mut()
        .ok_or((report::RELEASE, "no lock".to_owned()))?;
    let counters = lock.counters();
    lock.release()
        .map_err(|e| (report::RELEASE, e.to_string()))?;
    clock.end(phase, true);

    // Held packets right after the release, so the restored sockets'
    // acknowledgements can leave: the source's first (older), then those
    // that reached us before the release.
    let mut held_delivered = Vec::new();
    if request.hold {
        let phase = clock.begin(report::DELIVER_HELD);
        let mut frames = source_held;
        frames.extend(
            lock.drain_held()
                .into_iter()
                .map(|packet| bytes::Bytes::from(packet.frame)),
        );
        held_delivered = deliver_held(&frames);
        clock.end(phase, true);
    }
    let released_at = Instant::now();

    let connections = counters
        .into_iter()
        .map(|(flow, stats)| ConnectionCounters {
            flow: flow.to_string(),
            peer_retransmits: stats.peer_retransmits,
            packets_in: stats.packets_in,
            dropped: stats.dropped,
        })
        .collect();
    Ok(RestoreReply {
        pid,
        phases: std::mem::take(&mut clock.phases),
        since_release_ms: released_at.elapsed().as_secs_f64() * 1e3,
        criu_restore: read_restore_stats(images),
        connections,
        confirmed,
        unconfirmed,
        held_delivered,
    })
}

/// Inject held frames into the local stack; count per flow. A packet
/// that cannot be delivered is only lost the way a dropped one is: the
/// peer retransmits it.
fn deliver_held(frames: &[bytes::Bytes]) -> Vec<(String, u64)> {
    let injector = match crate::net::inject::Injector::open() {
        Ok(injector) => injector,
        Err(err) => {
            warn!("held packets not delivered: {err}");
            return Vec::new();
        }
    };
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for frame in frames {
        match injector.deliver(frame) {
            Ok(Some(flow)) => *counts.entry(flow.to_string()).or_default() += 1,
            Ok(None) => {}
            Err(err) => warn!("a held packet was not delivered: {err}"),
        }
    }
    counts.into_iter().collect()
}

/// For each distinct peer of the migrated flows that sits on one of this
/// interface's subnets: (service address of its family to probe from,
/// peer). Peers behind a router are not probed.
async fn on_link_neighbours(
    netlink: &Netlink,
    index: u32,
    request: &PreflightRequest,
) -> Vec<(IpAddr, IpAddr)> {
    let Ok(assigned) = netlink.addresses().await else {
        return Vec::new();
    };
    let services: Vec<&ServiceAddress> = request.service_addresses.iter().collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for flow in request
        .flows
        .iter()
        .filter_map(|f| f.parse::<FlowSpec>().ok())
    {
        let peer = flow.remote.ip();
        let on_link = assigned.iter().any(|a| {
            a.index == index
                && !services.iter().any(|s| s.ip == a.ip)
                && crate::net::address::contains(a.ip, a.prefix, peer)
        });
        let from = services.iter().find(|s| s.ip.is_ipv4() == peer.is_ipv4());
        if let (true, Some(from)) = (on_link, from)
            && seen.insert(peer)
        {
            out.push((from.ip, peer));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn image_names_stay_inside_the_work_directory() {
        for ok in ["inventory.img", "pages-1.img", "stats-dump", "core-42.img"] {
            assert!(safe_name(ok), "{ok} refused");
        }
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/b.img",
            "..",
            ".",
            "",
            ".hidden",
            &"x".repeat(256),
        ] {
            assert!(!safe_name(bad), "{bad:?} accepted");
        }
    }
}
