//! The Node watch: an in-memory index of what the pairing needs to know of each Node, fed by a
//! kube-runtime watcher. The index is a plain state machine (feed it watcher events, read the
//! facts), so it is tested without an API server.

use crate::admin::{Health, LoopGuard};
use crate::error::{Error, Result};
use crate::status::node_facts;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use node_health::NodeFacts;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Node facts by name, as the last complete listing plus the changes since.
#[derive(Debug, Default, Clone)]
pub struct NodeIndex {
    synced: BTreeMap<String, NodeFacts>,
    /// A re-listing in progress; swapped in at `InitDone`.
    relisting: Option<BTreeMap<String, NodeFacts>>,
    has_synced: bool,
}

impl NodeIndex {
    /// Applies one watcher event. Returns whether the facts visible to the pairing changed.
    pub fn apply(&mut self, event: watcher::Event<Node>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(node) => {
                let facts = node_facts(&node);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(facts.name.clone(), facts);
                false
            }
            watcher::Event::InitDone => {
                let fresh = self.relisting.take().unwrap_or_default();
                let changed = !self.has_synced || fresh != self.synced;
                self.synced = fresh;
                self.has_synced = true;
                changed
            }
            watcher::Event::Apply(node) => {
                let facts = node_facts(&node);
                let changed = self.synced.get(&facts.name) != Some(&facts);
                self.synced.insert(facts.name.clone(), facts);
                changed && self.has_synced
            }
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.unwrap_or_default();
                self.synced.remove(&name).is_some() && self.has_synced
            }
        }
    }

    /// Whether the first listing completed.
    pub fn is_synced(&self) -> bool {
        self.has_synced
    }

    /// The facts of every Node, by name; `None` until the first listing completed.
    pub fn facts(&self) -> Option<Vec<NodeFacts>> {
        self.has_synced
            .then(|| self.synced.values().cloned().collect())
    }
}

/// Watches Nodes forever, publishing their facts on `facts` whenever they change, and marking
/// the process ready after the first complete listing.
pub async fn run_node_watch(
    api: Api<Node>,
    facts: watch::Sender<Option<Vec<NodeFacts>>>,
    health: Arc<Health>,
    guard: LoopGuard,
) -> Result<()> {
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut index = NodeIndex::default();
    while let Some(event) = stream.next().await {
        guard.beat();
        match event {
            Ok(event) => {
                if index.apply(event) {
                    let now = index.facts();
                    tracing::debug!(nodes = now.as_ref().map(Vec::len), "node facts changed");
                    facts.send_replace(now);
                }
                if index.is_synced() && !health.is_ready() {
                    tracing::info!("node watch synced");
                    health.set_nodes_synced();
                }
            }
            Err(err) => {
                tracing::warn!(error = %crate::error::report(&err), "node watch error; retrying with backoff");
            }
        }
    }
    Err(Error::LoopEnded("node watch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use node_health::rooms::ZONE_LABEL;

    fn node(name: &str, zone: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(ZONE_LABEL.to_string(), zone.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn names(index: &NodeIndex) -> Option<Vec<(String, Option<String>)>> {
        index
            .facts()
            .map(|fs| fs.into_iter().map(|f| (f.name, f.zone)).collect())
    }

    #[test]
    fn nothing_is_visible_before_the_first_listing_completes() {
        let mut index = NodeIndex::default();
        assert!(!index.apply(watcher::Event::Init));
        assert!(!index.apply(watcher::Event::InitApply(node("a1", "east"))));
        assert_eq!(index.facts(), None);
        assert!(!index.is_synced());
        assert!(
            index.apply(watcher::Event::InitDone),
            "the first listing is a change"
        );
        assert_eq!(
            names(&index),
            Some(vec![("a1".into(), Some("east".into()))])
        );
    }

    #[test]
    fn only_changes_of_facts_are_changes() {
        let mut index = NodeIndex::default();
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitDone);
        assert_eq!(index.facts(), Some(vec![]), "an empty cluster is synced");
        assert!(index.apply(watcher::Event::Apply(node("a1", "east"))));
        assert!(
            !index.apply(watcher::Event::Apply(node("a1", "east"))),
            "a status heartbeat changes no fact"
        );
        assert!(index.apply(watcher::Event::Apply(node("a1", "west"))));
        assert!(index.apply(watcher::Event::Delete(node("a1", "west"))));
        assert!(!index.apply(watcher::Event::Delete(node("a1", "west"))));
        assert_eq!(index.facts(), Some(vec![]));
    }

    #[test]
    fn a_relisting_replaces_the_index() {
        let mut index = NodeIndex::default();
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(node("a1", "east")));
        index.apply(watcher::Event::InitApply(node("gone", "east")));
        index.apply(watcher::Event::InitDone);
        // The watch reconnects; `gone` was deleted meanwhile.
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(node("a1", "east")));
        assert_eq!(
            names(&index).map(|n| n.len()),
            Some(2),
            "old view until done"
        );
        assert!(index.apply(watcher::Event::InitDone));
        assert_eq!(
            names(&index),
            Some(vec![("a1".into(), Some("east".into()))])
        );
        // The same listing again is no change.
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(node("a1", "east")));
        assert!(!index.apply(watcher::Event::InitDone));
    }
}
