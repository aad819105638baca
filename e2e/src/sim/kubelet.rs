//! The kubelet on each node: registers the Node, posts Ready and its boot ID, renews its node
//! Lease, and stops and removes its terminating pods.

use super::api::{Key, LeaseObj, NodeObj, Obj, Precondition, Stored};
use super::cluster::{Cluster, zone};
use super::scenario::Site;
use node_health::Readiness;
use std::time::Duration;

/// kubelet renews its node Lease every 10 s.
const KUBELET_RENEW_MS: u64 = 10_000;
/// kubelet stops a terminating pod on a live node after this long.
const GRACEFUL_STOP_MS: u64 = 2_000;

impl Cluster {
    pub(super) fn step_kubelet(&mut self, i: usize) {
        let reach = self.node_reaches(i, Site::Api);
        let local = self.nodes[i].clock.read(self.now);
        let name = self.nodes[i].name.clone();
        if local < self.nodes[i].next_kubelet {
            return;
        }
        self.nodes[i].next_kubelet = local + Duration::from_millis(KUBELET_RENEW_MS);
        if !reach {
            return;
        }
        let boot = self.nodes[i].boot_id;
        let room = self.nodes[i].room;
        let current = match self.api.get(&Key::Node(name.clone())) {
            Some(Stored {
                obj: Obj::Node(n), ..
            }) => Some((n.ready, n.boot_id)),
            _ => None,
        };
        if current.is_none() {
            // kubelet registers the node.
            let _ = self.write(
                Key::Node(name.clone()),
                Precondition::Create,
                Obj::Node(NodeObj {
                    zone: Some(zone(room)),
                    control_plane: false,
                    ready: Readiness::True,
                    boot_id: boot,
                    out_of_service: false,
                    unschedulable: false,
                    other_taints: vec!["example.com/maintenance-window:PreferNoSchedule".into()],
                    fenced_boot: None,
                }),
            );
            self.log(
                &format!("kubelet/{name}"),
                format!("registered, boot ID {boot}"),
            );
        } else if current != Some((Readiness::True, boot)) {
            // kubelet posts Ready=True and its boot ID after a boot, keeping taints.
            self.update_node(&name, |n| {
                n.ready = Readiness::True;
                n.boot_id = boot;
            });
            self.log(
                &format!("kubelet/{name}"),
                format!("Ready=True, boot ID {boot}"),
            );
        }
        let seq = self.next_seq();
        let _ = self.write(
            Key::KubeletLease(name.clone()),
            Precondition::None,
            Obj::Lease(LeaseObj {
                holder: Some(name),
                transitions: 0,
                duration_ms: 40_000,
                failures_before: 0,
                boot_id: boot,
                fence_marker: None,
                watchdog: None,
                renew_seq: seq,
            }),
        );
        // kubelet stops terminating pods on its node and removes them.
        let mine: Vec<String> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Pod(p), Obj::Pod(pod))
                    if pod.terminating
                        && pod.node == self.nodes[i].name
                        && self
                            .api
                            .last_write(k)
                            .is_some_and(|t| self.now >= t + GRACEFUL_STOP_MS) =>
                {
                    Some(p.clone())
                }
                _ => None,
            })
            .collect();
        for p in mine {
            self.delete_pod(&p);
        }
    }
}
