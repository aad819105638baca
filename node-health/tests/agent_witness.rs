//! The agent with a witness, in virtual time: a fake clock, Lease API, partner and other-room
//! heartbeats, and a fake witness over real loopback HTTP. Renewals and heartbeat lists every
//! 2 s, probes every 1 s, claims every 500 ms, a loop tick every 100 ms.
#![cfg(feature = "agent")]

use node_health::agentd::SharedCore;
use node_health::agentd::claims;
use node_health::agentd::contact::OtherRoomWatch;
use node_health::agentd::fake::{
    Event, EventLog, FakeClock, FakeContact, FakeHeartbeatApi, FakePeer, FakeStopper, FakeWatchdog,
    FakeWitness, WitnessAnswer,
};
use node_health::agentd::heartbeat::{self, NodeFacts, RIGHT_TO_RUN_ANNOTATION};
use node_health::agentd::node_agent::NodeAgent;
use node_health::agentd::partner::PartnerCache;
use node_health::agentd::peer;
use node_health::agentd::witness_client::WitnessClient;
use node_health::{AgentCore, Clock, HealthTiming, MonoTime, PeerReport, RunBasis};
use std::sync::Arc;
use std::time::Duration;

const STEP_MS: u64 = 100;
const TOKEN: &str = "s3cret-token";

struct Harness {
    clock: FakeClock,
    log: EventLog,
    api: FakeHeartbeatApi,
    contact: FakeContact,
    watch: OtherRoomWatch,
    partner: FakePeer,
    probes: peer::ProbeContext,
    partners: PartnerCache,
    facts: NodeFacts,
    witness: WitnessClient,
    agent: NodeAgent<FakeWatchdog, FakeStopper>,
    timing: HealthTiming,
    /// The other room's agent renews its heartbeat every round.
    other_room_renews: bool,
}

impl Harness {
    /// Agent a-1 of room-a; with `paired`, its partner b-1 of room-b answers probes (with the
    /// right to run) until told otherwise.
    fn new(witness_url: &str, paired: bool) -> Self {
        let timing = HealthTiming::default();
        let clock = FakeClock::new();
        clock.set(MonoTime(1_000));
        let log = EventLog::new();
        let mut core = AgentCore::new("a-1", "room-a", timing);
        core.set_witness_configured(true);
        let partners = PartnerCache::new();
        let partner = FakePeer::new();
        if paired {
            core.set_partner(Some("b-1".into()));
            partners.set(Some("b-1".into()), Some(([10, 0, 2, 1], 9477).into()));
            partner.answer(Some(partner_report()));
        }
        let contact = FakeContact::new();
        for (node, zone) in [("a-1", "room-a"), ("a-2", "room-a"), ("b-1", "room-b")] {
            contact.set_zone(node, zone);
            contact.renew(node);
        }
        let agent = NodeAgent::new(
            SharedCore::new(core),
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
            witness: WitnessClient::new(witness_url, "prod", TOKEN, None).expect("client"),
            clock,
            log,
            api: FakeHeartbeatApi::new(),
            contact,
            watch: OtherRoomWatch::new("room-a"),
            partner,
            probes: node_health::agentd::fake::test_probe_context(),
            partners,
            agent,
            timing,
            other_room_renews: false,
        }
    }

    fn core(&self) -> &SharedCore {
        self.agent.core()
    }

    fn now(&self) -> u64 {
        self.clock.now().0
    }

    async fn run_for(&mut self, ms: u64) {
        let renew_ms = u64::try_from(self.timing.agent_renew.as_millis()).expect("ms");
        let probe_ms = u64::try_from(self.timing.probe_interval.as_millis()).expect("ms");
        let claim_ms = u64::try_from(claims::CLAIM_EVERY.as_millis()).expect("ms");
        for _ in 0..ms / STEP_MS {
            self.clock.advance(Duration::from_millis(STEP_MS));
            let now = self.now();
            if now.is_multiple_of(renew_ms) {
                let _ =
                    heartbeat::renew(&self.api, &self.facts, self.agent.core(), &self.clock).await;
                self.contact.renew("a-2");
                if self.other_room_renews {
                    self.contact.renew("b-1");
                }
                let _ = self
                    .watch
                    .round(&self.contact, self.agent.core(), &self.clock)
                    .await;
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
            if now.is_multiple_of(claim_ms) {
                let _ =
                    claims::claim_if_needed(&self.witness, self.agent.core(), &self.clock).await;
            }
            self.agent.tick().await;
        }
    }

    fn feeds_after(&self, t: u64) -> Vec<u64> {
        self.log
            .times_of(Event::Fed)
            .into_iter()
            .map(|t| t.0)
            .filter(|f| *f > t)
            .collect()
    }

    /// The largest gap between feeds in `(from, now]`, counting from `from`.
    fn largest_feed_gap_since(&self, from: u64) -> u64 {
        let mut last = from;
        let mut gap = 0;
        for f in self.feeds_after(from) {
            gap = gap.max(f - last);
            last = f;
        }
        gap.max(self.now() - last)
    }

    fn right_annotation(&self) -> String {
        self.api
            .stored()
            .and_then(|l| l.metadata.annotations)
            .and_then(|a| a.get(RIGHT_TO_RUN_ANNOTATION).cloned())
            .unwrap_or_default()
    }
}

fn partner_report() -> PeerReport {
    PeerReport {
        node: "b-1".into(),
        room: "room-b".into(),
        partner: Some("a-1".into()),
        api_reachable: true,
        has_right: true,
    }
}

/// An address where nothing listens.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn contact_lost_claims_are_granted_and_the_room_keeps_running() {
    let witness = FakeWitness::start(WitnessAnswer::Grant {
        epoch: 7,
        valid_for_ms: 10_000,
    })
    .await
    .expect("fake witness");
    let mut h = Harness::new(&witness.url(), true);
    h.run_for(10_000).await;
    assert!(witness.received().is_empty(), "no claim while in contact");
    assert_eq!(h.log.times_of(Event::Armed).len(), 1);

    // The partner (the other room) goes silent; the API server stays.
    h.partner.answer(None);
    let cut = h.now();
    h.run_for(30_000).await;

    let received = witness.received();
    assert!(received.len() >= 40, "{} claims", received.len());
    for r in &received {
        assert_eq!(r.cluster, "prod");
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        let claim = r.claim.as_ref().expect("a claim");
        assert_eq!(claim.room, "room-a");
        assert_eq!(claim.epoch, None);
        assert!(claim.api_reachable, "{claim:?}");
    }
    assert!(h.log.times_of(Event::Stopped).is_empty(), "never stopped");
    assert!(!h.core().lock().is_lost());
    // Fed all along, well past the contact timeout.
    assert!(
        h.largest_feed_gap_since(cut) <= 1_000,
        "gap {} ms",
        h.largest_feed_gap_since(cut)
    );
    assert_eq!(
        h.core().lock().right_to_run(h.clock.now()),
        Some(RunBasis::Witness { epoch: 7 })
    );
    assert_eq!(h.right_annotation(), "Witness");
}

async fn loses_the_right_after_the_contact_timeout(witness_url: &str) -> Harness {
    let mut h = Harness::new(witness_url, true);
    h.run_for(10_000).await;
    h.partner.answer(None);
    let cut = h.now();
    h.run_for(30_000).await;

    let stopped = h.log.times_of(Event::Stopped);
    assert_eq!(stopped.len(), 1, "stopped once: {stopped:?}");
    let stopped = stopped[0].0;
    // The last probe answer was sent at most a probe interval before the cut; the contact
    // timeout is the agent lease (8 s).
    let timeout = u64::try_from(h.timing.agent_lease.as_millis()).expect("ms");
    assert!(
        stopped > cut - 1_000 + timeout && stopped <= cut + timeout + STEP_MS,
        "stopped at {stopped}, cut at {cut}"
    );
    assert!(h.feeds_after(stopped).is_empty(), "fed after stopping");
    assert!(h.core().lock().is_lost());
    // The Lease still renews: the loss is the witness's doing, not the API server's.
    let writes_at_stop = h.api.writes().len();
    h.run_for(10_000).await;
    assert!(h.api.writes().len() >= writes_at_stop + 4);
    assert!(h.feeds_after(stopped).is_empty());
    assert_eq!(h.right_annotation(), "None");
    h
}

#[tokio::test]
async fn a_held_claim_stops_the_room_even_though_its_lease_renews() {
    let witness = FakeWitness::start(WitnessAnswer::Held)
        .await
        .expect("fake witness");
    let h = loses_the_right_after_the_contact_timeout(&witness.url()).await;
    assert!(witness.received().len() >= 10, "claimed and was held");
    assert!(
        witness
            .received()
            .iter()
            .all(|r| r.claim.as_ref().is_some_and(|c| c.room == "room-a")),
    );
    drop(h);
}

#[tokio::test]
async fn an_unreachable_witness_stops_the_room_like_a_held_claim() {
    let url = closed_port_url().await;
    loses_the_right_after_the_contact_timeout(&url).await;
}

#[tokio::test]
async fn a_witness_refusing_the_token_stops_the_room_like_a_held_claim() {
    let witness = FakeWitness::start(WitnessAnswer::Raw {
        status: 401,
        body: r#"{"error":"bad token"}"#.into(),
    })
    .await
    .expect("fake witness");
    loses_the_right_after_the_contact_timeout(&witness.url()).await;
    assert!(!witness.received().is_empty());
}

#[tokio::test]
async fn probe_answers_from_the_partner_mean_contact_and_no_claim() {
    let witness = FakeWitness::start(WitnessAnswer::Held)
        .await
        .expect("fake witness");
    let mut h = Harness::new(&witness.url(), true);
    h.run_for(60_000).await;
    assert!(witness.received().is_empty(), "{:?}", witness.received());
    assert!(h.log.times_of(Event::Stopped).is_empty());
    assert!(h.largest_feed_gap_since(3_000) <= 1_000);
    assert_eq!(
        h.core().lock().right_to_run(h.clock.now()),
        Some(RunBasis::Lease)
    );
}

#[tokio::test]
async fn a_partner_without_the_right_is_no_evidence_of_contact() {
    let witness = FakeWitness::start(WitnessAnswer::Held)
        .await
        .expect("fake witness");
    let mut h = Harness::new(&witness.url(), true);
    h.run_for(5_000).await;
    h.partner.answer(Some(PeerReport {
        has_right: false,
        ..partner_report()
    }));
    h.run_for(15_000).await;
    assert!(!witness.received().is_empty(), "claimed");
    assert!(h.core().lock().is_lost());
}

#[tokio::test]
async fn the_other_room_s_heartbeats_mean_contact_and_their_silence_means_claims() {
    let witness = FakeWitness::start(WitnessAnswer::Held)
        .await
        .expect("fake witness");
    // No partner: only the other room's heartbeats, listed through the API server, tell.
    let mut h = Harness::new(&witness.url(), false);
    h.other_room_renews = true;
    h.run_for(60_000).await;
    assert!(witness.received().is_empty(), "{:?}", witness.received());
    assert!(h.log.times_of(Event::Stopped).is_empty());
    assert!(h.largest_feed_gap_since(3_000) <= 1_000);

    // Only the own room keeps renewing (a-2): the other room is silent.
    h.other_room_renews = false;
    let cut = h.now();
    h.run_for(20_000).await;
    let received = witness.received();
    assert!(!received.is_empty(), "claims once the other room is silent");
    assert!(h.core().lock().is_lost());
    let stopped = h.log.times_of(Event::Stopped)[0].0;
    assert!(stopped <= cut + 8_000 + STEP_MS, "stopped at {stopped}");
}
