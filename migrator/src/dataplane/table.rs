//! The flow table and service rules as userspace sees them: freeze, hold,
//! release, observe, and read counters. Works on the maps of a freshly
//! loaded data plane or on the pinned maps of one attached earlier.

use std::{collections::BTreeSet, path::Path};

use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, MapError, RingBuf},
};
use migrator_common::{
    ANY_LOCAL_PORT_SLOT, Event, FlowKey, FlowMode, FlowPolicy, FlowStats, HeldPacket, ServiceKey,
};

use super::DataplaneError;

pub const FLOWS_MAP: &str = "FLOWS";
pub const STATS_MAP: &str = "STATS";
pub const SERVICES_MAP: &str = "SERVICES";
pub const SERVICE_STATS_MAP: &str = "SERVICE_STATS";
pub const EVENTS_MAP: &str = "EVENTS";
pub const HELD_MAP: &str = "HELD";
pub const LOCAL_PORTS_MAP: &str = "LOCAL_PORTS";
pub const ALL_MAPS: [&str; 7] = [
    FLOWS_MAP,
    STATS_MAP,
    SERVICES_MAP,
    SERVICE_STATS_MAP,
    EVENTS_MAP,
    HELD_MAP,
    LOCAL_PORTS_MAP,
];

/// One tracked flow or service rule as read back from the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Entry<K> {
    pub key: K,
    pub policy: FlowPolicy,
    pub stats: FlowStats,
}

pub type FlowEntry = Entry<FlowKey>;
pub type ServiceEntry = Entry<ServiceKey>;

pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, FlowPolicy>,
    stats: HashMap<MapData, FlowKey, FlowStats>,
    services: HashMap<MapData, ServiceKey, FlowPolicy>,
    service_stats: HashMap<MapData, ServiceKey, FlowStats>,
    events: RingBuf<MapData>,
    held: RingBuf<MapData>,
    local_ports: Array<MapData, u8>,
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl FlowTable {
    /// Build from maps taken out of a loaded object, by name.
    pub(super) fn from_maps(
        mut take: impl FnMut(&'static str) -> Result<Map, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        Ok(Self {
            flows: HashMap::try_from(take(FLOWS_MAP)?).map_err(map_error(FLOWS_MAP))?,
            stats: HashMap::try_from(take(STATS_MAP)?).map_err(map_error(STATS_MAP))?,
            services: HashMap::try_from(take(SERVICES_MAP)?).map_err(map_error(SERVICES_MAP))?,
            service_stats: HashMap::try_from(take(SERVICE_STATS_MAP)?)
                .map_err(map_error(SERVICE_STATS_MAP))?,
            events: RingBuf::try_from(take(EVENTS_MAP)?).map_err(map_error(EVENTS_MAP))?,
            held: RingBuf::try_from(take(HELD_MAP)?).map_err(map_error(HELD_MAP))?,
            local_ports: Array::try_from(take(LOCAL_PORTS_MAP)?)
                .map_err(map_error(LOCAL_PORTS_MAP))?,
        })
    }

    /// Open the maps an earlier attach pinned under `pin_root`.
    pub fn open_pinned(pin_root: &Path) -> Result<Self, DataplaneError> {
        let maps_dir = super::maps_dir(pin_root);
        Self::from_maps(|name| {
            let path = maps_dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| DataplaneError::NotAttached {
                path: path.clone(),
                source,
            })?;
            Ok(match name {
                EVENTS_MAP | HELD_MAP => Map::RingBuf(data),
                LOCAL_PORTS_MAP => Map::Array(data),
                _ => Map::HashMap(data),
            })
        })
    }

    /// Track `key` with `policy`. Counters start at zero for a new flow and
    /// are kept for a flow already tracked (a freeze after observing).
    pub fn set_flow(&mut self, key: FlowKey, policy: FlowPolicy) -> Result<(), DataplaneError> {
        self.set_flows(&[key], policy)
    }

    /// Set many flows in one go (each its own map update; the table never
    /// holds a half-written entry). Enforced by the time this returns.
    pub fn set_flows(
        &mut self,
        keys: &[FlowKey],
        policy: FlowPolicy,
    ) -> Result<(), DataplaneError> {
        let policy = policy.since(crate::system::boottime_ns());
        for key in keys {
            ensure_counters(&mut self.stats, *key, STATS_MAP)?;
            self.flows
                .insert(*key, policy, 0)
                .map_err(map_error(FLOWS_MAP))?;
        }
        // Marked after the entries exist (see `sweep_local_ports`).
        let ports: BTreeSet<u32> = keys.iter().map(|key| u32::from(key.local_port)).collect();
        ports
            .into_iter()
            .try_for_each(|slot| self.mark_local_port(slot, true))
    }

    /// Clear `flags` from the policies of `keys` and `services` as they
    /// stand (mode, deadline and since kept); absent entries are skipped.
    pub fn clear_policy_flags(
        &mut self,
        keys: &[FlowKey],
        services: &[ServiceKey],
        flags: u32,
    ) -> Result<(), DataplaneError> {
        clear_flags(&mut self.flows, keys, flags, FLOWS_MAP)?;
        clear_flags(&mut self.services, services, flags, SERVICES_MAP)
    }

    /// Stop blocking `key`: it goes back to observe, counters kept.
    /// Returns false if the flow was not tracked.
    pub fn release_flow(&mut self, key: &FlowKey) -> Result<bool, DataplaneError> {
        if get(&self.flows, key, FLOWS_MAP)?.is_none() {
            return Ok(false);
        }
        let policy = FlowPolicy::observe().since(crate::system::boottime_ns());
        self.flows
            .insert(*key, policy, 0)
            .map_err(map_error(FLOWS_MAP))?;
        Ok(true)
    }

    /// Forget a flow entirely (policy and counters).
    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<(), DataplaneError> {
        self.forget_flows(std::slice::from_ref(key))
    }

    /// Forget many flows; the port prefilter is swept once at the end.
    pub fn forget_flows(&mut self, keys: &[FlowKey]) -> Result<(), DataplaneError> {
        for key in keys {
            remove(&mut self.flows, key, FLOWS_MAP)?;
            remove(&mut self.stats, key, STATS_MAP)?;
        }
        self.sweep_local_ports(keys.iter().map(|key| u32::from(key.local_port)).collect())
    }

    pub fn set_service(
        &mut self,
        key: ServiceKey,
        policy: FlowPolicy,
    ) -> Result<(), DataplaneError> {
        ensure_counters(&mut self.service_stats, key, SERVICE_STATS_MAP)?;
        self.services
            .insert(key, policy, 0)
            .map_err(map_error(SERVICES_MAP))?;
        self.mark_local_port(service_slot(&key), true)
    }

    /// Remove a service rule (its counters go with it). False if absent.
    pub fn release_service(&mut self, key: &ServiceKey) -> Result<bool, DataplaneError> {
        let removed = self.remove_service(key)?;
        self.sweep_local_ports(BTreeSet::from([service_slot(key)]))?;
        Ok(removed)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, DataplaneError> {
        let removed = remove(&mut self.services, key, SERVICES_MAP)?;
        remove(&mut self.service_stats, key, SERVICE_STATS_MAP)?;
        Ok(removed)
    }

    fn mark_local_port(&mut self, slot: u32, marked: bool) -> Result<(), DataplaneError> {
        self.local_ports
            .set(slot, u8::from(marked), 0)
            .map_err(map_error(LOCAL_PORTS_MAP))
    }

    /// Prefilter slots some flow or service rule uses right now.
    fn live_local_ports(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        let mut slots = BTreeSet::new();
        for key in self.flows.keys() {
            slots.insert(u32::from(key.map_err(map_error(FLOWS_MAP))?.local_port));
        }
        for key in self.services.keys() {
            slots.insert(service_slot(&key.map_err(map_error(SERVICES_MAP))?));
        }
        Ok(slots)
    }

    /// Unmark `candidates` (slots whose entries were just removed) that no
    /// entry uses any more. A stale mark only costs speed, a missing one
    /// would let a frozen flow's packets through, so with another process
    /// writing at the same time (it inserts, then marks) the order is:
    /// clear the unused slots, then read the tables again and re-mark any
    /// slot an entry appeared for in between.
    fn sweep_local_ports(&mut self, candidates: BTreeSet<u32>) -> Result<(), DataplaneError> {
        if candidates.is_empty() {
            return Ok(());
        }
        let live = self.live_local_ports()?;
        let unused: Vec<u32> = candidates.difference(&live).copied().collect();
        if unused.is_empty() {
            return Ok(());
        }
        for slot in &unused {
            self.mark_local_port(*slot, false)?;
        }
        let live = self.live_local_ports()?;
        for slot in unused.into_iter().filter(|slot| live.contains(slot)) {
            self.mark_local_port(slot, true)?;
        }
        Ok(())
    }

    /// Every blocking flow back to observe, every service rule removed.
    /// Returns (flows released, rules removed).
    pub fn release_all(&mut self) -> Result<(usize, usize), DataplaneError> {
        let mut blocking = Vec::new();
        for item in self.flows.iter() {
            let (key, policy) = item.map_err(map_error(FLOWS_MAP))?;
            if FlowMode::from_u32(policy.mode).is_some_and(FlowMode::blocks) {
                blocking.push(key);
            }
        }
        for key in &blocking {
            self.release_flow(key)?;
        }
        let services = self
            .services
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(SERVICES_MAP))?;
        for key in &services {
            self.remove_service(key)?;
        }
        self.sweep_local_ports(services.iter().map(service_slot).collect())?;
        Ok((blocking.len(), services.len()))
    }

    /// True when no flow and no service rule is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.keys().next().is_none() && self.services.keys().next().is_none()
    }

    pub fn flow_stats(&self, key: &FlowKey) -> Result<Option<FlowStats>, DataplaneError> {
        get(&self.stats, key, STATS_MAP)
    }

    pub fn flows(&self) -> Result<Vec<FlowEntry>, DataplaneError> {
        entries(&self.flows, &self.stats, FLOWS_MAP, STATS_MAP)
    }

    pub fn services(&self) -> Result<Vec<ServiceEntry>, DataplaneError> {
        entries(
            &self.services,
            &self.service_stats,
            SERVICES_MAP,
            SERVICE_STATS_MAP,
        )
    }

    /// Take every pending event (peer retransmit, drop, hold) out of the
    /// kernel, oldest first. The ring has one reader position for all
    /// processes: what one drains, the others do not see.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() < size_of::<Event>() {
                continue; // not a record of ours
            }
            // SAFETY: the kernel wrote a whole Event (repr(C), any bit
            // pattern valid); read_unaligned copes with the ring's alignment.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
        // Writers on different CPUs can interleave.
        events.sort_by_key(|event| event.timestamp_ns);
        events
    }

    /// Take every held packet out of the kernel, oldest first. The ring is
    /// shared by all CPUs' writers; records from different CPUs can land
    /// out of order, so they are sorted by arrival time.
    pub fn drain_held(&mut self) -> Vec<HeldPacketOwned> {
        let mut packets = Vec::new();
        while let Some(item) = self.held.next() {
            if item.len() < size_of::<HeldPacket>() {
                continue; // not a record of ours
            }
            // SAFETY: the kernel wrote a whole HeldPacket (repr(C), any bit
            // pattern valid); read_unaligned copes with the ring's alignment.
            let record: HeldPacket = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let len = (record.len as usize).min(record.data.len());
            packets.push(HeldPacketOwned {
                timestamp_ns: record.timestamp_ns,
                key: record.key,
                frame: record.data[..len].to_vec(),
            });
        }
        packets.sort_by_key(|packet| packet.timestamp_ns);
        packets
    }
}

/// The prefilter slot a service rule needs: its port, or "every port".
fn service_slot(key: &ServiceKey) -> u32 {
    if key.port == 0 {
        ANY_LOCAL_PORT_SLOT
    } else {
        u32::from(key.port)
    }
}

/// A map lookup where a missing key is an answer, not an error.
fn get<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, DataplaneError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

/// Clear `flags` from the policy of each of `keys` that `map` holds.
fn clear_flags<K: Pod>(
    map: &mut HashMap<MapData, K, FlowPolicy>,
    keys: &[K],
    flags: u32,
    name: &'static str,
) -> Result<(), DataplaneError> {
    for key in keys {
        if let Some(mut policy) = get(map, key, name)? {
            policy.flags &= !flags;
            map.insert(*key, policy, 0).map_err(map_error(name))?;
        }
    }
    Ok(())
}

/// Remove `key`; false if it was not there.
fn remove<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<bool, DataplaneError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

/// Create a zeroed counter entry for `key` unless one exists (counters of
/// an entry already tracked are kept).
fn ensure_counters<K: Pod>(
    stats: &mut HashMap<MapData, K, FlowStats>,
    key: K,
    name: &'static str,
) -> Result<(), DataplaneError> {
    if get(stats, &key, name)?.is_none() {
        stats
            .insert(key, FlowStats::default(), 0)
            .map_err(map_error(name))?;
    }
    Ok(())
}

/// Every rule of a table with its counters (zero if none were made).
fn entries<K: Pod>(
    rules: &HashMap<MapData, K, FlowPolicy>,
    stats: &HashMap<MapData, K, FlowStats>,
    rules_name: &'static str,
    stats_name: &'static str,
) -> Result<Vec<Entry<K>>, DataplaneError> {
    let mut entries = Vec::new();
    for item in rules.iter() {
        let (key, policy) = item.map_err(map_error(rules_name))?;
        let stats = get(stats, &key, stats_name)?.unwrap_or_default();
        entries.push(Entry { key, policy, stats });
    }
    Ok(entries)
}

/// A held packet in userspace: its flow, arrival time and original bytes
/// (the whole Ethernet frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldPacketOwned {
    pub timestamp_ns: u64,
    pub key: FlowKey,
    pub frame: Vec<u8>,
}
