//! The real-API-server tier: bad input is reported, never a crash. The real `twosite controller`
//! runs under its own ServiceAccount and the RBAC of deploy/rbac-controller.yaml against a real
//! kube-apiserver 1.20.2.
//!
//! - `invalid_spec_is_reported_in_the_status`: `spec.rooms` values the CRD schema accepts but the
//!   controller refuses (the same zone twice, three zones, an empty zone value, no zone at all;
//!   controller/src/status.rs `room_config`) turn `RoomsResolved` and `Paired` False with reason
//!   `InvalidSpec` and a message naming the problem, for the spec's generation, while the last
//!   rooms and pairs are kept and the controller stays up and ready. Fixing the spec turns them
//!   True again. A room no worker carries while a worker carries a zone outside both rooms
//!   (a typo) is refused the same way, keeping the pairs. Values the schema refuses (a string, a
//!   number, numbers for zone values) are refused by the API server with 422 `Invalid` naming
//!   `spec.rooms` (what kubectl shows), and the stored object is left as it was.
//! - `malformed_heartbeat_annotations_are_judged_safely`: agent heartbeat Leases with malformed
//!   annotations (controller/src/heartbeats.rs `agent_lease`). Only `twosite.dev/watchdog:
//!   enabled` counts as an armed watchdog: a node whose Lease says `maybe` is judged without its
//!   agent (on its Ready condition), so its silent agent Lease never makes it Dead. Only
//!   `twosite.dev/renew-failures: "0"` is a clean renewal: a partner whose Lease says
//!   `not-a-number` is never clear, so it may be vouching, and its dead partner is never fenced
//!   (`waitingFor: VoucherNotClear`); once it says `0` the dead partner is fenced and tainted. A
//!   Lease that names no existing node is ignored. The controller stays up and ready throughout.
//!
//! Events about the cluster-scoped TwoSite and Nodes are refused by kube-apiserver 1.20 (fixed
//! in 1.21 by kubernetes/kubernetes#100125), so everything is asserted on the status.
//!
//! Build the binary first: `cargo build -p twosite-controller --bin twosite` (same target
//! directory as the test). Without it or the API server the tests print a "skipped" line and
//! pass, unless `TWOSITE_REQUIRE_APISERVER=1`, where they fail.

mod common;

use common::{
    NAMESPACE, Process, admin_get, status_condition, status_node, twosite_status, twosites,
};
use e2e::apiserver::{self, ApiServer, Options};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use node_health::HealthTiming;
use node_health::time::stretch;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);
const TAINT_KEY: &str = "node.kubernetes.io/out-of-service";
const FENCED_BOOT: &str = "twosite.dev/fenced-boot-id";

/// Starts the API server, installs the CRD and the controller's RBAC, and creates `nodes`
/// (name, zone). `None`: skipped.
async fn start(test: &str, nodes: &[(&str, &str)]) -> Option<(ApiServer, Client)> {
    let setup = common::Setup {
        binaries: &[common::CONTROLLER_BIN],
        options: Options::default(),
        rbac: &["rbac-controller.yaml"],
        nodes: &common::workers(nodes),
    };
    common::start(test, setup).await
}

/// Panics with the controller's log when it has exited or is not ready.
fn assert_up(controller: &mut Process, port: u16) {
    if let Ok(Some(exit)) = controller.child.try_wait() {
        panic!(
            "the controller exited with {exit}\n--- its log ---\n{}",
            controller.log_tail(60)
        );
    }
    assert_eq!(
        admin_get(port, "/readyz"),
        Some(200),
        "the controller is not ready\n--- its log ---\n{}",
        controller.log_tail(40)
    );
}

/// Waits until the controller reports ready (its watches have synced), checking it runs.
async fn wait_ready(controller: &mut Process, port: u16) {
    let start = Instant::now();
    loop {
        if let Ok(Some(exit)) = controller.child.try_wait() {
            panic!(
                "the controller exited with {exit}\n--- its log ---\n{}",
                controller.log_tail(60)
            );
        }
        if admin_get(port, "/readyz") == Some(200) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the controller is not ready within {DEADLINE:?}\n--- its log ---\n{}",
            controller.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the `default` TwoSite's status every 250 ms until `check` accepts it, checking that
/// the controller stays up; panics after `timeout` with the last status and the log.
async fn wait_status(
    what: &str,
    twosites: &Api<DynamicObject>,
    controller: &mut Process,
    port: u16,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        assert_up(controller, port);
        let status = twosite_status(twosites).await;
        if let Ok(st) = &status
            && check(st)
        {
            return st.clone();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}; last status: {status:?}\n--- controller log ---\n{}",
            controller.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition_is(status: &Value, type_: &str, value: &str, reason: &str) -> bool {
    status_condition(status, type_).is_some_and(|c| c["status"] == value && c["reason"] == reason)
}

/// The API status code of a failed call.
fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_is_reported_in_the_status() {
    const TEST: &str = "invalid_spec_is_reported_in_the_status";
    let t0 = Instant::now();
    let Some((server, admin)) = start(
        TEST,
        &[("a-1", "room-a"), ("a-2", "room-a"), ("b-1", "room-b")],
    )
    .await
    else {
        return;
    };
    let port = apiserver::free_port().expect("a free port");
    let mut controller = Process::controller(&server, "controller-1", port);
    let twosites = twosites(&admin);
    let paired = json!([{ "a": "a-1", "b": "b-1" }]);
    let started = Instant::now();
    wait_ready(&mut controller, port).await;
    let good = wait_status(
        "paired, with the remediation view",
        &twosites,
        &mut controller,
        port,
        DEADLINE,
        |st| {
            st["pairs"] == paired
                && condition_is(st, "RoomsResolved", "True", "Resolved")
                && st["nodes"].as_array().is_some_and(|n| n.len() == 3)
        },
    )
    .await;
    println!("paired and ready {:?} after the start", started.elapsed());
    assert_eq!(good["rooms"]["source"], "Automatic", "{good}");

    // Values the schema accepts and the controller refuses, with what the message must name.
    let invalid: [(Value, &str); 4] = [
        (json!(["room-a", "room-a"]), "\"room-a\" twice"),
        (
            json!(["room-a", "room-b", "room-c"]),
            "exactly two zone values, got 3",
        ),
        (json!(["room-a", " "]), "must not be empty"),
        (json!([]), "exactly two zone values, got 0"),
    ];
    for (rooms, names) in &invalid {
        let step = Instant::now();
        let patched = twosites
            .patch(
                "default",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "rooms": rooms } })),
            )
            .await
            .unwrap_or_else(|e| panic!("the schema refused spec.rooms {rooms}: {e}"));
        let generation = patched.metadata.generation.expect("a generation");
        let st = wait_status(
            &format!("InvalidSpec for spec.rooms {rooms}"),
            &twosites,
            &mut controller,
            port,
            Duration::from_secs(15),
            |st| st["observedGeneration"] == generation,
        )
        .await;
        let rooms_resolved = status_condition(&st, "RoomsResolved").expect("RoomsResolved");
        assert_eq!(rooms_resolved["status"], "False", "{rooms}: {st}");
        assert_eq!(rooms_resolved["reason"], "InvalidSpec", "{rooms}: {st}");
        assert_eq!(rooms_resolved["observedGeneration"], generation, "{st}");
        let message = rooms_resolved["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(names) && message.contains("spec.rooms"),
            "{rooms}: the message {message:?} does not name the problem ({names:?})"
        );
        let paired_cond = status_condition(&st, "Paired").expect("Paired");
        assert_eq!(paired_cond["status"], "False", "{st}");
        assert_eq!(paired_cond["reason"], "InvalidSpec", "{st}");
        // The last rooms and pairs are kept: a typo never tears the pairs down.
        for field in ["rooms", "pairs", "pairCount", "unpaired", "unpairedCount"] {
            assert_eq!(st[field], good[field], "{rooms}: {field} changed: {st}");
        }
        assert_eq!(st["leader"]["identity"], "controller-1");
        assert_up(&mut controller, port);
        println!(
            "spec.rooms {rooms}: RoomsResolved=False InvalidSpec {message:?} in {:?}",
            step.elapsed()
        );
    }

    // Fixed: the rooms as configured, the pairs as they were.
    let patched = twosites
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "rooms": ["room-a", "room-b"] } })),
        )
        .await
        .expect("fix spec.rooms");
    let generation = patched.metadata.generation.expect("a generation");
    let fixed = wait_status(
        "RoomsResolved=True after the fix",
        &twosites,
        &mut controller,
        port,
        Duration::from_secs(15),
        |st| st["observedGeneration"] == generation,
    )
    .await;
    assert!(
        condition_is(&fixed, "RoomsResolved", "True", "Resolved"),
        "{fixed}"
    );
    assert!(
        condition_is(&fixed, "Paired", "True", "SomeWorkersUnpaired"),
        "{fixed}"
    );
    assert_eq!(fixed["rooms"]["source"], "Configured", "{fixed}");
    assert_eq!(fixed["pairs"], paired, "{fixed}");
    println!("fixed: RoomsResolved=True, rooms configured, pairs kept");

    // A zone no worker carries while b-1 carries one in neither room: a typo of room-b, refused
    // like an invalid spec so the pairs are kept (node-health/src/rooms.rs
    // `RoomConfig::check_against`).
    let patched = twosites
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "rooms": ["room-a", "room-bb"] } })),
        )
        .await
        .expect("spec.rooms with an unknown zone");
    let generation = patched.metadata.generation.expect("a generation");
    let typo = wait_status(
        "the typo reported",
        &twosites,
        &mut controller,
        port,
        Duration::from_secs(15),
        |st| st["observedGeneration"] == generation,
    )
    .await;
    assert!(
        condition_is(&typo, "RoomsResolved", "False", "InvalidSpec"),
        "{typo}"
    );
    let message = status_condition(&typo, "RoomsResolved")
        .and_then(|c| c["message"].as_str().map(str::to_string))
        .unwrap_or_default();
    assert!(
        message.contains("room-bb") && message.contains("\"room-b\""),
        "{typo}"
    );
    assert_eq!(typo["pairs"], paired, "the pairs are kept: {typo}");
    assert_eq!(typo["rooms"]["b"], "room-b", "{typo}");
    println!("spec.rooms [room-a, room-bb]: refused ({message}), pairs kept");

    // Back to automatic rooms (spec.rooms removed).
    let patched = twosites
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "rooms": null } })),
        )
        .await
        .expect("remove spec.rooms");
    let generation = patched.metadata.generation.expect("a generation");
    let auto = wait_status(
        "automatic rooms again",
        &twosites,
        &mut controller,
        port,
        Duration::from_secs(15),
        |st| st["observedGeneration"] == generation,
    )
    .await;
    assert!(
        condition_is(&auto, "RoomsResolved", "True", "Resolved"),
        "{auto}"
    );
    assert_eq!(auto["rooms"]["source"], "Automatic", "{auto}");
    assert_eq!(auto["pairs"], paired, "{auto}");

    // Values the schema refuses: the API server answers 422 Invalid naming spec.rooms (what
    // `kubectl apply` prints), and nothing is stored.
    let stored = twosites.get("default").await.expect("get TwoSite default");
    for rooms in [
        json!("room-a"),
        json!(42),
        json!([1, 2]),
        json!({ "a": "room-a" }),
    ] {
        let err = twosites
            .patch(
                "default",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "rooms": rooms } })),
            )
            .await
            .map(|_| ())
            .expect_err("the schema accepted a bad spec.rooms");
        assert_eq!(status_code(&err), Some(422), "spec.rooms {rooms}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("spec.rooms") && text.contains("Invalid"),
            "spec.rooms {rooms}: {text}"
        );
        println!("spec.rooms {rooms}: refused: {text:.160}");
    }
    // The controller may write the status meanwhile (the resourceVersion moves); the spec and
    // its generation must not.
    let after = twosites.get("default").await.expect("get TwoSite default");
    assert_eq!(
        after.metadata.generation, stored.metadata.generation,
        "the stored spec changed"
    );
    assert_eq!(after.data["spec"], stored.data["spec"]);
    assert!(after.data["spec"].get("rooms").is_none(), "{}", after.data);

    assert_up(&mut controller, port);
    let log = controller.log_text();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pairing reconcile failed") || l.contains("panicked"))
        .collect();
    assert!(
        failures.is_empty(),
        "bad input made the controller fail:\n{}",
        failures.join("\n")
    );
    let forbidden = controller.forbidden_lines();
    assert!(forbidden.is_empty(), "{}", forbidden.join("\n"));
    drop(controller);
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}

/// An agent heartbeat Lease as the agent writes it (label, holder, renewTime now), with
/// `annotations`; with `spec: false` a Lease with no spec at all.
fn heartbeat_lease(name: &str, holder: &str, annotations: &[(&str, &str)], spec: bool) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([(
                "twosite.dev/agent-heartbeat".to_string(),
                "true".to_string(),
            )])),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: spec.then(|| LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(8),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..LeaseSpec::default()
        }),
    }
}

/// What the status says of `node`: (phase, waitingFor, verdict).
fn node_state(status: &Value, node: &str) -> (String, String, String) {
    let n = status_node(status, node).cloned().unwrap_or(Value::Null);
    let s = |k: &str| n[k].as_str().unwrap_or("-").to_string();
    (s("phase"), s("waitingFor"), s("verdict"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heartbeat_annotations_are_judged_safely() {
    const TEST: &str = "malformed_heartbeat_annotations_are_judged_safely";
    let t0 = Instant::now();
    let Some((server, admin)) = start(
        TEST,
        &[("a-1", "room-a"), ("a-2", "room-a"), ("b-1", "room-b")],
    )
    .await
    else {
        return;
    };
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let pp = PostParams::default();
    // a-1: renewing (the test renews it every second below), but neither annotation says what
    // the controller wants to read.
    leases
        .create(
            &pp,
            &heartbeat_lease(
                "twosite-agent-a-1",
                "a-1",
                &[
                    ("twosite.dev/renew-failures", "not-a-number"),
                    ("twosite.dev/watchdog", "maybe"),
                    ("twosite.dev/boot-id", "boot-a-1-1"),
                ],
                true,
            ),
        )
        .await
        .expect("create a-1's heartbeat Lease");
    // a-2: a silent agent whose watchdog is not "enabled".
    leases
        .create(
            &pp,
            &heartbeat_lease(
                "twosite-agent-a-2",
                "a-2",
                &[
                    ("twosite.dev/renew-failures", "0"),
                    ("twosite.dev/watchdog", "maybe"),
                    ("twosite.dev/boot-id", "boot-a-2-1"),
                ],
                true,
            ),
        )
        .await
        .expect("create a-2's heartbeat Lease");
    // b-1: a well-formed agent Lease that is never renewed: its agent is gone.
    leases
        .create(
            &pp,
            &heartbeat_lease(
                "twosite-agent-b-1",
                "b-1",
                &[
                    ("twosite.dev/renew-failures", "0"),
                    ("twosite.dev/watchdog", "enabled"),
                    ("twosite.dev/boot-id", "boot-b-1-1"),
                ],
                true,
            ),
        )
        .await
        .expect("create b-1's heartbeat Lease");
    // A Lease with no spec, for a node that does not exist, with garbage annotations.
    leases
        .create(
            &pp,
            &heartbeat_lease(
                "twosite-agent-ghost",
                "ghost",
                &[
                    ("twosite.dev/renew-failures", "-1"),
                    ("twosite.dev/watchdog", ""),
                    ("twosite.dev/boot-id", "\u{1F47B}"),
                ],
                false,
            ),
        )
        .await
        .expect("create the ghost's heartbeat Lease");

    // The test as a-1's agent: a renewal (new renewTime) every second, its annotations as they
    // are.
    let renewer = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
                let patch = json!({ "spec": { "renewTime": now } });
                if let Err(e) = leases
                    .patch(
                        "twosite-agent-a-1",
                        &PatchParams::default(),
                        &Patch::Merge(patch),
                    )
                    .await
                {
                    println!("renew a-1's heartbeat Lease: {e}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let port = apiserver::free_port().expect("a free port");
    let mut controller = Process::controller(&server, "controller-1", port);
    let twosites = twosites(&admin);
    let started = Instant::now();
    wait_ready(&mut controller, port).await;
    let t = HealthTiming::default();

    // b-1 dies (its agent Lease is silent), waits out its fence deadline, and then waits for its
    // partner a-1 to be proven clear, which a-1 never is: its renewals do not say "0" failures.
    let waiting = wait_status(
        "b-1 dead, waiting for its voucher",
        &twosites,
        &mut controller,
        port,
        DEADLINE,
        |st| {
            node_state(st, "b-1")
                == (
                    "FenceWaiting".into(),
                    "VoucherNotClear".into(),
                    "Dead".into(),
                )
        },
    )
    .await;
    let voucher_wait = started.elapsed();
    println!("b-1 is Dead and waits for a voucher {voucher_wait:?} after the start");
    // a-2's agent Lease has been silent even longer than b-1's, past the agent lease (8 s):
    // judged on it, a-2 would be Dead. Its watchdog is not "enabled", so it is judged on its
    // Ready condition: Healthy. a-1 likewise.
    for node in ["a-1", "a-2"] {
        assert_eq!(
            node_state(&waiting, node),
            ("Healthy".into(), "-".into(), "Healthy".into()),
            "{node}: {waiting}"
        );
    }
    assert!(
        status_node(&waiting, "ghost").is_none(),
        "a Lease of no node shows up: {waiting}"
    );
    assert!(
        condition_is(&waiting, "RemediationPaused", "False", "RemediationActive"),
        "{waiting}"
    );

    // Had a-1 been clear, b-1 would have been fenced as soon as its deadline passed (a-1 has
    // renewed every second since before the controller started, longer than the settle time).
    // It stays waiting: no fence marker on its Lease, no taint on its Node.
    let nodes: Api<Node> = Api::all(admin.clone());
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(4) {
        let st = twosite_status(&twosites).await.expect("the status");
        assert_eq!(
            node_state(&st, "b-1"),
            (
                "FenceWaiting".into(),
                "VoucherNotClear".into(),
                "Dead".into()
            ),
            "{st}"
        );
        let lease = leases.get("twosite-agent-b-1").await.expect("b-1's Lease");
        assert!(
            !lease
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key(FENCED_BOOT),
            "b-1 was fenced although its voucher is not clear"
        );
        let b1 = nodes.get("b-1").await.expect("Node b-1");
        assert!(
            b1.spec
                .and_then(|s| s.taints)
                .unwrap_or_default()
                .iter()
                .all(|t| t.key != TAINT_KEY),
            "b-1 was tainted although its voucher is not clear"
        );
        assert_up(&mut controller, port);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The control: a-1's renewals now say 0 failures. It is clear from its next renewal on, and
    // after the settle time (the vouch validity, the watchdog and the fence margin, stretched)
    // b-1 is fenced and tainted.
    leases
        .patch(
            "twosite-agent-a-1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": {
                "twosite.dev/renew-failures": "0"
            } } })),
        )
        .await
        .expect("fix a-1's annotation");
    let fixed_at = Instant::now();
    let settle = stretch(t.vouch_validity + t.watchdog + t.fence_margin, t.drift_ppm);
    let tainted = wait_status(
        "b-1 fenced and tainted once a-1 is clear",
        &twosites,
        &mut controller,
        port,
        settle + Duration::from_secs(10),
        |st| node_state(st, "b-1").0 == "Tainted",
    )
    .await;
    let to_taint = fixed_at.elapsed();
    println!("b-1 tainted {to_taint:?} after a-1's renewals turned clean (settle {settle:?})");
    assert!(
        to_taint >= settle.saturating_sub(Duration::from_secs(1)),
        "b-1 was fenced {to_taint:?} after its voucher turned clear, before the settle time {settle:?}"
    );
    let lease = leases.get("twosite-agent-b-1").await.expect("b-1's Lease");
    assert_eq!(
        lease
            .metadata
            .annotations
            .unwrap_or_default()
            .get(FENCED_BOOT)
            .map(String::as_str),
        Some("boot-b-1-1"),
        "the fence marker on b-1's Lease"
    );
    let b1 = nodes.get("b-1").await.expect("Node b-1");
    assert!(
        b1.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == TAINT_KEY),
        "b-1 carries the out-of-service taint"
    );
    // a-2, silent all along, is still judged on its Ready condition.
    assert_eq!(
        node_state(&tainted, "a-2"),
        ("Healthy".into(), "-".into(), "Healthy".into()),
        "{tainted}"
    );

    renewer.abort();
    assert_up(&mut controller, port);
    let forbidden = controller.forbidden_lines();
    assert!(forbidden.is_empty(), "{}", forbidden.join("\n"));
    drop(controller);
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}
