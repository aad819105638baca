//! The simulated two-room cluster: nodes with drifting clocks, kubelets and twosite agents
//! (watchdog, partner probes), kube-controller-manager's node lifecycle, taint eviction, pod
//! garbage collector and a workload controller, links that can be cut, and two controller
//! replicas. Agents and replicas run the real core (`node_health`): the agent's right to run,
//! leader election, verdicts, pairing and remediation.
//!
//! This file is the world: the nodes' hardware (power, boot, the watchdog timer), the links
//! between the sites, faults, clocks and the timeline; each actor lives in its own file.

use super::api::{ApiServer, Key, Obj, PodObj, Precondition, Stored};
use super::kcm::{NODE_MONITOR_PERIOD_MS, POD_GC_PERIOD_MS};
use super::replica::Replica;
use super::report::{TimelineEntry, Violation};
use super::scenario::{Fault, Scenario, Site, node_name};
use super::witness::SimWitness;
use node_health::peer_auth::{PeerKey, PeerKeys};
use node_health::volume::node_deadline::NodeDeadlines;
use node_health::{
    AgentCore, Arbiter, HealthTiming, LeaderConfig, LeaderElector, MonoTime, WitnessConfig,
    WitnessRecord,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

pub use super::checks::first_after;

/// Virtual time advances in steps of this many milliseconds; invariants are checked after each.
pub const TICK_MS: u64 = 100;
/// How long a node takes to boot after its watchdog fired.
pub(super) const REBOOT_MS: u64 = 30_000;

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
pub(super) struct SimNode {
    pub(super) name: String,
    pub(super) room: Site,
    pub(super) powered: bool,
    pub(super) boot_id: u64,
    pub(super) clock: SimClock,
    /// The agent process, if running.
    pub(super) agent: Option<AgentCore>,
    /// Real time of the last watchdog feed, once armed.
    pub(super) last_feed: Option<u64>,
    /// Ground truth: the node's HA workloads are running.
    pub(super) workloads_running: bool,
    /// Powered off by its watchdog (or its agent); boots again at this real time.
    pub(super) reboot_at: Option<u64>,
    /// What reset it, for the boot's timeline entry.
    pub(super) reset_by: &'static str,
    /// The watchdog hardware is broken: it never fires, arming and feeding it fail. Survives a
    /// reboot.
    pub(super) watchdog_broken: bool,
    /// Cut from every other site (the API server, the witness, the other room). Survives a
    /// reboot.
    pub(super) isolated: bool,
    /// Someone in its room's network answers its partner probes in the partner's name, without
    /// the key (a forged peer), ahead of the real partner.
    pub(super) forged: bool,
    /// Real time at which its links last came back after an isolation.
    pub(super) reconnected_at: Option<u64>,
    pub(super) next_kubelet: MonoTime,
    pub(super) next_agent: MonoTime,
    pub(super) next_probe: MonoTime,
    /// The other room's renewal marks as this agent last read them (the core's rule).
    pub(super) other_marks: node_health::OtherRoomMarks,
    /// Real time of this agent's previous listing of the other room's Leases (for the checks).
    pub(super) other_listed_at: Option<u64>,
    pub(super) next_claim: MonoTime,
    /// The agent's table of the fence deadlines its node's guards armed.
    pub(super) deadlines: NodeDeadlines,
    /// A deadline holds the watchdog feeds back (logged once per episode).
    pub(super) feeds_withheld: bool,
    /// The core's rule for an overdue deadline (acted on once per episode).
    pub(super) deadline_enforcer: node_health::volume::node_deadline::DeadlineEnforcer,
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
    /// The volume lease's timing every guard uses.
    pub volume_timing: node_health::VolumeTiming,
    /// Guards are built with `VolumeGuard::new_unchecked`: an unsafe `volume_timing` is used
    /// as it is (to show the checks catch it).
    pub unchecked_volume_timing: bool,
    /// A faulty agent: it feeds its watchdog whatever deadlines the guards armed.
    pub agent_ignores_deadlines: bool,
    /// A faulty controller: it takes a node it does not judge Healthy for fenced and hands its
    /// volumes over at once.
    pub handover_on_suspicion: bool,
    /// A faulty agent: it takes any change of another room's heartbeat Lease (its
    /// resourceVersion) as contact, the controller's fence-marker write included.
    pub contact_by_resource_version: bool,
    /// A faulty controller: it never puts the early `twosite.dev/unresponsive:NoSchedule` taint
    /// on a dead node.
    pub no_unschedulable_taint: bool,
    /// A faulty controller, as twosite was before: it deletes a fenced node's pods first, and
    /// its out-of-service taint lands half a second later (a controller pass, or a Node write
    /// that met a conflict and was retried).
    pub release_before_taint: bool,
    /// A faulty agent, as twosite was before: partner answers are not verified (the agents run
    /// with `--insecure-peer-probes`), so a forged peer's vouch counts.
    pub insecure_peer_probes: bool,
    /// A misconfigured webhook: launcher pods of opted-in VMs are admitted without the gate.
    pub vm_gate_off: bool,
    /// A faulty controller: it deletes opted-in VMs' launcher pods on any node it does not
    /// judge Healthy, without waiting for the fence.
    pub vm_release_on_suspicion: bool,
    /// Who keeps the workloads running: twosite, or what users run today
    /// ([`super::policy::Policy`], `twosite simulate --compare`).
    pub policy: super::policy::Policy,
    /// Compare mode: the world adds the default 300 s toleration eviction and the copies a
    /// cut-off node runs on ([`super::policy`]).
    pub compare: bool,
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
            contact_by_resource_version: false,
            no_unschedulable_taint: false,
            release_before_taint: false,
            insecure_peer_probes: false,
            volume_timing: node_health::VolumeTiming::default(),
            unchecked_volume_timing: false,
            agent_ignores_deadlines: false,
            handover_on_suspicion: false,
            vm_gate_off: false,
            vm_release_on_suspicion: false,
            policy: super::policy::Policy::Twosite,
            compare: false,
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
    /// Since when a leader has judged each node Dead with remediation not paused, the node not
    /// excluded: from then on twosite promises the node is unschedulable within a second.
    pub must_be_unschedulable_since: BTreeMap<String, u64>,
    /// Power losses and returns, with the state of the world then (the liveness checks').
    pub(super) lost: Vec<super::liveness::Probe>,
    pub(super) returned: Vec<super::liveness::Probe>,
    /// Event counts reported as figures (forged partner answers refused and taken).
    pub counters: BTreeMap<&'static str, u64>,
    pub(super) volumes: super::volume::VolumeRecord,
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
    pub(super) rng: ChaCha8Rng,
    pub(super) cfg: SimConfig,
    pub(super) cut: BTreeSet<(Site, Site)>,
    /// When each link was last healed.
    pub(super) healed_at: BTreeMap<(Site, Site), u64>,
    pub(super) api: ApiServer,
    pub(super) nodes: Vec<SimNode>,
    pub(super) replicas: Vec<Replica>,
    pub(super) next_boot: u64,
    pub(super) next_monitor: u64,
    pub(super) next_pod_gc: u64,
    /// Real time of the last deletion of each Node object (pairs with such a node may change).
    pub(super) deleted_at: BTreeMap<String, u64>,
    /// Where each app runs now, to log starts once.
    pub(super) running: BTreeMap<String, String>,
    /// The HA applications (one per initial worker).
    pub(super) apps: Vec<String>,
    pub(super) next_pod: u64,
    pub(super) witness: Option<SimWitness>,
    pub(super) scheduler: super::scheduler::Scheduler,
    pub(super) seq: u64,
    /// The cluster's peer keys (the Secret every agent mounts); `None` with
    /// `insecure_peer_probes`.
    pub(super) peer_keys: Option<PeerKeys>,
    /// A forger's own key: not the cluster's.
    pub(super) forger_keys: PeerKeys,
    /// Probes sent so far: every nonce is fresh.
    pub(super) probes_sent: u64,
    /// Protected volumes, their consumers and devices.
    pub(super) volumes: Vec<super::volume::SimVolume>,
    /// The volumes' own randomness (delays of guard IO), apart from `rng` so that adding
    /// volumes leaves the rest of a seed's timeline as it was.
    pub(super) vol_rng: ChaCha8Rng,
    /// KubeVirt's VMs and guests.
    pub(super) vm: super::kubevirt::VmWorld,
    /// The alternative policies' actors and compare mode's observations.
    pub(super) alt: super::policy::AltState,
    pub timeline: Vec<TimelineEntry>,
    pub violations: Vec<Violation>,
    pub record: Record,
}

pub(super) fn ordered(a: Site, b: Site) -> (Site, Site) {
    if a <= b { (a, b) } else { (b, a) }
}

pub(super) fn zone(room: Site) -> String {
    room.name().to_string()
}

/// Peer keys from a fixed secret (32 bytes and more).
fn peer_keys(secret: &[u8]) -> PeerKeys {
    let padded = [secret, &[0u8; 32]].concat();
    match PeerKey::new(&padded) {
        Ok(k) => PeerKeys::new(k, None),
        Err(e) => unreachable!("a padded key is long enough: {e}"),
    }
}

pub(super) fn ms(d: Duration) -> u64 {
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
            scheduler: super::scheduler::Scheduler::default(),
            seq: 0,
            peer_keys: None,
            forger_keys: peer_keys(b"a forger's key, not the cluster's"),
            probes_sent: 0,
            volumes: Vec::new(),
            vol_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x766f_6c75_6d65_7321),
            vm: super::kubevirt::VmWorld::new(seed),
            alt: Default::default(),
            timeline: Vec::new(),
            violations: Vec::new(),
            record: Record::default(),
        };
        std::mem::swap(&mut cluster.rng, &mut rng);
        if !cluster.cfg.insecure_peer_probes {
            cluster.peer_keys = Some(peer_keys(b"the simulated cluster's key"));
        }
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
        cluster.add_volumes(&scenario.volumes, scenario.client_records);
        cluster.add_vms(&scenario.vms);
        cluster.vm.expectations = scenario.vm_expectations.clone();
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
                deferred_taint: BTreeMap::new(),
                next_claim: MonoTime::ZERO,
                volumes: BTreeMap::new(),
                consumers: BTreeMap::new(),
                switches: BTreeMap::new(),
                vms: Default::default(),
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
    pub(super) fn next_seq(&mut self) -> u64 {
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
            forged: false,
            reconnected_at: None,
            next_kubelet: MonoTime::ZERO,
            next_agent: MonoTime::ZERO,
            next_probe: MonoTime::ZERO,
            other_marks: node_health::OtherRoomMarks::default(),
            other_listed_at: None,
            next_claim: MonoTime::ZERO,
            deadlines: NodeDeadlines::new(),
            feeds_withheld: false,
            deadline_enforcer: Default::default(),
        });
    }

    pub(super) fn log(&mut self, actor: &str, event: String) {
        self.timeline.push(TimelineEntry {
            t_ms: self.now,
            actor: actor.to_string(),
            event,
        });
    }

    pub(super) fn violate(&mut self, invariant: &str, detail: String) {
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
    pub(super) fn node_reaches(&self, i: usize, site: Site) -> bool {
        !self.nodes[i].isolated && self.link_up(self.nodes[i].room, site)
    }

    /// Nodes `i` and `j` reach each other (partner probes).
    pub(super) fn nodes_connected(&self, i: usize, j: usize) -> bool {
        !self.nodes[i].isolated
            && !self.nodes[j].isolated
            && self.link_up(self.nodes[i].room, self.nodes[j].room)
    }

    /// Replica `i` reaches `site`: through its room's link, unless its host is isolated.
    pub(super) fn replica_reaches(&self, i: usize, site: Site) -> bool {
        let r = &self.replicas[i];
        self.link_up(r.room, site)
            && self
                .node_idx(&r.host)
                .is_none_or(|h| !self.nodes[h].isolated)
    }

    pub(super) fn node_idx(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub(super) fn power_off(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        let n = &mut self.nodes[i];
        n.powered = false;
        n.workloads_running = false;
        n.last_feed = None;
        for r in self.replicas.iter_mut().filter(|r| r.host == name) {
            r.up = false;
            r.leading = false;
        }
        self.volume_node_down(&name);
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
        n.other_marks.clear();
        n.next_claim = MonoTime::ZERO;
        n.last_feed = None;
        n.workloads_running = false;
        n.reboot_at = None;
        n.next_kubelet = MonoTime::ZERO;
        n.next_agent = MonoTime::ZERO;
        n.next_probe = MonoTime::ZERO;
        n.deadlines = NodeDeadlines::new();
        n.feeds_withheld = false;
        n.deadline_enforcer = Default::default();
        let name = n.name.clone();
        for r in self.replicas.iter_mut().filter(|r| r.host == name) {
            r.up = true;
            r.restart(now, rate);
        }
        self.volume_node_up(&name);
    }

    /// Applies one fault now.
    pub fn apply(&mut self, fault: &Fault) {
        self.log("fault", fault.to_string());
        if self.apply_volume_fault(fault) {
            return;
        }
        match fault {
            Fault::PowerOff(n) => {
                self.record.powered_off.push((self.now, n.clone()));
                if let Some(i) = self.node_idx(n) {
                    let apps = if self.nodes[i].powered && self.nodes[i].workloads_running {
                        self.running
                            .iter()
                            .filter(|(_, on)| *on == n)
                            .map(|(app, _)| app.clone())
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let calm = self.calm_but(i) && self.nodes[i].agent.is_some();
                    self.record.lost.push(super::liveness::Probe {
                        at: self.now,
                        node: n.clone(),
                        apps,
                        calm,
                        tainted: false,
                    });
                    self.power_off(i);
                    self.nodes[i].reboot_at = None;
                }
            }
            Fault::PowerOn(n) => {
                if let Some(i) = self.node_idx(n)
                    && !self.nodes[i].powered
                {
                    let tainted = matches!(
                        self.api.get(&Key::Node(n.clone())),
                        Some(Stored { obj: Obj::Node(o), .. }) if o.out_of_service
                    );
                    self.power_on(i);
                    let calm = self.calm_but(i);
                    self.record.returned.push(super::liveness::Probe {
                        at: self.now,
                        node: n.clone(),
                        apps: Vec::new(),
                        calm,
                        tainted,
                    });
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
            Fault::ForgePeer(n) => {
                if let Some(i) = self.node_idx(n) {
                    self.nodes[i].forged = true;
                }
            }
            Fault::StopForging(n) => {
                if let Some(i) = self.node_idx(n) {
                    self.nodes[i].forged = false;
                }
            }
            Fault::WitnessDown => {
                if let Some(w) = self.witness.as_mut() {
                    w.up = false;
                }
            }
            Fault::Switchover { .. }
            | Fault::FreezeHolder { .. }
            | Fault::KillHolder(_)
            | Fault::IsolateHolder(_)
            | Fault::ReconnectHolder(_) => {}
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
        let twosite = self.cfg.policy.is_twosite();
        if twosite {
            self.step_guards();
        } else {
            self.step_lock_consumers();
        }
        self.step_kcm();
        self.step_alternatives();
        self.step_scheduler();
        self.step_kubevirt();
        if twosite {
            for i in 0..self.replicas.len() {
                self.step_replica(i);
            }
        }
        self.check_single_leader();
        self.check_single_copy();
        self.check_single_writer();
        self.check_vm_disks();
        if self.witness.is_some() {
            self.check_single_grant();
        }
        self.observe_compare();
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
            if self.cfg.policy.is_twosite() {
                self.step_agent(i);
            } else {
                self.step_plain_node(i);
            }
            // The watchdog: a hardware timer, on real time.
            if let Some(fed) = self.nodes[i].last_feed
                && !self.nodes[i].watchdog_broken
                && self.now.saturating_sub(fed)
                    >= ms(self.cfg.timing.watchdog) + self.cfg.watchdog_late_ms
            {
                let name = self.nodes[i].name.clone();
                self.record.watchdog_fired.push((self.now, name.clone()));
                let local = self.nodes[i].clock.read(self.now);
                if self.nodes[i]
                    .deadlines
                    .check(local, self.cfg.timing.watchdog)
                    .withhold_feed
                {
                    // A guard's deadline holds the feeds back: the node is fenced over it.
                    self.record
                        .volumes
                        .fenced_by_deadline
                        .push((self.now, name.clone()));
                }
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
}
