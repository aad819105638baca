//! The controller's side of the witness: the grants it holds and whether the witness answers.
//!
//! When a node of room R is dead, the leader claims the *opposite* room R' at the witness (at
//! most once per [`CLAIM_EVERY`] per room). A grant counts from when the claim was *sent*, on
//! this process's monotonic clock, shrunk by the drift bound: `sent_at + shrink(valid_for)`.
//! A node of room R may be fenced only while the controller holds a valid grant for R' (then R
//! cannot hold one: its nodes that lost their partner have stopped, or will before R could be
//! granted). A grant stays valid until it runs out, whatever the witness says later: the
//! witness never grants the other room before then.
//!
//! Losing the witness stops nothing: without a grant the controller only waits
//! (`NoWitnessGrant`) and reports `WitnessReachable=False`.

use crate::admin::LoopGuard;
use crate::metrics::Metrics;
use crate::witness_port::{PortError, WitnessPort};
use node_health::time::shrink;
use node_health::witness::{Claim, ClaimOutcome};
use node_health::{Clock, MonoTime};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The shortest time between two claims of one room.
pub const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// How often `/healthz` is checked.
pub const HEALTH_EVERY: Duration = Duration::from_secs(10);
/// While the witness answers, `lastContact` in the status moves at most this often (every
/// answer moving it would rewrite the status every second).
pub const CONTACT_REFRESH: Duration = Duration::from_secs(60);
/// The longest one witness call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A grant the controller holds: the witness's epoch and until when it holds on this clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub epoch: u64,
    pub until: MonoTime,
}

/// What the status shows of the witness.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WitnessView {
    /// `None` until the first claim or health check ends.
    pub reachable: Option<bool>,
    /// Human-readable, for the `WitnessReachable` condition.
    pub message: String,
    /// The last answer, RFC 3339 to the second (refreshed every [`CONTACT_REFRESH`]).
    pub last_contact: Option<String>,
    /// The valid grant the controller holds: room and epoch.
    pub grant: Option<(String, u64)>,
}

#[derive(Debug, Default)]
struct LinkState {
    grants: BTreeMap<String, Grant>,
    last_sent: BTreeMap<String, MonoTime>,
    reachable: Option<bool>,
    message: String,
    last_contact: Option<jiff::Timestamp>,
}

/// The witness as the controller knows it: shared by the remediation loop (claims, grants) and
/// the health loop.
pub struct WitnessLink {
    port: Arc<dyn WitnessPort>,
    clock: Arc<dyn Clock + Send + Sync>,
    drift_ppm: u64,
    timeout: Duration,
    metrics: Arc<Metrics>,
    state: Mutex<LinkState>,
}

impl std::fmt::Debug for WitnessLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessLink")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The claim outcome labels of `twosite_witness_claims_total`.
pub mod outcome {
    pub const GRANTED: &str = "granted";
    pub const HELD: &str = "held";
    pub const REFUSED: &str = "refused";
    pub const UNREACHABLE: &str = "unreachable";
}

impl WitnessLink {
    pub fn new(
        port: Arc<dyn WitnessPort>,
        clock: Arc<dyn Clock + Send + Sync>,
        drift_ppm: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        WitnessLink {
            port,
            clock,
            drift_ppm,
            timeout: CALL_TIMEOUT,
            metrics,
            state: Mutex::new(LinkState::default()),
        }
    }

    /// The same link with another call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims every room of `rooms` not claimed within [`CLAIM_EVERY`], side by side.
    pub async fn claim_rooms(&self, rooms: &BTreeSet<String>) {
        let due: Vec<&String> = {
            let state = self.state();
            let now = self.clock.now();
            rooms
                .iter()
                .filter(|r| {
                    state
                        .last_sent
                        .get(*r)
                        .is_none_or(|t| now.since(*t) >= CLAIM_EVERY)
                })
                .collect()
        };
        futures::future::join_all(due.into_iter().map(|r| self.claim(r))).await;
    }

    /// One claim of `room`; a grant is kept from the moment the claim was sent.
    async fn claim(&self, room: &str) {
        let claim = Claim {
            room: room.to_string(),
            epoch: None,
            api_reachable: true,
        };
        // Recorded before sending: the grant's validity counts from here.
        let sent_at = self.clock.now();
        self.state().last_sent.insert(room.to_string(), sent_at);
        let answer = match tokio::time::timeout(self.timeout, self.port.claim(&claim)).await {
            Ok(answer) => answer,
            Err(_) => Err(PortError::Unreachable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        };
        let label = match &answer {
            Ok(ClaimOutcome::Granted {
                epoch,
                valid_for_ms,
            }) => {
                let until = sent_at + shrink(Duration::from_millis(*valid_for_ms), self.drift_ppm);
                let mut state = self.state();
                let previous = state.grants.get(room).copied();
                // A later answer never shortens a grant already promised.
                let until = previous.map_or(until, |g| g.until.max(until));
                state.grants.insert(
                    room.to_string(),
                    Grant {
                        epoch: *epoch,
                        until,
                    },
                );
                if previous.is_none_or(|g| g.epoch != *epoch) {
                    tracing::info!(room, epoch, valid_for_ms, "witness granted the room");
                }
                outcome::GRANTED
            }
            Ok(ClaimOutcome::Held {
                holder,
                epoch,
                retry_after_ms,
            }) => {
                tracing::info!(
                    room,
                    ?holder,
                    epoch,
                    retry_after_ms,
                    "witness holds the claim"
                );
                outcome::HELD
            }
            Err(err) if err.answered() => {
                tracing::warn!(room, error = %err, "witness refused the claim");
                outcome::REFUSED
            }
            Err(err) => {
                tracing::warn!(room, error = %err, "witness claim failed");
                outcome::UNREACHABLE
            }
        };
        self.metrics.witness_claimed(label);
        self.record(answer.map(|_| ()));
    }

    /// Whether the controller holds a grant for `room` valid for at least `margin` from now.
    pub fn grant_valid(&self, room: &str, margin: Duration) -> bool {
        let now = self.clock.now();
        self.state()
            .grants
            .get(room)
            .is_some_and(|g| now + margin < g.until)
    }

    /// Drops every grant (this replica stopped leading; a new term claims again).
    pub fn forget_grants(&self) {
        let mut state = self.state();
        state.grants.clear();
        state.last_sent.clear();
    }

    /// Checks `/healthz` once.
    pub async fn check_health(&self) {
        let answer = match tokio::time::timeout(self.timeout, self.port.healthz()).await {
            Ok(answer) => answer,
            Err(_) => Err(PortError::Unreachable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        };
        if let Err(err) = &answer {
            tracing::debug!(error = %err, "witness health check failed");
        }
        self.record(answer);
    }

    /// Records whether the witness answered.
    fn record(&self, answer: Result<(), PortError>) {
        let mut state = self.state();
        let (reachable, message) = match &answer {
            Ok(()) => (true, "the witness answers".to_string()),
            Err(err) if err.answered() => (true, format!("the witness answers, but {err}")),
            Err(err) => (false, err.to_string()),
        };
        if reachable {
            let now = jiff::Timestamp::now();
            let refresh = state.reachable != Some(true)
                || state
                    .last_contact
                    .is_none_or(|t| now.duration_since(t).unsigned_abs() >= CONTACT_REFRESH);
            if refresh {
                state.last_contact = Some(now);
            }
        }
        if state.reachable != Some(reachable) {
            if reachable {
                tracing::info!("the witness answers");
            } else {
                tracing::warn!(error = message, "the witness does not answer");
            }
        }
        state.reachable = Some(reachable);
        state.message = message;
        self.metrics.witness_reachable.set(i64::from(reachable));
    }

    /// What the status shows.
    pub fn view(&self) -> WitnessView {
        let now = self.clock.now();
        let state = self.state();
        let grant = state
            .grants
            .iter()
            .filter(|(_, g)| now < g.until)
            .max_by_key(|(_, g)| g.until)
            .map(|(room, g)| (room.clone(), g.epoch));
        WitnessView {
            reachable: state.reachable,
            message: state.message.clone(),
            last_contact: state.last_contact.map(|t| {
                jiff::Timestamp::from_second(t.as_second())
                    .unwrap_or(t)
                    .to_string()
            }),
            grant,
        }
    }

    /// Checks `/healthz` every [`HEALTH_EVERY`] forever, on every replica.
    pub async fn run_health_loop(self: Arc<Self>, guard: LoopGuard) -> crate::Result<()> {
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            guard.beat();
            self.check_health().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness_port::PortFuture;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct At(AtomicU64);
    impl Clock for At {
        fn now(&self) -> MonoTime {
            MonoTime(self.0.load(Ordering::SeqCst))
        }
    }

    struct Scripted(Mutex<Vec<Result<ClaimOutcome, PortError>>>, Mutex<usize>);
    impl WitnessPort for Scripted {
        fn claim<'a>(&'a self, _: &'a Claim) -> PortFuture<'a, ClaimOutcome> {
            *self.1.lock().expect("lock") += 1;
            let next = self.0.lock().expect("lock").remove(0);
            Box::pin(async move { next })
        }
        fn healthz(&self) -> PortFuture<'_, ()> {
            Box::pin(async { Err(PortError::Unreachable("down".into())) })
        }
    }

    fn link(
        answers: Vec<Result<ClaimOutcome, PortError>>,
    ) -> (WitnessLink, Arc<At>, Arc<Scripted>) {
        let clock = Arc::new(At(AtomicU64::new(10_000)));
        let port = Arc::new(Scripted(Mutex::new(answers), Mutex::new(0)));
        let l = WitnessLink::new(
            port.clone(),
            clock.clone(),
            10_000,
            Arc::new(Metrics::new()),
        );
        (l, clock, port)
    }

    fn rooms(r: &[&str]) -> BTreeSet<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_grant_counts_from_the_send_shrunk_and_claims_are_rate_limited() {
        let granted = Ok(ClaimOutcome::Granted {
            epoch: 4,
            valid_for_ms: 10_000,
        });
        let held = Ok(ClaimOutcome::Held {
            holder: Some("east".into()),
            epoch: 4,
            retry_after_ms: 1_000,
        });
        let (l, clock, port) = link(vec![granted, held]);
        assert!(!l.grant_valid("west", Duration::ZERO));
        l.claim_rooms(&rooms(&["west"])).await;
        // 10 s shrunk by 1 %: valid until 19.9 s.
        assert!(l.grant_valid("west", Duration::from_millis(9_899)));
        assert!(!l.grant_valid("west", Duration::from_millis(9_900)));
        assert!(!l.grant_valid("east", Duration::ZERO));
        assert_eq!(l.view().grant, Some(("west".into(), 4)));
        assert_eq!(l.view().reachable, Some(true));
        assert!(l.view().last_contact.is_some());
        // Within a second: no second claim.
        clock.0.store(10_999, Ordering::SeqCst);
        l.claim_rooms(&rooms(&["west"])).await;
        assert_eq!(*port.1.lock().expect("lock"), 1);
        // Held later: the grant already promised stays until it runs out.
        clock.0.store(11_000, Ordering::SeqCst);
        l.claim_rooms(&rooms(&["west"])).await;
        assert_eq!(*port.1.lock().expect("lock"), 2);
        assert!(l.grant_valid("west", Duration::ZERO));
        clock.0.store(19_900, Ordering::SeqCst);
        assert!(!l.grant_valid("west", Duration::ZERO));
        assert_eq!(l.view().grant, None);
    }

    #[tokio::test]
    async fn errors_give_no_grant_and_tell_refusal_from_silence() {
        let (l, _, _) = link(vec![Err(PortError::Refused {
            status: 401,
            message: "bad token".into(),
        })]);
        l.claim_rooms(&rooms(&["west"])).await;
        assert!(!l.grant_valid("west", Duration::ZERO));
        let v = l.view();
        assert_eq!(v.reachable, Some(true), "it answered");
        assert!(v.message.contains("401"), "{}", v.message);
        l.check_health().await;
        assert_eq!(l.view().reachable, Some(false));
        let text = l.metrics.encode().expect("metrics");
        assert!(
            text.contains(r#"twosite_witness_claims_total{outcome="refused"} 1"#),
            "{text}"
        );
        assert!(text.contains("twosite_witness_reachable 0"), "{text}");
    }
}
