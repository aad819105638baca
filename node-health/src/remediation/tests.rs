//! The remediation core's unit tests: every unsafe case refused, the cycle from dead to back.

use super::*;
use crate::verdict::SuspectReason;

fn dead(deadline: u64) -> NodeVerdict {
    NodeVerdict::Dead {
        fence_deadline: Some(MonoTime(deadline)),
    }
}

fn input(verdict: NodeVerdict) -> RemediationInput {
    RemediationInput {
        verdict,
        vouchers_clear_since: Some(MonoTime(0)),
        excluded: false,
        tainted: false,
        // A dead node's is on since long ago: the head start and the marking are tested
        // on their own.
        unschedulable_since: verdict.is_dead().then_some(MonoTime(0)),
        fenced_boot_annotation: None,
        pods: 2,
        terminating_pods: 0,
        ready: false,
        boot_id: Some("boot-1".into()),
        heartbeat: Some("rv-7".into()),
        fence_marker: false,
        paused: false,
        witness_ok: true,
    }
}

fn reasons(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .map(|a| match a {
            Action::Event { reason, .. } => reason.as_str(),
            Action::DeletePods => "DeletePods",
            Action::ApplyTaint { .. } => "ApplyTaint",
            Action::RemoveTaint => "RemoveTaint",
            Action::MarkUnschedulable => "MarkUnschedulable",
            Action::ClearUnschedulable => "ClearUnschedulable",
            Action::CommitFence { .. } => "CommitFence",
            Action::ClearFence => "ClearFence",
        })
        .collect()
}

const T0: u64 = 100_000;

#[test]
fn full_cycle_dead_committed_tainted_recovered() {
    let t = HealthTiming::default();
    let mut r = NodeRemediation::default();
    let s = r.step(
        &input(NodeVerdict::Suspect(SuspectReason::AgentLate)),
        MonoTime(T0),
        &t,
    );
    assert_eq!(reasons(&s), ["NodeSuspect"]);
    let s = r.step(&input(dead(T0 + 7_000)), MonoTime(T0 + 5_000), &t);
    assert_eq!(reasons(&s), ["NodeFenceWaiting"]);
    assert!(
        r.step(&input(dead(T0 + 7_000)), MonoTime(T0 + 6_999), &t)
            .is_empty()
    );
    let s = r.step(&input(dead(T0 + 7_000)), MonoTime(T0 + 7_000), &t);
    assert_eq!(reasons(&s), ["NodeFenced", "CommitFence"]);
    assert_eq!(
        s[1],
        Action::CommitFence {
            heartbeat: "rv-7".into(),
            fenced_boot_id: Some("boot-1".into())
        }
    );
    assert!(
        r.step(&input(dead(T0 + 7_000)), MonoTime(T0 + 7_050), &t)
            .is_empty(),
        "nothing is released before the commit is confirmed"
    );
    // Committed: in the same pass, the taint first, then the release of the pods.
    let s = r.commit_result(true);
    assert_eq!(reasons(&s), ["ApplyTaint", "DeletePods"]);
    let mut i = input(dead(T0 + 7_000));
    i.fence_marker = true;
    // The taint write failed (the shell stopped there): taint again before any release.
    let s = r.step(&i, MonoTime(T0 + 7_100), &t);
    assert_eq!(reasons(&s), ["ApplyTaint", "DeletePods"]);
    // The shell applied the taint and deleted the pods.
    i.tainted = true;
    i.pods = 0;
    let s = r.step(&i, MonoTime(T0 + 7_200), &t);
    assert_eq!(reasons(&s), ["OutOfServiceTaintApplied"]);
    assert_eq!(r.phase, Phase::Tainted);
    // Back with a new boot ID and a renewing agent; one pod still terminating.
    i.verdict = NodeVerdict::Healthy;
    i.ready = true;
    i.boot_id = Some("boot-2".into());
    i.terminating_pods = 1;
    assert!(r.step(&i, MonoTime(T0 + 60_000), &t).is_empty());
    assert_eq!(r.phase, Phase::Recovering);
    assert!(r.step(&i, MonoTime(T0 + 60_100), &t).is_empty());
    i.terminating_pods = 0;
    assert_eq!(
        reasons(&r.step(&i, MonoTime(T0 + 60_200), &t)),
        ["RemoveTaint", "ClearFence"]
    );
    i.tainted = false;
    i.fence_marker = false;
    assert_eq!(
        reasons(&r.step(&i, MonoTime(T0 + 60_300), &t)),
        ["ClearUnschedulable", "OutOfServiceTaintRemoved"]
    );
    assert_eq!(r.phase, Phase::Healthy);
}

/// Whatever the input, a step never asks for a release of pods unless the taint is on the
/// node or asked for before it in the same list.
#[test]
fn pods_are_released_only_behind_the_taint() {
    let t = HealthTiming::default();
    for tainted in [false, true] {
        for pods in [0, 3] {
            for fence_marker in [false, true] {
                let mut r = NodeRemediation::default();
                r.step(&input(dead(T0)), MonoTime(T0), &t);
                let mut all = r.commit_result(true);
                let mut i = input(dead(T0));
                i.tainted = tainted;
                i.pods = pods;
                i.fence_marker = fence_marker;
                for k in 1..4 {
                    all.extend(r.step(&i, MonoTime(T0 + k * 100), &t));
                }
                let mut taint_seen = tainted;
                for a in &all {
                    match a {
                        Action::ApplyTaint { .. } => taint_seen = true,
                        Action::DeletePods => assert!(
                            taint_seen,
                            "release before the taint: tainted {tainted}, {all:?}"
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// A dead node past its deadline (a controller that just took over) is fenced only once
/// its `NoSchedule` taint has been seen on for the head start, so the scheduler knows it.
#[test]
fn no_fence_before_the_scheduler_can_have_seen_the_node_unschedulable() {
    let t = HealthTiming::default();
    let mut r = NodeRemediation::default();
    let unmarked = RemediationInput {
        unschedulable_since: None,
        ..input(dead(T0))
    };
    let s = r.step(&unmarked, MonoTime(T0 + 10_000), &t);
    assert_eq!(reasons(&s), ["MarkUnschedulable", "NodeFenceWaiting"]);
    assert_eq!(
        r.phase,
        Phase::FenceWaiting(WaitReason::NotUnschedulableYet)
    );
    // Seen on by the controller's watch at 10.4 s: a second later, and not before.
    let marked = RemediationInput {
        unschedulable_since: Some(MonoTime(T0 + 10_400)),
        ..input(dead(T0))
    };
    assert!(r.step(&marked, MonoTime(T0 + 10_400), &t).is_empty());
    assert!(r.step(&marked, MonoTime(T0 + 11_399), &t).is_empty());
    assert_eq!(
        reasons(&r.step(&marked, MonoTime(T0 + 11_400), &t)),
        ["NodeFenced", "CommitFence"]
    );
}

#[test]
fn a_refused_commit_releases_nothing() {
    let t = HealthTiming::default();
    let mut r = NodeRemediation::default();
    r.step(&input(dead(T0)), MonoTime(T0), &t);
    assert_eq!(r.phase, Phase::Committing);
    // The heartbeat Lease changed under the conditional write: the node renewed.
    assert!(r.commit_result(false).is_empty());
    let s = r.step(&input(NodeVerdict::Healthy), MonoTime(T0 + 100), &t);
    assert!(s.is_empty(), "{s:?}");
    assert_eq!(r.phase, Phase::Healthy);
}

/// The unsafe cases: every one of them must be refused.
#[test]
fn never_fences_what_is_not_proven_stopped() {
    let t = HealthTiming::default();
    let now = MonoTime(T0 + 60_000);
    let cases: Vec<(&str, RemediationInput)> = vec![
        (
            "suspect only",
            input(NodeVerdict::Suspect(SuspectReason::NotReady)),
        ),
        ("deadline not passed", input(dead(T0 + 60_001))),
        (
            "no agent",
            input(NodeVerdict::Dead {
                fence_deadline: None,
            }),
        ),
        (
            "partner not clear",
            RemediationInput {
                vouchers_clear_since: None,
                ..input(dead(T0))
            },
        ),
        (
            // 3 s vouch + 5 s watchdog + 2 s margin, stretched: 10.1 s.
            "partner clear for too short a time",
            RemediationInput {
                vouchers_clear_since: Some(MonoTime(T0 + 49_901)),
                ..input(dead(T0))
            },
        ),
        (
            "excluded",
            RemediationInput {
                excluded: true,
                ..input(dead(T0))
            },
        ),
        (
            "paused",
            RemediationInput {
                paused: true,
                ..input(dead(T0))
            },
        ),
        (
            "the witness grant is not held for the other room",
            RemediationInput {
                witness_ok: false,
                ..input(dead(T0))
            },
        ),
        (
            "no heartbeat to commit against",
            RemediationInput {
                heartbeat: None,
                ..input(dead(T0))
            },
        ),
    ];
    for (name, i) in cases {
        let mut r = NodeRemediation::default();
        let mut actions = r.step(&i, now, &t);
        actions.extend(r.step(&i, now, &t));
        assert!(
            !actions.iter().any(|a| matches!(
                a,
                Action::DeletePods | Action::ApplyTaint { .. } | Action::CommitFence { .. }
            )),
            "{name}: {actions:?}"
        );
        assert!(!matches!(r.phase, Phase::Fenced | Phase::Tainted), "{name}");
    }
    // And the boundary on the accepting side.
    let mut r = NodeRemediation::default();
    let i = RemediationInput {
        vouchers_clear_since: Some(MonoTime(T0 + 49_900)),
        ..input(dead(T0))
    };
    assert_eq!(reasons(&r.step(&i, now, &t)), ["NodeFenced", "CommitFence"]);
}

/// The early `NoSchedule` taint follows the verdict, never a distrusted one, and stays on a
/// fenced node until it is back.
#[test]
fn a_dead_node_is_made_unschedulable_before_any_fence_and_cleared_when_healthy() {
    let t = HealthTiming::default();
    let marks = |r: &mut NodeRemediation, i: &RemediationInput, at: u64| {
        reasons(&r.step(i, MonoTime(at), &t))
            .into_iter()
            .filter(|a| a.ends_with("Unschedulable"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let input = |v| RemediationInput {
        unschedulable_since: None,
        ..input(v)
    };
    // Dead, its deadline far away: marked at once, and only once it is seen on.
    let mut r = NodeRemediation::default();
    let far = input(dead(T0 + 60_000));
    assert_eq!(marks(&mut r, &far, T0), ["MarkUnschedulable"]);
    let on = RemediationInput {
        unschedulable_since: Some(MonoTime(0)),
        ..far.clone()
    };
    assert!(marks(&mut r, &on, T0 + 100).is_empty());
    // Suspect again (a late renewal): kept until Healthy.
    let suspect = RemediationInput {
        verdict: NodeVerdict::Suspect(SuspectReason::AgentLate),
        ..on.clone()
    };
    assert!(marks(&mut r, &suspect, T0 + 200).is_empty());
    let healthy = RemediationInput {
        verdict: NodeVerdict::Healthy,
        ready: true,
        ..on.clone()
    };
    assert_eq!(marks(&mut r, &healthy, T0 + 300), ["ClearUnschedulable"]);
    // Never on a verdict the controller distrusts, nor on an excluded node; a node without
    // an agent is dead too, and gets it.
    for (name, i, want) in [
        (
            "paused",
            RemediationInput {
                paused: true,
                ..far.clone()
            },
            false,
        ),
        (
            "excluded",
            RemediationInput {
                excluded: true,
                ..far.clone()
            },
            false,
        ),
        (
            "suspect",
            RemediationInput {
                verdict: NodeVerdict::Suspect(SuspectReason::AgentLate),
                ..far.clone()
            },
            false,
        ),
        (
            "no agent",
            input(NodeVerdict::Dead {
                fence_deadline: None,
            }),
            true,
        ),
    ] {
        let mut r = NodeRemediation::default();
        assert_eq!(!marks(&mut r, &i, T0).is_empty(), want, "{name}");
    }
    // A fenced node that answers Healthy with its old boot ID keeps it (and is reported).
    let mut r = NodeRemediation::default();
    let due = RemediationInput {
        unschedulable_since: Some(MonoTime(0)),
        ..input(dead(T0))
    };
    r.step(&due, MonoTime(T0), &t);
    let _ = r.commit_result(true);
    let back_unrebooted = RemediationInput {
        verdict: NodeVerdict::Healthy,
        ready: true,
        tainted: true,
        fence_marker: true,
        unschedulable_since: Some(MonoTime(0)),
        pods: 0,
        ..due
    };
    for k in 1..4 {
        assert!(marks(&mut r, &back_unrebooted, T0 + k * 100).is_empty());
    }
    assert_eq!(r.phase, Phase::Tainted);
}

#[test]
fn a_node_back_without_reboot_stays_fenced() {
    let t = HealthTiming::default();
    let mut r = NodeRemediation::default();
    r.step(&input(dead(T0)), MonoTime(T0), &t);
    let _ = r.commit_result(true);
    let mut i = input(NodeVerdict::Healthy);
    i.tainted = true;
    i.ready = true;
    i.pods = 0;
    i.fence_marker = true;
    // Same boot ID as when fenced.
    let s = r.step(&i, MonoTime(T0 + 100), &t);
    assert_eq!(reasons(&s), ["OutOfServiceTaintApplied"]);
    let s = r.step(&i, MonoTime(T0 + 200), &t);
    assert_eq!(reasons(&s), ["NodeReturnedWithoutReboot"]);
    assert!(r.step(&i, MonoTime(T0 + 300), &t).is_empty(), "warned once");
    assert_eq!(r.phase, Phase::Tainted);
}

#[test]
fn picks_up_its_own_fence_after_a_restart_but_not_a_foreign_taint() {
    let t = HealthTiming::default();
    let mut i = input(NodeVerdict::Healthy);
    i.tainted = true;
    i.ready = true;
    i.pods = 0;
    let mut foreign = NodeRemediation::default();
    assert!(foreign.step(&i, MonoTime(T0), &t).is_empty());
    assert_eq!(
        foreign.phase,
        Phase::Healthy,
        "an operator's taint is theirs"
    );
    i.fenced_boot_annotation = Some("boot-0".into());
    let mut ours = NodeRemediation::default();
    assert_eq!(reasons(&ours.step(&i, MonoTime(T0), &t)), ["RemoveTaint"]);
    assert_eq!(ours.phase, Phase::Recovering);
    // With the marker still on the heartbeat Lease the node is held fenced.
    i.fence_marker = true;
    i.pods = 1;
    i.verdict = NodeVerdict::Suspect(SuspectReason::NotReady);
    let mut held = NodeRemediation::default();
    assert_eq!(reasons(&held.step(&i, MonoTime(T0), &t)), ["DeletePods"]);
    assert_eq!(held.phase, Phase::Tainted);
}

#[test]
fn pause_rules() {
    assert!(pause_reason(false, (0, 0), 6, 50).is_some());
    assert_eq!(
        pause_reason(true, (3, 0), 6, 50),
        None,
        "a whole room lost is normal"
    );
    assert_eq!(pause_reason(true, (1, 1), 6, 50), None);
    assert!(pause_reason(true, (2, 2), 6, 50).is_some());
    assert!(
        pause_reason(true, (1, 1), 2, 50).is_some(),
        "both nodes of the smallest cluster"
    );
}
