//! kube-controller-manager: the node lifecycle controller, taint eviction, the pod garbage
//! collector, and a StatefulSet-like workload controller that recreates a deleted HA pod
//! (unbound: kube-scheduler places it).

use super::api::{Key, Obj, PodObj, Precondition, Stored};
use super::cluster::Cluster;
use node_health::Readiness;
use std::collections::BTreeSet;

/// node-monitor-grace-period (50 s since Kubernetes 1.32) and the lifecycle controller's period.
const NODE_GRACE_MS: u64 = 50_000;
pub(super) const NODE_MONITOR_PERIOD_MS: u64 = 5_000;
/// The pod garbage collector's period.
pub(super) const POD_GC_PERIOD_MS: u64 = 20_000;

impl Cluster {
    pub(super) fn delete_pod(&mut self, pod: &str) {
        let node = match self.api.get(&Key::Pod(pod.to_string())) {
            Some(Stored {
                obj: Obj::Pod(p), ..
            }) => p.node.clone(),
            _ => return,
        };
        self.delete(&Key::Pod(pod.to_string()));
        let left = self.api.objects().any(|(_, s)| match &s.obj {
            Obj::Pod(p) => p.node == node,
            _ => false,
        });
        if !left {
            self.record
                .released_at
                .entry(node)
                .or_default()
                .push(self.now);
        }
    }

    /// kube-controller-manager: node lifecycle, taint eviction, pod GC, and a workload
    /// controller that recreates a deleted HA pod.
    pub(super) fn step_kcm(&mut self) {
        if self.now >= self.next_monitor {
            self.next_monitor += NODE_MONITOR_PERIOD_MS;
            let stale: Vec<String> = self
                .api
                .objects()
                .filter_map(|(k, s)| match (k, &s.obj) {
                    (Key::Node(n), Obj::Node(obj)) if obj.ready != Readiness::Unknown => {
                        let last = self.api.last_write(&Key::KubeletLease(n.clone()))?;
                        (self.now.saturating_sub(last) > NODE_GRACE_MS).then(|| n.clone())
                    }
                    _ => None,
                })
                .collect();
            for n in stale {
                self.update_node(&n, |obj| obj.ready = Readiness::Unknown);
                self.log(
                    "kcm",
                    format!("{n} Ready=Unknown (no kubelet heartbeat for 50 s)"),
                );
            }
        }

        // Taint eviction: pods on an out-of-service node are marked for deletion at once.
        let tainted: BTreeSet<String> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Node(n), Obj::Node(obj)) if obj.out_of_service => Some(n.clone()),
                _ => None,
            })
            .collect();
        let evict: Vec<(String, PodObj)> = self
            .api
            .objects()
            .filter_map(|(k, s)| match (k, &s.obj) {
                (Key::Pod(p), Obj::Pod(pod)) if !pod.terminating && tainted.contains(&pod.node) => {
                    Some((p.clone(), pod.clone()))
                }
                _ => None,
            })
            .collect();
        for (p, mut pod) in evict {
            pod.terminating = true;
            let _ = self.write(Key::Pod(p), Precondition::None, Obj::Pod(pod));
        }
        self.evict_launchers(&tainted);

        if self.now >= self.next_pod_gc {
            self.next_pod_gc += POD_GC_PERIOD_MS;
            // Terminating pods on nodes that are NotReady and out of service are force-deleted.
            let gone: Vec<String> = self
                .api
                .objects()
                .filter_map(|(k, s)| match (k, &s.obj) {
                    (Key::Pod(p), Obj::Pod(pod)) if pod.terminating => {
                        match self.api.get(&Key::Node(pod.node.clone())) {
                            Some(Stored {
                                obj: Obj::Node(n), ..
                            }) if n.out_of_service && n.ready != Readiness::True => Some(p.clone()),
                            None => Some(p.clone()),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect();
            for p in gone {
                self.delete_pod(&p);
                self.log("kcm", format!("pod GC force-deleted {p}"));
            }
            self.gc_launchers();
        }

        self.step_workload_controller();
    }

    /// A StatefulSet/ReplicaSet-like controller: an app whose pod object is gone gets a new,
    /// unbound pod, which kube-scheduler places ([`super::scheduler`]).
    fn step_workload_controller(&mut self) {
        let mut present: BTreeSet<String> = BTreeSet::new();
        for (k, s) in self.api.objects() {
            if let (Key::Pod(_), Obj::Pod(p)) = (k, &s.obj) {
                present.insert(p.app.clone());
            }
        }
        for p in &self.scheduler.pending {
            present.insert(p.app.clone());
        }
        for app in self.apps.clone() {
            if !present.contains(&app) {
                self.create_pending(&app);
            }
        }
    }
}
