//! The `TwoSite` custom resource: the rooms an operator configures, and the pairing the
//! controller reports.
//!
//! Cluster-scoped; the controller works on the object named [`DEFAULT_NAME`] and creates it
//! (with an empty spec: automatic rooms) when it is missing.

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one `TwoSite` object the controller works on.
pub const DEFAULT_NAME: &str = "default";

/// Condition type: whether the two rooms are known.
pub const ROOMS_RESOLVED: &str = "RoomsResolved";
/// Condition type: whether the workers of the two rooms are paired.
pub const PAIRED: &str = "Paired";
/// Condition type: whether node remediation (fencing, the out-of-service taint) is paused.
pub const REMEDIATION_PAUSED: &str = "RemediationPaused";
/// Condition type: whether the witness answers (only with a witness configured).
pub const WITNESS_REACHABLE: &str = "WitnessReachable";

/// How the rooms of a cluster spread over two server rooms are chosen.
// Clippy reads the repeated `type_ = ...` of the printer columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(
    CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "twosite.dev",
    version = "v1alpha1",
    kind = "TwoSite",
    status = "TwoSiteStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "The two server rooms of the cluster and how their workers are paired. The controller works on the object named `default`.",
    printcolumn(name = "Room A", type_ = "string", json_path = ".status.rooms.a"),
    printcolumn(name = "Room B", type_ = "string", json_path = ".status.rooms.b"),
    printcolumn(name = "Pairs", type_ = "integer", json_path = ".status.pairCount"),
    printcolumn(
        name = "Unpaired",
        type_ = "integer",
        json_path = ".status.unpairedCount"
    ),
    printcolumn(
        name = "Leader",
        type_ = "string",
        json_path = ".status.leader.identity"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TwoSiteSpec {
    /// Exactly two distinct `topology.kubernetes.io/zone` values: room A, then room B. Leave it
    /// unset to use the two zone values the workers carry (room A is the first in sort order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// What the controller observed and decided.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TwoSiteStatus {
    /// The `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The two rooms, once they are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<RoomsStatus>,
    /// Each worker of room A with its partner in room B.
    #[serde(default)]
    pub pairs: Vec<PairStatus>,
    /// The number of pairs.
    #[serde(default)]
    pub pair_count: i32,
    /// Every node left out of the pairs, with the reason.
    #[serde(default)]
    pub unpaired: Vec<UnpairedStatus>,
    /// The number of unpaired nodes.
    #[serde(default)]
    pub unpaired_count: i32,
    /// The controller replica that wrote this status, and its leader term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderStatus>,
    /// Every node's health verdict and remediation phase, as the leader judges them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
    /// The witness: whether one is configured, whether it answers, and the grant the
    /// controller holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<WitnessStatus>,
    /// Every protected RWX block volume (a Lease labelled `twosite.dev/volume`): who holds it,
    /// with which epoch, since when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStatus>,
    /// Every KubeVirt VirtualMachine annotated `twosite.dev/ha` (valid or not): its state, its
    /// node, its unprotected disks and why a new instance waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmStatus>,
    /// `RoomsResolved`, `Paired`, `RemediationPaused` and, with a witness, `WitnessReachable`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One protected volume, as the leader sees its Lease and consumer pods.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// The holding consumer's pod, and its node (`None`: released, or the holder is no pod we
    /// know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_node: Option<String>,
    /// `leaseTransitions`: rises with every new holder.
    pub epoch: i64,
    /// When the current holder took the volume (the Lease's `acquireTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switch: Option<String>,
    /// The pod a planned switchover moves the volume to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_pod: Option<String>,
    /// The number of consumer pods (labelled `twosite.dev/volume=<name>`).
    pub consumers: i32,
    /// Why the controller does not act on the volume now, if it would otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// One VirtualMachine that carries the `twosite.dev/ha` annotation, as the leader sees it.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    pub namespace: String,
    pub name: String,
    /// `Running`, `Gated` (a new launcher pod waits for its disk Leases), `FailingOver`,
    /// `Stopped`, `InvalidAnnotation` or `NotOptedIn`.
    pub state: String,
    /// The node its current launcher pod is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// KubeVirt's `status.printableStatus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printable_status: Option<String>,
    /// `DisksProtected` (False with reason `UnprotectedVolume` when a disk is not RWX Block)
    /// and `FailoverReady` (False with reason `VMFailoverBlocked` while a gated pod waits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VmCondition>,
}

/// A VM-level condition (no transition time: the list is recomputed every pass).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The witness, as the leader sees it. Losing it stops nothing: without its grant the
/// controller only stops fencing nodes.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WitnessStatus {
    /// A witness is configured (`--witness-url`).
    pub configured: bool,
    /// The witness answered the last claim or health check.
    pub reachable: bool,
    /// When the witness last answered (RFC 3339; refreshed about once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_contact: Option<String>,
    /// The grant the controller holds (the room it may fence the other room's nodes for);
    /// absent when it holds none.
    // Never written as null: server-side apply does not count a null as owned, so it could
    // outlive the rest of `witness` and fail validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<WitnessGrantStatus>,
}

/// A witness grant: a room's right to run, and the witness's epoch.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WitnessGrantStatus {
    pub room: String,
    pub epoch: i64,
}

/// One node's health and remediation, as the leader sees them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    /// The node's room (its zone value), if it stands in one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Its partner in the other room, if paired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// The remediation phase: `Healthy`, `Suspect`, `FenceWaiting`, `Fenced`, `Tainted`,
    /// `Recovering`, `NoAgent` or `Excluded`.
    pub phase: String,
    /// Why a dead node is not fenced yet (`Deadline`, `VoucherNotClear`, `Paused`,
    /// `NoWitnessGrant`, `NotUnschedulableYet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// The health verdict: `Healthy`, `Suspect`, `Dead` or `DeadNoAgent`.
    pub verdict: String,
    /// `status.nodeInfo.bootID` (else the boot ID the node's agent reports).
    #[serde(rename = "bootID", default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// Where the rooms came from.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum RoomSource {
    /// `spec.rooms`.
    Configured,
    /// The two zone values the workers carry.
    Automatic,
}

/// The two rooms, by zone value.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomsStatus {
    /// Room A's `topology.kubernetes.io/zone` value.
    pub a: String,
    /// Room B's `topology.kubernetes.io/zone` value.
    pub b: String,
    pub source: RoomSource,
}

/// A worker in room A and its partner in room B.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PairStatus {
    /// The node in room A.
    pub a: String,
    /// The node in room B.
    pub b: String,
}

/// A node that is in no pair.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnpairedStatus {
    pub node: String,
    /// Machine-readable: `NoZoneLabel`, `OtherZone`, `ControlPlane`, `NoPartnerFree`,
    /// `RoomsUnknown`.
    pub reason: String,
    /// Human-readable.
    pub message: String,
}

/// The controller replica that leads, and its term.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderStatus {
    /// The replica's identity (its Pod name), as written in the Lease's `holderIdentity`.
    pub identity: String,
    /// The Lease's `leaseTransitions` for this term: it grows with every change of leader.
    pub epoch: i64,
}

/// A standard Kubernetes condition.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `RoomsResolved`, `Paired`, `RemediationPaused` or `WitnessReachable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word saying why.
    pub reason: String,
    /// Human-readable.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CustomResourceDefinition as YAML, as `twosite crd` prints it and `deploy/crd.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    serde_norway::to_string(&TwoSite::crd())
}
