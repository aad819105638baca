//! KubeVirt as the world runs it: VirtualMachines, their virt-launcher pods and the guests in
//! them. virt-controller re-creates a lost instance (a new launcher pod, through the API server
//! and twosite's mutating webhook) once the old launcher pod is gone; kube-scheduler binds an
//! ungated launcher pod; the kubelet starts it, reports it Failed after a reboot, stops and
//! removes it when it is deleted; the taint eviction and the pod garbage collector treat it as any
//! pod.
//!
//! Every decision of twosite's (the webhook's gate, the controller's grants) comes from
//! `node_health::vm`; this file is the world and its IO.

use super::api::{Key, Obj, Precondition, Stored};
use super::cluster::Cluster;
use super::scenario::Site;
use node_health::Readiness;
use node_health::vm::{Admission, AdmissionFacts, ClaimFacts, LauncherPhase, admit, opt_in};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// virt-controller sees the old launcher pod gone (its watch) and creates the new VMI and pod.
const VIRT_CONTROLLER_DELAY_MS: u64 = 1_000;
/// The kubelet starts a bound launcher pod's containers this long after the binding (the guest's
/// boot is not counted: a running launcher pod is a running VM here).
const LAUNCHER_START_MS: u64 = 1_500;
/// The kubelet stops a deleted launcher pod on a live node and removes it after this long.
const LAUNCHER_STOP_MS: u64 = 1_000;

/// A VM of a scenario: where its first launcher pod runs, and its disk's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    /// The value of `twosite.dev/ha` (`None`: not annotated).
    pub annotation: Option<String>,
    pub run_strategy: String,
    pub node: String,
    /// The claim is ReadWriteMany and Block (else ReadWriteOnce, Filesystem).
    pub rwx_block: bool,
}

impl VmSpec {
    pub fn new(name: &str, node: &str, annotated: bool) -> Self {
        VmSpec {
            name: name.into(),
            annotation: annotated.then(|| "true".into()),
            run_strategy: "Always".into(),
            node: node.into(),
            rwx_block: true,
        }
    }

    pub fn pvc(&self) -> String {
        format!("{}-disk", self.name)
    }

    pub fn opted_in(&self) -> bool {
        opt_in(self.annotation.as_deref()).is_in()
    }
}

/// A VirtualMachine as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmObj {
    pub annotation: Option<String>,
    pub run_strategy: String,
    /// `spec.template.metadata.labels` carries `twosite.dev/ha=true`.
    pub template_labelled: bool,
    /// The PVCs of its disks.
    pub disks: Vec<String>,
}

/// A virt-launcher pod as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherObj {
    pub vm: String,
    pub uid: String,
    /// `spec.nodeName`, once bound.
    pub node: Option<String>,
    /// Carries the scheduling gate `twosite.dev/volume-leases`.
    pub gated: bool,
    /// The webhook's preferred node (a node affinity preference).
    pub prefer_node: Option<String>,
    pub phase: LauncherPhase,
    /// Has a deletion timestamp.
    pub terminating: bool,
    /// creationTimestamp (real ms).
    pub created: u64,
    /// When the binding was written (real ms).
    pub bound_at: Option<u64>,
}

/// A VM disk's Lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLeaseObj {
    pub pvc: String,
    pub holder: Option<String>,
    pub epoch: u64,
    /// `twosite.dev/held-for-node`.
    pub held_for_node: Option<String>,
    pub released: bool,
}

/// A guest running: the launcher pod's containers on a node, in one boot of it.
#[derive(Debug, Clone)]
pub(super) struct Guest {
    pub vm: String,
    pub pvc: String,
    pub node: String,
    pub boot_id: u64,
}

/// What happened to the VMs, for the checks and figures.
#[derive(Debug, Default)]
pub(super) struct VmRecord {
    /// Guest starts: (real time, VM, node).
    pub started: Vec<(u64, String, String)>,
    /// Guest stops: (real time, VM, node).
    pub stopped: Vec<(u64, String, String)>,
    /// VMs twosite acted on (deleted a launcher pod, gated one, created or granted a Lease).
    pub touched: BTreeSet<String>,
    /// Steps on which two guests of one claim ran.
    pub two_running_steps: u64,
    /// Failovers the controller reported complete (ms).
    pub failovers: Vec<u64>,
    /// The first instant every VM of the lost nodes ran in the other room.
    pub all_running_at: Option<u64>,
    /// The highest epoch granted on each disk Lease.
    pub max_epoch: BTreeMap<String, u64>,
}

/// The KubeVirt world: its specs, guests, timers and randomness.
#[derive(Debug)]
pub(super) struct VmWorld {
    pub specs: Vec<VmSpec>,
    /// Running guests, by launcher pod name.
    pub guests: BTreeMap<String, Guest>,
    /// When virt-controller creates each VM's next launcher pod.
    pub recreate_at: BTreeMap<String, u64>,
    /// When kube-scheduler sees each ungated, unbound launcher pod.
    pub schedulable_at: BTreeMap<String, u64>,
    pub next_uid: u64,
    pub rng: ChaCha8Rng,
    pub record: VmRecord,
    pub expectations: Vec<super::vm_checks::VmExpectation>,
}

impl VmWorld {
    pub fn new(seed: u64) -> Self {
        VmWorld {
            specs: Vec::new(),
            guests: BTreeMap::new(),
            recreate_at: BTreeMap::new(),
            schedulable_at: BTreeMap::new(),
            next_uid: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6b75_6265_7669_7274),
            record: VmRecord::default(),
            expectations: Vec::new(),
        }
    }

    pub fn spec(&self, vm: &str) -> Option<&VmSpec> {
        self.specs.iter().find(|s| s.name == vm)
    }
}

pub(super) fn launchers(c: &Cluster) -> Vec<(String, u64, LauncherObj)> {
    c.api
        .objects()
        .filter_map(|(k, s)| match (k, &s.obj) {
            (Key::Launcher(p), Obj::Launcher(l)) => Some((p.clone(), s.rv, l.clone())),
            _ => None,
        })
        .collect()
}

impl Cluster {
    /// The scenario's VMs, each running on its node from the start (created before twosite).
    pub(super) fn add_vms(&mut self, specs: &[VmSpec]) {
        for spec in specs {
            let (modes, mode) = if spec.rwx_block {
                ("ReadWriteMany", Some("Block".to_string()))
            } else {
                ("ReadWriteOnce", None)
            };
            let _ = self.api.write(
                Key::Claim(spec.pvc()),
                Precondition::Create,
                Obj::Claim(ClaimFacts {
                    access_modes: vec![modes.into()],
                    volume_mode: mode,
                }),
                0,
            );
            let _ = self.api.write(
                Key::Vm(spec.name.clone()),
                Precondition::Create,
                Obj::Vm(VmObj {
                    annotation: spec.annotation.clone(),
                    run_strategy: spec.run_strategy.clone(),
                    template_labelled: false,
                    disks: vec![spec.pvc()],
                }),
                0,
            );
            let pod = self.new_launcher_name(&spec.name);
            let uid = format!("uid-{pod}");
            let _ = self.api.write(
                Key::Launcher(pod.clone()),
                Precondition::Create,
                Obj::Launcher(LauncherObj {
                    vm: spec.name.clone(),
                    uid,
                    node: Some(spec.node.clone()),
                    gated: false,
                    prefer_node: None,
                    phase: LauncherPhase::Running,
                    terminating: false,
                    created: 0,
                    bound_at: Some(0),
                }),
                0,
            );
            let boot_id = self
                .node_idx(&spec.node)
                .map_or(0, |i| self.nodes[i].boot_id);
            self.vm.guests.insert(
                pod,
                Guest {
                    vm: spec.name.clone(),
                    pvc: spec.pvc(),
                    node: spec.node.clone(),
                    boot_id,
                },
            );
            self.vm
                .record
                .started
                .push((0, spec.name.clone(), spec.node.clone()));
            self.vm.specs.push(spec.clone());
        }
    }

    fn new_launcher_name(&mut self, vm: &str) -> String {
        self.vm.next_uid += 1;
        format!("virt-launcher-{vm}-{}", self.vm.next_uid)
    }

    /// KubeVirt and the kubelets' launcher work, one tick.
    pub(super) fn step_kubevirt(&mut self) {
        if self.vm.specs.is_empty() {
            return;
        }
        self.step_guests();
        self.step_launcher_kubelets();
        self.step_virt_controller();
        self.step_launcher_scheduling();
    }

    /// A guest dies with its node's power (or a reset: a new boot).
    fn step_guests(&mut self) {
        let dead: Vec<String> = self
            .vm
            .guests
            .iter()
            .filter(|(_, g)| {
                self.node_idx(&g.node)
                    .is_none_or(|i| !self.nodes[i].powered || self.nodes[i].boot_id != g.boot_id)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in dead {
            self.stop_guest(&p, "its node lost power");
        }
    }

    fn stop_guest(&mut self, pod: &str, why: &str) {
        if let Some(g) = self.vm.guests.remove(pod) {
            self.vm
                .record
                .stopped
                .push((self.now, g.vm.clone(), g.node.clone()));
            self.log(
                &format!("kubevirt/{}", g.node),
                format!("VM {} stopped ({pod}): {why}", g.vm),
            );
        }
    }

    /// Each powered kubelet that reaches the API server: start bound launcher pods, report those
    /// of an earlier boot Failed, stop and remove deleted ones, and stop guests whose pod is gone.
    fn step_launcher_kubelets(&mut self) {
        let all = launchers(self);
        let known: BTreeSet<&String> = all.iter().map(|(p, _, _)| p).collect();
        let orphans: Vec<String> = self
            .vm
            .guests
            .iter()
            .filter(|(p, g)| !known.contains(p) && self.kubelet_sees(&g.node))
            .map(|(p, _)| p.clone())
            .collect();
        for p in orphans {
            self.stop_guest(&p, "its launcher pod was deleted");
        }
        for (pod, rv, mut l) in all {
            let Some(node) = l.node.clone() else {
                continue;
            };
            if !self.kubelet_sees(&node) {
                continue;
            }
            let key = Key::Launcher(pod.clone());
            if l.terminating {
                self.stop_guest(&pod, "its launcher pod is being deleted");
                if self
                    .api
                    .last_write(&key)
                    .is_some_and(|t| self.now >= t + LAUNCHER_STOP_MS)
                {
                    self.delete(&key);
                }
                continue;
            }
            let boot_id = self.node_idx(&node).map_or(0, |i| self.nodes[i].boot_id);
            let running = self
                .vm
                .guests
                .get(&pod)
                .is_some_and(|g| g.boot_id == boot_id);
            match l.phase {
                LauncherPhase::Pending
                    if l.bound_at
                        .is_some_and(|t| self.now >= t + LAUNCHER_START_MS) =>
                {
                    l.phase = LauncherPhase::Running;
                    if self
                        .write(
                            key,
                            Precondition::ResourceVersion(rv),
                            Obj::Launcher(l.clone()),
                        )
                        .is_ok()
                    {
                        let pvc = self.vm.spec(&l.vm).map(VmSpec::pvc).unwrap_or_default();
                        self.vm.guests.insert(
                            pod.clone(),
                            Guest {
                                vm: l.vm.clone(),
                                pvc,
                                node: node.clone(),
                                boot_id,
                            },
                        );
                        self.vm
                            .record
                            .started
                            .push((self.now, l.vm.clone(), node.clone()));
                        self.log(
                            &format!("kubevirt/{node}"),
                            format!("VM {} running ({pod})", l.vm),
                        );
                    }
                }
                LauncherPhase::Running if !running => {
                    // restartPolicy Never: after a reboot the pod is Failed.
                    l.phase = LauncherPhase::Terminal;
                    let _ = self.write(key, Precondition::ResourceVersion(rv), Obj::Launcher(l));
                }
                _ => {}
            }
        }
    }

    /// The node's kubelet runs and reaches the API server.
    fn kubelet_sees(&self, node: &str) -> bool {
        self.node_idx(node)
            .is_some_and(|i| self.nodes[i].powered && self.node_reaches(i, Site::Api))
    }

    /// virt-controller: a Failed instance's pod is deleted; a VM that is to run and has no
    /// launcher pod left gets a new one, a watch delay after the old one went.
    fn step_virt_controller(&mut self) {
        let all = launchers(self);
        for (pod, rv, l) in &all {
            if l.phase == LauncherPhase::Terminal && !l.terminating {
                let mut l = l.clone();
                l.terminating = true;
                let _ = self.write(
                    Key::Launcher(pod.clone()),
                    Precondition::ResourceVersion(*rv),
                    Obj::Launcher(l),
                );
            }
        }
        let specs: Vec<VmSpec> = self.vm.specs.clone();
        for spec in specs {
            let Some(Stored {
                obj: Obj::Vm(vm), ..
            }) = self.api.get(&Key::Vm(spec.name.clone())).cloned()
            else {
                continue;
            };
            let restarts = node_health::vm::RunStrategy::parse(Some(&vm.run_strategy), None)
                .restarts_after_loss();
            if !restarts || all.iter().any(|(_, _, l)| l.vm == spec.name) {
                self.vm.recreate_at.remove(&spec.name);
                continue;
            }
            let due = *self
                .vm
                .recreate_at
                .entry(spec.name.clone())
                .or_insert(self.now + VIRT_CONTROLLER_DELAY_MS);
            if self.now >= due && self.create_launcher(&spec.name, &vm).is_err() {
                // The webhook did not answer (fail closed): virt-controller retries.
                self.vm
                    .recreate_at
                    .insert(spec.name.clone(), self.now + VIRT_CONTROLLER_DELAY_MS);
            }
        }
    }

    /// The pod create, through twosite's mutating webhook when the VM's template carries the
    /// label (the webhook's object selector).
    fn create_launcher(&mut self, vm: &str, obj: &super::kubevirt::VmObj) -> Result<(), ()> {
        let (mut gated, mut prefer_node) = (false, None);
        if obj.template_labelled {
            let admission = self.webhook(vm, obj).ok_or(())?;
            if let Admission::Gate { prefer_node: p, .. } = admission
                && !self.cfg.vm_gate_off
            {
                gated = true;
                prefer_node = p;
                self.vm.record.touched.insert(vm.to_string());
            }
        }
        let pod = self.new_launcher_name(vm);
        self.write(
            Key::Launcher(pod.clone()),
            Precondition::Create,
            Obj::Launcher(LauncherObj {
                vm: vm.to_string(),
                uid: format!("uid-{pod}"),
                node: None,
                gated,
                prefer_node: prefer_node.clone(),
                phase: LauncherPhase::Pending,
                terminating: false,
                created: self.now,
                bound_at: None,
            }),
        )?;
        self.log(
            "kubevirt",
            format!(
                "virt-controller created {pod} for VM {vm}{}",
                match (gated, &prefer_node) {
                    (true, Some(n)) => format!(" (gated, prefers {n})"),
                    (true, None) => " (gated)".into(),
                    _ => String::new(),
                }
            ),
        );
        Ok(())
    }

    /// twosite's webhook, served by a controller replica the API server reaches (the leader if
    /// there is one): `None` when none answers.
    fn webhook(&self, vm: &str, obj: &super::kubevirt::VmObj) -> Option<Admission> {
        let serving = (0..self.replicas.len())
            .filter(|i| self.replicas[*i].up && self.replica_reaches(*i, Site::Api))
            .max_by_key(|i| self.replicas[*i].leading)?;
        let r = &self.replicas[serving];
        let (fenced, live) = node_health::volume::node_sets(&r.verdicts, &r.remediation);
        let last_node = obj.disks.iter().find_map(|pvc| {
            match self
                .api
                .get(&Key::DiskLease(node_health::vm::disk_lease_name(pvc)))
            {
                Some(Stored {
                    obj: Obj::DiskLease(d),
                    ..
                }) => d.held_for_node.clone().filter(|n| !n.is_empty()),
                _ => None,
            }
        });
        let partner = last_node.as_deref().and_then(|n| self.partner_of(n));
        let opt = opt_in(obj.annotation.as_deref());
        Some(admit(&AdmissionFacts {
            is_launcher: true,
            vm_name: Some(vm),
            vm: Some(&opt),
            last_node: last_node.as_deref(),
            partner: partner.as_deref(),
            live_nodes: &live,
            fenced_nodes: &fenced,
        }))
    }

    fn partner_of(&self, node: &str) -> Option<String> {
        self.partner_in_status(node)
    }

    /// kube-scheduler for launcher pods: an ungated, unbound one is bound a watch delay after it
    /// became schedulable, to its preferred node if feasible, else to the emptiest feasible one.
    fn step_launcher_scheduling(&mut self) {
        let (lo, hi) = self.cfg.watch_delay_ms;
        let all = launchers(self);
        let mut load: BTreeMap<String, usize> = BTreeMap::new();
        for (k, s) in self.api.objects() {
            match (k, &s.obj) {
                (Key::Pod(_), Obj::Pod(p)) => *load.entry(p.node.clone()).or_default() += 1,
                (Key::Launcher(_), Obj::Launcher(l)) => {
                    if let Some(n) = &l.node {
                        *load.entry(n.clone()).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        for (pod, rv, mut l) in all {
            if l.node.is_some() || l.gated || l.terminating {
                self.vm.schedulable_at.remove(&pod);
                continue;
            }
            let delay = self.vm.rng.random_range(lo..=hi);
            let at = *self
                .vm
                .schedulable_at
                .entry(pod.clone())
                .or_insert(self.now + delay);
            if self.now < at {
                continue;
            }
            let feasible = self.scheduler.feasible_nodes();
            let chosen = l
                .prefer_node
                .clone()
                .filter(|p| feasible.contains(p))
                .or_else(|| {
                    feasible
                        .iter()
                        .min_by_key(|n| (load.get(*n).copied().unwrap_or(0), (*n).clone()))
                        .cloned()
                });
            let Some(node) = chosen else {
                continue;
            };
            l.node = Some(node.clone());
            l.bound_at = Some(self.now);
            if self
                .write(
                    Key::Launcher(pod.clone()),
                    Precondition::ResourceVersion(rv),
                    Obj::Launcher(l.clone()),
                )
                .is_ok()
            {
                *load.entry(node.clone()).or_default() += 1;
                self.vm.schedulable_at.remove(&pod);
                self.log("scheduler", format!("VM {}: bound {pod} to {node}", l.vm));
            }
        }
    }

    /// The taint eviction for launcher pods: marked for deletion on an out-of-service node.
    pub(super) fn evict_launchers(&mut self, tainted: &BTreeSet<String>) {
        for (pod, rv, mut l) in launchers(self) {
            if !l.terminating && l.node.as_ref().is_some_and(|n| tainted.contains(n)) {
                l.terminating = true;
                let _ = self.write(
                    Key::Launcher(pod),
                    Precondition::ResourceVersion(rv),
                    Obj::Launcher(l),
                );
            }
        }
    }

    /// The pod garbage collector for launcher pods: terminating ones on a node that is NotReady
    /// and out of service (or gone) are force-deleted.
    pub(super) fn gc_launchers(&mut self) {
        for (pod, _, l) in launchers(self) {
            let Some(node) = l.node.as_ref().filter(|_| l.terminating) else {
                continue;
            };
            let gone = match self.api.get(&Key::Node(node.clone())) {
                Some(Stored {
                    obj: Obj::Node(n), ..
                }) => n.out_of_service && n.ready != Readiness::True,
                None => true,
                _ => false,
            };
            if gone {
                self.delete(&Key::Launcher(pod.clone()));
                self.log("kcm", format!("pod GC force-deleted {pod}"));
            }
        }
    }
}
