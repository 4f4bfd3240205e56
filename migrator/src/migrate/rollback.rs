//! Putting the process back here after a failure: the addresses (and
//! announcing them, and once more after a destination we lost touch with
//! has given them up), the tree resumed by the CRIU that kept it frozen
//! (or, if it was killed after a local dump, CRIU's restore from our
//! images once the tree's PIDs are free), the lock released.

use std::{net::IpAddr, time::Duration};

use super::{MigrateOptions, Progress};
use crate::channel::message::Takeover;
use crate::{
    net::address::Netlink,
    report::{self, PhaseClock},
};

/// Put the process back here: addresses, the tree resumed (or restored
/// from our images if it was killed), lock released.
/// Returns the PID of the process restored here, if it had to be.
pub(super) async fn rollback(
    options: &MigrateOptions,
    progress: &mut Progress,
    clock: &mut PhaseClock,
) -> Result<Option<i32>, String> {
    if let Some(lost) = &progress.source_lost {
        return Err(lost.clone());
    }
    let mut restored = None;
    if !progress.removed.is_empty() {
        let netlink = Netlink::connect().map_err(|e| e.to_string())?;
        for (address, iface, index) in progress.removed.drain(..) {
            netlink
                .add(&iface, index, address.ip, address.prefix)
                .await
                .map_err(|e| format!("re-adding {address}: {e}"))?;
            progress.reclaimed.push((address.ip, iface));
        }
        // The destination may have announced the addresses already: win
        // the peers' neighbour caches back (with BGP, putting them back
        // was the announcement).
        if options.takeover == Takeover::L2 {
            announce_again(progress.reclaimed.clone()).await;
        }
    }
    if let Some(copy) = progress.source_copy.take() {
        // Kept frozen by CRIU: resumed as it was, its memory never left.
        let phase = clock.begin(report::RESUME);
        let resumed = copy
            .resume("the migration is rolling back", &mut progress.source_lost)
            .await;
        clock.end_with(
            phase,
            resumed.map_err(|e| format!("resuming the tree here: {e}")),
        )?;
    } else if progress.dumped {
        // The dumped tree's PIDs come free once its parent reaps it, and a
        // copy the destination restored and undid once the agent reaps it.
        if !progress.pids_needed.is_empty() {
            let phase = clock.begin(report::PID_WAIT);
            let pids = progress.pids_needed.clone();
            let waited = tokio::task::spawn_blocking(move || {
                crate::system::wait_for_free_pids(&pids, crate::system::PID_WAIT_LIMIT)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|taken| {
                format!(
                    "restoring here: {} still taken",
                    crate::system::describe_pids(&taken)
                )
            });
            clock.end_with(phase, waited)?;
        }
        let criu = options.criu.clone();
        let dir = progress.images.clone();
        let outcome = tokio::task::spawn_blocking(move || criu.restore(&dir, |_| Ok(())))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("restoring here: {e}"))?;
        restored = outcome.pid;
        progress.dumped = false;
    }
    if let Some(mut lock) = progress.lock.take() {
        let released = lock
            .release()
            .map_err(|e| format!("releasing the lock: {e}"));
        lock.close();
        released?;
    }
    // A destination we lost touch with keeps the addresses (announced)
    // until its hand-over deadline, then removes them: announce once more
    // after it, or the peers keep sending there.
    if let Some(until) = progress.destination_may_own.take()
        && !progress.reclaimed.is_empty()
        && options.takeover == Takeover::L2
    {
        let phase = clock.begin(report::RECLAIM);
        tokio::time::sleep_until((until + Duration::from_millis(200)).into()).await;
        announce_again(progress.reclaimed.clone()).await;
        clock.end(phase, true);
    }
    Ok(restored)
}

/// Announce addresses we own again (best effort: the peers also re-learn
/// on their own, only slower).
async fn announce_again(addresses: Vec<(IpAddr, String)>) {
    let _ = tokio::task::spawn_blocking(move || {
        for (ip, iface) in addresses {
            match crate::net::announce::Link::open(&iface) {
                Ok(mut link) => {
                    for _ in 0..2 {
                        if let Err(err) = link.announce(ip) {
                            tracing::warn!("announcing {ip} again on {iface}: {err}");
                        }
                    }
                }
                Err(err) => tracing::warn!("announcing {ip} again on {iface}: {err}"),
            }
        }
    })
    .await;
}
