//! The lab: three "hosts" (`peer`, `src`, `dst`) as network namespaces on
//! a bridge that lives in a fourth namespace, so the root namespace is
//! never touched. IPv4 and IPv6, addresses from 198.18.0.0/15 and
//! 2001:db8::/32 only.
//!
//! ```text
//!  <p>-peer eth0  198.18.0.1  2001:db8::1 ─┐
//!  <p>-src  eth0  198.18.0.2  2001:db8::2 ─┼─ br0 in <p>-br
//!  <p>-dst  eth0  198.18.0.3  2001:db8::3 ─┘
//!  service IP 198.18.0.100/32, 2001:db8::100/128: starts on src
//! ```
//!
//! Every lab with its own prefix is independent (tests run several at
//! once with the same addresses). Std and libc only: `cargo xtask`
//! includes this file too, and must build before anything is installed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub const PEER: &str = "peer";
pub const SRC: &str = "src";
pub const DST: &str = "dst";
pub const HOSTS: [&str; 3] = [PEER, SRC, DST];
/// Every host's interface onto the lab bridge.
pub const IFACE: &str = "eth0";

pub const PEER_V4: &str = "198.18.0.1";
pub const PEER_V6: &str = "2001:db8::1";
pub const SERVICE_V4: &str = "198.18.0.100";
pub const SERVICE_V6: &str = "2001:db8::100";
/// Port the agent listens on, at the destination's management address.
pub const AGENT_PORT: u16 = 7070;
/// Where the lab's nginx listens, on both service addresses.
pub const HTTP_PORT: u16 = 8080;

/// nginx in `host`'s namespace of `lab`, with `conf` ([`nginx_conf`]),
/// in a PID namespace of its own (as the lab's workload: the restored
/// tree never collides with the PIDs of the one it replaces), quiet.
pub fn nginx_command(lab: &Lab, host: &str, conf: &Path) -> std::process::Command {
    let mut command = std::process::Command::new("nsenter");
    command
        .arg(format!("--net={}", lab.netns_path(host).display()))
        .args(["unshare", "--pid", "--fork", "setsid", "nginx", "-c"])
        .arg(conf)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    command
}

/// Debian's nginx as it is run, for the lab: a master and two workers
/// sharing listening sockets on [`HTTP_PORT`] of both service addresses,
/// answering "ok"; its pid file and temporary files in `dir`, nothing
/// written to log files (CRIU refuses a regular file that changed size
/// behind the process's back). The workers run as root: without
/// CAP_SYS_RESOURCE CRIU cannot read another user's resource limits.
pub fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nuser root;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
         error_log /dev/null crit;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 120s;\n  keepalive_requests 1000000;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    listen {SERVICE_V4}:{HTTP_PORT};\n    listen [{SERVICE_V6}]:{HTTP_PORT};\n\
             location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
    )
}

/// Management addresses (v4, v6) of a host.
pub fn host_addresses(host: &str) -> (&'static str, &'static str) {
    match host {
        PEER => (PEER_V4, PEER_V6),
        SRC => ("198.18.0.2", "2001:db8::2"),
        _ => ("198.18.0.3", "2001:db8::3"),
    }
}

/// Write a fresh random token (32 bytes, hex) that only root can read,
/// as `migrator` requires of a token file.
pub fn write_token(path: &Path) -> Result<(), String> {
    use std::{io::Read as _, io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(hex.as_bytes()))
        .map_err(|e| format!("writing the token {}: {e}", path.display()))
}

#[derive(Clone, Debug)]
pub struct Lab {
    pub prefix: String,
}

/// Run `command` to its end; `what` names it in the errors (a failure
/// carries its stderr), `hint` follows a command that cannot start.
pub fn run_checked(command: &mut Command, what: &str, hint: &str) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {what}: {e}{hint}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    run_checked(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
        " (is iproute2 installed?)",
    )
}

impl Lab {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Namespace name of a host (`peer`, `src`, `dst`) or of the bridge.
    pub fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn netns_path(&self, host: &str) -> PathBuf {
        Path::new("/run/netns").join(self.netns(host))
    }

    fn bridge(&self) -> String {
        self.netns("br")
    }

    /// Build the lab from scratch (anything left by an earlier run with the
    /// same prefix is removed first, so this is idempotent).
    pub fn up(&self) -> Result<(), String> {
        self.down()?;
        let bridge = self.bridge();
        ip(&["netns", "add", &bridge])?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for host in HOSTS {
            let ns = self.netns(host);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &bridge, "link", "add", host, "type", "veth", "peer", "name", IFACE, "netns",
                &ns,
            ])?;
            ip(&["-n", &bridge, "link", "set", host, "master", "br0", "up"])?;
            let (v4, v6) = host_addresses(host);
            ip(&["-n", &ns, "addr", "add", &format!("{v4}/24"), "dev", IFACE])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                IFACE,
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", IFACE, "up"])?;
        }
        self.add_service_addresses(SRC)
    }

    /// Give `host` the service addresses (IPv6 without duplicate address
    /// detection, so it is usable at once).
    pub fn add_service_addresses(&self, host: &str) -> Result<(), String> {
        let ns = self.netns(host);
        let v4 = format!("{SERVICE_V4}/32");
        let v6 = format!("{SERVICE_V6}/128");
        ip(&["-n", &ns, "addr", "add", &v4, "dev", IFACE])?;
        ip(&["-n", &ns, "addr", "add", &v6, "dev", IFACE, "nodad"])?;
        Ok(())
    }

    /// Load nftables rules into `host`'s namespace (`nft -f -`).
    pub fn nft(&self, host: &str, rules: &str) -> Result<(), String> {
        use std::io::Write as _;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path(host).display()))
            .args(["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running nft: {e} (is nftables installed?)"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .map_err(|e| format!("nft: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft in {host} refused:\n{rules}\n{}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A network hiccup at the peer: everything its servers send is
    /// dropped until [`Lab::end_hiccup`], so the workload's data goes
    /// unacknowledged and its kernel retransmits.
    pub fn start_hiccup(&self) -> Result<(), String> {
        self.nft(
            PEER,
            "table inet hiccup {\n  chain output {\n    type filter hook output priority 0;\n    tcp sport 9000 drop\n  }\n}\n",
        )
    }

    pub fn end_hiccup(&self) -> Result<(), String> {
        self.nft(PEER, "delete table inet hiccup\n")
    }

    /// Remove everything: processes still in the lab's namespaces, the
    /// data plane pins made for them, the namespaces (and with them every
    /// link). Safe to run at any time, also after a crash.
    pub fn down(&self) -> Result<(), String> {
        let names: Vec<String> = HOSTS
            .iter()
            .copied()
            .chain(["br"])
            .map(|host| self.netns(host))
            .collect();
        remove_namespaces(&names)
    }
}

/// Remove network namespaces (by name) and what lives in them: their
/// processes, the data plane pins made for them; then reap what was ours.
/// Missing ones are skipped.
pub fn remove_namespaces(names: &[String]) -> Result<(), String> {
    for name in names {
        let path = Path::new("/run/netns").join(name);
        if !path.exists() {
            continue;
        }
        kill_processes_in(&path);
        if let Some(pins) = pin_root_of(&path) {
            let _ = std::fs::remove_dir_all(pins);
        }
        ip(&["netns", "del", name])?;
    }
    // What was killed and was ours (directly or as orphans) goes now.
    std::thread::sleep(std::time::Duration::from_millis(50));
    reap_exited_children();
    Ok(())
}

/// Where an agent links its cache of CRIU's kernel probes (on a host
/// whose `/run` is no tmpfs).
pub const CRIU_KDAT_LINK: &str = "/run/criu.kdat";

/// What a killed migrate or agent leaves of itself under `dir`, which
/// would otherwise outlive the lab: every mount there is unmounted
/// (lazily), the tmpfs of its state directory (images, CRIU's
/// kernel-probe cache), and CRIU's `/run/criu.kdat` is removed if it
/// links into `dir` (an agent publishes its cache there).
pub fn clear_leftovers_under(dir: &Path) {
    let kdat = Path::new(CRIU_KDAT_LINK);
    if std::fs::read_link(kdat).is_ok_and(|target| target.starts_with(dir)) {
        let _ = std::fs::remove_file(kdat);
    }
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for target in mounts.lines().filter_map(|line| line.split(' ').nth(1)) {
        if Path::new(target).starts_with(dir) {
            let _ = Command::new("umount").args(["-l", target]).status();
        }
    }
}

/// Make this process the reaper of every process it starts, however deep
/// (lab workloads outlive their launchers, agents' restored processes
/// outlive the agents): without it, what the lab kills on the way down is
/// left to PID 1, which on some machines never reaps it.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a plain integer.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reap every child that has exited (for a subreaper: orphans too).
pub fn reap_exited_children() {
    // SAFETY: waitpid with WNOHANG and no status pointer.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// Where migrator pins its data plane for the namespace at `path`.
pub fn pin_root_of(netns_path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(netns_path).ok()?.ino();
    // The path of migrator's `dataplane::default_pin_root` (this file
    // builds inside xtask too, which cannot depend on migrator).
    Some(Path::new("/sys/fs/bpf/migrator").join(format!("netns-{inode}")))
}

/// SIGKILL every process whose network namespace is the one at `path`.
fn kill_processes_in(netns_path: &Path) {
    for pid in processes_in(netns_path) {
        // SAFETY: kill has no memory preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Every process whose network namespace is the one at `netns_path`.
pub fn processes_in(netns_path: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(target) = std::fs::metadata(netns_path).map(|m| (m.dev(), m.ino())) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let ns = std::fs::metadata(entry.path().join("ns/net")).map(|m| (m.dev(), m.ino()));
            ns.is_ok_and(|ns| ns == target).then_some(pid)
        })
        .collect()
}
