//! What CRIU would refuse about a process tree, found before anything is
//! frozen. CRIU 4.2 has no dry run of a dump (no `--check-only`; `criu
//! check` probes the kernel only), so a tree it cannot handle used to be
//! frozen, fail mid-dump and roll back. These are the refusals users meet
//! most, read from /proc, each with what to change.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    os::unix::fs::MetadataExt as _,
};

/// One regular file a process has open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenFile {
    pub fd: i32,
    pub path: String,
    /// (device, inode): the file's identity, whatever its path.
    pub id: (u64, u64),
}

/// What the checks need to know about one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: i32,
    pub comm: String,
    /// Session and process group, as this PID namespace sees them (0: the
    /// leader is outside it).
    pub sid: i32,
    pub pgrp: i32,
    /// The controlling terminal's device number (0: none).
    pub tty_nr: u32,
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    pub files: Vec<OpenFile>,
    /// Descriptors on a terminal (fd, path).
    pub terminal_fds: Vec<(i32, String)>,
}

/// A process outside the tree, named in a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outsider {
    pub pid: i32,
    pub comm: String,
}

impl fmt::Display for Outsider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "process {} (`{}`)", self.pid, self.comm)
    }
}

/// Why CRIU would refuse the tree, with what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The root does not lead its own session (started from a shell
    /// without `setsid`): "The root process N is not a session leader".
    RootNotSessionLeader {
        pid: i32,
        comm: String,
        leader: Option<Outsider>,
    },
    /// A process whose session leader is outside the tree.
    SessionLeaderOutside {
        pid: i32,
        comm: String,
        sid: i32,
    },
    /// A live process outside the tree leads one of its process groups.
    GroupLeaderOutside {
        pid: i32,
        comm: String,
        leader: Outsider,
    },
    ControllingTerminal {
        pid: i32,
        comm: String,
    },
    TerminalOpen {
        pid: i32,
        comm: String,
        fd: i32,
        path: String,
    },
    /// A file the tree has open that someone outside may write to: its
    /// size changes after the dump and CRIU's restore fails ("File ...
    /// has bad size").
    FileWrittenOutside {
        pid: i32,
        comm: String,
        fd: i32,
        path: String,
        writer: Outsider,
    },
    /// A process under another uid while we lack CAP_SYS_RESOURCE:
    /// "Can't get rlimit 0: Operation not permitted".
    OtherUid {
        pid: i32,
        comm: String,
        uid: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RootNotSessionLeader { pid, comm, leader } => {
                write!(f, "process {pid} (`{comm}`) does not lead its own session")?;
                if let Some(leader) = leader {
                    write!(f, " ({leader} does)")?;
                }
                write!(
                    f,
                    ", so CRIU refuses to dump it (\"not a session leader\"): start it in a session of its own, e.g. `setsid PROGRAM` or systemd"
                )
            }
            Self::SessionLeaderOutside { pid, comm, sid } => write!(
                f,
                "process {pid} (`{comm}`) is in session {sid}, whose leader is outside the tree, so CRIU refuses to dump it: start the tree's root with `setsid`"
            ),
            Self::GroupLeaderOutside { pid, comm, leader } => write!(
                f,
                "process {pid} (`{comm}`) is in a process group led by {leader} outside the tree, which CRIU cannot restore: start the tree's root with `setsid` (a session and group of its own)"
            ),
            Self::ControllingTerminal { pid, comm } => write!(
                f,
                "process {pid} (`{comm}`) has a controlling terminal, which cannot move to another host: start it detached (`setsid PROGRAM </dev/null >LOG 2>&1`)"
            ),
            Self::TerminalOpen {
                pid,
                comm,
                fd,
                path,
            } => write!(
                f,
                "process {pid} (`{comm}`) has the terminal {path} open (fd {fd}), whose other end stays here: redirect its input and output to files or /dev/null"
            ),
            Self::FileWrittenOutside {
                pid,
                comm,
                fd,
                path,
                writer,
            } => write!(
                f,
                "process {pid} (`{comm}`) has {path} open (fd {fd}) and {writer} outside the tree has it open for writing: if its size changes after the dump, CRIU's restore fails (\"File ... has bad size\"); give the tree a file of its own (or /dev/null), or stop the other writer"
            ),
            Self::OtherUid { pid, comm, uid } => write!(
                f,
                "process {pid} (`{comm}`) runs as uid {uid} and this migrator lacks CAP_SYS_RESOURCE, so CRIU cannot read its resource limits (\"Can't get rlimit 0: Operation not permitted\"): run migrator with the full root capability set, or the tree's processes as root (`migrator doctor` shows the capabilities)"
            ),
        }
    }
}

/// What the checks need beyond the tree itself.
pub struct Surroundings<'a> {
    /// We may read the rlimits of processes under other uids.
    pub has_sys_resource: bool,
    /// A live process outside the tree with this PID, if any.
    pub outsider: &'a dyn Fn(i32) -> Option<Outsider>,
    /// A process outside the tree with this file open for writing.
    pub writer_outside: &'a dyn Fn((u64, u64)) -> Option<Outsider>,
}

/// Every refusal for the tree (root first in `tree`).
pub fn check_tree(tree: &[ProcessFacts], around: &Surroundings<'_>) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    let pids: BTreeSet<i32> = tree.iter().map(|p| p.pid).collect();
    let Some(root) = tree.first() else {
        return refusals;
    };
    // One cause, said once: a root outside its own session puts its
    // descendants (and usually its group) there too.
    let root_outside = root.sid != root.pid;
    if root_outside {
        refusals.push(Refusal::RootNotSessionLeader {
            pid: root.pid,
            comm: root.comm.clone(),
            leader: (around.outsider)(root.sid),
        });
    }
    let mut seen_files = BTreeSet::new();
    for process in tree {
        let (pid, comm) = (process.pid, process.comm.clone());
        let said = |id: i32| root_outside && id == root.sid;
        if process.pid != root.pid && !pids.contains(&process.sid) && !said(process.sid) {
            refusals.push(Refusal::SessionLeaderOutside {
                pid,
                comm: comm.clone(),
                sid: process.sid,
            });
        }
        // A group whose leader died is fine (CRIU recreates it); a live
        // leader outside the tree is not.
        if !pids.contains(&process.pgrp)
            && !said(process.pgrp)
            && let Some(leader) = (around.outsider)(process.pgrp)
        {
            refusals.push(Refusal::GroupLeaderOutside {
                pid,
                comm: comm.clone(),
                leader,
            });
        }
        if process.tty_nr != 0 {
            refusals.push(Refusal::ControllingTerminal {
                pid,
                comm: comm.clone(),
            });
        }
        for (fd, path) in &process.terminal_fds {
            refusals.push(Refusal::TerminalOpen {
                pid,
                comm: comm.clone(),
                fd: *fd,
                path: path.clone(),
            });
        }
        for file in &process.files {
            if !seen_files.insert(file.id) {
                continue;
            }
            if let Some(writer) = (around.writer_outside)(file.id) {
                refusals.push(Refusal::FileWrittenOutside {
                    pid,
                    comm: comm.clone(),
                    fd: file.fd,
                    path: file.path.clone(),
                    writer,
                });
            }
        }
        if !around.has_sys_resource
            && let Some(uid) = process.uids.iter().copied().find(|uid| *uid != 0)
        {
            refusals.push(Refusal::OtherUid { pid, comm, uid });
        }
    }
    refusals
}

/// Read the tree from /proc and check it against the rest of this host.
pub fn check_pids(pids: &[i32], has_sys_resource: bool) -> Vec<Refusal> {
    let tree: Vec<ProcessFacts> = pids.iter().filter_map(|pid| read_process(*pid)).collect();
    let in_tree: BTreeSet<i32> = pids.iter().copied().collect();
    let files: BTreeSet<(u64, u64)> = tree
        .iter()
        .flat_map(|p| p.files.iter().map(|f| f.id))
        .collect();
    let writers = if files.is_empty() {
        BTreeMap::new()
    } else {
        writers_outside(&in_tree, &files)
    };
    let outsider = |pid: i32| -> Option<Outsider> {
        (pid > 0 && !in_tree.contains(&pid)).then_some(())?;
        Some(Outsider {
            pid,
            comm: read_comm(pid)?,
        })
    };
    let writer_outside = |id: (u64, u64)| writers.get(&id).cloned();
    check_tree(
        &tree,
        &Surroundings {
            has_sys_resource,
            outsider: &outsider,
            writer_outside: &writer_outside,
        },
    )
}

fn read_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|comm| comm.trim().to_owned())
}

/// One process's facts; None if it is gone.
pub fn read_process(pid: i32) -> Option<ProcessFacts> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (sid, pgrp, tty_nr) = parse_stat(&stat)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uids = parse_uids(&status)?;
    let mut facts = ProcessFacts {
        pid,
        comm: read_comm(pid).unwrap_or_default(),
        sid,
        pgrp,
        tty_nr,
        uids,
        ..ProcessFacts::default()
    };
    for (fd, path, meta) in crate::system::open_fds(pid) {
        if meta.file_type().is_file() {
            facts.files.push(OpenFile {
                fd,
                path,
                id: (meta.dev(), meta.ino()),
            });
        } else if is_terminal(&path) {
            facts.terminal_fds.push((fd, path));
        }
    }
    Some(facts)
}

/// (session, process group, controlling terminal) from /proc/PID/stat.
fn parse_stat(stat: &str) -> Option<(i32, i32, u32)> {
    // The command name may hold spaces and parentheses: fields start
    // after its last ')'. Then: state ppid pgrp session tty_nr ...
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((
        fields.get(3)?.parse().ok()?,
        fields.get(2)?.parse().ok()?,
        fields.get(4)?.parse::<i64>().ok()? as u32,
    ))
}

fn parse_uids(status: &str) -> Option<[u32; 4]> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let ids: Vec<u32> = line
        .split_whitespace()
        .filter_map(|id| id.parse().ok())
        .collect();
    ids.try_into().ok()
}

fn is_terminal(path: &str) -> bool {
    path.starts_with("/dev/pts/")
        || path == "/dev/tty"
        || path == "/dev/console"
        || path
            .strip_prefix("/dev/tty")
            .is_some_and(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

/// Whether the descriptor was opened for writing (fdinfo `flags`, octal).
fn fd_writable(pid: i32, fd: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            i64::from_str_radix(flags.trim(), 8).ok()
        })
        .is_some_and(|flags| flags & i64::from(libc::O_ACCMODE) != i64::from(libc::O_RDONLY))
}

/// For each of `files`, one process outside `tree` that has it open for
/// writing (scans every process's descriptors: preflight, not the freeze).
fn writers_outside(
    tree: &BTreeSet<i32>,
    files: &BTreeSet<(u64, u64)>,
) -> BTreeMap<(u64, u64), Outsider> {
    let mut writers = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return writers;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: getpid has no preconditions. (Our own descriptors are
        // not the workload's writers.)
        if tree.contains(&pid) || pid == unsafe { libc::getpid() } {
            continue;
        }
        for (fd, _, meta) in crate::system::open_fds(pid) {
            let id = (meta.dev(), meta.ino());
            if meta.file_type().is_file()
                && files.contains(&id)
                && !writers.contains_key(&id)
                && fd_writable(pid, fd)
                && let Some(comm) = read_comm(pid)
            {
                writers.insert(id, Outsider { pid, comm });
            }
        }
    }
    writers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: i32, sid: i32) -> ProcessFacts {
        ProcessFacts {
            pid,
            comm: format!("p{pid}"),
            sid,
            pgrp: sid,
            ..ProcessFacts::default()
        }
    }

    fn check(tree: &[ProcessFacts], has_sys_resource: bool) -> Vec<Refusal> {
        let outsider = |pid: i32| {
            (pid == 50).then(|| Outsider {
                pid,
                comm: "bash".into(),
            })
        };
        let writer = |id: (u64, u64)| {
            (id == (1, 7)).then(|| Outsider {
                pid: 60,
                comm: "logger".into(),
            })
        };
        check_tree(
            tree,
            &Surroundings {
                has_sys_resource,
                outsider: &outsider,
                writer_outside: &writer,
            },
        )
    }

    #[test]
    fn a_session_of_its_own_passes() {
        assert_eq!(check(&[process(100, 100), process(101, 100)], false), []);
    }

    #[test]
    fn a_tree_started_from_a_shell_is_refused_with_setsid() {
        let refusals = check(&[process(100, 50), process(101, 50)], true);
        assert_eq!(refusals.len(), 1, "one cause, said once: {refusals:?}");
        assert!(matches!(
            &refusals[0],
            Refusal::RootNotSessionLeader { leader: Some(l), .. } if l.comm == "bash"
        ));
        assert!(refusals[0].to_string().contains("setsid"));
        // A job-control shell gives the job a group of its own: same cause.
        let (mut root, mut child) = (process(100, 50), process(101, 50));
        (root.pgrp, child.pgrp) = (100, 100);
        assert_eq!(check(&[root, child], true).len(), 1);
    }

    #[test]
    fn a_dead_group_leader_is_fine_a_live_one_outside_is_not() {
        let mut child = process(101, 100);
        child.pgrp = 77; // leader gone
        assert_eq!(check(&[process(100, 100), child.clone()], true), []);
        child.pgrp = 50;
        assert!(matches!(
            check(&[process(100, 100), child], true)[..],
            [Refusal::GroupLeaderOutside { pid: 101, .. }]
        ));
    }

    #[test]
    fn terminals_are_refused() {
        let mut root = process(100, 100);
        root.tty_nr = 34_816;
        root.terminal_fds = vec![(1, "/dev/pts/3".into())];
        let refusals = check(&[root], true);
        assert!(matches!(refusals[0], Refusal::ControllingTerminal { .. }));
        assert!(
            matches!(&refusals[1], Refusal::TerminalOpen { fd: 1, path, .. } if path == "/dev/pts/3")
        );
    }

    #[test]
    fn a_file_written_outside_is_refused_once() {
        let file = |fd| OpenFile {
            fd,
            path: "/var/log/app.log".into(),
            id: (1, 7),
        };
        let mut root = process(100, 100);
        root.files = vec![file(1), file(2)];
        let mut mine = file(3);
        mine.id = (1, 8);
        root.files.push(mine);
        let refusals = check(&[root], true);
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let text = refusals[0].to_string();
        assert!(
            text.contains("/var/log/app.log") && text.contains("`logger`"),
            "{text}"
        );
        assert!(text.contains("bad size"), "{text}");
    }

    #[test]
    fn other_uids_need_cap_sys_resource() {
        let mut worker = process(101, 100);
        worker.uids = [33, 33, 33, 33];
        let tree = [process(100, 100), worker];
        assert!(matches!(
            check(&tree, false)[..],
            [Refusal::OtherUid {
                pid: 101,
                uid: 33,
                ..
            }]
        ));
        assert_eq!(check(&tree, true), []);
    }

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let stat = "4242 (a (b) c) S 1 4242 4242 34816 4242 4194560 0 0";
        assert_eq!(parse_stat(stat), Some((4242, 4242, 34_816)));
        assert_eq!(
            parse_uids("Name:\tx\nUid:\t0\t33\t33\t33\nGid:\t0\t0\t0\t0\n"),
            Some([0, 33, 33, 33])
        );
        assert!(is_terminal("/dev/pts/0") && is_terminal("/dev/tty1") && is_terminal("/dev/tty"));
        assert!(!is_terminal("/dev/null") && !is_terminal("/dev/ttyS0-log"));
    }

    /// This very test process, read for real, against what the kernel
    /// says through system calls.
    #[test]
    fn this_process_reads_as_the_kernel_sees_it() {
        // SAFETY: getpid, getsid, getpgrp and getuid have no preconditions.
        let (pid, sid, pgrp, uid) = unsafe {
            (
                libc::getpid(),
                libc::getsid(0),
                libc::getpgrp(),
                libc::getuid(),
            )
        };
        let facts = read_process(pid).unwrap_or_default();
        assert_eq!((facts.pid, facts.sid, facts.pgrp), (pid, sid, pgrp));
        assert_eq!(facts.uids[0], uid);
        assert!(!facts.comm.is_empty());
    }
}
