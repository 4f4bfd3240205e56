//! The fault matrix as tests: each fault at each point of a migration
//! (see `migrator_tests::faults`), one test per fault. Whatever breaks, at
//! most one copy of the process runs at any sample (every 10 ms, on both
//! hosts), and once things settle one copy runs with its connections
//! intact, or none does and the outcome says `recover` is needed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use migrator_tests::faults::{Cell, Fault, run_cell};

/// The locks' deadline in these migrations: the settle time.
const DEADLINE_S: u64 = 6;

fn check(cell: &Cell) {
    let what = format!(
        "{:?} at {}: {} ({})",
        cell.fault, cell.point, cell.outcome, cell.injected
    );
    assert!(
        !cell.injected.starts_with("0 ") && !cell.injected.contains("never"),
        "nothing injected: {what}"
    );
    assert!(
        cell.max_live <= 1,
        "{} copies ran at once: {what}: {}",
        cell.max_live,
        cell.crowded
    );
    match cell.live_after {
        1 => assert!(
            cell.intact,
            "the copy left runs, its connections broke: {what}"
        ),
        0 => assert!(
            cell.outcome == "failed"
                || cell.outcome == "in-doubt"
                || cell.outcome.starts_with("no report"),
            "no copy left, yet the outcome does not say recover: {what}"
        ),
        n => panic!("{n} copies left: {what}"),
    }
    eprintln!(
        "{what}: at most {} live, {} after",
        cell.max_live, cell.live_after
    );
}

fn row(fault: Fault) {
    for &point in fault.points() {
        check(&run_cell(fault, point, DEADLINE_S));
    }
}

#[test]
fn the_destinations_agent_killed_at_every_point() {
    row(Fault::AgentKilled);
}

#[test]
fn migrate_killed_at_every_point() {
    row(Fault::MigrateKilled);
}

#[test]
fn the_channel_cut_at_every_point() {
    row(Fault::NetworkCut);
}

#[test]
fn the_channel_cut_for_good_at_every_point() {
    row(Fault::NetworkCutForever);
}

#[test]
fn the_destinations_image_store_full_at_every_point() {
    row(Fault::ImagesFull);
}

#[test]
fn criu_killed_at_every_point() {
    row(Fault::CriuKilled);
}

#[test]
fn the_destinations_restore_failing() {
    row(Fault::RestoreFails);
}
