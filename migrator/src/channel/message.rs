//! Control messages, as JSON. One enum for both directions keeps the
//! protocol readable in one place.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    criu::stats::RestoreStats,
    report::{ConnectionCounters, Phase},
};

/// A service address with its prefix length, as `--ip` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddress {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl ServiceAddress {
    /// The lock rule for all TCP of these addresses (every port).
    pub fn lock_rules(addresses: &[Self]) -> Vec<migrator_common::ServiceKey> {
        addresses
            .iter()
            .map(|address| {
                crate::dataplane::spec::ServiceSpec {
                    ip: address.ip,
                    port: None,
                }
                .key()
            })
            .collect()
    }
}

impl std::fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl std::str::FromStr for ServiceAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("`{text}`: expected IP or IP/PREFIX"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: prefix must be 0..={max}"))?,
        };
        Ok(Self { ip, prefix })
    }
}

/// What the source asks the agent to check before anything is frozen.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreflightRequest {
    pub pids: Vec<i32>,
    pub own_pid_namespace: bool,
    pub service_addresses: Vec<ServiceAddress>,
    /// Four-tuples as `LOCAL=REMOTE`, local being the service side.
    pub flows: Vec<String>,
    /// How long the destination's lock may stay on before failing open.
    pub deadline_ms: u64,
    /// Hold (not only drop) peer packets, to deliver them after release.
    #[serde(default)]
    pub hold: bool,
    /// The source would stream the dump's pages (the agent declines when
    /// both share PIDs).
    #[serde(default)]
    pub page_stream: bool,
    /// Restore lazily: CRIU leaves the private memory to a `criu
    /// lazy-pages` daemon that fills it from the images there after the
    /// release (`migrate --lazy-restore`).
    #[serde(default)]
    pub lazy_restore: bool,
    /// With the lazy restore: the lazy pages are not in the images; the
    /// daemon asks the source for them after the release
    /// (`migrate --post-copy`).
    #[serde(default)]
    pub post_copy: bool,
    /// The source's boot id and PID namespace: equal to the agent's when
    /// both run on one machine in one PID namespace (then the tree's PIDs
    /// are its own until the dump, and the agent waits for them).
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub pid_namespace: u64,
    /// About how many bytes of images the dump will make (the tree's
    /// resident memory): the agent refuses at once if they cannot fit.
    #[serde(default)]
    pub image_bytes: u64,
    /// The peers that answered the source's ICMP echo from the service
    /// address before the move: the destination must hear them too before
    /// it may release (the others cannot prove anything either way).
    #[serde(default)]
    pub echo_peers: Vec<std::net::IpAddr>,
    /// How the destination takes the addresses over.
    #[serde(default)]
    pub takeover: Takeover,
}

/// How a host comes to own a service address.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Takeover {
    /// The peers share the link: the address goes on the interface and is
    /// announced with gratuitous ARP and unsolicited neighbour
    /// advertisements.
    #[default]
    L2,
    /// A routed network: the address goes on the link a BIRD on the host
    /// announces addresses from (its `direct` protocol) as host routes to
    /// its BGP neighbours; removing it withdraws them.
    Bgp,
}

impl PreflightRequest {
    /// Each distinct peer of the moving connections, with the service
    /// address of its family to probe it from.
    pub fn peer_probes(&self) -> Vec<crate::net::roundtrip::Probe> {
        let mut probes: Vec<crate::net::roundtrip::Probe> = Vec::new();
        for flow in self
            .flows
            .iter()
            .filter_map(|f| f.parse::<crate::dataplane::spec::FlowSpec>().ok())
        {
            let peer = flow.remote.ip();
            let from = self
                .service_addresses
                .iter()
                .find(|s| s.ip.is_ipv4() == peer.is_ipv4());
            if let Some(from) = from
                && !probes.iter().any(|p| p.peer == peer)
            {
                probes.push(crate::net::roundtrip::Probe {
                    from: from.ip,
                    peer,
                });
            }
        }
        probes
    }

    /// The service addresses that move, as plain IPs.
    pub fn service_ips(&self) -> Vec<std::net::IpAddr> {
        self.service_addresses.iter().map(|a| a.ip).collect()
    }

    /// Whether the agent (with this identity) shares PIDs with the source.
    pub fn shares_pids_with(&self, (boot_id, pid_namespace): &(String, u64)) -> bool {
        !self.boot_id.is_empty() && self.boot_id == *boot_id && self.pid_namespace == *pid_namespace
    }

    /// PIDs the restore needs free (none for a tree in its own PID
    /// namespace: CRIU makes a new one).
    pub fn pids_needed(&self) -> &[i32] {
        if self.own_pid_namespace {
            &[]
        } else {
            &self.pids
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreflightReply {
    pub criu_version: String,
    pub iface: String,
    /// The agent's host, for the report.
    #[serde(default)]
    pub host: crate::report::HostInfo,
    /// The agent runs a page server for this session: the dump's pages
    /// stream to it while they are dumped. Not when both run in one PID
    /// namespace of one machine (the source's copy must be gone before the
    /// restore there, so the source keeps complete images to roll back).
    #[serde(default)]
    pub page_stream: bool,
    /// Where the agent keeps this session's images: what to give
    /// `migrator recover` there if the hand-over ends in doubt.
    #[serde(default)]
    pub images: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreReply {
    /// PID of the restored root task on the destination.
    pub pid: i32,
    /// The destination's phases; `start_ms` from when it got the request.
    pub phases: Vec<Phase>,
    /// Time from the release back to this reply (so the source can work
    /// out when the release happened on its own clock).
    pub since_release_ms: f64,
    pub criu_restore: Option<RestoreStats>,
    /// Counters of the destination's lock at release, per flow.
    pub connections: Vec<ConnectionCounters>,
    /// Neighbours that answered a probe from the service address, and
    /// those that did not (not on this link, or silent).
    pub confirmed: Vec<String>,
    pub unconfirmed: Vec<String>,
    #[serde(default)]
    pub route_convergence: Vec<crate::report::PeerConvergence>,
    /// Held packets delivered to the restored sockets, per flow (the
    /// source's and the destination's own).
    #[serde(default)]
    pub held_delivered: Vec<(String, u64)>,
    /// New clients' SYNs held during the freeze and delivered (to the
    /// restored listening sockets).
    #[serde(default)]
    pub syns_delivered: u64,
    /// The destination's packet events, `at_ms` from when it got the
    /// restore request.
    #[serde(default)]
    pub events: Vec<crate::report::ConnectionEvent>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    Hello {
        version: u32,
    },
    /// The agent's proof of the token (hex); none with certificates.
    Challenge {
        proof: Option<String>,
    },
    /// The source's proof of the token (hex); none with certificates.
    Auth {
        proof: Option<String>,
    },
    AuthOk,
    Refused {
        reason: String,
    },
    Preflight(PreflightRequest),
    PreflightOk(PreflightReply),
    /// The dump's page stream is over: CRIU closed its end after `bytes`
    /// bytes (sent as data frames before this).
    PagesEnd {
        bytes: u64,
    },
    /// The agent's page server finished with every byte of the stream
    /// (`bytes`) written to its images.
    PagesDone {
        bytes: u64,
    },
    /// CRIU's dump failed and runs once more (the tree still frozen):
    /// forget the page stream so far; a new one follows.
    PagesRestart,
    /// The page images so far are gone; no answer for the old stream
    /// follows this.
    PagesRestarted,
    /// An image file follows as data frames totalling `size` bytes; or,
    /// with `extents` (offset, length), a file of `size` bytes of which
    /// only these parts follow, in order, the rest left a hole (a
    /// post-copy's pages image: its lazy pages come later).
    File {
        name: String,
        size: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        extents: Option<Vec<(u64, u64)>>,
    },
    /// All files sent; the agent checks and acknowledges.
    FilesDone {
        files: u64,
        bytes: u64,
    },
    FilesOk,
    /// Held packets follow as `count` data frames, one Ethernet frame each,
    /// oldest first.
    Held {
        count: u64,
    },
    /// Restore now; the source froze `frozen_for_ms` ago (the agent's
    /// freeze-window metric starts there).
    Restore {
        #[serde(default)]
        frozen_for_ms: f64,
        /// The tree's connections as CRIU dumped it (`LOCAL=REMOTE`): the
        /// ones the restore must bring back. Those of the preflight when
        /// absent; a connection the process closed meanwhile is not one.
        #[serde(default)]
        dumped_flows: Option<Vec<String>>,
    },
    /// The agent restored the process (stopped), owns the addresses and
    /// the neighbours answer it; the lock still holds. It resumes and
    /// releases only on `Commit`.
    Ready,
    /// The source gives up its claim: it will not restore its own copy
    /// unless the agent answers `Failed` (its copy removed).
    Commit,
    Restored(Box<RestoreReply>),
    /// After `Restored`, with a post-copy: the destination's daemon needs
    /// `pages` pages from `vaddr` of page map `id` (the dumped process).
    /// Answered with one data frame: CRIU's page-server record and the
    /// pages.
    PagesWanted {
        id: u64,
        vaddr: u64,
        pages: u64,
    },
    /// After `Restored`, with a lazy restore: the daemon filled every page
    /// of the restored memory, this long after the release.
    MemoryFilled {
        after_release_ms: f64,
    },
    Failed {
        phase: String,
        reason: String,
    },
}

impl Message {
    /// Short name for error messages.
    pub fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    }
}
