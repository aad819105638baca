//! The simulated two-room cluster behind `twosite simulate`.
//!
//! Deterministic: the same scenario and seed give the same timeline, byte for byte. Virtual time
//! advances in [`cluster::TICK_MS`] steps; after each step the invariants are checked.

pub mod api;
pub mod cluster;
pub mod report;
pub mod scenario;

pub use cluster::SimConfig;
use cluster::{Cluster, TICK_MS, first_after};
pub use report::{Report, TimelineEntry, Violation};
pub use scenario::{Fault, NAMES, Scenario, ScheduledFault, Site};
use std::collections::BTreeMap;

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, seed: u64) -> Report {
    run_with(scenario, seed, SimConfig::default())
}

/// Runs one scenario with one seed and non-default knobs (tests use it to break assumptions
/// on purpose and show the invariant checks catch it).
pub fn run_with(scenario: &Scenario, seed: u64, cfg: SimConfig) -> Report {
    let mut report = Report {
        scenario: scenario.name.clone(),
        seed,
        schedules: 1,
        violations: Vec::new(),
        timeline: Vec::new(),
        figures: BTreeMap::new(),
    };
    let mut cluster = match Cluster::new(scenario, seed, cfg) {
        Ok(c) => c,
        Err(e) => {
            report.violations.push(Violation {
                invariant: "configuration".into(),
                t_ms: 0,
                detail: e,
            });
            return report;
        }
    };
    let mut faults = scenario.faults.iter().peekable();
    while cluster.now <= scenario.duration_ms {
        while let Some(f) = faults.next_if(|f| f.at_ms <= cluster.now) {
            cluster.apply(&f.fault);
        }
        cluster.step();
    }
    cluster.check_expectations(&scenario.expectations);

    report
        .figures
        .insert("pairs".into(), cluster.final_pairs().len() as u64);
    report
        .figures
        .insert("simulated_ms".into(), scenario.duration_ms);
    if let Some(target) = &scenario.target
        && let Some(lost) = scenario.faults.iter().find_map(|f| match &f.fault {
            Fault::PowerOff(n) if n == target => Some(f.at_ms),
            _ => None,
        })
        && let Some(dead) = first_after(&cluster.dead_at, target, lost)
    {
        report
            .figures
            .insert("time_to_dead_verdict_ms".into(), dead - lost);
    }
    report.timeline = cluster.timeline;
    report.violations = cluster.violations;
    report
}

/// Runs `n` random fault schedules with seeds `seed, seed+1, …`. The timeline is left empty;
/// each violation names the seed that reproduces it (`--scenario random --seed S`).
pub fn run_schedules(seed: u64, n: u64) -> Report {
    let mut report = Report {
        scenario: "random".into(),
        seed,
        schedules: n,
        violations: Vec::new(),
        timeline: Vec::new(),
        figures: BTreeMap::new(),
    };
    let (mut steps, mut faults, mut dead_verdicts, mut failing) = (0u64, 0u64, 0u64, 0u64);
    for k in 0..n {
        let s = seed.wrapping_add(k);
        let scenario = scenario::random(s);
        faults += scenario.faults.len() as u64;
        steps += scenario.duration_ms / TICK_MS + 1;
        let one = run(&scenario, s);
        dead_verdicts += one
            .timeline
            .iter()
            .filter(|e| e.event.ends_with("-> Dead"))
            .count() as u64;
        if !one.violations.is_empty() {
            failing += 1;
        }
        for v in one.violations {
            report.violations.push(Violation {
                detail: format!("seed {s}: {}", v.detail),
                ..v
            });
        }
    }
    report.figures.insert("steps".into(), steps);
    report.figures.insert("faults".into(), faults);
    report.figures.insert("dead_verdicts".into(), dead_verdicts);
    report.figures.insert("failing_schedules".into(), failing);
    report
}
