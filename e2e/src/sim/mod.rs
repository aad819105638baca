//! The simulated two-room cluster behind `twosite simulate`.
//!
//! Deterministic: the same scenario and seed give the same timeline, byte for byte. Virtual time
//! advances in [`cluster::TICK_MS`] steps; after each step the invariants are checked.

mod agent;
pub mod api;
mod api_io;
mod checks;
pub mod cluster;
pub mod compare;
mod guard;
mod kcm;
mod kubelet;
pub mod kubevirt;
mod liveness;
mod lock_loop;
pub mod policy;
mod random_schedule;
mod replica;
pub mod report;
pub mod scenario;
mod scheduler;
pub mod vm_checks;
mod vm_controller;
mod vm_scenarios;
mod volume;
mod volume_checks;
mod volume_controller;
mod volume_scenarios;
mod witness;

pub use cluster::SimConfig;
use cluster::{Cluster, TICK_MS, first_after};
pub use report::{Report, TimelineEntry, Violation};
pub use scenario::{Fault, NAMES, Scenario, ScheduledFault, Site};
use std::collections::BTreeMap;

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, seed: u64) -> Report {
    let cfg = SimConfig {
        extreme_drift: scenario.extreme_drift,
        stop_command_fails: scenario.stop_command_fails,
        ..SimConfig::default()
    };
    run_with(scenario, seed, cfg)
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
        samples: BTreeMap::new(),
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
    cluster.check_volume_expectations(&scenario.volume_expectations);
    cluster.check_vm_expectations();
    if scenario.name == "random" {
        report.samples = cluster.check_liveness(scenario);
        cluster.check_volume_liveness(scenario);
        cluster.check_vm_liveness(scenario);
    }

    report
        .figures
        .insert("pairs".into(), cluster.final_pairs().len() as u64);
    report
        .figures
        .insert("simulated_ms".into(), scenario.duration_ms);
    for (name, n) in &cluster.record.counters {
        report.figures.insert((*name).into(), *n);
    }
    cluster.volume_figures(&mut report.figures);
    cluster.vm_figures(&mut report.figures);
    if let Some(target) = &scenario.target
        && let Some(lost) = scenario.faults.iter().find_map(|f| match &f.fault {
            Fault::PowerOff(n) | Fault::AgentCrash(n) | Fault::Isolate(n) if n == target => {
                Some(f.at_ms)
            }
            _ => None,
        })
    {
        let r = &cluster.record;
        let mut figure = |name: &str, times: &BTreeMap<String, Vec<u64>>, key: &str, from: u64| {
            if let Some(t) = first_after(times, key, from) {
                report.figures.insert(name.into(), t - from);
            }
        };
        figure("time_to_dead_verdict_ms", &r.dead_at, target, lost);
        figure("time_to_taint_ms", &r.taint_at, target, lost);
        figure("time_to_pods_released_ms", &r.released_at, target, lost);
        figure("time_to_agent_reboot_ms", &r.agent_rebooted, target, lost);
        figure(
            "time_to_failover_ms",
            &r.app_started_at,
            &format!("app-{target}"),
            lost + 1,
        );
        if let Some(back) = scenario.faults.iter().find_map(|f| match &f.fault {
            Fault::PowerOn(n) | Fault::Reconnect(n) if n == target && f.at_ms > lost => {
                Some(f.at_ms)
            }
            _ => None,
        }) {
            figure("time_to_untaint_ms", &r.untaint_at, target, back);
        }
    }
    // Partitions: when the rooms were cut apart, how fast the witness granted one, how fast the
    // losing room stopped, and how fast the target's app ran again.
    if let Some(cut) = scenario.faults.iter().find_map(|f| match f.fault {
        Fault::Cut(Site::RoomA, Site::RoomB) | Fault::Cut(Site::RoomB, Site::RoomA) => {
            Some(f.at_ms)
        }
        _ => None,
    }) {
        if let Some((t, _, _)) = cluster
            .record
            .witness_grants
            .iter()
            .find(|(t, _, _)| *t >= cut)
        {
            report.figures.insert("time_to_grant_ms".into(), t - cut);
        }
        let loser = scenario.expectations.iter().find_map(|e| match e {
            scenario::Expectation::RoomStops { room, .. } => Some(*room),
            _ => None,
        });
        if let Some(stopped) = loser.and_then(|room| cluster.room_stopped_at(room, cut)) {
            report
                .figures
                .insert("time_to_loser_stopped_ms".into(), stopped - cut);
        }
        if let Some(target) = &scenario.target
            && let Some(t) = first_after(
                &cluster.record.app_started_at,
                &format!("app-{target}"),
                cut + 1,
            )
        {
            report.figures.insert("time_to_failover_ms".into(), t - cut);
        }
    }
    report.timeline = cluster.timeline;
    report.violations = cluster.violations;
    report
}

/// Figures of single runs that the schedules' summary adds up.
const COUNTERS: [&str; 10] = [
    "vms",
    "vms_failed_over",
    "vms_untouched",
    "vm_two_running_steps",
    "forged_answers_refused",
    "forged_answers_taken",
    "volume_app_starts",
    "volume_faults",
    "volume_handovers",
    "two_writer_steps",
];

/// Runs `n` random fault schedules with seeds `seed, seed+1, …`, spread over the machine's
/// cores; the result does not depend on how many. The timeline is left empty; each violation
/// names the seed that reproduces it (`--scenario random --seed S`).
pub fn run_schedules(seed: u64, n: u64) -> Report {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get() as u64);
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let parts: Vec<Vec<(u64, Report, usize)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(usize::try_from(chunk).unwrap_or(usize::MAX))
            .map(|start| {
                scope.spawn(move || {
                    (start..n.min(start + chunk))
                        .map(|k| {
                            let s = seed.wrapping_add(k);
                            let scenario = scenario::random(s);
                            (s, run(&scenario, s), scenario.faults.len())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut report = Report {
        scenario: "random".into(),
        seed,
        schedules: n,
        violations: Vec::new(),
        timeline: Vec::new(),
        figures: BTreeMap::new(),
        samples: BTreeMap::new(),
    };
    let (mut steps, mut faults, mut dead_verdicts, mut failing, mut done) = (0, 0, 0, 0, 0);
    let (mut taints, mut grants, mut stops, mut agent_reboots) = (0, 0, 0, 0);
    let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (s, one, nfaults) in parts.into_iter().flatten() {
        done += 1;
        faults += nfaults as u64;
        steps += one.figures.get("simulated_ms").copied().unwrap_or(0) / TICK_MS + 1;
        dead_verdicts += one
            .timeline
            .iter()
            .filter(|e| e.event.ends_with("-> Dead"))
            .count() as u64;
        taints += one
            .timeline
            .iter()
            .filter(|e| e.event.starts_with("out-of-service taint applied"))
            .count() as u64;
        grants += one.timeline.iter().filter(|e| e.actor == "witness").count() as u64;
        stops += one
            .timeline
            .iter()
            .filter(|e| e.event.starts_with("lost the right to run"))
            .count() as u64;
        agent_reboots += one
            .timeline
            .iter()
            .filter(|e| e.event.starts_with("agent rebooted the node"))
            .count() as u64;
        for counter in COUNTERS {
            *report.figures.entry(counter.into()).or_default() +=
                one.figures.get(counter).copied().unwrap_or(0);
        }
        for (kind, v) in &one.samples {
            samples.entry(kind.clone()).or_default().extend(v);
        }
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
    if done != n {
        // A worker thread panicked: that is a bug, and must not pass as a clean run.
        report.violations.push(Violation {
            invariant: "simulation-crashed".into(),
            t_ms: 0,
            detail: format!("{} of {n} schedules did not finish", n - done),
        });
    }
    report.figures.insert("steps".into(), steps);
    report.figures.insert("faults".into(), faults);
    report.figures.insert("dead_verdicts".into(), dead_verdicts);
    report.figures.insert("failing_schedules".into(), failing);
    report.figures.insert("taints".into(), taints);
    report.figures.insert("witness_grants".into(), grants);
    report.figures.insert("agents_stopped".into(), stops);
    report.figures.insert("agent_reboots".into(), agent_reboots);
    // The liveness distribution: what counts is the p99, not one seed's figure.
    for (kind, v) in &mut samples {
        report
            .figures
            .insert(format!("{kind}_samples"), v.len() as u64);
        if let Some((p50, p99, max)) = liveness::percentiles(v) {
            report.figures.insert(format!("{kind}_p50_ms"), p50);
            report.figures.insert(format!("{kind}_p99_ms"), p99);
            report.figures.insert(format!("{kind}_max_ms"), max);
        }
    }
    report
}
