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
//! If CRIU dies instead (killed, crashed) once the tree is frozen, the
//! kernel lets the tree go as CRIU left it: its TCP sockets in repair
//! mode (reads fail with EPERM, nothing is sent), perhaps CRIU's parasite
//! code still in it. Such a copy cannot serve its connections, so it is
//! killed at once (see [`DumpTask::criu_vanished`]). Past the post-dump
//! notification every image is written: the hand-over goes on and the
//! destination's copy becomes the only one. Before it the dump is lost
//! with the tree, and the report says so.
//!
//! A dump that fails (CRIU resumes the tree) runs once more, still
//! frozen: the agent starts its page images over (`PagesRestart`).
//!
//! Without the page stream (both hosts one machine sharing PIDs, where
//! the tree must be gone before the agent can restore it), CRIU writes
//! every image here and kills the tree at once, and a rollback restores
//! from those images.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

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
    dataplane::lock::{MigrationLock, OutgoingBlock},
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
    /// CRIU ended without answering (killed, crashed): it let the tree go
    /// unfinished, and nobody resumed it properly.
    criu_vanished: bool,
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
                    Ok((result, lock)) => {
                        self.criu_vanished = matches!(
                            result,
                            Err(SwrkError::NoAnswer { .. } | SwrkError::Io { .. })
                        );
                        let result = result.map_err(|err| match &err {
                            SwrkError::NoAnswer { .. } | SwrkError::Io { .. } => format!(
                                "CRIU died holding the tree ({err}): the tree was left with its TCP sockets in repair mode"
                            ),
                            _ => err.to_string(),
                        });
                        Next::Ended(result, lock)
                    }
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

/// Why a rollback cannot bring back a tree whose CRIU died mid-dump.
const LOST: &str = "CRIU died holding the tree, which cannot serve its connections in the state CRIU left it (TCP sockets in repair mode): it was killed, and the process is lost here";

/// Once no process of `pids` can run again. Polled from a thread of its
/// own: tokio's timers tick in whole milliseconds, which added one or two
/// to every freeze window here (source-exit 1.7 ms median before, in the
/// small workload's bench). Dropping the future stops the polling.
async fn until_doomed(pids: &[i32]) {
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let (pids, stopped) = (pids.to_vec(), stop.0.clone());
    let _ = tokio::task::spawn_blocking(move || {
        while !stopped.load(Ordering::Relaxed)
            && !pids.iter().all(|pid| crate::system::doomed(*pid))
        {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    })
    .await;
    drop(stop);
}

/// The tree here, doomed: every process of it has SIGKILL pending or is
/// exiting, so none can run again.
pub(super) enum DyingCopy {
    /// CRIU still finishing (and writing its stats).
    Finishing(DumpTask),
    /// CRIU already done.
    Done(Outcome),
    /// CRIU died after writing every image; we killed the tree it left.
    Orphaned,
}

impl DyingCopy {
    /// CRIU's outcome of the dump, once it has finished.
    pub async fn outcome(self) -> Result<Outcome, String> {
        match self {
            Self::Finishing(mut dump) => dump.end().await,
            Self::Done(outcome) => Ok(outcome),
            Self::Orphaned => Err("CRIU died before it finished".into()),
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
        let ended = tokio::select! {
            () = until_doomed(&tree) => return Ok(DyingCopy::Finishing(self.dump)),
            ended = self.dump.end() => ended,
        };
        match ended {
            // CRIU ended first: with success the tree is gone; with a
            // failure CRIU resumed it.
            Ok(outcome) => Ok(DyingCopy::Done(outcome)),
            // Died: every image was written (we are past post-dump), and
            // the tree it let go cannot serve its connections.
            Err(_) if self.dump.criu_vanished => {
                until_doomed(&crate::system::kill_tree(self.root)).await;
                Ok(DyingCopy::Orphaned)
            }
            Err(err) => Err(err),
        }
    }

    /// Let CRIU resume the tree, its sockets out of repair mode; the lock
    /// still holds their packets.
    /// If CRIU died holding the tree, the tree is killed instead and
    /// `lost` says why.
    pub async fn resume(mut self, why: &str, lost: &mut Option<String>) -> Result<(), String> {
        if let Some(verdict) = self.verdict.take() {
            let _ = verdict.send(Err(why.to_owned()));
        }
        match self.dump.end().await {
            Err(_) if self.dump.criu_vanished => {
                crate::system::kill_tree(self.root);
                *lost = Some(LOST.into());
                Err(LOST.into())
            }
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
    let criu = start_criu(options, &progress.images, page_stream)?;

    // dump, with the freeze at CRIU's "pre-dump" notification: the flows
    // and the service addresses (new SYNs wait too) are locked right before
    // CRIU freezes the tree, and stay locked from there on.
    let phase = clock.begin(report::DUMP);
    let applied = AppliedAt::default();
    let outgoing = SecondStep::prepare(options, progress.lock.as_ref(), &applied);
    let mut attempt = criu.run(options, progress.lock.take(), outgoing, page_stream);

    // The freeze, or a dump that ended before it.
    let frozen_at = match attempt.dump.next().await {
        Next::Event(CriuEvent::Locked { at, result, lock }) => {
            progress.lock = lock.map(|lock| *lock);
            if let Err(err) = result {
                let _ = attempt.dump.end().await;
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

    let dumped = loop {
        let failure = match finish_dump(attempt, options.pid, &mut channel, report, progress).await
        {
            Ok(()) => break Ok(()),
            Err(DumpFailure::Criu(err)) if report.dump_retried.is_none() => err,
            Err(failure) => break Err(failure.to_string()),
        };
        // A failed dump leaves the tree running (CRIU resumes it) behind
        // the lock. Some failures pass (seen here: the parasite failing to
        // read /proc/self/cgroup), so dump once more, still frozen, from
        // scratch on both hosts.
        tracing::warn!(
            "criu dump failed, dumping once more (still frozen): {err}",
            err = failure
        );
        report.dump_retried = Some(failure);
        report.image_bytes = 0;
        attempt = match retry(options, &mut channel, progress, page_stream, &applied).await {
            Ok(attempt) => attempt,
            Err(err) => break Err(err),
        };
    };
    report.own_segments_blocked_ms = applied
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .map(|at| at.duration_since(clock.started()).as_secs_f64() * 1e3);
    clock.end_with(phase, dumped.map_err(|err| format!("dump: {err}")))?;

    Ok(Frozen {
        channel,
        netlink,
        addresses,
        frozen_at,
        handover_by,
    })
}

/// `criu swrk`, started, with the page stream's socket when the pages
/// stream to the agent.
struct StartedCriu {
    swrk: crate::criu::swrk::Swrk,
    page_socket: Option<UnixStream>,
}

/// A dump running: CRIU's thread, the page stream's socket, and the
/// verdict CRIU waits for at post-dump (with the page stream).
struct Attempt {
    dump: DumpTask,
    page_socket: Option<UnixStream>,
    verdict: std::sync::mpsc::Sender<Result<(), String>>,
    /// The tree's connections as dumped, listed at post-dump.
    dumped_flows: tokio::sync::oneshot::Receiver<Vec<String>>,
}

/// How CRIU's thread talks to the migration: events as they happen, the
/// verdict it waits for at post-dump, the connections it dumped.
struct CriuTalk {
    events: UnboundedSender<CriuEvent>,
    verdicts: std::sync::mpsc::Receiver<Result<(), String>>,
    dumped: Option<tokio::sync::oneshot::Sender<Vec<String>>>,
}

#[derive(Debug, thiserror::Error)]
enum DumpFailure {
    /// CRIU's dump failed: it resumed the tree.
    #[error("{0}")]
    Criu(String),
    /// Anything else (the channel, the agent).
    #[error("{0}")]
    Other(String),
}

fn start_criu(
    options: &MigrateOptions,
    images: &std::path::Path,
    page_stream: bool,
) -> Result<StartedCriu, String> {
    if !page_stream {
        let swrk = options.criu.swrk(images).map_err(|e| e.to_string())?;
        return Ok(StartedCriu {
            swrk,
            page_socket: None,
        });
    }
    let (criu_end, our_end) = stream_pair().map_err(|e| e.to_string())?;
    let swrk = options
        .criu
        .swrk_streaming(images, criu_end)
        .map_err(|e| e.to_string())?;
    Ok(StartedCriu {
        swrk,
        page_socket: Some(pages::unix_stream(our_end)?),
    })
}

/// The lock's second step (our own segments stop too), and when it was
/// last applied.
struct SecondStep {
    block: OutgoingBlock,
    applied: AppliedAt,
}

/// Shared by every attempt of a dump and the thread that runs it.
type AppliedAt = Arc<Mutex<Option<Instant>>>;

impl SecondStep {
    /// Ready before anything is frozen: its map handle is opened now, not
    /// inside the freeze. None if it cannot be: then the first step blocks
    /// both ways.
    fn prepare(
        options: &MigrateOptions,
        lock: Option<&MigrationLock>,
        applied: &AppliedAt,
    ) -> Option<Self> {
        let services = ServiceAddress::lock_rules(&options.service_addresses);
        let block = lock?
            .outgoing_block(&services)
            .map_err(|e| tracing::warn!("the flows are blocked both ways from the start: {e}"))
            .ok()?;
        Some(Self {
            block,
            applied: applied.clone(),
        })
    }

    fn apply(self) {
        match self.block.apply() {
            Ok(()) => {
                *self
                    .applied
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            }
            Err(err) => tracing::warn!("the source's own segments still leave: {err}"),
        }
    }
}

impl StartedCriu {
    /// Start the dump on its own thread; with a `lock`, it freezes at
    /// CRIU's pre-dump notification (without, the flows are locked
    /// already). `outgoing`, the lock's second step, is applied at the
    /// first notification after that one (the tree frozen).
    fn run(
        self,
        options: &MigrateOptions,
        lock: Option<MigrationLock>,
        outgoing: Option<SecondStep>,
        page_stream: bool,
    ) -> Attempt {
        let services = ServiceAddress::lock_rules(&options.service_addresses);
        let (deadline, pid, hold) = (options.deadline, options.pid, options.hold);
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let (verdict, verdicts) = std::sync::mpsc::channel();
        let (dumped, dumped_flows) = tokio::sync::oneshot::channel();
        let swrk = self.swrk;
        let talk = CriuTalk {
            events,
            verdicts,
            dumped: Some(dumped),
        };
        let two_steps = outgoing.is_some();
        let task = tokio::task::spawn_blocking(move || {
            run_criu(swrk, pid, lock, page_stream, talk, outgoing, |lock| {
                if two_steps {
                    lock.freeze_incoming(&services, deadline, hold)
                } else {
                    lock.freeze(&services, deadline, hold)
                }
                .map_err(|e| format!("locking the flows: {e}"))
            })
        });
        Attempt {
            dump: DumpTask {
                task: Some(task),
                events: events_rx,
                criu_vanished: false,
            },
            page_socket: self.page_socket,
            verdict,
            dumped_flows,
        }
    }
}

/// The dump, frozen, to its end: the pages at the agent and CRIU waiting
/// at post-dump (the copy here kept in `progress`), or every image here.
async fn finish_dump(
    attempt: Attempt,
    root: i32,
    channel: &mut TlsChannel,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<(), DumpFailure> {
    let Attempt {
        mut dump,
        page_socket,
        verdict,
        dumped_flows,
    } = attempt;
    progress.dumped_flows = Some(dumped_flows);
    let Some(socket) = page_socket else {
        drop(verdict);
        let outcome = match dump.end().await {
            Ok(outcome) => outcome,
            Err(err) if dump.criu_vanished => {
                crate::system::kill_tree(root);
                progress.source_lost = Some(LOST.into());
                return Err(DumpFailure::Other(err));
            }
            Err(err) => return Err(DumpFailure::Criu(err)),
        };
        progress.dumped = true;
        report.criu_dump_notifications = outcome.notifications;
        report.criu_dump = read_dump_stats(&progress.images);
        return Ok(());
    };
    // From here a failure leaves the tree to CRIU, which resumes it.
    progress.pages_at_destination = true;
    let copy = progress.source_copy.insert(SourceCopy {
        root,
        verdict: Some(verdict),
        dump,
    });
    report.image_bytes += stream_pages(channel, socket, &mut copy.dump).await?;
    Ok(())
}

/// Relay the page stream until the agent has every page, and CRIU has
/// written the other images and waits at its post-dump notification.
async fn stream_pages(
    channel: &mut TlsChannel,
    socket: UnixStream,
    dump: &mut DumpTask,
) -> Result<u64, DumpFailure> {
    let mut dumped = false;
    let mut failed = None;
    // CRIU closes the stream when its pages are out, or when it fails;
    // its own word says which (it may come first).
    let sent = {
        let relay = pages::relay(channel, socket);
        tokio::pin!(relay);
        loop {
            tokio::select! {
                sent = &mut relay => break sent.map_err(|e| DumpFailure::Other(format!("streaming pages to the agent: {e}")))?,
                next = dump.next(), if !dumped && failed.is_none() => match next {
                    Next::Event(CriuEvent::Dumped) => dumped = true,
                    Next::Event(CriuEvent::Locked { .. }) => {}
                    Next::Ended(result, _) => {
                        failed = Some(result.err().unwrap_or_else(|| "CRIU ended before the page stream did".into()));
                    }
                },
            }
        }
    };
    while !dumped && failed.is_none() {
        match dump.next().await {
            Next::Event(CriuEvent::Dumped) => dumped = true,
            Next::Event(CriuEvent::Locked { .. }) => {}
            Next::Ended(result, _) => {
                failed = Some(
                    result
                        .err()
                        .unwrap_or_else(|| "CRIU killed the tree without asking".into()),
                );
            }
        }
    }
    if let Some(err) = failed {
        // A dump CRIU did not see through cannot run again: no retry.
        return Err(if dump.criu_vanished {
            DumpFailure::Other(err)
        } else {
            DumpFailure::Criu(err)
        });
    }
    pages::finish(channel, sent)
        .await
        .map_err(|e| DumpFailure::Other(format!("streaming pages to the agent: {e}")))?;
    Ok(sent)
}

/// After a failed dump, still frozen: the agent drops the pages it got,
/// this side the images CRIU wrote (its log kept as `dump.1.log`), and a
/// new `criu dump` runs.
async fn retry(
    options: &MigrateOptions,
    channel: &mut TlsChannel,
    progress: &mut Progress,
    page_stream: bool,
    second_step_applied: &AppliedAt,
) -> Result<Attempt, String> {
    progress.source_copy = None;
    if page_stream {
        pages::restart(channel)
            .await
            .map_err(|e| format!("restarting the page stream at the agent: {e}"))?;
    }
    let images = &progress.images;
    let _ = std::fs::rename(
        images.join(crate::criu::swrk::DUMP_LOG),
        images.join(FAILED_DUMP_LOG),
    );
    clear_images(images).map_err(|e| format!("clearing {}: {e}", images.display()))?;
    // The lock stays as it is, but a dump that failed before CRIU froze
    // the tree left it in its first step: the second comes again.
    let outgoing = SecondStep::prepare(options, progress.lock.as_ref(), second_step_applied);
    let mut attempt =
        start_criu(options, images, page_stream)?.run(options, None, outgoing, page_stream);
    match attempt.dump.next().await {
        Next::Event(CriuEvent::Locked { result: Ok(()), .. }) => Ok(attempt),
        Next::Event(CriuEvent::Locked {
            result: Err(err), ..
        })
        | Next::Ended(Err(err), _) => Err(err),
        Next::Event(CriuEvent::Dumped) | Next::Ended(Ok(_), _) => {
            Err("CRIU dumped without notifying us first".into())
        }
    }
}

/// The log of a dump that failed and was run again.
pub const FAILED_DUMP_LOG: &str = "dump.1.log";

/// Remove the images in `dir` (logs stay), keeping the directory (an open
/// fd may name it).
fn clear_images(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let is_log = entry.path().extension().is_some_and(|ext| ext == "log");
        if entry.file_type()?.is_file() && !is_log {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// CRIU's side, on a blocking thread: freeze at "pre-dump", report
/// "post-dump" and (with the page stream) wait there for the verdict.
fn run_criu(
    swrk: crate::criu::swrk::Swrk,
    pid: i32,
    mut lock: Option<MigrationLock>,
    wait_at_post_dump: bool,
    talk: CriuTalk,
    mut outgoing: Option<SecondStep>,
    freeze: impl Fn(&mut MigrationLock) -> Result<(), String>,
) -> DumpResult {
    let CriuTalk {
        events,
        verdicts,
        mut dumped,
    } = talk;
    let mut locked = false;
    let criu = swrk.pid();
    let result = swrk.dump(pid, |script| {
        // Any notification after "pre-dump" comes with the tree frozen
        // (CRIU seizes it right after that one): our own segments stop
        // too, before a dumped socket's timer can send one.
        if locked
            && script != "pre-dump"
            && let Some(step) = outgoing.take()
        {
            step.apply();
        }
        match script {
            "pre-dump" if !locked => {
                locked = true;
                let result = lock.as_mut().map_or(Ok(()), &freeze);
                let _ = events.send(CriuEvent::Locked {
                    at: Instant::now(),
                    result: result.clone(),
                    lock: lock.take().map(Box::new),
                });
                if result.is_ok() && crate::fault::fires(crate::fault::DUMP_FAILS_UNFROZEN) {
                    return Err("injected fault: the dump fails before the freeze".into());
                }
                result
            }
            "post-dump" if crate::fault::fires(crate::fault::DUMP_FAILS) => {
                Err("injected fault: the dump fails".into())
            }
            "post-dump" => {
                let _ = events.send(CriuEvent::Dumped);
                // The tree as CRIU dumped it, still frozen: the connections the
                // restore must bring back (one the process closed since the
                // preflight is not among them). With the page stream this runs
                // while the images go out; without, CRIU waits for it.
                if let (Some(dumped), Ok(network)) =
                    (dumped.take(), crate::net::discover::discover(pid))
                {
                    let _ = dumped.send(
                        network
                            .connections
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                    );
                }
                if wait_at_post_dump {
                    await_verdict(&verdicts, criu, pid)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    });
    (result, lock.map(Box::new))
}

/// The hand-over's verdict, for CRIU waiting at post-dump with the tree
/// frozen. Should CRIU die meanwhile, the tree it lets go (sockets in
/// repair mode) is killed at once rather than when the verdict comes.
fn await_verdict(
    verdicts: &std::sync::mpsc::Receiver<Result<(), String>>,
    criu: i32,
    tree_root: i32,
) -> Result<(), String> {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match verdicts.recv_timeout(std::time::Duration::from_millis(1)) {
            Ok(verdict) => return verdict,
            Err(RecvTimeoutError::Disconnected) => return Err("the migration gave up".into()),
            Err(RecvTimeoutError::Timeout) if crate::system::doomed(criu) => {
                crate::system::kill_tree(tree_root);
                return Err("CRIU died at post-dump".into());
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}
