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
}

pub fn agent_files(server: &ApiServer, node: &str) -> AgentFiles {
    AgentFiles {
        boot_id: server.dir().join(format!("{node}.boot_id")),
        watchdog: server.dir().join(format!("{node}.watchdog")),
        state: server.dir().join(format!("{node}.state.json")),
    }
}

/// Starts `node`'s agent after writing its boot ID file; the watchdog file is emptied.
pub fn start_agent(
    server: &ApiServer,
    node: &TestNode,
    boot: &str,
    peer_port: u16,
    run: u32,
) -> Process {
    let files = agent_files(server, &node.name);
    std::fs::write(&files.boot_id, format!("{boot}\n")).expect("write the boot ID file");
    std::fs::write(&files.watchdog, b"").expect("reset the watchdog file");
    let kubeconfig = server
        .service_account_kubeconfig(apiserver::AGENT_SA.0, apiserver::AGENT_SA.1)
        .expect("the agent's kubeconfig")
        .to_path_buf();
    let args: Vec<String> = vec![
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
        "--i-understand-no-fencing".into(),
    ];
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
