//! `migrator doctor`: one line per precondition of a migration, each with
//! OK / WARN / FAIL and, for anything not OK, the fix.

use std::path::Path;

use serde::Serialize;

use crate::{
    criu,
    dataplane::{Dataplane, RetransmitCounter},
    system::{self, KernelVersion},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// False when at least one check failed: a migration cannot work here.
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// Human form: aligned columns, fixes indented under failures.
    pub fn render(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for check in &self.checks {
            let status = match check.status {
                Status::Ok => "OK  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            out.push_str(&format!(
                "{status}  {:<width$}  {}\n",
                check.name, check.detail
            ));
            if let Some(fix) = &check.fix {
                out.push_str(&format!("      {:<width$}  fix: {fix}\n", ""));
            }
        }
        out.push_str(if self.ok {
            "migration preconditions hold on this host\n"
        } else {
            "migration cannot work on this host until the FAIL lines are fixed\n"
        });
        out
    }
}

/// Run every check. `criu_flag` is `--criu PATH`, if given; with
/// `bird_socket` (`--bird-socket`, for `--takeover bgp`) BIRD is checked
/// too.
pub fn run(criu_flag: Option<&Path>, bird_socket: Option<&Path>) -> Report {
    let mut checks = vec![privileges(), limiting_capabilities()];
    checks.extend(kernel());
    checks.push(btf());
    checks.push(bpffs());
    let (loads, dataplane) = ebpf_load();
    checks.push(loads);
    if let Some(mut dataplane) = dataplane {
        checks.push(local_retransmits(&mut dataplane));
    }
    checks.extend(criu_checks(criu_flag));
    checks.push(tcp_retries2());
    if let Some(socket) = bird_socket {
        checks.push(bird(socket));
    }
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    Report { ok, checks }
}

/// BIRD for `--takeover bgp`: running, with every BGP session up.
fn bird(socket: &Path) -> Check {
    const NAME: &str = "bird";
    match crate::net::bird::check_sessions(socket) {
        Ok(sessions) => Check::ok(
            NAME,
            format!(
                "{} BGP session(s) established: {}",
                sessions.len(),
                sessions
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(why) => Check::fail(
            NAME,
            why,
            "start BIRD 2 (Debian: bird2) with a BGP session to the router and a direct protocol on the service link, or migrate with --takeover l2",
        ),
    }
}

fn privileges() -> Check {
    const NAME: &str = "privileges";
    let missing = match system::missing_capabilities() {
        Ok(missing) => missing,
        Err(err) => {
            return Check::fail(
                NAME,
                format!("cannot read capabilities: {err}"),
                "run as root",
            );
        }
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if missing.is_empty() {
        Check::ok(
            NAME,
            format!(
                "euid {euid}, {} effective",
                system::REQUIRED_CAPABILITIES
                    .map(|(_, name)| name)
                    .join(" ")
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!("euid {euid}, missing {}", missing.join(" ")),
            "run migrator as root (CRIU needs full root to dump and restore)",
        )
    }
}

/// What a missing capability costs: some trees cannot be moved.
fn limiting_capabilities() -> Check {
    const NAME: &str = "capabilities";
    let Ok(caps) = system::effective_capabilities() else {
        return Check::warn(
            NAME,
            "cannot read this process's capabilities",
            "check /proc is mounted",
        );
    };
    let missing: Vec<_> = system::LIMITING_CAPABILITIES
        .iter()
        .filter(|(cap, ..)| !system::has_capability(caps, *cap))
        .collect();
    // Without CAP_CHECKPOINT_RESTORE, CAP_SYS_ADMIN does the same for CRIU.
    let limiting: Vec<_> = missing
        .iter()
        .filter(|(cap, ..)| {
            *cap != system::CAP_CHECKPOINT_RESTORE
                || !system::has_capability(caps, system::CAP_SYS_ADMIN)
        })
        .collect();
    if limiting.is_empty() {
        let names = system::LIMITING_CAPABILITIES.map(|(_, name, _)| name);
        return Check::ok(
            NAME,
            if missing.is_empty() {
                format!("{} effective", names.join(" "))
            } else {
                format!(
                    "{} effective (CAP_SYS_ADMIN stands in for CAP_CHECKPOINT_RESTORE)",
                    names[0]
                )
            },
        );
    }
    let detail = limiting
        .iter()
        .map(|(_, name, meaning)| format!("missing {name}: {meaning}"))
        .collect::<Vec<_>>()
        .join("; ");
    Check::warn(
        NAME,
        detail,
        "run migrator with the full root capability set (outside a sandbox or container that drops them), or move only trees whose processes all run as root",
    )
}

fn kernel() -> Vec<Check> {
    const NAME: &str = "kernel";
    let (release, version) = match KernelVersion::running() {
        Ok(found) => found,
        Err(err) => {
            return vec![Check::fail(
                NAME,
                format!("cannot read the kernel release: {err}"),
                "check /proc is mounted",
            )];
        }
    };
    let Some(version) = version else {
        return vec![Check::fail(
            NAME,
            format!("unparseable release {release:?}"),
            "report this release string",
        )];
    };
    let minimum = KernelVersion {
        major: 5,
        minor: 8,
        patch: 0,
    };
    let kernel = if version >= minimum {
        Check::ok(NAME, release)
    } else {
        Check::fail(
            NAME,
            format!("{release} is older than {minimum}"),
            "upgrade to a kernel >= 5.8 (>= 6.6 for TCX)",
        )
    };
    let attach = if version >= KernelVersion::TCX {
        Check::ok("tc attach", "TCX links (kernel >= 6.6)")
    } else {
        Check::warn(
            "tc attach",
            format!("{version} has no TCX: falling back to clsact + cls_bpf"),
            "works as is; a kernel >= 6.6 gives TCX links that cannot be lost to `tc qdisc del`",
        )
    };
    vec![kernel, attach]
}

fn btf() -> Check {
    const NAME: &str = "btf";
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    if Path::new(VMLINUX).exists() {
        Check::ok(NAME, VMLINUX)
    } else {
        Check::fail(
            NAME,
            format!("{VMLINUX} missing"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

fn bpffs() -> Check {
    const NAME: &str = "bpffs";
    match system::bpffs_mounted() {
        Ok(true) => Check::ok(NAME, format!("mounted at {}", system::BPFFS)),
        Ok(false) => match system::mount_bpffs() {
            Ok(()) => Check::ok(
                NAME,
                format!("was not mounted; mounted it at {}", system::BPFFS),
            ),
            Err(err) => Check::fail(
                NAME,
                format!(
                    "not mounted at {} and mounting failed: {err}",
                    system::BPFFS
                ),
                format!("mount -t bpf bpf {}", system::BPFFS),
            ),
        },
        Err(err) => Check::fail(
            NAME,
            format!("cannot read /proc/self/mounts: {err}"),
            "check /proc is mounted",
        ),
    }
}

/// The loaded programs go on to the next check.
fn ebpf_load() -> (Check, Option<Dataplane>) {
    const NAME: &str = "ebpf programs";
    match Dataplane::load() {
        Ok(dataplane) => (
            Check::ok(NAME, "ingress and egress classifiers pass the verifier"),
            Some(dataplane),
        ),
        Err(err) => (
            Check::fail(
                NAME,
                err.to_string(),
                "run as root on a kernel with BPF and BTF",
            ),
            None,
        ),
    }
}

/// Our own retransmits (the live view's LOCAL RTX) need one of the two
/// tracepoint programs attached; try, and detach again.
fn local_retransmits(dataplane: &mut Dataplane) -> Check {
    const NAME: &str = "local retransmits";
    match dataplane.attach_retransmit_counter() {
        Ok(counter @ RetransmitCounter::BtfTracepoint) => Check::ok(NAME, counter.describe()),
        Ok(counter @ RetransmitCounter::TracefsTracepoint) => Check::warn(
            NAME,
            counter.describe(),
            "works while tracefs stays mounted; with a kernel whose BTF has tcp_retransmit_skb and struct sock, tracefs is not needed",
        ),
        Err(err) => Check::warn(
            NAME,
            format!(
                "{err} (`migrator watch` shows them as not counted; migrations are unaffected)"
            ),
            err.fix(),
        ),
    }
}

fn criu_checks(flag: Option<&Path>) -> Vec<Check> {
    let binary = match criu::locate(flag) {
        Ok(binary) => binary,
        Err(err) => return vec![Check::fail("criu", err.to_string(), err.fix())],
    };
    let mut checks = vec![Check::ok(
        "criu",
        format!("{} (from {})", binary.path.display(), binary.source),
    )];
    match binary.supported_version() {
        Ok(version) => checks.push(Check::ok(
            "criu version",
            format!("{version} (>= {})", criu::MIN_VERSION),
        )),
        Err(err) => {
            checks.push(Check::fail("criu version", err.to_string(), err.fix()));
            return checks;
        }
    }
    checks.push(match binary.check() {
        Ok(verdict) => Check::ok("criu check", verdict),
        Err(err) => Check::fail("criu check", err.to_string(), err.fix()),
    });
    checks
}

fn tcp_retries2() -> Check {
    const NAME: &str = "tcp_retries2";
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_retries2";
    match system::read_sysctl_u32(Path::new(SYSCTL)) {
        Ok(retries) => {
            let give_up_ms = system::retransmit_give_up_ms(retries);
            let detail = format!(
                "{retries}: a Linux peer with this setting gives up after ~{:.0} s of unanswered retransmits; freeze windows must stay far below",
                give_up_ms as f64 / 1000.0
            );
            if give_up_ms < 60_000 {
                Check::warn(
                    NAME,
                    detail,
                    "raise net.ipv4.tcp_retries2 on the peers (default 15) or keep freezes very short",
                )
            } else {
                Check::ok(NAME, detail)
            }
        }
        Err(err) => Check::warn(
            NAME,
            format!("cannot read {SYSCTL}: {err}"),
            "check /proc/sys is mounted",
        ),
    }
}
