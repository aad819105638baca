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
//! (name, namespace, uid, labels, owner references, deletion timestamp, node). 20,000 pods then
//! hold a few MiB, not the hundreds a full Pod cache would.
//!
//! The index answers only once it has a complete listing since its last watch error
//! ([`PodIndex::pods_on`] is `None` before): an index that has not listed would read "no pods"
//! and lift a taint too early. The remediation loop lists the node's pods itself meanwhile.

use crate::admin::LoopGuard;
use crate::error::{Result, report};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// `namespace/name`.
type PodKey = String;

#[derive(Debug, Default)]
struct Inner {
    /// Node → its pods, by key; ordered so that a release deletes in a stable order.
    by_node: HashMap<String, BTreeMap<PodKey, Pod>>,
    /// Pod → the node it is indexed under, to move or drop it on the next event.
    node_of: HashMap<PodKey, String>,
    /// The pods of a listing in progress (between `Init` and `InitDone`).
    relist: Option<Vec<Pod>>,
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

    fn insert(&mut self, pod: Pod) {
        let Some(key) = pod_key(&pod) else {
            return;
        };
        self.remove(&key);
        let Some(node) = node_name(&pod).map(str::to_string) else {
            // Not bound to a node: nothing a fence releases.
            return;
        };
        self.node_of.insert(key.clone(), node.clone());
        self.by_node.entry(node).or_default().insert(key, pod);
    }
}

/// The index, shared by its watch and the remediation loop.
#[derive(Debug, Clone, Default)]
pub struct PodIndex(Arc<Mutex<Inner>>);

fn pod_key(pod: &Pod) -> Option<PodKey> {
    let name = pod.metadata.name.as_deref()?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    Some(format!("{ns}/{name}"))
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

/// `pod` cut down to what [`crate::remediation::releasable`], the counts and the deletion read.
pub fn slim(pod: Pod) -> Pod {
    let m = pod.metadata;
    Pod {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            labels: m.labels,
            owner_references: m.owner_references,
            deletion_timestamp: m.deletion_timestamp,
            ..ObjectMeta::default()
        },
        spec: pod.spec.map(|s| PodSpec {
            node_name: s.node_name,
            ..PodSpec::default()
        }),
        status: None,
    }
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
            watcher::Event::InitApply(pod) => inner.relist.get_or_insert_default().push(slim(pod)),
            watcher::Event::InitDone => {
                let pods = inner.relist.take().unwrap_or_default();
                inner.by_node.clear();
                inner.node_of.clear();
                for pod in pods {
                    inner.insert(pod);
                }
                inner.listed = true;
            }
            watcher::Event::Apply(pod) => inner.insert(slim(pod)),
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

    /// The pods bound to `node` (cut down by [`slim`]), or `None` while the index is not
    /// listed (the caller lists them itself then).
    pub fn pods_on(&self, node: &str) -> Option<Vec<Pod>> {
        let inner = self.lock();
        if !inner.listed {
            return None;
        }
        Some(
            inner
                .by_node
                .get(node)
                .map(|p| p.values().cloned().collect())
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
    fn a_cut_down_pod_keeps_what_the_release_reads() {
        let index = PodIndex::from_pods([pod("a", Some("n1"))]);
        let p = &index.pods_on("n1").expect("listed")[0];
        assert_eq!(p.metadata.uid.as_deref(), Some("uid-a"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(p.metadata.annotations, None);
        assert_eq!(p.status, None);
        assert!(p.spec.as_ref().is_some_and(|s| s.containers.is_empty()));
    }
}
