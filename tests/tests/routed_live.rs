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
    migration::MigrationLab,
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

/// Both hosts hold the addresses, the router's routes point at one of
/// them (BGP's tie-break picks): an echo from the other host to the peer
/// goes unanswered there (the reply is routed away), one from the host
/// the routes point at is answered. Once that host withdraws, the other's
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
    // Both announce now; let the router settle on one.
    std::thread::sleep(Duration::from_millis(300));
    let owner = lab.route_points_at(SERVICE_V4).unwrap();
    assert_eq!(lab.route_points_at(SERVICE_V6), Some(owner));
    let other = if owner == SRC { DST } else { SRC };
    assert_eq!(
        echo_from(owner, Duration::from_secs(2))
            .iter()
            .flatten()
            .count(),
        2,
        "no answer where the routes point ({owner})"
    );
    let unanswered = echo_from(other, Duration::from_millis(300));
    assert_eq!(
        unanswered,
        [None, None],
        "answered at {other}, where the routes do not point"
    );
    lab.remove_service_addresses(owner).unwrap();
    let answers = echo_from(other, Duration::from_secs(5));
    assert!(
        answers.iter().all(Option::is_some),
        "no answer at {other} after {owner} withdrew: {answers:?}"
    );
    assert_eq!(lab.route_points_at(SERVICE_V4), Some(other));
}

/// Ten moves there and back of the lab workload, its IPv4 and IPv6
/// connections to a peer behind the router, the addresses taken over by
/// BGP: no byte lost, no reset; after each move the router's routes point
/// at the host that runs the process, and the report has the
/// route-convergence phase with every peer's answer.
#[test]
fn ten_moves_with_the_addresses_taken_over_by_bgp() {
    let mut lab = MigrationLab::new_routed("bgp");
    let mut pid = lab.start_workload(true, 0);
    let routed = lab.routed.as_ref().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..10 {
        let (from, to) = if round % 2 == 0 {
            (SRC, DST)
        } else {
            (DST, SRC)
        };
        let run = lab.migrate(from, to, pid, &[]);
        assert!(run.success, "move {round} {from} -> {to}: {}", run.stderr);
        let report = run.report.unwrap();
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        for address in [SERVICE_V4, SERVICE_V6] {
            assert_eq!(
                routed.route_points_at(address),
                Some(to),
                "move {round}: the router's route for {address}"
            );
        }
        let phase = report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "route-convergence")
            .unwrap_or_else(|| panic!("no route-convergence phase: {report}"));
        assert_eq!(phase["ok"], true);
        let peers = report["route_convergence"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{report}");
        for peer in peers {
            assert_eq!(peer["answered_before"], true, "{peer}");
            assert!(peer["answered_after_ms"].as_f64().is_some(), "{peer}");
        }
        eprintln!(
            "move {round} {from} -> {to}: freeze window {:.1} ms, route convergence {} ms",
            report["freeze_window_ms"].as_f64().unwrap(),
            peers
                .iter()
                .map(|p| format!("{:.1}", p["answered_after_ms"].as_f64().unwrap()))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    lab.assert_streams_intact_and_flowing(Duration::from_millis(300));
}

/// A destination whose BGP session is down could not announce the
/// addresses: refused before anything is frozen, nothing changed.
#[test]
fn a_destination_whose_bgp_session_is_down_is_refused_at_preflight() {
    let mut lab = MigrationLab::new_routed("bgd");
    let pid = lab.start_workload(true, 0);
    let routed = lab.routed.as_ref().unwrap();
    routed.birdc(DST, "disable up4").unwrap();
    let run = lab.migrate(SRC, DST, pid, &[]);
    assert_eq!(run.code, Some(3), "refused exits 3: {}", run.stderr);
    let report = run.report.unwrap();
    assert_eq!(report["outcome"], "refused", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("cannot announce") && error.contains("up4"),
        "{error}"
    );
    assert!(lab.has_address(SRC, SERVICE_V4) && !lab.has_address(DST, SERVICE_V4));
    assert_eq!(routed.route_points_at(SERVICE_V4), Some(SRC));
    lab.assert_streams_intact_and_flowing(Duration::from_millis(300));
}

/// The router refuses the destination's announcements (its sessions stay
/// up): the route never converges, so the destination never hears the
/// peer and the move rolls back within the lock's deadline; the address
/// is withdrawn there, back on the source (announced again), and the
/// connections carry on.
#[test]
fn a_route_that_never_converges_rolls_back_with_connections_alive() {
    let mut lab = MigrationLab::new_routed("bgf");
    let pid = lab.start_workload(true, 0);
    let routed = lab.routed.as_ref().unwrap();
    routed
        .router_imports_from(DST, migrator_tests::routed::RouterImport::Nothing)
        .unwrap();
    let started = Instant::now();
    let run = lab.migrate(SRC, DST, pid, &["--deadline", "6s"]);
    let took = started.elapsed();
    assert_eq!(run.code, Some(4), "rolled back exits 4: {}", run.stderr);
    let report = run.report.unwrap();
    assert_eq!(report["failed_phase"], "route-convergence", "{report}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(lab.has_address(SRC, SERVICE_V4) && lab.has_address(SRC, SERVICE_V6));
    assert!(!lab.has_address(DST, SERVICE_V4) && !lab.has_address(DST, SERVICE_V6));
    for address in [SERVICE_V4, SERVICE_V6] {
        assert_eq!(routed.route_points_at(address), Some(SRC), "{address}");
    }
    lab.assert_streams_intact_and_flowing(Duration::from_millis(300));
}

/// `migrator doctor --bird-socket` says whether `--takeover bgp` can work
/// here: BIRD answering with every BGP session up, and which one is not.
#[test]
fn doctor_checks_bird_for_bgp_takeover() {
    migrator_tests::require_root();
    let lab = RoutedLab::new("rtd");
    lab.up().unwrap();
    let doctor = |socket: &std::path::Path| {
        let out = std::process::Command::new(migrator_tests::migrator_bin())
            .args(["doctor", "--json", "--bird-socket"])
            .arg(socket)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bird = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "bird")
            .cloned()
            .unwrap_or_else(|| panic!("no bird check: {report}"));
        (out.status.code(), bird)
    };
    let (code, bird) = doctor(&lab.bird_socket(SRC));
    assert_eq!(bird["status"], "ok", "{bird}");
    assert!(bird["detail"].as_str().unwrap().contains("up4"), "{bird}");
    assert_eq!(code, Some(0));
    lab.birdc(SRC, "disable up6").unwrap();
    let (code, bird) = doctor(&lab.bird_socket(SRC));
    assert_eq!(bird["status"], "fail", "{bird}");
    assert!(bird["detail"].as_str().unwrap().contains("up6"), "{bird}");
    assert_ne!(code, Some(0));
    let (_, bird) = doctor(std::path::Path::new("/nonexistent/bird.ctl"));
    assert_eq!(bird["status"], "fail", "{bird}");
    assert!(
        bird["detail"].as_str().unwrap().contains("is BIRD running"),
        "{bird}"
    );
}
