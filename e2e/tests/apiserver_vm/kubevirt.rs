//! The cluster `apiserver_vm` plays around the real API server and the real controller: the
//! KubeVirt CRDs, the webhook configuration, virt-controller, kube-scheduler and kubelet.
#![allow(dead_code)]

use crate::common::agents::has_taint;
use crate::common::{NAMESPACE, Process, binary, create_doc, wait_for};
use e2e::apiserver::{self, ApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

pub const VM_NS: &str = "vms";
pub const GATED: &str = "twosite.dev/gated";
pub const HA: &str = "twosite.dev/ha";
pub const HELD_FOR: &str = "twosite.dev/held-for-node";
pub const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
pub const FENCED_BOOT: &str = "twosite.dev/fenced-boot-id";
pub const WEBHOOK_SECRET: &str = "twosite-webhook-tls";
pub const WEBHOOK_CONFIG: &str = "twosite-vm-gate";
pub const LAUNCHER_SELECTOR: &str = "kubevirt.io=virt-launcher";

/// The two tests each start an API server, etcd and the controller: one at a time on small CI
/// machines, so the measured figures are not skewed by the other test.
pub static ONE_AT_A_TIME: LazyLock<tokio::sync::Mutex<()>> =
    LazyLock::new(|| tokio::sync::Mutex::new(()));

pub fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
}

pub fn vms(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        VM_NS,
        &resource("VirtualMachine", "virtualmachines"),
    )
}

pub fn vmis(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        VM_NS,
        &resource("VirtualMachineInstance", "virtualmachineinstances"),
    )
}

/// KubeVirt's CRDs, as far as this test needs them: any content kept.
pub fn kubevirt_crd(kind: &str, plural: &str) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("{plural}.kubevirt.io") },
        "spec": {
            "group": "kubevirt.io",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.to_lowercase(),
                "listKind": format!("{kind}List")
            },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                "subresources": { "status": {} }
            }]
        }
    })
}

/// Installs the KubeVirt CRDs and the VM namespace, and waits until the CRDs are Established.
pub async fn install_kubevirt(admin: &Client) {
    for (kind, plural) in [
        ("VirtualMachine", "virtualmachines"),
        ("VirtualMachineInstance", "virtualmachineinstances"),
    ] {
        create_doc(admin, &kubevirt_crd(kind, plural), false)
            .await
            .unwrap_or_else(|e| panic!("create the {kind} CRD: {e}"));
    }
    create_doc(
        admin,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": VM_NS}}),
        false,
    )
    .await
    .expect("create the VM namespace");
    let crds: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    for name in [
        "virtualmachines.kubevirt.io",
        "virtualmachineinstances.kubevirt.io",
    ] {
        wait_for(
            &format!("{name} Established"),
            Duration::from_secs(20),
            || async {
                let crd = crds.get(name).await.map_err(|e| e.to_string())?;
                let ok = crd.data["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Established" && c["status"] == "True")
                    });
                if ok {
                    Ok(())
                } else {
                    Err(crd.data["status"].to_string())
                }
            },
        )
        .await;
    }
}

/// What deploy/vm-webhook.yaml ships, for a webhook reached by URL: the empty Secret and the
/// MutatingWebhookConfiguration without caBundle. Then the real controller with the webhook on
/// `webhook_port`; returns once the API server calls it (a dry-run create of a labelled
/// launcher pod comes back gated).
pub async fn start_controller_with_webhook(
    server: &ApiServer,
    admin: &Client,
    admin_port: u16,
    webhook_port: u16,
) -> Process {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NAMESPACE);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": WEBHOOK_SECRET, "namespace": NAMESPACE },
        "type": "Opaque"
    }))
    .expect("a Secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the empty webhook Secret");
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": WEBHOOK_CONFIG },
        "webhooks": [{
            "name": "vm-gate.twosite.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "Never",
            "rules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                "resources": ["pods"], "scope": "Namespaced"
            }],
            "objectSelector": { "matchLabels": { HA: "true" } },
            "clientConfig": { "url": format!("https://127.0.0.1:{webhook_port}/mutate-launcher") }
        }]
    });
    create_doc(admin, &config, false)
        .await
        .expect("create the MutatingWebhookConfiguration");

    let kubeconfig = server
        .service_account_kubeconfig(apiserver::CONTROLLER_SA.0, apiserver::CONTROLLER_SA.1)
        .expect("the controller's kubeconfig")
        .to_path_buf();
    let args: Vec<String> = [
        "controller",
        "--identity",
        "controller-1",
        "--namespace",
        NAMESPACE,
        "--admin-addr",
        &format!("127.0.0.1:{admin_port}"),
        "--webhook-port",
        &webhook_port.to_string(),
        "--webhook-host",
        "127.0.0.1",
        "--webhook-secret",
        WEBHOOK_SECRET,
        "--webhook-config",
        WEBHOOK_CONFIG,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut controller = Process::start(
        server,
        "controller-1",
        &binary("twosite"),
        &kubeconfig,
        &args,
    );

    let configs: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                "admissionregistration.k8s.io",
                "v1",
                "MutatingWebhookConfiguration",
            ),
            "mutatingwebhookconfigurations",
        ),
    );
    let t = Instant::now();
    wait_for(
        "the controller fills the Secret and sets the caBundle",
        Duration::from_secs(30),
        || async {
            let s = secrets
                .get(WEBHOOK_SECRET)
                .await
                .map_err(|e| e.to_string())?;
            let keys: BTreeSet<String> =
                s.data.map(|d| d.into_keys().collect()).unwrap_or_default();
            let c = configs
                .get(WEBHOOK_CONFIG)
                .await
                .map_err(|e| e.to_string())?;
            let bundle = c.data["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if ["ca.crt", "tls.crt", "tls.key"]
                .iter()
                .all(|k| keys.contains(*k))
                && !bundle.is_empty()
            {
                Ok(())
            } else {
                Err(format!(
                    "Secret keys {keys:?}, caBundle {} bytes",
                    bundle.len()
                ))
            }
        },
    )
    .await;
    println!(
        "webhook certificate and caBundle in place {:?} after the start",
        t.elapsed()
    );
    controller.assert_running();

    // The API server reaches the webhook over TLS (the CA it was given) and gets a patch.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), VM_NS);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let probe = launcher_pod(
        "probe",
        "00000000-0000-0000-0000-000000000001",
        &BTreeMap::from([(HA.to_string(), "true".to_string())]),
    );
    wait_for(
        "the API server calls the webhook (a dry-run launcher pod comes back gated)",
        Duration::from_secs(30),
        || async {
            let created = pods.create(&dry, &probe).await.map_err(|e| e.to_string())?;
            if annotation(&created, GATED).is_some() {
                Ok(())
            } else {
                Err(format!(
                    "admitted ungated: {:?}",
                    created.metadata.annotations
                ))
            }
        },
    )
    .await;
    println!(
        "the webhook gates launcher pods {:?} after the start",
        t.elapsed()
    );
    controller
}

pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

pub fn gated(pod: &Pod) -> bool {
    annotation(pod, GATED).is_some()
        || pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| !g.is_empty())
}

pub fn node_of(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

/// The first node a pod's preferred node affinity names.
pub fn preferred(pod: &Pod) -> Option<String> {
    let terms = pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()?;
    terms.iter().find_map(|t| {
        t.preference
            .match_expressions
            .as_ref()?
            .iter()
            .find(|e| e.key == "kubernetes.io/hostname" && e.operator == "In")?
            .values
            .as_ref()?
            .first()
            .cloned()
    })
}

/// A launcher pod as virt-controller makes it for the VMI `vm` (uid `vmi_uid`): the template's
/// `labels` plus KubeVirt's own.
pub fn launcher_pod(vm: &str, vmi_uid: &str, labels: &BTreeMap<String, String>) -> Pod {
    let mut labels = labels.clone();
    labels.insert("kubevirt.io".into(), "virt-launcher".into());
    labels.insert("vm.kubevirt.io/name".into(), vm.into());
    labels.insert("kubevirt.io/created-by".into(), vmi_uid.into());
    serde_json::from_value(json!({
        "metadata": {
            "generateName": format!("virt-launcher-{vm}-"),
            "namespace": VM_NS,
            "labels": labels,
            "annotations": { "kubevirt.io/domain": vm },
            "ownerReferences": [{
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "name": vm,
                "uid": vmi_uid,
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "containers": [{ "name": "compute", "image": "quay.io/kubevirt/virt-launcher:v1.4.0" }],
            "volumes": [{ "name": "root",
                          "persistentVolumeClaim": { "claimName": format!("{vm}-disk") } }]
        }
    }))
    .expect("a launcher Pod")
}

/// A VirtualMachine with one PVC disk `<name>-disk`, runStrategy Always.
pub fn vm_object(name: &str, annotated: bool) -> DynamicObject {
    let annotations = if annotated {
        json!({ HA: "true" })
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": { "name": name, "namespace": VM_NS, "annotations": annotations },
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": { "labels": { "kubevirt.io/domain": name } },
                "spec": {
                    "domain": {
                        "devices": { "disks": [{ "name": "root", "disk": { "bus": "virtio" } }] },
                        "resources": { "requests": { "memory": "1Gi" } }
                    },
                    "volumes": [{ "name": "root",
                                  "persistentVolumeClaim": { "claimName": format!("{name}-disk") } }]
                }
            }
        }
    }))
    .expect("a VirtualMachine")
}

/// An RWX Block claim on shared storage (it stays Pending: no provisioner runs here).
pub fn rwx_block_claim(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": VM_NS },
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "volumeMode": "Block",
            "storageClassName": "shared-block",
            "resources": { "requests": { "storage": "10Gi" } }
        }
    }))
    .expect("a PVC")
}

pub fn template_labels(vm: &DynamicObject) -> BTreeMap<String, String> {
    vm.data["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// What the test saw of one launcher pod.
#[derive(Debug, Clone)]
pub struct Seen {
    pub vm: String,
    pub uid: String,
    pub created: Instant,
    /// The API server's create response carried `twosite.dev/gated`.
    pub gated_at_create: bool,
    /// The preferred node affinity of the create response.
    pub prefer: Option<String>,
    pub ungated: Option<Instant>,
    /// When first seen ungated: the fence marker of a-1 was on its heartbeat Lease (read after
    /// the pods were listed).
    pub a1_fenced_at_ungate: Option<bool>,
    pub bound: Option<(String, Instant)>,
    pub running: Option<Instant>,
    pub gone: Option<Instant>,
}

/// The test's stand-ins for virt-controller, kube-scheduler and the kubelets.
#[derive(Default)]
pub struct World {
    /// The VMs virt-controller runs.
    pub started: BTreeSet<String>,
    /// Each VM's current launcher pod.
    pub current: BTreeMap<String, String>,
    pub pods: BTreeMap<String, Seen>,
    /// When a-1's fence marker and its out-of-service taint were first seen.
    pub a1_marker: Option<Instant>,
    pub a1_taint: Option<Instant>,
    pub log: Vec<String>,
    /// Why the scheduler last found no node (said once).
    pub no_node: Option<String>,
}

impl World {
    pub fn launchers_of(&self, vm: &str) -> Vec<(String, Seen)> {
        let mut v: Vec<(String, Seen)> = self
            .pods
            .iter()
            .filter(|(_, s)| s.vm == vm)
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        v.sort_by_key(|(_, s)| s.created);
        v
    }
}

pub struct Cluster {
    pub admin: Client,
    pub world: Arc<Mutex<World>>,
    /// The nodes with power: their kubelet runs pods and renews its Lease.
    pub alive: Arc<Mutex<BTreeSet<String>>>,
}

impl Cluster {
    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("the world")
    }

    pub fn note(&self, line: String) {
        println!("cluster: {line}");
        self.world().log.push(line);
    }

    pub async fn tick(&self) -> Result<(), String> {
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), VM_NS);
        let list = pods
            .list(&ListParams::default().labels(LAUNCHER_SELECTOR))
            .await
            .map_err(|e| format!("list launcher pods: {e}"))?
            .items;
        // Read after the list: whatever the controller did before a pod we list was ungated is
        // visible here.
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), NAMESPACE);
        let marker = leases
            .get_opt("twosite-agent-a-1")
            .await
            .map_err(|e| e.to_string())?
            .and_then(|l| l.metadata.annotations)
            .is_some_and(|a| a.contains_key(FENCED_BOOT));
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let node_list = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items;
        let now = Instant::now();
        let by_name: BTreeMap<String, &Pod> = list
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, p)))
            .collect();
        {
            let mut w = self.world();
            if marker && w.a1_marker.is_none() {
                w.a1_marker = Some(now);
            }
            if node_list
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some("a-1") && has_taint(n, OUT_OF_SERVICE))
                && w.a1_taint.is_none()
            {
                w.a1_taint = Some(now);
            }
            for (name, seen) in w.pods.iter_mut() {
                match by_name.get(name) {
                    None => {
                        if seen.gone.is_none() {
                            seen.gone = Some(now);
                        }
                    }
                    Some(p) => {
                        if !gated(p) && seen.ungated.is_none() {
                            seen.ungated = Some(now);
                            seen.a1_fenced_at_ungate = Some(marker);
                        }
                    }
                }
            }
        }
        self.virt_controller(&by_name).await?;
        self.scheduler(&list, &node_list).await?;
        self.kubelet(&list).await
    }

    /// A new VMI and launcher pod for each started VM whose launcher pod is gone.
    pub async fn virt_controller(&self, listed: &BTreeMap<String, &Pod>) -> Result<(), String> {
        let todo: Vec<(String, Option<String>)> = {
            let w = self.world();
            w.started
                .iter()
                .filter_map(|vm| {
                    let cur = w.current.get(vm).cloned();
                    let alive = cur
                        .as_ref()
                        .and_then(|c| listed.get(c))
                        .is_some_and(|p| p.metadata.deletion_timestamp.is_none());
                    (!alive).then(|| (vm.clone(), cur))
                })
                .collect()
        };
        for (vm, old) in todo {
            let vm_obj = vms(&self.admin).get(&vm).await.map_err(|e| e.to_string())?;
            let vmi_api = vmis(&self.admin);
            if old.is_some()
                && vmi_api
                    .get_opt(&vm)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_some()
            {
                vmi_api
                    .delete(&vm, &DeleteParams::default())
                    .await
                    .map_err(|e| format!("delete VMI {vm}: {e}"))?;
                continue; // created again on the next tick, once gone
            }
            let vmi = match vmi_api.get_opt(&vm).await.map_err(|e| e.to_string())? {
                Some(v) => v,
                None => {
                    let labels = template_labels(&vm_obj);
                    let obj: DynamicObject = serde_json::from_value(json!({
                        "apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachineInstance",
                        "metadata": {
                            "name": vm, "namespace": VM_NS, "labels": labels,
                            "ownerReferences": [{
                                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                "name": vm, "uid": vm_obj.metadata.uid, "controller": true
                            }]
                        },
                        "spec": vm_obj.data["spec"]["template"]["spec"]
                    }))
                    .map_err(|e| e.to_string())?;
                    vmi_api
                        .create(&PostParams::default(), &obj)
                        .await
                        .map_err(|e| format!("create VMI {vm}: {e}"))?
                }
            };
            let vmi_uid = vmi.metadata.uid.clone().unwrap_or_default();
            let pod = launcher_pod(&vm, &vmi_uid, &template_labels(&vm_obj));
            let pods: Api<Pod> = Api::namespaced(self.admin.clone(), VM_NS);
            match pods.create(&PostParams::default(), &pod).await {
                Ok(created) => {
                    let name = created.metadata.name.clone().unwrap_or_default();
                    let seen = Seen {
                        vm: vm.clone(),
                        uid: created.metadata.uid.clone().unwrap_or_default(),
                        created: Instant::now(),
                        gated_at_create: gated(&created),
                        prefer: preferred(&created),
                        ungated: None,
                        a1_fenced_at_ungate: None,
                        bound: None,
                        running: None,
                        gone: None,
                    };
                    self.note(format!(
                        "virt-controller: created {name} for {vm} (gated {}, prefers {:?})",
                        seen.gated_at_create, seen.prefer
                    ));
                    let mut w = self.world();
                    w.current.insert(vm.clone(), name.clone());
                    w.pods.insert(name, seen);
                }
                Err(e) => self.note(format!("virt-controller: create a launcher for {vm}: {e}")),
            }
        }
        Ok(())
    }

    /// Binds every unbound, ungated pod: to its preferred node if that node takes pods, else
    /// to the first node (by name) that is Ready and has no NoSchedule/NoExecute taint.
    pub async fn scheduler(&self, list: &[Pod], nodes: &[Node]) -> Result<(), String> {
        let takes_pods = |n: &Node| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| {
                    // The API server puts `not-ready` on every new Node; the node lifecycle
                    // controller (not run here) takes it off a Ready node.
                    ts.iter().any(|t| {
                        (t.effect == "NoSchedule" || t.effect == "NoExecute")
                            && !(ready && t.key == "node.kubernetes.io/not-ready")
                    })
                });
            ready && !tainted
        };
        let mut candidates: Vec<String> = nodes
            .iter()
            .filter(|n| takes_pods(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        candidates.sort();
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), VM_NS);
        for p in list {
            if node_of(p).is_some() || p.metadata.deletion_timestamp.is_some() || gated(p) {
                continue;
            }
            let name = p.metadata.name.clone().unwrap_or_default();
            let target = preferred(p)
                .filter(|n| candidates.contains(n))
                .or_else(|| candidates.first().cloned());
            let Some(node) = target else {
                let why = nodes
                    .iter()
                    .map(|n| {
                        let conds: Vec<String> = n
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .map(|cs| {
                                cs.iter()
                                    .map(|c| format!("{}={}", c.type_, c.status))
                                    .collect()
                            })
                            .unwrap_or_default();
                        format!(
                            "{:?} {conds:?} taints {:?}",
                            n.metadata.name,
                            crate::common::agents::taints(n)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let mut w = self.world();
                if w.no_node.as_deref() != Some(why.as_str()) {
                    w.log.push(format!("scheduler: no node for {name}: {why}"));
                    println!("cluster: scheduler: no node for {name}: {why}");
                    w.no_node = Some(why);
                }
                continue;
            };
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": { "name": name },
                "target": { "apiVersion": "v1", "kind": "Node", "name": node }
            });
            match pods
                .create_subresource::<_, Value>("binding", &name, &PostParams::default(), &binding)
                .await
            {
                Ok(_) => {
                    self.note(format!("scheduler: bound {name} to {node}"));
                    if let Some(s) = self.world().pods.get_mut(&name) {
                        s.bound = Some((node, Instant::now()));
                    }
                }
                Err(e) => self.note(format!("scheduler: bind {name} to {node}: {e}")),
            }
        }
        Ok(())
    }

    /// Marks Running the pods bound to nodes with power.
    pub async fn kubelet(&self, list: &[Pod]) -> Result<(), String> {
        let alive = self.alive.lock().expect("alive").clone();
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), VM_NS);
        for p in list {
            let Some(node) = node_of(p) else { continue };
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            if !alive.contains(&node)
                || phase == Some("Running")
                || p.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let name = p.metadata.name.clone().unwrap_or_default();
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({ "status": {
                "phase": "Running",
                "conditions": [{ "type": "Ready", "status": "True", "lastTransitionTime": now }],
                "startTime": now
            }});
            match pods
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
            {
                Ok(_) => {
                    self.note(format!("kubelet {node}: {name} Running"));
                    if let Some(s) = self.world().pods.get_mut(&name) {
                        s.running = Some(Instant::now());
                    }
                }
                Err(e) => self.note(format!("kubelet {node}: {name}: {e}")),
            }
        }
        Ok(())
    }
}

/// Runs the cluster stand-ins every 200 ms.
pub fn play_cluster(cluster: Arc<Cluster>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = cluster.tick().await {
                cluster.note(format!("tick: {e}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The events.k8s.io/v1 Events of `namespace`: (reason, regarding kind, regarding name, note).
pub async fn events(admin: &Client, namespace: &str) -> Result<Vec<[String; 4]>, String> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
            "events",
        ),
    );
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            [
                s(&e.data["reason"]),
                s(&e.data["regarding"]["kind"]),
                s(&e.data["regarding"]["name"]),
                s(&e.data["note"]),
            ]
        })
        .collect())
}

pub async fn wait_event(admin: &Client, reason: &str, kind: &str, name: &str) -> String {
    wait_for(
        &format!("a {reason} Event on {kind} {name}"),
        Duration::from_secs(30),
        || async {
            let all = events(admin, VM_NS).await?;
            all.iter()
                .find(|e| e[0] == reason && e[1] == kind && e[2] == name)
                .map(|e| e[3].clone())
                .ok_or_else(|| format!("{all:?}"))
        },
    )
    .await
}

pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}
