//! The node agents and kubelets of the real-API-server tests: the real `twosite-agent` with a
//! test watchdog file, the test renewing kubelet Leases, and reading a Node's taints.

use super::{NAMESPACE, Process, TestNode, renew_kubelet_lease};
use e2e::apiserver::{self, ApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Client;
use kube::api::Api;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The test as kubelet: renews the kubelet Lease of every node in `alive` every 2 s.
pub fn play_kubelets(
    admin: &Client,
    alive: Arc<Mutex<BTreeSet<String>>>,
) -> tokio::task::JoinHandle<()> {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "kube-node-lease");
    tokio::spawn(async move {
        loop {
            let names: Vec<String> = alive
                .lock()
                .map(|a| a.iter().cloned().collect())
                .unwrap_or_default();
            for name in names {
                renew_kubelet_lease(&leases, &name).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

pub struct AgentFiles {
    pub boot_id: PathBuf,
    pub watchdog: PathBuf,
    /// The node's own state file (the default under /run would be shared by every test node).
    pub state: PathBuf,
    /// The node's guard socket and deadline file (the defaults under /run are shared too).
    pub guard_socket: PathBuf,
    pub deadlines: PathBuf,
}

pub fn agent_files(server: &ApiServer, node: &str) -> AgentFiles {
    AgentFiles {
        boot_id: server.dir().join(format!("{node}.boot_id")),
        watchdog: server.dir().join(format!("{node}.watchdog")),
        state: server.dir().join(format!("{node}.state.json")),
        guard_socket: server.dir().join(format!("{node}.guard.sock")),
        deadlines: server.dir().join(format!("{node}.deadlines.json")),
    }
}

/// The cluster's peer key, as the Secret twosite-peer-key would hold it (the same for every
/// agent of a test, in `<server dir>/peer-key`).
pub fn cluster_key_dir(server: &ApiServer) -> PathBuf {
    let dir = server.dir().join("peer-key");
    if !dir.join("current").exists() {
        std::fs::create_dir_all(&dir).expect("create the peer key dir");
        std::fs::write(
            dir.join("current"),
            "the test cluster's peer key, 32 bytes or more\n",
        )
        .expect("write the peer key");
    }
    dir
}

/// What else an agent of a test is started with.
#[derive(Default)]
pub struct AgentOptions {
    /// Another kubeconfig than the agent ServiceAccount's (one through a cuttable proxy).
    pub kubeconfig: Option<PathBuf>,
    /// Another key directory than [`cluster_key_dir`].
    pub key_dir: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

/// Starts `node`'s agent after writing its boot ID file; the watchdog file is emptied.
pub fn start_agent(
    server: &ApiServer,
    node: &TestNode,
    boot: &str,
    peer_port: u16,
    run: u32,
) -> Process {
    start_agent_with(server, node, boot, peer_port, run, AgentOptions::default())
}

/// [`start_agent`] with options.
pub fn start_agent_with(
    server: &ApiServer,
    node: &TestNode,
    boot: &str,
    peer_port: u16,
    run: u32,
    options: AgentOptions,
) -> Process {
    let files = agent_files(server, &node.name);
    std::fs::write(&files.boot_id, format!("{boot}\n")).expect("write the boot ID file");
    std::fs::write(&files.watchdog, b"").expect("reset the watchdog file");
    let kubeconfig = options.kubeconfig.clone().unwrap_or_else(|| {
        server
            .service_account_kubeconfig(apiserver::AGENT_SA.0, apiserver::AGENT_SA.1)
            .expect("the agent's kubeconfig")
            .to_path_buf()
    });
    let insecure = options
        .extra_args
        .iter()
        .any(|a| a == "--insecure-peer-probes");
    let mut args: Vec<String> = vec![
        "--node-name".into(),
        node.name.clone(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--peer-addr".into(),
        format!("{}:{peer_port}", node.address),
        "--boot-id-file".into(),
        files.boot_id.display().to_string(),
        "--test-watchdog-file".into(),
        files.watchdog.display().to_string(),
        "--state-file".into(),
        files.state.display().to_string(),
        "--guard-socket".into(),
        files.guard_socket.display().to_string(),
        "--deadline-file".into(),
        files.deadlines.display().to_string(),
        "--i-understand-no-fencing".into(),
    ];
    if !insecure {
        let dir = options
            .key_dir
            .clone()
            .unwrap_or_else(|| cluster_key_dir(server));
        args.extend(["--peer-key-dir".into(), dir.display().to_string()]);
    }
    args.extend(options.extra_args.iter().cloned());
    Process::start(
        server,
        &format!("agent-{}-{run}", node.name),
        &super::binary("twosite-agent"),
        &kubeconfig,
        &args,
    )
}

pub fn feeds(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub fn taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

pub fn has_taint(node: &Node, key: &str) -> bool {
    taints(node).iter().any(|t| t.key == key)
}
