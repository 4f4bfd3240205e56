//! `cargo xtask bench migrate`: our migration against the one a user does
//! by hand with CRIU's command line, in the same lab, with the same
//! workload, alternating in one run. Figures, not a test.
//!
//! Baseline: `criu dump --tcp-established --network-lock nftables`, move
//! the addresses with `ip addr`, `criu restore --tcp-established`, the
//! images in one directory on a tmpfs (ours are on tmpfs too). Its
//! freeze window runs from the start of the dump to the end of the
//! restore (CRIU locks the network inside its dump; the restore unlocks).
//!
//! For each: freeze window, the stall the peer sees (its longest gap in
//! the echoed stream around the move) and the peer's retransmissions
//! (RetransSegs of the peer's namespace). Our freeze windows are read
//! from our reports the way `migrator report DIR` reads them.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use migrator::report::summary::{self, Summary};
use migrator_tests::{
    lab::{self, DST, PEER, SRC},
    migration::MigrationLab,
};

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

/// The peer namespace's TCP RetransSegs.
fn peer_retransmits(lab: &MigrationLab) -> u64 {
    let out = lab.output(PEER, "cat", &["/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Give up waiting for a stalled stream after this long (the stall is
/// then reported as at least this).
const STALL_CAP_MS: f64 = 10_000.0;

/// Longest stall of the workload's connections from `from` (unix ms) on,
/// measured once the streams flow again (every connection echoed within
/// the last 200 ms, and at least 1.5 s after the move). A stall still
/// going on when the wait gives up counts with its length so far.
fn stall(lab: &MigrationLab, from: f64) -> f64 {
    let waited = Instant::now();
    let mut ongoing = 0.0f64;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = unix_ms();
        let silent = lab
            .current_connections()
            .iter()
            .map(|c| now - c["last_echo_unix_ms"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max);
        if silent < 200.0 && waited.elapsed().as_secs_f64() >= 1.5 {
            break;
        }
        if waited.elapsed().as_secs_f64() * 1e3 >= STALL_CAP_MS {
            ongoing = silent;
            break;
        }
    }
    lab.current_connections()
        .iter()
        .flat_map(|c| c["stalls"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| Some((s[0].as_f64()?, s[1].as_f64()?)))
        .filter(|(start, _)| *start >= from - 50.0)
        .map(|(_, length)| length)
        .fold(ongoing, f64::max)
}

fn debug(what: &str, sample: &Sample, lab: &MigrationLab, from: f64) {
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let near: Vec<Vec<(f64, f64)>> = lab
            .current_connections()
            .iter()
            .map(|c| {
                c["stalls"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|s| Some((s[0].as_f64()? - from, s[1].as_f64()?)))
                    .filter(|(start, _)| *start > -3000.0)
                    .collect()
            })
            .collect();
        eprintln!(
            "{what}: window {:.1} stall {:.1} rexmit {} stalls rel. to start {near:.0?}",
            sample.window, sample.stall, sample.retransmits
        );
    }
}

/// With `BENCH_KEEP_REPORTS=DIR`, our reports so far are copied there
/// (the lab's own directory goes with the lab), to draw them afterwards
/// with `migrator report FILE --svg OUT`.
fn keep_reports(lab: &MigrationLab) {
    let Some(keep) = std::env::var_os("BENCH_KEEP_REPORTS") else {
        return;
    };
    let from = lab.dir.0.join("reports");
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(&from)
        .arg(&keep)
        .status();
    eprintln!(
        "reports copied to {}: {copied:?}",
        Path::new(&keep).display()
    );
}

/// The workload's connections that broke (reset, EOF, wrong byte).
fn broken(lab: &MigrationLab) -> Vec<String> {
    lab.current_connections()
        .iter()
        .filter(|c| !c["error"].is_null())
        .map(|c| format!("{} ({})", c["remote"], c["error"]))
        .collect()
}

/// After a baseline move broke connections: a fresh workload on src, the
/// addresses back there, CRIU's leftover locks gone.
fn restart_workload(lab: &mut MigrationLab, pid: i32) -> i32 {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for host in [SRC, DST] {
        remove_criu_tables(lab, host);
        for ip in [lab::SERVICE_V4, lab::SERVICE_V6] {
            let _ = lab.output(host, "ip", &["addr", "del", ip, "dev", lab::IFACE]);
        }
    }
    lab.lab.add_service_addresses(SRC).unwrap();
    let pid = lab.start_workload(true, 0);
    std::thread::sleep(std::time::Duration::from_secs(1));
    pid
}

fn remove_criu_tables(lab: &MigrationLab, host: &str) {
    let tables = lab.output(host, "nft", &["list", "tables"]);
    for table in String::from_utf8_lossy(&tables.stdout).lines() {
        if let Some(name) = table.strip_prefix("table inet ")
            && name.starts_with("CRIU")
        {
            run_ok(lab, host, "nft", &["delete", "table", "inet", name]);
        }
    }
}

/// One figure of a sample.
type Metric = fn(&Sample) -> f64;

/// The figures every comparison prints, a row each.
const ROWS: [(&str, Metric); 3] = [
    ("freeze window", |s| s.window),
    ("peer-visible stall", |s| s.stall),
    ("peer retransmits", |s| s.retransmits as f64),
];

struct Sample {
    window: f64,
    stall: f64,
    retransmits: u64,
}

/// Our move; its report is kept in `reports` (for `migrator report`).
fn ours(
    lab: &MigrationLab,
    from: &str,
    to: &str,
    pid: i32,
    extra: &[&str],
    reports: &Path,
) -> (Sample, i32) {
    let retransmits = peer_retransmits(lab);
    let start = unix_ms();
    let run = lab.migrate(from, to, pid, extra);
    assert!(run.success, "{}", run.stderr);
    let report = run.report.unwrap();
    std::fs::create_dir_all(reports).unwrap();
    let n = std::fs::read_dir(reports).unwrap().count();
    let file = reports.join(format!("move-{n:03}.json"));
    std::fs::write(&file, report.to_string()).unwrap();
    let sample = Sample {
        window: report["freeze_window_ms"].as_f64().unwrap(),
        stall: stall(lab, start),
        retransmits: peer_retransmits(lab) - retransmits,
    };
    debug(&format!("ours {}", file.display()), &sample, lab, start);
    (sample, report["destination_pid"].as_i64().unwrap() as i32)
}

fn run_ok(lab: &MigrationLab, host: &str, program: &str, args: &[&str]) {
    let out = lab.output(host, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `announce`: the careful user's variant, which also sends a gratuitous
/// ARP (`arping -U`) and, for IPv6, a neighbour solicitation to the peer
/// from the moved address (`ndisc6 -s`) after the restore.
fn baseline(
    lab: &MigrationLab,
    from: &str,
    to: &str,
    pid: i32,
    round: usize,
    announce: bool,
) -> (Sample, i32) {
    let criu = migrator::criu::locate(None).unwrap().path;
    let criu = criu.to_str().unwrap();
    let images = lab
        .dir
        .0
        .join(format!("baseline-{round}-{from}-{announce}"));
    std::fs::create_dir_all(&images).unwrap();
    // In memory, as ours: a disk's writeback would slow both methods'
    // next moves (the lab's TempDir unmounts it at the end).
    run_ok(
        lab,
        from,
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "mode=0700",
            "tmpfs",
            images.to_str().unwrap(),
        ],
    );
    let images = images.to_str().unwrap();
    let pidfile = format!("{images}/restored.pid");
    let pid_text = pid.to_string();
    let dump = [
        "dump",
        "-t",
        &pid_text,
        "-D",
        images,
        "--tcp-established",
        "--network-lock",
        "nftables",
        "-o",
        "dump.log",
    ];
    let (mut retransmits, mut start, mut clock) =
        (peer_retransmits(lab), unix_ms(), Instant::now());
    let out = lab.output(from, criu, &dump);
    if !out.status.success() {
        // CRIU unlocked and resumed the tree; as ours does (and a user
        // would), dump once more. That move's window counts from the
        // second dump: in the baseline's favour.
        let log = std::fs::read_to_string(format!("{images}/dump.log")).unwrap_or_default();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
        eprintln!(
            "CRIU by hand: the dump {from} -> {to} failed, dumping once more: {}",
            errors.join(" | ")
        );
        BASELINE_DUMP_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::rename(format!("{images}/dump.log"), format!("{images}/dump.1.log"));
        for entry in std::fs::read_dir(images).unwrap().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let keep = entry.path().extension().is_some_and(|e| e == "log");
                if !keep {
                    std::fs::remove_file(entry.path()).unwrap();
                }
            }
        }
        (retransmits, start, clock) = (peer_retransmits(lab), unix_ms(), Instant::now());
        run_ok(lab, from, criu, &dump);
    }
    for (ip, prefix) in [(lab::SERVICE_V4, 32), (lab::SERVICE_V6, 128)] {
        run_ok(
            lab,
            from,
            "ip",
            &["addr", "del", &format!("{ip}/{prefix}"), "dev", lab::IFACE],
        );
    }
    lab.lab.add_service_addresses(to).unwrap();
    run_ok(
        lab,
        to,
        criu,
        &[
            "restore",
            "-D",
            images,
            "--tcp-established",
            "-d",
            "--pidfile",
            &pidfile,
            "-o",
            "restore.log",
        ],
    );
    // Sent in the background: arping lingers a second after its probe.
    let announcers: Vec<std::process::Child> = if announce {
        let netns = format!("--net={}", lab.lab.netns_path(to).display());
        let spawn = |args: &[&str]| {
            std::process::Command::new("nsenter")
                .arg(&netns)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        vec![
            spawn(&["arping", "-U", "-c", "1", "-I", lab::IFACE, lab::SERVICE_V4]),
            // Debian's ndisc6 package has no ndsend (unsolicited NA); a
            // solicitation to the peer from the moved address updates the
            // peer's entry just the same.
            spawn(&[
                "ndisc6",
                "-q",
                "-1",
                "-r",
                "1",
                "-w",
                "200",
                "-s",
                lab::SERVICE_V6,
                lab::PEER_V6,
                lab::IFACE,
            ]),
        ]
    } else {
        Vec::new()
    };
    let window = clock.elapsed().as_secs_f64() * 1e3;
    let sample = Sample {
        window,
        stall: stall(lab, start),
        retransmits: peer_retransmits(lab) - retransmits,
    };
    debug(
        if announce { "announce" } else { "baseline" },
        &sample,
        lab,
        start,
    );
    for mut announcer in announcers {
        let _ = announcer.wait();
    }
    if sample.stall >= STALL_CAP_MS {
        // Still stalled: let the peer re-resolve the address now, so the
        // next move starts from flowing streams (not part of the figures).
        run_ok(lab, PEER, "ip", &["neigh", "flush", "dev", lab::IFACE]);
        stall(lab, unix_ms());
    }
    // CRIU leaves its nftables lock on the old host; a user would remove it.
    remove_criu_tables(lab, from);
    let restored = std::fs::read_to_string(&pidfile).unwrap();
    let _ = lab.output(from, "umount", &["-l", images]);
    (sample, restored.trim().parse().unwrap())
}

fn print_baseline_dump_retries() {
    let retries = BASELINE_DUMP_RETRIES.swap(0, std::sync::atomic::Ordering::Relaxed);
    if retries > 0 {
        println!(
            "  CRIU by hand: {retries} dump(s) failed and ran again (their window counts from the second)"
        );
    }
}

/// By-hand dumps that failed once (and passed the second time).
static BASELINE_DUMP_RETRIES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

/// (min, median, max) of figure `f` over `samples`.
fn field(samples: &[Sample], f: Metric) -> (f64, f64, f64) {
    stats(&mut samples.iter().map(f).collect::<Vec<_>>())
}

/// This machine's plain memory-copy bandwidth (MiB/s, best of 5 copies
/// of 256 MiB): the floor of moving memory without pre-copy.
fn memory_copy_mib_per_s() -> f64 {
    let size = 256usize << 20;
    let from: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut to = vec![0u8; size];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        to.copy_from_slice(std::hint::black_box(&from));
        std::hint::black_box(&to);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (size >> 20) as f64 / best
}

/// A fresh workload with `ballast_mb` MiB on src, the old one gone.
fn fresh_workload(lab: &mut MigrationLab, pid: i32, ballast_mb: u32) -> i32 {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for host in [SRC, DST] {
        for ip in [lab::SERVICE_V4, lab::SERVICE_V6] {
            let _ = lab.output(host, "ip", &["addr", "del", ip, "dev", lab::IFACE]);
        }
    }
    lab.lab.add_service_addresses(SRC).unwrap();
    let pid = lab.start_workload(true, ballast_mb);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    pid
}

/// Freeze windows of a process with `ballast_mb` MiB of memory, ours
/// against CRIU's CLI by hand, alternating, each there and back.
/// Our freeze windows as `migrator report DIR` sums them up: (min, p50,
/// max), and the summary itself.
fn our_windows(reports: &Path) -> ((f64, f64, f64), Summary) {
    let loaded = summary::load(&[reports.to_owned()]).expect("our reports");
    let summary = summary::summarise(&loaded.reports);
    let w = summary.freeze_window_ms.clone().expect("frozen moves");
    ((w.min, w.p50, w.max), summary)
}

/// The duration of phase `name` in each report of `dir` that has it.
fn phase_durations(dir: &Path, name: &str) -> Vec<f64> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .filter_map(|report| {
            report["phases"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == name)?["duration_ms"]
                .as_f64()
        })
        .collect()
}

fn memory_section(lab: &mut MigrationLab, mut pid: i32, ballast_mb: u32, rounds: usize) -> i32 {
    let started = cpu_ticks();
    pid = fresh_workload(lab, pid, ballast_mb);
    let streamed = lab.dir.0.join(format!("reports/{ballast_mb}-streamed"));
    let after_dump = lab
        .dir
        .0
        .join(format!("reports/{ballast_mb}-dump-then-send"));
    let lazy = lab.dir.0.join(format!("reports/{ballast_mb}-lazy-restore"));
    let post = lab.dir.0.join(format!("reports/{ballast_mb}-post-copy"));
    let mut by_hand = Vec::new();
    let methods = [
        ("ours, streamed", &streamed, &[][..]),
        ("ours, --lazy-restore", &lazy, &["--lazy-restore"][..]),
        ("ours, --post-copy", &post, &["--post-copy"][..]),
        (
            "ours, --dump-then-send",
            &after_dump,
            &["--dump-then-send"][..],
        ),
    ];
    // What the peer saw of each of our moves, by method.
    let mut seen: [Vec<Sample>; 4] = Default::default();
    for round in 0..rounds {
        for ((_, reports, extra), seen) in methods.iter().zip(seen.iter_mut()) {
            for (from, to) in [(SRC, DST), (DST, SRC)] {
                let (sample, next) = ours(lab, from, to, pid, extra, reports);
                seen.push(sample);
                pid = next;
            }
        }
        for (from, to) in [(SRC, DST), (DST, SRC)] {
            // Each move its own images directory.
            let tag = 1000 * (ballast_mb as usize + 1) + 10 * round;
            let (sample, next) = baseline(lab, from, to, pid, tag, false);
            pid = next;
            by_hand.push(sample.window);
        }
        let broken = broken(lab);
        assert!(broken.is_empty(), "{ballast_mb} MiB moves broke {broken:?}");
    }
    let hand = stats(&mut by_hand);
    print_baseline_dump_retries();
    if std::env::var_os("BENCH_MEMORY_PARTS").is_some() {
        println!("  {ballast_mb} MiB, ours streamed, where the windows went:");
        print!("{}", our_windows(&streamed).1.render());
        println!("  {ballast_mb} MiB, ours --lazy-restore, where the windows went:");
        print!("{}", our_windows(&lazy).1.render());
    }
    let windows = methods
        .iter()
        .map(|(name, reports, _)| (*name, our_windows(reports).0));
    for (name, (low, median, high)) in windows.chain([("CRIU by hand", hand)]) {
        let hand = hand.1;
        println!(
            "  {ballast_mb:>5} MiB  {name:<24} {median:7.1} ms ({low:.0}..{high:.0})  ratio to by hand {:.3}  {:.2} ms/MiB, {:.0} MiB/s inside the window",
            median / hand,
            median / f64::from(ballast_mb),
            f64::from(ballast_mb) / (median / 1e3),
        );
    }
    // The peer's view: its longest gap against the window of the same
    // move (a lazy restore's fill happens after the release, while the
    // peer is served again, and shows here if it slows the process).
    for ((name, _, _), seen) in methods.iter().zip(&seen) {
        let (_, stall, _) = field(seen, |s| s.stall);
        let (_, beyond, most) = field(seen, |s| s.stall - s.window);
        let (_, retransmits, _) = field(seen, |s| s.retransmits as f64);
        println!(
            "  {ballast_mb:>5} MiB  {name:<24} peer stall {stall:7.1} ms, beyond its window {beyond:.1} (at most {most:.1}), {retransmits:.0} peer retransmits (medians)"
        );
    }
    // After the release: how long until the memory was all there.
    for (name, dir) in [("--lazy-restore", &lazy), ("--post-copy", &post)] {
        let (low, median, high) = stats(&mut phase_durations(dir, "memory-fill"));
        println!(
            "  {ballast_mb:>5} MiB  {name:<24} memory filled {median:.0} ms ({low:.0}..{high:.0}) after the release"
        );
    }
    print_steal(started);
    pid
}

/// `--routed`: the takeover by BGP (the routed lab: the peer behind a
/// router running BIRD) against the one on a shared link, alternating in
/// one run, the same workload in each lab: freeze window, the peer's
/// stall and retransmits, and how long the routes took to bring the
/// peers' answers to the destination.
fn routed_section(rounds: usize) {
    let mut l2 = MigrationLab::new("bl2");
    let mut bgp = MigrationLab::new_routed("bgp");
    let mut pids = [l2.start_workload(true, 0), bgp.start_workload(true, 0)];
    std::thread::sleep(std::time::Duration::from_secs(1));
    let labs = [&l2, &bgp];
    let reports = [l2.dir.0.join("reports/l2"), bgp.dir.0.join("reports/bgp")];
    let mut samples: [Vec<Sample>; 2] = Default::default();
    for round in 0..rounds {
        for (i, lab) in labs.iter().enumerate() {
            for (from, to) in [(SRC, DST), (DST, SRC)] {
                let (sample, next) = ours(lab, from, to, pids[i], &[], &reports[i]);
                let broken = broken(lab);
                assert!(broken.is_empty(), "a move {from} -> {to} broke {broken:?}");
                samples[i].push(sample);
                pids[i] = next;
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    println!(
        "takeover by BGP (BIRD, the peer behind a router) against the shared link (GARP / NA), {} moves each, alternating",
        samples[0].len()
    );
    println!("                                      min     median        max   (ms)");
    for (row, f) in ROWS {
        let medians: Vec<f64> = samples
            .iter()
            .zip(["l2", "bgp"])
            .map(|(method, name)| {
                let (a, b, c) = stats(&mut method.iter().map(f).collect::<Vec<_>>());
                println!("  {name:<18} {row:<18} {a:8.1} {b:10.1} {c:10.1}");
                b
            })
            .collect();
        println!("  median ratio bgp/l2 {:.3}", medians[1] / medians[0]);
    }
    // How long, from the announcement, until every peer's echo answer
    // reached the destination (the route-convergence phase).
    for (dir, name) in reports.iter().zip(["l2", "bgp"]) {
        let (a, b, c) = stats(&mut phase_durations(dir, "route-convergence"));
        println!(
            "  {name:<18} {:<18} {a:8.1} {b:10.1} {c:10.1}",
            "route-convergence"
        );
    }
    println!(
        "  both: bytes lost 0, resets 0 (the peers checked every byte); with BGP the destination\n  \
         adds the address (BIRD announces it) before its restore, so the routes move while CRIU works"
    );
}

/// The machine's CPU time so far (all CPUs, in clock ticks) and how much
/// of it the hypervisor gave to others (steal): on a shared VM the
/// figures of a run are only as steady as that share is low.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    (ticks.iter().sum(), ticks.get(7).copied().unwrap_or(0))
}

fn print_steal(since: (u64, u64)) {
    let now = cpu_ticks();
    let (total, steal) = (now.0 - since.0, now.1 - since.1);
    if total > 0 {
        println!(
            "  CPU time the hypervisor took from this VM meanwhile (steal): {:.1}%",
            100.0 * steal as f64 / total as f64
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    // `--ballast-mb 64,256,1024`: the memory section's sizes;
    // `--memory-rounds N`: its rounds (default: rounds, at most 3).
    let mut ballasts: Vec<u32> = Vec::new();
    let mut memory_rounds = rounds.clamp(1, 3);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ballast-mb" => {
                let list = args.next().expect("--ballast-mb N[,N...]");
                ballasts.extend(list.split(',').map(|n| n.parse::<u32>().expect("MiB")));
            }
            "--memory-rounds" => {
                memory_rounds = args.next().and_then(|n| n.parse().ok()).expect("N");
            }
            "--routed" => {
                routed_section(rounds);
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let mut lab = MigrationLab::new("bench");
    let mut pid = lab.start_workload(true, 0);
    std::thread::sleep(std::time::Duration::from_secs(1));
    // ours (holding the peers' packets, the default), baseline, baseline
    // + announce, ours with --no-hold
    let mut samples: [Vec<Sample>; 4] = Default::default();
    let mut baseline_resets = Vec::new();
    let small_started = cpu_ticks();
    let reports = [
        lab.dir.0.join("reports/small"),
        PathBuf::new(),
        PathBuf::new(),
        lab.dir.0.join("reports/small-no-hold"),
    ];
    for round in 0..rounds {
        // Each round: every method there and back, so all meet the same
        // machine conditions.
        for (method, no_hold) in [(0, false), (3, true)] {
            for (from, to) in [(SRC, DST), (DST, SRC)] {
                let extra: &[&str] = if no_hold { &["--no-hold"] } else { &[] };
                let (sample, next) = ours(&lab, from, to, pid, extra, &reports[method]);
                let broken = broken(&lab);
                assert!(
                    broken.is_empty(),
                    "our move {from} -> {to} broke {broken:?}"
                );
                samples[method].push(sample);
                pid = next;
            }
        }
        // BENCH_ONLY_OURS: our two methods only (an A/B of holding).
        let baselines: &[(usize, bool)] = if std::env::var_os("BENCH_ONLY_OURS").is_some() {
            &[]
        } else {
            &[(1, false), (2, true)]
        };
        for &(method, announce) in baselines {
            for (from, to) in [(SRC, DST), (DST, SRC)] {
                let (sample, next) = baseline(&lab, from, to, pid, round, announce);
                pid = next;
                let broken = broken(&lab);
                if broken.is_empty() {
                    samples[method].push(sample);
                } else {
                    // The hand-made move reset connections: count it, start over.
                    baseline_resets.push(format!(
                        "round {} {from} -> {to}{}: {}",
                        round + 1,
                        if announce { " (with announce)" } else { "" },
                        broken.join(", ")
                    ));
                    pid = restart_workload(&mut lab, pid);
                    break;
                }
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    for conn in lab.current_connections() {
        assert_eq!(conn["error"], serde_json::Value::Null, "{conn}");
    }
    // Rounds 0: only the memory section.
    if rounds > 0 {
        println!(
            "lab migration, {} moves of ours (3 connections, IPv4 + IPv6; the peer pushes every 10 ms)",
            samples[0].len()
        );
        println!("                                      min     median        max   (ms)");
        let names = ["ours", "baseline", "baseline+announce", "ours --no-hold"];
        for (row, f) in ROWS {
            let medians: Vec<f64> = samples
                .iter()
                .zip(names)
                .enumerate()
                .map(|(i, (method, name))| {
                    // Our freeze windows as `migrator report` gives them.
                    let (a, b, c) = if row == "freeze window" && (i == 0 || i == 3) {
                        our_windows(&reports[i]).0
                    } else {
                        field(method, f)
                    };
                    println!("  {name:<18} {row:<18} {a:8.1} {b:10.1} {c:10.1}");
                    b
                })
                .collect();
            println!(
                "  median ratio ours/baseline {:.3}, ours/baseline+announce {:.3}, ours --no-hold/baseline+announce {:.3}",
                medians[0] / medians[1],
                medians[0] / medians[2],
                medians[3] / medians[2]
            );
        }
        println!(
            "  ours: {} moves, bytes lost 0, resets 0 (the peer checked every byte)",
            samples[0].len()
        );
        println!(
            "  baseline: CRIU's CLI with --network-lock nftables, addresses moved with `ip addr`;\n  \
             nothing tells the peers (a peer whose neighbour entry points at the old host keeps\n  \
             sending there until it expires; stalls are cut at {:.0} s). baseline+announce adds\n  \
             `arping -U` and `ndisc6 -s ADDR PEER` after the restore. Freeze windows of the baselines run from\n  \
             the start of `criu dump` to the end of `criu restore`.",
            STALL_CAP_MS / 1e3
        );
        println!(
            "  baseline moves that reset connections: {}",
            baseline_resets.len()
        );
        print_baseline_dump_retries();
        for reset in &baseline_resets {
            println!("    {reset}");
        }
        print_steal(small_started);
        println!("\nours, where the windows went (migrator report):");
        print!("{}", our_windows(&reports[0]).1.render());
    }
    if ballasts.is_empty() {
        keep_reports(&lab);
        return;
    }
    println!(
        "\nfreeze window by memory size, {memory_rounds} round(s) of two moves each, medians (ours / CRIU's CLI by hand with a shared images directory, which copies nothing)"
    );
    for ballast in ballasts {
        pid = memory_section(&mut lab, pid, ballast, memory_rounds);
    }
    println!(
        "  this machine copies memory at {:.0} MiB/s (memcpy of 256 MiB, best of 5)",
        memory_copy_mib_per_s()
    );
    keep_reports(&lab);
}
