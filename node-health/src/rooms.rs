//! Rooms and pairs: which zone value is which room, and which worker stands in for which.
//!
//! Pure: the controller feeds it the Nodes it watches, the simulation feeds it its model.
//! Pairs are stable: a pair lives as long as both of its nodes exist and stay eligible, so a
//! node's partner never changes under an operator's feet because a third node joined.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// The well-known label that says which room (zone) a node stands in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// One of the two rooms, named by its zone label value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Room(pub String);

impl std::fmt::Display for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the two rooms are chosen.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RoomConfig {
    /// The workers carry exactly two zone values; those are the rooms.
    #[default]
    Auto,
    /// These two zone values are the rooms; workers in any other zone are reported.
    Explicit(String, String),
}

impl RoomConfig {
    /// Builds an explicit configuration, refusing the mistakes an operator can make.
    pub fn explicit(a: &str, b: &str) -> Result<Self, RoomError> {
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() || b.is_empty() {
            return Err(RoomError::EmptyZone);
        }
        if a == b {
            return Err(RoomError::SameZoneTwice(a.to_string()));
        }
        Ok(RoomConfig::Explicit(a.to_string(), b.to_string()))
    }

    /// The configured rooms held against the nodes: a configured room that no worker carries
    /// while some worker carries a zone outside both rooms looks like a typo (`room-bb` for
    /// `room-b`) and is refused, with a message for the status, so the pairs are not torn down.
    /// A room no worker carries while every worker stands in one of the two rooms is a room
    /// still being built: accepted.
    pub fn check_against(&self, nodes: &[NodeFacts]) -> Result<(), String> {
        let RoomConfig::Explicit(a, b) = self else {
            return Ok(());
        };
        let workers = || nodes.iter().filter(|n| !n.control_plane);
        let carried = |room: &str| workers().any(|n| n.zone.as_deref() == Some(room));
        let Some(stray) = workers()
            .filter_map(|n| n.zone.as_deref())
            .find(|z| z != a && z != b)
        else {
            return Ok(());
        };
        match [a, b].into_iter().find(|room| !carried(room)) {
            Some(empty) => Err(format!(
                "spec.rooms: no worker carries zone {empty:?}, while workers carry zone \
                 {stray:?}, which is in neither room (a typo?)"
            )),
            None => Ok(()),
        }
    }
}

/// What the pairing needs to know of one Node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub name: String,
    /// The value of `topology.kubernetes.io/zone`, if any.
    pub zone: Option<String>,
    /// Carries a control-plane (or master) role label: never paired, never remediated.
    pub control_plane: bool,
    /// The Ready condition is True.
    pub ready: bool,
}

/// A worker and its partner in the other room. `a` stands in room A, `b` in room B.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
}

/// Why a node is left out of every pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UnpairedReason {
    /// No `topology.kubernetes.io/zone` label.
    NoZoneLabel,
    /// A zone that is neither room.
    OtherZone(String),
    /// A control-plane node.
    ControlPlane,
    /// Its room has more workers than the other; no partner is free.
    NoPartnerFree,
    /// The rooms could not be determined, so nobody is paired.
    RoomsUnknown,
}

impl std::fmt::Display for UnpairedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnpairedReason::NoZoneLabel => write!(f, "no {ZONE_LABEL} label"),
            UnpairedReason::OtherZone(z) => write!(f, "zone {z:?} is neither room"),
            UnpairedReason::ControlPlane => f.write_str("control-plane node"),
            UnpairedReason::NoPartnerFree => f.write_str("no free partner in the other room"),
            UnpairedReason::RoomsUnknown => f.write_str("rooms are not determined"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Unpaired {
    pub node: String,
    pub reason: UnpairedReason,
}

/// Why the rooms could not be determined, or the configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum RoomError {
    #[error("room zone values must not be empty")]
    EmptyZone,
    #[error("the two rooms must be different zones, got {0:?} twice")]
    SameZoneTwice(String),
    #[error("workers carry {} zone value(s) ({}); exactly two are needed, or configure the rooms", .0.len(), .0.join(", "))]
    NotTwoZones(Vec<String>),
}

/// The result of pairing: the rooms, the pairs, and every node left out with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pairing {
    /// Room A and room B (A is the first zone value in the configuration, or in sort order).
    pub rooms: Option<(Room, Room)>,
    pub pairs: Vec<Pair>,
    pub unpaired: Vec<Unpaired>,
    /// Set when the rooms could not be determined.
    pub error: Option<RoomError>,
}

impl Pairing {
    /// The partner of `node`, if it is paired.
    pub fn partner_of(&self, node: &str) -> Option<&str> {
        self.pairs.iter().find_map(|p| {
            if p.a == node {
                Some(p.b.as_str())
            } else if p.b == node {
                Some(p.a.as_str())
            } else {
                None
            }
        })
    }

    /// The room `zone` is, if it is one of the two.
    pub fn room_of_zone(&self, zone: &str) -> Option<&Room> {
        let (a, b) = self.rooms.as_ref()?;
        [a, b].into_iter().find(|r| r.0 == zone)
    }
}

/// Pairs the workers of two rooms, keeping every pair of `previous` whose nodes both still exist
/// and are still eligible workers of their rooms. New pairs join unpaired workers of room A and
/// room B, Ready nodes first, then by name, so the result is deterministic.
pub fn pair_nodes(config: &RoomConfig, nodes: &[NodeFacts], previous: &[Pair]) -> Pairing {
    let mut unpaired = Vec::new();
    // Workers with a zone label, by zone.
    let mut by_zone: BTreeMap<&str, Vec<&NodeFacts>> = BTreeMap::new();
    for n in nodes {
        if n.control_plane {
            unpaired.push(Unpaired {
                node: n.name.clone(),
                reason: UnpairedReason::ControlPlane,
            });
            continue;
        }
        match n.zone.as_deref().map(str::trim) {
            None | Some("") => unpaired.push(Unpaired {
                node: n.name.clone(),
                reason: UnpairedReason::NoZoneLabel,
            }),
            Some(z) => by_zone.entry(z).or_default().push(n),
        }
    }

    let rooms = match config {
        RoomConfig::Explicit(a, b) => Ok((Room(a.clone()), Room(b.clone()))),
        RoomConfig::Auto => {
            let zones: Vec<&str> = by_zone.keys().copied().collect();
            match zones.as_slice() {
                [a, b] => Ok((Room((*a).to_string()), Room((*b).to_string()))),
                _ => Err(RoomError::NotTwoZones(
                    zones.iter().map(|z| (*z).to_string()).collect(),
                )),
            }
        }
    };
    let (room_a, room_b) = match rooms {
        Ok(r) => r,
        Err(e) => {
            for ns in by_zone.values() {
                for n in ns {
                    unpaired.push(Unpaired {
                        node: n.name.clone(),
                        reason: UnpairedReason::RoomsUnknown,
                    });
                }
            }
            unpaired.sort();
            return Pairing {
                rooms: None,
                pairs: Vec::new(),
                unpaired,
                error: Some(e),
            };
        }
    };

    let mut in_a: Vec<&NodeFacts> = by_zone.remove(room_a.0.as_str()).unwrap_or_default();
    let mut in_b: Vec<&NodeFacts> = by_zone.remove(room_b.0.as_str()).unwrap_or_default();
    for (zone, ns) in by_zone {
        for n in ns {
            unpaired.push(Unpaired {
                node: n.name.clone(),
                reason: UnpairedReason::OtherZone(zone.to_string()),
            });
        }
    }

    let names_a: BTreeSet<&str> = in_a.iter().map(|n| n.name.as_str()).collect();
    let names_b: BTreeSet<&str> = in_b.iter().map(|n| n.name.as_str()).collect();
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    let mut pairs = Vec::new();
    for p in previous {
        // A previous pair survives only as it was: `a` still in room A, `b` still in room B,
        // and neither already claimed (a corrupt previous list must not pair a node twice).
        if names_a.contains(p.a.as_str())
            && names_b.contains(p.b.as_str())
            && !taken.contains(p.a.as_str())
            && !taken.contains(p.b.as_str())
        {
            taken.insert(p.a.as_str());
            taken.insert(p.b.as_str());
            pairs.push(p.clone());
        }
    }

    let order = |x: &&NodeFacts, y: &&NodeFacts| y.ready.cmp(&x.ready).then(x.name.cmp(&y.name));
    in_a.retain(|n| !taken.contains(n.name.as_str()));
    in_b.retain(|n| !taken.contains(n.name.as_str()));
    in_a.sort_by(order);
    in_b.sort_by(order);
    let free = in_a.len().min(in_b.len());
    for (a, b) in in_a.iter().zip(in_b.iter()) {
        pairs.push(Pair {
            a: a.name.clone(),
            b: b.name.clone(),
        });
    }
    for n in in_a.iter().skip(free).chain(in_b.iter().skip(free)) {
        unpaired.push(Unpaired {
            node: n.name.clone(),
            reason: UnpairedReason::NoPartnerFree,
        });
    }

    pairs.sort();
    unpaired.sort();
    Pairing {
        rooms: Some((room_a, room_b)),
        pairs,
        unpaired,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, zone: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            zone: Some(zone.into()),
            control_plane: false,
            ready: true,
        }
    }

    fn pair(a: &str, b: &str) -> Pair {
        Pair {
            a: a.into(),
            b: b.into(),
        }
    }

    fn reasons(p: &Pairing) -> Vec<(&str, UnpairedReason)> {
        p.unpaired
            .iter()
            .map(|u| (u.node.as_str(), u.reason.clone()))
            .collect()
    }

    #[test]
    fn pairing_table() {
        struct Case {
            name: &'static str,
            config: RoomConfig,
            nodes: Vec<NodeFacts>,
            previous: Vec<Pair>,
            pairs: Vec<Pair>,
            unpaired: Vec<(&'static str, UnpairedReason)>,
            error: Option<RoomError>,
        }
        let mut not_ready = worker("a1", "east");
        not_ready.ready = false;
        let mut cp = worker("cp", "east");
        cp.control_plane = true;
        let mut no_zone = worker("nz", "");
        no_zone.zone = None;
        let cases = vec![
            Case {
                name: "smallest cluster: one worker per room",
                config: RoomConfig::Auto,
                nodes: vec![worker("w1", "east"), worker("w2", "west")],
                previous: vec![],
                pairs: vec![pair("w1", "w2")],
                unpaired: vec![],
                error: None,
            },
            Case {
                name: "auto rooms in sort order, pairs by name",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("b2", "west"),
                    worker("a2", "east"),
                    worker("b1", "west"),
                    worker("a1", "east"),
                ],
                previous: vec![],
                pairs: vec![pair("a1", "b1"), pair("a2", "b2")],
                unpaired: vec![],
                error: None,
            },
            Case {
                name: "previous pairs survive a new node",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a0", "east"),
                    worker("a1", "east"),
                    worker("b1", "west"),
                ],
                previous: vec![pair("a1", "b1")],
                pairs: vec![pair("a1", "b1")],
                unpaired: vec![("a0", UnpairedReason::NoPartnerFree)],
                error: None,
            },
            Case {
                name: "a new node pairs with the unpaired node of the other room",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a0", "east"),
                    worker("a1", "east"),
                    worker("b1", "west"),
                    worker("b9", "west"),
                ],
                previous: vec![pair("a1", "b1")],
                pairs: vec![pair("a0", "b9"), pair("a1", "b1")],
                unpaired: vec![],
                error: None,
            },
            Case {
                name: "a pair whose node is gone breaks; the survivor repairs",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a1", "east"),
                    worker("a2", "east"),
                    worker("b2", "west"),
                    worker("b3", "west"),
                ],
                previous: vec![pair("a1", "b1"), pair("a2", "b2")],
                pairs: vec![pair("a1", "b3"), pair("a2", "b2")],
                unpaired: vec![],
                error: None,
            },
            Case {
                name: "surplus in the bigger room is reported",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a1", "east"),
                    worker("a2", "east"),
                    worker("a3", "east"),
                    worker("b1", "west"),
                ],
                previous: vec![],
                pairs: vec![pair("a1", "b1")],
                unpaired: vec![
                    ("a2", UnpairedReason::NoPartnerFree),
                    ("a3", UnpairedReason::NoPartnerFree),
                ],
                error: None,
            },
            Case {
                name: "ready nodes are paired first",
                config: RoomConfig::Auto,
                nodes: vec![
                    not_ready.clone(),
                    worker("a2", "east"),
                    worker("b1", "west"),
                ],
                previous: vec![],
                pairs: vec![pair("a2", "b1")],
                unpaired: vec![("a1", UnpairedReason::NoPartnerFree)],
                error: None,
            },
            Case {
                name: "no zone label, control plane and a third zone are reported",
                config: RoomConfig::explicit("east", "west").expect("valid"),
                nodes: vec![
                    worker("a1", "east"),
                    worker("b1", "west"),
                    no_zone.clone(),
                    cp.clone(),
                    worker("x1", "north"),
                    worker("x2", " "),
                ],
                previous: vec![],
                pairs: vec![pair("a1", "b1")],
                unpaired: vec![
                    ("cp", UnpairedReason::ControlPlane),
                    ("nz", UnpairedReason::NoZoneLabel),
                    ("x1", UnpairedReason::OtherZone("north".into())),
                    ("x2", UnpairedReason::NoZoneLabel),
                ],
                error: None,
            },
            Case {
                name: "explicit config orders the rooms",
                config: RoomConfig::explicit("west", "east").expect("valid"),
                nodes: vec![worker("a1", "east"), worker("b1", "west")],
                previous: vec![],
                pairs: vec![pair("b1", "a1")],
                unpaired: vec![],
                error: None,
            },
            Case {
                name: "auto with three zones pairs nobody",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a1", "east"),
                    worker("b1", "west"),
                    worker("c1", "north"),
                ],
                previous: vec![],
                pairs: vec![],
                unpaired: vec![
                    ("a1", UnpairedReason::RoomsUnknown),
                    ("b1", UnpairedReason::RoomsUnknown),
                    ("c1", UnpairedReason::RoomsUnknown),
                ],
                error: Some(RoomError::NotTwoZones(vec![
                    "east".into(),
                    "north".into(),
                    "west".into(),
                ])),
            },
            Case {
                name: "auto with one zone pairs nobody",
                config: RoomConfig::Auto,
                nodes: vec![worker("a1", "east"), worker("a2", "east")],
                previous: vec![],
                pairs: vec![],
                unpaired: vec![
                    ("a1", UnpairedReason::RoomsUnknown),
                    ("a2", UnpairedReason::RoomsUnknown),
                ],
                error: Some(RoomError::NotTwoZones(vec!["east".into()])),
            },
            Case {
                name: "a node that moved room loses its pair",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a1", "east"),
                    worker("b1", "east"),
                    worker("b2", "west"),
                ],
                previous: vec![pair("a1", "b1")],
                pairs: vec![pair("a1", "b2")],
                unpaired: vec![("b1", UnpairedReason::NoPartnerFree)],
                error: None,
            },
            Case {
                name: "a corrupt previous list never pairs a node twice",
                config: RoomConfig::Auto,
                nodes: vec![
                    worker("a1", "east"),
                    worker("b1", "west"),
                    worker("b2", "west"),
                ],
                previous: vec![pair("a1", "b1"), pair("a1", "b2")],
                pairs: vec![pair("a1", "b1")],
                unpaired: vec![("b2", UnpairedReason::NoPartnerFree)],
                error: None,
            },
            Case {
                name: "no nodes at all",
                config: RoomConfig::Auto,
                nodes: vec![],
                previous: vec![],
                pairs: vec![],
                unpaired: vec![],
                error: Some(RoomError::NotTwoZones(vec![])),
            },
        ];
        for c in cases {
            let got = pair_nodes(&c.config, &c.nodes, &c.previous);
            assert_eq!(got.pairs, c.pairs, "{}: pairs", c.name);
            assert_eq!(reasons(&got), c.unpaired, "{}: unpaired", c.name);
            assert_eq!(got.error, c.error, "{}: error", c.name);
        }
    }

    #[test]
    fn explicit_config_refuses_mistakes() {
        assert_eq!(RoomConfig::explicit("a", " "), Err(RoomError::EmptyZone));
        assert_eq!(
            RoomConfig::explicit("a", "a"),
            Err(RoomError::SameZoneTwice("a".into()))
        );
    }

    #[test]
    fn partner_lookup() {
        let p = pair_nodes(
            &RoomConfig::Auto,
            &[worker("w1", "east"), worker("w2", "west")],
            &[],
        );
        assert_eq!(p.partner_of("w1"), Some("w2"));
        assert_eq!(p.partner_of("w2"), Some("w1"));
        assert_eq!(p.partner_of("w3"), None);
        assert_eq!(p.room_of_zone("west"), Some(&Room("west".into())));
    }

    proptest::proptest! {
        /// Whatever the nodes and the previous pairs, every node appears at most once, every
        /// pair spans the two rooms, and pairing the result again changes nothing.
        #[test]
        fn pairs_are_valid_and_stable(
            nodes in proptest::collection::vec((0u8..12, 0u8..4, proptest::bool::ANY), 0..16),
            prev in proptest::collection::vec((0u8..12, 0u8..12), 0..6),
        ) {
            let zones = ["east", "west", "north", ""];
            let mut seen = BTreeSet::new();
            let facts: Vec<NodeFacts> = nodes
                .iter()
                .filter(|(n, _, _)| seen.insert(*n))
                .map(|(n, z, r)| NodeFacts {
                    name: format!("n{n}"),
                    zone: Some(zones[*z as usize].to_string()),
                    control_plane: false,
                    ready: *r,
                })
                .collect();
            let previous: Vec<Pair> = prev
                .iter()
                .map(|(a, b)| pair(&format!("n{a}"), &format!("n{b}")))
                .collect();
            let config = RoomConfig::Explicit("east".into(), "west".into());
            let got = pair_nodes(&config, &facts, &previous);
            let mut used = BTreeSet::new();
            for p in &got.pairs {
                proptest::prop_assert!(used.insert(p.a.clone()));
                proptest::prop_assert!(used.insert(p.b.clone()));
                let za = facts.iter().find(|f| f.name == p.a).and_then(|f| f.zone.clone());
                let zb = facts.iter().find(|f| f.name == p.b).and_then(|f| f.zone.clone());
                proptest::prop_assert_eq!(za.as_deref(), Some("east"));
                proptest::prop_assert_eq!(zb.as_deref(), Some("west"));
            }
            for u in &got.unpaired {
                proptest::prop_assert!(!used.contains(&u.node));
            }
            proptest::prop_assert_eq!(got.pairs.len() * 2 + got.unpaired.len(), facts.len());
            let again = pair_nodes(&config, &facts, &got.pairs);
            proptest::prop_assert_eq!(again, got);
        }
    }
}
