//! The world of protected RWX block volumes: the shared device, the consumer pods (pinned to
//! partner nodes) and their processes, a database client, and the volume faults.
//!
//! The device is modelled as a filesystem: a mount reads the device once and keeps its own view
//! (metadata cached), and every write stores the writer's view. With one writer at a time that
//! is exact; with two, the later writer's view overwrites the other's records, which is what
//! losing acknowledged records after two writers looks like.

use super::api::{ConsumerObj, Key, Obj, Precondition, Stored, VolumeLeaseObj};
use super::cluster::{Cluster, ms};
use super::guard::GuardProc;
use super::scenario::{Fault, Site};
use node_health::volume::VolumeLease;
use std::collections::BTreeSet;

/// How long an app takes to stop, sync and unmount after `StopApp`.
pub(super) const APP_STOP_MS: u64 = 600;
/// kubelet starts a pod's containers this long after the node boots or the pod is created.
pub(super) const CONTAINER_START_MS: u64 = 2_000;
/// The standby consumer's pod starts this much later than the first one, so the first consumer
/// (room A) is the first holder.
pub(super) const STANDBY_START_MS: u64 = 3_000;
/// The database client writes this many records per step while it can.
pub(super) const CLIENT_RECORDS_PER_STEP: u64 = 50;
/// The database client starts at this real time.
pub(super) const CLIENT_START_MS: u64 = 10_000;

/// A protected volume of a scenario: its name and the nodes its consumers are pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub consumers: Vec<String>,
}

/// A mount of the device: the view it read at mount time plus its own writes.
#[derive(Debug, Clone)]
pub(super) struct Mount {
    pub id: u64,
    view: Vec<u64>,
}

/// The shared block device (its filesystem's records).
#[derive(Debug, Default)]
pub(super) struct Device {
    pub records: Vec<u64>,
    last_writer: Option<u64>,
    next_mount: u64,
    pub formatted: bool,
}

impl Device {
    pub fn mount(&mut self) -> Mount {
        // The guard's shell formats only a device without any signature.
        self.formatted = true;
        self.next_mount += 1;
        Mount {
            id: self.next_mount,
            view: self.records.clone(),
        }
    }

    /// Writes `record` through mount `m`: the device holds `m`'s view afterwards.
    pub fn write(&mut self, m: &mut Mount, record: u64) {
        m.view.push(record);
        if self.last_writer == Some(m.id) && self.records.len() + 1 == m.view.len() {
            self.records.push(record);
        } else {
            self.records = m.view.clone();
        }
        self.last_writer = Some(m.id);
    }
}

/// One consumer pod and, while its containers run, its guard process.
#[derive(Debug)]
pub(super) struct SimConsumer {
    pub pod: String,
    pub uid: String,
    pub node: String,
    /// Real time at which the containers start (after a boot or the pod's creation).
    pub start_at: Option<u64>,
    pub proc: Option<GuardProc>,
}

/// The database client of `db-failover`: writes records 1..=total with retry through the
/// consumer the Service selects (the role label); a record is acknowledged only after that
/// consumer's app wrote it to the device.
#[derive(Debug, Default)]
pub(super) struct DbClient {
    pub total: u64,
    pub next: u64,
    pub acked: u64,
    pub retries: u64,
}

#[derive(Debug)]
pub(super) struct SimVolume {
    pub name: String,
    pub device: Device,
    pub consumers: Vec<SimConsumer>,
    pub client: Option<DbClient>,
    /// The highest epoch any grant (acquire or handover) of this volume carried (S4).
    pub max_epoch: u64,
    /// The node `IsolateHolder` cut off.
    pub isolated: Option<String>,
    /// Pods created so far (for fresh UIDs).
    pub pods_created: u64,
}

/// What happened to the volumes, for the figures and expectations.
#[derive(Debug, Default)]
pub(super) struct VolumeRecord {
    /// App starts: (real time, volume, consumer UID).
    pub app_started: Vec<(u64, String, String)>,
    /// Switchover requests: (real time, volume, holder then).
    pub requests: Vec<(u64, String, Option<String>)>,
    /// Holder faults (kill, freeze, isolation): (real time, volume, holder then).
    pub holder_faults: Vec<(u64, String, Option<String>)>,
    /// Nodes reset because a guard's deadline passed (watchdog withheld), or on a guard's
    /// request: (real time, node).
    pub fenced_by_deadline: Vec<(u64, String)>,
    /// Steps on which two consumers of one volume wrote.
    pub two_writer_steps: u64,
    /// Handovers the controller committed after fencing a holder's node.
    pub handovers: u64,
}

pub(super) fn to_core(stored: &Stored) -> Option<VolumeLease> {
    match &stored.obj {
        Obj::VolumeLease(l) => Some(VolumeLease {
            held_for_node: None,
            holder: l.holder.clone(),
            epoch: l.epoch,
            resource_version: stored.rv.to_string(),
            preferred_holder: l.preferred.clone(),
            released: l.released,
            handover: l.handover.clone(),
            duration: std::time::Duration::from_millis(l.duration_ms),
        }),
        _ => None,
    }
}

impl Cluster {
    /// Creates the volumes' Leases (as the controller does on opt-in: no holder, epoch 0) and
    /// their consumer pods.
    pub(super) fn add_volumes(&mut self, specs: &[VolumeSpec], client_records: u64) {
        for spec in specs {
            let _ = self.api.write(
                Key::VolumeLease(spec.name.clone()),
                Precondition::Create,
                Obj::VolumeLease(VolumeLeaseObj {
                    holder: None,
                    epoch: 0,
                    duration_ms: ms(self.cfg.volume_timing.duration),
                    preferred: None,
                    released: false,
                    handover: None,
                    request: None,
                    renew_seq: 0,
                }),
                0,
            );
            let mut v = SimVolume {
                name: spec.name.clone(),
                device: Device::default(),
                consumers: Vec::new(),
                client: (client_records > 0).then(|| DbClient {
                    total: client_records,
                    next: 1,
                    ..DbClient::default()
                }),
                max_epoch: 0,
                isolated: None,
                pods_created: 0,
            };
            for (k, node) in spec.consumers.iter().enumerate() {
                let start = if k == 0 { 0 } else { STANDBY_START_MS };
                let c = new_consumer(&mut v, k, node, start);
                let _ = self.api.write(
                    Key::Consumer(c.pod.clone()),
                    Precondition::Create,
                    Obj::Consumer(ConsumerObj {
                        volume: spec.name.clone(),
                        node: node.clone(),
                        uid: c.uid.clone(),
                        role_active: false,
                    }),
                    0,
                );
                v.consumers.push(c);
            }
            self.volumes.push(v);
        }
    }

    /// The consumer (volume index, consumer index) the volume's Lease names as holder now.
    pub(super) fn holder_of(&self, volume: &str) -> Option<(usize, usize)> {
        if !self.cfg.policy.is_twosite() {
            return self.alt_holder_of(volume);
        }
        let v = self.volumes.iter().position(|v| v.name == volume)?;
        let holder = self
            .api
            .get(&Key::VolumeLease(volume.to_string()))
            .and_then(to_core)
            .and_then(|l| l.holder().map(str::to_string))?;
        let c = self.volumes[v]
            .consumers
            .iter()
            .position(|c| c.uid == holder)?;
        Some((v, c))
    }

    /// Applies a volume fault; `false` if `fault` is not one.
    pub(super) fn apply_volume_fault(&mut self, fault: &Fault) -> bool {
        match fault {
            Fault::Switchover { volume, to } => {
                let holder = self.holder_of(volume).map(|(v, c)| self.uid(v, c));
                self.record
                    .volumes
                    .requests
                    .push((self.now, volume.clone(), holder));
                let target = match to {
                    None => node_health::volume::SwitchTarget::AnyStandby,
                    Some(k) => {
                        let uid = self
                            .volumes
                            .iter()
                            .find(|v| &v.name == volume)
                            .and_then(|v| v.consumers.get(*k))
                            .map_or_else(|| format!("no-such-consumer-{k}"), |c| c.uid.clone());
                        node_health::volume::SwitchTarget::To(uid)
                    }
                };
                // `twosite switchover` writes its request onto the Lease (read-modify-write).
                let key = Key::VolumeLease(volume.clone());
                if let Some(Stored {
                    rv,
                    obj: Obj::VolumeLease(mut l),
                }) = self.api.get(&key).cloned()
                {
                    l.request = Some(target);
                    let _ = self.write(key, Precondition::ResourceVersion(rv), Obj::VolumeLease(l));
                }
            }
            Fault::FreezeHolder { volume, for_ms } => {
                self.note_holder_fault(volume);
                if let Some((v, c)) = self.holder_of(volume)
                    && let Some(p) = self.volumes[v].consumers[c].proc.as_mut()
                {
                    p.frozen_until = self.now + for_ms;
                }
            }
            Fault::KillHolder(volume) => {
                self.note_holder_fault(volume);
                if let Some((v, c)) = self.holder_of(volume) {
                    self.kill_consumer(v, c);
                }
            }
            Fault::IsolateHolder(volume) => {
                self.note_holder_fault(volume);
                if let Some((v, c)) = self.holder_of(volume) {
                    let node = self.volumes[v].consumers[c].node.clone();
                    self.volumes[v].isolated = Some(node.clone());
                    if let Some(i) = self.node_idx(&node) {
                        self.nodes[i].isolated = true;
                    }
                }
            }
            Fault::ReconnectHolder(volume) => {
                let node = self
                    .volumes
                    .iter_mut()
                    .find(|v| &v.name == volume)
                    .and_then(|v| v.isolated.take());
                if let Some(i) = node.and_then(|n| self.node_idx(&n))
                    && self.nodes[i].isolated
                {
                    self.nodes[i].isolated = false;
                    self.nodes[i].reconnected_at = Some(self.now);
                }
            }
            // Faults of the world that take the holder with them: noted for the figures,
            // applied as usual.
            Fault::PowerOff(n) | Fault::Isolate(n) => {
                self.note_holder_faults(|c: &Cluster, node: &str| {
                    node == n && c.node_idx(n).is_some()
                });
                return false;
            }
            Fault::Cut(a, b) if *a == Site::Api || *b == Site::Api => {
                let room = if *a == Site::Api { *b } else { *a };
                self.note_holder_faults(|c: &Cluster, node: &str| {
                    c.node_idx(node).is_some_and(|i| c.nodes[i].room == room)
                });
                return false;
            }
            _ => return false,
        }
        true
    }

    /// Notes a holder fault for every volume whose holder's node `hit` says the fault reaches.
    fn note_holder_faults(&mut self, hit: impl Fn(&Cluster, &str) -> bool) {
        let names: Vec<String> = self.volumes.iter().map(|v| v.name.clone()).collect();
        for name in names {
            if let Some((v, c)) = self.holder_of(&name)
                && hit(self, &self.volumes[v].consumers[c].node)
            {
                self.note_holder_fault(&name);
            }
        }
    }

    fn uid(&self, v: usize, c: usize) -> String {
        self.volumes[v].consumers[c].uid.clone()
    }

    fn note_holder_fault(&mut self, volume: &str) {
        let holder = self.holder_of(volume).map(|(v, c)| self.uid(v, c));
        self.record
            .volumes
            .holder_faults
            .push((self.now, volume.to_string(), holder));
    }

    /// SIGKILL of the consumer's guard and app, and the pod deleted: its workload controller
    /// creates a new pod (a new UID) on the same node.
    fn kill_consumer(&mut self, v: usize, c: usize) {
        let old = self.volumes[v].consumers[c].pod.clone();
        let node = self.volumes[v].consumers[c].node.clone();
        self.volumes[v].consumers[c].proc = None;
        self.delete(&Key::Consumer(old.clone()));
        let k = self.volumes[v].consumers.len();
        let fresh = new_consumer(
            &mut self.volumes[v],
            k,
            &node,
            self.now + CONTAINER_START_MS,
        );
        let obj = ConsumerObj {
            volume: self.volumes[v].name.clone(),
            node: node.clone(),
            uid: fresh.uid.clone(),
            role_active: false,
        };
        let _ = self.write(
            Key::Consumer(fresh.pod.clone()),
            Precondition::Create,
            Obj::Consumer(obj),
        );
        self.log(
            &format!("pod/{old}"),
            format!(
                "killed (guard and app, SIGKILL); replaced by {} on {node}",
                fresh.pod
            ),
        );
        self.volumes[v].consumers[c] = fresh;
    }

    /// The node powered off or reset: its consumers' processes die with it; kubelet starts
    /// them again after the next boot.
    pub(super) fn volume_node_down(&mut self, node: &str) {
        for v in &mut self.volumes {
            for c in v.consumers.iter_mut().filter(|c| c.node == node) {
                c.proc = None;
                c.start_at = None;
            }
        }
    }

    pub(super) fn volume_node_up(&mut self, node: &str) {
        let at = self.now + CONTAINER_START_MS;
        for v in &mut self.volumes {
            for c in v.consumers.iter_mut().filter(|c| c.node == node) {
                c.start_at = Some(at);
            }
        }
    }

    /// The database client's step: records through the consumer the Service selects.
    pub(super) fn step_client(&mut self, v: usize) {
        if self.now < CLIENT_START_MS {
            return;
        }
        let name = self.volumes[v].name.clone();
        // The Service's endpoints: the consumer pods with the role label.
        let active: Vec<String> = self
            .api
            .objects()
            .filter_map(|(_, s)| match &s.obj {
                Obj::Consumer(c) if c.volume == name && c.role_active => Some(c.uid.clone()),
                _ => None,
            })
            .collect();
        let reach: BTreeSet<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| n.powered && self.node_reaches(*i, Site::Api))
            .map(|(_, n)| n.name.clone())
            .collect();
        let vol = &mut self.volumes[v];
        let Some(client) = vol.client.as_mut() else {
            return;
        };
        for _ in 0..CLIENT_RECORDS_PER_STEP {
            if client.next > client.total {
                return;
            }
            let target = vol
                .consumers
                .iter_mut()
                .find(|c| active.contains(&c.uid) && reach.contains(&c.node) && c.proc.is_some());
            let written = target
                .and_then(|c| c.proc.as_mut())
                .and_then(|p| p.app_write(&mut vol.device, client.next));
            if written.is_none() {
                client.retries += 1;
                return;
            }
            client.acked += 1;
            client.next += 1;
        }
    }
}

fn new_consumer(v: &mut SimVolume, k: usize, node: &str, start_at: u64) -> SimConsumer {
    v.pods_created += 1;
    let n = v.pods_created;
    SimConsumer {
        pod: format!("{}-consumer-{k}-{n}", v.name),
        uid: format!("uid-{}-{k}-{n}", v.name),
        node: node.to_string(),
        start_at: Some(start_at),
        proc: None,
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn one_writer_at_a_time_keeps_every_record_and_two_lose_some() {
        let mut d = Device::default();
        let mut a = d.mount();
        d.write(&mut a, 1);
        d.write(&mut a, 2);
        // A switch: the next writer mounts after the first stopped.
        let mut b = d.mount();
        d.write(&mut b, 3);
        assert_eq!(d.records, vec![1, 2, 3]);
        // Two writers at once: each writes its own view, the other's records are lost.
        let mut c = d.mount();
        d.write(&mut b, 4);
        d.write(&mut c, 5);
        assert_eq!(d.records, vec![1, 2, 3, 5]);
        assert!(d.formatted);
    }
}
