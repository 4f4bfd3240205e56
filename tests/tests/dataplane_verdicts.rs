//! The real eBPF classifiers, loaded into the kernel and run on crafted
//! frames with BPF_PROG_TEST_RUN: verdicts and counters, no network needed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use migrator::{
    dataplane::{Dataplane, Direction, FlowTable, spec::ServiceSpec},
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

/// The data plane with private maps, and its flow table.
fn loaded() -> (Dataplane, FlowTable) {
    require_root();
    let mut dp = Dataplane::load().expect("load the embedded eBPF object into the kernel");
    let table = dp.take_table().expect("maps");
    (dp, table)
}

#[test]
fn untracked_and_non_tcp_traffic_passes_with_no_opinion() {
    let (mut dp, mut table) = loaded();
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
    table.set_flow(local_key(), FlowPolicy::freeze(0)).unwrap();
    let udp = udp_v4(PEER, PEER_PORT, LOCAL, LOCAL_PORT);
    assert_eq!(verdict(&mut dp, Direction::Ingress, &udp), NO_OPINION);
}

/// The source's lock (`freeze_incoming`): the peer's packets are
/// dropped, our own segments leave (the process may still send until
/// CRIU freezes it), all but RSTs.
#[test]
fn a_lock_on_incoming_packets_lets_our_segments_out_but_no_rst() {
    let (mut dp, mut table) = loaded();
    let policy = FlowPolicy::freeze(0).own_segments_passing();
    table.set_flow(local_key(), policy).unwrap();
    assert_eq!(
        verdict(
            &mut dp,
            Direction::Ingress,
            &from_peer().payload(100).frame()
        ),
        DROP
    );
    assert_eq!(
        verdict(&mut dp, Direction::Egress, &to_peer().payload(100).frame()),
        NO_OPINION
    );
    assert_eq!(
        verdict(
            &mut dp,
            Direction::Egress,
            &to_peer().flags(Flags::RST).frame()
        ),
        DROP
    );
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!(
        (stats.dropped, stats.rst_blocked, stats.packets_out),
        (2, 1, 2)
    );
}

#[test]
fn frozen_flow_is_dropped_both_ways_and_counted() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::freeze(0)).unwrap();
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
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
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
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::observe()).unwrap();
    let frame = from_peer().payload(100).frame();
    assert_eq!(verdict(&mut dp, Direction::Ingress, &frame), NO_OPINION);
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!(stats.packets_in, 1);
    assert_eq!(stats.bytes_in, frame.len() as u64);
    assert_eq!(stats.dropped, 0);
    assert!(stats.last_packet_ns > 0);
}

#[test]
fn peer_retransmits_are_counted_across_sequence_wraparound() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::freeze(0)).unwrap();
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
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!(stats.peer_retransmits, 2);
    assert!(stats.first_peer_retransmit_ns > 0);
    assert!(stats.last_peer_retransmit_ns >= stats.first_peer_retransmit_ns);
    assert_eq!(stats.peer_seq_end, 60);
}

#[test]
fn freeze_fails_open_after_its_deadline() {
    let (mut dp, mut table) = loaded();
    let past = boottime_ns() - 1;
    table
        .set_flow(local_key(), FlowPolicy::freeze(past))
        .unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        NO_OPINION
    );
    let future = boottime_ns() + 60_000_000_000;
    table
        .set_flow(local_key(), FlowPolicy::freeze(future))
        .unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        DROP
    );
}

#[test]
fn ipv6_flow_is_frozen() {
    let (mut dp, mut table) = loaded();
    let local: Ipv6Addr = "2001:db8::10".parse().unwrap();
    let peer: Ipv6Addr = "2001:db8::20".parse().unwrap();
    let key = FlowKey::v6(local.octets(), LOCAL_PORT, peer.octets(), PEER_PORT);
    let ingress =
        Segment::new(IpAddr::V6(peer), PEER_PORT, IpAddr::V6(local), LOCAL_PORT).payload(64);
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &ingress.frame()),
        NO_OPINION
    );
    table.set_flow(key, FlowPolicy::freeze(0)).unwrap();
    assert_eq!(verdict(&mut dp, Direction::Ingress, &ingress.frame()), DROP);
    let egress = Segment::new(IpAddr::V6(local), LOCAL_PORT, IpAddr::V6(peer), PEER_PORT);
    assert_eq!(verdict(&mut dp, Direction::Egress, &egress.frame()), DROP);
    // The IPv4 flow with the same ports is untouched.
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        NO_OPINION
    );
}

#[test]
fn held_packets_keep_their_bytes_and_order() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::hold(0)).unwrap();
    let first = from_peer().seq(1000).payload(100).frame();
    let second = from_peer().seq(1100).payload(1400).frame();
    assert_eq!(verdict(&mut dp, Direction::Ingress, &first), DROP);
    assert_eq!(verdict(&mut dp, Direction::Ingress, &second), DROP);
    // Our own packets are dropped, never held: the restored socket resends.
    assert_eq!(
        verdict(&mut dp, Direction::Egress, &to_peer().payload(10).frame()),
        DROP
    );
    let held = table.drain_held();
    assert_eq!(held.len(), 2);
    assert_eq!(held[0].frame, first);
    assert_eq!(held[1].frame, second);
    assert!(held.iter().all(|p| p.key == local_key()));
    assert!(held[0].timestamp_ns <= held[1].timestamp_ns);
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!((stats.held, stats.hold_failed, stats.dropped), (2, 0, 3));
    assert!(table.drain_held().is_empty(), "draining empties the ring");
}

#[test]
fn oversized_packets_in_hold_mode_are_dropped_and_counted_as_not_held() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::hold(0)).unwrap();
    let big = from_peer().payload(3000).frame(); // a GRO aggregate's size
    assert_eq!(verdict(&mut dp, Direction::Ingress, &big), DROP);
    assert!(table.drain_held().is_empty());
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!((stats.held, stats.hold_failed), (0, 1));
}

#[test]
fn service_rules_catch_new_connections() {
    let (mut dp, mut table) = loaded();
    let service: ServiceSpec = format!("{LOCAL}:{LOCAL_PORT}").parse().unwrap();
    table
        .set_service(service.key(), FlowPolicy::freeze(0))
        .unwrap();
    // A SYN from a peer nobody listed, to the frozen service port.
    let syn =
        Segment::new(IpAddr::V4(PEER), 51_000, IpAddr::V4(LOCAL), LOCAL_PORT).flags(Flags::SYN);
    assert_eq!(verdict(&mut dp, Direction::Ingress, &syn.frame()), DROP);
    // Another port of the same address is not covered by a port rule ...
    let other = Segment::new(IpAddr::V4(PEER), 51_000, IpAddr::V4(LOCAL), 22).flags(Flags::SYN);
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &other.frame()),
        NO_OPINION
    );
    // ... but is by a whole-address rule.
    let whole: ServiceSpec = LOCAL.to_string().parse().unwrap();
    table
        .set_service(whole.key(), FlowPolicy::freeze(0))
        .unwrap();
    assert_eq!(verdict(&mut dp, Direction::Ingress, &other.frame()), DROP);
    let services = table.services().unwrap();
    let port_rule = services.iter().find(|s| s.key == service.key()).unwrap();
    assert_eq!(port_rule.stats.dropped, 1);
    // Releasing removes the rule.
    assert!(table.release_service(&whole.key()).unwrap());
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &other.frame()),
        NO_OPINION
    );
}

#[test]
fn resets_are_blocked_and_counted() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::freeze(0)).unwrap();
    verdict(
        &mut dp,
        Direction::Egress,
        &to_peer().flags(Flags::RST | Flags::ACK).frame(),
    );
    verdict(
        &mut dp,
        Direction::Ingress,
        &from_peer().flags(Flags::RST).frame(),
    );
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!(stats.rst_blocked, 2);
}

#[test]
fn keepalives_and_zero_window_probes_are_not_retransmits() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::observe()).unwrap();
    verdict(
        &mut dp,
        Direction::Ingress,
        &from_peer().seq(1000).payload(100).frame(),
    );
    // Keepalive: one below the highest end, zero or one byte.
    verdict(&mut dp, Direction::Ingress, &from_peer().seq(1099).frame());
    verdict(
        &mut dp,
        Direction::Ingress,
        &from_peer().seq(1099).payload(1).frame(),
    );
    // We advertise a zero window; the same shape is now a window probe.
    let mut zero_window = to_peer();
    zero_window.window = 0;
    verdict(&mut dp, Direction::Egress, &zero_window.frame());
    verdict(&mut dp, Direction::Ingress, &from_peer().seq(1099).frame());
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!(stats.peer_keepalives, 2);
    assert_eq!(stats.peer_window_probes, 1);
    assert_eq!(stats.peer_retransmits, 0);
}

#[test]
fn releasing_a_flow_returns_it_to_observe_with_counters_kept() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::freeze(0)).unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        DROP
    );
    assert!(table.release_flow(&local_key()).unwrap());
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        NO_OPINION
    );
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    assert_eq!((stats.dropped, stats.packets_in), (1, 2));
    let unknown = FlowKey::v4(LOCAL.octets(), 1, PEER.octets(), 2);
    assert!(!table.release_flow(&unknown).unwrap());
}

#[test]
fn ipv4_options_shift_the_tcp_header_and_are_parsed() {
    let (mut dp, mut table) = loaded();
    table.set_flow(local_key(), FlowPolicy::freeze(0)).unwrap();
    let mut frame = from_peer().seq(7000).payload(100).frame();
    // Four NOP option bytes after the 20-byte IPv4 header: IHL 5 -> 6.
    frame.splice(34..34, [1u8, 1, 1, 1]);
    frame[14] = 0x46;
    let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    assert_eq!(verdict(&mut dp, Direction::Ingress, &frame), DROP);
    verdict(&mut dp, Direction::Ingress, &frame);
    let stats = table
        .flow_stats(&local_key())
        .unwrap()
        .expect("stats entry");
    // The TCP header was found behind the options: seq 7000 + 100 bytes.
    assert_eq!(stats.peer_seq_end, 7100);
    assert_eq!(stats.peer_retransmits, 1);
}

#[test]
fn ipv6_extension_headers_pass_untouched() {
    let (mut dp, mut table) = loaded();
    let local: Ipv6Addr = "2001:db8::10".parse().unwrap();
    let peer: Ipv6Addr = "2001:db8::20".parse().unwrap();
    table
        .set_flow(
            FlowKey::v6(local.octets(), LOCAL_PORT, peer.octets(), PEER_PORT),
            FlowPolicy::freeze(0),
        )
        .unwrap();
    let mut frame =
        Segment::new(IpAddr::V6(peer), PEER_PORT, IpAddr::V6(local), LOCAL_PORT).frame();
    // A hop-by-hop header (next header 0) in front of TCP: not parsed, so
    // the packet is not ours and passes.
    frame[14 + 6] = 0;
    assert_eq!(verdict(&mut dp, Direction::Ingress, &frame), NO_OPINION);
}

#[test]
fn release_all_unblocks_every_flow_and_removes_every_rule() {
    let (mut dp, mut table) = loaded();
    let observed = FlowKey::v4(LOCAL.octets(), 1, PEER.octets(), 2);
    table.set_flow(observed, FlowPolicy::observe()).unwrap();
    table.set_flow(local_key(), FlowPolicy::hold(0)).unwrap();
    let service: ServiceSpec = format!("{LOCAL}:22").parse().unwrap();
    table
        .set_service(service.key(), FlowPolicy::freeze(0))
        .unwrap();
    // Only the blocking flow counts as released; the rule is removed.
    assert_eq!(table.release_all().unwrap(), (1, 1));
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &from_peer().frame()),
        NO_OPINION
    );
    assert!(table.services().unwrap().is_empty());
    assert_eq!(table.flows().unwrap().len(), 2, "flows stay tracked");
}

/// The local-port prefilter must never hide a tracked flow: forgetting one
/// of two flows on a port keeps the other enforced, and a whole-address
/// rule makes every port a candidate until it is released.
#[test]
fn port_prefilter_follows_the_tables() {
    let (mut dp, mut table) = loaded();
    let second_peer_port = PEER_PORT + 1;
    let second = FlowKey::v4(LOCAL.octets(), LOCAL_PORT, PEER.octets(), second_peer_port);
    let second_frame = Segment::new(
        IpAddr::V4(PEER),
        second_peer_port,
        IpAddr::V4(LOCAL),
        LOCAL_PORT,
    )
    .payload(10)
    .frame();
    let first_frame = from_peer().payload(10).frame();
    table
        .set_flows(&[local_key(), second], FlowPolicy::freeze(0))
        .unwrap();
    table.forget_flow(&local_key()).unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &first_frame),
        NO_OPINION
    );
    assert_eq!(verdict(&mut dp, Direction::Ingress, &second_frame), DROP);
    table.forget_flow(&second).unwrap();
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &second_frame),
        NO_OPINION
    );

    // An address rule covers ports no flow ever used; a port rule added
    // and removed beside it must not take that away.
    let whole: ServiceSpec = LOCAL.to_string().parse().unwrap();
    let port: ServiceSpec = format!("{LOCAL}:{LOCAL_PORT}").parse().unwrap();
    table
        .set_service(whole.key(), FlowPolicy::freeze(0))
        .unwrap();
    table
        .set_service(port.key(), FlowPolicy::freeze(0))
        .unwrap();
    assert!(table.release_service(&port.key()).unwrap());
    let unused_port =
        Segment::new(IpAddr::V4(PEER), 51_000, IpAddr::V4(LOCAL), 7).flags(Flags::SYN);
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &unused_port.frame()),
        DROP
    );
    assert_eq!(verdict(&mut dp, Direction::Ingress, &first_frame), DROP);
    assert_eq!(table.release_all().unwrap(), (0, 1));
    assert_eq!(
        verdict(&mut dp, Direction::Ingress, &unused_port.frame()),
        NO_OPINION
    );
}
