//! Prometheus metrics of the controller.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `error` label of the error counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// The labels of `twosite_node_phase`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodePhaseLabels {
    pub node: String,
    pub phase: String,
}

/// The `reason` label of `twosite_volume_events_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// The `outcome` label of `twosite_witness_claims_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// The labels of `twosite_volume_held`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    pub volume: String,
}

/// Every remediation phase, for `twosite_node_phase`.
pub const NODE_PHASES: [&str; 9] = [
    "Healthy",
    "Suspect",
    "FenceWaiting",
    "Committing",
    "Fenced",
    "Tainted",
    "Recovering",
    "NoAgent",
    "Excluded",
];

pub struct Metrics {
    registry: Registry,
    pub pairs: Gauge,
    pub unpaired_nodes: Gauge,
    pub is_leader: Gauge,
    pub leader_epoch: Gauge,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub status_writes: Counter,
    pub leader_election_errors: Family<ErrorLabels, Counter>,
    pub node_phase: Family<NodePhaseLabels, Gauge>,
    pub remediations: Counter,
    pub time_to_taint: Histogram,
    pub time_to_release: Histogram,
    pub fence_decision: Histogram,
    pub remediation_paused: Gauge,
    pub remediation_errors: Family<ErrorLabels, Counter>,
    pub witness_reachable: Gauge,
    pub witness_claims: Family<OutcomeLabels, Counter>,
    pub volumes: Gauge,
    pub volume_events: Family<ReasonLabels, Counter>,
    pub volume_held: Family<VolumeLabels, Gauge>,
    pub vms_protected: Gauge,
    pub vms_gated: Gauge,
    pub vm_events: Family<ReasonLabels, Counter>,
    pub vm_failovers: Counter,
    pub vm_failover_duration: Histogram,
    /// The phase last set for each node in `node_phase`: a pass sets every node's phase, and
    /// writing the unchanged series again (one label set per phase, each with two new Strings)
    /// cost ~8 % of a remediation pass at 1,000 nodes (`twosite-bench`).
    node_phase_set: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("twosite");
        let pairs = Gauge::default();
        let unpaired_nodes = Gauge::default();
        let is_leader = Gauge::default();
        let leader_epoch = Gauge::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let status_writes = Counter::default();
        let leader_election_errors = Family::<ErrorLabels, Counter>::default();
        let node_phase = Family::<NodePhaseLabels, Gauge>::default();
        let remediations = Counter::default();
        // 1 s to 256 s.
        let time_to_taint = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        // 1 s to 256 s.
        let time_to_release = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        // 1 ms to 4 s.
        let fence_decision = Histogram::new(exponential_buckets(0.001, 2.0, 13));
        let remediation_paused = Gauge::default();
        let remediation_errors = Family::<ErrorLabels, Counter>::default();
        let witness_reachable = Gauge::default();
        let witness_claims = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "pairs",
            "Pairs in the last status this replica computed",
            pairs.clone(),
        );
        registry.register(
            "unpaired_nodes",
            "Unpaired nodes in the last status this replica computed",
            unpaired_nodes.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this replica holds the leader Lease",
            is_leader.clone(),
        );
        registry.register(
            "leader_epoch",
            "The Lease's leaseTransitions of this replica's current or last term",
            leader_epoch.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed pairing reconciliations, by error",
            reconcile_errors.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes of the TwoSite object",
            status_writes.clone(),
        );
        registry.register(
            "leader_election_errors",
            "Failed leader election rounds, by error",
            leader_election_errors.clone(),
        );
        registry.register(
            "node_phase",
            "1 for each node's current remediation phase, 0 for the others",
            node_phase.clone(),
        );
        registry.register(
            "remediations",
            "Fences committed on dead nodes (their pods are then deleted and the out-of-service taint applied)",
            remediations.clone(),
        );
        registry.register(
            "time_to_taint_seconds",
            "Seconds from the controller's Dead verdict on a node to the out-of-service taint \
             applied (excludes the silence before the verdict; see time_to_release_seconds)",
            time_to_taint.clone(),
        );
        registry.register(
            "time_to_release_seconds",
            "Seconds from the last change of a node's agent heartbeat Lease the controller saw \
             (its kubelet Lease without an agent) to its pods released: fence committed, \
             out-of-service taint applied, pods deleted; on the controller's monotonic clock",
            time_to_release.clone(),
        );
        registry.register(
            "fence_decision_seconds",
            "Seconds from the moment a node could be fenced (its fence deadline, its vouchers' \
             settle time and its unschedulable head start all passed) to the controller's fence \
             commit request; on the controller's monotonic clock",
            fence_decision.clone(),
        );
        registry.register(
            "remediation_paused",
            "1 while node remediation is paused (the RemediationPaused condition), 0 otherwise; \
             exported by the leader only",
            remediation_paused.clone(),
        );
        registry.register(
            "remediation_errors",
            "Failed remediation actions, by error",
            remediation_errors.clone(),
        );
        registry.register(
            "witness_reachable",
            "1 while the witness answers (claims and /healthz), 0 otherwise or without a witness",
            witness_reachable.clone(),
        );
        registry.register(
            "witness_claims",
            "Claims sent to the witness, by outcome (granted, held, refused, unreachable)",
            witness_claims.clone(),
        );
        let volumes = Gauge::default();
        let volume_events = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "volumes",
            "Protected RWX block volumes (volume Leases) the leader sees",
            volumes.clone(),
        );
        registry.register(
            "volume_events",
            "Volume switches and problems, by Event reason (VolumeSwitchover, VolumeFailover, VolumeDemoteTimeout, VolumeSwitchoverRefused)",
            volume_events.clone(),
        );
        let volume_held = Family::<VolumeLabels, Gauge>::default();
        registry.register(
            "volume_held",
            "Per protected volume: 1 while a consumer pod holds its volume Lease, 0 while none \
             does; exported by the leader only",
            volume_held.clone(),
        );
        let vms_protected = Gauge::default();
        let vms_gated = Gauge::default();
        let vm_events = Family::<ReasonLabels, Counter>::default();
        let vm_failovers = Counter::default();
        // 1 s to 256 s.
        let vm_failover_duration = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register(
            "vms_protected",
            "VirtualMachines opted in with twosite.dev/ha=true; exported by the leader only",
            vms_protected.clone(),
        );
        registry.register(
            "vms_gated",
            "Opted-in VMs whose new launcher pod waits at the scheduling gate; exported by the leader only",
            vms_gated.clone(),
        );
        registry.register(
            "vm_events",
            "VM Events published, by reason (VMFailoverStarted, VMFailoverCompleted, VMFailoverBlocked, UnprotectedVolume, InvalidAnnotation)",
            vm_events.clone(),
        );
        registry.register(
            "vm_failovers",
            "VM failovers completed: an opted-in VM whose node was proven fenced runs on another node",
            vm_failovers.clone(),
        );
        registry.register(
            "vm_failover_duration_seconds",
            "Seconds from an opted-in VM's node proven fenced to its new launcher pod running on another node (guest boot excluded)",
            vm_failover_duration.clone(),
        );
        Metrics {
            node_phase_set: std::sync::Mutex::default(),
            vms_protected,
            vms_gated,
            vm_events,
            vm_failovers,
            vm_failover_duration,
            registry,
            time_to_release,
            fence_decision,
            remediation_paused,
            volume_held,
            witness_reachable,
            witness_claims,
            volumes,
            volume_events,
            node_phase,
            remediations,
            time_to_taint,
            remediation_errors,
            pairs,
            unpaired_nodes,
            is_leader,
            leader_epoch,
            reconcile_errors,
            status_writes,
            leader_election_errors,
        }
    }

    pub fn reconcile_failed(&self, label: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                error: label.to_string(),
            })
            .inc();
    }

    pub fn election_failed(&self, label: &str) {
        self.leader_election_errors
            .get_or_create(&ErrorLabels {
                error: label.to_string(),
            })
            .inc();
    }

    pub fn remediation_failed(&self, label: &str) {
        self.remediation_errors
            .get_or_create(&ErrorLabels {
                error: label.to_string(),
            })
            .inc();
    }

    pub fn witness_claimed(&self, outcome: &str) {
        self.witness_claims
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Sets `twosite_node_phase` for `node`: 1 for `phase`, 0 for every other phase.
    pub fn set_node_phase(&self, node: &str, phase: &str) {
        let mut set = self
            .node_phase_set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if set.get(node).is_some_and(|p| p == phase) {
            return;
        }
        set.insert(node.to_string(), phase.to_string());
        for p in NODE_PHASES {
            self.node_phase
                .get_or_create(&NodePhaseLabels {
                    node: node.to_string(),
                    phase: p.to_string(),
                })
                .set(i64::from(p == phase));
        }
    }

    /// Drops `twosite_node_phase` for a node that is gone.
    pub fn forget_node(&self, node: &str) {
        self.node_phase_set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(node);
        for p in NODE_PHASES {
            self.node_phase.remove(&NodePhaseLabels {
                node: node.to_string(),
                phase: p.to_string(),
            });
        }
    }

    /// Sets `twosite_volume_held` for exactly the volumes given (namespace, name, held): the
    /// series of volumes no longer listed are dropped.
    pub fn set_volumes_held<'a>(
        &self,
        volumes: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
    ) {
        self.volume_held.clear();
        for (namespace, volume, held) in volumes {
            self.volume_held
                .get_or_create(&VolumeLabels {
                    namespace: namespace.to_string(),
                    volume: volume.to_string(),
                })
                .set(i64::from(held));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Clamps a count to a gauge value.
pub fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_held_follows_the_volumes_listed_and_drops_the_gone() {
        let m = Metrics::new();
        m.set_volumes_held([("shop", "db", true), ("shop", "cache", false)]);
        let text = m.encode().expect("encode");
        assert!(
            text.contains(r#"twosite_volume_held{namespace="shop",volume="db"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"twosite_volume_held{namespace="shop",volume="cache"} 0"#),
            "{text}"
        );
        m.set_volumes_held([("shop", "db", false)]);
        let text = m.encode().expect("encode");
        assert!(
            text.contains(r#"twosite_volume_held{namespace="shop",volume="db"} 0"#),
            "{text}"
        );
        assert!(!text.contains(r#"volume="cache""#), "{text}");
    }

    #[test]
    fn the_timing_histograms_and_the_pause_gauge_are_exported() {
        let m = Metrics::new();
        m.time_to_release.observe(14.5);
        m.remediation_paused.set(1);
        let text = m.encode().expect("encode");
        assert!(
            text.contains("twosite_time_to_release_seconds_sum 14.5"),
            "{text}"
        );
        assert!(
            text.contains("twosite_time_to_taint_seconds_count 0"),
            "{text}"
        );
        assert!(text.contains("twosite_remediation_paused 1"), "{text}");
        assert!(
            text.contains("from the controller's Dead verdict"),
            "{text}"
        );
    }
}
