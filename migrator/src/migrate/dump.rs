//! The dump: CRIU started ahead, the lock frozen at CRIU's first
//! notification (right before it freezes the tree), one retry of a failed
//! dump while still frozen. After it, every wait on the agent ends early
//! enough to roll back before the lock fails open.

use std::{path::Path, time::Instant};

use super::{MigrateOptions, Progress, preflight::Prepared};
use crate::{
    channel::{TlsChannel, message::ServiceAddress},
    criu::stats::read_dump_stats,
    net::address::Netlink,
    report::{self, PhaseClock, Report},
};

/// Dumped, frozen, the images on disk here.
pub(super) struct Frozen {
    pub channel: TlsChannel,
    pub netlink: Netlink,
    /// Where each service address lives (to remove it, and put it back).
    pub addresses: Vec<(ServiceAddress, String, u32)>,
    pub frozen_at: Instant,
    /// Hand over (or roll back) before this: the lock's deadline less the
    /// hand-over margin.
    pub handover_by: Instant,
}

pub(super) async fn dump(
    options: &MigrateOptions,
    prepared: Prepared,
    clock: &mut PhaseClock,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<Frozen, String> {
    let Prepared {
        mut channel,
        netlink,
        addresses,
        ..
    } = prepared;
    // CRIU, started now: its start-up stays outside the freeze window.
    let swrk = options
        .criu
        .swrk(&progress.images)
        .map_err(|e| e.to_string())?;

    // dump, with the freeze at CRIU's "pre-dump" notification: the flows
    // and the service addresses (new SYNs wait too) are locked right before
    // CRIU freezes the tree, and stay locked from there on.
    let phase = clock.begin(report::DUMP);
    let services = ServiceAddress::lock_rules(&options.service_addresses);
    let mut lock = progress.lock.take();
    let (deadline, pid, hold) = (options.deadline, options.pid, options.hold);
    let (criu, images) = (options.criu.clone(), progress.images.clone());
    let (dumped, lock, frozen_at) = tokio::task::spawn_blocking(move || {
        let mut frozen_at = None;
        let mut freeze_once = |_script: &str| {
            // The first notification ("pre-dump") comes before CRIU touches
            // the tree; freeze there.
            if frozen_at.is_none() {
                if let Some(lock) = lock.as_mut() {
                    lock.freeze(&services, deadline, hold)
                        .map_err(|e| format!("locking the flows: {e}"))?;
                }
                frozen_at = Some(Instant::now());
            }
            Ok(())
        };
        let mut result = swrk.dump(pid, &mut freeze_once);
        // A failed dump leaves the tree running (CRIU resumes it). Some
        // failures are passing (seen here: the parasite failing to read
        // /proc/self/cgroup), so try once more, still frozen, from an
        // empty images directory.
        if result.is_err() && clear_dir(&images).is_ok() {
            tracing::warn!(
                "criu dump failed, retrying once: {:?}",
                result.as_ref().err()
            );
            result = criu
                .swrk(&images)
                .and_then(|swrk| swrk.dump(pid, &mut freeze_once));
        }
        (result, lock, frozen_at)
    })
    .await
    .map_err(|e| e.to_string())?;
    progress.lock = lock;
    progress.frozen = frozen_at.is_some();
    if let Some(at) = frozen_at {
        let start_ms = at.duration_since(clock.started()).as_secs_f64() * 1e3;
        clock.record_quiet(report::Phase {
            name: report::FREEZE.to_owned(),
            host: "source".to_owned(),
            start_ms,
            duration_ms: 0.0,
            ok: true,
        });
    }
    let frozen_at = frozen_at.unwrap_or_else(Instant::now);
    // Every wait on the agent from now on ends early enough to roll back
    // (or hand over) before our lock fails open.
    let margin = crate::agent::handover_margin(options.deadline);
    let handover_by = frozen_at + options.deadline.saturating_sub(margin);
    channel.set_hard_deadline(handover_by);
    // CRIU resumes the tree when a dump fails: only the lock to undo.
    let outcome = clock.end_with(phase, dumped.map_err(|err| format!("dump: {err}")))?;
    progress.dumped = true;
    report.criu_dump_notifications = outcome.notifications;
    report.criu_dump = read_dump_stats(&progress.images);

    Ok(Frozen {
        channel,
        netlink,
        addresses,
        frozen_at,
        handover_by,
    })
}

/// Remove the files in `dir`, keeping the directory (an open fd may name
/// it).
fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
