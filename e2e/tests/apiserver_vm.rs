//! The real-API-server tier, KubeVirt VM protection: the VirtualMachine and
//! VirtualMachineInstance CRDs installed on a real kube-apiserver 1.20.2, the real `twosite
//! controller` (deploy/ RBAC) with its admission webhook over TLS, registered through a
//! MutatingWebhookConfiguration that calls it by URL (`https://127.0.0.1:<port>/mutate-launcher`,
//! no Service: there is no kube-proxy here; the controller fills the empty Secret with its own CA
//! and patches the `caBundle` in), and two real `twosite-agent` processes (a-1 and b-1, one per
//! room, test watchdogs).
//!
//! The test plays the rest of the cluster:
//! - virt-controller: for each VM it is told to start, a VirtualMachineInstance (owned by the VM)
//!   and a launcher pod (owned by the VMI; labels: the VM template's labels plus
//!   `kubevirt.io=virt-launcher`); once that pod is gone, a new VMI and a new launcher pod;
//! - kube-scheduler: binds (binding subresource) each unbound pod to a Ready node without
//!   NoSchedule/NoExecute taints, the preferred node-affinity node first, and never a gated pod;
//! - kubelet: renews the kubelet Leases of the nodes that have power, and marks the pods bound to
//!   them Running.
//!
//! **Gated, on 1.20.** kube-apiserver 1.20 does not know `spec.schedulingGates` (1.26) and
//! silently drops it from the webhook's patch. The webhook also sets the annotation
//! `twosite.dev/gated`, which 1.20 keeps, and the controller's release removes both (one JSON
//! patch). So here "gated" means: the pod carries `twosite.dev/gated`; the test's scheduler does
//! not bind such a pod, as the real scheduler of 1.27+ does not bind a pod with a scheduling gate.
//!
//! `vm_failover_gated_until_fenced`: VM `protected` (annotated `twosite.dev/ha: "true"`, one RWX
//! Block PVC) and VM `plain` (not annotated) run on a-1; their first launcher pods come after the
//! controller labelled `protected`'s template, so `protected`'s is gated by the webhook and
//! released at once (no other holder of its disk Lease). a-1 loses power (agent SIGKILL, no
//! kubelet): the controller fences it, deletes `protected`'s launcher pod (grace 0) and not
//! `plain`'s; the new launcher pod is gated at creation, its disk Lease is granted to it and its
//! gate lifted only once a-1 is proven fenced (the fence marker); it runs on b-1. `plain` keeps
//! its pod on a-1 (no kube-controller-manager here, so no pod GC), has no disk Lease and was
//! never gated. The VM's Events (VMFailoverStarted, VMFailoverCompleted) and `status.vms` are
//! checked; the figures are printed.
//!
//! `webhook_leaves_other_pods_alone_and_gates_an_orphan_launcher`: a pod without the label is
//! admitted unchanged (the objectSelector keeps it from the webhook), a labelled pod that is not a
//! launcher is admitted ungated, and a labelled launcher pod of a VM that does not exist is gated
//! and stays gated, with a `VMFailoverBlocked` Event on the pod.

mod common;

use common::agents::{has_taint, play_kubelets};
use common::volume::{start_agents, two_nodes};
use common::{
    AGENT_BIN, CONTROLLER_BIN, NAMESPACE, Process, Setup, binary, create_doc, twosite_status,
    twosites, wait_for,
};
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

const VM_NS: &str = "vms";
const GATED: &str = "twosite.dev/gated";
const HA: &str = "twosite.dev/ha";
const HELD_FOR: &str = "twosite.dev/held-for-node";
const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
const FENCED_BOOT: &str = "twosite.dev/fenced-boot-id";
const WEBHOOK_SECRET: &str = "twosite-webhook-tls";
const WEBHOOK_CONFIG: &str = "twosite-vm-gate";
const LAUNCHER_SELECTOR: &str = "kubevirt.io=virt-launcher";

/// The two tests each start an API server, etcd and the controller: one at a time on small CI
/// machines, so the measured figures are not skewed by the other test.
static ONE_AT_A_TIME: LazyLock<tokio::sync::Mutex<()>> =
    LazyLock::new(|| tokio::sync::Mutex::new(()));

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", kind), plural)
}

fn vms(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        VM_NS,
        &resource("VirtualMachine", "virtualmachines"),
    )
}

fn vmis(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        VM_NS,
        &resource("VirtualMachineInstance", "virtualmachineinstances"),
    )
}

/// KubeVirt's CRDs, as far as this test needs them: any content kept.
fn kubevirt_crd(kind: &str, plural: &str) -> Value {
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
async fn install_kubevirt(admin: &Client) {
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
async fn start_controller_with_webhook(
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

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn gated(pod: &Pod) -> bool {
    annotation(pod, GATED).is_some()
        || pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| !g.is_empty())
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

/// The first node a pod's preferred node affinity names.
fn preferred(pod: &Pod) -> Option<String> {
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
fn launcher_pod(vm: &str, vmi_uid: &str, labels: &BTreeMap<String, String>) -> Pod {
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
fn vm_object(name: &str, annotated: bool) -> DynamicObject {
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
fn rwx_block_claim(name: &str) -> PersistentVolumeClaim {
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

fn template_labels(vm: &DynamicObject) -> BTreeMap<String, String> {
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
struct Seen {
    vm: String,
    uid: String,
    created: Instant,
    /// The API server's create response carried `twosite.dev/gated`.
    gated_at_create: bool,
    /// The preferred node affinity of the create response.
    prefer: Option<String>,
    ungated: Option<Instant>,
    /// When first seen ungated: the fence marker of a-1 was on its heartbeat Lease (read after
    /// the pods were listed).
    a1_fenced_at_ungate: Option<bool>,
    bound: Option<(String, Instant)>,
    running: Option<Instant>,
    gone: Option<Instant>,
}

/// The test's stand-ins for virt-controller, kube-scheduler and the kubelets.
#[derive(Default)]
struct World {
    /// The VMs virt-controller runs.
    started: BTreeSet<String>,
    /// Each VM's current launcher pod.
    current: BTreeMap<String, String>,
    pods: BTreeMap<String, Seen>,
    /// When a-1's fence marker and its out-of-service taint were first seen.
    a1_marker: Option<Instant>,
    a1_taint: Option<Instant>,
    log: Vec<String>,
    /// Why the scheduler last found no node (said once).
    no_node: Option<String>,
}

impl World {
    fn launchers_of(&self, vm: &str) -> Vec<(String, Seen)> {
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

struct Cluster {
    admin: Client,
    world: Arc<Mutex<World>>,
    /// The nodes with power: their kubelet runs pods and renews its Lease.
    alive: Arc<Mutex<BTreeSet<String>>>,
}

impl Cluster {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("the world")
    }

    fn note(&self, line: String) {
        println!("cluster: {line}");
        self.world().log.push(line);
    }

    async fn tick(&self) -> Result<(), String> {
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
    async fn virt_controller(&self, listed: &BTreeMap<String, &Pod>) -> Result<(), String> {
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
    async fn scheduler(&self, list: &[Pod], nodes: &[Node]) -> Result<(), String> {
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
                            common::agents::taints(n)
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
    async fn kubelet(&self, list: &[Pod]) -> Result<(), String> {
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
fn play_cluster(cluster: Arc<Cluster>) -> tokio::task::JoinHandle<()> {
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
async fn events(admin: &Client, namespace: &str) -> Result<Vec<[String; 4]>, String> {
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

async fn wait_event(admin: &Client, reason: &str, kind: &str, name: &str) -> String {
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

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_failover_gated_until_fenced() {
    let test = "vm_failover_gated_until_fenced";
    let _one = ONE_AT_A_TIME.lock().await;
    let nodes = two_nodes();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options: apiserver::Options::default(),
        rbac: &["rbac-controller.yaml", "rbac-agent.yaml"],
        nodes: &nodes,
    };
    let Some((server, admin)) = common::start(test, setup).await else {
        return;
    };
    install_kubevirt(&admin).await;
    let alive = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.name.clone())
            .collect::<BTreeSet<_>>(),
    ));
    let _kubelet_leases = play_kubelets(&admin, Arc::clone(&alive));
    let admin_port = apiserver::free_port().expect("a free port");
    let webhook_port = apiserver::free_port().expect("a free port");
    let mut controller =
        start_controller_with_webhook(&server, &admin, admin_port, webhook_port).await;
    let mut agents = start_agents(&server, &nodes).await;

    // Two VMs with an RWX Block disk each; only `protected` opts in.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), VM_NS);
    for name in ["protected-disk", "plain-disk"] {
        claims
            .create(&PostParams::default(), &rwx_block_claim(name))
            .await
            .expect("create a PVC");
    }
    for (name, annotated) in [("protected", true), ("plain", false)] {
        vms(&admin)
            .create(&PostParams::default(), &vm_object(name, annotated))
            .await
            .unwrap_or_else(|e| panic!("create VM {name}: {e}"));
    }
    let leases: Api<Lease> = Api::namespaced(admin.clone(), VM_NS);
    wait_for(
        "the controller labels protected's template and creates its disk Lease",
        Duration::from_secs(30),
        || async {
            let vm = vms(&admin)
                .get("protected")
                .await
                .map_err(|e| e.to_string())?;
            let labelled = template_labels(&vm).get(HA).map(String::as_str) == Some("true");
            let lease = leases
                .get_opt("twosite-disk-protected-disk")
                .await
                .map_err(|e| e.to_string())?;
            if labelled && lease.is_some() {
                Ok(())
            } else {
                Err(format!("labelled {labelled}, lease {}", lease.is_some()))
            }
        },
    )
    .await;
    let plain_vm = vms(&admin).get("plain").await.expect("VM plain");
    assert_eq!(
        template_labels(&plain_vm).get(HA),
        None,
        "an unannotated VM's template is not labelled"
    );

    // virt-controller starts both VMs.
    let cluster = Arc::new(Cluster {
        admin: admin.clone(),
        world: Arc::new(Mutex::new(World::default())),
        alive: Arc::clone(&alive),
    });
    cluster
        .world()
        .started
        .extend(["protected".to_string(), "plain".to_string()]);
    let _cluster_task = play_cluster(Arc::clone(&cluster));

    let first = wait_for(
        "both VMs run on a-1, protected's disk Lease granted to its launcher pod",
        Duration::from_secs(60),
        || async {
            let (p, q) = {
                let w = cluster.world();
                (w.launchers_of("protected"), w.launchers_of("plain"))
            };
            let running = |v: &Vec<(String, Seen)>| {
                v.first()
                    .filter(|(_, s)| s.running.is_some())
                    .and_then(|(n, s)| Some((n.clone(), s.clone(), s.bound.clone()?.0)))
            };
            let (Some(pp), Some(qq)) = (running(&p), running(&q)) else {
                return Err(format!("protected {p:?}\nplain {q:?}"));
            };
            let lease = leases
                .get("twosite-disk-protected-disk")
                .await
                .map_err(|e| e.to_string())?;
            let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
            let held_for = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(HELD_FOR).cloned());
            if holder.as_deref() == Some(pp.1.uid.as_str()) && held_for.as_deref() == Some("a-1") {
                Ok((pp, qq, lease))
            } else {
                Err(format!("lease holder {holder:?}, held for {held_for:?}"))
            }
        },
    )
    .await;
    let ((p1_name, p1, p1_node), (q1_name, q1, q1_node), lease1) = first;
    assert_eq!(p1_node, "a-1");
    assert_eq!(q1_node, "a-1");
    assert!(
        p1.gated_at_create,
        "protected's first launcher pod is gated by the webhook at creation"
    );
    let (ungated, bound) = (
        p1.ungated.expect("ungated"),
        p1.bound.clone().expect("bound").1,
    );
    assert!(ungated <= bound, "bound only after the gate was lifted");
    println!(
        "protected's first launcher {p1_name}: gate lifted {} ms after creation, bound {} ms after",
        ms(ungated - p1.created),
        ms(bound - p1.created)
    );
    assert!(
        !q1.gated_at_create,
        "plain's launcher pod {q1_name} is not gated"
    );
    let epoch1 = lease1
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    assert!(epoch1 >= 1, "the first grant has epoch >= 1: {lease1:?}");
    let ts = twosites(&admin);
    wait_for(
        "status.vms lists protected Running on a-1",
        Duration::from_secs(20),
        || async {
            let status = twosite_status(&ts).await?;
            let vms = status["vms"].as_array().cloned().unwrap_or_default();
            let p = vms.iter().find(|v| v["name"] == "protected");
            match p {
                Some(v) if v["state"] == "Running" && v["node"] == "a-1" => Ok(()),
                _ => Err(format!("{}", status["vms"])),
            }
        },
    )
    .await;

    // a-1 loses power: its agent and its kubelet stop.
    controller.assert_running();
    agents[0].kill();
    let off = Instant::now();
    alive.lock().expect("alive").remove("a-1");
    println!("a-1 powered off");

    let pods: Api<Pod> = Api::namespaced(admin.clone(), VM_NS);
    let (p2_name, p2) = wait_for(
        "protected runs again, on b-1, in a new launcher pod",
        Duration::from_secs(120),
        || async {
            let w = cluster.world();
            let all = w.launchers_of("protected");
            match all.get(1) {
                Some((n, s)) if s.running.is_some() => Ok((n.clone(), s.clone())),
                _ => Err(format!(
                    "launchers {all:?}; a-1 marker {:?}, taint {:?}",
                    w.a1_marker.map(|t| t - off),
                    w.a1_taint.map(|t| t - off)
                )),
            }
        },
    )
    .await;
    let w = cluster.world().launchers_of("protected");
    let marker = cluster.world().a1_marker.expect("a-1's fence marker seen");
    let taint = cluster.world().a1_taint;
    let p1_gone = w[0].1.gone.expect("protected's first launcher pod deleted");
    println!(
        "figures: a-1 off -> fence marker {} ms, -> out-of-service taint {:?} ms, -> old launcher deleted {} ms, -> new launcher created {} ms, -> gate lifted {} ms, -> Running on b-1 {} ms",
        ms(marker - off),
        taint.map(|t| ms(t - off)),
        ms(p1_gone - off),
        ms(p2.created - off),
        ms(p2.ungated.expect("ungated") - off),
        ms(p2.running.expect("running") - off),
    );
    println!("the new launcher pod {p2_name} prefers {:?}", p2.prefer);
    assert!(
        p2.gated_at_create,
        "the new launcher pod came back from the API server gated (the webhook over TLS ran)"
    );
    assert_eq!(
        p2.a1_fenced_at_ungate,
        Some(true),
        "the gate was lifted only after a-1's fence marker was committed"
    );
    assert!(marker <= p2.ungated.expect("ungated"));
    assert!(
        p1_gone >= marker,
        "the old launcher pod was deleted only after the fence"
    );
    let (p2_node, p2_bound) = p2.bound.clone().expect("bound");
    assert_eq!(p2_node, "b-1");
    assert!(p2.ungated.expect("ungated") <= p2_bound);
    if let Some(pref) = &p2.prefer {
        assert_eq!(pref, "b-1", "the webhook prefers a-1's partner");
    }
    let lease2 = leases
        .get("twosite-disk-protected-disk")
        .await
        .expect("the disk Lease");
    let spec2 = lease2.spec.clone().expect("spec");
    assert_eq!(spec2.holder_identity.as_deref(), Some(p2.uid.as_str()));
    assert_eq!(
        spec2.lease_transitions,
        Some(epoch1 + 1),
        "the new grant's epoch is one more"
    );
    wait_for(
        "the disk Lease records b-1",
        Duration::from_secs(10),
        || async {
            let l = leases
                .get("twosite-disk-protected-disk")
                .await
                .map_err(|e| e.to_string())?;
            let held = l
                .metadata
                .annotations
                .and_then(|a| a.get(HELD_FOR).cloned());
            if held.as_deref() == Some("b-1") {
                Ok(())
            } else {
                Err(format!("{held:?}"))
            }
        },
    )
    .await;

    // plain: untouched.
    let q = pods
        .get_opt(&q1_name)
        .await
        .expect("get plain's launcher")
        .expect("plain's launcher pod on a-1 is not deleted");
    assert!(q.metadata.deletion_timestamp.is_none());
    assert_eq!(node_of(&q).as_deref(), Some("a-1"));
    assert_eq!(cluster.world().launchers_of("plain").len(), 1);
    assert!(
        leases
            .get_opt("twosite-disk-plain-disk")
            .await
            .expect("get")
            .is_none(),
        "no disk Lease for a VM that did not opt in"
    );
    let all_leases = leases.list(&ListParams::default()).await.expect("leases");
    assert_eq!(
        all_leases
            .items
            .iter()
            .filter_map(|l| l.metadata.name.clone())
            .collect::<Vec<_>>(),
        vec!["twosite-disk-protected-disk".to_string()]
    );
    for (name, s) in cluster.world().launchers_of("plain") {
        assert!(!s.gated_at_create, "{name} never gated");
    }
    assert!(annotation(&q, GATED).is_none());

    // Status and Events.
    wait_for(
        "status.vms lists protected Running on b-1",
        Duration::from_secs(20),
        || async {
            let status = twosite_status(&ts).await?;
            let vms = status["vms"].as_array().cloned().unwrap_or_default();
            let p = vms.iter().find(|v| v["name"] == "protected");
            let plain_listed = vms.iter().any(|v| v["name"] == "plain");
            match p {
                Some(v) if v["state"] == "Running" && v["node"] == "b-1" && !plain_listed => Ok(()),
                _ => Err(format!("{}", status["vms"])),
            }
        },
    )
    .await;
    // Both failover Events on the VM (waited for together, so a failure says which is missing).
    let t = Instant::now();
    let on_vm = loop {
        let all = events(&admin, VM_NS).await.unwrap_or_default();
        let on_vm: BTreeMap<String, String> = all
            .iter()
            .filter(|e| e[1] == "VirtualMachine" && e[2] == "protected")
            .map(|e| (e[0].clone(), e[3].clone()))
            .collect();
        let complete = ["VMFailoverStarted", "VMFailoverCompleted"]
            .iter()
            .all(|r| on_vm.contains_key(*r));
        if complete || t.elapsed() > Duration::from_secs(30) {
            break on_vm;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("Events on VM protected: {on_vm:?}");
    let vm_log: Vec<String> = controller
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("vm") || l.contains("VM") || l.contains("fenced") || l.contains("event")
        })
        .map(str::to_string)
        .collect();
    for reason in ["VMFailoverStarted", "VMFailoverCompleted"] {
        assert!(
            on_vm.contains_key(reason),
            "no {reason} Event on VM protected (Events: {on_vm:?})\n--- controller log (VM lines) ---\n{}",
            vm_log.join("\n")
        );
    }
    controller.assert_running();
    let forbidden = controller.forbidden_lines();
    assert!(
        forbidden.is_empty(),
        "the API server refused the controller:\n{}",
        forbidden.join("\n")
    );
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_leaves_other_pods_alone_and_gates_an_orphan_launcher() {
    let test = "webhook_leaves_other_pods_alone_and_gates_an_orphan_launcher";
    let _one = ONE_AT_A_TIME.lock().await;
    let nodes = two_nodes();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN],
        options: apiserver::Options::default(),
        rbac: &["rbac-controller.yaml"],
        nodes: &nodes,
    };
    let Some((server, admin)) = common::start(test, setup).await else {
        return;
    };
    install_kubevirt(&admin).await;
    let alive = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.name.clone())
            .collect::<BTreeSet<_>>(),
    ));
    let _kubelet_leases = play_kubelets(&admin, Arc::clone(&alive));
    let admin_port = apiserver::free_port().expect("a free port");
    let webhook_port = apiserver::free_port().expect("a free port");
    let mut controller =
        start_controller_with_webhook(&server, &admin, admin_port, webhook_port).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), VM_NS);

    // No label: the API server does not even ask the webhook.
    let plain: Pod = serde_json::from_value(json!({
        "metadata": { "name": "plain-pod", "namespace": VM_NS,
                      "labels": { "app": "web" } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] }
    }))
    .expect("a Pod");
    let created = pods
        .create(&PostParams::default(), &plain)
        .await
        .expect("a pod without the label is admitted");
    assert_eq!(created.metadata.annotations, None, "admitted unchanged");
    assert!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .is_none()
    );

    // The label, but not a launcher pod: admitted ungated (with a warning).
    let labelled: Pod = serde_json::from_value(json!({
        "metadata": { "name": "labelled-pod", "namespace": VM_NS, "labels": { HA: "true" } },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] }
    }))
    .expect("a Pod");
    let created = pods
        .create(&PostParams::default(), &labelled)
        .await
        .expect("a labelled pod that is not a launcher is admitted");
    assert!(!gated(&created), "{:?}", created.metadata);

    // A launcher pod of a VM that does not exist: gated, and it stays gated.
    let mut orphan = launcher_pod(
        "ghost",
        "00000000-0000-0000-0000-0000000000aa",
        &BTreeMap::from([(HA.to_string(), "true".to_string())]),
    );
    orphan.metadata.annotations = None;
    let created = pods
        .create(&PostParams::default(), &orphan)
        .await
        .expect("the orphan launcher pod is admitted");
    let name = created.metadata.name.clone().expect("a name");
    assert!(gated(&created), "gated at creation: {:?}", created.metadata);
    let note = wait_event(&admin, "VMFailoverBlocked", "Pod", &name).await;
    println!("VMFailoverBlocked on {name}: {note}");
    assert!(note.contains("ghost"), "{note}");
    // Several passes of the VM loop later, it is still gated.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let p = pods.get(&name).await.expect("the orphan pod");
        assert!(gated(&p), "the orphan launcher pod stays gated");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let p = pods.get("plain-pod").await.expect("plain-pod");
    assert_eq!(p.metadata.annotations, None);
    controller.assert_running();
    let forbidden = controller.forbidden_lines();
    assert!(
        forbidden.is_empty(),
        "the API server refused the controller:\n{}",
        forbidden.join("\n")
    );
}
