//! What the controller sees of every node's health: the Node index plus the two kinds of
//! heartbeat Lease, each change stamped with the moment *this process* saw it on its monotonic
//! clock (never the Lease's own timestamps).
//!
//! - the twosite agent's Lease `twosite-agent-<node>` in the controller's namespace (label
//!   `twosite.dev/agent-heartbeat=true`; `holderIdentity` is the node's name). Its annotations
//!   say whether the renewal was clean (`twosite.dev/renew-failures` = `0`), the node's boot ID
//!   and whether the node's watchdog is armed (`twosite.dev/watchdog` = `enabled`). A node whose
//!   watchdog is not enabled is judged as a node without agent: nothing reboots it, so it is
//!   never treated as fenced by time.
//! - the kubelet's Lease in `kube-node-lease`, for nodes without an agent.
//!
//! [`Observed`] is a plain state machine (feed it watcher events and clock readings), so it is
//! tested without an API server; [`run_watch`] drives it from kube-runtime watchers.

use crate::admin::LoopGuard;
use crate::error::{Error, Result, report};
use crate::nodes::NodeIndex;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use kube::{Api, Resource};
use node_health::{ClusterView, HealthTiming, MonoTime, NodeFacts, NodeObservation, NodeView};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// The label that marks an agent heartbeat Lease.
pub const AGENT_HEARTBEAT_LABEL: &str = "twosite.dev/agent-heartbeat";
/// The prefix of an agent heartbeat Lease's name; the rest is the node's name.
pub use node_health::assess::AGENT_LEASE_PREFIX;
/// Consecutive failed renewals before this one; only `0` is a clean renewal.
pub const RENEW_FAILURES_ANNOTATION: &str = "twosite.dev/renew-failures";
/// The node's boot ID, as its agent saw it.
pub const BOOT_ID_ANNOTATION: &str = "twosite.dev/boot-id";
/// `enabled` when the agent feeds an armed watchdog; anything else counts as no agent.
pub const WATCHDOG_ANNOTATION: &str = "twosite.dev/watchdog";
/// The namespace of the kubelets' node Leases.
pub const KUBELET_LEASE_NAMESPACE: &str = "kube-node-lease";

/// The watches whose sync decides whether the controller may judge anybody dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WatchKind {
    Nodes,
    AgentLeases,
    KubeletLeases,
}

impl WatchKind {
    pub const ALL: [WatchKind; 3] = [
        WatchKind::Nodes,
        WatchKind::AgentLeases,
        WatchKind::KubeletLeases,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WatchKind::Nodes => "node watch",
            WatchKind::AgentLeases => "agent lease watch",
            WatchKind::KubeletLeases => "kubelet lease watch",
        }
    }
}

/// What the agent's heartbeat Lease says besides the heartbeat itself (the core's type).
pub use node_health::assess::AgentRecord;

/// One agent heartbeat Lease, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLease {
    pub node: String,
    pub fingerprint: String,
    pub clean: bool,
    pub record: AgentRecord,
}

/// Reads an agent heartbeat Lease; `None` when it names no node.
pub fn agent_lease(lease: &Lease) -> Option<AgentLease> {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    let node = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .or_else(|| name.strip_prefix(AGENT_LEASE_PREFIX))
        .filter(|n| !n.is_empty())?
        .to_string();
    let annotations = lease.metadata.annotations.as_ref();
    let annotation = |key: &str| {
        annotations
            .and_then(|a| a.get(key))
            .map(|v| v.trim().to_string())
    };
    // A renewal is what the agent changes: its renewTime (and boot ID). Not the resourceVersion:
    // the controller's own fence-marker write changes that, and must not look like a heartbeat.
    let renew_time = lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let fingerprint = format!(
        "{renew_time}/{}",
        annotation(BOOT_ID_ANNOTATION).unwrap_or_default()
    );
    Some(AgentLease {
        node,
        fingerprint,
        clean: annotation(RENEW_FAILURES_ANNOTATION).as_deref() == Some("0"),
        record: AgentRecord {
            lease_name: name.to_string(),
            fence_marker: annotations
                .is_some_and(|a| a.contains_key(crate::fence_marker::FENCE_MARKER_ANNOTATION)),
            watchdog: annotation(WATCHDOG_ANNOTATION).as_deref() == Some("enabled"),
            boot_id: annotation(BOOT_ID_ANNOTATION).filter(|b| !b.is_empty()),
            resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        },
    })
}

/// Every watch's sync state, and since when all of them have been synced.
#[derive(Debug, Default, Clone)]
struct SyncState {
    synced: BTreeSet<WatchKind>,
    all_since: Option<MonoTime>,
}

impl SyncState {
    fn set(&mut self, kind: WatchKind, synced: bool, now: MonoTime) {
        if synced {
            self.synced.insert(kind);
            if self.all_since.is_none() && WatchKind::ALL.iter().all(|k| self.synced.contains(k)) {
                self.all_since = Some(now);
            }
        } else {
            self.synced.remove(&kind);
            self.all_since = None;
        }
    }
}

/// Everything the controller has observed of the nodes' health.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    nodes: NodeIndex,
    /// Heartbeats by node name (agent and kubelet), on this process's clock.
    observations: BTreeMap<String, NodeObservation>,
    agents: BTreeMap<String, AgentRecord>,
    /// Agent Lease name → node, to forget the right node when a Lease is deleted.
    agent_lease_nodes: BTreeMap<String, String>,
    /// Lease names seen during a re-listing in progress.
    agent_relist: Option<BTreeSet<String>>,
    kubelet_relist: Option<BTreeSet<String>>,
    sync: SyncState,
    /// Since when each node has shown our `NoSchedule` taint, continuously (the head start
    /// before its pods may be released is counted from here).
    unschedulable_seen: BTreeMap<String, MonoTime>,
}

impl Observed {
    /// Applies a Node watcher event. Returns whether the pairing's facts changed.
    pub fn apply_node(&mut self, event: watcher::Event<Node>, now: MonoTime) -> bool {
        match &event {
            watcher::Event::Init => self.sync.set(WatchKind::Nodes, false, now),
            watcher::Event::InitDone => self.sync.set(WatchKind::Nodes, true, now),
            watcher::Event::Delete(node) => {
                if let Some(name) = node.metadata.name.as_deref() {
                    self.observations
                        .entry(name.to_string())
                        .and_modify(|o| o.kubelet = None);
                    self.unschedulable_seen.remove(name);
                }
            }
            watcher::Event::Apply(node) | watcher::Event::InitApply(node) => {
                let record = crate::nodes::node_record(node);
                if record.unschedulable {
                    self.unschedulable_seen
                        .entry(record.facts.name)
                        .or_insert(now);
                } else {
                    self.unschedulable_seen.remove(&record.facts.name);
                }
            }
        }
        self.nodes.apply(event)
    }

    /// Applies an agent heartbeat Lease watcher event.
    pub fn apply_agent_lease(
        &mut self,
        event: watcher::Event<Lease>,
        now: MonoTime,
        t: &HealthTiming,
    ) {
        match event {
            watcher::Event::Init => {
                self.sync.set(WatchKind::AgentLeases, false, now);
                self.agent_relist = Some(BTreeSet::new());
            }
            watcher::Event::InitApply(lease) => {
                if let Some(name) = lease.metadata.name.clone() {
                    self.agent_relist.get_or_insert_default().insert(name);
                }
                self.observe_agent_lease(&lease, now, t);
            }
            watcher::Event::Apply(lease) => self.observe_agent_lease(&lease, now, t),
            watcher::Event::InitDone => {
                let seen = self.agent_relist.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .agent_lease_nodes
                    .keys()
                    .filter(|l| !seen.contains(*l))
                    .cloned()
                    .collect();
                for lease in gone {
                    self.forget_agent_lease(&lease);
                }
                self.sync.set(WatchKind::AgentLeases, true, now);
            }
            watcher::Event::Delete(lease) => {
                if let Some(name) = lease.metadata.name.as_deref() {
                    self.forget_agent_lease(name);
                }
            }
        }
    }

    fn observe_agent_lease(&mut self, lease: &Lease, now: MonoTime, t: &HealthTiming) {
        let Some(read) = agent_lease(lease) else {
            return;
        };
        if let Some(name) = lease.metadata.name.clone() {
            self.agent_lease_nodes.insert(name, read.node.clone());
        }
        self.observations
            .entry(read.node.clone())
            .or_default()
            .observe_agent(&read.fingerprint, read.clean, now, t);
        self.agents.insert(read.node, read.record);
    }

    /// An agent Lease is gone: its node counts as having no agent from now on (never fenced by
    /// time, never clear).
    fn forget_agent_lease(&mut self, lease: &str) {
        if let Some(node) = self.agent_lease_nodes.remove(lease) {
            self.agents.remove(&node);
            if let Some(o) = self.observations.get_mut(&node) {
                o.agent = None;
                o.clear_since = None;
            }
        }
    }

    /// Applies a kubelet node Lease watcher event (Lease name = node name).
    pub fn apply_kubelet_lease(&mut self, event: watcher::Event<Lease>, now: MonoTime) {
        match event {
            watcher::Event::Init => {
                self.sync.set(WatchKind::KubeletLeases, false, now);
                self.kubelet_relist = Some(BTreeSet::new());
            }
            watcher::Event::InitApply(lease) => {
                if let Some(name) = lease.metadata.name.clone() {
                    self.kubelet_relist.get_or_insert_default().insert(name);
                }
                self.observe_kubelet_lease(&lease, now);
            }
            watcher::Event::Apply(lease) => self.observe_kubelet_lease(&lease, now),
            watcher::Event::InitDone => {
                let seen = self.kubelet_relist.take().unwrap_or_default();
                for (name, o) in &mut self.observations {
                    if !seen.contains(name) {
                        o.kubelet = None;
                    }
                }
                self.sync.set(WatchKind::KubeletLeases, true, now);
            }
            watcher::Event::Delete(lease) => {
                if let Some(o) = lease
                    .metadata
                    .name
                    .as_deref()
                    .and_then(|n| self.observations.get_mut(n))
                {
                    o.kubelet = None;
                }
            }
        }
    }

    fn observe_kubelet_lease(&mut self, lease: &Lease, now: MonoTime) {
        let Some(name) = lease.metadata.name.clone() else {
            return;
        };
        let fingerprint = lease.metadata.resource_version.clone().unwrap_or_default();
        let obs = self.observations.entry(name).or_default();
        node_health::Heartbeat::observe(&mut obs.kubelet, &fingerprint, now);
    }

    /// A watch failed: until its re-list completes nobody may be judged dead.
    pub fn watch_failed(&mut self, kind: WatchKind, now: MonoTime) {
        self.sync.set(kind, false, now);
    }

    /// Every watch has delivered its initial list and not failed since.
    pub fn synced(&self) -> bool {
        self.sync.all_since.is_some()
    }

    /// Synced, and for long enough that a fresh listing's heartbeats had time to arrive:
    /// `timing.agent_suspect_after()` after the watches synced. Only then may a node be judged
    /// dead.
    pub fn settled(&self, now: MonoTime, t: &HealthTiming) -> bool {
        self.sync
            .all_since
            .is_some_and(|since| now.since(since) >= t.agent_suspect_after())
    }

    pub fn nodes(&self) -> &NodeIndex {
        &self.nodes
    }

    pub fn node_facts(&self) -> Option<Vec<NodeFacts>> {
        self.nodes.facts()
    }

    /// Everything seen of `node`'s heartbeats, its agent counted whatever its watchdog says:
    /// what tells whether it is clear (renewing cleanly, so not vouching for anybody).
    pub fn heartbeats(&self, node: &str) -> NodeObservation {
        self.observations.get(node).cloned().unwrap_or_default()
    }

    /// The core's view of the cluster at `now`: every Node with its heartbeats and agent
    /// record, and whether the watches have settled.
    pub fn cluster_view(&self, now: MonoTime, t: &HealthTiming) -> ClusterView {
        ClusterView {
            nodes: self
                .nodes
                .records()
                .map(|r| NodeView {
                    record: r.clone(),
                    heartbeats: self.heartbeats(&r.facts.name),
                    agent: self.agents.get(&r.facts.name).cloned(),
                    unschedulable_since: self.unschedulable_seen.get(&r.facts.name).copied(),
                })
                .collect(),
            settled: self.settled(now, t),
        }
    }

    /// The agent's record of `node`, if it has an agent Lease.
    pub fn agent(&self, node: &str) -> Option<&AgentRecord> {
        self.agents.get(node)
    }
}

/// The observed state, shared by the watch tasks and the remediation loop.
#[derive(Debug, Clone, Default)]
pub struct SharedObserved(Arc<Mutex<Observed>>);

impl SharedObserved {
    pub fn new(observed: Observed) -> Self {
        SharedObserved(Arc::new(Mutex::new(observed)))
    }

    /// Locks the state. Never hold the guard across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, Observed> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Delays between restarts of a failed watch: 0.5 s to 10 s with jitter, reset after a
/// successful listing.
pub(crate) fn restart_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs one watch forever, feeding every event to `apply` with the clock reading at which it
/// was seen. On an error the watch is marked failed and restarted from a full listing (never
/// resumed where it broke), so "synced" always means "a complete listing since the last
/// error".
pub async fn run_watch<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: WatchKind,
    observed: SharedObserved,
    clock: Arc<dyn node_health::Clock + Send + Sync>,
    guard: LoopGuard,
    mut apply: F,
) -> Result<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    F: FnMut(&mut Observed, watcher::Event<K>, MonoTime) + Send,
{
    let mut backoff = restart_backoff();
    loop {
        let stream = watcher(api.clone(), config.clone());
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            guard.beat();
            match event {
                Ok(event) => {
                    let done = matches!(event, watcher::Event::InitDone);
                    apply(&mut observed.lock(), event, clock.now());
                    if done {
                        tracing::debug!(watch = kind.name(), "listing complete");
                        backoff = restart_backoff();
                    }
                }
                Err(err) => {
                    observed.lock().watch_failed(kind, clock.now());
                    tracing::warn!(watch = kind.name(), error = %report(&err), "watch failed; re-listing");
                    break;
                }
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        tokio::time::sleep(delay).await;
        guard.beat();
    }
}

/// The three watches' configurations and their `apply` functions, wired to `observed`.
pub struct Watches {
    pub observed: SharedObserved,
    pub clock: Arc<dyn node_health::Clock + Send + Sync>,
    pub timing: HealthTiming,
}

impl Watches {
    /// The Node watch; publishes the pairing's facts on `facts` when they change.
    pub async fn nodes(
        &self,
        api: Api<Node>,
        facts: watch::Sender<Option<Vec<NodeFacts>>>,
        guard: LoopGuard,
    ) -> Result<()> {
        run_watch(
            api,
            watcher::Config::default(),
            WatchKind::Nodes,
            self.observed.clone(),
            Arc::clone(&self.clock),
            guard,
            move |o: &mut Observed, event, now| {
                if o.apply_node(event, now) {
                    let now = o.node_facts();
                    tracing::debug!(nodes = now.as_ref().map(Vec::len), "node facts changed");
                    facts.send_replace(now);
                }
            },
        )
        .await?;
        Err(Error::LoopEnded("node watch"))
    }

    /// The agent heartbeat Lease watch in the controller's namespace.
    pub async fn agent_leases(&self, api: Api<Lease>, guard: LoopGuard) -> Result<()> {
        let timing = self.timing;
        run_watch(
            api,
            watcher::Config::default().labels(&format!("{AGENT_HEARTBEAT_LABEL}=true")),
            WatchKind::AgentLeases,
            self.observed.clone(),
            Arc::clone(&self.clock),
            guard,
            move |o: &mut Observed, event, now| o.apply_agent_lease(event, now, &timing),
        )
        .await?;
        Err(Error::LoopEnded("agent lease watch"))
    }

    /// The kubelet node Lease watch in `kube-node-lease`.
    pub async fn kubelet_leases(&self, api: Api<Lease>, guard: LoopGuard) -> Result<()> {
        run_watch(
            api,
            watcher::Config::default(),
            WatchKind::KubeletLeases,
            self.observed.clone(),
            Arc::clone(&self.clock),
            guard,
            |o: &mut Observed, event, now| o.apply_kubelet_lease(event, now),
        )
        .await?;
        Err(Error::LoopEnded("kubelet lease watch"))
    }
}
