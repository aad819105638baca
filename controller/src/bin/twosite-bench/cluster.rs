//! The bench's cluster, as JSON the API server would return: Nodes in two rooms, agent
//! heartbeat Leases, VirtualMachines, their launcher pods and the other pods.

use crate::NAMESPACE;
use controller::heartbeats::AGENT_HEARTBEAT_LABEL;
use serde_json::{Value, json};

const ZONE: &str = "topology.kubernetes.io/zone";

pub(crate) fn room_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "room-a"
    } else {
        "room-b"
    }
}

pub(crate) fn node_name(i: usize) -> String {
    format!("{}-{}", if i.is_multiple_of(2) { "a" } else { "b" }, i / 2)
}

pub(crate) fn node_json(i: usize) -> Value {
    let name = node_name(i);
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"),
                     "labels": {ZONE: room_of(i), "kubernetes.io/hostname": name}},
        "spec": {"taints": []},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"bootID": format!("boot-{name}"), "machineID": "", "systemUUID": "",
                         "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                         "kubeletVersion": "", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        },
    })
}

pub(crate) fn namespace_of(i: usize) -> String {
    format!("ns-{}", i % 50)
}

pub(crate) fn vm_name(node: &str, j: usize) -> String {
    format!("vm-{node}-{j}")
}

/// VM `j` of node `i`. Every other VM opts in (annotated, its template labelled as the
/// controller labels it) and boots from a container disk; the others are plain VMs with a PVC.
pub(crate) fn vm_json(i: usize, j: usize) -> Value {
    let vm = vm_name(&node_name(i), j);
    let ns = namespace_of(i);
    if j.is_multiple_of(2) {
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": vm, "namespace": ns, "uid": format!("uid-{vm}"),
                         "annotations": {"twosite.dev/ha": "true"}},
            "spec": {"runStrategy": "Always", "template": {
                "metadata": {"labels": {"twosite.dev/ha": "true"}},
                "spec": {"volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/fedora"}}]}}},
            "status": {"printableStatus": "Running"},
        })
    } else {
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": vm, "namespace": ns, "uid": format!("uid-{vm}")},
            "spec": {"runStrategy": "Always", "template": {"spec": {"volumes": [
                {"name": "root", "persistentVolumeClaim": {"claimName": format!("{vm}-root")}}]}}},
            "status": {"printableStatus": "Running"},
        })
    }
}

pub(crate) fn launcher_json(node: &str, ns: &str, j: usize) -> Value {
    let vm = vm_name(node, j);
    let mut pod = pod_json(
        node,
        ns,
        &format!("virt-launcher-{vm}"),
        ("VirtualMachineInstance", &vm),
        true,
    );
    if j.is_multiple_of(2) {
        // KubeVirt copies the template's labels to the launcher pod.
        pod["metadata"]["labels"]["twosite.dev/ha"] = json!("true");
    }
    pod
}

pub(crate) fn timestamp(ms: u64) -> String {
    // Virtual time as a wall-clock-looking renewTime: each renewal a distinct one.
    let ms = i64::try_from(ms).unwrap_or(i64::MAX / 2);
    jiff::Timestamp::from_millisecond(1_800_000_000_000 + ms)
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn agent_json(name: &str, ms: u64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("twosite-agent-{name}"), "namespace": NAMESPACE,
                     "labels": {AGENT_HEARTBEAT_LABEL: "true"},
                     "annotations": {"twosite.dev/renew-failures": "0",
                                     "twosite.dev/watchdog": "enabled",
                                     "twosite.dev/boot-id": format!("boot-{name}")}},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 8,
                 "renewTime": timestamp(ms)},
    })
}

/// A pod as the API server returns it (containers, status: what a pod watch carries).
pub(crate) fn pod_json(
    node: &str,
    ns: &str,
    name: &str,
    owner: (&str, &str),
    launcher: bool,
) -> Value {
    let mut labels = json!({"app": name});
    if launcher {
        labels["kubevirt.io"] = json!("virt-launcher");
        labels["vm.kubevirt.io/name"] = json!(owner.1);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                     "resourceVersion": "1", "labels": labels,
                     "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner.0,
                                          "name": owner.1, "uid": "u", "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.example/app:1.0",
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}
