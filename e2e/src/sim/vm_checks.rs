//! The VM invariants — S1 for VM disks on every step, S4 for disk Lease epochs on every write,
//! twosite leaves VMs that did not opt in alone — and the VM scenarios' expectations and figures.

use super::api::{Key, Obj, Stored};
use super::cluster::Cluster;
use std::collections::{BTreeMap, BTreeSet};

/// What a VM scenario promises beyond the invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExpectation {
    /// No VM that first ran outside `lost` is ever stopped or moved.
    Undisturbed { lost: Vec<String> },
    /// Every opted-in VM that is to restart and first ran on a node of `lost` runs on a node
    /// outside `lost` within `within_ms` of `after_ms`.
    AllRunningElsewhere {
        lost: Vec<String>,
        after_ms: u64,
        within_ms: u64,
    },
}

impl Cluster {
    /// S1 for VM disks: at no instant do two guests using one claim run (on powered nodes).
    pub(super) fn check_vm_disks(&mut self) {
        if self.vm.specs.is_empty() {
            return;
        }
        let mut by_claim: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (pod, g) in &self.vm.guests {
            let on = self
                .node_idx(&g.node)
                .is_some_and(|i| self.nodes[i].powered && self.nodes[i].boot_id == g.boot_id);
            if on {
                by_claim
                    .entry(g.pvc.as_str())
                    .or_default()
                    .push(format!("{pod} on {}", g.node));
            }
        }
        let bad: Vec<String> = by_claim
            .into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(c, v)| format!("{c}: {} run at once", v.join(" and ")))
            .collect();
        if !bad.is_empty() {
            self.vm.record.two_running_steps += 1;
        }
        for b in bad {
            self.violate("S1-vm-disk", b);
        }
        self.track_vm_recovery();
    }

    /// S4 for disk Leases, and twosite leaves VMs that did not opt in alone.
    pub(super) fn check_disk_lease_write(
        &mut self,
        key: &Key,
        prev: Option<&Stored>,
        new: &Stored,
    ) {
        let (Key::DiskLease(name), Obj::DiskLease(l)) = (key, &new.obj) else {
            return;
        };
        let old = match prev.map(|p| &p.obj) {
            Some(Obj::DiskLease(o)) => Some(o.clone()),
            _ => None,
        };
        let max = self.vm.record.max_epoch.get(name).copied().unwrap_or(0);
        let mut problems = Vec::new();
        if let Some(o) = &old {
            if l.epoch < o.epoch {
                problems.push(format!(
                    "{name}: epoch went back from {} to {}",
                    o.epoch, l.epoch
                ));
            }
            if l.holder.is_some() && l.holder != o.holder && l.epoch <= max {
                problems.push(format!(
                    "{name}: granted to {:?} with epoch {}, not above epoch {max}",
                    l.holder, l.epoch
                ));
            }
        }
        self.vm
            .record
            .max_epoch
            .insert(name.clone(), max.max(l.epoch));
        let owner = self
            .vm
            .specs
            .iter()
            .find(|s| s.pvc() == l.pvc)
            .filter(|s| !s.opted_in())
            .map(|s| s.name.clone());
        if let Some(vm) = owner {
            problems.push(format!("{name}: a Lease for {vm}, which did not opt in"));
        }
        for p in problems {
            self.violate("S4-monotonic-epochs", p);
        }
    }

    /// The first instant every opted-in VM of the lost nodes runs elsewhere.
    fn track_vm_recovery(&mut self) {
        if self.vm.record.all_running_at.is_some() {
            return;
        }
        let Some((lost, after)) = self.vm.expectations.iter().find_map(|e| match e {
            VmExpectation::AllRunningElsewhere { lost, after_ms, .. } => Some((lost, *after_ms)),
            _ => None,
        }) else {
            return;
        };
        if self.now < after {
            return;
        }
        let all = self.vms_to_move(lost).iter().all(|vm| {
            self.vm.guests.values().any(|g| {
                g.vm == *vm
                    && !lost.contains(&g.node)
                    && self
                        .node_idx(&g.node)
                        .is_some_and(|i| self.nodes[i].powered)
            })
        });
        if all {
            self.vm.record.all_running_at = Some(self.now);
        }
    }

    /// The opted-in, restarting VMs that first ran on a node of `lost`.
    fn vms_to_move(&self, lost: &[String]) -> Vec<String> {
        self.vm
            .specs
            .iter()
            .filter(|s| {
                s.opted_in()
                    && lost.contains(&s.node)
                    && node_health::vm::RunStrategy::parse(Some(&s.run_strategy), None)
                        .restarts_after_loss()
            })
            .map(|s| s.name.clone())
            .collect()
    }

    /// VMs that first ran outside `lost` and were stopped or moved.
    fn disturbed(&self, lost: &[String]) -> Vec<String> {
        let r = &self.vm.record;
        self.vm
            .specs
            .iter()
            .filter(|s| !lost.contains(&s.node))
            .filter(|s| {
                r.stopped.iter().any(|(_, vm, _)| *vm == s.name)
                    || r.started.iter().any(|(t, vm, _)| *t > 0 && *vm == s.name)
            })
            .map(|s| s.name.clone())
            .collect()
    }

    /// Twosite acted on a VM that did not opt in.
    fn touched_unopted(&self) -> Vec<String> {
        self.vm
            .specs
            .iter()
            .filter(|s| !s.opted_in() && self.vm.record.touched.contains(&s.name))
            .map(|s| s.name.clone())
            .collect()
    }

    /// The VM figures: `vms`, `vms_failed_over`, `vms_untouched`, `vms_disturbed`,
    /// `time_to_all_vms_running_ms`, `vm_two_running_steps`, `vm_failover_max_ms`.
    pub(super) fn vm_figures(&self, figures: &mut BTreeMap<String, u64>) {
        if self.vm.specs.is_empty() {
            return;
        }
        let r = &self.vm.record;
        figures.insert("vms".into(), self.vm.specs.len() as u64);
        let moved: BTreeSet<&String> = r
            .started
            .iter()
            .filter(|(t, vm, node)| {
                *t > 0
                    && self
                        .vm
                        .spec(vm)
                        .is_some_and(|s| s.opted_in() && s.node != *node)
            })
            .map(|(_, vm, _)| vm)
            .collect();
        figures.insert("vms_failed_over".into(), moved.len() as u64);
        let untouched = self
            .vm
            .specs
            .iter()
            .filter(|s| !s.opted_in() && !r.touched.contains(&s.name))
            .count();
        figures.insert("vms_untouched".into(), untouched as u64);
        figures.insert("vm_two_running_steps".into(), r.two_running_steps);
        if let Some(max) = r.failovers.iter().max() {
            figures.insert("vm_failover_max_ms".into(), *max);
        }
        for e in &self.vm.expectations {
            match e {
                VmExpectation::Undisturbed { lost } => {
                    figures.insert("vms_disturbed".into(), self.disturbed(lost).len() as u64);
                }
                VmExpectation::AllRunningElsewhere { after_ms, .. } => {
                    if let Some(t) = r.all_running_at {
                        figures.insert("time_to_all_vms_running_ms".into(), t - after_ms);
                    }
                }
            }
        }
    }

    /// The VM expectations, and on every run: twosite never acted on a VM that did not opt in.
    pub(super) fn check_vm_expectations(&mut self) {
        let mut unmet = Vec::new();
        for vm in self.touched_unopted() {
            unmet.push((
                "vm-left-alone",
                format!("twosite acted on VM {vm}, which did not opt in"),
            ));
        }
        for e in self.vm.expectations.clone() {
            match e {
                VmExpectation::Undisturbed { lost } => {
                    let d = self.disturbed(&lost);
                    if !d.is_empty() {
                        unmet.push((
                            "vms-undisturbed",
                            format!(
                                "VMs of the surviving nodes stopped or moved: {}",
                                d.join(", ")
                            ),
                        ));
                    }
                }
                VmExpectation::AllRunningElsewhere {
                    lost,
                    after_ms,
                    within_ms,
                } => {
                    // Running elsewhere at the end too, not only once.
                    let missing: Vec<String> = self
                        .vms_to_move(&lost)
                        .into_iter()
                        .filter(|vm| {
                            !self
                                .vm
                                .guests
                                .values()
                                .any(|g| g.vm == *vm && !lost.contains(&g.node))
                        })
                        .collect();
                    let got = self.vm.record.all_running_at;
                    if got.is_none_or(|t| t - after_ms > within_ms) || !missing.is_empty() {
                        unmet.push((
                            "expectation",
                            format!(
                                "the VMs of the lost nodes did not all run elsewhere within {within_ms} ms of {after_ms} ms ({:?}); not running now: {}",
                                got.map(|t| t - after_ms),
                                missing.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        for (inv, u) in unmet {
            self.violate(inv, u);
        }
    }

    /// Liveness for VMs (random schedules): when the last fault lies [`VM_QUIET_MS`] back, no
    /// link is cut, no Node object was deleted, and every node is powered, connected and runs its
    /// agent, with no reset or lost right meanwhile, every VM that is to run (runStrategy Always
    /// or RerunOnFailure) runs.
    pub(super) fn check_vm_liveness(&mut self, scenario: &super::scenario::Scenario) {
        if self.vm.specs.is_empty() {
            return;
        }
        let last_fault = scenario.faults.iter().map(|f| f.at_ms).max().unwrap_or(0);
        let end = self.now;
        let deleted = scenario
            .faults
            .iter()
            .any(|f| matches!(f.fault, super::scenario::Fault::DeleteNode(_)));
        if last_fault + VM_QUIET_MS > end || !self.cut.is_empty() || deleted {
            return;
        }
        let since = end - VM_QUIET_MS;
        let r = &self.record;
        let recent = |list: &[(u64, String)]| list.iter().any(|(t, _)| *t >= since);
        let calm = self
            .nodes
            .iter()
            .all(|n| n.powered && !n.isolated && n.agent.is_some() && n.reboot_at.is_none())
            && !recent(&r.watchdog_fired)
            && !recent(&r.right_lost)
            && !recent(&r.volumes.fenced_by_deadline);
        if !calm {
            return;
        }
        let down: Vec<String> = self
            .vm
            .specs
            .iter()
            .filter(|s| {
                node_health::vm::RunStrategy::parse(Some(&s.run_strategy), None)
                    .restarts_after_loss()
                    && !self.vm.guests.values().any(|g| g.vm == s.name)
            })
            .map(|s| s.name.clone())
            .collect();
        for vm in down {
            self.violate(
                "liveness-vm",
                format!(
                    "VM {vm} does not run {} ms after the last fault, every node healthy",
                    end - last_fault
                ),
            );
        }
    }
}

/// How long after the last fault of a random schedule every VM must run again.
pub const VM_QUIET_MS: u64 = 60_000;
