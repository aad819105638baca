//! The real-API-server tier, the operator's commands: `twosite switchover` and `twosite status`,
//! run as processes with the admin kubeconfig, against two real `twosite guard` processes that
//! share one loop device (each in a mount namespace of its own beside its node's real
//! `twosite-agent`, as in apiserver_volume.rs).
//!
//! The consumer pods are Pod objects in the volume's namespace, labelled
//! `twosite.dev/volume=block-data`, bound to the two nodes and marked Running (the test plays
//! kubelet); each guard's `--identity` is its pod's UID, as the downward API gives it.
//!
//! - `twosite status` and `status --json` show the holder (pod and node), the epoch and both
//!   consumers; with no controller running, they say it has not written a status yet.
//! - `twosite switchover block-demo/block-data` (no `--to`: the other of two consumers) moves
//!   the volume, prints how long it took, exits 0; `--to` back fails it back.
//! - Refused with exit 2, the Lease unchanged: `--to` a pod that is no consumer, a pod that does
//!   not exist, a Lease that does not exist, a malformed NAMESPACE/LEASE. `--to` the holder:
//!   exit 0, nothing to do.
//! - A target whose guard is gone: exit 1 after `--timeout-secs`, saying the holder stood down
//!   and the target did not take the Lease; the preferred holder cleared under a waiting
//!   command: exit 1 at once, "abandoned".
//!
//! Needs root, loop devices, mkfs.xfs and unshare: without them the test fails saying so.

mod common;

use common::agents::agent_files;
use common::volume::{
    Consumer, LoopDevice, apply_example, guard_options, require_root_and_tools, start_agents,
    two_nodes,
};
use common::{AGENT_BIN, CONTROLLER_BIN, Setup, binary, wait_for};
use e2e::apiserver;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const NS: &str = "block-demo";
const LEASE: &str = "block-data";
const GUARD_SA: &str = "block-guard";
const PREFERRED: &str = "twosite.dev/preferred-holder";

/// A pod bound to `node`, Running (the test plays its kubelet); its UID.
async fn running_pod(pods: &Api<Pod>, name: &str, node: &str, volume: Option<&str>) -> String {
    let labels = match volume {
        Some(v) => json!({ "app": "block-demo", "twosite.dev/volume": v }),
        None => json!({ "app": "web" }),
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": NS, "labels": labels },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "app", "image": "debian:bookworm-slim" }]
        }
    }))
    .expect("a Pod");
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "phase": "Running" } })),
    )
    .await
    .unwrap_or_else(|e| panic!("mark pod {name} Running: {e}"));
    created.metadata.uid.expect("a created pod has a UID")
}

/// One run of the `twosite` binary with the admin kubeconfig.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn twosite(kubeconfig: &Path, args: &[&str]) -> Run {
    let t = Instant::now();
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(binary("twosite"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .output()
    })
    .expect("twosite runs");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t.elapsed(),
    };
    println!(
        "$ twosite {} -> exit {} in {} ms\n{}{}",
        args.join(" "),
        run.code,
        run.took.as_millis(),
        run.stdout,
        run.stderr
    );
    run
}

async fn holder_and_preferred(leases: &Api<Lease>) -> (Option<String>, i32, Option<String>) {
    let lease = leases.get(LEASE).await.expect("the Lease");
    let preferred = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREFERRED).cloned());
    let spec = lease.spec.unwrap_or_default();
    (
        spec.holder_identity.filter(|h| !h.is_empty()),
        spec.lease_transitions.unwrap_or(0),
        preferred,
    )
}

async fn wait_ready(c: &Consumer, what: &str, timeout: Duration) {
    wait_for(what, timeout, || async {
        if c.ready() {
            Ok(())
        } else {
            Err(format!("{} not ready", c.who))
        }
    })
    .await;
}

/// `switched block-demo/block-data to <pod> (uid <uid>) in <s> s, epoch <n>`: (seconds, epoch).
fn switched(run: &Run, pod: &str, uid: &str) -> (f64, i32) {
    let prefix = format!("switched {NS}/{LEASE} to {pod} (uid {uid}) in ");
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{}", run.stdout));
    let (secs, epoch) = line.split_once(" s, epoch ").expect("`<s> s, epoch <n>`");
    (
        secs.parse().expect("seconds"),
        epoch.trim().parse().expect("an epoch"),
    )
}

fn status_json(kubeconfig: &Path) -> Value {
    let run = twosite(kubeconfig, &["status", "--json"]);
    assert_eq!(run.code, 0, "status --json: {}", run.stderr);
    serde_json::from_str(&run.stdout).expect("status --json prints one JSON object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_status_commands_drive_and_show_two_real_guards() {
    let test = "switchover_and_status_commands_drive_and_show_two_real_guards";
    let nodes = two_nodes();
    let options = guard_options(NS, GUARD_SA);
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options,
        rbac: &["rbac-agent.yaml"],
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
        false,
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let uid_a = running_pod(&pods, "block-a", "a-1", Some(LEASE)).await;
    let uid_b = running_pod(&pods, "block-b", "b-1", Some(LEASE)).await;
    running_pod(&pods, "web", "a-1", None).await;
    let kubeconfig = server.admin_kubeconfig().to_path_buf();
    let guard_kubeconfig = server
        .service_account_kubeconfig(NS, GUARD_SA)
        .expect("the guard's kubeconfig")
        .to_path_buf();

    // Before any guard: the volume is listed, released, with its two consumers.
    let run = twosite(&kubeconfig, &["status"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for want in [
        "controller has not written a status yet",
        "Volumes (1)",
        "block-demo/block-data",
        "Holder:       nobody (released)",
    ] {
        assert!(run.stdout.contains(want), "{want:?} in:\n{}", run.stdout);
    }

    // The two nodes' agents and the guards, as apiserver_volume.rs runs them.
    let _agents = start_agents(&server, &nodes).await;
    let (files_a, files_b) = (agent_files(&server, "a-1"), agent_files(&server, "b-1"));
    let disk = LoopDevice::new(320);
    let mut a = Consumer::new(&server, "a", apiserver::free_port().expect("port"));
    let mut b = Consumer::new(&server, "b", apiserver::free_port().expect("port"));
    a.identity = uid_a.clone();
    b.identity = uid_b.clone();
    let start = |c: &mut Consumer, socket: &Path| {
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
    start(&mut a, &files_a.guard_socket);
    wait_ready(&a, "a becomes active", Duration::from_secs(30)).await;
    start(&mut b, &files_b.guard_socket);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!b.ready() && !b.mounted(), "b stays standby while a holds");
    let (_, epoch_a, _) = holder_and_preferred(&leases).await;

    // status shows the holder by pod and node, the epoch, and both consumers.
    let run = twosite(&kubeconfig, &["status"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for want in [
        format!("Holder:       block-a on a-1 (uid {uid_a})"),
        format!("Epoch:        {epoch_a}"),
        "Last switch:  ".to_string(),
        format!("block-a  a-1   holder   Running  {uid_a}"),
        format!("block-b  b-1   standby  Running  {uid_b}"),
    ] {
        assert!(run.stdout.contains(&want), "{want:?} in:\n{}", run.stdout);
    }
    assert!(
        !run.stdout.contains("web"),
        "web is no consumer:\n{}",
        run.stdout
    );

    // Refusals: exit 2, nothing written.
    let before = leases.get(LEASE).await.expect("the Lease");
    let before_annotations = before.metadata.annotations.clone();
    for (args, says) in [
        (
            vec!["switchover", "block-demo/block-data", "--to", "web"],
            "pod web is not a consumer of the volume Lease block-demo/block-data",
        ),
        (
            vec!["switchover", "block-demo/block-data", "--to", "ghost"],
            "there is no pod ghost in namespace block-demo",
        ),
        (
            vec!["switchover", "block-demo/nothing-here"],
            "there is no Lease nothing-here in namespace block-demo",
        ),
        (vec!["switchover", "block-data"], "is not NAMESPACE/LEASE"),
        (
            vec!["switchover", "block-demo/Block_Data"],
            "is not a valid Lease name",
        ),
    ] {
        let run = twosite(&kubeconfig, &args);
        assert_eq!(run.code, 2, "{args:?} is refused with exit 2");
        assert!(run.stderr.contains(says), "{says:?} in {:?}", run.stderr);
    }
    let run = twosite(
        &kubeconfig,
        &["switchover", "block-demo/block-data", "--to", "block-a"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("block-a holds block-demo/block-data already")
    );
    let after = leases.get(LEASE).await.expect("the Lease");
    assert_eq!(
        after.metadata.annotations, before_annotations,
        "no annotation written"
    );
    assert_eq!(
        after.spec.as_ref().and_then(|s| s.holder_identity.clone()),
        Some(uid_a.clone())
    );
    assert!(
        a.ready() && a.mounted() && !b.mounted(),
        "refusals moved nothing"
    );

    // The switchover: no --to, the other of the two consumers.
    let run = twosite(&kubeconfig, &["switchover", "block-demo/block-data"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (secs, epoch_b) = switched(&run, "block-b", &uid_b);
    println!(
        "switchover_s {secs:.2} (the command ran {} ms)",
        run.took.as_millis()
    );
    assert!(secs < 5.0, "a planned switchover takes under 5 s: {secs}");
    assert!(epoch_b > epoch_a, "a new holder raises the epoch");
    let (holder, epoch, preferred) = holder_and_preferred(&leases).await;
    assert_eq!((holder.as_deref(), epoch), (Some(uid_b.as_str()), epoch_b));
    assert_eq!(preferred.as_deref(), Some(uid_b.as_str()));
    wait_ready(&b, "b runs the app", Duration::from_secs(10)).await;
    assert!(!a.ready() && !a.mounted(), "a stepped down and unmounted");
    assert!(
        b.read_log().contains("a 0\n"),
        "a's writes are on the device after the switch"
    );

    // status --json: the same content for scripts.
    let j = status_json(&kubeconfig);
    assert_eq!(j["cluster"], Value::Null);
    assert_eq!(j["clusterNote"], "controller has not written a status yet");
    let v = &j["volumes"][0];
    assert_eq!(
        (v["namespace"].as_str(), v["name"].as_str()),
        (Some(NS), Some(LEASE))
    );
    assert_eq!(v["holder"]["pod"], "block-b");
    assert_eq!(v["holder"]["node"], "b-1");
    assert_eq!(v["holder"]["identity"], uid_b.as_str());
    assert_eq!(v["epoch"], epoch_b);
    assert!(v["lastSwitch"].is_string() && v["lastSwitchSecondsAgo"].as_i64() < Some(30));
    assert_eq!(v["preferredHolder"]["pod"], "block-b");
    let consumers: Vec<(String, bool, String)> = v["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .map(|c| {
            (
                c["pod"].as_str().unwrap_or_default().to_string(),
                c["holder"].as_bool().unwrap_or_default(),
                c["node"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        consumers,
        vec![
            ("block-a".to_string(), false, "a-1".to_string()),
            ("block-b".to_string(), true, "b-1".to_string()),
        ]
    );

    // Failback with --to.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = twosite(
        &kubeconfig,
        &["switchover", "block-demo/block-data", "--to", "block-a"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (failback_secs, epoch_a2) = switched(&run, "block-a", &uid_a);
    println!("failback_s {failback_secs:.2}");
    assert!(epoch_a2 > epoch_b);
    wait_ready(&a, "a runs the app again", Duration::from_secs(10)).await;
    assert!(
        a.read_log().contains("b 0\n"),
        "b's writes survive the failback"
    );
    let run = twosite(&kubeconfig, &["status"]);
    assert!(
        run.stdout
            .contains(&format!("Holder:       block-a on a-1 (uid {uid_a})")),
        "{}",
        run.stdout
    );

    // A target whose guard is gone: the holder stands down, nobody takes over; exit 1.
    b.kill_all();
    let run = twosite(
        &kubeconfig,
        &["switchover", "block-demo/block-data", "--timeout-secs", "3"],
    );
    assert_eq!(run.code, 1, "a switchover that does not finish exits 1");
    assert!(
        run.stderr
            .contains("the switch to block-b did not finish within 3s"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("but block-b has not taken it"),
        "a stood down, b's guard is gone: {}",
        run.stderr
    );
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);
    let (_, _, preferred) = holder_and_preferred(&leases).await;
    assert_eq!(
        preferred.as_deref(),
        Some(uid_b.as_str()),
        "left set, as the message says"
    );

    // Someone (the controller, when the target cannot take the volume) clears the preferred
    // holder while the command waits: it stops at once, exit 1, and says so.
    let t = Instant::now();
    let child = std::process::Command::new(binary("twosite"))
        .args(["switchover", "block-demo/block-data", "--to", "block-b"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("twosite runs");
    tokio::time::sleep(Duration::from_secs(2)).await;
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { PREFERRED: null } } })),
        )
        .await
        .expect("clear the preferred holder");
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("it exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "$ twosite switchover block-demo/block-data --to block-b (preferred holder cleared after 2 s) -> {} in {} ms\n{}{stderr}",
        out.status,
        t.elapsed().as_millis(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr
            .contains("the switchover to block-b was abandoned: the preferred holder was cleared"),
        "{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "it stops at once, not at the timeout"
    );
}
