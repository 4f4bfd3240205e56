//! The agent's migrations, as metrics: how many ended how, and how long
//! their freeze windows were.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Freeze-window buckets, seconds: 10 ms to about 10 s.
fn window_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 11)
}

#[derive(Clone)]
pub struct Migrations {
    outcomes: Family<Vec<(String, String)>, Counter>,
    windows: Histogram,
}

impl Migrations {
    /// The metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            outcomes: Family::default(),
            windows: Histogram::new(window_buckets()),
        };
        registry.register(
            "migrator_migrations",
            "Migrations received here, by outcome: migrated (the process runs here), undone (nothing of it is left here), in-doubt (undone, images kept for recover), refused (before anything was restored).",
            this.outcomes.clone(),
        );
        registry.register_with_unit(
            "migrator_freeze_window",
            "Freeze windows of the migrations that moved a process here: from the source's freeze to the release here.",
            Unit::Seconds,
            this.windows.clone(),
        );
        this
    }

    /// A migration ended here with `outcome`; `window` when it moved the
    /// process here.
    pub fn record(&self, outcome: &str, window: Option<std::time::Duration>) {
        self.outcomes
            .get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())])
            .inc();
        if let Some(window) = window {
            self.windows.observe(window.as_secs_f64());
        }
    }
}
