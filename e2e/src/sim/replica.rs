//! A twosite controller replica: its watches, leader election, verdicts, pairing, remediation
//! and the shell that executes remediation actions, all through the core (`node_health`).

use super::api::{
    ConsumerObj, Key, LeaseObj, NodeObj, Obj, PodObj, Precondition, StatusObj, Stored,
    VolumeLeaseObj,
};
use super::cluster::{Cluster, SimClock, ms, zone};
use super::scenario::Site;
use node_health::assess::{
    AGENT_LEASE_PREFIX, AgentRecord, NodeRecord, apply_witness, needs_pod_count, rooms_to_claim,
    verdict_observation,
};
use node_health::volume::VolumeSwitch;
use node_health::{
    Action, Claim, ClaimOutcome, ClusterView, HealthTiming, Heartbeat, LeaderAction, LeaderElector,
    LeaseRecord, MonoTime, NodeFacts, NodeObservation, NodeRemediation, NodeVerdict,
    NodeView as CoreNodeView, Pair, Pairing, Readiness, RoomConfig, assess, judge, pair_nodes,
};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// The share of workers that may be dead in both rooms before remediation pauses.
const MAX_DEAD_SHARE_PCT: u8 = 50;

#[derive(Debug)]
pub(super) enum Outcome {
    Ok(LeaseRecord),
    Conflict,
}

#[derive(Debug)]
pub(super) struct PendingWrite {
    deliver_at: u64,
    sent_at: MonoTime,
    outcome: Outcome,
}

/// The controller's view of one node, fed by its watches.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeView {
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
    /// Since when the node has shown `twosite.dev/unresponsive:NoSchedule` (this replica's
    /// clock), as the controller's Node watch records it.
    unschedulable_since: Option<MonoTime>,
}

/// One controller replica: the state a real controller process keeps in memory.
#[derive(Debug)]
pub(super) struct Replica {
    pub(super) name: String,
    pub(super) room: Site,
    pub(super) host: String,
    pub(super) up: bool,
    pub(super) clock: SimClock,
    pub(super) elector: LeaderElector,
    pub(super) next_retry: MonoTime,
    pub(super) pending: Option<PendingWrite>,
    pub(super) connected: bool,
    /// Real time at which the re-list after the last (re)connect is delivered.
    pub(super) synced_at: Option<u64>,
    /// The replica's clock when that re-list arrived.
    pub(super) synced_local: Option<MonoTime>,
    pub(super) queue: VecDeque<(u64, Key, Option<Stored>)>,
    pub(super) last_delivery: u64,
    pub(super) nodes: BTreeMap<String, NodeView>,
    pub(super) pods: BTreeMap<String, PodObj>,
    pub(super) verdicts: BTreeMap<String, NodeVerdict>,
    pub(super) remediation: BTreeMap<String, NodeRemediation>,
    pub(super) status: Option<(u64, StatusObj)>,
    pub(super) leading: bool,
    /// Witness grants this replica holds for a room, until (its clock).
    pub(super) grants: BTreeMap<String, MonoTime>,
    /// The faulty shell's taints put off, with when they go out (`release_before_taint`).
    pub(super) deferred_taint: BTreeMap<String, (u64, Action)>,
    pub(super) next_claim: MonoTime,
    /// The volume Leases as its watch shows them: (resourceVersion, object).
    pub(super) volumes: BTreeMap<String, (u64, VolumeLeaseObj)>,
    /// The consumer pods as its watch shows them.
    pub(super) consumers: BTreeMap<String, ConsumerObj>,
    /// The core's per-volume state while leading.
    pub(super) switches: BTreeMap<String, VolumeSwitch>,
    /// The VM watch caches and the core's per-VM state.
    pub(super) vms: super::vm_controller::VmCache,
}

impl Replica {
    pub(super) fn restart(&mut self, now: u64, rate_ppm: i64) {
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
        self.volumes.clear();
        self.consumers.clear();
        self.switches.clear();
        self.vms = Default::default();
    }
}

impl Cluster {
    pub(super) fn step_replica(&mut self, i: usize) {
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
            r.consumers.retain(|p, _| {
                snapshot
                    .iter()
                    .any(|(_, k, _)| *k == Key::Consumer(p.clone()))
            });
            r.vms
                .retain_listed(&snapshot.iter().map(|(_, k, _)| k).collect::<Vec<_>>());
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
                self.replicas[i].switches.clear();
                self.replicas[i].vms.protections.clear();
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
        // One view for the verdicts and the remediation, judged by the core's rules.
        let view = self.cluster_view(i, settled);
        let names: Vec<String> = view
            .nodes
            .iter()
            .map(|n| n.record.facts.name.clone())
            .collect();
        for (n, node) in names.iter().zip(&view.nodes) {
            let obs = verdict_observation(node);
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
        self.remediate(i, local, &pairing, &view);
        self.lead_volumes(i, local);
        self.lead_vms(i, local);

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

    /// The core's view of the cluster, filled from this replica's watch caches as the
    /// controller fills it from its own ([`node_health::assess`]).
    fn cluster_view(&self, i: usize, settled: bool) -> ClusterView {
        let r = &self.replicas[i];
        let nodes = r
            .nodes
            .iter()
            .filter_map(|(n, v)| {
                let (facts, node) = (v.facts.clone()?, v.node.as_ref()?);
                let seen_agent = v.obs.agent.is_some() || v.agent_rv != 0;
                Some(CoreNodeView {
                    record: NodeRecord {
                        facts,
                        uid: None,
                        excluded: node.control_plane,
                        tainted: node.out_of_service,
                        unschedulable: node.unschedulable,
                        fenced_boot_annotation: node.fenced_boot.clone(),
                        boot_id: Some(node.boot_id.to_string()),
                        readiness: Some(node.ready),
                    },
                    heartbeats: v.obs.clone(),
                    unschedulable_since: v.unschedulable_since,
                    agent: seen_agent.then(|| AgentRecord {
                        lease_name: format!("{AGENT_LEASE_PREFIX}{n}"),
                        fence_marker: v.fence_marker,
                        watchdog: v.watchdog_enabled,
                        boot_id: None,
                        resource_version: v.agent_rv.to_string(),
                    }),
                })
            })
            .collect();
        ClusterView { nodes, settled }
    }

    /// Remediation through the core for every node the leader knows: the same assessment,
    /// witness rule and pod-count rule as the controller, then the shell's IO.
    fn remediate(&mut self, i: usize, local: MonoTime, pairing: &Pairing, view: &ClusterView) {
        let timing = self.cfg.timing;
        let name = self.replicas[i].name.clone();
        let mut assessment = assess(view, Some(pairing), local, &timing, MAX_DEAD_SHARE_PCT);
        if self.witness.is_some() {
            // Claims at most once a second, as the controller's witness link.
            let wanted = rooms_to_claim(&assessment, Some(pairing));
            if !wanted.is_empty() && local >= self.replicas[i].next_claim {
                self.replicas[i].next_claim = local + Duration::from_secs(1);
                let reaches = self.replica_reaches(i, Site::Witness);
                for other in &wanted {
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
            let grants = &self.replicas[i].grants;
            apply_witness(&mut assessment, Some(pairing), |room| {
                grants.get(room).is_some_and(|until| local < *until)
            });
        }
        for node in assessment.nodes {
            let n = node.name;
            let mut input = node.input;
            // The promise the checks hold twosite to (not a decision: the core makes that).
            if input.verdict.is_dead() && !input.paused && !input.excluded {
                self.record
                    .must_be_unschedulable_since
                    .entry(n.clone())
                    .or_insert(self.now);
            } else if !input.verdict.is_dead() {
                self.record.must_be_unschedulable_since.remove(&n);
            }
            if self.cfg.no_unschedulable_taint {
                // The faulty controller without the early taint: its core is told the taint has
                // long been on, so it neither asks for it nor waits for it.
                input.unschedulable_since = Some(MonoTime::ZERO);
            }
            let remediation = self.replicas[i].remediation.entry(n.clone()).or_default();
            if needs_pod_count(remediation, &input) {
                let pods: Vec<&PodObj> = self.replicas[i]
                    .pods
                    .values()
                    .filter(|p| p.node == n)
                    .collect();
                input.pods = pods.len();
                input.terminating_pods = pods.iter().filter(|p| p.terminating).count();
            }
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
            // In order, stopping at the first failed write, as the controller does.
            let mut actions: VecDeque<Action> = actions.into();
            if self.replicas[i]
                .deferred_taint
                .get(&n)
                .is_some_and(|(due, _)| *due <= self.now)
                && let Some((_, taint)) = self.replicas[i].deferred_taint.remove(&n)
            {
                // The faulty shell's late taint, before anything else.
                let _ = self.execute(&name, &n, taint);
            }
            while let Some(a) = actions.pop_front() {
                if self.cfg.release_before_taint
                    && matches!(a, Action::ApplyTaint { .. })
                    && actions.iter().any(|b| matches!(b, Action::DeletePods))
                {
                    // The faulty shell of `release_before_taint`: the release now, the taint
                    // half a second later (a pass, or a conflict and a retry).
                    self.replicas[i]
                        .deferred_taint
                        .entry(n.clone())
                        .or_insert((self.now + 500, a));
                    continue;
                }
                match self.execute(&name, &n, a) {
                    Err(()) => break,
                    Ok(Some(committed)) => {
                        if let Some(r) = self.replicas[i].remediation.get_mut(&n) {
                            actions.extend(r.commit_result(committed));
                        }
                    }
                    Ok(None) => {}
                }
            }
        }
    }

    /// Executes one remediation action as the controller's shell would; for a fence commit,
    /// returns whether it was written; `Err` when a taint write failed.
    fn execute(&mut self, actor: &str, node: &str, action: Action) -> Result<Option<bool>, ()> {
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
                    return Ok(Some(false));
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
                return Ok(Some(ok));
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
                let launchers = self.releasable_launchers(node);
                if pods.is_empty() && launchers.is_empty() {
                    return Ok(None);
                }
                self.check_fenced(node, "deleted the pods of");
                for p in &pods {
                    self.delete_pod(p);
                }
                // Launcher pods of VMs that did not opt in are left to Kubernetes.
                let vms = self.release_launchers(&launchers);
                self.log(
                    actor,
                    format!("force-deleted {} pod(s) of {node}", pods.len() + vms),
                );
            }
            Action::ApplyTaint { fenced_boot_id } => {
                // The shell reads the node first: a taint already there is not written again.
                match self.node_tainted(node) {
                    Some(false) => {}
                    Some(true) => return Ok(None),
                    None => return Err(()),
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
                } else {
                    return Err(());
                }
            }
            Action::MarkUnschedulable | Action::ClearUnschedulable => {
                let mark = action == Action::MarkUnschedulable;
                // The shell reads the node first: a taint already as asked is not written again.
                match self.api.get(&Key::Node(node.to_string())) {
                    Some(Stored {
                        obj: Obj::Node(n), ..
                    }) if n.unschedulable == mark => return Ok(None),
                    Some(_) => {}
                    None => return Err(()),
                }
                let done = self.update_node(node, |n| n.unschedulable = mark);
                if !done {
                    return Err(());
                }
                self.log(
                    actor,
                    format!(
                        "twosite.dev/unresponsive:NoSchedule {} {node}",
                        if mark { "applied to" } else { "removed from" }
                    ),
                );
            }
            Action::RemoveTaint => {
                if self.node_tainted(node) != Some(true) {
                    return Ok(None);
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
        Ok(None)
    }

    fn node_tainted(&self, node: &str) -> Option<bool> {
        match self.api.get(&Key::Node(node.to_string())) {
            Some(Stored {
                obj: Obj::Node(n), ..
            }) => Some(n.out_of_service),
            _ => None,
        }
    }
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
            view.unschedulable_since = if node.unschedulable {
                view.unschedulable_since.or(Some(local))
            } else {
                None
            };
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
        (key @ (Key::VolumeLease(_) | Key::Consumer(_)), value) => {
            super::volume_controller::apply_volume_event(r, key, value);
        }
        (key @ (Key::Vm(_) | Key::Launcher(_) | Key::DiskLease(_)), value) => {
            super::vm_controller::apply_vm_event(r, key, value);
        }
        _ => {}
    }
}
