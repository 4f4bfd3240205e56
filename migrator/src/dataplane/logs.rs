//! What the kernel programs have to say (aya-log: a packet the parser
//! gave up on, a lock past its deadline, a packet that could not be
//! held), forwarded into `tracing` under the target `migrator::ebpf`.
//!
//! The programs' log ring is pinned with the other maps, so whichever
//! process loaded the programs, every `migrator` process in the network
//! namespace reads the same ring: the agent's log, `watch` and `migrate`
//! show the messages (each message once, to the reader that took it).

use aya::Ebpf;
use tokio::{io::unix::AsyncFd, task::JoinHandle};

/// The ring's name in the object (aya-log's own).
pub const LOG_MAP: &str = "AYA_LOGS";

/// `log` records from aya-log, as `tracing` events.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "migrator::ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "migrator::ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "migrator::ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "migrator::ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "migrator::ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Reading the ring, until dropped.
pub struct LogForwarder(JoinHandle<()>);

impl Drop for LogForwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Start forwarding the programs' messages on the current tokio runtime;
/// `None` without a runtime or without the ring (an object built before
/// it had one), with the reason logged at debug level.
pub fn forward(ebpf: &mut Ebpf) -> Option<LogForwarder> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let logger = match aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(logger) => logger,
        Err(err) => {
            tracing::debug!("the kernel programs' log: {err}");
            return None;
        }
    };
    let _context = runtime.enter();
    // SAFETY: the descriptor is the logger's ring, which the AsyncFd owns
    // and never replaces: it stays open, and the same, for its whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(err) => {
            tracing::debug!("the kernel programs' log: {err}");
            return None;
        }
    };
    Some(LogForwarder(runtime.spawn(async move {
        loop {
            let Ok(mut ready) = ring.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    })))
}
