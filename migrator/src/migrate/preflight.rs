//! Before anything is touched: the tree's connections against `--ip`,
//! what CRIU would refuse, the addresses here, the agent reachable,
//! proven and agreeing; then the data plane attached in observe mode (its
//! loading does not belong in the freeze window).

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use super::{MigrateOptions, Progress};
use crate::{
    channel::{
        self, Message, TlsChannel,
        message::{PreflightRequest, ServiceAddress, Takeover},
    },
    dataplane::{lock::MigrationLock, spec::FlowSpec},
    net::{address::Netlink, discover},
    report::{self, HostInfo, PhaseClock},
};

/// TCP connect, TLS handshake and proofs, all together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the peers get to answer the source's echo before the move.
const ECHO_BEFORE_THE_MOVE: Duration = Duration::from_millis(500);
const ECHO_EVERY: Duration = Duration::from_millis(50);

pub(super) async fn prepare(
    options: &MigrateOptions,
    network: &discover::ProcessNetwork,
    clock: &mut PhaseClock,
    progress: &mut Progress,
) -> Result<Prepared, String> {
    // preflight: here (CRIU, interface, addresses) and at the agent.
    let phase = clock.begin(report::PREFLIGHT);
    let prepared = preflight(options, network, progress)
        .await
        .and_then(|prepared| {
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
    // For watchers (and the fault matrix): checked, nothing frozen yet.
    clock.publish("prepared");
    Ok(prepared)
}

/// Every connection must use a given service address, and every given
/// address must be in use: otherwise the move would break a connection
/// or the user named the wrong address.
pub(super) fn check_addresses(
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
pub(super) struct Prepared {
    pub channel: TlsChannel,
    pub netlink: Netlink,
    pub iface: String,
    pub addresses: Vec<(ServiceAddress, String, u32)>,
    /// Both hosts as they describe themselves, for the report.
    pub source_host: HostInfo,
    pub destination_host: HostInfo,
    /// The agent takes the dump's pages as they are dumped.
    pub page_stream: bool,
    /// Where the agent keeps this session's images.
    pub destination_images: String,
}

async fn preflight(
    options: &MigrateOptions,
    network: &discover::ProcessNetwork,
    progress: &Progress,
) -> Result<Prepared, String> {
    let criu_version = options
        .criu
        .supported_version()
        .map_err(|e| format!("{e}; {}", e.fix()))?;
    refuse_what_criu_would(&network.pids)?;
    let image_bytes = crate::system::resident_bytes(&network.pids);
    crate::images::check_room(&progress.images, image_bytes, progress.images_in_memory)
        .map_err(|why| format!("no room for the images here: {why}"))?;
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
    let mut request = PreflightRequest {
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
        page_stream: options.page_stream,
        lazy_restore: options.lazy_restore,
        post_copy: options.post_copy,
        boot_id: identity.0.clone(),
        pid_namespace: identity.1,
        image_bytes,
        echo_peers: Vec::new(),
        takeover: options.takeover,
    };
    // With BGP our BIRD withdraws the addresses when they go: its
    // sessions must be up (and again if we must take them back).
    if options.takeover == Takeover::Bgp {
        let socket = options.bird_socket.clone();
        tokio::task::spawn_blocking(move || crate::net::bird::check_sessions(&socket))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|why| format!("this host cannot withdraw the addresses: {why}"))?;
    }
    // Which peers answer an echo from the service address while it is
    // still ours: the destination proves it owns the address by hearing
    // them too.
    let probes = request.peer_probes();
    let answers = tokio::task::spawn_blocking(move || {
        let required = vec![true; probes.len()];
        crate::net::roundtrip::round_trips(
            &probes,
            &required,
            ECHO_BEFORE_THE_MOVE,
            ECHO_BEFORE_THE_MOVE,
            ECHO_EVERY,
        )
        .map(|answers| (probes, answers))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("probing the peers from the service address: {e}"))?;
    request.echo_peers = answers
        .0
        .iter()
        .zip(answers.1)
        .filter(|(_, answer)| answer.is_some())
        .map(|(probe, _)| probe.peer)
        .collect();
    let mut channel = channel::connect(
        options.to,
        options.server_name.as_deref(),
        &options.credentials,
        CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| format!("agent {}: {e}", options.to))?;
    channel
        .send(&Message::Preflight(request))
        .await
        .map_err(|e| e.to_string())?;
    let (destination_host, page_stream, destination_images) =
        match channel.receive().await.map_err(|e| e.to_string())? {
            Message::PreflightOk(reply) => {
                let mut host = reply.host;
                // Printed later: text from the other side, escaped.
                for field in [
                    &mut host.hostname,
                    &mut host.kernel,
                    &mut host.criu_version,
                    &mut host.migrator_version,
                ] {
                    *field = channel::printable(field);
                }
                (host, reply.page_stream, channel::printable(&reply.images))
            }
            Message::Refused { reason } => {
                return Err(format!("agent refused: {}", channel::printable(&reason)));
            }
            other => return Err(format!("agent answered {}", other.name())),
        };
    Ok(Prepared {
        channel,
        netlink,
        iface,
        addresses: plan,
        source_host: HostInfo::here(criu_version.to_string()),
        destination_host,
        page_stream,
        destination_images,
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
