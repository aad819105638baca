//! The real-API-server tier, RWX block volumes: two real `twosite guard` processes share one
//! loop device, standing in for two nodes (each guard in a mount namespace of its own, beside
//! its node's real `twosite-agent`), with the Lease and RBAC of `examples/block-active-standby.yaml`
//! on a real kube-apiserver. Each guard's app writes to the device every 100 ms and records, off
//! the device, the boot-clock time of every write.
//!
//! - The empty device is formatted once (by the first active guard); the standby never mounts
//!   while the active holds; a planned switchover (the preferred-holder annotation) moves the
//!   app, and the lines written before are on the device after it; failback works.
//! - The active guard is frozen (SIGSTOP) while its app keeps writing. The test plays a-1's
//!   watchdog: when the agent stops feeding it for the watchdog timeout, every process of "node"
//!   a-1 is killed. The standby's guard must not mount before that: the two apps' write times
//!   never interleave (overlap 0 ms). Prints the switchover, failback and takeover times.
//! - The real `twosite controller` runs beside them (deploy/ RBAC): the role label
//!   `twosite.dev/role=active` is on the holder's pod only and follows every switch, the TwoSite
//!   status lists the volume with its holder and epoch, the planned switch is reported as a
//!   `VolumeSwitchover` Event on the Lease, and the controller clears the done switchover's
//!   preferred holder (so the later takeover by expiry is not pulled back).
//!
//! Needs root, loop devices, mkfs.xfs and unshare: without them the test fails saying so.

mod common;

use common::agents::{agent_files, play_kubelets};
use common::volume::{
    Consumer, LoopDevice, apply_example, guard_options, overlap_ms, require_root_and_tools,
    start_agents, two_nodes, watchdog_fires,
};
use common::{AGENT_BIN, CONTROLLER_BIN, Process, Setup, twosite_status, twosites, wait_for};
use e2e::apiserver;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "block-demo";
const LEASE: &str = "block-data";
const GUARD_SA: &str = "block-guard";
const PREFERRED: &str = "twosite.dev/preferred-holder";

async fn prefer(leases: &Api<Lease>, who: &str) {
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { PREFERRED: who } } })),
        )
        .await
        .expect("set the preferred holder");
}

/// A consumer pod as the scheduler leaves it (no kubelet runs it here: the test runs its guard),
/// labelled for the volume; returns its UID, the guard's identity.
async fn consumer_pod(pods: &Api<Pod>, name: &str, node: &str) -> String {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "twosite.dev/volume": LEASE } },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }]
        }
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the consumer pod")
        .metadata
        .uid
        .expect("a UID")
}

/// Waits until the role label is on `active` only.
async fn wait_role(pods: &Api<Pod>, active: &str, other: &str) {
    wait_for(
        &format!("the role label on {active} only"),
        Duration::from_secs(15),
        || async {
            let label = |p: Pod| {
                p.metadata
                    .labels
                    .and_then(|l| l.get("twosite.dev/role").cloned())
            };
            let a = pods.get(active).await.map_err(|e| e.to_string())?;
            // The other pod may be gone: the controller deletes a fenced node's pods.
            let o = pods.get_opt(other).await.map_err(|e| e.to_string())?;
            match (label(a), o.and_then(label)) {
                (Some(v), None) if v == "active" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

async fn wait_ready(c: &Consumer, what: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    wait_for(what, timeout, || async {
        if c.ready() {
            Ok(())
        } else {
            Err(format!("{} not ready", c.who))
        }
    })
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guards_switch_over_fail_back_and_a_frozen_holder_is_fenced_before_takeover() {
    let test = "two_guards_switch_over_fail_back_and_a_frozen_holder_is_fenced_before_takeover";
    let nodes = two_nodes();
    let options = guard_options(NS, GUARD_SA);
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options,
        rbac: &["rbac-controller.yaml", "rbac-agent.yaml"],
        nodes: &nodes,
    };
    let Some((server, admin)) = common::start(test, setup).await else {
        return;
    };
    require_root_and_tools();
    apply_example(
        &admin,
        "block-active-standby.yaml",
        &[
            "Namespace",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Lease",
        ],
        true,
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    let guard_kubeconfig = server
        .service_account_kubeconfig(NS, GUARD_SA)
        .expect("the guard's kubeconfig")
        .to_path_buf();

    let alive = Arc::new(Mutex::new(
        nodes
            .iter()
            .map(|n| n.name.clone())
            .collect::<BTreeSet<_>>(),
    ));
    let _kubelets = play_kubelets(&admin, Arc::clone(&alive));
    let admin_port = apiserver::free_port().expect("a free port");
    let _controller = Process::controller(&server, "controller-1", admin_port);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let uid_a = consumer_pod(&pods, "block-a", "a-1").await;
    let uid_b = consumer_pod(&pods, "block-b", "b-1").await;

    // The two nodes' agents, with test watchdogs; the guards arm deadlines with them.
    let mut agents = start_agents(&server, &nodes).await;
    let (files_a, files_b) = (agent_files(&server, "a-1"), agent_files(&server, "b-1"));

    let disk = LoopDevice::new(320);
    let mut a = Consumer::new(&server, "a", apiserver::free_port().expect("port"));
    let mut b = Consumer::new(&server, "b", apiserver::free_port().expect("port"));
    a.identity = uid_a.clone();
    b.identity = uid_b.clone();
    let start = |c: &mut Consumer, socket: &std::path::Path| {
        c.start(
            &server,
            &guard_kubeconfig,
            NS,
            LEASE,
            &disk.dev,
            "xfs",
            socket,
        )
    };

    // a takes the free Lease, formats the empty device and runs its app.
    start(&mut a, &files_a.guard_socket);
    wait_ready(&a, "a becomes active", Duration::from_secs(30)).await;
    let log_a = a.guard.as_ref().map(|g| g.log_text()).unwrap_or_default();
    assert!(
        log_a.contains("prepared=Formatted"),
        "a formatted the empty device:\n{log_a}"
    );

    wait_role(&pods, "block-a", "block-b").await;
    let ts = twosites(&admin);
    wait_for(
        "the volume in the TwoSite status",
        Duration::from_secs(20),
        || async {
            let status = twosite_status(&ts).await?;
            let v = &status["volumes"][0];
            if v["name"] == LEASE && v["holderPod"] == "block-a" && v["epoch"] == 1 {
                Ok(())
            } else {
                Err(format!("{}", status["volumes"]))
            }
        },
    )
    .await;

    // b stays standby: attached, nothing mounted, not ready.
    start(&mut b, &files_b.guard_socket);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !b.ready() && !b.mounted(),
        "b must stay standby while a holds"
    );
    assert!(a.ready() && a.mounted());

    // Planned switchover to b.
    let t = Instant::now();
    prefer(&leases, &b.identity).await;
    let switchover = wait_ready(&b, "switchover to b", Duration::from_secs(30)).await;
    println!("switchover_ms {}", switchover.as_millis());
    assert!(!a.ready() && !a.mounted(), "a stepped down and unmounted");
    let on_device = b.read_log();
    assert!(
        on_device.contains("a 0\n"),
        "a's lines are on the device after the switchover"
    );
    let log_b = b.guard.as_ref().map(|g| g.log_text()).unwrap_or_default();
    assert!(log_b.contains("prepared=Existing") && !log_b.contains("prepared=Formatted"));
    let _ = t;

    wait_role(&pods, "block-b", "block-a").await;
    let events: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
            "events",
        ),
    );
    wait_for(
        "a VolumeSwitchover Event on the Lease",
        Duration::from_secs(15),
        || async {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.data["reason"] == "VolumeSwitchover" && e.data["regarding"]["name"] == LEASE
                })
                .map(|_| ())
                .ok_or_else(|| format!("{} events, none VolumeSwitchover", list.items.len()))
        },
    )
    .await;
    wait_for(
        "the controller clears the done switchover's preference",
        Duration::from_secs(15),
        || async {
            let l = leases.get(LEASE).await.map_err(|e| e.to_string())?;
            match l
                .metadata
                .annotations
                .and_then(|a| a.get(PREFERRED).cloned())
            {
                None => Ok(()),
                Some(p) => Err(p),
            }
        },
    )
    .await;

    // Failback to a.
    tokio::time::sleep(Duration::from_secs(1)).await;
    prefer(&leases, &a.identity).await;
    let failback = wait_ready(&a, "failback to a", Duration::from_secs(30)).await;
    println!("failback_ms {}", failback.as_millis());
    assert!(
        a.read_log().contains("b 0\n"),
        "b's lines survive the failback"
    );
    assert!(!b.mounted());
    wait_role(&pods, "block-a", "block-b").await;

    // a's guard freezes; its app keeps writing. The test is a-1's watchdog.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = a.pid().expect("a's guard") as i32;
    let frozen = Instant::now();
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let fired = watchdog_fires(
        &files_a.watchdog,
        Duration::from_secs(5),
        Duration::from_secs(40),
    )
    .await
    .expect("a-1's agent stopped feeding its watchdog before the deadline passed");
    println!(
        "a-1 reset {} ms after the freeze",
        (fired - frozen).as_millis()
    );
    assert!(!b.mounted(), "b mounted before a-1 was reset");
    a.kill_all();
    agents[0].kill();
    if let Ok(mut alive) = alive.lock() {
        alive.remove("a-1");
    }
    let takeover = wait_ready(&b, "b takes over", Duration::from_secs(40)).await;
    println!(
        "takeover_ms {} (from the freeze)",
        (frozen.elapsed()).as_millis()
    );
    let _ = takeover;

    wait_role(&pods, "block-b", "block-a").await;
    let overlap = overlap_ms(&a.write_times(), &b.write_times());
    println!(
        "writes: a {}, b {}; overlap_ms {overlap}",
        a.write_times().len(),
        b.write_times().len()
    );
    assert_eq!(overlap, 0.0, "two writers at once");
    let lease = leases.get(LEASE).await.expect("the Lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some(b.identity.as_str()));
    // Three takes: a, b, a, then b: four holders, each with a higher epoch.
    assert!(spec.lease_transitions.unwrap_or(0) >= 4, "{spec:?}");

    // b steps down on SIGTERM: app stopped, device unmounted, Lease released, exit 0.
    let guard_b = b.guard.as_mut().expect("b's guard");
    // SAFETY: signals our own child.
    unsafe { libc::kill(guard_b.child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| guard_b.child.wait()).expect("b exits");
    assert!(
        status.success(),
        "b's guard exits 0 after stepping down: {status}"
    );
    let spec = leases
        .get(LEASE)
        .await
        .expect("the Lease")
        .spec
        .expect("spec");
    assert_eq!(spec.holder_identity, None, "released");
}
