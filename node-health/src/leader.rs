//! Leader election over a `coordination.k8s.io` Lease, as a state machine.
//!
//! The shell reads the Lease, calls [`LeaderElector::observe`], asks [`LeaderElector::decide`]
//! what to write, sends that write with the last-seen `resourceVersion` as a precondition, and
//! reports the outcome. Nothing here does IO, so the controller and the simulation run the same
//! election.
//!
//! Safety: a replica counts its leadership from the moment it *sent* its last successful write
//! (the server applied it no earlier), and gives it up `renew_deadline` later. A challenger takes
//! over only after it has seen the record unchanged for the lease duration stretched by the
//! drift bound. `renew_deadline` is validated to be shorter than the lease duration shrunk by
//! the same bound, so two replicas never both believe they lead.

use crate::time::{MonoTime, shrink, stretch};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderConfig {
    /// This replica's identity, written as `holderIdentity`.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    pub drift_ppm: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LeaderConfigError {
    #[error("leader identity must not be empty")]
    EmptyIdentity,
    #[error(
        "renew deadline {renew:?} must be shorter than the lease duration {lease:?} less the clock drift bound"
    )]
    RenewDeadlineTooLong { renew: Duration, lease: Duration },
    #[error("retry period {retry:?} must be shorter than the renew deadline {renew:?}")]
    RetryTooLong { retry: Duration, renew: Duration },
}

impl LeaderConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(identity: impl Into<String>) -> Self {
        LeaderConfig {
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            drift_ppm: crate::time::DEFAULT_DRIFT_PPM,
        }
    }

    pub fn validate(&self) -> Result<(), LeaderConfigError> {
        if self.identity.trim().is_empty() {
            return Err(LeaderConfigError::EmptyIdentity);
        }
        // The leader's slow clock may stretch its renew deadline; the challenger's fast clock
        // may shrink the lease. Shrinking twice covers both.
        if self.renew_deadline
            >= shrink(shrink(self.lease_duration, self.drift_ppm), self.drift_ppm)
        {
            return Err(LeaderConfigError::RenewDeadlineTooLong {
                renew: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(LeaderConfigError::RetryTooLong {
                retry: self.retry_period,
                renew: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// The parts of a Lease the election reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: Option<String>,
    /// `leaseTransitions`: the epoch of the current holder's term.
    pub transitions: u64,
    /// `leaseDurationSeconds` as the holder wrote it.
    pub duration: Duration,
    pub resource_version: String,
}

/// What to write to the Lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseWrite {
    pub holder: String,
    pub transitions: u64,
    pub duration: Duration,
    /// A new term begins (set `acquireTime`).
    pub acquire: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderAction {
    /// The Lease does not exist: create it.
    Create(LeaseWrite),
    /// Replace the Lease, precondition `resourceVersion == expected_rv`.
    Update {
        write: LeaseWrite,
        expected_rv: String,
    },
    /// Another replica holds a live lease.
    Wait,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    record: LeaseRecord,
    seen_at: MonoTime,
}

#[derive(Debug, Clone)]
pub struct LeaderElector {
    config: LeaderConfig,
    /// `None` before the first read; `Some(None)` when the Lease does not exist.
    observed: Option<Option<Observed>>,
    leading_until: Option<MonoTime>,
    epoch: Option<u64>,
}

impl LeaderElector {
    pub fn new(config: LeaderConfig) -> Result<Self, LeaderConfigError> {
        config.validate()?;
        Ok(LeaderElector {
            config,
            observed: None,
            leading_until: None,
            epoch: None,
        })
    }

    pub fn config(&self) -> &LeaderConfig {
        &self.config
    }

    /// Records what a read of the Lease returned (`None`: not found).
    pub fn observe(&mut self, record: Option<LeaseRecord>, now: MonoTime) {
        let next = match (record, self.observed.take().flatten()) {
            (None, _) => None,
            (Some(r), Some(o)) if o.record.resource_version == r.resource_version => Some(o),
            (Some(r), _) => Some(Observed {
                record: r,
                seen_at: now,
            }),
        };
        // Someone else's record means our term is over, whatever our deadline says.
        if let Some(o) = &next
            && o.record.holder.as_deref() != Some(self.config.identity.as_str())
        {
            self.leading_until = None;
        }
        self.observed = Some(next);
    }

    /// What to write now, given the last observation.
    pub fn decide(&self, now: MonoTime) -> LeaderAction {
        let me = &self.config.identity;
        let observed = match &self.observed {
            None => return LeaderAction::Wait,
            Some(None) => {
                return LeaderAction::Create(LeaseWrite {
                    holder: me.clone(),
                    transitions: 0,
                    duration: self.config.lease_duration,
                    acquire: true,
                });
            }
            Some(Some(o)) => o,
        };
        let r = &observed.record;
        let held_by_me = r.holder.as_deref() == Some(me.as_str());
        let free = r.holder.as_deref().is_none_or(|h| h.is_empty());
        let expiry = stretch(
            r.duration.max(self.config.lease_duration),
            self.config.drift_ppm,
        );
        let expired = now.since(observed.seen_at) > expiry;
        if !(held_by_me || free || expired) {
            return LeaderAction::Wait;
        }
        LeaderAction::Update {
            write: LeaseWrite {
                holder: me.clone(),
                transitions: if held_by_me {
                    r.transitions
                } else {
                    r.transitions.saturating_add(1)
                },
                duration: self.config.lease_duration,
                acquire: !held_by_me,
            },
            expected_rv: r.resource_version.clone(),
        }
    }

    /// The write that was sent at `sent_at` succeeded and the server answered with `record`.
    pub fn write_succeeded(&mut self, record: LeaseRecord, sent_at: MonoTime, now: MonoTime) {
        if record.holder.as_deref() == Some(self.config.identity.as_str()) {
            self.leading_until = Some(sent_at + self.config.renew_deadline);
            self.epoch = Some(record.transitions);
        }
        self.observed = Some(Some(Observed {
            record,
            seen_at: now,
        }));
    }

    /// The write was refused with a conflict (409): someone else wrote first. Forget the
    /// observation so the next round re-reads, and stop leading at once.
    pub fn write_conflicted(&mut self) {
        self.observed = None;
        self.leading_until = None;
    }

    /// The write failed without an answer (timeout, network): the term runs out on its own.
    pub fn write_failed(&mut self) {
        self.observed = None;
    }

    /// Whether this replica may act as leader at `now`.
    pub fn is_leader(&self, now: MonoTime) -> bool {
        self.leading_until.is_some_and(|until| now < until)
    }

    /// The epoch (`leaseTransitions`) of this replica's current or last term.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Forget everything (a process restart).
    pub fn reset(&mut self) {
        self.observed = None;
        self.leading_until = None;
        self.epoch = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(holder: Option<&str>, transitions: u64, rv: &str) -> LeaseRecord {
        LeaseRecord {
            holder: holder.map(str::to_string),
            transitions,
            duration: Duration::from_secs(15),
            resource_version: rv.into(),
        }
    }

    fn elector(id: &str) -> LeaderElector {
        LeaderElector::new(LeaderConfig::new(id)).expect("valid config")
    }

    #[test]
    fn creates_a_missing_lease_and_leads_after_success() {
        let mut e = elector("a");
        assert_eq!(
            e.decide(MonoTime(0)),
            LeaderAction::Wait,
            "nothing read yet"
        );
        e.observe(None, MonoTime(0));
        let LeaderAction::Create(w) = e.decide(MonoTime(0)) else {
            panic!("expected create");
        };
        assert_eq!((w.holder.as_str(), w.transitions), ("a", 0));
        assert!(!e.is_leader(MonoTime(1)));
        e.write_succeeded(rec(Some("a"), 0, "1"), MonoTime(0), MonoTime(50));
        assert!(e.is_leader(MonoTime(9_999)));
        assert!(
            !e.is_leader(MonoTime(10_000)),
            "term ends at the renew deadline"
        );
    }

    #[test]
    fn waits_for_a_live_holder_and_takes_over_after_stretched_duration() {
        let mut e = elector("b");
        e.observe(Some(rec(Some("a"), 3, "7")), MonoTime(1_000));
        assert_eq!(e.decide(MonoTime(16_000)), LeaderAction::Wait);
        // Re-reading the same record does not restart the clock.
        e.observe(Some(rec(Some("a"), 3, "7")), MonoTime(16_000));
        assert_eq!(
            e.decide(MonoTime(16_150)),
            LeaderAction::Wait,
            "15 s stretched by 1% is 15.15 s"
        );
        match e.decide(MonoTime(16_151)) {
            LeaderAction::Update { write, expected_rv } => {
                assert_eq!(write.transitions, 4, "a new term has a higher epoch");
                assert!(write.acquire);
                assert_eq!(expected_rv, "7");
            }
            other => panic!("expected update, got {other:?}"),
        }
    }

    #[test]
    fn a_renewal_by_the_holder_restarts_the_challengers_clock() {
        let mut e = elector("b");
        e.observe(Some(rec(Some("a"), 0, "1")), MonoTime(0));
        e.observe(Some(rec(Some("a"), 0, "2")), MonoTime(14_000));
        assert_eq!(e.decide(MonoTime(20_000)), LeaderAction::Wait);
    }

    #[test]
    fn conflict_ends_leadership_at_once() {
        let mut e = elector("a");
        e.observe(Some(rec(Some("a"), 1, "5")), MonoTime(0));
        e.write_succeeded(rec(Some("a"), 1, "6"), MonoTime(0), MonoTime(10));
        assert!(e.is_leader(MonoTime(100)));
        e.write_conflicted();
        assert!(!e.is_leader(MonoTime(100)));
        assert_eq!(e.decide(MonoTime(100)), LeaderAction::Wait, "re-read first");
    }

    #[test]
    fn seeing_another_holder_ends_leadership() {
        let mut e = elector("a");
        e.observe(Some(rec(Some("a"), 1, "5")), MonoTime(0));
        e.write_succeeded(rec(Some("a"), 1, "6"), MonoTime(0), MonoTime(10));
        e.observe(Some(rec(Some("b"), 2, "9")), MonoTime(20));
        assert!(!e.is_leader(MonoTime(30)));
    }

    #[test]
    fn refuses_unsafe_timing() {
        let mut c = LeaderConfig::new("a");
        c.renew_deadline = Duration::from_millis(14_800);
        assert!(matches!(
            c.validate(),
            Err(LeaderConfigError::RenewDeadlineTooLong { .. })
        ));
        let mut c = LeaderConfig::new("a");
        c.retry_period = Duration::from_secs(10);
        assert!(matches!(
            c.validate(),
            Err(LeaderConfigError::RetryTooLong { .. })
        ));
        assert_eq!(
            LeaderConfig::new(" ").validate(),
            Err(LeaderConfigError::EmptyIdentity)
        );
    }
}
