//! The channel between the hosts under attack and under faults, in the lab
//! with the real agent: a byte flipped on the wire, the wire read, idle
//! clients holding the agent, a link cut during the hand-over.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use migrator_tests::{
    lab::{self, DST, SERVICE_V4, SERVICE_V6, SRC},
    migration::{MigrationLab, Workload},
    wire::{Capture, Relay, contains, in_netns},
};
use serde_json::Value;

fn agent_address(host: &str) -> SocketAddr {
    format!("{}:{}", lab::host_addresses(host).0, lab::AGENT_PORT)
        .parse()
        .unwrap()
}

fn outcome(run: &migrator_tests::migration::MigrateRun) -> String {
    run.report
        .as_ref()
        .and_then(|r| r["outcome"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("no report; stderr: {}", run.stderr))
}

/// This lab's workload processes that are running (not stopped, not
/// zombies), on either host: other tests run workloads of their own.
fn running_workloads(netns: &[u64]) -> usize {
    migrator_tests::migration::workload_statuses(netns)
        .iter()
        .filter(|status| {
            let state = status.lines().find_map(|l| l.strip_prefix("State:"));
            !state.is_some_and(|s| s.trim_start().starts_with(['T', 't', 'Z', 'X']))
        })
        .count()
}

/// The namespaces of the lab's two hosts.
fn hosts(lab: &MigrationLab) -> Vec<u64> {
    vec![lab.netns_inode(SRC), lab.netns_inode(DST)]
}

/// The workload's connections carry on: every echo grows again.
fn assert_flowing(lab: &MigrationLab) {
    let before: Vec<u64> = lab
        .current_connections()
        .iter()
        .map(|c| c["echoed"].as_u64().unwrap())
        .collect();
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = lab.current_connections();
        for conn in &now {
            assert_eq!(conn["error"], Value::Null, "connection broken: {conn}");
        }
        if now
            .iter()
            .zip(&before)
            .all(|(c, b)| c["echoed"].as_u64().unwrap() > *b)
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the streams did not resume: {now:?}"
        );
    }
}

/// A man in the middle forwards the handshake, then flips one byte of the
/// image stream. TLS notices (the record fails authentication), the
/// session aborts, nothing is restored on the destination and the source
/// rolls back with its connections alive.
#[test]
fn a_flipped_byte_in_the_image_stream_aborts_and_rolls_back() {
    let mut lab = MigrationLab::new("mitm");
    let pid = lab.start(Workload {
        own_pid_namespace: true,
        ballast_mb: 8,
        ..Workload::default()
    });
    // Past the handshake and the control messages: inside the images.
    let relay = Relay::start(
        &lab.lab.netns_path(SRC),
        "198.18.0.2:7171".parse().unwrap(),
        agent_address(DST),
        Some(1 << 20),
    );
    let run = lab.migrate_via(SRC, &relay.listen.to_string(), pid, &[]);
    assert!(relay.flipped.load(Ordering::Relaxed), "no byte was flipped");
    assert!(!run.success);
    assert_eq!(outcome(&run), "rolled-back", "{}", run.stderr);
    assert_eq!(run.code, Some(4), "rolled back exits 4");
    // The agent logs once it has undone its side, which may be after the
    // source is done rolling back.
    let log_path = lab.dir.0.join("dst-migrator.log");
    let started = std::time::Instant::now();
    let mut agent_log = String::new();
    while started.elapsed() < Duration::from_secs(10) {
        agent_log = std::fs::read_to_string(&log_path).unwrap();
        if agent_log.contains("session failed") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        agent_log.contains("decrypt"),
        "the agent did not report an integrity failure:\n{agent_log}"
    );
    assert!(!lab.has_address(DST, SERVICE_V4) && !lab.pins_left(DST));
    assert_eq!(
        running_workloads(&hosts(&lab)),
        1,
        "not exactly one copy running"
    );
    assert!(lab.has_address(SRC, SERVICE_V4) && lab.has_address(SRC, SERVICE_V6));
    assert_flowing(&lab);
}

/// Everything on the link during a migration is captured: the memory of
/// the process (a random marker it keeps) is not in it. The same search
/// finds the marker in the memory of the process restored from the pages
/// that crossed, so the search itself works.
#[test]
fn the_wire_never_carries_the_process_memory() {
    let mut lab = MigrationLab::new("wire");
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    let marker: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let pid = lab.start(Workload {
        own_pid_namespace: true,
        ballast_mb: 4,
        marker: Some(marker.clone()),
        ..Workload::default()
    });
    let capture = Capture::start(&lab.lab.netns_path(DST), lab::IFACE);
    let run = lab.migrate(SRC, DST, pid, &[]);
    let wire = capture.finish();
    assert!(run.success, "{}", run.stderr);
    let report = run.report.unwrap();
    let image_bytes = report["image_bytes"].as_u64().unwrap();
    assert!(
        wire.len() as u64 > image_bytes,
        "the capture missed the transfer: {} bytes on the wire, {image_bytes} of images",
        wire.len()
    );
    assert!(
        !contains(&wire, marker.as_bytes()),
        "the process's memory crossed the link in clear"
    );
    // The pages crossed as the page stream: the marker is in the memory
    // of the process restored from them (else the search proves nothing).
    let restored = report["destination_pid"].as_i64().unwrap() as i32;
    assert!(
        contains(&process_memory(restored), marker.as_bytes()),
        "the marker is not in the restored process's memory either: the search proves nothing"
    );
}

/// The writable private memory of a process, read through /proc.
fn process_memory(pid: i32) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut memory = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut region = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut region, start).is_ok() {
            memory.extend(region);
        }
    }
    memory
}

/// Fifty idle TCP connections to the agent (no byte sent) do not stop a
/// migration, and the agent closes them after its handshake deadline.
#[test]
fn idle_connections_do_not_block_a_migration() {
    let mut lab = MigrationLab::new("idle");
    let pid = lab.start_workload(true, 0);
    let target = agent_address(DST);
    let idle: Vec<TcpStream> = in_netns(&lab.lab.netns_path(SRC), move || {
        (0..50)
            .map(|_| TcpStream::connect(target).unwrap())
            .collect()
    })
    .join()
    .unwrap();
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(run.success, "{}", run.stderr);
    // Each idle one is closed by the agent (end of stream or reset)
    // within its 5 s handshake deadline, give or take.
    let closed = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = idle
        .into_iter()
        .map(|mut conn| {
            let closed = closed.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut byte = [0u8; 1];
                match conn.read(&mut byte) {
                    Ok(0) => closed.fetch_add(1, Ordering::Relaxed),
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                        closed.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => 0,
                };
            })
        })
        .collect();
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(
        closed.load(Ordering::Relaxed),
        50,
        "idle connections left open"
    );
}

/// The link between the hosts is cut the moment the destination starts
/// restoring, and the source's connection is torn down, so the source
/// rolls back at once while the destination goes on restoring. The
/// destination's copy stays stopped while it waits for a commit that
/// cannot arrive, then is removed. At no moment do two copies run, and in
/// the end exactly one does, on the source, its connections alive.
///
/// The agent holds its restored copy 300 ms before it says ready
/// (`restored-pause`): without that, a small process's restore and
/// hand-over can finish before the cut lands, and the test would not run
/// its case (CI saw `migrated` once under load).
#[test]
fn a_link_cut_during_the_restore_never_runs_two_copies() {
    let mut lab = MigrationLab::new("cut");
    lab.stop_agent(DST);
    lab.start_agent_injecting(DST, &[], Some("restored-pause"));
    let pid = lab.start_workload(true, 0);
    let state = lab.dir.0.join("agent-dst");
    let dst_netns = lab.lab.clone();
    let src_netns = lab.lab.netns_path(SRC);
    let both = hosts(&lab);
    let two_copies = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, halt) = (two_copies.clone(), stop.clone());
    let watcher = std::thread::spawn(move || {
        let mut cut = false;
        // CRIU's own restore work shows the new copy as running for a few
        // tens of ms before it stops it (leave-stopped): that is not the
        // process running. Two copies for a whole second are.
        let mut overlap_since: Option<Instant> = None;
        while !halt.load(Ordering::Relaxed) {
            if running_workloads(&both) > 1 {
                let since = *overlap_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    seen.store(true, Ordering::Relaxed);
                }
            } else {
                overlap_since = None;
            }
            let restoring = std::fs::read_dir(&state)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .any(|e| e.path().join("restore.log").exists())
                })
                .unwrap_or(false);
            if restoring && !cut {
                dst_netns
                    .nft(
                        DST,
                        "table inet cut {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport 7070 drop\n  }\n  chain output {\n    type filter hook output priority 0;\n    tcp sport 7070 drop\n  }\n}\n",
                    )
                    .unwrap();
                // And the source's socket is torn down at once (as a
                // reset from a middlebox would): it rolls back now, while
                // the destination is still restoring.
                let killed = Command::new("nsenter")
                    .arg(format!("--net={}", src_netns.display()))
                    .args(["ss", "-K", "dst", "198.18.0.3", "dport", "=", ":7070"])
                    .output()
                    .unwrap();
                assert!(killed.status.success(), "ss -K: {killed:?}");
                cut = true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        cut
    });
    let run = lab.migrate(SRC, DST, pid, &["--deadline", "6s"]);
    // The destination undoes at its hand-over deadline, which comes before
    // the source's (it locked first): give it a moment at most.
    let started = Instant::now();
    while (lab.has_address(DST, SERVICE_V4) || lab.pins_left(DST))
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cut lands before the agent says ready, so the source can never
    // have committed: rolled back, never migrated nor in doubt.
    let result = outcome(&run);
    assert_eq!(result, "rolled-back", "{}", run.stderr);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    assert!(watcher.join().unwrap(), "the link was never cut");
    lab.lab.nft(DST, "delete table inet cut\n").unwrap();
    assert!(
        !two_copies.load(Ordering::Relaxed),
        "two copies ran at once"
    );
    assert_eq!(running_workloads(&hosts(&lab)), 1);
    assert_eq!(running_workloads(&[lab.netns_inode(SRC)]), 1);
    assert!(!lab.has_address(DST, SERVICE_V4));
    assert!(lab.has_address(SRC, SERVICE_V4));
    assert!(!lab.pins_left(SRC));
    assert_flowing(&lab);
}

/// `pid` migrated from src to an agent on dst that loses its answer to
/// the commit (`MIGRATOR_FAULTS=restored-reply-lost`: it closes the
/// connection instead, as a link failing right after the hand-over
/// would), with `extra` arguments: in doubt, exit 6.
fn migrate_losing_the_answer(
    lab: &mut MigrationLab,
    pid: i32,
    settle: Duration,
    extra: &[&str],
) -> migrator_tests::migration::MigrateRun {
    lab.stop_agent(DST);
    lab.start_agent_injecting(DST, &[], Some("restored-reply-lost"));
    std::thread::sleep(settle);
    let args: Vec<&str> = extra.iter().copied().chain(["--deadline", "8s"]).collect();
    let run = lab.migrate(SRC, DST, pid, &args);
    assert_eq!(outcome(&run), "in-doubt", "{}", run.stderr);
    assert_eq!(run.code, Some(6), "in doubt exits 6");
    run
}

/// One copy runs, on the destination, its connections flowing and never
/// broken.
fn assert_one_copy_there(lab: &MigrationLab) {
    assert_eq!(running_workloads(&[lab.netns_inode(SRC)]), 0);
    assert_eq!(
        running_workloads(&[lab.netns_inode(DST)]),
        1,
        "no copy runs on the destination"
    );
    assert_flowing(lab);
    for conn in lab.peer_connections() {
        assert_eq!(conn["error"], Value::Null, "{conn}");
    }
}

/// The destination's answer to the commit is lost: the source cannot
/// know whether the copy there runs, says so (in doubt, exit 6) and never
/// resumes its own. One copy runs, on the destination, with its
/// connections.
#[test]
fn a_lost_answer_to_the_commit_is_in_doubt_and_leaves_one_copy() {
    let mut lab = MigrationLab::new("lost");
    let pid = lab.start_workload(true, 0);
    let run = migrate_losing_the_answer(&mut lab, pid, Duration::from_millis(300), &[]);
    let report = run.report.unwrap();
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("runs on") && error.contains("or nowhere"),
        "{error}"
    );
    // Its memory streamed there: recover would run there, on the images
    // the agent said it keeps for this session.
    let agent_dir = lab.dir.0.join(format!("agent-{DST}"));
    let told = format!(
        "restore it there before the lock's deadline (8 s) with `migrator recover --images {}/",
        agent_dir.display()
    );
    assert!(error.contains(&told), "{error}");
    // The copy here is gone for good; the one there runs and owns the
    // addresses.
    assert!(
        MigrationLab::netns_of(pid).is_none(),
        "the source's copy runs"
    );
    assert!(lab.has_address(DST, SERVICE_V4) && lab.has_address(DST, SERVICE_V6));
    assert!(!lab.has_address(SRC, SERVICE_V4) && !lab.has_address(SRC, SERVICE_V6));
    assert_one_copy_there(&lab);
}

/// The same lost answer after a lazy restore: the copy there already runs
/// with part of its memory still in the images, and the channel is gone,
/// so the agent fills the rest without the source. The workload (its
/// 64 MiB ballast read back every second, exit on the first wrong byte)
/// runs on with its connections: one copy, on the destination.
#[test]
fn a_lost_answer_after_a_lazy_restore_still_gets_the_memory_filled() {
    let mut lab = MigrationLab::new("lostlz");
    let pid = lab.start_workload(true, 64);
    migrate_losing_the_answer(
        &mut lab,
        pid,
        Duration::from_millis(800),
        &["--lazy-restore"],
    );
    // Two checks of the whole ballast, then still one copy, running there
    // (none if its memory was never filled).
    std::thread::sleep(Duration::from_millis(2100));
    assert_one_copy_there(&lab);
}
