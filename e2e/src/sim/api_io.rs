//! API IO: every write and delete the actors make goes through the API server here, and
//! its events fan out to the connected controller replicas' watches and kube-scheduler's, late
//! and in order.

use super::api::{Key, NodeObj, Obj, Precondition, Stored};
use super::cluster::Cluster;
use rand::Rng;

impl Cluster {
    /// Writes through the API server and fans the event out to connected watchers.
    pub(super) fn write(&mut self, key: Key, pre: Precondition, obj: Obj) -> Result<Stored, ()> {
        let prev = self.api.get(&key).cloned();
        let prev_at = self.api.last_write(&key).unwrap_or(0);
        let stored = self
            .api
            .write(key.clone(), pre, obj, self.now)
            .map_err(|_| ())?;
        self.check_write(&key, prev.as_ref(), prev_at, &stored);
        if key.watched() {
            self.fan_out(&key, Some(stored.clone()));
        }
        self.scheduler_watch(&key, Some(&stored));
        self.guard_watch(&key, Some(&stored));
        Ok(stored)
    }

    pub(super) fn delete(&mut self, key: &Key) -> bool {
        let gone = self.api.delete(key);
        if gone && key.watched() {
            self.fan_out(key, None);
        }
        if gone {
            self.scheduler_watch(key, None);
            self.guard_watch(key, None);
        }
        gone
    }

    /// Read-modify-write of a Node with a resourceVersion precondition, keeping every field the
    /// writer does not own (as a JSON Patch with a `test` op, or kubelet's status update, do).
    pub(super) fn update_node(&mut self, name: &str, f: impl FnOnce(&mut NodeObj)) -> bool {
        let Some(Stored {
            rv,
            obj: Obj::Node(mut node),
        }) = self.api.get(&Key::Node(name.to_string())).cloned()
        else {
            return false;
        };
        f(&mut node);
        self.write(
            Key::Node(name.to_string()),
            Precondition::ResourceVersion(rv),
            Obj::Node(node),
        )
        .is_ok()
    }

    fn fan_out(&mut self, key: &Key, value: Option<Stored>) {
        let (lo, hi) = self.cfg.watch_delay_ms;
        for i in 0..self.replicas.len() {
            if !self.replicas[i].connected {
                continue;
            }
            // Volume objects draw from their own stream: adding volumes leaves the rest of a
            // seed's timeline as it was.
            let delay = match key {
                Key::VolumeLease(_) | Key::Consumer(_) => self.vol_rng.random_range(lo..=hi),
                Key::Vm(_) | Key::Launcher(_) | Key::DiskLease(_) => {
                    self.vm.rng.random_range(lo..=hi)
                }
                _ => self.rng.random_range(lo..=hi),
            };
            let r = &mut self.replicas[i];
            // A watch delivers in order: never before the previous event.
            let mut at = (self.now + delay).max(r.last_delivery);
            if let Some((from, len)) = self.cfg.watch_stall_ms
                && (from..from + len).contains(&at)
            {
                at = from + len;
            }
            r.last_delivery = at;
            r.queue.push_back((at, key.clone(), value.clone()));
        }
    }
}
