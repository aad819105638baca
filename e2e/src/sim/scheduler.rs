//! kube-scheduler: binds each pending pod to a node as *its* cache of the API server shows it —
//! Ready, no `NoSchedule`/`NoExecute` taint — preferring the node with the fewest pods, as the
//! default scoring spreads them. Its node cache is fed by its own watch, late and in order, so a
//! taint written a moment ago may not be in it yet: the race the controller's order of taint and
//! release, and the early `NoSchedule` taint, must win.
//!
//! A pending pod is what a ReplicaSet creates when it sees the old pod gone; it is kept here, not
//! in the model API server, since nothing but the scheduler acts on an unbound pod.

use super::api::{Key, NodeObj, Obj, PodObj, Precondition, Stored};
use super::cluster::Cluster;
use node_health::Readiness;
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};

/// An unbound pod of an HA app, visible to the scheduler from `visible_at` (the ReplicaSet's
/// watch delay, its create, and the scheduler's pod watch delay).
#[derive(Debug, Clone)]
pub(super) struct PendingPod {
    pub app: String,
    pub visible_at: u64,
}

#[derive(Debug, Default)]
pub(super) struct Scheduler {
    /// The scheduler's cache of Node objects.
    nodes: BTreeMap<String, NodeObj>,
    /// Node watch events on their way: (delivery time, node, new value).
    queue: VecDeque<(u64, String, Option<NodeObj>)>,
    last_delivery: u64,
    pub pending: Vec<PendingPod>,
}

impl Scheduler {
    /// The nodes its cache shows feasible: Ready, no `NoSchedule`/`NoExecute` taint.
    pub(super) fn feasible_nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.ready == Readiness::True && !n.out_of_service && !n.unschedulable)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl Cluster {
    /// The scheduler's node watch: every Node event reaches its cache one watch delay later.
    pub(super) fn scheduler_watch(&mut self, key: &Key, value: Option<&Stored>) {
        let Key::Node(name) = key else {
            return;
        };
        let node = match value.map(|s| &s.obj) {
            Some(Obj::Node(n)) => Some(n.clone()),
            _ => None,
        };
        let (lo, hi) = self.cfg.watch_delay_ms;
        let delay = self.rng.random_range(lo..=hi);
        let s = &mut self.scheduler;
        let at = (self.now + delay).max(s.last_delivery);
        s.last_delivery = at;
        s.queue.push_back((at, name.clone(), node));
    }

    /// A ReplicaSet-like controller saw the app's pod gone: a new, unbound pod.
    pub(super) fn create_pending(&mut self, app: &str) {
        let (lo, hi) = self.cfg.watch_delay_ms;
        let seen = self.rng.random_range(lo..=hi);
        let to_scheduler = self.rng.random_range(lo..=hi);
        self.scheduler.pending.push(PendingPod {
            app: app.to_string(),
            visible_at: self.now + seen + to_scheduler,
        });
    }

    pub(super) fn step_scheduler(&mut self) {
        let now = self.now;
        while let Some((at, _, _)) = self.scheduler.queue.front()
            && *at <= now
        {
            if let Some((_, name, node)) = self.scheduler.queue.pop_front() {
                match node {
                    Some(n) => self.scheduler.nodes.insert(name, n),
                    None => self.scheduler.nodes.remove(&name),
                };
            }
        }
        let due: Vec<PendingPod> = self
            .scheduler
            .pending
            .iter()
            .filter(|p| p.visible_at <= now)
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        let mut load: BTreeMap<String, usize> = BTreeMap::new();
        for (k, s) in self.api.objects() {
            if let (Key::Pod(_), Obj::Pod(p)) = (k, &s.obj) {
                *load.entry(p.node.clone()).or_default() += 1;
            }
        }
        for p in due {
            // Feasible as its cache says; the emptiest first, then by name.
            let Some(node) = self
                .scheduler
                .nodes
                .iter()
                .filter(|(_, n)| {
                    n.ready == Readiness::True && !n.out_of_service && !n.unschedulable
                })
                .map(|(name, _)| name.clone())
                .min_by_key(|n| (load.get(n).copied().unwrap_or(0), n.clone()))
            else {
                // Unschedulable for now: it stays pending and is tried again.
                continue;
            };
            self.scheduler
                .pending
                .retain(|q| !(q.app == p.app && q.visible_at == p.visible_at));
            *load.entry(node.clone()).or_default() += 1;
            self.next_pod += 1;
            let pod = format!("{}-{}", p.app, self.next_pod);
            if self
                .write(
                    Key::Pod(pod.clone()),
                    Precondition::Create,
                    Obj::Pod(PodObj {
                        app: p.app.clone(),
                        node: node.clone(),
                        terminating: false,
                    }),
                )
                .is_ok()
            {
                self.log("scheduler", format!("{}: bound {pod} to {node}", p.app));
                self.check_bind(&pod, &node);
            }
        }
    }
}
