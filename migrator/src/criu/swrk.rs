//! Driving CRIU over its RPC interface (`criu swrk FD`): one request per
//! CRIU process, NOTIFY messages answered as they come so each phase of a
//! dump or restore gets a timestamp, and CRIU's own log kept for errors.
//!
//! The wire format is CRIU's `rpc.proto` (types from rust-criu), one
//! message per SOCK_SEQPACKET packet.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use protobuf::Message as _;
use rust_criu::rust_criu_protobuf::rpc::{
    Criu_network_lock_method, Criu_opts, Criu_page_server_info, Criu_req, Criu_req_type, Criu_resp,
};

use super::CriuBinary;

/// Log file CRIU writes into the images directory.
pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";

#[derive(Debug, thiserror::Error)]
pub enum SwrkError {
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU sent a message we cannot decode: {0}")]
    Decode(#[from] protobuf::Error),
    #[error("CRIU closed the RPC socket without answering (see {log})")]
    NoAnswer { log: PathBuf },
    #[error("criu {action} failed: {message}; CRIU's log: {log}{tail}")]
    Failed {
        action: &'static str,
        message: String,
        log: PathBuf,
        /// The last lines of the log, so the cause is visible at once.
        tail: String,
    },
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> SwrkError {
    let action = action.into();
    move |source| SwrkError::Io { action, source }
}

/// One NOTIFY callback CRIU made ("pre-dump", "post-dump", "network-lock",
/// "post-restore", ...) and when, relative to the request.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Notification {
    pub script: String,
    pub at_ms: f64,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    /// For a restore: the PID of the restored root task (in our PID
    /// namespace).
    pub pid: Option<i32>,
    pub notifications: Vec<Notification>,
}

/// A `criu swrk` process waiting for its one request, with the images
/// directory it will use already open. Starting CRIU costs tens of
/// milliseconds (exec, its loader and libraries, kernel feature probes);
/// a migration starts it before the freeze so that cost stays outside the
/// freeze window. Dropping an unused one stops it.
pub struct Swrk {
    child: Child,
    socket: File,
    /// Kept open: `criu swrk` inherited this fd number.
    dir: OwnedFd,
    log_dir: PathBuf,
    /// The fd number, in `criu swrk`, of the socket a dump sends its pages
    /// into (CRIU's page-server protocol) instead of into local images.
    page_socket: Option<i32>,
}

/// A NOTIFY callback's verdict: Err makes CRIU abort the operation.
pub type NotifyResult = Result<(), String>;

impl CriuBinary {
    /// Start `criu swrk` for work in `images_dir` (which must exist).
    pub fn swrk(&self, images_dir: &Path) -> Result<Swrk, SwrkError> {
        self.start_swrk(images_dir, None)
    }

    /// Start `criu swrk` for a dump whose pages go into `page_socket` (one
    /// end of a stream socket; CRIU's page-server protocol comes out of
    /// the other) and whose other images go into `images_dir`.
    pub fn swrk_streaming(
        &self,
        images_dir: &Path,
        page_socket: OwnedFd,
    ) -> Result<Swrk, SwrkError> {
        self.start_swrk(images_dir, Some(page_socket))
    }

    fn start_swrk(
        &self,
        images_dir: &Path,
        page_socket: Option<OwnedFd>,
    ) -> Result<Swrk, SwrkError> {
        // Opened without O_CLOEXEC so `criu swrk` inherits it; the request
        // names the directory by this fd number.
        let dir = open_dir_inheritable(images_dir)?;
        let (ours, theirs) = seqpacket_pair()?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(&self.path);
        command
            .arg("swrk")
            .arg(theirs_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut inherited = vec![theirs_fd, dir.as_raw_fd()];
        inherited.extend(page_socket.as_ref().map(AsRawFd::as_raw_fd));
        inherit_fds(&mut command, inherited);
        let child = command
            .spawn()
            .map_err(io(format!("starting {} swrk", self.path.display())))?;
        // Only CRIU may hold its end of the page socket: its close is how
        // the other end learns the dump's pages are all out.
        let page_socket = page_socket.map(|fd| fd.as_raw_fd());
        Ok(Swrk {
            child,
            socket: File::from(ours),
            dir,
            log_dir: images_dir.to_owned(),
            page_socket,
        })
    }

    /// Dump with a fresh `criu swrk` (see [`Swrk::dump`]).
    pub fn dump(
        &self,
        images_dir: &Path,
        pid: i32,
        on_notify: impl FnMut(&str) -> NotifyResult,
    ) -> Result<Outcome, SwrkError> {
        self.swrk(images_dir)?.dump(pid, on_notify)
    }

    /// Restore with a fresh `criu swrk` (see [`Swrk::restore`]).
    pub fn restore(
        &self,
        images_dir: &Path,
        on_notify: impl FnMut(&str) -> NotifyResult,
    ) -> Result<Outcome, SwrkError> {
        self.swrk(images_dir)?.restore(on_notify)
    }
}

impl Swrk {
    /// The `criu swrk` process.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Checkpoint the process tree rooted at `pid`, keeping established
    /// TCP connections (sockets go into TCP_REPAIR). The network lock is
    /// ours: CRIU is told to skip its own. The tree is killed after a
    /// successful dump (CRIU's default). `on_notify` runs at each of CRIU's
    /// notifications ("pre-dump" comes before the tree is frozen).
    pub fn dump(
        self,
        pid: i32,
        on_notify: impl FnMut(&str) -> NotifyResult,
    ) -> Result<Outcome, SwrkError> {
        let mut opts = base_opts(DUMP_LOG);
        opts.set_pid(pid);
        if let Some(fd) = self.page_socket {
            let mut page_server = Criu_page_server_info::new();
            page_server.set_fd(fd);
            opts.ps = protobuf::MessageField::some(page_server);
        }
        self.call(Criu_req_type::DUMP, "dump", opts, on_notify)
    }

    /// Restore the tree in the images directory with its TCP connections.
    /// With `rst_sibling` the restored root becomes a sibling of `criu
    /// swrk`, that is our child: we reap it when it exits.
    pub fn restore(
        self,
        on_notify: impl FnMut(&str) -> NotifyResult,
    ) -> Result<Outcome, SwrkError> {
        let mut opts = base_opts(RESTORE_LOG);
        opts.set_rst_sibling(true);
        self.call(Criu_req_type::RESTORE, "restore", opts, on_notify)
    }

    /// Like [`Swrk::restore`], but every process is left stopped (SIGSTOP)
    /// once restored: it runs when someone sends SIGCONT. With `lazy`, its
    /// private memory is left to a running `criu lazy-pages` daemon on the
    /// same images ([`super::lazy`]).
    pub fn restore_stopped(
        self,
        lazy: bool,
        on_notify: impl FnMut(&str) -> NotifyResult,
    ) -> Result<Outcome, SwrkError> {
        let mut opts = base_opts(RESTORE_LOG);
        opts.set_rst_sibling(true);
        opts.set_leave_stopped(true);
        opts.set_lazy_pages(lazy);
        self.call(Criu_req_type::RESTORE, "restore", opts, on_notify)
    }

    fn call(
        mut self,
        kind: Criu_req_type,
        action: &'static str,
        mut opts: Criu_opts,
        mut on_notify: impl FnMut(&str) -> NotifyResult,
    ) -> Result<Outcome, SwrkError> {
        let started = Instant::now();
        opts.set_images_dir_fd(self.dir.as_raw_fd());
        let log = self.log_dir.join(opts.log_file());
        let mut request = Criu_req::new();
        request.set_type(kind);
        request.opts = protobuf::MessageField::some(opts);
        send(&mut self.socket, &request)?;

        let mut notifications = Vec::new();
        let mut refused = None;
        loop {
            let Some(response) = receive(&mut self.socket)? else {
                break Err(SwrkError::NoAnswer { log: log.clone() });
            };
            if response.type_() == Criu_req_type::NOTIFY {
                let script = response.notify.script().to_owned();
                notifications.push(Notification {
                    at_ms: started.elapsed().as_secs_f64() * 1e3,
                    script: script.clone(),
                });
                let verdict = on_notify(&script);
                let mut ack = Criu_req::new();
                ack.set_type(Criu_req_type::NOTIFY);
                ack.set_notify_success(verdict.is_ok());
                if let Err(reason) = verdict {
                    refused = Some(format!("{script}: {reason}"));
                }
                send(&mut self.socket, &ack)?;
                continue;
            }
            if !response.success() {
                let errors = log_errors(&log);
                // Our own refusal, else the first real error in the log (CRIU's
                // message is often a harmless rlimit warning).
                let message = refused
                    .take()
                    .or_else(|| errors.first().cloned())
                    .unwrap_or_else(|| response.cr_errmsg().trim().to_owned());
                break Err(SwrkError::Failed {
                    action,
                    message,
                    log: log.clone(),
                    tail: errors.iter().map(|line| format!("\n    {line}")).collect(),
                });
            }
            let pid = (kind == Criu_req_type::RESTORE).then(|| response.restore.pid());
            break Ok(Outcome { pid, notifications });
        }
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        // swrk exits once its socket closes; an unused one is stopped. Reap
        // it either way so it is no zombie (a reaper elsewhere may have
        // already: then wait fails, which is fine).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = shutdown_socket(&self.socket);
        }
        let _ = self.child.wait();
    }
}

/// Let the child inherit `fds` (ours are all O_CLOEXEC).
pub(super) fn inherit_fds(command: &mut Command, fds: Vec<i32>) {
    // SAFETY: only async-signal-safe calls (fcntl) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A connected pair of stream sockets (O_CLOEXEC): CRIU's page-server
/// protocol runs over one, we read or write the other.
pub fn stream_pair() -> Result<(OwnedFd, OwnedFd), SwrkError> {
    let pair = socket_pair(libc::SOCK_STREAM, "socketpair for the page stream")?;
    // The default buffers (about 200 KiB) make CRIU and the relay take
    // turns every few pages; larger ones let both run at once. FORCE: past
    // net.core.[rw]mem_max, needs CAP_NET_ADMIN, which we have; without it
    // the defaults stay, only slower.
    for fd in [&pair.0, &pair.1] {
        for option in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
            let size: libc::c_int = PAGE_STREAM_BUFFER;
            // SAFETY: setsockopt on a socket we own with an int value.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    Ok(pair)
}

/// Socket buffers of the page stream's socket pairs.
const PAGE_STREAM_BUFFER: libc::c_int = 4 << 20;

/// Close our end for writing so a waiting swrk sees EOF and exits.
fn shutdown_socket(socket: &File) -> std::io::Result<()> {
    // SAFETY: shutdown on a socket fd we own.
    let rc = unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn base_opts(log_file: &str) -> Criu_opts {
    let mut opts = Criu_opts::new();
    opts.set_tcp_established(true);
    opts.set_network_lock(Criu_network_lock_method::SKIP);
    opts.set_notify_scripts(true);
    opts.set_log_level(4);
    opts.set_log_file(log_file.to_owned());
    // Lab and service processes are not attached to our terminal.
    opts.set_shell_job(false);
    opts.set_file_locks(true);
    opts
}

fn open_dir_inheritable(dir: &Path) -> Result<OwnedFd, SwrkError> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| {
        io(format!("opening {}", dir.display()))(std::io::ErrorKind::InvalidInput.into())
    })?;
    // SAFETY: a valid C string; the returned fd is owned from here on.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    if fd < 0 {
        return Err(io(format!("opening images directory {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by open and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), SwrkError> {
    socket_pair(libc::SOCK_SEQPACKET, "socketpair for criu swrk")
}

fn socket_pair(kind: i32, action: &'static str) -> Result<(OwnedFd, OwnedFd), SwrkError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io(action)(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn send(socket: &mut File, request: &Criu_req) -> Result<(), SwrkError> {
    let bytes = request.write_to_bytes()?;
    socket
        .write_all(&bytes)
        .map_err(io("sending a request to criu swrk"))
}

/// One message, or None when CRIU closed the socket.
fn receive(socket: &mut File) -> Result<Option<Criu_resp>, SwrkError> {
    // A seqpacket read returns one whole message; CRIU's are small.
    let mut buf = vec![0u8; 64 * 1024];
    let n = socket
        .read(&mut buf)
        .map_err(io("reading criu swrk's answer"))?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Criu_resp::parse_from_bytes(&buf[..n])?))
}

/// The error lines at the end of a CRIU log ("Error (...)"), or its last
/// lines if none are marked. CRIU's complaint that it cannot raise its own
/// RLIMIT_NOFILE is harmless and hides the real cause, so it is skipped.
pub(super) fn log_errors(log: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|line| line.contains("Error") && !line.contains("RLIMIT_NOFILE"))
        .collect();
    let pick = if errors.is_empty() { &lines } else { &errors };
    let start = pick.len().saturating_sub(4);
    pick[start..]
        .iter()
        .map(|line| line.trim().to_owned())
        .collect()
}
