//! A model of the Kubernetes API server: objects with a resourceVersion, conditional writes
//! that answer 409 on a stale resourceVersion, and watches that deliver events late.

use node_health::volume::{Handover, SwitchTarget};
use node_health::{Pair, Readiness};
use std::collections::BTreeMap;

/// The objects the simulation stores.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Node(String),
    /// The kubelet's Lease in `kube-node-lease`.
    KubeletLease(String),
    /// The twosite agent's heartbeat Lease.
    AgentLease(String),
    /// The controller's leader Lease.
    LeaderLease,
    /// The `TwoSite` status the leader writes.
    Status,
    Pod(String),
    /// A protected volume's Lease (`coordination.k8s.io/v1`, in the volume's namespace).
    VolumeLease(String),
    /// A consumer pod of a protected volume (pinned to its node; its guard wraps the app).
    Consumer(String),
    /// A KubeVirt VirtualMachine.
    Vm(String),
    /// A virt-launcher pod (bound or not, gated or not).
    Launcher(String),
    /// A VM disk's Lease (`twosite-disk-<pvc>`).
    DiskLease(String),
    /// A PersistentVolumeClaim (read on demand, not watched).
    Claim(String),
}

impl Key {
    /// Objects the controller watches (the rest it reads when it needs them).
    pub fn watched(&self) -> bool {
        matches!(
            self,
            Key::Node(_)
                | Key::KubeletLease(_)
                | Key::AgentLease(_)
                | Key::Pod(_)
                | Key::VolumeLease(_)
                | Key::Consumer(_)
                | Key::Vm(_)
                | Key::Launcher(_)
                | Key::DiskLease(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObj {
    pub zone: Option<String>,
    pub control_plane: bool,
    pub ready: Readiness,
    pub boot_id: u64,
    /// `node.kubernetes.io/out-of-service=nodeshutdown:NoExecute` is on the node.
    pub out_of_service: bool,
    /// `twosite.dev/unresponsive:NoSchedule` is on the node.
    pub unschedulable: bool,
    /// Other taints (an operator's), which every writer must keep.
    pub other_taints: Vec<String>,
    /// `twosite.dev/fenced-boot-id`.
    pub fenced_boot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseObj {
    pub holder: Option<String>,
    pub transitions: u64,
    pub duration_ms: u64,
    /// Agent leases: `twosite.dev/renew-failures` (0: a clean renewal).
    pub failures_before: u32,
    /// Agent leases: `twosite.dev/boot-id`.
    pub boot_id: u64,
    /// Agent leases: the controller's fence marker (`twosite.dev/fenced-boot-id`).
    pub fence_marker: Option<String>,
    /// Agent leases: `twosite.dev/watchdog` (`enabled`, or `failed` once the agent could not
    /// arm or feed it); `None` on other Leases.
    pub watchdog: Option<&'static str>,
    /// What the holder changes on every renewal (the real Lease's `renewTime`): a write by
    /// someone else, the fence marker above all, leaves it alone.
    pub renew_seq: u64,
}

/// A pod of one HA application, bound to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObj {
    pub app: String,
    pub node: String,
    /// Has a deletionTimestamp.
    pub terminating: bool,
}

/// A volume Lease as stored: the fields [`node_health::volume::VolumeLease`] reads, plus the
/// switchover request `twosite switchover` leaves for the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLeaseObj {
    pub holder: Option<String>,
    /// `leaseTransitions`: the epoch.
    pub epoch: u64,
    pub duration_ms: u64,
    /// `spec.preferredHolder`.
    pub preferred: Option<String>,
    pub released: bool,
    pub handover: Option<Handover>,
    /// `twosite.dev/switchover-to`, written by `twosite switchover`.
    pub request: Option<SwitchTarget>,
    /// `renewTime`: every guard write changes it.
    pub renew_seq: u64,
}

/// A consumer pod of a protected volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerObj {
    pub volume: String,
    pub node: String,
    /// The pod UID: the guard's identity.
    pub uid: String,
    /// `twosite.dev/role=active`, kept by the controller.
    pub role_active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusObj {
    pub pairs: Vec<Pair>,
    pub verdicts: BTreeMap<String, &'static str>,
    pub phases: BTreeMap<String, &'static str>,
    pub leader: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obj {
    Node(NodeObj),
    Lease(LeaseObj),
    Status(StatusObj),
    Pod(PodObj),
    VolumeLease(VolumeLeaseObj),
    Consumer(ConsumerObj),
    Vm(super::kubevirt::VmObj),
    Launcher(super::kubevirt::LauncherObj),
    DiskLease(super::kubevirt::DiskLeaseObj),
    Claim(node_health::vm::ClaimFacts),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub rv: u64,
    pub obj: Obj,
}

/// A write's precondition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Last writer wins (kubelet heartbeats).
    None,
    /// Create: 409 if the object exists.
    Create,
    /// Replace: 409 unless the stored resourceVersion is this one.
    ResourceVersion(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

#[derive(Debug, Default)]
pub struct ApiServer {
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    /// Real time of the last accepted write of each key (for the invariant checks only: the
    /// actors never read it).
    last_write: BTreeMap<Key, u64>,
    /// Every renewal of a Lease: (renew_seq, real time). For the checks only.
    lease_history: BTreeMap<Key, Vec<(u64, u64)>>,
}

impl ApiServer {
    pub fn get(&self, key: &Key) -> Option<&Stored> {
        self.objects.get(key)
    }

    pub fn last_write(&self, key: &Key) -> Option<u64> {
        self.last_write.get(key).copied()
    }

    /// The real time of the renewal `seq` of `key`, and of the next renewal after it.
    pub fn write_and_next(&self, key: &Key, seq: u64) -> Option<(u64, Option<u64>)> {
        let h = self.lease_history.get(key)?;
        let i = h.iter().position(|(r, _)| *r == seq)?;
        Some((h[i].1, h.get(i + 1).map(|(_, t)| *t)))
    }

    /// Whether the holder of `key` renewed it (a new renewal mark) within `[from, to]`.
    pub fn renewed_between(&self, key: &Key, from: u64, to: u64) -> bool {
        self.lease_history
            .get(key)
            .is_some_and(|h| h.iter().any(|(_, t)| (from..=to).contains(t)))
    }

    pub fn objects(&self) -> impl Iterator<Item = (&Key, &Stored)> {
        self.objects.iter()
    }

    /// Stores `obj` under `key` if the precondition holds, returning the stored record.
    pub fn write(
        &mut self,
        key: Key,
        pre: Precondition,
        obj: Obj,
        now: u64,
    ) -> Result<Stored, Conflict> {
        let current = self.objects.get(&key).map(|s| s.rv);
        match (pre, current) {
            (Precondition::Create, Some(_)) => return Err(Conflict),
            (Precondition::ResourceVersion(_), None) => return Err(Conflict),
            (Precondition::ResourceVersion(want), Some(have)) if want != have => {
                return Err(Conflict);
            }
            _ => {}
        }
        self.rv += 1;
        let stored = Stored { rv: self.rv, obj };
        if let Obj::Lease(l) = &stored.obj {
            let h = self.lease_history.entry(key.clone()).or_default();
            if h.last().is_none_or(|(seq, _)| *seq != l.renew_seq) {
                h.push((l.renew_seq, now));
            }
        }
        self.objects.insert(key.clone(), stored.clone());
        self.last_write.insert(key, now);
        Ok(stored)
    }

    pub fn delete(&mut self, key: &Key) -> bool {
        self.objects.remove(key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str) -> Obj {
        Obj::Lease(LeaseObj {
            holder: Some(holder.into()),
            transitions: 0,
            duration_ms: 15_000,
            failures_before: 0,
            boot_id: 0,
            fence_marker: None,
            watchdog: None,
            renew_seq: 0,
        })
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let mut api = ApiServer::default();
        let first = api
            .write(Key::LeaderLease, Precondition::Create, lease("a"), 0)
            .expect("create");
        assert_eq!(
            api.write(Key::LeaderLease, Precondition::Create, lease("b"), 1),
            Err(Conflict)
        );
        let second = api
            .write(
                Key::LeaderLease,
                Precondition::ResourceVersion(first.rv),
                lease("b"),
                2,
            )
            .expect("replace");
        assert!(second.rv > first.rv);
        assert_eq!(
            api.write(
                Key::LeaderLease,
                Precondition::ResourceVersion(first.rv),
                lease("c"),
                3
            ),
            Err(Conflict),
            "a writer holding the old resourceVersion loses"
        );
        assert_eq!(api.last_write(&Key::LeaderLease), Some(2));
    }
}
