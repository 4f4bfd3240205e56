//! Facts about the host: kernel version, privileges, bpffs, TCP timeouts.

use std::{fmt, fs, io, path::Path};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl KernelVersion {
    /// TCX (BPF links on the TC hook) arrived in 6.6; older kernels use
    /// clsact + cls_bpf.
    pub const TCX: Self = Self {
        major: 6,
        minor: 6,
        patch: 0,
    };

    /// Parse a release string such as "6.18.44-fc-v669".
    pub fn parse(release: &str) -> Option<Self> {
        let mut numbers = release
            .split(['.', '-', '+'])
            .map(|part| part.parse::<u32>());
        let major = numbers.next()?.ok()?;
        let minor = numbers.next()?.ok()?;
        let patch = numbers.next().and_then(Result::ok).unwrap_or(0);
        Some(Self {
            major,
            minor,
            patch,
        })
    }

    pub fn running() -> io::Result<(String, Option<Self>)> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_owned();
        let version = Self::parse(&release);
        Ok((release, version))
    }
}

/// Capabilities the data plane and CRIU need.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// What migrator needs to load BPF, attach to TC and (as root) run CRIU.
pub const REQUIRED_CAPABILITIES: [(u32, &str); 3] = [
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_BPF, "CAP_BPF"),
];

pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Capabilities root usually has, whose absence limits what can be
/// moved (not whether anything can), with what that means.
pub const LIMITING_CAPABILITIES: [(u32, &str, &str); 2] = [
    (
        CAP_SYS_RESOURCE,
        "CAP_SYS_RESOURCE",
        "CRIU cannot read the resource limits of processes running under another uid (\"Can't get rlimit 0: Operation not permitted\"), so a tree with such processes (nginx's www-data workers) cannot be moved to or from this host",
    ),
    (
        CAP_CHECKPOINT_RESTORE,
        "CAP_CHECKPOINT_RESTORE",
        "CRIU relies on CAP_SYS_ADMIN instead to restore processes under their PIDs",
    ),
];

/// This process's effective capability set.
pub fn effective_capabilities() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

pub const fn has_capability(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

/// Names of the [`REQUIRED_CAPABILITIES`] this process lacks.
pub fn missing_capabilities() -> io::Result<Vec<&'static str>> {
    let caps = effective_capabilities()?;
    Ok(REQUIRED_CAPABILITIES
        .iter()
        .filter(|(cap, _)| !has_capability(caps, *cap))
        .map(|(_, name)| *name)
        .collect())
}

pub const BPFFS: &str = "/sys/fs/bpf";

/// Whether a bpf filesystem is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> io::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    }))
}

/// Mount bpffs at /sys/fs/bpf (pinning needs it).
pub fn mount_bpffs() -> io::Result<()> {
    fs::create_dir_all(BPFFS)?;
    let target = c"/sys/fs/bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mount bpffs unless it is there already.
pub fn ensure_bpffs() -> io::Result<()> {
    if bpffs_mounted()? {
        Ok(())
    } else {
        mount_bpffs()
    }
}

pub fn read_sysctl_u32(path: &Path) -> io::Result<u32> {
    fs::read_to_string(path)?.trim().parse().map_err(|err| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {err}", path.display()),
        )
    })
}

/// How long a Linux sender keeps retransmitting an unanswered segment
/// before it gives up, for a given `tcp_retries2`, assuming the minimum
/// RTO (200 ms) doubling up to TCP_RTO_MAX (120 s). Mirrors the kernel's
/// `tcp_model_timeout`.
pub fn retransmit_give_up_ms(retries2: u32) -> u64 {
    const RTO_MIN_MS: u64 = 200;
    const RTO_MAX_MS: u64 = 120_000;
    // ilog2(RTO_MAX / RTO_MIN): the last doubling before the cap.
    let linear_backoff_thresh = (RTO_MAX_MS / RTO_MIN_MS).ilog2();
    if retries2 <= linear_backoff_thresh {
        ((2u64 << retries2) - 1) * RTO_MIN_MS
    } else {
        ((2u64 << linear_backoff_thresh) - 1) * RTO_MIN_MS
            + u64::from(retries2 - linear_backoff_thresh) * RTO_MAX_MS
    }
}

/// CLOCK_BOOTTIME in nanoseconds: the clock the data plane's deadlines and
/// timestamps use (`bpf_ktime_get_boot_ns`).
pub fn boottime_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into; CLOCK_BOOTTIME
    // always exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// Which PID namespace this process sees, as (boot id, namespace inode):
/// two processes share PIDs exactly when both match.
pub fn pid_namespace_identity() -> (String, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default();
    let inode = std::fs::metadata("/proc/self/ns/pid")
        .map(|meta| meta.ino())
        .unwrap_or(0);
    (boot_id, inode)
}

/// The root and all its descendants (threads' children included).
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut pids = vec![root];
    let mut next = 0;
    while next < pids.len() {
        let pid = pids[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !pids.contains(&child) {
                    pids.push(child);
                }
            }
        }
    }
    pids
}

/// Kill a process tree for good: stop every process first (so none can
/// fork a replacement for one that dies), take a duplicate of each of its
/// TCP sockets, SIGKILL them all, then put those sockets in repair mode
/// and let them go (a copy whose connections live on elsewhere must not
/// close them: a socket in repair mode closes without a FIN or RST, as
/// CRIU's dumped trees do). Our duplicates keep the sockets open past the
/// tree's exit; the repair comes after the kill because a thread stuck
/// inside a send (on a page a lazy restore never filled) holds its
/// socket's lock until it dies. Returns the PIDs signalled; they are free
/// once their parent reaps them.
pub fn kill_tree(root: i32) -> Vec<i32> {
    let signal_all = |pids: &[i32], signal: i32| {
        for pid in pids {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(*pid, signal) };
        }
    };
    let mut pids = process_tree(root);
    // A fork racing one pass shows up in the next.
    for _ in 0..3 {
        signal_all(&pids, libc::SIGSTOP);
        let again = process_tree(root);
        if again.len() == pids.len() {
            break;
        }
        pids = again;
    }
    let mut sockets = Vec::new();
    for pid in &pids {
        match tcp_sockets(*pid) {
            Ok(found) => sockets.extend(found),
            Err(err) => {
                tracing::warn!("process {pid}: its TCP sockets may close with a FIN: {err}");
            }
        }
    }
    signal_all(&pids, libc::SIGKILL);
    for socket in &sockets {
        silence(socket);
    }
    pids
}

/// Whether process `pid` can never run user code again: gone, a zombie,
/// exiting (PF_EXITING), or with SIGKILL pending.
pub fn doomed(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let (Ok(stat), Ok(status)) = (
        std::fs::read_to_string(format!("/proc/{pid}/stat")),
        std::fs::read_to_string(format!("/proc/{pid}/status")),
    ) else {
        return true;
    };
    // After the command's closing parenthesis: state, ppid, pgrp,
    // session, tty_nr, tpgid, then flags.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let state = fields.first().copied().unwrap_or("");
    let flags = fields
        .get(6)
        .and_then(|flags| flags.parse::<u64>().ok())
        .unwrap_or(0);
    matches!(state, "Z" | "X" | "x")
        || flags & PF_EXITING != 0
        || signal_pending(&status, libc::SIGKILL)
}

/// Whether `signal` is pending (for the thread or the whole process) in
/// a `/proc/PID/status`.
pub fn signal_pending(status: &str, signal: i32) -> bool {
    let bit = 1u64 << (signal - 1);
    ["SigPnd:", "ShdPnd:"].iter().any(|name| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & bit != 0)
    })
}

/// (fd, target path, metadata of the target) for every descriptor.
pub fn open_fds(pid: i32) -> Vec<(i32, String, std::fs::Metadata)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            let meta = std::fs::metadata(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned(), meta))
        })
        .collect()
}

/// Our own duplicates (pidfd_getfd) of the descriptors of `pid` whose
/// target (`/proc/PID/fd` link) is `wanted`, each or why it could not be
/// taken; `Err` when the process cannot be reached at all.
pub fn duplicate_fds(
    pid: i32,
    wanted: impl Fn(&str) -> bool,
) -> std::io::Result<Vec<std::io::Result<std::os::fd::OwnedFd>>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    Ok(open_fds(pid)
        .into_iter()
        .filter(|(_, target, _)| wanted(target))
        .map(|(fd, _, _)| {
            // SAFETY: pidfd_getfd on our pidfd; the result is checked.
            let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            if ours < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                // SAFETY: a fresh descriptor we own (a duplicate of theirs).
                Ok(unsafe { OwnedFd::from_raw_fd(ours as i32) })
            }
        })
        .collect())
}

/// Put every TCP socket `pid` holds into repair mode (taken from it with
/// pidfd_getfd), so that closing them sends nothing. Listening sockets
/// cannot be repaired and send nothing when closed anyway.
/// Duplicates of process `pid`'s TCP sockets.
fn tcp_sockets(pid: i32) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::AsRawFd as _;
    let sockets = duplicate_fds(pid, |target| target.starts_with("socket:"))?;
    Ok(sockets
        .into_iter()
        .flatten()
        .filter(|ours| {
            let mut protocol: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into an int we own, its size given.
            let rc = unsafe {
                libc::getsockopt(
                    ours.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PROTOCOL,
                    (&raw mut protocol).cast(),
                    &mut len,
                )
            };
            rc == 0 && protocol == libc::IPPROTO_TCP
        })
        .collect())
}

/// Repair mode: the socket closes without a FIN or RST.
fn silence(socket: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with an int value we own. EPERM for a listening
    // socket is expected.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_REPAIR,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The CLOCK_BOOTTIME instant `after` from now, in ns, as the data plane
/// keeps deadlines (saturating: a huge duration means "never").
pub fn deadline_ns(after: std::time::Duration) -> u64 {
    boottime_ns().saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
}

/// Resident memory of these processes (VmRSS), in bytes: an upper bound
/// of what CRIU writes for their pages (it skips clean file pages).
pub fn resident_bytes(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb.saturating_mul(1024))
        .fold(0, u64::saturating_add)
}

/// A `/proc/meminfo` field, in bytes (0 if unreadable).
fn meminfo_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// Memory this host has.
pub fn memory_total_bytes() -> u64 {
    meminfo_bytes("MemTotal")
}

/// Memory that can be had without swapping (the kernel's estimate).
pub fn memory_available_bytes() -> u64 {
    meminfo_bytes("MemAvailable")
}

/// Let a stopped tree run (SIGCONT to every process of it).
pub fn resume_tree(root: i32) {
    for pid in process_tree(root) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
}

/// Tell a service manager (systemd's `Type=notify`) how we are, e.g.
/// "READY=1"; nothing when none asked ($NOTIFY_SOCKET unset).
pub fn notify_service_manager(state: &str) {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = address
        .and_then(|address| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address));
    if let Err(err) = sent {
        tracing::warn!("telling the service manager {state:?} at {path}: {err}");
    }
}

/// PIDs of `pids` that are still taken (a process or a zombie exists).
pub fn taken_pids(pids: &[i32]) -> Vec<i32> {
    pids.iter()
        .copied()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect()
}

/// Wait until every PID of `pids` is free, polling every millisecond, for
/// at most `limit`. Ok(time waited) or Err(the PIDs still taken).
pub fn wait_for_free_pids(
    pids: &[i32],
    limit: std::time::Duration,
) -> Result<std::time::Duration, Vec<i32>> {
    let started = std::time::Instant::now();
    loop {
        let taken = taken_pids(pids);
        if taken.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= limit {
            return Err(taken);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Wall-clock time, ms since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long a restore waits for a dumped tree's PIDs to come free (its
/// parent reaps it; on one machine that is at once when it is ours).
pub const PID_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Several PIDs described as [`describe_pid`] does, comma-separated.
pub fn describe_pids(pids: &[i32]) -> String {
    pids.iter()
        .map(|pid| describe_pid(*pid))
        .collect::<Vec<_>>()
        .join(", ")
}

/// "PID 42 (comm, state Z, parent 1)" for error messages.
pub fn describe_pid(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let comm = stat
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(')'))
        .map(|(comm, _)| comm.to_owned())
        .unwrap_or_else(|| "?".into());
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let state = fields.first().copied().unwrap_or("?");
    let parent = fields.get(1).copied().unwrap_or("?");
    let what = if state == "Z" {
        format!("a zombie nobody reaped yet; its parent {parent} must wait() for it")
    } else {
        format!("state {state}, parent {parent}")
    };
    format!("PID {pid} (`{comm}`, {what})")
}

/// Children whose exit status their spawner waits for (a lazy restore's
/// daemon: it exits 0 only once every page is filled): the agent's reaper
/// of orphans leaves them alone.
static WAITED_FOR: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn waited_for() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    WAITED_FOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Spawn `command` as a child whose exit status only its [`std::process::Child`]
/// collects; call [`forget_waited`] once it was waited for.
pub fn spawn_waited(command: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    // Held across the spawn: the reaper cannot take it in between.
    let mut waited = waited_for();
    let child = command.spawn()?;
    waited.insert(child.id() as i32);
    Ok(child)
}

/// The child `pid` of [`spawn_waited`] was waited for.
pub fn forget_waited(pid: i32) {
    waited_for().remove(&pid);
}

/// Reap this process's children that exited (restored processes that
/// moved away, orphans of theirs: the agent is a subreaper), except those
/// of [`spawn_waited`].
pub fn reap_exited_children() {
    let waited = waited_for();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    let children: std::collections::BTreeSet<i32> = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    for pid in children.difference(&waited) {
        // SAFETY: waitpid on one child, WNOHANG, no status pointer.
        unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reaper_leaves_a_waited_for_child_to_its_spawner() {
        let mut child =
            spawn_waited(std::process::Command::new("true").stdout(std::process::Stdio::null()))
                .expect("spawn true");
        let pid = child.id() as i32;
        // A zombie, then the reaper's pass: the status must still be ours.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        reap_exited_children();
        let status = child.wait().expect("the spawner waits for its child");
        forget_waited(pid);
        assert!(status.success());
    }

    #[test]
    fn a_process_is_doomed_once_killed_even_before_it_is_reaped() {
        let Ok(mut child) = std::process::Command::new("sleep").arg("30").spawn() else {
            return;
        };
        let pid = child.id() as i32;
        assert!(!doomed(pid), "a sleeping process can run again");
        // Stopped, like a tree CRIU holds: still not doomed.
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert!(!doomed(pid));
        let _ = child.kill();
        // Not reaped yet: a zombie (or still exiting), never running again.
        let started = std::time::Instant::now();
        while !doomed(pid) && started.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(doomed(pid));
        let _ = child.wait();
        assert!(doomed(pid), "gone");
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(
            KernelVersion::parse("6.18.44-fc-v669"),
            Some(KernelVersion {
                major: 6,
                minor: 18,
                patch: 44
            })
        );
        assert_eq!(
            KernelVersion::parse("6.6-rc1"),
            Some(KernelVersion {
                major: 6,
                minor: 6,
                patch: 0
            })
        );
        assert_eq!(KernelVersion::parse("garbage"), None);
        assert!(KernelVersion::parse("6.1.0").is_some_and(|v| v < KernelVersion::TCX));
    }

    #[test]
    fn give_up_time_matches_the_kernel_model() {
        // Default tcp_retries2=15: ~924.6 s (the "about 15 minutes").
        assert_eq!(retransmit_give_up_ms(15), 924_600);
        // Below the threshold it is the plain doubling sum.
        assert_eq!(retransmit_give_up_ms(3), 3_000); // 0.2+0.4+0.8+1.6
        assert_eq!(retransmit_give_up_ms(9), 204_600);
    }

    #[test]
    fn capability_bits() {
        assert!(has_capability(1 << CAP_BPF, CAP_BPF));
        assert!(!has_capability(1 << CAP_BPF, CAP_NET_ADMIN));
    }
}
