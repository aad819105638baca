use super::*;
use crate::vm::types::VirtualMachine;
use k8s_openapi::api::coordination::v1::Lease;

fn vm(annotation: Option<&str>) -> VirtualMachine {
    let mut meta = json!({"name": "db", "namespace": "plant", "uid": "vm-uid"});
    if let Some(a) = annotation {
        meta["annotations"] = json!({"twosite.dev/ha": a});
    }
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta,
        "spec": {"runStrategy": "Always", "template": {"spec": {"volumes": [
            {"name": "root", "persistentVolumeClaim": {"claimName": "db-root"}}]}}}
    }))
    .expect("vm")
}

fn disk_lease(node: &str) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": "twosite-disk-db-root", "namespace": "plant", "resourceVersion": "7",
                     "labels": {"twosite.dev/disk": "db-root"},
                     "annotations": {"twosite.dev/held-for-node": node}},
        "spec": {"holderIdentity": "old-pod", "leaseTransitions": 3}
    }))
    .expect("lease")
}

fn state(
    vms: Vec<VirtualMachine>,
    leases: Vec<Lease>,
    fenced: &[&str],
    live: &[&str],
) -> WebhookState {
    let view = RemediationView {
        fenced: fenced.iter().map(|s| s.to_string()).collect(),
        live: live.iter().map(|s| s.to_string()).collect(),
        ..RemediationView::default()
    };
    let pairing = Pairing {
        rooms: None,
        pairs: vec![node_health::Pair {
            a: "a-1".into(),
            b: "b-1".into(),
        }],
        unpaired: Vec::new(),
        error: None,
    };
    WebhookState {
        stores: VmStores::from_objects(vms, Vec::new(), Vec::new(), leases),
        view: watch::channel(Some(view)).1,
        pairing: watch::channel(Some(pairing)).1,
        dry_run: false,
    }
}

fn review_body(pod: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "req-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "plant", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kubevirt:kubevirt-controller"},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    }))
    .expect("json")
}

fn launcher_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "virt-launcher-db-", "namespace": "plant",
                     "labels": {"kubevirt.io": "virt-launcher", "twosite.dev/ha": "true"},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachineInstance", "name": "db", "uid": "vmi-uid"}]},
        "spec": {"containers": [{"name": "compute", "image": "virt-launcher"}]}
    })
}

fn response(r: &AdmissionReview<DynamicObject>) -> Value {
    serde_json::to_value(r).expect("json")["response"].clone()
}

/// kube serialises the patch bytes as a JSON array of numbers (Go's decoder takes that for a
/// `[]byte` as well as base64; the real-API-server test shows the API server applies it).
fn patch_of(resp: &Value) -> Value {
    let raw: Vec<u8> = serde_json::from_value(resp["patch"].clone()).expect("a patch");
    serde_json::from_slice(&raw).expect("json patch")
}

#[test]
fn a_launcher_pod_of_an_opted_in_vm_is_gated_and_sent_towards_the_partner() {
    let s = state(
        vec![vm(Some("true"))],
        vec![disk_lease("a-1")],
        &["a-1"],
        &["b-1"],
    );
    let resp = response(&review(&s, &review_body(launcher_pod())));
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["uid"], "req-1");
    let patch = patch_of(&resp);
    let mut pod = launcher_pod();
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("patch");
    json_patch::patch(&mut pod, &patch).expect("applies");
    assert_eq!(pod["spec"]["schedulingGates"], json!([{"name": GATE}]));
    assert!(pod["metadata"]["annotations"][GATED_ANNOTATION].is_string());
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            [0]["preference"]["matchExpressions"][0]["values"],
        json!(["b-1"])
    );
}

#[test]
fn a_pod_of_a_vm_that_did_not_opt_in_is_admitted_unchanged() {
    let s = state(vec![vm(None)], Vec::new(), &[], &["a-1", "b-1"]);
    let resp = response(&review(&s, &review_body(launcher_pod())));
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none(), "{resp}");
    let s = state(vec![vm(Some("yes"))], Vec::new(), &[], &["a-1", "b-1"]);
    let resp = response(&review(&s, &review_body(launcher_pod())));
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none(), "{resp}");
    assert!(
        resp["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("\"yes\""))
    );
}

#[test]
fn unreadable_input_is_refused_not_admitted_ungated() {
    let s = state(vec![vm(Some("true"))], Vec::new(), &[], &[]);
    let resp = response(&review(&s, b"{not json"));
    assert_eq!(resp["allowed"], false);
    // A pod the webhook cannot read (containers must be a list).
    let mut bad = launcher_pod();
    bad["spec"]["containers"] = json!("compute");
    let resp = response(&review(&s, &review_body(bad)));
    assert_eq!(resp["allowed"], false);
    assert!(
        resp["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot read the pod"))
    );
    assert_eq!(resp["uid"], "req-1");
}

#[test]
fn before_the_caches_are_filled_pods_are_refused() {
    let (_w, vms) = {
        let w = kube::runtime::reflector::store::Writer::<VirtualMachine>::default();
        let r = w.as_reader();
        (w, r)
    };
    let mut s = state(Vec::new(), Vec::new(), &[], &[]);
    s.stores.vms = vms;
    let resp = response(&review(&s, &review_body(launcher_pod())));
    assert_eq!(resp["allowed"], false);
    assert!(
        resp["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("starting"))
    );
}

#[test]
fn a_vm_the_cache_does_not_know_still_gates_its_pod() {
    let s = state(Vec::new(), Vec::new(), &[], &[]);
    let resp = response(&review(&s, &review_body(launcher_pod())));
    assert_eq!(resp["allowed"], true);
    assert!(resp["patch"].is_array(), "{resp}");
    assert!(
        resp["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("not known"))
    );
}

#[test]
fn the_gate_patch_appends_to_existing_gates_and_affinity() {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "annotations": {"a": "b"}},
        "spec": {"containers": [], "schedulingGates": [{"name": "other"}],
                 "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 1, "preference": {"matchExpressions": []}}]}}}
    }))
    .expect("pod");
    let mut v = serde_json::to_value(&pod).expect("json");
    json_patch::patch(&mut v, &gate_patch(&pod, Some("b-1")).expect("patch")).expect("applies");
    assert_eq!(
        v["spec"]["schedulingGates"],
        json!([{"name": "other"}, {"name": GATE}])
    );
    assert_eq!(v["metadata"]["annotations"]["a"], "b");
    assert_eq!(
        v["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // Already gated: the gate is not added twice.
    let gated: Pod = serde_json::from_value(v).expect("pod");
    let mut again = serde_json::to_value(&gated).expect("json");
    json_patch::patch(&mut again, &gate_patch(&gated, None).expect("patch")).expect("applies");
    assert_eq!(
        again["spec"]["schedulingGates"].as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn in_dry_run_the_pod_is_admitted_unchanged_with_a_warning() {
    let mut s = state(
        vec![vm(Some("true"))],
        vec![disk_lease("a-1")],
        &["a-1"],
        &["b-1"],
    );
    s.dry_run = true;
    let resp = response(&review(&s, &review_body(launcher_pod())));
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none(), "{resp}");
    assert!(
        resp["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("dry-run"))
    );
}
