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
#[path = "apiserver_vm/kubevirt.rs"]
mod kubevirt;

use common::agents::play_kubelets;
use common::volume::{start_agents, two_nodes};
use common::{AGENT_BIN, CONTROLLER_BIN, Setup, twosite_status, twosites, wait_for};
use e2e::apiserver::{self};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kubevirt::*;

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
