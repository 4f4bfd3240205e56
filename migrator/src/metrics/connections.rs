//! The connections `watch` follows, as metrics: encoded at each scrape
//! from the latest snapshot (the kernel's counters are absolute, so they
//! are exposed as they are, not re-counted here).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use crate::watch::model::{Row, RowMode, Snapshot};

/// The latest snapshot, shared by the watch loop and the scrapes.
#[derive(Debug, Default, Clone)]
pub struct Latest(Arc<Mutex<Option<Snapshot>>>);

impl Latest {
    pub fn set(&self, snapshot: &Snapshot) {
        if let Ok(mut latest) = self.0.lock() {
            *latest = Some(snapshot.clone());
        }
    }
}

/// The collector: one family per counter of a connection.
#[derive(Debug)]
pub struct Connections {
    latest: Latest,
    /// `local`/`remote` labels per connection; without, one sum.
    per_connection: bool,
}

impl Connections {
    pub fn new(latest: Latest, per_connection: bool) -> Self {
        Self {
            latest,
            per_connection,
        }
    }
}

type Value = fn(&Row) -> Option<f64>;
/// How a gauge's connections fold into one series without labels.
type Fold = fn(f64, f64) -> f64;
/// Name, help, unit, value per connection, fold.
type GaugeFamily = (&'static str, &'static str, Option<Unit>, Value, Fold);

/// Counters: name (without `_total`), help, value.
const COUNTERS: [(&str, &str, Option<Unit>, Value); 6] = [
    (
        "migrator_peer_retransmits",
        "Segments the peer sent again (sequence range already seen).",
        None,
        |r| Some(r.peer_retransmits as f64),
    ),
    (
        "migrator_local_retransmits",
        "Segments this host sent again (tcp_retransmit_skb; absent where not counted).",
        None,
        |r| r.local_retransmits.map(|n| n as f64),
    ),
    (
        "migrator_packets_dropped",
        "Segments the lock dropped, both directions.",
        None,
        |r| Some(r.packets_dropped as f64),
    ),
    (
        "migrator_packets_held",
        "Peer packets the lock kept for later delivery.",
        None,
        |r| Some(r.packets_held as f64),
    ),
    (
        "migrator_received",
        "Bytes received on the connection.",
        Some(Unit::Bytes),
        |r| Some(r.bytes_in as f64),
    ),
    (
        "migrator_sent",
        "Bytes sent on the connection.",
        Some(Unit::Bytes),
        |r| Some(r.bytes_out as f64),
    ),
];

/// Gauges.
const GAUGES: [GaugeFamily; 3] = [
    (
        "migrator_flow_frozen",
        "1 while the connection is frozen or held (summed: how many are).",
        None,
        |r| {
            Some(f64::from(u8::from(matches!(
                r.mode,
                RowMode::Frozen | RowMode::Held
            ))))
        },
        |a, b| a + b,
    ),
    (
        "migrator_flow_frozen",
        "How long the connection has been frozen (absent when not frozen; the longest without labels).",
        Some(Unit::Seconds),
        |r| r.frozen_ms.map(|ms| ms as f64 / 1e3),
        f64::max,
    ),
    (
        "migrator_since_peer_retransmit",
        "Time since the peer's latest retransmit (absent if none; the shortest without labels).",
        Some(Unit::Seconds),
        |r| r.ms_since_peer_retransmit.map(|ms| ms as f64 / 1e3),
        f64::min,
    ),
];

impl Collector for Connections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(snapshot) = self.latest.0.lock().ok().and_then(|s| s.clone()) else {
            return Ok(());
        };
        let labels = |row: &Row| [("local", row.local.clone()), ("remote", row.remote.clone())];
        for (name, help, unit, value) in COUNTERS {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            if self.per_connection {
                for row in &snapshot.rows {
                    if let Some(v) = value(row) {
                        ConstCounter::new(v).encode(family.encode_family(&labels(row))?)?;
                    }
                }
            } else if let Some(sum) = snapshot.rows.iter().filter_map(value).reduce(|a, b| a + b) {
                ConstCounter::new(sum).encode(family)?;
            }
        }
        for (name, help, unit, value, fold) in GAUGES {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            if self.per_connection {
                for row in &snapshot.rows {
                    if let Some(v) = value(row) {
                        ConstGauge::new(v).encode(family.encode_family(&labels(row))?)?;
                    }
                }
            } else if let Some(folded) = snapshot.rows.iter().filter_map(value).reduce(fold) {
                ConstGauge::new(folded).encode(family)?;
            }
        }
        let connections = encoder.encode_descriptor(
            "migrator_connections",
            "Connections followed here.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snapshot.rows.len() as i64).encode(connections)?;
        // Only while a migration locks service addresses here; a few
        // addresses at most, so always labelled.
        if !snapshot.new_clients.is_empty() {
            let mut waiting = encoder.encode_descriptor(
                "migrator_new_clients_waiting",
                "New clients' connection attempts (SYNs) held or dropped by the lock of a migration in flight, per service address.",
                None,
                MetricType::Gauge,
            )?;
            for service in &snapshot.new_clients {
                ConstGauge::new(service.waiting as i64)
                    .encode(waiting.encode_family(&[("service", service.service.clone())])?)?;
            }
        }
        if let Some(phase) = &snapshot.migration_phase {
            let mut info = encoder.encode_descriptor(
                "migrator_migration_phase",
                "The phase of the migration running here.",
                None,
                MetricType::Info,
            )?;
            info.encode_info(&[("phase", phase.clone())])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prometheus_client::registry::Registry;

    use super::*;

    fn row(local: &str, retransmits: u64, frozen_ms: Option<u64>) -> Row {
        Row {
            ts_ms: 0,
            local: local.to_owned(),
            remote: "198.18.0.1:9000".to_owned(),
            mode: if frozen_ms.is_some() {
                RowMode::Frozen
            } else {
                RowMode::Observe
            },
            peer_retransmits: retransmits,
            peer_retransmits_per_s: 0.0,
            ms_since_peer_retransmit: None,
            local_retransmits: None,
            packets_dropped: 2,
            packets_held: 0,
            bytes_in: 1000,
            bytes_out: 10,
            frozen_ms,
            next_peer_retransmit_in_ms: None,
        }
    }

    fn scrape(per_connection: bool) -> String {
        let latest = Latest::default();
        latest.set(&Snapshot {
            ts_ms: 0,
            rows: vec![
                row("198.18.0.100:1", 3, Some(1500)),
                row("198.18.0.100:2", 4, None),
            ],
            new_clients: Vec::new(),
            totals: Default::default(),
            migration_phase: Some("dump".to_owned()),
            local_retransmits_uncounted: None,
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Connections::new(latest, per_connection)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn per_connection_series_or_one_sum() {
        let labelled = scrape(true);
        assert!(
            labelled.contains(
                "migrator_peer_retransmits_total{local=\"198.18.0.100:1\",remote=\"198.18.0.1:9000\"} 3"
            ),
            "{labelled}"
        );
        assert!(labelled.contains("migrator_received_bytes_total{local=\"198.18.0.100:2\""));
        assert!(labelled.contains(
            "migrator_flow_frozen_seconds{local=\"198.18.0.100:1\",remote=\"198.18.0.1:9000\"} 1.5"
        ));
        assert!(labelled.contains("migrator_migration_phase_info{phase=\"dump\"} 1"));
        assert!(labelled.contains("migrator_connections 2"));
        let summed = scrape(false);
        assert!(!summed.contains("local="), "{summed}");
        assert!(
            summed.contains("migrator_peer_retransmits_total 7"),
            "{summed}"
        );
        assert!(
            summed.contains("migrator_packets_dropped_total 4"),
            "{summed}"
        );
        assert!(summed.contains("migrator_flow_frozen 1"), "{summed}");
        assert!(
            summed.contains("migrator_flow_frozen_seconds 1.5"),
            "{summed}"
        );
    }
}
