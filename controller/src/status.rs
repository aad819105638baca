//! Building the desired `TwoSite` status: pure functions from observed Nodes, the spec and the
//! previous status to the next status, its conditions and the events worth telling a user.

use crate::crd::{
    Condition, LeaderStatus, NodeStatus, PAIRED, PairStatus, REMEDIATION_PAUSED, ROOMS_RESOLVED,
    RoomSource, RoomsStatus, TwoSite, TwoSiteSpec, TwoSiteStatus, UnpairedStatus,
    WITNESS_REACHABLE, WitnessGrantStatus, WitnessStatus,
};
use crate::witness_link::WitnessView;
use k8s_openapi::api::core::v1::Node;
use node_health::rooms::{UnpairedReason, ZONE_LABEL};
use node_health::{NodeFacts, Pair, RoomConfig, pair_nodes};

/// Labels that mark a control-plane node.
pub const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// Condition reasons.
pub mod reason {
    pub const RESOLVED: &str = "Resolved";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NOT_TWO_ZONES: &str = "NotTwoZones";
    pub const ALL_WORKERS_PAIRED: &str = "AllWorkersPaired";
    pub const SOME_WORKERS_UNPAIRED: &str = "SomeWorkersUnpaired";
    pub const NO_PAIRS: &str = "NoPairs";
    pub const ROOMS_UNRESOLVED: &str = "RoomsUnresolved";
    pub const REMEDIATION_ACTIVE: &str = "RemediationActive";
    pub const WITNESS_ANSWERED: &str = "WitnessAnswered";
    pub const WITNESS_UNREACHABLE: &str = "WitnessUnreachable";
}

/// Why remediation is paused (the core's).
pub use node_health::assess::Pause;

/// What the remediation loop last decided, for the status: every node's verdict and phase, and
/// whether remediation is paused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemediationView {
    pub nodes: Vec<NodeStatus>,
    pub pause: Option<Pause>,
    /// The witness; `None` when none is configured.
    pub witness: Option<WitnessView>,
    /// The nodes proven fenced and those judged Healthy, by the core's
    /// [`node_health::volume::switch::node_sets`], for the volume loop.
    pub fenced: std::collections::BTreeSet<String>,
    pub live: std::collections::BTreeSet<String>,
}

/// What the pairing needs to know of a Node.
pub fn node_facts(node: &Node) -> NodeFacts {
    let labels = node.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key));
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    NodeFacts {
        name: node.metadata.name.clone().unwrap_or_default(),
        zone: label(ZONE_LABEL).cloned(),
        control_plane: CONTROL_PLANE_LABELS.iter().any(|l| label(l).is_some()),
        ready,
    }
}

/// The room configuration the spec asks for, or a message saying why it is refused.
pub fn room_config(spec: &TwoSiteSpec) -> Result<RoomConfig, String> {
    match spec.rooms.as_deref() {
        None => Ok(RoomConfig::Auto),
        Some([a, b]) => RoomConfig::explicit(a, b).map_err(|e| format!("spec.rooms: {e}")),
        Some(other) => Err(format!(
            "spec.rooms must list exactly two zone values, got {}",
            other.len()
        )),
    }
}

/// Everything the desired status is computed from.
#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    pub spec: &'a TwoSiteSpec,
    pub generation: Option<i64>,
    pub previous: Option<&'a TwoSiteStatus>,
    /// Every Node, as facts.
    pub nodes: &'a [NodeFacts],
    /// The replica writing the status.
    pub leader: LeaderStatus,
    /// The wall-clock time, for conditions that change now (RFC 3339).
    pub now: &'a str,
    /// The remediation loop's latest view; `None` until it has run as leader.
    pub remediation: Option<&'a RemediationView>,
    /// The volume loop's latest view.
    pub volumes: &'a [crate::crd::VolumeStatus],
    /// The VM loop's latest view.
    pub vms: &'a [crate::crd::VmStatus],
}

impl<'a> StatusInput<'a> {
    /// The input for `obj`, with its spec, generation and status.
    pub fn for_object(
        obj: &'a TwoSite,
        nodes: &'a [NodeFacts],
        leader: LeaderStatus,
        now: &'a str,
    ) -> Self {
        StatusInput {
            spec: &obj.spec,
            generation: obj.metadata.generation,
            previous: obj.status.as_ref(),
            nodes,
            leader,
            now,
            remediation: None,
            volumes: &[],
            vms: &[],
        }
    }

    /// The same input, with the remediation loop's view.
    pub fn with_remediation(mut self, view: Option<&'a RemediationView>) -> Self {
        self.remediation = view;
        self
    }

    pub fn with_volumes(mut self, volumes: &'a [crate::crd::VolumeStatus]) -> Self {
        self.volumes = volumes;
        self
    }

    pub fn with_vms(mut self, vms: &'a [crate::crd::VmStatus]) -> Self {
        self.vms = vms;
        self
    }
}

/// The status the controller wants. An invalid spec keeps the previous rooms and pairs and
/// reports `RoomsResolved=False, reason InvalidSpec`: a typo never tears the pairs down.
pub fn desired_status(input: &StatusInput<'_>) -> TwoSiteStatus {
    let previous = input.previous;
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        next_condition(
            previous_conditions,
            type_,
            ok,
            reason,
            message,
            input.generation,
            input.now,
        )
    };

    let config =
        match room_config(input.spec).and_then(|c| c.check_against(input.nodes).map(|()| c)) {
            Ok(c) => c,
            Err(message) => {
                let kept = previous.cloned().unwrap_or_default();
                return TwoSiteStatus {
                observed_generation: input.generation,
                pair_count: count(kept.pairs.len()),
                unpaired_count: count(kept.unpaired.len()),
                rooms: kept.rooms,
                pairs: kept.pairs,
                unpaired: kept.unpaired,
                leader: Some(input.leader.clone()),
                nodes: remediation_nodes(input),
                witness: witness_status(input),
                volumes: input.volumes.to_vec(),
                vms: input.vms.to_vec(),
                conditions: [
                    condition(ROOMS_RESOLVED, false, reason::INVALID_SPEC, message),
                    condition(
                        PAIRED,
                        false,
                        reason::INVALID_SPEC,
                        "pairing is suspended until spec.rooms is fixed; the last pairs are kept"
                            .to_string(),
                    ),
                ]
                .into_iter()
                .chain(remediation_condition(input))
                .chain(witness_condition(input))
                .collect(),
            };
            }
        };
    let source = match config {
        RoomConfig::Auto => RoomSource::Automatic,
        RoomConfig::Explicit(..) => RoomSource::Configured,
    };
    let previous_pairs: Vec<Pair> = previous
        .map(|p| {
            p.pairs
                .iter()
                .map(|p| Pair {
                    a: p.a.clone(),
                    b: p.b.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let pairing = pair_nodes(&config, input.nodes, &previous_pairs);

    let pairs: Vec<PairStatus> = pairing
        .pairs
        .iter()
        .map(|p| PairStatus {
            a: p.a.clone(),
            b: p.b.clone(),
        })
        .collect();
    let unpaired: Vec<UnpairedStatus> = pairing
        .unpaired
        .iter()
        .map(|u| UnpairedStatus {
            node: u.node.clone(),
            reason: unpaired_reason_code(&u.reason).to_string(),
            message: u.reason.to_string(),
        })
        .collect();
    let workers_unpaired = pairing
        .unpaired
        .iter()
        .filter(|u| u.reason != UnpairedReason::ControlPlane)
        .count();

    let (rooms, rooms_condition, paired_condition) = match (&pairing.rooms, &pairing.error) {
        (Some((a, b)), _) => {
            let how = match source {
                RoomSource::Configured => "configured",
                RoomSource::Automatic => "from the workers' zones",
            };
            let rooms_cond = condition(
                ROOMS_RESOLVED,
                true,
                reason::RESOLVED,
                format!("room A is zone {a:?}, room B is zone {b:?} ({how})"),
            );
            let paired_cond = match (pairs.len(), workers_unpaired) {
                (0, _) => condition(
                    PAIRED,
                    false,
                    reason::NO_PAIRS,
                    format!("no pairs; {workers_unpaired} worker(s) unpaired"),
                ),
                (n, 0) => condition(
                    PAIRED,
                    true,
                    reason::ALL_WORKERS_PAIRED,
                    format!("{n} pair(s); every worker is paired"),
                ),
                (n, u) => condition(
                    PAIRED,
                    true,
                    reason::SOME_WORKERS_UNPAIRED,
                    format!("{n} pair(s); {u} worker(s) unpaired"),
                ),
            };
            (
                Some(RoomsStatus {
                    a: a.0.clone(),
                    b: b.0.clone(),
                    source,
                }),
                rooms_cond,
                paired_cond,
            )
        }
        (None, error) => {
            let message = error.as_ref().map_or_else(
                || "rooms are not determined".to_string(),
                ToString::to_string,
            );
            (
                None,
                condition(ROOMS_RESOLVED, false, reason::NOT_TWO_ZONES, message),
                condition(
                    PAIRED,
                    false,
                    reason::ROOMS_UNRESOLVED,
                    "no pairs until the two rooms are known".to_string(),
                ),
            )
        }
    };

    TwoSiteStatus {
        observed_generation: input.generation,
        rooms,
        pair_count: count(pairs.len()),
        unpaired_count: count(unpaired.len()),
        pairs,
        unpaired,
        leader: Some(input.leader.clone()),
        nodes: remediation_nodes(input),
        witness: witness_status(input),
        volumes: input.volumes.to_vec(),
        vms: input.vms.to_vec(),
        conditions: [rooms_condition, paired_condition]
            .into_iter()
            .chain(remediation_condition(input))
            .chain(witness_condition(input))
            .collect(),
    }
}

fn remediation_nodes(input: &StatusInput<'_>) -> Vec<NodeStatus> {
    input
        .remediation
        .map(|r| r.nodes.clone())
        .unwrap_or_default()
}

/// `RemediationPaused`, once the remediation loop has run.
fn remediation_condition(input: &StatusInput<'_>) -> Option<Condition> {
    let view = input.remediation?;
    let previous = input
        .previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or(&[]);
    let (paused, reason, message) = match &view.pause {
        Some(p) => (true, p.reason, p.message.clone()),
        None => (
            false,
            reason::REMEDIATION_ACTIVE,
            "dead nodes are fenced and tainted once proven stopped".to_string(),
        ),
    };
    Some(next_condition(
        previous,
        REMEDIATION_PAUSED,
        paused,
        reason,
        message,
        input.generation,
        input.now,
    ))
}

/// `status.witness`, once the remediation loop has run.
fn witness_status(input: &StatusInput<'_>) -> Option<WitnessStatus> {
    let view = input.remediation?;
    Some(match &view.witness {
        None => WitnessStatus::default(),
        Some(w) => WitnessStatus {
            configured: true,
            reachable: w.reachable == Some(true),
            last_contact: w.last_contact.clone(),
            grant: w.grant.as_ref().map(|(room, epoch)| WitnessGrantStatus {
                room: room.clone(),
                epoch: i64::try_from(*epoch).unwrap_or(i64::MAX),
            }),
        },
    })
}

/// `WitnessReachable`, with a witness configured, once it answered or failed to.
fn witness_condition(input: &StatusInput<'_>) -> Option<Condition> {
    let w: &WitnessView = input.remediation?.witness.as_ref()?;
    let reachable = w.reachable?;
    let previous = input
        .previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or(&[]);
    let (reason, message) = if reachable {
        (reason::WITNESS_ANSWERED, w.message.clone())
    } else {
        (
            reason::WITNESS_UNREACHABLE,
            format!(
                "{}; nothing stops, but dead nodes are not fenced without the witness's grant",
                w.message
            ),
        )
    };
    Some(next_condition(
        previous,
        WITNESS_REACHABLE,
        reachable,
        reason,
        message,
        input.generation,
        input.now,
    ))
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The machine-readable word for an unpaired reason.
pub fn unpaired_reason_code(reason: &UnpairedReason) -> &'static str {
    match reason {
        UnpairedReason::NoZoneLabel => "NoZoneLabel",
        UnpairedReason::OtherZone(_) => "OtherZone",
        UnpairedReason::ControlPlane => "ControlPlane",
        UnpairedReason::NoPartnerFree => "NoPartnerFree",
        UnpairedReason::RoomsUnknown => "RoomsUnknown",
    }
}

/// The next value of condition `type_`: its `lastTransitionTime` moves to `now` only when its
/// status changes (or it is new); reason and message follow the latest observation.
pub fn next_condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// Find condition `type_`.
pub fn condition<'a>(status: &'a TwoSiteStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// A user-visible transition worth a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// Event reasons.
pub mod event_reason {
    pub const PAIRING_CHANGED: &str = "PairingChanged";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ROOMS_UNRESOLVED: &str = "RoomsUnresolved";
    pub const ROOMS_RESOLVED: &str = "RoomsResolved";
    pub const WITNESS_UNREACHABLE: &str = "WitnessUnreachable";
}

/// The events that going from `old` to `new` deserves: a changed set of pairs, a spec that
/// became invalid (or invalid differently), rooms that became unknown or known again, a witness
/// that stopped answering.
pub fn transitions(old: Option<&TwoSiteStatus>, new: &TwoSiteStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    if let Some(c) = condition(new, WITNESS_REACHABLE).filter(|c| c.status == "False") {
        let was_false = old
            .and_then(|o| condition(o, WITNESS_REACHABLE))
            .is_some_and(|o| o.status == "False");
        if !was_false {
            out.push(Transition {
                warning: true,
                reason: event_reason::WITNESS_UNREACHABLE,
                note: c.message.clone(),
            });
        }
    }
    let old_rooms = old.and_then(|o| condition(o, ROOMS_RESOLVED));
    if let Some(c) = condition(new, ROOMS_RESOLVED) {
        let same = old_rooms.is_some_and(|o| {
            o.status == c.status && o.reason == c.reason && o.message == c.message
        });
        if !same {
            match (c.status.as_str(), c.reason.as_str()) {
                ("False", reason::INVALID_SPEC) => out.push(Transition {
                    warning: true,
                    reason: event_reason::INVALID_SPEC,
                    note: c.message.clone(),
                }),
                ("False", _) => out.push(Transition {
                    warning: true,
                    reason: event_reason::ROOMS_UNRESOLVED,
                    note: c.message.clone(),
                }),
                _ if old_rooms.is_some_and(|o| o.status != c.status) => out.push(Transition {
                    warning: false,
                    reason: event_reason::ROOMS_RESOLVED,
                    note: c.message.clone(),
                }),
                _ => {}
            }
        }
    }
    let old_pairs = old.map(|o| o.pairs.as_slice()).unwrap_or(&[]);
    if old_pairs != new.pairs.as_slice() {
        out.push(Transition {
            warning: false,
            reason: event_reason::PAIRING_CHANGED,
            note: pairing_note(old_pairs, &new.pairs),
        });
    }
    out
}

/// "paired a1/b1; unpaired a2/b2", bounded to the 1 kB an Event note may hold.
fn pairing_note(old: &[PairStatus], new: &[PairStatus]) -> String {
    let list = |ps: Vec<&PairStatus>| {
        ps.iter()
            .map(|p| format!("{}/{}", p.a, p.b))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let added: Vec<&PairStatus> = new.iter().filter(|p| !old.contains(p)).collect();
    let removed: Vec<&PairStatus> = old.iter().filter(|p| !new.contains(p)).collect();
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("paired {}", list(added)));
    }
    if !removed.is_empty() {
        parts.push(format!("unpaired {}", list(removed)));
    }
    parts.push(format!("{} pair(s) now", new.len()));
    let mut note = parts.join("; ");
    if note.len() > 1000 {
        let mut cut = 990;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str(" …");
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const T0: &str = "2026-11-01T10:00:00Z";
    const T1: &str = "2026-11-01T10:05:00Z";

    fn worker(name: &str, zone: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            zone: Some(zone.into()),
            control_plane: false,
            ready: true,
        }
    }

    fn pair(a: &str, b: &str) -> PairStatus {
        PairStatus {
            a: a.into(),
            b: b.into(),
        }
    }

    fn leader() -> LeaderStatus {
        LeaderStatus {
            identity: "ctl-0".into(),
            epoch: 3,
        }
    }

    fn spec(rooms: Option<&[&str]>) -> TwoSiteSpec {
        TwoSiteSpec {
            rooms: rooms.map(|r| r.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn build(
        spec: &TwoSiteSpec,
        previous: Option<&TwoSiteStatus>,
        nodes: &[NodeFacts],
        now: &str,
    ) -> TwoSiteStatus {
        desired_status(&StatusInput {
            spec,
            generation: Some(2),
            previous,
            nodes,
            leader: leader(),
            now,
            remediation: None,
            volumes: &[],
            vms: &[],
        })
    }

    fn cond<'a>(s: &'a TwoSiteStatus, t: &str) -> &'a Condition {
        condition(s, t).expect("condition present")
    }

    fn node(name: &str, labels: &[(&str, &str)], ready: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: None,
            status: ready.map(|r| NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: r.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        }
    }

    #[test]
    fn node_facts_from_labels_and_ready_condition() {
        let f = node_facts(&node("w1", &[(ZONE_LABEL, "east")], Some("True")));
        assert_eq!(f, worker("w1", "east"));
        let f = node_facts(&node(
            "cp",
            &[("node-role.kubernetes.io/control-plane", "")],
            Some("False"),
        ));
        assert!(f.control_plane && !f.ready && f.zone.is_none());
        let f = node_facts(&node("m", &[("node-role.kubernetes.io/master", "")], None));
        assert!(f.control_plane && !f.ready);
        let f = node_facts(&node("u", &[(ZONE_LABEL, "west")], Some("Unknown")));
        assert!(!f.ready && !f.control_plane);
    }

    #[test]
    fn room_config_validation() {
        assert_eq!(room_config(&spec(None)), Ok(RoomConfig::Auto));
        assert_eq!(
            room_config(&spec(Some(&["west", "east"]))),
            Ok(RoomConfig::Explicit("west".into(), "east".into()))
        );
        for bad in [
            &["east"][..],
            &["a", "b", "c"][..],
            &[][..],
            &["east", "east"][..],
            &["east", " "][..],
        ] {
            assert!(room_config(&spec(Some(bad))).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn automatic_rooms_pair_every_worker() {
        let nodes = [
            worker("b1", "west"),
            worker("a1", "east"),
            NodeFacts {
                control_plane: true,
                ..worker("cp", "east")
            },
        ];
        let s = build(&spec(None), None, &nodes, T0);
        assert_eq!(s.pairs, vec![pair("a1", "b1")]);
        assert_eq!((s.pair_count, s.unpaired_count), (1, 1));
        assert_eq!(
            s.unpaired,
            vec![UnpairedStatus {
                node: "cp".into(),
                reason: "ControlPlane".into(),
                message: "control-plane node".into(),
            }]
        );
        assert_eq!(
            s.rooms,
            Some(RoomsStatus {
                a: "east".into(),
                b: "west".into(),
                source: RoomSource::Automatic,
            })
        );
        assert_eq!(s.leader, Some(leader()));
        assert_eq!(s.observed_generation, Some(2));
        let rooms = cond(&s, ROOMS_RESOLVED);
        assert_eq!(
            (rooms.status.as_str(), rooms.reason.as_str()),
            ("True", reason::RESOLVED)
        );
        assert_eq!(rooms.last_transition_time, T0);
        let paired = cond(&s, PAIRED);
        assert_eq!(
            (paired.status.as_str(), paired.reason.as_str()),
            ("True", reason::ALL_WORKERS_PAIRED),
            "control-plane nodes do not count as unpaired workers"
        );
    }

    #[test]
    fn previous_pairs_are_kept() {
        let nodes = [
            worker("a1", "east"),
            worker("b1", "west"),
            worker("b2", "west"),
        ];
        let previous = TwoSiteStatus {
            pairs: vec![pair("a1", "b2")],
            ..TwoSiteStatus::default()
        };
        let s = build(&spec(None), Some(&previous), &nodes, T0);
        assert_eq!(s.pairs, vec![pair("a1", "b2")]);
        assert_eq!(s.unpaired[0].node, "b1");
        assert_eq!(s.unpaired[0].reason, "NoPartnerFree");
        let paired = cond(&s, PAIRED);
        assert_eq!(paired.reason, reason::SOME_WORKERS_UNPAIRED);
    }

    #[test]
    fn same_inputs_give_the_same_status_so_nothing_is_written() {
        let nodes = [worker("a1", "east"), worker("b1", "west")];
        let first = build(&spec(None), None, &nodes, T0);
        let again = build(&spec(None), Some(&first), &nodes, T1);
        assert_eq!(again, first, "a later clock alone changes nothing");
    }

    #[test]
    fn last_transition_time_moves_only_when_the_status_changes() {
        let one = [worker("a1", "east"), worker("b1", "west")];
        let first = build(&spec(None), None, &one, T0);
        // A new surplus worker changes the Paired message and reason, not its status.
        let two = [
            worker("a1", "east"),
            worker("a2", "east"),
            worker("b1", "west"),
        ];
        let second = build(&spec(None), Some(&first), &two, T1);
        let p = cond(&second, PAIRED);
        assert_eq!(p.reason, reason::SOME_WORKERS_UNPAIRED);
        assert_eq!(p.last_transition_time, T0);
        assert_eq!(cond(&second, ROOMS_RESOLVED).last_transition_time, T0);
        // Losing room B's only worker flips Paired to False: now it moves.
        let lonely = [worker("a1", "east"), worker("a2", "east")];
        let third = build(&spec(Some(&["east", "west"])), Some(&second), &lonely, T1);
        let p = cond(&third, PAIRED);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("False", reason::NO_PAIRS)
        );
        assert_eq!(p.last_transition_time, T1);
        assert_eq!(
            cond(&third, ROOMS_RESOLVED).last_transition_time,
            T0,
            "still resolved"
        );
    }

    #[test]
    fn invalid_spec_keeps_the_last_pairs_and_says_why() {
        let nodes = [worker("a1", "east"), worker("b1", "west")];
        let good = build(&spec(None), None, &nodes, T0);
        let bad = build(&spec(Some(&["east", "east"])), Some(&good), &nodes, T1);
        assert_eq!(bad.pairs, good.pairs, "no new pairs are written");
        assert_eq!(bad.rooms, good.rooms);
        let rooms = cond(&bad, ROOMS_RESOLVED);
        assert_eq!(
            (rooms.status.as_str(), rooms.reason.as_str()),
            ("False", reason::INVALID_SPEC)
        );
        assert!(rooms.message.contains("east"), "{}", rooms.message);
        assert_eq!(rooms.last_transition_time, T1);
        assert_eq!(cond(&bad, PAIRED).reason, reason::INVALID_SPEC);

        let fresh = build(&spec(Some(&["east"])), None, &nodes, T0);
        assert!(fresh.pairs.is_empty() && fresh.rooms.is_none());
        assert!(cond(&fresh, ROOMS_RESOLVED).message.contains("exactly two"));
    }

    #[test]
    fn a_configured_room_nobody_carries_beside_a_stray_zone_is_a_typo() {
        let nodes = [worker("a1", "east"), worker("b1", "west")];
        let good = build(&spec(Some(&["east", "west"])), None, &nodes, T0);
        assert_eq!(good.pairs, vec![pair("a1", "b1")]);
        let typo = build(&spec(Some(&["east", "wset"])), Some(&good), &nodes, T1);
        assert_eq!(typo.pairs, good.pairs, "the pairs are kept");
        let rooms = cond(&typo, ROOMS_RESOLVED);
        assert_eq!(
            (rooms.status.as_str(), rooms.reason.as_str()),
            ("False", reason::INVALID_SPEC)
        );
        assert!(
            rooms.message.contains("\"wset\"") && rooms.message.contains("\"west\""),
            "{}",
            rooms.message
        );
        // A room still being built (nobody in it, nobody elsewhere) is fine.
        let building = build(&spec(Some(&["east", "west"])), None, &nodes[..1], T0);
        assert_eq!(cond(&building, ROOMS_RESOLVED).status, "True");
        // A control-plane node in a third zone is no evidence of a typo.
        let cp = NodeFacts {
            control_plane: true,
            ..worker("cp1", "north")
        };
        let with_cp = build(
            &spec(Some(&["east", "west"])),
            None,
            &[worker("a1", "east"), cp],
            T0,
        );
        assert_eq!(cond(&with_cp, ROOMS_RESOLVED).status, "True");
    }

    #[test]
    fn three_zones_resolve_no_rooms() {
        let nodes = [
            worker("a1", "east"),
            worker("b1", "west"),
            worker("c1", "north"),
        ];
        let s = build(&spec(None), None, &nodes, T0);
        assert!(s.pairs.is_empty() && s.rooms.is_none());
        assert_eq!(s.unpaired_count, 3);
        assert!(s.unpaired.iter().all(|u| u.reason == "RoomsUnknown"));
        assert_eq!(cond(&s, ROOMS_RESOLVED).reason, reason::NOT_TWO_ZONES);
        assert_eq!(cond(&s, PAIRED).reason, reason::ROOMS_UNRESOLVED);
    }

    #[test]
    fn explicit_rooms_are_reported_as_configured() {
        let nodes = [worker("a1", "east"), worker("b1", "west")];
        let s = build(&spec(Some(&["west", "east"])), None, &nodes, T0);
        assert_eq!(s.pairs, vec![pair("b1", "a1")]);
        assert_eq!(
            s.rooms.map(|r| (r.a, r.source)),
            Some(("west".to_string(), RoomSource::Configured))
        );
    }

    #[test]
    fn transitions_worth_an_event() {
        let nodes = [worker("a1", "east"), worker("b1", "west")];
        let first = build(&spec(None), None, &nodes, T0);
        let reasons = |old: Option<&TwoSiteStatus>, new: &TwoSiteStatus| {
            transitions(old, new)
                .into_iter()
                .map(|t| (t.reason, t.warning))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(None, &first),
            vec![(event_reason::PAIRING_CHANGED, false)]
        );
        let note = &transitions(None, &first)[0].note;
        assert_eq!(note, "paired a1/b1; 1 pair(s) now");
        assert_eq!(reasons(Some(&first), &first), vec![], "no change, no event");

        let bad = build(&spec(Some(&["x", "x"])), Some(&first), &nodes, T1);
        assert_eq!(
            reasons(Some(&first), &bad),
            vec![(event_reason::INVALID_SPEC, true)]
        );
        assert_eq!(reasons(Some(&bad), &bad), vec![], "reported once");

        let fixed = build(&spec(None), Some(&bad), &nodes, T1);
        assert_eq!(
            reasons(Some(&bad), &fixed),
            vec![(event_reason::ROOMS_RESOLVED, false)]
        );

        let three = [
            worker("a1", "east"),
            worker("b1", "west"),
            worker("c1", "north"),
        ];
        let unresolved = build(&spec(None), Some(&fixed), &three, T1);
        assert_eq!(
            reasons(Some(&fixed), &unresolved),
            vec![
                (event_reason::ROOMS_UNRESOLVED, true),
                (event_reason::PAIRING_CHANGED, false)
            ]
        );
    }

    #[test]
    fn pairing_note_is_bounded() {
        let many: Vec<PairStatus> = (0..200)
            .map(|i| pair(&format!("room-a-node-{i}"), &format!("room-b-node-{i}")))
            .collect();
        let note = pairing_note(&[], &many);
        assert!(note.len() <= 1000, "{}", note.len());
    }
}
