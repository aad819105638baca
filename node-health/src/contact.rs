//! Evidence that the other room is alive, read through the API server: the renewal marks of its
//! agents' heartbeat Leases keep changing.
//!
//! A renewal mark is what only the holder's renewal changes (`spec.renewTime`), never the
//! Lease's `resourceVersion`, which any write changes: the controller's fence marker on the
//! Lease of a node that is gone must not look like a sign of life. The agent lists the other
//! room's heartbeat Leases once per renew interval and feeds the marks to [`OtherRoomMarks`];
//! when it says a mark changed, the agent tells its core
//! ([`crate::AgentCore::observe_other_room`]) at the moment the list was sent.

use std::collections::BTreeMap;

/// The other room's renewal marks as last listed, by node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherRoomMarks {
    marks: BTreeMap<String, String>,
}

impl OtherRoomMarks {
    /// One complete listing of the other room's heartbeat Leases, as (node, renewal mark).
    /// Returns whether any mark changed since the previous listing: a node first seen, or a
    /// mark that stayed the same, is no evidence. A node not listed is forgotten, so one that
    /// comes back is first seen again.
    pub fn observe(&mut self, listed: impl IntoIterator<Item = (String, String)>) -> bool {
        let mut changed = false;
        let mut fresh = BTreeMap::new();
        for (node, mark) in listed {
            if self.marks.get(&node).is_some_and(|old| *old != mark) {
                changed = true;
            }
            fresh.insert(node, mark);
        }
        self.marks = fresh;
        changed
    }

    /// Forgets every mark (the agent lost its view, for example after a restart).
    pub fn clear(&mut self) {
        self.marks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(n, m)| ((*n).to_string(), (*m).to_string()))
            .collect()
    }

    #[test]
    fn only_a_changed_mark_is_evidence() {
        let mut marks = OtherRoomMarks::default();
        assert!(!marks.observe(list(&[("b-1", "t1")])), "first seen");
        assert!(!marks.observe(list(&[("b-1", "t1")])), "unchanged");
        assert!(marks.observe(list(&[("b-1", "t2")])), "renewed");
        // Gone, then back with another mark: first seen again, no evidence.
        assert!(!marks.observe(list(&[])));
        assert!(!marks.observe(list(&[("b-1", "t3")])));
        assert!(!marks.observe(list(&[("b-1", "t3"), ("b-2", "t9")])));
    }
}
