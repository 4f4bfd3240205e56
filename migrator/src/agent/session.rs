//! One migration in, in the order the protocol allows: preflight (policy,
//! then the flows locked before we own the address), images, held
//! packets, restore and takeover with the process stopped, then the
//! hand-over: we say we are ready, and only the source's commit lets us
//! resume the process and release the lock. Without a commit before the
//! deadline (shortly before the lock's own), everything is undone.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::warn;

use super::{
    Shared,
    policy::{self, MAX_FILES, MAX_HELD, MAX_TOTAL_BYTES},
    takeover,
};
use crate::{
    channel::pages,
    channel::{
        ChannelError, Message, TlsChannel,
        message::{PreflightReply, PreflightRequest, ServiceAddress, Takeover},
    },
    criu::{lazy::LazyPages, page_stream::PageStore, swrk::Swrk},
    dataplane::{lock::MigrationLock, spec::FlowSpec},
    images::SessionDir,
    net::address::Netlink,
};

/// What one session changed, undone by [`Session::undo`] unless the
/// migration completed.
pub(super) struct Session {
    pub lock: Option<MigrationLock>,
    /// CRIU started ahead, waiting for the restore request.
    pub swrk: Option<Swrk>,
    pub added: Vec<IpAddr>,
    pub restored_pid: Option<i32>,
    /// The source went silent after we said we were ready: it may have
    /// ended its own copy and committed, so our images may be the only
    /// ones left (the source's pages streamed here).
    pub in_doubt: bool,
    /// When the source froze (on our clock), once it asked for the
    /// restore.
    pub frozen_at: Option<Instant>,
    /// When the lock here released the flows to our copy.
    pub released_at: Option<Instant>,
    /// With a lazy restore: the daemon that fills the restored memory.
    /// Dropped only once that copy is gone or filled.
    pub lazy: Option<LazyPages>,
    /// The injected fault `lazy-pages-dies-at-release` fired: the daemon
    /// is killed right before the release.
    pub kill_daemon_at_release: bool,
}

/// What happens to a session's images when it ends.
pub(super) enum ImagesFate {
    Remove,
    /// Kept for `migrator recover`, with what to run.
    KeepForRecovery {
        command: String,
    },
}

impl Session {
    /// Undo everything; `Err` when the copy restored here could not be
    /// shown gone (the source must hear that).
    pub async fn undo(&mut self, netlink: &Netlink) -> Result<(), String> {
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
        // The copy it filled is gone (or never was): now the daemon may go.
        self.lazy = None;
        for ip in self.added.drain(..) {
            let _ = netlink.remove(ip).await;
        }
        if let Some(lock) = self.lock.take() {
            lock.close();
        }
        gone
    }
}

fn refuse(reason: String) -> Message {
    Message::Refused { reason }
}

/// Serve one authenticated session. `Ok(Some(pid))`: a process was
/// restored, resumed and released here.
pub(super) async fn run(
    mut channel: TlsChannel,
    shared: &Shared,
    images: &SessionDir,
) -> (Result<Option<i32>, ChannelError>, ImagesFate) {
    let request = match channel.receive().await {
        Ok(Message::Preflight(request)) => request,
        Ok(other) => {
            let unexpected = ChannelError::Unexpected {
                expected: "preflight",
                got: other.name(),
            };
            return (Err(unexpected), ImagesFate::Remove);
        }
        Err(err) => return (Err(err), ImagesFate::Remove),
    };
    if shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        shared.migrations.record("refused", None);
        let reason = "the agent is shutting down; try again once it is back".to_owned();
        let _ = channel.send(&refuse(reason.clone())).await;
        return (Err(ChannelError::Refused(reason)), ImagesFate::Remove);
    }
    let netlink = match Netlink::connect() {
        Ok(netlink) => netlink,
        Err(err) => {
            return (
                Err(ChannelError::Refused(err.to_string())),
                ImagesFate::Remove,
            );
        }
    };
    let mut session = Session {
        lock: None,
        swrk: None,
        added: Vec::new(),
        restored_pid: None,
        in_doubt: false,
        frozen_at: None,
        released_at: None,
        lazy: None,
        kill_daemon_at_release: false,
    };
    let result = serve(
        &mut channel,
        shared,
        images,
        &request,
        &netlink,
        &mut session,
    )
    .await;
    let outcome = match &result {
        Ok(_) => "migrated",
        Err(_) if session.in_doubt => "in-doubt",
        Err(_) if session.frozen_at.is_some() => "undone",
        Err(_) => "refused",
    };
    let window = session
        .frozen_at
        .zip(session.released_at)
        .filter(|_| result.is_ok())
        .map(|(frozen, released)| released.saturating_duration_since(frozen));
    shared.migrations.record(outcome, window);
    match result {
        Ok(pid) => {
            // Done: the lock was released; take our entries away.
            session.restored_pid = None;
            session.added.clear();
            if let Some(lock) = session.lock.take() {
                lock.close();
            }
            (Ok(Some(pid)), ImagesFate::Remove)
        }
        Err(err) => {
            if let Err(problem) = session.undo(&netlink).await {
                warn!("undoing the session: {problem}");
            }
            let fate = if session.in_doubt {
                let ips: String = request
                    .service_addresses
                    .iter()
                    .map(|address| format!(" --ip {address}"))
                    .collect();
                ImagesFate::KeepForRecovery {
                    command: format!(
                        "migrator recover --images {}{ips} --iface {}",
                        images.path().display(),
                        shared.config.iface
                    ),
                }
            } else {
                ImagesFate::Remove
            };
            (Err(err), fate)
        }
    }
}

/// The margin before a lock's deadline by which a hand-over must be done:
/// after it, the lock would let traffic through to a copy that might not
/// run.
pub fn handover_margin(deadline: Duration) -> Duration {
    (deadline / 5).min(Duration::from_secs(2))
}

async fn serve(
    channel: &mut TlsChannel,
    shared: &Shared,
    session_dir: &SessionDir,
    request: &PreflightRequest,
    netlink: &Netlink,
    session: &mut Session,
) -> Result<i32, ChannelError> {
    let config = &shared.config;
    let images = session_dir.path();
    let checked = match config.policy.check(request) {
        Ok(flows) => preflight(config, request, netlink, session_dir)
            .await
            .map(|()| flows),
        Err(reason) => Err(reason),
    };
    let flows = match checked {
        Ok(flows) => flows,
        Err(reason) => {
            channel.send(&refuse(reason.clone())).await?;
            return Err(ChannelError::Refused(reason));
        }
    };
    // Lock before we own the address: from the moment it is added until
    // the restored sockets are ready, our stack must not answer the peers.
    let deadline = Duration::from_millis(request.deadline_ms);
    let services = ServiceAddress::lock_rules(&request.service_addresses);
    let lock = MigrationLock::observe(&config.iface, &flows)
        .and_then(|mut lock| {
            lock.freeze(&services, deadline, request.hold)
                .map(|()| lock)
        })
        .map_err(|err| err.to_string());
    let locked_at = Instant::now();
    match lock {
        Ok(lock) => session.lock = Some(lock),
        Err(reason) => {
            let reason = format!("locking the flows on {}: {reason}", config.iface);
            channel.send(&refuse(reason.clone())).await?;
            return Err(ChannelError::Refused(reason));
        }
    }
    // Everything must be handed over (or undone) before the lock fails
    // open on its own: no wait on the source lasts past this.
    let commit_by = locked_at + deadline.saturating_sub(handover_margin(deadline));
    channel.set_hard_deadline(commit_by);
    // Start CRIU now, so its start-up is not part of the freeze window.
    let started = config.criu.swrk(images).map_err(|e| e.to_string());
    match started {
        Ok(swrk) => session.swrk = Some(swrk),
        Err(reason) => {
            channel.send(&refuse(reason.clone())).await?;
            return Err(ChannelError::Refused(reason));
        }
    }
    // The dump's pages stream here as they are dumped. Not when we share
    // PIDs with the source: its tree must be gone before ours is restored,
    // so it dumps everything locally first.
    let page_stream = request.page_stream
        && (!request.shares_pids_with(&crate::system::pid_namespace_identity())
            || request.pids_needed().is_empty());
    channel
        .send(&Message::PreflightOk(PreflightReply {
            criu_version: config.criu_version.clone(),
            iface: config.iface.clone(),
            host: crate::report::HostInfo::here(config.criu_version.clone()),
            page_stream,
            images: images.display().to_string(),
        }))
        .await?;

    if page_stream {
        // Room for what the tree may have grown to since preflight; the
        // images' tmpfs bounds it in any case.
        let limit = request
            .image_bytes
            .saturating_mul(2)
            .saturating_add(crate::images::DISK_RESERVE)
            .min(MAX_TOTAL_BYTES);
        let mut store = PageStore::new(session_dir);
        pages::deliver(channel, &mut store, limit, commit_by).await?;
    }
    receive_images(channel, session_dir, commit_by).await?;
    // Post-copy: the daemon asks for the lazy pages on a socket of ours,
    // and we ask the source.
    let (mut source_pages, remote_pages) = if request.post_copy && request.lazy_restore {
        let (daemon_end, ours) =
            crate::criu::swrk::stream_pair().map_err(|e| ChannelError::Refused(e.to_string()))?;
        let ours = pages::unix_stream(ours).map_err(ChannelError::Refused)?;
        (Some(ours), Some(daemon_end))
    } else {
        (None, None)
    };
    // The lazy restore's daemon reads the images' inventory as it starts:
    // now, while the restore request comes.
    let lazy = request.lazy_restore.then(|| {
        let criu = config.criu.clone();
        let dir = images.to_owned();
        let kdat = config
            .kdat
            .as_ref()
            .and_then(|kdat| kdat.run_dir().map(std::path::Path::to_owned));
        tokio::task::spawn_blocking(move || {
            LazyPages::start(&criu, &dir, kdat.as_deref(), remote_pages)
        })
    });
    let services = request.service_ips();
    let RestoreRequest {
        held,
        frozen_at,
        dumped_flows,
    } = receive_held(channel, &flows, &services, commit_by).await?;
    session.frozen_at = Some(frozen_at);

    let restoring = shared.restoring.lock().await;
    let expected = dumped_flows.as_deref().unwrap_or(&request.flows);
    let restore = takeover::take_over(config, images, request, expected, netlink, session, lazy);
    let taken = match source_pages.as_mut() {
        None => restore.await,
        // The restore itself may touch lazy pages (CRIU's restorer does):
        // the source answers while it waits for our word.
        Some(daemon) => match relay_while(restore, channel, daemon).await {
            (taken, None) => taken,
            // The daemon's end failing is most likely the daemon gone.
            (_, Some(err)) => Err((
                crate::report::RESTORE,
                session
                    .lazy
                    .as_mut()
                    .and_then(LazyPages::died_early)
                    .unwrap_or_else(|| {
                        format!("asking the source for the pages the restore needs: {err}")
                    }),
            )),
        },
    };
    let taken = match taken {
        Ok(taken) => taken,
        Err((phase, reason)) => {
            return Err(abandon(channel, session, netlink, phase, reason).await);
        }
    };

    // The hand-over: the copy here is restored, stopped, owns the address
    // and the peers answer it. It runs only if the source commits in time.
    if crate::fault::fires(crate::fault::RESTORED_PAUSE) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A lazy restore needs its daemon to fill the memory. One already
    // dead would leave the copy here incomplete for good, while the
    // source can still resume its own: give up now, not after the commit.
    if let Some(died) = session.lazy.as_mut().and_then(LazyPages::died_early) {
        let phase = crate::report::RESTORE;
        return Err(abandon(channel, session, netlink, phase, died).await);
    }
    channel.send(&Message::Ready).await?;
    let waited_from = Instant::now();
    let mut held = held;
    let mut late_batch = false;
    let commit = loop {
        match channel.receive_before(Some(commit_by)).await {
            // Right before its commit, what reached the source since its
            // first batch (peers that still sent there: a new client's SYN
            // among them). Its copy may already be ended, so nothing here
            // may fail the hand-over: a packet we would not take is left
            // out, as a dropped one (its sender resends it).
            Ok(Message::Held { count }) if !late_batch && count <= MAX_HELD => {
                late_batch = true;
                for _ in 0..count {
                    let Ok(frame) = channel.receive_data().await else {
                        break;
                    };
                    match policy::check_held(&frame, &flows, &services) {
                        Ok(()) => held.push(frame),
                        Err(reason) => warn!("a held packet left out: {reason}"),
                    }
                }
            }
            other => break other,
        }
    };
    match commit {
        Ok(Message::Commit) if Instant::now() < commit_by => {}
        other => {
            // Silence (or a commit too late) may mean the source ended its
            // copy: ours is removed, but not the images.
            session.in_doubt = matches!(other, Ok(Message::Commit) | Err(_));
            let why = match other {
                Ok(Message::Commit) => "the commit came after the hand-over deadline".to_owned(),
                Ok(message) => format!("the source sent {} instead of a commit", message.name()),
                Err(err) => format!("no commit from the source: {err}"),
            };
            let phase = crate::report::HANDOVER;
            return Err(abandon(channel, session, netlink, phase, why).await);
        }
    }
    if session.kill_daemon_at_release
        && let Some(lazy) = session.lazy.as_mut()
    {
        lazy.signal_for_fault(libc::SIGKILL);
    }
    let handed = taken.hand_over(session, held, waited_from, images);
    session.released_at = Some(Instant::now());
    drop(restoring);
    let reply = match handed {
        Ok(reply) => reply,
        // Nothing may run half taken over.
        Err((phase, reason)) => {
            return Err(abandon(channel, session, netlink, phase, reason).await);
        }
    };
    let pid = reply.pid;
    // Released: the process runs here for good, the only copy. No later
    // failure (a reply lost, the source gone) may undo it.
    session.restored_pid = None;
    session.added.clear();
    // The injected fault: the answer never goes out (the copy stays).
    let reply_lost = crate::fault::fires(crate::fault::RESTORED_REPLY_LOST);
    let sent = if reply_lost {
        Err(ChannelError::Closed)
    } else {
        channel.send(&Message::Restored(Box::new(reply))).await
    };
    // A lazy restore's memory is filled whatever became of the channel.
    if let Some(lazy) = session.lazy.take() {
        let filled = match source_pages.as_mut() {
            Some(daemon) => {
                // Released: the lock's deadline no longer bounds the
                // channel, which now carries the pages.
                channel.clear_hard_deadline();
                fill_memory_from_source(pid, lazy, daemon, channel, session.released_at).await
            }
            None => fill_memory(pid, lazy, session.released_at).await,
        };
        if sent.is_ok() {
            let _ = channel
                .send(&match &filled {
                    Ok(after_release_ms) => Message::MemoryFilled {
                        after_release_ms: *after_release_ms,
                    },
                    Err(reason) => Message::Failed {
                        phase: crate::report::MEMORY_FILL.to_owned(),
                        reason: reason.clone(),
                    },
                })
                .await;
        }
        filled.map_err(ChannelError::Refused)?;
    }
    if reply_lost {
        return Ok(pid);
    }
    sent.map(|()| pid)
}

/// After a lazy restore's release: wait until the daemon filled the
/// restored memory (how long after the release). A daemon that died
/// leaves pages that can never be filled, and this copy is the only one:
/// the process is killed before the daemon's guards go, so it never reads
/// a missing page as zeros, and the error says it is lost.
async fn fill_memory(
    pid: i32,
    mut lazy: LazyPages,
    released_at: Option<Instant>,
) -> Result<f64, String> {
    let released_at = released_at.unwrap_or_else(Instant::now);
    let waited = tokio::task::spawn_blocking(move || {
        let filled = lazy.wait();
        match filled {
            Ok(_) => Ok(()),
            Err(err) => {
                // Killed and reaped while the guards still hold its
                // faults; only then may they go.
                let pids = crate::system::kill_tree(pid);
                let _ = crate::system::wait_for_free_pids(&pids, crate::system::PID_WAIT_LIMIT);
                drop(lazy);
                Err(format!(
                    "{err}; the restored process {pid} was killed (its memory could not be completed) and is lost"
                ))
            }
        }
    })
    .await
    .map_err(|e| format!("waiting for the memory fill: {e}"))?;
    if let Err(reason) = &waited {
        warn!("{reason}");
    }
    waited.map(|()| released_at.elapsed().as_secs_f64() * 1e3)
}

/// Post-copy: the daemon's requests go to the source, which answers with
/// the pages. If that fails the daemon is ended, and with it (see
/// [`fill_memory`]) the process it could not fill.
async fn fill_memory_from_source(
    pid: i32,
    lazy: LazyPages,
    requests: &mut tokio::net::UnixStream,
    channel: &mut TlsChannel,
    released_at: Option<Instant>,
) -> Result<f64, String> {
    let daemon = lazy.pid();
    let relayed = crate::channel::post_copy::ask_source(channel, requests).await;
    if let Err(err) = &relayed {
        warn!("asking the source for pages: {err}; ending the lazy-pages daemon");
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(daemon, libc::SIGKILL) };
    }
    let filled = fill_memory(pid, lazy, released_at).await;
    match relayed {
        Err(err) => Err(format!(
            "asking the source for pages: {err}; {}",
            filled.err().unwrap_or_default()
        )),
        Ok(_) => filled,
    }
}

/// Post-copy, during the restore: relay the daemon's requests to the
/// source until `restoring` is done. If relaying fails, the daemon's
/// socket is shut, so that it ends and the restore waits no more (what it
/// restored is then not to be used: the error says so). A daemon that
/// closes its end has every page (or died, which the check before we say
/// ready catches): nothing more to relay, and no failure.
async fn relay_while<T>(
    restoring: impl std::future::Future<Output = T>,
    channel: &mut TlsChannel,
    daemon: &mut tokio::net::UnixStream,
) -> (T, Option<ChannelError>) {
    tokio::pin!(restoring);
    let mut failed = None;
    let mut closed = false;
    let mut held_for_fault = false;
    loop {
        tokio::select! {
            biased;
            done = &mut restoring => return (done, failed),
            ready = daemon.readable(), if failed.is_none() && !closed && !held_for_fault => {
                // The injected fault: from its firing on, no more pages
                // before the release (the daemon is killed then).
                if crate::fault::fired(crate::fault::LAZY_PAGES_DIES_AT_RELEASE) {
                    held_for_fault = true;
                    continue;
                }
                let relayed = match ready {
                    Ok(()) => crate::channel::post_copy::relay_one(channel, daemon).await,
                    Err(err) => Err(err.into()),
                };
                match relayed {
                    Ok(Some(_)) => {}
                    Ok(None) => closed = true,
                    Err(err) => {
                        failed = Some(err);
                        use std::os::fd::AsRawFd as _;
                        // SAFETY: shutdown on a socket we own.
                        unsafe { libc::shutdown(daemon.as_raw_fd(), libc::SHUT_RDWR) };
                    }
                }
            }
        }
    }
}

/// Give up after the restore began: undo everything here first (the copy
/// killed and reaped, the addresses and the lock gone), then tell the
/// source, which may then restore its own copy.
async fn abandon(
    channel: &mut TlsChannel,
    session: &mut Session,
    netlink: &Netlink,
    phase: &str,
    reason: String,
) -> ChannelError {
    let reason = match session.undo(netlink).await {
        Ok(()) => format!("{reason}; nothing of it is left here"),
        Err(problem) => format!("{reason}; {problem}"),
    };
    let _ = channel
        .send(&Message::Failed {
            phase: phase.to_owned(),
            reason: reason.clone(),
        })
        .await;
    ChannelError::Refused(format!("{phase}: {reason}"))
}

/// Checks on this host before the source freezes anything.
async fn preflight(
    config: &super::AgentConfig,
    request: &PreflightRequest,
    netlink: &Netlink,
    images: &SessionDir,
) -> Result<(), String> {
    netlink
        .link_index(&config.iface)
        .await
        .map_err(|err| err.to_string())?;
    if request.takeover == Takeover::Bgp {
        let bgp = config.bgp.as_ref().ok_or(
            "this agent cannot take addresses over by BGP: start it with --bird-socket and --service-link (or migrate with --takeover l2)",
        )?;
        netlink
            .link_index(&bgp.link)
            .await
            .map_err(|err| format!("--service-link: {err}"))?;
        let socket = bgp.bird_socket.clone();
        tokio::task::spawn_blocking(move || crate::net::bird::check_sessions(&socket))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|why| format!("the destination cannot announce the addresses: {why}"))?;
    }
    crate::images::check_room(images.path(), request.image_bytes, images.in_memory())
        .map_err(|why| format!("no room for the images on the destination: {why}"))?;
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
    Ok(())
}

async fn receive_images(
    channel: &mut TlsChannel,
    session_dir: &SessionDir,
    deadline: Instant,
) -> Result<(), ChannelError> {
    let images = session_dir.path();
    let (mut files, mut total) = (0u64, 0u64);
    let mut names = BTreeSet::new();
    loop {
        match channel.receive_before(Some(deadline)).await? {
            Message::File {
                name,
                size,
                extents,
            } => {
                // What crosses: the whole file, or the parts named (each
                // in order, apart, inside the file).
                let parts = extents.unwrap_or_else(|| vec![(0, size)]);
                let sent = parts.iter().try_fold(0u64, |end, &(at, len)| {
                    (at >= end && at.checked_add(len).is_some_and(|e| e <= size)).then(|| at + len)
                });
                let bytes: u64 = parts.iter().map(|(_, len)| *len).sum();
                files += 1;
                total = total.saturating_add(bytes);
                if !policy::safe_name(&name) || !names.insert(name.clone()) {
                    let reason =
                        format!("image name `{name}` refused (not a plain, new file name)");
                    channel.send(&refuse(reason.clone())).await?;
                    return Err(ChannelError::Refused(reason));
                }
                if sent.is_none() || size > MAX_TOTAL_BYTES {
                    let reason = format!("image `{name}`: its parts do not fit its size {size}");
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
                let free = crate::images::free_bytes(images).unwrap_or(u64::MAX);
                if bytes.saturating_add(crate::images::DISK_RESERVE) > free {
                    let reason = format!(
                        "no room for image `{name}` ({bytes} bytes) in {}: {free} bytes free",
                        images.display()
                    );
                    channel.send(&refuse(reason.clone())).await?;
                    return Err(ChannelError::Refused(reason));
                }
                // Written in place, as the page images are: tmpfs.
                let file = match session_dir.create_file(&name) {
                    Ok(file) => file,
                    Err(err) => {
                        let reason = err.to_string();
                        channel.send(&refuse(reason.clone())).await?;
                        return Err(ChannelError::Refused(reason));
                    }
                };
                // A hole where no part goes (tmpfs keeps no memory for it).
                file.set_len(size)?;
                for (at, len) in parts {
                    let mut done = 0u64;
                    while done < len {
                        let chunk = channel.receive_data().await?;
                        if chunk.len() as u64 > len - done {
                            return Err(ChannelError::Frame(format!(
                                "{name}: more bytes than announced"
                            )));
                        }
                        std::os::unix::fs::FileExt::write_all_at(&file, &chunk, at + done)?;
                        done += chunk.len() as u64;
                    }
                }
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

/// What the restore request brings: the held packets sent before it,
/// when the source froze (on our clock), and the connections it dumped.
struct RestoreRequest {
    held: Vec<bytes::Bytes>,
    frozen_at: Instant,
    dumped_flows: Option<Vec<String>>,
}

/// At most one batch of held packets, each of a migrating flow, then the
/// restore request.
async fn receive_held(
    channel: &mut TlsChannel,
    flows: &[FlowSpec],
    services: &[IpAddr],
    deadline: Instant,
) -> Result<RestoreRequest, ChannelError> {
    let mut held = Vec::new();
    let mut batches = 0;
    loop {
        match channel.receive_before(Some(deadline)).await? {
            Message::Held { count } => {
                batches += 1;
                if batches > 1 || count > MAX_HELD {
                    let reason = format!(
                        "held packets refused: one batch of at most {MAX_HELD} per session"
                    );
                    channel.send(&refuse(reason.clone())).await?;
                    return Err(ChannelError::Refused(reason));
                }
                for _ in 0..count {
                    let frame = channel.receive_data().await?;
                    if let Err(reason) = policy::check_held(&frame, flows, services) {
                        channel.send(&refuse(reason.clone())).await?;
                        return Err(ChannelError::Refused(reason));
                    }
                    held.push(frame);
                }
            }
            Message::Restore {
                frozen_for_ms,
                dumped_flows,
            } => {
                // A source's clock reading, so bounded: at most its lock's
                // longest deadline ago.
                let ago = Duration::from_secs_f64((frozen_for_ms / 1e3).clamp(0.0, 3600.0));
                let now = Instant::now();
                // Only ever compared with what the restore brought back:
                // anything that is not a four-tuple of a service address
                // is left out.
                let dumped_flows = dumped_flows.map(|dumped| {
                    dumped
                        .into_iter()
                        .filter(|flow| {
                            flow.parse::<FlowSpec>()
                                .is_ok_and(|f| services.contains(&f.local.ip()))
                        })
                        .collect()
                });
                return Ok(RestoreRequest {
                    held,
                    frozen_at: now.checked_sub(ago).unwrap_or(now),
                    dumped_flows,
                });
            }
            other => {
                return Err(ChannelError::Unexpected {
                    expected: "held packets or restore",
                    got: other.name(),
                });
            }
        }
    }
}
