//! `cargo xtask bench dataplane`: figures for the data plane, not a test.
//!
//! - classifier cost per packet (BPF_PROG_TEST_RUN with repeat, which the
//!   kernel times itself) for an untracked packet, an observed flow's
//!   packet and a frozen flow's packet, next to the cost of a non-TCP
//!   packet (the cheapest path) measured in the same run;
//! - time to freeze and release 10,000 flows through the flow table.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{net::IpAddr, time::Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use migrator::dataplane::{Dataplane, Direction};
use migrator_common::{FlowKey, FlowPolicy};
use migrator_tests::{
    frames::{Segment, udp_v4},
    require_root,
};

const REPEAT: u32 = 2_000_000;
const FLOWS: u32 = 10_000;

fn ns_per_packet(dp: &mut Dataplane, frame: &[u8]) -> f64 {
    let program = dp.classifier(Direction::Ingress).unwrap();
    // Best of five: the machine is shared and noisy.
    (0..5)
        .map(|_| {
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: REPEAT,
                    ..TestRunOptions::default()
                })
                .unwrap();
            // The kernel reports the mean duration of one run.
            result.duration.as_nanos() as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    require_root();
    let mut dp = Dataplane::load().expect("load the data plane");
    let mut table = dp.take_table().unwrap();
    let local: std::net::Ipv4Addr = "198.18.0.10".parse().unwrap();
    let peer: std::net::Ipv4Addr = "198.18.0.20".parse().unwrap();
    let segment = Segment::new(IpAddr::V4(peer), 40_000, IpAddr::V4(local), 5000).payload(100);
    let frame = segment.frame();
    let key = FlowKey::v4(local.octets(), 5000, peer.octets(), 40_000);

    let non_tcp = ns_per_packet(&mut dp, &udp_v4(peer, 40_000, local, 5000));
    let untracked = ns_per_packet(&mut dp, &frame);
    table.set_flow(key, FlowPolicy::observe()).unwrap();
    // Same local port as the tracked flow, other peer: the port prefilter
    // passes it, so this is the cost with every hash lookup done.
    let neighbour = Segment::new(IpAddr::V4(peer), 40_001, IpAddr::V4(local), 5000).payload(100);
    let untracked_same_port = ns_per_packet(&mut dp, &neighbour.frame());
    let observed = ns_per_packet(&mut dp, &frame);
    table.set_flow(key, FlowPolicy::freeze(0)).unwrap();
    let frozen = ns_per_packet(&mut dp, &frame);
    table.forget_flow(&key).unwrap();

    println!("classifier cost per packet (BPF_PROG_TEST_RUN, {REPEAT} runs, best of 5)");
    println!("  non-TCP (baseline)   {non_tcp:7.1} ns");
    println!(
        "  untracked TCP        {untracked:7.1} ns   {:5.2}x baseline   target <= 50 ns (port of no tracked flow)",
        untracked / non_tcp
    );
    println!(
        "  untracked, busy port {untracked_same_port:7.1} ns   {:5.2}x baseline",
        untracked_same_port / non_tcp
    );
    println!(
        "  observed flow        {observed:7.1} ns   {:5.2}x baseline",
        observed / non_tcp
    );
    println!(
        "  frozen flow (drop)   {frozen:7.1} ns   {:5.2}x baseline",
        frozen / non_tcp
    );

    let keys: Vec<FlowKey> = (0..FLOWS)
        .map(|i| {
            FlowKey::v4(
                local.octets(),
                5000,
                [198, 19, (i >> 8) as u8, i as u8],
                10_000 + (i % 50_000) as u16,
            )
        })
        .collect();
    let start = Instant::now();
    table.set_flows(&keys, FlowPolicy::freeze(0)).unwrap();
    let freeze = start.elapsed();
    let start = Instant::now();
    for key in &keys {
        table.release_flow(key).unwrap();
    }
    let release = start.elapsed();
    println!("flow table, {FLOWS} flows");
    println!(
        "  freeze   {:7.1} ms   target <= 50 ms   (CRIU's iptables lock: ~2.3 ms per rule, 2 rules per flow: ~{:.0} ms)",
        freeze.as_secs_f64() * 1e3,
        FLOWS as f64 * 2.0 * 2.3
    );
    println!("  release  {:7.1} ms", release.as_secs_f64() * 1e3);
}
