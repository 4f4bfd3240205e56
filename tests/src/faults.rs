//! The fault matrix's cells: one migration of the lab workload with one
//! fault injected at one point, the live copies of the process sampled
//! every 10 ms on both hosts throughout, and what was left once things
//! settled. Run by `bench-faults` (the matrix as a table) and by the
//! tests (its invariants).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    lab::{DST, SRC},
    migration::MigrationLab,
};

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The destination's agent, SIGKILL.
    AgentKilled,
    /// `migrate`, SIGKILL.
    MigrateKilled,
    /// The channel between the hosts, both ways (nftables on the
    /// destination), healed after the lock's deadline.
    NetworkCut,
    /// The same cut, never healed (while the cell lasts).
    NetworkCutForever,
    /// CRIU on the host working at that point: the source's once it holds
    /// the tree (mid-dump) and while it waits for the verdict with every
    /// image written (the transfer), the destination's mid-restore.
    CriuKilled,
    /// The destination's restore fails (`MIGRATOR_FAULTS=restore-fails`
    /// on its agent): only at the restore.
    RestoreFails,
    /// The destination's image store full: its migration's tmpfs (128 MiB
    /// here, `--max-image-memory`) filled up by another writer while the
    /// images arrive.
    ImagesFull,
}

impl Fault {
    pub const ALL: [Self; 7] = [
        Self::AgentKilled,
        Self::MigrateKilled,
        Self::NetworkCut,
        Self::NetworkCutForever,
        Self::CriuKilled,
        Self::RestoreFails,
        Self::ImagesFull,
    ];

    /// The points where this fault means something: CRIU runs only from
    /// the dump to the end of the restore; the restore fails only at the
    /// restore; the images arrive from the dump to the transfer.
    pub fn points(self) -> &'static [&'static str] {
        match self {
            Self::CriuKilled => &POINTS[1..4],
            Self::RestoreFails => &POINTS[3..4],
            Self::ImagesFull => &POINTS[..3],
            _ => &POINTS,
        }
    }
}

/// Points, by the phase the source publishes when it gets there: preflight
/// done ("prepared", nothing frozen yet), the dump, the transfer, the
/// destination restoring, the destination's copy restored and waiting
/// (stopped) for the commit (seen on the destination: the source only
/// waits then), and the source's cleanup after the destination took over.
pub const POINTS: [&str; 6] = [
    "prepared",
    "dump",
    "transfer",
    "restore (destination)",
    RESTORED,
    "cleanup",
];

/// The point no phase names: the destination's copy restored, stopped.
const RESTORED: &str = "restored (destination)";

/// How many `lab-workload` copies run in these namespaces: not stopped,
/// not zombies, not traced (CRIU holds the copies it dumps or restores
/// with ptrace), not being killed or stopped.
pub fn live_copies(netns: &[u64]) -> usize {
    live_copy_statuses(netns).len()
}

/// The `/proc/PID/status` of each live copy (see [`live_copies`]).
fn live_copy_statuses(netns: &[u64]) -> Vec<String> {
    crate::migration::workload_statuses(netns)
        .into_iter()
        .filter(|status| {
            let pid = status_field(status, "Pid:").parse::<i32>().unwrap_or(0);
            // A copy being killed (SIGKILL pending, exiting) may show as
            // running for a moment, but it never runs its code again.
            // Nor does a copy being stopped, until the scheduler gets to
            // each of its threads (2 ms seen here): CRIU leaves a restored
            // copy stopped by sending it SIGSTOP and then letting go of
            // it, and each thread stops on its way out of the kernel.
            !status_field(status, "State:").starts_with(['T', 't', 'Z', 'X'])
                && status_field(status, "TracerPid:") == "0"
                && !migrator::system::doomed(pid)
                && !being_stopped(pid, status)
        })
        .collect()
}

/// Whether a stop is under way in process `pid`: SIGSTOP pending, or
/// (once a thread took it) one of its threads stopped already.
fn being_stopped(pid: i32, status: &str) -> bool {
    migrator::system::signal_pending(status, libc::SIGSTOP)
        || std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
            .any(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            })
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or("", str::trim)
}

/// One line per live copy: who it is and where, to explain a sample with
/// more than one.
fn describe_copies(statuses: &[String]) -> String {
    use std::os::unix::fs::MetadataExt as _;
    statuses
        .iter()
        .map(|status| {
            let pid = status_field(status, "Pid:");
            let parent = status_field(status, "PPid:");
            let netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).map_or(0, |m| m.ino());
            let parent_cmd = std::fs::read_to_string(format!("/proc/{parent}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            format!(
                "pid {pid} (netns {netns}, state {}, signals blocked {}, pending {}, parent {parent}: {})",
                status_field(status, "State:"),
                status_field(status, "SigBlk:"),
                status_field(status, "ShdPnd:"),
                parent_cmd.trim()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The phase the source published last.
fn phase_of(lab: &MigrationLab) -> String {
    let root = crate::lab::pin_root_of(&lab.lab.netns_path(SRC));
    root.and_then(|root| migrator::watch::current_phase(&root))
        .unwrap_or_default()
}

/// SIGKILL the processes of `comm` in `host`'s namespace; how many, and
/// what they were (their command lines, shortened).
fn kill_in(lab: &MigrationLab, host: &str, comm: &str) -> (usize, String) {
    let mut killed = Vec::new();
    for pid in crate::lab::processes_in(&lab.lab.netns_path(host)) {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let matches = match comm {
            "agent" => name.trim() == "migrator" && cmdline.contains("agent"),
            "migrate" => name.trim() == "migrator" && cmdline.contains("migrate"),
            // Run by the launcher setup writes (a shell script, then
            // CRIU's loader): known by its path, not its name, and once
            // dumping by the title it gives itself ("criu: dump ...").
            "criu" => cmdline.contains("bin/criu") || cmdline.contains("criu: "),
            other => name.trim() == other,
        };
        if matches {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // CRIU's own title once it works ("criu: dump ..."), else
            // what follows its path ("swrk 25").
            let words = cmdline.replace('\0', " ");
            let shown = match (words.find("criu: "), words.find("sbin/criu ")) {
                (Some(at), _) => &words[at..],
                (None, Some(at)) => &words[at + "sbin/criu ".len()..],
                (None, None) => words.as_str(),
            };
            killed.push(
                shown
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    (killed.len(), killed.join("; "))
}

fn inject(lab: &MigrationLab, fault: Fault, point: &str) -> String {
    match fault {
        Fault::AgentKilled => format!("{} agent(s) killed", kill_in(lab, DST, "agent").0),
        Fault::MigrateKilled => format!("{} migrate killed", kill_in(lab, SRC, "migrate").0),
        Fault::NetworkCut | Fault::NetworkCutForever => {
            // Both ways, on the destination's side of the channel.
            lab.nft(
                DST,
                "table inet cut {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport 7070 drop\n  }\n  chain output {\n    type filter hook output priority 0;\n    tcp sport 7070 drop\n  }\n}\n",
            );
            "channel cut both ways".to_owned()
        }
        Fault::RestoreFails => "the agent's restore fails (MIGRATOR_FAULTS)".to_owned(),
        Fault::ImagesFull => fill_images(lab),
        Fault::CriuKilled => {
            let host = if point.starts_with("restore") {
                DST
            } else {
                SRC
            };
            // Mid-dump means CRIU holds the tree: wait until it does.
            if point == "dump" {
                let src = [lab.netns_inode(SRC)];
                let held = Instant::now();
                while held.elapsed() < Duration::from_secs(5)
                    && !crate::migration::workload_statuses(&src)
                        .iter()
                        .any(|status| !status.contains("TracerPid:\t0\n"))
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            // The restore's CRIU starts a moment after the phase: wait
            // for it (a while at most).
            let looking = Instant::now();
            let (mut n, mut which) = kill_in(lab, host, "criu");
            while n == 0 && looking.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_micros(200));
                (n, which) = kill_in(lab, host, "criu");
            }
            format!("{n} criu killed on {host} ({which})")
        }
    }
}

/// Fill the destination's image tmpfs for the migration in flight (the
/// agent's newest session directory) with a file of our own.
fn fill_images(lab: &MigrationLab) -> String {
    let agent_dir = lab.dir.0.join(format!("agent-{DST}"));
    let Some(session) = std::fs::read_dir(&agent_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(migrator::agent::SESSION_PREFIX)
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
    else {
        return "0 bytes written: no session directory at the destination".to_owned();
    };
    let filler = session.path().join("filler");
    let mut written = 0u64;
    if let Ok(mut file) = std::fs::File::create(&filler) {
        use std::io::Write as _;
        let block = vec![0xa5u8; 1 << 20];
        while file.write_all(&block).is_ok() {
            written += block.len() as u64;
        }
    }
    format!(
        "{written} bytes written to {}, until it was full",
        session.path().display()
    )
}

/// Whether the destination holds a restored copy waiting for the commit:
/// stopped, no longer held by CRIU.
fn restored_at_destination(lab: &MigrationLab) -> bool {
    crate::migration::workload_statuses(&[lab.netns_inode(DST)])
        .iter()
        .any(|status| status.contains("State:\tT") && status.contains("TracerPid:\t0\n"))
}

/// What one cell did.
pub struct Cell {
    pub fault: Fault,
    pub point: &'static str,
    pub outcome: String,
    pub injected: String,
    pub max_live: usize,
    /// The copies seen live at once, when more than one was.
    pub crowded: String,
    pub live_after: usize,
    pub intact: bool,
    /// The report says the process is lost (nothing to recover).
    pub lost: bool,
    /// The report's error, or what `migrate` printed last without one.
    pub error: String,
    pub settle_ms: f64,
}

/// One migration src -> dst with `fault` at `point`, locks with a
/// `deadline_s` deadline; returns once settled (past the deadline).
pub fn run_cell(fault: Fault, point: &'static str, deadline_s: u64) -> Cell {
    let mut lab = MigrationLab::new("faults");
    // The restored copy waits a few ms for the commit, and the images of
    // this small process cross in about one, too briefly for the injector
    // to see every time: there, the agent holds the copy a while
    // (MIGRATOR_FAULTS=restored-pause), and the source its transfer
    // (transfer-pause).
    let mut agent_faults = Vec::new();
    let mut agent_args: &[&str] = &[];
    match fault {
        Fault::RestoreFails => agent_faults.push("restore-fails"),
        Fault::ImagesFull => agent_args = &["--max-image-memory", "128"],
        _ => {}
    }
    if point == RESTORED {
        agent_faults.push("restored-pause");
    }
    if !agent_faults.is_empty() || !agent_args.is_empty() {
        lab.stop_agent(DST);
        let faults = agent_faults.join(",");
        let faults = (!faults.is_empty()).then_some(faults.as_str());
        lab.start_agent_injecting(DST, agent_args, faults);
    }
    let pid = lab.start_workload(true, 16);
    std::thread::sleep(Duration::from_millis(500));
    let hosts = vec![lab.netns_inode(SRC), lab.netns_inode(DST)];
    let (stop, max_live) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    // The first sample with more than one live copy, described.
    let sampler = {
        let (stop, max_live, hosts) = (stop.clone(), max_live.clone(), hosts.clone());
        std::thread::spawn(move || {
            let mut crowded = String::new();
            while !stop.load(Ordering::Relaxed) {
                let live = live_copy_statuses(&hosts);
                if live.len() > 1 && crowded.is_empty() {
                    crowded = describe_copies(&live);
                }
                max_live.fetch_max(live.len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            crowded
        })
    };
    let started = Instant::now();
    let deadline = format!("{deadline_s}s");
    let run = std::thread::scope(|scope| {
        let injector = scope.spawn(|| {
            while started.elapsed() < Duration::from_secs(20) {
                let phase = phase_of(&lab);
                if point == RESTORED {
                    if phase == "restore (destination)" && restored_at_destination(&lab) {
                        return inject(&lab, fault, point);
                    }
                } else if phase == point {
                    // A moment into the phase.
                    std::thread::sleep(Duration::from_millis(5));
                    return inject(&lab, fault, point);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            "point never reached".to_owned()
        });
        let args = ["--deadline", deadline.as_str()];
        let run = if point == "transfer" {
            lab.migrate_with_faults(SRC, DST, pid, "transfer-pause", &args)
        } else {
            lab.migrate(SRC, DST, pid, &args)
        };
        (run, injector.join().unwrap())
    });
    let ((run, injected), migrated_at) = (run, started.elapsed());
    // Settle: past the locks' deadline, the cut healed, the agent back.
    std::thread::sleep(Duration::from_secs(deadline_s + 1).saturating_sub(migrated_at));
    if matches!(fault, Fault::NetworkCut) {
        let _ = lab.lab.nft(DST, "delete table inet cut\n");
    }
    std::thread::sleep(Duration::from_secs(2));
    let live_after = live_copies(&hosts);
    if matches!(fault, Fault::NetworkCutForever) {
        let _ = lab.lab.nft(DST, "delete table inet cut\n");
    }
    stop.store(true, Ordering::Relaxed);
    let crowded = sampler.join().unwrap();
    let intact = lab.peer_connections().iter().all(|c| c["error"].is_null())
        && lab.peer_connections().len() == 3;
    let lost = run.report.as_ref().is_some_and(|r| {
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("the process is lost"))
    });
    let error = run
        .report
        .as_ref()
        .and_then(|r| r["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| run.stderr.lines().last().unwrap_or("").to_owned());
    let outcome = run
        .report
        .as_ref()
        .and_then(|r| r["outcome"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("no report (exit {:?})", run.code));
    Cell {
        fault,
        point,
        outcome,
        injected,
        max_live: max_live.load(Ordering::Relaxed),
        crowded,
        live_after,
        intact,
        lost,
        error,
        settle_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}
