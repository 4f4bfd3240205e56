//! Network namespaces the tests create and always remove: named
//! namespaces, veth pairs, running code and commands inside them.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
};

/// A named network namespace (`ip netns add`), deleted on drop together
/// with the data plane pins migrator made for it.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// `tag` plus this process's pid keeps parallel tests apart.
    pub fn new(tag: &str) -> Self {
        let name = format!("mt-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// A command run inside the namespace with a network-only setns (no new
    /// mount namespace, so bpffs pins stay visible).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg(program);
        command
    }

    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .expect("run command in netns")
    }

    /// Run `f` on a thread that has entered this namespace: sockets it
    /// creates live here, whichever thread uses them afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).expect("open netns file");
        std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; setns only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Where migrator pins its data plane for this namespace.
    pub fn pin_root(&self) -> PathBuf {
        crate::lab::pin_root_of(&self.path())
            .unwrap_or_else(|| PathBuf::from(migrator_common::paths::BPF_PIN_ROOT).join("netns-0"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Pins keep programs and maps alive after the namespace is gone.
        let _ = std::fs::remove_dir_all(self.pin_root());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Connect two namespaces with a veth pair and give both ends addresses
/// (IPv4 /24 and IPv6 /64 without DAD, so they are usable at once).
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname]);
            }
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}
