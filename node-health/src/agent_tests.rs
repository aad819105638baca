use super::*;

fn agent() -> AgentCore {
    let mut a = AgentCore::new("a-1", "room-a", HealthTiming::default());
    a.set_partner(Some("b-1".into()));
    a
}

fn partner_report(api: bool, right: bool) -> PeerReport {
    PeerReport {
        node: "b-1".into(),
        room: "room-b".into(),
        partner: Some("a-1".into()),
        api_reachable: api,
        has_right: right,
    }
}

#[test]
fn fence_marker_of_an_earlier_boot_is_the_normal_return() {
    assert_eq!(
        read_fence_marker("boot-1", "boot-2"),
        FenceMarkerReading::ReturnedAfterFence
    );
    assert_eq!(
        read_fence_marker("boot-1", "boot-1"),
        FenceMarkerReading::FencedThisBoot
    );
    assert_eq!(
        read_fence_marker(" boot-1\n", "boot-1"),
        FenceMarkerReading::FencedThisBoot
    );
    // A marker without a boot ID says nothing about a reboot: treated as this boot's.
    assert_eq!(
        read_fence_marker("", "boot-1"),
        FenceMarkerReading::FencedThisBoot
    );
}

#[test]
fn not_armed_until_first_renewal() {
    let mut a = agent();
    assert_eq!(a.tick(MonoTime(0)), AgentStep::default());
    // A vouch alone never admits a node.
    a.peer_answered(MonoTime(0), &partner_report(false, true));
    assert_eq!(a.tick(MonoTime(100)), AgentStep::default());
    a.renewal_succeeded(MonoTime(200));
    let s = a.tick(MonoTime(300));
    assert!(s.armed && s.feed);
}

#[test]
fn lost_right_stops_workloads_then_feeding_forever() {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(0));
    assert!(a.tick(MonoTime(0)).feed);
    assert!(!a.tick(MonoTime(500)).feed, "fed at most once per interval");
    assert!(a.tick(MonoTime(1_000)).feed);
    // 8 s lease shrunk by 1%: 7.92 s.
    assert!(a.tick(MonoTime(7_919)).feed);
    let s = a.tick(MonoTime(7_920));
    assert_eq!(s.lost, Some(LossReason::LeaseExpired));
    assert!(s.stop_workloads && !s.feed);
    // A late success does not bring the right back: only a reboot does.
    a.renewal_succeeded(MonoTime(7_900));
    a.renewal_succeeded(MonoTime(8_000));
    for t in [8_000, 9_000, 20_000] {
        assert_eq!(a.tick(MonoTime(t)), AgentStep::default());
    }
    assert!(!a.report(MonoTime(9_000)).has_right);
}

#[test]
fn a_broken_watchdog_reboots_directly_when_the_right_is_lost() {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(0));
    assert!(a.tick(MonoTime(0)).armed);
    a.watchdog_failed();
    assert!(a.is_watchdog_failed());
    // Still running while the right holds: a broken watchdog alone stops nothing.
    let s = a.tick(MonoTime(1_000));
    assert!(s.feed && !s.reboot && !s.stop_workloads);
    let s = a.tick(MonoTime(7_920));
    assert_eq!(s.lost, Some(LossReason::LeaseExpired));
    assert!(s.stop_workloads && s.reboot, "{s:?}");
    // Once: the reboot is not asked again.
    assert_eq!(a.tick(MonoTime(9_000)), AgentStep::default());
}

#[test]
fn a_working_watchdog_is_left_to_reboot_the_node() {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(0));
    a.tick(MonoTime(0));
    let s = a.tick(MonoTime(7_920));
    assert!(s.stop_workloads && !s.reboot, "{s:?}");
}

#[test]
fn partner_vouch_keeps_running_through_an_api_outage() {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(0));
    a.tick(MonoTime(0));
    for t in (1_000..60_000).step_by(1_000) {
        a.peer_answered(MonoTime(t), &partner_report(false, true));
        let s = a.tick(MonoTime(t + 10));
        assert!(s.lost.is_none(), "at {t}");
    }
    assert_eq!(
        a.right_to_run(MonoTime(60_000)),
        Some(RunBasis::Vouched { by: "b-1".into() })
    );
    // The partner reaches the API again: no more vouches, the right runs out.
    a.peer_answered(MonoTime(60_000), &partner_report(true, true));
    assert!(a.tick(MonoTime(61_000)).lost.is_none());
    assert!(
        a.tick(MonoTime(61_970)).lost.is_some(),
        "3 s shrunk after 59 s"
    );
}

#[test]
fn only_the_mutual_partner_of_the_other_room_vouches() {
    let refused = [
        PeerReport {
            room: "room-a".into(),
            ..partner_report(false, true)
        },
        PeerReport {
            node: "b-2".into(),
            ..partner_report(false, true)
        },
        PeerReport {
            partner: Some("a-9".into()),
            ..partner_report(false, true)
        },
        partner_report(true, true),
        partner_report(false, false),
    ];
    for r in refused {
        let mut a = agent();
        a.renewal_succeeded(MonoTime(0));
        a.tick(MonoTime(0));
        a.peer_answered(MonoTime(7_000), &r);
        assert!(
            a.tick(MonoTime(8_000)).lost.is_some(),
            "{r:?} must not vouch"
        );
    }
}

#[test]
fn a_fence_marker_blocks_arming_until_cleared() {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(0));
    a.observe_fence_marker(true);
    assert_eq!(
        a.tick(MonoTime(100)),
        AgentStep::default(),
        "not armed while marked"
    );
    a.renewal_succeeded(MonoTime(2_000));
    a.observe_fence_marker(false);
    let s = a.tick(MonoTime(2_100));
    assert!(s.armed && s.feed);
    // A marker seen by a running agent means it must stop at once.
    a.observe_fence_marker(true);
    let s = a.tick(MonoTime(2_200));
    assert_eq!(s.lost, Some(LossReason::FenceMarker));
    assert!(s.stop_workloads && !s.feed);
}

fn witness_agent() -> AgentCore {
    let mut a = agent();
    a.set_witness_configured(true);
    a.renewal_succeeded(MonoTime(0));
    assert!(a.tick(MonoTime(0)).armed);
    a
}

#[test]
fn with_a_witness_losing_the_other_room_needs_a_grant() {
    let mut a = witness_agent();
    // The other room is seen alive: the lease alone is enough.
    a.observe_other_room(MonoTime(1_000));
    a.renewal_succeeded(MonoTime(2_000));
    assert!(!a.needs_witness(MonoTime(2_500)));
    assert_eq!(a.right_to_run(MonoTime(2_500)), Some(RunBasis::Lease));
    // Silent for 1.5 s (it has a partner: three probes unanswered): claim early, still running
    // on the lease.
    assert!(a.needs_witness(MonoTime(2_501)));
    a.renewal_succeeded(MonoTime(6_000));
    assert_eq!(a.right_to_run(MonoTime(9_000)), Some(RunBasis::Lease));
    // Out of contact for more than an agent lease: even with a fresh lease, a grant is
    // needed.
    assert_eq!(a.right_to_run(MonoTime(9_001)), None);
    a.witness_granted(MonoTime(8_000), 4, std::time::Duration::from_secs(10));
    assert_eq!(
        a.right_to_run(MonoTime(9_001)),
        Some(RunBasis::Witness { epoch: 4 })
    );
    assert!(a.tick(MonoTime(9_001)).feed);
    // The grant runs out (10 s shrunk by 1%: 9.9 s) and is not renewed: the room stops.
    a.renewal_succeeded(MonoTime(15_000));
    assert!(a.tick(MonoTime(17_899)).lost.is_none());
    let s = a.tick(MonoTime(17_900));
    assert_eq!(s.lost, Some(LossReason::NoWitnessGrant));
    assert!(s.stop_workloads);
}

/// Right after a cut, both rooms still hold a fresh renewal: only a renewal sent after the
/// other room fell silent says this room reaches the API server, so the room that lost it
/// does not outrank the room that kept it at the witness.
#[test]
fn a_claim_says_the_api_server_is_reachable_only_on_a_renewal_since_the_silence() {
    let mut a = witness_agent();
    a.renewal_succeeded(MonoTime(1_900));
    a.observe_other_room(MonoTime(2_000));
    assert_eq!(a.witness_claim(MonoTime(3_000)), None, "not silent yet");
    let claim = a
        .witness_claim(MonoTime(3_600))
        .expect("silent for 1.6 s: claims");
    assert!(!claim.join, "heard from the other room: a claim of its own");
    assert_eq!(claim.claim.room, "room-a");
    assert_eq!(claim.claim.epoch, None);
    assert!(
        a.report(MonoTime(3_600)).api_reachable,
        "a vouch may still rely on it"
    );
    assert!(
        !claim.claim.api_reachable,
        "a renewal from before the silence proves nothing"
    );
    a.renewal_succeeded(MonoTime(3_900));
    assert_eq!(
        a.witness_claim(MonoTime(4_000))
            .map(|c| c.claim.api_reachable),
        Some(true)
    );
    // That renewal, too, goes stale.
    assert_eq!(
        a.witness_claim(MonoTime(8_901))
            .map(|c| c.claim.api_reachable),
        Some(false)
    );
}

#[test]
fn with_a_witness_a_node_that_never_heard_the_other_room_only_joins() {
    let mut a = witness_agent();
    assert_eq!(a.witness_claim(MonoTime(1_500)), None, "just armed");
    let ask = a
        .witness_claim(MonoTime(1_501))
        .expect("asks before the timeout");
    assert!(ask.join, "no claim of its own at boot: a join");
    assert_eq!(ask.claim.room, "room-a");
    assert_eq!(ask.claim.epoch, None);
    // Refused (no live grant of its room): still stops at the contact timeout.
    for t in (2_000..=8_000).step_by(1_000) {
        a.renewal_succeeded(MonoTime(t));
        assert!(a.tick(MonoTime(t)).lost.is_none());
        assert!(a.witness_claim(MonoTime(t)).is_some_and(|c| c.join));
    }
    assert_eq!(
        a.tick(MonoTime(8_001)).lost,
        Some(LossReason::NoWitnessGrant)
    );
    assert_eq!(a.witness_claim(MonoTime(8_001)), None, "lost: asks no more");
}

#[test]
fn with_a_witness_a_booting_node_runs_on_its_rooms_grant_by_joining() {
    let mut a = witness_agent();
    let ask = a.witness_claim(MonoTime(6_000)).expect("asks");
    assert!(ask.join);
    // The witness shares the room's grant (its controller's): 5 s left of it, epoch 3.
    a.witness_granted(MonoTime(6_000), 3, std::time::Duration::from_secs(5));
    for t in (6_000..=10_000).step_by(1_000) {
        a.renewal_succeeded(MonoTime(t));
        assert!(a.tick(MonoTime(t)).lost.is_none(), "at {t}");
    }
    assert_eq!(
        a.right_to_run(MonoTime(10_000)),
        Some(RunBasis::Witness { epoch: 3 })
    );
    // Bounded by the witness's answer, shrunk by the drift bound: 5 s less 1% from 6 s.
    assert!(a.tick(MonoTime(10_949)).lost.is_none());
    a.witness_granted(MonoTime(10_500), 3, std::time::Duration::from_secs(4));
    assert!(a.tick(MonoTime(14_459)).lost.is_none());
    assert_eq!(
        a.tick(MonoTime(14_460)).lost,
        Some(LossReason::NoWitnessGrant)
    );
}

#[test]
fn once_the_other_room_is_heard_from_the_agent_claims_instead_of_joining() {
    let mut a = witness_agent();
    assert!(a.witness_claim(MonoTime(2_000)).is_some_and(|c| c.join));
    a.observe_other_room(MonoTime(2_100));
    assert_eq!(a.witness_claim(MonoTime(3_000)), None, "in contact");
    assert!(a.witness_claim(MonoTime(3_601)).is_some_and(|c| !c.join));
}

#[test]
fn with_a_witness_a_held_claim_stops_the_room_even_with_the_api_server() {
    let mut a = witness_agent();
    // Heard from once at boot, then never again.
    a.observe_other_room(MonoTime(0));
    for t in (1_000..=8_000).step_by(1_000) {
        a.renewal_succeeded(MonoTime(t));
        assert!(
            a.tick(MonoTime(t)).lost.is_none(),
            "within the contact timeout"
        );
    }
    assert!(a.needs_witness(MonoTime(8_001)));
    assert_eq!(
        a.tick(MonoTime(8_001)).lost,
        Some(LossReason::NoWitnessGrant)
    );
}

/// An agent armed on a renewal sent at 10 s, as its process stops.
fn armed_agent() -> AgentCore {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(10_000));
    assert!(a.tick(MonoTime(10_000)).armed);
    a
}

/// A new process whose clock reads 100 s when it resumes (another origin than the old one's).
const B_START: MonoTime = MonoTime(100_000);

fn resumed(previous: &ResumeState) -> (AgentCore, Resumed) {
    let mut b = agent();
    let resumed = b.resume(previous, B_START);
    (b, resumed)
}

#[test]
fn resumed_within_the_lease_feeds_at_once_and_loses_at_the_inherited_deadline() {
    let a = armed_agent();
    // B starts 4 s after A's last renewal: 3.92 s of A's right remain.
    let (mut b, resumed) = resumed(&a.handover().at(MonoTime(14_000)));
    assert_eq!(resumed, Resumed::Running(RunBasis::Lease));
    assert!(b.is_armed());
    let s = b.tick(B_START);
    assert!(
        s.armed && s.feed,
        "opens and feeds the watchdog at once: {s:?}"
    );
    assert!(!b.tick(B_START + Duration::from_millis(500)).feed);
    let s = b.tick(B_START + Duration::from_millis(1_000));
    assert!(s.feed && !s.armed, "armed once: {s:?}");
    // A's deadline: 10 s + 7.92 s on A's clock, 3.92 s after B started.
    assert!(b.tick(B_START + Duration::from_millis(3_919)).feed);
    let s = b.tick(B_START + Duration::from_millis(3_920));
    assert_eq!(s.lost, Some(LossReason::LeaseExpired));
    assert!(s.stop_workloads && !s.feed);
    assert_eq!(
        b.tick(B_START + Duration::from_millis(5_000)),
        AgentStep::default()
    );
}

#[test]
fn a_renewal_after_resuming_extends_the_right_as_usual() {
    let (mut b, _) = resumed(&armed_agent().handover().at(MonoTime(14_000)));
    b.tick(B_START);
    b.renewal_succeeded(B_START + Duration::from_millis(2_000));
    assert!(
        b.tick(B_START + Duration::from_millis(5_000))
            .lost
            .is_none()
    );
    assert!(b.tick(B_START + Duration::from_millis(9_919)).feed);
    assert_eq!(
        b.tick(B_START + Duration::from_millis(9_920)).lost,
        Some(LossReason::LeaseExpired)
    );
}

#[test]
fn a_resumed_loss_stays_lost_and_is_stopped_again() {
    let mut a = armed_agent();
    assert!(a.tick(MonoTime(17_920)).lost.is_some());
    let (mut b, resumed) = resumed(&a.handover().at(MonoTime(18_000)));
    assert_eq!(resumed, Resumed::Lost(LossReason::LeaseExpired));
    // The previous process may have died before its stop finished: stop again, never arm.
    let s = b.tick(B_START);
    assert!(
        s.stop_workloads && !s.reboot && !s.feed && !s.armed,
        "{s:?}"
    );
    assert_eq!(s.lost, Some(LossReason::LeaseExpired));
    // Not even a fresh renewal brings the right back before the node reboots.
    b.renewal_succeeded(B_START + Duration::from_millis(100));
    for t in [200, 1_000, 60_000] {
        assert_eq!(
            b.tick(B_START + Duration::from_millis(t)),
            AgentStep::default()
        );
    }
    assert!(!b.report(B_START + Duration::from_millis(200)).has_right);
    assert!(
        b.handover().lost.is_some(),
        "handed on to the next process too"
    );
}

#[test]
fn a_resumed_loss_with_a_broken_watchdog_reboots_directly() {
    let mut a = armed_agent();
    a.watchdog_failed();
    assert!(a.tick(MonoTime(17_920)).reboot);
    let (mut b, _) = resumed(&a.handover().at(MonoTime(18_000)));
    assert!(b.is_watchdog_failed());
    let s = b.tick(B_START);
    assert!(s.stop_workloads && s.reboot, "{s:?}");
    assert_eq!(
        b.tick(B_START + Duration::from_millis(200)),
        AgentStep::default()
    );
}

#[test]
fn resumed_after_the_right_ran_out_is_not_armed() {
    // 8 s after the renewal: A's right ended at 7.92 s, though A never saw it.
    let (mut b, resumed) = resumed(&armed_agent().handover().at(MonoTime(18_000)));
    assert_eq!(resumed, Resumed::Expired);
    assert!(!b.is_armed());
    assert_eq!(
        b.tick(B_START),
        AgentStep::default(),
        "the watchdog is not opened"
    );
    assert_eq!(b.right_to_run(B_START), None);
    // Like a new agent: only its own renewal arms it.
    b.renewal_succeeded(B_START + Duration::from_millis(1_000));
    let s = b.tick(B_START + Duration::from_millis(1_100));
    assert!(s.armed && s.feed, "{s:?}");
}

#[test]
fn resumed_under_a_fence_marker_has_no_right() {
    let mut a = armed_agent();
    a.renewal_succeeded(MonoTime(12_000));
    a.observe_fence_marker(true);
    let (mut b, resumed) = resumed(&a.handover().at(MonoTime(13_000)));
    assert_eq!(resumed, Resumed::Expired);
    assert_eq!(b.tick(B_START), AgentStep::default());
    // Its own renewal still reads the marker: no right.
    b.renewal_succeeded(B_START + Duration::from_millis(1_000));
    assert_eq!(
        b.tick(B_START + Duration::from_millis(1_100)),
        AgentStep::default()
    );
}

#[test]
fn inherited_instants_are_rounded_to_the_earlier_millisecond() {
    let previous = ResumeState {
        renewed_ago: Some(Duration::from_micros(4_000_001)),
        armed: true,
        ..ResumeState::default()
    };
    let (mut b, _) = resumed(&previous);
    assert_eq!(b.last_renewal(), Some(MonoTime(95_999)));
    assert!(
        b.tick(B_START + Duration::from_millis(3_918))
            .lost
            .is_none()
    );
    assert!(
        b.tick(B_START + Duration::from_millis(3_919))
            .lost
            .is_some()
    );
    // A renewal older than this clock's origin grants nothing (never "at the origin").
    let mut c = agent();
    let far = ResumeState {
        renewed_ago: Some(Duration::from_millis(500)),
        armed: true,
        ..ResumeState::default()
    };
    assert_eq!(c.resume(&far, MonoTime(400)), Resumed::Expired);
    assert_eq!(c.last_renewal(), None);
    // What is left of a grant is rounded down.
    let mut w = agent();
    w.set_witness_configured(true);
    let granted = ResumeState {
        renewed_ago: Some(Duration::from_secs(20)),
        armed: true,
        other_room_heard: true,
        grant: Some((7, Duration::from_micros(2_999_999))),
        ..ResumeState::default()
    };
    assert_eq!(
        w.resume(&granted, B_START),
        Resumed::Running(RunBasis::Witness { epoch: 7 })
    );
    assert!(
        w.tick(B_START + Duration::from_millis(2_998))
            .lost
            .is_none()
    );
    assert_eq!(
        w.tick(B_START + Duration::from_millis(2_999)).lost,
        Some(LossReason::NoWitnessGrant)
    );
}

#[test]
fn a_previous_process_that_had_not_armed_hands_over_its_renewal_only() {
    let mut a = agent();
    a.renewal_succeeded(MonoTime(10_000));
    let (mut b, resumed) = resumed(&a.handover().at(MonoTime(11_000)));
    assert_eq!(resumed, Resumed::NotArmed);
    assert!(!b.is_armed());
    // The core's usual rule: armed after a successful renewal of this boot.
    let s = b.tick(B_START);
    assert!(s.armed && s.feed, "{s:?}");
}

#[test]
fn vouches_are_not_inherited() {
    let mut a = armed_agent();
    a.peer_answered(MonoTime(17_000), &partner_report(false, true));
    assert_eq!(
        a.right_to_run(MonoTime(18_000)),
        Some(RunBasis::Vouched { by: "b-1".into() })
    );
    let (b, resumed) = resumed(&a.handover().at(MonoTime(18_000)));
    assert_eq!(resumed, Resumed::Expired);
    assert!(!b.is_armed());
}

#[test]
fn contact_with_the_other_room_is_inherited_never_extended() {
    let mut a = witness_agent();
    a.observe_other_room(MonoTime(1_000));
    a.renewal_succeeded(MonoTime(6_000));
    // B starts at A's 7 s; A would lose at 9.001 s (out of contact, no grant).
    let mut b = agent();
    b.set_witness_configured(true);
    assert_eq!(
        b.resume(&a.handover().at(MonoTime(7_000)), B_START),
        Resumed::Running(RunBasis::Lease)
    );
    assert!(b.tick(B_START).armed);
    assert!(
        b.tick(B_START + Duration::from_millis(2_000))
            .lost
            .is_none()
    );
    assert_eq!(
        b.tick(B_START + Duration::from_millis(2_001)).lost,
        Some(LossReason::NoWitnessGrant),
        "no new benefit of the doubt"
    );
}

#[test]
fn the_first_renewal_after_a_restart_is_not_clean() {
    let mut a = armed_agent();
    a.renewal_failed();
    a.renewal_failed();
    let (b, _) = resumed(&a.handover().at(MonoTime(14_000)));
    assert_eq!(b.failures_before_next_renewal(), 3);
    let (c, _) = resumed(&armed_agent().handover().at(MonoTime(11_000)));
    assert_eq!(c.failures_before_next_renewal(), 1);
}

#[test]
fn reports_api_reachable_only_while_renewing() {
    let mut a = agent();
    assert!(!a.report(MonoTime(0)).api_reachable);
    a.renewal_succeeded(MonoTime(0));
    assert!(a.report(MonoTime(4_500)).api_reachable);
    assert!(!a.report(MonoTime(4_501)).api_reachable);
    a.renewal_failed();
    a.renewal_failed();
    assert_eq!(a.failures_before_next_renewal(), 2);
    a.renewal_succeeded(MonoTime(6_000));
    assert_eq!(a.failures_before_next_renewal(), 0);
}
