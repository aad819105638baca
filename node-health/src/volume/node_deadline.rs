//! The node agent's side of the volume deadline ([`GuardAction::ArmFence`]): which deadlines the
//! guards of this node armed, whether the agent may still feed its watchdog, and who may move or
//! clear a deadline.
//!
//! The guard tells its node's agent the fence deadline `at` (the node's boot clock) before its
//! app starts and whenever it moves. Unless the guard reports the app stopped (disarms) first,
//! the node must have stopped writing by `at + fence_delay`. The agent enforces it with its
//! watchdog alone, so a guard that is paused, hung on a dead connection or stuck in IO cannot
//! keep the app writing: it feeds only while `now + watchdog ≤ at + fence_delay` for every armed
//! deadline, so the last feed is followed by a reset no later than `at + fence_delay`. A disarm
//! that comes before the watchdog fires lets the feeds resume (a late renewal costs nothing).
//! Guard and agent read the same clock (CLOCK_BOOTTIME on one node): no drift between them.
//!
//! **Only the guard that armed a deadline can move or clear it.** Its first arm registers the
//! SHA-256 digest of a random token the guard drew (at least [`MIN_TOKEN_BYTES`]); every later
//! arm or disarm of that guard must present the same token. Digests, not tokens, are kept (and
//! persisted), so the agent's state file never holds a capability; comparing digests of a
//! 256-bit random token with `==` leaks nothing usable (a timing oracle on a hash needs a
//! preimage).
//!
//! [`GuardAction::ArmFence`]: super::GuardAction::ArmFence

use crate::time::MonoTime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;

/// A guard's token must carry at least this much randomness.
pub const MIN_TOKEN_BYTES: usize = 32;
/// At most this many guards per node (a flood of registrations is refused, not stored).
pub const MAX_GUARDS: usize = 256;

/// The SHA-256 digest of a guard's token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenDigest(#[serde(with = "hex32")] pub [u8; 32]);

impl TokenDigest {
    /// The digest of `token`; `None` for a token too short to be a capability.
    pub fn of(token: &[u8]) -> Option<TokenDigest> {
        if token.len() < MIN_TOKEN_BYTES {
            return None;
        }
        let d = ring::digest::digest(&ring::digest::SHA256, token);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Some(TokenDigest(out))
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let text: String = b.iter().map(|x| format!("{x:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("a token digest is 64 hex digits");
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}

/// One armed deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    pub token: TokenDigest,
    /// The fence deadline (node's boot clock).
    pub at: MonoTime,
    /// How long after `at` the node may take to stop writing.
    pub fence_delay: Duration,
}

impl Deadline {
    /// The last instant the watchdog may be fed so that the node resets by `at + fence_delay`.
    fn last_feed(&self, watchdog: Duration) -> Option<MonoTime> {
        let end = self.at + self.fence_delay;
        (end.as_millis() >= duration_ms(watchdog)).then(|| end - watchdog)
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why an arm or disarm was refused. A refused arm leaves every deadline as it was, so the app
/// must not start (or keeps the earlier deadline it already has).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum DeadlineRefusal {
    #[error("the guard's name must not be empty")]
    EmptyGuard,
    #[error("the token is shorter than {MIN_TOKEN_BYTES} bytes")]
    ShortToken,
    #[error("{guard} armed its deadline with another token: only that guard may move or clear it")]
    WrongToken { guard: String },
    #[error(
        "this node cannot enforce a deadline: its watchdog does not fence (disabled, or failed)"
    )]
    CannotEnforce,
    #[error(
        "the deadline at {at_ms} ms (+{fence_delay:?}) is too close: the watchdog ({watchdog:?}) could not fence the node by then"
    )]
    TooClose {
        at_ms: u64,
        fence_delay: Duration,
        watchdog: Duration,
    },
    #[error("no deadline is armed for {guard}")]
    NotArmed { guard: String },
    #[error("too many guards on this node (at most {MAX_GUARDS})")]
    TooMany,
}

/// What the agent's loop must do about the deadlines at `now`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeadlineCheck {
    /// Feeding now could let the node run past a deadline: do not feed.
    pub withhold_feed: bool,
    /// Guards whose deadline has passed without a disarm: their apps may still write; the node
    /// is being fenced (and should stop its HA workloads now).
    pub overdue: Vec<String>,
}

/// The deadlines the guards of one node armed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDeadlines {
    entries: BTreeMap<String, Deadline>,
}

impl NodeDeadlines {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, guard: &str) -> Option<&Deadline> {
        self.entries.get(guard)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Deadline)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn check_token(&self, guard: &str, token: &[u8]) -> Result<TokenDigest, DeadlineRefusal> {
        if guard.trim().is_empty() {
            return Err(DeadlineRefusal::EmptyGuard);
        }
        let digest = TokenDigest::of(token).ok_or(DeadlineRefusal::ShortToken)?;
        match self.entries.get(guard) {
            Some(d) if d.token != digest => Err(DeadlineRefusal::WrongToken {
                guard: guard.to_string(),
            }),
            _ => Ok(digest),
        }
    }

    /// Arms (or moves) `guard`'s deadline. `enforceable`: the agent's watchdog fences this node.
    /// Refused when this node could not fence by `at + fence_delay` — then the table is left as
    /// it was and the guard must not start its app.
    #[allow(clippy::too_many_arguments)]
    pub fn arm(
        &mut self,
        guard: &str,
        token: &[u8],
        at: MonoTime,
        fence_delay: Duration,
        now: MonoTime,
        watchdog: Duration,
        enforceable: bool,
    ) -> Result<(), DeadlineRefusal> {
        let digest = self.check_token(guard, token)?;
        if !enforceable {
            return Err(DeadlineRefusal::CannotEnforce);
        }
        let deadline = Deadline {
            token: digest,
            at,
            fence_delay,
        };
        if deadline.last_feed(watchdog).is_none_or(|last| now > last) {
            return Err(DeadlineRefusal::TooClose {
                at_ms: at.as_millis(),
                fence_delay,
                watchdog,
            });
        }
        if !self.entries.contains_key(guard) && self.entries.len() >= MAX_GUARDS {
            return Err(DeadlineRefusal::TooMany);
        }
        self.entries.insert(guard.to_string(), deadline);
        Ok(())
    }

    /// The guard's app has stopped: forget its deadline. Only with the token that armed it.
    pub fn disarm(&mut self, guard: &str, token: &[u8]) -> Result<(), DeadlineRefusal> {
        self.check_token(guard, token)?;
        self.entries
            .remove(guard)
            .map(|_| ())
            .ok_or_else(|| DeadlineRefusal::NotArmed {
                guard: guard.to_string(),
            })
    }

    /// Whether the agent may feed a watchdog of timeout `watchdog` at `now`, and which
    /// deadlines have passed.
    pub fn check(&self, now: MonoTime, watchdog: Duration) -> DeadlineCheck {
        let mut out = DeadlineCheck::default();
        for (guard, d) in &self.entries {
            if d.last_feed(watchdog).is_none_or(|last| now > last) {
                out.withhold_feed = true;
            }
            if now >= d.at {
                out.overdue.push(guard.clone());
            }
        }
        out
    }
}

/// How an agent applies the deadlines to one step of its core — the shipped agent's loop and the
/// simulated agent both call it: no feed while a deadline says withhold; on the first step a
/// deadline is overdue, stop the HA workloads (the app may still write) and reboot the node at
/// once. The reboot costs nothing the watchdog would not take within `fence_delay` anyway, and it
/// does not rely on the watchdog: one that broke while the feeds were held back is not noticed
/// (nothing is written to it), and it would never fire (the simulation's random seed 2723: a
/// holder's guard froze, its node's watchdog broke a moment after the deadline passed, and the
/// app wrote on beside the standby that took the expired lease).
#[derive(Debug, Clone, Default)]
pub struct DeadlineEnforcer {
    overdue_handled: bool,
}

impl DeadlineEnforcer {
    /// Amends `step`; returns whether a deadline became overdue at this step.
    pub fn apply(&mut self, check: &DeadlineCheck, step: &mut crate::agent::AgentStep) -> bool {
        if check.withhold_feed {
            step.feed = false;
        }
        if check.overdue.is_empty() {
            self.overdue_handled = false;
            return false;
        }
        if std::mem::replace(&mut self.overdue_handled, true) {
            return false;
        }
        step.stop_workloads = true;
        step.reboot = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(5);
    const F: Duration = Duration::from_secs(1);
    const TOKEN: [u8; 32] = [7; 32];
    const OTHER: [u8; 32] = [9; 32];

    fn at(ms: u64) -> MonoTime {
        MonoTime(ms)
    }

    #[test]
    fn the_watchdog_is_fed_only_while_a_reset_would_still_land_by_the_deadline() {
        let mut d = NodeDeadlines::new();
        d.arm("pod-1", &TOKEN, at(10_000), F, at(0), W, true)
            .expect("armed");
        // Last feed at 10 s + 1 s − 5 s = 6 s: the reset then lands at 11 s at the latest.
        assert!(!d.check(at(6_000), W).withhold_feed);
        assert!(d.check(at(6_001), W).withhold_feed);
        assert!(d.check(at(9_999), W).overdue.is_empty());
        assert_eq!(d.check(at(10_000), W).overdue, vec!["pod-1".to_string()]);
        // A renewal moves it: feeding resumes (the watchdog had not fired yet).
        d.arm("pod-1", &TOKEN, at(16_000), F, at(7_000), W, true)
            .expect("moved");
        assert!(!d.check(at(7_000), W).withhold_feed);
        // Disarmed: nothing holds the feeds back.
        d.disarm("pod-1", &TOKEN).expect("disarmed");
        assert_eq!(d.check(at(100_000), W), DeadlineCheck::default());
    }

    #[test]
    fn only_the_guard_that_armed_a_deadline_can_move_or_clear_it() {
        let mut d = NodeDeadlines::new();
        d.arm("pod-1", &TOKEN, at(10_000), F, at(0), W, true)
            .expect("armed");
        assert_eq!(
            d.arm("pod-1", &OTHER, at(60_000), F, at(0), W, true),
            Err(DeadlineRefusal::WrongToken {
                guard: "pod-1".into()
            })
        );
        assert!(matches!(
            d.disarm("pod-1", &OTHER),
            Err(DeadlineRefusal::WrongToken { .. })
        ));
        assert_eq!(d.get("pod-1").map(|x| x.at), Some(at(10_000)));
        assert!(d.check(at(6_001), W).withhold_feed, "still enforced");
        assert_eq!(
            d.arm("pod-1", &TOKEN[..16], at(10_000), F, at(0), W, true),
            Err(DeadlineRefusal::ShortToken)
        );
        assert!(matches!(
            d.disarm("pod-2", &OTHER),
            Err(DeadlineRefusal::NotArmed { .. })
        ));
        assert_eq!(
            d.arm(" ", &TOKEN, at(10_000), F, at(0), W, true),
            Err(DeadlineRefusal::EmptyGuard)
        );
    }

    #[test]
    fn a_deadline_the_node_cannot_enforce_is_refused_and_changes_nothing() {
        let mut d = NodeDeadlines::new();
        assert_eq!(
            d.arm("pod-1", &TOKEN, at(10_000), F, at(0), W, false),
            Err(DeadlineRefusal::CannotEnforce)
        );
        assert!(d.is_empty());
        // 10 s + 1 s − 5 s = 6 s < now: a reset could not land in time.
        assert!(matches!(
            d.arm("pod-1", &TOKEN, at(10_000), F, at(6_500), W, true),
            Err(DeadlineRefusal::TooClose { .. })
        ));
        assert!(d.is_empty());
        // A refused move keeps the earlier deadline.
        d.arm("pod-1", &TOKEN, at(10_000), F, at(0), W, true)
            .expect("armed");
        assert!(
            d.arm("pod-1", &TOKEN, at(20_000), F, at(1_000), W, false)
                .is_err()
        );
        assert_eq!(d.get("pod-1").map(|x| x.at), Some(at(10_000)));
        // Too early on the clock to subtract the watchdog at all.
        assert!(matches!(
            NodeDeadlines::new().arm("p", &TOKEN, at(1_000), F, at(0), W, true),
            Err(DeadlineRefusal::TooClose { .. })
        ));
    }

    #[test]
    fn an_overdue_deadline_stops_the_workloads_and_reboots_the_node_once() {
        use crate::agent::AgentStep;
        let mut d = NodeDeadlines::new();
        d.arm("pod-1", &TOKEN, at(10_000), F, at(0), W, true)
            .expect("armed");
        let mut e = DeadlineEnforcer::default();
        let fed = || AgentStep {
            feed: true,
            ..AgentStep::default()
        };
        let mut s = fed();
        assert!(!e.apply(&d.check(at(5_000), W), &mut s));
        assert!(s.feed && !s.stop_workloads);
        let mut s = fed();
        assert!(!e.apply(&d.check(at(7_000), W), &mut s));
        assert!(!s.feed && !s.stop_workloads, "withheld, not yet overdue");
        // Overdue: stop and reboot, without relying on the watchdog.
        let mut s = fed();
        assert!(e.apply(&d.check(at(10_000), W), &mut s));
        assert!(!s.feed && s.stop_workloads && s.reboot);
        let mut s = fed();
        assert!(!e.apply(&d.check(at(10_200), W), &mut s), "once");
        assert!(!s.stop_workloads && !s.reboot && !s.feed);
    }

    #[test]
    fn registrations_are_bounded_and_digests_survive_a_round_trip() {
        let mut d = NodeDeadlines::new();
        for i in 0..MAX_GUARDS {
            d.arm(&format!("g{i}"), &TOKEN, at(60_000), F, at(0), W, true)
                .expect("armed");
        }
        assert_eq!(
            d.arm("one-more", &TOKEN, at(60_000), F, at(0), W, true),
            Err(DeadlineRefusal::TooMany)
        );
        let text = serde_json::to_string(&d).expect("json");
        let back: NodeDeadlines = serde_json::from_str(&text).expect("parsed");
        assert_eq!(back, d);
        assert!(!text.contains("[7,7"), "no token in the file: {text:.200}");
        assert!(serde_json::from_str::<TokenDigest>("\"zz\"").is_err());
    }
}
