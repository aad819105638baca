//! Volume leases: which consumer may write to a shared RWX block volume (invariant S1).
//!
//! One `coordination.k8s.io/v1` Lease per protected volume. Its `holderIdentity` says who may
//! write and its `leaseTransitions` is the epoch, which rises with every new holder (S4). Every
//! write carries the last-seen `resourceVersion` as a precondition, so of two racing writers one
//! gets 409. This module decides; the guard's shell (and later the controller) does the IO.
//!
//! # Who may take the lease ([`may_take`])
//! - **Released**: the holder stopped its app and then released the lease. If a preferred holder
//!   is set, only the preferred one may take a released lease (planned switchover).
//! - **Expired**: the taker has seen the record unchanged (same `resourceVersion`) for
//!   `stretch(duration + margin)` on its own clock, counted from when *it* saw the change.
//! - **Handed over**: after fencing the holder's node, the controller commits a handover to a
//!   named taker with an epoch above the Lease's ([`handover`]); only that taker may use it, and
//!   only with that epoch. A handover epoch not above every epoch the taker has seen is refused.
//! - **Own lease**: the record still names the caller, which has no consumer running (a guard
//!   that demoted during an API outage takes its lease back without waiting for expiry).
//!   Identities must therefore be unique per consumer (a pod UID, not a reusable name).
//!
//! A new holder writes epoch + 1 (the controller's epoch for a handover). A record whose epoch
//! is below one the actor has already seen is a stale read and is refused.
//!
//! # The holder ([`VolumeGuard`])
//! Standby → Acquiring → Active → Demoting → Releasing → Standby (or → Fencing, terminal).
//! - The app starts only after the acquire write was answered with success, and only before the
//!   demote deadline that write gives.
//! - The holder renews every `renew`. Its demote deadline is `sent + demote_after` where `sent` is
//!   when it *sent* its last successful write: the server applied the write no earlier, so a late
//!   answer never extends the deadline beyond what the taker's wait covers.
//! - It demotes (stops the app, syncs, unmounts) at that deadline, or when a fresh read shows
//!   another holder, a higher epoch, a handover, a released or deleted Lease, or a preferred
//!   holder that is not itself. A planned demotion (switchover, retirement) keeps renewing while
//!   the app stops; after the stop it releases the lease if it still holds it.
//! - The node agent is told the *fence deadline* `sent + demote_after + stop_budget` before the
//!   app starts and whenever it moves. If the app has not been reported stopped by then, the
//!   agent fences the node within `fence_delay`; the guard also asks for it
//!   ([`GuardAction::RequestFence`]). The agent enforces the deadline on its own, so a guard
//!   that hangs (paused, stuck in IO) cannot keep the app writing.
//!
//! # The timing rule ([`VolumeTiming::validate`])
//! Clock rates differ from real time by at most `d` (`drift_ppm`). Let the holder's last
//! successful write be sent at real time `s`. The holder's app has stopped writing, or its node
//! is fenced, by `demote_after + stop_budget + fence_delay` of the holder's clock after `s`, which
//! is at most `(A + B + F) / (1 − d)` of real time (a slow clock makes local waits longer).
//! A taker's acquire succeeds only against the latest record (compare-and-swap). That record was
//! written no earlier than the holder's last successful write, so no earlier than `s`, and the
//! taker saw it no earlier. The taker waits `(D + M)(1 + d)` on a clock at most `1 + d` fast:
//! at least `D + M` of real time. So the takeover is safe when
//!
//! ```text
//! (A + B + F) / (1 − d)  <  D + M
//! ```
//!
//! `validate` asks for more: `A + B + F ≤ shrink(D) = D(1 − d)` — the holder is done within the
//! lease duration itself — and a non-zero margin, which is left for what the argument does not
//! model (IO already in flight at the array when a node resets, millisecond rounding). Defaults:
//! A 6 s + B 2.5 s + F 1 s = 9.5 s ≤ 9.9 s; a taker waits (10 s + 2 s)·1.01 = 12.12 s. Renewals
//! must be at most half as far apart as the demote deadline, so one lost renewal never demotes.
//!
//! # What the shell must provide
//! - Unique identities; one write in flight at a time, each reported with
//!   [`VolumeGuard::write_result`] (a write unanswered for `renew` counts as failed, so the
//!   shell's request timeout should be shorter); every write changes the object (`renewTime`),
//!   so the `resourceVersion` moves.
//! - On start, no app running (the guard is the wrapper, or stops the app before creating the
//!   guard); later the app only runs between `StartApp` and a reported stop.
//! - A node agent that enforces `ArmFence` on the node's monotonic clock even if it stalls itself
//!   (for example by feeding its watchdog only while `now + watchdog ≤ at + fence_delay`).
//! - The controller never lowers `leaseTransitions` (recreating a Lease carries the epoch over).

use crate::time::{DEFAULT_DRIFT_PPM, MonoTime, shrink, stretch};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// The volume lease's timing. Every guard and taker of one volume must use the same figures;
/// takers also honour a longer `duration` written on the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeTiming {
    /// How often the holder renews.
    pub renew: Duration,
    /// The lease duration: a holder has stopped writing within it (holder's clock, shrunk).
    pub duration: Duration,
    /// The holder demotes when it has not sent a successful write for this long.
    pub demote_after: Duration,
    /// How long stop + sync + unmount may take after the demote deadline before the node is
    /// fenced.
    pub stop_budget: Duration,
    /// How long the node agent may take, after the fence deadline, to stop the node writing.
    pub fence_delay: Duration,
    /// Extra wait of a taker beyond the lease duration.
    pub margin: Duration,
    /// Clock-rate drift bound, parts per million.
    pub drift_ppm: u64,
}

impl Default for VolumeTiming {
    /// The brief's figures: renew 2 s, duration 10 s, demote after 6 s.
    fn default() -> Self {
        VolumeTiming {
            renew: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            demote_after: Duration::from_secs(6),
            stop_budget: Duration::from_millis(2_500),
            fence_delay: Duration::from_secs(1),
            margin: Duration::from_secs(2),
            drift_ppm: DEFAULT_DRIFT_PPM,
        }
    }
}

/// A timing under which a holder could still write when a taker may take over, or that
/// demotes on a single lost renewal.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VolumeTimingError {
    #[error("the renew interval must not be zero")]
    ZeroRenew,
    #[error(
        "renewals every {renew:?} are too sparse for a demote deadline of {demote_after:?}: two must fit before it"
    )]
    RenewTooSparse {
        renew: Duration,
        demote_after: Duration,
    },
    #[error(
        "a holder may write for {holder_bound:?} of its own clock after its last renewal (demote + stop budget + fence delay), more than the lease duration {duration:?} less the drift bound ({allowed:?})"
    )]
    HolderOutlivesLease {
        holder_bound: Duration,
        duration: Duration,
        allowed: Duration,
    },
    #[error("the takeover margin must not be zero")]
    NoMargin,
}

impl VolumeTiming {
    /// Refuses any timing under which the argument in the module documentation fails.
    pub fn validate(&self) -> Result<(), VolumeTimingError> {
        if self.renew.is_zero() {
            return Err(VolumeTimingError::ZeroRenew);
        }
        if self.renew.saturating_mul(2) >= self.demote_after {
            return Err(VolumeTimingError::RenewTooSparse {
                renew: self.renew,
                demote_after: self.demote_after,
            });
        }
        // The holder's clock may run slow: its local bound, read in real time, must still end
        // within the lease duration. The taker's fast clock is covered in `may_take` (stretch).
        let holder_bound = self.holder_bound();
        let allowed = shrink(self.duration, self.drift_ppm);
        if holder_bound > allowed {
            return Err(VolumeTimingError::HolderOutlivesLease {
                holder_bound,
                duration: self.duration,
                allowed,
            });
        }
        if self.margin.is_zero() {
            return Err(VolumeTimingError::NoMargin);
        }
        Ok(())
    }

    /// How long, on the holder's clock after its last successful write was sent, its app may
    /// still write: demote deadline + stop budget + fence delay.
    pub fn holder_bound(&self) -> Duration {
        self.demote_after
            .saturating_add(self.stop_budget)
            .saturating_add(self.fence_delay)
    }

    /// How long a taker waits, on its own clock, for a record written with `lease_duration`.
    pub fn takeover_after(&self, lease_duration: Duration) -> Duration {
        stretch(
            self.duration
                .max(lease_duration)
                .saturating_add(self.margin),
            self.drift_ppm,
        )
    }
}

/// The controller's committed handover: `to` may take the lease with exactly `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub to: String,
    pub epoch: u64,
}

/// What an actor reads of a volume Lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLease {
    /// `holderIdentity` (empty is `None`).
    pub holder: Option<String>,
    /// `leaseTransitions`.
    pub epoch: u64,
    pub resource_version: String,
    /// `spec.preferredHolder` or the annotation that stands for it.
    pub preferred_holder: Option<String>,
    /// The holder gave the lease up after stopping its app.
    pub released: bool,
    /// A handover committed by the controller after fencing the holder's node.
    pub handover: Option<Handover>,
    /// `leaseDurationSeconds` as the holder wrote it (zero if absent).
    pub duration: Duration,
}

impl VolumeLease {
    /// The current holder: `None` when released or unnamed.
    pub fn holder(&self) -> Option<&str> {
        self.holder
            .as_deref()
            .filter(|h| !h.is_empty() && !self.released)
    }

    /// Whether `identity` holds the lease with `epoch`. The controller marks a consumer active
    /// (for a Service) only while this holds: a consumer with a stale epoch is not the writer.
    pub fn is_held_by(&self, identity: &str, epoch: u64) -> bool {
        self.holder() == Some(identity) && self.epoch == epoch && self.handover.is_none()
    }

    fn preferred_other(&self, me: &str) -> Option<&str> {
        self.preferred_holder
            .as_deref()
            .filter(|p| !p.is_empty() && *p != me)
    }
}

/// A Lease as one observer saw it, with when (its own clock) it saw this `resourceVersion`
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub lease: VolumeLease,
    pub changed_at: MonoTime,
}

impl LeaseView {
    /// Records a read: the clock restarts only when the `resourceVersion` changed.
    pub fn track(previous: Option<&LeaseView>, lease: VolumeLease, now: MonoTime) -> LeaseView {
        let changed_at = match previous {
            Some(p) if p.lease.resource_version == lease.resource_version => p.changed_at,
            _ => now,
        };
        LeaseView { lease, changed_at }
    }
}

/// Why a taker may take the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TakeBasis {
    Released,
    Expired,
    HandedOver,
    /// The record names the caller, which has no consumer running.
    OwnLease,
}

/// A permitted take: write `holder = me, leaseTransitions = epoch` with precondition
/// `resourceVersion == expected_rv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Take {
    pub basis: TakeBasis,
    pub epoch: u64,
    pub expected_rv: String,
}

/// Why a taker may not take the lease.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum TakeRefusal {
    #[error("the volume Lease does not exist (the controller creates it)")]
    NoLease,
    #[error(
        "the Lease was read without a resourceVersion: an unconditional write could overwrite a live holder"
    )]
    NoResourceVersion,
    #[error("the Lease shows epoch {seen}, older than epoch {known} already seen: a stale read")]
    StaleEpoch { seen: u64, known: u64 },
    #[error("the handover's epoch {offered} is not above epoch {floor}")]
    StaleHandover { offered: u64, floor: u64 },
    #[error("the controller handed the lease over to {to}")]
    HandedToOther { to: String },
    #[error("a switchover to {preferred} is under way")]
    PreferredOther { preferred: String },
    #[error("held by {holder}, unchanged for {unchanged:?} of the {needed:?} a takeover needs")]
    Held {
        holder: String,
        unchanged: Duration,
        needed: Duration,
    },
    #[error("the epoch cannot rise any further")]
    EpochExhausted,
}

/// May `me` take the lease now? `view` is the latest read (`None`: the Lease does not exist);
/// `known_epoch` the highest `leaseTransitions` the caller has seen. The caller must have no
/// consumer of the volume running.
pub fn may_take(
    me: &str,
    view: Option<&LeaseView>,
    known_epoch: Option<u64>,
    now: MonoTime,
    timing: &VolumeTiming,
) -> Result<Take, TakeRefusal> {
    let v = view.ok_or(TakeRefusal::NoLease)?;
    let l = &v.lease;
    if l.resource_version.is_empty() {
        return Err(TakeRefusal::NoResourceVersion);
    }
    let known = known_epoch.unwrap_or(0);
    if l.epoch < known {
        return Err(TakeRefusal::StaleEpoch {
            seen: l.epoch,
            known,
        });
    }
    let unchanged = now.since(v.changed_at);
    let needed = timing.takeover_after(l.duration);
    let expired = unchanged > needed;
    let take = |basis, epoch: Option<u64>| {
        epoch
            .map(|epoch| Take {
                basis,
                epoch,
                expected_rv: l.resource_version.clone(),
            })
            .ok_or(TakeRefusal::EpochExhausted)
    };
    if let Some(h) = &l.handover {
        if h.to == me {
            // The controller's epoch must be above every epoch of an earlier holder.
            let floor = l.epoch.max(known);
            if h.epoch <= floor {
                return Err(TakeRefusal::StaleHandover {
                    offered: h.epoch,
                    floor,
                });
            }
            return take(TakeBasis::HandedOver, Some(h.epoch));
        }
        if !expired {
            return Err(TakeRefusal::HandedToOther { to: h.to.clone() });
        }
        // The handover went unused: rise above its epoch too.
        return take(TakeBasis::Expired, l.epoch.max(h.epoch).checked_add(1));
    }
    let next = l.epoch.checked_add(1);
    if let Some(p) = l.preferred_other(me)
        && !expired
    {
        return Err(TakeRefusal::PreferredOther {
            preferred: p.to_string(),
        });
    }
    match l.holder() {
        Some(h) if h == me => take(TakeBasis::OwnLease, next),
        None => take(TakeBasis::Released, next),
        Some(_) if expired => take(TakeBasis::Expired, next),
        Some(h) => Err(TakeRefusal::Held {
            holder: h.to_string(),
            unchanged,
            needed,
        }),
    }
}

/// The controller's handover write: precondition `expected_rv`, annotation naming `to` with an
/// epoch above the Lease's. Only call it once the holder's node is proven fenced.
pub fn handover(lease: &VolumeLease, to: &str) -> Result<(String, Handover), TakeRefusal> {
    if lease.resource_version.is_empty() {
        return Err(TakeRefusal::NoResourceVersion);
    }
    let floor = lease
        .handover
        .as_ref()
        .map_or(lease.epoch, |h| h.epoch.max(lease.epoch));
    let epoch = floor.checked_add(1).ok_or(TakeRefusal::EpochExhausted)?;
    Ok((
        lease.resource_version.clone(),
        Handover {
            to: to.to_string(),
            epoch,
        },
    ))
}

/// Names one write of a guard, so a late answer is not taken for a newer write's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WriteId(pub u64);

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Applied; the server's answer.
    Ok(VolumeLease),
    /// 409: the `resourceVersion` had moved.
    Conflict,
    /// No answer, an error or a timeout: it may or may not have been applied.
    Failed,
}

/// What the guard's shell must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuardAction {
    /// Read the Lease and pass it to [`VolumeGuard::observe`].
    Refresh,
    /// Replace the Lease, precondition `resourceVersion == expected_rv`: holder = me,
    /// `leaseTransitions = epoch`, acquire and renew time now, `leaseDurationSeconds`, no
    /// released flag, no handover; keep the preferred holder.
    Acquire {
        id: WriteId,
        expected_rv: String,
        epoch: u64,
    },
    /// Replace the Lease, precondition `expected_rv`: renew time now, all else kept.
    Renew {
        id: WriteId,
        expected_rv: String,
        epoch: u64,
    },
    /// Replace the Lease, precondition `expected_rv`: holder cleared and released set, epoch and
    /// preferred holder kept.
    Release {
        id: WriteId,
        expected_rv: String,
        epoch: u64,
    },
    /// Tell the node agent: unless the app is reported stopped, fence this node at `at` (this
    /// node's monotonic clock). Comes before `StartApp`, and again whenever `at` moves.
    ArmFence { at: MonoTime },
    /// The app has stopped: the node agent may forget the deadline.
    DisarmFence,
    /// Mount and start the app; `epoch` identifies the tenure.
    StartApp { epoch: u64 },
    /// Stop the app, sync and unmount; report with [`VolumeGuard::app_stopped`].
    StopApp,
    /// Stopping overran the fence deadline: the node agent must fence the node now.
    RequestFence,
}

/// Why an active guard demotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DemoteReason {
    /// No successful write sent within `demote_after`.
    DeadlineMissed,
    /// The Lease names another holder or was released.
    Lost,
    /// The Lease's epoch is not this tenure's.
    StaleEpoch,
    /// The controller handed the lease over.
    HandedOver,
    /// The Lease no longer exists.
    LeaseGone,
    /// A preferred holder other than this guard is set (planned switchover).
    Switchover,
    /// The shell asked the guard to step down for good.
    Retire,
}

impl DemoteReason {
    /// Planned: the lease is still ours, so the guard keeps renewing while the app stops.
    fn planned(self) -> bool {
        matches!(self, DemoteReason::Switchover | DemoteReason::Retire)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuardState {
    /// No lease, no app.
    Standby,
    /// The acquire write is in flight; the app has not started.
    Acquiring { epoch: u64 },
    /// Holding the lease; the app runs (or starts at the next step).
    Active { epoch: u64 },
    /// The app is stopping.
    Demoting { epoch: u64, reason: DemoteReason },
    /// The app has stopped; giving the lease back if it is still ours.
    Releasing { epoch: u64 },
    /// Stopping overran the deadline: the node is being fenced. Terminal.
    Fencing { epoch: u64 },
    /// Stepped down for good.
    Retired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppState {
    Stopped,
    Running,
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    Acquire,
    Renew,
    Release,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: WriteId,
    kind: WriteKind,
    epoch: u64,
    sent_at: MonoTime,
}

#[derive(Debug, Clone)]
enum Observed {
    Unknown,
    Missing,
    Seen(LeaseView),
}

/// A guard is refused: empty identity or unsafe timing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GuardConfigError {
    #[error("the guard's identity must not be empty")]
    EmptyIdentity,
    #[error(transparent)]
    Timing(#[from] VolumeTimingError),
}

/// The holder side of one volume lease: one guard per consumer (pod or VM) of the volume.
///
/// The shell feeds it reads ([`observe`](Self::observe)), write outcomes
/// ([`write_result`](Self::write_result)) and the app's stop
/// ([`app_stopped`](Self::app_stopped)), and calls [`step`](Self::step) after each and at least
/// every 100 ms or so; `step` returns what to do, each action once.
#[derive(Debug, Clone)]
pub struct VolumeGuard {
    identity: String,
    timing: VolumeTiming,
    state: GuardState,
    view: Observed,
    /// The view reflects the Lease as of the last read or write answer; false after a conflict.
    fresh: bool,
    known_epoch: Option<u64>,
    inflight: Option<InFlight>,
    next_id: u64,
    /// When the tenure's last write was sent (renew pacing).
    last_sent: Option<MonoTime>,
    /// When the tenure's last *successful* write was sent: the deadlines count from here.
    renewed_at: Option<MonoTime>,
    app: AppState,
    /// The fence deadline the node agent was last told.
    armed: Option<MonoTime>,
    next_refresh: Option<MonoTime>,
    retry_at: Option<MonoTime>,
    retiring: bool,
    last_refusal: Option<TakeRefusal>,
}

impl VolumeGuard {
    pub fn new(
        identity: impl Into<String>,
        timing: VolumeTiming,
    ) -> Result<Self, GuardConfigError> {
        let identity = identity.into();
        if identity.trim().is_empty() {
            return Err(GuardConfigError::EmptyIdentity);
        }
        timing.validate()?;
        Ok(Self::new_unchecked(identity, timing))
    }

    /// Skips every check: only for tests and simulations that break the rules on purpose.
    pub fn new_unchecked(identity: impl Into<String>, timing: VolumeTiming) -> Self {
        VolumeGuard {
            identity: identity.into(),
            timing,
            state: GuardState::Standby,
            view: Observed::Unknown,
            fresh: false,
            known_epoch: None,
            inflight: None,
            next_id: 0,
            last_sent: None,
            renewed_at: None,
            app: AppState::Stopped,
            armed: None,
            next_refresh: None,
            retry_at: None,
            retiring: false,
            last_refusal: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timing(&self) -> &VolumeTiming {
        &self.timing
    }

    pub fn state(&self) -> GuardState {
        self.state
    }

    /// The highest epoch seen on the Lease.
    pub fn known_epoch(&self) -> Option<u64> {
        self.known_epoch
    }

    /// Why the last take was refused (for status and logs).
    pub fn last_refusal(&self) -> Option<&TakeRefusal> {
        self.last_refusal.as_ref()
    }

    /// The fence deadline of the current tenure (this guard's clock), while an app may run.
    pub fn fence_deadline(&self) -> Option<MonoTime> {
        match self.app {
            AppState::Stopped => None,
            _ => self.fence_at(),
        }
    }

    /// Whether the app may be running (started and not reported stopped).
    pub fn app_may_run(&self) -> bool {
        self.app != AppState::Stopped
    }

    /// A read of the Lease (`None`: it does not exist). A record with an epoch below one already
    /// seen is a stale read and is ignored.
    pub fn observe(&mut self, lease: Option<VolumeLease>, now: MonoTime) {
        match lease {
            None => {
                self.view = Observed::Missing;
                self.fresh = true;
            }
            Some(l) => self.note_record(l, now),
        }
    }

    fn note_record(&mut self, lease: VolumeLease, now: MonoTime) {
        if self.known_epoch.is_some_and(|k| lease.epoch < k) {
            return;
        }
        self.known_epoch = Some(lease.epoch);
        let previous = match &self.view {
            Observed::Seen(v) => Some(v),
            _ => None,
        };
        self.view = Observed::Seen(LeaseView::track(previous, lease, now));
        self.fresh = true;
    }

    /// The outcome of write `id`. An answer to a write the guard already gave up on only
    /// updates its view.
    pub fn write_result(&mut self, id: WriteId, outcome: WriteOutcome, now: MonoTime) {
        let Some(w) = self.inflight.filter(|w| w.id == id) else {
            if let WriteOutcome::Ok(l) = outcome {
                self.note_record(l, now);
            }
            return;
        };
        self.inflight = None;
        let ok = match outcome {
            WriteOutcome::Ok(l) => {
                let mine = l.is_held_by(&self.identity, w.epoch);
                self.note_record(l, now);
                mine
            }
            WriteOutcome::Conflict => {
                self.fresh = false;
                false
            }
            WriteOutcome::Failed => {
                if w.kind == WriteKind::Acquire {
                    // Pace retries: the API server may be struggling.
                    self.retry_at = Some(now + self.timing.renew);
                }
                false
            }
        };
        self.settle(w, ok);
    }

    fn settle(&mut self, w: InFlight, ok: bool) {
        match (w.kind, self.state) {
            (WriteKind::Acquire, GuardState::Acquiring { epoch }) if epoch == w.epoch => {
                if ok {
                    // The app starts at the next step, if the deadline this write gives has
                    // not passed by then.
                    self.state = GuardState::Active { epoch };
                    self.renewed_at = Some(w.sent_at);
                } else {
                    self.state = GuardState::Standby;
                }
            }
            (
                WriteKind::Renew,
                GuardState::Active { epoch } | GuardState::Demoting { epoch, .. },
            ) if ok && epoch == w.epoch => {
                // Counted from the send: the server applied it no earlier.
                self.renewed_at = self.renewed_at.max(Some(w.sent_at));
            }
            (WriteKind::Release, GuardState::Releasing { .. }) => {
                self.state = GuardState::Standby;
            }
            _ => {}
        }
    }

    /// The app has stopped (after `StopApp`, or on its own: an active guard starts it again).
    pub fn app_stopped(&mut self) {
        self.app = AppState::Stopped;
    }

    /// Step down for good: demote, release, never acquire again (the pod is terminating).
    pub fn retire(&mut self) {
        self.retiring = true;
    }

    /// What to do at `now`.
    pub fn step(&mut self, now: MonoTime) -> Vec<GuardAction> {
        let mut out = Vec::new();
        self.expire_write(now);
        match self.state {
            GuardState::Standby => self.step_standby(now, &mut out),
            GuardState::Active { epoch } => self.step_active(epoch, now, &mut out),
            GuardState::Demoting { epoch, reason } => {
                self.step_demoting(epoch, reason, now, &mut out)
            }
            GuardState::Releasing { epoch } => self.step_releasing(epoch, now, &mut out),
            GuardState::Acquiring { .. } | GuardState::Fencing { .. } | GuardState::Retired => {}
        }
        if !matches!(self.state, GuardState::Fencing { .. }) {
            // Also when an app that stopped on its own leads straight to a release.
            self.disarm(&mut out);
        }
        if self.fresh {
            self.next_refresh = None;
        } else if self.next_refresh.is_none_or(|t| now >= t) {
            out.push(GuardAction::Refresh);
            self.next_refresh = Some(now + self.timing.renew);
        }
        out
    }

    /// A write unanswered for a renew interval counts as failed; the next one may go out.
    fn expire_write(&mut self, now: MonoTime) {
        if let Some(w) = self.inflight
            && now >= w.sent_at + self.timing.renew
        {
            self.write_result(w.id, WriteOutcome::Failed, now);
        }
    }

    fn fence_at(&self) -> Option<MonoTime> {
        self.renewed_at
            .map(|r| r + self.timing.demote_after + self.timing.stop_budget)
    }

    fn send(
        &mut self,
        kind: WriteKind,
        epoch: u64,
        expected_rv: String,
        now: MonoTime,
    ) -> GuardAction {
        let id = WriteId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.inflight = Some(InFlight {
            id,
            kind,
            epoch,
            sent_at: now,
        });
        self.last_sent = Some(now);
        match kind {
            WriteKind::Acquire => GuardAction::Acquire {
                id,
                expected_rv,
                epoch,
            },
            WriteKind::Renew => GuardAction::Renew {
                id,
                expected_rv,
                epoch,
            },
            WriteKind::Release => GuardAction::Release {
                id,
                expected_rv,
                epoch,
            },
        }
    }

    /// The fresh view, if it shows this guard holding `epoch`: its `resourceVersion`.
    fn held_rv(&self, epoch: u64) -> Option<String> {
        match &self.view {
            Observed::Seen(v) if self.fresh && v.lease.is_held_by(&self.identity, epoch) => {
                Some(v.lease.resource_version.clone())
            }
            _ => None,
        }
    }

    fn step_standby(&mut self, now: MonoTime, out: &mut Vec<GuardAction>) {
        if self.inflight.is_some() {
            return;
        }
        // Still named on the Lease (a release that conflicted or failed) but not taking it
        // back: give it up, or the preferred holder waits for the expiry. No app runs here.
        if let Observed::Seen(v) = &self.view
            && self.fresh
            && v.lease.holder() == Some(self.identity.as_str())
            && v.lease.handover.is_none()
            && (self.retiring || v.lease.preferred_other(&self.identity).is_some())
        {
            let (epoch, rv) = (v.lease.epoch, v.lease.resource_version.clone());
            self.state = GuardState::Releasing { epoch };
            let a = self.send(WriteKind::Release, epoch, rv, now);
            out.push(a);
            return;
        }
        if self.retiring {
            self.state = GuardState::Retired;
            return;
        }
        if !self.fresh || self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let view = match &self.view {
            Observed::Unknown => return,
            Observed::Missing => None,
            Observed::Seen(v) => Some(v),
        };
        // Standby means no app runs, which `OwnLease` requires.
        match may_take(&self.identity, view, self.known_epoch, now, &self.timing) {
            Ok(take) => {
                self.last_refusal = None;
                self.renewed_at = None;
                self.state = GuardState::Acquiring { epoch: take.epoch };
                let a = self.send(WriteKind::Acquire, take.epoch, take.expected_rv, now);
                out.push(a);
            }
            Err(r) => self.last_refusal = Some(r),
        }
    }

    fn demote_reason(&self, epoch: u64, now: MonoTime) -> Option<DemoteReason> {
        if self.retiring {
            return Some(DemoteReason::Retire);
        }
        if self
            .renewed_at
            .is_none_or(|r| now >= r + self.timing.demote_after)
        {
            return Some(DemoteReason::DeadlineMissed);
        }
        if !self.fresh {
            // After a conflict, wait for a read: it may be our own write that landed. The
            // deadline above keeps running meanwhile.
            return None;
        }
        let l = match &self.view {
            Observed::Unknown => return None,
            Observed::Missing => return Some(DemoteReason::LeaseGone),
            Observed::Seen(v) => &v.lease,
        };
        if l.epoch != epoch {
            Some(DemoteReason::StaleEpoch)
        } else if l.handover.is_some() {
            Some(DemoteReason::HandedOver)
        } else if l.holder() != Some(self.identity.as_str()) {
            Some(DemoteReason::Lost)
        } else if l.preferred_other(&self.identity).is_some() {
            Some(DemoteReason::Switchover)
        } else {
            None
        }
    }

    fn arm(&mut self, out: &mut Vec<GuardAction>) {
        if let Some(at) = self.fence_at()
            && self.armed != Some(at)
        {
            self.armed = Some(at);
            out.push(GuardAction::ArmFence { at });
        }
    }

    fn disarm(&mut self, out: &mut Vec<GuardAction>) {
        if self.app == AppState::Stopped && self.armed.take().is_some() {
            out.push(GuardAction::DisarmFence);
        }
    }

    fn renew_if_due(&mut self, epoch: u64, now: MonoTime, out: &mut Vec<GuardAction>) {
        if self.inflight.is_some() || self.last_sent.is_some_and(|t| now < t + self.timing.renew) {
            return;
        }
        if let Some(rv) = self.held_rv(epoch) {
            let a = self.send(WriteKind::Renew, epoch, rv, now);
            out.push(a);
        }
    }

    fn step_active(&mut self, epoch: u64, now: MonoTime, out: &mut Vec<GuardAction>) {
        if let Some(reason) = self.demote_reason(epoch, now) {
            if self.app == AppState::Stopped {
                // Never started (or already stopped on its own): nothing to stop.
                self.state = GuardState::Releasing { epoch };
                return self.step_releasing(epoch, now, out);
            }
            self.app = AppState::Stopping;
            out.push(GuardAction::StopApp);
            self.state = GuardState::Demoting { epoch, reason };
            return self.step_demoting(epoch, reason, now, out);
        }
        self.arm(out);
        if self.app == AppState::Stopped {
            self.app = AppState::Running;
            out.push(GuardAction::StartApp { epoch });
        }
        self.renew_if_due(epoch, now, out);
    }

    fn step_demoting(
        &mut self,
        epoch: u64,
        reason: DemoteReason,
        now: MonoTime,
        out: &mut Vec<GuardAction>,
    ) {
        if self.app == AppState::Stopped {
            self.disarm(out);
            self.state = GuardState::Releasing { epoch };
            return self.step_releasing(epoch, now, out);
        }
        if self.fence_at().is_none_or(|at| now >= at) {
            self.state = GuardState::Fencing { epoch };
            out.push(GuardAction::RequestFence);
            return;
        }
        // A renewal that was in flight when the demotion began may still move the deadline.
        self.arm(out);
        if reason.planned() {
            // The lease is still ours: keep it while the app stops, so a slow stop is no fence.
            self.renew_if_due(epoch, now, out);
        }
    }

    fn step_releasing(&mut self, epoch: u64, now: MonoTime, out: &mut Vec<GuardAction>) {
        if self.inflight.is_some() {
            // A renewal still in flight, or the release itself.
            return;
        }
        match self.held_rv(epoch) {
            // The app has stopped: nobody writes, the lease may go.
            Some(rv) => {
                let a = self.send(WriteKind::Release, epoch, rv, now);
                out.push(a);
            }
            None => self.state = GuardState::Standby,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn lease(holder: Option<&str>, epoch: u64, rv: &str) -> VolumeLease {
        VolumeLease {
            holder: holder.map(str::to_string),
            epoch,
            resource_version: rv.into(),
            preferred_holder: None,
            released: false,
            handover: None,
            duration: Duration::from_secs(10),
        }
    }

    fn seen(lease: VolumeLease, at: u64) -> LeaseView {
        LeaseView {
            lease,
            changed_at: MonoTime(at),
        }
    }

    /// A Lease with compare-and-swap on the resourceVersion, as the API server keeps it.
    struct Api {
        lease: VolumeLease,
        rv: u64,
    }

    impl Api {
        fn new(lease: VolumeLease) -> Self {
            let rv = lease.resource_version.parse().unwrap_or(1);
            Api { lease, rv }
        }

        fn bump(&mut self) {
            self.rv += 1;
            self.lease.resource_version = self.rv.to_string();
        }

        /// The controller sets (or clears) the preferred holder.
        fn prefer(&mut self, who: Option<&str>) {
            self.lease.preferred_holder = who.map(str::to_string);
            self.bump();
        }

        fn write(&mut self, who: &str, a: &GuardAction) -> Option<(WriteId, WriteOutcome)> {
            let (id, rv, epoch) = match a {
                GuardAction::Acquire {
                    id,
                    expected_rv,
                    epoch,
                }
                | GuardAction::Renew {
                    id,
                    expected_rv,
                    epoch,
                }
                | GuardAction::Release {
                    id,
                    expected_rv,
                    epoch,
                } => (*id, expected_rv, *epoch),
                _ => return None,
            };
            if *rv != self.lease.resource_version {
                return Some((id, WriteOutcome::Conflict));
            }
            match a {
                GuardAction::Acquire { .. } => {
                    self.lease.holder = Some(who.into());
                    self.lease.epoch = epoch;
                    self.lease.released = false;
                    self.lease.handover = None;
                }
                GuardAction::Release { .. } => {
                    self.lease.holder = None;
                    self.lease.released = true;
                }
                _ => {}
            }
            self.bump();
            Some((id, WriteOutcome::Ok(self.lease.clone())))
        }
    }

    fn writes(actions: &[GuardAction]) -> Vec<&GuardAction> {
        actions
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    GuardAction::Acquire { .. }
                        | GuardAction::Renew { .. }
                        | GuardAction::Release { .. }
                )
            })
            .collect()
    }

    fn guard(id: &str) -> VolumeGuard {
        VolumeGuard::new(id, VolumeTiming::default()).expect("valid timing")
    }

    /// Steps `g` at `now`, sends its writes to `api` and answers them at once.
    fn run(g: &mut VolumeGuard, api: &mut Api, now: u64) -> Vec<GuardAction> {
        let actions = g.step(MonoTime(now));
        for a in writes(&actions) {
            if let Some((id, outcome)) = api.write(g.identity(), a) {
                g.write_result(id, outcome, MonoTime(now));
            }
        }
        if actions.contains(&GuardAction::Refresh) {
            g.observe(Some(api.lease.clone()), MonoTime(now));
        }
        actions
    }

    /// A guard that holds `api`'s lease and runs its app since t = 0.
    fn active(id: &str, api: &mut Api) -> VolumeGuard {
        let mut g = guard(id);
        g.observe(Some(api.lease.clone()), MonoTime(0));
        let a = run(&mut g, api, 0);
        assert!(matches!(a[..], [GuardAction::Acquire { .. }]), "{a:?}");
        let a = g.step(MonoTime(0));
        assert!(a.contains(&GuardAction::StartApp {
            epoch: api.lease.epoch
        }));
        g
    }

    fn released(epoch: u64) -> VolumeLease {
        VolumeLease {
            released: true,
            ..lease(Some("old"), epoch, "1")
        }
    }

    #[test]
    fn default_timing_is_valid_and_the_brief_s() {
        let t = VolumeTiming::default();
        assert_eq!(t.validate(), Ok(()));
        assert_eq!(
            (t.renew, t.duration, t.demote_after),
            (ms(2_000), ms(10_000), ms(6_000))
        );
        assert_eq!(t.holder_bound(), ms(9_500));
        assert_eq!(t.takeover_after(Duration::ZERO), ms(12_120));
    }

    #[test]
    fn refuses_timing_under_which_a_holder_may_write_after_a_takeover() {
        let d = VolumeTiming::default();
        let cases: Vec<(&str, VolumeTiming, bool)> = vec![
            ("defaults", d, true),
            (
                // 6 + 2.9 + 1 = 9.9 s = 10 s shrunk by 1 %: done within the lease on a slow clock.
                "holder bound exactly at the drift bound",
                VolumeTiming {
                    stop_budget: ms(2_900),
                    ..d
                },
                true,
            ),
            (
                "holder bound 1 ms beyond the drift bound",
                VolumeTiming {
                    stop_budget: ms(2_901),
                    ..d
                },
                false,
            ),
            (
                "demote deadline too long",
                VolumeTiming {
                    demote_after: ms(7_000),
                    ..d
                },
                false,
            ),
            (
                "drift bound 5 %: 9.5 s fits 10 s shrunk",
                VolumeTiming {
                    drift_ppm: 50_000,
                    ..d
                },
                true,
            ),
            (
                "drift bound 6 %: 9.5 s does not fit 9.4 s",
                VolumeTiming {
                    drift_ppm: 60_000,
                    ..d
                },
                false,
            ),
            (
                "drift bound beyond 100 %",
                VolumeTiming {
                    drift_ppm: 2_000_000,
                    ..d
                },
                false,
            ),
            (
                "the fence takes too long (a plain 5 s watchdog wait)",
                VolumeTiming {
                    fence_delay: ms(5_000),
                    ..d
                },
                false,
            ),
            (
                "renewals too sparse: a single lost one would demote",
                VolumeTiming {
                    renew: ms(3_000),
                    ..d
                },
                false,
            ),
            (
                "no renewals",
                VolumeTiming {
                    renew: Duration::ZERO,
                    ..d
                },
                false,
            ),
            (
                "no margin",
                VolumeTiming {
                    margin: Duration::ZERO,
                    ..d
                },
                false,
            ),
            (
                "huge figures do not overflow",
                VolumeTiming {
                    demote_after: Duration::MAX,
                    ..d
                },
                false,
            ),
        ];
        for (name, t, ok) in cases {
            assert_eq!(t.validate().is_ok(), ok, "{name}: {:?}", t.validate());
            assert_eq!(VolumeGuard::new("g", t).is_ok(), ok, "{name}");
        }
        assert!(matches!(
            VolumeTiming {
                demote_after: ms(7_000),
                ..d
            }
            .validate(),
            Err(VolumeTimingError::HolderOutlivesLease { .. })
        ));
        assert_eq!(
            VolumeGuard::new(" ", d).err(),
            Some(GuardConfigError::EmptyIdentity)
        );
    }

    /// Every unsafe take refused, and the boundaries on the accepting side.
    #[test]
    fn may_take_table() {
        let t = VolumeTiming::default();
        let held = lease(Some("x"), 4, "40");
        let with = |f: &dyn Fn(&mut VolumeLease)| {
            let mut l = held.clone();
            f(&mut l);
            l
        };
        let ok = |basis, epoch| {
            Ok(Take {
                basis,
                epoch,
                expected_rv: "40".into(),
            })
        };
        type Case = (
            &'static str,
            Option<VolumeLease>,
            Option<u64>,
            u64,
            Result<Take, TakeRefusal>,
        );
        // The record was seen changing at t = 1000; 12.12 s is (10 s + 2 s margin) stretched.
        let cases: Vec<Case> = vec![
            (
                "holder may still write: unchanged for exactly the stretched duration",
                Some(held.clone()),
                None,
                1_000 + 12_120,
                Err(TakeRefusal::Held {
                    holder: "x".into(),
                    unchanged: ms(12_120),
                    needed: ms(12_120),
                }),
            ),
            (
                "expired on my clock",
                Some(held.clone()),
                None,
                1_000 + 12_121,
                ok(TakeBasis::Expired, 5),
            ),
            (
                "the holder wrote a longer duration",
                Some(with(&|l| l.duration = Duration::from_secs(20))),
                None,
                1_000 + 12_121,
                Err(TakeRefusal::Held {
                    holder: "x".into(),
                    unchanged: ms(12_121),
                    needed: ms(22_220),
                }),
            ),
            (
                "released",
                Some(with(&|l| l.released = true)),
                None,
                1_000,
                ok(TakeBasis::Released, 5),
            ),
            (
                "no holder",
                Some(with(&|l| l.holder = Some(String::new()))),
                None,
                1_000,
                ok(TakeBasis::Released, 5),
            ),
            (
                "released for a switchover to another",
                Some(with(&|l| {
                    l.released = true;
                    l.preferred_holder = Some("y".into());
                })),
                None,
                1_000,
                Err(TakeRefusal::PreferredOther {
                    preferred: "y".into(),
                }),
            ),
            (
                "released for a switchover to me",
                Some(with(&|l| {
                    l.released = true;
                    l.preferred_holder = Some("me".into());
                })),
                None,
                1_000,
                ok(TakeBasis::Released, 5),
            ),
            (
                "preferred, but the holder has not released",
                Some(with(&|l| l.preferred_holder = Some("me".into()))),
                None,
                5_000,
                Err(TakeRefusal::Held {
                    holder: "x".into(),
                    unchanged: ms(4_000),
                    needed: ms(12_120),
                }),
            ),
            (
                "switchover to another that never came: expiry still applies",
                Some(with(&|l| l.preferred_holder = Some("y".into()))),
                None,
                1_000 + 12_121,
                ok(TakeBasis::Expired, 5),
            ),
            (
                "my own lease (no app running)",
                Some(with(&|l| l.holder = Some("me".into()))),
                None,
                1_000,
                ok(TakeBasis::OwnLease, 5),
            ),
            (
                "my own lease, but a switchover to another is under way",
                Some(with(&|l| {
                    l.holder = Some("me".into());
                    l.preferred_holder = Some("y".into());
                })),
                None,
                1_000,
                Err(TakeRefusal::PreferredOther {
                    preferred: "y".into(),
                }),
            ),
            (
                "acquire without resourceVersion",
                Some(with(&|l| {
                    l.released = true;
                    l.resource_version = String::new();
                })),
                None,
                1_000 + 60_000,
                Err(TakeRefusal::NoResourceVersion),
            ),
            ("no Lease", None, None, 60_000, Err(TakeRefusal::NoLease)),
            (
                "stale read: epoch below one already seen",
                Some(with(&|l| l.released = true)),
                Some(6),
                1_000,
                Err(TakeRefusal::StaleEpoch { seen: 4, known: 6 }),
            ),
            (
                "handed over to me with a higher epoch",
                Some(with(&|l| {
                    l.handover = Some(Handover {
                        to: "me".into(),
                        epoch: 5,
                    })
                })),
                Some(4),
                1_000,
                ok(TakeBasis::HandedOver, 5),
            ),
            (
                "handed over to me with the holder's epoch",
                Some(with(&|l| {
                    l.handover = Some(Handover {
                        to: "me".into(),
                        epoch: 4,
                    })
                })),
                None,
                1_000,
                Err(TakeRefusal::StaleHandover {
                    offered: 4,
                    floor: 4,
                }),
            ),
            (
                "handed over to me with a lower epoch",
                Some(with(&|l| {
                    l.handover = Some(Handover {
                        to: "me".into(),
                        epoch: 2,
                    })
                })),
                None,
                1_000,
                Err(TakeRefusal::StaleHandover {
                    offered: 2,
                    floor: 4,
                }),
            ),
            (
                "handed over to another",
                Some(with(&|l| {
                    l.handover = Some(Handover {
                        to: "y".into(),
                        epoch: 5,
                    })
                })),
                None,
                1_000 + 12_120,
                Err(TakeRefusal::HandedToOther { to: "y".into() }),
            ),
            (
                "handed over to another who never took it: above its epoch",
                Some(with(&|l| {
                    l.handover = Some(Handover {
                        to: "y".into(),
                        epoch: 9,
                    })
                })),
                None,
                1_000 + 12_121,
                ok(TakeBasis::Expired, 10),
            ),
            (
                "the epoch cannot rise",
                Some(with(&|l| {
                    l.released = true;
                    l.epoch = u64::MAX;
                })),
                None,
                1_000,
                Err(TakeRefusal::EpochExhausted),
            ),
        ];
        for (name, l, known, now, want) in cases {
            let v = l.map(|l| seen(l, 1_000));
            let got = may_take("me", v.as_ref(), known, MonoTime(now), &t);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_takers_clock_restarts_only_on_a_new_resource_version() {
        let v = LeaseView::track(None, lease(Some("x"), 1, "7"), MonoTime(100));
        let again = LeaseView::track(Some(&v), lease(Some("x"), 1, "7"), MonoTime(9_000));
        assert_eq!(again.changed_at, MonoTime(100));
        let renewed = LeaseView::track(Some(&again), lease(Some("x"), 1, "8"), MonoTime(9_100));
        assert_eq!(renewed.changed_at, MonoTime(9_100));
    }

    #[test]
    fn the_controllers_handover_rises_above_every_epoch() {
        let mut l = lease(Some("x"), 4, "40");
        let (rv, h) = handover(&l, "y").expect("handover");
        assert_eq!((rv.as_str(), h.epoch), ("40", 5));
        l.handover = Some(Handover {
            to: "z".into(),
            epoch: 7,
        });
        assert_eq!(handover(&l, "y").map(|(_, h)| h.epoch), Ok(8));
        l.resource_version.clear();
        assert_eq!(handover(&l, "y"), Err(TakeRefusal::NoResourceVersion));
    }

    #[test]
    fn starts_the_app_only_after_its_acquire_succeeded() {
        let mut g = guard("me");
        assert_eq!(g.step(MonoTime(0)), [GuardAction::Refresh], "reads first");
        assert_eq!(
            g.step(MonoTime(10)),
            [],
            "one read request per renew interval"
        );
        g.observe(Some(released(3)), MonoTime(10));
        let a = g.step(MonoTime(10));
        let [
            GuardAction::Acquire {
                id,
                expected_rv,
                epoch,
            },
        ] = &a[..]
        else {
            panic!("{a:?}");
        };
        assert_eq!((expected_rv.as_str(), *epoch), ("1", 4));
        let id = *id;
        // Unanswered: nothing starts, and no second write goes out.
        for t in [20, 500, 1_999] {
            assert_eq!(g.step(MonoTime(t)), [], "t={t}");
        }
        assert_eq!(g.state(), GuardState::Acquiring { epoch: 4 });
        // Failed (timeout): back to standby; retried after a renew interval.
        g.write_result(id, WriteOutcome::Failed, MonoTime(2_000));
        assert_eq!(g.step(MonoTime(2_000)), []);
        assert_eq!(g.state(), GuardState::Standby);
        let a = g.step(MonoTime(4_000));
        let [GuardAction::Acquire { id, .. }] = a[..] else {
            panic!("{a:?}");
        };
        // Conflict: read again, never start.
        g.write_result(id, WriteOutcome::Conflict, MonoTime(4_100));
        assert_eq!(g.step(MonoTime(4_100)), [GuardAction::Refresh]);
        // An answer that does not show this guard holding is no success.
        g.observe(Some(released(3)), MonoTime(4_200));
        let a = g.step(MonoTime(4_200));
        let [GuardAction::Acquire { id, .. }] = a[..] else {
            panic!("{a:?}");
        };
        g.write_result(
            id,
            WriteOutcome::Ok(lease(Some("other"), 4, "2")),
            MonoTime(4_300),
        );
        assert!(
            !g.step(MonoTime(4_300))
                .contains(&GuardAction::StartApp { epoch: 4 })
        );
        assert_eq!(g.state(), GuardState::Standby);
        // Success: the fence deadline is armed before the app starts.
        let mut api = Api::new(VolumeLease {
            released: true,
            ..lease(Some("other"), 4, "3")
        });
        g.observe(Some(api.lease.clone()), MonoTime(5_000));
        let a = run(&mut g, &mut api, 5_000);
        assert!(
            matches!(a[..], [GuardAction::Acquire { epoch: 5, .. }]),
            "{a:?}"
        );
        assert_eq!(
            g.step(MonoTime(5_050)),
            [
                GuardAction::ArmFence {
                    at: MonoTime(5_000 + 8_500)
                },
                GuardAction::StartApp { epoch: 5 }
            ]
        );
        assert_eq!(g.state(), GuardState::Active { epoch: 5 });
    }

    #[test]
    fn an_acquire_acted_on_after_its_deadline_starts_nothing_and_gives_the_lease_back() {
        let mut g = guard("me");
        let mut api = Api::new(released(3));
        g.observe(Some(api.lease.clone()), MonoTime(0));
        let a = g.step(MonoTime(0));
        let (id, outcome) = api.write("me", &a[0]).expect("a write");
        // Answered in time, but the guard is not stepped again until its deadline has passed.
        g.write_result(id, outcome, MonoTime(1_000));
        let a = g.step(MonoTime(6_000));
        assert!(
            !a.iter().any(|a| matches!(a, GuardAction::StartApp { .. })),
            "{a:?}"
        );
        assert!(
            matches!(a[..], [GuardAction::Release { epoch: 4, .. }]),
            "{a:?}"
        );
    }

    #[test]
    fn demotes_on_its_deadline_counted_from_when_the_renewal_was_sent() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        let a = g.step(MonoTime(2_000));
        let [GuardAction::Renew { id, .. }] = a[..] else {
            panic!("{a:?}");
        };
        let (_, ok) = api.write("me", &a[0]).expect("a write");
        // Answered 1.9 s late: the deadline is 2 s + 6 s, not 3.9 s + 6 s.
        g.write_result(id, ok, MonoTime(3_900));
        assert_eq!(
            g.step(MonoTime(3_900)),
            [GuardAction::ArmFence {
                at: MonoTime(2_000 + 8_500)
            }]
        );
        // Every later renewal is lost.
        let a = g.step(MonoTime(4_000));
        let [GuardAction::Renew { id: lost, .. }] = a[..] else {
            panic!("{a:?}");
        };
        assert!(matches!(
            g.step(MonoTime(6_000))[..],
            [GuardAction::Renew { .. }]
        ));
        assert_eq!(g.state(), GuardState::Active { epoch: 1 });
        assert_eq!(g.step(MonoTime(7_999)), []);
        assert_eq!(g.step(MonoTime(8_000)), [GuardAction::StopApp]);
        assert_eq!(
            g.state(),
            GuardState::Demoting {
                epoch: 1,
                reason: DemoteReason::DeadlineMissed
            }
        );
        // The answer to a renewal the guard gave up on arrives now: it restarts nothing.
        g.write_result(
            lost,
            WriteOutcome::Ok(lease(Some("me"), 1, "99")),
            MonoTime(8_100),
        );
        let a = g.step(MonoTime(8_100));
        assert!(
            !a.iter().any(|a| matches!(
                a,
                GuardAction::StartApp { .. } | GuardAction::ArmFence { .. }
            )),
            "{a:?}"
        );
        assert_eq!(g.fence_deadline(), Some(MonoTime(10_500)));
    }

    #[test]
    fn a_stop_that_overruns_its_budget_asks_for_the_fence() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        assert_eq!(g.step(MonoTime(6_000)), [GuardAction::StopApp]);
        assert_eq!(g.step(MonoTime(8_499)), []);
        assert_eq!(g.step(MonoTime(8_500)), [GuardAction::RequestFence]);
        assert_eq!(g.state(), GuardState::Fencing { epoch: 1 });
        // Too late to call it off, and the guard never takes the lease again.
        g.app_stopped();
        g.observe(Some(released(1)), MonoTime(9_000));
        assert_eq!(g.step(MonoTime(30_000)), []);
    }

    #[test]
    fn a_guard_paused_past_its_deadline_stops_and_fences_at_once() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        // Nothing ran between 0 and 9 s; the node agent held the deadline 8.5 s meanwhile.
        assert_eq!(
            g.step(MonoTime(9_000)),
            [GuardAction::StopApp, GuardAction::RequestFence]
        );
    }

    /// What an active guard must not ignore in a fresh read, and why it demotes.
    #[test]
    fn demotes_on_what_a_read_shows() {
        let mine = lease(Some("me"), 1, "2");
        let with = |f: &dyn Fn(&mut VolumeLease)| {
            let mut l = mine.clone();
            f(&mut l);
            Some(l)
        };
        let cases: Vec<(&str, Option<VolumeLease>, Option<DemoteReason>)> = vec![
            (
                "still mine",
                with(&|l| l.resource_version = "3".into()),
                None,
            ),
            (
                "a preferred holder: me",
                with(&|l| l.preferred_holder = Some("me".into())),
                None,
            ),
            (
                "stale read of an older epoch is ignored",
                Some(lease(Some("x"), 0, "1")),
                None,
            ),
            (
                "another holder (a conflict showed it)",
                with(&|l| {
                    l.holder = Some("x".into());
                    l.epoch = 2;
                }),
                Some(DemoteReason::StaleEpoch),
            ),
            (
                "another holder with my epoch",
                with(&|l| l.holder = Some("x".into())),
                Some(DemoteReason::Lost),
            ),
            (
                "my name with a higher epoch",
                with(&|l| l.epoch = 2),
                Some(DemoteReason::StaleEpoch),
            ),
            (
                "released under me",
                with(&|l| l.released = true),
                Some(DemoteReason::Lost),
            ),
            (
                "handed over by the controller",
                with(&|l| {
                    l.handover = Some(Handover {
                        to: "x".into(),
                        epoch: 2,
                    })
                }),
                Some(DemoteReason::HandedOver),
            ),
            (
                "switchover to another",
                with(&|l| l.preferred_holder = Some("x".into())),
                Some(DemoteReason::Switchover),
            ),
            ("the Lease is gone", None, Some(DemoteReason::LeaseGone)),
        ];
        for (name, read, want) in cases {
            let mut api = Api::new(released(0));
            let mut g = active("me", &mut api);
            g.observe(read, MonoTime(500));
            let a = g.step(MonoTime(500));
            match want {
                None => {
                    assert_eq!(a, [], "{name}");
                    assert_eq!(g.state(), GuardState::Active { epoch: 1 }, "{name}");
                }
                Some(reason) => {
                    assert_eq!(a, [GuardAction::StopApp], "{name}");
                    assert_eq!(
                        g.state(),
                        GuardState::Demoting { epoch: 1, reason },
                        "{name}"
                    );
                    // Nothing is released while the app may still write.
                    for t in [600, 1_000, 3_000] {
                        let a = g.step(MonoTime(t));
                        assert!(
                            !a.iter().any(|a| matches!(a, GuardAction::Release { .. })),
                            "{name}: {a:?}"
                        );
                    }
                    g.app_stopped();
                    let a = g.step(MonoTime(3_100));
                    assert_eq!(a.first(), Some(&GuardAction::DisarmFence), "{name}");
                    assert!(!g.app_may_run(), "{name}");
                }
            }
        }
    }

    #[test]
    fn a_conflict_waits_for_a_read_before_judging() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        let a = g.step(MonoTime(2_000));
        // The controller writes the Lease (an annotation) just before the renewal lands.
        api.bump();
        let (id, outcome) = api.write("me", &a[0]).expect("a write");
        assert_eq!(outcome, WriteOutcome::Conflict);
        g.write_result(id, outcome, MonoTime(2_050));
        assert_eq!(g.step(MonoTime(2_050)), [GuardAction::Refresh]);
        assert_eq!(g.state(), GuardState::Active { epoch: 1 });
        g.observe(Some(api.lease.clone()), MonoTime(2_100));
        // Still ours: renew against the new resourceVersion at the next renew time.
        let a = g.step(MonoTime(4_000));
        assert!(
            matches!(&a[..], [GuardAction::Renew { expected_rv, .. }] if *expected_rv == api.lease.resource_version),
            "{a:?}"
        );
    }

    #[test]
    fn planned_switchover_stops_releases_and_hands_to_the_preferred() {
        let mut api = Api::new(released(0));
        let mut x = active("x", &mut api);
        let mut y = guard("y");
        let mut z = guard("z");
        for (t, g) in [(100, &mut y), (100, &mut z)] {
            g.observe(Some(api.lease.clone()), MonoTime(t));
            assert_eq!(run(g, &mut api, t), []);
        }
        api.prefer(Some("y"));
        for g in [&mut x, &mut y, &mut z] {
            g.observe(Some(api.lease.clone()), MonoTime(1_000));
        }
        assert_eq!(run(&mut x, &mut api, 1_000), [GuardAction::StopApp]);
        assert!(
            writes(&run(&mut y, &mut api, 1_000)).is_empty(),
            "x still holds"
        );
        // The stop is slow: x keeps the lease while it stops, so it is no fence.
        let mut renewed = 0;
        for t in (1_100..=12_000).step_by(100) {
            let a = run(&mut x, &mut api, t);
            renewed += a
                .iter()
                .filter(|a| matches!(a, GuardAction::Renew { .. }))
                .count();
            assert!(!a.contains(&GuardAction::RequestFence), "t={t}");
            assert!(
                !a.iter().any(|a| matches!(a, GuardAction::Release { .. })),
                "t={t}"
            );
        }
        assert!(renewed >= 5);
        x.app_stopped();
        let a = run(&mut x, &mut api, 12_100);
        assert!(
            matches!(
                a[..],
                [
                    GuardAction::DisarmFence,
                    GuardAction::Release { epoch: 1, .. }
                ]
            ),
            "{a:?}"
        );
        assert!(api.lease.released);
        for g in [&mut x, &mut y, &mut z] {
            g.observe(Some(api.lease.clone()), MonoTime(12_200));
        }
        assert!(writes(&run(&mut z, &mut api, 12_200)).is_empty());
        assert_eq!(
            z.last_refusal(),
            Some(&TakeRefusal::PreferredOther {
                preferred: "y".into()
            })
        );
        assert!(writes(&run(&mut x, &mut api, 12_200)).is_empty());
        let a = run(&mut y, &mut api, 12_200);
        assert!(
            matches!(a[..], [GuardAction::Acquire { epoch: 2, .. }]),
            "{a:?}"
        );
        assert_eq!(
            y.step(MonoTime(12_250)),
            [
                GuardAction::ArmFence {
                    at: MonoTime(12_200 + 8_500)
                },
                GuardAction::StartApp { epoch: 2 }
            ]
        );
        assert_eq!(api.lease.holder(), Some("y"));
    }

    #[test]
    fn takes_a_handover_only_with_an_epoch_above_every_earlier_one() {
        let mut l = lease(Some("x"), 4, "40");
        let mut g = guard("me");
        g.observe(Some(l.clone()), MonoTime(0));
        l.resource_version = "41".into();
        l.handover = Some(Handover {
            to: "me".into(),
            epoch: 4,
        });
        g.observe(Some(l.clone()), MonoTime(100));
        assert_eq!(g.step(MonoTime(100)), []);
        assert_eq!(
            g.last_refusal(),
            Some(&TakeRefusal::StaleHandover {
                offered: 4,
                floor: 4
            })
        );
        l.resource_version = "42".into();
        l.handover = Some(Handover {
            to: "me".into(),
            epoch: 5,
        });
        g.observe(Some(l), MonoTime(200));
        let a = g.step(MonoTime(200));
        assert!(
            matches!(&a[..], [GuardAction::Acquire { epoch: 5, expected_rv, .. }] if expected_rv == "42"),
            "{a:?}"
        );
    }

    #[test]
    fn takes_its_own_lease_back_after_an_api_outage() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        // The API server is unreachable from 1 s: every write fails.
        for t in (100..=6_000).step_by(100) {
            let a = g.step(MonoTime(t));
            for w in writes(&a) {
                if let GuardAction::Renew { id, .. } | GuardAction::Release { id, .. } = w {
                    if t < 1_000 {
                        let (id, o) = api.write("me", w).expect("a write");
                        g.write_result(id, o, MonoTime(t));
                    } else {
                        g.write_result(*id, WriteOutcome::Failed, MonoTime(t + 50));
                    }
                }
            }
        }
        assert!(matches!(g.state(), GuardState::Demoting { .. }));
        g.app_stopped();
        g.step(MonoTime(6_100));
        // Back: the Lease still names it and nobody else could take it meanwhile.
        g.observe(Some(api.lease.clone()), MonoTime(9_000));
        let a = run(&mut g, &mut api, 9_000);
        assert!(
            matches!(a[..], [GuardAction::Acquire { epoch: 2, .. }]),
            "{a:?}"
        );
        assert!(
            g.step(MonoTime(9_000))
                .contains(&GuardAction::StartApp { epoch: 2 })
        );
    }

    #[test]
    fn retiring_releases_and_never_takes_again() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        g.retire();
        assert_eq!(run(&mut g, &mut api, 100), [GuardAction::StopApp]);
        g.app_stopped();
        let a = run(&mut g, &mut api, 200);
        assert!(
            matches!(
                a[..],
                [GuardAction::DisarmFence, GuardAction::Release { .. }]
            ),
            "{a:?}"
        );
        g.observe(Some(api.lease.clone()), MonoTime(300));
        assert_eq!(run(&mut g, &mut api, 300), []);
        assert_eq!(g.state(), GuardState::Retired);
        assert_eq!(run(&mut g, &mut api, 60_000), []);
    }

    #[test]
    fn a_crashed_app_is_restarted_while_the_lease_is_held() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        g.app_stopped();
        assert_eq!(g.step(MonoTime(100)), [GuardAction::StartApp { epoch: 1 }]);
        // An app that stopped on its own as the lease is lost: the deadline is disarmed too.
        g.app_stopped();
        g.observe(Some(lease(Some("x"), 2, "9")), MonoTime(200));
        let a = g.step(MonoTime(200));
        assert_eq!(a, [GuardAction::DisarmFence]);
        assert_eq!(g.fence_deadline(), None);
    }

    #[test]
    fn a_release_that_conflicted_is_sent_again_from_standby() {
        let mut api = Api::new(released(0));
        let mut g = active("me", &mut api);
        api.prefer(Some("y"));
        g.observe(Some(api.lease.clone()), MonoTime(100));
        assert_eq!(g.step(MonoTime(100)), [GuardAction::StopApp]);
        g.app_stopped();
        let a = g.step(MonoTime(200));
        let [GuardAction::DisarmFence, GuardAction::Release { id, .. }] = a[..] else {
            panic!("{a:?}");
        };
        // The controller wrote the Lease meanwhile: the release conflicts.
        api.bump();
        g.write_result(id, WriteOutcome::Conflict, MonoTime(250));
        assert_eq!(run(&mut g, &mut api, 250), [GuardAction::Refresh]);
        // Named on the Lease, not taking it back (a switchover is under way): release again.
        let a = run(&mut g, &mut api, 300);
        assert!(
            matches!(a[..], [GuardAction::Release { epoch: 1, .. }]),
            "{a:?}"
        );
        assert!(api.lease.released);
        assert_eq!(g.state(), GuardState::Standby);
    }

    /// A holder cut off from the API server at 3 s of real time, whose app never finishes
    /// stopping, on a clock `holder_ppm` off real time; a taker on a clock `taker_ppm` off that
    /// sees every change at once. Returns (real ms when the holder's node agent fences it,
    /// real ms when the taker first sends its acquire).
    fn race(timing: VolumeTiming, holder_ppm: i64, taker_ppm: i64) -> (u64, u64) {
        let clock = |r: u64, ppm: i64| {
            MonoTime(
                u64::try_from(i64::try_from(r).expect("small") * (1_000_000 + ppm) / 1_000_000)
                    .expect("forward"),
            )
        };
        let mut api = Api::new(released(0));
        let mut h = VolumeGuard::new("h", timing).expect("valid timing");
        let mut t = VolumeGuard::new("t", timing).expect("valid timing");
        let (mut running, mut armed, mut fenced, mut taken) = (false, None, None, None);
        let mut seen_rv = String::new();
        for r in 0..60_000 {
            let h_now = clock(r, holder_ppm);
            if r == 0 {
                h.observe(Some(api.lease.clone()), h_now);
            }
            for a in h.step(h_now) {
                match &a {
                    GuardAction::StartApp { .. } => running = true,
                    GuardAction::ArmFence { at } => armed = Some(*at),
                    _ => {}
                }
                // Cut off from 3 s: nothing reaches the API server any more.
                if r < 3_000
                    && let Some((id, outcome)) = api.write("h", &a)
                {
                    h.write_result(id, outcome, h_now);
                }
            }
            if fenced.is_none()
                && running
                && armed.is_some_and(|at| h_now >= at + timing.fence_delay)
            {
                fenced = Some(r);
            }
            if let (Some(f), Some(t)) = (fenced, taken) {
                return (f, t);
            }
            if r < 100 || taken.is_some() {
                continue;
            }
            let t_now = clock(r, taker_ppm) + Duration::from_secs(5);
            if api.lease.resource_version != seen_rv {
                seen_rv = api.lease.resource_version.clone();
                t.observe(Some(api.lease.clone()), t_now);
            }
            if t.step(t_now)
                .iter()
                .any(|a| matches!(a, GuardAction::Acquire { .. }))
            {
                taken = Some(r);
            }
        }
        panic!("no fence or no takeover: {fenced:?} {taken:?}");
    }

    #[test]
    fn clock_drift_at_the_bound_the_holder_is_fenced_before_a_takeover() {
        let d = VolumeTiming::default();
        // Slow holder, fast taker: the worst pair within 1 %.
        let (fenced, taken) = race(d, -10_000, 10_000);
        assert!(fenced < taken, "{fenced} {taken}");
        assert!(
            taken - fenced >= 2_000,
            "the margin is left over: {fenced} {taken}"
        );
        // The tightest timing validate() accepts: 6 + 2.9 + 1 s = 10 s shrunk by 1 %, 1 ms margin.
        let tight = VolumeTiming {
            stop_budget: ms(2_900),
            margin: ms(1),
            ..d
        };
        assert_eq!(tight.validate(), Ok(()));
        let (fenced, taken) = race(tight, -10_000, 10_000);
        assert!(fenced < taken, "{fenced} {taken}");
        assert!(taken - fenced < 10, "tight: {fenced} {taken}");
        // Clocks drifting 1.5 % where 1 % was assumed: the taker is in while the holder writes.
        let (fenced, taken) = race(tight, -15_000, 15_000);
        assert!(fenced > taken, "{fenced} {taken}");
    }
}
