//! The remediation shell against a mock API server: the fence is committed on the heartbeat
//! Lease, pods are deleted with grace period 0 (DaemonSet pods spared), the out-of-service taint
//! goes on and comes off with a JSON Patch guarded by the Node's resourceVersion, keeping every
//! other taint; and the unsafe cases, run through the loop's entry point, write nothing.

mod common;

use common::*;
use controller::heartbeats::{Observed, SharedObserved};
use controller::leader_lease::Leadership;
use controller::metrics::Metrics;
use controller::pairing::Outcome;
use controller::remediation::{RemediationContext, Remediator};
use controller::status::RemediationView;
use controller::taint::{TaintChange, TaintOutcome, change_taint};
use controller::witness_link::WitnessLink;
use controller::witness_port::{PortError, PortFuture, WitnessPort};
use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::Event as W;
use node_health::remediation::{Phase, WaitReason};
use node_health::witness::{Claim, ClaimOutcome};
use node_health::{HealthTiming, LeaderConfig, MonoTime, NodeFacts, Pair, Pairing, Room};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const OOS: &str = "node.kubernetes.io/out-of-service";
const UNRESPONSIVE: &str = "twosite.dev/unresponsive";
const NODE_A1: &str = "/api/v1/nodes/a1";
const AGENT_A1: &str =
    "/apis/coordination.k8s.io/v1/namespaces/twosite-system/leases/twosite-agent-a1";
const PODS: &str = "/api/v1/pods";

async fn leading(client: kube::Client, api: &mut ApiServer) -> Leadership {
    lead(client, api, Arc::new(Metrics::new())).await
}

fn context(client: kube::Client, leadership: Leadership) -> RemediationContext {
    RemediationContext {
        nodes: kube::Api::all(client.clone()),
        agent_leases: kube::Api::namespaced(client.clone(), NAMESPACE),
        pods: kube::Api::all(client.clone()),
        recorder: recorder(client),
        leadership,
        metrics: Arc::new(Metrics::new()),
        api_timeout: API_TIMEOUT,
        timing: HealthTiming::default(),
        max_dead_share_pct: 50,
        witness: None,
        vms: None,
        pod_index: None,
        dry_run: false,
        fence_commits: Default::default(),
    }
}

fn node(
    name: &str,
    zone: &str,
    rv: &str,
    taints: Value,
    annotations: Value,
    labels: Value,
) -> Value {
    let mut l = json!({"topology.kubernetes.io/zone": zone});
    if let (Some(l), Some(extra)) = (l.as_object_mut(), labels.as_object()) {
        l.extend(extra.clone());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": rv,
                     "labels": l, "annotations": annotations},
        "spec": {"taints": taints},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"bootID": format!("boot-{name}"), "machineID": "", "systemUUID": "",
                         "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                         "kubeletVersion": "", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
        },
    })
}

fn plain(name: &str, zone: &str) -> Node {
    serde_json::from_value(node(name, zone, "5", json!([]), json!({}), json!({}))).expect("node")
}

/// A node that already carries our early `NoSchedule` taint (since the watch listed it).
fn marked(name: &str, zone: &str) -> Node {
    serde_json::from_value(node(
        name,
        zone,
        "5",
        json!([{"key": UNRESPONSIVE, "effect": "NoSchedule"}]),
        json!({}),
        json!({}),
    ))
    .expect("node")
}

fn agent(node: &str, rv: &str, failures: &str, watchdog: &str, marker: bool) -> Value {
    let mut annotations = json!({
        "twosite.dev/renew-failures": failures,
        "twosite.dev/watchdog": watchdog,
        "twosite.dev/boot-id": format!("boot-{node}"),
    });
    if marker {
        annotations["twosite.dev/fenced-boot-id"] = json!(format!("boot-{node}"));
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": format!("twosite-agent-{node}"), "namespace": NAMESPACE,
                     "resourceVersion": rv, "labels": {"twosite.dev/agent-heartbeat": "true"},
                     "annotations": annotations},
        // Each fixture resourceVersion stands for one renewal: a distinct renewTime.
        "spec": {"holderIdentity": node,
                 "renewTime": format!("2026-01-01T00:00:00.{:06}Z",
                                      rv.parse::<u64>().unwrap_or(0) % 1_000_000)},
    })
}

fn lease(v: Value) -> Lease {
    serde_json::from_value(v).expect("lease")
}

fn at(ms: u64) -> MonoTime {
    MonoTime(ms)
}

fn pairing() -> Pairing {
    Pairing {
        rooms: Some((Room("east".into()), Room("west".into()))),
        pairs: vec![Pair {
            a: "a1".into(),
            b: "b1".into(),
        }],
        ..Pairing::default()
    }
}

/// How the node under test, a1 (paired with b1; b2 unpaired in the west), looks. By default
/// it carries our `NoSchedule` taint from the start, as it would once judged dead.
struct Setup {
    a1: Node,
    /// a1's agent Lease as first listed.
    a1_agent: Value,
    /// b1's renewals are clean.
    b1_clean: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            a1: marked("a1", "east"),
            a1_agent: agent("a1", "1", "0", "enabled", false),
            b1_clean: true,
        }
    }
}

/// Every watch listed at t = 0; a1's agent silent since, b1 and b2 renewing every 2 s until
/// 30 s (b1 after a failed renewal at 28 s unless clean).
fn observed(s: Setup) -> SharedObserved {
    let t = HealthTiming::default();
    let mut o = Observed::default();
    o.apply_node(W::Init, at(0));
    for n in [s.a1, plain("b1", "west"), plain("b2", "west")] {
        o.apply_node(W::InitApply(n), at(0));
    }
    o.apply_node(W::InitDone, at(0));
    o.apply_agent_lease(W::Init, at(0), &t);
    o.apply_agent_lease(W::InitApply(lease(s.a1_agent)), at(0), &t);
    for n in ["b1", "b2"] {
        o.apply_agent_lease(
            W::InitApply(lease(agent(n, "1", "0", "enabled", false))),
            at(0),
            &t,
        );
    }
    o.apply_agent_lease(W::InitDone, at(0), &t);
    o.apply_kubelet_lease(W::Init, at(0));
    o.apply_kubelet_lease(W::InitDone, at(0));
    for (i, ms) in (2_000..=30_000).step_by(2_000).enumerate() {
        let rv = (i + 2).to_string();
        for n in ["b1", "b2"] {
            let failures = if n == "b1" && !s.b1_clean && ms == 28_000 {
                "1"
            } else {
                "0"
            };
            o.apply_agent_lease(
                W::Apply(lease(agent(n, &rv, failures, "enabled", false))),
                at(ms),
                &t,
            );
        }
    }
    SharedObserved::new(o)
}

/// Runs passes at each of `times` (ms) in the background, returning the remediator.
fn passes(
    ctx: RemediationContext,
    observed: SharedObserved,
    times: Vec<u64>,
) -> tokio::task::JoinHandle<Remediator> {
    tokio::spawn(async move {
        let mut r = Remediator::default();
        let p = pairing();
        for ms in times {
            r.pass(&ctx, &observed, Some(&p), at(ms)).await;
        }
        r
    })
}

fn pod(name: &str, owner: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner, "name": "o",
                                          "uid": "u", "controller": true}]},
        "spec": {"nodeName": "a1", "containers": []},
    })
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})
}

fn taints_of(patch: &Value) -> Vec<Value> {
    patch
        .as_array()
        .and_then(|ops| ops.iter().find(|op| op["path"] == "/spec/taints"))
        .and_then(|op| op["value"].as_array().cloned())
        .unwrap_or_else(|| panic!("a taints op in {patch}"))
}

/// `change` of a1's out-of-service taint, in the background.
fn spawn_taint_change(
    client: kube::Client,
    leadership: &Leadership,
    change: TaintChange,
) -> tokio::task::JoinHandle<controller::Result<TaintOutcome>> {
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let leadership = leadership.clone();
    tokio::spawn(async move { change_taint(&nodes, &leadership, "a1", &change, API_TIMEOUT).await })
}

fn assert_rv_test(patch: &Value, rv: &str) {
    assert_eq!(
        patch[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
        "{patch}"
    );
}

#[tokio::test]
async fn the_taint_keeps_other_taints_and_a_stale_read_is_retried_with_the_new_version() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let write = spawn_taint_change(
        client,
        &leadership,
        TaintChange::Apply {
            fenced_boot_id: Some("boot-a1".into()),
        },
    );
    let dedicated = json!({"key": "dedicated", "value": "db", "effect": "NoSchedule"});
    api.expect(Method::GET, NODE_A1).await.respond(
        200,
        node("a1", "east", "10", json!([dedicated]), json!({}), json!({})),
    );
    let patch = api.expect(Method::PATCH, NODE_A1).await;
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert_rv_test(&patch.body, "10");
    let taints = taints_of(&patch.body);
    assert_eq!(taints.len(), 2);
    assert_eq!(taints[0], dedicated, "the other taint is kept exactly");
    assert_eq!(taints[1]["key"], OOS);
    assert_eq!(taints[1]["value"], "nodeshutdown");
    assert_eq!(taints[1]["effect"], "NoExecute");
    assert_eq!(
        patch.body[2],
        json!({"op": "add", "path": "/metadata/annotations/twosite.dev~1fenced-boot-id", "value": "boot-a1"}),
        "the boot ID is recorded"
    );
    // Someone added a taint meanwhile: the test op fails.
    patch.respond_status(422, "Invalid", "the test operation failed");
    let added = json!({"key": "maintenance", "effect": "NoSchedule"});
    api.expect(Method::GET, NODE_A1).await.respond(
        200,
        node(
            "a1",
            "east",
            "11",
            json!([dedicated, added]),
            json!({}),
            json!({}),
        ),
    );
    let patch = api.expect(Method::PATCH, NODE_A1).await;
    assert_rv_test(&patch.body, "11");
    let taints = taints_of(&patch.body);
    assert_eq!(&taints[..2], &[dedicated, added]);
    assert_eq!(taints[2]["key"], OOS);
    patch.respond(
        200,
        node("a1", "east", "12", json!([]), json!({}), json!({})),
    );
    assert_eq!(
        write.await.expect("joined").expect("written"),
        TaintOutcome::Written
    );
}

#[tokio::test]
async fn removing_the_taint_keeps_every_other_taint_and_retries_on_conflict() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let write = spawn_taint_change(client, &leadership, TaintChange::Remove);
    let dedicated = json!({"key": "dedicated", "value": "db", "effect": "NoSchedule"});
    let ours = json!({"key": OOS, "value": "nodeshutdown", "effect": "NoExecute"});
    let operators = json!({"key": OOS, "value": "manual", "effect": "NoSchedule"});
    let tainted = |rv: &str| {
        node(
            "a1",
            "east",
            rv,
            json!([dedicated, ours, operators]),
            json!({"twosite.dev/fenced-boot-id": "boot-0", "keep": "me"}),
            json!({}),
        )
    };
    api.expect(Method::GET, NODE_A1)
        .await
        .respond(200, tainted("20"));
    let patch = api.expect(Method::PATCH, NODE_A1).await;
    assert_rv_test(&patch.body, "20");
    patch.respond_status(409, "Conflict", "the object has been modified");
    api.expect(Method::GET, NODE_A1)
        .await
        .respond(200, tainted("21"));
    let patch = api.expect(Method::PATCH, NODE_A1).await;
    assert_rv_test(&patch.body, "21");
    assert_eq!(taints_of(&patch.body), vec![dedicated, operators]);
    assert!(
        patch.body.as_array().expect("ops").iter().any(|op| op
            == &json!({"op": "remove", "path": "/metadata/annotations/twosite.dev~1fenced-boot-id"})),
        "{}",
        patch.body
    );
    assert!(
        !patch.body.to_string().contains("keep"),
        "other annotations untouched"
    );
    patch.respond(
        200,
        node("a1", "east", "22", json!([]), json!({}), json!({})),
    );
    assert_eq!(
        write.await.expect("joined").expect("written"),
        TaintOutcome::Written
    );
}

/// The positive control for the refusals below: the same cluster with a1 dead and b1 clear is
/// fenced, through the loop's entry point.
/// A node just judged dead, its fence deadline passed (a controller that just took over): the
/// first write is our `NoSchedule` taint, every other taint kept; nothing is committed, deleted
/// or tainted out of service before the controller has seen it on for a second.
#[tokio::test]
async fn a_dead_node_is_made_unschedulable_first_and_fenced_only_after_the_head_start() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    let setup = Setup {
        a1: plain("a1", "east"),
        ..Setup::default()
    };
    let run = passes(ctx, observed(setup), vec![30_000, 30_500]);
    let dedicated = json!({"key": "dedicated", "value": "db", "effect": "NoSchedule"});
    api.expect(Method::GET, NODE_A1).await.respond(
        200,
        node("a1", "east", "30", json!([dedicated]), json!({}), json!({})),
    );
    let patch = api.expect(Method::PATCH, NODE_A1).await;
    assert_rv_test(&patch.body, "30");
    assert_eq!(
        taints_of(&patch.body),
        [
            dedicated.clone(),
            json!({"key": UNRESPONSIVE, "effect": "NoSchedule"})
        ]
    );
    assert_eq!(
        patch.body.as_array().map(Vec::len),
        Some(2),
        "no annotation: {}",
        patch.body
    );
    patch.respond(
        200,
        node("a1", "east", "31", json!([dedicated]), json!({}), json!({})),
    );
    // The second pass (its watch has not shown the taint yet) asks for it again; still no fence.
    let (get, reasons) = api.expect_after_events(Method::GET, NODE_A1).await;
    assert_eq!(reasons, ["NodeFenceWaiting"]);
    get.respond(
        200,
        node(
            "a1",
            "east",
            "31",
            json!([dedicated, {"key": UNRESPONSIVE, "effect": "NoSchedule"}]),
            json!({}),
            json!({}),
        ),
    );
    let r = run.await.expect("passes");
    assert_eq!(
        r.phase("a1"),
        Some(Phase::FenceWaiting(WaitReason::NotUnschedulableYet))
    );
    let (rest, _) = api.drain().await;
    assert!(rest.is_empty(), "nothing else written: {rest:?}");
}

#[tokio::test]
async fn a_dead_node_with_a_clear_partner_is_committed_then_its_pods_deleted_and_tainted() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    let metrics = Arc::clone(&ctx.metrics);
    let run = passes(ctx, observed(Setup::default()), vec![30_000]);

    // The fence is committed on a1's heartbeat Lease, conditional on the version seen.
    let (get, reasons) = api.expect_after_events(Method::GET, AGENT_A1).await;
    assert_eq!(reasons, ["NodeFenced"]);
    get.respond(200, agent("a1", "1", "0", "enabled", false));
    let commit = api.expect(Method::PATCH, AGENT_A1).await;
    assert_rv_test(&commit.body, "1");
    assert_eq!(
        commit.body[1]["path"],
        "/metadata/annotations/twosite.dev~1fenced-boot-id"
    );
    assert_eq!(commit.body[1]["value"], "boot-a1");
    commit.respond(200, agent("a1", "2", "0", "enabled", true));

    // The same pass: first the taint (NoExecute: the scheduler places nothing new on a1, which
    // still reads Ready), then the pods are deleted (grace period 0, not the DaemonSet's).
    api.expect(Method::GET, NODE_A1).await.respond(
        200,
        node("a1", "east", "30", json!([]), json!({}), json!({})),
    );
    let patch = api.expect(Method::PATCH, NODE_A1).await;
    assert_rv_test(&patch.body, "30");
    assert_eq!(taints_of(&patch.body)[0]["key"], OOS);
    patch.respond(
        200,
        node("a1", "east", "31", json!([]), json!({}), json!({})),
    );
    let list = api.expect(Method::GET, PODS).await;
    assert_eq!(
        list.query_param("fieldSelector").as_deref(),
        Some("spec.nodeName%3Da1")
    );
    list.respond(
        200,
        pod_list(vec![
            pod("web-0", "StatefulSet"),
            pod("agent-x", "DaemonSet"),
        ]),
    );
    let delete = api
        .expect(Method::DELETE, "/api/v1/namespaces/default/pods/web-0")
        .await;
    assert_eq!(delete.body["gracePeriodSeconds"], 0, "{}", delete.body);
    assert_eq!(delete.body["preconditions"]["uid"], "uid-web-0");
    delete.respond(200, pod("web-0", "StatefulSet"));

    let r = run.await.expect("passes");
    assert_eq!(r.phase("a1"), Some(Phase::Fenced));
    let (rest, _) = api.drain().await;
    assert!(rest.is_empty(), "{rest:?}");
    let text = metrics.encode().expect("metrics");
    assert!(text.contains("twosite_remediations_total 1"), "{text}");
    assert!(
        text.contains("twosite_time_to_taint_seconds_count 1"),
        "{text}"
    );
    // a1's agent Lease last changed at 0 s; its pods were released in the pass at 30 s.
    assert!(
        text.contains("twosite_time_to_release_seconds_sum 30.0"),
        "{text}"
    );
    assert!(
        text.contains("twosite_time_to_release_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("twosite_remediation_paused 0"), "{text}");
    assert!(
        text.contains(r#"twosite_node_phase{node="a1",phase="Fenced"} 1"#),
        "{text}"
    );
}

/// A lost room's pod deletions run beside the passes: a pass does not wait for a deletion under
/// way (the next fences would), and does not ask for a node's pods twice while it is.
#[tokio::test]
async fn a_pass_does_not_wait_for_a_pod_deletion_under_way_nor_repeat_it() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    let run = passes(ctx, observed(Setup::default()), vec![30_000, 30_500]);

    let (get, _) = api.expect_after_events(Method::GET, AGENT_A1).await;
    get.respond(200, agent("a1", "1", "0", "enabled", false));
    api.expect(Method::PATCH, AGENT_A1)
        .await
        .respond(200, agent("a1", "2", "0", "enabled", true));
    let node_a1 = || node("a1", "east", "30", json!([]), json!({}), json!({}));
    api.expect(Method::GET, NODE_A1)
        .await
        .respond(200, node_a1());
    api.expect(Method::PATCH, NODE_A1)
        .await
        .respond(200, node_a1());
    api.expect(Method::GET, PODS)
        .await
        .respond(200, pod_list(vec![pod("web-0", "StatefulSet")]));
    // The deletion is sent and left unanswered. Meanwhile the next pass (the watch still
    // shows a1 untainted, web-0 still there) writes the taint again and asks for no second
    // deletion. The deletion runs beside the pass: the two come in either order.
    let mut held = Vec::new();
    let mut patches = 0;
    while patches < 1 || held.is_empty() {
        let seen = api.next().await;
        match (seen.method.clone(), seen.path.as_str()) {
            (Method::DELETE, _) => held.push(seen),
            (Method::POST, p) if p.ends_with("/events") => {
                let body = seen.body.clone();
                seen.respond(201, body);
            }
            (Method::GET, PODS) => seen.respond(200, pod_list(vec![pod("web-0", "StatefulSet")])),
            (Method::GET, NODE_A1) => seen.respond(200, node_a1()),
            (Method::PATCH, NODE_A1) => {
                patches += 1;
                seen.respond(200, node_a1());
            }
            (m, p) => panic!("unexpected {m} {p}"),
        }
    }
    let r = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("both passes ended while the deletion was under way")
        .expect("passes");
    assert_eq!(r.phase("a1"), Some(Phase::Fenced));
    let (rest, _) = api.drain().await;
    assert!(
        rest.iter().all(|q| !q.starts_with("DELETE")),
        "a second deletion: {rest:?}"
    );
    assert_eq!(held.len(), 1, "one deletion of web-0");
    for h in held {
        assert_eq!(h.path, "/api/v1/namespaces/default/pods/web-0");
        h.respond(200, pod("web-0", "StatefulSet"));
    }
}

/// A taint write that fails deletes nothing: no replacement may be scheduled while the dead
/// node is still Ready and untainted. The next pass taints first again.
#[tokio::test]
async fn a_failed_taint_write_releases_no_pod() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    let run = passes(ctx, observed(Setup::default()), vec![30_000, 35_000]);
    let (get, _) = api.expect_after_events(Method::GET, AGENT_A1).await;
    get.respond(200, agent("a1", "1", "0", "enabled", false));
    api.expect(Method::PATCH, AGENT_A1)
        .await
        .respond(200, agent("a1", "2", "0", "enabled", true));
    api.expect(Method::GET, NODE_A1).await.respond(
        200,
        node("a1", "east", "30", json!([]), json!({}), json!({})),
    );
    api.expect(Method::PATCH, NODE_A1).await.respond_status(
        500,
        "InternalError",
        "etcd is unhappy",
    );
    // The next pass counts a1's pods (a read), then taints again: no deletion before it.
    let (list, _) = api.expect_after_events(Method::GET, PODS).await;
    list.respond(200, pod_list(vec![pod("web-0", "StatefulSet")]));
    // Other nodes are stepped concurrently: their Events may come in between.
    let (get, _) = api.expect_after_events(Method::GET, NODE_A1).await;
    get.respond(
        200,
        node("a1", "east", "32", json!([]), json!({}), json!({})),
    );
    api.expect(Method::PATCH, NODE_A1).await.respond_status(
        500,
        "InternalError",
        "etcd is still unhappy",
    );
    run.await.expect("passes");
    let (rest, _) = api.drain().await;
    assert!(
        rest.iter().all(|r| !r.starts_with("DELETE")),
        "no pod deleted after a failed taint: {rest:?}"
    );
}

#[tokio::test]
async fn a_node_fenced_before_a_restart_has_its_pods_deleted_but_not_its_daemonset_pods() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    // Our taint and annotation on the Node, our marker on its Lease: picked up as Tainted.
    let a1: Node = serde_json::from_value(node(
        "a1",
        "east",
        "40",
        json!([{"key": OOS, "value": "nodeshutdown", "effect": "NoExecute"},
               {"key": UNRESPONSIVE, "effect": "NoSchedule"}]),
        json!({"twosite.dev/fenced-boot-id": "boot-a1"}),
        json!({}),
    ))
    .expect("node");
    let setup = Setup {
        a1,
        a1_agent: agent("a1", "1", "0", "enabled", true),
        ..Setup::default()
    };
    let run = passes(ctx, observed(setup), vec![30_000]);
    let (list, _) = api.expect_after_events(Method::GET, PODS).await;
    list.respond(
        200,
        pod_list(vec![
            pod("agent-x", "DaemonSet"),
            pod("web-1", "ReplicaSet"),
        ]),
    );
    let (delete, _) = api
        .expect_after_events(Method::DELETE, "/api/v1/namespaces/default/pods/web-1")
        .await;
    assert_eq!(delete.body["gracePeriodSeconds"], 0);
    delete.respond(200, pod("web-1", "ReplicaSet"));
    let r = run.await.expect("passes");
    assert_eq!(r.phase("a1"), Some(Phase::Tainted));
    let (rest, _) = api.drain().await;
    assert!(
        rest.is_empty(),
        "no DaemonSet pod deleted, nothing else written: {rest:?}"
    );
}

/// A node judged dead before its self-fence deadline is fenced by a pass at the deadline,
/// not at the first tick after it: the remediator says when to look again.
#[tokio::test]
async fn a_pass_is_asked_for_at_the_fence_deadline() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    let observed = observed(Setup::default());
    // When the core first judges a1 dead, and its self-fence deadline then.
    let t = HealthTiming::default();
    let (dead_at, deadline) = (0..30_000)
        .step_by(100)
        .find_map(|ms| {
            let view = observed.lock().cluster_view(at(ms), &t);
            let a = node_health::assess(&view, Some(&pairing()), at(ms), &t, 50);
            a.nodes
                .iter()
                .find(|n| n.name == "a1")
                .and_then(|n| match n.input.verdict {
                    node_health::NodeVerdict::Dead {
                        fence_deadline: Some(d),
                    } => Some((ms, d)),
                    _ => None,
                })
        })
        .expect("a1 judged dead");
    assert!(
        at(dead_at) < deadline,
        "dead at {dead_at} ms, deadline {deadline:?}"
    );
    let run = passes(ctx.clone(), observed.clone(), vec![dead_at]);
    let (rest, reasons) = api.drain().await;
    assert!(
        rest.is_empty(),
        "nothing written before the deadline: {rest:?}"
    );
    assert_eq!(reasons, ["NodeFenceWaiting"]);
    let mut r = run.await.expect("passes");
    assert_eq!(r.wake_at(), Some(deadline));
    let run = tokio::spawn(async move {
        r.pass(&ctx, &observed, Some(&pairing()), deadline).await;
        r
    });
    let (get, reasons) = api.expect_after_events(Method::GET, AGENT_A1).await;
    assert_eq!(reasons, ["NodeFenced"]);
    get.respond_status(500, "InternalError", "stop here");
    let r = run.await.expect("pass");
    assert_eq!(r.wake_at(), None, "nobody waits for a time any more");
}

/// a1 fenced and tainted before a restart, as in the test above.
fn fenced_a1() -> Setup {
    let a1: Node = serde_json::from_value(node(
        "a1",
        "east",
        "40",
        json!([{"key": OOS, "value": "nodeshutdown", "effect": "NoExecute"},
               {"key": UNRESPONSIVE, "effect": "NoSchedule"}]),
        json!({"twosite.dev/fenced-boot-id": "boot-a1"}),
        json!({}),
    ))
    .expect("node");
    Setup {
        a1,
        a1_agent: agent("a1", "1", "0", "enabled", true),
        ..Setup::default()
    }
}

/// With the pod index listed, a tainted node's passes read its pods from memory: the release
/// deletes from the index (uid precondition kept), and the passes after it, every 500 ms for
/// as long as the node stays tainted, make no request at all (they listed its pods each time).
#[tokio::test]
async fn with_the_pod_index_listed_a_tainted_node_costs_no_pod_list() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let index = controller::pod_index::PodIndex::from_pods(
        [pod("agent-x", "DaemonSet"), pod("web-1", "ReplicaSet")]
            .map(|p| serde_json::from_value(p).expect("pod")),
    );
    let ctx = RemediationContext {
        pod_index: Some(index.clone()),
        ..context(client, leadership)
    };
    let observed = observed(fenced_a1());
    let run = passes(ctx.clone(), observed.clone(), vec![30_000]);
    let (delete, _) = api
        .expect_after_events(Method::DELETE, "/api/v1/namespaces/default/pods/web-1")
        .await;
    assert_eq!(delete.body["gracePeriodSeconds"], 0);
    assert_eq!(delete.body["preconditions"]["uid"], "uid-web-1");
    delete.respond(200, pod("web-1", "ReplicaSet"));
    let r = run.await.expect("passes");
    assert_eq!(r.phase("a1"), Some(Phase::Tainted));
    // The watch reports the deletion; ten more passes (5 s) write and list nothing.
    index.apply(W::Delete(
        serde_json::from_value(pod("web-1", "ReplicaSet")).expect("pod"),
    ));
    let run = tokio::spawn(async move {
        let mut r = r;
        let p = pairing();
        for ms in (30_500..=35_000).step_by(500) {
            r.pass(&ctx, &observed, Some(&p), at(ms)).await;
        }
        r
    });
    let (rest, _) = api.drain().await;
    assert!(rest.is_empty(), "no pod LIST, nothing written: {rest:?}");
    assert_eq!(run.await.expect("passes").phase("a1"), Some(Phase::Tainted));
}

/// An index that has not listed yet is not trusted (it would read "no pods"): the pass lists.
#[tokio::test]
async fn an_unlisted_pod_index_falls_back_to_a_list() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = RemediationContext {
        pod_index: Some(controller::pod_index::PodIndex::default()),
        ..context(client, leadership)
    };
    let run = passes(ctx, observed(fenced_a1()), vec![30_000]);
    let (list, _) = api.expect_after_events(Method::GET, PODS).await;
    list.respond(200, pod_list(vec![pod("agent-x", "DaemonSet")]));
    assert_eq!(run.await.expect("passes").phase("a1"), Some(Phase::Tainted));
    let (rest, _) = api.drain().await;
    assert!(rest.is_empty(), "{rest:?}");
}

fn launcher_of(vm: &str) -> Value {
    json!({
        "metadata": {"name": format!("virt-launcher-{vm}-x"), "namespace": "default",
                     "uid": format!("uid-{vm}"),
                     "labels": {"kubevirt.io": "virt-launcher"},
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachineInstance", "name": vm, "uid": "u", "controller": true}]},
        "spec": {"nodeName": "a1", "containers": []},
    })
}

#[tokio::test]
async fn a_fence_deletes_the_launcher_pods_of_opted_in_vms_only() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let mut ctx = context(client, leadership);
    let vm = |name: &str, annotated: bool| -> controller::vm::types::VirtualMachine {
        let mut meta = json!({"name": name, "namespace": "default"});
        if annotated {
            meta["annotations"] = json!({"twosite.dev/ha": "true"});
        }
        serde_json::from_value(
            json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                      "metadata": meta, "spec": {}}),
        )
        .expect("vm")
    };
    ctx.vms = Some(controller::vm::watch::VmStores::from_objects(
        vec![vm("protected", true), vm("plain", false)],
        Vec::new(),
        Vec::new(),
        Vec::new(),
    ));
    let a1: Node = serde_json::from_value(node(
        "a1",
        "east",
        "40",
        json!([{"key": OOS, "value": "nodeshutdown", "effect": "NoExecute"},
               {"key": UNRESPONSIVE, "effect": "NoSchedule"}]),
        json!({"twosite.dev/fenced-boot-id": "boot-a1"}),
        json!({}),
    ))
    .expect("node");
    let setup = Setup {
        a1,
        a1_agent: agent("a1", "1", "0", "enabled", true),
        ..Setup::default()
    };
    let run = passes(ctx, observed(setup), vec![30_000]);
    let (list, _) = api.expect_after_events(Method::GET, PODS).await;
    list.respond(
        200,
        pod_list(vec![
            launcher_of("plain"),
            launcher_of("protected"),
            launcher_of("unknown"),
        ]),
    );
    let (delete, _) = api
        .expect_after_events(
            Method::DELETE,
            "/api/v1/namespaces/default/pods/virt-launcher-protected-x",
        )
        .await;
    assert_eq!(delete.body["gracePeriodSeconds"], 0);
    delete.respond(200, launcher_of("protected"));
    run.await.expect("passes");
    let (rest, _) = api.drain().await;
    assert!(
        rest.iter().all(|r| !r.starts_with("DELETE")),
        "the launcher pods of VMs that did not opt in (or are unknown) are Kubernetes' to release: {rest:?}"
    );
}

/// Runs the loop over `setup` at the given times and returns every request other than Events,
/// and the Events' reasons.
async fn requests_for(setup: Setup, times: Vec<u64>) -> (Vec<String>, Vec<String>) {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let run = passes(context(client, leadership), observed(setup), times);
    let seen = api.drain().await;
    run.await.expect("passes");
    seen
}

#[tokio::test]
async fn in_dry_run_a_dead_node_is_reported_but_not_fenced() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let mut ctx = context(client, leadership);
    ctx.dry_run = true;
    let run = passes(
        ctx,
        observed(Setup::default()),
        vec![30_000, 30_500, 31_000],
    );
    let (requests, reasons) = api.drain().await;
    let r = run.await.expect("passes");
    assert!(reasons.contains(&"NodeFenced".to_string()), "{reasons:?}");
    assert!(
        requests
            .iter()
            .filter(|q| !q.contains("/events.k8s.io/"))
            .all(|q| !q.starts_with("PATCH") && !q.starts_with("DELETE") && !q.starts_with("PUT")),
        "dry-run writes nothing but Events: {requests:?}"
    );
    // Not even the read that starts a fence commit.
    assert!(
        !requests.iter().any(|q| q.ends_with(AGENT_A1)),
        "dry-run does not start a fence commit: {requests:?}"
    );
    assert!(
        !matches!(r.phase("a1"), Some(Phase::Fenced) | Some(Phase::Tainted)),
        "a dry run never shows a node fenced: {:?}",
        r.phase("a1")
    );
}

#[tokio::test]
async fn a_merely_late_node_is_not_touched() {
    // a1 silent since 0 s: late at 6 s, not yet dead.
    let (requests, reasons) = requests_for(Setup::default(), vec![6_000, 7_000]).await;
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(reasons, ["NodeSuspect"]);
}

#[tokio::test]
async fn a_dead_node_whose_partner_is_not_clear_is_not_touched() {
    let setup = Setup {
        b1_clean: false,
        ..Setup::default()
    };
    let (requests, reasons) = requests_for(setup, vec![30_000, 30_500]).await;
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(reasons, ["NodeFenceWaiting"]);
}

#[tokio::test]
async fn an_excluded_dead_node_is_not_touched() {
    let a1: Node = serde_json::from_value(node(
        "a1",
        "east",
        "5",
        json!([]),
        json!({}),
        json!({"twosite.dev/exclude-from-remediation": "true"}),
    ))
    .expect("node");
    let (requests, reasons) = requests_for(
        Setup {
            a1,
            ..Setup::default()
        },
        vec![30_000, 30_500],
    )
    .await;
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(reasons, ["NodeExcluded"]);
}

#[tokio::test]
async fn a_node_whose_watchdog_is_disabled_is_never_fenced_by_time() {
    let setup = Setup {
        a1_agent: agent("a1", "1", "0", "disabled", false),
        ..Setup::default()
    };
    let (requests, _) = requests_for(setup, vec![30_000, 60_000, 120_000]).await;
    // Only the reads before an early NoSchedule taint (of the nodes that went silent: every one
    // here by 60 s; answered 500 by this mock): no fence commit, no deletion, no out-of-service
    // taint.
    assert!(
        requests.iter().all(|r| r.starts_with("GET /api/v1/nodes/")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn a_replica_that_does_not_lead_does_nothing() {
    let (client, mut api) = mock_client();
    let leadership = Leadership::new(LeaderConfig::new(ME)).expect("valid config");
    let run = passes(
        context(client, leadership),
        observed(Setup::default()),
        vec![30_000, 30_500],
    );
    let (requests, reasons) = api.drain().await;
    assert!(
        requests.is_empty() && reasons.is_empty(),
        "{requests:?} {reasons:?}"
    );
    let r = run.await.expect("passes");
    assert_eq!(r.phase("a1"), None);
}

// ---------------------------------------------------------------------------------------------
// With a witness: a1 (east) dead is fenced only while the controller holds the grant for west.

/// How the fake witness answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WitnessMode {
    Grant,
    Held,
    Down,
}

/// A witness that answers as told and remembers every claim.
struct FakeWitness {
    mode: std::sync::Mutex<WitnessMode>,
    claims: std::sync::Mutex<Vec<Claim>>,
}

impl FakeWitness {
    fn new(mode: WitnessMode) -> Arc<Self> {
        Arc::new(FakeWitness {
            mode: std::sync::Mutex::new(mode),
            claims: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn mode(&self) -> WitnessMode {
        *self.mode.lock().expect("lock")
    }

    fn claims(&self) -> Vec<Claim> {
        self.claims.lock().expect("lock").clone()
    }
}

impl WitnessPort for FakeWitness {
    fn claim<'a>(&'a self, claim: &'a Claim) -> PortFuture<'a, ClaimOutcome> {
        self.claims.lock().expect("lock").push(claim.clone());
        let answer = match self.mode() {
            WitnessMode::Grant => Ok(ClaimOutcome::Granted {
                epoch: 7,
                valid_for_ms: 10_000,
            }),
            WitnessMode::Held => Ok(ClaimOutcome::Held {
                holder: Some("east".into()),
                epoch: 6,
                retry_after_ms: 1_000,
            }),
            WitnessMode::Down => Err(PortError::Unreachable("connection refused".into())),
        };
        Box::pin(async move { answer })
    }

    fn healthz(&self) -> PortFuture<'_, ()> {
        let answer = match self.mode() {
            WitnessMode::Down => Err(PortError::Unreachable("connection refused".into())),
            _ => Ok(()),
        };
        Box::pin(async move { answer })
    }
}

/// A clock the test sets.
#[derive(Default)]
struct TestClock(std::sync::atomic::AtomicU64);

impl node_health::Clock for TestClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// A context with the fake witness, and the clock its link reads.
fn witness_context(
    client: kube::Client,
    leadership: Leadership,
    fake: Arc<FakeWitness>,
) -> (RemediationContext, Arc<TestClock>) {
    let mut ctx = context(client, leadership);
    let clock = Arc::new(TestClock::default());
    ctx.witness = Some(Arc::new(WitnessLink::new(
        fake,
        clock.clone(),
        ctx.timing.drift_ppm,
        Arc::clone(&ctx.metrics),
    )));
    (ctx, clock)
}

/// Like [`passes`], moving the witness link's clock along; returns the last pass's view too.
fn witness_passes(
    ctx: RemediationContext,
    clock: Arc<TestClock>,
    observed: SharedObserved,
    times: Vec<u64>,
) -> tokio::task::JoinHandle<(Remediator, Option<RemediationView>)> {
    tokio::spawn(async move {
        let mut r = Remediator::default();
        let p = pairing();
        let mut view = None;
        for ms in times {
            clock.0.store(ms, std::sync::atomic::Ordering::SeqCst);
            view = r.pass(&ctx, &observed, Some(&p), at(ms)).await;
        }
        (r, view)
    })
}

#[tokio::test]
async fn with_a_witness_and_no_grant_a_dead_node_is_not_touched() {
    for mode in [WitnessMode::Held, WitnessMode::Down] {
        let (client, mut api) = mock_client();
        let leadership = leading(client.clone(), &mut api).await;
        let fake = FakeWitness::new(mode);
        let (ctx, clock) = witness_context(client, leadership, fake.clone());
        let metrics = Arc::clone(&ctx.metrics);
        let run = witness_passes(
            ctx,
            clock,
            observed(Setup::default()),
            vec![30_000, 30_500, 31_000, 32_000],
        );
        let (requests, reasons) = api.drain().await;
        let (r, view) = run.await.expect("passes");
        assert!(
            requests.is_empty(),
            "{mode:?}: no commit, delete or patch: {requests:?}"
        );
        assert_eq!(reasons, ["NodeFenceWaiting"], "{mode:?}");
        assert_eq!(
            r.phase("a1"),
            Some(Phase::FenceWaiting(WaitReason::NoWitnessGrant)),
            "{mode:?}"
        );
        // The opposite room was claimed, at most once a second.
        let claims = fake.claims();
        assert_eq!(claims.len(), 3, "{mode:?}: {claims:?}");
        assert!(claims.iter().all(|c| c
            == &Claim {
                room: "west".into(),
                epoch: None,
                api_reachable: true,
            }));
        let view = view.expect("leader's view");
        let status = view.nodes.iter().find(|n| n.name == "a1").expect("a1");
        assert_eq!(status.waiting_for.as_deref(), Some("NoWitnessGrant"));
        let w = view.witness.expect("witness configured");
        assert_eq!(w.grant, None);
        assert_eq!(w.reachable, Some(mode == WitnessMode::Held));
        let text = metrics.encode().expect("metrics");
        let label = if mode == WitnessMode::Held {
            "held"
        } else {
            "unreachable"
        };
        assert!(
            text.contains(&format!(
                "twosite_witness_claims_total{{outcome=\"{label}\"}} 3"
            )),
            "{text}"
        );
    }
}

#[tokio::test]
async fn with_the_witness_grant_for_the_other_room_a_dead_node_is_fenced() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let fake = FakeWitness::new(WitnessMode::Grant);
    let (ctx, clock) = witness_context(client, leadership, fake.clone());
    let metrics = Arc::clone(&ctx.metrics);
    let run = witness_passes(ctx, clock, observed(Setup::default()), vec![30_000]);

    let (get, reasons) = api.expect_after_events(Method::GET, AGENT_A1).await;
    assert_eq!(reasons, ["NodeFenced"]);
    get.respond(200, agent("a1", "1", "0", "enabled", false));
    let commit = api.expect(Method::PATCH, AGENT_A1).await;
    assert_rv_test(&commit.body, "1");
    commit.respond(200, agent("a1", "2", "0", "enabled", true));
    let (r, view) = run.await.expect("passes");
    assert_eq!(r.phase("a1"), Some(Phase::Fenced));
    let w = view.and_then(|v| v.witness).expect("witness view");
    assert_eq!(w.grant, Some(("west".to_string(), 7)));
    assert_eq!(w.reachable, Some(true));
    assert_eq!(fake.claims().len(), 1);
    let text = metrics.encode().expect("metrics");
    assert!(
        text.contains(r#"twosite_witness_claims_total{outcome="granted"} 1"#),
        "{text}"
    );
    assert!(text.contains("twosite_witness_reachable 1"), "{text}");
}

#[tokio::test]
async fn a_healthy_cluster_makes_no_claims() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let fake = FakeWitness::new(WitnessMode::Grant);
    let (ctx, clock) = witness_context(client, leadership, fake.clone());
    // At 6 s a1 is only late.
    let run = witness_passes(ctx, clock, observed(Setup::default()), vec![6_000, 7_000]);
    let (requests, _) = api.drain().await;
    run.await.expect("passes");
    assert!(requests.is_empty(), "{requests:?}");
    assert!(fake.claims().is_empty());
}

fn status_condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
}

/// The remediation loop's view with the fake witness in `mode`, then the status the pairing
/// reconciler applies from it, and the Events it publishes.
async fn witness_status(mode: WitnessMode, previous: Option<Value>) -> (Value, Vec<String>) {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let fake = FakeWitness::new(mode);
    let (ctx, clock) = witness_context(client.clone(), leadership.clone(), fake);
    let link = ctx.witness.clone().expect("link");
    link.check_health().await;
    // Nobody dead: the view comes from the health check alone.
    let run = witness_passes(ctx, clock, observed(Setup::default()), vec![6_000]);
    let (requests, _) = api.drain().await;
    assert!(requests.is_empty(), "{requests:?}");
    let (_, view) = run.await.expect("passes");
    assert!(view.is_some());

    let mut pairing_ctx = pairing_context(client, leadership, Arc::new(Metrics::new()));
    pairing_ctx.remediation = tokio::sync::watch::channel(view).1;
    let facts: Vec<NodeFacts> = ["a1", "b1", "b2"]
        .iter()
        .map(|n| NodeFacts {
            name: n.to_string(),
            zone: Some(if *n == "a1" { "east" } else { "west" }.into()),
            control_plane: false,
            ready: true,
        })
        .collect();
    let reconcile = spawn_reconcile(&pairing_ctx, facts);
    api.expect(Method::GET, TWOSITE_PATH)
        .await
        .respond(200, twosite(json!({}), previous));
    let apply = api.expect(Method::PATCH, STATUS_PATH).await;
    let status = apply.body["status"].clone();
    apply.respond(200, twosite(json!({}), Some(status.clone())));
    let (rest, reasons) = api.drain().await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(
        reconcile.await.expect("joined").expect("reconciled"),
        Outcome::Written
    );
    (status, reasons)
}

#[tokio::test]
async fn a_witness_that_does_not_answer_is_reported_once_and_stops_nothing() {
    let (status, reasons) = witness_status(WitnessMode::Down, None).await;
    let c = status_condition(&status, "WitnessReachable").expect("condition");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "WitnessUnreachable");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("connection refused")),
        "{c}"
    );
    assert_eq!(status["witness"]["configured"], true);
    assert_eq!(status["witness"]["reachable"], false);
    assert_eq!(status["witness"]["grant"], Value::Null);
    assert!(status["witness"].get("lastContact").is_none(), "{status}");
    assert!(
        reasons.contains(&"WitnessUnreachable".to_string()),
        "{reasons:?}"
    );
    // Remediation itself is not paused by it.
    let paused = status_condition(&status, "RemediationPaused").expect("paused condition");
    assert_eq!(paused["status"], "False");

    // Still down on the next write: no second Event.
    let mut previous = status.clone();
    previous["pairs"] = json!([]);
    let (again, reasons) = witness_status(WitnessMode::Down, Some(previous)).await;
    assert_eq!(
        status_condition(&again, "WitnessReachable").map(|c| c["status"].clone()),
        Some(json!("False"))
    );
    assert!(
        !reasons.contains(&"WitnessUnreachable".to_string()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_witness_that_answers_is_reported_reachable() {
    let (status, reasons) = witness_status(WitnessMode::Held, None).await;
    let c = status_condition(&status, "WitnessReachable").expect("condition");
    assert_eq!(c["status"], "True");
    assert_eq!(c["reason"], "WitnessAnswered");
    assert_eq!(status["witness"]["reachable"], true);
    let contact = status["witness"]["lastContact"]
        .as_str()
        .expect("lastContact");
    assert!(contact.parse::<jiff::Timestamp>().is_ok(), "{contact}");
    assert!(
        !reasons.contains(&"WitnessUnreachable".to_string()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn without_a_witness_the_status_says_so_and_has_no_witness_condition() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let run = passes(
        context(client.clone(), leadership.clone()),
        observed(Setup::default()),
        vec![6_000],
    );
    api.drain().await;
    let r = run.await.expect("passes");
    assert_eq!(r.phase("a1"), Some(Phase::Suspect));
    let view = controller::status::RemediationView::default();
    assert_eq!(view.witness, None);
    let status = controller::status::desired_status(
        &controller::status::StatusInput {
            spec: &Default::default(),
            generation: Some(1),
            previous: None,
            nodes: &[],
            leader: controller::crd::LeaderStatus {
                identity: ME.into(),
                epoch: 0,
            },
            now: "2026-11-01T10:00:00Z",
            remediation: None,
            volumes: &[],
            vms: &[],
        }
        .with_remediation(Some(&view)),
    );
    let witness = status.witness.clone().expect("witness status");
    assert!(!witness.configured && !witness.reachable && witness.grant.is_none());
    assert!(
        controller::status::condition(&status, "WitnessReachable").is_none(),
        "no condition without a witness"
    );
}
