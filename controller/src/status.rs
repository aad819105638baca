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
#[path = "status_tests.rs"]
mod tests;
