//! Owning the service address with the restored process, in two steps
//! that the hand-over separates. `take_over`: add the address, restore
//! with CRIU leaving the tree stopped, check its connections, announce,
//! and confirm the neighbours answer here. `TakenOver::hand_over`, only
//! after the source's commit: resume the tree, release the lock, deliver
//! the held packets.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use tracing::warn;

use super::{AgentConfig, session::Session};
use crate::{
    channel::message::{PreflightRequest, RestoreReply, Takeover},
    criu::{
        lazy::{LazyError, LazyPages},
        stats::read_restore_stats,
    },
    dataplane::spec::FlowSpec,
    net::{address::Netlink, announce::Link},
    report::{self, ConnectionCounters, PeerConvergence, PhaseClock},
};

/// How long a peer that answered the source's echo before the move gets
/// to answer ours: its neighbour cache or the routes must have moved here.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that never answered echo is probed this long, then reported
/// unconfirmed (released on timeout).
const SILENT_PEER_WAIT: Duration = Duration::from_millis(200);
const ECHO_EVERY: Duration = Duration::from_millis(5);
/// Announcements per address.
const ANNOUNCEMENTS: usize = 3;

pub type PhaseError = (&'static str, String);

/// Restored, stopped, owning the address and confirmed by the neighbours;
/// the lock still holds every packet.
pub struct TakenOver {
    pid: i32,
    clock: PhaseClock,
    hold: bool,
    confirmed: Vec<String>,
    unconfirmed: Vec<String>,
    convergence: Vec<PeerConvergence>,
}

pub async fn take_over(
    config: &AgentConfig,
    images: &Path,
    request: &PreflightRequest,
    expected: &[String],
    netlink: &Netlink,
    session: &mut Session,
    lazy: Option<tokio::task::JoinHandle<Result<LazyPages, LazyError>>>,
) -> Result<TakenOver, PhaseError> {
    // Times from the restore request on; the source places them on its
    // own timeline.
    let mut clock = PhaseClock::new("destination", true);

    // On the link itself (L2), or on the one BIRD announces from (BGP:
    // adding the address is the announcement).
    let bgp = match request.takeover {
        Takeover::Bgp => config.bgp.as_ref(),
        Takeover::L2 => None,
    };
    let link = bgp.map_or(&config.iface, |bgp| &bgp.link);
    let phase = clock.begin(report::IP_TAKEOVER);
    let index = netlink
        .link_index(link)
        .await
        .map_err(|e| (report::IP_TAKEOVER, e.to_string()))?;
    for address in &request.service_addresses {
        netlink
            .add(link, index, address.ip, address.prefix)
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

    // A lazy restore's daemon must listen before CRIU restores.
    if let Some(starting) = lazy {
        let phase = clock.begin(report::LAZY_PAGES_START);
        let started = starting
            .await
            .map_err(|e| e.to_string())
            .and_then(|started| started.map_err(|e| e.to_string()));
        clock.end(phase, started.is_ok());
        session.lazy = Some(started.map_err(|e| (report::LAZY_PAGES_START, e))?);
    }

    let phase = clock.begin(report::RESTORE);
    // Its kernel probes from the cache, not run here (25-30 ms).
    if let Some(Err(why)) = config
        .kdat
        .as_ref()
        .map(crate::criu::kdat::KdatCache::publish)
    {
        warn!("the restore's CRIU probes the kernel inside the freeze window: {why}");
    }
    let swrk = match session.swrk.take() {
        Some(swrk) => swrk,
        None => config
            .criu
            .swrk(images)
            .map_err(|e| (report::RESTORE, e.to_string()))?,
    };
    if crate::fault::fires(crate::fault::RESTORE_FAILS) {
        return Err((
            report::RESTORE,
            "injected fault: the restore fails".to_owned(),
        ));
    }
    // Stopped: it runs only after the hand-over.
    let lazy = session.lazy.is_some();
    let outcome = tokio::task::spawn_blocking(move || swrk.restore_stopped(lazy, |_| Ok(())))
        .await
        .map_err(|e| (report::RESTORE, e.to_string()))?
        .map_err(|e| (report::RESTORE, e.to_string()))?;
    let pid = outcome
        .pid
        .ok_or((report::RESTORE, "CRIU reported no PID".to_owned()))?;
    session.restored_pid = Some(pid);
    // Lazily restored: from now on a missing page must never read as
    // zeros, whatever happens to the daemon that fills them.
    if let Some(lazy) = session.lazy.as_mut() {
        lazy.guard().map_err(|e| {
            (
                report::RESTORE,
                format!("guarding the lazy restore's userfaultfds: {e}"),
            )
        })?;
        // The injected faults: the daemon dies now, before we are ready,
        // or is killed at the release, the memory not filled (after the
        // release it raced the fill of a small process, and sometimes
        // lost). A daemon filling from local images is stopped now, for
        // it would fill 64 MiB in 10 ms; with post-copy its requests are
        // no longer relayed (a stopped one would hold up the request we
        // may be relaying).
        if crate::fault::fires(crate::fault::LAZY_PAGES_DIES) {
            lazy.signal_for_fault(libc::SIGKILL);
        } else if crate::fault::fires(crate::fault::LAZY_PAGES_DIES_AT_RELEASE) {
            if !request.post_copy {
                lazy.signal_for_fault(libc::SIGSTOP);
            }
            session.kill_daemon_at_release = true;
        }
    }
    // Every connection dumped must be back, established, in the restored
    // tree: CRIU succeeding is not proof enough to release.
    let expected: BTreeSet<String> = expected.iter().cloned().collect();
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

    // Announce, then prove the peers' packets for the service address
    // come here: an echo from the address to each peer, answered here.
    let phase = clock.begin(report::ANNOUNCE);
    let announced_at = Instant::now();
    // With BGP, BIRD announced the addresses the moment they were added.
    if bgp.is_none() {
        let iface = config.iface.clone();
        let addresses = request.service_ips();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut link = Link::open(&iface).map_err(|e| e.to_string())?;
            let announced = (0..ANNOUNCEMENTS).try_for_each(|_| {
                addresses
                    .iter()
                    .try_for_each(|ip| link.announce(*ip).map_err(|e| e.to_string()))
            });
            // Closing a packet socket waits for an RCU grace period (about
            // 10 ms here): not inside the freeze window.
            std::thread::spawn(move || drop(link));
            announced
        })
        .await
        .map_err(|e| (report::ANNOUNCE, e.to_string()))?
        .map_err(|e| (report::ANNOUNCE, e))?;
    }
    clock.end(phase, true);

    let phase = clock.begin(report::ROUTE_CONVERGENCE);
    let convergence = converge(request, announced_at)
        .await
        .map_err(|e| (report::ROUTE_CONVERGENCE, e))?;
    let late: Vec<&str> = convergence
        .iter()
        .filter(|peer| peer.answered_before && peer.answered_after_ms.is_none())
        .map(|peer| peer.peer.as_str())
        .collect();
    clock.end(phase, late.is_empty());
    if !late.is_empty() {
        return Err((
            report::ROUTE_CONVERGENCE,
            format!(
                "peers {} answered the source's echo before the move but not this host's within {:?}: their packets for the service address still go elsewhere (a neighbour cache or route not updated)",
                late.join(", "),
                CONVERGENCE_TIMEOUT
            ),
        ));
    }
    let confirmed = convergence
        .iter()
        .filter(|peer| peer.answered_after_ms.is_some())
        .map(|peer| peer.peer.clone())
        .collect();
    let unconfirmed = convergence
        .iter()
        .filter(|peer| peer.answered_after_ms.is_none())
        .map(|peer| peer.peer.clone())
        .collect();

    Ok(TakenOver {
        pid,
        clock,
        hold: request.hold,
        confirmed,
        unconfirmed,
        convergence,
    })
}

impl TakenOver {
    /// The source committed: resume the tree, release the lock, deliver
    /// the held packets (the source's, older, then ours).
    pub fn hand_over(
        mut self,
        session: &mut Session,
        source_held: Vec<bytes::Bytes>,
        waited_from: Instant,
        images: &Path,
    ) -> Result<RestoreReply, PhaseError> {
        let clock = &mut self.clock;
        clock.record_since(report::HANDOVER, waited_from);
        let phase = clock.begin(report::RELEASE);
        crate::system::resume_tree(self.pid);
        let lock = session
            .lock
            .as_mut()
            .ok_or((report::RELEASE, "no lock".to_owned()))?;
        let counters = lock.counters();
        lock.release()
            .map_err(|e| (report::RELEASE, e.to_string()))?;
        clock.end(phase, true);

        let delivered = if self.hold {
            let phase = clock.begin(report::DELIVER_HELD);
            let mut frames = source_held;
            frames.extend(
                lock.drain_held()
                    .into_iter()
                    .map(|packet| bytes::Bytes::from(packet.frame)),
            );
            let delivered = deliver_held(&frames, clock);
            clock.end(phase, true);
            delivered
        } else {
            Delivered::default()
        };
        let released_at = Instant::now();
        let raw = lock.drain_events();
        let mut events =
            report::connection_events(&raw, lock.flows(), "destination", clock.now_ms());
        events.extend(delivered.events);
        events.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        events.truncate(report::MAX_EVENTS_PER_HOST);

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
            pid: self.pid,
            phases: std::mem::take(&mut clock.phases),
            since_release_ms: released_at.elapsed().as_secs_f64() * 1e3,
            criu_restore: read_restore_stats(images),
            connections,
            confirmed: self.confirmed,
            unconfirmed: self.unconfirmed,
            route_convergence: self.convergence,
            held_delivered: delivered.per_flow,
            syns_delivered: delivered.syns,
            events,
        })
    }
}

/// Inject held frames into the local stack; count per flow, and note
/// when each went in. A packet that cannot be delivered is only lost the
/// way a dropped one is: the peer retransmits it.
/// What was delivered: held packets per migrating flow, their events, and
/// the new clients' SYNs.
#[derive(Default)]
struct Delivered {
    per_flow: Vec<(String, u64)>,
    events: Vec<report::ConnectionEvent>,
    syns: u64,
}

fn deliver_held(frames: &[bytes::Bytes], clock: &PhaseClock) -> Delivered {
    let injector = match crate::net::inject::Injector::open() {
        Ok(injector) => injector,
        Err(err) => {
            warn!("held packets not delivered: {err}");
            return Delivered::default();
        }
    };
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut events = Vec::new();
    let mut syns = 0;
    for frame in frames {
        match injector.deliver(frame) {
            // A new client's first segment: its connection is not one of
            // the migration's, and it needs no lane of its own.
            Ok(Some((_, true))) => syns += 1,
            Ok(Some((flow, false))) => {
                *counts.entry(flow.to_string()).or_default() += 1;
                events.push(report::ConnectionEvent {
                    connection: flow.to_string(),
                    host: "destination".to_owned(),
                    at_ms: clock.now_ms(),
                    kind: "held-delivered".to_owned(),
                    direction: "in".to_owned(),
                });
            }
            Ok(None) => {}
            Err(err) => warn!("a held packet was not delivered: {err}"),
        }
    }
    Delivered {
        per_flow: counts.into_iter().collect(),
        events,
        syns,
    }
}

/// Probe every peer of the moving connections from the service address
/// until it answers here: required for those that answered the source's
/// probe before the move, a short try for the others. Times from the
/// announcement.
async fn converge(
    request: &PreflightRequest,
    announced_at: Instant,
) -> Result<Vec<PeerConvergence>, String> {
    let probes = request.peer_probes();
    let required: Vec<bool> = probes
        .iter()
        .map(|probe| request.echo_peers.contains(&probe.peer))
        .collect();
    let since_announce = announced_at.elapsed();
    let (probes, required, answers) = tokio::task::spawn_blocking(move || {
        crate::net::roundtrip::round_trips(
            &probes,
            &required,
            CONVERGENCE_TIMEOUT,
            SILENT_PEER_WAIT,
            ECHO_EVERY,
        )
        .map(|answers| (probes, required, answers))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("probing the peers from the service address: {e}"))?;
    Ok(probes
        .iter()
        .zip(required)
        .zip(answers)
        .map(|((probe, answered_before), answer)| PeerConvergence {
            peer: probe.peer.to_string(),
            answered_after_ms: answer.map(|after| (since_announce + after).as_secs_f64() * 1e3),
            answered_before,
            waited_ms: if answered_before {
                CONVERGENCE_TIMEOUT
            } else {
                SILENT_PEER_WAIT
            }
            .as_secs_f64()
                * 1e3,
        })
        .collect())
}
