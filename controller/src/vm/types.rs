//! The few fields twosite reads of KubeVirt's VirtualMachine, and how they and the launcher pods,
//! claims and disk Leases turn into the core's [`node_health::vm`] inputs.
//!
//! Hand-written on purpose: a partial struct is only ever read. Every write to a VM is a JSON
//! merge patch of one label (`spec.template.metadata.labels`), never a PUT of what was read.

use crate::guard::lease_io;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodSchedulingGate};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use node_health::vm::{
    self, ClaimFacts, Disk, GATE, LAUNCHER_LABEL, Launcher, LauncherPhase, OptIn, PodOwner,
    RunStrategy,
};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// `kube::Resource` for a namespaced type of ours with `metadata: ObjectMeta` and version v1:
/// static (`DynamicType = ()`), so a cache key is the name and namespace only.
macro_rules! static_resource {
    ($ty:ty, $kind:literal, $group:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("v1")
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// `spec` of a VirtualMachine, as far as twosite reads it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    #[serde(default)]
    pub run_strategy: Option<String>,
    #[serde(default)]
    pub running: Option<bool>,
    #[serde(default)]
    pub template: Option<VmTemplate>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct VmTemplate {
    #[serde(default)]
    pub metadata: Option<TemplateMeta>,
    #[serde(default)]
    pub spec: Option<VmiSpec>,
}

/// The template's metadata: of its labels only twosite's, the one the VM loop sets and reads
/// (a map per VM, even of one entry, is half a KiB).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "RawTemplateMeta")]
pub struct TemplateMeta {
    /// The value of the `twosite.dev/ha` label.
    pub ha_label: Option<String>,
}

#[derive(Deserialize)]
struct RawTemplateMeta {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

impl From<RawTemplateMeta> for TemplateMeta {
    fn from(raw: RawTemplateMeta) -> Self {
        TemplateMeta {
            ha_label: raw.labels.and_then(|mut l| l.remove(vm::HA_LABEL)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct VmiSpec {
    #[serde(default)]
    pub volumes: Vec<VmVolume>,
}

/// One volume of the VM's template: only PVCs and DataVolumes (whose PVC has the same name)
/// are disks on shared storage.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmVolume {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub persistent_volume_claim: Option<ClaimRef>,
    #[serde(default)]
    pub data_volume: Option<DataVolumeRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRef {
    #[serde(default)]
    pub claim_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DataVolumeRef {
    #[serde(default)]
    pub name: String,
}

/// `status` of a VirtualMachine: what `twosite status` repeats.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    #[serde(default)]
    pub printable_status: Option<String>,
}

/// A VirtualMachine as the VM cache keeps it. A type of its own, not `Object<VmSpec, VmStatus>`:
/// a dynamic type's cache key carries the whole `ApiResource` (five strings) for every VM. Its
/// metadata is cut to [`compact_meta`] on reading, and of its annotations only the opt-in is
/// kept, in a field: at 10,000 VMs each map of labels or annotations was 5 MiB.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "RawVm")]
pub struct VirtualMachine {
    pub metadata: ObjectMeta,
    /// The `twosite.dev/ha` annotation.
    pub ha_annotation: Option<String>,
    pub spec: VmSpec,
    pub status: Option<VmStatus>,
}

#[derive(Deserialize)]
struct RawVm {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: VmSpec,
    #[serde(default)]
    status: Option<VmStatus>,
}

impl From<RawVm> for VirtualMachine {
    fn from(mut raw: RawVm) -> Self {
        let ha_annotation = raw
            .metadata
            .annotations
            .as_mut()
            .and_then(|a| a.remove(vm::HA_ANNOTATION));
        VirtualMachine {
            metadata: compact_meta(raw.metadata),
            ha_annotation,
            spec: raw.spec,
            status: raw.status,
        }
    }
}

/// What the VM caches keep of an object's metadata: its identity and times. Labels,
/// annotations and owners that are read are kept in fields of their own by the caller.
pub fn compact_meta(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    }
}

static_resource!(
    VirtualMachine,
    "VirtualMachine",
    "kubevirt.io",
    "virtualmachines"
);

/// A VM's key: `namespace/name`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

pub fn vm_key(vm: &VirtualMachine) -> String {
    key(
        vm.metadata.namespace.as_deref().unwrap_or_default(),
        vm.metadata.name.as_deref().unwrap_or_default(),
    )
}

pub fn vm_opt_in(vm: &VirtualMachine) -> OptIn {
    vm::opt_in(vm.ha_annotation.as_deref())
}

pub fn run_strategy(vm: &VirtualMachine) -> RunStrategy {
    RunStrategy::parse(vm.spec.run_strategy.as_deref(), vm.spec.running)
}

pub fn template_labelled(vm: &VirtualMachine) -> bool {
    vm.spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.ha_label.as_deref())
        .is_some_and(|v| v == "true")
}

/// The PVC names of the VM's disks, in template order, without repeats.
pub fn claim_names(vm: &VirtualMachine) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let volumes = vm
        .spec
        .template
        .as_ref()
        .and_then(|t| t.spec.as_ref())
        .map(|s| s.volumes.as_slice())
        .unwrap_or_default();
    for v in volumes {
        let name = v
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.clone())
            .or_else(|| v.data_volume.as_ref().map(|d| d.name.clone()))
            .filter(|n| !n.is_empty());
        if let Some(n) = name
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    out
}

pub fn claim_facts(pvc: &PersistentVolumeClaim) -> ClaimFacts {
    let spec = pvc.spec.clone().unwrap_or_default();
    ClaimFacts {
        access_modes: spec.access_modes.unwrap_or_default(),
        volume_mode: spec.volume_mode,
    }
}

/// The VM's disks, classified against the claims of its namespace (`claims` by name).
pub fn disks(vm: &VirtualMachine, claims: &BTreeMap<String, ClaimFacts>) -> Vec<Disk> {
    claim_names(vm)
        .iter()
        .map(|n| vm::classify_disk(n, claims.get(n)))
        .collect()
}

/// A launcher pod as the VM caches keep it: identity, node, scheduling gates and phase, and of
/// its labels, owners and annotations the three facts read from them. A `Pod`, even with every
/// other field emptied, is ~2 KiB inline (its spec's and status's many fields), and each map
/// of labels another half KiB: at 10,000 VMs the launcher cache of `Pod` values was a quarter
/// of the controller's memory.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "RawLauncherPod")]
pub struct LauncherPod {
    /// Cut to [`compact_meta`].
    pub metadata: ObjectMeta,
    /// Labelled `kubevirt.io=virt-launcher`.
    pub is_launcher: bool,
    /// The VM it runs (see [`launcher_vm`]).
    pub vm: Option<String>,
    /// Carries the [`GATED_ANNOTATION`].
    pub gated_annotation: bool,
    pub spec: Option<LauncherSpec>,
    pub status: Option<LauncherStatus>,
}

#[derive(Deserialize)]
struct RawLauncherPod {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<LauncherSpec>,
    #[serde(default)]
    status: Option<LauncherStatus>,
}

impl From<RawLauncherPod> for LauncherPod {
    fn from(raw: RawLauncherPod) -> Self {
        let m = &raw.metadata;
        let is_launcher = meta_label(m, LAUNCHER_LABEL.0) == Some(LAUNCHER_LABEL.1);
        let vm = meta_launcher_vm(m).map(str::to_string);
        let gated_annotation = m
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(GATED_ANNOTATION));
        LauncherPod {
            metadata: compact_meta(raw.metadata),
            is_launcher,
            vm,
            gated_annotation,
            spec: raw.spec,
            status: raw.status,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LauncherSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub scheduling_gates: Option<Vec<PodSchedulingGate>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LauncherStatus {
    #[serde(default)]
    pub phase: Option<String>,
}

static_resource!(LauncherPod, "Pod", "", "pods");

impl From<Pod> for LauncherPod {
    fn from(pod: Pod) -> Self {
        RawLauncherPod {
            metadata: pod.metadata,
            spec: pod.spec.map(|s| LauncherSpec {
                node_name: s.node_name,
                scheduling_gates: s.scheduling_gates,
            }),
            status: pod.status.map(|s| LauncherStatus { phase: s.phase }),
        }
        .into()
    }
}

/// What twosite reads of a pod, whether a whole `Pod` (an admission request, a LIST, the pod
/// index) or a [`LauncherPod`] from the VM caches.
pub trait PodFields {
    fn pod_meta(&self) -> &ObjectMeta;
    fn node_name(&self) -> Option<&str>;
    fn scheduling_gates(&self) -> &[PodSchedulingGate];
    fn phase(&self) -> Option<&str>;
    /// Labelled `kubevirt.io=virt-launcher`.
    fn is_launcher(&self) -> bool;
    /// The VM a launcher pod runs (see [`launcher_vm`]).
    fn launcher_vm(&self) -> Option<&str>;
    /// Carries the [`GATED_ANNOTATION`].
    fn gated_annotation(&self) -> bool;
}

fn meta_label<'a>(m: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    m.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// A VM's VMI has the VM's name: the VirtualMachineInstance owner's name, else the
/// `vm.kubevirt.io/name` label.
fn meta_launcher_vm(m: &ObjectMeta) -> Option<&str> {
    m.owner_references
        .as_ref()
        .and_then(|os| {
            os.iter()
                .find(|o| o.kind == "VirtualMachineInstance")
                .map(|o| o.name.as_str())
        })
        .or_else(|| meta_label(m, VM_NAME_LABEL))
        .filter(|n| !n.is_empty())
}

/// The accessors a `Pod` and a [`LauncherPod`] share: the same fields, of different types.
macro_rules! pod_accessors {
    () => {
        fn pod_meta(&self) -> &ObjectMeta {
            &self.metadata
        }
        fn node_name(&self) -> Option<&str> {
            self.spec.as_ref().and_then(|s| s.node_name.as_deref())
        }
        fn scheduling_gates(&self) -> &[PodSchedulingGate] {
            self.spec
                .as_ref()
                .and_then(|s| s.scheduling_gates.as_deref())
                .unwrap_or_default()
        }
        fn phase(&self) -> Option<&str> {
            self.status.as_ref().and_then(|s| s.phase.as_deref())
        }
    };
}

impl PodFields for Pod {
    pod_accessors!();
    fn is_launcher(&self) -> bool {
        meta_label(&self.metadata, LAUNCHER_LABEL.0) == Some(LAUNCHER_LABEL.1)
    }
    fn launcher_vm(&self) -> Option<&str> {
        meta_launcher_vm(&self.metadata)
    }
    fn gated_annotation(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(GATED_ANNOTATION))
    }
}

impl PodFields for LauncherPod {
    pod_accessors!();
    fn is_launcher(&self) -> bool {
        self.is_launcher
    }
    fn launcher_vm(&self) -> Option<&str> {
        self.vm.as_deref()
    }
    fn gated_annotation(&self) -> bool {
        self.gated_annotation
    }
}

/// Through a reference or an `Arc` (the caches hand out `Arc`s) as on the pod itself.
macro_rules! forward_pod_fields {
    ($($ptr:ty),*) => {$(
        impl<T: PodFields + ?Sized> PodFields for $ptr {
            fn pod_meta(&self) -> &ObjectMeta {
                (**self).pod_meta()
            }
            fn node_name(&self) -> Option<&str> {
                (**self).node_name()
            }
            fn scheduling_gates(&self) -> &[PodSchedulingGate] {
                (**self).scheduling_gates()
            }
            fn phase(&self) -> Option<&str> {
                (**self).phase()
            }
            fn is_launcher(&self) -> bool {
                (**self).is_launcher()
            }
            fn launcher_vm(&self) -> Option<&str> {
                (**self).launcher_vm()
            }
            fn gated_annotation(&self) -> bool {
                (**self).gated_annotation()
            }
        }
    )*};
}
forward_pod_fields!(&T, std::sync::Arc<T>);

pub fn is_launcher(pod: &impl PodFields) -> bool {
    pod.is_launcher()
}

/// KubeVirt's label on a launcher pod naming its VM.
pub const VM_NAME_LABEL: &str = "vm.kubevirt.io/name";

/// The VM a launcher pod runs: its VirtualMachineInstance owner's name (a VM's VMI has the VM's
/// name), else the `vm.kubevirt.io/name` label.
pub fn launcher_vm(pod: &impl PodFields) -> Option<&str> {
    pod.launcher_vm()
}

pub fn has_gate(pod: &impl PodFields) -> bool {
    pod.scheduling_gates().iter().any(|g| g.name == GATE) || pod.gated_annotation()
}

/// Set with the gate by the webhook, so a user sees why the pod waits (and so the gate is
/// visible on API servers older than 1.26, which drop `spec.schedulingGates`).
pub const GATED_ANNOTATION: &str = "twosite.dev/gated";

pub fn launcher(pod: &impl PodFields) -> Option<Launcher> {
    let phase = match pod.phase() {
        Some("Running") => LauncherPhase::Running,
        Some("Succeeded") | Some("Failed") => LauncherPhase::Terminal,
        _ => LauncherPhase::Pending,
    };
    let m = pod.pod_meta();
    Some(Launcher {
        uid: m.uid.clone()?,
        name: m.name.clone()?,
        node: pod
            .node_name()
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        gated: has_gate(pod),
        phase,
        deleting: m.deletion_timestamp.is_some(),
        created: m
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
    })
}

/// Whose pod this is, for the release after a fence. `opted_in` looks a VM up by key.
pub fn pod_owner(pod: &impl PodFields, opted_in: &dyn Fn(&str) -> Option<bool>) -> PodOwner {
    if !is_launcher(pod) {
        return PodOwner::Plain;
    }
    let vm = launcher_vm(pod)
        .zip(pod.pod_meta().namespace.as_deref())
        .and_then(|(name, ns)| opted_in(&key(ns, name)));
    PodOwner::Launcher(vm)
}

/// The disk Leases of one namespace, by name, in the core's form; a Lease that cannot be read
/// is left out (its VM stays gated: the lease is reported as missing and re-created fails).
pub fn disk_leases<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
) -> BTreeMap<String, node_health::volume::VolumeLease> {
    leases
        .into_iter()
        .filter_map(|l| {
            let name = l.metadata.name.clone()?;
            match lease_io::to_volume_lease(l) {
                Ok(v) => Some((name, v)),
                Err(err) => {
                    tracing::warn!(lease = name, error = %err, "disk Lease unreadable");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_reads_from_kubevirt_json() {
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "db", "namespace": "plant",
                         "annotations": {"twosite.dev/ha": "true"}},
            "spec": {
                "runStrategy": "Always",
                "template": {
                    "metadata": {"labels": {"twosite.dev/ha": "true"}},
                    "spec": {"domain": {"devices": {}}, "volumes": [
                        {"name": "root", "persistentVolumeClaim": {"claimName": "db-root"}},
                        {"name": "data", "dataVolume": {"name": "db-data"}},
                        {"name": "init", "cloudInitNoCloud": {"userData": "x"}},
                        {"name": "again", "persistentVolumeClaim": {"claimName": "db-root"}}
                    ]}
                }
            },
            "status": {"printableStatus": "Running"}
        }))
        .expect("parses");
        assert_eq!(vm_key(&vm), "plant/db");
        assert_eq!(vm_opt_in(&vm), OptIn::In);
        assert_eq!(run_strategy(&vm), RunStrategy::Always);
        assert!(template_labelled(&vm));
        assert_eq!(claim_names(&vm), vec!["db-root", "db-data"]);
        assert_eq!(
            vm.status.and_then(|s| s.printable_status).as_deref(),
            Some("Running")
        );
    }

    #[test]
    fn a_launcher_pod_names_its_vm_and_its_owner_decides_the_release() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "virt-launcher-db-abcde", "namespace": "plant", "uid": "u1",
                         "labels": {"kubevirt.io": "virt-launcher"},
                         "annotations": {GATED_ANNOTATION: "volume leases"},
                         "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                            "kind": "VirtualMachineInstance", "name": "db", "uid": "vmi"}]},
            "spec": {"containers": [], "nodeName": "a-1"},
            "status": {"phase": "Running"}
        }))
        .expect("parses");
        assert_eq!(launcher_vm(&pod), Some("db"));
        let l = launcher(&pod).expect("a launcher");
        assert_eq!(l.node.as_deref(), Some("a-1"));
        assert!(l.gated);
        assert_eq!(l.phase, LauncherPhase::Running);
        let opted = |k: &str| (k == "plant/db").then_some(true);
        assert_eq!(pod_owner(&pod, &opted), PodOwner::Launcher(Some(true)));
        let unknown = |_: &str| None;
        assert_eq!(pod_owner(&pod, &unknown), PodOwner::Launcher(None));
        let plain = Pod::default();
        assert_eq!(pod_owner(&plain, &unknown), PodOwner::Plain);
        // The VM caches' slim form reads the same.
        let slim = LauncherPod::from(pod.clone());
        assert_eq!(launcher_vm(&slim), Some("db"));
        assert_eq!(launcher(&slim), launcher(&pod));
        assert_eq!(pod_owner(&slim, &opted), PodOwner::Launcher(Some(true)));
    }

    #[test]
    fn a_launcher_pod_reads_from_a_watch_event_into_the_slim_form() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "virt-launcher-db-x", "namespace": "plant", "uid": "u2",
                         "labels": {"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "db"}},
            "spec": {"nodeName": "b-1", "containers": [{"name": "compute", "image": "i"}],
                     "schedulingGates": [{"name": GATE}]},
            "status": {"phase": "Pending", "podIP": "10.0.0.2"}
        });
        let slim: LauncherPod = serde_json::from_value(json.clone()).expect("slim");
        let pod: Pod = serde_json::from_value(json).expect("pod");
        assert_eq!(launcher(&slim), launcher(&pod));
        assert!(has_gate(&slim));
        assert_eq!(
            <LauncherPod as kube::Resource>::url_path(&(), Some("plant")),
            "/api/v1/namespaces/plant/pods"
        );
    }
}
