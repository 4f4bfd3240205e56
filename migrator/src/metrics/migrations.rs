//! Migrations as metrics: how many ended how, and how long their freeze
//! windows were. The agent serves its own (`--metrics-addr`); `migrate`,
//! which runs once per move, adds each move to a file in the format of
//! node_exporter's textfile collector (`--metrics-file`), read back and
//! rewritten every time.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet, text::encode},
    metrics::{MetricType, counter::ConstCounter, exemplar::Exemplar},
    registry::{Registry, Unit},
};

/// Freeze-window bucket bounds, seconds: 10 ms to about 10 s, doubling.
fn bounds() -> Vec<f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 11).collect()
}

#[derive(Debug)]
struct State {
    outcomes: BTreeMap<String, u64>,
    /// Per bucket (the last one past every bound), not cumulative.
    buckets: Vec<u64>,
    sum: f64,
}

/// The counters, and the names they go by (`migrator_` for the agent,
/// `migrator_source_` for `migrate`).
#[derive(Clone, Debug)]
pub struct Migrations {
    prefix: &'static str,
    help: &'static str,
    state: Arc<Mutex<State>>,
}

/// The agent's names and meanings.
pub const AGENT: (&str, &str) = (
    "migrator",
    "Migrations received here, by outcome: migrated (the process runs here), undone (nothing of it is left here), in-doubt (undone, images kept for recover), refused (before anything was restored).",
);
/// `migrate`'s names and meanings (the report's outcomes).
pub const SOURCE: (&str, &str) = (
    "migrator_source",
    "Migrations started here, by outcome: migrated, refused, rolled-back, failed (needs recover), in-doubt.",
);

impl Migrations {
    pub fn new((prefix, help): (&'static str, &'static str)) -> Self {
        Self {
            prefix,
            help,
            state: Arc::new(Mutex::new(State {
                outcomes: BTreeMap::new(),
                buckets: vec![0; bounds().len() + 1],
                sum: 0.0,
            })),
        }
    }

    /// The metrics, registered in `registry` (the agent's).
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self::new(AGENT);
        registry.register_collector(Box::new(this.clone()));
        this
    }

    /// A migration ended with `outcome`; `window` when it froze and moved.
    pub fn record(&self, outcome: &str, window: Option<Duration>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        *state.outcomes.entry(outcome.to_owned()).or_insert(0) += 1;
        if let Some(window) = window {
            let seconds = window.as_secs_f64();
            let bucket = bounds()
                .iter()
                .position(|bound| seconds <= *bound)
                .unwrap_or(state.buckets.len() - 1);
            state.buckets[bucket] += 1;
            state.sum += seconds;
        }
    }

    /// The metrics as OpenMetrics text.
    pub fn text(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut text = String::new();
        let _ = encode(&mut text, &registry);
        text
    }

    /// Counts from text [`Self::text`] wrote (lines of ours; anything
    /// else is ignored).
    fn add_from_text(&self, text: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let total = format!("{}_migrations_total{{outcome=\"", self.prefix);
        let bucket = format!("{}_freeze_window_seconds_bucket{{le=\"", self.prefix);
        let sum = format!("{}_freeze_window_seconds_sum ", self.prefix);
        let bounds = bounds();
        let mut cumulative = vec![0u64; bounds.len() + 1];
        for line in text.lines() {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let Some(rest) = line.strip_prefix(&total) {
                if let (Some((outcome, _)), Some(n)) = (rest.split_once('"'), value()) {
                    *state.outcomes.entry(outcome.to_owned()).or_insert(0) += n as u64;
                }
            } else if let Some(rest) = line.strip_prefix(&bucket) {
                let le = rest.split('"').next().unwrap_or_default();
                let at = if le == "+Inf" {
                    Some(bounds.len())
                } else {
                    le.parse::<f64>()
                        .ok()
                        .and_then(|le| bounds.iter().position(|b| (b - le).abs() < 1e-9))
                };
                if let (Some(at), Some(n)) = (at, value()) {
                    cumulative[at] = n as u64;
                }
            } else if line.starts_with(&sum) {
                state.sum += value().unwrap_or(0.0);
            }
        }
        let mut below = 0;
        for (i, up_to) in cumulative.into_iter().enumerate() {
            state.buckets[i] += up_to.saturating_sub(below);
            below = below.max(up_to);
        }
    }

    /// Add this move to the file at `path` (created if missing), written
    /// whole to a temporary file first and renamed over it, so a
    /// collector never reads half of it.
    pub fn add_to_file(
        path: &Path,
        outcome: &str,
        window: Option<Duration>,
    ) -> std::io::Result<()> {
        let this = Self::new(SOURCE);
        if let Ok(previous) = std::fs::read_to_string(path) {
            this.add_from_text(&previous);
        }
        this.record(outcome, window);
        let temporary = path.with_extension("prom.tmp");
        std::fs::write(&temporary, this.text())?;
        std::fs::rename(&temporary, path)
    }
}

impl Collector for Migrations {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(state) = self.state.lock() else {
            return Ok(());
        };
        let name = format!("{}_migrations", self.prefix);
        let mut family = encoder.encode_descriptor(&name, self.help, None, MetricType::Counter)?;
        for (outcome, n) in &state.outcomes {
            let labels = [("outcome", outcome.as_str())];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        let name = format!("{}_freeze_window", self.prefix);
        let unit = Unit::Seconds;
        let mut histogram = encoder.encode_descriptor(
            &name,
            "Freeze windows of the migrations that moved a process: from the source's freeze to the release on the destination.",
            Some(&unit),
            MetricType::Histogram,
        )?;
        let mut buckets: Vec<(f64, u64)> = bounds()
            .into_iter()
            .zip(state.buckets.iter().copied())
            .collect();
        buckets.push((f64::MAX, state.buckets.last().copied().unwrap_or(0)));
        let count = state.buckets.iter().sum();
        histogram.encode_histogram::<NoLabelSet>(
            state.sum,
            count,
            &buckets,
            None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_file_accumulates_moves_across_runs() {
        let dir = std::env::temp_dir().join(format!("migrator-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("migrator.prom");
        let ms = Duration::from_millis;
        Migrations::add_to_file(&file, "migrated", Some(ms(90))).unwrap();
        Migrations::add_to_file(&file, "migrated", Some(ms(300))).unwrap();
        Migrations::add_to_file(&file, "rolled-back", Some(ms(50_000))).unwrap();
        Migrations::add_to_file(&file, "refused", None).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let line = |start: &str| {
            text.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line("migrator_source_migrations_total{outcome=\"migrated\"}"),
            "2"
        );
        assert_eq!(
            line("migrator_source_migrations_total{outcome=\"refused\"}"),
            "1"
        );
        assert_eq!(line("migrator_source_freeze_window_seconds_count"), "3");
        assert_eq!(
            line("migrator_source_freeze_window_seconds_bucket{le=\"0.08\"}"),
            "0"
        );
        assert_eq!(
            line("migrator_source_freeze_window_seconds_bucket{le=\"0.16\"}"),
            "1"
        );
        assert_eq!(
            line("migrator_source_freeze_window_seconds_bucket{le=\"0.32\"}"),
            "2"
        );
        assert_eq!(
            line("migrator_source_freeze_window_seconds_bucket{le=\"10.24\"}"),
            "2"
        );
        assert_eq!(
            line("migrator_source_freeze_window_seconds_bucket{le=\"+Inf\"}"),
            "3"
        );
        let sum: f64 = line("migrator_source_freeze_window_seconds_sum")
            .parse()
            .unwrap();
        assert!((sum - 50.39).abs() < 1e-6, "{sum}");
        assert!(!dir.join("migrator.prom.tmp").exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
