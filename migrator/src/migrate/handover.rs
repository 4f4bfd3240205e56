//! The hand-over: the agent restores (stopped), takes the addresses over
//! and says it is ready; we commit, and from then on the process is the
//! destination's. See the agent's `session` for the other half.

use std::time::{Duration, Instant};

use super::{Progress, transfer::Released};
use crate::{
    channel::{self, Message, message::RestoreReply},
    criu::page_source::PageSource,
    criu::stats::read_dump_stats,
    report::{
        self, ConnectionEvent, ConnectionReport, HANDOVER, MAX_EVENTS_PER_HOST, Phase, PhaseClock,
        Report, connection_events,
    },
};

pub(super) async fn hand_over(
    released: Released,
    clock: &mut PhaseClock,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<(), String> {
    let Released {
        mut channel,
        frozen_at,
        handover_by,
        packets_at_ip_release,
        hold,
        lazy_restore,
        post_copy,
    } = released;
    // restore, announce, confirm: at the agent, which then waits,
    // the process stopped and the lock on, for our commit.
    clock.publish("restore (destination)");
    let asked_at_ms = clock.now_ms();
    progress.destination_may_own = Some(handover_by);
    // Listed by CRIU's thread at post-dump, meanwhile; without it the
    // agent checks the preflight's connections.
    let dumped_flows = match progress.dumped_flows.take() {
        Some(listed) => tokio::time::timeout(Duration::from_millis(500), listed)
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    channel
        .send(&Message::Restore {
            frozen_for_ms: frozen_at.elapsed().as_secs_f64() * 1e3,
            dumped_flows,
        })
        .await
        .map_err(|e| format!("asking for the restore: {e}"))?;
    // Post-copy: the restore there may need lazy pages already.
    let mut pages = post_copy.then(|| PageSource::new(&progress.images));
    match channel::post_copy::receive_answering(&mut channel, pages.as_mut(), Some(handover_by))
        .await
    {
        Ok(Message::Ready) => {}
        Ok(Message::Failed { phase, reason }) => {
            return Err(undone_there(clock, progress, &phase, &reason));
        }
        Ok(Message::Refused { reason }) => {
            progress.destination_may_own = None;
            return Err(format!(
                "destination refused: {}",
                channel::printable(&reason)
            ));
        }
        Ok(other) => return Err(format!("destination answered {}", other.name())),
        // The agent resumes nothing without our commit, and removes its
        // copy when we hang up: rolling back is safe.
        Err(err) => {
            failed_here(clock);
            return Err(format!("destination not ready for the hand-over: {err}"));
        }
    }
    // The tree here goes first: once no process of it can run again, and
    // only then, may the destination's copy run.
    let mut dying_copy = None;
    if let Some(copy) = progress.source_copy.take() {
        let phase = clock.begin(report::SOURCE_EXIT);
        let dying = match copy.kill().await {
            Ok(dying) => {
                clock.end(phase, true);
                dying
            }
            Err(err) => {
                // CRIU resumes the tree when it fails: tell the destination
                // to remove its copy and its images.
                clock.end(phase, false);
                let reason = format!("ending the tree here: {err}");
                let _ = channel
                    .send(&Message::Failed {
                        phase: report::SOURCE_EXIT.to_owned(),
                        reason: reason.clone(),
                    })
                    .await;
                return Err(reason);
            }
        };
        progress.dumped = true;
        dying_copy = Some(dying);
    }
    // With --hold, what still reached us (peers that had not learnt the
    // new owner yet: a new client's SYN among them) goes with the commit.
    if hold && let Err(err) = super::transfer::send_held(&mut channel, progress).await {
        tracing::warn!("held packets that came late were not sent: {err}");
    }
    // The commit: from here on the process is the destination's.
    progress.committed = true;
    let answer = match channel.send(&Message::Commit).await {
        Ok(()) => channel.receive().await,
        Err(err) => Err(err),
    };
    let mut reply: RestoreReply = match answer {
        Ok(Message::Restored(reply)) => *reply,
        Ok(Message::Failed { phase, reason }) => {
            // It says its copy is gone: ours may run again.
            progress.committed = false;
            return Err(undone_there(clock, progress, &phase, &reason));
        }
        Ok(other) => {
            return Err(format!(
                "after the commit the destination answered {}",
                other.name()
            ));
        }
        Err(err) => {
            failed_here(clock);
            return Err(format!("after the commit: {err}"));
        }
    };
    let answered = Instant::now();
    // The process is the destination's now; what is left here is our own
    // bookkeeping and cleanup.
    clock.publish("cleanup");
    // CRIU finished with the tree meanwhile: its own account of the dump.
    if let Some(dying) = dying_copy
        && let Ok(outcome) = dying.outcome().await
    {
        report.criu_dump_notifications = outcome.notifications;
        report.criu_dump = read_dump_stats(&progress.images);
    }
    for mut phase in std::mem::take(&mut reply.phases) {
        phase.start_ms += asked_at_ms;
        phase.name = channel::printable(&phase.name);
        phase.host = "destination".to_owned();
        clock.record(phase);
    }
    // The agent's numbers are checked, not trusted: a hostile or broken
    // reply must not make arithmetic panic here.
    let released_at = Duration::try_from_secs_f64(reply.since_release_ms / 1e3)
        .ok()
        .and_then(|ago| answered.checked_sub(ago))
        .unwrap_or(answered);
    report.freeze_window_ms = Some(
        released_at
            .saturating_duration_since(frozen_at)
            .as_secs_f64()
            * 1e3,
    );
    let released_at_ms = clock.now_ms() - released_at.elapsed().as_secs_f64() * 1e3;
    report.destination_pid = Some(reply.pid);
    report.criu_restore = reply.criu_restore.take();
    report.new_connections_held = reply.syns_delivered;
    report.confirmed_neighbours = std::mem::take(&mut reply.confirmed);
    report.unconfirmed_neighbours = std::mem::take(&mut reply.unconfirmed);
    report.route_convergence = std::mem::take(&mut reply.route_convergence)
        .into_iter()
        .map(|mut peer| {
            peer.peer = channel::printable(&peer.peer);
            peer
        })
        .collect();

    // Stale packets: peers still sending to the old host after it gave
    // up the address (keep counting a moment after the release). With a
    // lazy restore, the fill first: with post-copy the process there
    // waits for our pages from its release on (a plain wait here held
    // every peer up 200 ms more at 64 MiB).
    let stale_counted_by = tokio::time::Instant::now() + STALE_PACKETS_WAIT;
    let filled = if lazy_restore {
        await_memory_fill(
            &mut channel,
            pages.as_mut(),
            clock,
            released_at_ms,
            progress,
        )
        .await
    } else {
        Ok(())
    };
    tokio::time::sleep_until(stale_counted_by).await;
    // Both hosts' packet events, on our timeline, since we began.
    let mut events: Vec<ConnectionEvent> = std::mem::take(&mut reply.events)
        .into_iter()
        .map(|mut event| {
            event.at_ms += asked_at_ms;
            event.connection = channel::printable(&event.connection);
            event.kind = channel::printable(&event.kind);
            event.direction = channel::printable(&event.direction);
            event.host = "destination".to_owned();
            event
        })
        .take(MAX_EVENTS_PER_HOST)
        .collect();
    if let Some(lock) = progress.lock.as_mut() {
        report.new_connection_attempts_frozen = lock.new_connection_attempts();
        let raw = lock.drain_events();
        events.extend(connection_events(
            &raw,
            lock.flows(),
            "source",
            clock.now_ms(),
        ));
    }
    events.retain(|event| event.at_ms >= 0.0);
    events.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    report.events = events;
    if let Some(lock) = progress.lock.as_ref() {
        for (i, (flow, stats)) in lock.counters().into_iter().enumerate() {
            let name = flow.to_string();
            let destination = reply.connections.iter().find(|c| c.flow == name);
            report.connections.push(ConnectionReport {
                local: flow.local.to_string(),
                remote: flow.remote.to_string(),
                peer_retransmits_source: stats.peer_retransmits,
                peer_retransmits_destination: destination.map_or(0, |c| c.peer_retransmits),
                stale_packets_source: stats
                    .packets_in
                    .saturating_sub(packets_at_ip_release.get(i).copied().unwrap_or(0)),
                held_delivered: reply
                    .held_delivered
                    .iter()
                    .find(|(held_flow, _)| *held_flow == name)
                    .map_or(0, |(_, count)| *count),
            });
        }
    }
    filled
}

/// How long after the release we count the packets that still reach us.
const STALE_PACKETS_WAIT: Duration = Duration::from_millis(200);

/// How long the destination's lazy restore may take to fill the memory
/// after the release before we stop waiting (the process runs meanwhile;
/// only the report waits).
const MEMORY_FILL_WAIT: Duration = Duration::from_secs(120);

/// With a lazy restore, the destination's word that the restored memory
/// is complete (its fill, as a phase after the release), or that it could
/// not be. With post-copy (`pages`), we answer its daemon's page requests
/// from our images meanwhile, and until then the process needs both
/// hosts: a copy it could not fill, it killed after it ran, and it is
/// lost (our images, kept, are the process at the freeze); if we lose
/// touch, it is in doubt (the copy there is killed once its daemon can
/// get no more pages, but we cannot know that it was). Without, a copy
/// it could not fill is lost.
async fn await_memory_fill(
    channel: &mut crate::channel::TlsChannel,
    pages: Option<&mut PageSource>,
    clock: &mut PhaseClock,
    released_at_ms: f64,
    progress: &mut Progress,
) -> Result<(), String> {
    let post_copy = pages.is_some();
    let answer = channel::post_copy::receive_answering(
        channel,
        pages,
        Some(Instant::now() + MEMORY_FILL_WAIT),
    )
    .await;
    match answer {
        Ok(Message::MemoryFilled { after_release_ms }) => {
            clock.record(memory_fill_phase(released_at_ms, after_release_ms));
            Ok(())
        }
        Ok(Message::Failed { reason, .. }) if post_copy => {
            progress.destination_lost_copy = true;
            Err(format!(
                "the destination could not fill the memory of its copy, which it killed: {}",
                channel::printable(&reason)
            ))
        }
        Ok(Message::Failed { reason, .. }) => {
            progress.lost_at_destination = true;
            Err(format!(
                "the destination's lazy restore could not fill the memory: {}",
                channel::printable(&reason)
            ))
        }
        Ok(other) => Err(format!(
            "waiting for the lazy restore's memory fill, the destination answered {}",
            other.name()
        )),
        Err(err) if post_copy => Err(format!(
            "answering the destination's page requests (post-copy): {err}"
        )),
        Err(err) => Err(format!("waiting for the lazy restore's memory fill: {err}")),
    }
}

fn memory_fill_phase(released_at_ms: f64, after_release_ms: f64) -> Phase {
    Phase {
        name: report::MEMORY_FILL.to_owned(),
        host: "destination".to_owned(),
        start_ms: released_at_ms,
        duration_ms: after_release_ms.clamp(0.0, MEMORY_FILL_WAIT.as_secs_f64() * 1e3),
        ok: true,
    }
}

/// The destination failed and undid everything (its copy, the addresses)
/// before it answered: note its failed phase on our timeline (its failure
/// replies carry no timings) and say what happened.
fn undone_there(
    clock: &mut PhaseClock,
    progress: &mut Progress,
    phase: &str,
    reason: &str,
) -> String {
    progress.destination_may_own = None;
    let phase = channel::printable(phase);
    clock.record_quiet(Phase {
        name: phase.clone(),
        host: "destination".to_owned(),
        start_ms: clock.now_ms(),
        duration_ms: 0.0,
        ok: false,
    });
    format!("destination {phase}: {}", channel::printable(reason))
}

/// The hand-over failed on our side (silence, a broken connection).
fn failed_here(clock: &mut PhaseClock) {
    clock.record_quiet(Phase {
        name: HANDOVER.to_owned(),
        host: "source".to_owned(),
        start_ms: clock.now_ms(),
        duration_ms: 0.0,
        ok: false,
    });
}
