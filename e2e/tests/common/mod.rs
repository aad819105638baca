//! What the real-API-server tests share: kube clients from the fixture's kubeconfigs, what
//! `kubectl create -f deploy/...` does, the test playing kubelet (Nodes, their Ready condition,
//! kubelet Leases), and our binaries run as processes that are killed on drop.
//!
//! Each test file includes this module and uses part of it.
#![allow(dead_code)]

pub mod agents;
pub mod proxy;
pub mod volume;

use e2e::apiserver::{self, ApiServer};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Deserialize as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NAMESPACE: &str = "twosite-system";

pub async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to client config");
    Client::try_from(config).expect("build the client")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// `<target dir>/<profile>/<name>`: the test executable is `<target dir>/<profile>/deps/<test>`.
/// `TWOSITE_BIN_DIR` overrides the directory.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("TWOSITE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in <target>/<profile>/deps");
    profile_dir.join(name)
}

/// The binaries a test runs, when all are built; otherwise a skip (or, with
/// `TWOSITE_REQUIRE_APISERVER=1`, a failure) saying how to build them.
pub fn binaries_or_skip(test: &str, names: &[(&str, &str)]) -> Option<Vec<PathBuf>> {
    let mut found = Vec::new();
    for (name, package) in names {
        let bin = binary(name);
        if !bin.is_file() {
            let why = format!(
                "{} not found: build it with `cargo build -p {package} --bin {name}` (same CARGO_TARGET_DIR)",
                bin.display()
            );
            assert!(!apiserver::required(), "{why}");
            println!("{test}: skipped: {why}");
            return None;
        }
        found.push(bin);
    }
    Some(found)
}

/// Every document of a multi-document YAML file, as JSON values.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// Creates one object of a YAML document with `client` (server-side dry run if `dry_run`), for
/// the kinds deploy/ and examples/ use (their plural is the lower-case kind plus "s").
pub async fn create_doc(client: &Client, doc: &Value, dry_run: bool) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let kind = doc["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", kind.to_lowercase()));
    let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("a Kubernetes object");
    let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let params = PostParams {
        dry_run,
        ..PostParams::default()
    };
    api.create(&params, &obj)
        .await
        .map(|_| ())
        .map_err(|e| format!("{kind} {:?}: {e}", obj.metadata.name))
}

/// Create every object of a deploy/ file with `client` (the admin): what `kubectl create -f`
/// does.
pub async fn create_all(client: &Client, path: &Path) {
    for doc in yaml_documents(path) {
        create_doc(client, &doc, false)
            .await
            .unwrap_or_else(|e| panic!("create from {}: {e}", path.display()));
    }
}

pub fn twosite_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("twosite.dev", "v1alpha1", "TwoSite"),
        "twosites",
    )
}

pub fn twosites(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &twosite_resource())
}

async fn wait_crd_established(client: &Client) {
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let crd = crds.get("twosites.twosite.dev").await.expect("get the CRD");
        let established = crd.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            });
        if established {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the TwoSite CRD is not Established: {:?}",
            crd.data["status"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What `kubectl apply -f deploy/` sets up besides the workloads: the namespace, the CRD and the
/// RBAC of the given deploy/ files (e.g. `rbac-controller.yaml`).
pub async fn install(admin: &Client, rbac_files: &[&str]) {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create the twosite-system namespace");
    let deploy = workspace_root().join("deploy");
    create_all(admin, &deploy.join("crd.yaml")).await;
    for file in rbac_files {
        create_all(admin, &deploy.join(file)).await;
    }
    wait_crd_established(admin).await;
}

/// A worker Node as a kubelet registers it.
#[derive(Debug, Clone)]
pub struct TestNode {
    pub name: String,
    pub zone: String,
    /// Its InternalIP (a loopback address, so agents of several nodes can share the machine).
    pub address: String,
}

impl TestNode {
    pub fn new(name: &str, zone: &str, address: &str) -> TestNode {
        TestNode {
            name: name.into(),
            zone: zone.into(),
            address: address.into(),
        }
    }
}

fn ready_condition(ready: bool) -> NodeCondition {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    NodeCondition {
        type_: "Ready".into(),
        status: if ready { "True" } else { "Unknown" }.into(),
        reason: Some(
            if ready {
                "KubeletReady"
            } else {
                "NodeStatusUnknown"
            }
            .into(),
        ),
        message: Some("the test plays kubelet".into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Creates `node` (zone label, InternalIP, Ready, boot ID `boot-<name>-1`).
pub async fn create_node(nodes: &Api<Node>, node: &TestNode) {
    let name = node.name.as_str();
    let obj = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                ("topology.kubernetes.io/zone".to_string(), node.zone.clone()),
                ("kubernetes.io/hostname".to_string(), name.to_string()),
            ])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    nodes
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create Node {name}: {e}"));
    let status = NodeStatus {
        conditions: Some(vec![ready_condition(true)]),
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: node.address.clone(),
        }]),
        node_info: Some(NodeSystemInfo {
            boot_id: format!("boot-{name}-1"),
            machine_id: format!("machine-{name}"),
            system_uuid: format!("uuid-{name}"),
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            container_runtime_version: "fake://1".into(),
            kernel_version: "6.1.0".into(),
            kube_proxy_version: "v1.20.2".into(),
            kubelet_version: "v1.20.2".into(),
            os_image: "Debian GNU/Linux 12".into(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    };
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap_or_else(|e| panic!("set Node {name}'s status: {e}"));
}

/// What the kubelet reports after a (re)boot: Ready with `boot_id`, or not Ready.
pub async fn set_node_state(nodes: &Api<Node>, name: &str, ready: bool, boot_id: Option<&str>) {
    let mut status = json!({ "conditions": [ready_condition(ready)] });
    if let Some(boot) = boot_id {
        status["nodeInfo"] = json!({ "bootID": boot });
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "status": status })),
        )
        .await
        .unwrap_or_else(|e| panic!("set Node {name}'s state: {e}"));
}

/// Creates or renews `node`'s kubelet Lease in `kube-node-lease` (40 s, as the kubelet's).
pub async fn renew_kubelet_lease(leases: &Api<Lease>, node: &str) {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let spec = LeaseSpec {
        holder_identity: Some(node.into()),
        lease_duration_seconds: Some(40),
        renew_time: Some(now),
        ..LeaseSpec::default()
    };
    match leases.get_opt(node).await {
        Ok(Some(mut lease)) => {
            lease.spec = Some(spec);
            if let Err(e) = leases.replace(node, &PostParams::default(), &lease).await {
                println!("renew kubelet Lease {node}: {e}");
            }
        }
        Ok(None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            if let Err(e) = leases.create(&PostParams::default(), &lease).await {
                println!("create kubelet Lease {node}: {e}");
            }
        }
        Err(e) => println!("get kubelet Lease {node}: {e}"),
    }
}

/// One of our binaries as a process, its output in a log file; killed (SIGKILL) on drop, also
/// when the test panics.
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `bin args...` with `KUBECONFIG=kubeconfig` and `RUST_LOG=info`, logging to
    /// `<server dir>/<name>.log`.
    pub fn start(
        server: &ApiServer,
        name: &str,
        bin: &Path,
        kubeconfig: &Path,
        args: &[String],
    ) -> Process {
        let log = server.dir().join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("create the process's log");
        let child = Command::new(bin)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("NODE_NAME")
            .env_remove("NODE_ZONE")
            .env_remove("CLUSTER_NAME")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup the log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        Process {
            name: name.into(),
            child,
            log,
        }
    }

    /// The controller, as its ServiceAccount, with `identity` and its admin port.
    pub fn controller(server: &ApiServer, identity: &str, admin_port: u16) -> Process {
        let kubeconfig = server
            .service_account_kubeconfig(apiserver::CONTROLLER_SA.0, apiserver::CONTROLLER_SA.1)
            .expect("the controller's kubeconfig")
            .to_path_buf();
        let args: Vec<String> = [
            "controller",
            "--identity",
            identity,
            "--namespace",
            NAMESPACE,
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Process::start(server, identity, &binary("twosite"), &kubeconfig, &args)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines of the log that show the API server refusing the process (RBAC).
    pub fn forbidden_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("forbidden") || l.contains("Forbidden") || l.contains(" 403"))
            .map(str::to_string)
            .collect()
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(exit)) = self.child.try_wait() {
            panic!(
                "{} exited with {exit}\n--- its log ---\n{}",
                self.name,
                self.log_tail(60)
            );
        }
    }

    /// SIGKILL: a crash, or the node losing power.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP GET on 127.0.0.1:`port`: the status code and body, or `None` while it does not
/// answer.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let code = raw
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// GET `path` on an admin port: the status code, or `None` while it does not answer.
pub fn admin_get(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(code, _)| code)
}

/// The value of an unlabelled metric (`twosite_<name>`, with or without `_total`) on an admin
/// port's /metrics.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let (code, body) = http_get(port, "/metrics")?;
    if code != 200 {
        return None;
    }
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        let key = key.strip_suffix("_total").unwrap_or(key);
        (key == name || key == format!("twosite_{name}")).then(|| value.trim().parse().ok())?
    })
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after `timeout` with what
/// `describe` says of the last state.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                if start.elapsed() > timeout {
                    panic!("{what}: not within {timeout:?}; last: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// Helpers of apiserver_leader.rs and apiserver_invalid_input.rs.

impl Process {
    /// The controller under any identity the fixture knows (`kubeconfig`, e.g. one without the
    /// controller's RBAC), with `identity` in the leader Lease and its admin port.
    pub fn controller_with_kubeconfig(
        server: &ApiServer,
        kubeconfig: &Path,
        identity: &str,
        admin_port: u16,
    ) -> Process {
        let args: Vec<String> = [
            "controller",
            "--identity",
            identity,
            "--namespace",
            NAMESPACE,
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Process::start(server, identity, &binary("twosite"), kubeconfig, &args)
    }
}

/// The value of one exact series on an admin port's /metrics, labels included, e.g.
/// `twosite_leader_election_errors_total{error="forbidden"}`; `None` when the port does not
/// answer or the series is not there.
pub fn metric_series(port: u16, series: &str) -> Option<f64> {
    let (code, body) = http_get(port, "/metrics")?;
    if code != 200 {
        return None;
    }
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == series).then(|| value.trim().parse().ok())?
    })
}

/// The holder of Lease `name` (`None`: no Lease, or no holder), and its `leaseTransitions`.
pub async fn lease_holder(
    leases: &Api<Lease>,
    name: &str,
) -> Result<(Option<String>, i32), String> {
    let lease = leases
        .get_opt(name)
        .await
        .map_err(|e| format!("get Lease {name}: {e}"))?;
    let spec = lease.and_then(|l| l.spec);
    Ok((
        spec.as_ref().and_then(|s| s.holder_identity.clone()),
        spec.and_then(|s| s.lease_transitions).unwrap_or(0),
    ))
}

/// The `default` TwoSite's status (`Null` while it has none), or why it could not be read.
pub async fn twosite_status(twosites: &Api<DynamicObject>) -> Result<Value, String> {
    match twosites.get_opt("default").await {
        Ok(Some(ts)) => Ok(ts.data["status"].clone()),
        Ok(None) => Err("no TwoSite default".into()),
        Err(e) => Err(format!("get TwoSite default: {e}")),
    }
}

/// Condition `type_` of a TwoSite status.
pub fn status_condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// The entry of `node` in a TwoSite status's `nodes`.
pub fn status_node<'a>(status: &'a Value, node: &str) -> Option<&'a Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
}

/// What a test needs started.
pub struct Setup<'a> {
    /// Our binaries it runs: (binary, package).
    pub binaries: &'a [(&'a str, &'a str)],
    pub options: e2e::apiserver::Options,
    /// The deploy/ RBAC files to install besides the namespace and the CRD.
    pub rbac: &'a [&'a str],
    pub nodes: &'a [TestNode],
}

/// Checks the binaries, starts the API server, installs the namespace, the CRD and the RBAC,
/// and creates the nodes: the server and an admin client, or `None` when the test is skipped
/// (printed; with `TWOSITE_REQUIRE_APISERVER=1` a missing binary fails instead).
pub async fn start(test: &str, setup: Setup<'_>) -> Option<(ApiServer, Client)> {
    let t0 = Instant::now();
    binaries_or_skip(test, setup.binaries)?;
    let server = apiserver::require_or_skip(test, setup.options)?;
    println!(
        "kube-apiserver ready at {} in {:?}",
        server.url(),
        t0.elapsed()
    );
    let admin = client(server.admin_kubeconfig()).await;
    install(&admin, setup.rbac).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for node in setup.nodes {
        create_node(&nodes, node).await;
    }
    Some((server, admin))
}

/// Workers `(name, zone)` on 127.0.0.1.
pub fn workers(nodes: &[(&str, &str)]) -> Vec<TestNode> {
    nodes
        .iter()
        .map(|(name, zone)| TestNode::new(name, zone, "127.0.0.1"))
        .collect()
}

pub const CONTROLLER_BIN: (&str, &str) = ("twosite", "twosite-controller");
pub const AGENT_BIN: (&str, &str) = ("twosite-agent", "twosite-node-health");
