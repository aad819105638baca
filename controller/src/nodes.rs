//! The Node index: what the pairing and the remediation need to know of each Node, fed by a
//! kube-runtime watcher. The index is a plain state machine (feed it watcher events, read the
//! records), so it is tested without an API server. The watch task itself lives in
//! [`crate::heartbeats`], which judges the nodes' health from this index and the heartbeat
//! Leases.

use crate::status::{CONTROL_PLANE_LABELS, node_facts};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::runtime::watcher;
use node_health::remediation::{
    EXCLUDE_LABEL, FENCED_BOOT_ANNOTATION, OUT_OF_SERVICE_TAINT_EFFECT, OUT_OF_SERVICE_TAINT_KEY,
    UNRESPONSIVE_TAINT_EFFECT, UNRESPONSIVE_TAINT_KEY,
};
use node_health::{NodeFacts, Readiness};
use std::collections::BTreeMap;

/// What the controller knows of one Node: the core's record, filled by [`node_record`].
pub use node_health::assess::NodeRecord;

/// Whether `taint` is the out-of-service taint twosite manages (key and effect).
pub fn is_out_of_service(taint: &Taint) -> bool {
    taint.key == OUT_OF_SERVICE_TAINT_KEY && taint.effect == OUT_OF_SERVICE_TAINT_EFFECT
}

/// Whether `taint` is the early `twosite.dev/unresponsive:NoSchedule` (key and effect).
pub fn is_unresponsive(taint: &Taint) -> bool {
    taint.key == UNRESPONSIVE_TAINT_KEY && taint.effect == UNRESPONSIVE_TAINT_EFFECT
}

/// Everything the controller reads of a Node.
pub fn node_record(node: &Node) -> NodeRecord {
    let facts = node_facts(node);
    let labels = node.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let excluded = CONTROL_PLANE_LABELS.iter().any(|l| label(l).is_some())
        || label(EXCLUDE_LABEL).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let status = node.status.as_ref();
    let readiness = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| match c.status.as_str() {
            "True" => Readiness::True,
            "False" => Readiness::False,
            _ => Readiness::Unknown,
        });
    let boot_id = status
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.boot_id.trim().to_string())
        .filter(|b| !b.is_empty());
    NodeRecord {
        facts,
        uid: node.metadata.uid.clone(),
        excluded,
        tainted: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(is_out_of_service)),
        unschedulable: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(is_unresponsive)),
        fenced_boot_annotation: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FENCED_BOOT_ANNOTATION))
            .cloned(),
        boot_id,
        readiness,
    }
}

/// Node records by name, as the last complete listing plus the changes since.
#[derive(Debug, Default, Clone)]
pub struct NodeIndex {
    synced: BTreeMap<String, NodeRecord>,
    /// A re-listing in progress; swapped in at `InitDone`.
    relisting: Option<BTreeMap<String, NodeRecord>>,
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
                let record = node_record(&node);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(record.facts.name.clone(), record);
                false
            }
            watcher::Event::InitDone => {
                let fresh = self.relisting.take().unwrap_or_default();
                let changed = !self.has_synced || !same_facts(&fresh, &self.synced);
                self.synced = fresh;
                self.has_synced = true;
                changed
            }
            watcher::Event::Apply(node) => {
                let record = node_record(&node);
                let changed =
                    self.synced.get(&record.facts.name).map(|r| &r.facts) != Some(&record.facts);
                self.synced.insert(record.facts.name.clone(), record);
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
            .then(|| self.synced.values().map(|r| r.facts.clone()).collect())
    }

    /// Every Node's record, by name (empty until the first listing completed).
    pub fn records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.synced.values()
    }

    pub fn record(&self, name: &str) -> Option<&NodeRecord> {
        self.synced.get(name)
    }
}

fn same_facts(a: &BTreeMap<String, NodeRecord>, b: &BTreeMap<String, NodeRecord>) -> bool {
    a.len() == b.len() && a.values().zip(b.values()).all(|(x, y)| x.facts == y.facts)
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
