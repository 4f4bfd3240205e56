//! Part of `cargo xtask bench dataplane`: TCP throughput over a veth pair
//! without and with the data plane attached to the receiver's interface
//! (the bulk flow untracked, the common case), as a ratio measured in one
//! run. Figures, not a test.
//!
//! While the data plane is attached the kernel's BPF run-time statistics
//! are on, so the same run also prints what the classifiers cost per
//! packet on a live interface (no BPF_PROG_TEST_RUN harness around them).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use migrator_tests::{
    migrator_bin,
    netns::{Netns, veth},
    require_root,
};

const SECONDS: f64 = 1.5;
const ROUNDS: usize = 7;

/// Summed (run time, runs) of every loaded `migrator_*` classifier. Names
/// are cut to 15 bytes by the kernel, so match the prefix.
fn classifier_runs() -> (Duration, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| {
            info.name_as_str()
                .is_some_and(|name| name.starts_with("migrator_"))
        })
        .fold((Duration::ZERO, 0), |(time, runs), info| {
            (time + info.run_time(), runs + info.run_count())
        })
}

/// Gbit/s of one bulk TCP transfer from `b` to `a`.
fn transfer(a: &Netns, b: &Netns) -> f64 {
    let listener = a.run(|| TcpListener::bind("198.18.8.1:5201").unwrap());
    let reader = std::thread::spawn(move || {
        migrator_tests::pin_to_cpu(1);
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            total += n as u64;
        }
    });
    let mut sender = b.run(|| TcpStream::connect("198.18.8.1:5201").unwrap());
    let start = Instant::now();
    std::thread::spawn(move || {
        migrator_tests::pin_to_cpu(0);
        let chunk = vec![0x5au8; 1 << 20];
        while start.elapsed() < Duration::from_secs_f64(SECONDS) {
            sender.write_all(&chunk).unwrap();
        }
    })
    .join()
    .unwrap();
    let bytes = reader.join().unwrap();
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

fn migrator(ns: &Netns, args: &[&str]) {
    let out = ns.output(migrator_bin().to_str().unwrap(), args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    require_root();
    let a = Netns::new("bt-a");
    let b = Netns::new("bt-b");
    veth(&a, "ta", &["198.18.8.1/24"], &b, "tb", &["198.18.8.2/24"]);
    // Kept open for the whole run: stats are on while any such fd lives.
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF run-time statistics");
    let mut plain = Vec::new();
    let mut attached = Vec::new();
    let (mut run_time, mut runs) = (Duration::ZERO, 0u64);
    // Alternate, so drift on a noisy machine hits both sides alike.
    for _ in 0..ROUNDS {
        plain.push(transfer(&a, &b));
        migrator(&a, &["attach", "--iface", "ta"]);
        migrator(
            &a,
            &[
                "freeze",
                "--iface",
                "ta",
                "--flow",
                "198.18.8.1:9=198.18.8.2:9",
                "--deadline",
                "1ms",
            ],
        );
        attached.push(transfer(&a, &b));
        let (time, count) = classifier_runs();
        run_time += time;
        runs += count;
        migrator(&a, &["detach", "--iface", "ta"]);
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each round's ratio uses the two transfers run back to back, so slow
    // drift of the machine cancels; the spread shows what noise remains.
    let ratios: Vec<f64> = attached.iter().zip(&plain).map(|(w, p)| w / p).collect();
    let (low, high) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
        (lo.min(*r), hi.max(*r))
    });
    println!("TCP throughput over veth, {ROUNDS} alternating rounds of {SECONDS} s, median");
    println!("  without data plane  {:6.2} Gbit/s", median(&plain));
    println!("  with data plane     {:6.2} Gbit/s", median(&attached));
    println!(
        "  ratio               {:6.3}   (rounds: {low:.3} .. {high:.3})   target >= 0.95",
        median(&ratios)
    );
    println!(
        "  classifier cost on the live veth: {:.1} ns per run over {runs} runs (GRO packets count once)",
        run_time.as_nanos() as f64 / runs.max(1) as f64
    );
    // Time spent in our programs against the transfer time: the most the
    // data plane can take from a CPU-bound transfer, and a steadier figure
    // than the throughput ratio on a noisy machine.
    let share = run_time.as_secs_f64() / (ROUNDS as f64 * SECONDS);
    println!(
        "  CPU in the classifiers: {:.2}% of one core over the transfers (the most they can take from a CPU-bound one)",
        share * 100.0
    );
}
