//! What a simulation run reports: the timeline, the violations and the figures.

use serde::Serialize;
use std::collections::BTreeMap;

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEntry {
    pub t_ms: u64,
    pub actor: String,
    pub event: String,
}

/// A broken invariant (or a scripted scenario's unmet expectation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: String,
    pub t_ms: u64,
    pub detail: String,
}

/// The outcome of `twosite simulate`; `--json` prints exactly this object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub schedules: u64,
    pub violations: Vec<Violation>,
    pub timeline: Vec<TimelineEntry>,
    pub figures: BTreeMap<String, u64>,
    /// A random schedule's liveness samples (ms), by kind, for `--schedules`' distribution.
    #[serde(skip)]
    pub samples: BTreeMap<String, Vec<u64>>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The readable form: the timeline, then a short summary.
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for e in &self.timeline {
            let _ = writeln!(
                out,
                "{:>9.1}s  {:<16} {}",
                e.t_ms as f64 / 1000.0,
                e.actor,
                e.event
            );
        }
        if !self.timeline.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "scenario {} seed {} schedules {}",
            self.scenario, self.seed, self.schedules
        );
        for (k, v) in &self.figures {
            let _ = writeln!(out, "  {k}: {v}");
        }
        if self.violations.is_empty() {
            let _ = writeln!(out, "no invariant violated");
        } else {
            let _ = writeln!(out, "{} violation(s):", self.violations.len());
            for v in &self.violations {
                let _ = writeln!(
                    out,
                    "  [{}] at {:.1}s: {}",
                    v.invariant,
                    v.t_ms as f64 / 1000.0,
                    v.detail
                );
            }
        }
        out
    }
}
