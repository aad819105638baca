//! The holder side: [`VolumeGuard`], its states, actions and write outcomes.

use super::{LeaseView, TakeRefusal, VolumeLease, VolumeTiming, VolumeTimingError, may_take};
use crate::time::MonoTime;
use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    /// released flag, no handover; the preferred holder kept only if
    /// [`acquire_keeps_preferred`](super::acquire_keeps_preferred).
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
    /// The app could not be started for a while (the node agent refuses the deadline, the
    /// mount fails): the lease goes back so another consumer can write.
    StartRefused,
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
    /// Since when every start of this tenure's app was refused ([`VolumeGuard::start_refused`]).
    refused_since: Option<MonoTime>,
    /// Starts were refused for too long: give the lease back.
    stand_down: bool,
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
            refused_since: None,
            stand_down: false,
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

    /// The app could not be started after `StartApp` (the node agent refused the deadline, or
    /// mounting or starting failed): it is not running. An active guard tries again at the next
    /// step; once starts have been refused for `demote_after`, it gives the lease back and waits
    /// a lease duration before competing again, so a consumer that can write takes over
    /// instead of this one holding the volume with nothing running.
    pub fn start_refused(&mut self, now: MonoTime) {
        self.app = AppState::Stopped;
        let since = *self.refused_since.get_or_insert(now);
        if matches!(self.state, GuardState::Active { .. })
            && now >= since + self.timing.demote_after
        {
            self.stand_down = true;
            self.retry_at = Some(now + self.timing.duration);
        }
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
            && (self.retiring
                || self.stand_down
                || v.lease.preferred_other(&self.identity).is_some())
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
                self.refused_since = None;
                self.stand_down = false;
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
        if self.stand_down {
            return Some(DemoteReason::StartRefused);
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
