//! Unit tests of the controller's volume decisions ([`VolumeSwitch`] and its planners).

use super::*;
use std::time::Duration;

fn lease(holder: Option<&str>, epoch: u64, rv: &str) -> VolumeLease {
    VolumeLease {
        held_for_node: None,
        holder: holder.map(str::to_string),
        epoch,
        resource_version: rv.into(),
        preferred_holder: None,
        released: false,
        handover: None,
        duration: Duration::from_secs(10),
    }
}

fn consumers() -> Vec<Consumer> {
    vec![
        Consumer {
            identity: "uid-a".into(),
            node: "a-2".into(),
            role_active: false,
        },
        Consumer {
            identity: "uid-b".into(),
            node: "b-2".into(),
            role_active: false,
        },
    ]
}

fn set(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

fn step(
    s: &mut VolumeSwitch,
    l: &VolumeLease,
    c: &[Consumer],
    fenced: &[&str],
    live: &[&str],
    request: Option<&SwitchTarget>,
    now: u64,
) -> Vec<VolumeAction> {
    let (fenced, live) = (set(fenced), set(live));
    let f = VolumeFacts {
        lease: l,
        consumers: c,
        fenced_nodes: &fenced,
        live_nodes: &live,
        request,
    };
    s.step(&f, MonoTime(now), &VolumeTiming::default())
}

fn lease_writes(a: &[VolumeAction]) -> Vec<&VolumeAction> {
    a.iter()
        .filter(|a| !matches!(a, VolumeAction::SetRole { .. } | VolumeAction::Event { .. }))
        .collect()
}

#[test]
fn the_role_label_follows_the_holder_with_its_epoch_and_comes_off_first() {
    let mut s = VolumeSwitch::new();
    let mut c = consumers();
    let a = step(
        &mut s,
        &lease(Some("uid-a"), 1, "5"),
        &c,
        &[],
        &["a-2", "b-2"],
        None,
        0,
    );
    assert_eq!(
        a,
        vec![VolumeAction::SetRole {
            identity: "uid-a".into(),
            active: true
        }]
    );
    c[0].role_active = true;
    // uid-b takes over: the label comes off uid-a before it goes on uid-b.
    let a = step(
        &mut s,
        &lease(Some("uid-b"), 2, "9"),
        &c,
        &[],
        &["a-2", "b-2"],
        None,
        10,
    );
    assert_eq!(
        &a[..2],
        &[
            VolumeAction::SetRole {
                identity: "uid-a".into(),
                active: false
            },
            VolumeAction::SetRole {
                identity: "uid-b".into(),
                active: true
            }
        ]
    );
    assert!(a.iter().any(|x| matches!(
        x,
        VolumeAction::Event {
            reason: VolumeEventReason::VolumeFailover,
            ..
        }
    )));
    // During a handover nobody is active; a released lease has no active consumer either.
    let mut h = lease(Some("uid-b"), 2, "10");
    h.handover = Some(Handover {
        to: "uid-a".into(),
        epoch: 3,
    });
    assert_eq!(active_consumer(&h, &c), None);
    let released = VolumeLease {
        held_for_node: None,
        released: true,
        ..lease(Some("uid-a"), 1, "11")
    };
    assert_eq!(active_consumer(&released, &c), None);
    // A consumer named with another epoch is not the writer.
    assert_eq!(
        active_consumer(&lease(Some("uid-a"), 1, "1"), &c).map(|c| c.identity.as_str()),
        Some("uid-a")
    );
}

#[test]
fn no_handover_before_the_holders_node_is_proven_fenced() {
    let c = consumers();
    let l = lease(Some("uid-a"), 4, "20");
    let live = set(&["b-2"]);
    assert_eq!(
        plan_handover(&l, &c, &set(&[]), &live, None, None),
        Err(SwitchRefusal::HolderNotFenced { node: "a-2".into() })
    );
    // Dead but only committing its fence: not proven.
    assert!(!proven_fenced(&Phase::Committing));
    assert!(!proven_fenced(&Phase::FenceWaiting(
        crate::remediation::WaitReason::Deadline
    )));
    assert!(proven_fenced(&Phase::Fenced) && proven_fenced(&Phase::Tainted));
    let mut s = VolumeSwitch::new();
    let a = step(&mut s, &l, &c, &[], &["b-2"], None, 0);
    assert!(lease_writes(&a).is_empty(), "{a:?}");
    // Proven fenced: handed over to the standby with an epoch above the Lease's.
    let a = step(&mut s, &l, &c, &["a-2"], &["b-2"], None, 100);
    assert_eq!(
        lease_writes(&a),
        vec![&VolumeAction::HandOver {
            expected_rv: "20".into(),
            handover: Handover {
                to: "uid-b".into(),
                epoch: 5
            }
        }]
    );
    // A holder that is no known consumer cannot be proven fenced.
    let stranger = lease(Some("uid-gone"), 4, "21");
    assert!(matches!(
        plan_handover(&stranger, &c, &set(&["a-2"]), &live, None, None),
        Err(SwitchRefusal::HolderUnknown { .. })
    ));
    // A released lease needs no handover.
    let released = VolumeLease {
        held_for_node: None,
        released: true,
        ..l.clone()
    };
    assert_eq!(
        plan_handover(&released, &c, &set(&["a-2"]), &live, None, None),
        Err(SwitchRefusal::NoHolder)
    );
}

#[test]
fn no_handover_to_a_non_consumer_a_dead_node_or_on_a_stale_view() {
    let c = consumers();
    let l = lease(Some("uid-a"), 4, "20");
    let fenced = set(&["a-2"]);
    let live = set(&["b-2"]);
    assert_eq!(
        plan_handover(&l, &c, &fenced, &live, Some("uid-x"), None),
        Err(SwitchRefusal::NotAConsumer {
            identity: "uid-x".into()
        })
    );
    assert!(matches!(
        plan_handover(&l, &c, &fenced, &set(&[]), None, None),
        Err(SwitchRefusal::NoStandby)
    ));
    assert!(matches!(
        plan_handover(&l, &c, &fenced, &set(&[]), Some("uid-b"), None),
        Err(SwitchRefusal::TargetNotLive { .. })
    ));
    assert_eq!(
        plan_handover(&l, &c, &fenced, &live, None, Some(7)),
        Err(SwitchRefusal::StaleEpoch { seen: 4, known: 7 })
    );
    // A pending handover to a viable consumer is not replaced; one to a consumer gone is,
    // with an epoch above it.
    let mut h = l.clone();
    h.handover = Some(Handover {
        to: "uid-b".into(),
        epoch: 5,
    });
    assert_eq!(
        plan_handover(&h, &c, &fenced, &live, None, None),
        Err(SwitchRefusal::HandoverPending)
    );
    h.handover = Some(Handover {
        to: "uid-old".into(),
        epoch: 5,
    });
    assert_eq!(
        plan_handover(&h, &c, &fenced, &live, None, None).map(|(_, h)| h.epoch),
        Ok(6)
    );
    // The state machine refuses a view older than one it has seen, and does nothing on it.
    let mut s = VolumeSwitch::new();
    step(
        &mut s,
        &lease(Some("uid-a"), 7, "30"),
        &c,
        &[],
        &["a-2", "b-2"],
        None,
        0,
    );
    let a = step(&mut s, &l, &c, &["a-2"], &["b-2"], None, 100);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(
        s.last_refusal(),
        Some(&SwitchRefusal::StaleEpoch { seen: 4, known: 7 })
    );
}

#[test]
fn a_planned_switchover_sets_then_clears_the_preferred_holder() {
    let mut c = consumers();
    c[0].role_active = true;
    let mut s = VolumeSwitch::new();
    let live = ["a-2", "b-2"];
    let l = lease(Some("uid-a"), 1, "40");
    let req = SwitchTarget::AnyStandby;
    let a = step(&mut s, &l, &c, &[], &live, Some(&req), 0);
    assert_eq!(
        lease_writes(&a),
        vec![&VolumeAction::SetPreferred {
            expected_rv: "40".into(),
            to: "uid-b".into()
        }]
    );
    // Under way: nothing to write while the holder stands down.
    let mut p = lease(Some("uid-a"), 1, "41");
    p.preferred_holder = Some("uid-b".into());
    assert!(lease_writes(&step(&mut s, &p, &c, &[], &live, None, 1_000)).is_empty());
    // Too slow: one VolumeDemoteTimeout, not more.
    let a = step(&mut s, &p, &c, &[], &live, None, 9_000);
    let timeouts = |a: &[VolumeAction]| {
        a.iter()
            .filter(|x| {
                matches!(
                    x,
                    VolumeAction::Event {
                        reason: VolumeEventReason::VolumeDemoteTimeout,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(timeouts(&a), 1);
    assert_eq!(timeouts(&step(&mut s, &p, &c, &[], &live, None, 9_500)), 0);
    // Done: a Switchover event and the preferred holder cleared.
    let mut done = lease(Some("uid-b"), 2, "45");
    done.preferred_holder = Some("uid-b".into());
    let a = step(&mut s, &done, &c, &[], &live, None, 10_000);
    assert!(a.iter().any(|x| matches!(
        x,
        VolumeAction::Event {
            reason: VolumeEventReason::VolumeSwitchover,
            ..
        }
    )));
    assert_eq!(
        lease_writes(&a),
        vec![&VolumeAction::ClearPreferred {
            expected_rv: "45".into()
        }]
    );
}

#[test]
fn a_switchover_that_finished_between_two_passes_is_still_reported_as_one() {
    let mut c = consumers();
    c[0].role_active = true;
    let mut s = VolumeSwitch::new();
    let live = ["a-2", "b-2"];
    step(
        &mut s,
        &lease(Some("uid-a"), 1, "40"),
        &c,
        &[],
        &live,
        None,
        0,
    );
    // The next pass already sees b holding, still named as the preferred holder.
    let mut done = lease(Some("uid-b"), 2, "47");
    done.preferred_holder = Some("uid-b".into());
    let a = step(&mut s, &done, &c, &[], &live, None, 500);
    let reasons: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            VolumeAction::Event { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec![VolumeEventReason::VolumeSwitchover]);
}

#[test]
fn a_switchover_to_anyone_but_a_live_standby_consumer_is_refused() {
    let c = consumers();
    let l = lease(Some("uid-a"), 1, "40");
    let (none, live) = (set(&[]), set(&["a-2", "b-2"]));
    let to = |id: &str| SwitchTarget::To(id.into());
    assert_eq!(
        plan_switchover(&l, &c, &none, &live, &to("uid-x")),
        Err(SwitchRefusal::NotAConsumer {
            identity: "uid-x".into()
        })
    );
    assert!(matches!(
        plan_switchover(&l, &c, &none, &live, &to("uid-a")),
        Err(SwitchRefusal::AlreadyHolder { .. })
    ));
    assert!(matches!(
        plan_switchover(&l, &c, &none, &set(&["a-2"]), &to("uid-b")),
        Err(SwitchRefusal::TargetNotLive { .. })
    ));
    assert!(matches!(
        plan_switchover(&l, &c, &set(&["b-2"]), &live, &to("uid-b")),
        Err(SwitchRefusal::TargetNotLive { .. })
    ));
    assert_eq!(
        plan_switchover(&l, &c, &none, &live, &to("uid-b")),
        Ok("uid-b".into())
    );
    // The refusal is an Event and the request is dropped; nothing else is written.
    let mut s = VolumeSwitch::new();
    let a = step(&mut s, &l, &c, &[], &["a-2", "b-2"], Some(&to("uid-x")), 0);
    assert!(a.iter().any(|x| matches!(
        x,
        VolumeAction::Event {
            reason: VolumeEventReason::VolumeSwitchoverRefused,
            ..
        }
    )));
    assert_eq!(
        lease_writes(&a),
        vec![&VolumeAction::DropRequest {
            expected_rv: "40".into()
        }]
    );
    // A preferred holder that stopped being viable is cleared.
    let mut p = lease(Some("uid-a"), 1, "41");
    p.preferred_holder = Some("uid-x".into());
    let a = step(&mut s, &p, &c, &[], &["a-2", "b-2"], None, 100);
    assert_eq!(
        lease_writes(&a),
        vec![&VolumeAction::ClearPreferred {
            expected_rv: "41".into()
        }]
    );
}

#[test]
fn a_version_written_on_is_not_decided_on_again_for_a_renew_interval() {
    let c = consumers();
    let mut s = VolumeSwitch::new();
    let l = lease(Some("uid-a"), 1, "40");
    let req = SwitchTarget::To("uid-x".into());
    let live = ["a-2", "b-2"];
    let a = step(&mut s, &l, &c, &[], &live, Some(&req), 0);
    assert_eq!(lease_writes(&a).len(), 1);
    // The watch has not brought the new version yet: no second refusal, no second write.
    let a = step(&mut s, &l, &c, &[], &live, Some(&req), 500);
    assert!(
        a.iter().all(|x| matches!(x, VolumeAction::SetRole { .. })),
        "{a:?}"
    );
    // The write never reached the server: decided again after a renew interval.
    let a = step(&mut s, &l, &c, &[], &live, Some(&req), 2_000);
    assert_eq!(lease_writes(&a).len(), 1, "{a:?}");
}

#[test]
fn node_sets_are_the_committed_fences_and_the_healthy_verdicts() {
    use crate::remediation::NodeRemediation;
    use std::collections::BTreeMap;
    let verdicts: BTreeMap<String, NodeVerdict> = [
        ("a-1".to_string(), NodeVerdict::Healthy),
        (
            "a-2".to_string(),
            NodeVerdict::Suspect(crate::verdict::SuspectReason::AgentLate),
        ),
        ("b-2".to_string(), NodeVerdict::Healthy),
    ]
    .into();
    let mut fenced = NodeRemediation::default();
    fenced.phase = Phase::Tainted;
    let mut committing = NodeRemediation::default();
    committing.phase = Phase::Committing;
    let remediation: BTreeMap<String, NodeRemediation> =
        [("a-2".to_string(), fenced), ("a-1".to_string(), committing)].into();
    let (f, l) = node_sets(&verdicts, &remediation);
    assert_eq!(f, set(&["a-2"]));
    assert_eq!(l, set(&["a-1", "b-2"]));
}
