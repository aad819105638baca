//! KubeVirt VirtualMachines that opt in (`twosite.dev/ha: "true"`): which of their disks the
//! volume leases protect, which launcher pods a fence releases, whether a new launcher pod is
//! gated at admission, and when the controller moves a disk's lease to the new pod and lifts the
//! gate ([`VmProtection::step`]).
//!
//! The controller and the simulation read the VM, its launcher pods, its claims and its Leases,
//! call these functions and write what they return.
//!
//! # Rules
//! - **Opt-in** ([`opt_in`]): exactly `"true"`. Any other value is reported once
//!   (`InvalidAnnotation`) and the VM is treated as not opted in. A VM that is not opted in is
//!   never touched: no gate, no lease, no deletion of its launcher pod on a fenced node
//!   ([`release_when_fenced`]): Kubernetes' own out-of-service handling releases it.
//! - **Disks** ([`classify_disk`]): a PVC that is ReadWriteMany and Block gets a volume Lease
//!   ([`disk_lease_name`]); any other disk is reported (`UnprotectedVolume`) and the VM still
//!   gets node-level failover.
//! - **Holding**: the controller holds a disk's Lease for the launcher pod that runs the VM
//!   (holder = the pod's UID, `held_for_node` = its node). Nobody renews it, and no taker may
//!   take it by expiry ([`crate::volume::may_take`]).
//! - **Moving a lease to a new launcher pod** ([`grantable`]): only when the lease is released
//!   or unheld, or the holder is proven stopped: its pod reported a terminal phase, or its node
//!   is proven fenced, or its pod is gone and the node it ran on is live (a live kubelet removes
//!   a pod only after stopping it) or it never ran on a node. A holder on a node that is neither
//!   live nor fenced keeps the lease.
//! - **Gate**: a new launcher pod carries the scheduling gate [`GATE`] from admission; the gate
//!   is lifted only in the same ordered pass that grants (or finds granted) every protected
//!   lease to that pod, after the grants succeeded.

use crate::time::MonoTime;
use crate::volume::VolumeLease;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use thiserror::Error;

/// The VirtualMachine annotation that opts a VM in.
pub const HA_ANNOTATION: &str = "twosite.dev/ha";
/// The label the controller puts on an opted-in VM's `spec.template.metadata.labels`: KubeVirt
/// copies it onto the VMI and its launcher pod, so the admission webhook (object selector) is
/// called only for opted-in VMs' pods and fails closed only for them.
pub const HA_LABEL: &str = "twosite.dev/ha";
/// The pod scheduling gate a new launcher pod of an opted-in VM carries until its leases are
/// granted to it.
pub const GATE: &str = "twosite.dev/volume-leases";
/// The annotation on a disk Lease naming the node the controller holds it for.
pub const HELD_FOR_NODE_ANNOTATION: &str = "twosite.dev/held-for-node";
/// The label KubeVirt puts on launcher pods (`kubevirt.io: virt-launcher`).
pub const LAUNCHER_LABEL: (&str, &str) = ("kubevirt.io", "virt-launcher");
/// The label on a disk Lease naming the PVC it protects.
pub const DISK_LABEL: &str = "twosite.dev/disk";
const DISK_LEASE_PREFIX: &str = "twosite-disk-";
/// Lease names are DNS subdomains: at most 253 characters.
const MAX_NAME: usize = 253;

/// Whether a VM opted in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptIn {
    In,
    Out,
    /// The annotation has this value, which is not `"true"`: treated as not opted in.
    Invalid(String),
}

impl OptIn {
    pub fn is_in(&self) -> bool {
        matches!(self, OptIn::In)
    }
}

/// Reads the opt-in annotation's value.
pub fn opt_in(annotation: Option<&str>) -> OptIn {
    match annotation {
        None => OptIn::Out,
        Some("true") => OptIn::In,
        Some(other) => OptIn::Invalid(other.to_string()),
    }
}

/// A VM's `spec.runStrategy` (or the legacy `spec.running`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Manual,
    Halted,
    Once,
    Unknown(String),
}

impl RunStrategy {
    /// From `spec.runStrategy`, else `spec.running` (true: Always, false: Halted), else Halted
    /// (KubeVirt's own default).
    pub fn parse(run_strategy: Option<&str>, running: Option<bool>) -> RunStrategy {
        match (run_strategy, running) {
            (Some("Always"), _) => RunStrategy::Always,
            (Some("RerunOnFailure"), _) => RunStrategy::RerunOnFailure,
            (Some("Manual"), _) => RunStrategy::Manual,
            (Some("Halted"), _) => RunStrategy::Halted,
            (Some("Once"), _) => RunStrategy::Once,
            (Some(other), _) => RunStrategy::Unknown(other.to_string()),
            (None, Some(true)) => RunStrategy::Always,
            (None, _) => RunStrategy::Halted,
        }
    }

    /// Whether KubeVirt starts a new instance once the old one's launcher pod is gone.
    pub fn restarts_after_loss(&self) -> bool {
        matches!(self, RunStrategy::Always | RunStrategy::RerunOnFailure)
    }

    pub fn name(&self) -> &str {
        match self {
            RunStrategy::Always => "Always",
            RunStrategy::RerunOnFailure => "RerunOnFailure",
            RunStrategy::Manual => "Manual",
            RunStrategy::Halted => "Halted",
            RunStrategy::Once => "Once",
            RunStrategy::Unknown(s) => s,
        }
    }
}

/// What the controller reads of a PVC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimFacts {
    pub access_modes: Vec<String>,
    /// `spec.volumeMode` (absent means Filesystem).
    pub volume_mode: Option<String>,
}

/// Why a disk is not protected by a volume Lease.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum Unprotected {
    #[error("the PVC {pvc} does not exist")]
    ClaimMissing { pvc: String },
    #[error("the PVC {pvc} is not ReadWriteMany ({modes})")]
    NotReadWriteMany { pvc: String, modes: String },
    #[error("the PVC {pvc} is in Filesystem mode, not Block")]
    FilesystemMode { pvc: String },
}

/// One PVC disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub pvc: String,
    /// The Lease that protects it, or why none does.
    pub protection: Result<String, Unprotected>,
}

/// Whether a VM's PVC disk gets a volume Lease: only ReadWriteMany + Block.
pub fn classify_disk(pvc: &str, claim: Option<&ClaimFacts>) -> Disk {
    let protection = match claim {
        None => Err(Unprotected::ClaimMissing {
            pvc: pvc.to_string(),
        }),
        Some(c) if !c.access_modes.iter().any(|m| m == "ReadWriteMany") => {
            Err(Unprotected::NotReadWriteMany {
                pvc: pvc.to_string(),
                modes: c.access_modes.join(","),
            })
        }
        Some(c) if c.volume_mode.as_deref() != Some("Block") => Err(Unprotected::FilesystemMode {
            pvc: pvc.to_string(),
        }),
        Some(_) => Ok(disk_lease_name(pvc)),
    };
    Disk {
        pvc: pvc.to_string(),
        protection,
    }
}

/// The Lease protecting a PVC disk, in the PVC's namespace: `twosite-disk-<pvc>`, shortened with
/// a digest of the whole name when that would exceed 253 characters.
pub fn disk_lease_name(pvc: &str) -> String {
    let name = format!("{DISK_LEASE_PREFIX}{pvc}");
    if name.len() <= MAX_NAME {
        return name;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, pvc.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // PVC names are ASCII (DNS subdomains), so byte slicing is on character boundaries.
    let keep = MAX_NAME - DISK_LEASE_PREFIX.len() - 1 - hex.len();
    format!(
        "{DISK_LEASE_PREFIX}{}-{hex}",
        pvc.get(..keep).unwrap_or(pvc).trim_end_matches(['-', '.'])
    )
}

/// Whose pod a fenced node holds, for the release after the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOwner {
    /// Not a virt-launcher pod.
    Plain,
    /// A virt-launcher pod of a VM with this opt-in (`None`: the VM is not known).
    Launcher(Option<bool>),
}

/// Whether the controller deletes this pod of a proven-fenced node (grace 0). Launcher pods of
/// VMs that did not opt in (or are unknown) are left to Kubernetes' out-of-service handling.
pub fn release_when_fenced(owner: PodOwner) -> bool {
    match owner {
        PodOwner::Plain => true,
        PodOwner::Launcher(opted_in) => opted_in == Some(true),
    }
}

/// The admission webhook's answer for a pod it is called for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Admission {
    /// Add the gate (unless present), and prefer this node if given.
    Gate {
        prefer_node: Option<String>,
        warning: Option<String>,
    },
    /// Admit unchanged, with a warning for the user if there is one.
    Allow { warning: Option<String> },
}

/// What the webhook knows of a pod it is asked about.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionFacts<'a> {
    pub is_launcher: bool,
    /// The VM's name, from the pod's owner reference or labels.
    pub vm_name: Option<&'a str>,
    /// The VM's opt-in, if the VM exists.
    pub vm: Option<&'a OptIn>,
    /// The node the VM last ran on (from its disk Leases), and its partner.
    pub last_node: Option<&'a str>,
    pub partner: Option<&'a str>,
    pub live_nodes: &'a BTreeSet<String>,
    pub fenced_nodes: &'a BTreeSet<String>,
}

/// Gate a new launcher pod of an opted-in VM; leave every other pod alone.
pub fn admit(f: &AdmissionFacts<'_>) -> Admission {
    if !f.is_launcher {
        return Admission::Allow {
            warning: Some(format!(
                "twosite: the pod carries {HA_LABEL} but is not a virt-launcher pod; opt a VirtualMachine in with the annotation instead"
            )),
        };
    }
    let Some(vm_name) = f.vm_name else {
        return Admission::Allow {
            warning: Some("twosite: the launcher pod names no VirtualMachine; not gated".into()),
        };
    };
    match f.vm {
        // The pod carries the label only because an opted-in VM's template did: gate it (safe;
        // the controller lifts the gate once it sees the VM, or reports it gone).
        None => Admission::Gate {
            prefer_node: None,
            warning: Some(format!(
                "twosite: the VirtualMachine {vm_name} is not known (yet); the launcher pod waits at the gate"
            )),
        },
        Some(OptIn::Out) => Admission::Allow { warning: None },
        Some(OptIn::Invalid(v)) => Admission::Allow {
            warning: Some(format!(
                "twosite: the VirtualMachine {vm_name} has {HA_ANNOTATION}={v:?}, not \"true\": not protected"
            )),
        },
        Some(OptIn::In) => Admission::Gate {
            prefer_node: preferred_node(f.last_node, f.partner, f.live_nodes, f.fenced_nodes),
            warning: None,
        },
    }
}

/// Where a restarted VM should go: the partner of the node it last ran on, when that node is
/// proven fenced or not live and the partner is live and not fenced.
pub fn preferred_node(
    last_node: Option<&str>,
    partner: Option<&str>,
    live: &BTreeSet<String>,
    fenced: &BTreeSet<String>,
) -> Option<String> {
    let last = last_node.filter(|n| !n.is_empty())?;
    let partner = partner?;
    let lost = fenced.contains(last) || !live.contains(last);
    (lost && live.contains(partner) && !fenced.contains(partner)).then(|| partner.to_string())
}

/// A launcher pod's phase as the controller reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LauncherPhase {
    Pending,
    Running,
    /// Succeeded or Failed: the kubelet reported its containers stopped.
    Terminal,
}

/// One launcher pod of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launcher {
    pub uid: String,
    pub name: String,
    /// `spec.nodeName`, once bound.
    pub node: Option<String>,
    /// Carries the gate [`GATE`].
    pub gated: bool,
    pub phase: LauncherPhase,
    /// Has a deletion timestamp.
    pub deleting: bool,
    /// The pod's creation timestamp (RFC 3339; orders a VM's launcher pods).
    pub created: String,
}

/// The launcher pod that is to run the VM now: the newest one not deleting and not terminal.
pub fn current_launcher(launchers: &[Launcher]) -> Option<&Launcher> {
    launchers
        .iter()
        .filter(|l| !l.deleting && l.phase != LauncherPhase::Terminal)
        .max_by(|a, b| a.created.cmp(&b.created).then(a.uid.cmp(&b.uid)))
}

/// Why a protected lease may not move to the new launcher pod yet.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum Blocked {
    #[error("the disk Lease {lease} does not exist yet")]
    LeaseMissing { lease: String },
    #[error(
        "the disk Lease {lease} is held by the launcher pod {pod} on {node}, which is running and not proven fenced"
    )]
    OldInstanceRunning {
        lease: String,
        pod: String,
        node: String,
    },
    #[error(
        "the disk Lease {lease} is held for the node {node}, which is neither live nor proven fenced"
    )]
    NodeNotFenced { lease: String, node: String },
    #[error("the disk Lease {lease} is held by {holder}, a consumer that is not this VM's")]
    HeldByConsumer { lease: String, holder: String },
    #[error("the disk Lease {lease} is being handed over to {to}")]
    HandoverPending { lease: String, to: String },
    #[error("the disk Lease {lease} cannot take a higher epoch")]
    EpochExhausted { lease: String },
}

/// May the controller grant `lease` (named `name`) to the launcher pod `to`? `Ok(None)`: `to`
/// holds it already; `Ok(Some(epoch))`: grant with that epoch.
pub fn grantable(
    name: &str,
    lease: &VolumeLease,
    to: &str,
    launchers: &[Launcher],
    fenced: &BTreeSet<String>,
    live: &BTreeSet<String>,
) -> Result<Option<u64>, Blocked> {
    if lease.is_held_by(to, lease.epoch) {
        return Ok(None);
    }
    if let Some(h) = &lease.handover
        && h.to != to
    {
        return Err(Blocked::HandoverPending {
            lease: name.to_string(),
            to: h.to.clone(),
        });
    }
    let floor = lease
        .handover
        .as_ref()
        .map_or(lease.epoch, |h| h.epoch.max(lease.epoch));
    let next = floor.checked_add(1).ok_or(Blocked::EpochExhausted {
        lease: name.to_string(),
    })?;
    let Some(holder) = lease.holder().filter(|h| *h != to) else {
        return Ok(Some(next));
    };
    if let Some(old) = launchers.iter().find(|l| l.uid == holder) {
        let node = old.node.as_deref().or(lease.held_for_node.as_deref());
        return match node.filter(|n| !n.is_empty()) {
            _ if old.phase == LauncherPhase::Terminal => Ok(Some(next)),
            Some(n) if fenced.contains(n) => Ok(Some(next)),
            // Never bound: it never ran.
            None => Ok(Some(next)),
            Some(n) => Err(Blocked::OldInstanceRunning {
                lease: name.to_string(),
                pod: old.name.clone(),
                node: n.to_string(),
            }),
        };
    }
    match lease.held_for_node.as_deref() {
        // A pod consumer (a guard) holds it: it must release it itself.
        None => Err(Blocked::HeldByConsumer {
            lease: name.to_string(),
            holder: holder.to_string(),
        }),
        Some(n) if n.is_empty() || fenced.contains(n) || live.contains(n) => Ok(Some(next)),
        Some(n) => Err(Blocked::NodeNotFenced {
            lease: name.to_string(),
            node: n.to_string(),
        }),
    }
}

/// The Event reasons users see on a VirtualMachine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VmEventReason {
    InvalidAnnotation,
    UnprotectedVolume,
    VMFailoverStarted,
    VMFailoverCompleted,
    VMFailoverBlocked,
}

impl VmEventReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmEventReason::InvalidAnnotation => "InvalidAnnotation",
            VmEventReason::UnprotectedVolume => "UnprotectedVolume",
            VmEventReason::VMFailoverStarted => "VMFailoverStarted",
            VmEventReason::VMFailoverCompleted => "VMFailoverCompleted",
            VmEventReason::VMFailoverBlocked => "VMFailoverBlocked",
        }
    }

    pub fn is_warning(&self) -> bool {
        !matches!(
            self,
            VmEventReason::VMFailoverStarted | VmEventReason::VMFailoverCompleted
        )
    }
}

/// What the shell must do for one VM, in order; the first failure ends the pass for the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmAction {
    /// Put [`HA_LABEL`]`=true` on the VM's template labels (or take it off: `false`).
    SetTemplateLabel { on: bool },
    /// Create the disk Lease (no holder) for `pvc`.
    CreateLease { lease: String, pvc: String },
    /// Write holder = `to` (a launcher pod UID), `leaseTransitions` = `epoch`, no handover, not
    /// released, [`HELD_FOR_NODE_ANNOTATION`] = `node` (empty if unbound); precondition
    /// `expected_rv`.
    Grant {
        lease: String,
        expected_rv: String,
        to: String,
        node: Option<String>,
        epoch: u64,
    },
    /// Record the holder's node on the Lease, precondition `expected_rv`.
    RecordNode {
        lease: String,
        expected_rv: String,
        node: String,
    },
    /// Release the Lease (the VM no longer runs), precondition `expected_rv`.
    Release { lease: String, expected_rv: String },
    /// Remove the scheduling gate from the launcher pod `pod` (its UID is `uid`).
    Ungate { pod: String, uid: String },
    Event {
        reason: VmEventReason,
        message: String,
    },
    /// A failover finished after `duration` (for the metrics).
    FailoverCompleted { duration: Duration },
}

/// What the controller knows of one VM at one instant.
#[derive(Debug, Clone, Copy)]
pub struct VmFacts<'a> {
    pub opt_in: &'a OptIn,
    pub run_strategy: &'a RunStrategy,
    /// Whether the VM's template carries [`HA_LABEL`]`=true`.
    pub template_labelled: bool,
    pub disks: &'a [Disk],
    /// The disk Leases that exist, by name.
    pub leases: &'a BTreeMap<String, VolumeLease>,
    pub launchers: &'a [Launcher],
    pub fenced_nodes: &'a BTreeSet<String>,
    pub live_nodes: &'a BTreeSet<String>,
}

/// A VM's state as `twosite status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// `NotOptedIn`, `InvalidAnnotation`, `Running`, `Gated`, `FailingOver`, `Stopped`.
    pub state: String,
    pub node: Option<String>,
    /// Disks without a Lease, and why.
    pub unprotected: Vec<String>,
    /// Why the new launcher pod is still gated, if it is.
    pub blocked: Option<String>,
}

/// A failover in progress: the node its instance was lost on, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Failover {
    from_node: String,
    since: MonoTime,
}

/// One VM's protection, from the controller's side: keep one per VM while leading.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProtection {
    invalid_reported: Option<String>,
    unprotected_reported: BTreeSet<String>,
    blocked_reported: Option<String>,
    failover: Option<Failover>,
    /// The fenced node the instance was last reported lost on (one `VMFailoverStarted` each).
    lost_on: Option<String>,
}

fn event(reason: VmEventReason, message: String) -> VmAction {
    VmAction::Event { reason, message }
}

impl VmProtection {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a failover of this VM is under way.
    pub fn failing_over(&self) -> bool {
        self.failover.is_some()
    }

    /// The actions for the VM at `now` (the controller's clock), and its report.
    pub fn step(&mut self, f: &VmFacts<'_>, now: MonoTime) -> (Vec<VmAction>, VmReport) {
        let mut out = Vec::new();
        let mut report = VmReport::default();
        match f.opt_in {
            OptIn::In => {}
            OptIn::Out | OptIn::Invalid(_) => {
                if let OptIn::Invalid(v) = f.opt_in
                    && self.invalid_reported.as_deref() != Some(v.as_str())
                {
                    self.invalid_reported = Some(v.clone());
                    out.push(event(
                        VmEventReason::InvalidAnnotation,
                        format!(
                            "{HA_ANNOTATION} is {v:?}; only \"true\" opts a VM in: this VM is not protected"
                        ),
                    ));
                }
                if f.template_labelled {
                    out.push(VmAction::SetTemplateLabel { on: false });
                }
                *self = VmProtection {
                    invalid_reported: self.invalid_reported.take(),
                    ..VmProtection::default()
                };
                report.state = match f.opt_in {
                    OptIn::Invalid(_) => "InvalidAnnotation".into(),
                    _ => "NotOptedIn".into(),
                };
                return (out, report);
            }
        }
        self.invalid_reported = None;
        if !f.template_labelled {
            out.push(VmAction::SetTemplateLabel { on: true });
        }
        for d in f.disks {
            if let Err(why) = &d.protection {
                report.unprotected.push(why.to_string());
                if self.unprotected_reported.insert(d.pvc.clone()) {
                    out.push(event(
                        VmEventReason::UnprotectedVolume,
                        format!("{why}: no volume Lease guards it; the VM still fails over with its node"),
                    ));
                }
            }
        }
        let current = current_launcher(f.launchers);
        report.node = current.and_then(|c| c.node.clone());
        self.track_failover(f, current, now, &mut out);
        let protected: Vec<(&str, &str)> = f
            .disks
            .iter()
            .filter_map(|d| {
                d.protection
                    .as_ref()
                    .ok()
                    .map(|l| (l.as_str(), d.pvc.as_str()))
            })
            .collect();
        for (lease, pvc) in &protected {
            if !f.leases.contains_key(*lease) {
                out.push(VmAction::CreateLease {
                    lease: lease.to_string(),
                    pvc: pvc.to_string(),
                });
            }
        }
        let Some(current) = current else {
            self.release_when_stopped(f, &protected, &mut out);
            report.state = if self.failover.is_some() {
                "FailingOver".into()
            } else {
                "Stopped".into()
            };
            return (out, report);
        };
        let mut blocked: Option<Blocked> = None;
        for (name, _) in &protected {
            let Some(lease) = f.leases.get(*name) else {
                blocked.get_or_insert(Blocked::LeaseMissing {
                    lease: name.to_string(),
                });
                continue;
            };
            match grantable(
                name,
                lease,
                &current.uid,
                f.launchers,
                f.fenced_nodes,
                f.live_nodes,
            ) {
                Ok(Some(epoch)) => out.push(VmAction::Grant {
                    lease: name.to_string(),
                    expected_rv: lease.resource_version.clone(),
                    to: current.uid.clone(),
                    node: current.node.clone(),
                    epoch,
                }),
                Ok(None) => {
                    if let Some(n) = &current.node
                        && lease.held_for_node.as_deref() != Some(n.as_str())
                    {
                        out.push(VmAction::RecordNode {
                            lease: name.to_string(),
                            expected_rv: lease.resource_version.clone(),
                            node: n.clone(),
                        });
                    }
                }
                Err(why) => {
                    blocked.get_or_insert(why);
                }
            }
        }
        match blocked {
            None => {
                self.blocked_reported = None;
                if current.gated {
                    out.push(VmAction::Ungate {
                        pod: current.name.clone(),
                        uid: current.uid.clone(),
                    });
                }
                report.state = if current.gated {
                    "Gated".into()
                } else if self.failover.is_some() {
                    "FailingOver".into()
                } else {
                    "Running".into()
                };
            }
            Some(why) => {
                let text = why.to_string();
                if current.gated && self.blocked_reported.as_deref() != Some(text.as_str()) {
                    out.push(event(
                        VmEventReason::VMFailoverBlocked,
                        format!("the new launcher pod {} waits: {text}", current.name),
                    ));
                    self.blocked_reported = Some(text.clone());
                }
                report.state = if current.gated {
                    "Gated".into()
                } else {
                    "Running".into()
                };
                report.blocked = Some(text);
            }
        }
        (out, report)
    }

    /// A failover starts when a launcher pod of the VM sits on a proven-fenced node, and
    /// completes once the current launcher pod runs on a live node other than that one.
    fn track_failover(
        &mut self,
        f: &VmFacts<'_>,
        current: Option<&Launcher>,
        now: MonoTime,
        out: &mut Vec<VmAction>,
    ) {
        // The instance was lost on a fenced node: its pod is still there, or the fence's release
        // deleted it already (in the pass that proved the fence) and only the disk Lease held
        // for that node remembers where it ran.
        let on_fenced = f
            .launchers
            .iter()
            .filter(|l| l.phase != LauncherPhase::Terminal)
            .find_map(|l| l.node.clone().filter(|n| f.fenced_nodes.contains(n)));
        let lease_on_fenced = || {
            f.leases.values().find_map(|l| {
                let held_by_current = current.is_some_and(|c| l.holder() == Some(c.uid.as_str()));
                l.held_for_node.clone().filter(|n| {
                    l.holder().is_some() && !held_by_current && f.fenced_nodes.contains(n)
                })
            })
        };
        let lost = on_fenced.or_else(lease_on_fenced);
        if lost.is_none() {
            self.lost_on = None;
        }
        if self.failover.is_none()
            && let Some(node) = lost
            && self.lost_on.as_deref() != Some(node.as_str())
        {
            self.lost_on = Some(node.clone());
            let restarts = f.run_strategy.restarts_after_loss();
            out.push(event(
                VmEventReason::VMFailoverStarted,
                if restarts {
                    format!("its node {node} is proven fenced: the VM restarts on another node")
                } else {
                    format!(
                        "its node {node} is proven fenced; runStrategy {} does not restart it",
                        f.run_strategy.name()
                    )
                },
            ));
            if restarts {
                self.failover = Some(Failover {
                    from_node: node,
                    since: now,
                });
            }
        }
        let Some(fo) = &self.failover else { return };
        if let Some(c) = current
            && c.phase == LauncherPhase::Running
            && let Some(n) = &c.node
            && *n != fo.from_node
            && f.live_nodes.contains(n)
        {
            let duration = now.since(fo.since);
            out.push(event(
                VmEventReason::VMFailoverCompleted,
                format!(
                    "running on {n} {:.1} s after its node {} was proven fenced",
                    duration.as_secs_f64(),
                    fo.from_node
                ),
            ));
            out.push(VmAction::FailoverCompleted { duration });
            self.failover = None;
        }
    }

    /// A VM with no launcher pod to run it gives its disk Leases back once their holders are
    /// proven stopped, so a pod consumer (a repair job) may take them.
    fn release_when_stopped(
        &self,
        f: &VmFacts<'_>,
        protected: &[(&str, &str)],
        out: &mut Vec<VmAction>,
    ) {
        // A VM that is to restart gets a new launcher pod soon: keep the leases for it.
        if f.run_strategy.restarts_after_loss() {
            return;
        }
        for (name, _) in protected {
            let Some(lease) = f.leases.get(*name) else {
                continue;
            };
            if lease.holder().is_none() || lease.held_for_node.is_none() {
                continue;
            }
            // The same proof as a grant to someone else (the empty UID is nobody's).
            if grantable(name, lease, "", f.launchers, f.fenced_nodes, f.live_nodes).is_ok() {
                out.push(VmAction::Release {
                    lease: name.to_string(),
                    expected_rv: lease.resource_version.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
