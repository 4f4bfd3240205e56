//! `migrator migrate`: the source side. Discover the process tree's
//! connections, preflight (here and at the agent) before touching
//! anything, lock, dump with CRIU, stream the images, give up the service
//! address, and let the agent restore, announce, confirm and release.
//!
//! Any failure after the freeze rolls back: the address comes back, CRIU
//! restores the process here from the same images, the lock is released,
//! and the connections live on. If this process is killed mid-way, the
//! lock fails open at its deadline and `migrator recover --images DIR`
//! restores from the images left in the work directory.

pub mod recover;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    channel::{
        self, ChannelError, Credentials, Message, TlsChannel,
        message::{PreflightRequest, RestoreReply, ServiceAddress},
    },
    criu::{CriuBinary, stats::read_dump_stats},
    dataplane::{lock::MigrationLock, spec::FlowSpec},
    net::{address::Netlink, discover},
    report::{self, ConnectionReport, Outcome, PhaseClock, Report},
};

/// TCP connect, TLS handshake and proofs, all together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct MigrateOptions {
    pub pid: i32,
    pub to: SocketAddr,
    /// How this host and the agent prove who they are.
    pub credentials: Credentials,
    /// What the agent's certificate must name (certificate mode); the
    /// address of `to` if not given.
    pub server_name: Option<String>,
    pub service_addresses: Vec<ServiceAddress>,
    /// Interface the service addresses live on (found if not given).
    pub iface: Option<String>,
    /// Fail-open deadline of the locks on both hosts.
    pub deadline: Duration,
    pub criu: CriuBinary,
    /// Where images are written (a fresh directory per migration),
    /// removed at the end unless `recover` may need them.
    pub state: crate::images::StateDir,
    /// Keep the images even after a migration or rollback that worked.
    pub keep_images: bool,
    /// Hold the peers' packets during the freeze and deliver them to the
    /// restored sockets right after the release.
    pub hold: bool,
    pub quiet: bool,
}

/// Everything a rollback needs to know about how far we got.
struct Progress {
    lock: Option<MigrationLock>,
    frozen: bool,
    dumped: bool,
    /// We sent the commit: the destination may run the process, so we must
    /// never restore ours unless it says it removed its copy.
    committed: bool,
    /// We asked for the restore and have not heard that the destination
    /// undid it: until this moment (its hand-over deadline) it may still
    /// own the addresses and have announced them.
    destination_may_own: Option<Instant>,
    /// PIDs the tree needs free to be restored (none in its own PID
    /// namespace).
    pids_needed: Vec<i32>,
    /// Addresses removed from the source, with where they were.
    removed: Vec<(ServiceAddress, String, u32)>,
    /// Addresses a rollback put back (and announces).
    reclaimed: Vec<(IpAddr, String)>,
    images: PathBuf,
}

/// Run a migration; the report says how it ended (never panics on the
/// way: every error becomes the report's `error`).
pub async fn migrate(options: MigrateOptions) -> Report {
    let mut clock = PhaseClock::new("source", options.quiet);
    clock.publish_to(crate::watch::phase_file(
        &crate::dataplane::default_pin_root(),
    ));
    let mut report = Report {
        outcome: Outcome::Failed,
        error: None,
        source_pid: options.pid,
        destination: options.to.to_string(),
        destination_pid: None,
        restored_here_pid: None,
        service_addresses: options
            .service_addresses
            .iter()
            .map(ToString::to_string)
            .collect(),
        phases: Vec::new(),
        freeze_window_ms: None,
        total_ms: 0.0,
        image_bytes: 0,
        criu_dump: None,
        criu_restore: None,
        criu_dump_notifications: Vec::new(),
        connections: Vec::new(),
        confirmed_neighbours: Vec::new(),
        unconfirmed_neighbours: Vec::new(),
        images_kept: None,
    };
    let session = match options
        .state
        .new_session(&format!("migrate-{}", options.pid))
    {
        Ok(session) => session,
        Err(err) => {
            report.error = Some(err.to_string());
            return report;
        }
    };
    let images = session.path().to_owned();
    let mut progress = Progress {
        lock: None,
        frozen: false,
        dumped: false,
        committed: false,
        destination_may_own: None,
        pids_needed: Vec::new(),
        removed: Vec::new(),
        reclaimed: Vec::new(),
        images: images.clone(),
    };
    let result = run(&options, &mut clock, &mut report, &mut progress).await;
    match result {
        Ok(()) => report.outcome = Outcome::Migrated,
        Err(error) if progress.committed => {
            // At most one copy: never restore here after the commit. The
            // images and the lock (until its deadline) stay for `recover`.
            report.outcome = Outcome::InDoubt;
            progress.lock = None;
            report.error = Some(format!(
                "{error}; the process now runs on {} or nowhere: check there (the agent's log, `ip addr`); if it does not run there, restore it here before the lock's deadline ({} s) with `migrator recover --images {}`",
                options.to,
                options.deadline.as_secs(),
                images.display()
            ));
        }
        Err(error) => {
            report.error = Some(error);
            if progress.frozen || progress.dumped {
                let phase = clock.begin(report::ROLLBACK);
                let rolled = rollback(&options, &mut progress, &mut clock).await;
                clock.end(phase, rolled.is_ok());
                match rolled {
                    Ok(pid) => {
                        report.outcome = Outcome::RolledBack;
                        report.restored_here_pid = pid;
                    }
                    Err(err) => {
                        // The process is not running anywhere. Keep the lock
                        // (until its deadline) so the peers see a slow network,
                        // not resets, while someone restores from the images.
                        progress.lock = None;
                        report.error = Some(format!(
                            "{}; ROLLBACK FAILED: {err}; the lock stays until its deadline ({} s): restore from the images kept in {} (`migrator recover --images {}`) before then",
                            report.error.take().unwrap_or_default(),
                            options.deadline.as_secs(),
                            images.display(),
                            images.display()
                        ));
                    }
                }
            }
        }
    }
    if let Some(lock) = progress.lock.take() {
        lock.close();
    }
    // Images hold the process's memory: gone once nobody may need them.
    let needed = matches!(report.outcome, Outcome::InDoubt)
        || (matches!(report.outcome, Outcome::Failed) && progress.dumped);
    if needed || options.keep_images {
        report.images_kept = Some(images.display().to_string());
    } else {
        session.remove();
    }
    report.phases = std::mem::take(&mut clock.phases);
    report
        .phases
        .sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    report.total_ms = clock.now_ms();
    report
}

async fn run(
    options: &MigrateOptions,
    clock: &mut PhaseClock,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<(), String> {
    // discover: what the process holds, and that it matches --ip.
    let phase = clock.begin(report::DISCOVER);
    let network = discover::discover(options.pid)
        .map_err(|e| e.to_string())
        .and_then(|n| check_addresses(&n, &options.service_addresses).map(|()| n));
    let network = clock.end_with(phase, network)?;
    // Restoring here after a dump needs the tree's PIDs free again; in a
    // PID namespace of its own the tree gets a fresh namespace instead.
    if !network.own_pid_namespace {
        progress.pids_needed = network.pids.clone();
    }

    // preflight: here (CRIU, interface, addresses) and at the agent.
    let phase = clock.begin(report::PREFLIGHT);
    let prepared = preflight(options, &network).await.and_then(|prepared| {
        // Attach and observe now: loading the programs takes a while and
        // does not belong in the freeze window.
        match MigrationLock::observe(&prepared.iface, &network.connections) {
            Ok(lock) => Ok((prepared, lock)),
            Err(err) => Err(format!(
                "attaching the data plane to {}: {err}",
                prepared.iface
            )),
        }
    });
    let (prepared, lock) = clock.end_with(phase, prepared)?;
    progress.lock = Some(lock);
    let Prepared {
        mut channel,
        netlink,
        addresses: removed_plan,
        ..
    } = prepared;

    // CRIU, started now: its start-up stays outside the freeze window.
    let swrk = options
        .criu
        .swrk(&progress.images)
        .map_err(|e| e.to_string())?;

    // dump, with the freeze at CRIU's "pre-dump" notification: the flows
    // and the service addresses (new SYNs wait too) are locked right before
    // CRIU freezes the tree, and stay locked from there on.
    let phase = clock.begin(report::DUMP);
    let services = ServiceAddress::lock_rules(&options.service_addresses);
    let mut lock = progress.lock.take();
    let (deadline, pid, hold) = (options.deadline, options.pid, options.hold);
    let (criu, images) = (options.criu.clone(), progress.images.clone());
    let (dumped, lock, frozen_at) = tokio::task::spawn_blocking(move || {
        let mut frozen_at = None;
        let mut freeze_once = |_script: &str| {
            // The first notification ("pre-dump") comes before CRIU touches
            // the tree; freeze there.
            if frozen_at.is_none() {
                if let Some(lock) = lock.as_mut() {
                    lock.freeze(&services, deadline, hold)
                        .map_err(|e| format!("locking the flows: {e}"))?;
                }
                frozen_at = Some(Instant::now());
            }
            Ok(())
        };
        let mut result = swrk.dump(pid, &mut freeze_once);
        // A failed dump leaves the tree running (CRIU resumes it). Some
        // failures are passing (seen here: the parasite failing to read
        // /proc/self/cgroup), so try once more, still frozen, from an
        // empty images directory.
        if result.is_err() && clear_dir(&images).is_ok() {
            tracing::warn!(
                "criu dump failed, retrying once: {:?}",
                result.as_ref().err()
            );
            result = criu
                .swrk(&images)
                .and_then(|swrk| swrk.dump(pid, &mut freeze_once));
        }
        (result, lock, frozen_at)
    })
    .await
    .map_err(|e| e.to_string())?;
    progress.lock = lock;
    progress.frozen = frozen_at.is_some();
    if let Some(at) = frozen_at {
        let start_ms = at.duration_since(clock.started()).as_secs_f64() * 1e3;
        clock.record_quiet(report::Phase {
            name: report::FREEZE.to_owned(),
            host: "source".to_owned(),
            start_ms,
            duration_ms: 0.0,
            ok: true,
        });
    }
    let frozen_at = frozen_at.unwrap_or_else(Instant::now);
    // Every wait on the agent from now on ends early enough to roll back
    // (or hand over) before our lock fails open.
    let margin = crate::agent::handover_margin(options.deadline);
    let handover_by = frozen_at + options.deadline.saturating_sub(margin);
    channel.set_hard_deadline(handover_by);
    // CRIU resumes the tree when a dump fails: only the lock to undo.
    let outcome = clock.end_with(phase, dumped.map_err(|err| format!("dump: {err}")))?;
    progress.dumped = true;
    report.criu_dump_notifications = outcome.notifications;
    report.criu_dump = read_dump_stats(&progress.images);

    // transfer
    let phase = clock.begin(report::TRANSFER);
    let sent = send_images(&mut channel, &progress.images)
        .await
        .map_err(|err| format!("transfer: {err}"));
    report.image_bytes = clock.end_with(phase, sent)?;

    // ip-release: the old host stops owning the service addresses.
    let phase = clock.begin(report::IP_RELEASE);
    for (address, iface_name, index) in removed_plan {
        match netlink.remove(address.ip).await {
            Ok(_) => progress.removed.push((address, iface_name, index)),
            Err(err) => {
                clock.end(phase, false);
                return Err(format!("ip-release: {err}"));
            }
        }
    }
    let packets_at_ip_release: Vec<u64> = progress
        .lock
        .as_ref()
        .map(|lock| lock.counters().iter().map(|(_, s)| s.packets_in).collect())
        .unwrap_or_default();
    clock.end(phase, true);

    // Held packets go with the restore request: the agent delivers them
    // to the restored sockets right after its release.
    if options.hold {
        let held = progress
            .lock
            .as_mut()
            .map(MigrationLock::drain_held)
            .unwrap_or_default();
        let sent: Result<(), ChannelError> = async {
            channel
                .send(&Message::Held {
                    count: held.len() as u64,
                })
                .await?;
            for packet in &held {
                channel
                    .send_data(bytes::Bytes::copy_from_slice(&packet.frame))
                    .await?;
            }
            Ok(())
        }
        .await;
        sent.map_err(|e| format!("sending held packets: {e}"))?;
    }

    // restore, announce, confirm: at the agent, which then waits,
    // the process stopped and the lock on, for our commit.
    clock.publish("restore (destination)");
    let asked_at_ms = clock.now_ms();
    progress.destination_may_own = Some(handover_by);
    channel
        .send(&Message::Restore)
        .await
        .map_err(|e| format!("asking for the restore: {e}"))?;
    match channel.receive_before(Some(handover_by)).await {
        Ok(Message::Ready) => {}
        Ok(Message::Failed { phase, reason }) => {
            // It undid everything (addresses included) before answering.
            progress.destination_may_own = None;
            return Err(format!(
                "destination {}: {}",
                channel::printable(&phase),
                channel::printable(&reason)
            ));
        }
        Ok(Message::Refused { reason }) => {
            progress.destination_may_own = None;
            return Err(format!(
                "destination refused: {}",
                channel::printable(&reason)
            ));
        }
        Ok(other) => return Err(format!("destination answered {}", other.name())),
        // The agent resumes nothing without our commit, and removes its
        // copy when we hang up: rolling back is safe.
        Err(err) => return Err(format!("destination not ready for the hand-over: {err}")),
    }
    // The commit: from here on the process is the destination's.
    progress.committed = true;
    let answer = match channel.send(&Message::Commit).await {
        Ok(()) => channel.receive().await,
        Err(err) => Err(err),
    };
    let mut reply: RestoreReply = match answer {
        Ok(Message::Restored(reply)) => *reply,
        Ok(Message::Failed { phase, reason }) => {
            // It says its copy is gone: ours may run again.
            progress.committed = false;
            progress.destination_may_own = None;
            return Err(format!(
                "destination {}: {}",
                channel::printable(&phase),
                channel::printable(&reason)
            ));
        }
        Ok(other) => {
            return Err(format!(
                "after the commit the destination answered {}",
                other.name()
            ));
        }
        Err(err) => return Err(format!("after the commit: {err}")),
    };
    let answered = Instant::now();
    for mut phase in std::mem::take(&mut reply.phases) {
        phase.start_ms += asked_at_ms;
        phase.name = channel::printable(&phase.name);
        phase.host = "destination".to_owned();
        clock.record(phase);
    }
    // The agent's numbers are checked, not trusted: a hostile or broken
    // reply must not make arithmetic panic here.
    let released_at = Duration::try_from_secs_f64(reply.since_release_ms / 1e3)
        .ok()
        .and_then(|ago| answered.checked_sub(ago))
        .unwrap_or(answered);
    report.freeze_window_ms = Some(
        released_at
            .saturating_duration_since(frozen_at)
            .as_secs_f64()
            * 1e3,
    );
    report.destination_pid = Some(reply.pid);
    report.criu_restore = reply.criu_restore.take();
    report.confirmed_neighbours = std::mem::take(&mut reply.confirmed);
    report.unconfirmed_neighbours = std::mem::take(&mut reply.unconfirmed);

    // Stale packets: peers still sending to the old host after it gave
    // up the address (keep counting a moment after the release).
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(lock) = progress.lock.as_ref() {
        for (i, (flow, stats)) in lock.counters().into_iter().enumerate() {
            let name = flow.to_string();
            let destination = reply.connections.iter().find(|c| c.flow == name);
            report.connections.push(ConnectionReport {
                local: flow.local.to_string(),
                remote: flow.remote.to_string(),
                peer_retransmits_source: stats.peer_retransmits,
                peer_retransmits_destination: destination.map_or(0, |c| c.peer_retransmits),
                stale_packets_source: stats
                    .packets_in
                    .saturating_sub(packets_at_ip_release.get(i).copied().unwrap_or(0)),
                held_delivered: reply
                    .held_delivered
                    .iter()
                    .find(|(held_flow, _)| *held_flow == name)
                    .map_or(0, |(_, count)| *count),
            });
        }
    }
    Ok(())
}

/// Remove the files in `dir`, keeping the directory (an open fd may name
/// it).
fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Every connection must use a given service address, and every given
/// address must be in use: otherwise the move would break a connection
/// or the user named the wrong address.
fn check_addresses(
    network: &discover::ProcessNetwork,
    addresses: &[ServiceAddress],
) -> Result<(), String> {
    if network.connections.is_empty() && network.listening.is_empty() {
        return Err(format!(
            "process {} (and its {} descendants) has no TCP connections or listening sockets: nothing to move with migrator",
            network.pids[0],
            network.pids.len() - 1
        ));
    }
    let given: BTreeSet<IpAddr> = addresses.iter().map(|a| a.ip).collect();
    let used = network.local_addresses();
    if let Some(flow) = network
        .connections
        .iter()
        .find(|flow| !given.contains(&flow.local.ip()))
    {
        return Err(format!(
            "connection {flow} uses local address {}, which is not a service address given with --ip: it could not survive the move (give --ip {} if that address moves too)",
            flow.local.ip(),
            flow.local.ip()
        ));
    }
    if let Some(unused) = given.iter().find(|ip| !used.contains(ip)) {
        return Err(format!(
            "service address {unused} is not used by any socket of process {}; it uses {}",
            network.pids[0],
            used.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// What preflight leaves ready: the authenticated agent connection, a
/// netlink handle, the interface to lock on, and where each service
/// address lives (to remove it later, and put it back on a rollback).
struct Prepared {
    channel: TlsChannel,
    netlink: Netlink,
    iface: String,
    addresses: Vec<(ServiceAddress, String, u32)>,
}

async fn preflight(
    options: &MigrateOptions,
    network: &discover::ProcessNetwork,
) -> Result<Prepared, String> {
    options
        .criu
        .supported_version()
        .map_err(|e| format!("{e}; {}", e.fix()))?;
    refuse_what_criu_would(&network.pids)?;
    let netlink = Netlink::connect().map_err(|e| e.to_string())?;
    let mut plan = Vec::new();
    for address in &options.service_addresses {
        let (found, name) = netlink
            .holder(address.ip)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "service address {} is not assigned on this host (see `ip addr`)",
                    address.ip
                )
            })?;
        plan.push((*address, name, found.index));
    }
    let iface = match &options.iface {
        Some(iface) => {
            netlink.link_index(iface).await.map_err(|e| e.to_string())?;
            iface.clone()
        }
        None => plan
            .first()
            .map(|(_, name, _)| name.clone())
            .ok_or("no service address given (--ip)")?,
    };

    let identity = crate::system::pid_namespace_identity();
    let mut channel = channel::connect(
        options.to,
        options.server_name.as_deref(),
        &options.credentials,
        CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| format!("agent {}: {e}", options.to))?;
    channel
        .send(&Message::Preflight(PreflightRequest {
            pids: network.pids.clone(),
            own_pid_namespace: network.own_pid_namespace,
            service_addresses: options.service_addresses.clone(),
            flows: network
                .connections
                .iter()
                .map(FlowSpec::to_string)
                .collect(),
            deadline_ms: options.deadline.as_millis() as u64,
            hold: options.hold,
            boot_id: identity.0.clone(),
            pid_namespace: identity.1,
        }))
        .await
        .map_err(|e| e.to_string())?;
    match channel.receive().await.map_err(|e| e.to_string())? {
        Message::PreflightOk(_) => {}
        Message::Refused { reason } => {
            return Err(format!("agent refused: {}", channel::printable(&reason)));
        }
        other => return Err(format!("agent answered {}", other.name())),
    }
    Ok(Prepared {
        channel,
        netlink,
        iface,
        addresses: plan,
    })
}

/// CRIU has no dry run of a dump: check the refusals users meet most
/// here, before anything is frozen, rather than fail mid-dump.
fn refuse_what_criu_would(pids: &[i32]) -> Result<(), String> {
    const SHOWN: usize = 5;
    let caps = crate::system::effective_capabilities().unwrap_or(0);
    let has_sys_resource = crate::system::has_capability(caps, crate::system::CAP_SYS_RESOURCE);
    let refusals = crate::criu::precheck::check_pids(pids, has_sys_resource);
    if refusals.is_empty() {
        return Ok(());
    }
    let mut reasons: Vec<String> = refusals
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect();
    if refusals.len() > SHOWN {
        reasons.push(format!("and {} more", refusals.len() - SHOWN));
    }
    Err(format!(
        "CRIU would refuse to dump this process tree (nothing was frozen): {}",
        reasons.join("; ")
    ))
}

async fn send_images(channel: &mut TlsChannel, dir: &Path) -> Result<u64, ChannelError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        bytes += channel.send_file(&entry.path(), &name).await?;
        files += 1;
    }
    channel.send(&Message::FilesDone { files, bytes }).await?;
    match channel.receive().await? {
        Message::FilesOk => Ok(bytes),
        Message::Refused { reason } => Err(ChannelError::Refused(channel::printable(&reason))),
        other => Err(ChannelError::Unexpected {
            expected: "files-ok",
            got: other.name(),
        }),
    }
}

/// Put the process back here: addresses, CRIU restore from our images if
/// it was dumped, lock released.
/// Returns the PID of the process restored here, if it had been dumped.
async fn rollback(
    options: &MigrateOptions,
    progress: &mut Progress,
    clock: &mut PhaseClock,
) -> Result<Option<i32>, String> {
    let mut restored = None;
    if !progress.removed.is_empty() {
        let netlink = Netlink::connect().map_err(|e| e.to_string())?;
        for (address, iface, index) in progress.removed.drain(..) {
            netlink
                .add(&iface, index, address.ip, address.prefix)
                .await
                .map_err(|e| format!("re-adding {address}: {e}"))?;
            progress.reclaimed.push((address.ip, iface));
        }
        // The destination may have announced the addresses already: win
        // the peers' neighbour caches back.
        announce_again(progress.reclaimed.clone()).await;
    }
    if progress.dumped {
        // The dumped tree's PIDs come free once its parent reaps it, and a
        // copy the destination restored and undid once the agent reaps it.
        if !progress.pids_needed.is_empty() {
            let phase = clock.begin(report::PID_WAIT);
            let pids = progress.pids_needed.clone();
            let waited = tokio::task::spawn_blocking(move || {
                crate::system::wait_for_free_pids(&pids, crate::system::PID_WAIT_LIMIT)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|taken| {
                format!(
                    "restoring here: {} still taken",
                    crate::system::describe_pids(&taken)
                )
            });
            clock.end_with(phase, waited)?;
        }
        let criu = options.criu.clone();
        let dir = progress.images.clone();
        let outcome = tokio::task::spawn_blocking(move || criu.restore(&dir, |_| Ok(())))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("restoring here: {e}"))?;
        restored = outcome.pid;
        progress.dumped = false;
    }
    if let Some(mut lock) = progress.lock.take() {
        let released = lock
            .release()
            .map_err(|e| format!("releasing the lock: {e}"));
        lock.close();
        released?;
    }
    // A destination we lost touch with keeps the addresses (announced)
    // until its hand-over deadline, then removes them: announce once more
    // after it, or the peers keep sending there.
    if let Some(until) = progress.destination_may_own.take()
        && !progress.reclaimed.is_empty()
    {
        let phase = clock.begin(report::RECLAIM);
        tokio::time::sleep_until((until + Duration::from_millis(200)).into()).await;
        announce_again(progress.reclaimed.clone()).await;
        clock.end(phase, true);
    }
    Ok(restored)
}

/// Announce addresses we own again (best effort: the peers also re-learn
/// on their own, only slower).
async fn announce_again(addresses: Vec<(IpAddr, String)>) {
    let _ = tokio::task::spawn_blocking(move || {
        for (ip, iface) in addresses {
            match crate::net::announce::Link::open(&iface) {
                Ok(mut link) => {
                    for _ in 0..2 {
                        if let Err(err) = link.announce(ip) {
                            tracing::warn!("announcing {ip} again on {iface}: {err}");
                        }
                    }
                }
                Err(err) => tracing::warn!("announcing {ip} again on {iface}: {err}"),
            }
        }
    })
    .await;
}
