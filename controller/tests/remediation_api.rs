//! The remediation shell against a mock API server: the fence is committed on the heartbeat
//! Lease, pods are deleted with grace period 0 (DaemonSet pods spared), the out-of-service taint
//! goes on and comes off with a JSON Patch guarded by the Node's resourceVersion, keeping every
//! other taint; and the unsafe cases, run through the loop's entry point, write nothing.

mod common;

use common::*;
use controller::heartbeats::{Observed, SharedObserved};
use controller::leader_lease::{LeaderLease, Leadership, RoundOutcome};
use controller::metrics::Metrics;
use controller::remediation::{RemediationContext, Remediator};
use controller::taint::{TaintChange, TaintOutcome, change_taint};
use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher::Event as W;
use node_health::remediation::Phase;
use node_health::{HealthTiming, LeaderConfig, MonoTime, Pair, Pairing, Room};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const ME: &str = "ctl-0";
const OOS: &str = "node.kubernetes.io/out-of-service";
const NODE_A1: &str = "/api/v1/nodes/a1";
const AGENT_A1: &str =
    "/apis/coordination.k8s.io/v1/namespaces/twosite-system/leases/twosite-agent-a1";
const PODS: &str = "/api/v1/pods";

async fn leading(client: kube::Client, api: &mut ApiServer) -> Leadership {
    let leadership = Leadership::new(LeaderConfig::new(ME)).expect("valid config");
    let shell = LeaderLease::new(
        client,
        NAMESPACE,
        leadership.clone(),
        Arc::new(Metrics::new()),
        Duration::from_secs(5),
    );
    let round = tokio::spawn(async move { shell.round().await });
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond_status(404, "NotFound", "not found");
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let body = create.body.clone();
    create.respond(201, stored(body, "1"));
    assert_eq!(
        round.await.expect("joined").expect("round"),
        RoundOutcome::Created
    );
    assert!(leadership.is_leader());
    leadership
}

fn context(client: kube::Client, leadership: Leadership) -> RemediationContext {
    RemediationContext {
        nodes: kube::Api::all(client.clone()),
        agent_leases: kube::Api::namespaced(client.clone(), NAMESPACE),
        pods: kube::Api::all(client.clone()),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "twosite-controller".into(),
                instance: Some(ME.into()),
            },
        ),
        leadership,
        metrics: Arc::new(Metrics::new()),
        api_timeout: Duration::from_secs(5),
        timing: HealthTiming::default(),
        max_dead_share_pct: 50,
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
        "spec": {"holderIdentity": node},
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

/// How the node under test, a1 (paired with b1; b2 unpaired in the west), looks.
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
            a1: plain("a1", "east"),
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
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let write = tokio::spawn({
        let leadership = leadership.clone();
        async move {
            let change = TaintChange::Apply {
                fenced_boot_id: Some("boot-a1".into()),
            };
            change_taint(&nodes, &leadership, "a1", &change, Duration::from_secs(5)).await
        }
    });
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
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let write = tokio::spawn({
        let leadership = leadership.clone();
        async move {
            change_taint(
                &nodes,
                &leadership,
                "a1",
                &TaintChange::Remove,
                Duration::from_secs(5),
            )
            .await
        }
    });
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
#[tokio::test]
async fn a_dead_node_with_a_clear_partner_is_committed_then_its_pods_deleted_and_tainted() {
    let (client, mut api) = mock_client();
    let leadership = leading(client.clone(), &mut api).await;
    let ctx = context(client, leadership);
    let metrics = Arc::clone(&ctx.metrics);
    let run = passes(ctx, observed(Setup::default()), vec![30_000, 30_500]);

    // Pass 1: the fence is committed on a1's heartbeat Lease, conditional on the version seen.
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

    // Pass 2: pods deleted (grace period 0, not the DaemonSet's), then the taint.
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
    assert!(
        text.contains(r#"twosite_node_phase{node="a1",phase="Fenced"} 1"#),
        "{text}"
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
        json!([{"key": OOS, "value": "nodeshutdown", "effect": "NoExecute"}]),
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
    assert!(requests.is_empty(), "{requests:?}");
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
