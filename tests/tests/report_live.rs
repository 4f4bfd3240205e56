//! `migrator report` on reports of real lab moves: the timeline picture
//! of one (checked element by element) and the summary of several
//! (checked against percentiles computed here).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use migrator_tests::{
    lab::{DST, SRC},
    migration::MigrationLab,
    migrator_bin,
};
use serde_json::Value;

/// Nearest-rank percentile, computed independently of migrator's.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank - 1]
}

fn report_cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(migrator_bin())
        .arg("report")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "report {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn texts<'a>(svg: &'a roxmltree::Document) -> Vec<&'a str> {
    svg.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect()
}

fn filled(svg: &roxmltree::Document, tag: &str, colour: &str) -> usize {
    svg.descendants()
        .filter(|n| n.has_tag_name(tag) && n.attribute("fill") == Some(colour))
        .count()
}

#[test]
fn reports_of_real_moves_are_drawn_and_summarised() {
    let mut lab = MigrationLab::new("rep");
    // Enough memory that the window outlasts the peers' retransmit
    // timeout: the picture has retransmits to show.
    let mut pid = lab.start_workload(true, 96);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let reports = lab.dir.0.join("reports");
    std::fs::create_dir_all(&reports).unwrap();
    // Something in the directory that is not a report is left out.
    std::fs::write(reports.join("notes.json"), "{\"not\": \"a report\"}").unwrap();
    let mut all: Vec<Value> = Vec::new();
    for (round, (from, to)) in [(SRC, DST), (DST, SRC), (SRC, DST)].into_iter().enumerate() {
        let run = lab.migrate(from, to, pid, &[]);
        assert!(run.success, "{}", run.stderr);
        let report = run.report.unwrap();
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        std::fs::write(
            reports.join(format!("move-{round}.json")),
            report.to_string(),
        )
        .unwrap();
        all.push(report);
    }

    // The picture of one move.
    let first = &all[0];
    let svg_path = lab.dir.0.join("move-0.svg");
    report_cli(&[
        reports.join("move-0.json").to_str().unwrap(),
        "--svg",
        svg_path.to_str().unwrap(),
    ]);
    let svg_text = std::fs::read_to_string(&svg_path).unwrap();
    let svg = roxmltree::Document::parse(&svg_text).expect("the SVG is XML");
    let labels = texts(&svg);
    let phases: Vec<&Value> = first["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] != "freeze")
        .collect();
    let (mut source_bars, mut destination_bars) = (0, 0);
    for phase in &phases {
        let host = phase["host"].as_str().unwrap();
        let label = format!("{host} {}", phase["name"].as_str().unwrap());
        assert!(
            labels.contains(&label.as_str()),
            "no row {label}: {labels:?}"
        );
        match host {
            "source" => source_bars += 1,
            _ => destination_bars += 1,
        }
    }
    assert!(source_bars > 0 && destination_bars > 0);
    // A bar per phase in its host's colour (one more: the legend's).
    assert_eq!(filled(&svg, "rect", "#4472C4"), source_bars + 1);
    assert_eq!(filled(&svg, "rect", "#ED7D31"), destination_bars + 1);
    // A lane per connection.
    let connections = first["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 3);
    for c in connections {
        let lane = format!(
            "{} to {}",
            c["local"].as_str().unwrap(),
            c["remote"].as_str().unwrap()
        );
        assert!(
            labels.contains(&lane.as_str()),
            "no lane {lane}: {labels:?}"
        );
    }
    // A mark per peer retransmit on the report's timeline.
    let retransmits = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "peer-retransmit")
        .count();
    assert!(
        retransmits > 0,
        "no retransmit in a {} ms window",
        first["freeze_window_ms"]
    );
    assert_eq!(filled(&svg, "circle", "#D62728"), retransmits);

    // The summary of the directory, against percentiles computed here.
    let out = report_cli(&[reports.to_str().unwrap(), "--json"]);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["reports"], 3);
    assert_eq!(summary["by_outcome"]["migrated"], 3);
    let windows: Vec<f64> = all
        .iter()
        .map(|r| r["freeze_window_ms"].as_f64().unwrap())
        .collect();
    let stats = &summary["freeze_window_ms"];
    for (field, expected) in [
        ("min", percentile(&windows, 0.0)),
        ("p50", percentile(&windows, 0.5)),
        ("p95", percentile(&windows, 0.95)),
        ("max", windows.iter().copied().fold(f64::MIN, f64::max)),
    ] {
        assert_eq!(stats[field].as_f64().unwrap(), expected, "{field}: {stats}");
    }
    let restores: Vec<f64> = all
        .iter()
        .map(|r| {
            r["phases"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["name"] == "restore" && p["host"] == "destination")
                .map(|p| p["duration_ms"].as_f64().unwrap())
                .sum()
        })
        .collect();
    let restore = summary["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "restore" && p["host"] == "destination")
        .unwrap();
    assert_eq!(
        restore["ms"]["p50"].as_f64().unwrap(),
        percentile(&restores, 0.5)
    );
    assert_eq!(
        restore["ms"]["max"].as_f64().unwrap(),
        percentile(&restores, 1.0)
    );
    // The slowest move is named, with the largest part of its window.
    let slowest = windows
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert!(
        summary["slowest"]["file"]
            .as_str()
            .unwrap()
            .ends_with(&format!("move-{slowest}.json")),
        "{summary}"
    );
    let parts = all[slowest]["freeze_window_parts"].as_array().unwrap();
    let dominant = parts
        .iter()
        .max_by(|a, b| {
            a["ms"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["ms"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(summary["slowest"]["dominant_phase"], dominant["name"]);
    // The distribution's picture parses too.
    let dist = lab.dir.0.join("all.svg");
    report_cli(&[reports.to_str().unwrap(), "--svg", dist.to_str().unwrap()]);
    roxmltree::Document::parse(&std::fs::read_to_string(&dist).unwrap()).expect("XML");
}
