//! The real-API-server tier, node loss end to end: the real `twosite-agent` processes renew
//! their heartbeat Leases under deploy/rbac-agent.yaml, the real `twosite controller` under
//! deploy/rbac-controller.yaml; the test plays kubelet (Nodes, Ready, kubelet Leases) and the
//! kernel's watchdog (each agent feeds a file given with `--test-watchdog-file`; a node whose
//! agent stopped feeding counts as rebooted).
//!
//! When a-1's agent is killed, the controller declares a-1 dead, waits out the fence deadline,
//! commits the fence marker on the heartbeat Lease, deletes a-1's pods (not its DaemonSet pod)
//! and applies the out-of-service taint, keeping the node's other taint. When a-1 comes back
//! with the boot ID it was fenced with, nothing is lifted (the unsafe case: it never rebooted).
//! Once it comes back with a new boot ID and a renewing agent, the taint and the marker come off
//! and the other taint stays.
//!
//! Build the binaries first (same target directory):
//! `cargo build -p twosite-controller --bin twosite -p twosite-node-health --bin twosite-agent`.

mod common;

use common::agents::{agent_files, feeds, has_taint, play_kubelets, start_agent, taints};
use common::{
    AGENT_BIN, CONTROLLER_BIN, NAMESPACE, Process, Setup, TestNode, set_node_state, twosites,
    wait_for,
};
use e2e::apiserver::{self, Options};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TAINT_KEY: &str = "node.kubernetes.io/out-of-service";
const FENCED_BOOT: &str = "twosite.dev/fenced-boot-id";
/// A taint of somebody else's that must survive ours coming and going.
const OTHER_TAINT: &str = "example.com/maintenance-window";

/// The nodes: a-1/b-1 run agents (a pair), a-2/b-2 only a kubelet (a second pair).
fn cluster() -> Vec<TestNode> {
    vec![
        TestNode::new("a-1", "room-a", "127.0.0.2"),
        TestNode::new("a-2", "room-a", "127.0.0.4"),
        TestNode::new("b-1", "room-b", "127.0.0.3"),
        TestNode::new("b-2", "room-b", "127.0.0.5"),
    ]
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// `status.nodes[name]` of TwoSite `default`, as JSON.
async fn node_status(admin: &Client, name: &str) -> Result<serde_json::Value, String> {
    let ts = twosites(admin)
        .get_opt("default")
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no TwoSite default yet")?;
    ts.data["status"]["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == name).cloned())
        .ok_or_else(|| format!("no status.nodes entry for {name}: {}", ts.data["status"]))
}

/// A pod bound to `node`, as the scheduler would have left it.
fn pod(name: &str, node: &str, daemonset: bool) -> Pod {
    let owner = daemonset.then(|| {
        vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".into(),
                kind: "DaemonSet".into(),
                name: "node-exporter".into(),
                uid: "00000000-0000-0000-0000-00000000d5d5".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]
    });
    serde_json::from_value::<Pod>(json!({
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }]
        }
    }))
    .map(|mut p| {
        p.metadata.owner_references = owner;
        p
    })
    .expect("a Pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_node_is_fenced_tainted_and_released_after_reboot() {
    let test = "dead_node_is_fenced_tainted_and_released_after_reboot";
    let t0 = Instant::now();
    let all = cluster();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options: Options::default(),
        rbac: &["rbac-controller.yaml", "rbac-agent.yaml"],
        nodes: &all,
    };
    let Some((server, admin)) = common::start(test, setup).await else {
        return;
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    let alive = Arc::new(Mutex::new(
        all.iter().map(|n| n.name.clone()).collect::<BTreeSet<_>>(),
    ));
    let kubelets = play_kubelets(&admin, Arc::clone(&alive));
    let (a1, b1) = (&all[0], &all[2]);

    // Somebody else's taint on a-1, and two pods: an app and a DaemonSet's.
    nodes
        .patch(
            "a-1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "taints": [
                { "key": OTHER_TAINT, "value": "yes", "effect": "PreferNoSchedule" }
            ] } })),
        )
        .await
        .expect("taint a-1");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    for (name, ds) in [("app-on-a-1", false), ("exporter-on-a-1", true)] {
        pods.create(&PostParams::default(), &pod(name, "a-1", ds))
            .await
            .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    }

    let admin_port = apiserver::free_port().expect("a free port");
    let peer_port = apiserver::free_port().expect("a free port");
    let mut controller = Process::controller(&server, "controller-1", admin_port);
    let mut agent_a1 = start_agent(&server, a1, "boot-a-1-1", peer_port, 1);
    let mut agent_b1 = start_agent(&server, b1, "boot-b-1-1", peer_port, 1);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);

    // Both agents renew with an armed (test) watchdog and the right to run; the controller sees
    // a-1 healthy.
    wait_for(
        "agents renewing with the right to run",
        Duration::from_secs(60),
        || async {
            for node in ["a-1", "b-1"] {
                let lease = leases
                    .get_opt(&format!("twosite-agent-{node}"))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or(format!("no heartbeat Lease for {node} yet"))?;
                let (w, r) = (
                    annotation(&lease.metadata, "twosite.dev/watchdog"),
                    annotation(&lease.metadata, "twosite.dev/right-to-run"),
                );
                if w != Some("enabled") || r != Some("Lease") {
                    return Err(format!("{node}: watchdog {w:?}, right-to-run {r:?}"));
                }
            }
            let status = node_status(&admin, "a-1").await?;
            if status["phase"] != "Healthy" || status["partner"] != "b-1" {
                return Err(format!("a-1: {status}"));
            }
            Ok(())
        },
    )
    .await;
    agent_a1.assert_running();
    agent_b1.assert_running();
    controller.assert_running();
    let a1_watchdog = agent_files(&server, "a-1").watchdog;
    let fed = feeds(&a1_watchdog);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        feeds(&a1_watchdog) > fed,
        "a-1's agent feeds its watchdog while it has the right to run"
    );
    println!("agents renewing, a-1 healthy after {:?}", t0.elapsed());

    // a-1 loses power: its agent and its kubelet stop; the node lifecycle controller marks it
    // not Ready.
    agent_a1.kill();
    let died = Instant::now();
    alive.lock().expect("alive set").remove("a-1");
    set_node_state(&nodes, "a-1", false, None).await;

    let tainted = wait_for(
        "a-1 tainted out-of-service",
        Duration::from_secs(60),
        || async {
            let node = nodes.get("a-1").await.map_err(|e| e.to_string())?;
            if has_taint(&node, TAINT_KEY) {
                Ok(node)
            } else {
                let status = node_status(&admin, "a-1").await.unwrap_or_default();
                Err(format!("taints {:?}, status {status}", taints(&node)))
            }
        },
    )
    .await;
    let time_to_taint = died.elapsed();
    println!("a-1 tainted {time_to_taint:?} after its agent died");
    // The fence deadline (agent lease 8 s + watchdog 5 s + margin 2 s, from the last renewal)
    // must have passed: a taint sooner would release a node that may still run.
    assert!(
        time_to_taint >= Duration::from_secs(12),
        "tainted only {time_to_taint:?} after the agent died: before the fence deadline"
    );
    let ours = taints(&tainted)
        .into_iter()
        .find(|t| t.key == TAINT_KEY)
        .expect("the taint");
    assert_eq!(ours.value.as_deref(), Some("nodeshutdown"));
    assert_eq!(ours.effect, "NoExecute");
    assert!(has_taint(&tainted, OTHER_TAINT), "{:?}", taints(&tainted));
    assert_eq!(
        annotation(&tainted.metadata, FENCED_BOOT),
        Some("boot-a-1-1"),
        "the Node records the boot ID it was fenced with"
    );
    let lease_a1 = leases.get("twosite-agent-a-1").await.expect("a-1's Lease");
    assert_eq!(
        annotation(&lease_a1.metadata, FENCED_BOOT),
        Some("boot-a-1-1"),
        "the fence marker is committed on the heartbeat Lease"
    );
    wait_for("a-1's app pod deleted", Duration::from_secs(10), || async {
        match pods.get_opt("app-on-a-1").await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("still there".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert!(
        pods.get_opt("exporter-on-a-1")
            .await
            .expect("get the DaemonSet pod")
            .is_some(),
        "a DaemonSet pod is left alone"
    );

    // a-1 comes back WITHOUT having rebooted (same boot ID): nothing is lifted, and its agent
    // does not get the right to run while the marker holds.
    let mut agent_a1 = start_agent(&server, a1, "boot-a-1-1", peer_port, 2);
    alive.lock().expect("alive set").insert("a-1".into());
    set_node_state(&nodes, "a-1", true, Some("boot-a-1-1")).await;
    wait_for(
        "a-1's agent renewing again",
        Duration::from_secs(30),
        || async {
            let status = node_status(&admin, "a-1").await?;
            if status["verdict"] == "Healthy" {
                Ok(())
            } else {
                Err(format!("{status}"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let node = nodes.get("a-1").await.expect("get a-1");
    assert!(
        has_taint(&node, TAINT_KEY),
        "a node back without a reboot stays fenced: {:?}",
        taints(&node)
    );
    let status = node_status(&admin, "a-1").await.expect("a-1's status");
    assert_eq!(status["phase"], "Tainted", "{status}");
    let lease_a1 = leases.get("twosite-agent-a-1").await.expect("a-1's Lease");
    assert_eq!(
        annotation(&lease_a1.metadata, FENCED_BOOT),
        Some("boot-a-1-1")
    );
    assert_eq!(
        annotation(&lease_a1.metadata, "twosite.dev/right-to-run"),
        Some("None"),
        "a fenced node's agent has no right to run"
    );
    agent_a1.assert_running();

    // a-1 reboots: new boot ID, agent started again.
    agent_a1.kill();
    set_node_state(&nodes, "a-1", true, Some("boot-a-1-2")).await;
    let mut agent_a1 = start_agent(&server, a1, "boot-a-1-2", peer_port, 3);
    let back = Instant::now();
    let released = wait_for(
        "a-1 released after its reboot",
        Duration::from_secs(60),
        || async {
            let node = nodes.get("a-1").await.map_err(|e| e.to_string())?;
            let lease = leases
                .get("twosite-agent-a-1")
                .await
                .map_err(|e| e.to_string())?;
            let status = node_status(&admin, "a-1").await?;
            if !has_taint(&node, TAINT_KEY)
                && annotation(&lease.metadata, FENCED_BOOT).is_none()
                && status["phase"] == "Healthy"
            {
                Ok(node)
            } else {
                Err(format!(
                    "taints {:?}, marker {:?}, status {status}",
                    taints(&node),
                    annotation(&lease.metadata, FENCED_BOOT)
                ))
            }
        },
    )
    .await;
    println!(
        "a-1 released {:?} after it came back rebooted",
        back.elapsed()
    );
    assert!(has_taint(&released, OTHER_TAINT), "{:?}", taints(&released));
    assert_eq!(annotation(&released.metadata, FENCED_BOOT), None);
    wait_for(
        "a-1's agent has the right to run again",
        Duration::from_secs(20),
        || async {
            let lease = leases
                .get("twosite-agent-a-1")
                .await
                .map_err(|e| e.to_string())?;
            match annotation(&lease.metadata, "twosite.dev/right-to-run") {
                Some("Lease") => Ok(()),
                other => Err(format!("right-to-run {other:?}")),
            }
        },
    )
    .await;

    for p in [&mut controller, &mut agent_a1, &mut agent_b1] {
        p.assert_running();
        let forbidden = p.forbidden_lines();
        assert!(
            forbidden.is_empty(),
            "the API server refused {} (RBAC in deploy/):\n{}",
            p.name,
            forbidden.join("\n")
        );
    }
    kubelets.abort();
    println!("{test} passed in {:?}", t0.elapsed());
}
