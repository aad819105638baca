//! The leading controller replica's VM work: for each VirtualMachine in its watch caches the
//! core ([`VmProtection`]) decides — from the VM, its claims, its disk Leases, its launcher pods
//! and the fenced and live nodes ([`node_sets`]) — and this shell writes what it says, in order,
//! stopping at the first failed write. Also the release of a fenced node's launcher pods
//! ([`release_when_fenced`]).

use super::api::{Key, Obj, Precondition, Stored};
use super::cluster::Cluster;
use super::kubevirt::{DiskLeaseObj, LauncherObj, VmObj};
use super::replica::Replica;
use node_health::MonoTime;
use node_health::vm::{
    Launcher, PodOwner, RunStrategy, VmAction, VmFacts, VmProtection, classify_disk, opt_in,
    release_when_fenced,
};
use node_health::volume::{VolumeLease, node_sets};
use std::collections::BTreeMap;
use std::time::Duration;

/// The controller's VM pass period.
const VM_PASS: Duration = Duration::from_millis(500);

/// A replica's VM watch caches and the core's per-VM state while leading.
#[derive(Debug, Default)]
pub(super) struct VmCache {
    pub vms: BTreeMap<String, VmObj>,
    pub launchers: BTreeMap<String, LauncherObj>,
    pub leases: BTreeMap<String, (u64, DiskLeaseObj)>,
    pub protections: BTreeMap<String, VmProtection>,
    pub next_pass: Option<MonoTime>,
}

impl VmCache {
    /// A re-list forgets what was deleted meanwhile.
    pub fn retain_listed(&mut self, listed: &[&Key]) {
        self.vms
            .retain(|n, _| listed.iter().any(|k| **k == Key::Vm(n.clone())));
        self.launchers
            .retain(|n, _| listed.iter().any(|k| **k == Key::Launcher(n.clone())));
        self.leases
            .retain(|n, _| listed.iter().any(|k| **k == Key::DiskLease(n.clone())));
    }
}

/// What the controller's watches do with a VM, launcher pod or disk Lease event.
pub(super) fn apply_vm_event(r: &mut Replica, key: Key, value: Option<Stored>) {
    let c = &mut r.vms;
    match (key, value.map(|s| (s.rv, s.obj))) {
        (Key::Vm(n), Some((_, Obj::Vm(v)))) => {
            c.vms.insert(n, v);
        }
        (Key::Vm(n), _) => {
            c.vms.remove(&n);
            c.protections.remove(&n);
        }
        (Key::Launcher(n), Some((_, Obj::Launcher(l)))) => {
            c.launchers.insert(n, l);
        }
        (Key::Launcher(n), _) => {
            c.launchers.remove(&n);
        }
        (Key::DiskLease(n), Some((rv, Obj::DiskLease(l)))) => {
            c.leases.insert(n, (rv, l));
        }
        (Key::DiskLease(n), _) => {
            c.leases.remove(&n);
        }
        _ => {}
    }
}

fn to_core(rv: u64, l: &DiskLeaseObj) -> VolumeLease {
    VolumeLease {
        held_for_node: l.held_for_node.clone(),
        holder: l.holder.clone(),
        epoch: l.epoch,
        resource_version: rv.to_string(),
        preferred_holder: None,
        released: l.released,
        handover: None,
        duration: Duration::ZERO,
    }
}

impl Cluster {
    /// One VM pass of the leader (every [`VM_PASS`] on its clock).
    pub(super) fn lead_vms(&mut self, i: usize, local: MonoTime) {
        let r = &self.replicas[i];
        if r.vms.vms.is_empty() || r.vms.next_pass.is_some_and(|t| local < t) {
            return;
        }
        let (fenced, live) = node_sets(&r.verdicts, &r.remediation);
        let actor = r.name.clone();
        let names: Vec<String> = r.vms.vms.keys().cloned().collect();
        self.replicas[i].vms.next_pass = Some(local + VM_PASS);
        if self.cfg.vm_release_on_suspicion {
            self.release_suspects(i, &actor);
        }
        for vm in names {
            let c = &self.replicas[i].vms;
            let Some(obj) = c.vms.get(&vm).cloned() else {
                continue;
            };
            let disks: Vec<_> = obj
                .disks
                .iter()
                .map(|pvc| {
                    let claim = match self.api.get(&Key::Claim(pvc.clone())) {
                        Some(Stored {
                            obj: Obj::Claim(f), ..
                        }) => Some(f.clone()),
                        _ => None,
                    };
                    classify_disk(pvc, claim.as_ref())
                })
                .collect();
            let leases: BTreeMap<String, VolumeLease> = c
                .leases
                .iter()
                .map(|(n, (rv, l))| (n.clone(), to_core(*rv, l)))
                .filter(|(n, _)| disks.iter().any(|d| d.protection.as_ref() == Ok(n)))
                .collect();
            let launchers: Vec<Launcher> = c
                .launchers
                .iter()
                .filter(|(_, l)| l.vm == vm)
                .map(|(n, l)| Launcher {
                    uid: l.uid.clone(),
                    name: n.clone(),
                    node: l.node.clone(),
                    gated: l.gated,
                    phase: l.phase,
                    deleting: l.terminating,
                    created: format!("{:020}", l.created),
                })
                .collect();
            let opt = opt_in(obj.annotation.as_deref());
            let strategy = RunStrategy::parse(Some(&obj.run_strategy), None);
            let facts = VmFacts {
                opt_in: &opt,
                run_strategy: &strategy,
                template_labelled: obj.template_labelled,
                disks: &disks,
                leases: &leases,
                launchers: &launchers,
                fenced_nodes: &fenced,
                live_nodes: &live,
            };
            let (actions, _) = self.replicas[i]
                .vms
                .protections
                .entry(vm.clone())
                .or_default()
                .step(&facts, local);
            for a in actions {
                if self.vm_action(&actor, &vm, a).is_err() {
                    break;
                }
            }
        }
    }

    /// Executes one VM action as the controller's shell would.
    fn vm_action(&mut self, actor: &str, vm: &str, action: VmAction) -> Result<(), ()> {
        let rv_of = |s: &str| s.parse::<u64>().map_err(|_| ());
        match action {
            VmAction::SetTemplateLabel { on } => {
                let Some(Stored {
                    rv,
                    obj: Obj::Vm(mut v),
                }) = self.api.get(&Key::Vm(vm.to_string())).cloned()
                else {
                    return Err(());
                };
                v.template_labelled = on;
                self.write(
                    Key::Vm(vm.to_string()),
                    Precondition::ResourceVersion(rv),
                    Obj::Vm(v),
                )?;
                self.log(
                    actor,
                    format!("VM {vm}: template label twosite.dev/ha={on}"),
                );
            }
            VmAction::CreateLease { lease, pvc } => {
                self.vm.record.touched.insert(vm.to_string());
                self.write(
                    Key::DiskLease(lease.clone()),
                    Precondition::Create,
                    Obj::DiskLease(DiskLeaseObj {
                        pvc,
                        holder: None,
                        epoch: 0,
                        held_for_node: None,
                        released: false,
                    }),
                )?;
                self.log(actor, format!("VM {vm}: created {lease}"));
            }
            VmAction::Grant {
                lease,
                expected_rv,
                to,
                node,
                epoch,
            } => {
                self.vm.record.touched.insert(vm.to_string());
                let key = Key::DiskLease(lease.clone());
                let pvc = match self.api.get(&key) {
                    Some(Stored {
                        obj: Obj::DiskLease(l),
                        ..
                    }) => l.pvc.clone(),
                    _ => return Err(()),
                };
                self.write(
                    key,
                    Precondition::ResourceVersion(rv_of(&expected_rv)?),
                    Obj::DiskLease(DiskLeaseObj {
                        pvc,
                        holder: Some(to.clone()),
                        epoch,
                        held_for_node: Some(node.clone().unwrap_or_default()),
                        released: false,
                    }),
                )?;
                self.log(
                    actor,
                    format!("VM {vm}: {lease} granted to {to} (epoch {epoch})"),
                );
            }
            VmAction::RecordNode {
                lease,
                expected_rv,
                node,
            } => {
                self.update_disk_lease(&lease, &expected_rv, |l| l.held_for_node = Some(node))?;
            }
            VmAction::Release { lease, expected_rv } => {
                self.update_disk_lease(&lease, &expected_rv, |l| l.released = true)?;
                self.log(actor, format!("VM {vm}: {lease} released"));
            }
            VmAction::Ungate { pod, uid } => {
                self.vm.record.touched.insert(vm.to_string());
                let key = Key::Launcher(pod.clone());
                let Some(Stored {
                    rv,
                    obj: Obj::Launcher(mut l),
                }) = self.api.get(&key).cloned()
                else {
                    return Err(());
                };
                if l.uid != uid {
                    return Err(());
                }
                if l.gated {
                    l.gated = false;
                    self.write(key, Precondition::ResourceVersion(rv), Obj::Launcher(l))?;
                    self.log(actor, format!("VM {vm}: {pod} ungated"));
                }
            }
            VmAction::Event { reason, message } => {
                self.log(
                    actor,
                    format!("Event {} on VM {vm}: {message}", reason.as_str()),
                );
            }
            VmAction::FailoverCompleted { duration } => {
                self.vm.record.failovers.push(super::cluster::ms(duration));
            }
        }
        Ok(())
    }

    fn update_disk_lease(
        &mut self,
        lease: &str,
        expected_rv: &str,
        f: impl FnOnce(&mut DiskLeaseObj),
    ) -> Result<(), ()> {
        let key = Key::DiskLease(lease.to_string());
        let Some(Stored {
            obj: Obj::DiskLease(mut l),
            ..
        }) = self.api.get(&key).cloned()
        else {
            return Err(());
        };
        f(&mut l);
        let rv = expected_rv.parse::<u64>().map_err(|_| ())?;
        self.write(key, Precondition::ResourceVersion(rv), Obj::DiskLease(l))
            .map(|_| ())
    }

    /// The launcher pods the remediation's release deletes on a proven-fenced node: those of
    /// VMs that opted in (the core's [`release_when_fenced`]), as (pod, VM).
    pub(super) fn releasable_launchers(&self, node: &str) -> Vec<(String, String)> {
        super::kubevirt::launchers(self)
            .into_iter()
            .filter(|(_, _, l)| l.node.as_deref() == Some(node))
            .filter(|(_, _, l)| {
                let opted = match self.api.get(&Key::Vm(l.vm.clone())) {
                    Some(Stored {
                        obj: Obj::Vm(v), ..
                    }) => Some(opt_in(v.annotation.as_deref()).is_in()),
                    _ => None,
                };
                release_when_fenced(PodOwner::Launcher(opted))
            })
            .map(|(p, _, l)| (p, l.vm))
            .collect()
    }

    /// Deletes the launcher pods `releasable_launchers` named (grace 0); returns how many.
    pub(super) fn release_launchers(&mut self, doomed: &[(String, String)]) -> usize {
        for (pod, vm) in doomed {
            self.vm.record.touched.insert(vm.clone());
            self.delete(&Key::Launcher(pod.clone()));
        }
        doomed.len()
    }

    /// The faulty shell of `vm_release_on_suspicion`: it deletes the launcher pods of opted-in
    /// VMs on any node it does not judge Healthy, without waiting for the fence.
    fn release_suspects(&mut self, i: usize, actor: &str) {
        let suspects: Vec<String> = self.replicas[i]
            .verdicts
            .iter()
            .filter(|(_, v)| **v != node_health::NodeVerdict::Healthy)
            .map(|(n, _)| n.clone())
            .collect();
        for n in suspects {
            let doomed = self.releasable_launchers(&n);
            let k = self.release_launchers(&doomed);
            if k > 0 {
                self.log(
                    actor,
                    format!("released {k} launcher pod(s) of suspect {n}"),
                );
            }
        }
    }
}
