//! One migration's use of the data plane on one host: attach to the
//! interface (unless something already did), observe, freeze and release
//! its flows and service addresses, read their counters, and on close
//! remove exactly what it added (detaching only if it attached).

use std::path::PathBuf;

use migrator_common::{FlowPolicy, FlowStats, ServiceKey, flow::POLICY_OWN_SEGMENTS_PASS};

use super::{
    AttachMode, Dataplane, DataplaneError, FlowTable, default_pin_root, detach_if_unused,
    spec::FlowSpec,
};

/// The blocking policy, failing open after `deadline`.
fn blocking(deadline: std::time::Duration, hold: bool) -> FlowPolicy {
    let deadline_ns = crate::system::deadline_ns(deadline);
    if hold {
        FlowPolicy::hold(deadline_ns)
    } else {
        FlowPolicy::freeze(deadline_ns)
    }
}

/// The source's lock, second step: once CRIU has frozen the tree, the
/// local side's own segments are blocked as well. A dumped socket's
/// retransmit timer can still fire on the source (seen here ~200 ms after
/// the freeze), and such a segment carries a newer TCP timestamp than the
/// restored copy will: the peer, having seen it, then drops every segment
/// of the restored socket as old (PAWS) until its clock catches up.
pub struct OutgoingBlock {
    table: FlowTable,
    flows: Vec<migrator_common::FlowKey>,
    services: Vec<ServiceKey>,
}

impl OutgoingBlock {
    /// Block both directions: the first step's policies, mode, deadline
    /// and all, without [`POLICY_OWN_SEGMENTS_PASS`].
    pub fn apply(mut self) -> Result<(), DataplaneError> {
        self.table
            .clear_policy_flags(&self.flows, &self.services, POLICY_OWN_SEGMENTS_PASS)
    }
}

pub struct MigrationLock {
    table: FlowTable,
    root: PathBuf,
    flows: Vec<FlowSpec>,
    services: Vec<ServiceKey>,
    /// The kernel programs' messages, in our log while we hold the lock.
    _logs: Option<super::logs::LogForwarder>,
}

impl MigrationLock {
    /// Attach to `iface` in this network namespace and observe `flows`.
    pub fn observe(iface: &str, flows: &[FlowSpec]) -> Result<Self, DataplaneError> {
        let root = default_pin_root();
        let mut dataplane = Dataplane::load_pinned(&root)?;
        dataplane.attach(iface, AttachMode::Auto)?;
        let logs = dataplane.forward_logs();
        let mut lock = Self {
            _logs: logs,
            table: dataplane.take_table()?,
            root,
            flows: flows.to_vec(),
            services: Vec::new(),
        };
        let keys: Vec<_> = flows.iter().map(FlowSpec::key).collect();
        if let Err(err) = lock.table.set_flows(&keys, FlowPolicy::observe()) {
            lock.close();
            return Err(err);
        }
        Ok(lock)
    }

    /// Block every flow and all TCP of `services` (new SYNs too) until
    /// released, or until `deadline` passes (fail-open). With `hold`, the
    /// peers' packets are also kept for [`MigrationLock::drain_held`].
    pub fn freeze(
        &mut self,
        services: &[ServiceKey],
        deadline: std::time::Duration,
        hold: bool,
    ) -> Result<(), DataplaneError> {
        self.block(services, blocking(deadline, hold))
    }

    /// Like [`Self::freeze`], but the local side's own segments (all but
    /// RSTs) still leave: the source's first step, while its process may
    /// still run (CRIU freezes it right after), so that what it sends in
    /// that moment reaches the peer. Its second step, [`OutgoingBlock`],
    /// blocks them too once the tree is frozen.
    pub fn freeze_incoming(
        &mut self,
        services: &[ServiceKey],
        deadline: std::time::Duration,
        hold: bool,
    ) -> Result<(), DataplaneError> {
        self.block(services, blocking(deadline, hold).own_segments_passing())
    }

    /// Made before the freeze (opening the pinned maps again takes a
    /// moment): the second step of [`Self::freeze_incoming`].
    pub fn outgoing_block(&self, services: &[ServiceKey]) -> Result<OutgoingBlock, DataplaneError> {
        Ok(OutgoingBlock {
            table: FlowTable::open_pinned(&self.root)?,
            flows: self.flows.iter().map(FlowSpec::key).collect(),
            services: services.to_vec(),
        })
    }

    fn block(&mut self, services: &[ServiceKey], policy: FlowPolicy) -> Result<(), DataplaneError> {
        let keys: Vec<_> = self.flows.iter().map(FlowSpec::key).collect();
        self.table.set_flows(&keys, policy)?;
        for service in services {
            self.table.set_service(*service, policy)?;
            self.services.push(*service);
        }
        Ok(())
    }

    /// Let traffic through again (flows go back to observe).
    pub fn release(&mut self) -> Result<(), DataplaneError> {
        for flow in &self.flows {
            self.table.release_flow(&flow.key())?;
        }
        for service in std::mem::take(&mut self.services) {
            self.table.release_service(&service)?;
        }
        Ok(())
    }

    /// Counters of every flow of this migration.
    pub fn counters(&self) -> Vec<(FlowSpec, FlowStats)> {
        self.flows
            .iter()
            .map(|flow| {
                let stats = self
                    .table
                    .flow_stats(&flow.key())
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                (*flow, stats)
            })
            .collect()
    }

    /// New clients' SYNs that came to the locked service addresses while
    /// they were blocked.
    pub fn new_connection_attempts(&self) -> u64 {
        self.table
            .services()
            .unwrap_or_default()
            .iter()
            .filter(|entry| self.services.contains(&entry.key))
            .map(|entry| entry.stats.syns_blocked)
            .sum()
    }

    /// The flows this lock covers.
    pub fn flows(&self) -> &[FlowSpec] {
        &self.flows
    }

    /// The EVENTS ring's records so far (every flow's: filter by key).
    pub fn drain_events(&mut self) -> Vec<migrator_common::Event> {
        self.table.drain_events()
    }

    /// Peer packets held so far, oldest first, whole frames.
    pub fn drain_held(&mut self) -> Vec<super::HeldPacketOwned> {
        self.table.drain_held()
    }

    /// Remove this migration's entries, and detach once nothing is tracked
    /// any more (whoever attached: the last user leaves nothing behind; a
    /// watcher or another migration still tracking keeps it attached).
    /// Best effort: it runs on error paths, where the first error matters.
    pub fn close(mut self) {
        let _ = self.release();
        let keys: Vec<_> = self.flows.iter().map(FlowSpec::key).collect();
        let _ = self.table.forget_flows(&keys);
        detach_if_unused(&self.root, &self.table);
    }
}
