//! `cargo xtask bench faults`: the fault matrix, for real. For each point
//! of a migration (as the source publishes its phase: the dump, the
//! transfer, the destination restoring and waiting for the commit) and
//! each fault (the destination's agent killed, `migrate` killed, the
//! network between the hosts cut, CRIU killed on the host working at that
//! point), one migration of the lab workload with that fault injected
//! once the point is reached. Live copies of the process are counted on
//! both hosts every 10 ms throughout (a copy is live when it runs: not
//! stopped, not a zombie, not held by a tracer such as CRIU), and once
//! things settle: the outcome, whether the peers' connections are intact,
//! and whether the state left needs `migrator recover`.
//!
//! Figures, not a test: `bench-faults [FAULT]` prints one row per cell
//! (FAULT: one of the faults' names, for its row only).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use migrator_tests::{
    lab::{DST, SRC},
    migration::MigrationLab,
};

#[derive(Clone, Copy, Debug)]
enum Fault {
    AgentKilled,
    MigrateKilled,
    NetworkCut,
    CriuKilled,
}

/// Points, by the phase the source publishes when it gets there.
const POINTS: [&str; 3] = ["dump", "transfer", "restore (destination)"];

/// PIDs of running `lab-workload` copies in these namespaces: not
/// stopped, not zombies, not traced (CRIU holds the copies it dumps or
/// restores with ptrace).
fn live_copies(netns: &[u64]) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| netns.contains(&m.ino()))
        })
        .filter(|e| {
            let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
                return false;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or("")
                    .to_owned()
            };
            field("Name:") == "lab-workload"
                && !field("State:").starts_with(['T', 't', 'Z', 'X'])
                && field("TracerPid:") == "0"
        })
        .count()
}

fn phase_of(lab: &MigrationLab) -> String {
    let root = migrator_tests::lab::pin_root_of(&lab.lab.netns_path(SRC));
    root.and_then(|root| std::fs::read_to_string(migrator::watch::phase_file(&root)).ok())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn kill_in(lab: &MigrationLab, host: &str, comm: &str) -> usize {
    let mut killed = 0;
    for pid in migrator_tests::lab::processes_in(&lab.lab.netns_path(host)) {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let matches = match comm {
            "agent" => name.trim() == "migrator" && cmdline.contains("agent"),
            "migrate" => name.trim() == "migrator" && cmdline.contains("migrate"),
            // Run through its loader by the launcher setup writes: known
            // by its path, not its name.
            "criu" => cmdline.contains("sbin/criu"),
            other => name.trim() == other,
        };
        if matches {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

fn inject(lab: &MigrationLab, fault: Fault, point: &str) -> String {
    match fault {
        Fault::AgentKilled => format!("{} agent(s) killed", kill_in(lab, DST, "agent")),
        Fault::MigrateKilled => format!("{} migrate killed", kill_in(lab, SRC, "migrate")),
        Fault::NetworkCut => {
            // Both ways, on the destination's side of the channel; healed
            // after the lock's deadline.
            lab.nft(
                DST,
                "table inet cut {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport 7070 drop\n  }\n  chain output {\n    type filter hook output priority 0;\n    tcp sport 7070 drop\n  }\n}\n",
            );
            "channel cut both ways".to_owned()
        }
        Fault::CriuKilled => {
            let host = if point.starts_with("restore") {
                DST
            } else {
                SRC
            };
            format!("{} criu killed on {host}", kill_in(lab, host, "criu"))
        }
    }
}

struct Cell {
    fault: Fault,
    point: &'static str,
    outcome: String,
    injected: String,
    max_live: usize,
    live_after: usize,
    intact: bool,
    settle_ms: f64,
}

fn run_cell(fault: Fault, point: &'static str, deadline_s: u64) -> Cell {
    let mut lab = MigrationLab::new("faults");
    let pid = lab.start_workload(true, 16);
    std::thread::sleep(Duration::from_millis(500));
    let hosts = vec![lab.netns_inode(SRC), lab.netns_inode(DST)];
    let (stop, max_live) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let sampler = {
        let (stop, max_live, hosts) = (stop.clone(), max_live.clone(), hosts.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                max_live.fetch_max(live_copies(&hosts), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = Instant::now();
    let deadline = format!("{deadline_s}s");
    let run = std::thread::scope(|scope| {
        let injector = scope.spawn(|| {
            while started.elapsed() < Duration::from_secs(20) {
                if phase_of(&lab) == point {
                    // A moment into the phase.
                    std::thread::sleep(Duration::from_millis(5));
                    return inject(&lab, fault, point);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            "point never reached".to_owned()
        });
        let run = lab.migrate(SRC, DST, pid, &["--deadline", &deadline]);
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
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let intact = lab.peer_connections().iter().all(|c| c["error"].is_null())
        && lab.peer_connections().len() == 3;
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
        live_after,
        intact,
        settle_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

fn main() {
    let deadline_s = 6;
    // `bench-faults [FAULT]`: one row of the matrix only.
    // (`cargo xtask bench` passes every bench its rounds first: not a
    // fault's name.)
    let only = std::env::args()
        .skip(1)
        .find(|arg| arg.parse::<u32>().is_err());
    let faults: Vec<Fault> = [
        Fault::AgentKilled,
        Fault::MigrateKilled,
        Fault::NetworkCut,
        Fault::CriuKilled,
    ]
    .into_iter()
    .filter(|f| {
        only.as_ref()
            .is_none_or(|o| format!("{f:?}").eq_ignore_ascii_case(o))
    })
    .collect();
    println!(
        "fault matrix: the lab workload (16 MiB, 3 connections) moved src -> dst, lock deadline {deadline_s} s;\n\
         live copies sampled every 10 ms on both hosts (running, untraced)\n"
    );
    println!(
        "{:<14} {:<22} {:<16} {:>8} {:>8} {:>7} {:>9}  what was injected",
        "fault", "point", "outcome", "max live", "after", "intact", "settle ms"
    );
    let mut violations = 0;
    for fault in faults {
        for point in POINTS {
            let cell = run_cell(fault, point, deadline_s);
            let verdict = if cell.injected.starts_with("0 ") || cell.injected.contains("never") {
                "  (nothing to hit at that point)"
            } else if cell.max_live > 1 {
                violations += 1;
                "  TWO COPIES"
            } else if cell.live_after == 1 && !cell.intact {
                "  CONNECTIONS BROKEN"
            } else if cell.live_after == 0 {
                "  needs recover"
            } else {
                ""
            };
            println!(
                "{:<14} {:<22} {:<16} {:>8} {:>8} {:>7} {:>9.0}  {}{verdict}",
                format!("{:?}", cell.fault),
                cell.point,
                cell.outcome,
                cell.max_live,
                cell.live_after,
                cell.intact,
                cell.settle_ms,
                cell.injected
            );
        }
    }
    println!("\ncells with two live copies at once: {violations}");
}
