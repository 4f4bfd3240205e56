//! `migrator migrate`: the source side, one step per file, each taking
//! what the one before leaves and nothing else: discover the tree (here),
//! `preflight` (the tree, CRIU's refusals, the addresses, the agent:
//! `Prepared`), `dump` (frozen at CRIU's first notification, the pages
//! streamed to the agent: `Frozen`), `transfer` (the other images sent,
//! addresses given up, held packets: `Released`), `handover` (ready, the
//! tree here killed, commit, restored). `Progress` is what a failure
//! leaves for `rollback`.
//!
//! Any failure before the commit rolls back: the address comes back, CRIU
//! resumes the tree it kept frozen (or, without the page stream, restores
//! it from the images here), the lock is released, and the connections
//! live on. After the commit the process is the
//! destination's: silence then is reported in doubt, never rolled back.
//! If this process is killed mid-way, the lock fails open at its deadline
//! and `migrator recover --images DIR` restores from the images kept.

mod dump;
mod handover;
mod precopy;
mod preflight;
pub mod recover;
mod rollback;
mod transfer;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    channel::{Credentials, message::ServiceAddress},
    criu::CriuBinary,
    dataplane::lock::MigrationLock,
    net::discover,
    report::{self, Outcome, PhaseClock, Report},
};

pub struct MigrateOptions {
    pub pid: i32,
    pub to: SocketAddr,
    /// How this host and the agent prove who they are.
    pub credentials: Credentials,
    /// What the agent's certificate must name (certificate mode); the
    /// address of `to` if not given.
    pub server_name: Option<String>,
    pub service_addresses: Vec<ServiceAddress>,
    /// Interface the service addresses live on (found if not given).
    pub iface: Option<String>,
    /// Fail-open deadline of the locks on both hosts.
    pub deadline: Duration,
    pub criu: CriuBinary,
    /// Where images are written (a fresh directory per migration),
    /// removed at the end unless `recover` may need them.
    pub state: crate::images::StateDir,
    /// Keep the images even after a migration or rollback that worked.
    pub keep_images: bool,
    /// Hold the peers' packets during the freeze and deliver them to the
    /// restored sockets right after the release.
    pub hold: bool,
    /// Stream the memory to the destination while it is dumped (else dump
    /// everything here, then send).
    pub page_stream: bool,
    /// The destination restores lazily: its CRIU leaves the memory to a
    /// `criu lazy-pages` daemon that fills it from the images there once
    /// the process runs.
    pub lazy_restore: bool,
    /// With it: the lazy pages stay here until the destination's daemon
    /// asks for them (after the release).
    pub post_copy: bool,
    pub quiet: bool,
    /// How the destination takes the addresses over; with BGP, this
    /// host's BIRD (its control socket) withdraws them.
    pub takeover: crate::channel::message::Takeover,
    pub bird_socket: PathBuf,
}

/// Everything a rollback needs to know about how far we got.
struct Progress {
    lock: Option<MigrationLock>,
    frozen: bool,
    /// The tree here is gone (killed by CRIU after its dump): only images
    /// can bring it back.
    dumped: bool,
    /// The tree here, frozen by CRIU after a streamed dump, waiting to be
    /// killed (hand-over) or resumed (rollback).
    source_copy: Option<dump::SourceCopy>,
    /// We sent the commit: the destination may run the process, so we must
    /// never restore ours unless it says it removed its copy.
    committed: bool,
    /// We asked for the restore and have not heard that the destination
    /// undid it: until this moment (its hand-over deadline) it may still
    /// own the addresses and have announced them.
    destination_may_own: Option<Instant>,
    /// PIDs the tree needs free to be restored (none in its own PID
    /// namespace).
    pids_needed: Vec<i32>,
    /// Addresses removed from the source, with where they were.
    removed: Vec<(ServiceAddress, String, u32)>,
    /// Addresses a rollback put back (and announces).
    reclaimed: Vec<(IpAddr, String)>,
    images: PathBuf,
    /// The images live on a tmpfs of their own.
    images_in_memory: bool,
    /// The memory streamed to the destination: only its images are
    /// complete.
    pages_at_destination: bool,
    /// The tree here had to be killed without a complete dump (CRIU died
    /// holding it): why no rollback can bring it back.
    source_lost: Option<String>,
    /// After the commit the destination said its copy is lost (a lazy
    /// restore whose memory could not be filled): no copy runs anywhere.
    lost_at_destination: bool,
    /// Where the agent keeps this session's images (its word at
    /// preflight).
    destination_images: String,
    /// After the release, post-copy: the destination killed its copy,
    /// whose memory it could not fill; our images hold the process as it
    /// was at the freeze, not as it ran since.
    destination_lost_copy: bool,
    /// The tree's connections as CRIU dumped them (for the restore's
    /// check at the destination), once CRIU got that far.
    dumped_flows: Option<tokio::sync::oneshot::Receiver<Vec<String>>>,
}

/// Run a migration; the report says how it ended (never panics on the
/// way: every error becomes the report's `error`).
pub async fn migrate(options: MigrateOptions) -> Report {
    let mut clock = PhaseClock::new("source", options.quiet);
    clock.publish_to(crate::watch::phase_file(
        &crate::dataplane::default_pin_root(),
    ));
    let mut report = Report {
        schema_version: report::SCHEMA_VERSION,
        started_unix_ms: crate::system::unix_ms(),
        outcome: Outcome::Refused,
        error: None,
        failed_phase: None,
        source_host: None,
        destination_host: None,
        source_pid: options.pid,
        destination: options.to.to_string(),
        destination_pid: None,
        restored_here_pid: None,
        service_addresses: options
            .service_addresses
            .iter()
            .map(ToString::to_string)
            .collect(),
        phases: Vec::new(),
        freeze_window_ms: None,
        freeze_window_parts: Vec::new(),
        total_ms: 0.0,
        image_bytes: 0,
        criu_dump: None,
        criu_restore: None,
        criu_dump_notifications: Vec::new(),
        connections: Vec::new(),
        confirmed_neighbours: Vec::new(),
        unconfirmed_neighbours: Vec::new(),
        route_convergence: Vec::new(),
        images_kept: None,
        events: Vec::new(),
        memory: None,
        precopy: None,
        dump_retried: None,
        own_segments_blocked_ms: None,
        error_code: None,
        new_connections_held: 0,
        new_connection_attempts_frozen: 0,
    };
    let session = match options
        .state
        .new_session(&format!("migrate-{}", options.pid))
    {
        Ok(session) => session,
        Err(err) => {
            report.error = Some(err.to_string());
            return report;
        }
    };
    let images = session.path().to_owned();
    let mut progress = Progress {
        lock: None,
        frozen: false,
        dumped: false,
        source_copy: None,
        committed: false,
        destination_may_own: None,
        pids_needed: Vec::new(),
        removed: Vec::new(),
        reclaimed: Vec::new(),
        images: images.clone(),
        images_in_memory: session.in_memory(),
        pages_at_destination: false,
        source_lost: None,
        lost_at_destination: false,
        destination_lost_copy: false,
        destination_images: String::new(),
        dumped_flows: None,
    };
    let result = run(&options, &mut clock, &mut report, &mut progress).await;
    match result {
        Ok(()) => report.outcome = Outcome::Migrated,
        Err(error) if progress.lost_at_destination => {
            // Known dead on both hosts: nothing to restore, nothing in doubt.
            report.outcome = Outcome::Failed;
            progress.lock = None;
            report.error = Some(format!(
                "{error}; the process is lost: nothing can be recovered (the source's copy ended at the commit); start the service again"
            ));
        }
        Err(error) if progress.destination_lost_copy => {
            // Dead there, after it ran: our images are the process as it
            // was at the freeze, which its peers have gone past since.
            report.outcome = Outcome::Failed;
            progress.lock = None;
            report.error = Some(format!(
                "{error}; the process is lost: its copy there ran from the release until it was killed. The images kept here ({dir}) are the process as it was at the freeze: `migrator recover --images {dir}` (once the service addresses are off {}, `ip addr del`) would restart it from that moment, but its peers went on with the copy that ran there, so its connections will not carry on; unless that state matters, start the service again",
                options.to,
                dir = images.display(),
            ));
        }
        Err(error) if progress.committed => {
            // At most one copy: never restore here after the commit. The
            // images and the lock (until its deadline) stay for `recover`.
            report.outcome = Outcome::InDoubt;
            progress.lock = None;
            // Where: its memory streamed there, or the images are here.
            let (host, dir) = match (
                progress.pages_at_destination,
                progress.destination_images.as_str(),
            ) {
                (true, "") => ("there", "DIR".to_owned()),
                (true, dir) => ("there", dir.to_owned()),
                (false, _) => ("here", images.display().to_string()),
            };
            let named = if dir == "DIR" {
                ", DIR being the directory the agent's log names"
            } else {
                ""
            };
            // Post-copy: a copy released there ran, and one that could not
            // get its pages is gone, whatever happens here.
            let unless_released = if options.post_copy {
                " (unless the agent's log says it released its copy: with --post-copy, a copy that ran there and was killed for want of its memory is lost, and these images would restart the process from the freeze, its peers gone past it)"
            } else {
                ""
            };
            report.error = Some(format!(
                "{error}; the process now runs on {} or nowhere: check there (the agent's log, `ip addr`); if it does not run there, restore it {host} before the lock's deadline ({} s) with `migrator recover --images {dir}`{named}{unless_released}",
                options.to,
                options.deadline.as_secs(),
            ));
        }
        Err(error) => {
            report.error = Some(error);
            if progress.frozen || progress.dumped {
                let phase = clock.begin(report::ROLLBACK);
                let rolled = rollback::rollback(&options, &mut progress, &mut clock).await;
                clock.end(phase, rolled.is_ok());
                match rolled {
                    Ok(pid) => {
                        report.outcome = Outcome::RolledBack;
                        report.restored_here_pid = pid;
                    }
                    Err(err) => {
                        // The process is not running anywhere. Keep the lock
                        // (until its deadline) so the peers see a slow network,
                        // not resets, while someone restores from the images
                        // (when there is anything to restore from).
                        progress.lock = None;
                        report.outcome = Outcome::Failed;
                        let deadline = options.deadline.as_secs();
                        let what_now = if progress.source_lost.is_some() {
                            format!(
                                "nothing can be recovered: start the service again (the lock lifts at its deadline, {deadline} s, or at once with `migrator recover`)"
                            )
                        } else {
                            format!(
                                "the lock stays until its deadline ({deadline} s): restore from the images kept in {} (`migrator recover --images {}`) before then",
                                images.display(),
                                images.display()
                            )
                        };
                        report.error = Some(format!(
                            "{}; ROLLBACK FAILED: {err}; {what_now}",
                            report.error.take().unwrap_or_default(),
                        ));
                    }
                }
            }
        }
    }
    if let Some(lock) = progress.lock.take() {
        lock.close();
    }
    // Images hold the process's memory: gone once nobody may need them.
    let needed = matches!(report.outcome, Outcome::InDoubt)
        || (matches!(report.outcome, Outcome::Failed) && progress.dumped);
    if needed || options.keep_images {
        report.images_kept = Some(images.display().to_string());
    } else {
        session.remove();
    }
    report.phases = std::mem::take(&mut clock.phases);
    report
        .phases
        .sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    let frozen_at_ms = report
        .phases
        .iter()
        .find(|p| p.name == report::FREEZE)
        .map(|p| p.start_ms);
    report.failed_phase = report.phases.iter().find(|p| !p.ok).map(|p| p.name.clone());
    report.error_code = Report::code_for(&report.outcome, report.failed_phase.as_deref());
    if let (Some(start), Some(window)) = (frozen_at_ms, report.freeze_window_ms) {
        report.freeze_window_parts = report::window_parts(&report.phases, start, start + window);
    }
    report.total_ms = clock.now_ms();
    report
}

async fn run(
    options: &MigrateOptions,
    clock: &mut PhaseClock,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<(), String> {
    // discover: what the process holds, and that it matches --ip.
    let phase = clock.begin(report::DISCOVER);
    let network = discover::discover(options.pid)
        .map_err(|e| e.to_string())
        .and_then(|n| preflight::check_addresses(&n, &options.service_addresses).map(|()| n));
    let network = clock.end_with(phase, network)?;
    // Restoring here after a dump needs the tree's PIDs free again; in a
    // PID namespace of its own the tree gets a fresh namespace instead.
    if !network.own_pid_namespace {
        progress.pids_needed = network.pids.clone();
    }

    let prepared = preflight::prepare(options, &network, clock, progress).await?;
    report.source_host = Some(prepared.source_host.clone());
    report.destination_host = Some(prepared.destination_host.clone());
    progress
        .destination_images
        .clone_from(&prepared.destination_images);
    let crossed = if options.post_copy {
        "dumped here; all but its lazy pages sent, which the destination's daemon then fetched from here after the release (--post-copy)"
    } else if prepared.page_stream {
        "streamed to the destination during the dump, through the channel, into a tmpfs there"
    } else if !options.page_stream {
        "dumped here, then sent (--dump-then-send)"
    } else {
        "dumped here, then sent (both hosts one machine sharing PIDs: the tree must be gone before the restore there)"
    };
    report.memory = Some(if options.post_copy {
        crossed.to_owned()
    } else if options.lazy_restore {
        format!("{crossed}; restored lazily (the memory filled there after the release)")
    } else {
        crossed.to_owned()
    });
    report.precopy = Some(precopy::describe(options.criu.dirty_tracking()));
    let frozen = dump::dump(options, prepared, clock, report, progress).await?;
    let released = transfer::transfer_and_release(options, frozen, clock, report, progress).await?;
    handover::hand_over(released, clock, report, progress).await
}
