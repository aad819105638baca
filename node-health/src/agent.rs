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
mod tests {
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
}
