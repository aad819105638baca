//! The controller's decisions for one protected volume ([`VolumeSwitch`]): which consumer carries
//! the role label, when to hand the lease over after a fence, how a planned switchover (or
//! failback) sets and clears the preferred holder, and the Events users see.
//!
//! The controller only reads (the volume Lease, the consumer pods, the remediation phases and
//! verdicts of their nodes), calls [`VolumeSwitch::step`] and writes what it returns; the
//! simulation calls the same function.
//!
//! # Rules
//! - **Role label** (`twosite.dev/role=active`): only on the consumer for which
//!   [`VolumeLease::is_held_by`] holds with the Lease's epoch. During a handover nobody carries
//!   it. Removals come before the addition, so a Service never selects two consumers.
//! - **Handover** ([`plan_handover`]): only once the holder's node is *proven fenced* by the
//!   remediation core ([`proven_fenced`]: the fence is committed), to a consumer on a live,
//!   unfenced node, with an epoch above every epoch seen ([`handover`]).
//! - **Planned switchover** ([`plan_switchover`]): a request names a consumer of this volume
//!   (or any standby); the controller sets the preferred holder; the holder demotes and
//!   releases; the preferred one takes the released lease; the controller clears the preferred
//!   holder once it holds, so a later failover is not pulled back. A target that is not a
//!   consumer, is the holder already, or sits on a node that is not live is refused.
//! - **Stale views**: a Lease whose epoch is below one already seen is not acted on.
//! - At most one Lease write per step: each carries the `resourceVersion` it was decided on.

use super::{Handover, TakeRefusal, VolumeLease, VolumeTiming, handover};
use crate::remediation::{NodeRemediation, Phase};
use crate::time::MonoTime;
use crate::verdict::NodeVerdict;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use thiserror::Error;

/// The label the controller keeps on the active consumer's pod (a Service selects it).
pub const ROLE_LABEL: &str = "twosite.dev/role";
pub const ROLE_ACTIVE: &str = "active";

/// Whether the remediation core has proven a node fenced: the fence is committed on its
/// heartbeat Lease (a commit that fails means the node renewed, so `Committing` is not enough).
pub fn proven_fenced(phase: &Phase) -> bool {
    matches!(phase, Phase::Fenced | Phase::Tainted)
}

/// The node sets [`VolumeFacts`] needs, from the leader's verdicts and remediation states:
/// `(fenced, live)` — proven fenced ([`proven_fenced`]), and judged Healthy.
pub fn node_sets<'a>(
    verdicts: impl IntoIterator<Item = (&'a String, &'a NodeVerdict)>,
    remediation: impl IntoIterator<Item = (&'a String, &'a NodeRemediation)>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let fenced = remediation
        .into_iter()
        .filter(|(_, r)| proven_fenced(&r.phase))
        .map(|(n, _)| n.clone())
        .collect();
    let live = verdicts
        .into_iter()
        .filter(|(_, v)| **v == NodeVerdict::Healthy)
        .map(|(n, _)| n.clone())
        .collect();
    (fenced, live)
}

/// One consumer of the volume as the controller sees its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumer {
    /// The guard's identity: the pod UID.
    pub identity: String,
    /// The node the pod is bound to.
    pub node: String,
    /// The pod carries `twosite.dev/role=active`.
    pub role_active: bool,
}

/// Whom a switchover request names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchTarget {
    /// Any consumer other than the holder, on a live node.
    AnyStandby,
    /// This consumer (a pod UID).
    To(String),
}

/// What the controller knows of one volume at one instant.
#[derive(Debug, Clone, Copy)]
pub struct VolumeFacts<'a> {
    pub lease: &'a VolumeLease,
    pub consumers: &'a [Consumer],
    /// Nodes the remediation core has proven fenced ([`proven_fenced`]).
    pub fenced_nodes: &'a BTreeSet<String>,
    /// Nodes judged Healthy.
    pub live_nodes: &'a BTreeSet<String>,
    /// A pending switchover request (`twosite switchover`), if any.
    pub request: Option<&'a SwitchTarget>,
}

/// The Event reasons users see on the volume's Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VolumeEventReason {
    VolumeSwitchover,
    VolumeFailover,
    VolumeDemoteTimeout,
    VolumeSwitchoverRefused,
}

impl VolumeEventReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            VolumeEventReason::VolumeSwitchover => "VolumeSwitchover",
            VolumeEventReason::VolumeFailover => "VolumeFailover",
            VolumeEventReason::VolumeDemoteTimeout => "VolumeDemoteTimeout",
            VolumeEventReason::VolumeSwitchoverRefused => "VolumeSwitchoverRefused",
        }
    }

    pub fn is_warning(&self) -> bool {
        !matches!(self, VolumeEventReason::VolumeSwitchover)
    }
}

/// What the controller's shell must do for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeAction {
    /// Write the handover onto the Lease, precondition `expected_rv`.
    HandOver {
        expected_rv: String,
        handover: Handover,
    },
    /// Set the preferred holder and drop the request, precondition `expected_rv`.
    SetPreferred { expected_rv: String, to: String },
    /// Clear the preferred holder, precondition `expected_rv`.
    ClearPreferred { expected_rv: String },
    /// Drop a refused request, precondition `expected_rv`.
    DropRequest { expected_rv: String },
    /// Put (or remove) the role label on the consumer's pod.
    SetRole { identity: String, active: bool },
    Event {
        reason: VolumeEventReason,
        message: String,
    },
}

/// Why the controller does not switch, or does not hand over.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum SwitchRefusal {
    #[error("{identity} is not a consumer of this volume")]
    NotAConsumer { identity: String },
    #[error("{identity} holds the lease already")]
    AlreadyHolder { identity: String },
    #[error("the node {node} of {identity} is not live")]
    TargetNotLive { identity: String, node: String },
    #[error("no consumer on a live, unfenced node can take over")]
    NoStandby,
    #[error("nobody holds the lease")]
    NoHolder,
    #[error("the holder {identity} is no known consumer: its node cannot be proven fenced")]
    HolderUnknown { identity: String },
    #[error("the holder's node {node} is not proven fenced")]
    HolderNotFenced { node: String },
    #[error("the lease is being handed over already")]
    HandoverPending,
    #[error("the Lease shows epoch {seen}, older than epoch {known} already seen: a stale read")]
    StaleEpoch { seen: u64, known: u64 },
    #[error(transparent)]
    Lease(#[from] TakeRefusal),
}

/// The consumer the role label belongs on: the one that holds the lease with its epoch.
pub fn active_consumer<'a>(lease: &VolumeLease, consumers: &'a [Consumer]) -> Option<&'a Consumer> {
    consumers
        .iter()
        .find(|c| lease.is_held_by(&c.identity, lease.epoch))
}

fn viable<'a>(
    consumers: &'a [Consumer],
    identity: &str,
    fenced: &BTreeSet<String>,
    live: &BTreeSet<String>,
) -> Result<&'a Consumer, SwitchRefusal> {
    let c = consumers
        .iter()
        .find(|c| c.identity == identity)
        .ok_or_else(|| SwitchRefusal::NotAConsumer {
            identity: identity.to_string(),
        })?;
    if !live.contains(&c.node) || fenced.contains(&c.node) {
        return Err(SwitchRefusal::TargetNotLive {
            identity: identity.to_string(),
            node: c.node.clone(),
        });
    }
    Ok(c)
}

fn any_standby<'a>(
    lease: &VolumeLease,
    consumers: &'a [Consumer],
    fenced: &BTreeSet<String>,
    live: &BTreeSet<String>,
) -> Option<&'a Consumer> {
    let holder = lease.holder();
    consumers.iter().find(|c| {
        Some(c.identity.as_str()) != holder && live.contains(&c.node) && !fenced.contains(&c.node)
    })
}

/// The consumer a planned switchover moves the lease to (the preferred holder to set).
pub fn plan_switchover(
    lease: &VolumeLease,
    consumers: &[Consumer],
    fenced: &BTreeSet<String>,
    live: &BTreeSet<String>,
    target: &SwitchTarget,
) -> Result<String, SwitchRefusal> {
    match target {
        SwitchTarget::To(id) => {
            let c = viable(consumers, id, fenced, live)?;
            if lease.holder() == Some(id.as_str()) && lease.handover.is_none() {
                return Err(SwitchRefusal::AlreadyHolder {
                    identity: id.clone(),
                });
            }
            Ok(c.identity.clone())
        }
        SwitchTarget::AnyStandby => any_standby(lease, consumers, fenced, live)
            .map(|c| c.identity.clone())
            .ok_or(SwitchRefusal::NoStandby),
    }
}

/// The controller's handover after fencing the holder's node: to `to` if given (it must be a
/// consumer on a live node), else to any standby. Refused unless the holder's node is proven
/// fenced, and on a view older than `known_epoch`. Returns the write's precondition and the
/// handover.
pub fn plan_handover(
    lease: &VolumeLease,
    consumers: &[Consumer],
    fenced: &BTreeSet<String>,
    live: &BTreeSet<String>,
    to: Option<&str>,
    known_epoch: Option<u64>,
) -> Result<(String, Handover), SwitchRefusal> {
    let known = known_epoch.unwrap_or(0);
    if lease.epoch < known {
        return Err(SwitchRefusal::StaleEpoch {
            seen: lease.epoch,
            known,
        });
    }
    let holder = lease.holder().ok_or(SwitchRefusal::NoHolder)?;
    let node = &consumers
        .iter()
        .find(|c| c.identity == holder)
        .ok_or_else(|| SwitchRefusal::HolderUnknown {
            identity: holder.to_string(),
        })?
        .node;
    if !fenced.contains(node) {
        return Err(SwitchRefusal::HolderNotFenced { node: node.clone() });
    }
    if let Some(h) = &lease.handover
        && viable(consumers, &h.to, fenced, live).is_ok()
    {
        return Err(SwitchRefusal::HandoverPending);
    }
    let target = match to {
        Some(id) => viable(consumers, id, fenced, live)?,
        None => any_standby(lease, consumers, fenced, live).ok_or(SwitchRefusal::NoStandby)?,
    };
    if target.identity == holder {
        return Err(SwitchRefusal::AlreadyHolder {
            identity: holder.to_string(),
        });
    }
    Ok(handover(lease, &target.identity)?)
}

/// One volume's switching, from the controller's side. Keep one per volume while leading;
/// start afresh after a restart or a new term.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSwitch {
    known_epoch: Option<u64>,
    /// The holder last seen, with its epoch.
    last_holder: Option<(String, u64)>,
    /// The planned switchover under way: its target, since when (this controller's clock).
    switching: Option<(String, MonoTime)>,
    demote_timeout_reported: bool,
    /// The Lease version the last write was decided on, and when: that version is stale
    /// whether the write succeeded or conflicted, so it is not decided on again (for a renew
    /// interval, in case the write never reached the server).
    wrote: Option<(String, MonoTime)>,
    last_refusal: Option<SwitchRefusal>,
}

fn event(reason: VolumeEventReason, message: String) -> VolumeAction {
    VolumeAction::Event { reason, message }
}

impl VolumeSwitch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Why the last step did not act (for status and logs).
    pub fn last_refusal(&self) -> Option<&SwitchRefusal> {
        self.last_refusal.as_ref()
    }

    /// What to do for the volume at `now` (this controller's clock). Call it on every pass; a
    /// Lease write that fails is decided again on the next read.
    pub fn step(
        &mut self,
        f: &VolumeFacts<'_>,
        now: MonoTime,
        timing: &VolumeTiming,
    ) -> Vec<VolumeAction> {
        let lease = f.lease;
        let known = self.known_epoch.unwrap_or(0);
        if lease.epoch < known {
            self.last_refusal = Some(SwitchRefusal::StaleEpoch {
                seen: lease.epoch,
                known,
            });
            return Vec::new();
        }
        self.known_epoch = Some(lease.epoch);
        self.last_refusal = None;
        let mut out = self.roles(f);
        self.note_holder(lease, &mut out);
        self.lease_write(f, now, timing, &mut out);
        out
    }

    fn roles(&self, f: &VolumeFacts<'_>) -> Vec<VolumeAction> {
        let active = active_consumer(f.lease, f.consumers).map(|c| c.identity.as_str());
        let mut off = Vec::new();
        let mut on = Vec::new();
        for c in f.consumers {
            let want = Some(c.identity.as_str()) == active;
            if c.role_active != want {
                let a = VolumeAction::SetRole {
                    identity: c.identity.clone(),
                    active: want,
                };
                if want { on.push(a) } else { off.push(a) }
            }
        }
        off.extend(on);
        off
    }

    fn note_holder(&mut self, lease: &VolumeLease, out: &mut Vec<VolumeAction>) {
        let Some(h) = lease.holder().filter(|_| lease.handover.is_none()) else {
            return;
        };
        let now = (h.to_string(), lease.epoch);
        if self.last_holder.as_ref() == Some(&now) {
            return;
        }
        let before = self.last_holder.replace(now);
        let Some((prev, _)) = before.filter(|(p, _)| p != h) else {
            return;
        };
        // A switch this controller never saw requested (it finished between two passes) is
        // still the planned one when the Lease names its new holder as the preferred one.
        let planned = self.switching.as_ref().is_some_and(|(to, _)| to == h)
            || lease.preferred_holder.as_deref() == Some(h);
        if planned {
            out.push(event(
                VolumeEventReason::VolumeSwitchover,
                format!(
                    "planned switchover done: {h} holds the volume (epoch {}), {prev} stood down",
                    lease.epoch
                ),
            ));
        } else {
            out.push(event(
                VolumeEventReason::VolumeFailover,
                format!(
                    "{h} took the volume over from {prev} (epoch {})",
                    lease.epoch
                ),
            ));
        }
    }

    fn lease_write(
        &mut self,
        f: &VolumeFacts<'_>,
        now: MonoTime,
        timing: &VolumeTiming,
        out: &mut Vec<VolumeAction>,
    ) {
        let lease = f.lease;
        let rv = lease.resource_version.clone();
        if self
            .wrote
            .as_ref()
            .is_some_and(|(v, at)| *v == rv && now < *at + timing.renew)
        {
            return;
        }
        let before = out.len();
        self.decide_write(f, now, timing, out);
        let wrote = out[before..].iter().any(|a| {
            matches!(
                a,
                VolumeAction::HandOver { .. }
                    | VolumeAction::SetPreferred { .. }
                    | VolumeAction::ClearPreferred { .. }
                    | VolumeAction::DropRequest { .. }
            )
        });
        if wrote {
            self.wrote = Some((rv, now));
        }
    }

    fn decide_write(
        &mut self,
        f: &VolumeFacts<'_>,
        now: MonoTime,
        timing: &VolumeTiming,
        out: &mut Vec<VolumeAction>,
    ) {
        let lease = f.lease;
        let rv = lease.resource_version.clone();
        // Failover: the holder's node is proven fenced.
        match plan_handover(
            lease,
            f.consumers,
            f.fenced_nodes,
            f.live_nodes,
            lease.preferred_holder.as_deref(),
            self.known_epoch,
        )
        .or_else(|e| match e {
            // The preferred one cannot take it: anyone else may.
            SwitchRefusal::NotAConsumer { .. } | SwitchRefusal::TargetNotLive { .. } => {
                plan_handover(
                    lease,
                    f.consumers,
                    f.fenced_nodes,
                    f.live_nodes,
                    None,
                    self.known_epoch,
                )
            }
            e => Err(e),
        }) {
            Ok((expected_rv, handover)) => {
                let from = lease.holder().unwrap_or_default().to_string();
                out.push(event(
                    VolumeEventReason::VolumeFailover,
                    format!(
                        "the node of {from} is fenced: the volume is handed over to {} (epoch {})",
                        handover.to, handover.epoch
                    ),
                ));
                out.push(VolumeAction::HandOver {
                    expected_rv,
                    handover,
                });
                return;
            }
            Err(e) => self.last_refusal = Some(e),
        }
        if let Some(p) = lease.preferred_holder.as_deref().filter(|p| !p.is_empty()) {
            if lease.is_held_by(p, lease.epoch) {
                // Done: clear it, or a later failover would be pulled back.
                self.switching = None;
                self.demote_timeout_reported = false;
                out.push(VolumeAction::ClearPreferred { expected_rv: rv });
                return;
            }
            if let Err(e) = viable(f.consumers, p, f.fenced_nodes, f.live_nodes) {
                self.switching = None;
                out.push(event(
                    VolumeEventReason::VolumeSwitchoverRefused,
                    format!("switchover to {p} abandoned: {e}"),
                ));
                out.push(VolumeAction::ClearPreferred { expected_rv: rv });
                return;
            }
            let since = match &self.switching {
                Some((to, since)) if to == p => *since,
                _ => {
                    self.switching = Some((p.to_string(), now));
                    self.demote_timeout_reported = false;
                    now
                }
            };
            let limit = timing.demote_after + timing.stop_budget;
            if !self.demote_timeout_reported
                && lease.holder().is_some_and(|h| h != p)
                && now.since(since) > limit
            {
                self.demote_timeout_reported = true;
                out.push(event(
                    VolumeEventReason::VolumeDemoteTimeout,
                    format!(
                        "{} has not stood down for {p} within {limit:?}: its app may not stop",
                        lease.holder().unwrap_or_default()
                    ),
                ));
            }
            return;
        }
        let Some(target) = f.request else {
            return;
        };
        match plan_switchover(lease, f.consumers, f.fenced_nodes, f.live_nodes, target) {
            Ok(to) => {
                self.switching = Some((to.clone(), now));
                self.demote_timeout_reported = false;
                out.push(VolumeAction::SetPreferred {
                    expected_rv: rv,
                    to,
                });
            }
            Err(e) => {
                out.push(event(
                    VolumeEventReason::VolumeSwitchoverRefused,
                    format!("switchover refused: {e}"),
                ));
                out.push(VolumeAction::DropRequest { expected_rv: rv });
            }
        }
    }
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod tests;
