//! The real-API-server tier with the rest of the control plane: a real kube-scheduler and a
//! real kube-controller-manager 1.20.2 (node lifecycle and taint eviction, pod GC, Deployment
//! and ReplicaSet controllers) run beside the real `twosite controller` and agents.
//!
//! A Deployment's pod runs on a-1 (the other nodes are closed to new pods until it does) and
//! prefers it (weight 100 on its hostname), so after a-1 loses power its replacement would go
//! straight back there: a-1 still reads `Ready=True` (kube-controller-manager notices only
//! after its 40 s grace period), and it
//! is the emptiest node once its pods are deleted. twosite's early
//! `twosite.dev/unresponsive:NoSchedule` taint (from the Dead verdict on, a second before any
//! release) and the out-of-service taint (before the release) must keep the scheduler off it:
//! the replacement is bound to a live node, and the test's kubelet stand-in (which marks pods
//! Running only on live nodes) sees it Running within the failover target.
//!
//! Needs `kube-scheduler` and `kube-controller-manager` from `e2e/apiserver/build-kube-apiserver.sh`
//! and our binaries (`cargo build -p twosite-controller --bin twosite -p twosite-node-health
//! --bin twosite-agent`); skipped without them unless `TWOSITE_REQUIRE_APISERVER=1`.

mod common;

use common::agents::{has_taint, play_kubelets, start_agent, taints};
use common::{AGENT_BIN, CONTROLLER_BIN, Process, Setup, TestNode, wait_for};
use e2e::apiserver::{self, ApiServer, Options};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
const UNRESPONSIVE: &str = "twosite.dev/unresponsive";
/// The brief's failover target, plus the stand-in's polling.
const FAILOVER_TARGET: Duration = Duration::from_secs(31);

fn cluster() -> Vec<TestNode> {
    vec![
        TestNode::new("a-1", "room-a", "127.0.0.2"),
        TestNode::new("a-2", "room-a", "127.0.0.4"),
        TestNode::new("b-1", "room-b", "127.0.0.3"),
        TestNode::new("b-2", "room-b", "127.0.0.5"),
    ]
}

/// kube-scheduler or kube-controller-manager as the fixture's admin, or `None` (skipped) when
/// the binary was not built.
fn control_plane(server: &ApiServer, name: &str, args: &[&str]) -> Option<Process> {
    let bin = apiserver::control_plane_binary(name);
    if !bin.exists() {
        let msg = format!("{} missing: run {}", bin.display(), apiserver::BUILD_SCRIPT);
        assert!(!apiserver::required(), "{msg}");
        println!("skipped: {msg}");
        return None;
    }
    let kubeconfig = server.admin_kubeconfig().display().to_string();
    let mut all: Vec<String> = vec![format!("--kubeconfig={kubeconfig}")];
    all.extend(args.iter().map(|s| s.to_string()));
    Some(Process::start(
        server,
        name,
        &bin,
        server.admin_kubeconfig(),
        &all,
    ))
}

fn deployment() -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": "db", "namespace": "default" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "db" } },
            "template": {
                "metadata": { "labels": { "app": "db" } },
                "spec": {
                    "affinity": { "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "preference": { "matchExpressions": [{
                                "key": "kubernetes.io/hostname",
                                "operator": "In",
                                "values": ["a-1"]
                            }] }
                        }]
                    } },
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "db",
                        "image": "registry.invalid/db:1",
                        "resources": { "requests": { "cpu": "100m", "memory": "64Mi" } }
                    }]
                }
            }
        }
    }))
    .expect("a Deployment")
}

/// The test as the kubelets' pod side: every 250 ms, a pod bound to a live node is reported
/// Running; a pod on a dead node never is. Records the first node each pod was seen bound to.
fn play_pod_kubelets(
    admin: &Client,
    alive: Arc<Mutex<BTreeSet<String>>>,
    bound: Arc<Mutex<BTreeMap<String, String>>>,
) -> tokio::task::JoinHandle<()> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    tokio::spawn(async move {
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for p in list.items {
                    let (Some(name), Some(node)) = (
                        p.metadata.name.clone(),
                        p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    ) else {
                        continue;
                    };
                    if let Ok(mut b) = bound.lock() {
                        b.entry(name.clone()).or_insert_with(|| node.clone());
                    }
                    let live = alive.lock().is_ok_and(|a| a.contains(&node));
                    let running =
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if live && !running && p.metadata.deletion_timestamp.is_none() {
                        let status = json!({ "status": {
                            "phase": "Running",
                            "conditions": [{ "type": "Ready", "status": "True" }]
                        } });
                        if let Err(e) = pods
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                            .await
                        {
                            println!("mark {name} Running: {e}");
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

fn node_ready(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replacement_of_a_dead_nodes_pod_is_bound_to_a_live_node() {
    let test = "the_replacement_of_a_dead_nodes_pod_is_bound_to_a_live_node";
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
    // What a kubelet reports besides Ready: room for pods, so the scheduler may place them.
    for n in &all {
        let capacity = json!({ "cpu": "4", "memory": "8Gi", "pods": "110" });
        nodes
            .patch_status(
                &n.name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({ "status": { "capacity": capacity, "allocatable": capacity } }),
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("capacity of {}: {e}", n.name));
    }
    let alive = Arc::new(Mutex::new(
        all.iter().map(|n| n.name.clone()).collect::<BTreeSet<_>>(),
    ));
    let bound = Arc::new(Mutex::new(BTreeMap::new()));
    let kubelets = play_kubelets(&admin, Arc::clone(&alive));
    let pod_kubelets = play_pod_kubelets(&admin, Arc::clone(&alive), Arc::clone(&bound));

    let Some(mut scheduler) = control_plane(
        &server,
        "kube-scheduler",
        &[
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--v=2",
        ],
    ) else {
        return;
    };
    let Some(mut kcm) = control_plane(
        &server,
        "kube-controller-manager",
        &[
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
            "--controllers=nodelifecycle,podgc,deployment,replicaset",
            "--node-monitor-grace-period=40s",
            "--v=2",
        ],
    ) else {
        return;
    };

    let admin_port = apiserver::free_port().expect("a free port");
    let peer_port = apiserver::free_port().expect("a free port");
    let mut controller = Process::controller(&server, "controller-1", admin_port);
    let mut agent_a1 = start_agent(&server, &all[0], "boot-a-1-1", peer_port, 1);
    let mut agent_b1 = start_agent(&server, &all[2], "boot-b-1-1", peer_port, 1);

    // The first pod must start on a-1 whatever the scheduler's scores say: the other nodes are
    // closed to new pods until it runs there.
    let closed = json!({ "spec": { "taints": [
        { "key": "example.com/closed-for-the-test", "effect": "NoSchedule" }
    ] } });
    let open = json!({ "spec": { "taints": [] } });
    for n in ["a-2", "b-1", "b-2"] {
        nodes
            .patch(n, &PatchParams::default(), &Patch::Merge(&closed))
            .await
            .unwrap_or_else(|e| panic!("close {n}: {e}"));
    }
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment())
        .await
        .expect("create the Deployment");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let running_on = |want: Option<&'static str>| {
        let pods = pods.clone();
        move || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=db"))
                    .await
                    .map_err(|e| e.to_string())?;
                let shown: Vec<String> = list
                    .items
                    .iter()
                    .map(|p| {
                        format!(
                            "{:?} on {:?} {:?}",
                            p.metadata.name,
                            p.spec.as_ref().and_then(|s| s.node_name.clone()),
                            p.status.as_ref().and_then(|s| s.phase.clone())
                        )
                    })
                    .collect();
                list.items
                    .iter()
                    .find_map(|p| {
                        let node = p.spec.as_ref()?.node_name.clone()?;
                        let running = p.status.as_ref()?.phase.as_deref() == Some("Running");
                        let wanted = match want {
                            Some(n) => node == n,
                            None => node != "a-1",
                        };
                        (running && wanted && p.metadata.deletion_timestamp.is_none())
                            .then(|| (p.metadata.name.clone().unwrap_or_default(), node))
                    })
                    .ok_or(format!("pods: {shown:?}"))
            }
        }
    };
    let (first, _) = wait_for(
        "the Deployment's pod Running on a-1",
        Duration::from_secs(90),
        running_on(Some("a-1")),
    )
    .await;
    // Both agents renewing and the controller pairing them: a-1 is healthy in the status.
    wait_for("a-1 healthy, paired", Duration::from_secs(60), || async {
        let s = common::twosites(&admin)
            .get_opt("default")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no TwoSite yet")?;
        let entry = common::status_node(&s.data["status"], "a-1")
            .cloned()
            .ok_or("no a-1 entry")?;
        (entry["phase"] == "Healthy" && entry["partner"] == "b-1")
            .then_some(())
            .ok_or(format!("{entry}"))
    })
    .await;
    for n in ["a-2", "b-1", "b-2"] {
        nodes
            .patch(n, &PatchParams::default(), &Patch::Merge(&open))
            .await
            .unwrap_or_else(|e| panic!("open {n}: {e}"));
    }
    for p in [
        &mut scheduler,
        &mut kcm,
        &mut controller,
        &mut agent_a1,
        &mut agent_b1,
    ] {
        p.assert_running();
    }
    println!("{first} running on a-1 after {:?}", t0.elapsed());

    // a-1 loses power: its agent and its kubelet stop. Nobody marks it NotReady: that is
    // kube-controller-manager's job, 40 s later.
    agent_a1.kill();
    alive.lock().expect("alive").remove("a-1");
    let died = Instant::now();

    let (replacement, node) = wait_for(
        "a replacement Running on a live node",
        Duration::from_secs(90),
        running_on(None),
    )
    .await;
    let failover = died.elapsed();
    println!("{replacement} running on {node} {failover:?} after a-1 lost power");
    let a1 = nodes.get("a-1").await.expect("get a-1");
    println!(
        "a-1 taints then: {:?}, Ready {:?}",
        taints(&a1),
        node_ready(&a1)
    );

    // No pod of the Deployment was ever bound to a-1 after it died; the replacement is where
    // it runs.
    let first_bound = bound.lock().expect("bound").clone();
    let after: Vec<(&String, &String)> = first_bound
        .iter()
        .filter(|(name, _)| **name != first)
        .collect();
    assert!(
        after.iter().all(|(_, n)| n.as_str() != "a-1"),
        "a replacement was bound to the dead a-1: {after:?}\n--- scheduler ---\n{}",
        scheduler.log_tail(40)
    );
    assert!(
        has_taint(&a1, UNRESPONSIVE) && has_taint(&a1, OUT_OF_SERVICE),
        "{:?}",
        taints(&a1)
    );
    assert!(
        failover <= FAILOVER_TARGET,
        "failover took {failover:?}\n--- controller ---\n{}",
        controller.log_tail(40)
    );
    assert!(
        failover < Duration::from_secs(40),
        "the replacement must have run before kube-controller-manager could mark a-1 NotReady"
    );
    kubelets.abort();
    pod_kubelets.abort();
}
