//! The agent's decision loop in virtual time, with a fake clock, Lease API, watchdog, workload
//! stopper and partner: renewals every 2 s, probes every 1 s, a loop tick every 100 ms.
#![cfg(feature = "agent")]

use node_health::agentd::SharedCore;
use node_health::agentd::fake::{
    ApiMode, Event, EventLog, FakeClock, FakeHeartbeatApi, FakePeer, FakeStopper, FakeWatchdog,
};
use node_health::agentd::heartbeat::{self, NodeFacts, RENEW_FAILURES_ANNOTATION};
use node_health::agentd::node_agent::NodeAgent;
use node_health::agentd::partner::PartnerCache;
use node_health::agentd::peer;
use node_health::{AgentCore, Clock, HealthTiming, MonoTime, PeerReport, RunBasis};
use std::sync::Arc;
use std::time::Duration;

const STEP_MS: u64 = 100;

struct Harness {
    clock: FakeClock,
    log: EventLog,
    api: FakeHeartbeatApi,
    partner: FakePeer,
    probes: peer::ProbeContext,
    partners: PartnerCache,
    facts: NodeFacts,
    agent: NodeAgent<FakeWatchdog, FakeStopper>,
    timing: HealthTiming,
}

impl Harness {
    fn new() -> Self {
        let timing = HealthTiming::default();
        let clock = FakeClock::new();
        clock.set(MonoTime(1_000));
        let log = EventLog::new();
        let mut core = AgentCore::new("a-1", "room-a", timing);
        core.set_partner(Some("b-1".into()));
        let core = SharedCore::new(core);
        let partners = PartnerCache::new();
        partners.set(Some("b-1".into()), Some(([10, 0, 2, 1], 9477).into()));
        let agent = NodeAgent::new(
            core,
            Arc::new(clock.clone()),
            FakeWatchdog::new(clock.clone(), log.clone()),
            FakeStopper::new(clock.clone(), log.clone()),
        );
        Harness {
            facts: NodeFacts {
                node: "a-1".into(),
                namespace: "twosite-system".into(),
                boot_id: "boot-1".into(),
                watchdog_enabled: true,
                lease_duration: timing.agent_lease,
            },
            clock,
            log,
            api: FakeHeartbeatApi::new(),
            partner: FakePeer::new(),
            probes: node_health::agentd::fake::test_probe_context(),
            partners,
            agent,
            timing,
        }
    }

    fn core(&self) -> &SharedCore {
        self.agent.core()
    }

    /// Runs `ms` of virtual time: each 100 ms step renews (every 2 s), probes (every 1 s),
    /// then ticks the loop.
    async fn run_for(&mut self, ms: u64) {
        let renew_ms = u64::try_from(self.timing.agent_renew.as_millis()).expect("ms");
        let probe_ms = u64::try_from(self.timing.probe_interval.as_millis()).expect("ms");
        for _ in 0..ms / STEP_MS {
            self.clock.advance(Duration::from_millis(STEP_MS));
            let now = self.clock.now().0;
            if now.is_multiple_of(renew_ms) {
                let _ =
                    heartbeat::renew(&self.api, &self.facts, self.agent.core(), &self.clock).await;
            }
            if now.is_multiple_of(probe_ms) {
                let _ = peer::probe_partner(
                    &self.partner,
                    &self.partners,
                    self.agent.core(),
                    &self.clock,
                    &self.probes,
                )
                .await;
            }
            self.agent.tick().await;
        }
    }

    fn feeds(&self) -> Vec<MonoTime> {
        self.log.times_of(Event::Fed)
    }

    /// The largest gap between consecutive feeds in `[from, to]`.
    fn largest_feed_gap(&self, from: u64, to: u64) -> Duration {
        let feeds: Vec<u64> = self
            .feeds()
            .into_iter()
            .map(|t| t.0)
            .filter(|t| (from..=to).contains(t))
            .collect();
        assert!(feeds.len() >= 2, "fed at most once in [{from}, {to}]");
        let gaps = feeds.windows(2).map(|w| w[1] - w[0]);
        Duration::from_millis(gaps.max().unwrap_or(0))
    }
}

fn partner_report(api_reachable: bool) -> PeerReport {
    PeerReport {
        node: "b-1".into(),
        room: "room-b".into(),
        partner: Some("a-1".into()),
        api_reachable,
        has_right: true,
    }
}

#[tokio::test]
async fn normal_renewals_keep_feeding() {
    let mut h = Harness::new();
    h.run_for(60_000).await;
    let now = h.clock.now().0;
    assert!(
        h.feeds().len() >= 55,
        "fed {} times in 60 s",
        h.feeds().len()
    );
    assert!(h.largest_feed_gap(3_000, now) <= h.timing.feed_interval);
    assert!(h.log.times_of(Event::Stopped).is_empty());
    assert_eq!(h.log.times_of(Event::Armed).len(), 1, "armed once");
    assert_eq!(
        h.core().lock().right_to_run(h.clock.now()),
        Some(RunBasis::Lease)
    );
    let last = h.api.stored().expect("the Lease exists");
    let annotations = last.metadata.annotations.expect("annotations");
    assert_eq!(annotations[RENEW_FAILURES_ANNOTATION], "0");
    assert_eq!(annotations[heartbeat::RIGHT_TO_RUN_ANNOTATION], "Lease");
}

#[tokio::test]
async fn lost_right_stops_workloads_then_never_feeds_again() {
    let mut h = Harness::new();
    h.run_for(10_000).await;
    assert!(!h.feeds().is_empty());
    let outage = h.clock.now();
    h.api.set_mode(ApiMode::Down);
    // The partner does not answer: nobody vouches.
    h.run_for(30_000).await;

    let stops = h.log.times_of(Event::Stopped);
    assert_eq!(stops.len(), 1, "workloads stopped exactly once: {stops:?}");
    let stopped = stops[0];
    let last_feed = *h.feeds().last().expect("fed before");
    assert!(
        last_feed < stopped,
        "the last feed ({last_feed:?}) precedes the stop ({stopped:?})"
    );
    assert!(
        stopped <= last_feed + h.timing.feed_interval,
        "stopped at {stopped:?}, after the next feed was due ({last_feed:?} + 1 s)"
    );
    assert!(
        h.feeds().iter().all(|f| *f < stopped),
        "no feed after the stop"
    );
    // Lost no later than one lease (from the last successful renewal, sent before the outage).
    assert!(
        stopped <= outage + h.timing.agent_lease,
        "stopped at {stopped:?}"
    );
    assert!(h.core().lock().is_lost());

    // The API server comes back: the right does not (only a reboot brings it back).
    h.api.set_mode(ApiMode::Up);
    h.run_for(10_000).await;
    assert!(
        h.feeds().iter().all(|f| *f < stopped),
        "fed again after losing the right"
    );
    assert_eq!(h.log.times_of(Event::Stopped).len(), 1);
}

#[tokio::test]
async fn a_broken_watchdog_is_reported_and_the_node_reboots_itself_on_loss() {
    let mut h = Harness::new();
    h.run_for(10_000).await;
    let annotations = |h: &Harness| {
        h.api
            .stored()
            .expect("the Lease exists")
            .metadata
            .annotations
            .expect("annotations")
    };
    assert_eq!(annotations(&h)[heartbeat::WATCHDOG_ANNOTATION], "enabled");

    // The device goes away: the next renewal says so, and nothing stops while the right holds.
    h.agent.watchdog().break_it();
    h.run_for(5_000).await;
    assert!(h.core().lock().is_watchdog_failed());
    assert_eq!(annotations(&h)[heartbeat::WATCHDOG_ANNOTATION], "failed");
    assert!(h.log.times_of(Event::Stopped).is_empty());
    assert!(h.log.times_of(Event::Rebooted).is_empty());

    // The right is lost: stop the workloads, then reboot (nothing else would).
    let outage = h.clock.now();
    h.api.set_mode(ApiMode::Down);
    h.run_for(20_000).await;
    let stops = h.log.times_of(Event::Stopped);
    let reboots = h.log.times_of(Event::Rebooted);
    assert_eq!(stops.len(), 1, "{:?}", h.log.events());
    assert_eq!(reboots.len(), 1, "rebooted once: {:?}", h.log.events());
    assert!(stops[0] <= reboots[0], "the stop comes first");
    assert!(reboots[0] <= outage + h.timing.agent_lease, "{reboots:?}");
}

#[tokio::test]
async fn the_watchdog_is_not_opened_before_the_first_successful_renewal() {
    let mut h = Harness::new();
    h.api.set_mode(ApiMode::Down);
    // A vouching partner does not admit a node that never renewed.
    h.partner.answer(Some(partner_report(false)));
    h.run_for(20_000).await;
    assert!(h.log.events().is_empty(), "{:?}", h.log.events());
    assert!(!h.agent.watchdog().is_open());

    h.api.set_mode(ApiMode::Up);
    h.run_for(5_000).await;
    let first_write = h.api.writes().into_iter().next().expect("renewed");
    assert_eq!(
        first_write.metadata.annotations.expect("annotations")[RENEW_FAILURES_ANNOTATION],
        "10",
        "ten failed renewals before the first"
    );
    let events = h.log.events();
    assert_eq!(events[0].1, Event::Armed, "{events:?}");
    assert_eq!(events[1].1, Event::Fed, "{events:?}");
    assert!(
        events[0].0 >= MonoTime(22_000),
        "armed only after the renewal at 22 s"
    );
}

#[tokio::test]
async fn an_api_outage_with_the_partner_vouching_keeps_feeding() {
    let mut h = Harness::new();
    h.run_for(10_000).await;
    h.api.set_mode(ApiMode::Down);
    h.partner.answer(Some(partner_report(false)));
    let from = h.clock.now().0;
    h.run_for(60_000).await;
    let to = h.clock.now().0;
    assert!(h.log.times_of(Event::Stopped).is_empty());
    assert!(h.largest_feed_gap(from, to) <= h.timing.feed_interval);
    assert_eq!(
        h.core().lock().right_to_run(h.clock.now()),
        Some(RunBasis::Vouched { by: "b-1".into() })
    );

    // Back: the first renewal says how many failed before it; the next is clean.
    h.api.set_mode(ApiMode::Up);
    h.partner.answer(Some(partner_report(true)));
    let written = h.api.writes().len();
    h.run_for(4_000).await;
    let writes = h.api.writes();
    let failures: Vec<String> = writes[written..]
        .iter()
        .map(|l| {
            l.metadata.annotations.as_ref().expect("annotations")[RENEW_FAILURES_ANNOTATION].clone()
        })
        .collect();
    assert_eq!(failures, ["30", "0"]);
    assert!(h.log.times_of(Event::Stopped).is_empty());
}

#[tokio::test]
async fn a_partner_that_reaches_the_api_while_we_cannot_renew_means_lost() {
    let mut h = Harness::new();
    h.run_for(10_000).await;
    h.api.set_mode(ApiMode::Down);
    h.partner.answer(Some(partner_report(true)));
    h.run_for(20_000).await;
    let stops = h.log.times_of(Event::Stopped);
    assert_eq!(stops.len(), 1);
    assert!(h.feeds().iter().all(|f| *f < stops[0]));
    assert!(h.core().lock().is_lost());
    assert!(!h.core().lock().report(h.clock.now()).has_right);
}

#[tokio::test]
async fn a_conflict_counts_as_a_failed_renewal() {
    let mut h = Harness::new();
    h.run_for(4_000).await;
    h.api.set_mode(ApiMode::ConflictOnce);
    let written = h.api.writes().len();
    h.run_for(4_000).await;
    let writes = h.api.writes();
    assert_eq!(
        writes.len(),
        written + 1,
        "the conflicting write was refused"
    );
    assert_eq!(
        writes[written]
            .metadata
            .annotations
            .as_ref()
            .expect("annotations")[RENEW_FAILURES_ANNOTATION],
        "1"
    );
}

#[tokio::test]
async fn the_controllers_fence_marker_stops_workloads_and_feeding_at_once() {
    let mut h = Harness::new();
    h.run_for(10_000).await;
    h.api.mark_fenced();
    let marked_at = h.clock.now();
    h.run_for(10_000).await;
    let stops = h.log.times_of(Event::Stopped);
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert!(
        stops[0] <= marked_at + h.timing.agent_renew,
        "stopped at the first renewal that read the marker: {stops:?}"
    );
    assert!(h.feeds().iter().all(|f| *f < stops[0]));
    // The renewals go on and keep the marker; they say the node has no right to run.
    let last = h.api.stored().expect("lease");
    let annotations = last.metadata.annotations.expect("annotations");
    assert!(annotations.contains_key(heartbeat::FENCE_MARKER_ANNOTATION));
    assert_eq!(annotations[heartbeat::RIGHT_TO_RUN_ANNOTATION], "None");
}

#[tokio::test]
async fn a_node_booting_under_a_fence_marker_is_not_armed() {
    let mut h = Harness::new();
    h.run_for(2_000).await;
    let h2 = Harness::new();
    // The same Lease store, marked before the new boot's agent first renews.
    h.api.mark_fenced();
    let mut h2 = Harness {
        api: h.api.clone(),
        ..h2
    };
    h2.run_for(10_000).await;
    assert!(h2.log.events().is_empty(), "{:?}", h2.log.events());
}
