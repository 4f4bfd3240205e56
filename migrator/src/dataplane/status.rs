//! A snapshot of the data plane for `migrator status`: attached
//! interfaces, tracked flows and service rules with their counters.

use std::{fmt::Write as _, path::Path};

use migrator_common::{FlowMode, FlowPolicy, FlowStats};
use serde::Serialize;

use super::{
    DataplaneError, FlowTable, attached_interfaces,
    spec::{FlowSpec, ServiceSpec},
};
use crate::system::boottime_ns;

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub interfaces: Vec<String>,
    pub flows: Vec<FlowStatus>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Serialize)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped: u64,
    pub held: u64,
    pub hold_failed: u64,
    pub rst_blocked: u64,
    pub peer_retransmits: u64,
    pub peer_keepalives: u64,
    pub peer_window_probes: u64,
    /// Milliseconds since the last peer retransmit / packet, if any.
    pub last_peer_retransmit_ago_ms: Option<u64>,
    pub last_packet_ago_ms: Option<u64>,
}

/// What the lock does to one flow or service rule, and its counters.
#[derive(Debug, Serialize)]
pub struct LockState {
    /// observe | freeze | hold, as set.
    pub mode: &'static str,
    /// What the kernel does now: a freeze past its deadline has failed open.
    pub effective_mode: &'static str,
    /// Milliseconds until a freeze fails open (None: no deadline / passed).
    pub deadline_in_ms: Option<u64>,
    pub counters: Counters,
}

#[derive(Debug, Serialize)]
pub struct FlowStatus {
    pub local: String,
    pub remote: String,
    #[serde(flatten)]
    pub state: LockState,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    #[serde(flatten)]
    pub state: LockState,
}

fn ago_ms(now: u64, then: u64) -> Option<u64> {
    (then != 0).then(|| now.saturating_sub(then) / 1_000_000)
}

fn counters(stats: &FlowStats, now: u64) -> Counters {
    Counters {
        packets_in: stats.packets_in,
        packets_out: stats.packets_out,
        bytes_in: stats.bytes_in,
        bytes_out: stats.bytes_out,
        dropped: stats.dropped,
        held: stats.held,
        hold_failed: stats.hold_failed,
        rst_blocked: stats.rst_blocked,
        peer_retransmits: stats.peer_retransmits,
        peer_keepalives: stats.peer_keepalives,
        peer_window_probes: stats.peer_window_probes,
        last_peer_retransmit_ago_ms: ago_ms(now, stats.last_peer_retransmit_ns),
        last_packet_ago_ms: ago_ms(now, stats.last_packet_ns),
    }
}

impl LockState {
    fn new(policy: &FlowPolicy, stats: &FlowStats, now: u64) -> Self {
        let effective = policy.effective_mode(now);
        Self {
            mode: FlowMode::from_u32(policy.mode).map_or("unknown", FlowMode::name),
            effective_mode: effective.name(),
            deadline_in_ms: (policy.deadline_ns != 0 && effective.blocks())
                .then(|| policy.deadline_ns.saturating_sub(now) / 1_000_000),
            counters: counters(stats, now),
        }
    }

    /// The MODE column: the mode, time left, or that it failed open.
    fn mode_text(&self) -> String {
        match (self.mode == self.effective_mode, self.deadline_in_ms) {
            (true, Some(ms)) => format!("{} ({:.1}s left)", self.mode, ms as f64 / 1000.0),
            (true, None) => self.mode.to_owned(),
            (false, _) => format!("{}->{} (deadline passed)", self.mode, self.effective_mode),
        }
    }
}

impl Snapshot {
    pub fn read(root: &Path, table: &FlowTable) -> Result<Self, DataplaneError> {
        let now = boottime_ns();
        let mut flows: Vec<FlowStatus> = table
            .flows()?
            .iter()
            .map(|entry| {
                let spec = FlowSpec::from_key(&entry.key);
                FlowStatus {
                    local: spec.local.to_string(),
                    remote: spec.remote.to_string(),
                    state: LockState::new(&entry.policy, &entry.stats, now),
                }
            })
            .collect();
        flows.sort_by(|a, b| (&a.local, &a.remote).cmp(&(&b.local, &b.remote)));
        let mut services: Vec<ServiceStatus> = table
            .services()?
            .iter()
            .map(|entry| ServiceStatus {
                service: ServiceSpec::from_key(&entry.key).to_string(),
                state: LockState::new(&entry.policy, &entry.stats, now),
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(Self {
            interfaces: attached_interfaces(root),
            flows,
            services,
        })
    }

    /// Human form: one table of flows, one of service rules.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "attached: {}",
            if self.interfaces.is_empty() {
                "-".to_owned()
            } else {
                self.interfaces.join(", ")
            }
        );
        if self.flows.is_empty() {
            let _ = writeln!(out, "no flows tracked");
        } else {
            let _ = writeln!(
                out,
                "{:<45} {:<45} {:<22} {:>8} {:>8} {:>7} {:>6} {:>6} {:>10} {:>10}",
                "LOCAL",
                "REMOTE",
                "MODE",
                "PKT_IN",
                "PKT_OUT",
                "DROPPED",
                "HELD",
                "RST",
                "PEER_RETX",
                "KEEPALIVE"
            );
            for flow in &self.flows {
                let c = &flow.state.counters;
                let _ = writeln!(
                    out,
                    "{:<45} {:<45} {:<22} {:>8} {:>8} {:>7} {:>6} {:>6} {:>10} {:>10}",
                    flow.local,
                    flow.remote,
                    flow.state.mode_text(),
                    c.packets_in,
                    c.packets_out,
                    c.dropped,
                    c.held,
                    c.rst_blocked,
                    c.peer_retransmits,
                    c.peer_keepalives + c.peer_window_probes,
                );
            }
        }
        if !self.services.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<45} {:<22} {:>8} {:>8} {:>7} {:>6}",
                "SERVICE", "MODE", "PKT_IN", "PKT_OUT", "DROPPED", "HELD"
            );
            for service in &self.services {
                let c = &service.state.counters;
                let _ = writeln!(
                    out,
                    "{:<45} {:<22} {:>8} {:>8} {:>7} {:>6}",
                    service.service,
                    service.state.mode_text(),
                    c.packets_in,
                    c.packets_out,
                    c.dropped,
                    c.held,
                );
            }
        }
        out
    }
}
