//! The pods bound to each node, from one cluster-wide pod watch: what the remediation loop
//! counts and releases on a fenced or tainted node.
//!
//! Without it every pass (every 500 ms) listed each such node's pods (a LIST with a field
//! selector, read through to etcd): ~2 LISTs/s per node for as long as it stays tainted, ~600/s
//! for a lost room of 300 nodes. With it a pass reads the counts from memory, and a room loss
//! costs only its writes.
//!
//! The watch needs `spec.nodeName`, which a metadata-only watch does not carry; so it is a
//! full pod watch, and each pod is cut down on arrival to the few fields the release reads
//! (name, namespace, uid, deletion timestamp, DaemonSet and VirtualMachineInstance owners, the
//! KubeVirt labels, node). 20,000 pods then hold a few MiB, not the ~90 MiB that even cut-down
//! `Pod` values took (measured with `twosite-bench`).
//!
//! The index answers only once it has a complete listing since its last watch error
//! ([`PodIndex::pods_on`] is `None` before): an index that has not listed would read "no pods"
//! and lift a taint too early. The remediation loop lists the node's pods itself meanwhile.

use crate::admin::LoopGuard;
use crate::error::{Result, report};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Api;
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// `namespace/name`.
type PodKey = String;

/// What the index keeps of one pod: what [`crate::remediation::releasable`], the counts and the
/// deletion read, and nothing else. A `Pod` value, even cut down, takes ~4 KiB (its spec's
/// many fields are inline); this takes ~150 bytes, so 20,000 pods hold a few MiB.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    name: String,
    namespace: Option<String>,
    uid: Option<String>,
    deletion_timestamp: Option<Time>,
    /// Owned by a DaemonSet (never released).
    daemonset: bool,
    /// The `kubevirt.io` label's value (a launcher pod's is `virt-launcher`).
    kubevirt_label: Option<String>,
    /// The `vm.kubevirt.io/name` label.
    vm_label: Option<String>,
    /// The name of the owning VirtualMachineInstance.
    vmi_owner: Option<String>,
}

const KUBEVIRT_LABEL: &str = "kubevirt.io";
const VM_NAME_LABEL: &str = "vm.kubevirt.io/name";

impl Entry {
    fn of(pod: &Pod) -> Option<Entry> {
        let m = &pod.metadata;
        let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).cloned();
        let owners = m.owner_references.as_deref().unwrap_or_default();
        Some(Entry {
            name: m.name.clone()?,
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            deletion_timestamp: m.deletion_timestamp.clone(),
            daemonset: owners.iter().any(|o| o.kind == "DaemonSet"),
            kubevirt_label: label(KUBEVIRT_LABEL),
            vm_label: label(VM_NAME_LABEL),
            vmi_owner: owners
                .iter()
                .find(|o| o.kind == "VirtualMachineInstance")
                .map(|o| o.name.clone()),
        })
    }

    /// The pod again, with only what the entry kept: enough for the release's reads.
    fn to_pod(&self, node: &str) -> Pod {
        let mut labels = BTreeMap::new();
        if let Some(v) = &self.kubevirt_label {
            labels.insert(KUBEVIRT_LABEL.to_string(), v.clone());
        }
        if let Some(v) = &self.vm_label {
            labels.insert(VM_NAME_LABEL.to_string(), v.clone());
        }
        let owner = |kind: &str, name: &str| OwnerReference {
            kind: kind.to_string(),
            name: name.to_string(),
            ..OwnerReference::default()
        };
        let mut owners = Vec::new();
        if self.daemonset {
            owners.push(owner("DaemonSet", ""));
        }
        if let Some(vmi) = &self.vmi_owner {
            owners.push(owner("VirtualMachineInstance", vmi));
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: self.namespace.clone(),
                uid: self.uid.clone(),
                deletion_timestamp: self.deletion_timestamp.clone(),
                labels: (!labels.is_empty()).then_some(labels),
                owner_references: (!owners.is_empty()).then_some(owners),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_string()),
                ..PodSpec::default()
            }),
            status: None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Node → its pods, by key; ordered so that a release deletes in a stable order.
    by_node: HashMap<String, BTreeMap<PodKey, Entry>>,
    /// Pod → the node it is indexed under, to move or drop it on the next event.
    node_of: HashMap<PodKey, String>,
    /// The pods of a listing in progress (between `Init` and `InitDone`): node and entry.
    relist: Option<Vec<(String, Entry)>>,
    /// A complete listing arrived and the watch has not failed since.
    listed: bool,
}

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some(node) = self.node_of.remove(key)
            && let Some(pods) = self.by_node.get_mut(&node)
        {
            pods.remove(key);
            if pods.is_empty() {
                self.by_node.remove(&node);
            }
        }
    }

    fn insert(&mut self, node: Option<String>, entry: Entry) {
        let key = entry_key(&entry);
        self.remove(&key);
        let Some(node) = node else {
            // Not bound to a node: nothing a fence releases.
            return;
        };
        self.node_of.insert(key.clone(), node.clone());
        self.by_node.entry(node).or_default().insert(key, entry);
    }
}

/// The index, shared by its watch and the remediation loop.
#[derive(Debug, Clone, Default)]
pub struct PodIndex(Arc<Mutex<Inner>>);

fn entry_key(e: &Entry) -> PodKey {
    format!("{}/{}", e.namespace.as_deref().unwrap_or_default(), e.name)
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    let name = pod.metadata.name.as_deref()?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    Some(format!("{ns}/{name}"))
}

fn node_name(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

impl PodIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one pod watcher event.
    pub fn apply(&self, event: watcher::Event<Pod>) {
        let mut inner = self.lock();
        match event {
            watcher::Event::Init => inner.relist = Some(Vec::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(entry) = Entry::of(&pod)
                    && let Some(node) = node_name(&pod)
                {
                    inner.relist.get_or_insert_default().push((node, entry));
                }
            }
            watcher::Event::InitDone => {
                let pods = inner.relist.take().unwrap_or_default();
                inner.by_node.clear();
                inner.node_of.clear();
                for (node, entry) in pods {
                    inner.insert(Some(node), entry);
                }
                inner.listed = true;
            }
            watcher::Event::Apply(pod) => {
                if let Some(entry) = Entry::of(&pod) {
                    inner.insert(node_name(&pod), entry);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(key) = pod_key(&pod) {
                    inner.remove(&key);
                }
            }
        }
    }

    /// The watch failed: not trusted until its next complete listing.
    pub fn watch_failed(&self) {
        let mut inner = self.lock();
        inner.listed = false;
        inner.relist = None;
    }

    /// Whether the index has a complete listing since its last watch error.
    pub fn is_listed(&self) -> bool {
        self.lock().listed
    }

    /// The pods bound to `node` (with only what the release reads: name, namespace, uid,
    /// deletion timestamp, the DaemonSet and VirtualMachineInstance owners, the KubeVirt
    /// labels), or `None` while the index is not listed (the caller lists them itself then).
    pub fn pods_on(&self, node: &str) -> Option<Vec<Pod>> {
        let inner = self.lock();
        if !inner.listed {
            return None;
        }
        Some(
            inner
                .by_node
                .get(node)
                .map(|p| p.values().map(|e| e.to_pod(node)).collect())
                .unwrap_or_default(),
        )
    }

    /// How many bound pods the index holds.
    pub fn len(&self) -> usize {
        self.lock().node_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An index filled with `pods` and marked listed: for tests and benches.
    pub fn from_pods(pods: impl IntoIterator<Item = Pod>) -> PodIndex {
        let index = PodIndex::default();
        index.apply(watcher::Event::Init);
        for pod in pods {
            index.apply(watcher::Event::InitApply(pod));
        }
        index.apply(watcher::Event::InitDone);
        index
    }
}

/// Runs the pod watch forever. On an error the index is marked not listed and the watch is
/// restarted from a full listing (as the heartbeat watches are), so that "listed" always means
/// "a complete listing since the last error": a watch resumed after a gap could have missed a
/// pod bound meanwhile.
pub async fn run_pod_watch(api: Api<Pod>, index: PodIndex, guard: LoopGuard) -> Result<()> {
    let mut backoff = crate::heartbeats::restart_backoff();
    loop {
        let stream = watcher(api.clone(), watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            guard.beat();
            match event {
                Ok(event) => {
                    let done = matches!(event, watcher::Event::InitDone);
                    index.apply(event);
                    if done {
                        tracing::debug!(pods = index.len(), "pod listing complete");
                        backoff = crate::heartbeats::restart_backoff();
                    }
                }
                Err(err) => {
                    index.watch_failed();
                    tracing::warn!(error = %report(&err), "pod watch failed; re-listing");
                    break;
                }
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        tokio::time::sleep(delay).await;
        guard.beat();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                         "annotations": {"big": "x".repeat(1000)}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running"},
        }))
        .expect("pod")
    }

    fn names(pods: Option<Vec<Pod>>) -> Option<Vec<String>> {
        pods.map(|ps| {
            ps.into_iter()
                .filter_map(|p| p.metadata.name)
                .collect::<Vec<_>>()
        })
    }

    #[test]
    fn nothing_is_answered_before_the_first_complete_listing() {
        let index = PodIndex::default();
        assert_eq!(index.pods_on("n1"), None);
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(pod("a", Some("n1"))));
        assert_eq!(index.pods_on("n1"), None, "listing in progress");
        index.apply(watcher::Event::InitDone);
        assert_eq!(names(index.pods_on("n1")), Some(vec!["a".to_string()]));
        assert_eq!(names(index.pods_on("n2")), Some(vec![]));
        index.watch_failed();
        assert_eq!(index.pods_on("n1"), None, "not trusted after an error");
    }

    #[test]
    fn pods_move_between_nodes_and_leave_on_delete() {
        let index = PodIndex::from_pods([pod("a", Some("n1")), pod("b", None)]);
        assert_eq!(index.len(), 1, "an unbound pod is not indexed");
        index.apply(watcher::Event::Apply(pod("b", Some("n2"))));
        index.apply(watcher::Event::Apply(pod("a", Some("n2"))));
        assert_eq!(names(index.pods_on("n1")), Some(vec![]));
        assert_eq!(
            names(index.pods_on("n2")),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        index.apply(watcher::Event::Delete(pod("a", Some("n2"))));
        assert_eq!(names(index.pods_on("n2")), Some(vec!["b".to_string()]));
        // A re-listing replaces everything: pods deleted while the watch was down vanish.
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(pod("c", Some("n1"))));
        index.apply(watcher::Event::InitDone);
        assert_eq!(names(index.pods_on("n2")), Some(vec![]));
        assert_eq!(names(index.pods_on("n1")), Some(vec!["c".to_string()]));
    }

    #[test]
    fn an_indexed_pod_reads_as_the_pod_for_the_release() {
        let full = |name: &str,
                    owner: &str,
                    owner_name: &str,
                    labels: serde_json::Value,
                    deleting: bool|
         -> Pod {
            let mut v = json!({
                "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                             "labels": labels, "annotations": {"big": "x"},
                             "ownerReferences": [{"apiVersion": "v1", "kind": owner,
                                                  "name": owner_name, "uid": "u"}]},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
            });
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            serde_json::from_value(v).expect("pod")
        };
        let pods = vec![
            full("web", "ReplicaSet", "rs", json!({"app": "web"}), false),
            full("ds", "DaemonSet", "agent", json!({}), false),
            full("gone", "ReplicaSet", "rs", json!({}), true),
            full(
                "virt-launcher-in",
                "VirtualMachineInstance",
                "vm-in",
                json!({"kubevirt.io": "virt-launcher"}),
                false,
            ),
            full(
                "virt-launcher-out",
                "VirtualMachineInstance",
                "vm-out",
                json!({"kubevirt.io": "virt-launcher"}),
                false,
            ),
            full(
                "virt-launcher-label",
                "ReplicaSet",
                "x",
                json!({"kubevirt.io": "virt-launcher", "vm.kubevirt.io/name": "vm-in"}),
                false,
            ),
        ];
        let opted_in = |k: &str| match k {
            "ns/vm-in" => Some(true),
            "ns/vm-out" => Some(false),
            _ => None,
        };
        let index = PodIndex::from_pods(pods.clone());
        let indexed = index.pods_on("n1").expect("listed");
        let verdicts = |ps: &[Pod]| -> BTreeMap<String, bool> {
            ps.iter()
                .map(|p| {
                    (
                        p.metadata.name.clone().unwrap_or_default(),
                        crate::remediation::releasable(p, &opted_in),
                    )
                })
                .collect()
        };
        assert_eq!(verdicts(&indexed), verdicts(&pods));
        assert_eq!(
            crate::remediation::pod_counts(&indexed, &opted_in),
            crate::remediation::pod_counts(&pods, &opted_in)
        );
        let web = indexed
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("web"))
            .expect("web");
        assert_eq!(
            web.metadata.uid.as_deref(),
            Some("uid-web"),
            "the delete's precondition"
        );
        assert_eq!(web.metadata.namespace.as_deref(), Some("ns"));
    }
}
