//! The record of one migration: where every millisecond of the freeze
//! window went, CRIU's own timings, per-connection counters and the
//! outcome. Written as JSON (`--report FILE`, `--json`) and summed up for
//! people on stderr, with a progress line per phase as it happens.

pub mod summary;
pub mod timeline;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::criu::{
    stats::{DumpStats, RestoreStats},
    swrk::Notification,
};

/// Phase names, in the order a migration runs them.
pub const DISCOVER: &str = "discover";
pub const PREFLIGHT: &str = "preflight";
pub const FREEZE: &str = "freeze";
pub const DUMP: &str = "dump";
pub const TRANSFER: &str = "transfer";
pub const IP_RELEASE: &str = "ip-release";
pub const IP_TAKEOVER: &str = "ip-takeover";
pub const PID_WAIT: &str = "pid-wait";
pub const RESTORE: &str = "restore";
pub const ANNOUNCE: &str = "announce";
/// From the announcement until every peer answered the new owner's echo.
pub const ROUTE_CONVERGENCE: &str = "route-convergence";
pub const RELEASE: &str = "release";
pub const DELIVER_HELD: &str = "deliver-held";
pub const ROLLBACK: &str = "rollback";
/// CRIU killing the tree on the source, the hand-over's point of no return.
pub const SOURCE_EXIT: &str = "source-exit";
/// CRIU resuming the tree on the source it kept frozen (a rollback).
pub const RESUME: &str = "resume";
/// Destination: from "ready" (restored, stopped, address owned) to the
/// source's commit.
pub const HANDOVER: &str = "hand-over";
/// Source, after a rollback that lost touch with the destination: waiting
/// out its hand-over deadline, then announcing the addresses again.
pub const RECLAIM: &str = "reclaim";
/// With a lazy restore: the destination filling the restored memory from
/// its images, after the release (outside the freeze window).
pub const MEMORY_FILL: &str = "memory-fill";
/// With a lazy restore: the destination starting `criu lazy-pages` (it
/// reads the dump's inventory, so not before the images are in).
pub const LAZY_PAGES_START: &str = "lazy-pages-start";

/// The report's layout version: bumped when a field changes meaning.
pub const SCHEMA_VERSION: u32 = 3;

/// A host that took part, as it describes itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    /// Kernel release.
    pub kernel: String,
    pub criu_version: String,
    pub migrator_version: String,
}

impl HostInfo {
    /// This host, with the CRIU version in use.
    pub fn here(criu_version: String) -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|text| text.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            criu_version,
            migrator_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// One packet-level event of a migrating connection, from the lock's
/// EVENTS ring (or the agent's delivery of held packets), placed on the
/// report's timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    /// `LOCAL=REMOTE`, local being the service side.
    pub connection: String,
    /// "source" or "destination".
    pub host: String,
    pub at_ms: f64,
    /// `peer-retransmit`, `drop`, `hold`, or `held-delivered`.
    pub kind: String,
    /// `in` (from the peer) or `out`.
    pub direction: String,
}

/// At most this many events per host go into a report (a bulk flow frozen
/// for seconds drops many packets; the counters stay exact).
pub const MAX_EVENTS_PER_HOST: usize = 5_000;

/// Events of the ring for `flows`, on a timeline where `now_ms` is now:
/// each kernel timestamp (CLOCK_BOOTTIME) is placed relative to now.
pub fn connection_events(
    events: &[migrator_common::Event],
    flows: &[crate::dataplane::spec::FlowSpec],
    host: &str,
    now_ms: f64,
) -> Vec<ConnectionEvent> {
    use migrator_common::{
        EVENT_DROP, EVENT_HOLD, EVENT_PEER_RETRANSMIT, event::DIRECTION_INGRESS,
    };
    let now_ns = crate::system::boottime_ns();
    events
        .iter()
        .filter_map(|event| {
            let flow = flows.iter().find(|flow| flow.key() == event.key)?;
            let kind = match event.kind {
                EVENT_PEER_RETRANSMIT => "peer-retransmit",
                EVENT_DROP => "drop",
                EVENT_HOLD => "hold",
                _ => return None,
            };
            let ago_ms = now_ns.saturating_sub(event.timestamp_ns) as f64 / 1e6;
            Some(ConnectionEvent {
                connection: flow.to_string(),
                host: host.to_owned(),
                at_ms: now_ms - ago_ms,
                kind: kind.to_owned(),
                direction: if event.direction == DIRECTION_INGRESS {
                    "in"
                } else {
                    "out"
                }
                .to_owned(),
            })
        })
        .take(MAX_EVENTS_PER_HOST)
        .collect()
}

/// What a stretch of the freeze window was spent on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowPart {
    pub name: String,
    pub host: String,
    pub ms: f64,
}

/// Name of the time inside the freeze window no phase covers (messages
/// on the wire, bookkeeping between phases).
pub const BETWEEN_PHASES: &str = "between phases";

/// The freeze window `[start_ms, end_ms]` as the phases that fill it, in
/// order, each only for the part inside the window and not already
/// covered by an earlier phase, and the rest as [`BETWEEN_PHASES`]: the
/// parts add up to the window.
pub fn window_parts(phases: &[Phase], start_ms: f64, end_ms: f64) -> Vec<WindowPart> {
    let mut spans: Vec<(f64, f64, &Phase)> = phases
        .iter()
        // The memory fill starts at the release, whatever the two hosts'
        // clocks say.
        .filter(|p| p.name != FREEZE && p.name != MEMORY_FILL)
        .map(|p| {
            (
                p.start_ms.max(start_ms),
                (p.start_ms + p.duration_ms).min(end_ms),
                p,
            )
        })
        .filter(|(from, to, _)| to > from)
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut parts: Vec<WindowPart> = Vec::new();
    let (mut cursor, mut between) = (start_ms, 0.0);
    for (from, to, phase) in spans {
        if from > cursor {
            between += from - cursor;
            cursor = from;
        }
        if to > cursor {
            match parts.last_mut() {
                Some(last) if last.name == phase.name && last.host == phase.host => {
                    last.ms += to - cursor;
                }
                _ => parts.push(WindowPart {
                    name: phase.name.clone(),
                    host: phase.host.clone(),
                    ms: to - cursor,
                }),
            }
            cursor = to;
        }
    }
    between += (end_ms - cursor).max(0.0);
    if between > 0.0 {
        parts.push(WindowPart {
            name: BETWEEN_PHASES.to_owned(),
            host: "-".to_owned(),
            ms: between,
        });
    }
    parts
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// "source" or "destination".
    pub host: String,
    /// From the start of the migration (for destination phases: placed on
    /// the source's clock at the moment it asked for the restore).
    pub start_ms: f64,
    pub duration_ms: f64,
    pub ok: bool,
}

/// Lock counters of one connection on one host.
/// One peer's proof that its packets for the service address reach the
/// destination: an echo from the address, answered there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerConvergence {
    pub peer: String,
    /// From the destination's announcement to the peer's first answer
    /// there; null when none came.
    pub answered_after_ms: Option<f64>,
    /// The peer answered the source's echo before the move: then its
    /// answer is required before the release.
    pub answered_before: bool,
    /// How long it was probed at most (a peer that never answers echo:
    /// "unconfirmed, released on timeout").
    pub waited_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectionCounters {
    pub flow: String,
    pub peer_retransmits: u64,
    pub packets_in: u64,
    pub dropped: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionReport {
    pub local: String,
    pub remote: String,
    /// Peer retransmits seen by the source's lock from freeze to the end.
    pub peer_retransmits_source: u64,
    /// Peer retransmits seen by the destination's lock until release.
    pub peer_retransmits_destination: u64,
    /// Peer packets that still reached the old host after it gave up the
    /// service address: how long the peer took to learn the new owner.
    pub stale_packets_source: u64,
    pub held_delivered: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The process runs on the destination.
    Migrated,
    /// Something failed after the freeze; the process runs on the source
    /// again with its connections.
    RolledBack,
    /// Refused before anything was frozen: nothing changed, the process
    /// runs here as before (`error` says what to fix).
    Refused,
    /// A failure the rollback could not repair: the process runs nowhere,
    /// the lock holds its peers until its deadline, and `recover` restores
    /// it from the images (`error` says how).
    Failed,
    /// The source committed the hand-over and then heard nothing: the
    /// process runs on the destination or nowhere, never on both (`error`
    /// says how to find out and how to recover).
    InDoubt,
}

impl Outcome {
    /// `migrator migrate`'s exit status for this outcome, one per thing
    /// to do next (documented in `--help` and the README; 1 and 2 are
    /// left to other errors and to bad usage).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Migrated => 0,
            Self::Refused => 3,
            Self::RolledBack => 4,
            Self::Failed => 5,
            Self::InDoubt => 6,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`] of the migrator that wrote it.
    #[serde(default)]
    pub schema_version: u32,
    /// When the migration began, Unix time in ms.
    #[serde(default)]
    pub started_unix_ms: u64,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// The first phase that failed, if one did.
    #[serde(default)]
    pub failed_phase: Option<String>,
    /// Who took part (the destination's as it said at preflight).
    #[serde(default)]
    pub source_host: Option<HostInfo>,
    #[serde(default)]
    pub destination_host: Option<HostInfo>,
    pub source_pid: i32,
    pub destination: String,
    pub destination_pid: Option<i32>,
    /// After a rollback: the PID of the process restored on the source
    /// (it differs from `source_pid` when it has its own PID namespace).
    pub restored_here_pid: Option<i32>,
    pub service_addresses: Vec<String>,
    pub phases: Vec<Phase>,
    /// Freeze on the source to release on the destination.
    pub freeze_window_ms: Option<f64>,
    /// Where the freeze window went: the phases inside it, in order, and
    /// the time between them; they add up to `freeze_window_ms`.
    #[serde(default)]
    pub freeze_window_parts: Vec<WindowPart>,
    pub total_ms: f64,
    pub image_bytes: u64,
    pub criu_dump: Option<DumpStats>,
    pub criu_restore: Option<RestoreStats>,
    pub criu_dump_notifications: Vec<Notification>,
    pub connections: Vec<ConnectionReport>,
    pub confirmed_neighbours: Vec<String>,
    pub unconfirmed_neighbours: Vec<String>,
    /// Each peer's echo round trip to the destination after it announced
    /// the address: when the first answer came, or why none was needed.
    #[serde(default)]
    pub route_convergence: Vec<PeerConvergence>,
    /// The migrating connections' packet events on both hosts (peer
    /// retransmits, drops, holds, held deliveries), oldest first, at most
    /// [`MAX_EVENTS_PER_HOST`] per host.
    #[serde(default)]
    pub events: Vec<ConnectionEvent>,
    /// Where the images were kept (for `recover`, or `--keep-images`);
    /// null when they were removed.
    #[serde(default)]
    pub images_kept: Option<String>,
    /// How the memory crossed: streamed during the dump, or dumped here
    /// and sent after (one machine sharing PIDs).
    #[serde(default)]
    pub memory: Option<String>,
    /// Whether pre-copy (iterative pre-dumps while the process runs) could
    /// shorten the freeze on these hosts, and what was done.
    #[serde(default)]
    pub precopy: Option<String>,
    /// Why CRIU's first dump failed, when it dumped a second time (still
    /// frozen); null when the first dump went through.
    #[serde(default)]
    pub dump_retried: Option<String>,
    /// When the lock's second step stopped the source's own segments too
    /// (ms from the start; the first, at the freeze, stops only the
    /// peers'): right after CRIU froze the tree, again after a dump run a
    /// second time. Null: one step, both directions from the freeze.
    #[serde(default)]
    pub own_segments_blocked_ms: Option<f64>,
    /// New connections that arrived during the freeze (a client's SYN to
    /// a service address), held and delivered to the restored listening
    /// sockets with --hold; without it they wait for their SYN retransmit.
    #[serde(default)]
    pub new_connections_held: u64,
    /// New clients' connection attempts (SYNs to a service address) that
    /// reached the source during the freeze; with --hold they go on to the
    /// destination (see `new_connections_held`), without it they are
    /// dropped and the client resends its SYN (after 1 s, then 3 s).
    #[serde(default)]
    pub new_connection_attempts_frozen: u64,
    /// A stable code next to `error`, for scripts and dashboards: the
    /// outcome and the first failed phase, e.g. `refused:preflight`,
    /// `rolled-back:restore`, `failed:rollback`, `in-doubt:hand-over`;
    /// null when migrated.
    #[serde(default)]
    pub error_code: Option<String>,
}

impl Report {
    /// [`Report::error_code`] from the outcome and the failed phase.
    pub fn code_for(outcome: &Outcome, failed_phase: Option<&str>) -> Option<String> {
        let outcome = match outcome {
            Outcome::Migrated => return None,
            Outcome::Refused => "refused",
            Outcome::RolledBack => "rolled-back",
            Outcome::Failed => "failed",
            Outcome::InDoubt => "in-doubt",
        };
        Some(match failed_phase {
            Some(phase) => format!("{outcome}:{phase}"),
            None => outcome.to_owned(),
        })
    }
}

impl Report {
    /// The outcome in one line: what happened to the process, and where
    /// it runs.
    pub fn verdict(&self) -> String {
        match self.outcome {
            Outcome::Migrated => format!(
                "migrated pid {} to {} (pid {} there)",
                self.source_pid,
                self.destination,
                self.destination_pid.unwrap_or(0)
            ),
            Outcome::RolledBack => match self.restored_here_pid {
                Some(pid) if pid != self.source_pid => format!(
                    "rolled back: the process (was pid {}) runs on this host again as pid {pid}",
                    self.source_pid
                ),
                _ => format!(
                    "rolled back: pid {} runs on this host again",
                    self.source_pid
                ),
            },
            Outcome::Refused => format!(
                "refused: nothing was frozen, pid {} runs here as before",
                self.source_pid
            ),
            Outcome::Failed => format!(
                "FAILED: pid {} runs nowhere; restore it with `migrator recover` (below)",
                self.source_pid
            ),
            Outcome::InDoubt => format!(
                "IN DOUBT: pid {} was handed over to {} but the destination did not confirm",
                self.source_pid, self.destination
            ),
        }
    }

    /// The human summary.
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.verdict());
        if let Some(phase) = &self.failed_phase {
            out.push_str(&format!("  failed phase: {phase}\n"));
        }
        if let Some(code) = &self.error_code {
            out.push_str(&format!("  code: {code}\n"));
        }
        if let Some(error) = &self.error {
            out.push_str(&format!("  reason: {error}\n"));
        }
        if let (Some(source), Some(destination)) = (&self.source_host, &self.destination_host) {
            out.push_str(&format!(
                "  {} (kernel {}, criu {}) -> {} (kernel {}, criu {}), migrator {}\n",
                source.hostname,
                source.kernel,
                source.criu_version,
                destination.hostname,
                destination.kernel,
                destination.criu_version,
                source.migrator_version
            ));
        }
        if let Some(images) = &self.images_kept {
            out.push_str(&format!("  images kept in {images}\n"));
        }
        if let Some(memory) = &self.memory {
            out.push_str(&format!("  memory: {memory}\n"));
        }
        if self.new_connection_attempts_frozen > 0 || self.new_connections_held > 0 {
            out.push_str(&format!(
                "  new clients during the freeze: {} connection attempts reached the source, {} held and delivered at the destination\n",
                self.new_connection_attempts_frozen, self.new_connections_held
            ));
        }
        if let Some(failure) = &self.dump_retried {
            out.push_str(&format!("  dump retried after: {failure}\n"));
        }
        if let Some(precopy) = &self.precopy {
            out.push_str(&format!("  precopy: {precopy}\n"));
        }
        if let Some(window) = self.freeze_window_ms {
            out.push_str(&format!(
                "  freeze window {window:.1} ms (total {:.1} ms, images {:.1} MiB)\n",
                self.total_ms,
                self.image_bytes as f64 / (1 << 20) as f64
            ));
            if !self.freeze_window_parts.is_empty() {
                let parts: Vec<String> = self
                    .freeze_window_parts
                    .iter()
                    .map(|part| format!("{} {:.1}", part.name, part.ms))
                    .collect();
                out.push_str(&format!("    = {} (ms)\n", parts.join(" + ")));
            }
        }
        // As wide as the longest phase name ("route-convergence").
        let width = self
            .phases
            .iter()
            .map(|p| p.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(14);
        out.push_str(&format!(
            "  {:<width$} host          start ms   duration ms\n",
            "phase"
        ));
        for phase in &self.phases {
            out.push_str(&format!(
                "  {:<width$} {:<12} {:>9.1} {:>12.1}{}\n",
                phase.name,
                phase.host,
                phase.start_ms,
                phase.duration_ms,
                if phase.ok { "" } else { "  FAILED" }
            ));
        }
        if let Some(dump) = &self.criu_dump {
            out.push_str(&format!(
                "  criu dump: frozen {:.1} ms (freezing {:.1}, memdump {:.1}, memwrite {:.1}), {} pages written\n",
                dump.frozen_ms, dump.freezing_ms, dump.memdump_ms, dump.memwrite_ms, dump.pages_written
            ));
        }
        if let Some(restore) = &self.criu_restore {
            out.push_str(&format!(
                "  criu restore: {:.1} ms (forking {:.1}), {} pages restored, {}\n",
                restore.restore_ms,
                restore.forking_ms,
                restore.pages_restored,
                if restore.kernel_probes_cached {
                    "kernel probes cached"
                } else {
                    "kernel probes run inside the window (no /run/criu.kdat)"
                }
            ));
        }
        if !self.connections.is_empty() {
            out.push_str(
                "  connection                                   peer rexmit src/dst  stale at src  held delivered\n",
            );
            for c in &self.connections {
                out.push_str(&format!(
                    "  {:<44} {:>8} /{:<4} {:>12} {:>15}\n",
                    format!("{} = {}", c.local, c.remote),
                    c.peer_retransmits_source,
                    c.peer_retransmits_destination,
                    c.stale_packets_source,
                    c.held_delivered
                ));
            }
        }
        out
    }
}

/// Times phases against one start instant and prints a progress line per
/// phase on stderr (unless quiet).
pub struct PhaseClock {
    started: Instant,
    pub phases: Vec<Phase>,
    host: &'static str,
    quiet: bool,
    /// File a watcher reads the current phase from (see `watch`).
    publish: Option<std::path::PathBuf>,
}

impl Drop for PhaseClock {
    fn drop(&mut self) {
        if let Some(path) = &self.publish {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl PhaseClock {
    pub fn new(host: &'static str, quiet: bool) -> Self {
        Self {
            started: Instant::now(),
            phases: Vec::new(),
            host,
            quiet,
            publish: None,
        }
    }

    /// Write each phase's name to `path` as it begins, with our PID (a
    /// killed writer leaves the file: readers check the PID), removed on
    /// drop. See `watch::current_phase`.
    pub fn publish_to(&mut self, path: std::path::PathBuf) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        self.publish = Some(path);
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// Start a phase; finish it with [`PhaseClock::end`].
    pub fn begin(&self, name: &str) -> (String, f64) {
        self.publish(name);
        if !self.quiet {
            eprintln!("[{:>9.1} ms] {name} ...", self.now_ms());
        }
        (name.to_owned(), self.now_ms())
    }

    pub fn end(&mut self, (name, start_ms): (String, f64), ok: bool) -> f64 {
        let duration_ms = self.now_ms() - start_ms;
        if !self.quiet {
            eprintln!(
                "[{:>9.1} ms] {name} {} in {duration_ms:.1} ms",
                self.now_ms(),
                if ok { "done" } else { "FAILED" }
            );
        }
        self.phases.push(Phase {
            name,
            host: self.host.to_owned(),
            start_ms,
            duration_ms,
            ok,
        });
        duration_ms
    }

    /// End a phase with the outcome of its work, which is passed through.
    pub fn end_with<T, E>(&mut self, phase: (String, f64), result: Result<T, E>) -> Result<T, E> {
        self.end(phase, result.is_ok());
        result
    }

    /// Publish a phase that is not timed here (the destination's work).
    pub fn publish(&self, name: &str) {
        if let Some(path) = &self.publish {
            let _ = std::fs::write(path, format!("{name}\n{}\n", std::process::id()));
        }
    }

    /// Record a phase that began at `since` and ends now.
    pub fn record_since(&mut self, name: &str, since: Instant) {
        let start_ms = since
            .saturating_duration_since(self.started())
            .as_secs_f64()
            * 1e3;
        let phase = Phase {
            name: name.to_owned(),
            host: self.host.to_owned(),
            start_ms,
            duration_ms: self.now_ms() - start_ms,
            ok: true,
        };
        self.record_quiet(phase);
    }

    /// Record a phase without a progress line (one shown inside another).
    pub fn record_quiet(&mut self, phase: Phase) {
        self.phases.push(phase);
    }

    /// Record a phase measured elsewhere (the destination's).
    pub fn record(&mut self, phase: Phase) {
        if !self.quiet {
            eprintln!(
                "[{:>9.1} ms] {} ({}) {:.1} ms{}",
                phase.start_ms + phase.duration_ms,
                phase.name,
                phase.host,
                phase.duration_ms,
                if phase.ok { "" } else { " FAILED" }
            );
        }
        self.phases.push(phase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(name: &str, host: &str, start_ms: f64, duration_ms: f64) -> Phase {
        Phase {
            name: name.to_owned(),
            host: host.to_owned(),
            start_ms,
            duration_ms,
            ok: true,
        }
    }

    #[test]
    fn the_window_parts_add_up() {
        let phases = [
            phase("preflight", "source", 0.0, 90.0),
            phase("dump", "source", 80.0, 40.0),
            phase(FREEZE, "source", 100.0, 0.0),
            phase("transfer", "source", 121.0, 10.0),
            phase("restore", "destination", 132.0, 30.0),
            // Overlapping an earlier phase: only the uncovered part counts.
            phase("announce", "destination", 160.0, 5.0),
            phase("rollback", "source", 400.0, 10.0),
        ];
        let parts = window_parts(&phases, 100.0, 170.0);
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["dump", "transfer", "restore", "announce", BETWEEN_PHASES]
        );
        assert_eq!(parts[0].ms, 20.0, "only the dump's part inside the window");
        assert_eq!(parts[3].ms, 3.0, "announce past restore's end");
        let total: f64 = parts.iter().map(|p| p.ms).sum();
        assert!((total - 70.0).abs() < 1e-9, "{parts:?}");
        // 1 ms before transfer, 1 ms before restore, 5 ms after announce.
        assert!((parts[4].ms - 7.0).abs() < 1e-9, "{parts:?}");
    }
}
