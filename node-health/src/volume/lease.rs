//! What a volume Lease says, and who may take it: [`may_take`] and the controller's [`handover`].

use super::VolumeTiming;
use crate::time::MonoTime;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

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
    /// The controller holds this lease for a VirtualMachine's launcher pod on this node
    /// (annotation `twosite.dev/held-for-node`; empty while the pod is not yet bound). Nobody
    /// renews such a lease, so it never expires by time: it moves only by the controller's own
    /// write once the holder is proven stopped ([`crate::vm`]).
    #[serde(default)]
    pub held_for_node: Option<String>,
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

    pub(super) fn preferred_other(&self, me: &str) -> Option<&str> {
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
        Some(_) if expired && l.held_for_node.is_none() => take(TakeBasis::Expired, next),
        Some(h) => Err(TakeRefusal::Held {
            holder: h.to_string(),
            unchanged,
            needed,
        }),
    }
}

/// Whether the acquire write of `me` keeps the preferred holder: kept when it names `me` (the
/// switchover is done), cleared when it names another consumer — which can only happen on a take
/// by expiry, so that consumer let a lease that was free for it go unused for a whole takeover
/// period (dead, or gone). Kept, it would make the new holder demote at once for a switchover
/// nobody completes, and the volume would never be served.
pub fn acquire_keeps_preferred(lease: &VolumeLease, me: &str) -> bool {
    lease.preferred_other(me).is_none()
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
