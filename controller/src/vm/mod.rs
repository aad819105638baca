//! KubeVirt VirtualMachines that opt in with `twosite.dev/ha: "true"`: the leader's VM loop
//! (every 500 ms it reads the watch caches, asks the core [`node_health::vm::VmProtection`]
//! what to do for each VM and does it, in order), the admission webhook that gates a new
//! launcher pod ([`webhook`]), and its certificate ([`cert`]).
//!
//! Writes: a merge patch of one template label on the VM; disk Lease creates and PUTs carrying
//! the resourceVersion read; a JSON patch (uid-tested) that lifts the pod's scheduling gate.

pub mod cert;
mod io;
pub mod types;
pub mod watch;
pub mod webhook;

use crate::crd::{VmCondition, VmStatus};
use crate::error::report;
use crate::leader_lease::Leadership;
use crate::metrics::Metrics;
use crate::status::RemediationView;
use futures::StreamExt;
use kube::ResourceExt;
use node_health::time::Clock;
use node_health::vm::{ClaimFacts, VmFacts, VmProtection, VmReport};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch as chan;
use watch::VmStores;

/// How often the leader looks at the VMs.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// What the VM loop needs.
pub struct VmContext {
    pub client: kube::Client,
    pub stores: VmStores,
    pub recorder: crate::events::EventSink,
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
    pub api_timeout: Duration,
    pub clock: Arc<dyn Clock + Send + Sync>,
    /// `--dry-run`: decide and log what would be written, write nothing but Events.
    pub dry_run: bool,
}

/// The leader's per-VM state, kept across passes of one term.
#[derive(Default)]
pub struct VmLoop {
    states: BTreeMap<String, VmProtection>,
    /// Gated launcher pods whose VM does not exist, already reported.
    orphans_reported: BTreeSet<String>,
}

fn conditions(report: &VmReport) -> Vec<VmCondition> {
    let mut out = Vec::new();
    out.push(if report.unprotected.is_empty() {
        VmCondition {
            type_: "DisksProtected".into(),
            status: "True".into(),
            reason: "AllDisksLeased".into(),
            message: "every PVC disk is ReadWriteMany Block and guarded by a volume Lease".into(),
        }
    } else {
        VmCondition {
            type_: "DisksProtected".into(),
            status: "False".into(),
            reason: "UnprotectedVolume".into(),
            message: report.unprotected.join("; "),
        }
    });
    if let Some(why) = &report.blocked {
        out.push(VmCondition {
            type_: "FailoverReady".into(),
            status: "False".into(),
            reason: "VMFailoverBlocked".into(),
            message: why.clone(),
        });
    }
    out
}

impl VmLoop {
    pub fn new() -> Self {
        Self::default()
    }

    /// One pass: every VM's actions, in order, and the status of the VMs twosite knows.
    pub async fn pass(&mut self, ctx: &VmContext, view: Option<&RemediationView>) -> Vec<VmStatus> {
        if !ctx.leadership.is_leader() {
            self.states.clear();
            self.orphans_reported.clear();
            return Vec::new();
        }
        // Before every cache has listed once, an empty cache would read as "the old pod is
        // gone"; before the remediation loop has run, nothing is known fenced.
        let Some(view) = view else { return Vec::new() };
        if !ctx.stores.ready() {
            return Vec::new();
        }
        let now = ctx.clock.now();
        let vms = ctx.stores.vms.state();
        let pods = ctx.stores.launchers.state();
        // Only twosite's VMs (annotated, or labelled once) are looked at, and only their
        // launcher pods and namespaces indexed: at 10,000 VMs, maps of every VM and pod rebuilt
        // on every pass were most of the controller's CPU.
        let ours: Vec<(&Arc<types::VirtualMachine>, node_health::vm::OptIn, bool)> = vms
            .iter()
            .filter_map(|vm| {
                let opt_in = types::vm_opt_in(vm);
                let labelled = types::template_labelled(vm);
                let skip = matches!(opt_in, node_health::vm::OptIn::Out) && !labelled;
                (!skip).then_some((vm, opt_in, labelled))
            })
            .collect();
        let our_keys: HashSet<(&str, &str)> = ours
            .iter()
            .map(|(vm, _, _)| (ns_of(&vm.metadata), name_of(&vm.metadata)))
            .collect();
        let our_namespaces: HashSet<&str> = our_keys.iter().map(|(ns, _)| *ns).collect();
        let mut claims: BTreeMap<String, BTreeMap<String, ClaimFacts>> = BTreeMap::new();
        for c in ctx.stores.claims.state() {
            if !our_namespaces.contains(ns_of(&c.metadata)) {
                continue;
            }
            claims
                .entry(c.namespace().unwrap_or_default())
                .or_default()
                .insert(c.name_any(), types::claim_facts(&c));
        }
        let mut leases: BTreeMap<String, Vec<Arc<k8s_openapi::api::coordination::v1::Lease>>> =
            BTreeMap::new();
        for l in ctx.stores.disk_leases.state() {
            leases
                .entry(l.namespace().unwrap_or_default())
                .or_default()
                .push(l);
        }
        let mut launchers: HashMap<(&str, &str), Vec<Arc<types::LauncherPod>>> = HashMap::new();
        for p in &pods {
            if let Some(vm) = types::launcher_vm(p) {
                let k = (ns_of(&p.metadata), vm);
                if our_keys.contains(&k) {
                    launchers.entry(k).or_default().push(Arc::clone(p));
                }
            }
        }
        let no_claims = BTreeMap::new();
        let mut out = Vec::new();
        let (mut protected, mut gated) = (0i64, 0i64);
        let mut seen = BTreeSet::new();
        let mut writes = Vec::new();
        for (vm, opt_in, labelled) in ours {
            let key = types::vm_key(vm);
            seen.insert(key.clone());
            let ns = vm.namespace().unwrap_or_default();
            let disks = types::disks(vm, claims.get(&ns).unwrap_or(&no_claims));
            let wanted: BTreeSet<String> = disks
                .iter()
                .filter_map(|d| d.protection.clone().ok())
                .collect();
            let ns_leases: Vec<&k8s_openapi::api::coordination::v1::Lease> = leases
                .get(&ns)
                .map(|v| {
                    v.iter()
                        .map(|l| l.as_ref())
                        .filter(|l| wanted.contains(&l.name_any()))
                        .collect()
                })
                .unwrap_or_default();
            let lease_views = types::disk_leases(ns_leases.iter().copied());
            let vm_pods = launchers
                .get(&(ns_of(&vm.metadata), name_of(&vm.metadata)))
                .cloned()
                .unwrap_or_default();
            let facts_launchers: Vec<_> = vm_pods.iter().filter_map(types::launcher).collect();
            let run = types::run_strategy(vm);
            let facts = VmFacts {
                opt_in: &opt_in,
                run_strategy: &run,
                template_labelled: labelled,
                disks: &disks,
                leases: &lease_views,
                launchers: &facts_launchers,
                fenced_nodes: &view.fenced,
                live_nodes: &view.live,
            };
            let state = self.states.entry(key.clone()).or_default();
            let (actions, vm_report) = state.step(&facts, now);
            if opt_in.is_in() {
                protected += 1;
            }
            if vm_report.state == "Gated" {
                gated += 1;
            }
            if !actions.is_empty() {
                writes.push((vm, key, ns_leases, vm_pods, actions));
            }
            out.push(VmStatus {
                namespace: ns,
                name: vm.name_any(),
                state: vm_report.state.clone(),
                node: vm_report.node.clone(),
                printable_status: vm.status.as_ref().and_then(|s| s.printable_status.clone()),
                conditions: if opt_in.is_in() {
                    conditions(&vm_report)
                } else {
                    Vec::new()
                },
            });
        }
        // Each VM's actions in order, several VMs at once: when a room is lost, the last VM's
        // gate must not wait behind every other VM's Events and writes.
        // Each future is made when it starts: one per VM made up front would hold several KiB
        // each (16 MiB for a lost room of 2,500 VMs).
        let mut pending = writes.into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < CONCURRENT_VMS {
                let Some((vm, key, leases, pods, actions)) = pending.next() else {
                    break;
                };
                running.push(run_actions(ctx, vm, key, leases, pods, actions));
            }
            if running.next().await.is_none() {
                break;
            }
        }
        if !ctx.leadership.is_leader() {
            return Vec::new();
        }
        self.states.retain(|k, _| seen.contains(k));
        self.report_orphans(ctx, &pods, &vms).await;
        ctx.metrics.vms_protected.set(protected);
        ctx.metrics.vms_gated.set(gated);
        out
    }

    /// A gated launcher pod whose VM is gone stays gated (safe); say so once on the pod.
    async fn report_orphans(
        &mut self,
        ctx: &VmContext,
        pods: &[Arc<types::LauncherPod>],
        vms: &[Arc<types::VirtualMachine>],
    ) {
        // Built only when a gated pod is seen: gated pods are few, VMs many.
        let mut known: Option<HashSet<(&str, &str)>> = None;
        for p in pods {
            if !types::has_gate(p) {
                continue;
            }
            let known = known.get_or_insert_with(|| {
                vms.iter()
                    .map(|v| (ns_of(&v.metadata), name_of(&v.metadata)))
                    .collect()
            });
            let ns = ns_of(&p.metadata);
            if types::launcher_vm(p).is_some_and(|n| known.contains(&(ns, n))) {
                continue;
            }
            let vm = types::launcher_vm(p).map(|n| types::key(ns, n));
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if self.orphans_reported.insert(uid) {
                io::pod_event(
                    ctx,
                    p,
                    &format!(
                        "the VirtualMachine {} does not exist: the pod stays gated",
                        vm.unwrap_or_else(|| "(unnamed)".into())
                    ),
                )
                .await;
            }
        }
    }
}

/// How many VMs' actions run at once.
const CONCURRENT_VMS: usize = 32;

/// One VM's actions, in order; the first failure ends them (decided again next pass).
async fn run_actions(
    ctx: &VmContext,
    vm: &types::VirtualMachine,
    key: String,
    leases: Vec<&k8s_openapi::api::coordination::v1::Lease>,
    pods: Vec<Arc<types::LauncherPod>>,
    actions: Vec<node_health::vm::VmAction>,
) {
    for action in actions {
        if !ctx.leadership.is_leader() {
            return;
        }
        if let Err(err) = io::execute(ctx, vm, &leases, &pods, &action).await {
            tracing::warn!(vm = key, action = ?action, error = %report(&err), "VM action failed; decided again next pass");
            return;
        }
    }
}

fn ns_of(m: &kube::api::ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or_default()
}

fn name_of(m: &kube::api::ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or_default()
}

/// The leader's VM loop.
pub async fn run_vm_loop(
    ctx: VmContext,
    view: chan::Receiver<Option<RemediationView>>,
    out: chan::Sender<Vec<VmStatus>>,
    guard: crate::admin::LoopGuard,
) -> crate::error::Result<()> {
    let mut vms = VmLoop::default();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        guard.beat();
        let current = view.borrow().clone();
        let next = vms.pass(&ctx, current.as_ref()).await;
        out.send_if_modified(|v| {
            if *v == next {
                false
            } else {
                *v = next;
                true
            }
        });
    }
}

/// Whether the VM `key` opted in, from the cache (`None`: no such VM). For the release of a
/// fenced node's pods.
pub fn opted_in(stores: &VmStores, key: &str) -> Option<bool> {
    let (ns, name) = key.split_once('/')?;
    let vm = stores
        .vms
        .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))?;
    Some(types::vm_opt_in(&vm).is_in())
}
