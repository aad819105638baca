//! Who decides that a node is dead: heartbeats judged on the observer's own clock.
//!
//! The observer (the controller) never compares a remote `renewTime` with its own clock. It
//! notes the moment *it* saw a heartbeat record change and counts from there, stretched by the
//! drift bound, so a Dead verdict means at least the lease duration of real time passed since
//! the node's last renewal reached the API server.

use crate::time::{MonoTime, stretch};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The timing the verdicts use. Defaults are the brief's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthTiming {
    /// How often the node agent renews its heartbeat Lease.
    pub agent_renew: Duration,
    /// The agent heartbeat Lease's duration: a node whose agent lease has not changed for this
    /// long (stretched by drift) is dead.
    pub agent_lease: Duration,
    /// The agent's watchdog timeout: the node reboots this long after the agent stops feeding.
    pub watchdog: Duration,
    /// Extra safety margin added to the fence deadline.
    pub fence_margin: Duration,
    /// The kubelet node Lease's duration (kubelet's default 40 s), used for nodes without agent.
    pub kubelet_lease: Duration,
    /// How long the agent waits for the API server to answer a renewal before counting it failed.
    pub request_timeout: Duration,
    /// How often the agent feeds its watchdog while it has the right to run.
    pub feed_interval: Duration,
    /// How often the agent asks its partner in the other room how it is.
    pub probe_interval: Duration,
    /// A partner vouches ("the API server is gone for me too") only after it has not renewed its
    /// own lease for this long.
    pub vouch_after_silence: Duration,
    /// How long one vouch lets an agent that cannot renew keep running.
    pub vouch_validity: Duration,
    /// A voucher counts as clear (it cannot be vouching) only while the observer sees its clean
    /// renewals arrive at most this far apart.
    pub clear_gap: Duration,
    /// Clock-rate drift bound, parts per million.
    pub drift_ppm: u64,
}

impl Default for HealthTiming {
    fn default() -> Self {
        HealthTiming {
            agent_renew: Duration::from_secs(2),
            agent_lease: Duration::from_secs(8),
            watchdog: Duration::from_secs(5),
            fence_margin: Duration::from_secs(2),
            kubelet_lease: Duration::from_secs(40),
            request_timeout: Duration::from_secs(2),
            feed_interval: Duration::from_secs(1),
            probe_interval: Duration::from_millis(500),
            vouch_after_silence: Duration::from_millis(4500),
            vouch_validity: Duration::from_secs(3),
            clear_gap: Duration::from_secs(3),
            drift_ppm: crate::time::DEFAULT_DRIFT_PPM,
        }
    }
}

/// A timing that would let the controller treat a running node as fenced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the renewal timeout ({timeout:?}) must not exceed the renew interval ({renew:?})")]
    TimeoutAboveRenew { timeout: Duration, renew: Duration },
    #[error(
        "a partner must stay silent ({silence:?}) longer than a renew interval plus the renewal timeout before it vouches"
    )]
    VouchTooEager { silence: Duration },
    #[error(
        "the clear gap ({gap:?}) must lie between the renew interval and the silence before a vouch"
    )]
    ClearGap { gap: Duration },
    #[error(
        "a vouch comes too late: a partner vouches after {silence:?} of silence, up to a renew \
         interval after the asker's last renewal, and the asker probes every {probe:?} (answers \
         within half of it); all of that must fit in the agent lease ({lease:?}) shrunk by drift"
    )]
    VouchTooLate {
        silence: Duration,
        probe: Duration,
        lease: Duration,
    },
    #[error("the agent lease ({lease:?}) must be longer than two renew intervals")]
    LeaseTooShort { lease: Duration },
    #[error("the watchdog ({watchdog:?}) must be fed at least twice per timeout")]
    FeedTooSlow { watchdog: Duration },
}

impl HealthTiming {
    /// Refuses timings under which the fencing argument in `docs/safety.md` does not hold.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.request_timeout > self.agent_renew {
            return Err(TimingError::TimeoutAboveRenew {
                timeout: self.request_timeout,
                renew: self.agent_renew,
            });
        }
        if self.vouch_after_silence <= self.agent_renew + self.request_timeout {
            return Err(TimingError::VouchTooEager {
                silence: self.vouch_after_silence,
            });
        }
        if self.clear_gap <= self.agent_renew || self.clear_gap >= self.vouch_after_silence {
            return Err(TimingError::ClearGap {
                gap: self.clear_gap,
            });
        }
        // S3: when the API server goes for both rooms, the partner's last renewal may be a renew
        // interval younger than the asker's; the asker must still get a vouch (its probe asked
        // and answered) before its own lease runs out, or the whole cluster stops.
        let vouch_by = self.vouch_after_silence + self.agent_renew + self.probe_interval * 3 / 2;
        if vouch_by >= crate::time::shrink(self.agent_lease, self.drift_ppm) {
            return Err(TimingError::VouchTooLate {
                silence: self.vouch_after_silence,
                probe: self.probe_interval,
                lease: self.agent_lease,
            });
        }
        if self.agent_lease <= self.agent_renew * 2 {
            return Err(TimingError::LeaseTooShort {
                lease: self.agent_lease,
            });
        }
        if self.feed_interval * 2 > self.watchdog {
            return Err(TimingError::FeedTooSlow {
                watchdog: self.watchdog,
            });
        }
        Ok(())
    }

    /// A node is suspect after missing two renewals of its agent lease.
    pub fn agent_suspect_after(&self) -> Duration {
        self.agent_renew * 2
    }
}

/// When the observer last saw one heartbeat record change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// What identifies a renewal (the Lease's `resourceVersion` or `renewTime` as a string).
    pub fingerprint: String,
    /// The observer's clock when it first saw this fingerprint.
    pub seen_at: MonoTime,
}

impl Heartbeat {
    /// Records an observation: the clock restarts only when the record really changed.
    pub fn observe(slot: &mut Option<Heartbeat>, fingerprint: &str, now: MonoTime) {
        match slot {
            Some(h) if h.fingerprint == fingerprint => {}
            _ => {
                *slot = Some(Heartbeat {
                    fingerprint: fingerprint.to_string(),
                    seen_at: now,
                })
            }
        }
    }
}

/// The node's Ready condition as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readiness {
    True,
    False,
    Unknown,
}

/// Everything the observer knows of one node's health.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeObservation {
    /// The twosite agent's heartbeat Lease; `None` if the node has never had one.
    pub agent: Option<Heartbeat>,
    /// The kubelet's node Lease in `kube-node-lease`.
    pub kubelet: Option<Heartbeat>,
    /// The Ready condition; `None` if the node has no such condition yet.
    pub ready: Option<Readiness>,
    /// Since when (observer's clock) this node's agent has renewed cleanly — no failed renewal
    /// before any of them — with changes seen at most `clear_gap` apart. A node that is clear
    /// cannot be vouching for its partner. `None`: not clear.
    pub clear_since: Option<MonoTime>,
}

impl NodeObservation {
    /// Records one observation of the agent's heartbeat Lease. `clean`: the agent wrote that no
    /// renewal failed before this one.
    pub fn observe_agent(
        &mut self,
        fingerprint: &str,
        clean: bool,
        now: MonoTime,
        t: &HealthTiming,
    ) {
        let prev = self
            .agent
            .as_ref()
            .map(|h| (h.fingerprint.clone(), h.seen_at));
        if prev.as_ref().is_some_and(|(f, _)| f == fingerprint) {
            return;
        }
        Heartbeat::observe(&mut self.agent, fingerprint, now);
        self.clear_since = match (clean, self.clear_since, prev) {
            (false, _, _) => None,
            (true, Some(since), Some((_, seen))) if now.since(seen) <= t.clear_gap => Some(since),
            (true, _, _) => Some(now),
        };
    }

    /// Since when this node has been clear, if it is clear at `now`.
    pub fn clear_at(&self, now: MonoTime, t: &HealthTiming) -> Option<MonoTime> {
        let seen = self.agent.as_ref()?.seen_at;
        if now.since(seen) > t.clear_gap {
            return None;
        }
        self.clear_since
    }
}

/// Why a node is suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SuspectReason {
    /// The agent lease missed renewals but has not yet expired.
    AgentLate,
    /// The Ready condition is False or Unknown.
    NotReady,
    /// No agent heartbeat; the kubelet lease is late.
    KubeletLate,
    /// The observer's own watch is not synced (disconnected, or re-listing): it cannot tell a
    /// silent node from a blind observer, so it never judges a node dead meanwhile.
    ObserverStale,
}

/// The verdict on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeVerdict {
    Healthy,
    Suspect(SuspectReason),
    /// The node's heartbeats have expired. `fence_deadline` is when, on the observer's clock,
    /// the node is sure to have stopped (its watchdog fired); `None` when the node has no agent
    /// and so nothing makes it stop by itself: it is never treated as fenced by time.
    Dead {
        fence_deadline: Option<MonoTime>,
    },
}

impl NodeVerdict {
    pub fn is_dead(&self) -> bool {
        matches!(self, NodeVerdict::Dead { .. })
    }

    /// A short name for status, metrics and timelines.
    pub fn name(&self) -> &'static str {
        match self {
            NodeVerdict::Healthy => "Healthy",
            NodeVerdict::Suspect(_) => "Suspect",
            NodeVerdict::Dead {
                fence_deadline: Some(_),
            } => "Dead",
            NodeVerdict::Dead {
                fence_deadline: None,
            } => "DeadNoAgent",
        }
    }
}

/// Judges one node at `now` (the observer's clock). `synced` says the observer's watch is live
/// and has delivered a full list since it last broke: a silence seen through a broken watch
/// proves nothing, so without it no node is judged dead.
///
/// With an agent, its lease alone decides death: the agent's watchdog guarantees that a node
/// whose agent stopped renewing reboots, so a running kubelet does not keep it alive. Without an
/// agent the kubelet lease is judged, but the node is never given a fence deadline.
pub fn judge(obs: &NodeObservation, now: MonoTime, t: &HealthTiming, synced: bool) -> NodeVerdict {
    match judge_seen(obs, now, t) {
        NodeVerdict::Dead { .. } if !synced => NodeVerdict::Suspect(SuspectReason::ObserverStale),
        v => v,
    }
}

fn judge_seen(obs: &NodeObservation, now: MonoTime, t: &HealthTiming) -> NodeVerdict {
    let not_ready = matches!(obs.ready, Some(Readiness::False | Readiness::Unknown));
    if let Some(agent) = &obs.agent {
        let silent = now.since(agent.seen_at);
        if silent > stretch(t.agent_lease, t.drift_ppm) {
            let deadline =
                agent.seen_at + stretch(t.agent_lease + t.watchdog + t.fence_margin, t.drift_ppm);
            return NodeVerdict::Dead {
                fence_deadline: Some(deadline),
            };
        }
        if silent > t.agent_suspect_after() {
            return NodeVerdict::Suspect(SuspectReason::AgentLate);
        }
        if not_ready {
            return NodeVerdict::Suspect(SuspectReason::NotReady);
        }
        return NodeVerdict::Healthy;
    }
    match &obs.kubelet {
        Some(k) if now.since(k.seen_at) > stretch(t.kubelet_lease, t.drift_ppm) => {
            NodeVerdict::Dead {
                fence_deadline: None,
            }
        }
        _ if not_ready => NodeVerdict::Suspect(SuspectReason::NotReady),
        Some(k) if now.since(k.seen_at) > t.kubelet_lease / 2 => {
            NodeVerdict::Suspect(SuspectReason::KubeletLate)
        }
        _ => NodeVerdict::Healthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> MonoTime {
        MonoTime(ms)
    }

    fn with_agent(seen_ms: u64) -> NodeObservation {
        NodeObservation {
            agent: Some(Heartbeat {
                fingerprint: "1".into(),
                seen_at: at(seen_ms),
            }),
            kubelet: Some(Heartbeat {
                fingerprint: "k".into(),
                seen_at: at(seen_ms),
            }),
            ready: Some(Readiness::True),
            clear_since: None,
        }
    }

    #[test]
    fn agent_lease_decides_with_drift_margin() {
        let t = HealthTiming::default();
        let obs = with_agent(1_000);
        assert_eq!(judge(&obs, at(3_000), &t, true), NodeVerdict::Healthy);
        assert_eq!(
            judge(&obs, at(5_001), &t, true),
            NodeVerdict::Suspect(SuspectReason::AgentLate)
        );
        // 8 s lease stretched by 1% is 8.08 s: not dead at exactly 9.08 s after t=1 s.
        assert!(!judge(&obs, at(9_080), &t, true).is_dead());
        assert_eq!(
            judge(&obs, at(9_081), &t, true),
            NodeVerdict::Dead {
                // 8 + 5 + 2 = 15 s, stretched: 15.15 s after the last change seen.
                fence_deadline: Some(at(16_150))
            }
        );
    }

    #[test]
    fn unchanged_fingerprint_does_not_restart_the_clock() {
        let mut slot = None;
        Heartbeat::observe(&mut slot, "rv1", at(10));
        Heartbeat::observe(&mut slot, "rv1", at(500));
        assert_eq!(slot.as_ref().map(|h| h.seen_at), Some(at(10)));
        Heartbeat::observe(&mut slot, "rv2", at(600));
        assert_eq!(slot.as_ref().map(|h| h.seen_at), Some(at(600)));
    }

    #[test]
    fn a_running_kubelet_does_not_save_a_node_whose_agent_stopped() {
        let t = HealthTiming::default();
        let mut obs = with_agent(0);
        obs.kubelet = Some(Heartbeat {
            fingerprint: "k2".into(),
            seen_at: at(20_000),
        });
        assert!(judge(&obs, at(20_000), &t, true).is_dead());
    }

    #[test]
    fn a_blind_observer_never_judges_dead() {
        let t = HealthTiming::default();
        let obs = with_agent(0);
        assert_eq!(
            judge(&obs, at(60_000), &t, false),
            NodeVerdict::Suspect(SuspectReason::ObserverStale)
        );
        assert_eq!(judge(&obs, at(3_000), &t, false), NodeVerdict::Healthy);
    }

    #[test]
    fn clear_needs_clean_renewals_close_together() {
        let t = HealthTiming::default();
        let mut obs = NodeObservation::default();
        obs.observe_agent("1", true, at(0), &t);
        assert_eq!(obs.clear_at(at(1_000), &t), Some(at(0)));
        obs.observe_agent("2", true, at(2_000), &t);
        obs.observe_agent("2", true, at(2_500), &t);
        assert_eq!(obs.clear_at(at(4_000), &t), Some(at(0)));
        assert_eq!(
            obs.clear_at(at(5_001), &t),
            None,
            "silent for more than the gap"
        );
        // A renewal after a gap starts a new clear stretch.
        obs.observe_agent("3", true, at(9_000), &t);
        assert_eq!(obs.clear_at(at(9_000), &t), Some(at(9_000)));
        // A renewal that followed a failure: the node may have vouched meanwhile.
        obs.observe_agent("4", false, at(11_000), &t);
        assert_eq!(obs.clear_at(at(11_000), &t), None);
        obs.observe_agent("5", true, at(13_000), &t);
        assert_eq!(obs.clear_at(at(13_000), &t), Some(at(13_000)));
    }

    #[test]
    fn default_timing_is_valid_and_bad_timing_is_refused() {
        assert_eq!(HealthTiming::default().validate(), Ok(()));
        let bad = HealthTiming {
            vouch_after_silence: Duration::from_secs(3),
            ..HealthTiming::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(TimingError::VouchTooEager { .. })
        ));
        // The defaults before the real agents showed it: a cluster-wide API outage could stop a
        // node whose last renewal was a renew interval older than its partner's.
        let bad = HealthTiming {
            probe_interval: Duration::from_secs(1),
            vouch_after_silence: Duration::from_secs(5),
            ..HealthTiming::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(TimingError::VouchTooLate { .. })
        ));
        let bad = HealthTiming {
            clear_gap: Duration::from_secs(6),
            ..HealthTiming::default()
        };
        assert!(matches!(bad.validate(), Err(TimingError::ClearGap { .. })));
    }

    #[test]
    fn not_ready_with_live_agent_is_suspect_not_dead() {
        let t = HealthTiming::default();
        let mut obs = with_agent(0);
        obs.ready = Some(Readiness::Unknown);
        assert_eq!(
            judge(&obs, at(1_000), &t, true),
            NodeVerdict::Suspect(SuspectReason::NotReady)
        );
    }

    #[test]
    fn a_node_without_agent_is_dead_but_never_fenced_by_time() {
        let t = HealthTiming::default();
        let obs = NodeObservation {
            agent: None,
            kubelet: Some(Heartbeat {
                fingerprint: "k".into(),
                seen_at: at(0),
            }),
            ready: Some(Readiness::True),
            clear_since: None,
        };
        assert_eq!(judge(&obs, at(10_000), &t, true), NodeVerdict::Healthy);
        assert_eq!(
            judge(&obs, at(25_000), &t, true),
            NodeVerdict::Suspect(SuspectReason::KubeletLate)
        );
        assert_eq!(
            judge(&obs, at(40_401), &t, true),
            NodeVerdict::Dead {
                fence_deadline: None
            }
        );
        assert_eq!(
            judge(
                &NodeObservation {
                    agent: None,
                    kubelet: None,
                    ready: Some(Readiness::Unknown),
                    clear_since: None,
                },
                at(0),
                &t,
                true
            ),
            NodeVerdict::Suspect(SuspectReason::NotReady)
        );
    }
}
