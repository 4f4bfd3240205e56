//! The routed lab: no shared link between the peer and the service. A
//! router namespace runs BIRD with a BGP session to BIRD on `src` and on
//! `dst`; each of those announces the service addresses it holds as host
//! routes, and the peer sits on a subnet of its own behind the router.
//! IPv4 and IPv6, addresses from 198.18.0.0/15 and 2001:db8::/32 only.
//!
//! ```text
//!  <p>-src  eth0 198.18.1.2 2001:db8:1::2 ── rt-src 198.18.1.1 ┐
//!  <p>-dst  eth0 198.18.2.2 2001:db8:2::2 ── rt-dst 198.18.2.1 ├ <p>-rt (BIRD, AS 65000)
//!  <p>-peer eth0 198.18.3.2 2001:db8:3::2 ── rt-peer 198.18.3.1 ┘
//!  src (AS 65001), dst (AS 65002): BIRD, `svc0` holding the service
//!  addresses 198.18.0.100/32, 2001:db8::100/128 (on src at first)
//! ```
//!
//! How a host announces an address: BIRD's `direct` protocol watches
//! `svc0` and exports every address on it, filtered to the service
//! prefixes, to its BGP sessions; adding an address to `svc0` announces
//! it, removing it withdraws it, and BIRD is never restarted or
//! reconfigured for a move. (`svc0` is one end of a veth pair: this
//! kernel has no `dummy` links.) The router installs what it learns in
//! its kernel table. Timers are tuned for a lab: keepalive 1 s, hold 3 s,
//! retry at once; updates go out as soon as the address changes, so a
//! move converges in about 10 ms here.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{ip, remove_namespaces, run_checked};

pub const ROUTER: &str = "rt";
pub const SRC: &str = "src";
pub const DST: &str = "dst";
pub const PEER: &str = "peer";
/// The hosts behind the router, with their subnet number.
const HOSTS: [(&str, u8); 3] = [(SRC, 1), (DST, 2), (PEER, 3)];
pub const SERVICE_V4: &str = "198.18.0.100";
pub const SERVICE_V6: &str = "2001:db8::100";
/// The link BIRD's `direct` protocol announces addresses from.
pub const SERVICE_LINK: &str = "svc0";
/// The hosts' link to the router.
pub const UPLINK: &str = "eth0";

/// A host's address on its subnet (v4, v6).
pub fn host_addresses(host: &str) -> (String, String) {
    let net = subnet(host);
    (format!("198.18.{net}.2"), format!("2001:db8:{net}::2"))
}

/// A host's addresses (v4, v6) in the routed lab or, if not `routed`, on
/// the shared link ([`crate::lab::host_addresses`]).
pub fn addresses_of(routed: bool, host: &str) -> (String, String) {
    if routed {
        host_addresses(host)
    } else {
        let (v4, v6) = crate::lab::host_addresses(host);
        (v4.to_owned(), v6.to_owned())
    }
}

fn subnet(host: &str) -> u8 {
    HOSTS
        .iter()
        .find(|(name, _)| *name == host)
        .map_or(0, |(_, net)| *net)
}

pub struct RoutedLab {
    pub prefix: String,
    /// BIRD's configurations and control sockets.
    dir: PathBuf,
}

/// What the router takes from a host's sessions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RouterImport {
    All,
    /// Every announcement refused (a filter gone wrong, a peer policy).
    Nothing,
}

impl RoutedLab {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            dir: std::env::temp_dir().join(format!("migrator-routed-{prefix}")),
        }
    }

    pub fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn netns_path(&self, host: &str) -> PathBuf {
        Path::new("/run/netns").join(self.netns(host))
    }

    /// BIRD's control socket on `host` (what `birdc -s` and
    /// `--takeover bgp` are given).
    pub fn bird_socket(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.ctl"))
    }

    /// What the agent on `host` is started with here: the uplink for its
    /// lock, its BIRD and the link that BIRD announces from.
    pub fn agent_args(&self, host: &str) -> Vec<String> {
        let mut args = self.uplink_and_bird(host);
        args.extend(["--service-link".to_owned(), SERVICE_LINK.to_owned()]);
        args
    }

    /// What `migrate` from `host` is given here: BGP takeover, its BIRD.
    pub fn migrate_args(&self, host: &str) -> Vec<String> {
        let mut args = self.uplink_and_bird(host);
        args.extend(["--takeover".to_owned(), "bgp".to_owned()]);
        args
    }

    fn uplink_and_bird(&self, host: &str) -> Vec<String> {
        vec![
            "--iface".to_owned(),
            UPLINK.to_owned(),
            "--bird-socket".to_owned(),
            self.bird_socket(host).display().to_string(),
        ]
    }

    /// Build it from scratch (anything left by an earlier run with the
    /// same prefix goes first) and wait for every BGP session.
    pub fn up(&self) -> Result<(), String> {
        self.down()?;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let router = self.netns(ROUTER);
        ip(&["netns", "add", &router])?;
        ip(&["-n", &router, "link", "set", "lo", "up"])?;
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
            sysctl(&self.netns_path(ROUTER), key, "1")?;
        }
        for (host, net) in HOSTS {
            let ns = self.netns(host);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let side = format!("rt-{host}");
            ip(&[
                "-n", &router, "link", "add", &side, "type", "veth", "peer", "name", UPLINK,
                "netns", &ns,
            ])?;
            for (namespace, link, last) in [(&router, side.as_str(), 1), (&ns, UPLINK, 2)] {
                let v4 = format!("198.18.{net}.{last}/24");
                let v6 = format!("2001:db8:{net}::{last}/64");
                ip(&["-n", namespace, "addr", "add", &v4, "dev", link])?;
                ip(&["-n", namespace, "addr", "add", &v6, "dev", link, "nodad"])?;
                ip(&["-n", namespace, "link", "set", link, "up"])?;
            }
            let gw4 = format!("198.18.{net}.1");
            let gw6 = format!("2001:db8:{net}::1");
            ip(&["-n", &ns, "route", "add", "default", "via", &gw4])?;
            ip(&["-n", &ns, "-6", "route", "add", "default", "via", &gw6])?;
            if host != PEER {
                ip(&[
                    "-n",
                    &ns,
                    "link",
                    "add",
                    SERVICE_LINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "svc0-end",
                ])?;
                ip(&["-n", &ns, "link", "set", SERVICE_LINK, "up"])?;
                ip(&["-n", &ns, "link", "set", "svc0-end", "up"])?;
            }
        }
        for host in [ROUTER, SRC, DST] {
            self.start_bird(host)?;
        }
        self.add_service_addresses(SRC)?;
        self.wait_for_sessions(Duration::from_secs(15))?;
        // A session is up a moment before its first routes are in.
        let started = Instant::now();
        while [SERVICE_V4, SERVICE_V6]
            .iter()
            .any(|address| self.route_points_at(address) != Some(SRC))
        {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "the router has no routes to src for the service addresses after 10 s: {:?} / {:?}",
                    self.route_points_at(SERVICE_V4),
                    self.route_points_at(SERVICE_V6)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn bird_config(&self, host: &str) -> String {
        self.bird_config_with(host, |_| RouterImport::All)
    }

    fn bird_config_with(&self, host: &str, import: impl Fn(&str) -> RouterImport) -> String {
        let timers = "hold time 3; keepalive time 1; connect retry time 1; connect delay time 0; error wait time 1, 2;";
        if host == ROUTER {
            let mut conf = format!(
                "router id 198.18.1.1;\nprotocol device {{ scan time 10; }}\n\
                 protocol kernel {{ ipv4 {{ export all; import none; }}; }}\n\
                 protocol kernel {{ ipv6 {{ export all; import none; }}; }}\n\
                 template bgp host {{ local as 65000; {timers} }}\n"
            );
            for (name, net) in [(SRC, 1u8), (DST, 2u8)] {
                let asn = 65000 + u32::from(net);
                let import = match import(name) {
                    RouterImport::All => "all",
                    RouterImport::Nothing => "none",
                };
                conf.push_str(&format!(
                    "protocol bgp {name}4 from host {{ neighbor 198.18.{net}.2 as {asn}; ipv4 {{ import {import}; export none; }}; }}\n\
                     protocol bgp {name}6 from host {{ neighbor 2001:db8:{net}::2 as {asn}; ipv6 {{ import {import}; export none; }}; }}\n"
                ));
            }
            conf
        } else {
            let net = subnet(host);
            let asn = 65000 + u32::from(net);
            format!(
                "router id 198.18.{net}.2;\nprotocol device {{ scan time 10; }}\n\
                 protocol direct {{ interface \"{SERVICE_LINK}\"; ipv4; ipv6; }}\n\
                 template bgp up {{ local as {asn}; {timers} }}\n\
                 protocol bgp up4 from up {{ neighbor 198.18.{net}.1 as 65000; ipv4 {{ import none; export where net ~ [ {SERVICE_V4}/32 ]; }}; }}\n\
                 protocol bgp up6 from up {{ neighbor 2001:db8:{net}::1 as 65000; ipv6 {{ import none; export where net ~ [ {SERVICE_V6}/128 ]; }}; }}\n"
            )
        }
    }

    fn start_bird(&self, host: &str) -> Result<(), String> {
        let conf = self.dir.join(format!("{host}.conf"));
        std::fs::write(&conf, self.bird_config(host))
            .map_err(|e| format!("{}: {e}", conf.display()))?;
        let pid = self.dir.join(format!("{host}.pid"));
        run_checked(
            Command::new("nsenter")
                .arg(format!("--net={}", self.netns_path(host).display()))
                .arg("bird")
                .arg("-c")
                .arg(&conf)
                .arg("-s")
                .arg(self.bird_socket(host))
                .arg("-P")
                .arg(&pid),
            &format!("bird on {host}"),
            " (`cargo xtask setup` installs bird2)",
        )
    }

    /// Change what the router imports from `host`'s sessions, the way an
    /// operator would: a new configuration, `birdc configure` (no restart;
    /// the sessions stay up).
    pub fn router_imports_from(&self, host: &str, import: RouterImport) -> Result<(), String> {
        let conf = self.dir.join(format!("{ROUTER}.conf"));
        let text = self.bird_config_with(ROUTER, |name| {
            if name == host {
                import
            } else {
                RouterImport::All
            }
        });
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let reply = self.birdc(ROUTER, "configure")?;
        if reply.contains("Reconfigured") || reply.contains("Reconfiguration in progress") {
            Ok(())
        } else {
            Err(format!("birdc configure on the router: {reply}"))
        }
    }

    /// `birdc` on `host`, its output.
    pub fn birdc(&self, host: &str, command: &str) -> Result<String, String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(self.bird_socket(host))
            .args(command.split_whitespace())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running birdc: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("birdc {command} on {host}: {text}"))
        }
    }

    fn wait_for_sessions(&self, patience: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let protocols = self.birdc(ROUTER, "show protocols").unwrap_or_default();
            let established = protocols
                .lines()
                .filter(|line| line.contains("BGP") && line.contains("Established"))
                .count();
            if established == 4 {
                return Ok(());
            }
            if started.elapsed() > patience {
                return Err(format!(
                    "the router's BGP sessions did not all come up in {patience:?}:\n{protocols}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Put the service addresses on `host`'s announcing link (BIRD
    /// announces them).
    pub fn add_service_addresses(&self, host: &str) -> Result<(), String> {
        self.service_addresses(host, "add")
    }

    /// Take them off it (BIRD withdraws them).
    pub fn remove_service_addresses(&self, host: &str) -> Result<(), String> {
        self.service_addresses(host, "del")
    }

    fn service_addresses(&self, host: &str, action: &str) -> Result<(), String> {
        let ns = self.netns(host);
        for address in [format!("{SERVICE_V4}/32"), format!("{SERVICE_V6}/128")] {
            let mut args = vec!["-n", &ns, "addr", action, &address, "dev", SERVICE_LINK];
            if action == "add" && address.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        Ok(())
    }

    /// Which host the router's kernel route for `address` points at, if
    /// it has one.
    pub fn route_points_at(&self, address: &str) -> Option<&'static str> {
        let out = Command::new("ip")
            .args(["-n", &self.netns(ROUTER), "route", "get", address])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        HOSTS
            .iter()
            .map(|(host, _)| *host)
            .find(|host| text.contains(&format!("dev rt-{host} ")))
    }

    /// Remove everything: BIRD and anything else running in the lab's
    /// namespaces, the namespaces (and their links), BIRD's files.
    pub fn down(&self) -> Result<(), String> {
        let names: Vec<String> = [ROUTER, SRC, DST, PEER]
            .iter()
            .map(|host| self.netns(host))
            .collect();
        remove_namespaces(&names)?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl RoutedLab {
    /// Leave the lab up when this value goes (`cargo xtask lab up
    /// --routed`); `down` removes it later.
    pub fn leave_up(self) {
        std::mem::forget(self);
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

fn sysctl(netns: &Path, key: &str, value: &str) -> Result<(), String> {
    run_checked(
        Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["sysctl", "-qw", &format!("{key}={value}")]),
        &format!("sysctl {key}"),
        "",
    )
}
