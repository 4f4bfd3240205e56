//! Lazy restore from the destination's own images (`migrate
//! --lazy-restore`): CRIU restores the tree without copying its private
//! memory, which a `criu lazy-pages` daemon then fills through
//! userfaultfd from the page images already here: on demand when the
//! process touches a page, and every other page in the background. The
//! restore (inside the freeze window) no longer copies the memory; the
//! fill runs after the release.
//!
//! The danger is a daemon that dies before it filled everything: once the
//! last reference to a userfaultfd goes, the kernel unregisters its ranges
//! and a missing page reads as zeros. So right after the restore
//! [`LazyPages::guard`] takes its own duplicate of each of the daemon's
//! userfaultfds: if the daemon dies, a fault then waits instead of
//! reading zeros, and [`LazyPages::wait`] says so, for the caller to kill
//! the process. A finished daemon's duplicates are dropped at once (the
//! kernel would otherwise hold the process's mmap/fork events for a
//! reader that is gone).

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{CriuBinary, kdat::with_cached_probes};

/// CRIU's log of the daemon, in the images directory.
pub const LAZY_LOG: &str = "lazy-pages.log";
/// The socket the daemon listens on for the restored processes' uffds
/// (CRIU's name, in its work directory: the images directory here).
const SOCKET: &str = "lazy-pages.socket";
/// How long the daemon may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("starting `{criu} lazy-pages`: {source}")]
    Spawn {
        criu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`criu lazy-pages` did not listen on {socket} within {START_LIMIT:?} ({why}); CRIU's log: {log}"
    )]
    NotListening {
        socket: PathBuf,
        why: String,
        log: PathBuf,
    },
    #[error(
        "`criu lazy-pages` {status} before it filled the restored memory; CRIU's log: {log}{tail}"
    )]
    Died {
        status: String,
        log: PathBuf,
        tail: String,
    },
}

/// A running `criu lazy-pages` daemon for one session's images; killed
/// when dropped unless it finished. Drop it only once the process it
/// fills is gone or filled (its guards go with it).
pub struct LazyPages {
    child: Child,
    log: PathBuf,
    /// Our duplicates of its userfaultfds, from [`LazyPages::guard`].
    guards: Vec<OwnedFd>,
}

impl LazyPages {
    /// Start the daemon on `images_dir` and wait until it listens. Done
    /// before the freeze: CRIU's start-up is not in the window.
    /// With `kdat` (a [`super::kdat::KdatCache`]'s directory), it reads
    /// CRIU's cached kernel probes.
    /// With `remote_pages` (post-copy: the daemon's end of a socket), the
    /// lazy pages are not in the images: the daemon asks for them there,
    /// with CRIU's page-server protocol.
    pub fn start(
        criu: &CriuBinary,
        images_dir: &Path,
        kdat: Option<&Path>,
        remote_pages: Option<OwnedFd>,
    ) -> Result<Self, LazyError> {
        let socket = images_dir.join(SOCKET);
        let log = images_dir.join(LAZY_LOG);
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new(&criu.path);
        let spawn_error = |source: std::io::Error| LazyError::Spawn {
            criu: criu.path.clone(),
            source,
        };
        if let Some(daemon_end) = &remote_pages {
            command
                .arg("--page-server")
                .arg("--ps-socket")
                .arg(daemon_end.as_raw_fd().to_string());
            super::swrk::inherit_fds(&mut command, vec![daemon_end.as_raw_fd()]);
        }
        if let Some(run_dir) = kdat {
            with_cached_probes(&mut command, run_dir)
                .map_err(|why| spawn_error(std::io::Error::other(why)))?;
        }
        command
            .arg("lazy-pages")
            .arg("--images-dir")
            .arg(images_dir)
            .arg("--log-file")
            .arg(LAZY_LOG)
            .arg("-v2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its exit status says whether every page was filled: the agent's
        // reaper must not take it.
        let child = crate::system::spawn_waited(&mut command).map_err(spawn_error)?;
        // The daemon's end is its own now.
        drop(remote_pages);
        let mut daemon = LazyPages {
            child,
            log,
            guards: Vec::new(),
        };
        let started = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(LazyError::NotListening {
                    socket,
                    why: format!("it exited: {status}"),
                    log: daemon.log.clone(),
                });
            }
            if started.elapsed() > START_LIMIT {
                return Err(LazyError::NotListening {
                    socket,
                    why: "still starting".to_owned(),
                    log: daemon.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(daemon)
    }

    /// After the restore: hold a duplicate of each userfaultfd the daemon
    /// got from the restored processes. Returns how many.
    pub fn guard(&mut self) -> std::io::Result<usize> {
        let uffds = crate::system::duplicate_fds(self.pid(), |target| {
            target == "anon_inode:[userfaultfd]"
        })?;
        for uffd in uffds {
            self.guards.push(uffd?);
        }
        Ok(self.guards.len())
    }

    /// Wait (blocking) until the daemon has filled every page and exited;
    /// how long that took. A daemon that died or failed left the guarded
    /// memory unfilled: kill the process it restored before dropping
    /// this (while the guards live, its faults wait, never read zeros).
    pub fn wait(&mut self) -> Result<Duration, LazyError> {
        let started = Instant::now();
        let status = self.child.wait();
        crate::system::forget_waited(self.pid());
        match status {
            Ok(status) if status.success() => {
                self.guards.clear();
                Ok(started.elapsed())
            }
            Ok(status) => Err(self.died(status.to_string())),
            Err(err) => Err(self.died(format!("could not be waited for ({err})"))),
        }
    }

    /// The daemon gone (`status`) with the memory unfilled, with the
    /// errors of its log.
    fn died(&self, status: String) -> LazyError {
        LazyError::Died {
            status,
            log: self.log.clone(),
            tail: super::swrk::log_errors(&self.log)
                .iter()
                .map(|line| format!("\n    {line}"))
                .collect(),
        }
    }

    /// Before the release: why the daemon can no longer fill the memory,
    /// if it died (or failed) already. One that exited having filled
    /// every page is fine.
    pub fn died_early(&mut self) -> Option<String> {
        let died = match self.child.try_wait() {
            Ok(Some(status)) if status.success() => return None,
            Ok(None) => return None,
            Ok(Some(status)) => self.died(status.to_string()),
            Err(err) => self.died(format!("could not be checked ({err})")),
        };
        Some(format!(
            "the lazy-pages daemon exited before the release: {died}"
        ))
    }

    /// Injected faults only: `signal` to the daemon; with SIGKILL, also
    /// wait until it is gone, so that what follows sees it dead.
    pub fn signal_for_fault(&mut self, signal: i32) {
        if signal == libc::SIGKILL {
            // Through the child: one already reaped has no PID to hit.
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(self.pid(), signal) };
        }
    }

    /// The daemon's PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        crate::system::forget_waited(self.pid());
    }
}
