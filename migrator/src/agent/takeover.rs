//! Owning the service address with the restored process, in two steps
//! that the hand-over separates. `take_over`: add the address, restore
//! with CRIU leaving the tree stopped, check its connections, announce,
//! and confirm the neighbours answer here. `TakenOver::hand_over`, only
//! after the source's commit: resume the tree, release the lock, deliver
//! the held packets.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use tracing::warn;

use super::{AgentConfig, session::Session};
use crate::{
    channel::message::{PreflightRequest, RestoreReply, ServiceAddress},
    criu::stats::read_restore_stats,
    dataplane::spec::FlowSpec,
    net::{address::Netlink, announce::Link},
    report::{self, ConnectionCounters, PhaseClock},
};

/// How long a neighbour gets to answer a probe from the new owner.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
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
}

pub async fn take_over(
    config: &AgentConfig,
    images: &Path,
    request: &PreflightRequest,
    netlink: &Netlink,
    session: &mut Session,
) -> Result<TakenOver, PhaseError> {
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
    if crate::fault::fires(crate::fault::RESTORE_FAILS) {
        return Err((
            report::RESTORE,
            "injected fault: the restore fails".to_owned(),
        ));
    }
    // Stopped: it runs only after the hand-over.
    let outcome = tokio::task::spawn_blocking(move || swrk.restore_stopped(|_| Ok(())))
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
    let addresses = request.service_ips();
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

    Ok(TakenOver {
        pid,
        clock,
        hold: request.hold,
        confirmed,
        unconfirmed,
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
