//! The dump: CRIU started ahead, the lock frozen at CRIU's first
//! notification (right before it freezes the tree), and the tree's memory
//! streamed to the agent's page server while CRIU dumps it.
//!
//! With the page stream, CRIU then waits at its "post-dump" notification
//! with the tree frozen (its sockets still in repair mode, its memory
//! intact) until the hand-over decides: [`SourceCopy::kill`] lets CRIU
//! kill the tree (the point of no return), [`SourceCopy::resume`] lets it
//! resume the tree (the rollback: nothing to restore). If this process
//! dies meanwhile, CRIU reads the closed socket as a refusal and resumes
//! the tree; the lock fails open at its deadline.
//!
//! Without the page stream (both hosts one machine sharing PIDs, where
//! the tree must be gone before the agent can restore it), CRIU writes
//! every image here and kills the tree at once, and a rollback restores
//! from those images.

use std::time::Instant;

use tokio::{
    net::UnixStream,
    sync::mpsc::{UnboundedReceiver, UnboundedSender},
    task::JoinHandle,
};

use super::{MigrateOptions, Progress, preflight::Prepared};
use crate::{
    channel::{TlsChannel, message::ServiceAddress, pages},
    criu::{
        stats::read_dump_stats,
        swrk::{Outcome, SwrkError, stream_pair},
    },
    dataplane::lock::MigrationLock,
    net::address::Netlink,
    report::{self, PhaseClock, Report},
};

/// Dumped, frozen; the pages at the agent (or every image here).
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

/// What CRIU's thread tells the migration, as it happens.
enum CriuEvent {
    /// The "pre-dump" notification: the lock is frozen (or failed to).
    Locked {
        at: Instant,
        result: Result<(), String>,
        lock: Option<Box<MigrationLock>>,
    },
    /// The "post-dump" notification: every image is written.
    Dumped,
}

/// A lock is large: boxed while it travels between threads.
type DumpResult = (Result<Outcome, SwrkError>, Option<Box<MigrationLock>>);

/// `criu dump` running on a blocking thread, and what it has said.
pub(super) struct DumpTask {
    task: Option<JoinHandle<DumpResult>>,
    events: UnboundedReceiver<CriuEvent>,
}

enum Next {
    Event(CriuEvent),
    Ended(Result<Outcome, String>, Option<Box<MigrationLock>>),
}

impl DumpTask {
    /// The next event, or the dump's end (events sent before it come
    /// first).
    async fn next(&mut self) -> Next {
        let Some(task) = self.task.as_mut() else {
            return Next::Ended(Err("the dump already ended".into()), None);
        };
        tokio::select! {
            biased;
            Some(event) = self.events.recv() => Next::Event(event),
            joined = task => {
                self.task = None;
                match joined {
                    Ok((result, lock)) => Next::Ended(result.map_err(|e| e.to_string()), lock),
                    Err(err) => Next::Ended(Err(format!("the dump's thread: {err}")), None),
                }
            }
        }
    }

    /// Wait for the dump's end, skipping events.
    async fn end(&mut self) -> Result<Outcome, String> {
        loop {
            if let Next::Ended(result, _) = self.next().await {
                return result;
            }
        }
    }
}

/// The tree here, frozen by CRIU at its post-dump notification, waiting
/// for the verdict.
pub(super) struct SourceCopy {
    /// The tree's root, as we see it.
    root: i32,
    verdict: Option<std::sync::mpsc::Sender<Result<(), String>>>,
    dump: DumpTask,
}

/// The tree here, doomed: every process of it has SIGKILL pending or is
/// exiting, so none can run again.
pub(super) enum DyingCopy {
    /// CRIU still finishing (and writing its stats).
    Finishing(DumpTask),
    /// CRIU already done.
    Done(Outcome),
}

impl DyingCopy {
    /// CRIU's outcome of the dump, once it has finished.
    pub async fn outcome(self) -> Result<Outcome, String> {
        match self {
            Self::Finishing(mut dump) => dump.end().await,
            Self::Done(outcome) => Ok(outcome),
        }
    }
}

impl SourceCopy {
    /// Let CRIU kill the tree; return as soon as no process of it can run
    /// again (not when CRIU is done: tearing down its memory takes a while
    /// and belongs outside the freeze window). After this the process
    /// lives only at the destination, once it commits.
    pub async fn kill(mut self) -> Result<DyingCopy, String> {
        // Listed while CRIU still holds every process of it.
        let tree = crate::system::process_tree(self.root);
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Ok(()));
        }
        let doomed = async {
            while !tree.iter().all(|pid| crate::system::doomed(*pid)) {
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        };
        tokio::select! {
            () = doomed => Ok(DyingCopy::Finishing(self.dump)),
            // CRIU ended first: with success the tree is gone; with a
            // failure CRIU resumed it.
            ended = self.dump.end() => ended.map(DyingCopy::Done),
        }
    }

    /// Let CRIU resume the tree, its sockets out of repair mode; the lock
    /// still holds their packets.
    pub async fn resume(mut self, why: &str) -> Result<(), String> {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Err(why.to_owned()));
        }
        match self.dump.end().await {
            // CRIU answers a refused post-dump (or a failed dump) with a
            // failure, having resumed the tree.
            Err(_) => Ok(()),
            Ok(_) => Err("CRIU killed the tree although the migration was rolling back".into()),
        }
    }
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
        page_stream,
        ..
    } = prepared;
    // CRIU, started now: its start-up stays outside the freeze window.
    let (swrk, page_socket) = if page_stream {
        let (criu_end, our_end) = stream_pair().map_err(|e| e.to_string())?;
        let swrk = options
            .criu
            .swrk_streaming(&progress.images, criu_end)
            .map_err(|e| e.to_string())?;
        (swrk, Some(unix_stream(our_end)?))
    } else {
        let swrk = options
            .criu
            .swrk(&progress.images)
            .map_err(|e| e.to_string())?;
        (swrk, None)
    };

    // dump, with the freeze at CRIU's "pre-dump" notification: the flows
    // and the service addresses (new SYNs wait too) are locked right before
    // CRIU freezes the tree, and stay locked from there on.
    let phase = clock.begin(report::DUMP);
    let services = ServiceAddress::lock_rules(&options.service_addresses);
    let lock = progress.lock.take();
    let (deadline, pid, hold) = (options.deadline, options.pid, options.hold);
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (verdict, verdicts) = std::sync::mpsc::channel();
    let task = tokio::task::spawn_blocking(move || {
        run_criu(swrk, pid, lock, page_stream, events, verdicts, |lock| {
            lock.freeze(&services, deadline, hold)
                .map_err(|e| format!("locking the flows: {e}"))
        })
    });
    let mut dump = DumpTask {
        task: Some(task),
        events: events_rx,
    };

    // The freeze, or a dump that ended before it.
    let frozen_at = match dump.next().await {
        Next::Event(CriuEvent::Locked { at, result, lock }) => {
            progress.lock = lock.map(|lock| *lock);
            if let Err(err) = result {
                let _ = dump.end().await;
                clock.end(phase, false);
                return Err(format!("dump: {err}"));
            }
            at
        }
        Next::Event(CriuEvent::Dumped) | Next::Ended(Ok(_), _) => {
            clock.end(phase, false);
            return Err("dump: CRIU dumped without notifying us first".into());
        }
        Next::Ended(Err(err), lock) => {
            progress.lock = lock.map(|lock| *lock);
            clock.end(phase, false);
            return Err(format!("dump: {err}"));
        }
    };
    progress.frozen = true;
    let start_ms = frozen_at.duration_since(clock.started()).as_secs_f64() * 1e3;
    clock.record_quiet(report::Phase {
        name: report::FREEZE.to_owned(),
        host: "source".to_owned(),
        start_ms,
        duration_ms: 0.0,
        ok: true,
    });
    // Every wait on the agent from now on ends early enough to roll back
    // (or hand over) before our lock fails open.
    let margin = crate::agent::handover_margin(options.deadline);
    let handover_by = frozen_at + options.deadline.saturating_sub(margin);
    channel.set_hard_deadline(handover_by);

    let dumped = match page_socket {
        Some(socket) => {
            // From here a failure leaves the tree to CRIU, which resumes it.
            progress.pages_at_destination = true;
            progress.source_copy = Some(SourceCopy {
                root: options.pid,
                verdict: Some(verdict),
                dump,
            });
            stream_pages(&mut channel, socket, progress)
                .await
                .map(|bytes| report.image_bytes += bytes)
        }
        None => {
            drop(verdict);
            dump.end().await.map(|outcome| {
                progress.dumped = true;
                report.criu_dump_notifications = outcome.notifications;
                report.criu_dump = read_dump_stats(&progress.images);
            })
        }
    };
    clock.end_with(phase, dumped.map_err(|err| format!("dump: {err}")))?;

    Ok(Frozen {
        channel,
        netlink,
        addresses,
        frozen_at,
        handover_by,
    })
}

/// Relay the page stream until the agent has every page, and CRIU has
/// written the other images and waits at its post-dump notification.
async fn stream_pages(
    channel: &mut TlsChannel,
    socket: UnixStream,
    progress: &mut Progress,
) -> Result<u64, String> {
    let Some(copy) = progress.source_copy.as_mut() else {
        return Err("no dump running".into());
    };
    let mut dumped = false;
    let forward = pages::forward(channel, socket);
    tokio::pin!(forward);
    // CRIU's post-dump may come before the agent's last word: both count.
    let sent = loop {
        tokio::select! {
            sent = &mut forward => break sent.map_err(|e| format!("streaming pages to the agent: {e}"))?,
            next = copy.dump.next() => match next {
                Next::Event(CriuEvent::Dumped) => dumped = true,
                Next::Event(CriuEvent::Locked { .. }) => {}
                Next::Ended(result, _) => {
                    return Err(result.err().unwrap_or_else(|| "CRIU ended before the page stream did".into()));
                }
            },
        }
    };
    while !dumped {
        match copy.dump.next().await {
            Next::Event(CriuEvent::Dumped) => dumped = true,
            Next::Event(CriuEvent::Locked { .. }) => {}
            Next::Ended(result, _) => {
                return Err(result
                    .err()
                    .unwrap_or_else(|| "CRIU killed the tree without asking".into()));
            }
        }
    }
    Ok(sent)
}

/// CRIU's side, on a blocking thread: freeze at "pre-dump", report
/// "post-dump" and (with the page stream) wait there for the verdict.
fn run_criu(
    swrk: crate::criu::swrk::Swrk,
    pid: i32,
    mut lock: Option<MigrationLock>,
    wait_at_post_dump: bool,
    events: UnboundedSender<CriuEvent>,
    verdicts: std::sync::mpsc::Receiver<Result<(), String>>,
    freeze: impl Fn(&mut MigrationLock) -> Result<(), String>,
) -> DumpResult {
    let mut locked = false;
    let result = swrk.dump(pid, |script| match script {
        "pre-dump" if !locked => {
            locked = true;
            let result = lock.as_mut().map_or(Ok(()), &freeze);
            let _ = events.send(CriuEvent::Locked {
                at: Instant::now(),
                result: result.clone(),
                lock: lock.take().map(Box::new),
            });
            result
        }
        "post-dump" => {
            let _ = events.send(CriuEvent::Dumped);
            if wait_at_post_dump {
                verdicts
                    .recv()
                    .unwrap_or_else(|_| Err("the migration gave up".into()))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    });
    (result, lock.map(Box::new))
}

fn unix_stream(fd: std::os::fd::OwnedFd) -> Result<UnixStream, String> {
    let socket = std::os::unix::net::UnixStream::from(fd);
    socket
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(socket))
        .map_err(|e| format!("the page stream's socket: {e}"))
}
