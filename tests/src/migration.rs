//! A lab for migration tests: the `lab` topology under a prefix of the
//! test's own, the lab peer (servers that push and verify echoes), agents
//! on `src` and `dst`, and the workload. Everything is removed on drop,
//! pass or fail: processes, namespaces, pins, images.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    TempDir,
    lab::{self, Lab},
    migrator_bin,
};

/// How the lab's hosts prove who they are.
#[derive(Clone, Debug)]
pub enum LabAuth {
    /// The shared token file (the default).
    Token,
    /// `DIR/ca.crt`, and per host `DIR/HOST.crt` and `DIR/HOST.key`.
    Certificates(PathBuf),
}

pub struct MigrationLab {
    pub lab: Lab,
    pub dir: TempDir,
    pub token: PathBuf,
    pub auth: LabAuth,
    children: Vec<Child>,
    /// Processes a reaper thread waits for (killed by PID on drop).
    reaped: Vec<i32>,
    /// (host, PID) of each agent started.
    agents: Vec<(String, u32)>,
    /// Set on drop: the orphan reaper stops.
    stop_reaping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The routed lab (BGP takeover) instead of the shared link.
    pub routed: Option<crate::routed::RoutedLab>,
}

fn sibling_bin(name: &str) -> PathBuf {
    migrator_bin().with_file_name(name)
}

impl MigrationLab {
    /// Lab up, peer servers on :9000 (v4 and v6), agents on src and dst.
    pub fn new(tag: &str) -> Self {
        Self::new_with(tag, |_| LabAuth::Token)
    }

    /// As `new`, with the hosts' credentials made in the lab's directory
    /// by `auth` before the agents start.
    pub fn new_with(tag: &str, auth: impl FnOnce(&Path) -> LabAuth) -> Self {
        Self::build(tag, auth, false)
    }

    /// As `new`, in the routed lab ([`crate::routed`]): the peer behind a
    /// router, the addresses taken over by BGP (`--takeover bgp`).
    pub fn new_routed(tag: &str) -> Self {
        Self::build(tag, |_| LabAuth::Token, true)
    }

    fn build(tag: &str, auth: impl FnOnce(&Path) -> LabAuth, routed: bool) -> Self {
        crate::require_root();
        lab::become_subreaper();
        let prefix = format!("mt{tag}{}", std::process::id());
        let lab = Lab::new(&prefix);
        let routed = routed.then(|| {
            let routed = crate::routed::RoutedLab::new(&prefix);
            routed.up().expect("routed lab up");
            routed
        });
        if routed.is_none() {
            lab.up().expect("lab up");
        }
        let dir = TempDir::new(&format!("mig-{tag}"));
        let token = dir.0.join("token");
        lab::write_token(&token).unwrap();
        let auth = auth(&dir.0);
        let mut this = Self {
            lab,
            dir,
            token,
            auth,
            children: Vec::new(),
            reaped: Vec::new(),
            agents: Vec::new(),
            stop_reaping: Default::default(),
            routed,
        };
        let report = this.peer_report_path();
        let (v4, v6) = this.peer_addresses();
        let peer = this.spawn(
            lab::PEER,
            &sibling_bin("lab-peer"),
            &[
                "--listen",
                &format!("{v4}:9000"),
                "--listen",
                &format!("[{v6}]:9000"),
                "--report",
                report.to_str().unwrap(),
            ],
        );
        this.children.push(peer);
        for host in [lab::SRC, lab::DST] {
            this.start_agent(host);
        }
        this
    }

    /// The peer's addresses (v4, v6).
    pub fn peer_addresses(&self) -> (String, String) {
        crate::routed::addresses_of(self.routed.is_some(), lab::PEER)
    }

    /// A host's management address (IPv4), where its agent listens.
    pub fn host_address(&self, host: &str) -> String {
        crate::routed::addresses_of(self.routed.is_some(), host).0
    }

    /// The credentials arguments of `host`.
    pub fn auth_args(&self, host: &str) -> Vec<String> {
        match &self.auth {
            LabAuth::Token => vec!["--token-file".into(), self.token.display().to_string()],
            LabAuth::Certificates(dir) => {
                let file = |name: String| dir.join(name).display().to_string();
                vec![
                    "--cert".into(),
                    file(format!("{host}.crt")),
                    "--key".into(),
                    file(format!("{host}.key")),
                    "--ca".into(),
                    file("ca.crt".into()),
                ]
            }
        }
    }

    /// Stop the agent of `host` (SIGTERM, as a service manager would) and
    /// return how it exited.
    pub fn stop_agent(&mut self, host: &str) -> Option<std::process::ExitStatus> {
        let at = self.agents.iter().position(|(h, _)| h == host)?;
        let (_, pid) = self.agents.remove(at);
        let child = self.children.iter().position(|c| c.id() == pid)?;
        let mut child = self.children.remove(child);
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        child.wait().ok()
    }

    pub fn start_agent(&mut self, host: &str) {
        self.start_agent_with(host, &[]);
    }

    /// An agent on `host` with extra arguments (policy, limits).
    pub fn start_agent_with(&mut self, host: &str, extra: &[&str]) {
        self.start_agent_injecting(host, extra, None);
    }

    /// An agent on `host` with faults injected (`MIGRATOR_FAULTS`).
    pub fn start_agent_injecting(&mut self, host: &str, extra: &[&str], faults: Option<&str>) {
        let listen = format!("{}:{}", self.host_address(host), lab::AGENT_PORT);
        let work = self.dir.0.join(format!("agent-{host}"));
        let auth = self.auth_args(host);
        let mut args = vec!["agent", "--listen", &listen];
        let bgp = self
            .routed
            .as_ref()
            .map(|routed| routed.agent_args(host))
            .unwrap_or_default();
        args.extend(bgp.iter().map(String::as_str));
        if !extra.contains(&"--work-dir") {
            args.extend(["--work-dir", work.to_str().unwrap()]);
        }
        args.extend(auth.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let agent = self.spawn_with(host, &migrator_bin(), &args, faults);
        self.agents.push((host.to_owned(), agent.id()));
        self.children.push(agent);
        // Ready once it listens.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let ss = self.output(
                host,
                "ss",
                &["-Htln", &format!("sport = :{}", lab::AGENT_PORT)],
            );
            if !String::from_utf8_lossy(&ss.stdout).trim().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the agent on {host} did not start listening");
    }

    pub fn peer_report_path(&self) -> PathBuf {
        self.dir.0.join("peer.json")
    }

    fn spawn(&self, host: &str, program: &std::path::Path, args: &[&str]) -> Child {
        self.spawn_with(host, program, args, None)
    }

    fn spawn_with(
        &self,
        host: &str,
        program: &std::path::Path,
        args: &[&str],
        faults: Option<&str>,
    ) -> Child {
        let log = std::fs::File::create(self.dir.0.join(format!(
            "{host}-{}.log",
            program.file_name().unwrap().to_string_lossy()
        )))
        .unwrap();
        let mut command = Command::new("nsenter");
        if let Some(faults) = faults {
            command.env("MIGRATOR_FAULTS", faults);
        }
        command
            .arg(format!("--net={}", self.lab.netns_path(host).display()))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Run a command in a host's namespace and wait for it.
    pub fn output(&self, host: &str, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.lab.netns_path(host).display()))
            .arg(program)
            .args(args)
            .output()
            .unwrap()
    }

    /// Load nftables rules into a host's namespace (`nft -f -`).
    pub fn nft(&self, host: &str, rules: &str) {
        self.lab.nft(host, rules).unwrap();
    }

    /// Start the workload in `src` with connections to the peer (v4, v6,
    /// v4). `own_pid_namespace`: as the lab does (`unshare --pid --fork`);
    /// otherwise a plain session leader. Returns its PID once the peer
    /// sees every connection.
    pub fn start_workload(&mut self, own_pid_namespace: bool, ballast_mb: u32) -> i32 {
        self.start(Workload {
            own_pid_namespace,
            ballast_mb,
            ..Workload::default()
        })
    }

    /// `reap`: false leaves a plain workload's exit unreaped (a launcher
    /// that does not wait), so its PID stays taken after a dump.
    pub fn start_workload_reaped(
        &mut self,
        own_pid_namespace: bool,
        ballast_mb: u32,
        reap: bool,
    ) -> i32 {
        self.start(Workload {
            own_pid_namespace,
            ballast_mb,
            unreaped: !reap,
            ..Workload::default()
        })
    }

    /// A plain (reaped) workload with `children` idle child processes: a
    /// tree of several processes, its PIDs shared with the agents.
    pub fn start_workload_tree(&mut self, ballast_mb: u32, children: u32) -> i32 {
        self.start(Workload {
            ballast_mb,
            children,
            ..Workload::default()
        })
    }

    /// Debian's nginx on `src` ([`lab::nginx_conf`]), in a PID namespace
    /// of its own. Returns the master's PID once it listens.
    pub fn start_nginx(&mut self) -> i32 {
        let dir = self.dir.0.join("nginx");
        std::fs::create_dir_all(&dir).unwrap();
        let conf = lab::nginx_conf(&dir);
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = lab::nginx_command(&self.lab, lab::SRC, &conf_path)
            .spawn()
            .unwrap();
        let launcher = child.id() as i32;
        self.children.push(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let ss = self.output(lab::SRC, "ss", &["-Htln", &format!("sport = :{HTTP_PORT}")]);
            let listening = String::from_utf8_lossy(&ss.stdout).lines().count() >= 2;
            let master =
                std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
                    .ok()
                    .and_then(|c| c.split_whitespace().next()?.parse::<i32>().ok());
            if let (true, Some(master)) = (listening, master)
                && migrator::system::process_tree(master).len() >= 3
            {
                return master;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nginx did not start listening on {HTTP_PORT}");
    }

    /// Start a workload as `workload` says; returns its PID once the peer
    /// sees its three connections.
    pub fn start(&mut self, workload: Workload) -> i32 {
        let Workload {
            own_pid_namespace,
            ballast_mb,
            unreaped,
            children,
            no_setsid,
            stdout,
            uid,
            marker,
            listen,
        } = workload;
        let reap = !unreaped;
        let (peer_v4, peer_v6) = self.peer_addresses();
        let v4 = format!("{peer_v4}:9000");
        let v6 = format!("[{peer_v6}]:9000");
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.lab.netns_path(lab::SRC).display()));
        if own_pid_namespace {
            command.args(["unshare", "--pid", "--fork"]);
        }
        if !no_setsid {
            command.arg("setsid");
        }
        if let Some(uid) = uid {
            command.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]);
        }
        let stdout = match stdout {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            // Never a shared log file: CRIU refuses files that changed size.
            None => Stdio::null(),
        };
        command
            .arg(sibling_bin("lab-workload"))
            .args(["--from", lab::SERVICE_V4, "--from", lab::SERVICE_V6])
            .args(["--connect", &v4, "--connect", &v6, "--connect", &v4])
            .args(["--ballast-mb", &ballast_mb.to_string()])
            .args(["--children", &children.to_string()])
            .args(marker.iter().flat_map(|m| ["--marker", m.as_str()]))
            .args(
                listen
                    .then(|| {
                        [
                            "--listen".to_owned(),
                            format!("{}:{SERVICE_PORT}", lab::SERVICE_V4),
                            "--listen".to_owned(),
                            format!("[{}]:{SERVICE_PORT}", lab::SERVICE_V6),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null());
        let before = self.peer_connections().len();
        let mut child = command.spawn().unwrap();
        let launcher = child.id() as i32;
        if own_pid_namespace || !reap {
            self.children.push(child);
        } else {
            // The plain workload is our child: reap it the moment CRIU's
            // dump ends it, as a launcher must, or its PID stays taken.
            self.reaped.push(launcher);
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if self.peer_connections().len() >= before + 3
                && let Some(pid) = workload_pid(launcher)
            {
                if reap && !own_pid_namespace {
                    // The tree less its root (which the launcher reaps).
                    self.reap_orphans(migrator::system::process_tree(pid).split_off(1));
                }
                return pid;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the workload did not connect");
    }

    /// Play init for the workload's descendants: when CRIU's dump ends the
    /// tree, they are orphans of ours (we are a subreaper), and their PIDs
    /// stay taken until someone reaps them. Polls those PIDs only, so the
    /// tests' own child processes keep their exit statuses.
    fn reap_orphans(&self, pids: Vec<i32>) {
        if pids.is_empty() {
            return;
        }
        let stop = self.stop_reaping.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for pid in &pids {
                    // SAFETY: waitpid with WNOHANG and no status pointer;
                    // fails harmlessly for a PID that is not our child.
                    unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG) };
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }

    /// Wait for (reap) a child started without a reaper.
    pub fn reap(&mut self, pid: i32) {
        if let Some(at) = self.children.iter().position(|c| c.id() as i32 == pid) {
            let mut child = self.children.remove(at);
            let _ = child.wait();
        }
    }

    /// The peer's view of the workload's current connections (the last
    /// three it accepted).
    pub fn current_connections(&self) -> Vec<Value> {
        let all = self.peer_connections();
        all[all.len().saturating_sub(3)..].to_vec()
    }

    /// The peer's view of every connection.
    pub fn peer_connections(&self) -> Vec<Value> {
        std::fs::read_to_string(self.peer_report_path())
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|report| report["connections"].as_array().cloned())
            .unwrap_or_default()
    }

    /// `migrator migrate` from `from` to the agent on `to`; returns the
    /// exit status, the report (if written) and stderr.
    pub fn migrate(&self, from: &str, to: &str, pid: i32, extra: &[&str]) -> MigrateRun {
        let target = format!("{}:{}", self.host_address(to), lab::AGENT_PORT);
        self.migrate_via(from, &target, pid, extra)
    }

    /// `migrator migrate` from `from` to the agent at `target` (ADDR:PORT:
    /// an agent, or something in between).
    pub fn migrate_via(&self, from: &str, target: &str, pid: i32, extra: &[&str]) -> MigrateRun {
        self.run_migrate(from, target, pid, None, extra)
    }

    /// [`Self::migrate`] with faults injected (`MIGRATOR_FAULTS`).
    pub fn migrate_with_faults(
        &self,
        from: &str,
        to: &str,
        pid: i32,
        faults: &str,
        extra: &[&str],
    ) -> MigrateRun {
        let target = format!("{}:{}", self.host_address(to), lab::AGENT_PORT);
        self.run_migrate(from, &target, pid, Some(faults), extra)
    }

    fn run_migrate(
        &self,
        from: &str,
        target: &str,
        pid: i32,
        faults: Option<&str>,
        extra: &[&str],
    ) -> MigrateRun {
        let report = self.dir.0.join("report.json");
        let _ = std::fs::remove_file(&report);
        let images = self.dir.0.join("images");
        let pid = pid.to_string();
        let auth = self.auth_args(from);
        let bin = migrator_bin();
        let faults = faults.map(|faults| format!("MIGRATOR_FAULTS={faults}"));
        let mut args = Vec::new();
        if let Some(faults) = &faults {
            args.extend([faults.as_str(), bin.to_str().unwrap()]);
        }
        args.extend(["migrate", "--pid", &pid, "--to", target]);
        args.extend(auth.iter().map(String::as_str));
        args.extend_from_slice(&[
            "--ip",
            lab::SERVICE_V4,
            "--ip",
            lab::SERVICE_V6,
            "--report",
            report.to_str().unwrap(),
            "--work-dir",
            images.to_str().unwrap(),
        ]);
        let bgp = self
            .routed
            .as_ref()
            .map(|routed| routed.migrate_args(from))
            .unwrap_or_default();
        args.extend(bgp.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let program = if faults.is_some() {
            "env"
        } else {
            bin.to_str().unwrap()
        };
        let out = self.output(from, program, &args);
        MigrateRun {
            success: out.status.success(),
            code: out.status.code(),
            report: std::fs::read_to_string(&report)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok()),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `migrator recover` on `host`, with the images a failed migration's
    /// error names (`migrator recover --images DIR`) and the lab's service
    /// addresses; panics unless it succeeds.
    pub fn recover_as_told(&self, host: &str, error: &str) {
        let images = error
            .split("migrator recover --images ")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .unwrap_or_else(|| panic!("no recover command in: {error}"))
            .to_owned();
        let out = self.output(
            host,
            migrator_bin().to_str().unwrap(),
            &[
                "recover",
                "--images",
                &images,
                "--ip",
                lab::SERVICE_V4,
                "--ip",
                lab::SERVICE_V6,
                "--iface",
                lab::IFACE,
            ],
        );
        assert!(
            out.status.success(),
            "recover: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The network namespace inode a process lives in.
    pub fn netns_of(pid: i32) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|m| m.ino())
    }

    pub fn netns_inode(&self, host: &str) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.lab.netns_path(host)).unwrap().ino()
    }

    /// Whether a host has pins left (a lock or an attachment).
    pub fn pins_left(&self, host: &str) -> bool {
        lab::pin_root_of(&self.lab.netns_path(host)).is_some_and(|root| root.exists())
    }

    /// Every connection alive with an intact byte stream, and moving again:
    /// each echo grows past where it was. After a long freeze the peer only
    /// resumes at its next backed-off retransmit, so this waits (up to `wait`
    /// plus that backoff) rather than asserting a time.
    pub fn assert_streams_intact_and_flowing(&self, wait: Duration) {
        let before: Vec<u64> = self
            .peer_connections()
            .iter()
            .map(|c| c["echoed"].as_u64().unwrap())
            .collect();
        let started = std::time::Instant::now();
        let patience = wait + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.peer_connections();
            assert_eq!(now.len(), 3, "the peer sees other connections: {now:?}");
            for conn in &now {
                assert_eq!(
                    conn["error"],
                    serde_json::Value::Null,
                    "connection broken: {conn}"
                );
            }
            let grown = now
                .iter()
                .zip(&before)
                .all(|(conn, before)| conn["echoed"].as_u64().unwrap() > *before);
            if grown && started.elapsed() >= wait {
                return;
            }
            assert!(
                started.elapsed() < patience,
                "no bytes echoed any more after {patience:?}: {now:?}"
            );
        }
    }

    pub fn has_address(&self, host: &str, ip: &str) -> bool {
        let out = self.output(host, "ip", &["-o", "addr", "show"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/"))
    }
}

/// The workload process under its launcher (nsenter execs into unshare or
/// setsid; with unshare, the workload is its child).
/// `/proc/PID/status` of every `lab-workload` process in these network
/// namespaces (by inode): other tests run workloads of their own.
pub fn workload_statuses(netns: &[u64]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| netns.contains(&m.ino()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|status| status.lines().next() == Some("Name:\tlab-workload"))
        .collect()
}

fn workload_pid(launcher: i32) -> Option<i32> {
    let comm = std::fs::read_to_string(format!("/proc/{launcher}/comm")).ok()?;
    if comm.trim() == "lab-workload" {
        return Some(launcher);
    }
    let children =
        std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// How to start a lab workload; the default is the lab's: a plain
/// process in a session of its own, reaped by its launcher, no ballast.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// In a PID namespace of its own (`unshare --pid --fork`).
    pub own_pid_namespace: bool,
    /// MiB of written memory, for images that take a while.
    pub ballast_mb: u32,
    /// A launcher that never waits: the PID stays taken after a dump.
    pub unreaped: bool,
    /// Idle child processes (a tree of several processes).
    pub children: u32,
    /// Started as from a shell: no session of its own.
    pub no_setsid: bool,
    /// Standard output appended to this file instead of /dev/null.
    pub stdout: Option<PathBuf>,
    /// Run as this uid (and gid) instead of root.
    pub uid: Option<u32>,
    /// Text the workload keeps in its memory.
    pub marker: Option<String>,
    /// Also a server: accepts and echoes on [`SERVICE_PORT`] of both
    /// service addresses.
    pub listen: bool,
}

/// The port the workload listens on as a server (`Workload::listen`).
pub const SERVICE_PORT: u16 = 7000;

pub use crate::lab::HTTP_PORT;

pub struct MigrateRun {
    pub success: bool,
    /// The exit status (None if killed by a signal).
    pub code: Option<i32>,
    pub report: Option<Value>,
    pub stderr: String,
}

impl Drop for MigrationLab {
    fn drop(&mut self) {
        self.stop_reaping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for pid in &self.reaped {
            // The workload's tree, wherever it was last restored.
            migrator::system::kill_tree(*pid);
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.lab.down();
    }
}
