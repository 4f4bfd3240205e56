//! Text renderings of a snapshot: the plain table (one per interval, no
//! escape codes), JSON lines, and the Prometheus text exposition.

use std::fmt::Write as _;

use super::model::{Row, RowMode, Snapshot};

fn opt_ms(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1e3))
}

fn next_due(value: Option<i64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(ms) if ms < 0 => "overdue".to_owned(),
        Some(ms) => format!("in {:.1}s", ms as f64 / 1e3),
    }
}

/// The header line: totals and the migration phase, if one runs here.
pub fn header(snapshot: &Snapshot) -> String {
    let t = &snapshot.totals;
    let local = t
        .local_retransmits
        .map_or_else(|| "not counted".to_owned(), |n| n.to_string());
    let mut line = format!(
        "{} connections, {} frozen | peer retransmits {} | local retransmits {local} | dropped {} | held {}",
        t.connections, t.frozen, t.peer_retransmits, t.packets_dropped, t.packets_held
    );
    if let Some(phase) = &snapshot.migration_phase {
        let _ = write!(line, " | migration: {phase}");
    }
    if !snapshot.new_clients.is_empty() {
        let _ = write!(line, " | new clients waiting {}", t.new_clients_waiting);
    }
    line
}

pub const COLUMNS: [&str; 12] = [
    "LOCAL",
    "REMOTE",
    "MODE",
    "PEER RTX",
    "RTX/S",
    "LAST RTX",
    "LOCAL RTX",
    "DROPPED",
    "HELD",
    "IN",
    "OUT",
    "FROZEN / NEXT",
];

/// One row's cells, in [`COLUMNS`] order.
pub fn cells(row: &Row) -> [String; 12] {
    let frozen = match row.mode {
        RowMode::Frozen | RowMode::Held => format!(
            "{} / {}",
            opt_ms(row.frozen_ms),
            next_due(row.next_peer_retransmit_in_ms)
        ),
        _ => "-".to_owned(),
    };
    [
        row.local.clone(),
        row.remote.clone(),
        row.mode.name().to_owned(),
        row.peer_retransmits.to_string(),
        format!("{:.1}", row.peer_retransmits_per_s),
        opt_ms(row.ms_since_peer_retransmit),
        row.local_retransmits
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        row.packets_dropped.to_string(),
        row.packets_held.to_string(),
        bytes(row.bytes_in),
        bytes(row.bytes_out),
        frozen,
    ]
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}G", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}M", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}K", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

/// The plain table: header line, column titles, one line per connection.
pub fn plain(snapshot: &Snapshot) -> String {
    let rows: Vec<[String; 12]> = snapshot.rows.iter().map(cells).collect();
    let mut widths = COLUMNS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = format!("{}\n", header(snapshot));
    let line = |cells: &[String]| {
        let mut text = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        text.truncate(text.trim_end().len());
        text
    };
    out.push_str(&line(&COLUMNS.map(str::to_owned)));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no tracked connections)\n");
    }
    out
}

/// JSON lines: one object per connection, then one per service address a
/// migration locks here (those have `service`, not `local`).
pub fn json_lines(snapshot: &Snapshot) -> String {
    let rows = snapshot.rows.iter().map(serde_json::to_string);
    let services = snapshot.new_clients.iter().map(serde_json::to_string);
    rows.chain(services)
        .filter_map(Result::ok)
        .map(|line| line + "\n")
        .collect()
}
