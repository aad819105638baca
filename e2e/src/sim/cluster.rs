//! The simulated two-room cluster: nodes with drifting clocks, kubelets and twosite agents
//! (watchdog, partner probes), kube-controller-manager's node lifecycle, taint eviction, pod
//! garbage collector and a workload controller, links that can be cut, and two controller
//! replicas. Agents and replicas run the real core (`node_health`): the agent's right to run,
//! leader election, verdicts, pairing and remediation.

use super::api::{ApiServer, Key, LeaseObj, NodeObj, Obj, PodObj, Precondition, StatusObj, Stored};
use super::report::{TimelineEntry, Violation};
use super::scenario::{Expectation, Fault, Scenario, Site, node_name};
use node_health::remediation::pause_reason;
use node_health::{
    Action, AgentCore, HealthTiming, Heartbeat, LeaderAction, LeaderConfig, LeaderElector,
    LeaseRecord, MonoTime, NodeFacts, NodeObservation, NodeRemediation, NodeVerdict, Pair, Pairing,
    Readiness, RemediationInput, RoomConfig, judge, pair_nodes,
};
use node_health::{Arbiter, Claim, ClaimOutcome, RunBasis, WitnessConfig, WitnessRecord};
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
/// The pod garbage collector's period.
const POD_GC_PERIOD_MS: u64 = 20_000;
/// How long a node takes to boot after its watchdog fired.
const REBOOT_MS: u64 = 30_000;
/// kubelet stops a terminating pod on a live node after this long.
const GRACEFUL_STOP_MS: u64 = 2_000;
/// The share of workers that may be dead in both rooms before remediation pauses.
const MAX_DEAD_SHARE_PCT: u8 = 50;

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
    /// The agent process, if running.
    agent: Option<AgentCore>,
    /// Real time of the last watchdog feed, once armed.
    last_feed: Option<u64>,
    /// Ground truth: the node's HA workloads are running.
    workloads_running: bool,
    /// Powered off by its watchdog (or its agent); boots again at this real time.
    reboot_at: Option<u64>,
    /// What reset it, for the boot's timeline entry.
    reset_by: &'static str,
    /// The watchdog hardware is broken: it never fires, arming and feeding it fail. Survives a
    /// reboot.
    watchdog_broken: bool,
    /// Cut from every other site (the API server, the witness, the other room). Survives a
    /// reboot.
    isolated: bool,
    /// Real time at which its links last came back after an isolation.
    reconnected_at: Option<u64>,
    next_kubelet: MonoTime,
    next_agent: MonoTime,
    next_probe: MonoTime,
    /// The other room's heartbeat resourceVersions as this agent last read them.
    other_rvs: BTreeMap<String, u64>,
    next_claim: MonoTime,
}

/// The witness in the third site.
#[derive(Debug)]
struct SimWitness {
    arbiter: Arbiter,
    clock: SimClock,
    up: bool,
    /// The highest epoch it ever granted (for S4).
    max_epoch: u64,
    /// The persisted record, which survives a restart.
    record: WitnessRecord,
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

/// The controller's view of one node, fed by its watches.
#[derive(Debug, Clone, Default)]
struct NodeView {
    facts: Option<NodeFacts>,
    node: Option<NodeObj>,
    obs: NodeObservation,
    /// The fence marker is on the node's heartbeat Lease.
    fence_marker: bool,
    /// The heartbeat Lease's resourceVersion as last seen: the fence commit's precondition.
    agent_rv: u64,
    /// The heartbeat Lease says `twosite.dev/watchdog=enabled`. Anything else counts as no
    /// agent for the verdict, as in the real controller.
    watchdog_enabled: bool,
}

impl NodeView {
    /// What the verdict is judged on: without the agent when its watchdog is not enabled
    /// (nothing would reboot the node), as the real controller's `verdict_observation`.
    fn verdict_obs(&self) -> NodeObservation {
        let mut obs = self.obs.clone();
        if !self.watchdog_enabled {
            obs.agent = None;
            obs.clear_since = None;
        }
        obs
    }
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
    /// Real time at which the re-list after the last (re)connect is delivered.
    synced_at: Option<u64>,
    /// The replica's clock when that re-list arrived.
    synced_local: Option<MonoTime>,
    queue: VecDeque<(u64, Key, Option<Stored>)>,
    last_delivery: u64,
    nodes: BTreeMap<String, NodeView>,
    pods: BTreeMap<String, PodObj>,
    verdicts: BTreeMap<String, NodeVerdict>,
    remediation: BTreeMap<String, NodeRemediation>,
    status: Option<(u64, StatusObj)>,
    leading: bool,
    /// Witness grants this replica holds for a room, until (its clock).
    grants: BTreeMap<String, MonoTime>,
    next_claim: MonoTime,
}

impl Replica {
    fn restart(&mut self, now: u64, rate_ppm: i64) {
        self.clock = SimClock::new(now, rate_ppm);
        self.elector.reset();
        self.next_retry = MonoTime::ZERO;
        self.pending = None;
        self.connected = false;
        self.synced_at = None;
        self.synced_local = None;
        self.queue.clear();
        self.nodes.clear();
        self.pods.clear();
        self.verdicts.clear();
        self.remediation.clear();
        self.status = None;
        self.leading = false;
        self.grants.clear();
        self.next_claim = MonoTime::ZERO;
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
    /// Draw every clock at an edge of the drift range instead of within it.
    pub extreme_drift: bool,
    /// A faulty watchdog: it fires this much later than its configured timeout.
    pub watchdog_late_ms: u64,
    /// A watch stall: from `.0` for `.1` ms the controllers' watches stay connected but deliver
    /// nothing (an overloaded API server); what was held back arrives at the end.
    pub watch_stall_ms: Option<(u64, u64)>,
    /// The agents' stop command does nothing: HA workloads run on until the node resets.
    pub stop_command_fails: bool,
    /// A faulty agent: it ignores the core's [`node_health::AgentStep::reboot`] and leaves a
    /// node whose watchdog is broken running after it lost the right to run.
    pub ignore_reboot_step: bool,
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
            extreme_drift: false,
            watchdog_late_ms: 0,
            watch_stall_ms: None,
            stop_command_fails: false,
            ignore_reboot_step: false,
        }
    }
}

/// What happened, for the figures and expectations.
#[derive(Debug, Default)]
pub struct Record {
    /// Real times at which a leader judged each node Dead (one entry per transition).
    pub dead_at: BTreeMap<String, Vec<u64>>,
    /// Real times at which a leader judged each node Healthy after another verdict.
    pub healthy_at: BTreeMap<String, Vec<u64>>,
    pub taint_at: BTreeMap<String, Vec<u64>>,
    pub untaint_at: BTreeMap<String, Vec<u64>>,
    /// Real times at which the last pod bound to a node was deleted.
    pub released_at: BTreeMap<String, Vec<u64>>,
    /// Real times at which a copy of each app started running.
    pub app_started_at: BTreeMap<String, Vec<u64>>,
    pub watchdog_fired: Vec<(u64, String)>,
    /// Real times at which an agent rebooted its node itself (its watchdog broken).
    pub agent_rebooted: BTreeMap<String, Vec<u64>>,
    /// Real times at which the leader's remediation moved a node to a phase, keyed
    /// `node/Phase`.
    pub phase_at: BTreeMap<String, Vec<u64>>,
    pub right_lost: Vec<(u64, String)>,
    /// Power-off faults: (real time, node).
    pub powered_off: Vec<(u64, String)>,
    /// New witness grants: (real time, room, epoch).
    pub witness_grants: Vec<(u64, String, u64)>,
}

impl Record {
    /// The node was powered off (by a fault) at or before `t`.
    pub fn powered_off_before(&self, node: &str, t: u64) -> bool {
        self.powered_off.iter().any(|(at, n)| n == node && *at <= t)
    }
}

/// The whole simulated world at one instant of real (virtual) time.
pub struct Cluster {
    pub now: u64,
    rng: ChaCha8Rng,
    cfg: SimConfig,
    cut: BTreeSet<(Site, Site)>,
    /// When each link was last healed.
    healed_at: BTreeMap<(Site, Site), u64>,
    api: ApiServer,
    nodes: Vec<SimNode>,
    replicas: Vec<Replica>,
    next_boot: u64,
    next_monitor: u64,
    next_pod_gc: u64,
    /// Real time of the last deletion of each Node object (pairs with such a node may change).
    deleted_at: BTreeMap<String, u64>,
    /// Where each app runs now, to log starts once.
    running: BTreeMap<String, String>,
    /// The HA applications (one per initial worker).
    apps: Vec<String>,
    next_pod: u64,
    witness: Option<SimWitness>,
    seq: u64,
    pub timeline: Vec<TimelineEntry>,
    pub violations: Vec<Violation>,
    pub record: Record,
}

fn ordered(a: Site, b: Site) -> (Site, Site) {
    if a <= b { (a, b) } else { (b, a) }
}

fn zone(room: Site) -> String {
    room.name().to_string()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Cluster {
    pub fn new(scenario: &Scenario, seed: u64, cfg: SimConfig) -> Result<Self, String> {
        cfg.timing.validate().map_err(|e| e.to_string())?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut cluster = Cluster {
            now: 0,
            rng: ChaCha8Rng::seed_from_u64(0),
            cfg,
            cut: BTreeSet::new(),
            healed_at: BTreeMap::new(),
            api: ApiServer::default(),
            nodes: Vec::new(),
            replicas: Vec::new(),
            next_boot: 1,
            next_monitor: NODE_MONITOR_PERIOD_MS,
            next_pod_gc: POD_GC_PERIOD_MS,
            deleted_at: BTreeMap::new(),
            running: BTreeMap::new(),
            apps: Vec::new(),
            next_pod: 0,
            witness: None,
            seq: 0,
            timeline: Vec::new(),
            violations: Vec::new(),
            record: Record::default(),
        };
        std::mem::swap(&mut cluster.rng, &mut rng);
        if scenario.witness {
            let rate = cluster.draw_rate();
            let clock = SimClock::new(0, rate);
            cluster.witness = Some(SimWitness {
                arbiter: Arbiter::new(
                    WitnessConfig::default(),
                    WitnessRecord::default(),
                    clock.read(0),
                ),
                clock,
                up: true,
                max_epoch: 0,
                record: WitnessRecord::default(),
            });
        }
        for (room, n) in [
            (Site::RoomA, scenario.nodes_per_room.0),
            (Site::RoomB, scenario.nodes_per_room.1),
        ] {
            for i in 1..=n {
                cluster.add_node(node_name(room, i), room);
                // One HA application per initial worker, first placed on it.
                let app = format!("app-{}", node_name(room, i));
                cluster.apps.push(app.clone());
                let _ = cluster.api.write(
                    Key::Pod(format!("{app}-0")),
                    Precondition::Create,
                    Obj::Pod(PodObj {
                        app,
                        node: node_name(room, i),
                        terminating: false,
                    }),
                    0,
                );
            }
        }
        for room in [Site::RoomA, Site::RoomB] {
            let host = node_name(room, 1);
            let name = format!("controller-{}", &host[..1]);
            let mut lc = cluster.cfg.leader.clone();
            lc.identity = name.clone();
            let elector = LeaderElector::new(lc).map_err(|e| e.to_string())?;
            let rate = cluster.draw_rate();
            let up = cluster.nodes.iter().any(|n| n.name == host);
            cluster.replicas.push(Replica {
                name,
                room,
                up,
                host,
                clock: SimClock::new(0, rate),
                elector,
                next_retry: MonoTime::ZERO,
                pending: None,
                connected: false,
                synced_at: None,
                synced_local: None,
                queue: VecDeque::new(),
                last_delivery: 0,
                nodes: BTreeMap::new(),
                pods: BTreeMap::new(),
                verdicts: BTreeMap::new(),
                remediation: BTreeMap::new(),
                status: None,
                leading: false,
                grants: BTreeMap::new(),
                next_claim: MonoTime::ZERO,
            });
        }
        Ok(cluster)
    }

    fn draw_rate(&mut self) -> i64 {
        let d = self.cfg.drift_ppm;
        if self.cfg.extreme_drift {
            if self.rng.random_bool(0.5) { d } else { -d }
        } else {
            self.rng.random_range(-d..=d)
        }
    }

    /// A fresh renewal mark (a Lease's renewTime).
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn boot_id(&mut self) -> u64 {
        let b = self.next_boot;
        self.next_boot += 1;
        b
    }

    fn add_node(&mut self, name: String, room: Site) {
        let rate = self.draw_rate();
        let boot = self.boot_id();
        let mut agent = AgentCore::new(name.clone(), zone(room), self.cfg.timing);
        agent.set_witness_configured(self.witness.is_some());
        self.nodes.push(SimNode {
            name,
            room,
            powered: true,
            boot_id: boot,
            clock: SimClock::new(self.now, rate),
            agent: Some(agent),
            last_feed: None,
            workloads_running: false,
            reboot_at: None,
            reset_by: "",
            watchdog_broken: false,
            isolated: false,
            reconnected_at: None,
            next_kubelet: MonoTime::ZERO,
            next_agent: MonoTime::ZERO,
            next_probe: MonoTime::ZERO,
            other_rvs: BTreeMap::new(),
            next_claim: MonoTime::ZERO,
        });
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

    /// Node `i` reaches `site`: its room's link is up and the node is not isolated.
    fn node_reaches(&self, i: usize, site: Site) -> bool {
        !self.nodes[i].isolated && self.link_up(self.nodes[i].room, site)
    }

    /// Nodes `i` and `j` reach each other (partner probes).
    fn nodes_connected(&self, i: usize, j: usize) -> bool {
        !self.nodes[i].isolated
            && !self.nodes[j].isolated
            && self.link_up(self.nodes[i].room, self.nodes[j].room)
    }

    /// Replica `i` reaches `site`: through its room's link, unless its host is isolated.
    fn replica_reaches(&self, i: usize, site: Site) -> bool {
        let r = &self.replicas[i];
        self.link_up(r.room, site)
            && self
                .node_idx(&r.host)
                .is_none_or(|h| !self.nodes[h].isolated)
    }

    fn node_idx(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
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

    fn delete(&mut self, key: &Key) -> bool {
        let gone = self.api.delete(key);
        if gone && key.watched() {
            self.fan_out(key, None);
        }
        gone
    }

    /// Read-modify-write of a Node with a resourceVersion precondition, keeping every field the
    /// writer does not own (as a JSON Patch with a `test` op, or kubelet's status update, do).
    fn update_node(&mut self, name: &str, f: impl FnOnce(&mut NodeObj)) -> bool {
        let Some(Stored {
            rv,
            obj: Obj::Node(mut node),
        }) = self.api.get(&Key::Node(name.to_string())).cloned()
        else {
            return false;
        };
        f(&mut node);
        self.write(
            Key::Node(name.to_string()),
            Precondition::ResourceVersion(rv),
            Obj::Node(node),
        )
        .is_ok()
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
            let mut at = (self.now + delay).max(r.last_delivery);
            if let Some((from, len)) = self.cfg.watch_stall_ms
                && (from..from + len).contains(&at)
            {
                at = from + len;
            }
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

    fn power_off(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        let n = &mut self.nodes[i];
        n.powered = false;
        n.workloads_running = false;
        n.last_feed = None;
        for r in self.replicas.iter_mut().filter(|r| r.host == name) {
            r.up = false;
            r.leading = false;
        }
    }

    fn power_on(&mut self, i: usize) {
        let rate = self.draw_rate();
        let boot = self.boot_id();
        let now = self.now;
        let timing = self.cfg.timing;
        let n = &mut self.nodes[i];
        n.powered = true;
        n.boot_id = boot;
        n.clock = SimClock::new(now, rate);
        let mut agent = AgentCore::new(n.name.clone(), zone(n.room), timing);
        agent.set_witness_configured(self.witness.is_some());
        n.agent = Some(agent);
        n.other_rvs.clear();
        n.next_claim = MonoTime::ZERO;
        n.last_feed = None;
        n.workloads_running = false;
        n.reboot_at = None;
        n.next_kubelet = MonoTime::ZERO;
        n.next_agent = MonoTime::ZERO;
        n.next_probe = MonoTime::ZERO;
        let name = n.name.clone();
        for r in self.replicas.iter_mut().filter(|r| r.host == name) {
            r.up = true;
            r.restart(now, rate);
        }
    }

    /// Applies one fault now.
    pub fn apply(&mut self, fault: &Fault) {
        self.log("fault", fault.to_string());
        match fault {
            Fault::PowerOff(n) => {
                self.record.powered_off.push((self.now, n.clone()));
                if let Some(i) = self.node_idx(n) {
                    self.power_off(i);
                    self.nodes[i].reboot_at = None;
                }
            }
            Fault::PowerOn(n) => {
                if let Some(i) = self.node_idx(n)
                    && !self.nodes[i].powered
                {
                    self.power_on(i);
                }
            }
            Fault::Cut(a, b) => {
                self.cut.insert(ordered(*a, *b));
            }
            Fault::Heal(a, b) => {
                if self.cut.remove(&ordered(*a, *b)) {
                    self.healed_at.insert(ordered(*a, *b), self.now);
                }
            }
            Fault::AddNode { name, room } => {
                if self.node_idx(name).is_none() {
                    self.add_node(name.clone(), *room);
                }
            }
            Fault::DeleteNode(n) => {
                self.deleted_at.insert(n.clone(), self.now);
                self.delete(&Key::Node(n.clone()));
                self.delete(&Key::KubeletLease(n.clone()));
                self.delete(&Key::AgentLease(n.clone()));
            }
            Fault::AgentCrash(n) => {
                if let Some(i) = self.node_idx(n) {
                    self.nodes[i].agent = None;
                }
            }
            Fault::WatchdogBreaks(n) => {
                if let Some(i) = self.node_idx(n) {
                    // It never fires: what it was last fed no longer counts.
                    self.nodes[i].watchdog_broken = true;
                    self.nodes[i].last_feed = None;
                }
            }
            Fault::Isolate(n) => {
                if let Some(i) = self.node_idx(n) {
                    self.nodes[i].isolated = true;
                }
            }
            Fault::Reconnect(n) => {
                if let Some(i) = self.node_idx(n)
                    && self.nodes[i].isolated
                {
                    self.nodes[i].isolated = false;
                    self.nodes[i].reconnected_at = Some(self.now);
                }
            }
            Fault::WitnessDown => {
                if let Some(w) = self.witness.as_mut() {
                    w.up = false;
                }
            }
            Fault::WitnessUp => {
                if let Some(w) = self.witness.as_mut()
                    && !w.up
                {
                    // A restart: it knows only what it persisted.
                    let now = w.clock.read(self.now);
                    w.arbiter = Arbiter::new(WitnessConfig::default(), w.record.clone(), now);
                    w.up = true;
                }
            }
        }
    }

    /// Advances the world by one tick.
    pub fn step(&mut self) {
        self.step_reboots();
        self.step_nodes();
        self.step_kcm();
        for i in 0..self.replicas.len() {
            self.step_replica(i);
        }
        self.check_single_leader();
        self.check_single_copy();
        if self.witness.is_some() {
            self.check_single_grant();
        }
        self.now += TICK_MS;
    }

    fn step_reboots(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].reboot_at.is_some_and(|t| t <= self.now) {
                let name = self.nodes[i].name.clone();
                let by = self.nodes[i].reset_by;
                self.power_on(i);
                self.log(&format!("node/{name}"), format!("booted after {by}"));
            }
        }
    }

    /// kubelets and agents: renewals, partner probes, the watchdog, HA workloads.
    fn step_nodes(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].powered {
                continue;
            }
            self.step_kubelet(i);
            self.step_agent(i);
            // The watchdog: a hardware timer, on real time.
            if let Some(fed) = self.nodes[i].last_feed
                && !self.nodes[i].watchdog_broken
                && self.now.saturating_sub(fed)
                    >= ms(self.cfg.timing.watchdog) + self.cfg.watchdog_late_ms
            {
                let name = self.nodes[i].name.clone();
                self.record.watchdog_fired.push((self.now, name.clone()));
                self.log(
                    &format!("node/{name}"),
                    "watchdog fired: node resets".into(),
                );
                self.power_off(i);
                self.nodes[i].reboot_at = Some(self.now + REBOOT_MS);
                self.nodes[i].reset_by = "its watchdog reset";
            }
        }
    }

    fn step_kubelet(&mut self, i: usize) {
        let reach = self.node_reaches(i, Site::Api);
        let local = self.nodes[i].clock.read(self.now);
        let name = self.nodes[i].name.clone();
        if local < self.nodes[i].next_kubelet {
            return;
        }
        self.nodes[i].next_kubelet = local + Duration::from_millis(KUBELET_RENEW_MS);
        if !reach {
            return;
        }
        let boot = self.nodes[i].boot_id;
        let room = self.nodes[i].room;
        let current = match self.api.get(&Key::Node(name.clone())) {
            Some(Stored {
                obj: Obj::Node(n), ..
            }) => Some((n.ready, n.boot_id)),
            _ => None,
        };
        if current.is_none() {
            // kubelet registers the node.
            let _ = self.write(
                Key::Node(name.clone()),
                Precondition::Create,
                Obj::Node(NodeObj {
                    zone: Some(zone(room)),
                    control_plane: false,
                    ready: Readiness::True,
                    boot_id: boot,
                    out_of_service: false,
                    other_taints: vec!["example.com/maintenance-window:PreferNoSchedule".into()],
                    fenced_boot: None,
                }),
            );
            self.log(
                &format!("kubelet/{name}"),
                format!("registered, boot ID {boot}"),
            );
        } else if current != Some((Readiness::True, boot)) {
            // kubelet posts Ready=True and its boot ID after a boot, keeping taints.
            self.update_node(&name, |n| {
                n.ready = Readiness::True;
                n.boot_id = boot;
            });
            self.log(
                &format!("kubelet/{name}"),
                format!("Ready=True, boot ID {boot}"),
            );
        }
        let seq = self.next_seq();
        let _ = self.write(
            Key::KubeletLease(name.clone()),
            Precondition::None,
            Obj::Lease(LeaseObj {
                holder: Some(name),
                transitions: 0,
                duration_ms: 40_000,
                failures_before: 0,
                boot_id: boot,
                fence_marker: None,
                watchdog: None,
                renew_seq: seq,
            }),
        );
        // kubelet stops terminating pods on its node and removes them.
        let mine: Vec<String> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Pod(p), Obj::Pod(pod))
                    if pod.terminating
                        && pod.node == self.nodes[i].name
                        && self
                            .api
                            .last_write(k)
                            .is_some_and(|t| self.now >= t + GRACEFUL_STOP_MS) =>
                {
                    Some(p.clone())
                }
                _ => None,
            })
            .collect();
        for p in mine {
            self.delete_pod(&p);
        }
    }

    fn step_agent(&mut self, i: usize) {
        if self.nodes[i].agent.is_none() {
            return;
        }
        let room = self.nodes[i].room;
        let reach = self.node_reaches(i, Site::Api);
        let local = self.nodes[i].clock.read(self.now);
        let name = self.nodes[i].name.clone();
        let timing = self.cfg.timing;

        if local >= self.nodes[i].next_agent {
            self.nodes[i].next_agent = local + timing.agent_renew;
            let boot = self.nodes[i].boot_id;
            let failures = self.nodes[i]
                .agent
                .as_ref()
                .map_or(0, AgentCore::failures_before_next_renewal);
            let watchdog = if self.nodes[i]
                .agent
                .as_ref()
                .is_some_and(AgentCore::is_watchdog_failed)
            {
                "failed"
            } else {
                "enabled"
            };
            // Read-modify-write with the resourceVersion: the controller's fence marker is kept,
            // and a marker written between the read and the write makes the renewal fail.
            let (pre, marker) = match self.api.get(&Key::AgentLease(name.clone())) {
                Some(Stored {
                    rv,
                    obj: Obj::Lease(l),
                }) => (Precondition::ResourceVersion(*rv), l.fence_marker.clone()),
                _ => (Precondition::Create, None),
            };
            let seq = self.next_seq();
            let ok = reach
                && self
                    .write(
                        Key::AgentLease(name.clone()),
                        pre,
                        Obj::Lease(LeaseObj {
                            holder: Some(name.clone()),
                            transitions: 0,
                            duration_ms: ms(timing.agent_lease),
                            failures_before: failures,
                            boot_id: boot,
                            fence_marker: marker.clone(),
                            watchdog: Some(watchdog),
                            renew_seq: seq,
                        }),
                    )
                    .is_ok();
            let partner = if ok {
                self.partner_in_status(&name)
            } else {
                None
            };
            // While it reaches the API server, the agent reads the other room's heartbeats: one
            // that changed since its last read shows the other room alive.
            let mut other_alive = false;
            if ok {
                let mine = self.nodes[i].room;
                let others: Vec<(String, u64)> = self
                    .nodes
                    .iter()
                    .filter(|n| n.room != mine)
                    .filter_map(|n| {
                        self.api
                            .get(&Key::AgentLease(n.name.clone()))
                            .map(|s| (n.name.clone(), s.rv))
                    })
                    .collect();
                for (n, rv) in others {
                    if self.nodes[i]
                        .other_rvs
                        .insert(n, rv)
                        .is_some_and(|old| old != rv)
                    {
                        other_alive = true;
                    }
                }
            }
            if let Some(agent) = self.nodes[i].agent.as_mut() {
                if ok {
                    agent.renewal_succeeded(local);
                    agent.observe_fence_marker(marker.is_some());
                    if other_alive {
                        agent.observe_other_room(local);
                    }
                    // The agent reads the pairing while it can; it keeps the last one otherwise.
                    agent.set_partner(partner);
                } else {
                    agent.renewal_failed();
                }
            }
        }

        if local >= self.nodes[i].next_probe {
            self.nodes[i].next_probe = local + timing.probe_interval;
            let partner = self.nodes[i]
                .agent
                .as_ref()
                .and_then(|a| a.partner().map(str::to_string));
            if let Some(p) = partner.and_then(|p| self.node_idx(&p)) {
                let pn = &self.nodes[p];
                if pn.powered && self.nodes_connected(i, p) {
                    let report = pn.agent.as_ref().map(|a| a.report(pn.clock.read(self.now)));
                    if let (Some(report), Some(agent)) = (report, self.nodes[i].agent.as_mut()) {
                        agent.peer_answered(local, &report);
                        if report.has_right {
                            agent.observe_other_room(local);
                        }
                    }
                }
            }
        }
        // Rooms out of contact: claim (or renew) the room's right at the witness, twice a
        // second.
        if local >= self.nodes[i].next_claim {
            self.nodes[i].next_claim = local + Duration::from_millis(500);
            let needs = self.nodes[i]
                .agent
                .as_ref()
                .is_some_and(|a| a.needs_witness(local));
            if needs {
                let claim = Claim {
                    room: zone(room),
                    epoch: None,
                    api_reachable: reach,
                };
                if let Some(ClaimOutcome::Granted {
                    epoch,
                    valid_for_ms,
                }) = self.claim_at_witness(
                    self.node_reaches(i, Site::Witness),
                    &claim,
                    &format!("agent/{name}"),
                ) && let Some(agent) = self.nodes[i].agent.as_mut()
                {
                    agent.witness_granted(local, epoch, Duration::from_millis(valid_for_ms));
                }
            }
        }

        let Some(step) = self.nodes[i].agent.as_mut().map(|a| a.tick(local)) else {
            return;
        };
        if step.armed {
            self.nodes[i].workloads_running = true;
        }
        // As the real agent's shell: stop, reboot, arm, feed.
        if step.stop_workloads {
            self.record.right_lost.push((self.now, name.clone()));
            if self.cfg.stop_command_fails {
                self.log(
                    &format!("agent/{name}"),
                    "lost the right to run: the stop command failed, HA workloads still running, \
                     watchdog no longer fed"
                        .into(),
                );
            } else {
                self.nodes[i].workloads_running = false;
                self.log(
                    &format!("agent/{name}"),
                    "lost the right to run: HA workloads stopped, watchdog no longer fed".into(),
                );
            }
            self.check_no_storm(i);
        }
        if step.reboot {
            if self.cfg.ignore_reboot_step {
                self.log(
                    &format!("agent/{name}"),
                    "told to reboot the node (watchdog broken), ignores it".into(),
                );
            } else {
                // `b` to /proc/sysrq-trigger: an immediate reset, like the watchdog's.
                self.record
                    .agent_rebooted
                    .entry(name.clone())
                    .or_default()
                    .push(self.now);
                self.log(
                    &format!("node/{name}"),
                    "agent rebooted the node (watchdog broken)".into(),
                );
                self.power_off(i);
                self.nodes[i].reboot_at = Some(self.now + REBOOT_MS);
                self.nodes[i].reset_by = "its agent rebooted it";
                return;
            }
        }
        if step.armed || step.feed {
            if self.nodes[i].watchdog_broken {
                // Arming or feeding fails: the shell tells the core, which reports it on every
                // renewal and reboots the node itself should it lose the right to run.
                if let Some(agent) = self.nodes[i].agent.as_mut() {
                    let first = !agent.is_watchdog_failed();
                    agent.watchdog_failed();
                    if first {
                        self.log(
                            &format!("agent/{name}"),
                            format!(
                                "could not {} the watchdog: reported as failed",
                                if step.armed { "arm" } else { "feed" }
                            ),
                        );
                    }
                }
            } else if step.feed {
                self.nodes[i].last_feed = Some(self.now);
            }
        }
    }

    /// One claim at the witness, if the claimant `reaches` it and the witness is up. Checks S4
    /// on every new grant and logs it.
    fn claim_at_witness(
        &mut self,
        reaches: bool,
        claim: &Claim,
        actor: &str,
    ) -> Option<ClaimOutcome> {
        if !reaches {
            return None;
        }
        let now = self.now;
        let w = self.witness.as_mut().filter(|w| w.up)?;
        let local = w.clock.read(now);
        let (outcome, record) = w.arbiter.claim(claim, local).ok()?;
        let mut new_grant = None;
        if let Some(rec) = record {
            // Persisted before the answer.
            w.record = rec;
            if let ClaimOutcome::Granted { epoch, .. } = &outcome {
                let stale = *epoch <= w.max_epoch;
                w.max_epoch = w.max_epoch.max(*epoch);
                new_grant = Some((*epoch, stale));
            }
        }
        if let Some((epoch, stale)) = new_grant {
            self.record
                .witness_grants
                .push((self.now, claim.room.clone(), epoch));
            if stale {
                self.violate(
                    "S4-monotonic-epochs",
                    format!("witness granted epoch {epoch} again"),
                );
            }
            self.log(
                "witness",
                format!(
                    "granted {} the right to run (epoch {epoch}, asked by {actor})",
                    claim.room
                ),
            );
        }
        Some(outcome)
    }

    /// At no instant do two rooms both believe the witness granted them the right to run.
    fn check_single_grant(&mut self) {
        let mut rooms: BTreeSet<String> = BTreeSet::new();
        for n in &self.nodes {
            if n.powered
                && let Some(a) = &n.agent
                && let Some(RunBasis::Witness { .. }) = a.right_to_run(n.clock.read(self.now))
            {
                rooms.insert(zone(n.room));
            }
        }
        for r in &self.replicas {
            if r.up {
                let local = r.clock.read(self.now);
                for (room, until) in &r.grants {
                    if local < *until {
                        rooms.insert(room.clone());
                    }
                }
            }
        }
        if rooms.len() > 1 {
            let list: Vec<String> = rooms.into_iter().collect();
            self.violate(
                "single-witness-grant",
                format!("{} hold the witness's grant at once", list.join(" and ")),
            );
        }
    }

    fn partner_in_status(&self, node: &str) -> Option<String> {
        match self.api.get(&Key::Status) {
            Some(Stored {
                obj: Obj::Status(s),
                ..
            }) => s.pairs.iter().find_map(|p| {
                if p.a == node {
                    Some(p.b.clone())
                } else if p.b == node {
                    Some(p.a.clone())
                } else {
                    None
                }
            }),
            _ => None,
        }
    }

    fn delete_pod(&mut self, pod: &str) {
        let node = match self.api.get(&Key::Pod(pod.to_string())) {
            Some(Stored {
                obj: Obj::Pod(p), ..
            }) => p.node.clone(),
            _ => return,
        };
        self.delete(&Key::Pod(pod.to_string()));
        let left = self.api.objects().any(|(_, s)| match &s.obj {
            Obj::Pod(p) => p.node == node,
            _ => false,
        });
        if !left {
            self.record
                .released_at
                .entry(node)
                .or_default()
                .push(self.now);
        }
    }

    /// kube-controller-manager: node lifecycle, taint eviction, pod GC, and a workload
    /// controller that recreates a deleted HA pod on another node.
    fn step_kcm(&mut self) {
        if self.now >= self.next_monitor {
            self.next_monitor += NODE_MONITOR_PERIOD_MS;
            let stale: Vec<String> = self
                .api
                .objects()
                .filter_map(|(k, s)| match (k, &s.obj) {
                    (Key::Node(n), Obj::Node(obj)) if obj.ready != Readiness::Unknown => {
                        let last = self.api.last_write(&Key::KubeletLease(n.clone()))?;
                        (self.now.saturating_sub(last) > NODE_GRACE_MS).then(|| n.clone())
                    }
                    _ => None,
                })
                .collect();
            for n in stale {
                self.update_node(&n, |obj| obj.ready = Readiness::Unknown);
                self.log(
                    "kcm",
                    format!("{n} Ready=Unknown (no kubelet heartbeat for 50 s)"),
                );
            }
        }

        // Taint eviction: pods on an out-of-service node are marked for deletion at once.
        let tainted: BTreeSet<String> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Node(n), Obj::Node(obj)) if obj.out_of_service => Some(n.clone()),
                _ => None,
            })
            .collect();
        let evict: Vec<(String, PodObj)> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Pod(p), Obj::Pod(pod)) if !pod.terminating && tainted.contains(&pod.node) => {
                    Some((p.clone(), pod.clone()))
                }
                _ => None,
            })
            .collect();
        for (p, mut pod) in evict {
            pod.terminating = true;
            let _ = self.write(Key::Pod(p), Precondition::None, Obj::Pod(pod));
        }

        if self.now >= self.next_pod_gc {
            self.next_pod_gc += POD_GC_PERIOD_MS;
            // Terminating pods on nodes that are NotReady and out of service are force-deleted.
            let gone: Vec<String> = self
                .api
                .objects()
                .filter_map(|(k, s)| match (k, &s.obj) {
                    (Key::Pod(p), Obj::Pod(pod)) if pod.terminating => {
                        match self.api.get(&Key::Node(pod.node.clone())) {
                            Some(Stored {
                                obj: Obj::Node(n), ..
                            }) if n.out_of_service && n.ready != Readiness::True => Some(p.clone()),
                            None => Some(p.clone()),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect();
            for p in gone {
                self.delete_pod(&p);
                self.log("kcm", format!("pod GC force-deleted {p}"));
            }
        }

        if self.now.is_multiple_of(1_000) {
            self.step_workload_controller();
        }
    }

    /// A StatefulSet-like controller: an app whose pod object is gone gets a new pod on the
    /// least-loaded node that is Ready and not out of service.
    fn step_workload_controller(&mut self) {
        let mut present: BTreeSet<String> = BTreeSet::new();
        let mut load: BTreeMap<String, usize> = BTreeMap::new();
        for (k, s) in self.api.objects() {
            if let (Key::Pod(_), Obj::Pod(p)) = (k, &s.obj) {
                present.insert(p.app.clone());
                *load.entry(p.node.clone()).or_default() += 1;
            }
        }
        let candidates: Vec<String> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Node(n), Obj::Node(obj))
                    if obj.ready == Readiness::True && !obj.out_of_service =>
                {
                    Some(n.clone())
                }
                _ => None,
            })
            .collect();
        for app in self.apps.clone() {
            if present.contains(&app) {
                continue;
            }
            let Some(node) = candidates
                .iter()
                .min_by_key(|n| (load.get(*n).copied().unwrap_or(0), (*n).clone()))
                .cloned()
            else {
                continue;
            };
            *load.entry(node.clone()).or_default() += 1;
            self.next_pod += 1;
            let pod = format!("{app}-{}", self.next_pod);
            let _ = self.write(
                Key::Pod(pod.clone()),
                Precondition::Create,
                Obj::Pod(PodObj {
                    app: app.clone(),
                    node: node.clone(),
                    terminating: false,
                }),
            );
            self.log("kcm", format!("{app}: new pod {pod} on {node}"));
        }
    }

    fn step_replica(&mut self, i: usize) {
        if !self.replicas[i].up {
            return;
        }
        let reach = self.replica_reaches(i, Site::Api);
        let local = self.replicas[i].clock.read(self.now);

        // The watch: drop on disconnect, re-list on reconnect.
        if self.replicas[i].connected && !reach {
            let r = &mut self.replicas[i];
            r.connected = false;
            r.synced_at = None;
            r.synced_local = None;
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
            let listed_nodes: BTreeSet<String> = snapshot
                .iter()
                .filter_map(|(_, k, _)| match k {
                    Key::Node(n) => Some(n.clone()),
                    _ => None,
                })
                .collect();
            let listed_pods: BTreeSet<String> = snapshot
                .iter()
                .filter_map(|(_, k, _)| match k {
                    Key::Pod(p) => Some(p.clone()),
                    _ => None,
                })
                .collect();
            let r = &mut self.replicas[i];
            r.connected = true;
            r.synced_at = Some(at);
            r.synced_local = None;
            r.last_delivery = at;
            // A re-list also forgets objects deleted while disconnected.
            r.nodes.retain(|n, _| listed_nodes.contains(n));
            r.pods.retain(|p, _| listed_pods.contains(p));
            r.queue.extend(snapshot);
        }
        let timing = self.cfg.timing;
        while self.replicas[i]
            .queue
            .front()
            .is_some_and(|(at, _, _)| *at <= self.now)
        {
            if let Some((_, key, value)) = self.replicas[i].queue.pop_front() {
                apply_watch_event(&mut self.replicas[i], key, value, local, &timing);
            }
        }
        if self.replicas[i].synced_local.is_none()
            && self.replicas[i].synced_at.is_some_and(|t| t <= self.now)
        {
            self.replicas[i].synced_local = Some(local);
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
                self.replicas[i].remediation.clear();
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
            duration_ms: ms(write.duration),
            failures_before: 0,
            boot_id: 0,
            fence_marker: None,
            watchdog: None,
            renew_seq: self.next_seq(),
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

    /// The leader's work: verdicts, pairing and remediation through the core; status written on
    /// change.
    fn lead(&mut self, i: usize, local: MonoTime, reach: bool) {
        let timing = self.cfg.timing;
        let name = self.replicas[i].name.clone();
        let settled = self.replicas[i]
            .synced_local
            .is_some_and(|s| local >= s + timing.agent_suspect_after());
        let names: Vec<String> = self.replicas[i]
            .nodes
            .iter()
            .filter(|(_, v)| v.facts.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for n in &names {
            let obs = self.replicas[i].nodes[n].verdict_obs();
            let verdict = judge(&obs, local, &timing, settled);
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
                self.record
                    .dead_at
                    .entry(n.clone())
                    .or_default()
                    .push(self.now);
                self.check_dead_verdict(n, &verdict, &obs);
            } else if verdict == NodeVerdict::Healthy && before.is_some() {
                self.record
                    .healthy_at
                    .entry(n.clone())
                    .or_default()
                    .push(self.now);
            }
        }
        // Pairing from a partial view would break stable pairs: wait for the full list.
        if !reach || !settled {
            return;
        }
        let facts: Vec<NodeFacts> = names
            .iter()
            .filter_map(|n| self.replicas[i].nodes[n].facts.clone())
            .collect();
        let previous: Vec<Pair> = self.replicas[i]
            .status
            .as_ref()
            .map(|(_, s)| s.pairs.clone())
            .unwrap_or_default();
        let config = RoomConfig::Explicit(zone(Site::RoomA), zone(Site::RoomB));
        let pairing = pair_nodes(&config, &facts, &previous);
        self.remediate(i, local, &pairing, settled);

        let desired = StatusObj {
            pairs: pairing.pairs,
            verdicts: self.replicas[i]
                .verdicts
                .iter()
                .map(|(n, v)| (n.clone(), v.name()))
                .collect(),
            phases: self.replicas[i]
                .remediation
                .iter()
                .map(|(n, r)| (n.clone(), r.phase.name()))
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

    /// Remediation through the core for every node the leader knows.
    fn remediate(&mut self, i: usize, local: MonoTime, pairing: &Pairing, settled: bool) {
        let timing = self.cfg.timing;
        let name = self.replicas[i].name.clone();
        let zone_of = |r: &Replica, n: &str| {
            r.nodes
                .get(n)
                .and_then(|v| v.facts.as_ref())
                .and_then(|f| f.zone.clone())
        };
        let mut dead = (0, 0);
        let mut workers = 0;
        for (n, v) in &self.replicas[i].verdicts {
            workers += 1;
            if v.is_dead() {
                match zone_of(&self.replicas[i], n).as_deref() {
                    Some("room-a") => dead.0 += 1,
                    Some("room-b") => dead.1 += 1,
                    _ => {}
                }
            }
        }
        let paused = pause_reason(settled, dead, workers, MAX_DEAD_SHARE_PCT).is_some();
        // With a witness, fencing a node of room R needs the grant for the other room: claim it
        // (at most once a second) while a node of R is dead.
        let mut witness_ok: BTreeMap<String, bool> = BTreeMap::new();
        if self.witness.is_some() {
            let wanted: Vec<(String, String)> =
                [(dead.0, "room-a", "room-b"), (dead.1, "room-b", "room-a")]
                    .iter()
                    .filter(|(d, _, _)| *d > 0)
                    .map(|(_, r, o)| ((*r).to_string(), (*o).to_string()))
                    .collect();
            if !wanted.is_empty() && local >= self.replicas[i].next_claim {
                self.replicas[i].next_claim = local + Duration::from_secs(1);
                let reaches = self.replica_reaches(i, Site::Witness);
                for (_, other) in &wanted {
                    let claim = Claim {
                        room: other.clone(),
                        epoch: None,
                        api_reachable: true,
                    };
                    if let Some(ClaimOutcome::Granted { valid_for_ms, .. }) =
                        self.claim_at_witness(reaches, &claim, &name)
                    {
                        let until = local
                            + node_health::time::shrink(
                                Duration::from_millis(valid_for_ms),
                                timing.drift_ppm,
                            );
                        self.replicas[i].grants.insert(other.clone(), until);
                    }
                }
            }
            for (room, other) in [("room-a", "room-b"), ("room-b", "room-a")] {
                let ok = self.replicas[i]
                    .grants
                    .get(other)
                    .is_some_and(|until| local < *until);
                witness_ok.insert(room.to_string(), ok);
            }
        }
        let r = &self.replicas[i];
        let room_of = |n: &str| zone_of(r, n);
        let mut inputs = Vec::new();
        for (n, verdict) in &r.verdicts {
            let Some(view) = r.nodes.get(n) else {
                continue;
            };
            let Some(node) = &view.node else {
                continue;
            };
            let vouchers: Vec<String> = match pairing.partner_of(n) {
                Some(p) => vec![p.to_string()],
                None => {
                    let mine = room_of(n);
                    r.nodes
                        .iter()
                        .filter(|(m, v)| {
                            v.facts.is_some() && room_of(m).is_some() && room_of(m) != mine
                        })
                        .map(|(m, _)| m.clone())
                        .collect()
                }
            };
            let mut clear = Some(MonoTime::ZERO);
            for v in &vouchers {
                let c = r.nodes.get(v).and_then(|x| x.obs.clear_at(local, &timing));
                clear = match (clear, c) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            let pods: Vec<&PodObj> = r.pods.values().filter(|p| &p.node == n).collect();
            inputs.push((
                n.clone(),
                RemediationInput {
                    verdict: *verdict,
                    vouchers_clear_since: clear,
                    excluded: node.control_plane,
                    tainted: node.out_of_service,
                    fenced_boot_annotation: node.fenced_boot.clone(),
                    pods: pods.len(),
                    terminating_pods: pods.iter().filter(|p| p.terminating).count(),
                    ready: node.ready == Readiness::True,
                    boot_id: Some(node.boot_id.to_string()),
                    // The commit is conditional on the Lease the verdict was judged on.
                    heartbeat: view.verdict_obs().agent.map(|_| view.agent_rv.to_string()),
                    fence_marker: view.fence_marker,
                    paused,
                    witness_ok: room_of(n)
                        .and_then(|z| witness_ok.get(&z).copied())
                        .unwrap_or(self.witness.is_none()),
                },
            ));
        }
        for (n, input) in inputs {
            let remediation = self.replicas[i].remediation.entry(n.clone()).or_default();
            let before = remediation.phase.name();
            let actions = remediation.step(&input, local, &timing);
            let after = remediation.phase.name();
            if after != before {
                self.record
                    .phase_at
                    .entry(format!("{n}/{after}"))
                    .or_default()
                    .push(self.now);
            }
            for a in actions {
                if let Some(committed) = self.execute(&name, &n, a)
                    && let Some(r) = self.replicas[i].remediation.get_mut(&n)
                {
                    r.commit_result(committed);
                }
            }
        }
    }

    /// Executes one remediation action as the controller's shell would; for a fence commit,
    /// returns whether it was written.
    fn execute(&mut self, actor: &str, node: &str, action: Action) -> Option<bool> {
        match action {
            Action::CommitFence {
                heartbeat,
                fenced_boot_id,
            } => {
                let key = Key::AgentLease(node.to_string());
                let (
                    Ok(rv),
                    Some(Stored {
                        obj: Obj::Lease(mut lease),
                        ..
                    }),
                ) = (heartbeat.parse::<u64>(), self.api.get(&key).cloned())
                else {
                    return Some(false);
                };
                lease.fence_marker = fenced_boot_id.or_else(|| Some("unknown".into()));
                let ok = self
                    .write(key, Precondition::ResourceVersion(rv), Obj::Lease(lease))
                    .is_ok();
                self.log(
                    actor,
                    if ok {
                        format!("fence of {node} committed on its heartbeat Lease")
                    } else {
                        format!("fence of {node} refused: its heartbeat Lease changed")
                    },
                );
                return Some(ok);
            }
            Action::ClearFence => {
                let key = Key::AgentLease(node.to_string());
                if let Some(Stored {
                    rv,
                    obj: Obj::Lease(mut lease),
                }) = self.api.get(&key).cloned()
                    && lease.fence_marker.is_some()
                {
                    lease.fence_marker = None;
                    if self
                        .write(key, Precondition::ResourceVersion(rv), Obj::Lease(lease))
                        .is_ok()
                    {
                        self.log(actor, format!("fence marker of {node} cleared"));
                    }
                }
            }
            Action::Event { reason, message } => {
                self.log(
                    actor,
                    format!("Event {} on {node}: {message}", reason.as_str()),
                );
            }
            Action::DeletePods => {
                let pods: Vec<String> = self
                    .api
                    .objects()
                    .filter_map(|(k, s)| match (k, &s.obj) {
                        (Key::Pod(p), Obj::Pod(pod)) if pod.node == node => Some(p.clone()),
                        _ => None,
                    })
                    .collect();
                if pods.is_empty() {
                    return None;
                }
                self.check_fenced(node, "deleted the pods of");
                for p in &pods {
                    self.delete_pod(p);
                }
                self.log(
                    actor,
                    format!("force-deleted {} pod(s) of {node}", pods.len()),
                );
            }
            Action::ApplyTaint { fenced_boot_id } => {
                // The shell reads the node first: a taint already there is not written again.
                if self.node_tainted(node) != Some(false) {
                    return None;
                }
                self.check_fenced(node, "tainted");
                let done = self.update_node(node, |n| {
                    n.out_of_service = true;
                    n.fenced_boot = fenced_boot_id;
                });
                if done {
                    self.record
                        .taint_at
                        .entry(node.to_string())
                        .or_default()
                        .push(self.now);
                    self.log(actor, format!("out-of-service taint applied to {node}"));
                }
            }
            Action::RemoveTaint => {
                if self.node_tainted(node) != Some(true) {
                    return None;
                }
                let done = self.update_node(node, |n| {
                    n.out_of_service = false;
                    n.fenced_boot = None;
                });
                if done {
                    self.record
                        .untaint_at
                        .entry(node.to_string())
                        .or_default()
                        .push(self.now);
                    self.log(actor, format!("out-of-service taint removed from {node}"));
                }
            }
        }
        None
    }

    fn node_tainted(&self, node: &str) -> Option<bool> {
        match self.api.get(&Key::Node(node.to_string())) {
            Some(Stored {
                obj: Obj::Node(n), ..
            }) => Some(n.out_of_service),
            _ => None,
        }
    }

    /// S2: the taint and the forced pod deletion only touch a node that runs no HA workload.
    fn check_fenced(&mut self, node: &str, what: &str) {
        if let Some(i) = self.node_idx(node)
            && self.nodes[i].powered
            && self.nodes[i].workloads_running
        {
            self.violate(
                "S2-no-unsafe-taint",
                format!("{what} {node} while it still runs its HA workloads"),
            );
        }
    }

    /// S3: a node cut from the API server whose partner would vouch for it right now (the
    /// partner too has lost the API server, still runs, and sees it as its partner) must not
    /// stop. A whole-cluster API outage is also checked end to end by the `api-outage` scenario.
    fn check_no_storm(&mut self, i: usize) {
        let room = self.nodes[i].room;
        if self.node_reaches(i, Site::Api) {
            return;
        }
        let me = self.nodes[i].name.clone();
        let partner = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.partner().map(str::to_string));
        let Some(p) = partner.and_then(|p| self.node_idx(&p)) else {
            return;
        };
        let pn = &self.nodes[p];
        let timing = self.cfg.timing;
        // The partner must have been reachable for a whole probe interval (and a tick).
        let since = [
            self.healed_at.get(&ordered(room, pn.room)).copied(),
            self.nodes[i].reconnected_at,
            pn.reconnected_at,
        ]
        .into_iter()
        .flatten()
        .max();
        let reachable_long = self.nodes_connected(i, p)
            && since.is_none_or(|t| self.now >= t + ms(timing.probe_interval) + TICK_MS);
        if !pn.powered || !reachable_long {
            return;
        }
        let Some(agent) = pn.agent.as_ref() else {
            return;
        };
        let local = pn.clock.read(self.now);
        let report = agent.report(local);
        // The partner must have been willing to vouch for a whole probe interval (and a tick):
        // a partner that became willing since the last probe could not have been asked yet.
        let willing_long = agent.last_renewal().is_none_or(|r| {
            local.since(r)
                > timing.vouch_after_silence
                    + timing.probe_interval
                    + Duration::from_millis(TICK_MS)
        });
        if willing_long
            && !report.api_reachable
            && report.has_right
            && report.partner.as_deref() == Some(&me)
        {
            self.violate(
                "S3-no-storm",
                format!(
                    "{me} stopped although its partner {} would vouch for it",
                    report.node
                ),
            );
        }
    }

    /// A Dead verdict must mean that, after the heartbeat the observer last saw, the node wrote
    /// no heartbeat for a full lease duration. The observer may judge on a view a watch delay
    /// old, so a renewal that came back after the gap does not make the verdict wrong.
    fn check_dead_verdict(&mut self, node: &str, verdict: &NodeVerdict, obs: &NodeObservation) {
        let (key, seen, lease_ms) = match verdict {
            NodeVerdict::Dead {
                fence_deadline: Some(_),
            } => (
                Key::AgentLease(node.to_string()),
                &obs.agent,
                ms(self.cfg.timing.agent_lease),
            ),
            _ => (
                Key::KubeletLease(node.to_string()),
                &obs.kubelet,
                ms(self.cfg.timing.kubelet_lease),
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
        if gap < lease_ms {
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

    /// S1 for applications: at no instant do two copies of one HA app run. (A copy left
    /// running after its pod was force-deleted is what S2 refuses.)
    fn check_single_copy(&mut self) {
        let mut copies: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, s) in self.api.objects() {
            if let (Key::Pod(_), Obj::Pod(p)) = (k, &s.obj)
                && !p.terminating
                && let Some(n) = self.nodes.iter().find(|n| n.name == p.node)
                && n.powered
                && n.workloads_running
            {
                copies
                    .entry(p.app.clone())
                    .or_default()
                    .push(p.node.clone());
            }
        }
        let mut started = Vec::new();
        let mut bad = Vec::new();
        for (app, nodes) in &copies {
            if nodes.len() > 1 {
                bad.push(format!("{app} runs on {}", nodes.join(" and ")));
            }
            if let Some(n) = nodes.first()
                && self.running.get(app) != Some(n)
            {
                started.push((app.clone(), n.clone()));
            }
        }
        self.running.retain(|app, _| copies.contains_key(app));
        for (app, node) in started {
            self.running.insert(app.clone(), node.clone());
            self.record
                .app_started_at
                .entry(app.clone())
                .or_default()
                .push(self.now);
            self.log(&format!("node/{node}"), format!("{app} running"));
        }
        for b in bad {
            self.violate("S1-single-copy", b);
        }
    }

    /// Checks a scripted scenario's expectations at the end of the run.
    pub fn check_expectations(&mut self, expectations: &[Expectation]) {
        let within = |times: &BTreeMap<String, Vec<u64>>, node: &str, after: u64, limit: u64| {
            first_after(times, node, after).is_some_and(|t| t - after <= limit)
        };
        for e in expectations {
            let unmet = match e {
                Expectation::DeadVerdictWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.dead_at, node, *after_ms, *within_ms)).then(|| {
                    format!("{node} not judged dead within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::HealthyWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.healthy_at, node, *after_ms, *within_ms)).then(|| {
                    format!("{node} not judged healthy within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::TaintWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.taint_at, node, *after_ms, *within_ms))
                    .then(|| format!("{node} not tainted within {within_ms} ms of {after_ms} ms")),
                Expectation::PodsReleasedWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.released_at, node, *after_ms, *within_ms)).then(|| {
                    format!("pods of {node} not released within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::UntaintWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.untaint_at, node, *after_ms, *within_ms)).then(|| {
                    format!("{node} not untainted within {within_ms} ms of {after_ms} ms")
                }),
                Expectation::PhaseWithin {
                    node,
                    phase,
                    after_ms,
                    within_ms,
                } => (!within(
                    &self.record.phase_at,
                    &format!("{node}/{phase}"),
                    *after_ms,
                    *within_ms,
                ))
                .then(|| format!("{node} not {phase} within {within_ms} ms of {after_ms} ms")),
                Expectation::AgentRebootWithin {
                    node,
                    after_ms,
                    within_ms,
                } => (!within(&self.record.agent_rebooted, node, *after_ms, *within_ms)).then(
                    || {
                        format!(
                            "{node} not rebooted by its agent within {within_ms} ms of {after_ms} ms"
                        )
                    },
                ),
                Expectation::NoDeadVerdict => (!self.record.dead_at.is_empty()).then(|| {
                    format!(
                        "nodes judged dead: {}",
                        self.record
                            .dead_at
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
                Expectation::NoTaint => (!self.record.taint_at.is_empty()).then(|| {
                    format!(
                        "nodes tainted: {}",
                        self.record
                            .taint_at
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
                Expectation::NoReboot => (!self.record.watchdog_fired.is_empty()
                    || !self.record.right_lost.is_empty())
                .then(|| {
                    format!(
                        "{} watchdog reset(s), {} agent(s) stopped",
                        self.record.watchdog_fired.len(),
                        self.record.right_lost.len()
                    )
                }),
                Expectation::RoomStops {
                    room,
                    after_ms,
                    within_ms,
                } => {
                    let names: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|n| n.room == *room)
                        .map(|n| n.name.clone())
                        .collect();
                    let late: Vec<String> = names
                        .into_iter()
                        .filter(|n| {
                            !self.record.right_lost.iter().any(|(t, m)| {
                                m == n && *t >= *after_ms && *t - after_ms <= *within_ms
                            }) && !self.record.powered_off_before(n, after_ms + within_ms)
                        })
                        .collect();
                    (!late.is_empty()).then(|| {
                        format!(
                            "{} did not stop within {within_ms} ms of {after_ms} ms",
                            late.join(", ")
                        )
                    })
                }
                Expectation::RoomRuns(room) => {
                    let stopped: Vec<String> = self
                        .record
                        .right_lost
                        .iter()
                        .filter(|(_, n)| self.nodes.iter().any(|x| &x.name == n && x.room == *room))
                        .map(|(t, n)| format!("{n} at {t} ms"))
                        .collect();
                    (!stopped.is_empty())
                        .then(|| format!("{} stopped: {}", room.name(), stopped.join(", ")))
                }
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

    /// The real time by which every node of `room` had lost its right to run after `after`, if
    /// all of them did.
    pub fn room_stopped_at(&self, room: Site, after: u64) -> Option<u64> {
        let mut last = None;
        for n in self.nodes.iter().filter(|n| n.room == room) {
            let t = self
                .record
                .right_lost
                .iter()
                .find(|(t, m)| *m == n.name && *t >= after)
                .map(|(t, _)| *t)?;
            last = Some(last.map_or(t, |l: u64| l.max(t)));
        }
        last
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
fn apply_watch_event(
    r: &mut Replica,
    key: Key,
    value: Option<Stored>,
    local: MonoTime,
    timing: &HealthTiming,
) {
    match (key, value) {
        (
            Key::Node(n),
            Some(Stored {
                obj: Obj::Node(node),
                ..
            }),
        ) => {
            let view = r.nodes.entry(n.clone()).or_default();
            view.facts = Some(NodeFacts {
                name: n.clone(),
                zone: node.zone.clone(),
                control_plane: node.control_plane,
                ready: node.ready == Readiness::True,
            });
            view.obs.ready = Some(node.ready);
            view.node = Some(node);
        }
        (Key::Node(n), None) => {
            r.nodes.remove(&n);
            r.verdicts.remove(&n);
            r.remediation.remove(&n);
        }
        (Key::KubeletLease(n), Some(s)) => {
            let seq = match &s.obj {
                Obj::Lease(l) => l.renew_seq,
                _ => 0,
            };
            Heartbeat::observe(
                &mut r.nodes.entry(n).or_default().obs.kubelet,
                &seq.to_string(),
                local,
            );
        }
        (Key::AgentLease(n), Some(s)) => {
            let Obj::Lease(l) = &s.obj else {
                return;
            };
            // The renewal mark, not the resourceVersion: our own marker write is no heartbeat.
            let view = r.nodes.entry(n).or_default();
            view.fence_marker = l.fence_marker.is_some();
            view.agent_rv = s.rv;
            view.watchdog_enabled = l.watchdog == Some("enabled");
            view.obs.observe_agent(
                &l.renew_seq.to_string(),
                l.failures_before == 0,
                local,
                timing,
            );
        }
        (Key::KubeletLease(n), None) => {
            if let Some(v) = r.nodes.get_mut(&n) {
                v.obs.kubelet = None;
            }
        }
        (Key::AgentLease(n), None) => {
            if let Some(v) = r.nodes.get_mut(&n) {
                v.obs.agent = None;
                v.obs.clear_since = None;
            }
        }
        (
            Key::Pod(p),
            Some(Stored {
                obj: Obj::Pod(pod), ..
            }),
        ) => {
            r.pods.insert(p, pod);
        }
        (Key::Pod(p), None) => {
            r.pods.remove(&p);
        }
        _ => {}
    }
}
