//! An agent restart within one boot, in virtual time: agent process A runs its decision loop
//! (saving its state file), stops, and process B starts from that file on a clock with another
//! origin. The boot clock runs on across both; every watchdog feed and stop is logged on it.
#![cfg(feature = "agent")]

use node_health::agentd::SharedCore;
use node_health::agentd::fake::{
    ApiMode, Event, EventLog, FakeClock, FakeHeartbeatApi, FakeStopper, FakeWatchdog,
};
use node_health::agentd::heartbeat::{self, NodeFacts};
use node_health::agentd::node_agent::NodeAgent;
use node_health::agentd::state::{self, StateFile, StateIdentity, StateRecorder};
use node_health::{AgentCore, Clock, HealthTiming, LossReason, MonoTime, Resumed, RunBasis};
use std::sync::Arc;
use std::time::Duration;

const STEP_MS: u64 = 100;
/// The boot clock when A starts.
const BOOT_AT_A: u64 = 50_000;
/// A's clock when it starts.
const A_START: u64 = 1_000;
/// B's clock when it starts: another origin than A's and the boot clock's.
const B_START: u64 = 500_000;

/// The node: its boot clock, watchdog and workload log, state file and Lease store.
struct Node {
    boot: FakeClock,
    log: EventLog,
    api: FakeHeartbeatApi,
    file: StateFile,
    timing: HealthTiming,
    _dir: tempfile::TempDir,
}

/// One agent process.
struct Process {
    clock: FakeClock,
    agent: NodeAgent<FakeWatchdog, FakeStopper>,
    facts: NodeFacts,
    /// Renewals are attempted only from this time of the process clock (the API client and
    /// the room lookup take that long).
    renew_from: u64,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot = FakeClock::new();
        boot.set(MonoTime(BOOT_AT_A));
        Node {
            boot,
            log: EventLog::new(),
            api: FakeHeartbeatApi::new(),
            file: StateFile::new(dir.path().join("agent-state.json")),
            timing: HealthTiming::default(),
            _dir: dir,
        }
    }

    fn process(&self, core: AgentCore, clock: FakeClock, renew_from: u64) -> Process {
        let identity = StateIdentity {
            boot_id: "boot-1".into(),
            node: "a-1".into(),
            room: "room-a".into(),
        };
        let recorder = StateRecorder::new(
            identity,
            Arc::new(clock.clone()),
            Arc::new(self.boot.clone()),
            self.file.clone(),
        );
        let agent = NodeAgent::new(
            SharedCore::new(core),
            Arc::new(clock.clone()),
            FakeWatchdog::new(self.boot.clone(), self.log.clone()),
            FakeStopper::new(self.boot.clone(), self.log.clone()),
        )
        .with_state(recorder);
        Process {
            clock,
            agent,
            facts: NodeFacts {
                node: "a-1".into(),
                namespace: "twosite-system".into(),
                boot_id: "boot-1".into(),
                watchdog_enabled: true,
                lease_duration: self.timing.agent_lease,
            },
            renew_from,
        }
    }

    /// Agent process A, the first of this boot.
    fn start_a(&self) -> Process {
        let clock = FakeClock::new();
        clock.set(MonoTime(A_START));
        let core = AgentCore::new("a-1", "room-a", self.timing);
        self.process(core, clock, A_START)
    }

    /// Agent process B, resuming from the state file; its renewals start `renew_after` later.
    fn start_b(&self, renew_after: u64) -> (Process, Resumed) {
        let clock = FakeClock::new();
        clock.set(MonoTime(B_START));
        let saved = state::load(&self.file, "boot-1", "a-1").expect("A left its state");
        assert_eq!(saved.room, "room-a", "the room comes from the file");
        let mut core = AgentCore::new("a-1", &*saved.room, self.timing);
        let resumed =
            state::resume_core(&mut core, &saved, &clock, &self.boot).expect("this boot's state");
        (self.process(core, clock, B_START + renew_after), resumed)
    }

    /// Nobody runs for `ms`.
    fn pass(&self, ms: u64) {
        self.boot.advance(Duration::from_millis(ms));
    }

    /// Runs `p` for `ms`: each 100 ms step renews (every 2 s, once allowed), then ticks.
    async fn run(&self, p: &mut Process, ms: u64) {
        let renew_ms = u64::try_from(self.timing.agent_renew.as_millis()).expect("ms");
        for _ in 0..ms / STEP_MS {
            p.clock.advance(Duration::from_millis(STEP_MS));
            self.boot.advance(Duration::from_millis(STEP_MS));
            let now = p.clock.now().0;
            if now >= p.renew_from && now.is_multiple_of(renew_ms) {
                let _ = heartbeat::renew(&self.api, &p.facts, p.agent.core(), &p.clock).await;
            }
            p.agent.tick().await;
        }
    }

    fn now(&self) -> u64 {
        self.boot.now().0
    }

    fn times(&self, e: Event) -> Vec<u64> {
        self.log.times_of(e).into_iter().map(|t| t.0).collect()
    }

    /// The largest gap between consecutive watchdog feeds, across processes.
    fn largest_feed_gap(&self) -> Duration {
        let feeds = self.times(Event::Fed);
        let gap = feeds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Duration::from_millis(gap)
    }
}

impl Process {
    /// When this process's last successful renewal was sent, on the boot clock.
    fn last_renewal_on_boot_clock(&self, node: &Node) -> u64 {
        let sent = self.agent.core().lock().last_renewal().expect("renewed").0;
        node.now() - (self.clock.now().0 - sent)
    }
}

#[tokio::test]
async fn the_next_process_feeds_before_its_first_renewal_and_the_watchdog_never_fires() {
    let node = Node::new();
    let mut a = node.start_a();
    node.run(&mut a, 10_000).await;
    assert!(a.agent.core().lock().is_armed());
    drop(a);
    let stopped = node.now();
    // The rolling update: B starts 3 s later, and reaches the API server 4 s after that.
    node.pass(3_000);
    let (mut b, resumed) = node.start_b(4_000);
    assert_eq!(resumed, Resumed::Running(RunBasis::Lease));
    let b_started = node.now();
    node.run(&mut b, 30_000).await;

    let first_b_feed = *node
        .times(Event::Fed)
        .iter()
        .find(|t| **t > stopped)
        .expect("B fed");
    assert!(
        first_b_feed <= b_started + STEP_MS,
        "B fed at its first step ({first_b_feed}), not after its first renewal"
    );
    let b_arms = node.times(Event::Armed);
    assert_eq!(b_arms.len(), 2, "A armed, then B opened the watchdog again");
    let gap = node.largest_feed_gap();
    assert!(
        gap < node.timing.watchdog,
        "the watchdog ({:?}) would have fired: {gap:?} between feeds",
        node.timing.watchdog
    );
    assert!(
        gap >= Duration::from_millis(3_000),
        "the pause shows: {gap:?}"
    );
    assert!(node.times(Event::Stopped).is_empty());
    assert_eq!(
        b.agent.core().lock().right_to_run(b.clock.now()),
        Some(RunBasis::Lease),
        "B renews on its own after the hand-over"
    );
    // B's first renewal says a restart came before it: not clean.
    let writes = node.api.writes();
    let failures: Vec<String> = writes
        .iter()
        .map(|l| {
            l.metadata.annotations.as_ref().expect("annotations")
                [heartbeat::RENEW_FAILURES_ANNOTATION]
                .clone()
        })
        .collect();
    assert_eq!(
        failures.iter().filter(|f| *f == "1").count(),
        1,
        "{failures:?}"
    );
}

#[tokio::test]
async fn the_next_process_never_feeds_when_the_previous_one_had_lost_the_right() {
    let node = Node::new();
    let mut a = node.start_a();
    node.run(&mut a, 10_000).await;
    node.api.set_mode(ApiMode::Down);
    node.run(&mut a, 10_000).await;
    assert!(a.agent.core().lock().is_lost());
    let stops = node.times(Event::Stopped);
    assert_eq!(stops.len(), 1);
    let lost_at = stops[0];
    // A is killed before the watchdog resets the node; B starts with the API server back.
    drop(a);
    node.api.set_mode(ApiMode::Up);
    node.pass(1_000);
    let (mut b, resumed) = node.start_b(0);
    assert_eq!(resumed, Resumed::Lost(LossReason::LeaseExpired));
    node.run(&mut b, 20_000).await;

    assert!(
        node.times(Event::Fed).iter().all(|t| *t < lost_at),
        "fed after the right was lost: {:?}",
        node.log.events()
    );
    assert_eq!(
        node.times(Event::Armed).len(),
        1,
        "B never opens the watchdog"
    );
    let stops = node.times(Event::Stopped);
    assert_eq!(stops.len(), 2, "B stops the workloads again: {stops:?}");
    let b = b.agent.core().lock();
    assert!(b.is_lost());
    assert!(b.last_renewal().is_some(), "B renewed, to no avail");
}

#[tokio::test]
async fn the_next_process_stops_feeding_at_the_previous_ones_deadline_without_a_renewal() {
    let node = Node::new();
    let mut a = node.start_a();
    node.run(&mut a, 10_000).await;
    let renewed = a.last_renewal_on_boot_clock(&node);
    drop(a);
    // The API server goes away with A: B's renewals all fail.
    node.api.set_mode(ApiMode::Down);
    node.pass(3_000);
    let (mut b, resumed) = node.start_b(0);
    assert_eq!(resumed, Resumed::Running(RunBasis::Lease));
    node.run(&mut b, 15_000).await;

    // A would have lost the right at its first step at or after renewed + 7.92 s.
    let deadline = renewed + 7_920;
    let a_would_stop = deadline.next_multiple_of(STEP_MS);
    let stops = node.times(Event::Stopped);
    assert_eq!(stops, [a_would_stop], "{:?}", node.log.events());
    let feeds = node.times(Event::Fed);
    let last_feed = *feeds.last().expect("fed");
    assert!(
        last_feed < deadline,
        "fed at {last_feed}, after the inherited deadline {deadline}"
    );
    assert!(
        feeds.iter().any(|t| *t > renewed + 3_000),
        "B did feed: {feeds:?}"
    );
    assert!(b.agent.core().lock().is_lost());
}

#[tokio::test]
async fn the_next_process_does_not_open_the_watchdog_once_the_right_has_run_out() {
    let node = Node::new();
    let mut a = node.start_a();
    node.run(&mut a, 10_000).await;
    drop(a);
    let stopped = node.now();
    node.api.set_mode(ApiMode::Down);
    // B starts 9 s later: A's right (7.92 s from a renewal up to 2 s old) has run out.
    node.pass(9_000);
    let (mut b, resumed) = node.start_b(0);
    assert_eq!(resumed, Resumed::Expired);
    node.run(&mut b, 10_000).await;
    assert_eq!(node.times(Event::Armed).len(), 1, "only A's");
    assert!(
        node.times(Event::Fed).iter().all(|t| *t <= stopped),
        "the watchdog A armed is left to fire: {:?}",
        node.log.events()
    );
    assert!(!b.agent.core().lock().is_armed());
}
