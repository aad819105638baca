//! The leading controller replica's volume work: for each protected volume, the core
//! ([`VolumeSwitch`](node_health::volume::VolumeSwitch)) decides from the replica's watch caches — the Lease, the consumer pods,
//! the remediation phases and verdicts ([`node_sets`]) of their nodes — and this shell
//! writes what it says: the handover, the preferred holder, the role labels, the Events.

use super::api::{ConsumerObj, Key, Obj, Precondition, Stored, VolumeLeaseObj};
use super::cluster::Cluster;
use super::replica::Replica;
use node_health::MonoTime;
use node_health::volume::{Consumer, VolumeAction, VolumeFacts, VolumeLease, node_sets};
use std::time::Duration;

impl Cluster {
    pub(super) fn lead_volumes(&mut self, i: usize, local: MonoTime) {
        let r = &self.replicas[i];
        if r.volumes.is_empty() {
            return;
        }
        let (mut fenced, live) = node_sets(&r.verdicts, &r.remediation);
        if self.cfg.handover_on_suspicion {
            // The faulty controller: anything not Healthy counts as fenced.
            fenced = r
                .verdicts
                .iter()
                .filter(|(_, v)| **v != node_health::NodeVerdict::Healthy)
                .map(|(n, _)| n.clone())
                .collect();
        }
        let timing = self.cfg.volume_timing;
        let names: Vec<String> = r.volumes.keys().cloned().collect();
        let actor = r.name.clone();
        for name in names {
            let Some((rv, obj)) = self.replicas[i].volumes.get(&name).cloned() else {
                continue;
            };
            let lease = VolumeLease {
                held_for_node: None,
                holder: obj.holder.clone(),
                epoch: obj.epoch,
                resource_version: rv.to_string(),
                preferred_holder: obj.preferred.clone(),
                released: obj.released,
                handover: obj.handover.clone(),
                duration: Duration::from_millis(obj.duration_ms),
            };
            let pods: Vec<(String, ConsumerObj)> = self.replicas[i]
                .consumers
                .iter()
                .filter(|(_, c)| c.volume == name)
                .map(|(p, c)| (p.clone(), c.clone()))
                .collect();
            let consumers: Vec<Consumer> = pods
                .iter()
                .map(|(_, c)| Consumer {
                    identity: c.uid.clone(),
                    node: c.node.clone(),
                    role_active: c.role_active,
                })
                .collect();
            let facts = VolumeFacts {
                lease: &lease,
                consumers: &consumers,
                fenced_nodes: &fenced,
                live_nodes: &live,
                request: obj.request.as_ref(),
            };
            let actions = self.replicas[i]
                .switches
                .entry(name.clone())
                .or_default()
                .step(&facts, local, &timing);
            for a in actions {
                self.volume_action(&actor, &name, rv, &obj, &pods, a);
            }
        }
    }

    fn volume_action(
        &mut self,
        actor: &str,
        volume: &str,
        rv: u64,
        obj: &VolumeLeaseObj,
        pods: &[(String, ConsumerObj)],
        action: VolumeAction,
    ) {
        let key = Key::VolumeLease(volume.to_string());
        let mut lease = obj.clone();
        let expected = match &action {
            VolumeAction::HandOver { expected_rv, .. }
            | VolumeAction::SetPreferred { expected_rv, .. }
            | VolumeAction::ClearPreferred { expected_rv }
            | VolumeAction::DropRequest { expected_rv } => expected_rv.parse::<u64>().ok(),
            _ => None,
        };
        match action {
            VolumeAction::HandOver { handover, .. } => {
                self.check_handover(volume, obj.holder.as_deref());
                lease.handover = Some(handover);
            }
            VolumeAction::SetPreferred { to, .. } => {
                lease.preferred = Some(to);
                lease.request = None;
            }
            VolumeAction::ClearPreferred { .. } => {
                lease.preferred = None;
            }
            VolumeAction::DropRequest { .. } => {
                lease.request = None;
            }
            VolumeAction::SetRole { identity, active } => {
                // The shell reads the pod first: a label already as asked is not written again.
                let current = |pod: &str| match self.api.get(&Key::Consumer(pod.to_string())) {
                    Some(Stored {
                        obj: Obj::Consumer(c),
                        ..
                    }) => Some(c.role_active),
                    _ => None,
                };
                if let Some((pod, c)) = pods
                    .iter()
                    .find(|(p, c)| c.uid == identity && current(p).is_some_and(|a| a != active))
                {
                    let mut c = c.clone();
                    c.role_active = active;
                    let done = self
                        .write(
                            Key::Consumer(pod.clone()),
                            Precondition::None,
                            Obj::Consumer(c),
                        )
                        .is_ok();
                    if done {
                        self.log(
                            actor,
                            format!(
                                "{pod}: role label {}",
                                if active { "set (active)" } else { "removed" }
                            ),
                        );
                    }
                }
                return;
            }
            VolumeAction::Event { reason, message } => {
                self.log(
                    actor,
                    format!("Event {} on {volume}: {message}", reason.as_str()),
                );
                return;
            }
        }
        // The Lease write, with the resourceVersion it was decided on; a conflict is decided
        // again on the next pass.
        if let Some(rv_want) = expected.filter(|e| *e == rv)
            && self
                .write(
                    key,
                    Precondition::ResourceVersion(rv_want),
                    Obj::VolumeLease(lease.clone()),
                )
                .is_ok()
        {
            let what = if let Some(h) = lease.handover.as_ref().filter(|_| obj.handover.is_none()) {
                self.record.volumes.handovers += 1;
                format!("handed over to {} (epoch {})", h.to, h.epoch)
            } else if lease.preferred != obj.preferred {
                match &lease.preferred {
                    Some(p) => format!("preferred holder set to {p}"),
                    None => "preferred holder cleared".into(),
                }
            } else {
                "switchover request dropped".into()
            };
            self.log(actor, format!("{volume}: {what}"));
        }
    }
}

/// What the controller's watches do with a volume Lease or consumer pod event.
pub(super) fn apply_volume_event(r: &mut Replica, key: Key, value: Option<Stored>) {
    match (key, value) {
        (
            Key::VolumeLease(v),
            Some(Stored {
                rv,
                obj: Obj::VolumeLease(l),
            }),
        ) => {
            r.volumes.insert(v, (rv, l));
        }
        (Key::VolumeLease(v), _) => {
            r.volumes.remove(&v);
        }
        (
            Key::Consumer(p),
            Some(Stored {
                obj: Obj::Consumer(c),
                ..
            }),
        ) => {
            r.consumers.insert(p, c);
        }
        (Key::Consumer(p), _) => {
            r.consumers.remove(&p);
        }
        _ => {}
    }
}
