//! What the live view shows, computed from the pinned flow table: one row
//! per connection, with rates against the previous snapshot and, while a
//! connection is frozen, when the peer's next retransmit is due.

use std::{collections::HashMap, net::SocketAddr};

use migrator_common::{FlowKey, FlowMode};
use serde::Serialize;

use crate::dataplane::{
    FlowEntry, ServiceEntry,
    spec::{FlowSpec, ServiceSpec},
};

/// A connection's state as the watcher names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowMode {
    Observe,
    Frozen,
    Held,
    /// Observed again after a freeze (it dropped or held packets before).
    Released,
}

impl RowMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::Frozen => "frozen",
            Self::Held => "held",
            Self::Released => "released",
        }
    }
}

/// One connection in one snapshot. The JSON-lines schema is this struct
/// (field names and units are part of the interface: times in ms,
/// counters as integers).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Unix time of the snapshot, ms.
    pub ts_ms: u64,
    pub local: String,
    pub remote: String,
    pub mode: RowMode,
    pub peer_retransmits: u64,
    /// Over the last interval.
    pub peer_retransmits_per_s: f64,
    /// Since the peer's latest retransmit; null if it never retransmitted.
    pub ms_since_peer_retransmit: Option<u64>,
    /// Our own side's; null when this host cannot count them (the
    /// snapshot's `local_retransmits_uncounted` says why).
    pub local_retransmits: Option<u64>,
    pub packets_dropped: u64,
    pub packets_held: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// While frozen or held: for how long.
    pub frozen_ms: Option<u64>,
    /// While frozen or held, once the peer retransmitted twice: when its
    /// next retransmit is due, from its backoff so far (negative: overdue).
    pub next_peer_retransmit_in_ms: Option<i64>,
}

/// A service address a migration locks, and the new clients it saw: their
/// SYNs wait (held or dropped) until the release.
#[derive(Clone, Debug, Serialize)]
pub struct NewClients {
    pub ts_ms: u64,
    /// The address (and port, if the rule has one).
    pub service: String,
    /// Connection attempts (SYNs) seen since the lock began.
    pub new_connection_attempts: u64,
    /// Of those, the ones that came while traffic was blocked.
    pub waiting: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub connections: usize,
    pub frozen: usize,
    pub peer_retransmits: u64,
    pub local_retransmits: Option<u64>,
    pub packets_dropped: u64,
    pub packets_held: u64,
    /// New clients' SYNs that came while a lock blocked them (service
    /// addresses of a migration in flight).
    pub new_clients_waiting: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub ts_ms: u64,
    pub rows: Vec<Row>,
    /// The service addresses locked here (during a migration only).
    pub new_clients: Vec<NewClients>,
    pub totals: Totals,
    /// The phase of a migration running in this network namespace.
    pub migration_phase: Option<String>,
    /// Why our own retransmits are not counted here, if they are not.
    pub local_retransmits_uncounted: Option<String>,
}

impl Snapshot {
    /// Our own retransmits cannot be counted on this host: show them as
    /// unknown, not as zero.
    pub fn without_local_retransmits(mut self, why: &str) -> Self {
        for row in &mut self.rows {
            row.local_retransmits = None;
        }
        self.totals.local_retransmits = None;
        self.local_retransmits_uncounted = Some(why.to_owned());
        self
    }
}

/// Which connections to show.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub flows: Vec<FlowSpec>,
    /// Local addresses (and optionally one port) whose connections show.
    pub addresses: Vec<(std::net::IpAddr, Option<u16>)>,
    /// Show only what is listed, even when the lists are empty (a followed
    /// process with no connections yet shows nothing, not everything).
    pub only_listed: bool,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty() && self.addresses.is_empty()
    }

    fn admits(&self, flow: &FlowSpec) -> bool {
        (self.is_empty() && !self.only_listed)
            || self.flows.contains(flow)
            || self.addresses.iter().any(|(ip, port)| {
                flow.local.ip() == *ip && port.is_none_or(|p| p == flow.local.port())
            })
    }
}

/// Turns table reads into snapshots, remembering the previous one.
#[derive(Default)]
pub struct Watcher {
    previous: HashMap<FlowKey, (u64, u64)>,
}

impl Watcher {
    /// `now_ns`: CLOCK_BOOTTIME now; `ts_ms`: Unix time now.
    pub fn snapshot(
        &mut self,
        entries: &[FlowEntry],
        services: &[ServiceEntry],
        selection: &Selection,
        now_ns: u64,
        ts_ms: u64,
        migration_phase: Option<String>,
    ) -> Snapshot {
        let mut rows = Vec::new();
        let mut current = HashMap::new();
        for entry in entries {
            let flow = FlowSpec::from_key(&entry.key);
            if !selection.admits(&flow) {
                continue;
            }
            let stats = &entry.stats;
            let mode = match entry.policy.effective_mode(now_ns) {
                FlowMode::Freeze => RowMode::Frozen,
                FlowMode::Hold => RowMode::Held,
                FlowMode::Observe if stats.dropped > 0 || stats.held > 0 => RowMode::Released,
                FlowMode::Observe => RowMode::Observe,
            };
            let rate = match self.previous.get(&entry.key) {
                Some((at_ns, count)) if now_ns > *at_ns => {
                    (stats.peer_retransmits.saturating_sub(*count)) as f64
                        / ((now_ns - at_ns) as f64 / 1e9)
                }
                _ => 0.0,
            };
            current.insert(entry.key, (now_ns, stats.peer_retransmits));
            let ms = |ns: u64| ns / 1_000_000;
            let frozen = matches!(mode, RowMode::Frozen | RowMode::Held);
            let frozen_ms = (frozen && entry.policy.since_ns != 0)
                .then(|| ms(now_ns.saturating_sub(entry.policy.since_ns)));
            let next_peer_retransmit_in_ms = (frozen
                && stats.prev_peer_retransmit_ns != 0
                && stats.last_peer_retransmit_ns > stats.prev_peer_retransmit_ns)
                .then(|| {
                    // Linux doubles its RTO on each retransmit of a timeout.
                    let gap = stats.last_peer_retransmit_ns - stats.prev_peer_retransmit_ns;
                    let due = stats.last_peer_retransmit_ns + 2 * gap;
                    (due as i64 - now_ns as i64) / 1_000_000
                });
            rows.push(Row {
                ts_ms,
                local: endpoint(flow.local),
                remote: endpoint(flow.remote),
                mode,
                peer_retransmits: stats.peer_retransmits,
                peer_retransmits_per_s: rate,
                ms_since_peer_retransmit: (stats.last_peer_retransmit_ns != 0)
                    .then(|| ms(now_ns.saturating_sub(stats.last_peer_retransmit_ns))),
                local_retransmits: Some(stats.local_retransmits),
                packets_dropped: stats.dropped,
                packets_held: stats.held,
                bytes_in: stats.bytes_in,
                bytes_out: stats.bytes_out,
                frozen_ms,
                next_peer_retransmit_in_ms,
            });
        }
        self.previous = current;
        // Most peer retransmits first: where it hurts is on top.
        rows.sort_by(|a, b| {
            b.peer_retransmits
                .cmp(&a.peer_retransmits)
                .then_with(|| a.local.cmp(&b.local))
                .then_with(|| a.remote.cmp(&b.remote))
        });
        let totals = Totals {
            connections: rows.len(),
            frozen: rows
                .iter()
                .filter(|r| matches!(r.mode, RowMode::Frozen | RowMode::Held))
                .count(),
            peer_retransmits: rows.iter().map(|r| r.peer_retransmits).sum(),
            local_retransmits: rows.iter().map(|r| r.local_retransmits).sum(),
            packets_dropped: rows.iter().map(|r| r.packets_dropped).sum(),
            packets_held: rows.iter().map(|r| r.packets_held).sum(),
            new_clients_waiting: services.iter().map(|s| s.stats.syns_blocked).sum(),
        };
        let new_clients = services
            .iter()
            .map(|entry| NewClients {
                ts_ms,
                service: ServiceSpec::from_key(&entry.key).to_string(),
                new_connection_attempts: entry.stats.syns_in,
                waiting: entry.stats.syns_blocked,
            })
            .collect();
        Snapshot {
            ts_ms,
            rows,
            new_clients,
            totals,
            migration_phase,
            local_retransmits_uncounted: None,
        }
    }
}

fn endpoint(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use migrator_common::{FlowPolicy, FlowStats};

    use super::*;
    use crate::dataplane::Entry;

    fn entry(policy: FlowPolicy, stats: FlowStats) -> FlowEntry {
        Entry {
            key: FlowKey::v4([198, 18, 0, 2], 5000, [198, 18, 0, 1], 40_000),
            policy,
            stats,
        }
    }

    #[test]
    fn frozen_row_predicts_the_next_retransmit_from_the_backoff() {
        let second = 1_000_000_000u64;
        let stats = FlowStats {
            peer_retransmits: 3,
            prev_peer_retransmit_ns: 10 * second + 200_000_000,
            last_peer_retransmit_ns: 10 * second + 600_000_000,
            dropped: 40,
            ..FlowStats::default()
        };
        let policy = FlowPolicy::freeze(0).since(10 * second);
        let mut watcher = Watcher::default();
        let now = 10 * second + 700_000_000;
        let snap = watcher.snapshot(
            &[entry(policy, stats)],
            &[],
            &Selection::default(),
            now,
            1,
            None,
        );
        let row = &snap.rows[0];
        assert_eq!(row.mode, RowMode::Frozen);
        assert_eq!(row.frozen_ms, Some(700));
        assert_eq!(row.ms_since_peer_retransmit, Some(100));
        // Gap 400 ms, doubled: due at 1.4 s, 700 ms from now.
        assert_eq!(row.next_peer_retransmit_in_ms, Some(700));
        // Released: observe again with drops behind it; no predictions.
        let released = FlowPolicy::observe().since(now);
        let snap = watcher.snapshot(
            &[entry(released, stats)],
            &[],
            &Selection::default(),
            now + second,
            2,
            None,
        );
        assert_eq!(snap.rows[0].mode, RowMode::Released);
        assert_eq!(snap.rows[0].next_peer_retransmit_in_ms, None);
        assert_eq!(snap.rows[0].frozen_ms, None);
    }

    #[test]
    fn selection_by_address_and_port() {
        let flow: FlowSpec = "198.18.0.2:5000=198.18.0.1:40000".parse().unwrap();
        let by_ip = Selection {
            flows: vec![],
            addresses: vec![("198.18.0.2".parse().unwrap(), None)],
            only_listed: false,
        };
        assert!(by_ip.admits(&flow));
        let other_port = Selection {
            flows: vec![],
            addresses: vec![("198.18.0.2".parse().unwrap(), Some(22))],
            only_listed: false,
        };
        assert!(!other_port.admits(&flow));
        assert!(Selection::default().admits(&flow));
        let nothing_yet = Selection {
            only_listed: true,
            ..Selection::default()
        };
        assert!(!nothing_yet.admits(&flow));
    }
}
