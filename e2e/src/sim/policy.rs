//! What users run today instead of twosite, as alternative policies of the same simulated world
//! (`twosite simulate --compare`). The world (kubelets, kube-controller-manager, kube-scheduler,
//! power, links, freezes) stays as it is; the twosite agents, controller replicas and volume
//! guards are replaced by simpler actors, each from its documented defaults:
//!
//! - [`Policy::K8sAlone`]: nothing but Kubernetes. The node lifecycle controller marks a silent
//!   node Ready=Unknown after the 50 s node-monitor-grace-period and taints it
//!   `node.kubernetes.io/unreachable:NoExecute`; the default toleration of 300 s
//!   (`--default-unreachable-toleration-seconds`, DefaultTolerationSeconds admission plugin)
//!   runs out and taint eviction marks its pods for deletion; the pod garbage collector
//!   force-deletes terminating pods only on a NotReady node that carries
//!   `node.kubernetes.io/out-of-service`, which nobody applies. The sim's workload controller is
//!   StatefulSet-like (it recreates a pod only once its object is gone, [`super::kcm`]), so a
//!   dead node's pods stay Terminating and never run elsewhere. (Measured on a real
//!   kube-apiserver and kube-controller-manager 1.32: Unknown at 49.5 s, taint 54.7 s,
//!   eviction 354.6 s, the old pod Terminating for good: `/work/shared/design/prior-art.md`.)
//!   Volume consumers: no standby mechanism, consumer 0 is the one writer, pinned to its node.
//! - [`Policy::NhcSnr`]: Medik8s NodeHealthCheck + Self Node Remediation with their defaults:
//!   NHC's `unhealthyConditions` Ready=False/Unknown for 300 s, `minHealthy: 51%` (rounded up
//!   over the selected nodes, so a whole room of a symmetric cluster blocks all remediation);
//!   SNR's agent checks the API server every 5 s (`apiCheckInterval`; a check of an
//!   unreachable one fails after `apiServerTimeout`, 15 s) and after 3 failures
//!   (`maxApiErrorThreshold`) asks its peers, which answer from their own API access, whatever
//!   their room: "unhealthy" (a remediation exists for you), "healthy", or "API error"; it
//!   reboots when a peer says unhealthy or no peer answers, and runs on when all answer "API
//!   error" (so a cut-off group of nodes keeps running); the manager puts the out-of-service
//!   taint on after the safe time to assume the node rebooted (about 180 s with a softdog
//!   watchdog) and removes it once the node is healthy again and NHC deleted the remediation.
//!   Sources: the NodeHealthCheck sample of the OpenShift 4.9 docs, "Node Health Check
//!   Operator" (`minHealthy: 51%`, Ready False and Unknown for `300s`); the
//!   SelfNodeRemediationConfig defaults in Red Hat's "Workload Availability for Red Hat
//!   OpenShift 25.1" (`safeTimeToAssumeNodeRebootedSeconds: 180`, `apiCheckInterval: 5s`,
//!   `apiServerTimeout: 15s`, `maxApiErrorThreshold: 3`, peer timeouts 5 s);
//!   `/work/shared/design/prior-art.md` (the ~545 s chain; peers' "API error" answers keep a
//!   cut-off room running, an open upstream issue). Volume consumers as with Kubernetes alone.
//! - [`Policy::ConfigMapLock`]: Kubernetes alone for the nodes; every volume consumer runs the
//!   hand-made active/standby loop of the vendor white papers ([`super::lock_loop`]).

use super::api::{Key, Obj, PodObj, Precondition, Stored};
use super::cluster::{Cluster, REBOOT_MS};
use super::scenario::Site;
use node_health::Readiness;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Default toleration of the unreachable/not-ready NoExecute taints (kube-apiserver's
/// DefaultTolerationSeconds admission plugin, `--default-not-ready-toleration-seconds` and
/// `--default-unreachable-toleration-seconds`: 300).
pub(super) const DEFAULT_TOLERATION_MS: u64 = 300_000;
/// NodeHealthCheck's default `unhealthyConditions`: Ready False or Unknown for 300 s.
const NHC_UNHEALTHY_MS: u64 = 300_000;
/// NodeHealthCheck's default `minHealthy: 51%`.
const NHC_MIN_HEALTHY_PERCENT: u64 = 51;
/// SNR's `safeTimeToAssumeNodeRebootedSeconds` as computed with a softdog (about 180 s).
const SNR_SAFE_TIME_MS: u64 = 180_000;
/// SNR's `apiCheckInterval` (5 s), `apiServerTimeout` (15 s: a check of an unreachable API
/// server fails only then) and `maxApiErrorThreshold` (3): SelfNodeRemediationConfig defaults
/// (Red Hat, "Workload Availability for Red Hat OpenShift 25.1", Configuring the Self Node
/// Remediation Operator).
const SNR_API_CHECK_MS: u64 = 5_000;
const SNR_API_TIMEOUT_MS: u64 = 15_000;
const SNR_MAX_API_ERRORS: u64 = 3;

/// Who keeps the HA workloads and volumes running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub enum Policy {
    #[default]
    Twosite,
    K8sAlone,
    NhcSnr,
    ConfigMapLock,
}

impl Policy {
    pub const ALL: [Policy; 4] = [
        Policy::Twosite,
        Policy::K8sAlone,
        Policy::NhcSnr,
        Policy::ConfigMapLock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Twosite => "twosite",
            Policy::K8sAlone => "k8s-alone",
            Policy::NhcSnr => "nhc-snr",
            Policy::ConfigMapLock => "configmap-lock",
        }
    }

    pub fn is_twosite(self) -> bool {
        self == Policy::Twosite
    }
}

/// The alternative actors' state, and what compare mode observes.
#[derive(Debug, Default)]
pub(super) struct AltState {
    /// Since when each node is not Ready (real time, as the lifecycle controller set it).
    not_ready_since: BTreeMap<String, u64>,
    /// Nodes whose pods taint eviction marked in this not-ready episode.
    evicted: BTreeSet<String>,
    /// NHC: the SelfNodeRemediation of each node and when it was created.
    remediations: BTreeMap<String, u64>,
    /// NHC blocked by minHealthy (logged once per episode).
    nhc_blocked: bool,
    /// SNR: nodes it put the out-of-service taint on.
    snr_tainted: BTreeSet<String>,
    /// SNR agent of each node: consecutive API check failures and its next check (real time).
    snr_errors: BTreeMap<String, u64>,
    snr_next: BTreeMap<String, u64>,
    /// The apps each node cut from the API server still runs, as of its last contact (its
    /// kubelet cannot learn that their pods were evicted or deleted).
    cut_off_apps: BTreeMap<String, BTreeSet<String>>,
    /// The ConfigMap locks ([`super::lock_loop`]).
    pub locks: BTreeMap<String, super::lock_loop::CmLock>,
    /// Compare mode's observation of "everything is back".
    pub down_since_first_fault: bool,
    pub all_up_since: Option<u64>,
    pub first_fault: Option<u64>,
}

impl Cluster {
    /// A node without the twosite agent: its kubelet starts its pods once it reached the API
    /// server after a boot (it keeps no pod specs across a reboot), and keeps them running
    /// whatever happens to its links until the node goes down.
    pub(super) fn step_plain_node(&mut self, i: usize) {
        if !self.nodes[i].workloads_running && self.node_reaches(i, Site::Api) {
            self.nodes[i].workloads_running = true;
        }
        if self.cfg.policy == Policy::NhcSnr {
            self.step_snr_agent(i);
        }
    }

    /// The world's additions in compare mode (the default-toleration eviction, the copies a
    /// cut-off node still runs) and the alternative policies' remediation.
    pub(super) fn step_alternatives(&mut self) {
        if !self.cfg.compare {
            return;
        }
        self.track_readiness();
        self.taint_eviction();
        if self.cfg.policy == Policy::NhcSnr {
            self.step_nhc();
        }
        self.track_cut_off();
    }

    fn node_ready(&self, name: &str) -> Option<Readiness> {
        match self.api.get(&Key::Node(name.to_string())) {
            Some(Stored {
                obj: Obj::Node(n), ..
            }) => Some(n.ready),
            _ => None,
        }
    }

    fn track_readiness(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for n in names {
            match self.node_ready(&n) {
                Some(Readiness::True) | None => {
                    self.alt.not_ready_since.remove(&n);
                    self.alt.evicted.remove(&n);
                }
                Some(_) => {
                    self.alt.not_ready_since.entry(n).or_insert(now);
                }
            }
        }
    }

    /// The unreachable:NoExecute taint goes on with Ready=Unknown; the default toleration runs
    /// out 300 s later and taint eviction marks the node's pods for deletion.
    fn taint_eviction(&mut self) {
        let due: Vec<String> = self
            .alt
            .not_ready_since
            .iter()
            .filter(|(n, t)| {
                self.now >= **t + DEFAULT_TOLERATION_MS && !self.alt.evicted.contains(*n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in due {
            self.alt.evicted.insert(n.clone());
            let pods: Vec<(String, PodObj)> = self
                .api
                .objects()
                .filter_map(|(k, s)| match (k, &s.obj) {
                    (Key::Pod(p), Obj::Pod(pod)) if pod.node == n && !pod.terminating => {
                        Some((p.clone(), pod.clone()))
                    }
                    _ => None,
                })
                .collect();
            for (p, mut pod) in pods {
                pod.terminating = true;
                let _ = self.write(Key::Pod(p.clone()), Precondition::None, Obj::Pod(pod));
                self.log(
                    "kcm",
                    format!("taint eviction: {p} marked for deletion (300 s toleration ran out)"),
                );
            }
        }
    }

    /// Some node reaches the API server (where NHC's and SNR's managers can run).
    fn operators_up(&self) -> bool {
        (0..self.nodes.len()).any(|i| self.nodes[i].powered && self.node_reaches(i, Site::Api))
    }

    /// NodeHealthCheck and SNR's manager.
    fn step_nhc(&mut self) {
        // A remediation of a node that is healthy again is deleted; SNR takes its taint off.
        let healed: Vec<String> = self
            .alt
            .remediations
            .keys()
            .filter(|n| !self.alt.not_ready_since.contains_key(*n))
            .cloned()
            .collect();
        for n in healed {
            self.alt.remediations.remove(&n);
            self.log("nhc", format!("{n} healthy again: remediation deleted"));
            if self.alt.snr_tainted.remove(&n) {
                self.update_node(&n, |o| o.out_of_service = false);
                self.record
                    .untaint_at
                    .entry(n.clone())
                    .or_default()
                    .push(self.now);
                self.log("snr", format!("out-of-service taint removed from {n}"));
            }
        }
        if !self.operators_up() {
            return;
        }
        let total = self.nodes.len() as u64;
        let unhealthy: Vec<String> = self
            .alt
            .not_ready_since
            .iter()
            .filter(|(_, t)| self.now >= **t + NHC_UNHEALTHY_MS)
            .map(|(n, _)| n.clone())
            .collect();
        let healthy = total - unhealthy.len() as u64;
        // intstr percentages scaled with rounding up, as NHC does.
        let min_healthy = (total * NHC_MIN_HEALTHY_PERCENT).div_ceil(100);
        let fresh: Vec<String> = unhealthy
            .into_iter()
            .filter(|n| !self.alt.remediations.contains_key(n))
            .collect();
        if !fresh.is_empty() {
            if healthy < min_healthy {
                if !self.alt.nhc_blocked {
                    self.alt.nhc_blocked = true;
                    self.log(
                        "nhc",
                        format!(
                            "{} unhealthy, but only {healthy} of {total} nodes healthy \
                             (minHealthy 51% = {min_healthy}): remediation blocked",
                            fresh.join(", ")
                        ),
                    );
                }
            } else {
                self.alt.nhc_blocked = false;
                for n in fresh {
                    self.alt.remediations.insert(n.clone(), self.now);
                    self.log(
                        "nhc",
                        format!("{n} not Ready for 300 s: SelfNodeRemediation created"),
                    );
                }
            }
        }
        // SNR's manager: the out-of-service taint after the safe time.
        let due: Vec<String> = self
            .alt
            .remediations
            .iter()
            .filter(|(n, t)| {
                self.now >= **t + SNR_SAFE_TIME_MS && !self.alt.snr_tainted.contains(*n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in due {
            self.alt.snr_tainted.insert(n.clone());
            self.check_fenced(&n, "SNR put the out-of-service taint on");
            self.update_node(&n, |o| o.out_of_service = true);
            self.record
                .taint_at
                .entry(n.clone())
                .or_default()
                .push(self.now);
            self.log(
                "snr",
                format!("safe time (180 s) passed: out-of-service taint on {n}"),
            );
        }
    }

    /// SNR's agent on node `i`: API checks, then its peers, then a reboot or not.
    fn step_snr_agent(&mut self, i: usize) {
        let name = self.nodes[i].name.clone();
        let next = *self.alt.snr_next.entry(name.clone()).or_insert(self.now);
        if self.now < next {
            return;
        }
        let reach = self.node_reaches(i, Site::Api);
        let period = SNR_API_CHECK_MS + if reach { 0 } else { SNR_API_TIMEOUT_MS };
        self.alt.snr_next.insert(name.clone(), self.now + period);
        let mine = self.alt.remediations.contains_key(&name);
        let reboot = if reach {
            self.alt.snr_errors.remove(&name);
            mine.then_some("it sees its own SelfNodeRemediation")
        } else {
            let errors = self.alt.snr_errors.entry(name.clone()).or_default();
            *errors += 1;
            if *errors < SNR_MAX_API_ERRORS {
                return;
            }
            // Its peers answer from their own view of the API server, whatever their room.
            let answers: Vec<Option<bool>> = (0..self.nodes.len())
                .filter(|&j| j != i && self.nodes[j].powered && self.nodes_connected(i, j))
                .map(|j| self.node_reaches(j, Site::Api).then_some(mine))
                .collect();
            if answers.is_empty() {
                Some("no peer answers (isolated)")
            } else if answers.contains(&Some(true)) {
                Some("a peer says it is unhealthy")
            } else {
                None
            }
        };
        if let Some(why) = reboot {
            self.log(&format!("snr/{name}"), format!("{why}: reboots the node"));
            self.power_off(i);
            self.nodes[i].reboot_at = Some(self.now + REBOOT_MS);
            self.nodes[i].reset_by = "SNR's reboot";
            self.alt.snr_errors.remove(&name);
        }
    }

    /// S1 beyond the pod objects: a node cut from the API server runs on the apps it ran at its
    /// last contact, evicted or force-deleted or not; another copy elsewhere is a second copy.
    fn track_cut_off(&mut self) {
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            if !self.nodes[i].powered || !self.nodes[i].workloads_running {
                self.alt.cut_off_apps.remove(&name);
            } else if self.node_reaches(i, Site::Api) {
                let apps: BTreeSet<String> = self
                    .api
                    .objects()
                    .filter_map(|(_, s)| match &s.obj {
                        Obj::Pod(p) if p.node == name && !p.terminating => Some(p.app.clone()),
                        _ => None,
                    })
                    .collect();
                self.alt.cut_off_apps.insert(name, apps);
            }
        }
    }

    /// Called after the step's checks: a second copy beside a cut-off node's, and whether every
    /// app and volume is up.
    pub(super) fn observe_compare(&mut self) {
        if !self.cfg.compare {
            return;
        }
        let mut bad = Vec::new();
        for (node, apps) in &self.alt.cut_off_apps {
            let Some(i) = self.node_idx(node) else {
                continue;
            };
            if self.node_reaches(i, Site::Api) {
                continue;
            }
            for app in apps {
                if let Some(other) = self.running.get(app).filter(|o| *o != node) {
                    bad.push(format!(
                        "{app} runs on {other} and still on {node} (cut off, its pod evicted or deleted)"
                    ));
                }
            }
        }
        for b in bad {
            self.violate("S1-single-copy", b);
        }
        let Some(first) = self.alt.first_fault else {
            return;
        };
        if self.now < first {
            return;
        }
        let apps_up = self.apps.iter().all(|a| self.running.contains_key(a));
        let volumes_up = self.volumes.iter().all(|v| {
            v.consumers.iter().any(|c| {
                c.proc.as_ref().is_some_and(|p| p.writing())
                    && self.nodes.iter().any(|n| n.name == c.node && n.powered)
            })
        });
        if apps_up && volumes_up {
            self.alt.all_up_since.get_or_insert(self.now);
        } else {
            self.alt.down_since_first_fault = true;
            self.alt.all_up_since = None;
        }
    }
}
