//! The routed lab (`migrator_tests::routed`): the router learns the
//! service addresses through BGP from the host that holds them, and an
//! echo from a service address is answered at whichever host the routes
//! point to, not at the one that merely holds the address. That is what
//! the destination's ownership proof (`net::roundtrip`, the
//! `route-convergence` phase) relies on when peers sit behind a router.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use migrator::net::roundtrip::{Probe, round_trips};
use migrator_tests::{
    routed::{DST, PEER, RoutedLab, SERVICE_V4, SERVICE_V6, SRC, host_addresses},
    wire::in_netns,
};

fn wait_for_route(lab: &RoutedLab, address: &str, host: &str) -> Duration {
    let started = Instant::now();
    while lab.route_points_at(address) != Some(host) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the router's route for {address} never pointed at {host}: {:?}",
            lab.route_points_at(address)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

#[test]
fn the_router_follows_the_service_addresses_from_host_to_host() {
    migrator_tests::require_root();
    let lab = RoutedLab::new("rtm");
    lab.up().unwrap();
    for address in [SERVICE_V4, SERVICE_V6] {
        assert_eq!(lab.route_points_at(address), Some(SRC), "{address}");
    }
    for (from, to) in [(SRC, DST), (DST, SRC)] {
        lab.remove_service_addresses(from).unwrap();
        lab.add_service_addresses(to).unwrap();
        let v4 = wait_for_route(&lab, SERVICE_V4, to);
        let v6 = wait_for_route(&lab, SERVICE_V6, to);
        eprintln!("{from} -> {to}: the router's routes moved in {v4:?} (v4), {v6:?} (v6)");
    }
    // A withdrawn address leaves no route behind.
    lab.remove_service_addresses(SRC).unwrap();
    let started = Instant::now();
    while lab.route_points_at(SERVICE_V4).is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never withdrawn"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Both hosts hold the addresses, the routes point at the source: the
/// destination's echo to the peer goes unanswered there (the reply is
/// routed to the source). Once the source withdraws, the destination's
/// echo is answered.
#[test]
fn an_echo_is_answered_where_the_routes_point_not_where_the_address_is() {
    migrator_tests::require_root();
    let lab = RoutedLab::new("rte");
    lab.up().unwrap();
    lab.add_service_addresses(DST).unwrap();
    let (peer_v4, peer_v6) = host_addresses(PEER);
    let probes = vec![
        Probe {
            from: SERVICE_V4.parse().unwrap(),
            peer: peer_v4.parse::<IpAddr>().unwrap(),
        },
        Probe {
            from: SERVICE_V6.parse().unwrap(),
            peer: peer_v6.parse::<IpAddr>().unwrap(),
        },
    ];
    let echo_from = |host: &str, patience: Duration| {
        let probes = probes.clone();
        in_netns(&lab.netns_path(host), move || {
            let required = vec![true; probes.len()];
            round_trips(
                &probes,
                &required,
                patience,
                patience,
                Duration::from_millis(5),
            )
            .unwrap()
        })
        .join()
        .unwrap()
    };
    // The routes still point at the source (the lower router id wins).
    assert_eq!(lab.route_points_at(SERVICE_V4), Some(SRC));
    assert_eq!(
        echo_from(SRC, Duration::from_secs(2))
            .iter()
            .flatten()
            .count(),
        2
    );
    let unanswered = echo_from(DST, Duration::from_millis(300));
    assert_eq!(
        unanswered,
        [None, None],
        "answered where the routes do not point"
    );
    lab.remove_service_addresses(SRC).unwrap();
    let answers = echo_from(DST, Duration::from_secs(5));
    assert!(
        answers.iter().all(Option::is_some),
        "no answer at the destination after the source withdrew: {answers:?}"
    );
    eprintln!("answers at the destination {answers:?} after the withdrawal");
    assert_eq!(lab.route_points_at(SERVICE_V4), Some(DST));
}
