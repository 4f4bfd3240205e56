//! Live migrations in a lab of namespaces with the real kernel and CRIU:
//! a workload with three connections (two IPv4, one IPv6) whose peer
//! pushes bytes and verifies every echoed byte, moved back and forth, and
//! the ways a migration must refuse or roll back.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use migrator_tests::{
    lab::{self, DST, PEER, SERVICE_V4, SERVICE_V6, SRC},
    migration::{MigrationLab, SERVICE_PORT, Workload},
    wire::arrivals,
};
use serde_json::Value;

/// The peer's connections by remote endpoint, sorted: the four-tuples.
fn four_tuples(lab: &MigrationLab) -> Vec<String> {
    let mut tuples: Vec<String> = lab
        .peer_connections()
        .iter()
        .map(|c| format!("{}={}", c["local"], c["remote"]))
        .collect();
    tuples.sort();
    tuples
}

fn assert_streams_intact_and_flowing(lab: &MigrationLab, wait: Duration) {
    lab.assert_streams_intact_and_flowing(wait);
}

/// The report's phase `name` on `host` ("source" or "destination"), if
/// it ran.
fn phase<'a>(report: &'a Value, host: &str, name: &str) -> Option<&'a Value> {
    report["phases"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name && p["host"] == host)
}

/// When a phase ended (ms on the report's timeline).
fn end_ms(phase: &Value) -> f64 {
    phase["start_ms"].as_f64().unwrap() + phase["duration_ms"].as_f64().unwrap()
}

fn outcome(run: &migrator_tests::migration::MigrateRun) -> String {
    run.report
        .as_ref()
        .and_then(|r| r["outcome"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("no report; stderr: {}", run.stderr))
}

/// Move `pid` there (even rounds) or back (odd rounds); it must succeed.
fn move_round(lab: &MigrationLab, round: usize, pid: i32) -> (Value, &'static str, &'static str) {
    move_round_with(lab, round, pid, &[])
}

/// [`move_round`] with more `migrate` arguments.
fn move_round_with(
    lab: &MigrationLab,
    round: usize,
    pid: i32,
    extra: &[&str],
) -> (Value, &'static str, &'static str) {
    let (from, to) = if round.is_multiple_of(2) {
        (SRC, DST)
    } else {
        (DST, SRC)
    };
    let run = lab.migrate(from, to, pid, extra);
    assert!(
        run.success,
        "migration {round} {from} -> {to}: {}",
        run.stderr
    );
    assert_eq!(run.code, Some(0), "migrated exits 0");
    let report = run.report.unwrap();
    assert_eq!(report["schema_version"], 3);
    assert!(report["failed_phase"].is_null(), "{report}");
    assert!(report["error_code"].is_null(), "{report}");
    assert!(
        !report["destination_host"]["criu_version"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{report}"
    );
    // The report says where the freeze window went, and it adds up.
    let window = report["freeze_window_ms"].as_f64().unwrap();
    let parts = report["freeze_window_parts"].as_array().unwrap();
    let sum: f64 = parts.iter().map(|p| p["ms"].as_f64().unwrap()).sum();
    assert!((sum - window).abs() < 1e-6, "{sum} != {window}: {parts:?}");
    assert!(
        parts
            .iter()
            .any(|p| p["name"] == "restore" && p["host"] == "destination"),
        "{parts:?}"
    );
    // The peers' packets blocked while frozen (held, by default, or
    // dropped) are on the timeline, inside the freeze window (1 ms for
    // the clocks' conversion).
    let frozen_at = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "freeze")
        .and_then(|p| p["start_ms"].as_f64())
        .unwrap();
    let drops: Vec<f64> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| (e["kind"] == "drop" || e["kind"] == "hold") && e["host"] == "source")
        .map(|e| e["at_ms"].as_f64().unwrap())
        .collect();
    assert!(!drops.is_empty(), "no drop on the timeline");
    assert!(
        drops.iter().all(|at| *at >= frozen_at - 1.0),
        "drops before the freeze at {frozen_at}: {drops:?}"
    );
    // Later ones from the peers are stale packets: a peer still sending
    // here after this host gave up the addresses, counted as such (the
    // count is of packets in; one of ours the lock still blocks on its
    // way out is no stale packet).
    let released_at = phase(&report, "source", "ip-release")
        .and_then(|p| p["start_ms"].as_f64())
        .unwrap();
    let late: Vec<&Value> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["host"] == "source" && e["at_ms"].as_f64().unwrap() > frozen_at + window + 1.0
        })
        .collect();
    let stale: Vec<f64> = late
        .iter()
        .filter(|e| (e["kind"] == "drop" || e["kind"] == "hold") && e["direction"] == "in")
        .map(|e| e["at_ms"].as_f64().unwrap())
        .collect();
    let counted_stale: u64 = report["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stale_packets_source"].as_u64().unwrap())
        .sum();
    assert!(
        stale.iter().all(|at| *at >= released_at - 1.0) && stale.len() as u64 <= counted_stale,
        "drops after the window [{frozen_at}, +{window}] not counted as stale \
         ({counted_stale} after the ip-release at {released_at}): {drops:?}; the source's events after the window: {late:?}"
    );
    (report, from, to)
}

#[test]
fn ten_migrations_back_and_forth_keep_every_connection() {
    let mut lab = MigrationLab::new("ten");
    let mut pid = lab.start_workload(true, 0);
    std::thread::sleep(Duration::from_millis(500));
    let tuples = four_tuples(&lab);
    let mut windows = Vec::new();
    for round in 0..10 {
        let (report, from, to) = move_round(&lab, round, pid);
        assert_eq!(report["outcome"], "migrated");
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        // The process runs in the destination's network namespace ...
        assert_eq!(
            MigrationLab::netns_of(pid),
            Some(lab.netns_inode(to)),
            "pid {pid} is not in {to}"
        );
        // ... which now owns the service addresses, and the source not.
        assert!(lab.has_address(to, SERVICE_V4) && lab.has_address(to, SERVICE_V6));
        assert!(!lab.has_address(from, SERVICE_V4) && !lab.has_address(from, SERVICE_V6));
        // Both hosts cleaned up after themselves.
        assert!(!lab.pins_left(from) && !lab.pins_left(to), "pins left");
        // Four-tuples unchanged: no reconnection happened.
        assert_eq!(four_tuples(&lab), tuples);
        let connections = report["connections"].as_array().unwrap();
        assert_eq!(connections.len(), 3, "{report}");
        // The restore's CRIU found its kernel probes cached (this VM's
        // /run is no tmpfs: through the agent's link), not run inside the
        // window.
        assert_eq!(
            report["criu_restore"]["kernel_probes_cached"], true,
            "{report}"
        );
        windows.push(report["freeze_window_ms"].as_f64().unwrap());
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
    }
    eprintln!("freeze windows (ms): {windows:.1?}");
    // The peer never saw a reset, an EOF or a wrong byte.
    for conn in lab.peer_connections() {
        assert_eq!(conn["error"], Value::Null, "{conn}");
    }
    // The lab gone (its agents killed), no link leads into it.
    let dir = lab.dir.0.clone();
    drop(lab);
    assert!(
        !std::fs::read_link(lab::CRIU_KDAT_LINK).is_ok_and(|target| target.starts_with(&dir)),
        "/run/criu.kdat still leads into the removed lab"
    );
}

/// A process with 256 MiB of memory moves there and back: its pages
/// stream to the destination's page server while they are dumped (none
/// is written to the source's images), and the workload, which reads its
/// whole ballast back every second and exits on the first wrong byte,
/// keeps running with its connections. Its long freeze outlasts the
/// source sockets' retransmit timers: none of them may reach the peer
/// after the freeze, or its newer timestamp makes the peer drop the
/// restored sockets' segments as old (PAWS, counted at the peer).
#[test]
fn large_process_moves_there_and_back_with_its_memory_intact() {
    let mut lab = MigrationLab::new("big");
    let mut pid = lab.start_workload(true, 256);
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..2 {
        let paws_before = tcp_ext(&lab, PEER, "PAWSEstab");
        let (report, _, to) = move_round(&lab, round, pid);
        assert_eq!(report["outcome"], "migrated", "{report}");
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        eprintln!(
            "round {round}: freeze window {} ms = {}\nphases {}",
            report["freeze_window_ms"], report["freeze_window_parts"], report["phases"]
        );
        // The memory crossed as the page stream.
        assert!(
            report["image_bytes"].as_u64().unwrap() > 256 << 20,
            "{report}"
        );
        assert!(
            report["memory"].as_str().unwrap().starts_with("streamed"),
            "{report}"
        );
        // This kernel has no soft-dirty tracking; others would say why
        // pre-copy was not used.
        let precopy = report["precopy"].as_str().unwrap();
        assert!(
            precopy.starts_with("unavailable (no dirty tracking")
                || precopy.starts_with("not used"),
            "{precopy}"
        );
        let phases = report["phases"].as_array().unwrap();
        assert!(
            phases.iter().any(|p| p["name"] == "source-exit"),
            "the source's copy was not ended by the hand-over: {report}"
        );
        // Two checks of the ballast after the move.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
        assert_eq!(
            tcp_ext(&lab, PEER, "PAWSEstab"),
            paws_before,
            "the peer dropped the restored sockets' segments as old: {report}"
        );
    }
}

/// `--lazy-restore`: the destination's CRIU restores without the memory,
/// which `criu lazy-pages` fills from the images there after the
/// release. The workload (its whole ballast read back every second, exit
/// on the first wrong byte) moves there and back with its connections; the
/// reports place the fill after the release, outside the window, and the
/// daemon's start inside it.
#[test]
fn lazy_restore_moves_a_large_process_with_its_memory_intact() {
    let mut lab = MigrationLab::new("lazy");
    let mut pid = lab.start_workload(true, 128);
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..2 {
        let (report, _, to) = move_round_with(&lab, round, pid, &["--lazy-restore"]);
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        assert!(
            report["memory"]
                .as_str()
                .unwrap()
                .ends_with("restored lazily (the memory filled there after the release)"),
            "{report}"
        );
        filled_after_the_release(&report, 128);
        let phase = |name: &str| destination_phase(&report, name);
        assert!(
            end_ms(phase("lazy-pages-start"))
                <= phase("restore")["start_ms"].as_f64().unwrap() + 1e-6
        );
        let parts = report["freeze_window_parts"].as_array().unwrap();
        assert!(
            parts.iter().all(|p| p["name"] != "memory-fill"),
            "{parts:?}"
        );
        // Two checks of the ballast after the move.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
    }
}

/// The destination's phase `name` in `report`.
fn destination_phase<'a>(report: &'a Value, name: &str) -> &'a Value {
    phase(report, "destination", name)
        .unwrap_or_else(|| panic!("no destination phase {name}: {report}"))
}

/// A lazy restore's checks: the memory filled after the release, and the
/// restore itself copied almost nothing of the `ballast_mb` MiB (the fill
/// did). Returns the fill's phase.
fn filled_after_the_release(report: &Value, ballast_mb: u64) -> Value {
    let fill = destination_phase(report, "memory-fill");
    assert!(fill["duration_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        fill["start_ms"].as_f64().unwrap() >= end_ms(destination_phase(report, "release")) - 1.0,
        "{report}"
    );
    let restored = report["criu_restore"]["pages_restored"]
        .as_u64()
        .unwrap_or(0);
    assert!(restored < (ballast_mb << 20) / 4096 / 4, "{report}");
    fill.clone()
}

/// `--post-copy`: the dump stays here but for what the restore reads
/// itself; the destination restores lazily and its daemon fetches the
/// rest from here through the channel after the release. The workload
/// (its whole ballast read back every second, exit on the first wrong
/// byte) moves there and back with its connections; the images that
/// crossed in the window hold a small part of its memory, the restore
/// copied almost none, and the fill comes after the release.
#[test]
fn post_copy_moves_a_large_process_with_its_memory_intact() {
    let mut lab = MigrationLab::new("postc");
    let mut pid = lab.start_workload(true, 128);
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..2 {
        let (report, _, to) = move_round_with(&lab, round, pid, &["--post-copy"]);
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        assert!(
            report["memory"]
                .as_str()
                .unwrap()
                .ends_with("(--post-copy)"),
            "{report}"
        );
        let sent = report["image_bytes"].as_u64().unwrap();
        assert!(
            sent < (128 << 20) / 4,
            "{sent} bytes of images crossed: {report}"
        );
        let fill = filled_after_the_release(&report, 128);
        eprintln!(
            "round {round}: freeze window {} ms = {}; {sent} bytes of images crossed; memory filled {} ms after the release",
            report["freeze_window_ms"], report["freeze_window_parts"], fill["duration_ms"]
        );
        // Two checks of the ballast after the move.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
    }
}

/// `--post-copy` with `migrate` killed (SIGKILL) while the destination
/// still fetches pages from it: the copy there, released but not filled,
/// can get no more pages, so the agent ends it (its faults wait on our
/// userfaultfd duplicates meanwhile, never reading zeros) rather than let
/// it run with memory missing. No copy runs anywhere, and the complete
/// dump stays on the source, for `migrator recover`.
#[test]
fn post_copy_whose_source_dies_mid_fill_never_runs_a_copy_with_missing_pages() {
    let mut lab = MigrationLab::new("postk");
    let pid = lab.start_workload(true, 256);
    std::thread::sleep(Duration::from_millis(1500));
    let hosts = [lab.netns_inode(SRC), lab.netns_inode(DST)];
    let dst = [lab.netns_inode(DST)];
    let killed = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            // Released there (running), and still filling: migrate lives.
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                if migrator_tests::faults::live_copies(&dst) == 1 {
                    for pid in lab::processes_in(&lab.lab.netns_path(SRC)) {
                        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                            .unwrap_or_default();
                        if cmdline.contains("migrate\0") && cmdline.contains("--post-copy") {
                            // SAFETY: kill has no memory preconditions.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                            return true;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        });
        let run = lab.migrate(SRC, DST, pid, &["--post-copy"]);
        assert!(run.report.is_none(), "migrate finished: {:?}", run.report);
        killer.join().unwrap()
    });
    assert!(killed, "the destination's copy never ran");
    // The agent sees the channel close and ends its copy.
    let started = std::time::Instant::now();
    while !migrator_tests::migration::workload_statuses(&hosts).is_empty()
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        migrator_tests::migration::workload_statuses(&hosts).is_empty(),
        "a copy is left"
    );
    // The dump, complete, is still here.
    let kept: Vec<_> = walk(&lab.dir.0.join("images"))
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert!(kept.iter().any(|n| n == "stats-dump"), "{kept:?}");
    assert!(kept.iter().any(|n| n.starts_with("pages-")), "{kept:?}");
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|entry| {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path())
            } else {
                vec![entry.path()]
            }
        })
        .collect()
}

/// A lazy restore whose `criu lazy-pages` dies at the release, the
/// memory not yet filled (`MIGRATOR_FAULTS=lazy-pages-dies-at-release` on
/// the agent: a real SIGKILL once the commit came, the daemon stopped
/// since the restore when it fills from local images): it can never be
/// completed, so the destination kills the
/// process (its faults wait on our userfaultfd duplicates meanwhile,
/// never reading zeros), and the source reports it lost: outcome failed,
/// exit 5, not in doubt, no copy running on either host. The same with
/// `--post-copy`, whose dump here is then only the process at the
/// freeze, and the error says so.
#[test]
fn lazy_restore_whose_memory_filler_dies_is_reported_lost() {
    for mode in ["--lazy-restore", "--post-copy"] {
        let mut lab = MigrationLab::new("lazyd");
        lab.stop_agent(DST);
        lab.start_agent_injecting(DST, &[], Some("lazy-pages-dies-at-release"));
        let pid = lab.start_workload(true, 64);
        std::thread::sleep(Duration::from_millis(800));
        let run = lab.migrate(SRC, DST, pid, &[mode]);
        assert_eq!(run.code, Some(5), "{mode}: lost exits 5: {}", run.stderr);
        let report = run.report.unwrap();
        assert_eq!(report["outcome"], "failed", "{mode}: {report}");
        let error = report["error"].as_str().unwrap();
        assert!(error.contains("lazy-pages"), "{mode}: {error}");
        assert!(error.contains("the process is lost"), "{mode}: {error}");
        if mode == "--post-copy" {
            let kept = report["images_kept"].as_str().unwrap();
            assert!(
                error.contains("as it was at the freeze")
                    && error.contains(&format!("migrator recover --images {kept}")),
                "{error}"
            );
        }
        let hosts = [lab.netns_inode(SRC), lab.netns_inode(DST)];
        assert_eq!(migrator_tests::faults::live_copies(&hosts), 0, "{report}");
        assert!(
            migrator_tests::migration::workload_statuses(&hosts).is_empty(),
            "{mode}: a copy is left: {report}"
        );
    }
}

/// A lazy restore whose `criu lazy-pages` dies before the destination
/// says it is ready (`MIGRATOR_FAULTS=lazy-pages-dies` on the agent, a
/// real SIGKILL right after the restore): the agent sees it gone and
/// gives up, so the source, which has not committed, resumes its own
/// copy: rolled back, the connections intact, nothing left there. With
/// `--lazy-restore` (the memory streamed there) and `--post-copy`.
#[test]
fn a_memory_filler_dead_before_the_release_rolls_back() {
    let mut lab = MigrationLab::new("lazye");
    let mut pid = lab.start_workload(true, 64);
    std::thread::sleep(Duration::from_millis(1200));
    for mode in ["--lazy-restore", "--post-copy"] {
        lab.stop_agent(DST);
        lab.start_agent_injecting(DST, &[], Some("lazy-pages-dies"));
        std::thread::sleep(Duration::from_millis(300));
        let run = lab.migrate(SRC, DST, pid, &[mode]);
        assert_eq!(outcome(&run), "rolled-back", "{mode}: {}", run.stderr);
        let report = run.report.unwrap();
        let error = report["error"].as_str().unwrap();
        assert!(
            error.contains("lazy-pages daemon exited") && error.contains("before the release"),
            "{mode}: {error}"
        );
        assert_eq!(
            migrator_tests::faults::live_copies(&[lab.netns_inode(SRC)]),
            1,
            "{mode}: {report}"
        );
        assert!(
            migrator_tests::migration::workload_statuses(&[lab.netns_inode(DST)]).is_empty(),
            "{mode}: a copy is left there"
        );
        assert!(!lab.has_address(DST, SERVICE_V4), "{mode}");
        assert!(!lab.pins_left(DST), "{mode}");
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
        // Restored from the images here (post-copy) or resumed.
        if let Some(restored) = report["restored_here_pid"].as_i64() {
            pid = restored as i32;
        }
    }
}

/// `--dump-then-send`: CRIU dumps every image here (and kills the tree),
/// then the images cross; the process moves there and back with its
/// memory (checked by the workload) and its connections.
#[test]
fn dump_then_send_moves_the_process_with_its_memory() {
    let mut lab = MigrationLab::new("dts");
    let mut pid = lab.start_workload(true, 64);
    std::thread::sleep(Duration::from_millis(1200));
    for (from, to) in [(SRC, DST), (DST, SRC)] {
        let run = lab.migrate(from, to, pid, &["--dump-then-send"]);
        assert!(run.success, "{}", run.stderr);
        let report = run.report.unwrap();
        assert_eq!(
            report["memory"], "dumped here, then sent (--dump-then-send)",
            "{report}"
        );
        assert!(report["image_bytes"].as_u64().unwrap() > 64 << 20);
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
    }
}

/// CRIU's dump fails once (injected at its post-dump notification, every
/// page already at the destination, or at its pre-dump one, before the
/// tree is frozen): the migration dumps again, still frozen, the
/// destination starting its page images over, and the process moves with
/// its memory (checked by the workload) and its connections; the same
/// when the images are dumped here first. Either way the second dump
/// ends with the lock in its second step (the source's own segments
/// blocked too) once CRIU froze the tree again.
#[test]
fn a_dump_that_fails_once_is_run_again_and_the_process_moves() {
    let mut lab = MigrationLab::new("redump");
    let mut pid = lab.start_workload(true, 64);
    std::thread::sleep(Duration::from_millis(1200));
    for (from, to, fault, extra) in [
        (SRC, DST, "dump-fails", &[][..]),
        (DST, SRC, "dump-fails", &["--dump-then-send"][..]),
        (SRC, DST, "dump-fails-unfrozen", &[][..]),
    ] {
        let run = lab.migrate_with_faults(from, to, pid, fault, extra);
        assert!(run.success, "{fault} {extra:?}: {}", run.stderr);
        let report = run.report.unwrap();
        assert_eq!(report["outcome"], "migrated", "{report}");
        let retried = report["dump_retried"].as_str().unwrap_or_default();
        assert!(retried.contains("injected fault"), "{report}");
        // The pages of the second dump only.
        let bytes = report["image_bytes"].as_u64().unwrap();
        assert!(bytes > 64 << 20 && bytes < 2 * (64 << 20), "{report}");
        // The second step, after the freeze and within the dump.
        let phase = |name: &str| {
            phase(&report, "source", name).unwrap_or_else(|| panic!("no {name} phase: {report}"))
        };
        let (freeze, dump) = (phase("freeze"), phase("dump"));
        let blocked = report["own_segments_blocked_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("{fault}: own segments never blocked: {report}"));
        assert!(
            blocked > freeze["start_ms"].as_f64().unwrap() && blocked < end_ms(dump),
            "{fault}: blocked at {blocked} ms: {report}"
        );
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
    }
}

/// A server moves while new clients keep arriving (one every 20 ms from
/// the peer, IPv4 and IPv6 in turn, to its listening sockets on the
/// service addresses). With --hold a client whose SYN came during the
/// freeze gets in right after the release (the SYN held and delivered to
/// the restored listener), not at its SYN retransmit a second later.
/// There and back: every client connects, none waits longer than the
/// freeze window + 50 ms, and every connection echoes afterwards.
#[test]
fn new_clients_during_the_freeze_get_in_right_after_the_release_with_hold() {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Instant,
    };
    let mut lab = MigrationLab::new("syn");
    let mut pid = lab.start(Workload {
        own_pid_namespace: true,
        listen: true,
        ..Workload::default()
    });
    std::thread::sleep(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    let targets = vec![
        format!("{SERVICE_V4}:{SERVICE_PORT}").parse().unwrap(),
        format!("[{SERVICE_V6}]:{SERVICE_PORT}").parse().unwrap(),
    ];
    let clients = arrivals(
        &lab.lab.netns_path(PEER),
        targets,
        Duration::from_millis(20),
        stop.clone(),
        |to: SocketAddr| {
            let started = Instant::now();
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map(|stream| (to, started.elapsed(), stream))
                .map_err(|e| format!("{to}: {e}"))
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut windows = Vec::new();
    for (from, to) in [(SRC, DST), (DST, SRC)] {
        let run = lab.migrate(from, to, pid, &["--hold"]);
        assert!(run.success, "{from} -> {to}: {}", run.stderr);
        let report = run.report.unwrap();
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        windows.push(report["freeze_window_ms"].as_f64().unwrap());
        assert!(
            report["new_connections_held"].as_u64().unwrap() > 0,
            "no client arrived during a {} ms freeze: {report}",
            report["freeze_window_ms"]
        );
        std::thread::sleep(Duration::from_millis(600));
    }
    stop.store(true, Ordering::Relaxed);
    let attempts = clients.join().unwrap();
    let failed: Vec<&String> = attempts.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "clients that never got in: {failed:?}");
    let longest = windows.iter().copied().fold(0.0, f64::max);
    let slowest = attempts
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .map(|(_, waited, _)| waited.as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    eprintln!(
        "{} clients, slowest connect {slowest:.1} ms, windows {windows:.1?} ms",
        attempts.len()
    );
    assert!(
        slowest <= longest + 50.0,
        "a client waited {slowest:.1} ms for a {longest:.1} ms freeze"
    );
    // Every connection made along the way is served by the process now.
    for (to, _, stream) in attempts.into_iter().filter_map(Result::ok) {
        let mut stream = stream;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream.write_all(b"?").unwrap();
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("a connection to {to} no longer echoes: {e}"));
        assert_eq!(&byte, b"?");
    }
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

/// A client that leaves while the migration prepares: its connection was
/// the tree's when the migration began, but the process closed it before
/// CRIU dumped the tree. The destination checks what was dumped, not what
/// was there at the start, so the move goes on.
#[test]
fn a_connection_closed_before_the_freeze_does_not_hold_up_the_move() {
    use std::net::{SocketAddr, TcpStream};
    let mut lab = MigrationLab::new("gone");
    let pid = lab.start(Workload {
        own_pid_namespace: true,
        listen: true,
        ..Workload::default()
    });
    std::thread::sleep(Duration::from_millis(500));
    let to: SocketAddr = format!("{SERVICE_V4}:{SERVICE_PORT}").parse().unwrap();
    let client = migrator_tests::wire::in_netns(&lab.lab.netns_path(PEER), move || {
        TcpStream::connect(to).unwrap()
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let root = migrator_tests::lab::pin_root_of(&lab.lab.netns_path(SRC)).unwrap();
    // Hung up once the tree's connections are listed (the preflight runs).
    let leaver = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if migrator::watch::current_phase(&root).as_deref() == Some("preflight") {
                drop(client);
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    });
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(leaver.join().unwrap(), "the preflight never began");
    assert!(run.success, "{}", run.stderr);
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

/// A counter of `/proc/net/netstat` (`TcpExt` row) in `host`'s namespace.
fn tcp_ext(lab: &MigrationLab, host: &str, name: &str) -> u64 {
    let out = lab.output(host, "cat", &["/proc/net/netstat"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (rows[0], rows[1]);
    let at = names.split_whitespace().position(|n| n == name).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// With --hold the peers' packets that arrive during the freeze are kept
/// and handed to the restored sockets after the release (both families),
/// and none of them is dropped there as old (PAWS: a live segment that
/// got in first must not make the held ones look stale).
#[test]
fn hold_delivers_the_peers_packets_to_the_restored_sockets() {
    let mut lab = MigrationLab::new("hold");
    let pid = lab.start_workload(true, 0);
    std::thread::sleep(Duration::from_millis(300));
    let paws_before = tcp_ext(&lab, DST, "PAWSEstab");
    let run = lab.migrate(SRC, DST, pid, &["--hold"]);
    assert!(run.success, "{}", run.stderr);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tcp_ext(&lab, DST, "PAWSEstab"),
        paws_before,
        "segments dropped as old by the restored sockets"
    );
    let report = run.report.unwrap();
    let connections = report["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 3);
    for conn in connections {
        // The peer pushes every 10 ms; the freeze lasts tens of ms at least.
        assert!(
            conn["held_delivered"].as_u64().unwrap() > 0,
            "nothing delivered for {conn}"
        );
    }
    assert!(
        report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "deliver-held" && p["host"] == "destination"),
        "{report}"
    );
    // The timeline: packets held on the source, delivered on the
    // destination, every delivery after every hold.
    let events = report["events"].as_array().unwrap();
    let at = |host: &str, kind: &str| -> Vec<f64> {
        events
            .iter()
            .filter(|e| e["host"] == host && e["kind"] == kind)
            .map(|e| e["at_ms"].as_f64().unwrap())
            .collect()
    };
    let (held, delivered) = (at("source", "hold"), at("destination", "held-delivered"));
    assert!(!held.is_empty() && !delivered.is_empty(), "{events:?}");
    let last_hold = held.iter().copied().fold(f64::MIN, f64::max);
    assert!(
        delivered.iter().all(|d| *d >= last_hold),
        "a delivery before a hold: {events:?}"
    );
    assert!(!lab.pins_left(SRC) && !lab.pins_left(DST));
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

#[test]
fn wrong_token_is_refused_before_anything_is_frozen() {
    let mut lab = MigrationLab::new("tok");
    let pid = lab.start_workload(true, 0);
    let wrong = lab.dir.0.join("wrong-token");
    migrator_tests::lab::write_token(&wrong).unwrap();
    let good = lab.token.clone();
    lab.token = wrong;
    let run = lab.migrate(SRC, DST, pid, &[]);
    lab.token = good;
    assert_eq!(outcome(&run), "refused");
    assert_eq!(run.code, Some(3), "refused before the freeze exits 3");
    assert!(run.stderr.contains("token"), "{}", run.stderr);
    let report = run.report.unwrap();
    assert_eq!(report["error_code"], "refused:preflight", "{report}");
    assert!(
        report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "freeze"),
        "froze before authenticating: {report}"
    );
    assert!(!lab.pins_left(SRC) && !lab.pins_left(DST));
    assert!(lab.has_address(SRC, SERVICE_V4));
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
    // The agent shrugged it off and serves the next, honest source.
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(run.success, "{}", run.stderr);
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

#[test]
fn service_address_already_on_the_destination_is_refused_before_freezing() {
    let mut lab = MigrationLab::new("ipx");
    let pid = lab.start_workload(true, 0);
    let out = lab.output(
        DST,
        "ip",
        &["addr", "add", &format!("{SERVICE_V4}/32"), "dev", "eth0"],
    );
    assert!(out.status.success());
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert_eq!(outcome(&run), "refused");
    assert_eq!(run.code, Some(3), "refused before the freeze exits 3");
    assert!(
        run.stderr.contains("already assigned on the destination"),
        "{}",
        run.stderr
    );
    assert!(!lab.pins_left(SRC) && !lab.pins_left(DST), "pins left");
    assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(SRC)));
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

/// A plain process (no PID namespace of its own, its PIDs shared with
/// the agents on this one machine): the agent waits until the dumped
/// tree's PIDs are free (its parent reaps it at once) and restores it with
/// the same PID, ten times back and forth.
#[test]
fn plain_process_moves_ten_times_between_namespaces_of_one_machine() {
    let mut lab = MigrationLab::new("plain");
    let pid = lab.start_workload(false, 0);
    std::thread::sleep(Duration::from_millis(300));
    let tuples = four_tuples(&lab);
    let mut waits = Vec::new();
    for round in 0..10 {
        let (report, from, to) = move_round(&lab, round, pid);
        // CRIU restores a plain process with its own PID.
        assert_eq!(report["destination_pid"].as_i64(), Some(i64::from(pid)));
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        let wait = report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "pid-wait")
            .unwrap_or_else(|| panic!("no pid-wait phase: {report}"))
            .clone();
        assert_eq!(wait["ok"], true);
        waits.push(wait["duration_ms"].as_f64().unwrap());
        assert_eq!(four_tuples(&lab), tuples);
        assert!(!lab.pins_left(from) && !lab.pins_left(to), "pins left");
        assert_streams_intact_and_flowing(&lab, Duration::from_millis(200));
    }
    eprintln!("pid-wait per move (ms): {waits:.2?}");
}

/// The dumped process's PID stays taken (its parent never reaps it): the
/// agent gives up after its bounded wait with an error that names the
/// zombie and its parent; the source cannot restore under that PID either,
/// so it keeps the lock and says how to recover, and `recover` works once
/// the PID is free. Nothing hangs.
#[test]
fn pid_that_stays_taken_fails_clearly_and_recover_restores() {
    let mut lab = MigrationLab::new("ztk");
    let pid = lab.start_workload_reaped(false, 0, false);
    let started = std::time::Instant::now();
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(outcome(&run), "failed");
    assert_eq!(run.code, Some(5), "a failed rollback exits 5");
    let report = run.report.unwrap();
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("pid-wait"), "{error}");
    assert!(error.contains("a zombie nobody reaped yet"), "{error}");
    assert!(error.contains("ROLLBACK FAILED"), "{error}");
    assert!(error.contains("migrator recover --images"), "{error}");
    // The destination undid its side.
    assert!(!lab.pins_left(DST) && !lab.has_address(DST, SERVICE_V4));
    // Reap the zombie (what the missing parent should have done), then
    // recover from the images the error names, before the lock's deadline.
    lab.reap(pid);
    lab.recover_as_told(SRC, error);
    assert!(!lab.pins_left(SRC));
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(500));
}

#[test]
fn agent_killed_mid_page_stream_rolls_back_with_connections_alive() {
    let mut lab = MigrationLab::new("kill");
    // Enough memory that the page stream takes a while.
    let pid = lab.start_workload(true, 400);
    let incoming = lab.dir.0.join("agent-dst");
    let agent_dst = lab.lab.netns_path(DST);
    let killer = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if bytes_in(&incoming) > 32 << 20 {
                // SIGKILL every agent in dst's namespace: mid-dump, while
                // the pages stream.
                kill_agents_in(&agent_dst);
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    });
    let run = lab.migrate(SRC, DST, pid, &[]);
    eprintln!("{}", run.stderr);
    assert!(
        killer.join().unwrap(),
        "the page stream finished before the kill"
    );
    assert!(!run.success);
    assert_eq!(outcome(&run), "rolled-back", "{}", run.stderr);
    assert_eq!(run.code, Some(4), "rolled back exits 4");
    let report = run.report.unwrap();
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("streaming pages to the agent"),
        "{report}"
    );
    assert_eq!(report["failed_phase"], "dump", "{report}");
    assert_eq!(report["error_code"], "rolled-back:dump", "{report}");
    // Back on the source: resumed by CRIU, addresses back, lock gone.
    let connections = lab.peer_connections();
    assert_eq!(connections.len(), 3);
    assert!(lab.has_address(SRC, SERVICE_V4) && lab.has_address(SRC, SERVICE_V6));
    assert!(!lab.pins_left(SRC), "the source's lock was left behind");
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(500));
}

/// Bytes written so far into the agent's session directories under its
/// state directory (0 if none).
fn bytes_in(state: &std::path::Path) -> u64 {
    let files_in = |dir: std::path::PathBuf| -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    // The agent's session directories: `incoming-<random>`.
    std::fs::read_dir(state)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("incoming-"))
                .map(|e| files_in(e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn kill_agents_in(netns: &std::path::Path) {
    for pid in migrator_tests::lab::processes_in(netns) {
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.contains("agent") {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn bad_input_is_refused_with_nothing_frozen() {
    let mut lab = MigrationLab::new("bad");
    let pid = lab.start_workload(true, 0);
    let migrator = migrator_tests::migrator_bin();
    let token = lab.token.to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let mut full = vec!["migrate", "--to", "198.18.0.3:7070", "--token-file", &token];
        full.extend_from_slice(args);
        lab.output(SRC, migrator.to_str().unwrap(), &full)
    };
    let pid_text = pid.to_string();
    // A process with no sockets at all.
    let mut idle = Command::new("sleep").arg("60").spawn().unwrap();
    let idle_pid = idle.id().to_string();
    let checks: [(&[&str], &str); 4] = [
        (
            &["--pid", "999999999", "--ip", SERVICE_V4],
            "process 999999999 does not exist",
        ),
        (
            &[
                "--pid",
                &pid_text,
                "--ip",
                SERVICE_V4,
                "--ip",
                SERVICE_V6,
                "--ip",
                "198.18.0.77",
            ],
            "service address 198.18.0.77 is not used by any socket",
        ),
        (
            &["--pid", &pid_text, "--ip", SERVICE_V4],
            "which is not a service address given with --ip",
        ),
        (
            &["--pid", &idle_pid, "--ip", SERVICE_V4],
            "has no TCP connections",
        ),
    ];
    for (args, expected) in checks {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!lab.pins_left(SRC), "{args:?} left a lock");
    }
    let _ = idle.kill();
    let _ = idle.wait();
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

/// `migrator migrate` killed mid-dump, while the pages stream: CRIU sees
/// its client gone and resumes the tree here (same PID, same sockets),
/// the lock holds the peers off, and `migrator recover` lifts it at once
/// instead of at its deadline.
#[test]
fn recover_lifts_the_lock_after_migrate_is_killed_mid_dump() {
    let mut lab = MigrationLab::new("rec");
    let pid = lab.start_workload(true, 400);
    let images_root = lab.dir.0.join("images");
    let incoming = lab.dir.0.join("agent-dst");
    let migrator = migrator_tests::migrator_bin();
    let mut migrate = Command::new("nsenter")
        .arg(format!("--net={}", lab.lab.netns_path(SRC).display()))
        .arg(&migrator)
        .args([
            "migrate",
            "--pid",
            &pid.to_string(),
            "--to",
            "198.18.0.3:7070",
        ])
        .args(["--token-file", lab.token.to_str().unwrap()])
        .args(["--ip", SERVICE_V4, "--ip", SERVICE_V6])
        .args(["--work-dir", images_root.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(30) {
        if bytes_in(&incoming) > 32 << 20 {
            migrate.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = migrate.wait();
    assert!(killed, "the page stream finished before the kill");
    // The connections are held off by the lock, not reset; the process
    // runs here again, where it was.
    std::thread::sleep(Duration::from_millis(300));
    for conn in lab.peer_connections() {
        assert_eq!(conn["error"], Value::Null, "{conn}");
    }
    assert_eq!(
        MigrationLab::netns_of(pid),
        Some(lab.netns_inode(SRC)),
        "the process does not run on the source after the killed dump"
    );
    assert!(lab.pins_left(SRC), "the lock should hold until recover");
    let images = std::fs::read_dir(&images_root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let out = lab.output(
        SRC,
        migrator.to_str().unwrap(),
        &[
            "recover",
            "--images",
            images.to_str().unwrap(),
            "--ip",
            SERVICE_V4,
            "--ip",
            SERVICE_V6,
            "--iface",
            "eth0",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("CRIU resumed the process"), "{stderr}");
    assert!(!lab.pins_left(SRC), "recover left the lock");
    // The agent noticed the source vanish and undid its side.
    assert!(!lab.pins_left(DST) && !lab.has_address(DST, SERVICE_V4));
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(1500));
}

/// nftables rules for the peer: it ignores ARP and neighbour
/// solicitations (as a misconfigured firewall might), so a new owner of the
/// service address cannot confirm it.
const DEAF_TO_NEIGHBOUR_PROBES: &str = concat!(
    "table arp deaf {\n",
    "  chain input {\n",
    "    type filter hook input priority 0; policy drop;\n",
    "  }\n",
    "}\n",
    "table ip6 deaf {\n",
    "  chain input {\n",
    "    type filter hook input priority 0;\n",
    "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } drop\n",
    "  }\n",
    "}\n",
);

/// The peer ignores the new owner (it drops ARP and neighbour
/// solicitations, as a misconfigured firewall might): its answers to the
/// destination's echo still go to the source, so the destination cannot
/// prove it owns the address, the migration rolls back and the process
/// carries on at the source.
#[test]
fn unconfirmed_address_rolls_back_with_connections_alive() {
    let mut lab = MigrationLab::new("ncf");
    let pid = lab.start_workload(true, 0);
    lab.nft(migrator_tests::lab::PEER, DEAF_TO_NEIGHBOUR_PROBES);
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(!run.success);
    assert_eq!(outcome(&run), "rolled-back", "{}", run.stderr);
    assert_eq!(run.code, Some(4), "rolled back exits 4");
    let report = run.report.unwrap();
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("answered the source's echo before the move but not this host's"),
        "{report}"
    );
    assert_eq!(report["failed_phase"], "route-convergence", "{report}");
    assert_eq!(
        report["error_code"], "rolled-back:route-convergence",
        "{report}"
    );
    assert!(lab.has_address(SRC, SERVICE_V4) && lab.has_address(SRC, SERVICE_V6));
    assert!(!lab.has_address(DST, SERVICE_V4) && !lab.has_address(DST, SERVICE_V6));
    assert!(!lab.pins_left(SRC) && !lab.pins_left(DST));
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

/// A plain process tree (a parent and a child, PIDs shared with both
/// agents on this machine) whose destination fails after its restore: the
/// peer's answers do not reach the new owner, so the agent kills the copy
/// it restored. That copy holds the tree's PIDs until it is reaped; the
/// source's rollback must wait for them and then restore the tree under
/// the same PIDs, connections alive.
#[test]
fn rollback_after_the_destination_restored_waits_for_its_pids() {
    let mut lab = MigrationLab::new("rbw");
    let pid = lab.start_workload_tree(100, 1);
    let tree = |pid: i32| {
        let mut tree = migrator::system::process_tree(pid);
        tree.sort_unstable();
        tree
    };
    let before = tree(pid);
    assert_eq!(before.len(), 2, "workload and its child: {before:?}");
    lab.nft(migrator_tests::lab::PEER, DEAF_TO_NEIGHBOUR_PROBES);
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(!run.success);
    assert_eq!(outcome(&run), "rolled-back", "{}", run.stderr);
    assert_eq!(run.code, Some(4), "rolled back exits 4");
    let report = run.report.unwrap();
    // The agent proves its ownership after its restore: it had restored
    // the tree.
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("destination route-convergence"), "{report}");
    let waited = phase(&report, "source", "pid-wait")
        .unwrap_or_else(|| panic!("the rollback did not wait for the PIDs: {report}"));
    assert_eq!(waited["ok"], true, "{report}");
    assert_eq!(report["restored_here_pid"].as_i64(), Some(i64::from(pid)));
    assert_eq!(tree(pid), before, "not the same PIDs after the rollback");
    for pid in &before {
        assert_eq!(MigrationLab::netns_of(*pid), Some(lab.netns_inode(SRC)));
    }
    assert!(lab.has_address(SRC, SERVICE_V4) && lab.has_address(SRC, SERVICE_V6));
    assert!(!lab.pins_left(SRC) && !lab.pins_left(DST));
    lab.nft(
        migrator_tests::lab::PEER,
        "delete table arp deaf\ndelete table ip6 deaf\n",
    );
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(300));
}

/// Trees CRIU would refuse are refused at preflight, with what to change,
/// before anything is frozen (CRIU has no dry run of a dump): a process
/// started as from a shell (no session of its own), one whose output file
/// another process also writes, and one under another uid when this host
/// lacks CAP_SYS_RESOURCE (ours does; where it does not, that tree moves).
#[test]
fn trees_criu_would_refuse_are_refused_before_anything_is_frozen() {
    use migrator_tests::migration::Workload;
    let has_sys_resource = migrator_tests::has_sys_resource();
    let scratch = migrator_tests::TempDir::new("refusals");
    let log = scratch.0.join("shared.log");
    // Another process with the log open for writing, as a logger would.
    let _writer = migrator_tests::KillOnDrop(
        Command::new("sleep")
            .arg("120")
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap(),
    );
    let cases: [(&str, Workload, Option<&str>); 3] = [
        (
            "shell",
            Workload {
                no_setsid: true,
                ..Workload::default()
            },
            Some("does not lead its own session"),
        ),
        (
            "log",
            Workload {
                stdout: Some(log.clone()),
                ..Workload::default()
            },
            Some("outside the tree has it open for writing"),
        ),
        (
            "uid",
            Workload {
                uid: Some(65_534),
                ..Workload::default()
            },
            (!has_sys_resource).then_some("lacks CAP_SYS_RESOURCE"),
        ),
    ];
    for (tag, workload, refusal) in cases {
        let mut lab = MigrationLab::new(&format!("ref{tag}"));
        let pid = lab.start(workload);
        let run = lab.migrate(SRC, DST, pid, &[]);
        match refusal {
            Some(expected) => {
                assert!(!run.success, "{tag}: migrated");
                assert!(
                    run.stderr.contains(expected) && run.stderr.contains("nothing was frozen"),
                    "{tag}: {}",
                    run.stderr
                );
                let report = run.report.unwrap();
                let frozen = report["phases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == "freeze" || p["name"] == "dump");
                assert!(!frozen, "{tag}: froze or dumped: {report}");
                assert!(
                    !lab.pins_left(SRC) && !lab.pins_left(DST),
                    "{tag}: pins left"
                );
                assert_streams_intact_and_flowing(&lab, Duration::from_millis(200));
            }
            None => assert!(run.success, "{tag}: {}", run.stderr),
        }
    }
}

/// The destination gives one migration's images at most 16 MiB of
/// memory (their tmpfs) and the process has 64 MiB: refused at
/// preflight, with how much is needed and how much is free, before
/// anything is frozen.
#[test]
fn a_destination_without_room_for_the_images_is_refused_before_the_freeze() {
    let mut lab = MigrationLab::new("room");
    let pid = lab.start_workload(true, 64);
    // The agent's images live on a tmpfs of their own, at most 16 MiB.
    lab.stop_agent(DST);
    lab.start_agent_with(DST, &["--max-image-memory", "16"]);
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert!(!run.success);
    assert!(
        run.stderr
            .contains("no room for the images on the destination")
            && run.stderr.contains("MiB free"),
        "{}",
        run.stderr
    );
    assert!(
        !lab.pins_left(SRC) && !lab.pins_left(DST),
        "something was locked"
    );
    assert_streams_intact_and_flowing(&lab, Duration::from_millis(200));
}
