//! `migrator watch` on real connections in a lab: JSON lines through a
//! freeze and release, the Prometheus endpoint scraped by a real HTTP
//! client, the live table in a real terminal (tmux), and bad --pid input.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use migrator_tests::{
    lab::{DST, PEER, SERVICE_V4, SRC},
    migration::{MigrationLab, SERVICE_PORT},
    migrator_bin,
    wire::in_netns,
};
use serde_json::Value;

fn watch_in(lab: &MigrationLab, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", lab.lab.netns_path(SRC).display()))
        .arg(migrator_bin())
        .arg("watch")
        .args(args);
    command
}

fn migrator(lab: &MigrationLab, args: &[&str]) -> String {
    let out = lab.output(SRC, migrator_bin().to_str().unwrap(), args);
    assert!(
        out.status.success(),
        "migrator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The workload's flows as `LOCAL=REMOTE` (local = the service side).
fn flows(lab: &MigrationLab) -> Vec<String> {
    lab.current_connections()
        .iter()
        .map(|c| {
            format!(
                "{}={}",
                c["remote"].as_str().unwrap(),
                c["local"].as_str().unwrap()
            )
        })
        .collect()
}

/// Freeze the workload's flows with the CLI for `how_long`, then release
/// them; returns the flows.
fn freeze_for(lab: &MigrationLab, how_long: Duration) -> Vec<String> {
    let flows = flows(lab);
    let mut freeze = vec!["freeze", "--iface", "eth0", "--deadline", "20s"];
    for flow in &flows {
        freeze.extend(["--flow", flow.as_str()]);
    }
    migrator(lab, &freeze);
    std::thread::sleep(how_long);
    migrator(lab, &["release", "--iface", "eth0", "--all"]);
    flows
}

/// `watch --pid PID --json` every 100 ms, into a file of the lab's.
fn watch_json(lab: &MigrationLab, pid: i32) -> (Child, std::path::PathBuf) {
    let out_path = lab.dir.0.join("watch.json");
    let watch = watch_in(
        lab,
        &["--pid", &pid.to_string(), "--json", "--interval", "100ms"],
    )
    .stdout(std::fs::File::create(&out_path).unwrap())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    (watch, out_path)
}

/// What `watch --json` wrote, a value per line.
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn terminate(child: &mut Child) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// New clients of a locked service address show while they wait: each
/// SYN the lock holds back counts, in the JSON lines and in the header;
/// once released the rule, and its line, are gone. The clients arrive at
/// once, from both cores, and every one of them counts: the counters of
/// a service are shared by all its clients.
#[test]
fn new_clients_waiting_on_a_locked_service_address_are_counted() {
    use std::net::{SocketAddr, TcpStream};
    const CLIENTS: u64 = 24;
    let mut lab = MigrationLab::new("wsyn");
    let pid = lab.start_workload(true, 0);
    let (mut watch, out_path) = watch_json(&lab, pid);
    std::thread::sleep(Duration::from_millis(500));
    let service = format!("{SERVICE_V4}:{SERVICE_PORT}");
    migrator(
        &lab,
        &[
            "freeze",
            "--iface",
            "eth0",
            "--deadline",
            "20s",
            "--ip",
            &service,
        ],
    );
    // New clients; nobody answers their SYNs while locked. Each gives up
    // before its first resend (1 s), so each sends exactly one SYN.
    let to: SocketAddr = service.parse().unwrap();
    let start = Arc::new(Barrier::new(CLIENTS as usize));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let start = start.clone();
            in_netns(&lab.lab.netns_path(PEER), move || {
                start.wait();
                TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok()
            })
        })
        .collect();
    let connected: Vec<bool> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    migrator(&lab, &["release", "--iface", "eth0", "--all"]);
    std::thread::sleep(Duration::from_millis(400));
    terminate(&mut watch);
    assert!(!connected.contains(&true), "a client got through the lock");

    let lines = json_lines(&out_path);
    let service_lines: Vec<&Value> = lines.iter().filter(|l| l["service"] == service).collect();
    let most = |field: &str| {
        service_lines
            .iter()
            .map(|l| l[field].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    assert_eq!(
        (most("waiting"), most("new_connection_attempts")),
        (CLIENTS, CLIENTS),
        "SYNs (waiting, attempts) counted, of {CLIENTS} clients: {:?}",
        service_lines.last()
    );
    assert!(service_lines.iter().all(|l| {
        l["new_connection_attempts"].as_u64().unwrap() >= l["waiting"].as_u64().unwrap()
    }));
    // The lines after the release have no service line any more.
    let last_ts = lines.last().unwrap()["ts_ms"].as_u64().unwrap();
    let last_service_ts = service_lines.last().unwrap()["ts_ms"].as_u64().unwrap();
    assert!(last_service_ts < last_ts, "the released rule still shows");
}

#[test]
fn json_lines_follow_a_freeze_and_release() {
    let mut lab = MigrationLab::new("wj");
    let pid = lab.start_workload(true, 0);
    let (mut watch, out_path) = watch_json(&lab, pid);
    std::thread::sleep(Duration::from_millis(800));
    let flows = freeze_for(&lab, Duration::from_millis(2_600));
    std::thread::sleep(Duration::from_millis(1_000));
    terminate(&mut watch);

    let rows = json_lines(&out_path);
    let first = flows[0].split('=').next().unwrap().to_owned();
    let mine: Vec<&Value> = rows
        .iter()
        .filter(|r| r["local"] == first.as_str())
        .collect();
    let frozen: Vec<&&Value> = mine.iter().filter(|r| r["mode"] == "frozen").collect();
    assert!(
        frozen.len() >= 10,
        "too few frozen snapshots: {}",
        frozen.len()
    );
    // The peer's retransmits rise while frozen, at its backoff: at least
    // three distinct increases within 2.6 s (0.2, 0.6, 1.4 s ...).
    let mut counts: Vec<u64> = frozen
        .iter()
        .map(|r| r["peer_retransmits"].as_u64().unwrap())
        .collect();
    counts.dedup();
    assert!(
        counts.len() >= 4,
        "peer retransmits while frozen: {counts:?}"
    );
    assert!(frozen.iter().all(|r| r["frozen_ms"].as_u64().is_some()));
    assert!(
        frozen
            .iter()
            .any(|r| r["next_peer_retransmit_in_ms"].as_i64().is_some()),
        "no next-retransmit estimate after several retransmits"
    );
    // After the release: released, and no further drops.
    let released: Vec<&&Value> = mine.iter().filter(|r| r["mode"] == "released").collect();
    assert!(released.len() >= 5, "{released:?}");
    let dropped: Vec<u64> = released
        .iter()
        .map(|r| r["packets_dropped"].as_u64().unwrap())
        .collect();
    assert!(
        dropped.windows(2).all(|w| w[0] == w[1]),
        "drops after release: {dropped:?}"
    );
    // Schema: every documented field is there, with its type.
    for field in [
        "ts_ms",
        "peer_retransmits",
        "local_retransmits",
        "packets_dropped",
        "packets_held",
        "bytes_in",
        "bytes_out",
    ] {
        assert!(mine[0][field].is_u64(), "{field} in {}", mine[0]);
    }
    assert!(mine[0]["peer_retransmits_per_s"].is_f64());
    // watch removed what it added: the flows it observed are gone.
    assert!(!lab.pins_left(SRC), "watch left its flows or attachment");
}

#[test]
fn metrics_endpoint_matches_status() {
    let mut lab = MigrationLab::new("wm");
    let pid = lab.start_workload(true, 0);
    let mut watch = watch_in(
        &lab,
        &[
            "--pid",
            &pid.to_string(),
            "--no-tui",
            "--interval",
            "100ms",
            "--metrics-addr",
            "127.0.0.1:9464",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    freeze_for(&lab, Duration::from_millis(1_000));
    // Settled: no more drops after the release.
    std::thread::sleep(Duration::from_millis(700));
    let status: Value = serde_json::from_str(&migrator(&lab, &["status", "--json"])).unwrap();
    let scrape = lab.output(SRC, "curl", &["-sf", "http://127.0.0.1:9464/metrics"]);
    assert!(scrape.status.success(), "curl failed: {scrape:?}");
    let text = String::from_utf8(scrape.stdout).unwrap();
    terminate(&mut watch);
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str, local: &str| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("local") == Some(local))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name}{{local={local}}} missing in:\n{text}"))
    };
    let tracked = status["flows"].as_array().unwrap();
    assert_eq!(tracked.len(), 3);
    for flow in tracked {
        let local = flow["local"].as_str().unwrap();
        let counters = &flow["counters"];
        assert_eq!(
            value("migrator_packets_dropped_total", local),
            counters["dropped"].as_u64().unwrap() as f64
        );
        assert!(counters["dropped"].as_u64().unwrap() > 0);
        assert_eq!(
            value("migrator_peer_retransmits_total", local),
            counters["peer_retransmits"].as_u64().unwrap() as f64
        );
        assert_eq!(value("migrator_flow_frozen", local), 0.0);
    }
    // OpenMetrics: counters are typed under their name without `_total`.
    for name in ["migrator_packets_held", "migrator_local_retransmits"] {
        assert!(text.contains(&format!("# TYPE {name} counter")), "{name}");
    }
    assert!(
        text.contains("# UNIT migrator_received_bytes bytes"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

/// The agent's metrics count migrations by outcome and put each moved
/// process's freeze window in the histogram, as the source's report has
/// it (the agent learns when the source froze from the restore request).
#[test]
fn agent_metrics_count_migrations_and_their_freeze_windows() {
    let mut lab = MigrationLab::new("am");
    let pid = lab.start_workload(true, 0);
    lab.stop_agent(DST);
    lab.start_agent_with(DST, &["--metrics-addr", "127.0.0.1:9465"]);
    // The source keeps its own, in a file for node_exporter.
    let file = lab.dir.0.join("source.prom");
    let file_arg = ["--metrics-file", file.to_str().unwrap()];
    let run = lab.migrate(SRC, DST, pid, &file_arg);
    assert!(run.success, "{}", run.stderr);
    let report = run.report.unwrap();
    let window_s = report["freeze_window_ms"].as_f64().unwrap() / 1e3;
    let moved = report["destination_pid"].as_i64().unwrap() as i32;
    // Back (the source's agent counts that one), then here again with the
    // address already taken here: refused at this agent's preflight.
    let back = lab.migrate(DST, SRC, moved, &[]);
    assert!(back.success, "{}", back.stderr);
    let pid = back.report.unwrap()["destination_pid"].as_i64().unwrap() as i32;
    let taken = lab.output(
        DST,
        "ip",
        &["addr", "add", &format!("{SERVICE_V4}/32"), "dev", "eth0"],
    );
    assert!(taken.status.success());
    let refused = lab.migrate(SRC, DST, pid, &file_arg);
    assert_eq!(refused.code, Some(3), "{}", refused.stderr);
    let source = std::fs::read_to_string(&file).unwrap();
    for line in [
        "migrator_source_migrations_total{outcome=\"migrated\"} 1",
        "migrator_source_migrations_total{outcome=\"refused\"} 1",
        "migrator_source_freeze_window_seconds_count 1",
    ] {
        assert!(source.lines().any(|l| l == line), "no {line} in:\n{source}");
    }
    let scrape = lab.output(DST, "curl", &["-sf", "http://127.0.0.1:9465/metrics"]);
    assert!(scrape.status.success(), "curl failed: {scrape:?}");
    let text = String::from_utf8(scrape.stdout).unwrap();
    let sample = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
    };
    assert_eq!(
        sample("migrator_migrations_total{outcome=\"migrated\"}"),
        1.0
    );
    assert_eq!(sample("migrator_freeze_window_seconds_count"), 1.0);
    // The agent's view of the window: within a few ms of the source's
    // (the restore request's time on the wire, the report's last steps).
    let seen = sample("migrator_freeze_window_seconds_sum");
    assert!(
        (seen - window_s).abs() < 0.005,
        "agent {seen} s, report {window_s} s"
    );
    assert!(
        text.contains("# UNIT migrator_freeze_window_seconds seconds"),
        "{text}"
    );
    assert_eq!(
        sample("migrator_migrations_total{outcome=\"refused\"}"),
        1.0
    );
}

/// A command running in a detached tmux session of its own (a real
/// terminal), killed on drop.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(tag: &str, command: &str) -> Self {
        let session = format!("migrator-{tag}-{}", std::process::id());
        let this = Self { session };
        let started = this.tmux(&[
            "new-session",
            "-d",
            "-s",
            &this.session,
            "-x",
            "160",
            "-y",
            "30",
            command,
        ]);
        assert!(started.status.success(), "{started:?}");
        this
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").args(args).output().expect("tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(
            &self
                .tmux(&["capture-pane", "-p", "-t", &self.session])
                .stdout,
        )
        .into_owned()
    }

    /// The screen once it shows `what` (fails after 15 s).
    fn until(&self, what: &str) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if screen.contains(what) {
                return screen;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no {what:?} on screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", &self.session, keys]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-session", "-t", &self.session]);
    }
}

/// `migrator watch ARGS` in src, then a marker with its exit status.
fn watch_command(lab: &MigrationLab, args: &str) -> String {
    format!(
        "nsenter --net={} {} watch {args}; echo WATCH-EXITED-$?; sleep 30",
        lab.lab.netns_path(SRC).display(),
        migrator_bin().display()
    )
}

#[test]
fn live_table_in_a_real_terminal_quits_on_q() {
    let mut lab = MigrationLab::new("wt");
    let pid = lab.start_workload(true, 0);
    let tmux = Tmux::start(
        "watch",
        &watch_command(&lab, &format!("--pid {pid} --interval 200ms")),
    );
    let screen = tmux.until("198.18.0.100:");
    assert!(screen.contains("3 connections"), "{screen}");
    assert!(screen.contains("[2001:db8::100]:"), "{screen}");
    assert!(screen.contains("PEER RTX"), "{screen}");
    assert!(
        screen.lines().next().unwrap_or("").contains("connections"),
        "{screen}"
    );
    // A resize redraws; q quits and restores the terminal.
    tmux.tmux(&[
        "resize-window",
        "-t",
        &tmux.session,
        "-x",
        "140",
        "-y",
        "25",
    ]);
    let screen = tmux.until("[2001:db8::100]:");
    assert!(
        screen.lines().all(|line| line.chars().count() <= 140),
        "{screen}"
    );
    tmux.keys("q");
    let screen = tmux.until("WATCH-EXITED-0");
    assert!(
        !screen.contains("PEER RTX"),
        "the table stayed on screen:\n{screen}"
    );
    assert!(!lab.pins_left(SRC), "watch left its flows or attachment");
}

/// A process with no TCP connections, killed on drop.
fn idle() -> migrator_tests::KillOnDrop {
    migrator_tests::KillOnDrop(Command::new("sleep").arg("60").spawn().unwrap())
}

/// A message while the table is up (here: the followed process has no
/// connections yet) goes to the table's status line, not over the table,
/// and is printed in full once the terminal is restored.
#[test]
fn messages_during_the_live_table_go_to_its_status_line() {
    let lab = MigrationLab::new("ws");
    let idle = idle();
    let pid = idle.0.id();
    let tmux = Tmux::start(
        "watch-msg",
        &watch_command(&lab, &format!("--pid {pid} --interval 200ms")),
    );
    let message = format!("process {pid} has no TCP connections yet");
    let screen = tmux.until("1 message");
    let lines: Vec<&str> = screen.lines().collect();
    // The table's own lines come first and stay whole: header, status
    // line (with the message), then the bordered table.
    assert!(lines[0].starts_with("0 connections"), "{screen}");
    assert!(
        lines[1].starts_with("q quits | 1 message") && lines[1].contains(&message),
        "{screen}"
    );
    assert!(lines[2].contains("migrator watch"), "{screen}");
    assert_eq!(
        screen.matches(&message).count(),
        1,
        "the message was drawn more than once:\n{screen}"
    );
    tmux.keys("q");
    let screen = tmux.until("WATCH-EXITED-0");
    assert!(
        screen.contains(&format!("{message}; watching for new ones")),
        "the kept message was not printed after the table closed:\n{screen}"
    );
}

#[test]
fn bad_pids_are_explained() {
    let mut lab = MigrationLab::new("wp");
    let _ = lab.start_workload(true, 0);
    let out = watch_in(&lab, &["--pid", "999999999", "--once"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("process 999999999 does not exist"),
        "{stderr}"
    );
    // No TCP yet: said once, and it keeps watching (here: one snapshot).
    let idle = idle();
    let out = watch_in(&lab, &["--pid", &idle.0.id().to_string(), "--once"])
        .output()
        .unwrap();
    drop(idle);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no TCP connections yet; watching for new ones"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 connections"));
}

/// Whether any tracefs is mounted where `pid` lives.
fn tracefs_mounted_for(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .any(|line| line.contains(" - tracefs "))
}

/// `migrator ARGS` in `src`'s network namespace and in a mount namespace
/// of its own where no tracefs is mounted, as on a fresh VM, whatever this
/// machine has mounted.
fn migrator_without_tracefs(lab: &MigrationLab, args: &[&str]) -> Command {
    // Every tracefs mount point (innermost first), lazily unmounted; the
    // field after "-" in mountinfo is the filesystem type.
    const UNMOUNT_TRACEFS: &str = r#"awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "tracefs") print $5; break } }' /proc/self/mountinfo | sort -r | while read -r point; do umount -l "$point" || exit 1; done; exec "$@""#;
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(UNMOUNT_TRACEFS)
        .arg("sh")
        .arg("nsenter")
        .arg(format!("--net={}", lab.lab.netns_path(SRC).display()))
        .arg(migrator_bin())
        .args(args);
    command
}

/// Our own side's retransmits are counted with no tracefs mounted: the
/// peer's packets (data and ACKs) are dropped at the peer for 1.5 s, so the
/// workload's echoes go unacknowledged and its kernel sends them again;
/// `migrator watch`, in a mount namespace without tracefs, must see that.
#[test]
fn local_retransmits_are_counted_without_tracefs() {
    let mut lab = MigrationLab::new("wr");
    let pid = lab.start_workload(true, 0);
    let doctor = migrator_without_tracefs(&lab, &["doctor", "--json"])
        .output()
        .unwrap();
    let doctor: Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let check = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "local retransmits")
        .cloned()
        .unwrap_or_else(|| panic!("no local retransmits check: {doctor}"));
    assert_eq!(check["status"], "ok", "{check}");

    let out_path = lab.dir.0.join("watch.json");
    let err_path = lab.dir.0.join("watch.err");
    let mut watch = migrator_without_tracefs(
        &lab,
        &[
            "watch",
            "--pid",
            &pid.to_string(),
            "--json",
            "--interval",
            "100ms",
        ],
    )
    .stdout(std::fs::File::create(&out_path).unwrap())
    .stderr(std::fs::File::create(&err_path).unwrap())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !tracefs_mounted_for(watch.id()),
        "tracefs is still mounted where watch runs"
    );
    lab.lab.start_hiccup().unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    lab.lab.end_hiccup().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    terminate(&mut watch);

    let stderr = std::fs::read_to_string(&err_path).unwrap();
    let rows = json_lines(&out_path);
    assert!(!rows.is_empty(), "no snapshots; stderr:\n{stderr}");
    let counted: Vec<u64> = rows
        .iter()
        .map(|r| {
            r["local_retransmits"]
                .as_u64()
                .unwrap_or_else(|| panic!("local retransmits not counted: {r}\n{stderr}"))
        })
        .collect();
    let highest = counted.iter().max().copied().unwrap_or(0);
    assert!(
        highest > 0,
        "no local retransmit counted while the peer dropped everything for 1.5 s; stderr:\n{stderr}"
    );
    assert!(!lab.pins_left(SRC), "watch left its flows or attachment");
}
