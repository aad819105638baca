//! `twosite simulate --compare`: the same world and the same fault schedules (same seeds) under
//! twosite and under what users run today ([`Policy`]): how long until a lost node's workloads
//! are released, run elsewhere, and until every app and volume is back, and which invariants
//! broke. The scripted scenarios' promises are twosite's and are not checked here; the
//! invariants (S1–S4 and the rest) are, for every policy.

use super::cluster::{Cluster, SimConfig, first_after};
use super::liveness::percentiles;
use super::policy::Policy;
use super::scenario::{self, Fault, Scenario, ScheduledFault, Site};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;

/// Every run lasts at least this long (virtual time), for the alternatives' minutes.
pub const HORIZON_MS: u64 = 900_000;

/// The scenarios `--compare` runs by default: the five, and three that give the
/// alternatives' timers the time to act (marked "compare only": `--compare --scenario` knows
/// them, `--list` does not).
pub const SCENARIOS: [&str; 8] = [
    "node-loss",
    "node-loss-long",
    "room-loss",
    "partition",
    "partition-witness",
    "partition-long",
    "holder-partitioned",
    "holder-frozen",
];

/// The compare-only scenarios, and the rest by their names.
pub fn named(name: &str, seed: u64) -> Option<Scenario> {
    let at = |s: u64, fault: Fault| ScheduledFault {
        at_ms: s * 1000,
        fault,
    };
    match name {
        "node-loss-long" => {
            // a-2 loses power at 60 s and stays off.
            let mut s = scenario::named("node-loss", seed)?;
            s.name = name.into();
            s.description = "a-2 loses power at 60 s and stays off (compare only)".into();
            s.faults.retain(|f| matches!(f.fault, Fault::PowerOff(_)));
            Some(s)
        }
        "partition-long" => {
            // Room B (2 workers, against 3 in room A) loses room A and the API server for
            // 10 minutes; a witness is configured.
            let mut s = scenario::named("partition-witness", seed)?;
            s.name = name.into();
            s.description = "rooms of 3 and 2 workers; room B loses room A and the API server \
                             from 60 s to 660 s, witness configured (compare only)"
                .into();
            s.nodes_per_room = (3, 2);
            s.faults = vec![
                at(60, Fault::Cut(Site::RoomA, Site::RoomB)),
                at(60, Fault::Cut(Site::RoomB, Site::Api)),
                at(660, Fault::Heal(Site::RoomA, Site::RoomB)),
                at(660, Fault::Heal(Site::RoomB, Site::Api)),
            ];
            Some(s)
        }
        _ => scenario::named(name, seed),
    }
}

/// A time in ms, "never" (it did not happen within the horizon), or not applicable (null).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    Ms(u64),
    Never,
    NotApplicable,
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Time::Ms(ms) => s.serialize_u64(*ms),
            Time::Never => s.serialize_str("never"),
            Time::NotApplicable => s.serialize_none(),
        }
    }
}

impl Time {
    fn text(self) -> String {
        match self {
            Time::Ms(ms) => format!("{:.1} s", ms as f64 / 1000.0),
            Time::Never => "never".into(),
            Time::NotApplicable => "-".into(),
        }
    }

    /// `self` over twosite's `base`: a number, "never", or null.
    fn ratio(self, base: Time) -> Ratio {
        match (self, base) {
            (Time::Ms(a), Time::Ms(b)) if b > 0 => {
                Ratio::Times((a as f64 / b as f64 * 10.0).round() / 10.0)
            }
            (Time::Never, Time::Ms(_)) => Ratio::Never,
            _ => Ratio::NotApplicable,
        }
    }
}

/// An alternative's time over twosite's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ratio {
    Times(f64),
    Never,
    NotApplicable,
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ratio::Times(x) => s.serialize_f64(*x),
            Ratio::Never => s.serialize_str("never"),
            Ratio::NotApplicable => s.serialize_none(),
        }
    }
}

impl Ratio {
    fn text(self) -> String {
        match self {
            Ratio::Times(x) => format!("x{x}"),
            // "never" already says it.
            Ratio::Never | Ratio::NotApplicable => String::new(),
        }
    }
}

/// One policy's run of one scenario. Times are from the fault that hit the target.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    pub policy: &'static str,
    /// The lost node's pods all deleted (released).
    pub released_ms: Time,
    /// The lost node's app running on another node.
    pub elsewhere_ms: Time,
    /// Every app and every volume running again (from the first fault; 0: nothing stopped).
    pub all_back_ms: Time,
    /// A volume's holder fault to another consumer's app running.
    pub volume_failover_ms: Time,
    /// Steps (of 100 ms) on which each invariant was violated.
    pub violations: BTreeMap<String, u64>,
    /// Ratios to twosite's times (null for twosite itself and where either is not applicable).
    pub released_ratio: Ratio,
    pub elsewhere_ratio: Ratio,
    pub all_back_ratio: Ratio,
    pub volume_failover_ratio: Ratio,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioComparison {
    pub scenario: String,
    pub description: String,
    pub target: Option<String>,
    pub fault_at_ms: Option<u64>,
    pub horizon_ms: u64,
    pub policies: Vec<PolicyRun>,
}

/// The node the figures follow and when it was hit: the scenario's target, else the first node
/// that loses power.
fn target_of(s: &Scenario) -> Option<(String, u64)> {
    let room = |n: &str| {
        if n.starts_with("a-") {
            Site::RoomA
        } else {
            Site::RoomB
        }
    };
    if let Some(t) = &s.target {
        return s.faults.iter().find_map(|f| match &f.fault {
            Fault::PowerOff(n) | Fault::AgentCrash(n) | Fault::Isolate(n) if n == t => {
                Some((t.clone(), f.at_ms))
            }
            Fault::Cut(a, b) if *a == room(t) || *b == room(t) => Some((t.clone(), f.at_ms)),
            _ => None,
        });
    }
    s.faults.iter().find_map(|f| match &f.fault {
        Fault::PowerOff(n) => Some((n.clone(), f.at_ms)),
        _ => None,
    })
}

/// Runs `scenario` under `policy` for at least [`HORIZON_MS`], without the scenario's promises.
pub fn run_policy(scenario: &Scenario, seed: u64, policy: Policy) -> PolicyRun {
    let mut s = scenario.clone();
    s.expectations.clear();
    s.volume_expectations.clear();
    s.vm_expectations.clear();
    s.duration_ms = s.duration_ms.max(HORIZON_MS);
    let cfg = SimConfig {
        extreme_drift: s.extreme_drift,
        stop_command_fails: s.stop_command_fails,
        policy,
        compare: true,
        // Without twosite, no webhook gates KubeVirt's launcher pods.
        vm_gate_off: !policy.is_twosite(),
        ..SimConfig::default()
    };
    let mut run = PolicyRun {
        policy: policy.name(),
        released_ms: Time::NotApplicable,
        elsewhere_ms: Time::NotApplicable,
        all_back_ms: Time::NotApplicable,
        volume_failover_ms: Time::NotApplicable,
        violations: BTreeMap::new(),
        released_ratio: Ratio::NotApplicable,
        elsewhere_ratio: Ratio::NotApplicable,
        all_back_ratio: Ratio::NotApplicable,
        volume_failover_ratio: Ratio::NotApplicable,
    };
    let mut cluster = match Cluster::new(&s, seed, cfg) {
        Ok(c) => c,
        Err(e) => {
            run.violations.insert(format!("configuration: {e}"), 1);
            return run;
        }
    };
    cluster.alt.first_fault = s.faults.first().map(|f| f.at_ms);
    let mut faults = s.faults.iter().peekable();
    while cluster.now <= s.duration_ms {
        while let Some(f) = faults.next_if(|f| f.at_ms <= cluster.now) {
            cluster.apply(&f.fault);
        }
        cluster.step();
    }
    let or_never = |t: Option<u64>| t.map_or(Time::Never, Time::Ms);
    if let Some((target, lost)) = target_of(&s) {
        run.released_ms =
            or_never(first_after(&cluster.record.released_at, &target, lost).map(|t| t - lost));
        let app = format!("app-{target}");
        let here = format!("node/{target}");
        run.elsewhere_ms = or_never(
            cluster
                .timeline
                .iter()
                .find(|e| {
                    e.t_ms > lost
                        && e.actor.starts_with("node/")
                        && e.actor != here
                        && e.event == format!("{app} running")
                })
                .map(|e| e.t_ms - lost),
        );
    }
    if let Some(first) = cluster.alt.first_fault {
        run.all_back_ms = match cluster.alt.all_up_since {
            _ if !cluster.alt.down_since_first_fault => Time::Ms(0),
            Some(t) => Time::Ms(t.saturating_sub(first)),
            None => Time::Never,
        };
    }
    if !cluster.record.volumes.holder_faults.is_empty() {
        let mut figures = BTreeMap::new();
        cluster.volume_figures(&mut figures);
        run.volume_failover_ms = or_never(figures.get("failover_ms").copied());
    }
    for v in &cluster.violations {
        *run.violations.entry(v.invariant.clone()).or_default() += 1;
    }
    run
}

/// Runs one scenario under every policy and computes the ratios to twosite's times.
pub fn compare(scenario: &Scenario, seed: u64) -> ScenarioComparison {
    let mut policies: Vec<PolicyRun> = Policy::ALL
        .iter()
        .map(|p| run_policy(scenario, seed, *p))
        .collect();
    if let Some(base) = policies.first().cloned() {
        for p in policies.iter_mut().skip(1) {
            p.released_ratio = p.released_ms.ratio(base.released_ms);
            p.elsewhere_ratio = p.elsewhere_ms.ratio(base.elsewhere_ms);
            p.all_back_ratio = p.all_back_ms.ratio(base.all_back_ms);
            p.volume_failover_ratio = p.volume_failover_ms.ratio(base.volume_failover_ms);
        }
    }
    let target = target_of(scenario);
    ScenarioComparison {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        target: target.as_ref().map(|(t, _)| t.clone()),
        fault_at_ms: target.map(|(_, at)| at),
        horizon_ms: scenario.duration_ms.max(HORIZON_MS),
        policies,
    }
}

/// One policy over many random schedules.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicySummary {
    pub policy: &'static str,
    pub schedules: u64,
    /// Schedules with at least one violated invariant.
    pub failing_schedules: u64,
    /// Per invariant: schedules in which it was violated, and violating steps over all.
    pub schedules_violating: BTreeMap<String, u64>,
    pub violation_steps: BTreeMap<String, u64>,
    /// Schedules with a node losing power: its app running elsewhere, p50/p99/max, and how
    /// often never.
    pub elsewhere_samples: u64,
    pub elsewhere_p50_ms: Option<u64>,
    pub elsewhere_p99_ms: Option<u64>,
    pub elsewhere_max_ms: Option<u64>,
    pub elsewhere_never: u64,
    /// Every app and volume back after the first fault.
    pub all_back_p50_ms: Option<u64>,
    pub all_back_p99_ms: Option<u64>,
    pub all_back_never: u64,
}

/// `n` random schedules (seeds `seed..seed+n`) under every policy, spread over the cores.
pub fn compare_schedules(seed: u64, n: u64) -> Vec<PolicySummary> {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get() as u64);
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let runs: Vec<Vec<PolicyRun>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(usize::try_from(chunk).unwrap_or(usize::MAX))
            .map(|start| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for k in start..n.min(start + chunk) {
                        let s = seed.wrapping_add(k);
                        let scenario = scenario::random(s);
                        for p in Policy::ALL {
                            out.push(run_policy(&scenario, s, p));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut out = Vec::new();
    for policy in Policy::ALL {
        let mut sum = PolicySummary {
            policy: policy.name(),
            ..PolicySummary::default()
        };
        let (mut elsewhere, mut back) = (Vec::new(), Vec::new());
        for run in runs.iter().flatten().filter(|r| r.policy == policy.name()) {
            sum.schedules += 1;
            if !run.violations.is_empty() {
                sum.failing_schedules += 1;
            }
            for (inv, steps) in &run.violations {
                *sum.schedules_violating.entry(inv.clone()).or_default() += 1;
                *sum.violation_steps.entry(inv.clone()).or_default() += steps;
            }
            match run.elsewhere_ms {
                Time::Ms(t) => elsewhere.push(t),
                Time::Never => sum.elsewhere_never += 1,
                Time::NotApplicable => {}
            }
            match run.all_back_ms {
                Time::Ms(t) => back.push(t),
                Time::Never => sum.all_back_never += 1,
                Time::NotApplicable => {}
            }
        }
        sum.elsewhere_samples = elsewhere.len() as u64 + sum.elsewhere_never;
        if let Some((p50, p99, max)) = percentiles(&mut elsewhere) {
            (
                sum.elsewhere_p50_ms,
                sum.elsewhere_p99_ms,
                sum.elsewhere_max_ms,
            ) = (Some(p50), Some(p99), Some(max));
        }
        if let Some((p50, p99, _)) = percentiles(&mut back) {
            (sum.all_back_p50_ms, sum.all_back_p99_ms) = (Some(p50), Some(p99));
        }
        out.push(sum);
    }
    out
}

/// What `--compare` prints (`--json`: exactly this object).
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub seed: u64,
    pub scenarios: Vec<ScenarioComparison>,
    pub schedules: Option<Vec<PolicySummary>>,
}

impl CompareReport {
    /// The table as text.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for s in &self.scenarios {
            out += &format!(
                "{} (seed {}, {} s simulated){}: {}\n",
                s.scenario,
                self.seed,
                s.horizon_ms / 1000,
                s.target
                    .as_ref()
                    .zip(s.fault_at_ms)
                    .map_or(String::new(), |(t, at)| format!(
                        ", times from {t}'s fault at {} s",
                        at / 1000
                    )),
                s.description
            );
            out += &format!(
                "  {:<15} {:>16} {:>16} {:>16} {:>16}  violations (steps of 100 ms)\n",
                "policy", "released", "runs elsewhere", "all back", "volume failover"
            );
            for p in &s.policies {
                let cell = |t: Time, r: Ratio| {
                    let r = r.text();
                    if r.is_empty() {
                        t.text()
                    } else {
                        format!("{} {r}", t.text())
                    }
                };
                let violations = if p.violations.is_empty() {
                    "none".to_string()
                } else {
                    p.violations
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                out += &format!(
                    "  {:<15} {:>16} {:>16} {:>16} {:>16}  {violations}\n",
                    p.policy,
                    cell(p.released_ms, p.released_ratio),
                    cell(p.elsewhere_ms, p.elsewhere_ratio),
                    cell(p.all_back_ms, p.all_back_ratio),
                    cell(p.volume_failover_ms, p.volume_failover_ratio),
                );
            }
            out += "\n";
        }
        if let Some(sums) = &self.schedules {
            let secs =
                |t: Option<u64>| t.map_or("-".into(), |t| format!("{:.1} s", t as f64 / 1000.0));
            for p in sums {
                out += &format!(
                    "{} over {} random schedules: {} with a violation{}; runs elsewhere p50 {} p99 {} max {} (never in {} of {}); all back p50 {} p99 {} (never in {})\n",
                    p.policy,
                    p.schedules,
                    p.failing_schedules,
                    if p.schedules_violating.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({})",
                            p.schedules_violating
                                .iter()
                                .map(|(k, v)| format!("{k} in {v}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    secs(p.elsewhere_p50_ms),
                    secs(p.elsewhere_p99_ms),
                    secs(p.elsewhere_max_ms),
                    p.elsewhere_never,
                    p.elsewhere_samples,
                    secs(p.all_back_p50_ms),
                    secs(p.all_back_p99_ms),
                    p.all_back_never,
                );
            }
        }
        out
    }
}
