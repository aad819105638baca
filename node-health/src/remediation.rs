//! Who may fence, taint and release a node: the controller's per-node remediation state machine.
//!
//! Healthy → Suspect → FenceWaiting → Fenced → Tainted → Recovering → Healthy.
//!
//! A node counts as fenced only when both hold, on the controller's clock:
//! - its fence deadline has passed: the agent's lease ran out and its watchdog fired since
//!   (see [`crate::verdict::judge`]);
//! - nobody can be keeping it alive: every node that may vouch for it (its partner, or every
//!   node of the other room when it has no partner) has been *clear* — renewing cleanly, so not
//!   vouching — for a vouch's validity plus the watchdog plus the margin.
//!
//! Then the fence is *committed*: a marker is written onto the node's heartbeat Lease with the
//! resourceVersion the verdict was judged on as precondition. If the agent renewed meanwhile (the
//! node came back), the write conflicts and nothing is done. Once committed, the agent cannot
//! regain the right to run until the marker is cleared, so the node's pods can be deleted
//! (grace period 0) and the out-of-service taint applied even if it boots right then. The taint
//! and the marker come off once the node is back with a new boot ID, its agent renewing, and
//! nothing left terminating on it.

use crate::time::{MonoTime, stretch};
use crate::verdict::{HealthTiming, NodeVerdict};
use serde::{Deserialize, Serialize};

/// The out-of-service taint: key, value and effect.
pub const OUT_OF_SERVICE_TAINT_KEY: &str = "node.kubernetes.io/out-of-service";
pub const OUT_OF_SERVICE_TAINT_VALUE: &str = "nodeshutdown";
pub const OUT_OF_SERVICE_TAINT_EFFECT: &str = "NoExecute";
/// twosite's own taint on a node judged dead, from the verdict on and before any fence: it keeps
/// kube-scheduler from binding new pods there (above all the replacements of the dead nodes'
/// pods) while the node still reads `Ready`. `NoSchedule` only: nothing is evicted before the
/// fence.
pub const UNRESPONSIVE_TAINT_KEY: &str = "twosite.dev/unresponsive";
pub const UNRESPONSIVE_TAINT_EFFECT: &str = "NoSchedule";
/// How long the controller must have seen a dead node's `NoSchedule` taint before it releases
/// its pods: kube-scheduler's cache lags the API server by its watch delay, and a replacement
/// must not be bound back onto the node it replaces (or another dead node of a lost room, all of
/// which are marked on their first Dead verdict). Costs nothing when the verdict comes before
/// the fence deadline (the usual case); delays the fence by about this much when a controller
/// that just took over finds a node dead past its deadline.
pub const UNSCHEDULABLE_HEAD_START: std::time::Duration = std::time::Duration::from_secs(1);
/// A node with this label set to `true` is never fenced or tainted.
pub const EXCLUDE_LABEL: &str = "twosite.dev/exclude-from-remediation";
/// The annotation twosite puts on a node it tainted: the boot ID the node had when fenced.
pub const FENCED_BOOT_ANNOTATION: &str = "twosite.dev/fenced-boot-id";

/// Why a dead node is not fenced yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    /// Its fence deadline has not passed.
    Deadline,
    /// A node that could vouch for it has not been clear long enough.
    VoucherNotClear,
    /// Remediation is paused for the whole cluster.
    Paused,
    /// A witness is configured and the controller does not hold its grant for the other room.
    NoWitnessGrant,
    /// Its `NoSchedule` taint has not been on for [`UNSCHEDULABLE_HEAD_START`] yet: released
    /// pods could be bound back onto it by a scheduler that has not seen the taint.
    NotUnschedulableYet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Healthy,
    Suspect,
    FenceWaiting(WaitReason),
    /// Proven fenced; the fence marker is being written onto the heartbeat Lease.
    Committing,
    /// Fence committed; pods being deleted and taint being applied.
    Fenced,
    Tainted,
    /// Back with a new boot ID; the taint comes off once nothing is left terminating.
    Recovering,
    /// Dead, but without an agent nothing proves it stopped: left to the operator.
    NoAgent,
    /// Dead, but excluded from remediation (control plane or labelled).
    Excluded,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Healthy => "Healthy",
            Phase::Suspect => "Suspect",
            Phase::FenceWaiting(_) => "FenceWaiting",
            Phase::Committing => "Committing",
            Phase::Fenced => "Fenced",
            Phase::Tainted => "Tainted",
            Phase::Recovering => "Recovering",
            Phase::NoAgent => "NoAgent",
            Phase::Excluded => "Excluded",
        }
    }
}

/// The Event reasons users see on the Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventReason {
    NodeSuspect,
    NodeFenceWaiting,
    NodeFenced,
    OutOfServiceTaintApplied,
    OutOfServiceTaintRemoved,
    RemediationPaused,
    NodeNoAgent,
    NodeExcluded,
    NodeReturnedWithoutReboot,
}

impl EventReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventReason::NodeSuspect => "NodeSuspect",
            EventReason::NodeFenceWaiting => "NodeFenceWaiting",
            EventReason::NodeFenced => "NodeFenced",
            EventReason::OutOfServiceTaintApplied => "OutOfServiceTaintApplied",
            EventReason::OutOfServiceTaintRemoved => "OutOfServiceTaintRemoved",
            EventReason::RemediationPaused => "RemediationPaused",
            EventReason::NodeNoAgent => "NodeNoAgent",
            EventReason::NodeExcluded => "NodeExcluded",
            EventReason::NodeReturnedWithoutReboot => "NodeReturnedWithoutReboot",
        }
    }

    /// Warning (true) or Normal.
    pub fn is_warning(&self) -> bool {
        !matches!(
            self,
            EventReason::OutOfServiceTaintRemoved | EventReason::OutOfServiceTaintApplied
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Write the fence marker (the boot ID) onto the node's heartbeat Lease, precondition
    /// `resourceVersion == heartbeat`; report the outcome with [`NodeRemediation::commit_result`].
    CommitFence {
        heartbeat: String,
        fenced_boot_id: Option<String>,
    },
    /// Remove the fence marker from the heartbeat Lease (read-modify-write, retried on conflict).
    ClearFence,
    /// Delete every pod bound to the node with grace period 0 (DaemonSet pods excepted).
    DeletePods,
    /// Add the out-of-service taint, keeping every other taint, and record the boot ID.
    ApplyTaint { fenced_boot_id: Option<String> },
    /// Remove the out-of-service taint (and the annotation), keeping every other taint.
    RemoveTaint,
    /// Add [`UNRESPONSIVE_TAINT_KEY`] (`NoSchedule`), keeping every other taint.
    MarkUnschedulable,
    /// Remove [`UNRESPONSIVE_TAINT_KEY`], keeping every other taint.
    ClearUnschedulable,
    Event {
        reason: EventReason,
        message: String,
    },
}

/// What the controller knows of one node at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemediationInput {
    pub verdict: NodeVerdict,
    /// Since when every node that may vouch for this one has been clear; `None` if one is not.
    pub vouchers_clear_since: Option<MonoTime>,
    /// Control-plane node, or labelled `twosite.dev/exclude-from-remediation=true`.
    pub excluded: bool,
    /// The out-of-service taint is on the node.
    pub tainted: bool,
    /// Since when the controller has seen our `twosite.dev/unresponsive:NoSchedule` taint on
    /// the node, continuously (its clock); `None`: it is not on.
    pub unschedulable_since: Option<MonoTime>,
    /// The node carries our fenced-boot annotation (we tainted it, maybe before a restart).
    pub fenced_boot_annotation: Option<String>,
    /// Pods bound to the node that are not DaemonSet pods.
    pub pods: usize,
    /// Pods bound to the node that are terminating.
    pub terminating_pods: usize,
    /// The Ready condition is True.
    pub ready: bool,
    /// `status.nodeInfo.bootID`.
    pub boot_id: Option<String>,
    /// The heartbeat Lease's resourceVersion the verdict was judged on.
    pub heartbeat: Option<String>,
    /// The fence marker is on the heartbeat Lease.
    pub fence_marker: bool,
    /// Remediation is paused for the whole cluster (stale watches, storm).
    pub paused: bool,
    /// No witness is configured, or the controller holds a valid witness grant for the room
    /// opposite this node's (so this node's room cannot hold one).
    pub witness_ok: bool,
}

/// One node's remediation, from the controller's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemediation {
    pub phase: Phase,
    /// The boot ID the node had when it was fenced.
    pub fenced_boot_id: Option<String>,
    /// A warning about a node that came back without a reboot was given.
    warned_no_reboot: bool,
    /// The first step has run (after a restart, our own taint and marker are picked up once).
    started: bool,
}

impl Default for NodeRemediation {
    fn default() -> Self {
        NodeRemediation {
            phase: Phase::Healthy,
            fenced_boot_id: None,
            warned_no_reboot: false,
            started: false,
        }
    }
}

fn event(reason: EventReason, message: impl Into<String>) -> Action {
    Action::Event {
        reason,
        message: message.into(),
    }
}

impl NodeRemediation {
    /// Advances the node's remediation to `now` and returns what the shell must do. The shell
    /// repeats the call every few hundred milliseconds; actions are idempotent.
    pub fn step(&mut self, i: &RemediationInput, now: MonoTime, t: &HealthTiming) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            // After a controller restart, a fence we committed is picked up where it was: while
            // the marker holds, the node cannot run; without it, only the taint is left to lift.
            if i.fence_marker {
                self.phase = Phase::Tainted;
                self.fenced_boot_id = i.fenced_boot_annotation.clone();
            } else if i.tainted && i.fenced_boot_annotation.is_some() {
                self.phase = Phase::Recovering;
                self.fenced_boot_id = i.fenced_boot_annotation.clone();
            }
        }
        match self.phase {
            // Waiting for the shell to report the commit's outcome.
            Phase::Committing => {}
            Phase::Fenced => {
                if i.tainted {
                    if i.pods > 0 {
                        out.push(Action::DeletePods);
                    }
                    self.phase = Phase::Tainted;
                    out.push(event(
                        EventReason::OutOfServiceTaintApplied,
                        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute applied",
                    ));
                } else {
                    out.extend(self.taint_then_release());
                }
            }
            Phase::Tainted => {
                if !i.fence_marker {
                    // The marker is what keeps the node from running: without it, lift the rest.
                    self.phase = Phase::Recovering;
                } else {
                    if !i.tainted {
                        out.extend(self.taint_then_release());
                    } else if i.pods > 0 {
                        out.push(Action::DeletePods);
                    }
                    if i.verdict == NodeVerdict::Healthy && i.ready {
                        if i.boot_id.is_some() && i.boot_id != self.fenced_boot_id {
                            self.phase = Phase::Recovering;
                        } else if !self.warned_no_reboot {
                            self.warned_no_reboot = true;
                            out.push(event(
                                EventReason::NodeReturnedWithoutReboot,
                                "the node is back with the boot ID it had when fenced; it stays fenced until an operator checks it",
                            ));
                        }
                    }
                }
            }
            Phase::Recovering => {
                let back = i.verdict == NodeVerdict::Healthy
                    && i.ready
                    && i.boot_id.is_some()
                    && i.boot_id != self.fenced_boot_id;
                if i.verdict.is_dead() {
                    // Gone again before it was cleared: a new fence needs a new proof.
                    self.judge(i, now, t, &mut out);
                } else if !back || i.terminating_pods > 0 {
                    // Wait: not back yet, or the taint still lets volumes detach.
                } else if i.tainted || i.fence_marker {
                    if i.tainted {
                        out.push(Action::RemoveTaint);
                    }
                    if i.fence_marker {
                        out.push(Action::ClearFence);
                    }
                } else {
                    self.phase = Phase::Healthy;
                    self.fenced_boot_id = None;
                    self.warned_no_reboot = false;
                    out.push(event(
                        EventReason::OutOfServiceTaintRemoved,
                        "the node is back with a new boot ID and a renewing agent",
                    ));
                }
            }
            _ => self.judge(i, now, t, &mut out),
        }
        if let Some(a) = self.unschedulable_change(i) {
            // First: it is what keeps the replacements away while this pass goes on.
            out.insert(0, a);
        }
        out
    }

    /// The early `NoSchedule` taint: on as soon as the node is judged dead (not excluded, not
    /// paused: a verdict the controller distrusts changes nothing), long before the fence; off
    /// once it is Healthy again and not fenced. A fenced node keeps it until its recovery is
    /// complete: the out-of-service taint comes on behind it and goes first.
    fn unschedulable_change(&self, i: &RemediationInput) -> Option<Action> {
        let fenced = matches!(
            self.phase,
            Phase::Committing | Phase::Fenced | Phase::Tainted | Phase::Recovering
        );
        let on = i.unschedulable_since.is_some();
        if !on && i.verdict.is_dead() && !i.excluded && !i.paused {
            Some(Action::MarkUnschedulable)
        } else if on && i.verdict == NodeVerdict::Healthy && !fenced {
            Some(Action::ClearUnschedulable)
        } else {
            None
        }
    }

    /// The shell's report on an [`Action::CommitFence`]: `true` when the marker was written,
    /// `false` when the heartbeat Lease had changed (the node renewed) or the write failed.
    /// Returns what the shell must do next, in the same pass: once committed, the taint, then
    /// the release of the node's pods ([`NodeRemediation::taint_then_release`]).
    #[must_use]
    pub fn commit_result(&mut self, committed: bool) -> Vec<Action> {
        if self.phase != Phase::Committing {
            return Vec::new();
        }
        if committed {
            self.phase = Phase::Fenced;
            self.taint_then_release()
        } else {
            self.phase = Phase::Suspect;
            Vec::new()
        }
    }

    /// The failover path of a fenced node that is not tainted yet: first the out-of-service
    /// taint (NoExecute, so the scheduler places nothing new there), then the deletion of its
    /// pods. The shell executes them in this order and stops at the first that fails: a failed
    /// taint write deletes nothing, or the replacements could be bound back onto the dead node,
    /// which still reads Ready until kube-controller-manager notices. The deletion is asked for
    /// even without a pod count: the shell lists the pods itself.
    fn taint_then_release(&self) -> Vec<Action> {
        vec![
            Action::ApplyTaint {
                fenced_boot_id: self.fenced_boot_id.clone(),
            },
            Action::DeletePods,
        ]
    }

    fn judge(
        &mut self,
        i: &RemediationInput,
        now: MonoTime,
        t: &HealthTiming,
        out: &mut Vec<Action>,
    ) {
        let next = match i.verdict {
            NodeVerdict::Healthy => Phase::Healthy,
            NodeVerdict::Suspect(_) => Phase::Suspect,
            _ if i.excluded => Phase::Excluded,
            NodeVerdict::Dead {
                fence_deadline: None,
            } => Phase::NoAgent,
            NodeVerdict::Dead {
                fence_deadline: Some(deadline),
            } => {
                let settle = stretch(t.vouch_validity + t.watchdog + t.fence_margin, t.drift_ppm);
                if i.paused {
                    Phase::FenceWaiting(WaitReason::Paused)
                } else if now < deadline {
                    Phase::FenceWaiting(WaitReason::Deadline)
                } else if i.vouchers_clear_since.is_none_or(|c| now < c + settle) {
                    Phase::FenceWaiting(WaitReason::VoucherNotClear)
                } else if !i.witness_ok {
                    Phase::FenceWaiting(WaitReason::NoWitnessGrant)
                } else if i
                    .unschedulable_since
                    .is_none_or(|u| now < u + UNSCHEDULABLE_HEAD_START)
                {
                    Phase::FenceWaiting(WaitReason::NotUnschedulableYet)
                } else {
                    Phase::Committing
                }
            }
        };
        if next == self.phase {
            return;
        }
        match next {
            Phase::Suspect => out.push(event(
                EventReason::NodeSuspect,
                "the node's heartbeats are late",
            )),
            Phase::FenceWaiting(WaitReason::Paused) => out.push(event(
                EventReason::RemediationPaused,
                "the node is dead, but remediation is paused",
            )),
            Phase::FenceWaiting(WaitReason::Deadline) => out.push(event(
                EventReason::NodeFenceWaiting,
                "the node is dead; waiting for its self-fence deadline",
            )),
            Phase::FenceWaiting(WaitReason::VoucherNotClear) => out.push(event(
                EventReason::NodeFenceWaiting,
                "the node is dead; waiting until its partner in the other room is proven not to vouch for it",
            )),
            Phase::FenceWaiting(WaitReason::NoWitnessGrant) => out.push(event(
                EventReason::NodeFenceWaiting,
                "the node is dead; waiting for the witness to grant the other room the right to run",
            )),
            Phase::FenceWaiting(WaitReason::NotUnschedulableYet) => out.push(event(
                EventReason::NodeFenceWaiting,
                "the node is dead; waiting until the scheduler has seen it unschedulable",
            )),
            Phase::NoAgent => out.push(event(
                EventReason::NodeNoAgent,
                "the node is dead but runs no twosite agent: nothing proves it stopped, so it is left to the operator",
            )),
            Phase::Excluded => out.push(event(
                EventReason::NodeExcluded,
                "the node is dead but excluded from remediation",
            )),
            Phase::Committing => {
                let Some(heartbeat) = i.heartbeat.clone() else {
                    return;
                };
                self.fenced_boot_id = i.boot_id.clone();
                out.push(event(
                    EventReason::NodeFenced,
                    "the node's self-fence deadline has passed and no partner can vouch for it",
                ));
                out.push(Action::CommitFence {
                    heartbeat,
                    fenced_boot_id: self.fenced_boot_id.clone(),
                });
            }
            _ => {}
        }
        self.phase = next;
    }
}

/// Whether remediation must pause for the whole cluster, and why.
///
/// A blind controller (watch not synced) judges nobody. Dead nodes in *both* rooms beyond
/// `max_dead_share_pct` of all workers look like a storm or a partition the controller cannot
/// see through: pause. One whole room lost while the other is healthy is the normal failover
/// and never pauses.
pub fn pause_reason(
    synced: bool,
    dead_per_room: (usize, usize),
    workers: usize,
    max_dead_share_pct: u8,
) -> Option<String> {
    if !synced {
        return Some("the controller's watches are not synced".into());
    }
    let (a, b) = dead_per_room;
    if a > 0 && b > 0 && (a + b) * 100 > workers * usize::from(max_dead_share_pct) {
        return Some(format!(
            "{a} dead node(s) in room A and {b} in room B: more than {max_dead_share_pct}% of {workers} workers"
        ));
    }
    None
}

#[cfg(test)]
mod tests;
