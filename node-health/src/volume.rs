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

pub mod device;
mod guard;
mod lease;
pub mod node_deadline;
pub mod switch;
pub mod switchover;
mod timing;

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod tests;

pub use guard::{
    DemoteReason, GuardAction, GuardConfigError, GuardState, VolumeGuard, WriteId, WriteOutcome,
};
pub use lease::{
    Handover, LeaseView, Take, TakeBasis, TakeRefusal, VolumeLease, acquire_keeps_preferred,
    handover, may_take,
};
pub use switch::{
    Consumer, SwitchRefusal, SwitchTarget, VolumeAction, VolumeEventReason, VolumeFacts,
    VolumeSwitch, active_consumer, node_sets, plan_handover, plan_switchover, proven_fenced,
};
pub use timing::{VolumeTiming, VolumeTimingError};
