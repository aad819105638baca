//! Evidence, read through the API server, that the other room is alive: its agents' heartbeat
//! Leases keep changing.
//!
//! Every round (one per renew interval) lists the heartbeat Leases (label
//! `twosite.dev/agent-heartbeat=true`) and keeps the last renewal mark of each node of the other
//! room; a node's room is its Node's `topology.kubernetes.io/zone` label, read once and cached.
//! When any of them changed since the previous list, the other room is alive at the moment the
//! list was sent ([`AgentCore::observe_other_room`]). A node first seen, or a mark that stayed
//! the same, is no evidence.
//!
//! The renewal mark is the Lease's `spec.renewTime`, which only the holder's renewal changes —
//! not its `resourceVersion`, which any write changes: the controller's fence marker on the
//! Lease of a node that is gone must not look like a sign of life.
//!
//! Only run with a witness configured: without one the core ignores this evidence.
//!
//! [`AgentCore::observe_other_room`]: crate::AgentCore::observe_other_room

use super::SharedCore;
use super::error::{Result, report, with_timeout};
use super::heartbeat::HEARTBEAT_LABEL;
use super::partner::zone;
use crate::contact::OtherRoomMarks;
use crate::time::Clock;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How many rounds a node without a zone label (or whose Node could not be found) is remembered
/// as such before its Node is read again.
const UNKNOWN_ZONE_ROUNDS: u32 = 30;

/// What the contact watch reads from the API server, so tests can stand in for it.
pub trait ContactApi: Send + Sync {
    /// Every agent heartbeat Lease of the agents' namespace.
    fn list_heartbeats(&self) -> impl Future<Output = Result<Vec<Lease>>> + Send;
    /// The zone label of the Node `node`; `None` when the Node or its label is missing.
    fn zone_of(&self, node: &str) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// [`ContactApi`] over the Kubernetes API, every call with a timeout.
#[derive(Clone)]
pub struct KubeContact {
    leases: Api<Lease>,
    nodes: Api<Node>,
    timeout: Duration,
}

impl KubeContact {
    pub fn new(client: kube::Client, namespace: &str, timeout: Duration) -> Self {
        KubeContact {
            leases: Api::namespaced(client.clone(), namespace),
            nodes: Api::all(client),
            timeout,
        }
    }
}

impl ContactApi for KubeContact {
    async fn list_heartbeats(&self) -> Result<Vec<Lease>> {
        let params = ListParams::default().labels(&format!("{HEARTBEAT_LABEL}=true"));
        with_timeout(
            "list heartbeat leases",
            self.timeout,
            self.leases.list(&params),
        )
        .await
        .map(|list| list.items)
    }

    async fn zone_of(&self, node: &str) -> Result<Option<String>> {
        with_timeout("get node", self.timeout, self.nodes.get_opt(node))
            .await
            .map(|n| n.as_ref().and_then(zone))
    }
}

/// The node a heartbeat Lease belongs to: its holder, else its name `twosite-agent-<node>`.
pub fn lease_node(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| {
            lease
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("twosite-agent-"))
                .filter(|n| !n.is_empty())
                .map(str::to_string)
        })
}

/// What the holder changes on every renewal, and nobody else: `spec.renewTime`.
pub fn renewal_mark(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()?
        .renew_time
        .as_ref()
        .map(|t| t.0.to_string())
}

/// The other room's heartbeats as last listed.
#[derive(Debug, Clone)]
pub struct OtherRoomWatch {
    room: String,
    /// Node → its zone (`None`: no zone known, read again after [`UNKNOWN_ZONE_ROUNDS`]).
    zones: BTreeMap<String, (Option<String>, u32)>,
    /// The other room's renewal marks at the last list: the rule of what counts is the core's.
    marks: OtherRoomMarks,
    round: u32,
}

impl OtherRoomWatch {
    /// A watch for an agent of `room`.
    pub fn new(room: impl Into<String>) -> Self {
        OtherRoomWatch {
            room: room.into(),
            zones: BTreeMap::new(),
            marks: OtherRoomMarks::default(),
            round: 0,
        }
    }

    /// The zone of `node`, from the cache or the API server; `None` when unknown.
    async fn zone<A: ContactApi>(&mut self, api: &A, node: &str) -> Option<String> {
        if let Some((zone, since)) = self.zones.get(node)
            && (zone.is_some() || self.round.wrapping_sub(*since) < UNKNOWN_ZONE_ROUNDS)
        {
            return zone.clone();
        }
        match api.zone_of(node).await {
            Ok(zone) => {
                self.zones
                    .insert(node.to_string(), (zone.clone(), self.round));
                zone
            }
            Err(err) => {
                tracing::debug!(node, error = %report(&err), "cannot read the node's zone");
                None
            }
        }
    }

    /// One round: list, compare, and report evidence to the core. `Ok(true)`: a heartbeat of
    /// the other room changed since the previous list.
    pub async fn round<A: ContactApi>(
        &mut self,
        api: &A,
        core: &SharedCore,
        clock: &(dyn Clock + Send + Sync),
    ) -> Result<bool> {
        self.round = self.round.wrapping_add(1);
        let sent_at = clock.now();
        let leases = api.list_heartbeats().await?;
        let mut listed = Vec::new();
        for lease in &leases {
            let (Some(node), Some(mark)) = (lease_node(lease), renewal_mark(lease)) else {
                continue;
            };
            let Some(zone) = self.zone(api, &node).await else {
                continue;
            };
            if zone != self.room {
                listed.push((node, mark));
            }
        }
        let changed = self.marks.observe(listed);
        if changed {
            core.lock().observe_other_room(sent_at);
        }
        Ok(changed)
    }
}

/// Runs a round every `every` until the process ends; failures are logged and change nothing.
pub async fn run_other_room_watch<A: ContactApi>(
    api: A,
    mut watch: OtherRoomWatch,
    core: SharedCore,
    clock: Arc<dyn Clock + Send + Sync>,
    every: Duration,
) -> Result<()> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match watch.round(&api, &core, clock.as_ref()).await {
            Ok(changed) => tracing::trace!(changed, "listed the other room's heartbeats"),
            Err(err) => {
                tracing::debug!(error = %report(&err), "cannot list the heartbeat leases");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentd::fake::{FakeClock, FakeContact};
    use crate::time::MonoTime;
    use crate::{AgentCore, HealthTiming};

    #[tokio::test]
    async fn only_a_changed_heartbeat_of_the_other_room_is_evidence() {
        let api = FakeContact::new();
        api.set_zone("a-1", "room-a");
        api.set_zone("a-2", "room-a");
        api.set_zone("b-1", "room-b");
        api.renew("a-1");
        api.renew("a-2");
        api.renew("b-1");
        api.renew("x-1"); // no zone
        let core = SharedCore::new(AgentCore::new("a-1", "room-a", HealthTiming::default()));
        let clock = FakeClock::new();
        clock.set(MonoTime(1_000));
        let mut watch = OtherRoomWatch::new("room-a");
        assert!(!watch.round(&api, &core, &clock).await.expect("listed"));
        assert!(!core.lock().rooms_in_contact(MonoTime(1_000)));
        // Only the own room renews: no evidence.
        api.renew("a-2");
        clock.set(MonoTime(3_000));
        assert!(!watch.round(&api, &core, &clock).await.expect("listed"));
        // The other room renews: evidence at the moment of the list.
        api.renew("b-1");
        clock.set(MonoTime(5_000));
        assert!(watch.round(&api, &core, &clock).await.expect("listed"));
        assert!(core.lock().rooms_in_contact(MonoTime(13_000)));
        // Zones are read once.
        assert_eq!(api.zone_reads("b-1"), 1);
        // The controller writes its fence marker onto b-1's Lease: no sign of life.
        api.controller_write("b-1");
        clock.set(MonoTime(7_000));
        assert!(!watch.round(&api, &core, &clock).await.expect("listed"));
        api.renew("b-1");
        clock.set(MonoTime(9_000));
        assert!(watch.round(&api, &core, &clock).await.expect("listed"));
        assert!(core.lock().rooms_in_contact(MonoTime(17_000)));
        assert!(!core.lock().rooms_in_contact(MonoTime(17_001)));
        // The API server is gone: an error, no evidence.
        api.set_down(true);
        api.renew("b-1");
        assert!(watch.round(&api, &core, &clock).await.is_err());
    }
}
