//! `cargo xtask run`: a real migration in the lab. A workload with three
//! connections (two IPv4, one IPv6) to servers in `peer` that push bytes
//! and check every echoed byte moves from `src` to `dst` and back, once
//! per round; both reports are printed, then the servers' verdict. With
//! `--server`, Debian's nginx moves instead, with clients arriving all
//! the time.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, lab};

/// Removes the lab whatever happens to the demo: its namespaces and what
/// runs in them, and what its agents leave of themselves under `dir`
/// (killed, they unmount nothing and leave their CRIU cache link).
struct LabGuard(lab::Lab, PathBuf);

impl Drop for LabGuard {
    fn drop(&mut self) {
        let down = self.0.down();
        lab::clear_leftovers_under(&self.1);
        match down {
            Ok(()) => {
                eprintln!("\nlab down: namespaces, links, pins, mounts and processes removed");
            }
            Err(err) => eprintln!("\nlab down failed: {err} (run `cargo xtask lab down`)"),
        }
    }
}

fn in_netns(lab: &lab::Lab, host: &str, program: &Path) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", lab.netns_path(host).display()))
        .arg(program);
    command
}

fn spawn_quiet(command: &mut Command, log: &Path) -> Result<Child> {
    let log_file = std::fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("starting a lab process")
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The lab, up, with what every demo needs.
struct Demo {
    lab: lab::Lab,
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    token: std::path::PathBuf,
    /// The routed lab (BGP takeover) instead of the shared link; the same
    /// namespace names.
    routed: Option<crate::routed::RoutedLab>,
}

impl Demo {
    /// Clean what earlier runs left, bring the lab up (removed again when
    /// the guard goes), make the token.
    fn up(root: &Path, prefix: &str, routed: bool) -> Result<(Self, LabGuard)> {
        let bin = root.join("target/debug");
        let dir = root.join("target/lab");
        std::fs::create_dir_all(&dir)?;
        // State directories of earlier runs (with what a run that was
        // killed left mounted there): migrator makes them afresh, 0700.
        lab::clear_leftovers_under(&dir);
        for state in ["images", "agent-src", "agent-dst", "nginx"] {
            let _ = std::fs::remove_dir_all(dir.join(state));
        }
        // Reports and pictures of earlier runs: the summary is of this one.
        for entry in std::fs::read_dir(&dir)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("report-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let lab = lab::Lab::new(prefix);
        lab::become_subreaper();
        let routed = if routed {
            cmd::section("routed lab up (BIRD on the router, src and dst)");
            lab.down().map_err(anyhow::Error::msg)?;
            let routed = crate::routed::RoutedLab::new(prefix);
            routed.up().map_err(anyhow::Error::msg)?;
            Some(routed)
        } else {
            cmd::section("lab up");
            lab.up().map_err(anyhow::Error::msg)?;
            None
        };
        let guard = LabGuard(lab.clone(), dir.clone());
        let (peer_v4, peer_v6) = crate::routed::addresses_of(routed.is_some(), lab::PEER);
        eprintln!(
            "    peer {peer_v4} / {peer_v6}, service address {} / {} on src{}",
            lab::SERVICE_V4,
            lab::SERVICE_V6,
            if routed.is_some() {
                " (announced by its BIRD; the peer is behind the router)"
            } else {
                ""
            }
        );
        let token = dir.join("token");
        lab::write_token(&token).map_err(anyhow::Error::msg)?;
        Ok((
            Self {
                lab,
                bin,
                dir,
                token,
                routed,
            },
            guard,
        ))
    }

    /// A host's management address, where its agent listens.
    fn host_address(&self, host: &str) -> String {
        crate::routed::addresses_of(self.routed.is_some(), host).0
    }

    /// With BGP takeover: what the agent on `host` is started with, or
    /// what migrate from `host` is given.
    fn bgp_args(&self, host: &str, agent: bool) -> Vec<String> {
        match (&self.routed, agent) {
            (Some(routed), true) => routed.agent_args(host),
            (Some(routed), false) => routed.migrate_args(host),
            (None, _) => Vec::new(),
        }
    }

    /// An agent on each host.
    fn start_agents(&self) -> Result<()> {
        let Self {
            lab,
            bin,
            dir,
            token,
            ..
        } = self;
        for host in [lab::SRC, lab::DST] {
            let listen = format!("{}:{}", self.host_address(host), lab::AGENT_PORT);
            spawn_quiet(
                in_netns(lab, host, &bin.join("migrator"))
                    .args([
                        "agent",
                        "--listen",
                        &listen,
                        "--token-file",
                        &token.to_string_lossy(),
                        "--work-dir",
                        &dir.join(format!("agent-{host}")).to_string_lossy(),
                    ])
                    .args(self.bgp_args(host, true)),
                &dir.join(format!("agent-{host}.log")),
            )?;
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// `rounds` round trips of the tree `pid` (`extra`: migrate's options),
    /// each move with its report, its picture and the live view on the
    /// source. Returns where the tree ended, whether every move worked,
    /// and the freeze windows; stops at the first move that failed.
    fn moves(&self, rounds: u32, mut pid: i32, extra: &[&str]) -> Result<(i32, bool, Vec<f64>)> {
        let Self {
            lab,
            bin,
            dir,
            token,
            ..
        } = self;
        let mut windows = Vec::new();
        let mut failures = 0;
        for round in 1..=rounds {
            for (from, to) in [(lab::SRC, lab::DST), (lab::DST, lab::SRC)] {
                cmd::section(&format!("round {round}: migrate {from} -> {to}"));
                let report = dir.join(format!("report-{round}-{from}-{to}.json"));
                let target = format!("{}:{}", self.host_address(to), lab::AGENT_PORT);
                // The live counters of the moving connections, as an SRE would
                // watch them on the source (plain tables, between the progress
                // lines of migrate).
                let mut watch = in_netns(lab, from, &bin.join("migrator"))
                    .args(["watch", "--plain", "--interval", "150ms"])
                    .args(["--ip", lab::SERVICE_V4, "--ip", lab::SERVICE_V6])
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting migrator watch")?;
                let status = in_netns(lab, from, &bin.join("migrator"))
                    .args(["migrate", "--pid", &pid.to_string(), "--to", &target])
                    .args(["--token-file", &token.to_string_lossy()])
                    .args(["--ip", lab::SERVICE_V4, "--ip", lab::SERVICE_V6])
                    .args(["--report", &report.to_string_lossy()])
                    .args(["--work-dir", &dir.join("images").to_string_lossy()])
                    .args(self.bgp_args(from, false))
                    .args(extra)
                    .status()?;
                // SAFETY: kill has no memory preconditions; SIGTERM ends watch cleanly.
                unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
                let _ = watch.wait();
                eprintln!("    report: {}", report.display());
                if let Some(routed) = &self.routed {
                    for address in [lab::SERVICE_V4, lab::SERVICE_V6] {
                        eprintln!(
                            "    the router's route for {address}: via {}",
                            routed.route_points_at(address).unwrap_or("nobody")
                        );
                    }
                }
                // Its picture: phases of both hosts and the connections' packet
                // events on one time axis (`migrator report FILE --svg OUT`).
                let picture = report.with_extension("svg");
                let drawn = cmd::new(bin.join("migrator"))
                    .arg("report")
                    .arg(&report)
                    .arg("--svg")
                    .arg(&picture)
                    .arg("--quiet")
                    .stdout(Stdio::null())
                    .status();
                if drawn.is_ok_and(|status| status.success()) {
                    eprintln!("    timeline: {}", picture.display());
                }
                let moved = read_json(&report);
                windows.extend(moved.as_ref().and_then(|r| r["freeze_window_ms"].as_f64()));
                let new_pid = moved
                    .and_then(|r| r["destination_pid"].as_i64())
                    .map(|p| p as i32);
                match (status.success(), new_pid) {
                    (true, Some(new_pid)) => pid = new_pid,
                    _ => {
                        failures += 1;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            if failures > 0 {
                break;
            }
        }

        Ok((pid, failures == 0, windows))
    }

    /// `migrator report DIR` over this run's reports.
    fn summary(&self) {
        let Self { bin, dir, .. } = self;
        cmd::section("the moves side by side (migrator report DIR)");
        let _ = cmd::new(bin.join("migrator"))
            .arg("report")
            .arg(dir)
            .arg("--quiet")
            .status();
    }
}

/// `cargo xtask run --server`: Debian's nginx (a master and two workers
/// sharing listening sockets on the service addresses) moves, the peers'
/// packets held through the freeze (the default), while `lab-clients` in `peer` keep asking on keep-alive
/// connections and a new client arrives every 20 ms; the verdict counts
/// failed requests and connects slower than the longest freeze + 50 ms.
pub fn run_server(root: &Path, prefix: &str, rounds: u32) -> Result<()> {
    let (demo, _guard) = Demo::up(root, prefix, false)?;
    let Demo { lab, bin, dir, .. } = &demo;
    demo.start_agents()?;
    cmd::section("nginx, and clients");
    let conf_dir = dir.join("nginx");
    std::fs::create_dir_all(&conf_dir)?;
    let conf = conf_dir.join("nginx.conf");
    std::fs::write(&conf, lab::nginx_conf(&conf_dir))?;
    let launcher = lab::nginx_command(lab, lab::SRC, &conf)
        .spawn()
        .context("starting nginx (cargo xtask setup installs nginx-light)")?;
    let started = Instant::now();
    let pid = loop {
        let master = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", launcher.id()))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
        let workers = master.map_or(0, |m| {
            std::fs::read_to_string(format!("/proc/{m}/task/{m}/children"))
                .map(|c| c.split_whitespace().count())
                .unwrap_or(0)
        });
        if let Some(master) = master.filter(|_| workers >= 2) {
            break master;
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("nginx did not start its two workers in src");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "    nginx master pid {pid} in src, 2 workers, listening on {}:{port} and [{}]:{port}",
        lab::SERVICE_V4,
        lab::SERVICE_V6,
        port = lab::HTTP_PORT
    );
    let verdict_file = dir.join("clients.json");
    let _ = std::fs::remove_file(&verdict_file);
    let v4 = format!("{}:{}", lab::SERVICE_V4, lab::HTTP_PORT);
    let v6 = format!("[{}]:{}", lab::SERVICE_V6, lab::HTTP_PORT);
    let mut clients = spawn_quiet(
        in_netns(lab, lab::PEER, &bin.join("lab-clients"))
            .args(["--connect", &v4, "--connect", &v6])
            .args(["--keepalive", "4", "--every-ms", "20"])
            .args(["--report", &verdict_file.to_string_lossy()]),
        &dir.join("clients.log"),
    )?;
    eprintln!(
        "    lab-clients in peer: 4 keep-alive clients (a request every 10 ms), a new client every 20 ms"
    );
    std::thread::sleep(Duration::from_secs(1));

    let (_, all_moved, windows) = demo.moves(rounds, pid, &[])?;
    demo.summary();

    cmd::section("verdict (from the clients, which never moved)");
    std::thread::sleep(Duration::from_millis(500));
    let _ = clients.kill();
    let _ = clients.wait();
    let verdict = read_json(&verdict_file).context("reading the clients' verdict")?;
    let longest = windows.iter().copied().fold(0.0, f64::max);
    let slowest = verdict["slowest_connect_ms"].as_f64().unwrap_or(f64::NAN);
    let failures: Vec<&str> = verdict["failures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
        .collect();
    eprintln!(
        "    keep-alive requests {}, new clients {}, failed {}, slowest connect {slowest:.1} ms (longest freeze {longest:.1} ms), connects over 1 s: {}",
        verdict["keepalive_requests"],
        verdict["new_clients"],
        failures.len(),
        verdict["connects_over_1s"]
    );
    for failure in &failures {
        eprintln!("    FAILED: {failure}");
    }
    // NaN (no connect measured) counts as too slow.
    let slow = slowest.is_nan() || slowest > longest + 50.0;
    if !all_moved || !failures.is_empty() || slow {
        bail!(
            "the lab migration of nginx failed (logs and reports in {})",
            dir.display()
        );
    }
    Ok(())
}

pub fn run(root: &Path, prefix: &str, rounds: u32, routed: bool) -> Result<()> {
    let (demo, _guard) = Demo::up(root, prefix, routed)?;
    let Demo { lab, bin, dir, .. } = &demo;
    cmd::section("workload");
    let peer_report = dir.join("peer.json");
    let _ = std::fs::remove_file(&peer_report);
    let (peer_v4, peer_v6) = crate::routed::addresses_of(demo.routed.is_some(), lab::PEER);
    let v4 = format!("{peer_v4}:9000");
    let v6 = format!("[{peer_v6}]:9000");
    spawn_quiet(
        in_netns(lab, lab::PEER, &bin.join("lab-peer")).args([
            "--listen",
            &v4,
            "--listen",
            &v6,
            "--report",
            &peer_report.to_string_lossy(),
        ]),
        &dir.join("peer.log"),
    )?;
    demo.start_agents()?;
    // Its own PID namespace (see the design notes): the restored process
    // can never collide with the PIDs of the one it replaces.
    let mut workload = Command::new("nsenter");
    workload
        .arg(format!("--net={}", lab.netns_path(lab::SRC).display()))
        .args(["unshare", "--pid", "--fork", "setsid"])
        .arg(bin.join("lab-workload"))
        .args(["--from", lab::SERVICE_V4, "--from", lab::SERVICE_V6])
        .args(["--connect", &v4, "--connect", &v6, "--connect", &v4]);
    // /dev/null, not a log file: CRIU refuses to restore a process whose
    // open regular file changed size behind its back after the dump.
    let workload = workload
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the workload")?;
    let pid = wait_for_workload(workload.id() as i32, &peer_report)?;
    eprintln!("    lab-workload pid {pid} in src: 3 connections to peer, echoing");
    std::thread::sleep(Duration::from_secs(1));

    let (pid, all_moved, _) = demo.moves(rounds, pid, &[])?;
    demo.summary();

    cmd::section("verdict (from the peer, which never moved)");
    std::thread::sleep(Duration::from_millis(500));
    let verdict = read_json(&peer_report).context("reading the peer's report")?;
    let mut broken = 0;
    for conn in verdict["connections"].as_array().into_iter().flatten() {
        let pushed = conn["pushed"].as_u64().unwrap_or(0);
        let echoed = conn["echoed"].as_u64().unwrap_or(0);
        let error = conn["error"].as_str();
        if error.is_some() {
            broken += 1;
        }
        eprintln!(
            "    {:<24} pushed {pushed:>9} B, echoed back intact {echoed:>9} B ({} in flight), longest stall {:>6.1} ms, {}",
            conn["remote"].as_str().unwrap_or("?"),
            pushed.saturating_sub(echoed),
            conn["longest_gap_ms"].as_f64().unwrap_or(0.0),
            error.unwrap_or("no reset, no loss")
        );
    }
    eprintln!(
        "    bytes lost: {}, resets: {}",
        if broken == 0 { "0" } else { "SEE ABOVE" },
        verdict["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["error"].as_str() == Some("reset"))
            .count()
    );
    if !all_moved || broken > 0 {
        bail!(
            "the lab migration failed (logs and reports in {})",
            dir.display()
        );
    }
    hiccup(lab, bin, pid)
}

/// After the verdict (so its stall is not counted as the migrations'):
/// what retransmits look like in the live view. The peer's packets are
/// dropped for 1.5 s; the workload's echoes go unacknowledged and our
/// side retransmits (LOCAL RTX), counted without tracefs.
fn hiccup(lab: &lab::Lab, bin: &Path, pid: i32) -> Result<()> {
    cmd::section("live counters through a network hiccup (the peer's packets dropped for 1.5 s)");
    let mut watch = in_netns(lab, lab::SRC, &bin.join("migrator"))
        .args(["watch", "--plain", "--interval", "500ms"])
        .args(["--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .context("starting migrator watch")?;
    std::thread::sleep(Duration::from_millis(300));
    let dropped = lab.start_hiccup().map_err(anyhow::Error::msg);
    if dropped.is_ok() {
        std::thread::sleep(Duration::from_millis(1500));
    }
    let ended = lab.end_hiccup().map_err(anyhow::Error::msg);
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: kill has no memory preconditions; SIGTERM ends watch cleanly.
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    let _ = watch.wait();
    dropped.and(ended)
}

/// The workload's PID (the init of its PID namespace, child of `unshare`)
/// once the peer sees its three connections.
fn wait_for_workload(unshare_pid: i32, peer_report: &Path) -> Result<i32> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let children =
            std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
                .unwrap_or_default();
        let connected = read_json(peer_report)
            .and_then(|r| r["connections"].as_array().map(Vec::len))
            .unwrap_or(0);
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            && connected >= 3
        {
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the workload did not connect to the peer within 10 s (see target/lab/peer.log)")
}
