//! The cluster `apiserver_scale` plays (nodes, their addresses and pods) and the checks of its
//! state.

use crate::common::Process;
use crate::{POD_NAMESPACE, RELEASABLE_LABEL, ROOM_LABEL};
use e2e::apiserver::ApiServer;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, ObjectMeta};
use serde_json::json;
use std::sync::Arc;

pub fn node_name(room: usize, i: usize) -> String {
    format!("{}-{i}", if room == 0 { "a" } else { "b" })
}

/// Room and index from a node name (`a-12` → (0, 12)).
pub fn parse_node(name: &str) -> Option<(usize, usize)> {
    let (room, i) = name.split_once('-')?;
    let room = match room {
        "a" => 0,
        "b" => 1,
        _ => return None,
    };
    Some((room, i.parse().ok()?))
}

/// Every node its own loopback address, so real agents can bind their peer port on theirs.
pub fn node_address(room: usize, i: usize) -> String {
    format!("127.{}.{}.{}", room + 1, i / 200, i % 200 + 1)
}

/// The node a pod of the test's is bound to (pods are `<node>-<j>` and `<node>-ds`).
pub fn pod_node(pod: &str) -> Option<&str> {
    pod.rsplit_once('-').map(|(node, _)| node)
}

pub fn pod(node: &str, room: &str, j: usize) -> Pod {
    let (name, owner) = match j {
        0 => (format!("{node}-ds"), Some(("DaemonSet", "node-exporter"))),
        1 => (format!("{node}-{j:02}"), None),
        _ => (
            format!("{node}-{j:02}"),
            Some(("ReplicaSet", "web-6d4cf56db6")),
        ),
    };
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": POD_NAMESPACE,
            "labels": {
                ROOM_LABEL: room,
                RELEASABLE_LABEL: if j == 0 { "false" } else { "true" },
                "app": "web",
            },
        },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }]
        }
    }))
    .expect("a Pod");
    p.metadata.owner_references = owner.map(|(kind, name)| {
        vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("00000000-0000-0000-0000-{:012}", kind.len()),
            controller: Some(true),
            ..OwnerReference::default()
        }]
    });
    p
}

/// Runs `f(item)` for every item, at most `limit` at a time.
pub async fn bounded<T, F, Fut>(items: Vec<T>, limit: usize, f: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        while set.len() >= limit {
            set.join_next()
                .await
                .expect("a task")
                .expect("a setup task");
        }
        let f = Arc::clone(&f);
        set.spawn(async move { f(item).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("a setup task");
    }
}

// ---------------------------------------------------------------------------------------------
// Checks of the cluster's state.

pub async fn count_pods(pods: &Api<Pod>, selector: &str) -> Result<usize, String> {
    pods.list_metadata(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items.len())
        .map_err(|e| e.to_string())
}

/// The nodes of `room`, by name.
pub async fn room_nodes(nodes: &Api<Node>, room: &str) -> Result<Vec<Node>, String> {
    nodes
        .list(&ListParams::default().labels(&format!("topology.kubernetes.io/zone={room}")))
        .await
        .map(|l| l.items)
        .map_err(|e| e.to_string())
}

pub fn has_annotation(meta: &ObjectMeta, key: &str) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(key))
}

pub async fn fail_with_logs(
    what: &str,
    controller: &Process,
    server: &ApiServer,
    agents: &[Process],
) -> ! {
    let agent_logs: Vec<String> = agents
        .iter()
        .map(|a| format!("--- {} ---\n{}", a.name, a.log_tail(15)))
        .collect();
    panic!(
        "{what}\n--- controller log ---\n{}\n{}\n--- kube-apiserver log ---\n{}",
        controller.log_tail(60),
        agent_logs.join("\n"),
        server.log_tail(20)
    );
}

pub fn assert_all_running(controller: &mut Process, agents: &mut [Process]) {
    controller.assert_running();
    for a in agents.iter_mut() {
        a.assert_running();
    }
}
