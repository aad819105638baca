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
