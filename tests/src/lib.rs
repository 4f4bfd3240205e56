//! Helpers for the privileged integration tests: crafted frames for
//! BPF_PROG_TEST_RUN and a loud root check.
//!
//! Tests that need root do not skip without it: they fail and say why, so
//! a CI run without privileges can never look green.

// Test helpers panic on broken fixtures: that is a test failure, not a bug path.
#![allow(clippy::expect_used, clippy::unwrap_used)]
pub mod faults;
pub mod frames;
pub mod http;
pub mod lab;
pub mod migration;
pub mod netns;
pub mod routed;
pub mod wire;

/// Fail the test with a clear message unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, TC, network namespaces); run it with `cargo xtask test` as root"
    );
}

/// The `migrator` binary of this build (`cargo xtask test` builds it
/// before the tests run).
pub fn migrator_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps/, bench binaries beside migrator
    // in target/<profile>/.
    let dir = exe.parent().expect("executable has a directory");
    let bin = [
        dir.join("migrator"),
        dir.parent().unwrap_or(dir).join("migrator"),
    ]
    .into_iter()
    .find(|candidate| candidate.exists())
    .unwrap_or_else(|| dir.join("migrator"));
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build`, or run the tests via `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// A scratch directory removed on drop, pass or fail.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("migrator-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        lab::clear_leftovers_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop, pass or fail.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether this process has CAP_SYS_RESOURCE (some trees cannot be
/// dumped without it).
pub fn has_sys_resource() -> bool {
    let caps = migrator::system::effective_capabilities().expect("this process's capabilities");
    migrator::system::has_capability(caps, migrator::system::CAP_SYS_RESOURCE)
}

/// Keep the calling thread on one CPU: a benchmark's sender and receiver
/// each get their own, so the scheduler moving them around adds no noise.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, set up by CPU_SET; the call only
    // affects this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}
