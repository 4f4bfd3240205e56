//! `cargo xtask bench faults`: the fault matrix, for real. For each point
//! of a migration (see `migrator_tests::faults::POINTS`: preflight done,
//! the dump, the transfer, the destination restoring, its copy restored
//! and waiting for the commit, the source's cleanup) and each fault (the
//! destination's agent killed, `migrate` killed, the channel between the
//! hosts cut and healed after the deadline or never, CRIU killed on the
//! host working at that point, the destination's restore failing, its
//! image tmpfs full), one migration of the lab workload with that fault
//! injected once the point is reached. Live copies of the process are
//! counted on both hosts every 10 ms throughout (a copy is live when it
//! runs: not stopped or being stopped, not a zombie, not held by a tracer
//! such as CRIU, not being killed), and once things settle: the outcome,
//! whether the peers' connections are intact, and whether the state left
//! needs `migrator recover`.
//!
//! Figures, not a test: `bench-faults [FAULT]` prints one row per cell
//! (FAULT: one of the faults' names, for its row only).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use migrator_tests::faults::{Fault, run_cell};

fn main() {
    let deadline_s = 6;
    // `bench-faults [FAULT]`: one row of the matrix only.
    // (`cargo xtask bench` passes every bench its rounds first: not a
    // fault's name.)
    let only = std::env::args()
        .skip(1)
        .find(|arg| arg.parse::<u32>().is_err());
    let faults: Vec<Fault> = Fault::ALL
        .into_iter()
        .filter(|f| {
            only.as_ref()
                .is_none_or(|o| format!("{f:?}").eq_ignore_ascii_case(o))
        })
        .collect();
    println!(
        "fault matrix: the lab workload (16 MiB, 3 connections) moved src -> dst, lock deadline {deadline_s} s;\n\
         live copies sampled every 10 ms on both hosts (running, untraced)\n"
    );
    println!(
        "{:<14} {:<22} {:<16} {:>8} {:>8} {:>7} {:>9}  what was injected",
        "fault", "point", "outcome", "max live", "after", "intact", "settle ms"
    );
    let mut violations = 0;
    for fault in faults {
        for &point in fault.points() {
            let cell = run_cell(fault, point, deadline_s);
            let verdict = if cell.injected.starts_with("0 ") || cell.injected.contains("never") {
                "  (nothing to hit at that point)"
            } else if cell.max_live > 1 {
                violations += 1;
                "  TWO COPIES"
            } else if cell.live_after == 1 && !cell.intact {
                "  CONNECTIONS BROKEN"
            } else if cell.live_after == 0 && cell.lost {
                "  process lost, the report says so"
            } else if cell.live_after == 0 {
                "  needs recover"
            } else {
                ""
            };
            println!(
                "{:<14} {:<22} {:<16} {:>8} {:>8} {:>7} {:>9.0}  {}{verdict}",
                format!("{:?}", cell.fault),
                cell.point,
                cell.outcome,
                cell.max_live,
                cell.live_after,
                cell.intact,
                cell.settle_ms,
                cell.injected
            );
            if verdict.contains("nothing to hit") {
                println!("    (the migration said: {})", cell.error);
            }
            if cell.max_live > 1 {
                println!("    (live at once: {})", cell.crowded);
            }
        }
    }
    println!("\ncells with two live copies at once: {violations}");
}
