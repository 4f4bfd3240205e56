//! `cargo xtask bench watch`: what watching 1,000 tracked connections at
//! 1 Hz costs, as CPU time of the `migrator watch` process over a steady
//! stretch (start-up excluded), next to the naive way measured in the same
//! run: running `migrator status --json` once a second. Figures, not a
//! test. Target: watch under 1% of one core.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use migrator_common::{FlowKey, FlowPolicy};
use migrator_tests::{
    migrator_bin,
    netns::{Netns, veth},
    require_root,
};

const CONNECTIONS: u32 = 1_000;
const SECONDS: u64 = 10;

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may contain spaces) start past ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

fn main() {
    require_root();
    let a = Netns::new("bw-a");
    let b = Netns::new("bw-b");
    veth(&a, "wa", &["198.18.9.1/24"], &b, "wb", &["198.18.9.2/24"]);
    let out = a.output(
        migrator_bin().to_str().unwrap(),
        &["attach", "--iface", "wa"],
    );
    assert!(out.status.success(), "{out:?}");
    // 1,000 tracked connections in the pinned table of a's namespace.
    let root = a.pin_root();
    let keys: Vec<FlowKey> = (0..CONNECTIONS)
        .map(|i| {
            FlowKey::v4(
                [198, 18, 9, 1],
                5000,
                [198, 19, (i >> 8) as u8, i as u8],
                10_000 + i as u16,
            )
        })
        .collect();
    let mut table = migrator::dataplane::FlowTable::open_pinned(&root).unwrap();
    table.set_flows(&keys, FlowPolicy::observe()).unwrap();

    // watch, headless with metrics too: everything it does per tick.
    let mut watch = a
        .command(migrator_bin().to_str().unwrap())
        .args([
            "watch",
            "--plain",
            "--interval",
            "1s",
            "--metrics-addr",
            "127.0.0.1:9465",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // nsenter execs migrator: same PID.
    std::thread::sleep(Duration::from_secs(2));
    let before = cpu_seconds(watch.id());
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(SECONDS));
    let watch_share = (cpu_seconds(watch.id()) - before) / started.elapsed().as_secs_f64();
    let _ = watch.kill();
    let _ = watch.wait();

    // Baseline: a status --json process per second (CPU of the children).
    let mut status_cpu = 0.0;
    let started = Instant::now();
    for _ in 0..SECONDS {
        let tick = Instant::now();
        // SAFETY: getrusage fills the struct we pass.
        let usage_before = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            usage
        };
        let out = a
            .command(migrator_bin().to_str().unwrap())
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        // SAFETY: as above.
        let usage_after = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            usage
        };
        let secs = |u: &libc::rusage| {
            u.ru_utime.tv_sec as f64
                + u.ru_utime.tv_usec as f64 / 1e6
                + u.ru_stime.tv_sec as f64
                + u.ru_stime.tv_usec as f64 / 1e6
        };
        status_cpu += secs(&usage_after) - secs(&usage_before);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    let status_share = status_cpu / started.elapsed().as_secs_f64();
    table.forget_flows(&keys).unwrap();
    let out = a.output(
        migrator_bin().to_str().unwrap(),
        &["detach", "--iface", "wa"],
    );
    assert!(out.status.success());

    println!("watching {CONNECTIONS} tracked connections at 1 Hz for {SECONDS} s");
    println!(
        "  migrator watch --plain --metrics-addr   {:6.2}% of one core   target < 1%",
        watch_share * 100.0
    );
    println!(
        "  migrator status --json, once a second   {:6.2}% of one core   (baseline)",
        status_share * 100.0
    );
    println!("  ratio watch/baseline {:.2}", watch_share / status_share);
}
