//! Many migrations side by side (`migrator report DIR`): how they ended,
//! and the freeze window and each phase as min / p50 / p95 / max, with
//! the slowest migration and what dominated its window.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use plotters::prelude::*;
use serde::Serialize;

use super::{FREEZE, Report, timeline};

/// Reports read from files, and directories of them.
pub struct Loaded {
    pub reports: Vec<(PathBuf, Report)>,
    /// JSON files in a directory that are not reports (left out).
    pub skipped: Vec<PathBuf>,
}

/// Read every report named: a file must be a report; in a directory,
/// every `*.json` that is one (others are listed as skipped).
pub fn load(paths: &[PathBuf]) -> Result<Loaded, String> {
    let mut loaded = Loaded {
        reports: Vec::new(),
        skipped: Vec::new(),
    };
    for path in paths {
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|file| file.extension().is_some_and(|ext| ext == "json"))
                .collect();
            files.sort();
            for file in files {
                match read(&file) {
                    Ok(report) => loaded.reports.push((file, report)),
                    Err(_) => loaded.skipped.push(file),
                }
            }
        } else {
            let report = read(path)?;
            loaded.reports.push((path.clone(), report));
        }
    }
    if loaded.reports.is_empty() {
        return Err(format!(
            "no migration report in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(loaded)
}

/// One report from its file (written by `migrate --report`).
pub fn read(path: &Path) -> Result<Report, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a migration report: {e}", path.display()))
}

/// A distribution: nearest-rank percentiles (p50 of 1, 2, 3, 4 is 2).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank =
            |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Some(Self {
            count: sorted.len(),
            min: *sorted.first()?,
            p50: rank(0.50),
            p95: rank(0.95),
            max: *sorted.last()?,
        })
    }
}

/// A phase of one host across the reports.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseStats {
    pub host: String,
    pub name: String,
    /// Milliseconds per migration (a phase that ran twice counts once,
    /// with both durations).
    pub ms: Stats,
}

/// The migration with the longest freeze window.
#[derive(Clone, Debug, Serialize)]
pub struct Slowest {
    pub file: PathBuf,
    pub freeze_window_ms: f64,
    /// The largest part of its window.
    pub dominant_host: String,
    pub dominant_phase: String,
    pub dominant_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub reports: usize,
    pub by_outcome: BTreeMap<String, usize>,
    pub freeze_window_ms: Option<Stats>,
    /// What the freeze windows were made of (each report's
    /// `freeze_window_parts`).
    pub inside_window: Vec<PhaseStats>,
    /// Every phase, whole.
    pub phases: Vec<PhaseStats>,
    pub slowest: Option<Slowest>,
}

/// A row's name: the host and the phase (the time between phases has no
/// host).
fn row_name(host: &str, name: &str) -> String {
    if host == "-" {
        name.to_owned()
    } else {
        format!("{host} {name}")
    }
}

/// Group (host, name) -> the values per report, in order of first sight.
fn per_phase(items: impl Iterator<Item = (String, String, usize, f64)>) -> Vec<PhaseStats> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut values: BTreeMap<(String, String), BTreeMap<usize, f64>> = BTreeMap::new();
    for (host, name, report, ms) in items {
        let key = (host, name);
        if !order.contains(&key) {
            order.push(key.clone());
        }
        *values.entry(key).or_default().entry(report).or_default() += ms;
    }
    order
        .into_iter()
        .filter_map(|key| {
            let per_report: Vec<f64> = values.get(&key)?.values().copied().collect();
            Some(PhaseStats {
                ms: Stats::of(&per_report)?,
                host: key.0,
                name: key.1,
            })
        })
        .collect()
}

pub fn summarise(reports: &[(PathBuf, Report)]) -> Summary {
    let mut by_outcome = BTreeMap::new();
    for (_, report) in reports {
        let outcome = serde_json::to_value(&report.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *by_outcome.entry(outcome).or_insert(0) += 1;
    }
    let windows: Vec<f64> = reports
        .iter()
        .filter_map(|(_, r)| r.freeze_window_ms)
        .collect();
    let inside_window = per_phase(reports.iter().enumerate().flat_map(|(i, (_, r))| {
        r.freeze_window_parts
            .iter()
            .map(move |part| (part.host.clone(), part.name.clone(), i, part.ms))
    }));
    let phases = per_phase(reports.iter().enumerate().flat_map(|(i, (_, r))| {
        r.phases
            .iter()
            .filter(|p| p.name != FREEZE)
            .map(move |p| (p.host.clone(), p.name.clone(), i, p.duration_ms))
    }));
    let slowest = reports
        .iter()
        .filter_map(|(file, r)| Some((file, r, r.freeze_window_ms?)))
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .map(|(file, report, window)| {
            let dominant = report
                .freeze_window_parts
                .iter()
                .max_by(|a, b| a.ms.total_cmp(&b.ms));
            Slowest {
                file: file.clone(),
                freeze_window_ms: window,
                dominant_host: dominant.map(|d| d.host.clone()).unwrap_or_default(),
                dominant_phase: dominant.map(|d| d.name.clone()).unwrap_or_default(),
                dominant_ms: dominant.map_or(0.0, |d| d.ms),
            }
        });
    Summary {
        reports: reports.len(),
        by_outcome,
        freeze_window_ms: Stats::of(&windows),
        inside_window,
        phases,
        slowest,
    }
}

impl Summary {
    /// The table.
    pub fn render(&self) -> String {
        let outcomes: Vec<String> = self
            .by_outcome
            .iter()
            .map(|(outcome, n)| format!("{n} {outcome}"))
            .collect();
        let mut out = format!(
            "{} report{}: {}\n\n",
            self.reports,
            if self.reports == 1 { "" } else { "s" },
            outcomes.join(", ")
        );
        out.push_str(&format!(
            "{:<36} {:>4} {:>9} {:>9} {:>9} {:>9}\n",
            "ms", "n", "min", "p50", "p95", "max"
        ));
        let line = |name: &str, s: &Stats| {
            format!(
                "{name:<36} {:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                s.count, s.min, s.p50, s.p95, s.max
            )
        };
        if let Some(window) = &self.freeze_window_ms {
            out.push_str(&line("freeze window", window));
        }
        if !self.inside_window.is_empty() {
            out.push_str("inside the freeze window:\n");
            for part in &self.inside_window {
                out.push_str(&line(
                    &format!("  {}", row_name(&part.host, &part.name)),
                    &part.ms,
                ));
            }
        }
        out.push_str("phases, whole:\n");
        for phase in &self.phases {
            out.push_str(&line(
                &format!("  {} {}", phase.host, phase.name),
                &phase.ms,
            ));
        }
        if let Some(slowest) = &self.slowest {
            out.push_str(&format!(
                "\nslowest: {} ({:.1} ms window), dominated by {} {} ({:.1} ms)\n",
                slowest.file.display(),
                slowest.freeze_window_ms,
                slowest.dominant_host,
                slowest.dominant_phase,
                slowest.dominant_ms
            ));
        }
        out
    }

    /// The distributions as a picture: per row (the window, then each
    /// part of it), a line from min to max, a box from p50 to p95.
    pub fn render_svg(&self) -> Result<String, timeline::DrawError> {
        let mut rows: Vec<(String, &Stats)> = Vec::new();
        if let Some(window) = &self.freeze_window_ms {
            rows.push(("freeze window".to_owned(), window));
        }
        rows.extend(
            self.inside_window
                .iter()
                .map(|p| (row_name(&p.host, &p.name), &p.ms)),
        );
        let n = rows.len().max(1) as f64;
        let end = rows.iter().map(|(_, s)| s.max).fold(1.0, f64::max);
        let height = 110 + 26 * rows.len().max(1) as u32;
        let mut svg = String::new();
        {
            let draw = timeline::draw_error;
            let root = SVGBackend::with_string(&mut svg, (1000, height)).into_drawing_area();
            root.fill(&WHITE).map_err(draw)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{} migrations: the freeze window and its parts (line min-max, box p50-p95)",
                        self.reports
                    ),
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(240)
                .build_cartesian_2d(0.0..end * 1.05, 0.0..n)
                .map_err(draw)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(0)
                .x_desc("ms")
                .draw()
                .map_err(draw)?;
            for (i, (name, stats)) in rows.iter().enumerate() {
                let y = n - i as f64 - 0.5;
                chart
                    .draw_series([PathElement::new(
                        vec![(stats.min, y), (stats.max, y)],
                        BLACK.stroke_width(1),
                    )])
                    .map_err(draw)?;
                chart
                    .draw_series([Rectangle::new(
                        [
                            (stats.p50, y - 0.3),
                            (stats.p95.max(stats.p50 + end / 500.0), y + 0.3),
                        ],
                        timeline::SOURCE.filled(),
                    )])
                    .map_err(draw)?;
                let (_, py) = chart.backend_coord(&(0.0, y));
                root.draw(&Text::new(
                    format!("{name} (p50 {:.1})", stats.p50),
                    (12, py - 7),
                    ("sans-serif", 13).into_font().color(&BLACK),
                ))
                .map_err(draw)?;
            }
            root.present().map_err(draw)?;
        }
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            (s.count, s.min, s.p50, s.p95, s.max),
            (4, 1.0, 2.0, 4.0, 4.0)
        );
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&hundred).unwrap();
        assert_eq!((s.p50, s.p95), (50.0, 95.0));
        assert_eq!(Stats::of(&[7.0]).unwrap().p95, 7.0);
        assert!(Stats::of(&[]).is_none());
    }
}
