//! The node agent's decisions: may this node keep running its HA workloads, must it stop them,
//! and may it feed the watchdog.
//!
//! The node has the right to run while it has renewed its heartbeat Lease within the lease
//! duration (shrunk by the drift bound, counted from when the renewal was *sent*), or while its
//! partner in the other room vouches that the API server is gone for it too (a whole-cluster API
//! outage must stop nothing: invariant S3). Same-room peers never vouch. Once the right is lost
//! it stays lost until the node reboots: the agent stops the HA workloads and stops feeding the
//! watchdog, which reboots the node. The controller's fence deadline relies on exactly that.
//!
//! With a witness configured, a room that has lost contact with the other room (no partner
//! answer and no fresh heartbeat of the other room for `vouch_after_silence`) may run only
//! while the witness grants it the right: the loser of a partition stops even if it still
//! reaches the API server, and the controller fences only while it holds the grant for the
//! opposite room.
//!
//! When the controller fences a node it first writes a fence marker onto the node's heartbeat
//! Lease, conditional on the resourceVersion it judged dead. An agent that sees the marker on
//! its Lease never gains (or keeps) the right to run until the controller clears it, so a node
//! that boots just as the controller fences it cannot restart the workloads being released.
//!
//! An agent process that restarts within one boot (a rolling update, a crash) hands over to the
//! next through [`AgentCore::handover`] and [`AgentCore::resume`]: the new process inherits the
//! old one's evidence and latched state, never more, so the right to run it inherits ends no
//! later than it would have for the old process unless the new one renews (or is vouched for,
//! or granted) itself.

mod probes;

use crate::time::{MonoTime, shrink};
use crate::verdict::HealthTiming;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How often an agent claims at the witness while it needs it: a grant renewed twice a second
/// is in hand well before the contact timeout.
pub const CLAIM_EVERY: Duration = Duration::from_millis(500);

/// What a peer agent answers to a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// The answering node.
    pub node: String,
    /// The answering node's room (zone).
    pub room: String,
    /// The answering node's partner, as it sees the pairing.
    pub partner: Option<String>,
    /// It renewed its own heartbeat Lease recently.
    pub api_reachable: bool,
    /// It has the right to run.
    pub has_right: bool,
}

/// Why the node may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunBasis {
    /// It renewed its heartbeat Lease recently.
    Lease,
    /// Its partner in the other room vouched that the API server is gone for both.
    Vouched { by: String },
    /// The rooms lost each other and the witness granted this room the right to run.
    Witness { epoch: u64 },
}

/// Why the node lost the right to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossReason {
    /// No renewal within the lease duration and no valid vouch.
    LeaseExpired,
    /// The controller's fence marker appeared on the heartbeat Lease.
    FenceMarker,
    /// The rooms lost each other and the witness did not grant this room the right to run.
    NoWitnessGrant,
}

/// What the agent must do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStep {
    /// Feed the watchdog now.
    pub feed: bool,
    /// Stop the node's HA workloads now (once, when the right is lost).
    pub stop_workloads: bool,
    /// The right was lost at this step (or, on the first step after [`AgentCore::resume`], had
    /// been lost by the previous agent process of this boot).
    pub lost: Option<LossReason>,
    /// Open (arm) the watchdog now: the right was gained for the first time since boot at this
    /// step, or, after [`AgentCore::resume`], the previous process had armed it and its right
    /// still holds.
    pub armed: bool,
    /// Reboot the node now, after stopping the workloads: the right is lost and the watchdog
    /// that should reboot it is broken. The controller may have seen it `enabled` and will
    /// treat the node as fenced after the fence deadline, so the agent must fence it itself.
    pub reboot: bool,
}

/// The agent's state, from boot to reboot.
#[derive(Debug, Clone)]
pub struct AgentCore {
    node: String,
    room: String,
    partner: Option<String>,
    timing: HealthTiming,
    last_renewal: Option<MonoTime>,
    last_vouch: Option<(MonoTime, String)>,
    armed: bool,
    lost: Option<LossReason>,
    last_feed: Option<MonoTime>,
    consecutive_failures: u32,
    fence_marker: bool,
    witness: bool,
    /// Last evidence (agent's clock) that the other room is alive and in contact.
    other_room_seen: Option<MonoTime>,
    /// Real evidence has been seen since boot (not only the benefit of the doubt at arming).
    other_room_heard: bool,
    /// The witness grant for this room: its epoch and until when it lasts (agent's clock).
    grant: Option<(u64, MonoTime)>,
    /// The watchdog could not be armed or fed: it may never reboot this node.
    watchdog_failed: bool,
    /// Resumed armed: the next step opens the watchdog again (without a new benefit of the doubt
    /// for the other room: the previous process had it already).
    arm_pending: bool,
    /// Resumed a loss: the next step repeats the stop (and the direct reboot when the watchdog
    /// is broken), which the previous process may not have finished.
    loss_pending: bool,
    /// The partner probes' outstanding and answered nonces.
    probes: probes::ProbeBook,
}

/// What an agent process leaves to the next agent process of the same boot: its evidence and
/// latched state, with instants on its own clock ([`AgentCore::handover`]). Vouches are not in
/// it: the next process must earn its own.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Handover {
    /// When the last successful renewal was sent.
    pub last_renewal: Option<MonoTime>,
    /// The watchdog was armed (by this process, or inherited armed).
    pub armed: bool,
    /// The right to run was lost (latched until reboot), and why.
    pub lost: Option<LossReason>,
    /// The controller's fence marker was on the heartbeat Lease at the last read.
    pub fence_marker: bool,
    /// The watchdog could not be armed or fed.
    pub watchdog_failed: bool,
    /// Failed renewals since the last successful one.
    pub renew_failures: u32,
    /// Last evidence that the other room is alive and in contact.
    pub other_room_seen: Option<MonoTime>,
    /// Real evidence of the other room has been seen.
    pub other_room_heard: bool,
    /// The witness grant for this room: its epoch and until when it lasts.
    pub grant: Option<(u64, MonoTime)>,
}

impl Handover {
    /// The same, with every instant expressed relative to `now` on the clock it was taken on.
    pub fn at(&self, now: MonoTime) -> ResumeState {
        ResumeState {
            renewed_ago: self.last_renewal.map(|t| now.since(t)),
            armed: self.armed,
            lost: self.lost.clone(),
            fence_marker: self.fence_marker,
            watchdog_failed: self.watchdog_failed,
            renew_failures: self.renew_failures,
            other_room_seen_ago: self.other_room_seen.map(|t| now.since(t)),
            other_room_heard: self.other_room_heard,
            grant: self
                .grant
                .and_then(|(epoch, until)| (until > now).then(|| (epoch, until.since(now)))),
        }
    }
}

/// A [`Handover`] as the next process sees it when it starts: instants as time elapsed since
/// them (or left until them) on a clock that counts across processes (the boot clock).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResumeState {
    /// How long ago the last successful renewal was sent.
    pub renewed_ago: Option<Duration>,
    pub armed: bool,
    pub lost: Option<LossReason>,
    pub fence_marker: bool,
    pub watchdog_failed: bool,
    pub renew_failures: u32,
    /// How long ago the other room was last seen alive and in contact.
    pub other_room_seen_ago: Option<Duration>,
    pub other_room_heard: bool,
    /// The witness grant's epoch and how long it still lasts.
    pub grant: Option<(u64, Duration)>,
}

/// What [`AgentCore::resume`] made of the previous process's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// The previous process had armed the watchdog and its right to run still holds: the next
    /// step arms and feeds, until that right runs out unless this process renews.
    Running(RunBasis),
    /// The previous process had lost the right to run: it stays lost until reboot, the
    /// watchdog is never fed; the next step repeats the stop.
    Lost(LossReason),
    /// The previous process had armed the watchdog but its right to run has run out (or a fence
    /// marker was seen): not armed; the watchdog it armed fires unless this process arms again
    /// after its own renewal, like a new agent.
    Expired,
    /// The previous process had not armed the watchdog: this one starts like a new agent, with
    /// the previous one's evidence.
    NotArmed,
}

/// `now - ago`, rounded to the earlier millisecond; `None` when that is before this clock's
/// origin (too long ago to place, which is also too long ago to grant anything).
fn earlier_by(now: MonoTime, ago: Duration) -> Option<MonoTime> {
    let ago_ms = u64::try_from(ago.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    now.0.checked_sub(ago_ms).map(MonoTime)
}

impl AgentCore {
    pub fn new(node: impl Into<String>, room: impl Into<String>, timing: HealthTiming) -> Self {
        AgentCore {
            node: node.into(),
            room: room.into(),
            partner: None,
            timing,
            last_renewal: None,
            last_vouch: None,
            armed: false,
            lost: None,
            last_feed: None,
            consecutive_failures: 0,
            fence_marker: false,
            witness: false,
            other_room_seen: None,
            other_room_heard: false,
            grant: None,
            watchdog_failed: false,
            arm_pending: false,
            loss_pending: false,
            probes: probes::ProbeBook::default(),
        }
    }

    /// What this process leaves to the next agent process of this boot (see [`Handover`]).
    pub fn handover(&self) -> Handover {
        Handover {
            last_renewal: self.last_renewal,
            armed: self.armed,
            lost: self.lost.clone(),
            fence_marker: self.fence_marker,
            watchdog_failed: self.watchdog_failed,
            renew_failures: self.consecutive_failures,
            other_room_seen: self.other_room_seen,
            other_room_heard: self.other_room_heard,
            grant: self.grant,
        }
    }

    /// Takes over from the previous agent process of this boot, on a new core at `now` (after
    /// [`set_witness_configured`](Self::set_witness_configured), before the first step).
    ///
    /// Every inherited instant is placed on this core's clock rounded to the earlier
    /// millisecond (and a grant's end to the earlier one too), so the inherited right ends no
    /// later than it would have for the previous process: the controller's fence deadline
    /// counts from the last renewal it saw, whichever process sent it. Vouches are not
    /// inherited.
    pub fn resume(&mut self, previous: &ResumeState, now: MonoTime) -> Resumed {
        self.last_renewal = previous.renewed_ago.and_then(|ago| earlier_by(now, ago));
        self.fence_marker = previous.fence_marker;
        self.watchdog_failed = self.watchdog_failed || previous.watchdog_failed;
        // The restart counts as a failed renewal: this process may answer probes (and vouch for
        // its partner) before it first renews, so that renewal must not look clean.
        self.consecutive_failures = previous.renew_failures.saturating_add(1);
        self.other_room_seen = previous
            .other_room_seen_ago
            .and_then(|ago| earlier_by(now, ago));
        self.other_room_heard = previous.other_room_heard;
        self.grant = previous.grant.and_then(|(epoch, left)| {
            let until = now + Duration::from_millis(u64::try_from(left.as_millis()).ok()?);
            (until > now).then_some((epoch, until))
        });
        self.last_vouch = None;
        if let Some(why) = &previous.lost {
            self.armed = true;
            self.lost = Some(why.clone());
            self.loss_pending = true;
            return Resumed::Lost(why.clone());
        }
        if !previous.armed {
            return Resumed::NotArmed;
        }
        self.armed = true;
        match self.right_to_run(now) {
            Some(basis) => {
                self.arm_pending = true;
                Resumed::Running(basis)
            }
            None => {
                // The previous process would lose the right at its next step. Its evidence must
                // not arm this one (with a witness, a lease that still holds may not be enough):
                // only this process's own renewal may.
                self.armed = false;
                self.last_renewal = None;
                self.grant = None;
                Resumed::Expired
            }
        }
    }

    /// The watchdog could not be armed or fed. Latched until the agent restarts: the heartbeat
    /// reports it (the controller then never treats the node as fenced by time), and losing
    /// the right to run reboots the node directly ([`AgentStep::reboot`]).
    pub fn watchdog_failed(&mut self) {
        self.watchdog_failed = true;
    }

    pub fn is_watchdog_failed(&self) -> bool {
        self.watchdog_failed
    }

    /// A witness is configured: losing contact with the other room needs its grant.
    pub fn set_witness_configured(&mut self, configured: bool) {
        self.witness = configured;
    }

    /// Evidence at `at` that the other room is alive and in contact: a probe answer from a node
    /// of the other room that has the right to run, or a heartbeat of the other room that this
    /// agent saw change.
    pub fn observe_other_room(&mut self, at: MonoTime) {
        self.other_room_heard = true;
        if self.other_room_seen.is_none_or(|t| t < at) {
            self.other_room_seen = Some(at);
        }
    }

    /// The rooms are in contact at `now`: the other room was heard from within an agent lease.
    /// (The controller's proof never relies on this timeout: it holds the witness grant for the
    /// other room, so this room cannot hold one.)
    pub fn rooms_in_contact(&self, now: MonoTime) -> bool {
        self.other_room_seen
            .is_some_and(|t| now.since(t) <= self.timing.agent_lease)
    }

    /// Whether the agent should claim its room's right at the witness now (and keep claiming,
    /// to renew a grant, while it needs it), or, before it has heard from the other room since
    /// boot, ask to join its room's grant ([`Self::witness_claim`] says which).
    pub fn needs_witness(&self, now: MonoTime) -> bool {
        // Ask well before the contact timeout, so a grant is in hand when it is needed.
        // With a partner, its probe answers arrive every probe interval (three missed: 1.5 s);
        // without one, only the other room's heartbeats read through the API server tell,
        // every renew interval or two. Before the other room is first heard from, its silence
        // counts from arming (the benefit of the doubt).
        let claim_after = if self.partner.is_some() {
            self.timing.probe_interval * 3
        } else {
            self.timing.agent_renew * 2 + self.timing.probe_interval / 2
        };
        self.witness
            && self.armed
            && self.lost.is_none()
            && self
                .other_room_seen
                .is_none_or(|t| now.since(t) > claim_after)
    }

    /// What to send the witness now, if [`Self::needs_witness`]. The agent sends one every
    /// [`CLAIM_EVERY`] while it needs the witness.
    ///
    /// A node that has heard from the other room since boot claims its room's right (a fresh
    /// claim, `epoch: None`). One that has not (its partner and the other room's heartbeats not
    /// known yet: both may be booting) only asks to join the grant its room already holds
    /// (`join`): a grant of its own could block the other room, which may be the one that needs
    /// it, while a join never creates a grant. After both rooms' nodes were reset together,
    /// that keeps a booting node running on its controller's grant instead of resetting again
    /// at the contact timeout; without a live grant of its room it still stops then.
    ///
    /// The claim says the room reaches the API server (which wins a tie at the witness) only
    /// if a renewal sent *after* the other room was last heard from succeeded, recently. A
    /// renewal from before the silence proves nothing about the partition that caused it:
    /// right after a cut, the room that lost the API server still has a fresh renewal, and
    /// would outrank the room that kept it.
    pub fn witness_claim(&self, now: MonoTime) -> Option<crate::witness::ClaimRequest> {
        if !self.needs_witness(now) {
            return None;
        }
        let api_reachable = self.last_renewal.is_some_and(|r| {
            now.since(r) <= self.timing.vouch_after_silence
                && self.other_room_seen.is_none_or(|seen| r > seen)
        });
        Some(crate::witness::ClaimRequest {
            claim: crate::witness::Claim {
                room: self.room.clone(),
                epoch: None,
                api_reachable,
            },
            join: !self.other_room_heard,
        })
    }

    /// The witness answered a claim (or a join) sent at `sent_at`: granted for `valid_for` with
    /// `epoch`. The grant counts from when it was sent, shrunk by the drift bound.
    pub fn witness_granted(
        &mut self,
        sent_at: MonoTime,
        epoch: u64,
        valid_for: std::time::Duration,
    ) {
        let until = sent_at + shrink(valid_for, self.timing.drift_ppm);
        if self
            .grant
            .is_none_or(|(e, u)| e < epoch || (e == epoch && u < until))
        {
            self.grant = Some((epoch, until));
        }
    }

    fn grant_valid(&self, now: MonoTime) -> Option<u64> {
        self.grant.filter(|(_, until)| now < *until).map(|(e, _)| e)
    }

    /// The partner in the other room, as the latest pairing says.
    pub fn set_partner(&mut self, partner: Option<String>) {
        self.partner = partner;
    }

    pub fn partner(&self) -> Option<&str> {
        self.partner.as_deref()
    }

    /// A renewal sent at `sent_at` was answered with success.
    pub fn renewal_succeeded(&mut self, sent_at: MonoTime) {
        if self.last_renewal.is_none_or(|t| t < sent_at) {
            self.last_renewal = Some(sent_at);
        }
        self.consecutive_failures = 0;
    }

    /// What the last successful read of the heartbeat Lease said about the controller's fence
    /// marker. While it is present the node has no right to run.
    pub fn observe_fence_marker(&mut self, present: bool) {
        self.fence_marker = present;
    }

    pub fn fence_marker(&self) -> bool {
        self.fence_marker
    }

    /// A renewal failed or timed out: it may or may not have reached the API server.
    pub fn renewal_failed(&mut self) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
    }

    /// Consecutive failed renewals before the next one; written into the heartbeat Lease so the
    /// controller can tell a clean renewal from one that followed a failure (during which this
    /// node may have vouched for its partner).
    pub fn failures_before_next_renewal(&self) -> u32 {
        self.consecutive_failures
    }

    /// A probe sent at `sent_at` to a peer was answered (and the answer verified:
    /// [`AgentCore::partner_answered`]). Only the partner in the other room, when
    /// it sees this node as its partner too, cannot reach the API server either, and itself may
    /// run, vouches.
    pub(crate) fn peer_answered(&mut self, sent_at: MonoTime, report: &PeerReport) {
        let vouches = self.partner.as_deref() == Some(report.node.as_str())
            && report.room != self.room
            && report.partner.as_deref() == Some(self.node.as_str())
            && !report.api_reachable
            && report.has_right;
        if vouches && self.last_vouch.as_ref().is_none_or(|(t, _)| *t < sent_at) {
            self.last_vouch = Some((sent_at, report.node.clone()));
        }
    }

    /// Why the node may run at `now`, or `None`.
    pub fn right_to_run(&self, now: MonoTime) -> Option<RunBasis> {
        if self.lost.is_some() || self.fence_marker {
            return None;
        }
        let t = &self.timing;
        if self.witness && self.armed && !self.rooms_in_contact(now) {
            // The rooms lost each other: only the witness's grant lets this room go on.
            return self
                .grant_valid(now)
                .map(|epoch| RunBasis::Witness { epoch });
        }
        if self
            .last_renewal
            .is_some_and(|r| now < r + shrink(t.agent_lease, t.drift_ppm))
        {
            return Some(RunBasis::Lease);
        }
        // A vouch keeps an armed node running; it never admits a node that has not yet renewed
        // since boot.
        match &self.last_vouch {
            Some((v, by)) if self.armed && now < *v + shrink(t.vouch_validity, t.drift_ppm) => {
                Some(RunBasis::Vouched { by: by.clone() })
            }
            _ if self.armed => self
                .grant_valid(now)
                .map(|epoch| RunBasis::Witness { epoch }),
            _ => None,
        }
    }

    /// What this agent answers to a probe at `now`.
    pub fn report(&self, now: MonoTime) -> PeerReport {
        PeerReport {
            node: self.node.clone(),
            room: self.room.clone(),
            partner: self.partner.clone(),
            api_reachable: self
                .last_renewal
                .is_some_and(|r| now.since(r) <= self.timing.vouch_after_silence),
            has_right: self.right_to_run(now).is_some(),
        }
    }

    /// When the last successful renewal was sent (agent's clock).
    pub fn last_renewal(&self) -> Option<MonoTime> {
        self.last_renewal
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    pub fn timing(&self) -> &HealthTiming {
        &self.timing
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Advances the agent to `now`: feed the watchdog while the node may run; on losing the
    /// right, stop the workloads and never feed again.
    pub fn tick(&mut self, now: MonoTime) -> AgentStep {
        let mut step = AgentStep::default();
        if let Some(why) = &self.lost {
            if std::mem::take(&mut self.loss_pending) {
                step.lost = Some(why.clone());
                step.stop_workloads = true;
                step.reboot = self.watchdog_failed;
            }
            return step;
        }
        match self.right_to_run(now) {
            Some(_) => {
                if !self.armed {
                    self.armed = true;
                    step.armed = true;
                    // Give the other room the benefit of the doubt for one contact timeout.
                    self.other_room_seen = Some(now);
                } else if std::mem::take(&mut self.arm_pending) {
                    step.armed = true;
                }
                if self
                    .last_feed
                    .is_none_or(|f| now.since(f) >= self.timing.feed_interval)
                {
                    self.last_feed = Some(now);
                    step.feed = true;
                }
            }
            None if self.armed => {
                let why = if self.fence_marker {
                    LossReason::FenceMarker
                } else if self.witness && !self.rooms_in_contact(now) {
                    LossReason::NoWitnessGrant
                } else {
                    LossReason::LeaseExpired
                };
                self.lost = Some(why.clone());
                // Resumed armed but the right ran out before the first step: the watchdog is
                // not opened again (the one the previous process armed fires).
                self.arm_pending = false;
                step.lost = Some(why);
                step.stop_workloads = true;
                step.reboot = self.watchdog_failed;
            }
            // Not admitted since boot: nothing runs, the watchdog is not armed yet.
            None => {}
        }
        step
    }
}

/// How an agent should read the controller's fence marker when it finds it on its heartbeat
/// Lease. The marker's value is the boot ID the node had when the controller fenced it. This
/// only names the situation for the operator: either way the node has no right to run until the
/// controller lifts the marker ([`AgentCore::observe_fence_marker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceMarkerReading {
    /// The node is back with another boot ID than the one fenced: the expected return. The
    /// controller lifts the marker once it sees the new boot ID.
    ReturnedAfterFence,
    /// The marker names this boot (or names none): the node was fenced while running and has
    /// just lost its right to run.
    FencedThisBoot,
}

/// Reads the fence marker `marker_boot_id` (the annotation's value) for a node now running
/// boot `own_boot_id`.
pub fn read_fence_marker(marker_boot_id: &str, own_boot_id: &str) -> FenceMarkerReading {
    let marker = marker_boot_id.trim();
    if !marker.is_empty() && marker != own_boot_id.trim() {
        FenceMarkerReading::ReturnedAfterFence
    } else {
        FenceMarkerReading::FencedThisBoot
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
