//! Randomised test of the volume lease core: two or three guards on drifting clocks share one
//! simulated Lease (compare-and-swap on the resourceVersion) through a lossy, delaying API with
//! outages, link cuts, guard pauses, slow stops, node resets, planned switchovers and the
//! controller's fence-and-handover. On every 10 ms of real time it checks that at most one app
//! runs (a stopping app counts as running until its stop finishes) and that epochs only rise.
//!
//! Worst cases are modelled on purpose: an app starts the instant it is told, a node agent
//! fences at the latest moment it may (`fence_delay` after the armed deadline), and the agent
//! keeps the deadline while the guard is paused.
//!
//! The checker is shown to fail when an assumption is broken: clocks drifting beyond the bound,
//! a timing `validate()` refuses forced through, and a node agent that does not hold the guard's
//! deadline on its own.

use node_health::MonoTime;
use node_health::volume::{
    GuardAction, VolumeGuard, VolumeLease, VolumeTiming, WriteId, WriteOutcome, handover,
};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};
use std::fmt;
use std::time::Duration;

/// Real-time step of the simulation and of the checks.
const TICK: u64 = 10;
/// The drift bound the guards' timing assumes (1 %).
const BOUND: i64 = 10_000;

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    guards: usize,
    /// Each guard's clock rate minus real time's, parts per million.
    drift_ppm: Vec<i64>,
    timing: VolumeTiming,
    /// Construct guards with `new_unchecked` (a timing `validate` refuses, forced through).
    unchecked: bool,
    /// The node agent fences at the armed deadline on its own (not only when asked).
    agent_enforces: bool,
    /// Outages, link cuts, pauses, losses and the controller's fences; without them only
    /// delays and planned switchovers remain.
    faults: bool,
    run_ms: u64,
}

impl Scenario {
    fn new(seed: u64, guards: usize, drift_ppm: Vec<i64>) -> Self {
        Scenario {
            seed,
            guards,
            drift_ppm,
            timing: VolumeTiming::default(),
            unchecked: false,
            agent_enforces: true,
            faults: true,
            run_ms: 240_000,
        }
    }
}

#[derive(Debug, Default)]
struct Report {
    violations: Vec<String>,
    /// Real time during which exactly one app ran.
    one_running_ms: u64,
    run_ms: u64,
    /// The longest stretch of real time with no app running, after the first start.
    max_gap_ms: u64,
    /// Takes by basis: released, expired, handed over, own lease.
    takes: [u64; 4],
    agent_fences: u64,
    fence_requests: u64,
    switchovers: u64,
    handovers: u64,
    /// The last events before the first violation.
    log: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "violations: {:?}", self.violations)?;
        writeln!(
            f,
            "one app running {} of {} ms (longest gap {} ms); takes (released, expired, handed over, own) {:?}; \
             agent fences {}; fence requests {}; switchovers {}; handovers {}",
            self.one_running_ms,
            self.run_ms,
            self.max_gap_ms,
            self.takes,
            self.agent_fences,
            self.fence_requests,
            self.switchovers,
            self.handovers
        )?;
        for l in &self.log {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum App {
    Stopped,
    Running { epoch: u64 },
    Stopping { epoch: u64, done_at: u64 },
}

#[derive(Debug, Clone)]
enum Msg {
    Lease(Option<VolumeLease>),
    Result(WriteId, WriteOutcome),
}

struct Node {
    rate_ppm: i64,
    offset: u64,
    incarnation: u32,
    guard: Option<VolumeGuard>,
    app: App,
    /// The fence deadline the node agent holds (this node's clock).
    armed: Option<MonoTime>,
    /// The guard asked for a fence: the agent fences at this local time.
    fence_requested: Option<MonoTime>,
    /// The app's stop finished; the guard has not been told yet (it may be paused).
    stop_pending: bool,
    down_until: u64,
    pauses: Vec<(u64, u64)>,
    cuts: Vec<(u64, u64)>,
    inbox: Vec<(u64, u32, Msg)>,
    watch_at: u64,
}

impl Node {
    fn local(&self, t: u64) -> MonoTime {
        let scaled = i128::from(t) * i128::from(1_000_000 + self.rate_ppm) / 1_000_000;
        MonoTime(self.offset + u64::try_from(scaled).expect("clock runs forward"))
    }

    fn identity(&self, i: usize) -> String {
        format!("g{i}.{}", self.incarnation)
    }
}

struct Request {
    at: u64,
    node: usize,
    incarnation: u32,
    action: GuardAction,
}

fn windows(rng: &mut TestRng, run: u64, gap: (u64, u64), len: (u64, u64)) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut t = rng.random_range(0..gap.1);
    while t < run {
        let end = t + rng.random_range(len.0..len.1);
        out.push((t, end));
        t = end + rng.random_range(gap.0..gap.1);
    }
    out
}

fn window_end(w: &[(u64, u64)], t: u64) -> Option<u64> {
    w.iter().find(|(a, b)| *a <= t && t < *b).map(|(_, b)| *b)
}

/// A network delay: mostly short, sometimes long, rarely (with faults) very long.
fn delay(rng: &mut TestRng, faults: bool) -> u64 {
    if !faults {
        return rng.random_range(1..300);
    }
    match rng.random_range(0..100) {
        0..85 => rng.random_range(1..60),
        85..98 => rng.random_range(60..1_500),
        _ => rng.random_range(1_500..4_000),
    }
}

fn stop_time(rng: &mut TestRng, faults: bool) -> u64 {
    if !faults {
        return rng.random_range(50..1_500);
    }
    match rng.random_range(0..100) {
        0..70 => rng.random_range(50..1_000),
        70..95 => rng.random_range(1_000..3_000),
        _ => rng.random_range(3_000..10_000),
    }
}

struct World {
    sc: Scenario,
    rng: TestRng,
    nodes: Vec<Node>,
    lease: VolumeLease,
    rv: u64,
    max_granted: u64,
    last_started: Option<u64>,
    outages: Vec<(u64, u64)>,
    requests: Vec<Request>,
    /// Preferred holder set by the controller, and since when.
    switchover: Option<(String, u64)>,
    report: Report,
    log: Vec<String>,
    idle_since: Option<u64>,
}

impl World {
    fn new(sc: Scenario) -> Self {
        let mut seed = [0u8; 32];
        for (i, b) in sc.seed.to_le_bytes().iter().enumerate() {
            seed[i] = *b;
            seed[i + 8] = b.wrapping_mul(31);
        }
        let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
        let run = sc.run_ms;
        let faulty = |rng: &mut TestRng, gap, len| {
            let w = windows(rng, run, gap, len);
            if sc.faults { w } else { Vec::new() }
        };
        let outages = faulty(&mut rng, (20_000, 90_000), (1_000, 20_000));
        let nodes = (0..sc.guards)
            .map(|i| Node {
                rate_ppm: sc.drift_ppm.get(i).copied().unwrap_or(0),
                offset: rng.random_range(0..1_000_000),
                incarnation: 0,
                guard: None,
                app: App::Stopped,
                armed: None,
                fence_requested: None,
                stop_pending: false,
                down_until: rng.random_range(0..3_000),
                pauses: faulty(&mut rng, (10_000, 60_000), (200, 15_000)),
                cuts: faulty(&mut rng, (10_000, 60_000), (1_000, 30_000)),
                inbox: Vec::new(),
                watch_at: 0,
            })
            .collect();
        World {
            rng,
            nodes,
            lease: VolumeLease {
                held_for_node: None,
                holder: None,
                epoch: 0,
                resource_version: "1".into(),
                preferred_holder: None,
                released: false,
                handover: None,
                duration: sc.timing.duration,
            },
            rv: 1,
            max_granted: 0,
            last_started: None,
            outages,
            requests: Vec::new(),
            switchover: None,
            report: Report {
                run_ms: run,
                ..Report::default()
            },
            log: Vec::new(),
            idle_since: None,
            sc,
        }
    }

    fn note(&mut self, t: u64, what: String) {
        let line = format!("{:>9.3}s {what}", t as f64 / 1_000.0);
        if std::env::var_os("VOLUME_SIM_TRACE").is_some() {
            println!("{line}");
        }
        self.log.push(line);
        if self.log.len() > 60 {
            self.log.remove(0);
        }
    }

    fn violation(&mut self, t: u64, what: String) {
        self.note(t, format!("VIOLATION {what}"));
        if self.report.violations.is_empty() {
            self.report.log = self.log.clone();
        }
        self.report.violations.push(format!("t={t}ms {what}"));
    }

    fn api_up(&self, t: u64) -> bool {
        window_end(&self.outages, t).is_none()
    }

    fn reachable(&self, i: usize, t: u64) -> bool {
        self.api_up(t) && window_end(&self.nodes[i].cuts, t).is_none()
    }

    /// The Lease changed: bump the resourceVersion and send it down every watch.
    fn changed(&mut self, t: u64, old_epoch: u64) {
        if self.lease.epoch < old_epoch {
            self.violation(t, format!("leaseTransitions fell below {old_epoch}"));
        }
        self.rv += 1;
        self.lease.resource_version = self.rv.to_string();
        for i in 0..self.nodes.len() {
            let blind_until = window_end(&self.outages, t)
                .into_iter()
                .chain(window_end(&self.nodes[i].cuts, t))
                .max()
                .unwrap_or(0);
            let d = if !self.sc.faults || self.rng.random_range(0..100) < 95 {
                self.rng.random_range(5..200)
            } else {
                self.rng.random_range(200..3_000)
            };
            let n = &mut self.nodes[i];
            n.watch_at = n.watch_at.max(t + d).max(blind_until + d);
            let inc = n.incarnation;
            n.inbox
                .push((n.watch_at, inc, Msg::Lease(Some(self.lease.clone()))));
        }
    }

    fn apply(&mut self, t: u64, who: &str, a: &GuardAction) -> WriteOutcome {
        let (expected_rv, epoch) = match a {
            GuardAction::Acquire {
                expected_rv, epoch, ..
            }
            | GuardAction::Renew {
                expected_rv, epoch, ..
            }
            | GuardAction::Release {
                expected_rv, epoch, ..
            } => (expected_rv, *epoch),
            _ => return WriteOutcome::Failed,
        };
        if *expected_rv != self.lease.resource_version {
            return WriteOutcome::Conflict;
        }
        let old = self.lease.epoch;
        match a {
            GuardAction::Acquire { .. } => {
                let basis = match (&self.lease.handover, self.lease.holder()) {
                    (Some(h), _) if h.to == who => 2,
                    (_, None) => 0,
                    (_, Some(h)) if h == who => 3,
                    _ => 1,
                };
                self.report.takes[basis] += 1;
                if epoch <= self.max_granted && self.max_granted > 0 {
                    self.violation(
                        t,
                        format!(
                            "S4: {who} granted epoch {epoch}, not above {}",
                            self.max_granted
                        ),
                    );
                }
                self.max_granted = self.max_granted.max(epoch);
                self.lease.holder = Some(who.to_string());
                self.lease.epoch = epoch;
                self.lease.released = false;
                self.lease.handover = None;
                self.lease.duration = self.sc.timing.duration;
                self.note(
                    t,
                    format!("lease: {who} takes epoch {epoch} (basis {basis})"),
                );
            }
            GuardAction::Release { .. } => {
                self.lease.holder = None;
                self.lease.released = true;
                self.note(t, format!("lease: {who} releases epoch {epoch}"));
            }
            _ => {}
        }
        self.changed(t, old);
        WriteOutcome::Ok(self.lease.clone())
    }

    fn serve(&mut self, t: u64) {
        let (due, rest): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.requests)
            .into_iter()
            .partition(|r| r.at <= t);
        self.requests = rest;
        for r in due {
            let i = r.node;
            let who = self.nodes[i].identity(i);
            if self.nodes[i].incarnation != r.incarnation {
                // Sent by a guard whose node has since reset: it died on the wire.
                continue;
            }
            let back = t + delay(&mut self.rng, self.sc.faults);
            let reply = |w: &mut World, msg: Msg| {
                let n = &mut w.nodes[i];
                n.inbox.push((back, r.incarnation, msg));
            };
            if !self.reachable(i, t) {
                if let Some(id) = write_id(&r.action) {
                    reply(self, Msg::Result(id, WriteOutcome::Failed));
                }
                continue;
            }
            let lost = self.sc.faults && self.rng.random_range(0..100) < 3;
            if lost {
                continue; // the request is lost
            }
            let msg = match write_id(&r.action) {
                None => Msg::Lease(Some(self.lease.clone())),
                Some(id) => Msg::Result(id, self.apply(t, &who, &r.action)),
            };
            let lost = self.sc.faults && self.rng.random_range(0..100) < 3;
            if lost {
                continue; // the answer is lost
            }
            reply(self, msg);
        }
    }

    fn reset(&mut self, i: usize, t: u64, why: &str) {
        let down = self.rng.random_range(3_000..15_000);
        let n = &mut self.nodes[i];
        n.app = App::Stopped;
        n.guard = None;
        n.armed = None;
        n.fence_requested = None;
        n.stop_pending = false;
        n.inbox.clear();
        n.incarnation += 1;
        n.down_until = t + down;
        self.note(t, format!("node {i} reset: {why}"));
    }

    fn agents(&mut self, t: u64) {
        let f = self.sc.timing.fence_delay;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let now = n.local(t);
            let by_deadline = self.sc.agent_enforces && n.armed.is_some_and(|at| now >= at + f);
            let by_request = n.fence_requested.is_some_and(|at| now >= at);
            if n.app != App::Stopped && (by_deadline || by_request) {
                self.report.agent_fences += 1;
                self.reset(i, t, "the node agent fences it");
                continue;
            }
            let n = &mut self.nodes[i];
            if let App::Stopping { done_at, .. } = n.app
                && t >= done_at
            {
                n.app = App::Stopped;
                n.stop_pending = true;
                self.note(t, format!("node {i} app stopped"));
            }
            let n = &mut self.nodes[i];
            if n.guard.is_none() && t >= n.down_until {
                let id = n.identity(i);
                n.guard = Some(if self.sc.unchecked {
                    VolumeGuard::new_unchecked(id, self.sc.timing)
                } else {
                    VolumeGuard::new(id, self.sc.timing).expect("valid timing")
                });
                n.watch_at = t;
            }
        }
    }

    fn guards(&mut self, t: u64) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if n.guard.is_none() || window_end(&n.pauses, t).is_some() {
                continue;
            }
            let now = n.local(t);
            let inc = n.incarnation;
            let mut inbox = std::mem::take(&mut n.inbox);
            inbox.sort_by_key(|(at, _, _)| *at);
            let (due, later): (Vec<_>, Vec<_>) = inbox.into_iter().partition(|m| m.0 <= t);
            n.inbox = later;
            let stop_pending = std::mem::take(&mut n.stop_pending);
            let Some(g) = n.guard.as_mut() else { continue };
            for (_, from, msg) in due {
                if from != inc {
                    continue;
                }
                match msg {
                    Msg::Lease(l) => g.observe(l, now),
                    Msg::Result(id, o) => g.write_result(id, o, now),
                }
            }
            if stop_pending {
                g.app_stopped();
            }
            let actions = g.step(now);
            for a in actions {
                self.act(i, t, a);
            }
        }
    }

    fn act(&mut self, i: usize, t: u64, a: GuardAction) {
        let stop = stop_time(&mut self.rng, self.sc.faults);
        let d = delay(&mut self.rng, self.sc.faults);
        let n = &mut self.nodes[i];
        match a {
            GuardAction::Refresh
            | GuardAction::Acquire { .. }
            | GuardAction::Renew { .. }
            | GuardAction::Release { .. } => {
                let incarnation = n.incarnation;
                self.requests.push(Request {
                    at: t + d,
                    node: i,
                    incarnation,
                    action: a,
                });
            }
            GuardAction::ArmFence { at } => n.armed = Some(at),
            GuardAction::DisarmFence => {
                n.armed = None;
                if n.app != App::Stopped {
                    self.violation(t, format!("node {i} disarmed while its app runs"));
                }
            }
            GuardAction::StartApp { epoch } => {
                let armed = n.armed.is_some();
                let was = n.app;
                n.app = App::Running { epoch };
                if !armed {
                    self.violation(t, format!("node {i} started without a fence deadline"));
                }
                if was != App::Stopped {
                    self.violation(t, format!("node {i} started over {was:?}"));
                }
                if self.last_started.is_some_and(|e| epoch <= e) {
                    self.violation(
                        t,
                        format!(
                            "S4: node {i} starts epoch {epoch} after {:?}",
                            self.last_started
                        ),
                    );
                }
                self.last_started = Some(epoch);
                self.note(t, format!("node {i} app starts, epoch {epoch}"));
            }
            GuardAction::StopApp => {
                if let App::Running { epoch } = n.app {
                    n.app = App::Stopping {
                        epoch,
                        done_at: t + stop,
                    };
                    self.note(t, format!("node {i} app stopping ({stop} ms)"));
                }
            }
            GuardAction::RequestFence => {
                self.report.fence_requests += 1;
                let f = self.sc.timing.fence_delay;
                n.fence_requested = Some(n.local(t) + f);
                self.note(t, format!("node {i} guard requests a fence"));
            }
        }
    }

    /// The controller: planned switchovers, and fence-then-handover of a holder's node (the
    /// simulation fences for real, so the controller's proof is not what is tested here).
    fn controller(&mut self, t: u64, switch_at: &mut u64, fence_at: &mut u64) {
        if !self.api_up(t) {
            return;
        }
        let holder = self.lease.holder().map(str::to_string);
        let node_of = |id: &str| {
            id.trim_start_matches('g')
                .split('.')
                .next()
                .and_then(|s| s.parse::<usize>().ok())
        };
        if let Some((p, since)) = self.switchover.clone()
            && (holder.as_deref() == Some(p.as_str()) || t > since + 40_000)
        {
            if holder.as_deref() == Some(p.as_str()) {
                self.report.switchovers += 1;
            }
            self.switchover = None;
            self.lease.preferred_holder = None;
            let e = self.lease.epoch;
            self.changed(t, e);
        }
        let live: Vec<String> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].guard.is_some())
            .map(|i| self.nodes[i].identity(i))
            .collect();
        if t >= *switch_at {
            *switch_at = t + self.rng.random_range(15_000..60_000);
            if let Some(h) = &holder
                && self.switchover.is_none()
            {
                let others: Vec<&String> = live.iter().filter(|g| *g != h).collect();
                if !others.is_empty() {
                    let to = others[self.rng.random_range(0..others.len())].clone();
                    self.note(t, format!("controller: switchover to {to}"));
                    self.lease.preferred_holder = Some(to.clone());
                    self.switchover = Some((to, t));
                    let e = self.lease.epoch;
                    self.changed(t, e);
                }
            }
        }
        if t >= *fence_at && self.sc.faults {
            *fence_at = t + self.rng.random_range(40_000..120_000);
            if let Some(h) = &holder
                && let Some(i) = node_of(h)
                && i < self.nodes.len()
            {
                self.reset(i, t, "the controller fences it");
                let others: Vec<&String> = live.iter().filter(|g| *g != h).collect();
                if !others.is_empty() {
                    let to = others[self.rng.random_range(0..others.len())].clone();
                    match handover(&self.lease, &to) {
                        Ok((_, h)) => {
                            self.note(
                                t,
                                format!("controller: handover to {to}, epoch {}", h.epoch),
                            );
                            self.lease.handover = Some(h);
                            self.report.handovers += 1;
                            let e = self.lease.epoch;
                            self.changed(t, e);
                        }
                        Err(e) => self.violation(t, format!("handover refused: {e}")),
                    }
                }
            }
        }
    }

    fn check(&mut self, t: u64) {
        let running: Vec<(usize, App)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.app != App::Stopped)
            .map(|(i, n)| (i, n.app))
            .collect();
        match running.len() {
            0 => {
                if let Some(since) = self.idle_since {
                    self.report.max_gap_ms = self.report.max_gap_ms.max(t - since);
                } else if self.last_started.is_some() {
                    self.idle_since = Some(t);
                }
            }
            1 => {
                self.idle_since = None;
                self.report.one_running_ms += TICK;
            }
            _ => self.violation(t, format!("S1: two writers {running:?}")),
        }
    }

    fn run(mut self) -> Report {
        let mut switch_at = self.rng.random_range(10_000..40_000);
        let mut fence_at = self.rng.random_range(30_000..90_000);
        let mut t = 0;
        while t <= self.sc.run_ms && self.report.violations.is_empty() {
            self.controller(t, &mut switch_at, &mut fence_at);
            self.serve(t);
            self.agents(t);
            self.guards(t);
            self.check(t);
            t += TICK;
        }
        self.report
    }
}

fn write_id(a: &GuardAction) -> Option<WriteId> {
    match a {
        GuardAction::Acquire { id, .. }
        | GuardAction::Renew { id, .. }
        | GuardAction::Release { id, .. } => Some(*id),
        _ => None,
    }
}

fn simulate(sc: Scenario) -> Report {
    World::new(sc).run()
}

fn drift_within(bound: i64) -> impl Strategy<Value = i64> {
    // The bound itself, both ways, is the worst case: pick it often.
    prop_oneof![Just(-bound), Just(bound), -bound..=bound]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn never_two_writers_and_epochs_only_rise(
        seed in any::<u64>(),
        guards in 2usize..=3,
        drift in proptest::collection::vec(drift_within(BOUND), 3),
    ) {
        let report = simulate(Scenario::new(seed, guards, drift));
        prop_assert!(report.violations.is_empty(), "seed {seed}\n{report}");
    }
}

/// Many fixed seeds: nothing unsafe, and the runs reach every path (so the property above is
/// not vacuous) while keeping the volume served most of the time.
#[test]
fn fixed_seeds_are_safe_and_cover_every_path() {
    let mut total = Report::default();
    for seed in 0..60u64 {
        let drift = vec![-BOUND, BOUND, (seed as i64 % 3 - 1) * BOUND];
        let r = simulate(Scenario::new(seed, 2 + (seed as usize % 2), drift));
        assert!(r.violations.is_empty(), "seed {seed}\n{r}");
        total.one_running_ms += r.one_running_ms;
        total.run_ms += r.run_ms;
        for (a, b) in total.takes.iter_mut().zip(r.takes) {
            *a += b;
        }
        total.agent_fences += r.agent_fences;
        total.fence_requests += r.fence_requests;
        total.switchovers += r.switchovers;
        total.handovers += r.handovers;
    }
    println!("{total}");
    assert!(total.takes.iter().all(|&n| n > 0), "{total}");
    assert!(
        total.agent_fences > 0 && total.fence_requests > 0,
        "{total}"
    );
    assert!(total.switchovers > 0 && total.handovers > 0, "{total}");
    // Harsh faults (each node cut off about a third of the time, pauses up to 15 s, a fence
    // every minute or so) keep the volume down for long; still it must be served often.
    assert!(
        total.one_running_ms * 10 > total.run_ms * 4,
        "served less than 40 % of the time: {total}"
    );
}

/// Without faults the volume is served all the time but for planned switchovers, each well
/// under the brief's 5 s.
#[test]
fn without_faults_switchovers_are_quick() {
    for seed in std::env::var("VOLUME_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(0..20u64, |s: u64| s..s + 1)
    {
        let r = simulate(Scenario {
            faults: false,
            ..Scenario::new(seed, 3, vec![-BOUND, BOUND, 0])
        });
        assert!(r.violations.is_empty(), "seed {seed}\n{r}");
        assert!(r.switchovers >= 3, "seed {seed}\n{r}");
        assert!(r.max_gap_ms < 5_000, "seed {seed}\n{r}");
        assert!(r.one_running_ms * 100 > r.run_ms * 95, "seed {seed}\n{r}");
    }
}

/// Runs seeds until one breaks an invariant; panics if none of `seeds` does.
fn finds_violation(what: &str, seeds: u64, make: impl Fn(u64) -> Scenario) {
    for seed in 0..seeds {
        let r = simulate(make(seed));
        if let Some(v) = r.violations.first() {
            println!("{what}: seed {seed} found {v}\n{r}");
            assert!(v.contains("S1"), "{what}: {v}");
            return;
        }
    }
    panic!("{what}: no violation in {seeds} seeds: the checker would miss this");
}

#[test]
fn the_checker_finds_two_writers_when_clocks_drift_beyond_the_bound() {
    finds_violation("drift 40 %", 200, |seed| {
        Scenario::new(seed, 3, vec![-400_000, 400_000, -400_000])
    });
}

#[test]
fn the_checker_finds_two_writers_with_a_refused_timing_forced_through() {
    let timing = VolumeTiming {
        // A holder that demotes after 14 s writes on after a taker's 12.12 s wait.
        demote_after: Duration::from_secs(14),
        ..VolumeTiming::default()
    };
    assert!(timing.validate().is_err());
    finds_violation("demote after 14 s", 200, |seed| Scenario {
        timing,
        unchecked: true,
        ..Scenario::new(seed, 3, vec![-BOUND, BOUND, 0])
    });
}

#[test]
fn the_checker_finds_two_writers_when_the_agent_does_not_hold_the_deadline() {
    finds_violation("paused guard, no agent deadline", 200, |seed| Scenario {
        agent_enforces: false,
        ..Scenario::new(seed, 3, vec![-BOUND, BOUND, 0])
    });
}

/// A longer soak: `VOLUME_SIM_SEEDS=5000 cargo test --test volume_sim -- --ignored soak`.
#[test]
#[ignore = "long: run on demand"]
fn soak() {
    let seeds: u64 = std::env::var("VOLUME_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    for seed in 0..seeds {
        let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed as u8; 32]);
        let guards = 2 + (seed as usize % 2);
        let drift = (0..3)
            .map(|_| match rng.random_range(0..3) {
                0 => -BOUND,
                1 => BOUND,
                _ => rng.random_range(-BOUND..=BOUND),
            })
            .collect();
        let r = simulate(Scenario::new(seed.wrapping_mul(0x9E37_79B9), guards, drift));
        assert!(r.violations.is_empty(), "seed {seed}\n{r}");
    }
}
