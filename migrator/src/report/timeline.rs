//! One migration as a picture (`migrator report FILE --svg OUT`): on top,
//! every phase of both hosts as a bar on one time axis with the freeze
//! window shaded; below, the freeze window enlarged, with each migrating
//! connection as a lane carrying its peer's packet events (retransmits,
//! drops, holds, held deliveries) and the stall that peer saw. Drawn with
//! plotters' SVG backend.

use plotters::{
    coord::{Shift, types::RangedCoordf64},
    prelude::*,
};

use super::{ConnectionEvent, FREEZE, Phase, RELEASE, Report};

const WIDTH: u32 = 1200;
const ROW_PX: u32 = 24;
const LABEL_PX: u32 = 230;

/// Colours, one per kind of thing: the legend and the marks share them.
pub const SOURCE: RGBColor = RGBColor(0x44, 0x72, 0xC4);
pub const DESTINATION: RGBColor = RGBColor(0xED, 0x7D, 0x31);
pub const FAILED: RGBColor = RGBColor(0xC0, 0x00, 0x00);
pub const WINDOW: RGBColor = RGBColor(0xFF, 0xE6, 0x99);
pub const RETRANSMIT: RGBColor = RGBColor(0xD6, 0x27, 0x28);
pub const DROP: RGBColor = RGBColor(0x7F, 0x7F, 0x7F);
pub const HOLD: RGBColor = RGBColor(0x1F, 0x77, 0xB4);
pub const DELIVERED: RGBColor = RGBColor(0x2C, 0xA0, 0x2C);
pub const STALL: RGBColor = RGBColor(0xF4, 0xB1, 0x83);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

#[derive(Debug, thiserror::Error)]
#[error("drawing the timeline: {0}")]
pub struct DrawError(String);

pub(super) fn draw_error(err: impl std::fmt::Display) -> DrawError {
    DrawError(err.to_string())
}

/// A point of `chart` in `area`'s own pixels (charts answer in the
/// backend's, whose origin is the picture's).
fn in_area(area: &Area, (x, y): (i32, i32)) -> (i32, i32) {
    let (ox, oy) = area.get_base_pixel();
    (x - ox, y - oy)
}

/// A phase row: one per (host, phase name), in order of first start.
fn phase_rows(phases: &[Phase]) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    for phase in phases.iter().filter(|p| p.name != FREEZE) {
        let row = (phase.host.clone(), phase.name.clone());
        if !rows.contains(&row) {
            rows.push(row);
        }
    }
    rows
}

/// The connections, in the report's order, then any only events name.
fn connection_lanes(report: &Report) -> Vec<String> {
    let mut lanes: Vec<String> = report
        .connections
        .iter()
        .map(|c| format!("{}={}", c.local, c.remote))
        .collect();
    for event in &report.events {
        if !lanes.contains(&event.connection) {
            lanes.push(event.connection.clone());
        }
    }
    lanes
}

/// The freeze window on the report's timeline, if it froze.
fn window(report: &Report) -> Option<(f64, f64)> {
    let start = report.phases.iter().find(|p| p.name == FREEZE)?.start_ms;
    Some((start, start + report.freeze_window_ms.unwrap_or(0.0)))
}

/// The stall a peer saw, as far as the hosts can tell: from the first of
/// its packets the lock stopped to the release on the destination (or
/// the last held packet delivered, if later).
pub fn stall(report: &Report, connection: &str) -> Option<(f64, f64)> {
    let stopped = report
        .events
        .iter()
        .filter(|e| e.connection == connection && matches!(e.kind.as_str(), "drop" | "hold"))
        .map(|e| e.at_ms)
        .reduce(f64::min)?;
    let released = report
        .phases
        .iter()
        .filter(|p| p.name == RELEASE && p.host == "destination")
        .map(|p| p.start_ms + p.duration_ms)
        .reduce(f64::max);
    let delivered = report
        .events
        .iter()
        .filter(|e| e.connection == connection && e.kind == "held-delivered")
        .map(|e| e.at_ms)
        .reduce(f64::max);
    let end = match (released, delivered) {
        (Some(r), Some(d)) => r.max(d),
        (Some(end), None) | (None, Some(end)) => end,
        (None, None) => window(report)?.1,
    };
    (end > stopped).then_some((stopped, end))
}

/// The SVG picture of one migration.
pub fn render_svg(report: &Report) -> Result<String, DrawError> {
    let rows = phase_rows(&report.phases);
    let lanes = connection_lanes(report);
    let top_px = 70 + ROW_PX * rows.len().max(1) as u32 + 40;
    let bottom_px = 60 + ROW_PX * 2 * lanes.len().max(1) as u32 + 40;
    let legend_px = 60;
    let height = top_px + bottom_px + legend_px;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (top, rest) = root.split_vertically(top_px);
        let (bottom, legend) = rest.split_vertically(bottom_px);
        draw_phases(&top, report, &rows)?;
        draw_lanes(&bottom, report, &lanes)?;
        draw_legend(&legend)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn title(report: &Report) -> String {
    let window = report.freeze_window_ms.map_or_else(
        || "no freeze".to_owned(),
        |ms| format!("freeze window {ms:.1} ms"),
    );
    let outcome = serde_json::to_value(&report.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "pid {} to {}: {outcome}, {window}, {:.0} ms in all",
        report.source_pid, report.destination, report.total_ms
    )
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A panel: its caption, `x` in ms on the report's timeline, `rows`
/// rows (labelled by the caller, in the label area), the freeze window
/// shaded.
fn chart<'a, 'b>(
    area: &'a Area<'b>,
    report: &Report,
    (caption, size): (String, u32),
    x: std::ops::Range<f64>,
    rows: f64,
) -> Result<Chart<'a, 'b>, DrawError> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", size))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(LABEL_PX)
        .build_cartesian_2d(x, 0.0..rows)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ms since the migration started")
        .draw()
        .map_err(draw_error)?;
    if let Some((from, to)) = window(report) {
        chart
            .draw_series([Rectangle::new([(from, 0.0), (to, rows)], WINDOW.filled())])
            .map_err(draw_error)?;
    }
    Ok(chart)
}

fn draw_phases(area: &Area, report: &Report, rows: &[(String, String)]) -> Result<(), DrawError> {
    let end = report
        .phases
        .iter()
        .map(|p| p.start_ms + p.duration_ms)
        .fold(report.total_ms, f64::max)
        .max(1.0);
    let n = rows.len().max(1) as f64;
    let mut chart = chart(area, report, (title(report), 18), 0.0..end * 1.02, n)?;
    let row_of = |phase: &Phase| {
        rows.iter()
            .position(|(host, name)| *host == phase.host && *name == phase.name)
    };
    let bars = report.phases.iter().filter_map(|phase| {
        let row = row_of(phase)? as f64;
        let colour = if !phase.ok {
            FAILED
        } else if phase.host == "destination" {
            DESTINATION
        } else {
            SOURCE
        };
        // At least a sliver: sub-millisecond phases must still show.
        let width = phase.duration_ms.max(end / 800.0);
        let y = n - row;
        Some(Rectangle::new(
            [(phase.start_ms, y - 0.8), (phase.start_ms + width, y - 0.2)],
            colour.filled(),
        ))
    });
    chart.draw_series(bars).map_err(draw_error)?;
    // Row names in the label area, each next to its row.
    for (i, (host, name)) in rows.iter().enumerate() {
        let (_, y) = in_area(area, chart.backend_coord(&(0.0, n - i as f64 - 0.5)));
        let colour = if host == "destination" {
            DESTINATION
        } else {
            SOURCE
        };
        area.draw(&Text::new(
            format!("{host} {name}"),
            (12, y - 7),
            ("sans-serif", 14).into_font().color(&colour),
        ))
        .map_err(draw_error)?;
    }
    Ok(())
}

/// The span the lower panel shows: the freeze window and every event,
/// with a margin.
fn zoom(report: &Report) -> (f64, f64) {
    let (mut from, mut to) = window(report).unwrap_or((0.0, report.total_ms.max(1.0)));
    for event in &report.events {
        from = from.min(event.at_ms);
        to = to.max(event.at_ms);
    }
    let pad = ((to - from) * 0.05).max(2.0);
    (from - pad, to + pad)
}

fn draw_lanes(area: &Area, report: &Report, lanes: &[String]) -> Result<(), DrawError> {
    let (from, to) = zoom(report);
    let n = lanes.len().max(1) as f64;
    let caption = "the freeze window, per connection (marks above a lane: on the source; below: on the destination)";
    let mut chart = chart(area, report, (caption.to_owned(), 16), from..to, n)?;
    let y_of = |lane: usize| n - lane as f64 - 0.5;
    for (i, lane) in lanes.iter().enumerate() {
        if let Some((start, end)) = stall(report, lane) {
            let y = y_of(i);
            chart
                .draw_series([Rectangle::new(
                    [(start, y - 0.08), (end, y + 0.08)],
                    STALL.filled(),
                )])
                .map_err(draw_error)?;
            let (x, py) = in_area(area, chart.backend_coord(&(start, y)));
            area.draw(&Text::new(
                format!("stall {:.1} ms", end - start),
                (x + 4, py + 3),
                ("sans-serif", 12).into_font().color(&BLACK),
            ))
            .map_err(draw_error)?;
        }
        let (_, py) = in_area(area, chart.backend_coord(&(from, y_of(i))));
        area.draw(&Text::new(
            lane.replace('=', " to "),
            (12, py - 7),
            ("sans-serif", 13).into_font().color(&BLACK),
        ))
        .map_err(draw_error)?;
    }
    let lane_of = |event: &ConnectionEvent| lanes.iter().position(|l| *l == event.connection);
    // Source marks above the lane's centre line, destination ones below.
    let point = |event: &ConnectionEvent| {
        let lane = lane_of(event)?;
        let shift = if event.host == "destination" {
            -0.22
        } else {
            0.22
        };
        Some((event.at_ms, y_of(lane) + shift))
    };
    let of_kind = |kind: &'static str| {
        report
            .events
            .iter()
            .filter(move |e| e.kind == kind)
            .filter_map(point)
    };
    chart
        .draw_series(of_kind("drop").map(|p| Cross::new(p, 3, DROP.stroke_width(1))))
        .map_err(draw_error)?;
    chart
        .draw_series(of_kind("hold").map(|p| TriangleMarker::new(p, 4, HOLD.filled())))
        .map_err(draw_error)?;
    chart
        .draw_series(of_kind("held-delivered").map(|p| Circle::new(p, 3, DELIVERED.filled())))
        .map_err(draw_error)?;
    chart
        .draw_series(of_kind("peer-retransmit").map(|p| Circle::new(p, 5, RETRANSMIT.filled())))
        .map_err(draw_error)?;
    Ok(())
}

fn draw_legend(area: &Area) -> Result<(), DrawError> {
    let entries: [(&str, RGBColor); 9] = [
        ("source phase", SOURCE),
        ("destination phase", DESTINATION),
        ("failed phase", FAILED),
        ("freeze window", WINDOW),
        ("peer retransmit", RETRANSMIT),
        ("drop (x)", DROP),
        ("hold (triangle)", HOLD),
        ("held packet delivered", DELIVERED),
        ("stall the peer saw", STALL),
    ];
    let column = (WIDTH as i32 - 40) / 5;
    for (i, (name, colour)) in entries.iter().enumerate() {
        let x = 20 + column * (i as i32 % 5);
        let y = 10 + 24 * (i as i32 / 5);
        // Squares, so that the legend adds no mark of its own.
        area.draw(&Rectangle::new([(x, y), (x + 14, y + 14)], colour.filled()))
            .map_err(draw_error)?;
        area.draw(&Text::new(
            *name,
            (x + 20, y),
            ("sans-serif", 13).into_font().color(&BLACK),
        ))
        .map_err(draw_error)?;
    }
    Ok(())
}
