//! From what the controller observes to the remediation core's inputs: every node's verdict
//! inputs, who may vouch for it and since when they all are clear, exclusion, the per-room dead
//! counts behind the pause, which rooms' witness grants to claim and whether a fence is covered
//! by one, and whose pods must be counted.
//!
//! The controller fills a [`ClusterView`] from its watch caches, the simulation from a replica's
//! view of its simulated API server; both then call [`assess`] and the functions beside it, so
//! there is one rule for each of these decisions.

use crate::remediation::{NodeRemediation, Phase, RemediationInput, pause_reason};
use crate::rooms::{NodeFacts, Pairing};
use crate::time::MonoTime;
use crate::verdict::{HealthTiming, NodeObservation, NodeVerdict, Readiness, judge};
use std::collections::{BTreeSet, HashMap};

/// The prefix of an agent heartbeat Lease's name; the rest is the node's name.
pub const AGENT_LEASE_PREFIX: &str = "twosite-agent-";

/// Pause reasons (the `RemediationPaused` condition's reason).
pub mod pause {
    pub const WATCHES_NOT_SETTLED: &str = "WatchesNotSettled";
    pub const ROOMS_UNKNOWN: &str = "RoomsUnknown";
    pub const DEAD_NODES_IN_BOTH_ROOMS: &str = "DeadNodesInBothRooms";
}

/// Why remediation is paused for the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// A CamelCase word: `WatchesNotSettled`, `RoomsUnknown`, `DeadNodesInBothRooms`.
    pub reason: &'static str,
    pub message: String,
}

/// What is known of one Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// What the pairing needs.
    pub facts: NodeFacts,
    pub uid: Option<String>,
    /// A control-plane node, or labelled `twosite.dev/exclude-from-remediation=true`.
    pub excluded: bool,
    /// The out-of-service taint (`NoExecute`) is on the node.
    pub tainted: bool,
    /// Our `twosite.dev/unresponsive:NoSchedule` taint is on the node.
    pub unschedulable: bool,
    /// The `twosite.dev/fenced-boot-id` annotation.
    pub fenced_boot_annotation: Option<String>,
    /// `status.nodeInfo.bootID`.
    pub boot_id: Option<String>,
    /// The Ready condition; `None` if the node has none yet.
    pub readiness: Option<Readiness>,
}

/// What the agent's heartbeat Lease says besides the heartbeat itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The heartbeat Lease's name.
    pub lease_name: String,
    /// The controller's fence marker is on the Lease.
    pub fence_marker: bool,
    /// The agent feeds an armed watchdog (`twosite.dev/watchdog=enabled`).
    pub watchdog: bool,
    /// `twosite.dev/boot-id`.
    pub boot_id: Option<String>,
    /// The Lease's resourceVersion: the precondition of the fence commit.
    pub resource_version: String,
}

/// One node as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub record: NodeRecord,
    /// Every heartbeat seen of it, on the observer's clock, its agent counted whatever its
    /// watchdog says (what tells whether it is clear).
    pub heartbeats: NodeObservation,
    /// Its agent's heartbeat Lease, if it has one.
    pub agent: Option<AgentRecord>,
    /// Since when the observer has seen `record.unschedulable`, continuously (its clock).
    pub unschedulable_since: Option<MonoTime>,
}

/// The cluster as one controller replica sees it at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    /// The watches have been synced for long enough that a fresh listing's heartbeats had
    /// time to arrive: only then may a node be judged dead.
    pub settled: bool,
}

impl ClusterView {
    #[cfg(test)]
    fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.record.facts.name == name)
    }
}

/// What a node's verdict is judged on: its heartbeats and Ready condition, without the agent
/// when the agent's watchdog is not enabled (nothing would reboot the node, so it is never
/// treated as fenced by time).
pub fn verdict_observation(node: &NodeView) -> NodeObservation {
    let mut obs = node.heartbeats.clone();
    if !node.agent.as_ref().is_some_and(|a| a.watchdog) {
        obs.agent = None;
        obs.clear_since = None;
    }
    obs.ready = node.record.readiness;
    obs
}

/// One node, assessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAssessment {
    pub name: String,
    pub uid: Option<String>,
    /// Its zone, if it is one of the two rooms.
    pub room: Option<String>,
    pub partner: Option<String>,
    /// The name of its agent's heartbeat Lease.
    pub agent_lease: String,
    /// The core's input, pods not counted yet (0).
    pub input: RemediationInput,
}

/// Every node, assessed, and whether remediation is paused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assessment {
    pub nodes: Vec<NodeAssessment>,
    pub pause: Option<Pause>,
}

/// Which room (0 = A, 1 = B) the node stands in.
fn room_index(record: &NodeRecord, pairing: Option<&Pairing>) -> Option<usize> {
    let (a, b) = pairing?.rooms.as_ref()?;
    let zone = record.facts.zone.as_deref()?.trim();
    if zone == a.0 {
        Some(0)
    } else if zone == b.0 {
        Some(1)
    } else {
        None
    }
}

/// Name lookups for one assessment: maps instead of a linear scan per node, which made
/// [`assess`] quadratic (1,000 nodes: a million name comparisons per pass).
struct Index<'a> {
    nodes: HashMap<&'a str, &'a NodeView>,
    partners: HashMap<&'a str, &'a str>,
}

impl<'a> Index<'a> {
    fn new(view: &'a ClusterView, pairing: Option<&'a Pairing>) -> Index<'a> {
        let nodes = view
            .nodes
            .iter()
            .map(|n| (n.record.facts.name.as_str(), n))
            .collect();
        let partners = pairing
            .map(|p| {
                p.pairs
                    .iter()
                    .flat_map(|pair| {
                        [
                            (pair.a.as_str(), pair.b.as_str()),
                            (pair.b.as_str(), pair.a.as_str()),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        Index { nodes, partners }
    }
}

/// The nodes that may vouch for `record`'s node: its partner; for a worker without a partner,
/// every worker of the other room (or, outside both rooms, every other worker). Control-plane
/// nodes never vouch: they run no agent partnered with anybody.
pub fn vouchers<'a>(
    view: &'a ClusterView,
    record: &NodeRecord,
    pairing: &'a Pairing,
) -> Vec<&'a str> {
    vouchers_in(&Index::new(view, Some(pairing)), view, record, pairing)
}

fn vouchers_in<'a>(
    index: &Index<'a>,
    view: &'a ClusterView,
    record: &NodeRecord,
    pairing: &'a Pairing,
) -> Vec<&'a str> {
    let name = record.facts.name.as_str();
    match index.partners.get(name) {
        Some(partner) => vec![*partner],
        None => {
            let own = room_index(record, Some(pairing));
            view.nodes
                .iter()
                .map(|n| &n.record)
                .filter(|r| !r.facts.control_plane && r.facts.name != name)
                .filter(|r| match own {
                    Some(i) => room_index(r, Some(pairing)) == Some(1 - i),
                    None => true,
                })
                .map(|r| r.facts.name.as_str())
                .collect()
        }
    }
}

/// Since when every node that may vouch for `record`'s node ([`vouchers`]) has been clear;
/// `None` if one is not (or the pairing is unknown). No voucher at all: `Some(MonoTime::ZERO)`.
pub fn vouchers_clear_since(
    view: &ClusterView,
    record: &NodeRecord,
    pairing: Option<&Pairing>,
    now: MonoTime,
    t: &HealthTiming,
) -> Option<MonoTime> {
    vouchers_clear_since_in(&Index::new(view, pairing), view, record, pairing, now, t)
}

fn vouchers_clear_since_in(
    index: &Index<'_>,
    view: &ClusterView,
    record: &NodeRecord,
    pairing: Option<&Pairing>,
    now: MonoTime,
    t: &HealthTiming,
) -> Option<MonoTime> {
    let pairing = pairing?;
    vouchers_in(index, view, record, pairing)
        .into_iter()
        .try_fold(MonoTime::ZERO, |latest, v| {
            let clear = index.nodes.get(v)?.heartbeats.clear_at(now, t)?;
            Some(latest.max(clear))
        })
}

/// Dead workers per room (control-plane nodes and nodes outside both rooms not counted; an
/// excluded worker is counted like any other: it is dead all the same), and the workers in the
/// two rooms.
pub fn dead_per_room(
    view: &ClusterView,
    verdicts: &[NodeVerdict],
    pairing: Option<&Pairing>,
) -> ((usize, usize), usize) {
    let mut dead = [0_usize; 2];
    let mut workers = 0;
    for (n, v) in view.nodes.iter().zip(verdicts) {
        if n.record.facts.control_plane {
            continue;
        }
        if let Some(i) = room_index(&n.record, pairing) {
            workers += 1;
            if v.is_dead() {
                dead[i] += 1;
            }
        }
    }
    ((dead[0], dead[1]), workers)
}

/// Every node's core input at `now`, and whether remediation is paused.
pub fn assess(
    view: &ClusterView,
    pairing: Option<&Pairing>,
    now: MonoTime,
    t: &HealthTiming,
    max_dead_share_pct: u8,
) -> Assessment {
    let settled = view.settled;
    let verdicts: Vec<NodeVerdict> = view
        .nodes
        .iter()
        .map(|n| judge(&verdict_observation(n), now, t, settled))
        .collect();
    let (dead, workers) = dead_per_room(view, &verdicts, pairing);
    let rooms_known = pairing.is_some_and(|p| p.rooms.is_some());
    let pause = if !settled {
        pause_reason(false, (0, 0), workers, max_dead_share_pct).map(|message| Pause {
            reason: pause::WATCHES_NOT_SETTLED,
            message,
        })
    } else if !rooms_known {
        Some(Pause {
            reason: pause::ROOMS_UNKNOWN,
            message: "the two rooms and the pairs are not known".to_string(),
        })
    } else {
        pause_reason(true, dead, workers, max_dead_share_pct).map(|message| Pause {
            reason: pause::DEAD_NODES_IN_BOTH_ROOMS,
            message,
        })
    };

    let index = Index::new(view, pairing);
    let nodes = view
        .nodes
        .iter()
        .zip(verdicts)
        .map(|(n, verdict)| {
            let r = &n.record;
            let name = r.facts.name.clone();
            let agent = n.agent.as_ref();
            // The commit is conditional on the Lease as last seen: any write since (a renewal
            // above all) makes it fail.
            let heartbeat = verdict_observation(n)
                .agent
                .and(agent.map(|a| a.resource_version.clone()));
            let boot_id = r
                .boot_id
                .clone()
                .or_else(|| agent.and_then(|a| a.boot_id.clone()));
            NodeAssessment {
                uid: r.uid.clone(),
                room: room_index(r, pairing).and(r.facts.zone.clone()),
                partner: index.partners.get(name.as_str()).map(|p| p.to_string()),
                input: RemediationInput {
                    verdict,
                    vouchers_clear_since: vouchers_clear_since_in(&index, view, r, pairing, now, t),
                    excluded: r.excluded,
                    tainted: r.tainted,
                    // On without a time: just seen.
                    unschedulable_since: r
                        .unschedulable
                        .then(|| n.unschedulable_since.unwrap_or(now)),
                    fenced_boot_annotation: r.fenced_boot_annotation.clone(),
                    pods: 0,
                    terminating_pods: 0,
                    ready: r.readiness == Some(Readiness::True),
                    boot_id,
                    heartbeat,
                    fence_marker: agent.is_some_and(|a| a.fence_marker),
                    paused: pause.is_some(),
                    // Without a witness. With one, [`apply_witness`] replaces it.
                    witness_ok: true,
                },
                agent_lease: agent.map_or_else(
                    || format!("{AGENT_LEASE_PREFIX}{name}"),
                    |a| a.lease_name.clone(),
                ),
                name,
            }
        })
        .collect();
    Assessment { nodes, pause }
}

/// The room opposite `room`, if `room` is one of the two.
pub fn opposite_room<'a>(pairing: Option<&'a Pairing>, room: &str) -> Option<&'a str> {
    let (a, b) = pairing?.rooms.as_ref()?;
    if room == a.0 {
        Some(b.0.as_str())
    } else if room == b.0 {
        Some(a.0.as_str())
    } else {
        None
    }
}

/// The rooms to claim at the witness: the one opposite each room with a dead node that may be
/// fenced (not excluded, with an agent).
pub fn rooms_to_claim(assessment: &Assessment, pairing: Option<&Pairing>) -> BTreeSet<String> {
    assessment
        .nodes
        .iter()
        .filter(|n| {
            !n.input.excluded
                && matches!(
                    n.input.verdict,
                    NodeVerdict::Dead {
                        fence_deadline: Some(_)
                    }
                )
        })
        .filter_map(|n| opposite_room(pairing, n.room.as_deref()?))
        .map(str::to_string)
        .collect()
}

/// Sets every node's `witness_ok`: whether the shell holds a grant for the room opposite the
/// node's (`grant_valid(room)`, which the shell answers with its own margin for the commit). A
/// node outside both rooms has no opposite room and is never fenced while a witness is
/// configured.
pub fn apply_witness(
    assessment: &mut Assessment,
    pairing: Option<&Pairing>,
    grant_valid: impl Fn(&str) -> bool,
) {
    for node in &mut assessment.nodes {
        node.input.witness_ok = node
            .room
            .as_deref()
            .and_then(|r| opposite_room(pairing, r))
            .is_some_and(&grant_valid);
    }
}

/// Whether a node's pods must be counted before its step: it is, or may be picked up as,
/// fenced, tainted or recovering.
pub fn needs_pod_count(state: &NodeRemediation, input: &RemediationInput) -> bool {
    matches!(
        state.phase,
        Phase::Fenced | Phase::Tainted | Phase::Recovering
    ) || input.fence_marker
        || (input.tainted && input.fenced_boot_annotation.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::{RoomConfig, pair_nodes};

    fn record(name: &str, zone: &str, control_plane: bool, excluded: bool) -> NodeRecord {
        NodeRecord {
            facts: NodeFacts {
                name: name.into(),
                zone: Some(zone.into()),
                control_plane,
                ready: true,
            },
            uid: None,
            excluded: excluded || control_plane,
            tainted: false,
            unschedulable: false,
            fenced_boot_annotation: None,
            boot_id: Some(format!("boot-{name}")),
            readiness: Some(Readiness::True),
        }
    }

    /// A cluster whose every agent renewed cleanly at 0..=`until` ms, but those in `dead`.
    fn view(nodes: &[(&str, &str, bool, bool)], dead: &[&str], until: u64) -> ClusterView {
        let t = HealthTiming::default();
        let nodes = nodes
            .iter()
            .map(|(n, z, cp, ex)| {
                let mut heartbeats = NodeObservation::default();
                let last = if dead.contains(n) { 0 } else { until };
                for (i, ms) in (0..=last).step_by(2_000).enumerate() {
                    heartbeats.observe_agent(&i.to_string(), true, MonoTime(ms), &t);
                }
                NodeView {
                    record: record(n, z, *cp, *ex),
                    heartbeats,
                    unschedulable_since: None,
                    agent: Some(AgentRecord {
                        lease_name: format!("{AGENT_LEASE_PREFIX}{n}"),
                        fence_marker: false,
                        watchdog: true,
                        boot_id: None,
                        resource_version: "1".into(),
                    }),
                }
            })
            .collect();
        ClusterView {
            nodes,
            settled: true,
        }
    }

    fn pairing(v: &ClusterView) -> Pairing {
        let facts: Vec<NodeFacts> = v.nodes.iter().map(|n| n.record.facts.clone()).collect();
        pair_nodes(
            &RoomConfig::Explicit("room-a".into(), "room-b".into()),
            &facts,
            &[],
        )
    }

    #[test]
    fn an_unpaired_worker_is_vouched_for_by_every_worker_of_the_other_room_only() {
        let v = view(
            &[
                ("a-1", "room-a", false, false),
                ("a-2", "room-a", false, false),
                ("b-1", "room-b", false, false),
                ("cp-b", "room-b", true, false),
            ],
            &[],
            0,
        );
        let p = pairing(&v);
        let unpaired = ["a-1", "a-2"]
            .into_iter()
            .find(|n| p.partner_of(n).is_none())
            .expect("one of room A's two workers is unpaired");
        let record = &v.node(unpaired).expect("listed").record;
        // Not its own room, not the control plane.
        assert_eq!(vouchers(&v, record, &p), vec!["b-1"]);
    }

    #[test]
    fn a_worker_outside_both_rooms_is_vouched_for_by_every_other_worker() {
        let v = view(
            &[
                ("a-1", "room-a", false, false),
                ("b-1", "room-b", false, false),
                ("x-1", "room-x", false, false),
                ("cp", "room-a", true, false),
            ],
            &[],
            0,
        );
        let p = pairing(&v);
        let record = &v.node("x-1").expect("listed").record;
        assert_eq!(vouchers(&v, record, &p), vec!["a-1", "b-1"]);
    }

    #[test]
    fn an_excluded_worker_counts_in_the_pause_rule_a_control_plane_node_does_not() {
        let nodes = [
            ("a-1", "room-a", false, true), // labelled excluded
            ("a-2", "room-a", false, false),
            ("b-1", "room-b", false, false),
            ("b-2", "room-b", false, false),
            ("cp", "room-b", true, false),
        ];
        let t = HealthTiming::default();
        let now = MonoTime(60_000);
        // a-1 (excluded) and b-1 dead: 2 of 4 workers, over 40 %.
        let v = view(&nodes, &["a-1", "b-1"], 60_000);
        let a = assess(&v, Some(&pairing(&v)), now, &t, 40);
        assert_eq!(
            a.pause.as_ref().map(|p| p.reason),
            Some(pause::DEAD_NODES_IN_BOTH_ROOMS)
        );
        // The control-plane node dead beside a-1: not a worker, no pause.
        let v = view(&nodes, &["a-1", "cp"], 60_000);
        let a = assess(&v, Some(&pairing(&v)), now, &t, 40);
        assert_eq!(a.pause, None);
    }

    #[test]
    fn the_rooms_to_claim_are_those_opposite_a_fenceable_dead_node() {
        let nodes = [
            ("a-1", "room-a", false, false),
            ("b-1", "room-b", false, false),
        ];
        let t = HealthTiming::default();
        let v = view(&nodes, &["a-1"], 60_000);
        let p = pairing(&v);
        let mut a = assess(&v, Some(&p), MonoTime(60_000), &t, 51);
        assert_eq!(
            rooms_to_claim(&a, Some(&p)),
            BTreeSet::from(["room-b".to_string()])
        );
        apply_witness(&mut a, Some(&p), |room| room == "room-b");
        let ok: Vec<(&str, bool)> = a
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.input.witness_ok))
            .collect();
        assert_eq!(ok, vec![("a-1", true), ("b-1", false)]);
    }

    #[test]
    fn a_watchdog_that_is_not_enabled_is_judged_without_the_agent() {
        let mut v = view(&[("a-1", "room-a", false, false)], &[], 4_000);
        if let Some(a) = v.nodes[0].agent.as_mut() {
            a.watchdog = false;
        }
        let obs = verdict_observation(&v.nodes[0]);
        assert!(obs.agent.is_none() && obs.clear_since.is_none());
        assert!(v.nodes[0].heartbeats.clear_since.is_some());
    }
}
