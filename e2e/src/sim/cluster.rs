//! The simulated two-room cluster: nodes with drifting clocks, kubelets and agents that renew
//! their Leases, a node-lifecycle controller, links that can be cut, and two controller
//! replicas that run the real core (`node_health`) for leader election, verdicts and pairing.

use super::api::{ApiServer, Key, LeaseObj, NodeObj, Obj, Precondition, StatusObj, Stored};
use super::report::{TimelineEntry, Violation};
use super::scenario::{Expectation, Fault, Scenario, Site, node_name};
use node_health::{
    HealthTiming, Heartbeat, LeaderAction, LeaderConfig, LeaderElector, LeaseRecord, MonoTime,
    NodeFacts, NodeObservation, NodeVerdict, Pair, Readiness, RoomConfig, judge, pair_nodes,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Virtual time advances in steps of this many milliseconds; invariants are checked after each.
pub const TICK_MS: u64 = 100;
/// kubelet renews its node Lease every 10 s.
const KUBELET_RENEW_MS: u64 = 10_000;
/// node-monitor-grace-period (50 s since Kubernetes 1.32) and the lifecycle controller's period.
const NODE_GRACE_MS: u64 = 50_000;
const NODE_MONITOR_PERIOD_MS: u64 = 5_000;

/// A clock that runs at `1 + rate_ppm/1e6` times real time from an origin.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    origin_real: u64,
    rate_ppm: i64,
}

impl SimClock {
    pub fn new(origin_real: u64, rate_ppm: i64) -> Self {
        SimClock {
            origin_real,
            rate_ppm,
        }
    }

    pub fn read(&self, real: u64) -> MonoTime {
        let elapsed = i128::from(real.saturating_sub(self.origin_real));
        let local = elapsed * (1_000_000 + i128::from(self.rate_ppm)) / 1_000_000;
        MonoTime(u64::try_from(local.max(0)).unwrap_or(u64::MAX))
    }
}

#[derive(Debug)]
struct SimNode {
    name: String,
    room: Site,
    powered: bool,
    boot_id: u64,
    clock: SimClock,
    has_agent: bool,
    next_kubelet: MonoTime,
    next_agent: MonoTime,
}

#[derive(Debug)]
enum Outcome {
    Ok(LeaseRecord),
    Conflict,
}

#[derive(Debug)]
struct PendingWrite {
    deliver_at: u64,
    sent_at: MonoTime,
    outcome: Outcome,
}

/// One controller replica: the state a real controller process keeps in memory.
#[derive(Debug)]
struct Replica {
    name: String,
    room: Site,
    host: String,
    up: bool,
    clock: SimClock,
    elector: LeaderElector,
    next_retry: MonoTime,
    pending: Option<PendingWrite>,
    connected: bool,
    /// Real time at which the re-list after the last (re)connect is delivered: the watch is
    /// synced from then on.
    synced_at: Option<u64>,
    queue: VecDeque<(u64, Key, Option<Stored>)>,
    last_delivery: u64,
    facts: BTreeMap<String, NodeFacts>,
    obs: BTreeMap<String, NodeObservation>,
    verdicts: BTreeMap<String, NodeVerdict>,
    status: Option<(u64, StatusObj)>,
    leading: bool,
}

impl Replica {
    fn restart(&mut self, now: u64, rate_ppm: i64) {
        self.clock = SimClock::new(now, rate_ppm);
        self.elector.reset();
        self.next_retry = MonoTime::ZERO;
        self.pending = None;
        self.connected = false;
        self.synced_at = None;
        self.queue.clear();
        self.facts.clear();
        self.obs.clear();
        self.verdicts.clear();
        self.status = None;
        self.leading = false;
    }
}

/// Knobs of one run that are not faults.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub timing: HealthTiming,
    pub leader: LeaderConfig,
    /// Watch events arrive this many ms after the write (uniform).
    pub watch_delay_ms: (u64, u64),
    /// API answers arrive this many ms after the request (uniform).
    pub response_delay_ms: (u64, u64),
    /// Clock rates are drawn within ± this many ppm.
    pub drift_ppm: i64,
}

impl Default for SimConfig {
    fn default() -> Self {
        let timing = HealthTiming::default();
        SimConfig {
            timing,
            leader: LeaderConfig::new("unset"),
            watch_delay_ms: (20, 400),
            response_delay_ms: (5, 200),
            drift_ppm: i64::try_from(timing.drift_ppm).unwrap_or(0),
        }
    }
}

/// The whole simulated world at one instant of real (virtual) time.
pub struct Cluster {
    pub now: u64,
    rng: ChaCha8Rng,
    cfg: SimConfig,
    cut: BTreeSet<(Site, Site)>,
    api: ApiServer,
    nodes: Vec<SimNode>,
    replicas: Vec<Replica>,
    next_boot: u64,
    next_monitor: u64,
    pub timeline: Vec<TimelineEntry>,
    pub violations: Vec<Violation>,
    /// Real times at which a leader first judged each node Dead (one entry per transition).
    pub dead_at: BTreeMap<String, Vec<u64>>,
    /// Real time of the last deletion of each Node object (pairs with such a node may change).
    deleted_at: BTreeMap<String, u64>,
    /// Real times at which a leader judged each node Healthy again after a non-healthy verdict.
    pub healthy_at: BTreeMap<String, Vec<u64>>,
}

fn ordered(a: Site, b: Site) -> (Site, Site) {
    if a <= b { (a, b) } else { (b, a) }
}

fn zone(room: Site) -> String {
    room.name().to_string()
}

impl Cluster {
    pub fn new(scenario: &Scenario, seed: u64, cfg: SimConfig) -> Result<Self, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        let mut boot = 0;
        for (room, n) in [
            (Site::RoomA, scenario.nodes_per_room.0),
            (Site::RoomB, scenario.nodes_per_room.1),
        ] {
            for i in 1..=n {
                boot += 1;
                let rate = rng.random_range(-cfg.drift_ppm..=cfg.drift_ppm);
                nodes.push(SimNode {
                    name: node_name(room, i),
                    room,
                    powered: true,
                    boot_id: boot,
                    clock: SimClock::new(0, rate),
                    has_agent: true,
                    next_kubelet: MonoTime::ZERO,
                    next_agent: MonoTime::ZERO,
                });
            }
        }
        let mut replicas = Vec::new();
        for room in [Site::RoomA, Site::RoomB] {
            let host = node_name(room, 1);
            let name = format!("controller-{}", &host[..1]);
            let mut lc = cfg.leader.clone();
            lc.identity = name.clone();
            let elector = LeaderElector::new(lc).map_err(|e| e.to_string())?;
            let rate = rng.random_range(-cfg.drift_ppm..=cfg.drift_ppm);
            replicas.push(Replica {
                name,
                room,
                up: nodes.iter().any(|n| n.name == host),
                host,
                clock: SimClock::new(0, rate),
                elector,
                next_retry: MonoTime::ZERO,
                pending: None,
                connected: false,
                synced_at: None,
                queue: VecDeque::new(),
                last_delivery: 0,
                facts: BTreeMap::new(),
                obs: BTreeMap::new(),
                verdicts: BTreeMap::new(),
                status: None,
                leading: false,
            });
        }
        Ok(Cluster {
            now: 0,
            rng,
            cfg,
            cut: BTreeSet::new(),
            api: ApiServer::default(),
            nodes,
            replicas,
            next_boot: boot + 1,
            next_monitor: NODE_MONITOR_PERIOD_MS,
            timeline: Vec::new(),
            violations: Vec::new(),
            dead_at: BTreeMap::new(),
            deleted_at: BTreeMap::new(),
            healthy_at: BTreeMap::new(),
        })
    }

    fn log(&mut self, actor: &str, event: String) {
        self.timeline.push(TimelineEntry {
            t_ms: self.now,
            actor: actor.to_string(),
            event,
        });
    }

    fn violate(&mut self, invariant: &str, detail: String) {
        self.violations.push(Violation {
            invariant: invariant.to_string(),
            t_ms: self.now,
            detail,
        });
    }

    fn link_up(&self, a: Site, b: Site) -> bool {
        a == b || !self.cut.contains(&ordered(a, b))
    }

    /// Writes through the API server and fans the event out to connected watchers.
    fn write(&mut self, key: Key, pre: Precondition, obj: Obj) -> Result<Stored, ()> {
        let prev = self.api.get(&key).cloned();
        let prev_at = self.api.last_write(&key).unwrap_or(0);
        let stored = self
            .api
            .write(key.clone(), pre, obj, self.now)
            .map_err(|_| ())?;
        self.check_write(&key, prev.as_ref(), prev_at, &stored);
        if key.watched() {
            self.fan_out(&key, Some(stored.clone()));
        }
        Ok(stored)
    }

    fn delete(&mut self, key: &Key) {
        if self.api.delete(key) && key.watched() {
            self.fan_out(key, None);
        }
    }

    fn fan_out(&mut self, key: &Key, value: Option<Stored>) {
        let (lo, hi) = self.cfg.watch_delay_ms;
        for i in 0..self.replicas.len() {
            if !self.replicas[i].connected {
                continue;
            }
            let delay = self.rng.random_range(lo..=hi);
            let r = &mut self.replicas[i];
            // A watch delivers in order: never before the previous event.
            let at = (self.now + delay).max(r.last_delivery);
            r.last_delivery = at;
            r.queue.push_back((at, key.clone(), value.clone()));
        }
    }

    /// Invariants judged on every write the API server accepts.
    fn check_write(&mut self, key: &Key, prev: Option<&Stored>, prev_at: u64, new: &Stored) {
        match (key, prev.map(|p| &p.obj), &new.obj) {
            (Key::LeaderLease, Some(Obj::Lease(old)), Obj::Lease(l)) => {
                // S4 for the leader Lease: a new holder's term has a higher epoch; epochs never
                // go back.
                let new_term = old.holder != l.holder && l.holder.is_some();
                if l.transitions < old.transitions || (new_term && l.transitions <= old.transitions)
                {
                    self.violate(
                        "S4-monotonic-epochs",
                        format!(
                            "leader lease went from {:?}@{} to {:?}@{}",
                            old.holder, old.transitions, l.holder, l.transitions
                        ),
                    );
                }
            }
            (Key::Status, old, Obj::Status(s)) => {
                let old = match old {
                    Some(Obj::Status(o)) => Some(o.clone()),
                    _ => None,
                };
                self.check_pairs(old.as_ref(), prev_at, s);
            }
            _ => {}
        }
    }

    /// Pairs span the two rooms, no node is in two pairs, and a pair is never broken while both
    /// its nodes have existed, in their rooms, since the previous status was written. (A node
    /// deleted meanwhile may still show in a pair until the leader's watch delivers the delete.)
    fn check_pairs(&mut self, old: Option<&StatusObj>, old_at: u64, new: &StatusObj) {
        let zone_of = |api: &ApiServer, n: &str| match api.get(&Key::Node(n.to_string())) {
            Some(Stored {
                obj: Obj::Node(node),
                ..
            }) => node.zone.clone(),
            _ => None,
        };
        let mut used = BTreeSet::new();
        let mut problems = Vec::new();
        for p in &new.pairs {
            if !used.insert(p.a.clone()) || !used.insert(p.b.clone()) {
                problems.push(format!("node paired twice in {}/{}", p.a, p.b));
            }
            let (za, zb) = (zone_of(&self.api, &p.a), zone_of(&self.api, &p.b));
            let wrong = |z: Option<String>, room: &str| z.is_some_and(|z| z != room);
            if wrong(za, "room-a") || wrong(zb, "room-b") {
                problems.push(format!("pair {}/{} does not span the rooms", p.a, p.b));
            }
        }
        if let Some(old) = old {
            for p in &old.pairs {
                let kept = |n: &str| self.deleted_at.get(n).is_none_or(|t| *t < old_at);
                let alive = zone_of(&self.api, &p.a).as_deref() == Some("room-a")
                    && zone_of(&self.api, &p.b).as_deref() == Some("room-b")
                    && kept(&p.a)
                    && kept(&p.b);
                if alive && !new.pairs.contains(p) {
                    problems.push(format!("stable pair {}/{} was broken", p.a, p.b));
                }
            }
        }
        for p in problems {
            self.violate("pairs-valid-and-stable", p);
        }
    }

    /// Applies one fault now.
    pub fn apply(&mut self, fault: &Fault) {
        self.log("fault", fault.to_string());
        match fault {
            Fault::PowerOff(n) => {
                if let Some(node) = self.nodes.iter_mut().find(|x| &x.name == n) {
                    node.powered = false;
                }
                for r in self.replicas.iter_mut().filter(|r| &r.host == n) {
                    r.up = false;
                    r.leading = false;
                }
            }
            Fault::PowerOn(n) => {
                let rate = self
                    .rng
                    .random_range(-self.cfg.drift_ppm..=self.cfg.drift_ppm);
                let boot = self.next_boot;
                self.next_boot += 1;
                let now = self.now;
                if let Some(node) = self.nodes.iter_mut().find(|x| &x.name == n)
                    && !node.powered
                {
                    node.powered = true;
                    node.boot_id = boot;
                    node.clock = SimClock::new(now, rate);
                    node.next_kubelet = MonoTime::ZERO;
                    node.next_agent = MonoTime::ZERO;
                    for r in self.replicas.iter_mut().filter(|r| &r.host == n) {
                        r.up = true;
                        r.restart(now, rate);
                    }
                }
            }
            Fault::Cut(a, b) => {
                self.cut.insert(ordered(*a, *b));
            }
            Fault::Heal(a, b) => {
                self.cut.remove(&ordered(*a, *b));
            }
            Fault::AddNode { name, room } => {
                if !self.nodes.iter().any(|x| &x.name == name) {
                    let rate = self
                        .rng
                        .random_range(-self.cfg.drift_ppm..=self.cfg.drift_ppm);
                    let boot = self.next_boot;
                    self.next_boot += 1;
                    self.nodes.push(SimNode {
                        name: name.clone(),
                        room: *room,
                        powered: true,
                        boot_id: boot,
                        clock: SimClock::new(self.now, rate),
                        has_agent: true,
                        next_kubelet: MonoTime::ZERO,
                        next_agent: MonoTime::ZERO,
                    });
                }
            }
            Fault::DeleteNode(n) => {
                self.deleted_at.insert(n.clone(), self.now);
                self.delete(&Key::Node(n.clone()));
                self.delete(&Key::KubeletLease(n.clone()));
                self.delete(&Key::AgentLease(n.clone()));
            }
        }
    }

    /// Advances the world by one tick.
    pub fn step(&mut self) {
        self.step_nodes();
        self.step_node_monitor();
        for i in 0..self.replicas.len() {
            self.step_replica(i);
        }
        self.check_single_leader();
        self.now += TICK_MS;
    }

    /// kubelets and agents renew their Leases on their own clocks.
    fn step_nodes(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].powered {
                continue;
            }
            let reach = self.link_up(self.nodes[i].room, Site::Api);
            let local = self.nodes[i].clock.read(self.now);
            let name = self.nodes[i].name.clone();
            if local >= self.nodes[i].next_kubelet {
                self.nodes[i].next_kubelet = local + Duration::from_millis(KUBELET_RENEW_MS);
                if reach {
                    let boot = self.nodes[i].boot_id;
                    let room = self.nodes[i].room;
                    let current = match self.api.get(&Key::Node(name.clone())) {
                        Some(Stored {
                            obj: Obj::Node(n), ..
                        }) => Some((n.ready, n.boot_id)),
                        _ => None,
                    };
                    if current != Some((Readiness::True, boot)) {
                        // kubelet registers the node or posts Ready=True after a boot.
                        let _ = self.write(
                            Key::Node(name.clone()),
                            Precondition::None,
                            Obj::Node(NodeObj {
                                zone: Some(zone(room)),
                                control_plane: false,
                                ready: Readiness::True,
                                boot_id: boot,
                            }),
                        );
                        self.log(
                            &format!("kubelet/{name}"),
                            format!("Ready=True, boot ID {boot}"),
                        );
                    }
                    let _ = self.write(
                        Key::KubeletLease(name.clone()),
                        Precondition::None,
                        Obj::Lease(LeaseObj {
                            holder: Some(name.clone()),
                            transitions: 0,
                            duration_ms: 40_000,
                        }),
                    );
                }
            }
            if self.nodes[i].has_agent && local >= self.nodes[i].next_agent {
                self.nodes[i].next_agent = local + self.cfg.timing.agent_renew;
                if reach {
                    let _ = self.write(
                        Key::AgentLease(name.clone()),
                        Precondition::None,
                        Obj::Lease(LeaseObj {
                            holder: Some(name),
                            transitions: 0,
                            duration_ms: u64::try_from(self.cfg.timing.agent_lease.as_millis())
                                .unwrap_or(u64::MAX),
                        }),
                    );
                }
            }
        }
    }

    /// kube-controller-manager's node lifecycle controller: Ready=Unknown after the grace period.
    fn step_node_monitor(&mut self) {
        if self.now < self.next_monitor {
            return;
        }
        self.next_monitor += NODE_MONITOR_PERIOD_MS;
        let stale: Vec<(String, NodeObj)> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Node(n), Obj::Node(obj)) if obj.ready != Readiness::Unknown => {
                    let last = self.api.last_write(&Key::KubeletLease(n.clone()))?;
                    (self.now.saturating_sub(last) > NODE_GRACE_MS)
                        .then(|| (n.clone(), obj.clone()))
                }
                _ => None,
            })
            .collect();
        for (n, mut obj) in stale {
            obj.ready = Readiness::Unknown;
            let _ = self.write(Key::Node(n.clone()), Precondition::None, Obj::Node(obj));
            self.log(
                "kcm",
                format!("{n} Ready=Unknown (no kubelet heartbeat for 50 s)"),
            );
        }
    }

    fn step_replica(&mut self, i: usize) {
        if !self.replicas[i].up {
            return;
        }
        let room = self.replicas[i].room;
        let reach = self.link_up(room, Site::Api);
        let local = self.replicas[i].clock.read(self.now);

        // The watch: drop on disconnect, re-list on reconnect.
        if self.replicas[i].connected && !reach {
            let r = &mut self.replicas[i];
            r.connected = false;
            r.synced_at = None;
            r.queue.clear();
        } else if !self.replicas[i].connected && reach {
            let delay = self
                .rng
                .random_range(self.cfg.watch_delay_ms.0..=self.cfg.watch_delay_ms.1);
            let at = self.now + delay;
            let snapshot: Vec<(u64, Key, Option<Stored>)> = self
                .api
                .objects()
                .filter(|(k, _)| k.watched())
                .map(|(k, s)| (at, k.clone(), Some(s.clone())))
                .collect();
            let r = &mut self.replicas[i];
            r.connected = true;
            r.synced_at = Some(at);
            r.last_delivery = at;
            // A re-list also forgets objects deleted while disconnected.
            let listed: BTreeSet<String> = snapshot
                .iter()
                .filter_map(|(_, k, _)| match k {
                    Key::Node(n) => Some(n.clone()),
                    _ => None,
                })
                .collect();
            r.facts.retain(|n, _| listed.contains(n));
            r.obs.retain(|n, _| listed.contains(n));
            r.queue.extend(snapshot);
        }
        while self.replicas[i]
            .queue
            .front()
            .is_some_and(|(at, _, _)| *at <= self.now)
        {
            if let Some((_, key, value)) = self.replicas[i].queue.pop_front() {
                apply_watch_event(&mut self.replicas[i], key, value, local);
            }
        }

        // An API answer arrives, or is lost with the link.
        if self.replicas[i]
            .pending
            .as_ref()
            .is_some_and(|p| p.deliver_at <= self.now)
            && let Some(p) = self.replicas[i].pending.take()
        {
            let r = &mut self.replicas[i];
            match (reach, p.outcome) {
                (false, _) => r.elector.write_failed(),
                (true, Outcome::Ok(rec)) => r.elector.write_succeeded(rec, p.sent_at, local),
                (true, Outcome::Conflict) => r.elector.write_conflicted(),
            }
        }

        if self.replicas[i].pending.is_none() && local >= self.replicas[i].next_retry {
            let retry = self.replicas[i].elector.config().retry_period;
            self.replicas[i].next_retry = local + retry;
            if reach {
                self.elect(i, local);
            }
        }

        let leading = self.replicas[i].elector.is_leader(local);
        if leading != self.replicas[i].leading {
            self.replicas[i].leading = leading;
            let name = self.replicas[i].name.clone();
            if leading {
                let epoch = self.replicas[i].elector.epoch().unwrap_or(0);
                self.replicas[i].verdicts.clear();
                self.log(&name, format!("became leader (epoch {epoch})"));
            } else {
                self.log(&name, "stopped leading".to_string());
            }
        }
        if leading {
            self.lead(i, local, reach);
        }
    }

    /// One round of leader election through the core, with a real conditional write.
    fn elect(&mut self, i: usize, local: MonoTime) {
        let record = match self.api.get(&Key::LeaderLease) {
            Some(Stored {
                rv,
                obj: Obj::Lease(l),
            }) => Some(LeaseRecord {
                holder: l.holder.clone(),
                transitions: l.transitions,
                duration: Duration::from_millis(l.duration_ms),
                resource_version: rv.to_string(),
            }),
            _ => None,
        };
        // The status is read alongside, for the previous pairs.
        self.replicas[i].status = match self.api.get(&Key::Status) {
            Some(Stored {
                rv,
                obj: Obj::Status(s),
            }) => Some((*rv, s.clone())),
            _ => None,
        };
        self.replicas[i].elector.observe(record, local);
        let (write, pre) = match self.replicas[i].elector.decide(local) {
            LeaderAction::Wait => return,
            LeaderAction::Create(w) => (w, Precondition::Create),
            LeaderAction::Update { write, expected_rv } => match expected_rv.parse::<u64>() {
                Ok(rv) => (write, Precondition::ResourceVersion(rv)),
                Err(_) => return,
            },
        };
        let obj = Obj::Lease(LeaseObj {
            holder: Some(write.holder.clone()),
            transitions: write.transitions,
            duration_ms: u64::try_from(write.duration.as_millis()).unwrap_or(u64::MAX),
        });
        let outcome = match self.write(Key::LeaderLease, pre, obj) {
            Ok(stored) => Outcome::Ok(LeaseRecord {
                holder: Some(write.holder),
                transitions: write.transitions,
                duration: write.duration,
                resource_version: stored.rv.to_string(),
            }),
            Err(()) => Outcome::Conflict,
        };
        let (lo, hi) = self.cfg.response_delay_ms;
        let delay = self.rng.random_range(lo..=hi);
        self.replicas[i].pending = Some(PendingWrite {
            deliver_at: self.now + delay,
            sent_at: local,
            outcome,
        });
    }

    /// The leader's work: verdicts and pairing through the core, status written on change.
    fn lead(&mut self, i: usize, local: MonoTime, reach: bool) {
        let timing = self.cfg.timing;
        let name = self.replicas[i].name.clone();
        let synced = self.replicas[i].synced_at.is_some_and(|at| at <= self.now);
        let nodes: Vec<String> = self.replicas[i].facts.keys().cloned().collect();
        for n in nodes {
            let obs = self.replicas[i].obs.get(&n).cloned().unwrap_or_default();
            let verdict = judge(&obs, local, &timing, synced);
            let before = self.replicas[i].verdicts.insert(n.clone(), verdict);
            if before.map(|b| b.name()) == Some(verdict.name()) {
                continue;
            }
            if before.is_some() || verdict != NodeVerdict::Healthy {
                self.log(
                    &name,
                    format!(
                        "verdict {n}: {} -> {}",
                        before.map_or("-", |b| b.name()),
                        verdict.name()
                    ),
                );
            }
            if verdict.is_dead() {
                self.dead_at.entry(n.clone()).or_default().push(self.now);
                self.check_dead_verdict(&n, &verdict, &obs);
            } else if verdict == NodeVerdict::Healthy && before.is_some() {
                self.healthy_at.entry(n.clone()).or_default().push(self.now);
            }
        }
        // Pairing from a partial view would break stable pairs: wait for the full list.
        if !reach || !synced {
            return;
        }
        let facts: Vec<NodeFacts> = self.replicas[i].facts.values().cloned().collect();
        let previous: Vec<Pair> = self.replicas[i]
            .status
            .as_ref()
            .map(|(_, s)| s.pairs.clone())
            .unwrap_or_default();
        let config = RoomConfig::Explicit(zone(Site::RoomA), zone(Site::RoomB));
        let pairing = pair_nodes(&config, &facts, &previous);
        let desired = StatusObj {
            pairs: pairing.pairs,
            verdicts: self.replicas[i]
                .verdicts
                .iter()
                .map(|(n, v)| (n.clone(), v.name()))
                .collect(),
            leader: name.clone(),
            epoch: self.replicas[i].elector.epoch().unwrap_or(0),
        };
        let (pre, current) = match &self.replicas[i].status {
            Some((rv, s)) => (Precondition::ResourceVersion(*rv), Some(s)),
            None if self.api.get(&Key::Status).is_none() => (Precondition::Create, None),
            // Not read yet: wait for the next election round's read.
            None => return,
        };
        if current == Some(&desired) {
            return;
        }
        let pairs_changed = current.map(|c| &c.pairs) != Some(&desired.pairs);
        match self.write(Key::Status, pre, Obj::Status(desired.clone())) {
            Ok(stored) => {
                if pairs_changed {
                    let shown: Vec<String> = desired
                        .pairs
                        .iter()
                        .map(|p| format!("{}/{}", p.a, p.b))
                        .collect();
                    self.log(&name, format!("pairs: {}", shown.join(" ")));
                }
                self.replicas[i].status = Some((stored.rv, desired));
            }
            Err(()) => self.replicas[i].status = None,
        }
    }

    /// A Dead verdict must mean that, after the heartbeat the observer last saw, the node wrote
    /// no heartbeat for a full lease duration: the premise of self-fencing (an agent that has not
    /// renewed for its lease duration has stopped its workloads and its watchdog). The observer
    /// may judge on a view a watch delay old, so a renewal that came back after the gap does not
    /// make the verdict wrong.
    fn check_dead_verdict(&mut self, node: &str, verdict: &NodeVerdict, obs: &NodeObservation) {
        let (key, seen, lease_ms) = match verdict {
            NodeVerdict::Dead {
                fence_deadline: Some(_),
            } => (
                Key::AgentLease(node.to_string()),
                &obs.agent,
                self.cfg.timing.agent_lease.as_millis(),
            ),
            _ => (
                Key::KubeletLease(node.to_string()),
                &obs.kubelet,
                self.cfg.timing.kubelet_lease.as_millis(),
            ),
        };
        let Some(rv) = seen
            .as_ref()
            .and_then(|h| h.fingerprint.parse::<u64>().ok())
        else {
            return;
        };
        let Some((written, next)) = self.api.write_and_next(&key, rv) else {
            return;
        };
        let gap = next.unwrap_or(self.now).saturating_sub(written);
        if u128::from(gap) < lease_ms {
            self.violate(
                "dead-verdict-sound",
                format!(
                    "{node} judged dead, but after the heartbeat seen (written at {written} ms) the next came {gap} ms later"
                ),
            );
        }
    }

    /// At no instant do two replicas both believe they lead.
    fn check_single_leader(&mut self) {
        let leaders: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.up && r.elector.is_leader(r.clock.read(self.now)))
            .map(|r| r.name.clone())
            .collect();
        if leaders.len() > 1 {
            self.violate(
                "single-leader",
                format!("{} lead at once", leaders.join(" and ")),
            );
        }
    }

    /// Checks a scripted scenario's expectations at the end of the run.
    pub fn check_expectations(&mut self, expectations: &[Expectation]) {
        for e in expectations {
            let unmet = match e {
                Expectation::DeadVerdictWithin {
                    node,
                    after_ms,
                    within_ms,
                } => first_after(&self.dead_at, node, *after_ms)
                    .is_none_or(|t| t - after_ms > *within_ms)
                    .then(|| {
                        format!("{node} not judged dead within {within_ms} ms of {after_ms} ms")
                    }),
                Expectation::HealthyWithin {
                    node,
                    after_ms,
                    within_ms,
                } => first_after(&self.healthy_at, node, *after_ms)
                    .is_none_or(|t| t - after_ms > *within_ms)
                    .then(|| {
                        format!("{node} not judged healthy within {within_ms} ms of {after_ms} ms")
                    }),
                Expectation::NoDeadVerdict => (!self.dead_at.is_empty()).then(|| {
                    format!(
                        "nodes judged dead: {}",
                        self.dead_at.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                }),
                Expectation::PairsAtEnd(n) => {
                    let got = self.final_pairs().len();
                    (got != *n).then(|| format!("{got} pairs at the end, expected {n}"))
                }
            };
            if let Some(detail) = unmet {
                self.violate("expectation", detail);
            }
        }
    }

    /// The pairs in the status as the API server holds it.
    pub fn final_pairs(&self) -> Vec<Pair> {
        match self.api.get(&Key::Status) {
            Some(Stored {
                obj: Obj::Status(s),
                ..
            }) => s.pairs.clone(),
            _ => Vec::new(),
        }
    }
}

/// The first recorded time for `node` at or after `after`.
pub fn first_after(times: &BTreeMap<String, Vec<u64>>, node: &str, after: u64) -> Option<u64> {
    times.get(node)?.iter().copied().find(|t| *t >= after)
}

/// What the controller's watches do with one event: feed the core's observations.
fn apply_watch_event(r: &mut Replica, key: Key, value: Option<Stored>, local: MonoTime) {
    match (key, value) {
        (
            Key::Node(n),
            Some(Stored {
                obj: Obj::Node(node),
                ..
            }),
        ) => {
            r.facts.insert(
                n.clone(),
                NodeFacts {
                    name: n.clone(),
                    zone: node.zone.clone(),
                    control_plane: node.control_plane,
                    ready: node.ready == Readiness::True,
                },
            );
            r.obs.entry(n).or_default().ready = Some(node.ready);
        }
        (Key::Node(n), None) => {
            r.facts.remove(&n);
            r.obs.remove(&n);
            r.verdicts.remove(&n);
        }
        (Key::KubeletLease(n), Some(s)) => {
            Heartbeat::observe(
                &mut r.obs.entry(n).or_default().kubelet,
                &s.rv.to_string(),
                local,
            );
        }
        (Key::AgentLease(n), Some(s)) => {
            Heartbeat::observe(
                &mut r.obs.entry(n).or_default().agent,
                &s.rv.to_string(),
                local,
            );
        }
        (Key::KubeletLease(n), None) => {
            if let Some(o) = r.obs.get_mut(&n) {
                o.kubelet = None;
            }
        }
        (Key::AgentLease(n), None) => {
            if let Some(o) = r.obs.get_mut(&n) {
                o.agent = None;
            }
        }
        _ => {}
    }
}
