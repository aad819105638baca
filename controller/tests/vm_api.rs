//! The VM loop against a mock API server: a new launcher pod of an opted-in VM gets its disk
//! Lease and loses its gate only once the old instance's node is proven fenced; a bad annotation,
//! a disk that is not RWX Block and a VM that did not opt in each get what the issue says and
//! nothing else.

mod common;

use common::*;
use controller::crd::VmStatus;
use controller::metrics::Metrics;
use controller::status::RemediationView;
use controller::vm::watch::VmStores;
use controller::vm::{VmContext, VmLoop};
use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use node_health::SystemClock;
use serde_json::{Value, json};
use std::sync::Arc;

const NS: &str = "default";
const DISK_LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/default/leases/twosite-disk-db-root";
const NEW_POD: &str = "/api/v1/namespaces/default/pods/virt-launcher-db-new";
const VM_PATH: &str = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines/db";

fn vm(annotation: Option<&str>, labelled: bool) -> controller::vm::types::VirtualMachine {
    let mut meta = json!({"name": "db", "namespace": NS, "uid": "vm-uid"});
    if let Some(a) = annotation {
        meta["annotations"] = json!({"twosite.dev/ha": a});
    }
    let labels = if labelled {
        json!({"twosite.dev/ha": "true"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
        "spec": {"runStrategy": "Always", "template": {
            "metadata": {"labels": labels},
            "spec": {"volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "db-root"}}]}}}
    }))
    .expect("vm")
}

fn claim(modes: &[&str], mode: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": "db-root", "namespace": NS},
        "spec": {"accessModes": modes, "volumeMode": mode}
    }))
    .expect("pvc")
}

fn disk_lease() -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": "twosite-disk-db-root", "namespace": NS, "resourceVersion": "7",
                     "labels": {"twosite.dev/disk": "db-root"},
                     "annotations": {"twosite.dev/held-for-node": "a1"}},
        "spec": {"holderIdentity": "old-uid", "leaseTransitions": 3}
    }))
    .expect("lease")
}

fn launcher(name: &str, uid: &str, node: Option<&str>, gated: bool, created: &str) -> Pod {
    let mut spec = json!({"containers": [{"name": "compute"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    if gated {
        spec["schedulingGates"] = json!([{"name": "twosite.dev/volume-leases"}]);
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS, "uid": uid, "creationTimestamp": created,
                     "labels": {"kubevirt.io": "virt-launcher", "twosite.dev/ha": "true"},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachineInstance", "name": "db", "uid": "vmi"}]},
        "spec": spec,
        "status": {"phase": if node.is_some() && !gated { "Running" } else { "Pending" }}
    }))
    .expect("pod")
}

/// The old instance on a1 (lost) and a new gated launcher pod.
fn after_a1_lost() -> Vec<Pod> {
    vec![
        launcher(
            "virt-launcher-db-old",
            "old-uid",
            Some("a1"),
            false,
            "2026-12-07T01:00:00Z",
        ),
        launcher(
            "virt-launcher-db-new",
            "new-uid",
            None,
            true,
            "2026-12-07T02:00:00Z",
        ),
    ]
}

fn view(fenced: &[&str], live: &[&str]) -> RemediationView {
    RemediationView {
        fenced: fenced.iter().map(|s| s.to_string()).collect(),
        live: live.iter().map(|s| s.to_string()).collect(),
        ..RemediationView::default()
    }
}

async fn context(stores: VmStores) -> (VmContext, ApiServer) {
    let (client, mut api) = mock_client();
    let leadership = lead(client.clone(), &mut api, Arc::new(Metrics::new())).await;
    let ctx = VmContext {
        client: client.clone(),
        stores,
        recorder: recorder(client),
        leadership,
        metrics: Arc::new(Metrics::new()),
        api_timeout: API_TIMEOUT,
        clock: Arc::new(SystemClock::new()),
        dry_run: false,
    };
    (ctx, api)
}

fn spawn_pass(
    ctx: VmContext,
    view: RemediationView,
) -> tokio::task::JoinHandle<(VmContext, Vec<VmStatus>)> {
    tokio::spawn(async move {
        let out = VmLoop::new().pass(&ctx, Some(&view)).await;
        (ctx, out)
    })
}

#[tokio::test]
async fn the_gate_lifts_only_after_the_disk_lease_is_granted_once_the_old_node_is_fenced() {
    let stores = VmStores::from_objects(
        vec![vm(Some("true"), true)],
        after_a1_lost(),
        vec![claim(&["ReadWriteMany"], "Block")],
        vec![disk_lease()],
    );
    let (ctx, mut api) = context(stores).await;
    let pass = spawn_pass(ctx, view(&["a1"], &["b1"]));
    let (put, reasons) = api.expect_after_events(Method::PUT, DISK_LEASE).await;
    assert_eq!(reasons, vec!["VMFailoverStarted"]);
    assert_eq!(
        put.body["metadata"]["resourceVersion"], "7",
        "the write carries the version read"
    );
    assert_eq!(put.body["spec"]["holderIdentity"], "new-uid");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);
    assert_eq!(
        put.body["metadata"]["annotations"]["twosite.dev/held-for-node"],
        ""
    );
    let body = put.body.clone();
    put.respond(200, stored(body, "8"));
    let patch = api.expect(Method::PATCH, NEW_POD).await;
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert_eq!(
        patch.body,
        json!([
            {"op": "test", "path": "/metadata/uid", "value": "new-uid"},
            {"op": "test", "path": "/spec/schedulingGates/0/name", "value": "twosite.dev/volume-leases"},
            {"op": "remove", "path": "/spec/schedulingGates/0"}
        ])
    );
    patch.respond(
        200,
        serde_json::to_value(&after_a1_lost()[1]).expect("json"),
    );
    let (_, status) = pass.await.expect("pass");
    assert_eq!(status.len(), 1);
    let (requests, _) = api.drain().await;
    assert!(requests.is_empty(), "{requests:?}");
}

#[tokio::test]
async fn a_failed_grant_leaves_the_gate_on() {
    let stores = VmStores::from_objects(
        vec![vm(Some("true"), true)],
        after_a1_lost(),
        vec![claim(&["ReadWriteMany"], "Block")],
        vec![disk_lease()],
    );
    let (ctx, mut api) = context(stores).await;
    let pass = spawn_pass(ctx, view(&["a1"], &["b1"]));
    let (put, _) = api.expect_after_events(Method::PUT, DISK_LEASE).await;
    put.respond_status(409, "Conflict", "the object has been modified");
    let (_, _) = pass.await.expect("pass");
    let (requests, _) = api.drain().await;
    assert!(
        requests.is_empty(),
        "no ungate after a conflict: {requests:?}"
    );
}

#[tokio::test]
async fn the_gate_stays_while_the_old_instance_holds_the_lease_on_an_unproven_node() {
    let stores = VmStores::from_objects(
        vec![vm(Some("true"), true)],
        after_a1_lost(),
        vec![claim(&["ReadWriteMany"], "Block")],
        vec![disk_lease()],
    );
    let (ctx, mut api) = context(stores).await;
    // a1 is dead but not proven fenced yet: neither live nor fenced.
    let pass = spawn_pass(ctx, view(&[], &["b1"]));
    let (requests, reasons) = api.drain().await;
    let (_, status) = pass.await.expect("pass");
    assert!(requests.is_empty(), "nothing may be written: {requests:?}");
    assert_eq!(reasons, vec!["VMFailoverBlocked"]);
    assert_eq!(status[0].state, "Gated");
    let blocked = status[0]
        .conditions
        .iter()
        .find(|c| c.type_ == "FailoverReady")
        .expect("FailoverReady");
    assert_eq!(blocked.status, "False");
    assert!(
        blocked.message.contains("virt-launcher-db-old"),
        "{}",
        blocked.message
    );
}

#[tokio::test]
async fn a_bad_annotation_gets_an_event_and_nothing_else() {
    let stores = VmStores::from_objects(
        vec![vm(Some("yes"), false)],
        after_a1_lost(),
        vec![claim(&["ReadWriteMany"], "Block")],
        vec![disk_lease()],
    );
    let (ctx, mut api) = context(stores).await;
    let pass = spawn_pass(ctx, view(&["a1"], &["b1"]));
    let (requests, reasons) = api.drain().await;
    let (_, status) = pass.await.expect("pass");
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(reasons, vec!["InvalidAnnotation"]);
    assert_eq!(status[0].state, "InvalidAnnotation");
}

#[tokio::test]
async fn a_disk_that_is_not_rwx_block_is_reported_and_the_vm_still_fails_over() {
    let stores = VmStores::from_objects(
        vec![vm(Some("true"), true)],
        after_a1_lost(),
        vec![claim(&["ReadWriteOnce"], "Filesystem")],
        Vec::new(),
    );
    let (ctx, mut api) = context(stores).await;
    let pass = spawn_pass(ctx, view(&["a1"], &["b1"]));
    let (patch, reasons) = api.expect_after_events(Method::PATCH, NEW_POD).await;
    assert!(
        reasons.contains(&"UnprotectedVolume".to_string()),
        "{reasons:?}"
    );
    patch.respond(
        200,
        serde_json::to_value(&after_a1_lost()[1]).expect("json"),
    );
    let (_, status) = pass.await.expect("pass");
    let disks = status[0]
        .conditions
        .iter()
        .find(|c| c.type_ == "DisksProtected")
        .expect("DisksProtected");
    assert_eq!(
        (disks.status.as_str(), disks.reason.as_str()),
        ("False", "UnprotectedVolume")
    );
    let (requests, _) = api.drain().await;
    assert!(
        requests.is_empty(),
        "no Lease for a disk that is not RWX Block: {requests:?}"
    );
}

#[tokio::test]
async fn a_vm_that_did_not_opt_in_is_not_touched() {
    let stores = VmStores::from_objects(
        vec![vm(None, false)],
        after_a1_lost(),
        vec![claim(&["ReadWriteMany"], "Block")],
        vec![disk_lease()],
    );
    let (ctx, mut api) = context(stores).await;
    let pass = spawn_pass(ctx, view(&["a1"], &["b1"]));
    let (requests, reasons) = api.drain().await;
    let (_, status) = pass.await.expect("pass");
    assert!(
        requests.is_empty() && reasons.is_empty(),
        "{requests:?} {reasons:?}"
    );
    assert!(status.is_empty());
}

#[tokio::test]
async fn an_opted_in_vm_gets_its_template_label_first() {
    let stores = VmStores::from_objects(
        vec![vm(Some("true"), false)],
        Vec::new(),
        vec![claim(&["ReadWriteMany"], "Block")],
        vec![disk_lease()],
    );
    let (ctx, mut api) = context(stores).await;
    let pass = spawn_pass(ctx, view(&[], &["a1", "b1"]));
    let patch = api.expect(Method::PATCH, VM_PATH).await;
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        patch.body,
        json!({"spec": {"template": {"metadata": {"labels": {"twosite.dev/ha": "true"}}}}})
    );
    patch.respond(200, Value::Null);
    let _ = pass.await.expect("pass");
}
