//! The real eBPF classifiers, loaded into the kernel and run on crafted
//! frames with BPF_PROG_TEST_RUN: verdicts and counters, no network needed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use migrator::{
    dataplane::{Dataplane, Direction},
    system::boottime_ns,
};
use migrator_common::{FlowKey, FlowPolicy};
use migrator_tests::{
    frames::{Flags, Segment, udp_v4},
    require_root,
};

/// TC_ACT_UNSPEC (-1): "no opinion", TCX_NEXT under TCX.
const NO_OPINION: u32 = u32::MAX;
const DROP: u32 = 2; // TC_ACT_SHOT

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const LOCAL_PORT: u16 = 5000;
const PEER_PORT: u16 = 40_000;

fn local_key() -> FlowKey {
    FlowKey::v4(LOCAL.octets(), LOCAL_PORT, PEER.octets(), PEER_PORT)
}

/// A segment from the peer to us (ingress).
fn from_peer() -> Segment {
    Segment::new(IpAddr::V4(PEER), PEER_PORT, IpAddr::V4(LOCAL), LOCAL_PORT)
}

/// A segment from us to the peer (egress).
fn to_peer() -> Segment {
    Segment::new(IpAddr::V4(LOCAL), LOCAL_PORT, IpAddr::V4(PEER), PEER_PORT)
}

fn verdict(dataplane: &mut Dataplane, direction: Direction, frame: &[u8]) -> u32 {
    let program = dataplane.classifier(direction).expect("classifier");
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    result.return_value
}

fn loaded() -> Dataplane {
    require_root();
    Dataplane::load().expect("load the embedded eBPF object into the kernel")
}

#[test]
fn untracked_and_non_tcp_traffic_passes_with_no_opinion() {
    let mut dp = loaded();
    assert_eq!(
        verdict(
            &mut dp,
            Direction::Ingress,
            &from_peer().payload(10).frame()
        ),
        NO_OPINION
    );
    assert_eq!(
        verdict(&mut dp, Direction::Egress, &to_peer().frame()),
        NO_OPINION
    );
    // Same endpoints over UDP: not ours even when the TCP flow is frozen.
    dp.track(local_key(), FlowPolicy::freeze(0)).unwrap();
    let udp = udp_v4(PEER, PEER_PORT, LOCAL, LOCAL_PORT);
    assert_eq!(verdict(&mut dp, Direction::Ingress, &udp), NO_OPINION);
}

#[test]
fn frozen_flow_is_dropped_both_ways_and_counted() {
    let mut dp = loaded();
    dp.track(local_key(), FlowPolicy::freeze(0)).unwrap();
    assert_eq!(
        verdict(
            &mut dp,
            Direction::Ingress,
            &from_peer().payload(100).frame()
        ),
        DROP
    );
    assert_eq!(
        verdict(&mut dp, Direction::Egress, &to_peer().frame()),
        DROP
    );
    // An RST from us is dropped too: the peer must never see one.
    assert_eq!(
        verdict(
            &mut dp,
            Direction::Egress,
            &to_peer().flags(Flags::RST).frame()
        ),
        DROP
    );
    let stats = dp.flow_stats(&local_key()).unwrap().expect("stats entry");
    assert_eq!(stats.dropped, 3);
    assert_eq!(stats.packets_in, 1);
    assert_eq!(stats.packets_out, 2);
    // A different four-tuple is not affected.
    let other = Segment::new(
        IpAddr::V4(PEER),
        PEER_PORT + 1,
        IpAddr::V4(LOCAL),
        LOCAL_PORT,
    );
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &other.frame()),
        NO_OPINION
    );
}

#[test]
fn observed_flow_passes_and_counts_bytes() {
    let mut dp = loaded();
    dp.track(local_key(), FlowPolicy::observe()).unwrap();
    let frame = from_peer().payload(100).frame();
    assert_eq!(verdict(&mut dp, Direction::Ingress, &frame), NO_OPINION);
    let stats = dp.flow_stats(&local_key()).unwrap().expect("stats entry");
    assert_eq!(stats.packets_in, 1);
    assert_eq!(stats.bytes_in, frame.len() as u64);
    assert_eq!(stats.dropped, 0);
    assert!(stats.last_packet_ns > 0);
}

#[test]
fn peer_retransmits_are_counted_across_sequence_wraparound() {
    let mut dp = loaded();
    dp.track(local_key(), FlowPolicy::freeze(0)).unwrap();
    let start = u32::MAX - 49; // the first segment wraps past zero
    let first = from_peer().seq(start).payload(100).frame();
    verdict(&mut dp, Direction::Ingress, &first);
    verdict(&mut dp, Direction::Ingress, &first); // resent at RTO
    verdict(&mut dp, Direction::Ingress, &first); // and again
    // A pure ACK and a zero-length keepalive are not retransmits.
    verdict(&mut dp, Direction::Ingress, &from_peer().seq(50).frame());
    verdict(&mut dp, Direction::Ingress, &from_peer().seq(49).frame());
    // New data after the wrap is not a retransmit either.
    verdict(
        &mut dp,
        Direction::Ingress,
        &from_peer().seq(50).payload(10).frame(),
    );
    // Our own segments never count as peer retransmits.
    verdict(&mut dp, Direction::Egress, &to_peer().payload(10).frame());
    verdict(&mut dp, Direction::Egress, &to_peer().payload(10).frame());
    let stats = dp.flow_stats(&local_key()).unwrap().expect("stats entry");
    assert_eq!(stats.peer_retransmits, 2);
    assert!(stats.first_peer_retransmit_ns > 0);
    assert!(stats.last_peer_retransmit_ns >= stats.first_peer_retransmit_ns);
    assert_eq!(stats.peer_seq_end, 60);
}

#[test]
fn freeze_fails_open_after_its_deadline() {
    let mut dp = loaded();
    let past = boottime_ns() - 1;
    dp.track(local_key(), FlowPolicy::freeze(past)).unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        NO_OPINION
    );
    let future = boottime_ns() + 60_000_000_000;
    dp.track(local_key(), FlowPolicy::freeze(future)).unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        DROP
    );
}

#[test]
fn ipv6_flow_is_frozen() {
    let mut dp = loaded();
    let local: Ipv6Addr = "2001:db8::10".parse().unwrap();
    let peer: Ipv6Addr = "2001:db8::20".parse().unwrap();
    let key = FlowKey::v6(local.octets(), LOCAL_PORT, peer.octets(), PEER_PORT);
    let ingress =
        Segment::new(IpAddr::V6(peer), PEER_PORT, IpAddr::V6(local), LOCAL_PORT).payload(64);
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &ingress.frame()),
        NO_OPINION
    );
    dp.track(key, FlowPolicy::freeze(0)).unwrap();
    assert_eq!(verdict(&mut dp, Direction::Ingress, &ingress.frame()), DROP);
    let egress = Segment::new(IpAddr::V6(local), LOCAL_PORT, IpAddr::V6(peer), PEER_PORT);
    assert_eq!(verdict(&mut dp, Direction::Egress, &egress.frame()), DROP);
    // The IPv4 flow with the same ports is untouched.
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        NO_OPINION
    );
}
