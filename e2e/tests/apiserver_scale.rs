//! The real-API-server tier at scale (issue 15, part 3): the load of `twosite-bench` against a
//! real kube-apiserver 1.20.2 and the real `twosite controller` and `twosite-agent` binaries,
//! with the figures the bench prints, measured from the outside:
//!
//! - N Nodes in two rooms (`TWOSITE_SCALE_NODES`, default 40: CI; run 200 or 400 by hand),
//!   20 pods bound to each (18 owned by a ReplicaSet, one bare, one of a DaemonSet);
//! - the test plays every node's agent (heartbeat Lease `twosite-agent-<node>` replaced every 2 s,
//!   the fields and annotations `node-health/src/agentd/heartbeat.rs` writes) and kubelet (node
//!   Lease every 10 s), each renewal on its own phase of the period, at most
//!   `TWOSITE_SCALE_CONCURRENCY` (default 8) requests in flight. Like the kubelet, a renewal
//!   replaces the Lease the last renewal returned (one PUT; a GET only after a failure); the real
//!   agent GETs before every PUT (its own requests are measured below);
//! - the real controller, as its ServiceAccount: after a warm-up, a calm window
//!   (`TWOSITE_SCALE_CALM_SECS`, default 60) measures its RSS (`/proc/<pid>/status`), its CPU
//!   (`/proc/<pid>/stat`) and its requests (the API server's audit log, by user);
//! - `TWOSITE_SCALE_AGENTS` (default 3) real agents on nodes of room B (fake watchdog, each under
//!   its own user bound to the agent's Role and ClusterRole, so the audit log tells them apart),
//!   measured over the same window;
//! - then room A loses power: its agents and kubelets stop renewing. The test waits until every
//!   node of room A carries the out-of-service taint and its releasable pods are gone, and
//!   measures the failover: the time to the last release, the controller's requests (by
//!   verb/resource, per lost node), its peak RSS and CPU, the fence commits' spread and the
//!   decision latency (the controller's `twosite_fence_decision_seconds` histogram when it has
//!   one; else, and always as a cross-check, an outside upper bound from the audit log: the fence
//!   commit's arrival minus the last renewal's completion minus the fence deadline of the default
//!   timing, 15 s stretched by 1 %).
//!
//! Figures are printed (a block, and one `SCALE_JSON` line), never asserted: the test asserts only
//! correctness. Every node of room A fenced (marker on its Lease), tainted, its releasable pods
//! deleted and its DaemonSet pod kept; no node, Lease or pod of room B written by the controller;
//! no process exited.
//!
//! Build the binaries first (same target directory, or `TWOSITE_BIN_DIR`):
//! `cargo build -p twosite-controller --bin twosite -p twosite-node-health --bin twosite-agent`.
//! `TWOSITE_SCALE_NODES=200 cargo test -p twosite-e2e --test apiserver_scale -- --nocapture`.

#[path = "apiserver_scale/audit.rs"]
mod audit;
#[path = "apiserver_scale/cluster.rs"]
mod cluster;
mod common;
#[path = "apiserver_scale/figures.rs"]
mod figures;
#[path = "apiserver_scale/footprint.rs"]
mod footprint;
#[path = "apiserver_scale/load.rs"]
mod load;
#[path = "apiserver_scale/stats.rs"]
mod stats;

use audit::{Request, read_audit};
use cluster::{
    assert_all_running, bounded, count_pods, fail_with_logs, has_annotation, node_address,
    node_name, parse_node, pod, pod_node, room_nodes,
};
use common::agents::{AgentOptions, has_taint, start_agent_with};
use common::{
    AGENT_BIN, CONTROLLER_BIN, NAMESPACE, Process, Setup, TestNode, create_doc, create_node,
    http_get, twosites,
};
use e2e::apiserver::{self, Identity, Options};
use figures::Run;
use footprint::{ProcSample, RssWatch, Samples, control_plane_pids, sample};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, PostParams};
use load::{Generator, LeaseKind, run_generator};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

const TEST: &str = "apiserver_scale";
const ROOMS: [&str; 2] = ["room-a", "room-b"];
const POD_NAMESPACE: &str = "scale";
const PODS_PER_NODE: usize = 20;
const ROOM_LABEL: &str = "twosite-scale/room";
const RELEASABLE_LABEL: &str = "twosite-scale/releasable";
const OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";
const UNRESPONSIVE: &str = "twosite.dev/unresponsive";
const FENCED_BOOT: &str = "twosite.dev/fenced-boot-id";
/// The group the test's per-agent users are in, bound to the agent's Role and ClusterRole.
const AGENT_GROUP: &str = "twosite-scale-agents";
/// The fence deadline of the default timing after the last renewal the controller saw: agent
/// lease 8 s + watchdog 5 s + margin 2 s, stretched by the 1 % drift bound
/// (`node-health/src/verdict.rs`).
const FENCE_DEADLINE_MS: i64 = 15_150;
const AGENT_PERIOD: Duration = Duration::from_secs(2);
const KUBELET_PERIOD: Duration = Duration::from_secs(10);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// The marks of a run (unix ms) and the length of its calm window.
#[derive(Clone, Copy)]
struct Timeline {
    load_started_ms: i64,
    calm_from_ms: i64,
    calm_to_ms: i64,
    calm_secs: f64,
    stop_ms: i64,
    released_ms: i64,
    end_ms: i64,
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_scale() {
    let t0 = Instant::now();
    let n_total: usize = env_or("TWOSITE_SCALE_NODES", 40).max(4);
    let per_room = n_total / 2;
    let n_agents: usize = env_or("TWOSITE_SCALE_AGENTS", 3usize).min(per_room);
    let calm = Duration::from_secs(env_or("TWOSITE_SCALE_CALM_SECS", 60));
    let warmup = Duration::from_secs(env_or("TWOSITE_SCALE_WARMUP_SECS", 10));
    let concurrency: usize = env_or("TWOSITE_SCALE_CONCURRENCY", 8usize).max(1);

    // The audit policy: every request at Metadata level, one event when the answer is complete
    // (and one when a watch starts).
    let audit_dir = tempfile::tempdir().expect("a temp dir for the audit log");
    let policy = audit_dir.path().join("audit-policy.yaml");
    let audit_log = audit_dir.path().join("audit.log");
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n\
         - level: None\n  nonResourceURLs: [\"/healthz*\", \"/readyz*\", \"/livez*\"]\n\
         - level: Metadata\n",
    )
    .expect("write the audit policy");
    let agent_nodes: Vec<String> = (1..=n_agents).map(|i| node_name(1, i)).collect();
    let mut options = Options::default();
    for node in &agent_nodes {
        options.identities.push(Identity::user(
            format!("scale-agent-{node}"),
            &[AGENT_GROUP],
        ));
    }
    options.extra_args.extend([
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", audit_log.display()),
        "--audit-log-format=json".to_string(),
        "--audit-log-maxsize=0".to_string(),
    ]);

    let cluster: Vec<TestNode> = (0..2)
        .flat_map(|room| {
            (1..=per_room).map(move |i| {
                TestNode::new(&node_name(room, i), ROOMS[room], &node_address(room, i))
            })
        })
        .collect();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options,
        rbac: &["rbac-controller.yaml", "rbac-agent.yaml"],
        nodes: &[],
    };
    let Some((server, admin)) = common::start(TEST, setup).await else {
        return;
    };
    if std::env::var_os("TWOSITE_KEEP_APISERVER_DIR").is_some() {
        println!("audit log kept in {}", audit_dir.path().display());
        let _ = audit_dir.keep();
    }
    let controller_user =
        Identity::service_account(apiserver::CONTROLLER_SA.0, apiserver::CONTROLLER_SA.1).user;

    // The test's agent users get what the agent's ServiceAccount gets.
    for (kind, doc) in [
        (
            "RoleBinding",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": { "name": AGENT_GROUP, "namespace": NAMESPACE },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "twosite-agent" },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP }]
            }),
        ),
        (
            "ClusterRoleBinding",
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": AGENT_GROUP },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "twosite-agent" },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP }]
            }),
        ),
    ] {
        create_doc(&admin, &doc, false)
            .await
            .unwrap_or_else(|e| panic!("create the {kind} of the test's agents: {e}"));
    }

    // Nodes and pods.
    let created = Instant::now();
    let nodes: Api<Node> = Api::all(admin.clone());
    bounded(cluster.clone(), concurrency, {
        let nodes = nodes.clone();
        move |node: TestNode| {
            let nodes = nodes.clone();
            async move { create_node(&nodes, &node).await }
        }
    })
    .await;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": POD_NAMESPACE } }))
                .expect("a Namespace"),
        )
        .await
        .expect("create the pods' namespace");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), POD_NAMESPACE);
    let all_pods: Vec<Pod> = cluster
        .iter()
        .flat_map(|n| (0..PODS_PER_NODE).map(|j| pod(&n.name, &n.zone, j)))
        .collect();
    let n_pods = all_pods.len();
    bounded(all_pods, concurrency, {
        let pods = pods.clone();
        move |p: Pod| {
            let pods = pods.clone();
            async move {
                let name = p.metadata.name.clone().unwrap_or_default();
                pods.create(&PostParams::default(), &p)
                    .await
                    .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
            }
        }
    })
    .await;
    println!(
        "{n_total} nodes and {n_pods} pods created in {:?}",
        created.elapsed()
    );

    // The load: every node's agent (but the real agents') and kubelet.
    let generator = Arc::new(Generator::new(
        &cluster,
        Arc::new(Semaphore::new(concurrency)),
    ));
    let kubelet_generator = Arc::new(Generator::new(&cluster, Arc::clone(&generator.permits)));
    let agent_leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let load_started_ms = now_ms();
    let agent_load = run_generator(
        Arc::clone(&generator),
        agent_leases.clone(),
        LeaseKind::Agent,
        AGENT_PERIOD,
        agent_nodes.iter().cloned().collect(),
    );
    let kubelet_load = run_generator(
        Arc::clone(&kubelet_generator),
        Api::namespaced(admin.clone(), "kube-node-lease"),
        LeaseKind::Kubelet,
        KUBELET_PERIOD,
        BTreeSet::new(),
    );
    // One round of renewals before the controller starts.
    tokio::time::sleep(AGENT_PERIOD + Duration::from_millis(500)).await;

    // The controller and the real agents.
    let admin_port = apiserver::free_port().expect("a free port");
    let peer_port = apiserver::free_port().expect("a free port");
    let controller_started = Instant::now();
    let mut controller = Process::controller(&server, "scale-controller", admin_port);
    let controller_pid = controller.child.id();
    let mut agents: Vec<Process> = Vec::new();
    for node in &agent_nodes {
        let test_node = cluster
            .iter()
            .find(|n| &n.name == node)
            .expect("an agent's node");
        let kubeconfig = server
            .kubeconfig(&format!("scale-agent-{node}"))
            .expect("the test agent's kubeconfig")
            .to_path_buf();
        agents.push(start_agent_with(
            &server,
            test_node,
            &format!("boot-{node}-1"),
            peer_port,
            1,
            AgentOptions {
                kubeconfig: Some(kubeconfig),
                ..AgentOptions::default()
            },
        ));
    }
    let agent_pids: Vec<u32> = agents.iter().map(|a| a.child.id()).collect();
    let control_plane = control_plane_pids(&server);
    let mut watched: Vec<u32> = vec![controller_pid];
    watched.extend(&agent_pids);
    watched.extend(control_plane.iter().map(|(_, p)| *p));
    let (rss, rss_sampler) = RssWatch::start(watched);

    // Ready: every node Healthy in the TwoSite status, every pair made, the agents renewing.
    let twosites = twosites(&admin);
    let ready_deadline = Duration::from_secs(60 + n_total as u64 / 5);
    loop {
        assert_all_running(&mut controller, &mut agents);
        let status = match twosites.get_opt("default").await {
            Ok(Some(ts)) => ts.data["status"].clone(),
            _ => Value::Null,
        };
        let healthy = status["nodes"].as_array().map_or(0, |ns| {
            ns.iter().filter(|n| n["phase"] == "Healthy").count()
        });
        let mut agents_ok = 0;
        for node in &agent_nodes {
            if let Ok(Some(l)) = agent_leases.get_opt(&format!("twosite-agent-{node}")).await {
                let a = l.metadata.annotations.unwrap_or_default();
                if a.get("twosite.dev/right-to-run").map(String::as_str) == Some("Lease") {
                    agents_ok += 1;
                }
            }
        }
        if healthy == n_total && status["pairCount"] == per_room && agents_ok == n_agents {
            break;
        }
        if controller_started.elapsed() > ready_deadline {
            let msg = format!(
                "not ready within {ready_deadline:?}: {healthy}/{n_total} nodes Healthy, pairCount {}, \
                 {agents_ok}/{n_agents} agents with the right to run",
                status["pairCount"]
            );
            fail_with_logs(&msg, &controller, &server, &agents).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let time_to_ready = controller_started.elapsed();
    println!("controller ready, all {n_total} nodes Healthy after {time_to_ready:?}");
    tokio::time::sleep(warmup).await;

    // The calm window.
    let calm_from_ms = now_ms();
    let calm_t = Instant::now();
    let s_ctrl0 = sample(controller_pid).expect("the controller's /proc");
    let s_agents0: Vec<ProcSample> = agent_pids
        .iter()
        .map(|p| sample(*p).expect("an agent's /proc"))
        .collect();
    let s_cp0: Vec<ProcSample> = control_plane
        .iter()
        .map(|(_, p)| sample(*p).unwrap_or_default())
        .collect();
    let s_self0 = sample(std::process::id()).unwrap_or_default();
    rss.take(controller_pid);
    tokio::time::sleep(calm).await;
    assert_all_running(&mut controller, &mut agents);
    let calm_secs = calm_t.elapsed().as_secs_f64();
    let calm_to_ms = now_ms();
    let s_ctrl1 = sample(controller_pid).expect("the controller's /proc");
    let s_agents1: Vec<ProcSample> = agent_pids
        .iter()
        .map(|p| sample(*p).expect("an agent's /proc"))
        .collect();
    let s_cp1: Vec<ProcSample> = control_plane
        .iter()
        .map(|(_, p)| sample(*p).unwrap_or_default())
        .collect();
    let s_self1 = sample(std::process::id()).unwrap_or_default();
    let calm_peak_kib = rss.take(controller_pid).max(s_ctrl1.rss_kib);

    // Room A loses power.
    let lost: Vec<String> = (1..=per_room).map(|i| node_name(0, i)).collect();
    let stop_ms = now_ms();
    let stop_t = Instant::now();
    generator.alive[0].store(false, Ordering::Relaxed);
    kubelet_generator.alive[0].store(false, Ordering::Relaxed);
    let room_a_releasable = format!("{ROOM_LABEL}={},{RELEASABLE_LABEL}=true", ROOMS[0]);
    let release_deadline = Duration::from_secs(90 + n_total as u64 / 4);
    let mut tainted_at: Option<Duration> = None;
    loop {
        assert_all_running(&mut controller, &mut agents);
        let room_a = room_nodes(&nodes, ROOMS[0]).await.unwrap_or_default();
        let tainted = room_a
            .iter()
            .filter(|n| has_taint(n, OUT_OF_SERVICE))
            .count();
        if tainted == per_room && tainted_at.is_none() {
            tainted_at = Some(stop_t.elapsed());
        }
        let left = count_pods(&pods, &room_a_releasable).await;
        if tainted == per_room && left == Ok(0) {
            break;
        }
        if stop_t.elapsed() > release_deadline {
            let msg = format!(
                "room A not released within {release_deadline:?}: {tainted}/{per_room} nodes tainted, \
                 releasable pods left {left:?}"
            );
            fail_with_logs(&msg, &controller, &server, &agents).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let released_poll = stop_t.elapsed();
    let released_ms = now_ms();
    let s_ctrl2 = sample(controller_pid).expect("the controller's /proc");
    let s_cp2: Vec<ProcSample> = control_plane
        .iter()
        .map(|(_, p)| sample(*p).unwrap_or_default())
        .collect();
    let failover_peak_kib = rss.take(controller_pid).max(s_ctrl2.rss_kib);
    println!("room A released {released_poll:?} after it lost power");

    // A little longer: nothing more may happen to room B, and the controller settles.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_all_running(&mut controller, &mut agents);
    let metrics = http_get(admin_port, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let s_ctrl_end = sample(controller_pid).expect("the controller's /proc");
    let s_agents_end: Vec<ProcSample> = agent_pids
        .iter()
        .map(|p| sample(*p).unwrap_or_default())
        .collect();
    let end_ms = now_ms();
    generator.stop.store(true, Ordering::Relaxed);
    kubelet_generator.stop.store(true, Ordering::Relaxed);

    // Correctness. Room A: fenced, tainted, released; its DaemonSet pods kept.
    for node in room_nodes(&nodes, ROOMS[0]).await.expect("list room A") {
        let name = node.metadata.name.clone().unwrap_or_default();
        assert!(has_taint(&node, OUT_OF_SERVICE), "{name} not tainted");
        assert!(
            has_annotation(&node.metadata, FENCED_BOOT),
            "{name} carries no fenced boot ID"
        );
        let lease = agent_leases
            .get(&format!("twosite-agent-{name}"))
            .await
            .expect("a lost node's Lease");
        assert!(
            has_annotation(&lease.metadata, FENCED_BOOT),
            "{name}'s Lease carries no fence marker"
        );
    }
    assert_eq!(
        count_pods(
            &pods,
            &format!("{ROOM_LABEL}={},{RELEASABLE_LABEL}=false", ROOMS[0])
        )
        .await,
        Ok(per_room),
        "room A's DaemonSet pods are left alone"
    );
    // Room B: untouched.
    for node in room_nodes(&nodes, ROOMS[1]).await.expect("list room B") {
        let name = node.metadata.name.clone().unwrap_or_default();
        assert!(
            !has_taint(&node, OUT_OF_SERVICE) && !has_taint(&node, UNRESPONSIVE),
            "{name} of the healthy room was tainted"
        );
        assert!(!has_annotation(&node.metadata, FENCED_BOOT), "{name}");
        let lease = agent_leases
            .get(&format!("twosite-agent-{name}"))
            .await
            .expect("a healthy node's Lease");
        assert!(
            !has_annotation(&lease.metadata, FENCED_BOOT),
            "{name} of the healthy room was fenced"
        );
    }
    assert_eq!(
        count_pods(&pods, &format!("{ROOM_LABEL}={}", ROOMS[1])).await,
        Ok(per_room * PODS_PER_NODE),
        "every pod of room B is still there"
    );
    let audit = read_audit(&audit_log);
    assert!(!audit.is_empty(), "the audit log is empty");
    let writes = ["create", "update", "patch", "delete", "deletecollection"];
    let touched_b: Vec<&Request> = audit
        .iter()
        .filter(|r| r.user == controller_user && writes.contains(&r.verb.as_str()))
        .filter(|r| {
            let node = match r.resource.as_str() {
                "nodes" | "nodes/status" => Some(r.name.as_str()),
                "leases" => r.name.strip_prefix("twosite-agent-"),
                "pods" | "pods/eviction" if r.namespace == POD_NAMESPACE => pod_node(&r.name),
                _ => None,
            };
            node.and_then(parse_node).is_some_and(|(room, _)| room == 1)
        })
        .collect();
    assert!(
        touched_b.is_empty(),
        "the controller wrote objects of the healthy room: {touched_b:?}"
    );
    for p in std::iter::once(&controller).chain(agents.iter()) {
        let forbidden = p.forbidden_lines();
        assert!(
            forbidden.is_empty(),
            "the API server refused {}:\n{}",
            p.name,
            forbidden.join("\n")
        );
    }

    // ----- Figures -----
    figures::print(&Run {
        n_total,
        n_pods,
        n_agents,
        per_room,
        time_to_ready,
        tainted_at,
        timeline: Timeline {
            load_started_ms,
            calm_from_ms,
            calm_to_ms,
            calm_secs,
            stop_ms,
            released_ms,
            end_ms,
        },
        samples: Samples {
            s_ctrl0,
            s_ctrl1,
            s_ctrl2,
            s_ctrl_end,
            s_agents0,
            s_agents1,
            s_agents_end,
            s_cp0,
            s_cp1,
            s_cp2,
            s_self0,
            s_self1,
            calm_peak_kib,
            failover_peak_kib,
        },
        lost: &lost,
        agent_nodes: &agent_nodes,
        control_plane: &control_plane,
        audit: &audit,
        controller_user: &controller_user,
        metrics: &metrics,
        generator: &generator,
        kubelet_generator: &kubelet_generator,
    });

    agent_load.abort();
    kubelet_load.abort();
    rss_sampler.abort();
    drop(agents);
    drop(controller);
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}
